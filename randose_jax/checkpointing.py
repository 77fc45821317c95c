"""Orbax checkpoints of a training run: the latest N and the best one.

Layout under `<workdir>/checkpoints/`:
  latest/<step>/{state, data, config, meta}   kept: the last `keep` saves
  best/<step>/{state, data, config, meta}     kept: the best validation dose score

`state` is the train state as training hands it over (a dict of arrays;
what its entries mean is training's business, `training.train.saveable_state`),
`data` the grain iterator state (so a resume continues the same example
stream), `config` the run's config and `meta` small JSON facts (step,
validation scores).
Orbax writes each save into a temporary folder and renames it when complete,
so a run killed mid-save leaves the previous checkpoints intact.

A checkpoint that cannot be read is skipped in favour of the one before it,
with one warning line naming it. A training run (`restore(...,
set_aside_unreadable=True)`) also moves such a folder (renamed, never
deleted) to `checkpoints/unreadable/<kind>-<step>-<UTC time>/`, so that the
step is written again when training reaches it (orbax never writes a step
that is not newer than the newest folder it sees). Nothing is moved when no
checkpoint of the kind can be read: that is an error for the user to look at.
"""

import contextlib
import datetime
import logging
import os
import pathlib
import shutil
import sys
from typing import Optional

from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp

from randose_jax import interrupts

ITEMS = ("state", "data", "config", "meta")
# Where unreadable checkpoints are moved, relative to the workdir.
UNREADABLE_DIR = os.path.join("checkpoints", "unreadable")


class CheckpointError(RuntimeError):
  pass


def brief_error(e: BaseException, limit: int = 200) -> str:
  """`Type: first line of the message`, without TensorStore's spec dump and
  at most `limit` characters: what a one-line warning can carry."""
  text = str(e).strip()
  text = text.splitlines()[0] if text else ""
  text = text.split(" [tensorstore_spec")[0].strip()
  if len(text) > limit:  # the start says what failed, the end why
    head = limit // 3
    text = text[:head] + " ... " + text[-(limit - head - 5) :]
  return f"{type(e).__name__}: {text}" if text else type(e).__name__


_STALE_CALLBACK_FILTER = []


def _is_stale_loop_callback(exc) -> bool:
  return isinstance(exc, RuntimeError) and str(exc) == "Event loop is closed"


def _ignore_stale_loop_callbacks():
  """A failed orbax restore or save closes its event loop while TensorStore
  operations are still in flight; each one's completion then prints a
  traceback of `RuntimeError: Event loop is closed` (dozens of them, after
  the failure was handled): through `sys.unraisablehook`, or, called from
  TensorStore's threads, through `sys.excepthook`. Those, and only those,
  are dropped."""
  if (
      _STALE_CALLBACK_FILTER
      and sys.unraisablehook is _STALE_CALLBACK_FILTER[-1][0]
  ):
    return
  unraisable, excepthook = sys.unraisablehook, sys.excepthook

  def unraisable_hook(info):
    if not _is_stale_loop_callback(info.exc_value):
      unraisable(info)

  def except_hook(kind, value, tb):
    if not _is_stale_loop_callback(value):
      excepthook(kind, value, tb)

  sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
  _STALE_CALLBACK_FILTER.append((unraisable_hook, except_hook))


def _utc_stamp() -> str:
  return datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%dT%H%M%SZ")


def _move_aside(
    folder: pathlib.Path, into: pathlib.Path, name: str
) -> pathlib.Path:
  """Renames `folder` to `into/name` (or `name-2`, ...); returns the target."""
  into.mkdir(parents=True, exist_ok=True)
  target, n = into / name, 1
  while target.exists():
    n += 1
    target = into / f"{name}-{n}"
  os.rename(folder, target)
  return target


def _barrier(name: str):
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def _manager(directory: pathlib.Path, keep: int, async_save: bool):
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
  )
  return ocp.CheckpointManager(directory, options=options, item_names=ITEMS)


