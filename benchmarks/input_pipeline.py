"""Input pipeline timings on the shared OpenKBP patients (128^3).

Rows:
  parse, this reader          openkbp.load_patient: CSVs -> dense Patient
  parse, official style       the OpenKBP starter kit's approach, re-implemented
                              here: pandas.read_csv(index_col=0) per file, then
                              np.put into float64 zeros of the kit's shapes
                              (ct, dose (128,128,128,1); structure_masks
                              (128,128,128,10); mask (128,128,128,1))
  cache build                 cache.build_cache into an empty folder, per patient,
                              in a child process (its wall and CPU seconds, its
                              RSS after the imports and peak RSS during the
                              build: Linux VmHWM, reset after the imports);
                              total seconds, bytes per patient (mean, min, max)
  cached read (sparse)        one patient's file -> SparsePatient
  cached read (encoded)       cache[i]: file -> encoded float32 dict
  cached read (reference)     cache.reference(i): file -> full Patient
  augmented samples/s         pipeline.train_dataset, batch 2, every
                              augmentation on, num_workers 0 and 2, after
                              warm-up batches; the loop reads every 4 KiB
                              page of each batch (as a copy to a device
                              would), so page faults of lazily allocated
                              memory are paid inside the timed window

The parse rows alternate in rounds (fair under a changing load) and report
the best round's mean (the median round is in the JSON). Every row also
reports CPU time: the VM is shared, and CPU ms are less sensitive to other
jobs than wall time. For the samples/s rows, CPU ms per sample are given for
the main process and for the workers, both over the timed window.

  python benchmarks/input_pipeline.py [--json=PATH] [--samples=40]

On the full OpenKBP release (the timings of issue 13, item 1): every
patient of train-pats/ and validation-pats/, one epoch of the training
split per pipeline row, at 128^3 and 64^3, caches built outside the repo:

  python benchmarks/input_pipeline.py --data=/path/to/provided-data \
      --repeats=1 --samples=0 --downsample=1,2 \
      --cache_root=/tmp/bench_cache_full \
      --json=benchmarks/results/input_pipeline_full_vm.json
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import shutil
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
from randose_jax import default_config  # noqa: E402
from randose_jax.data import cache as cache_lib  # noqa: E402
from randose_jax.data import openkbp  # noqa: E402
from randose_jax.data import pipeline  # noqa: E402


def official_style_load(patient_dir: pathlib.Path) -> dict:
  """The starter kit's way: pandas per file, np.put into float64 zeros."""
  import pandas as pd  # benchmark-only dependency

  shape = openkbp.GRID_SHAPE
  arrays = {
      "ct": np.zeros(shape + (1,)),
      "dose": np.zeros(shape + (1,)),
      "possible_dose_mask": np.zeros(shape + (1,)),
      "structure_masks": np.zeros(shape + (len(openkbp.ROI_NAMES),)),
  }
  for path in sorted(patient_dir.glob("*.csv")):
    if path.stem == "voxel_dimensions":
      arrays["voxel_dimensions"] = np.loadtxt(path)
      continue
    frame = pd.read_csv(path, index_col=0)
    if frame.isnull().values.any():  # a mask: indices only
      indices = np.array(frame.index).squeeze()
      if path.stem == "possible_dose_mask":
        np.put(arrays["possible_dose_mask"], indices, 1)
      else:
        roi = openkbp.ROI_NAMES.index(path.stem)
        np.put(
            arrays["structure_masks"], len(openkbp.ROI_NAMES) * indices + roi, 1
        )
    else:
      np.put(arrays[path.stem], frame.index.values, frame["data"].values)
  return arrays


def cpu_seconds(who=resource.RUSAGE_SELF) -> float:
  usage = resource.getrusage(who)
  return usage.ru_utime + usage.ru_stime


def time_calls(fn, items) -> tuple[float, float]:
  """(wall ms, CPU ms) per item of one pass over items."""
  wall, cpu = time.perf_counter(), cpu_seconds()
  for item in items:
    fn(item)
  n = len(items)
  return (time.perf_counter() - wall) / n * 1e3, (cpu_seconds() - cpu) / n * 1e3


def summarise(rounds: list[tuple[float, float]]) -> dict:
  walls = [w for w, _ in rounds]
  best = min(range(len(rounds)), key=lambda i: walls[i])
  return {
      "wall_ms": round(walls[best], 2),
      "cpu_ms": round(rounds[best][1], 2),
      "wall_ms_median": round(statistics.median(walls), 2),
      "rounds": len(rounds),
  }


def children_cpu_seconds() -> float | None:
  """CPU time so far of this process's live children (Linux /proc), so the
  workers can be measured over the timed window only, start-up excluded."""
  proc = pathlib.Path("/proc")
  if not proc.is_dir():
    return None
  me, tick, total = os.getpid(), os.sysconf("SC_CLK_TCK"), 0.0
  for stat in proc.glob("[0-9]*/stat"):
    try:
      fields = stat.read_text().rsplit(")", 1)[1].split()
    except OSError:
      continue
    if int(fields[1]) == me:  # parent pid; then utime, stime at 11, 12
      total += (int(fields[11]) + int(fields[12])) / tick
  return total


