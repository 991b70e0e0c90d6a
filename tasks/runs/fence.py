"""Who owns a deployment's flow run: a process that a re-run replaced stops before it writes,
and a cancellation is told apart from a crash.

The silent-run automation (deployments/recovery.py) marks a run Crashed when its heartbeats
stop reaching the server, then re-runs it. The process it gave up on may still be alive
(paused, starved of CPU, cut off from the server): left alone, it and the re-run would write
the same checkpoints and run folder. So before each checkpoint the training loop calls
`hold()`, which asks the server whether the flow run is still in the Running state this
process entered; if the run has moved on without it, the process exits there and then.
Under DDP the ranks have no flow-run context: train-epochs hands them its `Owner`, and rank 0
asks with it before each checkpoint; fenced out, it has the launcher exit (tasks/engine/launch.py).

A worker carries out a cancellation from the UI with SIGTERM, which train-epochs turns into
a checkpoint and a stop. `cancellation()` says when that SIGTERM is a cancellation and reports
the run Cancelled itself, so it never passes through Crashed, which the re-run automation
acts on.
"""

from __future__ import annotations

import os
import signal
import sys
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import NoReturn
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import FlowRun, StateType
from prefect.context import FlowRunContext
from prefect.exceptions import TerminationSignal
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.states import Cancelled

ASK_EVERY_SECONDS = 1.0  # checkpoints may come every few ms; the server hears at most this often
# Exit status of a fenced-out process. Not an error code on purpose: the worker reports any
# other as a crash of the flow run, which now belongs to the re-run, and would crash that.
FENCED_EXIT = 0


@dataclass
class _Asked:
    at: float
    owned: bool


_last: dict[str, _Asked] = {}


@dataclass(frozen=True)
class Owner:
    """A deployment's flow run, the Running state a process entered, and where to ask: what a
    process without the flow-run context (a DDP rank) needs to ask on the process's behalf."""

    flow_run: str
    state: str
    api_url: str


def owner() -> Owner | None:
    """This process's claim on its deployment flow run; None where nobody can take it over."""
    run = _deployment_run()
    if run is None:
        return None
    return Owner(str(run.id), str(run.state.id), PREFECT_API_URL.value() or "")


def exit_now() -> NoReturn:
    # At once: no cleanup that would flush a TensorBoard file into the shared run folder,
    # or report a state that would land on the re-run.
    os._exit(FENCED_EXIT)


def _deployment_run() -> FlowRun | None:
    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    # Only deployment runs are re-run by the automations: nobody else can take a run over.
    if run is None or run.deployment_id is None or run.state is None:
        return None
    return run


def hold(claim: Owner | None = None, fenced_out: Callable[[], NoReturn] = exit_now) -> bool:
    """Before a checkpoint: True if this process still owns its flow run (write it), False if
    the server can't say right now (skip this one). If a re-run (or a Crashed/Failed verdict)
    has taken the flow run from it, calls `fenced_out`, which ends the process writing nothing
    more (by default: exits it at once).

    `claim`: whose run to ask about, for a process without the flow-run context (a DDP rank);
    by default, this process's own deployment run, if it has one."""
    claim = claim or owner()
    if claim is None:
        return True
    key, now = claim.flow_run, time.monotonic()
    last = _last.get(key)
    if last is not None and now - last.at < ASK_EVERY_SECONDS:
        return last.owned
    # A rank's settings may not name the server its launcher was started against.
    settings = (
        temporary_settings({PREFECT_API_URL: claim.api_url}) if claim.api_url else nullcontext()
    )
    try:
        with settings, get_client(sync_client=True) as client:
            current = client.read_flow_run(UUID(claim.flow_run)).state
    except Exception as exc:  # the server is unreachable: no proof either way
        print(
            f"trainflow: cannot check that this process still owns flow run {key} "
            f"({type(exc).__name__}); skipping this checkpoint",
            file=sys.stderr,
        )
        _last[key] = _Asked(now, False)
        return False
    # Still the Running state this process entered; Cancelling is ours too: the worker's
    # SIGTERM follows, and train-epochs checkpoints on it.
    owned = current is not None and (str(current.id) == claim.state or current.is_cancelling())
    if not owned:
        state = f"{current.name} ({current.message})" if current else "no state"
        print(
            f"trainflow: flow run {key} was taken over while this process was still "
            f"training, now {state}; exiting without writing anything more",
            file=sys.stderr,
            flush=True,
        )
        fenced_out()
    _last[key] = _Asked(now, True)
    return True


def cancellation(signum: int) -> TerminationSignal | None:
    """On a stop signal: when it is a worker carrying out a cancellation of this flow run (the
    run is Cancelling on the server), report the run Cancelled and return the TerminationSignal
    to raise; None for any other stop (Ctrl-C, a shutdown), which stays an interruption."""
    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    if signum != signal.SIGTERM or run is None:
        return None
    try:
        with get_client(sync_client=True) as client:
            state = client.read_flow_run(run.id).state
            if state is None or state.type not in (StateType.CANCELLING, StateType.CANCELLED):
                return None
            if state.type == StateType.CANCELLING:
                result = client.set_flow_run_state(
                    run.id, Cancelled(message="Cancelled; train-epochs saved a checkpoint.")
                )
                state = result.state or state
    except Exception:
        return None  # can't tell: a crash, which the re-run automation may bring back
    # The engine's own record of the run (the context holds the engine's object), as Prefect
    # itself sets it after an Abort: with a final state recorded, the engine reports no Crashed
    # for the TerminationSignal, and the server refuses anyone else's (Cancelled is final).
    run.state = state
    return TerminationSignal(signum)
