"""DICOM plans -> OpenKBP patient folders.

`import_folder` scans a folder tree (`series.scan`), pairs each RTSTRUCT with
the CT series it references (and the RTPLANs that reference the RTSTRUCT, and
the RTDOSE of each plan), and writes one `pt_*` folder per plan, in the
layout `openkbp.load_patient` reads, plus `dicom_geometry.json`
(`geometry.py`). Everything is read and checked, and every folder written
under a staging folder, before anything appears in the output folder: a bad
input is one error naming the file and leaves the output as it was.

The import grid (`shape` voxels of `spacing` mm, the project's axes) is
placed around the targets: per axis, centred on the bounding box of the PTVs,
then moved to lie within the body where the body is longer than the box,
never so far that a PTV that fits would be cut. A PTV longer than the box is
cut; the volume cut is reported.

The possible-dose mask is the body contour; without one, the CT's voxels
above -500 HU, of which only the largest connected region (3-D) is kept, so
that a couch or a positioning device apart from the body is left out, then
filled slice by slice. A plan-summed RT Dose (DoseSummationType PLAN or
MULTI_PLAN) is read as it is; without one, per-beam doses are summed on the
first one's grid (`summed_dose`), per-fraction ones too, times the plan's
NumberOfFractionsPlanned; what cannot be summed is left out with a warning.
Where the import spacing equals the CT's along an axis, the box lies on the
CT's voxels. ROIs drawn in another frame of reference than the CT are
skipped, ROIs of one name combined, each with a warning.
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path

import numpy as np

from randose_jax import fileio
from randose_jax import progress as progress_lib
from randose_jax.conventions import AXIS_DIRECTIONS_LPS, CT_OFFSET, GRID_SHAPE, ROI_NAMES
from randose_jax.data import openkbp
from randose_jax.dicom import DicomError, geometry, rasterize, roi_names, series

# OpenKBP-like spacing (mm) along axes 0, 1, 2: in-plane 500 mm / 128.
DEFAULT_SPACING = (3.90625, 3.90625, 2.5)
BODY_THRESHOLD_HU = -500.0
AIR_HU = -CT_OFFSET


@dataclasses.dataclass
class Plan:
  """One patient folder to write: a structure set on its CT, with its plan
  and dose when the input holds them."""

  patient_id: str
  patient_name: str
  ct_series_uid: str
  ct_slices: list
  rtstruct: series.Instance
  rtplan: series.Instance | None = None
  rtdose: series.Instance | None = None
  folder: str = ""
  # Without a plan-summed RTDOSE: per-beam ones to sum (and the factor, the
  # plan's fractions for per-fraction doses).
  dose_parts: list = dataclasses.field(default_factory=list)
  dose_factor: float = 1.0
  dose_warnings: list = dataclasses.field(default_factory=list)


def _items(ds, keyword):
  return ds.get(keyword, None) or []


def _referenced_series(ds) -> list[str]:
  out = []
  for frame in _items(ds, "ReferencedFrameOfReferenceSequence"):
    for study in _items(frame, "RTReferencedStudySequence"):
      for s in _items(study, "RTReferencedSeriesSequence"):
        if s.get("SeriesInstanceUID"):
          out.append(str(s.SeriesInstanceUID))
  return sorted(set(out))


def _referenced_frames(inst: series.Instance) -> set[str]:
  frames = {
      str(f.get("FrameOfReferenceUID", ""))
      for f in _items(inst.header, "ReferencedFrameOfReferenceSequence")
  }
  return (frames | {inst.frame_of_reference_uid}) - {""}


def _referenced_sops(ds, keyword) -> set[str]:
  return {
      str(item.get("ReferencedSOPInstanceUID", ""))
      for item in _items(ds, keyword)
  }


def _folder_stem(patient_id: str) -> str:
  stem = re.sub(r"[^A-Za-z0-9._-]+", "_", patient_id).strip("._")
  return f"pt_{stem or 'anonymous'}"


def find_plans(scan: series.Scan, input_dir) -> list[Plan]:
  """Pairs structure sets, CT series, plans and doses; names the folders.

  Raises:
    DicomError: no RTSTRUCT; an RTSTRUCT whose CT series is missing or
      ambiguous, or of another patient.
  """
  if not scan.rtstructs:
    others = [
        f"{kind} {', '.join(i.path.name for i in found[:3])}"
        f"{' ...' if len(found) > 3 else ''}"
        for kind, found in (("RTPLAN", scan.rtplans), ("RTDOSE", scan.rtdoses))
        if found
    ]
    raise DicomError(
        f"{input_dir}: no RTSTRUCT found ({len(scan.ct_series)} CT "
        f"series, {'; '.join(others) + ', ' if others else ''}"
        f"{len(scan.not_dicom)} files not DICOM); an import needs a "
        "structure set"
    )
  plans = []
  for ss in sorted(scan.rtstructs, key=lambda i: (i.patient_id, str(i.path))):
    refs = _referenced_series(ss.header)
    if refs:
      found = [uid for uid in refs if uid in scan.ct_series]
      if not found:
        what = (
            "holds no CT images" if not scan.ct_series else "does not hold it"
        )
        raise DicomError(
            f"{ss.path}: references CT series {', '.join(refs)}, "
            f"but {input_dir} {what}"
        )
    else:
      frames = _referenced_frames(ss)
      found = [
          uid
          for uid, sl in scan.ct_series.items()
          if sl[0].frame_of_reference_uid in frames
          and sl[0].patient_id == ss.patient_id
      ]
      if not found:
        raise DicomError(
            f"{ss.path}: no CT series of patient {ss.patient_id!r} in its "
            f"frame of reference in {input_dir}"
        )
    if len(found) > 1:
      raise DicomError(
          f"{ss.path}: matches several CT series ({', '.join(found)}); "
          "keep one of them in the input"
      )
    ct = scan.ct_series[found[0]]
    series.check_one_patient(ct)
    if ss.patient_id != ct[0].patient_id:
      raise DicomError(
          f"{ss.path}: patient {ss.patient_id!r}, but its CT series "
          f"{found[0]} is of patient {ct[0].patient_id!r}"
      )
    rtplans = sorted(
        (
            p
            for p in scan.rtplans
            if ss.sop_instance_uid
            in _referenced_sops(p.header, "ReferencedStructureSetSequence")
        ),
        key=lambda p: str(p.path),
    )
    base = dict(
        patient_id=ss.patient_id,
        patient_name=ss.patient_name,
        ct_series_uid=found[0],
        ct_slices=ct,
        rtstruct=ss,
    )
    if rtplans:
      for plan in rtplans:
        plans.append(
            Plan(
                **base,
                rtplan=plan,
                **_dose_of(
                    scan,
                    lambda d, p=plan: p.sop_instance_uid
                    in _referenced_sops(d.header, "ReferencedRTPlanSequence"),
                    plan,
                ),
            )
        )
    else:
      known = {p.sop_instance_uid for p in scan.rtplans}
      frame = ct[0].frame_of_reference_uid
      plans.append(
          Plan(
              **base,
              **_dose_of(
                  scan,
                  lambda d: d.frame_of_reference_uid == frame
                  and d.patient_id == ss.patient_id
                  and not (
                      _referenced_sops(d.header, "ReferencedRTPlanSequence")
                      & known
                  ),
              ),
          )
      )
  by_patient: dict[str, list[Plan]] = {}
  for plan in plans:
    by_patient.setdefault(_folder_stem(plan.patient_id), []).append(plan)
  for stem, group in by_patient.items():
    for k, plan in enumerate(group, start=1):
      plan.folder = stem if len(group) == 1 else f"{stem}_{k}"
  return plans


def _summation(d: series.Instance) -> str:
  return str(d.header.get("DoseSummationType", "PLAN") or "PLAN").upper()


def _fractions(plan: series.Instance | None) -> int | None:
  """NumberOfFractionsPlanned of the plan's one fraction group, or None."""
  groups = _items(plan.header, "FractionGroupSequence") if plan else []
  if len(groups) != 1:
    return None
  try:
    n = int(groups[0].get("NumberOfFractionsPlanned", 0) or 0)
  except (TypeError, ValueError):
    return None
  return n if n > 0 else None


