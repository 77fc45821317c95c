"""Clinical file formats for predicted dose: NIfTI and DICOM RT Dose.

Geometry conventions (one place; `viz.py` reads the same constant)
------------------------------------------------------------------
A dose volume is a numpy array `(D, H, W)` in Gy on the OpenKBP grid:

  array axis 0: anterior -> posterior        spacing voxel_dimensions[0] mm
  array axis 1: patient right -> left        spacing voxel_dimensions[1] mm
  array axis 2: superior -> inferior         spacing voxel_dimensions[2] mm

The direction of axis 1 is an assumption: OpenKBP does not document it. It is
inferred from the data's own labels: in every one of the 25 sample patients
with both parotids the LeftParotid centroid has a larger axis-1 index than the
RightParotid one. `AXIS_DIRECTIONS_LPS` encodes it; change it there only.

OpenKBP drops the scanner's coordinates, so the world position is a choice:
by default the grid centre sits at the patient-coordinate origin (0, 0, 0)
(`origin_lps_mm` overrides it with the position of voxel (0, 0, 0)). NIfTI and
DICOM files of the same volume therefore overlay exactly in a viewer.

NIfTI: the data are stored unpermuted, so NIfTI (i, j, k) = array axes
(0, 1, 2) and `nibabel.load(path).get_fdata()` returns the project's array.
The affine maps them to RAS+ world mm with the true anatomical directions:
i -> -y (posterior), j -> -x (patient left), k -> -z (inferior); axis codes
('P', 'L', 'I'). Its columns have norms equal to voxel_dimensions (the header
zooms), but the affine is not diagonal: a diagonal affine would tell every
viewer that axis 0 runs towards the patient's right, i.e. mislabel anatomy.
In LPS (DICOM) terms the same directions are +y, +x, -z.

DICOM RT Dose: one frame per axial slice (plane of constant axis-2 index).
Within a frame, DICOM rows run along array axis 0 and columns along axis 1:
  pixel row r    = axis-0 index  (column direction cosine (0, 1, 0): posterior)
  pixel column c = axis-1 index  (row direction cosine (1, 0, 0): patient left)
so ImageOrientationPatient = [1, 0, 0, 0, 1, 0] and PixelSpacing =
[voxel_dimensions[0], voxel_dimensions[1]] (row spacing, column spacing). This
is the standard radiological axial view: anterior up, patient right on the
viewer's left. The slice normal (row x column cosine) is +z (superior), so the
frames are written from inferior to superior: frame f holds axis-2 index
W - 1 - f, ImagePositionPatient is the centre of voxel (0, 0, W - 1), and
GridFrameOffsetVector = [0, s2, 2 s2, ...] increases monotonically (the layout
every reader accepts; negative offsets confuse some planning systems).
`read_rtdose` undoes this and also accepts other axis-aligned axial layouts.

`write_rtdose(..., image_orientation_patient=IOP)` writes another
axis-aligned layout instead, e.g. a CT's own (`predict --dicom_grid=ct`):
frames along the normal n = row cosine x column cosine, in increasing
position along n (GridFrameOffsetVector 0, s, 2s, ...), rows along the
column cosine, columns along the row cosine, each a permutation and flip of
the array axes, so that each frame lies on one CT image when the dose has
the CT's voxel centres. The default IOP [1, 0, 0, 0, 1, 0] is the layout
above.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from randose_jax import fileio
from randose_jax.conventions import AXIS_DIRECTIONS_LPS

# Axis 1 -> patient left is the assumption above.

RT_DOSE_STORAGE = '1.2.840.10008.5.1.4.1.1.481.2'
RT_PLAN_STORAGE = '1.2.840.10008.5.1.4.1.1.481.5'
RT_STRUCTURE_SET_STORAGE = '1.2.840.10008.5.1.4.1.1.481.3'
_UID_NAMESPACE = 'randose_jax'
_DOSE_BITS = (16, 32)


# ----------------------------------------------------------------------------
# Validation and geometry


def _check_dose(dose_gy, path) -> np.ndarray:
  """Returns `dose_gy` as float64 (D,H,W); ValueError naming `path` if invalid."""
  dose = np.asarray(dose_gy)
  if dose.ndim != 3 or min(dose.shape) < 1:
    raise ValueError(
        f'{path}: dose must be a non-empty 3-D array (D,H,W), got shape {dose.shape}'
    )
  if not (
      np.issubdtype(dose.dtype, np.floating)
      or np.issubdtype(dose.dtype, np.integer)
      or dose.dtype == bool
  ):
    raise ValueError(f'{path}: dose must be numeric, got dtype {dose.dtype}')
  dose = dose.astype(np.float64)
  if not np.all(np.isfinite(dose)):
    bad = np.count_nonzero(~np.isfinite(dose))
    raise ValueError(f'{path}: dose contains {bad} NaN or inf voxels')
  if dose.min() < 0:
    raise ValueError(
        f'{path}: dose contains {np.count_nonzero(dose < 0)} negative voxels '
        f'(min {dose.min():.6g} Gy); clip it at 0 first'
    )
  return dose


def _check_voxel_dimensions(voxel_dimensions, path) -> np.ndarray:
  """Returns voxel_dimensions as float64 (3,) mm; ValueError naming `path` if invalid."""
  vd = np.asarray(voxel_dimensions, dtype=np.float64)
  if vd.shape != (3,) or not np.all(np.isfinite(vd)) or np.any(vd <= 0):
    raise ValueError(
        f'{path}: voxel_dimensions must be three positive finite mm values, '
        f'got {voxel_dimensions!r}'
    )
  return vd


def _voxel0_lps(shape, voxel_dimensions, origin_lps_mm, path) -> np.ndarray:
  """LPS position (mm, (3,)) of the centre of voxel (0, 0, 0)."""
  if origin_lps_mm is not None:
    origin = np.asarray(origin_lps_mm, dtype=np.float64)
    if origin.shape != (3,) or not np.all(np.isfinite(origin)):
      raise ValueError(
          f'{path}: origin_lps_mm must be three finite mm values, '
          f'got {origin_lps_mm!r}'
      )
    return origin
  # Grid centre at the origin.
  centre_index = (np.asarray(shape, dtype=np.float64) - 1) / 2
  return -(AXIS_DIRECTIONS_LPS.T * voxel_dimensions) @ centre_index


def index_to_lps_matrix(
    shape, voxel_dimensions, origin_lps_mm=None
) -> np.ndarray:
  """4x4 affine from array index (axis 0, 1, 2) to DICOM patient LPS mm.

  Args:
    shape: the volume's (D, H, W).
    voxel_dimensions: (3,) mm per array axis.
    origin_lps_mm: LPS mm of voxel (0, 0, 0)'s centre; None centres the grid.
  """
  vd = _check_voxel_dimensions(voxel_dimensions, 'index_to_lps_matrix')
  affine = np.eye(4)
  affine[:3, :3] = AXIS_DIRECTIONS_LPS.T * vd
  affine[:3, 3] = _voxel0_lps(shape, vd, origin_lps_mm, 'index_to_lps_matrix')
  return affine


# ----------------------------------------------------------------------------
# NIfTI


def _nifti_suffix(path) -> str:
  name = Path(path).name.lower()
  if name.endswith('.nii.gz'):
    return '.nii.gz'
  if name.endswith('.nii'):
    return '.nii'
  raise ValueError(f'{path}: a NIfTI file name must end in .nii or .nii.gz')


def write_nifti(
    path,
    dose_gy,
    voxel_dimensions,
    *,
    origin_lps_mm=None,
    overwrite: bool = False,
) -> Path:
  """Writes a dose volume as NIfTI-1 (float32 Gy), atomically.

  Args:
    path: output file, ending in `.nii.gz` (compressed) or `.nii`.
    dose_gy: (D,H,W) dose in Gy, finite and >= 0; axes as in the module docstring.
    voxel_dimensions: (3,) mm per array axis.
    origin_lps_mm: DICOM LPS mm of voxel (0,0,0); None centres the grid at 0.
    overwrite: replace an existing file (otherwise FileExistsError).

  Returns:
    The path written. NIfTI (i,j,k) = array axes (0,1,2); the affine (sform and
    qform, code 'aligned') gives RAS+ mm with axis codes ('P', 'L', 'I').
  """
  import nibabel as nib  # Imported here: only the file writers need it.

  suffix = _nifti_suffix(path)
  dose = _check_dose(dose_gy, path)
  vd = _check_voxel_dimensions(voxel_dimensions, path)
  lps_to_ras = np.diag([-1.0, -1.0, 1.0, 1.0])
  affine = lps_to_ras @ index_to_lps_matrix(dose.shape, vd, origin_lps_mm)

  img = nib.Nifti1Image(dose.astype(np.float32), affine)
  header = img.header
  header.set_data_dtype(np.float32)
  header.set_xyzt_units(xyz='mm')
  # 'aligned': the axes are anatomically true but the origin is not the scanner's.
  img.set_sform(affine, code='aligned')
  img.set_qform(affine, code='aligned')
  header['descrip'] = b'dose [Gy] randose_jax'
  header['cal_min'] = 0.0
  header['cal_max'] = float(dose.max())

  with fileio.atomic_path(path, overwrite=overwrite, suffix=suffix) as tmp:
    nib.save(img, str(tmp))
  return Path(path)


# ----------------------------------------------------------------------------
# DICOM RT Dose


def patient_uid(patient_id: str, kind: str) -> str:
  """A DICOM UID derived deterministically from (patient_id, kind).

  Every file written for one patient shares e.g. `patient_uid(pid,
  'frame_of_reference')`, so viewers register them without extra input.
  """
  from pydicom.uid import generate_uid

  return str(generate_uid(entropy_srcs=[_UID_NAMESPACE, kind, str(patient_id)]))


def _dose_grid_scaling(max_dose: float, bits: int) -> tuple[float, str]:
  """(scaling, its DS string): max_dose / scaling lands just under 2**bits - 1.

  The scaling is chosen from its 16-character decimal string, the value a
  reader sees, so that quantisation is exactly with that value.
  """
  from pydicom.valuerep import format_number_as_ds

  top = 2**bits - 1
  if max_dose <= 0:
    return 1.0, '1.0'
  scaling = max_dose / top
  for _ in range(64):
    text = format_number_as_ds(scaling)
    value = float(text)
    if max_dose / value <= top:
      return value, text
    scaling *= 1 + 1e-9
  raise AssertionError(
      f'no DS string for DoseGridScaling near {max_dose / top!r}'
  )


def _check_patient_id(patient_id, path) -> str:
  if not isinstance(patient_id, str) or not patient_id.strip():
    raise ValueError(
        f'{path}: patient_id must be a non-empty string, got {patient_id!r}'
    )
  if len(patient_id) > 64 or '\\' in patient_id or not patient_id.isprintable():
    raise ValueError(
        f'{path}: patient_id {patient_id!r} is not a valid DICOM LO value '
        '(at most 64 printable characters, no backslash)'
    )
  return patient_id


def write_rtdose(
    path,
    dose_gy,
    voxel_dimensions,
    patient_id: str,
    *,
    frame_of_reference_uid: str | None = None,
    study_instance_uid: str | None = None,
    series_instance_uid: str | None = None,
    referenced_rt_plan_uid: str | None = None,
    referenced_structure_set_uid: str | None = None,
    patient_name: str | None = None,
    origin_lps_mm=None,
    bits_allocated: int = 32,
    image_orientation_patient=None,
    overwrite: bool = False,
) -> Path:
  """Writes a dose volume as a DICOM RT Dose file (explicit VR little endian), atomically.

  Args:
    path: output file (conventionally `.dcm`).
    dose_gy: (D,H,W) dose in Gy, finite and >= 0; axes as in the module docstring.
    voxel_dimensions: (3,) mm per array axis.
    patient_id: PatientID and PatientName.
    frame_of_reference_uid, study_instance_uid: None derives them from
      `patient_id` (`patient_uid`), so all files of one patient share them.
    series_instance_uid: None makes a new one (each export is a new series).
    referenced_rt_plan_uid: SOP Instance UID of the RT Plan this dose belongs
      to. ReferencedRTPlanSequence is type 1C for DoseSummationType PLAN, but a
      predicted dose has no plan, so it is left out when this is None.
    referenced_structure_set_uid: SOP Instance UID of the RT Structure Set the
      dose was predicted from (ReferencedStructureSetSequence); None leaves it out.
    patient_name: PatientName; None uses `patient_id`.
    origin_lps_mm: LPS mm of voxel (0,0,0); None centres the grid at 0.
    bits_allocated: 32 (default) or 16 bits unsigned per voxel. DoseGridScaling
      maps the maximum dose near the top of that range; the stored dose is
      within DoseGridScaling / 2 of `dose_gy`.
    image_orientation_patient: six direction cosines (row, column), axis-aligned
      within 1e-3, written as given; the frames, rows and columns follow them
      (module docstring). None: [1, 0, 0, 0, 1, 0], the standard axial layout.
    overwrite: replace an existing file (otherwise FileExistsError).

  Returns:
    The path written.
  """
  import pydicom
  from pydicom.dataset import Dataset, FileMetaDataset
  from pydicom.sequence import Sequence as DicomSequence
  from pydicom.uid import ExplicitVRLittleEndian, PYDICOM_IMPLEMENTATION_UID, generate_uid

  dose = _check_dose(dose_gy, path)
  vd = _check_voxel_dimensions(voxel_dimensions, path)
  patient_id = _check_patient_id(patient_id, path)
  if bits_allocated not in _DOSE_BITS:
    raise ValueError(
        f'{path}: bits_allocated must be one of {_DOSE_BITS}, got {bits_allocated!r}'
    )
  for name, uid in (
      ('frame_of_reference_uid', frame_of_reference_uid),
      ('study_instance_uid', study_instance_uid),
      ('series_instance_uid', series_instance_uid),
      ('referenced_rt_plan_uid', referenced_rt_plan_uid),
      ('referenced_structure_set_uid', referenced_structure_set_uid),
  ):
    if uid is not None and not pydicom.uid.UID(uid).is_valid:
      raise ValueError(f'{path}: {name} {uid!r} is not a valid DICOM UID')

  iop, permutation, flips = _stored_layout(image_orientation_patient, path)
  scaling, scaling_text = _dose_grid_scaling(float(dose.max()), bits_allocated)
  top = 2**bits_allocated - 1
  pixels = np.clip(np.rint(dose / scaling), 0, top).astype(
      f'<u{bits_allocated // 8}'
  )
  # (D,H,W) -> (frames, rows, columns): stored axis s is array axis
  # permutation[s], reversed where flips[s] (default: frames W reversed,
  # inferior first; rows D (axis 0); columns H (axis 1)).
  for axis in range(3):
    if flips[permutation.index(axis)]:
      pixels = np.flip(pixels, axis)
  frames = np.ascontiguousarray(np.transpose(pixels, permutation))
  n_frames, rows, columns = frames.shape

  to_lps = index_to_lps_matrix(dose.shape, vd, origin_lps_mm)
  first_voxel = [
      dose.shape[a] - 1 if flips[permutation.index(a)] else 0 for a in range(3)
  ]
  first_frame_lps = to_lps @ np.array([*first_voxel, 1.0])
  stored_spacing = vd[permutation]
  offsets = np.arange(n_frames) * stored_spacing[0]

  sop_instance_uid = generate_uid()
  now = datetime.datetime.now()
  date, time = now.strftime('%Y%m%d'), now.strftime('%H%M%S')

  meta = FileMetaDataset()
  meta.MediaStorageSOPClassUID = RT_DOSE_STORAGE
  meta.MediaStorageSOPInstanceUID = sop_instance_uid
  meta.TransferSyntaxUID = ExplicitVRLittleEndian
  meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
  meta.ImplementationVersionName = 'RANDOSE_JAX'

  ds = Dataset()
  ds.file_meta = meta
  # SOP Common
  ds.SpecificCharacterSet = 'ISO_IR 100'
  ds.SOPClassUID = RT_DOSE_STORAGE
  ds.SOPInstanceUID = sop_instance_uid
  ds.InstanceCreationDate, ds.InstanceCreationTime = date, time
  # Patient
  ds.PatientName = patient_name if patient_name is not None else patient_id
  ds.PatientID = patient_id
  ds.PatientBirthDate = ''
  ds.PatientSex = ''
  # General Study
  ds.StudyInstanceUID = study_instance_uid or patient_uid(patient_id, 'study')
  ds.StudyDate, ds.StudyTime = '', ''
  ds.ReferringPhysicianName = ''
  ds.StudyID = ''
  ds.AccessionNumber = ''
  # RT Series
  ds.Modality = 'RTDOSE'
  ds.SeriesInstanceUID = series_instance_uid or generate_uid()
  ds.SeriesNumber = 1
  ds.SeriesDescription = 'Predicted dose (randose_jax)'
  ds.OperatorsName = ''
  # Frame of Reference
  ds.FrameOfReferenceUID = frame_of_reference_uid or patient_uid(
      patient_id, 'frame_of_reference'
  )
  ds.PositionReferenceIndicator = ''
  # General Equipment
  ds.Manufacturer = 'randose_jax'
  ds.SoftwareVersions = _software_version()
  # General Image
  ds.InstanceNumber = 1
  ds.ContentDate, ds.ContentTime = date, time
  # Image Plane
  ds.PixelSpacing = [
      _ds(stored_spacing[1]),
      _ds(stored_spacing[2]),
  ]  # [between rows, columns]
  ds.ImageOrientationPatient = iop
  ds.ImagePositionPatient = [_ds(v) for v in first_frame_lps[:3]]
  ds.SliceThickness = _ds(stored_spacing[0])
  # Image Pixel + Multi-frame
  ds.SamplesPerPixel = 1
  ds.PhotometricInterpretation = 'MONOCHROME2'
  ds.Rows = rows
  ds.Columns = columns
  ds.NumberOfFrames = n_frames
  ds.FrameIncrementPointer = pydicom.tag.Tag(
      0x3004, 0x000C
  )  # GridFrameOffsetVector
  ds.BitsAllocated = bits_allocated
  ds.BitsStored = bits_allocated
  ds.HighBit = bits_allocated - 1
  ds.PixelRepresentation = 0
  # RT Dose
  ds.DoseUnits = 'GY'
  ds.DoseType = 'PHYSICAL'
  ds.DoseSummationType = 'PLAN'
  ds.DoseComment = 'Predicted by a model, not computed by a planning system'
  ds.GridFrameOffsetVector = [_ds(v) for v in offsets]
  ds.DoseGridScaling = scaling_text
  if referenced_rt_plan_uid is not None:
    plan = Dataset()
    plan.ReferencedSOPClassUID = RT_PLAN_STORAGE
    plan.ReferencedSOPInstanceUID = referenced_rt_plan_uid
    ds.ReferencedRTPlanSequence = DicomSequence([plan])
  if referenced_structure_set_uid is not None:
    structure_set = Dataset()
    structure_set.ReferencedSOPClassUID = RT_STRUCTURE_SET_STORAGE
    structure_set.ReferencedSOPInstanceUID = referenced_structure_set_uid
    ds.ReferencedStructureSetSequence = DicomSequence([structure_set])
  ds.PixelData = frames.tobytes()
  ds['PixelData'].VR = 'OW'

  def write(tmp: Path) -> None:
    if int(pydicom.__version__.split('.')[0]) >= 3:
      pydicom.dcmwrite(tmp, ds, enforce_file_format=True)
    else:  # pydicom 2.x
      ds.is_little_endian, ds.is_implicit_VR = True, False
      pydicom.dcmwrite(str(tmp), ds, write_like_original=False)

  with fileio.atomic_path(path, overwrite=overwrite, suffix='.dcm') as tmp:
    write(tmp)
  return Path(path)


def _stored_layout(image_orientation_patient, path):
  """(IOP as written, permutation, flips): stored axis s (frame, row,
  column) runs along array axis permutation[s], reversed where flips[s]."""
  if image_orientation_patient is None:
    iop, written = np.array([1.0, 0, 0, 0, 1, 0]), [1, 0, 0, 0, 1, 0]
  else:
    try:
      iop = np.array([float(v) for v in image_orientation_patient], np.float64)
    except (TypeError, ValueError):
      iop = np.zeros(0)
    if iop.shape != (6,) or not np.all(np.isfinite(iop)):
      raise ValueError(
          f'{path}: image_orientation_patient must be six finite numbers, '
          f'got {image_orientation_patient!r}'
      )
    written = [_ds(v) for v in iop]
  row, col = iop[:3], iop[3:]
  directions = []
  for cosine in (np.cross(row, col), col, row):
    norm = np.linalg.norm(cosine)
    if norm == 0 or np.sort(np.abs(cosine / norm))[1] > 1e-3:
      raise ValueError(
          f'{path}: image_orientation_patient {iop.tolist()} is not '
          'axis-aligned (oblique grids are not supported)'
      )
    directions.append(np.round(cosine / norm))
  dots = np.stack(directions) @ AXIS_DIRECTIONS_LPS.T  # (stored, array axis)
  permutation = [int(np.argmax(np.abs(d))) for d in dots]
  if sorted(permutation) != [0, 1, 2]:
    raise ValueError(
        f'{path}: image_orientation_patient {iop.tolist()} has parallel '
        'row and column directions'
    )
  flips = [bool(dots[s, permutation[s]] < 0) for s in range(3)]
  return written, permutation, flips


def _ds(value: float) -> str:
  """A float as a DICOM DS string (at most 16 characters)."""
  from pydicom.valuerep import format_number_as_ds

  value = float(value)
  return '0' if value == 0 else format_number_as_ds(value)


def _software_version() -> str:
  from randose_jax import __version__

  return f'randose_jax {__version__}'


def read_rtdose(path) -> tuple[np.ndarray, np.ndarray]:
  """Reads a DICOM RT Dose file into the project's (D,H,W) axis order.

  Accepts files from `write_rtdose` and any other axis-aligned axial dose grid
  (either frame order; relative or absolute GridFrameOffsetVector; rows and
  columns along either in-plane axis, either sign).

  Returns:
    dose_gy: float64 (D,H,W) Gy (stored integers x DoseGridScaling); axes
      anterior->posterior, right->left, superior->inferior.
    voxel_dimensions: float64 (3,) mm per returned array axis.
  """
  import pydicom

  path = Path(path)
  if not path.is_file():
    raise FileNotFoundError(f'{path}: no such DICOM file')
  try:
    ds = pydicom.dcmread(str(path))
  except Exception as e:  # pydicom raises several types for a bad file.
    raise ValueError(f'{path}: not a readable DICOM file ({e})') from e

  if ds.get('Modality') != 'RTDOSE':
    raise ValueError(
        f'{path}: Modality is {ds.get("Modality")!r}, expected RTDOSE'
    )
  if str(ds.get('DoseUnits', '')).upper() != 'GY':
    raise ValueError(
        f'{path}: DoseUnits is {ds.get("DoseUnits")!r}, only GY is supported'
    )
  for keyword in (
      'PixelData',
      'Rows',
      'Columns',
      'PixelSpacing',
      'ImageOrientationPatient',
      'DoseGridScaling',
  ):
    if keyword not in ds:
      raise ValueError(f'{path}: required attribute {keyword} is missing')

  n_frames = int(ds.get('NumberOfFrames', 1) or 1)
  pixels = np.asarray(ds.pixel_array).reshape(
      n_frames, int(ds.Rows), int(ds.Columns)
  )
  dose = pixels.astype(np.float64) * float(ds.DoseGridScaling)

  orientation = np.array([float(v) for v in ds.ImageOrientationPatient])
  row_cosine, column_cosine = orientation[:3], orientation[3:]
  normal = np.cross(row_cosine, column_cosine)
  row_spacing, column_spacing = (float(v) for v in ds.PixelSpacing)

  # Frame positions along the normal: relative offsets (first 0), or absolute z
  # (only allowed with the standard axial orientation, where normal = +z).
  if n_frames > 1:
    if 'GridFrameOffsetVector' not in ds:
      raise ValueError(
          f'{path}: multi-frame dose without GridFrameOffsetVector'
      )
    offsets = np.array([float(v) for v in ds.GridFrameOffsetVector])
    if offsets.shape != (n_frames,):
      raise ValueError(
          f'{path}: GridFrameOffsetVector has {offsets.size} values '
          f'for {n_frames} frames'
      )
    if offsets[0] != 0:
      offsets = offsets - offsets[0]
    order = np.argsort(offsets, kind='stable')
    dose, offsets = dose[order], offsets[order]
    steps = np.diff(offsets)
    if np.any(steps <= 0) or not np.allclose(
        steps, steps[0], rtol=1e-3, atol=1e-3
    ):
      raise ValueError(
          f'{path}: frames are not equally spaced (offsets {offsets.tolist()})'
      )
    frame_spacing = float(steps[0])
  else:
    frame_spacing = float(ds.get('SliceThickness') or 0) or 1.0

  # LPS direction of each stored axis: frames (sorted) along +normal, rows
  # along the column cosine, columns along the row cosine.
  directions = np.stack([normal, column_cosine, row_cosine])
  spacings = np.array([frame_spacing, row_spacing, column_spacing])
  if not np.allclose(np.sort(np.abs(directions), axis=1)[:, :2], 0, atol=1e-3):
    raise ValueError(
        f'{path}: oblique ImageOrientationPatient {orientation.tolist()}; '
        'only axis-aligned dose grids are supported'
    )

  # For each project axis, find the stored axis along the same world axis and
  # flip it when it runs the opposite way.
  permutation, flips = [], []
  for target in AXIS_DIRECTIONS_LPS:
    dots = directions @ target
    stored = int(np.argmax(np.abs(dots)))
    permutation.append(stored)
    flips.append(dots[stored] < 0)
  if sorted(permutation) != [0, 1, 2]:
    raise ValueError(
        f'{path}: cannot map the dose grid onto patient axes '
        f'(ImageOrientationPatient {orientation.tolist()})'
    )
  dose = np.transpose(dose, permutation)
  for axis, flip in enumerate(flips):
    if flip:
      dose = np.flip(dose, axis)
  return np.ascontiguousarray(dose), spacings[permutation]


# ----------------------------------------------------------------------------
# Both formats for one patient

FORMAT_SUFFIXES = {'nifti': '.nii.gz', 'dicom': '.dcm'}


def write_prediction_formats(
    out_dir,
    patient_id: str,
    dose_gy,
    voxel_dimensions,
    formats: Sequence[str] = ('nifti', 'dicom'),
    *,
    overwrite: bool = False,
    **dicom_kwargs,
) -> list[Path]:
  """Writes one patient's dose as `<out_dir>/<patient_id>.nii.gz` and/or `.dcm`.

  Args:
    out_dir: output folder (created if missing).
    patient_id: file stem and DICOM PatientID.
    dose_gy: (D,H,W) dose in Gy; voxel_dimensions: (3,) mm.
    formats: any of 'nifti', 'dicom'.
    overwrite: replace existing files; otherwise FileExistsError, checked for
      every requested file before anything is written.
    **dicom_kwargs: passed to `write_rtdose` (UIDs, bits_allocated, origin_lps_mm,
      image_orientation_patient, patient_name; origin_lps_mm also goes to
      `write_nifti`), except
      `dicom_patient_id`: the DICOM PatientID when it differs from the file stem.

  Returns:
    The paths written, in the order of `formats`.
  """
  dicom_patient_id = dicom_kwargs.pop('dicom_patient_id', None) or patient_id
  unknown = [f for f in formats if f not in FORMAT_SUFFIXES]
  if unknown or not formats:
    raise ValueError(
        f'{out_dir}: formats must be a non-empty subset of '
        f'{sorted(FORMAT_SUFFIXES)}, got {list(formats)!r}'
    )
  if (
      not isinstance(patient_id, str)
      or not patient_id
      or '/' in patient_id
      or os.sep in patient_id
      or patient_id in ('.', '..')
  ):
    raise ValueError(
        f'{out_dir}: patient_id {patient_id!r} cannot be used as a file name'
    )
  out_dir = Path(out_dir)
  paths = [out_dir / f'{patient_id}{FORMAT_SUFFIXES[f]}' for f in formats]
  if not overwrite:
    existing = [str(p) for p in paths if p.exists()]
    if existing:
      raise FileExistsError(
          f'{", ".join(existing)}: already exist(s); '
          'pass overwrite=True to replace'
      )
  written = []
  for fmt, path in zip(formats, paths):
    if fmt == 'nifti':
      written.append(
          write_nifti(
              path,
              dose_gy,
              voxel_dimensions,
              overwrite=overwrite,
              origin_lps_mm=dicom_kwargs.get('origin_lps_mm'),
          )
      )
    else:
      written.append(
          write_rtdose(
              path,
              dose_gy,
              voxel_dimensions,
              dicom_patient_id,
              overwrite=overwrite,
              **dicom_kwargs,
          )
      )
  return written