_BUILD_CHILD = r"""
import json, sys, time
args = json.loads(sys.argv[1])
sys.path.insert(0, args["root"])
from randose_jax import default_config
from randose_jax.data import cache


def status_kib(field):
  try:
    for line in open("/proc/self/status"):
      if line.startswith(field + ":"):
        return int(line.split()[1])
  except OSError:
    return None  # not Linux


config = default_config.get_default_config()
config.data.downsample = args["downsample"]
rss_imports = status_kib("VmRSS")
# Linux: reset the peak RSS (VmHWM) to the current RSS, so what follows is
# the build's peak (ru_maxrss cannot be reset, and after exec it still holds
# the parent's peak).
try:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")
except OSError:
  pass  # then the peak below may include the imports' (it is their RSS at least)
wall, cpu = time.perf_counter(), time.process_time()
built = cache.build_cache(args["dirs"], args["folder"], config.data)
wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
print(json.dumps({"wall_s": wall, "cpu_s": cpu, "rss_imports_kib": rss_imports,
                  "peak_rss_kib": status_kib("VmHWM")}))
"""


def build_in_child(dirs, folder: pathlib.Path, downsample: int) -> dict:
  """A full cache build in a fresh Python process (Linux): wall and CPU
  seconds of the build, its RSS after the imports and its peak RSS during
  the build (VmHWM, reset after the imports)."""
  args = {
      "root": str(_HERE.parent),
      "dirs": [str(d) for d in dirs],
      "folder": str(folder),
      "downsample": downsample,
  }
  out = subprocess.run(
      [sys.executable, "-c", _BUILD_CHILD, json.dumps(args)],
      check=True,
      capture_output=True,
      text=True,
  )
  return json.loads(out.stdout.strip().splitlines()[-1])


