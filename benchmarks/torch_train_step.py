"""Time the PyTorch twin of RANDose: one training step, and inference.

The baseline the JAX implementation is compared against, so it gets its best
settings: all cores as intra-op threads, oneDNN (mkldnn) on, the faster of the
two memory formats (`--memory_format`), cuDNN autotuning and fused Adam on
CUDA. A training step is the same as `randose_jax.training.train`'s: forward,
region-aware loss, backward, Adam (lr 1e-4) over the model and loss weights.

  python benchmarks/torch_train_step.py --config=configs/openkbp.py:bench_cpu \
      --json=benchmarks/results/torch_bench_cpu.json
  python benchmarks/torch_train_step.py --config=configs/openkbp.py \
      --inference --grid=128 --tta           # seconds per patient

Needs torch, numpy, ml_collections and this repository (no jax).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import pathlib
import statistics
import sys
import time

import numpy as np

try:  # torch is a benchmark-only dependency: --no_torch runs need none
  import torch
except ImportError:
  torch = None

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if str(_HERE.parent) not in sys.path:
  sys.path.insert(
      1, str(_HERE.parent)
  )  # so a config file can import randose_jax

import common  # noqa: E402
try:
  import torch_randose  # noqa: E402
except ImportError:  # no torch
  torch_randose = None

PAROTIDS = (2, 3)  # RightParotid, LeftParotid in the OAR channels


def load_config(spec: str):
  """`path/to/config.py[:variants]` -> the file's get_config(variants)."""
  path, _, variants = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_bench_config", path)
  if module_spec is None:
    raise FileNotFoundError(f"{path}: not a config file")
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variants) if variants else module.get_config()


def synthetic_batch(batch: int, grid: int, seed: int = 0) -> dict:
  """Random but realistic encoded inputs, (N, C, D, H, W) float32 numpy.

  PTV: nested spheres at 0.8 / 0.9 / 1.0 (docs/design.md section 2); OARs: seven
  binary spheres; CT in [-1, 1.5]; target: the PTV levels plus noise,
  clipped to [0, 1.1].
  """
  rng = np.random.default_rng(seed)
  axis = np.arange(grid, dtype=np.float32)
  zz, yy, xx = np.meshgrid(axis, axis, axis, indexing="ij")

  def sphere(radius):
    c = rng.uniform(0.3, 0.7, size=3) * grid
    return (zz - c[0]) ** 2 + (yy - c[1]) ** 2 + (xx - c[2]) ** 2 <= radius**2

  ptv = np.zeros((batch, 1, grid, grid, grid), np.float32)
  oar = np.zeros((batch, 7, grid, grid, grid), np.float32)
  for n in range(batch):
    for level, radius in zip((0.8, 0.9, 1.0), (0.22, 0.15, 0.1)):
      ptv[n, 0][sphere(radius * grid)] = level
    for c in range(7):
      oar[n, c][sphere(rng.uniform(0.04, 0.1) * grid)] = 1.0
  ct = rng.uniform(-1.0, 1.5, size=ptv.shape).astype(np.float32)
  target = np.clip(ptv + 0.3 * rng.standard_normal(ptv.shape), 0, 1.1)
  return {"ptv": ptv, "ct": ct, "oar": oar, "target": target.astype(np.float32)}


def _setup(threads, device):
  if device == "cpu":
    torch.set_num_threads(threads or os.cpu_count())
    torch.backends.mkldnn.enabled = True
  else:
    torch.backends.cudnn.enabled = True
    torch.backends.cudnn.benchmark = True
  return torch.get_num_threads()


def _sync(device):
  if device == "cuda":
    torch.cuda.synchronize()


def _to_device(arrays, device, memory_format):
  return {
      k: torch.from_numpy(v).to(device).contiguous(memory_format=memory_format)
      for k, v in arrays.items()
  }


def _memory_format(name, device, dtype):
  """'auto': channels_last_3d (10x faster than channels-first for a CPU fp32
  step, and the layout cuDNN's tensor-core kernels prefer), except bf16 on CPU: there torch
  2.13's conv3d backward in channels_last_3d stalled (a full-size-layer conv
  ran over a minute where fp32 takes under one second), channels-first did not.
  """
  if name == "auto":
    name = (
        "channels_first"
        if device == "cpu" and dtype == "bfloat16"
        else "channels_last_3d"
    )
  return (
      name,
      {
          "channels_first": torch.contiguous_format,
          "channels_last_3d": torch.channels_last_3d,
      }[name],
  )


