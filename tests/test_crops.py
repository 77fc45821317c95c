"""Crop training and windowed prediction (`config.data.crop_shape`), and the
PTV distance channels (`config.data.geometry`, `data/distances.py`).

A crop is the transformed example's dense arrays sliced, whatever the
augmentation; random crops hold the possible-dose mask's box (or lie in
it); the distances equal a brute-force search; windowed prediction puts
every window's output back where it came from."""

import itertools

import numpy as np
import pytest

from randose_jax import default_config
from randose_jax.inference import predictor as predictor_lib
from randose_jax.data import augment
from randose_jax.data import cache as cache_lib
from randose_jax.data import distances
from randose_jax.data import encoding
from randose_jax.data import openkbp
from randose_jax.data import phantoms
from tests import stand_ins


def data_config(**fields):
  config = default_config.get_default_config().data
  config.update(fields)
  return config


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
  """A 32^3 phantom's voxel lists, spacing made anisotropic in-plane to
  slice (the distances must use mm, not voxels)."""
  folder = tmp_path_factory.mktemp("crops")
  (path,) = phantoms.write_phantoms(folder, 1, grid=32, seed=5)
  sparse = openkbp.load_sparse_patient(path)
  sparse.voxel_dimensions[:] = (3.0, 3.0, 2.0)
  return sparse


def dense_of(pack, config):
  return {k: x[0] for k, x in encoding.unpack(pack, config).items()}