def _dose_of(scan: series.Scan, belongs, rtplan=None) -> dict:
  """The plan's dose among the RTDOSEs that `belong`: {'rtdose': the
  plan-summed one (first by path) or None, 'dose_parts', 'dose_factor':
  without one, the per-beam doses to sum (x 1), or the per-fraction doses to
  sum (x the plan's NumberOfFractionsPlanned), 'dose_warnings': what was
  left out and why}."""
  doses = sorted(
      (d for d in scan.rtdoses if belongs(d)), key=lambda d: str(d.path)
  )
  summed = [d for d in doses if _summation(d) in ("PLAN", "MULTI_PLAN")]
  notes, parts, factor = [], [], 1.0
  if not summed and doses:
    kinds = {_summation(d) for d in doses}
    fractions = _fractions(rtplan)
    if kinds == {"BEAM"}:
      parts = doses
    elif kinds == {"FRACTION"} and fractions:
      parts, factor = doses, float(fractions)
    listed = ", ".join(f"{d.path.name} ({_summation(d)})" for d in doses[:4])
    more = " ..." if len(doses) > 4 else ""
    if parts:
      times = f" x {fractions} fractions" if factor != 1 else ""
      notes.append(
          f"dose: no plan-summed RT Dose; the sum of {len(parts)} "
          f"{'per-beam' if factor == 1 else 'per-fraction'} doses{times} "
          f"({listed}{more}) is read"
      )
    else:
      why = (
          "per-fraction doses of a plan without one fraction group and its "
          "NumberOfFractionsPlanned"
          if kinds == {"FRACTION"}
          else "these cannot be summed to the plan's dose"
      )
      notes.append(
          f"dose: no plan-summed RT Dose, only {listed}{more}; {why}, so no "
          "dose.csv is written"
      )
  elif len(summed) > 1:
    notes.append(
        f"dose: {len(summed)} plan-summed RT Doses; {summed[0].path.name} is "
        f"read, {', '.join(d.path.name for d in summed[1:4])} ignored"
    )
  return {
      "rtdose": summed[0] if summed else None,
      "dose_parts": parts,
      "dose_factor": factor,
      "dose_warnings": notes,
  }


