"""The official OpenKBP scores: dose score and DVH score (docs/design.md section 6).

The numbers equal the starter kit's `DoseEvaluator`:

- dose error of a patient: sum over ALL voxels of |reference - prediction|
  (Gy), divided by the number of possible-dose-mask voxels; dose score = mean
  of the patients' dose errors (so dose outside the mask counts);
- DVH metrics of each present ROI (flag set and mask nonempty): OARs D_0.1cc
  and mean dose; targets D99, D95, D1 = numpy percentiles 1, 5, 99 (linear
  interpolation) of the ROI's doses; D_0.1cc is the percentile
  100 - n / roi_size * 100 with n = max(1, round(100 / voxel_volume_mm3)),
  the number of voxels in 0.1 cc;
- DVH score = mean of |reference metric - predicted metric| pooled over every
  (patient, ROI, metric) that exists, not a mean of per-patient means.

Scores are always reported in the order (dose score, DVH score).

One choice the rules leave open: for an OAR smaller than 0.1 cc the D_0.1cc
percentile is negative (the starter kit's `np.percentile` raises). It is
clipped to 0 here, so D_0.1cc of such an ROI is its minimum dose: the whole ROI
lies within its hottest 0.1 cc.

A dose is never negative: a reference or a prediction holding a negative
value is refused (ValueError), never clipped or scored as it stands.

Speed, without changing a number (benchmarks/evaluator.py): the reference
side of a patient (each ROI's flat voxel indices, its metrics, the
possible-dose voxels) is computed once in `Reference`, which can be kept to
score many predictions. `Reference.from_sparse` builds it straight from the
sorted voxel lists the cache and the CSVs hold (no dense mask is made or
scanned; the reference dose at the ROI voxels is a binary search in the
mask's list); `from_arrays` finds the lists in dense masks with one pass.
Each ROI's doses are one gather instead of a boolean mask over the whole
volume; all percentiles of one ROI come from one partial sort; when both
doses are zero off the possible-dose mask (always so for decoded
predictions), the dose error sums over the mask voxels only; otherwise
|prediction| off the mask is added, in cache-sized chunks (the reference is
zero there, so no dense reference dose is needed). `Evaluator` takes one patient at a time,
so scoring 100 patients at 128^3 never holds more than one in memory.
"""

import dataclasses
import functools
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from randose_jax.data import openkbp

if TYPE_CHECKING:  # imported where used: scoring itself needs no pandas
  import pandas as pd

# Columns of every (..., 10, 5) metric array; rows are openkbp.ROI_NAMES.
# OARs have the first two, targets the last three.
METRIC_NAMES = ('D_0.1_cc', 'mean', 'D_99', 'D_95', 'D_1')
# D99, D95, D1: the dose received by 99%, 95%, 1% of the ROI is the
# 1st, 5th, 99th percentile of its doses.
TARGET_PERCENTILES = np.array([1.0, 5.0, 99.0])
_NUM_OARS = len(openkbp.OAR_NAMES)
_METRICS_SHAPE = (len(openkbp.ROI_NAMES), len(METRIC_NAMES))

_CHUNK = 1 << 16  # voxels per chunk of the dose error (512 KiB of float64)
_BLOCK = 4096  # bytes per block when searching a sparse mask


def voxels_per_tenth_cc(voxel_dimensions: Sequence[float]) -> int:
  """n = max(1, round(100 / voxel volume in mm^3)): voxels in 0.1 cc = 100 mm^3."""
  voxel_volume = float(np.prod(np.asarray(voxel_dimensions, np.float64)))
  return max(1, round(100 / voxel_volume))


