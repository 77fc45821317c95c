"""fileio.undo_new_files: what a failed block leaves behind."""

import pytest

from randose_jax import fileio


def test_undo_removes_what_the_block_created_and_keeps_the_rest(tmp_path):
  root = tmp_path / "work"
  (root / "old").mkdir(parents=True)
  (root / "old" / "a.txt").write_text("mine")
  with pytest.raises(RuntimeError, match="boom"):
    with fileio.undo_new_files(root):
      (root / "old" / "b.txt").write_text("new")
      (root / "new" / "deep").mkdir(parents=True)
      (root / "new" / "deep" / "c.txt").write_text("new")
      raise RuntimeError("boom")
  assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == [
      "old",
      "old/a.txt",
  ]
  assert (root / "old" / "a.txt").read_text() == "mine"


def test_undo_removes_a_root_it_created(tmp_path):
  root = tmp_path / "a" / "b"
  with pytest.raises(RuntimeError):
    with fileio.undo_new_files(root):
      root.mkdir(parents=True)
      (root / "x").write_text("x")
      raise RuntimeError("boom")
  assert not (tmp_path / "a").exists()


def test_undo_never_removes_kept_paths(tmp_path):
  """What the block moved under a kept folder (a user's unreadable
  checkpoint) survives the undo, and so do the folders that hold it."""
  root = tmp_path / "work"
  original = root / "checkpoints" / "latest" / "4"
  original.mkdir(parents=True)
  (original / "state").write_bytes(b"garbled")
  with pytest.raises(KeyboardInterrupt):
    with fileio.undo_new_files(root, keep=("checkpoints/unreadable",)):
      aside = root / "checkpoints" / "unreadable" / "latest-4-x"
      aside.parent.mkdir(parents=True)
      original.rename(aside)
      (root / "checkpoints" / "latest" / "6").mkdir()
      (root / "cache").mkdir()
      raise KeyboardInterrupt
  assert (aside / "state").read_bytes() == b"garbled"
  assert not (root / "checkpoints" / "latest" / "6").exists()
  assert not (root / "cache").exists()


def test_a_kept_path_that_never_appeared_keeps_no_empty_folders(tmp_path):
  root = tmp_path / "work"
  with pytest.raises(RuntimeError):
    with fileio.undo_new_files(root, keep=("checkpoints/unreadable",)):
      (root / "checkpoints" / "latest").mkdir(parents=True)
      raise RuntimeError("boom")
  assert not root.exists()


def test_stale_staging_folders_of_the_same_kind_are_removed(tmp_path):
  """A `predict --overwrite` killed mid-way leaves its staging folder: the
  next one removes it, and only what is surely stale."""
  import subprocess  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top

  gone = subprocess.run(
      [sys.executable, "-c", "import os; print(os.getpid())"],
      capture_output=True,
      text=True,
      check=True,
  )
  dead_pid = int(gone.stdout)
  tag = fileio._host_tag()  # pylint: disable=protected-access
  prefix = fileio.STAGING_PREFIX
  stale = tmp_path / f"{prefix}predict-p{dead_pid}-h{tag}-abc123"
  keep = [
      tmp_path / f"{prefix}evaluate-p{dead_pid}-h{tag}-abc123",  # other kind
      tmp_path / f"{prefix}predict-p1-h{tag}-abc123",  # pid 1 lives
      tmp_path / f"{prefix}predict-p{dead_pid}-h00000000-abc123",  # other host
      tmp_path / f"{prefix}abc123",  # an older version's: no creator
  ]
  for folder in [stale, *keep]:
    folder.mkdir()
    (folder / "pt_1.csv").write_text("half-written\n")
  with fileio.StagedOutput(kind="predict") as stage:
    stage.path(tmp_path / "out" / "pt_1.csv").write_text("new\n")
    assert not stale.exists()
  assert all(folder.is_dir() for folder in keep)
  assert (tmp_path / "out" / "pt_1.csv").read_text() == "new\n"
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      ["out", *(p.name for p in keep)]
  )
