r"""Predict dose for patient folders with a trained workdir or a shipped model.

  python -m randose_jax.predict --workdir=runs/randose --patients=test-pats \
      --output=predictions [--checkpoint=best|latest|STEP] [--tta] \
      [--formats=csv,nifti,dicom] [--dicom_grid=crop|ct] [--plots=DIR] \
      [--conv_impl=direct] [--progress=false]
  python -m randose_jax.predict --patients=test-pats --output=predictions \
      [--model=NAME]      # a model shipped in the package (randose_jax/inference/shipped.py)

Writes `pt_*.csv` (the OpenKBP submission format, Gy, masked, clipped at 0)
and `<output>.zip` for the leaderboard; NIfTI / DICOM RT Dose files beside
them when asked. Patient folders need no dose.csv; when every patient has
one, the dose score and DVH score are printed too. A patient imported from
DICOM (`randose_jax.cli.dicom_import`: its folder holds dicom_geometry.json) gets
its NIfTI and RT Dose in its own frame: the CT's FrameOfReferenceUID and
StudyInstanceUID, its PatientID and PatientName, references to its RTSTRUCT
(and RTPLAN), positions in patient coordinates; --dicom_grid=ct resamples
the dose onto the CT's own voxels. Other patients keep the grid centred at
the origin (randose_jax/formats.py). A run trained with
`config.ema_decay > 0` predicts with the moving average of its parameters.

Nothing is written until every patient has been read and checked and every
prediction made: the files are staged beside --output and moved into place
at the end, so a failed run (a bad patient, a full disk) leaves --output,
the zip and --plots as they were. A problem is one `error:` line (exit 2).

Each patient's line (maximum and mean dose) is printed on stdout; the
progress goes to stderr (`randose_jax/progress.py`): a live line on a
terminal (patients done / total, time left), one line per patient elsewhere
or with --progress=false:

  predict: 3/6 pt_203 done, 41.6 s/patient, about 2 min left
"""

import errno
import json
import os
import pathlib
import time

from absl import app
from absl import flags
import jax

from randose_jax.cli import common as cli
from randose_jax import distributed
from randose_jax.scoring import dose_dvh as evaluation
from randose_jax import fileio
from randose_jax import interrupts
from randose_jax import logs
from randose_jax import progress as progress_lib
from randose_jax.inference import restore
from randose_jax.inference import shipped
from randose_jax.data import openkbp
from randose_jax.default_config import ConfigError

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string(
      "workdir",
      None,
      "Training workdir holding checkpoints/. Without it, a model shipped "
      "in the package predicts (--model).",
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      "model",
      None,
      "A shipped model's name (randose_jax/inference/shipped_models/; the default one "
      "when there is one). Not with --workdir.",
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      "checkpoint",
      "best",
      "best, latest or a step number.",
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      "patients",
      None,
      "Folder of pt_* patient folders.",
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      "output",
      None,
      "Folder for the predictions (created).",
      flag_values=flag_values,
  )
  flags.DEFINE_bool(
      "tta",
      False,
      "Average the 4 left/right x "
      "superior/inferior flips (test-time augmentation).",
      flag_values=flag_values,
  )
  flags.DEFINE_list(
      "formats", ["csv"], "Any of csv, nifti, dicom.", flag_values=flag_values
  )
  flags.DEFINE_enum(
      "dicom_grid",
      "crop",
      ["crop", "ct"],
      "For patients "
      "imported from DICOM: write the NIfTI / RT Dose on the "
      "import grid (crop) or resampled onto the CT's own voxels "
      "(ct).",
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      "plots",
      None,
      "Folder for dose-slice and DVH plots.",
      flag_values=flag_values,
  )
  flags.DEFINE_bool(
      "overwrite",
      False,
      "Replace predictions already in --output.",
      flag_values=flag_values,
  )
  flags.DEFINE_enum(
      "conv_impl",
      None,
      ["auto", "direct", "fft"],
      "Override the run's model.conv_impl (same parameters, "
      "same function): 'direct' needs about a quarter of the "
      "memory of the CPU's FFT plan, and is slower there.",
      flag_values=flag_values,
  )
  flags.DEFINE_bool(
      "progress",
      None,
      "Show the progress on stderr as a live line (patients done / total, "
      "time left; default: where stderr is a terminal); false: one plain "
      "line per patient.",
      flag_values=flag_values,
  )


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
  config, predictor = restored.config, restored.predictor
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


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_library_logs()
  for name in ("patients", "output"):
    if not getattr(FLAGS, name):
      raise app.UsageError(f"--{name} is required")
  if FLAGS.workdir and FLAGS.model:
    raise app.UsageError("--workdir and --model: give one of them")
  if FLAGS.workdir:
    restore.parse_checkpoint_flag(FLAGS.checkpoint)
    restore.check_workdir(FLAGS.workdir)
  else:
    shipped.folder(FLAGS.model)  # a wrong name fails before any work
  out = pathlib.Path(FLAGS.output).expanduser().resolve()
  if out == pathlib.Path(FLAGS.patients).expanduser().resolve():
    raise ConfigError("--output must differ from --patients")
  formats = tuple(FLAGS.formats)
  # Cheap checks first: the outputs, then every patient, then the model.
  dirs = openkbp.list_patient_dirs(FLAGS.patients)
  check_outputs(
      dirs,
      out,
      formats=formats,
      plots_dir=FLAGS.plots,
      overwrite=FLAGS.overwrite,
  )
  check_patients(dirs)
  # From here (JAX at work) a signal is acted on between patients.
  interrupts.defer()
  mesh = distributed.make_mesh(jax.local_devices())
  if FLAGS.workdir:
    restored = restore.restore_from_workdir(
        FLAGS.workdir, FLAGS.checkpoint, mesh=mesh, conv_impl=FLAGS.conv_impl
    )
    source = (
        f"the {restored.which} checkpoint (step {restored.step}) of "
        f"{FLAGS.workdir}"
    )
  else:
    restored = shipped.load(FLAGS.model, mesh=mesh, conv_impl=FLAGS.conv_impl)
    source = (
        f"the shipped model {restored.which.split(':', 1)[1]} (trained "
        f"{restored.step} steps; research use only, see its MODEL_CARD.md)"
    )
  print(
      f"Predicting {len(dirs)} patients with {source}"
      f"{' (its EMA parameters)' if restored.uses_ema else ''}"
      f"{' with 4-flip TTA' if FLAGS.tta else ''}",
      flush=True,
  )
  summary = predict_patients(
      restored,
      dirs,
      out,
      tta=FLAGS.tta,
      formats=formats,
      plots_dir=FLAGS.plots,
      overwrite=FLAGS.overwrite,
      checked=True,
      dicom_grid=FLAGS.dicom_grid,
      progress=FLAGS.progress,
  )
  if "dose_score" in summary:
    print(f"dose score: {summary['dose_score']:.4f}")
    print(f"DVH score: {summary['dvh_score']:.4f}")
  print(json.dumps(summary))


def run() -> None:
  """The console command (pyproject [project.scripts])."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
