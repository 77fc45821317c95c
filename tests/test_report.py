"""The HTML report (`evaluate --report`): its structure, tolerances and CLI.

The report is parsed with the standard library's HTML parser into a small
element tree; the tests check what a reader relies on: self-contained (no
script, no stylesheet link, no URL but data: images and in-page anchors),
every image a decodable PNG, the cohort summary before the patient sections,
one section per patient in id order with its metrics table and figures, the
out-of-tolerance rows exactly those of rules written out here, and the
numbers equal to `clinical.compare_patient`'s. The screenshots of a real
browser are `benchmarks/report_screenshot.py`'s job.
"""

import base64
import dataclasses
import html.parser
import math
import shutil
import struct

from absl import flags
import numpy as np
import pytest

from randose_jax.scoring import clinical
from randose_jax.cli import evaluate
from randose_jax.scoring import dose_dvh as evaluation
from randose_jax.scoring import report
from randose_jax import viz
from randose_jax.data import openkbp
from tests import helpers

NO_GAMMA = clinical.ClinicalSettings(gamma=False)
_VOID = {"img", "meta", "br", "hr", "link", "input", "source", "col", "wbr"}


# ------------------------------------------------------------ a tiny DOM


@dataclasses.dataclass
class Node:
  tag: str
  attrs: dict
  children: list = dataclasses.field(default_factory=list)
  text: str = ""

  def classes(self) -> set:
    return set(self.attrs.get("class", "").split())

  def walk(self):
    yield self
    for child in self.children:
      yield from child.walk()

  def find_all(self, tag, cls=None):
    return [
        n
        for n in self.walk()
        if n.tag == tag and (cls is None or cls in n.classes())
    ]

  def all_text(self) -> str:
    return self.text + "".join(c.all_text() for c in self.children)


class _Builder(html.parser.HTMLParser):

  def __init__(self):
    super().__init__(convert_charrefs=True)
    self.root = Node("#root", {})
    self.stack = [self.root]
    self.doctype = None

  def handle_decl(self, decl):
    self.doctype = decl

  def handle_starttag(self, tag, attrs):
    node = Node(tag, dict(attrs))
    self.stack[-1].children.append(node)
    if tag not in _VOID:
      self.stack.append(node)

  def handle_endtag(self, tag):
    assert self.stack[-1].tag == tag, (self.stack[-1].tag, tag)
    self.stack.pop()

  def handle_data(self, data):
    self.stack[-1].children.append(Node("#text", {}, text=data))


def parse(text: str) -> tuple[Node, str]:
  builder = _Builder()
  builder.feed(text)
  builder.close()
  assert builder.stack == [builder.root], "unclosed elements"
  return builder.root, builder.doctype


def cells(row: Node) -> list[str]:
  return [c.all_text().strip() for c in row.children if c.tag in ("td", "th")]


def body_rows(table: Node) -> list[Node]:
  (tbody,) = table.find_all("tbody")
  return [r for r in tbody.children if r.tag == "tr"]


def png_size(uri: str) -> tuple[int, int]:
  prefix = "data:image/png;base64,"
  assert uri.startswith(prefix), uri[:40]
  data = base64.b64decode(uri[len(prefix) :], validate=True)
  assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
  return struct.unpack(">II", data[16:24])


# ------------------------------------------------------------ rules


def expected_out(unit, metric, predicted, difference) -> bool:
  """The default tolerances, written out independently of report.py."""
  if unit == clinical.UNIT_GAMMA:
    limit = {"gamma_3%/3mm": 95.0, "gamma_2%/2mm": 90.0}.get(metric)
    return limit is not None and predicted < limit
  if math.isnan(difference):
    return False
  bound = {
      clinical.UNIT_GY: 2.1,
      clinical.UNIT_VOLUME_PERCENT: 5.0,
      clinical.UNIT_RATIO: 0.1,
  }[unit]
  return abs(difference) > bound


