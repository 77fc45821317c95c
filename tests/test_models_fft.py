"""The FFT convolution (`config.model.conv_impl='fft'`) equals the direct one.

Tiny shapes; float32 tolerances. The FFT path computes lax's 'SAME'
cross-correlation with zero padding, so it must agree with
`lax.conv_general_dilated` for every kernel size, odd and even grids, and in
its gradients w.r.t. the input and the kernel.
"""

import functools

import jax

jax.config.update("jax_disable_most_optimizations", True)

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from randose_jax import default_config
from randose_jax import models
from randose_jax.models import conv
from randose_jax.ops import conv_math
from randose_jax.ops import conv_planner


def _rand(rng, shape, scale=1.0):
  return jnp.asarray(rng.normal(size=shape) * scale, jnp.float32)


def _rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30)


def _check_equals_direct(conv_fn, rng, k, grid, cin, cout):
  """conv_fn(x, kernel, bias) equals the direct conv, forward and gradients
  (w.r.t. x, kernel, bias, through a random cotangent)."""
  x = _rand(rng, (2, *grid, cin))
  kernel = _rand(rng, (k, k, k, cin, cout), 0.3)
  bias = _rand(rng, (cout,))
  probe = _rand(rng, (2, *grid, cout))
  direct = lambda x, w, b: conv_math.conv3d(x, w, b, jnp.float32)

  # Both convs, outputs and gradients (of sum(f * probe): the VJP of the
  # probe), in one compiled program: run op by op, the many small shapes of
  # the FFT path each compiled alone took several times longer.
  @jax.jit
  def outputs_and_grads(x, w, b):
    out = []
    for f in (conv_fn, direct):
      y, vjp = jax.vjp(f, x, w, b)
      out.append((y, vjp(probe)))
    return out

  (y, grads), (y_d, grads_d) = outputs_and_grads(x, kernel, bias)
  assert y.shape == y_d.shape and y.dtype == jnp.float32
  assert _rel_err(y, y_d) < 1e-5
  for a, b in zip(grads, grads_d):
    assert _rel_err(a, b) < 1e-5


@pytest.mark.parametrize(
    "k,grid,cin,cout",
    [
        (1, (5, 6, 7), 3, 2),
        (3, (5, 6, 7), 1, 3),
        (3, (8, 4, 6), 3, 2),
        (5, (8, 8, 8), 2, 3),
        (5, (9, 4, 3), 3, 1),
        (7, (5, 6, 7), 3, 2),
        (7, (8, 4, 6), 1, 4),
        (2, (5, 6, 7), 2, 2),
        (4, (8, 4, 6), 2, 3),
    ],
)
def test_fft_conv_equals_direct_forward_and_gradients(k, grid, cin, cout):
  rng = np.random.default_rng(k * 100 + grid[0] * 10 + cin)
  _check_equals_direct(
      lambda x, w, b: conv_math.conv3d_fft(x, [[w]], b, jnp.float32),
      rng,
      k,
      grid,
      cin,
      cout,
  )


def test_fft_conv_groups_sum_within_and_concatenate_across():
  """[[a, b], [c]]: conv_a + conv_b (one spectrum) then conv_c, concatenated."""
  rng = np.random.default_rng(1)
  x = _rand(rng, (1, 6, 7, 8, 3))
  a, b, c = (_rand(rng, (k, k, k, 3, 4), 0.3) for k in (3, 5, 7))
  bias = _rand(rng, (8,))
  got = conv_math.conv3d_fft(x, [[a, b], [c]], bias, jnp.float32)
  zero = jnp.zeros((4,))
  want = jnp.concatenate(
      [
          conv_math.conv3d(x, a, bias[:4], jnp.float32)
          + conv_math.conv3d(x, b, zero, jnp.float32),
          conv_math.conv3d(x, c, bias[4:], jnp.float32),
      ],
      axis=-1,
  )
  assert _rel_err(got, want) < 1e-5


def test_fft_length_is_smooth_and_long_enough():
  for n in range(1, 70):
    for k in (1, 3, 4, 7):
      length = conv_math.fft_length(n, k)
      assert length >= n + k // 2
      m = length
      for p in (2, 3, 5):
        while m % p == 0:
          m //= p
      assert m == 1
  assert conv_math.fft_length(64, 7) == 72 and conv_math.fft_length(4, 7) == 8


