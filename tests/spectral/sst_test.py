"""Tests for Sparse Spectral Training (`lowrank.spectral.sst`)."""

import itertools

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import adapters
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


# One compiled forward per model structure: an eager forward of the LLaMA
# compiles every op of it on its own (several seconds on a small CPU).
_forward = nnx.jit(lambda model, ids: model(ids))


class _One(nnx.Module):
  """One spectral layer plus a dense one (trained densely by the same tx).

  Tests use 12 -> 8 at rank 3 where the sizes do not matter (as do the LLaMA
  tests with rank 4): building a spectral layer runs eager ops, and each new
  shape compiles them again.
  """

  def __init__(self, d_in, d_out, rank, seed=0):
    rngs = nnx.Rngs(seed)
    self.layer = sst.SSTLinear(d_in, d_out, rank=rank, rngs=rngs,
                               sample_key=jax.random.key(seed + 1))
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
  """Full `(U, s, V)` of a layer as numpy arrays (active columns first)."""
  return tuple(np.asarray(a) for a in layer.factors())


def _assert_close_to(freq, prob, n):
  """Empirical frequencies within 4.5 binomial standard errors."""
  tol = 4.5 * np.sqrt(prob * (1 - prob) / n) + 1e-12
  bad = np.abs(freq - prob) > tol
  assert not np.any(bad), (freq, prob, tol)


def _matmul_problem(seed, *, d_in, d_out, m, n=9):
  """Random `(x [n, d_in], U [d_in, m], s [m], V [d_out, m], target)`.

  `s` is kept in `[0.5, 2]`, away from zero.
  """
  k = jax.random.split(jax.random.key(seed), 5)
  x = jax.random.normal(k[0], (n, d_in))
  u = jax.random.normal(k[1], (d_in, m))
  s = jax.random.uniform(k[2], (m,), minval=0.5, maxval=2.0)
  v = jax.random.normal(k[3], (d_out, m))
  t = jax.random.normal(k[4], (n, d_out))
  return x, u, s, v, t


def _layer_params(d_in, d_out, r, seed=0):
  """`{"l": {sst_u, ...}}` of a random spectral layer (orthonormal U, V)."""
  ku, ks, kv = jax.random.split(jax.random.key(seed), 3)
  m = min(d_in, d_out)
  u = np.linalg.qr(np.asarray(jax.random.normal(ku, (d_in, m))))[0]
  v = np.linalg.qr(np.asarray(jax.random.normal(kv, (d_out, m))))[0]
  s = np.asarray(jax.random.uniform(ks, (m,), minval=0.5, maxval=2.0))
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return {"l": {"sst_u": f32(u[:, :r]), "sst_u_frozen": f32(u[:, r:]),
                "sst_s": f32(s), "sst_v": f32(v[:, :r]),
                "sst_v_frozen": f32(v[:, r:])}}


def _grad_sequence(params, steps, seed=0):
  """Fixed random gradients; the frozen ones are noise the optimizer must
  never read."""
  keys = jax.random.split(jax.random.key(seed + 100), steps)
  leaves, tdef = jax.tree.flatten(params)

  def one(k):
    ks = jax.random.split(k, len(leaves))
    return [jax.random.normal(kk, x.shape) for kk, x in zip(ks, leaves)]

  # One compiled draw for all steps (the same values as a loop over keys).
  stacked = [np.asarray(a) for a in jax.jit(jax.vmap(one))(keys)]
  return [jax.tree.unflatten(tdef, [a[i] for a in stacked])
          for i in range(steps)]


def _run(tx, params, grads):
  update = jax.jit(tx.update)
  apply = jax.jit(optax.apply_updates)
  state = tx.init(params)
  for g in grads:
    u, state = update(g, state, params)
    params = apply(params, u)
  return params, state


def _normalize(x):
  return x / np.linalg.norm(x, axis=0, keepdims=True)


