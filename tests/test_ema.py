"""The moving average of the parameters (`config.ema_decay`, issue 13 item 3).

- the update in the train step against a numpy reference, warm-up included;
- off (the default): the train step, the state and the checkpoints are those
  of the code before the option (bit-identical parameters);
- resume: with the EMA equals a straight run; EMA switched on over a
  checkpoint without one starts from its parameters, switched off drops it;
- validation (scores, best checkpoint, final predictions), predict, export
  and benchmarks/learning_curves.py use the EMA when there is one;
- a bad `ema_decay` is a one-line ConfigError.
"""

import functools
import json
import math
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from randose_jax import checkpointing
from randose_jax.inference import export
from randose_jax.inference import forward as inference
from randose_jax.inference import predict_folders
from randose_jax.inference import restore
from randose_jax.training import train
from randose_jax.training import validation
from randose_jax.data import encoding
from randose_jax.data import openkbp
from randose_jax.data import pipeline
from randose_jax.default_config import ConfigError
from tests import helpers
from tests.test_fault_table import DEMO, run_in_process
from tests.test_train import tiny_config


def _mesh():
  return train.make_mesh(jax.devices()[:1])


def _batches(n, seed=0):
  rng = np.random.default_rng(seed)
  g = (2, 8, 8, 8)
  return [
      dict(
          ptv=rng.choice([0, 0.8, 1.0], g + (1,)),
          ct=rng.normal(size=g + (1,)),
          oar=rng.integers(0, 2, g + (7,)).astype(float),
          target=rng.uniform(size=g + (1,)),
          mask=np.ones(g + (1,)),
      )
      for _ in range(n)
  ]


def _np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), jax.device_get(tree))


def _assert_trees_equal(a, b):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def _assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  la, ta = jax.tree.flatten(a)
  lb, tb = jax.tree.flatten(b)
  assert ta == tb
  for x, y in zip(la, lb):
    np.testing.assert_allclose(
        np.asarray(x), np.asarray(y), rtol=rtol, atol=atol
    )


def _max_diff(a, b):
  return max(
      float(np.abs(np.asarray(x, np.float64) - np.asarray(y)).max())
      for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def _state_of(workdir, which="latest", step=None) -> dict:
  """The saved state of a checkpoint, as saved (with `ema_params` iff the
  checkpoint holds it), on the host."""
  _, config_dict = checkpointing.read_config_dict(workdir, which, step)
  trainer = train.Trainer.create(
      ml_collections.ConfigDict(config_dict), _mesh()
  )
  ckpt = checkpointing.Checkpointer(workdir, keep=3, async_save=False)
  got = ckpt.restore(
      train.saveable_state(trainer.abstract_state()), which, step
  )
  ckpt.close()
  return jax.device_get(got["state"])


# ------------------------------------------------------------ the update


def test_ema_update_matches_numpy_with_its_warm_up():
  decay = 0.2  # reached at step 2: both sides of min(decay, warm-up) run
  # Large steps, so that the EMA, the parameters and the average without
  # the warm-up are far apart compared with the tolerance.
  trainer = train.Trainer.create(
      tiny_config(ema_decay=decay, learning_rate=0.05), _mesh()
  )
  state = trainer.init_state(0)
  ema0 = _np(state.ema_params)
  # float32, the tree of the model parameters only (not the loss weights),
  # starting at the initial parameters.
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.ema_params))
  assert jax.tree.structure(state.ema_params) == jax.tree.structure(
      state.params["model"]
  )
  _assert_trees_equal(state.ema_params, state.params["model"])
  want, no_warm_up = ema0, ema0
  for t, batch in enumerate(_batches(4)):
    state, _ = trainer.jit_train_step(state, trainer.shard_batch(batch))
    p = _np(state.params["model"])
    d = min(decay, (1 + t) / (10 + t))
    want = jax.tree.map(lambda e, x, d=d: d * e + (1 - d) * x, want, p)
    no_warm_up = jax.tree.map(
        lambda e, x: decay * e + (1 - decay) * x, no_warm_up, p
    )
    _assert_trees_close(_np(state.ema_params), want, rtol=1e-6, atol=1e-7)
    if t == 0:
      # The reference tells the warm-up apart (0.1 instead of 0.2 at the
      # first update: 0.1 * (p1 - p0) apart) ...
      assert _max_diff(state.ema_params, no_warm_up) > 1e-3
  # ... and the EMA from the parameters.
  assert _max_diff(state.ema_params, state.params["model"]) > 1e-3
  assert int(state.step) == 4


