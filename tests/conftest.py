"""Shared pytest fixtures: small synthetic patients and the shared OpenKBP data.

Keep this file small; fixtures used by one test file belong in that file.
"""

import os
import shutil
from pathlib import Path

import jax
import pytest

from randose_jax.data import phantoms

# Tests run tiny models where XLA's optimisation passes cost more than they
# save, and many tests compile the same tiny train step: a persistent
# compilation cache shared by this session and its subprocesses compiles each
# program once.
jax.config.update("jax_disable_most_optimizations", True)
_CACHE = Path(
    os.environ.setdefault(
        "JAX_COMPILATION_CACHE_DIR",
        str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax"),
    )
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.5")
os.environ.setdefault("JAX_DISABLE_MOST_OPTIMIZATIONS", "true")
jax.config.update("jax_compilation_cache_dir", str(_CACHE))
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)


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
    pytest.skip(
        f"shared OpenKBP patients not found at {path} "
        f"(set RANDOSE_OPENKBP_DIR to run this test)"
    )
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


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Path:
  """A workdir trained 4 steps on 16^3 phantoms (configs/demo.py:smoke, 8^3
  model grid), shared by test_fault_table and test_predict_export: read it,
  never modify it (copy it first)."""
  from randose_jax.training import train  # pylint: disable=g-import-not-at-top
  from tests.test_train import tiny_config  # pylint: disable=g-import-not-at-top

  workdir = tmp_path_factory.mktemp("trained")
  train.train_and_evaluate(
      tiny_config(), workdir, mesh=train.make_mesh(jax.devices()[:1])
  )
  return workdir
