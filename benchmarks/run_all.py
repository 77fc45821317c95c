"""Run every benchmark that fits this machine; collect their results in one file.

Each benchmark script runs as its own subprocess (its own process group,
killed whole on timeout), writing its JSON to a temporary path that this
script reads back; the scripts' own result files under benchmarks/results/
are left alone. The collected file is

  benchmarks/results/<hostname>.json          (--quick: <hostname>_quick.json)

holding the date, the machine (`common.machine_info()`, the JAX backend, the
torch version), the command, and per benchmark: status (ok, failed,
timeout, skipped), the reason for a skip, the command line, seconds, the
script's JSON and the tail of its output. A summary table is printed.

What runs where:
  input_pipeline    shared OpenKBP patients (host side; same on every machine)
  evaluator         shared OpenKBP patients
  train_step        benchmarks/train_step.py, if present (JAX train step)
  inference         benchmarks/inference.py, if present (JAX inference)
  torch_train_step  torch installed: the PyTorch twin's train step
                    (CPU: configs/openkbp.py:bench_cpu; GPU: the paper config)
  torch_inference   torch installed: the twin's 4-flip TTA inference
  gpu_run           GPU backend and a prebuilt cache (--gpu_cache): the
                    prepared GPU session, benchmarks/gpu_run.py
A benchmark that does not fit (no shared data, no torch, no GPU, script not
written yet) is skipped with the reason. Flags are passed to a script only
where its source defines them (the JAX scripts are being written alongside).

  python benchmarks/run_all.py                      # everything that fits
  python benchmarks/run_all.py --only=evaluator,input_pipeline --quick
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import importlib.util
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from typing import Callable

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

import common  # noqa: E402

ROOT = common.ROOT


@dataclasses.dataclass
class Context:
  backend: str  # jax.default_backend(): 'cpu', 'gpu', 'tpu' or 'unavailable'
  torch: str | None  # torch version, None if not installed
  torch_cuda: bool
  data: pathlib.Path  # the shared OpenKBP folder
  gpu_cache: pathlib.Path
  quick: bool

  @property
  def has_data(self) -> bool:
    return (self.data / "train-pats").is_dir()

  @property
  def gpu(self) -> bool:
    return self.backend == "gpu"


@dataclasses.dataclass
class Benchmark:
  name: str
  script: str  # relative to benchmarks/
  # (ctx) -> None if it fits, else the reason to skip.
  fits: Callable[[Context], str | None]
  # (ctx) -> arguments (before filtering by what the script defines).
  args: Callable[[Context], list[str]]
  timeout_s: float = 1800.0
  quick_timeout_s: float = 600.0
  output: str = "json"  # 'json': --json=FILE; 'out': --out=DIR (every *.json)
  headline: Callable[[dict], str] = lambda result: _generic_headline(result)


def _needs_data(ctx: Context) -> str | None:
  return (
      None
      if ctx.has_data
      else (
          f"no shared OpenKBP patients at {ctx.data} (set RANDOSE_OPENKBP_DIR)"
      )
  )


def _needs_torch(ctx: Context) -> str | None:
  return (
      None
      if ctx.torch
      else "torch is not installed (benchmarks/requirements.txt)"
  )


def _needs_gpu_and_cache(ctx: Context) -> str | None:
  if not ctx.gpu:
    return f"needs a GPU (jax backend is {ctx.backend})"
  if not (ctx.gpu_cache / "train-pats").is_dir():
    return f"no prebuilt cache at {ctx.gpu_cache} (see benchmarks/gpu_run.py)"
  return None


def _generic_headline(result: dict) -> str:
  """Up to three top-level numbers of a result."""
  numbers = [
      (k, v)
      for k, v in result.items()
      if isinstance(v, (int, float)) and not isinstance(v, bool)
  ]
  return ", ".join(f"{k}={v:.4g}" for k, v in numbers[:3])


def _pipeline_headline(result: dict) -> str:
  rows = result.get("augmented", [])
  return ", ".join(
      f"{r['samples_per_s']:.1f} samples/s at {r['num_workers']} workers"
      for r in rows
  )


def _evaluator_headline(result: dict) -> str:
  timings = result.get("timings", {})
  one_off = timings.get("vectorised, from sparse", {})
  prepared = timings.get("vectorised, prepared", {})
  if not one_off:
    return _generic_headline(result)
  return (
      f"{result['num_patients']} patients: one-off "
      f"{one_off['seconds']:.2f} s ({one_off['speedup_vs_plain']:.1f}x), prepared "
      f"{prepared.get('seconds', float('nan')):.2f} s "
      f"({prepared.get('speedup_vs_plain') or float('nan'):.1f}x)"
  )


def _torch_config(ctx: Context) -> str:
  return (
      "configs/openkbp.py" if ctx.torch_cuda else "configs/openkbp.py:bench_cpu"
  )


BENCHMARKS = [
    Benchmark(
        "input_pipeline",
        "input_pipeline.py",
        _needs_data,
        lambda ctx: ["--samples=10", "--repeats=1", "--warmup=2"]
        if ctx.quick
        else ["--samples=80"],
        headline=_pipeline_headline,
    ),
    Benchmark(
        "evaluator",
        "evaluator.py",
        _needs_data,
        lambda ctx: ["--num=10", "--repeats=1"]
        if ctx.quick
        else ["--num=100", "--repeats=3"],
        headline=_evaluator_headline,
    ),
    Benchmark(
        "train_step",
        "train_step.py",
        lambda ctx: None,
        lambda ctx: (
            ["--steps=1", "--rounds=1", "--quick"] if ctx.quick else []
        )
        + (["--config=configs/openkbp.py", "--device=gpu"] if ctx.gpu else []),
    ),
    Benchmark(
        "inference",
        "inference.py",
        lambda ctx: None,
        lambda ctx: (
            ["--steps=1", "--repeats=1", "--quick"] if ctx.quick else []
        )
        + (["--device=gpu", "--backend=gpu", "--grid=128"] if ctx.gpu else []),
    ),
    Benchmark(
        "torch_train_step",
        "torch_train_step.py",
        _needs_torch,
        lambda ctx: [f"--config={_torch_config(ctx)}"]
        + (["--steps=2", "--warmup=1"] if ctx.quick else []),
    ),
    Benchmark(
        "torch_inference",
        "torch_train_step.py",
        _needs_torch,
        lambda ctx: [f"--config={_torch_config(ctx)}", "--inference", "--tta"]
        + (["--steps=1", "--warmup=1"] if ctx.quick else []),
    ),
    Benchmark(
        "gpu_run",
        "gpu_run.py",
        _needs_gpu_and_cache,
        lambda ctx: [f"--cache_dir={ctx.gpu_cache}"]
        + (["--budget_s=60", "--steps=5"] if ctx.quick else []),
        output="out",
    ),
]


def defined_flags(source: str) -> set[str]:
  """Flag names a script defines (argparse `"--name"` or absl
  `DEFINE_*("name"`), read from its source without running it."""
  import re  # pylint: disable=import-outside-toplevel

  names = set(re.findall(r"""["']--([A-Za-z0-9_-]+)["']""", source))
  names |= set(
      re.findall(r"""DEFINE_\w+\(\s*["']([A-Za-z0-9_]+)["']""", source)
  )
  return names


def filter_args(
    args: list[str], flags: set[str]
) -> tuple[list[str], list[str]]:
  """(kept, dropped): arguments whose flag the script defines."""
  kept, dropped = [], []
  for arg in args:
    name = arg[2:].split("=", 1)[0]
    (kept if name in flags else dropped).append(arg)
  return kept, dropped


def probe_backend(timeout_s: float = 120.0) -> str:
  """jax.default_backend() in a subprocess (this script does not import jax)."""
  try:
    out = subprocess.run(
        [sys.executable, "-c", "import jax; print(jax.default_backend())"],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=ROOT,
    )
    return (
        out.stdout.strip().splitlines()[-1]
        if out.returncode == 0
        else "unavailable"
    )
  except (subprocess.TimeoutExpired, IndexError, OSError):
    return "unavailable"


def probe_torch() -> tuple[str | None, bool]:
  if importlib.util.find_spec("torch") is None:
    return None, False
  try:
    out = subprocess.run(
        [
            sys.executable,
            "-c",
            "import torch; print(torch.__version__, torch.cuda.is_available())",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    version, cuda = out.stdout.split()
    return version, cuda == "True"
  except (subprocess.TimeoutExpired, ValueError, OSError):
    return None, False


def run_one(bench: Benchmark, ctx: Context, timeout_s: float) -> dict:
  script = _HERE / bench.script
  if not script.is_file():
    return {
        "status": "skipped",
        "reason": f"benchmarks/{bench.script} does not exist (yet)",
    }
  reason = bench.fits(ctx)
  if reason:
    return {"status": "skipped", "reason": reason}
  flags = defined_flags(script.read_text())
  args, dropped = filter_args(bench.args(ctx), flags)
  with tempfile.TemporaryDirectory(prefix=f"bench_{bench.name}_") as tmp:
    tmp = pathlib.Path(tmp)
    if bench.output == "json" and "json" in flags:
      args.append(f"--json={tmp / 'result.json'}")
    elif bench.output == "out" and "out" in flags:
      args.append(f"--out={tmp}")
    command = [sys.executable, str(script.relative_to(ROOT)), *args]
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])
        ),
    )
    entry = {"command": " ".join(command[1:]), "dropped_args": dropped}
    started = time.perf_counter()
    with open(tmp / "output.txt", "w+") as log:
      proc = subprocess.Popen(
          command,
          cwd=ROOT,
          env=env,
          stdout=log,
          stderr=subprocess.STDOUT,
          start_new_session=True,
      )
      try:
        returncode = proc.wait(timeout=timeout_s)
        status = "ok" if returncode == 0 else "failed"
      except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the script and its workers
        proc.wait()
        returncode, status = None, "timeout"
      log.seek(0)
      output = log.read()
    entry.update(
        status=status,
        returncode=returncode,
        seconds=round(time.perf_counter() - started, 1),
        output_tail=output[-4000:],
    )
    results = {
        p.name: json.loads(p.read_text()) for p in sorted(tmp.glob("*.json"))
    }
    if len(results) == 1:
      entry["result"] = next(iter(results.values()))
    elif results:
      entry["result"] = results
    elif status == "ok":
      entry["result"] = _last_json_object(output)
  if status != "ok":
    entry["reason"] = (
        f"timed out after {timeout_s:.0f} s"
        if status == "timeout"
        else f"exit code {returncode}: {_last_line(output)}"
    )
  return entry


