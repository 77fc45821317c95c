"""The OpenKBP reader, bad-input errors, prediction writer and phantoms."""

import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from randose_jax import fileio
from randose_jax.data import openkbp
from randose_jax.data import phantoms
from randose_jax.data.openkbp import DataError


def snapshot(folder: Path) -> dict:
  """Every file under `folder` with its mtime and bytes."""
  return {
      p.relative_to(folder): (p.stat().st_mtime_ns, p.read_bytes())
      for p in sorted(folder.rglob("*"))
      if p.is_file()
  }


def expect_data_error(patient_dir: Path, file_name: str, *words: str):
  """load_patient fails with a DataError naming the file and the problem,
  and leaves the folder exactly as it was."""
  before = snapshot(patient_dir)
  with pytest.raises(DataError) as info:
    openkbp.load_patient(patient_dir)
  message = str(info.value)
  assert str(patient_dir / file_name) in message
  for word in words:
    assert word in message
  assert snapshot(patient_dir) == before


def replace_line(path: Path, line_number: int, new_line: str):
  lines = path.read_text().splitlines()
  lines[line_number - 1] = new_line
  path.write_text("\n".join(lines) + "\n")


# ----------------------------------------------------------------- reading


def test_load_phantom_patient(phantom_split):
  patient = openkbp.load_patient(phantom_split / "pt_1")
  shape = (16, 16, 16)
  assert patient.patient_id == "pt_1"
  assert patient.ct.shape == shape and patient.ct.dtype == np.float32
  assert patient.dose.shape == shape and patient.dose.dtype == np.float64
  assert patient.structure_masks.shape == shape + (10,)
  assert patient.structure_masks.dtype == bool
  assert patient.possible_dose_mask.dtype == bool
  assert patient.voxel_dimensions.shape == (3,)
  files = {p.stem for p in (phantom_split / "pt_1").glob("*.csv")}
  assert list(patient.roi_present) == [
      name in files for name in openkbp.ROI_NAMES
  ]
  np.testing.assert_array_equal(
      patient.structure_masks.any((0, 1, 2)), patient.roi_present
  )


def test_missing_dose_and_missing_roi(phantom_patient):
  (phantom_patient / "dose.csv").unlink()
  (phantom_patient / "PTV70.csv").unlink()
  (phantom_patient / "Brainstem.csv").write_text(
      ",data\n"
  )  # contoured as empty
  patient = openkbp.load_patient(phantom_patient)
  assert patient.dose is None
  assert not patient.roi_present[openkbp.ROI_NAMES.index("PTV70")]
  assert not patient.roi_present[openkbp.ROI_NAMES.index("Brainstem")]
  assert not patient.structure_masks[..., -1].any()


def test_sparse_patient_without_ct(phantom_split):
  full = openkbp.load_sparse_patient(phantom_split / "pt_1")
  no_ct = openkbp.load_sparse_patient(phantom_split / "pt_1", with_ct=False)
  assert no_ct.ct_index is None and no_ct.ct_value is None
  np.testing.assert_array_equal(no_ct.dose_value, full.dose_value)
  np.testing.assert_array_equal(no_ct.mask_index, full.mask_index)
  for a, b in zip(no_ct.roi_index, full.roi_index):
    np.testing.assert_array_equal(a, b)
  with pytest.raises(ValueError, match="without CT"):
    no_ct.to_patient()


def test_list_patient_dirs_numeric_order(tmp_path):
  for name in ("pt_10", "pt_2", "pt_100", "pt_1"):
    (tmp_path / name).mkdir()
  (tmp_path / "notes.txt").write_text("not a patient")
  (tmp_path / "pt_3.csv").write_text("a file, not a folder")
  names = [p.name for p in openkbp.list_patient_dirs(tmp_path)]
  assert names == ["pt_1", "pt_2", "pt_10", "pt_100"]


