"""A compact random-access store of patients, built once from the CSVs.

Layout of a cache folder:
  <patient_id>-<key16>.npz   one per patient (numpy zip, deflate-compressed):
      grid_shape int64 (3,), voxel_dimensions float64 (3,),
      ct_index, mask_index, dose_index, roi_index: voxel indices, each list
          sorted and stored as uint32 differences (runs of 1 compress to
          almost nothing); roi_index holds the ten ROIs one after another,
          roi_counts int64 (10,) says how many each,
      ct_value: int16 HU + 1024 (float32 if some value is not an integer),
      dose_value: int32 mGy (float64 Gy if some value is not a whole mGy;
          absent, with dose_index, for a patient without dose).
  manifest-<key16>.json      one per list of patient folders, encoding
      settings and format version (`manifest_name`): the format version, the
      settings and, per patient, its key, file name, size and CRC-32. Caches
      of other settings may share the folder: switching settings back and
      forth reuses every file.

A patient's key hashes the format version, the encoding settings (docs/design.md
section 2 fields of `config.data`) and the name, size and mtime of every file
in its folder; its file name carries the key, so changed settings or data
give new files (the stored data does not depend on the settings, but a file
never outlives the settings it was built for). Files are written under a
temporary name and renamed, and a file is reused only when a manifest in the
folder lists it with the same key, size and CRC-32; anything else (missing,
truncated, corrupt, unlisted) is rebuilt with a logged warning. Files of
older settings are left in place (delete the folder to reclaim them). A
build that fails (a bad patient) removes the files it wrote, so the folder
is as it was.

Every read checks the file's size and CRC-32 against the manifest too, so a
file damaged or replaced after the build raises a `DataError` instead of
being used.

Storage is settings-independent and lossless (the reference dose is exactly
what the CSV held); the encoding runs at read time, in milliseconds.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import zipfile
import zlib
from pathlib import Path
from typing import Sequence

import numpy as np

from randose_jax import fileio
from randose_jax import progress as progress_lib
from randose_jax.data import encoding
from randose_jax.data import openkbp

# 2: patients whose dose CSV holds negative values are refused (version 1
# caches may hold them), so caches written before are rebuilt.
FORMAT_VERSION = 2
_ENCODING_FIELDS = (
    "ct_clip",
    "ct_scale",
    "dose_scale",
    "ptv_values",
    "downsample",
)


def encoding_settings(data_config) -> dict:
  """The `config.data` fields the encoded examples depend on (JSON-able)."""
  settings = {}
  for name in _ENCODING_FIELDS:
    value = getattr(data_config, name)
    settings[name] = (
        list(map(float, value)) if isinstance(value, (tuple, list)) else value
    )
  settings["downsample"] = int(settings["downsample"])
  # Optional channels join the settings only when on, so caches built
  # without them keep their keys.
  if data_config.get("geometry", False):
    settings["geometry"] = True
    settings["geometry_scale_mm"] = float(data_config.geometry_scale_mm)
    if data_config.get("geometry_slab", False):
      settings["geometry_slab"] = True
  return settings


def _hash(obj) -> str:
  return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def entry_key(patient_id: str, settings: dict, **origin) -> str:
  """The key of a cached patient: a hash of the file format, the encoding
  settings, the patient and what identifies its source (`origin`: the CSV
  files' names, sizes and times, or an archive entry's checksum), so that a
  changed source or setting never reuses a stale file."""
  return _hash(
      {
          "format": FORMAT_VERSION,
          "settings": settings,
          "patient": patient_id,
          **origin,
      }
  )


def patient_key(patient_dir: Path, settings: dict) -> str:
  """`entry_key` of a patient folder: every source file's name/size/mtime."""
  files = sorted(
      (p.name, p.stat().st_size, p.stat().st_mtime_ns)
      for p in patient_dir.iterdir()
      if p.is_file()
  )
  return entry_key(patient_dir.name, settings, files=files)


def file_name(patient_id: str, key: str) -> str:
  """The cache file of a patient with this `entry_key`."""
  return f"{patient_id}-{key[:16]}.npz"


