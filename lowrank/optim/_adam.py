"""Adam with one bias-correction count per slice of each leaf (shared code).

`scale_by_adam_per_matrix` (GaLore, counts per matrix: `shape[:-2]`) and
`scale_by_adam_per_slice` (layer sampling, counts per leading slice:
`shape[:1]`) are this one transform with a different count shape.
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax


def scale_by_adam_counted(
    b1: jax.typing.ArrayLike,
    b2: jax.typing.ArrayLike,
    eps: jax.typing.ArrayLike,
    eps_root: jax.typing.ArrayLike,
    *,
    count_shape: Callable[[tuple[int, ...]], tuple[int, ...]],
    state: Callable[..., Any],
    torch_eps: bool = False,
) -> optax.GradientTransformation:
  """`optax.scale_by_adam` with an int32 step count per slice of each leaf.

  The counts of a leaf have shape `count_shape(leaf.shape)`, a prefix of
  the leaf's shape; each count is broadcast over the trailing axes. With
  every count stepped together this equals `optax.scale_by_adam`; callers
  that reset or freeze moments per slice reset or freeze their counts too.

  Args:
    b1: Decay of the first moment.
    b2: Decay of the second moment.
    eps: Added to the denominator outside the square root.
    eps_root: Added to the second moment inside the square root.
    count_shape: Leaf shape -> shape of its counts (a prefix of it).
    state: The state class, called as `state(count=, mu=, nu=)`.
    torch_eps: `m / (√v + eps) · √(1−β2ᵗ)/(1−β1ᵗ)` instead: eps added to
      the uncorrected `√v` and the bias correction applied afterwards, as
      torch AdamW codes (galore-torch, Fira) compute it (`eps_root` unused).

  Returns:
    An `optax.GradientTransformation`.
  """

  def init_fn(params):
    return state(
        count=jax.tree.map(
            lambda p: jnp.zeros(count_shape(jnp.shape(p)), jnp.int32),
            params),
        mu=jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params),
        nu=jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), params),
    )

  def update_fn(updates, old, params=None):
    del params
    # Cast back: array hyperparameters (`inject_hyperparams`) are float32.
    mu = jax.tree.map(
        lambda g, m: (b1 * m + (1 - b1) * g).astype(m.dtype), updates,
        old.mu)
    nu = jax.tree.map(
        lambda g, v: (b2 * v + (1 - b2) * jnp.square(g)).astype(v.dtype),
        updates, old.nu)
    count = jax.tree.map(optax.safe_int32_increment, old.count)

    def _step(g, m, v, c):
      c = c.reshape(c.shape + (1,) * (g.ndim - c.ndim))
      if torch_eps:
        step = jnp.sqrt(1 - b2**c) / (1 - b1**c)
        return (m / (jnp.sqrt(v) + eps) * step.astype(m.dtype)).astype(
            g.dtype)
      m_hat = m / (1 - b1**c).astype(m.dtype)
      v_hat = v / (1 - b2**c).astype(v.dtype)
      return (m_hat / (jnp.sqrt(v_hat + eps_root) + eps)).astype(g.dtype)

    updates = jax.tree.map(_step, updates, mu, nu, count)
    return updates, state(count=count, mu=mu, nu=nu)

  return optax.GradientTransformation(init_fn, update_fn)
