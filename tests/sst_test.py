"""Tests for Sparse Spectral Training (`lowrank.spectral.sst`)."""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import optim
from lowrank import sharding
from lowrank.models import llama
from lowrank.spectral import sst


def _mesh():
  return sharding.use_mesh(sharding.make_mesh(devices=jax.devices()[:1]))


def _llama(scan_layers=False, seed=0):
  with _mesh():
    return llama.LlamaForCausalLM(
        llama.LlamaConfig.tiny(scan_layers=scan_layers),
        rngs=nnx.Rngs(seed))


class _One(nnx.Module):
  """One spectral layer plus a dense one (trained densely by the same tx)."""

  def __init__(self, d_in, d_out, rank, seed=0):
    rngs = nnx.Rngs(seed)
    self.layer = sst.SSTLinear(d_in, d_out, rank=rank, rngs=rngs)
    self.head = nnx.Linear(d_out, 1, rngs=rngs)

  def __call__(self, x):
    return self.head(jnp.tanh(self.layer(x)))


def _regression(model, seed=0, n=32):
  kx, ky = jax.random.split(jax.random.key(seed))
  x = jax.random.normal(kx, (n, model.layer.in_features))
  y = jax.random.normal(ky, (n, 1))
  return x, y


def _mse(model, x, y):
  return jnp.mean((model(x) - y) ** 2)


def _factors(layer):
  return (np.asarray(layer.sst_u.get_value()),
          np.asarray(layer.sst_s.get_value()),
          np.asarray(layer.sst_v.get_value()))


def _assert_close_to(freq, prob, n):
  """Empirical frequencies within 4.5 binomial standard errors."""
  tol = 4.5 * np.sqrt(prob * (1 - prob) / n) + 1e-12
  bad = np.abs(freq - prob) > tol
  assert not np.any(bad), (freq, prob, tol)


