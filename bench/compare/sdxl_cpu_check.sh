#!/usr/bin/env bash
# CPU proof of the SDXL side by side (no GPU here): what can be checked before the one device call.
# Run from the repo root on a machine without a GPU (needs a pip index for the stand-ins, as cpu_check.sh):
#
#   bash bench/compare/sdxl_cpu_check.sh [CKPT=/tmp/sdxl-random.safetensors]
#
# 1. syntax of every script; 2. the sites from the carried wheels (+ cpu_check.sh's stand-ins in
# /tmp/site_cpu); 3. Kohya's sdxl_train_textual_inversion.py imports in its site and parses its options
# (--help); 4. bench/make_sdxl.py writes the random SDXL file on the CPU; 5. sdxl_load_check.py: Kohya's loader
# and ours (or diffusers' converters until ours reads SDXL) take every key, and the UNet's forward and
# backward in bf16 are finite; 6. run_sdxl.sh end to end, 2 steps at 256 px, batch 1, bf16 on the CPU
# (RUNS to choose; a run that fails is recorded as failed, the next one still runs).
set -uo pipefail
CKPT=${1:-/tmp/sdxl-random.safetensors}
PY=${PYTHON:-.venv/bin/python}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # Kohya's steps run in its tree
BASE=${CPU_CHECK_DIR:-/tmp/sdxl-cpu}
KOHYA=.bench/src/sd-scripts
mkdir -p "$BASE/images"
step() { echo; echo "==== $*"; }

step "1. syntax"
for f in bench/compare/*.sh; do bash -n "$f" && echo "ok $f"; done
$PY -m py_compile bench/make_sdxl.py bench/compare/*.py bench/compare/hook/*.py && echo "ok python files"

step "2. sites"
if [ ! -f /tmp/site_cpu/.done ]; then
  mkdir -p "$BASE/cpu_whl"
  $PY -m pip download -q --no-deps --only-binary=:all: -d "$BASE/cpu_whl" \
    huggingface-hub==1.33.0 httpx==0.28.1 httpcore==1.0.9 torchvision==0.28.0
  rm -rf /tmp/site_cpu
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site_cpu "$BASE"/cpu_whl/*.whl
  : > /tmp/site_cpu/torchvision/_meta_registrations.py
  touch /tmp/site_cpu/.done
fi
SITES="ours kohya" PYTHON=$PY bash bench/compare/make_sites.sh .bench/whl /tmp || exit 1
echo "kohya commit: $(cat $KOHYA/COMMIT 2> /dev/null || echo unknown)"

step "3. Kohya's SDXL script: imports and options"
(cd $KOHYA && PYTHONPATH=/tmp/site_kohya:/tmp/site_cpu $PY sdxl_train_textual_inversion.py --help) > "$BASE/kohya_help.txt" 2>&1
rc=$?
echo "--help rc=$rc, $(grep -c -- '--' "$BASE/kohya_help.txt") option lines"
for opt in --pretrained_model_name_or_path --tokenizer_cache_dir --train_data_dir --use_object_template \
  --token_string --init_word --num_vectors_per_token --resolution --train_batch_size \
  --gradient_accumulation_steps --max_train_steps --learning_rate --lr_scheduler --lr_warmup_steps \
  --optimizer_type --mixed_precision --sdpa --cache_latents --seed --max_data_loader_n_workers \
  --persistent_data_loader_workers --output_dir --output_name --save_model_as --gradient_checkpointing; do
  grep -q -- "$opt " "$BASE/kohya_help.txt" || grep -q -- "$opt$" "$BASE/kohya_help.txt" || echo "MISSING option $opt"
done

step "4. random SDXL file"
if [ ! -f "$CKPT" ]; then PYTHONPATH=/tmp/site_ours:. $PY bench/make_sdxl.py "$CKPT" 2>&1 | grep -v "^Failed to load CPU"; fi
ls -l "$CKPT"

step "5. each loader on it, and a finite bf16 forward/backward"
(cd $KOHYA && PYTHONPATH=/tmp/site_kohya:/tmp/site_cpu $PY "$OLDPWD/bench/compare/sdxl_load_check.py" kohya "$CKPT") 2>&1 |
  grep -E "All keys|kohya:|text states|latents|UNet|finite|Error|NOT"
PYTHONPATH=/tmp/site_ours:/tmp/site_cpu:. $PY bench/compare/sdxl_load_check.py ours "$CKPT" 2>&1 |
  grep -E "ours:|text states|latents|UNet|finite|Error|NOT"

step "6. run_sdxl.sh on the CPU: ${RUNS:=ours kohya}, 2 steps, 256 px, batch 1 (no accumulation), bf16"
$PY -c "
from PIL import Image; import numpy as np
rng = np.random.default_rng(0)
for i in range(8):
    Image.fromarray(rng.integers(0, 255, (1024, 1024, 3), dtype=np.uint8)).save(f'$BASE/images/{i}.png', compress_level=1)
"
RUNS="$RUNS" STEPS=2 WARMUP_STEPS=0 FORCE_RESOLUTION=256 FORCE_BATCH=1 FORCE_GRAD_ACCUM=1 MIXED_PRECISION=bf16 WORKERS=1 RUN_TIMEOUT=1800 PYTHON=$PY \
  EXTRA_PYTHONPATH=/tmp/site_cpu WORK_DIR="$BASE/work" \
  bash bench/compare/run_sdxl.sh $KOHYA "$CKPT" "$BASE/images" "$BASE/out"
