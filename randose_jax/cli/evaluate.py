r"""Scores a folder of predicted doses with the official OpenKBP metrics.

  python -m randose_jax.cli.evaluate \
      --reference=provided-data/validation-pats --predictions=predictions/ \
      [--json=scores.json] [--per_roi=per_roi.csv] [--plots=DIR] \
      [--clinical=DIR] [--report=report.html] [--clinical_v_gy=20,30,40,50]
      [--gamma=false] [--gamma_subsample=1.0] [--gamma_impl=jax] \
      [--progress=false]

--reference holds the patients (`pt_*/` folders with dose.csv); --predictions
holds one `pt_*.csv` per patient, the submission format. Prints the dose score,
then the DVH score (docs/design.md section 6; always in that order). --json writes
both scores, the counts and each patient's dose error; --per_roi (alias
--per-roi) writes one row per (patient, ROI, metric). Both are replaced if
they exist, atomically. --plots writes `<id>_slices.png` (prediction,
reference, difference) and `<id>_dvh.png` per patient into DIR. --clinical
writes `clinical_metrics.csv` (per patient, ROI and metric: the reference,
the prediction and their difference) and `clinical_summary.csv` (per ROI and
metric over the patients) into DIR: the clinical metrics of
`randose_jax/scoring/clinical.py` (target D_x, HI, conformity; OAR Dmean, D_cc,
V_d at the --clinical_v_gy doses) and, unless --gamma=false, the global
gamma pass rates at 3%/3mm and 2%/2mm (--gamma_impl=jax, the default:
`randose_jax/scoring/gamma.py`, under a second per 128^3 patient on 2 CPU cores;
--gamma_impl=pymedphys: pymedphys itself, the independent reference, 20-70 s
per patient; see --gamma_subsample). --report writes one
self-contained HTML file (`randose_jax/scoring/report.py`): the scores, the cohort
summary of those clinical metrics, and per patient its metrics (differences
outside the --report_tolerance_* and --report_gamma_min tolerances
highlighted), the DVH overlay, the dose and difference slices and a gamma map
on the same planes; it is replaced if it exists. Patients are scored one at
a time, in id order, while two threads read the next ones.

Progress goes to stderr, each patient counted once all of the above is done
for it (`randose_jax/progress.py`): a live line on a terminal (patients
done / total, time left, what the patient at work is at), one line per
patient elsewhere or with --progress=false:

  evaluate: 3/6 pt_203 done, 41.2 s/patient, about 2 min left

The output paths are checked before any scoring, and the outputs are written
only when every patient has been scored (plots are staged until then): a
failed run leaves them as they were. A bad reference or prediction file, or
an unusable output path, is one `error:` line naming the file (exit 2).
"""

import contextlib
from pathlib import Path

from absl import app
from absl import flags
import numpy as np

