"""A shared workstation and a cluster: one run per workdir, Ctrl-C and
SIGTERM (preemption), a full disk during a checkpoint save.

Real `python -m randose_jax.main` processes on `configs/demo.py:smoke`
phantoms (16^3, a 2-stage model: each run is a few seconds once compiled).
The signals come from this test, sent to the process group as a terminal
or a scheduler sends them, at the points the launcher marks: it writes a
marker file when the run reaches a point (first step = the compile, a
logged step, a checkpoint save, a validation, the final predictions) and,
where the point would otherwise pass too quickly, holds the run there until
the signal has arrived (`interrupts.requested()`), then lets it go on.
"""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from randose_jax.training import runlock
from tests.test_train import REPO, SUBPROCESS_ENV

DEMO = str(REPO / "configs" / "demo.py")
FLAGS = (
    f"--config={DEMO}:smoke",
    "--config.num_train_steps=12",
    "--config.checkpoint_every_steps=4",
    "--config.eval_every_steps=6",
    "--config.log_every_steps=2",
)

# Input worker processes (grain): they too receive the group's signals.
WORKERS = ("--config.data.num_workers=2",)

LAUNCHER = r"""
import os, runpy, sys, time
point, _, arg = os.environ["RANDOSE_TEST_POINT"].partition(":")
marker = os.environ["RANDOSE_TEST_MARKER"]
from randose_jax import interrupts

def mark(hold):
  open(marker, "w").close()
  deadline = time.time() + 60
  while hold and not interrupts.requested() and time.time() < deadline:
    time.sleep(0.02)

if point == "compile":  # the first step's batch: its compile comes next
  from randose_jax.training import train
  shard = train.Trainer.shard_batch
  def shard_batch(self, batch, _done=[]):
    if not _done:
      _done.append(1)
      mark(hold=False)
    return shard(self, batch)
  train.Trainer.shard_batch = shard_batch
elif point == "step":  # after step N is logged
  from randose_jax.training import metric_writers
  write = metric_writers.MetricWriter.write_scalars
  def write_scalars(self, s, scalars):
    write(self, s, scalars)
    if s == int(arg) and any(k.startswith("train/") for k in scalars):
      mark(hold=True)
  metric_writers.MetricWriter.write_scalars = write_scalars
elif point == "save":  # orbax committing latest/N
  rename = os.rename
  def held_rename(src, dst, *args, **kwargs):
    if (".orbax-checkpoint-tmp" in os.path.basename(os.fspath(src)) and
        os.fspath(dst).rstrip("/").endswith(f"/latest/{arg}")):
      mark(hold=True)
    return rename(src, dst, *args, **kwargs)
  os.rename = held_rename
elif point == "validation":
  from randose_jax.training import validation
  run = validation.ModelEvaluator.run
  def held_run(self, predictor):
    mark(hold=True)
    return run(self, predictor)
  validation.ModelEvaluator.run = held_run
elif point == "final":  # after the first final prediction CSV
  from randose_jax.data import openkbp
  write = openkbp.write_prediction_csv
  def held_write(path, *args, **kwargs):
    out = write(path, *args, **kwargs)
    if ".randose-staging-final" in str(path):
      mark(hold=True)
    return out
  openkbp.write_prediction_csv = held_write
elif point == "fill":  # before step N, once the saves are committed
  import glob
  from randose_jax.training import train
  shard = train.Trainer.shard_batch
  workdir = [a.split("=", 1)[1] for a in sys.argv if a.startswith("--workdir=")][0]
  def filling_shard_batch(self, batch, _calls=[]):
    _calls.append(1)
    if len(_calls) == int(arg):
      deadline = time.time() + 60
      while (glob.glob(f"{workdir}/checkpoints/*/*.orbax-checkpoint-tmp*")
             and time.time() < deadline):
        time.sleep(0.05)
      with open(os.path.join(workdir, "filler"), "wb") as f:
        try:
          while True:
            f.write(b"\0" * 65536)
            f.flush()
        except OSError:
          pass
      open(marker, "w").close()
    return shard(self, batch)
  train.Trainer.shard_batch = filling_shard_batch
# Where an error line came from, for a failing test's message.
from randose_jax.cli import common as cli
import traceback
error_line = cli.error_line
def traced_error_line(e):
  with open(marker + ".traceback", "a") as f:
    traceback.print_exception(e, file=f)
  return error_line(e)
cli.error_line = traced_error_line
sys.argv = ["randose_jax.cli.train"] + sys.argv[1:]
runpy.run_module("randose_jax.cli.train", run_name="__main__", alter_sys=True)
"""


