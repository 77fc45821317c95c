"""Long-run hygiene: 2,000 smoke steps with a checkpoint every 20.

After a warm-up, the training process's open file descriptors, threads, RSS
and the size of its checkpoints folder stay flat (figures printed; run with
`-s` to see them), and `metrics.jsonl` holds each (step, scalar) once.

About 15 minutes on the 2-core development VM, so it is opt-in:
`RANDOSE_SOAK=1 python -m pytest -q -s tests/test_soak.py` (marked `slow`
too). RANDOSE_SOAK_STEPS shortens it for a trial (the assertions need at least
400 steps).
"""

import json
import os
import pathlib
import statistics
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
STEPS = int(os.environ.get("RANDOSE_SOAK_STEPS", "2000"))
SAVE_EVERY = 20
WARM_UP = 200  # steps: first validations, first best saves, allocator growth

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.environ.get("RANDOSE_SOAK"),
        reason="soak test (~15 min): set RANDOSE_SOAK=1",
    ),
]

# Samples the process just before each save of `latest`, once the previous
# save is committed: step, open fds, threads, RSS and checkpoint bytes.
LAUNCHER = r"""
import json, os, runpy, sys, time
from randose_jax import checkpointing
samples = open(os.environ["RANDOSE_SOAK_SAMPLES"], "a")
workdir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
save_latest = checkpointing.Checkpointer.save_latest

def folder_bytes(root):
  total = 0
  for folder, _, files in os.walk(root):
    for name in files:
      total += os.lstat(os.path.join(folder, name)).st_size
  return total

def sampled_save_latest(self, step, *args, **kwargs):
  self.wait()
  with open("/proc/self/status") as f:
    rss_kib = int([l for l in f if l.startswith("VmRSS:")][0].split()[1])
  samples.write(json.dumps(dict(
      step=step, time=time.time(), fds=len(os.listdir("/proc/self/fd")),
      threads=len(os.listdir("/proc/self/task")), rss_mib=rss_kib / 1024,
      checkpoint_bytes=folder_bytes(os.path.join(workdir, "checkpoints")),
      checkpoint_folders=sorted(os.listdir(os.path.join(workdir, "checkpoints", "latest"))))) + "\n")
  samples.flush()
  return save_latest(self, step, *args, **kwargs)

checkpointing.Checkpointer.save_latest = sampled_save_latest
sys.argv = ["randose_jax.cli.train"] + sys.argv[1:]
runpy.run_module("randose_jax.cli.train", run_name="__main__", alter_sys=True)
"""


def test_soak_resources_stay_flat(tmp_path, shared_openkbp):
  assert STEPS >= 2 * WARM_UP, "RANDOSE_SOAK_STEPS must be at least 400"
  workdir, samples_path = tmp_path / "run", tmp_path / "samples.jsonl"
  env = dict(
      os.environ,
      JAX_DISABLE_MOST_OPTIMIZATIONS="true",
      PYTHONUNBUFFERED="1",
      RANDOSE_SOAK_SAMPLES=str(samples_path),
  )
  done = subprocess.run(
      [
          sys.executable,
          "-c",
          LAUNCHER,
          f"--workdir={workdir}",
          "--config=configs/openkbp.py:smoke",
          f"--config.data.root={shared_openkbp}",
          f"--config.num_train_steps={STEPS}",
          f"--config.checkpoint_every_steps={SAVE_EVERY}",
          "--config.eval_every_steps=100",
          "--config.log_every_steps=20",
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=3600,
  )
  assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
  samples = [json.loads(l) for l in samples_path.read_text().splitlines()]
  assert [s["step"] for s in samples] == list(
      range(SAVE_EVERY, STEPS + 1, SAVE_EVERY)
  )
  after = [s for s in samples if s["step"] > WARM_UP]
  first, last = after[: len(after) // 4], after[-(len(after) // 4) :]
  print(
      f"\nsoak: {STEPS} steps in {samples[-1]['time'] - samples[0]['time']:.0f} s "
      f"(from the first save to the last)"
  )
  print("step   fds  threads  RSS MiB  checkpoints KiB")
  for s in samples[:: max(1, len(samples) // 20)] + [samples[-1]]:
    print(
        f"{s['step']:5d} {s['fds']:5d} {s['threads']:8d} {s['rss_mib']:8.1f} "
        f"{s['checkpoint_bytes'] / 1024:16.1f}"
    )

  def spread(key, window):
    values = [s[key] for s in window]
    return min(values), statistics.median(values), max(values)

  for key in ("fds", "threads", "rss_mib", "checkpoint_bytes"):
    print(
        f"{key}: after warm-up min/median/max {spread(key, after)}; first "
        f"quarter {spread(key, first)}, last quarter {spread(key, last)}"
    )
  # Descriptors and threads: a leak of one per save or per validation would
  # add 90 / 18 over the run; the samples are taken at the same point of
  # the loop, so they may differ only by a transient few.
  for key in ("fds", "threads"):
    assert max(s[key] for s in after) - min(s[key] for s in after) <= 4, key
  # RSS: the last quarter's median within 5% (+ 16 MiB) of the first
  # quarter's (allocator noise); a leak of even one 16^3 validation example
  # (~0.2 MiB) per save would be ~18 MiB, of the state per save ~30 MiB.
  growth = spread("rss_mib", last)[1] - spread("rss_mib", first)[1]
  assert growth <= 0.05 * spread("rss_mib", first)[1] + 16, growth
  # Checkpoints: keep=3 latest + 1 best, each the same size; json metadata
  # varies by a few bytes.
  sizes = [s["checkpoint_bytes"] for s in after]
  assert max(sizes) <= 1.1 * min(sizes), (min(sizes), max(sizes))
  assert all(
      len([f for f in s["checkpoint_folders"] if f.isdigit()]) == 3
      for s in after
  )
  checkpoints = workdir / "checkpoints"
  assert sorted(p.name for p in (checkpoints / "latest").iterdir()) == [
      str(STEPS - 2 * SAVE_EVERY),
      str(STEPS - SAVE_EVERY),
      str(STEPS),
  ]
  assert len(list((checkpoints / "best").iterdir())) == 1
  records = [
      json.loads(l)
      for l in (workdir / "metrics.jsonl").read_text().splitlines()
  ]
  pairs = [(r["step"], k) for r in records for k in r if k != "step"]
  assert len(pairs) == len(set(pairs))
