"""The whole prediction path as one JAX function: what `export` serializes.

`make_predict_fn(model, data_config, grid, tta=)` returns
`fn(params, ct_hu, structure_masks, possible_dose_mask, voxel_dimensions)`
-> dose in Gy on the patient's grid, doing inside one jit what
`Predictor.predict_doses` does on the host:

  - encoding (`encoding.encode_patient`, docs/design.md section 2): ct
    clipped and scaled, PTV levels (their max), OAR channels, the mask;
    block means (mask: max) at `downsample` > 1;
  - the geometry channels (`distances.dense`): signed Euclidean distances
    to each PTV by an exact separable squared-distance transform
    (`squared_edt`, min-plus along each line) on the whole grid, `FAR` outside the mask-and-PTV box
    grown by one voxel (the values inside it do not depend on the box:
    tests/test_standalone.py), rounded to float16 as the memo keeps them;
  - a crop-trained model's windows over the mask's box
    (`Predictor.predict_examples`): the starts of `window_starts` looked up
    in a table of every (lo, hi) pair, a fixed number of windows per axis
    (the most any box needs), the unused ones skipped (`lax.cond`) and
    given no weight, blended with `blend_weights` in the same order;
  - decoding (`encoding.decode_dose`): trilinear upsample, x dose_scale,
    clipped at 0, zero outside the mask.

One patient per call (no batch axis): the grid is fixed, so one compile.
"""

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from randose_jax import conventions
from randose_jax.inference import forward as inference
from randose_jax.inference import predictor as predictor_lib
from randose_jax.data import distances
from randose_jax.data import encoding

_NUM_OARS = len(conventions.OAR_NAMES)
_NUM_TARGETS = len(conventions.TARGET_NAMES)
_UNREACHED = np.float32(1e20)  # squared mm: no feature voxel on the line


def _first_axis_d2(features, spacing):
  """Squared distance along axis 0 to the nearest feature voxel of the
  line: the nearest feature index on each side (cumulative max / min)."""
  n = features.shape[0]
  at = jnp.arange(n, dtype=jnp.float32).reshape((n,) + (1,) * 3)
  left = jax.lax.cummax(jnp.where(features, at, -jnp.inf), axis=0)
  right = jax.lax.cummin(jnp.where(features, at, jnp.inf), axis=0, reverse=True)
  steps = jnp.minimum(at - left, right - at)
  return jnp.where(jnp.isinf(steps), _UNREACHED, (steps * spacing) ** 2)


def _min_plus_last(d2, spacing):
  """min over y of d2[..., y] + ((x - y) * spacing)^2 along the last axis,
  one slice of axis 0 per `lax.map` step (the sum is fused into the min:
  no (n, n) copy of a line is kept)."""
  n = d2.shape[-1]
  step = np.arange(n)
  offsets = (step[:, None] - step[None, :]).astype(np.float32)
  cost = (offsets * spacing) ** 2  # (x, y)
  return jax.lax.map(lambda x: jnp.min(x[..., None, :] + cost, axis=-1), d2)


def squared_edt(features: jax.Array, spacing: jax.Array) -> jax.Array:
  """Squared Euclidean distance (mm^2) of every voxel centre to the nearest
  feature voxel, float32 (D, H, W, C) for bool features (D, H, W, C).

  Exact and separable: along axis 0 the distance to the line's nearest
  feature, then per grid axis a = 1, 2 d2(x) = min_y d2(y) + ((x - y) *
  spacing[a])^2 along each line (6 channels at 128^3: 1.2 s on 2 idle CPU
  cores, 3 s beside a training run; scipy's on the box: 0.3 s). A channel without feature voxels stays at `_UNREACHED`
  (1e20)."""
  spacing = jnp.asarray(spacing, jnp.float32)
  d2 = _first_axis_d2(features, spacing[0])
  for axis in (1, 2):
    along_last = jnp.moveaxis(d2, axis, -1)
    d2 = jnp.moveaxis(_min_plus_last(along_last, spacing[axis]), -1, axis)
  return d2


def _box(occupied: jax.Array):
  """(lo, hi) int32 (3,), inclusive, of the True voxels of a (D, H, W)
  bool array; the whole grid when there are none."""
  los, his = [], []
  for axis in range(3):
    n = occupied.shape[axis]
    along = jnp.any(occupied, axis=tuple(a for a in range(3) if a != axis))
    found = jnp.any(along)
    los.append(jnp.where(found, jnp.argmax(along), 0))
    his.append(jnp.where(found, n - 1 - jnp.argmax(along[::-1]), n - 1))
  return jnp.stack(los).astype(jnp.int32), jnp.stack(his).astype(jnp.int32)


