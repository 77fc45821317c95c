"""The blocks of RANDose (paper section 2, Fig. 2; docs/design.md section 3).

Each equation of the paper lives in one block:
  MSFE                      2.1: F_M = sum_n conv_{n x n x n}(F_In)
  ChannelAttention          2.1: F_CA = F_M * sigmoid(FC(ReLU(FC(GAP(F_M)))))
  SpatialAttention          2.1: F_SA = F_M * sigmoid(conv_{1x1x1}(F_M))
  ChannelSpatialAttention   2.1: F_Out = F_CA + alpha * F_SA   (alias CSA)
  MSCSA                     2.1, Fig. 2a: MSFE -> norm -> activation -> CSA
  PTVIntegration            2.2, Fig. 2b: F_Int,s
  AttentionFusion           2.3, Fig. 2c: F_fused,s = F_E,s^A + beta * F_D,s+1^A
  UNetBlock                 Table 2a row 1: two 3x3x3 conv-norm-act
  Downsample, Upsample      the U-Net's 2x resampling between stages

Blocks get their layers as fields, built once by `RANDose`: `conv` makes a
`conv.Conv` (how a conv is computed is decided there; a block never knows),
`norm(name=...)` the normalisation after a conv, `act` the activation. The
defaults (direct float32 convs, instance norm, ReLU) let a block run alone.

All arrays are channels-last 3D volumes, (N, D, H, W, C). Parameters are
float32; the compute dtype is the conv's (the input's for parameter-free
steps). Where numerical range matters (instance-norm statistics, the channel
attention pooling and MLP, every sigmoid) the computation runs in float32 and
only the result is cast back.
"""

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from randose_jax.models.conv import Conv
from randose_jax.models.conv import conv_each
from randose_jax.models.conv import conv_sum

Array = jax.Array
ModuleDef = Any

# The normalisation after each conv by default: per-sample, per-channel
# statistics over (D, H, W) with a learned scale and bias (docs/design.md: batch 2
# makes batch norm a poor fit); statistics are reduced in float32.
InstanceNorm = functools.partial(
    nn.InstanceNorm, epsilon=1e-5, param_dtype=jnp.float32
)


class MSFE(nn.Module):
  """Multi-Scale Feature Extraction (paper section 2.1, Fig. 2a).

  F_M = sum over n in `kernels` of conv_{n x n x n}(F_In): parallel 'SAME'
  convs, each with its own kernel and bias (params `conv_k3`, `conv_k5`, ...),
  summed element-wise (`conv.conv_sum` computes the sum in one pass).

  x: (N, D, H, W, Cin) -> (N, D, H, W, features).
  """

  features: int
  kernels: Sequence[int] = (3, 5, 7)
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for k in self.kernels:
      if k % 2 != 1:
        raise ValueError(f"model.msfe_kernels: sizes must be odd, got {k}")
    return conv_sum(
        [self.conv(self.features, k, name=f"conv_k{k}") for k in self.kernels],
        x,
    )


