"""Tests for the random-basis adapters (VeRA, NOLA, RandLoRA).

The `oracle` tests compare with Hugging Face PEFT's `vera` and `randlora`
tuners on the same weights and bases; they skip without torch and peft:

    /work/oracle-venv/bin/python -m pytest -m oracle \
        -o addopts="-p no:cacheprovider" tests/adapters/random_basis_test.py
"""

import json
import math
import os

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
from lowrank.adapters import layers
from lowrank.adapters import random_basis

from tests import testing

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def _toy(rngs):
  """Linear (d_in < d_out and d_in > d_out), LinearGeneral, Einsum."""
  return testing.KindsToy(rngs, 16, hidden=24, heads=(2, 4))


_X = jax.random.normal(jax.random.key(0), (2, 5, 16))
_ALL = r"layers\.\d|gen|ein"
_PATHS = ["ein", "gen", "layers.0", "layers.1"]

# (label, method, options); rank 4 throughout.
_CASES = (
    ("vera", "vera", dict(seed=3)),
    ("nola", "nola", dict(num_bases_a=8, num_bases_b=6)),
    ("nola_generated", "nola",
     dict(num_bases_a=8, num_bases_b=6, store_bases=False, chunk=3)),
    ("randlora", "randlora", dict()),
)
_TRAINABLE = {
    "vera": {"lambda_d", "lambda_b"},
    "nola": {"coef_a", "coef_b"},
    "randlora": {"lam", "gamma"},
}


# One jitted forward for every model here, compiled once per model
# structure: an eager forward compiles each of its ops on its own.
_forward = nnx.jit(lambda model, x: model(x))


def _mesh():
  # One device: the default mesh replicates every computation on the 8
  # fake CPU devices, and a program compiled for 8 devices takes longer.
  # Nothing here is sharded.
  return sharding.use_mesh(testing.one_device_mesh())


def _build(method, options, rank=4, alpha=None):
  with _mesh():
    model = _toy(nnx.Rngs(0))
    y0 = _forward(model, _X)
    adapters.inject(model, targets=_ALL, method=method, rank=rank,
                    alpha=alpha, **options)
  return model, y0


def _randomize(model, scale=0.3, seed=1):
  """Random trainable values, so the adapters change the output.

  Drawn in numpy: JAX's random.normal compiles once per leaf shape.
  """
  state = nnx.state(model, nnx.LoRAParam)
  flat = nnx.to_flat_state(state)
  rng = np.random.default_rng(seed)
  for _, var in flat:
    v = var.get_value()
    var.set_value(jax.device_put(
        (rng.standard_normal(v.shape) * scale).astype(v.dtype), v.sharding))
  nnx.update(model, state)


def _formula(w):
  if w.method == "vera":
    return w.rank + w.d_out
  if w.method == "nola":
    return w.num_bases_a + w.num_bases_b
  n = math.ceil(min(w.d_in, w.d_out) / w.rank)
  return n * w.rank + n * min(w.d_in, w.d_out)


def _rebuild(w, rngs_seed=99):
  return type(w)(
      w.base, rank=w.rank, alpha=w.alpha, rslora=w.rslora, dropout=0.0,
      init=w.init, rngs=nnx.Rngs(rngs_seed), **w.options()
  )


def _leaves(module, kind):
  return {
      ".".join(map(str, p)): v.get_value()
      for p, v in nnx.to_flat_state(nnx.state(module, kind))
  }


