"""Scoring a cohort: prediction files against reference patient folders.

`score_patients` is the one loop over the patients: each patient scored
for the dose and DVH scores (`dose_dvh.Evaluator`), then handed to each
`Scorer` (clinical metrics, the report, plots, prediction files), and
counted on the progress line. `score_folders` feeds it a predictions
folder (`evaluate`, the notebook: each patient read once, the next ones
read ahead in threads); training's validation feeds it its model's
predictions of the cached patients. `write_json`, `write_per_roi` and `format_scores` give the
scores to files and people. The command is `randose-evaluate`
(`randose_jax/cli/evaluate.py`).
"""

import concurrent.futures
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

from absl import logging
import numpy as np

from randose_jax import fileio
from randose_jax import progress as progress_lib
from randose_jax.data import openkbp
from randose_jax.scoring import dose_dvh as evaluation

# Called with each reference patient and its prediction (Gy) once scored, e.g.
# to plot it while it is in memory.
PatientCallback = Callable[[openkbp.Patient, np.ndarray], None]


def _names(paths, limit: int = 10) -> str:
  names = [str(p) for p in paths]
  more = f' and {len(names) - limit} more' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more


def match_patients(reference_dir, predictions_dir) -> list[tuple[Path, Path]]:
  """Pairs each reference patient folder with its prediction file.

  Returns:
    [(reference patient folder, prediction CSV)] in patient id order.

  Raises:
    DataError: a missing or empty folder, a reference patient without
      dose.csv, a reference patient without a prediction, or a prediction
      without a reference patient (all problems of a kind in one message).
  """
  patient_dirs = openkbp.list_patient_dirs(reference_dir)
  no_dose = [
      d / openkbp.DOSE_FILE
      for d in patient_dirs
      if not (d / openkbp.DOSE_FILE).is_file()
  ]
  if no_dose:
    raise openkbp.DataError(
        f'{reference_dir}: {len(no_dose)} reference patient(s) have no dose '
        f'to score against: missing {_names(no_dose)}'
    )
  predictions_dir = Path(predictions_dir)
  if predictions_dir.is_file():
    hint = ''
    if predictions_dir.suffix.lower() == '.zip':
      folder = predictions_dir.with_suffix('')
      hint = (
          f' (the submission zip; give the folder of pt_*.csv it was made'
          f' from{f", {folder}" if folder.is_dir() else ""}, or unzip it)'
      )
    raise openkbp.DataError(
        f'{predictions_dir}: a file, not a predictions folder{hint}'
    )
  if not predictions_dir.is_dir():
    raise openkbp.DataError(f'{predictions_dir}: predictions folder not found')
  predictions = {
      p.stem: p for p in predictions_dir.glob('pt_*.csv') if p.is_file()
  }
  if not predictions:
    raise openkbp.DataError(
        f'{predictions_dir}: no prediction files (pt_*.csv) in it'
    )
  missing = [
      predictions_dir / f'{d.name}.csv'
      for d in patient_dirs
      if d.name not in predictions
  ]
  references = {d.name for d in patient_dirs}
  unmatched = [
      p for name, p in sorted(predictions.items()) if name not in references
  ]
  problems = []
  if missing:
    problems.append(
        f'{len(missing)} reference patient(s) of '
        f'{reference_dir} have no prediction: missing '
        f'{_names(missing)}'
    )
  if unmatched:
    problems.append(
        f'{len(unmatched)} prediction(s) have no reference '
        f'patient folder in {reference_dir}: {_names(unmatched)}'
    )
  if problems:
    raise openkbp.DataError('; '.join(problems))
  return [(d, predictions[d.name]) for d in patient_dirs]


# Patients read ahead of the one being scored, by this many threads (pyarrow
# parses without holding the GIL): the reading is most of the time.
READ_AHEAD = min(2, os.cpu_count() or 1)


