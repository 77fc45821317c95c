"""Synthetic DICOM patients (CT series, RTSTRUCT, RTPLAN, RTDOSE) with known
geometry, for the importer's tests and benchmark. Nothing is downloaded.

The phantom lives in patient coordinates (LPS mm, relative to `centre`): an
elliptic body whose CT number is a linear function of position (so linear
interpolation reproduces it exactly), spheres, ellipsoids, cylinders and an
annulus (a structure with a hole: two contours per slice), a Gaussian dose
peak at the PTV70 centre, and optionally a couch: a slab posterior to the
body, apart from it (air between), in the CT only (not contoured).
`Phantom.inside`, `Phantom.hu` and `Phantom.dose` give the truth at any
point. The CT is written in any of the four standard
patient positions (`ORIENTATIONS`: only ImageOrientationPatient and the slice
order change), the files under random names in random subfolders.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

CT_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RTPLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
RTDOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"

# PatientPosition -> (row cosine, column cosine), as scanners write them.
ORIENTATIONS = {
    "HFS": ((1, 0, 0), (0, 1, 0)),
    "FFS": ((-1, 0, 0), (0, 1, 0)),
    "HFP": ((-1, 0, 0), (0, -1, 0)),
    "FFP": ((1, 0, 0), (0, -1, 0)),
}
BODY_HU = (20.0, 0.3, 0.2, -0.1)  # HU = a + b x + c y + d z inside the body
COUCH_HU = 200.0
DOSE_PEAK_GY, DOSE_SIGMA_MM = 70.0, 35.0


@dataclasses.dataclass(frozen=True)
class Shape:
  """A structure: kind 'ellipsoid' (centre, radii), 'cylinder' (centre, radii
  (rx, ry, half length)) or 'annulus' (centre, (r_out, r_in, half length)),
  relative to the phantom centre (mm, LPS)."""

  name: str
  kind: str
  centre: tuple
  size: tuple
  interpreted_type: str = "ORGAN"


DEFAULT_SHAPES = (
    Shape("External", "cylinder", (0, 0, 0), (75, 65, 1e4), "EXTERNAL"),
    Shape("PTV_7000", "ellipsoid", (0, -10, 0), (22, 22, 20), "PTV"),
    Shape("PTV 56Gy", "ellipsoid", (10, -5, 5), (32, 30, 26), "PTV"),
    Shape("Parotid_L", "ellipsoid", (45, 5, 10), (14, 18, 16)),
    Shape("PAROTID RT", "ellipsoid", (-45, 5, 10), (14, 18, 16)),
    Shape("Cord", "cylinder", (1.3, 40.7, 0), (9.4, 8.3, 1e4)),
    Shape("SpinalCord_PRV", "cylinder", (1.3, 40.7, 0), (14, 13, 1e4)),
    Shape("Mandible", "annulus", (0, -30, -20), (26, 14, 8)),
    Shape("Brainstem", "ellipsoid", (0, 25, 30), (12, 12, 12)),
)


@dataclasses.dataclass
class Phantom:
  """Geometry of one synthetic patient; all lengths mm, LPS."""

  centre: np.ndarray = dataclasses.field(
      default_factory=lambda: np.array([12.0, -30.0, 400.0])
  )
  shapes: tuple = DEFAULT_SHAPES
  # (y_top, thickness) mm relative to the centre: a couch of COUCH_HU where
  # y_top <= y <= y_top + thickness (LPS +y is posterior), every x and z.
  couch: tuple | None = None

  def in_couch(self, points) -> np.ndarray:
    """bool (n,): points (n, 3) LPS in the couch (none without one)."""
    p = np.asarray(points, np.float64)
    if self.couch is None:
      return np.zeros(len(p), bool)
    y = p[:, 1] - self.centre[1]
    return (y >= self.couch[0]) & (y <= self.couch[0] + self.couch[1])

  def shape(self, name: str) -> Shape:
    return next(s for s in self.shapes if s.name == name)

  def inside(self, name: str, points, slice_z=None) -> np.ndarray:
    """bool (n,): points (n, 3) LPS inside the structure; with `slice_z` (the
    CT's slice positions) as its contours say: each point takes the
    cross-section of the nearest slice (none beyond half a step past the ends).
    """
    s = self.shape(name)
    p = np.asarray(points, np.float64)
    if slice_z is not None:
      z = np.sort(np.asarray(slice_z, np.float64))
      step = z[1] - z[0]
      nearest = z[
          np.clip(np.rint((p[:, 2] - z[0]) / step).astype(int), 0, len(z) - 1)
      ]
      beyond = np.abs(p[:, 2] - nearest) > step / 2
      p = np.stack([p[:, 0], p[:, 1], nearest], 1)
      return self.inside(name, p) & ~beyond
    p = p - self.centre - np.asarray(s.centre, np.float64)
    if s.kind == "ellipsoid":
      return np.sum((p / np.asarray(s.size)) ** 2, axis=1) <= 1
    if s.kind == "cylinder":
      rx, ry, h = s.size
      return ((p[:, 0] / rx) ** 2 + (p[:, 1] / ry) ** 2 <= 1) & (
          np.abs(p[:, 2]) <= h
      )
    r_out, r_in, h = s.size
    r2 = p[:, 0] ** 2 + p[:, 1] ** 2
    return (r2 <= r_out**2) & (r2 >= r_in**2) & (np.abs(p[:, 2]) <= h)

  def hu(self, points) -> np.ndarray:
    """HU at points (n, 3): the linear body field inside the body, COUCH_HU
    in the couch, -1000 elsewhere."""
    p = np.asarray(points, np.float64) - self.centre
    a, b, c, d = BODY_HU
    return np.where(
        self.inside("External", points),
        a + b * p[:, 0] + c * p[:, 1] + d * p[:, 2],
        np.where(self.in_couch(points), COUCH_HU, -1000.0),
    )

  def dose_peak(self) -> np.ndarray:
    return self.centre + np.asarray(self.shape("PTV_7000").centre, np.float64)

  def dose(self, points) -> np.ndarray:
    """Gy at points (n, 3): a Gaussian peak at the PTV_7000 centre."""
    r2 = np.sum(
        (np.asarray(points, np.float64) - self.dose_peak()) ** 2, axis=1
    )
    return DOSE_PEAK_GY * np.exp(-r2 / (2 * DOSE_SIGMA_MM**2))

  def contours(
      self, name: str, z: float, n_points: int = 72
  ) -> list[np.ndarray]:
    """Closed contours (k, 3) LPS of the structure's cross-section at z."""
    s = self.shape(name)
    c = self.centre + np.asarray(s.centre, np.float64)
    dz = z - c[2]
    if s.kind == "ellipsoid":
      f = 1 - (dz / s.size[2]) ** 2
      radii = (
          []
          if f <= 0.0025
          else [(s.size[0] * np.sqrt(f), s.size[1] * np.sqrt(f))]
      )
    elif abs(dz) > s.size[2]:
      radii = []
    elif s.kind == "cylinder":
      radii = [(s.size[0], s.size[1])]
    else:
      radii = [(s.size[0], s.size[0]), (s.size[1], s.size[1])]
    t = np.arange(n_points) * 2 * np.pi / n_points
    return [
        np.stack(
            [c[0] + rx * np.cos(t), c[1] + ry * np.sin(t), np.full_like(t, z)],
            1,
        )
        for rx, ry in radii
    ]


def _uid(rng) -> str:
  return "2.25." + str(
      int(rng.integers(1, 2**62)) * 2**60 + int(rng.integers(1, 2**60))
  )


def _base(sop_class: str, sop_uid: str, modality: str, ids: dict):
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.uid import ExplicitVRLittleEndian

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = sop_class
  meta.MediaStorageSOPInstanceUID = sop_uid
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  ds = Dataset()
  ds.file_meta = meta
  ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, sop_uid, modality
  ds.PatientID, ds.PatientName = ids["patient_id"], ids["patient_name"]
  ds.StudyInstanceUID = ids["study"]
  ds.FrameOfReferenceUID = ids["frame"]
  ds.StudyDate, ds.StudyTime = "20250101", "120000"
  return ds


def _save(ds, folder: Path, rng) -> Path:
  import pydicom

  sub = folder / f"d{int(rng.integers(0, 3))}"
  sub.mkdir(parents=True, exist_ok=True)
  path = sub / f"{int(rng.integers(0, 2**40)):x}"
  pydicom.dcmwrite(path, ds, enforce_file_format=True)
  return path


def ct_positions(phantom: Phantom, orientation: str, shape, spacing):
  """(row cosine, column cosine, normal, IPP (n, 3)) of a CT grid centred on
  the phantom: shape (slices, rows, columns), spacing (slice, row, column) mm.
  """
  row, col = (np.array(v, np.float64) for v in ORIENTATIONS[orientation])
  normal = np.cross(row, col)
  n, rows, cols = shape
  corner = (
      phantom.centre
      - (rows - 1) / 2 * spacing[1] * col
      - (cols - 1) / 2 * spacing[2] * row
  )
  ipp = np.array(
      [corner + (k - (n - 1) / 2) * spacing[0] * normal for k in range(n)]
  )
  return row, col, normal, ipp


def hfs_stored(array: np.ndarray) -> np.ndarray:
  """An array in the project's axes (A->P, R->L, S->I) in the stored layout
  of a head-first supine CT: (slice, row, column), slices inferior first."""
  return np.ascontiguousarray(np.transpose(array, (2, 0, 1))[::-1])


def write_ct_series(
    folder, slice_hu, *, ids, series_uid, orientation, ipp, spacing, shape, rng
):
  """Writes a CT series, one file per slice under random names, in random
  order; `slice_hu(k)` gives stored slice k's HU (rows, columns), `ipp` (n,
  3) the slices' positions.

  Returns:
    (files, SOPInstanceUIDs), both in slice order.
  """
  row, col = ORIENTATIONS[orientation]
  ct_files, slice_uids = [], []
  for k in rng.permutation(shape[0]):
    hu = slice_hu(k)
    uid = _uid(rng)
    ds = _base(CT_STORAGE, uid, "CT", ids)
    ds.SeriesInstanceUID, ds.SeriesNumber = series_uid, 1
    ds.StudyID = "1"
    ds.PatientPosition = orientation
    ds.InstanceNumber = int(k) + 1
    ds.ImageOrientationPatient = [float(v) for v in (*row, *col)]
    ds.ImagePositionPatient = [round(float(v), 4) for v in ipp[k]]
    ds.PixelSpacing = [float(spacing[1]), float(spacing[2])]
    ds.SliceThickness = float(spacing[0])
    ds.Rows, ds.Columns = shape[1], shape[2]
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
        16,
        16,
        15,
        0,
    )
    ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
    ds.PixelData = np.clip(np.rint(hu + 1024), 0, 65535).astype("<u2").tobytes()
    ct_files.append((k, _save(ds, folder, rng)))
    slice_uids.append((k, uid))
  return [p for _, p in sorted(ct_files)], [u for _, u in sorted(slice_uids)]


