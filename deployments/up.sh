#!/usr/bin/env bash
# Create the work pool(s), deploy everything in deployments/prefect.yaml and install the
# crash-recovery automations. Idempotent: run it again after any change to those files; what
# a re-deploy keeps from the UI (schedule switches, paused deployments) is in README.md.
#
#   PREFECT_API_URL=http://127.0.0.1:4200/api deployments/up.sh
#
# Knobs (environment), read by recovery.py: TRAINFLOW_MAX_ATTEMPTS (default 3),
# TRAINFLOW_HEARTBEAT_WINDOW (seconds of silence before a run counts as crashed; default 90,
# at least 40) and TRAINFLOW_CRASH_SETTLE (seconds a run stays Crashed before it is re-run;
# default 60, at least 5).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${PREFECT_API_URL:?set PREFECT_API_URL first, e.g. http://127.0.0.1:4200/api}"
export PREFECT_API_URL

# `work-pool create` fails when the pool exists, and --overwrite would reset its job template.
pools=$(python -c 'import sys, yaml
print(*sorted({d["work_pool"]["name"] for d in yaml.safe_load(open(sys.argv[1]))["deployments"]}))' \
    deployments/prefect.yaml)
for pool in $pools; do
    prefect work-pool inspect "$pool" >/dev/null 2>&1 \
        || prefect work-pool create "$pool" --type process
done

# `prefect deploy` resumes a deployment paused in the UI; pause those again afterwards.
paused=$(python deployments/paused.py list)
prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml
python deployments/paused.py pause $paused

python deployments/recovery.py
