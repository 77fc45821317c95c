"""How the network's convolutions are computed (docs/design.md section 3).

The blocks of `blocks.py` receive `Conv` as a module factory (built once by
`RANDose` as `functools.partial(Conv, impl=..., dtype=..., fuse_sums=...)`)
and never see which algorithm runs:

  conv(features, k)(x)            a k^3 'SAME' stride-1 conv
  conv_sum([conv_a, conv_b], x)   conv_a(x) + conv_b(x)       (MSFE)
  conv_each([conv_a, conv_b], x)  [conv_a(x), conv_b(x)]      (PI)
  conv(features, k).transposed(x) the stride-k transposed conv (Upsample)

Each conv has `nn.Conv`'s parameters ('kernel' (k, k, k, Cin, features),
'bias' (features,), float32, the same initialisers), and every algorithm
computes the same math from them (to float32 rounding):
  direct     lax's convolution.
  FFT        the whole grid in the frequency domain; convs of one input share
             its FFT, convs whose outputs are summed share one spectrum.
  tiled FFT  overlap-save tiles, so the spectra are the size of a tile.
`impl` ('direct' | 'fft' | 'auto', `config.model.conv_impl`) and
`plan_conv` choose per layer from the input shape; the transposed conv is a
lax transposed conv or a matmul (`plan_transposed_conv`). `Conv.plan` is the
one place a layer's plan is made: `randose_jax.summary.conv_plan` lists the
plans of a network by intercepting it.

All arrays are channels-last, (N, D, H, W, C). Parameters are float32;
`dtype` is the compute dtype; the FFT path computes in float32.
"""

import functools
import operator
from typing import Any, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from randose_jax.default_config import ConfigError

Dtype = Any
Array = jax.Array

# lax dimension numbers for channels-last 3D convolutions.
_CONV_DIMS = ("NDHWC", "DHWIO", "NDHWC")

CONV_IMPLS = ("direct", "fft", "auto")


def check_conv_impl(impl: str) -> None:
  """ConfigError naming the choices unless impl is one of CONV_IMPLS."""
  if impl not in CONV_IMPLS:
    raise ConfigError(
        f"model.conv_impl: unknown {impl!r}; choose from {CONV_IMPLS}"
    )


# ---------------------------------------------------------- direct conv


def conv3d(x: Array, kernel: Array, bias: Array, dtype: Dtype) -> Array:
  """'SAME' stride-1 3D conv of x (N,D,H,W,Cin) with kernel (k,k,k,Cin,Cout)."""
  y = jax.lax.conv_general_dilated(
      x.astype(dtype),
      kernel.astype(dtype),
      window_strides=(1, 1, 1),
      padding="SAME",
      dimension_numbers=_CONV_DIMS,
  )
  return y + bias.astype(dtype)


def pad_kernel(kernel: Array, size: int) -> Array:
  """Zero-pads a (k,k,k,Cin,Cout) kernel, centred, to (size,size,size,...)."""
  p = (size - kernel.shape[0]) // 2
  return jnp.pad(kernel, [(p, p)] * 3 + [(0, 0)] * 2)


# ------------------------------------------------------------ FFT convolution
# A 'SAME' stride-1 conv (lax's cross-correlation, zero padding) computed in
# the frequency domain: same math as `conv3d`, different rounding (~1e-6
# relative in float32). Per grid axis of n voxels and kernel k the FFT length
# L is the smallest 5-smooth number >= n + k // 2, enough that the circular
# correlation equals the zero-padded one on the n kept outputs (the taps that
# wrap around only ever read the >= k // 2 zeros appended to the input).
#
#   y[i] = sum_j x[i + j - p] w[j],  p = (k - 1) // 2  (lax 'SAME', low pad)
#   Y[f] = X[f] * U[f],  U[f] = sum_j w[j] exp(+2 pi i f (j - p) / L)
#
# U is computed from the kernel with three small DFT matrices (k taps -> L
# frequencies per axis; the last axis keeps L // 2 + 1, rfft), never by an FFT
# of the zero-padded kernel, so its cost is that of its size. Kernels that
# share an input share its FFT (`conv3d_fft` takes several), and kernels whose
# outputs are summed (MSFE) add in the frequency domain into one spectrum.


def _next_smooth(length: int) -> int:
  """The smallest 5-smooth integer (2^a 3^b 5^c) >= length."""
  while True:
    n = length
    for p in (2, 3, 5):
      while n % p == 0:
        n //= p
    if n == 1:
      return length
    length += 1


