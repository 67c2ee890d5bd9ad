"""SoRA's proximal L1 step on LoRA gates, as an optax transformation.

SoRA (Ding et al. 2023) puts a gate vector `g` between LoRA's down- and
up-projection (`lowrank.adapters.rank_control`, `method="sora"`) and trains it
with a proximal gradient step that makes it sparse:

    g ← T_ξ(g - η ∇g),   T_ξ(x) = sign(x) max(|x| - ξ, 0),   ξ = η λ.

`sora_proximal(lam, learning_rate)` is the `T_ξ` part, written as an update
transformation: chained *after* the gate's optimizer step it turns the
update `u` into `T_ξ(g + u) - g`, so `optax.apply_updates` lands exactly on
the soft-thresholded gate (and exactly on 0 for pruned entries). It touches
only the gate leaves (by default every leaf whose path has a key
`lora_g`). `sora_adamw` is the full optimizer of the official code: AdamW on
everything, then the proximal step on the gates.

    tx = optim.sora_adamw(1e-3, lam=1e-3, weight_decay=0.01)
    optimizer = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)

References:
  Ding et al. 2023, Sparse Low-rank Adaptation of Pre-trained Language
  Models (SoRA), https://arxiv.org/abs/2311.11696
"""

from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

GATE_NAME = "lora_g"
# `inject_hyperparams` must not turn these into arrays (or schedules).
STATIC_ARGS = ("mask",)


class SoRAProximalState(NamedTuple):
  """State of `sora_proximal`.

  Attributes:
    count: Number of `update` calls so far (for schedules); shape `()`,
      int32.
  """

  count: jax.Array  # shape=(), dtype=int32


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def gate_mask(params: Any, name: str = GATE_NAME) -> Any:
  """A bool pytree: True for leaves whose path has a key equal to `name`.

  Works on pure dicts and on `nnx.State` (whose leaves sit under the
  variable's `value` attribute).
  """
  return jax.tree_util.tree_map_with_path(
      lambda path, _: any(_key_name(k) == name for k in path), params)


def soft_threshold(x: jax.Array, threshold: jax.typing.ArrayLike
                   ) -> jax.Array:
  """`sign(x) max(|x| - threshold, 0)`: the prox of `threshold ‖·‖₁`."""
  return jnp.sign(x) * jnp.maximum(jnp.abs(x) - threshold, 0)


def sora_proximal(
    lam: optax.ScalarOrSchedule,
    learning_rate: optax.ScalarOrSchedule | None = None,
    mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Soft-thresholds the gate leaves after an optimizer step.

  With `p` the parameters and `u` the incoming update, masked leaves get
  `T_ξ(p + u) - p` with `ξ = lam · learning_rate` (the paper's `η_t λ`; the
  official `SparseAdamW` uses `ξ = lam`, i.e. `learning_rate=None`), the
  others pass through. Computed in float32, returned in the update's dtype.

  Args:
    lam: L1 strength `λ` (scalar or schedule of the step count).
    learning_rate: The gate's step size `η` (scalar or schedule), or `None`
      to use `ξ = lam`.
    mask: Bool pytree (or a function of the params returning one) selecting
      the gate leaves; default `gate_mask` (keys named `lora_g`).

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` needs `params`.

  Raises:
    ValueError: If a constant `lam` or `learning_rate` is negative.

  Examples:
    >>> import jax.numpy as jnp, optax
    >>> from lowrank.optim import sora
    >>> tx = optax.chain(optax.sgd(0.5), sora.sora_proximal(0.2, 0.5))
    >>> params = {"lora_g": jnp.array([1.0, 0.05, -1.0])}
    >>> grads = {"lora_g": jnp.array([0.0, 0.0, 1.0])}
    >>> u, _ = tx.update(grads, tx.init(params), params)
    >>> optax.apply_updates(params, u)["lora_g"]
    Array([ 0.9,  0. , -1.4], dtype=float32)
  """
  for name, v in (("lam", lam), ("learning_rate", learning_rate)):
    if isinstance(v, (int, float)) and v < 0:
      raise ValueError(f"{name} must be >= 0; got {v}.")
  mask = gate_mask if mask is None else mask

  def _value(v, count):
    return v(count) if callable(v) else v

  def init_fn(params):
    del params
    return SoRAProximalState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          "sora_proximal needs the parameters: tx.update(updates, state, "
          "params).")
    xi = jnp.asarray(_value(lam, state.count), jnp.float32)
    if learning_rate is not None:
      xi = xi * jnp.asarray(_value(learning_rate, state.count), jnp.float32)
    which = mask(params) if callable(mask) else mask

    def _one(u, p, on):
      if not on:
        return u
      p32 = p.astype(jnp.float32)
      new = soft_threshold(p32 + u.astype(jnp.float32), xi)
      return (new - p32).astype(u.dtype)

    updates = jax.tree.map(_one, updates, params, which)
    return updates, SoRAProximalState(
        count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sora_adamw(
    learning_rate: optax.ScalarOrSchedule,
    lam: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
    gate_learning_rate: optax.ScalarOrSchedule | None = None,
    mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AdamW on LoRA factors and gates, then SoRA's proximal step on the gates.

  As in the official code, gates get no weight decay and may have their own
  step size (`gate_learning_rate`, default `learning_rate`); the threshold
  is `ξ = lam · gate_learning_rate`.

  Args:
    learning_rate: Step size of the factors.
    lam: L1 strength `λ` of the gates.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: Decoupled weight decay of the non-gate leaves.
    gate_learning_rate: Step size of the gates (default `learning_rate`).
    mask: Gate selector as in `sora_proximal`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  gate = gate_mask if mask is None else mask
  gate_lr = learning_rate if gate_learning_rate is None else gate_learning_rate

  def not_gate(params):
    which = gate(params) if callable(gate) else gate
    return jax.tree.map(lambda g: not g, which)

  def is_gate(params):
    return gate(params) if callable(gate) else gate

  return optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, not_gate),
      optax.masked(optax.scale_by_learning_rate(learning_rate), not_gate),
      optax.masked(optax.scale_by_learning_rate(gate_lr), is_gate),
      sora_proximal(lam, gate_lr, mask=gate),
  )
