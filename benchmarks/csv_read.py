"""Sparse CSV reading: openkbp.py of an older commit (--old_commit) against
this checkout's `openkbp.read_sparse_csv`, one process.

Old commits: 4df4582 (the default) reads with pandas' C engine; ef8a8a7
with a hand-written parser (`_parse_fast`, SWAR digit words, with
`_parse_lines` as its per-line slow path). This checkout reads with pyarrow
where it is installed (pandas' C engine where not, or where pyarrow does
not read a file cleanly). The old module is taken from
`git show COMMIT:randose_jax/data/openkbp.py` into a temporary folder and
imported from there; the library keeps no copy.

Input kinds (--patients shared patients of train-pats/ each give one file
per kind; the made ones are written into a temporary folder):
  mask             possible_dose_mask.csv (rows `index,`)
  ROI masks        every ROI file of the patient (small files: the per-call
                   overhead)
  ct               ct.csv (integer values written `887.0`)
  dose             dose.csv (3 decimals)
  full precision   the dose times 0.95 plus Gaussian noise (1 Gy), clipped at
                   0, written by pandas' DataFrame.to_csv (Python's repr:
                   up to 17 significant digits), as the starter kit and most
                   tools write predictions
  exponents        the same values times 1e-6, to_csv (`1.2345678901234567e-05`)
  CRLF             dose.csv with Windows line ends (\\r\\n)
  one patient, sparse
                   load_sparse_patient of the whole folder (old vs new module)
  one patient, dense
                   load_patient (CSVs -> dense Patient), old vs new; and the
                   starter kit's way (`input_pipeline.official_style_load`:
                   pandas.read_csv(index_col=0) per file, np.put into
                   float64 zeros), timed in the same rounds

Each kind is timed old then new in one round, --repeats rounds; the table
gives ms per file (per patient in the patient rows) of the fastest round,
wall and CPU (the median round is in the JSON). Before timing, every file
read is compared: indices and values must be bit-equal between the two
parsers, with the same dtypes.

--check_all also compares every CSV of every patient of train-pats/ and
validation-pats/ (old vs new, bit-equal) and load_sparse_patient field by
field, and records the count in the JSON.

  python benchmarks/csv_read.py --check_all --repeats=5 \\
      --json=benchmarks/results/csv_read_vm.json
  python benchmarks/csv_read.py --old_commit=ef8a8a7 ...   (the SWAR parser)
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if str(_HERE.parent) not in sys.path:
  sys.path.insert(1, str(_HERE.parent))

import common  # noqa: E402
import input_pipeline  # noqa: E402  (official_style_load)
from randose_jax.data import openkbp  # noqa: E402

OLD_COMMIT = "4df4582"  # pandas' C engine


def import_old(folder: pathlib.Path, commit: str = OLD_COMMIT):
  """openkbp.py as of `commit`, imported as a module of its own."""
  source = subprocess.run(
      ["git", "show", f"{commit}:randose_jax/data/openkbp.py"],
      cwd=common.ROOT,
      check=True,
      capture_output=True,
  ).stdout
  path = folder / f"openkbp_{commit}.py"
  path.write_bytes(source)
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[path.stem] = module  # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def make_files(patient_dirs, folder: pathlib.Path, seed: int = 0) -> dict:
  """{kind: [(path, with_values)]}, the made files written into `folder`."""
  import pandas as pd  # the writer the kit and most tools use

  rng = np.random.default_rng(seed)
  kinds = {
      k: []
      for k in (
          "mask",
          "ROI masks",
          "ct",
          "dose",
          "full precision",
          "exponents",
          "CRLF",
      )
  }
  for d in patient_dirs:
    kinds["mask"].append((d / openkbp.MASK_FILE, False))
    kinds["ROI masks"] += [
        (d / f"{name}.csv", False)
        for name in openkbp.ROI_NAMES
        if (d / f"{name}.csv").exists()
    ]
    kinds["ct"].append((d / openkbp.CT_FILE, True))
    kinds["dose"].append((d / openkbp.DOSE_FILE, True))
    index, dose = openkbp.read_sparse_csv(d / openkbp.DOSE_FILE)
    noisy = np.maximum(dose * 0.95 + rng.normal(0, 1.0, dose.size), 0.0)
    for kind, scale in (("full precision", 1.0), ("exponents", 1e-6)):
      path = folder / f"{d.name}_{kind.replace(' ', '_')}.csv"
      pd.DataFrame({"data": noisy * scale}, index=index).to_csv(path)
      kinds[kind].append((path, True))
    path = folder / f"{d.name}_crlf.csv"
    dose_text = (d / openkbp.DOSE_FILE).read_bytes()
    path.write_bytes(dose_text.replace(b"\n", b"\r\n"))
    kinds["CRLF"].append((path, True))
  return kinds


def same_arrays(a, b) -> bool:
  """Equal dtypes and bits (None matches None)."""
  if a is None or b is None:
    return a is None and b is None
  a, b = np.asarray(a), np.asarray(b)
  return (
      a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
  )


def check_file(old, path: pathlib.Path, with_values: bool) -> None:
  a = old.read_sparse_csv(path, with_values=with_values)
  b = openkbp.read_sparse_csv(path, with_values=with_values)
  if not (same_arrays(a[0], b[0]) and same_arrays(a[1], b[1])):
    raise AssertionError(f"{path}: old and new readings differ")


def check_patient(old, patient_dir: pathlib.Path) -> None:
  a = old.load_sparse_patient(patient_dir)
  b = openkbp.load_sparse_patient(patient_dir)
  for field in dataclasses.fields(a):
    x, y = getattr(a, field.name), getattr(b, field.name)
    if field.name == "roi_index":
      ok = len(x) == len(y) and all(map(same_arrays, x, y))
    elif isinstance(x, np.ndarray) or x is None:
      ok = same_arrays(x, y)
    else:
      ok = x == y
    if not ok:
      raise AssertionError(f"{patient_dir}: {field.name} differs")


def check_all(old, data: pathlib.Path) -> dict:
  """Every CSV and every patient of train-pats/ and validation-pats/."""
  files = patients = 0
  for split in ("train-pats", "validation-pats"):
    if not (data / split).is_dir():
      continue
    for d in openkbp.list_patient_dirs(data / split):
      for path in sorted(d.glob("*.csv")):
        if path.name in (
            openkbp.VOXEL_DIMENSIONS_FILE,
            openkbp.GRID_SHAPE_FILE,
        ):
          continue
        check_file(old, path, path.name in (openkbp.CT_FILE, openkbp.DOSE_FILE))
        files += 1
      check_patient(old, d)
      patients += 1
  return {"patients": patients, "csv_files": files, "bit_equal": True}


def cpu_seconds() -> float:
  return time.process_time()


def time_pass(fn, items) -> tuple[float, float]:
  """(wall ms, CPU ms) per item of one pass."""
  wall, cpu = time.perf_counter(), cpu_seconds()
  for item in items:
    fn(*item)
  n = len(items)
  return (
      (time.perf_counter() - wall) / n * 1e3,
      (cpu_seconds() - cpu) / n * 1e3,
  )


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--data", type=pathlib.Path, default=common.openkbp_dir())
  parser.add_argument("--patients", type=int, default=4)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--check_all", action="store_true")
  parser.add_argument(
      "--old_commit",
      default=OLD_COMMIT,
      help="the commit whose openkbp.py is 'old'",
  )
  parser.add_argument(
      "--json", type=pathlib.Path, default=common.default_json_path("csv_read")
  )
  args = parser.parse_args(argv)

  machine = common.machine_info()
  machine["pandas"] = importlib.metadata.version("pandas")
  try:
    machine["pyarrow"] = importlib.metadata.version("pyarrow")
  except importlib.metadata.PackageNotFoundError:
    machine["pyarrow"] = None
  machine["uptime"] = subprocess.run(
      ["uptime"], capture_output=True, text=True
  ).stdout.strip()
  dirs = openkbp.list_patient_dirs(args.data / "train-pats")[: args.patients]
  with tempfile.TemporaryDirectory() as tmp:
    tmp = pathlib.Path(tmp)
    old = import_old(tmp, args.old_commit)
    kinds = make_files(dirs, tmp)
    for items in kinds.values():
      for path, with_values in items:
        check_file(old, path, with_values)
    for d in dirs:
      check_patient(old, d)
    checked = check_all(old, args.data) if args.check_all else None

    jobs = {
        kind: (
            items,
            {
                side: (
                    lambda m: lambda p, v: m.read_sparse_csv(p, with_values=v)
                )(m)
                for side, m in (("old", old), ("new", openkbp))
            },
        )
        for kind, items in kinds.items()
    }
    patients = [(d,) for d in dirs]
    jobs["one patient, sparse"] = (
        patients,
        {"old": old.load_sparse_patient, "new": openkbp.load_sparse_patient},
    )
    jobs["one patient, dense"] = (
        patients,
        {
            "old": old.load_patient,
            "new": openkbp.load_patient,
            "official": input_pipeline.official_style_load,
        },
    )
    rounds = {
        kind: {side: [] for side in readers}
        for kind, (_, readers) in jobs.items()
    }
    for _ in range(args.repeats):
      for kind, (items, readers) in jobs.items():
        for side, reader in readers.items():
          rounds[kind][side].append(time_pass(reader, items))
    sizes = {
        kind: (
            statistics.mean(os.path.getsize(item[0]) for item in items)
            if kind in kinds
            else None
        )
        for kind, (items, _) in jobs.items()
    }

  machine["load_average_end"] = list(os.getloadavg())
  table = {}
  print(
      f"{machine['cpu_model']}, {machine['usable_cores']} cores, pandas "
      f"{machine['pandas']}, pyarrow {machine['pyarrow']}; "
      f"{machine['uptime']}"
  )
  print(f"old: openkbp.py at {args.old_commit}; new: this checkout")
  print(
      f"{len(dirs)} patients of {args.data / 'train-pats'}; ms per file "
      f"(fastest of {args.repeats} rounds)\n"
  )
  print(
      f"{'':20s}{'KB':>7s}{'old wall':>10s}{'new wall':>10s}"
      f"{'old cpu':>9s}{'new cpu':>9s}{'old/new':>9s}"
  )
  for kind, sides in rounds.items():
    row = {
        "files": len(jobs[kind][0]),
        "mean_bytes": None if sizes[kind] is None else round(sizes[kind]),
    }
    for side, times in sides.items():
      best = min(times)
      row[side] = {
          "wall_ms": round(best[0], 2),
          "cpu_ms": round(best[1], 2),
          "wall_ms_median": round(statistics.median(t[0] for t in times), 2),
      }
    row["old_over_new_wall"] = round(
        row["old"]["wall_ms"] / row["new"]["wall_ms"], 2
    )
    table[kind] = row
    kb = "" if sizes[kind] is None else f"{sizes[kind] / 1e3:.0f}"
    print(
        f"{kind:20s}{kb:>7s}{row['old']['wall_ms']:10.1f}"
        f"{row['new']['wall_ms']:10.1f}{row['old']['cpu_ms']:9.1f}"
        f"{row['new']['cpu_ms']:9.1f}{row['old_over_new_wall']:8.2f}x"
    )
    if "official" in row:
      print(
          f"{'  official style':27s}{row['official']['wall_ms']:10.1f}"
          f"{'':19s}{row['official']['cpu_ms']:9.1f}"
      )
  if checked:
    print(
        f"\nold vs new, bit-equal: {checked['csv_files']} CSV files of "
        f"{checked['patients']} patients"
    )
  report = {
      "benchmark": "csv_read",
      "command": (
          "python benchmarks/csv_read.py "
          + " ".join(sys.argv[1:] if argv is None else argv)
      ),
      "old_commit": args.old_commit,
      "patients": [d.name for d in dirs],
      "repeats": args.repeats,
      "check_all": checked,
      "timings": table,
      "machine": machine,
  }
  args.json.parent.mkdir(parents=True, exist_ok=True)
  args.json.write_text(json.dumps(report, indent=1) + "\n")
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
