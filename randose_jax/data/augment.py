"""Geometry-consistent augmentation of encoded examples (DESIGN.md section 1).

Every plan uses nine coplanar beams at 0, 40, ..., 320 degrees about axis 2,
so these maps send the beam set onto itself and keep the dose physically
plausible:
  - left/right flip (axis 1), swapping the RightParotid and LeftParotid OAR
    channels (2 and 3) when `swap_parotids`, so the channels keep their names;
  - superior/inferior flip (axis 2);
  - rotation by k * 40 degrees (k = 0..8) about axis 2, i.e. in the
    (axis 0, axis 1) plane, the same for every axis-2 slice, about the grid
    centre. ct and target are interpolated bilinearly; ptv, oar and mask take
    the nearest voxel, so masks stay masks. Voxels that come from outside the
    grid are air for ct (the encoded value of -1024 HU, -1.024 by default) and
    0 for everything else.

How it is fast: all three maps act on the (axis 0, axis 1) plane or reverse
axis 2, so an example (D, H, W, C) is handled as D*H rows of (W, C): every
output row comes from one source row (nearest) or four (bilinear), with
weights that depend only on (angle, plane shape, mirror) and are computed
once and cached. Only rows that hold something other than the background
(air for ct, 0 otherwise) are gathered: the head fills a fraction of the
plane and the OARs far less. Outputs are new contiguous arrays, so batching
them is a plain copy.

Inputs are dicts of float32 (D, H, W, C) arrays as `encoding.encode_patient`
returns; other keys pass through. Inputs are never modified.
"""

from __future__ import annotations

import functools

import numpy as np

from randose_jax.data import encoding
from randose_jax.data import openkbp

ANGLE_STEP_DEGREES = 40
NUM_ANGLES = 360 // ANGLE_STEP_DEGREES  # 9 beam-aligned rotations
PAROTID_CHANNELS = (2, 3)  # RightParotid, LeftParotid in the oar input
_LINEAR_KEYS = ("ct", "target")  # interpolated; the rest are masks


def air_value(data_config) -> float:
  """The encoded ct of air: clip(-1024 HU, ct_clip) / ct_scale."""
  lo, hi = data_config.ct_clip
  return float(np.float32(np.clip(-1024.0, lo, hi)) / np.float32(data_config.ct_scale))


@functools.lru_cache(maxsize=64)
def _plane_map(k: int, d: int, h: int, mirror: bool):
  """Where each output pixel of a (d, h) plane reads from, after a rotation by
  k * 40 degrees about the plane centre and then, with mirror, a flip of
  axis 1.

  Returns (nearest int64 (d*h,), nearest_inside bool (d*h,), taps int64
  (4, d*h), weights float32 (4, d*h), fill_weight float32 (d*h,)): the
  nearest source pixel, and the four bilinear source pixels with their
  weights. A tap outside the plane points at pixel 0 with weight 0 and its
  weight goes to fill_weight (the share of the fill value).
  """
  theta = np.deg2rad(ANGLE_STEP_DEGREES * k)
  i, j = np.meshgrid(np.arange(d, dtype=np.float64), np.arange(h, dtype=np.float64),
                     indexing="ij")
  if mirror:
    j = h - 1 - j
  ci, cj = (d - 1) / 2, (h - 1) / 2
  # Pull: output (i, j) reads the input at the inverse rotation of (i, j).
  cos, sin = np.cos(theta), np.sin(theta)
  si = (ci + cos * (i - ci) + sin * (j - cj)).ravel()
  sj = (cj - sin * (i - ci) + cos * (j - cj)).ravel()
  # Snap coordinates that are integers up to rounding, so that k = 0 copies
  # exactly.
  si = np.where(np.abs(si - np.rint(si)) < 1e-9, np.rint(si), si)
  sj = np.where(np.abs(sj - np.rint(sj)) < 1e-9, np.rint(sj), sj)

  inside = lambda a, b: (a >= 0) & (a <= d - 1) & (b >= 0) & (b <= h - 1)
  ni, nj = np.rint(si), np.rint(sj)
  nearest_inside = inside(ni, nj)
  nearest = np.where(nearest_inside, ni * h + nj, 0).astype(np.int64)

  i0, j0 = np.floor(si), np.floor(sj)
  fi, fj = si - i0, sj - j0
  taps, weights = [], []
  fill_weight = np.zeros(d * h)
  for di, dj, w in ((0, 0, (1 - fi) * (1 - fj)), (1, 0, fi * (1 - fj)),
                    (0, 1, (1 - fi) * fj), (1, 1, fi * fj)):
    ti, tj = i0 + di, j0 + dj
    ok = inside(ti, tj)
    taps.append(np.where(ok, ti * h + tj, 0).astype(np.int64))
    weights.append(np.where(ok, w, 0.0))
    fill_weight += np.where(ok, 0.0, w)
  tables = (nearest, nearest_inside, np.array(taps), np.array(weights, np.float32),
            fill_weight.astype(np.float32))
  for table in tables:
    table.flags.writeable = False
  return tables


