"""End-to-end tests of the trainer: sharding, checkpoints, resume, NaN stop."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

jax.config.update("jax_disable_most_optimizations", True)

from randose_jax import checkpointing
from randose_jax.training import train

REPO = pathlib.Path(__file__).resolve().parents[1]
# Subprocesses compile quickly too.
SUBPROCESS_ENV = dict(
    os.environ, JAX_DISABLE_MOST_OPTIMIZATIONS="true", PYTHONUNBUFFERED="1"
)
SHARED = pathlib.Path(
    os.environ.get("RANDOSE_OPENKBP_DIR", REPO.parent / "shared" / "openkbp")
)


def tiny_config(**overrides):
  """`configs/demo.py:smoke`: synthetic 16^3 patients trained at 8^3, a
  2-stage RANDose of width 4 (every module on, smaller kernel sets): the
  trainer is under test here, the network has its own tests."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location(
      "demo_config", REPO / "configs" / "demo.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  for k, v in overrides.items():
    target = config
    *path, last = k.split(".")
    for p in path:
      target = target[p]
    target[last] = v
  return config


def _params_of(workdir, which="latest", step=None):
  config_step, config_dict = checkpointing.read_config_dict(
      workdir, which, step
  )
  import ml_collections  # pylint: disable=g-import-not-at-top

  trainer = train.Trainer.create(
      ml_collections.ConfigDict(config_dict), train.make_mesh(jax.devices()[:1])
  )
  ckpt = checkpointing.Checkpointer(workdir, keep=3, async_save=False)
  got = ckpt.restore(
      train.saveable_state(trainer.abstract_state()), which, step
  )
  ckpt.close()
  return jax.device_get(got["state"]["params"]), got


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_allclose(
        np.asarray(x), np.asarray(y), rtol=rtol, atol=atol
    )


def test_train_and_evaluate_writes_everything(tmp_path):
  summary = train.train_and_evaluate(
      tiny_config(), tmp_path, mesh=train.make_mesh(jax.devices()[:1])
  )
  assert np.isfinite(summary["dose_score"]) and summary["dose_score"] > 0
  assert np.isfinite(summary["dvh_score"])
  assert summary["num_patients"] == 2
  assert np.isfinite(summary["baseline_mean_dose_score"])
  preds = sorted(
      (tmp_path / "predictions" / "validation-pats").glob("pt_*.csv")
  )
  assert [p.stem for p in preds] == ["pt_5", "pt_6"]
  assert (tmp_path / "predictions" / "validation-pats.zip").is_file()
  saved = json.loads((tmp_path / "validation_scores.json").read_text())
  assert saved["dose_score"] == pytest.approx(summary["dose_score"])
  lines = [
      json.loads(l)
      for l in (tmp_path / "metrics.jsonl").read_text().splitlines()
  ]
  keys = set().union(*lines)
  for k in (
      "train/loss",
      "train/learning_rate",
      "train/grad_norm",
      "eval/dose_score",
      "eval/dvh_score",
      "loss_params/weight_ptv",
      "loss_params/weight_oar",
  ):
    assert k in keys, k
  assert any(k.startswith("scalars/") and k.endswith("alpha") for k in keys)
  assert any(k.startswith("scalars/") and k.endswith("beta") for k in keys)
  assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
  ckpt = checkpointing.Checkpointer(tmp_path)
  assert ckpt.steps("latest") == [2, 4]
  assert len(ckpt.steps("best")) == 1
  ckpt.close()


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> pathlib.Path:
  """The workdir of one finished `tiny_config(eval_every_steps=100)` run
  (latest checkpoints 2 and 4), trained once for the tests below that start
  from it (do not modify; `_copy_run` gives a test its own copy)."""
  workdir = tmp_path_factory.mktemp("finished_run") / "run"
  train.train_and_evaluate(
      tiny_config(eval_every_steps=100),
      workdir,
      mesh=train.make_mesh(jax.devices()[:1]),
  )
  return workdir


