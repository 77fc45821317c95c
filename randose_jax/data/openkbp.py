"""The OpenKBP on-disk format: reading patients, writing predictions.

One folder per patient (`pt_<n>`), one sparse CSV per item (docs/design.md section
1). A sparse CSV has the header line `,data`; each following line holds a flat
C-order voxel index and, for `ct.csv` and `dose.csv`, a value. Mask files
(`possible_dose_mask.csv` and the ROI files) leave the value empty.

pyarrow's CSV reader (where pyarrow is installed; else pandas' C parser)
reads the rows and numpy checks them (indices in the grid, no repeats,
finite values, no negative dose). A file pyarrow does not read cleanly is
read by pandas, as without pyarrow; a file that fails there too is read
again line by line, only to raise a `DataError` naming the file, the first
bad line and the problem.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import os
import re
import stat
import zipfile
from pathlib import Path

import numpy as np

try:  # the fast reader (requirements.txt); pandas' C engine without it
  import pyarrow as _pa
  import pyarrow.csv as _pa_csv
except ImportError:  # pragma: no cover - depends on the environment
  _pa = _pa_csv = None

from randose_jax import fileio

# The data's conventions, defined in conventions.py (and read here too).
from randose_jax.conventions import (  # noqa: F401
    CT_OFFSET,
    GRID_SHAPE,
    OAR_NAMES,
    ROI_NAMES,
    TARGET_NAMES,
)

# Prescription of each target, Gy (the number in its name).
PRESCRIPTIONS_GY = {"PTV56": 56.0, "PTV63": 63.0, "PTV70": 70.0}

CT_FILE = "ct.csv"
DOSE_FILE = "dose.csv"
MASK_FILE = "possible_dose_mask.csv"
VOXEL_DIMENSIONS_FILE = "voxel_dimensions.csv"
# Project extension: three integers declaring a grid other than 128^3.
GRID_SHAPE_FILE = "grid_shape.csv"


class DataError(ValueError):
  """Bad input data; the message names the file and what is wrong with it."""


@dataclasses.dataclass
class Patient:
  """One patient at its own grid (D, H, W), axes as in docs/design.md section 1.

  Attributes:
    patient_id: folder name, e.g. "pt_10".
    ct: float32 (D, H, W), HU + 1024 as stored (0 = air / absent).
    dose: float64 (D, H, W) in Gy, or None for a patient to predict.
    structure_masks: bool (D, H, W, 10), channels in `ROI_NAMES` order.
    roi_present: bool (10,), False where the ROI was not contoured.
    possible_dose_mask: bool (D, H, W), voxels that can receive dose.
    voxel_dimensions: float64 (3,), mm per voxel along each axis.
  """

  patient_id: str
  ct: np.ndarray
  dose: np.ndarray | None
  structure_masks: np.ndarray
  roi_present: np.ndarray
  possible_dose_mask: np.ndarray
  voxel_dimensions: np.ndarray

  @property
  def grid_shape(self) -> tuple[int, int, int]:
    return tuple(self.ct.shape)


# ------------------------------------------------------------ folders


def _patient_sort_key(path: Path):
  # Numeric order (pt_2 before pt_10), so the order does not depend on how
  # many digits the ids have.
  match = re.fullmatch(r"pt_(\d+)", path.name)
  return (0, int(match.group(1)), path.name) if match else (1, 0, path.name)


def list_patient_dirs(split_dir: str | os.PathLike) -> list[Path]:
  """The `pt_*` folders of a split folder, in numeric id order.

  Raises:
    DataError: the folder does not exist or holds no `pt_*` folder (the
      message says so when it is one patient's folder, or a data root
      holding split folders, instead of a folder of patients).
  """
  split_dir = Path(split_dir)
  if not split_dir.is_dir():
    raise DataError(f"{split_dir}: patients folder not found")
  dirs = [
      p for p in split_dir.iterdir() if p.is_dir() and p.name.startswith("pt_")
  ]
  if not dirs:
    message = f"{split_dir}: no patient folders (pt_*) in it"
    if _is_patient_folder(split_dir):
      message += (
          ": it is one patient's folder; give the folder that holds the "
          f"pt_* folders ({split_dir.parent})"
      )
    else:
      splits = [n for n in SPLIT_NAMES if (split_dir / n).is_dir()]
      if splits:
        message += (
            f": it holds {', '.join(s + '/' for s in splits)}; give one of "
            f"them, e.g. {split_dir / splits[0]}"
        )
    raise DataError(message)
  return sorted(dirs, key=_patient_sort_key)


# The split folders of OpenKBP's provided-data/.
SPLIT_NAMES = ("train-pats", "validation-pats", "test-pats")


def _is_patient_folder(folder: Path) -> bool:
  return folder.name.startswith("pt_") or (folder / CT_FILE).is_file()


def split_dir(
    root: str | os.PathLike, split: str, what: str = "config.data.root"
) -> Path:
  """`root/split`, the folder of one split under a data root.

  Raises:
    DataError: `root/split` is not a folder. The message names `root` and
      says to point `what` at the folder holding the split folders; when
      `root` is itself a split folder (`train-pats/`, a folder of `pt_*`
      folders) or one patient's folder, it says so, with the folder above
      it when that one holds `split`.
  """
  root = Path(root)
  folder = root / split
  if folder.is_dir():
    return folder
  expected = (
      f"point {what} at the folder that holds train-pats/ and "
      "validation-pats/ (OpenKBP's provided-data/)"
  )
  if not root.is_dir():
    raise DataError(f"{root}: {what}: folder not found; {expected}")
  above = None
  if root.name in SPLIT_NAMES or any(
      p.is_dir() and p.name.startswith("pt_") for p in root.iterdir()
  ):
    what_it_is, above = (
        "a split folder itself (it holds pt_* folders)",
        root.parent,
    )
  elif _is_patient_folder(root):
    what_it_is, above = "one patient's folder", root.parent.parent
  elif (root / "provided-data" / split).is_dir():
    what_it_is, above = (
        "the folder above provided-data/",
        root / "provided-data",
    )
  else:
    what_it_is = f"a folder without {split}/"
  message = f"{root}: {what} is {what_it_is}, not the data root: {expected}"
  if above is not None and (above / split).is_dir():
    message += f", here {above}"
  raise DataError(message)


# ------------------------------------------------------- small files


# A sparse CSV's first line (`,data`) is a few bytes, a row some 30 (index,
# value, line end), and a file holds at most one row per voxel of its grid:
# a file beyond these bounds is refused before it is read whole.
MAX_HEADER_BYTES = 4096
MAX_ROW_BYTES = 128


def _check_regular(path: Path, what: str) -> None:
  """DataError unless `path` is a regular file (opening a FIFO would wait
  for a writer); OSError if it cannot be looked at."""
  mode = os.stat(path).st_mode
  if not stat.S_ISREG(mode):
    kind = (
        "a FIFO (named pipe)"
        if stat.S_ISFIFO(mode)
        else "a folder"
        if stat.S_ISDIR(mode)
        else "a device or socket"
    )
    raise DataError(f"{path}: is {kind}, not a regular file; expected {what}")


def _read_small_numbers(path: Path, what: str) -> list[str]:
  """The tokens of a file of a few numbers (at most MAX_HEADER_BYTES)."""
  try:
    _check_regular(path, what)
    with open(path, "rb") as f:
      data = f.read(MAX_HEADER_BYTES + 1)
  except OSError as e:
    raise DataError(f"{path}: cannot read {what}: {e}") from e
  if len(data) > MAX_HEADER_BYTES:
    raise DataError(
        f"{path}: more than {MAX_HEADER_BYTES} bytes; expected {what} "
        "(three numbers)"
    )
  text = data.decode(errors="replace")
  return [t for t in re.split(r"[\s,]+", text) if t]


def read_voxel_dimensions(path: str | os.PathLike) -> np.ndarray:
  """float64 (3,) voxel size in mm: three positive numbers, one per line."""
  path = Path(path)
  tokens = _read_small_numbers(path, "voxel dimensions")
  try:
    values = np.array([float(t) for t in tokens], np.float64)
  except ValueError:
    values = None
  if (
      values is None
      or values.shape != (3,)
      or not np.all(np.isfinite(values))
      or not np.all(values > 0)
  ):
    raise DataError(
        f"{path}: expected three positive numbers (voxel size in "
        f"mm), got {tokens[:6]!r}"
    )
  return values


def read_grid_shape(patient_dir: str | os.PathLike) -> tuple[int, int, int]:
  """The patient's grid: `grid_shape.csv` if present, else (128, 128, 128)."""
  path = Path(patient_dir) / GRID_SHAPE_FILE
  if not path.exists():
    return GRID_SHAPE
  tokens = _read_small_numbers(path, "grid shape")
  try:
    shape = tuple(int(t) for t in tokens)
  except ValueError:
    shape = ()
  if len(shape) != 3 or min(shape) < 1:
    raise DataError(
        f"{path}: expected three positive integers, got {tokens[:6]!r}"
    )
  return shape


