#!/usr/bin/env bash
# GPU checks on a CUDA machine, from the repo root: bash benchmarks/gpu.sh [OUT_DIR]
# If a folder .whl/ of wheels is present (Prefect and its dependencies, for a machine without
# them or without a package index), they are installed into /tmp/site first.
set -euo pipefail
OUT=${1:-${OUT:-gpu-results}}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONUNBUFFERED=1
# trainflow importable from this checkout when it isn't installed: the repository's flows/ and
# tasks/ are the packages trainflow.flows and trainflow.tasks (pyproject.toml).
if ! python3 -c "import trainflow.tasks" 2>/dev/null; then
  SRC=$(mktemp -d)
  mkdir -p "$SRC/trainflow"
  ln -s "$PWD/flows" "$SRC/trainflow/flows"
  ln -s "$PWD/tasks" "$SRC/trainflow/tasks"
  export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu.log"
# The DDP path at nproc 1 (a world of one over nccl) beside the in-process loop; nproc 2 too
# when the machine has two GPUs.
python3 benchmarks/ddp.py --device cuda --launcher-at-1 2>&1 | tee "$OUT/ddp.log"
