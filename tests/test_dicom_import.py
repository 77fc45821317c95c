"""randose_jax.cli.dicom_import on synthetic DICOM made here (randose_jax.dicom.synthetic):
geometry in four patient positions, structures (holes, several contours per
slice), CT and dose values, ROI names, the way back to an RT Dose in the
patient's frame, and bad inputs (one error line naming the file, nothing
written)."""

from __future__ import annotations

import json
from pathlib import Path

from absl import flags
import numpy as np
import pydicom
import pytest

from randose_jax.cli import dicom_import
from randose_jax import formats
from randose_jax.conventions import AXIS_DIRECTIONS_LPS, CT_OFFSET
from randose_jax.data import openkbp
from randose_jax.dicom import DicomError, geometry, importer, rasterize, roi_names, series, synthetic
from tests import stand_ins
from tests import helpers

CROP = (48, 48, 32)
SPACING = importer.DEFAULT_SPACING
# orientation -> CT (slices, rows, columns) and spacing (slice, row, column) mm
CASES = {
    "HFS": ((30, 128, 128), (3.0, 1.25, 1.25)),
    "FFS": ((36, 120, 140), (2.5, 1.3, 1.15)),
    "HFP": ((45, 128, 128), (2.0, 1.25, 1.25)),
    "FFP": ((30, 110, 110), (3.0, 1.5, 1.5)),
}
TRUE_NAMES = {
    "Brainstem": "Brainstem",
    "SpinalCord": "Cord",
    "RightParotid": "PAROTID RT",
    "LeftParotid": "Parotid_L",
    "Mandible": "Mandible",
    "PTV56": "PTV 56Gy",
    "PTV70": "PTV_7000",
}


def _import(src, out, **kwargs):
  kwargs.setdefault("shape", CROP)
  kwargs.setdefault("spacing", SPACING)
  return importer.import_folder(src, out, progress=False, **kwargs)


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request, tmp_path_factory):
  """(orientation, synthetic patient record, imported patient folder)."""
  orientation = request.param
  shape, spacing = CASES[orientation]
  tmp = tmp_path_factory.mktemp(orientation)
  record = synthetic.write_patient(
      tmp / "dicom",
      orientation=orientation,
      shape=shape,
      spacing=spacing,
      seed=len(orientation) + shape[0],
  )
  rows = _import(tmp / "dicom", tmp / "out")
  assert [r["patient"] for r in rows] == ["pt_SYN001"]
  return orientation, record, tmp / "out" / "pt_SYN001", rows[0]


def _centres(info, sub: int = 1) -> np.ndarray:
  """LPS of the import grid's voxel centres (sub=1), or sub^3 points per
  voxel spread over it: (D*H*W*sub^3, 3)."""
  shape = info["grid_shape"]
  spacing = np.asarray(info["voxel_dimensions"])
  offsets = (np.arange(sub) + 0.5) / sub - 0.5
  sub_idx = np.stack(
      np.meshgrid(offsets, offsets, offsets, indexing="ij"), -1
  ).reshape(-1, 3)
  idx = np.indices(shape).reshape(3, -1).T.astype(np.float64)
  points = (idx[:, None, :] + sub_idx[None]).reshape(-1, 3)
  return (
      np.asarray(info["origin_lps_mm"])
      + (points * spacing) @ AXIS_DIRECTIONS_LPS
  )


def _slice_z(record) -> np.ndarray:
  return np.array(
      [
          float(
              pydicom.dcmread(p, stop_before_pixels=True).ImagePositionPatient[
                  2
              ]
          )
          for p in record["ct_files"]
      ]
  )


def _truth_masks(record, info, sub: int = 5):
  """Occupancy >= 0.5 (sub^3 points per voxel, odd: no ties) of the
  structures as their contours define them (the analytic cross-section at
  the nearest CT slice), computed in a box around each structure."""
  shape = tuple(info["grid_shape"])
  spacing = np.asarray(info["voxel_dimensions"])
  origin = np.asarray(info["origin_lps_mm"])
  offsets = (np.arange(sub) + 0.5) / sub - 0.5
  sub_idx = np.stack(
      np.meshgrid(offsets, offsets, offsets, indexing="ij"), -1
  ).reshape(-1, 3)
  slice_z = _slice_z(record)
  phantom = record["phantom"]
  out = {}
  for roi, name in TRUE_NAMES.items():
    s = phantom.shape(name)
    size = np.minimum(np.asarray(s.size[:2] + (s.size[2],), float), 1e3)
    if s.kind == "annulus":
      size = np.array([s.size[0], s.size[0], s.size[2]])
    lo_lps = phantom.centre + s.centre - size - 5
    hi_lps = phantom.centre + s.centre + size + 5
    corners = np.array(
        [
            [x, y, z]
            for x in (lo_lps[0], hi_lps[0])
            for y in (lo_lps[1], hi_lps[1])
            for z in (lo_lps[2], hi_lps[2])
        ]
    )
    index = ((corners - origin) @ AXIS_DIRECTIONS_LPS.T) / spacing
    lo = np.clip(np.floor(index.min(0)).astype(int), 0, shape)
    hi = np.clip(np.ceil(index.max(0)).astype(int) + 1, 0, shape)
    idx = np.stack(
        np.meshgrid(*[np.arange(l, h) for l, h in zip(lo, hi)], indexing="ij"),
        -1,
    ).reshape(-1, 3)
    points = (
        origin
        + ((idx[:, None, :] + sub_idx[None]).reshape(-1, 3) * spacing)
        @ AXIS_DIRECTIONS_LPS
    )
    occ = phantom.inside(name, points, slice_z).reshape(len(idx), -1).mean(-1)
    mask = np.zeros(shape, bool)
    mask[tuple(idx[occ >= 0.5].T)] = True
    out[roi] = mask
  return out


