"""The fault table: every command-line tool against every fault of one list.

This table is the documentation of what a failed command does
(docs/commands.md links here). For each tool (`main`, `predict`, `evaluate`, `export`,
`summary`, `dicom_import`) and each fault in `FAULTS`, `TABLE` holds either
the fault as that tool meets it, or why the fault cannot reach that tool
(`NA`). Every fault that can reach a tool must give:

  * exit status 2;
  * exactly one error line on stderr, `error: ...`, naming the file (and the
    line of the file where there is one); before it only the progress lines
    of the patients done before the fault (randose_jax/progress.py: one
    line per patient where stderr is not a terminal);
  * the input folders and the output folders byte-identical to before
    (nothing half-written: no partial cache, no earlier patients' CSVs, no
    temporary files).

| fault                      | main            | predict          | evaluate              | export         | summary      | dicom_import         |
|----------------------------|-----------------|------------------|-----------------------|----------------|--------------|----------------------|
| missing file               | ct.csv          | ct.csv           | a prediction CSV      | --workdir      | --config     | --input              |
| empty file                 | dose.csv        | ct.csv           | a prediction CSV      | NA             | --config     | a CT slice (0 bytes) |
| non-numeric value          | ct.csv          | ct.csv           | a prediction CSV      | NA             | a --config.* | a CT slice (IPP)     |
| NaN                        | dose.csv        | ct.csv           | a prediction CSV      | NA             | NA           | RTDOSE (scaling)     |
| infinite                   | ct.csv          | dose.csv         | a prediction CSV      | NA             | NA           | RTDOSE (offsets)     |
| negative dose              | dose.csv        | dose.csv         | a prediction CSV      | NA             | NA           | RTDOSE (signed)      |
| index out of the grid      | mask            | mask             | a prediction CSV      | NA             | NA           | NA                   |
| duplicate index            | dose.csv        | ct.csv           | a prediction CSV      | NA             | NA           | a CT slice twice     |
| wrong header               | mask            | ct.csv           | a prediction CSV      | NA             | NA           | a CT slice (TS)      |
| two voxel dimensions       | voxel_dims      | voxel_dims       | reference voxel_dims  | NA             | NA           | a CT slice (1 value) |
| zero or negative spacing   | voxel_dims (0)  | voxel_dims (-1)  | reference (0)         | NA             | --grid=0     | a CT slice (0)       |
| empty patient folder       | a patient       | a patient        | a reference patient   | NA             | NA           | the RTSTRUCT         |
| empty split                | validation-pats | --patients       | --reference           | NA             | NA           | --input              |
| unreadable checkpoint      | --workdir       | --workdir        | NA                    | --workdir      | NA           | NA                   |
| output path not writable   | --workdir       | --output         | --json                | /proc/x.zip    | NA           | --output             |
| output already present     | NA (resumes)    | --output         | NA (replaced)         | --output       | NA           | a pt_* folder        |
| disk full (patched writer) | the cache       | --output         | --json                | --output       | NA           | --output             |
| non-finite contour point   | NA              | NA               | NA                    | NA             | NA           | RTSTRUCT (NaN)       |
| impossible image size      | NA              | NA               | NA                    | NA             | NA           | CT (Rows = 60000)    |
| oversized contour          | NA              | NA               | NA                    | NA             | NA           | RTSTRUCT (10^7 pts)  |
| header line too long       | ct.csv          | ct.csv           | a prediction CSV      | NA             | NA           | NA                   |
| more rows than voxels      | dose.csv        | mask             | a prediction CSV      | NA             | NA           | NA                   |
| not a regular file (FIFO)  | ct.csv          | dose.csv         | a prediction CSV      | NA             | NA           | NA                   |
| folder one level off       | root=train-pats | --patients=pt_6  | --reference=pt_6      | NA             | NA           | NA                   |

Faults in patient files are put into the last patient of the split, so that
a tool that wrote as it went would leave the earlier patients' files behind;
for `dicom_import`, into the last of the two synthetic DICOM patients of
--input (SYN002; `dicom_row`): IPP = ImagePositionPatient, TS = the file
meta's TransferSyntaxUID. "Folder one level off" is the common path
mistake: a data root pointing at `train-pats/` itself, a patient's folder
given for the folder of patients; its error line also says what to give
instead (`Row.says`). The rows run in-process (each tool's `main` with
its flags parsed by `helpers.invoke`, which is what `cli.run` does in the real
program); a few rows run as real processes too (`test_real_process`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import importlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

from absl import flags
import pydicom
import pytest

from randose_jax import fileio
from randose_jax.data import openkbp
from randose_jax.data import phantoms
from randose_jax.dicom import synthetic
from tests.test_dicom_interop import huge_contour, huge_image
from tests.test_train import REPO, SUBPROCESS_ENV
from tests import helpers

CLIS = ("main", "predict", "evaluate", "export", "summary", "dicom_import")
FAULTS = (
    "missing file",
    "empty file",
    "non-numeric value",
    "NaN",
    "infinite",
    "negative dose",
    "index out of the grid",
    "duplicate index",
    "wrong header",
    "two voxel dimensions",
    "zero or negative spacing",
    "empty patient folder",
    "empty split",
    "unreadable checkpoint",
    "output path not writable",
    "output already present",
    "disk full",
    "non-finite contour point",
    "impossible image size",
    "oversized contour",
    "header line too long",
    "more rows than voxels",
    "not a regular file",
    "folder one level off",
)

DEMO = str(REPO / "configs" / "demo.py")
# main on phantom patient folders: configs/demo.py:smoke, not synthetic.
MAIN_FLAGS = (f"--config={DEMO}:smoke", "--config.data.synthetic=False")


# ------------------------------------------------------------ the world


@dataclasses.dataclass
class World:
  """The folders of one row: inputs (read) and outputs (written). The rows
  of dicom_import get only `dicom` (no trained run: the others are None)."""

  tmp: Path
  out: Path  # the outputs' parent folder
  dicom: Path  # dicom_import's --input: SYN001/ and SYN002/ (DICOM files)
  trained: Optional[Path] = None
  root: Optional[Path] = None  # train-pats/ + validation-pats/ phantoms (main)
  patients: Optional[Path] = None  # patients to predict (pt_5, pt_6, with dose)
  reference: Optional[Path] = None  # evaluate's reference (pt_5, pt_6)
  predictions: Optional[Path] = (
      None  # evaluate's predictions (pt_5.csv, pt_6.csv)
  )
  workdir: Optional[Path] = (
      None  # a copy of the trained workdir (predict, export, main)
  )
  inputs: list = dataclasses.field(default_factory=list)


@pytest.fixture(scope="module")
def template(tmp_path_factory, trained) -> Path:
  t = tmp_path_factory.mktemp("template")
  phantoms.write_phantoms(t / "root" / "train-pats", 4, grid=16, seed=0)
  phantoms.write_phantoms(
      t / "root" / "validation-pats", 2, grid=16, seed=1, first_id=5
  )
  shutil.copytree(trained / "synthetic" / "validation-pats", t / "patients")
  preds = t / "predictions"
  for d in openkbp.list_patient_dirs(t / "patients"):
    openkbp.write_prediction_csv(
        preds / f"{d.name}.csv", openkbp.load_patient(d).dose
    )
  return t


@pytest.fixture(scope="module")
def dicom_template(tmp_path_factory) -> Path:
  """Two small synthetic DICOM patients (CT 10 x 48 x 48, RTSTRUCT, RTDOSE),
  one folder each: SYN001/, SYN002/."""
  t = tmp_path_factory.mktemp("dicom")
  for k, pid in enumerate(("SYN001", "SYN002")):
    synthetic.write_patient(
        t / pid,
        synthetic.Phantom(shapes=synthetic.DEFAULT_SHAPES[:3]),
        shape=(10, 48, 48),
        spacing=(3.0, 3.2, 3.2),
        seed=k,
        patient_id=pid,
        with_plan=False,
    )
  return t


@pytest.fixture
def world(request, tmp_path, dicom_template) -> World:
  out = tmp_path / "out"
  out.mkdir()
  (out / "keep.txt").write_text("the user's own file\n")
  shutil.copytree(dicom_template, tmp_path / "dicom")
  w = World(tmp=tmp_path, out=out, dicom=tmp_path / "dicom")
  callspec = getattr(request.node, "callspec", None)
  if callspec is not None and callspec.params.get("tool") == "dicom_import":
    return w  # no trained run needed
  template = request.getfixturevalue("template")
  trained = request.getfixturevalue("trained")
  shutil.copytree(template, tmp_path, dirs_exist_ok=True)
  shutil.copytree(trained, tmp_path / "workdir")
  return dataclasses.replace(
      w,
      trained=trained,
      root=tmp_path / "root",
      patients=tmp_path / "patients",
      reference=tmp_path / "patients",
      predictions=tmp_path / "predictions",
      workdir=tmp_path / "workdir",
  )


def snapshot(folder: Path) -> dict:
  """Every file's bytes (by hash) and every folder, under `folder`."""
  if not folder.exists():
    return {}
  found = {}
  for p in sorted(folder.rglob("*")):
    rel = str(p.relative_to(folder))
    found[rel] = (
        hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    )
  return found


