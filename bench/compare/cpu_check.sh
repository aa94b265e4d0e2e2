#!/usr/bin/env bash
# CPU proof of run_compare.sh: the three trainers for 2 steps at 256 px, batch 1, fp32, with the same site
# folders as on the GPU machine. Run from the repo root on a machine without a GPU (needs a pip index):
#
#   bash bench/compare/cpu_check.sh [CKPT=/tmp/sd15-random.safetensors]
#
# Two stand-ins for what the GPU machine already has go to /tmp/site_cpu, after each tool's site:
# huggingface_hub 1.33 with httpx (the GPU machine's hub; diffusers 0.40 needs httpx), and torchvision 0.28,
# whose PyPI build needs CUDA torch: its compiled ops are skipped (empty _meta_registrations.py), which
# leaves torchvision.transforms, the only part Kohya and diffusers' example use. Nothing here is carried.
set -euo pipefail
CKPT=${1:-/tmp/sd15-random.safetensors}
PY=${PYTHON:-.venv/bin/python}
BASE=${CPU_CHECK_DIR:-/tmp/compare-cpu}
mkdir -p "$BASE/cpu_whl" "$BASE/images"
if [ ! -f /tmp/site_cpu/.done ]; then
  $PY -m pip download -q --no-deps --only-binary=:all: -d "$BASE/cpu_whl" \
    huggingface-hub==1.33.0 httpx==0.28.1 httpcore==1.0.9 torchvision==0.28.0
  rm -rf /tmp/site_cpu
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_cpu "$BASE"/cpu_whl/*.whl
  : > /tmp/site_cpu/torchvision/_meta_registrations.py
  touch /tmp/site_cpu/.done
fi
PYTHON=$PY bash bench/compare/make_sites.sh .bench/whl /tmp
$PY -c "
from PIL import Image; import numpy as np
rng = np.random.default_rng(0)
for i in range(8):
    Image.fromarray(rng.integers(0, 255, (640, 560, 3), dtype=np.uint8)).save(f'$BASE/images/{i}.png')
"
TOOLS="${TOOLS:-ours kohya diffusers}" STEPS=2 RESOLUTION=256 BATCH=1 MIXED_PRECISION=no WORKERS=1 RUN_TIMEOUT=1800 PYTHON=$PY \
  EXTRA_PYTHONPATH=/tmp/site_cpu WORK_DIR="$BASE/work" \
  bash bench/compare/run_compare.sh .bench/src/sd-scripts .bench/src/textual_inversion "$CKPT" \
  "$BASE/images" "$BASE/out"
