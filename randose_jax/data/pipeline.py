"""grain datasets over a `PatientCache`, for training and evaluation.

Training: shuffle (reshuffled each epoch), repeat forever, take this
process's share (`ds[process_index::process_count]`), augment
(`augment.augment_example`'s draws, each element with its own random stream
derived from the seed and its position), batch, prefetch in worker processes
when `config.data.num_workers > 0`, and give every channel as float32.

Choices, with the reason (benchmarks/input_pipeline.py, benchmarks/NOTES.md):
  - On this kind of machine most of the cost of an example is memory, not
    arithmetic: a float32 128^3 example is 92 MB, and every fresh MB of POSIX
    shared memory (4 KiB pages, no huge pages) costs about 0.7 ms of page
    faults in a VM, ten times private memory. So at full resolution
    (downsample 1) examples travel as row packs (`augment.transform_planes`):
    the mask channels as bits of one uint16 code, and only the rows (runs of
    w voxels along axis 2) that hold something, a few MB per example. The
    float32 channels are made once, in the main process, by `unpack_batch`
    (private memory, lazily zero where nothing was written).
  - The packs are batched by `PackedBatch` on the iterator side, which writes
    straight into grain's shared memory in worker processes. Each worker
    batches its own share of the example stream (worker w takes elements w,
    w + num_workers, ...): the examples are those of an in-process run,
    grouped into batches differently. The same seed and the same num_workers
    give the same batches.
  - With downsample > 1 (fractional channels, small grids) examples are the
    encoded dicts (0/1 channels as uint8), augmented by
    `augment.augment_example`, batched by grain and made float32 after.
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

from randose_jax.data import augment
from randose_jax.data import cache as cache_lib
from randose_jax.data import encoding
from randose_jax.data import openkbp


def _augment(example, rng, *, data_config):
  return augment.augment_example(example, rng, data_config)


class PlaneSource:
  """Planes (`augment.planes_from_sparse`) of the cache's patients: a grain
  random-access source. Pickles small (the cache does)."""

  def __init__(self, cache: cache_lib.PatientCache):
    self.cache = cache

  def __len__(self) -> int:
    return len(self.cache)

  def __getitem__(self, index: int) -> dict:
    return augment.planes_from_sparse(self.cache.sparse(int(index)), self.cache.settings)


def _augment_planes(planes, rng, *, data_config):
  return augment.augment_planes(planes, rng, data_config)


def _pack_planes(planes, *, data_config):
  return augment.transform_planes(planes, swap_parotids=data_config.swap_parotids,
                                  ct_fill=augment.air_value(data_config))


class PackedBatch:
  """grain batch_fn for row packs: concatenates the examples' rows (their
  row numbers offset by b * d * h for example b) into one pack of the batch,
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
    d, h, w = (int(n) for n in packs[0]["grid"])
    batch = {"grid": (len(packs), d, h, w)}
    for key in augment.PACKED_KEYS:
      values = [pack[key] for pack in packs]
      out = self._empty((sum(len(v) for v in values), w), values[0].dtype)
      np.concatenate(values, out=out)
      rows = self._empty(out.shape[:1], np.int32)
      np.concatenate([pack[key + "_rows"] + np.int32(b * d * h)
                      for b, pack in enumerate(packs)], out=rows)
      batch[key], batch[key + "_rows"] = out, rows
    return batch


@functools.lru_cache(maxsize=8)
def _code_tables(ptv_values: tuple[float, ...]):
  """(oar float32 (128, 7), ptv float32 (8,)): the channels of a code's OAR
  bits and PTV bits (the max of the present PTVs' levels, as
  `encoding.encode_patient`)."""
  num_oars = len(openkbp.OAR_NAMES)
  bits = np.arange(1 << num_oars)[:, None] >> np.arange(num_oars) & 1
  ptv = np.zeros(8, np.float32)
  for code in range(8):
    for j, level in enumerate(ptv_values):
      if code >> j & 1:
        ptv[code] = np.maximum(ptv[code], level)
  return bits.astype(np.float32), ptv


def unpack_batch(batch: dict, *, ptv_values, ct_fill: float) -> dict:
  """A batch of row packs (`PackedBatch`) as the float32 channels.

  Args:
    batch: grid (b, d, h, w), and per `augment.PACKED_KEYS` the rows and
      their values.
    ptv_values: `config.data.ptv_values` (PTV56, PTV63, PTV70 levels).
    ct_fill: the encoded ct of air (`augment.air_value`).

  Returns:
    {ptv, ct, oar, target, mask}: float32 (b, d, h, w, c), equal to the
    stacked `transform` outputs of the encoded examples.
  """
  b, d, h, w = (int(n) for n in batch["grid"])
  n = b * d * h
  shape = (b, d, h, w, -1)
  ct = np.full((n, w), ct_fill, np.float32)
  ct[batch["ct_rows"]] = batch["ct"]
  target = np.zeros((n, w), np.float32)
  target[batch["target_rows"]] = batch["target"]

  rows, codes = batch["codes_rows"], batch["codes"]
  oar_table, ptv_table = _code_tables(tuple(float(v) for v in ptv_values))
  num_oars = oar_table.shape[1]
  mask = np.zeros((n, w), np.float32)
  mask[rows] = (codes >> augment.MASK_BIT) & 1
  # OARs and PTVs fill a fraction of the rows the mask does: decode those only.
  oar_bits = codes & np.uint16((1 << num_oars) - 1)
  some = np.flatnonzero(oar_bits.any(1))
  oar = np.zeros((n, w, num_oars), np.float32)
  oar[rows[some]] = oar_table[oar_bits[some]]
  ptv_bits = codes >> augment.PTV_SHIFT
  some = np.flatnonzero(ptv_bits.any(1))
  ptv = np.zeros((n, w), np.float32)
  ptv[rows[some]] = ptv_table[ptv_bits[some] & 7]
  return {"ptv": ptv.reshape(shape), "ct": ct.reshape(shape), "oar": oar.reshape(shape),
          "target": target.reshape(shape), "mask": mask.reshape(shape)}


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
  data_config = config.data
  packed = int(cache.settings.downsample) == 1
  source = PlaneSource(cache) if packed else cache.compact_view()
  ds = grain.MapDataset.source(source).seed(seed).shuffle().repeat()
  ds = ds[process_index::process_count]
  if packed:
    ds = (ds.random_map(functools.partial(_augment_planes, data_config=data_config))
          if data_config.augment else
          ds.map(functools.partial(_pack_planes, data_config=data_config)))
  elif data_config.augment:
    ds = ds.random_map(functools.partial(_augment, data_config=data_config))
  threads = data_config.read_threads
  read_options = grain.ReadOptions(num_threads=threads,
                                   prefetch_buffer_size=max(threads, 1) * batch_size)
  ds = ds.to_iter_dataset(read_options).batch(
      batch_size, drop_remainder=True, batch_fn=PackedBatch() if packed else None)
  if data_config.num_workers > 0:
    # grain's workers read absl flags; outside an absl app (tests, notebooks)
    # nothing parsed them, so take their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_config.num_workers,
        per_worker_buffer_size=data_config.worker_buffer_size))
  if packed:
    return ds.map(functools.partial(unpack_batch, ptv_values=cache.settings.ptv_values,
                                    ct_fill=augment.air_value(data_config)))
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
