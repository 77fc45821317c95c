"""grain training datasets: batches, determinism, checkpointable state."""

import numpy as np
import pytest

from randose_jax import default_config
from randose_jax.data import cache as cache_lib
from randose_jax.data import openkbp
from randose_jax.data import pipeline


@pytest.fixture(scope="module")
def cache(phantom_split, tmp_path_factory):
  return cache_lib.build_cache(
      openkbp.list_patient_dirs(phantom_split),
      tmp_path_factory.mktemp("cache"),
      default_config.get_default_config().data,
  )


@pytest.fixture
def config():
  config = default_config.get_default_config()
  config.data.num_workers = 0
  config.batch_size = 2
  return config


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert set(x) == set(y)
    for key in x:
      np.testing.assert_array_equal(x[key], y[key], err_msg=key)


def test_train_batches(cache, config):
  batch = next(iter(pipeline.train_dataset(cache, config, seed=0)))
  assert set(batch) == {"ptv", "ct", "oar", "target", "mask"}
  for key, channels in (
      ("ptv", 1),
      ("ct", 1),
      ("oar", 7),
      ("target", 1),
      ("mask", 1),
  ):
    assert batch[key].shape == (2, 16, 16, 16, channels), key
    assert batch[key].dtype == np.float32
  config.batch_size = 4
  batch = next(
      iter(
          pipeline.train_dataset(
              cache, config, seed=0, process_index=1, process_count=2
          )
      )
  )
  assert batch["ct"].shape[0] == 2
  with pytest.raises(ValueError, match="divisible"):
    pipeline.train_dataset(cache, config, seed=0, process_count=3)


def test_same_seed_same_batches(cache, config):
  a = take(iter(pipeline.train_dataset(cache, config, seed=3)), 5)
  b = take(iter(pipeline.train_dataset(cache, config, seed=3)), 5)
  c = take(iter(pipeline.train_dataset(cache, config, seed=4)), 5)
  assert_batches_equal(a, b)
  assert any(not np.array_equal(x["ct"], y["ct"]) for x, y in zip(a, c))


@pytest.mark.parametrize("downsample", [1, 2])
def test_every_patient_each_epoch_unaugmented(
    phantom_split, tmp_path, config, downsample
):
  config.data.augment = False
  config.data.downsample = downsample
  config.batch_size = 1
  cache = cache_lib.build_cache(
      openkbp.list_patient_dirs(phantom_split), tmp_path, config.data
  )
  it = iter(pipeline.train_dataset(cache, config, seed=0))
  examples = [cache[i] for i in range(len(cache))]
  for _ in range(2):  # two epochs, each a permutation of the patients
    seen = []
    for batch in take(it, len(cache)):
      matches = [
          i
          for i, e in enumerate(examples)
          if np.array_equal(e["target"], batch["target"][0])
          and np.array_equal(e["ct"], batch["ct"][0])
      ]
      assert len(matches) == 1
      for key, x in examples[matches[0]].items():  # the encoding, unchanged
        np.testing.assert_array_equal(batch[key][0], x, err_msg=key)
      seen.append(matches[0])
    assert sorted(seen) == list(range(len(cache)))


def test_iterator_state_restores_the_stream(cache, config):
  it = iter(pipeline.train_dataset(cache, config, seed=1))
  take(it, 3)
  state = it.get_state()
  expected = take(it, 2)
  fresh = iter(pipeline.train_dataset(cache, config, seed=1))
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 2), expected)


def test_processes_split_the_stream(cache, config):
  config.batch_size = 2
  config.data.augment = False
  shares = [
      take(
          iter(
              pipeline.train_dataset(
                  cache, config, seed=0, process_index=p, process_count=2
              )
          ),
          4,
      )
      for p in range(2)
  ]
  whole = take(
      iter(pipeline.train_dataset(cache, config, seed=0, process_count=1)), 4
  )
  # Process p holds elements p, p + 2, ... of the global stream.
  global_stream = [b["target"][i] for b in whole for i in range(2)]
  for p, batches in enumerate(shares):
    mine = [b["target"][0] for b in batches]
    for got, want in zip(mine, global_stream[p::2]):
      np.testing.assert_array_equal(got, want)


def test_worker_processes(cache, config):
  in_process = take(iter(pipeline.train_dataset(cache, config, seed=2)), 4)
  config.data.num_workers = 2
  streams = []
  for _ in range(2):
    it = iter(pipeline.train_dataset(cache, config, seed=2))
    try:
      streams.append(
          [{k: np.array(v) for k, v in b.items()} for b in take(it, 4)]
      )
    finally:
      it.close()
  assert_batches_equal(streams[0], streams[1])  # deterministic with workers too
  # Each worker batches its own share of the same example stream, so the
  # examples are those of the in-process run, grouped differently.
  examples = lambda batches: sorted(
      b[k][i].tobytes()
      for b in batches
      for i in range(2)
      for k in ("ct", "target", "oar")
  )
  assert examples(streams[0]) == examples(in_process)


