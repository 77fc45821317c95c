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

import json
import pathlib

from absl import app
from absl import flags
import jax

from randose_jax.cli import common as cli
from randose_jax import distributed
from randose_jax import interrupts
from randose_jax import logs
from randose_jax.inference import restore
from randose_jax.inference import shipped
from randose_jax.data import openkbp
from randose_jax.default_config import ConfigError
from randose_jax.inference import predict_folders

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
  cli.define_progress_flag(flag_values)


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
  predict_folders.check_outputs(
      dirs,
      out,
      formats=formats,
      plots_dir=FLAGS.plots,
      overwrite=FLAGS.overwrite,
  )
  predict_folders.check_patients(dirs)
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
  summary = predict_folders.predict_patients(
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
