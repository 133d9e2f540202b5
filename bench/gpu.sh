#!/bin/bash
# The GPU benchmark in one command: every case on the SD 1.5-shaped model at 512 px, then the SDXL cases
# (the 24/12/8 GB presets and the diffusers SDXL LoRA loop) on the SDXL-shaped model at 1024 px with fewer
# steps; JSON lines into ${OUT:-.}/bench-gpu.jsonl and the tables on stdout. Under 10 minutes on one H100/H200.
# FLUX.1 on its own (FLUX.1-dev-shaped, bf16, 1024 px: the 24 GB / 16 GB presets, bf16, and the diffusers FLUX
# LoRA loop; the model is made on the GPU in bf16, 33 GB, so an H100 / H200):  MODELS=flux bash bench/gpu.sh
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
for model in ${MODELS:-sd15 sdxl}; do
  case "$model" in
    sd15) "$PY" -m bench.train_step --model sd15 --steps "${STEPS:-30}" --warmup "${WARMUP:-10}" --out "${OUT:-.}/bench-gpu.jsonl" "$@" ;;
    sdxl) "$PY" -m bench.train_step --model sdxl --steps "${SDXL_STEPS:-8}" --warmup "${SDXL_WARMUP:-3}" --out "${OUT:-.}/bench-gpu.jsonl" "$@" ;;
    flux) "$PY" -m bench.train_step --model flux --steps "${FLUX_STEPS:-4}" --warmup "${FLUX_WARMUP:-2}" --out "${OUT:-.}/bench-gpu.jsonl" "$@" ;;
    *) echo "unknown model $model (sd15, sdxl, flux)" >&2; exit 2 ;;
  esac
done
# The checks only a GPU can make (deselected on CPU machines): frozen parts really in main memory while training.
[ -z "${MODELS:-}" ] && "$PY" -m pytest -q -m gpu -p no:cacheprovider tests/test_placement.py 2>&1 | tail -5 | tee "${OUT:-.}/gpu-tests.txt"
true