def test_list_patient_dirs_empty_or_missing(tmp_path):
  with pytest.raises(DataError, match="no patient folders"):
    openkbp.list_patient_dirs(tmp_path)
  with pytest.raises(DataError, match="not found"):
    openkbp.list_patient_dirs(tmp_path / "absent")


def _provided_data(tmp_path: Path) -> Path:
  """An OpenKBP provided-data/ of two splits, one patient (ct.csv) each."""
  root = tmp_path / "open-kbp" / "provided-data"
  for split, pid in (("train-pats", "pt_1"), ("validation-pats", "pt_2")):
    (root / split / pid).mkdir(parents=True)
    (root / split / pid / "ct.csv").write_text(",data\n")
  return root


@pytest.mark.parametrize(
    "given,what_it_is",
    [
        ("provided-data/train-pats", "a split folder itself"),
        ("provided-data/validation-pats", "a split folder itself"),
        ("provided-data/train-pats/pt_1", "one patient's folder"),
        (".", "the folder above provided-data/"),
    ],
)
def test_data_root_one_level_off_says_where_to_point(
    tmp_path, given, what_it_is
):
  """The issue's path mistake: config.data.root at train-pats/ itself (or
  a patient, or the repository above provided-data/) is refused naming the
  path given and the folder to give instead."""
  root = _provided_data(tmp_path)
  wrong = (root.parent / given).resolve()
  with pytest.raises(DataError) as info:
    openkbp.split_dir(wrong, "train-pats")
  message = str(info.value)
  assert message.startswith(f"{wrong}: config.data.root is {what_it_is}")
  assert "the folder that holds train-pats/ and validation-pats/" in message
  assert message.endswith(f", here {root}")
  assert openkbp.split_dir(root, "validation-pats") == root / "validation-pats"


def test_data_root_missing_or_without_splits(tmp_path):
  with pytest.raises(DataError, match="--root: folder not found"):
    openkbp.split_dir(tmp_path / "absent", "train-pats", what="--root")
  with pytest.raises(DataError) as info:
    openkbp.split_dir(tmp_path, "train-pats")
  assert "a folder without train-pats/" in str(info.value)
  assert ", here" not in str(info.value)


def test_patients_folder_one_level_off_says_which_to_give(tmp_path):
  """--patients / --reference given one patient's folder, or the data root
  holding the splits: the message says what was given and what to give."""
  root = _provided_data(tmp_path)
  with pytest.raises(DataError) as info:
    openkbp.list_patient_dirs(root / "train-pats" / "pt_1")
  assert str(info.value) == (
      f"{root / 'train-pats' / 'pt_1'}: no patient folders (pt_*) in it: "
      "it is one patient's folder; give the folder that holds the pt_* "
      f"folders ({root / 'train-pats'})"
  )
  with pytest.raises(DataError) as info:
    openkbp.list_patient_dirs(root)
  assert str(info.value) == (
      f"{root}: no patient folders (pt_*) in it: it holds train-pats/, "
      f"validation-pats/; give one of them, e.g. {root / 'train-pats'}"
  )


def write_csv(path: Path, lines: list[str], newline: str = "\n") -> Path:
  path.write_text(newline.join([",data"] + lines) + newline)
  return path


# Both readers of `read_sparse_csv`: pyarrow (where installed; without it
# use_arrow=True reads with pandas too) and pandas' C engine.
both_readers = pytest.mark.parametrize(
    "use_arrow", [True, False], ids=["arrow", "pandas"]
)


