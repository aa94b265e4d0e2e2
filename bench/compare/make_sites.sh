#!/usr/bin/env bash
# Install the carried wheels into one site folder per tool: SITE_ROOT/site_ours, site_kohya, site_diffusers.
# Usage: [SITES="ours kohya"] bash bench/compare/make_sites.sh WHEEL_DIR [SITE_ROOT=/tmp]
# Each tool later runs with PYTHONPATH=SITE_ROOT/site_<tool>, so its pins shadow the machine's packages
# without touching them. --no-deps: the list in wheels.txt is complete; the rest comes from the machine.
set -euo pipefail
WHEELS=$1; ROOT=${2:-/tmp}; PY=${PYTHON:-python3}
LIST=$(dirname "$0")/wheels.txt
for site in ${SITES:-ours kohya diffusers}; do
  files=$(awk -v s=$site '$1 == s {print $2}' "$LIST" | sed "s|^|$WHEELS/|")
  rm -rf "$ROOT/site_$site"
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --disable-pip-version-check \
    --target "$ROOT/site_$site" $files
  echo "site_$site: $(ls "$ROOT/site_$site" | grep dist-info | sed 's/.dist-info//' | tr '\n' ' ')"
done