# --------------------------------------------------------- the faults


def rewrite_line(path: Path, line: int, text: str) -> tuple[Path, int]:
  """Replaces line `line` (1-based) of a file."""
  lines = path.read_text().splitlines()
  lines[line - 1] = text
  path.write_text("\n".join(lines) + "\n")
  return path, line


def index_on(path: Path, line: int) -> str:
  return path.read_text().splitlines()[line - 1].split(",")[0]


def missing(path: Path):
  path.unlink()
  return path, None


def emptied(path: Path):
  path.write_bytes(b"")
  return path, None


def non_numeric(path: Path):
  return rewrite_line(path, 3, f"{index_on(path, 3)},12.5abc")


def value(path: Path, text: str, line: int = 4):
  return rewrite_line(path, line, f"{index_on(path, line)},{text}")


def out_of_grid(path: Path):
  return rewrite_line(path, 5, f"{16**3 + 7},")


def duplicate(path: Path):
  lines = path.read_text().splitlines()
  lines.insert(6, lines[3])  # line 4 again, as line 7
  path.write_text("\n".join(lines) + "\n")
  return path, 7


def wrong_header(path: Path):
  return rewrite_line(path, 1, "index,value")


def voxel_dimensions(patient: Path, text: str):
  path = patient / "voxel_dimensions.csv"
  path.write_text(text)
  return path, None


def empty_patient(patient: Path):
  """The folder stays, its files go: the error names a file in it (ct.csv,
  or for evaluate's reference, dose.csv)."""
  shutil.rmtree(patient)
  patient.mkdir()
  return patient, None


def empty_split(split: Path):
  for d in list(split.iterdir()):
    shutil.rmtree(d)
  return split, None


def unreadable_checkpoints(workdir: Path):
  files = [
      p for p in (workdir / "checkpoints").glob("*/*/state/**/*") if p.is_file()
  ]
  assert files
  for p in files:
    p.write_bytes(b"corrupt")
  return workdir / "checkpoints", None


def dicom_files(patient: Path) -> dict[str, list[Path]]:
  """A synthetic DICOM patient's files by Modality (CT slices in position
  order, inferior first)."""
  found: dict[str, list] = {}
  for p in sorted(patient.rglob("*")):
    if p.is_file():
      ds = pydicom.dcmread(p, stop_before_pixels=True)
      z = float(ds.ImagePositionPatient[2]) if ds.Modality == "CT" else 0.0
      found.setdefault(str(ds.Modality), []).append((z, p))
  return {m: [p for _, p in sorted(v)] for m, v in found.items()}


