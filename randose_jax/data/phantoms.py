"""Synthetic head-and-neck patients written in the OpenKBP on-disk layout.

Each phantom is a cube grid (axes as in docs/design.md section 1: 0 anterior to
posterior, 1 left/right, 2 superior to inferior) holding an elliptic body of
soft tissue with a spine, a mandible arc and a skull ring of bone; OARs and
PTVs are ellipsoids. The dose is one a network can learn from the inputs:
each PTV at its prescription inside, falling off smoothly (a Gaussian core
plus an exponential tail of the distance outside it), reduced inside OARs
(outside the PTVs), and zero outside the body (= the possible-dose mask).

Everything is seeded: the same (seed, id, grid) gives the same files.
numpy only; a 32^3 patient takes milliseconds, a 128^3 one well under a second.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from randose_jax import fileio
from randose_jax.data import openkbp

# Bump when the phantom recipe changes, so an old folder is not reused.
PHANTOM_VERSION = 1
_MARKER = "phantom.txt"

# (name, centre (axis0, axis1, axis2), radii, probability of being contoured);
# coordinates are in [-1, 1] over each axis, before the per-patient jitter.
_OARS = (
    ("Brainstem", (0.25, 0.0, -0.6), (0.10, 0.10, 0.22), 0.95),
    ("SpinalCord", (0.35, 0.0, 0.20), (0.04, 0.04, 0.75), 0.95),
    ("RightParotid", (0.05, -0.45, -0.25), (0.15, 0.08, 0.15), 0.9),
    ("LeftParotid", (0.05, 0.45, -0.25), (0.15, 0.08, 0.15), 0.9),
    ("Esophagus", (0.15, 0.0, 0.55), (0.06, 0.06, 0.30), 0.5),
    ("Larynx", (-0.30, 0.0, 0.35), (0.12, 0.12, 0.15), 0.6),
)
_IN_PLANE_SCALE = 0.5  # grid half-width per anatomy unit, axes 0 and 1
_SI_SCALE = 0.8  # the same along axis 2
_SOFT_TISSUE_HU = (0.0, 40.0)
_BONE_HU = 800.0
_OAR_SPARING = 0.7  # dose factor inside an OAR, outside every PTV
_FLOOR_GY = 0.1  # smallest dose inside the body, so its nonzero voxels = mask


def _ellipsoid_radius(points, centre, radii):
  """Normalised ellipsoid radius q of each point (n,): q <= 1 inside."""
  return np.sqrt(
      sum(((points[k] - centre[k]) / radii[k]) ** 2 for k in range(3))
  )


def _phantom(grid: int, rng: np.random.Generator):
  """One phantom, sparse over its body (= the possible-dose mask).

  Returns (body_indices int64 (n,) flat C-order, hu float32 (n,),
  structure masks bool (n, 10), dose Gy float64 (n,)).
  """
  axis = (np.arange(grid, dtype=np.float32) + 0.5) / grid * 2 - 1
  # Anatomy coordinates: the body (radius ~0.55-0.75 of these units) spans
  # about a third of the grid in-plane, like a real head in the 128^3 OpenKBP
  # grid, and most of its slices.
  scales = (_IN_PLANE_SCALE, _IN_PLANE_SCALE, _SI_SCALE)
  u0, u1, u2 = (axis / s for s in scales)
  jitter = lambda scale=0.05: rng.uniform(-scale, scale, 3)

  # Body: an elliptic cylinder along axis 2, narrower towards the neck.
  radii = np.array([rng.uniform(0.55, 0.7), rng.uniform(0.6, 0.75)], np.float32)
  centre = rng.uniform(-0.05, 0.05, 2).astype(np.float32)
  taper = 1.0 - 0.15 * (u2 + 1) / 2
  r_body = np.sqrt(
      ((u0[:, None, None] - centre[0]) / (radii[0] * taper)) ** 2
      + ((u1[None, :, None] - centre[1]) / (radii[1] * taper)) ** 2
  )
  body = (r_body <= 1) & (np.abs(u2) <= 0.9)
  body_indices = np.flatnonzero(body)
  # From here on, everything is evaluated on the body voxels only.
  i0, i1, i2 = np.unravel_index(body_indices, body.shape)
  points = (u0[i0], u1[i1], u2[i2])
  r_body = r_body[i0, i1, i2]
  p0, p1, p2 = points

  hu = rng.uniform(*_SOFT_TISSUE_HU) + rng.normal(0, 8, body_indices.size)
  # Spine: a posterior bone cylinder (the spinal cord runs inside it).
  spine = ((p0 - 0.35) / 0.1) ** 2 + (p1 / 0.1) ** 2 <= 1
  # Mandible: an anterior arc of bone in the upper neck.
  mandible = (
      (np.abs(r_body - 0.8) < 0.08)
      & (p0 < centre[0] - 0.1)
      & (p2 > -0.35)
      & (p2 < 0.05)
  )
  # Skull: a ring of bone near the surface in the top slices.
  skull = (r_body > 0.85) & (p2 < -0.55)
  hu = np.where(spine, _BONE_HU, hu)
  hu = np.where(mandible | skull, _BONE_HU + 200, hu).astype(np.float32)

  masks = np.zeros((body_indices.size, len(openkbp.ROI_NAMES)), bool)
  for name, centre_oar, radii_oar, p in _OARS:
    if rng.random() < p:
      q = _ellipsoid_radius(
          points,
          np.add(centre_oar, jitter()),
          np.multiply(radii_oar, rng.uniform(0.85, 1.15, 3)),
      )
      masks[:, openkbp.ROI_NAMES.index(name)] = q <= 1
  if rng.random() < 0.6:
    masks[:, openkbp.ROI_NAMES.index("Mandible")] = mandible

  # Targets: PTV70 always; PTV63 and PTV56 sometimes, near it.
  ptv70_centre = np.array(
      [rng.uniform(-0.3, 0.2), rng.uniform(-0.35, 0.35), rng.uniform(-0.3, 0.3)]
  )
  targets = [("PTV70", ptv70_centre, rng.uniform(0.12, 0.22, 3))]
  if rng.random() < 0.5:
    side = rng.choice([-1.0, 1.0])
    targets.append(
        (
            "PTV63",
            ptv70_centre + [0.0, side * 0.25, 0.1] + jitter(),
            rng.uniform(0.10, 0.18, 3),
        )
    )
  if rng.random() < 0.7:
    targets.append(
        ("PTV56", ptv70_centre + jitter(0.1), rng.uniform(0.25, 0.35, 3))
    )

  dose = np.zeros(body_indices.size, np.float64)
  for name, centre_ptv, radii_ptv in targets:
    q = _ellipsoid_radius(points, centre_ptv, radii_ptv)
    masks[:, openkbp.ROI_NAMES.index(name)] = q <= 1
    # Approximate distance outside the ellipsoid (anatomy units).
    distance = np.maximum(q - 1, 0) * float(np.mean(radii_ptv))
    falloff = 0.75 * np.exp(-0.5 * (distance / 0.08) ** 2) + 0.25 * np.exp(
        -distance / 0.3
    )
    dose = np.maximum(dose, openkbp.PRESCRIPTIONS_GY[name] * falloff)
  num_oars = len(openkbp.OAR_NAMES)
  spared = masks[:, :num_oars].any(1) & ~masks[:, num_oars:].any(1)
  dose = np.where(spared, dose * _OAR_SPARING, dose)
  dose = np.maximum(np.round(dose, 3), _FLOOR_GY)
  return body_indices, hu, masks, dose


def _write_patient(
    patient_dir: Path, grid: int, rng: np.random.Generator
) -> None:
  body_indices, hu, masks, dose = _phantom(grid, rng)
  ct_stored = np.rint(hu + openkbp.CT_OFFSET).clip(0, None)
  has_ct = ct_stored > 0  # air (0) is left out, as in OpenKBP
  files = {
      openkbp.CT_FILE: openkbp.format_sparse_csv(
          body_indices[has_ct], ct_stored[has_ct]
      ),
      openkbp.DOSE_FILE: openkbp.format_sparse_csv(body_indices, dose),
      openkbp.MASK_FILE: openkbp.format_sparse_csv(body_indices),
  }
  for channel, name in enumerate(openkbp.ROI_NAMES):
    if masks[:, channel].any():  # not contoured = no file
      files[f"{name}.csv"] = openkbp.format_sparse_csv(
          body_indices[masks[:, channel]]
      )
  # Spacing of a real 128^3 patient, coarser for smaller grids: a phantom at
  # any grid is the same anatomy.
  in_plane = rng.uniform(3.5, 4.7) * 128 / grid
  spacing = (in_plane, in_plane, rng.uniform(2.0, 3.0) * 128 / grid)
  files[openkbp.VOXEL_DIMENSIONS_FILE] = "".join(
      f"{v:.18e}\n" for v in spacing
  ).encode()
  if (grid,) * 3 != openkbp.GRID_SHAPE:
    files[openkbp.GRID_SHAPE_FILE] = f"{grid}\n{grid}\n{grid}\n".encode()
  for name, data in files.items():
    (patient_dir / name).write_bytes(data)


def write_phantoms(
    out_dir: str | os.PathLike,
    num_patients: int,
    grid: int = 128,
    seed: int = 0,
    first_id: int = 1,
) -> list[Path]:
  """Writes phantom patients `pt_<first_id>` ... under `out_dir`.

  Each folder is written under a temporary name and renamed when complete. A
  folder that already exists is kept if it is the same phantom (its
  `phantom.txt` records seed, grid and recipe version) and refused otherwise,
  so real data under the same name is never overwritten.

  Returns:
    The patient folders, in id order.

  Raises:
    FileExistsError: a `pt_<id>` folder exists and is not this phantom.
  """
  out_dir = Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  paths = []
  for patient_id in range(first_id, first_id + num_patients):
    path = out_dir / f"pt_{patient_id}"
    marker = (
        f"version={PHANTOM_VERSION} seed={seed} grid={grid} id={patient_id}\n"
    )
    paths.append(path)
    if path.exists():
      if (path / _MARKER).is_file() and (path / _MARKER).read_text() == marker:
        continue
      raise FileExistsError(
          f"{path}: exists and is not phantom ({marker.strip()}); "
          f"remove it or write the phantoms elsewhere"
      )
    with fileio.atomic_path(path) as tmp:
      tmp.mkdir()
      _write_patient(tmp, grid, np.random.default_rng([seed, patient_id, grid]))
      (tmp / _MARKER).write_text(marker)
  return paths
