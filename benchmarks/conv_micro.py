"""Forward seconds of one conv layer, direct against the FFT path per tile.

The per-layer timings behind `conv_planner.plan_conv`'s cost model and the table
in benchmarks/NOTES.md ("Tiled FFT and the per-layer plan"): batch 1, fp32,
random inputs, min over --repeats calls after one warm-up, each algorithm
jitted on its own. A case is N:CIN:COUT:KERNELS:MODES, kernels summed as in
an MSFE (direct: one fused kernel), modes from 'direct', 'whole' (one FFT
over the grid) and tile sizes.

  python benchmarks/conv_micro.py --case=128:48:16:3,5,7:32,64 \\
      --case=8:256:256:3,5,7:whole,direct
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys
import time

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if str(_HERE.parent) not in sys.path:
  sys.path.insert(1, str(_HERE.parent))

import common  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def parse_case(text: str):
  n, cin, cout, kernels, modes = text.split(":")
  return (
      int(n),
      int(cin),
      int(cout),
      [int(k) for k in kernels.split(",")],
      modes.split(","),
  )


def time_case(n, cin, cout, kernels, mode, repeats):
  from randose_jax.ops import conv_math  # pylint: disable=g-import-not-at-top

  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1, n, n, n, cin)), jnp.float32)
  kern = [
      jnp.asarray(rng.normal(size=(k, k, k, cin, cout)) * 0.01, jnp.float32)
      for k in kernels
  ]
  bias = jnp.zeros((cout,))
  if mode == "direct":
    k_max = max(kernels)
    fn = lambda x, w: conv_math.conv3d(
        x, sum(conv_math.pad_kernel(k, k_max) for k in w), bias, jnp.float32
    )
  else:
    tile = None if mode == "whole" else int(mode)
    fn = lambda x, w: conv_math.conv3d_fft(x, [w], bias, jnp.float32, tile)
  t0 = time.perf_counter()
  compiled = jax.jit(fn).lower(x, kern).compile()
  compile_s = time.perf_counter() - t0
  jax.block_until_ready(compiled(x, kern))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(x, kern))
    times.append(time.perf_counter() - t0)
  return {
      "n": n,
      "cin": cin,
      "cout": cout,
      "kernels": kernels,
      "mode": mode,
      "ms": 1e3 * min(times),
      "compile_s": compile_s,
      "load": os.getloadavg()[0],
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
      "--case",
      action="append",
      required=True,
      help="N:CIN:COUT:KERNELS:MODES, e.g. 64:16:32:3,5,7:16,32,whole",
  )
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--json", type=pathlib.Path, default=None)
  args = p.parse_args(argv)
  rows = []
  for case in args.case:
    n, cin, cout, kernels, modes = parse_case(case)
    for mode in modes:
      try:
        row = time_case(n, cin, cout, kernels, mode, args.repeats)
      except Exception as e:  # e.g. out of memory for a whole-grid spectrum
        row = {
            "n": n,
            "cin": cin,
            "cout": cout,
            "kernels": kernels,
            "mode": mode,
            "error": f"{type(e).__name__}: {e}"[:300],
        }
      rows.append(row)
      print(
          f"{n}^3 {cin}->{cout} k={kernels} {mode:>6}: "
          + (
              f"{row['ms']:9.1f} ms (compile {row['compile_s']:.1f} s)"
              if "ms" in row
              else row["error"]
          ),
          flush=True,
      )
  result = {
      "benchmark": "conv_micro",
      "batch": 1,
      "dtype": "float32",
      "repeats": args.repeats,
      "rows": rows,
      **common.machine_info(),
  }
  path = common.write_result(
      result,
      args.json or common.default_json_path("conv_micro"),
      "conv_micro",
      "",
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
