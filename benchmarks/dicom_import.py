"""Time `randose_jax.cli.dicom_import` on a clinic-sized synthetic patient.

  python benchmarks/dicom_import.py [--slices=150] [--size=512] [--repeats=2] \
      [--json=benchmarks/results/dicom_import_vm.json]

Writes a synthetic CT of size x size x slices (0.98 mm pixels, 2.5 mm slices,
HFS) with 15 contoured structures (randose_jax/dicom/synthetic.py; the RTSTRUCT
also holds an empty, a point and an open-line ROI), an RTPLAN and an RTDOSE,
then imports it into the 128^3 OpenKBP grid in a fresh process per repeat
(so peak memory is the import's own: ru_maxrss of that process). Reports
seconds per patient (scan, CT read, rasterising, resampling, CSV writing:
the whole `import_folder`) and peak resident memory, with the machine and its
load (`common.machine_info`).
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import common  # pylint: disable=wrong-import-position


def _shapes():
  from randose_jax.dicom import synthetic

  extra = (
      synthetic.Shape("Esophagus", "cylinder", (0, 25, -20), (8, 7, 60)),
      synthetic.Shape("Larynx", "ellipsoid", (0, -35, -40), (15, 12, 18)),
      synthetic.Shape("Eye_L", "ellipsoid", (30, -50, 60), (11, 11, 11)),
      synthetic.Shape("Eye_R", "ellipsoid", (-30, -50, 60), (11, 11, 11)),
      synthetic.Shape("OralCavity", "ellipsoid", (0, -40, 10), (30, 20, 20)),
      synthetic.Shape(
          "PTV 63Gy", "ellipsoid", (-5, -5, 0), (28, 26, 24), "PTV"
      ),
  )
  return synthetic.DEFAULT_SHAPES + extra  # 15 structures


def child(input_dir: str, output_dir: str) -> None:
  t0 = time.perf_counter()
  from randose_jax.dicom import importer

  t_import = time.perf_counter()
  rows = importer.import_folder(input_dir, output_dir, progress=False)
  seconds = time.perf_counter() - t_import
  print(
      json.dumps(
          {
              "seconds": seconds,
              "seconds_with_imports": time.perf_counter() - t0,
              "peak_rss_mib": (
                  resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
              ),
              "mapped": rows[0]["mapped"],
              "warnings": rows[0]["warnings"],
          }
      )
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--slices", type=int, default=150)
  parser.add_argument("--size", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=2)
  parser.add_argument(
      "--json", default=str(common.RESULTS_DIR / "dicom_import_vm.json")
  )
  parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.child:
    child(*args.child)
    return
  from randose_jax.dicom import synthetic

  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    t0 = time.perf_counter()
    phantom = synthetic.Phantom(shapes=_shapes())
    synthetic.write_patient(
        tmp / "dicom",
        phantom,
        shape=(args.slices, args.size, args.size),
        spacing=(2.5, 500 / args.size, 500 / args.size),
    )
    write_seconds = time.perf_counter() - t0
    runs = []
    for k in range(args.repeats):
      proc = subprocess.run(
          [
              sys.executable,
              __file__,
              "--child",
              str(tmp / "dicom"),
              str(tmp / f"out{k}"),
          ],
          capture_output=True,
          text=True,
          check=True,
          cwd=ROOT,
      )
      runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
      print(
          f"run {k}: {runs[-1]['seconds']:.1f} s, peak {runs[-1]['peak_rss_mib']:.0f} MiB",
          flush=True,
      )
  result = {
      "benchmark": "dicom_import",
      "ct": [args.slices, args.size, args.size],
      "structures": len(phantom.shapes),
      "write_synthetic_seconds": write_seconds,
      "seconds_per_patient": [r["seconds"] for r in runs],
      "seconds_per_patient_with_imports": [
          r["seconds_with_imports"] for r in runs
      ],
      "peak_rss_mib": [r["peak_rss_mib"] for r in runs],
      "mapped": runs[0]["mapped"],
      "warnings": runs[0]["warnings"],
      "machine": common.machine_info(),
  }
  path = pathlib.Path(args.json)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1) + "\n")
  print(
      json.dumps(
          {k: result[k] for k in ("seconds_per_patient", "peak_rss_mib")}
      )
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
