#!/usr/bin/env bash
# Every GPU measurement of the project, in stages that each fit one device call (from the repo root):
#   bash bench/run_device.sh train    training speed/memory at batch 1/8/32, CUDA graphs off, low memory
#                                     (bench_train.py; BENCH_CASES=... picks cases, BENCH_PROFILE=1 profiles), and the face
#                                     recipe as users run it (default and low-memory)
#   bash bench/run_device.sh recipe   the face recipe alone (default mode)
#   bash bench/run_device.sh generate the 288-image generation preset alone
#   bash bench/run_device.sh render   the 288-image generation preset and the validation sweep on two checkpoints
# Logs and JSON go to ${OUT:-/tmp/bench}. Stages after the first reuse /tmp files while the machine stays warm.
set -uo pipefail
OUT=${OUT:-/tmp/bench}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1 PYTHONPATH=.:${PYTHONPATH:-}
ms() { echo $(( $(date +%s%N) / 1000000 )); }
A=/tmp/sd15-random.safetensors B=/tmp/sd15-second.safetensors
[ -f $A ] || python3 bench/make_sd15.py $A 0 2>&1 | tail -1
python3 -c "
from PIL import Image; import numpy as np, os
rng = np.random.default_rng(0)
for folder, n in (('/tmp/face', 8), ('/tmp/face32', 32)):
    os.makedirs(folder, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (640, 560, 3), dtype=np.uint8)).save(f'{folder}/{i}.png')
"
recipe() {  # the face recipe as users run it, in each mode given (default, low_memory)
  for mode in "$@"; do
    extra=""; [ $mode = low_memory ] && extra="train.low_memory=true"
    rm -rf /tmp/recipe-$mode; start=$(ms)
    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
      train_textual_inversion.py --config presets/face.toml model.checkpoint=$A \
      dataset.image_dir=/tmp/face save.output_dir=/tmp/recipe-$mode $extra > "$OUT/recipe-$mode.log" 2>&1
    echo "face recipe ($mode) rc=$? wall=$(( $(ms) - start )) ms :: $(grep -E 'steps in|error' "$OUT/recipe-$mode.log" | tail -1)"
  done
  echo "saved embeddings: $(ls /tmp/recipe-$1/embeddings | wc -l), previews: $(ls /tmp/recipe-$1/previews | wc -l)"
}
generate() {  # the 288-image generation preset
  # The GPU machine's OpenCV 5 has no Haar cascades (users get opencv<5 from requirements.txt).
  FACES=$(python3 -c "import cv2, os; print('' if hasattr(cv2, 'CascadeClassifier') else 'pick.faces=false')" 2>/dev/null || echo pick.faces=false)
  rm -rf /tmp/gen; start=$(ms)
  python3 generate_dataset.py generate --config presets/generate_character.toml model.checkpoint=$A \
    generate.output_dir=/tmp/gen $FACES > "$OUT/generate.log" 2>&1
  echo "generate 288 rc=$? wall=$(( $(ms) - start )) ms, $(ls /tmp/gen/*.png 2>/dev/null | wc -l) PNGs :: $(grep -v 'it/s\]' "$OUT/generate.log" | tail -2 | tr '\n' ' ')"
}
case "${1:-train}" in
generate)
  generate
  ;;
recipe)
  recipe default
  ;;
train)
  python3 bench/bench_train.py --checkpoint $A --images /tmp/face32 --out "$OUT" ${BENCH_CASES:+--cases $BENCH_CASES} ${BENCH_PROFILE:+--profile "$OUT"} 2>&1 \
    | grep -v "float32\|torchvision" | tee "$OUT/bench_train.log" | tail -7
  recipe default low_memory
  ;;
render)
  [ -f $B ] || python3 bench/make_sd15.py $B 1 2>&1 | tail -1
  generate
  if [ ! -d /tmp/recipe-default/embeddings ]; then  # a fresh machine: make the run folder the sweep reads
    accelerate launch --num_processes 1 --num_machines 1 --mixed_precision bf16 --dynamo_backend no \
      train_textual_inversion.py --config presets/face.toml model.checkpoint=$A dataset.image_dir=/tmp/face \
      save.output_dir=/tmp/recipe-default save.save_every_steps=20 preview.every_steps=0 > "$OUT/recipe-for-sweep.log" 2>&1
  fi
  rm -rf /tmp/sweep; start=$(ms)
  python3 sweep_validate.py --config presets/validate.toml run.folder=/tmp/recipe-default \
    "model.checkpoints=[\"run:checkpoint\", \"$B\"]" sweep.output_dir=/tmp/sweep > "$OUT/validate.log" 2>&1
  echo "validate rc=$? wall=$(( $(ms) - start )) ms :: $(grep -v 'it/s\]' "$OUT/validate.log" | tail -3 | tr '\n' ' ')"
  cp /tmp/sweep/grid.png "$OUT/validate-grid.png" 2>/dev/null
  ;;
esac
