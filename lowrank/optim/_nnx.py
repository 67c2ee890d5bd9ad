"""Interop of lowrank's optax transforms with `flax.nnx.Optimizer`."""

from typing import Any

from flax import nnx
import jax


def unbox(tree: Any) -> Any:
  """Replaces `nnx.Variable` nodes by their values (other leaves unchanged).

  `nnx.Optimizer` calls `tx.init` on an `nnx.State` of `Variable`s and then
  copies each `Variable`'s sharding metadata onto the state leaf at the same
  position. State shaped differently from the parameter (projected moments,
  projectors, scalars) must not carry that metadata, so transforms that
  build such state unwrap the parameters first; their state leaves are then
  plain arrays, which `nnx.Optimizer` keeps without metadata.
  """
  return jax.tree.map(
      lambda x: x.get_value() if isinstance(x, nnx.Variable) else x,
      tree,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
  )
