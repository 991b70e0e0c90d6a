"""Crash recovery for deployment runs: the Prefect automations that up.sh installs.

Prefect retries exceptions, not crashes: a run whose process or worker dies stays Crashed (or
Running forever, if nobody is left to report it). Four automations close that gap for runs
tagged `auto-recover` (both deployments in prefect.yaml, and serve.py's):

1. silent run → Crashed: no heartbeat for TRAINFLOW_HEARTBEAT_WINDOW seconds (default 90);
2. Crashed for TRAINFLOW_CRASH_SETTLE seconds (default 60) → Scheduled again, same run and
   parameters, while attempts < TRAINFLOW_MAX_ATTEMPTS (default 3); the re-run resumes from
   train-epochs' last checkpoint;
3. Crashed on the last attempt, for as long → Failed, with a message that says so;
4. a run that crashed more than TRAINFLOW_MAX_ATTEMPTS times (crashes before it could start
   do not count as attempts) → Failed.

"Attempts" is Prefect's run count, carried by every state event as `prefect.run-count`: it
grows each time the run starts Running (flow-level retries count too).
"""

from __future__ import annotations

import json
import os
import sys
from datetime import timedelta
from typing import Any

from prefect.automations import Automation, ChangeFlowRunState, EventTrigger, Posture
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.events.schemas.automations import AutomationCore

TAG = "auto-recover"
NAMES = (
    "trainflow-crash-silent-runs",
    "trainflow-rerun-crashed",
    "trainflow-give-up",
    "trainflow-stop-crash-loops",
)
HEARTBEAT_SECONDS = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY in prefect.yaml and serve.py
FINAL = ("Completed", "Failed", "Cancelled", "Crashed")

_TAGGED = {"prefect.resource.role": "tag", "prefect.resource.id": f"prefect.tag.{TAG}"}
_ANY_RUN = "prefect.flow-run.*"


def _stays_crashed(run_counts: list[str], settle: float) -> EventTrigger:
    """A run that crashed on one of these attempts, then saw no other state for `settle` s.

    The wait matters: a process worker reports one crash twice, its runner at once, then the
    worker itself once the runner has run the flow's on_crashed hooks, in a subprocess that
    imports the flow, torch included: 25 s later on a loaded 2-core machine. A re-run started
    in between is crashed by that second report (an extra attempt: run count 3 after one
    kill). After the wait the second report finds the run Crashed, and Prefect refuses it.
    A run cancelled from the UI never gets here: train-epochs reports a SIGTERM that carries
    out a cancellation as Prefect's own cancellation, never as a crash (tasks/runs/fence.py), so
    keeping a cancelled run cancelled does not depend on this wait.
    """
    # Never "0": a run that crashed before it ever started (a broken pull step, say) has no
    # progress to resume and most likely crashes the same way again.
    return EventTrigger(
        after={"prefect.flow-run.Crashed"},
        expect={"prefect.flow-run.*"},
        match={"prefect.resource.id": _ANY_RUN, "prefect.run-count": run_counts},
        match_related=_TAGGED,
        for_each={"prefect.resource.id"},
        posture=Posture.Proactive,
        threshold=1,
        within=timedelta(seconds=settle),
    )


