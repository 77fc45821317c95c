"""OpenKBP patients exported as DICOM by other writers, and RTSTRUCTs read by
other readers: the interoperability checks of `tests/test_dicom_interop.py`
and `benchmarks/dicom_interop.py`.

Writers (each an RTSTRUCT from a patient's masks, on a CT series that
`synthetic.write_openkbp_ct` writes as a clinic would: head-first supine,
random file names): rt-utils' `RTStructBuilder` (contours through the
centres of the boundary pixels, OpenCV's `findContours`; platipy's
`convert_nifti` is the same writer). Readers: rt-utils' own
(`RTStructBuilder.create_from`: OpenCV's `fillPoly` on the rounded vertices,
edges included), dcmrtstruct2nii's (scikit-image's `polygon2mask`, XOR per
contour) and platipy's (vertices rounded to the nearest pixel, scikit-image's
`polygon`, XOR), each as installed: a missing library is reported, never
installed here. rt-utils, dcmrtstruct2nii and platipy are not dependencies
of the project; platipy pins pydicom < 3 and runs from its own virtual
environment (`LEGACY_PYTHON`) when there is one.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np

from randose_jax.conventions import ROI_NAMES

# OpenKBP ROI -> the name a clinic's RTSTRUCT gives it (the importer's
# default table maps each back).
CLINIC_NAMES = {
    "Brainstem": "BrainStem",
    "SpinalCord": "SpinalCord",
    "RightParotid": "Parotid_R",
    "LeftParotid": "Parotid_L",
    "Esophagus": "Esophagus",
    "Larynx": "Larynx",
    "Mandible": "Mandible",
    "PTV56": "PTV_56",
    "PTV63": "PTV_63",
    "PTV70": "PTV_70",
}
BODY_NAME = "External"
# A python with pydicom < 3, for dcmrtstruct2nii (pydicom.read_file) and
# platipy (pins pydicom < 3), if any.
LEGACY_PYTHON = os.environ.get(
    "RANDOSE_LEGACY_PYTHON", "/tmp/platipy-venv/bin/python"
)


def available(library: str) -> str | None:
  """None when `library` (rt_utils, dcmrtstruct2nii, platipy) can be used,
  else why not."""
  if library in ("platipy", "dcmrtstruct2nii"):
    if not Path(LEGACY_PYTHON).exists():
      return f"no python with pydicom < 3 at {LEGACY_PYTHON}"
    module = {
        "platipy": "platipy.dicom.io.rtstruct_to_nifti",
        "dcmrtstruct2nii": "dcmrtstruct2nii",
    }[library]
    done = subprocess.run(
        [LEGACY_PYTHON, "-c", f"import {module}"],
        capture_output=True,
        text=True,
        check=False,
    )
    return None if done.returncode == 0 else f"{library} does not import"
  try:
    __import__(library)
  except Exception as e:  # pylint: disable=broad-except
    return f"{library} not installed ({type(e).__name__})"
  return None


def patient_masks(patient) -> dict[str, np.ndarray]:
  """Clinic name -> bool mask (OpenKBP grid) of every ROI the patient has,
  plus the body (`BODY_NAME`: the possible-dose mask)."""
  masks = {
      CLINIC_NAMES[name]: patient.structure_masks[..., c]
      for c, name in enumerate(ROI_NAMES)
      if patient.roi_present[c]
  }
  masks[BODY_NAME] = patient.possible_dose_mask
  return masks


def write_rt_utils(ct_dir, masks_stored: dict, path) -> Path:
  """An RTSTRUCT by rt-utils from stored-layout masks (slice, row, column;
  slices in position order), saved at `path`."""
  import logging

  from rt_utils import RTStructBuilder

  logging.getLogger().setLevel(logging.WARNING)
  rtstruct = RTStructBuilder.create_new(dicom_series_path=str(ct_dir))
  for name, mask in masks_stored.items():
    if mask.any():
      rtstruct.add_roi(mask=np.transpose(mask, (1, 2, 0)), name=name)
  rtstruct.save(str(path))
  return Path(path)


def read_rt_utils(ct_dir, rtstruct_path) -> dict[str, np.ndarray]:
  """rt-utils' reader: name -> stored-layout bool mask."""
  from rt_utils import RTStructBuilder

  rt = RTStructBuilder.create_from(
      dicom_series_path=str(ct_dir), rt_struct_path=str(rtstruct_path)
  )
  out = {}
  for name in rt.get_roi_names():
    try:
      out[name] = np.transpose(rt.get_roi_mask_by_name(name), (2, 0, 1))
    except AttributeError:  # an ROI without ContourSequence: it fails
      continue
  return out


