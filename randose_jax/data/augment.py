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
_LINEAR_KEYS = ("ct", "target", "geom")  # interpolated; the rest are masks


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
    keep: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
  """The plane map applied to the rows of one array.

  Args:
    rows: (R, W, C), plane pixel r is row row_map[r] (int (d*h,)).
    active: bool (d*h,), the pixels whose row holds something other than the
      background; only output rows that read one of them are computed.
    background: the fill value, of rows' dtype.
    linear: bilinear (else nearest).
    keep: bool (d*h,), the output pixels wanted (a crop), or None for all.

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
    needed = (active[taps] & (weights > 0)).any(0)
    selected = np.flatnonzero(needed if keep is None else needed & keep)
    y = np.multiply(
        rows[row_map[taps[0, selected]]], weights[0, selected, None, None]
    )
    for tap, weight in zip(taps[1:], weights[1:]):
      y += rows[row_map[tap[selected]]] * weight[selected, None, None]
    y += (fill_weight[selected] * background)[:, None, None]
  else:
    needed = nearest_inside & active[nearest]
    selected = np.flatnonzero(needed if keep is None else needed & keep)
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
    crop: tuple | None = None,
) -> dict:
  """Rotate by k * 40 degrees about axis 2, then optionally mirror axis 1
  (left/right) and flip axis 2 (superior/inferior), then optionally crop.

  Args:
    planes: an example's planes (`encoding.encode_planes` or
      `encoding.planes_of`); never modified.
    data_config: `config.data` (the encoding fields give the background;
      `swap_parotids`: a mirror also swaps the parotid channels).
    k: rotation steps of 40 degrees, 0..8.
    mirror: flip axis 1.
    flip_axis2: flip axis 2.
    crop: (start, shape), each 3 ints: the part of the transformed grid
      kept (inside it); None keeps the whole grid.

  Returns:
    The pack of the transformed example (`encoding` module doc), grid
    (1, d, h, w) (the crop's shape with a crop): `encoding.unpack` gives
    its dense arrays.
  """
  k = int(k) % NUM_ANGLES
  d, h, w = planes["grid"]
  keep = None
  if crop is not None:
    (i0, j0, k0), (cd, ch, cw) = crop
    if not (0 <= i0 <= d - cd and 0 <= j0 <= h - ch and 0 <= k0 <= w - cw):
      raise ValueError(f"crop {crop} does not fit the grid {(d, h, w)}")
    plane = np.zeros((d, h), bool)
    plane[i0 : i0 + cd, j0 : j0 + ch] = True
    keep = plane.reshape(-1)
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
        keep,
    )
    if flip_axis2:
      y = y[:, ::-1]
    if mirror and data_config.swap_parotids and key in ("oar", "codes"):
      y = _swap_parotids(key, y)
    if crop is not None:
      i, j = np.divmod(selected, h)
      selected = (i - i0) * ch + (j - j0)
      y = y[:, k0 : k0 + cw]
    pack[key + "_rows"] = selected.astype(np.int32)
    pack[key] = y
  if crop is not None:
    pack["grid"] = np.array([1, cd, ch, cw], np.int64)
  return pack


def _mask_pixels(planes: dict) -> tuple[np.ndarray, np.ndarray]:
  """(bool (d*h,), bool (w,)): the plane pixels and the axis-2 positions
  where the possible-dose mask has a voxel (codes at downsample 1, else
  the mask channel)."""
  key = "codes" if "codes" in planes else "mask"
  rows = planes[key][..., 0]
  if key == "codes":
    inside = (rows >> encoding.MASK_BIT) & 1 != 0
  else:
    inside = rows > 0
  row_has = inside.any(1)
  pixels = planes[key + "_active"] & row_has[planes[key + "_map"]]
  return pixels, inside.any(0)


def mask_box(
    planes: dict, k: int = 0, mirror: bool = False, flip_axis2: bool = False
):
  """(lo, hi) int (3,), inclusive: the bounding box of the possible-dose
  mask after `transform(k, mirror, flip_axis2)` (nearest pixels), or None
  for an empty mask."""
  d, h, _ = planes["grid"]
  pixels, along = _mask_pixels(planes)
  nearest, nearest_inside, *_ = _plane_map(int(k) % NUM_ANGLES, d, h, mirror)
  out = (nearest_inside & pixels[nearest]).reshape(d, h)
  if flip_axis2:
    along = along[::-1]
  if not out.any() or not along.any():
    return None
  ii, jj = np.flatnonzero(out.any(1)), np.flatnonzero(out.any(0))
  kk = np.flatnonzero(along)
  return (
      np.array([ii[0], jj[0], kk[0]]),
      np.array([ii[-1], jj[-1], kk[-1]]),
  )


CROP_PLACEMENTS = ("inside", "centre")


def draw_crop(
    rng: np.random.Generator, box, grid, shape, placement: str = "inside"
) -> tuple:
  """(start, shape) of a random crop placed around a box, per axis: a crop
  longer than the box holds all of it (start uniform over the positions
  that do); a shorter one lies inside it (start uniform; `placement`
  'inside'), or has its centre uniform in the box ('centre': the box's
  ends are seen as often as with half a crop of margin, not only at a
  crop's border); always inside the grid. box None (empty mask): the
  centred crop."""
  if placement not in CROP_PLACEMENTS:
    raise ValueError(
        f"config.data.crop_placement={placement!r}: choose from "
        f"{CROP_PLACEMENTS}"
    )
  start = []
  for axis, (n, c) in enumerate(zip(grid, shape)):
    if box is None:
      start.append((n - c) // 2)
      continue
    lo, hi = int(box[0][axis]), int(box[1][axis])
    if c >= hi - lo + 1:
      first, last = hi - c + 1, lo
    elif placement == "centre":
      first, last = lo - c // 2, hi - c // 2
    else:
      first, last = lo, hi - c + 1
    first, last = max(first, 0), min(last, n - c)
    if first > last:  # cannot happen for a box inside the grid; be safe
      first = last = min(max(first, 0), n - c)
    start.append(int(rng.integers(first, last + 1)))
  return tuple(start), tuple(int(c) for c in shape)


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
  `config.data.augment` False, of the example unchanged. With
  `config.data.crop_shape`, then a random crop around the transformed
  possible-dose mask (`draw_crop`, drawn after the augmentation)."""
  k, mirror, flip_axis2 = (
      draw(rng, data_config) if data_config.augment else (0, False, False)
  )
  crop = None
  shape = tuple(data_config.get("crop_shape", ()) or ())
  if shape:
    box = mask_box(planes, k, mirror, flip_axis2)
    crop = draw_crop(
        rng,
        box,
        planes["grid"],
        shape,
        data_config.get("crop_placement", "inside"),
    )
  return transform(
      planes,
      data_config,
      k=k,
      mirror=mirror,
      flip_axis2=flip_axis2,
      crop=crop,
  )
