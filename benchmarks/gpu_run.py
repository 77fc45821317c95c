"""The prepared GPU session: every figure issue 5 item 3 and issue 4 item 9
ask for, in one call that fits the device budget and leaves partial results.

Device command (one `run` call, carry [".whl", ".gpu_cache", ".gpu_snapshot"],
timeout_s about budget_s + 60; `bash benchmarks/prepare_gpu_run.sh` makes
the three folders first, the snapshot always from HEAD):

  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site || exit; cd .gpu_snapshot && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_run.py --cache_dir=../.gpu_cache --out=$OUT --budget_s=420 2>&1 | tee $OUT/log.txt

`.whl/` holds what the GPU image lacks (grain, array_record, ml_collections,
portpicker, tensorboardX; nibabel/pydicom are imported lazily and not
needed); `.gpu_cache/` is `randose_jax.data.cache` built for the paper's
data settings (train-pats/: 20 patients, validation-pats/: 6). The CSVs do
not travel.

Phases, in this order (estimates for an H100/H200, from the last sessions'
figures where there are some; the plan is printed at the start):

  0. card (nvidia-smi), versions                                      ~2 s
  1. JAX start-up, analytic conv FLOPs of each variant's network
     (randose_jax.models.costs.conv_flops of the network built with direct
     convs, a trace, no run; x3 for forward + backward, x batch) and the
     bf16 matmul peak (8192^3, JAX; 791 TFLOP/s on an H200)          ~15 s
  2. PyTorch twin train step (benchmarks/torch_train_step.py, cuDNN,
     channels_last_3d, fused Adam), each variant, in ONE child process
     (torch never shares a process with JAX: each has its own CUDA
     libraries and allocator; per-variant peak memory is exact there) ~40-90 s,
     capped by --torch_timeout_s
  3. JAX train step, the first --jax_variants entry (bf16 + fused MSFE:
     compile ~25 s), on a real batch of two cached patients: compile s,
     memory_analysis, median ms/step over synchronised steps and the
     pipelined (unsynchronised) mean; the host side of a training batch;
     then one 128^3 prediction (compile + s/patient), which also caches
     the evaluation forward                                           ~45 s
     then the next --before_train - 1 entries (default: bf16_fused_fft,
     the tiled-FFT convs that win on the CPU; never run on a GPU, and
     the FLOP cut that the 2-H100-hour goal needs)          ~40-80 s (?)
  4. the training run (train.train_and_evaluate on the cached real
     patients, same config as 3, so its step and its evaluation forward
     come from the persistent compilation cache instead of compiling
     again): the step count is budget-driven (below); loss curve,
     s/step with the input pipeline, first step (grain start-up + cache
     load), peak memory, validation dose/DVH score of the best checkpoint
     on the 6 validation patients and the mean-dose baseline
     (~2.5-3 min at the default budget, more with a larger one)
  5. the remaining --jax_variants (fp32, paper config as is: its compile
     took ~97 s last time), only if the estimate fits what is left     ~110 s
     (at --budget_s=420 it usually does not: a second call with
     --phases=jax_rest --jax_variants=bf16_fused,fp32 --before_train=1
     times it alone)

Why this order: the cheap, certain figures come first (the peak every
fraction needs, then the twin: no compile); the bf16 step is needed before
the training run (its measured step time sets the run's step count, and its
compile fills the persistent cache the run reads); the FFT variant decides
what to optimise next, so it comes before the run too; the fp32 compile is the
longest and least certain phase, so it goes last, where an overrun costs no
other figure.

Training steps (unless --train_steps is given):
  steps = (time left - fp32 reserve - 5 s - --train_overhead_s)
          / (--step_margin x max(phase 3's ms/step, host side)),
where the host side is the loop's own main-thread work per batch, measured
in phase 3 on a real batch (unpacking the grain workers' row packs into
float32 channels, then the host-to-device copy: ~90 ms on the 2-core VM, so
the run may well be input-bound on a fast card),
clipped to [--min_train_steps, --max_train_steps]; when keeping the fp32
reserve would leave fewer than --min_train_steps, the run takes all the
time instead (fp32 is then skipped). The
overhead covers grain start-up, loading the cached compiles, the two
evaluations of the 6 validation patients at 128^3 (at the last step and in
`finish`, which also writes the CSVs), two orbax checkpoints (~1 GB each)
and the baseline; the run records its actual overhead for next time.

Robustness: `$OUT/gpu_run.json` (and the table, `$OUT/gpu_run.md`) are
rewritten after every phase and every 15 s during the training run (its
loss curve so far), every print is flushed and carries the seconds since
start; a failed phase is recorded and the next one runs; a watchdog writes
the results and exits (code 3) when --budget_s runs out, whatever is
running. JAX does not preallocate GPU memory (so the torch child gets the
card); peak memory per JAX variant is reported as XLA's memory_analysis of
the compiled step (arguments + outputs - aliased + temporaries) and as the
process's peak_bytes_in_use after each phase, in run order (JAX cannot
reset it). Every figure carries the card's name.

CPU check of the whole script (smoke config: 16^3, widths 4..8; about 3
minutes on the 2-core VM), with a cache built for the smoke data settings
from the shared patients:

  python -c "import pathlib, sys; sys.path[:0] = ['.', 'benchmarks']; \
import torch_train_step as t; from randose_jax.data import cache, openkbp; \
c = t.load_config('configs/openkbp.py:smoke'); r = pathlib.Path(c.data.root); \
[cache.build_cache(openkbp.list_patient_dirs(r / s), f'/tmp/smoke_cache/{s}', c.data) \
for s in ('train-pats', 'validation-pats')]"
  python benchmarks/gpu_run.py --variant=smoke --cache_dir=/tmp/smoke_cache \
      --out=/tmp/gpu_out --budget_s=600 --workers=2 --train_steps=6 \
      --later_compile_est_s=5

(--train_steps=0 and a smaller --budget_s exercise the step planning and
the skips; a budget of 60 s exercises the watchdog.)
"""

import contextlib
import gc
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback

from absl import app
from absl import flags

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program, so the
  module imports beside others, e.g. in tests)."""
  flags.DEFINE_string(
      "cache_dir",
      ".gpu_cache",
      "Prebuilt cache (train-pats/, validation-pats/).",
  )
  flags.DEFINE_string(
      "out", None, "Output folder (default: $OUT, else gpu_out)."
  )
  flags.DEFINE_float(
      "budget_s",
      420.0,
      "Wall-clock budget of the whole script; "
      "a watchdog writes the results and exits when it runs out.",
  )
  flags.DEFINE_string(
      "variant", "", "configs/openkbp.py variant(s), e.g. smoke."
  )
  flags.DEFINE_list(
      "jax_variants",
      ["bf16_fused", "bf16_fused_fft", "fp32"],
      "JAX train-step variants, dtype[_fused][_fft]: bf16|fp32, "
      "_fused = msfe_fused, _fft = conv_impl fft (tiled FFT "
      "convs). The first also trains (phase 4); later ones run "
      "while the budget lasts.",
  )
  flags.DEFINE_integer(
      "before_train",
      2,
      "How many --jax_variants are timed "
      "before the training run (phase 3); the rest after it "
      "(phase 5), while the budget lasts.",
  )
  flags.DEFINE_bool(
      "train_fastest",
      True,
      "Train (phase 4) with the variant "
      "timed fastest in phase 3 when it is >= 1.5x faster than "
      "the first.",
  )
  flags.DEFINE_list(
      "torch_variants",
      ["bf16_fused", "fp32"],
      "PyTorch twin variants (same names).",
  )
  flags.DEFINE_list(
      "phases",
      ["matmul", "torch", "jax", "train", "jax_rest"],
      "Phases to run (a rerun can skip what already came back).",
  )
  flags.DEFINE_integer(
      "workers", 4, "grain worker processes of the training run."
  )
  flags.DEFINE_integer("train_steps", 0, "Training steps; 0 = from the budget.")
  flags.DEFINE_integer("min_train_steps", 50, "Fewest budget-driven steps.")
  flags.DEFINE_integer("max_train_steps", 5000, "Most budget-driven steps.")
  flags.DEFINE_float(
      "train_overhead_s",
      60.0,
      "Estimated seconds of the "
      "training phase besides its steps (see the module doc).",
  )
  flags.DEFINE_float(
      "step_margin",
      1.3,
      "Training step time assumed when "
      "sizing the run, over the slower of phase 3's step and "
      "its host-side measure (unpack + copy per batch).",
  )
  flags.DEFINE_float(
      "fallback_step_s", 1.0, "Step time assumed when phase 3 gave none."
  )
  flags.DEFINE_float(
      "later_compile_est_s",
      110.0,
      "Estimated compile seconds "
      "of each later JAX variant (fp32: ~97 s last time); at "
      "least 4x the first variant's compile is assumed.",
  )
  flags.DEFINE_integer("timed_steps", 10, "Timed JAX steps per variant.")
  flags.DEFINE_integer(
      "warmup_steps", 2, "Untimed JAX steps (after the first)."
  )
  flags.DEFINE_integer("torch_steps", 5, "Timed twin steps per variant.")
  flags.DEFINE_integer("torch_warmup", 2, "Untimed twin steps per variant.")
  flags.DEFINE_float(
      "torch_timeout_s", 120.0, "Cap on the twin's child process."
  )
  flags.DEFINE_bool("inference", True, "Time one prediction in phase 3.")
  flags.DEFINE_integer(
      "matmul_n", 0, "Matmul edge; 0 = 8192 on GPU, 1024 else."
  )
  flags.DEFINE_bool("preallocate", False, "Let JAX preallocate GPU memory.")
  flags.DEFINE_string("xla_flags", "", "Appended to XLA_FLAGS (recorded).")
  flags.DEFINE_bool("keep_tmp", False, "Keep the temporary workdir and caches.")
  flags.DEFINE_string(
      "torch_child_out",
      None,
      "Internal: run as the twin's child process, writing here.",
  )


STEPS_80K = 80_000
_LOCK = threading.RLock()
_STATE = {
    "t0": time.time(),
    "phase": "start",
    "poll": None,
    "child": None,
    "cache_events": {},
}
RESULTS = {}
OUT = None


# --------------------------------------------------------------- helpers
def elapsed() -> float:
  return time.time() - _STATE["t0"]


def left() -> float:
  return FLAGS.budget_s - elapsed()


def log(msg: str) -> None:
  print(f"[{elapsed():7.1f} s] {msg}", flush=True)


def parse_variant(name: str) -> tuple[str, bool, str]:
  """'bf16_fused' -> ('bfloat16', True, 'auto'); 'fp32' -> ('float32', False,
  'auto'); a '_fft' suffix -> conv_impl 'fft' (the tiled-FFT convs, which
  'auto' uses on the CPU only; never measured on a GPU before)."""
  dtypes = {"bf16": "bfloat16", "fp32": "float32"}
  parts = name.strip().split("_")
  if parts[0] not in dtypes or any(
      p not in ("fused", "fft") for p in parts[1:]
  ):
    raise ValueError(
        f"variant {name!r}: expected bf16|fp32 with optional "
        "_fused and _fft suffixes"
    )
  return (
      dtypes[parts[0]],
      "fused" in parts[1:],
      "fft" if "fft" in parts[1:] else "auto",
  )


def load_config(variant_name: str = None):
  """configs/openkbp.py[:--variant], with a train-step variant's dtype/fusion."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location(
      "openkbp_cfg", REPO / "configs" / "openkbp.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(FLAGS.variant)
  if variant_name:
    config.model.dtype, config.model.msfe_fused, config.model.conv_impl = (
        parse_variant(variant_name)
    )
  return config


def pick_training_variant(
    first: str, early, timed: dict, step_s, fastest: bool
):
  """(variant, step_s, extra overhead s, why) of the training run.

  The first variant, unless `fastest` and another variant timed before the
  run was at least 1.5x faster: then that one (more steps in the budget),
  with its train-step compile as extra overhead (its evaluation forward was
  not compiled in phase 3). step_s keeps the host side measured with the
  first variant (the input pipeline does not depend on the variant)."""
  ms = {
      v: r["ms_per_step"]
      for v in early
      if isinstance(r := timed.get(v), dict) and r.get("ms_per_step")
  }
  if not fastest or first not in ms:
    return first, step_s, 0.0, "the first --jax_variants entry"
  best = min(ms, key=ms.get)
  if best == first or ms[best] * 1.5 > ms[first]:
    return (
        first,
        step_s,
        0.0,
        (
            f"the first entry ({first} {ms[first]:.0f} "
            "ms/step; no other was 1.5x faster)"
        ),
    )
  host = (timed.get(first) or {}).get("host_s_per_batch") or 0.0
  return (
      best,
      max(ms[best] / 1e3, host),
      float(timed[best].get("compile_s") or 30.0),
      (f"{best} at {ms[best]:.0f} ms/step vs {first} at {ms[first]:.0f}"),
  )