class CommonTest(parameterized.TestCase):
  """The evidence every variant needs, for each method."""

  @parameterized.named_parameters(*_CASES)
  def test_identity_at_init_every_kind(self, method, options):
    model, y0 = _build(method, options)
    self.assertEqual(sorted(adapters.adapter_modules(model)), _PATHS)
    np.testing.assert_array_equal(_forward(model, _X), y0)
    _randomize(model)
    self.assertGreater(float(np.abs(_forward(model, _X) - y0).max()), 1e-2)

  @parameterized.named_parameters(*_CASES)
  def test_merge_unmerge_roundtrip(self, method, options):
    model, _ = _build(method, options, alpha=6.0)
    _randomize(model)
    mods = adapters.adapter_modules(model)
    kernels = {p: np.asarray(m.base.kernel.get_value())
               for p, m in mods.items()}
    # Eager forwards: jitted, each state (adapted, merged, disabled,
    # unloaded) would compile a program of its own.
    y = model(_X)
    adapters.merge(model)
    for p, m in mods.items():
      self.assertTrue(m.merged)
      self.assertGreater(
          float(np.abs(m.base.kernel.get_value() - kernels[p]).max()), 1e-4)
    np.testing.assert_allclose(model(_X), y, rtol=1e-4, atol=1e-4)
    adapters.unmerge(model)
    for p, m in mods.items():
      np.testing.assert_allclose(m.base.kernel.get_value(), kernels[p],
                                 atol=1e-5)
    np.testing.assert_allclose(model(_X), y, rtol=1e-5, atol=1e-5)
    with adapters.disabled(model):
      y_base = model(_X)
    adapters.unload(model)
    np.testing.assert_allclose(model(_X), y, rtol=1e-4, atol=1e-4)
    self.assertGreater(float(np.abs(y - y_base).max()), 1e-2)

  @parameterized.named_parameters(*_CASES)
  def test_parameter_count_matches_paper(self, method, options):
    model, _ = _build(method, options)
    mods = adapters.adapter_modules(model)
    for m in mods.values():
      self.assertEqual(m.num_trainable(), _formula(m))
    self.assertEqual(adapters.count_parameters(model)["trainable"],
                     sum(_formula(m) for m in mods.values()))

  @parameterized.named_parameters(*_CASES)
  def test_lora_param_state_holds_no_bases(self, method, options):
    model, _ = _build(method, options)
    trainable = _leaves(model, nnx.LoRAParam)
    self.assertTrue(trainable)
    self.assertFalse([k for k in trainable if "basis" in k])
    n_bytes = sum(v.nbytes for v in trainable.values())
    n_train = sum(_formula(m)
                  for m in adapters.adapter_modules(model).values())
    self.assertEqual(n_bytes, 4 * n_train)
    bases = _leaves(model, layers.Basis)
    self.assertTrue(bases)
    self.assertTrue(all("basis" in k for k in bases))
    if options.get("store_bases", True):
      self.assertGreater(sum(v.nbytes for v in bases.values()), n_bytes)

  @parameterized.named_parameters(*_CASES)
  def test_rebuild_from_options_is_bit_identical(self, method, options):
    model, _ = _build(method, options)
    _randomize(model)
    for path, w in adapters.adapter_modules(model).items():
      json.dumps(w.options())
      self.assertEqual(w.options()["seed"], options.get("seed", 0))
      with _mesh():
        new = _rebuild(w)
      old_b, new_b = _leaves(w, layers.Basis), _leaves(new, layers.Basis)
      self.assertEqual(sorted(old_b), sorted(new_b), path)
      for k in old_b:
        np.testing.assert_array_equal(new_b[k], old_b[k], f"{path}.{k}")
      nnx.update(new, nnx.state(w, nnx.LoRAParam))
      np.testing.assert_array_equal(new.delta_weight(), w.delta_weight())
      x = jax.random.normal(jax.random.key(2), (2, 3, w.d_in))
      np.testing.assert_array_equal(new(x), w(x))

  # Not "nola_generated": its gradients equal the stored bases' ones
  # (NOLATest.test_generated_wrapper_matches_stored_wrapper), so a second
  # compiled optimizer step would prove nothing more.
  @parameterized.named_parameters(
      *(c for c in _CASES if c[0] != "nola_generated"))
  def test_gradients_and_jit_optimizer_steps(self, method, options):
    model, _ = _build(method, options)
    _randomize(model, scale=0.1)
    target = jax.random.normal(jax.random.key(7), (2, 5, 2, 4))
    bases_before = _leaves(model, layers.Basis)
    frozen = nnx.All(nnx.Param, nnx.Not(nnx.LoRAParam))
    kernels_before = _leaves(model, frozen)
    opt = nnx.Optimizer(model, optax.adamw(1e-2), wrt=nnx.LoRAParam)
    step = testing.lora_step(lambda m: jnp.mean((m(_X) - target) ** 2),
                             with_grads=True)
    loss, grads = step(model, opt)
    losses = [float(loss)]
    # Gradients reach exactly the trainable leaves, all of them non-zero.
    flat = nnx.to_flat_state(grads)
    names = {}
    for path, var in flat:
      self.assertIsInstance(var, nnx.LoRAParam)
      self.assertGreater(float(np.abs(var.get_value()).max()), 0.0, path)
      names.setdefault(".".join(map(str, path[:-1])), set()).add(path[-1])
    self.assertEqual(names, {p: _TRAINABLE[method] for p in _PATHS})
    self.assertEqual(adapters.count_parameters(model)["trainable"],
                     sum(v.get_value().size for _, v in flat))
    losses += [float(step(model, opt)[0]) for _ in range(5)]
    self.assertLess(losses[-1], losses[0])
    for k, v in _leaves(model, layers.Basis).items():
      np.testing.assert_array_equal(v, bases_before[k])
    for k, v in _leaves(model, frozen).items():
      np.testing.assert_array_equal(v, kernels_before[k])

  def test_bad_options(self):
    with _mesh():
      base = nnx.Linear(8, 6, rngs=nnx.Rngs(0))
    def make(method, **kw):
      cls = layers.METHODS[method][nnx.Linear]
      return cls(base, rank=kw.pop("rank", 2), rngs=nnx.Rngs(0), **kw)
    for method in ("vera", "nola", "randlora"):
      with self.assertRaisesRegex(ValueError, "seed must be a Python int"):
        make(method, seed=1.5)
      with self.assertRaisesRegex(ValueError, r"seed must be in \[0, 2\*\*32"):
        make(method, seed=2**32)
      with self.assertRaisesRegex(ValueError, "seed must be in"):
        make(method, seed=-1)
      with self.assertRaisesRegex(ValueError, "has its own initialisation"):
        make(method, init="gaussian")
      with self.assertRaisesRegex(ValueError, "Unknown option"):
        make(method, num_basis=3)
      with self.assertRaisesRegex(ValueError, "external_bases must be a bool"):
        make(method, external_bases=1)
      with self.assertRaisesRegex(ValueError, "rank must be"):
        make(method, rank=0)
    with self.assertRaisesRegex(ValueError, "max_in must be >= this layer"):
      make("vera", max_in=7)
    with self.assertRaisesRegex(ValueError, "d_initial must be finite"):
      make("vera", d_initial=float("nan"))
    with self.assertRaisesRegex(ValueError, "num_bases_a must be a positive"):
      make("nola", num_bases_a=0)
    with self.assertRaisesRegex(ValueError, "chunk must be a positive"):
      make("nola", chunk=0)
    with self.assertRaisesRegex(ValueError, "store_bases must be a bool"):
      make("nola", store_bases="no")
    with self.assertRaisesRegex(ValueError, "chunk must be a positive"):
      make("randlora", chunk=-2)
    with self.assertRaisesRegex(ValueError, "sqrt_n_scaling must be a bool"):
      make("randlora", sqrt_n_scaling=1)
    with self.assertRaisesRegex(ValueError, "no LoRA factors"):
      make("vera").peft_factors()
    with _mesh():
      model = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "cannot adapt"):
      with _mesh():
        adapters.inject(nnx.List([nnx.Embed(10, 4, rngs=nnx.Rngs(0))]),
                        targets="0", method="vera", rank=2)
    with self.assertRaisesRegex(ValueError, "no VeRA adapter"):
      random_basis.share_bases(model)


