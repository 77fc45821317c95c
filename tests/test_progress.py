"""Progress on stderr (issue 24 item 2): the commands that go through
patients (evaluate with or without --clinical / --report, predict,
dicom_import, the cache builds of training and of `transport unpack`, and
`transport pack` / `check`) count each patient done as it is done: a live
line where stderr is a terminal (or with --progress), one plain line per
patient elsewhere (or with --progress=false), with done / total, the rate
and the time left."""

import io
import logging
import re
import sys
import threading
import time
import types

import numpy as np
import pytest

from randose_jax.scoring import clinical
from randose_jax.scoring import cohort
from randose_jax.cli import predict
from randose_jax.inference import predict_folders
from randose_jax import progress
from randose_jax.data import cache as cache_lib
from randose_jax.data import openkbp
from randose_jax.data import phantoms
from randose_jax.data import prepare
from randose_jax.data import transport
from randose_jax.default_config import get_default_config
from tests.test_evaluation import write_predictions
from tests.test_fault_table import run_in_process

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


# ------------------------------------------------------------- evaluate


@pytest.fixture
def folders(phantom_split, tmp_path):
  preds = tmp_path / "predictions"
  write_predictions(phantom_split, preds)
  return phantom_split, preds


NAMES = ["pt_1", "pt_2", "pt_3", "pt_4"]  # phantom_split's patients


@pytest.mark.parametrize("read_ahead", [0, 2])
def test_evaluate_folders_prints_each_patient_when_done(
    folders, read_ahead, capsys
):
  seen = []  # stderr written before each patient's on_patient
  capsys.readouterr()
  cohort.evaluate_folders(
      *folders,
      read_ahead=read_ahead,
      on_patient=lambda p, d: seen.append(capsys.readouterr().err),
  )
  last = capsys.readouterr().err
  assert seen[0] == ""
  for k in range(1, 4):  # just the patient before, counted
    assert [m["name"] for m in plain_lines(seen[k])] == [NAMES[k - 1]]
  assert_counts("".join(seen) + last, "evaluate", NAMES)


def test_evaluate_folders_on_a_terminal_is_live(folders, monkeypatch):
  terminal = FakeTerminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  cohort.evaluate_folders(*folders)
  monkeypatch.undo()
  assert_live(terminal.getvalue(), "evaluate", 4)
  assert "patient/s, pt_4" in terminal.getvalue()  # (80 columns)


@pytest.mark.parametrize("flag", [[], ["--progress=false"]])
def test_evaluate_command_one_line_per_patient(folders, flag, capfd):
  reference, preds = folders
  code, out, err = run_in_process(
      "evaluate",
      [f"--reference={reference}", f"--predictions={preds}", *flag],
      capfd,
  )
  assert code == 0, err
  assert out.startswith("dose score: ")
  assert_counts(err, "evaluate", NAMES)


def test_evaluate_command_progress_true_is_live_elsewhere(folders, capfd):
  reference, preds = folders
  code, _, err = run_in_process(
      "evaluate",
      [f"--reference={reference}", f"--predictions={preds}", "--progress"],
      capfd,
  )
  assert code == 0, err
  assert_live(err, "evaluate", 4)


def test_evaluate_clinical_and_report_count_each_patient_after_its_steps(
    folders, tmp_path, monkeypatch, capfd
):
  """Each patient's line comes after its clinical metrics (and report
  part), before the next patient's: within the run, not at its end."""
  reference, preds = folders
  seen = []  # (patient, stderr since the previous clinical step)
  real = clinical.ClinicalEvaluator.add

  def add(self, patient, dose):
    seen.append((patient.patient_id, capfd.readouterr().err))
    return real(self, patient, dose)

  monkeypatch.setattr(clinical.ClinicalEvaluator, "add", add)
  code, _, err = run_in_process(
      "evaluate",
      [
          f"--reference={reference}",
          f"--predictions={preds}",
          f"--clinical={tmp_path / 'clinical'}",
          f"--report={tmp_path / 'report.html'}",
          "--gamma=false",
          "--progress=false",
      ],
      capfd,
  )
  assert code == 0, err
  assert [p for p, _ in seen] == NAMES
  assert seen[0][1] == ""
  for k in range(1, 4):
    assert [m["name"] for m in plain_lines(seen[k][1])] == [NAMES[k - 1]]
  assert_counts("".join(e for _, e in seen) + err, "evaluate", NAMES)
  assert (tmp_path / "report.html").is_file()


