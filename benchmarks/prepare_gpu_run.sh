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
#                   kept if both splits are already there; or, with
#                   --data=DIR (a full OpenKBP folder: DIR/train-pats,
#                   DIR/validation-pats), only openkbp.rdt, the transport
#                   archive of all of DIR's patients (randose_jax.cli.transport:
#                   CT and voxel sets lossless, dose within 0.005 Gy; 42.9 MiB
#                   for 120 + 33 patients), kept if already there; the device
#                   command then unpacks it into a cache in /tmp first
#
#   bash benchmarks/prepare_gpu_run.sh [--allow_dirty] [--data=DIR]
#
# Then one `run` call with carry [".whl", ".gpu_cache", ".gpu_snapshot"] and
# the command this script prints last (the carry is limited to 64 MiB in
# all, with the working tree: the script prints the total).
set -euo pipefail
cd "$(dirname "$0")/.."

ALLOW_DIRTY=0
DATA=""
for arg in "$@"; do
  case "$arg" in
    --allow_dirty) ALLOW_DIRTY=1 ;;
    --data=*) DATA="${arg#--data=}" ;;
    *) echo "error: unknown argument $arg (use --allow_dirty, --data=DIR)" >&2; exit 2 ;;
  esac
done

if [[ $ALLOW_DIRTY == 0 ]] && [[ -n "$(git status --porcelain --untracked-files=no)" ]]; then
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

if [[ -n "$DATA" ]]; then
  # Only the archive travels (a cache of the full set would not fit).
  rm -rf .gpu_cache/train-pats .gpu_cache/validation-pats
  if [[ -f .gpu_cache/openkbp.rdt ]]; then
    echo "archive: .gpu_cache/openkbp.rdt already packed"
  else
    mkdir -p .gpu_cache
    python3 -m randose_jax.cli.transport pack --root="$DATA" \
        --archive=.gpu_cache/openkbp.rdt --workers=2
  fi
  python3 -m randose_jax.cli.transport check --archive=.gpu_cache/openkbp.rdt --root="$DATA"
elif [[ -d .gpu_cache/train-pats && -d .gpu_cache/validation-pats ]]; then
  rm -f .gpu_cache/openkbp.rdt
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
carried=$(( $(du -sbc .whl .gpu_cache .gpu_snapshot | tail -1 | cut -f1) \
    + $(git ls-files -z --cached --others --exclude-standard | du -cb --files0-from=- 2>/dev/null | tail -1 | cut -f1) ))
echo "carried with the working tree: $(( carried / 1048576 )) MiB of the 64 MiB limit"
if (( carried > 64 * 1048576 )); then
  echo "error: more than 64 MiB to carry" >&2
  exit 2
fi

INSTALL='python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; cd .gpu_snapshot'
RUN='PYTHONUNBUFFERED=1 python3 benchmarks/gpu_run.py --out=$OUT --budget_s=420'
echo
echo 'Device call (carry [".whl", ".gpu_cache", ".gpu_snapshot"], timeout_s about 480):'
if [[ -n "$DATA" ]]; then
  echo "$INSTALL && python3 -m randose_jax.cli.transport unpack --archive=../.gpu_cache/openkbp.rdt --cache_dir=/tmp/gpu_cache --config=configs/openkbp.py --workers=8 >\$OUT/unpack.txt 2>&1 && $RUN --cache_dir=/tmp/gpu_cache 2>&1 | tee \$OUT/log.txt"
else
  echo "$INSTALL && $RUN --cache_dir=../.gpu_cache 2>&1 | tee \$OUT/log.txt"
fi
