"""Tests for `lowrank.checkpoint`."""

import os
import signal
import subprocess
import sys

# Standalone runs (`python tests/checkpoint_test.py`) get the 8 fake devices
# that `conftest.py` gives pytest runs. Must precede the JAX import.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp

from tests import _ckpt_child  # The SIGKILLed child process.
from lowrank import checkpoint
from lowrank import optim
from lowrank import sharding
# pylint: enable=g-import-not-at-top,wrong-import-position

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding
_TMP = ocp.path.atomicity.TMP_DIR_SUFFIX  # Unfinished step dirs end so.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _is_key(x):
  return jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def assert_trees_equal(test, expected, actual):
  test.assertEqual(jax.tree.structure(expected), jax.tree.structure(actual))
  for (path, e), a in zip(
      jax.tree_util.tree_leaves_with_path(expected), jax.tree.leaves(actual)
  ):
    name = jax.tree_util.keystr(path)
    if _is_key(e):
      test.assertTrue(_is_key(a), name)
      test.assertEqual(jax.random.key_impl(e), jax.random.key_impl(a), name)
      e, a = jax.random.key_data(e), jax.random.key_data(a)
    test.assertEqual(jnp.asarray(e).dtype, jnp.asarray(a).dtype, name)
    np.testing.assert_array_equal(np.asarray(e), np.asarray(a), err_msg=name)


def assert_spec(test, x, *spec):
  """`x.sharding.spec == P(*spec)`, up to trailing `None`s."""
  pad = lambda s: tuple(s) + (None,) * (x.ndim - len(s))
  test.assertEqual(pad(x.sharding.spec), pad(spec))


