r"""The transport archive's command: pack, unpack (into a cache), check.

  python -m randose_jax.data.transport pack --root=DIR --archive=F.rdt \
      [--splits=train-pats,validation-pats] [--dose_decimals=2] [--overwrite]
  python -m randose_jax.data.transport unpack --archive=F.rdt \
      --cache_dir=DIR [--config=configs/openkbp.py[:variant]] [--workers=N]
  python -m randose_jax.data.transport check --archive=F.rdt --root=DIR

The archive's format and the work are `randose_jax/data/transport.py`;
`python -m randose_jax.data.transport` and `randose-transport` run this.
"""

import time
from pathlib import Path

from absl import app
from absl import flags
from ml_collections import config_flags

from randose_jax import default_config
from randose_jax.cli import common as cli
from randose_jax.data import transport

FLAGS = flags.FLAGS


def define_flags(fv: flags.FlagValues = FLAGS):
  """Flags of the command line (defined only when run as a program)."""
  flags.DEFINE_string(
      "root", None, "OpenKBP data folder (pack, check).", flag_values=fv
  )
  flags.DEFINE_string("archive", None, "The archive file.", flag_values=fv)
  flags.DEFINE_list(
      "splits",
      list(transport.DEFAULT_SPLITS),
      "Split folders to pack.",
      flag_values=fv,
  )
  flags.DEFINE_integer(
      "dose_decimals",
      transport.DEFAULT_DOSE_DECIMALS,
      "pack: dose stored in steps of 10^-N Gy (error <= half).",
      flag_values=fv,
  )
  flags.DEFINE_bool(
      "overwrite", False, "pack: replace an existing archive.", flag_values=fv
  )
  flags.DEFINE_string(
      "cache_dir",
      None,
      "unpack: write the cache here (<cache_dir>/<split>/).",
      flag_values=fv,
  )
  config_flags.DEFINE_config_file(
      "config",
      None,
      "unpack: config whose data settings the cache is for "
      "(default: the default config's).",
      flag_values=fv,
      lock_config=True,
  )
  flags.DEFINE_integer(
      "workers", 1, "Processes that encode / decode patients.", flag_values=fv
  )
  cli.define_progress_flag(fv)


def main(argv):
  """pack | unpack | check (see the module docstring)."""
  if len(argv) != 2 or argv[1] not in ("pack", "unpack", "check"):
    raise app.UsageError("give one command: pack, unpack or check")
  needed = {
      "pack": ("root", "archive"),
      "unpack": ("archive", "cache_dir"),
      "check": ("archive", "root"),
  }[argv[1]]
  for name in needed:
    if not FLAGS[name].value:
      raise app.UsageError(f"{argv[1]} needs --{name}")
  start = time.perf_counter()
  if argv[1] == "pack":
    header = transport.pack(
        FLAGS.root,
        FLAGS.archive,
        splits=FLAGS.splits,
        dose_decimals=FLAGS.dose_decimals,
        overwrite=FLAGS.overwrite,
        workers=FLAGS.workers,
        progress=FLAGS.progress,
    )
    size = Path(FLAGS.archive).stat().st_size
    worst = max(
        (e["dose"]["max_error_gy"] for e in header["patients"] if e["dose"]),
        default=0.0,
    )
    print(
        f"{FLAGS.archive}: {len(header['patients'])} patients "
        f"({', '.join(f'{s} {len(p)}' for s, p in header['splits'].items())}), "
        f"{size / 2**20:.2f} MiB, dose error <= {worst:.6f} Gy "
        f"(bound {header['max_dose_error_gy']}), {time.perf_counter() - start:.0f} s"
    )
  elif argv[1] == "unpack":
    config = (
        default_config.get_default_config()
        if FLAGS.config is None
        else FLAGS.config
    )
    caches = transport.unpack_to_cache(
        FLAGS.archive,
        FLAGS.cache_dir,
        config.data,
        workers=FLAGS.workers,
        progress=FLAGS.progress,
    )
    for split, cache in caches.items():
      print(
          f"{FLAGS.cache_dir}/{split}: {len(cache)} patients, "
          f"{cache.num_bytes / 2**20:.1f} MiB"
      )
    print(f"unpacked in {time.perf_counter() - start:.0f} s")
  else:
    count, worst = transport.check_archive(
        FLAGS.archive, FLAGS.root, FLAGS.progress
    )
    print(
        f"{FLAGS.archive}: {count} patients equal to the CSVs in {FLAGS.root} "
        f"(CT, voxel sets, voxel sizes bit-exact; dose error <= {worst:.6f} Gy)"
    )


def run() -> None:
  """The console command (pyproject [project.scripts])."""
  define_flags()
  cli.run(main)


if __name__ == "__main__":
  run()
