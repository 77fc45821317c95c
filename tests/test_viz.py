"""Tests for randose_jax.viz: the PNGs exist, load back and are not blank."""

from pathlib import Path
from types import SimpleNamespace

import matplotlib.image
import numpy as np
import pytest

from randose_jax import viz
from tests import plain_scoring

ROI = {name: c for c, name in enumerate(viz.DEFAULT_ROI_NAMES)}
DPI = 50  # Low resolution keeps each render well under a second.


def toy_patient(shape=(48, 48, 40), voxel_dimensions=(4.5, 4.5, 3.0), seed=0):
  """A head-and-neck-like phantom in the OpenKBP conventions.

  Returns a namespace with the `Patient` fields: ct (HU + 1024), dose (Gy),
  structure_masks (D,H,W,10), roi_present, voxel_dimensions, patient_id, and
  `pred`, a perturbed copy of the dose.
  """
  rng = np.random.default_rng(seed)
  vd = np.asarray(voxel_dimensions, dtype=np.float64)
  centre = (np.asarray(shape) - 1) / 2
  mm = [(np.arange(n) - c) * s for n, c, s in zip(shape, centre, vd)]
  y, x, z = np.meshgrid(*mm, indexing='ij')  # y: A->P, x: R->L, z: S->I (mm)

  body = (y / 95) ** 2 + (x / 80) ** 2 < 1
  hu = np.full(shape, -1024.0)
  hu[body] = 30 + rng.normal(0, 15, body.sum())
  spine = ((y - 45) / 12) ** 2 + (x / 12) ** 2 < 1
  hu[spine & body] = 700
  airway = ((y + 20) / 8) ** 2 + (x / 8) ** 2 < 1
  hu[airway & (z > -20)] = -900
  ct = np.clip(hu + 1024, 0, None).astype(np.float32)

  masks = np.zeros((*shape, 10), dtype=bool)
  ptv_c = np.array([-20.0, -30.0, 5.0])
  r_ptv = np.sqrt(
      (y - ptv_c[0]) ** 2 + (x - ptv_c[1]) ** 2 + (z - ptv_c[2]) ** 2
  )
  masks[..., ROI['PTV70']] = r_ptv < 20
  masks[..., ROI['PTV56']] = (r_ptv < 32) & body
  masks[..., ROI['SpinalCord']] = (((y - 45) / 5) ** 2 + (x / 5) ** 2 < 1) & (
      z > -30
  )
  masks[..., ROI['Brainstem']] = ((y - 30) / 10) ** 2 + (x / 10) ** 2 + (
      (z + 40) / 12
  ) ** 2 < 1
  for name, side in (
      ('RightParotid', -1),
      ('LeftParotid', 1),
  ):  # Axis 1 runs right -> left.
    masks[..., ROI[name]] = ((y - 5) / 15) ** 2 + (
        (x - side * 50) / 10
    ) ** 2 + ((z + 10) / 18) ** 2 < 1
  masks[..., ROI['Larynx']] = ((y + 20) / 12) ** 2 + (x / 12) ** 2 + (
      (z - 30) / 10
  ) ** 2 < 1
  roi_present = masks.reshape(-1, 10).any(axis=0)

  # 70 Gy in PTV70, a shoulder to 56 Gy over PTV56, then exponential fall-off.
  dose = np.where(
      r_ptv < 20,
      70.0,
      np.where(
          r_ptv < 32,
          70 - 14 * (r_ptv - 20) / 12,
          56 * np.exp(-(r_ptv - 32) / 25),
      ),
  )
  dose = np.where(body, dose, 0.0)
  wobble = 2.5 * np.sin(y / 17) * np.cos(x / 23) + 1.5 * np.sin(z / 11)
  pred = np.clip(np.where(body, dose + wobble * (dose > 3), 0.0), 0, None)
  return SimpleNamespace(
      patient_id='pt_toy',
      ct=ct,
      dose=dose,
      pred=pred,
      structure_masks=masks,
      roi_present=roi_present,
      voxel_dimensions=vd,
  )