def start(workdir, point="", marker=None, extra=()):
  env = dict(
      SUBPROCESS_ENV,
      RANDOSE_TEST_POINT=point or "none",
      RANDOSE_TEST_MARKER=str(marker or os.devnull),
  )
  return subprocess.Popen(
      [sys.executable, "-c", LAUNCHER, f"--workdir={workdir}", *FLAGS, *extra],
      cwd=REPO,
      env=env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
      start_new_session=True,  # its own process group, as a terminal's job
  )


def interrupt_at(workdir, tmp_path, point, sig, extra=()):
  """Runs until `point`, sends `sig` to the process group; returns (exit
  status, stdout, stderr, seconds from the signal to the exit)."""
  marker = tmp_path / f"marker-{point.replace(':', '-')}"
  marker.unlink(missing_ok=True)
  proc = start(workdir, point, marker, extra)
  deadline = time.time() + 300
  while not marker.exists():
    if proc.poll() is not None or time.time() > deadline:
      out, err = proc.communicate()
      pytest.fail(f"{point} never reached:\n{out[-2000:]}\n{err[-3000:]}")
    time.sleep(0.02)
  sent = time.time()
  os.killpg(proc.pid, sig)
  out, err = proc.communicate(timeout=120)
  return proc.returncode, out, err, time.time() - sent


def latest_steps(workdir) -> list:
  folder = workdir / "checkpoints" / "latest"
  return sorted(int(p.name) for p in folder.iterdir() if p.name.isdigit())


def one_line(err: str) -> str:
  lines = err.splitlines()
  assert len(lines) == 1, err[-3000:]
  return lines[0]


def test_signals_stop_training_at_each_point_and_the_run_resumes(tmp_path):
  workdir = tmp_path / "run"
  # 1. Ctrl-C as step 2 is logged (input workers on): the run stops at
  # the boundary after step 2 and saves it.
  code, out, err, took = interrupt_at(
      workdir, tmp_path, "step:2", signal.SIGINT, WORKERS
  )
  assert code == 130, err[-3000:]
  line = one_line(err)  # no worker tracebacks, no leaked shared memory
  assert line == (
      "interrupted at step 2; checkpoint saved (step 2); run the same "
      "command to resume"
  ), line
  assert took < 60
  assert latest_steps(workdir) == [2]
  assert not (workdir / runlock.LOCK_NAME).exists()

  # 2. Ctrl-C as the validation of step 6 starts: stopped inside it, the
  # step saved.
  code, out, err, took = interrupt_at(
      workdir, tmp_path, "validation", signal.SIGINT, WORKERS
  )
  assert "Resuming from checkpoint at step 2" in out
  assert code == 130, err[-3000:]
  assert one_line(err).startswith("interrupted at step 6; checkpoint saved")
  assert 6 in latest_steps(workdir)
  assert took < 60

  # 3. SIGTERM while orbax commits latest/8 (in its thread): the training
  # thread goes on to the next step boundary and saves that step.
  code, out, err, took = interrupt_at(
      workdir, tmp_path, "save:8", signal.SIGTERM, WORKERS
  )
  assert "Resuming from checkpoint at step 6" in out
  # The validation cut short at step 6 ran first, as the first run would
  # have done (the best checkpoint may be that step's).
  assert "step 6: validation dose score" in out
  assert code == 143, err[-3000:]
  line = one_line(err)
  stopped = int(line.split()[3].rstrip(";"))
  assert line == (
      f"interrupted at step {stopped}; checkpoint saved (step {stopped}); "
      "run the same command to resume"
  ), line
  assert 8 in latest_steps(workdir) and stopped in latest_steps(workdir)
  assert took < 60

  # 4. Ctrl-C during the final predictions: none of them is written.
  code, out, err, took = interrupt_at(
      workdir, tmp_path, "final", signal.SIGINT, WORKERS
  )
  assert code == 130, err[-3000:]
  assert one_line(err).startswith("interrupted during the final validation")
  assert not (workdir / "predictions").exists()
  assert not (workdir / "validation_scores.json").exists()

  # 5. The same command finishes the run.
  proc = start(workdir, extra=WORKERS)
  out, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]
  assert err == "", err[-3000:]
  scores = json.loads((workdir / "validation_scores.json").read_text())
  assert scores["num_patients"] == 2
  assert sorted(
      p.name for p in (workdir / "predictions" / "validation-pats").iterdir()
  ) == ["pt_5.csv", "pt_6.csv"]
  assert not list((workdir / "predictions").glob(".randose-staging*"))
  # metrics.jsonl: each (step, key) once, steps in order, over 5 runs.
  records = [
      json.loads(l)
      for l in (workdir / "metrics.jsonl").read_text().splitlines()
  ]
  keys = [(r["step"], k) for r in records for k in r if k != "step"]
  assert len(keys) == len(set(keys))
  steps = [r["step"] for r in records]
  assert steps == sorted(steps)