_LEGACY_SCRIPT = """
import logging, sys
from pathlib import Path
import numpy as np, pydicom, SimpleITK as sitk
logging.disable(logging.WARNING)
reader, ct_dir, rtstruct, out = sys.argv[1:]
masks = {}
if reader == "write_platipy":  # rtstruct: the masks (npz), out: the RTSTRUCT
  from platipy.dicom.io.nifti_to_rtstruct import convert_nifti
  image = sitk.ReadImage(sitk.ImageSeriesReader.GetGDCMSeriesFileNames(ct_dir))
  with np.load(rtstruct) as data:
    for name in data.files:
      masks[name] = sitk.GetImageFromArray(data[name].astype(np.uint8))
      masks[name].CopyInformation(image)
  convert_nifti(ct_dir, masks, out)
  sys.exit(0)
if reader == "platipy":
  from platipy.dicom.io import rtstruct_to_nifti as r
  image = r.read_dicom_image(ct_dir)
  found, names = r.transform_point_set_from_dicom_struct(
      image, pydicom.dcmread(rtstruct))
  masks = {n: sitk.GetArrayFromImage(m) > 0 for m, n in zip(found, names)}
else:
  from dcmrtstruct2nii import dcmrtstruct2nii, list_rt_structs
  work = Path(out).parent / "d2n"
  dcmrtstruct2nii(rtstruct, ct_dir, str(work), convert_original_dicom=False)
  for name in list_rt_structs(rtstruct):
    f = work / ("mask_" + name.replace(" ", "-") + ".nii.gz")
    if f.exists():
      masks[name] = sitk.GetArrayFromImage(sitk.ReadImage(str(f))) > 0
np.savez_compressed(out, **masks)
"""


def write_platipy(ct_dir, masks_stored: dict, path, work) -> Path:
  """An RTSTRUCT by platipy's `convert_nifti` (in `LEGACY_PYTHON`) from
  stored-layout masks, saved at `path`."""
  masks = Path(work) / "platipy_masks.npz"
  masks.parent.mkdir(parents=True, exist_ok=True)
  np.savez_compressed(
      masks, **{k: v for k, v in masks_stored.items() if v.any()}
  )
  _legacy("write_platipy", ct_dir, masks, path)
  return Path(path)


def _legacy(*args) -> None:
  subprocess.run(
      [LEGACY_PYTHON, "-c", _LEGACY_SCRIPT, *map(str, args)],
      check=True,
      capture_output=True,
      env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"},
  )


def read_legacy(reader: str, ct_dir, rtstruct_path, work) -> dict:
  """dcmrtstruct2nii's or platipy's reader (both need pydicom < 3: run in
  `LEGACY_PYTHON`): name -> stored-layout bool mask (SimpleITK's array
  order is (slice, row, column) already; platipy writes spaces as '_')."""
  out = Path(work) / f"{reader}.npz"
  out.parent.mkdir(parents=True, exist_ok=True)
  _legacy(reader, ct_dir, rtstruct_path, out)
  with np.load(out) as data:
    return {k: data[k] for k in data.files}


def imported_masks(output_dir) -> dict:
  """OpenKBP ROI -> stored-layout bool mask of `dicom_import`'s output (one
  patient folder under `output_dir`), placed on the CT's grid through its
  `dicom_geometry.json` (the import grid must share the CT's spacing: the
  box lies on the CT's lattice then; the CT head-first supine)."""
  from randose_jax.data import openkbp
  from randose_jax.dicom import synthetic

  (folder,) = openkbp.list_patient_dirs(output_dir)
  info = json.loads((folder / "dicom_geometry.json").read_text())
  patient = openkbp.load_patient(folder)
  ct = info["ct_grid"]
  # Canonical axis start of both grids (the project's axes).
  from randose_jax.conventions import AXIS_DIRECTIONS_LPS

  spacing = np.asarray(info["voxel_dimensions"])
  ct_start = AXIS_DIRECTIONS_LPS @ np.asarray(ct["origin_lps_mm"])
  box_start = AXIS_DIRECTIONS_LPS @ np.asarray(info["origin_lps_mm"])
  shift = (box_start - ct_start) / spacing
  assert np.allclose(shift, np.rint(shift), atol=1e-3), shift
  shift = np.rint(shift).astype(int)
  canon_shape = np.asarray(ct["shape"])
  out = {}
  masks = {
      name: patient.structure_masks[..., c]
      for c, name in enumerate(ROI_NAMES)
      if patient.roi_present[c]
  }
  masks[BODY_NAME] = patient.possible_dose_mask
  for name, mask in masks.items():
    full = np.zeros(tuple(canon_shape), bool)
    src = [
        slice(max(0, -s), min(m, n - s))
        for s, m, n in zip(shift, mask.shape, canon_shape)
    ]
    dst = [
        slice(max(0, s), max(0, s) + (r.stop - r.start))
        for s, r in zip(shift, src)
    ]
    full[tuple(dst)] = mask[tuple(src)]
    out[name] = synthetic.hfs_stored(full)  # an HFS CT's stored layout
  return out