class SetBasesTest(parameterized.TestCase):

  @parameterized.named_parameters(*_CASES)
  def test_external_bases_are_saved_state_and_rebuild(self, method, options):
    model, _ = _build(method, options)
    _randomize(model)
    w = adapters.adapter_modules(model)["layers.1"]
    bases = w.bases()
    new = {
        k: jax.random.normal(jax.random.fold_in(jax.random.key(5), i),
                             v.shape)
        for i, (k, v) in enumerate(bases.items())
    }
    y = w(jnp.ones((3, w.d_in)))
    w.set_bases(**new)
    self.assertTrue(w.external_bases)
    self.assertTrue(w.options()["external_bases"])
    self.assertFalse(_leaves(w, layers.Basis).keys() & set(new))
    state = _leaves(w, layers.AdapterState)
    self.assertEqual(sorted(state), sorted(new))
    for k, v in w.bases().items():
      np.testing.assert_array_equal(v, new[k])
    y_new = w(jnp.ones((3, w.d_in)))
    self.assertGreater(float(np.abs(y_new - y).max()), 1e-3)
    # Rebuilt from options() + the saved leaves (LoRAParam, AdapterState).
    with _mesh():
      again = _rebuild(w)
    self.assertEqual(sorted(_leaves(again, layers.AdapterState)),
                     sorted(new))
    nnx.update(again, nnx.state(w, nnx.LoRAParam))
    nnx.update(again, nnx.state(w, layers.AdapterState))
    np.testing.assert_array_equal(again(jnp.ones((3, w.d_in))), y_new)
    self.assertFalse([k for k in _leaves(model, nnx.LoRAParam)
                      if "basis" in k])

  def test_set_bases_errors(self):
    model, _ = _build("vera", {})
    w = adapters.adapter_modules(model)["layers.0"]
    with self.assertRaisesRegex(ValueError, r"expected shape \(16, 4\)"):
      w.set_bases(basis_a=np.zeros((4, 16)))
    with self.assertRaisesRegex(ValueError, "Unknown basis name.*basis_c"):
      w.set_bases(basis_c=np.zeros((4, 16)))
    model, _ = _build("nola", dict(num_bases_a=4, num_bases_b=4,
                                   store_bases=False))
    w = adapters.adapter_modules(model)["layers.0"]
    self.assertEqual(sorted(w.bases()), ["basis_a0"])
    with self.assertRaisesRegex(ValueError, "Unknown basis name.*basis_a'"):
      w.set_bases(basis_a=np.zeros((4, 16, 4)))
    w.set_bases(basis_a0=np.zeros((16, 4)))
    model, _ = _build("vera", {})
    w = adapters.adapter_modules(model)["layers.0"]
    b = w.bases()["basis_b"]
    w.set_bases(basis_a=np.zeros((16, 4)))
    # Bases not given keep their values but are saved state too, so a
    # rebuilt wrapper (all bases AdapterState) loads all of them.
    self.assertEqual(sorted(_leaves(w, layers.AdapterState)),
                     ["basis_a", "basis_b"])
    self.assertFalse(_leaves(w, layers.Basis))
    np.testing.assert_array_equal(w.bases()["basis_b"], b)
    with self.assertRaisesRegex(ValueError, "cannot be regenerated"):
      w.set_max_in(30)
    with self.assertRaisesRegex(ValueError, "PEFT VeRA bases must be"):
      w.set_peft_bases(np.zeros((4, 8)), np.zeros((24, 4)))
    with self.assertRaisesRegex(ValueError, "lambda_b: expected 24 values"):
      w.set_peft_tensors(np.zeros(4), np.zeros(16))