@pytest.mark.parametrize(
    "k,grid,tile",
    [
        (3, (8, 8, 8), 4),
        (7, (8, 12, 4), 4),
        (5, (16, 8, 8), 8),
        (4, (8, 8, 3), 4),
        (2, (4, 8, 8), 4),
        (7, (8, 8, 8), 2),
    ],
)
def test_tiled_fft_conv_equals_direct_forward_and_gradients(k, grid, tile):
  """Overlap-save over tiles (some axes tiled, others whole; odd and even k;
  tiles smaller than the kernel) is the same 'SAME' conv."""
  _check_equals_direct(
      lambda x, w, b: conv_math.conv3d_fft(x, [[w]], b, jnp.float32, tile),
      np.random.default_rng(k * 10 + tile),
      k,
      grid,
      3,
      2,
  )


def test_tiled_fft_conv_groups():
  """Summed odd kernels (tap-domain sum) and concatenated groups, tiled."""
  rng = np.random.default_rng(5)
  x = _rand(rng, (1, 8, 8, 8, 3))
  a, b, c = (_rand(rng, (k, k, k, 3, 4), 0.3) for k in (3, 5, 7))
  bias = _rand(rng, (8,))
  zero = jnp.zeros((4,))
  want = jnp.concatenate(
      [
          conv_math.conv3d(x, a, bias[:4], jnp.float32)
          + conv_math.conv3d(x, c, zero, jnp.float32),
          conv_math.conv3d(x, b, bias[4:], jnp.float32),
      ],
      axis=-1,
  )
  got = conv_math.conv3d_fft(x, [[a, c], [b]], bias, jnp.float32, tile=4)
  assert _rel_err(got, want) < 1e-5
  with pytest.raises(ValueError, match="does not divide"):
    conv_math.conv3d_fft(x, [[a]], bias[:4], jnp.float32, tile=3)


def test_plan_conv():
  """The planner against facts that hold whatever its cost constants."""
  shape = (1, 32, 32, 32, 16)
  # 'direct' means direct, and a 1x1x1 conv is never transformed.
  assert conv_planner.plan_conv("direct", shape, [[3, 5, 7]], 16) == (
      "direct",
      None,
  )
  for impl in ("fft", "auto"):
    assert conv_planner.plan_conv(impl, shape, [[1]], 16) == ("direct", None)
  # 'fft' always takes the FFT path, with a tile that cuts the grid evenly.
  algo, tile = conv_planner.plan_conv("fft", shape, [[3, 5, 7]], 16)
  assert algo == "fft" and tile in (None, 16, 8, 4)
  # A small grid: tiles would transform more voxels ((4 + 6)^3 per 4^3 tile
  # against 12^3 for the whole 8^3 grid) to save little spectrum, so the
  # whole grid is taken.
  assert conv_planner.plan_conv("fft", (1, 8, 8, 8, 2), [[3, 5, 7]], 2) == (
      "fft",
      None,
  )
  assert conv_planner.fft_tiles((32, 32, 32)) == [None, 16, 8, 4]
  assert conv_planner.fft_tiles((16, 8, 12)) == [
      None,
      4,
  ]  # 8 does not divide 12
  # Paper widths at 128^3, first MSFE (48 -> 16 channels, 3/5/7): the
  # whole-grid spectrum is 135 * 135 * 68 frequencies x 48 x 16 x 8 bytes
  # = 7.6 GB, over the 2 GiB cap, so the plan is tiled whatever the costs.
  assert 135 * 135 * 68 * 48 * 16 * 8 > conv_planner.MAX_SPECTRUM_BYTES
  algo, tile = conv_planner.plan_conv(
      "fft", (1, 128, 128, 128, 48), [[3, 5, 7]], 16
  )
  assert algo == "fft" and tile in (64, 32, 16, 8, 4)
  if jax.default_backend() == "cpu":
    algo, tile = conv_planner.plan_conv(
        "auto", (1, 128, 128, 128, 48), [[3, 5, 7]], 16
    )
    assert algo == "fft" and tile is not None
    # The 8^3 x 256 channel stage stays direct (the documented plan).
    assert conv_planner.plan_conv(
        "auto", (1, 8, 8, 8, 256), [[3, 5, 7]], 256
    ) == (
        "direct",
        None,
    )
  with pytest.raises(ValueError, match="conv_impl"):
    conv_planner.plan_conv("winograd", shape, [[3]], 16)


