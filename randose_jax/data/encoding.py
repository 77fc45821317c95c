"""Network inputs and targets from a patient, and predictions back to Gy.

docs/design.md section 2, with the config fields of `config.data`:
  ptv     (D, H, W, 1): max over present PTVs of `ptv_values` (PTV56, PTV63,
          PTV70 levels; 0.8, 0.9, 1.0 by default), 0 elsewhere.
  ct      (D, H, W, 1): HU clipped to `ct_clip`, divided by `ct_scale`.
  oar     (D, H, W, 7): the seven OAR masks, official order, 0/1.
  target  (D, H, W, 1): dose / `dose_scale` (zeros for a patient without dose).
  mask    (D, H, W, 1): the possible-dose mask, 0/1.
  geom    (D, H, W, 3): only with `geometry` on: the signed distances to
          PTV56, PTV63, PTV70 (`distances` module), a model input.

The same numbers come in two forms, both made here:
  - dense (`encode_patient`): the dict above, float32 at the training grid;
    what validation, `predict` and `export` feed the network.
  - packed (`encode_planes`): what the training pipeline reads, augments
    (`augment.transform`), batches and finally unpacks (`unpack`) into the
    dense form. An array is kept as rows: a row is the w voxels along axis 2
    of one (axis 0, axis 1) pixel, and only the rows holding something other
    than the array's background (`background`: air for ct, 0 otherwise) are
    stored. At downsample 1 the 0/1 channels travel as bits of one uint16
    `codes` array: OAR channel c in bit c, the possible-dose mask in bit
    `MASK_BIT`, PTV56, PTV63, PTV70 in bits `PTV_SHIFT` + 0, 1, 2. A 128^3
    patient is then a few MB instead of 92.
The dense form is the packed form unpacked (and block-reduced at downsample
> 1), so each convention (`encoded_ct`, `encoded_dose`, the bits and
`_code_tables`) is written once.

Planes (`encode_planes`, the input of `augment.transform`): grid (d, h, w)
and, per array key, `<key>` (R, w, C) rows, `<key>_map` int32 (d*h,) (the
row holding each pixel) and `<key>_active` bool (d*h,) (pixels whose row is
not all background). From the voxel lists (downsample 1): keys ct, target,
codes; only the active rows are stored, plus one background row last, which
every other pixel maps to. From a dense example (downsample > 1, fractional
channels): the keys of `ALL_KEYS`, all rows, the identity map.

A pack (`augment.transform`, `pipeline.PackedBatch`, input of `unpack`):
grid (b, d, h, w) and, per array key, `<key>_rows` int32 (S,) (rows of the
(b*d*h, w) batch that hold something) and `<key>` (S, w, C) their values;
every other row is background.

`downsample` = f > 1 trains on the grid reduced f times per axis: every
channel becomes the mean over its f^3 block (PTV and OAR channels become
fractional occupancies, so `ptv > 0` still marks every block touching a PTV),
except `mask`, which is the max over its block (1 where any voxel of the block
can receive dose), so it stays 0/1 and never hides a deliverable voxel. (The
0/1 channels, oar and mask, are counted per block from the voxel lists: the
same numbers to the bit, without a dense pass.)
`decode_dose` brings a prediction back with trilinear interpolation
(voxel-centre aligned, edges clamped): dose is smooth, and nearest-neighbour
blocks would add a staircase error to every voxel.
"""

from __future__ import annotations

import functools

import numpy as np

from randose_jax import conventions
from randose_jax.data import distances
from randose_jax.data import openkbp

KEYS = ("ptv", "ct", "oar", "target", "mask")  # every example's
OPTIONAL_KEYS = ("geom",)  # made only when the settings ask for them
ALL_KEYS = KEYS + OPTIONAL_KEYS
ARRAY_KEYS = ALL_KEYS + ("codes",)  # the arrays planes and packs may hold
MASK_BIT = 7
PTV_SHIFT = 8
_NUM_OARS = len(openkbp.OAR_NAMES)


# ----------------------------------------------------------- conventions


