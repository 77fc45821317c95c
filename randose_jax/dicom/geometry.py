"""`dicom_geometry.json`: what an imported patient folder needs to go back to
the clinic's frame, and the RT Dose written in it.

The import grid has the project's axes (formats.py: 0 anterior -> posterior,
1 right -> left, 2 superior -> inferior; `axis_directions_lps`) with
`voxel_dimensions` mm and voxel (0, 0, 0) centred at `origin_lps_mm`, in the
CT's frame of reference. `ct_grid` is the CT's own grid in the same axis
order (the same voxel centres as the CT's, permuted and flipped) and the
CT's ImageOrientationPatient, for `--dicom_grid=ct`: the RT Dose is then
written in the CT's own layout, one dose frame on each CT image (same IOP,
frame positions = the CT's slice positions).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from randose_jax import fileio
from randose_jax.conventions import AXIS_DIRECTIONS_LPS
from randose_jax.dicom import DicomError

GEOMETRY_FILE = "dicom_geometry.json"
FORMAT = "randose_jax dicom_geometry 1"


def write_geometry(patient_dir, info: dict) -> Path:
  """Writes `info` (JSON-able) as the patient's geometry file, atomically."""
  path = Path(patient_dir) / GEOMETRY_FILE
  info = {"format": FORMAT, **info}
  with fileio.atomic_output(path, overwrite=True) as f:
    f.write((json.dumps(info, indent=1) + "\n").encode())
  return path


def read_geometry(patient_dir) -> dict | None:
  """The patient's geometry, or None for a plain OpenKBP folder.

  Raises:
    DicomError: the file exists but is not a geometry file of this format.
  """
  path = Path(patient_dir) / GEOMETRY_FILE
  if not path.is_file():
    return None
  try:
    info = json.loads(path.read_text())
  except (OSError, ValueError) as e:
    raise DicomError(f"{path}: not a readable geometry file ({e})") from e
  required = (
      "origin_lps_mm",
      "voxel_dimensions",
      "grid_shape",
      "frame_of_reference_uid",
      "study_instance_uid",
      "patient_id",
  )
  missing = (
      [k for k in required if k not in info]
      if isinstance(info, dict)
      else required
  )
  if missing or info.get("format") != FORMAT:
    raise DicomError(
        f"{path}: not a {FORMAT!r} file (missing {missing or 'format'})"
    )
  if not np.allclose(
      info.get("axis_directions_lps", AXIS_DIRECTIONS_LPS), AXIS_DIRECTIONS_LPS
  ):
    raise DicomError(
        f"{path}: axis_directions_lps differ from the project's axes"
    )
  return info


def resample_to_ct_grid(dose_gy: np.ndarray, info: dict):
  """The import-grid dose linearly resampled onto the CT's own voxel centres.

  Returns:
    (dose float64 (D, H, W) in the project's axis order, voxel dimensions (3,),
    origin LPS (3,) of voxel (0, 0, 0)); 0 Gy outside the import grid.
  """
  from randose_jax.dicom import rasterize, series

  ct = info["ct_grid"]
  source = series.Volume(
      np.asarray(dose_gy, np.float32),
      np.asarray(info["voxel_dimensions"], np.float64),
      np.asarray(info["origin_lps_mm"], np.float64),
  )
  dose = rasterize.resample_linear(
      source, ct["shape"], ct["spacing"], ct["origin_lps_mm"], 0.0
  )
  return (
      np.clip(dose.astype(np.float64), 0, None),
      np.asarray(ct["spacing"], np.float64),
      np.asarray(ct["origin_lps_mm"], np.float64),
  )


def rtdose_arguments(info: dict, dose_gy: np.ndarray, grid: str = "crop"):
  """(dose, voxel_dimensions, keyword arguments of `formats.write_rtdose`) that
  put `dose_gy` (on the import grid) in the patient's own frame.

  Args:
    grid: "crop" (the import grid, standard axial layout) or "ct" (the CT's
      own voxel centres, written in the CT's orientation: one dose frame per
      CT image).
  """
  if grid not in ("crop", "ct"):
    raise ValueError(f"--dicom_grid must be crop or ct, got {grid!r}")
  if grid == "ct":
    dose, vd, origin = resample_to_ct_grid(dose_gy, info)
  else:
    dose, vd = dose_gy, np.asarray(info["voxel_dimensions"], np.float64)
    origin = np.asarray(info["origin_lps_mm"], np.float64)
  kwargs = dict(
      origin_lps_mm=origin,
      frame_of_reference_uid=info["frame_of_reference_uid"],
      study_instance_uid=info["study_instance_uid"],
      referenced_rt_plan_uid=info.get("rtplan_sop_instance_uid"),
      referenced_structure_set_uid=info.get("rtstruct_sop_instance_uid"),
      dicom_patient_id=info["patient_id"],
      patient_name=info.get("patient_name"),
  )
  if grid == "ct":
    kwargs["image_orientation_patient"] = info["ct_grid"][
        "image_orientation_patient"
    ]
  return dose, vd, kwargs
