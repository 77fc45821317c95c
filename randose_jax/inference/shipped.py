"""Models shipped inside the package: predict without training first.

Each shipped model is a folder `randose_jax/inference/shipped_models/<name>/` holding
  params.msgpack  the model parameters that predict (the EMA when the run
                  kept one), `flax.serialization.msgpack_serialize` of the
                  parameter tree;
  config.json     the training run's config (model, data encoding, crops);
  card.json       what the model card says, as data: training patients,
                  recipe, steps, wall time, machine, validation scores, the
                  scores on the 6 shared validation patients the tests
                  check, the parameters' SHA-256;
  MODEL_CARD.md   the card for people: intended use (research, not
                  clinical decisions) and known limits.

`load(name)` gives a `restore.Restored` like a training workdir does, so
`predict`, `evaluate --model` and `export` take either. `ship(workdir,
name, ...)` writes such a folder from a trained workdir (its best
checkpoint), refusing to replace an existing one unless asked.
"""

from __future__ import annotations

import hashlib
import json
import pathlib
from typing import Optional

import flax.serialization
import jax
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from randose_jax import checkpointing
from randose_jax import distributed
from randose_jax import fileio
from randose_jax.inference import restore
from randose_jax.default_config import ConfigError
from randose_jax.inference.predictor import Predictor

ROOT = pathlib.Path(__file__).resolve().parent / "shipped_models"
PARAMS_FILE = "params.msgpack"
CONFIG_FILE = "config.json"
CARD_FILE = "card.json"
MAX_PARAM_BYTES = 25 * 2**20  # what a package can reasonably carry


def available(root: pathlib.Path = ROOT) -> list[str]:
  """Names of the shipped models (folders holding params and config)."""
  if not root.is_dir():
    return []
  return sorted(
      d.name
      for d in root.iterdir()
      if (d / PARAMS_FILE).is_file() and (d / CONFIG_FILE).is_file()
  )


def default_name(root: pathlib.Path = ROOT) -> str:
  """The model `predict` uses without --model: the only one, or the one
  named in `<root>/DEFAULT`."""
  names = available(root)
  if not names:
    raise ConfigError(
        f"no shipped model in {root}: pass --workdir (a training run)"
    )
  default = root / "DEFAULT"
  if default.is_file():
    name = default.read_text().strip()
    if name in names:
      return name
  if len(names) > 1:
    raise ConfigError(
        f"several shipped models ({', '.join(names)}): choose one with --model"
    )
  return names[0]


def folder(name: Optional[str] = None, root: pathlib.Path = ROOT):
  """The folder of shipped model `name` (default: `default_name`)."""
  name = name or default_name(root)
  if name not in available(root):
    raise ConfigError(
        f"--model={name}: no such shipped model; available: "
        f"{', '.join(available(root)) or 'none'}"
    )
  return root / name


def card(name: Optional[str] = None, root: pathlib.Path = ROOT) -> dict:
  """The model's card.json (recorded scores, recipe, machine)."""
  return json.loads((folder(name, root) / CARD_FILE).read_text())


def _sha256(path: pathlib.Path) -> str:
  return hashlib.sha256(path.read_bytes()).hexdigest()


def load(
    name: Optional[str] = None,
    mesh=None,
    conv_impl: Optional[str] = None,
    root: pathlib.Path = ROOT,
) -> restore.Restored:
  """A shipped model as a `Restored` (which = 'shipped:<name>').

  The parameters' SHA-256 is checked against the card: a damaged or
  replaced file is a `CheckpointError` naming it.
  """
  from randose_jax.ops import conv_planner  # pylint: disable=g-import-not-at-top

  where = folder(name, root)
  meta = json.loads((where / CARD_FILE).read_text())
  params_path = where / PARAMS_FILE
  if (
      meta.get("params_sha256")
      and _sha256(params_path) != meta["params_sha256"]
  ):
    raise checkpointing.CheckpointError(
        f"{params_path}: does not match the SHA-256 in {where / CARD_FILE} "
        "(damaged or replaced; reinstall the package)"
    )
  config = ml_collections.ConfigDict(
      json.loads((where / CONFIG_FILE).read_text())
  )
  if conv_impl is not None:
    conv_planner.check_conv_impl(conv_impl)
    config.model.conv_impl = conv_impl
  try:
    params = flax.serialization.msgpack_restore(params_path.read_bytes())
  except Exception as e:  # msgpack raises several kinds
    raise checkpointing.CheckpointError(
        f"{params_path}: unreadable parameters ({type(e).__name__}: {e})"
    ) from e
  mesh = mesh or distributed.make_mesh()
  params = jax.device_put(
      jax.tree.map(np.asarray, params), NamedSharding(mesh, P())
  )
  ema = bool(meta.get("ema", False))
  return restore.Restored(
      config=config,
      predictor=Predictor.create(config, params, mesh),
      params={"model": params, "loss": {}},
      step=int(meta.get("steps", meta.get("checkpoint_step", 0))),
      which=f"shipped:{where.name}",
      ema_params=params if ema else None,
  )


def ship(
    workdir,
    name: str,
    card_fields: dict,
    *,
    checkpoint: str = "best",
    root: pathlib.Path = ROOT,
    overwrite: bool = False,
) -> pathlib.Path:
  """Writes the shipped-model folder `root/name` from a trained workdir.

  The parameters are those `predict` would use (`Restored.model_params`),
  as float32; `card_fields` go into card.json with the checkpoint step,
  whether they are the EMA, their count, size and SHA-256. MODEL_CARD.md
  is written by hand beside them. Refuses more than `MAX_PARAM_BYTES`.
  """
  restored = restore.restore_from_workdir(workdir, checkpoint)
  params = jax.tree.map(
      lambda x: np.asarray(x, np.float32), jax.device_get(restored.model_params)
  )
  blob = flax.serialization.msgpack_serialize(params)
  if len(blob) > MAX_PARAM_BYTES:
    raise ConfigError(
        f"{workdir}: parameters of {len(blob) / 2**20:.1f} MiB exceed the "
        f"{MAX_PARAM_BYTES / 2**20:.0f} MiB a shipped model may hold"
    )
  out = root / name
  if out.exists() and not overwrite:
    raise FileExistsError(f"{out}: a shipped model of that name exists")
  out.mkdir(parents=True, exist_ok=True)
  with fileio.atomic_output(out / PARAMS_FILE, overwrite=True) as f:
    f.write(blob)
  config = restored.config.to_dict()
  config["init_checkpoint"] = ""
  config["data"]["root"] = ""
  config["data"]["cache_dir"] = ""
  with fileio.atomic_output(out / CONFIG_FILE, overwrite=True) as f:
    f.write(json.dumps(config, indent=2, default=list).encode())
  meta = dict(card_fields)
  meta.update(
      name=name,
      checkpoint_step=restored.step,
      ema=restored.uses_ema,
      num_params=int(sum(np.size(x) for x in jax.tree.leaves(params))),
      params_bytes=len(blob),
      params_sha256=hashlib.sha256(blob).hexdigest(),
  )
  with fileio.atomic_output(out / CARD_FILE, overwrite=True) as f:
    f.write(json.dumps(meta, indent=2).encode())
  return out
