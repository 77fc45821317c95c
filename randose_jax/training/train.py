"""Training and evaluation loop: `train_and_evaluate(config, workdir)`.

One `jax.jit`-compiled train step with explicit `NamedSharding`s on a 1-D
'data' mesh over every device of every process: the batch is split over
'data', the state is replicated and donated. The same code runs on one CPU,
one GPU, all GPUs of a host, or several hosts after `jax.distributed`.

This module holds the training state, the step and the loop. Validation
(the model's and the mean-dose baseline's scores) is `validation.py`; the
forward pass with optional test-time flips, shared by validation, `predict`
and `export`, is `predictor.Predictor`.
"""

import dataclasses
import functools
import gc
import json
import logging
import math
import pathlib
import time
from typing import Any, Callable, Mapping, Optional

import flax
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from randose_jax import checkpointing
from randose_jax import config_check
from randose_jax import fileio
from randose_jax.inference import forward as inference
from randose_jax import interrupts
from randose_jax.training import losses
from randose_jax import models
from randose_jax.training import runlock
from randose_jax.training import validation
from randose_jax.data import encoding
from randose_jax.data import pipeline
from randose_jax.data.prepare import prepare_coarse_data
from randose_jax.data.prepare import prepare_data
from randose_jax.default_config import ConfigError
from randose_jax.distributed import make_mesh
from randose_jax.training.metric_writers import MetricWriter
from randose_jax.inference import predictor as predictor_lib
from randose_jax.inference.predictor import Predictor

BATCH_KEYS = ("ptv", "ct", "oar", "target", "mask")
# Parameter initialisation uses XLA's RngBitGenerator: on the CPU, threefry
# takes seconds to compile per parameter shape (minutes for a whole RANDose).
PRNG_IMPL = "rbg"


@flax.struct.dataclass
class TrainState:
  """The whole training state. `ema_params` (the exponential moving average
  of `params['model']`, float32) exists only when `config.ema_decay > 0`;
  with the EMA off it is None, which adds no leaf: the state, the step and
  the checkpoints are exactly those of a run without the option."""

  step: jax.Array
  params: Any  # {'model': ..., 'loss': ...}
  opt_state: Any
  ema_params: Any = None


def saveable_state(state) -> dict[str, Any]:
  """The train state (or its abstract shapes) as checkpointed: `ema_params`
  (`predictor.EMA_KEY`) only when the run keeps an EMA, so that with the EMA
  off the tree is exactly what earlier versions saved. The checkpointer
  restores whichever of these entries a checkpoint holds."""
  out = {
      "step": state.step,
      "params": state.params,
      "opt_state": state.opt_state,
  }
  if state.ema_params is not None:
    out[predictor_lib.EMA_KEY] = state.ema_params
  return out


class NonFiniteLossError(FloatingPointError):
  pass


# --------------------------------------------------------------------- setup

# optax.tree.norm (newer optax) or the deprecated optax.global_norm.
_tree_norm = getattr(getattr(optax, "tree", None), "norm", None) or (
    optax.global_norm
)


def create_optimizer(config) -> tuple[optax.GradientTransformation, Callable]:
  lr = config.learning_rate
  warmup = config.warmup_steps
  if warmup < 0 or (warmup and warmup >= config.num_train_steps):
    raise ConfigError(
        f"config.warmup_steps={warmup}: must be >= 0 and below "
        f"num_train_steps ({config.num_train_steps})"
    )
  if not 0 <= config.lr_decay_start < max(config.num_train_steps, 1):
    raise ConfigError(
        f"config.lr_decay_start={config.lr_decay_start}: must be >= 0 and "
        f"below num_train_steps ({config.num_train_steps})"
    )
  if config.lr_schedule == "constant":
    schedule = optax.constant_schedule(lr)
  elif config.lr_schedule == "cosine":
    # Cosine from lr to 0 over the steps after the warm-up (or after
    # lr_decay_start, if later: constant lr until then), so that the last
    # step (num_train_steps) trains at ~0. A run resumed from a
    # constant-rate checkpoint decays from where it stopped this way.
    start = max(warmup, config.lr_decay_start)
    schedule = optax.cosine_decay_schedule(
        lr, max(1, config.num_train_steps - start)
    )
    if start > warmup:
      schedule = optax.join_schedules(
          [optax.constant_schedule(lr), schedule], [start - warmup]
      )
  else:
    raise ConfigError(f"config.lr_schedule: unknown {config.lr_schedule!r}")
  if warmup:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, lr, warmup), schedule], [warmup]
    )
  if config.optimizer == "adam":
    tx = optax.adam(schedule)
  elif config.optimizer == "adamw":
    tx = optax.adamw(schedule)
  elif config.optimizer == "sgd":
    tx = optax.sgd(schedule)
  else:
    raise ConfigError(f"config.optimizer: unknown {config.optimizer!r}")
  if config.grad_clip_norm:
    tx = optax.chain(optax.clip_by_global_norm(config.grad_clip_norm), tx)
  return tx, schedule


