"""The official scores (randose_jax.scoring.dose_dvh) and the evaluate CLI.

The vectorised scores are compared with `plain_scoring`, an independent,
literal implementation of docs/design.md section 6 (beside this file, no
randose_jax imports), to 1e-6 relative; hand-computed tiny cases pin the rules
themselves, so a mistake shared by both cannot pass.
"""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from tests import plain_scoring
from randose_jax.scoring import cohort
from randose_jax.scoring import dose_dvh as evaluation
from randose_jax.data import openkbp
from randose_jax.data.openkbp import DataError

RTOL = 1e-6
REPO = Path(__file__).resolve().parents[1]
# Shared patients with ROIs missing: pt_10 (Esophagus, Larynx, Mandible,
# PTV63), pt_43 (RightParotid), pt_61 (PTV56, PTV63), pt_216 (Brainstem).
REAL_PATIENTS = (
    'train-pats/pt_10',
    'train-pats/pt_43',
    'train-pats/pt_61',
    'validation-pats/pt_216',
    'validation-pats/pt_233',
)


def case_of(patient, prediction, patient_id=None) -> dict:
  """A plain_scoring case from a Patient-like object and a prediction."""
  return {
      'patient_id': patient_id or patient.patient_id,
      'reference': patient.dose,
      'prediction': prediction,
      'possible_dose_mask': patient.possible_dose_mask,
      'structure_masks': patient.structure_masks,
      'roi_present': patient.roi_present,
      'voxel_dimensions': patient.voxel_dimensions,
  }


def score_cases(cases) -> evaluation.EvaluationResult:
  evaluator = evaluation.Evaluator()
  for c in cases:
    reference = evaluation.Reference.from_arrays(
        c['patient_id'],
        c['reference'],
        c['possible_dose_mask'],
        c['structure_masks'],
        c['roi_present'],
        c['voxel_dimensions'],
    )
    evaluator.add(reference, c['prediction'])
  result = evaluator.result()
  # The additive sums that processes all-reduce give the same scores.
  sums = evaluation.scores_from_sums(evaluator.partial_sums())
  np.testing.assert_allclose(sums['dose_score'], result.dose_score, rtol=1e-12)
  np.testing.assert_allclose(sums['dvh_score'], result.dvh_score, rtol=1e-12)
  return result


def assert_matches_plain(result: evaluation.EvaluationResult, cases):
  """Scores, per-patient errors and every metric row equal the plain ones."""
  dose_score, dvh_score, dose_errors, rows = plain_scoring.plain_scores(cases)
  np.testing.assert_allclose(result.dose_score, dose_score, rtol=RTOL)
  np.testing.assert_allclose(result.dvh_score, dvh_score, rtol=RTOL)
  np.testing.assert_allclose(result.dose_errors, dose_errors, rtol=RTOL)
  table = result.metric_table()
  plain = pd.DataFrame(
      rows,
      columns=[
          'patient_id',
          'roi',
          'metric',
          'reference',
          'prediction',
          'abs_error',
      ],
  )
  assert list(table.columns) == list(plain.columns)
  pd.testing.assert_frame_equal(
      table[['patient_id', 'roi', 'metric']],
      plain[['patient_id', 'roi', 'metric']],
  )
  for column in ('reference', 'prediction', 'abs_error'):
    # abs_error is a difference: relative to the metric's size, not its own.
    scale = np.maximum(plain['reference'].abs(), 1.0)
    assert np.all(np.abs(table[column] - plain[column]) <= RTOL * scale), column
  assert result.num_dvh_metrics == len(plain)


# ---------------------------------------------------------------- synthetic


class Arrays:
  """A Patient-like bundle of arrays (what `Evaluator.add` reads)."""

  def __init__(
      self,
      patient_id,
      dose,
      structure_masks,
      roi_present,
      possible_dose_mask,
      voxel_dimensions,
  ):
    self.patient_id = patient_id
    self.dose = dose
    self.structure_masks = structure_masks
    self.roi_present = np.asarray(roi_present, bool)
    self.possible_dose_mask = possible_dose_mask
    self.voxel_dimensions = np.asarray(voxel_dimensions, np.float64)


