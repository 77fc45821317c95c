"""Forward passes shared by validation, `predict` and `export`.

Test-time augmentation (TTA) averages the four flip combinations that map the
nine-beam geometry onto itself (docs/design.md section 1): left/right (grid axis 1,
array axis 2 of a batch) and superior/inferior (grid axis 2, array axis 3).
A left/right flip also swaps the parotid channels of the OAR input, and the
prediction is flipped back before averaging.
"""

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from randose_jax import conventions
from randose_jax.conventions import INPUT_KEYS

# Batch axes (N, D, H, W, C): the grid's, one later.
LR_AXIS = conventions.LR_AXIS + 1
SI_AXIS = conventions.SI_AXIS + 1

Inputs = Mapping[str, jax.Array]


# Inputs a model takes when its data config makes them (`geom`:
# `config.data.geometry`).
OPTIONAL_INPUT_KEYS = ("geom",)


def model_inputs(batch: Mapping[str, Any]) -> dict:
  """The model's input dict out of a batch that may hold more keys."""
  inputs = {k: batch[k] for k in INPUT_KEYS}
  inputs.update({k: batch[k] for k in OPTIONAL_INPUT_KEYS if k in batch})
  return inputs


def flip_inputs(
    inputs: Inputs, lr: bool, si: bool, swap_parotids: bool = True
) -> dict:
  """Flips a batch of encoded inputs; the left/right flip swaps parotids."""
  out = {}
  for key, x in inputs.items():
    if lr:
      x = jnp.flip(x, LR_AXIS)
      if key == "oar" and swap_parotids:
        r, l = conventions.PAROTID_CHANNELS
        perm = list(range(x.shape[-1]))
        perm[r], perm[l] = perm[l], perm[r]
        x = x[..., jnp.array(perm)]
    if si:
      x = jnp.flip(x, SI_AXIS)
    out[key] = x
  return out


def unflip(pred: jax.Array, lr: bool, si: bool) -> jax.Array:
  if si:
    pred = jnp.flip(pred, SI_AXIS)
  if lr:
    pred = jnp.flip(pred, LR_AXIS)
  return pred


TTA_FLIPS = ((False, False), (False, True), (True, False), (True, True))


def predict(
    apply_fn: Callable[[Inputs], jax.Array],
    inputs: Inputs,
    tta: bool = False,
    swap_parotids: bool = True,
) -> jax.Array:
  """(N, D, H, W, 1) prediction in target units, optionally 4-flip TTA.

  With TTA the four flipped inputs go through the network one after the
  other (`lax.map`): unrolled, XLA overlaps the four forward passes and
  needs ~1.7x the memory (paper config at 128^3 on the CPU: 7.3 GiB of
  temporaries instead of 4.2, same result to the bit, about as fast;
  benchmarks/NOTES.md)."""
  if not tta:
    return apply_fn(inputs)
  flipped = [flip_inputs(inputs, lr, si, swap_parotids) for lr, si in TTA_FLIPS]
  stacked = {k: jnp.stack([f[k] for f in flipped]) for k in inputs}
  preds = jax.lax.map(apply_fn, stacked)
  total = 0.0
  for i, (lr, si) in enumerate(TTA_FLIPS):
    total = total + unflip(preds[i], lr, si)
  return total / 4.0


def make_apply_fn(model, params) -> Callable[[Inputs], jax.Array]:
  """Closes a linen model over its (model-only) parameters."""
  return lambda inputs: model.apply({"params": params}, model_inputs(inputs))