@both_readers
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_values_read_as_python_float_reads_them(tmp_path, seed, use_arrow):
  # Fixed decimals, full precision (repr, as pandas' to_csv writes), and
  # exponents, with LF and CRLF: every value bit-equal to float(text).
  rng = np.random.default_rng(seed)
  n = 3000
  indices = np.sort(rng.choice(16**3, n, replace=False))
  values = rng.uniform(-3000, 3000, n) * 10.0 ** rng.integers(-12, 4, n)
  kinds = rng.integers(0, 4, n)
  text = [
      f"{i},{v:.{k}f}"
      if kind == 0
      else f"{i},{v!r}"
      if kind == 1
      else f"{i},{v:.{k}e}"
      if kind == 2
      else f"{i},{v:.{k}E}"
      for i, v, k, kind in zip(
          indices.tolist(),
          values.tolist(),
          rng.integers(0, 18, n).tolist(),
          kinds,
      )
  ]
  expected = np.array([float(t.split(",")[1]) for t in text])
  for newline in ("\n", "\r\n"):
    path = write_csv(tmp_path / "x.csv", text, newline)
    read_indices, read_values = openkbp.read_sparse_csv(
        path, (16, 16, 16), use_arrow=use_arrow
    )
    assert read_indices.dtype == np.int64 and read_values.dtype == np.float64
    np.testing.assert_array_equal(read_indices, indices)
    np.testing.assert_array_equal(
        read_values.view(np.int64), expected.view(np.int64)
    )


@both_readers
def test_irregular_but_valid_csv(tmp_path, use_arrow):
  # Exponents, a '+', CRLF, spaces, a blank line and no final newline.
  path = tmp_path / "x.csv"
  path.write_bytes(b",data\r\n3,1e-05\r\n 7 , +2.5\r\n\r\n4095,1E2")
  read = lambda path: openkbp.read_sparse_csv(
      path, (16, 16, 16), use_arrow=use_arrow
  )
  indices, values = read(path)
  np.testing.assert_array_equal(indices, [3, 7, 4095])
  np.testing.assert_array_equal(values, [1e-05, 2.5, 100.0])
  # Integers without a decimal point, and negative values.
  write_csv(path, ["1,5", "2,-17", "9,0"])
  indices, values = read(path)
  np.testing.assert_array_equal(values, [5.0, -17.0, 0.0])
  # A header and nothing else: no voxels.
  write_csv(path, [])
  indices, values = read(path)
  assert indices.size == 0 and values.size == 0


@both_readers
def test_mask_rows_and_integer_valued_indices(tmp_path, use_arrow):
  # Mask rows with or without the comma; an index written as a float.
  path = tmp_path / "m.csv"
  path.write_bytes(b",data\n5\n6,\n12.0,\n1e3,\n")
  indices, values = openkbp.read_sparse_csv(
      path, (16, 16, 16), with_values=False, use_arrow=use_arrow
  )
  assert values is None and indices.dtype == np.int64
  np.testing.assert_array_equal(indices, [5, 6, 12, 1000])


@pytest.mark.parametrize(
    "body, with_values",
    [
        (b"3,1e-05\n7,2.5\n", True),
        (b"3,1e-05\r\n\r\n 7 , 2.5 \r\n4095,1E2", True),  # CRLF, spaces, blank
        (b"3,1e-05\r7,2.5\r", True),  # lone CRs end lines for both
        (b"3,\n7,\n\n4095,\n", False),
        (b"3,\r\n7,\r\n", False),
        (b"3,\n7,NaN\n", False),  # a mask's value column is not read
        (b"3,2.5\n\xef\xbb\xbf7,1.0\n", True),  # a BOM on a data line: pandas
        (b"3,\n\xef\xbb\xbf7,\n", False),
        (b"", True),
        (b"\n\n", False),
    ],
)
def test_arrow_and_pandas_read_the_same(tmp_path, body, with_values):
  path = tmp_path / "x.csv"
  path.write_bytes(b",data\n" + body)
  results = []
  for use_arrow in (True, False):
    try:
      results.append(
          openkbp.read_sparse_csv(
              path, (16, 16, 16), with_values=with_values, use_arrow=use_arrow
          )
      )
    except DataError as e:
      results.append(str(e))
  arrow, pandas = results
  if isinstance(pandas, str):
    assert arrow == pandas
    return
  for a, b in zip(arrow, pandas):
    if b is None:
      assert a is None
    else:
      assert a.dtype == b.dtype
      np.testing.assert_array_equal(a.view(np.int64), b.view(np.int64))