def _copy_run(finished_run: pathlib.Path, workdir: pathlib.Path):
  """`finished_run` copied into `workdir` (as if trained there)."""
  shutil.copytree(finished_run, workdir, dirs_exist_ok=True)


def test_resume_equals_straight_run(tmp_path, finished_run):
  mesh = train.make_mesh(jax.devices()[:1])
  config = tiny_config(eval_every_steps=100, num_train_steps=4)
  assert config == tiny_config(eval_every_steps=100)  # finished_run's
  config2 = tiny_config(eval_every_steps=100, num_train_steps=2)
  train.train_and_evaluate(config2, tmp_path / "resumed", mesh=mesh)
  train.train_and_evaluate(config, tmp_path / "resumed", mesh=mesh)
  straight, _ = _params_of(finished_run, step=4)
  resumed, got = _params_of(tmp_path / "resumed", step=4)
  assert got["step"] == 4
  _assert_trees_close(straight, resumed)


def test_progressive_resizing_trains_and_resumes_in_its_coarse_phase(
    tmp_path, finished_run, capsys
):
  """A coarse phase (4^3 for the first 3 steps, then the 8^3 training grid)
  changes what is learned, and a run killed after its step-2 checkpoint
  (in the coarse phase) resumes to the straight run's parameters."""
  mesh = train.make_mesh(jax.devices()[:1])
  config = tiny_config(
      eval_every_steps=100,
      **{"data.coarse_steps": 3, "data.coarse_downsample": 4},
  )
  straight_dir = tmp_path / "straight"
  train.train_and_evaluate(config, straight_dir, mesh=mesh)
  assert "the first 3 on the whole grid reduced by 4" in capsys.readouterr().out
  straight, _ = _params_of(straight_dir, step=4)
  plain, _ = _params_of(finished_run, step=4)  # the same run without it
  assert not all(
      np.allclose(x, y)
      for x, y in zip(jax.tree.leaves(straight), jax.tree.leaves(plain))
  )
  killed = tmp_path / "killed"
  shutil.copytree(straight_dir, killed)
  shutil.rmtree(killed / "checkpoints" / "latest" / "4")
  _, got = _params_of(killed, step=2)
  assert got["data"]["phase"] == "coarse" and got["data"]["batches_taken"] == 2
  train.train_and_evaluate(config, killed, mesh=mesh)
  resumed, _ = _params_of(killed, step=4)
  _assert_trees_close(straight, resumed)


@pytest.mark.parametrize("saved,resumed", [(0, 1), (1, 0)])
def test_resume_with_another_coarse_phase_is_a_clear_error(
    tmp_path, finished_run, saved, resumed
):
  """A run saved without a coarse phase resumed with one, or the reverse:
  the saved input position does not fit; the error names the checkpoint
  folder and leaves the checkpoints as they were."""
  mesh = train.make_mesh(jax.devices()[:1])
  coarse = lambda steps: tiny_config(
      eval_every_steps=100,
      **{"data.coarse_steps": steps, "data.coarse_downsample": 4},
  )
  if saved:
    train.train_and_evaluate(coarse(saved), tmp_path, mesh=mesh)
  else:
    _copy_run(finished_run, tmp_path)
  shutil.rmtree(tmp_path / "checkpoints" / "latest" / "4")
  latest = tmp_path / "checkpoints" / "latest"
  before = sorted(p.name for p in latest.iterdir())
  with pytest.raises(
      checkpointing.CheckpointError,
      match=rf"checkpoints.*step 2.*coarse_steps={resumed};",
  ):
    train.train_and_evaluate(coarse(resumed), tmp_path, mesh=mesh)
  assert sorted(p.name for p in latest.iterdir()) == before


def test_corrupt_latest_checkpoint_falls_back(tmp_path, caplog, finished_run):
  _copy_run(finished_run, tmp_path)
  step_dir = tmp_path / "checkpoints" / "latest" / "4" / "state"
  files = [p for p in step_dir.rglob("*") if p.is_file()]
  assert files
  for p in files:  # scramble every file of the newest state
    p.write_bytes(b"corrupt")
  import logging  # pylint: disable=g-import-not-at-top

  caplog.set_level(logging.WARNING)
  _, got = _params_of(tmp_path)
  assert got["step"] == 2
  assert any("unreadable" in r.getMessage() for r in caplog.records)
  # Reading (predict, export) moves nothing.
  assert files[0].exists()
  assert not (tmp_path / "checkpoints" / "unreadable").exists()


