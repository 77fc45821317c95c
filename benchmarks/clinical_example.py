"""An example of `evaluate --clinical` on real patients, WITHOUT a model.

The "prediction" of each patient is its own reference dose perturbed
(`gamma_timing.perturbed`: smoothed by a Gaussian of 1 voxel, scaled by
1.02, zero outside the possible-dose mask). The tables show what the
clinical metrics and the gamma pass rates look like and how a smooth, 2%
hot dose differs from the plan; they say nothing about any model.

  python benchmarks/clinical_example.py [--split=validation-pats]

Writes clinical_metrics.csv, clinical_summary.csv and scores.json into
benchmarks/results/clinical_perturbed_reference_<hostname>/ (or --out).
"""

from __future__ import annotations

import argparse
import os
import pathlib
import subprocess
import sys
import tempfile

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if str(_HERE.parent) not in sys.path:
  sys.path.insert(1, str(_HERE.parent))

import common  # noqa: E402
from gamma_timing import perturbed  # noqa: E402
from randose_jax.data import openkbp  # noqa: E402


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--split', default='validation-pats')
  parser.add_argument('--out', default=None)
  parser.add_argument('--gamma_subsample', default='1.0')
  args = parser.parse_args()
  reference = common.openkbp_dir() / args.split
  out = (
      pathlib.Path(args.out)
      if args.out
      else (
          common.RESULTS_DIR / f'clinical_perturbed_reference_{os.uname()[1]}'
      )
  )
  with tempfile.TemporaryDirectory() as tmp:
    for d in openkbp.list_patient_dirs(reference):
      patient = openkbp.load_patient(d)
      openkbp.write_prediction_csv(
          pathlib.Path(tmp) / f'{d.name}.csv', perturbed(patient)
      )
    env = dict(
        os.environ,
        PYTHONPATH=str(common.ROOT)
        + os.pathsep
        + os.environ.get('PYTHONPATH', ''),
    )
    subprocess.run(
        [
            sys.executable,
            '-m',
            'randose_jax.evaluate',
            f'--reference={reference}',
            f'--predictions={tmp}',
            f'--clinical={out}',
            f'--json={out / "scores.json"}',
            f'--gamma_subsample={args.gamma_subsample}',
        ],
        check=True,
        env=env,
    )


if __name__ == '__main__':
  main()
