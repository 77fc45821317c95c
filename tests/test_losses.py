"""Tests of the Region-Aware Loss (randose_jax/training/losses.py)."""

import importlib.util
import pathlib

import jax

jax.config.update("jax_disable_most_optimizations", True)

import jax.numpy as jnp
import numpy as np
import optax
import pytest

from randose_jax.training import losses

CONFIGS = pathlib.Path(__file__).resolve().parents[1] / "configs"


def make_batch(seed=0, shape=(2, 6, 6, 6), empty=()):
  rng = np.random.default_rng(seed)
  pred = rng.normal(size=(*shape, 1)).astype(np.float32)
  target = rng.normal(size=(*shape, 1)).astype(np.float32)
  ptv = (rng.random(size=(*shape, 1)) < 0.2) * rng.choice(
      [0.8, 0.9, 1.0], size=(*shape, 1)
  )
  oar = (rng.random(size=(*shape, 7)) < 0.05).astype(np.float32)
  if "ptv" in empty:
    ptv = np.zeros_like(ptv)
  if "oar" in empty:
    oar = np.zeros_like(oar)
  return pred, target, ptv.astype(np.float32), oar


def numpy_loss(pred, target, ptv, oar, weights, log_vars=None):
  error = np.abs(pred - target)[..., 0]
  regions = {"ptv": ptv[..., 0] > 0, "oar": np.any(oar > 0, axis=-1)}
  l1 = {r: error[m].mean() if m.any() else 0.0 for r, m in regions.items()}
  total = error.mean()
  for r, w in weights.items():
    if regions[r].any():
      total += w * l1[r] + (log_vars[r] if log_vars else 0.0)
  return total, l1