# ---------------------------------------------------------------- one plan


@dataclasses.dataclass
class Imported:
  """One plan on the import grid (the project's axes)."""

  ct_hu: np.ndarray  # float32 (D, H, W)
  masks: dict  # ROI name -> bool (D, H, W)
  possible_dose_mask: np.ndarray
  dose: np.ndarray | None
  voxel_dimensions: np.ndarray
  geometry: dict
  summary: dict


def place_box(ptv_lo, ptv_hi, body_lo, body_hi, shape, spacing) -> np.ndarray:
  """(3,) coordinate of voxel 0's centre along each axis (module docstring).

  All arguments per axis, coordinates along the axis' own direction (mm):
  the PTVs' and the body's extents (voxel edges), the box's voxels and spacing.
  """
  length = np.asarray(shape) * np.asarray(spacing)
  lo = (np.asarray(ptv_lo) + ptv_hi) / 2 - length / 2
  for a in range(3):
    if length[a] <= body_hi[a] - body_lo[a]:
      lo[a] = np.clip(lo[a], body_lo[a], body_hi[a] - length[a])
    else:
      lo[a] = (body_lo[a] + body_hi[a]) / 2 - length[a] / 2
    if ptv_hi[a] - ptv_lo[a] <= length[a]:
      lo[a] = np.clip(lo[a], ptv_hi[a] - length[a], ptv_lo[a])
    else:
      lo[a] = (ptv_lo[a] + ptv_hi[a]) / 2 - length[a] / 2
  return lo + np.asarray(spacing) / 2


def _extent(volume: series.Volume, where: np.ndarray | None = None):
  """(lo, hi) (3,) voxel-edge extent along each axis of the nonzero voxels."""
  nz = np.nonzero(volume.array if where is None else where)
  first = np.array([n.min() for n in nz])
  last = np.array([n.max() for n in nz])
  start = volume.axis_start()
  return (
      start + (first - 0.5) * volume.spacing,
      start + (last + 0.5) * volume.spacing,
  )


def largest_region(mask: np.ndarray) -> np.ndarray:
  """The largest 6-connected region of a bool mask (the mask itself when it
  has one region or none)."""
  from scipy import ndimage

  labels, n = ndimage.label(mask)
  if n <= 1:
    return mask
  sizes = np.bincount(labels.ravel())
  sizes[0] = 0
  return labels == np.argmax(sizes)


def _bounding_box(volume: series.Volume) -> series.Volume:
  """The volume cut to the bounding box of its nonzero voxels."""
  nz = np.nonzero(volume.array)
  lo = np.array([n.min() for n in nz])
  hi = np.array([n.max() for n in nz]) + 1
  return series.Volume(
      volume.array[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]],
      volume.spacing,
      volume.index_to_lps(lo),
  )


