"""Validation scoring (`validation.py`): each cached patient is read once and
scored from its voxel lists (`Reference.from_sparse`, `decode_dose` with the
`SparsePatient`); the numbers equal those of the dense patients."""

import numpy as np
import pytest

from tests import plain_scoring
from tests import stand_ins
from randose_jax import default_config
from randose_jax.scoring import dose_dvh as evaluation
from randose_jax.training import validation
from randose_jax.data import cache as cache_lib
from randose_jax.data import encoding
from randose_jax.data import openkbp
from tests import helpers


def FixedModel(config):  # pylint: disable=invalid-name
  """A `Predictor` whose network is a fixed function of the inputs, so every
  path scores the same (encoding and decoding are the Predictor's)."""
  return stand_ins.FunctionPredictor(
      config.data, lambda e: 0.9 * e["ptv"] + 0.2 * e["mask"] - 0.1 * e["ct"]
  )


@pytest.fixture(params=[1, 2], ids=["downsample1", "downsample2"])
def config_and_cache(request, phantom_split, tmp_path):
  config = default_config.get_default_config()
  config.data.downsample = request.param
  cache = cache_lib.build_cache(
      openkbp.list_patient_dirs(phantom_split), tmp_path / "cache", config.data
  )
  return config, cache


def dense_scores(cache, config, prediction_of):
  """The scores from the dense patients (`cache.reference`), and the plain
  reference implementation's (dose score, DVH score)."""
  evaluator, cases = evaluation.Evaluator(), []
  for i in range(len(cache)):
    patient = cache.reference(i)
    dose = prediction_of(patient)
    evaluator.add(evaluation.Reference.from_patient(patient), dose)
    cases.append(
        {
            "patient_id": patient.patient_id,
            "reference": patient.dose,
            "prediction": dose,
            "possible_dose_mask": patient.possible_dose_mask,
            "structure_masks": patient.structure_masks,
            "roi_present": patient.roi_present,
            "voxel_dimensions": patient.voxel_dimensions,
        }
    )
  return (
      evaluation.scores_from_sums(evaluator.partial_sums()),
      plain_scoring.plain_scores(cases)[:2],
  )


def test_model_scores_equal_the_dense_path(config_and_cache, tmp_path):
  config, cache = config_and_cache
  model = FixedModel(config)
  scores = validation.evaluate(model, cache, write_dir=tmp_path)

  def prediction_of(patient):
    example = encoding.encode_patient(patient, config.data)
    pred = model.predict_local([example], False)[0]
    dose = encoding.decode_dose(pred, patient.possible_dose_mask, config.data)
    written = openkbp.read_prediction_csv(
        tmp_path / f"{patient.patient_id}.csv", patient.grid_shape
    )
    np.testing.assert_allclose(written, dose, atol=1e-3)
    return dose

  expected, plain = dense_scores(cache, config, prediction_of)
  assert scores == expected
  assert scores["num_patients"] == len(cache)
  np.testing.assert_allclose(
      [scores["dose_score"], scores["dvh_score"]], plain, rtol=1e-6
  )


def test_constant_baseline_equals_the_dense_path(config_and_cache):
  config, cache = config_and_cache
  mean_gy = validation.mean_training_dose(cache)
  patients = [cache.reference(i) for i in range(len(cache))]
  assert mean_gy == (
      sum(p.dose[p.possible_dose_mask].sum() for p in patients)
      / sum(p.possible_dose_mask.sum() for p in patients)
  )
  scores = helpers.evaluate_baseline(cache, mean_gy)
  expected, plain = dense_scores(
      cache, config, lambda p: np.where(p.possible_dose_mask, mean_gy, 0.0)
  )
  assert scores == expected
  np.testing.assert_allclose(
      [scores["dose_score"], scores["dvh_score"]], plain, rtol=1e-6
  )