def test_ctrl_c_during_the_first_compile(tmp_path):
  workdir = tmp_path / "run"
  code, out, err, took = interrupt_at(
      workdir, tmp_path, "compile", signal.SIGINT
  )
  assert code == 130, err[-3000:]
  line = one_line(err)
  assert line.startswith("interrupted at step 1; checkpoint saved"), line
  assert latest_steps(workdir) == [1]
  assert took < 60


def test_a_second_ctrl_c_exits_at_once(tmp_path):
  marker = tmp_path / "marker"
  script = (
      "import time\n"
      "from randose_jax import interrupts\n"
      "with interrupts.deferred():\n"
      f"  open({str(marker)!r}, 'w').close()\n"
      "  time.sleep(120)\n"
  )
  proc = subprocess.Popen(
      [sys.executable, "-c", script],
      env=SUBPROCESS_ENV,
      stderr=subprocess.PIPE,
      text=True,
  )
  while not marker.exists():
    assert proc.poll() is None
    time.sleep(0.02)
  proc.send_signal(signal.SIGINT)  # recorded; the sleep goes on
  time.sleep(0.5)
  assert proc.poll() is None
  proc.send_signal(signal.SIGINT)
  _, err = proc.communicate(timeout=30)
  assert proc.returncode == 130
  assert err == "interrupted again: exiting now\n"


def test_a_second_run_in_the_workdir_is_refused(tmp_path):
  workdir = tmp_path / "run"
  with runlock.RunLock(workdir):
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "randose_jax.cli.train",
            f"--workdir={workdir}",
            *FLAGS,
        ],
        cwd=REPO,
        env=SUBPROCESS_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2, done.stderr[-3000:]
    line = one_line(done.stderr)
    assert line.startswith(f"error: {workdir}: another training run"), line
    assert f"pid {os.getpid()} on host {socket.gethostname()}" in line
    # Nothing touched: no cache, no checkpoints, no phantoms.
    assert sorted(os.listdir(workdir)) == [runlock.LOCK_NAME]
  assert not workdir.exists()  # the lock made it, and removed it


def test_a_lock_dies_with_its_process(tmp_path):
  workdir = tmp_path / "run"
  holder = subprocess.Popen(
      [
          sys.executable,
          "-c",
          "import sys, time\n"
          "from randose_jax.training import runlock\n"
          f"runlock.RunLock({str(workdir)!r}).acquire()\n"
          "print('held', flush=True)\n"
          "time.sleep(120)\n",
      ],
      env=SUBPROCESS_ENV,
      stdout=subprocess.PIPE,
      text=True,
  )
  assert holder.stdout.readline() == "held\n"
  with pytest.raises(runlock.RunLockError, match=f"pid {holder.pid} on host"):
    runlock.RunLock(workdir).acquire()
  holder.kill()
  holder.communicate()
  # The killed run's lock file is still there: taken over.
  assert (workdir / runlock.LOCK_NAME).exists()
  with runlock.RunLock(workdir):
    assert f"pid={os.getpid()}" in (workdir / runlock.LOCK_NAME).read_text()
  assert not (workdir / runlock.LOCK_NAME).exists()


