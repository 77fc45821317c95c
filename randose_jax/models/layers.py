"""The building blocks of RANDose (paper section 2; DESIGN.md section 3).

All arrays are channels-last 3D volumes, (N, D, H, W, C). Parameters are always
float32 (`param_dtype`); `dtype` is the compute dtype (float32 or bfloat16).
Where numerical range matters (instance-norm statistics, the channel-attention
pooling and MLP, every sigmoid) the computation runs in float32 and only the
result is cast back to `dtype`.

Where each equation of the paper lives:
  MSFE                      section 2.1: F_M = sum_n conv_{n x n x n}(F_In)
  ChannelAttention          section 2.1: F_CA (GAP, FC, ReLU, FC, sigmoid, scale)
  SpatialAttention          section 2.1: F_SA (1x1x1 conv, sigmoid, broadcast scale)
  ChannelSpatialAttention   section 2.1: F_Out = F_CA + alpha * F_SA   (alias CSA)
  MSCSA                     section 2.1: MSFE -> norm -> activation -> CSA
  PTVIntegration            section 2.2: F_Int,s
  AttentionFusion           section 2.3: F_fused,s = F_E,s^A + beta * F_D,s+1^A
  UNetBlock                 Table 2a row 1: two 3x3x3 conv-norm-act
"""

import contextlib
import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Array = jax.Array

# lax dimension numbers for channels-last 3D convolutions.
_CONV_DIMS = ("NDHWC", "DHWIO", "NDHWC")

ACTIVATIONS = {
    "relu": nn.relu,
    "leaky_relu": nn.leaky_relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
}


def get_activation(name: str) -> Callable[[Array], Array]:
  if name not in ACTIVATIONS:
    raise ValueError(f"model.activation: unknown {name!r}; choose from "
                     f"{sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def conv(features: int, kernel_size: int, dtype: Dtype, name: str,
         **kwargs) -> nn.Conv:
  """A k^3 'SAME' conv with bias, float32 params, computing in `dtype`."""
  return nn.Conv(features, (kernel_size,) * 3, padding="SAME", dtype=dtype,
                 param_dtype=jnp.float32, name=name, **kwargs)


def norm_layer(kind: str, dtype: Dtype, name: str, groups: int = 8):
  """The normalisation after each conv: a module or the identity.

  'instance': per-sample, per-channel statistics over (D, H, W) with a learned
    scale and bias (DESIGN.md: batch 2 makes batch norm a poor fit).
  'group': GroupNorm with gcd(groups, C) groups (also batch-free).
  'none': identity.
  Statistics are always reduced in float32 (flax's `force_float32_reductions`).
  """
  if kind == "instance":
    return nn.InstanceNorm(epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32,
                           name=name)
  if kind == "group":
    return lambda x: nn.GroupNorm(
        num_groups=_gcd(groups, x.shape[-1]), epsilon=1e-5, dtype=dtype,
        param_dtype=jnp.float32, name=name)(x)
  if kind == "none":
    return lambda x: x
  raise ValueError(f"model.norm: unknown {kind!r}; choose from "
                   "'instance', 'group', 'none'")


def _gcd(a: int, b: int) -> int:
  while b:
    a, b = b, a % b
  return a


def conv3d(x: Array, kernel: Array, bias: Array, dtype: Dtype) -> Array:
  """'SAME' stride-1 3D conv of x (N,D,H,W,Cin) with kernel (k,k,k,Cin,Cout)."""
  y = jax.lax.conv_general_dilated(
      x.astype(dtype), kernel.astype(dtype), window_strides=(1, 1, 1),
      padding="SAME", dimension_numbers=_CONV_DIMS)
  return y + bias.astype(dtype)


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

CONV_IMPLS = ("direct", "fft", "auto")
# The smallest kernel 'auto' may move off the direct conv on the CPU.
AUTO_FFT_MIN_KERNEL = 3


