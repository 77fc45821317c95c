"""Where a crop-trained model's dose error is, patient by patient.

  python benchmarks/crop_error_breakdown.py --workdir=/runs/cpu_best \
      [--patients=../shared/openkbp/validation-pats] [--ids=pt_202,pt_211] \
      [--json=benchmarks/results/crop_error_breakdown_vm.json]

For each patient: the official scores of the windowed prediction
(`Predictor.predict_doses`, what validation and predict use) and of one
pass over the whole grid (what a crop-trained model must not do); the mean
absolute error inside and outside the PTVs; predicted and reference mean
dose binned by the distance to the nearest PTV (mm) and per axial slice.
Prints a table and writes JSON with the machine.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if str(_HERE.parent) not in sys.path:
  sys.path.insert(1, str(_HERE.parent))

import common  # noqa: E402

import numpy as np  # noqa: E402

from randose_jax.scoring import dose_dvh as evaluation  # noqa: E402
from randose_jax.inference import restore  # noqa: E402
from randose_jax.data import distances  # noqa: E402
from randose_jax.data import encoding  # noqa: E402
from randose_jax.data import openkbp  # noqa: E402

DISTANCE_BINS_MM = (-100, 0, 10, 20, 40, 60, 80, 100, 150, 1000)


def scores(patient, dose) -> dict:
  evaluator = evaluation.Evaluator()
  evaluator.add(patient, dose)
  return evaluation.scores_from_sums(evaluator.partial_sums())


def breakdown(restored, patient) -> dict:
  dense = patient.to_patient()
  mask, reference = dense.possible_dose_mask, dense.dose
  (windowed,) = restored.predictor.predict_doses([patient])
  example = encoding.encode_patient(patient, restored.config.data)
  (whole,) = restored.predictor.predict_local([example])
  whole = encoding.decode_dose(whole, patient, restored.config.data)
  ptv = dense.structure_masks[..., 7:].any(-1)
  error = np.abs(windowed - reference)
  # mm to the nearest PTV (a 100 mm scale: clipped at 300 mm, beyond the
  # last bin's start).
  nearest = distances.dense(patient, 100.0).min(-1) * 100.0
  which = np.digitize(nearest, DISTANCE_BINS_MM)
  by_distance = []
  for b in range(1, len(DISTANCE_BINS_MM)):
    sel = mask & (which == b)
    if sel.any():
      by_distance.append(
          {
              "from_mm": DISTANCE_BINS_MM[b - 1],
              "to_mm": DISTANCE_BINS_MM[b],
              "voxels": int(sel.sum()),
              "predicted_gy": float(windowed[sel].mean()),
              "reference_gy": float(reference[sel].mean()),
          }
      )
  by_slice = []
  for k in np.flatnonzero(mask.any((0, 1))):
    sel = mask[:, :, k]
    by_slice.append(
        {
            "slice": int(k),
            "predicted_gy": float(windowed[:, :, k][sel].mean()),
            "reference_gy": float(reference[:, :, k][sel].mean()),
        }
    )
  s, w = scores(patient, windowed), scores(patient, whole)
  return {
      "patient_id": patient.patient_id,
      "dose_score": s["dose_score"],
      "dvh_score": s["dvh_score"],
      "whole_grid_dose_score": w["dose_score"],
      "whole_grid_dvh_score": w["dvh_score"],
      "abs_error_in_ptv_gy": float(error[ptv].mean()),
      "abs_error_outside_ptv_gy": float(error[mask & ~ptv].mean()),
      "by_distance": by_distance,
      "by_slice": by_slice,
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--checkpoint", default="best")
  p.add_argument(
      "--patients", default=str(common.openkbp_dir() / "validation-pats")
  )
  p.add_argument("--ids", default="pt_202,pt_211,pt_216")
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  restored = restore.restore_from_workdir(args.workdir, args.checkpoint)
  rows = []
  for pid in filter(None, args.ids.split(",")):
    patient = openkbp.load_sparse_patient(pathlib.Path(args.patients) / pid)
    rows.append(breakdown(restored, patient))
    r = rows[-1]
    print(
        f"{pid}: windowed {r['dose_score']:.2f} / {r['dvh_score']:.2f}, "
        f"whole grid {r['whole_grid_dose_score']:.2f} / "
        f"{r['whole_grid_dvh_score']:.2f}; |error| in PTVs "
        f"{r['abs_error_in_ptv_gy']:.2f} Gy, outside "
        f"{r['abs_error_outside_ptv_gy']:.2f} Gy",
        flush=True,
    )
  result = {
      "benchmark": "crop_error_breakdown",
      "workdir": args.workdir,
      "checkpoint_step": restored.step,
      "ema": restored.uses_ema,
      "machine": common.machine_info(),
      "patients": rows,
  }
  path = pathlib.Path(
      args.json or common.default_json_path("crop_error_breakdown")
  )
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1) + "\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
