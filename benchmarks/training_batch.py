"""Look at what the network is trained on: one augmented training batch.

Draws batches from the real training pipeline (`pipeline.train_dataset`,
augmentation as configured) and, for each example, plots the axial and
sagittal planes (through the high-dose centre; the augmentation rotates
about the superior-inferior axis, so the "sagittal" plane of a rotated
example shows another vertical plane) of the CT channel, the PTV channel,
the OAR channels, the target dose (x `data.dose_scale` Gy) and the
possible-dose mask. Prints and
saves (JSON) the checks a researcher makes before blaming the network:

- the target is never negative, and 0 outside the possible-dose mask before
  augmentation (after a 40-degree rotation the bilinear target reaches a few
  voxels past the nearest-voxel mask: counted, expected; the loss's L_all
  averages the whole grid, scoring masks the prediction);
- inside each PTV the target sits near its prescription (PTV70 -> 1.0,
  PTV63 -> 0.9, PTV56 -> 0.8 target units, given dose / 70 Gy);
- the PTV input channel only holds 0 and the configured `data.ptv_values`;
- the OAR channels lie in [0, 1] (binary at downsample 1, block
  occupancies at downsample > 1);
- the share of voxels that are in the mask / in a PTV (how empty the grid
  the L1 losses average over is).

  python benchmarks/training_batch.py --data_root=/data/openkbp \
      --cache_dir=/data/cache --config=configs/openkbp.py:cpu_proxy \
      --batches=8 --png=benchmarks/results/training_batch_cpu_proxy.png
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pathlib
import sys

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if str(_HERE.parent) not in sys.path:
  sys.path.insert(1, str(_HERE.parent))

import common  # noqa: E402

import numpy as np  # noqa: E402

from randose_jax.training import train  # noqa: E402
from randose_jax import viz  # noqa: E402
from randose_jax.data import pipeline  # noqa: E402


def load_config(spec: str):
  path, _, variants = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_cfg", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variants)


def batch_checks(batch: dict, data_config) -> dict:
  """The statistics of one batch that say whether inputs and targets are
  what the loss and the network assume."""
  ptv, ct, oar = batch["ptv"][..., 0], batch["ct"][..., 0], batch["oar"]
  target, mask = batch["target"][..., 0], batch["mask"][..., 0] > 0
  levels = tuple(float(v) for v in data_config.ptv_values)
  out = {
      "shape": list(batch["target"].shape),
      "target_min": float(target.min()),
      "target_max": float(target.max()),
      "target_outside_mask_max_abs": float(
          np.abs(target[~mask]).max() if (~mask).any() else 0.0
      ),
      "ptv_channel_values": sorted(
          {round(float(v), 4) for v in np.unique(ptv)}
      ),
      "target_outside_mask_voxels": int(((target > 0) & ~mask).sum()),
      "oar_binary": bool(np.isin(oar, (0.0, 1.0)).all()),
      "oar_in_0_1": bool(((oar >= 0) & (oar <= 1)).all()),
      "oar_outside_mask_voxels": int(((oar.max(-1) > 0) & ~mask).sum()),
      "ct_min": float(ct.min()),
      "ct_max": float(ct.max()),
      "mask_fraction": float(mask.mean()),
      "ptv_fraction": float((ptv > 0).mean()),
      "ptv_fraction_of_mask": float((ptv > 0).sum() / max(mask.sum(), 1)),
      "per_level": {},
  }
  for level in levels:
    inside = np.isclose(ptv, level)
    if inside.any():
      t = target[inside]
      out["per_level"][f"{level:g}"] = {
          "voxels": int(inside.sum()),
          "target_mean": float(t.mean()),
          "target_p5": float(np.percentile(t, 5)),
          "target_p95": float(np.percentile(t, 95)),
      }
  return out


def plot(batches: list, data_config, path: pathlib.Path, title: str) -> None:
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  examples = [(b, i) for b in batches for i in range(b["target"].shape[0])]
  examples = examples[:4]
  cols = ["CT (HU)", "PTV input", "OARs (sum)", "target dose (Gy)", "mask"]
  fig, axes = plt.subplots(
      2 * len(examples),
      len(cols),
      figsize=(2.6 * len(cols), 2.5 * 2 * len(examples)),
  )
  scale = float(data_config.dose_scale)
  for row, (b, i) in enumerate(examples):
    planes = {
        "CT (HU)": b["ct"][i, ..., 0] * float(data_config.ct_scale),
        "PTV input": b["ptv"][i, ..., 0],
        "OARs (sum)": b["oar"][i].sum(-1),
        "target dose (Gy)": b["target"][i, ..., 0] * scale,
        "mask": b["mask"][i, ..., 0],
    }
    dose = planes["target dose (Gy)"]
    centre = (
        np.array(np.nonzero(dose > 0.5 * dose.max())).mean(1).astype(int)
        if dose.max() > 0
        else np.array(dose.shape) // 2
    )
    for view_index, view in enumerate((viz._VIEWS[0], viz._VIEWS[2])):
      for col, name in enumerate(cols):
        ax = axes[2 * row + view_index, col]
        kw = {"cmap": "gray"} if name == "CT (HU)" else {"cmap": "jet"}
        if name == "target dose (Gy)":
          kw.update(vmin=0, vmax=max(75.0, float(dose.max())))
        im = ax.imshow(viz._view_slice(planes[name], view, centre), **kw)
        ax.set_xticks([]), ax.set_yticks([])
        if row == 0 and view_index == 0:
          ax.set_title(name, fontsize=9)
        if col == 0:
          ax.set_ylabel(f"example {row} {view[0].lower()}", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046)
  fig.suptitle(title, fontsize=9)
  fig.tight_layout()
  fig.savefig(path, dpi=80)
  plt.close(fig)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/openkbp.py:cpu_proxy")
  p.add_argument(
      "--data_root",
      required=True,
      help="folder with train-pats/ and validation-pats/",
  )
  p.add_argument("--cache_dir", default="/tmp/randose_learning_cache")
  p.add_argument("--batches", type=int, default=8)
  p.add_argument(
      "--augment",
      choices=("config", "on", "off"),
      default="config",
      help="override config.data.augment",
  )
  p.add_argument("--json", default="")
  p.add_argument("--png", default="")
  args = p.parse_args(argv)
  config = load_config(args.config)
  config.data.root = args.data_root
  config.data.cache_dir = args.cache_dir
  config.data.num_workers = 0
  if args.augment != "config":
    config.data.augment = args.augment == "on"
  train_cache, _, _ = train.prepare_data(config, pathlib.Path("/tmp"))
  it = iter(pipeline.train_dataset(train_cache, config, seed=config.seed))
  batches = [
      {k: np.asarray(v) for k, v in next(it).items()}
      for _ in range(args.batches)
  ]
  checks = [batch_checks(b, config.data) for b in batches]
  summary = {
      "target_min": min(c["target_min"] for c in checks),
      "target_max": max(c["target_max"] for c in checks),
      "target_outside_mask_max_abs": max(
          c["target_outside_mask_max_abs"] for c in checks
      ),
      "target_outside_mask_voxels": sum(
          c["target_outside_mask_voxels"] for c in checks
      ),
      "oar_binary": all(c["oar_binary"] for c in checks),
      "oar_in_0_1": all(c["oar_in_0_1"] for c in checks),
      "oar_outside_mask_voxels": sum(
          c["oar_outside_mask_voxels"] for c in checks
      ),
      "mask_fraction_mean": float(
          np.mean([c["mask_fraction"] for c in checks])
      ),
      "ptv_fraction_mean": float(np.mean([c["ptv_fraction"] for c in checks])),
      "ptv_fraction_of_mask_mean": float(
          np.mean([c["ptv_fraction_of_mask"] for c in checks])
      ),
  }
  result = {
      "benchmark": "training_batch",
      "config": args.config,
      "data_root": args.data_root,
      "num_train_patients": len(train_cache),
      "batch_size": config.batch_size,
      "augment": bool(config.data.augment),
      "summary": summary,
      "batches": checks,
      "machine": common.machine_info(),
  }
  stem = (
      pathlib.Path(args.json).with_suffix("")
      if args.json
      else (common.RESULTS_DIR / "training_batch")
  )
  stem.parent.mkdir(parents=True, exist_ok=True)
  pathlib.Path(f"{stem}.json").write_text(json.dumps(result, indent=1) + "\n")
  png = pathlib.Path(args.png or f"{stem}.png")
  grid = 128 // config.data.downsample
  plot(
      batches,
      config.data,
      png,
      f"{args.config}: training batches at {grid}^3 (augment="
      f"{bool(config.data.augment)}), {len(train_cache)} train patients",
  )
  for k, v in summary.items():
    print(f"{k:30s} {v}")
  for c in checks[:2]:
    print("per PTV level:", json.dumps(c["per_level"]))
  print(f"wrote {stem}.json and {png}")


if __name__ == "__main__":
  main()