def assert_real_png(path, min_side=250):
  path = Path(path)
  assert path.is_file() and path.stat().st_size > 5_000, path
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and min(image.shape[:2]) >= min_side, image.shape
  rgb = image[..., :3]
  assert rgb.std() > 0.05, 'image looks blank'
  colours = np.unique(
      (rgb.reshape(-1, 3) * 255).round().astype(np.uint8), axis=0
  )
  assert len(colours) > 50, f'only {len(colours)} distinct colours'
  return image


@pytest.fixture(scope='module')
def patient():
  return toy_patient()


def test_slices_with_reference(patient, tmp_path):
  path = viz.plot_dose_slices(
      patient.ct,
      patient.pred,
      patient.dose,
      patient.structure_masks,
      patient.voxel_dimensions,
      tmp_path / 'sub' / 'slices.png',
      title='toy',
      dpi=DPI,
  )
  image = assert_real_png(path)
  assert image.shape[1] > image.shape[0] * 0.8  # Three columns.


def test_slices_without_reference_or_targets(patient, tmp_path):
  masks = patient.structure_masks.copy()
  masks[..., 7:] = False  # No target: the views pass through the dose maximum.
  assert viz.slice_centre(masks, patient.dose) == tuple(
      np.unravel_index(np.argmax(patient.dose), patient.dose.shape)
  )
  path = viz.plot_dose_slices(
      patient.ct,
      patient.pred,
      None,
      masks,
      patient.voxel_dimensions,
      tmp_path / 'slices.png',
      dpi=DPI,
  )
  image = assert_real_png(path)
  assert image.shape[0] > image.shape[1]  # One column: taller than wide.


def test_slice_centre_is_target_centroid(patient):
  targets = patient.structure_masks[..., 7:].any(-1)
  expected = tuple(int(round(c)) for c in np.argwhere(targets).mean(0))
  assert viz.slice_centre(patient.structure_masks, patient.dose) == expected


def test_view_orientation():
  """Axial view: anterior (axis-0 index 0) at the top, patient right on the left."""
  volume = np.zeros((4, 5, 6))
  volume[0, 0, 2] = 1  # Most anterior, most patient-right voxel.
  axial = viz._view_slice(volume, viz._VIEWS[0], (0, 0, 2))
  assert axial.shape == (4, 5) and axial[0, 0] == 1
  assert viz._axis_letters(0) == ('A', 'P')
  assert viz._axis_letters(1) == ('R', 'L')
  assert viz._axis_letters(2) == ('S', 'I')
  volume[:] = 0
  volume[1, 2, 0] = 1  # Most superior slice.
  coronal = viz._view_slice(volume, viz._VIEWS[1], (1, 2, 0))
  sagittal = viz._view_slice(volume, viz._VIEWS[2], (1, 2, 0))
  assert coronal.shape == (6, 5) and coronal[0, 2] == 1
  assert sagittal.shape == (6, 4) and sagittal[0, 1] == 1


def test_dvh(patient, tmp_path):
  path = viz.plot_dvh(
      patient.pred,
      patient.dose,
      patient.structure_masks,
      patient.roi_present,
      tmp_path / 'dvh.png',
      dpi=DPI,
  )
  assert_real_png(path)


def test_dvh_absent_roi_and_no_reference(patient, tmp_path):
  masks = patient.structure_masks.copy()
  present = patient.roi_present.copy()
  masks[..., ROI['PTV56']] = False
  present[ROI['PTV56']] = False
  present[ROI['Mandible']] = (
      True  # Flagged present but empty: skipped, not an error.
  )
  assert_real_png(
      viz.plot_dvh(
          patient.pred, None, masks, present, tmp_path / 'dvh.png', dpi=DPI
      )
  )


def test_cumulative_dvh():
  dose = np.array([[[0.0, 10.0, 20.0, 30.0]]])
  mask = np.ones_like(dose, dtype=bool)
  np.testing.assert_allclose(
      viz.cumulative_dvh(dose, mask, [0, 5, 10, 30, 31]), [100, 75, 75, 25, 0]
  )


