"""Clinical metrics and the gamma index (randose_jax.scoring.clinical), checked
against independent code.

- Every D_x, D_Vcc, V_d and Dmean is compared with `plain_*` below (written
  here, no randose_jax imports: voxels sorted hottest first and the k-th
  read, counts by binary search, a compensated sum), exactly, and with
  dicompyler-core's DVH statistics (a binned cumulative DVH, nearest-bin
  lookups) within its binning, on the shared OpenKBP patients and on
  phantoms.
- Phantoms with analytic answers: a sphere of uniform dose, a linear dose
  gradient, a dose cloud equal to the target.
- Gamma (`gamma_impl="jax"`, the default; tests/test_gamma.py checks it
  against pymedphys): a dose against itself, a sharp edge shifted by less and
  by more than the distance to agreement on anisotropic voxels (the failing
  voxels are exactly the band at the edge farther than the DTA).
"""

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from absl import flags
import numpy as np
import pandas as pd
import pytest

from randose_jax.scoring import clinical
from randose_jax.scoring import cohort
from randose_jax.cli import evaluate
from randose_jax.scoring import dose_dvh as evaluation
from randose_jax.data import openkbp
from tests.plain_scoring import ROI_NAMES  # written out, not the library's
from tests import helpers

REPO = Path(__file__).resolve().parents[1]
# pt_10 lacks Esophagus, Larynx, Mandible and PTV63; pt_12 has all 3 PTVs.
REAL_PATIENTS = ('train-pats/pt_10', 'train-pats/pt_12')


# ------------------------------------------------------------ independent code


def plain_d_percent(doses, x):
  """D_x%: voxels sorted hottest first; the dose at position
  x / 100 * (N - 1), linearly between its neighbours."""
  hottest_first = sorted(map(float, doses), reverse=True)
  position = x / 100 * (len(hottest_first) - 1)
  k = int(math.floor(position))
  upper = hottest_first[k]
  lower = hottest_first[min(k + 1, len(hottest_first) - 1)]
  return upper + (position - k) * (lower - upper)


def plain_d_cc(doses, volume_cc, voxel_dimensions):
  """D_Vcc: the hottest n = round(V / voxel volume) voxels (at least 1),
  read at position n / N * (N - 1) of the hottest-first list (the whole ROI
  when it is smaller than V)."""
  sx, sy, sz = voxel_dimensions
  voxel_cc = sx * sy * sz / 1000
  n = max(1, round(volume_cc / voxel_cc))
  return plain_d_percent(doses, 100 * min(1.0, n / len(doses)))


def plain_v(doses, dose_gy):
  """V_d: percent of voxels with dose >= d, by binary search."""
  ascending = np.sort(np.asarray(doses, np.float64))
  below = np.searchsorted(ascending, dose_gy, side='left')
  return 100 * (ascending.size - below) / ascending.size


def plain_mean(doses):
  return math.fsum(map(float, doses)) / len(doses)


def plain_metrics(
    dose, patient_masks, roi_present, voxel_dimensions, v_doses=(20, 30, 40, 50)
):
  """{(roi, metric): value} of the D_x, D_Vcc, V_d and Dmean metrics."""
  out = {}
  for r, roi in enumerate(ROI_NAMES):
    doses = dose[patient_masks[..., r]]
    if not roi_present[r] or doses.size == 0:
      continue
    if roi.startswith('PTV'):
      for x in (99, 98, 95, 50, 2, 1):
        out[roi, f'D{x}'] = plain_d_percent(doses, x)
      out[roi, 'D0.1cc'] = plain_d_cc(doses, 0.1, voxel_dimensions)
    else:
      out[roi, 'Dmean'] = plain_mean(doses)
      out[roi, 'D0.1cc'] = plain_d_cc(doses, 0.1, voxel_dimensions)
      out[roi, 'D2cc'] = plain_d_cc(doses, 2.0, voxel_dimensions)
      for d in v_doses:
        out[roi, f'V{d}Gy'] = plain_v(doses, d)
  return out


