"""The user documentation names only what exists (issue 24 item 4).

README.md and docs/*.md, checked as a reader would follow them:

- every command (`randose-<name>`, `python -m randose_jax...`) is a command
  of this package: a console script of pyproject.toml, or a module whose
  `run` is a command's, with `main` and `define_flags`;
- every `--flag` written after a command is one of its flags (defined into
  a fresh `FlagValues` by its `define_flags`, or one of absl's own), and a
  `--config.a.b` override names a field of the config given by `--config=`
  (else of the default config). In a code block the flags are those of the
  command's line and its continued lines; in the text, those of the
  command's own backquoted span and of the spans after it that start with
  `--`, up to the next command, the next span naming another tool, or the
  end of the paragraph, table row or list item;
- every relative link resolves (to a file, and to a heading of a page for
  `#anchor`), and so does every repository path written in backquotes
  (`benchmarks/...`, `randose_jax/...`, ...).
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.util
import re
import sys
import tomllib
from pathlib import Path

from absl import flags
import pytest

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]

COMMAND = re.compile(
    r"(?<![\w/.-])(randose-[a-z]+(?:-[a-z]+)*)"
    r"|python3? -m (randose_jax(?:\.\w+)*)"
)
FLAG = re.compile(r"(?<![\w-])--([A-Za-z][\w.-]*)(\*?)")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
SPAN = re.compile(r"`([^`]+)`")
REPO_PATH = re.compile(
    r"(?:randose_jax|benchmarks|tests|configs|launch|docs|\.ci)/[\w./*-]*"
)
# absl's own flags (the help flags are defined by app.run itself).
ABSL_FLAGS = {"help", "helpshort", "helpfull", "helpxml"}


@dataclasses.dataclass
class Use:
  """A command as a page writes it, with the flags written after it."""

  page: Path
  line: int
  command: str  # as written: "randose-evaluate", "python -m randose_jax.main"
  module: str | None  # the command's module (console scripts resolved)
  flags: list[str]  # "--name=value" as written


# --------------------------------------------------------------- parsing


def _blocks(text: str):
  """(first line number, lines, is_code) of each fenced code block and of
  each run of text between them."""
  lines = text.splitlines()
  start, chunk, code = 1, [], False
  for number, line in enumerate(lines, 1):
    if line.lstrip().startswith("```"):
      yield start, chunk, code
      start, chunk, code = number + 1, [], not code
    else:
      chunk.append(line)
  yield start, chunk, code


def _code_lines(start: int, lines: list[str]):
  """(line number, text) of each command line, continued lines joined and
  shell comments dropped."""
  joined, first = "", None
  for number, line in enumerate(lines, start):
    line = re.sub(r"(^|\s)#.*$", "", line)
    first = number if first is None else first
    if line.rstrip().endswith("\\"):
      joined += line.rstrip()[:-1] + " "
      continue
    yield first, joined + line
    joined, first = "", None
  if first is not None:
    yield first, joined


def _text_items(start: int, lines: list[str]):
  """(line number, text) of each paragraph, table row and list item, its
  lines joined (a backquoted span may break across lines)."""
  item, first = [], None
  for number, line in enumerate(lines, start):
    stripped = line.strip()
    new = not stripped or re.match(r"(\||[-*] |\d+\. |#)", stripped)
    if new and item:
      yield first, " ".join(item)
      item, first = [], None
    if stripped:
      item.append(stripped)
      first = number if first is None else first
  if item:
    yield first, " ".join(item)


def _commands_in(text: str):
  """(start, end, name, module) of each command written in `text`; `module`
  None for a console script that pyproject.toml does not define."""
  for m in COMMAND.finditer(text):
    if text[m.end() : m.end() + 2] == ".<":  # python -m randose_jax.cli.<name>
      continue
    if m.group(1):
      script = console_scripts().get(m.group(1))
      module = script.split(":")[0] if script else None
      yield m.start(), m.end(), m.group(1), module
    else:
      yield m.start(), m.end(), m.group(0), m.group(2)


def _flags_in(text: str) -> list[str]:
  return [
      m.group(0) for m in re.finditer(r"(?<![\w-])--[A-Za-z][^\s\]|`)]*", text)
  ]


def uses_on(page: Path) -> list[Use]:
  """Every command written on `page`, with its flags."""
  found = []
  for start, lines, code in _blocks(page.read_text()):
    if code:
      for number, text in _code_lines(start, lines):
        commands = list(_commands_in(text))
        for i, (_, end, name, module) in enumerate(commands):
          stop = commands[i + 1][0] if i + 1 < len(commands) else len(text)
          found.append(
              Use(page, number, name, module, _flags_in(text[end:stop]))
          )
      continue
    for number, text in _text_items(start, lines):
      current = None
      for span in SPAN.findall(text):
        commands = list(_commands_in(span))
        if commands:
          for i, (_, end, name, module) in enumerate(commands):
            stop = commands[i + 1][0] if i + 1 < len(commands) else len(span)
            current = Use(page, number, name, module, [])
            current.flags += _flags_in(span[end:stop])
            found.append(current)
        elif current is not None and span.startswith("--"):
          current.flags += _flags_in(span)
        elif FLAG.search(span):
          current = None  # another tool's flags (pip, a benchmark script)
  return found


# ------------------------------------------------------------- commands


@functools.cache
def console_scripts() -> dict[str, str]:
  with open(REPO / "pyproject.toml", "rb") as f:
    return tomllib.load(f)["project"]["scripts"]


@functools.cache
def command_module(module: str):
  """The module holding the command that `python -m module` runs (a
  forwarding module such as randose_jax.main: that of its `run`)."""
  found = importlib.import_module(module)
  if not hasattr(found, "define_flags") and hasattr(found, "run"):
    found = sys.modules[found.run.__module__]
  return found


@functools.cache
def defined_flags(module: str) -> flags.FlagValues:
  flag_values = flags.FlagValues()
  command_module(module).define_flags(flag_values)
  return flag_values


@functools.cache
def absl_flags() -> frozenset[str]:
  names = set(ABSL_FLAGS)
  for module, defined in flags.FLAGS.flags_by_module_dict().items():
    if module.startswith("absl."):
      for flag in defined:
        names.add(flag.name)
        if flag.short_name:
          names.add(flag.short_name)
  return frozenset(names)


@functools.cache
def load_config(given: str | None):
  """The config a `--config=` value names (a file of this repository, with
  its variants); the default config when none or a placeholder is given."""
  from randose_jax import default_config

  path, _, variants = (given or "").partition(":")
  if not path or not (REPO / path).is_file():
    return default_config.get_default_config()
  spec = importlib.util.spec_from_file_location(
      f"docs_config_{abs(hash(given))}", REPO / path
  )
  config_module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(config_module)
  try:
    return config_module.get_config(*([variants] if variants else []))
  except ValueError:  # a placeholder variant (`:rowN`): the file's base
    return config_module.get_config()


def flag_problem(use: Use, written: str) -> str | None:
  """What is wrong with `written` (`--name[=value]`) after `use`, or None."""
  name = written[2:].split("=", 1)[0]
  defined = defined_flags(use.module)
  if name.endswith("*"):  # --report_tolerance_*: a family of flags
    if any(n.startswith(name[:-1]) for n in defined):
      return None
    return f"no flag starts with --{name[:-1]}"
  if name in defined or name in absl_flags():
    return None
  if name.startswith("no") and name[2:] in defined:
    return None if defined[name[2:]].boolean else f"--{name[2:]} is no bool"
  head, _, field = name.partition(".")
  if (
      field
      and head in defined
      and hasattr(type(defined[head]), "config_filename")
  ):
    given = next(
        (f.split("=", 1)[1] for f in use.flags if f.startswith(f"--{head}=")),
        None,
    )
    config = load_config(given)
    for part in field.split("."):
      if not hasattr(config, "keys") or part not in config:
        return f"the config ({given or 'default'}) has no field {field!r}"
      config = config[part]
    return None
  return f"{use.command} has no flag --{name}"


def all_uses() -> list[Use]:
  return [use for page in PAGES for use in uses_on(page)]


def _name(page: Path) -> str:
  return str(page.relative_to(REPO)) if page.is_relative_to(REPO) else str(page)


def _where(use: Use) -> str:
  return f"{_name(use.page)}:{use.line}"


def test_every_command_named_exists():
  uses = all_uses()
  assert len({u.command for u in uses}) >= 8, "the parser found too little"
  problems = []
  for use in uses:
    if use.module is None:
      problems.append(f"{_where(use)}: {use.command}: no such console script")
      continue
    try:
      module = command_module(use.module)
    except ImportError as e:
      problems.append(f"{_where(use)}: {use.command}: {e}")
      continue
    for needed in ("main", "define_flags"):
      if not hasattr(module, needed):
        problems.append(f"{_where(use)}: {use.command}: no {needed}()")
  assert not problems, "\n".join(problems)


def test_every_flag_written_after_a_command_is_its_own():
  uses = [u for u in all_uses() if u.module is not None]
  assert sum(len(u.flags) for u in uses) >= 50, "the parser found too little"
  problems = []
  for use in uses:
    for written in use.flags:
      problem = flag_problem(use, written)
      if problem:
        problems.append(f"{_where(use)}: {written}: {problem}")
  assert not problems, "\n".join(problems)


# ---------------------------------------------------------------- links


def github_anchor(heading: str) -> str:
  """The anchor GitHub gives a heading."""
  return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
  found = set()
  for _, lines, code in _blocks(page.read_text()):
    if not code:
      for line in lines:
        m = re.match(r"#{1,6} (.+)", line)
        if m:
          found.add(github_anchor(m.group(1)))
  return found


def link_problems(page: Path) -> list[str]:
  problems = []
  for start, lines, code in _blocks(page.read_text()):
    if code:
      continue
    for number, text in _text_items(start, lines):
      for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target):
          continue  # https:, mailto:
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        where = f"{_name(page)}:{number}: {target}"
        if not resolved.exists():
          problems.append(f"{where}: no such file")
        elif anchor and resolved.suffix == ".md":
          if anchor not in anchors(resolved):
            problems.append(f"{where}: no such heading")
      for span in SPAN.findall(text):
        for token in span.split():
          m = REPO_PATH.fullmatch(token.rstrip(".,;:"))
          if m and not list(REPO.glob(m.group(0).rstrip("/"))):
            problems.append(f"{_name(page)}:{number}: {token}: no such path")
  return problems


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_links_and_paths_resolve(page):
  problems = link_problems(page)
  assert not problems, "\n".join(problems)


# ------------------------------------------- the checks catch a mistake


def test_the_checks_catch_planted_mistakes(tmp_path):
  """A misspelt command, flag, override field, link and path, each caught."""
  page = tmp_path / "docs" / "page.md"
  page.parent.mkdir()
  page.write_text(
      "Run `randose-evaluate --reference=DIR --predictons=DIR`, then\n"
      "`randose-evalute --json=F`.\n\n"
      "```bash\n"
      "python -m randose_jax.main --config=configs/openkbp.py:smoke \\\n"
      "    --config.data.rooot=DIR --workdir=W\n"
      "```\n\n"
      "See [training](training.md) and `benchmarks/no_such_script.py`.\n"
  )
  uses = uses_on(page)
  assert [u.command for u in uses] == [
      "randose-evaluate",
      "randose-evalute",
      "python -m randose_jax.main",
  ]
  assert uses[1].module is None
  assert flag_problem(uses[0], "--reference=DIR") is None
  assert "no flag --predictons" in flag_problem(uses[0], "--predictons=DIR")
  assert flag_problem(uses[2], "--workdir=W") is None
  assert "no field 'data.rooot'" in flag_problem(uses[2], uses[2].flags[1])
  assert flag_problem(uses[2], "--config.data.root=DIR") is None
  problems = link_problems(page)
  assert any("training.md: no such file" in p for p in problems), problems
  assert any("no_such_script.py: no such path" in p for p in problems)
