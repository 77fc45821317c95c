"""Seconds per patient at inference, JAX against the PyTorch twin.

One patient (batch 1) at the config's grid (128^3 for the paper config),
random weights (speed only): the jitted `randose_jax.inference.forward.predict` (the
model forward, optionally 4-flip TTA) for each `--impls` value of
`config.model.conv_impl`, and the twin's `time_torch_inference`, in the same
process, alternating. On 2 shared CPU cores a full-size forward takes tens of
seconds, so the default is one timed repeat per side after one warm-up.

  python benchmarks/inference.py --config=configs/openkbp.py \
      --json=benchmarks/results/inference_paper_vm.json
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if str(_HERE.parent) not in sys.path:
  sys.path.insert(1, str(_HERE.parent))

import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/openkbp.py")
  p.add_argument(
      "--impls",
      default="auto",
      help="comma-separated config.model.conv_impl values to time",
  )
  p.add_argument(
      "--grid",
      type=int,
      default=None,
      help="default: 128 // config.data.downsample",
  )
  p.add_argument(
      "--repeats",
      type=int,
      default=1,
      help="timed calls per side after one warm-up; 0: time the "
      "first call after compiling (no warm-up), for slow machines",
  )
  p.add_argument("--tta", default="0,1", help="which of no-TTA (0) / TTA (1)")
  p.add_argument("--no_torch", dest="torch", action="store_false", default=True)
  p.add_argument("--json", type=pathlib.Path, default=None)
  args = p.parse_args(argv)

  import torch_train_step
  from randose_jax import models
  from randose_jax.inference import forward as inference
  from randose_jax.training import train

  config = torch_train_step.load_config(args.config)
  grid = args.grid or 128 // config.data.downsample
  load_start = list(os.getloadavg())
  arrays = torch_train_step.synthetic_batch(1, grid)
  inputs = {
      k: jax.numpy.asarray(np.moveaxis(arrays[k], 1, -1))
      for k in inference.INPUT_KEYS
  }

  rows = []
  for tta in (bool(int(t)) for t in args.tta.split(",")):
    for impl in args.impls.split(","):
      cfg = config.copy_and_resolve_references()
      cfg.model.conv_impl = impl
      model = models.create_model(cfg.model)
      params = jax.jit(
          lambda k: train.init_params(
              model, train.losses.create_loss(cfg.loss), cfg.model, k
          )["model"]
      )(jax.random.key(0, impl=train.PRNG_IMPL))
      fwd = jax.jit(
          lambda p, x: inference.predict(
              inference.make_apply_fn(model, p),
              x,
              tta=tta,
              swap_parotids=cfg.data.swap_parotids,
          )
      )
      t0 = time.perf_counter()
      compiled = fwd.lower(params, inputs).compile()
      compile_s = time.perf_counter() - t0
      times = []
      for _ in range(1 + args.repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, inputs))
        times.append(time.perf_counter() - t0)
      timed = times[1:] or times  # --repeats 0: the first call after compile
      rows.append(
          {
              "side": f"jax {impl}",
              "tta": tta,
              "s_per_patient": statistics.median(timed),
              "s_all": timed,
              "first_s": times[0],
              "compile_s": compile_s,
              "xla_memory_bytes": common.xla_memory(compiled),
              "load": os.getloadavg()[0],
          }
      )
      print(rows[-1], flush=True)
      del compiled, params
    if args.torch:
      seconds = torch_train_step.time_torch_inference(
          config.model,
          grid=grid,
          tta=tta,
          repeats=max(1, args.repeats),
          warmup=1 if args.repeats else 0,
          dtype=config.model.dtype,
      )
      rows.append(
          {
              "side": "torch (oneDNN)",
              "tta": tta,
              "s_per_patient": seconds,
              "load": os.getloadavg()[0],
          }
      )
      print(rows[-1], flush=True)

  result = {
      "config": args.config,
      "grid": grid,
      "batch": 1,
      "widths": list(config.model.widths),
      "dtype": config.model.dtype,
      "repeats": args.repeats,
      "rows": rows,
      "load_average_start": load_start,
      "torch_version": getattr(torch_train_step.torch, "__version__", None),
      **common.machine_info(),
  }
  path = common.write_result(result, args.json, "inference", args.config)
  print(
      f"\ninference, 1 patient, {grid}^3, widths "
      f"{tuple(config.model.widths)}; load {load_start[0]:.2f} -> "
      f"{result['load_average'][0]:.2f}"
  )
  print(
      f"{'side':<18}{'TTA':>5}{'s/patient':>11}{'compile s':>11}"
      f"{'XLA temp GiB':>14}"
  )
  for r in rows:
    temp = r.get("xla_memory_bytes", {}).get("temp")
    print(
        f"{r['side']:<18}{'yes' if r['tta'] else 'no':>5}"
        f"{r['s_per_patient']:>11.1f}{r.get('compile_s', float('nan')):>11.1f}"
        f"{'-' if temp is None else f'{temp / 2**30:.2f}':>14}"
    )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
