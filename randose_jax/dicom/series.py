"""Scanning a DICOM folder tree; CT series and RT Dose grids as volumes.

Geometry is taken from ImageOrientationPatient (IOP), ImagePositionPatient
(IPP) and PixelSpacing only, never from PatientPosition: the DICOM patient
coordinate system (LPS: +x patient left, +y posterior, +z head) is fixed to
the patient, so head-first / feet-first and supine / prone only change IOP
and the slice order, which these readers undo.

A stored CT series has axes (slice, row, column): slice along the normal
n = row cosine x column cosine (slices sorted by IPP . n, whatever the file
order), row index along the column cosine, column index along the row cosine
(PixelSpacing = [between rows, between columns]). `canonical` permutes and
flips such a grid into the project's axis order (formats.py, conventions.py:
0 anterior -> posterior, 1 right -> left, 2 superior -> inferior) without
interpolation. Only axis-aligned grids are supported: an oblique IOP, a gantry
tilt (IPP drifting in-plane from slice to slice), unequal slice spacing (a
missing slice) are errors naming a file.

Every number read from a header is checked (present, numeric, finite, and
positive where it must be); a bad one is an error naming the file. pydicom's
own warnings about value encodings are silenced while an import reads
(`quiet_pydicom`): the checks here report what matters, and a failed import
prints its one error line only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import warnings
from pathlib import Path

import numpy as np

from randose_jax.conventions import AXIS_DIRECTIONS_LPS
from randose_jax.dicom import DicomError

# Direction cosines within this of an axis count as axis-aligned.
AXIS_TOLERANCE = 1e-3
# Slice steps may differ from the median step by this much (mm, fraction).
SPACING_TOLERANCE_MM = 0.02
SPACING_TOLERANCE_FRACTION = 0.02
# IPP may drift off the slice normal by this much over a series (mm).
TILT_TOLERANCE_MM = 0.05
# The largest image read: Rows and Columns each, and voxels of a CT series
# or an RT Dose (2^30: 4 GiB as float32); larger ones are refused before
# anything is allocated.
MAX_IMAGE_SIDE = 4096
MAX_VOXELS = 2**30


@dataclasses.dataclass
class Instance:
  """One DICOM file, read without its pixel data."""

  path: Path
  modality: str
  patient_id: str
  patient_name: str
  study_uid: str
  series_uid: str
  frame_of_reference_uid: str
  sop_instance_uid: str
  header: object  # pydicom Dataset


@dataclasses.dataclass
class Scan:
  """What a folder tree holds, by kind."""

  ct_series: dict[str, list[Instance]]  # SeriesInstanceUID -> slices
  rtstructs: list[Instance]
  rtplans: list[Instance]
  rtdoses: list[Instance]
  not_dicom: list[Path]
  other_modalities: int


@contextlib.contextmanager
def quiet_pydicom():
  """Silences pydicom's warnings (the `warnings` module and its logger) in
  the block."""
  # pydicom's first import sets its logger's level: import it before.
  import pydicom  # pylint: disable=unused-import

  logger = logging.getLogger("pydicom")
  level = logger.level
  logger.setLevel(logging.ERROR)
  try:
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")
      yield
  finally:
    logger.setLevel(level)


def _bare_dataset(path) -> bool:
  """Whether a file without the DICOM preamble starts as a bare data set
  does (an old export, pydicom's own test files): its first element in
  group 0x0008, little-endian."""
  with open(path, "rb") as f:
    head = f.read(132)
  return head[128:132] != b"DICM" and head[:2] == b"\x08\x00"


def scan(input_dir) -> Scan:
  """Reads the header of every file under `input_dir` (any names, any depth).

  Files without the DICOM preamble are counted as not DICOM and skipped,
  unless they start as a bare data set does (group 0008: old exports,
  pydicom's test files), which are read; a DICOM file that cannot be read
  is an error, and so is an
  empty (0-byte) file: the mark of an interrupted copy, which would
  otherwise drop a slice without a word.

  Raises:
    DicomError: a missing folder, an empty file, or an unreadable DICOM
    file (named).
  """
  import pydicom
  from pydicom.errors import InvalidDicomError

  input_dir = Path(input_dir)
  if not input_dir.is_dir():
    raise DicomError(f"{input_dir}: input folder not found")
  result = Scan({}, [], [], [], [], 0)
  paths = sorted(
      Path(root) / name
      for root, _, names in os.walk(input_dir)
      for name in names
  )
  for path in paths:
    if os.path.getsize(path) == 0:
      raise DicomError(
          f"{path}: empty file (0 bytes), not a DICOM file: an "
          "interrupted copy? Copy it again or remove it"
      )
    bare = _bare_dataset(path)
    try:
      ds = pydicom.dcmread(path, stop_before_pixels=True, force=bare)
    except InvalidDicomError:
      result.not_dicom.append(path)
      continue
    except Exception as e:  # pylint: disable=broad-except
      if bare:  # only looked like a data set
        result.not_dicom.append(path)
        continue
      raise DicomError(
          f"{path}: not a readable DICOM file "
          f"({type(e).__name__}: {_first_line(e)})"
      ) from e
    modality = str(ds.get("Modality", "")).upper()
    inst = Instance(
        path=path,
        modality=modality,
        patient_id=str(ds.get("PatientID", "")),
        patient_name=str(ds.get("PatientName", "")),
        study_uid=str(ds.get("StudyInstanceUID", "")),
        series_uid=str(ds.get("SeriesInstanceUID", "")),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "")),
        sop_instance_uid=str(ds.get("SOPInstanceUID", "")),
        header=ds,
    )
    if modality == "CT":
      result.ct_series.setdefault(inst.series_uid, []).append(inst)
    elif modality == "RTSTRUCT":
      result.rtstructs.append(inst)
    elif modality == "RTPLAN":
      result.rtplans.append(inst)
    elif modality == "RTDOSE":
      result.rtdoses.append(inst)
    else:
      result.other_modalities += 1
  return result


def _syntax_of(inst: Instance) -> str:
  """' of transfer syntax <name>' from the file meta, or ''."""
  uid = getattr(
      getattr(inst.header, "file_meta", None), "TransferSyntaxUID", None
  )
  return f" of transfer syntax {uid.name}" if uid else ""


def _first_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return text[0] if text else ""


# ---------------------------------------------------------------- volumes


@dataclasses.dataclass
class Volume:
  """A volume in the project's axis order (0 A->P, 1 R->L, 2 S->I).

  Attributes:
    array: (D, H, W) values.
    spacing: float64 (3,) mm per axis.
    origin: float64 (3,) LPS mm of the centre of voxel (0, 0, 0).
  """

  array: np.ndarray
  spacing: np.ndarray
  origin: np.ndarray

  def axis_start(self) -> np.ndarray:
    """(3,) coordinate of voxel 0 along each axis' own direction (mm)."""
    return AXIS_DIRECTIONS_LPS @ self.origin

  def index_to_lps(self, index) -> np.ndarray:
    """LPS mm of (continuous) indices (..., 3)."""
    return (
        self.origin
        + (np.asarray(index, np.float64) * self.spacing) @ AXIS_DIRECTIONS_LPS
    )


@dataclasses.dataclass
class StoredGrid:
  """A grid as stored: axes (slice, row, column).

  Attributes:
    shape: (slices, rows, columns).
    directions: float64 (3, 3), LPS unit vector of each stored axis.
    spacing: float64 (3,) mm.
    origin: float64 (3,) LPS mm of stored voxel (0, 0, 0).
  """

  shape: tuple[int, int, int]
  directions: np.ndarray
  spacing: np.ndarray
  origin: np.ndarray

  def lps_to_index(self, points) -> np.ndarray:
    """Continuous stored indices (n, 3) of LPS points (n, 3)."""
    return (
        (np.asarray(points, np.float64) - self.origin) @ self.directions.T
    ) / self.spacing

  def to_canonical(self):
    """(permutation, flips): canonical axis a is stored axis permutation[a],
    reversed where flips[a]."""
    permutation, flips = [], []
    for target in AXIS_DIRECTIONS_LPS:
      dots = self.directions @ target
      stored = int(np.argmax(np.abs(dots)))
      permutation.append(stored)
      flips.append(bool(dots[stored] < 0))
    return permutation, flips


def canonical(array: np.ndarray, grid: StoredGrid) -> Volume:
  """The stored `array` (grid.shape) as a `Volume` in the project's axis
  order: a transpose and flips, no interpolation."""
  permutation, flips = grid.to_canonical()
  out = np.transpose(array, permutation)
  origin = grid.origin.copy()
  for axis, (stored, flip) in enumerate(zip(permutation, flips)):
    if flip:
      out = np.flip(out, axis)
      origin += (
          (grid.shape[stored] - 1)
          * grid.spacing[stored]
          * grid.directions[stored]
      )
  return Volume(
      np.ascontiguousarray(out),
      grid.spacing[permutation].astype(np.float64),
      origin,
  )


def _vector(ds, keyword: str, n: int | None, path) -> np.ndarray:
  """The attribute as float64 (n,) (any length >= 1 when n is None), every
  value a finite number; a DicomError naming the file and the value
  otherwise."""
  value = ds.get(keyword)
  if value is None or value == "":
    values = []
  elif isinstance(value, (str, bytes)) or not hasattr(value, "__iter__"):
    values = [value]  # a single value
  else:
    values = list(value)
  out = []
  for i, v in enumerate(values):
    try:
      number = float(v)
    except (TypeError, ValueError):
      number = float("nan")
    if not np.isfinite(number):
      raise DicomError(
          f"{path}: {keyword} value {i + 1} of {len(values)} is "
          f"{str(v)!r}, not a finite number"
      )
    out.append(number)
  if not out or (n is not None and len(out) != n):
    expected = "1 or more" if n is None else str(n)
    raise DicomError(
        f"{path}: {keyword} is missing or has {len(out)} values, "
        f"expected {expected} (got {_shown(value)})"
    )
  return np.array(out, np.float64)


def _number(ds, keyword: str, path, default: float | None = None) -> float:
  """A single-valued numeric attribute (`default` when absent or empty)."""
  if default is not None and ds.get(keyword) in (None, ""):
    return default
  return float(_vector(ds, keyword, 1, path)[0])


def _shown(value, limit: int = 80) -> str:
  text = repr(list(value) if isinstance(value, (list, tuple)) else value)
  return text if len(text) <= limit else text[:limit] + "..."


def _orientation(ds, path) -> tuple[np.ndarray, np.ndarray]:
  """(row cosine, column cosine), checked to be axis-aligned."""
  iop = _vector(ds, "ImageOrientationPatient", 6, path)
  row, col = iop[:3], iop[3:]
  for cosine in (row, col):
    norm = np.linalg.norm(cosine)
    if norm == 0 or np.sort(np.abs(cosine / norm))[1] > AXIS_TOLERANCE:
      raise DicomError(
          f"{path}: oblique ImageOrientationPatient {iop.tolist()}; "
          "only axis-aligned (axial, coronal or sagittal) grids "
          "are supported"
      )
  row = np.round(row / np.linalg.norm(row))
  col = np.round(col / np.linalg.norm(col))
  if abs(row @ col) > 0.5:
    raise DicomError(
        f"{path}: ImageOrientationPatient {iop.tolist()} has "
        "parallel row and column directions"
    )
  return row, col


def _pixel_spacing(ds, path) -> np.ndarray:
  spacing = _vector(ds, "PixelSpacing", 2, path)
  if np.any(spacing <= 0):
    raise DicomError(
        f"{path}: PixelSpacing {spacing.tolist()} must be positive"
    )
  return spacing


def image_size(ds, path, frames: int = 1) -> tuple[int, int]:
  """(Rows, Columns), each a positive integer of at most MAX_IMAGE_SIDE,
  with frames x Rows x Columns at most MAX_VOXELS; a DicomError naming the
  file and the element otherwise."""
  size = []
  for keyword in ("Rows", "Columns"):
    value = ds.get(keyword)
    try:
      n = int(value)
    except (TypeError, ValueError):
      n = 0
    if not 1 <= n <= MAX_IMAGE_SIDE:
      raise DicomError(
          f"{path}: {keyword} is {value!r}; it must be an integer from 1 to "
          f"{MAX_IMAGE_SIDE} (the largest image read)"
      )
    size.append(n)
  if frames * size[0] * size[1] > MAX_VOXELS:
    raise DicomError(
        f"{path}: {frames} x {size[0]} x {size[1]} voxels, more than the "
        f"{MAX_VOXELS:,} read at most"
    )
  return size[0], size[1]


def check_one_patient(slices: list[Instance]) -> None:
  """DicomError naming a file of the minority when a series' slices belong to
  several patients or frames of reference."""
  for attribute, what in (
      ("patient_id", "patients"),
      ("frame_of_reference_uid", "frames of reference"),
  ):
    values = [getattr(inst, attribute) for inst in slices]
    common = max(set(values), key=values.count)
    odd = [inst for inst in slices if getattr(inst, attribute) != common]
    if odd:
      raise DicomError(
          f"{odd[0].path}: CT series {slices[0].series_uid} mixes slices "
          f"of {what} {common!r} ({values.count(common)} slices) and "
          f"{getattr(odd[0], attribute)!r} ({len(odd)})"
      )


def ct_grid(slices: list[Instance]) -> tuple[StoredGrid, list[Instance]]:
  """Checks a CT series' geometry; returns its grid and the slices sorted
  along the normal.

  Raises:
    DicomError naming a file: slices of several patients, a missing or bad
    geometry attribute, orientations or sizes that differ, an oblique IOP,
    gantry tilt, two slices at one position, unequal slice spacing (a
    missing slice), fewer than two slices.
  """
  check_one_patient(slices)
  first = slices[0]
  series = first.series_uid
  if len(slices) < 2:
    raise DicomError(
        f"{first.path}: CT series {series} has a single slice; "
        "a volume needs at least two"
    )
  row, col = _orientation(first.header, first.path)
  spacing2 = _pixel_spacing(first.header, first.path)
  size = image_size(first.header, first.path, len(slices))
  normal = np.cross(row, col)
  positions = []
  for inst in slices:
    ds = inst.header
    if inst is not first:
      r, c = _orientation(ds, inst.path)
      if not (np.array_equal(r, row) and np.array_equal(c, col)):
        raise DicomError(
            f"{inst.path}: ImageOrientationPatient differs from "
            f"{first.path.name}'s in CT series {series}"
        )
      if not np.allclose(
          _pixel_spacing(ds, inst.path), spacing2, atol=1e-4
      ) or (image_size(ds, inst.path, len(slices)) != size):
        raise DicomError(
            f"{inst.path}: PixelSpacing or Rows/Columns differ from "
            f"{first.path.name}'s in CT series {series}"
        )
    positions.append(_vector(ds, "ImagePositionPatient", 3, inst.path))
  positions = np.array(positions)
  along = positions @ normal
  order = np.argsort(along, kind="stable")
  slices = [slices[i] for i in order]
  positions, along = positions[order], along[order]
  steps = np.diff(along)
  if np.any(steps <= 1e-3):
    i = int(np.argmax(steps <= 1e-3))
    raise DicomError(
        f"{slices[i + 1].path}: at the same position as "
        f"{slices[i].path.name} ({along[i]:.3f} mm along the normal) "
        f"in CT series {series}"
    )
  in_plane = positions - np.outer(along, normal)
  drift = np.linalg.norm(in_plane - in_plane[0], axis=1)
  if drift.max() > TILT_TOLERANCE_MM:
    i = int(np.argmax(drift))
    raise DicomError(
        f"{slices[i].path}: ImagePositionPatient is {drift[i]:.2f} mm "
        f"off the slice normal of {slices[0].path.name} (gantry tilt "
        "or a sheared series); only untilted series are supported"
    )
  step = float(np.median(steps))
  tolerance = max(SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * step)
  uneven = np.abs(steps - step) > tolerance
  if np.any(uneven):
    i = int(np.argmax(uneven))
    raise DicomError(
        f"{slices[i + 1].path}: {steps[i]:.3f} mm from the previous "
        f"slice ({slices[i].path.name}), {step:.3f} mm elsewhere in CT "
        f"series {series}: a missing slice or uneven spacing, which "
        "is not supported"
    )
  grid = StoredGrid(
      shape=(len(slices), size[0], size[1]),
      directions=np.stack([normal, col, row]),
      spacing=np.array([step, spacing2[0], spacing2[1]]),
      origin=positions[0],
  )
  return grid, slices


def read_ct_pixels(slices: list[Instance], grid: StoredGrid) -> np.ndarray:
  """float32 (slices, rows, columns) HU of sorted slices.

  Raises:
    DicomError naming the file: unreadable or truncated pixel data.
  """
  import pydicom

  out = np.empty(grid.shape, np.float32)
  for k, inst in enumerate(slices):
    try:
      ds = pydicom.dcmread(inst.path)
      pixels = ds.pixel_array
    except Exception as e:  # pylint: disable=broad-except
      raise DicomError(
          f"{inst.path}: cannot read the pixel data{_syntax_of(inst)} "
          f"({type(e).__name__}: {_first_line(e)})"
      ) from e
    if pixels.shape != grid.shape[1:]:
      raise DicomError(
          f"{inst.path}: pixel data has shape {pixels.shape}, "
          f"expected {grid.shape[1:]}"
      )
    slope = _number(ds, "RescaleSlope", inst.path, default=1.0) or 1.0
    intercept = _number(ds, "RescaleIntercept", inst.path, default=0.0)
    out[k] = pixels.astype(np.float32) * slope + intercept
  return out


def load_rtdose(inst: Instance) -> Volume:
  """An RT Dose grid (Gy) as a `Volume` in the project's axis order.

  Raises:
    DicomError naming the file: units other than GY, missing attributes,
    a DoseGridScaling that is not a positive number, GridFrameOffsetVector
    values that are not finite, an oblique grid, unequal frame spacing,
    unreadable pixel data, negative dose values.
  """
  import pydicom

  path = inst.path
  try:
    ds = pydicom.dcmread(path)
  except Exception as e:  # pylint: disable=broad-except
    raise DicomError(
        f"{path}: not a readable DICOM file "
        f"({type(e).__name__}: {_first_line(e)})"
    ) from e
  if str(ds.get("DoseUnits", "")).upper() != "GY":
    raise DicomError(
        f"{path}: DoseUnits is {ds.get('DoseUnits')!r}, only GY is supported"
    )
  if "DoseGridScaling" not in ds or "PixelData" not in ds:
    raise DicomError(f"{path}: DoseGridScaling or PixelData is missing")
  row, col = _orientation(ds, path)
  spacing2 = _pixel_spacing(ds, path)
  n_frames = _number(ds, "NumberOfFrames", path, default=1.0)
  if n_frames != int(n_frames) or not 1 <= n_frames <= MAX_VOXELS:
    raise DicomError(f"{path}: NumberOfFrames {n_frames!r} is not a count")
  n_frames = int(n_frames)
  rows, columns = image_size(ds, path, n_frames)
  try:
    pixels = np.asarray(ds.pixel_array).reshape(n_frames, rows, columns)
  except Exception as e:  # pylint: disable=broad-except
    raise DicomError(
        f"{path}: cannot read the pixel data{_syntax_of(inst)} "
        f"({type(e).__name__}: {_first_line(e)})"
    ) from e
  scaling = _number(ds, "DoseGridScaling", path)
  if scaling <= 0:
    raise DicomError(f"{path}: DoseGridScaling {scaling!r} must be positive")
  dose = pixels.astype(np.float64) * scaling
  if dose.min() < 0:
    raise DicomError(
        f"{path}: {np.count_nonzero(dose < 0)} negative dose values "
        f"(min {dose.min():.6g} Gy); a dose must be >= 0"
    )
  if n_frames > 1:
    offsets = _vector(ds, "GridFrameOffsetVector", None, path)
    if offsets.shape != (n_frames,):
      raise DicomError(
          f"{path}: GridFrameOffsetVector has {offsets.size} values "
          f"for {n_frames} frames"
      )
    offsets = offsets - offsets[0]
    order = np.argsort(offsets, kind="stable")
    dose, offsets = dose[order], offsets[order]
    steps = np.diff(offsets)
    if np.any(steps <= 0) or np.ptp(steps) > max(
        SPACING_TOLERANCE_MM, SPACING_TOLERANCE_FRACTION * steps[0]
    ):
      raise DicomError(
          f"{path}: dose frames are not equally spaced "
          f"(GridFrameOffsetVector {offsets.tolist()[:8]}...)"
      )
    step, first_offset = float(np.median(steps)), float(offsets[0])
  else:
    step, first_offset = (
        _number(ds, "SliceThickness", path, default=1.0) or 1.0,
        0.0,
    )
  normal = np.cross(row, col)
  origin = _vector(ds, "ImagePositionPatient", 3, path) + first_offset * normal
  grid = StoredGrid(
      (n_frames, rows, columns),
      np.stack([normal, col, row]),
      np.array([step, spacing2[0], spacing2[1]]),
      origin,
  )
  return canonical(dose, grid)