def ema_decay_of(config) -> float:
  """`config.ema_decay` checked (0 <= decay < 1); 0 for a config without
  the field (a run saved before the option existed)."""
  value = config.get("ema_decay", 0.0)
  try:
    decay = float(value)
  except (TypeError, ValueError):
    decay = math.nan
  if isinstance(value, bool) or not 0.0 <= decay < 1.0:
    raise ConfigError(
        f"config.ema_decay={value!r}: must be >= 0 and < 1 "
        "(0 = no moving average of the parameters; e.g. 0.999)"
    )
  return decay


def ema_update(ema, params, decay: float, step):
  """One step of the moving average: `d * ema + (1 - d) * params`, float32.

  `step` is the number of updates the parameters had before this one (the
  train state's step before the increment) and `d = min(decay, (1 + step)
  / (10 + step))`: 0.1 at the first update, 0.5 at step 8, `decay` from
  step ~10 / (1 - decay) on (8,990 for 0.999). Without this warm-up the
  average of a short run would still weigh the initial parameters heavily
  (0.999^1500 = 22% after 1,500 steps); with it the average covers roughly
  the last min(t, 1 / (1 - decay)) steps.
  """
  t = jnp.asarray(step, jnp.float32)
  d = jnp.minimum(jnp.float32(decay), (1.0 + t) / (10.0 + t))
  return jax.tree.map(
      lambda e, p: d * e + (1.0 - d) * p.astype(jnp.float32), ema, params
  )


def _copy_float32(tree):
  """A fresh float32 copy (its own buffers: the train step donates both)."""
  return jax.tree.map(lambda x: jnp.copy(x.astype(jnp.float32)), tree)


def dummy_inputs(
    model_config, batch: int = 1, grid=None, channels=None
) -> dict:
  """Zeros shaped like the model inputs (`channels`: key -> channels, by
  default `INPUT_CHANNELS`; `encoding.input_channels(config.data)` for a
  run's); parameters do not depend on the grid, so the smallest valid grid
  (2^(S-1) per axis) is used by default."""
  if grid is None:
    grid = (models.grid_factor(model_config.widths),) * 3
  specs = models.input_specs(grid, batch, channels)
  return {k: jnp.zeros(s.shape, s.dtype) for k, s in specs.items()}


def init_params(model, loss_module, model_config, rng, channels=None) -> dict:
  inputs = dummy_inputs(model_config, channels=channels)
  m_rng, l_rng = jax.random.split(rng)
  model_params = model.init(m_rng, inputs)["params"]
  pred = jnp.zeros(inputs["ct"].shape)
  loss_vars = loss_module.init(
      l_rng, pred, pred, inputs["ptv"], inputs["oar"], jnp.ones_like(pred)
  )
  return {"model": model_params, "loss": loss_vars.get("params", {})}