def test_tolerance_rules():
  t = report.Tolerances()
  gy, vol, ratio, gamma = (
      clinical.UNIT_GY,
      clinical.UNIT_VOLUME_PERCENT,
      clinical.UNIT_RATIO,
      clinical.UNIT_GAMMA,
  )
  assert not t.is_out(gy, "D95", 60.0, 2.1)
  assert t.is_out(gy, "D95", 60.0, -2.11)
  assert not t.is_out(vol, "V20Gy", 40.0, 5.0) and t.is_out(
      vol, "V20Gy", 40.0, 5.01
  )
  assert not t.is_out(ratio, "HI", 0.1, -0.1) and t.is_out(
      ratio, "CI_Paddick", 0.5, 0.11
  )
  assert not t.is_out(gy, "D95", math.nan, math.nan)
  assert not t.is_out(gamma, "gamma_3%/3mm", 95.0, -5.0)
  assert t.is_out(gamma, "gamma_3%/3mm", 94.9, -5.1)
  assert not t.is_out(gamma, "gamma_2%/2mm", 90.0, -10.0)
  assert t.is_out(gamma, "gamma_2%/2mm", 89.9, -10.1)
  assert not t.is_out(gamma, "gamma_1%/1mm", 10.0, -90.0)  # no limit set
  strict = report.Tolerances(dose_gy=0.5, gamma_min_percent=(("2%/2mm", 99),))
  assert strict.is_out(gy, "Dmean", 20.0, 0.6)
  assert not strict.is_out(gamma, "gamma_3%/3mm", 50.0, -50.0)
  assert strict.is_out(gamma, "gamma_2%/2mm", 98.0, -2.0)
  assert report.parse_gamma_limits(["3%/3mm=95", " 2%/2mm = 90.5"]) == (
      ("3%/3mm", 95.0),
      ("2%/2mm", 90.5),
  )
  for bad in ("3%/3mm", "3%/3mm=x", "=90", "3%/3mm=101", "3%/3mm=-1"):
    with pytest.raises(ValueError, match="CRITERION=PERCENT"):
      report.parse_gamma_limits([bad])
  with pytest.raises(ValueError, match="dose_gy"):
    report.Tolerances(dose_gy=-1.0)
  with pytest.raises(ValueError, match="gamma limit"):
    report.Tolerances(gamma_min_percent=(("3%/3mm", 120.0),))


def test_view_planes_are_the_three_planes_through_the_centre():
  shape, centre = (5, 6, 7), (1, 4, 2)
  expected = np.zeros(shape, bool)
  expected[1, :, :] = expected[:, 4, :] = expected[:, :, 2] = True
  np.testing.assert_array_equal(viz.view_planes(shape, centre), expected)


def test_gamma_map_on_a_region_equals_the_full_map_there():
  """The region changes which points are evaluated, not their values (the
  normalisation and the threshold stay those of the whole mask)."""
  rng = np.random.default_rng(0)
  shape, spacing = (10, 11, 9), (2.5, 3.0, 2.0)
  reference = 40 + 20 * np.indices(shape)[1] / shape[1]
  reference[:, :, 6:] = 3.0  # below the 10% threshold
  evaluated = reference * (1 + 0.04 * rng.standard_normal(shape))
  mask = np.ones(shape, bool)
  region = viz.view_planes(shape, (4, 5, 3))
  full = clinical.gamma_map(reference, evaluated, spacing, mask, 3, 3)
  part = clinical.gamma_map(
      reference, evaluated, spacing, mask, 3, 3, region=region
  )
  inside = region & np.isfinite(full)
  assert inside.sum() > 50 and np.isnan(part[~region]).all()
  np.testing.assert_allclose(part[inside], full[inside], rtol=1e-12)
  assert np.isnan(part[region & (reference < 6)]).all()
  with pytest.raises(ValueError, match="region has shape"):
    clinical.gamma_map(
        reference, evaluated, spacing, mask, 3, 3, region=region[1:]
    )


# ------------------------------------------------------------ the report


def predictions_for(patients):
  """pt_1 exact, pt_2 at 0.97, pt_3 +6 Gy in the targets, pt_4 +3 Gy in
  the possible-dose mask."""
  out = {}
  for patient in patients:
    dose = patient.dose.astype(np.float64)
    if patient.patient_id == "pt_2":
      dose = dose * 0.97
    elif patient.patient_id == "pt_3":
      targets = patient.structure_masks[..., 7:].any(axis=-1)
      dose = np.where(targets, dose + 6.0, dose)
    elif patient.patient_id == "pt_4":
      dose = np.where(patient.possible_dose_mask, dose + 3.0, dose)
    out[patient.patient_id] = dose
  return out


@pytest.fixture(scope="module")
def phantom_patients(phantom_split):
  return [
      openkbp.load_patient(d) for d in openkbp.list_patient_dirs(phantom_split)
  ]