def _dice(a, b):
  return (
      2 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))
  )


def test_structures_match_the_truth(case):
  orientation, record, folder, summary = case
  patient = openkbp.load_patient(folder)
  info = json.loads((folder / geometry.GEOMETRY_FILE).read_text())
  truth = _truth_masks(record, info)
  voxel_cc = np.prod(patient.voxel_dimensions) / 1000
  for roi, true_mask in truth.items():
    channel = openkbp.ROI_NAMES.index(roi)
    assert patient.roi_present[channel], (orientation, roi)
    if np.count_nonzero(true_mask) * voxel_cc >= 1:
      dice = _dice(patient.structure_masks[..., channel], true_mask)
      assert dice >= 0.95, (orientation, roi, dice)
  assert not patient.roi_present[openkbp.ROI_NAMES.index("PTV63")]
  assert summary["mapped"]["SpinalCord"] == ["Cord"]  # not SpinalCord_PRV
  # The mandible's hole: the annulus' centre is outside, its ring inside.
  mandible = record["phantom"].shape("Mandible")
  centre = record["phantom"].centre + np.array(mandible.centre)
  for offset, expected in ((0.0, False), (20.0, True)):
    point = centre + [offset, 0, 0]
    index = np.rint(
        ((point - info["origin_lps_mm"]) @ AXIS_DIRECTIONS_LPS.T)
        / info["voxel_dimensions"]
    ).astype(int)
    assert (
        patient.structure_masks[(*index, openkbp.ROI_NAMES.index("Mandible"))]
        == expected
    )


def test_ct_and_dose_match_the_truth(case):
  orientation, record, folder, _ = case
  phantom = record["phantom"]
  patient = openkbp.load_patient(folder)
  info = json.loads((folder / geometry.GEOMETRY_FILE).read_text())
  points = _centres(info)
  # CT: away from the body's edge and the CT's first and last slices.
  shrunk = synthetic.Phantom(
      phantom.centre,
      (synthetic.Shape("External", "cylinder", (0, 0, 0), (69, 59, 1e4)),),
  )
  z_half = (CASES[orientation][0][0] - 3) * CASES[orientation][1][0] / 2
  inner = shrunk.inside("External", points) & (
      np.abs(points[:, 2] - phantom.centre[2]) < z_half
  )
  assert inner.sum() > 1000
  hu = patient.ct.ravel()[inner] - CT_OFFSET
  np.testing.assert_allclose(hu, phantom.hu(points[inner]), atol=1.0 + 1e-6)
  grown = synthetic.Phantom(
      phantom.centre,
      (synthetic.Shape("External", "cylinder", (0, 0, 0), (80, 70, 1e4)),),
  )
  # Air: -1000 HU in the phantom (stored 24), -1024 (0, absent) beyond the CT.
  assert set(
      np.unique(patient.ct.ravel()[~grown.inside("External", points)])
  ) <= {0.0, 24.0}
  # Possible-dose mask = the body contour.
  body = phantom.inside("External", points).reshape(patient.ct.shape)
  assert _dice(patient.possible_dose_mask, body) > 0.97
  # Dose at the voxel centres, where it is above 10% of the peak.
  true_dose = phantom.dose(points).reshape(patient.ct.shape)
  where = patient.possible_dose_mask & (true_dose > 7)
  np.testing.assert_allclose(patient.dose[where], true_dose[where], rtol=0.01)


def test_grid_is_the_same_in_every_orientation(case):
  """The import grid is placed in patient coordinates by the PTVs and the
  body, whatever IOP and the slice order were."""
  orientation, record, folder, _ = case
  info = json.loads((folder / geometry.GEOMETRY_FILE).read_text())
  phantom = record["phantom"]
  # The PTVs' bounding box centre (LPS) is the box centre up to a voxel.
  p70, p56 = phantom.shape("PTV_7000"), phantom.shape("PTV 56Gy")
  lo = np.minimum(
      np.array(p70.centre) - p70.size, np.array(p56.centre) - p56.size
  )
  hi = np.maximum(
      np.array(p70.centre) + p70.size, np.array(p56.centre) + p56.size
  )
  box_centre = (
      np.asarray(info["origin_lps_mm"])
      + ((np.array(CROP) - 1) / 2 * info["voxel_dimensions"])
      @ AXIS_DIRECTIONS_LPS
  )
  box_centre_rel = box_centre - phantom.centre
  half = np.abs(
      ((np.array(CROP)) / 2 * info["voxel_dimensions"]) @ AXIS_DIRECTIONS_LPS
  )
  # The PTVs are inside the box; in-plane the box (187 mm) is longer than the
  # body (150 x 130 mm): centred on the body; along z (80 mm) it lies within
  # the body (the CT's extent, the External contour is on every slice).
  assert np.all(box_centre_rel - half <= lo) and np.all(
      box_centre_rel + half >= hi
  )
  assert np.all(np.abs(box_centre_rel[:2]) <= 1e-6), (
      orientation,
      box_centre_rel,
  )
  ct_half = CASES[orientation][0][0] * CASES[orientation][1][0] / 2
  assert abs(box_centre_rel[2]) + half[2] <= ct_half + 1e-6
  assert info["ct_grid"]["image_orientation_patient"] == [
      float(v)
      for v in (
          *synthetic.ORIENTATIONS[orientation][0],
          *synthetic.ORIENTATIONS[orientation][1],
      )
  ]
  assert info["rtplan_sop_instance_uid"] == record["uids"]["rtplan"]
  assert info["frame_of_reference_uid"] == record["uids"]["frame"]