def write_openkbp_ct(folder, patient, *, seed: int = 0, patient_id=None):
  """An OpenKBP `Patient`'s CT as a head-first supine DICOM series (as a
  clinic exports it: random file names), its grid centred at the origin.

  Returns:
    {'ct_files', 'uids' (study, frame, ct_series)}; `hfs_stored` gives an
    array of the OpenKBP grid in the series' stored layout.
  """
  folder = Path(folder)
  rng = np.random.default_rng(seed)
  patient_id = patient_id or patient.patient_id
  ids = {
      "patient_id": patient_id,
      "patient_name": f"OpenKBP^{patient_id}",
      "study": _uid(rng),
      "frame": _uid(rng),
  }

  hu = hfs_stored(patient.ct).astype(np.float64) - 1024
  vd = np.asarray(patient.voxel_dimensions, np.float64)
  spacing = (vd[2], vd[0], vd[1])  # slice, row (A->P), column (R->L)
  shape = hu.shape
  phantom = Phantom(centre=np.zeros(3))
  _, _, _, ipp = ct_positions(phantom, "HFS", shape, spacing)
  series_uid = _uid(rng)
  ct_files, _ = write_ct_series(
      folder,
      lambda k: hu[k],
      ids=ids,
      series_uid=series_uid,
      orientation="HFS",
      ipp=ipp,
      spacing=spacing,
      shape=shape,
      rng=rng,
  )
  return {
      "ct_files": ct_files,
      "uids": {
          "study": ids["study"],
          "frame": ids["frame"],
          "ct_series": series_uid,
      },
  }


