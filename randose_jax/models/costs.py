"""What the network costs, without running it: parameters per module and
kind, forward FLOPs (XLA's cost analysis, cross-checked against an analytic
count of the convolutions in the forward's jaxpr) and each conv layer's plan
(`randose_jax.ops.conv_planner`). The command is `randose-summary`
(`randose_jax/cli/summary.py`).
"""

import collections
import re
import time
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
from jax.extend import core as jex_core
import numpy as np

from randose_jax import models
from randose_jax.models import conv as conv_lib
from randose_jax.ops import conv_planner


def abstract_inputs(grid: Sequence[int], batch: int = 1) -> dict[str, Any]:
  """ShapeDtypeStructs of the model inputs at `grid` (D, H, W)."""
  return models.input_specs(grid, batch)


def abstract_params(model, inputs) -> Any:
  """The params tree of `model` as ShapeDtypeStructs (nothing computed)."""
  variables = jax.eval_shape(model.init, jax.random.key(0), inputs)
  return variables["params"]


_STEMS = ("stem_ptv", "stem_ct", "stem_oar")
_ENCODER_ORDER = ("down", "pi", "encoder")
_DECODER_ORDER = ("up", "af", "decoder")


def _network_order(name: str):
  """Sort key: stems, encoder stages 1..S, decoder stages S-1..1, head."""
  if name in _STEMS:
    return (0, 0, _STEMS.index(name))
  match = re.fullmatch(r"([a-z]+)_(\d+)", name)
  if match and match.group(1) in _ENCODER_ORDER:
    return (1, int(match.group(2)), _ENCODER_ORDER.index(match.group(1)))
  if match and match.group(1) in _DECODER_ORDER:
    return (2, -int(match.group(2)), _DECODER_ORDER.index(match.group(1)))
  return (3 if name == "head" else 4, 0, name)


def params_per_module(params) -> dict[str, int]:
  """Parameter count of each top-level module, in network order."""
  return {
      name: int(
          sum(
              np.prod(leaf.shape)
              for leaf in jax.tree_util.tree_leaves(params[name])
          )
      )
      for name in sorted(params, key=_network_order)
  }


def params_per_kind(per_module: dict[str, int]) -> dict[str, int]:
  """Sums `per_module` by kind: the name without its stage suffix."""
  kinds = collections.OrderedDict()
  for name, count in per_module.items():
    kind = re.sub(r"_\d+$", "", name)
    kind = "stem" if kind.startswith("stem_") else kind
    kinds[kind] = kinds.get(kind, 0) + count
  return dict(kinds)


def _valid_taps(in_size, out_size, kernel, stride, pad_lo, lhs_dil, rhs_dil):
  """Number of (output position, kernel tap) pairs that read a real input."""
  out = np.arange(out_size)[:, None]
  tap = np.arange(kernel)[None, :]
  pos = out * stride + tap * rhs_dil - pad_lo  # in the dilated input
  ok = (pos >= 0) & (pos <= (in_size - 1) * lhs_dil) & (pos % lhs_dil == 0)
  return int(ok.sum())


def _conv_eqn_flops(eqn) -> int:
  lhs = eqn.invars[0].aval.shape
  rhs = eqn.invars[1].aval.shape
  out = eqn.outvars[0].aval.shape
  p = eqn.params
  dn = p["dimension_numbers"]
  lhs_spec, rhs_spec, out_spec = dn.lhs_spec, dn.rhs_spec, dn.out_spec
  batch = lhs[lhs_spec[0]] // p["batch_group_count"]
  c_out = rhs[rhs_spec[0]]
  c_in_per_group = rhs[rhs_spec[1]]
  taps = 1
  for i in range(len(lhs_spec) - 2):
    taps *= _valid_taps(
        lhs[lhs_spec[2 + i]],
        out[out_spec[2 + i]],
        rhs[rhs_spec[2 + i]],
        p["window_strides"][i],
        p["padding"][i][0],
        p["lhs_dilation"][i],
        p["rhs_dilation"][i],
    )
  return 2 * batch * c_out * c_in_per_group * taps


def _sub_jaxprs(value):
  if isinstance(value, jex_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jex_core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from _sub_jaxprs(v)


def _jaxpr_conv_flops(jaxpr) -> int:
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "conv_general_dilated":
      total += _conv_eqn_flops(eqn)
    for value in eqn.params.values():
      for sub in _sub_jaxprs(value):
        total += _jaxpr_conv_flops(sub)
  return total


def conv_flops(fn: Callable, *args) -> int:
  """Analytic FLOPs of every convolution `fn(*args)` runs (args may be
  ShapeDtypeStructs): per conv 2 * N * Cout * Cin * (valid kernel taps summed
  over output voxels), i.e. 2 * k^3 * Cin * Cout * voxels away from borders."""
  return _jaxpr_conv_flops(jax.make_jaxpr(fn)(*args).jaxpr)


def cost_analysis_flops(
    fn: Callable, *args, compile: bool = False
) -> tuple[float, float]:
  """XLA's FLOP estimate of `jax.jit(fn)(*args)` and the seconds it took.

  Always analysed for the CPU backend (args are re-placed there), so the
  figure is the same on any machine: plugin backends (CUDA) give no
  pre-compilation cost analysis, and their compiled graphs hide convolutions
  in library calls.
  """
  try:
    cpu = jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    args = jax.tree_util.tree_map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=cpu), args
    )
  except RuntimeError:  # no CPU backend (JAX_PLATFORMS excludes it)
    pass
  start = time.perf_counter()
  lowered = jax.jit(fn).lower(*args)
  cost = None if compile else lowered.cost_analysis()
  if not cost:
    cost = lowered.compile().cost_analysis()
  if isinstance(cost, (list, tuple)):  # older jax: one dict per device
    cost = cost[0]
  return float(cost["flops"]), time.perf_counter() - start


