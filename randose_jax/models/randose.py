"""RANDose, the network (paper section 2, Fig. 1; docs/design.md section 3).

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

`RANDose` builds the blocks' layers once from its string fields: `conv`
(`conv.Conv` with `conv_impl`, the compute dtype and `msfe_fused`), `norm`
and `act`; the blocks receive them as fields.

Top-level parameter groups: stem_ptv, stem_ct, stem_oar, encoder_{s}, down_{s}
(only with down='conv'), pi_{s} (s >= 2, use_pi), up_{s}, af_{s} (use_af),
decoder_{s} (s < S), head. Inside encoder_{s} / decoder_{s} the blocks are
blocks_0, blocks_1, ...; CSA's alpha lives at .../csa/alpha (and in AF at
af_{s}/csa_skip/alpha, af_{s}/csa_up/alpha); AF's beta at af_{s}/beta.
"""

import dataclasses
import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from randose_jax.conventions import INPUT_CHANNELS

from randose_jax.default_config import ConfigError
from randose_jax.models import blocks
from randose_jax.models import conv as conv_lib
from randose_jax.ops import conv_planner

Array = jax.Array

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
ACTIVATIONS = {
    "relu": nn.relu,
    "leaky_relu": nn.leaky_relu,
    "gelu": nn.gelu,
    "silu": nn.silu,
}
NORMS = ("instance", "group", "none")
HEAD_INITS = {
    "lecun": nn.initializers.lecun_normal(),
    "zeros": nn.initializers.zeros_init(),
}


def _identity(x: Array) -> Array:
  return x


def make_norm(kind: str, groups: int, dtype):
  """The normalisation after each conv: `norm(name=...)` gives a module (or
  the identity) applied to (N, D, H, W, C) features.

  'instance': `blocks.InstanceNorm` computing in `dtype`.
  'group': GroupNorm with gcd(groups, C) groups (also batch-free).
  'none': identity.
  Statistics are always reduced in float32 (flax's `force_float32_reductions`).
  """
  if kind == "instance":
    return functools.partial(blocks.InstanceNorm, dtype=dtype)
  if kind == "group":
    return lambda name: lambda x: nn.GroupNorm(
        num_groups=math.gcd(groups, x.shape[-1]),
        epsilon=1e-5,
        dtype=dtype,
        param_dtype=jnp.float32,
        name=name,
    )(x)
  return lambda name: _identity


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


def _check_choice(field: str, value, choices) -> None:
  if value not in choices:
    raise ConfigError(
        f"model.{field}: unknown {value!r}; choose from {sorted(choices)}"
    )


