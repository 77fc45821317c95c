"""The JAX gamma index (randose_jax.scoring.gamma) beside pymedphys, one process.

For each patient (128^3, the shared OpenKBP validation patients by default)
and each "prediction" made from its reference dose (no trained model's
predictions are kept in the repository):

- shift: the reference moved one voxel along axis 2 (2.5 mm, superior to
  inferior) and scaled by 1.03, zero outside the possible-dose mask;
- blur: the reference smoothed by a Gaussian of 1 voxel and scaled by 1.02,
  masked (`gamma_timing.py`'s);
- poor (only with --predictions=...,poor): smoothed by 2 voxels, moved 1
  voxel along axis 0 and 2 along axis 2, x 1.08, masked: most points fail,
  each failing point's search runs to its end (the slow case);

the gamma pass rates at 3%/3mm and 2%/2mm as `evaluate --clinical` computes
them (`clinical.gamma_pass_rate`: global, 10% threshold, search stopped at
pass or at gamma 1) by --gamma_impl=jax and by pymedphys, their seconds and
the load average (and both criteria in one JAX call,
`clinical.gamma_pass_rates`, what `evaluate --clinical` runs). JAX's
compilation is timed apart: the first patient's
JAX calls are made once before the timed ones (cold: tracing and compiling
the kernel for every block shape they meet), and cold minus warm is
reported as compile time; a block shape first met on a later patient
compiles inside its call (a slower figure in the table). With --map, also the full gamma map
(values up to 2, every point searched to its gamma) by both on the
--map_patients, and their agreement: pass rates, and the largest relative
difference of gamma where pymedphys's is below 2.

Runs on whatever JAX's default device is: on a GPU host the JAX column is
the GPU figure (the device is recorded).

  python benchmarks/gamma_jax.py            # 6 validation patients
  python benchmarks/gamma_jax.py --patients=validation-pats/pt_202 --map
  python benchmarks/gamma_jax.py --no-pymedphys   # JAX only (a GPU host)

Writes benchmarks/results/gamma_jax_<hostname>.json (or --json).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys
import time

import numpy as np
from scipy import ndimage

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if str(_HERE.parent) not in sys.path:
  sys.path.insert(1, str(_HERE.parent))

import common  # noqa: E402
from randose_jax.scoring import clinical  # noqa: E402
from randose_jax.data import openkbp  # noqa: E402

PREDICTIONS = {
    'shift': 'np.roll(reference, 1, axis=2) * 1.03, masked',
    'blur': 'gaussian_filter(reference, 1 voxel) * 1.02, masked',
    'poor': (
        'np.roll(gaussian_filter(reference, 2 voxels), (1, 2), axis=(0, 2))'
        ' * 1.08, masked'
    ),
}
VALIDATION = 'pt_202,pt_211,pt_216,pt_219,pt_233,pt_238'


def prediction(patient: openkbp.Patient, kind: str) -> np.ndarray:
  if kind == 'shift':
    moved = np.roll(patient.dose, 1, axis=2) * 1.03
  elif kind == 'blur':
    moved = ndimage.gaussian_filter(patient.dose, 1.0) * 1.02
  else:
    smooth = ndimage.gaussian_filter(patient.dose, 2.0)
    moved = np.roll(smooth, (1, 2), axis=(0, 2)) * 1.08
  return moved * patient.possible_dose_mask


def timed(function, *args, **kwargs):
  """(result, wall seconds, 1-minute load before); the process's CPU
  seconds (all threads) of the call in `timed.cpu`."""
  load = os.getloadavg()[0]
  start, cpu = time.perf_counter(), time.process_time()
  out = function(*args, **kwargs)
  timed.cpu = time.process_time() - cpu
  return out, time.perf_counter() - start, load


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      '--patients',
      default=','.join(f'validation-pats/{p}' for p in VALIDATION.split(',')),
  )
  parser.add_argument('--predictions', default='shift,blur')
  parser.add_argument(
      '--pymedphys', action=argparse.BooleanOptionalAction, default=True
  )
  parser.add_argument('--map', action='store_true')
  parser.add_argument('--map_patients', default='validation-pats/pt_202')
  parser.add_argument('--json', default=None)
  args = parser.parse_args()
  import jax  # pylint: disable=g-import-not-at-top

  device = jax.devices()[0]
  data = common.openkbp_dir()
  impls = ('jax', 'pymedphys') if args.pymedphys else ('jax',)
  result = {
      'machine': common.machine_info(),
      'jax_device': f'{device.platform} {device.device_kind}',
      'predictions': {k: PREDICTIONS[k] for k in args.predictions.split(',')},
      'runs': [],
  }
  print(f"{result['machine']['cpu_model']}, JAX on {result['jax_device']}")
  first = args.patients.split(',')[0]
  cold = 0.0
  patient = openkbp.load_patient(data / first)
  for kind in args.predictions.split(','):
    for criteria in clinical.GAMMA_CRITERIA:
      cold += timed(
          clinical.gamma_pass_rate,
          patient.dose,
          prediction(patient, kind),
          patient.voxel_dimensions,
          patient.possible_dose_mask,
          *criteria,
      )[1]
  for name in args.patients.split(','):
    patient = openkbp.load_patient(data / name)
    for kind in args.predictions.split(','):
      evaluated = prediction(patient, kind)
      # What `evaluate --clinical` runs: both criteria in one JAX call.
      rates, seconds, load = timed(
          clinical.gamma_pass_rates,
          patient.dose,
          evaluated,
          patient.voxel_dimensions,
          patient.possible_dose_mask,
          clinical.GAMMA_CRITERIA,
      )
      result.setdefault('jax_both_in_one_call', []).append(
          {
              'patient': name,
              'prediction': kind,
              'pass_rates': [r for r, _ in rates],
              'seconds': seconds,
              'cpu_seconds': timed.cpu,
              'load_1min': load,
          }
      )
      print(
          f'{name} {kind} both criteria in one JAX call: {seconds:.2f} s '
          f'({timed.cpu:.2f} CPU s, load {load:.1f})',
          flush=True,
      )
      for criteria in clinical.GAMMA_CRITERIA:
        run = {
            'patient': name,
            'prediction': kind,
            'criterion': clinical.gamma_metric_name(*criteria),
        }
        for impl in impls:
          call = (
              clinical.gamma_pass_rate,
              patient.dose,
              evaluated,
              patient.voxel_dimensions,
              patient.possible_dose_mask,
              *criteria,
          )
          (rate, points), seconds, load = timed(*call, gamma_impl=impl)
          run.update(
              {
                  'points': points,
                  f'{impl}_pass_rate': rate,
                  f'{impl}_seconds': seconds,
                  f'{impl}_cpu_seconds': timed.cpu,
                  f'{impl}_load_1min': load,
              }
          )
        result['runs'].append(run)
        print(
            f"{name} {kind} {run['criterion']}: "
            + ', '.join(
                f"{impl} {run[f'{impl}_pass_rate']:.3f}% "
                f"{run[f'{impl}_seconds']:.2f} s "
                f"(load {run[f'{impl}_load_1min']:.1f})"
                for impl in impls
            ),
            flush=True,
        )
  if args.map:
    for name in args.map_patients.split(','):
      patient = openkbp.load_patient(data / name)
      for kind in args.predictions.split(','):
        evaluated = prediction(patient, kind)
        for criteria in clinical.GAMMA_CRITERIA:
          entry = {
              'patient': name,
              'prediction': kind,
              'criterion': clinical.gamma_metric_name(*criteria),
              'max_gamma': 2.0,
          }
          maps = {}
          for impl in impls:
            maps[impl], seconds, load = timed(
                clinical.gamma_map,
                patient.dose,
                evaluated,
                patient.voxel_dimensions,
                patient.possible_dose_mask,
                *criteria,
                max_gamma=2.0,
                gamma_impl=impl,
            )
            points = ~np.isnan(maps[impl])
            entry[f'{impl}_seconds'] = seconds
            entry[f'{impl}_load_1min'] = load
            entry[f'{impl}_pass_rate'] = float(
                100 * np.mean(maps[impl][points] < 1)
            )
          if 'pymedphys' in maps:
            got, want = maps['jax'], maps['pymedphys']
            below = want < 2
            entry['same_points'] = bool(
                np.array_equal(np.isnan(got), np.isnan(want))
            )
            entry['max_abs_difference'] = float(np.nanmax(np.abs(got - want)))
            entry['max_relative_difference_below_2'] = float(
                np.max(np.abs(got - want)[below] / want[below].clip(1e-3))
            )
          result.setdefault('maps', []).append(entry)
          print(f'map {entry}', flush=True)
  warm = sum(r['jax_seconds'] for r in result['runs'] if r['patient'] == first)
  result['jax_cold_first_patient_seconds'] = cold
  result['jax_compile_seconds'] = cold - warm
  print(f'JAX compile: {cold - warm:.2f} s (first patient cold {cold:.2f} s)')
  result['machine_after'] = {'load_average': list(os.getloadavg())}
  both = [e['seconds'] for e in result['jax_both_in_one_call']]
  summary = {
      'jax_both_in_one_call_seconds_min': min(both),
      'jax_both_in_one_call_seconds_max': max(both),
  }
  for impl in impls:
    per_patient = {}
    for run in result['runs']:
      key = (run['patient'], run['prediction'])
      per_patient[key] = per_patient.get(key, 0) + run[f'{impl}_seconds']
    summary[f'{impl}_both_criteria_seconds_min'] = min(per_patient.values())
    summary[f'{impl}_both_criteria_seconds_max'] = max(per_patient.values())
  if args.pymedphys:
    summary['max_pass_rate_difference_pp'] = max(
        abs(r['jax_pass_rate'] - r['pymedphys_pass_rate'])
        for r in result['runs']
    )
  result['summary'] = summary
  print(json.dumps(summary, indent=1))
  print(
      '| patient | prediction | criterion | points | '
      + ' | '.join(f'{i} pass rate | {i} s (load)' for i in impls)
      + ' |'
  )
  print('|---|---|---|---|' + '---|---|' * len(impls))
  for run in result['runs']:
    print(
        f"| {run['patient'].split('/')[-1]} | {run['prediction']} | "
        f"{run['criterion']} | {run['points']:,} | "
        + ' | '.join(
            f"{run[f'{i}_pass_rate']:.2f}% | {run[f'{i}_seconds']:.2f} "
            f"({run[f'{i}_load_1min']:.1f})"
            for i in impls
        )
        + ' |'
    )
  path = common.save_json(result, args.json, 'gamma_jax')
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