@dataclasses.dataclass
class Trainer:
  """The pieces of a run that do not change: model, loss, optimizer, mesh;
  `predictor` runs the model's forward (validation) on the same mesh."""

  config: ml_collections.ConfigDict
  model: Any
  loss_module: Any
  tx: optax.GradientTransformation
  schedule: Callable
  mesh: Mesh
  # `config.ema_decay`, read once (0: no moving average of the parameters).
  ema_decay: float = 0.0

  @classmethod
  def create(cls, config, mesh: Optional[Mesh] = None) -> "Trainer":
    tx, schedule = create_optimizer(config)
    return cls(
        config=config,
        model=models.create_model(config.model),
        loss_module=losses.create_loss(config.loss),
        tx=tx,
        schedule=schedule,
        mesh=mesh or make_mesh(),
        ema_decay=ema_decay_of(config),
    )

  @property
  def replicated(self) -> NamedSharding:
    return NamedSharding(self.mesh, P())

  @property
  def data_sharding(self) -> NamedSharding:
    return NamedSharding(self.mesh, P("data"))

  def _init_state(self, rng) -> TrainState:
    params = init_params(
        self.model,
        self.loss_module,
        self.config.model,
        rng,
        encoding.input_channels(self.config.data),
    )
    ema = _copy_float32(params["model"]) if self.ema_decay else None
    return TrainState(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=self.tx.init(params),
        ema_params=ema,
    )

  def abstract_state(self) -> TrainState:
    """Shapes, dtypes and shardings of the state, without computing it."""
    shapes = jax.eval_shape(self._init_state, jax.random.key(0, impl=PRNG_IMPL))
    return jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=self.replicated
        ),
        shapes,
    )

  def init_state(self, seed: int) -> TrainState:
    """The initial state, created already replicated by a jitted init."""
    return jax.jit(self._init_state, out_shardings=self.replicated)(
        jax.random.key(seed, impl=PRNG_IMPL)
    )

  @staticmethod
  def eval_params(state: TrainState):
    """The model parameters validation uses, as predict would
    (`predictor.params_to_predict`)."""
    return predictor_lib.params_to_predict(state.params, state.ema_params)

  def fit_ema(self, state: TrainState, source: str) -> TrainState:
    """`state` (restored from `source`) with the EMA this run keeps: the
    saved one, or (EMA on, none saved) one started from the restored model
    parameters, or (EMA off) none. A change is said in one line."""
    if self.ema_decay and state.ema_params is None:
      _say(
          f"config.ema_decay={self.ema_decay:g}: {source} holds no moving "
          "average of the parameters; the EMA starts from its parameters."
      )
      return state.replace(
          ema_params=jax.jit(_copy_float32, out_shardings=self.replicated)(
              state.params["model"]
          )
      )
    if not self.ema_decay and state.ema_params is not None:
      _say(
          f"config.ema_decay=0: the moving average of the parameters in "
          f"{source} is not used (validation uses the trained parameters)."
      )
      return state.replace(ema_params=None)
    return state

  # ------------------------------------------------------------- the step
  def train_step(self, state: TrainState, batch: Mapping[str, jax.Array]):
    """One optimisation step. Pure: (state, batch) -> (state, metrics)."""

    def loss_fn(params):
      pred = self.model.apply(
          {"params": params["model"]}, inference.model_inputs(batch)
      )
      loss, metrics = self.loss_module.apply(
          {"params": params["loss"]},
          pred,
          batch["target"],
          batch["ptv"],
          batch["oar"],
          batch["mask"],
      )
      return loss, metrics

    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params
    )
    updates, opt_state = self.tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    ema = None
    if self.ema_decay:
      ema = ema_update(
          state.ema_params, params["model"], self.ema_decay, state.step
      )
    metrics = dict(metrics)
    metrics.update(
        loss=loss,
        finite=jnp.isfinite(loss),
        grad_norm=_tree_norm(grads),
        param_norm=_tree_norm(params["model"]),
        learning_rate=self.schedule(state.step),
    )
    return (
        TrainState(
            step=state.step + 1,
            params=params,
            opt_state=opt_state,
            ema_params=ema,
        ),
        metrics,
    )

  @functools.cached_property
  def jit_train_step(self):
    return jax.jit(
        self.train_step,
        in_shardings=(self.replicated, self.data_sharding),
        out_shardings=(self.replicated, self.replicated),
        donate_argnums=(0,),
    )

  def shard_batch(self, local_batch: Mapping[str, np.ndarray]) -> dict:
    """Process-local numpy batch -> global arrays split over 'data'."""
    out = {}
    keys = BATCH_KEYS + tuple(
        k for k in inference.OPTIONAL_INPUT_KEYS if k in local_batch
    )
    for k in keys:
      x = np.asarray(local_batch[k], np.float32)
      global_shape = (x.shape[0] * jax.process_count(),) + x.shape[1:]
      out[k] = jax.make_array_from_process_local_data(
          self.data_sharding, x, global_shape
      )
    return out

  @functools.cached_property
  def predictor(self) -> Predictor:
    """The forward of `model` on this mesh, compiled once; give it the
    parameters with `predictor.with_params(...)`."""
    return Predictor(
        model=self.model,
        params=None,
        data_config=self.config.data,
        mesh=self.mesh,
    )


