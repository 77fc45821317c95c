"""RANDose on OpenKBP: the paper's recipe and its named variants.

Run (the paper, docs/design.md section 5; point data.root at the OpenKBP release):

  python -m randose_jax.main --config=configs/openkbp.py \
      --config.data.root=/path/to/open-kbp/provided-data --workdir=runs/randose

Variants, chosen after a colon (`--config=configs/openkbp.py:smoke`):
  (none)      the paper: full grid, widths 16..256, 80,000 steps at batch 2.
  smoke       tiny grid (16^3), widths 4..8, a few steps on the 26 shared
              patients in ../shared/openkbp; minutes on 2 CPU cores (tests).
  bench_cpu   the CPU benchmark shape: 64^3, batch 2, widths 8..128, fp32.
  cpu_proxy   about an hour of real learning on 2 CPU cores: 64^3, widths
              4..64, Adam 3e-4, 1,500 steps (point data.root at the full set).
  cpu_best    the best recipe found for 2 CPU cores (benchmarks/NOTES.md,
              "Full resolution at the proxy's cost"): the full 128^3
              resolution on 64^3 crops around the patient, the PTV distance
              and slab channels, the mask region in the loss, EMA; widths
              4..64, Adam 3e-4. The shipped model was trained so.
  lossmask    adds the possible-dose mask as a third learned-weight region of
              the loss (not in the paper; part of cpu_best).
  progressive progressive resizing: the first 600 steps on the whole grid
              at half the resolution (64^3), the rest on the training grid
              (`:cpu_best,progressive`; a lever under measurement, not part
              of cpu_best).
  row1..row5  Table 2a ablations (row5 = the paper).
  loss1..loss3 Table 2b ablations (loss3 = the paper).
Variants combine with commas: `:row3,smoke`.
Expected result of the paper config (paper Table 1, test set): dose score
2.190, DVH score 1.160.
"""

import pathlib

from randose_jax import config_check
from randose_jax import default_config

# The 26 real patients beside a checkout of this repository.
SHARED_OPENKBP = (
    pathlib.Path(__file__).resolve().parents[2] / "shared" / "openkbp"
)


def _smoke(config):
  config.data.root = config.data.root or str(SHARED_OPENKBP)
  config.data.downsample = 8  # 128^3 -> 16^3
  config.data.num_workers = 0
  config.model.widths = (4, 4, 8, 8, 8)
  config.batch_size = 2
  config.num_train_steps = 6
  config.log_every_steps = 2
  config.eval_every_steps = 3
  config.checkpoint_every_steps = 3
  config.max_eval_patients = 2
  config.progress_bar = False


def _bench_cpu(config):
  config.data.root = config.data.root or str(SHARED_OPENKBP)
  config.data.downsample = 2  # 64^3
  config.model.widths = (8, 16, 32, 64, 128)
  config.model.dtype = "float32"
  config.batch_size = 2


def _cpu_proxy(config):
  # About an hour of learning on 2 CPU cores: the full RANDose at a 64^3
  # training grid (validation still scores the 128^3 reference with the
  # official rules), widths 4..64, Adam 3e-4 (benchmarks/NOTES.md).
  config.data.downsample = 2
  config.model.widths = (4, 8, 16, 32, 64)
  config.model.dtype = "float32"
  config.learning_rate = 3e-4
  config.batch_size = 2
  config.num_train_steps = 1_500
  config.log_every_steps = 25
  config.eval_every_steps = 250
  config.checkpoint_every_steps = 250


def _lossmask(config):
  # The possible-dose mask as a third learned-weight region of the loss
  # (randose_jax/training/losses.py): the body outside the targets and
  # organs, where the dose score is mostly made, gets its own weight.
  if "mask" not in config.loss.regions:
    config.loss.regions = tuple(config.loss.regions) + ("mask",)


def _cpu_best(config):
  # cpu_proxy's network and optimiser at full resolution for the proxy's
  # cost: random 64^3 crops of the 128^3 grid placed around the
  # possible-dose mask (prediction: overlapping windows over the mask's
  # box), each voxel's signed distance to the three PTV levels and to
  # their slabs of slices as input channels, the mask region in the loss,
  # and the EMA of the parameters.
  _cpu_proxy(config)
  config.data.downsample = 1
  config.data.crop_shape = (64, 64, 64)
  config.data.geometry = True
  config.data.geometry_slab = True
  # The possible-dose mask as a third learned-weight region of the loss:
  # 7.69 / 5.24 at step 500 and 5.02 / 2.34 at step 3500 against 8.84 /
  # 6.17 at step 500 without it (same seed; benchmarks/NOTES.md).
  _lossmask(config)
  config.ema_decay = 0.999
  config.num_train_steps = 20_000
  config.eval_every_steps = 500


def _progressive(config):
  # Progressive resizing (data.coarse_steps): the patient's whole extent at
  # 64^3 first, then the training grid (cpu_best: 64^3 crops at full
  # resolution, the same tensor size, so the same compiled step).
  config.data.coarse_steps = 600
  config.data.coarse_downsample = 2


_VARIANTS = {
    "smoke": _smoke,
    "bench_cpu": _bench_cpu,
    "cpu_proxy": _cpu_proxy,
    "cpu_best": _cpu_best,
    "lossmask": _lossmask,
    "progressive": _progressive,
}
for _row, _switches in default_config.ABLATION_ROWS.items():
  _VARIANTS[f"row{_row}"] = lambda c, s=_switches: c.model.update(s)
for _row, _regions in default_config.LOSS_ROWS.items():
  _VARIANTS[f"loss{_row}"] = lambda c, r=_regions: setattr(
      c.loss, "regions", tuple(x for x in r if x)
  )


def get_config(variants: str = ""):
  return config_check.apply_variants(
      default_config.get_default_config(),
      variants,
      _VARIANTS,
      "configs/openkbp.py",
  )
