# Sourced by run_compare.sh and run_sdxl.sh: the timed run of one tool, the same for every comparison.
#
# run_tool NAME SITE CWD ARGS...: run `$PY ${LAUNCH[@]} ARGS...` in CWD with PYTHONPATH=hook:SITE[:EXTRA],
# time it from command start to exit, sample GPU memory meanwhile, append "NAME rc t0 t1 mib_before" to
# $WORK/runs.txt and call the caller's `summarize` (so compare.json exists after every run, in case a later
# one is cut off). The log, $OUT_DIR/NAME.log, starts with the exact command.
# Needs: WORK OUT_DIR HERE PY LAUNCH (array) RUN_TIMEOUT (s) DEADLINE (unix time or "") EXTRA, and `summarize`.
# A run gets min(RUN_TIMEOUT, DEADLINE - now) seconds; with less than 30 s left it is skipped (rc 125).

have_gpu() { command -v nvidia-smi > /dev/null && nvidia-smi -L > /dev/null 2>&1; }

run_tool() {
  local name=$1 site=$2 cwd=$3; shift 3
  local mem_pid="" base=""
  if have_gpu; then
    base=$(nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits | head -1)
    nvidia-smi --query-gpu=timestamp,memory.used --format=csv,noheader,nounits -lms 200 > "$WORK/$name.mem" 2> /dev/null &
    mem_pid=$!
  fi
  echo "== $name: (cd $cwd && PYTHONPATH=$HERE/hook:$site${EXTRA:+:$EXTRA} $PY ${LAUNCH[*]} $*)" > "$OUT_DIR/$name.log"
  local t0 t1 rc limit=$RUN_TIMEOUT
  [ -n "$DEADLINE" ] && limit=$(( DEADLINE - $(date +%s) < limit ? DEADLINE - $(date +%s) : limit ))
  t0=$(date +%s.%N)
  if [ "$limit" -lt 30 ]; then
    echo "skipped: only $limit s left before DEADLINE" >> "$OUT_DIR/$name.log"; rc=125
  else
    (cd "$cwd" && COMPARE_STEP_LOG="$WORK/$name.steps" \
      PYTHONPATH="$HERE/hook:$site${EXTRA:+:$EXTRA}" timeout -k 10 "$limit" $PY "${LAUNCH[@]}" "$@") \
      >> "$OUT_DIR/$name.log" 2>&1
    rc=$?
  fi
  t1=$(date +%s.%N)
  [ -n "$mem_pid" ] && { kill "$mem_pid" 2> /dev/null; wait "$mem_pid" 2> /dev/null; }
  echo "$name $rc $t0 $t1 ${base:--}" >> "$WORK/runs.txt"
  echo "$name: rc=$rc wall=$(awk -v a="$t0" -v b="$t1" 'BEGIN {printf "%.1f", b - a}') s (limit $limit s)"
  summarize > /dev/null
}
