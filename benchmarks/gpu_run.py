"""One prepared GPU session: a short training run of the paper network on the
shared OpenKBP patients, plus train-step figures for JAX and the PyTorch twin.

Run on the GPU machine from the repository root, with a cache built here
beforehand (the CSVs do not travel; the cache is ~14 MiB):

  python benchmarks/gpu_run.py --cache_dir=.gpu_cache --out=$OUT --budget_s=150

Writes (and prints) `gpu_run.json`: the card, the bf16 matmul peak measured on
it, the training run's compile time, step time, peak GPU memory, loss curve
and validation dose/DVH scores; then, while time is left, the PyTorch twin's
train step on the same card. Every figure carries the device name.
"""

import json
import os
import pathlib
import shutil
import subprocess
import sys
import time

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

FLAGS = flags.FLAGS
flags.DEFINE_string("cache_dir", ".gpu_cache", "Prebuilt cache (train-pats/, validation-pats/).")
flags.DEFINE_string("out", None, "Output folder.")
flags.DEFINE_float("budget_s", 150.0, "Wall-clock budget for the whole script.")
flags.DEFINE_integer("steps", 40, "Training steps of the short run.")
flags.DEFINE_string("variant", "", "configs/openkbp.py variant(s).")
flags.DEFINE_string("dtype", "bfloat16", "config.model.dtype of the run.")
flags.DEFINE_bool("fused", True, "config.model.msfe_fused of the run.")
flags.DEFINE_integer("workers", 8, "grain workers.")
flags.DEFINE_list("torch_dtypes", ["bfloat16", "float32"], "Twin dtypes to time.")


def _write(out, results):
  tmp = out / "gpu_run.json.tmp"
  tmp.write_text(json.dumps(results, indent=2))
  tmp.replace(out / "gpu_run.json")


def _device_name():
  try:
    return subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total",
                           "--format=csv,noheader"], capture_output=True,
                          text=True, timeout=20).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return "unknown"


def _matmul_peak_tflops(dtype_name="bfloat16", n=8192, reps=10):
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  dtype = getattr(jnp, dtype_name)
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  b = jax.random.normal(jax.random.key(1), (n, n), dtype)
  f = jax.jit(lambda a, b: a @ b)
  f(a, b).block_until_ready()
  t = time.perf_counter()
  for _ in range(reps):
    c = f(a, b)
  c.block_until_ready()
  return 2 * n**3 * reps / (time.perf_counter() - t) / 1e12


