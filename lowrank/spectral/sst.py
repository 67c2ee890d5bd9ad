r"""Sparse Spectral Training (SST): layers, conversion and the optimizer.

A linear layer is reparameterised in spectral form, `W = U diag(s) Vᵀ`
(kernel layout `[d_in, d_out]`: `U: [d_in, m]`, `s: [m]`, `V: [d_out, m]`,
`m = min(d_in, d_out)`), initialised from the SVD of the dense weight.
Training (Zhao et al. 2024, Algorithm 1 and §4):

* all singular values `s` are updated every step and clamped at 0;
* training runs in *rounds*; a round is `m/r` *iterations* and ends in a
  re-SVD of `U diag(s) Vᵀ`; an iteration is `T3` steps (`refresh_every`)
  during which the same `r` singular-vector pairs are trained;
* at the start of every iteration `r` indices are sampled without
  replacement from `p_i = ½(1/m + s_i/Σs)`; the sampled vectors are updated
  with the *enhanced* gradients `∇̃U_i = (∂L/∂W) V_i`, `∇̃V_i = (∂L/∂W)ᵀ U_i`
  (the natural gradients without the `s_i` factor) and renormalised to unit
  length after every step;
* memory-efficient form (§4.5): `U` and `V` are split into an *active*
  block (the `r` trained columns, the only ones with optimizer state) and
  a *frozen* block. At a resample the newly sampled vectors are swapped
  into the slots of the active vectors that were not sampled again; the
  re-sampled ones stay where they are and keep their optimizer state, the
  new ones start from zero moments, and the learning rate of the active
  block is warmed up again from the swap.

Parameter layout (`SSTLinear`): `sst_u [..., d_in, r]` and `sst_v
[..., d_out, r]` are the active block, `sst_u_frozen [..., d_in, m - r]`
and `sst_v_frozen [..., d_out, m - r]` the frozen one, and `sst_s [..., m]`
holds the singular values in the same column order (active first). All
five are `nnx.Param`. The forward pass only differentiates the active
block: its custom VJP returns `[d_in, r]` / `[d_out, r]` gradients (formed
from `[N, r]` products; no `[d, m]` array) and a zero cotangent for the
frozen block, which `jit` never materialises when the gradients feed the
optimizer in the same step (`train_step`, the experiment binaries). So SST
saves gradient memory as well as optimizer state.

Pieces:

* `SSTLinear`: the NNX layer.
* `to_sst(model, targets=..., rank=...)` / `to_dense(model)`: swap chosen
  `nnx.Linear` layers (PEFT-style regex targeting, as
  `lowrank.adapters.inject`) to spectral form and back. Stacked (`nnx.scan`)
  layers with `[L, d_in, d_out]` kernels become `[L, ...]` factors.
* `sst_optimizer(inner, learning_rate)` / `sst_adamw(learning_rate)`: the
  SST update as one optax transformation: `inner` (Adam) on the active
  blocks, on `s` and on every non-spectral leaf (so it trains a whole
  model); renormalisation, clamping, resampling with the swap, the re-SVD
  and the re-warm-up. The state holds the moments of the active blocks and
  of `s` only: `O(r (d_in + d_out) + m)` per layer, not `O(d_in d_out)`.
* `train_step(model, optimizer, loss_fn, *batch)`: one jitted step.

Usage::

  sst.to_sst(model, targets=r".*_proj", rank=16)
  optimizer = nnx.Optimizer(model, sst.sst_adamw(1e-3), wrt=nnx.Param)
  for batch in batches:
    loss = sst.train_step(model, optimizer, loss_fn, batch)
  sst.to_dense(model)  # back to nnx.Linear layers

Defaults and where they come from. The authors' code
(github.com/biomedical-cybernetics/sparse-spectral-training) could not be
retrieved for this implementation (it is in none of the stores searched),
so the schedule follows the paper's Algorithm 1 (rounds of `m/r`
iterations of `T3` steps) and, for the reset and re-warm-up details the
paper leaves to code, the recipe of ReLoRA's public code (the paper's
ReLoRA* baseline; Guitaricet/relora@176f376,
`peft_pretraining/training_utils.py`): its optimizer reset zeroes the Adam
moments (`optimizer_reset`, 99.9% random pruning) but keeps PyTorch's
per-tensor `step`, and its `cosine_restarts` schedule warms the learning
rate up linearly after each reset (`restart_warmup_steps`).

* `refresh_every` (T3) = 100 steps. The paper's value for LLM
  pretraining could not be checked; its App. F.2 gives T3 = 200 steps per
  iteration, each beginning with a 20-step warm-up, for IWSLT'14
  translation (`refresh_every=200, rewarm_steps=20`; the same 10% ratio
  as the default re-warm-up). Measured with `experiments/pretrain_lm.py`
  (300 steps,
  r = m/4): T3 = 1 (the former default) made every U/V update
  `lr·sign(g)` (Adam's first step after a reset, then renormalised) and
  SST came last of nine methods (perplexity 8.71); T3 = 10, 50 and 100
  (rounds of 50, 200, 200 steps) gave 7.86, 7.62 and 7.18 (Full-Adam:
  7.65).
* `round_length` = `(m/r)·T3` (Algorithm 1's `T2 = m/r` iterations per
  round), derived from the layers: `T3 · max over layers ⌈m/r⌉`.
* `rewarm_steps` = `T3 // 10`: after each resample the active block's
  step is scaled by `min(1, j / rewarm_steps)` on its `j`-th step
  (`j = 1, 2, ...`), ReLoRA's `restart_step / restart_warmup_steps` ramp
  (ReLoRA's README: 100 warm-up steps per 5000-step cycle; the 10% here
  keeps the ramp short against T3).
* `block_reset="new"`: at a resample only the moments of the newly sampled
  columns are zeroed (the §4.5 swap); the re-sampled columns keep theirs
  and the Adam step count is kept (PyTorch keeps `step` per tensor, and the
  active block is one tensor), so bias correction is not restarted.

Deviations from the paper / the assumed official behaviour (and how to get
the other behaviour):

1. The re-warm-up multiplies only the updates whose optimizer state was
   reset (the active block after every resample, `s` after every re-SVD);
   ReLoRA's schedule re-warms the global learning rate, so embeddings,
   norms and the head also slow down. For that, pass
   `lowrank.spectral.jagged_cosine_schedule(..., refresh_every=T3,
   restart_warmup_steps=W)` as `learning_rate` and `rewarm_steps=0`.
   ReLoRA's ramp also ends at the envelope value at the end of the warm-up
   and has a zero-rate step just before each reset; here the ramp
   multiplies the schedule's current value and has no zero step.
2. One round length for all layers (`T3 · max ⌈m/r⌉`); layers with a
   smaller `m/r` get more iterations per round. Equal for transformers
   whose projections all have `m = d_model`.
3. At a re-SVD the moments of `s` and of the active block are zeroed (the
   basis is rotated, so old moments no longer belong to any column); the
   step counts are kept as for a resample. Not specified by the paper.
4. The first iteration's active columns are drawn when the layer is built
   (`to_sst(seed=...)`; `SSTLinear(sample_key=None)` takes the top `r`),
   because an optax `init` cannot change parameters.
5. Which free slot receives which new vector is fixed (the non-resampled
   active slots in increasing order receive the new vectors in increasing
   column order); the paper leaves it open and it does not change the
   function or the update.
6. `block_reset="all"` gives the previous behaviour of this module: every
   resample re-initialises the whole active block's `inner` state, count
   included (bias correction restarts; with `refresh_every=1` that is
   sign-SGD).

Paper preset: `presets.paper("sst_adamw")` is empty, the defaults being
the paper's structure (Algorithm 1, §4.5) since the fix of the former
`resample_every=1` default, which made every U/V update sign-SGD. It
cannot be checked against the official code, which could not be read.

References:
  Zhao, Zhang, Li, Liu, Cannistraci 2024, Sparse Spectral Training and
  Inference on Euclidean and Hyperbolic Neural Networks,
  https://arxiv.org/abs/2405.15481
  Lialin, Shivagunde, Muckatira, Rumshisky 2023, ReLoRA: High-Rank Training
  Through Low-Rank Updates, https://github.com/Guitaricet/relora
"""

