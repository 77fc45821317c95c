"""Geometry-consistent augmentation of encoded examples (docs/design.md section 1).

Every plan uses nine coplanar beams at 0, 40, ..., 320 degrees about axis 2,
so these maps send the beam set onto itself and keep the dose physically
plausible:
  - left/right flip (axis 1), swapping the RightParotid and LeftParotid OAR
    channels (2 and 3) when `config.data.swap_parotids`, so the channels keep
    their names;
  - superior/inferior flip (axis 2);
  - rotation by k * 40 degrees (k = 0..8) about axis 2, i.e. in the
    (axis 0, axis 1) plane, the same for every axis-2 slice, about the grid
    centre. ct and target are interpolated bilinearly; ptv, oar, mask and
    codes take the nearest voxel, so masks stay masks. Voxels that come from
    outside the grid are background (`encoding.background`: air for ct, 0
    otherwise).

It acts on the packed form (`encoding` module doc): planes in, a pack out.
All three maps act on the (axis 0, axis 1) plane or reverse axis 2, so every
output row comes from one source row (nearest) or four (bilinear), with
weights that depend only on (angle, plane shape, mirror) and are computed
once and cached. Only the active rows are read and only output rows that
hold something are computed: the head fills a fraction of the plane and the
OARs far less. Nine mask channels packed as bits are rotated with one
nearest-row gather, and the parotid swap is then a bit swap.
"""

from __future__ import annotations

import functools

import numpy as np

from randose_jax import conventions
from randose_jax.data import encoding

ANGLE_STEP_DEGREES = 40
NUM_ANGLES = 360 // ANGLE_STEP_DEGREES  # 9 beam-aligned rotations
_LINEAR_KEYS = ("ct", "target")  # interpolated; the rest are masks


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
  i, j = np.meshgrid(
      np.arange(d, dtype=np.float64),
      np.arange(h, dtype=np.float64),
      indexing="ij",
  )
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
  for di, dj, w in (
      (0, 0, (1 - fi) * (1 - fj)),
      (1, 0, fi * (1 - fj)),
      (0, 1, (1 - fi) * fj),
      (1, 1, fi * fj),
  ):
    ti, tj = i0 + di, j0 + dj
    ok = inside(ti, tj)
    taps.append(np.where(ok, ti * h + tj, 0).astype(np.int64))
    weights.append(np.where(ok, w, 0.0))
    fill_weight += np.where(ok, 0.0, w)
  tables = (
      nearest,
      nearest_inside,
      np.array(taps),
      np.array(weights, np.float32),
      fill_weight.astype(np.float32),
  )
  for table in tables:
    table.flags.writeable = False
  return tables


def _resample_rows(
    rows: np.ndarray,
    row_map: np.ndarray,
    active: np.ndarray,
    background,
    d: int,
    h: int,
    k: int,
    mirror: bool,
    linear: bool,
) -> tuple[np.ndarray, np.ndarray]:
  """The plane map applied to the rows of one array.

  Args:
    rows: (R, W, C), plane pixel r is row row_map[r] (int (d*h,)).
    active: bool (d*h,), the pixels whose row holds something other than the
      background; only output rows that read one of them are computed.
    background: the fill value, of rows' dtype.
    linear: bilinear (else nearest).

  Returns:
    (selected int64 (S,), values (S, W, C)): the output rows that are not
    entirely background and their values; every other output row is
    background.
  """
  nearest, nearest_inside, taps, weights, fill_weight = _plane_map(
      k, d, h, mirror
  )
  if linear and k:
    # An output row needs computing if any of its taps holds something.
    selected = np.flatnonzero((active[taps] & (weights > 0)).any(0))
    y = np.multiply(
        rows[row_map[taps[0, selected]]], weights[0, selected, None, None]
    )
    for tap, weight in zip(taps[1:], weights[1:]):
      y += rows[row_map[tap[selected]]] * weight[selected, None, None]
    y += (fill_weight[selected] * background)[:, None, None]
  else:
    selected = np.flatnonzero(nearest_inside & active[nearest])
    y = rows[row_map[nearest[selected]]]
  return selected, y


def _swap_parotids(key: str, y: np.ndarray) -> np.ndarray:
  """Rows (S, W, C) of oar or codes with the two parotids exchanged."""
  right, left = conventions.PAROTID_CHANNELS
  if key == "oar":
    channels = list(range(y.shape[-1]))
    channels[right], channels[left] = left, right
    return y[..., channels]
  one = y.dtype.type(1)
  bit_right, bit_left = (y >> right) & one, (y >> left) & one
  keep = y & y.dtype.type(~((1 << right) | (1 << left)) & 0xFFFF)
  return keep | (bit_right << left) | (bit_left << right)


def transform(
    planes: dict,
    data_config,
    *,
    k: int = 0,
    mirror: bool = False,
    flip_axis2: bool = False,
) -> dict:
  """Rotate by k * 40 degrees about axis 2, then optionally mirror axis 1
  (left/right) and flip axis 2 (superior/inferior).

  Args:
    planes: an example's planes (`encoding.encode_planes` or
      `encoding.planes_of`); never modified.
    data_config: `config.data` (the encoding fields give the background;
      `swap_parotids`: a mirror also swaps the parotid channels).
    k: rotation steps of 40 degrees, 0..8.
    mirror: flip axis 1.
    flip_axis2: flip axis 2.

  Returns:
    The pack of the transformed example (`encoding` module doc), grid
    (1, d, h, w): `encoding.unpack` gives its dense arrays.
  """
  k = int(k) % NUM_ANGLES
  d, h, w = planes["grid"]
  pack = {"grid": np.array([1, d, h, w], np.int64)}
  for key in encoding.ARRAY_KEYS:
    if key not in planes:
      continue
    rows = planes[key]
    empty = rows.dtype.type(encoding.background(key, data_config))
    selected, y = _resample_rows(
        rows,
        planes[key + "_map"],
        planes[key + "_active"],
        empty,
        d,
        h,
        k,
        mirror,
        key in _LINEAR_KEYS,
    )
    if flip_axis2:
      y = y[:, ::-1]
    if mirror and data_config.swap_parotids and key in ("oar", "codes"):
      y = _swap_parotids(key, y)
    pack[key + "_rows"] = selected.astype(np.int32)
    pack[key] = y
  return pack


def draw(rng: np.random.Generator, data_config) -> tuple[int, bool, bool]:
  """(k, mirror, flip_axis2) of a random augmentation as `config.data`
  switches it. Draws, in this order: left/right flip (p = 1/2, if
  `flip_lr`), superior/inferior flip (p = 1/2, if `flip_si`), rotation k in
  0..8 (uniform, if `rotate`)."""
  mirror = bool(rng.integers(2)) if data_config.flip_lr else False
  flip_axis2 = bool(rng.integers(2)) if data_config.flip_si else False
  k = int(rng.integers(NUM_ANGLES)) if data_config.rotate else 0
  return k, mirror, flip_axis2


def augment_planes(planes: dict, rng: np.random.Generator, data_config) -> dict:
  """The pack of a random augmentation (`draw`) of the planes; with
  `config.data.augment` False, of the example unchanged."""
  k, mirror, flip_axis2 = (
      draw(rng, data_config) if data_config.augment else (0, False, False)
  )
  return transform(
      planes, data_config, k=k, mirror=mirror, flip_axis2=flip_axis2
  )
