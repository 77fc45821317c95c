"""RANDose, the network (paper section 2, Fig. 1; DESIGN.md section 3).

A U-shaped encoder/decoder with S = len(widths) stages, channels-last.

  inputs  ptv (N,D,H,W,1), ct (N,D,H,W,1), oar (N,D,H,W,7)
  stem    F_P, F_C, F_O = conv_ptv(ptv), conv_ct(ct), conv_oar(oar)   (widths[0] each)
          x = concat(F_P, F_C, F_O)                                    (3 * widths[0])
  encoder stage 1:     F_E,1 = blocks(x)
          stage s > 1: x = down(F_E,s-1); x = PI(x, F_P) if use_pi; F_E,s = blocks(x)
  decoder stage s = S-1 .. 1:
          u = up(F_D,s+1) to widths[s-1]         (F_D,S = F_E,S)
          x = AF(F_E,s, u) if use_af else concat(F_E,s, u)
          F_D,s = blocks(x)
  head    1x1x1 conv to one channel -> (N,D,H,W,1) float32, target units (dose / 70)

"blocks" are `blocks_per_stage` blocks of one kind, each mapping to the
stage width: MSCSA (use_msfe and use_csa), the MSFE block of Table 2a row 2
(one MSFE -> norm -> act per block, so rows 2 and 3 differ by the CSA alone;
use_msfe only) or the plain U-Net block of row 1 (two 3x3x3 conv-norm-act).
Decoder stages use the same kind as the encoder. The stem convs are plain
convs (no norm or activation): the paper's "a convolutional layer". PI's F_E,s
is the pooled input of stage s; AF's F_E,s is the output of encoder stage s.

Every layer is convolutional, so the params do not depend on the grid: `init`
(which runs a forward pass) is cheapest on a small input, 2^(S-1) voxels per
axis, and the params then serve any grid.

Top-level parameter groups: stem_ptv, stem_ct, stem_oar, encoder_{s}, down_{s}
(only with down='conv'), pi_{s} (s >= 2, use_pi), up_{s}, af_{s} (use_af),
decoder_{s} (s < S), head. Inside encoder_{s} / decoder_{s} the blocks are
blocks_0, blocks_1, ...; CSA's alpha lives at .../csa/alpha (and in AF at
af_{s}/csa_skip/alpha, af_{s}/csa_up/alpha); AF's beta at af_{s}/beta.
"""

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from randose_jax.models import layers

Array = jax.Array

_INPUT_CHANNELS = {"ptv": 1, "ct": 1, "oar": 7}
HEAD_INITS = {"lecun": nn.initializers.lecun_normal(),
              "zeros": nn.initializers.zeros_init()}


class Stage(nn.Module):
  """The blocks of one encoder or decoder stage, applied in order.

  blocks: unbound modules (created with parent=None) so their params nest
  under this stage as blocks_0, blocks_1, ...
  """
  blocks: Sequence[nn.Module]

  def __call__(self, x: Array) -> Array:
    for block in self.blocks:
      x = block(x)
    return x