def _rtdose_peak_lps(path) -> np.ndarray:
  """LPS of the maximum of an RT Dose file, read with pydicom only."""
  ds = pydicom.dcmread(path)
  frames = ds.pixel_array.reshape(int(ds.NumberOfFrames), ds.Rows, ds.Columns)
  f, r, c = np.unravel_index(np.argmax(frames), frames.shape)
  iop = np.array([float(v) for v in ds.ImageOrientationPatient])
  row, col = iop[:3], iop[3:]
  offsets = [float(v) for v in ds.GridFrameOffsetVector]
  dr, dc = (float(v) for v in ds.PixelSpacing)
  return (
      np.array([float(v) for v in ds.ImagePositionPatient])
      + offsets[f] * np.cross(row, col)
      + r * dr * col
      + c * dc * row
  )


@pytest.mark.parametrize("grid", ["crop", "ct"])
def test_rt_dose_back_in_the_patient_frame(case, grid, tmp_path):
  """The imported dose written as an RT Dose in the patient's frame puts the
  peak at its patient coordinate (pydicom, and SimpleITK when installed)."""
  orientation, record, folder, _ = case
  patient = openkbp.load_patient(folder)
  info = geometry.read_geometry(folder)
  dose, vd, kwargs = geometry.rtdose_arguments(info, patient.dose, grid)
  (path,) = formats.write_prediction_formats(
      tmp_path, folder.name, dose, vd, formats=("dicom",), **kwargs
  )
  ds = pydicom.dcmread(path)
  assert ds.FrameOfReferenceUID == record["uids"]["frame"]
  assert ds.StudyInstanceUID == record["uids"]["study"]
  assert ds.PatientID == "SYN001" and str(ds.PatientName) == "Synthetic^SYN001"
  assert (
      ds.ReferencedRTPlanSequence[0].ReferencedSOPInstanceUID
      == record["uids"]["rtplan"]
  )
  assert (
      ds.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID
      == record["uids"]["rtstruct"]
  )
  peak = record["phantom"].dose_peak()
  # Within one voxel of the import grid (the prediction's resolution).
  tolerance = np.asarray(info["voxel_dimensions"]) @ np.abs(AXIS_DIRECTIONS_LPS)
  assert np.all(np.abs(_rtdose_peak_lps(path) - peak) <= tolerance), (
      orientation,
      grid,
      _rtdose_peak_lps(path) - peak,
  )
  if grid == "ct":
    _check_frames_are_the_ct_images(ds, record, orientation)
  sitk = pytest.importorskip("SimpleITK")
  image = sitk.ReadImage(str(path))
  array = sitk.GetArrayFromImage(image)  # (frames, rows, columns)
  k, j, i = np.unravel_index(np.argmax(array), array.shape)
  point = np.array(
      image.TransformIndexToPhysicalPoint((int(i), int(j), int(k)))
  )
  assert np.all(np.abs(point - peak) <= tolerance), (orientation, point - peak)
  if grid == "ct":
    # SimpleITK sees the dose and the CT series as one grid: same size,
    # origin, spacing and directions, so frame k lies on CT image k.
    ct = sitk.ReadImage([str(p) for p in record["ct_files"]])
    assert image.GetSize() == ct.GetSize(), orientation
    np.testing.assert_allclose(image.GetOrigin(), ct.GetOrigin(), atol=1e-3)
    np.testing.assert_allclose(image.GetSpacing(), ct.GetSpacing(), atol=1e-4)
    np.testing.assert_allclose(
        image.GetDirection(), ct.GetDirection(), atol=1e-6
    )


def _check_frames_are_the_ct_images(ds, record, orientation):
  """An RT Dose written with --dicom_grid=ct: the CT's IOP, rows, columns and
  pixel spacing, one frame at each CT slice position (pydicom only)."""
  cts = [
      pydicom.dcmread(p, stop_before_pixels=True) for p in record["ct_files"]
  ]
  ct_first = cts[0]
  assert [float(v) for v in ds.ImageOrientationPatient] == [
      float(v) for v in ct_first.ImageOrientationPatient
  ], orientation
  assert (ds.Rows, ds.Columns, ds.NumberOfFrames) == (
      ct_first.Rows,
      ct_first.Columns,
      len(cts),
  )
  np.testing.assert_allclose(
      [float(v) for v in ds.PixelSpacing],
      [float(v) for v in ct_first.PixelSpacing],
      atol=1e-6,
  )
  iop = np.array([float(v) for v in ds.ImageOrientationPatient])
  normal = np.cross(iop[:3], iop[3:])
  offsets = np.array([float(v) for v in ds.GridFrameOffsetVector])
  assert offsets[0] == 0 and np.all(np.diff(offsets) > 0)
  frames = (
      np.array([float(v) for v in ds.ImagePositionPatient])
      + offsets[:, None] * normal
  )
  # record["ct_files"] is in slice order, increasing along the CT's normal.
  slices = np.array([[float(v) for v in c.ImagePositionPatient] for c in cts])
  np.testing.assert_allclose(frames, slices, atol=1e-3)


