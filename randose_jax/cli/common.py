"""What every command-line tool shares: flags in, one error line out.

  if __name__ == "__main__":
    define_flags()
    cli.run(main)

`run` is `absl.app.run` with these differences, the same for `main`,
`predict`, `evaluate`, `export` and `summary`:

- `--help` (`-h`, `--helpshort`, `--helpfull`) prints the usage and exits 0.
- A flag or config problem (an unknown flag, a bad value, a missing or
  broken `--config` file, an override of a field the config does not have)
  is one line on stderr, `error: --flag=value: problem`, exit status 2.
- An error of the user's data or files while running (`DataError`,
  `CheckpointError`, `ConfigError`, `NonFiniteLossError`, `OSError`, a
  usage error) is one line on stderr, `error: <file>: <problem>`, exit
  status 2. Anything else is a bug and keeps its traceback.
- SIGINT (Ctrl-C) and SIGTERM stop the command (`interrupts`): one line
  on stderr, exit status 130 / 143, no output half-written (training saves
  a checkpoint first and says how to resume).
- The console shows warnings and errors of the logging; the results go to
  stdout, the progress through the patients to stderr (`progress.py`; a
  live line on a terminal, else one line per patient, also with
  `--progress=false`), before the error line of a command that fails.
  `--verbosity=0` (or RANDOSE_VERBOSE_LIBRARIES=1) shows the INFO log
  lines too.

`tests/helpers.py`'s `invoke` does the same in-process (tests).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Callable, Sequence

from absl import app
from absl import flags

from randose_jax import interrupts
from randose_jax import logs
from randose_jax.default_config import ConfigError

EXIT_ERROR = 2
HELP_FLAGS = ("-h", "-?", "--help", "--helpshort", "--helpfull", "--helpxml")

# The library's own error types, by module: a module that was never
# imported cannot have raised its error, so none is imported here (evaluate
# starts without jax).
_ERROR_TYPES = (
    ("randose_jax.data.openkbp", "DataError"),
    ("randose_jax.checkpointing", "CheckpointError"),
    ("randose_jax.training.train", "NonFiniteLossError"),
)


def user_errors() -> tuple[type[BaseException], ...]:
  """The exceptions that mean "bad input or output", not "a bug"."""
  found = [OSError, ConfigError, app.UsageError]
  for module, name in _ERROR_TYPES:
    if module in sys.modules:
      found.append(getattr(sys.modules[module], name))
  return tuple(found)


def _one_line(text: str) -> str:
  """A multi-line message as one line: a traceback by its last line, other
  lines joined with '; '."""
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  if any(l.startswith("Traceback") for l in lines):
    return lines[-1]
  return "; ".join(lines)


def error_line(e: BaseException) -> str:
  """`<file>: <problem>` for an OSError, else the message, on one line."""
  if isinstance(e, OSError) and e.filename is not None:
    text = f"{e.filename}: {e.strerror or e}"
    if e.filename2 is not None:
      text += f" (and {e.filename2})"
    return _one_line(text)
  if isinstance(e, app.UsageError):
    return f"{_one_line(str(e))} (see --help)"
  if isinstance(e, KeyError) and len(e.args) == 1:
    return _one_line(str(e.args[0]))
  return _one_line(str(e))


def fail(message: str) -> None:
  """Prints `error: message` on stderr and exits with status 2."""
  print(f"error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_ERROR)


# ------------------------------------------------------------ flag parsing


def _wanted_help(argv: Sequence[str]) -> bool:
  args = list(argv[1:])
  if "--" in args:
    args = args[: args.index("--")]
  return any(a in HELP_FLAGS or a.startswith("--helpfull") for a in args)


def _argument_of(argv: Sequence[str], name: str) -> str:
  """The text given for --name (`--name=v` or `--name v`), else ''."""
  args = list(argv[1:])
  for i, a in enumerate(args):
    if a.startswith(f"--{name}="):
      return a[len(name) + 3 :]
    if a == f"--{name}" and i + 1 < len(args):
      return args[i + 1]
  return ""


def _failing_flag(tb) -> flags.Flag | None:
  """The flag whose parsing raised: the outermost Flag method on the stack."""
  for frame, _ in traceback.walk_tb(tb):
    owner = frame.f_locals.get("self")
    if isinstance(owner, flags.Flag):
      return owner
  return None


def _override_of(argv, flag_name: str, key: str) -> str | None:
  """The override argument (`--config.a.b=v`) that names the field `key`."""
  for a in argv[1:]:
    name = a.split("=", 1)[0].lstrip("-")
    if name.startswith(f"{flag_name}.") and key in name.split(".")[1:]:
      return name
  return None


def _describe_parse_error(e: BaseException, argv) -> str:
  flag = _failing_flag(e.__traceback__)
  if isinstance(e, (AttributeError, KeyError)) and flag is not None:
    # An override of a field the config lacks, e.g. --config.data.rooot:
    # ml_collections raises AttributeError(KeyError("'rooot'\nDid you mean
    # ...")) while parsing --config; show its text unescaped, on one line.
    inner = e
    while inner.args and isinstance(inner.args[0], BaseException):
      inner = inner.args[0]
    text = str(inner.args[0] if inner.args else inner)
    lines = [l for l in text.splitlines() if l.strip()] or [text]
    name = _override_of(argv, flag.name, lines[0].strip("'\""))
    if name is not None:
      message = (
          f"--{name}: the {flag.name} has no field "
          f"{name.split('.', 1)[1]!r}"
      )
      if len(lines) > 1:
        message += "; " + lines[1][0].lower() + lines[1][1:]
      return message
    if "get_config" in text:
      given = _argument_of(argv, flag.name)
      return f"--{flag.name}={given}: no get_config() function in the file"
  if isinstance(e, flags.Error):
    # absl names the flag ("flag --x=y: problem"); a config file that raised
    # while loading comes with its traceback: keep the flag and the last line.
    lines = [l.strip() for l in str(e).splitlines() if l.strip()]
    if len(lines) > 1 and any(l.startswith("Traceback") for l in lines):
      head = lines[0].split(": Error whilst parsing config file")[0]
      return f"{head}: {lines[-1]}"
    return _one_line(str(e))
  if flag is not None:
    where = f"--{flag.name}={_argument_of(argv, flag.name)}"
    if isinstance(e, SyntaxError):
      return f"{where}: {e.filename}: line {e.lineno}: {e.msg}"
    return f"{where}: {type(e).__name__}: {_one_line(str(e))}"
  return _one_line(str(e))


def _check_config_files(argv, flag_values: flags.FlagValues) -> None:
  """Config flags whose file failed to load hold a placeholder that raises
  on first use: report them now, as one line."""
  for name in list(flag_values):
    flag = flag_values[name]
    if name != flag.name or type(flag.value).__name__ != "_ErrorConfig":
      continue
    given = _argument_of(argv, name)
    path = given.split(":", 1)[0]
    error = flag.value.__dict__.get("_error")
    if path and not os.path.exists(path):
      where = "" if path == given else f" {path}:"
      fail(f"--{name}={given}:{where} no such config file")
    fail(f"--{name}={given}: {_one_line(str(error))}")


def parse_flags(
    argv: Sequence[str], flag_values: flags.FlagValues = flags.FLAGS
) -> list[str]:
  """Parses argv into `flag_values`; returns the remaining arguments.

  `--help` exits 0 after the usage; any flag or config problem is one
  `error:` line and exit status 2.
  """
  try:
    return flag_values(list(argv))
  except SystemExit as e:
    if e.code == 1 and _wanted_help(argv):
      sys.exit(0)  # absl's help flags exit 1 after printing the usage
    raise
  except (
      flags.Error,
      AttributeError,
      KeyError,
      ValueError,
      TypeError,
      OSError,
      SyntaxError,
  ) as e:
    fail(_describe_parse_error(e, argv))
  raise AssertionError("unreachable")  # fail() exits


def _parse_and_check(argv, flag_values):
  rest = parse_flags(argv, flag_values)
  _check_config_files(argv, flag_values)
  return rest


def call_main(
    main: Callable,
    argv: Sequence[str],
    flag_values: flags.FlagValues = flags.FLAGS,
):
  """Runs `main(argv)`; the library's errors become one line, exit 2."""
  logs.console_warnings_only(flag_values)
  try:
    with interrupts.handled():
      return main(argv)
  except interrupts.Interrupted as e:
    print(interrupted_line(e), file=sys.stderr, flush=True)
    sys.exit(e.exit_code)
  except user_errors() as e:  # pylint: disable=catching-non-exception
    # ConfigErrors hold several problems: one `error:` line each.
    lines = [_one_line(p) for p in getattr(e, "problems", ())] or [
        error_line(e)
    ]
    for line in lines[:-1]:
      print(f"error: {line}", file=sys.stderr, flush=True)
    fail(lines[-1])


def interrupted_line(e: "interrupts.Interrupted") -> str:
  """The one line of a command stopped by a signal."""
  text = _one_line(str(e))
  if text == f"interrupted by {e.signal_name}":
    text += "; no output was left half-written"
  return text


def run(main: Callable) -> None:
  """`absl.app.run(main)` with the behaviour in this module's docstring.

  `--help` prints the command module's docstring as its usage, also when
  the process started elsewhere (a console script, `python -m
  randose_jax.main`)."""
  entry = sys.modules.get("__main__")
  command = sys.modules.get(getattr(main, "__module__", ""))
  if entry is not None and command is not None and entry is not command:
    entry.__doc__ = command.__doc__
  app.run(
      lambda argv: call_main(main, argv),
      flags_parser=lambda argv: _parse_and_check(argv, flags.FLAGS),
  )


def define_progress_flag(flag_values: flags.FlagValues) -> None:
  """`--progress`, the same on every command that counts patients
  (`randose_jax/progress.py`)."""
  flags.DEFINE_bool(
      "progress",
      None,
      "Show the progress on stderr as a live line (patients done / total, "
      "time left; default: where stderr is a terminal); false: one plain "
      "line per patient.",
      flag_values=flag_values,
  )
