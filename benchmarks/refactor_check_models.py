"""Before/after evidence for the models/ refactor (issue 12, item 1).

Run from a checkout's root; it imports that checkout's `randose_jax`:

  cd /path/to/old/checkout && python /path/to/this.py --dump /tmp/old.pkl
  cd /path/to/new/checkout && python benchmarks/refactor_check_models.py \
      --dump /tmp/new.pkl --compare /tmp/old.pkl

--dump records, with the public API only (`models.create_model`):
  * the parameter tree (names, shapes, dtypes) of the paper config
    (`configs/openkbp.py`, no variant) and of variants of it, from
    `jax.eval_shape` of `init`;
  * the initial parameters from a seed (rbg key 0) of a small config
    (widths 4,4,8,8,8, 16^3), per conv_impl;
  * forward outputs of that small config with the same seeded numpy
    parameters, per conv_impl and for other options.
--compare prints, per entry, whether the two dumps are identical: trees
equal, arrays equal byte for byte (`tobytes`, so even the sign of a zero).
--runs NEW OLD compares two smoke-run workdirs (`python -m randose_jax.main
--config=configs/openkbp.py:smoke --workdir=...` in each checkout);
--exports NEW OLD two artifacts of them (`python -m randose_jax.cli.export
--workdir=... --output=... --tta --platforms=cpu`, each with its checkout).
Compiles with `jax_disable_most_optimizations` (as the tests do), the same
on both sides.
"""

import argparse
import json
import os
import pickle
import sys
import zipfile

sys.path.insert(0, os.getcwd())  # the checkout being measured

import jax

jax.config.update("jax_disable_most_optimizations", True)

import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from configs import openkbp
import randose_jax
from randose_jax.inference import export
from randose_jax import models

SMALL = (4, 4, 8, 8, 8)
GRID = (16, 16, 16)
TREE_VARIANTS = {
    "paper": {},
    "row1": dict(use_msfe=False, use_csa=False, use_pi=False, use_af=False),
    "row3": dict(use_pi=False, use_af=False),
    "options": dict(
        down="conv",
        up="resize",
        norm="group",
        blocks_per_stage=2,
        stem_kernel=1,
    ),
    "fft_fused_remat": dict(conv_impl="fft", msfe_fused=True, remat=True),
}
FORWARD_VARIANTS = {
    "direct": dict(conv_impl="direct"),
    "fft": dict(conv_impl="fft"),
    "auto": dict(conv_impl="auto"),
    "direct_fused": dict(conv_impl="direct", msfe_fused=True),
    "bfloat16_auto": dict(conv_impl="auto", dtype="bfloat16"),
    "row1_group_resize_auto": dict(
        use_msfe=False,
        use_csa=False,
        use_pi=False,
        use_af=False,
        norm="group",
        up="resize",
        down="conv",
        conv_impl="auto",
    ),
    "row2_none_fft": dict(
        use_csa=False, use_pi=False, use_af=False, norm="none", conv_impl="fft"
    ),
}


def model_config(widths=None, **overrides):
  config = openkbp.get_config().model
  if widths is not None:
    config.widths = widths
  config.update(overrides)
  return config


def inputs(batch=1, seed=0):
  rng = np.random.default_rng(seed)
  shape = (batch, *GRID)
  return {
      "ptv": jnp.asarray((rng.random(shape + (1,)) < 0.3) * 0.9, jnp.float32),
      "ct": jnp.asarray(rng.normal(size=shape + (1,)) * 0.5, jnp.float32),
      "oar": jnp.asarray(rng.random(shape + (7,)) < 0.1, jnp.float32),
  }


def abstract(model):
  x = {
      k: jax.ShapeDtypeStruct((1, *GRID, c), jnp.float32)
      for k, c in (("ptv", 1), ("ct", 1), ("oar", 7))
  }
  return jax.eval_shape(model.init, jax.random.key(0), x)["params"]


def tree(params):
  return {
      "/".join(k): (tuple(v.shape), str(v.dtype))
      for k, v in traverse_util.flatten_dict(params).items()
  }


def seeded_params(abstract_params, seed=0):
  rng = np.random.default_rng(seed)
  flat = traverse_util.flatten_dict(abstract_params)
  out = {}
  for path in sorted(flat):
    leaf = flat[path]
    scale = 1.0 if path[-1] in ("alpha", "beta", "scale") else 0.2
    out[path] = jnp.asarray(rng.normal(size=leaf.shape) * scale, leaf.dtype)
  return traverse_util.unflatten_dict(out)


def dump():
  out = {
      "randose_jax": randose_jax.__file__,
      "trees": {},
      "init": {},
      "forward": {},
  }
  for name, overrides in TREE_VARIANTS.items():
    out["trees"][name] = tree(
        abstract(models.create_model(model_config(**overrides)))
    )
  x = inputs()
  for impl in ("direct", "fft"):
    model = models.create_model(model_config(SMALL, conv_impl=impl))
    params = jax.jit(model.init)(jax.random.key(0, impl="rbg"), x)["params"]
    out["init"][impl] = {
        "/".join(k): np.asarray(v)
        for k, v in traverse_util.flatten_dict(params).items()
    }
  for name, overrides in FORWARD_VARIANTS.items():
    model = models.create_model(model_config(SMALL, **overrides))
    params = seeded_params(abstract(model))
    y = jax.jit(model.apply)({"params": params}, x)
    out["forward"][name] = np.asarray(y)
  return out


def same_bytes(a, b):
  return (
      a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
  )