def build_report(patients, path, settings, **kwargs):
  predictions = predictions_for(patients)
  evaluator = evaluation.Evaluator()
  tables = {}
  with report.ReportBuilder(settings, **kwargs) as builder:
    for patient in patients:
      dose = predictions[patient.patient_id]
      evaluator.add(patient, dose)
      table = clinical.compare_patient(patient, dose, settings)
      tables[patient.patient_id] = table
      builder.add(patient, dose, table)
    builder.write(
        path,
        scores=evaluator.result(),
        sources={"reference": "/data/<b>&c", "predictions": "p"},
    )
  return evaluator.result(), tables


def check_self_contained(root: Node):
  assert not root.find_all("script") and not root.find_all("link")
  assert not root.find_all("iframe") and not root.find_all("object")
  ids = {n.attrs["id"] for n in root.walk() if "id" in n.attrs}
  for node in root.walk():
    for name, value in node.attrs.items():
      if name == "src":
        assert node.tag == "img" and value.startswith("data:image/png;base64,")
      elif name == "href":
        assert value.startswith("#") and value[1:] in ids, value
      else:
        assert "http" not in (value or ""), (node.tag, name, value)
  (style,) = root.find_all("style")
  assert "url(" not in style.all_text() and "@import" not in style.all_text()
  for image in root.find_all("img"):
    width, height = png_size(image.attrs["src"])
    assert width > 200 and height > 150 and image.attrs.get("alt")


def test_report_structure_and_tolerances(phantom_patients, tmp_path):
  path = tmp_path / "report.html"
  scores, tables = build_report(phantom_patients, path, NO_GAMMA)
  text = path.read_text()
  root, doctype = parse(text)
  assert doctype.lower() == "doctype html"
  (html_node,) = root.find_all("html")
  assert html_node.attrs.get("lang") == "en"
  assert any(m.attrs.get("charset") == "utf-8" for m in root.find_all("meta"))
  check_self_contained(root)
  # The header escapes what it shows.
  assert "/data/<b>&c" in root.find_all("header")[0].all_text()
  assert "<b>&c" not in text

  # Order: header, the summary section, the patients in id order, footer.
  (body,) = root.find_all("body")
  blocks = [c for c in body.children if c.tag != "#text"]
  assert [b.tag for b in blocks] == ["header", "section"] + ["section"] * 4 + [
      "footer"
  ]
  summary = blocks[1]
  assert summary.attrs["id"] == "summary"
  ids = [p.patient_id for p in phantom_patients]
  assert [b.attrs["id"] for b in blocks[2:6]] == [
      f"patient-{pid.replace('_', '-')}" for pid in ids
  ]
  assert all("patient" in b.classes() for b in blocks[2:6])
  assert blocks[6].attrs["id"] == "definitions"

  # The summary: the OpenKBP scores, then the patients, then the cohort table.
  scores_text = summary.find_all("p", "scores")[0].all_text()
  assert f"{scores.dose_score:.3f} Gy" in scores_text
  assert f"{scores.dvh_score:.3f} Gy" in scores_text
  tables_in_summary = [t for t in summary.walk() if t.tag == "table"]
  assert [t.attrs["class"] for t in tables_in_summary] == ["patients", "cohort"]
  patient_rows = body_rows(tables_in_summary[0])
  outs = {
      pid: np.array(
          [
              expected_out(r.unit, r.metric, r.predicted, r.difference)
              for r in table.itertuples()
          ]
      )
      for pid, table in tables.items()
  }
  for row, pid in zip(patient_rows, ids):
    values = cells(row)
    assert values[0] == pid
    assert float(values[1]) == pytest.approx(
        scores.summary()["dose_errors"][pid], abs=5e-4
    )
    assert values[-1] == f"{outs[pid].sum()} of {len(outs[pid])}"
    assert ("out" in row.classes()) == bool(outs[pid].any())
  assert len(patient_rows) == 4
  assert not outs["pt_1"].any()  # the exact prediction
  assert outs["pt_3"].any() and outs["pt_4"].any()

  # The cohort table: one row per (roi, metric), the counts of out rows.
  all_rows = [
      (pid, r.roi, r.metric, flag)
      for pid, table in tables.items()
      for r, flag in zip(table.itertuples(), outs[pid])
  ]
  cohort_rows = body_rows(tables_in_summary[1])
  keys = {(roi, metric) for _, roi, metric, _ in all_rows}
  assert len(cohort_rows) == len(keys)
  for row in cohort_rows:
    values = cells(row)
    roi, metric = values[0], values[1]
    flagged = sum(f for _, r, m, f in all_rows if (r, m) == (roi, metric))
    n = int(values[3])
    assert values[9] == f"{flagged} of {n}"
    assert ("out" in row.classes()) == (flagged > 0)

  # Each patient section: its metrics (numbers as compare_patient's, the
  # out rows exactly the expected ones), the DVH and the dose slices.
  for block, pid in zip(blocks[2:6], ids):
    (metrics,) = block.find_all("table", "metrics")
    rows = body_rows(metrics)
    table = tables[pid]
    assert len(rows) == len(table)
    for row, expected, flag in zip(rows, table.itertuples(), outs[pid]):
      values = cells(row)
      assert values[:2] == [expected.roi, expected.metric]
      for shown, value in zip(
          values[3:6],
          (expected.reference, expected.predicted, expected.difference),
      ):
        if math.isnan(value):
          assert shown == "n/a"
        else:
          assert float(shown) == pytest.approx(value, abs=0.0051)
      assert ("out" in row.classes()) == flag, (pid, values)
      assert values[6] == ("out" if flag else "ok")
    kinds = [f.attrs["class"] for f in block.find_all("figure")]
    assert kinds == ["dvh", "slices"]  # no gamma map without gamma
    for figure in block.find_all("figure"):
      assert figure.find_all("img") and figure.find_all("figcaption")