def _in_box(grid, lo, hi) -> jax.Array:
  """bool (D, H, W): inside [lo, hi] on every axis."""
  inside = jnp.ones(grid, bool)
  for axis, n in enumerate(grid):
    shape = [1, 1, 1]
    shape[axis] = n
    at = jnp.arange(n).reshape(shape)
    inside = inside & (at >= lo[axis]) & (at <= hi[axis])
  return inside


def _slab_distances(targets, spacing):
  """float32 (D, H, W, 3): for each PTV, the distance in mm along axis 2
  from each voxel's slice to the nearest slice holding it (`distances`'
  slab channels; large where the PTV is absent)."""
  w = targets.shape[2]
  held = jnp.any(targets, axis=(0, 1))  # (W, 3)
  k = jnp.arange(w, dtype=jnp.float32)
  gap = jnp.abs(k[:, None] - k[None, :])[..., None]  # (W, W, 1)
  nearest = jnp.min(jnp.where(held[None], gap, jnp.float32(1e9)), axis=1)
  return jnp.broadcast_to(
      (nearest * spacing[2])[None, None], targets.shape
  ).astype(jnp.float32)


def ptv_distances(targets, possible_dose_mask, spacing, scale_mm, slab=False):
  """`distances.dense` in JAX: float32 (D, H, W, 3, or 6 with `slab`) of
  bool targets (D, H, W, 3) (PTV56, PTV63, PTV70) and mask (D, H, W)."""
  grid = targets.shape[:3]
  d2 = squared_edt(jnp.concatenate([targets, ~targets], -1), spacing)
  signed = jnp.sqrt(d2[..., :_NUM_TARGETS]) - jnp.sqrt(d2[..., _NUM_TARGETS:])
  if slab:
    signed = jnp.concatenate([signed, _slab_distances(targets, spacing)], -1)
  lo, hi = _box(possible_dose_mask | jnp.any(targets, -1))
  lo, hi = jnp.maximum(lo - 1, 0), jnp.minimum(hi + 1, jnp.array(grid) - 1)
  present = jnp.any(targets, axis=(0, 1, 2))
  if slab:
    present = jnp.concatenate([present, present])
  keep = _in_box(grid, lo, hi)[..., None] & present
  out = jnp.where(
      keep,
      jnp.clip(signed / jnp.float32(scale_mm), *distances.GEOMETRY_CLIP),
      jnp.float32(distances.FAR),
  )
  return out.astype(jnp.float16).astype(jnp.float32)  # as the memo keeps it