def _autocast(device, dtype):
  return torch.autocast(
      device_type=device, dtype=torch.bfloat16, enabled=(dtype == "bfloat16")
  )


def _environment(device, threads):
  """What a figure needs beside it to be comparable (load: other jobs)."""
  env = {
      "torch_version": torch.__version__,
      "threads": threads,
      "device": device,
      "mkldnn": (
          torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled
      ),
      **common.machine_info(),
  }
  if device == "cuda":
    env["gpu"] = torch.cuda.get_device_name()
    env["cudnn_benchmark"] = torch.backends.cudnn.benchmark
    env["tf32_conv"] = torch.backends.cudnn.allow_tf32
  return env


def time_torch_train_step(
    model_config,
    batch: int = 2,
    grid: int = 64,
    steps: int = 10,
    warmup: int = 2,
    threads=None,
    device: str = "cpu",
    dtype: str = "float32",
    memory_format: str = "auto",
    loss_config=None,
    compile: bool = False,
    seed: int = 0,
) -> dict:
  """Milliseconds per full training step of the twin (median over `steps`).

  Returns ms_per_step, ms_all (every timed step), params, first_step_s (the
  first step, allocator and autotuning included), torch_version, threads and
  the settings used.
  """
  threads = _setup(threads, device)
  torch.manual_seed(seed)
  memory_format, fmt = _memory_format(memory_format, device, dtype)
  model = torch_randose.build_from_config(model_config).to(
      device, memory_format=fmt
  )
  loss_fn = torch_randose.RegionAwareLoss(loss_config).to(device)
  params = list(model.parameters()) + list(loss_fn.parameters())
  try:
    opt = torch.optim.Adam(params, lr=1e-4, fused=True)
  except (RuntimeError, TypeError):  # a build without fused Adam here
    opt = torch.optim.Adam(params, lr=1e-4)
  forward = torch.compile(model) if compile else model
  data = _to_device(synthetic_batch(batch, grid, seed), device, fmt)
  inputs = {k: data[k] for k in ("ptv", "ct", "oar")}

  def step():
    opt.zero_grad(set_to_none=True)
    with _autocast(device, dtype):
      pred = forward(inputs)
    loss, _ = loss_fn(pred, data["target"], data["ptv"], data["oar"])
    loss.backward()
    opt.step()
    return loss

  times = []
  for i in range(warmup + steps):
    _sync(device)
    t0 = time.perf_counter()
    loss = step()
    _sync(device)
    times.append(time.perf_counter() - t0)
    if not torch.isfinite(loss):
      raise FloatingPointError(f"torch twin: loss is {loss.item()} at step {i}")
  ms_all = [1e3 * t for t in times[warmup:]]
  return {
      "ms_per_step": statistics.median(ms_all),
      "ms_all": ms_all,
      "params": sum(p.numel() for p in model.parameters()),
      "first_step_s": times[0],
      "batch": batch,
      "grid": grid,
      "dtype": dtype,
      "memory_format": memory_format,
      "compile": compile,
      "optimizer": (
          type(opt).__name__ + (" (fused)" if opt.defaults.get("fused") else "")
      ),
      **_environment(device, threads),
  }


def flip_tta_predict(model, inputs: dict, swap_parotids: bool = True):
  """Mean of the predictions over the 4 flips of (left/right, sup/inf).

  In (N, C, D, H, W) those are dims 3 and 4; a left/right flip also swaps the
  parotid channels of `oar`, and each prediction is flipped back.
  """
  total = 0
  for dims in ((), (3,), (4,), (3, 4)):
    x = {k: v.flip(dims) if dims else v for k, v in inputs.items()}
    if 3 in dims and swap_parotids:
      perm = list(range(x["oar"].shape[1]))
      perm[PAROTIDS[0]], perm[PAROTIDS[1]] = PAROTIDS[1], PAROTIDS[0]
      x["oar"] = x["oar"][:, perm]
    pred = model(x).float()
    total = total + (pred.flip(dims) if dims else pred)
  return total / 4


