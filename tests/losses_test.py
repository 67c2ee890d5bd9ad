"""Tests for lowrank.retrieval.losses."""

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


if __name__ == "__main__":
  absltest.main()