def _garble(path: pathlib.Path, seed: int = 0):
  path.write_bytes(np.random.default_rng(seed).bytes(path.stat().st_size))


def test_corrupt_latest_is_moved_aside_and_written_again(
    tmp_path, caplog, finished_run
):
  """The issue's repro: a garbled manifest of the newest latest checkpoint.
  The rerun falls back to the one before, moves the unreadable folder aside
  (renamed, not deleted) with one warning line naming it, trains again and
  writes a readable checkpoint at the final step; a third run is clean."""
  import logging  # pylint: disable=g-import-not-at-top

  mesh = train.make_mesh(jax.devices()[:1])
  config = tiny_config(eval_every_steps=100)
  _copy_run(finished_run, tmp_path)
  straight, _ = _params_of(tmp_path, step=4)
  manifest = (
      tmp_path / "checkpoints" / "latest" / "4" / "state" / "manifest.ocdbt"
  )
  garbled = np.random.default_rng(0).bytes(manifest.stat().st_size)
  manifest.write_bytes(garbled)
  caplog.set_level(logging.WARNING)
  train.train_and_evaluate(config, tmp_path, mesh=mesh)
  warnings = [
      r.getMessage()
      for r in caplog.records
      if r.levelno >= logging.WARNING and "unreadable" in r.getMessage()
  ]
  assert len(warnings) == 1, warnings
  aside = list((tmp_path / "checkpoints" / "unreadable").iterdir())
  assert [p.name.split("-")[:2] for p in aside] == [["latest", "4"]]
  assert (aside[0] / "state" / "manifest.ocdbt").read_bytes() == garbled
  message = warnings[0]
  assert "\n" not in message and len(message) < 600, message
  assert str(tmp_path / "checkpoints" / "latest" / "4") in message
  assert str(aside[0]) in message and "using step 2" in message
  assert "tensorstore_spec" not in message
  resumed, got = _params_of(tmp_path, step=4)
  assert got["step"] == 4
  _assert_trees_close(straight, resumed)
  caplog.clear()
  train.train_and_evaluate(config, tmp_path, mesh=mesh)
  assert not [r for r in caplog.records if "unreadable" in r.getMessage()]
  assert len(list((tmp_path / "checkpoints" / "unreadable").iterdir())) == 1


def test_a_failure_after_the_move_keeps_the_unreadable_checkpoint(
    tmp_path, monkeypatch, finished_run
):
  """The workdir undo of a failed start must not delete the checkpoint that
  was just moved aside: it is the only copy of the user's folder."""
  mesh = train.make_mesh(jax.devices()[:1])
  config = tiny_config(eval_every_steps=100)
  _copy_run(finished_run, tmp_path)
  manifest = (
      tmp_path / "checkpoints" / "latest" / "4" / "state" / "manifest.ocdbt"
  )
  garbled = np.random.default_rng(1).bytes(manifest.stat().st_size)
  manifest.write_bytes(garbled)

  def interrupted(self, which):
    raise KeyboardInterrupt

  monkeypatch.setattr(checkpointing.Checkpointer, "_reopen", interrupted)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, tmp_path, mesh=mesh)
  aside = list((tmp_path / "checkpoints" / "unreadable").iterdir())
  assert [p.name.split("-")[:2] for p in aside] == [["latest", "4"]]
  assert (aside[0] / "state" / "manifest.ocdbt").read_bytes() == garbled
  monkeypatch.undo()
  train.train_and_evaluate(config, tmp_path, mesh=mesh)
  _, got = _params_of(tmp_path, step=4)
  assert got["step"] == 4