class Checkpointer:
  """Saves and restores `latest` and `best` checkpoints of one workdir."""

  def __init__(self, workdir, keep: int = 3, async_save: bool = True):
    root = pathlib.Path(workdir) / "checkpoints"
    self.root = root
    self._keep, self._async_save = keep, async_save
    self._in_flight = {}  # id(manager) -> the step of its last save
    # A save that fails in orbax's thread prints those tracebacks at once,
    # before this thread hears of the failure: filtered from the start.
    _ignore_stale_loop_callbacks()
    self.latest = self._new_manager("latest")
    # The best checkpoint is written rarely: synchronous keeps it simple.
    self.best = self._new_manager("best")

  def _new_manager(self, which: str):
    if which == "latest":
      return _manager(self.root / "latest", self._keep, self._async_save)
    return _manager(self.root / "best", 1, False)

  def _reopen(self, which: str):
    """A fresh manager for `which` (orbax caches the list of steps)."""
    self._mgr(which).close()
    setattr(self, which, self._new_manager(which))

  def _save(self, manager, step, state, data_state, config_dict, meta):
    with self._saving(manager, step):
      saved = manager.save(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardSave(state),
              data=ocp.args.JsonSave(data_state),
              config=ocp.args.JsonSave(config_dict),
              meta=ocp.args.JsonSave(meta),
          ),
      )
    self._in_flight[id(manager)] = step
    if not saved:  # orbax skips a step not newer than its newest: say so
      logging.warning(
          "Checkpoint step %d was not written to %s (it holds steps %s).",
          step,
          manager.directory,
          sorted(manager.all_steps()),
      )

  def save_latest(self, step: int, state, data_state, config_dict, meta):
    self._save(self.latest, step, state, data_state, config_dict, meta)

  def save_best(self, step: int, state, data_state, config_dict, meta):
    """Saves the new best checkpoint, replacing the previous one.

    A previous best at this step or a later one (a resumed run that reached
    a better score the second time, e.g. on a nondeterministic GPU) is moved
    aside to `checkpoints/superseded/` while the new one is written, then
    removed, as orbax removes an older best once the new one is complete.
    """
    self._wait(self.latest)
    newer = sorted(s for s in self.best.all_steps() if s >= step)
    moved = []
    if newer:
      if jax.process_index() == 0:
        moved = [
            _move_aside(
                self.root / "best" / str(s),
                self.root / "superseded",
                f"best-{s}-{_utc_stamp()}",
            )
            for s in newer
        ]
      _barrier(f"best_set_aside_{step}")
      self._reopen("best")
    self._save(self.best, step, state, data_state, config_dict, meta)
    self._wait(self.best)
    for folder in moved:
      shutil.rmtree(folder, ignore_errors=True)

  @contextlib.contextmanager
  def _saving(self, manager, step):
    """A failed save (a full disk, a file system gone read-only) as one
    `CheckpointError` naming the folder; orbax's own report of it goes to
    the log (`logs`). The checkpoints saved before it are intact: orbax
    commits a save by renaming its temporary folder when complete."""
    try:
      yield
    except Exception as e:  # pylint: disable=broad-except
      if isinstance(e, (CheckpointError, interrupts.Interrupted)):
        raise
      _ignore_stale_loop_callbacks()
      step = self._in_flight.pop(id(manager), step)
      raise CheckpointError(
          f"{pathlib.Path(manager.directory)}: saving the checkpoint at step "
          f"{step} failed ({brief_error(e)}); the earlier checkpoints are "
          "intact (a rerun resumes from the newest)"
      ) from e

  def _wait(self, manager):
    with self._saving(manager, self._in_flight.get(id(manager))):
      manager.wait_until_finished()
    self._in_flight.pop(id(manager), None)

  def wait(self):
    self._wait(self.latest)
    self._wait(self.best)

  def close(self):
    self.latest.close()
    self.best.close()

  def steps(self, which: str = "latest") -> list:
    return sorted(self._mgr(which).all_steps())

  def _mgr(self, which: str):
    if which not in ("latest", "best"):
      raise ValueError(
          f"checkpoint kind must be 'latest' or 'best', got {which!r}"
      )
    return self.latest if which == "latest" else self.best

  def restore(
      self,
      abstract_state,
      which: str = "latest",
      step: Optional[int] = None,
      *,
      set_aside_unreadable: bool = False,
      sharding=None,
  ) -> Optional[dict]:
    """Restores the newest readable checkpoint (or `step`) of `which`.

    Returns a dict with `state`, `data`, `config`, `meta` and `step`, or None
    when there is no checkpoint. The restored state holds the top-level
    entries the checkpoint holds, whether or not `abstract_state` (a dict)
    names them: an entry it names that was not saved is left out, one it
    does not name comes back as saved, placed like `abstract_state`'s
    leaves (e.g. a run that switched an option with its own state on or off
    between resumes; the caller decides what to do). A checkpoint that fails to read is skipped
    with a one-line warning in favour of the one before it; with
    `set_aside_unreadable` (training, which will write those steps again)
    process 0 also moves each skipped folder to `checkpoints/unreadable/`
    (every process must then call this together). An explicitly requested
    `step` that fails, or a kind none of whose checkpoints can be read,
    raises a CheckpointError naming the folder (nothing is moved).

    `abstract_state=None` restores the state as saved (its shapes and
    dtypes from the checkpoint's metadata, placed with `sharding`): for a
    reader of the parameters, who builds no optimizer (`restore.py`); the
    optimizer state then comes back as plain containers of arrays.
    """
    manager = self._mgr(which)
    steps = sorted(manager.all_steps(), reverse=True)
    if step is not None:
      if step not in steps:
        raise CheckpointError(
            f"{self.root / which}: no checkpoint at step {step} "
            f"(available: {sorted(steps)})"
        )
      steps = [step]
    unreadable = []
    for s in steps:
      try:
        if abstract_state is None:
          target = _saved_abstract(self.root / which / str(s), sharding)
        else:
          target = _fit_to_saved(abstract_state, self.root / which / str(s))
        restored = manager.restore(
            s,
            args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target),
                data=ocp.args.JsonRestore(),
                config=ocp.args.JsonRestore(),
                meta=ocp.args.JsonRestore(),
            ),
        )
      except Exception as e:  # pylint: disable=broad-except
        _ignore_stale_loop_callbacks()
        where = self.root / which / str(s)
        if not where.exists():  # removed meanwhile (another run's rotation)
          if step is not None:
            raise CheckpointError(
                f"{where}: the checkpoint was removed while it was read"
            ) from e
          logging.warning(
              "Checkpoint %s was removed while read; skipped.", where
          )
          continue
        if step is not None:
          raise CheckpointError(
              f"{where}: unreadable checkpoint ({brief_error(e)})"
          ) from e
        unreadable.append((s, e))
        continue
      if unreadable:
        self._skip_unreadable(which, unreadable, s, set_aside_unreadable)
      out = {k: restored[k] for k in ITEMS}
      out["step"] = s
      return out
    if unreadable:
      raise CheckpointError(
          f"{self.root / which}: none of the checkpoints {sorted(steps)} "
          f"could be read (step {steps[0]}: {brief_error(unreadable[0][1])}); "
          "nothing was moved or deleted"
      )
    return None

  def _skip_unreadable(
      self, which: str, unreadable: list, used: int, set_aside: bool
  ):
    """One warning line per unreadable step; moves them aside if asked."""
    moved = {}
    if set_aside and jax.process_index() == 0:
      for s, _ in unreadable:
        moved[s] = _move_aside(
            self.root / which / str(s),
            self.root.parent / UNREADABLE_DIR,
            f"{which}-{s}-{_utc_stamp()}",
        )
    for s, e in unreadable:
      where = self.root / which / str(s)
      action = (
          f"moved it to {moved[s]}"
          if s in moved
          else "left it in place"
          if not set_aside
          else "process 0 moves it"
      )
      logging.warning(
          "Checkpoint %s is unreadable (%s); %s; using step %d.",
          where,
          brief_error(e),
          action,
          used,
      )
    if set_aside:
      _barrier(f"unreadable_set_aside_{which}")
      self._reopen(which)


