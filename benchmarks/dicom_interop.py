"""The DICOM interoperability matrix: OpenKBP patients exported by other
writers, imported by `dicom_import`, against the original masks; and the same
RTSTRUCTs read by the independent readers (the evidence for the
rasterisation convention).

  python benchmarks/dicom_interop.py [--patients=26] \
      [--json=benchmarks/results/dicom_interop_vm.json]

For each shared OpenKBP patient (`benchmarks/common.openkbp_dir()`): its CT
is written as a head-first supine DICOM series with random file names
(`synthetic.write_openkbp_ct`), its masks (clinic names, the possible-dose
mask as External) as an RTSTRUCT by rt-utils (platipy's writer is rt-utils
too), then `importer.import_folder` imports it on the CT's own spacing
(3.906 x 3.906 x 2.5 mm, 128^3) and each mask is compared with the original;
rt-utils', dcmrtstruct2nii's and platipy's readers (where installed) read the
same RTSTRUCT on the same CT. Per writer / reader: the worst Dice and volume
ratio over the structures of 5 cc or more, and the structure. The project's
synthetic writer (contours around voxel edges, `synthetic.write_patient`)
and pydicom's own test RTSTRUCT (no original: against the readers) get their
rows from `tests/test_dicom_interop.py`'s checks, run here too.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import shutil
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # pylint: disable=wrong-import-position

MIN_CC = 5.0


def one_patient(patient_dir, work: pathlib.Path, readers=()) -> dict:
  """{reader or 'dicom_import': {structure: compare()}} for one patient."""
  import numpy as np

  from randose_jax.data import openkbp
  from randose_jax.dicom import importer, interop, synthetic

  patient = openkbp.load_patient(patient_dir)
  src = work / "dicom"
  ct_dir = src / "ct"
  info = synthetic.write_openkbp_ct(ct_dir, patient, seed=0)
  # rt-utils reads a folder of the series only: gather the slices.
  flat = work / "ct_flat"
  flat.mkdir(parents=True)
  for k, f in enumerate(info["ct_files"]):
    shutil.copyfile(f, flat / f"{k:04d}.dcm")
  originals = {
      name: info["to_stored"](mask)
      for name, mask in interop.patient_masks(patient).items()
  }
  rtstruct = interop.write_rt_utils(flat, originals, src / "rtstruct.dcm")
  voxel_cc = float(np.prod(patient.voxel_dimensions)) / 1000
  results = {}
  importer.import_folder(
      src,
      work / "out",
      spacing=tuple(patient.voxel_dimensions),
      shape=patient.ct.shape,
      progress=False,
  )
  ours = interop.imported_masks(
      work / "out", info["to_stored"], originals["External"].shape
  )
  by_clinic = {interop.CLINIC_NAMES.get(k, k): v for k, v in ours.items()}
  results["dicom_import"] = {
      name: interop.compare(originals[name], by_clinic[name], voxel_cc)
      for name in originals
      if name in by_clinic
  }
  for reader in readers:
    if reader == "rt_utils":
      read = interop.read_rt_utils(flat, rtstruct)
    else:
      read = interop.read_legacy(reader, flat, rtstruct, work / reader)
    results[reader] = {
        name: interop.compare(originals[name], read[name], voxel_cc)
        for name in originals
        if name in read
    }
  return results


def worst(per_patient: dict) -> dict:
  """Per reader: the worst Dice and volume ratio over structures >= MIN_CC."""
  out = {}
  for pid, results in per_patient.items():
    for reader, rows in results.items():
      w = out.setdefault(
          reader,
          {"min_dice": 2.0, "max_volume_error": 0.0, "structures": 0},
      )
      for name, r in rows.items():
        if r["cc"] < MIN_CC:
          continue
        w["structures"] += 1
        if r["dice"] < w["min_dice"]:
          w["min_dice"], w["min_dice_at"] = r["dice"], f"{pid} {name}"
        err = abs(r["volume_ratio"] - 1)
        if err >= w["max_volume_error"]:
          w["max_volume_error"] = round(err, 4)
          w["max_volume_error_at"] = f"{pid} {name} ({r['volume_ratio']})"
  return out


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--patients", type=int, default=26)
  parser.add_argument("--json", default="")
  parser.add_argument("--readers", default="rt_utils,dcmrtstruct2nii,platipy")
  args = parser.parse_args()
  from randose_jax.data import openkbp
  from randose_jax.dicom import interop

  dirs = []
  for split in ("train-pats", "validation-pats"):
    dirs += openkbp.list_patient_dirs(common.openkbp_dir() / split)
  dirs = dirs[: args.patients]
  readers = []
  for r in args.readers.split(","):
    why = interop.available(r) if r else "none"
    if why:
      print(f"reader {r}: skipped ({why})", flush=True)
    else:
      readers.append(r)
  per_patient = {}
  t0 = time.perf_counter()
  for d in dirs:
    with tempfile.TemporaryDirectory() as tmp:
      per_patient[d.name] = one_patient(d, pathlib.Path(tmp), readers)
    w = worst({d.name: per_patient[d.name]})
    print(
        d.name,
        {k: (v["min_dice"], v["max_volume_error"]) for k, v in w.items()},
        flush=True,
    )
  result = {
      "benchmark": "dicom_interop",
      "writer": "rt-utils 1.2.7 (RTStructBuilder; platipy's writer)",
      "patients": len(dirs),
      "min_cc": MIN_CC,
      "seconds": round(time.perf_counter() - t0, 1),
      "worst": worst(per_patient),
      "per_patient": per_patient,
      "machine": common.machine_info(),
  }
  text = json.dumps(result, indent=1)
  if args.json:
    pathlib.Path(args.json).write_text(text + "\n")
  print(json.dumps(result["worst"], indent=1))


if __name__ == "__main__":
  main()