def test_no_readable_checkpoint_is_an_error_and_moves_nothing(
    tmp_path, finished_run
):
  mesh = train.make_mesh(jax.devices()[:1])
  config = tiny_config(eval_every_steps=100)
  _copy_run(finished_run, tmp_path)
  latest = tmp_path / "checkpoints" / "latest"
  for step in (2, 4):
    _garble(latest / str(step) / "state" / "manifest.ocdbt", step)
  with pytest.raises(
      checkpointing.CheckpointError,
      match=r"none of the checkpoints \[2, 4\] could be read "
      r"\(step 4: ValueError.*nothing was moved",
  ):
    train.train_and_evaluate(config, tmp_path, mesh=mesh)
  assert sorted(p.name for p in latest.iterdir()) == ["2", "4"]
  assert not (tmp_path / "checkpoints" / "unreadable").exists()


def test_save_best_replaces_a_best_at_a_later_step(tmp_path):
  """A resumed run that reaches a better score at or before the step of the
  current best (possible on a nondeterministic GPU) must not be skipped
  silently by orbax (which never writes a step not newer than its newest)."""
  state = {"w": np.arange(3.0)}
  ckpt = checkpointing.Checkpointer(tmp_path, async_save=False)
  ckpt.save_best(6, state, {}, {}, {"step": 6, "dose_score": 3.0})
  ckpt.save_best(4, {"w": np.ones(3)}, {}, {}, {"step": 4, "dose_score": 2.0})
  ckpt.save_best(4, {"w": np.zeros(3)}, {}, {}, {"step": 4, "dose_score": 1.0})
  assert ckpt.steps("best") == [4]
  got = ckpt.restore({"w": np.zeros(3)}, "best")
  ckpt.close()
  np.testing.assert_array_equal(got["state"]["w"], np.zeros(3))
  assert checkpointing.best_meta(tmp_path)["dose_score"] == 1.0
  assert not list((tmp_path / "checkpoints" / "superseded").iterdir())


def test_metrics_jsonl_has_no_duplicates_after_resume(tmp_path):
  """A run stopped after logging past its last checkpoint (here: the log of
  step 3 and a torn last line) logs those steps again when resumed: the
  resume drops the stale records first, keeping the others byte for byte."""
  mesh = train.make_mesh(jax.devices()[:1])
  train.train_and_evaluate(
      tiny_config(eval_every_steps=100, log_every_steps=1, num_train_steps=2),
      tmp_path,
      mesh=mesh,
  )
  path = tmp_path / "metrics.jsonl"
  kept = path.read_bytes()
  kept = b"".join(
      l + b"\n" for l in kept.split(b"\n")[:-1] if b'"final/' not in l
  )
  path.write_bytes(
      path.read_bytes() + b'{"step": 3, "train/loss": 9.0}\n'
      b'{"step": 3, "train/lo'
  )
  train.train_and_evaluate(
      tiny_config(eval_every_steps=100, log_every_steps=1), tmp_path, mesh=mesh
  )
  data = path.read_bytes()
  assert data.startswith(kept)
  records = [json.loads(l) for l in data.decode().splitlines()]
  steps = [r["step"] for r in records]
  assert steps == sorted(steps)
  pairs = [(r["step"], k) for r in records for k in r if k != "step"]
  assert len(pairs) == len(set(pairs))
  assert 9.0 not in [r.get("train/loss") for r in records]
  assert sum(1 for r in records if "final/dose_score" in r) == 1


def test_nonfinite_loss_stops_and_keeps_last_good_checkpoint(tmp_path):
  mesh = train.make_mesh(jax.devices()[:1])
  train.train_and_evaluate(
      tiny_config(num_train_steps=2, eval_every_steps=100), tmp_path, mesh=mesh
  )
  bad = tiny_config(num_train_steps=8, eval_every_steps=100, learning_rate=1e38)
  with pytest.raises(train.NonFiniteLossError, match="NaN or infinite.*step 2"):
    train.train_and_evaluate(bad, tmp_path, mesh=mesh)
  params, got = _params_of(tmp_path)
  assert got["step"] == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


