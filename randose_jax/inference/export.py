"""A trained model as an artifact that stands alone (`randose-export`).

The artifact is one zip file (format `FORMAT_VERSION`):
  model.jaxexport   `jax.export` serialization (StableHLO, CPU and CUDA) of
                    the whole prediction path (`standalone.make_predict_fn`):
                    fn(params, ct_hu, structure_masks, possible_dose_mask,
                    voxel_dimensions) -> dose in Gy on the patient's grid,
                    clipped at 0, zero outside the mask; encoding, distance
                    channels, windows and decoding happen inside;
  params.npz        the model parameters as numpy arrays arr_0, arr_1, ...
                    in the order the function takes them (their moving
                    average when the run kept one, config.ema_decay > 0);
  meta.json         the grid, the inputs' shapes and dtypes, the parameter
                    paths, versions, the run's config.
It runs with only jax and numpy installed (README, "Export"); in this
library `load(path)(ct_hu, structure_masks, possible_dose_mask,
voxel_dimensions)` or `load(path).predict_patient(patient)` does the same.
One patient per call (no batch axis).

The output is checked before the model is traced (its folder writable, no
artifact there unless overwrite) and written atomically: a failure leaves
it as it was.
"""

import io
import json
import pathlib
import zipfile

import jax
import jax.numpy as jnp
import numpy as np

from randose_jax import conventions
from randose_jax import fileio
from randose_jax.data import encoding
from randose_jax.inference import restore
from randose_jax.inference import standalone

# 2: the function takes the user's arrays and returns Gy (standalone), the
# parameters are params.npz; 1 took the encoded inputs (params.msgpack).
FORMAT_VERSION = 2
DEFAULT_PLATFORMS = ("cpu", "cuda")
MODEL_FILE, PARAMS_FILE, META_FILE = (
    "model.jaxexport",
    "params.npz",
    "meta.json",
)


def input_specs(grid) -> dict:
  """The function's inputs after the parameters, in call order."""
  grid = tuple(int(n) for n in grid)
  return {
      "ct_hu": jax.ShapeDtypeStruct(grid, jnp.float32),
      "structure_masks": jax.ShapeDtypeStruct(
          (*grid, len(conventions.ROI_NAMES)), jnp.bool_
      ),
      "possible_dose_mask": jax.ShapeDtypeStruct(grid, jnp.bool_),
      "voxel_dimensions": jax.ShapeDtypeStruct((3,), jnp.float32),
  }


def export_model(
    model,
    model_params,
    data_config,
    grid,
    *,
    tta=False,
    platforms=DEFAULT_PLATFORMS,
):
  """`jax.export.Exported` of (flat parameter list, *`input_specs(grid)`)
  -> float32 `grid` Gy (`standalone.make_predict_fn`).

  Traced once for every platform: the convs are computed the way
  `model.conv_impl` plans them on the exporting backend (with 'auto' on a
  CPU: FFT where cheaper), which is the same math on every platform."""
  leaves, treedef = jax.tree.flatten(model_params)
  fn = standalone.make_predict_fn(model, data_config, tta=tta)
  flat_fn = lambda flat, *args: fn(jax.tree.unflatten(treedef, flat), *args)
  param_specs = [
      jax.ShapeDtypeStruct(np.shape(x), jnp.asarray(x).dtype) for x in leaves
  ]
  return jax.export.export(jax.jit(flat_fn), platforms=tuple(platforms))(
      param_specs, *input_specs(grid).values()
  )


def _param_paths(model_params) -> list[str]:
  paths, _ = jax.tree_util.tree_flatten_with_path(model_params)
  return ["/".join(str(k.key) for k in path) for path, _ in paths]


def save_artifact(
    path, exported, model_params, meta: dict, *, overwrite: bool = False
) -> pathlib.Path:
  """Writes the artifact zip atomically (`fileio.atomic_output`)."""
  path = pathlib.Path(path)
  leaves = [
      np.asarray(x) for x in jax.tree.leaves(jax.device_get(model_params))
  ]
  meta = dict(meta, params=_param_paths(model_params))
  params = io.BytesIO()
  np.savez(params, *leaves)
  with fileio.atomic_output(path, overwrite=overwrite) as f:
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as zf:
      zf.writestr(MODEL_FILE, bytes(exported.serialize()))
      zf.writestr(PARAMS_FILE, params.getvalue())
      zf.writestr(META_FILE, json.dumps(meta, indent=2))
  return path