class MathTest(parameterized.TestCase):

  def test_sampling_probs(self):
    s = jnp.array([4.0, 2.0, 1.0, 1.0, 0.0])
    p = np.asarray(sst.sampling_probs(s))
    np.testing.assert_allclose(p, 0.5 * (1 / 5 + np.array([4, 2, 1, 1, 0]) / 8),
                               rtol=1e-6)
    np.testing.assert_allclose(np.asarray(sst.sampling_probs(jnp.zeros(4))),
                               np.full(4, 0.25))

  def test_sampler_frequencies_match_p(self):
    s = jnp.array([5.0, 3.0, 1.0, 0.5, 0.25, 0.0])
    p = np.asarray(sst.sampling_probs(s), np.float64)
    n = 20000
    keys = jax.random.split(jax.random.key(3), n)
    one = np.asarray(jax.vmap(lambda k: sst.sample_indices(k, s, 1))(keys))
    freq = np.bincount(one[:, 0], minlength=6) / n
    # 4 standard errors of a binomial proportion.
    _assert_close_to(freq, p, n)

    # r = 3 without replacement: exact inclusion probabilities of
    # successive sampling, enumerated over all ordered draws.
    three = np.asarray(jax.vmap(lambda k: sst.sample_indices(k, s, 3))(keys))
    self.assertTrue(all(len(set(row)) == 3 for row in three))
    incl = np.zeros(6)
    for draw in itertools.permutations(range(6), 3):
      prob, left = 1.0, 1.0
      for i in draw:
        prob *= p[i] / left
        left -= p[i]
      incl[list(draw)] += prob
    emp = np.bincount(three.reshape(-1), minlength=6) / n
    _assert_close_to(emp, incl, n)
    # The first column is the first draw, distributed as p.
    first = np.bincount(three[:, 0], minlength=6) / n
    _assert_close_to(first, p, n)

  def test_sample_indices_bad_rank(self):
    with self.assertRaisesRegex(ValueError, r"rank must be an int in \[1, 4\]"):
      sst.sample_indices(jax.random.key(0), jnp.ones(4), 5)

  def test_resvd_keeps_product(self):
    ku, ks, kv = jax.random.split(jax.random.key(1), 3)
    u = jax.random.normal(ku, (2, 10, 6))  # Stacked, not orthonormal.
    s = jax.random.uniform(ks, (2, 6))
    v = jax.random.normal(kv, (2, 7, 6))
    nu, ns, nv = sst.resvd(u, s, v)
    before = (u * s[..., None, :]) @ jnp.swapaxes(v, -1, -2)
    after = (nu * ns[..., None, :]) @ jnp.swapaxes(nv, -1, -2)
    np.testing.assert_allclose(after, before, atol=1e-4, rtol=1e-4)
    for q in (nu, nv):
      np.testing.assert_allclose(jnp.swapaxes(q, -1, -2) @ q,
                                 np.broadcast_to(np.eye(6), (2, 6, 6)),
                                 atol=1e-5)
    self.assertTrue(bool(jnp.all(ns >= 0)))
    self.assertTrue(bool(jnp.all(jnp.diff(ns, axis=-1) <= 0)))

  def test_enhanced_gradients(self):
    k = jax.random.split(jax.random.key(2), 5)
    x = jax.random.normal(k[0], (9, 6))
    u = jax.random.normal(k[1], (6, 4))
    s = jax.random.uniform(k[2], (4,), minval=0.5, maxval=2.0)
    v = jax.random.normal(k[3], (5, 4))
    t = jax.random.normal(k[4], (9, 5))

    def loss(enhanced):
      return lambda *a: jnp.sum(
          (sst.spectral_matmul(*a, enhanced=enhanced) - t) ** 2)

    plain = jax.grad(loss(False), argnums=(0, 1, 2, 3))(x, u, s, v)
    enh = jax.grad(loss(True), argnums=(0, 1, 2, 3))(x, u, s, v)
    # Plain autodiff of x U diag(s) Vᵀ, as a reference for the plain path.
    ref = jax.grad(lambda x, u, s, v: jnp.sum(
        ((x @ u * s[None, :]) @ v.T - t) ** 2), argnums=(0, 1, 2, 3))(
            x, u, s, v)
    for a, b in zip(plain, ref):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(enh[0], ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(enh[2], ref[2], rtol=1e-5, atol=1e-5)
    # Enhanced = (∂L/∂W) V_i and (∂L/∂W)ᵀ U_i = natural gradient / s_i.
    g_w = jax.grad(lambda w: jnp.sum((x @ w - t) ** 2))(
        (u * s[None, :]) @ v.T)
    np.testing.assert_allclose(enh[1], g_w @ v, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(enh[3], g_w.T @ u, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(enh[1], ref[1] / s[None, :], rtol=1e-4,
                               atol=1e-4)


class LayerTest(parameterized.TestCase):

  def test_from_linear_equals_dense(self):
    lin = nnx.Linear(12, 7, bias_init=nnx.initializers.normal(1.0),
                     rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 4, 12))
    want = lin(x)
    layer = sst.SSTLinear.from_linear(lin, rank=3)
    np.testing.assert_allclose(layer(x), want, atol=1e-5)
    u, s, v = _factors(layer)
    self.assertEqual((u.shape, s.shape, v.shape), ((12, 7), (7,), (7, 7)))
    np.testing.assert_allclose(u.T @ u, np.eye(7), atol=1e-5)
    np.testing.assert_allclose(v.T @ v, np.eye(7), atol=1e-5)
    self.assertTrue(np.all(s >= 0))

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, r"rank must be an int in \[1, "
                                r"min\(d_in, d_out\) = 4\]"):
      sst.SSTLinear(4, 8, rank=5, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "needs rngs"):
      sst.SSTLinear(4, 8, rank=2)
    layer = sst.SSTLinear(4, 8, rank=2, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "expected 4"):
      layer(jnp.ones((2, 5)))


class ConversionTest(parameterized.TestCase):

  @parameterized.named_parameters(("list", False), ("scan", True))
  def test_to_sst_then_to_dense_is_identity(self, scan_layers):
    model = _llama(scan_layers)
    ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 256)
    want = model(ids)
    target = r".*self_attn\.(q|v)_proj|.*mlp\.down_proj"
    layer0 = model.model.layers if scan_layers else model.model.layers[0]
    kernel = np.asarray(layer0.mlp.down_proj.kernel.get_value())
    axes = layer0.mlp.down_proj.kernel.get_metadata()["out_sharding"]
    sst.to_sst(model, targets=target, rank=4)
    names = sorted(sst.sst_modules(model))
    self.assertLen(names, 3 if scan_layers else 6)
    self.assertEqual(set(sst.ranks(model).values()), {4})
    layer0 = model.model.layers if scan_layers else model.model.layers[0]
    self.assertIsInstance(layer0.mlp.down_proj, sst.SSTLinear)
    if scan_layers:  # [L, d_in, m] factors, one decomposition per layer.
      self.assertEqual(layer0.mlp.down_proj.sst_u.get_value().shape,
                       (2, 128, 64))
    np.testing.assert_allclose(model(ids), want, atol=2e-5)
    sst.to_dense(model)
    self.assertEmpty(sst.sst_modules(model))
    layer0 = model.model.layers if scan_layers else model.model.layers[0]
    dense = layer0.mlp.down_proj
    self.assertIs(type(dense), nnx.Linear)
    np.testing.assert_allclose(dense.kernel.get_value(), kernel, atol=1e-5)
    self.assertEqual(dense.kernel.get_metadata()["out_sharding"], axes)
    np.testing.assert_allclose(model(ids), want, atol=2e-5)

  def test_conversion_errors(self):
    model = _llama()
    with self.assertRaisesRegex(ValueError, "matched no nnx.Linear"):
      sst.to_sst(model, targets=r".*nothing", rank=2)
    with self.assertRaisesRegex(ValueError, "not nnx.Linear.*embed_tokens"):
      sst.to_sst(model, targets=r"model\.embed_tokens", rank=2)
    with self.assertRaisesRegex(ValueError, "q_proj.*rank must be"):
      sst.to_sst(model, targets=r".*q_proj", rank=65)
    with self.assertRaisesRegex(ValueError, "no SSTLinear"):
      sst.to_dense(model)