# -------------------------------------------------------- sparse CSV

# The first row after the header (leading blank lines skipped).
_FIRST_ROW = re.compile(rb"[ \t\r\n]*([^\r\n]*)")


def _read_csv_pandas(raw: bytes):
  """pandas' reading of a sparse CSV (imported here: with pyarrow installed,
  scoring never needs pandas, and a process that does not import it starts
  about 0.4 s sooner). pandas >= 3.1 rounds every float correctly (and
  deprecates the option); before, the C engine's default converter can be
  an ulp off, so it gets float_precision="round_trip"."""
  import pandas as pd  # pylint: disable=g-import-not-at-top

  precision = (
      {}
      if tuple(map(int, pd.__version__.split(".")[:2])) >= (3, 1)
      else {"float_precision": "round_trip"}
  )
  return pd.read_csv(
      io.BytesIO(raw),
      header=0,
      names=("index", "value"),
      index_col=False,
      quoting=csv.QUOTE_NONE,
      low_memory=False,
      **precision,
  )


_LINE_BREAK = re.compile(r"\r\n?|\n")


def _arrow_options(with_values: bool):
  """pyarrow's options for a sparse CSV's body (the header line cut off):
  two columns, no quoting (pandas reads with QUOTE_NONE), blank lines
  skipped; int64 indices and float64 values, or for masks a value column
  that must be empty (null type). One thread: on 2 busy cores pyarrow's
  own threads gained nothing, and a process that had used them aborted
  once at exit in 41 runs ('terminate called without an active
  exception', pyarrow 26.0.1; benchmarks/NOTES.md)."""
  return dict(
      read_options=_pa_csv.ReadOptions(
          column_names=("index", "value"), use_threads=False
      ),
      parse_options=_pa_csv.ParseOptions(
          quote_char=False,
          double_quote=False,
          escape_char=False,
          newlines_in_values=False,
          ignore_empty_lines=True,
      ),
      convert_options=_pa_csv.ConvertOptions(
          column_types={
              "index": _pa.int64(),
              "value": _pa.float64() if with_values else _pa.null(),
          }
      ),
  )


