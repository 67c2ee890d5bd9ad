"""ALLoRA: a per-row adaptive learning rate for LoRA, as optax transforms.

ALLoRA (Huang & Balestriero 2024) drops LoRA's dropout and its `alpha / r`
scale (use `inject(..., alpha=rank, dropout=0.0)`, i.e. scale 1) and instead
scales the update of every LoRA parameter vector `θ` by a coefficient
inversely proportional to its ℓ2 norm:

    θ ← θ - η · u(θ) / sqrt(‖θ‖² + 1/ρ²)

where `u` is the base optimizer's direction and `ρ` (`eta` below) bounds the
coefficient at `‖θ‖ = 0` (so `B = 0` at initialisation moves fast) and lets
it decay as `1/‖θ‖` once `θ` has grown. A "vector" is a row of the factor as
a torch `nn.Linear` weight, i.e. the weights of one output unit: for our
`lora_a: [*in, r]` the `[*in]` slice of each rank component, for
`lora_b: [r, *out]` the `[r]` slice of each output unit; other leaves (gates,
vectors) use their whole norm. Pass `axes` to choose differently.

`scale_by_allora(eta)` is the coefficient alone; `allora_adamw` puts it after
Adam's normalisation, where it acts as a learning rate (before Adam, Adam's
per-coordinate normalisation would cancel a slowly varying factor).

References:
  Huang & Balestriero 2024, ALLoRA: Adaptive Learning Rate Mitigates LoRA
  Fatal Flaws, https://arxiv.org/abs/2410.09692
"""

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax

# `inject_hyperparams` must not turn these into arrays (or schedules).
STATIC_ARGS = ("axes", "mask")


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def lora_row_axes(path: tuple[str, ...], leaf: Any) -> tuple[int, ...]:
  """Default reduction axes: one norm per output unit of each factor.

  Args:
    path: Key names of the leaf (e.g. `("layers", "0", "lora_a")`).
    leaf: The parameter (only `ndim` is used).

  Returns:
    The axes summed over: all but the last for `lora_a` (one norm per rank
    component), the first for `lora_b` (one norm per output unit), all axes
    for any other leaf.
  """
  names = [n for n in path if n != "value"]
  last = names[-1] if names else ""
  if last == "lora_a" and leaf.ndim >= 2:
    return tuple(range(leaf.ndim - 1))
  if last == "lora_b" and leaf.ndim >= 2:
    return (0,)
  return tuple(range(leaf.ndim))


def allora_coefficient(
    param: jax.Array, eta: jax.typing.ArrayLike, axes: tuple[int, ...]
) -> jax.Array:
  """`1 / sqrt(‖θ‖² + 1/eta²)` over `axes` (kept, to broadcast), float32."""
  p = param.astype(jnp.float32)
  sq = jnp.sum(p * p, axis=axes, keepdims=True)
  eta = jnp.asarray(eta, jnp.float32)
  return jax.lax.rsqrt(sq + 1.0 / (eta * eta))


def scale_by_allora(
    eta: jax.typing.ArrayLike,
    axes: Callable[[tuple[str, ...], Any], tuple[int, ...]] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Scales each update vector by `1 / sqrt(‖θ‖² + 1/eta²)`.

  Stateless (its state is `optax.EmptyState()`); needs `params`.

  Args:
    eta: The coefficient's value at `θ = 0` (its maximum), > 0.
    axes: `fn(key names, leaf) -> axes` giving the axes of each norm;
      default `lora_row_axes`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: If a constant `eta` is not positive.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lowrank.optim import allora
    >>> tx = allora.scale_by_allora(eta=2.0)
    >>> p = {"lora_b": jnp.zeros((2, 3))}
    >>> u, _ = tx.update({"lora_b": jnp.ones((2, 3))}, tx.init(p), p)
    >>> u["lora_b"][0]
    Array([2., 2., 2.], dtype=float32)
  """
  if isinstance(eta, (int, float)) and not eta > 0:
    raise ValueError(f"eta must be > 0; got {eta}.")
  axes = lora_row_axes if axes is None else axes

  def init_fn(params):
    del params
    return optax.EmptyState()

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          "scale_by_allora needs the parameters: tx.update(updates, state, "
          "params).")

    def _one(path, u, p):
      names = tuple(_key_name(k) for k in path)
      c = allora_coefficient(p, eta, tuple(axes(names, p)))
      return (u.astype(jnp.float32) * c).astype(u.dtype)

    return jax.tree_util.tree_map_with_path(_one, updates, params), state

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def allora_adamw(
    learning_rate: optax.ScalarOrSchedule,
    eta: jax.typing.ArrayLike,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
    mask: Any | Callable[[Any], Any] | None = None,
    axes: Callable[[tuple[str, ...], Any], tuple[int, ...]] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """AdamW whose step for each LoRA vector is scaled by ALLoRA's coefficient.

  `chain(scale_by_adam, scale_by_allora(eta), add_decayed_weights,
  scale_by_learning_rate)`: weight decay is not scaled, as in AdamW.

  Args:
    learning_rate: Global step size.
    eta: ALLoRA's coefficient at `θ = 0`.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: Decoupled weight decay.
    mask: Weight-decay mask, as in `optax.add_decayed_weights`.
    axes: Norm axes, as in `scale_by_allora`.

  Returns:
    An `optax.GradientTransformationExtraArgs`.
  """
  return optax.chain(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      scale_by_allora(eta, axes),
      optax.add_decayed_weights(weight_decay, mask),
      optax.scale_by_learning_rate(learning_rate),
  )
