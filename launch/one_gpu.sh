#!/usr/bin/env bash
# Train RANDose on one GPU.
#
#   DATA=/path/to/open-kbp/provided-data WORKDIR=runs/randose bash launch/one_gpu.sh
#
# Variables:
#   DATA     OpenKBP provided-data folder (holds train-pats/, validation-pats/). Required.
#   WORKDIR  where checkpoints, logs and predictions go (default runs/randose).
#            Rerunning with the same WORKDIR resumes from its latest checkpoint.
#   CONFIG   config file and variant (default configs/openkbp.py, the paper).
#   GPU      which GPU to use (default 0).
#   EXTRA    further flags, e.g. "--config.model.dtype=bfloat16".
set -euo pipefail
: "${DATA:?set DATA to the OpenKBP provided-data folder}"
WORKDIR=${WORKDIR:-runs/randose}
CONFIG=${CONFIG:-configs/openkbp.py}
export CUDA_VISIBLE_DEVICES=${GPU:-0}
# Let XLA grow its GPU memory pool instead of taking 75% up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
exec python -m randose_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.data.root="$DATA" ${EXTRA:-}