_UTF8_BOM = b"\xef\xbb\xbf"


def _read_rows_arrow(raw: bytes, body_start: int, with_values: bool):
  """(indices int64, values float64 or None) of a sparse CSV's rows as
  pyarrow reads them, or None where pyarrow is not installed or the file is
  not plain `index,value` rows of finite numbers (pandas then reads it, as
  without pyarrow, and reports what is wrong). pyarrow rounds every float
  correctly, as Python's float() does (tests/test_data_openkbp.py)."""
  if _pa is None or raw.startswith(_UTF8_BOM, body_start):
    return None  # pyarrow would skip a byte-order mark there, pandas not
  try:
    table = _pa_csv.read_csv(
        _pa.BufferReader(memoryview(raw)[body_start:]),
        **_arrow_options(with_values),
    )
  except _pa.ArrowException:  # e.g. a third field, '12.0' as an index
    return None
  index, value = table.column("index"), table.column("value")
  if (
      table.num_rows == 0
      or index.null_count
      or (with_values and value.null_count)
  ):
    return None
  # The chunks' data buffers (no nulls), copied into one writable array, as
  # pandas gives (pyarrow's to_numpy would import pandas, ~0.4 s).
  as_numpy = lambda column, dtype: np.concatenate(
      [
          np.frombuffer(chunk.buffers()[1], dtype, len(chunk), chunk.offset * 8)
          for chunk in column.chunks
      ]
  )
  indices = as_numpy(index, np.int64)
  values = None
  if with_values:
    values = as_numpy(value, np.float64)
    if not np.all(np.isfinite(values)):
      return None
  return indices, values