# ----------------------------------------------------------------- loop
def learned_scalars(params) -> dict:
  """alpha (CSA), beta (AF) and the loss's region weights, for logging.

  Picks the scalar leaves by shape first and fetches only those from the
  device (the whole tree is ~80M parameters at the paper config).
  """
  picked = {}
  flat = flax.traverse_util.flatten_dict(params["model"], sep="/")
  for path, v in flat.items():
    if path.rsplit("/", 1)[-1] in ("alpha", "beta") and np.size(v) == 1:
      picked[f"scalars/{path}"] = v
  for name, v in flax.traverse_util.flatten_dict(
      params["loss"], sep="/"
  ).items():
    picked[f"loss_params/{name}"] = v
  out = {
      k: float(np.asarray(v).reshape(()))
      for k, v in jax.device_get(picked).items()
  }
  for k, v in list(out.items()):
    if k.startswith("loss_params/log_var_"):
      out[f"loss_params/weight_{k[len('loss_params/log_var_'):]}"] = math.exp(
          -v
      )
  return out


def _restore_or_init(
    trainer: Trainer, ckpt: checkpointing.Checkpointer, config
) -> tuple[TrainState, Optional[dict], int]:
  abstract = saveable_state(trainer.abstract_state())
  # Unreadable checkpoints are moved aside: training writes their steps again.
  restored = ckpt.restore(abstract, "latest", set_aside_unreadable=True)
  if restored is None:
    restored = ckpt.restore(abstract, "best", set_aside_unreadable=True)
  if restored is not None:
    state = TrainState(**restored["state"])
    step = int(restored["step"])
    logging.info(
        "Resuming from the checkpoint at step %d in %s", step, ckpt.root
    )
    print(f"Resuming from checkpoint at step {step} ({ckpt.root})", flush=True)
    state = trainer.fit_ema(state, f"the checkpoint at step {step}")
    return state, restored, step
  state = trainer.init_state(config.seed)
  if config.init_checkpoint:
    init = checkpointing.Checkpointer(
        config.init_checkpoint, keep=1, async_save=False
    )
    got = init.restore(abstract, "best") or init.restore(abstract, "latest")
    init.close()
    if got is None:
      raise checkpointing.CheckpointError(
          f"config.init_checkpoint={config.init_checkpoint}: no checkpoint"
      )
    state = state.replace(params=TrainState(**got["state"]).params)
    if trainer.ema_decay:  # the EMA starts from the loaded parameters
      state = state.replace(
          ema_params=jax.jit(_copy_float32, out_shardings=trainer.replicated)(
              state.params["model"]
          )
      )
    print(
        f"Initialised parameters from {config.init_checkpoint} "
        f"(step {got['step']})"
        f"{'; the EMA starts from them' if trainer.ema_decay else ''}",
        flush=True,
    )
  return state, None, 0


def train_and_evaluate(
    config: ml_collections.ConfigDict, workdir, mesh: Optional[Mesh] = None
) -> dict:
  """Trains per `config`, validating and checkpointing into `workdir`.

  Returns the final summary: validation scores of the best checkpoint and,
  for comparison, of the mean-training-dose baseline.

  The run holds `runlock.RunLock(workdir)` (a second run in the workdir is
  refused). SIGINT and SIGTERM (`interrupts`) stop training at the next step
  boundary with a checkpoint saved and raise `interrupts.Interrupted`
  ("interrupted at step N; ..."); before training they stop it at once,
  undoing what it built. In a multi-process run SIGTERM is JAX's preemption
  notice: every process stops at the step `reached_preemption_sync_point`
  agrees on.
  """
  workdir = pathlib.Path(workdir).expanduser()
  signals = interrupts.SIGNALS
  if jax.process_count() > 1:  # JAX's preemption service handles SIGTERM
    signals = (interrupts.signal.SIGINT,)
  with (
      runlock.RunLock(workdir, enabled=jax.process_index() == 0),
      interrupts.handled(signals),
  ):
    return _train_and_evaluate(config, workdir, mesh)