def _union(masks: list[rasterize.StoredMask]) -> rasterize.StoredMask:
  start = np.min([m.start for m in masks], axis=0)
  stop = np.max([m.stop for m in masks], axis=0)
  out = np.zeros(tuple(stop - start), bool)
  for m in masks:
    lo = m.start - start
    out[
        lo[0] : lo[0] + m.mask.shape[0],
        lo[1] : lo[1] + m.mask.shape[1],
        lo[2] : lo[2] + m.mask.shape[2],
    ] |= m.mask
  return rasterize.StoredMask(start, out)


def _roi_number(item, keyword: str, path) -> int:
  """An ROI number of the RTSTRUCT at `path`, checked."""
  value = item.get(keyword)
  try:
    return int(value)
  except (TypeError, ValueError):
    raise DicomError(
        f"{path}: {keyword} {value!r} is not an ROI number"
    ) from None


def summed_dose(doses: list, factor: float = 1.0) -> series.Volume:
  """The sum of RT Doses (Gy) on the first one's grid, the others resampled
  linearly onto it (0 Gy outside them), times `factor`."""
  total = series.load_rtdose(doses[0])
  total.array = total.array.astype(np.float64)
  for d in doses[1:]:
    part = series.load_rtdose(d)
    if part.array.shape == total.array.shape and np.allclose(
        [part.spacing, part.origin], [total.spacing, total.origin], atol=1e-4
    ):
      total.array += part.array
    else:
      total.array += rasterize.resample_linear(
          part, total.array.shape, total.spacing, total.origin, 0.0
      )
  total.array *= factor
  return total


