"""Shared pytest fixtures: small synthetic patients and the shared OpenKBP data.

Keep this file small; fixtures used by one test file belong in that file.
"""

import os
import shutil
from pathlib import Path

import pytest

from randose_jax.data import phantoms


def openkbp_dir() -> Path:
  """The 26 shared OpenKBP patients: $RANDOSE_OPENKBP_DIR, else the `shared/openkbp`
  folder beside this checkout."""
  default = Path(__file__).resolve().parents[2] / "shared" / "openkbp"
  return Path(os.environ.get("RANDOSE_OPENKBP_DIR", default))


@pytest.fixture(scope="session")
def shared_openkbp() -> Path:
  """The shared OpenKBP folder (train-pats/, validation-pats/); skips if absent."""
  path = openkbp_dir()
  if not (path / "train-pats").is_dir():
    pytest.skip(f"shared OpenKBP patients not found at {path} "
                f"(set RANDOSE_OPENKBP_DIR to run this test)")
  return path


@pytest.fixture(scope="session")
def phantom_split(tmp_path_factory) -> Path:
  """A split folder of 4 phantom patients on a 16^3 grid (do not modify)."""
  split = tmp_path_factory.mktemp("phantoms") / "train-pats"
  phantoms.write_phantoms(split, 4, grid=16, seed=0)
  return split


@pytest.fixture
def phantom_patient(phantom_split, tmp_path) -> Path:
  """A private copy of one 16^3 phantom patient, free to modify."""
  return Path(shutil.copytree(phantom_split / "pt_1", tmp_path / "pt_1"))