class VeRATest(absltest.TestCase):

  def test_bases_are_peft_kaiming_and_slices_of_one_shared_pair(self):
    a, b = random_basis.vera_bases(0, 40, 30, 8)
    self.assertEqual((a.shape, b.shape), ((40, 8), (8, 30)))
    self.assertLessEqual(float(np.abs(a).max()), math.sqrt(6 / 40))
    self.assertGreater(float(np.abs(a).max()), 0.95 * math.sqrt(6 / 40))
    self.assertLessEqual(float(np.abs(b).max()), math.sqrt(6 / 8))
    a_small, b_small = random_basis.vera_bases(0, 25, 12, 8, max_in=40)
    np.testing.assert_array_equal(a_small, a[:25])
    np.testing.assert_array_equal(b_small, b[:, :12])
    a_other, _ = random_basis.vera_bases(1, 40, 30, 8)
    self.assertGreater(float(np.abs(a_other - a).max()), 0.1)

  def test_share_bases_gives_bit_identical_slices(self):
    model, _ = _build("vera", dict(seed=11))
    mods = adapters.adapter_modules(model)
    wide, narrow = mods["layers.1"], mods["layers.0"]  # d_in 24 and 16.
    self.assertEqual(narrow.options()["max_in"], 16)
    self.assertEqual(random_basis.share_bases(model), 24)
    for m in mods.values():
      self.assertEqual(m.options()["max_in"], 24)
    a_w, b_w = wide.bases()["basis_a"], wide.bases()["basis_b"]
    a_n, b_n = narrow.bases()["basis_a"], narrow.bases()["basis_b"]
    np.testing.assert_array_equal(a_n, a_w[:16])
    np.testing.assert_array_equal(b_w, b_n[:, :16])  # d_out 16 and 24.
    np.testing.assert_array_equal(mods["gen"].bases()["basis_a"], a_n)
    # The options now rebuild the shared slices.
    with _mesh():
      again = _rebuild(narrow)
    np.testing.assert_array_equal(again.bases()["basis_a"], a_n)

  def test_lambda_init_and_output_formula(self):
    model, _ = _build("vera", dict(d_initial=0.25))
    w = adapters.adapter_modules(model)["layers.0"]
    np.testing.assert_array_equal(w.lambda_d[...], jnp.full((4,), 0.25))
    np.testing.assert_array_equal(w.lambda_b[...], jnp.zeros((24,)))
    _randomize(model)
    a, b = w.bases()["basis_a"], w.bases()["basis_b"]
    ld, lb = w.lambda_d[...], w.lambda_b[...]
    x = _X.reshape(-1, 16)
    want = (((x @ a) * ld[None, :]) @ b) * lb[None, :]
    np.testing.assert_allclose(w.adapter_out(x), want, rtol=1e-5, atol=1e-5)