def automations(max_attempts: int, heartbeat_window: float, settle: float) -> list[Automation]:
    if max_attempts < 1:
        raise ValueError(f"TRAINFLOW_MAX_ATTEMPTS must be 1 or more, got {max_attempts}")
    if heartbeat_window < HEARTBEAT_SECONDS + 10:
        raise ValueError(
            f"TRAINFLOW_HEARTBEAT_WINDOW must exceed the {HEARTBEAT_SECONDS} s heartbeat by "
            f"10 s or more, got {heartbeat_window:g}"
        )
    if settle < 5:
        raise ValueError(f"TRAINFLOW_CRASH_SETTLE must be 5 seconds or more, got {settle:g}")
    silent = _automation(
        NAMES[0],
        f"A run with no heartbeat for {heartbeat_window:g} s is marked Crashed (its worker or "
        "machine died with it).",
        EventTrigger(
            # Every heartbeat opens a window; the next heartbeat or a final state closes it.
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *(f"prefect.flow-run.{s}" for s in FINAL)},
            match={"prefect.resource.id": _ANY_RUN},
            match_related=_TAGGED,
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=timedelta(seconds=heartbeat_window),
        ),
        ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"No heartbeat for {heartbeat_window:g} s: the run's process, worker or "
            "machine died without reporting it.",
        ),
    )
    rerun = _automation(
        NAMES[1],
        f"A crashed run goes back to Scheduled, up to {max_attempts} attempts.",
        _stays_crashed([str(n) for n in range(1, max_attempts)], settle),
        ChangeFlowRunState(
            state=StateType.SCHEDULED,
            name="AwaitingRetry",
            message=f"Crashed; re-run by automation {NAMES[1]} (at most {max_attempts} "
            "attempts). Training resumes from its last checkpoint.",
        ),
    )
    give_up = _automation(
        NAMES[2],
        f"A run that crashed on attempt {max_attempts} (the last) is marked Failed.",
        _stays_crashed([str(max_attempts)], settle),
        _failed(
            f"Crashed on attempt {max_attempts} of {max_attempts} (TRAINFLOW_MAX_ATTEMPTS); not "
            "re-run again. The Crashed states before this one say why each attempt died (exit "
            "code -9 is SIGKILL, often out of memory)."
        ),
    )
    # A re-run that dies before it starts Running (its code no longer loads, its folder moved)
    # keeps its run count, so the two above would re-run it forever: count crashes instead.
    crash_loop = _automation(
        NAMES[3],
        f"A run that crashed {max_attempts + 1} times in a day is marked Failed.",
        EventTrigger(
            expect={"prefect.flow-run.Crashed"},
            match={"prefect.resource.id": _ANY_RUN},
            match_related=_TAGGED,
            for_each={"prefect.resource.id"},
            posture=Posture.Reactive,
            threshold=max_attempts + 1,
            within=timedelta(days=1),
        ),
        _failed(
            f"Crashed {max_attempts + 1} times, some before it could start (does its code still "
            "load, is its folder still there?); not re-run again."
        ),
    )
    return [silent, *([rerun] if max_attempts > 1 else []), give_up, crash_loop]


def _automation(
    name: str, description: str, trigger: EventTrigger, action: ChangeFlowRunState
) -> Automation:
    return Automation(name=name, description=description, trigger=trigger, actions=[action])


def _failed(message: str) -> ChangeFlowRunState:
    return ChangeFlowRunState(state=StateType.FAILED, message=message)


def install(wanted: list[Automation]) -> None:
    """Make the server hold exactly `wanted` under our names, touching what is already right.

    An automation that is deleted and created again forgets the runs it was watching, among
    them a run that went silent before up.sh ran (a stack restarted after its worker died):
    so one whose definition is unchanged stays as it is.
    """
    with get_client(sync_client=True) as client:
        for name in NAMES:
            target = next((a for a in wanted if a.name == name), None)
            installed = client.read_automations_by_name(name)
            if target and len(installed) == 1 and _definition(installed[0]) == _definition(target):
                print(f"automation {name}: unchanged")
                continue
            for automation in installed:
                client.delete_automation(automation.id)
            if target:
                target.create()
                print(f"automation {name}: {target.description}")


def _definition(automation: AutomationCore) -> str:
    fields = automation.model_dump(
        mode="json", include={"name", "description", "enabled", "trigger", "actions"}
    )
    fields["trigger"].pop("id", None)  # a new id per trigger object, even for equal ones
    return json.dumps(_canonical(fields), sort_keys=True)


def _canonical(value: Any) -> Any:
    # Sets (expect, after, for_each…) come back from the server as lists in any order.
    if isinstance(value, dict):
        return {key: _canonical(item) for key, item in value.items()}
    if isinstance(value, list):
        return sorted((_canonical(item) for item in value), key=json.dumps)
    return value


def main() -> int:
    try:
        wanted = automations(
            int(os.environ.get("TRAINFLOW_MAX_ATTEMPTS", "3")),
            float(os.environ.get("TRAINFLOW_HEARTBEAT_WINDOW", "90")),
            float(os.environ.get("TRAINFLOW_CRASH_SETTLE", "60")),
        )
    except ValueError as exc:
        print(f"recovery.py: error: {exc}", file=sys.stderr)
        return 2
    install(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
