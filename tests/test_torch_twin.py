"""The PyTorch twin (benchmarks/torch_randose.py) is the same network as the
JAX model: same parameter count per module, and with the same weights the
same output. Skipped where torch (a benchmark-only dependency) is absent."""

import pathlib
import sys

import numpy as np
import pytest

torch = pytest.importorskip(
    "torch",
    reason="torch is a benchmark-only dependency "
    "(pip install -r benchmarks/requirements.txt)",
)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from randose_jax import default_config  # noqa: E402
from randose_jax import models  # noqa: E402

sys.path.insert(
    0, str(pathlib.Path(__file__).resolve().parents[1] / "benchmarks")
)
import torch_randose  # noqa: E402

GRID = 16


def _model_config(row=5, widths=(4, 8, 8), **overrides):
  config = default_config.get_default_config().model
  config.widths = widths
  config.update(default_config.ABLATION_ROWS[row])
  config.update(overrides)
  return config


def _jax_counts(model_config, grid=GRID):
  inputs = {
      k: jax.ShapeDtypeStruct((1, grid, grid, grid, c), jnp.float32)
      for k, c in (("ptv", 1), ("ct", 1), ("oar", 7))
  }
  shapes = jax.eval_shape(
      models.create_model(model_config).init, jax.random.key(0), inputs
  )["params"]
  counts = {
      name: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(sub))
      for name, sub in shapes.items()
  }
  counts["total"] = sum(counts.values())
  return counts


@pytest.mark.parametrize("row", [1, 2, 3, 4, 5])
def test_parameter_counts_match_jax_per_module(row):
  config = _model_config(row, widths=(4, 8, 16, 32))
  twin = torch_randose.build_from_config(config)
  assert torch_randose.count_parameters(twin) == _jax_counts(config)


def _inputs(rng, grid=GRID):
  ptv = rng.choice([0.0, 0.8, 0.9, 1.0], size=(2, grid, grid, grid, 1))
  return {
      "ptv": ptv.astype(np.float32),
      "ct": rng.uniform(-1, 1.5, (2, grid, grid, grid, 1)).astype(np.float32),
      "oar": (rng.random((2, grid, grid, grid, 7)) < 0.2).astype(np.float32),
  }


def _random_params(module, inputs, seed=0):
  """Random values for the Flax tree (shapes by `jax.eval_shape`, so nothing
  compiles): alpha, beta and the norm scales move off their init values too,
  so any leaf copied wrongly changes the output."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), inputs)["params"]
  rng = np.random.default_rng(seed)
  return jax.tree.map(
      lambda s: (
          rng.standard_normal(s.shape) / np.sqrt(np.prod(s.shape[:-1]))
      ).astype(np.float32),
      shapes,
  )


def _to_torch(x):
  return torch.from_numpy(np.moveaxis(np.asarray(x), -1, 1).copy())


@pytest.mark.parametrize(
    "row,overrides",
    [
        (5, {}),  # the paper's network
        (1, {}),
        (3, {}),
        (4, {}),
        (5, dict(widths=(4, 4, 8, 8, 8))),  # 5 stages: a 1^3 bottleneck
        (
            5,
            dict(
                up="resize",
                down="conv",
                pi_resize="linear",
                norm="group",
                norm_groups=2,
                msfe_fused=True,
                blocks_per_stage=2,
            ),
        ),
    ],
)
def test_same_weights_same_output(row, overrides):
  config = _model_config(row)
  with config.unlocked():
    config.update(overrides)
  inputs = _inputs(np.random.default_rng(0))
  module = models.create_model(config)
  params = _random_params(module, inputs)
  expected = np.asarray(jax.jit(module.apply)({"params": params}, inputs))

  twin = torch_randose.build_from_config(config)
  torch_randose.load_flax_params(twin, params)
  with torch.no_grad():
    got = twin({k: _to_torch(v) for k, v in inputs.items()})
  np.testing.assert_allclose(
      np.moveaxis(got.numpy(), 1, -1), expected, rtol=1e-4, atol=1e-4
  )


def test_converter_rejects_a_mismatched_tree():
  config = _model_config(5)
  inputs = _inputs(np.random.default_rng(0))
  params = _random_params(models.create_model(config), inputs)
  twin = torch_randose.build_from_config(_model_config(4))  # no AF modules
  with pytest.raises(KeyError, match="af_"):
    torch_randose.load_flax_params(twin, params)


@pytest.mark.parametrize(
    "regions,empty_ptv",
    [
        (("ptv", "oar"), False),
        (("ptv", "oar"), True),
        (("ptv",), False),
        ((), False),
    ],
)
def test_region_aware_loss_matches_jax(regions, empty_ptv):
  from randose_jax.training import losses

  loss_config = default_config.get_default_config().loss
  loss_config.regions = regions
  rng = np.random.default_rng(1)
  shape = (2, 8, 8, 8)
  arrays = {
      "pred": rng.random(shape + (1,)),
      "target": rng.random(shape + (1,)),
      "ptv": rng.choice([0.0, 0.8, 0.9, 1.0], shape + (1,)) * (not empty_ptv),
      "oar": rng.random(shape + (7,)) < 0.1,
  }
  arrays = {k: v.astype(np.float32) for k, v in arrays.items()}
  module = losses.create_loss(loss_config)
  params = {
      f"log_var_{r}": np.float32(0.3 * (i + 1)) for i, r in enumerate(regions)
  }
  expected, _ = module.apply({"params": params}, *arrays.values())

  twin = torch_randose.RegionAwareLoss(loss_config)
  torch_randose.load_flax_params(twin, params)
  got, _ = twin(*(_to_torch(v) for v in arrays.values()))
  np.testing.assert_allclose(got.item(), float(expected), rtol=1e-6)