class NOLATest(absltest.TestCase):

  def test_generated_equals_stored_bits_and_gradient(self):
    key = jax.random.key(4)
    k, shape = 7, (5, 3)
    stored = random_basis.nola_bases(key, k, shape)
    self.assertLessEqual(float(np.abs(stored).max()), 1 / math.sqrt(k))
    for i in range(k):
      onehot = jnp.asarray(np.eye(k, dtype=np.float32)[i])
      for chunk in (3, 16):
        np.testing.assert_array_equal(
            random_basis.nola_combine_generated(onehot, key, shape, chunk),
            stored[i])
    rng = np.random.default_rng(1)
    coef = jnp.asarray(rng.standard_normal(k, np.float32))
    w = rng.standard_normal(shape, np.float32)
    g_gen = jax.jit(jax.grad(lambda c: jnp.sum(
        w * random_basis.nola_combine_generated(c, key, shape, 3))))(coef)
    g_sto = jax.jit(jax.grad(lambda c: jnp.sum(
        w * random_basis.nola_combine(c, stored))))(coef)
    np.testing.assert_allclose(g_gen, g_sto, rtol=1e-5, atol=1e-6)

  def test_generated_wrapper_matches_stored_wrapper(self):
    opts = dict(num_bases_a=8, num_bases_b=6)
    stored, _ = _build("nola", opts)
    gen, _ = _build("nola", dict(opts, store_bases=False, chunk=3))
    _randomize(stored)
    _randomize(gen)
    np.testing.assert_allclose(_forward(gen, _X), _forward(stored, _X),
                               rtol=1e-5, atol=1e-5)
    diff = nnx.DiffState(0, nnx.LoRAParam)
    grad = nnx.jit(nnx.grad(lambda m: jnp.mean(m(_X) ** 2), argnums=diff))
    g1 = nnx.to_flat_state(grad(stored))
    g2 = nnx.to_flat_state(grad(gen))
    for (p1, v1), (p2, v2) in zip(g1, g2):
      self.assertEqual(p1, p2)
      np.testing.assert_allclose(v1.get_value(), v2.get_value(), rtol=1e-4,
                                 atol=1e-5)

  def test_generated_bases_are_not_held_in_the_compiled_step(self):
    d, r, k = 64, 4, 512

    def step_bytes(**opts):
      with _mesh():
        model = nnx.Linear(d, d, rngs=nnx.Rngs(0))
        model = adapters.inject(
            nnx.List([model]), targets="0", method="nola", rank=r,
            num_bases_a=k, num_bases_b=k, **opts)
      graphdef, params, rest = nnx.split(model, nnx.LoRAParam, ...)
      params, rest = nnx.as_pure(params), nnx.as_pure(rest)

      def loss(params, rest, x):
        return jnp.sum(nnx.merge(graphdef, params, rest)[0](x) ** 2)

      compiled = jax.jit(jax.grad(loss)).lower(
          params, rest, jnp.ones((8, d))).compile()
      mem = compiled.memory_analysis()
      return mem.argument_size_in_bytes + mem.temp_size_in_bytes

    basis_bytes = 2 * k * d * r * 4
    stored = step_bytes()
    generated = step_bytes(store_bases=False, chunk=16)
    self.assertGreater(stored, basis_bytes)
    self.assertLess(generated, stored - 0.9 * basis_bytes)

  def test_a0_is_kaiming_and_coefficients_start_at_zero(self):
    model, _ = _build("nola", dict(num_bases_a=8, num_bases_b=6))
    w = adapters.adapter_modules(model)["layers.1"]  # d_in 24.
    a0 = w.bases()["basis_a0"]
    self.assertLessEqual(float(np.abs(a0).max()), 1 / math.sqrt(24))
    np.testing.assert_array_equal(w.coef_a[...], jnp.zeros((8,)))
    np.testing.assert_array_equal(w.coef_b[...], jnp.zeros((6,)))
    a, b = w.factors()
    np.testing.assert_array_equal(a, a0)
    np.testing.assert_array_equal(b, jnp.zeros((4, 16)))