def check_conv_impl(impl: str) -> None:
  """ValueError naming the choices unless impl is one of CONV_IMPLS."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"model.conv_impl: unknown {impl!r}; choose from "
                     f"{CONV_IMPLS}")


def resolve_conv_impl(impl: str, kernel_size: int) -> str:
  """'direct' | 'fft' | 'auto' -> 'direct' | 'fft', by backend alone.

  'auto' is 'fft' on the CPU backend for kernels >= AUTO_FFT_MIN_KERNEL and
  'direct' elsewhere. The convs themselves decide per layer with `plan_conv`
  (which also weighs the direct conv on the CPU); this coarser answer picks
  the transposed conv's form (`Upsample`).
  """
  check_conv_impl(impl)
  if impl == "auto":
    if jax.default_backend() == "cpu" and kernel_size >= AUTO_FFT_MIN_KERNEL:
      return "fft"
    return "direct"
  return impl


def _is_smooth(n: int) -> bool:
  for p in (2, 3, 5):
    while n % p == 0:
      n //= p
  return n == 1


def fft_length(n: int, kernel_size: int) -> int:
  """Smallest 5-smooth L >= n + kernel_size // 2 (see the section comment)."""
  length = n + kernel_size // 2
  while not _is_smooth(length):
    length += 1
  return length