def plan_train_steps(
    time_left: float,
    step_s: float,
    reserve_s: float,
    overhead_s: float,
    margin: float,
    min_steps: int,
    max_steps: int,
) -> tuple[int, bool, str]:
  """(steps, keep_reserve, why) for a training run that should end with
  `reserve_s` still left; steps 0 when not even `min_steps` fit."""
  per_step = max(step_s * margin, 1e-3)
  with_reserve = int((time_left - reserve_s - overhead_s) / per_step)
  if with_reserve >= min_steps:
    steps = min(with_reserve, max_steps)
    return (
        steps,
        True,
        (
            f"{time_left:.0f} s left - {reserve_s:.0f} s reserved "
            f"- {overhead_s:.0f} s overhead, {per_step:.3f} s/step"
        ),
    )
  without = int((time_left - overhead_s) / per_step)
  if without >= min_steps:  # the later variants would not fit after it
    return (
        min(without, max_steps),
        False,
        (
            f"the {reserve_s:.0f} s reserve for the later variants would leave "
            f"{with_reserve} steps (< {min_steps}): dropping the reserve"
        ),
    )
  return (
      0,
      False,
      (
          f"{time_left:.0f} s left: not even {min_steps} steps of "
          f"{per_step:.3f} s plus {overhead_s:.0f} s overhead fit"
      ),
  )


def derive(entry: dict, tflop_per_step, step_s, peak):
  """Adds achieved TFLOP/s, fraction of the matmul peak and hours per 80k."""
  if not step_s:
    return entry
  entry["projected_hours_80k_steps"] = step_s * STEPS_80K / 3600
  if not tflop_per_step:
    return entry
  entry["analytic_tflop_per_step"] = tflop_per_step
  entry["achieved_tflops"] = tflop_per_step / step_s
  if peak:
    entry["fraction_of_bf16_matmul_peak"] = tflop_per_step / step_s / peak
  return entry


def train_tflop(flops: dict, name: str, batch: int):
  """Analytic TFLOP of one train step: forward conv GFLOPs x 3 (forward +
  two backward products) x batch; None without the count."""
  gflops = flops.get(name)
  return gflops * 3 * batch / 1e3 if gflops else None


def _fmt(x, spec=".1f", scale=1.0):
  return "-" if x is None else format(x * scale, spec)


def _short(r) -> str:
  """A result that is no figure (an error, a skip), on one line."""
  if isinstance(r, dict):
    r = r.get("error") or r.get("skipped") or "no figure"
  return " ".join(str(r).split())[:160].replace("|", "/")


def markdown(results: dict) -> str:
  """The table of every figure so far."""
  card = results.get("card", "?")
  peak = (results.get("matmul_peak") or {}).get("bf16_tflops")
  lines = [
      f"card: {card} | status: {results.get('status')} | "
      f"{results.get('elapsed_s', 0):.0f} s of {results.get('budget_s')} s",
      "",
      "| figure | ms/step | compile s | TFLOP/s | % bf16 peak | "
      "GPU memory GiB | h / 80k steps |",
      "|---|---|---|---|---|---|---|",
  ]
  if peak:
    n = results["matmul_peak"]["n"]
    lines.append(
        f"| bf16 matmul peak ({n}^3, JAX) | | | {peak:.4g} | 100 | | |"
    )

  def row(name, r, ms, compile_s, mem):
    lines.append(
        f"| {name} | {_fmt(ms, '.1f')} | {_fmt(compile_s, '.1f')} | "
        f"{_fmt(r.get('achieved_tflops'), '.3g')} | "
        f"{_fmt(r.get('fraction_of_bf16_matmul_peak'), '.3g', 100)} | {mem} | "
        f"{_fmt(r.get('projected_hours_80k_steps'), '.1f')} |"
    )

  for name, r in (results.get("torch_twin") or {}).items():
    if isinstance(r, dict) and "ms_per_step" in r:
      row(
          f"PyTorch twin {name} (first step {r.get('first_step_s', 0):.1f} s)",
          r,
          r["ms_per_step"],
          None,
          f"{_fmt(r.get('max_memory_allocated_gib'), '.1f')} (torch max allocated)",
      )
    elif r:
      lines.append(f"| PyTorch twin {name}: {_short(r)} | | | | | | |")
  for name, r in (results.get("jax_train_step") or {}).items():
    if isinstance(r, dict) and "ms_per_step" in r:
      mem = (
          f"{_fmt(r.get('memory_analysis_peak_gib'), '.1f')} (XLA) / "
          f"{_fmt(r.get('process_peak_gib_after'), '.1f')} (process, "
          f"run order {r.get('run_order')})"
      )
      row(f"JAX {name}", r, r["ms_per_step"], r.get("compile_s"), mem)
      if r.get("host_s_per_batch"):
        lines.append(
            f"| JAX {name}: host side of a training batch (unpack "
            f"+ copy) {r['host_s_per_batch'] * 1e3:.1f} ms "
            "| | | | | | |"
        )
      if r.get("inference_s_per_patient") is not None:
        lines.append(
            f"| JAX {name} prediction, one {r.get('grid')}^3 patient: "
            f"{r['inference_s_per_patient'] * 1e3:.1f} ms "
            f"(compile {r.get('inference_compile_s', 0):.1f} s) "
            "| | | | | | |"
        )
    elif r:
      lines.append(f"| JAX {name}: {_short(r)} | | | | | | |")
  tr = results.get("training_run") or {}
  if tr.get("seconds_per_step"):
    row(
        f"training run {tr.get('variant')}, {tr.get('steps')} steps, real "
        f"data (first step {_fmt(tr.get('compile_and_first_step_s'))} s)",
        tr,
        tr["seconds_per_step"] * 1e3,
        None,
        f"{_fmt(tr.get('process_peak_gib_after'), '.1f')} (process)",
    )
  val = tr.get("validation")
  if val:
    lines += [
        "",
        "| training run | dose score | DVH score |",
        "|---|---|---|",
        f"| model, best of {tr.get('steps')} steps, "
        f"{val.get('num_patients')} validation patients | "
        f"{val['dose_score']:.3f} | {val['dvh_score']:.3f} |",
        f"| mean training dose inside the mask | "
        f"{val['baseline_mean_dose_score']:.3f} | "
        f"{val['baseline_mean_dvh_score']:.3f} |",
        f"| wall {tr.get('wall_s', 0):.0f} s, overhead besides the steps "
        f"{_fmt(tr.get('overhead_s'), '.0f')} s | | |",
    ]
  elif tr:
    progress = tr.get("progress") or {}
    lines.append(
        f"\ntraining run {tr.get('variant', '')}: "
        + (
            f"error {tr['error']}"
            if tr.get("error")
            else f"skipped: {tr['skipped']}"
            if tr.get("skipped")
            else f"at step {progress.get('last_step')} of {tr.get('steps')}, loss "
            f"{(progress.get('loss_curve') or [[0, None]])[-1][1]}, "
            f"{progress.get('steps_per_second')} steps/s, first step "
            f"{progress.get('first_step_s')} s"
        )
    )
  return "\n".join(lines)