def dicom_set(path: Path, **values):
  """Sets attributes of a DICOM file (pydicom's warnings about values a
  valid file would not hold silenced: writing them is the fault)."""
  ds = pydicom.dcmread(path)
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    for keyword, value in values.items():
      setattr(ds, keyword, value)
    ds.save_as(path)
  return path, None


def dicom_bytes(path: Path, old: bytes, new: bytes):
  """Replaces the one occurrence of `old` in the file by `new` (as long):
  for what pydicom refuses to write."""
  data = path.read_bytes()
  assert data.count(old) == 1 and len(old) == len(new), (path, old)
  path.write_bytes(data.replace(old, new))
  return path, None


def non_numeric_position(path: Path):
  """ImagePositionPatient's first value '12.5abc' (written as bytes)."""
  ds = pydicom.dcmread(path)
  ds.ImagePositionPatient = ["-12.5017", *ds.ImagePositionPatient[1:]]
  ds.save_as(path)
  return dicom_bytes(path, b"-12.5017", b"12.5abc ")


def wrong_transfer_syntax(path: Path):
  """The file meta says RLE Lossless; the pixels are not compressed."""
  return dicom_bytes(path, b"1.2.840.10008.1.2.1\0", b"1.2.840.10008.1.2.5\0")


def duplicated(path: Path):
  """A second copy of the file (same position), sorted after it."""
  copy = path.with_name(path.name + "-copy")
  shutil.copyfile(path, copy)
  return copy, None


def nan_contour(path: Path):
  """A NaN in the first contour's ContourData (pydicom's warning about the
  value silenced: writing it is the fault)."""
  ds = pydicom.dcmread(path)
  contour = ds.ROIContourSequence[0].ContourSequence[0]
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    values = list(contour.ContourData)
    values[4] = "NaN"
    contour.ContourData = values
    ds.save_as(path)
  return path, None


def only_rtstruct(files: dict):
  """The patient's folder keeps its RTSTRUCT only (its CT, dose gone)."""
  for modality, paths in files.items():
    if modality != "RTSTRUCT":
      for p in paths:
        p.unlink()
  return files["RTSTRUCT"][0], None


def under_a_file(w: World, name: str) -> Path:
  (w.out / "a-file").write_text("not a folder\n")
  return w.out / "a-file" / name


# -------------------------------------------------------------- the table


@dataclasses.dataclass
class Row:
  """A fault as one tool meets it: `setup(world, monkeypatch)` breaks the
  world and returns (the file the error must name, its line or None) and
  the arguments of the tool; `says`: words the error line must hold too."""

  setup: Callable
  says: tuple = ()


@dataclasses.dataclass
class NA:
  """The fault cannot reach this tool, and why."""

  reason: str


def _main_args(w: World):
  return [
      *MAIN_FLAGS,
      f"--config.data.root={w.root}",
      f"--workdir={w.out / 'run'}",
  ]


def _predict_args(w: World, output=None):
  return [
      f"--workdir={w.workdir}",
      f"--patients={w.patients}",
      f"--output={output or w.out / 'preds'}",
      "--checkpoint=latest",
  ]


def _evaluate_args(w: World, json_path=None):
  # --clinical too: its tables are outputs a failed run must not leave.
  return [
      f"--reference={w.reference}",
      f"--predictions={w.predictions}",
      f"--json={json_path or w.out / 'scores.json'}",
      f"--per_roi={w.out / 'roi.csv'}",
      f"--clinical={w.out / 'clinical'}",
      "--gamma=false",
  ]


def _export_args(w: World, output=None):
  return [
      f"--workdir={w.workdir}",
      f"--output={output or w.out / 'm.zip'}",
      "--platforms=cpu",
  ]


def _dicom_args(w: World, output=None, input_dir=None):
  return [
      f"--input={input_dir or w.dicom}",
      f"--output={output or w.out / 'pats'}",
      "--grid_shape=24,24,12",
      "--progress=false",
  ]


def main_row(fault: Callable):
  """A fault in the last training patient (pt_4) of main's data root."""

  def setup(w, mp):
    w.inputs = [w.root]
    return fault(w.root / "train-pats" / "pt_4"), _main_args(w)

  return Row(setup)


def predict_row(fault: Callable):
  """A fault in the last patient (pt_6) of predict's --patients."""

  def setup(w, mp):
    w.inputs = [w.patients, w.workdir]
    return fault(w.patients / "pt_6"), _predict_args(w)

  return Row(setup)


def evaluate_pred_row(fault: Callable):
  """A fault in the last prediction (pt_6.csv) that evaluate reads."""

  def setup(w, mp):
    w.inputs = [w.reference, w.predictions]
    return fault(w.predictions / "pt_6.csv"), _evaluate_args(w)

  return Row(setup)


def evaluate_ref_row(fault: Callable):
  """A fault in the last reference patient (pt_6) of evaluate."""

  def setup(w, mp):
    w.inputs = [w.reference, w.predictions]
    return fault(w.reference / "pt_6"), _evaluate_args(w)

  return Row(setup)


def dicom_row(fault: Callable):
  """A fault in the last patient (SYN002) of dicom_import's --input;
  `fault` gets its files by Modality (`dicom_files`)."""

  def setup(w, mp):
    w.inputs = [w.dicom]
    return fault(dicom_files(w.dicom / "SYN002")), _dicom_args(w)

  return Row(setup)


def summary_row(make_args: Callable):
  def setup(w, mp):
    (named, line), args = make_args(w)
    return (named, line), args

  return Row(setup)


def _bad_config(w: World, text: Optional[str]):
  path = w.tmp / "my_config.py"
  if text is not None:
    path.write_text(text)
  w.inputs = [w.tmp / "my_config.py"] if text is not None else []
  return (path, None), [f"--config={path}"]