from collections.abc import Callable, Mapping, Sequence
import functools
import math
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from lowrank import presets
from lowrank import sharding
from lowrank import surgery
from lowrank.adapters import layers

U_NAME, UF_NAME, S_NAME = "sst_u", "sst_u_frozen", "sst_s"
V_NAME, VF_NAME = "sst_v", "sst_v_frozen"
SST_NAMES = (U_NAME, UF_NAME, S_NAME, V_NAME, VF_NAME)

# Library defaults (see the module docstring for their sources).
DEFAULT_REFRESH_EVERY = 100
BLOCK_RESETS = ("new", "all")


# ----------------------------------------------------------------------------
# Pure math.


def sampling_probs(s: jax.Array) -> jax.Array:
  """SST's sampling distribution `p_i = ½(1/m + s_i / Σ_j s_j)`.

  Args:
    s: Singular values `[..., m]` (non-negative).

  Returns:
    `[..., m]` float32 probabilities summing to 1 along the last axis (the
    uniform distribution where all `s` are 0).
  """
  s = jnp.maximum(jnp.asarray(s, jnp.float32), 0.0)
  m = s.shape[-1]
  total = jnp.sum(s, axis=-1, keepdims=True)
  share = jnp.where(total > 0, s / jnp.where(total > 0, total, 1.0), 1.0 / m)
  return 0.5 * (1.0 / m + share)


def sample_indices(key: jax.Array, s: jax.Array, rank: int) -> jax.Array:
  """Samples `rank` distinct indices from `sampling_probs(s)`.

  Sampling is without replacement (successive draws, renormalising after
  each, like `torch.multinomial(p, r, replacement=False)`), via the
  Gumbel-top-k trick, so the shape is static. Element 0 is the first draw.

  Args:
    key: PRNG key.
    s: Singular values `[..., m]`; leading dims get independent samples.
    rank: Number of indices `r <= m` (Python int).

  Returns:
    int32 `[..., r]`.

  Raises:
    ValueError: If `rank` is not in `[1, m]`.
  """
  m = s.shape[-1]
  if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= m:
    raise ValueError(f"rank must be an int in [1, {m}]; got {rank!r}.")
  logp = jnp.log(sampling_probs(s))
  gumbel = jax.random.gumbel(key, logp.shape, jnp.float32)
  return jax.lax.top_k(logp + gumbel, rank)[1].astype(jnp.int32)


