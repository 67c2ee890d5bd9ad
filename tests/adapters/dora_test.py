"""Tests for DoRA (`lowrank.adapters.dora`), incl. parity with HF PEFT."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank import adapters
from lowrank import presets
from lowrank import sharding
from lowrank import train
from lowrank.adapters import dora
from lowrank.adapters import layers

from tests import testing

_D = 12
_X = jax.random.normal(jax.random.key(7), (2, 5, _D))
_TARGETS = ["lin", "gen", "ein"]


def _toy(rngs):
  """Linear (with bias), LinearGeneral and a permuting Einsum with bias."""
  return testing.PermutingToy(rngs, _D,
                              bias_init=nnx.initializers.normal(0.5))


def _model(**kw):
  with sharding.use_mesh():
    model = _toy(nnx.Rngs(0))
    y0 = model(_X)
    adapters.inject(model, targets=_TARGETS, method="dora", **kw)
  return model, y0


def _perturb(model, seed=1):
  """Random B and a magnitude off the column norms, so DoRA is not a no-op."""
  for i, m in enumerate(adapters.adapter_modules(model).values()):
    key = jax.random.fold_in(jax.random.key(seed), i)
    b = m.lora_b.get_value()
    m.lora_b.set_value(jax.device_put(
        jax.random.normal(key, b.shape, b.dtype) * 0.3, b.sharding))
    mag = m.magnitude.get_value()
    factor = jax.random.uniform(jax.random.fold_in(key, 1), mag.shape,
                                mag.dtype, 0.5, 1.5)
    m.magnitude.set_value(jax.device_put(mag * factor, mag.sharding))


def _dense_reference(m, x2):
  """`x2 · m ⊙ (W + sAB) / ‖W + sAB‖_c` from dense matrices (no bias)."""
  w = m.kernel_2d()
  a, b = m.peft_factors()
  v = w + m.scale * a @ b
  mag = m.magnitude[...].reshape(-1)
  return x2 @ (v * (mag / jnp.linalg.norm(v, axis=0))[None, :])


class DoraTest(parameterized.TestCase):

  def test_column_norm_matches_dense_and_never_forms_full_matrix(self):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w = jax.random.normal(k1, (64, 48))
    a = jax.random.normal(k2, (64, 4))
    b = jax.random.normal(k3, (4, 48))
    np.testing.assert_allclose(
        dora.column_norm(w, a, b, 0.7),
        jnp.linalg.norm(w + 0.7 * a @ b, axis=0), rtol=1e-5)
    jaxpr = jax.make_jaxpr(dora.column_norm, static_argnums=3)(w, a, b, 0.7)
    shapes = {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars}
    self.assertNotIn((64, 48), shapes)
    self.assertNotIn((48, 64), shapes)

  def test_train_step_has_no_kernel_sized_intermediate(self):
    model = nnx.Linear(64, 48, rngs=nnx.Rngs(0))
    wrapped = dora.DoRA(model, rank=4, rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(wrapped, nnx.LoRAParam, ...)
    x = jnp.ones((8, 64))

    def loss(params):
      return jnp.sum(nnx.merge(graphdef, params, rest)(x) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    shapes = {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars}
    self.assertNotIn((64, 48), shapes)
    self.assertNotIn((48, 64), shapes)

  def test_identity_at_init_for_every_kind(self):
    model, y0 = _model(rank=2, alpha=4)
    self.assertEqual(sorted(adapters.adapter_modules(model)), sorted(_TARGETS))
    np.testing.assert_allclose(model(_X), y0, atol=1e-6)
    for m in adapters.adapter_modules(model).values():
      np.testing.assert_allclose(
          m.magnitude[...].reshape(-1),
          jnp.linalg.norm(m.kernel_2d(), axis=0), rtol=1e-6)
    _perturb(model)
    self.assertGreater(float(jnp.abs(model(_X) - y0).max()), 1e-2)

  def test_each_kind_matches_dense_reference_and_keeps_bias(self):
    model, _ = _model(rank=3, alpha=5)
    _perturb(model)
    h = jnp.tanh(model.lin(_X))
    for name, inp in (("lin", _X), ("gen", h), ("ein", h)):
      m = adapters.adapter_modules(model)[name]
      with adapters.disabled(model):
        y_base = m(inp)
      zero = jnp.zeros_like(inp)
      with adapters.disabled(model):
        bias_out = m(zero)
      y = m(inp)
      # pylint: disable=protected-access
      x2, batch = m._to_2d(inp)
      ref = m._from_2d(_dense_reference(m, x2), batch)
      np.testing.assert_allclose(y - bias_out, ref, atol=1e-5)
      # The bias is added once, unscaled by the magnitude.
      self.assertGreater(float(jnp.abs(bias_out).max()), 1e-2)
      self.assertEqual(y.shape, y_base.shape)
      # adapter_out is the full effective contribution.
      np.testing.assert_allclose(
          m._from_2d(m.adapter_out(x2), batch), y - y_base, atol=1e-5)
      # pylint: enable=protected-access

  def test_merge_unmerge_roundtrip(self):
    model, _ = _model(rank=2, alpha=4)
    _perturb(model)
    kernels = {p: m.base.kernel[...]
               for p, m in adapters.adapter_modules(model).items()}
    y = model(_X)
    deltas = {p: m.delta_weight()
              for p, m in adapters.adapter_modules(model).items()}
    adapters.merge(model)
    np.testing.assert_allclose(model(_X), y, atol=1e-5)
    for p, m in adapters.adapter_modules(model).items():
      self.assertTrue(m.merged)
      # The merged kernel is W + delta_weight(), and its column norms are m.
      w2 = layers.kernel_to_2d(
          kernels[p], m.in_dims, m.out_dims)
      np.testing.assert_allclose(m.kernel_2d(), w2 + deltas[p], atol=1e-6)
      np.testing.assert_allclose(
          jnp.linalg.norm(m.kernel_2d(), axis=0),
          jnp.abs(m.magnitude[...].reshape(-1)), rtol=1e-5)
    adapters.merge(model)  # idempotent
    adapters.unmerge(model)
    for p, m in adapters.adapter_modules(model).items():
      np.testing.assert_allclose(m.base.kernel[...], kernels[p], atol=1e-6)
      np.testing.assert_array_equal(m.merge_norm[...], 1.0)
    np.testing.assert_allclose(model(_X), y, atol=1e-5)
    adapters.unload(model)
    self.assertEmpty(adapters.adapter_modules(model))
    np.testing.assert_allclose(model(_X), y, atol=1e-5)

  def test_gradients_reach_exactly_a_b_and_magnitude(self):
    model, _ = _model(rank=2, alpha=4)
    _perturb(model)
    diff = nnx.DiffState(0, nnx.LoRAParam)
    grads = nnx.grad(lambda m: jnp.mean(jnp.sin(m(_X))), argnums=diff)(model)
    flat = {tuple(str(k) for k in p): v
            for p, v in nnx.to_flat_state(grads)}
    names = {p for p in flat}
    want = {(t, n) for t in _TARGETS for n in ("lora_a", "lora_b", "magnitude")}
    self.assertEqual(names, want)
    for p, v in flat.items():
      self.assertIsInstance(v, nnx.LoRAParam)
      self.assertGreater(float(jnp.abs(v[...]).max()), 0.0, p)
    counts = adapters.count_parameters(model)
    self.assertEqual(
        counts["trainable"],
        dora.trainable_parameters(_D, _D, 2)
        + 2 * dora.trainable_parameters(_D, 6, 2))
    for m in adapters.adapter_modules(model).values():
      self.assertEqual(m.num_trainable(),
                       dora.trainable_parameters(m.d_in, m.d_out, 2))

  def test_jit_adamw_training_reduces_loss(self):
    model, _ = _model(rank=2, alpha=4)
    target = jnp.cos(_X.sum(-1))[..., None] * jnp.ones((1, 1, 6))
    base_kernel = model.lin.base.kernel[...]
    losses = testing.train_lora(
        model, optax.adamw(3e-2), lambda m: jnp.mean((m(_X) - target) ** 2),
        20)
    self.assertLess(losses[-1], 0.7 * losses[0])
    np.testing.assert_array_equal(model.lin.base.kernel[...], base_kernel)

  def test_dropout_uses_dropped_input_for_the_base_term(self):
    model, y0 = _model(rank=2, alpha=4, dropout=0.5)
    model.eval()
    np.testing.assert_allclose(model(_X), y0, atol=1e-6)
    _perturb(model)
    y_eval = model(_X)
    model.train()
    y_train = model(_X)
    self.assertGreater(float(jnp.abs(y_train - y_eval).max()), 1e-3)
    # With m = ‖W+ΔW‖ (g = 1) and B = 0 the dropped branch vanishes even in
    # training mode: (g - 1)·(x_d W) + g·s·(x_d A) B = 0.
    model2, y02 = _model(rank=2, alpha=4, dropout=0.5)
    model2.train()
    np.testing.assert_allclose(model2(_X), y02, atol=1e-6)

  def test_save_and_load_adapter_roundtrip(self):
    model, _ = _model(rank=2, alpha=4)
    _perturb(model)
    y = model(_X)
    for m in adapters.adapter_modules(model).values():
      self.assertEqual(m.options(), {})
    directory = self.create_tempdir().full_path
    adapters.save_adapters(directory, model)
    with sharding.use_mesh():
      fresh = _toy(nnx.Rngs(0))
      adapters.load_adapters(directory, fresh, rngs=5)
    self.assertEqual(
        {m.method for m in adapters.adapter_modules(fresh).values()},
        {"dora"})
    np.testing.assert_allclose(fresh(_X), y, atol=1e-6)

  def test_reset_magnitude(self):
    model, _ = _model(rank=2, alpha=4)
    _perturb(model)
    m = model.lin
    m.reset_magnitude()
    np.testing.assert_allclose(m.magnitude_scale(), 1.0, rtol=1e-6)
    m.merge()
    with self.assertRaisesRegex(ValueError, "unmerged"):
      m.reset_magnitude()

  def test_bad_options(self):
    with sharding.use_mesh():
      with self.assertRaisesRegex(ValueError, "Unknown option.*'dora'"):
        adapters.inject(_toy(nnx.Rngs(0)), targets="lin", method="dora",
                        rank=2, bogus=1)
      with self.assertRaisesRegex(ValueError, "cannot adapt"):
        model = nnx.Sequential(nnx.Embed(10, 4, rngs=nnx.Rngs(0)))
        adapters.inject(model, targets="layers.0", method="dora", rank=2)


class PaperPresetTest(parameterized.TestCase):

  @parameterized.parameters("lora", "dora")
  def test_peft_default_alpha(self, method):
    """`preset="paper"`: PEFT's `lora_alpha=8`, so the scale is `8 / r`."""
    self.assertEqual(presets.paper(method), {"alpha": 8})
    with sharding.use_mesh():
      model = _toy(nnx.Rngs(0))
      y0 = model(_X)
      train.inject_from_config(model, {"method": method, "preset": "paper",
                                       "targets": ["lin"], "rank": 4})
    m = adapters.adapter_modules(model)["lin"]
    self.assertEqual(m.method, method)
    self.assertEqual(m.scale, 2.0)
    np.testing.assert_allclose(model(_X), y0, atol=1e-6)


