"""DICOM structures as other writers write them, checked against the original
masks and against independent readers (issue 22, `randose_jax/dicom/interop.py`).

The rasterisation convention (`rasterize.rasterize`): a pixel is in when its
centre is inside an odd number of a slice's contours or on one of them; a
one- or two-point contour is that pixel, that line of pixels. Contours
traced through pixel centres (mask exporters: rt-utils, platipy) and drawn
around pixel edges or freely (planning systems, `synthetic.write_patient`)
both come back right. rt-utils, dcmrtstruct2nii and platipy are optional:
their tests skip, saying why, when they are not installed.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom
import pytest

from randose_jax.data import openkbp
from randose_jax.dicom import interop, rasterize, series, synthetic
from tests.test_train import SUBPROCESS_ENV

MIN_CC = 5.0


def _grid(shape=(1, 12, 12)):
  """A stored grid whose indices are its LPS coordinates (1 mm, identity)."""
  return series.StoredGrid(shape, np.eye(3)[[2, 1, 0]], np.ones(3), np.zeros(3))


def _fill(*contours, shape=(1, 12, 12)) -> np.ndarray:
  """bool (rows, columns) of slice 0: contours are (row, column) points."""
  polygons = [(0, np.asarray(c, np.float64)) for c in contours]
  stored = rasterize.rasterize(polygons, _grid(shape))
  out = np.zeros(shape, bool)
  if stored is not None:
    lo, hi = stored.start, stored.stop
    out[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = stored.mask
  return out[0]


def _square(a, b):
  return [(a, a), (a, b), (b, b), (b, a)]


def test_contours_through_centres_and_around_edges_give_the_same_pixels():
  """A 5 x 5 square traced through the centres of its boundary pixels (a
  mask exporter) and drawn around their edges (a planning system)."""
  expected = np.zeros((12, 12), bool)
  expected[2:7, 2:7] = True
  np.testing.assert_array_equal(_fill(_square(2, 6)), expected)
  np.testing.assert_array_equal(_fill(_square(1.5, 6.5)), expected)
  # A contour drawn freely: a pixel is in when its centre is inside.
  diamond = [(4, 0.6), (7.4, 4), (4, 7.4), (0.6, 4)]
  rr, cc = np.indices((12, 12))
  inside = np.abs(rr - 4) + np.abs(cc - 4) < 3.4
  np.testing.assert_array_equal(_fill(diamond), inside)


def test_points_far_off_the_image_are_clipped_not_overflowed():
  """A vertex at 1e300 mm (finite, absurd): the polygon is filled within
  the image, no overflow (a warning would be an error here)."""
  far = _fill([(2, 2), (2, 1e300), (6, 2)])
  assert far[2:7, 2].all() and far[3:6, 2:].any()
  assert not far[:2].any() and not far[7:].any()


def test_holes_traced_through_the_objects_pixels():
  """OpenCV (rt-utils) traces a hole along the object's pixels around it:
  those pixels stay in, the hole's go out; a hole drawn on edges too."""
  expected = np.zeros((12, 12), bool)
  expected[1:10, 1:10] = True
  expected[4:7, 4:7] = False
  np.testing.assert_array_equal(
      _fill(_square(1, 9), [(3, 3), (3, 7), (7, 7), (7, 3)][::-1]), expected
  )
  np.testing.assert_array_equal(
      _fill(_square(0.5, 9.5), _square(3.5, 6.5)), expected
  )


def test_one_and_two_point_contours_are_a_pixel_and_a_line():
  expected = np.zeros((12, 12), bool)
  expected[3, 5] = True
  np.testing.assert_array_equal(_fill([(3, 5)]), expected)
  expected[:] = False
  expected[2, 1:8] = True
  np.testing.assert_array_equal(_fill([(2, 1), (2, 7)]), expected)
  expected[:] = False
  expected[np.arange(1, 6), np.arange(1, 6)] = True  # a diagonal line
  np.testing.assert_array_equal(_fill([(1, 1), (5, 5)]), expected)


class _Raw:
  """A contour item whose ContourData is still raw bytes (what pydicom
  holds before converting a value, e.g. one read as VR UN)."""

  def __init__(self, value: bytes):
    self.value = value

  def __contains__(self, tag):
    return tag == rasterize.CONTOUR_DATA

  def get_item(self, tag):
    return self


def test_contour_values_read_from_bytes_and_bounded():
  """ContourData over 64 KB in an explicit-VR file comes back as VR UN
  bytes: read as its numbers. Values are counted before they are parsed;
  NaN, inf and text are errors naming the value."""
  np.testing.assert_array_equal(
      rasterize.contour_values(_Raw(b"1.5\\-2\\3e1 "), 99, "f"), [1.5, -2, 30]
  )
  with pytest.raises(series.DicomError, match="more than a slice"):
    rasterize.contour_values(_Raw(b"1\\2\\3"), 2, "f")
  for bad in (b"1\\nan\\3", b"1\\inf\\3", b"1\\x\\3"):
    with pytest.raises(
        series.DicomError, match="ContourData value '(nan|inf|x)'"
    ):
      rasterize.contour_values(_Raw(bad), 99, "f: ROI 'PTV'")