def _pre_ema_train_step(trainer, state, batch):
  """`Trainer.train_step` as it was before the EMA option, on a state that
  has no EMA entry: (step, params, opt_state)."""
  step, params0, opt_state0 = state

  def loss_fn(params):
    pred = trainer.model.apply(
        {"params": params["model"]}, inference.model_inputs(batch)
    )
    loss, metrics = trainer.loss_module.apply(
        {"params": params["loss"]},
        pred,
        batch["target"],
        batch["ptv"],
        batch["oar"],
    )
    return loss, metrics

  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params0)
  updates, opt_state = trainer.tx.update(grads, opt_state0, params0)
  params = optax.apply_updates(params0, updates)
  metrics = dict(metrics)
  metrics.update(
      loss=loss,
      finite=jnp.isfinite(loss),
      grad_norm=train._tree_norm(grads),  # pylint: disable=protected-access
      param_norm=train._tree_norm(params["model"]),  # pylint: disable=protected-access
      learning_rate=trainer.schedule(step),
  )
  return (step + 1, params, opt_state), metrics


def test_ema_off_is_the_step_and_state_before_the_option():
  trainer = train.Trainer.create(tiny_config(), _mesh())
  assert trainer.ema_decay == 0.0
  state = trainer.init_state(0)
  assert state.ema_params is None
  old = trainer.init_state(0)
  old = (old.step, old.params, old.opt_state)
  # No new leaf in the state, nothing new in what a checkpoint saves.
  assert len(jax.tree.leaves(state)) == len(jax.tree.leaves(old))
  assert set(train.saveable_state(state)) == {
      "step",
      "params",
      "opt_state",
  }
  assert set(train.saveable_state(trainer.abstract_state())) == {
      "step",
      "params",
      "opt_state",
  }
  batches = [trainer.shard_batch(b) for b in _batches(3, seed=1)]
  # The same program ...
  new_jaxpr = jax.make_jaxpr(trainer.train_step)(state, batches[0])
  old_jaxpr = jax.make_jaxpr(functools.partial(_pre_ema_train_step, trainer))(
      old, batches[0]
  )
  assert str(new_jaxpr) == str(old_jaxpr)
  # ... and bit-identical parameters and optimiser state after 3 steps.
  old_step = jax.jit(
      functools.partial(_pre_ema_train_step, trainer),
      in_shardings=(trainer.replicated, trainer.data_sharding),
      out_shardings=(trainer.replicated, trainer.replicated),
      donate_argnums=(0,),
  )
  for batch in batches:
    state, m_new = trainer.jit_train_step(state, batch)
    old, m_old = old_step(old, batch)
    assert float(m_new["loss"]) == float(m_old["loss"])
  assert int(state.step) == int(old[0]) == 3
  _assert_trees_equal(jax.device_get(state.params), jax.device_get(old[1]))
  _assert_trees_equal(jax.device_get(state.opt_state), jax.device_get(old[2]))


def test_the_ema_does_not_change_the_training_itself():
  """The trained parameters of a run with the EMA are those without it."""
  trained = {}
  for decay in (0.0, 0.9):
    trainer = train.Trainer.create(tiny_config(ema_decay=decay), _mesh())
    state = trainer.init_state(0)
    for batch in _batches(3, seed=2):
      state, _ = trainer.jit_train_step(state, trainer.shard_batch(batch))
    trained[decay] = jax.device_get(state.params)
  _assert_trees_close(trained[0.9], trained[0.0], rtol=1e-6, atol=1e-7)


def test_a_config_without_the_field_is_ema_off():
  """A run saved before the option existed has no `ema_decay` field."""
  config = tiny_config()
  del config["ema_decay"]
  assert train.ema_decay_of(config) == 0.0
  trainer = train.Trainer.create(config, _mesh())
  assert trainer.abstract_state().ema_params is None
  assert "Validation uses the trained parameters" in train.training_plan(
      config, 2, 0
  )


