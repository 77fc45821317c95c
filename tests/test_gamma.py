"""The JAX gamma index (randose_jax.scoring.gamma) against analytic answers and
against pymedphys (the independent reference, `gamma_impl="pymedphys"`).

- Analytic phantoms: a uniform dose scaled (gamma = dose difference / DD);
  a linear dose shifted (trilinear interpolation is exact on it, so gamma is
  the continuous minimum |c| / sqrt((DD N)^2 + |g|^2 DTA^2) up to the search
  step), steep (gamma -> shift / DTA) and shallow, on anisotropic voxels.
- The low-dose threshold, max_gamma (clipping, None), stop_at_pass.
- pymedphys: its search offsets to the last bit, random doses on small
  anisotropic grids (every voxel at or next to the grid's faces, where
  pymedphys skips off-grid points), and a cropped region of a shared OpenKBP
  patient against a smoothed, shifted, hot copy: pass rates within 0.1
  percentage point, gamma within 1 % where below max_gamma (measured: the
  same pass rates, 88.83% and 63.54% of 1,728 points, gamma within 4.4e-6).
"""

import numpy as np
import pytest
from scipy import ndimage

from randose_jax.scoring import clinical
from randose_jax.scoring import gamma
from randose_jax.data import openkbp

needs_pymedphys = pytest.mark.skipif(
    not clinical.gamma_available("pymedphys"),
    reason="pymedphys is not installed (pip install 'randose_jax[clinical]')",
)


def jax_gamma(reference, evaluated, spacing, criteria, **kwargs):
  mask = np.ones(reference.shape, bool)
  points, norm = clinical.gamma_points(reference, mask)
  return gamma.gamma_index(
      reference, evaluated, spacing, points, norm, [criteria], **kwargs
  )[0]


def interior(shape, margin):
  inside = np.zeros(shape, bool)
  inside[tuple(slice(m, n - m) for n, m in zip(shape, margin))] = True
  return inside


def test_uniform_dose_scaled_gamma_is_the_dose_difference_over_dd():
  reference = np.full((7, 6, 5), 50.0)
  for dose_percent, distance_mm in clinical.GAMMA_CRITERIA:
    g = jax_gamma(
        reference,
        reference * 1.02,
        (2.0, 3.0, 2.5),
        (dose_percent, distance_mm),
    )
    np.testing.assert_allclose(g, 2 / dose_percent, rtol=1e-6)


@pytest.mark.parametrize(
    "spacing, slope, shift_mm",
    [
        ((2.0, 3.0, 2.5), (0.0, 0.0, 20.0), (0.0, 0.0, 1.7)),  # steep
        ((3.9, 3.9, 2.5), (0.4, -0.3, 0.2), (1.0, 1.3, -0.4)),  # shallow
        ((1.0, 2.0, 3.0), (0.0, 2.0, 0.0), (0.0, -2.2, 0.0)),
        ((3.0, 1.5, 2.0), (1.0, 1.0, -1.0), (0.5, 0.5, -0.5)),
    ],
)
def test_linear_dose_shifted_gamma_is_the_search_minimum(
    spacing, slope, shift_mm
):
  """On a linear dose g.x moved by t (trilinear interpolation exact), gamma
  is the same at every point far from the faces: the minimum over the
  search offsets o (pymedphys's, `test_search_offsets_are_pymedphys_s`) of
  sqrt(|o|^2 / DTA^2 + (g.o - g.t)^2 / (DD N)^2), written out here; at
  least the continuous minimum |g.t| / sqrt((DD N)^2 + |g|^2 DTA^2) (on a
  steep gradient, |t| / DTA; the search's sampling of each shell can miss
  it by much more than DTA / 10 there)."""
  shape = (12, 11, 13)
  coords = np.stack(np.indices(shape), -1) * spacing
  slope = np.asarray(slope)
  reference = 60.0 + (coords - coords.mean((0, 1, 2))) @ slope
  evaluated = reference - slope @ shift_mm  # the dose moved by shift_mm
  normalisation = 10.0  # Gy, whatever the doses
  for dose_percent, dta in clinical.GAMMA_CRITERIA:
    # Far enough from the faces for every offset to be on the grid.
    points = interior(shape, np.ceil(2 * dta / np.asarray(spacing)).astype(int))
    g = gamma.gamma_index(
        reference,
        evaluated,
        spacing,
        points,
        normalisation,
        [(dose_percent, dta)],
        max_gamma=2.0,
    )[0][points]
    delta = dose_percent / 100 * normalisation
    offsets = np.concatenate([o for o, _ in gamma.pymedphys_offsets(dta, 2.0)])
    searched = np.sqrt(
        np.sum(offsets**2, 1) / dta**2
        + ((offsets - shift_mm) @ slope / delta) ** 2
    ).min()
    assert searched < 2
    np.testing.assert_allclose(g, searched, rtol=1e-4, atol=2e-5)  # float32
    steepness = np.linalg.norm(slope)
    continuous = abs(slope @ shift_mm) / np.hypot(delta, steepness * dta)
    assert np.all(g >= continuous * (1 - 1e-5))