def _reference(params, grads, *, lr, refresh_every, rewarm_steps, seed=0,
               b1=0.9, b2=0.999, eps=1e-8):
  """NumPy (float64) transcription of SST's update with torch AdamW.

  Written from the paper (Zhao et al. 2024, Algorithm 1: iterations of T3
  steps with the same sampled vectors; §4.5: new vectors are swapped into
  the active block, whose moments start at zero) and, for the reset and
  the warm-up, from ReLoRA's code that the paper's language-model runs
  build on (Guitaricet/relora@176f37633fe02019835387258ddabcf6d91e328d,
  peft_pretraining/training_utils.py: `optimizer_reset` zeroes
  `exp_avg`/`exp_avg_sq` and keeps torch's per-tensor `step`;
  `_get_cosine_schedule_with_multiple_warmups_lambda` ramps the rate by
  `restart_step / restart_warmup_steps` after a reset). torch.optim.AdamW:
  `m = b1 m + (1-b1) g`, `v = b2 v + (1-b2) g²`, `step += 1`,
  `p -= lr m / (1 - b1^step) / (sqrt(v / (1 - b2^step)) + eps)`. The
  sampled set comes from `sst.sample_indices` with the documented key; no
  round ends inside `grads` (re-SVD is tested separately).
  """
  p = {k: np.asarray(v, np.float64) for k, v in params["l"].items()}
  r, m = p["sst_u"].shape[1], p["sst_s"].shape[0]
  mom = {k: [np.zeros_like(p[k]), np.zeros_like(p[k])]
         for k in ("sst_u", "sst_v", "sst_s")}
  steps = {k: 0 for k in mom}  # torch keeps one `step` per tensor.

  def adam(k, g):
    steps[k] += 1
    t = steps[k]
    mom[k][0] = b1 * mom[k][0] + (1 - b1) * g
    mom[k][1] = b2 * mom[k][1] + (1 - b2) * g * g
    return (mom[k][0] / (1 - b1**t)) / (
        np.sqrt(mom[k][1] / (1 - b2**t)) + eps)

  for c, g in enumerate(grads):
    g = {k: np.asarray(v, np.float64) for k, v in g["l"].items()}
    warm = 1.0 if c < refresh_every or not rewarm_steps else min(
        1.0, (c % refresh_every + 1) / rewarm_steps)
    p["sst_s"] = np.maximum(p["sst_s"] - lr * adam("sst_s", g["sst_s"]),
                            0.0)
    for k in ("sst_u", "sst_v"):
      p[k] = _normalize(p[k] - lr * warm * adam(k, g[k]))
    if (c + 1) % refresh_every:
      continue
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), c + 1),
                             0)
    chosen = set(np.asarray(sst.sample_indices(
        key, jnp.asarray(p["sst_s"], jnp.float32), r)).tolist())
    leaving = [j for j in range(r) if j not in chosen]
    entering = sorted(i for i in chosen if i >= r)
    perm = np.arange(m)
    for a, b in zip(leaving, entering):
      perm[a], perm[b] = b, a
    for name in ("u", "v"):
      full = np.concatenate([p[f"sst_{name}"], p[f"sst_{name}_frozen"]], 1)
      full = full[:, perm]
      p[f"sst_{name}"], p[f"sst_{name}_frozen"] = full[:, :r], full[:, r:]
      for moment in mom[f"sst_{name}"]:
        moment[:, leaving] = 0.0  # New vectors start from zero moments.
    p["sst_s"] = p["sst_s"][perm]
    mom["sst_s"] = [x[perm] for x in mom["sst_s"]]
  return p, mom


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
    x, u, s, v, t = _matmul_problem(2, d_in=6, d_out=5, m=4)

    def loss(enhanced):
      return lambda *a: jnp.sum(
          (sst.spectral_matmul(*a, enhanced=enhanced) - t) ** 2)

    # Jitted: one compile each, not one per eager op (same custom VJPs).
    argnums = (0, 1, 2, 3)
    plain = jax.jit(jax.grad(loss(False), argnums=argnums))(x, u, s, v)
    enh = jax.jit(jax.grad(loss(True), argnums=argnums))(x, u, s, v)
    # Plain autodiff of x U diag(s) Vᵀ, as a reference for the plain path.
    ref = jax.jit(jax.grad(lambda x, u, s, v: jnp.sum(
        ((x @ u * s[None, :]) @ v.T - t) ** 2), argnums=(0, 1, 2, 3)))(
            x, u, s, v)
    for a, b in zip(plain, ref):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(enh[0], ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(enh[2], ref[2], rtol=1e-5, atol=1e-5)
    # Enhanced = (∂L/∂W) V_i and (∂L/∂W)ᵀ U_i = natural gradient / s_i.
    g_w = jax.jit(jax.grad(lambda w: jnp.sum((x @ w - t) ** 2)))(
        (u * s[None, :]) @ v.T)
    np.testing.assert_allclose(enh[1], g_w @ v, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(enh[3], g_w.T @ u, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(enh[1], ref[1] / s[None, :], rtol=1e-4,
                               atol=1e-4)

  @parameterized.named_parameters(("enhanced", True), ("plain", False))
  def test_active_matmul_is_the_active_columns_of_the_full_gradient(
      self, enhanced):
    x, u, s, v, t = _matmul_problem(4, d_in=7, d_out=6, m=5)
    r = 2
    # Jitted: one compile each, not one per eager op (same custom VJPs).
    full = jax.jit(jax.grad(lambda x, u, s, v: jnp.sum(
        (sst.spectral_matmul(x, u, s, v, enhanced) - t) ** 2),
                            argnums=(0, 1, 2, 3)))(x, u, s, v)
    y = sst.active_matmul(x, u[:, :r], u[:, r:], s, v[:, :r], v[:, r:],
                          enhanced)
    np.testing.assert_allclose(y, sst.spectral_matmul(x, u, s, v), rtol=1e-5,
                               atol=1e-5)
    act = jax.jit(jax.grad(lambda x, ua, uf, s, va, vf: jnp.sum(
        (sst.active_matmul(x, ua, uf, s, va, vf, enhanced) - t) ** 2),
                           argnums=(0, 1, 2, 3, 4, 5)))(
                               x, u[:, :r], u[:, r:], s, v[:, :r], v[:, r:])
    dx, dua, duf, ds, dva, dvf = act
    np.testing.assert_allclose(dx, full[0], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dua, full[1][:, :r], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(ds, full[2], rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dva, full[3][:, :r], rtol=1e-4, atol=1e-4)
    # The frozen block is not trained: zero cotangent.
    np.testing.assert_array_equal(duf, 0)
    np.testing.assert_array_equal(dvf, 0)


class GradientMemoryTest(absltest.TestCase):

  def test_compiled_gradient_memory_is_below_dense(self):
    # One layer with m = d large and r small: the gradient of the active
    # block is [d, r]; the old form built the [d, m] gradients of U and V.
    d, r, n = 512, 4, 16
    p = _layer_params(d, d, r)["l"]
    x = jax.random.normal(jax.random.key(0), (n, d))
    u = jnp.concatenate([p["sst_u"], p["sst_u_frozen"]], axis=1)
    v = jnp.concatenate([p["sst_v"], p["sst_v_frozen"]], axis=1)

    def sst_loss(ua, s, va, uf, vf, x):
      return jnp.sum(sst.active_matmul(x, ua, uf, s, va, vf) ** 2)

    def dense_loss(u, s, v, x):
      return jnp.sum(sst.spectral_matmul(x, u, s, v) ** 2)

    sst_mem = optim.compiled_memory(jax.jit(jax.grad(
        sst_loss, argnums=(0, 1, 2))).lower(
            p["sst_u"], p["sst_s"], p["sst_v"], p["sst_u_frozen"],
            p["sst_v_frozen"], x).compile())
    dense_mem = optim.compiled_memory(jax.jit(jax.grad(
        dense_loss, argnums=(0, 1, 2))).lower(u, p["sst_s"], v, x).compile())
    used = lambda mem: mem["temp_bytes"] + mem["output_bytes"]
    dm_bytes = d * d * 4  # One [d, m] float32 array.
    print(f"gradient memory (temp+output): SST {used(sst_mem)} B, "
          f"dense [d, m] {used(dense_mem)} B, one [d, m] array {dm_bytes} B")
    # Outputs: the gradients (plus a small tuple table).
    self.assertBetween(dense_mem["output_bytes"], 2 * dm_bytes,
                       2 * dm_bytes + 4 * d + 256)
    self.assertBetween(sst_mem["output_bytes"], 4 * (2 * d * r + d),
                       4 * (2 * d * r + d) + 256)
    self.assertLess(used(sst_mem), dm_bytes)
    self.assertLess(used(sst_mem), used(dense_mem) / 10)

  def test_layer_gradient_of_the_frozen_block_is_zero(self):
    model = _One(12, 8, 3)
    x, y = _regression(model)
    grads = nnx.jit(nnx.grad(_mse))(model, x, y)
    np.testing.assert_array_equal(grads.layer.sst_u_frozen.get_value(), 0)
    np.testing.assert_array_equal(grads.layer.sst_v_frozen.get_value(), 0)
    self.assertEqual(grads.layer.sst_u.get_value().shape, (12, 3))
    self.assertTrue(np.all(np.any(grads.layer.sst_u.get_value() != 0, 0)))


class LayerTest(parameterized.TestCase):

  @parameterized.named_parameters(("top_r", None), ("sampled", 3))
  def test_from_linear_equals_dense(self, seed):
    lin = nnx.Linear(12, 8, bias_init=nnx.initializers.normal(1.0),
                     rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (3, 4, 12))
    want = lin(x)
    key = None if seed is None else jax.random.key(seed)
    layer = sst.SSTLinear.from_linear(lin, rank=3, sample_key=key)
    np.testing.assert_allclose(layer(x), want, atol=1e-5)
    self.assertEqual(
        [getattr(layer, n).get_value().shape for n in sst.SST_NAMES],
        [(12, 3), (12, 5), (8,), (8, 3), (8, 5)])
    u, s, v = _factors(layer)
    np.testing.assert_allclose(u.T @ u, np.eye(8), atol=1e-5)
    np.testing.assert_allclose(v.T @ v, np.eye(8), atol=1e-5)
    self.assertTrue(np.all(s >= 0))
    full_s = np.linalg.svd(np.asarray(lin.kernel.get_value()),
                           compute_uv=False)
    if seed is None:  # The top r are active.
      np.testing.assert_allclose(s, full_s, rtol=1e-5)
    else:  # A permutation of the singular values.
      np.testing.assert_allclose(np.sort(s)[::-1], full_s, rtol=1e-5)

  def test_full_rank_layer_has_empty_frozen_block(self):
    layer = sst.SSTLinear(4, 6, rank=4, rngs=nnx.Rngs(0))
    self.assertEqual(layer.sst_u_frozen.get_value().shape, (4, 0))
    x = jnp.ones((2, 4))
    np.testing.assert_allclose(layer(x), x @ layer.kernel(), atol=1e-5)

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, r"rank must be an int in \[1, "
                                r"min\(d_in, d_out\) = 4\]"):
      sst.SSTLinear(4, 8, rank=5, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "needs rngs"):
      sst.SSTLinear(4, 8, rank=2)
    layer = sst.SSTLinear(4, 8, rank=2, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "expected 4"):
      layer(jnp.ones((2, 5)))

  def test_base_linear_of_other_sizes_is_refused(self):
    # The check shared by SSTLinear and SLTrainLinear.
    linear = nnx.Linear(4, 8, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError,
                                "linear is 4 -> 8; expected 8 -> 4"):
      sst.base_linear(8, 4, linear)

  def test_stacked_layer_runs_inside_the_scan_only(self):
    model = sst.to_sst(_llama(scan_layers=True), targets=r".*q_proj", rank=4)
    layer = model.model.layers.self_attn.q_proj
    with self.assertRaisesRegex(ValueError,
                                "SSTLinear holds stacked parameters"):
      layer(jnp.ones((1, layer.in_features)))


class ConversionTest(parameterized.TestCase):

  @parameterized.named_parameters(("list", False), ("scan", True))
  def test_to_sst_then_to_dense_is_identity(self, scan_layers):
    model = _llama(scan_layers)
    ids = jax.random.randint(jax.random.key(0), (2, 8), 0, 256)
    want = _forward(model, ids)
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
    if scan_layers:  # [L, d, r] + [L, d, m - r], one decomposition per layer.
      self.assertEqual(layer0.mlp.down_proj.sst_u.get_value().shape,
                       (2, 128, 4))
      self.assertEqual(layer0.mlp.down_proj.sst_u_frozen.get_value().shape,
                       (2, 128, 60))
    np.testing.assert_allclose(_forward(model, ids), want, atol=2e-5)
    sst.to_dense(model)
    self.assertEmpty(sst.sst_modules(model))
    layer0 = model.model.layers if scan_layers else model.model.layers[0]
    dense = layer0.mlp.down_proj
    self.assertIs(type(dense), nnx.Linear)
    np.testing.assert_allclose(dense.kernel.get_value(), kernel, atol=1e-5)
    self.assertEqual(dense.kernel.get_metadata()["out_sharding"], axes)
    np.testing.assert_allclose(_forward(model, ids), want, atol=2e-5)

  def test_seed_draws_the_first_active_set(self):
    pick = lambda seed: np.asarray(sst.to_sst(
        _llama(), targets=r".*q_proj", rank=4, seed=seed)
                                   .model.layers[0].self_attn.q_proj
                                   .sst_s.get_value())
    np.testing.assert_array_equal(pick(1), pick(1))
    top = pick(None)
    np.testing.assert_array_equal(top, np.sort(top)[::-1])  # SVD order.
    self.assertFalse(np.array_equal(pick(1)[:4], top[:4]))

  @parameterized.named_parameters(
      ("no_match", dict(targets=r".*nothing", rank=2),
       "matched no nnx.Linear"),
      ("not_linear", dict(targets=r"model\.embed_tokens", rank=2),
       "not nnx.Linear.*embed_tokens"),
      ("rank_too_large", dict(targets=r".*q_proj", rank=65),
       "q_proj.*rank must be"),
      ("bool_seed", dict(targets=r".*q_proj", rank=2, seed=True),
       "seed must be an int or None"),
  )
  def test_conversion_errors(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      sst.to_sst(_llama(), **kwargs)

  def test_layer_with_an_adapter_is_refused(self):
    model = _llama()
    adapters.inject(model, targets=["q_proj"], rank=2)
    with self.assertRaisesRegex(ValueError, r"q_proj \(has an adapter"):
      sst.to_sst(model, targets=r".*q_proj", rank=2)

  def test_to_dense_without_spectral_layers(self):
    with self.assertRaisesRegex(ValueError, "no SSTLinear"):
      sst.to_dense(_llama())


class OptimizerTest(parameterized.TestCase):

  def _setup(self, d_in=12, d_out=8, rank=3, **kwargs):
    model = _One(d_in, d_out, rank)
    tx = sst.sst_adamw(1e-2, rank=sst.ranks(model), **kwargs)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    return model, opt, _regression(model)

  def test_step_moves_only_active_vectors(self):
    model, opt, (x, y) = self._setup()  # Defaults: no resample in 3 steps.
    head = np.asarray(model.head.kernel.get_value())
    for _ in range(3):
      u0, s0, v0 = _factors(model.layer)
      sst.train_step(model, opt, _mse, x, y)
      u1, s1, v1 = _factors(model.layer)
      np.testing.assert_array_equal(u1[:, 3:], u0[:, 3:])
      np.testing.assert_array_equal(v1[:, 3:], v0[:, 3:])
      self.assertTrue(np.all(np.any(u1[:, :3] != u0[:, :3], axis=0)))
      self.assertTrue(np.all(np.any(v1[:, :3] != v0[:, :3], axis=0)))
      self.assertTrue(np.all(s1 != s0))  # Every singular value moves.
      self.assertTrue(np.all(s1 >= 0))
      # Columns stay unit-norm (the active ones are renormalised).
      np.testing.assert_allclose(np.linalg.norm(u1, axis=0), 1, atol=1e-5)
      np.testing.assert_allclose(np.linalg.norm(v1, axis=0), 1, atol=1e-5)
    # The dense head is trained by the same transform.
    self.assertFalse(np.allclose(model.head.kernel.get_value(), head))

  def test_resample_swaps_in_new_vectors_and_keeps_the_others_state(self):
    model, opt, (x, y) = self._setup(refresh_every=2, round_length=100)
    swaps = 0
    for _ in range(8):
      u_prev = _factors(model.layer)[0]
      count = int(opt.opt_state.count.get_value())
      sst.train_step(model, opt, _mse, x, y)
      if (count + 1) % 2:
        continue
      u_new = _factors(model.layer)[0]
      state = opt.opt_state
      mu = np.asarray(state.block_state.mu["layer.sst_u"].get_value())
      nu = np.asarray(state.block_state.nu["layer.sst_u"].get_value())
      # The Adam count runs on (block_reset="new").
      self.assertEqual(int(state.block_state.count.get_value()), count + 1)
      # Zero moments exactly in the slots that received a new vector ...
      fresh = np.all(mu == 0, axis=0)
      np.testing.assert_array_equal(np.all(nu == 0, axis=0), fresh)
      # ... which is a former frozen column, unchanged (up to the rounding
      # of p + (new - p) in apply_updates).
      same = lambda a, b: np.all(np.abs(a - b) < 1e-6, axis=0)
      for j in np.flatnonzero(fresh):
        self.assertTrue(np.any(same(u_new[:, j:j + 1], u_prev[:, 3:])), j)
      # The slots that kept their vector kept its (nonzero) moments, and the
      # vectors that left went to the frozen block, one per new vector.
      self.assertTrue(np.all(np.any(mu[:, ~fresh] != 0, axis=0)))
      left = [j for j in range(3, 8)
              if not np.any(same(u_new[:, j:j + 1], u_prev[:, 3:]))]
      self.assertLen(left, int(fresh.sum()))
      swaps += int(fresh.sum())
    self.assertGreater(swaps, 0)

  def test_block_reset_all_reinitialises_the_block_state(self):
    model, opt, (x, y) = self._setup(refresh_every=2, round_length=4,
                                     block_reset="all")
    sst.train_step(model, opt, _mse, x, y)
    self.assertEqual(int(opt.opt_state.block_state.count.get_value()), 1)
    sst.train_step(model, opt, _mse, x, y)  # End of an iteration.
    state = opt.opt_state
    self.assertEqual(int(state.block_state.count.get_value()), 0)
    for leaf in jax.tree.leaves(nnx.as_pure(state.block_state.mu)):
      np.testing.assert_array_equal(leaf, 0)
    self.assertEqual(int(state.dense_state.count.get_value()), 2)
    self.assertEqual(int(state.s_state.count.get_value()), 2)
    for _ in range(2):
      sst.train_step(model, opt, _mse, x, y)
    # Step 4 ended round 1: re-SVD, so the s moments were reset too.
    self.assertEqual(int(opt.opt_state.s_state.count.get_value()), 0)
    self.assertEqual(int(opt.opt_state.dense_state.count.get_value()), 4)

  def test_round_length_is_m_over_r_iterations(self):
    # m = 8, r = 3: ceil(8 / 3) = 3 iterations of 2 steps, re-SVD at 6.
    model, opt, (x, y) = self._setup(refresh_every=2)
    for step in range(1, 7):
      sst.train_step(model, opt, _mse, x, y)
      mu_s = np.asarray(opt.opt_state.s_state.mu["layer.sst_s"].get_value())
      # Counts run on; the s moments are zeroed only at the round end.
      self.assertEqual(int(opt.opt_state.s_state.count.get_value()), step)
      self.assertEqual(bool(np.all(mu_s == 0)), step == 6, step)
    mu_u = opt.opt_state.block_state.mu["layer.sst_u"].get_value()
    np.testing.assert_array_equal(mu_u, 0)  # The basis was rotated.
    u, _, v = _factors(model.layer)  # Orthonormal again after the re-SVD.
    np.testing.assert_allclose(u.T @ u, np.eye(8), atol=1e-5)
    np.testing.assert_allclose(v.T @ v, np.eye(8), atol=1e-5)

  def test_resvd_step_keeps_represented_kernel(self):
    model = _One(12, 8, 3)
    # Perturb U away from orthonormality (unit columns, mixed directions).
    u = jnp.concatenate([model.layer.sst_u.get_value(),
                         model.layer.sst_u_frozen.get_value()], axis=1)
    u = u + 0.3 * jnp.roll(u, 1, axis=1)
    u = u / jnp.linalg.norm(u, axis=0)[None, :]
    model.layer.sst_u.set_value(u[:, :3])
    model.layer.sst_u_frozen.set_value(u[:, 3:])
    w = np.asarray(model.layer.kernel())
    # lr 0: only the re-SVD and the swap (which keeps the function).
    tx = sst.sst_adamw(0.0, refresh_every=1, round_length=1)
    opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    sst.train_step(model, opt, _mse, *_regression(model))
    np.testing.assert_allclose(model.layer.kernel(), w, atol=1e-5)
    u1, s1, v1 = _factors(model.layer)
    np.testing.assert_allclose(u1.T @ u1, np.eye(8), atol=1e-5)
    np.testing.assert_allclose(v1.T @ v1, np.eye(8), atol=1e-5)
    self.assertTrue(np.all(s1 >= 0))

  @parameterized.named_parameters(
      # Library defaults: T3 = 100, 10-step re-warm-up, round 400 steps.
      ("defaults", {}, 103, 100, 10),
      ("short_iterations", dict(refresh_every=3, rewarm_steps=2,
                                round_length=30), 10, 3, 2))
  def test_matches_numpy_reference(self, kwargs, steps, t3, warm):
    params = _layer_params(8, 6, 2)
    grads = _grad_sequence(params, steps)
    lr = 1e-2
    got, state = _run(sst.sst_adamw(lr, **kwargs), params, grads)
    want, mom = _reference(params, grads, lr=lr, refresh_every=t3,
                           rewarm_steps=warm)
    for k, v in want.items():
      np.testing.assert_allclose(got["l"][k], v, atol=2e-5, rtol=1e-4,
                                 err_msg=k)
    for k in ("sst_u", "sst_v"):
      np.testing.assert_allclose(state.block_state.mu[f"l.{k}"], mom[k][0],
                                 atol=1e-5, rtol=1e-3, err_msg=k)
    np.testing.assert_allclose(state.s_state.mu["l.sst_s"], mom["sst_s"][0],
                               atol=1e-5, rtol=1e-3)

  def test_default_update_is_not_sign_sgd(self):
    # The former defaults (T3 = 1 with the state and count reset at every
    # resample) made every U/V step lr·sign(g). With the defaults, momentum
    # accumulates within the iteration.
    params = _layer_params(8, 6, 2)
    grads = _grad_sequence(params, 5)
    lr = 1e-2
    got, state = _run(sst.sst_adamw(lr), params, grads)
    mu = np.asarray(state.block_state.mu["l.sst_u"])
    want_mu = sum(0.1 * 0.9 ** (4 - t) * np.asarray(g["l"]["sst_u"])
                  for t, g in enumerate(grads))
    np.testing.assert_allclose(mu, want_mu, rtol=1e-4, atol=1e-6)
    self.assertGreater(np.abs(mu - 0.1 * grads[-1]["l"]["sst_u"]).max(), 0.05)
    sign_u = np.asarray(params["l"]["sst_u"], np.float64)
    for g in grads:
      sign_u = _normalize(sign_u - lr * np.sign(g["l"]["sst_u"]))
    self.assertGreater(np.abs(np.asarray(got["l"]["sst_u"]) - sign_u).max(),
                       1e-3)
    # The former configuration is still reachable and is sign-SGD.
    old, _ = _run(sst.sst_adamw(lr, refresh_every=1, round_length=10**6,
                                rewarm_steps=0, block_reset="all"),
                  params, grads[:1])
    step = np.asarray(params["l"]["sst_u"]) - lr * np.sign(
        grads[0]["l"]["sst_u"])
    u_old = np.concatenate([old["l"]["sst_u"], old["l"]["sst_u_frozen"]], 1)
    # After the swap the first-step columns sit somewhere in [U | U_frozen].
    for j in range(2):
      col = step[:, j] / np.linalg.norm(step[:, j])
      self.assertTrue(np.any(np.all(np.abs(u_old - col[:, None]) < 1e-5,
                                    axis=0)))

  @parameterized.named_parameters(
      ("explicit", 4, 4, [1, 1, 1, 1, .25, .5, .75, 1, .25, .5, .75, 1]),
      ("derived", 20, None, [1] * 20 + [.5, 1, 1, 1]),
      ("off", 4, 0, [1] * 8))
  def test_learning_rate_rewarms_after_each_resample(self, t3, warm, want):
    # With an identity inner and a gradient orthogonal to each unit column,
    # a step `p - a g` renormalises to (p - a g) / sqrt(1 + a²), so the
    # effective rate a is read off p_new · p.
    lr = 0.2
    params = _layer_params(8, 6, 2)
    tx = sst.sst_optimizer(optax.identity(), lr, refresh_every=t3,
                           rewarm_steps=warm, round_length=1000)
    update = jax.jit(tx.update)
    state = tx.init(params)
    got = []
    for c in range(len(want)):
      p = params["l"]["sst_u"]
      g = np.asarray(jax.random.normal(jax.random.key(c), p.shape))
      g -= np.sum(g * p, axis=0, keepdims=True) * p
      g /= np.linalg.norm(g, axis=0, keepdims=True)
      grads = jax.tree.map(jnp.zeros_like, params)
      grads["l"]["sst_u"] = jnp.asarray(g)
      upd, state = update(grads, state, params)
      new = optax.apply_updates(params, upd)
      if (c + 1) % t3:
        cos = np.sum(np.asarray(new["l"]["sst_u"]) * np.asarray(p), axis=0)
      else:  # The swap moved columns: undo it via the pre-swap values.
        full = np.concatenate([new["l"]["sst_u"], new["l"]["sst_u_frozen"]],
                              1)
        cos = np.max(np.asarray(p).T @ full, axis=1)
      got.append(np.sqrt(1 / cos**2 - 1) / lr)
      params = new
    np.testing.assert_allclose(np.asarray(got), np.asarray(want)[:, None]
                               * np.ones((1, 2)), rtol=2e-3)

  def test_state_is_o_r_m_plus_n(self):
    d_in, d_out, r = 64, 256, 4
    model = _One(d_in, d_out, r)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    state = sst.sst_adamw(1e-3).init(params)
    m = min(d_in, d_out)
    spectral_state = (optim.state_bytes(state.block_state)
                      + optim.state_bytes(state.s_state))
    # Adam: two moments of the [d_in, r] and [d_out, r] blocks and of
    # s, two int32 counts.
    self.assertEqual(spectral_state, 4 * (2 * r * (d_in + d_out) + 2 * m + 2))
    dense_adam = optim.state_bytes(
        optax.adamw(1e-3).init({"w": jnp.zeros((d_in, d_out))}))
    self.assertLess(spectral_state, dense_adam / 10)
    # Abstract accounting agrees (no allocation).
    self.assertEqual(optim.estimate_bytes(params, sst.sst_adamw(1e-3)),
                     optim.state_bytes(state))

  def test_a_bare_layer_is_a_model(self):
    # The root module has the empty path: its leaves are "sst_u", ...
    layer = sst.SSTLinear(12, 8, rank=3, rngs=nnx.Rngs(0))
    opt = nnx.Optimizer(layer, sst.sst_adamw(1e-2, refresh_every=2),
                        wrt=nnx.Param)
    x = jax.random.normal(jax.random.key(0), (8, 12))
    loss = lambda m, x: jnp.mean((m(x) - 1.0) ** 2)
    losses = [float(sst.train_step(layer, opt, loss, x)) for _ in range(6)]
    self.assertLess(losses[-1], losses[0])
    self.assertIn("sst_u", opt.opt_state.block_state.mu)

  def test_seed_as_key_equals_int_seed(self):
    params = _layer_params(8, 6, 2)
    grads = _grad_sequence(params, 2)
    a, _ = _run(sst.sst_adamw(1e-2, refresh_every=1, seed=7), params, grads)
    b, _ = _run(sst.sst_adamw(1e-2, refresh_every=1,
                              seed=jax.random.key(7)), params, grads)
    for k in a["l"]:
      np.testing.assert_array_equal(a["l"][k], b["l"][k])


class OptimizerErrorTest(parameterized.TestCase):
  """Bad arguments: each raises ValueError with a message naming the fix."""

  @parameterized.named_parameters(
      ("seed_array", dict(seed=jnp.zeros(2, jnp.uint32)), "scalar PRNG key"),
      ("seed_bool", dict(seed=True), "scalar PRNG key"),
      ("refresh_every_zero", dict(refresh_every=0),
       r"refresh_every must be an int >= 1"),
      ("refresh_every_bool", dict(refresh_every=True),
       r"refresh_every must be an int >= 1"),
      ("round_not_multiple", dict(refresh_every=3, round_length=10),
       "multiple of refresh_every"),
      ("round_zero", dict(round_length=0), r"round_length must be an int >= 1"),
      ("rewarm_negative", dict(rewarm_steps=-1),
       r"rewarm_steps must be an int >= 0"),
      ("rewarm_too_long", dict(refresh_every=4, rewarm_steps=5),
       r"must be <= refresh_every \(4\)"),
      ("block_reset", dict(block_reset="old"), "block_reset must be one of"),
  )
  def test_constructor_errors(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      sst.sst_adamw(1e-3, **kwargs)

  def test_rank_that_differs_from_the_layer(self):
    params = nnx.as_pure(nnx.state(_One(12, 8, 3), nnx.Param))
    with self.assertRaisesRegex(ValueError, r"rank for 'layer' is 4.*3 "
                                r"columns.*to_sst\(rank=...\)"):
      sst.sst_adamw(1e-3, rank=4).init(params)

  def test_rank_mapping_without_the_layer(self):
    params = nnx.as_pure(nnx.state(_One(12, 8, 3), nnx.Param))
    with self.assertRaisesRegex(ValueError, "no entry for spectral layer"):
      sst.sst_adamw(1e-3, rank={"other": 3}).init(params)

  def test_update_without_params(self):
    params = nnx.as_pure(nnx.state(_One(12, 8, 3), nnx.Param))
    tx = sst.sst_adamw(1e-3)
    with self.assertRaisesRegex(ValueError, "needs params"):
      tx.update(params, tx.init(params))

  def test_missing_leaves(self):
    model = _One(12, 8, 3)
    partial = nnx.as_pure(nnx.state(model, nnx.PathContains("sst_u")))
    with self.assertRaisesRegex(ValueError, r"lacks \['sst_u_frozen', "
                                r"'sst_s', 'sst_v', 'sst_v_frozen'\].*"
                                r"wrt=nnx.Param"):
      sst.sst_adamw(1e-3).init(partial)

  def test_inconsistent_shapes(self):
    params = _layer_params(8, 6, 2)
    params["l"]["sst_u_frozen"] = params["l"]["sst_u_frozen"][:, :3]
    with self.assertRaisesRegex(ValueError, r"inconsistent shapes.*"
                                r"\[\.\.\., d_in, m - r\]"):
      sst.sst_adamw(1e-3).init(params)


class TrainingTest(parameterized.TestCase):

  @parameterized.named_parameters(("list", False), ("scan", True))
  def test_tiny_lm_loss_decreases(self, scan_layers):
    model = _llama(scan_layers, seed=5)
    sst.to_sst(model, targets=r".*(q_proj|down_proj)", rank=4)
    tx = sst.sst_adamw(1e-2, rank=sst.ranks(model), refresh_every=2,
                       round_length=4, rewarm_steps=1)
    # Built on the model's mesh, like the model: optimizer state made off
    # it (scalar counts without the mesh) comes back from the first step
    # with it, and the step compiled a second time.
    with _mesh():
      opt = nnx.Optimizer(model, tx, wrt=nnx.Param)
    ids = np.asarray(jax.random.randint(jax.random.key(6), (4, 16), 0, 32))

    def loss_fn(model, ids):
      return llama.next_token_loss(model(ids), ids)

    losses = [float(sst.train_step(model, opt, loss_fn, ids))
              for _ in range(8)]  # Two rounds, so two re-SVDs.
    self.assertLess(losses[-1], 0.7 * losses[0], losses)
    if scan_layers:  # Stacked layers: [L, d, r] active blocks.
      self.assertEqual(
          opt.opt_state.block_state.mu[
              "model.layers.self_attn.q_proj.sst_u"].get_value().shape,
          (2, 64, 4))


if __name__ == "__main__":
  absltest.main()