class OptimizerTest(parameterized.TestCase):

  def _setup(self, d_in=12, d_out=8, rank=3, **kwargs):
    model = _One(d_in, d_out, rank)
    tx = sst.sst_adamw(1e-2, rank=sst.ranks(model), **kwargs)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    return model, opt, _regression(model)

  def test_step_moves_only_sampled_vectors(self):
    model, opt, (x, y) = self._setup(round_length=100)
    head = np.asarray(model.head.kernel.get_value())
    for _ in range(3):
      u0, s0, v0 = _factors(model.layer)
      idx = np.asarray(opt.opt_state.index[0].get_value())
      self.assertLen(set(idx.tolist()), 3)
      sst.train_step(model, opt, _mse, x, y)
      u1, s1, v1 = _factors(model.layer)
      others = np.setdiff1d(np.arange(8), idx)
      np.testing.assert_array_equal(u1[:, others], u0[:, others])
      np.testing.assert_array_equal(v1[:, others], v0[:, others])
      self.assertTrue(np.all(np.any(u1[:, idx] != u0[:, idx], axis=0)))
      self.assertTrue(np.all(np.any(v1[:, idx] != v0[:, idx], axis=0)))
      self.assertTrue(np.all(s1 != s0))  # Every singular value moves.
      self.assertTrue(np.all(s1 >= 0))
      # Columns stay unit-norm (the sampled ones are renormalised).
      np.testing.assert_allclose(np.linalg.norm(u1, axis=0), 1, atol=1e-5)
      np.testing.assert_allclose(np.linalg.norm(v1, axis=0), 1, atol=1e-5)
    # The dense head is trained by the same transform.
    self.assertFalse(np.allclose(model.head.kernel.get_value(), head))

  def test_resample_resets_block_state(self):
    model, opt, (x, y) = self._setup(resample_every=2, round_length=4)
    idx0 = np.asarray(opt.opt_state.index[0].get_value())
    sst.train_step(model, opt, _mse, x, y)
    state = opt.opt_state
    np.testing.assert_array_equal(state.index[0].get_value(), idx0)
    self.assertEqual(int(state.block_state.count.get_value()), 1)
    self.assertEqual(int(state.dense_state.count.get_value()), 1)
    sst.train_step(model, opt, _mse, x, y)  # End of an iteration.
    state = opt.opt_state
    self.assertEqual(int(state.block_state.count.get_value()), 0)
    for leaf in jax.tree.leaves(nnx.as_pure(state.block_state.mu)):
      np.testing.assert_array_equal(leaf, 0)
    self.assertEqual(int(state.dense_state.count.get_value()), 2)
    self.assertEqual(int(state.s_state.count.get_value()), 2)
    seen = set(idx0.tolist())
    for _ in range(2):
      sst.train_step(model, opt, _mse, x, y)
      seen.update(np.asarray(opt.opt_state.index[0].get_value()).tolist())
    # Step 4 ended round 1: re-SVD, so the s moments were reset too.
    self.assertEqual(int(opt.opt_state.s_state.count.get_value()), 0)
    self.assertEqual(int(opt.opt_state.dense_state.count.get_value()), 4)
    # Across resamples the indices change (p_i > 0 for every i).
    for _ in range(4):
      sst.train_step(model, opt, _mse, x, y)
      seen.update(np.asarray(opt.opt_state.index[0].get_value()).tolist())
    self.assertGreater(len(seen), 3)

  def test_resvd_step_keeps_represented_kernel(self):
    model = _One(10, 6, 2)
    # Perturb U away from orthonormality (unit columns, mixed directions).
    u = model.layer.sst_u.get_value()
    u = u + 0.3 * jnp.roll(u, 1, axis=1)
    model.layer.sst_u.set_value(u / jnp.linalg.norm(u, axis=0)[None, :])
    w = np.asarray(model.layer.kernel())
    tx = sst.sst_adamw(0.0, rank=2, round_length=1)  # lr 0: only re-SVD.
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    sst.train_step(model, opt, _mse, *_regression(model))
    np.testing.assert_allclose(model.layer.kernel(), w, atol=1e-5)
    u1, s1, v1 = _factors(model.layer)
    np.testing.assert_allclose(u1.T @ u1, np.eye(6), atol=1e-5)
    np.testing.assert_allclose(v1.T @ v1, np.eye(6), atol=1e-5)
    self.assertTrue(np.all(np.diff(s1) <= 0))

  def test_state_is_o_r_m_plus_n(self):
    d_in, d_out, r = 64, 256, 4
    model = _One(d_in, d_out, r)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    state = sst.sst_adamw(1e-3, rank=r).init(params)
    m = min(d_in, d_out)
    spectral_state = (optim.state_bytes(state.block_state)
                      + optim.state_bytes(state.s_state)
                      + optim.state_bytes(state.index))
    # Adam: two moments of the [d_in, r] and [d_out, r] blocks and of s,
    # r int32 indices, two int32 counts.
    self.assertEqual(spectral_state,
                     4 * (2 * r * (d_in + d_out) + 2 * m + r + 2))
    dense_adam = optim.state_bytes(
        optax.adamw(1e-3).init({"w": jnp.zeros((d_in, d_out))}))
    self.assertLess(spectral_state, dense_adam / 10)
    # Abstract accounting agrees (no allocation).
    self.assertEqual(optim.estimate_bytes(params, sst.sst_adamw(
        1e-3, rank=r)), optim.state_bytes(state))

  def test_optimizer_errors(self):
    with self.assertRaisesRegex(ValueError, "scalar PRNG key"):
      sst.sst_adamw(1e-3, rank=2, seed=jnp.zeros(2, jnp.uint32))
    same = [sst.sst_adamw(1e-3, rank=1, seed=s).init(
        {"l": {"sst_u": jnp.eye(4), "sst_s": jnp.arange(4.0),
               "sst_v": jnp.eye(4)}}).index[0]
            for s in (7, jax.random.key(7))]
    np.testing.assert_array_equal(*same)
    with self.assertRaisesRegex(ValueError, "multiple of resample_every"):
      sst.sst_adamw(1e-3, rank=2, resample_every=3, round_length=10)
    model = _One(6, 4, 2)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    with self.assertRaisesRegex(ValueError, "rank for 'layer'"):
      sst.sst_adamw(1e-3, rank=5).init(params)
    with self.assertRaisesRegex(ValueError, "no entry for spectral layer"):
      sst.sst_adamw(1e-3, rank={"other": 2}).init(params)
    tx = sst.sst_adamw(1e-3, rank=2)
    state = tx.init(params)
    with self.assertRaisesRegex(ValueError, "needs params"):
      tx.update(params, state)
    partial = nnx.as_pure(nnx.state(model, nnx.PathContains("sst_u")))
    with self.assertRaisesRegex(ValueError, "lacks"):
      tx.init(partial)


class TrainingTest(parameterized.TestCase):

  @parameterized.named_parameters(("list", False), ("scan", True))
  def test_tiny_lm_loss_decreases(self, scan_layers):
    model = _llama(scan_layers, seed=5)
    sst.to_sst(model, targets=r".*(q_proj|down_proj)", rank=4)
    tx = sst.sst_adamw(1e-2, rank=sst.ranks(model), resample_every=2,
                       round_length=4)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ids = np.asarray(jax.random.randint(jax.random.key(6), (4, 16), 0, 32))

    def loss_fn(model, ids):
      return llama.next_token_loss(model(ids), ids)

    losses = [float(sst.train_step(model, opt, loss_fn, ids))
              for _ in range(8)]  # Two rounds, so two re-SVDs.
    self.assertLess(losses[-1], 0.7 * losses[0], losses)
    if scan_layers:  # Stacked layers: one index set per layer.
      self.assertEqual(opt.opt_state.index[0].get_value().shape, (2, 4))


if __name__ == "__main__":
  absltest.main()