def synthetic_patient(
    seed: int, grid=(19, 17, 23), voxel_dimensions=(1.3, 3.7, 2.9)
) -> Arrays:
  """Random dose in a random blob; ROIs of every kind the rules care about.

  Brainstem, RightParotid, PTV56, PTV70: random blobs (parts outside the
  possible-dose mask); SpinalCord: 1 voxel; LeftParotid: 2 voxels;
  Esophagus: flag False but voxels in its mask (must be ignored); Larynx:
  flag True, empty mask; Mandible: 3 voxels; PTV63: absent.
  """
  rng = np.random.default_rng(seed)
  shape = tuple(grid)
  axes = np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing='ij')
  radius = np.sqrt(sum(a**2 for a in axes))
  mask = radius < 0.8 + 0.1 * rng.random(shape)
  dose = np.where(
      mask, 70 * np.exp(-radius) * rng.uniform(0.8, 1.0, shape), 0.0
  )
  masks = np.zeros(shape + (10,), bool)
  flat = masks.reshape(-1, 10)

  def blob(channel, centre, size):
    d = sum((a - c) ** 2 for a, c in zip(axes, centre))
    masks[..., channel] = d < size**2

  blob(0, rng.uniform(-0.5, 0.5, 3), 0.35)
  blob(2, rng.uniform(-0.5, 0.5, 3), 0.5)
  blob(7, (0, 0, 0), 0.6)
  blob(9, rng.uniform(-0.2, 0.2, 3), 0.3)
  for channel, n in ((1, 1), (3, 2), (6, 3)):
    flat[rng.choice(flat.shape[0], n, replace=False), channel] = True
  blob(4, (0.1, 0.1, 0.1), 0.3)  # Esophagus: voxels, but not present
  present = [True, True, True, True, False, True, True, True, False, True]
  return Arrays(f'pt_{seed}', dose, masks, present, mask, voxel_dimensions)


def noisy(dose, mask, seed, sigma=2.0):
  rng = np.random.default_rng(seed)
  return np.maximum(dose + sigma * rng.standard_normal(dose.shape) * mask, 0)


def test_synthetic_patients_match_plain():
  cases = []
  for seed, dims in (
      (1, (1.3, 3.7, 2.9)),
      (2, (5.0, 5.0, 5.0)),
      (3, (2.0, 2.0, 2.5)),
      (4, (4.0, 4.0, 2.5)),
  ):
    p = synthetic_patient(seed, voxel_dimensions=dims)
    cases.append(case_of(p, noisy(p.dose, p.possible_dose_mask, seed)))
  result = score_cases(cases)
  assert_matches_plain(result, cases)
  # Esophagus (flag False), Larynx (empty), PTV63 (absent) have no metrics.
  rois = set(result.metric_table()['roi'])
  assert rois == {
      'Brainstem',
      'SpinalCord',
      'RightParotid',
      'LeftParotid',
      'Mandible',
      'PTV56',
      'PTV70',
  }
  assert np.isnan(result.reference_metrics[:, [4, 5, 8]]).all()


def test_prediction_kinds_match_plain():
  """Dose outside the mask, float32, a spatial shift (a negative dose is an
  error: test_negative_doses_are_errors)."""
  p = synthetic_patient(5)
  rng = np.random.default_rng(0)
  outside = noisy(p.dose, p.possible_dose_mask, 1) + 3.0 * (
      ~p.possible_dose_mask & (rng.random(p.dose.shape) < 0.1)
  )
  predictions = {
      'outside': outside,
      'float32': noisy(p.dose, p.possible_dose_mask, 2).astype(np.float32),
      'shifted': np.roll(p.dose, (2, -1, 3), axis=(0, 1, 2)),
      'perfect': p.dose.copy(),
      'zero': np.zeros_like(p.dose),
  }
  cases = [case_of(p, pred, name) for name, pred in predictions.items()]
  result = score_cases(cases)
  assert_matches_plain(result, cases)
  perfect = result.patient_ids.index('perfect')
  assert result.dose_errors[perfect] == 0.0


def test_reference_dose_outside_mask_counts():
  """A reference with dose off its mask (not so in OpenKBP) still scores
  every voxel."""
  p = synthetic_patient(6)
  reference = p.dose.copy()
  reference[0, 0, 0] = 4.0  # outside the blob mask
  assert not p.possible_dose_mask[0, 0, 0]
  p.dose = reference
  cases = [case_of(p, noisy(reference, p.possible_dose_mask, 3))]
  assert_matches_plain(score_cases(cases), cases)


