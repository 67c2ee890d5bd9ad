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
`lora_g`). `sora_adamw` is AdamW on everything, then the proximal step on
the gates, as the paper writes it (`ξ = η λ`); the official code
(`TsinghuaC3I/SoRA`) differs in the threshold, the thresholding rule and an
extra L1 loss term, each one argument away (`sora_adamw`'s docstring;
`presets.paper("sora_adamw")` sets all three):

    tx = optim.sora_adamw(1e-3, lam=1e-3, weight_decay=0.01)
    tx = optim.sora_adamw(1e-3, lam=1e-3, **presets.paper("sora_adamw"))
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

from lowrank import presets

GATE_NAME = "lora_g"
# `inject_hyperparams` must not turn these into arrays (or schedules).
STATIC_ARGS = ("mask", "threshold_rule", "scale_lam_by_lr")
_RULES = ("soft", "shift_then_zero")


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


def shift_then_zero(x: jax.Array, threshold: jax.typing.ArrayLike
                    ) -> jax.Array:
  """The official `SparseAdamW` thresholding (`sparse_optimizer.py:116-119`).

  Entries above `threshold` move towards 0 by it, then every entry whose
  magnitude is *now* below `threshold` becomes 0: so `|x| < 2·threshold`
  ends at 0 (except `|x| = threshold` exactly, left as it is), a harder
  cut than `soft_threshold`'s `|x| <= threshold`.
  """
  shifted = jnp.where(x > threshold, x - threshold,
                      jnp.where(x < -threshold, x + threshold, x))
  return jnp.where(jnp.abs(shifted) < threshold, 0, shifted)


def _check_rule(rule: str) -> None:
  if rule not in _RULES:
    raise ValueError(
        f"threshold_rule must be one of {_RULES} ('soft': the paper's "
        f"soft threshold; 'shift_then_zero': the official code's); got "
        f"{rule!r}.")