@pytest.mark.parametrize("regions", [(), ("ptv",), ("ptv", "oar"), ("oar",)])
def test_uncertainty_mode_matches_the_formula(regions):
  pred, target, ptv, oar = make_batch(1)
  module = losses.RegionAwareLoss(regions=regions)
  params = module.init(jax.random.key(0), pred, target, ptv, oar).get(
      "params", {}
  )
  assert set(params) == {f"log_var_{r}" for r in regions}
  log_vars = {"ptv": 0.7, "oar": -0.4}
  params = {k: jnp.float32(log_vars[k[len("log_var_") :]]) for k in params}
  loss, metrics = module.apply({"params": params}, pred, target, ptv, oar)
  weights = {r: np.exp(-log_vars[r]) for r in regions}
  expected, l1 = numpy_loss(
      pred, target, ptv, oar, weights, {r: log_vars[r] for r in regions}
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert set(metrics) == {
      "l1_all",
      "l1_ptv",
      "l1_oar",
      "weight_ptv",
      "weight_oar",
      "loss",
  }
  np.testing.assert_allclose(metrics["loss"], loss)
  np.testing.assert_allclose(
      metrics["l1_all"], np.abs(pred - target).mean(), rtol=1e-5
  )
  for r in ("ptv", "oar"):
    np.testing.assert_allclose(metrics[f"l1_{r}"], l1[r], rtol=1e-5)
    np.testing.assert_allclose(
        metrics[f"weight_{r}"], weights.get(r, 0.0), rtol=1e-6
    )


def test_fixed_mode_has_no_params_and_constant_weights():
  pred, target, ptv, oar = make_batch(2)
  module = losses.RegionAwareLoss(mode="fixed", fixed_weights=(2.0, 0.5))
  assert (
      module.init(jax.random.key(0), pred, target, ptv, oar).get("params", {})
      == {}
  )
  loss, metrics = module.apply({}, pred, target, ptv, oar)
  expected, _ = numpy_loss(pred, target, ptv, oar, {"ptv": 2.0, "oar": 0.5})
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  assert float(metrics["weight_ptv"]) == 2.0
  assert float(metrics["weight_oar"]) == 0.5


@pytest.mark.parametrize("empty", [("ptv",), ("oar",), ("ptv", "oar")])
def test_empty_region_contributes_nothing_and_stays_finite(empty):
  pred, target, ptv, oar = make_batch(3, empty=empty)
  module = losses.RegionAwareLoss()
  params = {"log_var_ptv": jnp.float32(0.3), "log_var_oar": jnp.float32(0.2)}

  def fn(p, pred):
    return module.apply({"params": p}, pred, target, ptv, oar)

  (loss, metrics), (g_params, g_pred) = jax.value_and_grad(
      fn, argnums=(0, 1), has_aux=True
  )(params, pred)
  assert np.isfinite(loss)
  assert all(np.all(np.isfinite(g)) for g in (*g_params.values(), g_pred))
  for r in empty:
    assert float(metrics[f"l1_{r}"]) == 0.0
    assert float(g_params[f"log_var_{r}"]) == 0.0
  expected, _ = numpy_loss(
      pred,
      target,
      ptv,
      oar,
      {r: np.exp(-float(params[f"log_var_{r}"])) for r in ("ptv", "oar")},
      {r: float(params[f"log_var_{r}"]) for r in ("ptv", "oar")},
  )
  np.testing.assert_allclose(loss, expected, rtol=1e-5)


def test_gradient_reaches_the_log_variances():
  pred, target, ptv, oar = make_batch(4)
  module = losses.RegionAwareLoss()
  params = module.init(jax.random.key(0), pred, target, ptv, oar)["params"]
  grads, metrics = jax.grad(
      lambda p: module.apply({"params": p}, pred, target, ptv, oar),
      has_aux=True,
  )(params)
  for r in ("ptv", "oar"):
    # d/ds (exp(-s) L + s) = 1 - exp(-s) L.
    expected = 1.0 - float(metrics[f"weight_{r}"]) * float(metrics[f"l1_{r}"])
    assert abs(expected) > 1e-3
    np.testing.assert_allclose(grads[f"log_var_{r}"], expected, rtol=1e-5)


def test_learned_weights_converge_to_inverse_region_error():
  """A toy problem with irreducible Laplace noise of known scale per region:
  trained with Adam, the fit improves, and each learned weight exp(-s_r)
  settles near its optimum 1 / L1_r, inside [1e-2, 1e2]."""
  rng = np.random.default_rng(5)
  shape = (2, 12, 12, 12)
  ptv = (rng.random(size=(*shape, 1)) < 0.25).astype(np.float32)
  oar = np.zeros((*shape, 7), np.float32)
  oar[..., 2] = (rng.random(size=shape) < 0.3) * (ptv[..., 0] == 0)
  in_oar = oar.any(-1, keepdims=True)
  noise_scale = np.where(ptv > 0, 0.03, np.where(in_oar, 0.3, 0.1))
  target = (
      0.9 * ptv
      + 0.2 * in_oar
      + 0.05
      + rng.laplace(size=ptv.shape) * noise_scale
  ).astype(np.float32)

  module = losses.RegionAwareLoss()
  params = {
      "model": {"w": jnp.zeros(3, jnp.float32)},  # pred = w0 ptv + w1 oar + w2
      "loss": module.init(jax.random.key(0), target, target, ptv, oar)[
          "params"
      ],
  }

  def objective(p):
    w = p["model"]["w"]
    pred = w[0] * ptv + w[1] * in_oar + w[2]
    return module.apply({"params": p["loss"]}, pred, target, ptv, oar)

  optimizer = optax.adam(0.03)

  @jax.jit
  def step(p, opt_state):
    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(p)
    updates, opt_state = optimizer.update(grads, opt_state, p)
    return optax.apply_updates(p, updates), opt_state, metrics

  opt_state = optimizer.init(params)
  history = []
  for _ in range(400):
    params, opt_state, metrics = step(params, opt_state)
    history.append(jax.device_get(metrics))

  first, last = history[0], history[-1]
  assert last["l1_all"] < 0.5 * first["l1_all"]
  np.testing.assert_allclose(params["model"]["w"], [0.9, 0.2, 0.05], atol=0.05)
  for r, scale in (("ptv", 0.03), ("oar", 0.3)):
    weight, l1 = float(last[f"weight_{r}"]), float(last[f"l1_{r}"])
    assert 1e-2 < weight < 1e2
    # Laplace noise: the best achievable L1 is its scale.
    np.testing.assert_allclose(l1, scale, rtol=0.25)
    np.testing.assert_allclose(weight * l1, 1.0, rtol=0.15)
  # The two regions end with clearly different weights (PTV far higher).
  assert last["weight_ptv"] > 3 * last["weight_oar"]


def test_create_loss_follows_the_config_rows():
  spec = importlib.util.spec_from_file_location(
      "openkbp_config", CONFIGS / "openkbp.py"
  )
  config_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(config_module)
  expected = {
      "loss1": (),
      "loss2": ("ptv",),
      "loss3": ("ptv", "oar"),
      "": ("ptv", "oar"),
  }
  for variant, regions in expected.items():
    loss = losses.create_loss(config_module.get_config(variant).loss)
    assert isinstance(loss, losses.RegionAwareLoss)
    assert tuple(loss.regions) == regions
    assert loss.mode == "uncertainty"


def test_rejects_bad_fields_and_shapes():
  pred, target, ptv, oar = make_batch(6)
  with pytest.raises(ValueError, match="regions"):
    losses.RegionAwareLoss(regions=("brain",)).init(
        jax.random.key(0), pred, target, ptv, oar
    )
  with pytest.raises(ValueError, match="mode"):
    losses.RegionAwareLoss(mode="learned").init(
        jax.random.key(0), pred, target, ptv, oar
    )
  with pytest.raises(ValueError, match="shape"):
    losses.RegionAwareLoss().init(jax.random.key(0), pred[:1], target, ptv, oar)


def test_the_mask_region_is_a_third_learned_term_over_the_possible_dose_mask():
  pred, target, ptv, oar = make_batch(7)
  rng = np.random.default_rng(8)
  mask = (rng.random(size=ptv.shape) < 0.4).astype(np.float32)
  module = losses.RegionAwareLoss(regions=("ptv", "oar", "mask"))
  params = module.init(jax.random.key(0), pred, target, ptv, oar, mask)
  assert set(params["params"]) == {"log_var_ptv", "log_var_oar", "log_var_mask"}
  log_vars = {"ptv": 0.7, "oar": -0.4, "mask": 1.3}
  params = {f"log_var_{r}": jnp.float32(v) for r, v in log_vars.items()}
  loss, metrics = module.apply({"params": params}, pred, target, ptv, oar, mask)
  error = np.abs(pred - target)[..., 0]
  l1_mask = error[mask[..., 0] > 0].mean()
  paper, _ = numpy_loss(
      pred,
      target,
      ptv,
      oar,
      {r: np.exp(-log_vars[r]) for r in ("ptv", "oar")},
      log_vars,
  )
  expected = paper + np.exp(-1.3) * l1_mask + 1.3
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics["l1_mask"], l1_mask, rtol=1e-5)
  np.testing.assert_allclose(metrics["weight_mask"], np.exp(-1.3), rtol=1e-6)
  # Fixed mode: the third weight, 1 when left out.
  fixed = losses.RegionAwareLoss(regions=("mask",), mode="fixed")
  loss, _ = fixed.apply({}, pred, target, ptv, oar, mask)
  np.testing.assert_allclose(loss, error.mean() + l1_mask, rtol=1e-5)
  fixed = losses.RegionAwareLoss(
      regions=("mask",), mode="fixed", fixed_weights=(1.0, 1.0, 3.0)
  )
  loss, _ = fixed.apply({}, pred, target, ptv, oar, mask)
  np.testing.assert_allclose(loss, error.mean() + 3 * l1_mask, rtol=1e-5)
  with pytest.raises(ValueError, match="no possible-dose mask"):
    module.apply({"params": params}, pred, target, ptv, oar)
