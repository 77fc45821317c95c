r"""Parameters and forward FLOPs of the configured network, without running it.

  python -m randose_jax.cli.summary --config=configs/openkbp.py[:variant] \
      [--grid=128] [--json]

The library part is `randose_jax/models/costs.py`. Prints the parameter
count of each top-level module (stem_*, encoder_s, pi_s,
up_s, af_s, decoder_s, head), per kind and in total, and the forward GFLOPs of
one sample (batch 1) at a grid^3 input. Nothing is executed: parameters come
from `jax.eval_shape` of `init`, FLOPs from XLA's cost analysis of the lowered
forward (`jax.jit(apply).lower(...).cost_analysis()`, HLO before optimisation;
`--compile` uses the compiled executable's instead), cross-checked against an
analytic count of the convolutions in the forward's jaxpr
(2 * Cin * Cout * valid kernel taps per output voxel, per conv; padding taps
excluded, as XLA counts them). With --json the last line printed is a JSON
object with at least `params` and `gflops_per_sample`.
"""

import json

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from randose_jax import logs
from randose_jax import models
from randose_jax.cli import common as cli
from randose_jax.models import costs

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = FLAGS):
  """Command-line flags (defined only when run as a program, so library
  modules can be imported together without clashing flag names)."""
  config_flags.DEFINE_config_file(
      "config",
      None,
      "Config file, e.g. configs/openkbp.py:row3.",
      lock_config=True,
      flag_values=flag_values,
  )
  flags.DEFINE_integer(
      "grid", 128, "Edge of the cubic input grid.", flag_values=flag_values
  )
  flags.DEFINE_bool(
      "json",
      False,
      "Print a JSON object as the last line.",
      flag_values=flag_values,
  )
  flags.DEFINE_bool(
      "compile",
      False,
      "Take FLOPs from the compiled "
      "executable (slower) instead of the lowered HLO.",
      flag_values=flag_values,
  )
  flags.DEFINE_bool(
      "plan",
      False,
      "Print how each conv layer is computed "
      "here (config.model.conv_impl) instead of the summary.",
      flag_values=flag_values,
  )
  flags.DEFINE_integer(
      "batch",
      1,
      "Batch size of --plan (the plan depends "
      "on it; training uses config.batch_size).",
      flag_values=flag_values,
  )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if FLAGS.config is None:
    raise app.UsageError("--config is required, e.g. configs/openkbp.py")
  logs.quiet_library_logs()
  factor = models.grid_factor(FLAGS.config.model.widths)
  if FLAGS.grid < factor or FLAGS.grid % factor:
    raise app.UsageError(
        f"--grid={FLAGS.grid}: must be a positive multiple of {factor} (the "
        f"{len(FLAGS.config.model.widths)}-stage network halves the grid "
        f"{len(FLAGS.config.model.widths) - 1} times)"
    )
  if FLAGS.batch < 1:
    raise app.UsageError(f"--batch={FLAGS.batch}: must be at least 1")
  if FLAGS.plan:
    print(
        f"conv plan, conv_impl={FLAGS.config.model.conv_impl!r}, backend "
        f"{jax.default_backend()}, batch {FLAGS.batch}, {FLAGS.grid}^3 "
        "(estimates are CPU forward seconds; conv_planner.plan_conv):"
    )
    print(
        costs.format_conv_plan(
            costs.conv_plan(FLAGS.config.model, FLAGS.grid, FLAGS.batch)
        )
    )
    return
  summary = costs.summarize(FLAGS.config.model, FLAGS.grid, FLAGS.compile)
  print(costs.format_summary(summary))
  if FLAGS.json:
    print(json.dumps(summary))


def run() -> None:
  """The console command (pyproject [project.scripts])."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