_SHARDED_SCRIPT = textwrap.dedent("""
    import os, sys, json
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, numpy as np
    sys.path.insert(0, sys.argv[1])
    from tests.test_train import tiny_config
    from randose_jax.training import train
    assert jax.device_count() == 4, jax.devices()
    # SGD: Adam divides by sqrt(v), which turns the rounding noise of
    # gradients that are zero in exact arithmetic (conv biases before an
    # instance norm) into full learning-rate steps of either sign.
    config = tiny_config(batch_size=4, optimizer="sgd", learning_rate=0.1)
    rng = np.random.default_rng(0)
    g = (4, 8, 8, 8)
    batches = [dict(ptv=rng.choice([0, .8, 1.], g + (1,)),
                    ct=rng.normal(size=g + (1,)),
                    oar=rng.integers(0, 2, g + (7,)).astype(float),
                    target=rng.uniform(size=g + (1,)),
                    mask=np.ones(g + (1,))) for _ in range(3)]
    out = {}
    for n in (1, 4):
      t = train.Trainer.create(config, train.make_mesh(jax.devices()[:n]))
      state = t.init_state(0)
      losses = []
      for b in batches:
        state, m = t.jit_train_step(state, t.shard_batch(b))
        losses.append([float(m["loss"]), float(m["grad_norm"])])
      leaves = [np.asarray(x).ravel() for x in jax.tree.leaves(state.params)]
      out[n] = dict(losses=losses, params=np.concatenate(leaves).tolist())
    print("RESULT" + json.dumps(out))
""")