def _block_sum(x, f):
  d, h, w, c = x.shape
  return x.reshape(d // f, f, h // f, f, w // f, f, c).sum(axis=(1, 3, 5))


def encode(ct_hu, structure_masks, possible_dose_mask, spacing, data_config):
  """`encoding.encode_patient` in JAX (no target): the model inputs and
  mask, float32 (d, h, w, C) at the training grid."""
  lo, hi = data_config.ct_clip
  targets = structure_masks[..., _NUM_OARS:]
  levels = jnp.asarray(data_config.ptv_values, jnp.float32)
  dense = {
      "ptv": jnp.max(
          jnp.where(targets, levels, jnp.float32(0)), -1, keepdims=True
      ),
      "ct": (
          jnp.clip(ct_hu.astype(jnp.float32), lo, hi)
          / jnp.float32(data_config.ct_scale)
      )[..., None],
      "oar": structure_masks[..., :_NUM_OARS].astype(jnp.float32),
      "mask": possible_dose_mask[..., None].astype(jnp.float32),
  }
  spec = encoding.geometry_spec(data_config)
  if spec is not None:
    dense["geom"] = ptv_distances(
        targets, possible_dose_mask, spacing, spec[0], slab=spec[1]
    )
  f = int(data_config.downsample)
  if f == 1:
    return dense
  mean = jnp.float32(1.0 / f**3)
  out = {k: _block_sum(x, f) * mean for k, x in dense.items() if k != "mask"}
  d, h, w, _ = dense["mask"].shape
  out["mask"] = (
      dense["mask"].reshape(d // f, f, h // f, f, w // f, f, 1).max((1, 3, 5))
  )
  return out


def _upsample_linear(x, axis, factor):
  """`encoding._upsample_linear` in JAX (float32)."""
  n = x.shape[axis]
  coord = (np.arange(n * factor) + 0.5) / factor - 0.5
  lower = np.floor(coord).astype(np.int64)
  weight = (coord - lower).astype(np.float32)
  weight = weight.reshape([-1 if a == axis else 1 for a in range(x.ndim)])
  below = jnp.take(x, np.clip(lower, 0, n - 1), axis=axis)
  above = jnp.take(x, np.clip(lower + 1, 0, n - 1), axis=axis)
  return below + weight * (above - below)


def start_table(n: int, size: int, overlap: float):
  """(starts int32 (n, n, K), counts int32 (n, n)): `window_starts(lo, hi,
  size, n, overlap)` for every lo <= hi, K the most windows any needs."""
  lists = {
      (lo, hi): predictor_lib.window_starts(lo, hi, size, n, overlap)
      for lo in range(n)
      for hi in range(lo, n)
  }
  most = max(len(s) for s in lists.values())
  starts = np.zeros((n, n, most), np.int32)
  counts = np.zeros((n, n), np.int32)
  for (lo, hi), s in lists.items():
    starts[lo, hi, : len(s)] = s
    counts[lo, hi] = len(s)
  return starts, counts


def _windowed(forward, inputs, mask, window, overlap):
  """`Predictor.predict_examples` for one example with static shapes:
  (d, h, w) target units, 0 outside every window."""
  grid = mask.shape
  if any(c > n for c, n in zip(window, grid)):
    raise ValueError(
        f"config.data.crop_shape={window} is larger than the grid {grid}"
    )
  lo, hi = _box(mask > 0)
  tables = [start_table(n, c, overlap) for n, c in zip(grid, window)]
  starts = [jnp.asarray(s)[lo[a], hi[a]] for a, (s, _) in enumerate(tables)]
  counts = [jnp.asarray(c)[lo[a], hi[a]] for a, (_, c) in enumerate(tables)]
  # Every combination, in itertools.product order as predict_examples.
  plan = np.array(
      list(itertools.product(*(range(s.shape[-1]) for s, _ in tables))),
      np.int32,
  )
  weights = jnp.asarray(predictor_lib.blend_weights(tuple(window)))

  def step(carry, index):
    total, norm = carry
    start = tuple(starts[a][index[a]] for a in range(3))
    used = jnp.all(jnp.stack([index[a] < counts[a] for a in range(3)]))

    def run():
      piece = {
          k: jax.lax.dynamic_slice(x, (*start, 0), (*window, x.shape[-1]))
          for k, x in inputs.items()
      }
      return forward({k: x[None] for k, x in piece.items()})[0, ..., 0]

    pred = jax.lax.cond(used, run, lambda: jnp.zeros(window, jnp.float32))
    w = weights * used.astype(jnp.float32)
    add = lambda acc, x: jax.lax.dynamic_update_slice(
        acc, jax.lax.dynamic_slice(acc, start, window) + x, start
    )
    return (add(total, w * pred), add(norm, w)), None

  zeros = jnp.zeros(grid, jnp.float32)
  (total, norm), _ = jax.lax.scan(step, (zeros, zeros), plan)
  return total / jnp.maximum(norm, 1e-12)


def make_predict_fn(model, data_config, *, tta: bool = False):
  """fn(params, ct_hu float32 (D, H, W), structure_masks bool (D, H, W, 10)
  (`conventions.ROI_NAMES` order), possible_dose_mask bool (D, H, W),
  voxel_dimensions float32 (3,) mm) -> float32 (D, H, W) Gy (module doc).
  `params` are the model's parameters (any pytree)."""
  window = tuple(int(n) for n in data_config.get("crop_shape", ()) or ())
  overlap = float(data_config.get("window_overlap", 0.5))
  swap = bool(data_config.swap_parotids)
  f = int(data_config.downsample)

  def fn(params, ct_hu, structure_masks, possible_dose_mask, voxel_dimensions):
    encoding.training_grid(ct_hu.shape, f)  # a clear error before tracing
    structure_masks = structure_masks.astype(bool)
    possible_dose_mask = possible_dose_mask.astype(bool)
    example = encode(
        ct_hu,
        structure_masks,
        possible_dose_mask,
        voxel_dimensions.astype(jnp.float32),
        data_config,
    )
    apply_fn = inference.make_apply_fn(model, params)
    forward = lambda x: inference.predict(apply_fn, x, tta, swap)
    inputs = inference.model_inputs(example)
    if window:
      pred = _windowed(
          forward, inputs, example["mask"][..., 0], window, overlap
      )
    else:
      pred = forward({k: x[None] for k, x in inputs.items()})[0, ..., 0]
    if f > 1:
      for axis in range(3):
        pred = _upsample_linear(pred, axis, f)
    dose = jnp.maximum(pred * jnp.float32(data_config.dose_scale), 0)
    return jnp.where(possible_dose_mask, dose, jnp.float32(0))

  return fn