def import_plan(
    plan: Plan,
    mapper: roi_names.RoiMapper,
    *,
    shape=GRID_SHAPE,
    spacing=DEFAULT_SPACING,
) -> Imported:
  """Reads, rasterises and resamples one plan (nothing is written).

  Raises:
    DicomError naming the file: see `series.ct_grid`, `series.read_ct_pixels`,
    `series.load_rtdose`; no PTV among the structures (the RTSTRUCT).
  """
  from scipy import ndimage

  shape = tuple(int(n) for n in shape)
  spacing = np.asarray(spacing, np.float64)
  grid, slices = series.ct_grid(plan.ct_slices)
  ss = plan.rtstruct
  ds = ss.header
  rois = {
      _roi_number(r, "ROINumber", ss.path): r
      for r in _items(ds, "StructureSetROISequence")
  }
  names = {n: str(r.get("ROIName", "")) for n, r in rois.items()}
  types = {
      _roi_number(o, "ReferencedROINumber", ss.path): str(
          o.get("RTROIInterpretedType", "")
      )
      for o in _items(ds, "RTROIObservationsSequence")
  }
  contours = {
      _roi_number(c, "ReferencedROINumber", ss.path): c
      for c in _items(ds, "ROIContourSequence")
  }
  warnings, sources = list(plan.dose_warnings), {}
  ct_frame = plan.ct_slices[0].frame_of_reference_uid
  by_name: dict[str, list[int]] = {}
  for number, name in sorted(names.items()):
    by_name.setdefault(name.strip().lower(), []).append(number)
  for numbers in by_name.values():
    if len(numbers) > 1:
      warnings.append(
          f"{names[numbers[0]]}: {len(numbers)} ROIs of this name (ROI "
          f"numbers {', '.join(map(str, numbers))}); their contours are "
          "combined"
      )
  stored: dict[str, list[rasterize.StoredMask]] = {}
  matches = {}
  for number, name in sorted(names.items()):
    frame = str(rois[number].get("ReferencedFrameOfReferenceUID", "") or "")
    if frame and ct_frame and frame != ct_frame:
      warnings.append(
          f"{name}: drawn in another frame of reference ({frame}) than its "
          f"CT ({ct_frame}); skipped"
      )
      continue
    match = mapper.match(name, types.get(number, ""))
    if match.warning:
      warnings.append(match.warning)
    polygons, w = rasterize.contour_polygons(
        contours.get(number, {}), grid, name, ss.path
    )
    warnings += w
    if not polygons:
      if not w:
        warnings.append(f"{name}: no contours (empty ROI); skipped")
      continue
    if match.target is None:
      continue
    mask = rasterize.rasterize(polygons, grid)
    if mask is None:
      warnings.append(f"{name}: its contours cover no CT pixel; skipped")
      continue
    stored.setdefault(match.target, []).append(mask)
    sources.setdefault(match.target, []).append(name)
    matches[name] = match
  ptvs = [t for t in roi_names.PTV_LEVELS if t in stored]
  if not ptvs:
    raise DicomError(
        f"{ss.path}: no PTV among the structures ({', '.join(sorted(names.values()))}); "
        "name the targets with --roi_map or --ptv_doses"
    )

  hu = series.read_ct_pixels(slices, grid)
  ct = series.canonical(hu, grid)
  del hu
  voxel_cc = float(np.prod(ct.spacing)) / 1000
  canon = {
      t: rasterize.canonical_mask(_union(m), grid) for t, m in stored.items()
  }

  ptv_extents = [_extent(canon[t]) for t in ptvs]
  ptv_lo = np.min([e[0] for e in ptv_extents], axis=0)
  ptv_hi = np.max([e[1] for e in ptv_extents], axis=0)
  body = canon.get(roi_names.BODY)
  if body is not None:
    body_lo, body_hi = _extent(body)
    mask_source = (
        f"body contour {', '.join(repr(n) for n in sources[roi_names.BODY])}"
    )
  else:
    above = ct.array > BODY_THRESHOLD_HU
    if not above.any():
      raise DicomError(
          f"{slices[0].path}: no CT voxel above {BODY_THRESHOLD_HU:g} HU and "
          f"no body contour in {ss.path.name}"
      )
    # A couch or a device apart from the body is another region: left out.
    body_from_ct = _bounding_box(
        series.Volume(largest_region(above), ct.spacing, ct.origin)
    )
    del above
    body_lo, body_hi = _extent(body_from_ct)
    mask_source = (
        f"CT > {BODY_THRESHOLD_HU:g} HU, largest connected region, "
        "filled slice by slice"
    )
  voxel0 = place_box(ptv_lo, ptv_hi, body_lo, body_hi, shape, spacing)
  # Where the import spacing is the CT's, the box moves (by under half a
  # voxel) onto the CT's voxels: masks and CT are then copied, not blurred.
  same = np.isclose(spacing, ct.spacing, rtol=1e-6, atol=0)
  steps = np.rint((voxel0 - ct.axis_start()) / spacing)
  voxel0 = np.where(same, ct.axis_start() + steps * spacing, voxel0)
  origin = AXIS_DIRECTIONS_LPS.T @ voxel0

  ct_crop = rasterize.resample_linear(ct, shape, spacing, origin, AIR_HU)
  masks, ptv_cut = {}, {}
  crop_voxel_cc = float(np.prod(spacing)) / 1000
  for target, volume in canon.items():
    occ = rasterize.occupancy(volume, shape, spacing, origin)
    if target in roi_names.PTV_LEVELS:
      total = float(np.count_nonzero(volume.array)) * voxel_cc
      cut = total - float(occ.sum()) * crop_voxel_cc
      if cut > 0.05 * total + 0.05:
        ptv_cut[target] = round(cut, 2)
        warnings.append(
            f"{target}: {cut:.1f} cc of {total:.1f} cc lies outside the box"
        )
    masks[target] = occ >= 0.5
  if body is not None:
    possible = masks.pop(roi_names.BODY)
  else:
    possible = rasterize.occupancy(body_from_ct, shape, spacing, origin) >= 0.5
    del body_from_ct
    for k in range(shape[2]):
      possible[:, :, k] = ndimage.binary_fill_holes(possible[:, :, k])
  for target in list(masks):
    if not masks[target].any():
      warnings.append(
          f"{target}: no voxel of the import grid is at least half inside it; "
          "left out"
      )
      del masks[target]

  dose = None
  dose_files = [plan.rtdose] if plan.rtdose is not None else plan.dose_parts
  if dose_files:
    for d in dose_files:
      if d.frame_of_reference_uid not in (
          "",
          plan.ct_slices[0].frame_of_reference_uid,
      ):
        raise DicomError(
            f"{d.path}: FrameOfReferenceUID differs from its CT "
            f"series' ({plan.ct_slices[0].frame_of_reference_uid})"
        )
    dose_volume = summed_dose(dose_files, plan.dose_factor)
    dose = rasterize.resample_linear(
        dose_volume, shape, spacing, origin, 0.0
    ).astype(np.float64)
    dose = np.round(np.clip(dose, 0, None), 4) * possible
    covered = (
        rasterize.resample_linear(
            series.Volume(
                np.ones_like(dose_volume.array, np.float32),
                dose_volume.spacing,
                dose_volume.origin,
            ),
            shape,
            spacing,
            origin,
            0.0,
        )
        > 0.5
    )
    uncovered = int(np.count_nonzero(possible & ~covered))
    if uncovered:
      warnings.append(
          f"dose: {uncovered} voxels of the possible-dose mask lie outside "
          f"the RT Dose grid of {dose_files[0].path.name} (0 Gy there)"
      )

  first = slices[0]
  info = {
      "patient_id": plan.patient_id,
      "patient_name": plan.patient_name,
      "grid_shape": list(shape),
      "voxel_dimensions": spacing.tolist(),
      "origin_lps_mm": origin.tolist(),
      "axis_directions_lps": AXIS_DIRECTIONS_LPS.tolist(),
      "study_instance_uid": first.study_uid,
      "frame_of_reference_uid": first.frame_of_reference_uid,
      "ct_series_instance_uid": plan.ct_series_uid,
      "rtstruct_sop_instance_uid": ss.sop_instance_uid,
      "rtstruct_series_instance_uid": ss.series_uid,
      "rtplan_sop_instance_uid": (
          plan.rtplan.sop_instance_uid if plan.rtplan else None
      ),
      "rtdose_sop_instance_uid": (
          plan.rtdose.sop_instance_uid if plan.rtdose else None
      ),
      "rtdose_summed_sop_instance_uids": [
          d.sop_instance_uid for d in plan.dose_parts
      ],
      "ct_grid": {
          "shape": list(ct.array.shape),
          "spacing": ct.spacing.tolist(),
          "origin_lps_mm": ct.origin.tolist(),
          "image_orientation_patient": [
              float(v) for v in first.header.ImageOrientationPatient
          ],
      },
      "roi_sources": {t: sources[t] for t in ROI_NAMES if t in masks},
      "possible_dose_mask_source": mask_source,
      "ptv_cut_cc": ptv_cut,
      "warnings": warnings,
  }
  summary = {
      "patient": plan.folder,
      "patient_id": plan.patient_id,
      "rois_found": len(names),
      "mapped": {t: sources[t] for t in ROI_NAMES if t in masks},
      "ptv_cut_cc": ptv_cut,
      "mask": mask_source,
      "dose": dose is not None,
      "warnings": warnings,
  }
  return Imported(ct_crop, masks, possible, dose, spacing, info, summary)