def test_threshold_max_gamma_and_stop_at_pass():
  rng = np.random.default_rng(0)
  reference = ndimage.gaussian_filter(rng.uniform(0, 70, (10, 9, 8)), 1.5)
  reference[:3] *= 0.05  # below the 10% threshold
  evaluated = reference * 1.08 * rng.uniform(0.97, 1.03, reference.shape)
  mask = np.ones(reference.shape, bool)
  spacing = (2.0, 2.5, 3.0)
  points, _ = clinical.gamma_points(reference, mask)
  assert not points[:3].any() and points[3:].any()
  full = clinical.gamma_map(
      reference, evaluated, spacing, mask, 3, 3, max_gamma=None
  )
  assert np.isnan(full[~points]).all() and np.isfinite(full[points]).all()
  assert full[points].max() > 1.5  # some clipped below
  clipped = clinical.gamma_map(
      reference, evaluated, spacing, mask, 3, 3, max_gamma=1.5
  )
  np.testing.assert_allclose(clipped[points], np.minimum(full[points], 1.5))
  quick = clinical.gamma_map(
      reference, evaluated, spacing, mask, 3, 3, max_gamma=1, stop_at_pass=True
  )
  np.testing.assert_array_equal(quick[points] < 1, full[points] < 1)
  assert np.all(quick[points] >= np.minimum(full[points], 1) - 1e-6)
  assert np.all(quick[points][full[points] >= 1] == 1)
  rate, n = clinical.gamma_pass_rate(reference, evaluated, spacing, mask, 3, 3)
  assert n == points.sum()
  assert rate == pytest.approx(100 * np.mean(full[points] < 1))


@needs_pymedphys
@pytest.mark.parametrize("distance", [0.0, 0.2, 0.3, 1.9, 3.0, 5.7])
def test_search_offsets_are_pymedphys_s(distance):
  from pymedphys._utilities import createshells  # pylint: disable=g-import-not-at-top

  for step in (0.2, 0.3):
    expected = np.stack(
        createshells.calculate_coordinates_shell_3d(distance, step), 1
    )
    np.testing.assert_array_equal(gamma.shell_offsets(distance, step), expected)


@needs_pymedphys
@pytest.mark.parametrize("max_gamma", [1.0, 2.0, 1.5])
def test_search_distances_are_pymedphys_s(monkeypatch, max_gamma):
  """The shells' radii and steps pymedphys asks for when no point stops
  early (every point fails by far), recorded from inside it."""
  from pymedphys._utilities import createshells  # pylint: disable=g-import-not-at-top

  asked = []
  shell = createshells.calculate_coordinates_shell

  def recording(distance, dimensions, step):
    asked.append((distance, step))
    return shell(distance, dimensions, step)

  monkeypatch.setattr(createshells, "calculate_coordinates_shell", recording)
  reference = np.full((3, 3, 3), 10.0)
  mask = np.ones(reference.shape, bool)
  for criteria in clinical.GAMMA_CRITERIA:
    asked.clear()
    clinical.gamma_map(
        reference,
        reference + 50,
        (1.0, 1.0, 1.0),
        mask,
        *criteria,
        max_gamma=max_gamma,
        gamma_impl="pymedphys",
    )
    assert asked == list(gamma.search_distances(criteria[1], max_gamma))


