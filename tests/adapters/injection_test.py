"""Tests for the LoRA core: pure math, layers, injection, merge, PEFT I/O."""

import json
import os

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import safetensors.numpy

from lowrank import adapters
from lowrank import sharding
from lowrank import train
from lowrank.adapters import lora

from tests import testing

P = jax.sharding.PartitionSpec


def _toy(rngs, d=16):
  """Every adaptable kind, with logical axes, as a user model would be."""
  return testing.KindsToy(rngs, d, embed=True, norm=True)


_IDS = jnp.arange(12).reshape(2, 6)
_ALL = r"emb|layers\.\d|gen|ein"


class LoraMathTest(parameterized.TestCase):

  def test_apply_equals_dense_delta(self):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(k1, (3, 5, 64))
    a = jax.random.normal(k2, (64, 4))
    b = jax.random.normal(k3, (4, 48))
    np.testing.assert_allclose(
        lora.lora_apply(x, a, b, 0.5), 0.5 * x @ (a @ b), rtol=1e-4,
        atol=1e-4)

  def test_custom_backward_matches_autodiff(self):
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k1, (3, 5, 64))
    a = jax.random.normal(k2, (64, 4))
    b = jax.random.normal(k3, (4, 48))
    w = jax.random.normal(k4, (3, 5, 48))
    ours = jax.grad(lambda x, a, b: jnp.sum(w * lora.lora_apply(x, a, b, 0.5)),
                    argnums=(0, 1, 2))(x, a, b)
    ref = jax.grad(lambda x, a, b: jnp.sum(w * 0.5 * ((x @ a) @ b)),
                   argnums=(0, 1, 2))(x, a, b)
    for o, r in zip(ours, ref):
      np.testing.assert_allclose(o, r, rtol=1e-4, atol=1e-4)

  def test_backward_never_forms_full_delta(self):
    x = jnp.ones((8, 64))
    a, b = jnp.ones((64, 4)), jnp.ones((4, 48))

    def loss(a, b):
      return jnp.sum(lora.lora_apply(x, a, b, 2.0) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(a, b)
    shapes = {
        tuple(v.aval.shape)
        for eqn in jaxpr.jaxpr.eqns
        for v in eqn.outvars
    }
    self.assertNotIn((64, 48), shapes)
    self.assertNotIn((48, 64), shapes)

  @parameterized.parameters((8, 16.0, False, 2.0), (8, 16.0, True, 16 / 8**0.5),
                            (4, None, False, 1.0))
  def test_scaling(self, r, alpha, rs, want):
    self.assertAlmostEqual(lora.scaling(r, alpha, rslora=rs), want)

  @parameterized.parameters((0, ValueError), (-1, ValueError),
                            (2.5, TypeError), (True, TypeError))
  def test_bad_rank(self, r, error):
    with self.assertRaisesRegex(error, "rank must be a positive"):
      lora.scaling(r, 1.0)

  def test_kaiming_bound_and_gaussian_std(self):
    a = lora.init_a(jax.random.key(0), (400, 8), 400)
    self.assertLessEqual(float(jnp.abs(a).max()), 1 / 20 + 1e-7)
    self.assertGreater(float(jnp.abs(a).max()), 0.9 / 20)
    g = lora.init_a(jax.random.key(0), (4000, 8), 4000, init="gaussian")
    self.assertAlmostEqual(float(g.std()), 1 / 8, delta=0.01)
    with self.assertRaisesRegex(ValueError, "Unknown LoRA init"):
      lora.init_a(jax.random.key(0), (4, 2), 4, init="bogus")

  @parameterized.parameters(jnp.float32, jnp.bfloat16)
  def test_merge_unmerge_roundtrip(self, dtype):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(k1, (32, 24)).astype(dtype)
    a = jax.random.normal(k2, (32, 4)) * 0.1
    b = jax.random.normal(k3, (4, 24)) * 0.1
    merged = lora.merge(w, a, b, 2.0)
    self.assertEqual(merged.dtype, dtype)
    np.testing.assert_allclose(
        merged.astype(jnp.float32),
        (w.astype(jnp.float32) + 2.0 * a @ b),
        rtol=1e-2 if dtype == jnp.bfloat16 else 1e-6,
        atol=1e-2 if dtype == jnp.bfloat16 else 1e-6,
    )
    back = lora.unmerge(merged, a, b, 2.0)
    tol = 2e-2 if dtype == jnp.bfloat16 else 1e-6
    np.testing.assert_allclose(back.astype(jnp.float32),
                               w.astype(jnp.float32), atol=tol)


class InjectTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(sharding.use_mesh())

  def test_fresh_adapter_is_identity_for_every_kind(self):
    model = _toy(nnx.Rngs(0))
    y0 = model(_IDS)
    adapters.inject(model, targets=_ALL, rank=2, alpha=4)
    self.assertEqual(
        sorted(adapters.adapter_modules(model)),
        ["ein", "emb", "gen", "layers.0", "layers.1"],
    )
    np.testing.assert_array_equal(model(_IDS), y0)
    testing.randomize_lora(model)
    self.assertGreater(float(jnp.abs(model(_IDS) - y0).max()), 1e-3)

  def test_each_kind_matches_merged_dense_weights(self):
    model = _toy(nnx.Rngs(0))
    adapters.inject(model, targets=_ALL, rank=3, alpha=6, use_rslora=True)
    testing.randomize_lora(model)
    y = model(_IDS)
    adapters.merge(model)
    np.testing.assert_allclose(model(_IDS), y, atol=1e-5)
    adapters.unmerge(model)
    np.testing.assert_allclose(model(_IDS), y, atol=1e-5)
    with adapters.disabled(model):
      y_base = model(_IDS)
    adapters.unload(model, merge_first=False)
    self.assertEmpty(adapters.adapter_modules(model))
    np.testing.assert_allclose(model(_IDS), y_base, atol=1e-6)

  def test_unload_merges(self):
    model = _toy(nnx.Rngs(0))
    adapters.inject(model, targets=["layers.0", "ein"], rank=2)
    testing.randomize_lora(model)
    y = model(_IDS)
    adapters.unload(model)
    self.assertIsInstance(model.layers[0], nnx.Linear)
    np.testing.assert_allclose(model(_IDS), y, atol=1e-5)

  def test_list_targets_suffix_semantics_and_exclude(self):
    model = _toy(nnx.Rngs(0))
    adapters.inject(model, targets=["0", "1", "gen"], exclude=["1"], rank=2)
    self.assertEqual(sorted(adapters.adapter_modules(model)),
                     ["gen", "layers.0"])

  def test_all_linear(self):
    model = _toy(nnx.Rngs(0))
    adapters.inject(model, targets="all-linear", rank=2)
    self.assertEqual(sorted(adapters.adapter_modules(model)),
                     ["ein", "gen", "layers.0", "layers.1"])

  def test_rank_and_alpha_patterns(self):
    model = _toy(nnx.Rngs(0))
    adapters.inject(model, targets=_ALL, rank=2, alpha=2,
                    rank_pattern={r"layers\.1": 5}, alpha_pattern={"gen": 7})
    mods = adapters.adapter_modules(model)
    self.assertEqual(mods["layers.1"].rank, 5)
    self.assertEqual(mods["layers.0"].rank, 2)
    self.assertEqual(mods["gen"].alpha, 7.0)
    self.assertEqual(mods["layers.1"].lora_a.get_value().shape, (16, 5))

  def test_errors_list_existing_paths(self):
    model = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "matched no module.*layers.0"):
      adapters.inject(model, targets="decoder.*", rank=2)
    with self.assertRaisesRegex(ValueError, "cannot adapt: norm .LayerNorm"):
      adapters.inject(model, targets="norm", rank=2)
    with self.assertRaisesRegex(ValueError, "Invalid targets regex"):
      adapters.inject(model, targets="layers.(", rank=2)
    with self.assertRaisesRegex(ValueError, "rank must be"):
      adapters.inject(model, targets="gen", rank=0)
    with self.assertRaisesRegex(ValueError, "Unknown method"):
      adapters.inject(model, targets="gen", rank=2, method="nope")
    adapters.inject(model, targets="gen", rank=2)
    with self.assertRaisesRegex(ValueError, "already has an adapter"):
      adapters.inject(model, targets="gen", rank=2)

  def test_only_lora_params_get_gradients(self):
    model = _toy(nnx.Rngs(0))
    adapters.inject(model, targets=_ALL, rank=2)
    testing.randomize_lora(model)
    diff = nnx.DiffState(0, nnx.LoRAParam)
    # Jitted: eager, the backward pass compiles op by op.
    grads = nnx.jit(nnx.grad(lambda m: jnp.mean(m(_IDS) ** 2),
                             argnums=diff))(model)
    leaves = jax.tree.leaves(grads, is_leaf=lambda x: isinstance(x, nnx.Variable))
    self.assertTrue(leaves)
    self.assertTrue(all(isinstance(v, nnx.LoRAParam) for v in leaves))
    counts = adapters.count_parameters(model)
    self.assertEqual(counts["trainable"],
                     sum(v.get_value().size for v in leaves))
    self.assertLess(counts["trainable"], counts["total"])

  def test_dropout_only_in_train_mode(self):
    model = _toy(nnx.Rngs(0))
    adapters.inject(model, targets="layers.0", rank=2, dropout=0.5)
    testing.randomize_lora(model)
    model.eval()
    y1, y2 = model(_IDS), model(_IDS)
    np.testing.assert_array_equal(y1, y2)
    model.train()
    self.assertGreater(float(jnp.abs(model(_IDS) - y1).max()), 0.0)

  def test_factors_inherit_kernel_logical_axes(self):
    model = _toy(nnx.Rngs(0))
    adapters.inject(model, targets=_ALL, rank=2)
    mods = adapters.adapter_modules(model)
    self.assertEqual(mods["layers.0"].lora_a.get_metadata()["out_sharding"],
                     ("embed", "lowrank"))
    self.assertEqual(mods["layers.0"].lora_b.get_metadata()["out_sharding"],
                     ("lowrank", "mlp"))
    self.assertEqual(mods["ein"].lora_b.get_metadata()["out_sharding"],
                     ("lowrank", "heads", "kv"))


class PeftIoTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(sharding.use_mesh())

  def _saved(self, **kw):
    model = _toy(nnx.Rngs(0))
    adapters.inject(model, targets=_ALL, rank=2, alpha=4, **kw)
    testing.randomize_lora(model)
    d = self.create_tempdir().full_path
    adapters.save_adapters(d, model, format="peft")
    return model, d

  def test_file_layout_matches_peft(self):
    _, d = self._saved(rank_pattern={r"layers\.1": 3})
    with open(os.path.join(d, "adapter_config.json")) as f:
      config = json.load(f)
    self.assertEqual(config["peft_type"], "LORA")
    self.assertEqual(config["r"], 2)
    self.assertEqual(config["lora_alpha"], 4.0)
    self.assertEqual(config["rank_pattern"], {r"layers\.1": 3})
    tensors = safetensors.numpy.load_file(
        os.path.join(d, "adapter_model.safetensors"))
    self.assertEqual(tensors["base_model.model.layers.0.lora_A.weight"].shape,
                     (2, 16))
    self.assertEqual(tensors["base_model.model.layers.0.lora_B.weight"].shape,
                     (16, 2))
    self.assertEqual(tensors["base_model.model.layers.1.lora_A.weight"].shape,
                     (3, 16))
    self.assertEqual(tensors["base_model.model.emb.lora_embedding_A"].shape,
                     (2, 50))

  def test_roundtrip_into_fresh_model(self):
    model, d = self._saved(use_rslora=True)
    fresh = _toy(nnx.Rngs(0))
    adapters.load_adapters(d, fresh, format="peft")
    np.testing.assert_array_equal(fresh(_IDS), model(_IDS))
    # Loading into a model that already has the same adapters also works.
    adapters.load_adapters(d, model, format="peft")

  def test_rejects_bad_shapes_and_keys(self):
    _, d = self._saved()
    path = os.path.join(d, "adapter_model.safetensors")
    tensors = safetensors.numpy.load_file(path)
    key = "base_model.model.gen.lora_A.weight"
    bad = dict(tensors)
    bad[key] = np.zeros((2, 15), np.float32)
    safetensors.numpy.save_file(bad, path)
    with self.assertRaisesRegex(ValueError, "gen.lora_A.weight: expected sha"):
      adapters.load_adapters(d, _toy(nnx.Rngs(0)), format="peft")
    bad = dict(tensors)
    del bad[key]
    safetensors.numpy.save_file(bad, path)
    with self.assertRaisesRegex(ValueError, "missing tensors.*gen.lora_A"):
      adapters.load_adapters(d, _toy(nnx.Rngs(0)), format="peft")
    bad = dict(tensors)
    bad["base_model.model.norm.lora_A.weight"] = np.zeros((2, 16), np.float32)
    safetensors.numpy.save_file(bad, path)
    with self.assertRaisesRegex(ValueError, "norm.lora_A.weight"):
      adapters.load_adapters(d, _toy(nnx.Rngs(0)), format="peft")

  def test_rejects_targets_that_do_not_fit(self):
    _, d = self._saved()
    cfg_path = os.path.join(d, "adapter_config.json")
    with open(cfg_path) as f:
      config = json.load(f)
    config["target_modules"] = ["q_proj"]
    with open(cfg_path, "w") as f:
      json.dump(config, f)
    with self.assertRaisesRegex(ValueError, "does not fit the model.*q_proj"):
      adapters.load_adapters(d, _toy(nnx.Rngs(0)), format="peft")
    config["peft_type"] = "IA3"
    with open(cfg_path, "w") as f:
      json.dump(config, f)
    with self.assertRaisesRegex(ValueError, "peft_type is 'IA3'; supported"):
      adapters.load_adapters(d, _toy(nnx.Rngs(0)), format="peft")
    with self.assertRaises(FileNotFoundError):
      adapters.load_adapters(self.create_tempdir().full_path,
                             _toy(nnx.Rngs(0)), format="peft")