def write() -> None:
  """gpu_run.json and gpu_run.md, atomically; safe from any thread."""
  with _LOCK:
    RESULTS["elapsed_s"] = elapsed()
    RESULTS["phase_now"] = _STATE["phase"]
    text = json.dumps(RESULTS, indent=1, default=str)
    table = markdown(RESULTS)
  for name, content in (("gpu_run.json", text), ("gpu_run.md", table + "\n")):
    tmp = OUT / (name + ".tmp")
    tmp.write_text(content)
    tmp.replace(OUT / name)


@contextlib.contextmanager
def phase(name: str, key: str = None):
  """Times a phase, records failures under RESULTS[key] and writes after."""
  _STATE["phase"] = name
  start = elapsed()
  log(f">>> {name} ({left():.0f} s of budget left)")
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    traceback.print_exc()
    sys.stderr.flush()
    with _LOCK:
      err = f"{type(e).__name__}: {e}"[:2000]
      target = RESULTS
      for part in (key,) if isinstance(key, str) else key or ():
        if isinstance(target, dict):
          target = target.setdefault(part, {})
      if key and isinstance(target, dict):
        target["error"] = err
      RESULTS.setdefault("errors", []).append({"phase": name, "error": err})
  finally:
    with _LOCK:
      RESULTS.setdefault("phases", []).append(
          {
              "name": name,
              "start_s": round(start, 1),
              "end_s": round(elapsed(), 1),
          }
      )
    write()
    log(f"<<< {name} ({elapsed() - start:.1f} s)")


def _ticker():
  while True:
    time.sleep(15)
    poll = _STATE["poll"]
    try:
      if poll:
        poll()
      write()
    except Exception as e:  # pylint: disable=broad-except
      log(f"progress poll failed: {e}")


def _watchdog():
  """At the end of the budget: write what there is and exit, always."""
  time.sleep(max(left(), 0))
  try:
    with _LOCK:
      RESULTS["status"] = (
          f"stopped by the watchdog: the budget of "
          f"{FLAGS.budget_s:.0f} s ran out during "
          f"{_STATE['phase']}"
      )
    child = _STATE.get("child")
    if child is not None and child.poll() is None:
      child.kill()
    if _STATE["poll"]:
      try:
        _STATE["poll"]()
      except Exception:  # pylint: disable=broad-except
        pass
    for _ in range(5):  # the main thread may be changing a dict right now
      try:
        write()
        break
      except RuntimeError:
        time.sleep(0.05)
    log(RESULTS["status"])
    print("\n" + markdown(RESULTS), flush=True)
    if _STATE.get("tmp_root") and not FLAGS.keep_tmp:
      shutil.rmtree(_STATE["tmp_root"], ignore_errors=True)
  finally:
    os._exit(3)  # pylint: disable=protected-access


def _fast_tmp():
  """/dev/shm when it has room for two ~1 GB checkpoints and the caches
  (a container's can be 64 MB), else the default temporary folder."""
  try:
    if (
        os.access("/dev/shm", os.W_OK)
        and shutil.disk_usage("/dev/shm").free > 8 * 2**30
    ):
      return "/dev/shm"
  except OSError:
    pass
  return None


def card_info() -> tuple[str, str]:
  try:
    out = (
        subprocess.run(
            [
                "nvidia-smi",
                "--query-gpu=name,memory.total,driver_version",
                "--format=csv,noheader",
            ],
            capture_output=True,
            text=True,
            timeout=20,
        )
        .stdout.strip()
        .splitlines()
    )
    if out:
      return out[0].split(",")[0].strip(), out[0]
  except (OSError, subprocess.SubprocessError):
    pass
  return "", "nvidia-smi: not available"


