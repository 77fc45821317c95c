"""An example of `evaluate --clinical` (and `--report`) on real patients.

By default WITHOUT a model: the "prediction" of each patient is its own
reference dose perturbed (`gamma_timing.perturbed`: smoothed by a Gaussian of
1 voxel, scaled by 1.02, zero outside the possible-dose mask). The tables show
what the clinical metrics and the gamma pass rates look like and how a smooth,
2% hot dose differs from the plan; they say nothing about any model.

With --predictions=DIR (e.g. a run's `predictions/validation-pats/`, written
by `main` or `predict`), the split's patients are scored against that model's
predictions instead (DIR may hold more patients: only the split's are used).

  python benchmarks/clinical_example.py [--split=validation-pats] \
      [--predictions=DIR --name=NAME --about="what model"] [--report=F.html]

Writes clinical_metrics.csv, clinical_summary.csv, scores.json and run.json
(the command, the model note, the wall time, the machine) into
benchmarks/results/clinical_<NAME>_<hostname>/ (NAME defaults to
perturbed_reference; or --out). --report writes the HTML report there too
(or to the path given).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time

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
  parser.add_argument(
      '--predictions',
      default=None,
      help="a model's pt_*.csv folder (default: the perturbed reference)",
  )
  parser.add_argument('--name', default=None)
  parser.add_argument('--about', default='', help='what made the predictions')
  parser.add_argument(
      '--report',
      nargs='?',
      const='',
      default=None,
      help='also write the HTML report (default path: OUT/report.html)',
  )
  args = parser.parse_args()
  reference = common.openkbp_dir() / args.split
  name = args.name or (
      'perturbed_reference' if args.predictions is None else 'model'
  )
  out = (
      pathlib.Path(args.out)
      if args.out
      else common.RESULTS_DIR / f'clinical_{name}_{os.uname()[1]}'
  )
  out.mkdir(parents=True, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    for d in openkbp.list_patient_dirs(reference):
      target = pathlib.Path(tmp) / f'{d.name}.csv'
      if args.predictions is None:
        openkbp.write_prediction_csv(target, perturbed(openkbp.load_patient(d)))
      else:
        source = pathlib.Path(args.predictions) / f'{d.name}.csv'
        if not source.is_file():
          raise SystemExit(f'{source}: no prediction for {d.name}')
        shutil.copyfile(source, target)
    env = dict(
        os.environ,
        PYTHONPATH=str(common.ROOT)
        + os.pathsep
        + os.environ.get('PYTHONPATH', ''),
    )
    command = [
        sys.executable,
        '-m',
        'randose_jax.cli.evaluate',
        f'--reference={reference}',
        f'--predictions={tmp}',
        f'--clinical={out}',
        f'--json={out / "scores.json"}',
        f'--gamma_subsample={args.gamma_subsample}',
    ]
    if args.report is not None:
      command.append(f'--report={args.report or out / "report.html"}')
    start = time.perf_counter()
    subprocess.run(command, check=True, env=env)
    seconds = time.perf_counter() - start
  (out / 'run.json').write_text(
      json.dumps(
          dict(
              reference=str(reference),
              predictions=args.predictions or 'perturbed reference',
              about=args.about,
              gamma_subsample=float(args.gamma_subsample),
              report=args.report is not None,
              evaluate_seconds=round(seconds, 1),
              load_average=os.getloadavg(),
              machine=common.machine_info(),
          ),
          indent=2,
      )
      + '\n'
  )
  print(f'evaluate took {seconds:.1f} s; wrote {out}')


if __name__ == '__main__':
  main()