def write_patient(
    folder,
    phantom: Phantom | None = None,
    *,
    orientation: str = "HFS",
    shape=(30, 64, 64),
    spacing=(3.0, 2.5, 2.5),
    seed: int = 0,
    patient_id: str = "SYN001",
    with_dose: bool = True,
    with_plan: bool = True,
    dose_spacing: float = 3.0,
) -> dict:
  """Writes one synthetic patient's DICOM files under `folder`.

  Returns:
    {'phantom', 'ct_files' (in slice order), 'rtstruct', 'rtplan', 'rtdose',
     'uids': {study, frame, ct_series, rtstruct, rtplan}}.
  """
  from pydicom.sequence import Sequence

  phantom = phantom or Phantom()
  folder = Path(folder)
  rng = np.random.default_rng(seed)
  ids = {
      "patient_id": patient_id,
      "patient_name": f"Synthetic^{patient_id}",
      "study": _uid(rng),
      "frame": _uid(rng),
  }
  ct_series = _uid(rng)
  row, col, normal, ipp = ct_positions(phantom, orientation, shape, spacing)
  r_idx, c_idx = np.meshgrid(
      np.arange(shape[1]), np.arange(shape[2]), indexing="ij"
  )

  def slice_hu(k):
    points = (
        ipp[k]
        + r_idx[..., None] * spacing[1] * col
        + c_idx[..., None] * spacing[2] * row
    ).reshape(-1, 3)
    return phantom.hu(points).reshape(shape[1:])

  ct_files, slice_uids = write_ct_series(
      folder,
      slice_hu,
      ids=ids,
      series_uid=ct_series,
      orientation=orientation,
      ipp=ipp,
      spacing=spacing,
      shape=shape,
      rng=rng,
  )

  from pydicom.dataset import Dataset

  ss_uid = _uid(rng)
  ds = _base(RTSTRUCT_STORAGE, ss_uid, "RTSTRUCT", ids)
  ds.SeriesInstanceUID, ds.StructureSetLabel = _uid(rng), "synthetic"
  ref_series = Dataset()
  ref_series.SeriesInstanceUID = ct_series
  ref_series.ContourImageSequence = Sequence([])
  for uid in slice_uids:
    item = Dataset()
    item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID = CT_STORAGE, uid
    ref_series.ContourImageSequence.append(item)
  ref_study = Dataset()
  ref_study.ReferencedSOPInstanceUID = ids["study"]
  ref_study.RTReferencedSeriesSequence = Sequence([ref_series])
  ref_frame = Dataset()
  ref_frame.FrameOfReferenceUID = ids["frame"]
  ref_frame.RTReferencedStudySequence = Sequence([ref_study])
  ds.ReferencedFrameOfReferenceSequence = Sequence([ref_frame])
  rois, contours, observations = [], [], []
  slice_z = ipp[:, 2]
  for number, s in enumerate(phantom.shapes, start=1):
    roi = Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID = number, ids["frame"]
    roi.ROIName, roi.ROIGenerationAlgorithm = s.name, "MANUAL"
    rois.append(roi)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber, roi_contour.ROIDisplayColor = number, [
        255,
        0,
        0,
    ]
    roi_contour.ContourSequence = Sequence([])
    for z, slice_uid in zip(slice_z, slice_uids):
      for points in phantom.contours(s.name, z):
        c = Dataset()
        image = Dataset()
        image.ReferencedSOPClassUID = CT_STORAGE
        image.ReferencedSOPInstanceUID = slice_uid
        c.ContourImageSequence = Sequence([image])
        c.ContourGeometricType = "CLOSED_PLANAR"
        c.NumberOfContourPoints = len(points)
        c.ContourData = [round(float(v), 3) for v in points.ravel()]
        roi_contour.ContourSequence.append(c)
    contours.append(roi_contour)
    obs = Dataset()
    obs.ObservationNumber, obs.ReferencedROINumber = number, number
    obs.RTROIInterpretedType, obs.ROIInterpreter = s.interpreted_type, ""
    observations.append(obs)
  # An empty ROI, a point and an open line: skipped with a warning.
  extra = [("Empty", None), ("Marker", "POINT"), ("Wire", "OPEN_PLANAR")]
  for offset, (name, kind) in enumerate(extra, start=len(phantom.shapes) + 1):
    roi = Dataset()
    roi.ROINumber, roi.ReferencedFrameOfReferenceUID = offset, ids["frame"]
    roi.ROIName, roi.ROIGenerationAlgorithm = name, "MANUAL"
    rois.append(roi)
    roi_contour = Dataset()
    roi_contour.ReferencedROINumber = offset
    if kind:
      c = Dataset()
      c.ContourGeometricType = kind
      pts = [phantom.centre + [0, 0, slice_z[1] - phantom.centre[2]]]
      if kind == "OPEN_PLANAR":
        pts.append(pts[0] + [10, 0, 0])
      c.NumberOfContourPoints = len(pts)
      c.ContourData = [float(v) for v in np.ravel(pts)]
      roi_contour.ContourSequence = Sequence([c])
    contours.append(roi_contour)
  ds.StructureSetROISequence = Sequence(rois)
  ds.ROIContourSequence = Sequence(contours)
  ds.RTROIObservationsSequence = Sequence(observations)
  rtstruct = _save(ds, folder, rng)

  rtplan = plan_uid = None
  if with_plan:
    plan_uid = _uid(rng)
    ds = _base(RTPLAN_STORAGE, plan_uid, "RTPLAN", ids)
    ds.SeriesInstanceUID, ds.RTPlanLabel = _uid(rng), "synthetic"
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = (
        RTSTRUCT_STORAGE,
        ss_uid,
    )
    ds.ReferencedStructureSetSequence = Sequence([ref])
    rtplan = _save(ds, folder, rng)

  rtdose = None
  if with_dose:
    rtdose = _write_dose(folder, phantom, ids, plan_uid, dose_spacing, rng)
  return {
      "phantom": phantom,
      "ct_files": ct_files,
      "rtstruct": rtstruct,
      "rtplan": rtplan,
      "rtdose": rtdose,
      "uids": {
          "study": ids["study"],
          "frame": ids["frame"],
          "ct_series": ct_series,
          "rtstruct": ss_uid,
          "rtplan": plan_uid,
      },
  }


