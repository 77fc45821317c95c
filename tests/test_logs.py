"""The command-line tools' console filter."""

import logging as py_logging

from absl import logging

from randose_jax import logs


def _record(path, level):
  return py_logging.LogRecord("absl", level, path, 1, "message", (), None)


def test_library_lines_are_dropped_from_the_console():
  f = logs.QuietLibraries()
  orbax = "/site-packages/orbax/checkpoint/_src/checkpoint_manager.py"
  assert not f.filter(_record(orbax, py_logging.INFO))
  assert not f.filter(_record(orbax, py_logging.DEBUG))
  assert not f.filter(_record(orbax, py_logging.WARNING))
  assert not f.filter(_record(orbax, py_logging.ERROR))
  assert not f.filter(
      _record("/site-packages/jax/_src/xla_bridge.py", py_logging.INFO)
  )
  # This library's own lines stay.
  assert f.filter(
      _record("/work/randose_jax/training/train.py", py_logging.INFO)
  )


def test_quiet_library_logs_installs_once_and_obeys_the_environment(
    monkeypatch,
):
  handler = logging.get_absl_handler()
  before = list(handler.filters)
  try:
    monkeypatch.setenv("RANDOSE_VERBOSE_LIBRARIES", "1")
    logs.quiet_library_logs()
    assert handler.filters == before
    monkeypatch.delenv("RANDOSE_VERBOSE_LIBRARIES")
    logs.quiet_library_logs()
    logs.quiet_library_logs()
    added = [f for f in handler.filters if isinstance(f, logs.QuietLibraries)]
    assert len(added) == 1
  finally:
    handler.filters[:] = before


def test_library_warnings_go_to_the_log_file(tmp_path):
  path = tmp_path / "library.log"
  logs.library_log(tmp_path / "missing-folder" / "library.log")  # ignored
  root = py_logging.getLogger()
  orbax = "/site-packages/orbax/checkpoint/_src/checkpoint_manager.py"
  handler = [h for h in root.handlers if isinstance(h, logs._LibraryLog)]
  handler[0].handle(_record(orbax, py_logging.WARNING))  # no error
  logs.library_log(path)
  try:
    (handler,) = [h for h in root.handlers if isinstance(h, logs._LibraryLog)]
    handler.handle(_record(orbax, py_logging.WARNING))
    handler.handle(_record(orbax, py_logging.INFO))
    handler.handle(
        _record("/work/randose_jax/training/train.py", py_logging.ERROR)
    )
    handler.flush()
    lines = path.read_text().splitlines()
    assert len(lines) == 1 and "orbax" in lines[0], lines
  finally:
    root.removeHandler(handler)
    handler.close()
