"""The Docker and Kubernetes deployment variants pass Prefect's own validation.

No container engine or cluster here: `prefect deploy` against a real server checks each file
and its job variables against the pool type's job template, which is what can be checked.
"""

import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from .conftest import REPO

VARIANTS = {"docker": "trainflow-docker", "kubernetes": "trainflow-k8s"}


def _prefect(env, *args):
    return subprocess.run([sys.executable, "-m", "prefect", "--no-prompt", *args], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip


@pytest.fixture
def env(prefect_api):
    return {**os.environ, "PREFECT_API_URL": prefect_api, "TRAINFLOW_IMAGE": "example/tf:1",
            "AWS_ACCESS_KEY_ID": "id", "AWS_SECRET_ACCESS_KEY": "secret"}  # fmt: skip


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
