"""The 3D convolution computed directly or in the frequency domain.

All arrays are channels-last, (N, D, H, W, C); kernels (k, k, k, Cin, Cout),
'SAME' padding, stride 1:
  direct     `conv3d`: lax's convolution.
  FFT        `conv3d_fft`: the whole grid in the frequency domain; convs of
             one input share its FFT, convs whose outputs are summed share
             one spectrum.
  tiled FFT  `conv3d_fft(..., tile=t)`: overlap-save tiles, so the spectra
             are the size of a tile.
Every algorithm computes the same math (to float32 rounding); the FFT path
computes in float32. `conv_planner` chooses between them.
"""

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
Array = jax.Array

# lax dimension numbers for channels-last 3D convolutions.
_CONV_DIMS = ("NDHWC", "DHWIO", "NDHWC")


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