# ------------------------------------------------------ the torch child
def torch_child(out_path: pathlib.Path) -> None:
  """Runs in its own process: the twin's train step per variant (no jax)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch_train_step  # pylint: disable=g-import-not-at-top

  device = "cuda" if torch.cuda.is_available() else "cpu"
  results = {}
  for name in FLAGS.torch_variants:
    config = load_config(name)
    grid = 128 // config.data.downsample
    print(
        f"[torch child] {name}: {config.model.dtype}, msfe_fused="
        f"{config.model.msfe_fused}, {grid}^3, batch {config.batch_size}, "
        f"{device}",
        flush=True,
    )
    t0 = time.perf_counter()
    try:
      if device == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
      r = torch_train_step.time_torch_train_step(
          config.model,
          batch=config.batch_size,
          grid=grid,
          steps=FLAGS.torch_steps,
          warmup=FLAGS.torch_warmup,
          device=device,
          dtype=config.model.dtype,
          loss_config=config.loss,
      )
      if device == "cuda":
        r["max_memory_allocated_gib"] = (
            torch.cuda.max_memory_allocated() / 2**30
        )
        r["max_memory_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
      r["msfe_fused"] = bool(config.model.msfe_fused)
      r["wall_s"] = time.perf_counter() - t0
      results[name] = r
      print(
          f"[torch child] {name}: {r['ms_per_step']:.1f} ms/step, first "
          f"step {r['first_step_s']:.1f} s",
          flush=True,
      )
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      results[name] = f"failed: {type(e).__name__}: {e}"[:2000]
    tmp = out_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, default=str))
    tmp.replace(out_path)


# ------------------------------------------------------------ JAX phases
def _memory_stats():
  import jax  # pylint: disable=g-import-not-at-top

  stats = jax.local_devices()[0].memory_stats() or {}
  return {
      k: stats[k] / 2**30
      for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
      if k in stats
  }


def _real_batch(config, size: int) -> dict:
  """`size` cached training patients, encoded, stacked (random if no cache)."""
  import numpy as np  # pylint: disable=g-import-not-at-top

  try:
    from randose_jax.data import cache as cache_lib  # pylint: disable=g-import-not-at-top

    cache = cache_lib.open_cache(
        pathlib.Path(FLAGS.cache_dir).resolve() / config.data.train_split,
        config.data,
    )
    examples = [cache[i % len(cache)] for i in range(size)]
    return {
        k: np.stack([e[k] for e in examples]).astype(np.float32)
        for k in ("ptv", "ct", "oar", "target", "mask")
    }
  except Exception as e:  # pylint: disable=broad-except
    log(f"no cached batch ({e}); timing on random inputs")
    g = 128 // config.data.downsample
    rng = np.random.default_rng(0)
    shape = (size, g, g, g)
    return {
        "ptv": rng.uniform(size=shape + (1,)).astype(np.float32),
        "ct": rng.uniform(size=shape + (1,)).astype(np.float32),
        "oar": (rng.uniform(size=shape + (7,)) > 0.9).astype(np.float32),
        "target": rng.uniform(size=shape + (1,)).astype(np.float32),
        "mask": np.ones(shape + (1,), np.float32),
    }


def host_seconds_per_batch(trainer, config, batch_np) -> float:
  """The training loop's main-thread work per step besides the step: at
  downsample 1 unpacking the workers' packs into float32 channels
  (`encoding.unpack`), then the host-to-device copy (`shard_batch`);
  median of 3. The workers' side (read, augment, pack) runs in parallel."""
  import jax  # pylint: disable=g-import-not-at-top
  from randose_jax.data import augment  # pylint: disable=g-import-not-at-top
  from randose_jax.data import cache as cache_lib  # pylint: disable=g-import-not-at-top
  from randose_jax.data import encoding  # pylint: disable=g-import-not-at-top
  from randose_jax.data import pipeline  # pylint: disable=g-import-not-at-top

  unpack = None
  if int(config.data.downsample) == 1:
    cache = cache_lib.open_cache(
        pathlib.Path(FLAGS.cache_dir).resolve() / config.data.train_split,
        config.data,
    )
    source = pipeline.PlaneSource(cache)
    packed = pipeline.PackedBatch()(
        [
            augment.transform(source[i % len(source)], config.data)
            for i in range(config.batch_size)
        ]
    )
    unpack = lambda: encoding.unpack(packed, cache.settings)
  times = []
  for _ in range(3):
    t = time.perf_counter()
    jax.block_until_ready(trainer.shard_batch(unpack() if unpack else batch_np))
    times.append(time.perf_counter() - t)
  return statistics.median(times)


def time_jax_variant(name: str, flops: dict, peak: float, order: int) -> dict:
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from randose_jax.training import train  # pylint: disable=g-import-not-at-top

  config = load_config(name)
  grid = 128 // config.data.downsample
  r = {
      "card": RESULTS.get("card"),
      "variant": name,
      "dtype": config.model.dtype,
      "msfe_fused": bool(config.model.msfe_fused),
      "conv_impl": config.model.conv_impl,
      "grid": grid,
      "batch": config.batch_size,
      "widths": list(config.model.widths),
      "run_order": order,
  }
  with _LOCK:
    RESULTS.setdefault("jax_train_step", {})[name] = r
  batch_np = _real_batch(config, config.batch_size)
  trainer = train.Trainer.create(config)
  log(f"JAX {name}: initialising the parameters ...")
  t = time.perf_counter()
  state = jax.block_until_ready(trainer.init_state(config.seed))
  r["init_s"] = time.perf_counter() - t
  r["params"] = int(
      sum(np.prod(x.shape) for x in jax.tree.leaves(state.params["model"]))
  )
  batch = trainer.shard_batch(batch_np)
  log(
      f"JAX {name}: compiling the train step ({grid}^3, batch "
      f"{config.batch_size}) ..."
  )
  t = time.perf_counter()
  step_fn = trainer.jit_train_step.lower(state, batch).compile()
  r["compile_s"] = time.perf_counter() - t
  log(f"JAX {name}: compiled in {r['compile_s']:.1f} s")
  import common  # pylint: disable=g-import-not-at-top

  gib = {k: v / 2**30 for k, v in common.xla_memory(step_fn).items()}
  r["memory_analysis_gib"] = gib or "unavailable"
  if gib:
    r["memory_analysis_peak_gib"] = gib["peak"]
  write()

  times = []
  for i in range(1 + FLAGS.warmup_steps + FLAGS.timed_steps):
    t = time.perf_counter()
    state, metrics = step_fn(state, batch)
    loss = float(metrics["loss"])
    times.append(time.perf_counter() - t)
    if not np.isfinite(loss):
      raise FloatingPointError(f"JAX {name}: loss {loss} at step {i}")
  ms = [1e3 * x for x in times[1 + FLAGS.warmup_steps :]]
  r.update(
      first_step_s=times[0],
      ms_all=ms,
      ms_per_step=statistics.median(ms),
      last_loss=loss,
  )
  derive(
      r,
      train_tflop(flops, name, config.batch_size),
      r["ms_per_step"] / 1e3,
      peak,
  )
  write()
  # Pipelined: dispatch the same number of steps, synchronise once.
  t = time.perf_counter()
  for _ in range(FLAGS.timed_steps):
    state, metrics = step_fn(state, batch)
  jax.block_until_ready(metrics["loss"])
  r["ms_per_step_pipelined"] = (
      1e3 * (time.perf_counter() - t) / FLAGS.timed_steps
  )
  log(
      f"JAX {name}: {r['ms_per_step']:.1f} ms/step (pipelined "
      f"{r['ms_per_step_pipelined']:.1f}), first step {r['first_step_s']:.2f} s, "
      f"{r.get('achieved_tflops', 0):.1f} TFLOP/s"
  )
  write()

  if order == 1:
    try:
      r["host_s_per_batch"] = host_seconds_per_batch(trainer, config, batch_np)
      r["host_note"] = (
          "main-thread unpack + host-to-device copy per "
          "training batch; the run is input-bound above the "
          "step time"
      )
      log(
          f"JAX {name}: host side {r['host_s_per_batch'] * 1e3:.1f} ms per "
          "training batch (unpack + copy)"
      )
    except Exception as e:  # pylint: disable=broad-except
      r["host_s_per_batch"] = None
      r["host_note"] = f"not measured: {type(e).__name__}: {e}"
  if FLAGS.inference and order == 1:
    # The evaluation forward of the training run, compiled here (the
    # persistent cache hands it to the run) and timed: batch 1, no TTA.
    example = {k: batch_np[k][0] for k in ("ptv", "ct", "oar")}
    t = time.perf_counter()
    trainer.predictor.with_params(state.params["model"]).predict_local(
        [example], False
    )
    r["inference_compile_s"] = time.perf_counter() - t
    runs = []
    for _ in range(3):
      t = time.perf_counter()
      trainer.predictor.with_params(state.params["model"]).predict_local(
          [example], False
      )
      runs.append(time.perf_counter() - t)
    r["inference_s_per_patient"] = statistics.median(runs)
    r["inference_note"] = "batch 1, no TTA, host transfers included"
    log(
        f"JAX {name}: prediction {r['inference_s_per_patient'] * 1e3:.1f} ms "
        f"per patient (compile {r['inference_compile_s']:.1f} s)"
    )
  del state, batch, metrics, step_fn, trainer
  gc.collect()
  mem = _memory_stats()
  r["process_peak_gib_after"] = mem.get("peak_bytes_in_use")
  r["process_memory_after"] = mem
  return r


