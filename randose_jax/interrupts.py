"""Ctrl-C (SIGINT) and SIGTERM (preemption): stop cleanly, say so in one line.

Python's default turns SIGINT into a `KeyboardInterrupt` raised wherever the
main thread happens to be (in a garbage-collection callback of XLA, in the
middle of a checkpoint save: tracebacks by the hundred, even a segfault)
and leaves SIGTERM to kill the process at once. Here both go through one
handler, installed by `cli.call_main` (every command) and by
`train.train_and_evaluate`:

- Outside a `deferred()` block the first signal raises `Interrupted` at
  once: the command's staged and atomic outputs are discarded as for any
  failure, and `cli` prints the exception's one line and exits 128 + the
  signal number (130 for SIGINT, 143 for SIGTERM).
- Inside `deferred()` (the training loop, predict's model work) the signal
  is only recorded; the code polls `requested()` / `check()` at points
  where stopping is safe (training: the next step boundary, after saving a
  checkpoint).
- A second SIGINT exits at once (status 130), whatever is running.

Nothing here imports JAX (`evaluate` starts without it).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from typing import Iterator

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupted(Exception):
  """A command stopped by a signal; `exit_code` is 128 + the signal."""

  def __init__(self, signum: int, message: str = ""):
    self.signum = signum
    name = signal.Signals(signum).name
    super().__init__(message or f"interrupted by {name}")

  @property
  def exit_code(self) -> int:
    return 128 + self.signum

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.signum).name


_STATE = {"signum": 0, "defer": 0, "installed": 0, "previous": {}}


def requested() -> int:
  """The signal received so far (0: none)."""
  return _STATE["signum"]


def check(message: str = "") -> None:
  """Raises `Interrupted` if a signal was received."""
  if _STATE["signum"]:
    raise Interrupted(_STATE["signum"], message)


def _handler(signum, frame):  # pylint: disable=unused-argument
  if _STATE["signum"]:
    if signum == signal.SIGINT:  # the second Ctrl-C: at once
      os.write(2, b"interrupted again: exiting now\n")
      os._exit(128 + signal.SIGINT)  # pylint: disable=protected-access
    return
  _STATE["signum"] = signum
  if not _STATE["defer"]:
    raise Interrupted(signum)


@contextlib.contextmanager
def handled(signals=SIGNALS) -> Iterator[None]:
  """Routes `signals` to this module's handler during the block (nested
  blocks share the outer one's). Only the main thread can install signal
  handlers: elsewhere (a test's thread, a notebook kernel thread) the
  block changes nothing."""
  if threading.current_thread() is not threading.main_thread():
    defer = _STATE["defer"]
    try:
      yield
    finally:
      _STATE["defer"] = defer
    return
  if not _STATE["installed"]:
    _STATE["signum"] = 0
    _STATE["previous"] = {s: signal.signal(s, _handler) for s in signals}
  _STATE["installed"] += 1
  defer = _STATE["defer"]
  try:
    yield
  finally:
    _STATE["installed"] -= 1
    _STATE["defer"] = defer
    if not _STATE["installed"]:
      for s, previous in _STATE["previous"].items():
        signal.signal(s, previous)
      _STATE["previous"] = {}
      _STATE["signum"] = 0


def defer() -> None:
  """From now until the enclosing `handled()` block ends, a signal is
  recorded, not raised (see `deferred`)."""
  _STATE["defer"] += 1


@contextlib.contextmanager
def deferred(signals=SIGNALS) -> Iterator[None]:
  """Within the block a signal is recorded, not raised: poll `requested()`
  or `check()`."""
  with handled(signals):
    _STATE["defer"] += 1
    try:
      yield
    finally:
      _STATE["defer"] -= 1


def ignore_signals(*unused) -> None:
  """SIGINT and SIGTERM ignored from now on in this process: a worker
  process's init (grain's `worker_init_fn`), whose parent stops it."""
  for s in SIGNALS:
    signal.signal(s, signal.SIG_IGN)


@contextlib.contextmanager
def ignored_in_children() -> Iterator[None]:
  """SIGINT and SIGTERM ignored while the block starts worker processes:
  an ignored signal stays ignored in a child (fork, and exec too, where
  Python then installs no KeyboardInterrupt handler), so Ctrl-C sent to
  the process group reaches only the parent, which stops its workers
  itself (no worker tracebacks, no leaked shared memory)."""
  if threading.current_thread() is not threading.main_thread():
    yield
    return
  previous = {s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS}
  try:
    yield
  finally:
    for s, handler in previous.items():
      signal.signal(s, handler)


class Polling:
  """`inner` whose `methods` first `check()` for a signal: e.g. a predictor
  whose every round of patients can be where a validation stops."""

  def __init__(self, inner, *methods: str):
    self._inner = inner
    self._methods = methods

  def __getattr__(self, name):
    value = getattr(self._inner, name)
    if name in self._methods:

      def polled(*args, **kwargs):
        check()
        return value(*args, **kwargs)

      return polled
    return value
