"""The patient cache: contents, reuse, rebuilds, corruption, compactness."""

import logging
import os
import pickle

import numpy as np
import pytest

from randose_jax import default_config
from randose_jax.data import cache as cache_lib
from randose_jax.data import encoding
from randose_jax.data import openkbp


@pytest.fixture
def data_config():
  return default_config.get_default_config().data


@pytest.fixture
def patient_dirs(phantom_split):
  return openkbp.list_patient_dirs(phantom_split)[:3]


def files_state(folder):
  return {
      p.name: (p.stat().st_mtime_ns, p.stat().st_size) for p in folder.iterdir()
  }


def assert_same_patient(a: openkbp.Patient, b: openkbp.Patient):
  assert a.patient_id == b.patient_id
  for name in (
      "ct",
      "dose",
      "structure_masks",
      "roi_present",
      "possible_dose_mask",
      "voxel_dimensions",
  ):
    x, y = getattr(a, name), getattr(b, name)
    assert x.dtype == y.dtype, name
    np.testing.assert_array_equal(x, y, err_msg=name)


def test_cache_holds_encoded_and_reference_data(
    patient_dirs, tmp_path, data_config
):
  cache = cache_lib.build_cache(patient_dirs, tmp_path / "cache", data_config)
  assert len(cache) == 3
  assert cache.patient_ids == [p.name for p in patient_dirs]
  for i, patient_dir in enumerate(patient_dirs):
    patient = openkbp.load_patient(patient_dir)
    assert_same_patient(cache.reference(i), patient)
    expected = encoding.encode_patient(patient, data_config)
    example = cache[i]
    assert set(example) == set(expected)
    for key in expected:
      assert example[key].dtype == np.float32
      np.testing.assert_array_equal(example[key], expected[key], err_msg=key)
  # Workers get it pickled: small, and equal after the round trip.
  clone = pickle.loads(pickle.dumps(cache))
  assert len(pickle.dumps(cache)) < 10_000
  np.testing.assert_array_equal(clone[1]["target"], cache[1]["target"])


def test_cache_encodes_at_the_training_grid(
    patient_dirs, tmp_path, data_config
):
  data_config.downsample = 2
  cache = cache_lib.build_cache(patient_dirs, tmp_path / "cache", data_config)
  assert cache[0]["oar"].shape == (8, 8, 8, 7)
  assert cache.reference(0).ct.shape == (16, 16, 16)


def test_reuse_and_rebuild_on_changes(
    patient_dirs, tmp_path, data_config, caplog
):
  folder = tmp_path / "cache"
  cache_lib.build_cache(patient_dirs, folder, data_config)
  before = files_state(folder)
  with caplog.at_level(logging.WARNING):
    cache_lib.build_cache(patient_dirs, folder, data_config)
  npz = lambda state: {k: v for k, v in state.items() if k.endswith(".npz")}
  assert npz(files_state(folder)) == npz(before)  # nothing rewritten
  assert not caplog.records

  # Another list of patients in the same folder reuses the files it shares.
  with caplog.at_level(logging.WARNING):
    other = cache_lib.build_cache(
        patient_dirs[1:] + patient_dirs[:1], folder, data_config
    )
  assert npz(files_state(folder)) == npz(before)
  assert not caplog.records
  assert other.patient_ids == [
      p.name for p in patient_dirs[1:] + patient_dirs[:1]
  ]
  assert len(list(folder.glob("manifest-*.json"))) == 2

  # Changed settings give new keys, hence new files.
  data_config.ct_scale = 500.0
  cache = cache_lib.build_cache(patient_dirs, folder, data_config)
  assert not set(e["file"] for e in cache.entries) & set(npz(before))
  assert cache[0]["ct"].min() == pytest.approx(-1024 / 500)

  # A changed source file rebuilds that patient only.
  state = files_state(folder)
  ct = patient_dirs[1] / "ct.csv"
  os.utime(ct, ns=(ct.stat().st_atime_ns, ct.stat().st_mtime_ns + 10**9))
  cache = cache_lib.build_cache(patient_dirs, folder, data_config)
  new = set(files_state(folder)) - set(state)
  assert new == {cache.entries[1]["file"]}