def resvd(
    u: jax.Array, s: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Re-decomposes `U diag(s) Vᵀ` into an exact SVD of the same matrix.

  Uses thin QRs of `U` and `V` and the SVD of the `m × m` core
  `R_U diag(s) R_Vᵀ`, so the `[d_in, d_out]` product is never formed.

  Args:
    u: `[..., d_in, m]`.
    s: `[..., m]`.
    v: `[..., d_out, m]`.

  Returns:
    `(U', s', V')` of the same shapes: orthonormal columns, `s'`
    non-negative and descending, and `U' diag(s') V'ᵀ = U diag(s) Vᵀ`.
  """
  dtype = u.dtype
  qu, ru = jnp.linalg.qr(u.astype(jnp.float32))
  qv, rv = jnp.linalg.qr(v.astype(jnp.float32))
  core = (ru * s.astype(jnp.float32)[..., None, :]) @ jnp.swapaxes(rv, -1, -2)
  p, sigma, qh = jnp.linalg.svd(core, full_matrices=False)
  new_u = qu @ p
  new_v = qv @ jnp.swapaxes(qh, -1, -2)
  return new_u.astype(dtype), sigma.astype(s.dtype), new_v.astype(dtype)


def spectral_matmul(
    x2: jax.Array,
    u: jax.Array,
    s: jax.Array,
    v: jax.Array,
    enhanced: bool = True,
) -> jax.Array:
  """`x2 U diag(s) Vᵀ` for `x2: [N, d_in]`, all `m` columns differentiable.

  The gradients of `u` and `v` are full `[d, m]` arrays; `SSTLinear` uses
  `active_matmul`, which differentiates only the active block.

  Args:
    x2: `[N, d_in]`.
    u: `[d_in, m]`.
    s: `[m]`.
    v: `[d_out, m]`.
    enhanced: Differentiate `u` and `v` with SST's enhanced gradients
      (`xᵀ (dy V)` and `dyᵀ (x U)`, i.e. without the `diag(s)` factor).
      `False` gives the ordinary gradients.

  Returns:
    `[N, d_out]`.
  """
  if enhanced:
    return _enhanced_matmul(x2, u, s, v)
  return ((x2 @ u) * s[None, :]) @ v.T


@jax.custom_vjp
def _enhanced_matmul(x2, u, s, v):
  return ((x2 @ u) * s[None, :]) @ v.T


def _enhanced_fwd(x2, u, s, v):
  h = x2 @ u
  return (h * s[None, :]) @ v.T, (x2, u, s, v, h)


def _enhanced_bwd(res, dy):
  x2, u, s, v, h = res
  g = dy @ v  # [N, m]
  ds = jnp.sum(h * g, axis=0).astype(s.dtype)
  dx = ((g * s[None, :]) @ u.T).astype(x2.dtype)
  du = (x2.T @ g).astype(u.dtype)  # Enhanced: (∂L/∂W) V, no s factor.
  dv = (dy.T @ h).astype(v.dtype)  # Enhanced: (∂L/∂W)ᵀ U.
  return dx, du, ds, dv


_enhanced_matmul.defvjp(_enhanced_fwd, _enhanced_bwd)


def active_matmul(
    x2: jax.Array,
    u: jax.Array,
    u_frozen: jax.Array,
    s: jax.Array,
    v: jax.Array,
    v_frozen: jax.Array,
    enhanced: bool = True,
) -> jax.Array:
  """`x2 U diag(s) Vᵀ` with `U = [u | u_frozen]`, `V = [v | v_frozen]`.

  Only the active block (`u`, `v`) and `s` are differentiated (plus the
  input): the gradients of `u` and `v` are `[d, r]`, formed from `[N, r]`
  products, and `u_frozen`, `v_frozen` get a zero cotangent (never formed
  inside a `jit` that does not return it).

  Args:
    x2: `[N, d_in]`.
    u: Active block `[d_in, r]`.
    u_frozen: Frozen block `[d_in, m - r]`.
    s: `[m]`, active first.
    v: Active block `[d_out, r]`.
    v_frozen: Frozen block `[d_out, m - r]`.
    enhanced: SST's enhanced gradients for `u`, `v` (no `s_i` factor);
      `False` gives the ordinary gradients.

  Returns:
    `[N, d_out]`.
  """
  return _active_matmul(x2, u, u_frozen, s, v, v_frozen, bool(enhanced))


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _active_matmul(x2, u, uf, s, v, vf, enhanced):
  return _active_fwd(x2, u, uf, s, v, vf, enhanced)[0]


def _active_fwd(x2, u, uf, s, v, vf, enhanced):
  del enhanced
  r = u.shape[-1]
  ha, hf = x2 @ u, x2 @ uf  # [N, r], [N, m - r]
  y = (ha * s[None, :r]) @ v.T + (hf * s[None, r:]) @ vf.T
  return y, (x2, u, uf, s, v, vf, ha, hf)


def _active_bwd(enhanced, res, dy):
  x2, u, uf, s, v, vf, ha, hf = res
  r = u.shape[-1]
  sa, sf = s[None, :r], s[None, r:]
  ga, gf = dy @ v, dy @ vf  # [N, r], [N, m - r]
  ds = jnp.concatenate([jnp.sum(ha * ga, axis=0), jnp.sum(hf * gf, axis=0)])
  dx = (ga * sa) @ u.T + (gf * sf) @ uf.T
  if enhanced:  # (∂L/∂W) V_S and (∂L/∂W)ᵀ U_S, no s factor.
    du, dv = x2.T @ ga, dy.T @ ha
  else:
    du, dv = x2.T @ (ga * sa), dy.T @ (ha * sa)
  return (dx.astype(x2.dtype), du.astype(u.dtype), None, ds.astype(s.dtype),
          dv.astype(v.dtype), None)


_active_matmul.defvjp(_active_fwd, _active_bwd)


def _swap_permutation(selected: jax.Array, m: int, rank: int):
  """The §4.5 swap for one layer: `(perm [m], keep [r])`.

  Column `j` of the new layout is column `perm[j]` of the old one (active
  slots `0..r-1` first). Slots whose vector is in `selected` stay
  (`keep`); the other active slots, in increasing order, receive the
  selected frozen columns in increasing order, which take their place.
  """
  in_set = jnp.zeros([m], bool).at[selected].set(True)
  keep = in_set[:rank]
  perm = jnp.arange(m, dtype=jnp.int32)
  q = min(rank, m - rank)
  if q:
    leaving = jnp.argsort(keep, stable=True)[:q].astype(jnp.int32)
    entering = (rank + jnp.argsort(~in_set[rank:], stable=True)[:q]).astype(
        jnp.int32)
    valid = jnp.arange(q) < rank - jnp.sum(keep)
    perm = perm.at[leaving].set(jnp.where(valid, entering, leaving))
    perm = perm.at[entering].set(jnp.where(valid, leaving, entering))
  return perm, keep


def _batched(fn, *xs, core_ndim):
  """Applies `fn` to the trailing `core_ndim[i]` dims of each `xs[i]`."""
  lead = xs[0].shape[:xs[0].ndim - core_ndim[0]]
  if not lead:
    return fn(*xs)
  n = math.prod(lead)
  flat = [x.reshape((n,) + x.shape[x.ndim - c:]) for x, c in zip(xs, core_ndim)]
  out = jax.vmap(fn)(*flat)
  return jax.tree.map(lambda o: o.reshape(lead + o.shape[1:]), out)


def _sample(key: jax.Array, s: jax.Array, rank: int) -> jax.Array:
  """`sample_indices` with independent keys for each leading index."""
  batch = s.shape[:-1]
  if not batch:
    return sample_indices(key, s, rank)
  keys = jax.random.split(key, math.prod(batch))
  flat = jax.vmap(lambda k, x: sample_indices(k, x, rank))(
      keys, s.reshape(-1, s.shape[-1]))
  return flat.reshape(batch + (rank,))


def _take_columns(x: jax.Array, perm: jax.Array) -> jax.Array:
  """`x[..., perm]` along the last axis, `perm: [..., m]`."""
  if x.ndim == perm.ndim:
    return jnp.take_along_axis(x, perm, axis=-1)
  return jnp.take_along_axis(x, perm[..., None, :], axis=-1)


def _initial_order(s: jax.Array, rank: int, key: jax.Array | None):
  """Column order with the first iteration's active set first."""
  m = s.shape[-1]
  if key is None:  # SVD order: the top r.
    return jnp.broadcast_to(jnp.arange(m, dtype=jnp.int32), s.shape)
  selected = _sample(key, s, rank)

  def order(sel):
    in_set = jnp.zeros([m], bool).at[sel].set(True)
    return jnp.argsort(~in_set, stable=True).astype(jnp.int32)

  return _batched(order, selected, core_ndim=(1,))


# ----------------------------------------------------------------------------
# Layer.


def logical_axes(var: nnx.Variable | None) -> tuple[Any, ...] | None:
  """The logical axes (`out_sharding` metadata) of `var`, as a tuple.

  `None` when `var` is `None` or carries no logical axes. Used by the
  spectral layers to remember (and restore) a dense kernel's axes.
  """
  if var is None:
    return None
  axes = var.get_metadata().get("out_sharding")
  return None if axes is None else tuple(axes)


def base_linear(
    in_features: int,
    out_features: int,
    linear: nnx.Linear | None,
    **linear_kwargs: Any,
) -> nnx.Linear:
  """The dense layer a replacement layer is built from.

  `linear` itself, checked to map `in_features -> out_features`; with
  `linear=None`, a fresh `nnx.Linear(in_features, out_features,
  **linear_kwargs)` built without eager sharding (the replacement places
  its own variables). Used by `SSTLinear` and `sltrain.SLTrainLinear`.

  Raises:
    ValueError: If `linear` maps other sizes.
  """
  if linear is None:
    with nnx.use_eager_sharding(False):
      linear = nnx.Linear(in_features, out_features, **linear_kwargs)
  if (linear.in_features, linear.out_features) != (in_features,
                                                   out_features):
    raise ValueError(
        f"linear is {linear.in_features} -> {linear.out_features}; "
        f"expected {in_features} -> {out_features}."
    )
  return linear


def apply_flat(
    layer: nnx.Module,
    x: jax.Array,
    params: Sequence[jax.Array],
    matmul: Callable[..., jax.Array],
) -> jax.Array:
  """`matmul(x2, *params) + bias` for `x: [..., d_in]`, one layer's params.

  The forward shared by `SSTLinear` and `sltrain.SLTrainLinear`: `layer`
  has `in_features`, `out_features`, `dtype` and `bias` (an `nnx.Param` or
  `None`). `x`, `params` and the bias are promoted to `layer.dtype`, and
  `matmul` sees `x` flattened to `x2: [N, d_in]` and returns `[N, d_out]`.

  Raises:
    ValueError: If `params[0]` is stacked (not 2-D: the layer runs inside
      the layer scan, one slice at a time) or `x` does not end in `d_in`.
  """
  if params[0].ndim != 2:
    raise ValueError(
        f"This {type(layer).__name__} holds stacked parameters "
        f"{params[0].shape}; it runs inside the layer scan, one layer at a "
        "time."
    )
  if x.shape[-1] != layer.in_features:
    raise ValueError(
        f"Input ends in {x.shape[-1]}; expected {layer.in_features}."
    )
  bias = None if layer.bias is None else layer.bias[...]
  x, *params, bias = nnx.nn.dtypes.promote_dtype(
      (x, *params, bias), dtype=layer.dtype)
  batch = x.shape[:-1]
  y = matmul(x.reshape(-1, layer.in_features), *params)
  if bias is not None:
    y = y + bias[None, :]
  return y.reshape(batch + (layer.out_features,))


class SSTLinear(nnx.Module):
  """A linear layer in spectral form, `y = x U diag(s) Vᵀ + b`.

  Build it from a dense init (`SSTLinear(d_in, d_out, rank=r, rngs=...)`) or
  from an existing layer (`SSTLinear.from_linear(linear, rank=r)`); either
  way the factors are the SVD of the dense kernel, so the layer computes
  what the dense one did. `U` and `V` are held as an active block of `rank`
  columns and a frozen block of the other `m - rank` (see the module
  docstring); only the active block is differentiated. Stacked kernels
  `[L, d_in, d_out]` (from `nnx.vmap`/`nnx.scan` layers) give `[L, ...]`
  factors; such a layer is meant to run inside the scan, on one slice at a
  time.

  Attributes:
    sst_u: `nnx.Param` `[..., d_in, r]`, the active left vectors (unit-norm
      columns).
    sst_u_frozen: `nnx.Param` `[..., d_in, m - r]`, the other left vectors.
    sst_s: `nnx.Param` `[..., m]` (non-negative), active first.
    sst_v: `nnx.Param` `[..., d_out, r]`, the active right vectors.
    sst_v_frozen: `nnx.Param` `[..., d_out, m - r]`.
    bias: The dense layer's bias `nnx.Param` `[..., d_out]`, or `None`.
    in_features, out_features, rank, enhanced_grad, dtype, param_dtype,
    kernel_axes: Static configuration (`kernel_axes` are the dense
      kernel's logical axes, used by `to_dense`).
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      rank: int,
      use_bias: bool = True,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      kernel_init: Any = nnx.initializers.lecun_normal(),
      bias_init: Any = nnx.initializers.zeros_init(),
      enhanced_grad: bool = True,
      rngs: nnx.Rngs | None = None,
      linear: nnx.Linear | None = None,
      sample_key: jax.Array | None = None,
  ):
    """Builds the layer.

    Args:
      in_features: `d_in`.
      out_features: `d_out`.
      rank: Number of singular-vector pairs trained per iteration (the
        active block's width); `1 <= rank <= min(d_in, d_out)`.
      use_bias: Add a bias (ignored with `linear`).
      dtype: Compute dtype (`None`: promote input and parameters).
      param_dtype: Parameter dtype (ignored with `linear`).
      kernel_init: Init of the dense kernel that is decomposed.
      bias_init: Init of the bias.
      enhanced_grad: Use SST's enhanced gradients for `U`, `V`.
      rngs: Needed unless `linear` is given.
      linear: Decompose this layer's kernel (keeps its bias variable).
      sample_key: PRNG key that draws the first iteration's active columns
        from `sampling_probs(s)`; `None` takes the top `rank`.

    Raises:
      ValueError: On a bad rank or a `linear` whose sizes do not match.
    """
    if linear is None and rngs is None:
      raise ValueError("SSTLinear needs rngs when no linear is given.")
    linear = base_linear(
        in_features, out_features, linear, use_bias=use_bias, dtype=dtype,
        param_dtype=param_dtype, kernel_init=kernel_init,
        bias_init=bias_init, rngs=rngs)
    m = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not (
        0 < rank <= m):
      raise ValueError(
          f"rank must be an int in [1, min(d_in, d_out) = {m}]; got {rank!r}."
      )
    kvar = linear.kernel
    kernel = kvar.get_value()
    if kernel.ndim < 2 or kernel.shape[-2:] != (in_features, out_features):
      raise ValueError(
          f"Kernel shape {kernel.shape} does not end in "
          f"({in_features}, {out_features})."
      )
    self.in_features = in_features
    self.out_features = out_features
    self.rank = rank
    self.enhanced_grad = bool(enhanced_grad)
    self.dtype = linear.dtype
    self.param_dtype = kernel.dtype
    self.kernel_axes = logical_axes(kvar)
    u, s, vh = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)
    v = jnp.swapaxes(vh, -1, -2)
    order = _initial_order(s, rank, sample_key)
    u, s, v = (_take_columns(x, order) for x in (u, s, v))
    lead = tuple(range(kernel.ndim - 2))
    i, o = kernel.ndim - 2, kernel.ndim - 1
    make = functools.partial(layers.make_variable, nnx.Param, like=kvar)
    cast = lambda x: x.astype(kernel.dtype)
    self.sst_u = make(cast(u[..., :rank]), dims=lead + (i, None))
    self.sst_u_frozen = make(cast(u[..., rank:]), dims=lead + (i, None))
    self.sst_s = make(cast(s), dims=lead + (None,))
    self.sst_v = make(cast(v[..., :rank]), dims=lead + (o, None))
    self.sst_v_frozen = make(cast(v[..., rank:]), dims=lead + (o, None))
    self.bias = nnx.data(linear.bias)

  @classmethod
  def from_linear(
      cls,
      linear: nnx.Linear,
      *,
      rank: int,
      enhanced_grad: bool = True,
      sample_key: jax.Array | None = None,
  ) -> "SSTLinear":
    """The spectral form of `linear` (same function; keeps its bias)."""
    return cls(linear.in_features, linear.out_features, rank=rank,
               enhanced_grad=enhanced_grad, linear=linear,
               sample_key=sample_key)

  @property
  def stacked(self) -> bool:
    return self.sst_u.get_value().ndim > 2

  def factors(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """`(U [..., d_in, m], s [..., m], V [..., d_out, m])`, active first."""
    u = jnp.concatenate(
        [self.sst_u.get_value(), self.sst_u_frozen.get_value()], axis=-1)
    v = jnp.concatenate(
        [self.sst_v.get_value(), self.sst_v_frozen.get_value()], axis=-1)
    return u, self.sst_s.get_value(), v

  def kernel(self) -> jax.Array:
    """The represented dense kernel `U diag(s) Vᵀ`, `[..., d_in, d_out]`."""
    u, s, v = self.factors()
    return (u * s[..., None, :]) @ jnp.swapaxes(v, -1, -2)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x U diag(s) Vᵀ + b` for `x: [..., d_in]`.

    Raises:
      ValueError: If the layer holds stacked factors (run it inside the
        scan) or `x` does not end in `d_in`.
    """
    params = (self.sst_u[...], self.sst_u_frozen[...], self.sst_s[...],
              self.sst_v[...], self.sst_v_frozen[...])
    return apply_flat(
        self, x, params,
        lambda x2, *p: active_matmul(x2, *p, self.enhanced_grad))


# ----------------------------------------------------------------------------
# Model conversion.



def select_modules(
    model: nnx.Module,
    targets: Any,
    exclude: Any = None,
    *,
    eligible: Callable[[Any], bool],
    kind: str,
    opaque: tuple[type, ...] = (layers.LoRAWrapper,),
    skip_types: tuple[type, ...] = (),
) -> list[tuple[tuple[Any, ...], str, Any]]:
  """`(path, dotted path, module)` of the `eligible` modules in `targets`.

  Targets follow `lowrank.adapters.inject`: a regex over the dotted module
  path (full match), a list of names (path equal or ending in `.name`), or
  `"all-linear"`. The model-conversion functions of `lowrank.spectral`
  (`select_linears`, `compress.compress`, `compress.to_dense`, ...) choose
  their layers with it.

  Args:
    model: An NNX model.
    targets: Which modules.
    exclude: Modules to leave alone even if they match.
    eligible: Whether a matched module can be converted.
    kind: What `eligible` accepts, for messages (e.g. `"nnx.Linear"`).
    opaque: Module types not descended into (adapter wrappers by default).
    skip_types: Module types that are silently skipped (already converted).

  Returns:
    The chosen modules, in graph order.

  Raises:
    ValueError: On a bad regex, targets that match nothing, or a matched
      module that is not eligible (an adapter wrapper is named as one); the
      message lists the eligible modules.
  """
  # Targets mean what they mean for adapter injection.
  wrappers = (layers.LoRAWrapper,)
  match = surgery.match(targets, "targets", wrappers=wrappers)
  skip = (lambda p, m: False) if exclude is None else surgery.match(
      exclude, "exclude", wrappers=wrappers)
  modules = list(surgery.iter_modules(model, opaque=opaque))
  names = [surgery.path_str(p) for p, m in modules if eligible(m)]
  chosen, bad = [], []
  for p, m in modules:
    name = surgery.path_str(p)
    if isinstance(m, skip_types) or not match(name, m) or skip(name, m):
      continue
    if eligible(m):
      chosen.append((p, name, m))
    elif isinstance(m, layers.LoRAWrapper):
      bad.append(f"{name} (has an adapter; unload it first)")
    else:
      bad.append(f"{name} ({type(m).__name__})")
  if bad:
    raise ValueError(
        f"targets={targets!r} matched modules that are not {kind}: "
        f"{surgery.listing(bad)}. Eligible modules: "
        f"{surgery.listing(names)}."
    )
  if not chosen:
    raise ValueError(
        f"targets={targets!r} matched no {kind}. Eligible modules: "
        f"{surgery.listing(names)}."
    )
  return chosen


def is_plain_linear(module: Any) -> bool:
  """Whether `module` is exactly an `nnx.Linear` (not a subclass)."""
  return type(module) is nnx.Linear  # pylint: disable=unidiomatic-typecheck


def select_linears(
    model: nnx.Module,
    targets: str | Sequence[str],
    exclude: str | Sequence[str] | None = None,
    skip_types: tuple[type, ...] = (),
) -> list[tuple[tuple[Any, ...], nnx.Linear]]:
  """`(path, layer)` of the `nnx.Linear` layers chosen by `targets`.

  `select_modules` for plain `nnx.Linear` layers (adapter wrappers are
  opaque).

  Args:
    model: An NNX model.
    targets: Which layers (see `select_modules`).
    exclude: Layers to leave alone even if they match.
    skip_types: Module types that are silently skipped (already converted).

  Returns:
    The chosen layers, in graph order.

  Raises:
    ValueError: On a bad regex, targets that match nothing, or a matched
      module that is not exactly an `nnx.Linear`; the message lists the
      `nnx.Linear` layers that exist.
  """
  return [(p, m) for p, _, m in select_modules(
      model, targets, exclude, eligible=is_plain_linear, kind="nnx.Linear",
      skip_types=skip_types)]


def to_sst(
    model: nnx.Module,
    *,
    targets: str | Sequence[str],
    rank: int,
    exclude: str | Sequence[str] | None = None,
    enhanced_grad: bool = True,
    seed: int | None = 0,
) -> nnx.Module:
  """Replaces the chosen `nnx.Linear` layers by `SSTLinear` (in place).

  Args:
    model: An NNX model.
    targets: Which layers: a regex over the dotted module path (full
      match), a list of names (path equal or ending in `.name`), or
      `"all-linear"` (same semantics as `lowrank.adapters.inject`).
    rank: Singular-vector pairs trained per iteration, per layer; at most
      `min(d_in, d_out)` of every chosen layer.
    exclude: Layers to leave dense even if they match.
    enhanced_grad: Use SST's enhanced gradients for `U`, `V`.
    seed: Draws each layer's first active set from `sampling_probs(s)`
      (layer `i` in graph order uses `fold_in(key(seed), i)`); `None`
      takes the top `rank` singular vectors.

  Returns:
    `model`, with spectral layers. Each computes what its dense layer did.

  Raises:
    ValueError: On a bad regex, targets that match nothing or a module that
      is not an `nnx.Linear`, a rank too large for a layer, or a seed that
      is not an int or `None`.
  """
  if seed is not None and (isinstance(seed, bool)
                           or not isinstance(seed, int)):
    raise ValueError(f"seed must be an int or None; got {seed!r}.")

  def build(i, linear):
    key = None if seed is None else jax.random.fold_in(
        jax.random.key(seed), i)
    return SSTLinear.from_linear(linear, rank=rank,
                                 enhanced_grad=enhanced_grad, sample_key=key)

  return replace_linears(model, targets, exclude, SSTLinear, build)


def replace_linears(
    model: nnx.Module,
    targets: str | Sequence[str],
    exclude: str | Sequence[str] | None,
    kind: type[nnx.Module],
    build: Callable[[int, nnx.Linear], nnx.Module],
) -> nnx.Module:
  """Replaces the `select_linears` layers (skipping `kind`) in place.

  Layer `i` of the chosen ones (graph order) becomes `build(i, linear)`;
  a `ValueError` from `build` is raised again with the layer's path in
  front. Used by `to_sst` and `sltrain.to_sltrain`.

  Returns:
    `model`.
  """
  for i, (p, m) in enumerate(select_linears(model, targets, exclude,
                                            (kind,))):
    try:
      new = build(i, m)
    except ValueError as e:
      raise ValueError(f"{surgery.path_str(p)}: {e}") from e
    surgery.set_submodule(model, p, new)
  return model


def modules_of(model: nnx.Module, kind: type[nnx.Module]) -> dict[str, Any]:
  """Dotted path -> module for every `kind` module of `model` (adapter
  wrappers are opaque)."""
  return {surgery.path_str(p): m for p, m in surgery.iter_modules(
      model, kind=kind, opaque=(layers.LoRAWrapper,))}


def sst_modules(model: nnx.Module) -> dict[str, SSTLinear]:
  """Dotted path -> `SSTLinear`, for every spectral layer of `model`."""
  return modules_of(model, SSTLinear)


def ranks(model: nnx.Module) -> dict[str, int]:
  """`{module path: rank}` of the spectral layers (for `sst_optimizer`)."""
  return {name: m.rank for name, m in sst_modules(model).items()}


def _dense_linear(m: SSTLinear) -> nnx.Linear:
  with nnx.use_eager_sharding(False):
    lin = nnx.Linear(
        m.in_features, m.out_features, use_bias=m.bias is not None,
        dtype=m.dtype, param_dtype=m.param_dtype,
        kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0))
  u = m.sst_u.get_value()
  w = m.kernel().astype(m.param_dtype)
  kwargs = {} if m.kernel_axes is None else {"out_sharding": m.kernel_axes}
  sh_u = getattr(u, "sharding", None)
  if isinstance(sh_u, jax.sharding.NamedSharding) and m.kernel_axes:
    try:
      spec = sharding.logical_to_spec(m.kernel_axes, mesh=sh_u.mesh,
                                      shape=w.shape)
    except ValueError:  # Custom logical names: leave placement to JAX.
      spec = None
    if spec is not None:
      w = jax.device_put(w, jax.sharding.NamedSharding(sh_u.mesh, spec))
  with nnx.use_eager_sharding(False):
    lin.kernel = nnx.Param(w, **kwargs)
  if m.bias is not None:
    lin.bias = m.bias
  return lin


def to_dense(model: nnx.Module) -> nnx.Module:
  """Replaces every `SSTLinear` by an `nnx.Linear` with `U diag(s) Vᵀ`.

  Args:
    model: A model converted with `to_sst` (in place).

  Returns:
    `model`, with dense layers (kernel logical axes restored).

  Raises:
    ValueError: If the model has no spectral layer.
  """
  mods = sst_modules(model)
  if not mods:
    raise ValueError("The model has no SSTLinear layer to convert.")
  for name, m in mods.items():
    path = tuple(int(p) if p.isdigit() else p for p in name.split("."))
    surgery.set_submodule(model, path, _dense_linear(m))
  return model


# ----------------------------------------------------------------------------
# Optimizer.


class SSTState(NamedTuple):
  """State for `sst_optimizer`.

  Attributes:
    count: Steps taken; int32 `[]`.
    dense_state: `inner`'s state over the non-spectral leaves (a flat
      `{path: leaf}` dict); never reset.
    s_state: `inner`'s state over the singular values `{path.sst_s: s}`;
      its per-value entries move with the values at a swap and are zeroed
      at every re-SVD.
    block_state: `inner`'s state over the active blocks
      `{path.sst_u: [..., d_in, r], path.sst_v: [..., d_out, r]}`; the
      entries of newly swapped-in columns are zeroed at every resample
      (all of them at a re-SVD, and the whole state, count included, with
      `block_reset="all"`).
  """

  count: jax.Array
  dense_state: optax.OptState
  s_state: optax.OptState
  block_state: optax.OptState


class _Group(NamedTuple):
  path: str
  rank: int
  m: int

  def key(self, name: str) -> str:
    """The flat path of leaf `name` of this layer (the root has path "")."""
    return f"{self.path}.{name}" if self.path else name


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat(tree) -> tuple[list[str], list[Any], Any]:
  """Leaves with dotted paths (a trailing Variable `.value` dropped)."""
  pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = []
  for path, _ in pairs:
    names = [_key_name(k) for k in path]
    if (names and names[-1] == "value"
        and isinstance(path[-1], jax.tree_util.GetAttrKey)):
      names = names[:-1]
    paths.append(".".join(names))
  return paths, [x for _, x in pairs], treedef


def _groups(paths: list[str], leaves: list[Any], rank) -> list[_Group]:
  """The spectral layers in `paths`, validated."""
  found: dict[str, dict[str, Any]] = {}
  for path, leaf in zip(paths, leaves):
    prefix, _, last = path.rpartition(".")
    if last in SST_NAMES:
      found.setdefault(prefix, {})[last] = leaf
  groups = []
  for prefix in sorted(found):
    parts = found[prefix]
    missing = [n for n in SST_NAMES if n not in parts]
    if missing:
      raise ValueError(
          f"Spectral layer {prefix!r} lacks {missing} among the optimized "
          f"leaves; optimize {', '.join(SST_NAMES)} together (e.g. "
          "wrt=nnx.Param)."
      )
    u, uf, s, v, vf = (tuple(jnp.shape(parts[n])) for n in SST_NAMES)
    lead = s[:-1]
    ok = len(u) >= 2 and len(s) >= 1
    if ok:
      r, m = u[-1], s[-1]
      ok = (u[:-2] == uf[:-2] == v[:-2] == vf[:-2] == lead
            and len(uf) == len(u) == len(v) == len(vf)
            and uf[-2] == u[-2] and vf[-2] == v[-2] and v[-1] == r
            and uf[-1] == vf[-1] == m - r and 0 < r <= m)
    if not ok:
      raise ValueError(
          f"Spectral layer {prefix!r} has inconsistent shapes: "
          + ", ".join(f"{n} {jnp.shape(parts[n])}" for n in SST_NAMES)
          + "; expected [..., d_in, r], [..., d_in, m - r], [..., m], "
          "[..., d_out, r], [..., d_out, m - r] with 1 <= r <= m."
      )
    if rank is not None:
      if isinstance(rank, Mapping):
        if prefix not in rank:
          raise ValueError(
              f"rank has no entry for spectral layer {prefix!r}; it has "
              f"{sorted(rank)}. Pass rank=None to read the ranks from the "
              "layers."
          )
        want = rank[prefix]
      else:
        want = rank
      if want != r:
        raise ValueError(
            f"rank for {prefix!r} is {want!r}, but the layer's active block "
            f"has {r} columns ({U_NAME} {u}); the rank is fixed by "
            "to_sst(rank=...). Pass that rank or rank=None."
        )
    groups.append(_Group(prefix, r, m))
  return groups


def _normalize_columns(x: jax.Array) -> jax.Array:
  norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-2, keepdims=True)
  return (x / jnp.maximum(norm, 1e-12).astype(x.dtype)).astype(x.dtype)