def _outside_grid(
    path: Path, line: int, index, grid_shape, count: int
) -> DataError:
  num_voxels = int(np.prod(grid_shape))
  return DataError(
      f"{path}: line {line}: voxel index {index} is outside the "
      f"{'x'.join(map(str, grid_shape))} grid (0..{num_voxels - 1}); "
      f"{count} such line(s)"
  )


def _number(text: str, kind):
  """int(text) or float(text), refusing what pandas does not read as a
  number either ('1_000')."""
  if "_" in text:
    raise ValueError(text)
  return kind(text)


def _raise_first_bad_line(
    path: Path,
    raw: bytes,
    body_start: int,
    with_values: bool,
    grid_shape,
    reason: str,
):
  """Raises a DataError naming the first line of a file that pandas could not
  read as `index,value` rows (or read with a non-numeric or non-finite
  field), and the problem. Python, line by line: only for bad files.

  `reason` (what pandas reported) is the message if no line is found bad.
  """
  num_voxels = int(np.prod(grid_shape))
  text = raw[body_start:].decode("utf-8", errors="replace")
  for line_number, line in enumerate(_LINE_BREAK.split(text), start=2):
    line = line.strip()
    if not line:
      continue
    fields = [f.strip() for f in line.split(",")]
    if len(fields) > 2 or (with_values and len(fields) != 2):
      raise DataError(
          f"{path}: line {line_number}: expected 'index,value', "
          f"got {line[:60]!r}"
      )
    try:
      index = _number(fields[0], int)
    except ValueError:
      try:
        as_float = _number(fields[0], float)
      except ValueError:
        as_float = float("nan")
      if not as_float.is_integer():
        raise DataError(
            f"{path}: line {line_number}: voxel index "
            f"{fields[0][:30]!r} is not an integer"
        ) from None
      index = int(as_float)
    if not 0 <= index < num_voxels:
      raise _outside_grid(path, line_number, index, grid_shape, 1)
    if with_values:
      if not fields[1]:
        raise DataError(f"{path}: line {line_number}: missing value")
      try:
        value = _number(fields[1], float)
      except ValueError:
        raise DataError(
            f"{path}: line {line_number}: value {fields[1][:30]!r} "
            f"is not a number"
        ) from None
      if not np.isfinite(value):
        raise DataError(
            f"{path}: line {line_number}: value {fields[1][:30]!r} "
            f"is not finite (NaN or inf)"
        )
  raise DataError(f"{path}: not readable as 'index,value' rows: {reason}")


def _read_bounded(path: Path, num_voxels: int) -> bytes:
  """The bytes of a sparse CSV of a grid of `num_voxels`, or a DataError
  (bounded memory and time) for one that cannot be such a file: not a
  regular file (a FIFO would block), a first line over MAX_HEADER_BYTES,
  more bytes than `num_voxels` rows of MAX_ROW_BYTES, more lines than the
  grid has voxels (+ the header)."""
  try:
    _check_regular(path, "a sparse CSV")
    with open(path, "rb", buffering=0) as f:
      info = os.fstat(f.fileno())
      head = f.read(MAX_HEADER_BYTES + 1)
      if b"\n" not in head and len(head) > MAX_HEADER_BYTES:
        raise DataError(
            f"{path}: line 1 is longer than {MAX_HEADER_BYTES} bytes "
            f"(starts {head[:40]!r}); expected the header line ',data'"
        )
      limit = MAX_HEADER_BYTES + num_voxels * MAX_ROW_BYTES
      if info.st_size > limit:
        raise DataError(
            f"{path}: {info.st_size:,} bytes, more than a sparse CSV of "
            f"{num_voxels:,} voxels can hold ({num_voxels:,} rows of at "
            f"most {MAX_ROW_BYTES} bytes)"
        )
      raw = head + f.read()
  except DataError:
    raise
  except OSError as e:
    raise DataError(f"{path}: cannot read: {e}") from e
  lines = raw.count(b"\n") + (not raw.endswith(b"\n"))
  if lines > num_voxels + 1:
    raise DataError(
        f"{path}: {lines:,} lines, more than the header and one row per "
        f"voxel of its grid ({num_voxels:,} voxels)"
    )
  return raw


