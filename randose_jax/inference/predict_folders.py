"""Predicting doses for patient folders: check the outputs and the patients
first, then predict, write (CSV, NIfTI, DICOM RT Dose, plots) and score each
patient, staged so a failure leaves the outputs as they were. The command
is `randose-predict` (`randose_jax/cli/predict.py`).
"""

import errno
import os
import pathlib
import time


from randose_jax.scoring import dose_dvh as evaluation
from randose_jax import fileio
from randose_jax import interrupts
from randose_jax import progress as progress_lib
from randose_jax.inference import restore
from randose_jax.data import openkbp
from randose_jax.default_config import ConfigError

FORMATS = ("csv", "nifti", "dicom")
SUFFIXES = {"csv": ".csv", "nifti": ".nii.gz", "dicom": ".dcm"}


def zip_path_of(output_dir) -> pathlib.Path:
  """The submission zip beside the output folder: `<output>.zip`."""
  output_dir = pathlib.Path(output_dir)
  return output_dir.parent / f"{output_dir.name}.zip"


def check_outputs(
    patient_dirs,
    output_dir,
    *,
    formats=("csv",),
    plots_dir=None,
    overwrite=False,
) -> None:
  """Before any work: the output folders can be written, and (unless
  `overwrite`) hold none of the files this run would write.

  Raises:
    ConfigError: an unknown format.
    OSError: an unusable path; FileExistsError naming what is there.
  """
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown:
    raise ConfigError(f"--formats: unknown {unknown}; choose from {FORMATS}")
  output_dir = fileio.check_output_dir(output_dir)
  if plots_dir:
    fileio.check_output_dir(plots_dir)
  wanted = [
      output_dir / f"{d.name}{SUFFIXES[f]}"
      for d in patient_dirs
      for f in formats
  ]
  if "csv" in formats:
    fileio.check_output_file(zip_path_of(output_dir), overwrite=True)
    wanted.append(zip_path_of(output_dir))
  clash = [p.name for p in wanted if os.path.lexists(p)]
  if clash and not overwrite:
    raise FileExistsError(
        errno.EEXIST,
        f"already holds predictions {clash[:5]}"
        f"{'...' if len(clash) > 5 else ''}; pass --overwrite to replace "
        "them or choose another --output",
        str(output_dir),
    )


def check_patients(patient_dirs) -> None:
  """Reads every patient once (DataError naming the first bad file), so a
  bad patient stops the run before anything is predicted or written."""
  from randose_jax.dicom import geometry  # pylint: disable=g-import-not-at-top

  for d in patient_dirs:
    openkbp.load_sparse_patient(d)
    geometry.read_geometry(d)


def predict_patients(
    restored: restore.Restored,
    patient_dirs,
    output_dir,
    *,
    tta=False,
    formats=("csv",),
    plots_dir=None,
    overwrite=False,
    log=print,
    checked=False,
    dicom_grid="crop",
    progress: progress_lib.Mode = None,
) -> dict:
  """Predicts each patient, writes the requested files; returns a summary.

  The outputs and every patient are checked first (`check_outputs`,
  `check_patients`; `checked=True` when the caller did), and the files are
  staged and moved into place only at the end: on any error the output
  folder, the zip and the plots folder are as they were. `log` gets one
  line per patient (its maximum and mean dose); each patient is counted
  done on stderr (`progress.Counter`, label 'predict'; `progress`: None
  live on a terminal and one line per patient elsewhere, True live, False
  lines, 'off' nothing).
  """
  output_dir = pathlib.Path(output_dir)
  if not checked:
    check_outputs(
        patient_dirs,
        output_dir,
        formats=formats,
        plots_dir=plots_dir,
        overwrite=overwrite,
    )
    check_patients(patient_dirs)
  predictor = restored.predictor
  evaluator = evaluation.Evaluator()
  scored = 0
  t0 = time.time()
  summary = {
      "num_patients": len(patient_dirs),
      "checkpoint": restored.which,
      "checkpoint_step": restored.step,
      "tta": bool(tta),
      "ema": restored.uses_ema,
      "output": str(output_dir),
  }
  with (
      fileio.StagedOutput(kind="predict") as stage,
      progress_lib.Counter("predict", len(patient_dirs), progress) as counter,
  ):
    staged = stage.dir(output_dir)
    staged_plots = stage.dir(plots_dir) if plots_dir else None
    for d in patient_dirs:
      interrupts.check()  # a signal during the model work: stop here
      counter.doing(f"{d.name}: reading")
      patient = openkbp.load_patient(d)
      counter.doing(f"{d.name}: predicting{' (4-flip TTA)' if tta else ''}")
      (dose,) = predictor.predict_doses([patient], tta)
      counter.doing(f"{d.name}: writing")
      if "csv" in formats:
        openkbp.write_prediction_csv(staged / f"{patient.patient_id}.csv", dose)
      extra = [f for f in formats if f != "csv"]
      if extra:
        from randose_jax import formats as formats_lib  # pylint: disable=g-import-not-at-top
        from randose_jax.dicom import geometry  # pylint: disable=g-import-not-at-top

        info = geometry.read_geometry(d)
        if info is None:  # plain OpenKBP: the grid centred at the origin
          formats_lib.write_prediction_formats(
              staged,
              patient.patient_id,
              dose,
              patient.voxel_dimensions,
              formats=tuple(extra),
          )
        else:  # imported from DICOM: the patient's own frame
          out_dose, vd, kwargs = geometry.rtdose_arguments(
              info, dose, dicom_grid
          )
          formats_lib.write_prediction_formats(
              staged,
              patient.patient_id,
              out_dose,
              vd,
              formats=tuple(extra),
              **kwargs,
          )
      if staged_plots is not None:
        from randose_jax import viz  # pylint: disable=g-import-not-at-top

        viz.write_patient_plots(patient, dose, staged_plots)
      if patient.dose is not None:
        evaluator.add(patient, dose)
        scored += 1
      interrupts.check()  # a signal during this patient: not counted
      with counter.outside():
        log(
            f"{patient.patient_id}: max {dose.max():.2f} Gy, mean in mask "
            f"{dose[patient.possible_dose_mask].mean():.2f} Gy"
        )
      counter.done(patient.patient_id)
    interrupts.check()  # one during the last patient: nothing is moved
    if "csv" in formats:
      zip_path = zip_path_of(output_dir)
      openkbp.write_submission_zip(staged, stage.path(zip_path))
      summary["submission_zip"] = str(zip_path)
  summary["seconds_per_patient"] = (time.time() - t0) / len(patient_dirs)
  if scored == len(patient_dirs):
    result = evaluation.scores_from_sums(evaluator.partial_sums())
    summary.update(
        dose_score=result["dose_score"], dvh_score=result["dvh_score"]
    )
  return summary