def main(argv):
  del argv
  t_start = time.time()
  out = pathlib.Path(FLAGS.out or os.environ.get("OUT", "gpu_out"))
  out.mkdir(parents=True, exist_ok=True)
  import jax  # pylint: disable=g-import-not-at-top
  import common  # pylint: disable=g-import-not-at-top
  results = {"machine": common.machine_info(), "device": _device_name(),
             "jax_devices": [str(d) for d in jax.devices()],
             "backend": jax.default_backend()}
  print("device:", results["device"], results["jax_devices"], flush=True)
  if results["backend"] == "gpu":
    results["bf16_matmul_peak_tflops"] = _matmul_peak_tflops()
    print(f"bf16 matmul peak: {results['bf16_matmul_peak_tflops']:.0f} TFLOP/s",
          flush=True)
  _write(out, results)

  # ------------------------------------------------ the short training run
  import importlib.util  # pylint: disable=g-import-not-at-top
  from randose_jax import summary as summary_lib  # pylint: disable=g-import-not-at-top
  from randose_jax import train  # pylint: disable=g-import-not-at-top
  spec = importlib.util.spec_from_file_location("openkbp_cfg",
                                                REPO / "configs" / "openkbp.py")
  cfg_mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cfg_mod)
  config = cfg_mod.get_config(FLAGS.variant)
  config.data.root = ""
  config.data.cache_dir = str(pathlib.Path(FLAGS.cache_dir).resolve())
  config.data.num_workers = FLAGS.workers
  config.model.dtype = FLAGS.dtype
  config.model.msfe_fused = FLAGS.fused
  config.num_train_steps = FLAGS.steps
  config.log_every_steps = 5
  config.eval_every_steps = FLAGS.steps
  config.checkpoint_every_steps = FLAGS.steps
  config.progress_bar = False
  workdir = pathlib.Path("/tmp/randose_gpu_run")
  shutil.rmtree(workdir, ignore_errors=True)
  grid = 128 // config.data.downsample
  flops = summary_lib.summarize(config.model, (grid,) * 3)
  gflops_fwd = flops["analytic_conv_gflops_per_sample"]
  t0 = time.time()
  summary = train.train_and_evaluate(config, workdir)
  run_s = time.time() - t0
  lines = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  losses = [(l["step"], l["train/loss"]) for l in lines if "train/loss" in l]
  sps = [l["perf/steps_per_second"] for l in lines if "perf/steps_per_second" in l]
  first = [l["perf/first_step_seconds"] for l in lines if "perf/first_step_seconds" in l]
  mem = jax.local_devices()[0].memory_stats() or {}
  step_s = 1.0 / sps[-1] if sps else None
  train_tflop = 3 * gflops_fwd * config.batch_size / 1e3  # fwd + 2x bwd
  results["training_run"] = {
      "config": f"configs/openkbp.py{':' + FLAGS.variant if FLAGS.variant else ''}"
                f" dtype={FLAGS.dtype} msfe_fused={FLAGS.fused}",
      "grid": grid, "batch": config.batch_size, "steps": FLAGS.steps,
      "patients": {"train": 20, "validation": 6},
      "compile_and_first_step_s": first[0] if first else None,
      "seconds_per_step": step_s,
      "analytic_tflop_per_step": train_tflop,
      "achieved_tflops": train_tflop / step_s if step_s else None,
      "peak_gpu_memory_gib": mem.get("peak_bytes_in_use", 0) / 2**30,
      "loss_curve": losses,
      "validation": {k: summary[k] for k in (
          "dose_score", "dvh_score", "num_patients",
          "baseline_mean_dose_score", "baseline_mean_dvh_score")},
      "wall_s": run_s,
      "projected_hours_80k_steps": step_s * 80000 / 3600 if step_s else None,
  }
  if results.get("bf16_matmul_peak_tflops") and step_s:
    results["training_run"]["fraction_of_bf16_peak"] = (
        train_tflop / step_s / results["bf16_matmul_peak_tflops"])
  shutil.copy(workdir / "metrics.jsonl", out / "metrics.jsonl")
  _write(out, results)
  print(json.dumps(results["training_run"], indent=1), flush=True)

  # ------------------------------------------------ the PyTorch twin
  results["torch_twin"] = {}
  try:
    import torch  # pylint: disable=g-import-not-at-top
    import torch_train_step  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    results["torch_twin"]["skipped"] = f"torch not importable: {e}"
    _write(out, results)
    return
  device = "cuda" if torch.cuda.is_available() else "cpu"
  paper = cfg_mod.get_config(FLAGS.variant)
  for dtype in FLAGS.torch_dtypes:
    left = FLAGS.budget_s - (time.time() - t_start)
    if left < 35:
      results["torch_twin"][dtype] = f"skipped: {left:.0f} s of budget left"
      continue
    try:
      r = torch_train_step.time_torch_train_step(
          paper.model, batch=2, grid=grid, steps=3, warmup=1, device=device,
          dtype=dtype)
      r["tflops"] = train_tflop / (r["ms_per_step"] / 1e3)
      results["torch_twin"][dtype] = r
    except Exception as e:  # pylint: disable=broad-except
      results["torch_twin"][dtype] = f"failed: {type(e).__name__}: {e}"
    _write(out, results)
    print(dtype, results["torch_twin"][dtype], flush=True)

  tr = results["training_run"]
  print("\n| what | value |\n|---|---|")
  print(f"| device | {results['device']} |")
  print(f"| JAX {tr['config']} s/step | {tr['seconds_per_step']} |")
  print(f"| compile+first step s | {tr['compile_and_first_step_s']} |")
  print(f"| peak GiB | {tr['peak_gpu_memory_gib']:.1f} |")
  print(f"| val dose / DVH | {tr['validation']['dose_score']:.3f} / "
        f"{tr['validation']['dvh_score']:.3f} |")
  for dtype, r in results["torch_twin"].items():
    if isinstance(r, dict):
      print(f"| torch twin {dtype} s/step | {r['ms_per_step'] / 1e3:.3f} |")
  print(f"| script wall s | {time.time() - t_start:.0f} |")


if __name__ == "__main__":
  app.run(main)
