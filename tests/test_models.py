"""Tests of the RANDose network and its blocks (randose_jax/models).

Tiny widths and grids. Structure and shapes come from jax.eval_shape (nothing
compiled); numerical tests fill the params with seeded random values instead
of calling `init`, whose random-number code is slow to compile on CPU.
"""

import functools

import jax

# Quick CPU compiles; must precede the first compilation.
jax.config.update("jax_disable_most_optimizations", True)

import flax.linen as nn
from jax.flatten_util import ravel_pytree
from flax import traverse_util
import jax.numpy as jnp
import numpy as np
import pytest

from randose_jax import default_config
from randose_jax import models

TINY = (4, 8, 16)


def model_config(row=5, widths=TINY, **overrides):
  config = default_config.get_default_config().model
  config.update(default_config.ABLATION_ROWS[row])
  config.widths = widths
  config.update(overrides)
  return config


def make_inputs(grid, batch=2, seed=0):
  """Random inputs shaped like `encode_patient`'s: a PTV blob with the three
  prescription levels, CT in HU / 1000, seven binary OAR channels."""
  rng = np.random.default_rng(seed)
  d, h, w = grid
  zz, yy, xx = np.meshgrid(
      *(np.linspace(-1, 1, n) for n in grid), indexing="ij"
  )
  r = np.sqrt(zz**2 + yy**2 + xx**2)
  ptv = np.where(
      r < 0.3, 1.0, np.where(r < 0.45, 0.9, np.where(r < 0.6, 0.8, 0.0))
  )
  ptv = np.broadcast_to(ptv[None, ..., None], (batch, d, h, w, 1))
  ct = rng.normal(size=(batch, d, h, w, 1)) * 0.5
  oar = (rng.random(size=(batch, d, h, w, 7)) < 0.1).astype(np.float32)
  return {
      "ptv": jnp.asarray(ptv, jnp.float32),
      "ct": jnp.asarray(ct, jnp.float32),
      "oar": jnp.asarray(oar),
  }


def abstract_inputs(grid, batch=2):
  return {
      k: jax.ShapeDtypeStruct((batch, *grid, c), jnp.float32)
      for k, c in (("ptv", 1), ("ct", 1), ("oar", 7))
  }


def abstract_params(model, inputs):
  return jax.eval_shape(model.init, jax.random.key(0), inputs)["params"]


