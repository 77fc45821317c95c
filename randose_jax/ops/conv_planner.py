"""Which algorithm computes each conv layer (`randose_jax.ops.conv_math`).

`plan_conv` chooses per layer from the input shape, the kernels and the
backend (passed in: the backend the model was created for); the transposed
conv is a lax transposed conv or a matmul (`plan_transposed_conv`).
`plan_record` is one row of `randose-summary`'s conv plan.
"""

from typing import NamedTuple

import jax
import numpy as np

from randose_jax.default_config import ConfigError
from randose_jax.ops.conv_math import _axis_plan

CONV_IMPLS = ("direct", "fft", "auto")


def check_conv_impl(impl: str) -> None:
  """ConfigError naming the choices unless impl is one of CONV_IMPLS."""
  if impl not in CONV_IMPLS:
    raise ConfigError(
        f"model.conv_impl: unknown {impl!r}; choose from {CONV_IMPLS}"
    )


def _backend(backend: str | None) -> str:
  """The backend to plan for; None: JAX's default backend."""
  return jax.default_backend() if backend is None else backend


# --------------------------------------------------- choosing the algorithm
# `plan_conv` estimates each algorithm's seconds on the CPU from counts
# fitted to forward timings of XLA on the CPU (benchmarks/NOTES.md, "Tiled
# FFT and the per-layer plan"); only their ranking matters.
# Direct conv: GFLOP/s against log2(Cin * Cout) (small channel counts ran
# far slower than large ones).
_DIRECT_RATE = (
    (4, 1.5),
    (6, 4.8),
    (8, 18.5),
    (10, 19.5),
    (12, 65.0),
    (14, 60.0),
    (16, 110.0),
)
# FFT path, seconds per 1e9 of: transformed points * log2(points), mixing
# FLOPs, spectrum-building FLOPs.
_FFT_COST = (0.65, 0.0125, 0.133)
# Never build a spectrum larger than this (bytes, complex64).
MAX_SPECTRUM_BYTES = 2 << 30


class Plan(NamedTuple):
  """How one conv layer is computed: algorithm 'direct' | 'fft' | 'matmul'
  (the transposed conv only); tile None (whole grid) or the FFT tile."""

  algorithm: str
  tile: int | None = None


def direct_seconds(x_shape, kernel_groups, cout: int, fused: bool) -> float:
  """Estimated CPU seconds of the direct convs (forward)."""
  n, d, h, w, cin = x_shape
  taps = 0
  for sizes in kernel_groups:
    group_taps = [k**3 for k in sizes]
    taps += max(group_taps) if fused else sum(group_taps)
  taps = taps / len(kernel_groups)  # per output channel
  flops = 2 * n * d * h * w * taps * cin * cout
  xs, ys = zip(*_DIRECT_RATE)
  rate = np.interp(np.log2(max(cin * cout, 1)), xs, ys) * 1e9
  return flops / rate