def _stop_workers(train_iter) -> None:
  """Stops grain's input worker processes and releases their shared memory
  (grain unlinks it from a thread pool: waited for, or the interpreter's
  exit would report it leaked)."""
  train_iter.close()
  gc.collect()
  try:
    from grain._src.python.ipc import shared_memory_array  # pylint: disable=g-import-not-at-top

    arrays = shared_memory_array.SharedMemoryArray
    pool = arrays._del_thread_pool  # pylint: disable=protected-access
  except (ImportError, AttributeError):  # another grain: nothing to wait for
    return
  if pool is not None:
    arrays._del_thread_pool = None  # pylint: disable=protected-access
    pool.close()
    pool.join()


def _should_stop(step: int) -> int:
  """The signal that stops training after `step` (0: go on)."""
  if interrupts.requested():
    return interrupts.requested()
  if jax.process_count() > 1:
    try:
      if multihost_utils.reached_preemption_sync_point(step):
        return int(interrupts.signal.SIGTERM)
    except RuntimeError:  # no preemption service in this run
      pass
  return 0


def _train_and_evaluate(config, workdir: pathlib.Path, mesh) -> dict:
  config_check.check_config(config)
  if config.batch_size % jax.device_count():
    raise ConfigError(
        f"config.batch_size={config.batch_size} must be divisible by the "
        f"number of devices ({jax.device_count()})."
    )
  # A failure before training (a bad patient, an unreadable checkpoint)
  # leaves the workdir as it was: no half-built cache, no empty folders;
  # checkpoints moved aside as unreadable stay where they were moved.
  with fileio.undo_new_files(
      workdir,
      enabled=jax.process_index() == 0,
      keep=(checkpointing.UNREADABLE_DIR,),
  ):
    workdir.mkdir(parents=True, exist_ok=True)
    train_cache, eval_cache, eval_dir = prepare_data(config, workdir)
    coarse_cache = prepare_coarse_data(config, workdir)
    trainer = Trainer.create(config, mesh)
    ckpt = checkpointing.Checkpointer(workdir, keep=config.keep_checkpoints)
    try:
      state, restored, start_step = _restore_or_init(trainer, ckpt, config)
    except BaseException:
      ckpt.close()
      raise

  # From here a signal stops training at a step boundary (`stop` below).
  interrupts.defer()
  local_batch = config.batch_size // jax.process_count()
  train_ds = pipeline.training_batches(
      train_cache,
      config,
      seed=config.seed,
      coarse_cache=coarse_cache,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
  )
  with interrupts.ignored_in_children():  # workers: the parent stops them
    train_iter = iter(train_ds)
    if restored is not None:
      try:
        train_iter.set_state(restored["data"])
      except (ValueError, KeyError, TypeError) as e:
        ckpt.close()
        _stop_workers(train_iter)
        raise checkpointing.CheckpointError(
            f"{ckpt.root}: the input position saved at step {start_step} "
            "does not fit this config's input pipeline (config.data."
            f"coarse_steps={config.data.get('coarse_steps', 0)}; it must be "
            "what it was when the run was saved); the checkpoint is "
            f"unchanged ({checkpointing.brief_error(e)})"
        ) from None
    # grain starts its worker processes with the first batch.
    first_batch = (
        next(train_iter) if start_step < config.num_train_steps else None
    )
  periodic = validation.ModelEvaluator(
      eval_cache, max_patients=config.max_eval_patients
  )
  best = checkpointing.best_meta(workdir)
  best_score = best["dose_score"] if best else math.inf
  config_dict = json.loads(config.to_json_best_effort())

  writer = MetricWriter(
      workdir, enabled=jax.process_index() == 0, resume_step=start_step
  )
  if start_step == 0:
    writer.write_hparams(config_dict)
  logging.info(
      "Training %s on %d devices (%d processes), local batch %d",
      config.model.name,
      jax.device_count(),
      jax.process_count(),
      local_batch,
  )
  _say(training_plan(config, len(eval_cache), start_step))
  bar = None
  if config.progress_bar and jax.process_index() == 0:
    import tqdm  # pylint: disable=g-import-not-at-top

    bar = tqdm.tqdm(
        total=config.num_train_steps,
        initial=start_step,
        unit="step",
        dynamic_ncols=True,
        desc="train",
    )

  pending, all_finite = [], jnp.ones((), bool)
  told_negative = False
  last_saved = start_step if restored is not None else None
  t0, compile_s = time.time(), None
  step = start_step

  def stop(done: int, signum: int, validation_pending: bool = False):
    """A signal: saves step `done` (waiting for a save in flight), stops
    the input workers and raises `Interrupted` with the line to print. A
    validation it cut short is marked in the checkpoint: run on resume."""
    if bar is not None:
      bar.close()
    if done > start_step and last_saved != done:
      meta = dict(step=done)
      if validation_pending:
        meta["validation_pending"] = True
      ckpt.save_latest(
          done,
          saveable_state(state),
          train_iter.get_state(),
          config_dict,
          meta,
      )
    ckpt.wait()
    ckpt.close()
    writer.close()
    _stop_workers(train_iter)
    saved = max(done, start_step) if (done > start_step or restored) else 0
    raise interrupts.Interrupted(
        signum,
        f"interrupted at step {done}; "
        + (f"checkpoint saved (step {saved})" if saved else "nothing to save")
        + "; run the same command to resume",
    )

  def validate(at: int):
    """The periodic validation of step `at`; a better score saves `best`."""
    nonlocal best_score
    try:
      scores = periodic.run(
          interrupts.Polling(
              trainer.predictor.with_params(trainer.eval_params(state)),
              "predict_doses",
          )
      )
    except interrupts.Interrupted as e:
      stop(at, e.signum, validation_pending=True)
    writer.write_scalars(at, {f"eval/{k}": v for k, v in scores.items()})
    msg = (
        f"step {at}: validation dose score {scores['dose_score']:.4f}, "
        f"DVH score {scores['dvh_score']:.4f} "
        f"({scores['num_patients']} patients)"
    )
    if scores["dose_score"] < best_score:
      best_score = scores["dose_score"]
      ckpt.save_best(
          at,
          saveable_state(state),
          train_iter.get_state(),
          config_dict,
          dict(step=at, **scores),
      )
      msg += " (best so far)"
    logging.info(msg)
    _console(bar, msg)

  if restored is not None and restored["meta"].get("validation_pending"):
    validate(start_step)  # the one an interrupt cut short
  for step in range(start_step + 1, config.num_train_steps + 1):
    if signum := _should_stop(step - 1):
      stop(step - 1, signum)
    batch = trainer.shard_batch(
        next(train_iter) if first_batch is None else first_batch
    )
    first_batch = None
    state, metrics = trainer.jit_train_step(state, batch)
    all_finite = jnp.logical_and(all_finite, metrics["finite"])
    pending.append(metrics)
    if compile_s is None:
      jax.block_until_ready(metrics["loss"])
      compile_s = time.time() - t0
      writer.write_scalars(step, {"perf/first_step_seconds": compile_s})
      t0, t0_step = time.time(), step
    if bar is not None:
      bar.update(1)
    is_last = step == config.num_train_steps
    do_log = step % config.log_every_steps == 0 or is_last
    do_eval = step % config.eval_every_steps == 0 or is_last
    do_ckpt = step % config.checkpoint_every_steps == 0 or is_last
    if do_log or do_ckpt or do_eval:
      if not bool(all_finite):
        ckpt.wait()
        where = (
            f"the last good checkpoint is step {last_saved} in {ckpt.root}"
            if last_saved
            else "no checkpoint was saved"
        )
        msg = (
            f"Training stopped: the loss became NaN or infinite between "
            f"step {step - len(pending) + 1} and step {step}; {where}. "
            "Try a lower learning rate or config.grad_clip_norm."
        )
        if bar is not None:
          bar.close()
        writer.close()
        ckpt.close()
        raise NonFiniteLossError(msg)
    if do_log and pending:
      host = jax.device_get(pending)
      summary = {
          f"train/{k}": float(np.mean([m[k] for m in host]))
          for k in host[0]
          if k != "finite"
      }
      elapsed = time.time() - t0
      if step > t0_step:
        summary["perf/steps_per_second"] = (step - t0_step) / max(elapsed, 1e-9)
      summary.update(learned_scalars(state.params))
      writer.write_scalars(step, summary)
      if bar is not None:
        bar.set_postfix(loss=f"{summary['train/loss']:.4f}")
      if summary["train/loss"] < 0 and not told_negative:
        told_negative = True
        _console(bar, negative_loss_note(step, summary))
      pending = []
    if do_eval:
      validate(step)
    if do_ckpt:
      ckpt.save_latest(
          step,
          saveable_state(state),
          train_iter.get_state(),
          config_dict,
          dict(step=step),
      )
      last_saved = step
  if bar is not None:
    bar.close()
  if signum := _should_stop(step):
    stop(step, signum)
  ckpt.wait()

  try:
    summary = finish(
        trainer, ckpt, state, train_cache, eval_cache, workdir, config
    )
  except BaseException as e:
    writer.close()
    ckpt.close()
    if not isinstance(e, interrupts.Interrupted):
      raise
    raise interrupts.Interrupted(
        e.signum,
        f"interrupted during the final validation (training is complete: "
        f"step {step} saved); its predictions were not written; run the "
        "same command to write them",
    ) from None
  writer.write_scalars(
      step,
      {
          f"final/{k}": v
          for k, v in summary.items()
          if isinstance(v, (int, float))
      },
  )
  writer.close()
  ckpt.close()
  return summary


