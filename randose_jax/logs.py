"""Console logging of the command-line tools.

orbax-checkpoint logs every save and restore step at INFO (hundreds of lines
for the demo), and JAX logs its failed TPU probe; `quiet_library_logs` keeps
their warnings and errors and drops their INFO lines from the console, so
that this library's own lines (data, steps, validation scores, resuming)
stay readable. Set RANDOSE_VERBOSE_LIBRARIES=1 to see everything.

`console_warnings_only` goes further for the command-line tools: they print
their progress on stdout, so the console log (stderr) keeps warnings and
errors only, and a failed command's stderr is its one error line. Pass
`--verbosity=0` (or set RANDOSE_VERBOSE_LIBRARIES) to see the INFO lines.
"""

import logging as py_logging
import os

from absl import logging

# Source paths whose records below WARNING are dropped.
QUIET_PATHS = ("/orbax/", "/jax/_src/xla_bridge.py")


class QuietLibraries(py_logging.Filter):
  """Drops records below WARNING that come from QUIET_PATHS."""

  def filter(self, record: py_logging.LogRecord) -> bool:
    if record.levelno >= py_logging.WARNING:
      return True
    path = (record.pathname or "").replace("\\", "/")
    return not any(p in path for p in QUIET_PATHS)


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
    return
  logging.set_verbosity(logging.WARNING)
