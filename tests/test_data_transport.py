"""The transport archive (randose_jax/data/transport.py): lossless CT and
voxel sets, the dose within its stated bound, the cache it unpacks into,
and clear errors for a damaged, truncated or foreign file."""

from pathlib import Path

from absl import flags
import numpy as np
import pytest

from randose_jax import default_config
from randose_jax.data import cache as cache_lib
from randose_jax.data import openkbp
from randose_jax.data import phantoms
from randose_jax.data import transport
from tests import helpers
from randose_jax.cli import transport as command


@pytest.fixture(scope="module")
def small_root(shared_openkbp, tmp_path_factory) -> Path:
  """A data folder holding two shared patients (one per split), linked."""
  root = tmp_path_factory.mktemp("small_openkbp")
  for split in transport.DEFAULT_SPLITS:
    (root / split).mkdir()
    first = openkbp.list_patient_dirs(shared_openkbp / split)[0]
    (root / split / first.name).symlink_to(
        first.resolve(), target_is_directory=True
    )
  return root


@pytest.fixture(scope="module")
def archive(small_root, tmp_path_factory) -> Path:
  path = tmp_path_factory.mktemp("archive") / "small.rdt"
  transport.pack(small_root, path)
  return path


def test_round_trip_equals_the_csvs(small_root, archive):
  opened = transport.open_archive(archive)
  assert list(opened.splits) == list(transport.DEFAULT_SPLITS)
  bound = transport.max_dose_error_gy(transport.DEFAULT_DOSE_DECIMALS)
  assert bound == 0.005
  for entry in opened.entries():
    original = openkbp.load_sparse_patient(
        small_root / entry["split"] / entry["patient_id"]
    )
    restored = opened.read(entry)
    worst = transport.compare(original, restored, bound)  # CT, sets exact
    assert 0 < worst <= bound + 1e-9  # OpenKBP's mGy are rounded to 0.01 Gy
    assert entry["dose"]["max_error_gy"] == pytest.approx(worst)
    np.testing.assert_array_equal(original.ct_value, restored.ct_value)
  # Smaller than the cache of the same patients by about half.
  cache_bytes = sum(len(cache_lib.patient_bytes(p)) for _, p in opened)
  assert archive.stat().st_size < 0.7 * cache_bytes


def test_three_decimals_store_openkbp_dose_exactly(small_root, tmp_path):
  patient = openkbp.load_sparse_patient(
      openkbp.list_patient_dirs(small_root / "train-pats")[0]
  )
  entry, block = transport.encode_patient(patient, dose_decimals=3)
  restored = transport.decode_patient(entry, block, 3, "x")
  assert entry["dose"]["exact"]
  assert transport.compare(patient, restored, 0.0) == 0.0


def test_unpack_gives_the_cache_of_the_csvs(small_root, archive, tmp_path):
  config = default_config.get_default_config()
  caches = transport.unpack_to_cache(archive, tmp_path / "cache", config.data)
  for split, cache in caches.items():
    reopened = cache_lib.open_cache(tmp_path / "cache" / split, config.data)
    built = cache_lib.build_cache(
        openkbp.list_patient_dirs(small_root / split),
        tmp_path / "built" / split,
        config.data,
    )
    assert reopened.patient_ids == built.patient_ids == cache.patient_ids
    for i in range(len(built)):
      a, b = reopened[i], built[i]
      for key in ("ptv", "ct", "oar", "mask"):
        np.testing.assert_array_equal(a[key], b[key])
      np.testing.assert_allclose(
          a["target"],
          b["target"],
          rtol=0,
          atol=0.005 / config.data.dose_scale + 1e-7,
      )


def test_residual_coding_round_trips_edge_values():
  rng = np.random.default_rng(0)
  values = np.array(
      [
          0,
          1,
          -1,
          15,
          -8,
          16,
          -17,
          255,
          2**15 - 1,
          -(2**15),
          2**40 + 3,
          -(2**40) - 5,
          2**61,
          -(2**61),
      ],
      np.int64,
  )
  tokens, counts, extra = transport._tokens(values)
  bits = transport._pack_bits(extra, counts)
  np.testing.assert_array_equal(
      transport._from_tokens(tokens, bits, "x"), values
  )
  shape = (5, 6, 7)
  index = np.flatnonzero(rng.random(np.prod(shape)) < 0.6)
  v = rng.integers(-1000, 1000, index.size)
  for axis in range(3):
    r = transport._run_diff(v, index, shape, axis, start=7)
    np.testing.assert_array_equal(
        transport._run_cumsum(r, index, shape, axis, start=7), v
    )


def test_other_grids_float_ct_and_no_dose_are_exact(phantom_split):
  patient = openkbp.load_sparse_patient(phantom_split / "pt_1")
  patient.ct_value = patient.ct_value + np.float32(0.25)  # not integers
  patient.dose_index = patient.dose_value = None  # a patient to predict
  entry, block = transport.encode_patient(patient)
  assert not entry["ct_integer"] and entry["dose"] is None
  restored = transport.decode_patient(entry, block, 2, "x")
  assert transport.compare(patient, restored, 0.0) == 0.0