def evaluate_folders(
    reference_dir,
    predictions_dir,
    *,
    on_patient: Optional[PatientCallback] = None,
    read_ahead: int = READ_AHEAD,
    progress: progress_lib.Mode = None,
) -> evaluation.EvaluationResult:
  """Scores every prediction of `predictions_dir` against `reference_dir`.

  Patients are scored one at a time, in id order, while up to `read_ahead`
  threads read the next ones (0: read each in turn); so at most
  1 + read_ahead patients are in memory. `on_patient(patient, prediction)`,
  if given, sees each patient (a dense `Patient`) after it is scored;
  without it, each reference is read as voxel lists and its ct.csv is not
  read (scoring needs neither a dense volume nor the CT). The first bad
  patient in id order is the error raised, as if read in turn.

  Each patient is counted done on stderr after `on_patient` returned
  (`progress.Counter`, label 'evaluate'; `progress`: None live on a
  terminal and one line per patient elsewhere, True live, False lines,
  'off' nothing). This is `score_folders` with `on_patient` as the one
  scorer.

  Raises:
    DataError: see `match_patients`, or a bad patient or prediction file.
  """

  scorers = [] if on_patient is None else [_Callback(on_patient)]
  return score_folders(
      reference_dir,
      predictions_dir,
      scorers,
      read_ahead=read_ahead,
      progress=progress,
  )


class Scorer(Protocol):
  """One job done for each patient of a cohort, then for the cohort (as
  MONAI's cumulative metrics): `add(patient, prediction)` once per patient,
  in id order, `result()` at the end. `name`: what the live progress line
  says while it works on a patient. The dose and DVH scores
  (`dose_dvh.Evaluator`), the clinical metrics
  (`clinical.ClinicalEvaluator`), the HTML report (`report.ReportScorer`)
  and the plots (`PatientPlots`) are scorers."""

  name: str

  def add(self, patient: openkbp.Patient, prediction: np.ndarray) -> Any:
    ...

  def result(self) -> Any:
    ...


class _Callback:
  """`on_patient` as a scorer."""

  name = 'callback'

  def __init__(self, on_patient: PatientCallback):
    self._on_patient = on_patient

  def add(self, patient, prediction) -> None:
    self._on_patient(patient, prediction)

  def result(self) -> None:
    return None


class PatientPlots:
  """The dose slices and DVHs of each patient, written into `folder`
  (`viz.write_patient_plots`)."""

  name = 'plots'

  def __init__(self, folder):
    self.folder = Path(folder)

  def add(self, patient, prediction) -> None:
    from randose_jax import viz  # pylint: disable=g-import-not-at-top

    viz.write_patient_plots(patient, prediction, self.folder)

  def result(self) -> Path:
    return self.folder


def score_folders(
    reference_dir,
    predictions_dir,
    scorers: Sequence[Scorer] = (),
    *,
    read_ahead: int = READ_AHEAD,
    progress: progress_lib.Mode = None,
) -> evaluation.EvaluationResult:
  """Scores every prediction of `predictions_dir` against `reference_dir`
  (`dose_dvh.Evaluator`, the dose and DVH scores) and hands each patient to
  `scorers` in turn: `score_patients` over the folders.

  Patients are read one at a time, in id order, while up to `read_ahead`
  threads read the next ones (0: read each in turn); so at most
  1 + read_ahead patients are in memory. With no other scorer each
  reference is read as voxel lists without its ct.csv (the scores need
  neither); otherwise as a dense `Patient`. A patient is counted done on
  stderr once every scorer has added it (`progress.Counter`, label
  'evaluate'). The first bad patient in id order is the error raised.

  Raises:
    DataError: see `match_patients`, or a bad patient or prediction file.
  """
  dense = bool(scorers)

  def read(pair):
    patient_dir, prediction_path = pair
    if dense:
      patient = openkbp.load_patient(patient_dir)
    else:
      patient = openkbp.load_sparse_patient(patient_dir, with_ct=False)
    return patient, openkbp.read_prediction_csv(
        prediction_path, patient.grid_shape
    )

  pairs = match_patients(reference_dir, predictions_dir)
  executor = (
      concurrent.futures.ThreadPoolExecutor(read_ahead)
      if read_ahead > 0
      else None
  )
  counter = progress_lib.Counter('evaluate', len(pairs), progress)

  def items():
    pending = []  # futures of the next patients, in order
    for i, (patient_dir, prediction_path) in enumerate(pairs):
      counter.doing(f'{patient_dir.name}: reading')
      if executor is None:
        patient, prediction = read(pairs[i])
      else:
        while len(pending) < read_ahead + 1 and (i + len(pending) < len(pairs)):
          pending.append(executor.submit(read, pairs[i + len(pending)]))
        patient, prediction = pending.pop(0).result()
      yield patient, prediction, prediction_path

  try:
    return score_patients(items(), scorers, counter=counter).result()
  finally:
    counter.close()
    if executor is not None:
      executor.shutdown(wait=True, cancel_futures=True)