@pytest.mark.parametrize("value", [1.0, -0.1, 1.5, math.nan])
def test_a_bad_ema_decay_is_a_one_line_config_error(value, tmp_path):
  config = tiny_config(ema_decay=value)
  with pytest.raises(ConfigError, match=r"^config\.ema_decay=") as info:
    train.Trainer.create(config, _mesh())
  assert "\n" not in str(info.value) and "< 1" in str(info.value)
  with pytest.raises(ConfigError, match=r"^config\.ema_decay="):
    train.train_and_evaluate(config, tmp_path / "w", mesh=_mesh())
  assert not (tmp_path / "w").exists()


def test_a_bad_ema_decay_on_the_command_line(tmp_path, capfd):
  code, _, err = run_in_process(
      "main",
      [
          f"--config={DEMO}:smoke",
          f"--workdir={tmp_path / 'w'}",
          "--config.ema_decay=1.0",
      ],
      capfd,
  )
  assert code == 2, err
  assert err.splitlines() == [
      "error: config.ema_decay=1.0: must be >= 0 and < 1 (0 = no moving "
      "average of the parameters; e.g. 0.999)"
  ], err
  assert not (tmp_path / "w").exists()


# ------------------------------------------------- runs, resume, predict

EMA_CONFIG = dict(ema_decay=0.5, eval_every_steps=100)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
  """4 steps with ema_decay=0.5 (latest at 2 and 4, best at 4)."""
  workdir = tmp_path_factory.mktemp("ema_run")
  summary = train.train_and_evaluate(
      tiny_config(**EMA_CONFIG), workdir, mesh=_mesh()
  )
  return workdir, summary


def test_checkpoints_and_validation_use_the_ema(ema_run):
  workdir, summary = ema_run
  for step in (2, 4):
    saved = checkpointing.saved_state_keys(
        workdir / "checkpoints" / "latest" / str(step) / "state"
    )
    assert saved == {"step", "params", "opt_state", "ema_params"}
  assert summary["ema"] is True and summary["checkpoint_step"] == 4
  scores = json.loads((workdir / "validation_scores.json").read_text())
  assert scores["ema"] is True
  # The final scores are the EMA's of the best checkpoint, not the
  # trained parameters'.
  restored = restore.restore_from_workdir(workdir, "best", mesh=_mesh())
  predictor, cache = restored.predictor, _eval_cache(workdir, restored.config)
  with_ema = validation.evaluate(predictor, cache)
  raw = validation.evaluate(
      predictor.with_params(restored.params["model"]), cache
  )
  assert scores["dose_score"] == pytest.approx(with_ema["dose_score"], rel=1e-9)
  assert scores["dose_score"] != pytest.approx(raw["dose_score"], rel=1e-9)
  lines = [
      json.loads(l)
      for l in (workdir / "metrics.jsonl").read_text().splitlines()
  ]
  logged = [l["eval/dose_score"] for l in lines if "eval/dose_score" in l]
  assert logged == [pytest.approx(with_ema["dose_score"], rel=1e-9)]


def _eval_cache(workdir, config):
  from randose_jax.data import cache as cache_lib  # pylint: disable=g-import-not-at-top

  return cache_lib.build_cache(
      openkbp.list_patient_dirs(workdir / "synthetic" / "validation-pats"),
      workdir / "cache" / "validation-pats",
      config.data,
  )


def test_resume_with_ema_equals_straight_run(ema_run, tmp_path):
  straight, _ = ema_run
  resumed = tmp_path / "resumed"
  train.train_and_evaluate(
      tiny_config(**EMA_CONFIG, num_train_steps=2), resumed, mesh=_mesh()
  )
  train.train_and_evaluate(tiny_config(**EMA_CONFIG), resumed, mesh=_mesh())
  want, got = _state_of(straight, step=4), _state_of(resumed, step=4)
  assert int(got["step"]) == 4
  _assert_trees_close(got["ema_params"], want["ema_params"])
  _assert_trees_close(got["params"], want["params"])
  assert _max_diff(got["ema_params"], got["params"]["model"]) > 1e-5
  a = json.loads((straight / "validation_scores.json").read_text())
  b = json.loads((resumed / "validation_scores.json").read_text())
  assert b["dose_score"] == pytest.approx(a["dose_score"], rel=1e-5)


