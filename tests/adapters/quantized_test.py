"""Tests for quantized bases: NF4 / int8 math, QLoRA layers, merge, LQ-LoRA."""

import statistics

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import adapters
from lowrank import presets
from lowrank import sharding
from lowrank.adapters import nf4
from lowrank.adapters import quantized
from lowrank.optim import adam8bit

from tests import testing

P = jax.sharding.PartitionSpec


def _toy(rngs):
  """Linear, LinearGeneral, Einsum (quantizable) plus Embed and LayerNorm."""
  return testing.KindsToy(rngs, 64, heads=(4, 16), embed=True, norm=True,
                          ein_bias=True)


_IDS = jnp.arange(12).reshape(2, 6)


def _one_device_mesh():
  # One device: the default mesh replicates every computation on the 8
  # fake CPU devices, which makes SVDs and compiles ~8x slower here.
  return sharding.make_mesh([("data", 1), ("fsdp", 1), ("tensor", 1)],
                            devices=jax.devices()[:1])
_LINEAR = r"layers\.\d|gen|ein"


# The checks below run in numpy and the models through one jitted forward:
# each eager JAX op is a compile of its own (a toy forward is ~50 of them),
# which made this file's CPU time mostly XLA compilation.


def _gauss(shape, seed=0, scale=0.02):
  """`scale`·N(0, 1) as float32 numpy (no compile per shape, unlike JAX's
  random.normal, ~0.2 s each at the tests' XLA settings)."""
  rng = np.random.default_rng(seed)
  return rng.standard_normal(shape, np.float32) * np.float32(scale)


