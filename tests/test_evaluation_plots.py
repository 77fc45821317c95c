"""evaluate --plots: one slice view and one DVH per scored patient."""

import os
import pathlib
import shutil
import subprocess
import sys

import numpy as np

from randose_jax.scoring import cohort
from randose_jax.data import openkbp
from tests.test_viz import assert_real_png

REPO = pathlib.Path(__file__).resolve().parents[1]


def _perturbed_predictions(reference_dir, out_dir):
  """Each patient's dose plus a smooth error, inside its possible-dose mask."""
  ids = []
  for seed, d in enumerate(openkbp.list_patient_dirs(reference_dir)):
    patient = openkbp.load_patient(d)
    grid = np.indices(patient.grid_shape).sum(0)
    pred = patient.dose * (1 + 0.1 * np.sin(grid / 3.0 + seed))
    pred = np.where(patient.possible_dose_mask, pred, 0.0)
    openkbp.write_prediction_csv(out_dir / f'{d.name}.csv', pred)
    ids.append(d.name)
  return ids


def test_evaluate_cli_plots(phantom_split, tmp_path):
  reference = tmp_path / 'reference'  # two patients: a slice plot takes seconds
  for name in ('pt_1', 'pt_2'):
    shutil.copytree(phantom_split / name, reference / name)
  preds = tmp_path / 'predictions'
  ids = _perturbed_predictions(reference, preds)
  plots = tmp_path / 'plots'
  env = dict(
      os.environ,
      PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''),
  )
  done = subprocess.run(
      [
          sys.executable,
          '-m',
          'randose_jax.cli.evaluate',
          f'--reference={reference}',
          f'--predictions={preds}',
          f'--plots={plots}',
      ],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  assert done.stdout.startswith('dose score: ')
  assert sorted(p.name for p in plots.glob('*.png')) == sorted(
      f'{pid}_{kind}.png' for pid in ids for kind in ('slices', 'dvh')
  )
  for pid in ids:
    assert_real_png(plots / f'{pid}_slices.png')
    assert_real_png(plots / f'{pid}_dvh.png')


def test_on_patient_sees_each_scored_patient(phantom_split, tmp_path):
  """The hook behind --plots: the reference patient and its prediction (Gy)."""
  preds = tmp_path / 'predictions'
  ids = _perturbed_predictions(phantom_split, preds)
  seen = {}
  result = cohort.evaluate_folders(
      phantom_split,
      preds,
      on_patient=lambda patient, dose: seen.setdefault(
          patient.patient_id, (patient, dose)
      ),
  )
  assert sorted(seen) == sorted(ids) and result.num_patients == len(ids)
  for pid, (patient, dose) in seen.items():
    expected = openkbp.read_prediction_csv(
        preds / f'{pid}.csv', patient.grid_shape
    )
    np.testing.assert_array_equal(dose, expected)