def _dense(points: np.ndarray, n: int) -> np.ndarray:
  """The same closed polygon with n points (vertices kept, edges divided)."""
  closed = np.concatenate([points, points[:1]])
  seg = np.linalg.norm(np.diff(closed, axis=0), axis=1)
  t = np.concatenate([[0], np.cumsum(seg)])
  s = np.unique(np.concatenate([t[:-1], np.linspace(0, t[-1], n)[:-1]]))
  s = s[:n] if len(s) > n else s
  return np.stack([np.interp(s, t, closed[:, a]) for a in range(3)], 1)


def _ptv70(folder) -> int:
  patient = openkbp.load_patient(folder)
  return int(
      patient.structure_masks[..., openkbp.ROI_NAMES.index("PTV70")].sum()
  )


def test_a_contour_of_10000_points_is_read(tmp_path):
  """Every PTV_7000 contour as 10,000 points (the same polygon): explicit
  VR writes them as UN; the import gives the PTV70 of the 72-point one."""
  src = tmp_path / "dicom"
  record = synthetic.write_patient(src, shape=(20, 48, 48), with_plan=False)
  common = dict(shape=(24, 24, 16), spacing=(3.0, 3.0, 3.0), progress=False)
  from randose_jax.dicom import importer

  importer.import_folder(src, tmp_path / "before", **common)
  ds = pydicom.dcmread(record["rtstruct"])
  number = next(
      r.ROINumber for r in ds.StructureSetROISequence if r.ROIName == "PTV_7000"
  )
  roi = next(
      c for c in ds.ROIContourSequence if c.ReferencedROINumber == number
  )
  for c in roi.ContourSequence:
    points = np.asarray(c.ContourData, np.float64).reshape(-1, 3)
    dense = _dense(points, 10_000)
    c.NumberOfContourPoints = len(dense)
    c.ContourData = [f"{v:.4f}" for v in dense.ravel()]
  with pytest.warns(UserWarning, match="exceeds the size of 64 kByte"):
    ds.save_as(record["rtstruct"])
  raw = pydicom.dcmread(record["rtstruct"])
  first = raw.ROIContourSequence[number - 1].ContourSequence[0]
  assert first.get_item(rasterize.CONTOUR_DATA).VR == "UN"
  importer.import_folder(src, tmp_path / "after", **common)
  before = _ptv70(tmp_path / "before" / "pt_SYN001")
  after = _ptv70(tmp_path / "after" / "pt_SYN001")
  assert before > 50 and after == before, (before, after)


# ------------------------------------------------ bad input stays safe


def _one_patient(tmp_path):
  src = tmp_path / "dicom"
  record = synthetic.write_patient(
      src, shape=(30, 40, 40), with_plan=False, with_dose=False
  )
  return src, record


def _import_rows(src, out):
  from randose_jax.dicom import importer

  return importer.import_folder(
      src, out, shape=(24, 24, 30), spacing=(4.0, 4.0, 3.0), progress=False
  )


def _roi(ds, name):
  number = next(
      r.ROINumber for r in ds.StructureSetROISequence if r.ROIName == name
  )
  return (
      next(r for r in ds.StructureSetROISequence if r.ROINumber == number),
      next(c for c in ds.ROIContourSequence if c.ReferencedROINumber == number),
  )


def _edge(kind, ds):
  """Writers' edge cases, each on one structure (the Brainstem)."""
  roi, contours = _roi(ds, "Brainstem")
  if kind == "empty contour sequence":
    contours.ContourSequence = pydicom.Sequence([])
    return "Brainstem: no contours (empty ROI); skipped"
  if kind == "contour on no CT slice":
    for c in contours.ContourSequence:
      data = np.asarray(c.ContourData, np.float64).reshape(-1, 3)
      data[:, 2] += 1000
      c.ContourData = [float(v) for v in data.ravel()]
    n = len(contours.ContourSequence)
    return f"Brainstem: {n} contour(s) skipped (outside the CT's slices)"
  if kind == "contour between CT slices":
    for c in contours.ContourSequence:
      data = np.asarray(c.ContourData, np.float64).reshape(-1, 3)
      data[:, 2] += 1.5  # half a slice
      c.ContourData = [float(v) for v in data.ravel()]
    n = len(contours.ContourSequence)
    return f"Brainstem: {n} contour(s) skipped (between the CT's slices)"
  if kind == "duplicate ROI names":
    other, _ = _roi(ds, "Parotid_L")
    other.ROIName = "Brainstem"
    return "Brainstem: 2 ROIs of this name"
  roi.ReferencedFrameOfReferenceUID = "1.2.826.0.1.3680043.2.1125.42"
  return "Brainstem: drawn in another frame of reference"