def _dense_randlora(x, a, b, lam, gam, scale, small_is_in):
  return x @ random_basis.randlora_delta(a, b, lam, gam, scale,
                                         small_is_in=small_is_in)


class RandLoRATest(parameterized.TestCase):

  @parameterized.product(small_is_in=(True, False), chunk=(None, 1, 2))
  def test_factored_matches_dense_value_and_gradients(self, small_is_in,
                                                      chunk):
    r, d_small, d_large = 4, 10, 14
    n = random_basis.randlora_num_bases(d_small, d_large, r)
    self.assertEqual(n, 3)
    a, b = random_basis.randlora_bases(0, d_small, d_large, r, n)
    normal = np.random.default_rng(0).standard_normal
    lam = normal((n, r), np.float32)
    gam = normal((n, d_small), np.float32)
    d_in, d_out = (d_small, d_large) if small_is_in else (d_large, d_small)
    x = normal((2, 3, d_in), np.float32)
    w = normal((2, 3, d_out), np.float32)

    def ours(x, lam, gam):
      return jnp.sum(w * random_basis.randlora_apply(
          x, a, b, lam, gam, 1.5, small_is_in=small_is_in, chunk=chunk))

    def dense(x, lam, gam):
      return jnp.sum(w * _dense_randlora(x, a, b, lam, gam, 1.5,
                                         small_is_in))

    # Jitted: eagerly, every op of the two backward passes compiles alone.
    v1, g1 = jax.jit(jax.value_and_grad(ours, argnums=(0, 1, 2)))(
        x, lam, gam)
    v2, g2 = jax.jit(jax.value_and_grad(dense, argnums=(0, 1, 2)))(
        x, lam, gam)
    np.testing.assert_allclose(v1, v2, rtol=1e-4)
    for u, v in zip(g1, g2):
      np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-4)

  @parameterized.parameters(True, False)
  def test_backward_never_forms_the_update(self, small_is_in):
    r, d_small, d_large = 4, 12, 20
    n = random_basis.randlora_num_bases(d_small, d_large, r)
    a, b = random_basis.randlora_bases(0, d_small, d_large, r, n)
    d_in, d_out = (d_small, d_large) if small_is_in else (d_large, d_small)
    x = jnp.ones((8, d_in))

    def loss(lam, gam):
      return jnp.sum(random_basis.randlora_apply(
          x, a, b, lam, gam, 2.0, small_is_in=small_is_in) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss, argnums=(0, 1)))(
        jnp.ones((n, r)), jnp.ones((n, d_small)))
    shapes = set()

    def collect(jx):
      for eqn in jx.eqns:
        shapes.update(tuple(v.aval.shape) for v in eqn.outvars)
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
          collect(sub)

    collect(jaxpr.jaxpr)
    self.assertNotIn((d_in, d_out), shapes)
    self.assertNotIn((d_out, d_in), shapes)

  def test_init_and_shapes_follow_peft(self):
    model, _ = _build("randlora", {})
    mods = adapters.adapter_modules(model)
    w = mods["layers.0"]  # 16 -> 24: input side is small.
    self.assertTrue(w.small_is_in)
    self.assertEqual(w.num_bases, 4)
    self.assertEqual(w.lam[...].shape, (4, 4))
    np.testing.assert_array_equal(w.lam[...], jnp.zeros((4, 4)))
    np.testing.assert_allclose(w.gamma[...], jnp.full((4, 16), 1 / 16))
    g = mods["gen"]  # 16 -> (2, 4): output side is small.
    self.assertFalse(g.small_is_in)
    self.assertEqual(g.num_bases, 2)
    self.assertEqual(g.gamma[...].shape, (2, 2, 4))
    self.assertEqual(g.basis_b[...].shape, (2, 4, 16))
    # Shared bases: the narrower layer's are slices of the wider one's.
    a0, b0 = w.bases()["basis_a"], w.bases()["basis_b"]
    a1, b1 = mods["layers.1"].bases()["basis_a"], g.bases()["basis_b"]
    np.testing.assert_array_equal(a1, a0)  # Both have d_small = 16.
    np.testing.assert_array_equal(g.bases()["basis_a"], a0[:, :8])
    np.testing.assert_array_equal(b1, b0[:2, :, :16])
    self.assertAlmostEqual(float(b0.std()), 1.0, delta=0.1)