def best_meta(workdir) -> Optional[dict]:
  """The `meta` of the best checkpoint of a workdir, without its state."""
  mgr = _manager(pathlib.Path(workdir) / "checkpoints" / "best", 1, False)
  try:
    steps = mgr.all_steps()
    if not steps:
      return None
    return mgr.restore(
        max(steps), args=ocp.args.Composite(meta=ocp.args.JsonRestore())
    )["meta"]
  finally:
    mgr.close()


def read_config_dict(
    workdir, which: str = "latest", step: Optional[int] = None
) -> tuple[int, dict]:
  """The config saved with a checkpoint: (step, config dict)."""
  mgr = _manager(pathlib.Path(workdir) / "checkpoints" / which, 1, False)
  try:
    steps = sorted(mgr.all_steps())
    if not steps:
      raise CheckpointError(
          f"{pathlib.Path(workdir) / 'checkpoints' / which}: no checkpoints "
          "(has this workdir been trained?)"
      )
    s = steps[-1] if step is None else step
    if s not in steps:
      raise CheckpointError(
          f"{pathlib.Path(workdir) / 'checkpoints' / which}: no checkpoint at "
          f"step {s} (available: {steps})"
      )
    return (
        s,
        mgr.restore(s, args=ocp.args.Composite(config=ocp.args.JsonRestore()))[
            "config"
        ],
    )
  finally:
    mgr.close()


def saved_state_keys(state_dir) -> Optional[set]:
  """The top-level entries of a saved `state` item (None if unreadable)."""
  handler = ocp.StandardCheckpointHandler()
  try:
    return set(handler.metadata(pathlib.Path(state_dir)).tree.keys())
  except Exception:  # pylint: disable=broad-except
    return None  # the restore itself then reports what is wrong
  finally:
    handler.close()


def _saved_abstract(step_dir: pathlib.Path, sharding):
  """The abstract state saved in `step_dir`, from its metadata."""
  metadata = ocp.StandardCheckpointHandler().metadata(
      epath.Path(step_dir / "state")
  )
  return jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
      metadata,
  )


def _fit_to_saved(abstract_state, step_dir: pathlib.Path):
  """`abstract_state` (a dict) with exactly the top-level entries the
  checkpoint at `step_dir` holds (orbax restores only an identical tree):
  entries it does not hold are dropped; entries the caller did not name
  take their shapes and dtypes from the checkpoint's metadata and the
  sharding of the caller's first leaf."""
  if not isinstance(abstract_state, dict):
    return abstract_state
  saved = saved_state_keys(step_dir / "state")
  if saved is None:
    return abstract_state  # the restore itself then reports what is wrong
  target = {k: v for k, v in abstract_state.items() if k in saved}
  missing = saved - set(target)
  if missing:
    leaves = jax.tree.leaves(abstract_state)
    sharding = getattr(leaves[0], "sharding", None) if leaves else None
    metadata = _saved_abstract(step_dir, sharding)
    target.update({k: metadata[k] for k in missing})
  return target
