"""Multi-host start-up: `jax.distributed.initialize()` only when it applies.

On one host nothing is done. Under SLURM (srun with several tasks), Open MPI,
a Cloud TPU pod slice, or when JAX_COORDINATOR_ADDRESS is set, JAX's own
cluster detection fills in the coordinator address, process count and id.
The helpers below (mesh, barrier, per-process share, sums over processes)
are what training and validation need on one process or several.
"""

import logging
import math
import os

import jax
from jax.experimental import multihost_utils
from jax.sharding import Mesh
import numpy as np


def _multi_process_environment() -> bool:
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  for var in ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
    if int(env.get(var, "1") or 1) > 1:
      return True
  return bool(env.get("TPU_WORKER_HOSTNAMES", "").count(","))


def maybe_initialize(
    force: bool = False,
    coordinator_address: str = "",
    num_processes: int = 0,
    process_id: int = -1,
) -> None:
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
    jax.distributed.initialize(
        coordinator_address=coordinator_address or None,
        num_processes=num_processes,
        process_id=process_id,
    )
  else:
    jax.distributed.initialize()
  logging.info(
      "jax.distributed: process %d of %d, %d local / %d global devices",
      jax.process_index(),
      jax.process_count(),
      jax.local_device_count(),
      jax.device_count(),
  )


# ------------------------------------------------- helpers for every process
def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh named 'data' over `devices` (default: all of every process)."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), ("data",))


def barrier(name: str) -> None:
  """Waits for every process (nothing to do with one)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def local_indices(n: int) -> list:
  """This process's share of n items, padded with None so every process has
  as many."""
  per = math.ceil(n / jax.process_count())
  mine = list(range(jax.process_index(), n, jax.process_count()))
  return mine + [None] * (per - len(mine))


def allreduce_sums(values: np.ndarray) -> np.ndarray:
  """`values` summed over the processes."""
  if jax.process_count() == 1:
    return values
  return np.asarray(multihost_utils.process_allgather(values)).sum(0)
