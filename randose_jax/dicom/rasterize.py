"""RTSTRUCT contours -> masks on the CT's own grid, and resampling onto the
import grid.

Rasterising: each CLOSED_PLANAR contour is a polygon on one CT slice; a pixel
is inside when its centre is (matplotlib.path, the polygon test matplotlib
itself uses). The contours of one slice are combined by XOR, so an inner
contour cuts a hole and separate contours add. POINT and OPEN_* contours,
contours with fewer than three points and contours off the CT slices are
skipped with a warning.

Resampling (both grids in the project's axis order, so every map is
separable): CT and dose linearly (`resample_linear`,
scipy.ndimage.affine_transform, order 1); masks as occupancy fractions
(`occupancy`: the overlap of each source voxel with each target voxel, per
axis), which the importer thresholds at 0.5.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from randose_jax.dicom import series

# A contour's points may leave their slice plane by this fraction of a slice.
PLANARITY_TOLERANCE = 0.1


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


def contour_polygons(roi_contour, grid: series.StoredGrid, name: str):
  """The closed contours of one ROIContourSequence item, in stored indices.

  Returns:
    ([(slice index, (n, 2) row/column coordinates)], warnings).
  """
  polygons, warnings, skipped = [], [], {}
  for contour in roi_contour.get("ContourSequence", []) or []:
    kind = str(contour.get("ContourGeometricType", "CLOSED_PLANAR")).upper()
    data = np.array([float(v) for v in contour.get("ContourData", []) or []])
    if kind != "CLOSED_PLANAR" or data.size < 9 or data.size % 3:
      key = kind if kind != "CLOSED_PLANAR" else "fewer than 3 points"
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
    polygons.append((slice_index, index[:, 1:]))
  for why, n in skipped.items():
    warnings.append(f"{name}: {n} contour(s) skipped ({why})")
  return polygons, warnings


def rasterize(polygons, grid: series.StoredGrid) -> StoredMask | None:
  """Fills polygons (from `contour_polygons`) on the stored grid, XOR per
  slice; None when no pixel centre is inside any of them."""
  from matplotlib.path import Path as MplPath

  if not polygons:
    return None
  ks = [k for k, _ in polygons]
  points = np.concatenate([p for _, p in polygons])
  lo = np.maximum(np.floor(points.min(axis=0)).astype(int), 0)
  hi = np.minimum(np.ceil(points.max(axis=0)).astype(int) + 1, grid.shape[1:])
  if np.any(hi <= lo):
    return None
  start = np.array([min(ks), lo[0], lo[1]])
  mask = np.zeros((max(ks) - min(ks) + 1, hi[0] - lo[0], hi[1] - lo[1]), bool)
  for k, poly in polygons:
    p_lo = np.maximum(np.ceil(poly.min(axis=0)).astype(int), lo)
    p_hi = np.minimum(np.floor(poly.max(axis=0)).astype(int) + 1, hi)
    if np.any(p_hi <= p_lo):
      continue
    rr, cc = np.meshgrid(
        np.arange(p_lo[0], p_hi[0]), np.arange(p_lo[1], p_hi[1]), indexing="ij"
    )
    inside = (
        MplPath(poly)
        .contains_points(np.stack([rr.ravel(), cc.ravel()], axis=1))
        .reshape(rr.shape)
    )
    mask[
        k - start[0],
        p_lo[0] - lo[0] : p_hi[0] - lo[0],
        p_lo[1] - lo[1] : p_hi[1] - lo[1],
    ] ^= inside
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