def _damaged(
    archive: Path,
    tmp_path: Path,
    offset: int | None = None,
    size: int | None = None,
) -> Path:
  data = bytearray(archive.read_bytes())
  if offset is not None:
    data[offset] ^= 0x40
  path = tmp_path / "damaged.rdt"
  path.write_bytes(bytes(data[:size]))
  return path


def test_a_damaged_byte_names_the_archive_and_the_patient(archive, tmp_path):
  opened = transport.open_archive(archive)
  entry = opened.entries()[-1]
  path = _damaged(
      archive,
      tmp_path,
      opened.data_start + entry["offset"] + entry["size"] // 2,
  )
  damaged = transport.open_archive(path)  # the header is intact
  damaged.read(damaged.entries()[0])  # and so is the first patient
  with pytest.raises(
      openkbp.DataError,
      match=rf"{path}: patient validation-pats/"
      rf"{entry['patient_id']}: CRC-32 mismatch",
  ):
    damaged.read(damaged.entries()[-1])
  with pytest.raises(
      openkbp.DataError, match=rf"{path}: header CRC-32 mismatch"
  ):
    transport.open_archive(
        _damaged(archive, tmp_path, len(transport.MAGIC) + 20)
    )


def test_truncated_or_foreign_files_are_refused(archive, tmp_path):
  size = archive.stat().st_size
  with pytest.raises(
      openkbp.DataError,
      match=rf"{size - 100} bytes, the header says " rf"{size} \(truncated",
  ):
    transport.open_archive(_damaged(archive, tmp_path, size=size - 100))
  with pytest.raises(openkbp.DataError, match="truncated inside the header"):
    transport.open_archive(
        _damaged(archive, tmp_path, size=len(transport.MAGIC) + 50)
    )
  foreign = tmp_path / "foreign.rdt"
  foreign.write_bytes(b",data\n1,2\n")
  with pytest.raises(
      openkbp.DataError, match="not a randose_jax transport archive"
  ):
    transport.open_archive(foreign)


def _cli(argv) -> int:
  flag_values = flags.FlagValues()
  command.define_flags(flag_values)
  saved, command.FLAGS = command.FLAGS, flag_values
  try:
    return helpers.invoke(command.main, ["transport", *argv], flag_values)
  finally:
    command.FLAGS = saved


def test_command_line_check_and_errors(small_root, archive, tmp_path, capsys):
  assert _cli(["check", f"--archive={archive}", f"--root={small_root}"]) == 0
  assert "2 patients equal to the CSVs" in capsys.readouterr().out
  assert (
      _cli(
          [
              "unpack",
              f"--archive={archive}",
              f"--cache_dir={tmp_path / 'ok'}",
              "--workers=2",
          ]
      )
      == 0
  )  # in worker processes
  # Progress on stderr (not a terminal here): one line per patient unpacked.
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 2, err
  assert err[0].startswith("unpack train-pats: 1/1 pt_"), err
  assert err[1].startswith("unpack validation-pats: 1/1 pt_"), err
  config = default_config.get_default_config()
  assert (
      len(
          cache_lib.open_cache(tmp_path / "ok" / "validation-pats", config.data)
      )
      == 1
  )
  damaged = _damaged(archive, tmp_path, size=archive.stat().st_size - 1)
  assert (
      _cli(["unpack", f"--archive={damaged}", f"--cache_dir={tmp_path / 'c'}"])
      == 2
  )
  err = capsys.readouterr().err.strip().splitlines()
  assert (
      len(err) == 1
      and err[0].startswith(f"error: {damaged}: ")
      and "truncated" in err[0]
  )
  assert not (tmp_path / "c").exists()
  assert _cli(["pack", f"--root={small_root}", f"--archive={archive}"]) == 2
  assert "already exists" in capsys.readouterr().err


def test_pack_root_at_a_split_folder_says_where_to_point(tmp_path):
  """pack --root given train-pats/ itself: the error names it and the
  folder to give (the one holding the splits); nothing is written."""
  phantoms.write_phantoms(tmp_path / "root" / "train-pats", 1, grid=16)
  phantoms.write_phantoms(
      tmp_path / "root" / "validation-pats", 1, grid=16, first_id=2
  )
  with pytest.raises(openkbp.DataError) as info:
    transport.pack(tmp_path / "root" / "train-pats", tmp_path / "a.rdt")
  assert str(info.value).startswith(
      f"{tmp_path / 'root' / 'train-pats'}: --root is a split folder itself"
  )
  assert str(info.value).endswith(f", here {tmp_path / 'root'}")
  assert not (tmp_path / "a.rdt").exists()
