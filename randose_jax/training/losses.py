"""The Region-Aware Loss (paper section 2.4, Table 2b; docs/design.md section 4).

  L = L1_all + sum over r in `regions` of term_r,

with L1_all the mean absolute error over all voxels of the batch and L1_r the
mean over the voxels of region r only (pooled over the batch):
  PTV region: ptv > 0 (the PTV input channel);
  OAR region: any(oar > 0) over the seven OAR channels;
  mask region (not in the paper; off in its config): the possible-dose
    mask, the voxels the dose score is computed over. With the PTV and OAR
    weights learned to about 1 / L1_r, the paper's loss weighs the body
    outside the targets and organs only through L1_all, a mean over the
    whole grid (mostly air); the mask term gives it its own learned weight.
A region with no voxels in the batch contributes 0 (no NaN, no gradient).

The paper's learned weights w_r live in the parameter tree. A plain positive
weight trained to minimise L collapses to zero, so the default ("uncertainty")
is homoscedastic-uncertainty weighting with a learned log-variance s_r:
  term_r = exp(-s_r) * L1_r + s_r,      effective weight w_r = exp(-s_r),
whose optimum w_r = 1 / L1_r neither vanishes nor explodes while L1_r stays
away from 0 and infinity. Params: 'log_var_ptv', 'log_var_oar' (float32
scalars, one per region in `regions`). "fixed" mode: term_r = w_r * L1_r with
constant weights and no params.

Units: pred and target in target units (dose / 70), so each L1 is in units of
70 Gy.
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from randose_jax.default_config import ConfigError

Array = jax.Array

REGIONS = ("ptv", "oar", "mask")
PAPER_REGIONS = ("ptv", "oar")  # Table 2b row 3
MODES = ("uncertainty", "fixed")


def masked_mean(values: Array, mask: Array) -> tuple[Array, Array]:
  """Mean of `values` over the voxels where `mask` is true, and whether any.

  Returns (mean, present); mean is 0 when the mask is empty, with a finite
  (zero) gradient.
  """
  mask = mask.astype(values.dtype)
  count = jnp.sum(mask)
  total = jnp.sum(values * mask)
  return total / jnp.maximum(count, 1.0), count > 0


class RegionAwareLoss(nn.Module):
  """L = L1_all + sum_r term_r (see the module docstring).

  Fields:
    regions: a subset of ('ptv', 'oar', 'mask'): which region terms the loss
      has (Table 2b: () = L1 only, ('ptv',), ('ptv', 'oar') = the paper;
      'mask' is this library's addition, see the module docstring).
    mode: 'uncertainty' (learned log-variances) | 'fixed' (constant weights).
    init_log_var: initial s_r in uncertainty mode (weight exp(-s_r)).
    fixed_weights: (w_PTV, w_OAR) or (w_PTV, w_OAR, w_mask) in fixed mode
      (w_mask 1 when left out).

  __call__(pred, target, ptv, oar, mask=None):
    pred, target: (N, D, H, W, 1) dose in target units.
    ptv: (N, D, H, W, 1) PTV input channel; oar: (N, D, H, W, 7) OAR masks;
    mask: (N, D, H, W, 1) possible-dose mask, needed only when 'mask' is
    one of the regions (ignored otherwise).
  Returns (loss, metrics): loss a float32 scalar; metrics a dict of float32
  scalars l1_all, l1_ptv, l1_oar (always reported, also for regions the loss
  leaves out), weight_ptv, weight_oar (the effective weights; 0 for a region
  not in the loss), l1_mask and weight_mask when 'mask' is a region, and
  loss.
  """

  regions: Sequence[str] = PAPER_REGIONS
  mode: str = "uncertainty"
  init_log_var: float = 0.0
  fixed_weights: Sequence[float] = (1.0, 1.0)

  @nn.compact
  def __call__(
      self,
      pred: Array,
      target: Array,
      ptv: Array,
      oar: Array,
      mask: Array | None = None,
  ) -> tuple[Array, dict[str, Array]]:
    unknown = set(self.regions) - set(REGIONS)
    if unknown:
      raise ConfigError(
          f"loss.regions: unknown {sorted(unknown)}; choose from {REGIONS}"
      )
    if self.mode not in MODES:
      raise ConfigError(
          f"loss.mode: unknown {self.mode!r}; choose from {MODES}"
      )
    if self.mode == "fixed" and len(self.fixed_weights) not in (2, 3):
      raise ConfigError(
          f"loss.fixed_weights: expected (w_PTV, w_OAR) or (w_PTV, w_OAR, "
          f"w_mask), got {tuple(self.fixed_weights)}"
      )
    if "mask" in self.regions and mask is None:
      raise ConfigError(
          "loss.regions has 'mask' but no possible-dose mask was given"
      )
    if pred.shape != target.shape:
      raise ValueError(
          f"RegionAwareLoss: pred {pred.shape} and target "
          f"{target.shape} differ in shape"
      )
    if ptv.shape[:-1] != pred.shape[:-1] or oar.shape[:-1] != pred.shape[:-1]:
      raise ValueError(
          f"RegionAwareLoss: ptv {ptv.shape} / oar {oar.shape} "
          f"do not match pred {pred.shape}"
      )

    error = jnp.abs(pred.astype(jnp.float32) - target.astype(jnp.float32))
    error = jnp.mean(error, axis=-1)  # (N, D, H, W); the one dose channel
    masks = {
        "ptv": jnp.any(ptv > 0, axis=-1),
        "oar": jnp.any(oar > 0, axis=-1),
    }
    if mask is not None and "mask" in self.regions:
      if mask.shape[:-1] != pred.shape[:-1]:
        raise ValueError(
            f"RegionAwareLoss: mask {mask.shape} does not match pred "
            f"{pred.shape}"
        )
      masks["mask"] = jnp.any(mask > 0, axis=-1)
    weights = tuple(self.fixed_weights) + (1.0,) * (3 - len(self.fixed_weights))
    l1_all = jnp.mean(error)
    loss = l1_all
    metrics = {"l1_all": l1_all}
    for index, region in enumerate(REGIONS):
      if region not in masks:
        continue
      l1_r, present = masked_mean(error, masks[region])
      metrics[f"l1_{region}"] = l1_r
      weight = jnp.zeros((), jnp.float32)
      if region in self.regions:
        if self.mode == "uncertainty":
          log_var = self.param(
              f"log_var_{region}",
              nn.initializers.constant(self.init_log_var),
              (),
              jnp.float32,
          )
          weight = jnp.exp(-log_var)
          term = weight * l1_r + log_var
        else:
          weight = jnp.asarray(weights[index], jnp.float32)
          term = weight * l1_r
        loss = loss + jnp.where(present, term, 0.0)
      metrics[f"weight_{region}"] = weight
    metrics["loss"] = loss
    return loss, metrics


def create_loss(loss_config) -> RegionAwareLoss:
  """The loss that `config.loss` describes (regions, mode, init_log_var,
  fixed_weights)."""
  return RegionAwareLoss(
      regions=tuple(r for r in loss_config.regions if r),
      mode=loss_config.mode,
      init_log_var=float(loss_config.init_log_var),
      fixed_weights=tuple(float(w) for w in loss_config.fixed_weights),
  )
