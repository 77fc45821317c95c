"""Scoring a folder of predictions end to end: `python -m randose_jax.cli.evaluate`
against the official starter kit's loop, both as fresh processes.

Data, made before any timing: --num patients of --data (the first in id
order, each folder linked into a temporary reference folder), and for each
a prediction written the way the kit and most tools write one:

  pd.DataFrame({'data': dose[mask]}, index=flat_idx).to_csv(path)

(floats at full precision), where dose = reference dose * a random factor
(0.85..1.15 per patient) + Gaussian noise (--noise Gy), clipped at 0, and
flat_idx = the possible-dose mask's voxels.

Rows (wall seconds, process start to exit; the JSON also has the official
process's own seconds from its first patient to its scores):
  randose_jax.cli.evaluate      python -m randose_jax.cli.evaluate --reference=...
                            --predictions=... --json=... (this checkout)
  official kit loop         this file's `official_scores`, in a fresh
                            process: the starter kit's DoseEvaluator re-
                            implemented (one patient at a time: pandas
                            read_csv of dose.csv, the prediction, the
                            possible-dose mask, every ROI mask; dense 128^3
                            float64 arrays; np.loadtxt of
                            voxel_dimensions.csv; dose error = sum of
                            |reference - prediction| / mask voxels; DVH
                            metrics by boolean masks and np.percentile).
                            Its metrics go to a dict where the kit fills
                            pandas DataFrames cell by cell (in its favour).
  kit's reads alone         the official loop's pandas.read_csv and
                            np.loadtxt calls and nothing else: the part of
                            both sides' time spent in pandas' parser for the
                            same files (randose_jax reads them too)
  randose_jax.cli.evaluate at ef8a8a7 (with --with_old)
                            the same command on the package as of commit
                            ef8a8a7 (its hand-written CSV parser), from a
                            `git archive` in a temporary folder
  randose_jax.cli.evaluate at COMMIT (with --with_commit=COMMIT, repeatable)
                            the same, at COMMIT

The rows alternate over --repeats rounds; the table gives each row's
fastest round (the median is in the JSON), in wall seconds and in CPU
seconds of the child process (user + system, less sensitive to other jobs
on the machine). The scores of every run are
compared: dose score, DVH score and each patient's dose error must agree
to 1e-6 (relative; absolute below 1e-3 Gy), or the benchmark fails.

  python benchmarks/evaluate_e2e.py --num=100 --with_old \\
      --json=benchmarks/results/evaluate_e2e_vm.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

_HERE = pathlib.Path(__file__).resolve().parent
_ROOT = _HERE.parent
sys.path.insert(0, str(_HERE))

import common  # noqa: E402

GRID = (128, 128, 128)
ROI_NAMES = (
    'Brainstem',
    'SpinalCord',
    'RightParotid',
    'LeftParotid',
    'Esophagus',
    'Larynx',
    'Mandible',
    'PTV56',
    'PTV63',
    'PTV70',
)
OAR_NAMES = ROI_NAMES[:7]
OLD_COMMIT = 'ef8a8a7'


# ------------------------------------------------ the official kit's loop


def _dense(frame, shape=GRID + (1,)):
  """The kit's sparse-to-dense step: np.put of the `data` column (or 1 for
  a mask, whose column is empty) into float64 zeros."""
  out = np.zeros(shape)
  values = frame['data'].values
  np.put(out, frame.index.values, 1 if np.isnan(values).all() else values)
  return out


def _dvh_metrics(roi_dose, name: str, voxels_in_tenth_cc) -> dict:
  """The kit's DVH metrics of one ROI's doses."""
  if name in OAR_NAMES:
    q = 100 - voxels_in_tenth_cc / roi_dose.size * 100
    return {
        'D_0.1_cc': np.percentile(roi_dose, max(q, 0)),
        'mean': roi_dose.mean(),
    }
  return {
      'D_99': np.percentile(roi_dose, 1),
      'D_95': np.percentile(roi_dose, 5),
      'D_1': np.percentile(roi_dose, 99),
  }


def official_scores(
    reference_dir: pathlib.Path, predictions_dir: pathlib.Path
) -> dict:
  """Dose score, DVH score and per-patient dose errors, computed patient by
  patient as the starter kit's DoseEvaluator does (module docstring).

  An OAR smaller than 0.1 cc would give a negative percentile (the kit's
  np.percentile raises); it is clipped at 0 here, as randose_jax does.
  """
  import pandas as pd  # the kit's reader

  dose_errors, metric_errors = {}, []
  patient_ids = sorted(
      (p.name for p in reference_dir.iterdir()),
      key=lambda name: int(name.split('_')[1]),
  )
  for patient_id in patient_ids:
    folder = reference_dir / patient_id
    read = lambda path: pd.read_csv(path, index_col=0)
    reference = _dense(read(folder / 'dose.csv'))[..., 0]
    prediction = _dense(read(predictions_dir / f'{patient_id}.csv'))[..., 0]
    mask = _dense(read(folder / 'possible_dose_mask.csv'))[..., 0]
    rois = np.zeros(GRID + (len(ROI_NAMES),))
    for channel, name in enumerate(ROI_NAMES):
      path = folder / f'{name}.csv'
      if path.exists():
        indices = read(path).index.values
        np.put(rois, len(ROI_NAMES) * indices + channel, 1)
    voxel_volume = np.prod(np.loadtxt(folder / 'voxel_dimensions.csv'))

    dose_errors[patient_id] = float(
        np.sum(np.abs(reference - prediction)) / np.sum(mask)
    )
    voxels_in_tenth_cc = np.maximum(1, np.round(100 / voxel_volume))
    for channel, name in enumerate(ROI_NAMES):
      roi_mask = rois[..., channel].astype(bool)
      if not roi_mask.any():
        continue
      ref = _dvh_metrics(reference[roi_mask], name, voxels_in_tenth_cc)
      pred = _dvh_metrics(prediction[roi_mask], name, voxels_in_tenth_cc)
      metric_errors += [abs(ref[k] - pred[k]) for k in ref]
  return {
      'dose_score': float(np.mean(list(dose_errors.values()))),
      'dvh_score': float(np.mean(metric_errors)),
      'num_patients': len(dose_errors),
      'num_dvh_metrics': len(metric_errors),
      'dose_errors': dose_errors,
  }


def official_reads(
    reference_dir: pathlib.Path, predictions_dir: pathlib.Path
) -> int:
  """Only the file reads of `official_scores`; returns the files read."""
  import pandas as pd

  files = 0
  for folder in reference_dir.iterdir():
    paths = [
        folder / 'dose.csv',
        predictions_dir / f'{folder.name}.csv',
        folder / 'possible_dose_mask.csv',
    ]
    paths += [
        folder / f'{name}.csv'
        for name in ROI_NAMES
        if (folder / f'{name}.csv').exists()
    ]
    for path in paths:
      pd.read_csv(path, index_col=0)
    np.loadtxt(folder / 'voxel_dimensions.csv')
    files += len(paths) + 1
  return files


# ------------------------------------------------------------ the data


def make_folders(
    data: pathlib.Path,
    num: int,
    tmp: pathlib.Path,
    noise_gy: float,
    seed: int = 0,
):
  """The reference folder (links to the first `num` patients) and the
  predictions folder (module docstring); returns both."""
  import pandas as pd

  dirs = sorted(
      (p for p in data.iterdir() if p.name.startswith('pt_')),
      key=lambda p: int(p.name.split('_')[1]),
  )[:num]
  if len(dirs) < num:
    raise SystemExit(f'{data}: {len(dirs)} patients, --num={num} asked')
  reference, predictions = tmp / 'reference', tmp / 'predictions'
  reference.mkdir()
  predictions.mkdir()
  rng = np.random.default_rng(seed)
  for d in dirs:
    (reference / d.name).symlink_to(d.resolve())
    dose = pd.read_csv(d / 'dose.csv', index_col=0)['data']
    flat_idx = pd.read_csv(d / 'possible_dose_mask.csv', index_col=0).index
    dense = np.zeros(np.prod(GRID))
    dense[dose.index.values] = dose.values
    predicted = np.maximum(
        dense[flat_idx] * rng.uniform(0.85, 1.15)
        + rng.normal(0, noise_gy, flat_idx.size),
        0.0,
    )
    pd.DataFrame({'data': predicted}, index=flat_idx).to_csv(
        predictions / f'{d.name}.csv'
    )
  return reference, predictions


# --------------------------------------------------------------- timing


def children_cpu() -> float:
  usage = resource.getrusage(resource.RUSAGE_CHILDREN)
  return usage.ru_utime + usage.ru_stime


def run_timed(command: list[str], env: dict, json_path: pathlib.Path):
  """Wall and CPU seconds of one process, start to exit, and the JSON it
  wrote."""
  json_path.unlink(missing_ok=True)
  started, cpu = time.perf_counter(), children_cpu()
  done = subprocess.run(
      command, env=env, capture_output=True, text=True, cwd=json_path.parent
  )
  wall, cpu = time.perf_counter() - started, children_cpu() - cpu
  if done.returncode:
    raise SystemExit(f'{command}: exit {done.returncode}\n{done.stderr}')
  return wall, cpu, json.loads(json_path.read_text())


def compare(a: dict, b: dict, what: str) -> float:
  """Largest relative difference of the scores and dose errors; raises above
  1e-6."""
  if set(a['dose_errors']) != set(b['dose_errors']) or (
      a['num_dvh_metrics'] != b['num_dvh_metrics']
  ):
    raise AssertionError(f'{what}: different patients or metric counts')
  pairs = [(a['dose_score'], b['dose_score']), (a['dvh_score'], b['dvh_score'])]
  pairs += [(v, b['dose_errors'][k]) for k, v in a['dose_errors'].items()]
  x, y = np.array(pairs).T
  worst = float(np.max(np.abs(x - y) / np.maximum(np.abs(x), 1e-3)))
  if worst > 1e-6:
    raise AssertionError(f'{what}: scores differ by {worst:.3g} relative')
  return worst


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument(
      '--data',
      type=pathlib.Path,
      default=pathlib.Path('/work/data/openkbp/train-pats'),
      help='a folder of pt_* patients with dose.csv',
  )
  parser.add_argument('--num', type=int, default=100)
  parser.add_argument('--repeats', type=int, default=2)
  parser.add_argument('--noise', type=float, default=2.0, help='Gy')
  parser.add_argument(
      '--with_old',
      action='store_true',
      help=f'also time randose_jax.cli.evaluate at {OLD_COMMIT}',
  )
  parser.add_argument(
      '--with_commit',
      action='append',
      default=[],
      metavar='COMMIT',
      help='also time randose_jax.cli.evaluate at this commit (repeatable)',
  )
  parser.add_argument(
      '--json',
      type=pathlib.Path,
      default=common.default_json_path('evaluate_e2e'),
  )
  # Internal: the official loop's process, or its reads alone.
  parser.add_argument(
      '--official',
      nargs=3,
      type=pathlib.Path,
      metavar=('REFERENCE', 'PREDICTIONS', 'JSON'),
      help=argparse.SUPPRESS,
  )
  parser.add_argument(
      '--reads_only', action='store_true', help=argparse.SUPPRESS
  )
  args = parser.parse_args(argv)
  if args.official:
    started = time.perf_counter()
    if args.reads_only:
      scores = {'files_read': official_reads(*args.official[:2])}
    else:
      scores = official_scores(*args.official[:2])
    scores['seconds_in_process'] = time.perf_counter() - started
    args.official[2].write_text(json.dumps(scores))
    return

  machine = common.machine_info()
  machine['uptime'] = subprocess.run(
      ['uptime'], capture_output=True, text=True
  ).stdout.strip()
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    started = time.perf_counter()
    reference, predictions = make_folders(args.data, args.num, tmp, args.noise)
    print(
        f'{args.num} predictions written in '
        f'{time.perf_counter() - started:.1f} s'
    )
    out = tmp / 'scores.json'
    env = dict(os.environ, PYTHONPATH=str(_ROOT))
    evaluate = [
        sys.executable,
        '-m',
        'randose_jax.cli.evaluate',
        f'--reference={reference}',
        f'--predictions={predictions}',
        f'--json={out}',
    ]
    official = [
        sys.executable,
        __file__,
        '--official',
        str(reference),
        str(predictions),
        str(out),
    ]
    rows = {
        'randose_jax.cli.evaluate': (evaluate, env),
        'official kit loop': (official, env),
        "kit's reads alone": (official + ['--reads_only'], env),
    }
    for commit in args.with_commit + ([OLD_COMMIT] if args.with_old else []):
      old = tmp / f'old-{commit}'
      old.mkdir()
      archive = subprocess.run(
          ['git', 'archive', commit, 'randose_jax'],
          cwd=_ROOT,
          check=True,
          capture_output=True,
      )
      subprocess.run(
          ['tar', '-x', '-C', str(old)], input=archive.stdout, check=True
      )
      rows[f'randose_jax.cli.evaluate at {commit}'] = (
          evaluate,
          dict(os.environ, PYTHONPATH=str(old)),
      )
    # Which randose_jax each row's environment imports.
    which = 'import randose_jax; print(randose_jax.__file__)'
    packages = {
        name: (
            subprocess.run(
                [sys.executable, '-c', which],
                env=env,
                capture_output=True,
                text=True,
                cwd=tmp,
            ).stdout.strip()
        )
        for name, (_, env) in rows.items()
    }
    times = {name: [] for name in rows}
    scores = {}
    for _ in range(args.repeats):
      for name, (command, env) in rows.items():
        wall, cpu, scores[name] = run_timed(command, env, out)
        times[name].append((wall, cpu))
        print(f'  {name}: {wall:.1f} s, {cpu:.1f} s CPU')

  official = scores['official kit loop']
  worst = max(
      compare(official, s, name)
      for name, s in scores.items()
      if 'dose_score' in s
  )
  best = {name: min(t) for name, t in times.items()}
  machine['load_average_end'] = list(os.getloadavg())
  print(
      f'\n{args.num} patients, {official["num_dvh_metrics"]} DVH metrics; '
      f'dose score {official["dose_score"]:.4f}, DVH score '
      f'{official["dvh_score"]:.4f}; worst relative difference '
      f'{worst:.1e}'
  )
  print(
      f'{machine["cpu_model"]}, {machine["usable_cores"]} cores; '
      f'{machine["uptime"]}\n'
  )
  print(
      f'{"":34s}{"wall s":>8s}{"CPU s":>8s}{"ms/patient":>11s}'
      f'{"vs official":>12s}{"(CPU)":>7s}'
  )
  table = {}
  base_wall, base_cpu = best['official kit loop']
  for name, (wall, cpu) in best.items():
    table[name] = {
        'seconds': round(wall, 3),
        'cpu_seconds': round(cpu, 3),
        'median_seconds': round(
            statistics.median(t[0] for t in times[name]), 3
        ),
        'ms_per_patient': round(1e3 * wall / args.num, 1),
        'speedup_vs_official': round(base_wall / wall, 2),
        'cpu_speedup_vs_official': round(base_cpu / cpu, 2),
        'package': packages[name] or None,
    }
    if 'seconds_in_process' in scores[name]:
      table[name]['last_seconds_in_process'] = round(
          scores[name]['seconds_in_process'], 3
      )
    print(
        f'{name:34s}{wall:8.1f}{cpu:8.1f}{1e3 * wall / args.num:11.1f}'
        f'{base_wall / wall:11.1f}x{base_cpu / cpu:6.1f}x'
    )
  report = {
      'benchmark': 'evaluate_e2e',
      'command': (
          'python benchmarks/evaluate_e2e.py '
          + ' '.join(sys.argv[1:] if argv is None else argv)
      ),
      'data': str(args.data),
      'num_patients': args.num,
      'repeats': args.repeats,
      'noise_gy': args.noise,
      'dose_score': official['dose_score'],
      'dvh_score': official['dvh_score'],
      'num_dvh_metrics': official['num_dvh_metrics'],
      'worst_relative_difference': worst,
      'timings': table,
      'machine': machine,
  }
  args.json.parent.mkdir(parents=True, exist_ok=True)
  args.json.write_text(json.dumps(report, indent=1) + '\n')
  print(f'\nwrote {args.json}')


if __name__ == '__main__':
  main()
