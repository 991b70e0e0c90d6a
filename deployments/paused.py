"""Deployments paused in the UI stay paused through up.sh: `prefect deploy` resumes them.

up.sh runs `paused.py list` before `prefect deploy` and `paused.py pause ID...` after it (a
re-deploy keeps each deployment's id).
"""

from __future__ import annotations

import sys

from prefect.client.orchestration import get_client


def main(argv: list[str]) -> int:
    command, ids = (argv[0], argv[1:]) if argv else ("", [])
    with get_client(sync_client=True) as client:
        if command == "list":
            print(*(deployment.id for deployment in client.read_deployments() if deployment.paused))
        elif command == "pause":
            for deployment_id in ids:
                client.pause_deployment(deployment_id)
        else:
            print("usage: paused.py list | paused.py pause ID...", file=sys.stderr)
            return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