def test_arrow_reads_clean_files_without_pandas(tmp_path, monkeypatch):
  # With pyarrow installed, pandas is not called for a clean file (values at
  # full precision, exponents, CRLF, a mask); it still is for a bad one.
  pytest.importorskip("pyarrow")
  calls = []
  read_csv = pd.read_csv
  monkeypatch.setattr(
      pd, "read_csv", lambda *a, **k: calls.append(1) or read_csv(*a, **k)
  )
  values = np.random.default_rng(0).uniform(0, 80, 500).tolist()
  write_csv(
      tmp_path / "v.csv", [f"{i},{v!r}" for i, v in enumerate(values)], "\r\n"
  )
  write_csv(tmp_path / "e.csv", [f"{i},{v:.6e}" for i, v in enumerate(values)])
  write_csv(tmp_path / "m.csv", [f"{i}," for i in range(0, 4000, 7)])
  _, read = openkbp.read_sparse_csv(tmp_path / "v.csv", (16, 16, 16))
  np.testing.assert_array_equal(read, values)
  openkbp.read_sparse_csv(tmp_path / "e.csv", (16, 16, 16))
  openkbp.read_sparse_csv(tmp_path / "m.csv", (16, 16, 16), with_values=False)
  assert not calls
  write_csv(tmp_path / "b.csv", ["1,2.0", "2,x"])
  with pytest.raises(DataError, match="line 3"):
    openkbp.read_sparse_csv(tmp_path / "b.csv", (16, 16, 16))
  assert calls


@pytest.mark.parametrize(
    "body, with_values, words",
    [
        # A first row with a third field (pandas would take it for an index
        # column), a later one, and one after blank lines.
        (b"1,2.0,3\n2,1.0\n", True, ["line 2", "expected 'index,value'"]),
        (b"1,2.0\n2,1.0,3\n", True, ["line 3", "expected 'index,value'"]),
        (b"\n \n1,,\n2,\n", False, ["line 4", "expected 'index,value'"]),
        (b"1,2.0\n2\n", True, ["line 3", "expected 'index,value'"]),
        (b'1,2.0\n"2",1.0\n', True, ["line 3", "not an integer"]),
        (b"1,2.0\n2,1_0\n", True, ["line 3", "'1_0'", "not a number"]),
        (b"1,2.0\n2,\xff\n", True, ["line 3", "not a number"]),
        (b"1,2.0\n2,inf\n", True, ["line 3", "not finite"]),
        (b"1,2.0\n2,NA\n", True, ["line 3", "'NA'", "not a number"]),
        (b"1,2.0\n2.5,1.0\n", True, ["line 3", "'2.5'", "not an integer"]),
        (b"1,\n\n" + b"9" * 25 + b",\n", False, ["line 4", "outside"]),
        (b"1,\n\n-1,\n", False, ["line 4", "voxel index -1", "outside"]),
        (
            b"1,2\r\n\r\n5,1\r\n1,3\r\n",
            True,
            ["line 5: voxel index 1 already appeared on line 2"],
        ),
        # Python's int() reads full-width digits, pandas does not: refused, with
        # what pandas said.
        (
            "1,2.0\n\uff12,1.0\n".encode(),
            True,
            ["not readable", "index column"],
        ),
    ],
)
@both_readers
def test_error_bad_rows(tmp_path, body, with_values, words, use_arrow):
  path = tmp_path / "x.csv"
  path.write_bytes(b",data\n" + body)
  with pytest.raises(DataError) as info:
    openkbp.read_sparse_csv(
        path, (16, 16, 16), with_values=with_values, use_arrow=use_arrow
    )
  message = str(info.value)
  assert message.startswith(f"{path}: ")
  for word in words:
    assert word in message


