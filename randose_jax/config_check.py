"""The config checked once, when it is loaded: every field and its value.

  check_config(config)   raises ConfigErrors listing every problem found,
                         one line each, naming the field: the command line
                         prints each as its own `error:` line (exit 2).

`train_and_evaluate` checks the config it is given before touching the
workdir; `randose-train` checks it right after parsing the flags. Past this
point the code reads fields without checking them again.

`apply_variants` is the one variant mechanism of every file in `configs/`
(`configs/openkbp.py:cpu_best,lossmask`): names separated by commas, each a
function of the config, applied in order; an unknown name is a ConfigError
naming the file and the choices.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Mapping

from randose_jax import conventions
from randose_jax.default_config import ConfigError
from randose_jax.default_config import get_default_config


class ConfigErrors(ConfigError):
  """Several config problems; `problems` holds one line per problem."""

  def __init__(self, problems: Iterable[str]):
    self.problems = list(problems)
    super().__init__("\n".join(self.problems))


def apply_variants(
    config,
    variants: str,
    table: Mapping[str, Callable[[Any], None]],
    where: str,
):
  """Applies the comma-separated `variants` of `table` to `config` in order
  and returns it; `where` names the config file in the error."""
  for name in filter(None, (v.strip() for v in str(variants).split(","))):
    if name not in table:
      raise ConfigError(
          f"{where}: unknown variant {name!r}; choose from {sorted(table)}"
      )
    table[name](config)
  return config


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (
      isinstance(value, (int, float))
      and not isinstance(value, bool)
      and math.isfinite(value)
  )


class _Checker:
  """Collects problems: `need(ok, field, value, why)`."""

  def __init__(self, config):
    self.config = config
    self.problems: list[str] = []

  def get(self, field: str):
    node = self.config
    for part in field.split("."):
      node = node[part]
    return node

  def need(self, ok: bool, field: str, why: str) -> bool:
    if not ok:
      try:
        value = self.get(field)
      except (KeyError, AttributeError):
        value = None
      self.problems.append(f"config.{field}={value!r}: {why}")
    return ok

  def choice(self, field: str, choices) -> None:
    self.need(
        self.get(field) in choices, field, f"choose from {tuple(choices)}"
    )

  def boolean(self, field: str) -> None:
    self.need(isinstance(self.get(field), bool), field, "must be True or False")

  def integer(self, field: str, low: int, high: int | None = None) -> None:
    value = self.get(field)
    ok = _is_int(value) and value >= low and (high is None or value <= high)
    span = f">= {low}" if high is None else f"in [{low}, {high}]"
    self.need(ok, field, f"must be an integer {span}")

  def positive(self, field: str, zero_ok: bool = False) -> None:
    value = self.get(field)
    ok = _is_number(value) and (value >= 0 if zero_ok else value > 0)
    self.need(
        ok, field, f"must be a finite number {'>=' if zero_ok else '>'} 0"
    )


def _unknown_fields(config, reference, prefix="") -> list[str]:
  """Fields of `config` the default config does not have."""
  out = []
  for key in config.keys():
    path = f"{prefix}{key}"
    if key not in reference:
      out.append(
          f"config.{path}: unknown field (not in "
          "randose_jax/default_config.py)"
      )
    elif hasattr(config[key], "keys") and hasattr(reference[key], "keys"):
      out.extend(_unknown_fields(config[key], reference[key], f"{path}."))
  return out


def problems_of(config) -> list[str]:
  """Every problem of `config`, one line each (empty: it can work)."""
  # Imported here: the loss and the model import this module's neighbours.
  from randose_jax import models  # pylint: disable=g-import-not-at-top
  from randose_jax.training import losses  # pylint: disable=g-import-not-at-top

  problems = _unknown_fields(config, get_default_config())
  if problems:
    return problems
  c = _Checker(config)
  # ------------------------------------------------------------- data
  for field in ("data.root", "data.cache_dir", "init_checkpoint"):
    c.need(isinstance(c.get(field), str), field, "must be a path (or '')")
  for field in ("data.train_split", "data.eval_split"):
    c.need(
        isinstance(c.get(field), str) and bool(c.get(field)),
        field,
        "must be a folder name, e.g. train-pats",
    )
  for field in (
      "data.synthetic",
      "data.geometry",
      "data.geometry_slab",
      "data.augment",
      "data.flip_lr",
      "data.swap_parotids",
      "data.flip_si",
      "data.rotate",
  ):
    c.boolean(field)
  c.integer("data.num_synthetic_train", 1)
  c.integer("data.num_synthetic_eval", 1)
  c.integer("data.downsample", 1)
  c.integer("data.synthetic_grid", 1)
  c.integer("data.num_workers", 0)
  c.integer("data.worker_buffer_size", 1)
  c.integer("data.read_threads", 1)
  c.choice("data.crop_placement", ("inside", "centre"))
  overlap = c.get("data.window_overlap")
  c.need(
      _is_number(overlap) and 0 <= overlap < 1,
      "data.window_overlap",
      "must be in [0, 1)",
  )
  clip = tuple(c.get("data.ct_clip") or ())
  c.need(
      len(clip) == 2 and all(map(_is_number, clip)) and clip[0] < clip[1],
      "data.ct_clip",
      "must be (low, high) in HU with low < high",
  )
  for field in ("data.ct_scale", "data.dose_scale", "data.geometry_scale_mm"):
    c.positive(field)
  levels = tuple(c.get("data.ptv_values") or ())
  c.need(
      len(levels) == len(conventions.TARGET_NAMES)
      and all(_is_number(v) and 0 < v <= 1 for v in levels)
      and list(levels) == sorted(set(levels)),
      "data.ptv_values",
      "must be three increasing levels in (0, 1] (PTV56, PTV63, PTV70)",
  )
  c.need(
      not c.get("data.geometry_slab") or bool(c.get("data.geometry")),
      "data.geometry_slab",
      "needs config.data.geometry=True (the slab channels extend it)",
  )
  # ------------------------------------------------------------ model
  try:
    models.create_model(config.model, backend="cpu")
  except ConfigError as e:
    c.problems.append(str(e))
  widths = tuple(c.get("model.widths") or ())
  factor = models.grid_factor(widths) if widths else 1
  downsample = c.get("data.downsample")
  if _is_int(downsample) and downsample >= 1 and widths:
    edge = (
        c.get("data.synthetic_grid")
        if c.get("data.synthetic")
        else conventions.GRID_SHAPE[0]
    )
    c.need(
        _is_int(edge)
        and edge % downsample == 0
        and (edge // downsample) % factor == 0,
        "data.downsample",
        f"the training grid ({edge} // downsample) must be a whole multiple"
        f" of {factor} (2^(S-1), S = {len(widths)} stages)",
    )
    crop = tuple(c.get("data.crop_shape") or ())
    if crop:
      train_edge = edge // downsample
      c.need(
          len(crop) == 3
          and all(_is_int(n) and 0 < n <= train_edge for n in crop)
          and not any(n % factor for n in crop),
          "data.crop_shape",
          f"must be () or three integers, each a multiple of {factor} "
          f"(2^(S-1), S = {len(widths)} stages) and at most the training "
          f"grid's {train_edge}",
      )
    coarse_steps = c.get("data.coarse_steps")
    if (
        c.need(
            _is_int(coarse_steps) and coarse_steps >= 0,
            "data.coarse_steps",
            "must be an integer >= 0 (0 = no coarse phase)",
        )
        and coarse_steps
    ):
      run_steps = c.get("num_train_steps")
      c.need(
          not _is_int(run_steps) or coarse_steps < run_steps,
          "data.coarse_steps",
          f"must be below num_train_steps ({run_steps}): the run ends on "
          "the training grid",
      )
      coarse = c.get("data.coarse_downsample")
      c.need(
          _is_int(coarse)
          and coarse > downsample
          and edge % coarse == 0
          and (edge // coarse) % factor == 0,
          "data.coarse_downsample",
          f"must be an integer above data.downsample ({downsample}) that "
          f"divides the grid ({edge}) into a whole multiple of {factor} "
          f"(2^(S-1), S = {len(widths)} stages)",
      )
  # ------------------------------------------------------------- loss
  regions = tuple(r for r in c.get("loss.regions") or () if r)
  c.need(
      set(regions) <= set(losses.REGIONS),
      "loss.regions",
      f"choose regions from {losses.REGIONS}",
  )
  c.choice("loss.mode", losses.MODES)
  c.need(
      _is_number(c.get("loss.init_log_var")),
      "loss.init_log_var",
      "must be a finite number",
  )
  weights = tuple(c.get("loss.fixed_weights") or ())
  c.need(
      len(weights) in (2, 3) and all(_is_number(w) for w in weights),
      "loss.fixed_weights",
      "must be (w_PTV, w_OAR) or (w_PTV, w_OAR, w_mask), finite numbers",
  )
  # --------------------------------------------------------- training
  c.integer("seed", 0)
  c.choice("optimizer", ("adam", "adamw", "sgd"))
  c.positive("learning_rate")
  c.choice("lr_schedule", ("constant", "cosine"))
  c.integer("num_train_steps", 1)
  steps = c.get("num_train_steps")
  for field in ("warmup_steps", "lr_decay_start"):  # a step of the run
    value = c.get(field)
    c.need(
        _is_int(value)
        and value >= 0
        and (not _is_int(steps) or value < max(steps, 1)),
        field,
        f"must be >= 0 and below num_train_steps ({steps})",
    )
  c.positive("grad_clip_norm", zero_ok=True)
  decay = c.get("ema_decay")
  c.need(
      _is_number(decay) and 0 <= decay < 1,
      "ema_decay",
      "must be >= 0 and < 1 (0 = no moving average of the parameters; "
      "e.g. 0.999)",
  )
  c.integer("batch_size", 1)
  for field in (
      "log_every_steps",
      "eval_every_steps",
      "checkpoint_every_steps",
      "keep_checkpoints",
  ):
    c.integer(field, 1)
  c.integer("max_eval_patients", 0)
  c.boolean("eval_tta")
  c.boolean("progress_bar")
  return c.problems


def check_config(config) -> None:
  """Raises ConfigErrors (one line per problem) unless `config` can work."""
  problems = problems_of(config)
  if problems:
    raise ConfigErrors(problems)