NO_DATA_EXPORT = NA(
    "export reads no patient files (the model comes from "
    "--workdir's checkpoint)"
)
NO_DATA_SUMMARY = NA(
    "summary reads no patients, checkpoints or outputs: only --config"
)
NO_OUTPUT_SUMMARY = NA("summary writes no file (it prints)")
NO_CHECKPOINT_DICOM = NA("dicom_import reads no checkpoint")
NO_DICOM = NA("reads no DICOM files (only dicom_import does)")

TABLE: dict[str, dict[str, object]] = {
    "missing file": {
        "main": main_row(lambda p: missing(p / "ct.csv")),
        "predict": predict_row(lambda p: missing(p / "ct.csv")),
        "evaluate": evaluate_pred_row(missing),
        "export": Row(
            lambda w, mp: (
                (w.tmp / "no-such-run", None),
                _export_args(
                    dataclasses.replace(w, workdir=w.tmp / "no-such-run")
                ),
            )
        ),
        "summary": summary_row(lambda w: _bad_config(w, None)),
        "dicom_import": Row(
            lambda w, mp: (
                (w.tmp / "no-such-dicom", None),
                _dicom_args(w, input_dir=w.tmp / "no-such-dicom"),
            )
        ),
    },
    "empty file": {
        "main": main_row(lambda p: emptied(p / "dose.csv")),
        "predict": predict_row(lambda p: emptied(p / "ct.csv")),
        "evaluate": evaluate_pred_row(emptied),
        "export": NO_DATA_EXPORT,
        "summary": summary_row(lambda w: _bad_config(w, "")),
        "dicom_import": dicom_row(lambda f: emptied(f["CT"][5])),
    },
    "non-numeric value": {
        "main": main_row(lambda p: non_numeric(p / "ct.csv")),
        "predict": predict_row(lambda p: non_numeric(p / "ct.csv")),
        "evaluate": evaluate_pred_row(non_numeric),
        "export": NO_DATA_EXPORT,
        "summary": summary_row(
            lambda w: (
                ("--config.model.csa_reduction=four", None),
                [f"--config={DEMO}", "--config.model.csa_reduction=four"],
            )
        ),
        "dicom_import": dicom_row(lambda f: non_numeric_position(f["CT"][5])),
    },
    "NaN": {
        "main": main_row(lambda p: value(p / "dose.csv", "nan")),
        "predict": predict_row(lambda p: value(p / "ct.csv", "NaN")),
        "evaluate": evaluate_pred_row(lambda p: value(p, "nan")),
        "export": NO_DATA_EXPORT,
        "summary": NO_DATA_SUMMARY,
        "dicom_import": dicom_row(
            lambda f: dicom_set(f["RTDOSE"][0], DoseGridScaling="NaN")
        ),
    },
    "infinite": {
        "main": main_row(lambda p: value(p / "ct.csv", "inf")),
        "predict": predict_row(lambda p: value(p / "dose.csv", "-inf")),
        "evaluate": evaluate_pred_row(lambda p: value(p, "inf")),
        "export": NO_DATA_EXPORT,
        "summary": NO_DATA_SUMMARY,
        "dicom_import": dicom_row(
            lambda f: dicom_set(
                f["RTDOSE"][0],
                GridFrameOffsetVector=[
                    *pydicom.dcmread(f["RTDOSE"][0]).GridFrameOffsetVector[:-1],
                    "inf",
                ],
            )
        ),
    },
    "negative dose": {
        "main": main_row(lambda p: value(p / "dose.csv", "-1.5")),
        "predict": predict_row(lambda p: value(p / "dose.csv", "-0.25")),
        "evaluate": evaluate_pred_row(lambda p: value(p, "-3.0")),
        "export": NO_DATA_EXPORT,
        "summary": NO_DATA_SUMMARY,
        # Signed pixels: the synthetic dose's upper half reads as negative.
        "dicom_import": dicom_row(
            lambda f: dicom_set(f["RTDOSE"][0], PixelRepresentation=1)
        ),
    },
    "index out of the grid": {
        "main": main_row(lambda p: out_of_grid(p / "possible_dose_mask.csv")),
        "predict": predict_row(
            lambda p: out_of_grid(p / "possible_dose_mask.csv")
        ),
        "evaluate": evaluate_pred_row(
            lambda p: rewrite_line(p, 5, f"{16**3},1.0")
        ),
        "export": NO_DATA_EXPORT,
        "summary": NO_DATA_SUMMARY,
        "dicom_import": NA(
            "DICOM gives positions (mm), not voxel indices; a "
            "contour off the CT's slices is skipped with a "
            "warning (docs/dicom.md)"
        ),
    },
    "duplicate index": {
        "main": main_row(lambda p: duplicate(p / "dose.csv")),
        "predict": predict_row(lambda p: duplicate(p / "ct.csv")),
        "evaluate": evaluate_pred_row(duplicate),
        "export": NO_DATA_EXPORT,
        "summary": NO_DATA_SUMMARY,
        "dicom_import": dicom_row(lambda f: duplicated(f["CT"][5])),
    },
    "wrong header": {
        "main": main_row(lambda p: wrong_header(p / "possible_dose_mask.csv")),
        "predict": predict_row(lambda p: wrong_header(p / "ct.csv")),
        "evaluate": evaluate_pred_row(wrong_header),
        "export": NO_DATA_EXPORT,
        "summary": NO_DATA_SUMMARY,
        "dicom_import": dicom_row(lambda f: wrong_transfer_syntax(f["CT"][5])),
    },
    "two voxel dimensions": {
        "main": main_row(lambda p: voxel_dimensions(p, "3.9\n3.9\n")),
        "predict": predict_row(lambda p: voxel_dimensions(p, "3.9\n3.9\n")),
        "evaluate": evaluate_ref_row(
            lambda p: voxel_dimensions(p, "3.9 3.9\n")
        ),
        "export": NO_DATA_EXPORT,
        "summary": NO_DATA_SUMMARY,
        "dicom_import": dicom_row(
            lambda f: dicom_set(f["CT"][5], PixelSpacing=[3.2])
        ),
    },
    "zero or negative spacing": {
        "main": main_row(lambda p: voxel_dimensions(p, "3.9\n0\n2.5\n")),
        "predict": predict_row(
            lambda p: voxel_dimensions(p, "3.9\n3.9\n-2.5\n")
        ),
        "evaluate": evaluate_ref_row(
            lambda p: voxel_dimensions(p, "0.0\n3.9\n2.5\n")
        ),
        "export": NO_DATA_EXPORT,
        "summary": summary_row(
            lambda w: (("--grid=0", None), [f"--config={DEMO}", "--grid=0"])
        ),
        "dicom_import": dicom_row(
            lambda f: dicom_set(f["CT"][5], PixelSpacing=[0, 3.2])
        ),
    },
    "empty patient folder": {
        "main": main_row(empty_patient),
        "predict": predict_row(empty_patient),
        "evaluate": evaluate_ref_row(empty_patient),
        "export": NO_DATA_EXPORT,
        "summary": NO_DATA_SUMMARY,
        "dicom_import": dicom_row(only_rtstruct),
    },
    "empty split": {
        "main": main_row(
            lambda p: empty_split(p.parent.parent / "validation-pats")
        ),
        "predict": predict_row(lambda p: empty_split(p.parent)),
        "evaluate": evaluate_ref_row(lambda p: empty_split(p.parent)),
        "export": NO_DATA_EXPORT,
        "summary": NO_DATA_SUMMARY,
        "dicom_import": Row(
            lambda w, mp: (
                _inputs(w, [w.dicom]) or empty_split(w.dicom),
                _dicom_args(w),
            )
        ),
    },
    "unreadable checkpoint": {
        # main resumes the copy of the trained run (phantoms of demo:smoke).
        "main": Row(
            lambda w, mp: (
                _inputs(w, []) or unreadable_checkpoints(w.workdir),
                [f"--config={DEMO}:smoke", f"--workdir={w.workdir}"],
            )
        ),
        "predict": Row(
            lambda w, mp: (
                _inputs(w, [w.patients, w.workdir])
                or unreadable_checkpoints(w.workdir),
                _predict_args(w),
            )
        ),
        "evaluate": NA("evaluate reads no checkpoint"),
        "export": Row(
            lambda w, mp: (
                _inputs(w, [w.workdir]) or unreadable_checkpoints(w.workdir),
                _export_args(w),
            )
        ),
        "summary": NO_DATA_SUMMARY,
        "dicom_import": NO_CHECKPOINT_DICOM,
    },
    "output path not writable": {
        "main": Row(
            lambda w, mp: (
                _inputs(w, [w.root]) or (under_a_file(w, "run"), None),
                [
                    *MAIN_FLAGS,
                    f"--config.data.root={w.root}",
                    f"--workdir={w.out / 'a-file' / 'run'}",
                ],
            )
        ),
        "predict": Row(
            lambda w, mp: (
                _inputs(w, [w.patients, w.workdir])
                or (under_a_file(w, "preds"), None),
                _predict_args(w, w.out / "a-file" / "preds"),
            )
        ),
        "evaluate": Row(
            lambda w, mp: (
                _inputs(w, [w.reference, w.predictions])
                or (under_a_file(w, "s.json"), None),
                _evaluate_args(w, w.out / "a-file" / "s.json"),
            )
        ),
        # The case: /proc takes no new file, even from root.
        "export": Row(
            lambda w, mp: (
                _inputs(w, [w.workdir]) or (Path("/proc/x.zip"), None),
                _export_args(w, "/proc/x.zip"),
            )
        ),
        "summary": NO_OUTPUT_SUMMARY,
        "dicom_import": Row(
            lambda w, mp: (
                _inputs(w, [w.dicom]) or (under_a_file(w, "pats"), None),
                _dicom_args(w, w.out / "a-file" / "pats"),
            )
        ),
    },
    "output already present": {
        "main": NA(
            "main resumes the run in an existing --workdir (docs/training.md: "
            "'Running the same command in the same workdir resumes')"
        ),
        "predict": Row(
            lambda w, mp: (
                _inputs(w, [w.patients, w.workdir])
                or _present(w.out / "preds" / "pt_5.csv", w.out / "preds"),
                _predict_args(w),
            )
        ),
        "evaluate": NA(
            "evaluate replaces --json, --per_roi and --clinical's "
            "tables atomically (docs/commands.md, evaluate's --help)"
        ),
        "export": Row(
            lambda w, mp: (
                _inputs(w, [w.workdir]) or _present(w.out / "m.zip"),
                _export_args(w),
            )
        ),
        "summary": NO_OUTPUT_SUMMARY,
        "dicom_import": Row(
            lambda w, mp: (
                _inputs(w, [w.dicom])
                or _present(
                    w.out / "pats" / "pt_SYN002" / "ct.csv",
                    w.out / "pats" / "pt_SYN002",
                ),
                _dicom_args(w),
            )
        ),
    },
    "disk full": {
        "main": Row(
            lambda w, mp: (
                _inputs(w, [w.root]) or _disk_full(mp, w.out / "run" / "cache"),
                _main_args(w),
            )
        ),
        "predict": Row(
            lambda w, mp: (
                _inputs(w, [w.patients, w.workdir])
                or _disk_full(mp, w.out / "preds" / "pt_5.csv"),
                _predict_args(w),
            )
        ),
        "evaluate": Row(
            lambda w, mp: (
                _inputs(w, [w.reference, w.predictions])
                or _disk_full(mp, w.out / "scores.json"),
                _evaluate_args(w),
            )
        ),
        "export": Row(
            lambda w, mp: (
                _inputs(w, [w.workdir]) or _disk_full(mp, w.out / "m.zip"),
                _export_args(w),
            )
        ),
        "summary": NO_OUTPUT_SUMMARY,
        "dicom_import": Row(
            lambda w, mp: (
                _inputs(w, [w.dicom])
                or _disk_full(mp, w.out / "pats" / "pt_SYN001" / "ct.csv"),
                _dicom_args(w),
            )
        ),
    },
    "non-finite contour point": {
        **dict.fromkeys(CLIS[:5], NO_DICOM),
        "dicom_import": dicom_row(lambda f: nan_contour(f["RTSTRUCT"][0])),
    },
    "impossible image size": {
        **dict.fromkeys(CLIS[:5], NO_DICOM),
        "dicom_import": dicom_row(lambda f: (huge_image(f["CT"]), None)),
    },
    "oversized contour": {
        **dict.fromkeys(CLIS[:5], NO_DICOM),
        "dicom_import": dicom_row(
            lambda f: (huge_contour(f["RTSTRUCT"][0]), None)
        ),
    },
}