def test_unsorted_indices_read_as_np_put_does(phantom_patient):
  path = phantom_patient / "ct.csv"
  lines = path.read_text().splitlines()
  path.write_text("\n".join([lines[0]] + lines[1:][::-1]) + "\n")  # reversed
  frame = pd.read_csv(path, index_col=0)
  expected = np.zeros(16**3, np.float32)
  np.put(expected, frame.index.values, frame["data"].values)
  patient = openkbp.load_patient(phantom_patient)
  np.testing.assert_array_equal(patient.ct.ravel(), expected)


@pytest.mark.parametrize("irregular", [False, True])
def test_error_repeated_index_names_both_lines(phantom_patient, irregular):
  # Which of two values would be meant? A repeat is refused, with or
  # without a '+' (the old per-line parser's case).
  path = phantom_patient / "ct.csv"
  lines = path.read_text().splitlines()
  first_index = lines[3].split(",")[0]
  lines.insert(6, f"{first_index},{'+' if irregular else ''}5.0")
  path.write_text("\n".join(lines) + "\n")
  expect_data_error(
      phantom_patient,
      "ct.csv",
      f"line 7: voxel index {first_index} already appeared on "
      "line 4; 1 repeated line(s)",
  )


@pytest.mark.parametrize("header", ["index,value", ",dose", "a,b,data"])
def test_error_wrong_header(phantom_patient, header):
  path = phantom_patient / "possible_dose_mask.csv"
  lines = path.read_text().splitlines()
  path.write_text("\n".join([header] + lines[1:]) + "\n")
  expect_data_error(
      phantom_patient,
      "possible_dose_mask.csv",
      "expected the header line ',data'",
  )


# --------------------------------------------------------------- bad input


def test_error_empty_folder(tmp_path):
  split = tmp_path / "train-pats"
  split.mkdir()
  with pytest.raises(DataError) as info:
    openkbp.list_patient_dirs(split)
  assert str(split) in str(info.value)
  assert list(split.iterdir()) == []


def test_error_patient_without_ct(phantom_patient):
  (phantom_patient / "ct.csv").unlink()
  expect_data_error(phantom_patient, "ct.csv", "missing")


def test_error_non_numeric_value(phantom_patient):
  replace_line(phantom_patient / "ct.csv", 3, "100,abc")
  expect_data_error(
      phantom_patient, "ct.csv", "line 3", "'abc'", "not a number"
  )


def test_error_non_integer_index(phantom_patient):
  replace_line(phantom_patient / "PTV70.csv", 2, "x12,")
  expect_data_error(phantom_patient, "PTV70.csv", "line 2", "not an integer")


def test_error_index_outside_grid(phantom_patient):
  replace_line(phantom_patient / "dose.csv", 4, f"{16**3},12.5")
  expect_data_error(phantom_patient, "dose.csv", "line 4", "4096", "outside")


def test_error_index_outside_grid_in_mask(phantom_patient):
  replace_line(phantom_patient / "possible_dose_mask.csv", 2, f"{10**12},")
  expect_data_error(phantom_patient, "possible_dose_mask.csv", "outside")


def test_error_nan_value(phantom_patient):
  replace_line(phantom_patient / "dose.csv", 5, "200,nan")
  expect_data_error(phantom_patient, "dose.csv", "line 5", "NaN")


def test_error_negative_dose(phantom_patient):
  """A dose is never negative: the error names the first negative line."""
  path = phantom_patient / "dose.csv"
  index = path.read_text().splitlines()[3].split(",")[0]
  replace_line(path, 4, f"{index},-5.0")
  expect_data_error(
      phantom_patient, "dose.csv", "line 4", "-5.0", "negative", "1 such line"
  )


