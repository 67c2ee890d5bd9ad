"""Adam with 8-bit block-wise quantized moments, as optax transformations.

`scale_by_adam8bit` is `optax.scale_by_adam` whose first and second moments
are stored in 8 bits with one float32 scale per block (Dettmers et al.
2022): 2 bytes per parameter plus two float32 scales per block (2.03 B/param
with 256-element blocks) instead of 8. Each step dequantizes both moments,
does the exact Adam update in float32 (bias correction as
`optax.scale_by_adam`; the update uses the fresh float32 moments, as
bitsandbytes' fused kernels do), and requantizes. It only reads gradients,
so it works as the `inner` of `lowrank.optim.scale_by_galore`, which then
stores its `[r, n]` / `[m, r]` moments in 8 bits.

Layout (static, from shapes only):

* Leaves with fewer than `min_size` elements (biases, norms; default 4096,
  bitsandbytes' `min_8bit_size`) and 0-d leaves keep float32 moments,
  updated exactly like `optax.scale_by_adam`.
* Otherwise blocks run along the LAST axis. A last axis of size `n` gets
  `k = ceil(n / block_size)` blocks of equal length `ceil(n / k)` (so a
  prime `n` does not degrade to tiny blocks); when `k` does not divide `n`
  the axis is zero-padded by fewer than `k` elements inside the update only.
  Codes keep the moment's shape `[..., n]` and scales are `[..., k]`, so a
  moment sharded on any earlier axis keeps that sharding, and
  `lowrank.sharding.shardings_like_params` gives codes exactly the
  parameter's sharding. (A sharded last axis should have `n / shards`
  divisible by the block length, or blocks straddle shards.) A last axis
  shorter than `block_size` is one block per row: `[m, r]` GaLore moments
  with a small `r` pay `8 / r` bytes per element for scales.

Codes (`scheme`):

* `"dynamic"` (default): bitsandbytes' dynamic (non-linear) 8-bit maps,
  256-entry tables whose step grows with magnitude (a decimal exponent
  plus a shrinking linear fraction). `m / absmax(m)` uses the signed map,
  `sqrt(v) / absmax(sqrt(v))` the unsigned one; the nearest entry is found
  in closed form from the map's layout (no table search). Storing
  `sqrt(v)` (bitsandbytes stores `v`) doubles the covered range in gradient
  units (~6.5 decades of `|g|` instead of ~3.3) and, below the top of the
  range, halves the relative error of the denominator `sqrt(v)`.
* `"linear"`: `m` as int8 `round(m / absmax * 127)`; `sqrt(v)` as uint8
  `round(sqrt(v) / absmax * 255)`. Cheaper, but an element ~2.4 decades
  below its block's largest loses its moments to the floor; on gradients
  whose scale varies within a block its updates are much less accurate
  (tests: 29% vs 6% relative error after 20 steps).

In both schemes a nonzero `sqrt(v)` is never rounded to zero (it takes the
smallest positive code instead): a zero denominator next to a nonzero
first moment would give an update of `m / eps` (the "zero point" failure
of low-bit second moments, Li et al. 2023).

Rounding: to the nearest code by default (as bitsandbytes), or unbiased
stochastic rounding (`stochastic_rounding=True`; the key is derived from
`seed`, the step count and the leaf index, so the state holds no key).
With nearest rounding an EMA step smaller than half a code gap rounds back
to the same code, so the moments of an element whose gradient stops while
its block-mates' continue (a dead unit) stall instead of decaying to 0, and
its update stays at a fixed fraction of a live one: ~5e-4 with the dynamic
map, ~0.2 with linear codes (tests). Stochastic rounding decays them to 0.
A whole block without gradient (an embedding row of an absent token: rows
are blocks) decays correctly either way, since its scale decays.

bitsandbytes' layout and codes are options: `bnb_codes=True` (codes of
`v`, no floor, the sign of `m` kept) and `flat_blocks=True` (see
`adamw8bit`'s differences from the official code).

References:
  Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization,
    https://arxiv.org/abs/2110.02861
  Li et al. 2023, Memory Efficient Optimizers with 4-bit States,
    https://arxiv.org/abs/2309.01507
"""

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