def test_switching_the_ema_on_and_off_between_resumes(tmp_path, capsys):
  common = dict(eval_every_steps=100, checkpoint_every_steps=1)
  train.train_and_evaluate(
      tiny_config(**common, num_train_steps=2), tmp_path, mesh=_mesh()
  )
  capsys.readouterr()
  train.train_and_evaluate(
      tiny_config(**common, num_train_steps=4, ema_decay=0.5),
      tmp_path,
      mesh=_mesh(),
  )
  out = capsys.readouterr().out
  said = [l for l in out.splitlines() if "holds no moving average" in l]
  assert said == [
      "config.ema_decay=0.5: the checkpoint at step 2 holds no "
      "moving average of the parameters; the EMA starts from "
      "its parameters."
  ], out
  assert "Validation uses the exponential moving average" in out
  states = {s: _state_of(tmp_path, step=s) for s in (2, 3, 4)}
  assert "ema_params" not in states[2]
  # The EMA started at the restored step-2 parameters.
  ema = _np(states[2]["params"]["model"])
  for t in (2, 3):
    d = min(0.5, (1 + t) / (10 + t))
    ema = jax.tree.map(
        lambda e, x, d=d: d * e + (1 - d) * x,
        ema,
        _np(states[t + 1]["params"]["model"]),
    )
    _assert_trees_close(states[t + 1]["ema_params"], ema, rtol=1e-6, atol=1e-7)
  # Off again: the saved EMA is dropped, said once; nothing set aside.
  train.train_and_evaluate(
      tiny_config(**common, num_train_steps=5), tmp_path, mesh=_mesh()
  )
  out = capsys.readouterr().out
  assert (
      out.count(
          "the moving average of the parameters in the checkpoint "
          "at step 4 is not used"
      )
      == 1
  ), out
  assert checkpointing.saved_state_keys(
      tmp_path / "checkpoints" / "latest" / "5" / "state"
  ) == {"step", "params", "opt_state"}
  assert not (tmp_path / "checkpoints" / "unreadable").exists()


def _with_distinct_ema(ema_run, tmp_path):
  """A copy of the EMA run whose best checkpoint's EMA is far from its
  trained parameters (noise added), saved as a new best at step 5."""
  workdir = tmp_path / "run"
  shutil.copytree(ema_run[0], workdir)
  _, config_dict = checkpointing.read_config_dict(workdir, "best")
  trainer = train.Trainer.create(
      ml_collections.ConfigDict(config_dict), _mesh()
  )
  ckpt = checkpointing.Checkpointer(workdir, keep=3, async_save=False)
  got = ckpt.restore(train.saveable_state(trainer.abstract_state()), "best")
  rng = np.random.default_rng(0)
  state = dict(jax.device_get(got["state"]))
  state["ema_params"] = jax.tree.map(
      lambda x: (x + 0.1 * rng.standard_normal(x.shape)).astype(np.float32),
      state["ema_params"],
  )
  ckpt.save_best(
      5, state, got["data"], got["config"], dict(got["meta"], step=5)
  )
  ckpt.close()
  return workdir, state


def test_predict_and_export_use_the_ema(ema_run, tmp_path):
  workdir, state = _with_distinct_ema(ema_run, tmp_path)
  restored = restore.restore_from_workdir(workdir, "best", mesh=_mesh())
  assert restored.step == 5 and restored.uses_ema
  _assert_trees_equal(
      jax.device_get(restored.model_params), state["ema_params"]
  )
  patients = workdir / "synthetic" / "validation-pats"
  patient = openkbp.load_patient(patients / "pt_5")
  example = encoding.encode_patient(patient, restored.config.data)
  (with_ema,) = restored.predictor.predict_local([example], False)
  (raw,) = restored.predictor.with_params(
      restored.params["model"]
  ).predict_local([example], False)
  assert np.abs(with_ema - raw).max() > 1e-2
  # predict writes the EMA's dose.
  out = tmp_path / "preds"
  summary = predict_folders.predict_patients(
      restored, openkbp.list_patient_dirs(patients), out, log=lambda *_: None
  )
  assert summary["ema"] is True
  got = openkbp.read_prediction_csv(
      out / "pt_5.csv", patient.possible_dose_mask.shape
  )
  want = encoding.decode_dose(
      with_ema, patient.possible_dose_mask, restored.config.data
  )
  other = encoding.decode_dose(
      raw, patient.possible_dose_mask, restored.config.data
  )
  np.testing.assert_allclose(got, want, atol=1e-3)
  assert np.abs(got - other).max() > 0.1
  # export carries the EMA and predicts with it.
  path = export.export_workdir(workdir, tmp_path / "m.zip", platforms=("cpu",))
  loaded = export.load(path)
  assert loaded.meta["ema"] is True and loaded.meta["checkpoint_step"] == 5
  _assert_trees_equal(loaded.params, state["ema_params"])
  dose = loaded.predict_patient(patient)
  np.testing.assert_allclose(dose, want, rtol=1e-4, atol=1e-4 * want.max())
  assert np.abs(dose - other).max() > 0.1


