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
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader || true
python3 benchmarks/gpu_check.py --out "$OUT" 2>&1 | tee "$OUT/gpu.log"
# The DDP path at nproc 1 (a world of one over nccl) beside the in-process loop; nproc 2 too
# when the machine has two GPUs.
python3 benchmarks/ddp.py --device cuda --launcher-at-1 2>&1 | tee "$OUT/ddp.log"
