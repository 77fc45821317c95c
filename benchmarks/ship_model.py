"""Ships a trained workdir's model in the package, with its scores measured.

  python benchmarks/ship_model.py --workdir=/runs/cpu_best --name=cpu_best \
      --data_root=/data/openkbp --recipe="configs/openkbp.py:cpu_best" \
      --wall_s=9000 --machine="2-core VM (AMD EPYC), jax 0.10.2 CPU" \
      [--checkpoint=best] [--overwrite]

Writes `randose_jax/inference/shipped_models/<name>/` (`shipped.ship`: parameters,
config, card.json), then loads the shipped model back as a user would
(`shipped.load`) and scores it with the official rules at 128^3: on every
validation patient of --data_root (the card's `validation`), and on the 6
validation patients of the shared OpenKBP folder (the card's
`shared_validation`: what `tests/test_shipped.py` reproduces). The
training patients are listed from --data_root's train split. MODEL_CARD.md
is written by hand from card.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys
import time

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if str(_HERE.parent) not in sys.path:
  sys.path.insert(1, str(_HERE.parent))

import common  # noqa: E402

from randose_jax.scoring import dose_dvh as evaluation  # noqa: E402
from randose_jax import fileio  # noqa: E402
from randose_jax.inference import shipped  # noqa: E402
from randose_jax.data import openkbp  # noqa: E402


def score(restored, split_dir: pathlib.Path) -> dict:
  """Official scores of the restored model's predictions on a split."""
  evaluator = evaluation.Evaluator()
  dirs = openkbp.list_patient_dirs(split_dir)
  t = time.time()
  for d in dirs:
    patient = openkbp.load_sparse_patient(d)
    (dose,) = restored.predictor.predict_doses([patient])
    evaluator.add(patient, dose)
  result = evaluation.scores_from_sums(evaluator.partial_sums())
  return {
      "patients": [d.name for d in dirs],
      "num_patients": len(dirs),
      "dose_score": result["dose_score"],
      "dvh_score": result["dvh_score"],
      "seconds": round(time.time() - t, 1),
  }


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--workdir", required=True)
  p.add_argument("--name", required=True)
  p.add_argument("--data_root", required=True)
  p.add_argument("--recipe", required=True, help="config and variant")
  p.add_argument(
      "--wall_s",
      type=float,
      required=True,
      help="wall-clock seconds of training (from the run's log)",
  )
  p.add_argument("--machine", required=True)
  p.add_argument("--checkpoint", default="best")
  p.add_argument("--notes", default="")
  p.add_argument("--overwrite", action="store_true")
  args = p.parse_args(argv)

  root = pathlib.Path(args.data_root)
  train_ids = [d.name for d in openkbp.list_patient_dirs(root / "train-pats")]
  fields = {
      "date": datetime.date.today().isoformat(),
      "recipe": args.recipe,
      "training_patients": train_ids,
      "num_train_patients": len(train_ids),
      "wall_s": args.wall_s,
      "machine": args.machine,
      "machine_info": common.machine_info(),
      "notes": args.notes,
  }
  out = shipped.ship(
      args.workdir,
      args.name,
      fields,
      checkpoint=args.checkpoint,
      overwrite=args.overwrite,
  )
  restored = shipped.load(args.name)
  fields = json.loads((out / shipped.CARD_FILE).read_text())
  fields["steps"] = fields["checkpoint_step"]
  fields["validation"] = score(restored, root / "validation-pats")
  print(f"validation: {fields['validation']}", flush=True)
  fields["shared_validation"] = score(
      restored, common.openkbp_dir() / "validation-pats"
  )
  print(f"shared validation: {fields['shared_validation']}", flush=True)
  with fileio.atomic_output(out / shipped.CARD_FILE, overwrite=True) as f:
    f.write(json.dumps(fields, indent=2).encode())
  print(f"wrote {out}")


if __name__ == "__main__":
  main()