def random_params(abstract, seed=0):
  """Seeded random values for an abstract params tree: conv/dense kernels
  ~ N(0, 1 / fan_in), norm scales ~ 1, biases small, alpha and beta ~ 1."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = path[-1].key
    shape = leaf.shape
    if name == "kernel":
      value = rng.normal(size=shape) / np.sqrt(np.prod(shape[:-1]))
    elif name in ("scale", "alpha", "beta"):
      value = 1.0 + 0.2 * rng.normal(size=shape)
    else:
      value = 0.1 * rng.normal(size=shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def flat_names(params):
  return {"/".join(k) for k in traverse_util.flatten_dict(params)}


# ------------------------------------------------------------------ shapes


@pytest.mark.parametrize("row", [1, 2, 3, 4, 5])
@pytest.mark.parametrize(
    "grid,widths", [((16, 16, 16), TINY), ((32, 16, 32), (2, 4, 4, 8, 8))]
)
def test_output_shape_every_row(row, grid, widths):
  model = models.create_model(model_config(row, widths))
  inputs = abstract_inputs(grid)
  params = abstract_params(model, inputs)
  out = jax.eval_shape(model.apply, {"params": params}, inputs)
  assert out.shape == (2, *grid, 1)
  assert out.dtype == jnp.float32
  assert all(
      leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(params)
  )


def test_rejects_grid_not_divisible_and_bad_inputs():
  model = models.create_model(model_config(5, TINY))
  with pytest.raises(ValueError, match="not divisible"):
    jax.eval_shape(model.init, jax.random.key(0), abstract_inputs((16, 18, 16)))
  bad = abstract_inputs((16, 16, 16))
  bad["oar"] = jax.ShapeDtypeStruct((2, 16, 16, 16, 6), jnp.float32)
  with pytest.raises(ValueError, match="oar"):
    jax.eval_shape(model.init, jax.random.key(0), bad)


@pytest.mark.parametrize("row", [1, 2, 3, 4, 5])
def test_parameter_groups_per_row(row):
  switches = default_config.ABLATION_ROWS[row]
  widths = TINY
  model = models.create_model(model_config(row, widths))
  params = abstract_params(model, abstract_inputs((16, 16, 16)))
  top = set(params)
  names = flat_names(params)
  s_max = len(widths)

  expected = {"stem_ptv", "stem_ct", "stem_oar", "head"}
  expected |= {f"encoder_{s}" for s in range(1, s_max + 1)}
  expected |= {f"up_{s}" for s in range(1, s_max)}
  expected |= {f"decoder_{s}" for s in range(1, s_max)}
  if switches["use_pi"]:
    expected |= {f"pi_{s}" for s in range(2, s_max + 1)}
  if switches["use_af"]:
    expected |= {f"af_{s}" for s in range(1, s_max)}
  assert top == expected

  block = "encoder_1/blocks_0"
  if switches["use_msfe"]:
    for k in (3, 5, 7):
      kernel = params["encoder_1"]["blocks_0"]["msfe"][f"conv_k{k}"]["kernel"]
      assert kernel.shape == (k, k, k, 3 * widths[0], widths[0])
    assert not any(n.startswith(f"{block}/conv_") for n in names)
  else:
    assert params["encoder_1"]["blocks_0"]["conv_0"]["kernel"].shape == (
        3,
        3,
        3,
        3 * widths[0],
        widths[0],
    )
    assert params["encoder_1"]["blocks_0"]["conv_1"]["kernel"].shape == (
        3,
        3,
        3,
        widths[0],
        widths[0],
    )
    assert not any("msfe" in n for n in names)

  alphas = {n for n in names if n.endswith("/alpha")}
  if switches["use_csa"]:
    # One CSA per encoder and decoder block, plus two per AF.
    blocks = 2 * s_max - 1
    assert len(alphas) == blocks + (
        2 * (s_max - 1) if switches["use_af"] else 0
    )
    assert f"{block}/csa/alpha" in alphas
    assert params["encoder_1"]["blocks_0"]["csa"]["alpha"].shape == ()
  else:
    assert not alphas

  betas = {n for n in names if n.endswith("/beta")}
  assert betas == (
      {f"af_{s}/beta" for s in range(1, s_max)} if switches["use_af"] else set()
  )

  # Decoder input: concatenated skip (2C) without AF, fused (C) with it.
  dec_in = widths[0] * (1 if switches["use_af"] else 2)
  dec = params["decoder_1"]["blocks_0"]
  first = dec["msfe"]["conv_k3"] if switches["use_msfe"] else dec["conv_0"]
  assert first["kernel"].shape[-2:] == (dec_in, widths[0])

  if switches["use_pi"]:
    for s in range(2, s_max + 1):
      pi = params[f"pi_{s}"]
      for k in (3, 5, 7):
        # Every PI conv maps to the stage width.
        assert pi[f"conv_enc_k{k}"]["kernel"].shape == (
            k,
            k,
            k,
            widths[s - 2],
            widths[s - 1],
        )
        assert pi[f"conv_ptv_k{k}"]["kernel"].shape == (
            k,
            k,
            k,
            widths[0],
            widths[s - 1],
        )
        assert f"sa_enc_k{k}" in pi and f"sa_ptv_k{k}" in pi
      assert "sa_out" in pi


def test_options_change_the_tree_as_documented():
  inputs = abstract_inputs((16, 16, 16))
  params = abstract_params(
      models.create_model(
          model_config(5, TINY, down="conv", up="resize", blocks_per_stage=2)
      ),
      inputs,
  )
  assert params["down_2"]["conv"]["kernel"].shape == (2, 2, 2, 4, 4)
  assert params["up_1"]["conv"]["kernel"].shape == (1, 1, 1, 8, 4)
  assert set(params["encoder_2"]) == {"blocks_0", "blocks_1"}
  params = abstract_params(models.create_model(model_config(5, TINY)), inputs)
  assert "down_2" not in params  # max pooling has no params
  assert params["up_1"]["conv"]["kernel"].shape == (2, 2, 2, 8, 4)
  # Both MSFE modes and remat share one tree.
  for overrides in (dict(msfe_fused=True), dict(remat=True)):
    other = abstract_params(
        models.create_model(model_config(5, TINY, **overrides)), inputs
    )
    assert jax.tree_util.tree_structure(other) == (
        jax.tree_util.tree_structure(params)
    )


def test_create_model_is_randose_of_the_config_fields():
  config = model_config(5, TINY, conv_impl="fft", norm="group")
  model = models.create_model(config)
  for field in models.randose.MODEL_FIELDS:
    assert getattr(model, field) == config[field], field
  # RANDose's defaults are the default config's, so a field a saved config
  # lacks takes the value it would have had.
  defaults = default_config.get_default_config().model
  assert set(defaults) == set(models.randose.MODEL_FIELDS) | {"name"}
  for field in models.randose.MODEL_FIELDS:
    assert getattr(models.RANDose(), field) == defaults[field], field
  # A config read back from JSON holds lists.
  as_json = dict(config, widths=list(TINY), msfe_kernels=[3, 5])
  assert models.create_model(as_json).widths == TINY


@pytest.mark.parametrize(
    "field,value,match",
    [
        ("colour", "red", "model.colour: unknown field"),
        ("name", "unet", "model.name: unknown 'unet'"),
        ("activation", "swish", "model.activation: unknown 'swish'"),
        ("norm", "batch", "model.norm: unknown 'batch'"),
        ("dtype", "float16", "model.dtype: unknown 'float16'"),
        ("conv_impl", "winograd", "model.conv_impl: unknown 'winograd'"),
        ("down", "stride", "model.down: unknown 'stride'"),
        ("up", "pixelshuffle", "model.up: unknown 'pixelshuffle'"),
        ("pi_resize", "cubic", "model.pi_resize: unknown 'cubic'"),
        ("head_init", "ones", "model.head_init: unknown 'ones'"),
        ("msfe_kernels", (3, 4), "model.msfe_kernels: sizes must be odd"),
        ("widths", (), "model.widths"),
        ("blocks_per_stage", 0, "model.blocks_per_stage"),
    ],
)
def test_create_model_names_a_bad_field(field, value, match):
  config = dict(model_config(5, TINY), **{field: value})
  with pytest.raises(default_config.ConfigError, match=match) as error:
    models.create_model(config)
  assert "\n" not in str(error.value)  # one line


# --------------------------------------------------------- the forward pass


@pytest.fixture(scope="module")
def row5_run():
  """One real row-5 forward on an odd grid, with every intermediate; and
  the jitted forward, for more inputs of the same shapes."""
  grid = (16, 8, 16)
  model = models.create_model(model_config(5, (2, 4, 4, 8)))
  inputs = make_inputs(grid)
  params = random_params(abstract_params(model, abstract_inputs(grid)))
  apply = jax.jit(
      lambda p, x: model.apply(
          {"params": p},
          x,
          capture_intermediates=True,
          mutable=["intermediates"],
      )
  )
  out, state = apply(params, inputs)
  return inputs, out, state["intermediates"], lambda x: apply(params, x)[0]


def test_forward_is_finite_and_depends_on_inputs(row5_run):
  inputs, out, _, forward = row5_run
  assert out.shape == (2, 16, 8, 16, 1) and out.dtype == jnp.float32
  assert np.all(np.isfinite(out))
  scale = np.std(np.asarray(out))
  assert scale > 1e-4  # not a constant map
  # Each input matters: changing it alone changes the prediction.
  rng = np.random.default_rng(11)
  changed = {
      "ptv": inputs["ptv"] * 0.5,  # lower prescription levels
      "ct": (
          inputs["ct"]
          + jnp.asarray(rng.normal(size=inputs["ct"].shape), jnp.float32)
      ),
      "oar": inputs["oar"].at[..., 0].set(1 - inputs["oar"][..., 0]),
  }
  for key, value in changed.items():
    other = forward({**inputs, key: value})
    assert np.all(np.isfinite(other))
    diff = np.abs(np.asarray(other) - np.asarray(out)).max()
    assert diff > 1e-2 * scale, (key, diff, scale)


def test_attention_maps_strictly_between_0_and_1(row5_run):
  _, _, inter, _ = row5_run
  maps = [
      v
      for path, v in traverse_util.flatten_dict(inter).items()
      if path[-1] == "attention"
  ]
  # Spatial: 2 per CSA; channel: 1 per CSA; PI: 7 per stage.
  assert len(maps) > 20
  for group in maps:
    for weights in group:
      weights = np.asarray(weights)
      assert weights.dtype == np.float32
      assert np.all(weights > 0) and np.all(weights < 1)
      assert weights.shape[-1] == 1 or weights.ndim == 2


def test_pi_resizes_ptv_features_to_each_stage_grid(row5_run):
  inputs, _, inter, _ = row5_run
  f_p = np.asarray(inter["stem_ptv"]["__call__"][0])  # (N, D, H, W, w0)
  n, d, h, w, c = f_p.shape
  assert (d, h, w) == inputs["ptv"].shape[1:4]
  for s in range(2, 5):
    resized = np.asarray(inter[f"pi_{s}"]["ptv_resized"][0])
    f = 2 ** (s - 1)
    assert resized.shape == (n, d // f, h // f, w // f, c)
    pooled = f_p.reshape(n, d // f, f, h // f, f, w // f, f, c).mean(
        axis=(2, 4, 6)
    )
    np.testing.assert_allclose(resized, pooled, rtol=1e-5, atol=1e-6)
    # F_Int,s is what the stage's MSCSA sees: stage width, stage grid.
    f_int = inter[f"pi_{s}"]["__call__"][0]
    assert f_int.shape == (n, d // f, h // f, w // f, (2, 4, 4, 8)[s - 1])


def test_resize_ptv_methods():
  x = jnp.asarray(
      np.random.default_rng(0).normal(size=(1, 8, 4, 8, 3)), jnp.float32
  )
  pooled = models.resize_ptv(x, (2, 1, 2), "avgpool")
  np.testing.assert_allclose(
      pooled,
      np.asarray(x).reshape(1, 2, 4, 1, 4, 2, 4, 3).mean((2, 4, 6)),
      rtol=1e-5,
      atol=1e-6,
  )
  assert models.resize_ptv(x, (4, 2, 4), "linear").shape == (1, 4, 2, 4, 3)
  assert models.resize_ptv(x, (8, 4, 8)) is x
  with pytest.raises(ValueError):
    models.resize_ptv(x, (3, 2, 4), "avgpool")


def test_pi_resize_is_accurate_in_bfloat16():
  """Average pooling by 8 sums 512 values: done in bfloat16 it drifts by
  several percent, so PI resizes in float32 and only then casts."""
  rng = np.random.default_rng(9)
  f_p = jnp.asarray(1 + 0.1 * rng.normal(size=(1, 16, 16, 16, 3)), jnp.bfloat16)
  f_e = jnp.ones((1, 2, 2, 2, 2), jnp.bfloat16)
  pi = models.PTVIntegration(
      4, (3,), conv=functools.partial(models.Conv, dtype=jnp.bfloat16)
  )
  params = random_params(
      jax.eval_shape(pi.init, jax.random.key(0), f_e, f_p)["params"]
  )
  out, state = pi.apply({"params": params}, f_e, f_p, mutable=["intermediates"])
  assert out.dtype == jnp.bfloat16 and out.shape == (1, 2, 2, 2, 4)
  resized = np.asarray(state["intermediates"]["ptv_resized"][0], np.float64)
  expected = (
      np.asarray(f_p, np.float64)
      .reshape(1, 2, 8, 2, 8, 2, 8, 3)
      .mean(axis=(2, 4, 6))
  )
  assert np.abs(resized - expected).max() < 1e-2 * np.abs(expected).max()


# ------------------------------------------------------------------ blocks


def _msfe_case(seed):
  x = jnp.asarray(
      np.random.default_rng(seed).normal(size=(2, 8, 6, 8, 3)), jnp.float32
  )
  unfused = models.MSFE(5, (3, 5, 7))
  fused = models.MSFE(
      5, (3, 5, 7), functools.partial(models.Conv, fuse_sums=True)
  )
  abstract = jax.eval_shape(unfused.init, jax.random.key(0), x)["params"]
  assert jax.tree_util.tree_structure(abstract) == jax.tree_util.tree_structure(
      jax.eval_shape(fused.init, jax.random.key(0), x)["params"]
  )
  return x, unfused, fused, random_params(abstract, seed)


def test_msfe_fused_matches_unfused_forward_and_gradient():
  x, unfused, fused, params = _msfe_case(1)
  target = jnp.asarray(
      np.random.default_rng(2).normal(size=(2, 8, 6, 8, 5)), jnp.float32
  )

  def loss(module):
    def fn(p, x):
      return jnp.mean((module.apply({"params": p}, x) - target) ** 2)

    return jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))

  l_u, (g_u, gx_u) = loss(unfused)(params, x)
  l_f, (g_f, gx_f) = loss(fused)(params, x)
  np.testing.assert_allclose(
      unfused.apply({"params": params}, x),
      fused.apply({"params": params}, x),
      rtol=1e-4,
      atol=1e-5,
  )
  np.testing.assert_allclose(l_u, l_f, rtol=1e-5)
  for a, b in zip(
      jax.tree_util.tree_leaves(g_u), jax.tree_util.tree_leaves(g_f)
  ):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(gx_u, gx_f, rtol=1e-4, atol=1e-6)


def test_msfe_is_the_sum_of_its_branch_convs():
  x, unfused, _, params = _msfe_case(3)
  expected = 0
  for k in (3, 5, 7):
    conv = nn.Conv(5, (k, k, k), padding="SAME")
    expected = expected + conv.apply({"params": params[f"conv_k{k}"]}, x)
  np.testing.assert_allclose(
      unfused.apply({"params": params}, x), expected, rtol=1e-4, atol=1e-5
  )


def test_csa_is_channel_plus_alpha_times_spatial():
  x = jnp.asarray(
      np.random.default_rng(4).normal(size=(2, 4, 4, 4, 8)), jnp.float32
  )
  csa = models.ChannelSpatialAttention(reduction=4)
  params = random_params(
      jax.eval_shape(csa.init, jax.random.key(0), x)["params"], 4
  )
  assert params["channel_attention"]["fc1"]["kernel"].shape == (8, 2)
  assert params["channel_attention"]["fc2"]["kernel"].shape == (2, 8)
  out, state = csa.apply({"params": params}, x, mutable=["intermediates"])
  a_c = state["intermediates"]["channel_attention"]["attention"][0]
  a_s = state["intermediates"]["spatial_attention"]["attention"][0]
  assert a_c.shape == (2, 8) and a_s.shape == (2, 4, 4, 4, 1)
  expected = x * a_c[:, None, None, None, :] + params["alpha"] * x * a_s
  np.testing.assert_allclose(out, expected, rtol=1e-5, atol=1e-6)
  # The channel weights come from the global average pool.
  pooled = np.asarray(x).mean(axis=(1, 2, 3))
  fc1, fc2 = (params["channel_attention"][n] for n in ("fc1", "fc2"))
  hidden = np.maximum(pooled @ fc1["kernel"] + fc1["bias"], 0)
  np.testing.assert_allclose(
      a_c, 1 / (1 + np.exp(-(hidden @ fc2["kernel"] + fc2["bias"]))), rtol=1e-5
  )


def test_attention_fusion_is_skip_plus_beta_times_up():
  rng = np.random.default_rng(5)
  f_e, f_d = (
      jnp.asarray(rng.normal(size=(1, 4, 4, 4, 4)), jnp.float32)
      for _ in range(2)
  )
  af = models.AttentionFusion()
  params = random_params(
      jax.eval_shape(af.init, jax.random.key(0), f_e, f_d)["params"], 5
  )
  csa = models.ChannelSpatialAttention()
  expected = csa.apply({"params": params["csa_skip"]}, f_e) + params[
      "beta"
  ] * csa.apply({"params": params["csa_up"]}, f_d)
  np.testing.assert_allclose(
      af.apply({"params": params}, f_e, f_d), expected, rtol=1e-5, atol=1e-6
  )


# -------------------------------------------------------- init, dtype, grads


def test_same_seed_same_params_different_seed_different():
  model = models.create_model(model_config(5, (2, 4)))
  inputs = make_inputs((8, 8, 8), batch=1)
  init = jax.jit(model.init)
  p0, p0_again, p1 = (
      init(jax.random.key(s), inputs)["params"] for s in (0, 0, 1)
  )
  leaves0 = jax.tree_util.tree_leaves(p0)
  for a, b in zip(leaves0, jax.tree_util.tree_leaves(p0_again)):
    np.testing.assert_array_equal(a, b)
  kernels = [
      (a, b)
      for (path, a), b in zip(
          jax.tree_util.tree_leaves_with_path(p0), jax.tree_util.tree_leaves(p1)
      )
      if path[-1].key == "kernel" and path[0].key != "head"
  ]
  assert kernels and all(not np.allclose(a, b) for a, b in kernels)
  # The head starts at zero (model.head_init='zeros', the default): every
  # prediction starts at 0 Gy whatever the seed.
  assert not np.any(p0["head"]["kernel"]) and not np.any(p1["head"]["kernel"])
  # alpha and beta start at their configured values.
  flat = traverse_util.flatten_dict(p0)
  assert all(
      float(v) == 1.0 for k, v in flat.items() if k[-1] in ("alpha", "beta")
  )


def test_bfloat16_matches_float32():
  grid = (8, 8, 8)
  inputs = make_inputs(grid, seed=6)
  m32 = models.create_model(model_config(5, (4, 8)))
  m16 = models.create_model(model_config(5, (4, 8), dtype="bfloat16"))
  abstract = abstract_params(m16, abstract_inputs(grid))
  assert all(
      leaf.dtype == jnp.float32 for leaf in jax.tree_util.tree_leaves(abstract)
  )
  params = random_params(abstract, 6)
  y32 = jax.jit(m32.apply)({"params": params}, inputs)
  y16 = jax.jit(m16.apply)({"params": params}, inputs)
  assert y16.dtype == jnp.float32
  scale = float(np.std(y32))
  assert scale > 1e-3
  error = np.abs(np.asarray(y16) - np.asarray(y32))
  # bf16 keeps 8 significant bits (relative step 2^-8 ~ 0.4%); errors
  # accumulate over ~20 layers but must stay a few percent of the signal.
  assert error.mean() < 0.03 * scale, (error.mean(), scale)
  assert error.max() < 0.2 * scale, (error.max(), scale)
  assert not np.array_equal(y16, y32)  # bf16 compute really happened


def test_remat_gives_the_same_output():
  grid = (8, 8, 8)
  inputs = make_inputs(grid, seed=7)
  plain = models.create_model(model_config(5, (4, 8)))
  remat = models.create_model(model_config(5, (4, 8), remat=True))
  params = random_params(abstract_params(plain, abstract_inputs(grid)), 7)
  np.testing.assert_allclose(
      jax.jit(plain.apply)({"params": params}, inputs),
      jax.jit(remat.apply)({"params": params}, inputs),
      rtol=1e-5,
      atol=1e-6,
  )


def test_gradients_reach_alpha_beta_and_the_loss_weights():
  from randose_jax.training import losses

  grid = (8, 8, 8)
  model = models.create_model(model_config(5, (4, 8)))
  loss_module = losses.RegionAwareLoss()
  inputs = make_inputs(grid, seed=8)
  target = inputs["ptv"] * 0.9 + 0.05
  params = {
      "model": random_params(abstract_params(model, abstract_inputs(grid)), 8),
      "loss": {
          "log_var_ptv": jnp.float32(0.1),
          "log_var_oar": jnp.float32(-0.1),
      },
  }

  def objective(p):
    pred = model.apply({"params": p["model"]}, inputs)
    loss, _ = loss_module.apply(
        {"params": p["loss"]}, pred, target, inputs["ptv"], inputs["oar"]
    )
    return loss

  grads = jax.jit(jax.grad(objective))(params)
  assert np.all(np.isfinite(ravel_pytree(grads)[0]))
  flat = traverse_util.flatten_dict(grads["model"])
  scalars = {k: v for k, v in flat.items() if k[-1] in ("alpha", "beta")}
  assert len(scalars) == 3 + 2 + 1  # CSAs in 3 blocks, 2 in AF; one beta
  for key, g in scalars.items():
    assert abs(float(g)) > 0, key
  for key, g in grads["loss"].items():
    assert abs(float(g)) > 0, key
  # Nearly every parameter is trained (a ReLU unit may be dead).
  live = [np.any(np.asarray(g) != 0) for g in flat.values()]
  assert np.mean(live) > 0.9
