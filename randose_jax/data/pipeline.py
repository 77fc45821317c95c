"""grain datasets over a `PatientCache`, for training and evaluation.

Training: shuffle (reshuffled each epoch), repeat forever, take this
process's share (`ds[process_index::process_count]`), augment
(`augment.augment_example`, each element with its own random stream derived
from the seed and its position), batch, prefetch in worker processes when
`config.data.num_workers > 0`, and make every array float32.

Choices, with the reason:
  - Examples travel with their 0/1 channels (oar, mask) as uint8 and become
    float32 after batching: at 128^3 an example is 92 MB as float32 and 40 MB
    this way, through augmentation, batching and the workers' shared memory.
  - The batch is formed on the iterator side (`to_iter_dataset().batch()`),
    where grain's workers write batches straight into shared memory; a
    MapDataset batch is pickled through a pipe instead, which costs more.
    So each worker batches its own share of the example stream (worker w
    takes elements w, w + num_workers, ...): the examples are those of an
    in-process run, grouped into batches differently. The same seed and the
    same num_workers give the same batches.
  - grain's default read-ahead (500 elements on 16 threads) would hold tens
    of GB of 128^3 examples: `config.data.read_threads` threads read ahead
    one batch each.

The iterators are grain `DatasetIterator`s: `it.get_state()` and
`it.set_state(state)` save and restore the position, so a resumed run
continues the same stream.
"""

from __future__ import annotations

import functools

from absl import flags
import grain
import numpy as np

from randose_jax.data import augment
from randose_jax.data import cache as cache_lib
from randose_jax.data import encoding


def _augment(example, rng, *, data_config):
  return augment.augment_example(example, rng, data_config)


def per_process_batch_size(config, process_count: int) -> int:
  if config.batch_size % process_count:
    raise ValueError(f"batch_size={config.batch_size} must be divisible by the "
                     f"number of processes ({process_count})")
  return config.batch_size // process_count


def train_dataset(cache: cache_lib.PatientCache, config, *, seed: int,
                  process_index: int = 0, process_count: int = 1) -> grain.IterDataset:
  """Endless shuffled, augmented training batches for this process.

  Args:
    cache: the training patients.
    config: the full config (batch_size, data.augment and its switches,
      data.num_workers, data.worker_buffer_size).
    seed: shuffle and augmentation seed; the same seed gives the same batches.
    process_index, process_count: this process's share (jax.process_index(),
      jax.process_count()).

  Returns:
    An IterDataset of dicts {ptv, ct, oar, target, mask}, each float32
    (batch_size // process_count, d, h, w, c).
  """
  batch_size = per_process_batch_size(config, process_count)
  ds = grain.MapDataset.source(cache.compact_view()).seed(seed).shuffle().repeat()
  ds = ds[process_index::process_count]
  if config.data.augment:
    ds = ds.random_map(functools.partial(_augment, data_config=config.data))
  threads = config.data.read_threads
  read_options = grain.ReadOptions(num_threads=threads,
                                   prefetch_buffer_size=max(threads, 1) * batch_size)
  ds = ds.to_iter_dataset(read_options).batch(batch_size, drop_remainder=True)
  if config.data.num_workers > 0:
    # grain's workers read absl flags; outside an absl app (tests, notebooks)
    # nothing parsed them, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=config.data.num_workers,
        per_worker_buffer_size=config.data.worker_buffer_size))
  return ds.map(encoding.to_float32)


def _with_index(index, *, cache):
  example = cache[index]
  example["index"] = np.int32(index)
  return example


def eval_dataset(cache: cache_lib.PatientCache, config, process_index: int = 0,
                 process_count: int = 1) -> grain.IterDataset:
  """Every patient of this process's share once, in cache order, unaugmented.

  Batches of 1: the encoded arrays (1, d, h, w, c) plus `index` int32 (1,),
  the patient's index into the cache (for `cache.reference(index)`). With
  several processes, process p gets patients p, p + count, ...; shares differ
  in length by at most one.
  """
  del config  # evaluation is batch 1 and unaugmented whatever the config says
  ds = grain.MapDataset.range(len(cache))[process_index::process_count]
  ds = ds.map(functools.partial(_with_index, cache=cache))
  read_options = grain.ReadOptions(num_threads=1, prefetch_buffer_size=1)
  return ds.to_iter_dataset(read_options).batch(1)
