"""Tests for ALLoRA's adaptive learning rate (`lowrank.optim.allora`)."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import adapters
from lowrank import sharding
from lowrank.optim import allora

from tests import testing


def _params(dtype=jnp.float32):
  k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
  return {
      "layer": {
          "lora_a": jax.random.normal(k1, (6, 2, 3)).astype(dtype),
          "lora_b": jax.random.normal(k2, (3, 5)).astype(dtype),
      },
      "gate": jax.random.normal(k3, (3,)).astype(dtype),
  }


def _loss(params):
  a = params["layer"]["lora_a"].reshape(12, 3)
  delta = a @ (params["layer"]["lora_b"] * params["gate"][:, None])
  return jnp.sum((delta.astype(jnp.float32) - 1.0) ** 2)


class ScaleByALLoRATest(parameterized.TestCase):

  def test_coefficient_formula(self):
    eta = 2.0
    params = _params()
    updates = jax.tree.map(jnp.ones_like, params)
    tx = allora.scale_by_allora(eta)
    out, _ = tx.update(updates, tx.init(params), params)
    a = np.asarray(params["layer"]["lora_a"], np.float64)
    b = np.asarray(params["layer"]["lora_b"], np.float64)
    g = np.asarray(params["gate"], np.float64)
    # lora_a: one norm per rank component (over all input dims).
    want_a = 1 / np.sqrt(np.sum(a**2, axis=(0, 1)) + 1 / eta**2)
    # lora_b: one norm per output unit (over the rank axis).
    want_b = 1 / np.sqrt(np.sum(b**2, axis=0) + 1 / eta**2)
    want_g = 1 / np.sqrt(np.sum(g**2) + 1 / eta**2)
    np.testing.assert_allclose(out["layer"]["lora_a"],
                               np.broadcast_to(want_a, a.shape), rtol=1e-6)
    np.testing.assert_allclose(out["layer"]["lora_b"],
                               np.broadcast_to(want_b, b.shape), rtol=1e-6)
    np.testing.assert_allclose(out["gate"], np.full(3, want_g), rtol=1e-6)

  def test_zero_norm_gives_eta_and_large_norm_gives_inverse_norm(self):
    tx = allora.scale_by_allora(eta=5.0)
    p = {"lora_b": jnp.zeros((2, 3)), "big": jnp.full((4,), 500.0)}
    out, _ = tx.update(jax.tree.map(jnp.ones_like, p), tx.init(p), p)
    np.testing.assert_allclose(out["lora_b"], 5.0, rtol=1e-6)
    np.testing.assert_allclose(out["big"], 1 / 1000.0, rtol=1e-5)

  def test_nnx_state_paths_and_custom_axes(self):
    with sharding.use_mesh():
      model = _Wrap(nnx.Linear(4, 3, rngs=nnx.Rngs(0)))
      adapters.inject(model, targets="lin", rank=2)
      model.lin.lora_b.set_value(jnp.ones((2, 3)))
      state = nnx.state(model, nnx.LoRAParam)  # Leaves under `.value`.
      ones = jax.tree.map(jnp.ones_like, state)
      tx = allora.scale_by_allora(1.0)
      out, _ = tx.update(ones, tx.init(state), state)
      # Per output unit of B: norm sqrt(2) -> 1 / sqrt(2 + 1).
      np.testing.assert_allclose(out["lin"]["lora_b"].get_value(),
                                 1 / np.sqrt(3.0), rtol=1e-6)
      whole = allora.scale_by_allora(
          1.0, axes=lambda path, leaf: tuple(range(leaf.ndim)))
      out, _ = whole.update(ones, whole.init(state), state)
      np.testing.assert_allclose(out["lin"]["lora_b"].get_value(),
                                 1 / np.sqrt(7.0), rtol=1e-6)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "eta must be > 0"):
      allora.scale_by_allora(0.0)
    tx = allora.scale_by_allora(1.0)
    with self.assertRaisesRegex(ValueError, "needs the parameters"):
      tx.update(_params(), tx.init(_params()))

  def test_allora_adamw_step(self):
    lr, eta = 0.1, 3.0
    params = _params()
    grads = jax.grad(_loss)(params)
    tx = allora.allora_adamw(lr, eta=eta)
    updates, _ = tx.update(grads, tx.init(params), params)
    adam = optax.scale_by_adam()
    direction, _ = adam.update(grads, adam.init(params), params)
    coef, _ = allora.scale_by_allora(eta).update(
        jax.tree.map(jnp.ones_like, params), optax.EmptyState(), params)
    want = jax.tree.map(lambda d, c: -lr * d * c, direction, coef)
    for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
      np.testing.assert_allclose(u, w, rtol=1e-6, atol=1e-8)

  def test_trains_scale_free_lora_with_nnx_optimizer(self):
    """ALLoRA's setting: LoRA with scale 1, no dropout, B = 0 at start."""
    x = jax.random.normal(jax.random.key(1), (32, 8))
    y = jnp.sin(x @ jax.random.normal(jax.random.key(2), (8, 8)))
    with sharding.use_mesh():
      model = _Wrap(nnx.Linear(8, 8, rngs=nnx.Rngs(0)))
      adapters.inject(model, targets="lin", rank=4, alpha=4, dropout=0.0)
      self.assertEqual(model.lin.scale, 1.0)
      losses = testing.train_lora(model, allora.allora_adamw(3e-2, eta=4.0),
                                  lambda m: jnp.mean((m(x) - y) ** 2), 40)
    self.assertLess(losses[-1], 0.7 * losses[0])


class _Wrap(nnx.Module):

  def __init__(self, lin):
    self.lin = lin

  def __call__(self, x):
    return self.lin(x)


if __name__ == "__main__":
  absltest.main()