# ------------------------------------------------------------ names


@pytest.mark.parametrize(
    "name,target",
    [
        ("Parotid_L", "LeftParotid"),
        ("PAROTID LT", "LeftParotid"),
        ("Lt Parotid", "LeftParotid"),
        ("RightParotid", "RightParotid"),
        ("Parotid R", "RightParotid"),
        ("PTV_7000", "PTV70"),
        ("PTV 70Gy", "PTV70"),
        ("PTV63", "PTV63"),
        ("PTV5600cGy", "PTV56"),
        ("Cord", "SpinalCord"),
        ("SpinalCord", "SpinalCord"),
        ("SpinalCord_PRV", None),
        ("Cord PRV5", None),
        ("BrainStem", "Brainstem"),
        ("External", roi_names.BODY),
        ("BODY", roi_names.BODY),
        ("Skin", roi_names.BODY),
        ("ptv70_opt", None),
        ("zPTV70", None),
        ("Parotids", None),
        ("Esophagus", "Esophagus"),
        ("Larynx", "Larynx"),
        ("Mandible", "Mandible"),
    ],
)
def test_default_names(name, target):
  assert roi_names.default_match(name).target == target


def test_user_map_ptv_doses_and_levels(tmp_path):
  path = tmp_path / "map.json"
  path.write_text(
      json.dumps(
          {
              "Gland Parotid Sin": "LeftParotid",
              "re:^cord.*$": "SpinalCord",
              "PTV_boost": "PTV70",
              "Cord PRV": None,
          }
      )
  )
  mapper = roi_names.RoiMapper(
      roi_names.load_roi_map(path), roi_names.parse_ptv_doses(["PTV_low=56.5"])
  )
  assert mapper.match("gland parotid sin").target == "LeftParotid"
  assert (
      mapper.match("Cord_5mm").target == "SpinalCord"
  )  # the regex beats the default
  assert mapper.match("Cord PRV").target is None  # exact keys first
  assert mapper.match("PTV_boost").target == "PTV70"
  assert mapper.match("PTV_low").target == "PTV56"
  high = mapper.match("PTV_high")
  assert high.target is None and "--ptv_doses" in high.warning
  assert (
      roi_names.default_match("PTV 50").target is None
  )  # no channel near 50 Gy
  yaml = pytest.importorskip("yaml")
  (tmp_path / "map.yaml").write_text(
      yaml.safe_dump({"re:^lt?\\s*par.*": "LeftParotid"})
  )
  assert (
      roi_names.RoiMapper(roi_names.load_roi_map(tmp_path / "map.yaml"))
      .match("Lt Par")
      .target
      == "LeftParotid"
  )
  (tmp_path / "bad.json").write_text(json.dumps({"x": "Kidney"}))
  with pytest.raises(DicomError, match="bad.json.*Kidney"):
    roi_names.load_roi_map(tmp_path / "bad.json")
  with pytest.raises(DicomError, match="--ptv_doses"):
    roi_names.parse_ptv_doses(["PTV_low"])


# ------------------------------------------------------------ the command


def _run_cli(args, capfd):
  flag_values = flags.FlagValues()
  dicom_import.define_flags(flag_values)
  saved = dicom_import.FLAGS
  dicom_import.FLAGS = flag_values
  capfd.readouterr()
  try:
    code = helpers.invoke(
        dicom_import.main, ["dicom_import", *map(str, args)], flag_values
    )
  finally:
    dicom_import.FLAGS = saved
  return (code, *capfd.readouterr())


def _small_patient(tmp_path_factory, name, *, seed, with_plan):
  """A small HFS patient (fast to copy and break): (folder, record)."""
  folder = tmp_path_factory.mktemp(name) / "dicom"
  record = synthetic.write_patient(
      folder,
      shape=(12, 72, 72),
      spacing=(3.0, 2.2, 2.2),
      seed=seed,
      with_plan=with_plan,
      phantom=synthetic.Phantom(shapes=synthetic.DEFAULT_SHAPES[:4]),
  )
  return folder, record


@pytest.fixture(scope="module")
def small_dicom(tmp_path_factory):
  """A small HFS patient without an RTPLAN."""
  return _small_patient(tmp_path_factory, "small", seed=3, with_plan=False)


def _copy(small_dicom, tmp_path):
  import shutil

  folder, record = small_dicom
  dst = tmp_path / "in"
  shutil.copytree(folder, dst)
  moved = lambda p: dst / Path(p).relative_to(folder)
  return dst, {
      "ct_files": [moved(p) for p in record["ct_files"]],
      "rtstruct": moved(record["rtstruct"]),
      "rtdose": moved(record["rtdose"]),
  }