@pytest.mark.parametrize("downsample", [1, 2])
def test_crop_is_the_transformed_example_sliced(patient, downsample):
  config = data_config(downsample=downsample, geometry=True)
  planes = encoding.encode_planes(patient, config)
  n = 32 // downsample
  shape = (n // 2, n // 2 + 2, n // 4)
  rng = np.random.default_rng(0)
  for k, mirror, flip in [(0, False, False), (3, True, False), (7, True, True)]:
    whole = dense_of(
        augment.transform(planes, config, k=k, mirror=mirror, flip_axis2=flip),
        config,
    )
    start = tuple(int(rng.integers(0, n - c + 1)) for c in shape)
    cropped = dense_of(
        augment.transform(
            planes,
            config,
            k=k,
            mirror=mirror,
            flip_axis2=flip,
            crop=(start, shape),
        ),
        config,
    )
    where = tuple(slice(s, s + c) for s, c in zip(start, shape))
    assert set(cropped) == set(whole) and "geom" in cropped
    for key, x in whole.items():
      np.testing.assert_array_equal(cropped[key], x[where], err_msg=key)


def test_crop_outside_the_grid_is_refused(patient):
  config = data_config()
  planes = encoding.encode_planes(patient, config)
  with pytest.raises(ValueError, match="does not fit"):
    augment.transform(planes, config, crop=((20, 0, 0), (16, 16, 16)))


def test_mask_box_is_the_transformed_masks_box(patient):
  config = data_config()
  planes = encoding.encode_planes(patient, config)
  for k, mirror, flip in [
      (0, False, False),
      (2, False, True),
      (5, True, False),
  ]:
    mask = dense_of(
        augment.transform(planes, config, k=k, mirror=mirror, flip_axis2=flip),
        config,
    )["mask"][..., 0]
    where = np.argwhere(mask > 0)
    lo, hi = augment.mask_box(planes, k, mirror, flip)
    np.testing.assert_array_equal(lo, where.min(0))
    np.testing.assert_array_equal(hi, where.max(0))


def test_draw_crop_holds_or_lies_in_the_box():
  rng = np.random.default_rng(1)
  grid = (128, 128, 128)
  box = (np.array([40, 10, 30]), np.array([99, 100, 50]))  # 60 x 91 x 21
  shape = (64, 64, 32)
  starts = set()
  for _ in range(300):
    start, got = augment.draw_crop(rng, box, grid, shape)
    assert got == shape
    assert all(0 <= s <= n - c for s, n, c in zip(start, grid, shape))
    # Axes 0 and 2: the crop is longer than the box and holds all of it.
    for a in (0, 2):
      assert start[a] <= box[0][a] and start[a] + shape[a] - 1 >= box[1][a]
    # Axis 1: shorter, inside the box.
    assert box[0][1] <= start[1] and start[1] + shape[1] - 1 <= box[1][1]
    starts.add(start)
  assert len(starts) > 50  # random, not one fixed crop
  # A box at the grid's edge: the crop stays inside the grid.
  edge = (np.array([0, 0, 120]), np.array([10, 10, 127]))
  start, _ = augment.draw_crop(rng, edge, grid, shape)
  assert start[0] == 0 and start[2] == 128 - 32
  assert augment.draw_crop(rng, None, grid, shape)[0] == (32, 32, 48)


def test_augment_planes_crops_around_the_mask(patient):
  config = data_config(crop_shape=(16, 16, 16))
  planes = encoding.encode_planes(patient, config)
  rng = np.random.default_rng(2)
  for _ in range(5):
    out = dense_of(augment.augment_planes(planes, rng, config), config)
    assert all(x.shape[:3] == (16, 16, 16) for x in out.values())
    assert out["mask"].sum() > 0


def brute_force_distance(mask, spacing):
  """Signed distance (mm) of each voxel centre, by nearest-neighbour search
  over the voxel centres (a k-d tree, not a distance transform): outside,
  to the nearest voxel of the mask; inside, minus the distance to the
  nearest voxel outside it."""
  from scipy import spatial  # pylint: disable=g-import-not-at-top

  points = np.argwhere(np.ones(mask.shape, bool)) * np.asarray(spacing)
  inside = mask.reshape(-1)
  out = spatial.cKDTree(points[inside]).query(points)[0]
  out[inside] = -spatial.cKDTree(points[~inside]).query(points[inside])[0]
  return out.reshape(mask.shape)


def test_distances_equal_brute_force(patient):
  scale = 40.0
  got = distances.dense(patient, scale)
  grid = patient.grid_shape
  lo, box = distances.ptv_distances(patient, scale)
  inside_box = np.zeros(grid, bool)
  inside_box[tuple(slice(o, o + n) for o, n in zip(lo, box.shape[:3]))] = True
  for c, index in enumerate(patient.roi_index[-3:]):
    if not index.size:
      np.testing.assert_array_equal(got[..., c], distances.FAR)
      continue
    mask = np.zeros(int(np.prod(grid)), bool)
    mask[index] = True
    want = np.clip(
        brute_force_distance(mask.reshape(grid), patient.voxel_dimensions)
        / scale,
        *distances.GEOMETRY_CLIP,
    )
    # float16 storage: 2^-11 relative.
    np.testing.assert_allclose(
        got[..., c][inside_box], want[inside_box], atol=2e-3, rtol=1e-3
    )
    assert (got[..., c][~inside_box] == distances.FAR).all()
  assert sum(i.size > 0 for i in patient.roi_index[-3:]) >= 2


def test_slab_distances(patient):
  """Superior/inferior distance to each PTV's slab of axial slices, by a
  plain loop over the slices."""
  scale = 40.0
  got = distances.dense(patient, scale, slab=True)
  assert got.shape[-1] == 6
  np.testing.assert_array_equal(got[..., :3], distances.dense(patient, scale))
  lo, box = distances.ptv_distances(patient, scale, slab=True)
  spacing = patient.voxel_dimensions[2]
  for c, index in enumerate(patient.roi_index[-3:]):
    if not index.size:
      continue
    slices = set(np.unravel_index(index, patient.grid_shape)[2].tolist())
    for k in range(lo[2], lo[2] + box.shape[2]):
      want = min(abs(k - z) for z in slices) * spacing / scale
      want = min(want, distances.FAR)
      inside = got[
          lo[0] : lo[0] + box.shape[0], lo[1] : lo[1] + box.shape[1], k, 3 + c
      ]
      np.testing.assert_allclose(inside, want, atol=2e-3, rtol=1e-3)
      assert (want == 0) == (k in slices)


def test_geometry_channels_in_the_dense_and_packed_forms(patient):
  config = data_config(geometry=True, geometry_scale_mm=40.0)
  example = encoding.encode_patient(patient, config)
  np.testing.assert_array_equal(example["geom"], distances.dense(patient, 40.0))
  assert encoding.input_channels(config)["geom"] == 3
  assert "geom" not in encoding.encode_patient(patient, data_config())
  assert "geom" not in encoding.input_channels(data_config())
  # The cache keys change only when the option is on.
  off = cache_lib.encoding_settings(data_config())
  assert "geometry" not in off
  assert cache_lib.encoding_settings(config)["geometry_scale_mm"] == 40.0


def test_window_starts_cover_the_span():
  for lo, hi, size, n, overlap in itertools.product(
      [0, 5, 40], [50, 90, 127], [16, 32, 64], [128], [0.0, 0.25, 0.5]
  ):
    starts = predictor_lib.window_starts(lo, hi, size, n, overlap)
    covered = np.zeros(n, bool)
    for s in starts:
      assert 0 <= s <= n - size
      covered[s : s + size] = True
    assert covered[lo : hi + 1].all(), (lo, hi, size, starts)
    if hi - lo + 1 > size and len(starts) > 1:
      gaps = np.diff(starts)
      assert gaps.max() <= size - int(overlap * size) + 1
  assert predictor_lib.window_starts(50, 60, 32, 128, 0.5) == [39]


def PointwiseModel(config):  # pylint: disable=invalid-name
  """A Predictor whose 'network' is a pointwise function of its inputs, so
  any tiling must reproduce the whole-grid prediction inside the windows."""
  return stand_ins.FunctionPredictor(
      config,
      lambda e: (0.9 * e["ptv"] + 0.3 * e["geom"][..., 2:] - 0.1 * e["ct"])[
          ..., 0
      ],
  )


def test_windowed_prediction_puts_windows_back(patient):
  whole = PointwiseModel(data_config(geometry=True))
  windowed = PointwiseModel(
      data_config(geometry=True, crop_shape=(16, 8, 16), window_overlap=0.5)
  )
  example = encoding.encode_patient(patient, whole.data_config)
  (want,) = whole.predict_examples([example])
  (got,) = windowed.predict_examples([example])
  assert want.shape == got.shape == (32, 32, 32)
  assert len(windowed.calls[0]) > 1  # several windows
  assert all(s == (16, 8, 16, 1) for s in windowed.calls[0])
  mask = example["mask"][..., 0] > 0
  where = np.argwhere(mask)
  box = tuple(slice(a, b + 1) for a, b in zip(where.min(0), where.max(0)))
  np.testing.assert_allclose(got[box], want[box], rtol=1e-5, atol=1e-6)
  # Doses: the same through decode (zero outside the mask).
  (dose_w,) = windowed.predict_doses([patient])
  (dose,) = whole.predict_doses([patient])
  np.testing.assert_allclose(dose_w, dose, rtol=1e-5, atol=1e-5)


def test_window_larger_than_the_grid_is_refused(patient):
  model = PointwiseModel(data_config(geometry=True, crop_shape=(64, 16, 16)))
  example = encoding.encode_patient(patient, model.data_config)
  with pytest.raises(ValueError, match="crop_shape"):
    model.predict_examples([example])


def test_model_takes_the_distance_channels_into_the_ptv_stem():
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from randose_jax import models  # pylint: disable=g-import-not-at-top
  from randose_jax.training import train  # pylint: disable=g-import-not-at-top

  config = default_config.get_default_config()
  config.model.widths = (4, 4)
  config.model.msfe_kernels = (3,)
  config.model.pi_kernels = (3,)
  model = models.create_model(config.model)
  channels = encoding.input_channels(data_config(geometry=True))
  inputs = train.dummy_inputs(config.model, grid=(4, 4, 4), channels=channels)
  params = jax.jit(model.init)(jax.random.key(0), inputs)["params"]
  kernels = {
      path: leaf.shape
      for path, leaf in jax.tree_util.tree_leaves_with_path(params["stem_ptv"])
  }
  assert [s[-2] for s in kernels.values() if len(s) == 5] == [4]
  # The geom channels reach the output: changing them changes it.
  out = model.apply({"params": params}, inputs)
  inputs["geom"] = inputs["geom"] + 1.0
  params = jax.tree.map(lambda x: x + 0.1, params)
  out2 = model.apply({"params": params}, inputs)
  inputs["geom"] = inputs["geom"] - 1.0
  out3 = model.apply({"params": params}, inputs)
  assert not jnp.allclose(out2, out3)
  del out
  inputs["geom"] = jnp.zeros((1, 4, 4, 2, 3))
  with pytest.raises(ValueError, match="geom"):
    model.apply({"params": params}, inputs)


@pytest.mark.parametrize(
    "shape", [(64, 64), (40, 64, 64), (64, 64, 256), (64.0, 64, 64)]
)
def test_bad_crop_shape_is_a_config_error(shape):
  from randose_jax import config_check  # pylint: disable=g-import-not-at-top

  config = default_config.get_default_config()
  config.data.crop_shape = shape
  with pytest.raises(default_config.ConfigError, match="crop_shape"):
    config_check.check_config(config)
  config.data.crop_shape = (64, 32, 96)
  config_check.check_config(config)


def test_slab_channels_through_the_packed_form(patient):
  config = data_config(geometry=True, geometry_slab=True)
  example = encoding.encode_patient(patient, config)
  assert example["geom"].shape[-1] == encoding.input_channels(config)["geom"]
  assert example["geom"].shape[-1] == 6
  pack = augment.transform(encoding.encode_planes(patient, config), config)
  np.testing.assert_array_equal(dense_of(pack, config)["geom"], example["geom"])
  assert cache_lib.encoding_settings(config)["geometry_slab"] is True


def test_centre_placement_reaches_the_box_ends():
  rng = np.random.default_rng(3)
  grid, shape = (128, 128, 128), (64, 64, 64)
  box = (np.array([40, 40, 40]), np.array([119, 119, 119]))  # 80 > 64
  centres = []
  for _ in range(400):
    start, _ = augment.draw_crop(rng, box, grid, shape, "centre")
    assert all(0 <= s <= n - c for s, n, c in zip(start, grid, shape))
    centres.append(start[2] + 32)
  # Centres uniform over the box (cut by the grid's edge at the top, where
  # a crop ends at 127): the box's first slice is the centre of some.
  assert min(centres) == 40 and max(centres) == 96
  inside = [augment.draw_crop(rng, box, grid, shape)[0][2] for _ in range(400)]
  assert min(inside) >= 40 and max(inside) <= 119 - 63
  with pytest.raises(ValueError, match="crop_placement"):
    augment.draw_crop(rng, box, grid, shape, "middle")
