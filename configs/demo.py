"""The embedded default: RANDose on synthetic phantom patients, no download.

  python -m randose_jax.main --config=configs/demo.py --workdir=/tmp/randose_demo

Writes phantom patients (OpenKBP layout) under <workdir>/synthetic, trains a
small RANDose on 2 CPU cores in a few minutes and prints its validation dose
score next to the score of always predicting the mean training dose inside the
possible-dose mask, which it must clearly beat.

Its measured time and scores are in the README, docs/performance.md and
benchmarks/NOTES.md.

Variant, chosen after a colon (`--config=configs/demo.py:smoke`):
  smoke   the fastest settings that train on one CPU (the trainer tests'
          shape): 16^3 phantoms trained at 8^3, a 2-stage RANDose of width 4
          with smaller kernel sets, 4 steps. Checks that everything runs
          (the quickstart notebook under RANDOSE_SMOKE=1); it learns nothing.
"""

from randose_jax import config_check
from randose_jax import default_config


def _smoke(config):
  config.data.synthetic_grid = 16
  config.data.num_synthetic_train = 4
  config.data.num_synthetic_eval = 2
  config.data.downsample = 2  # 16^3 phantoms -> 8^3
  config.model.widths = (4, 4)
  config.model.msfe_kernels = (3, 5)
  config.model.pi_kernels = (3,)
  config.model.msfe_fused = False
  config.num_train_steps = 4
  config.log_every_steps = 2
  config.eval_every_steps = 2
  config.checkpoint_every_steps = 2
  config.progress_bar = False


_VARIANTS = {"smoke": _smoke}


def get_config(variant: str = ""):
  config = default_config.get_default_config()
  config.data.synthetic = True
  config.data.num_synthetic_train = 12
  config.data.num_synthetic_eval = 4
  config.data.synthetic_grid = 32
  config.data.downsample = 2  # 32^3 phantoms -> 16^3 model grid
  config.data.num_workers = 0
  # A 3-stage RANDose (every module on) at 16^3, small enough that the demo
  # stays well inside its 10-minute limit on 2 CPU cores.
  config.model.widths = (8, 16, 32)
  config.model.msfe_fused = True
  config.learning_rate = 1e-3
  config.batch_size = 2
  config.num_train_steps = 1200
  config.log_every_steps = 50
  config.eval_every_steps = 300
  config.checkpoint_every_steps = 300
  return config_check.apply_variants(
      config, variant, _VARIANTS, "configs/demo.py"
  )
