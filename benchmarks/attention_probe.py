"""What the attention gates do while a model trains on real patients.

Trains one variant (as `learning_curves.py` does: the real pipeline and
`Trainer.jit_train_step`) and, at step 0 and every `--probe_every` steps,
runs the model on a fixed training batch with `mutable=['intermediates']`
and prints, per sown attention map (CSA channel / spatial weights, PI's
spatial attention): mean, min, max and the spread over voxels; the learned
alpha / beta; the prediction inside and outside the PTVs; and the gradient
norm of each top-level parameter group. Writes a JSON of the same.

  python benchmarks/attention_probe.py --data_root=/data/openkbp \
      --cache_dir=/data/cache --variant=row3 --steps=100 \
      --set=data.downsample=4 --set=model.widths=4,8,16,32,64
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys

_HERE = pathlib.Path(__file__).resolve().parent
sys.path.insert(0, str(_HERE))
if str(_HERE.parent) not in sys.path:
  sys.path.insert(1, str(_HERE.parent))

import common  # noqa: E402
import learning_curves  # noqa: E402

import flax  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from randose_jax.inference import forward as inference  # noqa: E402
from randose_jax.training import train  # noqa: E402
from randose_jax.data import pipeline  # noqa: E402


def summarise(trainer, params, batch) -> dict:
  inputs = inference.model_inputs(batch)
  pred, inter = trainer.model.apply(
      {"params": params["model"]}, inputs, mutable=["intermediates"]
  )
  out = {"attention": {}, "prediction": {}, "scalars": {}, "grad_norms": {}}
  flat = flax.traverse_util.flatten_dict(
      inter.get("intermediates", {}), sep="/"
  )
  ptv = np.asarray(batch["ptv"])[..., 0] > 0
  for path, values in flat.items():
    if not path.endswith("attention"):
      continue
    a = np.asarray(values[0], np.float32)
    stats = {
        "mean": float(a.mean()),
        "min": float(a.min()),
        "max": float(a.max()),
        "spatial_std": 0.0,
    }
    if a.ndim == 5:
      stats["spatial_std"] = float(
          a.reshape(a.shape[0], -1, a.shape[-1]).std(axis=1).mean()
      )
      if a.shape[1:4] == ptv.shape[1:4]:  # full-grid map: gate in the PTVs
        stats["ptv_mean"] = float(a[..., 0][ptv].mean())
    out["attention"][path] = stats
  pred = np.asarray(pred)[..., 0]
  mask = np.asarray(batch["mask"])[..., 0] > 0
  target = np.asarray(batch["target"])[..., 0]
  out["prediction"] = {
      "ptv_mean": float(pred[ptv].mean()),
      "ptv_target": float(target[ptv].mean()),
      "mask_nonptv_mean": float(pred[mask & ~ptv].mean()),
      "mask_nonptv_target": float(target[mask & ~ptv].mean()),
      "outside_mean": float(pred[~mask].mean()),
      "std_in_mask": float(pred[mask].std()),
  }
  for path, v in flax.traverse_util.flatten_dict(
      params["model"], sep="/"
  ).items():
    if path.rsplit("/", 1)[-1] in ("alpha", "beta"):
      out["scalars"][path] = float(np.asarray(v))

  def loss_fn(p):
    pr = trainer.model.apply({"params": p["model"]}, inputs)
    return trainer.loss_module.apply(
        {"params": p["loss"]}, pr, batch["target"], batch["ptv"], batch["oar"]
    )[0]

  grads = jax.grad(loss_fn)(params)
  for name, g in grads["model"].items():
    out["grad_norms"][name] = float(
        jnp.sqrt(sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(g)))
    )
  return out


def print_summary(step, s):
  print(
      f"--- step {step}: prediction in PTV {s['prediction']['ptv_mean']:.3f}"
      f" (target {s['prediction']['ptv_target']:.3f}), rest of mask "
      f"{s['prediction']['mask_nonptv_mean']:.3f} (target "
      f"{s['prediction']['mask_nonptv_target']:.3f}), outside "
      f"{s['prediction']['outside_mean']:.3f}"
  )
  for path, a in s["attention"].items():
    in_ptv = f" in PTVs {a['ptv_mean']:.3f}" if "ptv_mean" in a else ""
    print(
        f"  {path:<60} mean {a['mean']:.3f} min {a['min']:.3f} max "
        f"{a['max']:.3f} spatial std {a['spatial_std']:.3f}{in_ptv}"
    )
  print(
      "  scalars: " + ", ".join(f"{k}={v:.3f}" for k, v in s["scalars"].items())
  )
  print(
      "  grad norms: "
      + ", ".join(f"{k}={v:.2e}" for k, v in s["grad_norms"].items())
  )


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--config", default="configs/openkbp.py:bench_cpu")
  p.add_argument("--data_root", required=True)
  p.add_argument("--cache_dir", default="/tmp/randose_learning_cache")
  p.add_argument("--variant", default="row3")
  p.add_argument("--set", action="append", default=[])
  p.add_argument("--steps", type=int, default=100)
  p.add_argument("--probe_every", type=int, default=50)
  p.add_argument("--json", default="")
  args = p.parse_args(argv)
  name, config = learning_curves.variant_config(
      args.config, args.variant, args.set
  )
  config.data.root = args.data_root
  config.data.cache_dir = args.cache_dir
  config.data.num_workers = 0
  train_cache, _, _ = train.prepare_data(config, pathlib.Path("/tmp"))
  trainer = train.Trainer.create(config)
  state = trainer.init_state(config.seed)
  it = iter(pipeline.train_dataset(train_cache, config, seed=config.seed))
  probe_batch = next(
      iter(pipeline.train_dataset(train_cache, config, seed=config.seed + 1))
  )
  probe_batch = {k: jnp.asarray(v) for k, v in probe_batch.items()}
  result = {
      "variant": name,
      "config": args.config,
      "overrides": args.set,
      "machine": common.machine_info(),
      "probes": [],
  }
  for step in range(0, args.steps + 1):
    if step % args.probe_every == 0:
      s = summarise(trainer, jax.device_get(state.params), probe_batch)
      print_summary(step, s)
      result["probes"].append({"step": step, **s})
    if step == args.steps:
      break
    state, _ = trainer.jit_train_step(state, trainer.shard_batch(next(it)))
  path = pathlib.Path(
      args.json or common.RESULTS_DIR / f"attention_probe_{name}.json"
  )
  path.parent.mkdir(parents=True, exist_ok=True)
  path.write_text(json.dumps(result, indent=1) + "\n")
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