def write_patient_file(
    cache_dir: Path, patient: openkbp.SparsePatient, source: str, key: str
) -> dict:
  """Writes one patient's cache file (`<id>-<key16>.npz`, atomically) and
  returns its manifest entry. Every writer of a cache (the CSVs here, an
  archive in `transport`) goes through this and `write_manifest`."""
  data = patient_bytes(patient)
  name = file_name(patient.patient_id, key)
  with fileio.atomic_output(Path(cache_dir) / name, overwrite=True) as f:
    f.write(data)
  return {
      "patient_id": patient.patient_id,
      "source": source,
      "key": key,
      "file": name,
      "size": len(data),
      "crc32": zlib.crc32(data),
  }


def write_manifest(cache_dir: Path, entries: list, settings: dict) -> Path:
  """Writes the manifest of a cache of `entries` (their sources name it,
  `manifest_name`) and returns its path."""
  manifest = {
      "format_version": FORMAT_VERSION,
      "settings": settings,
      "key": _hash([entry["key"] for entry in entries]),
      "patients": entries,
  }
  path = Path(cache_dir) / manifest_name(
      [entry["source"] for entry in entries], settings
  )
  with fileio.atomic_output(path, overwrite=True) as f:
    f.write(json.dumps(manifest, indent=1).encode())
  return path


# ---------------------------------------------------------- file format


def _deltas(index: np.ndarray) -> np.ndarray:
  return np.diff(index, prepend=0).astype(np.uint32)


def _undeltas(deltas: np.ndarray) -> np.ndarray:
  return np.cumsum(deltas, dtype=np.int64)


def patient_bytes(patient: openkbp.SparsePatient) -> bytes:
  """The compressed .npz bytes of one patient (format in the module doc)."""
  if patient.num_voxels >= 2**32:
    raise ValueError(
        f"{patient.patient_id}: grid {patient.grid_shape} too large "
        f"for uint32 voxel indices"
    )
  ct = patient.ct_value
  ct_int = ct.astype(np.int16)
  arrays = {
      "grid_shape": np.array(patient.grid_shape, np.int64),
      "voxel_dimensions": np.asarray(patient.voxel_dimensions, np.float64),
      "ct_index": _deltas(patient.ct_index),
      "ct_value": ct_int if np.array_equal(ct_int, ct) else ct,
      "mask_index": _deltas(patient.mask_index),
      # The ten ROIs one after another, differences restarting at each.
      "roi_index": np.concatenate([_deltas(r) for r in patient.roi_index]),
      "roi_counts": np.array([r.size for r in patient.roi_index], np.int64),
  }
  if patient.dose_index is not None:
    dose = patient.dose_value
    milligray = (
        np.rint(dose * 1000).astype(np.int32)
        if np.all(np.abs(dose) < 2e6)
        else None
    )
    # Whole mGy (OpenKBP has three decimals) are stored as integers, exactly:
    # n / 1000.0 is the double nearest to the CSV's decimal text.
    lossless = milligray is not None and np.array_equal(
        milligray / 1000.0, dose
    )
    arrays["dose_index"] = _deltas(patient.dose_index)
    arrays["dose_value"] = milligray if lossless else dose
  buffer = io.BytesIO()
  np.savez_compressed(buffer, **arrays)
  return buffer.getvalue()


def read_patient_file(path: Path, entry: dict) -> openkbp.SparsePatient:
  """Reads one cached patient, checking it against its manifest entry.

  Raises:
    DataError: the file is missing, or its size or CRC-32 is not the one the
      manifest recorded (truncated, corrupt or replaced), or it is unreadable.
  """
  rebuild = "rerun build_cache to rebuild it"
  try:
    data = path.read_bytes()
  except OSError as e:
    raise openkbp.DataError(
        f"{path}: cannot read cache file ({e}); {rebuild}"
    ) from e
  if len(data) != entry["size"] or zlib.crc32(data) != entry["crc32"]:
    raise openkbp.DataError(
        f"{path}: cache file changed since it was written "
        f"(size or CRC-32 differs); {rebuild}"
    )
  try:
    with np.load(io.BytesIO(data)) as npz:
      arrays = {name: npz[name] for name in npz.files}
  except (ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error) as e:
    raise openkbp.DataError(
        f"{path}: unreadable cache file ({e}); {rebuild}"
    ) from e
  patient_id = entry["patient_id"]
  try:
    roi_index = []
    start = 0
    for count in arrays["roi_counts"]:
      roi_index.append(_undeltas(arrays["roi_index"][start : start + count]))
      start += count
    ct_value = arrays["ct_value"].astype(np.float32)
    dose_index = dose_value = None
    if "dose_index" in arrays:
      dose_index = _undeltas(arrays["dose_index"])
      dose_value = arrays["dose_value"]
      dose_value = (
          dose_value / 1000.0
          if dose_value.dtype == np.int32
          else dose_value.astype(np.float64)
      )
    return openkbp.SparsePatient(
        patient_id=patient_id,
        grid_shape=tuple(int(n) for n in arrays["grid_shape"]),
        ct_index=_undeltas(arrays["ct_index"]),
        ct_value=ct_value,
        dose_index=dose_index,
        dose_value=dose_value,
        mask_index=_undeltas(arrays["mask_index"]),
        roi_index=tuple(roi_index),
        voxel_dimensions=arrays["voxel_dimensions"],
    )
  except KeyError as e:
    raise openkbp.DataError(f"{path}: cache file lacks {e}; {rebuild}") from e


