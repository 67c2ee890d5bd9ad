"""Optimizer-state memory accounting (exact, from shapes and dtypes)."""

from typing import Any

import jax
import optax


def tree_bytes(tree: Any) -> int:
  """Total bytes of the array leaves of `tree` (arrays or ShapeDtypeStructs).

  PRNG key arrays count their raw key data.
  """
  total = 0
  for x in jax.tree.leaves(tree):
    if not hasattr(x, "shape"):
      continue
    dtype = x.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      total += jax.random.key_data(x).nbytes if hasattr(x, "nbytes") else 8
      continue
    size = 1
    for d in x.shape:
      size *= d
    total += size * jax.numpy.dtype(dtype).itemsize
  return total


def state_bytes(opt_state: optax.OptState) -> int:
  """Bytes held by an optimizer state (concrete or abstract)."""
  return tree_bytes(opt_state)


def estimate_bytes(params: Any, tx: optax.GradientTransformation) -> int:
  """Bytes `tx.init(params)` would allocate, without allocating it."""
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params
  )
  return tree_bytes(jax.eval_shape(tx.init, abstract))