# ------------------------------------------------- learning_curves.py


def _learning_curves():
  return helpers.load_benchmark("learning_curves")


def test_learning_curves_validates_with_the_ema_and_records_both(tmp_path):
  lc = _learning_curves()
  name, config = lc.variant_config(f"{DEMO}:smoke", "ema:ema_decay=0.999", [])
  assert name == "ema" and config.ema_decay == 0.999
  base = tiny_config(eval_every_steps=100)
  train_cache, eval_cache, _ = train.prepare_data(base, tmp_path)
  runs = {}
  for decay in (0.0, 0.5):
    config = tiny_config(ema_decay=decay)
    runs[decay] = lc.run_variant(
        f"ema{decay}",
        config,
        train_cache,
        eval_cache,
        steps=3,
        eval_every=3,
        max_eval_patients=0,
        log=lambda *_: None,
    )
  off, on = runs[0.0], runs[0.5]
  assert "final_raw_dose_score" not in off and off["ema_decay"] == 0.0
  assert on["ema_decay"] == 0.5
  last = on["evals"][-1]
  assert set(last) >= {
      "dose_score",
      "dvh_score",
      "raw_dose_score",
      "raw_dvh_score",
  }
  assert on["final_raw_dose_score"] == last["raw_dose_score"]
  # Same batches: the trained parameters of both variants agree, so the
  # EMA variant's raw score is the plain variant's score; its own score
  # (the EMA's) differs.
  assert last["raw_dose_score"] == pytest.approx(
      off["final_dose_score"], rel=1e-5
  )
  assert on["final_dose_score"] != pytest.approx(
      last["raw_dose_score"], rel=1e-6
  )
  result = {
      "runs": [off, on],
      "baseline": {"dose_score": 9.0, "dvh_score": 40.0},
      "title": "test",
  }
  lc.plot(result, tmp_path / "curves.png")
  assert (tmp_path / "curves.png").stat().st_size > 0


def test_learning_curves_gives_other_encodings_their_own_caches(tmp_path):
  # cpu_proxy then cpu_best in one harness: the second adds geometry
  # channels, so the first's caches would feed its model the wrong inputs.
  lc = _learning_curves()
  first = tiny_config()
  caches = train.prepare_data(first, tmp_path)[:2]
  same = lc.variant_caches(tiny_config(seed=3), first, caches, tmp_path)
  assert same == tuple(caches)
  geometry = tiny_config(**{"data.geometry": True})
  own = lc.variant_caches(geometry, first, caches, tmp_path)
  assert own[0] is not caches[0] and own[1] is not caches[1]
  run = lc.run_variant(
      "geometry",
      geometry,
      *own,
      steps=2,
      eval_every=2,
      max_eval_patients=1,
      log=lambda *_: None,
  )
  assert run["steps"] == 2 and math.isfinite(run["final_dose_score"])
  assert run["steps_per_second"] > 0


