r"""The global gamma index in JAX: pymedphys's search, vectorised.

`gamma_index` computes, for each evaluated reference point x (Gy R(x)) and
each criterion (dose DD % of the global normalisation N, distance DTA mm),

  gamma(x) = min over offsets o of sqrt(|o|^2 / DTA^2
                                        + (E(x + o) - R(x))^2 / (DD N)^2)

with E the evaluated dose, linearly (trilinear) interpolated between its
voxels, exactly over the offsets `pymedphys.gamma` (0.41, `gamma_shell`)
tries with the options `clinical.gamma_maps` passes it: shells of radius 0,
s, 2 s, ... (s = DTA / interp_fraction, the radius DTA itself always one of
them) up to max_gamma x DTA, each shell's points on rings of elevation and
azimuth no more than s apart (`pymedphys_offsets`). An offset whose point
lies off the evaluated grid is skipped (pymedphys reads it as infinite
dose), decided as scipy does it to the last bit (`_on_grid`). Gamma above
max_gamma reads as max_gamma (pymedphys's clipping). So the values are
pymedphys's up to rounding (float32 here, float64 there).

How it is fast. Each voxel x is on the grid, so for a given offset the
trilinear weights and the corner voxels relative to x are the same for
every x: the interpolated doses of a block of K offsets at C points are one
matrix product, (C x w) patches of E around the points (w = the voxels of
the block's window) times (w x K) weights, in one jitted kernel that XLA
fuses with the minimum over the block (`_block_min`; the points near the
grid's faces, whose offsets may leave it, go through
`_block_min_near_faces`, which tests each offset and runs 4x slower).
Offsets are sorted by distance as pymedphys's shells are and taken in
blocks of growing size; a point stops searching once its gamma is <= d /
DTA, d the distance of the next block (no farther offset can lower it:
pymedphys's stop) or, with `stop_at_pass`, once it is < 1 (pymedphys's
`skip_once_passed`: pass / fail exact, the value then only known to be
< 1). Between blocks the host keeps only the points still searching, so the
cost follows the points that need a long search. The offset 0 (the dose
difference at the point) is done on the host for every point first. The
same code runs on a GPU (the matrix products at full float32 precision,
`jax.lax.Precision.HIGHEST`, not TF32). Several criteria share one device
copy of the evaluated dose.
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# pymedphys's default (its recommended DTA / 10 steps).
INTERP_FRACTION = 10
# Offsets per block: the first blocks are small (most points stop there).
_BLOCK_SIZES = (32, 128, 512, 2048)
# The most points one kernel call takes (x 2048 offsets: 64 MiB of float32
# if XLA did not fuse): few call shapes, met (and compiled) on the first
# patient rather than on the largest.
_CALL_POINTS = 2**13


def shell_offsets(distance: float, step: float) -> np.ndarray:
  """(K, 3) mm: pymedphys's points on the sphere of radius `distance`.

  Rows of elevation 0 to pi, each a ring of azimuths, no two neighbours
  more than `step` apart (`calculate_coordinates_shell_3d`'s formulas, so
  the same points to the last bit).
  """
  rows = int(np.ceil(np.pi * distance / step)) + 1
  elevation = np.linspace(0, np.pi, rows)
  radii = distance * np.sin(elevation)
  per_row = np.ceil(2 * np.pi * radii / step).astype(int) + 1
  out = []
  for phi, n in zip(elevation, per_row):
    azimuth = np.linspace(0, 2 * np.pi, n + 1)[:-1]
    out.append(
        np.stack(
            [
                distance * np.sin(phi) * np.cos(azimuth),
                distance * np.sin(phi) * np.sin(azimuth),
                distance * np.cos(phi) * np.ones_like(azimuth),
            ],
            axis=1,
        )
    )
  return np.concatenate(out)


def search_distances(
    distance_mm: float,
    max_gamma: float | None,
    interp_fraction: float = INTERP_FRACTION,
) -> Iterator[tuple[float, float]]:
  """pymedphys's shells, nearest first: (radius mm, step mm), up to
  max_gamma x distance_mm (endless when max_gamma is None)."""
  limit = math.inf if max_gamma is None else max_gamma * distance_mm
  slowest = math.inf if max_gamma is None else max_gamma
  base = distance_mm / interp_fraction
  step = base
  distance = 0.0
  forced = [distance_mm]  # pymedphys always tries the DTA itself
  while distance <= limit:
    yield distance, step
    step = max(distance / interp_fraction / slowest, base)
    distance += step
    if forced and distance >= forced[0]:
      distance = forced.pop(0)


def pymedphys_offsets(
    distance_mm: float,
    max_gamma: float | None,
    interp_fraction: float = INTERP_FRACTION,
) -> Iterator[tuple[np.ndarray, float]]:
  """(offsets (K, 3) mm, their radius) shell by shell, nearest first."""
  for distance, step in search_distances(
      distance_mm, max_gamma, interp_fraction
  ):
    yield shell_offsets(distance, step), distance


def _blocks(
    shells: Iterator[tuple[np.ndarray, float]],
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
  """The offsets in blocks of `_BLOCK_SIZES` (the last size repeated):
  (offsets (K, 3) mm, radii (K,)), the last block maybe shorter."""
  sizes = iter(_BLOCK_SIZES)
  size = next(sizes)
  held, radii, count = [], [], 0
  for offsets, distance in shells:
    held.append(offsets)
    radii.append(np.full(len(offsets), distance))
    count += len(offsets)
    while count >= size:
      offsets, distances = np.concatenate(held), np.concatenate(radii)
      yield offsets[:size], distances[:size]
      held, radii = [offsets[size:]], [distances[size:]]
      count -= size
      size = next(sizes, size)
  if count:
    yield np.concatenate(held), np.concatenate(radii)


def _window_weights(
    offsets: np.ndarray, spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """The trilinear weights of each offset on the voxels of its block's
  window: (low corner (3,) voxels, window shape (3,), weights (w, K))."""
  position = offsets / spacing  # voxels
  floor = np.floor(position)
  fraction = position - floor
  floor = floor.astype(int)
  low = floor.min(0)
  shape = floor.max(0) + 2 - low
  weights = np.zeros((*shape, len(offsets)))
  k = np.arange(len(offsets))
  for corner in np.ndindex(2, 2, 2):
    weight = np.prod(np.where(corner, fraction, 1 - fraction), axis=1)  # (K,)
    index = floor - low + corner
    np.add.at(weights, (*index.T, k), weight)
  return low, shape, weights.reshape(-1, len(offsets))


class _PaddedGrid:
  """The evaluated dose padded with zeros as far as the search has reached,
  flat, on the device (float32); the points' flat indices in it."""

  def __init__(self, evaluated: np.ndarray, coords: np.ndarray):
    self._evaluated = evaluated
    self._coords = coords
    self.pad = -1
    self._repad(2)

  def _repad(self, pad: int):
    padded = np.pad(self._evaluated, pad)  # read only by off-grid offsets
    self.strides = np.array(padded.strides) // padded.itemsize
    self.flat = jnp.asarray(padded.ravel(), jnp.float32)
    self.index = (self._coords + pad) @ self.strides
    self.pad = pad

  def reach(self, low: np.ndarray, shape: np.ndarray):
    """Pads further if a window (voxels low .. low + shape - 1 from each
    point) leaves the padding."""
    need = max(-low.min(), (low + shape - 1).max(), 0)
    if need > self.pad:
      self._repad(max(need, 2 * self.pad))


