#!/usr/bin/env bash
# bench/step_lab.py's experiments in one device call, from the repo root, carrying .whl (diffusers etc.) or
# after bench/compare/device.sh with SITE=/tmp/site_ours:
#   bash bench/lab_device.sh [STAGES...]   stages: train regional regional-warm full full-warm render recipe generate
#                                          imports first recipe-profile capped
# (SDPA_BACKENDS="flash cudnn" adds those to train; GEN_SET="generate.batch_size=8 ..." overrides generate)
# Results: $OUT/lab/lab.jsonl, profile-*.txt, one log per stage. Each stage has its own time limit.
set -uo pipefail
OUT=${OUT:-/tmp/lab-out}/lab; mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
start=$(date +%s); SDPA_BACKENDS=${SDPA_BACKENDS:-} GEN_SET=${GEN_SET:-}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1
SITE=${SITE:-/tmp/site}  # SITE=/tmp/site_ours after bench/compare/device.sh in the same call: no .whl needed
[ -d .whl ] && python3 -m pip install -q --no-deps --target "$SITE" .whl/*.whl 2>&1 | grep -v -i warning | tail -2
export PYTHONPATH=$SITE:.
# Bytecode, as a user's pip install leaves it (the machine's site-packages keeps none): see compare/device.sh.
export PYTHONPYCACHEPREFIX=/tmp/pycache
python3 -m compileall -q -j 0 "$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')" "$SITE" \
  library bench ./*.py > /dev/null 2>&1
CKPT=/tmp/sd15-random.safetensors
[ -f $CKPT ] || python3 bench/make_sd15.py $CKPT 0 2>&1 | tail -1
python3 -c "
from PIL import Image; import numpy as np, os
rng = np.random.default_rng(0); os.makedirs('/tmp/face', exist_ok=True)
for i in range(8):
    Image.fromarray(rng.integers(0, 255, (640, 560, 3), dtype=np.uint8)).save(f'/tmp/face/{i}.png')
"
echo "set-up $(( $(date +%s) - start )) s"
lab() { local name=$1 limit=$2; shift 2; local t=$(date +%s)
  timeout $limit python3 bench/step_lab.py "$@" --checkpoint $CKPT --images /tmp/face --out "$OUT" > "$OUT/$name.log" 2>&1
  echo "$name rc=$? $(( $(date +%s) - t )) s"; grep '^{' "$OUT/$name.log" | cut -c1-400; grep -iE "error|Traceback" "$OUT/$name.log" | tail -3; }
for stage in "${@:-train regional regional-warm render full full-warm}"; do for s in $stage; do
  case $s in
  train) lab train 150 train --sdpa-backends $SDPA_BACKENDS ;;
  regional) lab regional 200 compile --how regional --profile ;;
  regional-warm) lab regional-warm 120 compile --how regional ;;
  full) lab full 220 compile --how full ;;
  full-warm) lab full-warm 120 compile --how full ;;
  render) lab render 120 render --batches ${RENDER_BATCHES:-4 8 16} ;;
  recipe) for n in $(seq ${RECIPE_RUNS:-2}); do  # the face recipe as users run it (twice by default)
      t=$(date +%s%N); python3 -c "import library.training" 2>/dev/null; i=$(( ($(date +%s%N) - t) / 1000000 ))
      rm -rf /tmp/recipe; t=$(date +%s%N)
      nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 100 > "$OUT/recipe-$n.mem" & mem=$!
      timeout 150 python3 train_textual_inversion.py --config presets/face.toml model.checkpoint=$CKPT \
        dataset.image_dir=/tmp/face save.output_dir=/tmp/recipe > "$OUT/recipe-$n.log" 2>&1
      rc=$?; kill $mem; peak=$(sort -n "$OUT/recipe-$n.mem" | tail -1)
      echo "recipe $n rc=$rc wall=$(( ($(date +%s%N) - t) / 1000000 )) ms, peak $peak MiB (import library.training alone: $i ms) :: $(grep -E 'steps in|saved .* after|rror' "$OUT/recipe-$n.log" | tr '\n' ' ' | cut -c1-300)"
    done ;;
  imports) python3 -X importtime -c "import library.training" 2> "$OUT/importtime.txt"
    for m in torch "torch; torch.cuda.init()" torch._dynamo bitsandbytes diffusers.models.unets.unet_2d_condition \
        library.training; do
      t=$(date +%s%N); python3 -c "import $m" >/dev/null 2>&1; echo "import $m: $(( ($(date +%s%N) - t) / 1000000 )) ms"
    done
    sort -t'|' -k2 -n "$OUT/importtime.txt" | tail -25 | cut -c1-150 ;;
  first) for case in "graphs default" "side default"; do set -- $case
      lab first-$1-$2 120 first --order $1 --sdpa $2; done ;;
  recipe-profile) rm -rf /tmp/recipe; t=$(date +%s%N)
    timeout 200 python3 -m cProfile -o "$OUT/recipe.prof" train_textual_inversion.py --config presets/face.toml \
      model.checkpoint=$CKPT dataset.image_dir=/tmp/face save.output_dir=/tmp/recipe > "$OUT/recipe-profile.log" 2>&1
    echo "recipe under cProfile rc=$? wall=$(( ($(date +%s%N) - t) / 1000000 )) ms"
    python3 -c "import pstats; pstats.Stats('$OUT/recipe.prof').sort_stats('cumulative').print_stats(45)" \
      | grep -v "^$" | cut -c1-160 | tail -48 ;;
  capped) rm -rf /tmp/capped; t=$(date +%s%N)  # the default face run as on a 12 GB card
    timeout 150 python3 bench/capped.py 12 train_textual_inversion.py --config presets/face.toml \
      model.checkpoint=$CKPT dataset.image_dir=/tmp/face save.output_dir=/tmp/capped train.batch_size=8 \
      train.max_steps=30 > "$OUT/capped.log" 2>&1
    echo "capped 12 GiB rc=$? wall=$(( ($(date +%s%N) - t) / 1000000 )) ms :: $(grep -E 'card|steps in|rror' "$OUT/capped.log" | tr '\n' ' ' | cut -c1-300)" ;;
  generate) FACES=$(python3 -c "import cv2; print('' if hasattr(cv2, 'CascadeClassifier') else 'pick.faces=false')" 2>/dev/null || echo pick.faces=false)
    rm -rf /tmp/gen; t=$(date +%s%N)
    timeout 150 python3 generate_dataset.py generate --config presets/generate_character.toml model.checkpoint=$CKPT \
      generate.output_dir=/tmp/gen $FACES $GEN_SET > "$OUT/generate.log" 2>&1
    echo "generate 288 rc=$? wall=$(( ($(date +%s%N) - t) / 1000000 )) ms, $(ls /tmp/gen/*.png 2>/dev/null | wc -l) PNGs :: $(grep -v 'it/s\]' "$OUT/generate.log" | tail -2 | tr '\n' ' ' | cut -c1-300)" ;;
  esac
done; done
echo "total $(( $(date +%s) - start )) s"