def _train_state(seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  params = {
      "w": jax.random.normal(k1, (4, 3)),
      "b": jnp.zeros((3,), jnp.bfloat16),
  }
  return {
      "params": params,
      "opt_state": optax.adamw(1e-3).init(params),
      "step": jnp.asarray(5, jnp.int32),
      "rng": k2,
  }


class _TinyLoRA(nnx.Module):
  """`nnx.Linear` plus a rank-`rank` adapter held in two `nnx.LoRAParam`s."""

  def __init__(self, din, dout, rank, *, extra=False, rngs):
    self.linear = nnx.Linear(din, dout, rngs=rngs)
    self.lora_a = nnx.LoRAParam(jax.random.normal(rngs.params(), (din, rank)))
    self.lora_b = nnx.LoRAParam(jnp.zeros((rank, dout)))
    if extra:
      self.lora_c = nnx.LoRAParam(jnp.ones((dout,)))

  def __call__(self, x):
    return self.linear(x) + x @ self.lora_a @ self.lora_b


class CheckpointerTest(parameterized.TestCase):

  def test_round_trip_dict_state(self):
    state = _train_state()
    with checkpoint.Checkpointer(self.create_tempdir().full_path) as ckpt:
      self.assertTrue(ckpt.save(5, state))
      ckpt.wait_until_finished()
      self.assertEqual(ckpt.latest_step(), 5)
      restored, step = ckpt.restore_or_init(_train_state(seed=1))
    self.assertEqual(step, 5)
    assert_trees_equal(self, state, restored)
    self.assertIsInstance(restored["opt_state"][0], optax.ScaleByAdamState)
    # Still a typed key, drawing the same numbers.
    self.assertTrue(_is_key(restored["rng"]))
    np.testing.assert_array_equal(
        jax.random.uniform(state["rng"], (5,)),
        jax.random.uniform(restored["rng"], (5,)),
    )

  def test_round_trip_optimizer_state_with_empty_arrays(self):
    # GaLore keeps zero-size placeholder projectors for unprojected leaves;
    # Orbax refuses zero-size arrays, so they are saved as nothing and
    # rebuilt from the target.
    params = {"w": jnp.ones((16, 8)), "b": jnp.zeros(8)}
    tx = optim.galore_adamw(1e-2, rank=2, refresh_every=2)
    state = tx.init(params)
    grads = jax.tree.map(lambda x: jnp.full_like(x, 0.5), params)
    _, state = tx.update(grads, state, params)
    self.assertTrue(any(x.size == 0 for x in jax.tree.leaves(state)))
    d = self.create_tempdir().full_path
    with checkpoint.Checkpointer(d) as ckpt:
      ckpt.save(1, {"opt": state}, force=True)
      ckpt.wait_until_finished()
      restored = ckpt.restore(None, {"opt": tx.init(params)})["opt"]
    self.assertEqual(jax.tree.structure(restored), jax.tree.structure(state))
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(state)):
      self.assertEqual((a.shape, a.dtype), (b.shape, b.dtype))
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  def test_relative_directory(self):
    d = self.create_tempdir().full_path
    cwd = os.getcwd()
    os.chdir(d)
    try:
      with checkpoint.Checkpointer("ckpts") as ckpt:
        ckpt.save(1, {"w": jnp.ones(3)}, force=True)
        ckpt.wait_until_finished()
        self.assertEqual(ckpt.latest_step(), 1)
    finally:
      os.chdir(cwd)
    self.assertTrue(os.path.isdir(os.path.join(d, "ckpts", "1")))

  def test_restore_or_init_without_checkpoint(self):
    state = _train_state()
    with checkpoint.Checkpointer(self.create_tempdir().full_path) as ckpt:
      self.assertIsNone(ckpt.latest_step())
      restored, step = ckpt.restore_or_init(state)
      with self.assertRaises(FileNotFoundError):
        ckpt.restore(None, state)
    self.assertEqual(step, 0)
    self.assertIs(restored, state)

  def test_rejects_nnx_variables(self):
    with sharding.use_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
      model = _TinyLoRA(3, 2, 1, rngs=nnx.Rngs(0))
    with checkpoint.Checkpointer(self.create_tempdir().full_path) as ckpt:
      with self.assertRaisesRegex(TypeError, "as_pure"):
        ckpt.save(1, nnx.state(model))
      # The pure version (an `nnx.State` of arrays) round-trips.
      pure = nnx.as_pure(nnx.state(model))
      ckpt.save(1, pure)
      ckpt.wait_until_finished()
      assert_trees_equal(self, pure, ckpt.restore(1, pure))

  def test_sharded_restore_and_reshard(self):
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)])
    put = lambda x, *spec: jax.device_put(x, NamedSharding(mesh, P(*spec)))
    w = jnp.arange(8 * 4, dtype=jnp.float32).reshape(8, 4)
    keys = jax.random.split(jax.random.key(3), 4)
    state = {
        "w": put(w, "fsdp", None),
        "keys": put(keys, "fsdp"),  # Sharded typed keys.
        "rng": put(jax.random.key(0)),
    }
    with checkpoint.Checkpointer(self.create_tempdir().full_path) as ckpt:
      ckpt.save(1, state)
      ckpt.wait_until_finished()
      # Same sharding, from a concrete target holding other values.
      same = ckpt.restore(1, {
          "w": put(jnp.zeros_like(w), "fsdp", None),
          "keys": put(jax.random.split(jax.random.key(9), 4), "fsdp"),
          "rng": put(jax.random.key(9)),
      })
      # A different sharding, from an abstract target (typed keys included).
      abstract = {
          "w": jax.ShapeDtypeStruct(
              w.shape, w.dtype, sharding=NamedSharding(mesh, P(None, "fsdp"))
          ),
          "keys": jax.ShapeDtypeStruct(
              keys.shape, keys.dtype, sharding=NamedSharding(mesh, P("data"))
          ),
          "rng": jax.ShapeDtypeStruct(
              (), state["rng"].dtype, sharding=NamedSharding(mesh, P())
          ),
      }
      other = ckpt.restore(None, abstract)
    assert_spec(self, same["w"], "fsdp", None)
    assert_spec(self, same["keys"], "fsdp")
    assert_spec(self, other["w"], None, "fsdp")
    assert_spec(self, other["keys"], "data")
    for restored in (same, other):
      assert_trees_equal(self, state, restored)

  def test_sigkill_mid_save_keeps_last_complete_step(self):
    directory = self.create_tempdir().full_path
    env = dict(
        os.environ,
        XLA_FLAGS="--xla_force_host_platform_device_count=1",
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.pathsep.join(
            [_REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]
        ),
    )
    child = subprocess.run(
        [sys.executable, _ckpt_child.__file__, directory],
        env=env, capture_output=True, text=True, timeout=180, check=False,
    )
    msg = f"stdout:\n{child.stdout}\nstderr (tail):\n{child.stderr[-3000:]}"
    self.assertEqual(child.returncode, -signal.SIGKILL, msg)
    self.assertIn("saving 2", child.stdout, msg)
    self.assertIn("killing with", child.stdout, msg)
    # The kill landed mid-write: step 2 exists only as an unfinished tmp dir.
    entries = set(os.listdir(directory))
    self.assertNotIn("2", entries)
    self.assertIn("2" + _TMP, entries)

    with checkpoint.Checkpointer(directory) as ckpt:
      # Opening for writing removed the leftover; step 1 is intact.
      self.assertEqual(sorted(os.listdir(directory)), ["1"])
      self.assertEqual(ckpt.latest_step(), 1)
      expected = jax.device_put(_ckpt_child.small_state(), jax.devices()[0])
      restored, step = ckpt.restore_or_init(jax.tree.map(jnp.zeros_like,
                                                         expected))
      self.assertEqual(step, 1)
      assert_trees_equal(self, expected, restored)
      # Saving step 2 again works.
      new2 = dict(expected, step=jnp.asarray(2, jnp.int32))
      self.assertTrue(ckpt.save(2, new2))
      ckpt.wait_until_finished()
      self.assertEqual(ckpt.latest_step(), 2)
      assert_trees_equal(self, new2, ckpt.restore(2, expected))

  def test_unfinalized_dirs_are_ignored_and_removed(self):
    directory = self.create_tempdir()
    with checkpoint.Checkpointer(directory.full_path, async_save=False) as c:
      c.save(1, {"x": jnp.ones(2)})
    stale = os.path.join(directory.full_path, "7" + _TMP)
    os.makedirs(os.path.join(stale, "default"))
    with checkpoint.Checkpointer(directory.full_path, read_only=True) as c:
      self.assertEqual(c.latest_step(), 1)  # Ignored ...
    self.assertTrue(os.path.exists(stale))  # ... and left alone by readers.
    with checkpoint.Checkpointer(directory.full_path) as c:
      self.assertEqual(c.latest_step(), 1)
    self.assertFalse(os.path.exists(stale))  # Writers remove it.

  def test_resume_matches_uninterrupted_run(self):
    tx = optax.adamw(1e-2)

    @jax.jit
    def train_step(state):
      rng, data_rng = jax.random.split(state["rng"])
      x = jax.random.normal(data_rng, (8, 4))
      loss = lambda p: jnp.mean((x @ p["w"] + p["b"][None] - 1.0) ** 2)
      grads = jax.grad(loss)(state["params"])
      updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
      return {
          "params": optax.apply_updates(state["params"], updates),
          "opt_state": opt_state,
          "step": state["step"] + 1,
          "rng": rng,
      }

    def run(directory, num_steps, fail_after=None):
      params = {"w": jnp.zeros((4, 2)), "b": jnp.zeros((2,))}
      init = {
          "params": params,
          "opt_state": tx.init(params),
          "step": jnp.asarray(0, jnp.int32),
          "rng": jax.random.key(42),
      }
      with checkpoint.Checkpointer(directory) as ckpt:
        state, start = ckpt.restore_or_init(init)
        for step in range(start, num_steps):
          state = train_step(state)
          ckpt.save(step + 1, state)
          if step + 1 == fail_after:
            raise RuntimeError("preempted")
      return state

    straight = run(self.create_tempdir().full_path, 6)
    directory = self.create_tempdir().full_path
    with self.assertRaisesRegex(RuntimeError, "preempted"):
      run(directory, 6, fail_after=3)
    with checkpoint.Checkpointer(directory, read_only=True) as ckpt:
      self.assertEqual(ckpt.latest_step(), 3)
    resumed = run(directory, 6)
    self.assertEqual(int(resumed["step"]), 6)
    assert_trees_equal(self, straight, resumed)

  @parameterized.named_parameters(
      ("min", "min", True, [2, 4, 5], 2),
      ("max", "max", True, [1, 3, 5], 1),
      ("min_best_only", "min", False, [2, 4], 2),
  )
  def test_best_fn_keeps_best(self, mode, keep_latest, kept, best):
    directory = self.create_tempdir().full_path
    losses = [5.0, 1.0, 4.0, 2.0, 3.0]  # Steps 1..5.
    kwargs = dict(
        max_to_keep=2, best_fn=lambda m: m["loss"], best_mode=mode,
        keep_latest=keep_latest, async_save=False,
    )
    with checkpoint.Checkpointer(directory, **kwargs) as ckpt:
      for step, loss in enumerate(losses, start=1):
        ckpt.save(step, {"x": jnp.full((2,), step)},
                  metrics={"loss": jnp.asarray(loss)})
      self.assertEqual(ckpt.all_steps(), kept)
      self.assertEqual(ckpt.best_step(), best)
    with checkpoint.Checkpointer(directory, **kwargs) as ckpt:  # Reopened.
      self.assertEqual(ckpt.all_steps(), kept)
      self.assertEqual(ckpt.best_step(), best)
      np.testing.assert_array_equal(
          ckpt.restore(best, {"x": jnp.zeros((2,), jnp.int32)})["x"], best
      )

  def test_save_interval(self):
    with checkpoint.Checkpointer(
        self.create_tempdir().full_path, save_interval_steps=2,
        async_save=False,
    ) as ckpt:
      saved = [ckpt.save(s, {"x": jnp.ones(1)}) for s in (1, 2, 3)]
      self.assertTrue(ckpt.save(5, {"x": jnp.ones(1)}, force=True))
      self.assertEqual(saved, [True, True, False])
      self.assertEqual(ckpt.all_steps(), [2, 5])


if __name__ == "__main__":
  absltest.main()