def _authors_randlora(x, rb_a, rb_b, lam, gam, alpha, r, d_in, d_out):
  """The authors' RandLoRA forward (`PaulAlbert31/RandLoRA@4ac565ecd611`,
  `peft/src/peft/tuners/randlora/layer.py`: `UniqueBaseGrad.forward`,
  `get_scaled_bases`, `Linear.forward`, scale from `update_layer`) in
  numpy, for a torch `nn.Linear(d_in, d_out)`: the adapter's output."""
  n = math.ceil(min(d_in, d_out) / r)
  min_dim, max_dim = min(d_in, d_out), max(d_in, d_out)
  sliced_a = rb_a[:, :n, :min_dim]
  sliced_b = rb_b[:max_dim, :n, :]
  update_b = sliced_b.reshape(max_dim, -1)
  update_a = (lam[:, :, None] * sliced_a * gam[None]).reshape(-1, min_dim)
  if min_dim == d_in:
    first, second = update_a, update_b
  else:
    first, second = update_b.T, update_a.T
  scaling = alpha / r / math.sqrt(n)  # layer.py:119
  return (x @ first.T) @ second.T * scaling  # F.linear(F.linear(x, .), .)


class PaperPresetTest(parameterized.TestCase):

  @parameterized.parameters(True, False)
  def test_sqrt_n_scaling_matches_the_authors_forward(self, sqrt_n_scaling):
    """`sqrt_n_scaling=True` is the authors' layer; the default is √n×."""
    rng = np.random.default_rng(0)
    r, alpha = 4, 5.0
    rb_a = rng.normal(size=(r, 1, 16)).astype(np.float32)  # [r, 1, max_small]
    rb_b = rng.normal(size=(24, 4, r)).astype(np.float32)  # [max_large, n, r]
    model, _ = _build("randlora", {"sqrt_n_scaling": sqrt_n_scaling},
                      rank=r, alpha=alpha)
    mods = adapters.adapter_modules(model)
    # 16 -> 24 (small side: input) and 24 -> 16 (output); n = 4 for both.
    for w in (mods["layers.0"], mods["layers.1"]):
      with self.subTest(small_is_in=w.small_is_in):
        n, d_small = w.num_bases, min(w.d_in, w.d_out)
        lam = rng.normal(size=(r, n)).astype(np.float32)
        gam = rng.normal(size=(n, d_small)).astype(np.float32)
        w.set_peft_bases(rb_a, rb_b)
        w.set_peft_tensors(lam, gam)
        x = rng.normal(size=(3, w.d_in)).astype(np.float32)
        want = _authors_randlora(x, rb_a, rb_b, lam, gam, alpha, r, w.d_in,
                                 w.d_out)
        if not sqrt_n_scaling:
          want = want * math.sqrt(n)  # Hugging Face PEFT's alpha / r.
        got = w(jnp.asarray(x)) - w.base(jnp.asarray(x))
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)

  # (method, extra section keys, expected scale at rank 4 on layers.0,
  # 16 -> 24, so RandLoRA's n = 4).
  @parameterized.parameters(
      ("randlora", {}, 64 / 4 / 2),  # alpha / r / sqrt(n), alpha = 64.
      ("nola", {"num_bases_a": 3, "num_bases_b": 2}, 1 / 4),  # alpha = 1.
      ("vera", {}, 1.0),  # The defaults are PEFT's.
  )
  def test_paper_preset_injects(self, method, extra, scale):
    with _mesh():
      model = _toy(nnx.Rngs(0))
      train.inject_from_config(model, {"method": method, "preset": "paper",
                                       "rank": 4, "targets": "layers.0",
                                       **extra})
    w = adapters.adapter_modules(model)["layers.0"]
    self.assertAlmostEqual(w.scale, scale, places=6)
    self.assertTrue(presets.get(method).source)