# The block-wise quantiser lives in `lowrank.quantize` (shared with QLoRA's
# double quantisation); its public names stay importable from here.
from lowrank import presets
from lowrank.quantize import block_layout
from lowrank.quantize import BlockQuantized
from lowrank.quantize import code_table
from lowrank.quantize import dequantize
from lowrank.quantize import quantize
from lowrank.quantize import SCHEMES

# Arguments that fix shapes or code paths: pass them as
# `optax.inject_hyperparams(adamw8bit, static_args=STATIC_ARGS)`.
STATIC_ARGS = ("block_size", "min_size", "scheme", "stochastic_rounding",
               "seed", "bnb_codes", "flat_blocks", "skip_nonfinite",
               "decay_after_update")


class ScaleByAdam8bitState(NamedTuple):
  """State for `scale_by_adam8bit`.

  Attributes:
    count: Number of `update` calls so far; shape `()`, int32.
    mu: First moments, structured like the updates: a `BlockQuantized` of
      `m` per quantized leaf, a float32 array for small leaves.
    nu: Second moments: a `BlockQuantized` of `sqrt(v)` per quantized leaf,
      a float32 `v` for small leaves.
  """

  count: jax.Array
  mu: optax.Updates
  nu: optax.Updates


def _noise(key: jax.Array,
           shape: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
  """Two uniform [0, 1) arrays from one 32-bit draw (16 bits each).

  16 bits are plenty to choose between two neighbouring codes, and one
  draw halves the cost of the random bits.
  """
  bits = jax.random.bits(key, shape, jnp.uint32)
  scale = 1.0 / 65536.0
  return ((bits >> 16).astype(jnp.float32) * scale,
          (bits & 0xFFFF).astype(jnp.float32) * scale)


def _as_moment(x: Any) -> Any:
  """A moment leaf as stored: array or `BlockQuantized`.

  `flax.nnx.Optimizer` keeps optimizer state as NNX state, which turns a
  `BlockQuantized` nested at a parameter's position into a mapping with the
  same fields; this turns it back.
  """
  if isinstance(x, BlockQuantized) or hasattr(x, "shape"):
    return x
  try:
    return BlockQuantized(codes=x["codes"], scale=x["scale"])
  except (KeyError, TypeError) as e:
    raise ValueError(
        f"Unexpected 8-bit Adam moment {type(x).__name__}; expected an array "
        "or BlockQuantized(codes, scale)."
    ) from e


def _flat_layout(shape: tuple[int, ...], block_size: int) -> tuple[int, int]:
  """`(blocks, size)` of bitsandbytes' layout: the flattened leaf in blocks
  of `block_size` (the last one zero-padded)."""
  size = int(np.prod(shape))
  return -(-size // block_size), size


def _to_flat_blocks(x: jax.Array, block_size: int) -> jax.Array:
  k, size = _flat_layout(x.shape, block_size)
  x = jnp.pad(x.reshape(-1), (0, k * block_size - size))
  return x.reshape(k, block_size)


@functools.partial(
    jax.jit,
    static_argnames=("scheme", "block_size", "nesterov", "bnb", "flat",
                     "skip_nonfinite"),
    inline=True)
def _adam_leaf(
    g: jax.Array,
    mu: Any,
    nu: Any,
    count: jax.Array,
    hyper: tuple[Any, ...],
    key: jax.Array | None,
    *,
    scheme: str,
    block_size: int,
    nesterov: bool,
    bnb: bool = False,
    flat: bool = False,
    skip_nonfinite: bool = False,
) -> tuple[jax.Array, Any, Any]:
  """One leaf: decode, exact float32 Adam step, encode.

  Jitted as a unit (inlined under an outer jit), so an eager update compiles
  one program per leaf shape rather than dozens of small ones.

  Args:
    g: The leaf's gradient.
    mu: Its first moment: a `BlockQuantized` or a float32 array.
    nu: Its second moment, likewise (`sqrt(v)` codes, or `v`).
    count: The step count before this update.
    hyper: `(b1, 1 - b1, b2, 1 - b2, eps, eps_root)`; the complements are
      taken by the caller, in float64 for Python floats as optax does
      (`1 - float32(0.999)` is off by 1e-5 relative).
    key: PRNG key for stochastic rounding, or None (nearest).
    scheme: `"dynamic"` or `"linear"`.
    block_size: Maximum block length.
    nesterov: As in `optax.scale_by_adam`.
    bnb: bitsandbytes' codes (`lowrank.quantize.quantize(bnb=True)`).
    flat: bitsandbytes' block layout: codes `[k, block_size]` of the
      flattened, zero-padded leaf, scales `[k, 1]`.
    skip_nonfinite: A NaN/inf gradient element of a quantized leaf zeroes
      its moments and gets a zero update (bitsandbytes' 8-bit kernel).

  Returns:
    `(update in g's dtype, new mu, new nu)`.
  """
  b1, c1, b2, c2, eps, eps_root = hyper
  quantized = isinstance(mu, BlockQuantized)
  g32 = g.astype(jnp.float32)
  if quantized:
    m = dequantize(mu, second_moment=False, scheme=scheme, bnb=bnb)
    v = dequantize(nu, second_moment=True, scheme=scheme, bnb=bnb)
    if flat:
      m = m.reshape(-1)[:g.size].reshape(g.shape)
      v = v.reshape(-1)[:g.size].reshape(g.shape)
  else:
    m, v = mu, nu
  m = c1 * g32 + b1 * m  # As optax.tree.update_moment.
  v = c2 * (g32**2) + b2 * v
  finite = None
  if skip_nonfinite and quantized:
    finite = jnp.isfinite(g32)
    m = jnp.where(finite, m, 0.0)
    v = jnp.where(finite, v, 0.0)
  count_inc = optax.safe_int32_increment(count)
  bc1 = 1 - b1**count_inc
  if nesterov:
    m_hat = b1 * (m / (1 - b1 ** optax.safe_int32_increment(count_inc)))
    m_hat = m_hat + c1 * (g32 / bc1)
  else:
    m_hat = m / bc1
  u = m_hat / (jnp.sqrt(v / (1 - b2**count_inc) + eps_root) + eps)
  if finite is not None:
    u = jnp.where(finite, u, 0.0)
  if quantized:
    if flat:
      m, v = _to_flat_blocks(m, block_size), _to_flat_blocks(v, block_size)
    nm, nv = (None, None) if key is None else _noise(key, m.shape)
    m = quantize(m, second_moment=False, scheme=scheme,
                 block_size=block_size, noise=nm, bnb=bnb)
    v = quantize(v, second_moment=True, scheme=scheme,
                 block_size=block_size, noise=nv, bnb=bnb)
  return u.astype(g.dtype), m, v


def _is_quantized(shape: tuple[int, ...], min_size: int) -> bool:
  """Static: decided from shapes only."""
  return len(shape) >= 1 and int(np.prod(shape)) >= max(min_size, 1)


def scale_by_adam8bit(
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    eps_root: jax.typing.ArrayLike = 0.0,
    *,
    block_size: int = 256,
    min_size: int = 4096,
    scheme: str = "dynamic",
    stochastic_rounding: bool = False,
    seed: int = 0,
    nesterov: bool = False,
    bnb_codes: bool = False,
    flat_blocks: bool = False,
    skip_nonfinite: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Rescales updates by Adam with 8-bit block-wise quantized moments.

  A drop-in for `optax.scale_by_adam(b1, b2, eps, eps_root,
  nesterov=nesterov)` whose moments take ~2 bytes per parameter. Quantized
  moments are always float32 in the computation; updates come back in the
  dtype of the incoming updates (the parameter dtype).

  Args:
    b1: Decay rate of the first moment.
    b2: Decay rate of the second moment.
    eps: Added to `sqrt(v_hat)` in the denominator.
    eps_root: Added to `v_hat` inside the square root.
    block_size: Maximum block length along the last axis (Python int;
      static). Each block stores one float32 scale per moment.
    min_size: Leaves with fewer elements keep float32 moments (static).
    scheme: `"dynamic"` or `"linear"` codes (module docstring; static).
    stochastic_rounding: Unbiased random rounding of the codes (static).
    seed: Seed of the rounding noise (static; the step count and leaf index
      are folded in).
    nesterov: Nesterov momentum, as in `optax.scale_by_adam`.
    bnb_codes: bitsandbytes' codes: the second moment stored as `v` (not
      `sqrt(v)`) with no nonzero floor, and a negative first moment that
      would round to 0 kept negative (`scheme="dynamic"` only; static).
    flat_blocks: bitsandbytes' block layout: the flattened leaf in blocks
      of `block_size` (the last one shorter), which straddle rows; codes
      are `[k, block_size]` and scales `[k, 1]`, not the leaf's shape, so
      the state does not follow a sharding of the parameter (static).
    skip_nonfinite: A NaN or inf gradient element of a quantized leaf
      zeroes its moments and gets a zero update, as bitsandbytes' 8-bit
      kernel does (its float32 path for small leaves does not; static).

  Returns:
    An `optax.GradientTransformationExtraArgs`.

  Raises:
    ValueError: On a non-positive `block_size`, a negative `min_size`, an
      unknown `scheme`, or `bnb_codes` with `scheme="linear"`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lowrank.optim import adam8bit
    >>> tx = adam8bit.scale_by_adam8bit()
    >>> state = tx.init({"w": jnp.zeros((64, 512)), "b": jnp.zeros(512)})
    >>> state.mu["w"].codes.shape, state.mu["w"].scale.shape
    ((64, 512), (64, 2))
    >>> state.mu["b"].dtype  # Small leaf: float32 moments.
    dtype('float32')

  References:
    Dettmers et al. 2022, https://arxiv.org/abs/2110.02861
  """
  for name, v in (("block_size", block_size), ("min_size", min_size)):
    if isinstance(v, bool) or not isinstance(v, int):
      raise ValueError(f"{name} must be a Python int; got {v!r}.")
  if block_size <= 0:
    raise ValueError(f"block_size must be positive; got {block_size}.")
  if min_size < 0:
    raise ValueError(f"min_size must be >= 0; got {min_size}.")
  if scheme not in SCHEMES:
    raise ValueError(f"Unknown scheme {scheme!r}; expected one of {SCHEMES}.")
  if bnb_codes and scheme != "dynamic":
    raise ValueError(
        "bnb_codes=True follows bitsandbytes' dynamic maps; got "
        f"scheme={scheme!r}. Pass scheme='dynamic' or bnb_codes=False.")

  def _zeros(p, code_dtype):
    if not _is_quantized(p.shape, min_size):
      return jnp.zeros(p.shape, jnp.float32)
    if flat_blocks:
      k, _ = _flat_layout(p.shape, block_size)
      return BlockQuantized(
          codes=jnp.zeros((k, block_size), code_dtype),
          scale=jnp.zeros((k, 1), jnp.float32))
    k, _ = block_layout(p.shape[-1], block_size)
    return BlockQuantized(  # Zero scales decode to 0 whatever the codes.
        codes=jnp.zeros(p.shape, code_dtype),
        scale=jnp.zeros(p.shape[:-1] + (k,), jnp.float32),
    )

  def init_fn(params):
    mu_codes = jnp.int8 if scheme == "linear" else jnp.uint8
    return ScaleByAdam8bitState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: _zeros(p, mu_codes), params),
        nu=jax.tree.map(lambda p: _zeros(p, jnp.uint8), params),
    )

  def update_fn(updates, state, params=None, **extra_args):
    del params, extra_args  # Gradient-only: works on projected shapes too.
    leaves, treedef = jax.tree.flatten(updates)
    mu_leaves = [_as_moment(m) for m in treedef.flatten_up_to(state.mu)]
    nu_leaves = [_as_moment(v) for v in treedef.flatten_up_to(state.nu)]
    hyper = (b1, 1 - b1, b2, 1 - b2, eps, eps_root)
    out, new_mu, new_nu = [], [], []
    for i, (g, m, v) in enumerate(zip(leaves, mu_leaves, nu_leaves)):
      key = None
      if stochastic_rounding and isinstance(m, BlockQuantized):
        key = jax.random.fold_in(
            jax.random.fold_in(jax.random.key(seed), state.count), i)
      u, m, v = _adam_leaf(
          g, m, v, state.count, hyper, key, scheme=scheme,
          block_size=block_size, nesterov=nesterov, bnb=bnb_codes,
          flat=flat_blocks, skip_nonfinite=skip_nonfinite)
      out.append(u)
      new_mu.append(m)
      new_nu.append(v)
    return treedef.unflatten(out), ScaleByAdam8bitState(
        count=optax.safe_int32_increment(state.count),
        mu=treedef.unflatten(new_mu),
        nu=treedef.unflatten(new_nu),
    )

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def adamw8bit(
    learning_rate: optax.ScalarOrSchedule,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 1e-4,
    mask: Any = None,
    *,
    eps_root: jax.typing.ArrayLike = 0.0,
    block_size: int = 256,
    min_size: int = 4096,
    scheme: str = "dynamic",
    stochastic_rounding: bool = False,
    seed: int = 0,
    nesterov: bool = False,
    bnb_codes: bool = False,
    flat_blocks: bool = False,
    skip_nonfinite: bool = False,
    decay_after_update: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """AdamW with 8-bit block-wise quantized moments.

  `chain(scale_by_adam8bit, add_decayed_weights(weight_decay, mask),
  scale_by_learning_rate(learning_rate))`, with `optax.adamw`'s defaults.
  Unlike `optax.adamw`, `weight_decay` and `mask` come right after `eps`
  (`eps_root` is keyword-only; `mu_dtype` does not apply). Other keyword
  arguments are those of `scale_by_adam8bit`, plus `decay_after_update`:
  decay the updated weight, `p ← (p − lr·u)(1 − lr·wd)`, as bitsandbytes
  does, instead of optax's `p ← p − lr·(u + wd·p)` (they differ by
  `lr²·wd·u`).

  Differences from the official code (bitsandbytes `AdamW8bit`), each with
  the argument that gives the official behaviour
  (`presets.paper("adamw8bit")` collects them):

  * Second-moment codes: lowrank stores `sqrt(v)` (twice the range, half
    the relative error of the denominator) and never rounds a nonzero one
    to 0 (an update of `m / eps` otherwise); bitsandbytes stores `v`, may
    round it to 0, and keeps the sign of a tiny negative `m`:
    `bnb_codes=True`.
  * Block layout: lowrank's blocks run along the last axis (codes keep the
    parameter's shape and sharding); bitsandbytes cuts the flattened
    tensor into blocks of 256 that straddle rows: `flat_blocks=True` (the
    same blocks when the last axis is a multiple of 256).
  * Weight decay: default 1e-4 (`optax.adamw`'s, the library-wide
    convention) vs 1e-2: `weight_decay=1e-2`; decay of the pre-update
    weight (optax) vs the updated one: `decay_after_update=True`.
  * Non-finite gradients propagate (as in `optax.adamw`); bitsandbytes'
    8-bit kernel zeroes that element's moments and leaves its weight
    unchanged: `skip_nonfinite=True`.

  Examples:
    >>> import jax.numpy as jnp
    >>> from lowrank import optim
    >>> from lowrank.optim import adam8bit
    >>> tx = adam8bit.adamw8bit(1e-3)
    >>> params = {"w": jnp.zeros((1024, 1024))}
    >>> round(optim.state_bytes(tx.init(params)) / params["w"].size, 3)
    2.031
  """
  adam = scale_by_adam8bit(
      b1, b2, eps, eps_root, block_size=block_size, min_size=min_size,
      scheme=scheme, stochastic_rounding=stochastic_rounding, seed=seed,
      nesterov=nesterov, bnb_codes=bnb_codes, flat_blocks=flat_blocks,
      skip_nonfinite=skip_nonfinite)
  if decay_after_update:
    decay = _decay_updated_weight(learning_rate, weight_decay)
    if mask is not None:
      decay = optax.masked(decay, mask)
    tx = optax.chain(adam, optax.scale_by_learning_rate(learning_rate),
                     decay)
  else:
    tx = optax.chain(adam, optax.add_decayed_weights(weight_decay, mask),
                     optax.scale_by_learning_rate(learning_rate))
  if not skip_nonfinite:
    return tx
  return _zero_where_nonfinite(tx, min_size)


def _decay_updated_weight(
    learning_rate: optax.ScalarOrSchedule, weight_decay: jax.typing.ArrayLike
) -> optax.GradientTransformation:
  """`u ← u − lr·wd·(p + u)`: the weight after the update `u`, decayed."""

  def init_fn(params):
    del params
    return optax.ScaleByScheduleState(count=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError(
          "decay_after_update=True needs `params` in update(); pass them, "
          "or leave decay_after_update=False.")
    lr = (learning_rate(state.count) if callable(learning_rate)
          else learning_rate)
    updates = jax.tree.map(
        lambda u, p: (u - lr * weight_decay * (p + u)).astype(u.dtype),
        updates, params)
    return updates, optax.ScaleByScheduleState(
        count=optax.safe_int32_increment(state.count))

  return optax.GradientTransformation(init_fn, update_fn)


def _zero_where_nonfinite(
    tx: optax.GradientTransformation, min_size: int
) -> optax.GradientTransformationExtraArgs:
  """`tx` with zero updates (decay included) where a quantized leaf's
  gradient is NaN or inf."""
  tx = optax.with_extra_args_support(tx)

  def update_fn(updates, state, params=None, **extra_args):
    out, state = tx.update(updates, state, params, **extra_args)
    out = jax.tree.map(
        lambda u, g: jnp.where(jnp.isfinite(g), u, jnp.zeros([], u.dtype))
        if _is_quantized(g.shape, min_size) else u, out, updates)
    return out, state

  return optax.GradientTransformationExtraArgs(tx.init, update_fn)


presets.register(
    "adamw8bit",
    source="bitsandbytes-foundation/bitsandbytes@95f9af309d4d "
           "(bitsandbytes/optim/adamw.py, csrc/kernels.cu "
           "kOptimizerStatic8bit2StateBlockwise)",
    kwargs={"weight_decay": 1e-2, "bnb_codes": True, "flat_blocks": True,
            "decay_after_update": True, "skip_nonfinite": True},
    reasons={
        "weight_decay": "AdamW8bit's default; lowrank keeps optax.adamw's "
                        "1e-4, the library-wide convention",
        "bnb_codes": "lowrank stores sqrt(v) with a nonzero floor: wider "
                     "range and no m/eps blow-ups",
        "flat_blocks": "lowrank's blocks run along the last axis, so codes "
                       "keep the parameter's shape and sharding",
        "decay_after_update": "lowrank composes optax's add_decayed_weights "
                              "(decay of the pre-update weight)",
        "skip_nonfinite": "lowrank propagates NaN/inf as optax.adamw does"})