@pytest.mark.oracle
class DoraPeftParityTest(absltest.TestCase):
  """Same weights into PEFT `LoraConfig(use_dora=True)` and into `dora`."""

  def test_outputs_gradients_and_merge_match_peft(self):
    torch, peft, net = testing.torch_linear_under_peft(10, 7)
    w = net.lin.weight.detach().numpy().copy()
    bias = net.lin.bias.detach().numpy().copy()
    pm = peft.get_peft_model(net, peft.LoraConfig(
        r=3, lora_alpha=5, target_modules=["lin"], use_dora=True))
    lin = pm.base_model.model.lin
    with torch.no_grad():
      lin.lora_B["default"].weight.normal_(0, 0.3)
      lin.lora_magnitude_vector["default"].weight.mul_(
          torch.linspace(0.5, 1.5, 7))
    a_t = lin.lora_A["default"].weight
    b_t = lin.lora_B["default"].weight
    m_t = lin.lora_magnitude_vector["default"].weight
    rs = np.random.RandomState(0)
    x = rs.randn(3, 4, 10).astype(np.float32)
    g_out = rs.randn(3, 4, 7).astype(np.float32)
    y_t = pm(torch.tensor(x))
    (y_t * torch.tensor(g_out)).sum().backward()

    jlin = nnx.Linear(10, 7, rngs=nnx.Rngs(0))
    jlin.kernel.set_value(jnp.asarray(w.T))
    jlin.bias.set_value(jnp.asarray(bias))
    ours = dora.DoRA(jlin, rank=3, alpha=5, rngs=nnx.Rngs(0))
    # PEFT's magnitude at init is ‖W‖ per output unit, as ours.
    np.testing.assert_allclose(
        ours.magnitude[...],
        np.linalg.norm(w, axis=1), rtol=1e-6)
    ours.lora_a.set_value(jnp.asarray(a_t.detach().numpy().T))
    ours.lora_b.set_value(jnp.asarray(b_t.detach().numpy().T))
    ours.magnitude.set_value(jnp.asarray(m_t.detach().numpy()))
    y = ours(jnp.asarray(x))
    np.testing.assert_allclose(y, y_t.detach().numpy(), atol=1e-5)
    diff = nnx.DiffState(0, nnx.LoRAParam)
    grads = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(x)) * g_out),
                     argnums=diff)(ours)
    np.testing.assert_allclose(grads["lora_a"][...].T, a_t.grad.numpy(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["lora_b"][...].T, b_t.grad.numpy(),
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(grads["magnitude"][...], m_t.grad.numpy(),
                               rtol=1e-4, atol=1e-5)
    pm.merge_adapter()
    ours.merge()
    np.testing.assert_allclose(
        ours.base.kernel[...].T,
        lin.base_layer.weight.detach().numpy(), atol=1e-6)
    pm.unmerge_adapter()
    ours.unmerge()
    np.testing.assert_allclose(ours.base.kernel[...].T, w, atol=1e-6)
    np.testing.assert_allclose(
        lin.base_layer.weight.detach().numpy(), w, atol=1e-6)


if __name__ == "__main__":
  absltest.main()
