#!/usr/bin/env bash
# Multi-host data-parallel training on SLURM: one task (process) per node,
# each driving all GPUs of its node. jax.distributed.initialize() reads the
# coordinator, process count and process id from SLURM's environment
# (SLURM_NTASKS > 1 triggers it; see randose_jax/distributed.py).
#
#   DATA=/shared/provided-data WORKDIR=/shared/runs/randose sbatch launch/slurm_multihost.sh
#
# Variables:
#   DATA     OpenKBP provided-data folder on a file system every node sees. Required.
#   WORKDIR  output folder on a shared file system (checkpoints are written by
#            all processes together; predictions land there). Rerun to resume.
#   CONFIG   config (default configs/openkbp.py).
#   CACHE_DIR where the encoded patient cache goes (default $WORKDIR/cache; shared).
#   BATCH    global batch size, divisible by the total GPU count
#            (default 2 per GPU).
#   EXTRA    further flags.
#SBATCH --job-name=randose
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=16
#SBATCH --time=04:00:00
#SBATCH --output=randose_%j.log
set -euo pipefail
: "${DATA:?set DATA to the OpenKBP provided-data folder}"
WORKDIR=${WORKDIR:-runs/randose_multihost}
CONFIG=${CONFIG:-configs/openkbp.py}
GPUS_PER_NODE=${SLURM_GPUS_PER_NODE:-8}
NODES=${SLURM_NNODES:-1}
BATCH=${BATCH:-$(( 2 * GPUS_PER_NODE * NODES ))}
export XLA_PYTHON_CLIENT_PREALLOCATE=${XLA_PYTHON_CLIENT_PREALLOCATE:-false}
srun python -m randose_jax.main --config="$CONFIG" --workdir="$WORKDIR" \
  --config.data.root="$DATA" --config.batch_size="$BATCH" \
  --config.data.cache_dir="${CACHE_DIR:-$WORKDIR/cache}" ${EXTRA:-}
