"""A trained model ready to predict: parameters + forward + TTA.

`Predictor` serves validation (`validation.py`), `predict` and `export`;
it needs no optimizer, loss or train state. Its forward is one `jax.jit`
over the 'data' mesh (examples split over devices, parameters replicated),
compiled once and kept when only the parameters change
(`with_params`: validation during training).
"""

import dataclasses
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from randose_jax import distributed
from randose_jax import inference


def _make_forward(model, mesh: Mesh, swap_parotids: bool) -> Callable:
  def fwd(params, inputs, tta):
    apply_fn = inference.make_apply_fn(model, params)
    return inference.predict(
        apply_fn, inputs, tta=tta, swap_parotids=swap_parotids
    )

  return jax.jit(
      fwd,
      static_argnums=(2,),
      in_shardings=(NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))),
      out_shardings=NamedSharding(mesh, P("data")),
  )


@dataclasses.dataclass(frozen=True)
class Predictor:
  """`model` (a linen module) with its `params` (model parameters only).

  `data_config` is the run's `config.data`: the parotid swap of the TTA and
  how a prediction goes back to Gy (`encoding.decode_dose`).
  """

  model: Any
  params: Any
  data_config: ml_collections.ConfigDict
  mesh: Mesh
  forward: Optional[Callable] = dataclasses.field(default=None, repr=False)

  def __post_init__(self):
    if self.forward is None:
      object.__setattr__(
          self,
          "forward",
          _make_forward(
              self.model, self.mesh, bool(self.data_config.swap_parotids)
          ),
      )

  @classmethod
  def create(cls, config, params, mesh: Optional[Mesh] = None) -> "Predictor":
    from randose_jax import models  # pylint: disable=g-import-not-at-top

    return cls(
        model=models.create_model(config.model),
        params=params,
        data_config=config.data,
        mesh=mesh or distributed.make_mesh(),
    )

  def with_params(self, params) -> "Predictor":
    """The same model and compiled forward with other parameters."""
    return dataclasses.replace(self, params=params)

  def predict_local(self, examples: list, tta: bool = False) -> list:
    """Predictions (target units, (D, H, W) each) for this process's
    examples (dicts holding `inference.INPUT_KEYS`).

    Every process must call this the same number of times with the same
    number of examples (pad if needed); rounds of one example per local
    device go through the sharded forward.
    """
    sharding = NamedSharding(self.mesh, P("data"))
    n_local = jax.local_device_count()
    preds = []
    for start in range(0, len(examples), n_local):
      chunk = examples[start : start + n_local]
      valid = len(chunk)
      chunk = chunk + [chunk[-1]] * (n_local - valid)
      local = {
          k: np.stack([np.asarray(e[k], np.float32) for e in chunk])
          for k in inference.INPUT_KEYS
      }
      global_inputs = {
          k: jax.make_array_from_process_local_data(
              sharding, v, (v.shape[0] * jax.process_count(),) + v.shape[1:]
          )
          for k, v in local.items()
      }
      out = self.forward(self.params, global_inputs, tta)
      shards = sorted(out.addressable_shards, key=lambda s: s.index[0].start)
      rows = np.concatenate([np.asarray(s.data) for s in shards])[:valid]
      preds.extend(rows[..., 0])
    return preds