def test_downsampled_training_batches(phantom_split, tmp_path, config):
  """downsample > 1 takes the encoded-dict path: float32 batches all the same."""
  config.data.downsample = 2
  cache = cache_lib.build_cache(
      openkbp.list_patient_dirs(phantom_split), tmp_path, config.data
  )
  batches = take(iter(pipeline.train_dataset(cache, config, seed=0)), 2)
  for key, channels in (
      ("ptv", 1),
      ("ct", 1),
      ("oar", 7),
      ("target", 1),
      ("mask", 1),
  ):
    assert batches[0][key].shape == (2, 8, 8, 8, channels), key
    assert batches[0][key].dtype == np.float32
  assert_batches_equal(
      batches, take(iter(pipeline.train_dataset(cache, config, seed=0)), 2)
  )


@pytest.fixture
def progressive(phantom_split, tmp_path, config):
  """(config with a 3-batch coarse phase at 8^3, fine cache, coarse cache)."""
  config.data.coarse_steps = 3
  config.data.coarse_downsample = 2
  dirs = openkbp.list_patient_dirs(phantom_split)
  fine = cache_lib.build_cache(dirs, tmp_path / "fine", config.data)
  coarse = cache_lib.build_cache(
      dirs, tmp_path / "coarse", pipeline.coarse_config(config).data
  )
  return config, fine, coarse


def test_coarse_phase_then_the_training_grid(progressive):
  config, fine, coarse = progressive
  assert pipeline.coarse_config(config).data.downsample == 2
  assert config.data.downsample == 1  # the caller's config is untouched
  batches = take(
      iter(
          pipeline.training_batches(fine, config, seed=0, coarse_cache=coarse)
      ),
      5,
  )
  assert [b["ct"].shape[1:4] for b in batches] == [(8, 8, 8)] * 3 + [
      (16, 16, 16)
  ] * 2
  # Each phase is the stream its own dataset gives from the same seed.
  coarse_only = pipeline.coarse_config(config)
  assert_batches_equal(
      batches[:3],
      take(iter(pipeline.train_dataset(coarse, coarse_only, seed=0)), 3),
  )
  assert_batches_equal(
      batches[3:], take(iter(pipeline.train_dataset(fine, config, seed=0)), 2)
  )


@pytest.mark.parametrize("taken", [0, 2, 3, 4])
def test_coarse_then_fine_state_restores_the_stream(progressive, taken):
  """Saved in the coarse phase, at the switch, or after it."""
  config, fine, coarse = progressive
  make = lambda: iter(
      pipeline.training_batches(fine, config, seed=5, coarse_cache=coarse)
  )
  it = make()
  take(it, taken)
  state = it.get_state()
  assert state["phase"] == ("coarse" if taken < 3 else "fine")
  expected = take(it, 3)
  fresh = make()
  fresh.set_state(state)
  assert_batches_equal(take(fresh, 3), expected)
  fresh.close()
  it.close()


def test_coarse_then_fine_refuses_a_plain_position(progressive):
  config, fine, coarse = progressive
  plain = iter(pipeline.train_dataset(fine, config, seed=0)).get_state()
  it = iter(
      pipeline.training_batches(fine, config, seed=0, coarse_cache=coarse)
  )
  with pytest.raises(ValueError, match="coarse phase"):
    it.set_state(plain)


def test_a_coarse_phase_needs_its_cache(progressive):
  config, fine, _ = progressive
  with pytest.raises(ValueError, match="coarse cache"):
    pipeline.training_batches(fine, config, seed=0)
  config.data.coarse_steps = 0  # off: the plain dataset
  assert isinstance(
      pipeline.training_batches(fine, config, seed=0),
      type(pipeline.train_dataset(fine, config, seed=0)),
  )


def test_coarse_then_fine_with_worker_processes(progressive):
  """The coarse phase's workers stop at the switch; the batches are those
  of each phase's own dataset with workers."""
  config, fine, coarse = progressive
  config.data.num_workers = 1
  it = iter(
      pipeline.training_batches(fine, config, seed=2, coarse_cache=coarse)
  )
  try:
    got = [{k: np.array(v) for k, v in b.items()} for b in take(it, 5)]
    assert it.phase == "fine"
  finally:
    it.close()
  coarse_only = pipeline.coarse_config(config)
  want = []
  for cache, cfg, n in ((coarse, coarse_only, 3), (fine, config, 2)):
    one = iter(pipeline.train_dataset(cache, cfg, seed=2))
    try:
      want += [{k: np.array(v) for k, v in b.items()} for b in take(one, n)]
    finally:
      one.close()
  assert_batches_equal(got, want)