def compare(reference: np.ndarray, other: np.ndarray, voxel_cc: float):
  """{'cc': reference volume, 'dice', 'volume_ratio'} of two bool masks."""
  a, b = reference.sum(), other.sum()
  inter = np.count_nonzero(reference & other)
  return {
      "cc": round(float(a * voxel_cc), 2),
      "dice": round(float(2 * inter / max(a + b, 1)), 4),
      "volume_ratio": round(float(b / max(a, 1)), 4),
  }


def compare_all(reference: dict, results: dict, voxel_cc: float) -> dict:
  """{who: {structure: compare()}} of each {who: {structure: mask}} against
  the `reference` masks of the same names."""
  return {
      who: {
          name: compare(reference[name], got[name], voxel_cc)
          for name in reference
          if name in got
      }
      for who, got in results.items()
  }


def _read(reader, ct_dir, rtstruct, work):
  if reader == "rt_utils":
    return read_rt_utils(ct_dir, rtstruct)
  return read_legacy(reader, ct_dir, rtstruct, Path(work) / reader)


def _flat_copy(files, folder: Path) -> Path:
  """The CT slices copied into one folder (rt-utils and dcmrtstruct2nii read
  a folder holding the series only)."""
  import shutil

  folder.mkdir(parents=True)
  for k, f in enumerate(files):
    shutil.copyfile(f, folder / f"{k:04d}.dcm")
  return folder


def _import_on_ct(src: Path, out: Path, spacing, shape) -> dict:
  from randose_jax.dicom import importer

  rows = importer.import_folder(
      src, out, spacing=tuple(spacing), shape=tuple(shape), progress="off"
  )
  return rows[0]


def openkbp_case(patient_dir, work, readers=(), writer="rt_utils") -> dict:
  """An OpenKBP patient written by rt-utils (or platipy: `writer`; clinic
  names, the possible-dose mask as External) and imported on the CT's own
  spacing; each reader reads
  the same files. Returns {'dicom_import' or reader: {structure: compare()}},
  all against the original masks."""
  from randose_jax.data import openkbp
  from randose_jax.dicom import synthetic

  work = Path(work)
  patient = openkbp.load_patient(patient_dir)
  src = work / "dicom"
  info = synthetic.write_openkbp_ct(src / "ct", patient, seed=0)
  flat = _flat_copy(info["ct_files"], work / "ct_flat")
  originals = {
      name: synthetic.hfs_stored(mask)
      for name, mask in patient_masks(patient).items()
  }
  if writer == "platipy":
    rtstruct = write_platipy(flat, originals, src / "rtstruct.dcm", work)
  else:
    rtstruct = write_rt_utils(flat, originals, src / "rtstruct.dcm")
  voxel_cc = float(np.prod(patient.voxel_dimensions)) / 1000
  # A box 16 voxels longer than the CT on each axis holds all of it: what is
  # compared is the rasterising, not where the box is placed.
  _import_on_ct(
      src,
      work / "out",
      patient.voxel_dimensions,
      [n + 16 for n in patient.ct.shape],
  )
  ours = {
      CLINIC_NAMES.get(k, k): v for k, v in imported_masks(work / "out").items()
  }
  results = {"dicom_import": ours}
  for reader in readers:
    results[reader] = _read(reader, flat, rtstruct, work)
  return compare_all(originals, results, voxel_cc)


# The synthetic writer's CT: slices, rows, columns; mm.
SYNTHETIC_SHAPE, SYNTHETIC_SPACING = (48, 96, 96), (2.5, 2.0, 2.0)


