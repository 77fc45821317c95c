"""Helpers shared by the benchmarks: what machine a figure came from, where
the shared data and the results live."""

from __future__ import annotations

import datetime
import importlib.metadata
import json
import os
import pathlib
import platform
import socket

ROOT = pathlib.Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "benchmarks" / "results"


def openkbp_dir() -> pathlib.Path:
  """The shared OpenKBP patients: $RANDOSE_OPENKBP_DIR, else `shared/openkbp`
  beside the checkout."""
  default = ROOT.parent / "shared" / "openkbp"
  return pathlib.Path(os.environ.get("RANDOSE_OPENKBP_DIR", default))


def default_json_path(benchmark: str) -> pathlib.Path:
  """benchmarks/results/<benchmark>_<hostname>.json"""
  return RESULTS_DIR / f"{benchmark}_{socket.gethostname()}.json"


def save_json(result: dict, json_path, benchmark: str) -> pathlib.Path:
  """Writes `result` as JSON to `json_path`, or by default to
  `default_json_path(benchmark)`; returns the path."""
  path = pathlib.Path(json_path) if json_path else default_json_path(benchmark)
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1) + "\n")
  return path


def write_result(
    result: dict, json_path, benchmark: str, config: str
) -> pathlib.Path:
  """Writes `result` as JSON to `json_path`, or by default to
  benchmarks/results/<benchmark>_<config variant or 'paper'>_<hostname>.json
  (config: 'configs/openkbp.py[:variant,...]'); returns the path."""
  variant = config.partition(":")[2].replace(",", "_") or "paper"
  return save_json(result, json_path, f"{benchmark}_{variant}")


def xla_memory(compiled) -> dict:
  """XLA's buffer assignment of a compiled program, in bytes: argument,
  output, alias (outputs sharing a donated argument's buffer), temp
  (activations kept for the backward pass, spectra, workspace),
  generated_code, and peak = argument + output - alias + temp; {} where the
  backend gives none."""
  try:
    stats = compiled.memory_analysis()
    out = {
        key: int(getattr(stats, key + "_size_in_bytes"))
        for key in ("argument", "output", "alias", "temp", "generated_code")
    }
  except (NotImplementedError, RuntimeError, AttributeError):
    return {}  # AttributeError: no analysis (None) or an older jaxlib
  out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
  return out


def _cpu_model() -> str:
  try:
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
      if line.startswith("model name"):
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def _version(package: str) -> str | None:
  try:
    return importlib.metadata.version(package)
  except importlib.metadata.PackageNotFoundError:
    return None


def machine_info() -> dict:
  """Hostname, CPU model, cores, library versions, date and load: enough to
  tell whether two figures are comparable. Does not import jax."""
  try:
    usable_cores = len(os.sched_getaffinity(0))
  except AttributeError:
    usable_cores = os.cpu_count()
  return {
      "hostname": socket.gethostname(),
      "cpu_model": _cpu_model(),
      "cpu_count": os.cpu_count(),
      "usable_cores": usable_cores,
      "platform": platform.platform(),
      "python": platform.python_version(),
      "jax": _version("jax"),
      "numpy": _version("numpy"),
      "grain": _version("grain"),
      "date": (
          datetime.datetime.now(datetime.timezone.utc).isoformat(
              timespec="seconds"
          )
      ),
      # Other jobs on the machine slow every timing: record how busy it was.
      "load_average": (
          list(os.getloadavg()) if hasattr(os, "getloadavg") else None
      ),
  }
