r"""The HTML report a physicist reads: `evaluate --report=FILE.html`.

One self-contained HTML file (CSS inline, every image a PNG embedded as a
`data:` URI, no script, nothing fetched from a network), in this order:

1. a header: the folders compared, the date, the settings and the tolerances;
2. the OpenKBP dose and DVH scores;
3. the cohort summary: per ROI and clinical metric (`clinical.summarize`),
   the means of the reference and the prediction, the mean difference and
   its SD, the mean absolute difference, how many patients are out of
   tolerance and the worst patient (a link to its section);
4. the patients at a glance: dose error, gamma pass rates and the number of
   metrics out of tolerance, each patient a link to its section;
5. one section per patient (`id` = the patient id): its metrics table
   (reference, prediction, difference; rows out of tolerance highlighted and
   marked "out"), the DVH overlay (reference solid, prediction dashed), the
   dose slices (prediction, reference, difference) and the gamma map on the
   same three planes;
6. the definitions of the metrics and of the tolerance rules.

Tolerances (`Tolerances`) are review thresholds that decide what is
highlighted; they are not a clinical standard, and every one can be set
(`evaluate --report_tolerance_gy` etc.). A row is out of tolerance when

- a dose metric (unit Gy: D_x, D_cc, Dmean) differs by more than
  `dose_gy` (default 2.1 Gy, 3% of the 70 Gy prescription);
- a volume metric (V_d, % of the ROI volume) differs by more than
  `volume_percent` percentage points (default 5);
- a ratio (HI, CI_RTOG, CI_Paddick) differs by more than `ratio`
  (default 0.1);
- a gamma pass rate is below its limit (default 95% at 3%/3mm, 90% at
  2%/2mm: AAPM TG-218's tolerance and action limits, which TG-218 states
  for 3%/2mm).

A NaN metric (e.g. a conformity index with no prescription isodose) is never
out of tolerance; it reads "n/a".

The gamma map is computed (`clinical.gamma_map`, by the settings'
`gamma_impl`) only on the three planes the figure shows
(`viz.view_planes`): the first gamma criterion of the settings, values up
to `viz.GAMMA_MAX`, with the normalisation and low-dose threshold of the
whole patient. It takes a fraction of the pass rates' time.

  builder = ReportBuilder(clinical.ClinicalSettings())
  for patient, prediction in pairs:
    builder.add(patient, prediction)
  builder.write("report.html", scores=evaluation_result)
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import html
import io
import math
import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from randose_jax.scoring import clinical
from randose_jax.scoring import dose_dvh as evaluation
from randose_jax import fileio

if TYPE_CHECKING:
  import pandas as pd

  from randose_jax.data import openkbp

GAMMA_LIMITS = (("3%/3mm", 95.0), ("2%/2mm", 90.0))
OUT_MARK = "out"
# The definitions' words for who computed gamma (`clinical.GAMMA_IMPLS`).
_GAMMA_BY = {"jax": "randose_jax.scoring.gamma, JAX", "pymedphys": "pymedphys"}


@dataclasses.dataclass(frozen=True)
class Tolerances:
  """What the report highlights (module docstring).

  Attributes:
    dose_gy: largest |difference| of a Gy metric within tolerance.
    volume_percent: largest |difference| of a V_d, percentage points.
    ratio: largest |difference| of HI, CI_RTOG, CI_Paddick.
    gamma_min_percent: ((criterion, lowest pass rate within tolerance), ...),
      the criterion as in `clinical.gamma_metric_name` without 'gamma_'
      (e.g. '3%/3mm'); a criterion not listed is never out of tolerance.
  """

  dose_gy: float = 2.1
  volume_percent: float = 5.0
  ratio: float = 0.1
  gamma_min_percent: tuple[tuple[str, float], ...] = GAMMA_LIMITS

  def __post_init__(self):
    for name in ("dose_gy", "volume_percent", "ratio"):
      value = getattr(self, name)
      if not math.isfinite(value) or value < 0:
        raise ValueError(f"tolerance {name} must be >= 0, got {value!r}")
    for criterion, limit in self.gamma_min_percent:
      if not 0 <= limit <= 100:
        raise ValueError(
            f"gamma limit of {criterion} must be in [0, 100] %, got {limit!r}"
        )

  def gamma_limit(self, metric: str) -> float | None:
    for criterion, limit in self.gamma_min_percent:
      if metric == f"gamma_{criterion}":
        return limit
    return None

  def is_out(self, unit: str, metric: str, predicted, difference) -> bool:
    """Whether one metric row is out of tolerance (NaN never is)."""
    if unit == clinical.UNIT_GAMMA:
      limit = self.gamma_limit(metric)
      return (
          limit is not None and math.isfinite(predicted) and predicted < limit
      )
    if not math.isfinite(difference):
      return False
    bound = {
        clinical.UNIT_GY: self.dose_gy,
        clinical.UNIT_VOLUME_PERCENT: self.volume_percent,
        clinical.UNIT_RATIO: self.ratio,
    }.get(unit)
    return bound is not None and abs(difference) > bound

  def flags(self, table: pd.DataFrame) -> np.ndarray:
    """bool per row of a `clinical.compare_patient` table."""
    return np.array(
        [
            self.is_out(u, m, float(p), float(d))
            for u, m, p, d in zip(
                table["unit"],
                table["metric"],
                table["predicted"],
                table["difference"],
            )
        ],
        dtype=bool,
    )

  def describe(self) -> list[str]:
    rules = [
        f"dose metrics (Gy): |difference| > {self.dose_gy:g} Gy",
        f"volume metrics (V_d): |difference| > {self.volume_percent:g} "
        "percentage points",
        f"ratios (HI, CI): |difference| > {self.ratio:g}",
    ]
    rules += [
        f"gamma {criterion}: pass rate < {limit:g}%"
        for criterion, limit in self.gamma_min_percent
    ]
    return rules


def parse_gamma_limits(entries: Sequence[str]) -> tuple[tuple[str, float], ...]:
  """['3%/3mm=95', '2%/2mm=90'] -> (('3%/3mm', 95.0), ('2%/2mm', 90.0))."""
  limits = []
  for entry in entries:
    criterion, sep, value = entry.partition("=")
    try:
      limit = float(value) if sep else math.nan
    except ValueError:
      limit = math.nan
    if not criterion.strip() or not 0 <= limit <= 100:
      raise ValueError(
          f"{entry!r} is not CRITERION=PERCENT with a percent in [0, 100] "
          "(e.g. 3%/3mm=95)"
      )
    limits.append((criterion.strip(), limit))
  return tuple(limits)


# ------------------------------------------------------------ formatting


def _format_value(value, unit: str) -> str:
  value = float(value)
  if not math.isfinite(value):
    return "n/a"
  if unit == clinical.UNIT_RATIO:
    return f"{value:.3f}"
  if unit in (clinical.UNIT_VOLUME_PERCENT, clinical.UNIT_GAMMA):
    return f"{value:.1f}"
  return f"{value:.2f}"


def _format_difference(value, unit: str) -> str:
  text = _format_value(value, unit)
  return text if text == "n/a" or float(value) < 0 else "+" + text


def _short_unit(unit: str) -> str:
  return {
      clinical.UNIT_GY: "Gy",
      clinical.UNIT_VOLUME_PERCENT: "%",
      clinical.UNIT_RATIO: "",
      clinical.UNIT_GAMMA: "%",
  }.get(unit, unit)


def _e(text: Any) -> str:
  return html.escape(str(text), quote=True)


def _tr(out_of_tolerance) -> str:
  return f'<tr class="{OUT_MARK}">' if out_of_tolerance else "<tr>"


def _anchor(patient_id: str) -> str:
  return "patient-" + "".join(c if c.isalnum() else "-" for c in patient_id)


def _png_data_uri(figure, dpi: int) -> str:
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", dpi=dpi, facecolor="white")
  return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def _figure_html(kind: str, figure, dpi: int, alt: str, caption: str) -> str:
  """A <figure> of class `kind` holding `figure` as an embedded PNG."""
  uri = _png_data_uri(figure, dpi)
  return (
      f'<figure class="{kind}"><img src="{uri}" alt="{_e(alt)}">'
      f"<figcaption>{_e(caption)}</figcaption></figure>\n"
  )


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
  margin: 1.5em auto; max-width: 1250px; color: #1a1a1a; padding: 0 1em; }
h1 { font-size: 1.6em; margin-bottom: 0.2em; }
h2 { border-bottom: 2px solid #1f4e79; padding-bottom: 0.2em; margin-top: 2em; }
h3 { margin-top: 1.4em; }
table { border-collapse: collapse; font-size: 0.86em; margin: 0.6em 0; }
th, td { border: 1px solid #c8c8c8; padding: 0.2em 0.5em; }
th { background: #e8eef5; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
tr.out td { background: #fde2e1; }
tr.out td.flag { color: #a4000f; font-weight: bold; }
td.flag { text-align: center; }
dl.meta { display: grid; grid-template-columns: max-content 1fr;
  gap: 0.15em 1em; font-size: 0.9em; }
dl.meta dt { font-weight: bold; } dl.meta dd { margin: 0; }
p.scores { font-size: 1.15em; }
figure { margin: 0.8em 0; } figure img { max-width: 100%; height: auto;
  border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #444; }
nav a, td a { color: #1f4e79; }
.note { font-size: 0.85em; color: #444; }
section.patient { page-break-before: always; }
div.side { display: flex; flex-wrap: wrap; gap: 1.5em; align-items: flex-start; }
div.side figure { flex: 1 1 420px; margin-top: 0; }
"""