def test_plan_conv_auto_is_direct_off_the_cpu(monkeypatch):
  shape = (1, 128, 128, 128, 48)
  # The backend passed in decides, whatever JAX's default backend is.
  assert conv_planner.plan_conv(
      "auto", shape, [[3, 5, 7]], 16, backend="gpu"
  ) == ("direct", None)
  assert conv_planner.plan_conv("auto", shape, [[3, 5, 7]], 16, backend="cpu")[
      0
  ] == ("fft")
  assert conv_planner.plan_transposed_conv("auto", "gpu") == ("direct", None)
  assert conv_planner.plan_transposed_conv("auto", "cpu") == ("matmul", None)
  # None: JAX's default backend.
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert conv_planner.plan_conv("auto", shape, [[3, 5, 7]], 16) == (
      "direct",
      None,
  )
  assert (
      conv_planner.plan_conv("fft", shape, [[3, 5, 7]], 16).algorithm == "fft"
  )
  assert conv_planner.plan_transposed_conv("auto") == ("direct", None)


def test_the_model_plans_for_the_backend_it_was_created_for(monkeypatch):
  """create_model reads the backend once; tracing does not read it again."""
  config = _model_config(conv_impl="auto")
  on_gpu = models.create_model(config, backend="gpu")
  assert on_gpu.backend == "gpu"
  assert models.create_model(config).backend == jax.default_backend()
  calls = []
  real = conv_planner.plan_conv

  def spy(*args, **kwargs):
    calls.append(kwargs.get("backend", args[5] if len(args) > 5 else None))
    return real(*args, **kwargs)

  monkeypatch.setattr(conv, "plan_conv", spy)
  monkeypatch.setattr(jax, "default_backend", lambda: "not-read")
  jax.eval_shape(on_gpu.init, jax.random.key(0), _inputs((8, 8, 8), batch=1))
  assert calls and set(calls) == {"gpu"}


def test_plan_conv_respects_the_spectrum_cap(monkeypatch):
  monkeypatch.setattr(conv_planner, "MAX_SPECTRUM_BYTES", 1)
  # Nothing fits: the smallest tile is taken.
  assert conv_planner.plan_conv("fft", (1, 16, 16, 16, 4), [[3]], 4) == (
      "fft",
      4,
  )


def test_plan_transposed_conv():
  assert conv_planner.plan_transposed_conv("direct") == ("direct", None)
  assert conv_planner.plan_transposed_conv("fft") == ("matmul", None)
  auto = conv_planner.plan_transposed_conv("auto").algorithm
  assert auto == ("matmul" if jax.default_backend() == "cpu" else "direct")
  with pytest.raises(ValueError, match="conv_impl"):
    conv_planner.plan_transposed_conv("winograd")


def _model_config(**overrides):
  config = default_config.get_default_config().model
  config.widths = (4, 8, 8)
  config.update(overrides)
  return config


def _inputs(grid, batch=2, seed=0):
  rng = np.random.default_rng(seed)
  shape = (batch, *grid)
  ptv = (rng.random(shape + (1,)) < 0.3) * 0.9
  return {
      "ptv": jnp.asarray(ptv, jnp.float32),
      "ct": _rand(rng, shape + (1,), 0.5),
      "oar": jnp.asarray(rng.random(shape + (7,)) < 0.1, jnp.float32),
  }


def _random_params(abstract, seed=0):
  """Seeded random values in the abstract tree (no slow `init` compile)."""
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(abstract)
  out = {}
  for path, leaf in flat.items():
    scale = 1.0 if path[-1] in ("alpha", "beta", "scale") else 0.2
    out[path] = _rand(rng, leaf.shape, scale)
  return traverse_util.unflatten_dict(out)


