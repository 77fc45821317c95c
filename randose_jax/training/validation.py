"""Validation: the model and the mean-dose baseline, scored the same way.

In the style of big_vision's evaluators: each evaluator is built once from
the run's pieces and its `run(...)` returns the scores
(`dose_score`, `dvh_score`, `num_patients`); the training loop only
schedules them. The baseline (the mean training dose everywhere inside the
possible-dose mask) is one more evaluator.

Each validation patient's cache file is read once: its voxel lists are
encoded for the model and scored as they are (`SparsePatient`), never made
dense. Patients are shared out over the processes and taken one round of
local devices at a time (a 128^3 example is ~92 MB, so the whole split is
never held in memory); the partial sums are added over the processes.
"""

import json
import os
import pathlib
import shutil
from typing import Callable, Optional

import jax
import numpy as np

from randose_jax import distributed
from randose_jax.scoring import cohort
from randose_jax.scoring import dose_dvh as evaluation
from randose_jax import fileio
from randose_jax.data import openkbp


def _score(
    eval_cache,
    doses_of: Callable[[list], list],
    *,
    max_patients: int = 0,
    write_dir: Optional[pathlib.Path] = None,
) -> dict:
  """Scores `doses_of(patients)` (Gy, each patient's grid) over the cache's
  first `max_patients` patients (0: all); with `write_dir`, writes each
  dose as the official `pt_*.csv`."""
  n = len(eval_cache)
  if max_patients:
    n = min(n, max_patients)
  indices = distributed.local_indices(n)
  real = [i for i in indices if i is not None]
  padded = [i if i is not None else (real[-1] if real else 0) for i in indices]
  step = jax.local_device_count()

  def items():
    for start in range(0, len(indices), step):
      chunk = indices[start : start + step]
      patients = [eval_cache.sparse(i) for i in padded[start : start + step]]
      for i, patient, dose in zip(chunk, patients, doses_of(patients)):
        if i is not None:  # not a process's padding
          yield patient, dose, patient.patient_id

  scorers = [] if write_dir is None else [cohort.PredictionFiles(write_dir)]
  evaluator = cohort.score_patients(items(), scorers)
  sums = distributed.allreduce_sums(
      np.asarray(evaluator.partial_sums(), np.float64)
  )
  return evaluation.scores_from_sums(sums)


class ModelEvaluator:
  """Scores a `Predictor` on the cached validation patients."""

  def __init__(
      self,
      eval_cache,
      *,
      tta: bool = False,
      max_patients: int = 0,
      write_dir: Optional[pathlib.Path] = None,
  ):
    self.eval_cache = eval_cache
    self.tta = tta
    self.max_patients = max_patients
    self.write_dir = write_dir

  def run(self, predictor) -> dict:
    return _score(
        self.eval_cache,
        lambda patients: predictor.predict_doses(patients, self.tta),
        max_patients=self.max_patients,
        write_dir=self.write_dir,
    )


class BaselineEvaluator:
  """Scores the constant `dose_gy` inside each possible-dose mask."""

  def __init__(self, eval_cache, dose_gy: float, *, max_patients: int = 0):
    self.eval_cache = eval_cache
    self.dose_gy = dose_gy
    self.max_patients = max_patients

  @classmethod
  def mean_training_dose(
      cls, eval_cache, train_cache, **kwargs
  ) -> "BaselineEvaluator":
    return cls(eval_cache, mean_training_dose(train_cache), **kwargs)

  def run(self) -> dict:
    def doses_of(patients):
      doses = []
      for patient in patients:
        dose = np.zeros(patient.num_voxels)
        dose[patient.mask_index] = self.dose_gy
        doses.append(dose.reshape(patient.grid_shape))
      return doses

    return _score(self.eval_cache, doses_of, max_patients=self.max_patients)


def evaluate(
    predictor,
    eval_cache,
    *,
    tta: bool = False,
    max_patients: int = 0,
    write_dir: Optional[pathlib.Path] = None,
) -> dict:
  """`ModelEvaluator(...).run(predictor)` in one call."""
  return ModelEvaluator(
      eval_cache, tta=tta, max_patients=max_patients, write_dir=write_dir
  ).run(predictor)


def mean_training_dose(train_cache) -> float:
  """Mean dose (Gy) over the possible-dose voxels of all training patients."""
  total, count = 0.0, 0
  for i in range(len(train_cache)):
    patient = train_cache.sparse(i)
    on_mask = np.isin(patient.dose_index, patient.mask_index)
    total += float(patient.dose_value[on_mask].sum())
    count += patient.mask_index.size
  return total / max(count, 1)