def training_run(
    name: str,
    steps: int,
    flops: dict,
    peak: float,
    workdir: pathlib.Path,
    order: int,
    plan: dict,
) -> None:
  from randose_jax.training import train  # pylint: disable=g-import-not-at-top

  config = load_config(name)
  config.data.root = ""
  config.data.cache_dir = str(pathlib.Path(FLAGS.cache_dir).resolve())
  config.data.num_workers = FLAGS.workers
  config.num_train_steps = steps
  config.log_every_steps = max(1, min(25, steps // 20))
  config.eval_every_steps = steps
  config.checkpoint_every_steps = steps
  config.progress_bar = False
  grid = 128 // config.data.downsample
  tflop = train_tflop(flops, name, config.batch_size)
  shutil.rmtree(workdir, ignore_errors=True)
  tr = {
      "card": RESULTS.get("card"),
      "variant": name,
      "config": (
          f"configs/openkbp.py{':' + FLAGS.variant if FLAGS.variant else ''}"
          f" dtype={config.model.dtype} msfe_fused={config.model.msfe_fused}"
      ),
      "grid": grid,
      "batch": config.batch_size,
      "steps": steps,
      "workers": FLAGS.workers,
      "log_every_steps": config.log_every_steps,
      "plan": plan,
      "run_order": order,
  }
  with _LOCK:
    RESULTS["training_run"] = tr
  metrics_path = workdir / "metrics.jsonl"

  def read_metrics():
    if not metrics_path.is_file():
      return []
    rows = []
    for line in metrics_path.read_text().splitlines():
      try:
        rows.append(json.loads(line))
      except ValueError:
        pass  # a line being written
    return rows

  def poll():
    rows = read_metrics()
    losses = [(l["step"], l["train/loss"]) for l in rows if "train/loss" in l]
    sps = [
        l["perf/steps_per_second"] for l in rows if "perf/steps_per_second" in l
    ]
    first = [
        l["perf/first_step_seconds"]
        for l in rows
        if "perf/first_step_seconds" in l
    ]
    with _LOCK:
      tr["progress"] = {
          "at_s": round(elapsed(), 1),
          "last_step": losses[-1][0] if losses else 0,
          "loss_curve": losses,
          "steps_per_second": sps[-1] if sps else None,
          "first_step_s": first[0] if first else None,
      }
    if metrics_path.is_file():
      shutil.copy(metrics_path, OUT / "metrics.jsonl")

  _STATE["poll"] = poll
  log(
      f"training run: {steps} steps of {name} on the cached patients, "
      f"{FLAGS.workers} grain workers ..."
  )
  t0 = time.time()
  try:
    summary = train.train_and_evaluate(config, workdir)
  finally:
    _STATE["poll"] = None
    poll()
  wall = time.time() - t0
  rows = read_metrics()
  losses = [(l["step"], l["train/loss"]) for l in rows if "train/loss" in l]
  sps = [
      l["perf/steps_per_second"] for l in rows if "perf/steps_per_second" in l
  ]
  first = [
      l["perf/first_step_seconds"]
      for l in rows
      if "perf/first_step_seconds" in l
  ]
  step_s = 1.0 / sps[-1] if sps else None
  mem = _memory_stats()
  tr.update(
      compile_and_first_step_s=first[0] if first else None,
      seconds_per_step=step_s,
      seconds_per_step_note="mean over steps 2..N with the grain pipeline "
      "(last perf/steps_per_second)",
      loss_curve=losses,
      validation={
          k: summary.get(k)
          for k in (
              "checkpoint_step",
              "dose_score",
              "dvh_score",
              "num_patients",
              "baseline_mean_dose_score",
              "baseline_mean_dvh_score",
          )
      },
      patients={"train": None, "validation": summary.get("num_patients")},
      wall_s=wall,
      process_peak_gib_after=mem.get("peak_bytes_in_use"),
      process_memory_after=mem,
      memory_note="process peak since start (JAX cannot reset it); the same "
      "executable as phase 3 plus the evaluation forward",
  )
  try:
    from randose_jax.data import cache as cache_lib  # pylint: disable=g-import-not-at-top

    tr["patients"]["train"] = len(
        cache_lib.open_cache(
            pathlib.Path(config.data.cache_dir) / config.data.train_split,
            config.data,
        )
    )
  except Exception:  # pylint: disable=broad-except
    pass
  if step_s and first:
    tr["overhead_s"] = wall - first[0] - (steps - 1) * step_s
  derive(tr, tflop, step_s, peak)
  tr.pop("progress", None)
  for name_ in ("metrics.jsonl", "validation_scores.json"):
    if (workdir / name_).is_file():
      shutil.copy(workdir / name_, OUT / name_)
  log(
      f"training run: {steps} steps in {wall:.0f} s, {_fmt(step_s, '.3f')} "
      f"s/step; validation dose score {summary['dose_score']:.3f}, DVH "
      f"{summary['dvh_score']:.3f} (baseline "
      f"{summary['baseline_mean_dose_score']:.3f} / "
      f"{summary['baseline_mean_dvh_score']:.3f})"
  )


# ------------------------------------------------------------------ main
def main(argv):
  del argv
  global OUT
  if FLAGS.torch_child_out:
    torch_child(pathlib.Path(FLAGS.torch_child_out))
    return
  # orbax's INFO lines would push the phase lines out of the device tool's
  # 12,000-character output tail.
  from randose_jax import logs  # pylint: disable=g-import-not-at-top

  logs.quiet_library_logs()
  OUT = pathlib.Path(FLAGS.out or os.environ.get("OUT") or "gpu_out").resolve()
  OUT.mkdir(parents=True, exist_ok=True)
  jax_variants = [v.strip() for v in FLAGS.jax_variants if v.strip()]
  torch_variants = [v.strip() for v in FLAGS.torch_variants if v.strip()]
  for v in jax_variants + torch_variants:
    parse_variant(v)  # fail before any work
  for v in torch_variants:
    if parse_variant(v)[2] != "auto":
      raise ValueError(f"--torch_variants {v!r}: the twin has no FFT path")
  tmp_root = pathlib.Path(
      tempfile.mkdtemp(prefix="randose_gpu_run_", dir=_fast_tmp())
  )
  _STATE["tmp_root"] = tmp_root
  cache_dir = tmp_root / "jax_cache"  # fresh per run: honest compile times
  if not FLAGS.preallocate:
    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  if FLAGS.xla_flags:
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " " + FLAGS.xla_flags
    ).strip()

  # -------------------------------------------------- 0: card, versions
  import common  # pylint: disable=g-import-not-at-top

  card, card_line = card_info()
  RESULTS.update(
      status="running",
      card=card or None,
      nvidia_smi=card_line,
      budget_s=FLAGS.budget_s,
      argv=sys.argv[1:],
      machine=common.machine_info(),
      settings={
          "variant": FLAGS.variant,
          "jax_variants": jax_variants,
          "torch_variants": torch_variants,
          "phases": FLAGS.phases,
          "workers": FLAGS.workers,
          "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
          "XLA_PYTHON_CLIENT_PREALLOCATE": os.environ.get(
              "XLA_PYTHON_CLIENT_PREALLOCATE"
          ),
          "compilation_cache_dir": str(cache_dir),
          "workdir": str(tmp_root),
      },
  )
  write()
  threading.Thread(target=_watchdog, daemon=True).start()
  threading.Thread(target=_ticker, daemon=True).start()
  log(f"card: {card_line}; budget {FLAGS.budget_s:.0f} s; out {OUT}")
  n_early = max(1, FLAGS.before_train)
  log(
      "plan: matmul peak ~15 s; torch twin ~40-90 s (cap "
      f"{FLAGS.torch_timeout_s:.0f} s); JAX {jax_variants[:1]} ~45 s, then "
      f"{jax_variants[1:n_early]} if they fit; training run budget-driven "
      f"(fastest of those if >= 1.5x: {FLAGS.train_fastest}); JAX "
      f"{jax_variants[n_early:]} ~{FLAGS.later_compile_est_s:.0f} s each if "
      "they fit"
  )

  # -------------------------------------- 1: JAX, FLOPs, matmul peak
  flops, peak = {}, None
  with phase("1 JAX start-up, FLOPs, matmul peak", "matmul_peak"):
    import jax  # pylint: disable=g-import-not-at-top

    jax.config.update("jax_compilation_cache_dir", str(cache_dir))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    events = {}

    def on_event(event, **kwargs):
      del kwargs
      if "cache" in event:
        with _LOCK:
          events[event] = events.get(event, 0) + 1

    try:
      jax.monitoring.register_event_listener(on_event)
    except Exception:  # pylint: disable=broad-except
      pass
    _STATE["cache_events"] = events
    backend = jax.default_backend()
    device = jax.devices()[0]
    if not card:
      card = f"{device.device_kind} ({backend})"
      RESULTS["card"] = card
    RESULTS.update(
        backend=backend,
        jax_devices=[str(d) for d in jax.devices()],
        device_kind=device.device_kind,
        jax_default_matmul_precision=str(
            jax.config.jax_default_matmul_precision
        ),
    )
    from randose_jax import models  # pylint: disable=g-import-not-at-top
    from randose_jax.models import costs as summary_lib  # pylint: disable=g-import-not-at-top

    try:  # no FLOP count costs the TFLOP/s figures, not the phase
      for name in dict.fromkeys(jax_variants + torch_variants):
        config = load_config(name)
        grid = 128 // config.data.downsample
        # The network's math whatever computes its convs (as summary.py
        # counts it): direct convs, whose ops the jaxpr shows.
        config.model.conv_impl = "direct"
        model = models.create_model(config.model)
        inputs = summary_lib.abstract_inputs((grid,) * 3)
        params = summary_lib.abstract_params(model, inputs)
        flops[name] = (
            summary_lib.conv_flops(
                lambda p, x, m=model: m.apply({"params": p}, x), params, inputs
            )
            / 1e9
        )
    except Exception as e:  # pylint: disable=broad-except
      traceback.print_exc()
      RESULTS["flops_error"] = f"{type(e).__name__}: {e}"[:2000]
    RESULTS["analytic_conv_gflops_fwd_per_sample"] = flops
    RESULTS["flops_basis"] = (
        "conv FLOPs of the network computed with direct convolutions; for "
        "the _fft variants TFLOP/s and fraction of peak are therefore "
        "direct-conv-equivalent rates (the FFT path does far fewer FLOPs)"
    )
    log(f"analytic conv GFLOPs per sample (forward): {flops}")
    if "matmul" in FLAGS.phases:
      import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

      n = FLAGS.matmul_n or (8192 if backend == "gpu" else 1024)
      a = jax.random.normal(jax.random.key(0), (n, n), jnp.bfloat16)
      b = jax.random.normal(jax.random.key(1), (n, n), jnp.bfloat16)
      f = jax.jit(lambda a, b: a @ b)
      f(a, b).block_until_ready()
      reps, best = 10, []
      for _ in range(3):
        t = time.perf_counter()
        for _ in range(reps):
          c = f(a, b)
        c.block_until_ready()
        best.append(2 * n**3 * reps / (time.perf_counter() - t) / 1e12)
      peak = max(best)
      RESULTS["matmul_peak"] = {
          "card": card,
          "bf16_tflops": peak,
          "n": n,
          "reps": reps,
          "trials_tflops": best,
          "how": "JAX a @ b, random bf16, best of 3 means of 10",
      }
      del a, b, c
      log(f"bf16 matmul peak: {peak:.1f} TFLOP/s ({n}^3)")

  # ---------------------------------------------------- 2: torch twin
  if "torch" in FLAGS.phases and torch_variants:
    with phase("2 PyTorch twin", "torch_twin"):
      child_out = tmp_root / "torch_child.json"
      timeout = max(10.0, min(FLAGS.torch_timeout_s, left() - 60))
      cmd = [
          sys.executable,
          str(pathlib.Path(__file__).resolve()),
          f"--torch_child_out={child_out}",
          f"--variant={FLAGS.variant}",
          f"--torch_variants={','.join(torch_variants)}",
          f"--torch_steps={FLAGS.torch_steps}",
          f"--torch_warmup={FLAGS.torch_warmup}",
      ]
      log(f"torch child (timeout {timeout:.0f} s): {' '.join(cmd[2:])}")
      child = subprocess.Popen(cmd)
      _STATE["child"] = child
      try:
        rc = child.wait(timeout=timeout)
        status = f"exit code {rc}"
      except subprocess.TimeoutExpired:
        child.kill()
        child.wait()
        status = f"killed after its {timeout:.0f} s cap"
      _STATE["child"] = None
      got = json.loads(child_out.read_text()) if child_out.is_file() else {}
      twin = {"child": status}
      for name in torch_variants:
        r = got.get(name, f"no result ({status})")
        if isinstance(r, dict):
          r["card"] = r.get("gpu") or card
          grid = r.get("grid")
          derive(
              r,
              train_tflop(flops, name, r["batch"]),
              r["ms_per_step"] / 1e3,
              peak,
          )
          log(
              f"torch twin {name}: {r['ms_per_step']:.1f} ms/step, "
              f"{r.get('achieved_tflops', 0):.1f} TFLOP/s, {grid}^3"
          )
        twin[name] = r
      RESULTS["torch_twin"] = twin

  # ---------------------- 3: JAX, the first --before_train variants
  step_s = None
  order = 0
  early = jax_variants[: max(1, FLAGS.before_train)]
  later = jax_variants[len(early) :]
  if "jax" in FLAGS.phases and jax_variants:
    with phase(
        f"3 JAX train step {jax_variants[0]}",
        ("jax_train_step", jax_variants[0]),
    ):
      before = _diff(_STATE["cache_events"], {})
      order += 1
      r = time_jax_variant(jax_variants[0], flops, peak, order)
      r["compilation_cache_events"] = _diff(_STATE["cache_events"], before)
      # The run goes at the slower of the device step and the host side.
      step_s = max(r["ms_per_step"] / 1e3, r.get("host_s_per_batch") or 0)
    for name in early[1:]:
      _time_later_variant(name, flops, peak, order + 1, "3")
      order += 1

  # ----------------------------------------------- 4: the training run
  if "train" in FLAGS.phases and jax_variants:
    name = jax_variants[0]
    timed = RESULTS.get("jax_train_step", {})
    name, step_s, extra_overhead, chosen = pick_training_variant(
        jax_variants[0], early, timed, step_s, FLAGS.train_fastest
    )
    rest = list(later) if "jax_rest" in FLAGS.phases else []
    first_compile = (timed.get(jax_variants[0]) or {}).get("compile_s") or 30.0
    per_rest = max(FLAGS.later_compile_est_s, 4 * first_compile) + 15
    reserve = per_rest * len(rest) + 10
    overhead = FLAGS.train_overhead_s + extra_overhead
    if FLAGS.train_steps:
      steps, keep, why = FLAGS.train_steps, True, "--train_steps"
    else:
      steps, keep, why = plan_train_steps(
          left() - 5,
          step_s or FLAGS.fallback_step_s,
          reserve,
          overhead,
          FLAGS.step_margin,
          FLAGS.min_train_steps,
          FLAGS.max_train_steps,
      )
    plan = {
        "steps": steps,
        "why": why,
        "variant": name,
        "variant_choice": chosen,
        "reserve_s_for_later_variants": reserve,
        "reserve_kept": keep,
        "step_s_assumed": step_s or FLAGS.fallback_step_s,
        "step_margin": FLAGS.step_margin,
        "overhead_s_assumed": overhead,
        "left_s_at_plan": round(left(), 1),
    }
    log(f"training plan: {plan}")
    if steps <= 0:
      RESULTS["training_run"] = {"skipped": why, "plan": plan}
      write()
    else:
      with phase(f"4 training run {name}, {steps} steps", "training_run"):
        before = _diff(_STATE["cache_events"], {})
        order += 1
        training_run(name, steps, flops, peak, tmp_root / "train", order, plan)
        RESULTS["training_run"]["compilation_cache_events"] = _diff(
            _STATE["cache_events"], before
        )
      gc.collect()  # the run's state and grain workers
      shutil.rmtree(tmp_root / "train", ignore_errors=True)  # checkpoints

  # ------------------------------------------ 5: the remaining variants
  if "jax_rest" in FLAGS.phases:
    for name in later:
      order += 1
      _time_later_variant(name, flops, peak, order, "5")

  with _LOCK:
    RESULTS["status"] = "complete" + (
        f" with {len(RESULTS['errors'])} failed phase(s)"
        if RESULTS.get("errors")
        else ""
    )
  write()
  log("done")
  print("\n" + markdown(RESULTS), flush=True)
  if not FLAGS.keep_tmp:
    shutil.rmtree(tmp_root, ignore_errors=True)


def _time_later_variant(name, flops, peak, order, phase_number):
  """Times one more JAX variant if the budget still holds its estimate."""
  first_compile = (
      RESULTS.get("jax_train_step", {}).get(FLAGS.jax_variants[0]) or {}
  ).get("compile_s") or 30.0
  need = max(FLAGS.later_compile_est_s, 4 * first_compile) + 15
  if left() < need:
    RESULTS.setdefault("jax_train_step", {})[name] = (
        f"skipped: {left():.0f} s left, about {need:.0f} s needed "
        "(compile estimate + steps)"
    )
    log(f"JAX {name}: {RESULTS['jax_train_step'][name]}")
    write()
    return
  with phase(f"{phase_number} JAX train step {name}", ("jax_train_step", name)):
    before = _diff(_STATE["cache_events"], {})
    r = time_jax_variant(name, flops, peak, order)
    r["compilation_cache_events"] = _diff(_STATE["cache_events"], before)


def _diff(now: dict, before: dict) -> dict:
  """Compilation-cache events (requests, hits, misses) since `before`."""
  with _LOCK:
    now = dict(now)
  return {
      k: v - before.get(k, 0) for k, v in now.items() if v - before.get(k, 0)
  }


if __name__ == "__main__":
  define_flags()
  app.run(main)