def _warm(count: jax.Array, refresh_every: int, rewarm_steps: int):
  """Re-warm-up factor `min(1, j / rewarm_steps)`, `j` steps since a reset.

  Resets happen after every `refresh_every` steps; the first
  `refresh_every` steps (before any reset) get 1 (the learning-rate
  schedule's own warm-up covers them).
  """
  if rewarm_steps == 0:
    return 1.0
  j = (count % refresh_every + 1).astype(jnp.float32)
  return jnp.where(count < refresh_every, 1.0,
                   jnp.minimum(1.0, j / rewarm_steps))


def _merge_state(old, fresh, columns: Mapping[str, tuple[Any, Callable]],
                 other: Callable):
  """Combines `old` and `fresh` inner states leaf by leaf.

  A leaf under the dict key `k` of `columns` whose shape is `columns[k][0]`
  (a per-parameter moment) becomes `columns[k][1](old, fresh)`; every other
  leaf (step counts, ...) becomes `other(old, fresh)`.
  """
  def merge(path, o, n):
    for k in path:
      name = getattr(k, "key", None)
      if isinstance(name, str) and name in columns:
        shape, fn = columns[name]
        if tuple(jnp.shape(o)) == tuple(shape):
          return fn(o, n)
    return other(o, n)

  return jax.tree_util.tree_map_with_path(merge, old, fresh)


