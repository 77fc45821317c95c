"""Is one checkout slower than another? The CPU benchmarks of two trees, taken
in turns in one run.

  python benchmarks/compare_trees.py --old=/path/to/old/checkout \
      [--new=.] [--rounds=2] [--json=benchmarks/results/...json]

Each round runs, for the old tree and then the new one (the order alternates
between rounds), that tree's own `benchmarks/train_step.py` (the
`configs/openkbp.py:bench_cpu` train step, JAX only) and
`benchmarks/inference.py` (one 128^3 patient, paper config, no TTA, JAX
only), each as a subprocess with the tree first on PYTHONPATH and the tree as
working directory. Taking turns in one run keeps the two sides under the same
machine load (this is a shared machine); the median of the rounds is
reported, with every round's figure and the load.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import common  # noqa: E402


def _git_head(tree: pathlib.Path) -> str:
  out = subprocess.run(
      ["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
      capture_output=True,
      text=True,
      check=False,
  )
  return out.stdout.strip() or "unknown (not a git checkout)"


def _run(
    tree: pathlib.Path, script: str, args: list[str], out: pathlib.Path
) -> dict:
  """Runs `tree`/benchmarks/`script` with --json=out; returns the JSON."""
  env = dict(os.environ, PYTHONPATH=str(tree))
  cmd = [sys.executable, f"benchmarks/{script}", *args, f"--json={out}"]
  proc = subprocess.run(
      cmd, cwd=tree, env=env, capture_output=True, text=True, check=False
  )
  if proc.returncode != 0:
    raise RuntimeError(
        f"{' '.join(cmd)} in {tree} failed "
        f"(exit {proc.returncode}):\n{proc.stderr[-3000:]}"
    )
  return json.loads(out.read_text())


def measure(tree: pathlib.Path, tmp: pathlib.Path, tag: str) -> dict:
  """One train-step and one inference figure of `tree`."""
  step = _run(
      tree,
      "train_step.py",
      [
          "--config=configs/openkbp.py:bench_cpu",
          "--no_torch",
          "--rounds=1",
          "--steps=3",
      ],
      tmp / f"step_{tag}.json",
  )
  infer = _run(
      tree,
      "inference.py",
      ["--config=configs/openkbp.py", "--no_torch", "--tta=0", "--repeats=2"],
      tmp / f"infer_{tag}.json",
  )
  return {
      "train_step_s": step["ms_per_step"] / 1e3,
      "train_compile_s": step["compile_s"],
      "inference_s": infer["rows"][0]["s_per_patient"],
      "inference_compile_s": infer["rows"][0]["compile_s"],
      "load": os.getloadavg()[0],
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--old", type=pathlib.Path, required=True)
  p.add_argument("--new", type=pathlib.Path, default=common.ROOT)
  p.add_argument("--rounds", type=int, default=2)
  p.add_argument("--json", type=pathlib.Path, default=None)
  args = p.parse_args(argv)
  trees = {"old": args.old.resolve(), "new": args.new.resolve()}
  for name, tree in trees.items():
    if not (tree / "benchmarks" / "train_step.py").is_file():
      p.error(f"--{name}={tree}: no benchmarks/train_step.py there")

  load_start = list(os.getloadavg())
  runs = {"old": [], "new": []}
  with tempfile.TemporaryDirectory() as tmp:
    for r in range(args.rounds):
      order = ("old", "new") if r % 2 == 0 else ("new", "old")
      for side in order:
        runs[side].append(measure(trees[side], pathlib.Path(tmp), f"{side}{r}"))
        print(f"[round {r}] {side}: {runs[side][-1]}", flush=True)

  keys = (
      "train_step_s",
      "inference_s",
      "train_compile_s",
      "inference_compile_s",
  )
  summary = {
      side: {k: statistics.median(x[k] for x in rs) for k in keys}
      for side, rs in runs.items()
  }
  result = {
      "old": {"tree": str(trees["old"]), "commit": _git_head(trees["old"])},
      "new": {"tree": str(trees["new"]), "commit": _git_head(trees["new"])},
      "rounds": runs,
      "median": summary,
      "new_over_old": {k: summary["new"][k] / summary["old"][k] for k in keys},
      "load_average_start": load_start,
      **common.machine_info(),
  }
  path = args.json or common.default_json_path("compare_trees")
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1) + "\n")
  print(
      f"\nold {result['old']['commit']} vs new {result['new']['commit']}, "
      f"{args.rounds} rounds each, load {load_start[0]:.2f} -> "
      f"{result['load_average'][0]:.2f} (median of the rounds)"
  )
  print(f"{'':<26}{'old':>9}{'new':>9}{'new/old':>9}")
  for k in keys:
    print(
        f"{k:<26}{summary['old'][k]:>9.2f}{summary['new'][k]:>9.2f}"
        f"{result['new_over_old'][k]:>9.3f}"
    )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