def test_evaluate_failure_keeps_the_lines_then_one_error(folders, capfd):
  reference, preds = folders
  (preds / "pt_3.csv").write_text("0,1.0\nbroken\n")
  code, _, err = run_in_process(
      "evaluate", [f"--reference={reference}", f"--predictions={preds}"], capfd
  )
  assert code == 2, err
  *counted, last = err.splitlines()
  assert last.startswith(f"error: {preds / 'pt_3.csv'}"), err
  assert [m["name"] for m in plain_lines("\n".join(counted))] == NAMES[:2]


# ---------------------------------------------------------------- predict


class _Predictor:
  """Stands in for a model: the possible-dose mask at 60 Gy."""

  def predict_doses(self, patients, tta):
    del tta
    return [np.where(p.possible_dose_mask, 60.0, 0.0) for p in patients]


FAKE_RUN = types.SimpleNamespace(
    config=None, predictor=_Predictor(), which="latest", step=4, uses_ema=False
)


def test_predict_patients_prints_each_patient_when_done(
    phantom_split, tmp_path, capsys
):
  seen = []  # (stdout line, stderr before it)
  capsys.readouterr()
  summary = predict_folders.predict_patients(
      FAKE_RUN,
      openkbp.list_patient_dirs(phantom_split),
      tmp_path / "out",
      log=lambda line: seen.append((line, capsys.readouterr().err)),
  )
  last = capsys.readouterr().err
  assert summary["num_patients"] == 4
  assert [line.split(":")[0] for line, _ in seen] == NAMES
  assert seen[0][1] == ""
  for k in range(1, 4):
    assert [m["name"] for m in plain_lines(seen[k][1])] == [NAMES[k - 1]]
  assert_counts("".join(e for _, e in seen) + last, "predict", NAMES)


@pytest.mark.parametrize("flag", [[], ["--progress=false"], ["--progress"]])
def test_predict_command(phantom_split, tmp_path, flag, monkeypatch, capfd):
  monkeypatch.setattr(predict.restore, "check_workdir", lambda w: w)
  monkeypatch.setattr(
      predict.restore, "restore_from_workdir", lambda *a, **k: FAKE_RUN
  )
  code, out, err = run_in_process(
      "predict",
      [
          f"--workdir={tmp_path / 'run'}",
          f"--patients={phantom_split}",
          f"--output={tmp_path / 'out'}",
      ]
      + flag,
      capfd,
  )
  assert code == 0, err
  for name in NAMES:  # the patient's own line stays on stdout
    assert f"\n{name}: max 60.00 Gy" in out, out
  if flag == ["--progress"]:
    assert_live(err, "predict", 4)
  else:
    assert_counts(err, "predict", NAMES)


# ----------------------------------------------------------- dicom_import


def test_dicom_import_command(tmp_path, capfd):
  from randose_jax.dicom import synthetic  # pylint: disable=g-import-not-at-top

  for seed, pid in enumerate(("SYN001", "SYN002")):
    synthetic.write_patient(
        tmp_path / "dicom" / pid,
        shape=(12, 72, 72),
        spacing=(3.0, 2.2, 2.2),
        seed=seed,
        patient_id=pid,
    )
  names = ["pt_SYN001", "pt_SYN002"]
  for k, flag in enumerate(([], ["--progress=false"], ["--progress"])):
    code, out, err = run_in_process(
        "dicom_import",
        [
            f"--input={tmp_path / 'dicom'}",
            f"--output={tmp_path / f'out{k}'}",
            "--grid_shape=24,24,12",
            *flag,
        ],
        capfd,
    )
    assert code == 0, err
    assert "2 patient folder(s) written" in out
    if flag == ["--progress"]:
      assert_live(err, "dicom_import", 2)
    else:
      assert_counts(err, "dicom_import", names)