def summarize(
    model_config, grid: Sequence[int] | int = 128, compile: bool = False
) -> dict[str, Any]:
  """Parameter counts and per-sample forward FLOPs of `create_model(
  model_config)` at `grid` (an int for a cube, or (D, H, W))."""
  grid = (grid,) * 3 if isinstance(grid, int) else tuple(grid)
  # The network's math, whatever algorithm computes its convs: built with
  # direct convs so the FLOPs below count conv ops (the FFT path has none;
  # parameters are the same for every conv_impl).
  model_config = model_config.copy_and_resolve_references()
  with model_config.unlocked():
    model_config.conv_impl = "direct"
  model = models.create_model(model_config)
  inputs = abstract_inputs(grid, batch=1)
  params = abstract_params(model, inputs)
  per_module = params_per_module(params)

  def forward(p, x):
    return model.apply({"params": p}, x)

  flops, seconds = cost_analysis_flops(forward, params, inputs, compile=compile)
  analytic = conv_flops(forward, params, inputs)
  return {
      "grid": list(grid),
      "params": int(sum(per_module.values())),
      "gflops_per_sample": flops / 1e9,
      "analytic_conv_gflops_per_sample": analytic / 1e9,
      "cost_analysis_seconds": seconds,
      "params_per_module": per_module,
      "params_per_kind": params_per_kind(per_module),
  }


def conv_plan(
    model_config, grid: Sequence[int] | int = 128, batch: int = 1
) -> list[dict[str, Any]]:
  """How each k^3 conv (k > 1) of `create_model(model_config)` is computed on
  this backend (`conv_planner.plan_conv` under `model_config.conv_impl`), in network
  order: one dict per conv layer (`conv_planner.plan_record`: input shape, kernels,
  cout, algorithm, tile, estimated seconds), from a trace (nothing runs).
  Every plan is made by `conv.Conv.plan`, which this intercepts; 1x1x1 convs
  are always direct and not listed."""
  grid = (grid,) * 3 if isinstance(grid, int) else tuple(grid)
  model = models.create_model(model_config)
  inputs = abstract_inputs(grid, batch=batch)
  records = []

  def record(next_fun, args, kwargs, context):
    plan = next_fun(*args, **kwargs)
    if (
        isinstance(context.module, conv_lib.Conv)
        and context.method_name == "plan"
    ):
      layer = context.module
      x_shape, kernel_groups = args
      if max(max(g) for g in kernel_groups) > 1:
        records.append(
            conv_planner.plan_record(
                layer.impl,
                x_shape,
                kernel_groups,
                layer.features,
                layer.fuse_sums,
                plan,
            )
        )
    return plan

  with nn.intercept_methods(record):
    jax.eval_shape(
        lambda x: model.init(jax.random.key(0, impl="rbg"), x), inputs
    )
  return records


def format_conv_plan(records: list[dict[str, Any]]) -> str:
  lines = [
      f"{'input (N,D,H,W,C)':<26}{'kernels':<16}{'cout':>6}  "
      f"{'algorithm':<10}{'tile':>6}{'est. direct s':>15}{'est. FFT s':>12}"
  ]
  for r in records:
    if max(max(g) for g in r["kernels"]) < 2:
      continue
    kernels = "+".join("/".join(map(str, g)) for g in r["kernels"])
    lines.append(
        f"{str(r['input']):<26}{kernels:<16}{r['cout']:>6}  "
        f"{r['algorithm']:<10}{str(r['tile'] or '-'):>6}"
        f"{r.get('est_direct_s', float('nan')):>15.3f}"
        f"{r.get('est_fft_s', float('nan')):>12.3f}"
    )
  return "\n".join(lines)


def format_summary(summary: dict[str, Any]) -> str:
  lines = [f"{'module':<12} {'params':>12}"]
  for name, count in summary["params_per_module"].items():
    lines.append(f"{name:<12} {count:>12,}")
  lines.append(
      "by kind: "
      + ", ".join(f"{k} {v:,}" for k, v in summary["params_per_kind"].items())
  )
  grid = "x".join(str(n) for n in summary["grid"])
  lines += [
      f"{'total':<12} {summary['params']:>12,} params",
      f"forward at {grid}, per sample: {summary['gflops_per_sample']:,.1f} "
      f"GFLOPs (XLA cost analysis, {summary['cost_analysis_seconds']:.1f} s); "
      f"convolutions alone (analytic): "
      f"{summary['analytic_conv_gflops_per_sample']:,.1f} GFLOPs",
  ]
  return "\n".join(lines)
