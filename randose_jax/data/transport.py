r"""A compact archive of OpenKBP patients, to carry data with the code.

A rented GPU host receives the code and the data in one transfer of at most
64 MiB; the patient cache (`cache.py`) of the 120 + 33 OpenKBP patients
unpacked here is 82.9 MiB, their CSVs 793 MiB. This archive holds them in
43.0 MiB (287 KiB per patient, 58..532; benchmarks/transport_archive.py):

  CT, voxel sets (the CT's voxels, the possible-dose mask, the ten ROIs, the
      dose's voxels) and voxel sizes: lossless (bit-exact against the CSVs).
  dose: rounded to 10^-dose_decimals Gy, so the error is at most half of
      that: 0.005 Gy with the default `dose_decimals=2` (OpenKBP writes
      whole mGy; `dose_decimals=3` stores those exactly: 50.4 MiB).
      Each patient's measured maximum error is recorded in the header.

  python -m randose_jax.data.transport pack --root=DIR --archive=F.rdt \
      [--splits=train-pats,validation-pats] [--dose_decimals=2] [--overwrite]
  python -m randose_jax.data.transport unpack --archive=F.rdt \
      --cache_dir=DIR [--config=configs/openkbp.py[:variant]] [--workers=N]
  python -m randose_jax.data.transport check --archive=F.rdt --root=DIR

Each command shows its progress on stderr (`randose_jax/progress.py`): a
live line on a terminal (patients done / total, time left), one line per
patient elsewhere or with --progress=false, e.g.

  unpack train-pats: 40/120 pt_52 done, 0.31 s/patient, about 25 s left

`unpack` writes what `cache.build_cache` would have written from the CSVs
(`<cache_dir>/<split>/`, read by `cache.open_cache`), so a host holding only
the archive trains with `config.data.root=""` and
`config.data.cache_dir=<cache_dir>`.

Encoding (CT and dose are noisy at the stored precision, about 8 and 7 bits
per voxel remain after prediction, so the prediction and the entropy coding
are what count; `benchmarks/NOTES.md`, "Transport archive", has the
measurements behind each choice):
  voxel sets: a bitmap of the grid each (numpy packbits), xz (LZMA2).
  CT (integer HU + 1024 as OpenKBP stores it): along each run of CT voxels
      on axis 2, the difference to the previous voxel (the first voxel of a
      run minus CT_RUN_START); non-integer CT falls back to raw float32.
  dose (integer steps of 10^-dose_decimals Gy): the same difference taken
      along axis 0, then 1, then 2, each within the runs of dose voxels
      (a voxel whose predecessor is not a dose voxel keeps its value); a
      third difference of the smooth dose, decoded by three cumulative sums.
  A residual r becomes its zigzag code u (0, -1, 1, -2, ... -> 0, 1, 2,
  3, ...), a token byte (u itself below 16; else the position of u's
  leading bit and the two bits after it) compressed with xz, and the
  remaining low bits of u stored raw (they are noise: no coder shrinks
  them).

File layout (little-endian):
  MAGIC (18 bytes), header length H (uint32), header CRC-32 (uint32),
  header (H bytes of JSON: format version, dose_decimals, the splits and
  their patient ids in order, and per patient: split, id, grid shape, voxel
  dimensions, offset and size of its block, the block's CRC-32, the byte
  length of each section, voxel counts, the CRC-32 of the decoded content
  and the dose's measured maximum error), then the patients' blocks back to
  back. Every read checks the block's CRC-32 before decoding and the decoded
  content's CRC-32 after, so a damaged or truncated archive is a `DataError`
  naming the archive (and the patient), never wrong data.
"""

from __future__ import annotations

import dataclasses
import json
import lzma
import os
import struct
import zlib
from concurrent import futures
import multiprocessing
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from randose_jax import fileio
from randose_jax import progress as progress_lib
from randose_jax.data import cache as cache_lib
from randose_jax.data import openkbp

