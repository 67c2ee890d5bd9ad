"""Tests for lowrank.sharding: mesh helpers and rule-derived shardings."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import optax

from lowrank import adapters
from lowrank import sharding

P = jax.sharding.PartitionSpec


def _mlp(rngs, d=64, h=128):
  part = lambda axes: nnx.with_partitioning(  # pylint: disable=g-long-lambda
      nnx.initializers.lecun_normal(), axes)

  class Mlp(nnx.Module):

    def __init__(self):
      self.up = nnx.Linear(d, h, kernel_init=part(("embed", "mlp")),
                           rngs=rngs)
      self.down = nnx.Linear(h, d, kernel_init=part(("mlp", "embed")),
                             rngs=rngs)

    def __call__(self, x):
      return self.down(jax.nn.relu(self.up(x)))

  return Mlp()


class MakeMeshTest(parameterized.TestCase):

  def test_axis_types_always_auto_and_minus_one_inferred(self):
    mesh = sharding.make_mesh([("data", -1), ("fsdp", 4), ("tensor", 1)])
    self.assertEqual(dict(mesh.shape), {"data": 2, "fsdp": 4, "tensor": 1})
    self.assertTrue(
        all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types))
    self.assertEqual(dict(sharding.make_mesh().shape),
                     {"data": 8, "fsdp": 1, "tensor": 1})
    self.assertEqual(
        dict(sharding.make_mesh({"data": 1, "fsdp": -1}).shape),
        {"data": 1, "fsdp": 8})

  @parameterized.parameters(
      ([("data", 3), ("fsdp", -1)], "not divisible"),
      ([("data", -1), ("fsdp", -1)], "At most one"),
      ([("data", 2), ("fsdp", 2)], "needs 4 devices"),
      ([("model", 8)], "Unknown mesh axis"),
      ([("data", 0), ("fsdp", -1)], "positive"),
  )
  def test_bad_meshes(self, axes, msg):
    with self.assertRaisesRegex(ValueError, msg):
      sharding.make_mesh(axes)


class LogicalToSpecTest(absltest.TestCase):

  def test_rules_and_dedupe(self):
    self.assertEqual(sharding.logical_to_spec(("embed", "mlp")),
                     P("fsdp", "tensor"))
    self.assertEqual(sharding.logical_to_spec(("batch", "embed")),
                     P(("data", "fsdp"), None))
    self.assertEqual(sharding.logical_to_spec(("embed", "lowrank")),
                     P("fsdp", None))
    self.assertEqual(sharding.logical_to_spec(None), P())

  def test_unknown_name_is_an_error(self):
    with self.assertRaisesRegex(ValueError, "'emb' is not in the rules"):
      sharding.logical_to_spec(("emb", "mlp"))

  def test_indivisible_dim_is_replicated(self):
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)])
    self.assertEqual(
        sharding.logical_to_spec(("vocab", "embed"), mesh=mesh,
                                 shape=(30522, 6)), P("tensor", None))
    self.assertEqual(
        sharding.logical_to_spec(("vocab", "embed"), mesh=mesh,
                                 shape=(30522, 8)), P("tensor", "fsdp"))


class DerivedShardingsTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.mesh = sharding.make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)])

  def test_params_adapters_and_optimizer_state(self):
    def build():
      model = _mlp(nnx.Rngs(0))
      adapters.inject(model, targets="up|down", rank=4)
      return model

    params = sharding.abstract_state_shardings(build, self.mesh, nnx.Param)
    self.assertEqual(params["up"]["base"]["kernel"].spec, P("fsdp", "tensor"))
    lora = sharding.abstract_state_shardings(build, self.mesh, nnx.LoRAParam)
    self.assertEqual(lora["up"]["lora_a"].spec, P("fsdp", None))
    self.assertEqual(lora["down"]["lora_b"].spec, P(None, "fsdp"))
    self.assertNotIn("base", lora["up"])

    with sharding.use_mesh(self.mesh):
      model = build()
    state = nnx.as_pure(nnx.state(model, nnx.LoRAParam))
    tx = optax.adam(1e-3)
    opt = sharding.shardings_like_params(jax.eval_shape(tx.init, state), state)
    self.assertEqual(opt[0].mu["up"]["lora_a"].spec, P("fsdp", None))
    self.assertEqual(opt[0].count.spec, P())

  def test_check_sharded_flags_replicated_large_leaves(self):
    with sharding.use_mesh(self.mesh):
      model = _mlp(nnx.Rngs(0), d=256, h=512)
    params = nnx.as_pure(nnx.state(model))
    sharding.check_sharded(params, min_size=1024)
    replicated = jax.device_put(jnp.zeros((512, 512)),
                                jax.sharding.NamedSharding(self.mesh, P()))
    with self.assertRaisesRegex(ValueError, "replicated.*'w'"):
      sharding.check_sharded({"w": replicated}, min_size=1024)

  def test_optimizer_state_sharded_like_params(self):
    with sharding.use_mesh(self.mesh):
      model = _mlp(nnx.Rngs(0), d=256, h=512)
    params = nnx.as_pure(nnx.state(model))
    tx = optax.adam(1e-3)
    shardings = sharding.shardings_like_params(
        jax.eval_shape(tx.init, params), params)
    state = jax.jit(tx.init, out_shardings=shardings)(params)
    self.assertEmpty(sharding.replicated_leaves(state, min_size=1024))
    self.assertEqual(state[0].nu["up"]["kernel"].sharding.spec,
                     P("fsdp", "tensor"))


if __name__ == "__main__":
  absltest.main()
