"""SIGKILL during a step, during a latest save and during a best save, then
the same command: the run resumes, loses at most one save interval and ends
exactly where an uninterrupted run ends (scores, predictions, metrics), on
six of the shared OpenKBP patients with the smoke config (model shrunk to two
stages to keep the five processes short).

The kills come from a launcher around `python -m randose_jax.main`, not from
the library: `RANDOSE_TEST_KILL=latest:N` / `best:N` kill the process at the
moment orbax renames the finished temporary folder of that checkpoint into
place (a save that has written everything but is not committed), and
`step:N` kills it while it runs step N + 1, after logging step N's metrics
and once the latest save in flight is committed (saves of `latest` are
asynchronous: a kill within the second or so a save takes to commit loses
that save too, and the run resumes from the one before).
"""

import json
import os
import pathlib
import subprocess
import sys

import pytest

from randose_jax.data import openkbp

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS, SAVE_EVERY = 12, 4
FLAGS = (
    "--config=configs/openkbp.py:smoke",
    f"--config.num_train_steps={STEPS}",
    f"--config.checkpoint_every_steps={SAVE_EVERY}",
    "--config.eval_every_steps=6",
    "--config.log_every_steps=2",
    "--config.model.widths=(4,4)",
    "--config.model.msfe_kernels=(3,5)",
    "--config.model.pi_kernels=(3,)",
)