def roi_voxel_indices(
    structure_masks: np.ndarray,
    roi_present: Sequence[bool] | None = None,
) -> tuple[np.ndarray, ...]:
  """Flat C-order voxel indices of each ROI, ascending.

  Args:
    structure_masks: bool (D, H, W, R), R = 10 in the official order.
    roi_present: bool (R,); an ROI whose flag is False gets no voxels whatever
      its mask holds. None: every ROI is present.

  Returns:
    R int64 arrays of indices into the flattened (D, H, W) grid (empty for an
    absent ROI).
  """
  masks = np.ascontiguousarray(structure_masks, dtype=bool)
  num_rois = masks.shape[-1]
  if roi_present is None:
    present = np.ones(num_rois, bool)
  else:
    present = np.asarray(roi_present, bool)
    if present.shape != (num_rois,):
      raise ValueError(
          f'roi_present has shape {present.shape}, expected ({num_rois},)'
      )
  # One pass over all (voxel, ROI) bytes, then a split by ROI of the few
  # True ones: much cheaper than one strided pass per ROI.
  voxel, roi = np.divmod(_true_indices(masks.reshape(-1)), num_rois)
  empty = np.zeros(0, np.int64)
  return tuple(
      voxel[roi == r] if present[r] else empty for r in range(num_rois)
  )


