#!/usr/bin/env bash
# SDXL side by side: our trainer on presets/sdxl_face.toml (default, then train.low_memory=true) and Kohya
# sd-scripts' sdxl_train_textual_inversion.py at the same settings, one after another, each timed.
#
#   bash bench/compare/run_sdxl.sh KOHYA_DIR CKPT IMAGES_DIR OUT_DIR
#
# KOHYA_DIR: an sd-scripts tree (sdxl_train_textual_inversion.py + library/); CKPT: an SDXL single file
# (bench/make_sdxl.py); IMAGES_DIR: the training images (its image files only); OUT_DIR: gets compare.json,
# compare.txt and one log per run (its first line is the exact command).
# Each tool runs with PYTHONPATH=hook:$SITE_ROOT/site_<tool> (make_sites.sh), as run_compare.sh does.
#
# Runs (RUNS, in this order; a run is skipped once DEADLINE is near, so the essential ones go first):
#   ours      train_textual_inversion.py --config $PRESET, train.low_memory=false
#   kohya     sdxl_train_textual_inversion.py at the preset's settings (no gradient checkpointing unless the
#             preset turns it on)
#   ours_low  the same as ours with train.low_memory=true (UNet gradient checkpointing, VAE off the GPU
#             after caching, no CUDA graphs)
#   kohya_gc  kohya with --gradient_checkpointing, Kohya's nearest to low_memory (it checkpoints the UNet and
#             both text encoders); left out when the preset checkpoints anyway (kohya is then the same run)
# Settings: the preset's trigger word, init word, vectors, resolution, buckets, batch, gradient accumulation,
# lr and schedule, seed, CLIP skip (sdxl_settings.py reads them); STEPS updates; bf16; AdamW; latents cached;
# SDPA; no intermediate saves, previews or samples; one final embedding.
# Environment knobs (defaults = the GPU benchmark; sdxl_cpu_check.sh uses small ones):
#   PRESET=presets/sdxl_face.toml STEPS=30 WARMUP_STEPS=3 (updates left out of the steady rate)
#   MIXED_PRECISION=bf16 WORKERS=8 RUNS="ours kohya ours_low kohya_gc"
#   FORCE_RESOLUTION= FORCE_BATCH= FORCE_GRAD_ACCUM= (override the preset's for both tools: the CPU check's)
#   SITE_ROOT=/tmp WORK_DIR=/tmp/sdxl-work RUN_TIMEOUT=180 (s per run) PYTHON=python3
#   DEADLINE= (unix time: each run's limit shrinks to end before it; a run with < 30 s left is skipped)
#   EXTRA_PYTHONPATH= (appended after each tool's site; the CPU check puts stand-ins there)
set -uo pipefail
if [ $# -ne 4 ]; then sed -n 5,9p "$0"; exit 2; fi
KOHYA=$(realpath "$1"); CKPT=$(realpath "$2"); IMAGES=$(realpath "$3"); OUT_DIR=$4
HERE=$(cd "$(dirname "$0")" && pwd); REPO=$(cd "$HERE/../.." && pwd)
PRESET=${PRESET:-presets/sdxl_face.toml} STEPS=${STEPS:-30} WARMUP_STEPS=${WARMUP_STEPS:-3} MIXED_PRECISION=${MIXED_PRECISION:-bf16}
WORKERS=${WORKERS:-8} RUNS=${RUNS:-ours kohya ours_low kohya_gc} SITE_ROOT=${SITE_ROOT:-/tmp}
WORK=${WORK_DIR:-/tmp/sdxl-work} RUN_TIMEOUT=${RUN_TIMEOUT:-180} PY=${PYTHON:-python3} DEADLINE=${DEADLINE:-}
EXTRA=${EXTRA_PYTHONPATH:-}
case $PY in */*) PY="$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")" ;; esac  # each tool runs in its own folder
mkdir -p "$OUT_DIR" "$WORK"; OUT_DIR=$(realpath "$OUT_DIR")
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 \
  DISABLE_TELEMETRY=1 PYTHONUNBUFFERED=1 HF_HOME=$WORK/hf_home TOKENIZERS_PARALLELISM=false COLUMNS=160
for site in ours kohya; do
  [ -d "$SITE_ROOT/site_$site" ] || { echo "missing $SITE_ROOT/site_$site: run make_sites.sh first"; exit 2; }
done
[ -f "$KOHYA/sdxl_train_textual_inversion.py" ] || { echo "$KOHYA has no sdxl_train_textual_inversion.py"; exit 2; }

# ---- settings: the preset's, for both tools ----------------------------------------------------------
SETTINGS=$(cd "$REPO" && $PY "$HERE/sdxl_settings.py" "$PRESET") || { echo "cannot read $PRESET"; exit 2; }
eval "$SETTINGS"  # PRESET_USED OURS_EXTRA NOTE TOKEN INIT VECTORS WIDTH HEIGHT BATCH GRAD_ACCUM LR ...
read -r -a OURS_EXTRA <<< "$OURS_EXTRA"
if [ -n "${FORCE_RESOLUTION:-}" ]; then  # bucket limits follow: half to twice the side
  WIDTH=$FORCE_RESOLUTION HEIGHT=$FORCE_RESOLUTION
  MIN_BUCKET_RESO=$(( FORCE_RESOLUTION / 2 )) MAX_BUCKET_RESO=$(( FORCE_RESOLUTION * 2 ))
  OURS_EXTRA+=("dataset.resolution=$FORCE_RESOLUTION" "dataset.min_bucket_reso=$MIN_BUCKET_RESO"
    "dataset.max_bucket_reso=$MAX_BUCKET_RESO")
fi
if [ -n "${FORCE_BATCH:-}" ]; then BATCH=$FORCE_BATCH; OURS_EXTRA+=("train.batch_size=$FORCE_BATCH"); fi
if [ -n "${FORCE_GRAD_ACCUM:-}" ]; then
  GRAD_ACCUM=$FORCE_GRAD_ACCUM; OURS_EXTRA+=("train.gradient_accumulation_steps=$FORCE_GRAD_ACCUM")
fi
echo "settings from $PRESET_USED: token $TOKEN, init '$INIT', $VECTORS vectors, ${WIDTH}x$HEIGHT" \
  "(buckets $ENABLE_BUCKET: $MIN_BUCKET_RESO-$MAX_BUCKET_RESO step $BUCKET_RESO_STEPS), batch $BATCH," \
  "grad accum $GRAD_ACCUM, lr $LR ($LR_SCHEDULER, warm-up $WARMUP), clip skip $CLIP_SKIP, seed $SEED," \
  "$STEPS steps, $MIXED_PRECISION${NOTE:+; note: $NOTE}"

# ---- inputs every tool reads the same way ------------------------------------------------------------
rm -rf "$WORK/images" "$WORK/kohya_data" "$WORK"/out_* "$WORK"/*.steps "$WORK"/*.mem "$WORK/runs.txt"
mkdir -p "$WORK/images"
find "$IMAGES" -maxdepth 1 -type f \( -iname '*.png' -o -iname '*.jpg' -o -iname '*.jpeg' -o -iname '*.webp' \) \
  -exec cp {} "$WORK/images/" \;
N_IMAGES=$(ls "$WORK/images" | wc -l)
[ "$N_IMAGES" -gt 0 ] || { echo "no images in $IMAGES"; exit 2; }
# Enough repeats for all steps in one epoch (Kohya reads them from the `<repeats>_<class tokens>` folder name).
REPEATS=$(( (STEPS * BATCH * GRAD_ACCUM + N_IMAGES - 1) / N_IMAGES ))
mkdir -p "$WORK/kohya_data/${REPEATS}_$TOKEN" && cp "$WORK"/images/* "$WORK/kohya_data/${REPEATS}_$TOKEN/"
# Kohya looks for its two tokenizers in <cache>/<hub id with _> before the hub: our CLIP-L and OpenCLIP ones
# (the same vocabulary; Kohya sets bigG's pad id to 0 itself).
rm -rf "$WORK/kohya_tokenizer" && mkdir -p "$WORK/kohya_tokenizer" &&
  cp -r "$REPO/library/assets/tokenizer_sd1" "$WORK/kohya_tokenizer/openai_clip-vit-large-patch14" &&
  cp -r "$REPO/library/assets/tokenizer_sd2" "$WORK/kohya_tokenizer/laion_CLIP-ViT-bigG-14-laion2B-39B-b160k"

LAUNCH=(-m accelerate.commands.launch --num_processes 1 --num_machines 1 --mixed_precision "$MIXED_PRECISION"
  --dynamo_backend no)
source "$HERE/run_tool.sh"  # run_tool NAME SITE CWD ARGS...

summarize() {
  local settings="steps=$STEPS resolution=${WIDTH}x$HEIGHT batch=$BATCH grad_accum=$GRAD_ACCUM"
  settings="$settings mixed_precision=$MIXED_PRECISION vectors=$VECTORS token=$TOKEN init=$INIT lr=$LR"
  settings="$settings lr_scheduler=$LR_SCHEDULER seed=$SEED workers=$WORKERS images=$N_IMAGES"
  settings="$settings kohya_repeats=$REPEATS preset=$PRESET_USED buckets=$ENABLE_BUCKET clip_skip=$CLIP_SKIP"
  $PY "$HERE/summarize.py" --work "$WORK" --out "$OUT_DIR" --sites "$SITE_ROOT" --settings "$settings" \
    --kohya "$KOHYA" --ckpt "$CKPT" --site-names "ours kohya" --note "$NOTE" --warmup-steps "$WARMUP_STEPS" \
    --pairs "ours/kohya ours_low/kohya ours_low/kohya_gc ours_low/ours kohya_gc/kohya" \
    --inputs "kohya_commit=$(cat "$KOHYA/COMMIT" 2> /dev/null || echo unknown)"
}

# Our trainer: the preset as it is, with the paths, the step count and no saves/previews on the way
# (each run adds train.low_memory and its output folder).
OURS_ARGS=(
  train_textual_inversion.py --config "$PRESET_USED"
  model.checkpoint="$CKPT" model.family=sdxl dataset.image_dir="$WORK/images"
  train.max_steps="$STEPS" train.mixed_precision="$MIXED_PRECISION"
  save.save_every_steps=0 preview.every_steps=0 "${OURS_EXTRA[@]}"
)

# Kohya: every option, and why (kohya_args OUT_FOLDER sets KOHYA_ARGS).
kohya_args() {
  KOHYA_ARGS=(
    sdxl_train_textual_inversion.py
    --pretrained_model_name_or_path "$CKPT"       # the random SDXL single file (sdxl_model_util's loader)
    --tokenizer_cache_dir "$WORK/kohya_tokenizer" # CLIP-L + bigG tokenizers from our assets: no hub
    --train_data_dir "$WORK/kohya_data"           # one `<repeats>_<token>` folder holding the same images
    --use_object_template                         # no caption files: imagenet "a photo of a {}" prompts
    --token_string "$TOKEN"                       # the preset's trigger word
    --init_word "$INIT"                           # the preset's init text
    --num_vectors_per_token "$VECTORS"            # the preset's vectors (per encoder: clip_l and clip_g)
    --resolution "$WIDTH,$HEIGHT"                 # the preset's resolution; the images are that size
    --train_batch_size "$BATCH"                   # the preset's batch
    --gradient_accumulation_steps "$GRAD_ACCUM"   # the preset's accumulation
    --max_train_steps "$STEPS"                    # the same step count (one epoch: enough repeats)
    --learning_rate "$LR"                         # the preset's rate
    --lr_scheduler "$LR_SCHEDULER"                # and its schedule
    --lr_warmup_steps "$WARMUP"                   # and warm-up
    --optimizer_type AdamW                        # torch AdamW, as ours (Kohya: weight decay 0.01 by default)
    --mixed_precision "$MIXED_PRECISION"          # bf16 autocast; UNet weights bf16, text encoders fp32
                                                  # (Kohya's default; --full_bf16 would train the table in bf16)
    --sdpa                                        # PyTorch scaled-dot-product attention, as ours
    --cache_latents                               # VAE latents once, before training, as ours
    --seed "$SEED"                                # the preset's seed
    --max_data_loader_n_workers "$WORKERS"        # Kohya's default 8
    --persistent_data_loader_workers              # no worker restarts (one epoch anyway)
    --output_dir "$1"                             # one final embedding here: no --save_every_n_* and
    --output_name "$TOKEN"                        # no --sample_* options
    --save_model_as safetensors
  )
  if [ "$ENABLE_BUCKET" = 1 ]; then               # the preset's aspect-ratio buckets, Kohya's own keys
    KOHYA_ARGS+=(--enable_bucket --min_bucket_reso "$MIN_BUCKET_RESO" --max_bucket_reso "$MAX_BUCKET_RESO"
      --bucket_reso_steps "$BUCKET_RESO_STEPS")
    [ "$BUCKET_NO_UPSCALE" = 1 ] && KOHYA_ARGS+=(--bucket_no_upscale)
  fi
  [ "$CLIP_SKIP" != 0 ] && KOHYA_ARGS+=(--clip_skip "$CLIP_SKIP")  # 0: both tools' SDXL default
  # Gradient checkpointing only where ours has it: the preset's train.gradient_checkpointing, or the
  # kohya_gc run that stands beside ours_low (Kohya's switch takes the UNet and both text encoders).
  if [ "$PRESET_GC" = 1 ] || [ "${2:-}" = gc ]; then KOHYA_ARGS+=(--gradient_checkpointing); fi
}

for run in $RUNS; do
  case $run in
  ours) run_tool ours "$SITE_ROOT/site_ours" "$REPO" "${OURS_ARGS[@]}" train.low_memory=false \
    save.output_dir="$WORK/out_ours" ;;
  ours_low) run_tool ours_low "$SITE_ROOT/site_ours" "$REPO" "${OURS_ARGS[@]}" train.low_memory=true \
    save.output_dir="$WORK/out_ours_low" ;;
  kohya) kohya_args "$WORK/out_kohya" && run_tool kohya "$SITE_ROOT/site_kohya" "$KOHYA" "${KOHYA_ARGS[@]}" ;;
  kohya_gc)
    if [ "$PRESET_GC" = 1 ]; then echo "kohya_gc: left out, the preset checkpoints: kohya is that run"; continue; fi
    kohya_args "$WORK/out_kohya_gc" gc && run_tool kohya_gc "$SITE_ROOT/site_kohya" "$KOHYA" "${KOHYA_ARGS[@]}"
    ;;
  *) echo "unknown run $run (ours, kohya, ours_low, kohya_gc)"; exit 2 ;;
  esac
done

summarize
