"""Time the official scores: vectorised `Evaluator` vs a plain implementation.

The plain one (`tests/plain_scoring.py`, also the tests' reference) scores
patient by patient, ROI by ROI, metric by metric, with a boolean mask over the
full volume per ROI and one `np.percentile` per metric, as the OpenKBP
starter kit's `DoseEvaluator` does. Everything runs in this process on data
already in memory: CSV reading is never timed.

What each side is given (made before any timing): per patient, the
`SparsePatient` the loader and the cache give (sorted voxel lists), its dense
`Patient` (`to_patient()`), and the dense prediction in Gy.

Rows (seconds for all patients):
  plain                   plain_scores on the dense arrays (making them is
                          not timed: the plain side's most favourable case)
  plain, from sparse      the same inputs as the next row: to_patient() per
                          patient, then plain_scores (densifying timed)
  vectorised, from sparse Evaluator.add(SparsePatient, prediction): the
                          reference side built from the voxel lists
                          (`Reference.from_sparse`) and the prediction
                          scored: one-off scoring, nothing prepared
  vectorised, from dense  Evaluator fed `Reference.from_arrays(...)` of the
                          dense arrays (one-off, dense inputs)
  vectorised, prepared    references prepared beforehand, as when one model is
                          scored again and again (validation during training)
  reference preparation, from sparse / from dense
                          building the 100 references alone
  plain / vectorised from sparse, dose outside mask
                          every prediction also has dose outside the
                          possible-dose mask (the exact full-volume path of
                          the dose error; the reference dose is made dense
                          on first use)

The speed-up column divides "plain" (or its "dose outside mask" twin) by the
row, so it never credits the vectorised side with the plain side's
densifying; "same inputs" in the summary is "plain, from sparse" over
"vectorised, from sparse".

Predictions: the reference dose plus Gaussian noise (--noise Gy) inside the
possible-dose mask, clipped at 0 (a decoded prediction is zero outside the
mask). With --num above the 26 shared patients, patients are cycled (renamed
pt_X#k so the ids stay unique). Rounds are interleaved; the table shows the
fastest of --repeats rounds (the median is in the JSON).

  python benchmarks/evaluator.py --num=100
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import pathlib
import platform
import socket
import statistics
import sys
import time

import numpy as np

_HERE = pathlib.Path(__file__).resolve().parent
_ROOT = _HERE.parent
sys.path.insert(0, str(_ROOT / 'tests'))  # plain_scoring: one copy, shared
if str(_ROOT) not in sys.path:
  sys.path.insert(1, str(_ROOT))

import plain_scoring  # noqa: E402
from randose_jax.scoring import dose_dvh as evaluation  # noqa: E402
from randose_jax.data import openkbp  # noqa: E402


def default_data_dir() -> pathlib.Path:
  default = _ROOT.parent / 'shared' / 'openkbp'
  return pathlib.Path(os.environ.get('RANDOSE_OPENKBP_DIR', default))


def machine_info() -> dict:
  """What the timings ran on (a minimal local helper)."""
  return {
      'hostname': socket.gethostname(),
      'platform': platform.platform(),
      'processor': platform.processor() or platform.machine(),
      'cpu_count': os.cpu_count(),
      'python': platform.python_version(),
      'numpy': np.__version__,
      'load_average': os.getloadavg(),
  }


def load_cases(
    data_dir: pathlib.Path, num: int, noise_gy: float, seed: int = 0
) -> tuple[list[dict], list[np.ndarray]]:
  """Plain-scoring case dicts (see plain_scoring.plain_scores) with the
  patient's `SparsePatient` under 'sparse', cycled to num.

  Returns the cases and, per case, a second prediction with dose outside the
  possible-dose mask. Replicas share their arrays (no extra memory).
  """
  dirs = [
      d
      for split in ('train-pats', 'validation-pats')
      if (data_dir / split).is_dir()
      for d in openkbp.list_patient_dirs(data_dir / split)
  ]
  if not dirs:
    raise SystemExit(f'{data_dir}: no train-pats/ or validation-pats/ folder')
  rng = np.random.default_rng(seed)
  unique = []
  for d in dirs[:num]:
    sparse = openkbp.load_sparse_patient(d)
    p = sparse.to_patient()
    noise = rng.normal(0.0, noise_gy, p.dose.shape) * p.possible_dose_mask
    prediction = np.maximum(p.dose + noise, 0.0)
    outside = prediction + 0.5 * (~p.possible_dose_mask) * (
        rng.random(p.dose.shape) < 0.01
    )
    unique.append(
        (
            {
                'patient_id': p.patient_id,
                'reference': p.dose,
                'prediction': prediction,
                'possible_dose_mask': p.possible_dose_mask,
                'structure_masks': p.structure_masks,
                'roi_present': p.roi_present,
                'voxel_dimensions': p.voxel_dimensions,
                'sparse': sparse,
            },
            outside,
        )
    )
  cases, outside_predictions = [], []
  for i in range(num):
    case, outside = unique[i % len(unique)]
    replica = i // len(unique)
    patient_id = case['patient_id'] + (f'#{replica}' if replica else '')
    cases.append(
        dict(
            case,
            patient_id=patient_id,
            sparse=dataclasses.replace(case['sparse'], patient_id=patient_id),
        )
    )
    outside_predictions.append(outside)
  return cases, outside_predictions


def reference_of(case: dict) -> evaluation.Reference:
  return evaluation.Reference.from_arrays(
      case['patient_id'],
      case['reference'],
      case['possible_dose_mask'],
      case['structure_masks'],
      case['roi_present'],
      case['voxel_dimensions'],
  )


def densified(cases):
  """The plain cases made from each case's SparsePatient, one at a time."""
  for case in cases:
    p = case['sparse'].to_patient()
    yield dict(
        case,
        reference=p.dose,
        possible_dose_mask=p.possible_dose_mask,
        structure_masks=p.structure_masks,
        roi_present=p.roi_present,
        voxel_dimensions=p.voxel_dimensions,
    )