# ------------------------------------------------------------ the report


@dataclasses.dataclass
class _PatientRow:
  patient_id: str
  dose_error: float
  gamma: dict[str, float]
  num_out: int
  num_metrics: int


class ReportBuilder:
  """Builds the HTML report one patient at a time (module docstring).

  Each patient's section is rendered when it is added and kept in a
  temporary file, so memory holds one patient's figures at a time.
  """

  def __init__(
      self,
      settings: clinical.ClinicalSettings = clinical.ClinicalSettings(),
      tolerances: Tolerances = Tolerances(),
      *,
      dpi: int = 72,
      gamma_map: bool | None = None,
  ):
    """The builder of one report.

    Args:
      settings: the clinical metrics computed when `add` is not given them
        (and the gamma criteria: the map uses the first).
      tolerances: what is highlighted.
      dpi: resolution of the embedded figures.
      gamma_map: draw the gamma map (default: when `settings.gamma`).
    """
    self.settings = settings
    self.tolerances = tolerances
    self.dpi = dpi
    self.gamma_map = settings.gamma if gamma_map is None else gamma_map
    self._sections = tempfile.TemporaryFile()
    self._tables: list[pd.DataFrame] = []
    self._rows: list[_PatientRow] = []

  def close(self) -> None:
    self._sections.close()

  def __enter__(self) -> ReportBuilder:
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def add(
      self,
      patient: openkbp.Patient,
      prediction: np.ndarray,
      metrics: pd.DataFrame | None = None,
  ) -> None:
    """Adds a patient's section.

    Args:
      patient: the reference patient, dense (ct, dose, masks loaded).
      prediction: (D, H, W) Gy on the patient's grid.
      metrics: its `clinical.compare_patient` table, if already computed
        (e.g. by `clinical.ClinicalEvaluator.add`); else computed here.
    """
    from randose_jax import viz  # pylint: disable=g-import-not-at-top

    if patient.dose is None or patient.ct is None:
      raise ValueError(
          f"reference patient {patient.patient_id}: the report needs its "
          "dose and CT"
      )
    prediction = np.asarray(prediction, np.float64)
    if metrics is None:
      metrics = clinical.compare_patient(patient, prediction, self.settings)
    pid = patient.patient_id
    out = self.tolerances.flags(metrics)
    self._tables.append(metrics)
    gamma_rates = {
        m: float(p)
        for m, u, p in zip(
            metrics["metric"], metrics["unit"], metrics["predicted"]
        )
        if u == clinical.UNIT_GAMMA
    }
    dose_error = evaluation.dose_error(
        patient.dose, prediction, patient.possible_dose_mask
    )
    self._rows.append(
        _PatientRow(pid, dose_error, gamma_rates, int(out.sum()), len(out))
    )

    parts = [
        f'<section class="patient" id="{_anchor(pid)}">\n',
        f"<h2>{_e(pid)}</h2>\n",
        f'<p class="note">OpenKBP dose error {dose_error:.3f} Gy; '
        f"{int(out.sum())} of {len(out)} metrics out of tolerance. "
        '<a href="#summary">Back to the summary</a></p>\n',
        '<div class="side">\n<table class="metrics">\n<thead><tr>'
        "<th>ROI</th><th>metric</th><th>unit</th><th>reference</th>"
        "<th>predicted</th><th>difference</th><th>tolerance</th>"
        "</tr></thead>\n<tbody>\n",
    ]
    for flag, row in zip(out, metrics.itertuples(index=False)):
      unit = row.unit
      parts.append(
          _tr(flag) + f"<td>{_e(row.roi)}</td><td>{_e(row.metric)}</td>"
          f"<td>{_e(_short_unit(unit))}</td>"
          f'<td class="num">{_format_value(row.reference, unit)}</td>'
          f'<td class="num">{_format_value(row.predicted, unit)}</td>'
          f'<td class="num">{_format_difference(row.difference, unit)}</td>'
          f'<td class="flag">{OUT_MARK if flag else "ok"}</td></tr>\n'
      )
    parts.append("</tbody>\n</table>\n")
    figure = viz.dvh_figure(
        prediction,
        patient.dose,
        patient.structure_masks,
        patient.roi_present,
        f"{pid}: dose-volume histogram",
        where=pid,
    )
    parts.append(
        _figure_html(
            "dvh",
            figure,
            self.dpi,
            f"{pid} DVH",
            "Cumulative DVH: reference solid, prediction dashed.",
        )
    )
    parts.append("</div>\n")
    figure = viz.dose_slices_figure(
        patient.ct,
        prediction,
        patient.dose,
        patient.structure_masks,
        patient.voxel_dimensions,
        f"{pid}: predicted and reference dose",
        where=pid,
    )
    parts.append(
        _figure_html(
            "slices",
            figure,
            self.dpi,
            f"{pid} dose slices",
            "Axial, coronal and sagittal planes through the PTV centre: "
            "prediction, reference and prediction minus reference (red: "
            "prediction above the reference).",
        )
    )
    if self.gamma_map:
      dose_percent, distance_mm = self.settings.gamma_criteria[0]
      criterion = f"{dose_percent:g}%/{distance_mm:g}mm"
      centre = viz.slice_centre(patient.structure_masks, patient.dose)
      gamma = clinical.gamma_map(
          patient.dose,
          prediction,
          patient.voxel_dimensions,
          patient.possible_dose_mask,
          dose_percent,
          distance_mm,
          max_gamma=viz.GAMMA_MAX,
          region=viz.view_planes(patient.dose.shape, centre),
          gamma_impl=self.settings.gamma_impl,
      )
      figure = viz.gamma_slices_figure(
          patient.ct,
          gamma,
          patient.structure_masks,
          patient.voxel_dimensions,
          centre,
          f"{pid}: gamma {criterion} (global, "
          f"{clinical.GAMMA_CUTOFF_PERCENT:g}% low-dose threshold)",
          criterion=criterion,
          where=pid,
      )
      parts.append(
          _figure_html(
              "gamma",
              figure,
              self.dpi,
              f"{pid} gamma map",
              f"Gamma {criterion} of the prediction against the reference "
              "on the same planes (blue passes, red fails; blank: below "
              "the low-dose threshold or outside the possible-dose mask).",
          )
      )
    parts.append("</section>\n")
    self._sections.write("".join(parts).encode())

  @property
  def num_patients(self) -> int:
    return len(self._rows)

  def write(
      self,
      path,
      *,
      scores: evaluation.EvaluationResult | None = None,
      sources: Mapping[str, Any] | None = None,
      title: str = "Dose prediction report",
  ) -> Path:
    """Writes the report to `path` atomically (replacing a file there).

    Args:
      path: the HTML file.
      scores: the OpenKBP scores of the same patients, if computed.
      sources: extra header lines, e.g. {'reference': folder}.
      title: the page title.
    """
    path = Path(path)
    if not self._rows:
      raise ValueError(f"{path}: no patient was added to the report")
    import pandas as pd  # pylint: disable=g-import-not-at-top

    table = pd.concat(self._tables, ignore_index=True)
    head = self._head(title, table, scores, sources or {})
    with fileio.atomic_output(path, overwrite=True) as f:
      f.write(head.encode())
      self._sections.seek(0)
      while chunk := self._sections.read(1 << 20):
        f.write(chunk)
      f.write(self._definitions().encode())
    return path

  # ---------------------------------------------------------- parts

  def _head(self, title, table, scores, sources) -> str:
    try:
      version = metadata.version("randose_jax")
    except metadata.PackageNotFoundError:
      version = "unknown"
    settings = self.settings
    meta = dict(sources)
    meta["patients"] = len(self._rows)
    meta["generated"] = datetime.datetime.now(datetime.timezone.utc).strftime(
        "%Y-%m-%d %H:%M UTC"
    )
    meta["randose_jax"] = version
    meta["V_d doses"] = ", ".join(f"{d:g} Gy" for d in settings.v_doses_gy)
    meta["gamma"] = (
        ", ".join(f"{d:g}%/{r:g}mm" for d, r in settings.gamma_criteria)
        + f" global, {clinical.GAMMA_CUTOFF_PERCENT:g}% low-dose threshold"
        + (
            f", {settings.gamma_subsample:g} of the points"
            if settings.gamma_subsample < 1
            else ""
        )
        if settings.gamma
        else "not computed"
    )
    meta["tolerances"] = "; ".join(self.tolerances.describe())
    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n',
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n',
        f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n",
        f'<header>\n<h1>{_e(title)}</h1>\n<dl class="meta">\n',
    ]
    parts += [
        f"<dt>{_e(key)}</dt><dd>{_e(value)}</dd>\n"
        for key, value in meta.items()
    ]
    parts.append("</dl>\n</header>\n")
    parts.append('<section id="summary">\n<h2>Cohort summary</h2>\n')
    if scores is not None:
      parts.append(
          '<p class="scores">OpenKBP dose score '
          f"<b>{scores.dose_score:.3f} Gy</b>, DVH score "
          f"<b>{scores.dvh_score:.3f} Gy</b> (mean over "
          f"{scores.num_patients} patients and {scores.num_dvh_metrics} DVH "
          "metrics).</p>\n"
      )
    parts.append(self._patient_table())
    parts.append(self._summary_table(table))
    parts.append("</section>\n")
    return "".join(parts)

  def _summary_table(self, table) -> str:
    summary = clinical.summarize(table)
    out = self.tolerances.flags(table)
    counts = {}
    for (roi, metric), flag in zip(zip(table["roi"], table["metric"]), out):
      counts[roi, metric] = counts.get((roi, metric), 0) + int(flag)
    parts = [
        '<h3>Clinical metrics over the patients</h3>\n<table class="cohort">\n'
        "<thead><tr><th>ROI</th><th>metric</th><th>unit</th><th>n</th>"
        "<th>mean reference</th><th>mean predicted</th>"
        "<th>mean difference</th><th>SD difference</th>"
        "<th>mean |difference|</th><th>out of tolerance</th>"
        "<th>worst patient</th><th>its difference</th>"
        "</tr></thead>\n<tbody>\n"
    ]
    for row in summary.itertuples(index=False):
      unit = row.unit
      count = counts.get((row.roi, row.metric), 0)
      worst = (
          f'<a href="#{_anchor(row.worst_patient)}">'
          f"{_e(row.worst_patient)}</a>"
          if row.worst_patient
          else ""
      )
      parts.append(
          _tr(count) + f"<td>{_e(row.roi)}</td><td>{_e(row.metric)}</td>"
          f"<td>{_e(_short_unit(unit))}</td>"
          f'<td class="num">{row.n}</td>'
          f'<td class="num">{_format_value(row.mean_reference, unit)}</td>'
          f'<td class="num">{_format_value(row.mean_predicted, unit)}</td>'
          f'<td class="num">{_format_difference(row.mean_difference, unit)}'
          "</td>"
          f'<td class="num">{_format_value(row.sd_difference, unit)}</td>'
          f'<td class="num">{_format_value(row.mean_abs_difference, unit)}'
          "</td>"
          f'<td class="flag">{count} of {row.n}</td>'
          f"<td>{worst}</td>"
          f'<td class="num">{_format_difference(row.worst_difference, unit)}'
          "</td></tr>\n"
      )
    parts.append("</tbody>\n</table>\n")
    return "".join(parts)

  def _patient_table(self) -> str:
    criteria = [
        clinical.gamma_metric_name(d, r)
        for d, r in self.settings.gamma_criteria
    ]
    shown = [c for c in criteria if any(c in r.gamma for r in self._rows)]
    parts = [
        '<h3>Patients</h3>\n<table class="patients">\n<thead><tr>'
        "<th>patient</th><th>dose error (Gy)</th>"
        + "".join(f"<th>{_e(c)} (%)</th>" for c in shown)
        + "<th>metrics out of tolerance</th></tr></thead>\n<tbody>\n"
    ]
    for row in self._rows:
      parts.append(
          _tr(row.num_out) + f'<td><a href="#{_anchor(row.patient_id)}">'
          f"{_e(row.patient_id)}</a></td>"
          f'<td class="num">{row.dose_error:.3f}</td>'
          + "".join(
              '<td class="num">'
              f"{_format_value(row.gamma.get(c, math.nan), clinical.UNIT_GAMMA)}"
              "</td>"
              for c in shown
          )
          + f'<td class="flag">{row.num_out} of {row.num_metrics}</td></tr>\n'
      )
    parts.append("</tbody>\n</table>\n")
    return "".join(parts)

  def _definitions(self) -> str:
    items = [
        "D<sub>x</sub> (PTVs): the minimum dose of the hottest x% of the ROI "
        "volume; D0.1cc, D2cc: of the hottest 0.1 and 2 cm&sup3;.",
        "Dmean (OARs): the mean dose of the ROI.",
        "V<sub>d</sub>Gy (OARs): the percent of the ROI volume receiving "
        "&ge; d Gy.",
        "HI (ICRU 83): (D2 &minus; D98) / D50.",
        "CI_RTOG: prescription isodose volume / target volume; CI_Paddick: "
        "TV_PIV&sup2; / (TV &times; PIV), at the PTV's prescription (56, 63, "
        "70 Gy), the target volume being the PTVs prescribed at least as "
        "much.",
        "Gamma: global gamma of the prediction against the reference "
        f"({_GAMMA_BY[self.settings.gamma_impl]}), the percent of the "
        "possible-dose-mask "
        "voxels above the "
        "low-dose threshold with gamma &lt; 1.",
        "OpenKBP dose error: the mean absolute difference over the "
        "possible-dose mask (the dose score is its mean over the patients).",
        "Difference = predicted &minus; reference. Out of tolerance: "
        + "; ".join(_e(rule) for rule in self.tolerances.describe())
        + ". These are review thresholds, not a clinical standard.",
    ]
    return (
        '<footer id="definitions">\n<h2>Definitions</h2>\n<ul>\n'
        + "".join(f"<li>{item}</li>\n" for item in items)
        + '</ul>\n<p class="note">Full definitions and sources: the '
        "docstring of randose_jax/scoring/clinical.py.</p>\n</footer>\n"
        "</body>\n</html>\n"
    )


class ReportScorer:
  """The report as a `cohort.Scorer`: each patient's section added to
  `builder`, with the metrics table of `clinical_evaluator` when the
  clinical metrics are computed too (then each patient's metrics are
  computed once, for both)."""

  def __init__(
      self,
      builder: ReportBuilder,
      clinical_evaluator: clinical.ClinicalEvaluator | None = None,
  ):
    self.builder = builder
    self.clinical_evaluator = clinical_evaluator
    steps = ["clinical metrics"]
    if builder.settings.gamma:
      steps.append("gamma")
    self.name = ", ".join(steps + ["report"])

  def add(self, patient: openkbp.Patient, prediction: np.ndarray) -> None:
    metrics = None
    if self.clinical_evaluator is not None:
      metrics = self.clinical_evaluator.add(patient, prediction)
    self.builder.add(patient, prediction, metrics)

  def result(self) -> ReportBuilder:
    return self.builder