@functools.lru_cache(maxsize=None)
def _dft_taps(length: int, kernel_size: int, half: bool) -> np.ndarray:
  """(F, k) complex64: exp(+2 pi i f (j - p) / L), F = L or L // 2 + 1."""
  p = (kernel_size - 1) // 2
  freqs = np.arange(length // 2 + 1 if half else length)
  taps = np.arange(kernel_size) - p
  phase = 2 * np.pi * np.outer(freqs, taps) / length  # float64
  return (np.cos(phase) + 1j * np.sin(phase)).astype(np.complex64)


def kernel_spectrum(kernel: Array, lengths: Sequence[int],
                    layout: str = "ioabc") -> Array:
  """U (Cin, Cout, Ld, Lh, Lw // 2 + 1) complex64 of a (k,k,k,Cin,Cout)
  kernel (odd or even k; lax 'SAME' alignment); layout 'abcio' puts the
  frequencies first."""
  k = kernel.shape[0]
  ed, eh, ew = (jnp.asarray(_dft_taps(n, k, half=(a == 2)))
                for a, n in enumerate(lengths))
  u = kernel.astype(jnp.float32).astype(jnp.complex64)
  u = jnp.einsum("cl,jklio->jkcio", ew, u)
  u = jnp.einsum("bk,jkcio->jbcio", eh, u)
  return jnp.einsum(f"aj,jbcio->{layout}", ed, u)


def tiled_fft_length(tile: int, kernel_size: int) -> int:
  """Smallest 5-smooth L >= tile + kernel_size - 1 (overlap-save)."""
  length = tile + kernel_size - 1
  while not _is_smooth(length):
    length += 1
  return length


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
    raise ValueError(f"conv3d_fft: tile {tile} does not divide the grid "
                     f"axis of {m} voxels")
  return tile, m // tile, (k_max - 1) // 2, tiled_fft_length(tile, k_max)


def conv3d_fft(x: Array, kernels: Sequence[Sequence[Array]], bias: Array,
               dtype: Dtype, tile: int | None = None) -> Array:
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
  (F, Cin, Cout): ~4x faster on the CPU than with the frequencies last
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
      group = [sum(_pad_kernel(kern.astype(jnp.float32), km)
                   for kern in group)]
    spectra.append(sum(kernel_spectrum(kern, lengths, "abcio")
                       for kern in group))
  u = spectra[0] if len(spectra) == 1 else jnp.concatenate(spectra, axis=-1)
  cout = u.shape[-1]
  fshape = u.shape[:3]  # (Ld, Lh, Lw // 2 + 1)
  freqs = fshape[0] * fshape[1] * fshape[2]
  u = u.reshape(freqs, cin, cout)
  xp = jnp.transpose(x.astype(jnp.float32), (0, 4, 1, 2, 3))  # N, C, D, H, W
  if any(c > 1 for c in counts):
    # Leading zeros, and trailing ones so that the last tile's L voxels exist.
    xp = jnp.pad(xp, [(0, 0), (0, 0)] + [
        (lo, (c - 1) * t + length - m - lo) if c > 1 else (0, 0)
        for (t, c, lo, length), m in zip(plans, (d, h, w))])
  # Overlapping tiles, one axis at a time: (.., M, ..) -> (.., count, L, ..)
  # (an untiled axis keeps its m voxels; rfftn zero-pads it to L).
  for axis, (t, count, _, length) in zip((2, 4, 6), plans):
    if count == 1:
      xp = jnp.expand_dims(xp, axis)
    else:
      xp = jnp.stack([jax.lax.slice_in_dim(xp, i * t, i * t + length,
                                           axis=axis) for i in range(count)],
                     axis=axis)
  # (N, C, nd, Sd, nh, Sh, nw, Sw) -> (N * tiles, C, Sd, Sh, Sw)
  xt = jnp.transpose(xp, (0, 2, 4, 6, 1, 3, 5, 7))
  xt = xt.reshape(-1, cin, *xt.shape[5:])
  tiles = xt.shape[0]
  xf = jnp.fft.rfftn(xt, s=lengths, axes=(2, 3, 4)).reshape(tiles, cin, freqs)
  yf = jnp.einsum("fni,fio->fno", jnp.transpose(xf, (2, 0, 1)), u)
  yf = jnp.transpose(yf, (1, 2, 0)).reshape(tiles, cout, *fshape)
  y = jnp.fft.irfftn(yf, s=lengths, axes=(2, 3, 4))
  y = y[:, :, los[0]:los[0] + sizes[0], los[1]:los[1] + sizes[1],
        los[2]:los[2] + sizes[2]]
  y = y.reshape(n, *counts, cout, *sizes)
  # (N, nd, nh, nw, Co, Td, Th, Tw) -> (N, nd, Td, nh, Th, nw, Tw, Co)
  y = jnp.transpose(y, (0, 1, 5, 2, 6, 3, 7, 4)).reshape(n, d, h, w, cout)
  return (y + bias.astype(jnp.float32)).astype(dtype)


# --------------------------------------------------- choosing the algorithm
# `plan_conv` estimates each algorithm's seconds on the CPU from counts
# fitted to forward timings of this machine's XLA (benchmarks/NOTES.md,
# "Tiled FFT and the per-layer plan"); only their ranking matters.
# Direct conv: GFLOP/s against log2(Cin * Cout) (small channel counts run at
# a few GFLOP/s, 256 x 256 at ~110).
_DIRECT_RATE = ((4, 1.5), (6, 4.8), (8, 18.5), (10, 19.5), (12, 65.0),
                (14, 60.0), (16, 110.0))
# FFT path, seconds per 1e9 of: transformed points * log2(points), mixing
# FLOPs, spectrum-building FLOPs.
_FFT_COST = (0.65, 0.0125, 0.133)
# Never build a spectrum larger than this (bytes, complex64).
MAX_SPECTRUM_BYTES = 2 << 30


def direct_seconds(x_shape, kernel_groups, cout: int, fused: bool) -> float:
  """Estimated CPU seconds of the direct convs (forward)."""
  n, d, h, w, cin = x_shape
  taps = 0
  for sizes in kernel_groups:
    group_taps = [k ** 3 for k in sizes]
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


_PLAN_RECORDS: list | None = None


@contextlib.contextmanager
def recording_plans():
  """Collects every `plan_conv` decision made while tracing inside the
  block: yields a list that fills with dicts (input shape, kernel groups,
  cout, conv_impl, algorithm, tile, estimated seconds)."""
  global _PLAN_RECORDS
  outer, _PLAN_RECORDS = _PLAN_RECORDS, []
  try:
    yield _PLAN_RECORDS
  finally:
    _PLAN_RECORDS = outer


def plan_conv(impl: str, x_shape, kernel_groups, cout: int,
              fused: bool = True) -> tuple:
  """('direct', None) or ('fft', tile) for one conv layer.

  x_shape (N, D, H, W, Cin); kernel_groups: kernel sizes per `conv3d_fft`
  group (e.g. [[3, 5, 7]] for an MSFE, [[3], [5], [7]] for PI's convs);
  cout: output channels of each group; fused: whether the direct path would
  sum a group's kernels into one (MSFE's `fused`).

  'direct': always direct. 'fft': the FFT path with the tile of least
  estimated cost (`fft_seconds`) among the whole grid and halvings
  (`fft_tiles`) whose spectrum fits MAX_SPECTRUM_BYTES. 'auto': on the CPU
  the cheaper of that and the direct conv (`direct_seconds`); on other
  backends direct (cuDNN's direct convs are strong; nothing else measured
  there). A 1x1x1 kernel is always direct.

  Inside `recording_plans()` every decision is also recorded.
  """
  plan = _plan_conv(impl, x_shape, kernel_groups, cout, fused)
  if _PLAN_RECORDS is not None:
    shape = tuple(int(m) if isinstance(m, int) else str(m) for m in x_shape)
    record = {"input": shape, "kernels": [list(g) for g in kernel_groups],
              "cout": cout, "conv_impl": impl, "algorithm": plan[0],
              "tile": plan[1]}
    if all(isinstance(m, int) for m in x_shape) and max(
        max(g) for g in kernel_groups) > 1:
      record["est_direct_s"] = float(direct_seconds(
          x_shape, kernel_groups, cout, fused))
      if plan[0] == "fft":
        record["est_fft_s"] = float(fft_seconds(
            x_shape, kernel_groups, cout, plan[1]))
    _PLAN_RECORDS.append(record)
  return plan


def _plan_conv(impl: str, x_shape, kernel_groups, cout: int,
               fused: bool = True) -> tuple:
  """`plan_conv` without the recording."""
  check_conv_impl(impl)
  k_max = max(max(sizes) for sizes in kernel_groups)
  if impl == "direct" or k_max < 2 or (
      impl == "auto" and jax.default_backend() != "cpu"):
    return "direct", None
  grid, cin = tuple(x_shape[1:4]), x_shape[4]
  if not all(isinstance(m, int) for m in (*grid, cin)):
    # A symbolic grid (jax.export): no tiles to plan.
    return ("direct", None) if impl == "auto" else ("fft", None)
  # A symbolic batch (jax.export's 'b') is costed as one sample.
  x_shape = (x_shape[0] if isinstance(x_shape[0], int) else 1, *grid, cin)
  best = None
  tiles = fft_tiles(grid)
  for tile in tiles:
    plans = [_axis_plan(m, tile, k_max) for m in grid]
    freqs = plans[0][3] * plans[1][3] * (plans[2][3] // 2 + 1)
    if (freqs * cin * cout * len(kernel_groups) * 8 > MAX_SPECTRUM_BYTES
        and tile != tiles[-1]):  # the smallest tile is always allowed
      continue
    cost = fft_seconds(x_shape, kernel_groups, cout, tile)
    if best is None or cost < best[0]:
      best = (cost, tile)
  if impl == "auto" and direct_seconds(x_shape, kernel_groups, cout,
                                       fused) < best[0]:
    return "direct", None
  return "fft", best[1]


class Conv(nn.Module):
  """`nn.Conv(features, (k,k,k), padding='SAME')` with a choice of algorithm.

  Same params as nn.Conv ('kernel' (k,k,k,Cin,features), 'bias', same
  initialisers), same math; `impl` is 'direct' (lax conv), 'fft' or 'auto'
  (`plan_conv`: per layer, from the input shape).
  """
  features: int
  kernel_size: int
  impl: str = "direct"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, k, x.shape[-1], self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                      jnp.float32)
    algo, tile = plan_conv(self.impl, x.shape, [[k]], self.features)
    if algo == "fft":
      return conv3d_fft(x, [[kernel]], bias, self.dtype, tile)
    return conv3d(x, kernel, bias, self.dtype)


class ConvWeights(nn.Module):
  """The parameters of one k^3 conv, without applying it.

  Returns kernel (k, k, k, in_features, features) and bias (features,), both
  float32, initialised like `nn.Conv` (LeCun normal on fan-in k^3 * Cin, zero
  bias). MSFE uses it so both of its compute modes share one param tree.
  """
  features: int
  kernel_size: int

  @nn.compact
  def __call__(self, in_features: int) -> tuple[Array, Array]:
    k = self.kernel_size
    kernel = self.param("kernel", nn.initializers.lecun_normal(),
                        (k, k, k, in_features, self.features), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                      jnp.float32)
    return kernel, bias


class MSFE(nn.Module):
  """Multi-Scale Feature Extraction (paper section 2.1).

  F_M = sum over n in `kernels` of conv_{n x n x n}(F_In): parallel 'SAME'
  convs, each with its own kernel and bias (params `conv_k3`, `conv_k5`, ...),
  summed element-wise.

  Because the branches are linear and summed before any nonlinearity, they are
  exactly one max(n)^3 conv whose kernel is the sum of the branch kernels
  zero-padded (centred) to max(n)^3, with the summed biases. `fused=True`
  computes it that way from the SAME parameters: fewer FLOPs (7^3 = 343 taps
  instead of 27 + 125 + 343 = 495) and one conv instead of three.
  `conv_impl` ('direct' | 'fft' | 'auto', `plan_conv` per input shape) picks
  the algorithm; 'fft' sums the branch spectra into one (`fused` is moot).

  x: (N, D, H, W, Cin) -> (N, D, H, W, features).
  """
  features: int
  kernels: Sequence[int] = (3, 5, 7)
  fused: bool = False
  dtype: Dtype = jnp.float32
  conv_impl: str = "direct"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for k in self.kernels:
      if k % 2 != 1:
        raise ValueError(f"model.msfe_kernels: sizes must be odd, got {k}")
    weights = [ConvWeights(self.features, k, name=f"conv_k{k}")(x.shape[-1])
               for k in self.kernels]
    algo, tile = plan_conv(self.conv_impl, x.shape, [list(self.kernels)],
                           self.features, self.fused)
    if algo == "fft":
      # One spectrum: the branch spectra add (exactly the fused kernel's).
      return conv3d_fft(x, [[w for w, _ in weights]],
                        sum(b for _, b in weights), self.dtype, tile)
    if not self.fused:
      out = conv3d(x, *weights[0], self.dtype)
      for kernel, bias in weights[1:]:
        out = out + conv3d(x, kernel, bias, self.dtype)
      return out
    k_max = max(self.kernels)
    kernel = sum(_pad_kernel(w, k_max) for w, _ in weights)  # float32
    bias = sum(b for _, b in weights)
    return conv3d(x, kernel, bias, self.dtype)


def _pad_kernel(kernel: Array, size: int) -> Array:
  """Zero-pads a (k,k,k,Cin,Cout) kernel, centred, to (size,size,size,...)."""
  p = (size - kernel.shape[0]) // 2
  return jnp.pad(kernel, [(p, p)] * 3 + [(0, 0)] * 2)


class ChannelAttention(nn.Module):
  """Channel attention (paper section 2.1): F_CA = F_M * a_c.

  a_c = sigmoid(FC_2(ReLU(FC_1(GAP(F_M))))), FC_1: C -> max(1, C // reduction),
  FC_2: -> C. Pooling, MLP and sigmoid run in float32. The weights a_c
  (N, C) are sown as intermediates['attention'].

  x: (N, D, H, W, C) -> (N, D, H, W, C).
  """
  reduction: int = 4

  @nn.compact
  def __call__(self, x: Array) -> Array:
    c = x.shape[-1]
    pooled = jnp.mean(x.astype(jnp.float32), axis=(1, 2, 3))  # (N, C)
    h = nn.relu(nn.Dense(max(1, c // self.reduction), name="fc1")(pooled))
    weights = jax.nn.sigmoid(nn.Dense(c, name="fc2")(h))  # (N, C) in (0, 1)
    self.sow("intermediates", "attention", weights)
    return x * weights[:, None, None, None, :].astype(x.dtype)


class SpatialAttention(nn.Module):
  """Spatial attention (paper section 2.1): F_SA = F_M * a_s.

  a_s = sigmoid(conv_{1x1x1}(F_M)), one map (N, D, H, W, 1) broadcast over the
  channels; the sigmoid runs in float32. The map is sown as
  intermediates['attention'].

  x: (N, D, H, W, C) -> (N, D, H, W, C).
  """
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    logits = conv(1, 1, self.dtype, name="conv")(x)
    weights = jax.nn.sigmoid(logits.astype(jnp.float32))  # in (0, 1)
    self.sow("intermediates", "attention", weights)
    return x * weights.astype(x.dtype)


class ChannelSpatialAttention(nn.Module):
  """CSA (paper section 2.1): F_Out = F_CA + alpha * F_SA.

  Both attentions see the same input; alpha is a learned float32 scalar,
  param 'alpha' (init `alpha_init`).

  x: (N, D, H, W, C) -> (N, D, H, W, C).
  """
  reduction: int = 4
  alpha_init: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    f_ca = ChannelAttention(self.reduction, name="channel_attention")(x)
    f_sa = SpatialAttention(self.dtype, name="spatial_attention")(x)
    alpha = self.param("alpha", nn.initializers.constant(self.alpha_init), (),
                       jnp.float32)
    return f_ca + alpha.astype(x.dtype) * f_sa


CSA = ChannelSpatialAttention


class MSCSA(nn.Module):
  """Multi-Scale Channel Spatial Attention (paper section 2.1, Fig. 2a).

  MSFE -> norm -> activation -> CSA. With `use_csa=False` it is the "MSFE
  block" of Table 2a row 2 (MSFE -> norm -> activation): one MSFE per block,
  so rows 2 and 3 differ by the CSA alone.

  x: (N, D, H, W, Cin) -> (N, D, H, W, features).
  """
  features: int
  msfe_kernels: Sequence[int] = (3, 5, 7)
  msfe_fused: bool = False
  use_csa: bool = True
  csa_reduction: int = 4
  alpha_init: float = 1.0
  norm: str = "instance"
  norm_groups: int = 8
  activation: str = "relu"
  dtype: Dtype = jnp.float32
  conv_impl: str = "direct"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = MSFE(self.features, self.msfe_kernels, self.msfe_fused, self.dtype,
             self.conv_impl, name="msfe")(x)
    x = norm_layer(self.norm, self.dtype, "norm", self.norm_groups)(x)
    x = get_activation(self.activation)(x)
    if self.use_csa:
      x = CSA(self.csa_reduction, self.alpha_init, self.dtype, name="csa")(x)
    return x


class UNetBlock(nn.Module):
  """The plain U-Net block of Table 2a row 1: two 3x3x3 conv-norm-act.

  `use_csa=True` appends a CSA (not a row of the paper; kept so that every
  combination of the config switches builds).

  x: (N, D, H, W, Cin) -> (N, D, H, W, features).
  """
  features: int
  use_csa: bool = False
  csa_reduction: int = 4
  alpha_init: float = 1.0
  norm: str = "instance"
  norm_groups: int = 8
  activation: str = "relu"
  dtype: Dtype = jnp.float32
  conv_impl: str = "direct"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    act = get_activation(self.activation)
    for i in range(2):
      x = Conv(self.features, 3, self.conv_impl, self.dtype,
               name=f"conv_{i}")(x)
      x = act(norm_layer(self.norm, self.dtype, f"norm_{i}",
                         self.norm_groups)(x))
    if self.use_csa:
      x = CSA(self.csa_reduction, self.alpha_init, self.dtype, name="csa")(x)
    return x


def resize_ptv(f_p: Array, grid: Sequence[int], method: str = "avgpool"
               ) -> Array:
  """Brings F_P (N, D, H, W, C) to a coarser stage grid (d, h, w).

  'avgpool': average pooling with window = stride = D / d per axis (integer
    factors only): each stage voxel gets the mean PTV feature of the full-size
    voxels it covers, the same cells the encoder's 2x2x2 poolings merge.
  'linear': jax.image.resize, (anti-aliased) trilinear.
  Pass float32 features: both methods sum many voxels per output voxel.
  """
  n, c = f_p.shape[0], f_p.shape[-1]
  if tuple(grid) == tuple(f_p.shape[1:4]):
    return f_p
  if method == "avgpool":
    factors = []
    for full, small in zip(f_p.shape[1:4], grid):
      if full % small:
        raise ValueError(f"PTV integration: grid {tuple(f_p.shape[1:4])} is "
                         f"not a multiple of the stage grid {tuple(grid)}")
      factors.append(full // small)
    # The block mean by reshape: the same average as nn.avg_pool (window =
    # stride), but its gradient is a broadcast. avg_pool's gradient on the
    # CPU is a reduce_window over the (interior-padded) full grid: 27 s for
    # the 16^3 window at 64^3 (benchmarks/NOTES.md).
    (fd, fh, fw), (d, h, w) = factors, grid
    return f_p.reshape(n, d, fd, h, fh, w, fw, c).mean(axis=(2, 4, 6))
  if method == "linear":
    return jax.image.resize(f_p, (n, *grid, c), "linear")
  raise ValueError(f"model.pi_resize: unknown {method!r}; choose from "
                   "'avgpool', 'linear'")


class PTVIntegration(nn.Module):
  """PTV Integration, PI (paper section 2.2, Fig. 2b), at encoder stage s >= 2.

  F_P is resized to the stage grid (`resize_ptv`, sown as
  intermediates['ptv_resized']). For each k in `kernels`:
    F_E,s_k^Att = SA(conv_k(F_E,s)),  F_P_k^Att = SA(conv_k(F_P)),
  each with its own conv (to `features` = the stage width) and its own spatial
  attention; all 2 * len(kernels) refined maps are summed and a final spatial
  attention gives F_Int,s, the input of the stage's MSCSA.

  f_e: (N, d, h, w, C_e) encoder features entering stage s (after pooling).
  f_p: (N, D, H, W, C_p) stem PTV features at full size.
  Returns F_Int,s: (N, d, h, w, features).
  """
  features: int
  kernels: Sequence[int] = (3, 5, 7)
  resize: str = "avgpool"
  dtype: Dtype = jnp.float32
  conv_impl: str = "direct"

  def _convs(self, x: Array, prefix: str) -> dict:
    """{k: conv_k(x)} for k in `kernels` (params `{prefix}_k{k}`, as
    nn.Conv's); the FFT ones share one FFT of x, one mixing product and one
    inverse FFT (their outputs concatenated along channels)."""
    weights = {k: ConvWeights(self.features, k, name=f"{prefix}_k{k}")(
        x.shape[-1]) for k in self.kernels}
    algo, tile = plan_conv(self.conv_impl, x.shape,
                           [[k] for k in self.kernels], self.features)
    if algo == "direct":
      return {k: conv3d(x, *weights[k], self.dtype) for k in self.kernels}
    y = conv3d_fft(x, [[weights[k][0]] for k in self.kernels],
                   jnp.concatenate([weights[k][1] for k in self.kernels]),
                   self.dtype, tile)
    return {k: y[..., i * self.features:(i + 1) * self.features]
            for i, k in enumerate(self.kernels)}

  @nn.compact
  def __call__(self, f_e: Array, f_p: Array) -> Array:
    # Resized in float32: average pooling by 2^(s-1) sums up to 16^3 values
    # per output voxel at stage 5, far beyond bfloat16's 8-bit mantissa.
    f_p = resize_ptv(f_p.astype(jnp.float32), f_e.shape[1:4], self.resize)
    f_p = f_p.astype(self.dtype)
    self.sow("intermediates", "ptv_resized", f_p)
    f_e_ks = self._convs(f_e, "conv_enc")
    f_p_ks = self._convs(f_p, "conv_ptv")
    refined = []
    for k in self.kernels:
      refined.append(
          SpatialAttention(self.dtype, name=f"sa_enc_k{k}")(f_e_ks[k]))
      refined.append(
          SpatialAttention(self.dtype, name=f"sa_ptv_k{k}")(f_p_ks[k]))
    return SpatialAttention(self.dtype, name="sa_out")(sum(refined))


class AttentionFusion(nn.Module):
  """Attention Fusion, AF (paper section 2.3, Fig. 2c), at decoder stage s.

  F_fused,s = CSA_skip(F_E,s) + beta * CSA_up(F_D,s+1), two separate CSAs and
  a learned float32 scalar beta, param 'beta' (init `beta_init`).

  f_e: (N, D, H, W, C) skip features; f_d: (N, D, H, W, C) upsampled decoder
  features. Returns (N, D, H, W, C).
  """
  reduction: int = 4
  alpha_init: float = 1.0
  beta_init: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, f_e: Array, f_d: Array) -> Array:
    if f_e.shape != f_d.shape:
      raise ValueError(f"AttentionFusion: skip {f_e.shape} and upsampled "
                       f"{f_d.shape} features differ in shape")
    a_e = CSA(self.reduction, self.alpha_init, self.dtype, name="csa_skip")(f_e)
    a_d = CSA(self.reduction, self.alpha_init, self.dtype, name="csa_up")(f_d)
    beta = self.param("beta", nn.initializers.constant(self.beta_init), (),
                      jnp.float32)
    return a_e + beta.astype(a_d.dtype) * a_d


class Downsample(nn.Module):
  """2x down between encoder stages: (N, D, H, W, C) -> (N, D/2, H/2, W/2, C).

  'maxpool': 2x2x2 max pooling (no params). 'conv': a 2x2x2 stride-2 conv
  keeping the channel count (param 'conv').
  """
  mode: str = "maxpool"
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.mode == "maxpool":
      return nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2))
    if self.mode == "conv":
      return nn.Conv(x.shape[-1], (2, 2, 2), strides=(2, 2, 2), padding="VALID",
                     dtype=self.dtype, param_dtype=jnp.float32, name="conv")(x)
    raise ValueError(f"model.down: unknown {self.mode!r}; choose from "
                     "'maxpool', 'conv'")


class Upsample(nn.Module):
  """2x up in the decoder: (N, D, H, W, Cin) -> (N, 2D, 2H, 2W, features).

  'transpose': a 2x2x2 stride-2 transposed conv (`conv_impl` other than
  'direct': as a matmul and a depth-to-space reshape, same params and math). 'resize': trilinear resize
  then a 1x1x1 conv. Either way the param is 'conv'.
  """
  features: int
  mode: str = "transpose"
  dtype: Dtype = jnp.float32
  conv_impl: str = "direct"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.mode == "transpose" and resolve_conv_impl(
        self.conv_impl, AUTO_FFT_MIN_KERNEL) == "direct":
      return nn.ConvTranspose(self.features, (2, 2, 2), strides=(2, 2, 2),
                              padding="VALID", dtype=self.dtype,
                              param_dtype=jnp.float32, name="conv")(x)
    if self.mode == "transpose":
      # With conv_impl 'fft' (or 'auto' on the CPU): the same params as
      # nn.ConvTranspose(features, (2,2,2), strides 2, 'VALID')'s params and
      # math: no two output voxels share an input tap, so it is one matmul
      # (Cin -> 8 * features) and a depth-to-space reshape,
      #   y[2i + a, 2j + b, 2k + c] = x[i, j, k] @ kernel[1 - a, 1 - b, 1 - c]
      # (lax.conv_transpose flips nothing; the dilated-conv lowering reads the
      # kernel mirrored). XLA's CPU conv_transpose took 5.7 s fwd+bwd at
      # 32^3 x 16 -> 64^3 x 8 (benchmarks/NOTES.md).
      kernel, bias = ConvWeights(self.features, 2, name="conv")(x.shape[-1])
      n, d, h, w, _ = x.shape
      kernel = kernel[::-1, ::-1, ::-1].astype(self.dtype)
      y = jnp.einsum("ndhwi,abcio->ndahbwco", x.astype(self.dtype), kernel)
      y = y.reshape(n, 2 * d, 2 * h, 2 * w, self.features)
      return y + bias.astype(self.dtype)
    if self.mode == "resize":
      n, d, h, w, c = x.shape
      x = jax.image.resize(x, (n, 2 * d, 2 * h, 2 * w, c), "linear")
      return conv(self.features, 1, self.dtype, name="conv")(x)
    raise ValueError(f"model.up: unknown {self.mode!r}; choose from "
                     "'transpose', 'resize'")
