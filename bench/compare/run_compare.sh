#!/usr/bin/env bash
# Issue 6: the same Textual Inversion training, one after another in one call, through our trainer,
# Kohya sd-scripts' train_textual_inversion.py and diffusers' examples/textual_inversion/textual_inversion.py.
#
#   bash bench/compare/run_compare.sh KOHYA_DIR DIFFUSERS_EXAMPLE_DIR CKPT IMAGES_DIR OUT_DIR
#
# KOHYA_DIR: an sd-scripts tree (train_textual_inversion.py + library/); DIFFUSERS_EXAMPLE_DIR: the folder
# holding textual_inversion.py; CKPT: an SD1.5 single-file checkpoint; IMAGES_DIR: the training images (the
# image files in it are used, nothing else); OUT_DIR: gets compare.json, compare.txt and one log per tool.
# Each tool runs with PYTHONPATH=$SITE_ROOT/site_<tool> (make_sites.sh builds them) plus this folder's
# hook/, which records the time of every optimizer step from the tool's own tqdm bar.
#
# Settings (FACTS.md §6), equal for all three: SD1.5, 512 px, bf16, batch 8, 2 vectors initialised from
# "woman", AdamW, lr 0.002 constant, SDPA, 150 steps, seed 42, no intermediate saves, previews or samples.
# Kohya caches latents (--cache_latents); diffusers' example has no latent cache; ours caches them (preset).
# Environment knobs (defaults = the GPU benchmark; cpu_check.sh uses small ones):
#   STEPS=150 RESOLUTION=512 BATCH=8 MIXED_PRECISION=bf16 WORKERS=8 TOOLS="ours kohya diffusers"
#   SITE_ROOT=/tmp WORK_DIR=/tmp/compare-work RUN_TIMEOUT=240 (s per tool) PYTHON=python3
#   DEADLINE= (unix time: each tool's limit shrinks to end before it; a tool with < 30 s left is skipped)
#   EXTRA_PYTHONPATH= (appended after each tool's site; the CPU check puts stand-ins there)
set -uo pipefail
if [ $# -ne 5 ]; then sed -n 5,9p "$0"; exit 2; fi
KOHYA=$(realpath "$1"); EXAMPLE=$(realpath "$2"); CKPT=$(realpath "$3"); IMAGES=$(realpath "$4")
OUT_DIR=$5
HERE=$(cd "$(dirname "$0")" && pwd); REPO=$(cd "$HERE/../.." && pwd)
STEPS=${STEPS:-150} RESOLUTION=${RESOLUTION:-512} BATCH=${BATCH:-8} MIXED_PRECISION=${MIXED_PRECISION:-bf16}
WORKERS=${WORKERS:-8} TOOLS=${TOOLS:-ours ours_compiled kohya diffusers} SITE_ROOT=${SITE_ROOT:-/tmp}
WORK=${WORK_DIR:-/tmp/compare-work} RUN_TIMEOUT=${RUN_TIMEOUT:-240} PY=${PYTHON:-python3} DEADLINE=${DEADLINE:-}
EXTRA=${EXTRA_PYTHONPATH:-}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # each tool runs in its own folder
TOKEN=fr3nchl4dy INIT=woman VECTORS=2 LR=0.002 SEED=42
mkdir -p "$OUT_DIR" "$WORK"; OUT_DIR=$(realpath "$OUT_DIR")
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
  DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 HF_HOME=$WORK/hf_home TOKENIZERS_PARALLELISM=false COLUMNS=160
for site in ours kohya diffusers; do
  [ -d "$SITE_ROOT/site_$site" ] || { echo "missing $SITE_ROOT/site_$site: run make_sites.sh first"; exit 2; }
done

# ---- inputs every tool reads the same way ------------------------------------------------------------
# The image files only (diffusers' example opens every file of its folder as an image).
rm -rf "$WORK/images" "$WORK/kohya_data" "$WORK"/out_* "$WORK"/*.steps "$WORK"/*.mem "$WORK/runs.txt"
mkdir -p "$WORK/images"
find "$IMAGES" -maxdepth 1 -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.webp' \) \
  -exec cp {} "$WORK/images/" \;
N_IMAGES=$(ls "$WORK/images" | wc -l)
[ "$N_IMAGES" -gt 0 ] || { echo "no images in $IMAGES"; exit 2; }
# Enough repeats for all steps in one epoch (Kohya and diffusers' example repeat the images per epoch; Kohya
# reads them from `<repeats>_<class tokens>` folders).
REPEATS=$(( (STEPS * BATCH + N_IMAGES - 1) / N_IMAGES ))
mkdir -p "$WORK/kohya_data/${REPEATS}_$TOKEN" && cp "$WORK"/images/* "$WORK/kohya_data/${REPEATS}_$TOKEN/"
# Kohya looks for the tokenizer in <cache>/openai_clip-vit-large-patch14 before the hub.
mkdir -p "$WORK/kohya_tokenizer" && rm -rf "$WORK/kohya_tokenizer/openai_clip-vit-large-patch14" &&
  cp -r "$REPO/library/assets/tokenizer_sd1" "$WORK/kohya_tokenizer/openai_clip-vit-large-patch14"
# diffusers' example reads a diffusers folder: convert the single file once with our library (fp32 weights,
# as the hub's SD1.5 folder holds them).
STAMP="$CKPT $(stat -c '%s %Y' "$CKPT")"
if [ "$(cat "$WORK/sd15-diffusers.stamp" 2>/dev/null)" != "$STAMP" ]; then
  t=$(date +%s)
  (cd "$REPO" && PYTHONPATH="$SITE_ROOT/site_ours${EXTRA:+:$EXTRA}" $PY -c "
import sys
from library.convert import save_diffusers
from library.models import load_sd
save_diffusers(load_sd(sys.argv[1], family='sd1'), sys.argv[2], overwrite=True)" "$CKPT" "$WORK/sd15-diffusers") \
    > "$WORK/convert.log" 2>&1 || { echo "diffusers folder: conversion failed"; tail -20 "$WORK/convert.log"; exit 1; }
  echo "$STAMP" > "$WORK/sd15-diffusers.stamp"
  echo "diffusers folder written in $(( $(date +%s) - t )) s"
fi

LAUNCH=(-m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision "$MIXED_PRECISION"
  --dynamo_backend no)
# run_tool NAME SITE CWD ARGS...: one timed run (see run_tool.sh).
source "$HERE/run_tool.sh"

summarize() {
  local settings="steps=$STEPS resolution=$RESOLUTION batch=$BATCH mixed_precision=$MIXED_PRECISION"
  settings="$settings vectors=$VECTORS token=$TOKEN lr=$LR workers=$WORKERS images=$N_IMAGES kohya_repeats=$REPEATS"
  $PY "$HERE/summarize.py" --work "$WORK" --out "$OUT_DIR" --sites "$SITE_ROOT" --settings "$settings" \
    --kohya "$KOHYA" --example "$EXAMPLE" --ckpt "$CKPT" \
    --pairs "ours/kohya ours/diffusers ours_compiled/kohya ours_compiled/diffusers"
}

for tool in $TOOLS; do
  case $tool in
  ours | ours_compiled)
    compiled=false; [ $tool = ours_compiled ] && compiled=true
    run_tool $tool "$SITE_ROOT/site_ours" "$REPO" train_textual_inversion.py --config presets/face.toml \
      model.checkpoint="$CKPT" model.family=sd1 dataset.image_dir="$WORK/images" dataset.resolution="$RESOLUTION" \
      embedding.name=$TOKEN embedding.init_text=$INIT embedding.num_vectors=$VECTORS \
      train.max_steps="$STEPS" train.batch_size="$BATCH" train.lr=$LR train.optimizer=adamw \
      train.mixed_precision="$MIXED_PRECISION" train.seed=$SEED \
      save.output_dir="$WORK/out_$tool" save.save_every_steps=0 preview.every_steps=0 train.compile=$compiled
    ;;
  kohya)
    run_tool kohya "$SITE_ROOT/site_kohya" "$KOHYA" train_textual_inversion.py \
      --pretrained_model_name_or_path "$CKPT" --tokenizer_cache_dir "$WORK/kohya_tokenizer" \
      --train_data_dir "$WORK/kohya_data" --use_object_template \
      --token_string $TOKEN --init_word $INIT --num_vectors_per_token $VECTORS \
      --resolution "$RESOLUTION" --train_batch_size "$BATCH" --max_train_steps "$STEPS" \
      --learning_rate $LR --lr_scheduler constant --optimizer_type AdamW \
      --mixed_precision "$MIXED_PRECISION" --sdpa --cache_latents --seed $SEED \
      --max_data_loader_n_workers "$WORKERS" --persistent_data_loader_workers \
      --output_dir "$WORK/out_kohya" --output_name $TOKEN --save_model_as safetensors
    ;;
  diffusers)
    run_tool diffusers "$SITE_ROOT/site_diffusers" "$EXAMPLE" textual_inversion.py \
      --pretrained_model_name_or_path "$WORK/sd15-diffusers" --train_data_dir "$WORK/images" \
      --learnable_property object --placeholder_token "<$TOKEN>" --initializer_token $INIT --num_vectors $VECTORS \
      --repeats "$REPEATS" \
      --resolution "$RESOLUTION" --train_batch_size "$BATCH" --max_train_steps "$STEPS" \
      --learning_rate $LR --lr_scheduler constant --lr_warmup_steps 0 \
      --mixed_precision "$MIXED_PRECISION" --seed $SEED --dataloader_num_workers "$WORKERS" \
      --save_steps $((STEPS + 1)) --checkpointing_steps $((STEPS + 1)) --output_dir "$WORK/out_diffusers"
    ;;
  *) echo "unknown tool $tool (ours, ours_compiled, kohya, diffusers)"; exit 2 ;;
  esac
done

summarize