def metrics_dict(metrics):
  return {(m.roi, m.metric): m.value for m in metrics}


# ------------------------------------------------------------ phantoms


def make_patient(
    dose, masks, voxel_dimensions=(2.0, 1.5, 3.0), mask=None, patient_id='pt_1'
):
  """A Patient from a dose and a {roi name: bool mask} dict."""
  structure_masks = np.zeros(dose.shape + (10,), bool)
  for name, m in masks.items():
    structure_masks[..., ROI_NAMES.index(name)] = m
  return openkbp.Patient(
      patient_id=patient_id,
      ct=np.zeros(dose.shape, np.float32),
      dose=np.asarray(dose, np.float64),
      structure_masks=structure_masks,
      roi_present=structure_masks.reshape(-1, 10).any(axis=0),
      possible_dose_mask=(np.ones(dose.shape, bool) if mask is None else mask),
      voxel_dimensions=np.asarray(voxel_dimensions, np.float64),
  )


def metrics_of(patient, dose=None, v_doses=(20, 30, 40, 50)):
  return metrics_dict(
      clinical.dose_metrics(
          patient.dose if dose is None else dose,
          patient.structure_masks,
          patient.roi_present,
          patient.voxel_dimensions,
          patient.possible_dose_mask,
          v_doses_gy=v_doses,
      )
  )


def sphere(shape, centre, radius_mm, spacing):
  grid = np.indices(shape).astype(np.float64)
  d2 = sum(((g - c) * s) ** 2 for g, c, s in zip(grid, centre, spacing))
  return d2 <= radius_mm**2


def test_uniform_sphere():
  """Uniform dose in a sphere: every D_x is that dose, HI = 0, V_d = 100% up
  to the dose and 0 above, Dmean = the dose; a dose cloud equal to the PTV
  gives RTOG CI = Paddick CI = 1."""
  spacing = (2.0, 1.5, 3.0)
  shape = (20, 24, 14)
  ball = sphere(shape, (10, 12, 7), 12.0, spacing)
  dose = np.where(ball, 70.0, 0.0)
  oar = ball & (np.indices(shape)[0] < 10)
  patient = make_patient(dose, {'PTV70': ball, 'Brainstem': oar}, spacing)
  m = metrics_of(patient, v_doses=(20, 69.99, 70, 70.01))
  for name in ('D99', 'D98', 'D95', 'D50', 'D2', 'D1', 'D0.1cc'):
    assert m['PTV70', name] == 70.0, name
  assert m['PTV70', 'HI'] == 0.0
  assert m['PTV70', 'CI_RTOG'] == 1.0
  assert m['PTV70', 'CI_Paddick'] == 1.0
  assert m['Brainstem', 'Dmean'] == pytest.approx(70.0, abs=1e-12)
  assert m['Brainstem', 'D0.1cc'] == m['Brainstem', 'D2cc'] == 70.0
  assert [m['Brainstem', f'V{d:g}Gy'] for d in (20, 69.99, 70, 70.01)] == [
      100.0,
      100.0,
      100.0,
      0.0,
  ]


def test_conformity_by_hand():
  """A dose cloud twice the target's volume containing it: RTOG 2, Paddick
  1/2; half of the target: RTOG 1/2, Paddick 1/2; a cloud missing the
  target: RTOG as volumes, Paddick 0; no cloud: RTOG 0, Paddick NaN."""
  shape = (8, 8, 8)
  target = np.zeros(shape, bool)
  target[2:4, 2:6, 2:6] = True  # 32 voxels

  def ci(cloud):
    return clinical.conformity(
        np.where(cloud, 60.0, 10.0), target, np.ones(shape, bool), 56.0
    )

  double = np.zeros(shape, bool)
  double[2:6, 2:6, 2:6] = True
  half = np.zeros(shape, bool)
  half[2:3, 2:6, 2:6] = True
  apart = np.zeros(shape, bool)
  apart[6:8, 0:4, 0:4] = True
  assert ci(double) == (2.0, 0.5)
  assert ci(half) == (0.5, 0.5)
  assert ci(apart) == (1.0, 0.0)
  rtog, paddick = ci(np.zeros(shape, bool))
  assert rtog == 0.0 and math.isnan(paddick)
  # The isodose counts inside the possible-dose mask only.
  body = ~double | target
  assert clinical.conformity(
      np.where(double, 60.0, 10.0), target, body, 56.0
  ) == (1.0, 1.0)


