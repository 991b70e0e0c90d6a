"""Test-only faults for a child process, injected from outside trainflow's code.

The harness puts this folder first on a child's PYTHONPATH, so Python imports this module
at start-up (as it does any `sitecustomize`), and sets TRAINFLOW_FAULT to one of:

    signal:SIG:step:N                 send SIG (KILL, TERM, INT, STOP) to itself after the
                                      Nth backward pass (`torch.Tensor.backward`, which
                                      the loop's `loss.backward()` is), i.e. training
                                      step N, before its optimizer step
    signal:SIG:step:N:launcher        the same, sent to its parent process instead: under
                                      DDP, torch's elastic agent (the train-epochs process)
    signal:KILL:KIND:N:MOMENT         SIGKILL itself during the Nth write of a KIND file
                                      (checkpoint, train-record: train-epochs' cache record,
                                      model: the run folder's model.safetensors), at MOMENT:
                                      fsync (its bytes are written, not yet synced),
                                      replace (synced, not yet renamed) or renamed (renamed,
                                      folder not yet synced)
    fill:step:N:FOLDER                after the Nth backward pass, fill the file system
                                      that holds FOLDER (one file of all its free space)
    edit:step:N:FILE                  after the Nth backward pass, append a statement to
                                      FILE (a source file), then SIGKILL itself
    takeover:ask:N:FOLDERS            at the Nth question the process asks the server about
                                      its flow run (Prefect's SyncPrefectClient.read_flow_run,
                                      which the split-brain fence asks), first mark that run
                                      Crashed through the API, as the silent-run automation
                                      would, and log every file under FOLDERS (os.pathsep-
                                      separated) with its size and mtime; then let it ask
    lockstep:PEER_LOG                 record the first training step and every checkpoint
                                      write and delete; before the first checkpoint appears,
                                      wait until the peer process (which logs to PEER_LOG)
                                      has taken its first step, so both chose where to start
                                      before either wrote; after the Nth checkpoint, wait
                                      until the peer has written its Nth; either wait ends
                                      if the peer has exited

With TRAINFLOW_FAULT_RANK=R, a step or takeover fault strikes only in the DDP rank R (the RANK that
torch's launcher gives its workers) and only once: a strike already in the log disarms the
processes a restart brings up, so a restarted rank trains on.

Every event is appended to TRAINFLOW_FAULT_LOG as a JSON line, the fault's own line written
before it strikes, so a test proves where a kill landed instead of guessing from timing.
"""

import atexit
import json
import os
import re
import signal
import threading
import time

FAULT = os.environ.get("TRAINFLOW_FAULT", "")
LOG = os.environ.get("TRAINFLOW_FAULT_LOG", "")
RANK = os.environ.get("TRAINFLOW_FAULT_RANK", "")
KINDS = {
    "checkpoint": re.compile(r".*/ckpt-\d{9}-\d{9}-[^/]*\.safetensors"),
    "train-record": re.compile(r".*/records/train-epochs-[^/]+"),
    "model": re.compile(r".*/model\.safetensors"),
}


def log(event: str, **fields: object) -> None:
    with open(LOG, "a") as f:
        f.write(json.dumps({"event": event, "pid": os.getpid(), **fields}) + "\n")
        f.flush()
        os.fsync(f.fileno())


def strike(signame: str, **where: object) -> None:
    log("strike", signal=signame, **where)
    # To this thread, and Python's handler (for TERM and INT) has run when this returns.
    signal.raise_signal(getattr(signal, f"SIG{signame}"))


def armed() -> bool:
    """Whether a step fault may strike in this process (see TRAINFLOW_FAULT_RANK)."""
    if not RANK:
        return True
    if os.environ.get("RANK") != RANK:  # read at the step: the launcher sets it after start-up
        return False
    try:
        with open(LOG) as f:
            return all(json.loads(line)["event"] != "strike" for line in f)
    except FileNotFoundError:
        return True


def kind_of(path: str) -> str | None:
    for kind, pattern in KINDS.items():
        if pattern.fullmatch(os.path.abspath(path)):
            return kind
    return None


def after_step(n: int, act) -> None:
    """Call `act()` after training step N, armed: the Nth backward pass, the loop's
    `loss.backward()`, the public `torch.Tensor.backward` a user's code or profiler would wrap."""
    import torch  # this child trains anyway

    real = torch.Tensor.backward
    calls = 0

    def backward(self, *args, **kwargs):
        nonlocal calls
        result = real(self, *args, **kwargs)
        calls += 1
        if calls == n and armed():
            act()
        return result

    torch.Tensor.backward = backward


def on_step(signame: str, n: int, whom: str = "self") -> None:
    def act() -> None:
        if whom != "launcher":
            strike(signame, step=n, rank=RANK)
            return
        log("strike", signal=signame, step=n, rank=RANK, launcher=os.getppid())
        os.kill(os.getppid(), getattr(signal, f"SIG{signame}"))
        if signame == "KILL":
            # The fault lands at this step: this rank trains no further while the kernel
            # tears the launcher down (the rank dies with it, PR_SET_PDEATHSIG).
            threading.Event().wait()

    after_step(n, act)


def on_step_fill(n: int, folder: str) -> None:
    def act() -> None:
        log("strike", fill=folder, step=n, rank=RANK)
        stat = os.statvfs(folder)
        with open(os.path.join(folder, "filler"), "wb") as f:
            f.write(b"\0" * (stat.f_bavail * stat.f_frsize))

    after_step(n, act)