class ChannelAttention(nn.Module):
  """Channel attention, CA (paper section 2.1): F_CA = F_M * a_c.

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
  """Spatial attention, SA (paper section 2.1): F_SA = F_M * a_s.

  a_s = sigmoid(conv_{1x1x1}(F_M)), one map (N, D, H, W, 1) broadcast over the
  channels; the sigmoid runs in float32. The map is sown as
  intermediates['attention'].

  x: (N, D, H, W, C) -> (N, D, H, W, C).
  """

  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, x: Array) -> Array:
    logits = self.conv(1, 1, name="conv")(x)
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
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, x: Array) -> Array:
    f_ca = ChannelAttention(self.reduction, name="channel_attention")(x)
    f_sa = SpatialAttention(self.conv, name="spatial_attention")(x)
    alpha = self.param(
        "alpha", nn.initializers.constant(self.alpha_init), (), jnp.float32
    )
    return f_ca + alpha.astype(x.dtype) * f_sa


CSA = ChannelSpatialAttention


class StageBlock(nn.Module):
  """The fields of a block of an encoder or decoder stage (MSCSA or
  UNetBlock): output width, whether a CSA ends it (its reduction and alpha
  init), and the layers it is built from.

  x: (N, D, H, W, Cin) -> (N, D, H, W, features).
  """

  features: int
  use_csa: bool = True
  csa_reduction: int = 4
  alpha_init: float = 1.0
  conv: ModuleDef = Conv
  norm: Callable[..., Callable[[Array], Array]] = InstanceNorm
  act: Callable[[Array], Array] = nn.relu


class MSCSA(StageBlock):
  """Multi-Scale Channel Spatial Attention (paper section 2.1, Fig. 2a).

  MSFE -> norm -> activation -> CSA. With `use_csa=False` it is the "MSFE
  block" of Table 2a row 2 (MSFE -> norm -> activation): one MSFE per block,
  so rows 2 and 3 differ by the CSA alone.
  """

  msfe_kernels: Sequence[int] = (3, 5, 7)

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = MSFE(self.features, self.msfe_kernels, self.conv, name="msfe")(x)
    x = self.act(self.norm(name="norm")(x))
    if self.use_csa:
      x = CSA(self.csa_reduction, self.alpha_init, self.conv, name="csa")(x)
    return x


class UNetBlock(StageBlock):
  """The plain U-Net block of Table 2a row 1: two 3x3x3 conv-norm-act.

  `use_csa=True` appends a CSA (not a row of the paper; kept so that every
  combination of the config switches builds).
  """

  use_csa: bool = False

  @nn.compact
  def __call__(self, x: Array) -> Array:
    for i in range(2):
      x = self.conv(self.features, 3, name=f"conv_{i}")(x)
      x = self.act(self.norm(name=f"norm_{i}")(x))
    if self.use_csa:
      x = CSA(self.csa_reduction, self.alpha_init, self.conv, name="csa")(x)
    return x


def resize_ptv(
    f_p: Array, grid: Sequence[int], method: str = "avgpool"
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
        raise ValueError(
            f"PTV integration: grid {tuple(f_p.shape[1:4])} is "
            f"not a multiple of the stage grid {tuple(grid)}"
        )
      factors.append(full // small)
    # The block mean by reshape: the same average as nn.avg_pool (window =
    # stride), but its gradient is a broadcast, where avg_pool's gradient on
    # the CPU is a slow reduce_window over the (interior-padded) full grid
    # (benchmarks/NOTES.md).
    (fd, fh, fw), (d, h, w) = factors, grid
    return f_p.reshape(n, d, fd, h, fh, w, fw, c).mean(axis=(2, 4, 6))
  if method == "linear":
    return jax.image.resize(f_p, (n, *grid, c), "linear")
  raise ValueError(
      f"model.pi_resize: unknown {method!r}; choose from " "'avgpool', 'linear'"
  )


class PTVIntegration(nn.Module):
  """PTV Integration, PI (paper section 2.2, Fig. 2b), at encoder stage s >= 2.

  F_P is resized to the stage grid (`resize_ptv`, sown as
  intermediates['ptv_resized']). For each k in `kernels`:
    F_E,s_k^Att = SA(conv_k(F_E,s)),  F_P_k^Att = SA(conv_k(F_P)),
  each with its own conv (to `features` = the stage width, params
  `conv_enc_k{k}`, `conv_ptv_k{k}`) and its own spatial attention; all
  2 * len(kernels) refined maps are summed and a final spatial attention
  gives F_Int,s, the input of the stage's MSCSA.

  f_e: (N, d, h, w, C_e) encoder features entering stage s (after pooling).
  f_p: (N, D, H, W, C_p) stem PTV features at full size.
  Returns F_Int,s: (N, d, h, w, features).
  """

  features: int
  kernels: Sequence[int] = (3, 5, 7)
  resize: str = "avgpool"
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, f_e: Array, f_p: Array) -> Array:
    # Resized in float32: average pooling by 2^(s-1) sums up to 16^3 values
    # per output voxel at stage 5, far beyond bfloat16's 8-bit mantissa.
    f_p = resize_ptv(f_p.astype(jnp.float32), f_e.shape[1:4], self.resize)
    f_p = f_p.astype(f_e.dtype)
    self.sow("intermediates", "ptv_resized", f_p)
    f_e_ks = conv_each(
        [
            self.conv(self.features, k, name=f"conv_enc_k{k}")
            for k in self.kernels
        ],
        f_e,
    )
    f_p_ks = conv_each(
        [
            self.conv(self.features, k, name=f"conv_ptv_k{k}")
            for k in self.kernels
        ],
        f_p,
    )
    refined = []
    for k, f_e_k, f_p_k in zip(self.kernels, f_e_ks, f_p_ks):
      refined.append(SpatialAttention(self.conv, name=f"sa_enc_k{k}")(f_e_k))
      refined.append(SpatialAttention(self.conv, name=f"sa_ptv_k{k}")(f_p_k))
    return SpatialAttention(self.conv, name="sa_out")(sum(refined))


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
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, f_e: Array, f_d: Array) -> Array:
    if f_e.shape != f_d.shape:
      raise ValueError(
          f"AttentionFusion: skip {f_e.shape} and upsampled "
          f"{f_d.shape} features differ in shape"
      )
    a_e = CSA(self.reduction, self.alpha_init, self.conv, name="csa_skip")(f_e)
    a_d = CSA(self.reduction, self.alpha_init, self.conv, name="csa_up")(f_d)
    beta = self.param(
        "beta", nn.initializers.constant(self.beta_init), (), jnp.float32
    )
    return a_e + beta.astype(a_d.dtype) * a_d


class Downsample(nn.Module):
  """2x down between encoder stages: (N, D, H, W, C) -> (N, D/2, H/2, W/2, C).

  'maxpool': 2x2x2 max pooling (no params). 'conv': a 2x2x2 stride-2 conv
  keeping the channel count (param 'conv', computed in x's dtype).
  """

  mode: str = "maxpool"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.mode == "maxpool":
      return nn.max_pool(x, (2, 2, 2), strides=(2, 2, 2))
    if self.mode == "conv":
      return nn.Conv(
          x.shape[-1],
          (2, 2, 2),
          strides=(2, 2, 2),
          padding="VALID",
          dtype=x.dtype,
          param_dtype=jnp.float32,
          name="conv",
      )(x)
    raise ValueError(
        f"model.down: unknown {self.mode!r}; choose from " "'maxpool', 'conv'"
    )


class Upsample(nn.Module):
  """2x up in the decoder: (N, D, H, W, Cin) -> (N, 2D, 2H, 2W, features).

  'transpose': a 2x2x2 stride-2 transposed conv (`conv.Conv.transposed`).
  'resize': trilinear resize then a 1x1x1 conv. Either way the param is
  'conv'.
  """

  features: int
  mode: str = "transpose"
  conv: ModuleDef = Conv

  @nn.compact
  def __call__(self, x: Array) -> Array:
    if self.mode == "transpose":
      return self.conv(self.features, 2, name="conv").transposed(x)
    if self.mode == "resize":
      n, d, h, w, c = x.shape
      x = jax.image.resize(x, (n, 2 * d, 2 * h, 2 * w, c), "linear")
      return self.conv(self.features, 1, name="conv")(x)
    raise ValueError(
        f"model.up: unknown {self.mode!r}; choose from " "'transpose', 'resize'"
    )