def fft_length(n: int, kernel_size: int) -> int:
  """Smallest 5-smooth L >= n + kernel_size // 2 (see the section comment)."""
  return _next_smooth(n + kernel_size // 2)


def tiled_fft_length(tile: int, kernel_size: int) -> int:
  """Smallest 5-smooth L >= tile + kernel_size - 1 (overlap-save)."""
  return _next_smooth(tile + kernel_size - 1)


@functools.lru_cache(maxsize=None)
def _dft_taps(length: int, kernel_size: int, half: bool) -> np.ndarray:
  """(F, k) complex64: exp(+2 pi i f (j - p) / L), F = L or L // 2 + 1."""
  p = (kernel_size - 1) // 2
  freqs = np.arange(length // 2 + 1 if half else length)
  taps = np.arange(kernel_size) - p
  phase = 2 * np.pi * np.outer(freqs, taps) / length  # float64
  return (np.cos(phase) + 1j * np.sin(phase)).astype(np.complex64)


def kernel_spectrum(
    kernel: Array, lengths: Sequence[int], layout: str = "ioabc"
) -> Array:
  """U (Cin, Cout, Ld, Lh, Lw // 2 + 1) complex64 of a (k,k,k,Cin,Cout)
  kernel (odd or even k; lax 'SAME' alignment); layout 'abcio' puts the
  frequencies first."""
  k = kernel.shape[0]
  ed, eh, ew = (
      jnp.asarray(_dft_taps(n, k, half=(a == 2))) for a, n in enumerate(lengths)
  )
  u = kernel.astype(jnp.float32).astype(jnp.complex64)
  u = jnp.einsum("cl,jklio->jkcio", ew, u)
  u = jnp.einsum("bk,jkcio->jbcio", eh, u)
  return jnp.einsum(f"aj,jbcio->{layout}", ed, u)


def _axis_plan(m: int, tile: int | None, k_max: int):
  """(T, count, lo, L) for one grid axis of m voxels.

  One tile (tile None or >= m): the whole axis, no leading zeros (lo = 0),
  L = `fft_length(m, k)`: reads below 0 wrap to the >= k // 2 trailing zeros.
  Several tiles (overlap-save): lo = (k - 1) // 2 leading zeros, tiles cut
  L = `tiled_fft_length(T, k)` long every T voxels.
  """
  if tile is None or tile >= m:
    return m, 1, 0, fft_length(m, k_max)
  if m % tile:
    raise ValueError(
        f"conv3d_fft: tile {tile} does not divide the grid "
        f"axis of {m} voxels"
    )
  return tile, m // tile, (k_max - 1) // 2, tiled_fft_length(tile, k_max)


def conv3d_fft(
    x: Array,
    kernels: Sequence[Sequence[Array]],
    bias: Array,
    dtype: Dtype,
    tile: int | None = None,
) -> Array:
  """sum over g of conv3d(x, kernels[g]) + bias, through one FFT of x.

  kernels: groups of (k,k,k,Cin,Cout_g) kernels; the kernels of a group are
  summed (their spectra add), the groups' outputs are concatenated along
  channels (they share the input FFT, one channel-mixing product and one
  inverse FFT). bias: (sum_g Cout_g,). Computed in float32, returned in dtype.

  tile: None = one FFT over the whole grid. An int T < an axis's length
  (dividing it) = overlap-save along that axis: with P = (k_max - 1) // 2
  leading zeros, output tile t reads the padded input [t*T, t*T + T + k_max -
  1); it is cut L = `tiled_fft_length(T, k_max)` long (the extra voxels only
  reach discarded outputs), transformed, mixed with the kernel spectra at
  length L (the same `kernel_spectrum`, whose phase puts output r of a tile
  at circular index r + P), and outputs [P, P + T) are kept: every tap they
  read lies in the tile's first T + k_max - 1 voxels, so nothing wraps.
  Tiles make the spectra the size of one tile instead of the grid (at 128^3
  the first MSFE's whole-grid spectrum is 135 * 135 * 68 frequencies x 48 x
  16 channels = 7.6 GB) and (L_tile / L_grid)^3 as costly to build, for
  (L / T)^3 more transformed voxels; `plan_conv` weighs the two.

  The channel mixing is a batched matmul over frequencies, (F, tiles, Cin) @
  (F, Cin, Cout), which ran faster on the CPU than with the frequencies last
  (benchmarks/NOTES.md). Odd kernels of one group are summed in the tap
  domain first (zero-padded, centred), so each group costs one spectrum.
  """
  n, d, h, w, cin = x.shape
  k_max = max(kern.shape[0] for group in kernels for kern in group)
  plans = [_axis_plan(m, tile, k_max) for m in (d, h, w)]
  sizes = tuple(p[0] for p in plans)
  counts = tuple(p[1] for p in plans)
  los = tuple(p[2] for p in plans)
  lengths = tuple(p[3] for p in plans)
  spectra = []
  for group in kernels:
    if len(group) > 1 and all(kern.shape[0] % 2 for kern in group):
      km = max(kern.shape[0] for kern in group)
      group = [sum(pad_kernel(kern.astype(jnp.float32), km) for kern in group)]
    spectra.append(
        sum(kernel_spectrum(kern, lengths, "abcio") for kern in group)
    )
  u = spectra[0] if len(spectra) == 1 else jnp.concatenate(spectra, axis=-1)
  cout = u.shape[-1]
  fshape = u.shape[:3]  # (Ld, Lh, Lw // 2 + 1)
  freqs = fshape[0] * fshape[1] * fshape[2]
  u = u.reshape(freqs, cin, cout)
  xp = jnp.transpose(x.astype(jnp.float32), (0, 4, 1, 2, 3))  # N, C, D, H, W
  if any(c > 1 for c in counts):
    # Leading zeros, and trailing ones so that the last tile's L voxels exist.
    xp = jnp.pad(
        xp,
        [(0, 0), (0, 0)]
        + [
            (lo, (c - 1) * t + length - m - lo) if c > 1 else (0, 0)
            for (t, c, lo, length), m in zip(plans, (d, h, w))
        ],
    )
  # Overlapping tiles, one axis at a time: (.., M, ..) -> (.., count, L, ..)
  # (an untiled axis keeps its m voxels; rfftn zero-pads it to L).
  for axis, (t, count, _, length) in zip((2, 4, 6), plans):
    if count == 1:
      xp = jnp.expand_dims(xp, axis)
    else:
      xp = jnp.stack(
          [
              jax.lax.slice_in_dim(xp, i * t, i * t + length, axis=axis)
              for i in range(count)
          ],
          axis=axis,
      )
  # (N, C, nd, Sd, nh, Sh, nw, Sw) -> (N * tiles, C, Sd, Sh, Sw)
  xt = jnp.transpose(xp, (0, 2, 4, 6, 1, 3, 5, 7))
  xt = xt.reshape(-1, cin, *xt.shape[5:])
  tiles = xt.shape[0]
  xf = jnp.fft.rfftn(xt, s=lengths, axes=(2, 3, 4)).reshape(tiles, cin, freqs)
  yf = jnp.einsum("fni,fio->fno", jnp.transpose(xf, (2, 0, 1)), u)
  yf = jnp.transpose(yf, (1, 2, 0)).reshape(tiles, cout, *fshape)
  y = jnp.fft.irfftn(yf, s=lengths, axes=(2, 3, 4))
  y = y[
      :,
      :,
      los[0] : los[0] + sizes[0],
      los[1] : los[1] + sizes[1],
      los[2] : los[2] + sizes[2],
  ]
  y = y.reshape(n, *counts, cout, *sizes)
  # (N, nd, nh, nw, Co, Td, Th, Tw) -> (N, nd, Td, nh, Th, nw, Tw, Co)
  y = jnp.transpose(y, (0, 1, 5, 2, 6, 3, 7, 4)).reshape(n, d, h, w, cout)
  return (y + bias.astype(jnp.float32)).astype(dtype)


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
    impl: str, x_shape, kernel_groups, cout: int, fused: bool = True
) -> Plan:
  """Plan('direct') or Plan('fft', tile) for one conv layer.

  x_shape (N, D, H, W, Cin); kernel_groups: kernel sizes per `conv3d_fft`
  group (e.g. [[3, 5, 7]] for an MSFE, [[3], [5], [7]] for PI's convs);
  cout: output channels of each group; fused: whether the direct path would
  sum a group's kernels into one (`Conv.fuse_sums`).

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
      or (impl == "auto" and jax.default_backend() != "cpu")
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


def plan_transposed_conv(impl: str) -> Plan:
  """Plan('direct') (lax's transposed conv) or Plan('matmul') for the
  stride-k transposed conv: 'fft', and 'auto' on the CPU backend, take the
  matmul (XLA's CPU transposed conv was slow, benchmarks/NOTES.md); there
  is nothing to transform."""
  check_conv_impl(impl)
  if impl == "fft" or (impl == "auto" and jax.default_backend() == "cpu"):
    return Plan("matmul")
  return Plan("direct")


def plan_record(
    impl: str, x_shape, kernel_groups, cout: int, fused: bool, plan: Plan
) -> dict:
  """One row of `randose_jax.summary.conv_plan`: input shape, kernel groups,
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


# ------------------------------------------------------------ the factory


def _sum(arrays: Sequence[Array]) -> Array:
  """arrays[0] + arrays[1] + ..., in that order (one array: itself)."""
  return functools.reduce(operator.add, arrays)


class Conv(nn.Module):
  """`nn.Conv(features, (k, k, k), padding='SAME')` with a choice of algorithm.

  Same params as nn.Conv ('kernel' (k,k,k,Cin,features), 'bias', the same
  initialisers), same math. impl: 'direct' | 'fft' | 'auto' (`plan_conv`,
  per layer from the input shape); dtype: the compute dtype; fuse_sums:
  `conv_sum` on the direct path convolves once with the summed kernels
  (zero-padded, centred) instead of once per conv (same math, fewer taps).

  x: (N, D, H, W, Cin) -> (N, D, H, W, features).
  """

  features: int
  kernel_size: int
  impl: str = "direct"
  dtype: Dtype = jnp.float32
  fuse_sums: bool = False

  @nn.compact
  def weights(self, in_features: int) -> tuple[Array, Array]:
    """kernel (k, k, k, in_features, features) and bias (features,)."""
    k = self.kernel_size
    kernel = self.param(
        "kernel",
        nn.initializers.lecun_normal(),
        (k, k, k, in_features, self.features),
        jnp.float32,
    )
    bias = self.param(
        "bias", nn.initializers.zeros_init(), (self.features,), jnp.float32
    )
    return kernel, bias

  def plan(self, x_shape, kernel_groups) -> Plan:
    """The plan of this conv and the convs computed with it (`conv_sum`,
    `conv_each`); `randose_jax.summary.conv_plan` intercepts this method."""
    return plan_conv(
        self.impl, x_shape, kernel_groups, self.features, self.fuse_sums
    )

  def __call__(self, x: Array) -> Array:
    return conv_sum([self], x)

  def transposed(self, x: Array) -> Array:
    """The stride-k transposed conv, k = kernel_size: nn.ConvTranspose(
    features, (k, k, k), strides k, 'VALID')'s params and math.

    x: (N, D, H, W, Cin) -> (N, kD, kH, kW, features). No two output voxels
    share an input tap, so it is also one matmul (Cin -> k^3 * features) and
    a depth-to-space reshape,
      y[k i + a, k j + b, k l + c] = x[i, j, l] @ kernel[k-1-a, k-1-b, k-1-c]
    (lax.conv_transpose flips nothing; its dilated-conv lowering reads the
    kernel mirrored).
    """
    kernel, bias = self.weights(x.shape[-1])
    k, dtype = self.kernel_size, self.dtype
    x, kernel, bias = x.astype(dtype), kernel.astype(dtype), bias.astype(dtype)
    if plan_transposed_conv(self.impl).algorithm == "direct":
      y = jax.lax.conv_transpose(
          x, kernel, (k, k, k), "VALID", rhs_dilation=(1, 1, 1)
      )
      return y + bias
    n, d, h, w, _ = x.shape
    y = jnp.einsum("ndhwi,abcio->ndahbwco", x, kernel[::-1, ::-1, ::-1])
    return y.reshape(n, k * d, k * h, k * w, self.features) + bias


def conv_sum(convs: Sequence[Conv], x: Array) -> Array:
  """convs[0](x) + convs[1](x) + ... computed together: one FFT of x and one
  spectrum, or (`fuse_sums`) one direct conv with the summed kernels.

  convs: `Conv`s of one factory (the first one's impl, dtype and fuse_sums
  decide), odd kernel sizes when there are several.
  """
  first = convs[0]
  weights = [c.weights(x.shape[-1]) for c in convs]
  kernels, biases = [w for w, _ in weights], [b for _, b in weights]
  plan = first.plan(x.shape, [[c.kernel_size for c in convs]])
  if plan.algorithm == "fft":
    return conv3d_fft(x, [kernels], _sum(biases), first.dtype, plan.tile)
  if len(convs) > 1 and first.fuse_sums:
    k_max = max(c.kernel_size for c in convs)
    return conv3d(
        x,
        _sum([pad_kernel(w, k_max) for w in kernels]),
        _sum(biases),
        first.dtype,
    )
  return _sum([conv3d(x, w, b, first.dtype) for w, b in weights])


def conv_each(convs: Sequence[Conv], x: Array) -> list[Array]:
  """[conv(x) for conv in convs], the FFT ones through one FFT of x, one
  mixing product and one inverse FFT (convs of one factory, one width)."""
  first = convs[0]
  weights = [c.weights(x.shape[-1]) for c in convs]
  plan = first.plan(x.shape, [[c.kernel_size] for c in convs])
  if plan.algorithm == "direct":
    return [conv3d(x, w, b, first.dtype) for w, b in weights]
  y = conv3d_fft(
      x,
      [[w] for w, _ in weights],
      jnp.concatenate([b for _, b in weights]),
      first.dtype,
      plan.tile,
  )
  f = first.features
  return [y[..., i * f : (i + 1) * f] for i in range(len(convs))]