def test_cli_imports_and_refuses_to_overwrite(small_dicom, tmp_path, capfd):
  src, _ = _copy(small_dicom, tmp_path)
  args = [
      f"--input={src}",
      f"--output={tmp_path / 'out'}",
      "--grid_shape=40,40,16",
  ]
  code, out, err = _run_cli(args, capfd)
  assert code == 0, err
  assert (
      "pt_SYN001" in out
      and "PTV70<-PTV_7000" in out
      and "body contour 'External'" in out
  )
  patient = openkbp.load_patient(tmp_path / "out" / "pt_SYN001")
  assert patient.grid_shape == (40, 40, 16) and patient.dose is not None
  code, _, err = _run_cli(args, capfd)
  assert code == 2 and "pt_SYN001" in err and "--overwrite" in err
  assert _run_cli(args + ["--overwrite"], capfd)[0] == 0


def test_body_from_ct_when_no_body_contour(small_dicom, tmp_path, capfd):
  src, _ = _copy(small_dicom, tmp_path)
  (tmp_path / "map.json").write_text(json.dumps({"External": None}))
  code, out, err = _run_cli(
      [
          f"--input={src}",
          f"--output={tmp_path / 'out'}",
          "--grid_shape=40,40,16",
          f"--roi_map={tmp_path / 'map.json'}",
      ],
      capfd,
  )
  assert code == 0, err
  assert "CT > -500 HU" in out
  patient = openkbp.load_patient(tmp_path / "out" / "pt_SYN001")
  info = geometry.read_geometry(tmp_path / "out" / "pt_SYN001")
  points = _centres(info)
  phantom = small_dicom[1]["phantom"]
  # Within the CT's slices (12 x 3 mm); the box (16 x 2.5 mm) is longer.
  within = (np.abs(points[:, 2] - phantom.centre[2]) < 16.5).reshape(
      patient.grid_shape
  )
  body = phantom.inside("External", points).reshape(patient.grid_shape)
  assert _dice(patient.possible_dose_mask & within, body & within) > 0.97


def test_couch_apart_from_the_body_is_left_out(tmp_path, capfd):
  """Without a body contour, CT > -500 HU keeps its largest connected region:
  a couch slab behind the body, with air between, is not in the mask."""
  phantom = synthetic.Phantom(
      shapes=synthetic.DEFAULT_SHAPES[:4], couch=(72.0, 12.0)
  )
  src = tmp_path / "in"
  synthetic.write_patient(
      src,
      phantom,
      shape=(12, 88, 72),
      spacing=(3.0, 2.2, 2.2),
      seed=5,
      with_plan=False,
      with_dose=False,
  )
  (tmp_path / "map.json").write_text(json.dumps({"External": None}))
  code, out, err = _run_cli(
      [
          f"--input={src}",
          f"--output={tmp_path / 'out'}",
          "--grid_shape=48,48,16",
          f"--roi_map={tmp_path / 'map.json'}",
      ],
      capfd,
  )
  assert code == 0, err
  assert "CT > -500 HU, largest connected region" in out
  folder = tmp_path / "out" / "pt_SYN001"
  patient = openkbp.load_patient(folder)
  points = _centres(geometry.read_geometry(folder))
  y = (points[:, 1] - phantom.centre[1]).reshape(patient.grid_shape)
  # The couch is in the imported CT (so CT > -500 HU would take it) ...
  couch = (patient.ct - CT_OFFSET > -500) & (y > 72 + 2)
  assert couch.sum() > 100
  # ... and not in the possible-dose mask, which is the body.
  assert not (patient.possible_dose_mask & (y > 65 + 3)).any()
  within = (np.abs(points[:, 2] - phantom.centre[2]) < 16.5).reshape(
      patient.grid_shape
  )
  body = phantom.inside("External", points).reshape(patient.grid_shape)
  assert _dice(patient.possible_dose_mask & within, body & within) > 0.97


def test_largest_region():
  mask = np.zeros((6, 6, 6), bool)
  mask[0:2, 0:2, 0:2] = True  # 8 voxels
  mask[4:6, 0:6, 0:6] = True  # 72 voxels
  mask[0, 5, 5] = True  # touches the slab only diagonally: apart
  assert np.array_equal(
      importer.largest_region(mask),
      np.pad(np.ones((2, 6, 6), bool), ((4, 0), (0, 0), (0, 0))),
  )
  assert not importer.largest_region(np.zeros((3, 3, 3), bool)).any()