def _write(path: Path, data: bytes) -> None:
  with fileio.atomic_output(path) as f:
    f.write(data)


def write_patient_folder(folder: Path, imported: Imported) -> None:
  """Writes the OpenKBP files and `dicom_geometry.json` into a new `folder`
  (each file through `fileio.atomic_output`)."""
  folder.mkdir(parents=True)
  stored_ct = np.clip(
      np.rint(imported.ct_hu.astype(np.float64)) + CT_OFFSET, 0, None
  ).ravel()
  index = np.flatnonzero(stored_ct)
  _write(
      folder / openkbp.CT_FILE,
      openkbp.format_sparse_csv(index, stored_ct[index]),
  )
  _write(
      folder / openkbp.MASK_FILE,
      openkbp.format_sparse_csv(np.flatnonzero(imported.possible_dose_mask)),
  )
  for name in ROI_NAMES:
    if name in imported.masks:
      _write(
          folder / f"{name}.csv",
          openkbp.format_sparse_csv(np.flatnonzero(imported.masks[name])),
      )
  _write(
      folder / openkbp.VOXEL_DIMENSIONS_FILE,
      "".join(f"{float(v)!r}\n" for v in imported.voxel_dimensions).encode(),
  )
  shape = tuple(imported.ct_hu.shape)
  if shape != GRID_SHAPE:
    _write(
        folder / openkbp.GRID_SHAPE_FILE,
        "".join(f"{n}\n" for n in shape).encode(),
    )
  if imported.dose is not None:
    flat = imported.dose.ravel()
    index = np.flatnonzero(flat)
    _write(
        folder / openkbp.DOSE_FILE,
        openkbp.format_sparse_csv(index, flat[index]),
    )
  geometry.write_geometry(folder, imported.geometry)


