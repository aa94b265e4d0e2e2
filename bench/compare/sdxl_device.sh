#!/usr/bin/env bash
# The SDXL side by side on the GPU machine in one command, from the repo root, with .bench/ carried
# (README.md, "SDXL"): sites for ours and Kohya from the carried wheels, the random SDXL single file
# (bench/make_sdxl.py, on the GPU), 8 images at 1024x1024, then run_sdxl.sh (ours, kohya, ours_low,
# kohya_gc). Results land in $OUT/sdxl/ (compare.json, compare.txt, one log per run, raw.tgz).
# The whole job ends by 575 s (DEADLINE), inside the device call's 600 s.
set -uo pipefail
RESULTS=${OUT:-/tmp/sdxl-out}/sdxl
WORK=/tmp/sdxl-work
CKPT=/tmp/sdxl-random.safetensors
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$RESULTS" "$WORK"
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start )) s"; }
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1
echo "cores $(nproc), $(free -g | awk '/Mem:/ {print $2}') GiB, $($PY -c 'import torch; print("torch", torch.__version__)')"
SITES="ours kohya" bash bench/compare/make_sites.sh .bench/whl /tmp || exit 1
echo "sites done at $(elapsed)"
if [ ! -f "$CKPT" ]; then
  PYTHONPATH=/tmp/site_ours:. timeout 240 $PY bench/make_sdxl.py "$CKPT" 2>&1 | grep -v "^Failed to load CPU" | tail -3
  [ -f "$CKPT" ] || { echo "no checkpoint: make_sdxl.py failed"; exit 1; }
fi
echo "checkpoint done at $(elapsed)"
$PY -c "
from PIL import Image; import numpy as np, os
os.makedirs('/tmp/sdxl-images', exist_ok=True)
rng = np.random.default_rng(0)
for i in range(8):
    Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(f'/tmp/sdxl-images/{i}.png', compress_level=1)
"
echo "set-up done at $(elapsed)"
DEADLINE=$(( start + 575 )) WORK_DIR=$WORK bash bench/compare/run_sdxl.sh .bench/src/sd-scripts "$CKPT" \
  /tmp/sdxl-images "$RESULTS"
rc=$?
(cd "$WORK" && ls -lR out_* > outputs.txt 2>&1; tar czf "$RESULTS/raw.tgz" runs.txt ./*.steps ./*.mem outputs.txt 2> /dev/null)
echo "total $(elapsed)"
exit $rc