def test_four_devices_match_one_device():
  proc = subprocess.run(
      [sys.executable, "-c", _SHARDED_SCRIPT, str(REPO)],
      capture_output=True,
      text=True,
      timeout=600,
      cwd=REPO,
      env=SUBPROCESS_ENV,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  line = [l for l in proc.stdout.splitlines() if l.startswith("RESULT")][-1]
  out = json.loads(line[len("RESULT") :])
  np.testing.assert_allclose(out["4"]["losses"], out["1"]["losses"], rtol=1e-5)
  np.testing.assert_allclose(
      out["4"]["params"], out["1"]["params"], rtol=1e-4, atol=1e-6
  )


def _run_main(workdir, *flags, timeout=600):
  return subprocess.Popen(
      [
          sys.executable,
          "-m",
          "randose_jax.cli.train",
          "--config=configs/demo.py",
          f"--workdir={workdir}",
          "--config.data.synthetic_grid=16",
          "--config.data.downsample=2",
          "--config.model.widths=(4,4)",
          "--config.model.msfe_kernels=(3,5)",
          "--config.model.pi_kernels=(3,)",
          "--config.data.num_synthetic_train=4",
          "--config.data.num_synthetic_eval=2",
          "--config.progress_bar=False",
          *flags,
      ],
      cwd=REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env=SUBPROCESS_ENV,
  )


def test_sigkill_mid_training_resumes(tmp_path):
  proc = _run_main(
      tmp_path,
      "--config.num_train_steps=100000",
      "--config.checkpoint_every_steps=2",
      "--config.eval_every_steps=100000",
      "--config.log_every_steps=1000",
  )
  latest = tmp_path / "checkpoints" / "latest"
  deadline = time.time() + 300
  try:
    while time.time() < deadline:
      steps = (
          [int(p.name) for p in latest.glob("[0-9]*") if p.name.isdigit()]
          if latest.is_dir()
          else []
      )
      if steps and max(steps) >= 4:
        break
      assert proc.poll() is None, proc.stdout.read()
      time.sleep(0.2)
    else:
      pytest.fail("no checkpoint within 300 s")
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
  ckpt = checkpointing.Checkpointer(tmp_path)
  last = max(ckpt.steps("latest"))
  ckpt.close()
  again = _run_main(
      tmp_path,
      f"--config.num_train_steps={last + 2}",
      "--config.checkpoint_every_steps=2",
      "--config.eval_every_steps=100000",
  )
  out, _ = again.communicate(timeout=600)
  assert again.returncode == 0, out[-3000:]
  assert f"Resuming from checkpoint at step {last}" in out
  ckpt = checkpointing.Checkpointer(tmp_path)
  assert max(ckpt.steps("latest")) == last + 2
  ckpt.close()


@pytest.mark.skipif(
    not (SHARED / "train-pats").is_dir(),
    reason=f"shared OpenKBP patients not found at {SHARED}",
)
def test_smoke_config_on_shared_patients(tmp_path):
  import importlib.util  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location(
      "openkbp_config", REPO / "configs" / "openkbp.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config("smoke")
  config.data.root = str(SHARED)
  summary = train.train_and_evaluate(
      config, tmp_path, mesh=train.make_mesh(jax.devices()[:1])
  )
  assert summary["num_patients"] == len(
      list((SHARED / "validation-pats").glob("pt_*"))
  )
  assert np.isfinite(summary["dose_score"])


def _free_port() -> int:
  import socket  # pylint: disable=g-import-not-at-top

  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_on_loopback(tmp_path):
  """jax.distributed with 2 CPU processes (gloo collectives) trains, checkpoints
  and validates through the same main as one process."""
  port = _free_port()
  procs = [
      _run_main(
          tmp_path,
          f"--coordinator_address=127.0.0.1:{port}",
          "--num_processes=2",
          f"--process_id={i}",
          "--config.num_train_steps=4",
          "--config.checkpoint_every_steps=2",
          "--config.eval_every_steps=2",
          "--config.log_every_steps=2",
      )
      for i in range(2)
  ]
  outs = []
  for p in procs:
    out, _ = p.communicate(timeout=900)
    outs.append(out)
    assert p.returncode == 0, out[-4000:]
  assert "Validation (2 patients" in outs[0]  # process 0 reports
  summary = json.loads((tmp_path / "validation_scores.json").read_text())
  assert np.isfinite(summary["dose_score"])
  ckpt = checkpointing.Checkpointer(tmp_path)
  assert ckpt.steps("latest") == [2, 4]
  ckpt.close()
  assert sorted(
      p.name for p in (tmp_path / "predictions" / "validation-pats").iterdir()
  ) == ["pt_5.csv", "pt_6.csv"]


def test_the_mask_region_trains_with_the_batch_mask():
  """loss.regions with 'mask': the step hands the batch's possible-dose mask
  to the loss (its L1 and weight are in the metrics, its log-variance gets
  a gradient); the paper's loss leaves it out (no such metric)."""
  rng = np.random.default_rng(0)
  g = (2, 8, 8, 8)
  mask = np.zeros(g + (1,))
  mask[:, 2:6, 2:6, 2:6] = 1
  target = rng.uniform(size=g + (1,)) * mask
  batch = dict(
      ptv=rng.choice([0, 0.8, 1.0], g + (1,)),
      ct=rng.normal(size=g + (1,)),
      oar=rng.integers(0, 2, g + (7,)).astype(float),
      target=target,
      mask=mask,
  )
  mesh = train.make_mesh(jax.devices()[:1])
  config = tiny_config()
  config.loss.regions = ("ptv", "oar", "mask")
  t = train.Trainer.create(config, mesh)
  state = t.init_state(0)
  assert "log_var_mask" in state.params["loss"]
  before = float(state.params["loss"]["log_var_mask"])
  # Before the step: it donates the state's buffers.
  pred = t.model.apply(
      {"params": state.params["model"]},
      train.inference.model_inputs(
          {k: jnp.asarray(v, jnp.float32) for k, v in batch.items()}
      ),
  )
  new, m = t.jit_train_step(state, t.shard_batch(batch))
  assert float(new.params["loss"]["log_var_mask"]) != before
  error = np.abs(np.asarray(pred) - target)[..., 0]
  np.testing.assert_allclose(
      float(m["l1_mask"]), error[mask[..., 0] > 0].mean(), rtol=1e-4
  )
  assert float(m["weight_mask"]) == pytest.approx(np.exp(-before))
  paper = train.Trainer.create(tiny_config(), mesh)
  _, m = paper.jit_train_step(paper.init_state(0), paper.shard_batch(batch))
  assert "l1_mask" not in m