class ExportedModel:
  """A loaded artifact: call it with one patient's arrays."""

  def __init__(self, exported, flat_params: list, meta: dict):
    self.exported = exported
    self.flat_params = flat_params
    self.meta = meta
    self._call = jax.jit(exported.call)  # compiled once, on the first call

  @property
  def grid(self) -> tuple:
    return tuple(self.meta["grid"])

  @property
  def params(self) -> dict:
    """The parameters as the nested dict they were exported from."""
    tree = {}
    for name, x in zip(self.meta["params"], self.flat_params):
      *parents, leaf = name.split("/")
      node = tree
      for p in parents:
        node = node.setdefault(p, {})
      node[leaf] = x
    return tree

  def __call__(
      self, ct_hu, structure_masks, possible_dose_mask, voxel_dimensions
  ) -> np.ndarray:
    """float32 (D, H, W) Gy of ct_hu (D, H, W) HU, structure_masks
    (D, H, W, 10) (`conventions.ROI_NAMES` order), possible_dose_mask
    (D, H, W) and voxel_dimensions (3,) mm; (D, H, W) is `grid`."""
    args = []
    given = (ct_hu, structure_masks, possible_dose_mask, voxel_dimensions)
    for (name, spec), x in zip(input_specs(self.grid).items(), given):
      x = np.asarray(x)
      if x.shape != spec.shape:
        raise ValueError(
            f"exported model: {name} has shape {x.shape}, expected "
            f"{spec.shape}"
        )
      args.append(x.astype(spec.dtype))
    return np.asarray(self._call(self.flat_params, *args))

  def predict_patient(self, patient) -> np.ndarray:
    """The dose of a `Patient` (its stored CT is HU + `CT_OFFSET`)."""
    return self(
        np.asarray(patient.ct, np.float32) - np.float32(conventions.CT_OFFSET),
        patient.structure_masks,
        patient.possible_dose_mask,
        patient.voxel_dimensions,
    )


def load(path) -> ExportedModel:
  """Loads an artifact written by `export` (no model code is built)."""
  path = pathlib.Path(path)
  try:
    with zipfile.ZipFile(path) as zf:
      names = set(zf.namelist())
      if META_FILE not in names:
        raise ValueError(f"{path}: not a randose_jax export (no {META_FILE})")
      meta = json.loads(zf.read(META_FILE))
      version = meta.get("format_version")
      if version != FORMAT_VERSION:
        age = (
            "an older"
            if isinstance(version, int) and version < FORMAT_VERSION
            else "a newer or unknown"
        )
        raise ValueError(
            f"{path}: artifact format version {version} ({age} export), "
            f"this library reads version {FORMAT_VERSION}: export the model "
            "again with this library (or load it with the one that wrote it)"
        )
      missing = {MODEL_FILE, PARAMS_FILE} - names
      if missing:
        raise ValueError(
            f"{path}: not a randose_jax export (missing {sorted(missing)})"
        )
      exported = jax.export.deserialize(bytearray(zf.read(MODEL_FILE)))
      with np.load(io.BytesIO(zf.read(PARAMS_FILE))) as npz:
        flat = [npz[f"arr_{i}"] for i in range(len(npz.files))]
  except zipfile.BadZipFile as e:
    raise ValueError(f"{path}: not a zip file ({e})") from e
  return ExportedModel(exported, flat, meta)


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
  `shipped.load`) as the standalone function on its patient grid."""
  fileio.check_output_file(output, overwrite=overwrite)
  config = restored.config
  grid = patient_grid(config)
  model_params = restored.model_params  # the EMA when the run kept one
  exported = export_model(
      restored.predictor.model,
      model_params,
      config.data,
      grid,
      tta=tta,
      platforms=platforms,
  )
  meta = {
      "format_version": FORMAT_VERSION,
      "grid": list(grid),
      "inputs": {
          name: {"shape": list(spec.shape), "dtype": str(spec.dtype)}
          for name, spec in input_specs(grid).items()
      },
      "roi_names": list(conventions.ROI_NAMES),
      "output": "dose in Gy, float32 grid, clipped at 0, 0 outside the mask",
      "batch": "none: one patient per call",
      "window": list(restored.predictor.window),
      "downsample": int(config.data.downsample),
      "geometry": encoding.geometry_spec(config.data) is not None,
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


def patient_grid(config) -> tuple:
  """The patients' grid of a run: OpenKBP's `GRID_SHAPE`, or the phantom
  grid of a synthetic run."""
  if config.data.synthetic:
    return (int(config.data.synthetic_grid),) * 3
  return tuple(conventions.GRID_SHAPE)