def encoded_ct(stored: np.ndarray, settings) -> np.ndarray:
  """float32 ct input of stored CT values (HU + 1024, float32)."""
  lo, hi = settings.ct_clip
  hu = np.clip(stored - np.float32(openkbp.CT_OFFSET), lo, hi)
  return hu / np.float32(settings.ct_scale)


def air_value(settings) -> float:
  """The encoded ct of air (stored 0, i.e. -1024 HU, left out of ct.csv)."""
  return float(encoded_ct(np.float32(0), settings))


def encoded_dose(gy: np.ndarray, settings) -> np.ndarray:
  """float32 target of a dose in Gy."""
  return (gy / settings.dose_scale).astype(np.float32)


def background(key: str, settings) -> float:
  """The value of an array's empty voxels: air for ct, far from every PTV
  for geom, 0 otherwise."""
  if key == "geom":
    return distances.FAR
  return air_value(settings) if key == "ct" else 0.0


def geometry_spec(settings) -> tuple[float, bool] | None:
  """(mm per unit, slab channels too) of the geom input, or None when
  `geometry` is off (also for settings saved before the option existed)."""
  if not getattr(settings, "geometry", False):
    return None
  return (
      float(settings.geometry_scale_mm),
      bool(getattr(settings, "geometry_slab", False)),
  )


def input_channels(settings) -> dict[str, int]:
  """The model's inputs and their channels for these encoding settings."""
  channels = dict(conventions.INPUT_CHANNELS)
  spec = geometry_spec(settings)
  if spec is not None:
    channels["geom"] = distances.num_channels(spec[1])
  return channels


@functools.lru_cache(maxsize=8)
def _code_tables(ptv_values: tuple[float, ...]):
  """(oar float32 (128, 7), ptv float32 (8,)): the channels of a code's OAR
  bits and PTV bits (the max of the present PTVs' levels)."""
  bits = np.arange(1 << _NUM_OARS)[:, None] >> np.arange(_NUM_OARS) & 1
  ptv = np.zeros(8, np.float32)
  for code in range(8):
    for j, level in enumerate(ptv_values):
      if code >> j & 1:
        ptv[code] = np.maximum(ptv[code], level)
  return bits.astype(np.float32), ptv


# ----------------------------------------------------------- packed form