def test_error_negative_dose_irregular_file(phantom_patient):
  """With an exponent and a blank line too: the value as written, the line
  counted with the blank one."""
  path = phantom_patient / "dose.csv"
  lines = path.read_text().splitlines()
  lines[2] = lines[2].split(",")[0] + ",1.5e1"
  lines[5] = lines[5].split(",")[0] + ",-2.5e-1"
  lines[6] = lines[6].split(",")[0] + ",-3"
  path.write_text("\n".join(lines[:4] + [""] + lines[4:]) + "\n")
  expect_data_error(
      phantom_patient,
      "dose.csv",
      "line 7",
      "-2.5e-1",
      "negative",
      "2 such line",
  )


def test_negative_zero_dose_is_zero(phantom_patient):
  path = phantom_patient / "dose.csv"
  index = int(path.read_text().splitlines()[3].split(",")[0])
  replace_line(path, 4, f"{index},-0.0")
  patient = openkbp.load_patient(phantom_patient)
  assert patient.dose.reshape(-1)[index] == 0.0


def test_negative_ct_value_is_not_a_dose_error(phantom_patient):
  """Only dose files are checked for sign (CT values are HU + 1024)."""
  path = phantom_patient / "ct.csv"
  index = int(path.read_text().splitlines()[2].split(",")[0])
  replace_line(path, 3, f"{index},-3.0")
  assert openkbp.load_patient(phantom_patient).ct.reshape(-1)[index] == -3.0


def test_error_missing_value(phantom_patient):
  replace_line(phantom_patient / "ct.csv", 2, "17,")
  expect_data_error(phantom_patient, "ct.csv", "line 2", "missing value")


@pytest.mark.parametrize(
    "text", ["4.0\n4.0\n", "4.0\n-4.0\n2.5\n", "4\nabc\n2\n", ""]
)
def test_error_voxel_dimensions(phantom_patient, text):
  (phantom_patient / "voxel_dimensions.csv").write_text(text)
  expect_data_error(
      phantom_patient, "voxel_dimensions.csv", "three positive numbers"
  )


def test_error_headerless_csv(phantom_patient):
  path = phantom_patient / "ct.csv"
  path.write_text(path.read_text().split("\n", 1)[1])  # drop the header
  expect_data_error(phantom_patient, "ct.csv", "header")


def test_error_bad_grid_shape(phantom_patient):
  (phantom_patient / "grid_shape.csv").write_text("16\n16\n")
  expect_data_error(
      phantom_patient, "grid_shape.csv", "three positive integers"
  )


# ----------------------------------------------------- the shared patients


def reference_read(patient_dir: Path):
  """A plain independent reading: pandas, then np.put into zeros."""

  def dense(name, dtype, fill=None):
    out = np.zeros(128**3, dtype)
    path = patient_dir / name
    if not path.exists():
      return out.reshape(128, 128, 128), False
    frame = pd.read_csv(path, index_col=0)
    np.put(
        out, frame.index.values, frame["data"].values if fill is None else fill
    )
    return out.reshape(128, 128, 128), True

  ct, _ = dense("ct.csv", np.float32)
  dose, _ = dense("dose.csv", np.float64)
  mask, _ = dense("possible_dose_mask.csv", bool, 1)
  rois = [dense(f"{name}.csv", bool, 1) for name in openkbp.ROI_NAMES]
  spacing = np.loadtxt(patient_dir / "voxel_dimensions.csv")
  return ct, dose, mask, rois, spacing


def test_shared_patients_match_pandas(shared_openkbp):
  dirs = openkbp.list_patient_dirs(
      shared_openkbp / "train-pats"
  ) + openkbp.list_patient_dirs(shared_openkbp / "validation-pats")
  assert len(dirs) == 26
  for patient_dir in dirs:
    patient = openkbp.load_patient(patient_dir)
    ct, dose, mask, rois, spacing = reference_read(patient_dir)
    name = patient_dir.name
    np.testing.assert_array_equal(patient.ct, ct, err_msg=name)
    # pandas' own float parser may differ from the nearest double by an ulp.
    np.testing.assert_allclose(
        patient.dose, dose, rtol=1e-15, atol=0, err_msg=name
    )
    np.testing.assert_array_equal(
        patient.possible_dose_mask, mask, err_msg=name
    )
    for channel, (roi, present) in enumerate(rois):
      np.testing.assert_array_equal(
          patient.structure_masks[..., channel],
          roi,
          err_msg=f"{name} {openkbp.ROI_NAMES[channel]}",
      )
      assert patient.roi_present[channel] == present
    np.testing.assert_array_equal(patient.voxel_dimensions, spacing)
    # dose.csv lists exactly the mask's voxels (a few of them with 0.0 Gy).
    frame = pd.read_csv(patient_dir / "dose.csv", index_col=0)
    np.testing.assert_array_equal(
        frame.index.values, np.flatnonzero(patient.possible_dose_mask)
    )


