"""A trained model ready to predict: parameters + forward + TTA.

`Predictor` serves validation (`validation.py`), `predict` and `export`;
it needs no optimizer, loss or train state. Its forward is one `jax.jit`
over the 'data' mesh (examples split over devices, parameters replicated),
compiled once and kept when only the parameters change
(`with_params`: validation during training).
"""

import dataclasses
import functools
import itertools
import math
from typing import Any, Callable, Optional

import jax
import ml_collections
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from randose_jax import distributed
from randose_jax.inference import forward as inference
from randose_jax.data import encoding
from randose_jax.data import openkbp

# The entry of a saved train state that holds the exponential moving average
# of params['model'] (runs with config.ema_decay > 0); absent otherwise.
EMA_KEY = "ema_params"


def params_to_predict(params, ema_params=None):
  """The model parameters a trained model predicts with: the moving average
  of the parameters when the run kept one (`ema_params`), else the trained
  model parameters (`params['model']`). Validation, predict, export and the
  shipped models all decide so, here."""
  return params["model"] if ema_params is None else ema_params


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


def window_starts(lo: int, hi: int, size: int, n: int, overlap: float):
  """First voxels of the windows of `size` that cover [lo, hi] (inclusive)
  on an axis of n voxels: one centred window when the span fits, else the
  fewest evenly spaced windows that overlap by at least `overlap` of a
  window; all inside the axis."""
  span = hi - lo + 1
  if span <= size:
    return [min(max((lo + hi + 1 - size) // 2, 0), n - size)]
  stride = max(1, int(size * (1.0 - overlap)))
  count = math.ceil((span - size) / stride) + 1
  starts = np.rint(np.linspace(lo, hi - size + 1, count)).astype(int)
  return sorted(set(int(min(max(s, 0), n - size)) for s in starts))


@functools.lru_cache(maxsize=8)
def blend_weights(shape: tuple) -> np.ndarray:
  """float32 `shape`: a Gaussian bump (sigma = 1/8 of each side, as
  nnU-Net's sliding window) with which overlapping windows are averaged, so
  that a voxel takes most from the windows it is central in; never 0."""
  weights = np.ones((), np.float32)
  for n in shape:
    x = np.arange(n) - (n - 1) / 2
    w = np.exp(-0.5 * (x / (n / 8.0)) ** 2).astype(np.float32)
    weights = np.multiply.outer(weights, np.maximum(w / w.max(), 1e-3))
  return weights


def _mask_box(example: dict):
  """(lo, hi) (3,), inclusive, of the example's possible-dose mask; the
  whole grid for an empty mask."""
  mask = np.asarray(example["mask"])[..., 0] > 0
  grid = mask.shape
  if not mask.any():
    return [0, 0, 0], [n - 1 for n in grid]
  lo, hi = [], []
  for axis in range(3):
    along = np.flatnonzero(
        mask.any(axis=tuple(a for a in range(3) if a != axis))
    )
    lo.append(int(along[0]))
    hi.append(int(along[-1]))
  return lo, hi


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

  @property
  def window(self) -> tuple:
    """The window shape of a crop-trained model (`config.data.crop_shape`),
    or () for a model that sees the whole grid."""
    return tuple(int(n) for n in self.data_config.get("crop_shape", ()) or ())

  def predict_examples(self, examples: list, tta: bool = False) -> list:
    """Predictions (target units, (D, H, W) each, the examples' grid) for
    this process's examples (dicts from `encoding.encode_patient`, holding
    the model inputs and `mask`).

    A model trained on crops (`window`) sees each patient as it was
    trained: windows of the crop's shape over the possible-dose mask's
    bounding box (`window_starts`, `config.data.window_overlap`), blended
    with `blend_weights`; 0 outside them. Otherwise the whole grid at once
    (`predict_local`). Same contract as `predict_local` for several
    processes (the window count is padded to the largest).
    """
    if not self.window:
      return self.predict_local(examples, tta)
    size = self.window
    overlap = float(self.data_config.get("window_overlap", 0.5))
    pieces, plan = [], []
    for e, example in enumerate(examples):
      grid = np.asarray(example["mask"]).shape[:3]
      if any(c > n for c, n in zip(size, grid)):
        raise ValueError(
            f"config.data.crop_shape={size} is larger than the grid {grid}"
        )
      lo, hi = _mask_box(example)
      axes = [
          window_starts(lo[a], hi[a], size[a], grid[a], overlap)
          for a in range(3)
      ]
      keys = list(inference.model_inputs(example))
      for start in itertools.product(*axes):
        where = tuple(slice(s, s + c) for s, c in zip(start, size))
        pieces.append({k: np.asarray(example[k])[where] for k in keys})
        plan.append((e, where))
    real = len(pieces)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

      most = int(np.max(multihost_utils.process_allgather(np.int64(real))))
      pieces += [pieces[-1]] * (most - real)
    preds = self.predict_local(pieces, tta)[:real]
    weights = blend_weights(size)
    totals = [
        np.zeros(np.asarray(e["mask"]).shape[:3], np.float32) for e in examples
    ]
    norms = [np.zeros_like(t) for t in totals]
    for (e, where), pred in zip(plan, preds):
      totals[e][where] += weights * pred
      norms[e][where] += weights
    return [t / np.maximum(w, 1e-12) for t, w in zip(totals, norms)]

  def predict_doses(self, patients: list, tta: bool = False) -> list:
    """Doses in Gy (float64, each patient's grid, zero outside its
    possible-dose mask) for this process's patients (`Patient`s or
    `SparsePatient`s): encode -> `predict_examples` -> decode."""
    examples = [encoding.encode_patient(p, self.data_config) for p in patients]
    preds = self.predict_examples(examples, tta)
    return [
        encoding.decode_dose(
            pred,
            p if isinstance(p, openkbp.SparsePatient) else p.possible_dose_mask,
            self.data_config,
        )
        for pred, p in zip(preds, patients)
    ]

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
          for k in inference.model_inputs(chunk[0])
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