class _Frozen(nnx.Module):

  def __init__(self, d, rngs):
    self.big = nnx.Linear(d, d, use_bias=False, rngs=rngs)
    self.head = nnx.Linear(d, 1, rngs=rngs)

  def __call__(self, x):
    return self.head(jax.nn.relu(self.big(x)))


def _compiled_bytes(lora_rank):
  """Argument + temp bytes of one compiled AdamW step on a 4096² weight."""
  d = 4096
  model = _Frozen(d, nnx.Rngs(0))
  wrt = nnx.Param
  if lora_rank:
    adapters.inject(model, targets="big", rank=lora_rank)
    wrt = nnx.LoRAParam
  graphdef, params, rest = train.split(model, wrt)
  tx = optax.adamw(1e-3)
  step = train.make_train_step(graphdef, lambda m, x: jnp.mean(m(x) ** 2),
                               tx, split=False)
  mem = step.memory(testing.abstract(params),
                    jax.eval_shape(tx.init, params), testing.abstract(rest),
                    jax.ShapeDtypeStruct((8, d), jnp.float32))
  return mem["argument_bytes"] + mem["temp_bytes"]


class MemoryTest(absltest.TestCase):

  def test_lora_step_saves_gradient_and_moments_of_frozen_weight(self):
    weight_bytes = 4096 * 4096 * 4
    full, low = _compiled_bytes(0), _compiled_bytes(8)
    # Full fine-tuning carries W's gradient and two Adam moments; LoRA only W.
    self.assertLess(low, full - 2 * weight_bytes)


