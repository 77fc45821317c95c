"""Multi-host start-up: `jax.distributed.initialize()` only when it applies.

On one host nothing is done. Under SLURM (srun with several tasks), Open MPI,
a Cloud TPU pod slice, or when JAX_COORDINATOR_ADDRESS is set, JAX's own
cluster detection fills in the coordinator address, process count and id.
"""

import logging
import os

import jax


def _multi_process_environment() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
    if int(env.get(var, "1") or 1) > 1:
      return True
  return bool(env.get("TPU_WORKER_HOSTNAMES", "").count(","))


def maybe_initialize(force: bool = False, coordinator_address: str = "",
                     num_processes: int = 0, process_id: int = -1) -> None:
  """Initialises jax.distributed for multi-process runs, else does nothing.

  Without arguments JAX detects the cluster (SLURM, Open MPI, TPU pods,
  JAX_COORDINATOR_ADDRESS); the explicit arguments are for hand-started
  processes (e.g. two on one machine over loopback).
  """
  explicit = num_processes > 0
  if not (force or explicit or _multi_process_environment()):
    return
  # CPU-only multi-process runs (and tests on loopback) need a collectives
  # implementation; it does not affect GPU or TPU runs.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  if explicit:
    jax.distributed.initialize(coordinator_address=coordinator_address or None,
                               num_processes=num_processes,
                               process_id=process_id)
  else:
    jax.distributed.initialize()
  logging.info("jax.distributed: process %d of %d, %d local / %d global "
               "devices", jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
