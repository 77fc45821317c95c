"""The DICOM interoperability matrix: OpenKBP patients exported by other
writers, imported by `dicom_import`, against the original masks; and the same
RTSTRUCTs read by the independent readers (the evidence for the
rasterisation convention).

  python benchmarks/dicom_interop.py [--patients=26] \
      [--json=benchmarks/results/dicom_interop_vm.json]

For each shared OpenKBP patient (`benchmarks/common.openkbp_dir()`): its CT
is written as a head-first supine DICOM series with random file names
(`synthetic.write_openkbp_ct`), its masks (clinic names, the possible-dose
mask as External) as an RTSTRUCT by rt-utils and by platipy (whose writer
is rt-utils' builder, run under pydicom 2), then `importer.import_folder` imports it on the CT's own spacing
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
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # pylint: disable=wrong-import-position

MIN_CC = 5.0
WRITERS = {
    "rt_utils": "rt-utils 1.2.7 RTStructBuilder (pydicom 3)",
    "platipy": (
        "platipy 0.7.2 convert_nifti (rt-utils' RTStructBuilder inside, "
        "pydicom 2.4.5)"
    ),
}


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
  parser.add_argument("--writers", default="rt_utils,platipy")
  args = parser.parse_args()
  from randose_jax.data import openkbp
  from randose_jax.dicom import interop

  dirs = []
  for split in ("train-pats", "validation-pats"):
    dirs += openkbp.list_patient_dirs(common.openkbp_dir() / split)
  dirs = dirs[: args.patients]
  readers = []
  for r in args.readers.split(","):
    why = interop.available(r) if r else None
    if not r:
      continue
    if why:
      print(f"reader {r}: skipped ({why})", flush=True)
    else:
      readers.append(r)
  writers = {}
  for writer in args.writers.split(","):
    why = interop.available(writer)
    if why:
      print(f"writer {writer}: skipped ({why})", flush=True)
      continue
    per_patient = {}
    t0 = time.perf_counter()
    for d in dirs:
      with tempfile.TemporaryDirectory() as tmp:
        per_patient[d.name] = interop.openkbp_case(
            d, pathlib.Path(tmp), readers, writer=writer
        )
      w = worst({d.name: per_patient[d.name]})
      print(
          writer,
          d.name,
          {k: (v["min_dice"], v["max_volume_error"]) for k, v in w.items()},
          flush=True,
      )
    writers[f"{writer}_writer"] = {
        "writer": WRITERS[writer],
        "patients": len(dirs),
        "seconds": round(time.perf_counter() - t0, 1),
        "worst": worst(per_patient),
        "per_patient": per_patient,
    }
  with tempfile.TemporaryDirectory() as tmp:
    synthetic_rows = interop.synthetic_case(pathlib.Path(tmp), readers)
  pydicom_rows = {}
  for on_centres in (True, False):
    with tempfile.TemporaryDirectory() as tmp:
      pydicom_rows["on pixel centres" if on_centres else "on pixel edges"] = (
          interop.pydicom_case(
              pathlib.Path(tmp),
              [r for r in readers if r != "rt_utils"],
              on_centres=on_centres,
          )
      )
  result = {
      "benchmark": "dicom_interop",
      **writers,
      "synthetic_writer": {
          "worst": worst({"synthetic": synthetic_rows}),
          "structures": synthetic_rows,
      },
      "pydicom_rtstruct": pydicom_rows,
      "min_cc": MIN_CC,
      "machine": common.machine_info(),
  }
  text = json.dumps(result, indent=1)
  if args.json:
    pathlib.Path(args.json).write_text(text + "\n")
  print(
      json.dumps(
          {
              k: result[k]
              for k in (
                  "rt_utils_writer",
                  "synthetic_writer",
                  "pydicom_rtstruct",
              )
          },
          indent=1,
      )[:6000]
  )


if __name__ == "__main__":
  main()