def test_report_tolerances_change_what_is_highlighted(
    phantom_patients, tmp_path, monkeypatch
):
  patients = phantom_patients[1:2]  # pt_2, at 0.97 of its reference
  # The tables are what this test reads: cheap stand-ins for the figures.
  from matplotlib.figure import Figure  # pylint: disable=g-import-not-at-top

  blank = lambda *args, **kwargs: Figure(figsize=(4, 3))
  monkeypatch.setattr(viz, "dvh_figure", blank)
  monkeypatch.setattr(viz, "dose_slices_figure", blank)
  strict, loose = tmp_path / "strict.html", tmp_path / "loose.html"
  build_report(
      patients, strict, NO_GAMMA, tolerances=report.Tolerances(0.0, 0.0, 0.0)
  )
  build_report(
      patients, loose, NO_GAMMA, tolerances=report.Tolerances(1e3, 1e3, 1e3)
  )
  strict_rows = parse(strict.read_text())[0].find_all("tr", "out")
  assert len(strict_rows) > 10
  assert not parse(loose.read_text())[0].find_all("tr", "out")


def test_report_with_gamma(phantom_patients, tmp_path):
  patients = [phantom_patients[3]]  # +3 Gy in the possible-dose mask
  path = tmp_path / "report.html"
  settings = clinical.ClinicalSettings(v_doses_gy=(5.0,))
  _, tables = build_report(patients, path, settings)
  root, _ = parse(path.read_text())
  check_self_contained(root)
  (summary,) = [
      s for s in root.find_all("section") if s.attrs.get("id") == "summary"
  ]
  (patients_table,) = summary.find_all("table", "patients")
  header = cells(patients_table.find_all("tr")[0])
  assert header[2:4] == ["gamma_3%/3mm (%)", "gamma_2%/2mm (%)"]
  rows = body_rows(patients_table)
  for row, patient in zip(rows, patients):
    table = tables[patient.patient_id]
    rates = table[table.unit == clinical.UNIT_GAMMA].predicted.tolist()
    assert [float(v) for v in cells(row)[2:4]] == pytest.approx(
        rates, abs=0.051
    )
  for section in root.find_all("section", "patient"):
    kinds = [f.attrs["class"] for f in section.find_all("figure")]
    assert kinds == ["dvh", "slices", "gamma"]
  low = tables["pt_4"]
  gamma_rows = low[low.unit == clinical.UNIT_GAMMA]
  (section,) = [
      s
      for s in root.find_all("section", "patient")
      if s.attrs["id"] == "patient-pt-4"
  ]
  flagged = {
      cells(r)[1]
      for r in body_rows(section.find_all("table", "metrics")[0])
      if "out" in r.classes()
  }
  expected = {
      r.metric
      for r in gamma_rows.itertuples()
      if expected_out(r.unit, r.metric, r.predicted, r.difference)
  }
  assert expected  # +3 Gy fails gamma somewhere
  assert flagged & set(gamma_rows.metric) == expected


