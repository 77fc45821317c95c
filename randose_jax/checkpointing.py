"""Orbax checkpoints of a training run: the latest N and the best one.

Layout under `<workdir>/checkpoints/`:
  latest/<step>/{state, data, config, meta}   kept: the last `keep` saves
  best/<step>/{state, data, config, meta}     kept: the best validation dose score

`state` is the train state (step, params, optimizer state), `data` the grain
iterator state (so a resume continues the same example stream), `config` the
run's config and `meta` small JSON facts (step, validation scores).
Orbax writes each save into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous checkpoints intact.
"""

import logging
import pathlib
from typing import Any, Optional

import orbax.checkpoint as ocp

ITEMS = ("state", "data", "config", "meta")


class CheckpointError(RuntimeError):
  pass


def _manager(directory: pathlib.Path, keep: int, async_save: bool):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True,
      enable_async_checkpointing=async_save)
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


class Checkpointer:
  """Saves and restores `latest` and `best` checkpoints of one workdir."""

  def __init__(self, workdir, keep: int = 3, async_save: bool = True):
    root = pathlib.Path(workdir) / "checkpoints"
    self.root = root
    self.latest = _manager(root / "latest", keep, async_save)
    # The best checkpoint is written rarely: synchronous keeps it simple.
    self.best = _manager(root / "best", 1, False)

  def _save(self, manager, step, state, data_state, config_dict, meta):
    manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state),
        config=ocp.args.JsonSave(config_dict),
        meta=ocp.args.JsonSave(meta)))

  def save_latest(self, step: int, state, data_state, config_dict, meta):
    self._save(self.latest, step, state, data_state, config_dict, meta)

  def save_best(self, step: int, state, data_state, config_dict, meta):
    self.latest.wait_until_finished()
    self._save(self.best, step, state, data_state, config_dict, meta)

  def wait(self):
    self.latest.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.latest.close()
    self.best.close()

  def steps(self, which: str = "latest") -> list:
    return sorted(self._mgr(which).all_steps())

  def _mgr(self, which: str):
    if which not in ("latest", "best"):
      raise ValueError(f"checkpoint kind must be 'latest' or 'best', got {which!r}")
    return self.latest if which == "latest" else self.best

  def restore(self, abstract_state, which: str = "latest",
              step: Optional[int] = None) -> Optional[dict]:
    """Restores the newest readable checkpoint (or `step`) of `which`.

    Returns a dict with `state`, `data`, `config`, `meta` and `step`, or None
    when there is no checkpoint. A checkpoint that fails to read is skipped
    with a warning in favour of the one before it; an explicitly requested
    `step` that fails raises a CheckpointError naming its folder.
    """
    manager = self._mgr(which)
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise CheckpointError(
            f"{self.root / which}: no checkpoint at step {step} "
            f"(available: {sorted(steps)})")
      steps = [step]
    for s in steps:
      try:
        restored = manager.restore(s, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state),
            data=ocp.args.JsonRestore(),
            config=ocp.args.JsonRestore(),
            meta=ocp.args.JsonRestore()))
      except Exception as e:  # pylint: disable=broad-except
        where = self.root / which / str(s)
        if step is not None:
          raise CheckpointError(f"{where}: unreadable checkpoint ({e})") from e
        logging.warning("Checkpoint %s is unreadable (%s: %s); falling back "
                        "to the one before it.", where, type(e).__name__, e)
        continue
      out = {k: restored[k] for k in ITEMS}
      out["step"] = s
      return out
    if steps:
      raise CheckpointError(
          f"{self.root / which}: none of the checkpoints {sorted(steps)} "
          "could be read")
    return None


def best_meta(workdir) -> Optional[dict]:
  """The `meta` of the best checkpoint of a workdir, without its state."""
  mgr = _manager(pathlib.Path(workdir) / "checkpoints" / "best", 1, False)
  try:
    steps = mgr.all_steps()
    if not steps:
      return None
    return mgr.restore(max(steps), args=ocp.args.Composite(
        meta=ocp.args.JsonRestore()))["meta"]
  finally:
    mgr.close()


def read_config_dict(workdir, which: str = "latest",
                     step: Optional[int] = None) -> tuple[int, dict]:
  """The config saved with a checkpoint: (step, config dict)."""
  mgr = _manager(pathlib.Path(workdir) / "checkpoints" / which, 1, False)
  try:
    steps = sorted(mgr.all_steps())
    if not steps:
      raise CheckpointError(
          f"{pathlib.Path(workdir) / 'checkpoints' / which}: no checkpoints "
          "(has this workdir been trained?)")
    s = steps[-1] if step is None else step
    if s not in steps:
      raise CheckpointError(
          f"{pathlib.Path(workdir) / 'checkpoints' / which}: no checkpoint at "
          f"step {s} (available: {steps})")
    return s, mgr.restore(s, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]
  finally:
    mgr.close()


def as_saveable(state) -> dict[str, Any]:
  return {"step": state.step, "params": state.params,
          "opt_state": state.opt_state}