def time_torch_inference(
    model_config,
    grid: int = 128,
    tta: bool = False,
    device: str = "cpu",
    dtype: str = "float32",
    threads=None,
    memory_format: str = "auto",
    repeats: int = 1,
    warmup: int = 1,
    seed: int = 0,
) -> float:
  """Seconds per patient (batch 1, median over `repeats`), inference mode."""
  _setup(threads, device)
  torch.manual_seed(seed)
  memory_format, fmt = _memory_format(memory_format, device, dtype)
  model = torch_randose.build_from_config(model_config).to(
      device, memory_format=fmt
  )
  model.eval()
  data = _to_device(synthetic_batch(1, grid, seed), device, fmt)
  inputs = {k: data[k] for k in ("ptv", "ct", "oar")}
  times = []
  with torch.inference_mode(), _autocast(device, dtype):
    for _ in range(warmup + repeats):
      _sync(device)
      t0 = time.perf_counter()
      out = flip_tta_predict(model, inputs) if tta else model(inputs)
      out.sum().item()
      _sync(device)
      times.append(time.perf_counter() - t0)
  return statistics.median(times[warmup:])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
      "--config",
      default="configs/openkbp.py:bench_cpu",
      help="config file[:variants]; its model (and loss) config is timed",
  )
  p.add_argument(
      "--batch", type=int, default=None, help="default: config.batch_size"
  )
  p.add_argument(
      "--grid",
      type=int,
      default=None,
      help="grid edge; default: 128 // config.data.downsample",
  )
  p.add_argument("--steps", type=int, default=5)
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--threads", type=int, default=None, help="default: all cores")
  p.add_argument(
      "--device", default="cuda" if torch.cuda.is_available() else "cpu"
  )
  p.add_argument(
      "--dtype",
      default=None,
      choices=("float32", "bfloat16"),
      help="default: config.model.dtype",
  )
  p.add_argument(
      "--memory_format",
      default="auto",
      choices=("auto", "channels_first", "channels_last_3d"),
  )
  p.add_argument(
      "--compile", action="store_true", help="torch.compile the model"
  )
  p.add_argument(
      "--inference",
      action="store_true",
      help="time inference (batch 1) instead of a training step",
  )
  p.add_argument(
      "--tta", action="store_true", help="with --inference: 4-flip TTA"
  )
  p.add_argument(
      "--json",
      type=pathlib.Path,
      default=None,
      help="where to write the result; default: benchmarks/results/"
      "torch_<train_step|inference[_tta]>_<variant>_<hostname>.json",
  )
  args = p.parse_args(argv)

  config = load_config(args.config)
  load_start = list(os.getloadavg())
  grid = args.grid or 128 // config.data.downsample
  dtype = args.dtype or config.model.dtype
  if args.inference:
    seconds = time_torch_inference(
        config.model,
        grid=grid,
        tta=args.tta,
        device=args.device,
        dtype=dtype,
        threads=args.threads,
        memory_format=args.memory_format,
        repeats=args.steps,
        warmup=args.warmup,
    )
    result = {
        "s_per_patient": seconds,
        "grid": grid,
        "tta": args.tta,
        "dtype": dtype,
        "memory_format": _memory_format(args.memory_format, args.device, dtype)[
            0
        ],
        "repeats": args.steps,
        "warmup": args.warmup,
        **_environment(args.device, torch.get_num_threads()),
    }
  else:
    result = time_torch_train_step(
        config.model,
        batch=args.batch or config.batch_size,
        grid=grid,
        steps=args.steps,
        warmup=args.warmup,
        threads=args.threads,
        device=args.device,
        dtype=dtype,
        memory_format=args.memory_format,
        loss_config=config.loss,
        compile=args.compile,
    )
  result["config"] = args.config
  result["load_average_start"] = load_start  # machine_info's is at the end
  print(json.dumps(result, indent=1))
  kind = (
      ("inference_tta" if args.tta else "inference")
      if args.inference
      else "train_step"
  )
  path = common.write_result(result, args.json, f"torch_{kind}", args.config)
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