# ------------------------------------------------------------- the cache


class _Settings(dict):
  """A dict whose keys also read as attributes, like `config.data`."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError:
      raise AttributeError(name) from None


class PatientCache:
  """Encoded patients by index: a grain random-access data source.

  `sparse(i)` is patient i's voxel lists (a `SparsePatient`: what the
  pipeline encodes and validation scores, `evaluation.Reference.from_sparse`);
  `cache[i]` is its `encoding.encode_patient` (a dict of float32 arrays at
  the training grid, DEVELOPING.md); `reference(i)` is the dense
  full-resolution `Patient`. All read the cache files, never the CSVs.
  Pickles small (paths and settings), so grain worker processes can take it.
  """

  def __init__(
      self, cache_dir: str | os.PathLike, entries: list[dict], settings: dict
  ):
    self.cache_dir = Path(cache_dir)
    self.entries = list(entries)
    self.settings = _Settings(settings)

  @property
  def patient_ids(self) -> list[str]:
    return [entry["patient_id"] for entry in self.entries]

  @property
  def num_bytes(self) -> int:
    """Total size of this cache's patient files."""
    return sum(entry["size"] for entry in self.entries)

  def __len__(self) -> int:
    return len(self.entries)

  def sparse(self, index: int) -> openkbp.SparsePatient:
    entry = self.entries[index]
    return read_patient_file(self.cache_dir / entry["file"], entry)

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return encoding.encode_patient(self.sparse(int(index)), self.settings)

  def reference(self, index: int) -> openkbp.Patient:
    """Full-resolution scoring data of patient `index` (a `Patient`)."""
    return self.sparse(int(index)).to_patient()

  def __repr__(self) -> str:
    return (
        f"PatientCache({str(self.cache_dir)!r}, {len(self)} patients, "
        f"{self.num_bytes / 2**20:.1f} MiB)"
    )


def _file_ok(path: Path, entry: dict | None) -> bool:
  if (
      entry is None
      or not path.is_file()
      or path.stat().st_size != entry["size"]
  ):
    return False
  return zlib.crc32(path.read_bytes()) == entry["crc32"]


def build_cache(
    patient_dirs,
    cache_dir: str | os.PathLike,
    data_config,
    logger: logging.Logger | None = None,
    progress: progress_lib.Mode = None,
) -> PatientCache:
  """Converts patient folders into a cache (or reuses a valid one).

  Args:
    patient_dirs: OpenKBP patient folders (e.g. `openkbp.list_patient_dirs`).
    cache_dir: the cache folder (created if needed).
    data_config: `config.data`; its encoding fields enter the cache key.
    logger: where rebuild warnings go (default: this module's logger).
    progress: each patient file written (not those reused) counted done on
      stderr (`progress.Counter`, label 'cache <folder name>'): None a live
      line on a terminal and one line per patient elsewhere, True the live
      line, False the lines, 'off' nothing.

  Returns:
    A `PatientCache` over the patients, in the given order.

  Raises:
    DataError: a bad patient folder (see `openkbp.load_sparse_patient`).
      Whatever the build wrote before the error is removed again (and
      `cache_dir`, if it created it): no patient files without a manifest.
  """
  patient_dirs = [Path(p) for p in patient_dirs]
  if not patient_dirs:
    raise openkbp.DataError(f"{cache_dir}: no patient folders to cache")
  with fileio.undo_new_files(cache_dir):
    return _build_cache(
        patient_dirs,
        Path(cache_dir),
        data_config,
        logger or logging.getLogger(__name__),
        progress,
    )