MAGIC = b"RANDOSE-TRANSPORT\n"
FORMAT_VERSION = 1
DEFAULT_SPLITS = ("train-pats", "validation-pats")
DEFAULT_DOSE_DECIMALS = 2
# Prediction of the first CT voxel of a run (HU + 1024; soft tissue is near
# 1000): a run starts at the body's surface or after an air gap.
CT_RUN_START = 1000
_HEADER = struct.Struct("<II")  # header length, header CRC-32
_SECTIONS = ("masks", "ct", "ct_extra", "dose", "dose_extra")
_DIRECT = 16  # zigzag codes below this are their own token
# xz without its container (the block CRC covers the bytes); lc=4: the token
# before predicts the next one best (measured), a dictionary > any section.
_TOKEN_FILTERS = [
    {
        "id": lzma.FILTER_LZMA2,
        "preset": 9,
        "dict_size": 1 << 24,
        "lc": 4,
        "lp": 0,
        "pb": 0,
    }
]
_MASK_FILTERS = [
    {
        "id": lzma.FILTER_LZMA2,
        "preset": 9,
        "dict_size": 1 << 24,
        "lc": 0,
        "lp": 0,
        "pb": 0,
    }
]
_RAW_FILTERS = [{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": 1 << 24}]


def max_dose_error_gy(dose_decimals: int) -> float:
  """The largest dose error of an archive with `dose_decimals` (Gy)."""
  return 0.5 * 10.0**-dose_decimals


# ------------------------------------------------------------ residuals


def _runs(index: np.ndarray, shape, axis: int):
  """The runs along `axis` of a voxel set (sorted flat C-order indices).

  Returns (order, first): `order` lists the voxels run by run, each run in
  increasing `axis` coordinate (the set sorted with `axis` varying fastest;
  None for the last axis: C order already is), and `first[i]` is True where
  the i-th voxel of that order starts a run (its predecessor along `axis`
  is not in the set).
  """
  n = shape[axis]
  if axis == len(shape) - 1:
    order, key = None, index
  else:
    stride = int(np.prod(shape[axis + 1 :]))
    outer, rest = np.divmod(index, stride)
    before, coord = np.divmod(outer, n)
    # The flat index in the grid transposed to put `axis` last.
    key = (before * stride + rest) * n + coord
    order = np.argsort(key, kind="stable")
    key = key[order]
  first = key % n == 0
  first[1:] |= key[1:] - key[:-1] != 1
  if key.size:
    first[0] = True
  return order, first


def _run_diff(
    values: np.ndarray, index: np.ndarray, shape, axis: int, start: int = 0
) -> np.ndarray:
  """Differences along `axis` within the runs of the voxel set `index`: each
  voxel minus its predecessor along `axis`, or minus `start` where the
  predecessor is not in the set (values int64, aligned with index)."""
  order, first = _runs(index, shape, axis)
  v = values if order is None else values[order]
  r = np.empty_like(v)
  r[1:] = v[1:] - v[:-1]
  r[first] = v[first] - start
  if order is None:
    return r
  out = np.empty_like(r)
  out[order] = r
  return out


def _run_cumsum(
    residuals: np.ndarray, index: np.ndarray, shape, axis: int, start: int = 0
) -> np.ndarray:
  """The inverse of `_run_diff`: cumulative sums restarting at each run."""
  order, first = _runs(index, shape, axis)
  r = residuals.copy() if order is None else residuals[order]
  r[first] += start
  c = np.cumsum(r)
  starts = np.flatnonzero(first)
  c -= (c[starts] - r[starts])[np.cumsum(first) - 1]
  if order is None:
    return c
  out = np.empty_like(c)
  out[order] = c
  return out


def _zigzag(r: np.ndarray) -> np.ndarray:
  r = r.astype(np.int64)
  return ((r << 1) ^ (r >> 63)).view(np.uint64)


def _unzigzag(u: np.ndarray) -> np.ndarray:
  return (u >> np.uint64(1)).view(np.int64) ^ -(u & np.uint64(1)).view(np.int64)


def _bit_length(u: np.ndarray) -> np.ndarray:
  """Position of the leading 1 of each u > 0 (exact for all uint64)."""
  e = np.frexp(u.astype(np.float64))[1].astype(np.int64) - 1
  e -= (u >> e.astype(np.uint64)) == 0  # float rounding up past a power of 2
  return e


def _tokens(residuals: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(tokens uint8, extra bit counts int64, extra values uint64)."""
  u = _zigzag(residuals)
  big = u >= _DIRECT
  e = np.where(big, _bit_length(np.maximum(u, 1)), 0)
  counts = np.where(big, e - 2, 0)
  top = (u >> np.maximum(counts, 0).astype(np.uint64)).astype(np.int64) & 3
  tokens = np.where(big, _DIRECT + (e - 4) * 4 + top, u.astype(np.int64))
  extra = u & ((np.uint64(1) << counts.astype(np.uint64)) - np.uint64(1))
  return tokens.astype(np.uint8), counts, extra


def _from_tokens(
    tokens: np.ndarray, extra_bits: bytes, where: str
) -> np.ndarray:
  tokens = tokens.astype(np.int64)
  big = tokens >= _DIRECT
  e = np.where(big, (tokens - _DIRECT) // 4 + 4, 0)
  counts = np.where(big, e - 2, 0)
  extra = _unpack_bits(extra_bits, counts, where)
  top = (4 | ((tokens - _DIRECT) & 3)).astype(np.uint64)
  u = np.where(
      big,
      (top << np.maximum(counts, 0).astype(np.uint64)) | extra,
      tokens.astype(np.uint64),
  )
  return _unzigzag(u)


def _pack_bits(values: np.ndarray, counts: np.ndarray) -> bytes:
  """The low `counts[i]` bits of each value, most significant first."""
  ends = np.cumsum(counts)
  bits = np.zeros(int(ends[-1]) if ends.size else 0, np.uint8)
  starts = ends - counts
  for j in range(int(counts.max()) if counts.size else 0):
    sel = np.flatnonzero(counts > j)
    shift = (counts[sel] - 1 - j).astype(np.uint64)
    bits[starts[sel] + j] = (values[sel] >> shift) & np.uint64(1)
  return np.packbits(bits).tobytes()


def _unpack_bits(data: bytes, counts: np.ndarray, where: str) -> np.ndarray:
  total = int(counts.sum())
  if len(data) != (total + 7) // 8:
    raise openkbp.DataError(
        f"{where}: {len(data)} bytes of extra bits, "
        f"expected {(total + 7) // 8}"
    )
  bits = np.unpackbits(np.frombuffer(data, np.uint8), count=total)
  values = np.zeros(counts.size, np.uint64)
  starts = np.cumsum(counts) - counts
  for j in range(int(counts.max()) if counts.size else 0):
    sel = np.flatnonzero(counts > j)
    values[sel] = (values[sel] << np.uint64(1)) | bits[starts[sel] + j]
  return values


def _compress(data: bytes, filters) -> bytes:
  return lzma.compress(data, format=lzma.FORMAT_RAW, filters=filters)


def _decompress(data: bytes, filters, size: int, where: str) -> bytes:
  try:
    out = lzma.LZMADecompressor(
        format=lzma.FORMAT_RAW, filters=filters
    ).decompress(data, max_length=size + 1)
  except lzma.LZMAError as e:
    raise openkbp.DataError(f"{where}: cannot decompress ({e})") from e
  if len(out) != size:
    raise openkbp.DataError(
        f"{where}: {len(out)} bytes decompressed, expected {size}"
    )
  return out


# ------------------------------------------------------- one patient


def _content_crc(patient: openkbp.SparsePatient, dose_steps) -> int:
  """CRC-32 of a patient's content as the archive restores it."""
  crc = zlib.crc32(np.asarray(patient.grid_shape, "<i8").tobytes())
  parts = [
      patient.ct_index,
      patient.ct_value.astype("<f4"),
      patient.mask_index,
      *patient.roi_index,
      np.asarray(patient.voxel_dimensions, "<f8"),
  ]
  if dose_steps is not None:
    parts += [patient.dose_index, dose_steps]
  for part in parts:
    part = np.ascontiguousarray(part)
    if part.dtype.kind == "i":
      part = part.astype("<i8")
    crc = zlib.crc32(part.tobytes(), crc)
    crc = zlib.crc32(struct.pack("<q", part.size), crc)
  return crc


def _dose_steps(patient: openkbp.SparsePatient, decimals: int):
  if patient.dose_value is None:
    return None
  scaled = patient.dose_value * 10.0**decimals
  if scaled.size and not scaled.max() < 2.0**50:
    raise openkbp.DataError(
        f"{patient.patient_id}: dose up to "
        f"{patient.dose_value.max()} Gy is too large to store "
        f"in steps of 1e-{decimals} Gy"
    )
  return np.rint(scaled).astype(np.int64)


def _dense(index: np.ndarray, values, shape) -> np.ndarray:
  out = np.zeros(int(np.prod(shape)), np.int64 if values is not None else bool)
  out[index] = True if values is None else values
  return out.reshape(shape)


def encode_patient(
    patient: openkbp.SparsePatient, dose_decimals: int = DEFAULT_DOSE_DECIMALS
) -> tuple[dict, bytes]:
  """One patient's header entry (without split/offset) and block bytes."""
  shape = tuple(int(n) for n in patient.grid_shape)
  steps = _dose_steps(patient, dose_decimals)
  sets = [patient.ct_index, patient.mask_index]
  if steps is not None:
    sets.append(patient.dose_index)
  sets += list(patient.roi_index)
  maps = b"".join(
      np.packbits(_dense(i, None, shape).ravel()).tobytes() for i in sets
  )
  sections = {"masks": _compress(maps, _MASK_FILTERS)}

  ct = patient.ct_value
  ct_int = np.rint(ct).astype(np.int64) if np.all(np.abs(ct) < 2**31) else None
  ct_is_int = ct_int is not None and np.array_equal(ct_int, ct)
  if ct_is_int:
    r = _run_diff(ct_int, patient.ct_index, shape, 2, CT_RUN_START)
    tokens, counts, extra = _tokens(r)
    sections["ct"] = _compress(tokens.tobytes(), _TOKEN_FILTERS)
    sections["ct_extra"] = _pack_bits(extra, counts)
  else:  # not OpenKBP's integers: the float32 values as they are
    sections["ct"] = _compress(ct.astype("<f4").tobytes(), _RAW_FILTERS)
    sections["ct_extra"] = b""

  dose = None
  sections["dose"] = sections["dose_extra"] = b""
  if steps is not None:
    r = steps
    for axis in range(3):
      r = _run_diff(r, patient.dose_index, shape, axis)
    tokens, counts, extra = _tokens(r)
    sections["dose"] = _compress(tokens.tobytes(), _TOKEN_FILTERS)
    sections["dose_extra"] = _pack_bits(extra, counts)
    error = np.abs(steps / 10.0**dose_decimals - patient.dose_value)
    dose = {
        "count": int(steps.size),
        "max_error_gy": float(error.max()) if error.size else 0.0,
        "exact": bool(not error.size or error.max() == 0),
    }

  block = b"".join(sections[name] for name in _SECTIONS)
  entry = {
      "patient_id": patient.patient_id,
      "grid_shape": list(shape),
      # repr round-trips: the float64 values exactly.
      "voxel_dimensions": [float(x) for x in patient.voxel_dimensions],
      "ct_count": int(patient.ct_index.size),
      "ct_integer": bool(ct_is_int),
      "dose": dose,
      "sections": [len(sections[name]) for name in _SECTIONS],
      "size": len(block),
      "crc32": zlib.crc32(block),
      "content_crc32": _content_crc(patient, steps),
  }
  return entry, block


def decode_patient(
    entry: dict, block: bytes, dose_decimals: int, where: str
) -> openkbp.SparsePatient:
  """The `SparsePatient` of one block (checked: CRC-32 before, content
  CRC-32 after). `where` names it in errors."""
  if len(block) != entry["size"] or zlib.crc32(block) != entry["crc32"]:
    raise openkbp.DataError(
        f"{where}: CRC-32 mismatch (the archive is damaged; copy it again)"
    )
  sections, offset = {}, 0
  for name, size in zip(_SECTIONS, entry["sections"]):
    sections[name] = block[offset : offset + size]
    offset += size
  shape = tuple(entry["grid_shape"])
  n = int(np.prod(shape))
  has_dose = entry["dose"] is not None
  num_maps = 2 + has_dose + len(openkbp.ROI_NAMES)
  map_bytes = (n + 7) // 8
  maps = np.frombuffer(
      _decompress(
          sections["masks"],
          _MASK_FILTERS,
          num_maps * map_bytes,
          f"{where}: masks",
      ),
      np.uint8,
  )
  bitmaps = [
      np.unpackbits(maps[k * map_bytes : (k + 1) * map_bytes], count=n).view(
          bool
      )
      for k in range(num_maps)
  ]
  ct_s = bitmaps[0]
  ct_index = np.flatnonzero(ct_s)
  if ct_index.size != entry["ct_count"]:
    raise openkbp.DataError(
        f"{where}: {ct_index.size} CT voxels, the header "
        f"says {entry['ct_count']}"
    )
  if entry["ct_integer"]:
    tokens = np.frombuffer(
        _decompress(
            sections["ct"], _TOKEN_FILTERS, ct_index.size, f"{where}: CT"
        ),
        np.uint8,
    )
    r = _from_tokens(tokens, sections["ct_extra"], f"{where}: CT")
    ct_value = _run_cumsum(r, ct_index, shape, 2, CT_RUN_START).astype(
        np.float32
    )
  else:
    ct_value = np.frombuffer(
        _decompress(
            sections["ct"], _RAW_FILTERS, 4 * ct_index.size, f"{where}: CT"
        ),
        "<f4",
    ).astype(np.float32)
  dose_index = dose_value = steps = None
  if has_dose:
    dose_s = bitmaps[2]
    dose_index = np.flatnonzero(dose_s)
    tokens = np.frombuffer(
        _decompress(
            sections["dose"], _TOKEN_FILTERS, dose_index.size, f"{where}: dose"
        ),
        np.uint8,
    )
    steps = _from_tokens(tokens, sections["dose_extra"], f"{where}: dose")
    for axis in (2, 1, 0):
      steps = _run_cumsum(steps, dose_index, shape, axis)
    dose_value = steps / 10.0**dose_decimals
  patient = openkbp.SparsePatient(
      patient_id=entry["patient_id"],
      grid_shape=shape,
      ct_index=ct_index,
      ct_value=ct_value,
      dose_index=dose_index,
      dose_value=dose_value,
      mask_index=np.flatnonzero(bitmaps[1]),
      roi_index=tuple(np.flatnonzero(b) for b in bitmaps[2 + has_dose :]),
      voxel_dimensions=np.array(entry["voxel_dimensions"], np.float64),
  )
  if _content_crc(patient, steps) != entry["content_crc32"]:
    raise openkbp.DataError(
        f"{where}: decoded content differs from what was "
        "packed (content CRC-32 mismatch)"
    )
  return patient


# ------------------------------------------------------------ archives


def _encode_dir(job):
  patient_dir, decimals = job
  return encode_patient(openkbp.load_sparse_patient(patient_dir), decimals)


def _map(fn, jobs, workers: int):
  if workers <= 1:
    yield from map(fn, jobs)
    return
  # Spawned, not forked: forking a process whose JAX threads are running can
  # deadlock (JAX warns); a spawned worker imports this module afresh.
  spawn = multiprocessing.get_context("spawn")
  with futures.ProcessPoolExecutor(workers, mp_context=spawn) as pool:
    yield from pool.map(fn, jobs)


def pack(
    root: str | os.PathLike,
    archive: str | os.PathLike,
    *,
    splits: Sequence[str] = DEFAULT_SPLITS,
    dose_decimals: int = DEFAULT_DOSE_DECIMALS,
    overwrite: bool = False,
    workers: int = 1,
    progress: progress_lib.Mode = None,
) -> dict:
  """Packs the patient folders `root/<split>/pt_*` into one archive file.

  Args:
    root: an OpenKBP data folder (e.g. `open-kbp/provided-data`).
    archive: the file to write (atomically).
    splits: the split folders of `root` to pack, in this order.
    dose_decimals: the dose is stored in steps of 10^-dose_decimals Gy.
    overwrite: replace an existing `archive`.
    workers: processes that read and encode patients.
    progress: each patient encoded counted done on stderr
      (`progress.Counter`, label 'pack'): None a live line on a terminal
      and one line per patient elsewhere, True the live line, False the
      lines, 'off' nothing.

  Returns:
    The archive's header (dict).

  Raises:
    DataError: a bad patient folder (nothing is written).
    OSError: `archive` cannot be written, or exists and overwrite is False
      (checked before any work).
  """
  fileio.check_output_file(
      archive, overwrite=overwrite, hint="pass --overwrite to replace it"
  )
  root = Path(root)
  jobs = [
      (split, d)
      for split in splits
      for d in openkbp.list_patient_dirs(
          openkbp.split_dir(root, split, what="--root")
      )
  ]
  encoded = _map(_encode_dir, [(d, dose_decimals) for _, d in jobs], workers)
  with progress_lib.Counter("pack", len(jobs), progress) as counter:

    def counted():
      for (split, d), e in zip(jobs, encoded):
        counter.done(f"{split}/{d.name}")
        yield split, e

    return pack_patients(
        counted(),
        archive,
        dose_decimals=dose_decimals,
        overwrite=overwrite,
        encoded=True,
    )


def pack_patients(
    patients: Iterable,
    archive: str | os.PathLike,
    *,
    dose_decimals: int = DEFAULT_DOSE_DECIMALS,
    overwrite: bool = False,
    encoded: bool = False,
) -> dict:
  """Packs (split, SparsePatient) pairs (e.g. from a `PatientCache`'s
  `sparse(i)`) into one archive; see `pack`. With encoded=True the pairs
  are (split, (entry, block)) from `encode_patient`."""
  archive = fileio.check_output_file(
      archive, overwrite=overwrite, hint="pass --overwrite to replace it"
  )
  if not 0 <= int(dose_decimals) <= 6:
    raise ValueError(f"dose_decimals={dose_decimals}: choose 0..6")
  entries, blocks, splits = [], [], {}
  for split, item in patients:
    entry, block = item if encoded else encode_patient(item, dose_decimals)
    if entry["patient_id"] in splits.setdefault(split, []):
      raise openkbp.DataError(
          f"{archive}: patient {split}/{entry['patient_id']} " "given twice"
      )
    splits[split].append(entry["patient_id"])
    entries.append({"split": split, **entry})
    blocks.append(block)
  if not entries:
    raise openkbp.DataError(f"{archive}: no patients to pack")
  offset = 0
  for entry in entries:
    entry["offset"] = offset
    offset += entry["size"]
  header = {
      "format_version": FORMAT_VERSION,
      "dose_decimals": int(dose_decimals),
      "max_dose_error_gy": max_dose_error_gy(dose_decimals),
      "splits": splits,
      "data_size": offset,
      "patients": entries,
  }
  text = json.dumps(header, separators=(",", ":")).encode()
  with fileio.atomic_output(archive, overwrite=overwrite) as f:
    f.write(MAGIC + _HEADER.pack(len(text), zlib.crc32(text)) + text)
    for block in blocks:
      f.write(block)
  return header


@dataclasses.dataclass
class Archive:
  """An opened archive: its header checked, blocks read on demand."""

  path: Path
  header: dict
  data_start: int

  @property
  def splits(self) -> dict[str, list[str]]:
    return self.header["splits"]

  @property
  def dose_decimals(self) -> int:
    return self.header["dose_decimals"]

  def entries(self, split: str | None = None) -> list[dict]:
    return [e for e in self.header["patients"] if split in (None, e["split"])]

  def read(self, entry: dict) -> openkbp.SparsePatient:
    """One patient (`SparsePatient`), checked."""
    where = f"{self.path}: patient {entry['split']}/{entry['patient_id']}"
    with open(self.path, "rb") as f:
      f.seek(self.data_start + entry["offset"])
      block = f.read(entry["size"])
    return decode_patient(entry, block, self.dose_decimals, where)

  def __iter__(self) -> Iterator[tuple[str, openkbp.SparsePatient]]:
    for entry in self.entries():
      yield entry["split"], self.read(entry)


def open_archive(path: str | os.PathLike) -> Archive:
  """Opens an archive written by `pack` and checks its header and length.

  Raises:
    DataError: not such an archive, another format version, a damaged
      header, or a file shorter or longer than its header says (truncated).
  """
  path = Path(path)
  try:
    with open(path, "rb") as f:
      head = f.read(len(MAGIC) + _HEADER.size)
      if head[: len(MAGIC)] != MAGIC:
        raise openkbp.DataError(
            f"{path}: not a randose_jax transport archive (no magic line)"
        )
      if len(head) < len(MAGIC) + _HEADER.size:
        raise openkbp.DataError(f"{path}: truncated inside the header")
      length, crc = _HEADER.unpack(head[len(MAGIC) :])
      text = f.read(length)
      size = os.fstat(f.fileno()).st_size
  except OSError as e:
    raise openkbp.DataError(f"{path}: cannot read archive ({e})") from e
  if len(text) != length:
    raise openkbp.DataError(
        f"{path}: truncated inside the header "
        f"({len(text)} of {length} bytes)"
    )
  if zlib.crc32(text) != crc:
    raise openkbp.DataError(
        f"{path}: header CRC-32 mismatch (the archive is "
        "damaged; copy it again)"
    )
  header = json.loads(text)
  if header.get("format_version") != FORMAT_VERSION:
    raise openkbp.DataError(
        f"{path}: archive format {header.get('format_version')}, "
        f"this library reads {FORMAT_VERSION}"
    )
  start = len(MAGIC) + _HEADER.size + length
  if size != start + header["data_size"]:
    raise openkbp.DataError(
        f"{path}: {size} bytes, the header says {start + header['data_size']} "
        f"({'truncated' if size < start + header['data_size'] else 'trailing bytes'}"
        "; copy it again)"
    )
  return Archive(path, header, start)


# ---------------------------------------------------- into a cache


def _write_cache_file(job) -> dict:
  """Decodes one patient and writes its cache file (`cache.py`'s format and
  entry); returns its manifest entry."""
  archive, entry, cache_dir, settings = job
  key = cache_lib.entry_key(
      entry["patient_id"],
      settings,
      archive=entry["content_crc32"],
      dose_decimals=archive.dose_decimals,
  )
  return cache_lib.write_patient_file(
      cache_dir,
      archive.read(entry),
      f"{archive.path.resolve()}#{entry['split']}/{entry['patient_id']}",
      key,
  )


def unpack_to_cache(
    archive: str | os.PathLike | Archive,
    cache_root: str | os.PathLike,
    data_config,
    *,
    splits: Sequence[str] | None = None,
    workers: int = 1,
    progress: progress_lib.Mode = None,
) -> dict[str, cache_lib.PatientCache]:
  """Writes `cache_root/<split>/` for each split: the cache that
  `cache.build_cache` builds from the CSVs (same file format, a manifest for
  `data_config`'s encoding settings), read back with `cache.open_cache`.

  Returns {split: PatientCache}. On any error the files written are removed.
  Each patient written is counted done on stderr (`progress.Counter`, label
  'unpack <split>'; `progress`: None a live line on a terminal and one line
  per patient elsewhere, True the live line, False the lines, 'off'
  nothing).

  Raises:
    DataError: a damaged archive (see `open_archive`, `decode_patient`),
      or a split it does not hold.
  """
  if not isinstance(archive, Archive):
    archive = open_archive(archive)
  splits = list(archive.splits) if splits is None else list(splits)
  for split in splits:
    if split not in archive.splits:
      raise openkbp.DataError(
          f"{archive.path}: no split {split!r} (it holds "
          f"{sorted(archive.splits)})"
      )
  settings = cache_lib.encoding_settings(data_config)
  cache_root = fileio.check_output_dir(cache_root)
  caches = {}
  with fileio.undo_new_files(cache_root):
    for split in splits:
      cache_dir = cache_root / split
      cache_dir.mkdir(parents=True, exist_ok=True)
      jobs = [(archive, e, cache_dir, settings) for e in archive.entries(split)]
      entries = []
      with progress_lib.Counter(
          f"unpack {split}", len(jobs), progress
      ) as counter:
        for entry in _map(_write_cache_file, jobs, workers):
          entries.append(entry)
          counter.done(entry["patient_id"])
      cache_lib.write_manifest(cache_dir, entries, settings)
      caches[split] = cache_lib.open_cache(cache_dir, data_config)
  return caches


# ---------------------------------------------------------- checking


def compare(
    original: openkbp.SparsePatient,
    restored: openkbp.SparsePatient,
    max_dose_error: float,
) -> float:
  """Checks a restored patient against the original (e.g. read from the
  CSVs): grid, voxel sizes, every voxel set and the CT bit-exact, the dose
  within `max_dose_error` Gy. Returns the largest dose error (Gy).

  Raises:
    DataError: naming the patient and the first item that differs.
  """
  name = original.patient_id

  def same(what, a, b):
    if (a is None) != (b is None) or (
        a is not None
        and not (np.shape(a) == np.shape(b) and np.array_equal(a, b))
    ):
      raise openkbp.DataError(f"{name}: {what} differs from the original")

  same(
      "patient id", np.array(original.patient_id), np.array(restored.patient_id)
  )
  same(
      "grid shape", np.array(original.grid_shape), np.array(restored.grid_shape)
  )
  same("voxel dimensions", original.voxel_dimensions, restored.voxel_dimensions)
  same("CT voxels", original.ct_index, restored.ct_index)
  same("CT values", original.ct_value.astype(np.float32), restored.ct_value)
  same("possible-dose mask", original.mask_index, restored.mask_index)
  for roi, a, b in zip(
      openkbp.ROI_NAMES, original.roi_index, restored.roi_index
  ):
    same(f"{roi} voxels", a, b)
  same("dose voxels", original.dose_index, restored.dose_index)
  if original.dose_value is None:
    return 0.0
  error = np.abs(original.dose_value - restored.dose_value)
  worst = float(error.max()) if error.size else 0.0
  if worst > max_dose_error + 1e-9:  # float64 rounding at exact half steps
    raise openkbp.DataError(
        f"{name}: dose differs by up to {worst} Gy "
        f"(allowed {max_dose_error})"
    )
  return worst


def check_archive(archive_path, root, progress=None) -> tuple[int, float]:
  """Compares every patient of the archive with the CSVs under `root`
  (`<root>/<split>/pt_*`): CT, voxel sets and voxel sizes bit-exact, the
  dose within the archive's bound. Returns (patients compared, the largest
  dose error in Gy).

  Raises:
    DataError: a split folder holding other patients than the archive, or
      a patient that differs.
  """
  archive = open_archive(archive_path)
  for split, ids in archive.splits.items():
    on_disk = [
        d.name
        for d in openkbp.list_patient_dirs(
            openkbp.split_dir(root, split, what="--root")
        )
    ]
    if sorted(on_disk) != sorted(ids):
      raise openkbp.DataError(
          f"{Path(root) / split}: holds {len(on_disk)} patients, the "
          f"archive {len(ids)}; differing: "
          f"{sorted(set(on_disk) ^ set(ids))[:10]}"
      )
  worst, count = 0.0, 0
  entries = archive.entries()
  with progress_lib.Counter("check", len(entries), progress) as counter:
    for entry in entries:
      original = openkbp.load_sparse_patient(
          Path(root) / entry["split"] / entry["patient_id"]
      )
      worst = max(
          worst,
          compare(
              original,
              archive.read(entry),
              archive.header["max_dose_error_gy"],
          ),
      )
      count += 1
      counter.done(f"{entry['split']}/{entry['patient_id']}")
  return count, worst


if __name__ == "__main__":
  # `python -m randose_jax.data.transport` runs the command
  # (randose_jax/cli/transport.py, also `randose-transport`).
  from randose_jax.cli.transport import run  # pylint: disable=g-import-not-at-top

  run()