@pytest.mark.parametrize(
    "overrides", [dict(), dict(use_msfe=False), dict(msfe_fused=True)]
)
def test_model_fft_equals_direct_forward_and_gradients(overrides):
  inputs = _inputs((8, 8, 8))
  direct = models.create_model(_model_config(conv_impl="direct", **overrides))
  fft = models.create_model(_model_config(conv_impl="fft", **overrides))
  auto = models.create_model(_model_config(conv_impl="auto", **overrides))
  abstract = jax.eval_shape(direct.init, jax.random.key(0), inputs)["params"]
  for other in (fft, auto):
    # Identical parameter trees: checkpoints and the torch converter work.
    assert jax.tree.structure(abstract) == jax.tree.structure(
        jax.eval_shape(other.init, jax.random.key(0), inputs)["params"]
    )
    assert jax.tree.map(lambda a: a.shape, abstract) == jax.tree.map(
        lambda a: a.shape,
        jax.eval_shape(other.init, jax.random.key(0), inputs)["params"],
    )
  params = _random_params(abstract)

  def output_and_grads(model):
    """The model's output and the gradients of mean(output^2) w.r.t. the
    parameters and the inputs, one compiled program (op by op it took
    several times longer)."""

    def loss(p, x):
      y = model.apply({"params": p}, x)
      return jnp.mean(y**2), y

    grad = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)
    (_, y), g = jax.jit(grad)(params, inputs)
    return y, g

  outs = {}
  for name, model in (("direct", direct), ("fft", fft), ("auto", auto)):
    outs[name] = output_and_grads(model)
  y_d, g_d = outs["direct"]
  for name in ("fft", "auto"):
    y, g = outs[name]
    assert _rel_err(y, y_d) < 1e-4, name
    # Relative to the largest gradient entry of the whole tree: some
    # gradients are exactly zero in exact arithmetic (a conv bias before an
    # instance norm) and both sides hold only rounding noise there.
    flat, flat_d = (traverse_util.flatten_dict(t[0]) for t in (g, g_d))
    scale = max(float(jnp.max(jnp.abs(v))) for v in flat_d.values())
    for path, b in flat_d.items():
      err = float(jnp.max(jnp.abs(flat[path] - b))) / scale
      assert err < 1e-4, (name, path, err)
    for key in inputs:
      assert _rel_err(g[1][key], g_d[1][key]) < 1e-4, (name, key)


def test_model_with_tiled_fft_equals_direct(monkeypatch):
  """Every FFT conv of the model forced onto the smallest tiles."""
  monkeypatch.setattr(conv_planner, "fft_tiles", lambda grid: [2])
  inputs = _inputs((8, 8, 8), batch=1)
  direct = models.create_model(_model_config(conv_impl="direct"))
  tiled = models.create_model(_model_config(conv_impl="fft"))
  params = _random_params(
      jax.eval_shape(direct.init, jax.random.key(0), inputs)["params"]
  )
  y_d = jax.jit(direct.apply)({"params": params}, inputs)
  y_t = jax.jit(tiled.apply)({"params": params}, inputs)
  assert _rel_err(y_t, y_d) < 1e-4


def test_model_init_is_the_same_for_every_impl():
  """Same initial values (same names, same initialisers), so a seed gives
  the same network whichever algorithm computes it."""
  inputs = _inputs((4, 4, 4), batch=1)
  trees = [
      jax.jit(models.create_model(_model_config(conv_impl=impl)).init)(
          jax.random.key(3), inputs
      )["params"]
      for impl in ("direct", "fft")
  ]
  for a, b in zip(jax.tree.leaves(trees[0]), jax.tree.leaves(trees[1])):
    np.testing.assert_array_equal(a, b)


def test_upsample_matmul_equals_conv_transpose():
  rng = np.random.default_rng(2)
  x = _rand(rng, (2, 3, 4, 5, 6))
  direct = models.Upsample(4, conv=functools.partial(conv.Conv, impl="direct"))
  fft = models.Upsample(4, conv=functools.partial(conv.Conv, impl="fft"))
  p = direct.init(jax.random.key(0), x)
  p = jax.tree.map(lambda a: _rand(rng, a.shape), p)
  q = fft.init(jax.random.key(0), x)
  assert jax.tree.map(jnp.shape, p) == jax.tree.map(jnp.shape, q)
  # The direct form is flax's transposed conv, to the bit.
  reference = nn.ConvTranspose(4, (2, 2, 2), strides=(2, 2, 2), padding="VALID")
  np.testing.assert_array_equal(
      direct.apply(p, x), reference.apply({"params": p["params"]["conv"]}, x)
  )
  assert _rel_err(fft.apply(p, x), direct.apply(p, x)) < 1e-6
  g = [
      jax.grad(lambda p, x: jnp.sum(m.apply(p, x) ** 3), argnums=(0, 1))(p, x)
      for m in (fft, direct)
  ]
  for a, b in zip(jax.tree.leaves(g[0]), jax.tree.leaves(g[1])):
    assert _rel_err(a, b) < 1e-5
