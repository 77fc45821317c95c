"""The config checked once (randose_jax/config_check.py): every field of
every named variant, each problem one line naming the field."""

import importlib.util
import math
import pathlib

import pytest

from randose_jax import config_check
from randose_jax import default_config

REPO = pathlib.Path(__file__).resolve().parents[1]


def _config_module(name):
  spec = importlib.util.spec_from_file_location(
      f"{name}_config", REPO / "configs" / f"{name}.py"
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize(
    "file,variants",
    [
        ("openkbp", ""),
        ("openkbp", "smoke"),
        ("openkbp", "cpu_proxy"),
        ("openkbp", "cpu_best,lossmask"),
        ("openkbp", "cpu_best,progressive"),
        ("openkbp", "row1,loss2"),
        ("demo", ""),
        ("demo", "smoke"),
    ],
)
def test_every_named_config_passes(file, variants):
  config = _config_module(file).get_config(variants)
  assert config_check.problems_of(config) == []


BAD = [
    ("data.crop_placement", "middle", "choose from"),
    ("data.window_overlap", 1.0, "[0, 1)"),
    ("data.downsample", 0, "integer >= 1"),
    ("data.ptv_values", (0.9, 0.8, 1.0), "increasing"),
    ("data.geometry_slab", True, "needs config.data.geometry"),
    ("data.crop_shape", (64, 64, 60), "multiple of 16"),
    ("data.coarse_steps", -1, "integer >= 0"),
    ("data.coarse_steps", 80_000, "below num_train_steps"),
    ("model.norm", "batch", "model.norm"),
    ("loss.regions", ("ptv", "body"), "choose regions"),
    ("loss.mode", "learned", "choose from"),
    ("optimizer", "lamb", "choose from"),
    ("learning_rate", math.nan, "finite number > 0"),
    ("warmup_steps", 80_000, "below num_train_steps"),
    ("lr_decay_start", -1, "below num_train_steps"),
    ("ema_decay", 1.0, ">= 0 and < 1"),
    ("batch_size", 0, "integer >= 1"),
    ("max_eval_patients", -1, "integer >= 0"),
]


@pytest.mark.parametrize("field,value,why", BAD, ids=[b[0] for b in BAD])
def test_a_bad_value_is_one_line_naming_its_field(field, value, why):
  config = default_config.get_default_config()
  *path, last = field.split(".")
  node = config
  for part in path:
    node = node[part]
  node[last] = value
  problems = config_check.problems_of(config)
  assert len(problems) == 1, problems
  assert field in problems[0] and why in problems[0], problems[0]
  with pytest.raises(default_config.ConfigError):
    config_check.check_config(config)


def test_several_problems_are_several_error_lines(tmp_path, capfd):
  from tests.test_fault_table import DEMO, run_in_process  # pylint: disable=g-import-not-at-top

  code, out, err = run_in_process(
      "main",
      [
          f"--config={DEMO}",
          f"--workdir={tmp_path / 'w'}",
          "--config.optimizer=lamb",
          "--config.ema_decay=2.0",
          "--config.data.crop_placement=middle",
      ],
      capfd,
  )
  assert code == 2
  lines = err.strip().splitlines()
  assert len(lines) == 3 and all(l.startswith("error: config.") for l in lines)
  assert {"optimizer", "ema_decay", "crop_placement"} == {
      w for w in ("optimizer", "ema_decay", "crop_placement") if w in err
  }
  assert not (tmp_path / "w").exists()  # checked before anything is written


def test_an_unknown_field_is_named():
  config = default_config.get_default_config()
  with config.unlocked():
    config.data.rooot = "/data"
  problems = config_check.problems_of(config)
  assert problems == [
      "config.data.rooot: unknown field (not in randose_jax/default_config.py)"
  ]


def test_an_unknown_variant_names_the_file_and_the_choices():
  with pytest.raises(default_config.ConfigError) as info:
    _config_module("openkbp").get_config("cpu_best,lossmsk")
  assert "configs/openkbp.py: unknown variant 'lossmsk'" in str(info.value)
  assert "'lossmask'" in str(info.value)


@pytest.mark.parametrize(
    "coarse,ok", [(2, True), (4, True), (1, False), (3, False), (256, False)]
)
def test_the_coarse_grid_is_checked_when_there_is_a_coarse_phase(coarse, ok):
  config = default_config.get_default_config()
  config.data.coarse_downsample = coarse
  assert config_check.problems_of(config) == []  # no coarse phase: unused
  config.data.coarse_steps = 100
  problems = config_check.problems_of(config)
  if ok:
    assert problems == []
  else:
    assert len(problems) == 1 and "data.coarse_downsample" in problems[0]
