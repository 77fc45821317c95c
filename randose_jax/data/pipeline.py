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

Progressive resizing (`config.data.coarse_steps` > 0, `training_batches`):
the first batches come from a second dataset over a cache of the whole grid
reduced by `data.coarse_downsample` (`coarse_config`), the rest from the
training grid's; the position saved says which phase and where in it.
"""

from __future__ import annotations

import functools
import math
from typing import Optional

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


def coarse_config(config):
  """The config of the coarse phase of progressive resizing: `config` with
  the whole grid reduced by `data.coarse_downsample` (no crops) and no
  coarse phase of its own. Its `data` gives the coarse cache's settings."""
  coarse = config.copy_and_resolve_references()
  coarse.data.downsample = int(config.data.coarse_downsample)
  coarse.data.crop_shape = ()
  coarse.data.coarse_steps = 0
  return coarse


class CoarseThenFine:
  """Batches of `coarse` for the first `coarse_batches`, then of `fine`:
  an iterable like a grain dataset, whose iterator saves and restores its
  position (`get_state` / `set_state`, JSON-able) and closes the phase's
  worker processes (`close`; the coarse ones at the switch)."""

  def __init__(self, coarse, fine, coarse_batches: int):
    self.coarse, self.fine = coarse, fine
    self.coarse_batches = int(coarse_batches)

  def __iter__(self) -> "CoarseThenFineIterator":
    return CoarseThenFineIterator(self)


class CoarseThenFineIterator:
  """The iterator of `CoarseThenFine` (each phase's grain iterator is made
  when that phase begins)."""

  def __init__(self, source: CoarseThenFine):
    self._source = source
    self._taken = 0
    self._coarse = None
    self._fine = None

  @property
  def phase(self) -> str:
    return "coarse" if self._taken < self._source.coarse_batches else "fine"

  def _current(self):
    if self.phase == "coarse":
      if self._coarse is None:
        self._coarse = iter(self._source.coarse)
      return self._coarse
    if self._coarse is not None:  # the switch: the coarse workers stop
      self._coarse.close()
      self._coarse = None
    if self._fine is None:
      self._fine = iter(self._source.fine)
    return self._fine

  def __iter__(self):
    return self

  def __next__(self):
    batch = next(self._current())
    self._taken += 1
    return batch

  def get_state(self) -> dict:
    return {
        "batches_taken": self._taken,
        "phase": self.phase,
        "iterator": self._current().get_state(),
    }

  def set_state(self, state) -> None:
    if not isinstance(state, dict) or "batches_taken" not in state:
      raise ValueError(
          "the saved input position is not one of a run with a coarse phase "
          "(config.data.coarse_steps): resume with the config that saved it"
      )
    self.close()
    self._taken = int(state["batches_taken"])
    self._current().set_state(state["iterator"])

  def close(self) -> None:
    for it in (self._coarse, self._fine):
      if it is not None:
        it.close()
    self._coarse = self._fine = None


def training_batches(
    cache: cache_lib.PatientCache,
    config,
    *,
    seed: int,
    coarse_cache: Optional[cache_lib.PatientCache] = None,
    process_index: int = 0,
    process_count: int = 1,
):
  """`train_dataset`, preceded by `config.data.coarse_steps` batches of
  the coarse phase (`coarse_cache`: the training patients encoded with
  `coarse_config(config).data`) when progressive resizing is on."""
  share = dict(
      seed=seed, process_index=process_index, process_count=process_count
  )
  fine = train_dataset(cache, config, **share)
  steps = int(config.data.get("coarse_steps", 0))
  if not steps:
    return fine
  if coarse_cache is None:
    raise ValueError(
        f"config.data.coarse_steps={steps} needs the coarse cache (the "
        "training patients encoded with pipeline.coarse_config(config).data)"
    )
  coarse = train_dataset(coarse_cache, coarse_config(config), **share)
  return CoarseThenFine(coarse, fine, steps)