from randose_jax import fileio
from randose_jax.cli import common as cli
from randose_jax.scoring import clinical
from randose_jax.scoring import cohort
from randose_jax.scoring import report

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """Command-line flags; defined only when run as a program, so library
  modules can be imported together without clashing flag names."""
  flags.DEFINE_string(
      'reference',
      None,
      'Folder of pt_*/ patient folders, each with dose.csv.',
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      'predictions',
      None,
      'Folder of pt_*.csv predictions (Gy).',
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      'json', None, 'Write the scores here (JSON).', flag_values=flag_values
  )
  flags.DEFINE_string(
      'per_roi',
      None,
      'Write the per-patient, per-ROI DVH metrics here (CSV).',
      flag_values=flag_values,
  )
  flags.DEFINE_alias('per-roi', 'per_roi', flag_values=flag_values)
  flags.DEFINE_string(
      'plots',
      None,
      'Write <id>_slices.png and <id>_dvh.png '
      'for each patient into this folder.',
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      'clinical',
      None,
      f'Write {clinical.METRICS_FILE} and '
      f'{clinical.SUMMARY_FILE} (clinical metrics and gamma '
      'pass rates) into this folder (replaced if present).',
      flag_values=flag_values,
  )
  flags.DEFINE_list(
      'clinical_v_gy',
      [f'{d:g}' for d in clinical.DEFAULT_V_DOSES_GY],
      "With --clinical: the doses d (Gy) of the OARs' V_d, the "
      'percent of the ROI volume receiving >= d Gy.',
      flag_values=flag_values,
  )
  flags.DEFINE_boolean(
      'gamma',
      True,
      'With --clinical: the gamma pass rates (3%/3mm, 2%/2mm).',
      flag_values=flag_values,
  )
  flags.DEFINE_enum(
      'gamma_impl',
      'jax',
      list(clinical.GAMMA_IMPLS),
      'With --clinical or --report: who computes the gamma index: jax '
      '(randose_jax/scoring/gamma.py, fast) or pymedphys (the reference '
      'implementation, slow; needs the [clinical] extra). The same values '
      'up to float32 rounding.',
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      'report',
      None,
      'Write one self-contained HTML report here (replaced if '
      'present): the scores, the cohort summary of the clinical '
      'metrics, and per patient its metrics (out of tolerance '
      'highlighted), DVH, dose slices and gamma map.',
      flag_values=flag_values,
  )
  flags.DEFINE_float(
      'report_tolerance_gy',
      report.Tolerances.dose_gy,
      'With --report: highlight a dose metric (Gy) whose '
      '|difference| is above this.',
      flag_values=flag_values,
  )
  flags.DEFINE_float(
      'report_tolerance_volume',
      report.Tolerances.volume_percent,
      'With --report: highlight a V_d whose |difference| is above '
      'this many percentage points.',
      flag_values=flag_values,
  )
  flags.DEFINE_float(
      'report_tolerance_ratio',
      report.Tolerances.ratio,
      'With --report: highlight an HI or CI whose |difference| is '
      'above this.',
      flag_values=flag_values,
  )
  flags.DEFINE_list(
      'report_gamma_min',
      [f'{c}={v:g}' for c, v in report.GAMMA_LIMITS],
      'With --report: highlight a gamma pass rate below ' 'CRITERION=PERCENT.',
      flag_values=flag_values,
  )
  flags.DEFINE_float(
      'gamma_subsample',
      1.0,
      'With --clinical: the fraction in (0, 1] of the gamma '
      'points evaluated (a fixed-seed random draw; faster, '
      'the pass rate becomes an estimate).',
      flag_values=flag_values,
  )
  cli.define_progress_flag(flag_values)


def clinical_settings_from_flags() -> clinical.ClinicalSettings:
  """--clinical_v_gy, --gamma, --gamma_subsample, --gamma_impl as settings;
  a bad value, or --gamma_impl=pymedphys without pymedphys, is a usage error
  naming the flag."""
  doses = []
  for text in FLAGS.clinical_v_gy:
    try:
      dose = float(text)
    except ValueError:
      dose = float('nan')
    if not np.isfinite(dose) or dose < 0:
      raise app.UsageError(
          f'--clinical_v_gy={",".join(FLAGS.clinical_v_gy)}'
          f': {text!r} is not a dose >= 0 Gy'
      )
    doses.append(dose)
  if not 0 < FLAGS.gamma_subsample <= 1:
    raise app.UsageError(
        f'--gamma_subsample={FLAGS.gamma_subsample}: must be in (0, 1]'
    )
  if FLAGS.gamma and not clinical.gamma_available(FLAGS.gamma_impl):
    raise app.UsageError(
        '--gamma_impl=pymedphys: needs pymedphys (pip install '
        '"randose_jax[clinical]"); pass --gamma_impl=jax, or --gamma=false '
        'to skip gamma'
    )
  return clinical.ClinicalSettings(
      v_doses_gy=tuple(doses),
      gamma=FLAGS.gamma,
      gamma_subsample=FLAGS.gamma_subsample,
      gamma_impl=FLAGS.gamma_impl,
  )