def test_write_patient_plots(patient, tmp_path):
  """Absent ROI (PTV56 channel empty, flag False) included."""
  patient = SimpleNamespace(**vars(patient))
  patient.structure_masks = patient.structure_masks.copy()
  patient.structure_masks[..., ROI['PTV56']] = False
  patient.roi_present = patient.roi_present.copy()
  patient.roi_present[ROI['PTV56']] = False
  paths = viz.write_patient_plots(
      patient, patient.pred, tmp_path / 'plots', dpi=DPI
  )
  assert [p.name for p in paths] == ['pt_toy_slices.png', 'pt_toy_dvh.png']
  for p in paths:
    assert_real_png(p)


def test_shape_errors_name_the_file(patient, tmp_path):
  with pytest.raises(ValueError, match='bad.png'):
    viz.plot_dose_slices(
        patient.ct[:-1],
        patient.pred,
        None,
        patient.structure_masks,
        patient.voxel_dimensions,
        tmp_path / 'bad.png',
    )
  with pytest.raises(ValueError, match='bad.png'):
    viz.plot_dvh(
        patient.pred,
        None,
        patient.structure_masks[..., :7],
        patient.roi_present,
        tmp_path / 'bad.png',
    )


def test_every_openkbp_roi_has_its_own_colour():
  """The colour table is keyed by name: a name spelt differently from the
  data's (e.g. 'Spinalcord') would silently fall back to a tab20 colour
  that may repeat another ROI's."""
  names = plain_scoring.ROI_NAMES  # written out, not the library's
  assert viz.DEFAULT_ROI_NAMES == names
  assert set(viz.ROI_COLOURS) == set(names)
  colours = [viz._roi_colour(n, c) for c, n in enumerate(names)]
  assert len(set(colours)) == len(names)


def test_dvh_curves_take_the_colour_of_their_name(patient):
  """Channels given in another order keep each ROI's colour."""
  order = [9, 2, 0, 5, 1, 3, 4, 6, 7, 8]
  names = [viz.DEFAULT_ROI_NAMES[i] for i in order]
  fig = viz.dvh_figure(
      patient.pred,
      patient.dose,
      patient.structure_masks[..., order],
      patient.roi_present[order],
      roi_names=names,
      dpi=DPI,
  )
  legend = fig.axes[0].get_legend()
  seen = {
      t.get_text(): h.get_color()
      for t, h in zip(legend.get_texts(), legend.legend_handles)
  }
  assert set(seen) & set(viz.ROI_COLOURS), seen
  for name, colour in seen.items():
    if name in viz.ROI_COLOURS:
      assert colour == viz.ROI_COLOURS[name], name


def test_plot_patient_inputs_without_dose(patient, tmp_path):
  """CT with contours in three planes; no dose needed."""
  inputs = SimpleNamespace(**vars(patient))
  inputs.dose = None
  fig = viz.plot_patient(inputs, tmp_path / 'sub' / 'inputs.png', dpi=DPI)
  assert len(fig.axes) == 3
  image = assert_real_png(tmp_path / 'sub' / 'inputs.png', min_side=150)
  assert image.shape[1] > image.shape[0]  # One row of three views.
  # Without a path nothing is written; without targets the views still render.
  inputs.structure_masks = patient.structure_masks.copy()
  inputs.structure_masks[..., 7:] = False
  fig = viz.plot_patient(inputs, dpi=DPI)
  assert len(fig.axes) == 3
  assert list(tmp_path.rglob('*.png')) == [tmp_path / 'sub' / 'inputs.png']


def test_plot_patient_shape_error_names_the_file(patient, tmp_path):
  with pytest.raises(ValueError, match='bad.png'):
    viz.plot_patient(
        SimpleNamespace(**dict(vars(patient), ct=patient.ct[:-1])),
        tmp_path / 'bad.png',
    )
