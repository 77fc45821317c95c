#!/usr/bin/env bash
# Prepares the three folders the device call of benchmarks/gpu_run.py carries
# (see its docstring and benchmarks/NOTES.md, "GPU run, prepared"), on the
# development machine, before any device time is spent:
#
#   .gpu_snapshot/  the committed tree at HEAD (the run uses committed code;
#                   always rebuilt, and the script refuses a dirty tree)
#   .whl/           Python 3.12 wheels of what the GPU image lacks (grain,
#                   array_record, ml_collections, portpicker, tensorboardX),
#                   kept if every one is already there
#   .gpu_cache/     randose_jax.data.cache of the shared OpenKBP patients for
#                   the paper's data settings (train-pats/, validation-pats/),
#                   kept if both splits are already there
#
#   bash benchmarks/prepare_gpu_run.sh [--allow_dirty]
#
# Then one `run` call with carry [".whl", ".gpu_cache", ".gpu_snapshot"] and
# the command this script prints last.
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ "${1:-}" != "--allow_dirty" ]] && [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
  echo "error: uncommitted changes; the device runs the committed tree (HEAD)." >&2
  echo "Commit first, or pass --allow_dirty to snapshot HEAD anyway." >&2
  exit 2
fi

rm -rf .gpu_snapshot
mkdir .gpu_snapshot
git archive HEAD | tar -x -C .gpu_snapshot
echo "snapshot: .gpu_snapshot/ = $(git rev-parse --short HEAD)"

# The wheels: pinned to the versions the CPU checks ran with, for CPython
# 3.12 on x86-64 Linux (the GPU image). Only the packages themselves: every
# requirement of theirs is already in the GPU image.
WHEELS=(grain==0.2.18 array_record==0.8.6 ml_collections==1.1.0
        portpicker==1.6.0 tensorboardX==2.6.5)
have_all=1
for spec in "${WHEELS[@]}"; do
  name="${spec%%==*}"
  pattern="$(echo "$name" | tr 'A-Z-' 'a-z_')"
  # Wheel names, lower-cased with '-' as '_': <name>_<version>_<tags>.whl
  if ! ls .whl 2>/dev/null | tr 'A-Z-' 'a-z_' | grep -q "^${pattern}_${spec##*==}_"; then
    have_all=0
  fi
done
if [[ $have_all == 1 ]]; then
  echo "wheels: .whl/ already holds ${WHEELS[*]}"
else
  mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: \
      --python-version 3.12 --implementation cp --abi cp312 \
      --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux_2_17_x86_64 --platform any \
      -d .whl "${WHEELS[@]}"
  echo "wheels: downloaded into .whl/"
fi
ls .whl

if [[ -d .gpu_cache/train-pats && -d .gpu_cache/validation-pats ]]; then
  echo "cache: .gpu_cache/ already built"
else
  rm -rf .gpu_cache
  python3 - <<'EOF'
import pathlib
import sys
sys.path[:0] = [".", "benchmarks"]
import common
from configs import openkbp as openkbp_config
from randose_jax.data import cache, openkbp

config = openkbp_config.get_config()
root = common.openkbp_dir()
for split in ("train-pats", "validation-pats"):
  dirs = openkbp.list_patient_dirs(root / split)
  cache.build_cache(dirs, pathlib.Path(".gpu_cache") / split, config.data)
  print(f"cache: {split}, {len(dirs)} patients")
EOF
fi
du -sh .whl .gpu_cache .gpu_snapshot

cat <<'EOF'

Device call (carry [".whl", ".gpu_cache", ".gpu_snapshot"], timeout_s about 480):
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; cd .gpu_snapshot && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_run.py --cache_dir=../.gpu_cache --out=$OUT --budget_s=420 2>&1 | tee $OUT/log.txt
EOF
