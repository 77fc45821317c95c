"""The launch scripts parse (bash -n) and document their variables."""

import pathlib
import re
import subprocess

import pytest

LAUNCH = pathlib.Path(__file__).resolve().parents[1] / "launch"
SCRIPTS = sorted(LAUNCH.glob("*.sh"))


def test_the_four_launch_scripts_exist():
  assert {p.name for p in SCRIPTS} >= {
      "one_gpu.sh",
      "all_gpus.sh",
      "slurm_multihost.sh",
      "tpu_vm.sh",
  }


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_bash_syntax(script):
  proc = subprocess.run(
      ["bash", "-n", str(script)], capture_output=True, text=True
  )
  assert proc.returncode == 0, proc.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_every_variable_it_reads_is_documented(script):
  text = script.read_text()
  header = "\n".join(l for l in text.splitlines() if l.startswith("#"))
  # Variables the script takes from the caller: ${NAME:-...}, ${NAME:?...}.
  taken = set(re.findall(r"\$\{([A-Z][A-Z_]*)(?::[-?])", text))
  taken -= {
      "SLURM_GPUS_PER_NODE",
      "SLURM_NNODES",
      "XLA_PYTHON_CLIENT_PREALLOCATE",
  }  # set by SLURM / documented inline
  missing = [v for v in taken if not re.search(rf"#\s+{v}\b", header)]
  assert not missing, f"{script.name}: undocumented variables {missing}"