def _break(kind, src, files):
  """Breaks the copied input; returns the file the error must name."""
  cts = files["ct_files"]
  if kind == "no CT":
    for p in cts:
      p.unlink()
    return files["rtstruct"]
  if kind == "missing series":
    ds = pydicom.dcmread(files["rtstruct"])
    (
        ds.ReferencedFrameOfReferenceSequence[0]
        .RTReferencedStudySequence[0]
        .RTReferencedSeriesSequence[0]
        .SeriesInstanceUID
    ) = "1.2.3.4"
    ds.save_as(files["rtstruct"])
    return files["rtstruct"]
  if kind == "two patients":
    ds = pydicom.dcmread(cts[5])
    ds.PatientID = "OTHER"
    ds.save_as(cts[5])
    return cts[5]
  if kind == "truncated":
    data = cts[4].read_bytes()
    cts[4].write_bytes(data[: len(data) // 2])
    return cts[4]
  if kind == "oblique":
    for p in cts:
      ds = pydicom.dcmread(p)
      c, s = np.cos(0.2), np.sin(0.2)
      ds.ImageOrientationPatient = [c, s, 0.0, -s, c, 0.0]
      ds.save_as(p)
    return "ImageOrientationPatient"
  if kind == "tilt":
    for k, p in enumerate(cts):
      ds = pydicom.dcmread(p)
      ipp = [float(v) for v in ds.ImagePositionPatient]
      ds.ImagePositionPatient = [ipp[0], ipp[1] + 0.5 * k, ipp[2]]
      ds.save_as(p)
    return "gantry tilt"
  if kind == "missing slice":
    cts[6].unlink()
    return cts[7]
  if kind == "dose units":
    ds = pydicom.dcmread(files["rtdose"])
    ds.DoseUnits = "RELATIVE"
    ds.save_as(files["rtdose"])
    return files["rtdose"]
  if kind == "no PTV":
    ds = pydicom.dcmread(files["rtstruct"])
    for roi in ds.StructureSetROISequence:
      roi.ROIName = roi.ROIName.replace("PTV", "Target")
    ds.save_as(files["rtstruct"])
    return files["rtstruct"]
  raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "no CT",
        "missing series",
        "two patients",
        "truncated",
        "oblique",
        "tilt",
        "missing slice",
        "no PTV",
        "dose units",
    ],
)
def test_bad_input_is_one_error_line_and_writes_nothing(
    small_dicom, tmp_path, capfd, kind
):
  src, files = _copy(small_dicom, tmp_path)
  named = _break(kind, src, files)
  out = tmp_path / "out"
  code, _, err = _run_cli(
      [f"--input={src}", f"--output={out}", "--grid_shape=40,40,16"], capfd
  )
  assert code == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert str(named) in lines[0], (kind, err)
  assert not out.exists()
  assert not [
      p for p in tmp_path.iterdir() if p.name.startswith(".randose-staging")
  ]


@pytest.fixture(scope="module")
def small_dicom_plan(tmp_path_factory):
  """A small HFS patient with an RTPLAN, its RTDOSE referencing it."""
  return _small_patient(tmp_path_factory, "small_plan", seed=4, with_plan=True)


def test_rt_dose_in_another_frame_is_refused(small_dicom_plan, tmp_path, capfd):
  """The plan's RTDOSE in another frame of reference than the CT: one error
  line naming the RTDOSE, nothing written."""
  src, files = _copy(small_dicom_plan, tmp_path)
  ds = pydicom.dcmread(files["rtdose"])
  ds.FrameOfReferenceUID = "1.2.826.0.1.3680043.2.1125.99"
  ds.save_as(files["rtdose"])
  out = tmp_path / "out"
  code, _, err = _run_cli(
      [f"--input={src}", f"--output={out}", "--grid_shape=40,40,16"], capfd
  )
  assert code == 2, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), err
  assert (
      str(files["rtdose"]) in lines[0] and "FrameOfReferenceUID" in lines[0]
  ), err
  assert not out.exists()
  assert not [
      p for p in tmp_path.iterdir() if p.name.startswith(".randose-staging")
  ]


def _as_dose_part(path, kind, fraction, copy_to=None, uid_suffix="7"):
  """The RTDOSE as a `kind` dose (BEAM, FRACTION) holding `fraction` of it
  (DoseGridScaling scaled), at `copy_to` (a new SOPInstanceUID) or in place."""
  ds = pydicom.dcmread(path)
  ds.DoseSummationType = kind
  ds.DoseGridScaling = f"{float(ds.DoseGridScaling) * fraction:.10g}"
  if copy_to is not None:
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = (
        f"1.2.826.0.1.3680043.2.1125.{uid_suffix}"
    )
  ds.save_as(copy_to or path)


def _dose_of_import(src, out, capfd):
  code, text, err = _run_cli(
      [f"--input={src}", f"--output={out}", "--grid_shape=40,40,16"], capfd
  )
  assert code == 0, err
  folder = out / "pt_SYN001"
  dose = (
      openkbp.load_patient(folder).dose
      if (folder / openkbp.DOSE_FILE).exists()
      else None
  )
  return dose, text, folder