def test_dvh_metrics_and_dose_error_functions_match_plain():
  p = synthetic_patient(7)
  pred = noisy(p.dose, p.possible_dose_mask, 7)
  metrics = evaluation.dvh_metrics(
      pred, p.structure_masks, p.roi_present, p.voxel_dimensions
  )
  plain = plain_scoring.plain_dvh_metrics(
      pred, p.structure_masks, p.roi_present, p.voxel_dimensions
  )
  assert metrics.shape == (10, 5)
  assert np.count_nonzero(~np.isnan(metrics)) == len(plain)
  for (roi, metric), value in plain.items():
    got = metrics[
        openkbp.ROI_NAMES.index(roi), evaluation.METRIC_NAMES.index(metric)
    ]
    np.testing.assert_allclose(got, value, rtol=RTOL)
  np.testing.assert_allclose(
      evaluation.dose_error(p.dose, pred, p.possible_dose_mask),
      plain_scoring.plain_dose_error(p.dose, pred, p.possible_dose_mask),
      rtol=RTOL,
  )


@pytest.mark.parametrize('size', [1, 7, 4095, 4096, 4097, 50_000])
def test_roi_voxel_indices_equal_flatnonzero(size):
  rng = np.random.default_rng(size)
  for density in (0.0, 0.002, 0.3, 1.0):
    masks = rng.random((size, 10)) < density
    got = evaluation.roi_voxel_indices(masks)
    for r in range(10):
      np.testing.assert_array_equal(got[r], np.flatnonzero(masks[:, r]))
  # Not contiguous and not 8-byte aligned: still right.
  odd = (rng.random((size + 1) * 10 + 3) < 0.01)[3:].reshape(-1, 10)[1:]
  got = evaluation.roi_voxel_indices(odd)
  for r in range(10):
    np.testing.assert_array_equal(got[r], np.flatnonzero(odd[:, r]))


# ------------------------------------------------------------ hand-computed


def tiny_patient(roi_channel, doses, voxel_dimensions=(5.0, 5.0, 5.0)):
  """A 1x2x4 grid; one ROI over its first len(doses) voxels; mask = all."""
  dose = np.zeros((1, 2, 4))
  dose.reshape(-1)[: len(doses)] = doses
  masks = np.zeros((1, 2, 4, 10), bool)
  masks.reshape(-1, 10)[: len(doses), roi_channel] = True
  present = np.zeros(10, bool)
  present[roi_channel] = True
  return Arrays(
      'pt_1', dose, masks, present, np.ones((1, 2, 4), bool), voxel_dimensions
  )


def metric(p, name, roi):
  metrics = evaluation.dvh_metrics(
      p.dose, p.structure_masks, p.roi_present, p.voxel_dimensions
  )
  return metrics[
      openkbp.ROI_NAMES.index(roi), evaluation.METRIC_NAMES.index(name)
  ]


def test_target_percentiles_by_hand():
  p = tiny_patient(9, [40.0, 10.0, 30.0, 20.0])  # PTV70
  # Sorted 10, 20, 30, 40; percentile q sits at q/100 * 3 between them.
  assert metric(p, 'D_99', 'PTV70') == pytest.approx(10.3)  # 0.03
  assert metric(p, 'D_95', 'PTV70') == pytest.approx(11.5)  # 0.15
  assert metric(p, 'D_1', 'PTV70') == pytest.approx(39.7)  # 2.97
  assert np.isnan(metric(p, 'mean', 'PTV70'))
  assert np.isnan(metric(p, 'D_0.1_cc', 'PTV70'))


@pytest.mark.parametrize(
    'dims, voxels, expected',
    [
        ((5.0, 5.0, 5.0), 1, 32.5),  # 125 mm^3: 0.8 -> 1 voxel; q 75, pos 2.25
        ((4.0, 4.0, 2.5), 2, 25.0),  # 40 mm^3: 2.5 -> 2 (half to even); q 50
        ((3.0, 3.0, 3.7), 3, 17.5),  # 33.3 mm^3: 3.003 -> 3; q 25, pos 0.75
        ((2.0, 2.0, 2.5), 10, 10.0),  # 10 voxels > ROI: q < 0, clipped: min
    ],
)
def test_oar_d01cc_by_hand(dims, voxels, expected):
  assert evaluation.voxels_per_tenth_cc(dims) == voxels
  p = tiny_patient(0, [40.0, 10.0, 30.0, 20.0], dims)  # Brainstem
  assert metric(p, 'D_0.1_cc', 'Brainstem') == pytest.approx(expected)
  assert metric(p, 'mean', 'Brainstem') == pytest.approx(25.0)


def test_one_voxel_roi_is_its_dose():
  p = tiny_patient(5, [12.5])  # Larynx
  assert metric(p, 'D_0.1_cc', 'Larynx') == 12.5
  p = tiny_patient(8, [12.5])  # PTV63
  assert [metric(p, m, 'PTV63') for m in ('D_99', 'D_95', 'D_1')] == [12.5] * 3