def _last_line(text: str) -> str:
  lines = [l for l in text.strip().splitlines() if l.strip()]
  return lines[-1][:300] if lines else ""


def _last_json_object(text: str):
  """The last JSON object printed (for a script without --json), or None."""
  end = text.rfind("}")
  while end != -1:
    start = text.rfind("{", 0, end)
    while start != -1:
      try:
        return json.loads(text[start : end + 1])
      except ValueError:
        start = text.rfind("{", 0, start)
    end = text.rfind("}", 0, end)
  return None


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument(
      "--only",
      default="",
      help="comma-separated benchmark names (default: all): "
      + ",".join(b.name for b in BENCHMARKS),
  )
  p.add_argument(
      "--quick",
      action="store_true",
      help="small sizes, one round: checks that everything runs "
      "(figures not for reporting)",
  )
  p.add_argument(
      "--timeout",
      type=float,
      default=None,
      help="seconds per benchmark (default: 1800, --quick 600)",
  )
  p.add_argument("--data", type=pathlib.Path, default=common.openkbp_dir())
  p.add_argument("--gpu_cache", type=pathlib.Path, default=ROOT / ".gpu_cache")
  p.add_argument(
      "--json",
      type=pathlib.Path,
      default=None,
      help="default: benchmarks/results/<hostname>.json "
      "(--quick: <hostname>_quick.json)",
  )
  args = p.parse_args(argv)

  names = [n.strip() for n in args.only.split(",") if n.strip()]
  known = {b.name for b in BENCHMARKS}
  unknown = sorted(set(names) - known)
  if unknown:
    p.error(f"--only: unknown {unknown}; choose from {sorted(known)}")
  selected = [b for b in BENCHMARKS if not names or b.name in names]

  torch_version, torch_cuda = probe_torch()
  ctx = Context(
      backend=probe_backend(),
      torch=torch_version,
      torch_cuda=torch_cuda,
      data=args.data,
      gpu_cache=args.gpu_cache,
      quick=args.quick,
  )
  hostname = socket.gethostname()
  json_path = args.json or common.RESULTS_DIR / (
      f"{hostname}_quick.json" if args.quick else f"{hostname}.json"
  )
  machine = common.machine_info()
  machine.update(
      jax_backend=ctx.backend, torch=ctx.torch, torch_cuda=ctx.torch_cuda
  )
  report = {
      "benchmark": "run_all",
      "command": " ".join(
          [
              "python benchmarks/run_all.py",
              *(argv if argv is not None else sys.argv[1:]),
          ]
      ),
      "date": (
          datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"
          )
      ),
      "quick": args.quick,
      "machine": machine,
      "benchmarks": {},
  }
  print(
      f"{hostname}: {machine['cpu_model']}, {machine['usable_cores']} cores, "
      f"jax backend {ctx.backend}, torch {ctx.torch or 'absent'}, "
      f"load {machine['load_average'][0]:.1f}",
      flush=True,
  )
  for bench in selected:
    timeout_s = args.timeout or (
        bench.quick_timeout_s if args.quick else bench.timeout_s
    )
    print(f"-- {bench.name} ...", flush=True)
    entry = run_one(bench, ctx, timeout_s)
    report["benchmarks"][bench.name] = entry
    print(
        f"   {entry['status']}"
        + (f": {entry['reason']}" if entry.get("reason") else "")
        + (f" ({entry['seconds']} s)" if "seconds" in entry else ""),
        flush=True,
    )
    # Written after every benchmark: a later crash keeps what was measured.
    machine["load_average_end"] = common.machine_info()["load_average"]
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(report, indent=1) + "\n")

  print(f"\n{'benchmark':18s} {'status':8s} {'seconds':>8s}  headline / reason")
  for bench in selected:
    entry = report["benchmarks"][bench.name]
    if entry["status"] == "ok" and isinstance(entry.get("result"), dict):
      try:
        detail = bench.headline(entry["result"])
      except (KeyError, TypeError, ValueError) as e:
        detail = f"(no headline: {e!r})"
    else:
      detail = entry.get("reason", "")
    seconds = f"{entry['seconds']:8.1f}" if "seconds" in entry else f"{'':8s}"
    print(f"{bench.name:18s} {entry['status']:8s} {seconds}  {detail}")
  print(f"\nwrote {json_path}")
  return (
      0
      if all(
          e["status"] in ("ok", "skipped")
          for e in report["benchmarks"].values()
      )
      else 1
  )


if __name__ == "__main__":
  sys.exit(main())