@needs_pymedphys
@pytest.mark.parametrize("seed", [0, 1])
def test_random_doses_equal_pymedphys_up_to_the_grid_faces(seed):
  rng = np.random.default_rng(seed)
  shape = (6, 5, 7)
  reference = rng.uniform(0, 70, shape)
  evaluated = reference + rng.normal(0, 3, shape)
  mask = rng.uniform(size=shape) < 0.9
  spacing = (2.0, 3.5, 1.5)
  for criteria in clinical.GAMMA_CRITERIA:
    want = clinical.gamma_map(
        reference, evaluated, spacing, mask, *criteria, gamma_impl="pymedphys"
    )
    got = clinical.gamma_map(reference, evaluated, spacing, mask, *criteria)
    np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)  # float32


@pytest.fixture(scope="module")
def cropped_patient(shared_openkbp):
  """A 12^3 region of a shared patient around its high dose, its dose
  smoothed by 1 voxel, x1.03 and shifted 1 voxel along axis 2."""
  patient = openkbp.load_patient(shared_openkbp / "validation-pats/pt_202")
  centre = np.array(
      ndimage.center_of_mass(patient.dose > 0.5 * patient.dose.max())
  ).astype(int)
  region = tuple(slice(c - 6, c + 6) for c in centre)
  mask = patient.possible_dose_mask
  prediction = (
      np.roll(ndimage.gaussian_filter(patient.dose, 1.0) * 1.03, 1, axis=2)
      * mask
  )
  return (
      patient.dose[region],
      prediction[region],
      patient.voxel_dimensions,
      mask[region],
  )


@needs_pymedphys
@pytest.mark.parametrize("criteria", clinical.GAMMA_CRITERIA)
def test_real_patient_region_agrees_with_pymedphys(cropped_patient, criteria):
  reference, evaluated, spacing, mask = cropped_patient
  rates = [
      clinical.gamma_pass_rate(
          reference, evaluated, spacing, mask, *criteria, gamma_impl=impl
      )
      for impl in clinical.GAMMA_IMPLS
  ]
  (jax_rate, n), (pymedphys_rate, m) = rates
  assert n == m > 1000
  assert 20 < pymedphys_rate < 99  # a test with failing points
  assert abs(jax_rate - pymedphys_rate) <= 0.1
  maps = [
      clinical.gamma_map(
          reference,
          evaluated,
          spacing,
          mask,
          *criteria,
          max_gamma=1.5,  # pymedphys's search to 2 would take 2x
          gamma_impl=impl,
      )
      for impl in clinical.GAMMA_IMPLS
  ]
  got, want = maps
  np.testing.assert_array_equal(np.isnan(got), np.isnan(want))
  below = want < 1.5
  assert np.all(np.abs(got - want)[below] <= 0.01 * want[below] + 1e-6)
  assert np.any(~below & ~np.isnan(want))
  np.testing.assert_array_equal(got[~below & ~np.isnan(want)], 1.5)


def test_bad_inputs_are_refused():
  dose = np.ones((4, 4, 4))
  points = np.ones(dose.shape, bool)
  with pytest.raises(ValueError, match="not finite"):
    gamma.gamma_index(dose, dose * np.nan, (1, 1, 1), points, 1.0, [(3, 3)])
  with pytest.raises(ValueError, match="voxel dimensions"):
    gamma.gamma_index(dose, dose, (1, 1), points, 1.0, [(3, 3)])
  with pytest.raises(ValueError, match="gamma_impl"):
    clinical.gamma_map(dose, dose, (1, 1, 1), points, 3, 3, gamma_impl="x")


def test_both_criteria_in_one_call_equal_one_call_each():
  rng = np.random.default_rng(2)
  reference = ndimage.gaussian_filter(rng.uniform(0, 70, (9, 8, 10)), 1.0)
  evaluated = reference * rng.uniform(0.95, 1.08, reference.shape)
  mask = np.ones(reference.shape, bool)
  spacing = (2.5, 2.0, 3.0)
  together = clinical.gamma_pass_rates(reference, evaluated, spacing, mask)
  assert together == [
      clinical.gamma_pass_rate(reference, evaluated, spacing, mask, *c)
      for c in clinical.GAMMA_CRITERIA
  ]
  maps = clinical.gamma_maps(
      reference, evaluated, spacing, mask, clinical.GAMMA_CRITERIA
  )
  for c, g in zip(clinical.GAMMA_CRITERIA, maps):
    np.testing.assert_array_equal(
        g, clinical.gamma_map(reference, evaluated, spacing, mask, *c)
    )
  with pytest.raises(ValueError, match="gamma_impl"):
    clinical.ClinicalSettings(gamma_impl="numba")