def test_dose_error_counts_every_voxel_over_mask_voxels():
  reference = np.zeros((2, 2, 2))
  mask = np.zeros((2, 2, 2), bool)
  mask[0] = True  # 4 mask voxels
  reference[0] = [[1.0, 2.0], [3.0, 4.0]]
  prediction = reference.copy()
  prediction[0, 0, 0] += 1.0  # inside: 1 Gy
  prediction[1, 1, 1] = 2.0  # outside the mask: counts too
  assert evaluation.dose_error(reference, prediction, mask) == 0.75


def test_dvh_score_pools_metrics_not_patients():
  """Patient a: one target, 3 metrics off by 1 Gy. Patient b: one OAR, 2
  metrics off by 3 Gy. Pooled (3 + 6) / 5 = 1.8; a mean of per-patient means
  would be 2."""
  a = tiny_patient(9, [10.0, 20.0, 30.0, 40.0])
  b = tiny_patient(0, [10.0, 20.0, 30.0, 40.0])
  b.patient_id = 'pt_2'
  evaluator = evaluation.Evaluator()
  evaluator.add(a, a.dose + 1.0 * a.structure_masks[..., 9])
  evaluator.add(b, b.dose + 3.0 * b.structure_masks[..., 0])
  result = evaluator.result()
  assert result.num_dvh_metrics == 5
  assert result.dvh_score == pytest.approx(1.8)
  # Dose errors: a 4 Gy over 8 mask voxels, b 12 over 8.
  np.testing.assert_allclose(result.dose_errors, [0.5, 1.5])
  assert result.dose_score == pytest.approx(1.0)
  sums = evaluation.scores_from_sums(evaluator.partial_sums())
  assert sums == {
      'dose_score': pytest.approx(1.0),
      'dvh_score': pytest.approx(1.8),
      'num_patients': 2,
      'num_dvh_metrics': 5,
  }


def test_prepared_reference_scores_many_predictions():
  p = synthetic_patient(8)
  reference = evaluation.Reference.from_patient(p)
  for seed in range(3):
    pred = noisy(p.dose, p.possible_dose_mask, seed)
    error, metrics = reference.score(pred)
    fresh = evaluation.Evaluator()
    assert fresh.add(p, pred) == pytest.approx(error, rel=1e-12)
    np.testing.assert_allclose(fresh.result().predicted_metrics[0], metrics)


# ------------------------------------------------------------------- errors


def test_evaluator_errors_name_the_patient():
  p = synthetic_patient(9)
  evaluator = evaluation.Evaluator()
  with pytest.raises(ValueError, match='no patients'):
    evaluator.result()
  with pytest.raises(ValueError, match=r'prediction of pt_9 has shape'):
    evaluator.add(p, p.dose[:-1])
  bad = p.dose.copy()
  bad[3, 3, 3] = np.nan
  with pytest.raises(ValueError, match='pt_9 holds NaN'):
    evaluator.add(p, bad)
  evaluator.add(p, p.dose)
  with pytest.raises(ValueError, match='pt_9 was added twice'):
    evaluator.add(p, p.dose)
  p.dose = None
  with pytest.raises(ValueError, match='pt_9 has no dose'):
    evaluation.Reference.from_patient(p)
  q = synthetic_patient(10)
  with pytest.raises(
      ValueError, match='pt_10: the possible-dose mask is empty'
  ):
    evaluation.Reference.from_arrays(
        'pt_10',
        q.dose,
        np.zeros_like(q.possible_dose_mask),
        q.structure_masks,
        q.roi_present,
        q.voxel_dimensions,
    )


def test_negative_doses_are_errors():
  """A dose is never negative: a negative prediction (inside or outside the
  mask) or reference is refused, naming the patient; -0.0 is zero."""
  p = synthetic_patient(12)
  evaluator = evaluation.Evaluator()
  for where in (
      tuple(np.argwhere(p.possible_dose_mask)[0]),
      tuple(np.argwhere(~p.possible_dose_mask)[0]),
  ):
    bad = p.dose.copy()
    bad[where] = -7.5
    with pytest.raises(
        ValueError,
        match=r'prediction of pt_12 holds a '
        r'negative dose at 1 voxel\(s\) \(min -7.5 Gy\)',
    ):
      evaluator.add(p, bad)
  signed_zero = p.dose.copy()
  signed_zero[~p.possible_dose_mask] = -0.0
  assert evaluator.add(p, signed_zero) == 0.0
  reference = synthetic_patient(12)
  reference.dose[tuple(np.argwhere(p.possible_dose_mask)[0])] = -5.0
  for build in (
      evaluation.Reference.from_patient,
      lambda r: evaluation.Reference.from_sparse(sparse_of(r)),
  ):
    with pytest.raises(
        ValueError, match='reference dose of pt_12 holds a negative dose'
    ):
      build(reference)