def test_per_beam_and_per_fraction_doses_are_summed(
    small_dicom_plan, tmp_path, capfd
):
  """Without a plan-summed RTDOSE, per-beam doses are summed (and
  per-fraction ones times the plan's NumberOfFractionsPlanned), on one grid:
  the same dose.csv as the plan-summed dose they add up to (to the 1e-4 Gy
  of the CSV and DoseGridScaling's digits); beside a plan-summed one they
  are ignored without a word."""
  src, files = _copy(small_dicom_plan, tmp_path / "plan")
  reference, _, _ = _dose_of_import(src, tmp_path / "out", capfd)
  assert reference is not None and reference.max() > 10
  # Two beams: 40 % and 60 % of the plan's dose.
  src1, files1 = _copy(small_dicom_plan, tmp_path / "beams")
  _as_dose_part(
      files1["rtdose"], "BEAM", 0.6, copy_to=files1["rtdose"].with_name("b2")
  )
  _as_dose_part(files1["rtdose"], "BEAM", 0.4)
  dose, out, folder = _dose_of_import(src1, tmp_path / "out1", capfd)
  assert dose is not None, out
  np.testing.assert_allclose(dose, reference, atol=2e-4)
  assert "the sum of 2 per-beam doses" in out, out
  assert (
      len(geometry.read_geometry(folder)["rtdose_summed_sop_instance_uids"])
      == 2
  )
  # The second beam on another grid (one dose voxel shorter along x, its
  # values where they were): resampled onto the first's, the same sum.
  src6, files6 = _copy(small_dicom_plan, tmp_path / "grids")
  second = files6["rtdose"].with_name("b2")
  _as_dose_part(files6["rtdose"], "BEAM", 0.6, copy_to=second)
  _as_dose_part(files6["rtdose"], "BEAM", 0.4)
  ds = pydicom.dcmread(second)
  step = float(ds.PixelSpacing[1])
  pixels = ds.pixel_array[:, :, 1:].copy()
  ds.ImagePositionPatient = [
      float(ds.ImagePositionPatient[0]) + step,
      *ds.ImagePositionPatient[1:],
  ]
  ds.Columns = pixels.shape[2]
  ds.PixelData = pixels.astype("<u2").tobytes()
  ds.save_as(second)
  dose, out, _ = _dose_of_import(src6, tmp_path / "out6", capfd)
  np.testing.assert_allclose(dose, reference, atol=2e-4)
  # One per-fraction dose of a 35-fraction plan.
  src2, files2 = _copy(small_dicom_plan, tmp_path / "fraction")
  _as_dose_part(files2["rtdose"], "FRACTION", 1 / 35)
  (plan_file,) = [
      p
      for p in src2.rglob("*")
      if p.is_file()
      and pydicom.dcmread(p, stop_before_pixels=True).Modality == "RTPLAN"
  ]
  ds = pydicom.dcmread(plan_file)
  group = pydicom.Dataset()
  group.FractionGroupNumber, group.NumberOfFractionsPlanned = 1, 35
  ds.FractionGroupSequence = pydicom.Sequence([group])
  ds.save_as(plan_file)
  dose, out, _ = _dose_of_import(src2, tmp_path / "out2", capfd)
  np.testing.assert_allclose(dose, reference, atol=2e-4)
  assert "x 35 fractions" in out, out
  # Per-fraction doses without the plan's fractions: no dose.csv, with why.
  src3, files3 = _copy(small_dicom_plan, tmp_path / "no-fractions")
  _as_dose_part(files3["rtdose"], "FRACTION", 1 / 35)
  dose, out, _ = _dose_of_import(src3, tmp_path / "out3", capfd)
  assert dose is None
  assert "NumberOfFractionsPlanned" in out and "no dose.csv" in out, out
  # The plan-summed dose back, a per-beam one beside it: ignored, no word.
  src4, files4 = _copy(small_dicom_plan, tmp_path / "4")
  _as_dose_part(
      files4["rtdose"], "BEAM", 0.5, copy_to=files4["rtdose"].with_name("b1")
  )
  dose, out, _ = _dose_of_import(src4, tmp_path / "out4", capfd)
  np.testing.assert_allclose(dose, reference, atol=0)
  assert "dose:" not in out and "BEAM" not in out, out
  # Two plan-summed doses of one plan: the first by path is read, with a word.
  src5, files5 = _copy(small_dicom_plan, tmp_path / "5")
  second = files5["rtdose"].with_name(files5["rtdose"].name + "-2")
  ds = pydicom.dcmread(files5["rtdose"])
  ds.SOPInstanceUID = "1.2.826.0.1.3680043.2.1125.8"
  ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
  ds.save_as(second)
  code, out, err = _run_cli(
      [
          f"--input={src5}",
          f"--output={tmp_path / 'out5'}",
          "--grid_shape=40,40,16",
      ],
      capfd,
  )
  assert code == 0, err
  assert (
      f"dose: 2 plan-summed RT Doses; {files5['rtdose'].name} is read, "
      f"{second.name} ignored"
  ) in out, out


def test_occupancy_is_the_overlap():
  """`occupancy` against a brute-force count of fine sub-voxels."""
  rng = np.random.default_rng(0)
  mask = rng.random((9, 7, 8)) > 0.5
  source = series.Volume(
      mask, np.array([1.0, 1.5, 0.5]), np.array([0.3, -0.2, 0.1])
  )
  shape, spacing, origin = (
      (5, 4, 3),
      np.array([2.0, 3.0, 1.5]),
      np.array([0.0, 1.0, -0.4]),
  )
  occ = rasterize.occupancy(source, shape, spacing, origin)
  # Brute force: 1-D overlaps multiply (the grids are separable).
  expected = np.zeros(shape)
  src0, dst0 = source.axis_start(), AXIS_DIRECTIONS_LPS @ origin
  for i in np.ndindex(shape):
    for j in zip(*np.nonzero(mask)):
      f = 1.0
      for a in range(3):
        s, d = src0[a] + j[a] * source.spacing[a], dst0[a] + i[a] * spacing[a]
        f *= (
            max(
                0.0,
                min(s + source.spacing[a] / 2, d + spacing[a] / 2)
                - max(s - source.spacing[a] / 2, d - spacing[a] / 2),
            )
            / spacing[a]
        )
      expected[i] += f
  np.testing.assert_allclose(occ, expected, atol=1e-5)


# ------------------------------------------------------------ predict


def _TruthPredictor(data_config):  # pylint: disable=invalid-name
  """Stands in for a model: predicts the patient's own (imported) dose
  (encoding and decoding are the Predictor's)."""
  return stand_ins.FunctionPredictor(
      data_config, lambda e: np.asarray(e["target"])
  )


