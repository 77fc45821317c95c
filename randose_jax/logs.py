"""Console logging of the command-line tools.

orbax-checkpoint logs every save and restore step at INFO (hundreds of lines
for the demo), its warnings on a resume or a slow save, and a failed save
as error tracebacks from its threads; JAX logs its failed TPU probe.
`quiet_library_logs` keeps all of these off the console, so that this
library's own lines (data, steps, validation scores, resuming, one `error:`
line) stay readable; `library_log(path)` keeps their warnings and errors in
a file (training: `<workdir>/library.log`). `--verbosity` on the command
line, or RANDOSE_VERBOSE_LIBRARIES=1, shows them again.

`console_warnings_only` goes further for the command-line tools: they print
their results on stdout and their progress through the patients on stderr
(`progress.py`: a live line on a terminal, else one line per patient), so
the console log (stderr) keeps warnings and errors only, and a failed
command's stderr ends with its one error line (after the progress lines of
the patients done before it failed). Pass `--verbosity=0` (or set
RANDOSE_VERBOSE_LIBRARIES) to see the INFO lines; while the live progress
line is up, log lines are written above it.
"""

import logging as py_logging
import os

from absl import logging

# Source paths whose records stay off the console.
# asyncio's: "Future exception was never retrieved" of orbax's writes after
# a failed save (this library runs no event loop of its own).
QUIET_PATHS = ("/orbax/", "/jax/_src/xla_bridge.py", "/asyncio/")
# Set when the command line asks for a verbosity: library lines shown.
_SHOW_LIBRARIES = []


def from_libraries(record: py_logging.LogRecord) -> bool:
  path = (record.pathname or "").replace("\\", "/")
  return any(p in path for p in QUIET_PATHS)


class QuietLibraries(py_logging.Filter):
  """Drops the records of QUIET_PATHS (every level: orbax's warnings and
  errors of a slow or failed save are in the log file, `library_log`, and
  the error that matters reaches the user as this library's one line),
  unless the command line chose a verbosity."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    return bool(_SHOW_LIBRARIES) or not from_libraries(record)


class _LibraryLog(py_logging.FileHandler):
  """The records of QUIET_PATHS, WARNING and above, appended to a file
  opened at the first record; a file that cannot be written is ignored."""

  def __init__(self, path):
    super().__init__(str(path), encoding="utf-8", delay=True)
    self.setLevel(py_logging.WARNING)
    self.addFilter(
        lambda r: r.levelno >= py_logging.WARNING and from_libraries(r)
    )
    self.setFormatter(
        py_logging.Formatter(
            "%(asctime)s %(levelname)s %(pathname)s: %(message)s"
        )
    )

  def emit(self, record):
    try:
      super().emit(record)
    except Exception:  # pylint: disable=broad-except
      pass  # no folder yet, a full disk: the log must not add a failure

  def handleError(self, record):
    pass


def library_log(path) -> None:
  """Sends the libraries' warnings and errors (orbax, JAX) to `path` (one
  file per process; replaces an earlier one)."""
  root = py_logging.getLogger()
  for handler in [h for h in root.handlers if isinstance(h, _LibraryLog)]:
    root.removeHandler(handler)
    handler.close()
  root.addHandler(_LibraryLog(path))


def quiet_library_logs() -> None:
  """Installs `QuietLibraries` on absl's handler (once), unless the
  environment sets RANDOSE_VERBOSE_LIBRARIES."""
  if os.environ.get("RANDOSE_VERBOSE_LIBRARIES"):
    return
  handler = logging.get_absl_handler()
  if not any(isinstance(f, QuietLibraries) for f in handler.filters):
    handler.addFilter(QuietLibraries())


def console_warnings_only(flag_values=None) -> None:
  """Sets the absl log verbosity to WARNING unless the command line chose a
  verbosity (`--verbosity` / `-v`) or the environment sets
  RANDOSE_VERBOSE_LIBRARIES."""
  if os.environ.get("RANDOSE_VERBOSE_LIBRARIES"):
    return
  if (
      flag_values is not None
      and "verbosity" in flag_values
      and (flag_values["verbosity"].present)
  ):
    _SHOW_LIBRARIES.append(True)
    return
  _SHOW_LIBRARIES.clear()
  logging.set_verbosity(logging.WARNING)