def _row_lines(raw: bytes, body_start: int):
  """Where each row of the body is: (line numbers, start and end offsets in
  `raw`), int64 (rows,). A row is a line that is not blank (spaces, tabs),
  as pandas counts them; the header is line 1. Memory: a few bytes per
  byte of `raw` and per line (bool masks, one int64 per line)."""
  a = np.frombuffer(raw, np.uint8)
  newline = a == 10
  # A line ends at \n, or at a \r not followed by \n.
  end = a == 13
  end[:-1] &= ~newline[1:]
  end |= newline
  ends = np.append(np.flatnonzero(end), a.size)
  del end
  starts = np.append(0, ends[:-1] + 1)
  # Each segment [start, next start) holds its line and its line end (blank
  # bytes), so "any byte not blank" over it is whether the line is filled.
  blank = newline
  blank |= a == 13
  blank |= a == 32
  blank |= a == 9
  np.logical_not(blank, out=blank)
  inside = starts < a.size  # a last, empty line after the final line end
  filled = np.zeros(starts.size, bool)
  if inside.any():
    filled[inside] = np.logical_or.reduceat(blank, starts[inside])
  lines = np.flatnonzero(filled & (starts >= body_start))
  return lines + 1, starts[lines], ends[lines]


def _check_unique(path: Path, indices: np.ndarray, row_lines) -> None:
  """DataError if a voxel index appears on two rows (which value would be
  meant?). Sorted files, as OpenKBP's are, pass in one O(n) comparison.
  `row_lines()` gives each row's line number."""
  if np.all(indices[1:] > indices[:-1]):
    return
  order = np.argsort(indices, kind="stable")
  repeats = np.flatnonzero(indices[order][1:] == indices[order][:-1])
  if not repeats.size:
    return
  # The stable sort keeps equal indices in file order: order[r + 1] is a
  # later row repeating order[r]. Report the first repeat in the file.
  later = order[repeats + 1]
  k = int(np.argmin(later))
  lines = row_lines()
  raise DataError(
      f"{path}: line {lines[later[k]]}: voxel index "
      f"{indices[later[k]]} already appeared on line "
      f"{lines[order[repeats[k]]]}; {repeats.size} repeated "
      f"line(s)"
  )