def _on_grid(
    offsets: np.ndarray, shape: Sequence[int], spacing: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
  """For each offset, the voxel indices from which it stays on the grid:
  (first (3, K), last (3, K)) int32 per axis.

  As scipy's `RegularGridInterpolator` (pymedphys's interpolation) decides
  it, to the last bit: i x spacing + offset (float64) neither below the
  first grid coordinate (0) nor above the last ((n - 1) x spacing).
  """
  first, last = [], []
  for axis, (n, v) in enumerate(zip(shape, spacing)):
    grid = np.arange(n + 2) * v  # grid[n], grid[n + 1]: guards
    top = grid[n - 1]
    o = offsets[:, axis]
    lo = np.clip(np.ceil(-o / v).astype(int), 0, n)
    hi = np.clip(np.floor((top - o) / v).astype(int), -1, n - 1)
    for _ in range(2):  # the estimates are off by one at most
      lo = np.where(
          (lo > 0) & (grid[np.maximum(lo - 1, 0)] + o >= 0), lo - 1, lo
      )
      lo = np.where((lo < n) & (grid[lo] + o < 0), lo + 1, lo)
      hi = np.where((hi < n - 1) & (grid[hi + 1] + o <= top), hi + 1, hi)
      hi = np.where((hi >= 0) & (grid[np.maximum(hi, 0)] + o > top), hi - 1, hi)
    first.append(lo)
    last.append(hi)
  return np.array(first, np.int32), np.array(last, np.int32)


def _gamma2(evaluated, index, reference, deltas, weights, dist2):
  """gamma^2 at each point (C,) and offset of the block (K,).

  evaluated: (V,) the padded evaluated dose, flat (Gy). index: (C,) int32,
  the points' flat indices there plus the window's low corner. reference:
  (C,) their reference dose (Gy). deltas: (w,) int32, the window's flat
  offsets. weights: (w, K), the trilinear weights / (DD x N). dist2: (K,)
  (|o| / DTA)^2.
  """
  # Relative to the point's dose before the product (the weights of an
  # offset sum to 1): float32 rounds the small differences, not the doses.
  patches = evaluated[index[:, None] + deltas[None, :]]
  patches = patches - reference[:, None]
  difference = jnp.matmul(patches, weights, precision=jax.lax.Precision.HIGHEST)
  return dist2[None, :] + difference * difference


@jax.jit
def _block_min(evaluated, index, reference, deltas, weights, dist2):
  """min over the block's offsets of gamma^2 (C,), every offset on the grid
  (XLA fuses the product into the minimum: no (C, K) array is written)."""
  return jnp.min(
      _gamma2(evaluated, index, reference, deltas, weights, dist2), axis=1
  )


@jax.jit
def _block_min_near_faces(
    evaluated, index, reference, deltas, weights, dist2, coords, first, last
):
  """`_block_min` skipping the offsets off the grid: coords (C, 3) int32,
  the points' voxel indices; first, last (3, K) int32, `_on_grid`'s. Only
  for the points near the grid's faces: the test costs 4x the rest."""
  on_grid = jnp.all(
      (coords[:, :, None] >= first[None]) & (coords[:, :, None] <= last[None]),
      axis=1,
  )
  gamma2 = _gamma2(evaluated, index, reference, deltas, weights, dist2)
  return jnp.min(jnp.where(on_grid, gamma2, jnp.inf), axis=1)


def _chunks(n: int) -> Iterator[tuple[int, int]]:
  """(start, size) of the kernel calls over n points: calls of
  `_CALL_POINTS`, then the rest in a power of 2 >= 256 (few shapes to
  compile, little padding)."""
  start = 0
  while start < n:
    size = 256
    while size < n - start and size < _CALL_POINTS:
      size *= 2
    yield start, size
    start += size


def gamma_index(
    reference: np.ndarray,
    evaluated: np.ndarray,
    voxel_dimensions: Sequence[float],
    points: np.ndarray,
    normalisation: float,
    criteria: Sequence[tuple[float, float]],
    *,
    max_gamma: float | None = 2.0,
    stop_at_pass: bool = False,
    interp_fraction: float = INTERP_FRACTION,
) -> list[np.ndarray]:
  """Global gamma at `points` for each criterion (module docstring).

  Args:
    reference, evaluated: (D, H, W) Gy on the same grid (finite).
    voxel_dimensions: (3,) mm along axes 0, 1, 2 (point i at i x spacing).
    points: bool (D, H, W), the reference points evaluated.
    normalisation: Gy, the global normalisation N.
    criteria: ((dose %, distance mm), ...): one map each; the evaluated dose
      goes to the device once for all of them.
    max_gamma: the search reaches max_gamma x DTA, larger values read as
      it (None: no limit, each point searched until its gamma is found).
    stop_at_pass: stop a point's search once gamma < 1 (its value then
      only known to be < 1).
    interp_fraction: the search step is DTA / interp_fraction.

  Returns:
    One float64 (D, H, W) per criterion: gamma at the points, NaN elsewhere.
  """
  reference = np.asarray(reference, np.float64)
  evaluated = np.asarray(evaluated, np.float64)
  points = np.asarray(points, bool)
  spacing = np.asarray(voxel_dimensions, np.float64)
  if not (reference.shape == evaluated.shape == points.shape):
    raise ValueError(
        f"reference {reference.shape}, evaluated {evaluated.shape} and "
        f"points {points.shape} must have one shape"
    )
  if reference.ndim != 3 or spacing.shape != (3,) or np.any(spacing <= 0):
    raise ValueError(
        f"a 3-D grid and 3 positive voxel dimensions are needed, got "
        f"shape {reference.shape}, voxel_dimensions {voxel_dimensions!r}"
    )
  if not np.all(np.isfinite(evaluated)):
    raise ValueError("the evaluated dose is not finite everywhere")
  if not normalisation > 0:
    raise ValueError(f"normalisation must be > 0 Gy, got {normalisation!r}")
  where = np.flatnonzero(points)
  maps = [np.full(reference.shape, np.nan) for _ in criteria]
  if not where.size:
    return maps
  coords = np.stack(np.unravel_index(where, reference.shape), axis=1)
  gamma0 = [  # offset 0, the dose difference at the point
      np.abs(evaluated.flat[where] - reference.flat[where])
      / (dose / 100 * normalisation)
      for dose, _ in criteria
  ]
  grid = _PaddedGrid(evaluated, coords)
  at_points = reference.flat[where]
  for out, g0, (dose_percent, dta) in zip(maps, gamma0, criteria):
    scale = 1 / (dose_percent / 100 * normalisation)
    # Above max_gamma every value reads as it: no need to search below.
    best2 = g0**2 if max_gamma is None else np.minimum(g0**2, max_gamma**2)
    for offsets, radii in _blocks(
        pymedphys_offsets(dta, max_gamma, interp_fraction)
    ):
      searching = best2 > (radii[0] / dta) ** 2
      if stop_at_pass:
        searching &= best2 >= 1
      active = np.flatnonzero(searching)
      if not active.size:
        break
      low, shape, weights = _window_weights(offsets, spacing)
      grid.reach(low, shape)
      deltas = np.stack(np.indices(shape), -1).reshape(-1, 3) @ grid.strides
      # The block padded to a power of 2 offsets that never win.
      k = len(offsets)
      size = max(_BLOCK_SIZES[0], 1 << (k - 1).bit_length())
      weights = np.pad(weights, ((0, 0), (0, size - k)))
      dist2 = np.pad((radii / dta) ** 2, (0, size - k), constant_values=np.inf)
      first, last = _on_grid(offsets, reference.shape, spacing)
      args = (
          jnp.asarray(deltas, jnp.int32),
          jnp.asarray(weights * scale, jnp.float32),
          jnp.asarray(dist2, jnp.float32),
      )
      near_faces = (
          jnp.asarray(np.pad(first, ((0, 0), (0, size - k))), jnp.int32),
          jnp.asarray(np.pad(last, ((0, 0), (0, size - k))), jnp.int32),
      )
      # Points from which every offset of the block stays on the grid.
      inside = np.all(
          (coords[active] >= first.max(1)) & (coords[active] <= last.min(1)),
          axis=1,
      )
      found = np.empty(active.size)
      for subset, faces in (
          (np.flatnonzero(inside), False),
          (np.flatnonzero(~inside), True),
      ):
        for start, chunk in _chunks(subset.size):
          which = subset[start : start + chunk]
          n = which.size
          part = np.pad(active[which], (0, chunk - n), mode="edge")
          call = (
              grid.flat,
              jnp.asarray(grid.index[part] + low @ grid.strides, jnp.int32),
              jnp.asarray(at_points[part], jnp.float32),
              *args,
          )
          if faces:
            result = _block_min_near_faces(
                *call, jnp.asarray(coords[part], jnp.int32), *near_faces
            )
          else:
            result = _block_min(*call)
          found[which] = np.asarray(result)[:n]
      best2[active] = np.minimum(best2[active], found)
    gamma = np.sqrt(best2)
    if max_gamma is not None:
      gamma = np.minimum(gamma, max_gamma)
    out.flat[where] = gamma
  return maps