# ------------------------------------------------------- PEFT oracle tests
def _torch_and_ours(peft_config):
  """A tiny torch MLP under PEFT, and the same weights as an NNX model."""
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  torch.manual_seed(0)

  class M(torch.nn.Module):

    def __init__(self):
      super().__init__()
      self.a = torch.nn.Linear(6, 10)
      self.b = torch.nn.Linear(10, 4)

    def forward(self, x):
      return self.b(torch.relu(self.a(x)))

  class Ours(nnx.Module):

    def __init__(self, tm):
      rngs = nnx.Rngs(0)
      self.a = nnx.Linear(6, 10, rngs=rngs)
      self.b = nnx.Linear(10, 4, rngs=rngs)
      for name in ("a", "b"):
        lin, t = getattr(self, name), getattr(tm, name)
        lin.kernel.set_value(jnp.asarray(t.weight.detach().numpy().T))
        lin.bias.set_value(jnp.asarray(t.bias.detach().numpy()))

    def __call__(self, x):
      return self.b(jax.nn.relu(self.a(x)))

  tm = M()
  ours = Ours(tm)
  pm = peft.get_peft_model(tm, peft_config)
  with torch.no_grad():
    for name, p in pm.named_parameters():
      if p.requires_grad:
        p.copy_(torch.randn(p.shape) * 0.5)
  return torch, pm, ours


def _peft_layer(pm, name):
  return getattr(pm.base_model.model, name)


@pytest.mark.oracle
def test_vera_matches_peft():
  peft = pytest.importorskip("peft")
  torch, pm, ours = _torch_and_ours(
      peft.VeraConfig(r=3, target_modules=["a", "b"], projection_prng_key=5))
  adapters.inject(ours, targets=["a", "b"], method="vera", rank=3, seed=5)
  assert random_basis.share_bases(ours) == 10
  vera_a = pm.base_model.vera_A["default"].numpy()
  vera_b = pm.base_model.vera_B["default"].numpy()
  assert vera_a.shape == (3, 10) and vera_b.shape == (10, 3)
  for name in ("a", "b"):
    layer, w = _peft_layer(pm, name), getattr(ours, name)
    w.set_peft_bases(vera_a, vera_b)
    w.set_peft_tensors(
        layer.vera_lambda_d["default"].detach().numpy(),
        layer.vera_lambda_b["default"].detach().numpy())
    got = w.peft_tensors()
    np.testing.assert_array_equal(
        got["vera_lambda_b"], layer.vera_lambda_b["default"].detach().numpy())
    np.testing.assert_allclose(
        w.delta_weight().T,
        layer.get_delta_weight("default").detach().numpy(), atol=1e-6)
  x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
  with torch.no_grad():
    want = pm(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(ours(jnp.asarray(x)), want, atol=1e-5)
  with torch.no_grad():
    base = pm.get_base_model()
    with pm.disable_adapter():
      want_base = base(torch.from_numpy(x)).numpy()
  assert np.abs(want - want_base).max() > 1e-2
  adapters.merge(ours)
  np.testing.assert_allclose(ours(jnp.asarray(x)), want, atol=1e-5)


@pytest.mark.oracle
def test_randlora_matches_peft():
  peft = pytest.importorskip("peft")
  torch, pm, ours = _torch_and_ours(
      peft.RandLoraConfig(r=3, target_modules=["a", "b"], randlora_alpha=6))
  adapters.inject(ours, targets=["a", "b"], method="randlora", rank=3,
                  alpha=6.0)
  peft_a = pm.base_model.randlora_A["default"].float().numpy()
  peft_b = pm.base_model.randlora_B["default"].float().numpy()
  for name in ("a", "b"):
    layer, w = _peft_layer(pm, name), getattr(ours, name)
    assert w.num_bases == layer.num_bases
    w.set_peft_bases(peft_a, peft_b)
    lam = layer.randlora_lambda["default"].detach().numpy()
    gam = layer.randlora_gamma["default"].detach().numpy()
    w.set_peft_tensors(lam, gam)
    got = w.peft_tensors()
    np.testing.assert_array_equal(got["randlora_lambda"], lam)
    np.testing.assert_array_equal(got["randlora_gamma"], gam)
    np.testing.assert_allclose(
        w.delta_weight().T,
        layer.get_delta_weight("default").detach().float().numpy(),
        rtol=1e-4, atol=1e-4)
  x = np.random.default_rng(0).normal(size=(5, 6)).astype(np.float32)
  with torch.no_grad():
    want = pm(torch.from_numpy(x)).float().numpy()
  np.testing.assert_allclose(ours(jnp.asarray(x)), want, rtol=1e-4,
                             atol=1e-4)
  adapters.merge(ours)
  np.testing.assert_allclose(ours(jnp.asarray(x)), want, rtol=1e-4,
                             atol=1e-4)


if __name__ == "__main__":
  absltest.main()
