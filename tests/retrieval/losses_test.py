"""Tests for lowrank.retrieval.losses."""

import functools

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank.retrieval import losses


def _unit(x):
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


class InBatchSoftmaxTest(absltest.TestCase):

  def test_matches_optax_ranking_softmax(self):
    k1, k2 = jax.random.split(jax.random.key(0))
    q = _unit(jax.random.normal(k1, (6, 16)))
    d = _unit(jax.random.normal(k2, (6, 16)))
    want = optax.losses.ranking_softmax_loss(20.0 * q @ d.T, jnp.eye(6))
    np.testing.assert_allclose(losses.in_batch_softmax(q, d, 20.0), want,
                               rtol=1e-5)

  def test_hard_negatives_and_symmetric(self):
    k1, k2 = jax.random.split(jax.random.key(1))
    q = _unit(jax.random.normal(k1, (4, 8)))
    d = _unit(jax.random.normal(k2, (7, 8)))  # 4 positives + 3 negatives.
    s = 10.0 * np.asarray(q @ d.T)
    row = -np.mean([s[i, i] - np.log(np.exp(s[i]).sum()) for i in range(4)])
    col = -np.mean(
        [s[i, i] - np.log(np.exp(s[:4, i]).sum()) for i in range(4)])
    np.testing.assert_allclose(losses.in_batch_softmax(q, d, 10.0), row,
                               rtol=1e-5)
    np.testing.assert_allclose(
        losses.in_batch_softmax(q, d, 10.0, symmetric=True),
        0.5 * (row + col), rtol=1e-5)

  def test_too_few_documents(self):
    with self.assertRaisesRegex(ValueError, "at least 4 documents"):
      losses.in_batch_softmax(jnp.ones((4, 2)), jnp.ones((3, 2)))


class MatryoshkaTest(absltest.TestCase):

  def test_sum_of_truncated_renormalised_losses(self):
    k1, k2 = jax.random.split(jax.random.key(2))
    q = jax.random.normal(k1, (5, 16))
    d = jax.random.normal(k2, (5, 16))
    fn = functools.partial(losses.in_batch_softmax, scale=10.0)
    got = losses.matryoshka(fn, q, d, (16, 8, 4), (1.0, 0.5, 0.25))
    want = sum(
        w * fn(_unit(q[:, :m]), _unit(d[:, :m]))
        for m, w in ((16, 1.0), (8, 0.5), (4, 0.25)))
    np.testing.assert_allclose(got, want, rtol=1e-5)

  def test_validation(self):
    fn = losses.in_batch_softmax
    with self.assertRaisesRegex(ValueError, r"sizes in \[1, 4\]"):
      losses.matryoshka(fn, jnp.ones((2, 4)), jnp.ones((2, 4)), (8,))
    with self.assertRaisesRegex(ValueError, "2 weights for 1 dims"):
      losses.matryoshka(fn, jnp.ones((2, 4)), jnp.ones((2, 4)), (4,),
                        (1.0, 2.0))


class GatheredSoftmaxTest(absltest.TestCase):

  def test_shard_map_equals_global_loss(self):
    mesh = jax.make_mesh((8,), ("data",),
                         axis_types=(jax.sharding.AxisType.Explicit,))
    k1, k2 = jax.random.split(jax.random.key(3))
    q = _unit(jax.random.normal(k1, (16, 8)))
    d = _unit(jax.random.normal(k2, (16, 8)))
    spec = jax.sharding.PartitionSpec("data")

    @jax.jit
    @functools.partial(jax.shard_map, mesh=mesh, in_specs=(spec, spec),
                       out_specs=jax.sharding.PartitionSpec())
    def sharded(q, d):
      local = losses.gathered_in_batch_softmax(q, d, 20.0, axis_name="data")
      return jax.lax.pmean(local, "data")

    sh = jax.sharding.NamedSharding(mesh, spec)
    got = sharded(jax.device_put(q, sh), jax.device_put(d, sh))
    np.testing.assert_allclose(got, losses.in_batch_softmax(q, d, 20.0),
                               rtol=1e-5)


class GradCacheTest(absltest.TestCase):

  def test_gradients_equal_uncached(self):
    k = jax.random.split(jax.random.key(4), 4)
    params = {"w": jax.random.normal(k[0], (6, 8)) * 0.3,
              "b": jax.random.normal(k[1], (8,)) * 0.1}
    xq = jax.random.normal(k[2], (12, 3, 6))
    xd = jax.random.normal(k[3], (12, 5, 6))

    def encode(p, x):  # mean-pooled tanh layer, then normalised.
      h = jnp.tanh(jnp.einsum("btd,de->bte", x, p["w"]) + p["b"][None, None])
      return _unit(h.mean(axis=1))

    def loss(q, d):
      return losses.in_batch_softmax(q, d, 20.0, symmetric=True)

    want_l, want_g = jax.value_and_grad(
        lambda p: loss(encode(p, xq), encode(p, xd)))(params)
    got_l, got_g = jax.jit(functools.partial(
        losses.grad_cache, encode, loss, chunk_size=4))(params, xq, xd)
    np.testing.assert_allclose(got_l, want_l, rtol=1e-5)
    for name in params:
      np.testing.assert_allclose(got_g[name], want_g[name], rtol=1e-4,
                                 atol=1e-6)

  def test_chunk_size_must_divide(self):
    with self.assertRaisesRegex(ValueError, "divide the batch size 6"):
      losses.grad_cache(lambda p, x: x, lambda q, d: 0.0, {}, jnp.ones((6, 2)),
                        jnp.ones((6, 2)), chunk_size=4)

  def test_peak_memory_is_one_chunk(self):
    """Compiled temp memory grows with the chunk, not the batch."""
    w = jnp.ones((64, 64)) * 0.01
    x = jnp.ones((256, 32, 64))

    def encode(p, x):
      h = x
      for _ in range(4):
        h = jnp.tanh(h @ p)
      return _unit(h.mean(axis=1))

    def loss(q, d):
      return losses.in_batch_softmax(q, d, 20.0)

    def temp(fn):
      return jax.jit(fn).lower(w, x, x).compile().memory_analysis(
      ).temp_size_in_bytes

    plain = temp(lambda p, a, b: jax.value_and_grad(
        lambda p: loss(encode(p, a), encode(p, b)))(p))
    cached = temp(lambda p, a, b: losses.grad_cache(
        encode, loss, p, a, b, chunk_size=16))
    self.assertLess(cached, plain / 4)


if __name__ == "__main__":
  absltest.main()
