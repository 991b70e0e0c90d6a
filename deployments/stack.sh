#!/usr/bin/env bash
# The whole local stack in one command: a Prefect server on 127.0.0.1, everything in
# prefect.yaml deployed with its recovery automations (up.sh), and a worker. Ctrl-C stops all.
#
#   deployments/stack.sh        # then open http://127.0.0.1:4200
#
# TRAINFLOW_PORT (default 4200) picks the port; PREFECT_HOME and up.sh's knobs pass through.
set -euo pipefail
cd "$(dirname "$0")/.."
port=${TRAINFLOW_PORT:-4200}
export PREFECT_API_URL="http://127.0.0.1:$port/api"
export PREFECT_SERVER_ANALYTICS_ENABLED=${PREFECT_SERVER_ANALYTICS_ENABLED:-false}

# Ctrl-C reaches only this script (server and worker run in sessions of their own), which
# stops the flow runs first, while the server still hears their Crashed state (train-epochs
# checkpoints on SIGTERM): the automations re-run them when the stack is back. A server that
# stopped first would come back without the events before it, and drop that Crashed event.
stop() {
    trap - EXIT INT TERM
    local pids children
    pids=$(jobs -p)
    children=$(for pid in $pids; do pgrep -P "$pid"; done || true)
    [ -z "$children" ] || { kill $children 2>/dev/null; sleep 3; } || true
    kill $pids 2>/dev/null || true
    sleep 3
    kill -9 $children $pids 2>/dev/null || true
}
trap stop EXIT INT TERM

setsid prefect server start --host 127.0.0.1 --port "$port" &
python - "$PREFECT_API_URL/health" <<'EOF'
import sys, time, urllib.request
for _ in range(240):  # a first start migrates a new database: allow two minutes
    try:
        urllib.request.urlopen(sys.argv[1], timeout=2)
        sys.exit(0)
    except OSError:
        time.sleep(0.5)
sys.exit("the Prefect server did not come up within 2 minutes")
EOF

deployments/up.sh
setsid prefect worker start --pool trainflow-local &
echo "trainflow stack: UI http://127.0.0.1:$port, API $PREFECT_API_URL. Ctrl-C stops it."
wait
