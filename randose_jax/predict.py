"""Predict dose for patient folders with a trained workdir.

  python -m randose_jax.predict --workdir=runs/randose --patients=test-pats \
      --output=predictions [--checkpoint=best|latest|STEP] [--tta] \
      [--formats=csv,nifti,dicom] [--plots=DIR] [--conv_impl=direct]

Writes `pt_*.csv` (the OpenKBP submission format, Gy, masked, clipped at 0)
and `<output>.zip` for the leaderboard; NIfTI / DICOM RT Dose files beside
them when asked. Patient folders need no dose.csv; when every patient has
one, the dose score and DVH score are printed too.
"""

import json
import pathlib
import sys
import time

from absl import app
from absl import flags
import jax
import numpy as np

from randose_jax import checkpointing
from randose_jax import evaluation
from randose_jax import logs
from randose_jax import restore
from randose_jax import train
from randose_jax.data import encoding
from randose_jax.data import openkbp

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string("workdir", None, "Training workdir holding checkpoints/.")
  flags.DEFINE_string("checkpoint", "best", "best, latest or a step number.")
  flags.DEFINE_string("patients", None, "Folder of pt_* patient folders.")
  flags.DEFINE_string("output", None, "Folder for the predictions (created).")
  flags.DEFINE_bool("tta", False, "Average the 4 left/right x "
                    "superior/inferior flips (test-time augmentation).")
  flags.DEFINE_list("formats", ["csv"], "Any of csv, nifti, dicom.")
  flags.DEFINE_string("plots", None, "Folder for dose-slice and DVH plots.")
  flags.DEFINE_bool("overwrite", False,
                    "Replace predictions already in --output.")
  flags.DEFINE_enum("conv_impl", None, ["auto", "direct", "fft"],
                    "Override the run's model.conv_impl (same parameters, "
                    "same function): 'direct' needs about a quarter of the "
                    "memory of the CPU's FFT plan, and is slower there.")


FORMATS = ("csv", "nifti", "dicom")


def predict_patients(restored: restore.Restored, patient_dirs, output_dir, *,
                     tta=False, formats=("csv",), plots_dir=None,
                     overwrite=False, log=print) -> dict:
  """Predicts each patient, writes the requested files; returns a summary."""
  unknown = sorted(set(formats) - set(FORMATS))
  if unknown:
    raise ValueError(f"--formats: unknown {unknown}; choose from {FORMATS}")
  output_dir = pathlib.Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  if not overwrite:
    clash = [d.name for d in patient_dirs
             if (output_dir / f"{d.name}.csv").exists()]
    if clash:
      raise FileExistsError(
          f"{output_dir}: already holds predictions for {clash[:5]}"
          f"{'...' if len(clash) > 5 else ''}; pass --overwrite to replace "
          "them or choose another --output.")
  config, trainer = restored.config, restored.trainer
  evaluator = evaluation.Evaluator()
  scored = 0
  t0 = time.time()
  for d in patient_dirs:
    patient = openkbp.load_patient(d)
    example = encoding.encode_patient(patient, config.data)
    (pred,) = trainer.predict_local(restored.params["model"], [example], tta)
    dose = encoding.decode_dose(pred, patient.possible_dose_mask, config.data)
    if "csv" in formats:
      openkbp.write_prediction_csv(output_dir / f"{patient.patient_id}.csv",
                                   dose, overwrite=True)
    extra = [f for f in formats if f != "csv"]
    if extra:
      from randose_jax import formats as formats_lib  # pylint: disable=g-import-not-at-top
      formats_lib.write_prediction_formats(
          output_dir, patient.patient_id, dose, patient.voxel_dimensions,
          formats=tuple(extra), overwrite=True)
    if plots_dir:
      from randose_jax import viz  # pylint: disable=g-import-not-at-top
      viz.write_patient_plots(patient, dose, plots_dir)
    if patient.dose is not None:
      evaluator.add(patient, dose)
      scored += 1
    log(f"{patient.patient_id}: max {dose.max():.2f} Gy, mean in mask "
        f"{dose[patient.possible_dose_mask].mean():.2f} Gy")
  summary = {"num_patients": len(patient_dirs), "checkpoint": restored.which,
             "checkpoint_step": restored.step, "tta": bool(tta),
             "seconds_per_patient": (time.time() - t0) / len(patient_dirs),
             "output": str(output_dir)}
  if "csv" in formats:
    zip_path = output_dir.parent / f"{output_dir.name}.zip"
    openkbp.write_submission_zip(output_dir, zip_path, overwrite=True)
    summary["submission_zip"] = str(zip_path)
  if scored == len(patient_dirs):
    result = evaluation.scores_from_sums(evaluator.partial_sums())
    summary.update(dose_score=result["dose_score"],
                   dvh_score=result["dvh_score"])
  return summary


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  logs.quiet_library_logs()
  for name in ("workdir", "patients", "output"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  try:
    restored = restore.restore_from_workdir(
        FLAGS.workdir, FLAGS.checkpoint, mesh=train.make_mesh(jax.local_devices()),
        conv_impl=FLAGS.conv_impl)
    dirs = openkbp.list_patient_dirs(FLAGS.patients)
    out = pathlib.Path(FLAGS.output).resolve()
    if out == pathlib.Path(FLAGS.patients).resolve():
      raise ValueError("--output must differ from --patients")
    print(f"Predicting {len(dirs)} patients with the {restored.which} "
          f"checkpoint (step {restored.step}) of {FLAGS.workdir}"
          f"{' with 4-flip TTA' if FLAGS.tta else ''}", flush=True)
    summary = predict_patients(
        restored, dirs, out, tta=FLAGS.tta, formats=tuple(FLAGS.formats),
        plots_dir=FLAGS.plots, overwrite=FLAGS.overwrite)
  except (openkbp.DataError, checkpointing.CheckpointError, FileExistsError,
          ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if "dose_score" in summary:
    print(f"dose score: {summary['dose_score']:.4f}")
    print(f"DVH score: {summary['dvh_score']:.4f}")
  print(json.dumps(summary))


if __name__ == "__main__":
  define_flags()
  app.run(main)