def read_sparse_csv(
    path: str | os.PathLike,
    grid_shape=GRID_SHAPE,
    *,
    with_values: bool = True,
    nonnegative: bool = False,
    use_arrow: bool = True,
):
  """Reads one sparse OpenKBP CSV.

  pyarrow reads the rows, or pandas' C parser where pyarrow is not
  installed or does not read the file cleanly (both round floats correctly,
  as Python's float() does); numpy checks them. Blank lines are skipped, CRLF line
  ends and spaces around fields are accepted, quotes are not.

  Args:
    path: the CSV file.
    grid_shape: the grid its flat C-order indices address.
    with_values: read the `data` column (ct, dose) or only the indices (masks).
    nonnegative: a negative value is an error (dose files: a dose is never
      negative).
    use_arrow: False reads with pandas only (the same arrays, the same
      errors; for tests and benchmarks).

  Returns:
    (indices int64 (n,), values float64 (n,) or None).

  Raises:
    DataError: unreadable or empty file, a header other than `,data` (any
      first field), a malformed line, a non-numeric or non-finite value, a
      negative value when `nonnegative`, an index outside the grid, or an
      index on two lines; the message names the file and the first such line.
  """
  path = Path(path)
  raw = _read_bounded(path, int(np.prod(grid_shape)))
  header_end = raw.find(b"\n")
  header = raw if header_end < 0 else raw[:header_end]
  if not header.strip():
    raise DataError(f"{path}: empty file (expected the header line ',data')")
  fields = header.strip().split(b",")
  if (
      header.lstrip()[:1].isdigit()
      or len(fields) != 2
      or (fields[1].strip() != b"data")
  ):
    raise DataError(
        f"{path}: line 1 is {header[:40]!r}, expected the header "
        f"line ',data'"
    )
  body_start = len(raw) if header_end < 0 else header_end + 1

  def bad_line(reason):
    _raise_first_bad_line(
        path, raw, body_start, with_values, grid_shape, reason
    )

  # pandas refuses a row with a third field, except the first one (it would
  # take the first column for an index and drop the third): look at it.
  if _FIRST_ROW.match(raw, body_start).group(1).count(b",") > 1:
    bad_line("a row with more than two fields")
  rows = _read_rows_arrow(raw, body_start, with_values) if use_arrow else None
  if rows is not None:
    indices, values = rows
  else:
    try:
      frame = _read_csv_pandas(raw)
    except ValueError as e:  # pandas' ParserError, UnicodeDecodeError
      bad_line(str(e).strip())
    if not len(frame):
      return np.zeros(0, np.int64), (
          np.zeros(0, np.float64) if with_values else None
      )

    indices = frame["index"].to_numpy()
    if indices.dtype.kind == "f" and np.all(
        np.isfinite(indices) & (np.floor(indices) == indices)
    ):
      pass  # '12.0', '1e3': integer-valued, read as before
    elif indices.dtype.kind not in "iu":
      bad_line(f"the index column is not all integers ({indices.dtype})")
    values = None
    if with_values:
      values = frame["value"].to_numpy()
      if values.dtype.kind not in "iuf":
        bad_line(f"the value column is not all numbers ({values.dtype})")
      values = values.astype(np.float64, copy=False)
      if not np.all(np.isfinite(values)):
        bad_line("a value is not finite")

  row_lines = lambda: _row_lines(raw, body_start)[0]
  outside = np.flatnonzero((indices < 0) | (indices >= np.prod(grid_shape)))
  if outside.size:
    row = int(outside[0])
    raise _outside_grid(
        path, row_lines()[row], indices[row], grid_shape, outside.size
    )
  indices = indices.astype(np.int64, copy=False)
  if nonnegative and values is not None and values.size and values.min() < 0:
    negative = np.flatnonzero(values < 0)
    row = int(negative[0])
    lines, starts, ends = _row_lines(raw, body_start)
    text = raw[starts[row] : ends[row]].split(b",")[1].strip().decode()
    raise DataError(
        f"{path}: line {lines[row]}: dose {text[:30]} Gy is "
        f"negative (a dose is never negative); {negative.size} "
        f"such line(s)"
    )
  _check_unique(path, indices, row_lines)
  return indices, values


# ----------------------------------------------------------- patients


@dataclasses.dataclass
class SparsePatient:
  """A `Patient` as the CSVs hold it: sorted, unique flat C-order voxel
  indices (int64) with values, the compact form the cache stores and the
  encoder reads (`Patient` is its dense view, `to_patient`).

  Attributes:
    patient_id: folder name.
    grid_shape: (D, H, W).
    ct_index, ct_value: stored CT voxels, float32 HU + 1024; both None when
      read without CT (`load_sparse_patient(..., with_ct=False)`).
    dose_index, dose_value: float64 Gy, or both None for a patient to predict.
    mask_index: the possible-dose mask's voxels.
    roi_index: one index array per ROI, `ROI_NAMES` order (empty = absent).
    voxel_dimensions: float64 (3,) mm.
  """

  patient_id: str
  grid_shape: tuple[int, int, int]
  ct_index: np.ndarray | None
  ct_value: np.ndarray | None
  dose_index: np.ndarray | None
  dose_value: np.ndarray | None
  mask_index: np.ndarray
  roi_index: tuple[np.ndarray, ...]
  voxel_dimensions: np.ndarray

  @property
  def roi_present(self) -> np.ndarray:
    """bool (10,): an empty ROI file marks nothing, like a missing one."""
    return np.array([index.size > 0 for index in self.roi_index])

  @property
  def num_voxels(self) -> int:
    return int(np.prod(self.grid_shape))

  def to_patient(self) -> Patient:
    """The dense `Patient` (ValueError if read without CT)."""
    if self.ct_index is None:
      raise ValueError(f"{self.patient_id}: read without CT, no dense Patient")

    def dense(index, value, dtype):
      out = np.zeros(self.num_voxels, dtype)
      out[index] = value
      return out.reshape(self.grid_shape)

    masks = np.zeros((self.num_voxels, len(ROI_NAMES)), bool)
    for channel, index in enumerate(self.roi_index):
      masks[index, channel] = True
    return Patient(
        patient_id=self.patient_id,
        ct=dense(self.ct_index, self.ct_value, np.float32),
        dose=None
        if self.dose_index is None
        else dense(self.dose_index, self.dose_value, np.float64),
        structure_masks=masks.reshape(*self.grid_shape, len(ROI_NAMES)),
        roi_present=self.roi_present,
        possible_dose_mask=dense(self.mask_index, True, bool),
        voxel_dimensions=np.asarray(self.voxel_dimensions, np.float64),
    )

  @classmethod
  def from_patient(cls, patient: Patient) -> SparsePatient:
    """The sparse form of a dense `Patient` (zero CT / dose voxels left out)."""
    ct = patient.ct.ravel()
    ct_index = np.flatnonzero(ct)
    dose_index = dose_value = None
    if patient.dose is not None:
      dose = patient.dose.ravel()
      dose_index = np.flatnonzero(dose)
      dose_value = dose[dose_index].astype(np.float64)
    voxels, channels = np.nonzero(
        patient.structure_masks.reshape(-1, len(ROI_NAMES))
    )
    return cls(
        patient_id=patient.patient_id,
        grid_shape=tuple(patient.grid_shape),
        ct_index=ct_index,
        ct_value=ct[ct_index].astype(np.float32),
        dose_index=dose_index,
        dose_value=dose_value,
        mask_index=np.flatnonzero(patient.possible_dose_mask),
        roi_index=tuple(voxels[channels == c] for c in range(len(ROI_NAMES))),
        voxel_dimensions=np.asarray(patient.voxel_dimensions, np.float64),
    )