def sparse_of(p: Arrays) -> openkbp.SparsePatient:
  """The voxel lists of a Patient-like bundle, as the cache holds them (an
  ROI whose flag is False has no list)."""
  dose = p.dose.reshape(-1)
  dose_index = np.flatnonzero(dose)
  return openkbp.SparsePatient(
      patient_id=p.patient_id,
      grid_shape=tuple(p.dose.shape),
      ct_index=np.zeros(0, np.int64),
      ct_value=np.zeros(0, np.float32),
      dose_index=dose_index,
      dose_value=dose[dose_index].astype(np.float64),
      mask_index=np.flatnonzero(p.possible_dose_mask),
      roi_index=tuple(
          np.flatnonzero(p.structure_masks[..., r])
          if present
          else np.zeros(0, np.int64)
          for r, present in enumerate(p.roi_present)
      ),
      voxel_dimensions=p.voxel_dimensions,
  )


@pytest.mark.parametrize('outside', [False, True])
def test_reference_from_sparse_equals_from_patient(outside):
  """From the voxel lists: the same reference, the same scores (also for a
  reference with dose off its mask and predictions with dose off it)."""
  p = synthetic_patient(11)
  if outside:
    p.dose = p.dose.copy()
    p.dose[0, 0, 0] = 4.0
    p.dose[0, 0, 1] = -0.0  # off the mask, bits not zero: still no dose
  dense = evaluation.Reference.from_patient(p)
  sparse = evaluation.Reference.from_sparse(sparse_of(p))
  assert sparse.num_mask_voxels == dense.num_mask_voxels
  assert sparse.grid_shape == dense.grid_shape
  np.testing.assert_array_equal(sparse.metrics, dense.metrics)
  rng = np.random.default_rng(1)
  off_mask = 2.0 * (~p.possible_dose_mask & (rng.random(p.dose.shape) < 0.1))
  for pred in (
      noisy(p.dose, p.possible_dose_mask, 3),
      noisy(p.dose, p.possible_dose_mask, 4) + off_mask,
  ):
    (e1, m1), (e2, m2) = dense.score(pred), sparse.score(pred)
    assert e2 == pytest.approx(e1, rel=1e-12)
    np.testing.assert_array_equal(m2, m1)
  np.testing.assert_array_equal(sparse.dose, p.dose)
  with pytest.raises(ValueError, match='has no dose'):
    evaluation.Reference.from_sparse(
        dataclasses.replace(sparse_of(p), dose_index=None, dose_value=None)
    )
  with pytest.raises(ValueError, match='possible-dose mask is empty'):
    evaluation.Reference.from_sparse(
        dataclasses.replace(sparse_of(p), mask_index=np.zeros(0, np.int64))
    )


# ----------------------------------------------------------- real patients


@pytest.fixture(scope='module')
def real_patients(shared_openkbp):
  return [openkbp.load_patient(shared_openkbp / d) for d in REAL_PATIENTS]


def test_real_patients_match_plain(real_patients):
  """Noise, a spatial shift (dose leaves the mask) and a scaled prediction
  with a constant dose everywhere (outside the mask too)."""
  cases = []
  for i, p in enumerate(real_patients):
    mask = p.possible_dose_mask
    cases.append(case_of(p, noisy(p.dose, mask, i), f'{p.patient_id}_noise'))
    cases.append(
        case_of(
            p,
            np.roll(p.dose, (2, -3, 1), axis=(0, 1, 2)),
            f'{p.patient_id}_shift',
        )
    )
    cases.append(case_of(p, 1.05 * p.dose + 0.3, f'{p.patient_id}_outside'))
  result = score_cases(cases)
  assert_matches_plain(result, cases)
  # Every ROI of every patient that was contoured is scored.
  expected = sum(
      2 * p.roi_present[:7].sum() + 3 * p.roi_present[7:].sum()
      for p in real_patients
  )
  assert result.num_dvh_metrics == 3 * expected
  absent = result.metric_table().query('patient_id == "pt_61_noise"')
  assert 'PTV56' not in set(absent['roi'])


