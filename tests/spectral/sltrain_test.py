"""Tests for SLTrain sparse plus low-rank layers (`spectral.sltrain`)."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import presets
from lowrank import sharding
from lowrank.models import llama
from lowrank.spectral import sltrain
from lowrank.spectral import sst


def _mesh():
  return sharding.use_mesh(sharding.make_mesh(devices=jax.devices()[:1]))


def _layer(d_in=24, d_out=16, rank=3, density=0.1, seed=0, **kwargs):
  layer = sltrain.SLTrainLinear(d_in, d_out, rank=rank, density=density,
                                alpha=6.0, rngs=nnx.Rngs(seed), **kwargs)
  # B starts at zero; make it non-zero so the low-rank part is exercised.
  b = layer.lora_b.get_value()
  layer.lora_b.set_value(jax.random.normal(jax.random.key(seed + 1), b.shape))
  bias = layer.bias.get_value()
  layer.bias.set_value(jax.random.normal(jax.random.key(seed + 2),
                                         bias.shape))
  return layer


def _dense_kernel(a, b, values, rows, cols, scale, shape):
  s = jnp.zeros(shape, values.dtype).at[rows, cols].set(values)
  return scale * (a @ b) + s


class SparseMatmulTest(parameterized.TestCase):

  @parameterized.parameters(None, 1, 7, 1000)
  def test_matches_dense_and_gradients(self, chunk):
    d_in, d_out, nnz = 9, 11, 30
    rows, cols = sltrain.sparse_support(jax.random.key(0), d_in, d_out, nnz)
    values = jax.random.normal(jax.random.key(1), (nnz,))
    x = jax.random.normal(jax.random.key(2), (5, d_in))
    t = jax.random.normal(jax.random.key(3), (5, d_out))
    dense = jnp.zeros((d_in, d_out)).at[rows, cols].set(values)
    np.testing.assert_allclose(
        sltrain.sparse_matmul(x, values, rows, cols, d_out, chunk), x @ dense,
        rtol=1e-5, atol=1e-5)

    def ours(x, values):
      y = sltrain.sparse_matmul(x, values, rows, cols, d_out, chunk)
      return jnp.sum((y - t) ** 2)

    def ref(x, w):
      return jnp.sum((x @ w - t) ** 2)

    gx, gv = jax.grad(ours, argnums=(0, 1))(x, values)
    rx, rw = jax.grad(ref, argnums=(0, 1))(x, dense)
    np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
    # The gradient w.r.t. S is the dense gradient read at the support.
    np.testing.assert_allclose(gv, rw[rows, cols], rtol=1e-5, atol=1e-5)

  def test_support(self):
    rows, cols = sltrain.sparse_support(jax.random.key(4), 20, 30, 60)
    flat = np.asarray(rows) * 30 + np.asarray(cols)
    self.assertLen(np.unique(flat), 60)
    self.assertTrue(np.all(np.diff(flat) > 0))  # Sorted, row-major.
    self.assertTrue(np.all((0 <= np.asarray(rows)) & (np.asarray(rows) < 20)))
    again = sltrain.sparse_support(jax.random.key(4), 20, 30, 60)
    np.testing.assert_array_equal(again[0], rows)  # Deterministic.
    with self.assertRaisesRegex(ValueError, r"nnz must be in \[1, 600\]"):
      sltrain.sparse_support(jax.random.key(4), 20, 30, 601)


class LayerTest(parameterized.TestCase):

  def test_output_equals_dense_composition(self):
    layer = _layer()
    x = jax.random.normal(jax.random.key(5), (2, 3, 24))
    w = layer.kernel()
    np.testing.assert_allclose(
        w, _dense_kernel(layer.lora_a.get_value(), layer.lora_b.get_value(),
                         layer.sparse_values.get_value(),
                         layer.sparse_rows.get_value(),
                         layer.sparse_cols.get_value(), 6.0 / 3, (24, 16)),
        rtol=1e-6)
    np.testing.assert_allclose(layer(x),
                               x @ w + layer.bias.get_value()[None, None],
                               rtol=1e-5, atol=1e-5)

  def test_init_and_parameter_count(self):
    d_in, d_out, r = 40, 30, 4
    layer = sltrain.SLTrainLinear(d_in, d_out, rank=r, density=0.03,
                                  use_bias=False, rngs=nnx.Rngs(0))
    nnz = int(0.03 * d_in * d_out)
    self.assertEqual(layer.nnz, nnz)
    self.assertEqual(layer.num_trainable(), r * (d_in + d_out) + nnz)
    self.assertEqual(layer.scale, 32.0 / r)
    np.testing.assert_array_equal(layer.lora_b.get_value(), 0)
    bound = 1 / np.sqrt(d_in)
    for var in (layer.lora_a, layer.sparse_values):
      v = np.asarray(var.get_value())
      self.assertTrue(np.all(np.abs(v) <= bound))
      self.assertGreater(np.std(v), bound / 3)
    # The support is a non-trainable int32 variable, not a Param.
    self.assertIsInstance(layer.sparse_rows, sltrain.SparseIndex)
    self.assertNotIsInstance(layer.sparse_rows, nnx.Param)
    self.assertEqual(layer.sparse_rows.get_value().dtype, jnp.int32)
    names = {str(p[-1]) for p, _ in nnx.to_flat_state(
        nnx.state(layer, nnx.Param))}
    self.assertEqual(names, {"lora_a", "lora_b", "sparse_values"})

  def test_gradients_match_dense_composition(self):
    layer = _layer()
    x = jax.random.normal(jax.random.key(6), (7, 24))
    t = jax.random.normal(jax.random.key(7), (7, 16))
    grads = nnx.grad(lambda m: jnp.sum((m(x) - t) ** 2))(layer)
    rows = layer.sparse_rows.get_value()
    cols = layer.sparse_cols.get_value()

    def ref(a, b, values, bias):
      w = _dense_kernel(a, b, values, rows, cols, layer.scale, (24, 16))
      return jnp.sum((x @ w + bias[None, :] - t) ** 2)

    want = jax.grad(ref, argnums=(0, 1, 2, 3))(
        layer.lora_a.get_value(), layer.lora_b.get_value(),
        layer.sparse_values.get_value(), layer.bias.get_value())
    got = (grads["lora_a"].get_value(), grads["lora_b"].get_value(),
           grads["sparse_values"].get_value(), grads["bias"].get_value())
    for g, w in zip(got, want):
      np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    self.assertNotIn("sparse_rows", grads)

  def test_step_memory_smaller_than_dense_kernel(self):
    # A moderately sized layer: W is 1024 x 1024 (4 MiB) for 64 tokens.
    d, r, tokens = 1024, 32, 64
    layer = sltrain.SLTrainLinear(d, d, rank=r, density=0.03,
                                  use_bias=False, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(8), (tokens, d))
    t = jax.random.normal(jax.random.key(9), (tokens, d))
    params = {"a": layer.lora_a.get_value(), "b": layer.lora_b.get_value(),
              "values": layer.sparse_values.get_value()}
    rows = layer.sparse_rows.get_value()
    cols = layer.sparse_cols.get_value()
    tx = optax.sgd(1e-3)

    def make_step(forward):
      def step(params, opt_state):
        loss, g = jax.value_and_grad(
            lambda p: jnp.sum((forward(p) - t) ** 2))(params)
        updates, opt_state = tx.update(g, opt_state)
        return optax.apply_updates(params, updates), opt_state, loss
      return step

    def dense(p):  # Materialises W = (α/r) A B + S, then x W.
      return x @ _dense_kernel(p["a"], p["b"], p["values"], rows, cols,
                               layer.scale, (d, d))

    def ours(p):
      y = (x @ p["a"]) @ p["b"] * layer.scale
      return y + sltrain.sparse_matmul(x, p["values"], rows, cols, d)

    state = tx.init(params)
    temp = {}
    for name, fwd in (("dense", dense), ("ours", ours)):
      compiled = jax.jit(make_step(fwd)).lower(params, state).compile()
      temp[name] = compiled.memory_analysis().temp_size_in_bytes
    w_bytes = d * d * 4
    self.assertGreater(temp["dense"], w_bytes)  # W and dW are temporaries.
    self.assertLess(temp["ours"], w_bytes)
    self.assertLess(temp["ours"], temp["dense"] / 2, temp)

  def test_bad_arguments(self):
    for kwargs, msg in (({"rank": 0}, "rank must be an int"),
                        ({"density": 0.0}, "density"),
                        ({"density": 1.5}, "density"),
                        ({"chunk_size": 0}, "chunk_size")):
      args = {"rank": 2, "rngs": nnx.Rngs(0)} | kwargs
      with self.subTest(msg), self.assertRaisesRegex(ValueError, msg):
        sltrain.SLTrainLinear(8, 8, **args)
    layer = _layer()
    with self.assertRaisesRegex(ValueError, "expected 24"):
      layer(jnp.ones((2, 5)))


class _Net(nnx.Module):

  def __init__(self, d_out):
    self.proj = nnx.Linear(4, d_out, rngs=nnx.Rngs(0))
    self.proj.bias.set_value(jnp.full((d_out,), 7.0))


class OfficialBehaviourTest(parameterized.TestCase):
  """What the official SpLoRaLinear does, where lowrank's default differs."""

  def test_nnz_is_floored_as_the_official_int(self):
    # 0.1 * 5 * 7 = 3.5: the official int() keeps 3, rounding would give 4.
    layer = sltrain.SLTrainLinear(5, 7, rank=1, density=0.1,
                                  rngs=nnx.Rngs(0))
    self.assertEqual(layer.nnz, 3)
    self.assertEqual(layer.sparse_values.get_value().shape, (3,))

  def test_bias_init_keep_and_uniform(self):
    d_out = 400
    kept = sltrain.to_sltrain(_Net(d_out), targets="proj", rank=2)
    np.testing.assert_array_equal(kept.proj.bias.get_value(), 7.0)
    net = sltrain.to_sltrain(_Net(d_out), targets="proj", rank=2,
                             bias_init="uniform")
    bias = np.asarray(net.proj.bias.get_value())
    bound = 1 / np.sqrt(d_out)  # Official: 1/sqrt(out_features).
    self.assertTrue(np.all(np.abs(bias) <= bound))
    # U(-a, a) has std a/sqrt(3): 0.0289 here; a d_in bound would be 0.29.
    self.assertAlmostEqual(np.std(bias), bound / np.sqrt(3), delta=0.004)
    self.assertIsInstance(net.proj.bias, nnx.Param)

  def test_bad_bias_init(self):
    with self.assertRaisesRegex(ValueError, "bias_init must be one of "
                                r"\('keep', 'uniform'\); got 'zeros'"):
      sltrain.SLTrainLinear(4, 4, rank=1, rngs=nnx.Rngs(0),
                            bias_init="zeros")

  def test_paper_preset_converts(self):
    self.assertEqual(presets.paper(sltrain.to_sltrain),
                     {"bias_init": "uniform"})
    net = sltrain.to_sltrain(_Net(6), targets="proj", rank=2,
                             **presets.paper("to_sltrain"))
    self.assertIsInstance(net.proj, sltrain.SLTrainLinear)
    self.assertTrue(np.all(np.abs(net.proj.bias.get_value()) < 1))
    self.assertEqual(net.proj(jnp.ones((3, 4))).shape, (3, 6))


class ModelTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("no_match", r".*nothing", "matched no nnx.Linear"),
      ("not_linear", r"model\.embed_tokens", "not nnx.Linear.*embed_tokens"),
  )
  def test_to_sltrain_errors(self, targets, message):
    with _mesh():
      model = llama.LlamaForCausalLM(llama.LlamaConfig.tiny(),
                                     rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, message):
      sltrain.to_sltrain(model, targets=targets, rank=2)

  def test_stacked_layer_runs_inside_the_scan_only(self):
    with _mesh():
      model = llama.LlamaForCausalLM(llama.LlamaConfig.tiny(scan_layers=True),
                                     rngs=nnx.Rngs(0))
    sltrain.to_sltrain(model, targets=r".*q_proj", rank=2)
    layer = model.model.layers.self_attn.q_proj
    with self.assertRaisesRegex(ValueError,
                                "SLTrainLinear holds stacked parameters"):
      layer(jnp.ones((1, layer.in_features)))

  @parameterized.named_parameters(("list", False), ("scan", True))
  def test_tiny_lm_loss_decreases(self, scan_layers):
    with _mesh():
      model = llama.LlamaForCausalLM(
          llama.LlamaConfig.tiny(scan_layers=scan_layers), rngs=nnx.Rngs(3))
    sltrain.to_sltrain(model, targets=r".*_proj", rank=4, density=0.05,
                       alpha=8)
    mods = sltrain.sltrain_modules(model)
    self.assertLen(mods, 7 if scan_layers else 14)
    down = mods["model.layers.mlp.down_proj" if scan_layers
                else "model.layers.0.mlp.down_proj"]
    per_layer = 4 * (128 + 64) + int(0.05 * 128 * 64)
    self.assertEqual(down.num_trainable(),
                     per_layer * (2 if scan_layers else 1))
    if scan_layers:  # One support per stacked layer.
      rows = np.asarray(down.sparse_rows.get_value())
      self.assertEqual(rows.shape, (2, down.nnz))
      self.assertFalse(np.array_equal(rows[0], rows[1]))
    with _mesh():
      opt = nnx.Optimizer(model, optax.adamw(3e-3), wrt=nnx.Param)
    ids = np.asarray(jax.random.randint(jax.random.key(4), (4, 16), 0, 32))

    def loss_fn(model, ids):
      return llama.next_token_loss(model(ids), ids)

    losses = [float(sst.train_step(model, opt, loss_fn, ids))
              for _ in range(8)]
    self.assertLess(losses[-1], 0.8 * losses[0], losses)
    # The supports did not move.
    if scan_layers:
      np.testing.assert_array_equal(down.sparse_rows.get_value(), rows)


if __name__ == "__main__":
  absltest.main()
