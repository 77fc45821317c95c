"""The run's data: patient folders (or synthetic phantoms) -> caches.

`prepare_data(config, workdir)` returns the training cache, the validation
cache and the validation patients' folder (None when only a prebuilt cache
is given); `prepare_coarse_data` the training cache of progressive
resizing's coarse phase. Process 0 writes what is missing (phantoms, cache
files); the other processes wait for it, then open the same caches.
"""

import logging
import pathlib

import jax

from randose_jax import distributed
from randose_jax.data import cache as cache_lib
from randose_jax.data import openkbp
from randose_jax.data import phantoms
from randose_jax.data import pipeline
from randose_jax.default_config import ConfigError


def prepare_data(config, workdir: pathlib.Path, *, train_only: bool = False):
  """Patient folders -> (train cache, eval cache, eval split dir); with
  `train_only`, the training split alone: (train cache, None, None)."""
  data = config.data
  if data.synthetic:
    root = workdir / "synthetic"
    if jax.process_index() == 0:
      for split, n, first, seed in (
          (data.train_split, data.num_synthetic_train, 1, config.seed),
          (
              data.eval_split,
              data.num_synthetic_eval,
              1 + data.num_synthetic_train,
              config.seed + 1,
          ),
      ):
        folder = root / split
        if not (folder.is_dir() and len(list(folder.glob("pt_*"))) == n):
          logging.info("Writing %d synthetic patients to %s", n, folder)
          phantoms.write_phantoms(
              folder, n, grid=data.synthetic_grid, seed=seed, first_id=first
          )
    distributed.barrier("synthetic_patients")
  elif data.root:
    root = pathlib.Path(data.root).expanduser()
  elif data.cache_dir:
    # Only a prebuilt cache (e.g. carried to a GPU host without the CSVs).
    cache_root = pathlib.Path(data.cache_dir).expanduser()
    logging.info(
        "config.data.root is empty: using the prebuilt cache in %s", cache_root
    )
    train_cache = cache_lib.open_cache(cache_root / data.train_split, data)
    if train_only:
      return train_cache, None, None
    return (
        train_cache,
        cache_lib.open_cache(cache_root / data.eval_split, data),
        None,
    )
  else:
    raise ConfigError(
        "config.data.root is empty: point it at an OpenKBP provided-data "
        "folder (holding train-pats/ and validation-pats/), e.g. "
        "--config.data.root=/path/to/open-kbp/provided-data, or use "
        "configs/demo.py for synthetic patients."
    )
  cache_root = pathlib.Path(data.cache_dir or workdir / "cache").expanduser()
  # The patients built (not those reused) counted on stderr: a live line on
  # a terminal, one line per patient elsewhere; none without progress_bar.
  progress = None if config.get("progress_bar", True) else "off"
  caches = []
  splits = (
      (data.train_split,) if train_only else (data.train_split, data.eval_split)
  )
  for split in splits:
    dirs = openkbp.list_patient_dirs(openkbp.split_dir(root, split))
    if jax.process_index() == 0:
      cache_lib.build_cache(dirs, cache_root / split, data, progress=progress)
    distributed.barrier(f"cache_{split}")
    caches.append(
        cache_lib.build_cache(dirs, cache_root / split, data, progress="off")
    )
  if train_only:
    return caches[0], None, None
  return caches[0], caches[1], root / data.eval_split


def prepare_coarse_data(config, workdir: pathlib.Path):
  """The training cache of progressive resizing's coarse phase
  (`pipeline.coarse_config`), or None when `config.data.coarse_steps` is 0."""
  if not config.data.get("coarse_steps", 0):
    return None
  coarse = pipeline.coarse_config(config)
  train_cache, _, _ = prepare_data(coarse, workdir, train_only=True)
  return train_cache
