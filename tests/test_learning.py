"""Does the network learn? The checks a researcher runs before a long run.

- The head starts every prediction at 0 Gy (`model.head_init='zeros'`, the
  default) and still receives a gradient: with flax's LeCun head the full
  RANDose could park, on the real data, in a state predicting ~0 inside the
  targets for hundreds of steps (benchmarks/NOTES.md, "Why the full RANDose
  learned slowly on real data").
- The full RANDose (tiny widths, 16^3) overfits one real OpenKBP patient: its
  dose score on that patient falls far below the patient's own mean-dose
  baseline within a couple of hundred steps. A broken gradient, a wrong
  target or a stuck initialisation makes this fail.
"""

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from randose_jax.training import train
from randose_jax.training import validation
from randose_jax.default_config import ConfigError
from randose_jax.data import cache as cache_lib
from randose_jax.data import openkbp
from tests import helpers

_SPEC = importlib.util.spec_from_file_location(
    "openkbp_configs",
    pathlib.Path(__file__).resolve().parents[1] / "configs" / "openkbp.py",
)
openkbp_configs = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(openkbp_configs)


def _inputs(grid=(8, 8, 8), seed=0):
  rng = np.random.default_rng(seed)
  shape = (1, *grid)
  return {
      "ptv": jnp.asarray(rng.random(shape + (1,)) > 0.7, jnp.float32),
      "ct": jnp.asarray(rng.normal(size=shape + (1,)), jnp.float32),
      "oar": jnp.asarray(rng.random(shape + (7,)) > 0.8, jnp.float32),
  }


@pytest.mark.parametrize("head_init", ["zeros", "lecun"])
def test_head_init(head_init):
  config = openkbp_configs.get_config("smoke")
  config.model.widths = (4, 8)
  config.model.head_init = head_init
  trainer = train.Trainer.create(config)
  params = trainer.init_state(0).params
  inputs = _inputs()

  def objective(model_params):
    out = trainer.model.apply({"params": model_params}, inputs)
    return jnp.mean(jnp.abs(out - 0.5 * inputs["ptv"])), out

  # The prediction and the gradient in one compiled program (op by op, the
  # gradient took several times longer).
  grads, pred = jax.jit(jax.grad(objective, has_aux=True))(params["model"])
  if head_init == "zeros":
    np.testing.assert_array_equal(np.asarray(pred), 0.0)
  else:
    assert float(jnp.std(pred)) > 1e-3

  # The head learns from the first step, whatever its start.
  assert float(jnp.abs(grads["head"]["kernel"]).max()) > 0


def test_unknown_head_init_is_an_error():
  config = openkbp_configs.get_config("smoke")
  config.model.head_init = "ones"
  with pytest.raises(ConfigError, match="model.head_init"):
    train.Trainer.create(config)


@pytest.mark.slow
def test_full_randose_overfits_one_real_patient(shared_openkbp, tmp_path):
  """~200 steps of the full RANDose on one patient at 16^3 (~30 s)."""
  config = openkbp_configs.get_config("smoke")
  # The smoke config's own learning rate (1e-4; the dose score reaches ~0.3
  # of the baseline by step 200): its train step is then the very program
  # test_train's smoke run compiles, which the shared compilation cache
  # (tests/conftest.py) compiles once for both.
  assert config.learning_rate == 1e-4
  config.data.augment = False
  patient_dir = openkbp.list_patient_dirs(shared_openkbp / "train-pats")[0]
  cache = cache_lib.build_cache([patient_dir], tmp_path / "cache", config.data)
  trainer = train.Trainer.create(config)
  state = trainer.init_state(config.seed)
  example = cache[0]
  batch = trainer.shard_batch(
      {k: np.stack([example[k]] * 2) for k in train.BATCH_KEYS}
  )
  for _ in range(200):
    state, metrics = trainer.jit_train_step(state, batch)
  assert np.isfinite(float(metrics["loss"]))
  scores = validation.evaluate(
      trainer.predictor.with_params(state.params["model"]), cache
  )
  patient = openkbp.load_patient(patient_dir)
  mean_gy = float(patient.dose[patient.possible_dose_mask].mean())
  baseline = helpers.evaluate_baseline(cache, mean_gy)
  # The 16^3 grid alone costs a few Gy (the reference itself through the
  # 8x down/up-sampling); half the baseline leaves room for it.
  assert scores["dose_score"] < 0.5 * baseline["dose_score"], (scores, baseline)