def test_nested_prescriptions_use_the_union_of_higher_targets():
  """OpenKBP's PTVs are disjoint: a plan giving each PTV its prescription
  exactly has CI 1 for every PTV (PTV56's target volume includes PTV70,
  inside the 56 Gy isodose)."""
  shape = (10, 10, 10)
  ptv70 = np.zeros(shape, bool)
  ptv70[3:6, 3:6, 3:6] = True
  ptv56 = np.zeros(shape, bool)
  ptv56[2:7, 2:7, 2:7] = True
  ptv56 &= ~ptv70
  dose = np.where(ptv70, 70.0, np.where(ptv56, 56.0, 5.0))
  m = metrics_of(make_patient(dose, {'PTV56': ptv56, 'PTV70': ptv70}))
  for roi in ('PTV56', 'PTV70'):
    assert m[roi, 'CI_RTOG'] == 1.0 and m[roi, 'CI_Paddick'] == 1.0, roi
  # PTV56's own D_x still come from PTV56 alone.
  assert m['PTV56', 'D50'] == 56.0 and m['PTV70', 'D50'] == 70.0


@pytest.mark.parametrize('axis', [0, 1, 2])
def test_linear_gradient(axis):
  """Dose = a * (i + 1/2) along one axis of a box of L slices, the box's
  doses uniform on [0, a L] with one dose per slice: D_x = a L (1 - x/100)
  to within one slice (a), Dmean = a L / 2, V_d = the slices >= d, D_Vcc =
  a L (1 - V / box volume) to within a slice; HI = (D2 - D98) / D50."""
  spacing = (2.0, 1.5, 3.0)
  shape = [6, 6, 6]
  length = 24
  shape[axis] = length
  a = 2.5  # Gy per slice
  index = np.indices(shape)[axis]
  dose = a * (index + 0.5)
  box = np.ones(shape, bool)
  patient = make_patient(dose, {'PTV70': box, 'SpinalCord': box}, spacing)
  m = metrics_of(patient, v_doses=(20, 30.5, 40))
  for x in (99, 98, 95, 50, 2, 1):
    assert abs(m['PTV70', f'D{x}'] - a * length * (1 - x / 100)) <= a, x
  assert m['SpinalCord', 'Dmean'] == pytest.approx(a * length / 2)
  for d in (20, 30.5, 40):
    slices_at_or_above = np.count_nonzero(a * (np.arange(length) + 0.5) >= d)
    assert m['SpinalCord', f'V{d:g}Gy'] == pytest.approx(
        100 * slices_at_or_above / length
    )
  box_cc = box.size * np.prod(spacing) / 1000
  for name, cc in (('D0.1cc', 0.1), ('D2cc', 2.0)):
    expected = a * length * (1 - cc / box_cc)
    assert abs(m['SpinalCord', name] - expected) <= a, name
  assert m['PTV70', 'HI'] == pytest.approx(
      (m['PTV70', 'D2'] - m['PTV70', 'D98']) / m['PTV70', 'D50']
  )


def test_small_roi_dcc_is_its_minimum():
  """An ROI smaller than V cc: D_Vcc is its minimum dose (the percentile
  clipped at 0, as evaluation.py's D_0.1_cc)."""
  dose = np.zeros((4, 4, 4))
  roi = np.zeros((4, 4, 4), bool)
  roi[0, 0, :3] = True
  dose[0, 0, :3] = [5.0, 7.0, 9.0]
  m = metrics_of(make_patient(dose, {'Larynx': roi}, (1.0, 1.0, 1.0)))
  assert m['Larynx', 'D2cc'] == 5.0
  assert m['Larynx', 'D0.1cc'] == 5.0  # 100 voxels of 1 mm^3 in 0.1 cc