# ------------------------------------------------------------- predictions


def test_prediction_round_trip_and_no_silent_overwrite(tmp_path):
  rng = np.random.default_rng(0)
  dose = np.where(
      rng.random((16, 16, 16)) < 0.3, rng.uniform(0, 80, (16, 16, 16)), 0.0
  )
  path = tmp_path / "preds" / "pt_7.csv"
  openkbp.write_prediction_csv(path, dose)
  assert path.read_text().startswith(",data\n")
  assert len(path.read_text().splitlines()) == 1 + np.count_nonzero(dose)
  np.testing.assert_array_equal(
      openkbp.read_prediction_csv(path, (16, 16, 16)), dose
  )
  # The official reading of the file gives the same dose.
  # (pandas < 3.1 reads exactly only with round_trip; 3.1 deprecates it.)
  exact = (
      {}
      if tuple(map(int, pd.__version__.split(".")[:2])) >= (3, 1)
      else {"float_precision": "round_trip"}
  )
  frame = pd.read_csv(path, index_col=0, **exact)
  official = np.zeros(16**3)
  np.put(official, frame.index.values, frame["data"].values)
  np.testing.assert_allclose(official.reshape(dose.shape), dose, rtol=1e-15)

  before = path.read_bytes()
  with pytest.raises(FileExistsError, match="overwrite=True"):
    openkbp.write_prediction_csv(path, dose * 2)
  assert path.read_bytes() == before
  openkbp.write_prediction_csv(path, dose * 2, overwrite=True)
  np.testing.assert_array_equal(
      openkbp.read_prediction_csv(path, (16, 16, 16)), dose * 2
  )
  with pytest.raises(ValueError, match="NaN"):
    openkbp.write_prediction_csv(tmp_path / "preds" / "pt_8.csv", dose * np.nan)
  with pytest.raises(ValueError, match="negative dose"):
    openkbp.write_prediction_csv(tmp_path / "preds" / "pt_9.csv", dose - 1.0)
  assert sorted(p.name for p in path.parent.iterdir()) == [
      "pt_7.csv"
  ]  # no temp files


def test_negative_prediction_is_an_error_naming_the_line(tmp_path):
  """A prediction CSV with a negative dose is refused (never clipped)."""
  path = tmp_path / "pt_1.csv"
  path.write_text(",data\n1,2.5\n5,-7.5\n9,-1.0\n")
  with pytest.raises(DataError) as info:
    openkbp.read_prediction_csv(path, (4, 4, 4))
  message = str(info.value)
  for word in (str(path), "line 3", "-7.5", "negative", "2 such line"):
    assert word in message


def test_submission_zip(tmp_path):
  preds = tmp_path / "preds"
  for i in (2, 10):
    openkbp.write_prediction_csv(
        preds / f"pt_{i}.csv", np.full((4, 4, 4), float(i))
    )
  zip_path = openkbp.write_submission_zip(preds, tmp_path / "submission.zip")
  with zipfile.ZipFile(zip_path) as archive:
    assert archive.namelist() == ["pt_2.csv", "pt_10.csv"]
    assert archive.read("pt_10.csv") == (preds / "pt_10.csv").read_bytes()
  with pytest.raises(FileExistsError):
    openkbp.write_submission_zip(preds, zip_path)
  openkbp.write_submission_zip(preds, zip_path, overwrite=True)
  with pytest.raises(DataError, match="no prediction files"):
    openkbp.write_submission_zip(tmp_path / "empty", tmp_path / "x.zip")


