"""The transport archive (randose_jax/data/transport.py) on a whole data set:
its size, pack and unpack seconds, and the check against the CSVs.

Rows:
  pack            transport.pack of every patient of the splits (one
                  process unless --workers): wall and CPU seconds
  size            the archive's bytes: total, per patient (mean, min, max),
                  per section summed over the patients (voxel sets, CT
                  tokens and raw bits, dose tokens and raw bits)
  decode          open_archive + every patient back to a SparsePatient
  check           each decoded patient against openkbp.load_sparse_patient
                  of its CSVs: grid, voxel sizes, CT and every voxel set
                  bit-exact (else the script fails), the dose's largest
                  error (must be <= the archive's bound)
  unpack          transport.unpack_to_cache for the default config (128^3)
                  into a folder outside the repo: seconds and the cache's
                  bytes (what the CSVs' cache.build_cache writes)
  --also_decimals more packs at other dose_decimals, size only (3: OpenKBP's
                  mGy exactly)

  python benchmarks/transport_archive.py --data=/path/to/provided-data \\
      --archive=/tmp/openkbp_full.rdt --cache_dir=/tmp/openkbp_full_cache \\
      [--also_decimals=3] [--json=benchmarks/results/transport_full_vm.json]
"""

from __future__ import annotations

import argparse
import json
import pathlib
import resource
import shutil
import sys
import time

import numpy as np

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if str(_HERE.parent) not in sys.path:
  sys.path.insert(1, str(_HERE.parent))

import common  # noqa: E402
from randose_jax import default_config  # noqa: E402
from randose_jax.data import openkbp  # noqa: E402
from randose_jax.data import transport  # noqa: E402

MIB = 2**20


