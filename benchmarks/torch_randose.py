"""RANDose in PyTorch: the twin of `randose_jax.models` for benchmarks.

The same network as docs/design.md section 3 and `randose_jax.models.RANDose`: the
same layers, defaults and parameter count, built from the same `config.model`
fields, so that timings compare the frameworks and not two models. Module
names mirror the Flax parameter tree (`encoder_1.blocks_0.msfe.conv_k3` is
`encoder_1/blocks_0/msfe/conv_k3`), so `load_flax_params` is a path-by-path
copy; `tests/test_torch_twin.py` uses it to show both forwards agree.

Layout: tensors are (N, C, D, H, W) as PyTorch expects (the benchmark keeps
them in `torch.channels_last_3d` memory, which is the fast one on CPU), with
the project's grid axes: D anterior to posterior, H patient left/right,
W superior to inferior. Inputs are a dict of `ptv` (N,1,D,H,W), `ct`
(N,1,D,H,W) and `oar` (N,7,D,H,W); the output is (N,1,D,H,W) float32 dose in
target units (dose / 70).

Benchmark-only: needs torch and numpy (and a config object), not jax.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

# flax.linen.InstanceNorm / GroupNorm as randose_jax.models uses them.
NORM_EPSILON = 1e-5

ACTIVATIONS = {
    "relu": F.relu,
    "leaky_relu": lambda x: F.leaky_relu(x, 0.01),
    "gelu": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
}


def _activation(name: str):
  if name not in ACTIVATIONS:
    raise ValueError(
        f"model.activation: unknown {name!r}; choose from "
        f"{sorted(ACTIVATIONS)}"
    )
  return ACTIVATIONS[name]


def _conv(cin: int, cout: int, k: int) -> nn.Conv3d:
  # Odd k with 'SAME' padding: k // 2 on every side, as in Flax.
  return nn.Conv3d(cin, cout, k, padding=k // 2)


class Norm(nn.Module):
  """Instance norm (or GroupNorm, or none) with a learned scale and bias.

  'instance' normalises each sample's channel over (D, H, W); 'group' uses
  gcd(groups, C) groups. Both run as `F.group_norm` (one group per channel is
  instance norm), which takes channels_last_3d tensors as they are where
  `F.instance_norm` reshapes them through batch norm (no faster on CPU).
  """

  def __init__(self, kind: str, channels: int, groups: int = 8):
    super().__init__()
    if kind not in ("instance", "group", "none"):
      raise ValueError(
          f"model.norm: unknown {kind!r}; choose from "
          "'instance', 'group', 'none'"
      )
    self.groups = {
        "instance": channels,
        "group": math.gcd(groups, channels),
        "none": 0,
    }[kind]
    if self.groups:
      self.weight = nn.Parameter(torch.ones(channels))
      self.bias = nn.Parameter(torch.zeros(channels))

  def forward(self, x):
    if not self.groups:
      return x
    # torch.group_norm, not F.group_norm: the latter refuses a single voxel
    # per group (a 1^3 bottleneck, e.g. 5 stages at 16^3), which Flax allows.
    return torch.group_norm(
        x,
        self.groups,
        self.weight,
        self.bias,
        NORM_EPSILON,
        torch.backends.cudnn.enabled,
    )


class MSFE(nn.Module):
  """Multi-scale feature extraction (paper 2.1): parallel n^3 convs, summed.

  `fused` computes the same sum as one max(n)^3 conv whose kernel is the sum
  of the zero-padded branch kernels (the parameters stay per branch).
  """

  def __init__(self, cin: int, cout: int, kernels: Sequence[int], fused: bool):
    super().__init__()
    self.kernels = tuple(kernels)
    self.fused = fused
    for k in self.kernels:
      self.add_module(f"conv_k{k}", _conv(cin, cout, k))

  def _branches(self):
    return [getattr(self, f"conv_k{k}") for k in self.kernels]

  def forward(self, x):
    if self.fused:
      k_max = max(self.kernels)
      weight = sum(
          F.pad(c.weight, ((k_max - c.kernel_size[0]) // 2,) * 6)
          for c in self._branches()
      )
      bias = sum(c.bias for c in self._branches())
      return F.conv3d(
          x, weight.to(x.dtype), bias.to(x.dtype), padding=k_max // 2
      )
    convs = self._branches()
    out = convs[0](x)
    for conv in convs[1:]:
      out = out + conv(x)
    return out


class SpatialAttention(nn.Module):
  """F_SA: 1x1x1 conv to one map, sigmoid, broadcast over the channels."""

  def __init__(self, channels: int):
    super().__init__()
    self.conv = nn.Conv3d(channels, 1, 1)

  def forward(self, x):
    return x * torch.sigmoid(self.conv(x))


class ChannelAttention(nn.Module):
  """F_CA: global average pool, Dense C/r, ReLU, Dense C, sigmoid, scale."""

  def __init__(self, channels: int, reduction: int):
    super().__init__()
    hidden = max(1, channels // reduction)
    self.fc1 = nn.Linear(channels, hidden)
    self.fc2 = nn.Linear(hidden, channels)

  def forward(self, x):
    pooled = x.float().mean(dim=(2, 3, 4))
    with torch.autocast(x.device.type, enabled=False):  # float32, as in JAX
      w = torch.sigmoid(self.fc2(F.relu(self.fc1(pooled))))
    return x * w[:, :, None, None, None].to(x.dtype)


class ChannelSpatialAttention(nn.Module):
  """CSA (paper 2.1): F_CA + alpha * F_SA with alpha a learned scalar."""

  def __init__(self, channels: int, reduction: int, alpha_init: float):
    super().__init__()
    self.channel_attention = ChannelAttention(channels, reduction)
    self.spatial_attention = SpatialAttention(channels)
    self.alpha = nn.Parameter(torch.tensor(float(alpha_init)))

  def forward(self, x):
    return self.channel_attention(x) + self.alpha * self.spatial_attention(x)


class MSCSA(nn.Module):
  """MSFE -> norm -> activation -> CSA (CSA off: the row-2 MSFE block)."""

  def __init__(self, cin: int, cout: int, cfg):
    super().__init__()
    self.msfe = MSFE(cin, cout, cfg.msfe_kernels, cfg.msfe_fused)
    self.norm = Norm(cfg.norm, cout, cfg.get("norm_groups", 8))
    self.act = _activation(cfg.activation)
    self.csa = (
        ChannelSpatialAttention(cout, cfg.csa_reduction, cfg.alpha_init)
        if cfg.use_csa
        else None
    )

  def forward(self, x):
    x = self.act(self.norm(self.msfe(x)))
    return x if self.csa is None else self.csa(x)


class UNetBlock(nn.Module):
  """The plain U-Net block (Table 2a row 1): two 3^3 conv-norm-act (+ CSA)."""

  def __init__(self, cin: int, cout: int, cfg):
    super().__init__()
    groups = cfg.get("norm_groups", 8)
    self.conv_0 = _conv(cin, cout, 3)
    self.norm_0 = Norm(cfg.norm, cout, groups)
    self.conv_1 = _conv(cout, cout, 3)
    self.norm_1 = Norm(cfg.norm, cout, groups)
    self.act = _activation(cfg.activation)
    self.csa = (
        ChannelSpatialAttention(cout, cfg.csa_reduction, cfg.alpha_init)
        if cfg.use_csa
        else None
    )

  def forward(self, x):
    x = self.act(self.norm_0(self.conv_0(x)))
    x = self.act(self.norm_1(self.conv_1(x)))
    return x if self.csa is None else self.csa(x)


class Stage(nn.Module):
  """`blocks_per_stage` blocks (`blocks_0`, ...), the first mapping cin -> cout."""

  def __init__(self, cin: int, cout: int, cfg):
    super().__init__()
    block = MSCSA if cfg.use_msfe else UNetBlock
    self.num_blocks = cfg.blocks_per_stage
    for i in range(self.num_blocks):
      self.add_module(f"blocks_{i}", block(cin if i == 0 else cout, cout, cfg))

  def forward(self, x):
    for i in range(self.num_blocks):
      x = getattr(self, f"blocks_{i}")(x)
    return x


def _linear_resize_matrix(n_in: int, n_out: int) -> np.ndarray:
  """(n_out, n_in) weights of `jax.image.resize(..., 'linear')` on one axis
  (half-pixel centres, triangle kernel widened by the factor when shrinking,
  i.e. anti-aliased, weights renormalised at the borders)."""
  scale = n_out / n_in
  kernel_scale = max(1.0 / scale, 1.0)
  sample = (np.arange(n_out) + 0.5) / scale - 0.5
  dist = np.abs(sample[None, :] - np.arange(n_in)[:, None]) / kernel_scale
  w = np.maximum(0.0, 1.0 - dist)
  total = w.sum(axis=0, keepdims=True)
  w = np.where(
      np.abs(total) > 1000 * np.finfo(np.float32).eps,
      w / np.where(total != 0, total, 1),
      0,
  )
  w = np.where(((sample >= -0.5) & (sample <= n_in - 0.5))[None, :], w, 0)
  return w.T.astype(np.float32)


def linear_resize(x, grid: Sequence[int]):
  """Separable anti-aliased trilinear resize of (N, C, D, H, W) to `grid`."""
  for axis, n_out in zip((2, 3, 4), grid):
    n_in = x.shape[axis]
    if n_in == n_out:
      continue
    w = torch.from_numpy(_linear_resize_matrix(n_in, n_out)).to(
        x.device, x.dtype
    )
    x = torch.movedim(torch.movedim(x, axis, -1) @ w.T, -1, axis)
  return x


def resize_ptv(f_p, grid: Sequence[int], method: str = "avgpool"):
  """F_P (N, C, D, H, W) brought to a coarser stage grid (d, h, w)."""
  if tuple(grid) == tuple(f_p.shape[2:]):
    return f_p
  if method == "avgpool":
    factors = [full // small for full, small in zip(f_p.shape[2:], grid)]
    if any(full % small for full, small in zip(f_p.shape[2:], grid)):
      raise ValueError(
          f"PTV integration: grid {tuple(f_p.shape[2:])} is not "
          f"a multiple of the stage grid {tuple(grid)}"
      )
    return F.avg_pool3d(f_p, factors)
  if method == "linear":
    return linear_resize(f_p, grid)
  raise ValueError(
      f"model.pi_resize: unknown {method!r}; choose from " "'avgpool', 'linear'"
  )


class PTVIntegration(nn.Module):
  """PI (paper 2.2): for each k, SA(conv_k(F_E,s)) and SA(conv_k(F_P)), each
  with its own conv and attention; the sum goes through a final SA."""

  def __init__(
      self,
      cin: int,
      cptv: int,
      cout: int,
      kernels: Sequence[int],
      resize: str = "avgpool",
  ):
    super().__init__()
    self.kernels = tuple(kernels)
    self.resize = resize
    for k in self.kernels:
      self.add_module(f"conv_enc_k{k}", _conv(cin, cout, k))
      self.add_module(f"sa_enc_k{k}", SpatialAttention(cout))
      self.add_module(f"conv_ptv_k{k}", _conv(cptv, cout, k))
      self.add_module(f"sa_ptv_k{k}", SpatialAttention(cout))
    self.sa_out = SpatialAttention(cout)

  def forward(self, f_e, f_p):
    # In float32, as in JAX: the pooling sums up to 16^3 voxels per output.
    with torch.autocast(f_e.device.type, enabled=False):
      f_p = resize_ptv(f_p.float(), f_e.shape[2:], self.resize).to(f_e.dtype)
    out = 0
    for k in self.kernels:
      out = out + getattr(self, f"sa_enc_k{k}")(
          getattr(self, f"conv_enc_k{k}")(f_e)
      )
      out = out + getattr(self, f"sa_ptv_k{k}")(
          getattr(self, f"conv_ptv_k{k}")(f_p)
      )
    return self.sa_out(out)


class AttentionFusion(nn.Module):
  """AF (paper 2.3): CSA_skip(F_E,s) + beta * CSA_up(F_D,s+1)."""

  def __init__(self, channels: int, cfg):
    super().__init__()
    self.csa_skip = ChannelSpatialAttention(
        channels, cfg.csa_reduction, cfg.alpha_init
    )
    self.csa_up = ChannelSpatialAttention(
        channels, cfg.csa_reduction, cfg.alpha_init
    )
    self.beta = nn.Parameter(torch.tensor(float(cfg.beta_init)))

  def forward(self, skip, up):
    return self.csa_skip(skip) + self.beta * self.csa_up(up)


class Downsample(nn.Module):
  """2x down: 2^3 max pooling, or a 2^3 stride-2 conv keeping the channels."""

  def __init__(self, mode: str, channels: int):
    super().__init__()
    if mode not in ("maxpool", "conv"):
      raise ValueError(
          f"model.down: unknown {mode!r}; choose from " "'maxpool', 'conv'"
      )
    if mode == "conv":
      self.conv = nn.Conv3d(channels, channels, 2, stride=2)

  def forward(self, x):
    return self.conv(x) if hasattr(self, "conv") else F.max_pool3d(x, 2)


class Upsample(nn.Module):
  """2x up: a 2^3 stride-2 transposed conv, or trilinear resize + 1^3 conv."""

  def __init__(self, mode: str, cin: int, cout: int):
    super().__init__()
    if mode not in ("transpose", "resize"):
      raise ValueError(
          f"model.up: unknown {mode!r}; choose from " "'transpose', 'resize'"
      )
    self.mode = mode
    self.conv = (
        nn.ConvTranspose3d(cin, cout, 2, stride=2)
        if mode == "transpose"
        else nn.Conv3d(cin, cout, 1)
    )

  def forward(self, x):
    if self.mode == "resize":
      # Same weights as jax.image.resize 'linear' when enlarging by 2.
      x = F.interpolate(
          x, scale_factor=2, mode="trilinear", align_corners=False
      )
    return self.conv(x)


def _flax_init(module: nn.Module):
  """Flax's default init instead of torch's: LeCun normal (truncated at 2
  sigma) on fan-in for conv / transposed-conv / dense kernels, zero bias."""
  if isinstance(module, (nn.Conv3d, nn.ConvTranspose3d, nn.Linear)):
    w = module.weight
    fan_in = (
        w[0].numel()
        if not isinstance(module, nn.ConvTranspose3d)
        else (w.shape[0] * w[0, 0].numel())
    )
    std = 1.0 / math.sqrt(fan_in) / 0.87962566103423978  # truncation correction
    nn.init.trunc_normal_(w, std=std, a=-2 * std, b=2 * std)
    nn.init.zeros_(module.bias)


class RANDose(nn.Module):
  """The network; `cfg` is `config.model`. Top-level modules (as in Flax):
  stem_ptv, stem_ct, stem_oar, encoder_s, down_s (down='conv'), pi_s (s >= 2,
  use_pi), up_s, af_s (use_af), decoder_s (s < S), head."""

  def __init__(self, cfg):
    super().__init__()
    self.use_pi, self.use_af = cfg.use_pi, cfg.use_af
    self.widths = widths = tuple(cfg.widths)
    self.num_stages = num_stages = len(widths)
    w0 = widths[0]
    self.stem_ptv = _conv(1, w0, cfg.stem_kernel)
    self.stem_ct = _conv(1, w0, cfg.stem_kernel)
    self.stem_oar = _conv(7, w0, cfg.stem_kernel)
    cin = 3 * w0
    for s in range(1, num_stages + 1):
      w = widths[s - 1]
      if s > 1:
        self.add_module(f"down_{s}", Downsample(cfg.down, cin))
        if cfg.use_pi:
          self.add_module(
              f"pi_{s}",
              PTVIntegration(
                  cin, w0, w, cfg.pi_kernels, cfg.get("pi_resize", "avgpool")
              ),
          )
          cin = w
      self.add_module(f"encoder_{s}", Stage(cin, w, cfg))
      cin = w
    for s in range(num_stages - 1, 0, -1):
      w = widths[s - 1]
      self.add_module(f"up_{s}", Upsample(cfg.up, widths[s], w))
      if cfg.use_af:
        self.add_module(f"af_{s}", AttentionFusion(w, cfg))
      self.add_module(f"decoder_{s}", Stage(w if cfg.use_af else 2 * w, w, cfg))
    self.head = nn.Conv3d(w0, 1, 1)
    self.apply(_flax_init)

  def forward(self, inputs: Mapping[str, torch.Tensor]):
    f_p = self.stem_ptv(inputs["ptv"])
    x = torch.cat(
        [f_p, self.stem_ct(inputs["ct"]), self.stem_oar(inputs["oar"])], dim=1
    )
    skips = []
    for s in range(1, self.num_stages + 1):
      if s > 1:
        x = getattr(self, f"down_{s}")(x)
        if self.use_pi:
          x = getattr(self, f"pi_{s}")(x, f_p)
      x = getattr(self, f"encoder_{s}")(x)
      skips.append(x)
    for s in range(self.num_stages - 1, 0, -1):
      up = getattr(self, f"up_{s}")(x)
      skip = skips[s - 1]
      if self.use_af:
        x = getattr(self, f"af_{s}")(skip, up)
      else:
        x = torch.cat([skip, up], dim=1)
      x = getattr(self, f"decoder_{s}")(x)
    with torch.autocast(x.device.type, enabled=False):  # head in float32
      return self.head(x.float())


class RegionAwareLoss(nn.Module):
  """The twin of `randose_jax.training.losses.RegionAwareLoss` (docs/design.md section 4).

  L = L1_all + sum over regions r of exp(-s_r) * L1_r + s_r ('uncertainty',
  params log_var_<r>) or w_r * L1_r ('fixed'). Each L1 is a mean over its own
  voxels of the whole batch; the regions are `ptv > 0` and `any(oar > 0)`
  over the OAR channels; a region with no voxels in the batch adds 0.
  pred, target, ptv: (N, 1, D, H, W); oar: (N, 7, D, H, W).
  """

  def __init__(self, loss_config=None):
    super().__init__()
    get = loss_config.get if loss_config is not None else (lambda k, d: d)
    self.regions = tuple(r for r in get("regions", ("ptv", "oar")) if r)
    self.mode = get("mode", "uncertainty")
    if self.mode == "uncertainty":
      init = float(get("init_log_var", 0.0))
      for r in self.regions:
        self.register_parameter(
            f"log_var_{r}", nn.Parameter(torch.tensor(init))
        )
    elif self.mode == "fixed":
      weights = dict(zip(("ptv", "oar"), get("fixed_weights", (1.0, 1.0))))
      self.fixed = {r: float(weights[r]) for r in self.regions}
    else:
      raise ValueError(
          f"loss.mode: unknown {self.mode!r}; choose from "
          "'uncertainty', 'fixed'"
      )

  def forward(self, pred, target, ptv, oar):
    error = (pred.float() - target.float()).abs().mean(dim=1)  # (N, D, H, W)
    loss = error.mean()
    metrics = {"l1_all": loss.detach()}
    masks = {"ptv": (ptv > 0).any(dim=1), "oar": (oar > 0).any(dim=1)}
    for r in self.regions:
      m = masks[r].to(error.dtype)
      count = m.sum()
      l1_r = (error * m).sum() / count.clamp_min(1.0)
      metrics[f"l1_{r}"] = l1_r.detach()
      if self.mode == "uncertainty":
        s = getattr(self, f"log_var_{r}")
        term = torch.exp(-s) * l1_r + s
      else:
        term = self.fixed[r] * l1_r
      loss = loss + torch.where(count > 0, term, torch.zeros_like(term))
    metrics["loss"] = loss.detach()
    return loss, metrics


def build_from_config(model_config) -> RANDose:
  """The twin of `randose_jax.models.create_model(config.model)`."""
  name = model_config.get("name", "randose")
  if name != "randose":
    raise ValueError(f"model.name: unknown {name!r}; only 'randose'")
  return RANDose(model_config)


def count_parameters(module: nn.Module) -> dict:
  """Parameter count per top-level module (the Flax top-level names), + total."""
  counts = {}
  for name, child in module.named_children():
    n = sum(p.numel() for p in child.parameters())
    if n:
      counts[name] = n
  for name, p in module.named_parameters(recurse=False):
    counts[name] = p.numel()
  counts["total"] = sum(p.numel() for p in module.parameters())
  return counts


def _flatten(tree, prefix=()):
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, prefix + (key,))
    else:
      yield prefix + (key,), value


def load_flax_params(torch_model: nn.Module, flax_params) -> nn.Module:
  """Copies a Flax parameter tree (the model's, or the loss's) into the twin.

  Paths map one to one (`a/b/kernel` -> `a.b.weight`). Layouts:
    Conv kernel (k, k, k, I, O) -> weight (O, I, k, k, k);
    ConvTranspose kernel (k, k, k, I, O) -> weight (I, O, k, k, k) flipped in
      space (flax's default, transpose_kernel=False, does not flip; torch's
      ConvTranspose3d is the gradient of a conv, which does);
    Dense kernel (I, O) -> weight (O, I); norm scale -> weight; scalars as is.
  Every torch parameter must be set exactly once; anything else is an error.
  """
  modules = dict(torch_model.named_modules())
  params = dict(torch_model.named_parameters())
  done = set()
  with torch.no_grad():
    for path, value in _flatten(flax_params):
      value = torch.from_numpy(np.array(value, dtype=np.float32))
      owner = modules.get(".".join(path[:-1]))
      leaf = path[-1]
      if isinstance(owner, nn.ConvTranspose3d) and leaf == "kernel":
        value = value.flip((0, 1, 2)).permute(3, 4, 0, 1, 2)
      elif isinstance(owner, nn.Conv3d) and leaf == "kernel":
        value = value.permute(4, 3, 0, 1, 2)
      elif isinstance(owner, nn.Linear) and leaf == "kernel":
        value = value.T
      name = ".".join(
          path[:-1] + ({"kernel": "weight", "scale": "weight"}.get(leaf, leaf),)
      )
      if name not in params:
        raise KeyError(
            f"load_flax_params: Flax param {'/'.join(path)} has no "
            f"twin ({name})"
        )
      if tuple(params[name].shape) != tuple(value.shape):
        raise ValueError(
            f"load_flax_params: {'/'.join(path)} has shape "
            f"{tuple(value.shape)} after conversion; the twin's "
            f"{name} is {tuple(params[name].shape)}"
        )
      params[name].copy_(value)
      done.add(name)
  missing = sorted(set(params) - done)
  if missing:
    raise KeyError(
        f"load_flax_params: no Flax value for {missing[:5]}"
        f"{' ...' if len(missing) > 5 else ''}"
    )
  return torch_model
