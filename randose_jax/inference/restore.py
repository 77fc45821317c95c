"""Rebuild a trained model from its workdir: config + parameters.

`Restored.model_params` are the parameters to predict with: the moving
average of the model parameters when the checkpoint holds one (a run with
`config.ema_decay > 0`), else the trained parameters. `Restored.predictor`
is the model with them (`predict`, `export`); nothing of the training (an
optimizer, the loss, the train state's shapes) is built: the checkpoint is
read as saved.
"""

import dataclasses
import pathlib
from typing import Any, Optional

import ml_collections
from jax.sharding import NamedSharding, PartitionSpec as P

from randose_jax import checkpointing
from randose_jax import distributed
from randose_jax.default_config import ConfigError
from randose_jax.inference import predictor as predictor_lib
from randose_jax.inference.predictor import Predictor


@dataclasses.dataclass
class Restored:
  config: ml_collections.ConfigDict
  predictor: Predictor  # the model with `model_params`
  params: Any  # {'model': ..., 'loss': ...}: the trained parameters
  step: int
  which: str
  ema_params: Any = None  # the EMA of params['model'], when saved

  @property
  def uses_ema(self) -> bool:
    return self.ema_params is not None

  @property
  def model_params(self):
    """What predict and export use (`predictor.params_to_predict`)."""
    return predictor_lib.params_to_predict(self.params, self.ema_params)


def parse_checkpoint_flag(value: str) -> tuple[str, Optional[int]]:
  """'best' | 'latest' | STEP -> (kind, step)."""
  if value in ("best", "latest"):
    return value, None
  try:
    return "latest", int(value)
  except ValueError:
    raise ConfigError(
        f"--checkpoint must be best, latest or a step number, got {value!r}"
    ) from None


def check_workdir(workdir) -> pathlib.Path:
  """The workdir as a path; CheckpointError unless it holds checkpoints/
  (a cheap check before the seconds of building the model)."""
  workdir = pathlib.Path(workdir).expanduser()
  if not (workdir / "checkpoints").is_dir():
    raise checkpointing.CheckpointError(
        f"{workdir}: no checkpoints/ folder (is this a training workdir?)"
    )
  return workdir


def restore_from_workdir(
    workdir,
    checkpoint: str = "best",
    mesh=None,
    conv_impl: Optional[str] = None,
) -> Restored:
  """Model, config and parameters of a trained workdir.

  `checkpoint='best'` falls back to the latest checkpoint when the run never
  validated (no best checkpoint yet). `conv_impl` ('auto', 'direct' or
  'fft'), when given, replaces the run's `model.conv_impl`: the parameters
  are the same for every algorithm, so e.g. 'direct' predicts with a
  quarter of the memory of the CPU's FFT plan (benchmarks/NOTES.md).
  """
  from randose_jax.ops import conv_planner  # pylint: disable=g-import-not-at-top

  if conv_impl is not None:
    conv_planner.check_conv_impl(conv_impl)
  workdir = check_workdir(workdir)
  which, step = parse_checkpoint_flag(checkpoint)
  ckpt = checkpointing.Checkpointer(workdir, keep=1, async_save=False)
  try:
    if which == "best" and not ckpt.steps("best"):
      which = "latest"
    _, config_dict = checkpointing.read_config_dict(workdir, which, step)
    config = ml_collections.ConfigDict(config_dict)
    if conv_impl is not None:
      config.model.conv_impl = conv_impl
    mesh = mesh or distributed.make_mesh()
    got = ckpt.restore(None, which, step, sharding=NamedSharding(mesh, P()))
  finally:
    ckpt.close()
  if got is None:
    raise checkpointing.CheckpointError(f"{workdir}: no {which} checkpoint")
  params = got["state"]["params"]
  ema_params = got["state"].get(predictor_lib.EMA_KEY)
  predictor = Predictor.create(
      config, predictor_lib.params_to_predict(params, ema_params), mesh
  )
  return Restored(
      config=config,
      predictor=predictor,
      params=params,
      step=int(got["step"]),
      which=which,
      ema_params=ema_params,
  )
