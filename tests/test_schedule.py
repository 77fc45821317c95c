"""The learning-rate schedules of `config.lr_schedule` / `warmup_steps`."""

import jax
import numpy as np
import pytest

from randose_jax import default_config
from randose_jax.training import train
from randose_jax.default_config import ConfigError


def _config(**fields):
  config = default_config.get_default_config()
  config.num_train_steps = 100
  config.learning_rate = 1e-3
  config.update(fields)
  return config


def _lrs(config):
  _, schedule = train.create_optimizer(config)
  return np.array(
      [float(schedule(t)) for t in range(config.num_train_steps + 1)]
  )


def test_constant_is_the_paper_recipe():
  assert default_config.get_default_config().lr_schedule == "constant"
  np.testing.assert_allclose(_lrs(_config()), 1e-3)


def test_cosine_after_warmup_ends_at_zero():
  lrs = _lrs(_config(lr_schedule="cosine", warmup_steps=20))
  # Linear warm-up from 0 to the peak at step 20 ...
  np.testing.assert_allclose(
      lrs[:21], np.linspace(0, 1e-3, 21), rtol=1e-6, atol=1e-12
  )
  # ... then half a cosine over the remaining 80 steps: at the middle of
  # them half the peak, at the last step 0.
  assert lrs[60] == pytest.approx(0.5e-3, rel=1e-5)
  assert lrs[100] == pytest.approx(0.0, abs=1e-9)
  assert np.all(np.diff(lrs[20:]) <= 0)


def test_cosine_without_warmup():
  lrs = _lrs(_config(lr_schedule="cosine"))
  assert lrs[0] == pytest.approx(1e-3)
  assert lrs[50] == pytest.approx(0.5e-3, rel=1e-5)
  assert lrs[100] == pytest.approx(0.0, abs=1e-9)


def test_cosine_from_decay_start():
  # A constant-rate run resumed at step 40 for its decay: the rate holds
  # until then, and half a cosine over the 60 steps left.
  lrs = _lrs(_config(lr_schedule="cosine", lr_decay_start=40))
  np.testing.assert_allclose(lrs[:41], 1e-3, rtol=1e-6)
  assert lrs[70] == pytest.approx(0.5e-3, rel=1e-5)
  assert lrs[100] == pytest.approx(0.0, abs=1e-9)
  assert np.all(np.diff(lrs[40:]) < 0)


def test_decay_start_with_warmup():
  lrs = _lrs(_config(lr_schedule="cosine", warmup_steps=10, lr_decay_start=50))
  assert lrs[5] == pytest.approx(0.5e-3, rel=1e-6)
  np.testing.assert_allclose(lrs[10:51], 1e-3, rtol=1e-6)
  assert lrs[75] == pytest.approx(0.5e-3, rel=1e-5)
  assert lrs[100] == pytest.approx(0.0, abs=1e-9)


def test_constant_state_restores_into_the_decay():
  # The optimizer state of a constant-rate run has the tree a decaying one
  # expects, so its checkpoint resumes under the decay.
  params = {"w": np.zeros((3,), np.float32)}
  constant, _ = train.create_optimizer(_config())
  decay, _ = train.create_optimizer(
      _config(lr_schedule="cosine", lr_decay_start=40)
  )
  assert jax.tree.structure(constant.init(params)) == jax.tree.structure(
      decay.init(params)
  )


def test_constant_with_warmup():
  lrs = _lrs(_config(warmup_steps=10))
  assert lrs[5] == pytest.approx(0.5e-3, rel=1e-6)
  np.testing.assert_allclose(lrs[10:], 1e-3, rtol=1e-6)


@pytest.mark.parametrize(
    "fields, field",
    [
        (dict(lr_schedule="linear"), "lr_schedule"),
        (dict(warmup_steps=100), "warmup_steps"),
        (dict(warmup_steps=-1), "warmup_steps"),
        (dict(lr_decay_start=100), "lr_decay_start"),
        (dict(lr_decay_start=-5), "lr_decay_start"),
    ],
)
def test_bad_schedule_is_a_config_error(fields, field):
  with pytest.raises(ConfigError, match=field):
    train.create_optimizer(_config(**fields))