def _rel(a, b):
  """‖a − b‖ / ‖b‖ (Frobenius), in float64 numpy."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


# One jitted forward and one jitted adapter gradient for every model here
# (the compile is cached per model structure).
_forward = nnx.jit(lambda model, x: model(x))


@nnx.jit
def _lora_grads(model, x):
  diff = nnx.DiffState(0, nnx.LoRAParam)
  return nnx.grad(lambda m: jnp.mean(m(x) ** 2), argnums=diff)(model)


def _bnb_nf4(a, block=64):
  """bitsandbytes' NF4 quantize_4bit / dequantize_4bit (no double quant).

  A numpy transcription of `bitsandbytes/backends/default/ops.py` at
  95f9af309d4d for a torch weight `a` whose size is a whole number of
  blocks: flatten row-major, scale each block by 1 / absmax, bucketize
  against the code midpoints (`right=False`), pack the first of a pair
  into the high nibble. Returns (packed codes, absmax, dequantized `a`).
  """
  code = np.asarray(nf4.NF4_CODE, np.float32)
  blocks = np.asarray(a, np.float32).reshape(-1, block)
  absmax = np.abs(blocks).max(axis=-1)
  scaled = np.clip(blocks * (1.0 / np.maximum(absmax, 1e-38))[:, None],
                   -1, 1).reshape(-1)
  q = np.searchsorted((code[1:] + code[:-1]) / 2, scaled, side="left")
  q = q.astype(np.uint8)
  packed = (q[::2] << 4) | q[1::2]
  deq = (code[q].reshape(-1, block) * absmax[:, None]).reshape(a.shape)
  return packed, absmax, deq


class NF4MathTest(parameterized.TestCase):

  def test_code_table_is_the_normal_quantile_construction(self):
    # QLoRA §3 / App. E: 8 positive and 7 negative quantiles of N(0, 1)
    # (2^(k-1) + 1 and 2^(k-1) points sharing zero), normalised to [-1, 1].
    delta = 1 - (1 / 32 + 1 / 30) / 2
    inv = statistics.NormalDist().inv_cdf
    pos = [inv(p) for p in np.linspace(delta, 0.5, 9)[:-1]]
    neg = [-inv(p) for p in np.linspace(delta, 0.5, 8)[:-1]]
    table = np.sort(np.asarray(pos + neg + [0.0]))
    table /= table.max()
    np.testing.assert_allclose(nf4.NF4_CODE, table, atol=1e-6)
    self.assertEqual(nf4.NF4_CODE.shape, (16,))
    self.assertTrue(np.all(np.diff(nf4.NF4_CODE) > 0))
    self.assertEqual(nf4.NF4_CODE[7], 0.0)
    self.assertEqual((nf4.NF4_CODE[0], nf4.NF4_CODE[15]), (-1.0, 1.0))
    # The values QLoRA Appendix E prints (spot check, 8 digits).
    self.assertAlmostEqual(float(nf4.NF4_CODE[1]), -0.6961928, places=7)
    self.assertAlmostEqual(float(nf4.NF4_CODE[8]), 0.0795803, places=7)
    self.assertAlmostEqual(float(nf4.NF4_CODE[14]), 0.7229568, places=7)

  def test_packing_and_exactly_representable_values(self):
    w = jnp.asarray(nf4.NF4_CODE)  # One block whose absmax is 1.
    q = nf4.quantize_nf4(w, block_size=16, double_quant=False)
    want = [(2 * i << 4) | (2 * i + 1) for i in range(8)]  # High nibble 1st.
    np.testing.assert_array_equal(q.codes[0], np.asarray(want, np.uint8))
    np.testing.assert_array_equal(q.absmax, [1.0])
    np.testing.assert_array_equal(nf4.dequantize_nf4(q), w)

  def test_block_absmax_semantics_and_error_bound(self):
    w = _gauss((96, 80))  # 7680 = 120 blocks of 64.
    q = nf4.quantize_nf4(w, double_quant=False)
    wh = np.asarray(nf4.dequantize_nf4(q))
    blocks = w.reshape(-1, 64)
    absmax = np.abs(blocks).max(-1)
    np.testing.assert_array_equal(q.absmax, absmax)
    # The largest-magnitude element of each block maps to +-1: exact.
    hb = wh.reshape(-1, 64)
    arg = np.argmax(np.abs(blocks), -1)
    np.testing.assert_allclose(
        np.take_along_axis(hb, arg[:, None], 1),
        np.take_along_axis(blocks, arg[:, None], 1), rtol=1e-6)
    # Nearest code: error <= absmax * (largest half gap of the table).
    half_gap = float(np.max(np.diff(nf4.NF4_CODE)) / 2)
    self.assertTrue(np.all(
        np.abs(hb - blocks) <= absmax[:, None] * half_gap * (1 + 1e-6)))
    # Zeros stay zero.
    zeroed = w.copy()
    zeroed[:3] = 0.0
    z = np.asarray(nf4.dequantize_nf4(nf4.quantize_nf4(zeroed)))
    np.testing.assert_array_equal(z[:3], 0.0)
    self.assertLess(_rel(wh, w), 0.1)

  def test_double_quant_costs_little_precision(self):
    w = _gauss((256, 192))  # 768 blocks -> 3 double-quant blocks.
    plain = nf4.quantize_nf4(w, double_quant=False)
    dq = nf4.quantize_nf4(w)
    self.assertEqual(dq.absmax.dtype, jnp.uint8)
    self.assertEqual(dq.absmax_scale.shape, (3,))
    absmax = np.asarray(plain.absmax)
    np.testing.assert_allclose(dq.absmax_offset, absmax.mean(), rtol=1e-6)
    # bitsandbytes' scheme: centred absmax through the signed dynamic map.
    centred = adam8bit.dequantize(
        adam8bit.quantize(absmax - absmax.mean(), second_moment=False,
                          block_size=256),
        second_moment=False)
    got = np.asarray(nf4.nf4_absmax(dq))
    np.testing.assert_allclose(got, np.asarray(centred) + absmax.mean(),
                               rtol=1e-6)
    self.assertLess(float(np.max(np.abs(got - absmax) / absmax)), 0.01)
    e_plain = _rel(nf4.dequantize_nf4(plain), w)
    e_dq = _rel(nf4.dequantize_nf4(dq), w)
    self.assertLess(abs(e_dq - e_plain), 0.01 * e_plain)

  def test_nf4_beats_uniform_absmax_int4_on_normal_weights(self):
    # QLoRA's claim for normally distributed weights (same blocks, absmax).
    w = _gauss((256, 256))
    e_nf4 = _rel(nf4.dequantize_nf4(nf4.quantize_nf4(w, double_quant=False)),
                 w)
    b = w.reshape(-1, 64)
    a = np.abs(b).max(-1, keepdims=True)
    int4 = (np.round(b / a * 7) / 7 * a).reshape(w.shape)
    self.assertLess(e_nf4, 0.9 * _rel(int4, w))

  def test_exact_byte_counts(self):
    w = _gauss((512, 512))
    n = 512 * 512
    q = nf4.quantize_nf4(w)
    # codes n/2 + absmax codes n/64 + fp32 scale per 256 absmaxes + offset.
    self.assertEqual(nf4.nbytes(q), n // 2 + n // 64 + 4 * n // (64 * 256)
                     + 4)
    self.assertEqual(nf4.nbytes(q), 135236)
    self.assertAlmostEqual(nf4.bits_per_param(q), 4.127, delta=1e-3)
    self.assertEqual(nf4.nbytes(nf4.quantize_nf4(w, double_quant=False)),
                     n // 2 + 4 * n // 64)
    self.assertEqual(nf4.bits_per_param(nf4.quantize_int8(w)), 8.5)
    self.assertEqual(nf4.nbytes(nf4.quantize_int8(w, block_size=128)),
                     n + 4 * n // 128)

  def test_int8_error_bound(self):
    w = _gauss((64, 48))
    q = nf4.quantize_int8(w)
    self.assertEqual(q.codes.dtype, jnp.int8)
    codes = np.asarray(q.codes, np.int32)
    self.assertLessEqual(int(np.abs(codes).max()), 127)
    blocks = w.reshape(-1, 64)
    err = np.abs(np.asarray(nf4.dequantize_int8(q)).reshape(-1, 64) - blocks)
    self.assertTrue(np.all(
        err <= np.asarray(q.scale)[:, None] / 254 * (1 + 1e-5)))
    self.assertLess(_rel(nf4.dequantize_int8(q), w), 0.01)

  @parameterized.parameters("nf4", "int8")
  def test_padding_dtype_and_jit(self, scheme):
    w = _gauss((7, 13)).astype(jnp.bfloat16)  # 91 elements: 2 padded blocks.
    q = nf4.quantize(w, scheme)
    self.assertEqual(q.codes.shape[0], 2)
    wh = nf4.dequantize(q)
    self.assertEqual((wh.shape, wh.dtype), (w.shape, w.dtype))
    tol = 0.12 if scheme == "nf4" else 0.01
    self.assertLess(_rel(wh, w), tol)  # _rel computes in float64.
    jitted = jax.jit(lambda x: nf4.dequantize(nf4.quantize(x, scheme)))(w)
    np.testing.assert_array_equal(jitted, wh)

  def test_bad_arguments(self):
    w = _gauss((8, 8))
    with self.assertRaisesRegex(ValueError, "positive even int"):
      nf4.quantize_nf4(w, block_size=7)
    with self.assertRaisesRegex(ValueError, "dq_block_size"):
      nf4.quantize_nf4(w, dq_block_size=0)
    with self.assertRaisesRegex(ValueError, "non-empty float"):
      nf4.quantize_int8(np.arange(8))
    with self.assertRaisesRegex(ValueError, "Unknown quantisation scheme"):
      nf4.quantize(w, "fp4")
    with self.assertRaisesRegex(ValueError, "only block_size"):
      nf4.quantize(w, "int8", double_quant=False)


class QuantizedLayerTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(sharding.use_mesh(_one_device_mesh()))

  @parameterized.parameters("nf4", "int8")
  def test_forward_uses_dequantized_kernels_for_every_kind(self, scheme):
    model, ref = _toy(nnx.Rngs(0)), _toy(nnx.Rngs(0))
    quantized.quantize_base(model, "all-linear", scheme)
    for name in ("layers", "gen", "ein"):
      q_mods = model.layers if name == "layers" else [getattr(model, name)]
      r_mods = ref.layers if name == "layers" else [getattr(ref, name)]
      for q, r in zip(q_mods, r_mods):
        self.assertTrue(quantized.is_quantized(q))
        self.assertIsInstance(q, type(r))  # Subclass of the Flax class.
        r.kernel.set_value(q.dense_kernel())
    y = _forward(model, _IDS)
    np.testing.assert_allclose(y, _forward(ref, _IDS), atol=1e-5)
    # Eager too (the one eager forward of a quantized toy in this file).
    np.testing.assert_allclose(model(_IDS), y, atol=1e-5)
    # Quantized kernels are not parameters; biases still are.
    params = nnx.to_flat_state(nnx.state(model, nnx.Param))
    names = {"/".join(map(str, p)) for p, _ in params}
    self.assertNotIn("layers/0/kernel", names)
    self.assertIn("layers/0/bias", names)
    self.assertIn("emb/embedding", names)
    qstate = nnx.to_flat_state(nnx.state(model, quantized.QuantState))
    self.assertIn(("layers", 0, "kernel_codes"), [p for p, _ in qstate])

  def test_bad_targets(self):
    model = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, r"cannot be quantized: emb .Embed"):
      quantized.quantize_base(model, "emb")
    with self.assertRaisesRegex(ValueError, "matched no module.*layers.0"):
      quantized.quantize_base(model, "decoder")
    with self.assertRaisesRegex(ValueError, "Unknown quantisation scheme"):
      quantized.quantize_base(model, "gen", "fp8")
    quantized.quantize_base(model, "gen")
    with self.assertRaisesRegex(ValueError, "already quantized: nf4"):
      quantized.quantize_base(model, "gen")
    with self.assertRaisesRegex(ValueError, "shape"):
      model.gen.requantize(jnp.zeros((3, 3)))

  def test_torch_layout_gives_bitsandbytes_blocks(self):
    layer = nnx.Linear(96, 16, rngs=nnx.Rngs(0))  # torch weight [16, 96]
    w = layer.kernel.get_value()
    packed, absmax, deq = _bnb_nf4(np.asarray(w).T)
    torch_q = quantized.QuantizedLinear(layer, double_quant=False,
                                        layout="torch")
    np.testing.assert_array_equal(
        torch_q.kernel_codes.get_value().reshape(-1), packed)
    np.testing.assert_array_equal(torch_q.kernel_absmax.get_value(), absmax)
    np.testing.assert_array_equal(torch_q.dense_kernel(), deq.T)
    x = _gauss((2, 96), seed=3, scale=1.0)
    np.testing.assert_allclose(torch_q(x), x @ deq.T + layer.bias[...][None],
                               atol=1e-5)
    # lowrank's default blocks the [in, out] kernel: other blocks.
    kernel_q = quantized.QuantizedLinear(layer, double_quant=False)
    self.assertEqual(kernel_q.quant_layout, "kernel")
    self.assertFalse(np.array_equal(
        kernel_q.kernel_codes.get_value().reshape(-1), packed))

  def test_torch_layout_every_kind_and_requantize(self):
    model, ref = _toy(nnx.Rngs(0)), _toy(nnx.Rngs(0))
    quantized.quantize_base(model, _LINEAR, **presets.paper(
        "quantize_base"))
    # gen: kernel [64, 4, 16] (in, out, out); ein: its kernel's dims sorted
    # into output dims, then input dims.
    for name in ("gen", "ein"):
      q, r = getattr(model, name), getattr(ref, name)
      w = r.kernel.get_value()
      perm = q.quant_perm
      in_dims, out_dims = adapters.layers.kernel_dims(r)
      self.assertEqual(perm, tuple(out_dims) + tuple(in_dims))
      want = jnp.transpose(nf4.dequantize(nf4.quantize(
          jnp.transpose(w, perm), "nf4")), tuple(np.argsort(perm)))
      np.testing.assert_array_equal(q.dense_kernel(), want)
      self.assertEqual(q.quant_layout, "torch")
    w2 = _gauss(model.gen.quant_shape, seed=4)
    err = model.gen.requantize(w2)
    self.assertAlmostEqual(err, _rel(model.gen.dense_kernel(), w2), places=5)

  def test_bad_layout(self):
    with self.assertRaisesRegex(ValueError, "layout must be one of"):
      quantized.quantize_base(_toy(nnx.Rngs(0)), "gen", layout="out_in")
    general = nnx.LinearGeneral((2, 8), 4, axis=(1, 2), batch_axis={0: 2},
                                rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "layout='torch' needs the "
                                "kernel's input and output dims"):
      quantized.QuantizedLinearGeneral(general, layout="torch")

  def test_bfloat16_base_dequantizes_to_its_compute_dtype(self):
    layer = nnx.Linear(64, 32, dtype=jnp.bfloat16, param_dtype=jnp.bfloat16,
                       rngs=nnx.Rngs(0))
    model = testing.Mlp(nnx.Rngs(0), d=64, n=1)
    model.layers[0] = layer
    quantized.quantize_base(model, "all-linear")
    q = model.layers[0]
    self.assertEqual(q.kernel.dtype, jnp.bfloat16)
    self.assertEqual(q.kernel[...].dtype, jnp.bfloat16)
    x = jnp.ones((2, 64), jnp.bfloat16)
    self.assertEqual(_forward(q, x).dtype, jnp.bfloat16)
    adapters.inject(model, targets="all-linear", rank=2)
    testing.randomize_lora(model, scale=0.05)
    self.assertEqual(model.layers[0].lora_a.get_value().dtype, jnp.bfloat16)
    y = _forward(model.layers[0], x)
    self.assertEqual(y.dtype, jnp.bfloat16)
    errors = quantized.merge_quantized(model)
    self.assertLess(errors["layers.0"], 0.1)
    np.testing.assert_allclose(
        np.asarray(_forward(model.layers[0], x), np.float32),
        np.asarray(y, np.float32), atol=0.1)
    with self.assertRaisesRegex(ValueError, "exact Linear; got Einsum"):
      quantized.QuantizedLinear(_toy(nnx.Rngs(0)).ein)

  def test_base_weight_bytes_from_compiled_memory_analysis(self):
    x = jnp.ones((2, 512))

    def argument_bytes(model):
      graphdef, state = nnx.split(model)
      fn = lambda s: nnx.merge(graphdef, s)(x)
      compiled = jax.jit(fn).lower(state).compile()
      return compiled.memory_analysis().argument_size_in_bytes

    big = lambda: testing.Mlp(nnx.Rngs(0), d=512, n=4)
    bias = 4 * 512 * 4
    fp32 = argument_bytes(big())
    self.assertEqual(fp32, 4 * 512 * 512 * 4 + bias)
    q_nf4 = argument_bytes(
        quantized.quantize_base(big(), "all-linear", "nf4"))
    self.assertEqual(q_nf4, 4 * 135236 + bias)
    q_int8 = argument_bytes(
        quantized.quantize_base(big(), "all-linear", "int8"))
    self.assertEqual(q_int8, 4 * (512 * 512 + 4 * 512 * 512 // 64) + bias)
    # Measured: nf4 0.1307x, int8 0.2671x of the float32 base (biases kept).
    self.assertLessEqual(q_nf4 / fp32, 0.14)
    self.assertLessEqual(q_int8 / fp32, 0.27)
    self.assertLessEqual((q_nf4 - bias) / (fp32 - bias), 4.13 / 32)

  def test_backward_saves_codes_not_dense_kernels(self):
    model = quantized.quantize_base(testing.Mlp(nnx.Rngs(0), d=128, n=2),
                                    "all-linear")
    adapters.inject(model, targets="all-linear", rank=4)
    graphdef, lora, rest = nnx.split(model, nnx.LoRAParam, ...)
    x = jnp.ones((3, 128))
    # Jitted, as in training (the residuals are the jitted program's).
    loss = jax.jit(lambda p: jnp.sum(nnx.merge(graphdef, p, rest)(x)))
    _, vjp = jax.vjp(loss, lora)
    saved = {(r.shape, str(r.dtype)) for r in jax.tree.leaves(vjp)}
    self.assertNotIn(((128, 128), "float32"), saved)
    self.assertIn(((256, 32), "uint8"), saved)  # The packed codes.

  def test_fsdp_sharded_kernel_keeps_sharded_codes(self):
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)])
    with sharding.use_mesh(mesh):
      model = _toy(nnx.Rngs(0))
      quantized.quantize_base(model, _LINEAR)
      layer = model.layers[0]
      self.assertEqual(layer.kernel_codes.get_value().sharding.spec,
                       P("fsdp", None))
      self.assertEqual(layer.kernel_codes.get_metadata()["out_sharding"],
                       ("embed", None))
      self.assertEqual(layer.kernel.get_value().sharding.spec,
                       P("fsdp", "tensor"))
      # layout="torch" flattens the output dim first: blocks follow its
      # sharding (here "tensor").
      other = quantized.QuantizedLinear(_toy(nnx.Rngs(1)).layers[0],
                                        layout="torch")
      self.assertEqual(other.kernel_codes.get_value().sharding.spec,
                       P("tensor", None))
      # The rules give the codes the same placement.
      specs = sharding.state_shardings(
          nnx.state(model, quantized.QuantState), mesh)
      self.assertEqual(specs["layers"][0]["kernel_codes"].spec,
                       P("fsdp", None))
      adapters.inject(model, targets=_LINEAR, rank=2)
      a = model.layers[0].lora_a.get_value()
      self.assertEqual(a.sharding.spec, P("fsdp", None))
      y = _forward(model, _IDS)
    # The same values gathered on one device (setUp's mesh) give the same
    # output: the sharded program computes the right thing.
    graphdef, state = nnx.split(model)
    single = nnx.merge(graphdef, jax.device_put(state, jax.devices()[0]))
    np.testing.assert_allclose(y, _forward(single, _IDS), atol=1e-5)


class QLoRATest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(sharding.use_mesh(_one_device_mesh()))

  def test_identity_at_init_and_gradients_only_to_adapters(self):
    model = quantized.quantize_base(_toy(nnx.Rngs(0)), _LINEAR)
    y0 = _forward(model, _IDS)
    adapters.inject(model, targets=_LINEAR, rank=4, alpha=8)
    self.assertEqual(sorted(adapters.adapter_modules(model)),
                     ["ein", "gen", "layers.0", "layers.1"])
    np.testing.assert_array_equal(_forward(model, _IDS), y0)
    testing.randomize_lora(model, scale=0.05)
    flat = nnx.to_flat_state(_lora_grads(model, _IDS))
    self.assertEqual({p[-1] for p, _ in flat}, {"lora_a", "lora_b"})
    self.assertTrue(all(float(np.abs(np.asarray(v.get_value())).max()) > 0
                        for _, v in flat))

  @parameterized.parameters("nf4", "int8")
  def test_training_step_reduces_loss_and_leaves_codes(self, scheme):
    model = quantized.inject_quantized(
        _toy(nnx.Rngs(0)), targets=_LINEAR, scheme=scheme, rank=4)
    codes = model.gen.base.kernel_codes.get_value()
    target = _gauss((2, 6, 4, 16), seed=3, scale=1.0)
    losses = testing.train_lora(
        model, optax.adam(1e-2), lambda m: jnp.mean((m(_IDS) - target) ** 2),
        8)
    self.assertLess(losses[-1], 0.8 * losses[0])
    np.testing.assert_array_equal(model.gen.base.kernel_codes.get_value(),
                                  codes)

  def test_merge_quantized_reports_the_requantisation_error(self):
    model = quantized.quantize_base(_toy(nnx.Rngs(0)), _LINEAR)
    adapters.inject(model, targets=_LINEAR, rank=4)
    testing.randomize_lora(model, scale=0.05)
    y = _forward(model, _IDS)
    mods = adapters.adapter_modules(model)
    expect = {}
    for path, m in mods.items():
      delta = m._delta_kernel()  # pylint: disable=protected-access
      w = m.base.dense_kernel(jnp.float32) + delta
      w_hat = nf4.dequantize_nf4(nf4.quantize_nf4(w), jnp.float32)
      expect[path] = (_rel(w_hat, w), w_hat)
    with self.assertRaisesRegex(ValueError, "merge_quantized"):
      adapters.merge(model)
    self.assertFalse(any(m.merged for m in mods.values()))
    errors = quantized.merge_quantized(model)
    self.assertEqual(sorted(errors), sorted(expect))
    for path, m in mods.items():
      self.assertTrue(m.merged)
      self.assertAlmostEqual(errors[path], expect[path][0], delta=1e-6)
      self.assertGreater(errors[path], 0.0)
      np.testing.assert_allclose(m.base.dense_kernel(), expect[path][1],
                                 atol=1e-6)
    y_merged = _forward(model, _IDS)
    # Close to the adapted output, but not equal: the requantisation error.
    self.assertLess(_rel(y_merged, y), 3 * max(errors.values()))
    self.assertGreater(_rel(y_merged, y), 1e-4)
    self.assertEqual(quantized.merge_quantized(model), {})  # Already merged.
    back = quantized.unmerge_quantized(model)
    self.assertEqual(sorted(back), sorted(expect))
    self.assertFalse(any(m.merged for m in mods.values()))

  @parameterized.parameters("dora", "lora_xs")
  def test_other_methods_wrap_and_merge_into_a_quantized_base(self, method):
    model = quantized.quantize_base(testing.Mlp(nnx.Rngs(0), d=64, n=1),
                                    "all-linear")
    x = _gauss((4, 64), scale=1.0)
    y0 = _forward(model, x)
    adapters.inject(model, targets="all-linear", rank=4, method=method)
    np.testing.assert_allclose(_forward(model, x), y0, atol=1e-6)
    state = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(
        lambda a: a + _gauss(a.shape, seed=1, scale=0.05), state))
    y = _forward(model, x)
    self.assertGreater(_rel(y, y0), 1e-3)
    errors = quantized.merge_quantized(model)  # DoRA merges its own way.
    self.assertTrue(model.layers[0].merged)
    self.assertLess(_rel(_forward(model, x), y), 2 * errors["layers.0"])

  def test_merge_quantized_needs_a_quantized_base(self):
    model = _toy(nnx.Rngs(0))
    adapters.inject(model, targets=_LINEAR, rank=2)
    with self.assertRaisesRegex(ValueError, "no adapter on a quantized base"):
      quantized.merge_quantized(model)

  def test_quantize_base_under_existing_adapters(self):
    model = _toy(nnx.Rngs(0))
    adapters.inject(model, targets=_LINEAR, rank=2)
    testing.randomize_lora(model, scale=0.05)
    mods = adapters.adapter_modules(model)
    deltas = {p: m.delta_weight() for p, m in mods.items()}
    quantized.quantize_base(model, "all-linear", "int8")
    mods = adapters.adapter_modules(model)
    for path, m in mods.items():
      self.assertTrue(quantized.is_quantized(m.base))
      self.assertEqual(m.base.quant_scheme, "int8")
      np.testing.assert_array_equal(m.delta_weight(), deltas[path])
    with adapters.disabled(model):
      y_base = _forward(model, _IDS)
    self.assertGreater(float(np.abs(_forward(model, _IDS) - y_base).max()),
                       1e-4)
    with self.assertRaisesRegex(ValueError, "already quantized: int8"):
      quantized.quantize_base(model, ["gen"])
    merged = _toy(nnx.Rngs(0))
    adapters.inject(merged, targets="gen", rank=2)
    adapters.merge(merged)
    with self.assertRaisesRegex(ValueError, "unmerge first"):
      quantized.quantize_base(merged, "gen")


class LQLoRATest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(sharding.use_mesh(_one_device_mesh()))

  def _structured(self, shape=(128, 96), rank=4, seed=5):
    # A few large low-rank directions on top of small noise, as in
    # pretrained weights with outlier features.
    rng = np.random.default_rng(seed)
    normal = lambda s: rng.standard_normal(s, np.float32)
    low = normal((shape[0], rank)) @ normal((rank, shape[1]))
    return low * np.float32(0.05) + normal(shape) * np.float32(0.02)

  def _model_with(self, kernel):
    # No random init: the kernel is set right away.
    model = testing.Mlp(nnx.Rngs(0), d=kernel.shape[0], n=0)
    model.layers = nnx.List([nnx.Linear(
        kernel.shape[0], kernel.shape[1], rngs=nnx.Rngs(0),
        kernel_init=nnx.initializers.zeros_init())])
    model.layers[0].kernel.set_value(jnp.asarray(kernel))
    return model

  @parameterized.parameters(("nf4", False), ("int8", False), ("nf4", True))
  def test_lq_lora_beats_qlora_init(self, scheme, gaussian):
    w = _gauss((128, 96), seed=7) if gaussian else self._structured()
    plain = _rel(nf4.dequantize(nf4.quantize(w, scheme), jnp.float32), w)
    model = self._model_with(w)
    adapters.inject(model, targets="all-linear", rank=4, alpha=8,
                    init="lq_lora", init_data={"layers.0": {
                        "scheme": scheme, "iters": 5}})
    m = model.layers[0]
    self.assertEqual(m.init, "lq_lora")
    self.assertTrue(quantized.is_quantized(m.base))
    self.assertEqual(m.base.quant_scheme, scheme)
    effective = m.base.dense_kernel(jnp.float32) + m.delta_weight()
    err = _rel(effective, w)
    # Low-rank structure: LQ-LoRA removes it before quantizing.
    self.assertLess(err, (0.97 if gaussian else 0.5) * plain)
    x = _gauss((3, 128), seed=2, scale=1.0)
    np.testing.assert_allclose(
        _forward(model.layers[0], x),
        x @ np.asarray(effective) + np.asarray(m.base.bias.get_value()),
        atol=1e-4)

  def test_lq_decompose_best_iterate_or_the_official_early_stop(self):
    # lq_utils.lowrank_quantized_sparse_decomposition (exact SVD branch),
    # transcribed: stop at the first rise, return that iterate.
    w = np.asarray(self._structured((32, 32), rank=2, seed=3))
    roundtrip = jax.jit(lambda x: nf4.dequantize_nf4(nf4.quantize_nf4(x)))
    last, q = np.inf, np.zeros_like(w)
    for it in range(40):
      u, sv, vt = np.linalg.svd(w - q, full_matrices=False)
      l1 = (u * np.sqrt(sv)[None])[:, :2]
      l2 = (vt * np.sqrt(sv)[:, None])[:2]
      q = np.asarray(roundtrip(jnp.asarray(w - l1 @ l2)))
      error = np.linalg.norm(w - (l1 @ l2 + q))
      if error > last:
        break
      last = error
    self.assertLess(it, 39)  # The error rose: the rule was exercised.
    residual, g1, g2, errors = nf4.lq_decompose(w, 2, roundtrip, iters=40,
                                                early_stop=True)
    self.assertLen(errors, it + 1)
    np.testing.assert_allclose(g1 @ g2, l1 @ l2, atol=1e-4)
    np.testing.assert_allclose(roundtrip(residual), q, atol=1e-4)
    # The returned iterate is the worse one; the default keeps the best.
    self.assertGreater(errors[-1], min(errors))
    residual, b1, b2, best = nf4.lq_decompose(w, 2, roundtrip, iters=it + 1)
    self.assertLen(best, it + 1)
    self.assertEqual((b1.shape, b2.shape), ((32, 2), (2, 32)))
    np.testing.assert_allclose(residual, w - b1 @ b2, atol=1e-5)
    self.assertAlmostEqual(_rel(roundtrip(residual) + b1 @ b2, w),
                           min(best), delta=1e-5)
    self.assertLess(min(best), errors[-1] - 1e-6)
    with self.assertRaisesRegex(ValueError, "rank must be"):
      nf4.lq_decompose(w, 0, roundtrip)
    with self.assertRaisesRegex(ValueError, "2-D"):
      nf4.lq_decompose(w[None], 2, roundtrip)

  def test_paper_preset_is_the_official_decomposition(self):
    # The official code on torch's [out, in] weight A: svd_lowrank(A - Q,
    # r + 10) (niter 2, A is wide so torch sketches Aᵀ with R: [out, q]),
    # the blockwise NF4 of A - L1 L2 in [out, in] order, early stop.
    w = np.asarray(self._structured((48, 40), rank=2))  # Flax [in, out]
    model = self._model_with(jnp.asarray(w))
    adapters.inject(model, targets="layers.0", rank=2, alpha=4)
    m = model.layers[0]
    kw = presets.paper("lq_lora_init")
    self.assertEqual(kw["oversample"], 10)
    key = jax.random.key(9)
    errors = quantized.lq_lora_init(m, double_quant=False, key=key,
                                    **{**kw, "iters": 3})
    a = w.T
    q = np.zeros_like(a)
    for t in range(3):
      r = np.asarray(jax.random.normal(jax.random.fold_in(key, t), (40, 12)))
      x = a - q
      basis = np.linalg.qr(x.T @ r)[0]
      for _ in range(2):
        basis = np.linalg.qr(x.T @ np.linalg.qr(x @ basis)[0])[0]
      u, sv, vh = np.linalg.svd(x @ basis, full_matrices=False)
      l1 = (u * np.sqrt(sv))[:, :2]
      l2 = ((basis @ vh.T) * np.sqrt(sv)).T[:2]
      q = _bnb_nf4(a - l1 @ l2)[2]
    self.assertLen(errors, 3)  # No rise in 3 iterations on this weight.
    np.testing.assert_allclose(m.delta_weight(), (l1 @ l2).T, atol=2e-4)
    np.testing.assert_allclose(m.base.dense_kernel(), q.T, atol=2e-3)
    self.assertEqual(m.base.quant_layout, "torch")
    # The whole preset through inject(quantize_base=...) (lq_ names).
    small = self._model_with(jnp.asarray(w[:16, :8]))
    adapters.inject(small, targets="layers.0", rank=2, init="lq_lora",
                    quantize_base="nf4", layout=kw["layout"],
                    **{"lq_" + k: kw[k] for k in ("iters", "early_stop",
                                                  "oversample")})
    self.assertEqual(small.layers[0].base.quant_layout, "torch")
    self.assertEqual(small.layers[0].init, "lq_lora")

  def test_inject_quantized_lq_lora_every_kind(self):
    model = quantized.inject_quantized(
        _toy(nnx.Rngs(0)), targets=_LINEAR, init="lq_lora", rank=4,
        lq_iters=2)
    mods = adapters.adapter_modules(model)
    self.assertEqual(sorted(mods), ["ein", "gen", "layers.0", "layers.1"])
    for m in mods.values():
      self.assertEqual(m.init, "lq_lora")
      self.assertTrue(quantized.is_quantized(m.base))
    y_ref = _forward(_toy(nnx.Rngs(0)), _IDS)
    y = _forward(model, _IDS)
    with adapters.disabled(model):
      y_base = _forward(model, _IDS)
    self.assertGreater(float(np.abs(y - y_base).max()), 1e-4)
    # Base + adapter is closer to the full-precision model than Q(W).
    plain = quantized.quantize_base(_toy(nnx.Rngs(0)), _LINEAR)
    self.assertLess(_rel(y, y_ref), _rel(_forward(plain, _IDS), y_ref))

  def test_lq_lora_errors(self):
    model = quantized.quantize_base(_toy(nnx.Rngs(0)), _LINEAR)
    with self.assertRaisesRegex(ValueError, "needs the full-precision"):
      adapters.inject(model, targets="gen", rank=2, init="lq_lora")
    model = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "Unknown init_data option"):
      adapters.inject(model, targets="gen", rank=2, init="lq_lora",
                      init_data={"gen": {"bits": 3}})
    with self.assertRaisesRegex(ValueError, "Unknown quantisation scheme"):
      quantized.inject_quantized(_toy(nnx.Rngs(0)), targets="gen", rank=2,
                                 init="lq_lora", scheme="fp4")
    with self.assertRaisesRegex(ValueError, "oversample must be None"):
      quantized.inject_quantized(_toy(nnx.Rngs(0)), targets="gen", rank=2,
                                 init="lq_lora", lq_oversample=-1)
    with self.assertRaisesRegex(ValueError, "layout must be one of"):
      quantized.inject_quantized(_toy(nnx.Rngs(0)), targets="gen", rank=2,
                                 init="lq_lora", layout="torch_layout")


if __name__ == "__main__":
  absltest.main()