def test_random_phantom_matches_plain():
  """Random doses on anisotropic voxels: every D_x, D_Vcc, V_d, Dmean equals
  the plain sort-and-read implementation."""
  rng = np.random.default_rng(3)
  shape = (14, 12, 10)
  spacing = (1.2, 0.9, 2.5)  # 2.7 mm^3: 37 voxels in 0.1 cc
  dose = rng.gamma(4.0, 12.0, shape)
  masks = {name: rng.random(shape) < 0.2 for name in ROI_NAMES}
  patient = make_patient(dose, masks, spacing)
  ours = metrics_of(patient)
  plain = plain_metrics(
      patient.dose, patient.structure_masks, patient.roi_present, spacing
  )
  assert set(plain) <= set(ours)
  for key, value in plain.items():
    assert ours[key] == pytest.approx(value, rel=1e-12, abs=1e-12), key


# ------------------------------------------------------------ real patients


@pytest.fixture(scope='module')
def real_patients(shared_openkbp):
  return [openkbp.load_patient(shared_openkbp / d) for d in REAL_PATIENTS]


def perturbed(patient, seed=0):
  """The reference dose, scaled by a smooth random factor (0.9 .. 1.1)."""
  rng = np.random.default_rng(seed)
  factor = 1 + 0.1 * np.sin(
      np.indices(patient.dose.shape).sum(axis=0) / 7.0 + rng.uniform(0, 6)
  )
  return patient.dose * factor


def test_real_patients_match_plain(real_patients):
  for patient in real_patients:
    for dose in (patient.dose, perturbed(patient)):
      ours = metrics_of(patient, dose)
      plain = plain_metrics(
          dose,
          patient.structure_masks,
          patient.roi_present,
          patient.voxel_dimensions,
      )
      assert plain, patient.patient_id
      for key, value in plain.items():
        assert ours[key] == pytest.approx(value, rel=1e-12, abs=1e-12), (
            patient.patient_id,
            key,
        )


def test_real_patients_equal_the_official_dvh_metrics(real_patients):
  """D99, D95, D1 of the PTVs and D0.1cc, Dmean of the OARs are the OpenKBP
  DVH score's own numbers (evaluation.dvh_metrics)."""
  same = {
      'D_99': 'D99',
      'D_95': 'D95',
      'D_1': 'D1',
      'D_0.1_cc': 'D0.1cc',
      'mean': 'Dmean',
  }
  for patient in real_patients:
    ours = metrics_of(patient)
    official = evaluation.dvh_metrics(
        patient.dose,
        patient.structure_masks,
        patient.roi_present,
        patient.voxel_dimensions,
    )
    compared = 0
    for r, c in zip(*np.nonzero(~np.isnan(official))):
      key = (ROI_NAMES[r], same[evaluation.METRIC_NAMES[c]])
      assert ours[key] == pytest.approx(official[r, c], rel=1e-12), key
      compared += 1
    assert compared >= 10


