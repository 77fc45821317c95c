"""A plain, per-patient implementation of the official OpenKBP scores.

This is the independent reference for `randose_jax.scoring.dose_dvh`: it follows
docs/design.md section 6 literally, the way the starter kit's `DoseEvaluator` does
(one patient at a time, ROI by ROI, metric by metric, one `np.percentile` call
per metric, boolean indexing of the full volume for every ROI). It imports
nothing from `randose_jax`, so a mistake in the library cannot hide in it.

Both `tests/test_evaluation.py` and `benchmarks/evaluator.py` import this one
copy (the benchmark adds `tests/` to `sys.path`).

The only choice the rules leave open: an OAR smaller than 0.1 cc makes the
D_0.1cc percentile `100 - n / roi_size * 100` negative (the starter kit's
`np.percentile` would raise). Here it is clipped at 0, so D_0.1cc of such an
ROI is its minimum dose (the whole ROI lies within the hottest 0.1 cc).
"""

import numpy as np

ROI_NAMES = (
    'Brainstem',
    'SpinalCord',
    'RightParotid',
    'LeftParotid',
    'Esophagus',
    'Larynx',
    'Mandible',
    'PTV56',
    'PTV63',
    'PTV70',
)
OAR_NAMES = ROI_NAMES[:7]
TARGET_NAMES = ROI_NAMES[7:]
METRIC_NAMES = ('D_0.1_cc', 'mean', 'D_99', 'D_95', 'D_1')


def plain_dose_error(reference, prediction, possible_dose_mask):
  """Sum over all voxels of |reference - prediction| (Gy) / mask voxel count."""
  return float(
      np.sum(np.abs(reference - prediction)) / np.sum(possible_dose_mask)
  )


def plain_dvh_metrics(dose, structure_masks, roi_present, voxel_dimensions):
  """Returns {(roi, metric): value in Gy} for every metric that exists.

  Args:
    dose: (D, H, W) Gy.
    structure_masks: bool (D, H, W, 10), official ROI order.
    roi_present: bool (10,).
    voxel_dimensions: (3,) mm.
  """
  voxel_volume = float(np.prod(voxel_dimensions))  # mm^3
  voxels_in_tenth_cc = max(1, round(100 / voxel_volume))
  metrics = {}
  for roi_index, roi in enumerate(ROI_NAMES):
    if not roi_present[roi_index]:
      continue
    roi_mask = structure_masks[..., roi_index]
    if not roi_mask.any():
      continue
    roi_dose = dose[roi_mask]
    roi_size = roi_dose.size
    if roi in OAR_NAMES:
      q = 100 - voxels_in_tenth_cc / roi_size * 100
      metrics[(roi, 'D_0.1_cc')] = float(np.percentile(roi_dose, max(q, 0.0)))
      metrics[(roi, 'mean')] = float(roi_dose.mean())
    else:
      metrics[(roi, 'D_99')] = float(np.percentile(roi_dose, 1))
      metrics[(roi, 'D_95')] = float(np.percentile(roi_dose, 5))
      metrics[(roi, 'D_1')] = float(np.percentile(roi_dose, 99))
  return metrics


def plain_scores(cases):
  """Official (dose score, DVH score) of an iterable of patients.

  Args:
    cases: iterable of dicts with keys 'patient_id', 'reference' (D, H, W) Gy,
      'prediction' (D, H, W) Gy, 'possible_dose_mask' bool (D, H, W),
      'structure_masks' bool (D, H, W, 10), 'roi_present' bool (10,),
      'voxel_dimensions' (3,) mm.

  Returns:
    (dose_score, dvh_score, dose_errors [error per case, in order],
     rows [(patient_id, roi, metric, reference, prediction, abs_error)]).
  """
  dose_errors = []
  rows = []
  for case in cases:
    pid = case['patient_id']
    dose_errors.append(
        plain_dose_error(
            case['reference'], case['prediction'], case['possible_dose_mask']
        )
    )
    geometry = (
        case['structure_masks'],
        case['roi_present'],
        case['voxel_dimensions'],
    )
    reference = plain_dvh_metrics(case['reference'], *geometry)
    prediction = plain_dvh_metrics(case['prediction'], *geometry)
    for key, ref_value in reference.items():
      rows.append(
          (
              pid,
              key[0],
              key[1],
              ref_value,
              prediction[key],
              abs(ref_value - prediction[key]),
          )
      )
  dose_score = float(np.mean(dose_errors))
  dvh_score = (
      float(np.mean([row[-1] for row in rows])) if rows else float('nan')
  )
  return dose_score, dvh_score, dose_errors, rows
