"""Time the full RANDose train step in JAX against the PyTorch twin.

The JAX step is the real one, `Trainer.jit_train_step` (forward, region-aware
loss, backward, Adam, metrics; state donated), on a synthetic batch shaped
like the config's (batch_size, 128 // data.downsample per axis). It is timed
for each `--impls` value of `config.model.conv_impl` and, in the same process
and interleaved with them (rounds of `--steps` steps each), the PyTorch twin's
step (`torch_train_step.time_torch_train_step`, oneDNN, channels-last 3D,
fused Adam). Per side: median ms per step over every timed step (warm-up
excluded), compile seconds (JAX) / first step seconds (torch), params.

  python benchmarks/train_step.py --config=configs/openkbp.py:bench_cpu \
      --json=benchmarks/results/train_step_vm.json

With --compile_only nothing runs: each impl's step is compiled and XLA's
memory analysis (arguments, outputs, temporaries) is reported, which says
whether a config fits a machine before a minute is spent on a step
(default JSON: train_step_memory_<variant>_<host>.json). Every run records
it next to the timings.

The machine is shared: the load average is recorded at the start and the end,
and only figures from the same run should be compared.
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


def jax_batch(batch: int, grid: int, seed: int = 0) -> dict:
  """The twin's synthetic batch, channels-last, with the `mask` key."""
  import torch_train_step

  arrays = torch_train_step.synthetic_batch(batch, grid, seed)
  out = {
      k: np.ascontiguousarray(np.moveaxis(v, 1, -1)) for k, v in arrays.items()
  }
  out["mask"] = np.ones_like(out["target"])
  return out


def remat_fft_convs() -> None:
  """Experiment switch (--remat_fft): wrap every FFT conv in
  `jax.checkpoint` saving nothing, so its tile spectra are recomputed in
  the backward pass instead of kept."""
  from randose_jax.ops import conv_math  # pylint: disable=g-import-not-at-top

  plain = conv_math.conv3d_fft

  def rematted(x, kernels, bias, dtype, tile=None):
    fn = jax.checkpoint(
        lambda x, kernels, bias: plain(x, kernels, bias, dtype, tile),
        policy=jax.checkpoint_policies.nothing_saveable,
    )
    return fn(x, kernels, bias)

  conv_math.conv3d_fft = rematted


