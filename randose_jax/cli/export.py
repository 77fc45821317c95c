r"""Export a trained model as an artifact that stands alone.

  python -m randose_jax.cli.export --workdir=runs/randose --output=randose.zip \
      [--checkpoint=best] [--tta] [--conv_impl=direct] [--overwrite]
  python -m randose_jax.cli.export --model=NAME --output=randose.zip  # shipped

Writes one zip file that runs without this library, with only jax and
numpy installed (README, "Export"): the whole prediction path from the CT
in HU, the structure masks, the possible-dose mask and the voxel size to the
dose in Gy. Its format and `load` are `randose_jax/inference/export.py`.

--output is checked before the model is traced (its folder writable, no
artifact there unless --overwrite) and written atomically: a failure leaves
it as it was. A problem is one `error:` line naming the path (exit 2).
"""

from absl import app
from absl import flags

from randose_jax import fileio
from randose_jax import logs
from randose_jax.cli import common as cli
from randose_jax.inference import export as export_lib
from randose_jax.inference import shipped

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string(
      "workdir",
      None,
      "Training workdir holding checkpoints/ (or --model).",
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      "model",
      None,
      "A shipped model's name (randose_jax/inference/shipped_models/), instead of "
      "--workdir.",
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      "output", None, "Artifact path (.zip).", flag_values=flag_values
  )
  flags.DEFINE_string(
      "checkpoint",
      "best",
      "best, latest or a step number.",
      flag_values=flag_values,
  )
  flags.DEFINE_bool(
      "tta",
      False,
      "Bake 4-flip test-time augmentation in.",
      flag_values=flag_values,
  )
  flags.DEFINE_list(
      "platforms",
      list(export_lib.DEFAULT_PLATFORMS),
      "Platforms to lower for (cpu, cuda, rocm, tpu).",
      flag_values=flag_values,
  )
  flags.DEFINE_enum(
      "conv_impl",
      None,
      ["auto", "direct", "fft"],
      "Override the run's model.conv_impl for the export "
      "(the convolutions are traced once, on this backend): "
      "'direct' for an artifact to run on GPUs, or for less "
      "memory.",
      flag_values=flag_values,
  )
  flags.DEFINE_bool(
      "overwrite",
      False,
      "Replace an artifact already at --output.",
      flag_values=flag_values,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_library_logs()
  if not FLAGS.output:
    raise app.UsageError("--output is required")
  if bool(FLAGS.workdir) == bool(FLAGS.model):
    raise app.UsageError("give one of --workdir and --model")
  if FLAGS.workdir:
    path = export_lib.export_workdir(
        FLAGS.workdir,
        FLAGS.output,
        FLAGS.checkpoint,
        FLAGS.tta,
        tuple(FLAGS.platforms),
        FLAGS.conv_impl,
        overwrite=FLAGS.overwrite,
    )
    source = f"{FLAGS.workdir} ({FLAGS.checkpoint})"
  else:
    fileio.check_output_file(FLAGS.output, overwrite=FLAGS.overwrite)
    restored = shipped.load(FLAGS.model, conv_impl=FLAGS.conv_impl)
    path = export_lib.export_restored(
        restored,
        FLAGS.output,
        tta=FLAGS.tta,
        platforms=tuple(FLAGS.platforms),
        overwrite=FLAGS.overwrite,
    )
    source = f"the shipped model {FLAGS.model}"
  size = path.stat().st_size / 2**20
  print(f"Exported {source} to {path} ({size:.1f} MiB)")


def run() -> None:
  """The console command (pyproject [project.scripts])."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