def touch_pages(batch: dict) -> None:
  """Reads one value per 4 KiB page of every array of a batch."""
  for value in batch.values():
    flat = np.asarray(value).reshape(-1)
    flat[:: max(1, 4096 // flat.itemsize)].sum()


def time_pipeline(
    cache, config, num_workers: int, samples: int, warmup: int
) -> dict:
  config.data.num_workers = num_workers
  iterator = iter(pipeline.train_dataset(cache, config, seed=0))
  try:
    for _ in range(warmup):
      next(iterator)
    children = children_cpu_seconds()
    wall, cpu, count = time.perf_counter(), cpu_seconds(), 0
    while count < samples:
      batch = next(iterator)
      count += batch["ct"].shape[0]
      touch_pages(batch)
    wall, cpu = time.perf_counter() - wall, cpu_seconds() - cpu
    if children is not None:
      children = children_cpu_seconds() - children
  finally:
    iterator.close()
  return {
      "num_workers": num_workers,
      "samples": count,
      "samples_per_s": round(count / wall, 2),
      "main_cpu_ms_per_sample": round(cpu / count * 1e3, 1),
      # Over the timed window (read-ahead of the next batches included).
      "workers_cpu_ms_per_sample": (
          None if children is None else round(children / count * 1e3, 1)
      ),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--data", type=pathlib.Path, default=common.openkbp_dir())
  parser.add_argument(
      "--json",
      type=pathlib.Path,
      default=common.default_json_path("input_pipeline"),
  )
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
      "--samples",
      type=int,
      default=40,
      help="per pipeline row; 0: one epoch of train-pats",
  )
  parser.add_argument(
      "--downsample",
      default="1",
      help="comma-separated config.data.downsample values to "
      "time the pipeline at (1: 128^3, 2: 64^3)",
  )
  parser.add_argument(
      "--cache_root",
      type=pathlib.Path,
      default=None,
      help="build the caches here (emptied first; kept); "
      "default: a temporary folder, removed",
  )
  parser.add_argument("--warmup", type=int, default=4, help="batches")
  args = parser.parse_args()

  dirs = openkbp.list_patient_dirs(
      args.data / "train-pats"
  ) + openkbp.list_patient_dirs(args.data / "validation-pats")
  machine = common.machine_info()
  config = default_config.get_default_config()
  config.batch_size = 2
  results = {
      "benchmark": "input_pipeline",
      "command": " ".join(sys.argv),
      "num_patients": len(dirs),
      "grid": list(openkbp.GRID_SHAPE),
  }

  ours, official = [], []
  for _ in range(args.repeats):
    ours.append(time_calls(openkbp.load_patient, dirs))
    official.append(time_calls(official_style_load, dirs))
  results["parse"] = summarise(ours)
  results["parse_official_style"] = summarise(official)

  with tempfile.TemporaryDirectory() as tmp:
    cache_root = args.cache_root or pathlib.Path(tmp)
    if args.cache_root and cache_root.exists():
      shutil.rmtree(cache_root)
    build, builds = [], []
    for r in range(args.repeats):  # a new folder each time: a full build
      folder = cache_root / f"cache{r}"
      child = build_in_child(dirs, folder, 1)
      builds.append(child)
      build.append(
          (child["wall_s"] / len(dirs) * 1e3, child["cpu_s"] / len(dirs) * 1e3)
      )
    config.data.downsample = 1
    cache = cache_lib.build_cache(
        dirs, folder, config.data
    )  # reused, not rebuilt
    results["cache_build"] = summarise(build)
    results["cache_mib"] = round(cache.num_bytes / 2**20, 2)
    sizes = np.array([e["size"] for e in cache.entries])
    results["cache_build_full"] = {
        "patients": len(dirs),
        "total_s": [round(b["wall_s"], 2) for b in builds],
        "cpu_s": [round(b["cpu_s"], 2) for b in builds],
        # Peak resident memory of the building process (imports included).
        "peak_rss_mib": [
            b["peak_rss_kib"] and round(b["peak_rss_kib"] / 1024, 1)
            for b in builds
        ],
        "rss_after_imports_mib": [
            b["rss_imports_kib"] and round(b["rss_imports_kib"] / 1024, 1)
            for b in builds
        ],
        "bytes_per_patient": {
            "mean": int(sizes.mean()),
            "min": int(sizes.min()),
            "max": int(sizes.max()),
        },
        "total_bytes": int(sizes.sum()),
    }
    indices = list(range(len(cache)))
    for name, fn in (
        ("cached_read_sparse", cache.sparse),
        ("cached_read_encoded", cache.__getitem__),
        ("cached_read_reference", cache.reference),
    ):
      results[name] = summarise(
          [time_calls(fn, indices) for _ in range(args.repeats)]
      )

    train_dirs = openkbp.list_patient_dirs(args.data / "train-pats")
    by_downsample = {}
    for downsample in (int(d) for d in args.downsample.split(",")):
      config.data.downsample = downsample
      train_cache = cache_lib.build_cache(train_dirs, folder, config.data)
      samples = args.samples or len(train_cache)
      rows = [
          time_pipeline(train_cache, config, workers, samples, args.warmup)
          for workers in (0, 2)
      ]
      for row in rows:
        row["grid"] = 128 // downsample
        row["train_patients"] = len(train_cache)
      by_downsample[str(downsample)] = rows
    results["augmented"] = by_downsample.get("1", [])
    results["augmented_by_downsample"] = by_downsample

  machine["load_average_end"] = common.machine_info()["load_average"]
  results["machine"] = machine
  args.json.parent.mkdir(parents=True, exist_ok=True)
  args.json.write_text(json.dumps(results, indent=1) + "\n")

  rows = [
      ("parse, this reader (ms/patient)", results["parse"]),
      ("parse, official style (ms/patient)", results["parse_official_style"]),
      ("cache build (ms/patient)", results["cache_build"]),
      ("cached read, sparse (ms)", results["cached_read_sparse"]),
      ("cached read, encoded 128^3 (ms)", results["cached_read_encoded"]),
      ("cached read, reference Patient (ms)", results["cached_read_reference"]),
  ]
  print(
      f"{machine['hostname']}: {machine['cpu_model']}, {machine['usable_cores']} cores, "
      f"load {machine['load_average'][0]:.1f} -> {machine['load_average_end'][0]:.1f}"
  )
  print(f"{'':40s} {'wall':>8s} {'median':>8s} {'cpu':>8s}")
  for label, row in rows:
    print(
        f"{label:40s} {row['wall_ms']:8.1f} {row['wall_ms_median']:8.1f} {row['cpu_ms']:8.1f}"
    )
  speedup = (
      results["parse_official_style"]["wall_ms"] / results["parse"]["wall_ms"]
  )
  print(f"parse speed-up over the official style: {speedup:.1f}x")
  print(f"cache size, {len(dirs)} patients: {results['cache_mib']:.1f} MiB")
  full = results["cache_build_full"]
  print(
      f"cache build: {full['total_s']} s for {len(dirs)} patients, peak RSS "
      f"{full['peak_rss_mib']} MiB (after imports {full['rss_after_imports_mib']}), "
      f"bytes/patient mean {full['bytes_per_patient']['mean']} "
      f"min {full['bytes_per_patient']['min']} max {full['bytes_per_patient']['max']}"
  )
  for row in sum(results["augmented_by_downsample"].values(), []):
    print(
        f"augmented {row['grid']}^3 samples/s, {row['num_workers']} workers: "
        f"{row['samples_per_s']:.1f}  (CPU ms/sample: main {row['main_cpu_ms_per_sample']}, "
        f"workers {row['workers_cpu_ms_per_sample']})"
    )
  print(f"wrote {args.json}")


if __name__ == "__main__":
  main()