def import_folder(
    input_dir,
    output_dir,
    mapper: roi_names.RoiMapper | None = None,
    *,
    shape=GRID_SHAPE,
    spacing=DEFAULT_SPACING,
    overwrite: bool = False,
    progress: bool | None = None,
) -> list[dict]:
  """Imports every plan under `input_dir` into `output_dir/pt_*`.

  Args:
    mapper: ROI names (default table when None).
    shape, spacing: the import grid.
    overwrite: replace patient folders already in `output_dir` (whole).
    progress: each plan counted done on stderr (`progress.Counter`, label
      'dicom_import'): None a live line on a terminal and one line per
      patient elsewhere, True the live line, False the lines, 'off'
      nothing.

  Returns:
    One summary dict per patient folder (`import_plan`).

  Raises:
    DicomError or OSError naming the file (an output file by its final
    path); nothing is written then.
  """
  with series.quiet_pydicom():
    return _import_folder(
        input_dir,
        output_dir,
        mapper,
        shape=shape,
        spacing=spacing,
        overwrite=overwrite,
        progress=progress,
    )


def _import_folder(
    input_dir, output_dir, mapper, *, shape, spacing, overwrite, progress
):
  mapper = mapper or roi_names.RoiMapper()
  output_dir = Path(os.path.abspath(Path(output_dir).expanduser()))
  input_dir = Path(input_dir)
  if (
      output_dir == Path(os.path.abspath(input_dir))
      or Path(os.path.abspath(input_dir)) in output_dir.parents
  ):
    raise DicomError(
        f"{output_dir}: the output folder must not be inside --input"
    )
  fileio.check_output_dir(output_dir)
  scan = series.scan(input_dir)
  plans = find_plans(scan, input_dir)
  if not overwrite:
    existing = [
        str(output_dir / p.folder)
        for p in plans
        if os.path.lexists(output_dir / p.folder)
    ]
    if existing:
      raise FileExistsError(
          17,
          f"already exist(s) ({', '.join(existing[:3])}); "
          "pass --overwrite to replace",
          existing[0],
      )
  anchor = fileio.nearest_existing(output_dir)
  # An import killed mid-way left its staging folder: removed once its
  # process is gone (only dicom_import's, only this host's).
  fileio.remove_stale_staging(anchor, "dicom_import")
  staging = fileio.new_staging_dir(anchor, "dicom_import")
  try:
    rows = []
    with progress_lib.Counter("dicom_import", len(plans), progress) as counter:
      for plan in plans:
        counter.doing(f"{plan.folder}: importing")
        imported = import_plan(plan, mapper, shape=shape, spacing=spacing)
        try:
          write_patient_folder(staging / plan.folder, imported)
        except OSError as e:  # name the user's path, not the staged one
          staged = Path(e.filename) if e.filename is not None else None
          if staged is None or e.errno is None or staging not in staged.parents:
            raise
          raise OSError(
              e.errno,
              e.strerror or os.strerror(e.errno),
              str(output_dir / staged.relative_to(staging)),
          ) from e
        rows.append(imported.summary)
        counter.done(plan.folder)
    output_dir.mkdir(parents=True, exist_ok=True)
    for plan in plans:
      final = output_dir / plan.folder
      if os.path.lexists(final):
        os.replace(final, staging / f"old-{plan.folder}")
      os.replace(staging / plan.folder, final)
    return rows
  finally:
    shutil.rmtree(staging, ignore_errors=True)


def summary_table(rows: list[dict]) -> str:
  """A plain-text table: patient, ROIs found and mapped, PTV cut, mask, warnings."""
  header = (
      "patient",
      "ROIs",
      "mapped",
      "PTV cut (cc)",
      "possible-dose mask",
      "dose",
      "warnings",
  )
  lines = []
  for r in rows:
    mapped = "; ".join(f"{t}<-{'+'.join(n)}" for t, n in r["mapped"].items())
    cut = ", ".join(f"{t} {v:g}" for t, v in r["ptv_cut_cc"].items()) or "0"
    lines.append(
        (
            r["patient"],
            str(r["rois_found"]),
            mapped,
            cut,
            r["mask"],
            "yes" if r["dose"] else "no",
            str(len(r["warnings"])),
        )
    )
  widths = [max(len(x) for x in col) for col in zip(header, *lines)]
  out = ["  ".join(h.ljust(w) for h, w in zip(header, widths))]
  out += ["  ".join(c.ljust(w) for c, w in zip(line, widths)) for line in lines]
  for r in rows:
    out += [f"{r['patient']}: warning: {w}" for w in r["warnings"]]
  return "\n".join(out)
