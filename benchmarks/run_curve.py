"""A training run's validation curve, from its own console log and metrics.

  python benchmarks/run_curve.py --workdir=benchmarks/runs/cpu_best \
      --name=C_distances_slab_maskloss --variant="configs/openkbp.py:cpu_best" \
      --json=benchmarks/results/cpu_best_runs_vm.json [--notes=...]

Reads `<workdir>/train.log` (the console, each line prefixed with the Unix
time, as `benchmarks/runs/README.md` runs it; a resumed run's console
appended to the one before) for the wall time of each validation from the
run's first line, the time between sessions left out, and `<workdir>/metrics.jsonl` for the
exact scores; writes (or replaces, by name) one entry of `--json`'s `runs`:
each validation's step, wall_s, dose and DVH score, the best one, the last
one within an hour, and this machine.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))

import common  # noqa: E402

_VALIDATION = re.compile(r"(\d+) step (\d+): validation dose score")
_RESUMING = re.compile(r"^\d+ Resuming from checkpoint at step")


def training_seconds(lines: list[str]) -> list[int]:
  """Each console line's seconds of the run so far: from the first line,
  with the time between sessions left out (a resumed run's console is
  appended to the one before; each "Resuming from checkpoint" line starts a
  new session, which goes on from where the last line before it was)."""
  out, offset, start, last = [], 0, None, None
  for line in lines:
    t = int(line.split()[0])
    if start is None:
      start = t
    elif _RESUMING.search(line):
      offset += last - start
      start = t
    out.append(offset + t - start)
    last = t
  return out


def curve(workdir: pathlib.Path) -> list[dict]:
  """[{step, wall_s, dose_score, dvh_score, num_patients}] in step order."""
  lines = (workdir / "train.log").read_text().splitlines()
  if not lines:
    raise ValueError(f"{workdir / 'train.log'}: empty")
  walls = {}
  for line, wall in zip(lines, training_seconds(lines)):
    m = _VALIDATION.match(line)
    if m:
      walls[int(m[2])] = wall
  evals = []
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    row = json.loads(line)
    if "eval/dose_score" in row and row["step"] in walls:
      evals.append(
          dict(
              step=row["step"],
              wall_s=walls[row["step"]],
              dose_score=row["eval/dose_score"],
              dvh_score=row["eval/dvh_score"],
              num_patients=row["eval/num_patients"],
          )
      )
  if not evals:
    raise ValueError(f"{workdir}: no validation in train.log and metrics.jsonl")
  return sorted(evals, key=lambda e: e["step"])


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", type=pathlib.Path, required=True)
  p.add_argument("--name", required=True)
  p.add_argument("--variant", required=True)
  p.add_argument("--json", type=pathlib.Path, required=True)
  p.add_argument("--num_train_patients", type=int, default=120)
  p.add_argument("--notes", default="")
  p.add_argument(
      "--no_ema",
      dest="ema",
      action="store_false",
      help="the run validated its trained parameters (config.ema_decay=0)",
  )
  args = p.parse_args(argv)
  evals = curve(args.workdir)
  best = min(evals, key=lambda e: e["dose_score"])
  hour = [e for e in evals if e["wall_s"] <= 3600]
  data = (
      json.loads(args.json.read_text())
      if args.json.exists()
      else {"benchmark": "cpu_best_runs", "runs": []}
  )
  data["runs"] = [r for r in data["runs"] if r["name"] != args.name]
  data["runs"].append(
      dict(
          name=args.name,
          variant=args.variant,
          num_train_patients=args.num_train_patients,
          evals=evals,
          steps=evals[-1]["step"],
          wall_s=evals[-1]["wall_s"],
          checkpoint_step=best["step"],
          dose_score=best["dose_score"],
          dvh_score=best["dvh_score"],
          within_one_hour=hour[-1] if hour else None,
          ema=args.ema,
          tta=False,
          num_patients=int(evals[-1]["num_patients"]),
          machine=common.machine_info(),
          notes=args.notes,
      )
  )
  args.json.write_text(json.dumps(data, indent=2) + "\n")
  for e in evals:
    print(
        f"step {e['step']:>6}  {e['wall_s'] / 60:6.1f} min  dose "
        f"{e['dose_score']:.4f}  DVH {e['dvh_score']:.4f}"
    )
  print(f"best: step {best['step']} ({best['dose_score']:.4f})")


if __name__ == "__main__":
  main()
