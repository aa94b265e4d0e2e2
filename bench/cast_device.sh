#!/usr/bin/env bash
# Issue 14 on the GPU machine, from the repo root, carrying .whl: the random SD1.5 checkpoint, then
# bench/cast_bench.py (presets/cast.toml's three characters in one run against three separate runs).
# Results in $OUT/cast (cast_bench.json, one log per run).
set -uo pipefail
OUT=${OUT:-/tmp/cast-out}; mkdir -p "$OUT/cast"
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -1
python3 -m pip install -q --no-deps --target /tmp/site .whl/*.whl 2>&1 | grep -v -i warning | tail -2
export PYTHONPATH=/tmp/site:.
CKPT=/tmp/sd15-random.safetensors
[ -f $CKPT ] || python3 bench/make_sd15.py $CKPT 0 2>&1 | tail -1
python3 bench/cast_bench.py $CKPT /tmp/cast-work "$@"
rc=$?
cp /tmp/cast-work/*.log /tmp/cast-work/*.json /tmp/cast-work/*.toml "$OUT/cast/" 2>/dev/null
exit $rc
