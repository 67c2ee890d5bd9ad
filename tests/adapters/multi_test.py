"""Tests for named adapters on one model (`lowrank.adapters.multi`)."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import adapters
from lowrank import sharding
from lowrank.adapters import merging
from lowrank.adapters import multi

from tests import testing


def _toy(rngs):
  """Linear, LinearGeneral and Einsum layers; rows on axis 0 everywhere."""
  return testing.KindsToy(rngs)


_X = jax.random.normal(jax.random.key(7), (5, 3, 16))
_ALL = r"layers\.\d|gen|ein"


def _randomize(model, seed=1, scale=0.3):
  """Non-zero B for every slot (ranks kept: padded rows stay zero)."""
  for i, m in enumerate(multi.multi_modules(model).values()):
    b = m.lora_b.get_value()
    noise = jax.random.normal(jax.random.fold_in(jax.random.key(seed), i),
                              b.shape, b.dtype) * scale
    mask = np.zeros(b.shape, bool)
    for s, r in enumerate(m.ranks):
      mask[s, :r] = True
    m.lora_b.set_value(jnp.where(mask, noise, 0).astype(b.dtype))


def _two_adapters(seed=0):
  model = _toy(nnx.Rngs(seed))
  multi.add_adapter(model, "a", targets=_ALL, rank=4, alpha=8, rngs=1)
  multi.add_adapter(model, "b", targets=[r"layers.1", "ein"], rank=2, rngs=2)
  _randomize(model)
  return model


def _reference(name_factors, seed=0):
  """A fresh base model with plain LoRA holding the given factors."""
  ref = _toy(nnx.Rngs(seed))
  rank = next(iter(name_factors.values()))[0].shape[1]
  adapters.inject(ref, targets=list(name_factors), rank=rank)
  merging.set_lora_factors(ref, name_factors)
  return ref


class MultiAdapterTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(sharding.use_mesh())

  def test_names_shapes_and_padding(self):
    model = _two_adapters()
    self.assertEqual(multi.adapter_names(model), ("a", "b"))
    self.assertEqual(multi.active_adapter(model), "a")
    mods = multi.multi_modules(model)
    self.assertEqual(set(mods), {"layers.0", "layers.1", "gen", "ein"})
    m = mods["layers.1"]
    self.assertEqual(m.lora_a.get_value().shape, (2, 16, 4))
    self.assertEqual(m.lora_b.get_value().shape, (2, 4, 16))
    self.assertEqual(m.ranks, (4, 2))
    np.testing.assert_allclose(m.scales.get_value(), [2.0, 1.0])
    # Rank-2 adapter "b" is zero-padded to r_max = 4.
    np.testing.assert_array_equal(m.lora_a.get_value()[1, :, 2:], 0)
    # "b" does not target layers.0 / gen: zero slots of rank 0.
    self.assertEqual(mods["gen"].ranks, (4, 0))
    np.testing.assert_array_equal(mods["gen"].lora_a.get_value()[1], 0)
    self.assertEqual(mods["gen"].lora_a.get_value().shape, (2, 16, 4))
    self.assertEqual(mods["gen"].lora_b.get_value().shape, (2, 4, 4, 4))

  def test_fresh_adapter_is_identity(self):
    base = _toy(nnx.Rngs(0))
    want = base(_X)
    multi.add_adapter(base, "a", targets="all-linear", rank=4)
    np.testing.assert_allclose(base(_X), want, rtol=1e-6, atol=1e-6)

  @parameterized.parameters("a", "b")
  def test_each_adapter_equals_plain_lora(self, name):
    model = _two_adapters()
    multi.set_active(model, name)
    ref = _reference(merging.lora_factors(model, adapter=name))
    np.testing.assert_allclose(model(_X), ref(_X), rtol=1e-5, atol=1e-5)
    self.assertGreater(
        float(jnp.max(jnp.abs(model(_X) - _toy(nnx.Rngs(0))(_X)))), 1e-2
    )

  def test_none_and_disable_give_base(self):
    model = _two_adapters()
    want = _toy(nnx.Rngs(0))(_X)
    multi.set_active(model, None)
    self.assertIsNone(multi.active_adapter(model))
    np.testing.assert_allclose(model(_X), want, rtol=1e-6, atol=1e-6)
    multi.set_active(model, "b")
    with multi.disabled(model):
      np.testing.assert_allclose(model(_X), want, rtol=1e-6, atol=1e-6)
    self.assertGreater(float(jnp.max(jnp.abs(model(_X) - want))), 1e-2)
    multi.disable(model)
    np.testing.assert_allclose(model(_X), want, rtol=1e-6, atol=1e-6)
    multi.enable(model)
    self.assertGreater(float(jnp.max(jnp.abs(model(_X) - want))), 1e-2)
    # The generic adapters.disabled context works too.
    with adapters.disabled(model):
      np.testing.assert_allclose(model(_X), want, rtol=1e-6, atol=1e-6)

  def test_switching_under_jit_does_not_retrace(self):
    model = _two_adapters()
    traces = []

    @nnx.jit
    def f(model, x):
      traces.append(1)
      return model(x)

    outs = {}
    for name in ("a", "b", None, "a"):
      multi.set_active(model, name)
      outs[name] = f(model, _X)
    multi.disable(model)
    off = f(model, _X)
    multi.enable(model)
    self.assertLen(traces, 1)
    np.testing.assert_allclose(off, outs[None], rtol=1e-6, atol=1e-6)
    for name in ("a", "b"):
      multi.set_active(model, name)
      np.testing.assert_allclose(outs[name], model(_X), rtol=1e-5,
                                 atol=1e-5)
    self.assertGreater(float(jnp.max(jnp.abs(outs["a"] - outs["b"]))), 1e-2)

  def _per_row(self, model, ids):
    rows = []
    names = multi.adapter_names(model)
    for i, a in enumerate(ids):
      multi.set_active(model, None if a < 0 else names[a])
      rows.append(model(_X[i:i + 1]))
    return jnp.concatenate(rows)

  def test_mixed_batch_equals_rows_alone(self):
    model = _two_adapters()
    ids = [0, 1, -1, 1, 0]
    want = self._per_row(model, ids)
    multi.set_active(model, "a")
    with multi.adapter_ids(model, jnp.asarray(ids)):
      got = model(_X)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    # Names work too, and the context restores the single-adapter mode.
    with multi.adapter_ids(model, ["a", "b", None, "b", "a"]):
      np.testing.assert_allclose(model(_X), want, rtol=1e-5, atol=1e-5)
    multi.set_active(model, "b")
    np.testing.assert_allclose(model(_X)[1], want[1], rtol=1e-5, atol=1e-5)

  def test_mixed_batch_under_nnx_jit(self):
    model = _two_adapters()
    ids = jnp.asarray([1, 0, 0, -1, 1])
    want = self._per_row(model, list(np.asarray(ids)))
    traces = []

    @nnx.jit
    def inside(model, x, ids):
      traces.append(1)
      with multi.adapter_ids(model, ids):
        return model(x)

    @nnx.jit
    def plain(model, x):
      return model(x)

    np.testing.assert_allclose(inside(model, _X, ids), want, rtol=1e-5,
                               atol=1e-5)
    other = jnp.asarray([0, 0, 1, 1, -1])
    np.testing.assert_allclose(
        inside(model, _X, other), self._per_row(model, [0, 0, 1, 1, -1]),
        rtol=1e-5, atol=1e-5)
    self.assertLen(traces, 1)
    # No ids leak out of the jitted context.
    for m in multi.multi_modules(model).values():
      self.assertEqual(m.row_ids.get_value().shape, (0,))
    with multi.adapter_ids(model, ids):
      got = plain(model, _X)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

  def test_mixed_batch_uses_gather_not_a_loop(self):
    model = _two_adapters()
    with multi.adapter_ids(model, jnp.asarray([0, 1, 0, 1, 0])):
      jaxpr = jax.make_jaxpr(lambda x: model(x))(_X)
    shapes = [tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns
              for v in e.outvars]
    self.assertIn((5, 16, 4), shapes)  # A[ids] for a 16-in layer.
    dots = [e for e in jaxpr.jaxpr.eqns if e.primitive.name == "dot_general"]
    # Base matmul + two batched adapter matmuls per layer, 4 layers.
    self.assertLen(dots, 12)

  def test_delete_adapter(self):
    model = _two_adapters()
    multi.set_active(model, "b")
    want_b = model(_X)
    multi.delete_adapter(model, "a")
    self.assertEqual(multi.adapter_names(model), ("b",))
    self.assertEqual(multi.active_adapter(model), "b")
    # Layers only "a" adapted are plain layers again.
    self.assertEqual(set(multi.multi_modules(model)), {"layers.1", "ein"})
    self.assertIsInstance(model.layers[0], nnx.Linear)
    np.testing.assert_allclose(model(_X), want_b, rtol=1e-5, atol=1e-5)
    multi.delete_adapter(model, "b")
    self.assertEqual(multi.adapter_names(model), ())
    self.assertEmpty(adapters.adapter_modules(model))
    np.testing.assert_allclose(model(_X), _toy(nnx.Rngs(0))(_X), rtol=1e-6,
                               atol=1e-6)

  def test_delete_active_switches_to_base(self):
    model = _two_adapters()
    multi.set_active(model, "a")
    multi.delete_adapter(model, "a")
    self.assertIsNone(multi.active_adapter(model))

  def test_from_lora_and_import_factors(self):
    lora_model = _toy(nnx.Rngs(0))
    adapters.inject(lora_model, targets=_ALL, rank=3, alpha=6, rngs=4)
    for i, m in enumerate(adapters.adapter_modules(lora_model).values()):
      b = m.lora_b.get_value()
      m.lora_b.set_value(jax.random.normal(jax.random.key(i), b.shape) * .3)
    want = lora_model(_X)
    factors = merging.lora_factors(lora_model)
    multi.from_lora(lora_model, "imported")
    self.assertEqual(multi.adapter_names(lora_model), ("imported",))
    np.testing.assert_allclose(lora_model(_X), want, rtol=1e-5, atol=1e-5)
    # Import into a model that already has named adapters.
    model = _two_adapters()
    multi.add_adapter(model, "c", factors=factors)
    self.assertEqual(multi.active_adapter(model), "a")
    multi.set_active(model, "c")
    np.testing.assert_allclose(model(_X), want, rtol=1e-5, atol=1e-5)
    self.assertEqual(multi.multi_modules(model)["gen"].lora_a.get_value()
                     .shape, (3, 16, 4))

  def test_merge_unmerge_active(self):
    model = _two_adapters()
    multi.set_active(model, "b")
    want = model(_X)
    kernel = model.ein.base.kernel.get_value()
    adapters.merge(model)
    np.testing.assert_allclose(model(_X), want, rtol=1e-5, atol=1e-5)
    with self.assertRaisesRegex(ValueError, "merged"):
      multi.set_active(model, "a")
    with self.assertRaisesRegex(ValueError, "merged"):
      with multi.adapter_ids(model, [0, 1, 0, 1, 0]):
        pass
    adapters.unmerge(model)
    np.testing.assert_allclose(model.ein.base.kernel.get_value(), kernel,
                               rtol=1e-6, atol=1e-6)

  def test_train_active_adapter_only(self):
    model = _two_adapters()
    multi.set_active(model, "b")
    before = {p: (m.lora_a.get_value(), m.lora_b.get_value())
              for p, m in multi.multi_modules(model).items()}
    target = jax.random.normal(jax.random.key(3), (5, 3, 4, 4))
    losses = testing.train_lora(
        model, optax.adam(1e-2), lambda m: jnp.mean((m(_X) - target) ** 2), 5)
    self.assertLess(losses[-1], losses[0])
    for p, m in multi.multi_modules(model).items():
      a0, b0 = before[p]
      a1, b1 = m.lora_a.get_value(), m.lora_b.get_value()
      np.testing.assert_array_equal(a1[0], a0[0])  # "a" untouched.
      np.testing.assert_array_equal(b1[0], b0[0])
      np.testing.assert_array_equal(a1[1, ..., 2:], 0)  # Padding stays 0.
      if m.ranks[1]:
        self.assertFalse(np.array_equal(b1[1], b0[1]))

  def test_rebuild_from_options(self):
    model = _two_adapters()
    m = multi.multi_modules(model)["ein"]
    rebuilt = multi.MultiLoRA(m.base, rank=m.rank, alpha=m.alpha,
                              rngs=nnx.Rngs(9), **m.options())
    rebuilt.lora_a.set_value(m.lora_a.get_value())
    rebuilt.lora_b.set_value(m.lora_b.get_value())
    np.testing.assert_allclose(rebuilt.scales.get_value(),
                               m.scales.get_value())
    x = _X
    np.testing.assert_allclose(rebuilt(x), m(x), rtol=1e-6, atol=1e-6)

  def test_inject_method_multi_lora(self):
    model = _toy(nnx.Rngs(0))
    adapters.inject(model, targets=_ALL, method="multi_lora", rank=4,
                    alpha=8)
    self.assertEqual(multi.adapter_names(model), ("default",))
    multi.add_adapter(model, "other", targets="all-linear", rank=2)
    self.assertEqual(multi.adapter_names(model), ("default", "other"))

  def test_errors(self):
    model = _two_adapters()
    with self.assertRaisesRegex(ValueError, "already exists"):
      multi.add_adapter(model, "a", targets=_ALL, rank=2)
    with self.assertRaisesRegex(ValueError, "No adapter named"):
      multi.set_active(model, "zzz")
    with self.assertRaisesRegex(ValueError, "matched no module"):
      multi.add_adapter(model, "c", targets="nothing", rank=2)
    with self.assertRaisesRegex(ValueError, "rank must be a positive"):
      multi.add_adapter(model, "c", targets=_ALL, rank=0)
    with self.assertRaisesRegex(ValueError, "needs targets and rank"):
      multi.add_adapter(model, "c", targets=_ALL)
    with self.assertRaisesRegex(ValueError, r"must be in \[-1, 1\]"):
      with multi.adapter_ids(model, jnp.asarray([0, 2, 0, 0, 0])):
        pass
    with self.assertRaisesRegex(ValueError, "1-D integer"):
      with multi.adapter_ids(model, jnp.zeros((5,))):
        pass
    with self.assertRaisesRegex(ValueError, "5 rows"):
      with multi.adapter_ids(model, jnp.zeros((5,), jnp.int32)):
        model(_X[:2])
    with self.assertRaisesRegex(ValueError, "has no named adapters"):
      multi.set_active(_toy(nnx.Rngs(0)), "a")
    plain = _toy(nnx.Rngs(0))
    adapters.inject(plain, targets="ein", rank=2)
    with self.assertRaisesRegex(ValueError, "holds another adapter"):
      multi.add_adapter(plain, "x", targets="ein", rank=2)
    with self.assertRaisesRegex(ValueError, "one entry per adapter"):
      multi.MultiLoRA(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), rank=2,
                      rngs=nnx.Rngs(0), names=("a", "b"), ranks=(2,))
    with self.assertRaisesRegex(ValueError, "unique"):
      multi.MultiLoRA(nnx.Linear(4, 4, rngs=nnx.Rngs(0)), rank=2,
                      rngs=nnx.Rngs(0), names=("a", "a"))


if __name__ == "__main__":
  absltest.main()