def score_patients(
    items,
    scorers: Sequence[Scorer] = (),
    *,
    evaluator: Optional[evaluation.Evaluator] = None,
    counter: Optional[progress_lib.Counter] = None,
) -> evaluation.Evaluator:
  """The one loop over a cohort's patients, wherever they come from
  (prediction files against reference folders: `score_folders`; a model's
  predictions of the cached validation patients: training's validation).

  Each `(patient, prediction, source)` of `items` is scored for the dose
  and DVH scores (`evaluator`, a new `dose_dvh.Evaluator` by default), then
  handed to each scorer in turn, then counted done on `counter`. Returns
  the evaluator: its `result()`, or its `partial_sums()` to add over
  processes.

  Raises:
    DataError: a prediction that cannot be scored, naming its `source`.
  """
  evaluator = evaluation.Evaluator() if evaluator is None else evaluator
  for patient, prediction, source in items:
    if counter is not None:
      counter.doing(f'{patient.patient_id}: scoring')
    try:
      error = evaluator.add(patient, prediction)
    except ValueError as e:
      raise openkbp.DataError(f'{source}: {e}') from e
    logging.info('%s: dose error %.4f Gy', patient.patient_id, error)
    for scorer in scorers:
      if counter is not None:
        counter.doing(f'{patient.patient_id}: {scorer.name}')
      scorer.add(patient, prediction)
    if counter is not None:
      counter.done(patient.patient_id)
  return evaluator


class PredictionFiles:
  """Each prediction written as the official `<folder>/pt_*.csv`
  (overwriting: the folder is the run's own)."""

  name = 'writing'

  def __init__(self, folder):
    self.folder = Path(folder)

  def add(self, patient, prediction) -> None:
    openkbp.write_prediction_csv(
        self.folder / f'{patient.patient_id}.csv', prediction, overwrite=True
    )

  def result(self) -> Path:
    return self.folder


def write_json(result: evaluation.EvaluationResult, path, **extra) -> None:
  """The scores (dose first), counts and per-patient dose errors, atomically."""
  summary = dict(result.summary(), **extra)
  with fileio.atomic_output(path, overwrite=True) as f:
    f.write((json.dumps(summary, indent=2) + '\n').encode())


def write_per_roi(result: evaluation.EvaluationResult, path) -> None:
  """CSV: patient_id, roi, metric, reference, prediction, abs_error (Gy)."""
  with fileio.atomic_output(path, overwrite=True) as f:
    f.write(result.metric_table().to_csv(index=False).encode())


def format_scores(result: evaluation.EvaluationResult) -> str:
  return (
      f'dose score: {result.dose_score:.4f} Gy '
      f'(mean over {result.num_patients} patients)\n'
      f'DVH score: {result.dvh_score:.4f} Gy '
      f'(mean over {result.num_dvh_metrics} DVH metrics)'
  )
