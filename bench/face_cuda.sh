#!/usr/bin/env bash
# The face recipe on an SD1.5-shaped model on one GPU, in bf16 and fp16 with AdamW8bit.
# Run on the device machine from the repo root; writes logs to ${OUT:-/tmp/bench}.
set -uo pipefail
OUT=${OUT:-/tmp/bench}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
CKPT=/tmp/sd15-random.safetensors
PYTHONPATH=.:${PYTHONPATH:-} python3 bench/make_sd15.py $CKPT 2>&1 | tail -1
python3 -c "
from PIL import Image; import numpy as np, os
os.makedirs('/tmp/face', exist_ok=True)
rng = np.random.default_rng(0)
for i in range(8):
    Image.fromarray(rng.integers(0, 255, (640, 560, 3), dtype=np.uint8)).save(f'/tmp/face/{i}.png')
"
for mp in bf16 fp16; do
  for mode in recipe train_only; do
    extra=""
    [ $mode = train_only ] && extra="save.save_every_steps=0 preview.every_steps=0"
    start=$(date +%s%N)
    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision $mp --dynamo_backend no \
      train_textual_inversion.py --config presets/face.toml model.checkpoint=$CKPT dataset.image_dir=/tmp/face \
      train.optimizer=adamw8bit train.mixed_precision=$mp save.output_dir=/tmp/run-$mp-$mode $extra \
      > "$OUT/face-$mp-$mode.log" 2>&1
    rc=$?
    end=$(date +%s%N)
    echo "face $mp $mode rc=$rc wall=$(( (end - start) / 1000000 )) ms :: $(grep -E 'steps in|error' "$OUT/face-$mp-$mode.log" | tail -1)"
  done
done
ls /tmp/run-bf16-recipe | head; ls /tmp/run-bf16-recipe/embeddings | wc -l; ls /tmp/run-bf16-recipe/previews | wc -l
