#!/bin/bash
# The GPU benchmark in one command: every case on the SD 1.5-shaped model at 512 px, then the SDXL cases
# (the 24/12/8 GB presets and the diffusers SDXL LoRA loop) on the SDXL-shaped model at 1024 px with fewer
# steps; JSON lines into ${OUT:-.}/bench-gpu.jsonl and the tables on stdout. Under 10 minutes on one H100/H200.
#
# On a machine with the project's environment: bash bench/gpu.sh   (./launch.sh bench takes the same arguments)
# On a lent GPU machine without registry access, prepare the wheels here first:
#   ../shared/gpu-wheels.sh diffusers==0.42.1 importlib_metadata bitsandbytes   (then carry .whl with the run;
#   bitsandbytes is the 8-bit AdamW of the 12 GB and 8 GB SDXL presets)
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -d .whl ] && ! python3 -c "import diffusers" 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site:${PYTHONPATH:-}
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
PY=python3
[ -x .venv/bin/python ] && PY=.venv/bin/python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -m bench.train_step --model sd15 --steps "${STEPS:-30}" --warmup "${WARMUP:-10}" --out "${OUT:-.}/bench-gpu.jsonl" "$@"
"$PY" -m bench.train_step --model sdxl --steps "${SDXL_STEPS:-8}" --warmup "${SDXL_WARMUP:-3}" --out "${OUT:-.}/bench-gpu.jsonl" "$@"
# The checks only a GPU can make (deselected on CPU machines): frozen parts really in main memory while training.
"$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_placement.py 2>&1 | tail -5 | tee "${OUT:-.}/gpu-tests.txt"
