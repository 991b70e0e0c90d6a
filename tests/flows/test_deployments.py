"""Issue #5 end to end: deployments/ on a real server and real workers, with real crashes.

One `prefect server start` (SQLite, 127.0.0.1, its own PREFECT_HOME) for the module, set up
by deployments/up.sh as a user would; workers are `prefect worker start` processes. Every
process is killed, with its children, when the module ends.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import torch

from ..prefect_stack import POOL, REPO, Stack, kill_tree, start, wait_for

_spec = importlib.util.spec_from_file_location("recovery", REPO / "deployments" / "recovery.py")
recovery = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recovery)

# ~2,000 batches an epoch, ~0.2 s an epoch here: long enough to kill mid-training, short
# enough for CI. The same config (in another cache) gives the reference weights.
LONG = {"n_samples": 40000, "epochs": 20, "checkpoint_every_seconds": 0.3}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    stack = Stack(tmp_path_factory.mktemp("prefect-stack"))
    try:
        stack.start_server()
        stack.up()
        stack.worker = stack.start_worker("default")
        yield stack
    finally:
        stack.stop()
        print(f"\nserver and worker logs: {stack.home}")


def _params(root: Path, **config) -> dict:
    return {"config": {"runs_dir": str(root / "runs"), "cache_dir": str(root / "cache"), **config}}


def _checkpoints(root: Path) -> list[tuple[int, int]]:
    names = (p.name.split("-") for p in (root / "cache").glob("checkpoints/*/ckpt-*.safetensors"))
    return sorted((int(epoch), int(batch)) for _, epoch, batch, *_ in names)


def _wait_for_epoch(root: Path, epoch: int) -> None:
    wait_for(
        f"a checkpoint at epoch {epoch}+",
        lambda: any(e >= epoch for e, _ in _checkpoints(root)),
        timeout=300,
        every=0.05,
    )


def _finished_run_dir(root: Path) -> Path:
    """The attempt that finished: crashed attempts leave folders without metrics.json."""
    [metrics] = (root / "runs").glob("*/metrics.json")
    return metrics.parent


class Reference:
    """An uninterrupted run of LONG, started once and left running while the tests go on."""

    def __init__(self, stack: Stack, root: Path):
        self.stack, self.root = stack, root
        self.run_id = stack.create_run("train/manual", _params(root, **LONG))

    def weights(self) -> bytes:
        self.stack.wait_for_state(self.run_id, {"Completed"}, timeout=400)
        return (_finished_run_dir(self.root) / "model.safetensors").read_bytes()


@pytest.fixture(scope="module")
def reference(stack, tmp_path_factory):
    return Reference(stack, tmp_path_factory.mktemp("reference"))


# --- scoring after every good nightly run ----------------------------------------------------


def _predict_runs(stack: Stack, model: str) -> list[dict]:
    """The runs of predict/after-nightly whose model is `model` (the trigger's parameter)."""
    deployment = stack.deployment("predict/after-nightly")["id"]
    runs = stack.api(
        "POST", "/flow_runs/filter", json={"deployments": {"id": {"any_": [deployment]}}}
    ).json()
    return [r for r in runs if r["parameters"].get("config", {}).get("model") == model]


def _task_states(stack: Stack, run_id: str) -> dict[str, str]:
    runs = stack.api("POST", "/task_runs/filter", json={"flow_runs": {"id": {"any_": [run_id]}}})
    return {r["name"].rsplit("-", 1)[0]: r["state"]["name"] for r in runs.json()}


def test_a_completed_nightly_run_triggers_scoring_with_its_model(stack, tmp_path):
    nightly = stack.create_run("train/nightly", _params(tmp_path, epochs=3))
    stack.wait_for_state(nightly, {"Completed"}, timeout=400)
    model = f"prefect.flow-run.{nightly}"
    [first] = wait_for("the trigger's predict run", lambda: _predict_runs(stack, model), 120)
    stack.wait_for_state(first["id"], {"Completed"}, timeout=300)
    run_dir = _finished_run_dir(tmp_path)
    with (run_dir / "predictions.csv").open() as f:
        rows = list(csv.DictReader(f))
    # model.pt2 applied here to the data it trained on ('synthetic': the run's own recipe).
    x = torch.from_numpy(np.random.RandomState(42).rand(100, 1)).float()
    with torch.no_grad():
        expected = torch.export.load(run_dir / "model.pt2").module()(x)[:, 0]
    assert [int(r["row"]) for r in rows] == list(range(100))
    assert torch.equal(torch.tensor([float(r["prediction"]) for r in rows]), expected)
    assert _task_states(stack, first["id"])["score"] == "Completed"

    # The same event again (a second trigger on the same model and data): scored from the cache.
    [event] = stack.api(
        "POST",
        "/events/filter",
        json={
            "filter": {
                "event": {"name": ["prefect.flow-run.Completed"]},
                "resource": {"id": [model]},
            }
        },
    ).json()["events"]
    again = {**event, "id": str(uuid.uuid4()), "occurred": datetime.now(UTC).isoformat()}
    stack.api("POST", "/events", json=[again]).raise_for_status()
    second = wait_for(
        "a second predict run",
        lambda: [r for r in _predict_runs(stack, model) if r["id"] != first["id"]],
        120,
    )[0]
    stack.wait_for_state(second["id"], {"Completed"}, timeout=300)
    assert _task_states(stack, second["id"])["score"] == "Cached"


def test_only_a_completed_run_of_train_nightly_triggers_scoring(stack):
    """A Failed or Crashed nightly run emits no Completed event, so it never starts scoring;
    nor does a Completed run of another flow or deployment."""
    deployment = stack.deployment("predict/after-nightly")["id"]
    automations = stack.api("POST", "/automations/filter").json()
    [trigger] = [
        a["trigger"]
        for a in automations
        if any(action.get("deployment_id") == deployment for action in a["actions"])
    ]
    assert trigger["expect"] == ["prefect.flow-run.Completed"]
    assert trigger["match"] == {"prefect.resource.id": "prefect.flow-run.*"}
    assert {
        (m["prefect.resource.role"], m["prefect.resource.name"]) for m in trigger["match_related"]
    } == {
        ("flow", "train"),
        ("deployment", "nightly"),
    }


# --- deploying ----------------------------------------------------------------------------


def test_up_deploys_both_deployments_with_schedule_schema_and_automations(stack):
    nightly, manual = stack.deployment("train/nightly"), stack.deployment("train/manual")
    for deployment in (nightly, manual):
        assert deployment["work_pool_name"] == POOL
        assert deployment["enforce_parameter_schema"] is True
        assert "auto-recover" in deployment["tags"]
        assert deployment["pull_steps"] == [
            {"prefect.deployments.steps.set_working_directory": {"directory": str(REPO)}}
        ]
        assert deployment["job_variables"]["env"]["PREFECT_FLOWS_HEARTBEAT_FREQUENCY"] == "30"
        config = deployment["parameter_openapi_schema"]["definitions"]["TrainConfig"]
        assert config["properties"]["lr"]["exclusiveMinimum"] == 0
        assert config["additionalProperties"] is False
    [schedule] = nightly["schedules"]
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert schedule["active"] is True
    assert manual["schedules"] == []

    automations = {a["name"]: a for a in stack.api("POST", "/automations/filter").json()}
    silent, rerun, give_up, loop = (automations[n]["trigger"] for n in recovery.NAMES)
    assert silent["within"] == 40 and silent["after"] == ["prefect.flow-run.heartbeat"]
    assert rerun["match"]["prefect.run-count"] == ["1", "2"] and rerun["within"] == 45
    assert give_up["match"]["prefect.run-count"] == ["3"]
    assert loop["threshold"] == 4


def test_up_again_changes_nothing_but_restores_the_cron_and_keeps_the_switches(stack):
    before = stack.deployment("train/nightly")
    [schedule] = before["schedules"]
    edit = {"active": False, "schedule": {"cron": "0 3 * * *", "timezone": "UTC"}}
    deployment, path = f"/deployments/{before['id']}", f"/deployments/{before['id']}/schedules/"
    automations = {a["name"]: a["id"] for a in stack.api("POST", "/automations/filter").json()}
    # What the UI sends: a schedule switched off and edited, the whole deployment paused.
    stack.api("PATCH", path + schedule["id"], json=edit).raise_for_status()
    stack.api("PATCH", deployment, json={"paused": True}).raise_for_status()
    try:
        stack.up()
        after = stack.deployment("train/nightly")
        [kept] = after["schedules"]
        assert after["id"] == before["id"] and kept["id"] == schedule["id"]
        assert kept["schedule"]["cron"] == "0 2 * * *"  # the file's cron is back
        assert kept["active"] is False and after["paused"] is True  # the switches are not
        assert stack.deployment("train/manual")["paused"] is False
        # Untouched, not re-created: a re-created automation forgets the runs it watches.
        installed = stack.api("POST", "/automations/filter").json()
        after_ids = {a["name"]: a["id"] for a in installed}
        kept = {name: after_ids.get(name) for name in recovery.NAMES}
        assert kept == {name: automations[name] for name in recovery.NAMES}
        # predict/after-nightly's trigger is `prefect deploy`'s to replace (it watches no
        # runs, only the next Completed event): still exactly one, and nothing else appeared.
        predict = stack.deployment("predict/after-nightly")["id"]
        triggers = [
            a["name"]
            for a in installed
            if any(action.get("deployment_id") == predict for action in a["actions"])
        ]
        assert len(triggers) == 1
        assert sorted(after_ids) == sorted([*recovery.NAMES, *triggers])
    finally:
        stack.api("PATCH", path + schedule["id"], json={"active": True}).raise_for_status()
        stack.api("PATCH", deployment, json={"paused": False}).raise_for_status()


def test_serve_py_registers_its_own_deployment_and_leaves_nightly_alone(stack):
    nightly = stack.deployment("train/nightly")
    server = start([sys.executable, "deployments/serve.py"], stack.env, stack.log("serve"))
    try:
        wait_for(
            "train/nightly-served",
            lambda: stack.api("GET", "/deployments/name/train/nightly-served").is_success,
            timeout=90,
        )
    finally:
        kill_tree(server)
    served = stack.deployment("train/nightly-served")
    assert served["id"] != nightly["id"]
    [schedule] = served["schedules"]
    assert schedule["schedule"] == nightly["schedules"][0]["schedule"]
    assert (served["parameters"], served["tags"]) == (nightly["parameters"], nightly["tags"])
    after = stack.deployment("train/nightly")
    assert after["schedules"] == nightly["schedules"]
    assert after["parameters"] == nightly["parameters"]


# --- parameters ---------------------------------------------------------------------------


def test_a_run_with_custom_parameters_completes_with_them(stack, tmp_path):
    params = _params(tmp_path, epochs=3, lr=0.05, n_samples=64, run_name="custom")
    run_id = stack.create_run("train/manual", params)
    stack.wait_for_state(run_id, {"Completed"}, timeout=300)
    config = json.loads((tmp_path / "runs" / "custom" / "config.json").read_text())
    assert (config["epochs"], config["lr"], config["n_samples"]) == (3, 0.05, 64)
    assert json.loads((tmp_path / "runs" / "custom" / "metrics.json").read_text())["epochs"] == 3


@pytest.mark.parametrize(
    ("config", "field"),
    [
        ({"lr": -1}, "config.lr"),
        ({"epochs": "many"}, "config.epochs"),
        ({"device": "gpu"}, "config.device"),
        ({"run_name": "../escape"}, "config.run_name"),
        ({"loss": "hinge"}, "config.loss"),
        ({"bogus": 1}, "config"),
    ],
)
def test_an_invalid_parameter_is_rejected_before_a_run_exists(stack, config, field):
    deployment_id = stack.deployment("train/manual")["id"]
    count = {"deployments": {"id": {"any_": [deployment_id]}}}
    runs_before = stack.api("POST", "/flow_runs/count", json=count).json()
    with pytest.raises(httpx.HTTPStatusError) as error:
        stack.create_run("train/manual", {"config": config})
    assert error.value.response.status_code == 409
    assert f"Validation failed for field '{field}'" in error.value.response.text
    assert stack.api("POST", "/flow_runs/count", json=count).json() == runs_before


# --- crashes ------------------------------------------------------------------------------


def _assert_resumed_and_identical(root: Path, reference: Reference, killed_at: int) -> None:
    metrics = json.loads((_finished_run_dir(root) / "metrics.json").read_text())
    assert metrics["resumed_from"]["epoch"] >= killed_at
    assert metrics["epochs_trained"] <= LONG["epochs"] - killed_at  # done epochs not redone
    assert (_finished_run_dir(root) / "model.safetensors").read_bytes() == reference.weights()


def test_a_killed_flow_run_process_is_rerun_and_resumes_from_its_checkpoint(
    stack, reference, tmp_path
):
    run_id = stack.create_run("train/manual", _params(tmp_path, **LONG))
    _wait_for_epoch(tmp_path, 3)
    stack.flow_run_process(stack.worker, run_id).kill()  # SIGKILL: no last words
    killed = time.monotonic()

    run = stack.wait_for_state(run_id, {"Completed"}, timeout=300)
    print(f"\ncrash recovery: Completed {time.monotonic() - killed:.0f} s after the kill")
    _assert_one_crash_and_one_rerun(stack, run, crash="Process exited with status code: -9")
    _assert_resumed_and_identical(tmp_path, reference, killed_at=3)


def _assert_one_crash_and_one_rerun(stack: Stack, run: dict, crash: str) -> None:
    """The crash we caused, and only it, was seen and re-run once. Every attempt is accounted
    for: the first, plus one per AwaitingRetry, the automation's re-run and any flow-level
    retry of an exception (a loaded server may fail an API call), which is not a crash."""
    history = _history(stack, run["id"])
    crashed = [message for _, name, message in history if name == "Crashed"]
    assert len(crashed) == 1 and crashed[0].startswith(crash), history
    retries = [message for _, name, message in history if name == "AwaitingRetry"]
    reruns = [m for m in retries if "re-run by automation" in m]
    assert len(reruns) == 1, history
    assert run["run_count"] == 1 + len(retries), history
    order = [message for _, _, message in history]
    assert order.index(crashed[0]) < order.index(reruns[0]) < len(order) - 1, history


@pytest.fixture(scope="module")
def crashing_runs(stack, tmp_path_factory):
    """Runs of a flow that always dies, started early: their crashes overlap the next test."""
    args = [
        sys.executable,
        "-m",
        "prefect",
        "--no-prompt",
        "deploy",
        "tests/crash_flow.py:always_crashes",
        "-n",
        "always-crashes",
        "-p",
        POOL,
        "-q",
        "default",
        "-t",
        "auto-recover",
    ]
    done = subprocess.run(args, cwd=REPO, env=stack.env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr
    marker = tmp_path_factory.mktemp("crash-marker") / "crashed-once"
    cannot_start = {"env": {"TRAINFLOW_TEST_CRASH_MARKER": str(marker)}}
    return {
        "in every attempt": stack.create_run("always-crashes/always-crashes", {}),
        "before it starts": stack.create_run(
            "always-crashes/always-crashes", {}, job_variables=cannot_start
        ),
    }


def test_a_run_whose_worker_died_is_rerun_by_a_new_worker(
    stack, reference, crashing_runs, tmp_path
):
    stack.api("POST", f"/work_pools/{POOL}/queues/", json={"name": "worker-loss"})
    doomed = stack.start_worker("worker-loss")
    run_id = stack.create_run(
        "train/manual", _params(tmp_path, **LONG), work_queue_name="worker-loss"
    )
    _wait_for_epoch(tmp_path, 3)
    kill_tree(doomed)  # the worker and its flow-run process, at once: nobody reports anything
    killed = time.monotonic()
    assert stack.run(run_id)["state"]["name"] == "Running"
    stack.start_worker("worker-loss")

    run = stack.wait_for_state(run_id, {"Completed"}, timeout=300)
    print(f"\nworker loss: Completed {time.monotonic() - killed:.0f} s after the kill")
    _assert_one_crash_and_one_rerun(stack, run, crash="No heartbeat for 40 s")
    _assert_resumed_and_identical(tmp_path, reference, killed_at=3)


def test_a_run_that_always_crashes_stops_after_three_attempts_and_says_why(stack, crashing_runs):
    run_id = crashing_runs["in every attempt"]
    run = stack.wait_for_state(run_id, {"Failed"}, timeout=600)
    assert run["run_count"] == 3
    assert run["state"]["message"].startswith("Crashed on attempt 3 of 3")
    names = [s["name"] for s in stack.states(run_id)]
    assert names.count("Running") == 3 and names.count("AwaitingRetry") == 2
    assert names[-2:] == ["Crashed", "Failed"]
    _assert_nothing_starts_it_again(stack, last_attempt=3)


def _assert_nothing_starts_it_again(stack: Stack, last_attempt: int) -> None:
    """A Failed run stays so: no installed automation acts on a Failed state, and the only one
    that schedules a run again acts on a Crashed state of an earlier attempt than the last."""
    automations = {a["name"]: a for a in stack.api("POST", "/automations/filter").json()}
    assert set(recovery.NAMES) <= set(automations)
    for automation in automations.values():
        trigger, action = automation["trigger"], automation["actions"][0]
        assert "prefect.flow-run.Failed" not in trigger.get("after", []), automation["name"]
        if action["type"] == "run-deployment":  # predict/after-nightly: a completed run only
            assert trigger["expect"] == ["prefect.flow-run.Completed"], automation["name"]
        elif action["state"] == "SCHEDULED":
            assert trigger["after"] == ["prefect.flow-run.Crashed"], automation["name"]
            assert str(last_attempt) not in trigger["match"]["prefect.run-count"]
            assert "0" not in trigger["match"]["prefect.run-count"]  # never-started re-runs


def test_a_rerun_that_cannot_even_start_is_stopped_too(stack, crashing_runs):
    run_id = crashing_runs["before it starts"]
    run = stack.wait_for_state(run_id, {"Failed"}, timeout=600)
    assert run["run_count"] == 1  # its re-runs never got as far as Running
    assert run["state"]["message"].startswith("Crashed 4 times, some before it could start")
    names = [s["name"] for s in stack.states(run_id)]
    assert names.count("Crashed") == 4 and names[-2:] == ["Crashed", "Failed"]
    # Its run count stays 1: the re-run automation would act on "1", so the crash-loop
    # automation must have had the last word, and nothing acts on Failed.
    _assert_nothing_starts_it_again(stack, last_attempt=3)


def test_a_run_cancelled_from_the_ui_is_cancelled_and_never_crashes(stack, tmp_path):
    run_id = stack.create_run("train/manual", _params(tmp_path, **LONG))
    _wait_for_epoch(tmp_path, 2)
    cancel = {"state": {"type": "CANCELLING", "message": "cancelled in the UI"}}
    stack.api("POST", f"/flow_runs/{run_id}/set_state", json=cancel).raise_for_status()
    run = stack.wait_for_state(run_id, {"Cancelled"}, timeout=120)
    assert run["run_count"] == 1
    # Never Crashed on the way (train-epochs' SIGTERM checkpoint reports a cancellation as
    # one), so the re-run automation, which acts only on Crashed states, has nothing to act
    # on: no settle window is needed to keep a cancelled run cancelled.
    names = [s["name"] for s in stack.states(run_id)]
    assert "Crashed" not in names and "AwaitingRetry" not in names, _history(stack, run_id)
    assert names[-2:] == ["Cancelling", "Cancelled"]
    automations = {a["name"]: a for a in stack.api("POST", "/automations/filter").json()}
    for automation in automations.values():
        assert "prefect.flow-run.Cancelled" not in automation["trigger"].get("after", [])
        assert "prefect.flow-run.Cancelling" not in automation["trigger"].get("after", [])


def _history(stack: Stack, run_id: str) -> list[tuple[str, str, str]]:
    return [(s["timestamp"], s["name"], s["message"] or "") for s in stack.states(run_id)]


def _processes_of(worker, run_id: str) -> list[psutil.Process]:
    """Every process of `worker` running this flow run (two, while a re-run and the process
    it replaced are both alive)."""
    found = []
    for child in psutil.Process(worker.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if child.environ().get("PREFECT__FLOW_RUN_ID") == run_id:
                found.append(child)
    return found


def _files(*folders: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p): (p.stat().st_size, p.stat().st_mtime_ns)
        for folder in folders
        for p in folder.rglob("*")
        if p.is_file()
    }


def test_a_run_declared_silent_while_alive_stops_when_its_re_run_takes_over(
    stack, reference, tmp_path
):
    """Split-brain: the first process is paused (SIGSTOP) until the silent-run automation
    marks its run Crashed and the re-run is training; woken up, it must exit before it
    writes another checkpoint or run-folder file, and leave the re-run alone."""
    run_id = stack.create_run("train/manual", _params(tmp_path, **LONG))
    _wait_for_epoch(tmp_path, 3)
    [first] = _processes_of(stack.worker, run_id)
    first.suspend()
    try:
        # No heartbeat for 40 s: Crashed; 45 s later: re-run; it resumes and checkpoints.
        def second_is_training():
            if stack.run(run_id)["run_count"] != 2:
                return None
            others = [p for p in _processes_of(stack.worker, run_id) if p.pid != first.pid]
            return others[0] if others and _checkpoints(tmp_path)[-1][0] > 3 else None

        second = wait_for("the re-run to train", second_is_training, timeout=300, every=0.2)
        second.suspend()  # now nothing writes but, possibly, the first process
        before = _files(tmp_path / "cache", tmp_path / "runs")
    finally:
        first.resume()
    try:
        # It exits at its first checkpoint: the run is not its own. Within the 40 s heartbeat
        # window, or the paused re-run would be declared silent in turn.
        first.wait(timeout=30)
        assert _files(tmp_path / "cache", tmp_path / "runs") == before
    finally:
        second.resume()

    run = stack.wait_for_state(run_id, {"Completed"}, timeout=300)
    # The fenced process reported nothing: no second Crashed landed on the re-run.
    _assert_one_crash_and_one_rerun(stack, run, crash="No heartbeat for 40 s")
    _assert_resumed_and_identical(tmp_path, reference, killed_at=3)


# --- the UI -------------------------------------------------------------------------------


def _browser():
    missing = [b for b in ("chromium", "chromedriver") if not shutil.which(b)]
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        reason = f"the UI check needs {', '.join(missing)}: .ci/run installs them"
        if os.environ.get("CI"):
            pytest.fail(reason)
        pytest.skip(reason)
    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium")
    for arg in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--window-size=1400,1000",
    ):
        options.add_argument(arg)
    return webdriver.Chrome(options=options, service=Service(shutil.which("chromedriver")))


def _runs_not_scheduled(stack: Stack, deployment: str) -> set[str]:
    """The ids of the deployment's runs that its schedule did not create."""
    runs = stack.api(
        "POST",
        "/flow_runs/filter",
        json={"deployments": {"id": {"any_": [stack.deployment(deployment)["id"]]}}},
    ).json()
    return {run["id"] for run in runs if "auto-scheduled" not in run["tags"]}


def test_the_ui_shows_the_nightly_schedule_and_the_parameter_form(
    stack, tmp_path_factory, record_property
):
    browser = _browser()  # skips (or fails on CI) before importing selenium's parts
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait

    shots = tmp_path_factory.mktemp("ui-screenshots")
    page = f"{stack.url}/deployments/deployment/{stack.deployment('train/nightly')['id']}"
    # Runs other tests started (a nightly run that triggers scoring) are not the form's.
    started_before = _runs_not_scheduled(stack, "train/nightly")
    try:
        wait = WebDriverWait(browser, 60, poll_frequency=0.25)
        browser.get(page)

        def schedule_card(browser):  # rendered empty first, filled in when the API answers
            cards = browser.find_elements(By.CSS_SELECTOR, ".deployment-schedule-card__content")
            return next((card for card in cards if card.text == "nightly-cron"), None)

        # The card shows the schedule's slug; hovering spells out its cron, as a person would see.
        ActionChains(browser).move_to_element(wait.until(schedule_card)).perform()
        body = browser.find_element(By.TAG_NAME, "body")
        wait.until(lambda _: "At 02:00 AM every day (UTC)" in body.text)
        browser.save_screenshot(str(shots / "nightly.png"))

        browser.get(f"{page}/run")  # Run > Custom run: the form generated from TrainConfig
        body = wait.until(lambda b: b.find_element(By.TAG_NAME, "body"))
        wait.until(lambda _: "Learning rate." in body.text)
        form = body.text
        for label in ("N Samples", "Lr", "Epochs", "Optimizer", "Checkpoint Every Seconds"):
            assert label in form
        browser.save_screenshot(str(shots / "nightly-run-form.png"))

        # A bad value is refused when submitted, with the field named, and no run appears.
        lr = browser.find_element(
            By.XPATH, "//*[normalize-space()='Lr (Optional)']/following::input[1]"
        )
        lr.send_keys(Keys.CONTROL, "a", Keys.NULL, "-1")
        next(b for b in browser.find_elements(By.TAG_NAME, "button") if b.text == "Submit").click()
        wait.until(lambda _: "Validation failed for field 'config.lr'" in body.text)
        browser.save_screenshot(str(shots / "nightly-run-form-refused.png"))
    finally:
        browser.quit()
    assert _runs_not_scheduled(stack, "train/nightly") == started_before  # the form started none
    record_property("screenshots", str(shots))  # in --junitxml reports
    print(f"\nUI screenshots: {shots}")


def test_recovery_settings_are_checked(monkeypatch):
    one_attempt = [a.name for a in recovery.automations(1, 90, 20)]
    assert "trainflow-rerun-crashed" not in one_attempt and len(one_attempt) == 3
    for bad in ((0, 90, 20), (3, 35, 20), (3, 90, 1)):
        with pytest.raises(ValueError):
            recovery.automations(*bad)
    monkeypatch.setenv("TRAINFLOW_MAX_ATTEMPTS", "0")
    assert recovery.main() == 2