@pytest.mark.parametrize("grid", ["crop", "ct"])
def test_predict_writes_the_rt_dose_in_the_patient_frame(
    small_dicom, tmp_path, grid
):
  import types
  from randose_jax import default_config
  from randose_jax.inference import predict_folders  # pylint: disable=g-import-not-at-top

  src, _ = _copy(small_dicom, tmp_path)
  _import(src, tmp_path / "pats", shape=(40, 40, 16))
  config = default_config.get_default_config()
  restored = types.SimpleNamespace(
      config=config,
      predictor=_TruthPredictor(config.data),
      which="best",
      step=0,
      uses_ema=False,
  )
  out = tmp_path / "pred"
  predict_folders.predict_patients(
      restored,
      openkbp.list_patient_dirs(tmp_path / "pats"),
      out,
      formats=("csv", "nifti", "dicom"),
      log=lambda *_: None,
      dicom_grid=grid,
  )
  ds = pydicom.dcmread(out / "pt_SYN001.dcm")
  record = small_dicom[1]
  assert ds.FrameOfReferenceUID == record["uids"]["frame"]
  assert ds.StudyInstanceUID == record["uids"]["study"]
  assert "ReferencedRTPlanSequence" not in ds  # the input had no plan
  assert (
      ds.ReferencedStructureSetSequence[0].ReferencedSOPInstanceUID
      == record["uids"]["rtstruct"]
  )
  info = geometry.read_geometry(tmp_path / "pats" / "pt_SYN001")
  tolerance = np.asarray(info["voxel_dimensions"]) @ np.abs(AXIS_DIRECTIONS_LPS)
  assert np.all(
      np.abs(
          _rtdose_peak_lps(out / "pt_SYN001.dcm")
          - record["phantom"].dose_peak()
      )
      <= tolerance
  )
  # The NIfTI: the same patient coordinates (RAS = LPS with x, y negated).
  nib = pytest.importorskip("nibabel")
  img = nib.load(out / "pt_SYN001.nii.gz")
  ijk = np.unravel_index(np.argmax(np.asarray(img.dataobj)), img.shape)
  ras = img.affine @ np.array([*ijk, 1.0])
  lps = ras[:3] * [-1, -1, 1]
  assert np.all(np.abs(lps - record["phantom"].dose_peak()) <= tolerance)


def test_imported_patients_train_validate_and_predict(tmp_path):
  """Issue 14 item 6: patients imported from DICOM (with an RT Dose) train
  and validate like OpenKBP patients, from `config.data.root`."""
  from randose_jax.training import train  # pylint: disable=g-import-not-at-top
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top

  root = tmp_path / "data"
  for i, split in enumerate(("train-pats", "train-pats", "validation-pats")):
    src = tmp_path / f"dicom{i}"
    synthetic.write_patient(
        src, seed=i, patient_id=f"SYN{i:03d}", shape=(20, 40, 40)
    )
    importer.import_folder(
        src,
        root / split,
        shape=(16, 16, 16),
        spacing=(6.0, 6.0, 6.0),
        progress=False,
    )
  config = tiny_config(**{"data.synthetic": False, "data.root": str(root)})
  workdir = tmp_path / "run"
  train.train_and_evaluate(config, str(workdir))
  scores = json.loads((workdir / "validation_scores.json").read_text())
  assert scores["num_patients"] == 1
  assert np.isfinite(scores["dose_score"]) and np.isfinite(scores["dvh_score"])
  # The baseline is scored against the imported RT Dose: not zero, finite.
  assert 0 < scores["baseline_mean_dose_score"] < 80
  pred = openkbp.read_prediction_csv(
      workdir / "predictions" / "validation-pats" / "pt_SYN002.csv",
      (16, 16, 16),
  )
  patient = openkbp.load_patient(root / "validation-pats" / "pt_SYN002")
  assert not pred[~patient.possible_dose_mask].any()
  assert pred.max() > 0


def test_a_killed_imports_staging_folder_is_removed(small_dicom, tmp_path):
  """A dicom_import killed mid-way leaves its hidden staging folder beside
  the output; the next import removes it (its process is gone), and leaves
  a live process's and another command's alone."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  from randose_jax import fileio  # pylint: disable=g-import-not-at-top

  dead_pid = int(
      subprocess.run(
          [sys.executable, "-c", "import os; print(os.getpid())"],
          capture_output=True,
          text=True,
          check=True,
      ).stdout
  )
  tag = fileio._host_tag()  # pylint: disable=protected-access
  prefix = fileio.STAGING_PREFIX
  stale = tmp_path / f"{prefix}dicom_import-p{dead_pid}-h{tag}-abc123"
  keep = [
      tmp_path / f"{prefix}dicom_import-p1-h{tag}-abc123",  # pid 1 lives
      tmp_path / f"{prefix}predict-p{dead_pid}-h{tag}-abc123",  # other kind
  ]
  for folder in [stale, *keep]:
    (folder / "pt_SYN001").mkdir(parents=True)
  src, _ = _copy(small_dicom, tmp_path)
  _import(src, tmp_path / "pats")
  assert not stale.exists()
  assert all(folder.is_dir() for folder in keep)
  assert (tmp_path / "pats" / "pt_SYN001" / "ct.csv").is_file()
  staged = [p.name for p in tmp_path.iterdir() if p.name.startswith(prefix)]
  assert sorted(staged) == sorted(p.name for p in keep)