def test_a_full_disk_during_a_checkpoint_save(tmp_path):
  """The workdir on a 4 MB tmpfs (mounted here: needs root), filled up
  before step 7 (latest/4 committed): the save of step 8 fails."""
  mount = tmp_path / "small"
  mount.mkdir()
  done = subprocess.run(
      ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)],
      capture_output=True,
      check=False,
  )
  if done.returncode:
    pytest.skip(f"cannot mount a tmpfs here: {done.stderr!r}")
  try:
    workdir = mount / "run"
    cache = tmp_path / "cache"
    # Few metrics lines (steps 1 and 12): the checkpoint meets the full
    # disk first, mostly (metrics.jsonl's own full disk:
    # test_metrics_on_a_full_disk_name_the_file).
    extra = (
        "--config.log_every_steps=100",
        "--config.eval_every_steps=100",
        f"--config.data.cache_dir={cache}",
    )
    code, out, err, _ = _run_to_end(workdir, tmp_path, "fill:7", extra)
    assert code == 2, err[-3000:]
    traced = tmp_path / "marker-fill.traceback"
    line = one_line(err)
    assert "error: [Errno" not in line, traced.read_text()[-4000:]
    # The save of step 8 fails in orbax's thread; the loop hears of it at
    # the next wait (step 12's). A metrics line written meanwhile may meet
    # the full disk first (the filler leaves < 64 KB): then that file is
    # the one named.
    assert line.startswith(f"error: {workdir}/"), line
    assert "No space left on device" in line, line
    if "checkpoints" in line:
      assert line.startswith(
          f"error: {workdir}/checkpoints/latest: saving the checkpoint at "
          "step 8 failed"
      ), line
    assert latest_steps(workdir) == [4]
    (workdir / "filler").unlink()
    code, out, err, _ = _run_to_end(workdir, tmp_path, "", extra)
    assert code == 0, err[-3000:]
    assert "Resuming from checkpoint at step 4" in out
  finally:
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _run_to_end(workdir, tmp_path, point, extra):
  proc = start(workdir, point, tmp_path / "marker-fill", extra)
  out, err = proc.communicate(timeout=300)
  return proc.returncode, out, err, None


def test_metrics_on_a_full_disk_name_the_file(tmp_path, monkeypatch):
  from randose_jax.training import metric_writers  # pylint: disable=g-import-not-at-top

  writer = metric_writers.MetricWriter(tmp_path, resume_step=0)
  writer._tb = None  # pylint: disable=protected-access

  class Full:
    name = str(tmp_path / "metrics.jsonl")

    def write(self, text):
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    flush = close = lambda self: None

  writer._jsonl.close()  # pylint: disable=protected-access
  writer._jsonl = Full()  # pylint: disable=protected-access
  with pytest.raises(OSError) as info:
    writer.write_scalars(1, {"loss": 1.0})
  assert info.value.errno == errno.ENOSPC
  assert info.value.filename == str(tmp_path / "metrics.jsonl")
  writer.close()


def test_a_checkpoint_removed_meanwhile_is_not_unreadable(
    trained, tmp_path, caplog
):
  """Another run's rotation removes the newest checkpoint while it is read:
  said as such (not 'unreadable'), and the one before it is used."""
  import shutil  # pylint: disable=g-import-not-at-top

  from randose_jax import checkpointing  # pylint: disable=g-import-not-at-top

  workdir = shutil.copytree(trained, tmp_path / "run")
  ckpt = checkpointing.Checkpointer(workdir, async_save=False)
  newest = ckpt.steps("latest")[-1]
  real = ckpt.latest.restore

  def restore(step, *args, **kwargs):
    if step == newest:
      shutil.rmtree(workdir / "checkpoints" / "latest" / str(step))
      raise FileNotFoundError("[Errno 2] No such file: pybind11::...")
    return real(step, *args, **kwargs)

  ckpt.latest.restore = restore
  with caplog.at_level("WARNING"):
    got = ckpt.restore(None, "latest")
  ckpt.close()
  assert got["step"] < newest
  text = caplog.text
  assert "was removed while read" in text
  assert "unreadable" not in text


def test_multi_process_runs_stop_at_the_preemption_sync_point(monkeypatch):
  """Several processes: SIGTERM is JAX's preemption notice, and every
  process stops after the step the sync point agrees on (simulated: the
  agreement itself is JAX's)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  from randose_jax.training import train  # pylint: disable=g-import-not-at-top

  assert train._should_stop(7) == 0  # pylint: disable=protected-access
  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(
      multihost_utils, "reached_preemption_sync_point", lambda step: step == 7
  )
  assert train._should_stop(6) == 0  # pylint: disable=protected-access
  assert train._should_stop(7) == signal.SIGTERM  # pylint: disable=protected-access

  def no_service(step):
    raise RuntimeError("Preemption sync manager has not been initialized.")

  monkeypatch.setattr(
      multihost_utils, "reached_preemption_sync_point", no_service
  )
  assert train._should_stop(7) == 0  # pylint: disable=protected-access
