"""One training run per workdir: an advisory lock held while the run lives.

`RunLock(workdir)` takes `fcntl.flock` on `<workdir>/.randose-run.lock`
before the run touches its cache or checkpoints, and writes the holder's
pid and host into the file. The lock dies with its process (the kernel
releases it on exit, SIGKILL included), so a lock file left by a killed run
is simply taken over; a run that finds the lock held refuses with one
`RunLockError` naming the holder (pid, host). The file is removed when the
run ends; a new workdir the lock created is removed again if it is empty.

Only process 0 of a multi-process run takes it (the others follow it).
flock is advisory and local to a host on some network file systems (NFS
without lock support): two hosts sharing a workdir over such a file system
are not protected.
"""

from __future__ import annotations

import errno
import fcntl
import os
import pathlib
import socket

LOCK_NAME = ".randose-run.lock"


class RunLockError(OSError):
  """The workdir is in use by another run (an OSError naming the workdir:
  the command-line tools print it as one `error:` line)."""


def holder_of(path: pathlib.Path) -> str:
  """`pid N on host H` as the lock file says (or 'another process')."""
  try:
    with open(path, "rb") as f:
      text = f.read(256).decode(errors="replace")
  except OSError:
    return "another process"
  facts = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
  if "pid" in facts:
    return f"pid {facts['pid']} on host {facts.get('host', '?')}"
  return "another process"


class RunLock:
  """`with RunLock(workdir):` the body runs as the workdir's only run."""

  def __init__(self, workdir, enabled: bool = True):
    self.workdir = pathlib.Path(workdir).expanduser()
    self.path = self.workdir / LOCK_NAME
    self.enabled = enabled
    self._fd = None
    self._created = []  # the workdir and parents this lock created

  def acquire(self) -> None:
    if not self.enabled:
      return
    p = self.workdir
    while not os.path.lexists(p):
      self._created.append(p)
      p = p.parent
    self.workdir.mkdir(parents=True, exist_ok=True)
    while True:
      fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        os.close(fd)
        if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
          raise
        self._undo_dir()
        raise RunLockError(
            errno.EBUSY,
            f"another training run uses this workdir "
            f"({holder_of(self.path)}; lock file {LOCK_NAME}); wait for it "
            f"to end or stop it, or choose another --workdir",
            str(self.workdir),
        ) from None
      # The holder before us may have removed the file while we waited to
      # open it: the lock must be on the file that is at the path now.
      try:
        same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same = False
      if same:
        break
      os.close(fd)
    os.ftruncate(fd, 0)
    os.write(fd, f"pid={os.getpid()}\nhost={socket.gethostname()}\n".encode())
    self._fd = fd

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.unlink(self.path)
    except OSError:
      pass
    os.close(self._fd)
    self._fd = None
    self._undo_dir()

  def _undo_dir(self) -> None:
    for folder in self._created:  # deepest first; only when left empty
      try:
        folder.rmdir()
      except OSError:
        break
    self._created = []

  def __enter__(self) -> RunLock:
    self.acquire()
    return self

  def __exit__(self, *exc) -> None:
    self.release()
