"""The one-process alternative to a work pool and worker: serve `train` on the nightly cron.

    PREFECT_API_URL=http://127.0.0.1:4200/api python deployments/serve.py

Registers `train/nightly-served` (never `train/nightly`, which belongs to the worker) with the
cron, timezone, parameters, tags and heartbeat of `nightly` in prefect.yaml, then runs its
flow runs as subprocesses until stopped; Ctrl-C pauses its schedule on the way out.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[1]
NAME = "nightly-served"


def nightly_spec() -> dict[str, Any]:
    spec = yaml.safe_load((REPO / "deployments" / "prefect.yaml").read_text())
    return next(d for d in spec["deployments"] if d["name"] == "nightly")


def main() -> None:
    spec = nightly_spec()
    os.chdir(REPO)  # runs/ and .trainflow/cache land in the repo root, as with the worker
    # The flow-run subprocesses inherit this environment: the same heartbeat as the worker's.
    for key, value in spec["work_pool"]["job_variables"]["env"].items():
        os.environ.setdefault(key, str(value))

    from prefect.schedules import Cron

    from trainflow.flows.train_flow import train_flow

    train_flow.serve(
        name=NAME,
        schedules=[
            Cron(s["cron"], timezone=s["timezone"], slug=s["slug"]) for s in spec["schedules"]
        ],
        parameters=spec["parameters"],
        tags=spec["tags"],
        description=f"{spec['description']} Served by deployments/serve.py.",
    )


if __name__ == "__main__":
    main()
