"""Progress of the commands' patient loops, on stderr.

`evaluate`, `predict`, `dicom_import`, `data.transport` (pack, unpack,
check) and training's cache build go through their patients one at a time
and count each one done with a `Counter`:

- live: one line redrawn in place (tqdm): patients done / total, elapsed,
  time left, the rate, and what the patient at work is at (`doing`: e.g.
  "pt_203: gamma"). The time shown ticks every second, between patients
  too. Where stderr is a terminal (`--progress` forces it elsewhere).
- lines: one plain line per patient, flushed, when it is done:

    evaluate: 3/6 pt_203 done, 41.2 s/patient, about 2 min left
    evaluate: 6/6 pt_206 done, 41.2 s/patient, 4 min in all

  Where stderr is not a terminal (a log file, a pipe, a batch job), or
  with `--progress=false`.
- off: nothing (library callers that want silence; training with
  `config.progress_bar=False`).

The rate is the wall time since the counter started over the patients done,
and the time left that rate times the patients still to do. Counting is
thread-safe (a `Counter` may be handed to worker threads). A patient that
fails is not counted; the live line is closed (left as it was, ended with a
newline) so the command's `error:` line that follows starts a line of its
own. While the live line is up, log records written to the same stream,
and what the command prints inside `Counter.outside()`, appear above it
instead of through it.
"""

from __future__ import annotations

import contextlib
import logging as py_logging
import os
import sys
import threading
import time
from typing import Iterator, TextIO, Union

# None: live where the stream is a terminal, else lines; True: live;
# False: lines; or one of MODES by name.
Mode = Union[bool, None, str]
MODES = ("live", "lines", "off")
# Seconds between redraws of the live line when no patient finishes.
REFRESH_S = 1.0

_active: list["Counter"] = []  # open counters, innermost last
_active_lock = threading.Lock()


def resolve(mode: Mode, stream: TextIO | None = None) -> str:
  """'live', 'lines' or 'off' for `mode` on `stream` (default stderr)."""
  if mode is None:
    stream = sys.stderr if stream is None else stream
    return "live" if _isatty(stream) else "lines"
  if mode is True:
    return "live"
  if mode is False:
    return "lines"
  if mode in MODES:
    return mode
  raise ValueError(
      f"progress={mode!r}: choose None (auto), True, False or one of {MODES}"
  )


def _isatty(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError, OSError):  # closed, or no isatty
    return False


def _size_known(stream) -> bool:
  """Whether `stream` is a terminal that reports its size."""
  try:
    size = os.get_terminal_size(stream.fileno())
  except (AttributeError, ValueError, OSError):  # no file descriptor
    return False
  return size.columns > 0 and size.lines > 0


def duration(seconds: float) -> str:
  """'40 s', '7 min', '2.5 h'."""
  seconds = max(0.0, float(seconds))
  if seconds < 90:
    return f"{seconds:.0f} s"
  if seconds < 90 * 60:
    return f"{seconds / 60:.0f} min"
  return f"{seconds / 3600:.1f} h"


def seconds_each(seconds: float) -> str:
  """Three significant digits, never in exponent notation: '41.2',
  '0.312', '412'."""
  if seconds >= 100:
    return f"{seconds:.0f}"
  text = f"{seconds:.3g}"
  return f"{seconds:.6f}".rstrip("0").rstrip(".") if "e" in text else text


def doing(text: str) -> None:
  """Shows `text` as what the innermost open counter's patient is at (the
  live line only; nothing without an open counter)."""
  with _active_lock:
    counter = _active[-1] if _active else None
  if counter is not None:
    counter.doing(text)


class _AboveLine:
  """A log handler's stream while a live line is up: each record is
  written above the line (the line cleared, then drawn again)."""

  def __init__(self, stream, counter: "Counter"):
    self._stream = stream
    self._counter = counter

  def write(self, text):
    with self._counter.outside():
      result = self._stream.write(text)
      self._stream.flush()
    return result

  def flush(self):
    self._stream.flush()

  def __eq__(self, other):  # absl compares its handler's stream to stderr
    return other is self or other == self._stream

  def __hash__(self):
    return hash(self._stream)

  def __getattr__(self, name):
    return getattr(self._stream, name)


