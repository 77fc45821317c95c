"""docs/design.md section 2: encode_patient and decode_dose."""

import numpy as np
import pytest

from randose_jax import default_config
from randose_jax.data import encoding
from randose_jax.data import openkbp


@pytest.fixture
def data_config():
  return default_config.get_default_config().data


@pytest.fixture
def patient(phantom_split):
  return openkbp.load_patient(phantom_split / "pt_2")


def blocks(x, f, how):
  d, h, w = (n // f for n in x.shape[:3])
  b = x.reshape(d, f, h, f, w, f, *x.shape[3:])
  return b.max((1, 3, 5)) if how == "max" else b.mean((1, 3, 5))


def test_channels_at_full_resolution(patient, data_config):
  enc = encoding.encode_patient(patient, data_config)
  assert set(enc) == {"ptv", "ct", "oar", "target", "mask"}
  shape = patient.grid_shape
  for key, channels in (
      ("ptv", 1),
      ("ct", 1),
      ("oar", 7),
      ("target", 1),
      ("mask", 1),
  ):
    assert (
        enc[key].shape == shape + (channels,) and enc[key].dtype == np.float32
    )
  masks = patient.structure_masks
  # PTV: the highest level of the PTVs a voxel is in (PTV56, PTV63, PTV70).
  expected = np.zeros(shape)
  for level, channel in zip((0.8, 0.9, 1.0), (7, 8, 9)):
    expected = np.where(
        masks[..., channel], np.maximum(expected, level), expected
    )
  np.testing.assert_allclose(enc["ptv"][..., 0], expected, rtol=1e-7)
  assert np.all(enc["ptv"][masks[..., 9]] == 1.0)
  np.testing.assert_array_equal(enc["oar"], masks[..., :7])
  hu = patient.ct.astype(np.float64) - 1024
  np.testing.assert_allclose(
      enc["ct"][..., 0], np.clip(hu, -1024, 1500) / 1000, rtol=1e-6
  )
  assert enc["ct"][patient.ct == 0].max() == pytest.approx(-1.024)  # air
  np.testing.assert_allclose(
      enc["target"][..., 0], patient.dose / 70, rtol=1e-6
  )
  np.testing.assert_array_equal(enc["mask"][..., 0], patient.possible_dose_mask)


def test_config_fields_change_the_encoding(patient, data_config):
  data_config.ptv_values = (0.5, 0.6, 0.7)
  data_config.ct_clip = (-200.0, 200.0)
  data_config.ct_scale = 100.0
  data_config.dose_scale = 35.0
  enc = encoding.encode_patient(patient, data_config)
  assert enc["ptv"].max() == pytest.approx(0.7)
  assert (
      enc["ct"].min() == pytest.approx(-2.0) and enc["ct"].max() <= 2.0 + 1e-6
  )
  np.testing.assert_allclose(
      enc["target"][..., 0], patient.dose / 35, rtol=1e-6
  )


def test_sparse_and_dense_patients_encode_alike(phantom_split, data_config):
  sparse = openkbp.load_sparse_patient(phantom_split / "pt_3")
  a = encoding.encode_patient(sparse, data_config)
  b = encoding.encode_patient(sparse.to_patient(), data_config)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_patient_without_dose(patient, data_config):
  patient.dose = None
  assert not encoding.encode_patient(patient, data_config)["target"].any()


def test_downsample_averages_blocks(patient, data_config):
  full = encoding.encode_patient(patient, data_config)
  data_config.downsample = 2
  half = encoding.encode_patient(patient, data_config)
  for key in ("ptv", "ct", "oar", "target"):
    assert half[key].shape == (8, 8, 8, full[key].shape[-1])
    np.testing.assert_allclose(
        half[key],
        blocks(full[key], 2, "mean"),
        rtol=1e-6,
        atol=1e-7,
        err_msg=key,
    )
  np.testing.assert_array_equal(half["mask"], blocks(full["mask"], 2, "max"))
  assert set(np.unique(half["mask"])) <= {0.0, 1.0}
  # oar and mask come from voxel counts, to the bit what block_reduce gives.
  np.testing.assert_array_equal(
      half["oar"], encoding.block_reduce(full["oar"], 2)
  )
  np.testing.assert_array_equal(
      half["mask"], encoding.block_reduce(full["mask"], 2, "max")
  )
  data_config.downsample = 3
  with pytest.raises(ValueError, match="downsample"):
    encoding.encode_patient(patient, data_config)


def test_decode_full_resolution(patient, data_config):
  target = encoding.encode_patient(patient, data_config)["target"]
  mask = patient.possible_dose_mask
  dose = encoding.decode_dose(target, mask, data_config)
  assert dose.dtype == np.float64 and dose.shape == mask.shape
  np.testing.assert_allclose(dose, patient.dose, rtol=1e-6, atol=1e-9)
  # Negative predictions clip to 0; outside the mask is 0 whatever is predicted.
  pred = np.full(mask.shape, -0.5)
  assert not encoding.decode_dose(pred, mask, data_config).any()
  pred = np.ones(mask.shape + (1,))
  dose = encoding.decode_dose(pred, mask, data_config)
  np.testing.assert_array_equal(dose, np.where(mask, 70.0, 0.0))


def test_decode_upsamples_trilinearly(data_config):
  data_config.downsample = 2
  mask = np.ones((8, 8, 8), bool)
  # A linear ramp along axis 2 at the coarse grid comes back as the same ramp
  # sampled at the fine voxel centres (clamped at the two ends).
  coarse = np.broadcast_to(np.arange(4.0), (4, 4, 4))
  dose = encoding.decode_dose(coarse, mask, data_config)
  fine_coordinates = (np.arange(8) + 0.5) / 2 - 0.5
  np.testing.assert_allclose(dose[3, 5], 70 * np.clip(fine_coordinates, 0, 3))
  # A constant stays constant.
  dose = encoding.decode_dose(np.full((4, 4, 4, 1), 0.5), mask, data_config)
  np.testing.assert_allclose(dose, 35.0)
  with pytest.raises(ValueError, match="does not match"):
    encoding.decode_dose(np.zeros((8, 8, 8)), mask, data_config)


def test_downsample_then_decode_is_close(patient, data_config):
  data_config.downsample = 2
  target = encoding.encode_patient(patient, data_config)["target"]
  dose = encoding.decode_dose(target, patient.possible_dose_mask, data_config)
  inside = patient.dose[patient.possible_dose_mask]
  error = np.abs(dose[patient.possible_dose_mask] - inside).mean()
  # Far better than the best constant guess, even on a coarse 16^3 phantom.
  assert error < 0.5 * np.abs(inside - np.median(inside)).mean()


@pytest.mark.parametrize("downsample", [1, 2])
def test_decode_with_a_sparse_patient_equals_the_dense_mask(
    phantom_split, data_config, downsample
):
  """Validation decodes with the patient's voxel lists, never a dense mask."""
  sparse = openkbp.load_sparse_patient(phantom_split / "pt_2")
  mask = sparse.to_patient().possible_dose_mask
  assert mask.any() and not mask.all()
  data_config.downsample = downsample
  grid = encoding.training_grid(sparse.grid_shape, downsample)
  pred = np.random.default_rng(0).uniform(-1.0, 1.0, grid + (1,))
  dense = encoding.decode_dose(pred, mask, data_config)
  assert (dense[mask] == 0).any() and (dense[mask] > 0).any()  # clipped, kept
  np.testing.assert_array_equal(
      encoding.decode_dose(pred, sparse, data_config), dense
  )