def _sorted_unique(indices: np.ndarray, values: np.ndarray | None):
  """Indices in increasing order (`read_sparse_csv` refuses repeats; here a
  repeat would keep its last value, as np.put does). OpenKBP files are sorted
  already: O(n) check."""
  if np.all(indices[1:] > indices[:-1]):
    return indices, values
  order = np.argsort(indices, kind="stable")
  indices = indices[order]
  last = np.append(indices[1:] != indices[:-1], True)
  return indices[last], None if values is None else values[order][last]


def load_sparse_patient(
    patient_dir: str | os.PathLike, *, with_ct: bool = True
) -> SparsePatient:
  """Reads one OpenKBP patient folder into a `SparsePatient`.

  Required: ct.csv, possible_dose_mask.csv, voxel_dimensions.csv. Optional:
  dose.csv (absent for patients to predict), each ROI file (absent = not
  contoured), grid_shape.csv (absent = 128^3). with_ct=False leaves ct.csv
  unread (scoring needs no CT; the file must exist all the same) and
  `ct_index`, `ct_value` None.

  Raises:
    DataError: a missing folder or required file, or a bad file (see
      `read_sparse_csv`, `read_voxel_dimensions`).
  """
  patient_dir = Path(patient_dir)
  if not patient_dir.is_dir():
    raise DataError(f"{patient_dir}: patient folder not found")
  for name in (CT_FILE, MASK_FILE, VOXEL_DIMENSIONS_FILE):
    if not os.path.lexists(patient_dir / name):
      raise DataError(
          f"{patient_dir / name}: missing (every patient needs "
          f"{CT_FILE}, {MASK_FILE} and {VOXEL_DIMENSIONS_FILE})"
      )
  grid = read_grid_shape(patient_dir)

  def read(name, with_values=True):
    return _sorted_unique(
        *read_sparse_csv(patient_dir / name, grid, with_values=with_values)
    )

  ct_index, ct_value = read(CT_FILE) if with_ct else (None, None)
  dose_index, dose_value = (
      _sorted_unique(
          *read_sparse_csv(patient_dir / DOSE_FILE, grid, nonnegative=True)
      )
      if os.path.lexists(patient_dir / DOSE_FILE)  # a FIFO is an error
      else (None, None)
  )
  empty = np.zeros(0, np.int64)
  return SparsePatient(
      patient_id=patient_dir.name,
      grid_shape=grid,
      ct_index=ct_index,
      ct_value=None if ct_value is None else ct_value.astype(np.float32),
      dose_index=dose_index,
      dose_value=dose_value,
      mask_index=read(MASK_FILE, False)[0],
      roi_index=tuple(
          read(f"{name}.csv", False)[0]
          if os.path.lexists(patient_dir / f"{name}.csv")
          else empty
          for name in ROI_NAMES
      ),
      voxel_dimensions=read_voxel_dimensions(
          patient_dir / VOXEL_DIMENSIONS_FILE
      ),
  )