def on_step_edit(n: int, path: str) -> None:
    def act() -> None:
        with open(path, "a") as f:
            f.write("\nEDITED_DURING_THE_RUN = True\n")
        strike("KILL", edited=path, step=n, rank=RANK)

    after_step(n, act)


def on_write(kind: str, n: int, moment: str) -> None:
    real_fsync, real_replace = os.fsync, os.replace
    writes = 0

    def fsync(fd):
        # The temporary file's fsync comes before its rename: that is the n-th write starting.
        path = os.readlink(f"/proc/self/fd/{fd}")
        name = re.sub(r"^\.(.*)\.[^.]+\.tmp$", r"\1", os.path.basename(path))
        final = os.path.join(os.path.dirname(path), name)
        is_ours = moment == "fsync" and not os.path.isdir(path) and kind_of(final) == kind
        if is_ours and writes + 1 == n:
            strike("KILL", kind=kind, write=n, moment=moment, path=path)
        return real_fsync(fd)

    def replace(src, dst, *args, **kwargs):
        nonlocal writes
        if kind_of(os.fspath(dst)) != kind:
            return real_replace(src, dst, *args, **kwargs)
        writes += 1
        if writes == n and moment == "replace":
            strike("KILL", kind=kind, write=n, moment=moment, path=os.fspath(dst))
        result = real_replace(src, dst, *args, **kwargs)
        if writes == n and moment == "renamed":
            strike("KILL", kind=kind, write=n, moment=moment, path=os.fspath(dst))
        return result

    os.fsync, os.replace = fsync, replace


def files_under(folders: list[str]) -> dict[str, list[int]]:
    found = {}
    for folder in folders:
        for root, _, names in os.walk(folder):
            for name in names:
                path = os.path.join(root, name)
                status = os.stat(path)
                found[path] = [status.st_size, status.st_mtime_ns]
    return found


def on_takeover(n: int, folders: list[str]) -> None:
    import httpx
    from prefect.client.orchestration import SyncPrefectClient

    real = SyncPrefectClient.read_flow_run
    asked = 0

    def read_flow_run(self, flow_run_id, *args, **kwargs):
        nonlocal asked
        asked += 1
        if asked == n and armed():
            response = httpx.post(
                f"{os.environ['PREFECT_API_URL']}/flow_runs/{flow_run_id}/set_state",
                json={
                    "state": {"type": "CRASHED", "name": "Crashed", "message": "taken over"},
                    "force": True,
                },
                timeout=30,
            )
            response.raise_for_status()
            log(
                "strike",
                ask=n,
                rank=RANK,
                set_state=response.json()["status"],
                files=files_under(folders),
            )
        return real(self, flow_run_id, *args, **kwargs)

    SyncPrefectClient.read_flow_run = read_flow_run


def lockstep(peer_log: str) -> None:
    import torch  # this child trains anyway

    real_backward, real_replace, real_remove = torch.Tensor.backward, os.replace, os.remove
    stepped, written = False, 0

    def wait_for_peer(reached, what: str) -> None:
        """A barrier, not a race: go on once the peer's log shows `reached` (or its exit)."""
        deadline = time.monotonic() + 300
        while True:
            try:
                with open(peer_log) as f:
                    # Only whole lines: the peer may be appending one right now.
                    events = [line for line in f if line.endswith("\n")]
            except FileNotFoundError:
                events = []
            events = [json.loads(line)["event"] for line in events]
            if "exit" in events or reached(events):
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"the peer run never reached {what}")
            time.sleep(0.01)

    # A run picks its checkpoint to resume from before its first step: once the peer has
    # stepped, a checkpoint of ours can no longer become its starting point.
    def backward(self, *args, **kwargs):
        nonlocal stepped
        if not stepped:
            stepped = True
            log("step")
        return real_backward(self, *args, **kwargs)

    def replace(src, dst, *args, **kwargs):
        nonlocal written
        if kind_of(os.fspath(dst)) != "checkpoint":
            return real_replace(src, dst, *args, **kwargs)
        if written == 0:
            wait_for_peer(lambda events: "step" in events, "its first training step")
        result = real_replace(src, dst, *args, **kwargs)
        written += 1
        folder = os.path.dirname(os.fspath(dst))
        log("checkpoint", name=os.path.basename(dst), listing=sorted(os.listdir(folder)))
        n = written  # both runs hold n checkpoints before either goes on
        wait_for_peer(lambda events: events.count("checkpoint") >= n, f"checkpoint {n}")
        return result

    def remove(path, *args, **kwargs):
        if kind_of(os.fspath(path)) == "checkpoint":
            log("remove", name=os.path.basename(path))
        return real_remove(path, *args, **kwargs)

    torch.Tensor.backward = backward
    os.replace, os.remove = replace, remove
    atexit.register(log, "exit")


if FAULT:
    log("start", fault=FAULT)
    mode, _, spec = FAULT.partition(":")
    if mode == "signal":
        signame, target, *rest = spec.split(":")
        if target == "step":
            on_step(signame, int(rest[0]), *rest[1:])
        else:
            on_write(target, int(rest[0]), rest[1])
    elif mode == "edit":
        _, n, path = spec.split(":", 2)
        on_step_edit(int(n), path)
    elif mode == "fill":
        _, n, folder = spec.split(":", 2)
        on_step_fill(int(n), folder)
    elif mode == "takeover":
        _, n, folders = spec.split(":", 2)
        on_takeover(int(n), folders.split(os.pathsep))
    elif mode == "lockstep":
        lockstep(spec)
    else:
        raise ValueError(f"unknown TRAINFLOW_FAULT {FAULT!r}")