def _write_dose(
    folder, phantom: Phantom, ids, plan_uid, spacing: float, rng
) -> Path:
  """An axial RT Dose (HFS orientation) over the body, frames inferior first."""
  from pydicom.dataset import Dataset
  from pydicom.sequence import Sequence

  half = np.array([90.0, 80.0, 60.0])
  n = (2 * half / spacing).astype(int) + 1
  first = phantom.centre - half  # voxel (0, 0, 0): right, anterior, inferior
  x = first[0] + np.arange(n[0]) * spacing
  y = first[1] + np.arange(n[1]) * spacing
  z = first[2] + np.arange(n[2]) * spacing
  zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
  dose = phantom.dose(np.stack([xx, yy, zz], -1).reshape(-1, 3)).reshape(
      zz.shape
  )
  scaling = dose.max() / 60000
  ds = _base(RTDOSE_STORAGE, _uid(rng), "RTDOSE", ids)
  ds.SeriesInstanceUID = _uid(rng)
  ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
  ds.ImagePositionPatient = [float(v) for v in first]
  ds.PixelSpacing = [spacing, spacing]
  ds.Rows, ds.Columns, ds.NumberOfFrames = int(n[1]), int(n[0]), int(n[2])
  ds.GridFrameOffsetVector = [float(v) for v in np.arange(n[2]) * spacing]
  ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
  ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = (
      16,
      16,
      15,
      0,
  )
  ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", "PLAN"
  ds.DoseGridScaling = f"{scaling:.10g}"
  if plan_uid:
    ref = Dataset()
    ref.ReferencedSOPClassUID, ref.ReferencedSOPInstanceUID = (
        RTPLAN_STORAGE,
        plan_uid,
    )
    ds.ReferencedRTPlanSequence = Sequence([ref])
  ds.PixelData = (
      np.rint(dose / float(ds.DoseGridScaling)).astype("<u2").tobytes()
  )
  return _save(ds, folder, rng)