def tolerances_from_flags() -> report.Tolerances:
  """--report_tolerance_* and --report_gamma_min as tolerances; a bad value
  is a usage error naming the flag."""
  for name in ('gy', 'volume', 'ratio'):
    value = FLAGS[f'report_tolerance_{name}'].value
    if not np.isfinite(value) or value < 0:
      raise app.UsageError(f'--report_tolerance_{name}={value}: must be >= 0')
  try:
    gamma_limits = report.parse_gamma_limits(FLAGS.report_gamma_min)
  except ValueError as e:
    raise app.UsageError(f'--report_gamma_min: {e}') from e
  return report.Tolerances(
      dose_gy=FLAGS.report_tolerance_gy,
      volume_percent=FLAGS.report_tolerance_volume,
      ratio=FLAGS.report_tolerance_ratio,
      gamma_min_percent=gamma_limits,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  for name in ('reference', 'predictions'):
    if not FLAGS[name].value:
      raise app.UsageError(f'--{name} is required')
  # --json, --per_roi and --report are replaced if they exist (documented).
  for name in ('json', 'per_roi', 'report'):
    if FLAGS[name].value:
      fileio.check_output_file(FLAGS[name].value, overwrite=True)
  if FLAGS.plots:
    fileio.check_output_dir(FLAGS.plots)
  clinical_settings = None
  if FLAGS.clinical or FLAGS.report:
    clinical_settings = clinical_settings_from_flags()
  if FLAGS.clinical:
    fileio.check_output_dir(FLAGS.clinical)
    for name in (clinical.METRICS_FILE, clinical.SUMMARY_FILE):
      fileio.check_output_file(Path(FLAGS.clinical) / name, overwrite=True)
  builder = None
  if FLAGS.report:
    builder = report.ReportBuilder(clinical_settings, tolerances_from_flags())
  with (
      contextlib.ExitStack() as stack,
      fileio.StagedOutput(kind='evaluate') as stage,
  ):
    if builder is not None:
      stack.enter_context(builder)
    scorers = []  # each patient goes through them in turn
    if FLAGS.plots:
      scorers.append(cohort.PatientPlots(stage.dir(FLAGS.plots)))
    clinical_evaluator = None
    if FLAGS.clinical:
      clinical_evaluator = clinical.ClinicalEvaluator(clinical_settings)
    if builder is not None:
      # With --clinical too, the report reuses the patient's metrics table.
      scorers.append(report.ReportScorer(builder, clinical_evaluator))
    elif clinical_evaluator is not None:
      scorers.append(clinical_evaluator)
    result = cohort.score_folders(
        FLAGS.reference,
        FLAGS.predictions,
        scorers,
        progress=FLAGS.progress,
    )
    if FLAGS.json:
      cohort.write_json(
          result,
          stage.path(FLAGS.json),
          reference=str(Path(FLAGS.reference).resolve()),
          predictions=str(Path(FLAGS.predictions).resolve()),
      )
    if FLAGS.per_roi:
      cohort.write_per_roi(result, stage.path(FLAGS.per_roi))
    if builder is not None:
      builder.write(
          stage.path(FLAGS.report),
          scores=result,
          sources={
              'reference': Path(FLAGS.reference).resolve(),
              'predictions': Path(FLAGS.predictions).resolve(),
          },
      )
    if FLAGS.clinical:
      folder = Path(FLAGS.clinical)
      clinical_evaluator.write(
          folder,
          paths=[
              stage.path(folder / name)
              for name in (clinical.METRICS_FILE, clinical.SUMMARY_FILE)
          ],
      )
  print(cohort.format_scores(result))
  if FLAGS.report:
    print(f'report: {FLAGS.report}')
  if FLAGS.clinical:
    print(
        f'clinical metrics: {Path(FLAGS.clinical) / clinical.METRICS_FILE}, '
        f'{Path(FLAGS.clinical) / clinical.SUMMARY_FILE}'
    )


def run() -> None:
  """The console command (pyproject [project.scripts])."""
  define_flags()
  cli.run(main)


if __name__ == '__main__':
  run()
