"""Progress on stderr (issue 24 item 2): `progress.Counter` counts each
patient done as it is done: a live line where stderr is a terminal, one
plain line per patient elsewhere, with done / total, the rate and the time
left."""

import io
import logging
import re
import sys
import threading
import time

import pytest

from randose_jax import progress
from randose_jax.data import openkbp

# One plain line (written here, independently of randose_jax/progress.py).
LINE = re.compile(
    r"(?P<label>[\w -]+): (?P<k>\d+)/(?P<n>\d+) (?P<name>\S+) done, "
    r"(?P<each>\d+(\.\d+)?) s/patient, "
    r"(about \d+(\.\d)? (s|min|h) left|\d+(\.\d)? (s|min|h) in all)"
)


class FakeTerminal(io.StringIO):
  """A stream that says it is a terminal."""

  def isatty(self):
    return True


def plain_lines(text: str) -> list[re.Match]:
  """The progress lines of `text`; every line of it must be one."""
  lines = text.splitlines()
  found = [LINE.fullmatch(l) for l in lines]
  assert all(found), text
  return found


def assert_counts(text: str, label: str, names: list[str]) -> None:
  """`text` is one line per patient of `names`, in order, counted 1..n,
  the last one with the time in all, the others with the time left."""
  found = plain_lines(text)
  n = len(names)
  assert [m["label"] for m in found] == [label] * n, text
  assert [(int(m["k"]), int(m["n"])) for m in found] == [
      (k, n) for k in range(1, n + 1)
  ], text
  assert [m["name"] for m in found] == names, text
  assert all(m.group().endswith("left") for m in found[:-1]), text
  assert found[-1].group().endswith("in all"), text


def assert_live(text: str, label: str, n: int) -> None:
  """`text` is a live line redrawn in place (carriage returns), ended by
  one newline when closed, and no plain line. (A stream without a size is
  given 80 columns: the end of a long line is cut.)"""
  assert "\r" in text and text.endswith("\n"), repr(text)
  assert text.count("\n") == 1, repr(text)
  last = text.rstrip("\n").split("\r")[-1]
  assert last.startswith(f"{label}: {n}/{n} |"), repr(last)
  assert "elapsed, 00:00 left, " in last, repr(last)  # the rest may be cut
  assert not any(LINE.fullmatch(l) for l in text.splitlines()), repr(text)


# ------------------------------------------------------------ the counter


class Clock:
  """A clock moved by hand: exact rates and times left."""

  def __init__(self):
    self.now = 100.0

  def __call__(self):
    return self.now


def test_plain_lines_say_done_total_rate_and_time_left():
  stream, clock = io.StringIO(), Clock()
  with progress.Counter("evaluate", 6, stream=stream, clock=clock) as counter:
    for k, seconds in enumerate((30, 50, 43, 41, 40, 43), start=1):
      clock.now += seconds
      counter.done(f"pt_20{k}")
  assert stream.getvalue().splitlines() == [
      "evaluate: 1/6 pt_201 done, 30 s/patient, about 2 min left",
      "evaluate: 2/6 pt_202 done, 40 s/patient, about 3 min left",
      "evaluate: 3/6 pt_203 done, 41 s/patient, about 2 min left",
      "evaluate: 4/6 pt_204 done, 41 s/patient, about 82 s left",
      "evaluate: 5/6 pt_205 done, 40.8 s/patient, about 41 s left",
      "evaluate: 6/6 pt_206 done, 41.2 s/patient, 4 min in all",
  ]
  assert_counts(
      stream.getvalue(), "evaluate", [f"pt_20{k}" for k in range(1, 7)]
  )


def test_durations_and_rates():
  assert [progress.duration(s) for s in (0, 89, 91, 5399, 5400, 9000)] == [
      "0 s",
      "89 s",
      "2 min",
      "90 min",
      "1.5 h",
      "2.5 h",
  ]
  assert [
      progress.seconds_each(s) for s in (0, 2e-5, 0.3125, 41.25, 412.4)
  ] == [
      "0",
      "0.00002",
      "0.312",
      "41.2",
      "412",
  ]