def test_real_patients_from_sparse_match_plain(shared_openkbp, real_patients):
  """Evaluator.add takes the sparse patients the loader (and the cache)
  give, with the same scores as the plain scorer on the dense ones."""
  evaluator, cases = evaluation.Evaluator(), []
  for i, (d, p) in enumerate(zip(REAL_PATIENTS, real_patients)):
    pred = noisy(p.dose, p.possible_dose_mask, i)
    pred[0, 0, 0] = 1.5  # outside the mask
    evaluator.add(openkbp.load_sparse_patient(shared_openkbp / d), pred)
    cases.append(case_of(p, pred))
  assert_matches_plain(evaluator.result(), cases)


# --------------------------------------------------------------------- CLI


def write_predictions(patients_dir: Path, out_dir: Path, seed=0) -> list:
  """Noisy predictions of every patient, written with the data layer's
  writer; returns the plain_scoring cases (predictions read back)."""
  cases = []
  for d in openkbp.list_patient_dirs(patients_dir):
    p = openkbp.load_patient(d)
    pred = noisy(p.dose, p.possible_dose_mask, seed, sigma=1.0)
    pred[0, 0, 0] = 1.5  # outside the mask
    path = openkbp.write_prediction_csv(out_dir / f'{p.patient_id}.csv', pred)
    cases.append(case_of(p, openkbp.read_prediction_csv(path, p.grid_shape)))
    seed += 1
  return cases


def run_cli(*args):
  env = dict(
      os.environ,
      PYTHONPATH=str(REPO) + os.pathsep + os.environ.get('PYTHONPATH', ''),
  )
  return subprocess.run(
      [sys.executable, '-m', 'randose_jax.cli.evaluate', *args],
      cwd=REPO,
      env=env,
      capture_output=True,
      text=True,
      timeout=120,
  )


def test_cli_end_to_end(phantom_split, tmp_path):
  preds = tmp_path / 'predictions'
  cases = write_predictions(phantom_split, preds)
  json_path, per_roi = tmp_path / 'scores.json', tmp_path / 'out' / 'roi.csv'
  json_path.write_text('old')  # outputs the user asked for are replaced
  done = run_cli(
      f'--reference={phantom_split}',
      f'--predictions={preds}',
      f'--json={json_path}',
      f'--per-roi={per_roi}',
  )
  assert done.returncode == 0, done.stderr
  dose_score, dvh_score, dose_errors, rows = plain_scoring.plain_scores(cases)
  lines = done.stdout.splitlines()
  assert (
      lines[0].startswith('dose score: ')
      and f'{len(cases)} patients' in lines[0]
  )
  assert lines[1].startswith('DVH score: ') and f'{len(rows)} DVH' in lines[1]
  assert float(lines[0].split()[2]) == pytest.approx(dose_score, abs=1e-4)
  assert float(lines[1].split()[2]) == pytest.approx(dvh_score, abs=1e-4)
  summary = json.loads(json_path.read_text())
  assert list(summary)[:2] == ['dose_score', 'dvh_score']
  assert summary['dose_score'] == pytest.approx(dose_score, rel=RTOL)
  assert summary['dvh_score'] == pytest.approx(dvh_score, rel=RTOL)
  assert summary['num_patients'] == len(cases)
  assert summary['num_dvh_metrics'] == len(rows)
  np.testing.assert_allclose(
      list(summary['dose_errors'].values()), dose_errors, rtol=RTOL
  )
  table = pd.read_csv(per_roi)
  assert list(table.columns) == [
      'patient_id',
      'roi',
      'metric',
      'reference',
      'prediction',
      'abs_error',
  ]
  assert len(table) == len(rows)
  np.testing.assert_allclose(
      table['prediction'], [r[4] for r in rows], rtol=RTOL
  )
  assert table['abs_error'].mean() == pytest.approx(dvh_score, rel=RTOL)
  assert not list(tmp_path.rglob('.*.tmp'))  # atomic writes left nothing
  # The progress on stderr (a pipe here, not a terminal): one line per
  # patient, counted in order, with its rate and the time left.
  ids = [d.name for d in openkbp.list_patient_dirs(phantom_split)]
  progress = done.stderr.splitlines()
  assert [l.split(' done, ')[0] for l in progress] == [
      f'evaluate: {k}/{len(ids)} {pid}' for k, pid in enumerate(ids, 1)
  ], done.stderr
  assert all(' s/patient, ' in l for l in progress), done.stderr


def test_cli_error_exits_with_message(phantom_split, tmp_path):
  done = run_cli(f'--reference={phantom_split}', f'--predictions={tmp_path}')
  assert done.returncode == 2  # docs/commands.md: every CLI error exits 2
  assert f'{tmp_path}: no prediction files (pt_*.csv)' in done.stderr
  assert 'Traceback' not in done.stderr