def test_switching_settings_back_reuses_every_file(
    patient_dirs, tmp_path, data_config, caplog
):
  """Each (patients, settings) keeps its own manifest: a build with other
  settings used to replace the first one's, whose files then read as
  'not listed in any manifest' and were rebuilt."""
  folder = tmp_path / "cache"
  first = cache_lib.build_cache(patient_dirs, folder, data_config)
  files = {p.name: p.stat().st_mtime_ns for p in folder.glob("*.npz")}
  scale = data_config.ct_scale
  data_config.ct_scale = scale / 2
  cache_lib.build_cache(patient_dirs, folder, data_config)
  data_config.ct_scale = scale
  with caplog.at_level(logging.WARNING):
    again = cache_lib.build_cache(patient_dirs, folder, data_config)
  assert not caplog.records, [r.getMessage() for r in caplog.records]
  assert again.entries == first.entries
  for name, mtime in files.items():
    assert (folder / name).stat().st_mtime_ns == mtime, name
  assert len(list(folder.glob("manifest-*.json"))) == 2


@pytest.mark.parametrize(
    "damage", ["truncate", "flip_byte", "delete", "manifest"]
)
def test_damaged_cache_is_rebuilt_with_a_warning(
    patient_dirs, tmp_path, data_config, caplog, damage
):
  folder = tmp_path / "cache"
  cache = cache_lib.build_cache(patient_dirs, folder, data_config)
  path = folder / cache.entries[1]["file"]
  data = path.read_bytes()
  if damage == "truncate":
    path.write_bytes(data[: len(data) // 2])
  elif damage == "flip_byte":
    middle = len(data) // 2
    path.write_bytes(
        data[:middle] + bytes([data[middle] ^ 0xFF]) + data[middle + 1 :]
    )
  elif damage == "delete":
    path.unlink()
  else:
    next(folder.glob("manifest-*.json")).write_text("{not json")
  with caplog.at_level(logging.WARNING):
    rebuilt = cache_lib.build_cache(patient_dirs, folder, data_config)
  assert any("rebuild" in r.getMessage() for r in caplog.records)
  assert path.read_bytes() == data
  assert_same_patient(
      rebuilt.reference(1), openkbp.load_patient(patient_dirs[1])
  )


def test_reading_a_damaged_file_raises(patient_dirs, tmp_path, data_config):
  cache = cache_lib.build_cache(patient_dirs, tmp_path / "cache", data_config)
  path = tmp_path / "cache" / cache.entries[0]["file"]
  path.write_bytes(path.read_bytes()[:100])
  with pytest.raises(openkbp.DataError, match=str(path)):
    cache[0]
  # A valid file of another patient in its place is caught too.
  path.write_bytes((tmp_path / "cache" / cache.entries[1]["file"]).read_bytes())
  with pytest.raises(openkbp.DataError, match="changed since it was written"):
    cache.reference(0)
  path.unlink()
  with pytest.raises(openkbp.DataError, match="cannot read"):
    cache[0]


def test_values_openkbp_does_not_have_are_stored_exactly(
    phantom_patient, tmp_path, data_config
):
  # Fractional HU and dose below a mGy go to the float fallbacks, losslessly.
  ct_path, dose_path = phantom_patient / "ct.csv", phantom_patient / "dose.csv"
  ct_lines = ct_path.read_text().splitlines()
  ct_lines[1] = ct_lines[1].split(",")[0] + ",1000.25"
  ct_path.write_text("\n".join(ct_lines) + "\n")
  dose_lines = dose_path.read_text().splitlines()
  dose_lines[1] = dose_lines[1].split(",")[0] + ",12.3456789"
  dose_path.write_text("\n".join(dose_lines) + "\n")
  cache = cache_lib.build_cache(
      [phantom_patient], tmp_path / "cache", data_config
  )
  assert_same_patient(cache.reference(0), openkbp.load_patient(phantom_patient))
  (phantom_patient / "dose.csv").unlink()
  cache = cache_lib.build_cache(
      [phantom_patient], tmp_path / "cache", data_config
  )
  assert cache.reference(0).dose is None
  assert not cache[0]["target"].any()


def test_no_patients(tmp_path, data_config):
  with pytest.raises(openkbp.DataError, match="no patient folders"):
    cache_lib.build_cache([], tmp_path / "cache", data_config)


def test_shared_patients_cache_is_compact(
    shared_openkbp, tmp_path, data_config
):
  dirs = openkbp.list_patient_dirs(
      shared_openkbp / "train-pats"
  ) + openkbp.list_patient_dirs(shared_openkbp / "validation-pats")
  cache = cache_lib.build_cache(dirs, tmp_path / "cache", data_config)
  total = sum(p.stat().st_size for p in (tmp_path / "cache").iterdir())
  assert total == pytest.approx(cache.num_bytes, rel=0.01)
  assert total < 25 * 2**20, f"{total / 2**20:.1f} MiB for 26 patients"
  assert_same_patient(cache.reference(7), openkbp.load_patient(dirs[7]))
