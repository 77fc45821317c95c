"""grain datasets over a `PatientCache` for training.

Training: shuffle (reshuffled each epoch), repeat forever, take this
process's share (`ds[process_index::process_count]`), augment
(`augment.augment_planes`, each element with its own random stream derived
from the seed and its position), batch, prefetch in worker processes when
`config.data.num_workers > 0`, and give every channel as float32.

Choices, with the reason (benchmarks/input_pipeline.py, benchmarks/NOTES.md):
  - On this kind of machine most of the cost of an example is memory, not
    arithmetic: a float32 128^3 example is 92 MB, and every fresh MB of POSIX
    shared memory (4 KiB pages, no huge pages) costs about 0.7 ms of page
    faults in a VM, ten times private memory. So examples travel in the
    packed form (`encoding` module doc): the planes of a patient are
    augmented into a pack (the rows that hold something; at downsample 1 the
    mask channels as bits of one uint16 code), a few MB per example at
    128^3. The float32 channels are made once, in the main process, by
    `encoding.unpack` (private memory, lazily zero where nothing was
    written).
  - The packs are batched by `PackedBatch` on the iterator side, which writes
    straight into grain's shared memory in worker processes. Each worker
    batches its own share of the example stream (worker w takes elements w,
    w + num_workers, ...): the examples are those of an in-process run,
    grouped into batches differently. The same seed and the same num_workers
    give the same batches.
  - grain's default read-ahead (500 elements on 16 threads) would hold GBs:
    `config.data.read_threads` threads read ahead one batch each.

The iterators are grain `DatasetIterator`s: `it.get_state()` and
`it.set_state(state)` save and restore the position, so a resumed run
continues the same stream.
"""

from __future__ import annotations

import functools
import math

from absl import flags
import grain
import numpy as np

from randose_jax import interrupts
from randose_jax.data import augment
from randose_jax.data import cache as cache_lib
from randose_jax.data import encoding


class PlaneSource:
  """Planes (`encoding.encode_planes`) of the cache's patients: a grain
  random-access source. Pickles small (the cache does)."""

  def __init__(self, cache: cache_lib.PatientCache):
    self.cache = cache

  def __len__(self) -> int:
    return len(self.cache)

  def __getitem__(self, index: int) -> dict:
    return encoding.encode_planes(
        self.cache.sparse(int(index)), self.cache.settings
    )


def _augment(planes, rng, *, data_config):
  return augment.augment_planes(planes, rng, data_config)


class PackedBatch:
  """grain batch_fn for packs: concatenates the examples' rows (their row
  numbers offset by i * d * h for example i) into one pack of the batch,
  `grid` = (batch, d, h, w). In a worker process (grain calls
  `enable_shared_memory_output`), the arrays are allocated in shared memory
  and written once."""

  def __init__(self):
    self._shared = False

  def enable_shared_memory_output(self) -> None:
    self._shared = True

  def _empty(self, shape, dtype) -> np.ndarray:
    if self._shared and math.prod(shape):
      return grain.multiprocessing.SharedMemoryArray(shape, dtype)
    return np.empty(shape, dtype)

  def __call__(self, packs):
    d, h, w = (int(n) for n in packs[0]["grid"][-3:])
    batch = {"grid": (len(packs), d, h, w)}
    for key in encoding.ARRAY_KEYS:
      if key not in packs[0]:
        continue
      values = [pack[key] for pack in packs]
      out = self._empty(
          (sum(len(v) for v in values),) + values[0].shape[1:], values[0].dtype
      )
      np.concatenate(values, out=out)
      rows = self._empty(out.shape[:1], np.int32)
      np.concatenate(
          [
              pack[key + "_rows"] + np.int32(i * d * h)
              for i, pack in enumerate(packs)
          ],
          out=rows,
      )
      batch[key], batch[key + "_rows"] = out, rows
    return batch


def per_process_batch_size(config, process_count: int) -> int:
  if config.batch_size % process_count:
    raise ValueError(
        f"batch_size={config.batch_size} must be divisible by the "
        f"number of processes ({process_count})"
    )
  return config.batch_size // process_count


def _grain_flags_at_defaults() -> None:
  """Lets grain read its own absl flags (`--grain_*`) outside an absl app.

  grain reads them when it starts its worker processes; in a test or a
  notebook nothing parsed the command line, and absl refuses to read an
  unparsed flag. Each `grain_*` flag not given is marked present with its
  default value (as grain does itself in its workers); every other flag
  stays unparsed, so a program that parses its command line later is not
  affected.
  """
  if flags.FLAGS.is_parsed():
    return
  for name in list(flags.FLAGS):
    if name.startswith("grain_") and not flags.FLAGS[name].present:
      flags.FLAGS[name].present = True


def train_dataset(
    cache: cache_lib.PatientCache,
    config,
    *,
    seed: int,
    process_index: int = 0,
    process_count: int = 1,
) -> grain.IterDataset:
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
  data_config = config.data
  ds = grain.MapDataset.source(PlaneSource(cache)).seed(seed).shuffle().repeat()
  ds = ds[process_index::process_count]
  ds = ds.random_map(functools.partial(_augment, data_config=data_config))
  threads = data_config.read_threads
  read_options = grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(threads, 1) * batch_size
  )
  ds = ds.to_iter_dataset(read_options).batch(
      batch_size, drop_remainder=True, batch_fn=PackedBatch()
  )
  if data_config.num_workers > 0:
    _grain_flags_at_defaults()
    ds = ds.mp_prefetch(
        grain.MultiprocessingOptions(
            num_workers=data_config.num_workers,
            per_worker_buffer_size=data_config.worker_buffer_size,
        ),
        # Ctrl-C / SIGTERM to the process group: the parent stops them.
        worker_init_fn=interrupts.ignore_signals,
    )
  return ds.map(functools.partial(encoding.unpack, settings=cache.settings))