def test_real_patients_match_dicompyler(real_patients):
  """dicompyler-core's DVH statistics from a 0.01 Gy differential histogram
  of each ROI: D_x and D_Vcc within one voxel rank and two bins, V_d within
  the voxels of the bin at d, Dmean within half a bin."""
  dvh = pytest.importorskip(
      'dicompylercore.dvh',
      reason='dicompyler-core is not installed (pip install dicompyler-core)',
  )
  width = 0.01
  for patient in real_patients:
    voxel_cc = float(np.prod(patient.voxel_dimensions)) / 1000
    ours = metrics_of(patient)
    checked = 0
    for r, roi in enumerate(ROI_NAMES):
      doses = patient.dose[patient.structure_masks[..., r]]
      if not patient.roi_present[r] or doses.size == 0:
        continue
      bins = np.arange(int(doses.max() / width) + 3) * width
      counts, _ = np.histogram(doses, bins)
      h = dvh.DVH(
          counts * voxel_cc,
          bins,
          dvh_type='differential',
          dose_units='Gy',
          volume_units='cm3',
      )
      ascending = np.sort(doses)
      n = ascending.size

      def within_rank(value, theirs, percentile):
        position = percentile / 100 * (n - 1)
        low = ascending[max(0, int(np.floor(position)) - 1)]
        high = ascending[min(n - 1, int(np.ceil(position)) + 1)]
        assert low - 2 * width <= theirs <= high + 2 * width
        assert low <= value <= high

      if roi.startswith('PTV'):
        for x in (99, 98, 95, 50, 2, 1):
          theirs = float(h.statistic(f'D{x}').value)
          within_rank(ours[roi, f'D{x}'], theirs, 100 - x)
          checked += 1
      else:
        assert ours[roi, 'Dmean'] == pytest.approx(h.mean, abs=width / 2)
        for cc in (0.1, 2):
          name = f'D{cc:g}cc'
          if n * voxel_cc <= cc:  # dicompyler: 0 for a volume > the ROI's
            continue
          theirs = float(h.statistic(name).value)
          voxels = max(1, round(cc / voxel_cc))
          within_rank(ours[roi, name], theirs, 100 - voxels / n * 100)
        for d in (20, 30, 40, 50):
          theirs = 100 * float(h.statistic(f'V{d}Gy').value) / (n * voxel_cc)
          near = 100 * np.count_nonzero(np.abs(doses - d) <= width) / n
          assert abs(ours[roi, f'V{d}Gy'] - theirs) <= near + 1e-9, (roi, d)
          checked += 1
    assert checked >= 20, patient.patient_id


# ------------------------------------------------------------ gamma


def edge_dose(shape, axis, edge, high=60.0, low=30.0):
  """A sharp edge: `high` at index < edge along `axis`, `low` beyond."""
  index = np.indices(shape)[axis]
  return np.where(index < edge, high, low)


def test_gamma_of_a_dose_against_itself_is_100():
  rng = np.random.default_rng(0)
  dose = rng.uniform(0, 70, (10, 9, 8))
  mask = np.ones(dose.shape, bool)
  mask[0] = False
  for criteria in clinical.GAMMA_CRITERIA:
    rate, n = clinical.gamma_pass_rate(
        dose, dose, (2.0, 1.0, 2.5), mask, *criteria
    )
    assert rate == 100.0
    assert n == np.count_nonzero(mask & (dose >= 0.1 * dose[mask].max()))
    gamma = clinical.gamma_map(dose, dose, (2.0, 1.0, 2.5), mask, *criteria)
    assert np.nanmax(gamma) == 0.0
    assert np.isnan(gamma[0]).all()  # outside the mask: not evaluated


@pytest.mark.parametrize('axis', [0, 1, 2])
def test_gamma_edge_shifted_by_1mm_passes(axis):
  """3%/3mm: an edge moved 1 mm (one voxel of 1 mm along `axis`; the other
  axes 2 mm and 3 mm) passes everywhere."""
  spacing = [2.0, 3.0, 2.0]
  spacing[axis] = 1.0
  shape = [6, 6, 6]
  shape[axis] = 12
  reference = edge_dose(shape, axis, 6)
  shifted = edge_dose(shape, axis, 5)
  mask = np.ones(shape, bool)
  for evaluated in (shifted, edge_dose(shape, axis, 7)):
    rate, _ = clinical.gamma_pass_rate(
        reference, evaluated, spacing, mask, 3.0, 3.0
    )
    assert rate == 100.0


