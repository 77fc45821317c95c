"""The checkpointer restores whatever tree was saved, knowing nothing of
what its entries mean (the EMA is training's business)."""

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from randose_jax import checkpointing
from randose_jax.distributed import make_mesh


def _save(workdir, state):
  ckpt = checkpointing.Checkpointer(workdir, keep=2, async_save=False)
  ckpt.save_latest(3, state, {"pos": 0}, {"seed": 0}, {"step": 3})
  ckpt.close()


def _abstract(tree, sharding):
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
      tree,
  )


def _restore(workdir, abstract):
  ckpt = checkpointing.Checkpointer(workdir, keep=2, async_save=False)
  try:
    return ckpt.restore(abstract, "latest")
  finally:
    ckpt.close()


def test_an_entry_saved_but_not_asked_for_comes_back_as_saved(tmp_path):
  sharding = NamedSharding(make_mesh(), P())
  extra = {"w": np.arange(6, dtype=np.float32).reshape(2, 3)}
  state = {"step": np.int32(3), "params": {"w": np.ones(4)}, "extra": extra}
  _save(tmp_path, state)
  asked = {k: v for k, v in state.items() if k != "extra"}
  got = _restore(tmp_path, _abstract(asked, sharding))
  assert set(got["state"]) == {"step", "params", "extra"}
  np.testing.assert_array_equal(got["state"]["extra"]["w"], extra["w"])
  assert got["state"]["extra"]["w"].sharding.is_equivalent_to(sharding, 2)
  assert got["step"] == 3 and got["data"] == {"pos": 0}


def test_an_entry_asked_for_but_not_saved_is_left_out(tmp_path):
  sharding = NamedSharding(make_mesh(), P())
  state = {"step": np.int32(3), "params": {"w": np.ones(4)}}
  _save(tmp_path, state)
  asked = dict(state, extra={"w": np.zeros((2, 3), np.float32)})
  got = _restore(tmp_path, _abstract(asked, sharding))
  assert set(got["state"]) == {"step", "params"}
  np.testing.assert_array_equal(got["state"]["params"]["w"], np.ones(4))


def test_the_checkpointer_names_no_train_state_entry():
  import inspect

  source = inspect.getsource(checkpointing)
  assert "ema_params" not in source and "EMA" not in source
