#!/usr/bin/env bash
# Issue 6 on the GPU machine in one command, from the repo root, with .bench/ carried (see README.md):
# sites from the carried wheels, the random SD1.5 checkpoint and 8 images,
# then run_compare.sh. Results land in $OUT/compare/ (compare.json, compare.txt, one log per tool, raw.tgz).
set -uo pipefail
RESULTS=${OUT:-/tmp/compare-out}/compare
WORK=/tmp/compare-work
PY=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
mkdir -p "$RESULTS"
start=$(date +%s)
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1
bash bench/compare/make_sites.sh .bench/whl /tmp || exit 1
# Bytecode for every tool's modules, as a user's pip install leaves it (the sites are installed --no-compile
# and the machine's own site-packages keeps none): imports are timed as on a user's machine, not recompiled.
export PYTHONPYCACHEPREFIX=/tmp/pycache
$PY -m compileall -q -j 0 "$($PY -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" /tmp/site_* \
  .bench/src library bench ./*.py > /dev/null 2>&1
echo "bytecode compiled $(( $(date +%s) - start )) s"
[ -f /tmp/sd15-random.safetensors ] ||
  PYTHONPATH=/tmp/site_ours:. $PY bench/make_sd15.py /tmp/sd15-random.safetensors 2>&1 | tail -1
$PY -c "
from PIL import Image; import numpy as np, os
os.makedirs('/tmp/compare-images', exist_ok=True)
rng = np.random.default_rng(0)
for i in range(8):
    Image.fromarray(rng.integers(0, 255, (640, 560, 3), dtype=np.uint8)).save(f'/tmp/compare-images/{i}.png')
"
# The first process to use the GPU on a fresh machine waits ~12 s more for its first step (the CUDA libraries
# load): a convolution and an attention, forward and backward, take that wait before any tool is timed.
t=$(date +%s%N)
$PY -c "
import torch
conv = torch.nn.Conv2d(320, 320, 3, padding=1).cuda().bfloat16()
x = torch.randn(8, 320, 64, 64, device='cuda', dtype=torch.bfloat16, requires_grad=True)
q = torch.randn(8, 8, 4096, 40, device='cuda', dtype=torch.bfloat16, requires_grad=True)
(conv(x).sum() + torch.nn.functional.scaled_dot_product_attention(q, q, q).sum()).backward()
torch.cuda.synchronize()
"
echo "GPU libraries warmed in $(( ($(date +%s%N) - t) / 1000000 )) ms"
echo "set-up done in $(( $(date +%s) - start )) s"
# The device call ends at 600 s: each run's limit shrinks so that the whole job ends by 580 s (DEADLINE_S).
DEADLINE=$(( start + ${DEADLINE_S:-580} )) WORK_DIR=$WORK bash bench/compare/run_compare.sh .bench/src/sd-scripts .bench/src/textual_inversion \
  /tmp/sd15-random.safetensors /tmp/compare-images "$RESULTS"
rc=$?
(cd "$WORK" && ls -lR out_* > outputs.txt 2>&1; tar czf "$RESULTS/raw.tgz" runs.txt ./*.steps ./*.mem convert.log outputs.txt 2> /dev/null)
echo "total $(( $(date +%s) - start )) s"
exit $rc
