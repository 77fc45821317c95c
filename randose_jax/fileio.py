"""Output files that never leave a failed command's folders half-written.

Four mechanisms, one each, shared by the command-line tools and the trainer:

- `atomic_path` / `atomic_output`: one file (or folder) written under a
  hidden temporary name beside it and renamed onto it when complete; a
  reader never sees it half-written and a failure leaves it as it was.

- `check_output_file` / `check_output_dir`: before any work, is this output
  path usable (its folder creatable and writable, not a file where a folder
  is needed, not already holding an output unless `overwrite`)? The error
  names the path the user gave, in the seconds before a long computation
  rather than after it.
- `StagedOutput`: files are written into hidden staging folders beside
  their destinations and moved into place together at the end; a failure
  removes the staging folders, so the destinations are as they were.
- `undo_new_files(root)`: on an exception, removes whatever appeared under
  `root` during the block (and `root` itself, and its parents, if the block
  created them): e.g. a cache half-built from a bad patient.

Each raises `OSError` subclasses whose `filename` is the user's path.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import shutil
import socket
import tempfile
import zlib
from pathlib import Path
from typing import BinaryIO, Iterator, Sequence

STAGING_PREFIX = ".randose-staging-"


def _oserror(code: int, message: str, path) -> OSError:
  """An OSError (the subclass of `code`) with `filename` = path."""
  return OSError(code, message, str(path))


@contextlib.contextmanager
def atomic_path(
    path: str | os.PathLike, *, overwrite: bool = False, suffix: str = ""
) -> Iterator[Path]:
  """Yields a temporary path beside `path` (ending in `suffix`, for writers
  that go by the extension); renames what the block wrote there (a file or
  a folder) onto `path` when it succeeds.

  A reader never sees a half-written `path`, and a failure leaves it as it
  was. With overwrite=False an existing `path` is refused
  (FileExistsError), before and when renaming, so nothing earlier is ever
  replaced by accident. An OSError of the temporary file is reported under
  `path`, the name the caller knows.
  """
  path = Path(path)
  exists = f"{path}: already exists; pass overwrite=True to replace it"
  if os.path.lexists(path) and not overwrite:
    raise FileExistsError(exists)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(
      f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp{suffix}"
  )
  try:
    yield tmp
    if overwrite or tmp.is_dir():
      os.replace(tmp, path)
    else:
      # A hard link fails if `path` appeared meanwhile: never clobbered.
      try:
        os.link(tmp, path)
      except FileExistsError:
        raise FileExistsError(exists) from None
      except OSError:  # a file system without hard links
        if os.path.lexists(path):
          raise FileExistsError(exists) from None
        os.replace(tmp, path)
  except OSError as e:
    if e.errno is None or e.filename not in (None, str(tmp)):
      raise
    raise OSError(e.errno, e.strerror or os.strerror(e.errno), str(path)) from e
  finally:
    if tmp.is_dir() and not tmp.is_symlink():
      shutil.rmtree(tmp, ignore_errors=True)
    elif os.path.lexists(tmp):
      tmp.unlink()


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike, *, overwrite: bool = False
) -> Iterator[BinaryIO]:
  """`atomic_path` opened for writing bytes, flushed to disk before the
  rename."""
  with atomic_path(path, overwrite=overwrite) as tmp:
    with open(tmp, "xb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())


def nearest_existing(path: Path) -> Path:
  """`path` or its nearest ancestor that exists."""
  path = Path(os.path.abspath(path))
  while not os.path.lexists(path):
    path = path.parent
  return path


def _check_creatable_under(path: Path, anchor: Path) -> None:
  """`path` can be created below `anchor` (its nearest existing ancestor):
  `anchor` is a folder we can create files in (probed with a file created
  and removed at once, which also catches read-only and special file
  systems, and root's permissions, that `os.access` would miss)."""
  if not anchor.is_dir():
    raise _oserror(
        errno.ENOTDIR,
        f"cannot create it: {anchor} is a file, not a folder",
        path,
    )
  try:
    fd, probe = tempfile.mkstemp(prefix=".randose-probe-", dir=anchor)
  except OSError as e:
    raise _oserror(
        e.errno or errno.EACCES,
        f"cannot write in {anchor} ({e.strerror or e})",
        path,
    ) from e
  os.close(fd)
  os.unlink(probe)


def check_output_file(
    path,
    *,
    overwrite: bool = False,
    hint: str = "pass --overwrite to replace it",
) -> Path:
  """Raises an OSError naming `path` unless a file can be written there.

  An existing file is refused (FileExistsError) unless `overwrite`; an
  existing folder always is.
  """
  path = Path(path).expanduser()
  if path.is_dir():
    raise _oserror(errno.EISDIR, "is a folder, expected a file path", path)
  if os.path.lexists(path) and not overwrite:
    raise _oserror(errno.EEXIST, f"already exists ({hint})", path)
  _check_creatable_under(path, nearest_existing(path.parent))
  return path


def check_output_dir(path) -> Path:
  """Raises an OSError naming `path` unless it is (or can become) a folder
  we can write in."""
  path = Path(path).expanduser()
  if os.path.lexists(path) and not path.is_dir():
    raise _oserror(errno.ENOTDIR, "is a file, expected a folder", path)
  _check_creatable_under(path, nearest_existing(path))
  return path


def _host_tag() -> str:
  return f"{zlib.crc32(socket.gethostname().encode()):08x}"


_STAGING_NAME = re.compile(
    re.escape(STAGING_PREFIX) + r"([a-z_]+)-p(\d+)-h([0-9a-f]{8})-"
)


def new_staging_dir(anchor, kind: str) -> Path:
  """A new hidden staging folder in `anchor` whose name says its kind and
  its creator (pid, host), so that `remove_stale_staging` can tell."""
  return Path(
      tempfile.mkdtemp(
          prefix=f"{STAGING_PREFIX}{kind}-p{os.getpid()}-h{_host_tag()}-",
          dir=anchor,
      )
  )


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def remove_stale_staging(anchor, kind: str) -> list[Path]:
  """Removes the staging folders of `kind` in `anchor` whose creating
  process (on this host) is gone; returns them. Folders of other kinds,
  other hosts, live processes, or without a creator in their name (older
  versions) are left alone."""
  removed = []
  try:
    names = os.listdir(anchor)
  except OSError:
    return removed
  for name in names:
    m = _STAGING_NAME.match(name)
    if not m or m.group(1) != kind or m.group(3) != _host_tag():
      continue
    if int(m.group(2)) == os.getpid() or _alive(int(m.group(2))):
      continue
    path = Path(anchor) / name
    if path.is_dir() and not path.is_symlink():
      shutil.rmtree(path, ignore_errors=True)
      removed.append(path)
  return removed


class StagedOutput:
  """Output files written under temporary names, moved into place together.

    with fileio.StagedOutput() as stage:
      folder = stage.dir(output_dir)     # write output_dir's files here
      write_zip(stage.path(zip_path))    # write zip_path's content here
    # only now do output_dir/* and zip_path exist (created or replaced)

  The staging folders are hidden folders (`.randose-staging-<kind>-p<pid>-
  h<host>-*`, `new_staging_dir`) in each destination's nearest existing
  ancestor, on its file system, so the final moves are renames. An
  exception in the block removes them and changes nothing at the
  destinations; folders of the same `kind` left there by a killed process
  (its pid gone from this host) are removed when a new one is made.
  """

  def __init__(self, kind: str = "out"):
    self.kind = kind
    self._stages: dict[Path, Path] = {}  # anchor -> staging folder
    self._files: list[tuple[Path, Path]] = []  # (staged, final)
    self._dirs: list[tuple[Path, Path]] = []  # (staged folder, final folder)

  def _stage_near(self, final: Path) -> Path:
    anchor = nearest_existing(final)
    if anchor not in self._stages:
      remove_stale_staging(anchor, self.kind)
      self._stages[anchor] = new_staging_dir(anchor, self.kind)
    return self._stages[anchor]

  def path(self, final) -> Path:
    """Where to write the content of the file `final`."""
    final = Path(os.path.abspath(Path(final).expanduser()))
    name = f"f{len(self._files)}-{final.name}"
    staged = self._stage_near(final.parent) / name
    self._files.append((staged, final))
    return staged

  def dir(self, final) -> Path:
    """A folder whose files become files of the folder `final`."""
    final = Path(os.path.abspath(Path(final).expanduser()))
    staged = self._stage_near(final) / f"d{len(self._dirs)}-{final.name}"
    staged.mkdir()
    self._dirs.append((staged, final))
    return staged

  def commit(self) -> None:
    moves = [(s, f) for s, f in self._files if os.path.lexists(s)]
    for staged, final in self._dirs:
      moves += [(p, final / p.name) for p in sorted(staged.iterdir())]
    for staged, final in moves:
      final.parent.mkdir(parents=True, exist_ok=True)
      os.replace(staged, final)
    for staged, final in self._dirs:
      final.mkdir(parents=True, exist_ok=True)  # an output folder, if empty
    self.discard()

  def discard(self) -> None:
    for stage in self._stages.values():
      shutil.rmtree(stage, ignore_errors=True)
    self._stages.clear()

  def final_path(self, path) -> Path | None:
    """The destination of a staged path (None if `path` is not staged)."""
    path = Path(path)
    for staged, final in self._files:
      if path == staged:
        return final
    for staged, final in self._dirs:
      if path == staged or staged in path.parents:
        return final / path.relative_to(staged)
    return None

  def __enter__(self) -> StagedOutput:
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is None:
      self.commit()
      return
    self.discard()
    if (
        isinstance(exc, OSError)
        and exc.filename is not None
        and (exc.errno is not None)
    ):
      final = self.final_path(exc.filename)
      if final is not None:  # name the user's path, not the staged one
        raise _oserror(
            exc.errno, exc.strerror or os.strerror(exc.errno), final
        ) from exc


def _tree(root: Path) -> set[str]:
  """Relative paths of everything under `root` (links not followed)."""
  found = set()
  for folder, dirs, files in os.walk(root):
    rel = os.path.relpath(folder, root)
    for name in dirs + files:
      found.add(os.path.normpath(os.path.join(rel, name)))
  return found


@contextlib.contextmanager
def undo_new_files(
    root, enabled: bool = True, keep: Sequence[str] = ()
) -> Iterator[None]:
  """On an exception in the block, removes what it created under `root`.

  Files and folders that did not exist under `root` when the block began
  are removed (files first, then the folders, deepest first), and so are
  `root` and the ancestors the block created. Files that existed are left
  as they are (replaced contents are not restored: use atomic writes).
  Paths under `keep` (relative to `root`), and the folders that hold them,
  are never removed: e.g. `checkpoints/unreadable`, where an unreadable
  checkpoint of the user's is moved during the block.
  """
  root = Path(os.path.abspath(Path(root).expanduser()))
  kept = tuple(os.path.normpath(k) for k in keep)

  def is_kept(rel: str) -> bool:
    return any(
        rel == k
        or rel.startswith(k + os.sep)
        or (k.startswith(rel + os.sep) and os.path.lexists(root / k))
        for k in kept
    )

  if not enabled:
    yield
    return
  created = []  # root and its missing ancestors, deepest first
  p = root
  while not os.path.lexists(p):
    created.append(p)
    p = p.parent
  before = _tree(root) if root.is_dir() else set()
  try:
    yield
  except BaseException:
    if root.is_dir():
      new = sorted(
          (r for r in _tree(root) - before if not is_kept(r)),
          key=lambda r: r.count(os.sep),
          reverse=True,
      )
      for rel in new:
        path = root / rel
        if path.is_dir() and not path.is_symlink():
          shutil.rmtree(path, ignore_errors=True)
        else:
          with contextlib.suppress(FileNotFoundError):
            path.unlink()
    for path in created:
      with contextlib.suppress(OSError):
        path.rmdir()  # only when empty
    raise