@pytest.mark.parametrize('axis', [0, 1, 2])
def test_gamma_edge_shifted_beyond_the_dta_fails_at_the_edge(axis):
  """Anisotropic voxels (spacing[axis] = 2 mm, the others 1 mm and 0.5 mm);
  the edge moves 3 voxels = 6 mm towards index 0 with a 50% dose step (DD
  3%). The reference voxels at 2 mm from the moved edge pass (gamma ~2/3),
  those at 4 and 6 mm fail, every other voxel passes: the failing voxels
  are exactly the two planes at the reference edge. Read with the spacing
  of another axis (1 or 0.5 mm) the shift would be within 3 mm and pass."""
  spacing = [1.0, 0.5, 1.0]
  spacing[axis] = 2.0
  spacing[(axis + 1) % 3] = 0.5
  shape = [5, 5, 5]
  shape[axis] = 14
  edge = 9
  reference = edge_dose(shape, axis, edge)
  evaluated = edge_dose(shape, axis, edge - 3)
  mask = np.ones(shape, bool)
  gamma = clinical.gamma_map(
      reference, evaluated, spacing, mask, 3.0, 3.0, max_gamma=None
  )
  index = np.indices(shape)[axis]
  expected_fail = (index == edge - 2) | (index == edge - 1)
  np.testing.assert_array_equal(gamma >= 1, expected_fail)
  # The passing plane: the full dose 2 mm away, found on pymedphys's search
  # shells (every DTA / 10 = 0.3 mm) at 2.1 mm: gamma between 2/3 and 0.7
  # (to float32 rounding: the JAX gamma's).
  passing = gamma[index == edge - 3]
  assert np.all((passing >= 2 / 3 - 1e-6) & (passing <= 0.7 + 1e-6))
  rate, n = clinical.gamma_pass_rate(
      reference, evaluated, spacing, mask, 3.0, 3.0
  )
  assert n == reference.size
  assert rate == pytest.approx(100 * (1 - expected_fail.mean()))


def test_gamma_pass_rate_equals_the_longer_search():
  """The pass rate (search stopped at pass or at gamma 1) equals the pass
  rate of the gamma map searched on to gamma 1.5, on a smooth phantom and a
  scaled, shifted copy; the normalisation is the reference maximum inside
  the mask (a hot voxel outside it changes nothing)."""
  shape = (8, 8, 7)
  grid = np.indices(shape).astype(np.float64)
  reference = 60 * np.exp(
      -(
          (grid[0] - 3.5) ** 2 / 12
          + (grid[1] - 3.5) ** 2 / 8
          + (grid[2] - 3) ** 2 / 10
      )
  )
  evaluated = 1.04 * np.roll(reference, 2, axis=1)
  spacing = (2.5, 2.0, 3.0)
  mask = np.ones(shape, bool)
  mask[:, :, 0] = False
  for criteria in clinical.GAMMA_CRITERIA:
    gamma = clinical.gamma_map(
        reference, evaluated, spacing, mask, *criteria, max_gamma=1.5
    )
    points = ~np.isnan(gamma)
    full = 100 * np.count_nonzero(gamma[points] < 1) / points.sum()
    assert 0 < full < 100
    hot = reference.copy()
    hot[0, 0, 0] = 500.0  # outside the mask
    rate, n = clinical.gamma_pass_rate(hot, evaluated, spacing, mask, *criteria)
    assert n == points.sum()
    assert rate == pytest.approx(full)


def test_gamma_subsample_is_a_reproducible_fraction():
  rng = np.random.default_rng(1)
  reference = rng.uniform(10, 70, (8, 8, 8))
  evaluated = reference * rng.uniform(0.9, 1.1, reference.shape)
  mask = np.ones(reference.shape, bool)
  points, norm = clinical.gamma_points(reference, mask, subsample=0.25)
  assert points.sum() == 128 and norm == reference.max()
  first = clinical.gamma_pass_rate(
      reference, evaluated, (1, 1, 1), mask, 3, 3, subsample=0.25
  )
  assert first == clinical.gamma_pass_rate(
      reference, evaluated, (1, 1, 1), mask, 3, 3, subsample=0.25
  )
  assert first[1] == 128
  with pytest.raises(ValueError, match='subsample'):
    clinical.gamma_points(reference, mask, subsample=0)


# ------------------------------------------------------------ tables, CLI


