"""RTSTRUCT contours -> masks on the CT's own grid, and resampling onto the
import grid.

Rasterising (`rasterize`): each CLOSED_PLANAR contour is a polygon on one CT
slice. Per slice, a pixel is in when its centre is strictly inside an odd
number of the slice's contours (an inner contour cuts a hole, separate
contours add: a scanline fill), or lies on one of them (within
`ON_CONTOUR_TOLERANCE` pixels). The second rule is for mask exporters
(rt-utils, platipy, most auto-contouring pipelines), which trace the centres
of the boundary pixels: without it the boundary ring falls out. Contours
drawn around pixel edges or freely (planning systems) pass no centre, so for
them the first rule decides alone. A contour of one or two points is the
pixel nearest each point of it (a one-pixel island, a one-pixel-wide line).
This is what rt-utils' own reader gives back (OpenCV's fillPoly, edges
included); `benchmarks/dicom_interop.py` holds the comparison with the other
readers. POINT and OPEN_* contours, contours off the slice planes, between
the CT's slices (by over a tenth of a slice) and beyond them are skipped
with a warning. ContourData is read as numbers
however it is stored (VR UN for a value over 64 KB in an explicit-VR file),
counted before it is parsed: a contour of more points, or a longer outline,
than its slice could need, or a value that is not a finite number, is an
error naming the file (`contour_values`, `contour_polygons`).

Resampling (both grids in the project's axis order, so every map is
separable): CT and dose linearly (`resample_linear`,
scipy.ndimage.affine_transform, order 1); masks as occupancy fractions
(`occupancy`: the overlap of each source voxel with each target voxel, per
axis), which the importer thresholds at 0.5.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from randose_jax.dicom import DicomError, series

# A contour's points may leave their slice plane by this fraction of a slice.
PLANARITY_TOLERANCE = 0.1
# A pixel whose centre lies this close to a contour (in pixels) is on it.
ON_CONTOUR_TOLERANCE = 0.01
# A contour may have at most this many points per pixel of its slice (an
# outline through every pixel corner, twice, needs 2 per pixel), or
# MIN_POINT_LIMIT on a small image; its outline as many pixel steps.
MAX_POINTS_PER_PIXEL = 4
MIN_POINT_LIMIT = 200_000
CONTOUR_DATA = 0x30060050


@dataclasses.dataclass
class StoredMask:
  """A structure's mask on part of the CT's stored grid.

  Attributes:
    start: int (3,) stored index of mask[0, 0, 0].
    mask: bool (slices, rows, columns) of the box.
  """

  start: np.ndarray
  mask: np.ndarray

  @property
  def stop(self) -> np.ndarray:
    return self.start + np.array(self.mask.shape)

  def count(self) -> int:
    return int(np.count_nonzero(self.mask))


def contour_values(contour, max_values: int, where: str) -> np.ndarray:
  """float64 ContourData of one ContourSequence item, however it was
  stored: decimal strings (DS), or the same bytes under VR UN (a value over
  64 KB in an explicit-VR file). The values are counted before they are
  parsed, so that an absurd contour is refused in bounded memory.

  Raises:
    DicomError (`where` names the file and the contour): more than
    `max_values` values, a value that is not a finite number.
  """
  if CONTOUR_DATA not in contour:
    return np.zeros(0)
  value = contour.get_item(CONTOUR_DATA).value
  if value is None:
    return np.zeros(0)
  if isinstance(value, bytes):
    text = value.strip(b"\0 ")
    count = text.count(b"\\") + 1 if text else 0
    values = (lambda: text.split(b"\\")) if count else list
  else:
    many = not isinstance(value, (str, float, int))
    count = len(value) if many else 1
    values = (lambda: list(value)) if many else (lambda: [value])
  if count > max_values:
    raise DicomError(
        f"{where}: ContourData has {count // 3:,} points, more than a slice "
        f"could need (at most {max_values // 3:,})"
    )
  raw = values()
  try:
    data = np.array(raw, dtype=np.float64)
  except (TypeError, ValueError):
    data = None
  if data is None or not np.all(np.isfinite(data)):
    bad = next(v for v in raw if not _finite(v))
    if isinstance(bad, bytes):
      bad = bad.decode("ascii", "replace")
    raise DicomError(
        f"{where}: ContourData value {str(bad)!r} is not a finite number"
    )
  return data


def _finite(value) -> bool:
  try:
    return bool(np.isfinite(float(value)))
  except (TypeError, ValueError):
    return False


def contour_polygons(roi_contour, grid: series.StoredGrid, name: str, path=""):
  """The closed contours of one ROIContourSequence item, in stored indices.

  Returns:
    ([(slice index, (n, 2) row/column coordinates)], warnings); a contour
    may have one or two points (a pixel, a line of pixels).

  Raises:
    DicomError naming `path`: see `contour_values`.
  """
  polygons, warnings, skipped = [], [], {}
  max_values = 3 * max(
      MIN_POINT_LIMIT,
      MAX_POINTS_PER_PIXEL * (grid.shape[1] + 1) * (grid.shape[2] + 1),
  )
  for i, contour in enumerate(roi_contour.get("ContourSequence", []) or []):
    kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper()
    data = contour_values(
        contour, max_values, f"{path}: ROI {name!r}, contour {i + 1}"
    )
    if kind != "CLOSED_PLANAR" or data.size < 3 or data.size % 3:
      key = kind if kind != "CLOSED_PLANAR" else "no point triplets"
      skipped[key] = skipped.get(key, 0) + 1
      continue
    index = grid.lps_to_index(data.reshape(-1, 3))
    k = index[:, 0]
    if np.ptp(k) > PLANARITY_TOLERANCE:
      skipped["not in a CT slice plane"] = (
          skipped.get("not in a CT slice plane", 0) + 1
      )
      continue
    slice_index = int(np.rint(k.mean()))
    if not 0 <= slice_index < grid.shape[0]:
      skipped["outside the CT's slices"] = (
          skipped.get("outside the CT's slices", 0) + 1
      )
      continue
    if abs(k.mean() - slice_index) > PLANARITY_TOLERANCE:
      # Drawn on another series' slices: two such contours would meet on
      # one CT slice and cancel (XOR), so none is moved.
      skipped["between the CT's slices"] = (
          skipped.get("between the CT's slices", 0) + 1
      )
      continue
    in_plane = index[:, 1:]
    steps = path_length(in_plane, (0, 0), grid.shape[1:])
    if steps > max_values // 3:
      raise DicomError(
          f"{path}: ROI {name!r}, contour {i + 1}: its outline crosses "
          f"{steps:,} pixels of a {grid.shape[1]} x {grid.shape[2]} slice, "
          f"more than a slice could need ({max_values // 3:,})"
      )
    polygons.append((slice_index, in_plane))
  for why, n in skipped.items():
    warnings.append(f"{name}: {n} contour(s) skipped ({why})")
  return polygons, warnings


def _segment_steps(p0, p1, axis, tolerance, lo, hi):
  """Per segment p0 -> p1 (n, 2), the integers t along `axis` (per segment)
  within `tolerance` of its extent, clipped to [lo, hi): (segment ids, t)."""
  a, b = p0[:, axis], p1[:, axis]
  first = np.maximum(np.ceil(np.minimum(a, b) - tolerance), lo)
  last = np.minimum(np.floor(np.maximum(a, b) + tolerance), hi - 1)
  n = np.maximum(last - first + 1, 0).astype(np.int64)
  which = np.repeat(np.arange(len(p0)), n)
  t = first[which].astype(np.int64) + (
      np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n)
  )
  return which, t


def path_length(points: np.ndarray, lo, hi) -> int:
  """The pixel steps a closed path through `points` (n, 2) takes within
  rows [lo[0], hi[0]) and columns [lo[1], hi[1]): a bound on the work of
  `path_pixels` and `_parity_fill`."""
  p0, p1 = points, np.roll(points, -1, axis=0)
  total = 0
  for axis in (0, 1):
    a, b = p0[:, axis], p1[:, axis]
    first = np.maximum(np.ceil(np.minimum(a, b) - 0.5), lo[axis])
    last = np.minimum(np.floor(np.maximum(a, b) + 0.5), hi[axis] - 1)
    total += int(np.maximum(last - first + 1, 0).sum())
  return total


def path_pixels(points: np.ndarray, tolerance: float, lo, hi) -> np.ndarray:
  """int (m, 2) pixels (row, column) within rows [lo[0], hi[0]) and columns
  [lo[1], hi[1]) whose centres lie within `tolerance` (pixels, along each
  segment's minor axis) of the closed path through `points` (n, 2); a
  tolerance of 0.5 takes the pixel nearest to every point of the path (a
  line of pixels; one pixel for one point)."""
  p0, p1 = points, np.roll(points, -1, axis=0)
  d = p1 - p0
  major = np.argmax(np.abs(d), axis=1)
  out = []
  for axis in (0, 1):
    sel = np.flatnonzero(major == axis)
    which, t = _segment_steps(
        p0[sel], p1[sel], axis, tolerance, lo[axis], hi[axis]
    )
    which = sel[which]
    dm = d[which, axis]
    s = np.clip(
        np.divide(t - p0[which, axis], dm, out=np.zeros(len(t)), where=dm != 0),
        0,
        1,
    )
    at = p0[which] + s[:, None] * d[which]
    m = at[:, 1 - axis]
    near = (
        (np.abs(m - np.rint(m)) <= tolerance)
        & (np.abs(at[:, axis] - t) <= tolerance)
        & (np.rint(m) >= lo[1 - axis])
        & (np.rint(m) < hi[1 - axis])
    )
    pixels = np.empty((int(near.sum()), 2), np.int64)
    pixels[:, axis] = t[near]
    pixels[:, 1 - axis] = np.rint(m[near])
    out.append(pixels)
  return np.concatenate(out)


def _parity_fill(polygons, lo, hi) -> np.ndarray:
  """bool (hi - lo): pixels whose centres are strictly inside an odd number
  of the polygons ((n, 2) row/column points each): a scanline fill, its work
  bounded by the polygons' `path_length`."""
  rows, xs = [], []
  for poly in polygons:
    p0, p1 = poly, np.roll(poly, -1, axis=0)
    a, b = p0[:, 0], p1[:, 0]
    # Rows r with min(a, b) <= r < max(a, b): each crossing counted once.
    first = np.maximum(np.ceil(np.minimum(a, b)), lo[0])
    last = np.minimum(np.ceil(np.maximum(a, b)) - 1, hi[0] - 1)
    n = np.maximum(last - first + 1, 0).astype(np.int64)
    which = np.repeat(np.arange(len(p0)), n)
    r = first[which] + (np.arange(n.sum()) - np.repeat(np.cumsum(n) - n, n))
    f = (r - a[which]) / (b[which] - a[which])
    rows.append(r.astype(np.int64))
    xs.append(p0[which, 1] + f * (p1[which, 1] - p0[which, 1]))
  shape = (hi[0] - lo[0], hi[1] - lo[1])
  out = np.zeros(shape, bool)
  if not rows:
    return out
  rows, xs = np.concatenate(rows), np.concatenate(xs)
  order = np.lexsort((xs, rows))
  rows, xs = rows[order], xs[order]
  # Pair the crossings of each row in order: (1st, 2nd), (3rd, 4th), ...
  rank = np.arange(len(rows)) - np.searchsorted(rows, rows)
  start = rank % 2 == 0
  pair_end = np.flatnonzero(start) + 1
  ok = pair_end < len(rows)
  begin = np.flatnonzero(start)[ok]
  end = pair_end[ok]
  ok = rows[begin] == rows[end]
  begin, end = begin[ok], end[ok]
  c0 = np.clip(np.floor(xs[begin]) + 1, lo[1], hi[1]).astype(np.int64)
  c1 = np.clip(np.ceil(xs[end]), lo[1], hi[1]).astype(np.int64)
  keep = c1 > c0
  diff = np.zeros((shape[0], shape[1] + 1), np.int32)
  np.add.at(diff, (rows[begin][keep] - lo[0], c0[keep] - lo[1]), 1)
  np.add.at(diff, (rows[begin][keep] - lo[0], c1[keep] - lo[1]), -1)
  return np.cumsum(diff, axis=1)[:, :-1] > 0


def rasterize(polygons, grid: series.StoredGrid) -> StoredMask | None:
  """Fills polygons (from `contour_polygons`) on the stored grid; None when
  no pixel is in any of them.

  Per slice, a pixel is in when its centre is inside an odd number of the
  slice's contours (an inner contour cuts a hole), or lies on one of them
  (within `ON_CONTOUR_TOLERANCE`): a mask exporter traces the centres of the
  boundary pixels, inner boundaries included, and those pixels are part of
  the structure (what rt-utils' own reader gives back). A contour of one or
  two points is the pixel nearest to each of its points (one pixel, a line
  of pixels).
  """
  if not polygons:
    return None
  ks = [k for k, _ in polygons]
  points = np.concatenate([p for _, p in polygons])
  lo = np.clip(np.floor(points.min(axis=0)) - 1, 0, grid.shape[1:])
  hi = np.clip(np.ceil(points.max(axis=0)) + 2, 0, grid.shape[1:])
  lo, hi = lo.astype(np.int64), hi.astype(np.int64)
  if np.any(hi <= lo):
    return None
  start = np.array([min(ks), lo[0], lo[1]])
  mask = np.zeros((max(ks) - min(ks) + 1, *(hi - lo)), bool)
  by_slice: dict[int, list] = {}
  for k, poly in polygons:
    by_slice.setdefault(k, []).append(poly)
  for k, polys in by_slice.items():
    closed = [p for p in polys if len(p) >= 3]
    plane = _parity_fill(closed, lo, hi)
    for poly in polys:
      tolerance = ON_CONTOUR_TOLERANCE if len(poly) >= 3 else 0.5
      pixels = path_pixels(poly, tolerance, lo, hi) - lo
      plane[pixels[:, 0], pixels[:, 1]] = True
    mask[k - start[0]] = plane
  if not mask.any():
    return None
  # Trim to the filled voxels.
  nz = [
      np.flatnonzero(mask.any(axis=tuple(a for a in range(3) if a != axis)))
      for axis in range(3)
  ]
  trim = tuple(slice(n[0], n[-1] + 1) for n in nz)
  return StoredMask(start + np.array([n[0] for n in nz]), mask[trim])


def _overlap_matrix(
    src_start: float,
    src_spacing: float,
    n_src: int,
    dst_start: float,
    dst_spacing: float,
    n_dst: int,
) -> np.ndarray:
  """(n_dst, n_src): the fraction of each target voxel's length covered by
  each source voxel (voxel centres at start + i * spacing)."""
  s = src_start + np.arange(n_src) * src_spacing
  d = dst_start + np.arange(n_dst) * dst_spacing
  lo = np.maximum(d[:, None] - dst_spacing / 2, s[None, :] - src_spacing / 2)
  hi = np.minimum(d[:, None] + dst_spacing / 2, s[None, :] + src_spacing / 2)
  return np.clip(hi - lo, 0, None) / dst_spacing


def occupancy(
    source: series.Volume, shape, target_spacing, target_origin
) -> np.ndarray:
  """float32 `shape`: the fraction of each target voxel covered by `source`
  (0/1 values; canonical axes on both sides)."""
  from randose_jax.conventions import AXIS_DIRECTIONS_LPS

  src_axis0 = source.axis_start()
  dst_axis0 = AXIS_DIRECTIONS_LPS @ np.asarray(target_origin, np.float64)
  out = source.array.astype(np.float32)
  ranges = []
  for axis in range(3):
    w = _overlap_matrix(
        src_axis0[axis],
        source.spacing[axis],
        out.shape[axis],
        dst_axis0[axis],
        target_spacing[axis],
        shape[axis],
    )
    rows = np.flatnonzero(w.any(axis=1))
    if rows.size == 0:
      return np.zeros(shape, np.float32)
    rows = np.arange(rows[0], rows[-1] + 1)
    ranges.append(rows)
    out = np.moveaxis(
        np.tensordot(w[rows].astype(np.float32), out, axes=([1], [axis])),
        0,
        axis,
    )
  full = np.zeros(shape, np.float32)
  full[
      ranges[0][0] : ranges[0][-1] + 1,
      ranges[1][0] : ranges[1][-1] + 1,
      ranges[2][0] : ranges[2][-1] + 1,
  ] = out
  return full


def canonical_mask(mask: StoredMask, grid: series.StoredGrid) -> series.Volume:
  """A stored mask box as a canonical `Volume` (float32 0/1)."""
  box = series.StoredGrid(
      mask.mask.shape,
      grid.directions,
      grid.spacing,
      grid.origin + (mask.start * grid.spacing) @ grid.directions,
  )
  return series.canonical(mask.mask, box)


def resample_linear(
    source: series.Volume, shape, target_spacing, target_origin, fill: float
) -> np.ndarray:
  """float32 `shape`: `source` sampled linearly at the target voxel centres
  (canonical axes on both sides); `fill` outside the source."""
  from scipy import ndimage

  from randose_jax.conventions import AXIS_DIRECTIONS_LPS

  dst_axis0 = AXIS_DIRECTIONS_LPS @ np.asarray(target_origin, np.float64)
  scale = np.asarray(target_spacing, np.float64) / source.spacing
  offset = (dst_axis0 - source.axis_start()) / source.spacing
  return ndimage.affine_transform(
      source.array.astype(np.float32),
      scale,
      offset=offset,
      output_shape=tuple(shape),
      order=1,
      mode="constant",
      cval=fill,
      prefilter=False,
  )