class JaxStep:
  """One `conv_impl`: a Trainer, its state, the compiled step."""

  def __init__(self, config, impl: str, batch: dict, run_first: bool = True):
    from randose_jax.training import train

    config = config.copy_and_resolve_references()
    config.model.conv_impl = impl
    self.impl = impl
    self.trainer = train.Trainer.create(config)
    self.state = self.trainer.init_state(config.seed)
    self.batch = self.trainer.shard_batch(batch)
    t0 = time.perf_counter()
    self.step_fn = self.trainer.jit_train_step.lower(
        self.state, self.batch
    ).compile()
    self.compile_s = time.perf_counter() - t0
    self.memory = common.xla_memory(self.step_fn)
    self.params = int(
        sum(
            np.prod(x.shape)
            for x in jax.tree.leaves(self.state.params["model"])
        )
    )
    self.first_step_s = self.run() if run_first else None
    self.times = []

  def run(self) -> float:
    t0 = time.perf_counter()
    self.state, metrics = self.step_fn(self.state, self.batch)
    loss = float(jax.block_until_ready(metrics["loss"]))
    if not np.isfinite(loss):
      raise FloatingPointError(f"{self.impl}: loss {loss}")
    return time.perf_counter() - t0

  def result(self) -> dict:
    ms = [1e3 * t for t in self.times]
    return {
        "ms_per_step": statistics.median(ms) if ms else None,
        "ms_all": ms,
        "compile_s": self.compile_s,
        "first_step_s": self.first_step_s,
        "params": self.params,
        "conv_impl": self.impl,
        "backend": jax.default_backend(),
        "xla_memory_bytes": self.memory,
    }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/openkbp.py:bench_cpu")
  p.add_argument(
      "--impls",
      default="auto",
      help="comma-separated config.model.conv_impl values to time "
      "('direct' takes minutes per step at bench_cpu on 2 cores)",
  )
  p.add_argument(
      "--rounds",
      type=int,
      default=2,
      help="interleaved rounds (each impl, then torch)",
  )
  p.add_argument("--steps", type=int, default=2, help="timed steps per round")
  p.add_argument("--torch", dest="torch", action="store_true", default=True)
  p.add_argument("--no_torch", dest="torch", action="store_false")
  p.add_argument(
      "--remat", action="store_true", help="config.model.remat=True (JAX side)"
  )
  p.add_argument(
      "--remat_fft",
      action="store_true",
      help="experiment: jax.checkpoint around every FFT conv "
      "(recompute its spectra in the backward pass)",
  )
  p.add_argument(
      "--compile_only",
      action="store_true",
      help="compile and report XLA's memory analysis only (no "
      "steps, no torch): will this config fit?",
  )
  p.add_argument(
      "--json",
      type=pathlib.Path,
      default=None,
      help="default: benchmarks/results/train_step_<variant>_<host>.json",
  )
  args = p.parse_args(argv)

  import torch_train_step

  config = torch_train_step.load_config(args.config)
  config.model.remat = args.remat
  if args.remat_fft:
    remat_fft_convs()
  if args.compile_only:
    args.torch, args.rounds = False, 0
  grid = 128 // config.data.downsample
  batch_size = config.batch_size
  load_start = list(os.getloadavg())
  batch = jax_batch(batch_size, grid)

  steps = {}
  for impl in args.impls.split(","):
    print(f"[jax {impl}] compiling ...", flush=True)
    steps[impl] = JaxStep(config, impl, batch, run_first=not args.compile_only)
    mem = steps[impl].memory
    print(
        f"[jax {impl}] compiled in {steps[impl].compile_s:.1f} s"
        + (
            f", first step {steps[impl].first_step_s:.1f} s"
            if steps[impl].first_step_s is not None
            else ""
        )
        + (
            f"; XLA temp {mem['temp'] / 2**30:.2f} GiB, arguments "
            f"{mem['argument'] / 2**30:.2f} GiB"
            if mem
            else ""
        ),
        flush=True,
    )

  torch_runs = []
  for r in range(args.rounds):
    for impl, step in steps.items():
      for _ in range(args.steps):
        step.times.append(step.run())
      print(
          f"[round {r}] jax {impl}: "
          f"{[round(1e3 * t) for t in step.times[-args.steps:]]} ms, "
          f"load {os.getloadavg()[0]:.2f}",
          flush=True,
      )
    if args.torch:
      t = torch_train_step.time_torch_train_step(
          config.model,
          batch=batch_size,
          grid=grid,
          steps=args.steps,
          warmup=1,
          loss_config=config.loss,
          dtype=config.model.dtype,
      )
      torch_runs.append(t)
      print(
          f"[round {r}] torch: {[round(x) for x in t['ms_all']]} ms, "
          f"load {os.getloadavg()[0]:.2f}",
          flush=True,
      )

  jax_results = {impl: s.result() for impl, s in steps.items()}
  best = min(
      jax_results,
      key=lambda i: jax_results[i]["ms_per_step"]
      or jax_results[i]["compile_s"],
  )
  result = {
      "config": args.config,
      "batch": batch_size,
      "grid": grid,
      "dtype": config.model.dtype,
      "widths": list(config.model.widths),
      "remat": bool(config.model.remat),
      "remat_fft": args.remat_fft,
      "compile_only": args.compile_only,
      # The headline: the fastest impl timed (see "jax_impls" for each;
      # "jax" is the library version, from machine_info).
      "ms_per_step": jax_results[best]["ms_per_step"],
      "params": jax_results[best]["params"],
      "compile_s": jax_results[best]["compile_s"],
      "conv_impl": best,
      "jax_impls": jax_results,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
      "load_average_start": load_start,
  }
  if torch_runs:
    ms_all = [x for t in torch_runs for x in t["ms_all"]]
    torch_result = dict(torch_runs[-1])
    torch_result.update(
        ms_per_step=statistics.median(ms_all),
        ms_all=ms_all,
        first_step_s=[t["first_step_s"] for t in torch_runs],
    )
    for key in (
        "hostname",
        "cpu_model",
        "cpu_count",
        "usable_cores",
        "platform",
        "python",
        "jax",
        "numpy",
        "grain",
        "date",
        "load_average",
    ):
      torch_result.pop(key, None)
    result["torch"] = torch_result
    result["torch_ms_per_step"] = torch_result["ms_per_step"]
    result["jax_over_torch"] = (
        result["ms_per_step"] / torch_result["ms_per_step"]
    )
  result.update(common.machine_info())
  path = common.write_result(
      result,
      args.json,
      "train_step_memory" if args.compile_only else "train_step",
      args.config,
  )

  print(
      f"\ntrain step, batch {batch_size}, {grid}^3, widths "
      f"{tuple(config.model.widths)}, {config.model.dtype}; load "
      f"{load_start[0]:.2f} -> {result['load_average'][0]:.2f}"
  )
  print(
      f"{'side':<18}{'ms/step':>10}{'compile s':>11}{'params':>11}"
      f"{'XLA temp GiB':>14}"
  )
  for impl, r in jax_results.items():
    ms = f"{r['ms_per_step']:.0f}" if r["ms_per_step"] else "-"
    temp = r["xla_memory_bytes"].get("temp")
    temp = f"{temp / 2**30:.2f}" if temp is not None else "-"
    print(
        f"{'jax ' + impl:<18}{ms:>10}{r['compile_s']:>11.1f}"
        f"{r['params']:>11d}{temp:>14}"
    )
  if torch_runs:
    print(
        f"{'torch (oneDNN)':<18}{result['torch_ms_per_step']:>10.0f}"
        f"{'':>11}{result['torch']['params']:>11d}"
    )
    print(f"jax ({best}) / torch = {result['jax_over_torch']:.2f}")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