def _lora_toy(mesh):
  """`_toy` (d 32) with rank-4 LoRA on every kind, built under `mesh`."""
  with sharding.use_mesh(mesh):
    model = _toy(nnx.Rngs(0), d=32)
    adapters.inject(model, targets=_ALL, rank=4, alpha=8, rngs=1)
  return model


def _placed(model, mesh):
  """A copy of `model` placed by the rules on `mesh` (fresh buffers).

  The same start as `_lora_toy(mesh)` without building it again op by op.
  """
  graphdef, state = nnx.split(model)
  placed = jax.device_put(state, sharding.state_shardings(state, mesh))
  # A replicated leaf's shard on the new mesh's device may be shared.
  placed = jax.tree.map(lambda x: jnp.array(x, copy=True), placed)
  with sharding.use_mesh(mesh):
    return nnx.merge(graphdef, placed)


def _sharded_run(model, mesh, steps=3):
  """A few LoRA AdamW steps under `mesh`; returns losses and final state.

  The steps donate `model`'s adapter buffers.
  """
  tx = optax.adamw(1e-2)
  graphdef, params, rest = train.split(model, nnx.LoRAParam)
  param_shardings, opt_shardings = train.shardings(model, nnx.LoRAParam, tx,
                                                   mesh)
  opt_state = train.init_opt_state(tx, params, shardings=opt_shardings)
  step = train.make_train_step(
      graphdef, lambda m, ids: jnp.mean((m(ids) - 1.0) ** 2), tx,
      param_shardings=param_shardings, opt_shardings=opt_shardings)
  ids = jax.device_put(jax.random.randint(jax.random.key(3), (8, 6), 0, 50),
                       train.batch_sharding(mesh))
  losses = []
  with jax.set_mesh(mesh):
    for _ in range(steps):
      params, opt_state, metrics = step(params, opt_state, rest, ids)
      losses.append(float(metrics["loss"]))
  return losses, params, opt_state


class ShardedTrainStepTest(absltest.TestCase):

  def test_sharded_step_keeps_rule_shardings_and_matches_one_device(self):
    self.assertEqual(jax.device_count(), 8)
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)])
    one = sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)],
                             devices=jax.devices()[:1])
    model = _lora_toy(mesh)
    model1 = _placed(model, one)  # Before the steps donate `model`.
    losses, params, opt_state = _sharded_run(model, mesh)
    a = params["layers"][0]["lora_a"]
    b = params["layers"][0]["lora_b"]
    self.assertEqual(a.sharding.spec, P("fsdp", None))
    self.assertEqual(b.sharding.spec, P(None, "tensor"))
    mu = opt_state[0].mu["layers"][0]["lora_a"]
    self.assertEqual(mu.sharding.spec, P("fsdp", None))
    self.assertEqual(opt_state[0].mu["ein"]["lora_a"].sharding.spec,
                     P("fsdp", None))
    losses1, _, _ = _sharded_run(model1, one)
    np.testing.assert_allclose(losses, losses1, rtol=1e-5, atol=1e-6)
    self.assertLess(losses[-1], losses[0])


if __name__ == "__main__":
  absltest.main()