def test_compare_patient_and_summary():
  spacing = (2.0, 2.0, 2.0)
  shape = (10, 10, 10)
  ball = sphere(shape, (5, 5, 5), 6.0, spacing)
  oar = np.zeros(shape, bool)
  oar[0:2] = True  # outside the ball (indices 2..8 along axis 0)
  dose = np.where(ball, 70.0, 25.0)
  patients = [
      make_patient(
          dose * s,
          {'PTV70': ball, 'Mandible': oar},
          spacing,
          patient_id=f'pt_{i}',
      )
      for i, s in enumerate((1.0, 0.9), start=1)
  ]
  evaluator = clinical.ClinicalEvaluator(
      clinical.ClinicalSettings(gamma=False, v_doses_gy=(20.0, 24.0))
  )
  for patient, scale in zip(patients, (0.95, 1.0)):
    evaluator.add(patient, patient.dose * scale)
  table = evaluator.table()
  assert list(table.columns) == list(clinical.METRIC_COLUMNS)
  np.testing.assert_allclose(
      table['difference'], table['predicted'] - table['reference']
  )
  row = table[(table.patient == 'pt_1') & (table.metric == 'D50')].iloc[0]
  assert (row.roi, row.unit, row.reference) == ('PTV70', 'Gy', 70.0)
  assert row.predicted == pytest.approx(66.5)
  v24 = table[table.metric == 'V24Gy']
  assert list(v24.unit) == ['% of ROI volume'] * 2
  assert list(v24.predicted) == [0.0, 0.0]  # 25 * 0.95 and 22.5 < 24
  assert list(v24.reference) == [100.0, 0.0]
  summary = evaluator.summary()
  assert list(summary.columns) == list(clinical.SUMMARY_COLUMNS)
  d50 = summary[(summary.roi == 'PTV70') & (summary.metric == 'D50')].iloc[0]
  assert d50.n == 2
  assert d50.mean_difference == pytest.approx(-3.5 / 2)
  assert d50.sd_difference == pytest.approx(np.std([-3.5, 0.0], ddof=1))
  assert d50.mean_abs_difference == pytest.approx(1.75)
  assert d50.worst_patient == 'pt_1'
  assert d50.worst_difference == pytest.approx(-3.5)


@pytest.fixture
def cli_folders(phantom_split, tmp_path):
  """Phantom patients and predictions at 0.97 of their reference dose."""
  reference = Path(shutil.copytree(phantom_split, tmp_path / 'reference'))
  preds = tmp_path / 'predictions'
  for d in openkbp.list_patient_dirs(reference):
    openkbp.write_prediction_csv(
        preds / f'{d.name}.csv', openkbp.load_patient(d).dose * 0.97
    )
  return reference, preds


def run_cli(*args):
  return subprocess.run(
      [sys.executable, '-m', 'randose_jax.cli.evaluate', *map(str, args)],
      cwd=REPO,
      capture_output=True,
      text=True,
      timeout=120,
      env={**os.environ, 'PYTHONPATH': str(REPO)},
  )


def test_cli_writes_the_clinical_tables(cli_folders, tmp_path):
  reference, preds = cli_folders
  out = tmp_path / 'clinical'
  done = run_cli(
      f'--reference={reference}',
      f'--predictions={preds}',
      f'--clinical={out}',
      '--clinical_v_gy=5,10',
  )
  assert done.returncode == 0, done.stderr
  assert 'clinical metrics:' in done.stdout
  table = pd.read_csv(out / clinical.METRICS_FILE)
  summary = pd.read_csv(out / clinical.SUMMARY_FILE)
  assert list(table.columns) == list(clinical.METRIC_COLUMNS)
  assert set(table.patient) == {'pt_1', 'pt_2', 'pt_3', 'pt_4'}
  assert {'V5Gy', 'V10Gy', 'gamma_3%/3mm', 'gamma_2%/2mm'} <= set(table.metric)
  assert 'V20Gy' not in set(table.metric)
  present = set(summary.roi)
  assert list(summary.roi.drop_duplicates()) == [
      r for r in ROI_NAMES + ('possible_dose_mask',) if r in present
  ]
  gamma = summary[summary.metric == 'gamma_3%/3mm'].iloc[0]
  assert gamma.n == 4 and gamma.roi == 'possible_dose_mask'
  assert 0 < gamma.mean_predicted <= 100
  # Each patient's reference column is the dose_metrics of its reference.
  patient = openkbp.load_patient(reference / 'pt_2')
  expected = metrics_of(patient, v_doses=(5, 10))
  rows = table[(table.patient == 'pt_2') & (table.roi != 'possible_dose_mask')]
  assert len(rows) == len(expected)
  for row in rows.itertuples():
    assert row.reference == pytest.approx(
        expected[row.roi, row.metric], nan_ok=True
    )
  assert not list(tmp_path.rglob('.*.tmp'))


