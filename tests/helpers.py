"""Helpers the tests share (not part of the library).

invoke             run a command's `main` in this process, as `cli.run`
                   would, and return its exit status
evaluate_baseline  the mean-dose baseline's scores in one call
read_nifti         a NIfTI dose file back into the project's axis order
                   (an independent reader: nibabel's orientation tools)
"""

import sys
from pathlib import Path
from typing import Callable, Sequence

from absl import flags
from absl import logging
import numpy as np

from randose_jax.cli import common
from randose_jax.training import validation


def command_module(tool: str) -> str:
  """'main' -> 'randose_jax.cli.train'; 'evaluate' -> 'randose_jax.cli.evaluate';
  a dotted name ('data.transport') -> 'randose_jax.data.transport'."""
  if '.' in tool:
    return f'randose_jax.{tool}'
  return 'randose_jax.cli.' + ('train' if tool == 'main' else tool)


def invoke(
    main: Callable, argv: Sequence[str], flag_values: flags.FlagValues
) -> int:
  """Parses `argv` into `flag_values`, runs `main`: the exit status (what
  `run` would exit with), in this process. Restores the log verbosity."""
  verbosity, sys_argv = logging.get_verbosity(), sys.argv
  try:
    # ml_collections finds --config.* overrides in sys.argv.
    sys.argv = list(argv)
    rest = common._parse_and_check(argv, flag_values)
    sys.argv = sys_argv
    common.call_main(main, rest, flag_values)
  except SystemExit as e:
    return e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
  finally:
    sys.argv = sys_argv
    logging.set_verbosity(verbosity)
  return 0


def evaluate_baseline(eval_cache, dose_gy: float, *, max_patients: int = 0):
  """`validation.BaselineEvaluator(...).run()` in one call."""
  return validation.BaselineEvaluator(
      eval_cache, dose_gy, max_patients=max_patients
  ).run()


def read_nifti(path) -> tuple[np.ndarray, np.ndarray]:
  """Reads a 3-D NIfTI dose file into the project's axis order.

  Any axis-aligned orientation is accepted (files from `write_nifti`, or
  others): the data are reoriented to array axes (anterior->posterior,
  right->left, superior->inferior).

  Returns:
    dose: float64 (D,H,W) values as stored (Gy for files from `write_nifti`).
    voxel_dimensions: float64 (3,) mm per returned array axis.
  """
  import nibabel as nib
  from nibabel import orientations

  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such NIfTI file')
  try:
    img = nib.load(str(path))
  except Exception as e:  # nibabel raises several types for a bad file.
    raise ValueError(f'{path}: not a readable NIfTI file ({e})') from e
  data = np.asarray(img.dataobj, dtype=np.float64)
  if data.ndim == 4 and data.shape[3] == 1:
    data = data[..., 0]
  if data.ndim != 3:
    raise ValueError(f'{path}: expected a 3-D volume, got shape {data.shape}')
  affine = img.affine
  columns = affine[:3, :3]
  zooms = np.linalg.norm(columns, axis=0)
  cosines = np.abs(columns / zooms)
  if not np.allclose(np.sort(cosines, axis=0)[:2], 0, atol=1e-4):
    raise ValueError(
        f'{path}: oblique affine, only axis-aligned grids are supported:\n{affine}'
    )

  # RAS+ axis codes of the project's axes: posterior, patient left, inferior.
  target = orientations.axcodes2ornt(('P', 'L', 'I'))
  transform = orientations.ornt_transform(
      orientations.io_orientation(affine), target
  )
  dose = orientations.apply_orientation(data, transform)
  voxel_dimensions = np.empty(3)
  voxel_dimensions[transform[:, 0].astype(int)] = zooms
  return np.ascontiguousarray(dose), voxel_dimensions


def load_benchmark(name: str):
  """A script of `benchmarks/` (not a package) imported as a module."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  path = Path(__file__).resolve().parents[1] / 'benchmarks' / f'{name}.py'
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module
