"""Geometry-consistent augmentation: `augment.transform` (planes in, a pack
out), on dense examples through `encoding.planes_of` and `encoding.unpack`,
and on the voxel planes of the training pipeline."""

import numpy as np
import pytest

from randose_jax import default_config
from randose_jax.data import augment
from randose_jax.data import encoding
from randose_jax.data import openkbp
from randose_jax.data import pipeline

AIR = -1.024


def config_with(swap_parotids=True):
  config = default_config.get_default_config().data
  config.swap_parotids = swap_parotids
  return config


def transform(
    example, *, k=0, mirror=False, flip_axis2=False, swap_parotids=True
):
  """`augment.transform` of a dense example: its arrays of `encoding.KEYS`
  transformed (float32, as the pipeline unpacks them), other keys as they
  were."""
  config = config_with(swap_parotids)
  pack = augment.transform(
      encoding.planes_of(example, config),
      config,
      k=k,
      mirror=mirror,
      flip_axis2=flip_axis2,
  )
  out = dict(example)
  out.update({key: x[0] for key, x in encoding.unpack(pack, config).items()})
  return out


def flip_lr(example, swap_parotids=True):
  return transform(example, mirror=True, swap_parotids=swap_parotids)


def flip_si(example):
  return transform(example, flip_axis2=True)


def rotate(example, k):
  return transform(example, k=k)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
  """An encoded 32^3 phantom: realistic masks, ct and dose."""
  from randose_jax.data import phantoms

  folder = tmp_path_factory.mktemp("aug")
  (path,) = phantoms.write_phantoms(folder, 1, grid=32, seed=3)
  return encoding.encode_patient(openkbp.load_patient(path), config_with())


def smooth_example(n=32):
  """Smooth ct/target fields and a disc-shaped mask set, centred."""
  c = (n - 1) / 2
  i, j, k = np.meshgrid(*[np.arange(n, dtype=np.float32)] * 3, indexing="ij")
  r2 = ((i - c) ** 2 + (j - c) ** 2) / (n / 4) ** 2
  blob = np.exp(-((i - c - 3) ** 2 + (j - c) ** 2 + (k - c) ** 2) / 40)
  oar = np.zeros((n, n, n, 7), np.float32)
  oar[..., 2] = (i - c - 4) ** 2 + (j - c + 5) ** 2 < 9  # "right parotid"
  return {
      "ct": (0.2 * np.cos(i / 5) * np.sin(j / 7) + 0.1 * k / n)[..., None],
      "target": blob[..., None],
      "ptv": (
          np.where(blob > 0.5, 1.0, np.where(blob > 0.2, 0.8, 0.0)).astype(
              np.float32
          )[..., None]
      ),
      "oar": oar,
      "mask": (r2 < 3).astype(np.float32)[..., None],
      "index": np.int32(7),
  }


def assert_examples_equal(a, b):
  assert set(a) == set(b)
  for key in a:
    np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_flips_twice_are_identity(example):
  once = flip_lr(example)
  assert not np.array_equal(once["ct"], example["ct"])
  assert_examples_equal(flip_lr(once), example)
  once = flip_si(example)
  assert not np.array_equal(once["ct"], example["ct"])
  assert_examples_equal(flip_si(once), example)


def test_flips_move_voxels_where_expected(example):
  lr = flip_lr(example, swap_parotids=False)
  np.testing.assert_array_equal(lr["ct"], example["ct"][:, ::-1])
  np.testing.assert_array_equal(lr["oar"], example["oar"][:, ::-1])
  si = flip_si(example)
  np.testing.assert_array_equal(si["target"], example["target"][:, :, ::-1])
  np.testing.assert_array_equal(si["oar"], example["oar"][:, :, ::-1])


def test_parotid_swap(example):
  x = smooth_example()
  lr = flip_lr(x)
  np.testing.assert_array_equal(lr["oar"][..., 3], x["oar"][:, ::-1, :, 2])
  assert not lr["oar"][..., 2].any()
  np.testing.assert_array_equal(
      lr["oar"][..., [0, 1, 4, 5, 6]], x["oar"][:, ::-1][..., [0, 1, 4, 5, 6]]
  )
  kept = flip_lr(x, swap_parotids=False)
  np.testing.assert_array_equal(kept["oar"][..., 2], x["oar"][:, ::-1, :, 2])
  # Folded into a rotation as well.
  rotated = transform(x, k=2, mirror=True)
  plain = transform(x, k=2, mirror=True, swap_parotids=False)
  np.testing.assert_array_equal(rotated["oar"][..., 3], plain["oar"][..., 2])