def final_validation(
    predictor,
    checkpoint_step: int,
    uses_ema: bool,
    train_cache,
    eval_cache,
    workdir: pathlib.Path,
    config,
) -> dict:
  """Scores `predictor` (the best checkpoint's; `uses_ema`: its parameters
  are the EMA) on every validation patient, writes its predictions
  (`predictions/<split>/pt_*.csv` and the zip) and `validation_scores.json`,
  beside the mean-dose baseline's scores."""
  out_dir = workdir / "predictions" / config.data.eval_split
  zip_path = out_dir.with_suffix(".zip")
  scores_path = workdir / "validation_scores.json"
  # Everything is written into one staging folder first (the run lock
  # keeps it to this run) and moved into place when complete: the CSVs,
  # the zip and the scores change together, or not at all.
  stage = workdir / "predictions" / f"{fileio.STAGING_PREFIX}final"
  staged = stage / out_dir.name
  first = jax.process_index() == 0
  new_parent = not stage.parent.exists()
  if first:
    shutil.rmtree(stage, ignore_errors=True)
    staged.mkdir(parents=True)
  distributed.barrier("final_stage_made")
  try:
    scores = evaluate(
        predictor, eval_cache, tta=config.eval_tta, write_dir=staged
    )
    distributed.barrier("predictions_written")
    if first:
      openkbp.write_submission_zip(staged, stage / zip_path.name)
    baseline = BaselineEvaluator.mean_training_dose(
        eval_cache, train_cache
    ).run()
    ema = bool(uses_ema)
    summary = {
        "checkpoint_step": checkpoint_step,
        "dose_score": scores["dose_score"],
        "dvh_score": scores["dvh_score"],
        "num_patients": scores.get("num_patients"),
        "tta": bool(config.eval_tta),
        "ema": ema,
        "baseline_mean_dose_score": baseline["dose_score"],
        "baseline_mean_dvh_score": baseline["dvh_score"],
        "predictions": str(out_dir),
        "submission_zip": str(zip_path),
    }
    if first:
      with fileio.atomic_output(stage / scores_path.name) as f:
        f.write(json.dumps(summary, indent=2).encode())
      out_dir.mkdir(parents=True, exist_ok=True)
      for path in sorted(staged.iterdir()):
        os.replace(path, out_dir / path.name)
      os.replace(stage / zip_path.name, zip_path)
      os.replace(stage / scores_path.name, scores_path)
  except OSError as e:
    _name_final(e, stage, workdir)
    raise
  finally:
    if first:
      shutil.rmtree(stage, ignore_errors=True)
      if new_parent and stage.parent.is_dir() and not os.listdir(stage.parent):
        stage.parent.rmdir()
  if first:
    print(
        f"Validation ({summary['num_patients']} patients, checkpoint step "
        f"{checkpoint_step}{', EMA parameters' if ema else ''}): "
        f"dose score {summary['dose_score']:.4f}, "
        f"DVH score {summary['dvh_score']:.4f}\n"
        f"Baseline (mean training dose inside the mask): dose score "
        f"{summary['baseline_mean_dose_score']:.4f}, DVH score "
        f"{summary['baseline_mean_dvh_score']:.4f}\n"
        f"Predictions: {out_dir} (zip: {zip_path})",
        flush=True,
    )
    note = baseline_note(summary, config)
    if note:
      print(note, flush=True)
  return summary


def _name_final(e: OSError, stage: pathlib.Path, workdir: pathlib.Path):
  """Raises `e` again naming the final path of a staged file (the user's
  path, not the staging one)."""
  if e.filename is None or e.errno is None:
    return
  path = pathlib.Path(e.filename)
  if stage not in path.parents:
    return
  rel = path.relative_to(stage)
  final = workdir / (
      rel.name
      if rel.name.endswith(".json")
      else pathlib.Path("predictions", rel)
  )
  raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(final)) from e


def baseline_note(summary: dict, config) -> Optional[str]:
  """The note printed under the final scores when the model does not beat
  the mean-dose baseline on the dose score, the DVH score or both; None
  when it beats it on both."""
  worse = [
      name
      for name, key in (
          ("dose score", "dose_score"),
          ("DVH score", "dvh_score"),
      )
      if summary[key] >= summary[f"baseline_mean_{key}"]
  ]
  return short_run_note(config, worse) if worse else None


def short_run_note(config, worse=("dose score",)) -> str:
  """Said when the model did not beat the mean-dose baseline on the
  scores named in `worse` ("dose score", "DVH score")."""
  steps = config.num_train_steps
  on = " and the ".join(worse)
  if steps < 1000:
    return (
        f"note: the model does not beat the mean-dose baseline on the {on}: "
        f"{steps} training steps are far too few to learn a dose (the demo "
        "trains 1,200 steps to beat it; the paper 80,000). This is "
        "expected of a short test run; train longer for meaningful "
        "scores."
    )
  return (
      f"note: the model does not beat the mean-dose baseline on the {on} "
      f"after {steps} steps: check the learning rate, the data and "
      "metrics.jsonl (train/l1_all should fall)."
  )
