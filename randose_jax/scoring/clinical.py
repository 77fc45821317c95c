r"""Clinical dose metrics and the gamma index: what a physicist checks.

The OpenKBP dose and DVH scores (`evaluation.py`) rank models. This module
reports, per patient and ROI, the numbers a physicist reads before using a
plan: target coverage and hot spots, homogeneity, conformity, organ doses,
and the gamma pass rate of the predicted dose against the reference.

Definitions (dose in Gy; an ROI's doses are its voxels' doses, every voxel
of a patient having the same volume v = prod(voxel_dimensions) mm^3):

- D99, D98, D95, D50, D2, D1 (PTVs; Gy): D_x, the minimum dose of the
  hottest x% of the ROI volume.
- D0.1cc (PTVs, OARs), D2cc (OARs) (Gy): the minimum dose of the hottest
  0.1 cm^3, 2 cm^3.
- Dmean (OARs; Gy): the mean of the ROI's voxel doses.
- V{d}Gy (OARs; default d = 20, 30, 40, 50; unit "% of ROI volume"): the
  volume receiving >= d Gy, in percent of the ROI volume.
- HI (PTVs; ratio): ICRU 83 homogeneity index (D2 - D98) / D50.
- CI_RTOG (PTVs; ratio): RTOG conformity index PIV / TV.
- CI_Paddick (PTVs; ratio): Paddick conformity index TV_PIV^2 / (TV x PIV).
- gamma_3%/3mm, gamma_2%/2mm (roi "possible_dose_mask"; unit "% of
  evaluated voxels"): the global gamma pass rate.

Sources: ICRU Report 83 (2010) (D_x, D50, HI); Shaw et al., "Radiation
Therapy Oncology Group: radiosurgery quality assurance guidelines", IJROBP
27 (1993) 1231-1239 (the RTOG CI); Paddick, "A simple scoring ratio to
index the conformity of radiosurgical treatment plans", J Neurosurg 93
suppl 3 (2000) 219-222 (the Paddick CI); Low et al., "A technique for the
quantitative evaluation of dose distributions", Med Phys 25 (1998) 656-661
(gamma).

The discrete conventions, chosen to equal the OpenKBP scoring's
(`evaluation.py`, docs/design.md section 6):

- D_x% = `np.percentile(doses, 100 - x)` with numpy's default linear
  interpolation between the sorted voxel doses (position
  (100 - x) / 100 * (N - 1) in ascending order, N voxels). So D99, D95 and
  D1 here are exactly the DVH score's D_99, D_95 and D_1.
- D_Vcc = the percentile 100 - n / N * 100 (linear, as above) with
  n = max(1, round(V * 1000 / v)), the number of voxels in V cm^3; clipped at
  percentile 0 when the ROI is smaller than V cm^3 (then D_Vcc is the ROI's
  minimum dose: the whole ROI lies within the hottest V cm^3). D0.1cc here is
  exactly the DVH score's D_0.1_cc of an OAR, which clips the same way.
- V_d = 100 * (voxels with dose >= d) / N.
- Dmean = the mean of the voxel doses (equal voxel volumes).

Conformity at the PTV's prescription Rx (PTV56: 56 Gy, PTV63: 63, PTV70:
70; `openkbp.PRESCRIPTIONS_GY`):

- PIV, the prescription isodose volume: the voxels with dose >= Rx inside
  the possible-dose mask (OpenKBP has no body contour; the mask is where a
  dose may be, and both the reference and a decoded prediction are zero off
  it).
- TV, the target volume: the union of the PTVs whose prescription is >= Rx
  (PTV56: PTV56 + PTV63 + PTV70; PTV70: PTV70 alone). OpenKBP's PTVs are
  disjoint (PTV56 excludes the PTV70 region, which is planned to 70 Gy), so
  the PTV alone would count the higher-dose targets inside the 56 Gy
  isodose as spill and make PTV56's CI meaningless; with one target, or
  for the highest one, TV is the PTV itself.
- TV_PIV: the TV voxels inside the PIV. RTOG CI = PIV / TV (1 when the
  isodose matches the target's volume); Paddick CI = TV_PIV^2 / (TV x PIV),
  1 only when the isodose and the target coincide; NaN when PIV is empty.
- HI is NaN when D50 = 0.

Every metric is computed for the reference and the prediction by the same
code; `difference` = predicted - reference.

Gamma (`gamma_maps`, `gamma_pass_rates`; `gamma_map`, `gamma_pass_rate`
for one criterion): global gamma of the prediction (evaluated dose) against
the reference, computed (`gamma_impl`) by `randose_jax.scoring.gamma` (JAX, the
default: pymedphys's search vectorised, the same values up to float32
rounding, well under a second per 128^3 patient for both criteria on 2 CPU
cores; benchmarks/NOTES.md, "Gamma in JAX") or by `pymedphys.gamma` itself
(`"pymedphys"`, the independent reference; install the `clinical` extra:
`pip install 'randose_jax[clinical]'`) with scipy's linear interpolation of
the evaluated dose (`interp_algo='scipy'`; pymedphys's own interpolator
needs numba) at DTA / 10 steps (pymedphys's default `interp_fraction=10`).
Coordinates: array axis i at i * voxel_dimensions[i] mm (axis 0 anterior
-> posterior, 1 right -> left, 2 superior -> inferior, `conventions.py`), so
anisotropic voxels are handled. The dose criterion is a percent of the global normalisation, the
reference's maximum inside the possible-dose mask. The reference points
evaluated are the possible-dose-mask voxels whose reference dose is >= 10%
of that maximum (the low-dose threshold); the pass rate is the percent of
them with gamma < 1 (a point without a finite gamma fails). With
`subsample` < 1 a fixed-seed random fraction of those points is evaluated
(what pymedphys's `random_subset` does, but reproducible); the pass rate is
then an estimate (benchmarks/NOTES.md: time against pass rate).
`gamma_pass_rates` stops each point's search once it passes or once gamma
reaches 1 (`skip_once_passed=True`, `max_gamma=1`), which leaves the pass /
fail of every point exact and saves most of the time; `gamma_maps` gives
the values themselves (up to `max_gamma`).
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import numpy as np

from randose_jax.scoring import dose_dvh as evaluation
from randose_jax import fileio
from randose_jax.conventions import OAR_NAMES, ROI_NAMES, TARGET_NAMES
from randose_jax.data import openkbp

if TYPE_CHECKING:  # imported where used: `evaluate` imports this module
  import pandas as pd

# D_x% of the targets: (metric name, x).
TARGET_DX = (
    ("D99", 99.0),
    ("D98", 98.0),
    ("D95", 95.0),
    ("D50", 50.0),
    ("D2", 2.0),
    ("D1", 1.0),
)
DEFAULT_V_DOSES_GY = (20.0, 30.0, 40.0, 50.0)
# (dose criterion %, distance to agreement mm), global gamma.
GAMMA_CRITERIA = ((3.0, 3.0), (2.0, 2.0))
GAMMA_CUTOFF_PERCENT = 10.0
GAMMA_ROI = "possible_dose_mask"
# Who computes the gamma index: randose_jax.scoring.gamma, or pymedphys itself.
GAMMA_IMPLS = ("jax", "pymedphys")

UNIT_GY = "Gy"
UNIT_VOLUME_PERCENT = "% of ROI volume"
UNIT_RATIO = "ratio"
UNIT_GAMMA = "% of evaluated voxels"

METRICS_FILE = "clinical_metrics.csv"
SUMMARY_FILE = "clinical_summary.csv"
METRIC_COLUMNS = (
    "patient",
    "roi",
    "metric",
    "unit",
    "reference",
    "predicted",
    "difference",
)
SUMMARY_COLUMNS = (
    "roi",
    "metric",
    "unit",
    "n",
    "mean_reference",
    "mean_predicted",
    "mean_difference",
    "sd_difference",
    "mean_abs_difference",
    "sd_abs_difference",
    "worst_patient",
    "worst_difference",
)


def v_metric_name(dose_gy: float) -> str:
  """'V20Gy' for 20.0, 'V47.5Gy' for 47.5."""
  return f"V{dose_gy:g}Gy"


def gamma_metric_name(dose_percent: float, distance_mm: float) -> str:
  """'gamma_3%/3mm' for (3, 3)."""
  return f"gamma_{dose_percent:g}%/{distance_mm:g}mm"


def voxels_in(volume_cc: float, voxel_dimensions: Sequence[float]) -> int:
  """n = max(1, round(V * 1000 / voxel volume mm^3)): the voxels in V cm^3
  (`evaluation.voxels_per_tenth_cc` for V = 0.1)."""
  voxel_volume = float(np.prod(np.asarray(voxel_dimensions, np.float64)))
  return max(1, round(volume_cc * 1000 / voxel_volume))


def dose_at_volume_percent(doses: np.ndarray, percents) -> np.ndarray:
  """D_x% for each x of `percents`: np.percentile(doses, 100 - x), linear."""
  percents = np.asarray(percents, np.float64)
  return np.percentile(np.asarray(doses, np.float64), 100.0 - percents)


def dose_at_volume_cc(
    doses: np.ndarray, volumes_cc, voxel_dimensions: Sequence[float]
) -> np.ndarray:
  """D_Vcc for each V of `volumes_cc`: the percentile 100 - n / N * 100
  (clipped at 0), n = `voxels_in(V)`, N = doses.size."""
  doses = np.asarray(doses, np.float64)
  q = [
      max(0.0, 100.0 - voxels_in(v, voxel_dimensions) / doses.size * 100.0)
      for v in np.atleast_1d(volumes_cc)
  ]
  return np.percentile(doses, q)


def volume_percent_at_dose(doses: np.ndarray, doses_gy) -> np.ndarray:
  """V_d for each d of `doses_gy`: percent of the voxels with dose >= d."""
  doses = np.asarray(doses, np.float64)
  return np.array(
      [
          100.0 * np.count_nonzero(doses >= d) / doses.size
          for d in np.atleast_1d(doses_gy)
      ]
  )


def homogeneity_index(d2: float, d98: float, d50: float) -> float:
  """ICRU 83: (D2 - D98) / D50 (NaN if D50 = 0)."""
  return (d2 - d98) / d50 if d50 > 0 else math.nan


def conformity(
    dose: np.ndarray,
    target: np.ndarray,
    body: np.ndarray,
    prescription_gy: float,
) -> tuple[float, float]:
  """(RTOG CI, Paddick CI) of a dose for a target at its prescription.

  Args:
    dose: (D, H, W) Gy.
    target: bool (D, H, W), the target volume TV.
    body: bool (D, H, W), where the prescription isodose volume is counted
      (the possible-dose mask).
    prescription_gy: Rx.

  Returns:
    RTOG = PIV / TV, Paddick = TV_PIV^2 / (TV x PIV), with PIV = body voxels
    with dose >= Rx; NaN for both when TV is empty, Paddick NaN when PIV is.
  """
  piv_mask = body & (dose >= prescription_gy)
  tv = np.count_nonzero(target)
  piv = np.count_nonzero(piv_mask)
  tv_piv = np.count_nonzero(target & piv_mask)
  if tv == 0:
    return math.nan, math.nan
  paddick = tv_piv * tv_piv / (tv * piv) if piv else math.nan
  return piv / tv, paddick


@dataclasses.dataclass(frozen=True)
class Metric:
  """One metric of one ROI of one dose."""

  roi: str
  metric: str
  unit: str
  value: float


def target_volume(
    structure_masks: np.ndarray, roi_present: Sequence[bool], roi: str
) -> np.ndarray:
  """bool (D, H, W): the union of the present PTVs whose prescription is >=
  that of `roi` (see the module docstring: the TV of the conformity)."""
  rx = openkbp.PRESCRIPTIONS_GY[roi]
  union = np.zeros(structure_masks.shape[:-1], bool)
  for name in TARGET_NAMES:
    r = ROI_NAMES.index(name)
    if roi_present[r] and openkbp.PRESCRIPTIONS_GY[name] >= rx:
      union |= structure_masks[..., r]
  return union


def dose_metrics(
    dose: np.ndarray,
    structure_masks: np.ndarray,
    roi_present: Sequence[bool] | None,
    voxel_dimensions: Sequence[float],
    possible_dose_mask: np.ndarray,
    *,
    v_doses_gy: Sequence[float] = DEFAULT_V_DOSES_GY,
) -> list[Metric]:
  """The clinical metrics of one dose distribution (module docstring).

  Args:
    dose: (D, H, W) Gy.
    structure_masks: bool (D, H, W, 10), `ROI_NAMES` order.
    roi_present: bool (10,), or None for "every ROI with voxels".
    voxel_dimensions: (3,) mm.
    possible_dose_mask: bool (D, H, W), where the PIV is counted.
    v_doses_gy: the doses d of the OARs' V_d.

  Returns:
    Metrics of the present, non-empty ROIs, in `ROI_NAMES` order: each PTV's
    D99 D98 D95 D50 D2 D1 D0.1cc HI CI_RTOG CI_Paddick, each OAR's Dmean
    D0.1cc D2cc V{d}Gy.
  """
  dose = np.asarray(dose)
  if dose.shape != structure_masks.shape[:-1]:
    raise ValueError(
        f"dose has shape {dose.shape}, expected "
        f"{structure_masks.shape[:-1]}"
    )
  if roi_present is None:
    roi_present = structure_masks.reshape(-1, len(ROI_NAMES)).any(axis=0)
  indices = evaluation.roi_voxel_indices(structure_masks, roi_present)
  flat = np.ascontiguousarray(dose).reshape(-1)
  body = np.asarray(possible_dose_mask, bool)
  metrics = []
  for r, roi in enumerate(ROI_NAMES):
    if indices[r].size == 0:
      continue
    doses = flat[indices[r]].astype(np.float64)
    add = lambda name, unit, value: metrics.append(
        Metric(roi, name, unit, float(value))
    )
    if roi in OAR_NAMES:
      add("Dmean", UNIT_GY, doses.mean())
      d01, d2cc = dose_at_volume_cc(doses, (0.1, 2.0), voxel_dimensions)
      add("D0.1cc", UNIT_GY, d01)
      add("D2cc", UNIT_GY, d2cc)
      for d, v in zip(v_doses_gy, volume_percent_at_dose(doses, v_doses_gy)):
        add(v_metric_name(d), UNIT_VOLUME_PERCENT, v)
    else:
      dx = dict(
          zip(
              (n for n, _ in TARGET_DX),
              dose_at_volume_percent(doses, [x for _, x in TARGET_DX]),
          )
      )
      for name, value in dx.items():
        add(name, UNIT_GY, value)
      add("D0.1cc", UNIT_GY, dose_at_volume_cc(doses, 0.1, voxel_dimensions)[0])
      add("HI", UNIT_RATIO, homogeneity_index(dx["D2"], dx["D98"], dx["D50"]))
      rtog, paddick = conformity(
          dose,
          target_volume(structure_masks, roi_present, roi),
          body,
          openkbp.PRESCRIPTIONS_GY[roi],
      )
      add("CI_RTOG", UNIT_RATIO, rtog)
      add("CI_Paddick", UNIT_RATIO, paddick)
  return metrics


# ------------------------------------------------------------ gamma


def gamma_available(gamma_impl: str = "pymedphys") -> bool:
  """Whether `gamma_impl` can run: always for "jax"; for "pymedphys",
  whether pymedphys (the `clinical` extra) can be imported."""
  _check_impl(gamma_impl)
  if gamma_impl == "jax":
    return True
  try:
    # pylint: disable-next=g-import-not-at-top,unused-import
    import pymedphys  # noqa: F401
  except ImportError:
    return False
  return True


def _check_impl(gamma_impl: str):
  if gamma_impl not in GAMMA_IMPLS:
    raise ValueError(
        f"gamma_impl must be one of {', '.join(GAMMA_IMPLS)}, got "
        f"{gamma_impl!r}"
    )


def _pymedphys_gamma():
  try:
    import pymedphys  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ImportError(
        "the gamma index needs pymedphys: pip install 'randose_jax[clinical]' "
        f"(or pymedphys) ({e})"
    ) from e
  return pymedphys.gamma


def gamma_points(
    reference: np.ndarray,
    mask: np.ndarray,
    *,
    cutoff_percent: float = GAMMA_CUTOFF_PERCENT,
    subsample: float = 1.0,
    seed: int = 0,
) -> tuple[np.ndarray, float]:
  """The reference points gamma evaluates, and the global normalisation.

  Returns:
    (bool (D, H, W): the mask voxels whose reference dose is >= cutoff_percent
    of the normalisation, a fixed-seed random `subsample` fraction of them
    when < 1 (at least one); the normalisation, the reference's maximum in
    the mask, Gy).
  """
  reference = np.asarray(reference, np.float64)
  mask = np.asarray(mask, bool)
  if reference.shape != mask.shape:
    raise ValueError(f"mask has shape {mask.shape}, expected {reference.shape}")
  if not 0 < subsample <= 1:
    raise ValueError(f"subsample must be in (0, 1], got {subsample!r}")
  if not mask.any():
    raise ValueError("the possible-dose mask is empty")
  normalisation = float(reference[mask].max())
  if normalisation <= 0:
    raise ValueError(
        "the reference dose is 0 everywhere in the mask: no "
        "gamma normalisation"
    )
  points = mask & (reference >= cutoff_percent / 100 * normalisation)
  if subsample < 1:
    chosen = np.flatnonzero(points)
    keep = max(1, round(subsample * chosen.size))
    keep = np.random.default_rng(seed).choice(chosen, keep, replace=False)
    points = np.zeros(points.size, bool)
    points[keep] = True
    points = points.reshape(mask.shape)
  return points, normalisation


def gamma_maps(
    reference: np.ndarray,
    evaluated: np.ndarray,
    voxel_dimensions: Sequence[float],
    mask: np.ndarray,
    criteria: Sequence[tuple[float, float]],
    *,
    cutoff_percent: float = GAMMA_CUTOFF_PERCENT,
    subsample: float = 1.0,
    seed: int = 0,
    max_gamma: float | None = 2.0,
    stop_at_pass: bool = False,
    region: np.ndarray | None = None,
    gamma_impl: str = "jax",
) -> list[np.ndarray]:
  """Global gamma of `evaluated` against `reference` (module docstring), one
  map per criterion (JAX: one call for all of them).

  Args:
    reference, evaluated: (D, H, W) Gy on the same grid.
    voxel_dimensions: (3,) mm along axes 0, 1, 2.
    mask: bool (D, H, W), the possible-dose mask.
    criteria: ((dose %, distance mm), ...), e.g. `GAMMA_CRITERIA`.
    cutoff_percent: the low-dose threshold, % of the normalisation.
    subsample, seed: see `gamma_points`.
    max_gamma: the search stops at this gamma; larger values read as it
      (None: no limit, slow where the doses differ much).
    stop_at_pass: stop each point's search once gamma < 1 (its value is then
      only known to be < 1; pass / fail stays exact).
    region: bool (D, H, W) or None: only the points inside it are evaluated
      (e.g. the planes a figure shows, `viz.view_planes`); the normalisation
      and the low-dose threshold stay those of the whole mask.
    gamma_impl: "jax" (`randose_jax.scoring.gamma`) or "pymedphys"; the same values
      up to float32 rounding, except below 1 with `stop_at_pass` (where
      each stops its search differs).

  Returns:
    float64 (D, H, W) per criterion: gamma at the evaluated points, NaN
    elsewhere (and at a point where no finite gamma was found).
  """
  _check_impl(gamma_impl)
  reference = np.asarray(reference, np.float64)
  evaluated = np.asarray(evaluated, np.float64)
  if evaluated.shape != reference.shape:
    raise ValueError(
        f"evaluated dose has shape {evaluated.shape}, expected "
        f"{reference.shape}"
    )
  spacing = np.asarray(voxel_dimensions, np.float64)
  if spacing.shape != (reference.ndim,) or not np.all(spacing > 0):
    raise ValueError(
        f"voxel_dimensions must be {reference.ndim} positive mm "
        f"values, got {voxel_dimensions!r}"
    )
  points, normalisation = gamma_points(
      reference,
      mask,
      cutoff_percent=cutoff_percent,
      subsample=subsample,
      seed=seed,
  )
  if region is not None:
    region = np.asarray(region, bool)
    if region.shape != reference.shape:
      raise ValueError(
          f"region has shape {region.shape}, expected {reference.shape}"
      )
    points &= region
  if not points.any():
    return [np.full(reference.shape, np.nan) for _ in criteria]
  if gamma_impl == "jax":
    from randose_jax.scoring import gamma  # pylint: disable=g-import-not-at-top

    return gamma.gamma_index(
        reference,
        evaluated,
        spacing,
        points,
        normalisation,
        criteria,
        max_gamma=max_gamma,
        stop_at_pass=stop_at_pass,
    )
  axes = tuple(np.arange(n) * s for n, s in zip(reference.shape, spacing))
  maps = []
  for dose_percent, distance_mm in criteria:
    # pymedphys evaluates the reference points >= its cutoff: NaN (never >=)
    # marks the others. The evaluated dose is interpolated on the whole grid.
    gamma = _pymedphys_gamma()(
        axes,
        np.where(points, reference, np.nan),
        axes,
        evaluated,
        dose_percent,
        distance_mm,
        lower_percent_dose_cutoff=cutoff_percent,
        global_normalisation=normalisation,
        max_gamma=max_gamma,
        skip_once_passed=stop_at_pass,
        interp_algo="scipy",
        ram_available=2**29,
    )
    maps.append(np.where(points, gamma, np.nan))
  return maps


def gamma_map(
    reference: np.ndarray,
    evaluated: np.ndarray,
    voxel_dimensions: Sequence[float],
    mask: np.ndarray,
    dose_percent: float,
    distance_mm: float,
    **kwargs: Any,
) -> np.ndarray:
  """`gamma_maps` of one criterion (dose %, distance mm), e.g. 3, 3."""
  doses = (reference, evaluated, voxel_dimensions, mask)
  return gamma_maps(*doses, [(dose_percent, distance_mm)], **kwargs)[0]


def gamma_pass_rates(
    reference: np.ndarray,
    evaluated: np.ndarray,
    voxel_dimensions: Sequence[float],
    mask: np.ndarray,
    criteria: Sequence[tuple[float, float]] = GAMMA_CRITERIA,
    *,
    cutoff_percent: float = GAMMA_CUTOFF_PERCENT,
    subsample: float = 1.0,
    seed: int = 0,
    gamma_impl: str = "jax",
) -> list[tuple[float, int]]:
  """Per criterion (pass rate in % of the evaluated points, number of
  evaluated points).

  A point passes when gamma < 1; the search stops at pass or at gamma 1,
  which decides every point exactly (args as in `gamma_maps`).
  """
  maps = gamma_maps(
      reference,
      evaluated,
      voxel_dimensions,
      mask,
      criteria,
      cutoff_percent=cutoff_percent,
      subsample=subsample,
      seed=seed,
      max_gamma=1.0,
      stop_at_pass=True,
      gamma_impl=gamma_impl,
  )
  points = gamma_points(
      reference,
      mask,
      cutoff_percent=cutoff_percent,
      subsample=subsample,
      seed=seed,
  )[0]
  n = int(np.count_nonzero(points))
  if n == 0:
    return [(math.nan, 0) for _ in criteria]
  # NaN fails
  return [(100.0 * np.count_nonzero(g[points] < 1) / n, n) for g in maps]


def gamma_pass_rate(
    reference: np.ndarray,
    evaluated: np.ndarray,
    voxel_dimensions: Sequence[float],
    mask: np.ndarray,
    dose_percent: float,
    distance_mm: float,
    **kwargs: Any,
) -> tuple[float, int]:
  """`gamma_pass_rates` of one criterion (dose %, distance mm)."""
  doses = (reference, evaluated, voxel_dimensions, mask)
  return gamma_pass_rates(*doses, [(dose_percent, distance_mm)], **kwargs)[0]


# ------------------------------------------------------------ patients


@dataclasses.dataclass(frozen=True)
class ClinicalSettings:
  """What `ClinicalEvaluator` computes.

  Attributes:
    v_doses_gy: the doses d of the OARs' V_d (Gy).
    gamma: whether to compute the gamma pass rates.
    gamma_criteria: ((dose %, distance mm), ...), global gamma.
    gamma_subsample: fraction in (0, 1] of the gamma points evaluated.
    gamma_seed: seed of that fraction's draw.
    gamma_impl: who computes gamma, one of `GAMMA_IMPLS` ("pymedphys" needs
      pymedphys).
  """

  v_doses_gy: tuple[float, ...] = DEFAULT_V_DOSES_GY
  gamma: bool = True
  gamma_criteria: tuple[tuple[float, float], ...] = GAMMA_CRITERIA
  gamma_subsample: float = 1.0
  gamma_seed: int = 0
  gamma_impl: str = "jax"

  def __post_init__(self):
    _check_impl(self.gamma_impl)
    if any(not math.isfinite(d) or d < 0 for d in self.v_doses_gy):
      raise ValueError(
          f"V doses must be finite and >= 0 Gy, got {self.v_doses_gy!r}"
      )
    if not 0 < self.gamma_subsample <= 1:
      raise ValueError(
          f"gamma subsample must be in (0, 1], got {self.gamma_subsample!r}"
      )


def compare_patient(
    patient: openkbp.Patient,
    prediction: np.ndarray,
    settings: ClinicalSettings = ClinicalSettings(),
) -> pd.DataFrame:
  """The clinical metrics of a patient's reference dose and a prediction.

  Args:
    patient: with its reference dose (Gy) loaded.
    prediction: (D, H, W) Gy on the patient's grid.
    settings: what to compute.

  Returns:
    A tidy table, columns `METRIC_COLUMNS` (difference = predicted -
    reference); gamma rows have roi `GAMMA_ROI`, reference 100 (the
    reference against itself) and predicted = the pass rate.
  """
  if patient.dose is None:
    raise ValueError(f"reference patient {patient.patient_id} has no dose")
  prediction = np.asarray(prediction)
  if prediction.shape != patient.dose.shape:
    raise ValueError(
        f"prediction of {patient.patient_id} has shape "
        f"{prediction.shape}, expected {patient.dose.shape}"
    )
  args = (
      patient.structure_masks,
      patient.roi_present,
      patient.voxel_dimensions,
      patient.possible_dose_mask,
  )
  reference = dose_metrics(patient.dose, *args, v_doses_gy=settings.v_doses_gy)
  predicted = dose_metrics(prediction, *args, v_doses_gy=settings.v_doses_gy)
  rows = [
      (patient.patient_id, r.roi, r.metric, r.unit, r.value, p.value)
      for r, p in zip(reference, predicted)
  ]
  if settings.gamma:
    rates = gamma_pass_rates(
        patient.dose,
        prediction,
        patient.voxel_dimensions,
        patient.possible_dose_mask,
        settings.gamma_criteria,
        subsample=settings.gamma_subsample,
        seed=settings.gamma_seed,
        gamma_impl=settings.gamma_impl,
    )
    for (dose_percent, distance_mm), (rate, _) in zip(
        settings.gamma_criteria, rates
    ):
      rows.append(
          (
              patient.patient_id,
              GAMMA_ROI,
              gamma_metric_name(dose_percent, distance_mm),
              UNIT_GAMMA,
              100.0,
              rate,
          )
      )
  import pandas as pd  # pylint: disable=g-import-not-at-top

  table = pd.DataFrame(rows, columns=METRIC_COLUMNS[:-1])
  table["difference"] = table["predicted"] - table["reference"]
  return table


def summarize(table: pd.DataFrame) -> pd.DataFrame:
  """The cohort summary of a `compare_patient` table (several patients).

  One row per (roi, metric), ROIs in `ROI_NAMES` order then the gamma rows,
  metrics in the order they first appear: n (patients
  whose difference is finite), the means of the reference and the
  prediction, mean and SD (ddof 1; NaN for n < 2) of the difference and of
  its absolute value, and the worst patient (the largest |difference|) with
  its difference.
  """
  rows = []
  order = {roi: i for i, roi in enumerate(ROI_NAMES + (GAMMA_ROI,))}
  keys = sorted(
      table[["roi", "metric", "unit"]]
      .drop_duplicates()
      .itertuples(index=False),
      key=lambda key: order.get(key[0], len(order)),
  )  # stable: metric order
  for roi, metric, unit in keys:
    part = table[(table["roi"] == roi) & (table["metric"] == metric)]
    part = part[np.isfinite(part["difference"].to_numpy(np.float64))]
    n = len(part)
    diff = part["difference"].to_numpy(np.float64)
    absdiff = np.abs(diff)
    sd = lambda x: float(np.std(x, ddof=1)) if x.size > 1 else math.nan
    mean = lambda x: float(np.mean(x)) if x.size else math.nan
    worst = int(np.argmax(absdiff)) if n else None
    rows.append(
        (
            roi,
            metric,
            unit,
            n,
            mean(part["reference"].to_numpy(np.float64)),
            mean(part["predicted"].to_numpy(np.float64)),
            mean(diff),
            sd(diff),
            mean(absdiff),
            sd(absdiff),
            part["patient"].iloc[worst] if n else "",
            float(diff[worst]) if n else math.nan,
        )
    )
  import pandas as pd  # pylint: disable=g-import-not-at-top

  return pd.DataFrame(rows, columns=SUMMARY_COLUMNS)


class ClinicalEvaluator:
  """Accumulates `compare_patient` tables one patient at a time.

  clinical = ClinicalEvaluator(ClinicalSettings(gamma=False))
  for patient, prediction in pairs:
    clinical.add(patient, prediction)
  clinical.write(folder)   # clinical_metrics.csv, clinical_summary.csv

  A `cohort.Scorer`: `add` per patient, `result()` the metrics table.
  """

  def __init__(self, settings: ClinicalSettings = ClinicalSettings()):
    self.settings = settings
    self._tables: list[pd.DataFrame] = []

  @property
  def name(self) -> str:
    """What the progress line says while a patient is at this step."""
    return "clinical metrics" + (", gamma" if self.settings.gamma else "")

  def result(self) -> pd.DataFrame:
    return self.table()

  def add(
      self, patient: openkbp.Patient, prediction: np.ndarray
  ) -> pd.DataFrame:
    table = compare_patient(patient, prediction, self.settings)
    self._tables.append(table)
    return table

  def table(self) -> pd.DataFrame:
    if not self._tables:
      import pandas as pd  # pylint: disable=g-import-not-at-top

      return pd.DataFrame(columns=METRIC_COLUMNS)
    import pandas as pd  # pylint: disable=g-import-not-at-top

    return pd.concat(self._tables, ignore_index=True)

  def summary(self) -> pd.DataFrame:
    return summarize(self.table())

  def write(self, folder, *, paths: Iterable[Any] | None = None) -> None:
    """Writes `METRICS_FILE` and `SUMMARY_FILE` into `folder`, each
    atomically (replacing earlier ones); `paths`, if given, are the two
    paths to write instead (e.g. staged ones)."""
    folder = Path(folder)
    targets = (
        list(paths)
        if paths is not None
        else [folder / METRICS_FILE, folder / SUMMARY_FILE]
    )
    for frame, path in zip((self.table(), self.summary()), targets):
      with fileio.atomic_output(path, overwrite=True) as f:
        f.write(frame.to_csv(index=False).encode())