def _voxel_planes(patient: openkbp.SparsePatient, settings) -> dict:
  """The planes of a patient at its own grid, from its voxel lists: ct,
  target (float32) and codes (uint16), active rows and a background row."""
  d, h, w = patient.grid_shape
  num_rows = d * h
  planes = {"grid": (d, h, w)}
  # Row of a voxel: index // w, a shift when w is a power of two (int64
  # division is not vectorised and would cost more than the rest).
  shift = w.bit_length() - 1 if w & (w - 1) == 0 else None
  row_of = (
      (lambda index: index >> shift)
      if shift is not None
      else (lambda index: index // w)
  )

  def add(key, dtype, lists):
    """lists: (voxel index, values) of the voxels that are not background;
    values an array (set) or an int (bits to set)."""
    active = np.zeros(num_rows, bool)
    rows = [row_of(index) for index, _ in lists]
    for row in rows:
      active[row] = True
    stored = np.flatnonzero(active)
    row_map = np.full(num_rows, stored.size, np.int32)
    row_map[stored] = np.arange(stored.size, dtype=np.int32)
    values = np.full((stored.size + 1, w, 1), background(key, settings), dtype)
    flat = values.reshape(-1)
    for row, (index, value) in zip(rows, lists):
      position = row_map[row] * np.int64(w) + (index - row * w)
      if isinstance(value, np.ndarray):
        flat[position] = value
      else:
        flat[position] |= dtype(value)
    planes.update({key: values, key + "_active": active, key + "_map": row_map})

  ct = encoded_ct(patient.ct_value, settings)
  not_air = ct != np.float32(air_value(settings))
  add("ct", np.float32, [(patient.ct_index[not_air], ct[not_air])])

  dose = []
  if patient.dose_index is not None:
    target = encoded_dose(patient.dose_value, settings)
    nonzero = target != 0
    dose.append((patient.dose_index[nonzero], target[nonzero]))
  add("target", np.float32, dose)

  bits = [
      (index, 1 << c) for c, index in enumerate(patient.roi_index[:_NUM_OARS])
  ]
  bits.append((patient.mask_index, 1 << MASK_BIT))
  bits += [
      (index, 1 << (PTV_SHIFT + j))
      for j, index in enumerate(patient.roi_index[_NUM_OARS:])
  ]
  add("codes", np.uint16, [(index, bit) for index, bit in bits if index.size])
  spec = geometry_spec(settings)
  if spec is not None:
    planes.update(_geometry_planes(patient, *spec))
  return planes


def _geometry_planes(
    patient: openkbp.SparsePatient, scale: float, slab: bool
) -> dict:
  """The geom planes: the rows of the distance box's pixels (the box's
  values along axis 2, `distances.FAR` beyond it) and one background row."""
  d, h, w = patient.grid_shape
  lo, box = distances.ptv_distances(patient, scale, slab)
  bd, bh, bw = box.shape[:3]
  active = np.zeros((d, h), bool)
  active[lo[0] : lo[0] + bd, lo[1] : lo[1] + bh] = True
  active = active.reshape(-1)
  num = bd * bh
  values = np.full((num + 1, w, box.shape[-1]), distances.FAR, np.float32)
  values[:num, lo[2] : lo[2] + bw] = box.reshape(num, bw, -1)
  row_map = np.full(d * h, num, np.int32)
  row_map[active] = np.arange(num, dtype=np.int32)
  return {"geom": values, "geom_active": active, "geom_map": row_map}


def planes_of(example: dict, settings) -> dict:
  """The planes of a dense example (arrays (D, H, W, C) of `ALL_KEYS`; other
  keys are left out): every row, the identity map."""
  arrays = {
      key: np.ascontiguousarray(example[key])
      for key in ALL_KEYS
      if key in example
  }
  d, h, w = next(iter(arrays.values())).shape[:3]
  planes = {"grid": (d, h, w)}
  identity = np.arange(d * h, dtype=np.int32)
  for key, x in arrays.items():
    rows = x.reshape(d * h, -1)
    empty = x.dtype.type(background(key, settings))
    active = (rows.max(1) != empty) | (rows.min(1) != empty)
    planes.update(
        {
            key: x.reshape(d * h, w, -1),
            key + "_active": active,
            key + "_map": identity,
        }
    )
  return planes


def encode_planes(patient: openkbp.SparsePatient, settings) -> dict:
  """The packed form of a patient at the training grid (module doc).

  Args:
    patient: a `SparsePatient` (e.g. `PatientCache.sparse(i)`).
    settings: the encoding fields of `config.data` (`cache.encoding_settings`).
  """
  if int(settings.downsample) == 1:
    return _voxel_planes(patient, settings)
  return planes_of(encode_patient(patient, settings), settings)


def _decode_codes(
    rows: np.ndarray, codes: np.ndarray, n: int, w: int, ptv_values
) -> dict:
  """ptv, oar, mask (n, w, C) float32 of the codes (S, w) at rows (S,)."""
  oar_table, ptv_table = _code_tables(tuple(float(v) for v in ptv_values))
  mask = np.zeros((n, w), np.float32)
  mask[rows] = (codes >> MASK_BIT) & 1
  # OARs and PTVs fill a fraction of the rows the mask does: decode those only.
  oar_bits = codes & np.uint16((1 << _NUM_OARS) - 1)
  some = np.flatnonzero(oar_bits.any(1))
  oar = np.zeros((n, w, _NUM_OARS), np.float32)
  oar[rows[some]] = oar_table[oar_bits[some]]
  ptv_bits = codes >> PTV_SHIFT
  some = np.flatnonzero(ptv_bits.any(1))
  ptv = np.zeros((n, w), np.float32)
  ptv[rows[some]] = ptv_table[ptv_bits[some] & 7]
  return {"ptv": ptv[..., None], "oar": oar, "mask": mask[..., None]}


def unpack(pack: dict, settings) -> dict:
  """The dense form of a pack (module doc) or a batch of packs.

  Args:
    pack: grid (b, d, h, w) and, per array, its rows and their values.
    settings: the encoding fields of `config.data` (ptv_values, ct_clip,
      ct_scale).

  Returns:
    The arrays of `ALL_KEYS` the pack holds (codes give ptv, oar, mask), each
    float32 (b, d, h, w, c).
  """
  b, d, h, w = (int(n) for n in pack["grid"])
  n = b * d * h
  out = {}
  for key in ARRAY_KEYS:
    if key not in pack:
      continue
    rows, values = pack[key + "_rows"], pack[key]
    if key == "codes":
      out.update(_decode_codes(rows, values[..., 0], n, w, settings.ptv_values))
      continue
    empty = background(key, settings)
    x = (
        np.full((n, w, values.shape[-1]), empty, np.float32)
        if empty
        else (np.zeros((n, w, values.shape[-1]), np.float32))
    )
    x[rows] = values
    out[key] = x
  return {
      key: out[key].reshape(b, d, h, w, -1) for key in ALL_KEYS if key in out
  }


# ------------------------------------------------------------ dense form


def training_grid(grid_shape, downsample: int) -> tuple[int, int, int]:
  """The grid the network sees for a patient grid and downsample factor."""
  if downsample < 1 or any(n % downsample for n in grid_shape):
    raise ValueError(
        f"config.data.downsample={downsample} must be a positive "
        f"divisor of the grid {tuple(grid_shape)}"
    )
  return tuple(n // downsample for n in grid_shape)


def block_reduce(x: np.ndarray, factor: int, how: str = "mean") -> np.ndarray:
  """Mean or max over factor^3 blocks of the first three axes of x (D,H,W,C).

  Reduces one axis at a time over (outer, factor, inner) views, where numpy
  adds whole contiguous slabs (a single 6-axis reduction is several times
  slower).
  """
  if factor == 1:
    return x
  d, h, w = training_grid(x.shape[:3], factor)
  reduce = np.maximum.reduce if how == "max" else np.add.reduce
  c = x.shape[3]
  x = reduce(x.reshape(d, factor, -1), axis=1)  # (d, H*W*C)
  x = reduce(x.reshape(d * h, factor, -1), axis=1)  # (d*h, W*C)
  x = reduce(x.reshape(d * h * w, factor, c), axis=1)  # (d*h*w, C)
  x = x.reshape(d, h, w, c)
  return x if how == "max" else x * np.float32(1.0 / factor**3)


def encode_patient(
    patient: openkbp.Patient | openkbp.SparsePatient, data_config
) -> dict[str, np.ndarray]:
  """The network's inputs and target for one patient (see the module doc).

  Args:
    patient: a `Patient`, or the `SparsePatient` the cache holds (faster).
    data_config: `config.data` (ptv_values, ct_clip, ct_scale, dose_scale,
      downsample).

  Returns:
    dict of float32 arrays at the training grid (grid // downsample):
    ptv (d,h,w,1), ct (d,h,w,1), oar (d,h,w,7), target (d,h,w,1),
    mask (d,h,w,1); with `geometry` on, also geom (d,h,w,3).
  """
  if isinstance(patient, openkbp.Patient):
    patient = openkbp.SparsePatient.from_patient(patient)
  f = int(data_config.downsample)
  training_grid(patient.grid_shape, f)  # validates f before any work
  planes = _voxel_planes(patient, data_config)
  # The stored rows are the active ones, in order, the background row last.
  stored = {"grid": (1,) + planes["grid"]}
  for key in ("ct", "target", "codes", "geom"):
    if key not in planes:
      continue
    stored[key + "_rows"] = np.flatnonzero(planes[key + "_active"])
    stored[key] = planes[key][:-1]
  dense = {key: x[0] for key, x in unpack(stored, data_config).items()}
  if f == 1:
    return dense
  # The 0/1 channels' block means and maxima come from voxel counts: sums of
  # ones are exact in float32 in any order, so these equal `block_reduce` of
  # the dense channels, at a fraction of the cost (oar is 7 of 11 channels).
  grid = training_grid(patient.grid_shape, f)
  blocks = lambda index: _block_of(index, patient.grid_shape, f)
  num_blocks = int(np.prod(grid))
  oar = np.bincount(
      np.concatenate(
          [
              blocks(index) * _NUM_OARS + c
              for c, index in enumerate(patient.roi_index[:_NUM_OARS])
          ]
      ),
      minlength=num_blocks * _NUM_OARS,
  )
  mask = np.bincount(blocks(patient.mask_index), minlength=num_blocks)
  reduced = {
      "ptv": block_reduce(dense["ptv"], f),
      "ct": block_reduce(dense["ct"], f),
      "oar": (
          (oar.astype(np.float32) * np.float32(1.0 / f**3)).reshape(
              grid + (_NUM_OARS,)
          )
      ),
      "target": block_reduce(dense["target"], f),
      "mask": (mask > 0).astype(np.float32).reshape(grid + (1,)),
  }
  if "geom" in dense:
    reduced["geom"] = block_reduce(dense["geom"], f)
  return reduced


def _block_of(index: np.ndarray, grid_shape, factor: int) -> np.ndarray:
  """The factor^3 block (C-order number) of each flat voxel index."""
  _, h, w = training_grid(grid_shape, factor)
  i, rest = np.divmod(index, grid_shape[1] * grid_shape[2])
  j, k = np.divmod(rest, grid_shape[2])
  return ((i // factor) * h + j // factor) * w + k // factor


def _upsample_linear(x: np.ndarray, axis: int, factor: int) -> np.ndarray:
  """Linear interpolation by an integer factor along one axis.

  Output voxel o sits at input coordinate (o + 0.5) / factor - 0.5 (voxel
  centres aligned); coordinates beyond the first/last centre are clamped.
  """
  n = x.shape[axis]
  coord = (np.arange(n * factor) + 0.5) / factor - 0.5
  lower = np.floor(coord).astype(np.int64)
  weight = (coord - lower).reshape(
      [-1 if a == axis else 1 for a in range(x.ndim)]
  )
  below = np.take(x, np.clip(lower, 0, n - 1), axis=axis)
  above = np.take(x, np.clip(lower + 1, 0, n - 1), axis=axis)
  return below + weight * (above - below)


def decode_dose(
    pred: np.ndarray,
    possible_dose_mask: np.ndarray | openkbp.SparsePatient,
    data_config,
) -> np.ndarray:
  """A prediction in target units back to Gy at the patient's own grid.

  Args:
    pred: (d, h, w) or (d, h, w, 1), target units, at the training grid.
    possible_dose_mask: bool (D, H, W), the patient's grid; or the patient's
      `SparsePatient` (its grid and mask voxels: no dense mask is made).
    data_config: `config.data` (downsample, dose_scale).

  Returns:
    float64 (D, H, W) Gy: upsampled (trilinear), x dose_scale, clipped at 0,
    zero outside the mask.
  """
  if isinstance(possible_dose_mask, openkbp.SparsePatient):
    grid, inside = possible_dose_mask.grid_shape, possible_dose_mask.mask_index
  else:
    grid, inside = possible_dose_mask.shape, None
  pred = np.asarray(pred, np.float64)
  if pred.ndim == 4 and pred.shape[-1] == 1:
    pred = pred[..., 0]
  f = int(data_config.downsample)
  expected = training_grid(grid, f)
  if pred.shape != expected:
    raise ValueError(
        f"prediction shape {pred.shape} does not match the "
        f"training grid {expected} of a {tuple(grid)} patient "
        f"with downsample={f}"
    )
  if f > 1:
    for axis in range(3):
      pred = _upsample_linear(pred, axis, f)
  dose = pred * data_config.dose_scale
  np.clip(dose, 0.0, None, out=dose)
  if inside is None:
    dose[~np.asarray(possible_dose_mask, bool)] = 0.0
    return dose
  masked = np.zeros(dose.size)
  masked[inside] = dose.reshape(-1)[inside]
  return masked.reshape(grid)