def _true_indices(flat: np.ndarray) -> np.ndarray:
  """np.flatnonzero of a contiguous 1-D bool array, fast when it is sparse.

  ROI masks fill a few percent of the grid. One vectorised pass (a max over
  8-byte words) finds the 4 KiB blocks holding any True; only those are
  searched voxel by voxel. About twice as fast as np.flatnonzero on a 20 MiB
  structure-mask array.
  """
  head = flat.size - flat.size % _BLOCK
  words = flat[:head].view(np.uint64).reshape(-1, _BLOCK // 8)
  blocks = np.flatnonzero(words.max(axis=1, initial=0))
  block, offset = np.divmod(
      np.flatnonzero(flat[:head].reshape(-1, _BLOCK)[blocks]), _BLOCK
  )
  return np.concatenate(
      [blocks[block] * _BLOCK + offset, head + np.flatnonzero(flat[head:])]
  )


@dataclasses.dataclass(frozen=True, eq=False)
class _MetricPlan:
  """How one patient's ROI doses become its (10, 5) metrics; built once.

  The present ROIs' voxel indices are concatenated, ROI after ROI, so a dose's
  ROI values are one gather. Each ROI's percentiles then come from one
  in-place partial sort of its segment (np.partition at the needed ranks) and
  a linear interpolation between neighbouring ranks, which is numpy's
  'linear' percentile.
  """

  indices: np.ndarray  # (V,) int64 flat voxel indices, ROI after ROI
  segments: tuple[tuple[int, int, np.ndarray], ...]  # (start, stop, ranks)
  segment_starts: np.ndarray  # (S,) start of each present ROI's segment
  mean_segments: np.ndarray  # (M,) which segments are OARs (their means)
  mean_counts: np.ndarray  # (M,) voxels of those OARs
  mean_cells: np.ndarray  # (M,) flat cells of the (10, 5) array
  below: np.ndarray  # (K,) positions in the gathered values (lower rank)
  above: np.ndarray  # (K,) positions of the upper rank
  weight: np.ndarray  # (K,) interpolation weight of the upper rank
  percentile_cells: np.ndarray  # (K,) flat cells of the (10, 5) array

  @classmethod
  def build(
      cls, roi_indices: Sequence[np.ndarray], tenth_cc_voxels: int
  ) -> '_MetricPlan':
    num_metrics = len(METRIC_NAMES)
    segments, starts = [], []
    mean_segments, mean_counts, mean_cells = [], [], []
    below, above, weight, cells = [], [], [], []
    offset = 0
    for r, roi in enumerate(roi_indices):
      n = roi.size
      if n == 0:
        continue
      if r < _NUM_OARS:
        q = np.array([max(0.0, 100 - tenth_cc_voxels / n * 100)])
        columns = [0]
        mean_segments.append(len(segments))
        mean_counts.append(n)
        mean_cells.append(r * num_metrics + 1)
      else:
        q = TARGET_PERCENTILES
        columns = [2, 3, 4]
      position = q / 100 * (n - 1)
      low = np.floor(position).astype(np.int64)
      high = np.minimum(low + 1, n - 1)
      segments.append((offset, offset + n, np.concatenate([low, high])))
      starts.append(offset)
      below.append(offset + low)
      above.append(offset + high)
      weight.append(position - low)
      cells.append(r * num_metrics + np.array(columns))
      offset += n
    concat = lambda parts, dtype: (
        np.concatenate(parts) if parts else np.zeros(0, dtype)
    )
    return cls(
        indices=concat([i for i in roi_indices if i.size], np.int64),
        segments=tuple(segments),
        segment_starts=np.array(starts, np.int64),
        mean_segments=np.array(mean_segments, np.int64),
        mean_counts=np.array(mean_counts, np.float64),
        mean_cells=np.array(mean_cells, np.int64),
        below=concat(below, np.int64),
        above=concat(above, np.int64),
        weight=concat(weight, np.float64),
        percentile_cells=concat(cells, np.int64),
    )

  def metrics(self, dose_flat: np.ndarray) -> np.ndarray:
    """(10, 5) float64 Gy metrics of a flat dose (NaN where none exists)."""
    if not self.segments:
      return np.full(_METRICS_SHAPE, np.nan)
    return self.metrics_of_values(
        dose_flat[self.indices].astype(np.float64, copy=False)
    )

  def metrics_of_values(self, values: np.ndarray) -> np.ndarray:
    """`metrics` from the doses at `indices` (float64 (V,), a copy this
    call may reorder in place)."""
    metrics = np.full(_METRICS_SHAPE, np.nan)
    if not self.segments:
      return metrics
    cells = metrics.reshape(-1)  # a view
    if self.mean_segments.size:
      sums = np.add.reduceat(values, self.segment_starts)[self.mean_segments]
      cells[self.mean_cells] = sums / self.mean_counts
    for start, stop, ranks in self.segments:
      values[start:stop].partition(ranks)  # in place: `values` is a copy
    low, high = values[self.below], values[self.above]
    cells[self.percentile_cells] = low + (high - low) * self.weight
    return metrics


def dvh_metrics(
    dose_gy: np.ndarray,
    structure_masks: np.ndarray,
    roi_present: Sequence[bool] | None,
    voxel_dimensions: Sequence[float],
) -> np.ndarray:
  """DVH metrics of one dose distribution.

  Args:
    dose_gy: (D, H, W) Gy.
    structure_masks: bool (D, H, W, 10), official ROI order.
    roi_present: bool (10,), or None for "every ROI with voxels".
    voxel_dimensions: (3,) mm.

  Returns:
    float64 (10, 5) Gy: rows `openkbp.ROI_NAMES`, columns `METRIC_NAMES`; NaN where the
    ROI is absent or empty, or the metric does not apply to it.
  """
  _check_grid(dose_gy, structure_masks.shape[:-1], 'dose_gy')
  plan = _MetricPlan.build(
      roi_voxel_indices(structure_masks, roi_present),
      voxels_per_tenth_cc(voxel_dimensions),
  )
  return plan.metrics(np.ascontiguousarray(dose_gy).reshape(-1))


def _abs_difference_sum(a: np.ndarray, b: np.ndarray) -> float:
  """sum |a - b| (float64) over all elements, in cache-sized chunks."""
  a = np.ascontiguousarray(a).reshape(-1)
  b = np.ascontiguousarray(b).reshape(-1)
  buffer = np.empty(min(_CHUNK, a.size), np.float64)
  total = 0.0
  for start in range(0, a.size, _CHUNK):
    chunk = buffer[: min(_CHUNK, a.size - start)]
    np.subtract(a[start : start + _CHUNK], b[start : start + _CHUNK], out=chunk)
    np.abs(chunk, out=chunk)
    total += float(chunk.sum())
  return total


def _abs_sum_off(values: np.ndarray, skip: np.ndarray) -> float:
  """sum |values| (float64) over the flat indices not in `skip` (sorted,
  unique), in cache-sized chunks."""
  n = values.size
  buffer = np.empty(min(_CHUNK, n), np.float64)
  bounds = np.searchsorted(skip, np.arange(0, n + _CHUNK, _CHUNK))
  total = 0.0
  for chunk_index, start in enumerate(range(0, n, _CHUNK)):
    chunk = buffer[: min(_CHUNK, n - start)]
    np.abs(values[start : start + _CHUNK], out=chunk)
    chunk[skip[bounds[chunk_index] : bounds[chunk_index + 1]] - start] = 0.0
    total += float(chunk.sum())
  return total


def dose_error(
    reference: np.ndarray,
    prediction: np.ndarray,
    possible_dose_mask: np.ndarray,
) -> float:
  """One patient's dose error, Gy per possible-dose voxel.

  Args:
    reference: (D, H, W) Gy.
    prediction: (D, H, W) Gy; dose outside the mask counts.
    possible_dose_mask: bool (D, H, W), the denominator's voxels.
  """
  _check_grid(prediction, reference.shape, 'prediction')
  _check_grid(possible_dose_mask, reference.shape, 'possible_dose_mask')
  return _abs_difference_sum(reference, prediction) / np.count_nonzero(
      possible_dose_mask
  )


def _count_nonzero_bits(values: np.ndarray) -> int:
  """Elements whose bits are not all zero (-0.0 counts: it only costs a slower
  path). Counting float bits as unsigned integers is faster than comparing floats.
  """
  if values.dtype.kind == 'f':
    values = values.view(f'u{values.itemsize}')
  return int(np.count_nonzero(values))


def _bits_nonzero(values: np.ndarray) -> np.ndarray:
  """values != 0 by bits (-0.0 counts, as in `_count_nonzero_bits`)."""
  if values.dtype.kind == 'f':
    values = values.view(f'u{values.itemsize}')
  return values != 0


def _check_nonnegative(values: np.ndarray, what: str) -> None:
  """A dose is never negative: raises ValueError naming `what` if one is."""
  if values.size and values.min() < 0:
    raise ValueError(
        f'{what} holds a negative dose at '
        f'{np.count_nonzero(values < 0)} voxel(s) (min '
        f'{float(values.min())!r} Gy); a dose is never negative'
    )


def _check_grid(
    array: np.ndarray,
    shape: tuple[int, ...],
    name: str,
    patient_id: str | None = None,
) -> None:
  if array.shape != tuple(shape):
    whose = f' of {patient_id}' if patient_id else ''
    raise ValueError(
        f'{name}{whose} has shape {array.shape}, expected {tuple(shape)}'
    )


@dataclasses.dataclass(frozen=True, eq=False)
class Reference:
  """The reference side of one patient, prepared once for any predictions.

  Build it with `from_sparse` (the voxel lists a `PatientCache` or
  `openkbp.load_sparse_patient` gives: no pass over dense masks, the fastest),
  `from_patient` or `from_arrays`.

  Attributes:
    patient_id: e.g. 'pt_201'.
    grid_shape: (D, H, W).
    num_mask_voxels: voxels in the possible-dose mask (the dose error's
      denominator).
    metrics: float64 (10, 5) Gy, the reference DVH metrics (NaN: none).
    dose: (D, H, W) Gy, the reference dose (made on first use when built
      from sparse data; scoring never needs it).
  """

  patient_id: str
  grid_shape: tuple[int, int, int]
  num_mask_voxels: int
  metrics: np.ndarray
  _plan: _MetricPlan = dataclasses.field(repr=False)
  # Sorted flat indices off which the reference dose is zero (the
  # possible-dose mask for OpenKBP data), and the reference dose there.
  _support: np.ndarray = dataclasses.field(repr=False)
  _support_dose: np.ndarray = dataclasses.field(repr=False)

  @functools.cached_property
  def dose(self) -> np.ndarray:
    dose = np.zeros(int(np.prod(self.grid_shape)), self._support_dose.dtype)
    dose[self._support] = self._support_dose
    return dose.reshape(self.grid_shape)

  @classmethod
  def from_arrays(
      cls,
      patient_id: str,
      dose: np.ndarray,
      possible_dose_mask: np.ndarray,
      structure_masks: np.ndarray,
      roi_present: Sequence[bool] | None,
      voxel_dimensions: Sequence[float],
  ) -> 'Reference':
    """Args as in `dvh_metrics`; dose (D, H, W) Gy, mask bool (D, H, W)."""
    dose = np.ascontiguousarray(dose)
    _check_grid(
        possible_dose_mask, dose.shape, 'possible_dose_mask', patient_id
    )
    _check_grid(
        structure_masks,
        dose.shape + (len(openkbp.ROI_NAMES),),
        'structure_masks',
        patient_id,
    )
    mask = np.ascontiguousarray(possible_dose_mask, dtype=bool).reshape(-1)
    support = np.flatnonzero(mask)  # dense enough for the plain search
    if support.size == 0:
      raise ValueError(f'{patient_id}: the possible-dose mask is empty')
    dose_flat = dose.reshape(-1)
    _check_nonnegative(dose_flat, f'reference dose of {patient_id}')
    support_dose = dose_flat[support]
    num_mask_voxels = support.size
    if _count_nonzero_bits(dose_flat) != _count_nonzero_bits(support_dose):
      # Reference dose outside the mask (never so in OpenKBP): widen.
      support = np.flatnonzero(mask | (dose_flat != 0))
      support_dose = dose_flat[support]
    plan = _MetricPlan.build(
        roi_voxel_indices(structure_masks, roi_present),
        voxels_per_tenth_cc(voxel_dimensions),
    )
    reference = cls(
        patient_id,
        tuple(dose.shape),
        num_mask_voxels,
        plan.metrics(dose_flat),
        plan,
        support,
        support_dose,
    )
    reference.__dict__['dose'] = dose  # the cached_property's slot
    return reference

  @classmethod
  def from_sparse(cls, patient: Any) -> 'Reference':
    """From a `randose_jax.data.openkbp.SparsePatient` (sorted voxel lists, as
    `PatientCache.sparse(i)` and `openkbp.load_sparse_patient` give; its
    dose must be loaded). Equal to `from_patient(patient.to_patient())`
    without making or scanning a dense volume."""
    if patient.dose_index is None:
      raise ValueError(
          f'reference patient {patient.patient_id} has no dose '
          '(no dose.csv in its folder)'
      )
    mask_index = np.asarray(patient.mask_index, np.int64)
    if mask_index.size == 0:
      raise ValueError(f'{patient.patient_id}: the possible-dose mask is empty')
    dose_index = np.asarray(patient.dose_index, np.int64)
    dose_value = np.asarray(patient.dose_value)
    _check_nonnegative(dose_value, f'reference dose of {patient.patient_id}')
    if np.array_equal(dose_index, mask_index):  # OpenKBP: dose.csv = the mask
      support, support_dose = mask_index, dose_value
    else:
      nonzero = _bits_nonzero(dose_value)
      support = np.union1d(mask_index, dose_index[nonzero])
      support_dose = np.zeros(support.size, dose_value.dtype)
      support_dose[np.searchsorted(support, dose_index[nonzero])] = dose_value[
          nonzero
      ]
    plan = _MetricPlan.build(
        patient.roi_index, voxels_per_tenth_cc(patient.voxel_dimensions)
    )
    # The reference dose at the ROI voxels: found in the sorted support.
    position = np.minimum(
        np.searchsorted(support, plan.indices), support.size - 1
    )
    values = np.where(
        support[position] == plan.indices, support_dose[position], 0.0
    ).astype(np.float64)
    return cls(
        patient.patient_id,
        tuple(int(n) for n in patient.grid_shape),
        int(mask_index.size),
        plan.metrics_of_values(values),
        plan,
        support,
        support_dose,
    )

  @classmethod
  def from_patient(cls, patient: Any) -> 'Reference':
    """From a `randose_jax.data.openkbp.Patient` (its dose must be loaded)."""
    if patient.dose is None:
      raise ValueError(
          f'reference patient {patient.patient_id} has no dose '
          '(no dose.csv in its folder)'
      )
    return cls.from_arrays(
        patient.patient_id,
        patient.dose,
        patient.possible_dose_mask,
        patient.structure_masks,
        patient.roi_present,
        patient.voxel_dimensions,
    )

  def score(self, prediction: np.ndarray) -> tuple[float, np.ndarray]:
    """Scores one prediction of this patient.

    Args:
      prediction: (D, H, W) Gy on the reference's grid.

    Returns:
      (dose error in Gy per mask voxel, predicted metrics float64 (10, 5) Gy).

    Raises:
      ValueError: a wrong grid, NaN / inf, or a negative dose (never clipped).
    """
    _check_grid(prediction, self.grid_shape, 'prediction', self.patient_id)
    prediction = np.ascontiguousarray(prediction).reshape(-1)
    on_support = prediction[self._support]
    what = f'prediction of {self.patient_id}'
    _check_nonnegative(on_support, what)
    total = float(np.abs(self._support_dose - on_support).sum())
    if _count_nonzero_bits(prediction) != _count_nonzero_bits(on_support):
      # Dose off the support, where the reference is zero: add |prediction|
      # there (a sum of non-negative terms; no dense reference needed).
      _check_nonnegative(prediction, what)
      total += _abs_sum_off(prediction, self._support)
    error = total / self.num_mask_voxels
    if not np.isfinite(error):
      raise ValueError(f'prediction of {self.patient_id} holds NaN or inf')
    return error, self._plan.metrics(prediction)


@dataclasses.dataclass(frozen=True, eq=False)
class EvaluationResult:
  """Scores of a set of patients.

  Attributes:
    dose_score: mean dose error over patients, Gy.
    dvh_score: mean |reference - predicted| DVH metric over every
      (patient, ROI, metric) that exists, Gy (NaN if none exists).
    patient_ids: (P,) in the order they were added.
    dose_errors: float64 (P,) Gy per possible-dose voxel.
    reference_metrics: float64 (P, 10, 5) Gy, NaN where a metric does not exist.
    predicted_metrics: float64 (P, 10, 5) Gy, NaN at the same places.
  """

  dose_score: float
  dvh_score: float
  patient_ids: tuple[str, ...]
  dose_errors: np.ndarray
  reference_metrics: np.ndarray
  predicted_metrics: np.ndarray

  @property
  def num_patients(self) -> int:
    return len(self.patient_ids)

  @property
  def num_dvh_metrics(self) -> int:
    """How many (patient, ROI, metric) values the DVH score pools."""
    return int(np.count_nonzero(~np.isnan(self.reference_metrics)))

  def metric_table(self) -> 'pd.DataFrame':
    """One row per existing (patient, ROI, metric): patient_id, roi, metric,
    reference, prediction, abs_error (Gy); patients in order added, then ROIs
    and metrics in the official order."""
    p, r, m = np.nonzero(~np.isnan(self.reference_metrics))
    reference = self.reference_metrics[p, r, m]
    prediction = self.predicted_metrics[p, r, m]
    import pandas as pd  # pylint: disable=g-import-not-at-top

    return pd.DataFrame(
        {
            'patient_id': np.asarray(self.patient_ids, dtype=object)[p],
            'roi': np.asarray(openkbp.ROI_NAMES, dtype=object)[r],
            'metric': np.asarray(METRIC_NAMES, dtype=object)[m],
            'reference': reference,
            'prediction': prediction,
            'abs_error': np.abs(reference - prediction),
        }
    )

  def summary(self) -> dict[str, Any]:
    """JSON-ready: the two scores (dose first), the counts, per-patient errors."""
    return {
        'dose_score': self.dose_score,
        'dvh_score': self.dvh_score,
        'num_patients': self.num_patients,
        'num_dvh_metrics': self.num_dvh_metrics,
        'dose_errors': dict(
            zip(self.patient_ids, map(float, self.dose_errors))
        ),
    }


class Evaluator:
  """Accumulates (reference, prediction) pairs one patient at a time.

  Usage:
    evaluator = Evaluator()
    for patient, prediction in pairs:   # patient: Patient or Reference
      evaluator.add(patient, prediction)
    result = evaluator.result()         # result.dose_score, result.dvh_score

  Only the small per-patient numbers are kept, never the volumes. A
  `Reference` built once (`Reference.from_patient`) and kept, e.g. for the
  validation patients during training, scores later predictions of that
  patient several times faster than passing the Patient again.
  """

  def __init__(self):
    self._patient_ids: list[str] = []
    self._seen: set[str] = set()
    self._dose_errors: list[float] = []
    self._reference_metrics: list[np.ndarray] = []
    self._predicted_metrics: list[np.ndarray] = []

  def __len__(self) -> int:
    return len(self._patient_ids)

  def add(self, reference: Any, prediction: np.ndarray) -> float:
    """Scores one patient; returns its dose error (Gy per mask voxel).

    Args:
      reference: a `Reference`, or a `SparsePatient` (fastest) or `Patient`
        with its dose loaded.
      prediction: (D, H, W) Gy on the reference's grid.
    """
    if reference.patient_id in self._seen:
      raise ValueError(f'patient {reference.patient_id} was added twice')
    if isinstance(reference, openkbp.SparsePatient):
      reference = Reference.from_sparse(reference)
    elif not isinstance(reference, Reference):
      reference = Reference.from_patient(reference)
    error, metrics = reference.score(prediction)
    self._patient_ids.append(reference.patient_id)
    self._seen.add(reference.patient_id)
    self._dose_errors.append(error)
    self._reference_metrics.append(reference.metrics)
    self._predicted_metrics.append(metrics)
    return error

  def _stacked(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(reference (P, 10, 5), predicted (P, 10, 5), |errors| of the existing
    metrics (M,))."""
    reference = np.stack(self._reference_metrics)
    predicted = np.stack(self._predicted_metrics)
    return (
        reference,
        predicted,
        np.abs(reference - predicted)[~np.isnan(reference)],
    )

  def result(self) -> EvaluationResult:
    if not self._patient_ids:
      raise ValueError('no patients were added to the Evaluator')
    reference, predicted, abs_errors = self._stacked()
    return EvaluationResult(
        dose_score=float(np.mean(self._dose_errors)),
        dvh_score=float(abs_errors.mean()) if abs_errors.size else float('nan'),
        patient_ids=tuple(self._patient_ids),
        dose_errors=np.array(self._dose_errors),
        reference_metrics=reference,
        predicted_metrics=predicted,
    )

  def partial_sums(self) -> np.ndarray:
    """float64 (4,): sum of dose errors, patients, sum of |DVH metric
    errors|, DVH metrics. Additive, so processes that each score a share of
    the patients can sum theirs (an all-reduce) and call `scores_from_sums`.
    """
    if not self._patient_ids:
      return np.zeros(4)
    abs_errors = self._stacked()[2]
    return np.array(
        [
            np.sum(self._dose_errors),
            len(self._patient_ids),
            abs_errors.sum(),
            abs_errors.size,
        ],
        np.float64,
    )


def scores_from_sums(sums: Sequence[float]) -> dict[str, float]:
  """The scores from (summed) `Evaluator.partial_sums()`.

  Returns:
    {'dose_score', 'dvh_score' (Gy; NaN where nothing was scored),
     'num_patients', 'num_dvh_metrics'}.
  """
  dose_sum, num_patients, dvh_sum, num_metrics = map(float, sums)
  return {
      'dose_score': dose_sum / num_patients if num_patients else float('nan'),
      'dvh_score': dvh_sum / num_metrics if num_metrics else float('nan'),
      'num_patients': int(num_patients),
      'num_dvh_metrics': int(num_metrics),
  }
