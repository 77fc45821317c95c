"""Network inputs and targets from a `Patient`, and predictions back to Gy.

DESIGN.md section 2, with the config fields of `config.data`:
  ptv     (D, H, W, 1): max over present PTVs of `ptv_values` (PTV56, PTV63,
          PTV70 levels; 0.8, 0.9, 1.0 by default), 0 elsewhere.
  ct      (D, H, W, 1): HU clipped to `ct_clip`, divided by `ct_scale`.
  oar     (D, H, W, 7): the seven OAR masks, official order, 0/1.
  target  (D, H, W, 1): dose / `dose_scale` (zeros for a patient without dose).
  mask    (D, H, W, 1): the possible-dose mask, 0/1.

`downsample` = f > 1 trains on the grid reduced f times per axis: every
channel becomes the mean over its f^3 block (PTV and OAR channels become
fractional occupancies, so `ptv > 0` still marks every block touching a PTV),
except `mask`, which is the max over its block (1 where any voxel of the block
can receive dose), so it stays 0/1 and never hides a deliverable voxel.
`decode_dose` brings a prediction back with trilinear interpolation
(voxel-centre aligned, edges clamped): dose is smooth, and nearest-neighbour
blocks would add a staircase error to every voxel.
"""

from __future__ import annotations

import numpy as np

from randose_jax.data import openkbp

KEYS = ("ptv", "ct", "oar", "target", "mask")


def training_grid(grid_shape, downsample: int) -> tuple[int, int, int]:
  """The grid the network sees for a patient grid and downsample factor."""
  if downsample < 1 or any(n % downsample for n in grid_shape):
    raise ValueError(f"config.data.downsample={downsample} must be a positive "
                     f"divisor of the grid {tuple(grid_shape)}")
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


def encode_patient(patient: openkbp.Patient | openkbp.SparsePatient,
                   data_config, *, compact: bool = False) -> dict[str, np.ndarray]:
  """The network's inputs and target for one patient (see the module doc).

  Args:
    patient: a `Patient`, or the `SparsePatient` the cache holds (faster:
      every channel is built by scattering its voxels into zeros).
    data_config: `config.data` (ptv_values, ct_clip, ct_scale, dose_scale,
      downsample).
    compact: give the channels that are exactly 0/1 (mask; oar when
      downsample is 1) as uint8 instead of float32: a quarter of the bytes,
      for passing examples between processes (`to_float32` restores them).

  Returns:
    dict of float32 arrays at the training grid (grid // downsample):
    ptv (d,h,w,1), ct (d,h,w,1), oar (d,h,w,7), target (d,h,w,1), mask (d,h,w,1).
  """
  if isinstance(patient, openkbp.Patient):
    patient = openkbp.SparsePatient.from_patient(patient)
  f = int(data_config.downsample)
  grid = patient.grid_shape
  training_grid(grid, f)  # validates f before any work
  n = patient.num_voxels
  num_oars = len(openkbp.OAR_NAMES)

  ptv = np.zeros(n, np.float32)
  for level, index in zip(data_config.ptv_values, patient.roi_index[num_oars:]):
    ptv[index] = np.maximum(ptv[index], level)

  lo, hi = data_config.ct_clip
  hu = lambda stored: np.clip(stored - np.float32(openkbp.CT_OFFSET), lo, hi)
  scale = np.float32(data_config.ct_scale)
  # Voxels absent from ct.csv are stored as 0, i.e. air.
  ct = np.full(n, hu(np.float32(0)) / scale, np.float32)
  ct[patient.ct_index] = hu(patient.ct_value) / scale

  binary = np.uint8 if compact else np.float32
  oar = np.zeros((n, num_oars), binary if f == 1 else np.float32)
  for channel, index in enumerate(patient.roi_index[:num_oars]):
    oar[index, channel] = 1

  target = np.zeros(n, np.float32)
  if patient.dose_index is not None:
    target[patient.dose_index] = patient.dose_value / data_config.dose_scale

  mask = np.zeros(n, binary)
  mask[patient.mask_index] = 1

  shape = grid + (-1,)
  return {
      "ptv": block_reduce(ptv.reshape(shape), f),
      "ct": block_reduce(ct.reshape(shape), f),
      "oar": block_reduce(oar.reshape(shape), f),
      "target": block_reduce(target.reshape(shape), f),
      "mask": block_reduce(mask.reshape(shape), f, "max"),
  }


def to_float32(example: dict) -> dict:
  """Every array of an example (or batch) as float32, e.g. after `compact`."""
  return {k: v.astype(np.float32) if v.dtype != np.float32 and k in KEYS else v
          for k, v in example.items()}


def _upsample_linear(x: np.ndarray, axis: int, factor: int) -> np.ndarray:
  """Linear interpolation by an integer factor along one axis.

  Output voxel o sits at input coordinate (o + 0.5) / factor - 0.5 (voxel
  centres aligned); coordinates beyond the first/last centre are clamped.
  """
  n = x.shape[axis]
  coord = (np.arange(n * factor) + 0.5) / factor - 0.5
  lower = np.floor(coord).astype(np.int64)
  weight = (coord - lower).reshape([-1 if a == axis else 1 for a in range(x.ndim)])
  below = np.take(x, np.clip(lower, 0, n - 1), axis=axis)
  above = np.take(x, np.clip(lower + 1, 0, n - 1), axis=axis)
  return below + weight * (above - below)


def decode_dose(pred: np.ndarray, possible_dose_mask: np.ndarray,
                data_config) -> np.ndarray:
  """A prediction in target units back to Gy at the patient's own grid.

  Args:
    pred: (d, h, w) or (d, h, w, 1), target units, at the training grid.
    possible_dose_mask: bool (D, H, W), the patient's grid.
    data_config: `config.data` (downsample, dose_scale).

  Returns:
    float64 (D, H, W) Gy: upsampled (trilinear), x dose_scale, clipped at 0,
    zero outside the mask.
  """
  pred = np.asarray(pred, np.float64)
  if pred.ndim == 4 and pred.shape[-1] == 1:
    pred = pred[..., 0]
  f = int(data_config.downsample)
  expected = training_grid(possible_dose_mask.shape, f)
  if pred.shape != expected:
    raise ValueError(f"prediction shape {pred.shape} does not match the training "
                     f"grid {expected} of a {possible_dose_mask.shape} patient "
                     f"with downsample={f}")
  if f > 1:
    for axis in range(3):
      pred = _upsample_linear(pred, axis, f)
  dose = pred * data_config.dose_scale
  np.clip(dose, 0.0, None, out=dose)
  dose[~np.asarray(possible_dose_mask, bool)] = 0.0
  return dose
