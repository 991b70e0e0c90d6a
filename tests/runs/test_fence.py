"""tasks/runs/fence.py's rules, against a scripted server; flows/test_deployments.py attacks it
for real (a SIGSTOPped flow-run process, a cancellation from the UI)."""

import signal
import uuid
from types import SimpleNamespace

import pytest
from prefect.exceptions import TerminationSignal
from prefect.states import Cancelled, Cancelling, Crashed, Running, Scheduled

from trainflow.tasks.runs import fence


class _Server:
    """What read_flow_run answers: a state, or an error when the server is unreachable."""

    def __init__(self, state):
        self.state, self.reads = state, 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read_flow_run(self, run_id):
        self.reads += 1
        if isinstance(self.state, Exception):
            raise self.state
        return SimpleNamespace(id=run_id, state=self.state)

    def set_flow_run_state(self, run_id, state):
        self.state = state
        return SimpleNamespace(state=state)


class _Exited(Exception):
    pass


@pytest.fixture
def world(monkeypatch):
    """A deployment run in its Running state, a server, a clock, and an os._exit that raises."""
    ours = Running()
    run = SimpleNamespace(id=uuid.uuid4(), deployment_id=uuid.uuid4(), state=ours)
    server = _Server(ours)
    clock = [1000.0]
    monkeypatch.setattr(
        fence, "FlowRunContext", SimpleNamespace(get=lambda: SimpleNamespace(flow_run=run))
    )
    monkeypatch.setattr(fence, "get_client", lambda sync_client: server)
    monkeypatch.setattr(fence.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(fence.os, "_exit", lambda code: (_ for _ in ()).throw(_Exited(code)))
    monkeypatch.setattr(fence, "_last", {})
    return SimpleNamespace(run=run, server=server, clock=clock, ours=ours)


def test_the_owner_writes(world):
    assert fence.hold() is True and world.server.reads == 1


def test_the_server_is_asked_at_most_once_a_second(world):
    fence.hold()
    world.clock[0] += 0.5
    assert fence.hold() is True and world.server.reads == 1
    world.clock[0] += 0.6
    assert fence.hold() is True and world.server.reads == 2


@pytest.mark.parametrize(
    "taken_over",
    [
        lambda: Crashed(message="No heartbeat for 90 s"),
        lambda: Scheduled(name="AwaitingRetry"),
        lambda: Running(),
    ],  # the re-run's own Running state: another id
    ids=["crashed", "awaiting-retry", "re-run-running"],
)
def test_a_process_whose_run_was_taken_over_exits_without_reporting(world, taken_over, capsys):
    fence.hold()
    world.server.state = taken_over()
    world.clock[0] += 60  # paused for a minute
    with pytest.raises(_Exited) as exited:
        fence.hold()
    assert exited.value.args == (fence.FENCED_EXIT,) and fence.FENCED_EXIT == 0
    assert "taken over" in capsys.readouterr().err


def test_a_run_being_cancelled_is_still_ours_until_the_sigterm(world):
    world.server.state = Cancelling()
    assert fence.hold() is True


def test_an_unreachable_server_skips_the_checkpoint_and_asks_again_later(world):
    world.server.state = OSError("connection refused")
    assert fence.hold() is False
    world.clock[0] += 0.5
    assert fence.hold() is False and world.server.reads == 1
    world.server.state = world.ours
    world.clock[0] += 1
    assert fence.hold() is True


def test_a_run_outside_a_deployment_is_never_fenced(world):
    world.run.deployment_id = None
    world.server.state = Crashed()
    assert fence.hold() is True and world.server.reads == 0


@pytest.mark.parametrize("state", [Cancelling, Cancelled])
def test_a_sigterm_during_a_cancellation_reports_cancelled_never_crashed(world, state):
    world.server.state = state()
    stop = fence.cancellation(signal.SIGTERM)
    assert isinstance(stop, TerminationSignal) and stop.signal == signal.SIGTERM
    assert world.server.state.is_cancelled()  # reported before anything can report Crashed
    assert world.run.state.is_cancelled()  # so the engine sees a final state: no Crashed


@pytest.mark.parametrize(
    ("signum", "state"),
    [(signal.SIGTERM, Running), (signal.SIGINT, Cancelling), (signal.SIGTERM, None)],
    ids=["sigterm-while-running", "ctrl-c-while-cancelling", "server-unreachable"],
)
def test_any_other_stop_stays_an_interruption(world, signum, state):
    world.server.state = state() if state else OSError("connection refused")
    assert fence.cancellation(signum) is None