LAUNCHER = r"""
import os, runpy, signal, sys
kind, _, step = os.environ.get("RANDOSE_TEST_KILL", "").partition(":")

def die():
  sys.stdout.flush()
  os.kill(os.getpid(), signal.SIGKILL)

if kind in ("latest", "best"):
  # orbax commits a save by renaming "<step>.orbax-checkpoint-tmp..." to
  # "<kind>/<step>": die just before, with everything written.
  rename = os.rename
  def killing_rename(src, dst, *args, **kwargs):
    if (".orbax-checkpoint-tmp" in os.path.basename(os.fspath(src)) and
        os.fspath(dst).rstrip("/").endswith(f"/{kind}/{step}")):
      die()
    return rename(src, dst, *args, **kwargs)
  os.rename = killing_rename
elif kind == "step":
  from randose_jax.training import metric_writers
  from randose_jax.training import train
  logged = []
  write = metric_writers.MetricWriter.write_scalars
  def write_scalars(self, s, scalars):
    write(self, s, scalars)
    if s == int(step) and any(k.startswith("train/") for k in scalars):
      logged.append(s)
  metric_writers.MetricWriter.write_scalars = write_scalars
  shard = train.Trainer.shard_batch
  def shard_batch(self, batch):
    if logged:  # the next step's batch is drawn: die inside that step, once
      # the latest save in flight (async, ~1 s here) has been committed.
      import glob, time
      workdir = [a.split("=", 1)[1] for a in sys.argv
                 if a.startswith("--workdir=")][0]
      deadline = time.time() + 120
      while (glob.glob(f"{workdir}/checkpoints/latest/*.orbax-checkpoint-tmp*")
             and time.time() < deadline):
        time.sleep(0.05)
      die()
    return shard(self, batch)
  train.Trainer.shard_batch = shard_batch
sys.argv = ["randose_jax.cli.train"] + sys.argv[1:]
runpy.run_module("randose_jax.cli.train", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def data_flags(tmp_path_factory):
  from tests.conftest import openkbp_dir  # pylint: disable=g-import-not-at-top

  root = openkbp_dir()
  if not (root / "train-pats").is_dir():
    pytest.skip(
        f"shared OpenKBP patients not found at {root} "
        f"(set RANDOSE_OPENKBP_DIR to run this test)"
    )
  # Four training and two validation patients of the shared ones (links):
  # what is checked does not depend on their number, and the first run's
  # cache build and both final validations cost about a third as much.
  subset = tmp_path_factory.mktemp("kill_data")
  for split, n in (("train-pats", 4), ("validation-pats", 2)):
    (subset / split).mkdir()
    for patient in openkbp.list_patient_dirs(root / split)[:n]:
      (subset / split / patient.name).symlink_to(
          patient, target_is_directory=True
      )
  cache = tmp_path_factory.mktemp("kill_cache")  # built once, then shared
  return (f"--config.data.root={subset}", f"--config.data.cache_dir={cache}")


def run(workdir, data_flags, kill=""):
  env = dict(
      os.environ,
      JAX_DISABLE_MOST_OPTIMIZATIONS="true",
      PYTHONUNBUFFERED="1",
      RANDOSE_TEST_KILL=kill,
  )
  done = subprocess.run(
      [
          sys.executable,
          "-c",
          LAUNCHER,
          f"--workdir={workdir}",
          *FLAGS,
          *data_flags,
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
  )
  out = done.stdout + done.stderr
  if kill:
    assert done.returncode == -9, f"not killed at {kill}:\n{out[-3000:]}"
  else:
    assert done.returncode == 0, out[-3000:]
  return out


def resumed_at(out: str):
  lines = [
      l
      for l in out.splitlines()
      if l.startswith("Resuming from checkpoint at step ")
  ]
  return int(lines[-1].split()[5]) if lines else None


def metric_values(workdir) -> list:
  """(step, key, value) of every logged scalar but the timings."""
  records = [
      json.loads(l)
      for l in (workdir / "metrics.jsonl").read_text().splitlines()
  ]
  return [
      (r["step"], k, v)
      for r in records
      for k, v in r.items()
      if k != "step" and not k.startswith("perf/")
  ]


def test_sigkill_in_a_step_and_in_saves_resumes_exactly(tmp_path, data_flags):
  straight = tmp_path / "straight"
  run(straight, data_flags)
  workdir = tmp_path / "killed"
  checkpoints = workdir / "checkpoints"

  # 1. Killed while committing the first best checkpoint (step 6): latest
  # holds step 4.
  out = run(workdir, data_flags, kill="best:6")
  assert resumed_at(out) is None
  assert list((checkpoints / "best").glob("6.orbax-checkpoint-tmp*"))
  assert not (checkpoints / "best" / "6").exists()
  # 2. The same command resumes at 4 (<= one save interval lost); killed
  # while committing latest step 8.
  out = run(workdir, data_flags, kill="latest:8")
  assert resumed_at(out) == 4
  assert list((checkpoints / "latest").glob("8.orbax-checkpoint-tmp*"))
  assert (checkpoints / "best" / "6").is_dir()
  # 3. Resumes at 4 again; killed inside step 11, after logging step 10.
  out = run(workdir, data_flags, kill="step:10")
  assert resumed_at(out) == 4
  assert sorted(
      int(p.name)
      for p in (checkpoints / "latest").iterdir()
      if p.name.isdigit()
  ) == [4, 8]
  # 4. Resumes at 8 and finishes.
  out = run(workdir, data_flags)
  assert resumed_at(out) == 8

  # Where the uninterrupted run ends, exactly (CPU).
  scores = json.loads((workdir / "validation_scores.json").read_text())
  expected = json.loads((straight / "validation_scores.json").read_text())
  for key in (
      "checkpoint_step",
      "dose_score",
      "dvh_score",
      "num_patients",
      "baseline_mean_dose_score",
      "baseline_mean_dvh_score",
  ):
    assert scores[key] == expected[key], key
  predictions = sorted((straight / "predictions" / "validation-pats").iterdir())
  assert predictions
  for path in predictions:
    assert (
        workdir / "predictions" / "validation-pats" / path.name
    ).read_bytes() == path.read_bytes(), path.name
  # metrics.jsonl: what the straight run logged, each (step, key) once.
  assert metric_values(workdir) == metric_values(straight)
  steps = [
      json.loads(l)["step"]
      for l in (workdir / "metrics.jsonl").read_text().splitlines()
  ]
  assert steps == sorted(steps)