class RANDose(nn.Module):
  """The Region-aware Attention Network; the fields are `config.model`'s
  (`randose_jax/default_config.py` documents them; the defaults are the
  same). An unknown choice is a `ConfigError` naming the field.

  __call__(inputs) with inputs a dict of float32 arrays ptv (N,D,H,W,1),
  ct (N,D,H,W,1), oar (N,D,H,W,7) and optionally geom (N,D,H,W,G) (joins
  the PTV stem's input), D, H, W divisible by 2^(S-1); returns the
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
  dtype: Any = "float32"
  remat: bool = False
  conv_impl: str = "auto"
  head_init: str = "zeros"
  # The backend the convolutions are planned for (not a config field:
  # `create_model` sets JAX's default backend; None: the same, when traced).
  backend: str | None = None

  def __post_init__(self):
    if len(self.widths) < 1 or self.blocks_per_stage < 1:
      raise ConfigError(
          "model.widths and model.blocks_per_stage must be "
          "non-empty / at least 1"
      )
    for k in self.msfe_kernels:
      if k % 2 != 1:
        raise ConfigError(f"model.msfe_kernels: sizes must be odd, got {k}")
    _check_choice("dtype", self.dtype_name, DTYPES)
    _check_choice("norm", self.norm, NORMS)
    _check_choice("activation", self.activation, ACTIVATIONS)
    _check_choice("down", self.down, ("maxpool", "conv"))
    _check_choice("up", self.up, ("transpose", "resize"))
    _check_choice("pi_resize", self.pi_resize, ("avgpool", "linear"))
    _check_choice("conv_impl", self.conv_impl, conv_planner.CONV_IMPLS)
    _check_choice("head_init", self.head_init, HEAD_INITS)
    super().__post_init__()

  @property
  def dtype_name(self) -> str:
    """'float32' | 'bfloat16' (`dtype` may be the name or the dtype)."""
    if isinstance(self.dtype, str):
      return self.dtype
    return jnp.dtype(self.dtype).name

  def _maybe_remat(self, cls):
    return nn.remat(cls) if self.remat else cls

  def _stage(self, features: int, name: str, layers: dict) -> Stage:
    """`blocks_per_stage` blocks of the row's kind; all map to `features`."""
    if self.use_msfe:
      block = functools.partial(
          self._maybe_remat(blocks.MSCSA), msfe_kernels=tuple(self.msfe_kernels)
      )
    else:
      block = self._maybe_remat(blocks.UNetBlock)
    return Stage(
        [
            block(
                features,
                use_csa=self.use_csa,
                csa_reduction=self.csa_reduction,
                alpha_init=self.alpha_init,
                parent=None,
                **layers,
            )
            for _ in range(self.blocks_per_stage)
        ],
        name=name,
    )

  def _check_inputs(self, inputs) -> tuple[int, int, int]:
    grid = None
    expected = dict(INPUT_CHANNELS)
    if "geom" in inputs:  # as many as the data config makes
      expected["geom"] = inputs["geom"].shape[-1]
    for key, channels in expected.items():
      if key not in inputs:
        raise ValueError(
            f"RANDose: input dict lacks {key!r} (has {sorted(inputs)})"
        )
      shape = inputs[key].shape
      if len(shape) != 5 or shape[-1] != channels:
        raise ValueError(
            f"RANDose: input {key!r} has shape {shape}; expected "
            f"(N, D, H, W, {channels})"
        )
      if grid is not None and shape[:4] != grid:
        raise ValueError(
            f"RANDose: input {key!r} has shape {shape}, the "
            f"others (N, D, H, W) = {grid}"
        )
      grid = shape[:4]
    factor = grid_factor(self.widths)
    if any(n % factor for n in grid[1:]):
      raise ValueError(
          f"RANDose: grid {grid[1:]} is not divisible by "
          f"2^(S-1) = {factor} (S = {len(self.widths)} stages)"
      )
    return grid[1:]

  @nn.compact
  def __call__(self, inputs) -> Array:
    self._check_inputs(inputs)
    dtype = DTYPES[self.dtype_name]
    widths = tuple(self.widths)
    num_stages = len(widths)
    # The layers every block uses, built once.
    conv = functools.partial(
        conv_lib.Conv,
        impl=self.conv_impl,
        dtype=dtype,
        fuse_sums=self.msfe_fused,
        backend=self.backend,
    )
    layers = dict(
        conv=conv,
        norm=make_norm(self.norm, self.norm_groups, dtype),
        act=ACTIVATIONS[self.activation],
    )

    # Stem: one conv per input; F_P is kept for PI. The optional geometry
    # channels (signed distances to the PTVs) describe the targets, so they
    # join the PTV input of the PTV stem.
    stem_inputs = dict(inputs)
    if "geom" in inputs:
      stem_inputs["ptv"] = jnp.concatenate(
          [inputs["ptv"], inputs["geom"]], axis=-1
      )
    feats = {
        key: conv(widths[0], self.stem_kernel, name=f"stem_{key}")(
            stem_inputs[key].astype(dtype)
        )
        for key in ("ptv", "ct", "oar")
    }
    f_p = feats["ptv"]
    x = jnp.concatenate([feats["ptv"], feats["ct"], feats["oar"]], axis=-1)

    # Encoder.
    skips = []
    for s in range(1, num_stages + 1):
      if s > 1:
        x = blocks.Downsample(self.down, name=f"down_{s}")(x)
        if self.use_pi:
          pi = self._maybe_remat(blocks.PTVIntegration)
          x = pi(
              widths[s - 1],
              tuple(self.pi_kernels),
              self.pi_resize,
              conv,
              name=f"pi_{s}",
          )(x, f_p)
      x = self._stage(widths[s - 1], f"encoder_{s}", layers)(x)
      skips.append(x)

    # Decoder: x starts as F_E,S.
    for s in range(num_stages - 1, 0, -1):
      up = blocks.Upsample(widths[s - 1], self.up, conv, name=f"up_{s}")(x)
      skip = skips[s - 1]
      if self.use_af:
        af = self._maybe_remat(blocks.AttentionFusion)
        x = af(
            self.csa_reduction,
            self.alpha_init,
            self.beta_init,
            conv,
            name=f"af_{s}",
        )(skip, up)
      else:
        x = jnp.concatenate([skip, up], axis=-1)
      x = self._stage(widths[s - 1], f"decoder_{s}", layers)(x)

    # Head in float32: the dose regression output needs no bf16 rounding.
    # head_init='zeros' starts every prediction at 0 (benchmarks/NOTES.md,
    # "Why the full RANDose learned slowly").
    out = nn.Conv(
        1,
        (1, 1, 1),
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        kernel_init=HEAD_INITS[self.head_init],
        name="head",
    )(x.astype(jnp.float32))
    return out.astype(jnp.float32)


# config.model's fields: RANDose's, and `name` (which network).
def grid_factor(widths) -> int:
  """2^(S-1): what every grid edge the network sees must be a multiple of
  (S = len(widths) stages, each but the last halving the grid)."""
  return 2 ** (len(tuple(widths)) - 1)


def input_specs(grid, batch: int = 1, channels=None) -> dict:
  """ShapeDtypeStructs of the model's inputs, float32 (batch, *grid, C):
  `channels` maps each input to its channels (default `INPUT_CHANNELS`;
  `encoding.input_channels(config.data)` for a run with the `geom` input).
  The one statement of the inputs (training's init, `costs`)."""
  channels = INPUT_CHANNELS if channels is None else channels
  return {
      k: jax.ShapeDtypeStruct((batch, *tuple(grid), c), jnp.float32)
      for k, c in channels.items()
  }


MODEL_FIELDS = tuple(
    f.name
    for f in dataclasses.fields(RANDose)
    if f.name not in ("parent", "name", "backend")
)


def create_model(model_config, backend: str | None = None) -> RANDose:
  """`RANDose(**config.model)` (docs/design.md section 3).

  model_config: an ml_collections.ConfigDict or a mapping with the fields of
  `randose_jax/default_config.py`'s `config.model`; `name` must be
  'randose' (the only network). A missing field takes RANDose's default
  (the default config's). ConfigError names an unknown field or value.
  backend: the backend whose convolution plan to use (None: JAX's default
  backend, read now).
  """
  # Sequences read back from a JSON config are lists; the module's are tuples.
  fields = {
      k: tuple(v) if isinstance(v, list) else v
      for k, v in dict(model_config).items()
  }
  name = fields.pop("name", "randose")
  if name != "randose":
    raise ConfigError(f"model.name: unknown {name!r}; only 'randose'")
  unknown = sorted(set(fields) - set(MODEL_FIELDS))
  if unknown:
    raise ConfigError(
        f"model.{unknown[0]}: unknown field; RANDose's fields "
        f"are {', '.join(MODEL_FIELDS)}"
    )
  return RANDose(**fields, backend=backend or jax.default_backend())