def test_rotation_by_zero_is_identity(example):
  assert_examples_equal(rotate(example, 0), example)
  assert_examples_equal(rotate(example, 9), example)


def interior(n, margin):
  c = (n - 1) / 2
  i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  return (i - c) ** 2 + (j - c) ** 2 < (n / 2 - margin) ** 2


def test_rotation_there_and_back_is_identity_in_the_interior():
  x = smooth_example()
  back = rotate(rotate(x, 1), 8)  # 40 + 320 degrees
  inside = interior(32, 3)
  for key in ("ct", "target"):
    error = np.abs(back[key] - x[key])[inside]
    assert error.max() < 0.05, key  # two bilinear resamplings of a smooth field
  for key in ("ptv", "oar", "mask"):
    agree = (back[key] == x[key]).all(-1)[inside].mean()
    assert agree > 0.97, (key, agree)
  # Not the identity on the way: 40 degrees moves things.
  assert np.abs(rotate(x, 1)["target"] - x["target"]).max() > 0.2


def test_rotation_turns_about_the_centre():
  n = 33  # odd: the centre is a voxel
  x = {"target": np.zeros((n, n, 4, 1), np.float32)}
  c = n // 2
  x["target"][c, c] = 1.0
  y = rotate(x, 1)["target"][..., 0, 0]
  assert y[c, c] == 1.0  # the centre stays
  x["target"][c, c] = 0.0
  x["target"][
      c + 9 : c + 12, c - 1 : c + 2
  ] = 1.0  # a 3x3 square 10 voxels away
  y = rotate(x, 1)["target"][..., 0, 0]
  i, j = np.indices(y.shape)
  ci, cj = (y * i).sum() / y.sum(), (y * j).sum() / y.sum()
  assert np.degrees(np.arctan2(abs(cj - c), ci - c)) == pytest.approx(40, abs=1)
  assert np.hypot(ci - c, cj - c) == pytest.approx(10, abs=0.3)
  assert y.sum() == pytest.approx(9, abs=0.2)  # bilinear keeps the mass
  # The same for every axis-2 slice.
  z = rotate(x, 1)["target"]
  assert all(np.array_equal(z[:, :, s], z[:, :, 0]) for s in range(4))


def test_masks_stay_masks(example):
  levels = set(np.unique(example["ptv"]))
  for k in range(9):
    out = transform(example, k=k, mirror=k % 2 == 1, flip_axis2=k > 4)
    assert set(np.unique(out["oar"])) <= {0.0, 1.0}
    assert set(np.unique(out["mask"])) <= {0.0, 1.0}
    assert set(np.unique(out["ptv"])) <= levels
    for key in encoding.KEYS:
      assert (
          out[key].dtype == np.float32 and out[key].shape == example[key].shape
      )
      assert out[key].flags.c_contiguous


