#!/usr/bin/env bash
# On the GPU machine, from the repo root, carrying .whl (diffusers, transformers, tomli_w, pytest): the SDXL
# preset on capped memory (default settings as on a 24 GB card, low_memory as on a 12 GB card, each with a
# 1024-pixel preview), then the CUDA tests (tests/test_cuda.py). Logs in $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/cuda-check}; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v -i warning | tail -2
export PYTHONPATH=/tmp/site:.
CKPT=/tmp/sdxl-random.safetensors
[ -f $CKPT ] || python3 bench/make_sdxl.py $CKPT 2>&1 | tail -1
python3 -c "
from PIL import Image; import numpy as np, os
os.makedirs('/tmp/sdxl-images', exist_ok=True)
rng = np.random.default_rng(0)
for i, (w, h) in enumerate([(1024, 1024), (832, 1216), (1216, 832), (1024, 1024)] * 2):
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(f'/tmp/sdxl-images/{i}.png', compress_level=1)
"
capped() {  # name, card GiB, extra overrides
  local name=$1 gib=$2; shift 2
  rm -rf /tmp/capped-$name
  timeout 200 python3 bench/capped.py $gib train_textual_inversion.py --config presets/sdxl_face.toml \
    model.checkpoint=$CKPT dataset.image_dir=/tmp/sdxl-images save.output_dir=/tmp/capped-$name \
    save.save_every_steps=2 preview.every_steps=${PREVIEW:-2} preview.steps=4 "$@" > "$OUT/capped-$name.log" 2>&1
  echo "$name on a $gib GiB card: rc=$? :: $(grep -E "steps in|script's peak|error|Error" "$OUT/capped-$name.log" | tail -3 | tr '\n' ' ')"
  ls /tmp/capped-$name/previews 2>/dev/null | tr '\n' ' '; echo
}
square() {  # the benchmark's 8 random 1024² pictures (bench/compare/sdxl_device.sh)
  python3 -c "
from PIL import Image; import numpy as np, os
os.makedirs('/tmp/sdxl-square', exist_ok=True)
rng = np.random.default_rng(0)
for i in range(8):
    Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(f'/tmp/sdxl-square/{i}.png', compress_level=1)
"
}
case "${1:-all}" in
  eager) square
         PREVIEW=0 capped eager-square 24 train.max_steps=30 train.cuda_graphs=false dataset.image_dir=/tmp/sdxl-square
         PREVIEW=4 capped graphs-square 24 train.max_steps=4 dataset.image_dir=/tmp/sdxl-square ;;
  mixed) PREVIEW=4 capped graphs-mixed 24 train.max_steps=4 ;;
  cards) square  # the preset with 8 square pictures: eager on a 16 GiB card, CUDA graphs on a 24 GiB one
         PREVIEW=4 capped eager-square-16 16 train.max_steps=4 train.cuda_graphs=false dataset.image_dir=/tmp/sdxl-square
         PREVIEW=4 capped graphs-square 24 train.max_steps=4 dataset.image_dir=/tmp/sdxl-square ;;
  all) capped low_memory 12 train.low_memory=true train.max_steps=2
       capped default 24 train.max_steps=2 ;;
  speed) PREVIEW=6 capped graphs 24 train.max_steps=6
         PREVIEW=6 capped eager 24 train.max_steps=6 train.cuda_graphs=false ;;
esac
timeout 330 python3 -m pytest -q -p no:cacheprovider -p no:warnings tests/test_cuda.py ${PYTEST_K:+-k "$PYTEST_K"} 2>&1 \
  | grep -E "passed|failed|^FAILED|^E .*(tensor|assert)" | head -12