def compare(new, old):
  print(f"new: {new['randose_jax']}\nold: {old['randose_jax']}")
  ok = True
  for name in TREE_VARIANTS:
    same = new["trees"][name] == old["trees"][name]
    ok &= same
    print(
        f"param tree {name:<16} {len(new['trees'][name]):>4} leaves: "
        f"{'IDENTICAL' if same else 'DIFFERENT'}"
    )
  for impl in new["init"]:
    a, b = new["init"][impl], old["init"][impl]
    same = a.keys() == b.keys() and all(same_bytes(a[k], b[k]) for k in a)
    ok &= same
    print(
        f"init from seed, conv_impl={impl:<7} {len(a):>4} arrays: "
        f"{'BIT-IDENTICAL' if same else 'DIFFERENT'}"
    )
  for name in FORWARD_VARIANTS:
    a, b = new["forward"][name], old["forward"][name]
    same = same_bytes(a, b)
    ok &= same
    verdict = (
        "BIT-IDENTICAL"
        if same
        else (
            f"DIFFERENT, max |diff| {np.abs(a.astype(np.float64) - b).max():g}"
        )
    )
    print(f"forward {name:<24} {str(a.shape):<20} {verdict}")
  print("ALL IDENTICAL" if ok else "DIFFERENCES FOUND")
  return ok


def compare_runs(new_dir, old_dir):
  """Two training workdirs' metrics.jsonl and validation_scores.json: every
  value equal (floats as written, i.e. to the bit of their repr), except
  wall-clock timings (perf/*) and the workdir paths."""
  ok = True
  for name in ("metrics.jsonl", "validation_scores.json"):
    texts = [open(os.path.join(d, name)).read() for d in (new_dir, old_dir)]
    if name.endswith(".jsonl"):
      rows = [[json.loads(line) for line in t.splitlines()] for t in texts]
    else:
      rows = [[json.loads(t)] for t in texts]
    drop = lambda r: {
        k: v
        for k, v in r.items()
        if not k.startswith("perf/")
        and k not in ("predictions", "submission_zip")
    }
    new, old = ([drop(r) for r in rs] for rs in rows)
    values = sum(len(r) for r in new)
    same = new == old
    ok &= same
    print(
        f"{name:<24} {len(new)} rows, {values} values (perf/* and paths "
        f"left out): {'IDENTICAL' if same else 'DIFFERENT'}"
    )
    for a, b in zip(new, old):
      for key in sorted(set(a) | set(b)):
        if a.get(key) != b.get(key):
          print(f"  step {a.get('step')}: {key}: {a.get(key)} != {b.get(key)}")
  return ok


def compare_exports(new_path, old_path):
  """Two `randose_jax.cli.export` artifacts of those workdirs: the same members,
  meta.json (but for the workdir-dependent config paths), params.npz
  byte for byte, the exported function's input and output shapes, and its
  output on one seeded patient, to the bit."""
  zips = [zipfile.ZipFile(p) for p in (new_path, old_path)]
  ok = True
  names = [sorted(z.namelist()) for z in zips]
  same = names[0] == names[1]
  ok &= same
  print(f"members {names[0]}: {'IDENTICAL' if same else names[1]}")
  metas = [json.loads(z.read("meta.json")) for z in zips]
  for m in metas:
    m["config"]["data"].pop("cache_dir", None)
  same = metas[0] == metas[1]
  ok &= same
  print(f"meta.json: {'IDENTICAL' if same else 'DIFFERENT'}")
  same = zips[0].read("params.npz") == zips[1].read("params.npz")
  ok &= same
  print(f"params.npz: {'BYTE-IDENTICAL' if same else 'DIFFERENT'}")
  models_ = [export.load(p) for p in (new_path, old_path)]
  avals = [
      (str(m.exported.in_avals), str(m.exported.out_avals)) for m in models_
  ]
  same = avals[0] == avals[1]
  ok &= same
  print(
      f"exported in/out avals {avals[0][1]}: "
      f"{'IDENTICAL' if same else 'DIFFERENT'}"
  )
  rng = np.random.default_rng(0)
  grid = models_[0].grid
  x = (
      rng.normal(size=grid) * 500,  # ct_hu
      rng.random((*grid, 10)) < 0.1,  # structure_masks
      rng.random(grid) < 0.5,  # possible_dose_mask
      np.array([3.9, 3.9, 2.5]),  # voxel_dimensions
  )
  ys = [m(*x) for m in models_]
  same = same_bytes(ys[0], ys[1])
  ok &= same
  print(
      f"exported output {ys[0].shape}: "
      f"{'BIT-IDENTICAL' if same else 'DIFFERENT'}"
  )
  return ok


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--dump")
  parser.add_argument("--compare", default=None)
  parser.add_argument(
      "--runs",
      nargs=2,
      metavar=("NEW", "OLD"),
      help="compare two smoke-run workdirs instead",
  )
  parser.add_argument(
      "--exports",
      nargs=2,
      metavar=("NEW", "OLD"),
      help="compare two exported artifacts instead",
  )
  args = parser.parse_args()
  if args.runs:
    sys.exit(0 if compare_runs(*args.runs) else 1)
  if args.exports:
    sys.exit(0 if compare_exports(*args.exports) else 1)
  result = dump()
  with open(args.dump, "wb") as f:
    pickle.dump(result, f)
  if args.compare:
    with open(args.compare, "rb") as f:
      sys.exit(0 if compare(result, pickle.load(f)) else 1)


if __name__ == "__main__":
  main()
