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


def compiled_memory(compiled: Any) -> dict[str, int]:
  """Exact memory of a compiled computation, from XLA's memory analysis.

  `compiled` is `jax.jit(f).lower(*args).compile()`; the result is
  deterministic (no timing noise), so tests may compare it.

  Args:
    compiled: A `jax.stages.Compiled`.

  Returns:
    `{"argument_bytes", "output_bytes", "temp_bytes", "alias_bytes",
    "total_bytes"}` with `total = argument + output + temp - alias`
    (donated arguments aliased to outputs are counted once).
  """
  m = compiled.memory_analysis()
  out = {
      "argument_bytes": int(m.argument_size_in_bytes),
      "output_bytes": int(m.output_size_in_bytes),
      "temp_bytes": int(m.temp_size_in_bytes),
      "alias_bytes": int(m.alias_size_in_bytes),
  }
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"]
                        + out["temp_bytes"] - out["alias_bytes"])
  return out


def state_bytes(opt_state: optax.OptState) -> int:
  """Bytes held by an optimizer state (concrete or abstract)."""
  return tree_bytes(opt_state)


def estimate_bytes(params: Any, tx: optax.GradientTransformation) -> int:
  """Bytes `tx.init(params)` would allocate, without allocating it."""
  abstract = jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params
  )
  return tree_bytes(jax.eval_shape(tx.init, abstract))