class RANDose(nn.Module):
  """The Region-aware Attention Network (fields mirror `config.model`).

  __call__(inputs) with inputs a dict of float32 arrays ptv (N,D,H,W,1),
  ct (N,D,H,W,1), oar (N,D,H,W,7), D, H, W divisible by 2^(S-1); returns the
  predicted dose (N,D,H,W,1) float32 in target units.
  """
  widths: Sequence[int] = (16, 32, 64, 128, 256)
  use_msfe: bool = True
  use_csa: bool = True
  use_pi: bool = True
  use_af: bool = True
  msfe_kernels: Sequence[int] = (3, 5, 7)
  pi_kernels: Sequence[int] = (3, 5, 7)
  msfe_fused: bool = False
  stem_kernel: int = 3
  blocks_per_stage: int = 1
  csa_reduction: int = 4
  alpha_init: float = 1.0
  beta_init: float = 1.0
  norm: str = "instance"
  norm_groups: int = 8
  activation: str = "relu"
  down: str = "maxpool"
  up: str = "transpose"
  pi_resize: str = "avgpool"
  dtype: Any = jnp.float32
  remat: bool = False
  conv_impl: str = "direct"
  head_init: str = "zeros"

  def _maybe_remat(self, cls):
    return nn.remat(cls) if self.remat else cls

  def _stage(self, features: int, name: str) -> Stage:
    """`blocks_per_stage` blocks of the row's kind; all map to `features`."""
    if self.use_msfe:
      cls = self._maybe_remat(layers.MSCSA)
      kwargs = dict(msfe_kernels=tuple(self.msfe_kernels),
                    msfe_fused=self.msfe_fused)
    else:
      cls = self._maybe_remat(layers.UNetBlock)
      kwargs = {}
    kwargs["conv_impl"] = self.conv_impl
    blocks = [
        cls(features, use_csa=self.use_csa, csa_reduction=self.csa_reduction,
            alpha_init=self.alpha_init, norm=self.norm,
            norm_groups=self.norm_groups, activation=self.activation,
            dtype=self.dtype, parent=None, **kwargs)
        for _ in range(self.blocks_per_stage)
    ]
    return Stage(blocks, name=name)

  def _check_inputs(self, inputs) -> tuple[int, int, int]:
    grid = None
    for key, channels in _INPUT_CHANNELS.items():
      if key not in inputs:
        raise ValueError(f"RANDose: input dict lacks {key!r} (has "
                         f"{sorted(inputs)})")
      shape = inputs[key].shape
      if len(shape) != 5 or shape[-1] != channels:
        raise ValueError(f"RANDose: input {key!r} has shape {shape}; expected "
                         f"(N, D, H, W, {channels})")
      if grid is not None and shape[:4] != grid:
        raise ValueError(f"RANDose: input {key!r} has shape {shape}, the "
                         f"others (N, D, H, W) = {grid}")
      grid = shape[:4]
    factor = 2 ** (len(self.widths) - 1)
    if any(n % factor for n in grid[1:]):
      raise ValueError(f"RANDose: grid {grid[1:]} is not divisible by "
                       f"2^(S-1) = {factor} (S = {len(self.widths)} stages)")
    return grid[1:]

  @nn.compact
  def __call__(self, inputs) -> Array:
    self._check_inputs(inputs)
    dtype = jnp.dtype(self.dtype)
    widths = tuple(self.widths)
    num_stages = len(widths)

    # Stem: one conv per input; F_P is kept for PI.
    feats = {}
    for key in ("ptv", "ct", "oar"):
      feats[key] = layers.Conv(widths[0], self.stem_kernel, self.conv_impl,
                               dtype, name=f"stem_{key}")(
                                   inputs[key].astype(dtype))
    f_p = feats["ptv"]
    x = jnp.concatenate([feats["ptv"], feats["ct"], feats["oar"]], axis=-1)

    # Encoder.
    skips = []
    for s in range(1, num_stages + 1):
      if s > 1:
        x = layers.Downsample(self.down, dtype, name=f"down_{s}")(x)
        if self.use_pi:
          pi = self._maybe_remat(layers.PTVIntegration)
          x = pi(widths[s - 1], tuple(self.pi_kernels), self.pi_resize, dtype,
                 self.conv_impl, name=f"pi_{s}")(x, f_p)
      x = self._stage(widths[s - 1], name=f"encoder_{s}")(x)
      skips.append(x)

    # Decoder: x starts as F_E,S.
    for s in range(num_stages - 1, 0, -1):
      up = layers.Upsample(widths[s - 1], self.up, dtype, self.conv_impl,
                           name=f"up_{s}")(x)
      skip = skips[s - 1]
      if self.use_af:
        af = self._maybe_remat(layers.AttentionFusion)
        x = af(self.csa_reduction, self.alpha_init, self.beta_init, dtype,
               name=f"af_{s}")(skip, up)
      else:
        x = jnp.concatenate([skip, up], axis=-1)
      x = self._stage(widths[s - 1], name=f"decoder_{s}")(x)

    # Head in float32: the dose regression output needs no bf16 rounding.
    # head_init='zeros' starts every prediction at 0 (benchmarks/NOTES.md,
    # "Why the full RANDose learned slowly").
    if self.head_init not in HEAD_INITS:
      raise ValueError(f"model.head_init: unknown {self.head_init!r}; choose "
                       f"from {sorted(HEAD_INITS)}")
    out = nn.Conv(1, (1, 1, 1), dtype=jnp.float32, param_dtype=jnp.float32,
                  kernel_init=HEAD_INITS[self.head_init],
                  name="head")(x.astype(jnp.float32))
    return out.astype(jnp.float32)


def create_model(model_config) -> nn.Module:
  """The network that `config.model` describes (DESIGN.md section 3).

  model_config: an ml_collections.ConfigDict (or anything with the same
  attributes); see `randose_jax/default_config.py` for the fields.
  """
  name = model_config.get("name", "randose")
  if name != "randose":
    raise ValueError(f"model.name: unknown {name!r}; only 'randose'")
  dtypes = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
  if model_config.dtype not in dtypes:
    raise ValueError(f"model.dtype: unknown {model_config.dtype!r}; choose "
                     f"from {sorted(dtypes)}")
  if len(model_config.widths) < 1 or model_config.blocks_per_stage < 1:
    raise ValueError("model.widths and model.blocks_per_stage must be "
                     "non-empty / at least 1")
  return RANDose(
      widths=tuple(model_config.widths),
      use_msfe=model_config.use_msfe,
      use_csa=model_config.use_csa,
      use_pi=model_config.use_pi,
      use_af=model_config.use_af,
      msfe_kernels=tuple(model_config.msfe_kernels),
      pi_kernels=tuple(model_config.pi_kernels),
      msfe_fused=model_config.msfe_fused,
      stem_kernel=model_config.stem_kernel,
      blocks_per_stage=model_config.blocks_per_stage,
      csa_reduction=model_config.csa_reduction,
      alpha_init=model_config.alpha_init,
      beta_init=model_config.beta_init,
      norm=model_config.norm,
      norm_groups=model_config.get("norm_groups", 8),
      activation=model_config.activation,
      down=model_config.down,
      up=model_config.up,
      pi_resize=model_config.get("pi_resize", "avgpool"),
      dtype=dtypes[model_config.dtype],
      remat=model_config.remat,
      conv_impl=model_config.get("conv_impl", "direct"),
      head_init=model_config.get("head_init", "zeros"),
  )