# ------------------------------------------------------------ the caches


def test_build_cache_counts_the_patients_it_builds(
    phantom_split, tmp_path, capsys
):
  dirs = openkbp.list_patient_dirs(phantom_split)
  folder = tmp_path / "train-pats"
  data = get_default_config().data
  warnings = []
  logger = logging.getLogger("tests.test_progress.cache")
  logger.propagate = False
  handler = logging.Handler()
  handler.emit = lambda record: warnings.append(record.getMessage())
  logger.addHandler(handler)
  try:
    capsys.readouterr()
    cache_lib.build_cache(dirs, folder, data, logger)
    assert_counts(capsys.readouterr().err, "cache train-pats", NAMES)
    cache_lib.build_cache(dirs, folder, data, logger)  # all reused
    assert capsys.readouterr().err == ""  # nothing to count
    next(folder.glob("pt_3-*.npz")).unlink()
    cache_lib.build_cache(dirs, folder, data, logger, progress=False)
    assert_counts(capsys.readouterr().err, "cache train-pats", ["pt_3"])
  finally:
    logger.removeHandler(handler)
    logger.propagate = True
  assert len(warnings) == 1 and "rebuilding it" in warnings[0], warnings


@pytest.mark.parametrize("progress_bar", [True, False])
def test_training_cache_build_follows_progress_bar(
    progress_bar, tmp_path, capsys
):
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top

  config = tiny_config(progress_bar=progress_bar)
  capsys.readouterr()
  train_cache, eval_cache, _ = prepare.prepare_data(config, tmp_path)
  err = capsys.readouterr().err
  if not progress_bar:
    assert err == ""
    return
  lines = err.splitlines()
  n_train, n_eval = len(train_cache), len(eval_cache)
  assert_counts(
      "\n".join(lines[:n_train]), "cache train-pats", train_cache.patient_ids
  )
  assert_counts(
      "\n".join(lines[n_train:]),
      "cache validation-pats",
      eval_cache.patient_ids,
  )
  assert len(lines) == n_train + n_eval


def test_transport_commands(tmp_path, capfd):
  root = tmp_path / "root"
  phantoms.write_phantoms(root / "train-pats", 3, grid=16, seed=0)
  phantoms.write_phantoms(
      root / "validation-pats", 1, grid=16, seed=1, first_id=4
  )
  archive = tmp_path / "a.rdt"
  both = [
      "train-pats/pt_1",
      "train-pats/pt_2",
      "train-pats/pt_3",
      "validation-pats/pt_4",
  ]
  code, _, err = run_in_process(
      "transport",
      ["pack", f"--root={root}", f"--archive={archive}"],
      capfd,
  )
  assert code == 0, err
  assert_counts(err, "pack", both)
  code, _, err = run_in_process(
      "transport",
      [
          "unpack",
          f"--archive={archive}",
          f"--cache_dir={tmp_path / 'c'}",
          "--progress=false",
      ],
      capfd,
  )
  assert code == 0, err
  lines = err.splitlines()
  assert_counts(
      "\n".join(lines[:3]), "unpack train-pats", ["pt_1", "pt_2", "pt_3"]
  )
  assert_counts("\n".join(lines[3:]), "unpack validation-pats", ["pt_4"])
  code, out, err = run_in_process(
      "transport",
      ["check", f"--archive={archive}", f"--root={root}"],
      capfd,
  )
  assert code == 0, err
  assert "4 patients equal to the CSVs" in out
  assert_counts(err, "check", both)


def test_unpack_to_cache_on_a_terminal_is_live(tmp_path, monkeypatch):
  root = tmp_path / "root"
  phantoms.write_phantoms(root / "train-pats", 2, grid=16, seed=0)
  transport.pack(
      root, tmp_path / "a.rdt", splits=["train-pats"], progress="off"
  )
  terminal = FakeTerminal()
  monkeypatch.setattr(sys, "stderr", terminal)
  transport.unpack_to_cache(
      tmp_path / "a.rdt", tmp_path / "c", get_default_config().data
  )
  monkeypatch.undo()
  assert_live(terminal.getvalue(), "unpack train-pats", 2)
