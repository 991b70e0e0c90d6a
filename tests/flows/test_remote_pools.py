"""The Docker and Kubernetes deployment variants pass Prefect's own validation.

No container engine or cluster here: `prefect deploy` against a real server checks each file
and its job variables against the pool type's job template, which is what can be checked.
"""

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest

from ..conftest import REPO

VARIANTS = {"docker": "trainflow-docker", "kubernetes": "trainflow-k8s"}


def _prefect(env, *args):
    return subprocess.run(
        [sys.executable, "-m", "prefect", "--no-prompt", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture
def env(prefect_api):
    return {
        **os.environ,
        "PREFECT_API_URL": prefect_api,
        "TRAINFLOW_IMAGE": "example/tf:1",
        "AWS_ACCESS_KEY_ID": "id",
        "AWS_SECRET_ACCESS_KEY": "secret",
    }


@pytest.mark.parametrize("kind", VARIANTS)
def test_the_variant_deploys_with_its_shared_cache(env, prefect_api, kind):
    pool = VARIANTS[kind]
    _prefect(env, "work-pool", "create", pool, "--type", kind)  # exists already: fine
    path = f"deployments/remote/prefect.{kind}.yaml"
    done = _prefect(env, "deploy", "--all", "--prefect-file", path)
    assert done.returncode == 0, done.stdout + done.stderr
    suffix = "docker" if kind == "docker" else "k8s"
    for name in (f"train/nightly-{suffix}", f"train/manual-{suffix}"):
        deployment = httpx.get(f"{prefect_api}/deployments/name/{name}").json()
        assert deployment["work_pool_name"] == pool
        assert deployment["parameters"]["config"]["cache_dir"].startswith("s3://")
        assert deployment["job_variables"]["image"] == "example/tf:1"
        assert deployment["enforce_parameter_schema"] is True


def test_a_bad_job_variable_is_refused_by_the_pool_template(env, tmp_path):
    _prefect(env, "work-pool", "create", "trainflow-k8s", "--type", "kubernetes")
    text = Path(REPO / "deployments/remote/prefect.kubernetes.yaml").read_text()
    bad = tmp_path / "prefect.yaml"
    bad.write_text(text.replace("image_pull_policy: IfNotPresent", "image_pull_policy: Sometimes"))
    done = _prefect(env, "deploy", "--all", "--prefect-file", str(bad))
    assert done.returncode != 0
    output = done.stdout + done.stderr
    assert "Sometimes" in output and "is not one of" in output


def _everything_the_api_shows(api: str) -> str:
    """Deployments (job variables included), work pools (their job templates), block
    documents and variables, as anyone with the API or UI reads them."""
    reads = [
        ("POST", "/deployments/filter"),
        ("POST", "/work_pools/filter"),
        ("POST", "/block_documents/filter"),
        ("POST", "/variables/filter"),
        ("POST", "/flow_runs/filter"),
    ]
    dumps = []
    for method, path in reads:
        response = httpx.request(method, f"{api}{path}", json={}, timeout=30)
        response.raise_for_status()
        dumps.append(json.dumps(response.json()))
    return "\n".join(dumps)


def test_deploying_with_credentials_in_the_environment_stores_none_of_them(env, prefect_api):
    key_id, secret = f"AKIA{uuid.uuid4().hex[:16].upper()}", f"s3cr3t-{uuid.uuid4().hex}"
    env = {
        **env,
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "AWS_SESSION_TOKEN": f"token-{secret}",
    }
    for kind, pool in VARIANTS.items():
        _prefect(env, "work-pool", "create", pool, "--type", kind)
        path = f"deployments/remote/prefect.{kind}.yaml"
        done = _prefect(env, "deploy", "--all", "--prefect-file", path)
        assert done.returncode == 0, done.stdout + done.stderr
    shown = _everything_the_api_shows(prefect_api)
    assert "nightly-docker" in shown and "manual-k8s" in shown  # the scan sees the deployments
    assert secret not in shown and key_id not in shown
    docker = httpx.get(f"{prefect_api}/deployments/name/train/nightly-docker").json()
    assert not any(
        k.startswith("AWS_") and k != "AWS_SHARED_CREDENTIALS_FILE"
        for k in docker["job_variables"]["env"]
    )


def test_a_secret_block_placeholder_in_job_variables_would_store_the_secret(
    env, prefect_api, tmp_path
):
    """Why the variants use no `{{ prefect.blocks.secret.… }}`: `prefect deploy` replaces it
    with the block's value at deploy time, in clear in the job variables. If Prefect ever
    resolves it on the worker instead, this fails, and a Secret block becomes an option."""
    secret, name = f"s3cr3t-{uuid.uuid4().hex}", f"trap-{uuid.uuid4().hex[:8]}"
    env = {**env, "PREFECT_API_URL": prefect_api}
    saved = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys; from prefect.blocks.system import "
            "Secret; Secret(value=sys.argv[1]).save(sys.argv[2])",
            secret,
            name,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert saved.returncode == 0, saved.stderr
    text = Path(REPO / "deployments/remote/prefect.docker.yaml").read_text()
    trap = tmp_path / "prefect.yaml"
    placeholder = f'AWS_SECRET_ACCESS_KEY: "{{{{ prefect.blocks.secret.{name} }}}}"'
    trap.write_text(
        text.replace(
            'PREFECT_FLOWS_HEARTBEAT_FREQUENCY: "30"',
            f'PREFECT_FLOWS_HEARTBEAT_FREQUENCY: "30"\n        {placeholder}',
        ).replace("nightly-docker", "trap-docker")
    )
    _prefect(env, "work-pool", "create", "trainflow-docker", "--type", "docker")
    done = _prefect(env, "deploy", "--name", "trap-docker", "--prefect-file", str(trap))
    assert done.returncode == 0, done.stdout + done.stderr
    deployment = httpx.get(f"{prefect_api}/deployments/name/train/trap-docker").json()
    assert deployment["job_variables"]["env"]["AWS_SECRET_ACCESS_KEY"] == secret