def test_shared_patients_through_the_folders(shared_openkbp, tmp_path):
  """Real patients, read by the CLI's path (load_patient, CSV predictions)."""
  reference = tmp_path / 'reference'
  for d in REAL_PATIENTS[:2]:
    shutil.copytree(shared_openkbp / d, reference / Path(d).name)
  cases = write_predictions(reference, tmp_path / 'predictions')
  seen = []
  result = cohort.evaluate_folders(
      reference,
      tmp_path / 'predictions',
      on_patient=lambda patient, prediction: seen.append(patient.patient_id),
  )
  assert_matches_plain(result, cases)
  assert seen == ['pt_10', 'pt_43']
  # Without on_patient: voxel lists, no CT read; the same numbers.
  sparse = cohort.evaluate_folders(reference, tmp_path / 'predictions')
  np.testing.assert_array_equal(sparse.dose_errors, result.dose_errors)
  np.testing.assert_array_equal(
      sparse.predicted_metrics, result.predicted_metrics
  )
  np.testing.assert_array_equal(
      sparse.reference_metrics, result.reference_metrics
  )


@pytest.fixture
def folders(phantom_split, tmp_path):
  """A private copy of the phantom patients and their predictions."""
  reference = Path(shutil.copytree(phantom_split, tmp_path / 'reference'))
  preds = tmp_path / 'predictions'
  write_predictions(reference, preds)
  return reference, preds


def test_scores_without_on_patient_are_the_same(folders):
  """The callback-free path (voxel lists, ct.csv unread) scores exactly as
  the dense one."""
  reference, preds = folders
  dense = cohort.evaluate_folders(
      reference, preds, on_patient=lambda patient, dose: None
  )
  sparse = cohort.evaluate_folders(reference, preds)
  assert sparse.patient_ids == dense.patient_ids
  np.testing.assert_array_equal(sparse.dose_errors, dense.dose_errors)
  np.testing.assert_array_equal(
      sparse.predicted_metrics, dense.predicted_metrics
  )
  np.testing.assert_array_equal(
      sparse.reference_metrics, dense.reference_metrics
  )


def expect_error(reference, preds, *words):
  with pytest.raises(DataError) as info:
    cohort.evaluate_folders(reference, preds)
  for word in words:
    assert str(word) in str(info.value)


class _Recorder:
  """A scorer that records what it is given, in order."""

  def __init__(self, name, log):
    self.name, self.log = name, log

  def add(self, patient, prediction):
    assert patient.ct is not None  # scorers get dense patients
    self.log.append((self.name, patient.patient_id, float(prediction.max())))

  def result(self):
    return len(self.log)


def test_score_folders_hands_each_patient_to_every_scorer_in_order(folders):
  reference, preds = folders
  log = []
  result = cohort.score_folders(
      reference, preds, [_Recorder('a', log), _Recorder('b', log)]
  )
  ids = result.patient_ids
  assert len(ids) >= 2
  assert [(n, i) for n, i, _ in log] == [
      (n, i) for i in ids for n in ('a', 'b')
  ]
  plain = cohort.score_folders(reference, preds)
  np.testing.assert_array_equal(plain.dose_errors, result.dose_errors)


def test_the_predictions_zip_gets_a_hint(folders, tmp_path):
  reference, preds = folders
  archive = shutil.make_archive(str(preds), 'zip', preds)
  with pytest.raises(DataError) as info:
    cohort.evaluate_folders(reference, archive)
  message = str(info.value)
  assert message.startswith(f'{archive}: a file, not a predictions folder')
  assert 'the submission zip' in message and str(preds) in message


def test_missing_prediction(folders):
  reference, preds = folders
  (preds / 'pt_2.csv').unlink()
  expect_error(reference, preds, 'have no prediction', preds / 'pt_2.csv')


def test_prediction_without_reference(folders):
  reference, preds = folders
  shutil.copy(preds / 'pt_1.csv', preds / 'pt_77.csv')
  expect_error(reference, preds, 'have no reference', preds / 'pt_77.csv')


def test_reference_without_dose(folders):
  reference, preds = folders
  (reference / 'pt_3' / 'dose.csv').unlink()
  expect_error(reference, preds, 'no dose', reference / 'pt_3' / 'dose.csv')


def test_empty_and_missing_folders(folders, tmp_path):
  reference, preds = folders
  empty = tmp_path / 'empty'
  empty.mkdir()
  expect_error(reference, empty, empty, 'no prediction files')
  expect_error(empty, preds, empty, 'no patient folders')
  expect_error(reference, tmp_path / 'nowhere', 'not found')


