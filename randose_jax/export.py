r"""Export a trained model as a self-contained inference artifact.

  python -m randose_jax.export --workdir=runs/randose --output=randose.zip \
      [--checkpoint=best] [--tta] [--conv_impl=direct] [--overwrite]

The artifact is one zip file:
  model.jaxexport   `jax.export` serialization of the forward pass (StableHLO)
                    with a symbolic batch size, for CPU and CUDA;
  params.msgpack    the model parameters (flax msgpack): their moving
                    average when the run kept one (config.ema_decay > 0);
  meta.json         input keys/channels, grid, dose scale, versions.
`load(path)` runs it without building the model (no Flax module code needed):

  model = randose_jax.export.load("randose.zip")
  dose_target_units = model({"ptv": ptv, "ct": ct, "oar": oar})  # (N,D,H,W,1)

--output is checked before the model is traced (its folder writable, no
artifact there unless --overwrite) and written atomically: a failure leaves
it as it was. A problem is one `error:` line naming the path (exit 2).
"""

import json
import pathlib
import zipfile

from absl import app
from absl import flags
import flax.serialization
import jax
import jax.numpy as jnp
import numpy as np

from randose_jax import cli
from randose_jax import fileio
from randose_jax import inference
from randose_jax import logs
from randose_jax import restore
from randose_jax import shipped
from randose_jax.conventions import INPUT_CHANNELS
from randose_jax.data import encoding

FORMAT_VERSION = 1
DEFAULT_PLATFORMS = ("cpu", "cuda")


def _input_specs(grid, batch, channels=None):
  channels = INPUT_CHANNELS if channels is None else channels
  return {
      k: jax.ShapeDtypeStruct((batch, *grid, c), jnp.float32)
      for k, c in channels.items()
  }


def export_model(
    model,
    model_params,
    grid,
    *,
    tta=False,
    swap_parotids=True,
    platforms=DEFAULT_PLATFORMS,
    channels=None,
):
  """`jax.export.Exported` of params, inputs -> (N, *grid, 1) float32
  (`channels`: the inputs, `encoding.input_channels(config.data)`).

  Traced once for every platform: the convs are computed the way
  `model.conv_impl` plans them on the exporting backend (with 'auto' on a
  CPU: FFT where cheaper, planned for one sample), which is the same math on
  every platform."""

  def forward(params, inputs):
    apply_fn = inference.make_apply_fn(model, params)
    return inference.predict(
        apply_fn, inputs, tta=tta, swap_parotids=swap_parotids
    )

  (batch,) = jax.export.symbolic_shape("b")
  param_specs = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype),
      model_params,
  )
  return jax.export.export(jax.jit(forward), platforms=tuple(platforms))(
      param_specs, _input_specs(grid, batch, channels)
  )


def save_artifact(
    path, exported, model_params, meta: dict, *, overwrite: bool = False
) -> pathlib.Path:
  """Writes the artifact zip atomically (`fileio.atomic_output`)."""
  path = pathlib.Path(path)
  params_np = jax.tree.map(np.asarray, jax.device_get(model_params))
  with fileio.atomic_output(path, overwrite=overwrite) as f:
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
      zf.writestr("model.jaxexport", bytes(exported.serialize()))
      zf.writestr(
          "params.msgpack", flax.serialization.msgpack_serialize(params_np)
      )
      zf.writestr("meta.json", json.dumps(meta, indent=2))
  return path


class ExportedModel:
  """A loaded artifact: call it with the encoded inputs."""

  def __init__(self, exported, params, meta):
    self.exported = exported
    self.params = params
    self.meta = meta

  @property
  def grid(self):
    return tuple(self.meta["grid"])

  def __call__(self, inputs) -> np.ndarray:
    """inputs: {'ptv','ct','oar'} (and 'geom' for a model trained with the
    distance channels, `meta['inputs']`) float32 (N, D, H, W, C) ->
    (N, D, H, W, 1)."""
    args = {}
    for k, c in self.meta.get("inputs", INPUT_CHANNELS).items():
      if k not in inputs:
        raise ValueError(f"exported model: missing input {k!r}")
      x = jnp.asarray(inputs[k], jnp.float32)
      if x.ndim != 5 or x.shape[1:] != (*self.grid, c):
        raise ValueError(
            f"exported model: input {k!r} has shape {x.shape}, "
            f"expected (N, {', '.join(map(str, self.grid))}, {c})"
        )
      args[k] = x
    return np.asarray(self.exported.call(self.params, args))


def load(path) -> ExportedModel:
  """Loads an artifact written by `export` (no model code is built)."""
  path = pathlib.Path(path)
  try:
    with zipfile.ZipFile(path) as zf:
      names = set(zf.namelist())
      missing = {"model.jaxexport", "params.msgpack", "meta.json"} - names
      if missing:
        raise ValueError(
            f"{path}: not a randose_jax export (missing {sorted(missing)})"
        )
      meta = json.loads(zf.read("meta.json"))
      exported = jax.export.deserialize(bytearray(zf.read("model.jaxexport")))
      params = flax.serialization.msgpack_restore(zf.read("params.msgpack"))
  except zipfile.BadZipFile as e:
    raise ValueError(f"{path}: not a zip file ({e})") from e
  if meta.get("format_version") != FORMAT_VERSION:
    raise ValueError(
        f"{path}: format version {meta.get('format_version')}, "
        f"this library reads {FORMAT_VERSION}"
    )
  return ExportedModel(exported, params, meta)


