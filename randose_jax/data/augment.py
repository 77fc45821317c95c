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


def _transform(x: np.ndarray, background: float, k: int, mirror: bool,
               flip_axis2: bool, linear: bool, channels=None) -> np.ndarray:
  """One (D, H, W, C) array through the plane map, the axis-2 flip and a
  channel permutation; the background is also the fill value."""
  x = np.ascontiguousarray(x)
  d, h, w, c = x.shape
  nearest, nearest_inside, taps, weights, fill_weight = _plane_map(k, d, h, mirror)
  rows = x.reshape(d * h, w * c)
  background = x.dtype.type(background)
  # Rows that hold something other than the background. Masks are never
  # below it (0), so their maximum tells; ct and target get both ends.
  active = rows.max(1) != background
  if linear:
    active |= rows.min(1) != background
  rows = rows.reshape(d * h, w, c)
  if linear and k:
    # An output row needs computing if any of its taps holds something.
    selected = np.flatnonzero((active[taps] & (weights > 0)).any(0))
    y = np.multiply(rows[taps[0, selected]], weights[0, selected, None, None])
    for tap, weight in zip(taps[1:], weights[1:]):
      y += rows[tap[selected]] * weight[selected, None, None]
    y += (fill_weight[selected] * background)[:, None, None]
  else:
    selected = np.flatnonzero(nearest_inside & active[nearest])
    y = rows[nearest[selected]]
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


def augment_example(example: dict, rng: np.random.Generator, data_config) -> dict:
  """A random geometry-consistent augmentation, as `config.data` switches it.

  Draws, in this order: left/right flip (p = 1/2, if `flip_lr`), superior/
  inferior flip (p = 1/2, if `flip_si`), rotation k in 0..8 (uniform, if
  `rotate`). With `augment` False, returns the example unchanged.
  """
  if not data_config.augment:
    return example
  mirror = bool(rng.integers(2)) if data_config.flip_lr else False
  flip_axis2 = bool(rng.integers(2)) if data_config.flip_si else False
  k = int(rng.integers(NUM_ANGLES)) if data_config.rotate else 0
  return transform(example, k=k, mirror=mirror, flip_axis2=flip_axis2,
                   swap_parotids=data_config.swap_parotids,
                   ct_fill=air_value(data_config))