def test_negative_prediction_csv(folders):
  """The CLI's path: a prediction CSV with a negative dose is an error naming
  the file and the line (not clipped, not scored)."""
  reference, preds = folders
  path = preds / 'pt_2.csv'
  lines = path.read_text().splitlines()
  lines[3] = lines[3].split(',')[0] + ',-7.5'
  path.write_text('\n'.join(lines) + '\n')
  expect_error(reference, preds, path, 'line 4', '-7.5', 'negative')


def test_negative_reference_dose(folders):
  reference, preds = folders
  path = reference / 'pt_3' / 'dose.csv'
  lines = path.read_text().splitlines()
  lines[4] = lines[4].split(',')[0] + ',-5.0'
  path.write_text('\n'.join(lines) + '\n')
  expect_error(reference, preds, path, 'line 5', '-5.0', 'negative')


def test_cli_negative_prediction_exits_with_message(folders):
  reference, preds = folders
  path = preds / 'pt_1.csv'
  lines = path.read_text().splitlines()
  lines[1] = lines[1].split(',')[0] + ',-7.5'
  path.write_text('\n'.join(lines) + '\n')
  done = run_cli(f'--reference={reference}', f'--predictions={preds}')
  assert done.returncode == 2  # docs/commands.md: every CLI error exits 2
  assert f'{path}: line 2: dose -7.5 Gy is negative' in done.stderr
  assert 'Traceback' not in done.stderr


def test_prediction_on_the_wrong_grid(folders):
  reference, preds = folders
  # A few voxels of a 17 x 16 x 16 grid: one index past the 16^3 grid.
  dose = np.zeros((17, 16, 16))
  dose[0, 0, 0] = dose[16, 0, 0] = 1.0
  openkbp.write_prediction_csv(preds / 'pt_1.csv', dose, overwrite=True)
  expect_error(reference, preds, preds / 'pt_1.csv', 'outside')
  # Every voxel of it: more rows than the grid has voxels, refused before
  # the file is read whole.
  openkbp.write_prediction_csv(
      preds / 'pt_1.csv', np.ones((17, 16, 16)), overwrite=True
  )
  expect_error(reference, preds, preds / 'pt_1.csv', 'more than the header')


@pytest.mark.parametrize('read_ahead', [0, 1, 2])
def test_read_ahead_scores_and_fails_as_read_in_turn(folders, read_ahead):
  """Patients read ahead by threads: the same scores, and the first bad
  patient in id order is the error, whether it fails reading or scoring
  and whatever a later patient holds."""
  reference, preds = folders
  in_turn = cohort.evaluate_folders(reference, preds, read_ahead=0)
  result = cohort.evaluate_folders(reference, preds, read_ahead=read_ahead)
  assert result.patient_ids == in_turn.patient_ids
  np.testing.assert_array_equal(result.dose_errors, in_turn.dose_errors)
  np.testing.assert_array_equal(
      result.predicted_metrics, in_turn.predicted_metrics
  )
  # pt_1 fails scoring (empty possible-dose mask), pt_2 and pt_3 reading.
  (reference / 'pt_1' / 'possible_dose_mask.csv').write_text(',data\n')
  bad = preds / 'pt_2.csv'
  lines = bad.read_text().splitlines()
  lines[1] = lines[1].split(',')[0] + ',-7.5'
  bad.write_text('\n'.join(lines) + '\n')
  (reference / 'pt_3' / 'dose.csv').write_text(',data\n1,x\n')
  for expected in (
      ['pt_1', 'possible-dose mask is empty'],
      [bad, 'line 2', 'negative'],
      [reference / 'pt_3' / 'dose.csv', 'line 2'],
  ):
    with pytest.raises(DataError) as info:
      cohort.evaluate_folders(reference, preds, read_ahead=read_ahead)
    for word in expected:
      assert str(word) in str(info.value)
    if 'pt_1' in expected:
      shutil.copy(
          reference / 'pt_2' / 'possible_dose_mask.csv',
          reference / 'pt_1' / 'possible_dose_mask.csv',
      )
    elif bad in expected:
      bad.unlink()
      shutil.copy(preds / 'pt_1.csv', bad)


def test_evaluate_does_not_import_pandas():
  """pandas is imported only where used (0.4-0.7 s of a process start)."""
  done = subprocess.run(
      [
          sys.executable,
          '-c',
          'import sys, randose_jax.cli.evaluate; '
          'sys.exit("pandas" in sys.modules)',
      ],
      capture_output=True,
      text=True,
  )
  assert done.returncode == 0, done.stderr