def sora_proximal(
    lam: optax.ScalarOrSchedule,
    learning_rate: optax.ScalarOrSchedule | None = None,
    mask: Any | Callable[[Any], Any] | None = None,
    threshold_rule: str = "soft",
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
    threshold_rule: `"soft"`: `T_ξ` above, the prox of `ξ‖·‖₁` (the
      paper's); `"shift_then_zero"`: the official code's rule
      (`shift_then_zero`), which zeroes every `|p + u| < 2ξ`.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` needs `params`.

  Raises:
    ValueError: If a constant `lam` or `learning_rate` is negative, or on
      an unknown `threshold_rule`.

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
  _check_rule(threshold_rule)
  shrink = soft_threshold if threshold_rule == "soft" else shift_then_zero
  mask = gate_mask if mask is None else mask

  def _value(v, count):
    return v(count) if callable(v) else v

  def update(updates, params, which, count):
    xi = jnp.asarray(_value(lam, count), jnp.float32)
    if learning_rate is not None:
      xi = xi * jnp.asarray(_value(learning_rate, count), jnp.float32)

    def _one(u, p, on):
      if not on:
        return u
      p32 = p.astype(jnp.float32)
      new = shrink(p32 + u.astype(jnp.float32), xi)
      return (new - p32).astype(u.dtype)

    return jax.tree.map(_one, updates, params, which)

  return _on_gates("sora_proximal", mask, update)


def _on_gates(
    what: str, mask: Any, update: Callable[..., Any]
) -> optax.GradientTransformationExtraArgs:
  """A transform with a step count: `update(updates, params, which, count)`
  with `which` the gate mask of `params`; `what` names it in the error for
  a missing `params`."""

  def init_fn(params):
    del params
    return SoRAProximalState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, **extra_args):
    del extra_args
    if params is None:
      raise ValueError(
          f"{what} needs the parameters: tx.update(updates, state, params).")
    which = mask(params) if callable(mask) else mask
    return update(updates, params, which, state.count), SoRAProximalState(
        count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def add_gate_l1_gradient(
    l1: optax.ScalarOrSchedule,
    mask: Any | Callable[[Any], Any] | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Adds the gradient of `l1 · Σ|g| / n` to the gate leaves' gradients.

  `n` is the number of gate entries over all masked leaves, so this is the
  gradient of the official code's loss term `sparse_lambda · Σ|g| / n`
  (`trainer.py:400-407`): `l1 · sign(g) / n`, 0 at `g = 0` (as torch's
  `abs`). Chain it before the optimizer that should see it.

  Args:
    l1: Coefficient (scalar or schedule of the step count).
    mask: Gate selector as in `sora_proximal`.

  Returns:
    An `optax.GradientTransformationExtraArgs`; `update` needs `params`.

  Raises:
    ValueError: If a constant `l1` is negative.
  """
  if isinstance(l1, (int, float)) and l1 < 0:
    raise ValueError(f"l1_loss must be >= 0; got {l1}.")
  mask = gate_mask if mask is None else mask

  def update(updates, params, which, count):
    n = sum(int(p.size) for p, on in zip(jax.tree.leaves(params),
                                         jax.tree.leaves(which)) if on)
    coef = jnp.asarray(l1(count) if callable(l1) else l1, jnp.float32)
    coef = coef / max(n, 1)

    def _one(u, p, on):
      if not on:
        return u
      return (u.astype(jnp.float32)
              + coef * jnp.sign(p.astype(jnp.float32))).astype(u.dtype)

    return jax.tree.map(_one, updates, params, which)

  return _on_gates("sora_adamw's l1_loss", mask, update)


def sora_adamw(
    learning_rate: optax.ScalarOrSchedule,
    lam: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
    gate_learning_rate: optax.ScalarOrSchedule | None = None,
    mask: Any | Callable[[Any], Any] | None = None,
    scale_lam_by_lr: bool = True,
    threshold_rule: str = "soft",
    l1_loss: optax.ScalarOrSchedule = 0.0,
) -> optax.GradientTransformationExtraArgs:
  """AdamW on LoRA factors and gates, then SoRA's proximal step on the gates.

  Gates get no weight decay and may have their own step size
  (`gate_learning_rate`, default `learning_rate`), as in the official code.
  By default the step is the paper's proximal gradient step
  `g ← T_ξ(g + u)` with `ξ = lam · gate_learning_rate` (the paper's `η_t λ`)
  and the soft threshold `T_ξ`, and the loss is left as it is.

  Differences from the official code (`TsinghuaC3I/SoRA@c275ac237b68`,
  `src/sparse_optimizer.py`, `src/trainer.py`, `run_glue.py`; all three
  set by `presets.paper("sora_adamw")`):

  * Threshold: the official `SparseAdamW` uses `ξ = λ` alone
    (`sparse_lambda_2`, default 1e-3), not `λ·η`; at η = 1e-3 lowrank's
    default threshold is 1000× weaker for the same `lam`. Default kept: it
    is the paper's prox step. `scale_lam_by_lr=False` gives `ξ = lam`.
  * Thresholding rule: the official code shifts by `ξ` and then zeroes
    every entry now below `ξ`, so every `|g| < 2ξ` becomes 0
    (`shift_then_zero`). Default kept (the paper's soft threshold);
    `threshold_rule="shift_then_zero"` gives the official rule.
  * L1 loss term: the official trainer also adds
    `sparse_lambda · Σ|g| / n_gates` to the loss (default 1e-3; its GLUE
    script uses 10), whose gradient goes through the gates' Adam.
    `l1_loss=<sparse_lambda>` adds that gradient to the gates' gradient
    before Adam (off by default: not in the paper's algorithm). It is
    added inside this optimizer, so a gradient clip chained before
    `sora_adamw` does not see it (the official code clips the full loss's
    gradient, this term included).
  * Not available: Adam's eps. The official gates use Hugging Face
    `AdamW`'s default eps 1e-6 and the factors 1e-8, both added to `√v`
    before the bias correction; here one `eps` in optax's placement (they
    differ only while `√v̂` is near eps). The official factors' weight decay
    acts on the updated weights (an O(η²·wd) difference).

  Args:
    learning_rate: Step size of the factors.
    lam: L1 strength `λ` of the gates.
    b1: Adam's first-moment decay.
    b2: Adam's second-moment decay.
    eps: Adam's epsilon.
    weight_decay: Decoupled weight decay of the non-gate leaves.
    gate_learning_rate: Step size of the gates (default `learning_rate`).
    mask: Gate selector as in `sora_proximal`.
    scale_lam_by_lr: `ξ = lam · gate_learning_rate` (True, the paper's) or
      `ξ = lam` (False, the official code's).
    threshold_rule: `"soft"` (the paper's) or `"shift_then_zero"` (the
      official code's); see `sora_proximal`.
    l1_loss: Coefficient of the official L1 loss term `l1_loss · Σ|g| / n`
      (0: none).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: On an unknown `threshold_rule`, a non-bool
      `scale_lam_by_lr`, or a negative constant `lam` or `l1_loss`.
  """
  if not isinstance(scale_lam_by_lr, bool):
    raise ValueError(
        f"scale_lam_by_lr must be a bool (True: ξ = lam · learning rate, "
        f"False: ξ = lam); got {scale_lam_by_lr!r}.")
  _check_rule(threshold_rule)
  gate = gate_mask if mask is None else mask
  gate_lr = learning_rate if gate_learning_rate is None else gate_learning_rate

  def not_gate(params):
    which = gate(params) if callable(gate) else gate
    return jax.tree.map(lambda g: not g, which)

  def is_gate(params):
    return gate(params) if callable(gate) else gate

  l1_off = isinstance(l1_loss, (int, float)) and l1_loss == 0
  return optax.chain(
      *(() if l1_off else (add_gate_l1_gradient(l1_loss, mask=gate),)),
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps),
      optax.add_decayed_weights(weight_decay, not_gate),
      optax.masked(optax.scale_by_learning_rate(learning_rate), not_gate),
      optax.masked(optax.scale_by_learning_rate(gate_lr), is_gate),
      sora_proximal(lam, gate_lr if scale_lam_by_lr else None, mask=gate,
                    threshold_rule=threshold_rule),
  )


presets.register(
    "sora_adamw",
    source="TsinghuaC3I/SoRA@c275ac237b68 (src/sparse_optimizer.py, "
    "src/trainer.py, run_glue.py)",
    kwargs={"scale_lam_by_lr": False, "threshold_rule": "shift_then_zero",
            "l1_loss": 1e-3},
    reasons={
        "scale_lam_by_lr": (
            "SparseAdamW thresholds at sparse_lambda_2 alone "
            "(sparse_optimizer.py:116-119); lowrank follows the paper's "
            "prox step, threshold lam * learning rate."),
        "threshold_rule": (
            "SparseAdamW shifts by the threshold, then zeroes what is now "
            "below it (every |g| < 2*threshold); lowrank's default is the "
            "paper's soft threshold."),
        "l1_loss": (
            "the official trainer adds sparse_lambda * sum|g| / n_gates to "
            "the loss (trainer.py:400-407; run_glue.py default 1e-3, its "
            "GLUE script 10); the paper's algorithm has no such term."),
    },
    unavailable=(
        "Adam's eps: the official gates use 1e-6 and the factors 1e-8, "
        "added to sqrt(v) before the bias correction (Hugging Face AdamW); "
        "here one eps in optax's placement.",
        "The official factors' weight decay acts on the updated weights "
        "(O(lr^2 * wd)).",
    ),
)
