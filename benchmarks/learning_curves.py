"""Learning curves of several model / recipe variants on the same batches.

Trains each variant from the same seed on the same stream of training
batches (the real `training_batches` pipeline, seeded alike) with the real
`Trainer.jit_train_step`, records the training losses every step and, every
`--eval_every` steps, the validation dose score and DVH score (official
rules, at the patients' own 128^3 grid) of the current parameters. One JSON
(curves + final scores + the mean-dose baseline + machine) and one PNG with
the curves side by side.

  python benchmarks/learning_curves.py --data_root=/data/openkbp \
      --cache_dir=/data/cache --config=configs/openkbp.py:bench_cpu \
      --variants=row1,row5 --steps=300 --eval_every=100 \
      --set=model.widths=4,8,16,32,64 --set=learning_rate=3e-4

A variant is a comma-free name: `rowN`, `lossN` (configs/openkbp.py), or
`name:field=value;field=value` for config overrides (`model.` / `loss.` /
top-level fields), e.g. `--variant=row5_lr1e-3:learning_rate=1e-3` (one
`--variant` per such variant: values may hold commas), or
`name@variant,variant[:field=value;...]`: the config file's named variants
(after those of `--config`), then overrides, under the label `name`, e.g.
`--variant="centre@cpu_best:data.crop_placement='centre'"` next to
`--variants=cpu_proxy,cpu_best` on `--config=configs/openkbp.py`. Variants
run one after another in this process, so wall times are comparable
between them.

A variant with a moving average of the parameters (`config.ema_decay > 0`,
e.g. `--variant=ema:ema_decay=0.999`) is validated as training validates
it, with the EMA (`dose_score`, `dvh_score`), and also with the trained
parameters (`raw_dose_score`, `raw_dvh_score`), so one run measures what
the EMA gains; the plot draws the raw scores dashed (`--skip_raw`: the
EMA only, half the validation time).

A variant with progressive resizing (`data.coarse_steps`, e.g.
`--config=configs/openkbp.py:cpu_best --variants=progressive`) trains its
coarse phase on its own cache of the training patients, as training does.

`--resume` keeps the variants a previous run of the same command finished
(in its `--json` file) and runs the rest: a comparison longer than one
sitting. Each run records the machine at its end (`machine`).
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import json
import pathlib
import sys
import time

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if str(_HERE.parent) not in sys.path:
  sys.path.insert(1, str(_HERE.parent))

import common  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402

from randose_jax.training import train  # noqa: E402
from randose_jax.training import validation  # noqa: E402
from randose_jax.data import cache as cache_lib  # noqa: E402
from randose_jax.data import pipeline  # noqa: E402

LOSS_KEYS = ("loss", "l1_all", "l1_ptv", "l1_oar", "grad_norm")
SYNC_EVERY = 10  # steps between fetches of the metrics (and budget checks)


def _parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    if "," in text:
      return tuple(_parse_value(t) for t in text.split(","))
    return text


def apply_override(config, assignment: str) -> None:
  """`a.b=value` on a ConfigDict; the field must exist (typos are errors)."""
  path, sep, value = assignment.partition("=")
  if not sep:
    raise ValueError(f"override {assignment!r}: expected field=value")
  *parents, leaf = path.strip().split(".")
  node = config
  for p in parents:
    node = getattr(node, p)
  if leaf not in node:
    raise ValueError(f"override {assignment!r}: no config field {path!r}")
  value = _parse_value(value.strip())
  if isinstance(node[leaf], tuple) and not isinstance(value, tuple):
    value = (value,)
  if isinstance(node[leaf], float) and isinstance(value, int):
    value = float(value)
  node[leaf] = value


def variant_config(base_spec: str, variant: str, overrides: list):
  """The config of one variant: base file + variant name or assignments."""
  name, _, assignments = variant.partition(":")
  path, _, base_variants = base_spec.partition(":")
  spec = importlib.util.spec_from_file_location("_cfg", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  named = [v for v in base_variants.split(",") if v]
  label, at, own_variants = name.partition("@")
  if at:  # label@named,variants[:assignments]
    named += [v for v in own_variants.split(",") if v]
    name = label
  elif not assignments:
    named.append(name)
  config = module.get_config(",".join(named))
  for o in overrides:
    apply_override(config, o)
  for a in filter(None, assignments.split(";")):
    apply_override(config, a)
  return name, config


def variant_caches(config, first, first_caches, workdir) -> tuple:
  """(train, validation) caches for `config`: the first variant's when the
  encoding settings agree, else its own (a cache holds each patient
  encoded for one set of settings: grid, geometry channels)."""
  if cache_lib.encoding_settings(config.data) == cache_lib.encoding_settings(
      first.data
  ):
    return tuple(first_caches)
  t = time.time()
  caches = train.prepare_data(config, workdir)[:2]
  print(
      f"  its own caches (other encoding settings) ready in "
      f"{time.time() - t:.1f} s",
      flush=True,
  )
  return caches


# What must agree for a finished variant of an earlier run to be kept.
_RESUME_KEYS = (
    "config",
    "overrides",
    "data_root",
    "num_train_patients",
    "num_eval_patients",
    "settings",
)


def kept_runs(path: pathlib.Path, result: dict, names) -> list:
  """The finished variants of the earlier run in `path` (`--resume`): those
  of `names` run to their end under the same config, data and settings
  (a variant cut short, `in_progress`, runs again). Raises ValueError naming
  the file and the field when the earlier run was another experiment."""
  if not path.is_file():
    return []
  try:
    earlier = json.loads(path.read_text())
  except ValueError as e:
    raise ValueError(f"--resume: {path} is not readable JSON ({e})") from e
  for key in _RESUME_KEYS:
    if earlier.get(key) != result.get(key):
      raise ValueError(
          f"--resume: {path} holds another experiment: its {key} is "
          f"{earlier.get(key)!r}, this run's {result.get(key)!r} (give "
          "another --json, or run without --resume to replace it)"
      )
  return [
      run
      for run in earlier.get("runs", [])
      if run.get("name") in names and not run.get("in_progress")
  ]


def run_variant(
    name,
    config,
    train_cache,
    eval_cache,
    *,
    steps,
    eval_every,
    max_eval_patients,
    budget_s=0.0,
    final_tta=False,
    log=print,
    on_eval=None,
    coarse_cache=None,
    raw_eval=True,
) -> dict:
  """Trains one variant; `on_eval(partial)` sees the run after each eval.
  `coarse_cache`: the coarse phase's patients, for a variant with
  progressive resizing (`data.coarse_steps`). `raw_eval=False`: a variant
  with an EMA is validated with the EMA only (half the validation time)."""
  trainer = train.Trainer.create(config)
  state = trainer.init_state(config.seed)
  ds = pipeline.training_batches(
      train_cache, config, seed=config.seed, coarse_cache=coarse_cache
  )
  it = iter(ds)
  curve = {k: [] for k in LOSS_KEYS}
  evals = []
  t_start = time.time()
  compile_s = None
  train_s = 0.0

  def do_eval(step):
    t = time.time()
    # What training validates: the EMA when the variant keeps one.
    scores = validation.evaluate(
        trainer.predictor.with_params(trainer.eval_params(state)),
        eval_cache,
        max_patients=max_eval_patients,
    )
    entry = {
        "step": step,
        "train_seconds": round(train_s, 2),
        "dose_score": scores["dose_score"],
        "dvh_score": scores["dvh_score"],
    }
    raw_text = ""
    if state.ema_params is not None and raw_eval:
      raw = validation.evaluate(
          trainer.predictor.with_params(state.params["model"]),
          eval_cache,
          max_patients=max_eval_patients,
      )
      entry.update(
          raw_dose_score=raw["dose_score"], raw_dvh_score=raw["dvh_score"]
      )
      raw_text = (
          f" with the EMA; trained parameters {raw['dose_score']:.3f}"
          f" / {raw['dvh_score']:.3f}"
      )
    entry["eval_seconds"] = round(time.time() - t, 2)
    evals.append(entry)
    log(
        f"  [{name}] step {step}: dose score {scores['dose_score']:.3f}, DVH "
        f"score {scores['dvh_score']:.3f}{raw_text} ({train_s:.0f} s of "
        "training)"
    )
    if on_eval is not None:
      on_eval(
          {
              "name": name,
              "in_progress": True,
              "steps": step,
              "train_seconds": round(train_s, 2),
              "wall_seconds": round(time.time() - t_start, 2),
              "curve": curve,
              "evals": evals,
          }
      )

  # As training runs: steps dispatched without waiting, their metrics
  # fetched every SYNC_EVERY steps, so the input pipeline prepares the next
  # batch while the step computes. Training time is the loop's wall time
  # (input included) less the first step (compile) and the validations.
  pending = []
  t_mark = None

  def sync() -> bool:
    """Fetches the pending metrics into the curve; False on a NaN / inf."""
    host = jax.device_get(pending)
    pending.clear()
    for m in host:
      for k in LOSS_KEYS:
        curve[k].append(float(m[k]))
    return all(np.isfinite(m["loss"]) for m in host)

  for step in range(1, steps + 1):
    batch = trainer.shard_batch(next(it))
    state, metrics = trainer.jit_train_step(state, batch)
    pending.append({k: metrics[k] for k in LOSS_KEYS})
    at_eval = bool(eval_every) and step % eval_every == 0
    if compile_s is None or step % SYNC_EVERY == 0 or at_eval:
      finite = sync()
      now = time.time()
      if compile_s is None:
        compile_s = now - t_start
      else:
        train_s += now - t_mark
      t_mark = now
      if not finite:
        log(f"  [{name}] non-finite loss by step {step}; stopping this variant")
        break
    if step % 50 == 0:
      recent = np.mean(curve["l1_ptv"][-50:])
      log(
          f"  [{name}] step {step}: L1 PTV (last 50) {recent:.3f}, L1 all "
          f"{np.mean(curve['l1_all'][-50:]):.4f}"
      )
    if at_eval:
      do_eval(step)
      t_mark = time.time()
    if budget_s and train_s >= budget_s:
      log(
          f"  [{name}] training budget of {budget_s:.0f} s reached at step "
          f"{step}"
      )
      break
  if pending:
    sync()
    train_s += time.time() - t_mark
  train._stop_workers(it)  # pylint: disable=protected-access
  if not evals or evals[-1]["step"] != step:
    do_eval(step)
  extra = {}
  if state.ema_params is not None and raw_eval:
    extra = {
        "final_raw_dose_score": evals[-1]["raw_dose_score"],
        "final_raw_dvh_score": evals[-1]["raw_dvh_score"],
    }
  wall_s = time.time() - t_start
  if final_tta:
    # The final parameters again, with the mean of the four flipped passes
    # (config.eval_tta): what test-time flips gain at validation.
    t = time.time()
    tta = validation.evaluate(
        trainer.predictor.with_params(trainer.eval_params(state)),
        eval_cache,
        tta=True,
        max_patients=max_eval_patients,
    )
    extra.update(
        final_tta_dose_score=tta["dose_score"],
        final_tta_dvh_score=tta["dvh_score"],
        final_tta_eval_seconds=round(time.time() - t, 2),
    )
    log(
        f"  [{name}] step {step} with test-time flips: dose score "
        f"{tta['dose_score']:.3f}, DVH score {tta['dvh_score']:.3f}"
    )
  return {
      "name": name,
      "model": config.model.to_dict(),
      "learning_rate": config.learning_rate,
      "loss": config.loss.to_dict(),
      "steps": step,
      "compile_seconds": round(compile_s or 0.0, 2),
      "train_seconds": round(train_s, 2),
      # Steps after the first (which compiles) per second of training.
      "steps_per_second": round((step - 1) / train_s, 4) if train_s else None,
      "wall_seconds": round(wall_s, 2),
      "curve": curve,
      "evals": evals,
      "budget_seconds": budget_s,
      "final_dose_score": evals[-1]["dose_score"],
      "final_dvh_score": evals[-1]["dvh_score"],
      # The scores above are the EMA's when ema_decay > 0 (as training's).
      "ema_decay": train.ema_decay_of(config),
      **extra,
  }


def plot(result: dict, path: pathlib.Path, window: int = 20) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
  for run in result["runs"]:
    l1 = np.asarray(run["curve"]["l1_ptv"])
    if len(l1) >= window:
      smooth = np.convolve(l1, np.ones(window) / window, mode="valid")
      axes[0].plot(np.arange(window, len(l1) + 1), smooth, label=run["name"])
    steps = [e["step"] for e in run["evals"]]
    axes[1].plot(
        steps, [e["dose_score"] for e in run["evals"]], "o-", label=run["name"]
    )
    axes[2].plot(
        steps, [e["dvh_score"] for e in run["evals"]], "o-", label=run["name"]
    )
    if "final_raw_dose_score" in run:
      for ax, key in ((axes[1], "raw_dose_score"), (axes[2], "raw_dvh_score")):
        ax.plot(
            steps,
            [e[key] for e in run["evals"]],
            "x--",
            label=f"{run['name']} (trained params, no EMA)",
        )
  base = result["baseline"]
  axes[1].axhline(
      base["dose_score"], color="gray", ls="--", label="mean-dose baseline"
  )
  axes[2].axhline(
      base["dvh_score"], color="gray", ls="--", label="mean-dose baseline"
  )
  axes[0].set(
      title=f"training L1 over the PTVs (mean of {window} steps)",
      xlabel="step",
      ylabel="target units (x70 Gy)",
  )
  axes[1].set(title="validation dose score", xlabel="step", ylabel="Gy")
  axes[2].set(title="validation DVH score", xlabel="step", ylabel="Gy")
  for ax in axes:
    ax.grid(alpha=0.3)
    if ax.get_legend_handles_labels()[0]:  # a run too short for a curve: none
      ax.legend(fontsize=8)
  fig.suptitle(result["title"], fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/openkbp.py:bench_cpu")
  p.add_argument(
      "--data_root",
      required=True,
      help="folder with train-pats/ and validation-pats/",
  )
  p.add_argument(
      "--cache_dir",
      default="",
      help="where the encoded caches go (default: under /tmp)",
  )
  p.add_argument(
      "--variants",
      default="",
      help="comma-separated variant names (default row1,row5)",
  )
  p.add_argument(
      "--variant",
      action="append",
      default=[],
      help="one variant, may hold commas (repeatable)",
  )
  p.add_argument(
      "--set",
      action="append",
      default=[],
      help="field=value applied to every variant",
  )
  p.add_argument("--steps", type=int, default=300)
  p.add_argument(
      "--budget_s",
      type=float,
      default=0.0,
      help="also stop a variant after this many seconds of training (wall "
      "time, input included; the first step's compile and the validations "
      "not counted)",
  )
  p.add_argument("--eval_every", type=int, default=100)
  p.add_argument(
      "--num_workers",
      type=int,
      default=1,
      help="input worker processes (config.data.num_workers); 1 gives the "
      "same batches as 0, prepared beside the step as in a training run",
  )
  p.add_argument("--max_eval_patients", type=int, default=0)
  p.add_argument(
      "--final_tta",
      action="store_true",
      help="also score each variant's final parameters with "
      "test-time flips (final_tta_dose_score, 4x an eval)",
  )
  p.add_argument(
      "--skip_raw",
      action="store_true",
      help="validate a variant with an EMA with the EMA only (not also "
      "with the trained parameters): half its validation time",
  )
  p.add_argument(
      "--resume",
      action="store_true",
      help="keep the variants the --json file already holds finished (same "
      "config, data and settings) and run the others: a long comparison "
      "over several sessions",
  )
  p.add_argument("--json", default="")
  p.add_argument("--png", default="")
  args = p.parse_args(argv)

  names = [v for v in args.variants.split(",") if v] + args.variant
  variants = [
      variant_config(args.config, v, args.set)
      for v in names or ["row1", "row5"]
  ]
  first = variants[0][1]
  first.data.root = args.data_root
  first.data.cache_dir = args.cache_dir or "/tmp/randose_learning_cache"
  first.data.num_workers = args.num_workers
  t = time.time()
  train_cache, eval_cache, _ = train.prepare_data(first, pathlib.Path("/tmp"))
  print(
      f"caches ready in {time.time() - t:.1f} s: {len(train_cache)} train, "
      f"{len(eval_cache)} validation patients",
      flush=True,
  )
  baseline = validation.BaselineEvaluator.mean_training_dose(
      eval_cache, train_cache, max_patients=args.max_eval_patients
  ).run()
  print(
      f"mean-dose baseline: dose score {baseline['dose_score']:.3f}, DVH "
      f"score {baseline['dvh_score']:.3f}",
      flush=True,
  )
  result = {
      "benchmark": "learning_curves",
      "config": args.config,
      "overrides": args.set,
      "data_root": args.data_root,
      "num_train_patients": len(train_cache),
      "num_eval_patients": (
          min(len(eval_cache), args.max_eval_patients)
          if args.max_eval_patients
          else len(eval_cache)
      ),
      "baseline": {
          "dose_score": baseline["dose_score"],
          "dvh_score": baseline["dvh_score"],
      },
      "machine": common.machine_info(),
      "settings": {
          "steps": args.steps,
          "budget_s": args.budget_s,
          "eval_every": args.eval_every,
          "max_eval_patients": args.max_eval_patients,
          "final_tta": args.final_tta,
          "raw_eval": not args.skip_raw,
          "num_workers": args.num_workers,
          "timing": "wall, input included, steps async",
      },
      "runs": [],
  }
  grid = 128 // first.data.downsample
  result["title"] = (
      f"{args.config} {' '.join(args.set)}, {grid}^3, "
      f"{len(train_cache)} train / {result['num_eval_patients']}"
      f" validation patients, same batches for every variant"
  )
  stem = (
      pathlib.Path(args.json).with_suffix("")
      if args.json
      else common.RESULTS_DIR
      / f"learning_curves_{common.machine_info()['hostname']}"
  )
  kept = {}
  if args.resume:
    kept = {
        run["name"]: run
        for run in kept_runs(
            pathlib.Path(f"{stem}.json"), result, [n for n, _ in variants]
        )
    }
  for name, config in variants:
    if name in kept:
      print(f"variant {name}: kept from {stem}.json (--resume)", flush=True)
      result["runs"].append(kept[name])
      continue
    config.data.root = args.data_root
    config.data.cache_dir = first.data.cache_dir
    config.data.num_workers = args.num_workers
    # A schedule (lr_schedule='cosine') spans this run's --steps; a run cut
    # by --budget_s stops before its end.
    config.num_train_steps = args.steps
    caches = variant_caches(
        config, first, (train_cache, eval_cache), pathlib.Path("/tmp")
    )
    coarse_cache = train.prepare_coarse_data(config, pathlib.Path("/tmp"))
    decay = train.ema_decay_of(config)
    print(
        f"variant {name}: widths {tuple(config.model.widths)}, lr "
        f"{config.learning_rate}"
        f"{f', validated with the EMA (decay {decay:g})' if decay else ''}",
        flush=True,
    )

    def write_partial(partial, done=tuple(result["runs"])):
      # After every validation: a run cut short (machine gone, killed)
      # still leaves its curve so far, marked in_progress.
      stem.parent.mkdir(parents=True, exist_ok=True)
      snapshot = dict(result, runs=[*done, partial])
      pathlib.Path(f"{stem}.json").write_text(json.dumps(snapshot) + "\n")

    run = run_variant(
        name,
        config,
        *caches,
        steps=args.steps,
        eval_every=args.eval_every,
        budget_s=args.budget_s,
        final_tta=args.final_tta,
        max_eval_patients=args.max_eval_patients,
        on_eval=write_partial,
        coarse_cache=coarse_cache,
        raw_eval=not args.skip_raw,
    )
    # The keys of a run's validation_scores.json, for this variant's end.
    run.update(
        config=f"{args.config} {name}",
        dose_score=run["final_dose_score"],
        dvh_score=run["final_dvh_score"],
        ema=run["ema_decay"] > 0,
        num_patients=result["num_eval_patients"],
        baseline_mean_dose_score=baseline["dose_score"],
        baseline_mean_dvh_score=baseline["dvh_score"],
        num_train_patients=len(train_cache),
        wall_s=run["wall_seconds"],
        machine=common.machine_info(),
    )
    result["runs"].append(run)
    result["machine_end"] = common.machine_info()
    stem.parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(f"{stem}.json").write_text(json.dumps(result) + "\n")
    plot(result, pathlib.Path(args.png or f"{stem}.png"))
  print(
      "\nvariant       steps  train s  steps/s  dose   DVH   (baseline "
      f"{baseline['dose_score']:.2f} / {baseline['dvh_score']:.2f})"
  )
  for run in result["runs"]:
    raw = (
        f"  (EMA; trained parameters {run['final_raw_dose_score']:.2f} / "
        f"{run['final_raw_dvh_score']:.2f})"
        if "final_raw_dose_score" in run
        else ""
    )
    print(
        f"{run['name']:<13} {run['steps']:>5} {run['train_seconds']:>8.0f} "
        f"{run['steps_per_second'] or 0:8.3f} {run['final_dose_score']:6.2f} {run['final_dvh_score']:6.2f}{raw}"
    )
  print(f"wrote {stem}.json and {args.png or f'{stem}.png'}")


if __name__ == "__main__":
  main()