def export_workdir(
    workdir,
    output,
    checkpoint="best",
    tta=False,
    platforms=DEFAULT_PLATFORMS,
    conv_impl=None,
    *,
    overwrite: bool = False,
) -> pathlib.Path:
  """Exports a workdir's checkpoint; `conv_impl` overrides the run's
  `model.conv_impl` (e.g. 'direct' for an artifact meant for a GPU, where
  cuDNN's direct convolutions are the fast path, or for less memory).

  `output` is checked first (FileExistsError if it exists and not
  `overwrite`, an OSError naming it if it cannot be written), before the
  seconds of restoring and tracing."""
  fileio.check_output_file(output, overwrite=overwrite)
  restored = restore.restore_from_workdir(
      workdir, checkpoint, conv_impl=conv_impl
  )
  return export_restored(
      restored, output, tta=tta, platforms=platforms, overwrite=overwrite
  )


def export_restored(
    restored: restore.Restored,
    output,
    *,
    tta=False,
    platforms=DEFAULT_PLATFORMS,
    overwrite: bool = False,
) -> pathlib.Path:
  """Exports a restored model (a workdir's checkpoint or a shipped model,
  `shipped.load`). A model trained on crops is exported at its window
  (`meta['window']`): tile the patient's box with it as
  `Predictor.predict_examples` does."""
  fileio.check_output_file(output, overwrite=overwrite)
  config = restored.config
  grid = _training_grid(config)
  model_params = restored.model_params  # the EMA when the run kept one
  exported = export_model(
      restored.predictor.model,
      model_params,
      grid,
      tta=tta,
      swap_parotids=config.data.swap_parotids,
      platforms=platforms,
      channels=encoding.input_channels(config.data),
  )
  meta = {
      "format_version": FORMAT_VERSION,
      "grid": list(grid),
      "window": list(config.data.get("crop_shape", ()) or ()),
      "window_overlap": float(config.data.get("window_overlap", 0.5)),
      "inputs": encoding.input_channels(config.data),
      "output": "dose / dose_scale, (N, D, H, W, 1) float32",
      "dose_scale_gy": float(config.data.dose_scale),
      "downsample": int(config.data.downsample),
      "tta": bool(tta),
      "platforms": list(exported.platforms),
      "checkpoint": restored.which,
      "checkpoint_step": restored.step,
      "ema": restored.uses_ema,
      "conv_impl": config.model.conv_impl,
      "jax_version": jax.__version__,
      "config": json.loads(config.to_json_best_effort()),
  }
  return save_artifact(
      output, exported, model_params, meta, overwrite=overwrite
  )


def _training_grid(config):
  """The grid the model sees: a crop-trained model's window, else OpenKBP's
  128^3 (or the phantom grid) reduced by config.data.downsample."""
  window = tuple(config.data.get("crop_shape", ()) or ())
  if window:
    return tuple(int(n) for n in window)
  edge = config.data.synthetic_grid if config.data.synthetic else 128
  return encoding.training_grid((edge,) * 3, config.data.downsample)


FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string(
      "workdir",
      None,
      "Training workdir holding checkpoints/ (or --model).",
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      "model",
      None,
      "A shipped model's name (randose_jax/shipped_models/), instead of "
      "--workdir.",
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      "output", None, "Artifact path (.zip).", flag_values=flag_values
  )
  flags.DEFINE_string(
      "checkpoint",
      "best",
      "best, latest or a step number.",
      flag_values=flag_values,
  )
  flags.DEFINE_bool(
      "tta",
      False,
      "Bake 4-flip test-time augmentation in.",
      flag_values=flag_values,
  )
  flags.DEFINE_list(
      "platforms",
      list(DEFAULT_PLATFORMS),
      "Platforms to lower for (cpu, cuda, rocm, tpu).",
      flag_values=flag_values,
  )
  flags.DEFINE_enum(
      "conv_impl",
      None,
      ["auto", "direct", "fft"],
      "Override the run's model.conv_impl for the export "
      "(the convolutions are traced once, on this backend): "
      "'direct' for an artifact to run on GPUs, or for less "
      "memory.",
      flag_values=flag_values,
  )
  flags.DEFINE_bool(
      "overwrite",
      False,
      "Replace an artifact already at --output.",
      flag_values=flag_values,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_library_logs()
  if not FLAGS.output:
    raise app.UsageError("--output is required")
  if bool(FLAGS.workdir) == bool(FLAGS.model):
    raise app.UsageError("give one of --workdir and --model")
  if FLAGS.workdir:
    path = export_workdir(
        FLAGS.workdir,
        FLAGS.output,
        FLAGS.checkpoint,
        FLAGS.tta,
        tuple(FLAGS.platforms),
        FLAGS.conv_impl,
        overwrite=FLAGS.overwrite,
    )
    source = f"{FLAGS.workdir} ({FLAGS.checkpoint})"
  else:
    fileio.check_output_file(FLAGS.output, overwrite=FLAGS.overwrite)
    restored = shipped.load(FLAGS.model, conv_impl=FLAGS.conv_impl)
    path = export_restored(
        restored,
        FLAGS.output,
        tta=FLAGS.tta,
        platforms=tuple(FLAGS.platforms),
        overwrite=FLAGS.overwrite,
    )
    source = f"the shipped model {FLAGS.model}"
  size = path.stat().st_size / 2**20
  print(f"Exported {source} to {path} ({size:.1f} MiB)")


if __name__ == "__main__":
  define_flags()
  cli.run(main)