def test_report_refuses_no_patients_and_missing_dose(
    phantom_patients, tmp_path
):
  with report.ReportBuilder(NO_GAMMA) as builder:
    with pytest.raises(ValueError, match="no patient"):
      builder.write(tmp_path / "r.html")
    patient = dataclasses.replace(phantom_patients[0], dose=None)
    with pytest.raises(ValueError, match="pt_1.*dose"):
      builder.add(patient, phantom_patients[0].dose)
  assert not (tmp_path / "r.html").exists()


# ------------------------------------------------------------ the CLI


@pytest.fixture
def cli_folders(phantom_split, tmp_path):
  """pt_2 (at 0.97) and pt_3 (+6 Gy in the targets) and their predictions."""
  reference = tmp_path / "reference"
  for pid in ("pt_2", "pt_3"):
    shutil.copytree(phantom_split / pid, reference / pid)
  preds = tmp_path / "predictions"
  patients = [
      openkbp.load_patient(d) for d in openkbp.list_patient_dirs(reference)
  ]
  for pid, dose in predictions_for(patients).items():
    openkbp.write_prediction_csv(preds / f"{pid}.csv", dose)
  return reference, preds


def invoke(capfd, monkeypatch, *args):
  values = flags.FlagValues()
  evaluate.define_flags(values)
  monkeypatch.setattr(evaluate, "FLAGS", values)
  capfd.readouterr()
  code = helpers.invoke(evaluate.main, ["evaluate", *map(str, args)], values)
  out = capfd.readouterr()
  return code, out.out, out.err


def test_cli_report(cli_folders, tmp_path, monkeypatch, capfd):
  """--report writes the report (replacing an earlier one) and, with
  --clinical, the same metrics as the tables; a failed run, bad tolerance
  flags and an unusable path leave the earlier report as it was."""
  reference, preds = cli_folders
  path = tmp_path / "out" / "report.html"
  path.parent.mkdir()
  path.write_text("an earlier report\n")
  inputs = (
      f"--reference={reference}",
      f"--predictions={preds}",
      "--gamma=false",
  )
  code, out, err = invoke(
      capfd,
      monkeypatch,
      *inputs,
      f"--report={path}",
      f"--clinical={tmp_path / 'clinical'}",
      "--report_tolerance_gy=1.0",
  )
  assert code == 0, err
  assert f"report: {path}" in out and "dose score:" in out
  root, _ = parse(path.read_text())
  assert len(root.find_all("section", "patient")) == 2
  assert "|difference| > 1 Gy" in root.find_all("header")[0].all_text()
  import pandas as pd  # pylint: disable=g-import-not-at-top

  table = pd.read_csv(tmp_path / "clinical" / clinical.METRICS_FILE)
  (section,) = [
      s
      for s in root.find_all("section", "patient")
      if s.attrs["id"] == "patient-pt-2"
  ]
  shown = body_rows(section.find_all("table", "metrics")[0])
  mine = table[table.patient == "pt_2"]
  assert len(shown) == len(mine)
  for row, expected in zip(shown, mine.itertuples()):
    values = cells(row)
    flag = (
        expected.unit == clinical.UNIT_GY and abs(expected.difference) > 1.0
    ) or expected_out(
        expected.unit, expected.metric, expected.predicted, expected.difference
    )
    assert values[6] == ("out" if flag else "ok"), values

  # Failures: the report stays as the successful run wrote it.
  written = path.read_bytes()
  bad = preds / "pt_3.csv"
  lines = bad.read_text().splitlines()
  lines[2] = lines[2].split(",")[0] + ",nan"
  bad.write_text("\n".join(lines) + "\n")
  code, _, err = invoke(capfd, monkeypatch, *inputs, f"--report={path}")
  assert code == 2 and str(bad) in err, err
  assert path.read_bytes() == written
  a_file = tmp_path / "a-file"
  a_file.write_text("x")
  for args, words in (
      (
          [f"--report={path}", "--report_gamma_min=3%/3mm"],
          ["--report_gamma_min", "CRITERION=PERCENT"],
      ),
      (
          [f"--report={path}", "--report_tolerance_gy=-1"],
          ["--report_tolerance_gy"],
      ),
      (
          [f"--report={path}", "--report_tolerance_volume=nan"],
          ["--report_tolerance_volume"],
      ),
      ([f"--report={a_file}/r.html"], [str(a_file)]),
  ):
    code, _, err = invoke(capfd, monkeypatch, *inputs, *args)
    assert code == 2, err
    assert all(w in err for w in words), err
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  assert path.read_bytes() == written
  assert sorted(p.name for p in path.parent.iterdir()) == ["report.html"]