def finish(trainer, ckpt, state, train_cache, eval_cache, workdir, config):
  """Scores the best checkpoint, writes its validation predictions + zip."""
  abstract = saveable_state(trainer.abstract_state())
  best = ckpt.restore(abstract, "best")
  # The best checkpoint's EMA when it holds one (what chose it), as predict
  # and export do.
  final = TrainState(**best["state"]) if best else state
  best_step = best["step"] if best else int(state.step)
  return validation.final_validation(
      interrupts.Polling(
          trainer.predictor.with_params(trainer.eval_params(final)),
          "predict_doses",
      ),
      best_step,
      final.ema_params is not None,
      train_cache,
      eval_cache,
      workdir,
      config,
  )


def _say(msg: str) -> None:
  """One line in the log and (process 0) on the console."""
  logging.info(msg)
  if jax.process_index() == 0:
    print(msg, flush=True)


def _console(bar, msg: str) -> None:
  """A line for the user (process 0), above the progress bar if there is
  one."""
  if bar is not None:
    bar.write(msg)
  elif jax.process_index() == 0:
    print(msg, flush=True)


def training_plan(config, num_eval: int, start_step: int) -> str:
  """What the run will do, said once at the start: steps, and how many
  validation patients the periodic validations and the final one score."""
  periodic = (
      min(num_eval, config.max_eval_patients)
      if config.max_eval_patients
      else num_eval
  )
  some = (
      f"the first {periodic} of the {num_eval} validation patients "
      f"(config.max_eval_patients)"
      if periodic < num_eval
      else f"all {num_eval} validation patients"
  )
  start = f" from step {start_step}" if start_step else ""
  decay = ema_decay_of(config)
  which = (
      f"the exponential moving average of the model parameters "
      f"(config.ema_decay={decay:g}), also in the checkpoints, predict "
      f"and export"
      if decay
      else "the trained parameters (config.ema_decay=0: no moving average)"
  )
  coarse = config.data.get("coarse_steps", 0)
  grid = (
      f" (the first {coarse} on the whole grid reduced by "
      f"{config.data.coarse_downsample}: config.data.coarse_steps)"
      if coarse
      else ""
  )
  return (
      f"Training {config.model.name} for {config.num_train_steps} steps"
      f"{grid}{start}, batch {config.batch_size}; every "
      f"{config.eval_every_steps} steps and at the end a validation "
      f"scores {some}; then the best checkpoint is scored on all "
      f"{num_eval} and its predictions written. Validation uses "
      f"{which}."
  )


def negative_loss_note(step: int, summary: dict) -> str:
  """Why the printed loss can be below 0 (said once)."""
  l1 = summary.get("train/l1_all")
  l1_text = (
      f" (step {step}: L1 over all voxels {l1:.4f})" if l1 is not None else ""
  )
  return (
      f"note: the loss is negative from step {step}: with the learned "
      "region weights (config.loss.mode='uncertainty') each region adds "
      "exp(-s) * L1 + s, and its log-variance s goes below 0 as the "
      "weight exp(-s) grows; the L1 terms themselves stay >= 0"
      f"{l1_text}. Compare runs by the validation scores."
  )