def test_learning_curves_reports_each_eval_and_scores_final_tta(tmp_path):
  lc = _learning_curves()
  config = tiny_config(eval_every_steps=100)
  train_cache, eval_cache, _ = train.prepare_data(config, tmp_path)
  seen = []
  run = lc.run_variant(
      "tta",
      config,
      train_cache,
      eval_cache,
      steps=4,
      eval_every=2,
      max_eval_patients=0,
      final_tta=True,
      log=lambda *_: None,
      on_eval=lambda partial: seen.append(
          (
              partial["steps"],
              partial["in_progress"],
              len(partial["evals"]),
              len(partial["curve"]["loss"]),
          )
      ),
  )
  # A partial result after each validation, with the curve so far.
  assert seen == [(2, True, 1, 2), (4, True, 2, 4)]
  # The final parameters scored again with the four flipped passes: what
  # validation.evaluate(tta=True) gives for them (same batches, same seed).
  trainer = train.Trainer.create(config)
  state = trainer.init_state(config.seed)
  it = iter(pipeline.train_dataset(train_cache, config, seed=config.seed))
  for _ in range(4):
    state, _ = trainer.jit_train_step(state, trainer.shard_batch(next(it)))
  predictor = trainer.predictor.with_params(trainer.eval_params(state))
  want = validation.evaluate(predictor, eval_cache, tta=True)
  plain = validation.evaluate(predictor, eval_cache)
  assert run["final_tta_dose_score"] == pytest.approx(
      want["dose_score"], rel=1e-5
  )
  assert run["final_tta_dvh_score"] == pytest.approx(
      want["dvh_score"], rel=1e-5
  )
  assert run["final_dose_score"] == pytest.approx(plain["dose_score"], rel=1e-5)
  assert want["dose_score"] != pytest.approx(plain["dose_score"], rel=1e-6)


def test_learning_curves_trains_a_coarse_phase_and_can_skip_the_raw_eval(
    tmp_path,
):
  lc = _learning_curves()
  config = tiny_config(
      ema_decay=0.5, **{"data.coarse_steps": 2, "data.coarse_downsample": 4}
  )
  train_cache, eval_cache, _ = train.prepare_data(config, tmp_path)
  coarse = train.prepare_coarse_data(config, tmp_path)
  assert coarse.settings["downsample"] == 4
  kwargs = dict(steps=3, eval_every=3, max_eval_patients=1, log=lambda *_: None)
  run = lc.run_variant(
      "coarse",
      config,
      train_cache,
      eval_cache,
      coarse_cache=coarse,
      raw_eval=False,
      **kwargs,
  )
  assert "raw_dose_score" not in run["evals"][-1]
  assert "final_raw_dose_score" not in run
  with pytest.raises(ValueError, match="coarse cache"):
    lc.run_variant("no_cache", config, train_cache, eval_cache, **kwargs)
  config.data.coarse_steps = 0  # the same run without its coarse phase
  plain = lc.run_variant(
      "plain", config, train_cache, eval_cache, raw_eval=False, **kwargs
  )
  assert plain["curve"]["loss"][0] != pytest.approx(run["curve"]["loss"][0])


def test_learning_curves_resume_keeps_only_finished_variants_of_the_same_run(
    tmp_path,
):
  lc = _learning_curves()
  result = {
      "config": "configs/openkbp.py:cpu_best",
      "overrides": [],
      "data_root": "/data",
      "num_train_patients": 120,
      "num_eval_patients": 33,
      "settings": {"steps": 100, "budget_s": 1800.0, "eval_every": 250},
  }
  path = tmp_path / "curves.json"
  assert lc.kept_runs(path, result, ["a"]) == []  # nothing yet
  earlier = dict(
      result,
      runs=[
          {"name": "a", "steps": 100},
          {"name": "b", "steps": 40, "in_progress": True},
          {"name": "c", "steps": 100},
      ],
  )
  path.write_text(json.dumps(earlier))
  kept = lc.kept_runs(path, result, ["a", "b"])
  assert [r["name"] for r in kept] == ["a"]  # b was cut short, c not asked
  other = dict(result, settings=dict(result["settings"], budget_s=3600.0))
  with pytest.raises(ValueError, match=r"curves.json.*settings"):
    lc.kept_runs(path, other, ["a"])
  path.write_text("{not json")
  with pytest.raises(ValueError, match="curves.json is not readable"):
    lc.kept_runs(path, result, ["a"])


def test_learning_curves_variant_names_config_variants_and_overrides():
  lc = _learning_curves()
  openkbp = DEMO.replace("demo.py", "openkbp.py")
  name, config = lc.variant_config(
      openkbp, "centre@cpu_best,progressive:data.crop_placement='centre'", []
  )
  assert name == "centre"
  assert config.data.crop_shape == (64, 64, 64)  # cpu_best
  assert config.data.coarse_steps > 0  # progressive
  assert config.data.crop_placement == "centre"
  name, plain = lc.variant_config(openkbp, "cpu_best", [])
  assert name == "cpu_best" and plain.data.crop_placement == "inside"
  assert plain.data.coarse_steps == 0