def fft_seconds(x_shape, kernel_groups, cout: int, tile) -> float:
  """Estimated CPU seconds of `conv3d_fft(..., tile=tile)` (forward)."""
  n, d, h, w, cin = x_shape
  k_max = max(max(sizes) for sizes in kernel_groups)
  plans = [_axis_plan(m, tile, k_max) for m in (d, h, w)]
  tiles = n * int(np.prod([p[1] for p in plans]))
  ld, lh, lw = (p[3] for p in plans)
  points = ld * lh * lw
  freqs = ld * lh * (lw // 2 + 1)
  # Summed odd groups cost one spectrum of their largest kernel.
  spectrum_taps = sum(max(sizes) for sizes in kernel_groups)
  spectrum_taps /= len(kernel_groups)
  fft = tiles * (cin + cout) * points * np.log2(points)
  mix = 8 * tiles * freqs * cin * cout
  spectrum = 8 * spectrum_taps * freqs * cin * cout
  a, b, c = _FFT_COST
  return (a * fft + b * mix + c * spectrum) / 1e9


def fft_tiles(grid) -> list:
  """Candidate tiles: None (whole grid) and halvings of the largest axis
  that divide every axis longer than the tile, down to 4 voxels."""
  out, tile = [None], max(grid) // 2
  while tile >= 4:
    if all(m <= tile or m % tile == 0 for m in grid):
      out.append(tile)
    tile //= 2
  return out


def plan_conv(
    impl: str,
    x_shape,
    kernel_groups,
    cout: int,
    fused: bool = True,
    backend: str | None = None,
) -> Plan:
  """Plan('direct') or Plan('fft', tile) for one conv layer.

  x_shape (N, D, H, W, Cin); kernel_groups: kernel sizes per `conv3d_fft`
  group (e.g. [[3, 5, 7]] for an MSFE, [[3], [5], [7]] for PI's convs);
  cout: output channels of each group; fused: whether the direct path would
  sum a group's kernels into one (`Conv.fuse_sums`); backend: the backend
  the model runs on ('cpu', 'gpu', 'tpu'; None: JAX's default backend).

  'direct': always direct. 'fft': the FFT path with the tile of least
  estimated cost (`fft_seconds`) among the whole grid and halvings
  (`fft_tiles`) whose spectrum fits MAX_SPECTRUM_BYTES. 'auto': on the CPU
  the cheaper of that and the direct conv (`direct_seconds`); on other
  backends direct (cuDNN's direct convs are strong; nothing else measured
  there). A 1x1x1 kernel is always direct.
  """
  check_conv_impl(impl)
  k_max = max(max(sizes) for sizes in kernel_groups)
  if (
      impl == "direct"
      or k_max < 2
      or (impl == "auto" and _backend(backend) != "cpu")
  ):
    return Plan("direct")
  grid, cin = tuple(x_shape[1:4]), x_shape[4]
  if not all(isinstance(m, int) for m in (*grid, cin)):
    # A symbolic grid (jax.export): no tiles to plan.
    return Plan("direct") if impl == "auto" else Plan("fft")
  # A symbolic batch (jax.export's 'b') is costed as one sample.
  x_shape = (x_shape[0] if isinstance(x_shape[0], int) else 1, *grid, cin)
  best = None
  tiles = fft_tiles(grid)
  for tile in tiles:
    plans = [_axis_plan(m, tile, k_max) for m in grid]
    freqs = plans[0][3] * plans[1][3] * (plans[2][3] // 2 + 1)
    if (
        freqs * cin * cout * len(kernel_groups) * 8 > MAX_SPECTRUM_BYTES
        and tile != tiles[-1]
    ):  # the smallest tile is always allowed
      continue
    cost = fft_seconds(x_shape, kernel_groups, cout, tile)
    if best is None or cost < best[0]:
      best = (cost, tile)
  if (
      impl == "auto"
      and direct_seconds(x_shape, kernel_groups, cout, fused) < best[0]
  ):
    return Plan("direct")
  return Plan("fft", best[1])


def plan_transposed_conv(impl: str, backend: str | None = None) -> Plan:
  """Plan('direct') (lax's transposed conv) or Plan('matmul') for the
  stride-k transposed conv: 'fft', and 'auto' on the CPU backend, take the
  matmul (XLA's CPU transposed conv was slow, benchmarks/NOTES.md); there
  is nothing to transform."""
  check_conv_impl(impl)
  if impl == "fft" or (impl == "auto" and _backend(backend) == "cpu"):
    return Plan("matmul")
  return Plan("direct")


def plan_record(
    impl: str, x_shape, kernel_groups, cout: int, fused: bool, plan: Plan
) -> dict:
  """One row of `randose_jax.models.costs.conv_plan`: input shape, kernel groups,
  cout, conv_impl, algorithm, tile and (concrete shapes, k > 1) the
  estimated CPU seconds."""
  shape = tuple(int(m) if isinstance(m, int) else str(m) for m in x_shape)
  record = {
      "input": shape,
      "kernels": [list(g) for g in kernel_groups],
      "cout": cout,
      "conv_impl": impl,
      "algorithm": plan.algorithm,
      "tile": plan.tile,
  }
  if (
      all(isinstance(m, int) for m in x_shape)
      and max(max(g) for g in kernel_groups) > 1
  ):
    record["est_direct_s"] = float(
        direct_seconds(x_shape, kernel_groups, cout, fused)
    )
    if plan.algorithm == "fft":
      record["est_fft_s"] = float(
          fft_seconds(x_shape, kernel_groups, cout, plan.tile)
      )
  return record