# ---------------------------------------------------------------- phantoms


def test_phantoms_are_seeded_and_plausible(tmp_path):
  a = phantoms.write_phantoms(tmp_path / "a", 3, grid=32, seed=5, first_id=7)
  b = phantoms.write_phantoms(tmp_path / "b", 3, grid=32, seed=5, first_id=7)
  c = phantoms.write_phantoms(tmp_path / "c", 1, grid=32, seed=6, first_id=7)
  assert [p.name for p in a] == ["pt_7", "pt_8", "pt_9"]
  strip = lambda snap: {k: v[1] for k, v in snap.items()}
  assert strip(snapshot(a[0])) == strip(snapshot(b[0]))
  assert (a[0] / "dose.csv").read_bytes() != (c[0] / "dose.csv").read_bytes()
  assert (a[0] / "grid_shape.csv").read_text().split() == ["32"] * 3
  for path in a:
    patient = openkbp.load_patient(path)
    mask = patient.possible_dose_mask
    assert patient.roi_present[openkbp.ROI_NAMES.index("PTV70")]
    np.testing.assert_array_equal(patient.dose > 0, mask)
    np.testing.assert_array_equal(
        patient.ct > 0, mask
    )  # body is soft tissue or bone
    assert np.all(patient.voxel_dimensions > 0)
    for name, gy in openkbp.PRESCRIPTIONS_GY.items():
      channel = openkbp.ROI_NAMES.index(name)
      if patient.roi_present[channel]:
        # A PTV is at least at its prescription, and PTV70 is exactly 70 Gy.
        in_ptv = patient.dose[patient.structure_masks[..., channel]]
        assert in_ptv.min() >= gy - 1e-9
        if name == "PTV70":
          np.testing.assert_allclose(in_ptv, 70.0)
    # Dose falls off away from the targets.
    in_targets = patient.structure_masks[..., 7:].any(-1)
    assert patient.dose[mask & ~in_targets].mean() < 0.7 * 70
  # Presence varies between patients (over a few more of them).
  many = [
      openkbp.load_patient(p).roi_present
      for p in phantoms.write_phantoms(tmp_path / "d", 12, grid=16, seed=0)
  ]
  assert len({tuple(r) for r in many}) > 1


def test_phantoms_never_overwrite_other_data(tmp_path):
  phantoms.write_phantoms(tmp_path, 2, grid=16)
  before = snapshot(tmp_path)
  phantoms.write_phantoms(tmp_path, 2, grid=16)  # the same phantoms: kept
  assert snapshot(tmp_path) == before
  with pytest.raises(FileExistsError):
    phantoms.write_phantoms(tmp_path, 2, grid=16, seed=1)
  (tmp_path / "pt_3").mkdir()
  (tmp_path / "pt_3" / "ct.csv").write_text("precious")
  with pytest.raises(FileExistsError):
    phantoms.write_phantoms(tmp_path, 3, grid=16)
  assert (tmp_path / "pt_3" / "ct.csv").read_text() == "precious"


def test_atomic_output_errors_name_the_requested_path(tmp_path, monkeypatch):
  # A failed write (here: the disk fills up) is reported under the path the
  # caller gave, not the hidden temporary file, and leaves nothing behind.
  import errno  # pylint: disable=g-import-not-at-top

  target = tmp_path / "out.csv"
  with pytest.raises(OSError) as info:
    with fileio.atomic_output(target) as f:
      f.write(b"partial")
      raise OSError(errno.ENOSPC, "No space left on device")
  assert info.value.errno == errno.ENOSPC
  assert info.value.filename == str(target)
  assert list(tmp_path.iterdir()) == []