def score_vectorised(cases, predictions=None, references=None, sparse=False):
  evaluator = evaluation.Evaluator()
  for i, case in enumerate(cases):
    if references:
      reference = references[i]
    else:
      reference = case['sparse'] if sparse else reference_of(case)
    evaluator.add(
        reference, case['prediction'] if predictions is None else predictions[i]
    )
  return evaluator.result()


def check_same(plain, result: evaluation.EvaluationResult, what: str) -> float:
  """Largest relative difference of the scores, errors and metrics; raises
  above 1e-6."""
  dose_score, dvh_score, dose_errors, rows = plain
  table = result.metric_table()
  if len(table) != len(rows):
    raise AssertionError(f'{what}: {len(table)} metrics, plain has {len(rows)}')
  pairs = [(dose_score, result.dose_score), (dvh_score, result.dvh_score)]
  pairs += list(zip(dose_errors, result.dose_errors))
  pairs += list(zip([r[3] for r in rows], table['reference']))
  pairs += list(zip([r[4] for r in rows], table['prediction']))
  a, b = np.array(pairs).T
  # Relative; absolute (scaled by 1e-3 Gy) for values near zero.
  worst = float(np.max(np.abs(a - b) / np.maximum(np.abs(a), 1e-3)))
  if worst > 1e-6:
    raise AssertionError(f'{what}: differs from plain by {worst:.3g} relative')
  return worst


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument(
      '--data',
      type=pathlib.Path,
      default=default_data_dir(),
      help='OpenKBP folder with train-pats/ and validation-pats/',
  )
  p.add_argument(
      '--num',
      type=int,
      default=26,
      help='patients to score (cycling the shared ones)',
  )
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument(
      '--noise', type=float, default=2.0, help='std of the prediction noise, Gy'
  )
  p.add_argument(
      '--json',
      type=pathlib.Path,
      default=None,
      help='default: benchmarks/results/evaluator_<hostname>.json',
  )
  args = p.parse_args(argv)
  json_path = args.json or (
      _HERE / 'results' / f'evaluator_{socket.gethostname()}.json'
  )

  started = time.perf_counter()
  cases, outside = load_cases(args.data, args.num, args.noise)
  print(f'loaded {len(cases)} cases in {time.perf_counter() - started:.1f} s')
  outside_cases = [dict(c, prediction=o) for c, o in zip(cases, outside)]

  prepared: list[evaluation.Reference] = []

  def prepare():
    prepared[:] = [evaluation.Reference.from_sparse(c['sparse']) for c in cases]

  runs = {
      'plain': lambda: plain_scoring.plain_scores(cases),
      'plain, from sparse': lambda: plain_scoring.plain_scores(
          densified(cases)
      ),
      'vectorised, from sparse': lambda: score_vectorised(cases, sparse=True),
      'vectorised, from dense': lambda: score_vectorised(cases),
      'vectorised, prepared': lambda: score_vectorised(
          cases, references=prepared
      ),
      'reference preparation, from sparse': prepare,
      'reference preparation, from dense': lambda: [
          reference_of(c) for c in cases
      ],
      'plain, dose outside mask': lambda: plain_scoring.plain_scores(
          outside_cases
      ),
      'vectorised from sparse, dose outside mask': lambda: score_vectorised(
          cases, predictions=outside, sparse=True
      ),
  }
  prepare()
  times = {name: [] for name in runs}
  outputs = {}
  machine = machine_info()
  for _ in range(args.repeats):
    for name, run in runs.items():
      t = time.perf_counter()
      outputs[name] = run()
      times[name].append(time.perf_counter() - t)
    outputs.pop('reference preparation, from dense')

  worst = max(
      check_same(
          outputs['plain'], outputs['vectorised, from sparse'], 'from sparse'
      ),
      check_same(
          outputs['plain'], outputs['vectorised, from dense'], 'from dense'
      ),
      check_same(outputs['plain'], outputs['vectorised, prepared'], 'prepared'),
      check_same(
          outputs['plain, dose outside mask'],
          outputs['vectorised from sparse, dose outside mask'],
          'outside',
      ),
  )
  if outputs['plain, from sparse'] != outputs['plain']:
    raise AssertionError('plain scores of the densified sparse patients differ')

  best = {name: min(t) for name, t in times.items()}
  result = outputs['vectorised, from sparse']
  print(
      f'\n{len(cases)} patients, {result.num_dvh_metrics} DVH metrics; '
      f'dose score {result.dose_score:.4f}, DVH score '
      f'{result.dvh_score:.4f}; worst relative difference to plain '
      f'{worst:.1e}\n'
  )
  print(f'{"":44s}{"s total":>9s}{"ms/patient":>12s}{"speedup":>9s}')
  plain_of = {
      name: (
          'plain, dose outside mask'
          if 'outside' in name
          else None
          if 'preparation' in name
          else 'plain'
      )
      for name in runs
  }
  rows = {}
  for name, seconds in best.items():
    base = plain_of[name]
    speedup = best[base] / seconds if base else None
    rows[name] = {
        'seconds': seconds,
        'median_seconds': statistics.median(times[name]),
        'ms_per_patient': 1e3 * seconds / len(cases),
        'speedup_vs_plain': speedup,
    }
    print(
        f'{name:44s}{seconds:9.3f}{1e3 * seconds / len(cases):12.2f}'
        + (f'{speedup:8.1f}x' if speedup else '')
    )
  same_inputs = best['plain, from sparse'] / best['vectorised, from sparse']
  print(
      f'\none-off speed-up, same in-memory inputs (SparsePatient + '
      f'prediction): {same_inputs:.1f}x'
  )

  machine['load_average_end'] = os.getloadavg()
  report = {
      'benchmark': 'evaluator',
      'command': (
          'python benchmarks/evaluator.py '
          + ' '.join(sys.argv[1:] if argv is None else argv)
      ),
      'num_patients': len(cases),
      'unique_patients': len({c['patient_id'].split('#')[0] for c in cases}),
      'repeats': args.repeats,
      'noise_gy': args.noise,
      'dose_score': result.dose_score,
      'dvh_score': result.dvh_score,
      'num_dvh_metrics': result.num_dvh_metrics,
      'worst_relative_difference': worst,
      'one_off_speedup_same_inputs': same_inputs,
      'one_off_speedup_vs_plain_on_dense': rows['vectorised, from sparse'][
          'speedup_vs_plain'
      ],
      'timings': rows,
      'machine': machine,
  }
  json_path.parent.mkdir(parents=True, exist_ok=True)
  json_path.write_text(json.dumps(report, indent=2) + '\n')
  print(f'\nwrote {json_path}')


if __name__ == '__main__':
  main()