def test_out_of_grid_fill():
  n = 16
  x = {
      "ct": np.full((n, n, 2, 1), 0.5, np.float32),
      "target": np.full((n, n, 2, 1), 0.5, np.float32),
      "mask": np.ones((n, n, 2, 1), np.float32),
  }
  y = rotate(x, 1)
  for corner in ((0, 0), (0, n - 1), (n - 1, 0), (n - 1, n - 1)):
    assert y["ct"][corner][0, 0] == pytest.approx(AIR)  # air, not 0
    assert y["target"][corner][0, 0] == 0.0
    assert y["mask"][corner][0, 0] == 0.0
  assert y["ct"][n // 2, n // 2, 0, 0] == pytest.approx(0.5)
  data_config = default_config.get_default_config().data
  assert encoding.air_value(data_config) == pytest.approx(AIR)
  data_config.ct_clip = (-500.0, 500.0)
  assert encoding.air_value(data_config) == pytest.approx(-0.5)


def test_inputs_are_not_modified(example):
  config = config_with()
  planes = encoding.planes_of(example, config)
  copies = [{k: np.array(v) for k, v in x.items()} for x in (example, planes)]
  augment.transform(planes, config, k=3, mirror=True, flip_axis2=True)
  for x, copy in zip((example, planes), copies):
    assert_examples_equal(x, copy)


def unpacked(pack):
  return {key: x[0] for key, x in encoding.unpack(pack, config_with()).items()}


def test_augment_planes_follows_the_config(example):
  data_config = config_with()
  planes = encoding.planes_of(example, data_config)
  augmented = lambda seed: unpacked(
      augment.augment_planes(planes, np.random.default_rng(seed), data_config)
  )
  assert_examples_equal(augmented(5), augmented(5))
  outcomes = {augmented(s)["ct"].tobytes() for s in range(12)}
  assert len(outcomes) > 6
  data_config.augment = False
  assert_examples_equal(augmented(5), example)
  data_config.augment = True
  data_config.flip_lr = data_config.flip_si = data_config.rotate = False
  assert_examples_equal(augmented(5), example)
  data_config.flip_si = True  # only SI flips: each output is one of two
  for seed in range(6):
    out = augmented(seed)
    assert np.array_equal(out["ct"], example["ct"]) or np.array_equal(
        out["ct"], example["ct"][:, :, ::-1]
    )


@pytest.fixture(scope="module")
def sparse_patient(tmp_path_factory):
  from randose_jax.data import phantoms

  folder = tmp_path_factory.mktemp("aug_planes")
  (path,) = phantoms.write_phantoms(folder, 1, grid=32, seed=5)
  return openkbp.load_sparse_patient(path)


@pytest.mark.parametrize("k", [0, 1, 4, 8])
def test_voxel_planes_and_dense_planes_agree(sparse_patient, k):
  """The pipeline's planes at downsample 1 (mask channels as bits) and the
  planes of the dense example give, bit for bit, the same batches (two
  examples through `PackedBatch` and `unpack`)."""
  data_config = config_with()
  data_config.ptv_values = (0.9, 0.8, 1.0)  # not increasing: the max still wins
  voxel_planes = encoding.encode_planes(sparse_patient, data_config)
  dense_planes = encoding.planes_of(
      encoding.encode_patient(sparse_patient, data_config), data_config
  )
  assert "codes" in voxel_planes and "codes" not in dense_planes
  for mirror in (False, True):
    for flip_axis2 in (False, True):
      for swap in (False, True):
        data_config.swap_parotids = swap
        options = dict(k=k, mirror=mirror, flip_axis2=flip_axis2)
        batches = []
        for planes in (voxel_planes, dense_planes):
          packs = [
              augment.transform(planes, data_config, **options),
              augment.transform(planes, data_config, k=(k + 1) % 9),
          ]
          batches.append(
              encoding.unpack(pipeline.PackedBatch()(packs), data_config)
          )
        for key in encoding.KEYS:
          assert batches[0][key].dtype == np.float32
          np.testing.assert_array_equal(
              batches[0][key],
              batches[1][key],
              err_msg=f"{key} {options} swap={swap}",
          )
  # A pack holds only the rows that are not background: much smaller.
  pack = augment.transform(voxel_planes, data_config, k=3)
  packed_bytes = sum(v.nbytes for v in pack.values())
  dense_bytes = sum(v.nbytes for v in unpacked(pack).values())
  assert packed_bytes < 0.5 * dense_bytes


def test_planes_find_the_rows_that_hold_something(sparse_patient):
  data_config = config_with()
  planes = encoding.encode_planes(sparse_patient, data_config)
  example = encoding.encode_patient(sparse_patient, data_config)
  d, h, _ = planes["grid"]
  rows = lambda x: x.reshape(d * h, -1)
  holds = lambda x, background: (rows(x) != background).any(1)
  np.testing.assert_array_equal(planes["ct_active"], holds(example["ct"], AIR))
  np.testing.assert_array_equal(
      planes["target_active"], holds(example["target"], 0)
  )
  masks = np.concatenate([example["oar"], example["mask"], example["ptv"]], -1)
  np.testing.assert_array_equal(planes["codes_active"], holds(masks, 0))
  # Only those rows are stored (plus one background row).
  for key, background in (("ct", AIR), ("target", 0)):
    active = planes[key + "_active"]
    assert planes[key].shape == (active.sum() + 1, 32, 1)
    stored = planes[key][planes[key + "_map"][active]]
    np.testing.assert_array_equal(stored[..., 0], rows(example[key])[active])
    assert np.all(planes[key][-1] == np.float32(background))