def timed(fn):
  wall, cpu = time.perf_counter(), time.process_time()
  children = resource.getrusage(resource.RUSAGE_CHILDREN)
  out = fn()
  after = resource.getrusage(resource.RUSAGE_CHILDREN)
  cpu = (
      time.process_time()
      - cpu
      + (
          after.ru_utime
          + after.ru_stime
          - children.ru_utime
          - children.ru_stime
      )
  )
  return out, round(time.perf_counter() - wall, 2), round(cpu, 2)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", type=pathlib.Path, default=common.openkbp_dir())
  parser.add_argument("--splits", default=",".join(transport.DEFAULT_SPLITS))
  parser.add_argument(
      "--archive",
      type=pathlib.Path,
      required=True,
      help="where to write the archive (replaced)",
  )
  parser.add_argument(
      "--cache_dir",
      type=pathlib.Path,
      required=True,
      help="where to unpack the cache (emptied first)",
  )
  parser.add_argument("--workers", type=int, default=1)
  parser.add_argument(
      "--also_decimals",
      default="",
      help="comma-separated dose_decimals to pack too (size only)",
  )
  parser.add_argument(
      "--json",
      type=pathlib.Path,
      default=common.default_json_path("transport_archive"),
  )
  args = parser.parse_args()
  splits = args.splits.split(",")
  machine = common.machine_info()
  result = {
      "benchmark": "transport_archive",
      "command": " ".join(sys.argv),
      "data": str(args.data),
      "splits": {},
  }

  header, result["pack_wall_s"], result["pack_cpu_s"] = timed(
      lambda: transport.pack(
          args.data,
          args.archive,
          splits=splits,
          overwrite=True,
          workers=args.workers,
      )
  )
  entries = header["patients"]
  sizes = np.array([e["size"] for e in entries])
  total = args.archive.stat().st_size
  result["splits"] = {s: len(ids) for s, ids in header["splits"].items()}
  result["patients"] = len(entries)
  result["archive_bytes"] = total
  result["archive_mib"] = round(total / MIB, 2)
  result["header_bytes"] = total - int(sizes.sum())
  result["bytes_per_patient"] = {
      "mean": int(sizes.mean()),
      "min": int(sizes.min()),
      "max": int(sizes.max()),
  }
  result["section_mib"] = {
      name: round(sum(e["sections"][k] for e in entries) / MIB, 2)
      for k, name in enumerate(transport._SECTIONS)
  }  # pylint: disable=protected-access
  result["voxels"] = {
      "ct": int(sum(e["ct_count"] for e in entries)),
      "dose": int(sum(e["dose"]["count"] for e in entries if e["dose"])),
  }
  result["dose_decimals"] = header["dose_decimals"]
  result["dose_error_bound_gy"] = header["max_dose_error_gy"]
  print(
      f"pack: {len(entries)} patients, {total / MIB:.2f} MiB "
      f"({sizes.mean() / 1024:.0f} KiB/patient, {sizes.min() / 1024:.0f}.."
      f"{sizes.max() / 1024:.0f}), {result['pack_wall_s']} s",
      flush=True,
  )

  archive = transport.open_archive(args.archive)
  restored, result["decode_wall_s"], result["decode_cpu_s"] = timed(
      lambda: [archive.read(e) for e in archive.entries()]
  )
  print(f"decode: {result['decode_wall_s']} s", flush=True)

  worst, exact = 0.0, 0
  for entry, patient in zip(archive.entries(), restored):
    original = openkbp.load_sparse_patient(
        args.data / entry["split"] / entry["patient_id"]
    )
    error = transport.compare(original, patient, header["max_dose_error_gy"])
    worst = max(worst, error)
    exact += error == 0
  result["check"] = {
      "patients_equal": len(restored),
      "exact": (
          "grid, voxel dimensions, CT values and voxels, possible-dose "
          "mask, ten ROIs, dose voxels: bit-exact against the CSVs"
      ),
      "max_dose_error_gy": worst,
      "patients_with_exact_dose": int(exact),
  }
  print(
      f"check: {len(restored)} patients equal to the CSVs; dose error <= {worst} Gy",
      flush=True,
  )
  del restored

  if args.cache_dir.exists():
    shutil.rmtree(args.cache_dir)
  config = default_config.get_default_config()
  caches, result["unpack_wall_s"], result["unpack_cpu_s"] = timed(
      lambda: transport.unpack_to_cache(
          args.archive, args.cache_dir, config.data, workers=args.workers
      )
  )
  cache_bytes = sum(c.num_bytes for c in caches.values())
  result["unpack_workers"] = args.workers
  result["cache_mib"] = round(cache_bytes / MIB, 2)
  print(
      f"unpack to cache: {result['unpack_wall_s']} s, cache {cache_bytes / MIB:.1f} MiB",
      flush=True,
  )

  result["other_dose_decimals"] = {}
  for decimals in filter(None, args.also_decimals.split(",")):
    path = args.archive.with_name(
        f"{args.archive.stem}-d{decimals}{args.archive.suffix}"
    )
    other, wall, _ = timed(
        lambda d=int(decimals), p=path: transport.pack(
            args.data,
            p,
            splits=splits,
            dose_decimals=d,
            overwrite=True,
            workers=args.workers,
        )
    )
    result["other_dose_decimals"][decimals] = {
        "archive_mib": round(path.stat().st_size / MIB, 2),
        "dose_error_bound_gy": other["max_dose_error_gy"],
        "max_dose_error_gy": max(
            e["dose"]["max_error_gy"] for e in other["patients"] if e["dose"]
        ),
        "pack_wall_s": wall,
    }
    print(
        f"dose_decimals={decimals}: {path.stat().st_size / MIB:.2f} MiB",
        flush=True,
    )

  machine["load_average_end"] = common.machine_info()["load_average"]
  result["machine"] = machine
  args.json.parent.mkdir(parents=True, exist_ok=True)
  args.json.write_text(json.dumps(result, indent=1) + "\n")
  print(
      f"load {machine['load_average'][0]:.1f} -> {machine['load_average_end'][0]:.1f}; "
      f"wrote {args.json}"
  )


if __name__ == "__main__":
  main()