EDGES = (
    "empty contour sequence",
    "contour on no CT slice",
    "contour between CT slices",
    "duplicate ROI names",
    "another frame of reference",
)


@pytest.mark.parametrize("kind", EDGES)
def test_writers_edge_cases_are_one_warning(kind, tmp_path):
  src, record = _one_patient(tmp_path)
  ds = pydicom.dcmread(record["rtstruct"])
  expected = _edge(kind, ds)
  ds.save_as(record["rtstruct"])
  (row,) = _import_rows(src, tmp_path / "out")
  found = [w for w in row["warnings"] if w.startswith(expected)]
  assert len(found) == 1, row["warnings"]
  other = [w for w in row["warnings"] if w.startswith("Brainstem")]
  assert other == found, row["warnings"]
  mapped = row["mapped"].get("Brainstem")
  if kind == "duplicate ROI names":  # both combined
    assert mapped == ["Brainstem", "Brainstem"]
  else:
    assert mapped is None


# A contour of 10 million points: refused in bounded memory and time.
_HUGE = b"100.0\\100.0\\12.5\\" * 10_000_000


def huge_contour(rtstruct: Path, implicit: bool = False) -> Path:
  """The first contour of the RTSTRUCT given 10 million points (written as
  raw bytes: VR UN in explicit VR, a plain value in implicit VR)."""
  ds = pydicom.dcmread(rtstruct)
  c = ds.ROIContourSequence[0].ContourSequence[0]
  c.add_new(rasterize.CONTOUR_DATA, "UN", _HUGE)
  if implicit:
    ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
  ds.save_as(rtstruct, enforce_file_format=True)
  return rtstruct


_MEASURE = """
import resource, subprocess, sys, time
t = time.perf_counter()
done = subprocess.run(
    [sys.executable, "-m", "randose_jax.cli.dicom_import", *sys.argv[1:]],
    capture_output=True, text=True)
print(done.returncode, time.perf_counter() - t,
      resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
sys.stderr.write(done.stderr)
"""


def huge_image(slices: list, implicit: bool = False) -> Path:
  """Rows = Columns = 60000 on every CT slice (402 GiB as float32); returns
  the slice the scan meets first (sorted paths), which the error names."""
  import warnings

  for path in slices:
    ds = pydicom.dcmread(path)
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      ds.Rows = ds.Columns = 60000
      if implicit:
        ds.file_meta.TransferSyntaxUID = pydicom.uid.ImplicitVRLittleEndian
      ds.save_as(path, enforce_file_format=True)
  return sorted(slices)[0]


@pytest.mark.parametrize(
    "implicit", [False, True], ids=["explicit", "implicit"]
)
@pytest.mark.parametrize("kind", ["contour", "image"])
def test_huge_input_is_refused_in_bounded_memory(kind, implicit, tmp_path):
  """A 10-million-point contour, or CT slices of 60000 x 60000: one error
  line naming the file, exit 2, nothing written, under 1 GiB peak (the
  import's process, `ru_maxrss` of a child; the time is printed, not
  asserted)."""
  src, record = _one_patient(tmp_path)
  if kind == "contour":
    named = huge_contour(record["rtstruct"], implicit)
    what = "10,000,000 points"
  else:
    named = huge_image(record["ct_files"], implicit)
    what = "Rows is 60000"
  done = subprocess.run(
      [
          sys.executable,
          "-c",
          _MEASURE,
          f"--input={src}",
          f"--output={tmp_path / 'out'}",
          "--progress=false",
      ],
      capture_output=True,
      text=True,
      env=SUBPROCESS_ENV,
      timeout=120,
      check=True,
  )
  code, seconds, max_rss_kib = done.stdout.split()
  lines = done.stderr.strip().splitlines()
  assert code == "2" and len(lines) == 1, done.stderr
  assert lines[0].startswith("error: ") and str(named) in lines[0], lines
  assert what in lines[0], lines
  assert int(max_rss_kib) < 1024**2, max_rss_kib  # under 1 GiB peak
  print(
      f"{kind} refused in {float(seconds):.1f} s, peak "
      f"{int(max_rss_kib) / 1024:.0f} MiB"
  )
  assert not (tmp_path / "out").exists()


# ------------------------------------------------- the interop matrix


def _worst(rows: dict) -> tuple[float, float, str]:
  """(min Dice, max |volume ratio - 1|, where) over structures >= MIN_CC."""
  dice, err, where = 2.0, 0.0, ""
  for name, r in rows.items():
    if r["cc"] >= MIN_CC:
      if r["dice"] < dice:
        dice, where = r["dice"], name
      err = max(err, abs(r["volume_ratio"] - 1))
  return dice, err, where


