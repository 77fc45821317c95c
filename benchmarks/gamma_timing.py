"""Time the gamma pass rate (randose_jax.scoring.clinical) on real 128^3 patients.

For each patient: the reference dose against a perturbed copy (the
reference smoothed by a Gaussian of 1 voxel, scaled by 1.02, zero outside
the possible-dose mask: a smooth, slightly hot "prediction"). For each
criterion (3%/3mm, 2%/2mm) and each --subsample fraction: the seconds of
`clinical.gamma_pass_rate` (the search stopped at pass or at gamma 1, what
`evaluate --clinical` runs) and the pass rate; fractions below 1 are drawn
with --seeds seeds (the spread of the estimate). With --map, also the
seconds of the full `gamma_map` (values up to gamma 2, for plots) at
subsample 1. With --planes, also the seconds of the map the HTML report
draws (`evaluate --report`): `gamma_map` up to gamma 2 on the three planes
through the PTV centre only (`viz.view_planes`). With --predictions=DIR, the
"prediction" is a model's `DIR/<patient>.csv` instead of the perturbed copy.
--gamma_impl picks who computes gamma (default pymedphys, which gave the
figures of benchmarks/NOTES.md before issue 24; `gamma_jax.py` times the two
side by side).

  python benchmarks/gamma_timing.py \
      --patients=train-pats/pt_10,validation-pats/pt_202,train-pats/pt_12
  python benchmarks/gamma_timing.py --patients=validation-pats/pt_202 \
      --subsample=1 --planes --predictions=RUN/predictions/validation-pats

Writes benchmarks/results/gamma_timing_<hostname>.json (or --json).
"""

from __future__ import annotations

import argparse
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
from randose_jax import viz  # noqa: E402
from randose_jax.data import openkbp  # noqa: E402


def perturbed(patient: openkbp.Patient) -> np.ndarray:
  return (
      ndimage.gaussian_filter(patient.dose, 1.0)
      * 1.02
      * patient.possible_dose_mask
  )


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      '--patients',
      default='train-pats/pt_10,validation-pats/pt_202,train-pats/pt_12',
  )
  parser.add_argument('--subsample', default='1,0.5,0.2,0.1,0.05')
  parser.add_argument('--seeds', type=int, default=3)
  parser.add_argument('--map', action='store_true')
  parser.add_argument('--planes', action='store_true')
  parser.add_argument('--predictions', default=None)
  parser.add_argument('--json', default=None)
  parser.add_argument(
      '--gamma_impl', default='pymedphys', choices=clinical.GAMMA_IMPLS
  )
  args = parser.parse_args()
  impl = {'gamma_impl': args.gamma_impl}
  data = common.openkbp_dir()
  fractions = [float(f) for f in args.subsample.split(',')]
  result = {
      'machine': common.machine_info(),
      'gamma_impl': args.gamma_impl,
      'prediction': (
          args.predictions
          or 'gaussian_filter(reference, 1 voxel) * 1.02, masked'
      ),
      'patients': [],
  }
  for name in args.patients.split(','):
    patient = openkbp.load_patient(data / name)
    if args.predictions:
      prediction = openkbp.read_prediction_csv(
          pathlib.Path(args.predictions) / f'{patient.patient_id}.csv',
          patient.dose.shape,
      )
    else:
      prediction = perturbed(patient)
    entry = {
        'patient': name,
        'voxel_dimensions': patient.voxel_dimensions.tolist(),
        'mask_voxels': int(patient.possible_dose_mask.sum()),
        'runs': [],
    }
    for criteria in clinical.GAMMA_CRITERIA:
      for fraction in fractions:
        for seed in range(1 if fraction == 1 else args.seeds):
          load = os.getloadavg()[0]
          start = time.perf_counter()
          rate, points = clinical.gamma_pass_rate(
              patient.dose,
              prediction,
              patient.voxel_dimensions,
              patient.possible_dose_mask,
              *criteria,
              subsample=fraction,
              seed=seed,
              **impl,
          )
          seconds = time.perf_counter() - start
          run = {
              'criterion': clinical.gamma_metric_name(*criteria),
              'subsample': fraction,
              'seed': seed,
              'points': points,
              'pass_rate': rate,
              'seconds': seconds,
              'load_1min': load,
          }
          entry['runs'].append(run)
          print(
              f"{name} {run['criterion']} subsample {fraction:g} seed "
              f'{seed}: {rate:.2f}% of {points} points, {seconds:.1f} s '
              f'(load {load:.1f})',
              flush=True,
          )
      if args.map:
        start = time.perf_counter()
        gamma = clinical.gamma_map(
            patient.dose,
            prediction,
            patient.voxel_dimensions,
            patient.possible_dose_mask,
            *criteria,
            max_gamma=2.0,
            **impl,
        )
        seconds = time.perf_counter() - start
        points = ~np.isnan(gamma)
        entry.setdefault('maps', []).append(
            {
                'criterion': clinical.gamma_metric_name(*criteria),
                'seconds': seconds,
                'max_gamma': 2.0,
                'pass_rate': float(100 * np.mean(gamma[points] < 1)),
            }
        )
        print(f'{name} map {criteria}: {seconds:.1f} s', flush=True)
      if args.planes:
        region = viz.view_planes(
            patient.dose.shape,
            viz.slice_centre(patient.structure_masks, patient.dose),
        )
        load = os.getloadavg()[0]
        start = time.perf_counter()
        gamma = clinical.gamma_map(
            patient.dose,
            prediction,
            patient.voxel_dimensions,
            patient.possible_dose_mask,
            *criteria,
            max_gamma=viz.GAMMA_MAX,
            region=region,
            **impl,
        )
        seconds = time.perf_counter() - start
        points = ~np.isnan(gamma)
        entry.setdefault('plane_maps', []).append(
            {
                'criterion': clinical.gamma_metric_name(*criteria),
                'seconds': seconds,
                'max_gamma': viz.GAMMA_MAX,
                'points': int(points.sum()),
                'pass_rate': float(100 * np.mean(gamma[points] < 1)),
                'load_1min': load,
            }
        )
        print(
            f'{name} map on the three planes {criteria}: {seconds:.1f} s, '
            f'{int(points.sum())} points (load {load:.1f})',
            flush=True,
        )
    result['patients'].append(entry)
  result['machine_after'] = {'load_average': list(os.getloadavg())}
  path = common.save_json(result, args.json, 'gamma_timing')
  print(f'wrote {path}')


if __name__ == '__main__':
  main()