def manifest_name(sources: Sequence[str], settings: dict) -> str:
  """The manifest file of a cache of these patient folders (resolved paths,
  in order) built with these encoding settings by this format version."""
  return (
      f"manifest-"
      f"{_hash({'format': FORMAT_VERSION, 'settings': settings, 'sources': list(sources)})[:16]}"
      ".json"
  )


def _build_cache(
    patient_dirs,
    cache_dir: Path,
    data_config,
    log: logging.Logger,
    progress: progress_lib.Mode,
) -> PatientCache:
  cache_dir.mkdir(parents=True, exist_ok=True)
  settings = encoding_settings(data_config)

  # Files listed by any manifest here can be reused: the training and the
  # validation caches may share a folder.
  known = {}
  for path in sorted(cache_dir.glob("manifest-*.json")):
    try:
      manifest = json.loads(path.read_text())
      if manifest.get("format_version") == FORMAT_VERSION:
        known.update((entry["key"], entry) for entry in manifest["patients"])
    except (ValueError, KeyError, TypeError) as e:
      log.warning(
          "%s: unreadable cache manifest (%s); rebuilding what it listed",
          path,
          e,
      )

  # Each patient's file reused, or to be built (None): the count to build
  # is known before the first one is.
  plan = []
  for patient_dir in patient_dirs:
    if not patient_dir.is_dir():
      raise openkbp.DataError(f"{patient_dir}: patient folder not found")
    key = patient_key(patient_dir, settings)
    path = cache_dir / file_name(patient_dir.name, key)
    entry = known.get(key)
    if _file_ok(path, entry):
      plan.append(
          (patient_dir, key, {**entry, "source": str(patient_dir.resolve())})
      )
      continue
    if entry is not None:
      log.warning(
          "%s: cache file missing, truncated or corrupt; rebuilding it", path
      )
    elif path.exists():
      log.warning(
          "%s: cache file not listed in any manifest (an interrupted "
          "build?); rebuilding it",
          path,
      )
    plan.append((patient_dir, key, None))

  entries = []
  to_build = sum(entry is None for _, _, entry in plan)
  with progress_lib.Counter(
      f"cache {cache_dir.name}", to_build, progress
  ) as counter:
    for patient_dir, key, entry in plan:
      if entry is None:
        counter.doing(f"{patient_dir.name}: reading")
        entry = write_patient_file(
            cache_dir,
            openkbp.load_sparse_patient(patient_dir),
            str(patient_dir.resolve()),
            key,
        )
        counter.done(patient_dir.name)
      entries.append(entry)

  write_manifest(cache_dir, entries, settings)
  return PatientCache(cache_dir, entries, settings)


def open_cache(cache_dir: str | os.PathLike, data_config) -> PatientCache:
  """Opens a cache built earlier, without its source patient folders.

  For machines that receive only the cache (e.g. a GPU host): the folder must
  hold a manifest built with the same encoding settings; every file it lists
  is checked (size and CRC-32) before use.

  Raises:
    DataError: no matching manifest, or a listed file missing or corrupt.
  """
  cache_dir = Path(cache_dir)
  settings = encoding_settings(data_config)
  manifests = sorted(
      cache_dir.glob("manifest-*.json"),
      key=lambda p: p.stat().st_mtime,
      reverse=True,
  )
  if not manifests:
    raise openkbp.DataError(
        f"{cache_dir}: no cache manifest (build the cache "
        "from the patient folders first)"
    )
  for path in manifests:
    try:
      manifest = json.loads(path.read_text())
    except ValueError as e:
      raise openkbp.DataError(f"{path}: unreadable cache manifest ({e})") from e
    if (
        manifest.get("format_version") == FORMAT_VERSION
        and manifest.get("settings") == settings
    ):
      for entry in manifest["patients"]:
        if not _file_ok(cache_dir / entry["file"], entry):
          raise openkbp.DataError(
              f"{cache_dir / entry['file']}: cache file missing, truncated or "
              "corrupt (rebuild the cache from the patient folders)"
          )
      return PatientCache(cache_dir, manifest["patients"], settings)
  raise openkbp.DataError(
      f"{cache_dir}: no cache manifest matches the encoding settings "
      f"{settings} (rebuild the cache from the patient folders)"
  )