def _skip_unless(library):
  why = interop.available(library)
  if why:
    pytest.skip(why)


# rt-utils 1.2.7 sets these on the data sets it writes (its own code).
RT_UTILS_WARNINGS = (
    "ignore:'FileDataset.is_little_endian':DeprecationWarning",
    "ignore:'FileDataset.is_implicit_VR':DeprecationWarning",
)


@pytest.mark.filterwarnings(*RT_UTILS_WARNINGS)
@pytest.mark.parametrize(
    "writer,index", [("rt_utils", 0), ("rt_utils", 13), ("platipy", 5)]
)
def test_mask_exporters_on_openkbp_patients(
    writer, index, shared_openkbp, tmp_path
):
  """An OpenKBP patient written by rt-utils or platipy (contours through
  pixel centres, one-point islands and one-pixel-wide lines included) comes
  back: Dice >= 0.97 and volume within 3 % for every structure of 5 cc or
  more (all of them exact here), as rt-utils' own reader gives it back."""
  _skip_unless("rt_utils")
  _skip_unless(writer)
  dirs = openkbp.list_patient_dirs(shared_openkbp / "train-pats")
  result = interop.openkbp_case(
      dirs[index], tmp_path, readers=["rt_utils"], writer=writer
  )
  for who in ("dicom_import", "rt_utils"):
    dice, err, where = _worst(result[who])
    assert dice >= 0.97 and err <= 0.03, (who, where, result[who])
  assert all(r["dice"] == 1.0 for r in result["dicom_import"].values()), result


def test_synthetic_writer_against_the_truth(tmp_path):
  """The project's writer (free-form contours): against the phantom."""
  result = interop.synthetic_case(tmp_path)
  dice, err, where = _worst(result["dicom_import"])
  assert dice >= 0.97 and err <= 0.03, (where, result["dicom_import"])
  assert len(result["dicom_import"]) == 8  # SpinalCord_PRV is not mapped


@pytest.mark.parametrize("on_centres", [True, False], ids=["centres", "edges"])
def test_pydicom_rtstruct_against_dcmrtstruct2nii(on_centres, tmp_path):
  """pydicom's test RTSTRUCT (a rectangle, no original): `rasterize` gives
  what dcmrtstruct2nii does, its edges through pixel centres or between."""
  _skip_unless("dcmrtstruct2nii")
  result = interop.pydicom_case(
      tmp_path, ["dcmrtstruct2nii"], on_centres=on_centres
  )
  r = result["dcmrtstruct2nii"]["patient"]
  assert r["dice"] == 1.0 and r["volume_ratio"] == 1.0, r


def test_pydicom_test_files_import_or_fail_with_one_line(tmp_path, capfd):
  """pydicom's rtstruct.dcm, rtdose.dcm and rtplan.dcm (bare data sets, no
  preamble): alone, one `error:` line naming the file or the folder and why;
  the RTSTRUCT on a CT made for it imports (its 'patient' ROI as the PTV,
  the two POINT ROIs warned about)."""
  import shutil

  from pydicom.data import get_testdata_file

  from tests.test_dicom_import import _run_cli

  expected = {
      "rtstruct.dcm": "holds no CT images",
      "rtdose.dcm": "RTDOSE rtdose.dcm",
      "rtplan.dcm": "RTPLAN rtplan.dcm",
  }
  for name, why in expected.items():
    src = tmp_path / name.split(".")[0]
    src.mkdir()
    shutil.copyfile(get_testdata_file(name), src / name)
    code, _, err = _run_cli(
        [f"--input={src}", f"--output={tmp_path / 'out'}"], capfd
    )
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ")
    assert why in lines[0] and str(src) in lines[0], err
  # With a CT made for it (and pydicom's RT Dose and RT Plan beside it,
  # of other patients: not paired).
  work = tmp_path / "with-ct"
  interop.pydicom_case(work, [])
  for name in expected:
    shutil.copyfile(get_testdata_file(name), work / "ct" / name)
  roi_map = tmp_path / "roi_map.json"
  roi_map.write_text(json.dumps({"patient": "PTV70"}))
  code, out, err = _run_cli(
      [
          f"--input={work / 'ct'}",
          f"--output={tmp_path / 'out'}",
          f"--roi_map={roi_map}",
          "--grid_shape=64,64,8",
          "--spacing=8,8,10",
      ],
      capfd,
  )
  assert code == 0, err
  assert "POINT" in out, out
  patient = openkbp.load_patient(tmp_path / "out" / "pt_tPhantom30sep")
  assert patient.roi_present[openkbp.ROI_NAMES.index("PTV70")]
  assert patient.dose is None
