"""Tests of randose_jax/models/costs.py and the `randose-summary` command:
parameter counts and FLOPs, nothing run."""

import functools
import json
import os
import pathlib
import subprocess
import sys

import jax

jax.config.update("jax_disable_most_optimizations", True)

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

from randose_jax import default_config
from randose_jax import models
from randose_jax.models import costs as summary

ROOT = pathlib.Path(__file__).resolve().parents[1]


def model_config(row, widths, **overrides):
  config = default_config.get_default_config().model
  config.update(default_config.ABLATION_ROWS[row])
  config.widths = widths
  config.update(overrides)
  return config


def taps(n, k):
  """Valid taps of a 'SAME' k-conv along an axis of n voxels."""
  return sum(min(i + k // 2, n - 1) - max(i - k // 2, 0) + 1 for i in range(n))


def test_conv_flops_of_single_layers_match_the_hand_count():
  x = jax.ShapeDtypeStruct((2, 8, 6, 8, 3), jnp.float32)
  for k in (1, 3, 5, 7):
    conv = nn.Conv(4, (k, k, k), padding="SAME")
    p = jax.eval_shape(conv.init, jax.random.key(0), x)
    expected = 2 * 2 * 3 * 4 * taps(8, k) * taps(6, k) * taps(8, k)
    assert summary.conv_flops(conv.apply, p, x) == expected
  assert taps(8, 3) == 3 * 8 - 2  # one tap lost at each border

  up = models.Upsample(5)
  p = jax.eval_shape(up.init, jax.random.key(0), x)
  # Each output voxel reads exactly one input voxel (2x2x2, stride 2).
  assert summary.conv_flops(up.apply, p, x) == 2 * 2 * 3 * 5 * 16 * 12 * 16

  msfe = models.MSFE(4, (3, 5, 7))
  p = jax.eval_shape(msfe.init, jax.random.key(0), x)
  per_k = {
      k: 2 * 2 * 3 * 4 * taps(8, k) * taps(6, k) * taps(8, k) for k in (3, 5, 7)
  }
  assert summary.conv_flops(msfe.apply, p, x) == sum(per_k.values())
  fused = models.MSFE(
      4, (3, 5, 7), functools.partial(models.Conv, fuse_sums=True)
  )
  assert summary.conv_flops(fused.apply, p, x) == per_k[7]


def test_conv_flops_of_the_plain_unet_match_its_architecture():
  """Row 1 (plain U-Net) counted by hand from docs/design.md section 3."""
  g, (w0, w1) = 16, (4, 8)
  # conv_flops reads conv ops: the direct algorithm (summarize() builds it
  # so itself; the FFT path computes the same math without conv ops).
  model = models.create_model(model_config(1, (w0, w1), conv_impl="direct"))
  inputs = summary.abstract_inputs((g,) * 3)
  params = summary.abstract_params(model, inputs)
  t = lambda n: taps(n, 3) ** 3  # 3x3x3 'SAME' conv on an n^3 grid
  expected = 2 * (
      (1 + 1 + 7) * w0 * t(g)  # stems
      + (3 * w0 * w0 + w0 * w0) * t(g)  # encoder_1
      + (w0 * w1 + w1 * w1) * t(g // 2)  # encoder_2 (after max pooling)
      + w1 * w0 * g**3  # up_1: 2x2x2 stride 2, one tap per output voxel
      + (2 * w0 * w0 + w0 * w0) * t(g)  # decoder_1 (concatenated skip)
      + w0 * 1 * g**3
  )  # head
  got = summary.conv_flops(
      lambda p, x: model.apply({"params": p}, x), params, inputs
  )
  assert got == expected


@pytest.mark.parametrize("row", [1, 5])
def test_cost_analysis_agrees_with_the_analytic_count(row):
  config = model_config(row, (8, 16, 32))
  result = summary.summarize(config, grid=16)
  analytic = result["analytic_conv_gflops_per_sample"]
  xla = result["gflops_per_sample"]
  assert analytic > 0
  # XLA also counts element-wise ops, a few percent at most here.
  assert analytic <= xla < 1.03 * analytic, (xla, analytic)


def test_param_counts_per_module():
  config = model_config(5, (4, 8, 16))
  model = models.create_model(config)
  inputs = summary.abstract_inputs((16, 16, 16))
  params = summary.abstract_params(model, inputs)
  per_module = summary.params_per_module(params)
  assert sum(per_module.values()) == sum(
      int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(params)
  )
  names = list(per_module)
  assert names[:3] == ["stem_ptv", "stem_ct", "stem_oar"]
  assert names[-1] == "head"
  assert (
      names.index("pi_2")
      < names.index("encoder_2")
      < names.index("encoder_3")
      < names.index("up_2")
      < names.index("af_2")
      < names.index("decoder_2")
      < names.index("up_1")
  )
  assert per_module["head"] == 4 + 1
  assert per_module["stem_oar"] == 27 * 7 * 4 + 4
  kinds = summary.params_per_kind(per_module)
  assert kinds["stem"] == sum(
      per_module[f"stem_{k}"] for k in ("ptv", "ct", "oar")
  )
  assert kinds["pi"] == per_module["pi_2"] + per_module["pi_3"]
  assert sum(kinds.values()) == sum(per_module.values())
  # The ablation rows add parameters in the order of Table 2a.
  counts = [
      summary.params_per_module(
          summary.abstract_params(
              models.create_model(model_config(r, (4, 8, 16))), inputs
          )
      )
      for r in (1, 2, 3, 4, 5)
  ]
  totals = [sum(c.values()) for c in counts]
  assert totals[0] < totals[1] < totals[2] < totals[3]
  assert "af_1" in counts[4] and "af_1" not in counts[3]


def test_cli_prints_json_last():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  result = subprocess.run(
      [
          sys.executable,
          "-m",
          "randose_jax.cli.summary",
          "--config=configs/openkbp.py:smoke,row3",
          "--grid=16",
          "--json",
      ],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert result.returncode == 0, result.stderr
  last = json.loads(result.stdout.strip().splitlines()[-1])
  assert last["params"] > 0 and last["gflops_per_sample"] > 0
  assert last["grid"] == [16, 16, 16]
  assert "encoder_1" in last["params_per_module"]
  assert "pi_2" not in last["params_per_module"]  # row 3: no PI
  assert "total" in result.stdout


def test_conv_plan_lists_every_conv_layer_and_its_algorithm():
  # Row 5 with 3 stages: 3 stems, encoder_1..3, pi_2..3 (enc + ptv convs),
  # decoder_1..2: 3 + 3 + 2 * 2 + 2 = 12 planned convs.
  config = model_config(5, (4, 8, 8))
  config.conv_impl = "direct"
  records = summary.conv_plan(config, 16, batch=2)
  assert len(records) == 12
  assert {r["algorithm"] for r in records} == {"direct"}
  assert records[0]["input"] == (2, 16, 16, 16, 1)
  config.conv_impl = "fft"
  records = summary.conv_plan(config, 16)
  assert len(records) == 12 and {r["algorithm"] for r in records} == {"fft"}
  assert all(r["est_fft_s"] > 0 for r in records)
  text = summary.format_conv_plan(records)
  assert len(text.splitlines()) == 13 and "fft" in text