def _resample_rows(rows: np.ndarray, active: np.ndarray, background, d: int, h: int,
                   k: int, mirror: bool, linear: bool,
                   row_map: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
  """The plane map applied to rows (d*h, W, C) of one array.

  Args:
    rows: (d*h, W, C), row r = plane pixel r of every axis-2 slice; with
      row_map, (R, W, C) where plane pixel r is row row_map[r].
    active: bool (d*h,), the rows holding something other than the
      background; only output rows that read one of them are computed.
    background: the fill value, of rows' dtype.
    linear: bilinear (else nearest).
    row_map: int (d*h,) or None (see rows).

  Returns:
    (selected int64 (S,), values (S, W, C)): the output rows that are not
    entirely background and their values; every other output row is
    background.
  """
  nearest, nearest_inside, taps, weights, fill_weight = _plane_map(k, d, h, mirror)
  source = (lambda r: r) if row_map is None else (lambda r: row_map[r])
  if linear and k:
    # An output row needs computing if any of its taps holds something.
    selected = np.flatnonzero((active[taps] & (weights > 0)).any(0))
    y = np.multiply(rows[source(taps[0, selected])], weights[0, selected, None, None])
    for tap, weight in zip(taps[1:], weights[1:]):
      y += rows[source(tap[selected])] * weight[selected, None, None]
    y += (fill_weight[selected] * background)[:, None, None]
  else:
    selected = np.flatnonzero(nearest_inside & active[nearest])
    y = rows[source(nearest[selected])]
  return selected, y


def _transform(x: np.ndarray, background: float, k: int, mirror: bool,
               flip_axis2: bool, linear: bool, channels=None) -> np.ndarray:
  """One (D, H, W, C) array through the plane map, the axis-2 flip and a
  channel permutation; the background is also the fill value."""
  x = np.ascontiguousarray(x)
  d, h, w, c = x.shape
  rows = x.reshape(d * h, w * c)
  background = x.dtype.type(background)
  # Rows that hold something other than the background. Masks are never
  # below it (0), so their maximum tells; ct and target get both ends.
  active = rows.max(1) != background
  if linear:
    active |= rows.min(1) != background
  selected, y = _resample_rows(rows.reshape(d * h, w, c), active, background, d, h,
                               k, mirror, linear)
  if flip_axis2:
    y = y[:, ::-1]
  if channels is not None:
    y = y[..., channels]
  out = np.zeros((d * h, w, c), x.dtype) if background == 0 else np.full(
      (d * h, w, c), background, x.dtype)
  out[selected] = y
  return out.reshape(d, h, w, c)


def transform(example: dict, *, k: int = 0, mirror: bool = False,
              flip_axis2: bool = False, swap_parotids: bool = True,
              ct_fill: float = -1.024) -> dict:
  """Rotate by k * 40 degrees about axis 2, then optionally mirror axis 1
  (left/right) and flip axis 2 (superior/inferior).

  Args:
    example: dict of (D, H, W, C) float32 arrays (`encoding.KEYS`).
    k: rotation steps of 40 degrees, 0..8.
    mirror: flip axis 1; with swap_parotids, also swap the parotid channels.
    flip_axis2: flip axis 2.
    swap_parotids: see mirror.
    ct_fill: the encoded ct of air (`air_value(config.data)`): the ct
      background and the value of voxels from outside the grid.

  Returns:
    A new dict; the arrays of the example are not modified.
  """
  k = int(k) % NUM_ANGLES
  if not (k or mirror or flip_axis2):
    return dict(example)
  out = dict(example)
  for key in encoding.KEYS:
    if key not in example:
      continue
    channels = None
    if key == "oar" and mirror and swap_parotids:
      channels = list(range(example[key].shape[-1]))
      right, left = PAROTID_CHANNELS
      channels[right], channels[left] = left, right
    out[key] = _transform(example[key], ct_fill if key == "ct" else 0.0, k, mirror,
                          flip_axis2, key in _LINEAR_KEYS, channels)
  return out


def flip_lr(example: dict, swap_parotids: bool = True) -> dict:
  """Mirror along axis 1 (patient left/right)."""
  return transform(example, mirror=True, swap_parotids=swap_parotids)


def flip_si(example: dict) -> dict:
  """Mirror along axis 2 (superior/inferior)."""
  return transform(example, flip_axis2=True)


def rotate(example: dict, k: int, ct_fill: float) -> dict:
  """Rotate by k * 40 degrees about axis 2 (see `transform`)."""
  return transform(example, k=k, ct_fill=ct_fill)


def draw(rng: np.random.Generator, data_config) -> tuple[int, bool, bool]:
  """(k, mirror, flip_axis2) of a random augmentation, as `augment_example`
  draws them (same order, same stream)."""
  mirror = bool(rng.integers(2)) if data_config.flip_lr else False
  flip_axis2 = bool(rng.integers(2)) if data_config.flip_si else False
  k = int(rng.integers(NUM_ANGLES)) if data_config.rotate else 0
  return k, mirror, flip_axis2


def augment_example(example: dict, rng: np.random.Generator, data_config) -> dict:
  """A random geometry-consistent augmentation, as `config.data` switches it.

  Draws, in this order: left/right flip (p = 1/2, if `flip_lr`), superior/
  inferior flip (p = 1/2, if `flip_si`), rotation k in 0..8 (uniform, if
  `rotate`). With `augment` False, returns the example unchanged.
  """
  if not data_config.augment:
    return example
  k, mirror, flip_axis2 = draw(rng, data_config)
  return transform(example, k=k, mirror=mirror, flip_axis2=flip_axis2,
                   swap_parotids=data_config.swap_parotids,
                   ct_fill=air_value(data_config))


# ------------------------------------------------------ planes and row packs
#
# The training pipeline's fast path (full resolution, downsample 1). A
# patient becomes three planes-by-rows arrays (a row = the w voxels along
# axis 2 of one (axis 0, axis 1) pixel):
#   ct      float32, encoded (as `encoding.encode_patient`), air elsewhere;
#   target  float32, dose / dose_scale;
#   codes   uint16, every 0/1 channel in one bit each: OAR channel c in bit c
#           (0..6), the possible-dose mask in bit MASK_BIT, PTV56, PTV63,
#           PTV70 in bits PTV_SHIFT + 0, 1, 2.
# Each holds only its active rows (those with something other than its
# background, found from the sparse voxel lists) plus one background row
# last; `<key>_map` (d*h,) says which row holds each pixel. Nine mask
# channels are thus rotated with one nearest-voxel gather of 2-byte values
# instead of nine of 4-byte values, the parotid swap of a flip is a bit swap,
# and nothing of the size of a dense volume is allocated.
#
# The transform of planes (`transform_planes`) gives a row pack: for each
# array, the output rows that are not entirely background (int32 (S,)) and
# their values (S, w); every other row is background. At 128^3 a pack is a
# few MB (a float32 example is 92 MB), which is what crosses from the
# worker processes to the main process; `pipeline.unpack_batch` makes the
# float32 channels there. The values equal those of `transform` on the
# `encoding.encode_patient` example bit for bit (same gathers, same float32
# arithmetic in the same order; tests/test_data_augment.py checks it).

PACKED_KEYS = ("ct", "target", "codes")
MASK_BIT = 7
PTV_SHIFT = 8
_LINEAR_PACKED = {"ct": True, "target": True, "codes": False}


def planes_from_sparse(patient: openkbp.SparsePatient, settings) -> dict:
  """The planes of one patient (see above) at its own grid.

  Args:
    patient: a `SparsePatient` (e.g. `PatientCache.sparse(i)`).
    settings: the encoding fields of `config.data` (ct_clip, ct_scale,
      dose_scale; ptv levels are applied at unpacking).

  Returns:
    dict: grid (d, h, w); ct, target (float32 (A + 1, w)); codes (uint16
    (A + 1, w)); for each, `<key>_active` bool (d*h,) and `<key>_map` int32
    (d*h,) (A: that array's active rows).
  """
  d, h, w = patient.grid_shape
  num_rows = d * h
  num_oars = len(openkbp.OAR_NAMES)
  planes = {"grid": (d, h, w)}
  # Row of a voxel: index // w, a shift when w is a power of two (int64
  # division is not vectorised and would cost more than the rest).
  shift = w.bit_length() - 1 if w & (w - 1) == 0 else None
  row_of = (lambda index: index >> shift) if shift is not None else (
      lambda index: index // w)

  def add(key, background, dtype, lists):
    """lists: (voxel index, values) of the voxels that are not background;
    values an array (set) or an int (bits to set)."""
    active = np.zeros(num_rows, bool)
    rows = [row_of(index) for index, _ in lists]
    for row in rows:
      active[row] = True
    # Only the active rows are stored, the background row last.
    stored = np.flatnonzero(active)
    row_map = np.full(num_rows, stored.size, np.int32)
    row_map[stored] = np.arange(stored.size, dtype=np.int32)
    values = np.full((stored.size + 1, w), background, dtype)
    flat = values.reshape(-1)
    for row, (index, value) in zip(rows, lists):
      position = row_map[row] * np.int64(w) + (index - row * w)
      if isinstance(value, np.ndarray):
        flat[position] = value
      else:
        flat[position] |= dtype(value)
    planes.update({key: values, key + "_active": active, key + "_map": row_map})

  lo, hi = settings.ct_clip
  scale = np.float32(settings.ct_scale)
  hu = lambda stored: np.clip(stored - np.float32(openkbp.CT_OFFSET), lo, hi)
  air = hu(np.float32(0)) / scale  # voxels absent from ct.csv
  ct_values = hu(patient.ct_value) / scale
  not_air = ct_values != air
  add("ct", air, np.float32, [(patient.ct_index[not_air], ct_values[not_air])])

  dose = []
  if patient.dose_index is not None:
    values = (patient.dose_value / settings.dose_scale).astype(np.float32)
    nonzero = values != 0
    dose.append((patient.dose_index[nonzero], values[nonzero]))
  add("target", 0, np.float32, dose)

  bits = [(index, 1 << c) for c, index in enumerate(patient.roi_index[:num_oars])]
  bits.append((patient.mask_index, 1 << MASK_BIT))
  bits += [(index, 1 << (PTV_SHIFT + j))
           for j, index in enumerate(patient.roi_index[num_oars:])]
  add("codes", 0, np.uint16, [(index, bit) for index, bit in bits if index.size])
  return planes


def _swap_bits(codes: np.ndarray, a: int, b: int) -> np.ndarray:
  one = codes.dtype.type(1)
  bit_a, bit_b = (codes >> a) & one, (codes >> b) & one
  keep = codes & codes.dtype.type(~((1 << a) | (1 << b)) & 0xFFFF)
  return keep | (bit_a << b) | (bit_b << a)


def transform_planes(planes: dict, *, k: int = 0, mirror: bool = False,
                     flip_axis2: bool = False, swap_parotids: bool = True,
                     ct_fill: float = -1.024) -> dict:
  """`transform` on planes (`planes_from_sparse`), giving a row pack.

  Returns:
    dict: grid int64 (3,); for each of `PACKED_KEYS`, `<key>_rows` int32 (S,)
    and `<key>` (S, w) (values of the output rows that hold something; all
    other output rows are background: ct_fill for ct, 0 otherwise).
  """
  k = int(k) % NUM_ANGLES
  d, h, w = planes["grid"]
  packed = {"grid": np.array([d, h, w], np.int64)}
  for key in PACKED_KEYS:
    rows = planes[key]
    background = rows.dtype.type(ct_fill if key == "ct" else 0)
    selected, y = _resample_rows(rows[..., None], planes[key + "_active"], background,
                                 d, h, k, mirror, _LINEAR_PACKED[key],
                                 row_map=planes[key + "_map"])
    y = y[:, ::-1, 0] if flip_axis2 else y[:, :, 0]
    if key == "codes" and mirror and swap_parotids:
      y = _swap_bits(y, *PAROTID_CHANNELS)
    packed[key + "_rows"] = selected.astype(np.int32)
    packed[key] = y
  return packed


def augment_planes(planes: dict, rng: np.random.Generator, data_config) -> dict:
  """`augment_example` for planes: the same draws, a row pack out (with
  `augment` False, the identity's pack)."""
  k, mirror, flip_axis2 = draw(rng, data_config) if data_config.augment else (0, False, False)
  return transform_planes(planes, k=k, mirror=mirror, flip_axis2=flip_axis2,
                          swap_parotids=data_config.swap_parotids,
                          ct_fill=air_value(data_config))
