#!/usr/bin/env bash
# Every GPU measurement of the project in one call on the device machine (from the repo root):
#   training speed/memory at batch 1/8/32 (bench_train.py), the face recipe as users run it (default and
#   low-memory), and, when their scripts exist, dataset generation and the validation sweep.
# Logs and JSON go to ${OUT:-/tmp/bench}.
set -uo pipefail
OUT=${OUT:-/tmp/bench}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-}
ms() { echo $(( $(date +%s%N) / 1000000 )); }
python3 bench/make_sd15.py /tmp/sd15-random.safetensors 0 2>&1 | tail -1
python3 -c "
from PIL import Image; import numpy as np, os
rng = np.random.default_rng(0)
for folder, n in (('/tmp/face', 8), ('/tmp/face32', 32)):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (640, 560, 3), dtype=np.uint8)).save(f'{folder}/{i}.png')
"
python3 bench/bench_train.py --checkpoint /tmp/sd15-random.safetensors --images /tmp/face32 --out "$OUT" ${BENCH_COMPILE:+--compile} 2>&1 \
  | grep -v "float32\|torchvision" | tee "$OUT/bench_train.log" | tail -7
for mode in default low_memory; do
  extra=""; [ $mode = low_memory ] && extra="train.low_memory=true"
  start=$(ms)
  accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
    train_textual_inversion.py --config presets/face.toml model.checkpoint=/tmp/sd15-random.safetensors \
    dataset.image_dir=/tmp/face save.output_dir=/tmp/recipe-$mode $extra > "$OUT/recipe-$mode.log" 2>&1
  echo "face recipe ($mode) rc=$? wall=$(( $(ms) - start )) ms :: $(grep -E 'steps in|error' "$OUT/recipe-$mode.log" | tail -1)"
done
echo "saved embeddings: $(ls /tmp/recipe-default/embeddings | wc -l), previews: $(ls /tmp/recipe-default/previews | wc -l)"