def load_patient(patient_dir: str | os.PathLike) -> Patient:
  """Reads one OpenKBP patient folder (see `Patient`, `load_sparse_patient`).

  Raises:
    DataError: a missing folder or required file, or a bad file.
  """
  return load_sparse_patient(patient_dir).to_patient()


# -------------------------------------------------------- predictions


def format_sparse_csv(
    indices: np.ndarray, values: np.ndarray | None = None
) -> bytes:
  """Sparse CSV text: the header `,data`, then `index,value` per voxel.

  Values are written as Python's shortest round-trip repr (as pandas'
  `to_csv` does); with values None the data column is left empty (masks).
  """
  indices = np.asarray(indices, np.int64).tolist()
  if values is None:
    lines = [f"{i},\n" for i in indices]
  else:
    values = np.asarray(values, np.float64).tolist()
    lines = [f"{i},{v!r}\n" for i, v in zip(indices, values)]
  return (",data\n" + "".join(lines)).encode()


def write_prediction_csv(
    path: str | os.PathLike, dose_gy: np.ndarray, *, overwrite: bool = False
) -> Path:
  """Writes a predicted dose (float (D, H, W), Gy) in the submission format.

  Raises:
    FileExistsError: `path` exists and overwrite is False.
    ValueError: dose_gy is not 3-D or holds NaN / inf or a negative dose.
  """
  dose_gy = np.asarray(dose_gy)
  if dose_gy.ndim != 3:
    raise ValueError(
        f"{path}: dose must be (D, H, W), got shape {dose_gy.shape}"
    )
  if not np.all(np.isfinite(dose_gy)):
    raise ValueError(f"{path}: refusing to write a dose with NaN or inf")
  if dose_gy.size and dose_gy.min() < 0:
    raise ValueError(
        f"{path}: refusing to write a negative dose "
        f"({np.count_nonzero(dose_gy < 0)} voxels, min "
        f"{float(dose_gy.min())!r} Gy)"
    )
  flat = dose_gy.astype(np.float64).ravel()
  indices = np.flatnonzero(flat)  # the official writer keeps nonzero voxels
  data = format_sparse_csv(indices, flat[indices])
  with fileio.atomic_output(path, overwrite=overwrite) as f:
    f.write(data)
  return Path(path)


def read_prediction_csv(
    path: str | os.PathLike, grid_shape=GRID_SHAPE
) -> np.ndarray:
  """float64 (D, H, W) Gy from a prediction (or dose) CSV; absent voxels = 0.

  Raises:
    DataError: see `read_sparse_csv`; a negative dose is an error naming the
      file and its first negative line (never clipped silently).
  """
  indices, values = read_sparse_csv(
      path, grid_shape, with_values=True, nonnegative=True
  )
  dose = np.zeros(int(np.prod(grid_shape)), np.float64)
  dose[indices] = values
  return dose.reshape(grid_shape)


def write_submission_zip(
    pred_dir: str | os.PathLike,
    zip_path: str | os.PathLike,
    *,
    overwrite: bool = False,
) -> Path:
  """Zips the `pt_*.csv` files of `pred_dir` (flat) for the leaderboard.

  Raises:
    DataError: `pred_dir` holds no `pt_*.csv`.
    FileExistsError: `zip_path` exists and overwrite is False.
  """
  pred_dir = Path(pred_dir)
  files = sorted(
      (p for p in pred_dir.glob("pt_*.csv") if p.is_file()),
      key=lambda p: _patient_sort_key(p.with_suffix("")),
  )
  if not files:
    raise DataError(f"{pred_dir}: no prediction files (pt_*.csv) to zip")
  with fileio.atomic_output(zip_path, overwrite=overwrite) as f:
    with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as archive:
      for path in files:
        archive.write(path, arcname=path.name)
  return Path(zip_path)