@pytest.mark.parametrize(
    "mode,stream_type,want",
    [
        (None, io.StringIO, "lines"),  # a log file, a pipe
        (None, FakeTerminal, "live"),
        (False, FakeTerminal, "lines"),  # --progress=false on a terminal
        (True, io.StringIO, "live"),  # --progress elsewhere
        ("off", FakeTerminal, "off"),
    ],
)
def test_modes(mode, stream_type, want):
  stream = stream_type()
  with progress.Counter("x", 2, mode, stream=stream) as counter:
    assert counter.mode == want
    counter.done("pt_1")
    counter.done("pt_2")
  text = stream.getvalue()
  if want == "lines":
    assert_counts(text, "x", ["pt_1", "pt_2"])
  elif want == "live":
    assert_live(text, "x", 2)
  else:
    assert text == ""
  with pytest.raises(ValueError, match="progress='bar'"):
    progress.resolve("bar")


def test_nothing_to_count_prints_nothing():
  stream = FakeTerminal()
  with progress.Counter("cache x", 0, stream=stream) as counter:
    assert counter.mode == "off"
  assert stream.getvalue() == ""


class SlowStream(io.StringIO):
  """Gives the other threads a chance in the middle of every write."""

  def write(self, text):
    time.sleep(0.0005)
    return super().write(text)


def test_threads_count_each_patient_once_and_in_order():
  stream = SlowStream()
  names = [f"pt_{i}" for i in range(1, 121)]

  def clock():
    time.sleep(0.0002)  # between reading the count and writing its line
    return time.monotonic()

  with progress.Counter("x", len(names), stream=stream, clock=clock) as c:
    threads = [
        threading.Thread(
            target=lambda part: [c.done(n) for n in part], args=(names[i::6],)
        )
        for i in range(6)
    ]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  found = plain_lines(stream.getvalue())
  assert [int(m["k"]) for m in found] == list(range(1, 121))
  assert sorted(m["name"] for m in found) == sorted(names)
  assert c.count == 120


def test_live_line_shows_the_step_and_keeps_log_lines_whole():
  """A log record (absl's handler on the root logger, in a command) and
  the command's own lines are printed above the live line."""
  stream = FakeTerminal()
  handler = logging.StreamHandler(stream)
  root = logging.getLogger()
  root.addHandler(handler)
  try:
    with progress.Counter("evaluate", 2, stream=stream) as counter:
      progress.doing("pt_1: gamma")
      logging.getLogger("tests.test_progress").warning("pt_1: a warning")
      with counter.outside():
        print("pt_1: max 70.1 Gy", file=stream)
      counter.done("pt_1")
      counter.done("pt_2")
    assert handler.stream is stream  # given back
  finally:
    root.removeHandler(handler)
  text = stream.getvalue()
  assert "pt_1: gamma" in text
  # The line is cleared (\r, spaces, \r) before each line printed above it.
  assert re.search(r"\r +\rpt_1: a warning\n", text), repr(text)
  assert re.search(r"\r +\rpt_1: max 70.1 Gy\n", text), repr(text)
  for line in ("pt_1: a warning\n", "pt_1: max 70.1 Gy\n"):
    text = text.replace(line, "")
  assert_live(text, "evaluate", 2)


def test_a_failing_patient_is_not_counted_and_the_line_is_ended():
  stream = FakeTerminal()
  with pytest.raises(openkbp.DataError):
    with progress.Counter("evaluate", 3, stream=stream) as counter:
      counter.done("pt_1")
      raise openkbp.DataError("pt_2.csv: bad")
  text = stream.getvalue()
  assert text.endswith("\n") and text.count("\n") == 1, repr(text)
  assert text.split("\r")[-1].startswith("evaluate: 1/3 |"), repr(text)
  lines = io.StringIO()
  with pytest.raises(openkbp.DataError):
    with progress.Counter("evaluate", 3, False, stream=lines) as counter:
      counter.done("pt_1")
      raise openkbp.DataError("pt_2.csv: bad")
  assert [m["k"] for m in plain_lines(lines.getvalue())] == ["1"]
