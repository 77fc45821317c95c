#!/usr/bin/env bash
# Train RANDose data-parallel on all GPUs of one host (one process, jax.jit
# shards each batch over a 'data' mesh of every visible GPU).
#
#   DATA=/path/to/provided-data BATCH=8 bash launch/all_gpus.sh
#
# Variables:
#   DATA     OpenKBP provided-data folder. Required.
#   WORKDIR  output folder (default runs/randose_allgpus); rerun to resume.
#   CONFIG   config (default configs/openkbp.py).
#   BATCH    global batch size; must be divisible by the GPU count
#            (default: 2 per GPU). The paper trains at batch 2: with more GPUs
#            consider scaling the learning rate and dividing the steps.
#   LR       learning rate (default: the config's 1e-4).
#   STEPS    training steps (default: the config's 80,000).
#   EXTRA    further flags.
set -euo pipefail
: "${DATA:?set DATA to the OpenKBP provided-data folder}"
WORKDIR=${WORKDIR:-runs/randose_allgpus}
CONFIG=${CONFIG:-configs/openkbp.py}
NGPU=$(nvidia-smi -L 2>/dev/null | wc -l)
NGPU=$(( NGPU > 0 ? NGPU : 1 ))
BATCH=${BATCH:-$(( 2 * NGPU ))}
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
args=(--config="$CONFIG" --workdir="$WORKDIR" --config.data.root="$DATA"
      --config.batch_size="$BATCH")
[[ -n "${LR:-}" ]] && args+=(--config.learning_rate="$LR")
[[ -n "${STEPS:-}" ]] && args+=(--config.num_train_steps="$STEPS")
echo "Training on $NGPU GPU(s), global batch $BATCH"
exec python -m randose_jax.main "${args[@]}" ${EXTRA:-}