def _check_int(name: str, value: Any, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")


def sst_optimizer(
    inner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int | Mapping[str, int] | None = None,
    refresh_every: int = DEFAULT_REFRESH_EVERY,
    round_length: int | None = None,
    rewarm_steps: int | None = None,
    block_reset: str = "new",
    weight_decay: jax.typing.ArrayLike = 0.0,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformation:
  """Sparse Spectral Training as one optax transformation.

  Spectral layers are recognised by their leaf names (`sst_u`,
  `sst_u_frozen`, `sst_s`, `sst_v`, `sst_v_frozen` under one module path, as
  `SSTLinear` names them). With `c` the step count before the update, each
  update:

  1. `inner` turns the gradients into directions for every non-spectral
     leaf (dense training of the rest of the model), for every `s`, and for
     the active blocks `sst_u`, `sst_v` (whose gradients are SST's enhanced
     gradients when the layer computes them). The frozen blocks' gradients
     are never read.
  2. New values are `p - lr_c (d + wd p)` for the dense leaves,
     `max(s - lr_c w_s (d + wd s), 0)` for `s`, and the active columns are
     `normalize(p - lr_c w_u d)` (no weight decay on `U`, `V`); `w_u`,
     `w_s` are the re-warm-up factors (below), `lr_c` the schedule at `c`.
  3. If `(c + 1) % round_length == 0`: `[U | U_frozen] diag(s) [V |
     V_frozen]ᵀ` is re-decomposed (`resvd`); `inner`'s per-value state of
     `s` and of the blocks is zeroed (counts kept, unless
     `block_reset="all"`).
  4. If `(c + 1) % refresh_every == 0` (always at a round end): layer `i`
     (layers sorted by module path) draws `r` indices
     `sample_indices(fold_in(fold_in(key(seed), c + 1), i), s, r)` over its
     current columns (active first). Re-drawn active columns stay in place
     and keep their `inner` state; the other active slots, in increasing
     order, receive the drawn frozen columns in increasing order, whose
     slots receive the vectors they replace (`U`, `V` and `s` permuted
     alike), and those active slots' moments are zeroed. The block's step
     count is kept (`block_reset="new"`, PyTorch's per-tensor step), or the
     whole block state is re-initialised (`block_reset="all"`). The
     per-value state of `s` moves with the values.
  5. Re-warm-up: on the `j`-th step after a resample (`j = 1, 2, ...`,
     i.e. `j = c % refresh_every + 1` for `c >= refresh_every`) the active
     block's step is scaled by `w_u = min(1, j / rewarm_steps)`; after a
     re-SVD, `s`'s step likewise by `w_s` (with `round_length`). Steps
     before the first reset get 1.

  The learning rate (and schedule) is applied here with the global step
  count, so resets never restart a schedule.

  Args:
    inner: A gradient-only transformation (e.g. `optax.scale_by_adam()`);
      it must not apply a learning rate or weight decay. It sees flat
      `{path: array}` dicts; its per-parameter state leaves are recognised
      by their dict key and shape.
    learning_rate: Scalar or schedule (of the step count).
    rank: Optional check of the active block widths: one int, or
      `{module path: int}` (e.g. `ranks(model)`); `None` reads them from the
      layers (the rank is fixed by `to_sst`).
    refresh_every: Steps per iteration (the paper's T3), Python int.
    round_length: Steps per round (between re-SVDs), a multiple of
      `refresh_every`; `None`: `refresh_every · max ⌈m / r⌉` over the
      spectral layers (the paper's `m/r` iterations per round).
    rewarm_steps: Length of the re-warm-up after each reset, `0 <=
      rewarm_steps <= refresh_every` (0 disables it); `None`:
      `refresh_every // 10`.
    block_reset: `"new"` (zero the moments of swapped-in columns, keep the
      rest and the count) or `"all"` (re-initialise the block state).
    weight_decay: Decoupled weight decay on `s` and non-spectral leaves.
    seed: Int seed or PRNG key for the sampling.

  Returns:
    An `optax.GradientTransformation` whose updates are final (apply them
    with `optax.apply_updates`; do not chain a learning rate after it).

  Raises:
    ValueError: On bad schedule lengths, `block_reset` or `seed`; (at
      `init`/`update`) on spectral layers with missing leaves, inconsistent
      shapes or a rank that differs from `rank`, or when `params` is not
      given to `update`.
  """
  _check_int("refresh_every", refresh_every, 1)
  if round_length is not None:
    _check_int("round_length", round_length, 1)
    if round_length % refresh_every:
      raise ValueError(
          f"round_length ({round_length}) must be a multiple of "
          f"refresh_every ({refresh_every}), so that a round ends on a "
          "resample; or pass round_length=None for (m/r)·refresh_every."
      )
  if rewarm_steps is None:
    rewarm_steps = refresh_every // 10
  _check_int("rewarm_steps", rewarm_steps, 0)
  if rewarm_steps > refresh_every:
    raise ValueError(
        f"rewarm_steps ({rewarm_steps}) must be <= refresh_every "
        f"({refresh_every}): the warm-up restarts at every resample."
    )
  if block_reset not in BLOCK_RESETS:
    raise ValueError(
        f"block_reset must be one of {BLOCK_RESETS}; got {block_reset!r}."
    )
  if isinstance(seed, int) and not isinstance(seed, bool):
    base_key = jax.random.key(seed)
  elif (isinstance(seed, jax.Array)
        and jnp.issubdtype(seed.dtype, jax.dtypes.prng_key)
        and seed.ndim == 0):
    base_key = seed
  else:
    raise ValueError(
        f"seed must be an int or a scalar PRNG key; got {seed!r}."
    )

  def split(params):
    paths, leaves, treedef = _flat(params)
    groups = _groups(paths, leaves, rank)
    table = dict(zip(paths, leaves))
    spectral = {g.key(n) for g in groups for n in SST_NAMES}
    dense = {p: x for p, x in table.items() if p not in spectral}
    return paths, treedef, groups, table, dense

  def round_steps_of(groups) -> int:
    if round_length is not None:
      return round_length
    return refresh_every * max([-(-g.m // g.rank) for g in groups] or [1])

  def blocks(groups, table):
    return {g.key(n): table[g.key(n)]
            for g in groups for n in (U_NAME, V_NAME)}

  def s_tree(groups, table):
    return {g.key(S_NAME): table[g.key(S_NAME)]
            for g in groups}

  def init_fn(params):
    _, _, groups, table, dense = split(params)
    return SSTState(
        count=jnp.zeros([], jnp.int32),
        dense_state=inner.init(dense),
        s_state=inner.init(s_tree(groups, table)),
        block_state=inner.init(blocks(groups, table)),
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("sst_optimizer needs params in update().")
    _, _, groups, p_table, p_dense = split(params)
    g_paths, g_leaves, g_def = _flat(updates)
    g_table = dict(zip(g_paths, g_leaves))
    if set(g_table) != set(p_table):
      raise ValueError(
          "updates and params have different leaves: "
          f"{sorted(set(g_table) ^ set(p_table))[:5]}."
      )
    count = state.count
    round_steps = round_steps_of(groups)
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    wd = weight_decay
    warm_u = _warm(count, refresh_every, rewarm_steps)
    warm_s = _warm(count, round_steps, rewarm_steps)

    out: dict[str, jax.Array] = {}
    # Non-spectral leaves: inner + decoupled weight decay + learning rate.
    g_dense = {k: g_table[k] for k in p_dense}
    d_dense, dense_state = inner.update(g_dense, state.dense_state, p_dense)
    for k, p in p_dense.items():
      out[k] = (p - lr * (d_dense[k] + wd * p)).astype(p.dtype) - p
    # Singular values (every one, every step) and the active blocks.
    d_s, s_state = inner.update(s_tree(groups, g_table), state.s_state,
                                s_tree(groups, p_table))
    d_blk, block_state = inner.update(blocks(groups, g_table),
                                      state.block_state,
                                      blocks(groups, p_table))
    vals = {}
    for g in groups:
      ku, kuf, ks, kv, kvf = (g.key(n) for n in SST_NAMES)
      p = p_table[ks]
      vals[ks] = jnp.maximum(
          p - lr * warm_s * (d_s[ks] + wd * p), 0).astype(p.dtype)
      for k in (ku, kv):
        p = p_table[k]
        vals[k] = _normalize_columns((p - lr * warm_u * d_blk[k]).astype(
            p.dtype))
      vals[kuf], vals[kvf] = p_table[kuf], p_table[kvf]

    round_end = (count + 1) % round_steps == 0
    key = jax.random.fold_in(base_key, count + 1)

    def swap(operand):
      vals, b_state, s_state = operand
      vals = dict(vals)
      b_cols, s_cols = {}, {}
      for i, g in enumerate(groups):
        ku, kuf, ks, kv, kvf = (g.key(n) for n in SST_NAMES)
        u = jnp.concatenate([vals[ku], vals[kuf]], axis=-1)
        v = jnp.concatenate([vals[kv], vals[kvf]], axis=-1)
        u, s, v = jax.lax.cond(round_end, resvd, lambda *a: a, u,
                               vals[ks], v)
        chosen = _sample(jax.random.fold_in(key, i), s, g.rank)
        perm, keep = _batched(
            functools.partial(_swap_permutation, m=g.m, rank=g.rank),
            chosen, core_ndim=(1,))
        u, s, v = (_take_columns(x, perm) for x in (u, s, v))
        r = g.rank
        vals.update({ku: u[..., :r], kuf: u[..., r:], ks: s,
                     kv: v[..., :r], kvf: v[..., r:]})
        keep = keep[..., None, :] & ~round_end
        for k in (ku, kv):
          b_cols[k] = (vals[k].shape,
                       lambda o, n, keep=keep: jnp.where(keep, o, n))
        s_cols[ks] = (s.shape, lambda o, n, perm=perm: jnp.where(
            round_end, n, _take_columns(o, perm)))
      fresh_b = inner.init(blocks(groups, vals))
      fresh_s = inner.init(s_tree(groups, vals))
      if block_reset == "all":
        b_state = fresh_b
        s_other = lambda o, n: jnp.where(round_end, n, o)
      else:
        b_state = _merge_state(b_state, fresh_b, b_cols, lambda o, n: o)
        s_other = lambda o, n: o
      s_state = _merge_state(s_state, fresh_s, s_cols, s_other)
      return vals, b_state, s_state

    vals, block_state, s_state = jax.lax.cond(
        (count + 1) % refresh_every == 0, swap, lambda o: o,
        (vals, block_state, s_state))
    for k, v in vals.items():
      out[k] = (v - p_table[k]).astype(p_table[k].dtype)
    new_updates = jax.tree_util.tree_unflatten(
        g_def, [out[k] for k in g_paths])
    return new_updates, SSTState(
        count=count + 1, dense_state=dense_state, s_state=s_state,
        block_state=block_state)

  return optax.GradientTransformation(init_fn, update_fn)


def sst_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int | Mapping[str, int] | None = None,
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
    refresh_every: int = DEFAULT_REFRESH_EVERY,
    round_length: int | None = None,
    rewarm_steps: int | None = None,
    block_reset: str = "new",
    seed: int | jax.Array = 0,
) -> optax.GradientTransformation:
  """`sst_optimizer` with Adam moments (AdamW on the whole model).

  Examples:
    >>> import optax
    >>> from lowrank.spectral import sst
    >>> tx = sst.sst_adamw(1e-3, refresh_every=50)
    >>> isinstance(tx, optax.GradientTransformation)
    True

  Args:
    learning_rate: Scalar or schedule.
    rank: See `sst_optimizer`.
    b1, b2, eps: Adam hyperparameters.
    weight_decay: Decoupled weight decay (not on `U`, `V`).
    refresh_every, round_length, rewarm_steps, block_reset, seed: See
      `sst_optimizer` (defaults: 100-step iterations, `m/r` iterations per
      round, a 10-step re-warm-up, zeroed moments for new columns only).

  Returns:
    The transformation.
  """
  return sst_optimizer(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps), learning_rate, rank=rank,
      refresh_every=refresh_every, round_length=round_length,
      rewarm_steps=rewarm_steps, block_reset=block_reset,
      weight_decay=weight_decay, seed=seed)


presets.register(
    "sst_adamw",
    source="arXiv:2405.15481 (Algorithm 1, §4.5, App. F.2; the official "
    "code, biomedical-cybernetics/sparse-spectral-training, could not be "
    "read)",
    unavailable=(
        "a check against the official code: the details the paper leaves "
        "open (what a resample resets, the re-warm-up's scope, weight decay "
        "on U and V, T3 for LLM pretraining) follow the paper's text and "
        "ReLoRA's public code (module docstring); the sign-SGD artefact of "
        "the former resample_every=1 default is fixed (T3 = 100, momenta "
        "kept within an iteration, re-warm-up after each reset)",))


@nnx.jit(static_argnums=2)
def _train_step(model, optimizer, loss_fn, *batch):
  loss, grads = nnx.value_and_grad(
      loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(model, *batch)
  optimizer.update(model, grads)
  return loss


def train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    loss_fn: Callable[..., jax.Array],
    *batch: Any,
) -> jax.Array:
  """One jitted training step: `loss_fn(model, *batch)`, grads, update.

  Differentiates what the optimizer updates (`optimizer.wrt`); works for
  any optimizer (for SST, `sst_adamw` over `nnx.Param`). The gradients of
  spectral layers are the enhanced ones by construction.

  Args:
    model: The model (updated in place).
    optimizer: `nnx.Optimizer(model, tx, wrt=...)`.
    loss_fn: `(model, *batch) -> scalar`; hashable (it is a static
      argument of the jit, so pass the same function every step).
    *batch: Arrays passed to `loss_fn`.

  Returns:
    The loss before the update.
  """
  return _train_step(model, optimizer, loss_fn, *batch)
