"""The plan's geometry as input channels: signed distances to the PTVs.

An optional input (`config.data.geometry`): for each PTV level (PTV56,
PTV63, PTV70, `conventions.TARGET_NAMES` order) the signed Euclidean
distance of each voxel centre to that PTV, in mm (positive outside,
negative inside: outside voxels measure to the nearest PTV voxel, inside
voxels to the nearest voxel outside it), divided by
`config.data.geometry_scale_mm` and clipped to `GEOMETRY_CLIP`. A level the
patient does not have is `far` (the upper clip) everywhere, as are voxels
outside the bounding box of the possible-dose mask and the PTVs (no dose is
scored there). OpenKBP plans are nine equispaced coplanar beams around the
PTVs, so the dose falls off with these distances: a lookup table of them
alone scores far better than the mean dose (benchmarks/NOTES.md), and the
network gets them without having to learn a distance transform through
five pooled stages.

With `slab` (`config.data.geometry_slab`), three more channels: for each
level, the distance in mm along axis 2 (superior/inferior) from the
voxel's axial slice to the nearest slice holding that PTV (0 within its
slab), scaled and clipped the same way (so within [0, 3]). Coplanar beams
leave the slices beyond a target's superior and inferior ends nearly
unirradiated, while within its slab the dose falls off slowly in-plane: the
3D distance alone cannot tell the two apart (a model trained without these
channels overpredicted by 10-20 Gy there).

The distances are computed on the bounding box of the mask and the PTVs
grown by one voxel, which is exact inside the box (every PTV voxel lies in
it, and its one-voxel rim is outside every PTV); `ptv_distances` keeps
recent results in memory (a training run reads each patient once per
epoch), keyed by the voxels themselves.
"""

from __future__ import annotations

import collections
import threading
import zlib

import numpy as np
from scipy import ndimage

from randose_jax import conventions

NUM_CHANNELS = len(conventions.TARGET_NAMES)  # per kind of distance
# Encoded distance range: [-1, 3] x geometry_scale_mm (-50 mm inside to
# 150 mm outside at the default 50 mm): past 150 mm from every PTV the dose
# of an OpenKBP plan is small and flat.
GEOMETRY_CLIP = (-1.0, 3.0)
FAR = GEOMETRY_CLIP[1]
_MEMO_BYTES = 1 << 30  # at most ~1 GiB of boxes kept (float16)


class _Memo:
  """A small byte-bounded LRU cache, safe across grain reader threads."""

  def __init__(self, max_bytes: int):
    self.max_bytes = max_bytes
    self._items = collections.OrderedDict()
    self._bytes = 0
    self._lock = threading.Lock()

  def get(self, key):
    with self._lock:
      value = self._items.get(key)
      if value is not None:
        self._items.move_to_end(key)
      return value

  def put(self, key, value) -> None:
    size = value[1].nbytes
    with self._lock:
      if key in self._items:
        return
      self._items[key] = value
      self._bytes += size
      while self._bytes > self.max_bytes and len(self._items) > 1:
        _, (_, old) = self._items.popitem(last=False)
        self._bytes -= old.nbytes


_memo = _Memo(_MEMO_BYTES)


def num_channels(slab: bool) -> int:
  """Channels of the geom input: 3 distances, and 3 slab distances."""
  return NUM_CHANNELS * (2 if slab else 1)


def _key(patient, scale_mm: float, slab: bool) -> tuple:
  crc = 0
  for index in (patient.mask_index, *patient.roi_index[-NUM_CHANNELS:]):
    crc = zlib.crc32(np.ascontiguousarray(index).view(np.uint8), crc)
  return (
      crc,
      tuple(patient.grid_shape),
      tuple(np.asarray(patient.voxel_dimensions, float)),
      float(scale_mm),
      bool(slab),
  )


def _box(patient) -> tuple[np.ndarray, np.ndarray]:
  """(lo, hi) int64 (3,): the box (inclusive) of the mask and PTV voxels,
  grown by one voxel and cut to the grid."""
  grid = np.asarray(patient.grid_shape)
  index = np.concatenate(
      [patient.mask_index, *patient.roi_index[-NUM_CHANNELS:]]
  )
  if index.size == 0:
    return np.zeros(3, np.int64), grid - 1
  coords = np.stack(np.unravel_index(index, tuple(grid)))
  lo = np.maximum(coords.min(1) - 1, 0)
  hi = np.minimum(coords.max(1) + 1, grid - 1)
  return lo.astype(np.int64), hi.astype(np.int64)


def _compute(patient, scale_mm: float, slab: bool):
  lo, hi = _box(patient)
  shape = tuple(int(n) for n in hi - lo + 1)
  spacing = np.asarray(patient.voxel_dimensions, np.float64)
  out = np.full(shape + (num_channels(slab),), FAR, np.float32)
  for c, index in enumerate(patient.roi_index[-NUM_CHANNELS:]):
    if not index.size:
      continue
    coords = np.unravel_index(index, tuple(patient.grid_shape))
    inside = np.zeros(shape, bool)
    inside[tuple(x - o for x, o in zip(coords, lo))] = True
    signed = ndimage.distance_transform_edt(~inside, sampling=spacing)
    signed -= ndimage.distance_transform_edt(inside, sampling=spacing)
    out[..., c] = np.clip(signed / scale_mm, *GEOMETRY_CLIP)
    if slab:
      slices = np.unique(coords[2]) - lo[2]
      k = np.arange(shape[2])
      nearest = np.abs(k[:, None] - slices[None, :]).min(1) * spacing[2]
      out[..., NUM_CHANNELS + c] = np.clip(nearest / scale_mm, *GEOMETRY_CLIP)[
          None, None, :
      ]
  return lo, out.astype(np.float16)


def ptv_distances(patient, scale_mm: float, slab: bool = False):
  """The encoded distances on the patient's box (module doc).

  Args:
    patient: a `SparsePatient` (or anything with its `grid_shape`,
      `voxel_dimensions`, `mask_index` and `roi_index`).
    scale_mm: mm per encoded unit (`config.data.geometry_scale_mm`).
    slab: also the superior/inferior slab distances (`num_channels`).

  Returns:
    (lo int64 (3,), box float16 (d, h, w, C)): the box's first voxel and
    the channels inside it; every voxel outside the box is `FAR`.
  """
  key = _key(patient, scale_mm, slab)
  got = _memo.get(key)
  if got is None:
    got = _compute(patient, scale_mm, slab)
    _memo.put(key, got)
  return got


def dense(patient, scale_mm: float, slab: bool = False) -> np.ndarray:
  """float32 (D, H, W, C): the channels on the patient's whole grid."""
  lo, box = ptv_distances(patient, scale_mm, slab)
  out = np.full(
      tuple(patient.grid_shape) + (num_channels(slab),), FAR, np.float32
  )
  out[tuple(slice(o, o + n) for o, n in zip(lo, box.shape[:3]))] = box
  return out
