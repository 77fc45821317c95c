"""The prediction path in JAX (`standalone.py`, what `export` serializes):
the distance transform against scipy's, the distance channels against
`distances.dense` (and the box they are computed on), on phantoms and one
real patient."""

import jax
import numpy as np
import pytest
from scipy import ndimage

from randose_jax.inference import standalone
from randose_jax.data import distances
from randose_jax.data import openkbp
from randose_jax.data import phantoms


def _blobs(shape, seed):
  rng = np.random.default_rng(seed)
  field = ndimage.gaussian_filter(rng.normal(size=shape), 2.0)
  return field > 0.6 * field.std()


def test_squared_edt_equals_scipy_with_anisotropic_spacing():
  # Distinct lengths and spacings on every axis, so a spacing applied to
  # the wrong axis shows.
  shape, spacing = (9, 12, 15), np.array([3.5, 1.25, 2.0])
  features = np.stack([_blobs(shape, s) for s in range(2)], -1)
  features[..., 1] = False
  features[4, 6, 7, 1] = True  # one voxel
  got = np.sqrt(
      np.asarray(jax.jit(standalone.squared_edt)(features, np.float32(spacing)))
  )
  for c in range(features.shape[-1]):
    want = ndimage.distance_transform_edt(~features[..., c], sampling=spacing)
    np.testing.assert_allclose(got[..., c], want, rtol=1e-6, atol=1e-5)


def _patient_channels(patient, scale_mm=50.0, slab=False):
  sparse = openkbp.SparsePatient.from_patient(patient)
  want = distances.dense(sparse, scale_mm, slab)
  got = jax.jit(standalone.ptv_distances, static_argnums=(3, 4))(
      patient.structure_masks[..., 7:],
      patient.possible_dose_mask,
      np.float32(patient.voxel_dimensions),
      scale_mm,
      slab,
  )
  return sparse, np.asarray(got), want


def test_distances_in_a_box_equal_those_on_the_whole_grid(tmp_path):
  # distances.py computes on the mask-and-PTV box grown by one voxel; the
  # whole grid gives the same values inside it (what standalone relies on).
  phantoms.write_phantoms(tmp_path, 2, grid=16, seed=3)
  for d in openkbp.list_patient_dirs(tmp_path):
    patient = openkbp.load_patient(d)
    sparse, got, want = _patient_channels(patient)
    lo, box = distances.ptv_distances(sparse, 50.0)
    spacing = np.asarray(patient.voxel_dimensions, np.float64)
    for c in range(3):
      inside = patient.structure_masks[..., 7 + c]
      if not inside.any():
        continue
      whole = ndimage.distance_transform_edt(~inside, sampling=spacing)
      whole -= ndimage.distance_transform_edt(inside, sampling=spacing)
      whole = np.clip(whole / 50.0, *distances.GEOMETRY_CLIP)
      where = tuple(slice(o, o + n) for o, n in zip(lo, box.shape[:3]))
      np.testing.assert_allclose(
          box[..., c], whole[where].astype(np.float16), rtol=0, atol=0
      )
    # JAX: float16 of float32 vs of float64 distances: one float16 step at
    # most, where the two round differently.
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
    assert (got == distances.FAR).sum() > 0


def test_distances_on_a_real_patient(shared_openkbp):
  patient_dir = openkbp.list_patient_dirs(shared_openkbp / "validation-pats")[0]
  patient = openkbp.load_patient(patient_dir)
  _, got, want = _patient_channels(patient, slab=True)
  assert got.shape[-1] == 6
  np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3)
  assert np.mean(got != want) < 1e-3


def test_export_of_a_crop_downsample_geometry_model_on_a_real_patient(
    shared_openkbp, tmp_path
):
  """An untrained tiny model on a real 128^3 patient (anisotropic voxels):
  16^3 windows on the 64^3 grid of downsample 2, with the distance channels:
  every step of the path at once, against `predict_doses`."""
  from randose_jax.inference import export  # pylint: disable=g-import-not-at-top
  from randose_jax.inference import predictor as predictor_lib  # pylint: disable=g-import-not-at-top
  from randose_jax.inference import restore  # pylint: disable=g-import-not-at-top
  from randose_jax.training import train  # pylint: disable=g-import-not-at-top
  from randose_jax.data import encoding  # pylint: disable=g-import-not-at-top
  from tests.test_predict_export import assert_export_predicts_as_the_library  # pylint: disable=g-import-not-at-top
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top

  config = tiny_config(
      **{
          "data.synthetic": False,
          "data.crop_shape": (16, 16, 16),
          "data.geometry": True,
          "data.geometry_slab": True,
      }
  )
  mesh = train.make_mesh(jax.devices()[:1])
  params = train.Trainer.create(config, mesh).init_state(0).params
  # Initial parameters predict 0 (a zero head): shaken, and raised.
  rng = np.random.default_rng(0)
  params["model"] = jax.tree.map(
      lambda x: x + rng.normal(0, 0.3, x.shape).astype(x.dtype),
      jax.device_get(params["model"]),
  )
  params["model"]["head"]["bias"] += 0.5
  restored = restore.Restored(
      config=config,
      predictor=predictor_lib.Predictor.create(config, params["model"], mesh),
      params=params,
      step=0,
      which="init",
  )
  patient_dir = openkbp.list_patient_dirs(shared_openkbp / "validation-pats")[0]
  patient = openkbp.load_patient(patient_dir)
  example = encoding.encode_patient(patient, config.data)
  lo, hi = predictor_lib._mask_box(example)  # pylint: disable=protected-access
  counts = [
      len(predictor_lib.window_starts(lo[a], hi[a], 16, 64, 0.5))
      for a in range(3)
  ]
  assert max(counts) > 1  # several windows, some of the 7^3 unused
  artifact = export.export_restored(
      restored, tmp_path / "real.zip", platforms=("cpu",)
  )
  assert export.load(artifact).meta["grid"] == [128, 128, 128]
  assert_export_predicts_as_the_library(artifact, restored, [patient], False)