def invoke(capfd, monkeypatch, *args):
  """`python -m randose_jax.cli.evaluate ARGS` in this process (as cli.run):
  (exit status, stderr)."""
  values = flags.FlagValues()
  evaluate.define_flags(values)
  monkeypatch.setattr(evaluate, 'FLAGS', values)
  capfd.readouterr()
  code = helpers.invoke(evaluate.main, ['evaluate', *map(str, args)], values)
  return code, capfd.readouterr().err


def test_cli_failure_leaves_the_clinical_tables(
    cli_folders, tmp_path, monkeypatch, capfd
):
  """A bad prediction after the first patients: exit 2, the earlier
  clinical tables byte-identical (a real process); bad flags, an output
  path under a file and --gamma without pymedphys fail before any scoring
  with one error line naming the flag or the path."""
  reference, preds = cli_folders
  out = tmp_path / 'clinical'
  out.mkdir()
  for name in (clinical.METRICS_FILE, clinical.SUMMARY_FILE):
    (out / name).write_text('an earlier result\n')
  path = preds / 'pt_4.csv'
  good = path.read_text()
  lines = good.splitlines()
  lines[2] = lines[2].split(',')[0] + ',-1.0'
  path.write_text('\n'.join(lines) + '\n')
  done = run_cli(
      f'--reference={reference}',
      f'--predictions={preds}',
      f'--clinical={out}',
      '--gamma=false',
  )
  assert done.returncode == 2, done.stderr
  assert str(path) in done.stderr and 'Traceback' not in done.stderr
  assert sorted(p.name for p in out.iterdir()) == sorted(
      [clinical.METRICS_FILE, clinical.SUMMARY_FILE]
  )
  for name in (clinical.METRICS_FILE, clinical.SUMMARY_FILE):
    assert (out / name).read_text() == 'an earlier result\n'
  path.write_text(good)
  a_file = tmp_path / 'a-file'
  a_file.write_text('x')
  inputs = (f'--reference={reference}', f'--predictions={preds}')
  for args, words in (
      ([f'--clinical={a_file}', '--gamma=false'], [str(a_file), 'is a file']),
      (
          [f'--clinical={out}', '--gamma=false', '--clinical_v_gy=20,x'],
          ['--clinical_v_gy', "'x'"],
      ),
      ([f'--clinical={out}', '--gamma_subsample=0'], ['--gamma_subsample']),
  ):
    code, err = invoke(capfd, monkeypatch, *inputs, *args)
    assert code == 2, err
    assert all(w in err for w in words), err
    assert len(err.splitlines()) == 1 and err.startswith('error: '), err
  # Without pymedphys, --gamma_impl=pymedphys is refused before scoring and
  # names the fix; the JAX gamma (the default) needs nothing more.
  monkeypatch.setattr(
      clinical, 'gamma_available', lambda impl='pymedphys': impl == 'jax'
  )
  scored = []
  monkeypatch.setattr(cohort, 'score_folders', lambda *a, **k: scored.append(a))
  code, err = invoke(
      capfd, monkeypatch, *inputs, f'--clinical={out}', '--gamma_impl=pymedphys'
  )
  assert code == 2 and 'pymedphys' in err and '--gamma=false' in err, err
  assert not scored
  for name in (clinical.METRICS_FILE, clinical.SUMMARY_FILE):
    assert (out / name).read_text() == 'an earlier result\n'
