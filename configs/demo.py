"""The embedded default: RANDose on synthetic phantom patients, no download.

  python -m randose_jax.main --config=configs/demo.py --workdir=/tmp/randose_demo

Writes phantom patients (OpenKBP layout) under <workdir>/synthetic, trains a
small RANDose on 2 CPU cores in a few minutes and prints its validation dose
score next to the score of always predicting the mean training dose inside the
possible-dose mask, which it must clearly beat.
"""

from randose_jax import default_config


def get_config():
  config = default_config.get_default_config()
  config.data.synthetic = True
  config.data.num_synthetic_train = 12
  config.data.num_synthetic_eval = 4
  config.data.synthetic_grid = 32
  config.data.num_workers = 0
  config.model.widths = (8, 16, 32, 64)
  config.learning_rate = 1e-3
  config.batch_size = 2
  config.num_train_steps = 600
  config.log_every_steps = 50
  config.eval_every_steps = 200
  config.checkpoint_every_steps = 200
  return config