def one_long_line(path: Path, size: int = 64 * 1024):
  """A file of one line of commas, longer than any header (the issue's
  1.9 GB case is `test_hostile_file_in_bounded_memory`)."""
  path.write_bytes(b"1," * (size // 2))
  return path, None


def too_many_rows(path: Path):
  """One row more than the 16^3 grid has voxels (small enough to pass the
  size bound: the line count refuses it)."""
  path.write_bytes(b",data\n" + b"0,1\n" * (16**3 + 1))
  return path, None


def fifo(path: Path):
  """A named pipe where the file should be: opening it would wait for a
  writer forever."""
  path.unlink()
  os.mkfifo(path)
  return path, None


NO_CSV_DICOM = NA(
    "dicom_import reads DICOM files (its own bounds are the DICOM module's)"
)


def csv_fault_row(fault: Callable, main_file: str, predict_file: str):
  """A fault of one sparse CSV: in main's and predict's patient file of
  that name, in evaluate's prediction CSV (no other tool reads one)."""
  return {
      "main": main_row(lambda p: fault(p / main_file)),
      "predict": predict_row(lambda p: fault(p / predict_file)),
      "evaluate": evaluate_pred_row(fault),
      "export": NO_DATA_EXPORT,
      "summary": NO_DATA_SUMMARY,
      "dicom_import": NO_CSV_DICOM,
  }


TABLE["header line too long"] = csv_fault_row(one_long_line, "ct.csv", "ct.csv")
TABLE["more rows than voxels"] = csv_fault_row(
    too_many_rows, "dose.csv", "possible_dose_mask.csv"
)
TABLE["not a regular file"] = csv_fault_row(fifo, "ct.csv", "dose.csv")


def _one_level_off(w: World, args: list, flag: str, given: Path) -> tuple:
  """`args` with --flag=given instead of its value: (given, None), args."""
  changed = [a for a in args if not a.startswith(f"--{flag}=")]
  return (given, None), [*changed, f"--{flag}={given}"]


ONE_PATIENT = ("one patient's folder", "give the folder that holds the pt_*")
TABLE["folder one level off"] = {
    # The case: the data root at train-pats/ itself.
    "main": Row(
        lambda w, mp: _inputs(w, [w.root])
        or _one_level_off(
            w, _main_args(w), "config.data.root", w.root / "train-pats"
        ),
        says=(
            "config.data.root is a split folder itself",
            "the folder that holds train-pats/ and validation-pats/",
        ),
    ),
    "predict": Row(
        lambda w, mp: _inputs(w, [w.patients, w.workdir])
        or _one_level_off(w, _predict_args(w), "patients", w.patients / "pt_6"),
        says=ONE_PATIENT,
    ),
    "evaluate": Row(
        lambda w, mp: _inputs(w, [w.reference, w.predictions])
        or _one_level_off(
            w, _evaluate_args(w), "reference", w.reference / "pt_6"
        ),
        says=ONE_PATIENT,
    ),
    "export": NA("export reads no patient folder (only --workdir's run)"),
    "summary": NO_DATA_SUMMARY,
    "dicom_import": NA(
        "dicom_import scans --input recursively: any folder above the "
        "DICOM files holds them"
    ),
}


def _inputs(w: World, inputs: list) -> None:
  w.inputs = inputs


def _present(path: Path, named: Optional[Path] = None):
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text("an earlier result\n")
  return named or path, None


def _disk_full(monkeypatch, named: Path):
  monkeypatch.setattr(
      fileio, "atomic_output", _full_disk_writer(fileio.atomic_output)
  )
  return named, None


def _full_disk_writer(real):
  """`atomic_output` whose writes fail as on a full disk, after writing a
  few bytes (so the temporary file exists when the error comes)."""

  class Full:

    def __init__(self, f):
      self._f = f

    def write(self, data):
      self._f.write(bytes(data)[:3])
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
      return getattr(self._f, name)

  @contextlib.contextmanager
  def patched(path, **kwargs):
    with real(path, **kwargs) as f:
      yield Full(f)

  return patched


def _cells():
  for fault in FAULTS:
    for tool in CLIS:
      if isinstance(TABLE[fault][tool], Row):
        yield pytest.param(tool, fault, id=f"{tool}-{fault}")


def test_the_table_covers_every_tool_and_fault():
  assert list(TABLE) == list(FAULTS)
  for fault, row in TABLE.items():
    assert set(row) == set(CLIS), fault
    for tool, cell in row.items():
      assert isinstance(cell, (Row, NA)), (fault, tool)


# ------------------------------------------------------------ running


def run_in_process(tool: str, args: list, capfd) -> tuple[int, str, str]:
  """`python -m randose_jax.<tool> ARGS`, in this process: the tool's flags
  in a fresh FlagValues, parsed and run by `helpers.invoke` (what `cli.run`
  does). Returns (exit status, stdout, stderr)."""
  module = importlib.import_module(helpers.command_module(tool))
  # ml_collections loads --config as the module 'config_config' with the
  # deprecated load_module(), which reuses a module of that name: a fresh
  # process has none.
  sys.modules.pop("config_config", None)
  flag_values = flags.FlagValues()
  module.define_flags(flag_values)
  saved = module.FLAGS
  module.FLAGS = flag_values
  capfd.readouterr()
  try:
    code = helpers.invoke(module.main, [tool, *map(str, args)], flag_values)
  finally:
    module.FLAGS = saved
  out, err = capfd.readouterr()
  return code, out, err


# A progress line of a patient done (randose_jax/progress.py, stderr not a
# terminal): label, count / total, the patient.
PROGRESS_LINE = re.compile(
    r"[\w -]+: (\d+)/(\d+) \S+ done, [\d.]+ s/patient, "
    r"(about .+ left|.+ in all)"
)


def error_lines(err: str) -> list[str]:
  """The lines of `err` that are not progress lines; each progress line
  counts a patient below or at its total."""
  rest = []
  for text in err.splitlines():
    m = PROGRESS_LINE.fullmatch(text)
    if m is None:
      rest.append(text)
    else:
      assert 0 < int(m[1]) <= int(m[2]), err
  return rest


def check_failure(code, err, named, line, before, after):
  assert code == 2, err
  lines = error_lines(err)
  assert len(lines) == 1, err
  assert err.splitlines()[-1] == lines[0], err  # the last line
  assert lines[0].startswith("error: "), err
  assert str(named) in lines[0], (named, err)
  if line is not None:
    assert f"line {line}" in lines[0], (line, err)
  assert after == before, "a folder changed"


@pytest.mark.parametrize("tool,fault", list(_cells()))
def test_fault(tool, fault, world, monkeypatch, capfd):
  monkeypatch.chdir(world.tmp)
  (named, line), args = TABLE[fault][tool].setup(world, monkeypatch)
  watched = [*world.inputs, world.out]
  before = [
      snapshot(p) if p.is_dir() else p.read_bytes() if p.exists() else None
      for p in watched
  ]
  code, _, err = run_in_process(tool, args, capfd)
  after = [
      snapshot(p) if p.is_dir() else p.read_bytes() if p.exists() else None
      for p in watched
  ]
  check_failure(code, err, named, line, before, after)
  for words in TABLE[fault][tool].says:
    assert words in err, (words, err)


# A few rows as real processes: what a user's shell sees.
# dicom_import's: pydicom would warn on stderr about the RLE data were its
# warnings not silenced.
REAL = [
    ("main", "non-numeric value"),
    ("dicom_import", "impossible image size"),
    ("predict", "negative dose"),
    ("evaluate", "duplicate index"),
    ("export", "output path not writable"),
    ("summary", "missing file"),
    ("dicom_import", "wrong header"),
]


@pytest.mark.parametrize("tool,fault", REAL, ids=[f"{t}-{f}" for t, f in REAL])
def test_real_process(tool, fault, world, monkeypatch):
  (named, line), args = TABLE[fault][tool].setup(world, monkeypatch)
  watched = [*world.inputs, world.out]
  before = [snapshot(p) if p.is_dir() else None for p in watched]
  done = subprocess.run(
      [sys.executable, "-m", helpers.command_module(tool), *args],
      cwd=world.tmp,
      env=SUBPROCESS_ENV,
      capture_output=True,
      text=True,
      timeout=300,
  )
  after = [snapshot(p) if p.is_dir() else None for p in watched]
  check_failure(done.returncode, done.stderr, named, line, before, after)


# ------------------------------------------------- hostile files, real size

GB = 1024**3


def sparse_one_line(path: Path) -> None:
  """The issue's 1.9 GB one-line CSV (commas, no line end), as a sparse
  file: a few KB on the disk."""
  with open(path, "wb") as f:
    f.write(b"1," * 2048)
    f.truncate(int(1.9 * GB))


def five_million_rows(path: Path) -> None:
  """5,000,000 rows repeating one voxel index (30 MB, streamed)."""
  with open(path, "wb") as f:
    f.write(b",data\n")
    for _ in range(50):
      f.write(b"0,1.0\n" * 100_000)


HOSTILE = {"one line of 1.9 GB": sparse_one_line, "5M rows": five_million_rows}


# Runs `python -m MODULE ARGS` and writes the process's peak resident
# memory (VmHWM: the high-water mark of its own memory since exec; the
# rusage of a child started from this large process would count this
# process's size too) to $RANDOSE_TEST_PEAK when it exits.
PEAK_WRAPPER = r"""
import atexit, os, runpy, sys
def peak():
  with open("/proc/self/status") as f:
    kb = [l.split()[1] for l in f if l.startswith("VmHWM:")][0]
  with open(os.environ["RANDOSE_TEST_PEAK"], "w") as f:
    f.write(kb)
atexit.register(peak)
module = sys.argv[1]
sys.argv = [module] + sys.argv[2:]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def run_measured(module: str, args: list, cwd: Path):
  """Runs `python -m module args`: (exit status, stderr, peak resident
  memory in GB, seconds)."""
  peak_file = cwd / "peak-kb"
  t0 = time.time()
  done = subprocess.run(
      [sys.executable, "-c", PEAK_WRAPPER, module, *map(str, args)],
      cwd=cwd,
      env=dict(SUBPROCESS_ENV, RANDOSE_TEST_PEAK=str(peak_file)),
      stdout=subprocess.DEVNULL,
      stderr=subprocess.PIPE,
      text=True,
      timeout=300,
      check=False,
  )
  seconds = time.time() - t0
  peak_gb = int(peak_file.read_text()) * 1024 / GB
  peak_file.unlink()
  return done.returncode, done.stderr, peak_gb, seconds


def _hostile_setup(tool: str, w: World, make) -> tuple[Path, list]:
  if tool == "main":
    path = w.root / "train-pats" / "pt_4" / "ct.csv"
    args = _main_args(w)
  elif tool == "predict":
    path = w.patients / "pt_6" / "ct.csv"
    args = _predict_args(w)
  else:
    path = w.predictions / "pt_6.csv"
    args = _evaluate_args(w)
  make(path)
  return path, args


@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.parametrize("tool", ["main", "predict", "evaluate"])
def test_hostile_file_in_bounded_memory(tool, case, world):
  """A file that cannot be the sparse CSV it claims to be is refused with
  one line, in bounded memory and time (before: past 8 GB for the one-line
  file, 2 GB for 5M rows), the command's peak measured (`wait4`)."""
  path, args = _hostile_setup(tool, world, HOSTILE[case])
  code, err, peak_gb, seconds = run_measured(
      helpers.command_module(tool), args, world.tmp
  )
  check_failure(code, err, path, None, None, None)
  assert peak_gb < 1.0, f"{tool} peaked at {peak_gb:.2f} GB"
  assert seconds < 60, f"{tool} took {seconds:.0f} s"
  print(f"{tool}, {case}: {peak_gb:.2f} GB peak, {seconds:.1f} s")


def test_five_million_rows_on_a_real_grid(shared_openkbp, tmp_path):
  """On a 128^3 patient the 5M-row file is within the size bound: the line
  count refuses it (2,097,152 voxels); evaluate, in a real process."""
  reference = tmp_path / "reference"
  reference.mkdir()
  patient = openkbp.list_patient_dirs(shared_openkbp / "validation-pats")[0]
  (reference / patient.name).symlink_to(patient, target_is_directory=True)
  predictions = tmp_path / "predictions"
  predictions.mkdir()
  path = predictions / f"{patient.name}.csv"
  five_million_rows(path)
  code, err, peak_gb, seconds = run_measured(
      "randose_jax.cli.evaluate",
      [f"--reference={reference}", f"--predictions={predictions}"],
      tmp_path,
  )
  check_failure(code, err, path, None, None, None)
  assert "5,000,001 lines" in err
  assert peak_gb < 1.0, f"peaked at {peak_gb:.2f} GB"
  assert seconds < 60
  print(f"evaluate, 5M rows at 128^3: {peak_gb:.2f} GB peak, {seconds:.1f} s")


def test_final_predictions_on_a_full_disk(world, monkeypatch, capfd):
  """A run continued from step 4 to 6 whose final predictions meet a full
  disk at the second CSV (patched writer): one line naming that CSV's
  path, and the step-4 predictions, zip and validation_scores.json as
  they were (they change together or not at all)."""
  w = world
  outputs = [w.workdir / "predictions", w.workdir / "validation_scores.json"]
  before = [snapshot(outputs[0]), outputs[1].read_bytes()]
  real, full = fileio.atomic_output, _full_disk_writer(fileio.atomic_output)
  staged = []

  def writer(path, **kwargs):
    if ".randose-staging-final" in str(path):
      staged.append(path)
      if len(staged) == 2:
        return full(path, **kwargs)
    return real(path, **kwargs)

  monkeypatch.setattr(fileio, "atomic_output", writer)
  code, out, err = run_in_process(
      "main",
      [
          f"--config={DEMO}:smoke",
          f"--workdir={w.workdir}",
          "--config.num_train_steps=6",
      ],
      capfd,
  )
  assert "Resuming from checkpoint at step 4" in out
  named = w.workdir / "predictions" / "validation-pats" / "pt_6.csv"
  after = [snapshot(outputs[0]), outputs[1].read_bytes()]
  check_failure(code, err, named, None, before, after)
  assert "No space left on device" in err
  # Training itself completed: the same command writes the predictions.
  assert (w.workdir / "checkpoints" / "latest" / "6").is_dir()


def _interrupt_second_call(monkeypatch, module, name: str):
  """`module.name` sends SIGINT to this process at its second call, as a
  Ctrl-C in the middle of the second patient."""
  real = getattr(module, name)
  calls = []

  def interrupting(*args, **kwargs):
    calls.append(1)
    if len(calls) == 2:
      os.kill(os.getpid(), signal.SIGINT)
    return real(*args, **kwargs)

  monkeypatch.setattr(module, name, interrupting)


@pytest.mark.parametrize("tool", ["predict", "evaluate", "dicom_import"])
def test_ctrl_c_leaves_no_output(tool, world, monkeypatch, capfd):
  """Ctrl-C during the second patient: one line, exit 130, the output
  folder as it was (nothing half-written, no staging folder left)."""
  from randose_jax.dicom import importer  # pylint: disable=g-import-not-at-top

  monkeypatch.chdir(world.tmp)
  if tool == "predict":
    _interrupt_second_call(monkeypatch, openkbp, "load_patient")
    args = _predict_args(world)
  elif tool == "evaluate":
    _interrupt_second_call(monkeypatch, openkbp, "read_prediction_csv")
    args = _evaluate_args(world)
  else:
    _interrupt_second_call(monkeypatch, importer, "import_plan")
    args = _dicom_args(world)
  before = snapshot(world.out)
  code, _, err = run_in_process(tool, args, capfd)
  assert code == 130, err
  assert error_lines(err) == [
      "interrupted by SIGINT; no output was left half-written"
  ], err
  assert err.endswith("half-written\n"), err
  # At most the first patient was counted done, not the one interrupted.
  assert all(
      int(m[1]) == 1
      for m in map(PROGRESS_LINE.fullmatch, err.splitlines())
      if m is not None
  ), err
  assert snapshot(world.out) == before
