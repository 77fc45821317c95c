#!/usr/bin/env bash
# Cloud TPU VM example: run the same command on every worker of a TPU VM
# (single host or pod slice); jax.distributed.initialize() picks the TPU
# topology up by itself on pod slices.
#
# From your workstation (gcloud configured):
#   TPU=my-tpu ZONE=us-central2-b DATA=gs-fuse-or-local/provided-data \
#     bash launch/tpu_vm.sh
#
# Variables:
#   TPU      TPU VM name. Required.
#   ZONE     its zone. Required.
#   DATA     OpenKBP provided-data folder as seen on the workers. Required.
#   WORKDIR  output folder on the workers (default ~/runs/randose).
#   REPO     where this repository is checked out on the workers (default ~/randose_jax).
#   BATCH    global batch size, divisible by the TPU core count (default 8).
#   EXTRA    further flags, e.g. "--config.model.dtype=bfloat16".
set -euo pipefail
: "${TPU:?set TPU}" "${ZONE:?set ZONE}" "${DATA:?set DATA}"
WORKDIR=${WORKDIR:-~/runs/randose}
REPO=${REPO:-~/randose_jax}
BATCH=${BATCH:-8}
CMD="cd $REPO && pip install -q -e . 'jax[tpu]' && \
python -m randose_jax.main --config=configs/openkbp.py --workdir=$WORKDIR \
  --config.data.root=$DATA --config.batch_size=$BATCH --distributed ${EXTRA:-}"
# --worker=all runs the command on every host of a pod slice at once.
gcloud compute tpus tpu-vm ssh "$TPU" --zone="$ZONE" --worker=all --command="$CMD"