def synthetic_case(work, readers=()) -> dict:
  """The project's synthetic writer (`synthetic.write_patient`: contours of
  72 points drawn freely, HFS) imported on the CT's own grid, against the
  phantom's cross-section at each pixel centre (the truth); each reader reads
  the same files. Returns {who: {structure: compare()}}."""
  from randose_jax.dicom import synthetic

  work = Path(work)
  record = synthetic.write_patient(
      work / "dicom",
      shape=SYNTHETIC_SHAPE,
      spacing=SYNTHETIC_SPACING,
      with_plan=False,
      with_dose=False,
  )
  phantom = record["phantom"]
  row, col, _, ipp = synthetic.ct_positions(
      phantom, "HFS", SYNTHETIC_SHAPE, SYNTHETIC_SPACING
  )
  r, c = np.meshgrid(
      np.arange(SYNTHETIC_SHAPE[1]),
      np.arange(SYNTHETIC_SHAPE[2]),
      indexing="ij",
  )
  points = (
      ipp[:, None, None, :]
      + (r[..., None] * SYNTHETIC_SPACING[1]) * col
      + (c[..., None] * SYNTHETIC_SPACING[2]) * row
  ).reshape(-1, 3)
  truth = {
      s.name: phantom.inside(s.name, points, ipp[:, 2]).reshape(SYNTHETIC_SHAPE)
      for s in phantom.shapes
  }
  row_out = _import_on_ct(
      work / "dicom",
      work / "out",
      np.asarray(SYNTHETIC_SPACING)[[1, 2, 0]],
      np.asarray(SYNTHETIC_SHAPE)[[1, 2, 0]],
  )
  imported = imported_masks(work / "out")
  ours = {BODY_NAME: imported.pop(BODY_NAME)}
  for target, names in row_out["mapped"].items():
    if len(names) == 1 and target in imported:
      ours[names[0]] = imported[target]
  results = {"dicom_import": ours}
  flat = _flat_copy(record["ct_files"], work / "ct_flat")
  for reader in readers:
    got = _read(reader, flat, record["rtstruct"], work)
    results[reader] = {k.replace("_", " "): v for k, v in got.items()} | got
  voxel_cc = float(np.prod(SYNTHETIC_SPACING)) / 1000
  return compare_all(truth, results, voxel_cc)


def pydicom_case(work, readers=(), on_centres=True) -> dict:
  """pydicom's own test RTSTRUCT (rtstruct.dcm: a 400 x 300 mm rectangle on
  three slices, two POINT ROIs) on a CT made for it (its series UID; 2 mm
  pixels whose centres the rectangle's edges pass through, or halfway
  between them when not `on_centres`): `rasterize` against each reader
  (there is no original). Returns {reader: {'patient': compare()}}."""
  import pydicom
  from pydicom.data import get_testdata_file

  from randose_jax.dicom import rasterize, series, synthetic

  work = Path(work)
  path = get_testdata_file("rtstruct.dcm")
  ss = pydicom.dcmread(path, force=True)
  frame = ss.ReferencedFrameOfReferenceSequence[0]
  series_uid = (
      frame.RTReferencedStudySequence[0]
      .RTReferencedSeriesSequence[0]
      .SeriesInstanceUID
  )
  shape, spacing = (5, 180, 220), (10.0, 2.0, 2.0)
  ids = {
      "patient_id": str(ss.PatientID),
      "patient_name": str(ss.PatientName),
      "study": str(ss.StudyInstanceUID),
      "frame": str(frame.FrameOfReferenceUID),
  }
  shift = 0.0 if on_centres else 1.0
  first = np.array([-220.0 + shift, -180.0 + shift, -210.0])
  ipp = first + np.arange(shape[0])[:, None] * np.array([0, 0, spacing[0]])
  ct_dir = work / "ct"
  files, _ = synthetic.write_ct_series(
      ct_dir,
      lambda k: np.zeros(shape[1:]),
      ids=ids,
      series_uid=str(series_uid),
      orientation="HFS",
      ipp=ipp,
      spacing=spacing,
      shape=shape,
      rng=np.random.default_rng(0),
  )
  flat = _flat_copy(files, work / "ct_flat")
  rtstruct = work / "rtstruct.dcm"
  ss.save_as(rtstruct, enforce_file_format=True)
  grid = series.StoredGrid(
      shape, np.eye(3)[[2, 1, 0]], np.array(spacing), first
  )
  roi = ss.ROIContourSequence[0]
  polygons, _ = rasterize.contour_polygons(roi, grid, "patient", path)
  stored = rasterize.rasterize(polygons, grid)
  ours = np.zeros(shape, bool)
  lo, hi = stored.start, stored.stop
  ours[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]] = stored.mask
  voxel_cc = float(np.prod(spacing)) / 1000
  out = {}
  for reader in readers:
    got = _read(reader, flat, rtstruct, work)
    out[reader] = {"patient": compare(got["patient"], ours, voxel_cc)}
  return out