class Counter:
  """Counts `total` patients done under `label` (see the module doc).

  with progress.Counter("evaluate", len(pairs), mode) as counter:
    for ...:
      counter.doing(f"{name}: gamma")   # live line only
      ...
      counter.done(name)
  """

  def __init__(
      self,
      label: str,
      total: int,
      mode: Mode = None,
      *,
      stream: TextIO | None = None,
      unit: str = "patient",
      clock=time.monotonic,
  ):
    self.label = label
    self.total = int(total)
    self.unit = unit
    self._stream = sys.stderr if stream is None else stream
    self.mode = resolve(mode, self._stream) if self.total > 0 else "off"
    self._clock = clock
    self._start = clock()
    self._count = 0
    self._lock = threading.RLock()
    self._closed = False
    self._bar = None
    self._wake = threading.Event()
    self._refresher = None
    self._handlers = []  # (handler, its own stream) while the line is up
    if self.mode == "live":
      self._open_live()
    with _active_lock:
      _active.append(self)

  @property
  def count(self) -> int:
    """Patients done so far."""
    return self._count

  # ------------------------------------------------------------- events

  def done(self, name: str) -> None:
    """Patient `name` is done: the next count, on the live line or as one
    line. Safe from any thread."""
    with self._lock:
      if self._closed:
        return
      self._count += 1
      if self.mode == "lines":
        self._stream.write(self.line(self._count, name) + "\n")
        self._stream.flush()
      elif self.mode == "live":
        self._bar.set_postfix_str(f"{name} done", refresh=False)
        self._bar.update(1)

  def doing(self, text: str) -> None:
    """What the patient at work is at, on the live line (else nothing)."""
    with self._lock:
      if self.mode == "live" and not self._closed:
        self._bar.set_postfix_str(text, refresh=True)

  def line(self, count: int, name: str) -> str:
    """The plain line of patient `name`, the `count`-th done."""
    elapsed = max(0.0, self._clock() - self._start)
    each = elapsed / count
    text = (
        f"{self.label}: {count}/{self.total} {name} done, "
        f"{seconds_each(each)} s/{self.unit}, "
    )
    if count >= self.total:
      return text + f"{duration(elapsed)} in all"
    return text + f"about {duration(each * (self.total - count))} left"

  @contextlib.contextmanager
  def outside(self) -> Iterator[None]:
    """Lines printed (to stdout or stderr) inside this context appear above
    the live line, not through it."""
    if self.mode != "live" or self._closed:
      yield
      return
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    with self._lock, tqdm.external_write_mode(file=self._stream):
      yield

  # ------------------------------------------------------------ the line

  def _open_live(self) -> None:
    from tqdm import tqdm  # pylint: disable=g-import-not-at-top

    # The terminal's size, followed when it changes; a terminal that
    # reports none (0 x 0: tqdm would draw nothing) gets 80 x 24.
    known = _size_known(self._stream)
    self._bar = tqdm(
        total=self.total,
        desc=self.label,
        unit=self.unit,
        file=self._stream,
        dynamic_ncols=known,
        ncols=None if known else 80,
        nrows=None if known else 24,
        leave=True,
        smoothing=0,  # the mean since the start, as the plain lines
        # e.g. "evaluate: 3/6 |#####     | 02:03 elapsed, 02:03 left,
        # 41.20s/patient, pt_204: gamma"
        bar_format=(
            "{desc}: {n_fmt}/{total_fmt} |{bar:10}| {elapsed} elapsed, "
            "{remaining} left, {rate_fmt}{postfix}"
        ),
    )
    # Log records written to this stream go above the line.
    for handler in py_logging.getLogger().handlers:
      target = getattr(handler, "python_handler", handler)  # absl's
      if (
          isinstance(target, py_logging.StreamHandler)
          and getattr(target, "stream", None) is self._stream
      ):
        target.setStream(_AboveLine(self._stream, self))
        self._handlers.append((target, self._stream))
    self._refresher = threading.Thread(
        target=self._refresh, name=f"progress {self.label}", daemon=True
    )
    self._refresher.start()

  def _refresh(self) -> None:
    while not self._wake.wait(REFRESH_S):
      with self._lock:
        if self._closed:
          return
        self._bar.refresh()

  def close(self) -> None:
    """Ends the live line (left on the screen, with its newline); the
    counter counts no more."""
    with _active_lock:
      if self in _active:
        _active.remove(self)
    with self._lock:
      if self._closed:
        return
      self._closed = True
    self._wake.set()
    if self._refresher is not None:
      self._refresher.join()
    for handler, stream in self._handlers:
      handler.setStream(stream)
    self._handlers = []
    if self._bar is not None:
      self._bar.close()

  def __enter__(self) -> "Counter":
    return self

  def __exit__(self, *exc) -> None:
    self.close()
