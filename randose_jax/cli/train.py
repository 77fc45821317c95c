r"""Train and evaluate RANDose.

  python -m randose_jax.main --config=configs/openkbp.py --workdir=runs/randose

Running the same command in the same workdir resumes from its latest
checkpoint. Notebooks and tests call `train.train_and_evaluate` directly.
A bad patient, an unreadable checkpoint, an unusable --workdir, a full
disk, a loss that became NaN or a second run in the same workdir is one
`error:` line on stderr (exit status 2); a run that fails before training
leaves the workdir as it was. Ctrl-C or SIGTERM saves a checkpoint at the
next step boundary and exits 130 / 143 with one line. Warnings and errors
of orbax and JAX go to `<workdir>/library.log` (`--verbosity=0` shows them).
"""

import pathlib

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from randose_jax.cli import common as cli
from randose_jax import config_check
from randose_jax import distributed
from randose_jax import fileio
from randose_jax import logs
from randose_jax.training import train

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """Command-line flags (defined only when run as a program)."""
  flags.DEFINE_string(
      "workdir",
      None,
      "Where checkpoints, logs and predictions go.",
      flag_values=flag_values,
  )
  flags.DEFINE_bool(
      "distributed",
      False,
      "Force jax.distributed.initialize() (multi-host runs are "
      "otherwise detected from SLURM / MPI / TPU environments).",
      flag_values=flag_values,
  )
  flags.DEFINE_string(
      "coordinator_address",
      "",
      "host:port of process 0, for hand-started multi-process runs.",
      flag_values=flag_values,
  )
  flags.DEFINE_integer(
      "num_processes",
      0,
      "Process count of a hand-started "
      "multi-process run (0: detect or single process).",
      flag_values=flag_values,
  )
  flags.DEFINE_integer(
      "process_id",
      -1,
      "This process's id in such a run.",
      flag_values=flag_values,
  )
  config_flags.DEFINE_config_file(
      "config",
      None,
      "Config file, e.g. configs/openkbp.py[:variant].",
      flag_values=flag_values,
      lock_config=True,
  )
  flags.mark_flags_as_required(["config", "workdir"], flag_values=flag_values)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logs.quiet_library_logs()
  # The config is checked once, before anything is written or started.
  config_check.check_config(FLAGS.config)
  fileio.check_output_dir(FLAGS.workdir)
  distributed.maybe_initialize(
      FLAGS.distributed,
      FLAGS.coordinator_address,
      FLAGS.num_processes,
      FLAGS.process_id,
  )
  index = jax.process_index()
  logs.library_log(
      pathlib.Path(FLAGS.workdir).expanduser()
      / (f"library-{index}.log" if index else "library.log")
  )
  logging.info(
      "JAX process %d / %d; devices: %s",
      jax.process_index(),
      jax.process_count(),
      jax.devices(),
  )
  train.train_and_evaluate(FLAGS.config, FLAGS.workdir)


def run() -> None:
  """The console command (pyproject [project.scripts])."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
