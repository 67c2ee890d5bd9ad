r"""Combining several trained LoRAs for the same layers into one.

    fa = merging.lora_factors(model_a)           # {path: (A, B, scale)}
    fb = merging.lora_factors(model_b)
    merged = merging.merge_ties([fa, fb], [1.0, 1.0], density=0.2, rank=8)
    adapters.inject(model, targets=list(merged), rank=8)
    merging.set_lora_factors(model, merged)

An adapter is a dict `{path: (A [d_in, r], B [r, d_out], scale)}` with
`ΔW = scale · A B` (the 2-D kernel view of `lowrank.adapters.layers`);
`lora_factors(model)` reads one from a model and `set_lora_factors` loads
one into a model built with plain LoRA wrappers of the same rank (or use
`multi.add_adapter(model, name, factors=...)`). Every merge below returns
such a dict with `scale = 1` and float32 factors, and is a pure array
function (jit it with the static options bound, e.g. with
`functools.partial`). Task vectors are `τ_i = w_i ΔW_i`.

* `merge_linear(..., method="cat")`: concatenates the factors,
  `A = [A_1 … A_N]`, `B = [w_1 s_1 B_1; …; w_N s_N B_N]`: exactly
  `Σ w_i ΔW_i`, at rank `Σ r_i` (rank-1 units are additive).
  `method="svd"`: the best rank-`rank` approximation of the same sum
  (truncated SVD, optimal in Frobenius and spectral norm by Eckart–Young;
  computed from QR factors of the concatenation, never the dense sum).
* `merge_ties`: TIES-Merging on the dense deltas: keep the top `density`
  fraction of each `τ_i` by magnitude, elect the sign per entry
  (`sgn Σ_i τ̂_i`, or by count), average the entries that agree with it
  (disjoint mean), then truncated SVD to `rank`.
* `merge_dare`: DARE: drop each entry of `τ_i` with probability `p` and
  scale the rest by `1/(1-p)` (unbiased), then sum (or TIES sign election
  and disjoint mean), then truncated SVD to `rank`.
* `merge_lego`: LoRA-LEGO: every rank-1 unit `(a_j, b_j)` of every LoRA (a
  "minimal semantic unit") goes into one pool; k-means on the concatenated
  vectors `[a_j; b_j]` groups them into `k = rank` clusters; each centroid is
  one rank-1 unit of the merged LoRA. Parameter reweighting then rescales
  each centroid's `a` and `b` parts to the mean norm of its members' parts
  (averaging vectors that point in different directions shrinks them: the
  paper's "norm decay"). The paper also describes an output reweighting for
  "variance expansion"; its exact formula was not available here, so only a
  user-given `output_scale` is offered for it.

References:
  Yadav et al. 2023, TIES-Merging, https://arxiv.org/abs/2306.01708
  Yu et al. 2023, Language Models are Super Mario (DARE),
    https://arxiv.org/abs/2311.03099
  Zhao et al. 2024, Merging LoRAs like Playing LEGO,
    https://arxiv.org/abs/2409.16167
  Eckart & Young 1936, The approximation of one matrix by another of lower
    rank, Psychometrika 1(3).
  Hugging Face PEFT `add_weighted_adapter` (combination types `cat`, `svd`,
    `ties`, `dare_linear`, `dare_ties`).
"""

from collections.abc import Mapping, Sequence
import functools
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int

from lowrank.adapters import injection

Factors = Mapping[str, tuple[Any, Any, Any]]
_F32 = jnp.float32


# ---------------------------------------------------------------------------
# Reading and writing models.


def lora_factors(
    model: nnx.Module, adapter: str | None = None
) -> dict[str, tuple[jax.Array, jax.Array, Any]]:
  """`{path: (A [d_in, r], B [r, d_out], scale)}` of a model's LoRA.

  Args:
    model: A model with plain LoRA wrappers (`adapters.inject`), or with
      named adapters (`lowrank.adapters.multi`).
    adapter: With named adapters, which one (layers it does not target are
      left out); must be `None` for plain LoRA.

  Returns:
    The factors; `scale · A B` is each layer's 2-D kernel update.

  Raises:
    ValueError: If the model has no LoRA, mixes in another adapter method
      (whose update is not `s·A B`), or `adapter` is missing / unknown.
  """
  out = {}
  mods = injection.adapter_modules(model)
  if not mods:
    raise ValueError("The model has no adapters.")
  for path, m in mods.items():
    if m.method == "multi_lora":
      if adapter is None:
        raise ValueError(
            f"{path!r} holds named adapters {m.names}; pass adapter=<name>."
        )
      f = m.factors(adapter)
      if f is not None:
        out[path] = f
    elif m.method == "lora":
      if adapter is not None:
        raise ValueError(
            f"{path!r} holds a single plain LoRA; adapter must be None, got "
            f"{adapter!r}."
        )
      a2, b2 = m.peft_factors()
      out[path] = (a2, b2, m.scale)
    else:
      raise ValueError(
          f"{path!r} holds a {m.method!r} adapter; merging reads plain LoRA "
          "(ΔW = s·A B) only."
      )
  if not out:
    raise ValueError(f"Adapter {adapter!r} targets no layer of this model.")
  return out


def set_lora_factors(
    model: nnx.Module, factors: Factors, *, strict: bool = True
) -> nnx.Module:
  """Loads `{path: (A, B, scale)}` into the model's plain LoRA wrappers.

  Each wrapper must have the factors' rank; `B` is rescaled by
  `scale / wrapper.scale` so the wrapper's update is exactly `scale·A B`
  whatever its own alpha.

  Args:
    model: Model with plain LoRA wrappers (e.g. `inject(..., rank=k)`).
    factors: The adapter (for example a merge result).
    strict: Require the factors to cover every LoRA wrapper of the model.

  Returns:
    `model`, updated in place.

  Raises:
    ValueError: On missing / extra paths, rank or shape mismatches, a
      merged wrapper, or a wrapper that is not plain LoRA.
  """
  mods = {
      p: m for p, m in injection.adapter_modules(model).items()
      if m.method == "lora"
  }
  missing = sorted(set(factors) - set(mods))
  if missing:
    raise ValueError(
        f"No plain LoRA wrapper at {missing[:20]}; wrappers: "
        f"{sorted(mods)[:40]}."
    )
  if strict and set(mods) - set(factors):
    raise ValueError(
        f"factors do not cover LoRA wrappers "
        f"{sorted(set(mods) - set(factors))[:20]} (pass strict=False to "
        "leave them unchanged)."
    )
  for path, (a, b, s) in factors.items():
    m = mods[path]
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.shape != (m.d_in, m.rank) or b.shape != (m.rank, m.d_out):
      raise ValueError(
          f"{path!r}: the wrapper needs A {(m.d_in, m.rank)} and B "
          f"{(m.rank, m.d_out)} (rank {m.rank}); got {a.shape} and "
          f"{b.shape}. Build it with rank={a.shape[-1]}."
      )
    if m.merged:
      raise ValueError(f"{path!r} is merged; unmerge it first.")
    ratio = jnp.asarray(s, _F32) / m.scale
    m.set_peft_factors(a, b.astype(_F32) * ratio)
  return model


# ---------------------------------------------------------------------------
# Pure array helpers.


def delta(
    a: Float[Array, "d_in r"], b: Float[Array, "r d_out"], scale: Any
) -> Float[Array, "d_in d_out"]:
  """`scale · A B` in float32."""
  return (a.astype(_F32) @ b.astype(_F32)) * jnp.asarray(scale, _F32)


def _pad_rank(a, b, rank: int):
  t = a.shape[1]
  if t < rank:
    a = jnp.pad(a, ((0, 0), (0, rank - t)))
    b = jnp.pad(b, ((0, rank - t), (0, 0)))
  return a, b


@functools.partial(jax.jit, static_argnames=("rank",))
def svd_factors(
    w: Float[Array, "d_in d_out"], rank: int
) -> tuple[Float[Array, "d_in rank"], Float[Array, "rank d_out"]]:
  """Best rank-`rank` factors of `w` (truncated SVD, balanced `√σ` split).

  `A = U_t diag(√σ)`, `B = diag(√σ) V_tᵀ`; zero-padded when `rank` exceeds
  `min(d_in, d_out)`. `‖w − A B‖_F² = Σ_{j>rank} σ_j²` (Eckart–Young).
  """
  _check_rank(rank)
  u, s, vt = jnp.linalg.svd(w.astype(_F32), full_matrices=False)
  t = min(rank, s.shape[0])
  root = jnp.sqrt(s[:t])
  return _pad_rank(u[:, :t] * root[None, :], root[:, None] * vt[:t], rank)


@functools.partial(jax.jit, static_argnames=("rank",))
def lowrank_svd_factors(
    a: Float[Array, "d_in n"], b: Float[Array, "n d_out"], rank: int
) -> tuple[Float[Array, "d_in rank"], Float[Array, "rank d_out"]]:
  """`svd_factors(a @ b, rank)` without forming `a @ b`.

  QR of `a` and `bᵀ` reduce the SVD to the small `[n, n]` core
  `R_a R_bᵀ`; cost O((d_in + d_out) n²) instead of O(d_in d_out min(d)).
  """
  _check_rank(rank)
  qa, ra = jnp.linalg.qr(a.astype(_F32))
  qb, rb = jnp.linalg.qr(b.astype(_F32).T)
  u, s, vt = jnp.linalg.svd(ra @ rb.T, full_matrices=False)
  t = min(rank, s.shape[0])
  root = jnp.sqrt(s[:t])
  return _pad_rank(
      (qa @ u[:, :t]) * root[None, :], root[:, None] * (vt[:t] @ qb.T), rank
  )


def trim(
    tau: Float[Array, "*shape"], density: float | int
) -> Float[Array, "*shape"]:
  """TIES trim: keeps the `int(density · size)` largest-magnitude entries."""
  _check_fraction(density, "density", allow_one=True)
  flat = tau.reshape(-1)
  k = int(density * flat.shape[0])
  if k == 0:
    return jnp.zeros_like(tau)
  _, idx = jax.lax.top_k(jnp.abs(flat), k)
  keep = jnp.zeros(flat.shape, bool).at[idx].set(True)
  return jnp.where(keep, flat, 0).reshape(tau.shape)


def disjoint_mean(
    taus: Float[Array, "n *shape"], majority: str = "total"
) -> Float[Array, "*shape"]:
  """TIES sign election and disjoint mean over the task axis 0.

  The elected sign is `sgn Σ_i τ_i` (`"total"`, the paper's "mass") or
  `sgn Σ_i sgn τ_i` (`"frequency"`); each entry is the mean of the non-zero
  `τ_i` whose sign agrees with it (0 if none does).

  Raises:
    ValueError: On an unknown `majority`.
  """
  if majority == "total":
    sign = jnp.sign(jnp.sum(taus, axis=0))
  elif majority == "frequency":
    sign = jnp.sign(jnp.sum(jnp.sign(taus), axis=0))
  else:
    raise ValueError(
        f"majority must be 'total' or 'frequency'; got {majority!r}."
    )
  agree = (jnp.sign(taus) == sign[None]) & (taus != 0)
  total = jnp.sum(jnp.where(agree, taus, 0), axis=0)
  count = jnp.sum(agree, axis=0)
  return total / jnp.maximum(count, 1).astype(total.dtype)


def ties(
    taus: Float[Array, "n *shape"],
    density: float | int,
    majority: str = "total",
) -> Float[Array, "*shape"]:
  """TIES-Merging of task vectors `taus` (trim, elect sign, disjoint mean)."""
  return disjoint_mean(
      jax.vmap(lambda t: trim(t, density))(taus), majority=majority
  )


def dare(
    tau: Float[Array, "*shape"], key: jax.Array, drop_rate: Any
) -> Float[Array, "*shape"]:
  """DARE: zero each entry with probability `p`, scale the rest by 1/(1-p).

  Unbiased: `E[dare(τ)] = τ`.
  """
  if not isinstance(drop_rate, jax.core.Tracer):
    _check_fraction(float(drop_rate), "drop_rate", allow_zero=True)
  p = jnp.asarray(drop_rate, tau.dtype)
  keep = jax.random.bernoulli(key, 1.0 - p, tau.shape)
  return jnp.where(keep, tau / (1.0 - p), 0)


@functools.partial(jax.jit, static_argnames=("k", "iters"))
def kmeans(
    x: Float[Array, "n d"], k: int, key: jax.Array, iters: int = 20
) -> tuple[Float[Array, "k d"], Int[Array, " n"]]:
  """k-means (k-means++ seeding, then `iters` Lloyd steps), jit-compatible.

  Seeding picks the first centre uniformly and each next one with
  probability ∝ squared distance to the nearest centre so far (uniformly
  among unpicked points once all distances are 0), so with `k = n` distinct
  points every point is its own centre. An empty cluster keeps its centre.

  Returns:
    `(centres [k, d], assignment [n])`; the centres are the means of the
    final assignment (or the kept centre for an empty cluster).

  Raises:
    ValueError: If `k` is not in `[1, n]` or `iters < 0`.
  """
  n = x.shape[0]
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= n:
    raise ValueError(f"k must be an int in [1, n={n}]; got {k!r}.")
  if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
    raise ValueError(f"iters must be an int >= 0; got {iters!r}.")
  x = x.astype(_F32)
  sq = jnp.sum(x * x, axis=1)

  def dist2(c):  # [n, m] squared distances to centres c [m, d].
    d = sq[:, None] - 2.0 * (x @ c.T) + jnp.sum(c * c, axis=1)[None, :]
    return jnp.maximum(d, 0.0)

  keys = jax.random.split(key, k)
  first = jax.random.randint(keys[0], (), 0, n)
  centres = jnp.zeros((k, x.shape[1]), _F32).at[0].set(x[first])
  picked = jnp.zeros((n,), bool).at[first].set(True)
  nearest = dist2(x[first][None])[:, 0]

  def seed(i, state):
    centres, picked, nearest = state
    by_dist = jnp.where(picked | (nearest <= 0), -jnp.inf, jnp.log(nearest))
    uniform = jnp.where(picked, -jnp.inf, 0.0)
    logits = jnp.where(jnp.any(jnp.isfinite(by_dist)), by_dist, uniform)
    j = jax.random.categorical(keys[i], logits)
    centres = centres.at[i].set(x[j])
    nearest = jnp.minimum(nearest, dist2(x[j][None])[:, 0])
    return centres, picked.at[j].set(True), nearest

  centres, _, _ = jax.lax.fori_loop(1, k, seed, (centres, picked, nearest))

  def assign(c):
    return jnp.argmin(dist2(c), axis=1)

  def means(c, labels):
    onehot = jax.nn.one_hot(labels, k, dtype=_F32)  # [n, k]
    count = jnp.sum(onehot, axis=0)
    total = onehot.T @ x
    return jnp.where(
        (count > 0)[:, None], total / jnp.maximum(count, 1.0)[:, None], c
    )

  centres = jax.lax.fori_loop(
      0, iters, lambda _, c: means(c, assign(c)), centres
  )
  labels = assign(centres)
  return means(centres, labels), labels


@functools.partial(
    jax.jit, static_argnames=("k", "iters", "reweight")
)
def lego_units(
    a_units: Float[Array, "d_in n"],
    b_units: Float[Array, "n d_out"],
    k: int,
    key: jax.Array,
    *,
    iters: int = 20,
    reweight: bool = True,
) -> tuple[Float[Array, "d_in k"], Float[Array, "k d_out"]]:
  """LoRA-LEGO on a pool of rank-1 units `a_units[:, j] b_units[j]`.

  k-means on `[a_j; b_j]`, centroid units, and (with `reweight`) each
  centroid's `a` and `b` parts rescaled to the mean norm of its members'
  parts. `k` above the pool size gives zero-padded extra units.

  Returns:
    `(A [d_in, k], B [k, d_out])`; `A B` approximates `Σ_j a_j b_j`, and
    with `k = n` it is exactly that sum (units permuted).
  """
  _check_rank(k)
  n = a_units.shape[1]
  d_in = a_units.shape[0]
  a_units, b_units = a_units.astype(_F32), b_units.astype(_F32)
  x = jnp.concatenate([a_units.T, b_units], axis=1)  # [n, d_in + d_out]
  m = min(k, n)
  centres, labels = kmeans(x, m, key, iters)
  onehot = jax.nn.one_hot(labels, m, dtype=_F32)  # [n, m]
  count = jnp.sum(onehot, axis=0)
  ca, cb = centres[:, :d_in], centres[:, d_in:]
  # Empty clusters contribute nothing.
  ca = jnp.where((count > 0)[:, None], ca, 0.0)
  cb = jnp.where((count > 0)[:, None], cb, 0.0)
  if reweight:
    tiny = jnp.finfo(_F32).tiny

    def rescale(c, member_norms):
      target = (onehot.T @ member_norms) / jnp.maximum(count, 1.0)
      norm = jnp.linalg.norm(c, axis=1)
      return c * jnp.where(norm > tiny, target / jnp.maximum(norm, tiny),
                           0.0)[:, None]

    ca = rescale(ca, jnp.linalg.norm(a_units, axis=0))
    cb = rescale(cb, jnp.linalg.norm(b_units, axis=1))
  return _pad_rank(ca.T, cb, k)


# ---------------------------------------------------------------------------
# Merges of adapter dicts.


def _check_rank(rank: Any) -> None:
  if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
    raise ValueError(f"rank must be a positive Python int; got {rank!r}.")


def _check_fraction(v: Any, what: str, *, allow_zero: bool = False,
                    allow_one: bool = False) -> None:
  ok = (
      isinstance(v, (int, float))
      and not isinstance(v, bool)
      and math.isfinite(v)
      and (0 <= v if allow_zero else 0 < v)
      and (v <= 1 if allow_one else v < 1)
  )
  if not ok:
    lo, hi = "[" if allow_zero else "(", "]" if allow_one else ")"
    raise ValueError(f"{what} must be in {lo}0, 1{hi}; got {v!r}.")


def _check_adapters(adapters: Sequence[Factors]) -> list[str]:
  """Validates a list of adapter dicts; returns the sorted common paths."""
  if isinstance(adapters, Mapping) or not isinstance(adapters, Sequence) or (
      not adapters):
    raise ValueError(
        "adapters must be a non-empty list of {path: (A, B, scale)} dicts; "
        f"got {type(adapters).__name__}."
    )
  paths = sorted(adapters[0])
  if not paths:
    raise ValueError("adapters[0] is empty.")
  for i, ad in enumerate(adapters):
    if sorted(ad) != paths:
      raise ValueError(
          f"All adapters must target the same layers; adapter {i} has "
          f"{sorted(set(ad) ^ set(paths))[:10]} where adapter 0 differs."
      )
  for p in paths:
    shapes = set()
    for i, ad in enumerate(adapters):
      value = ad[p]
      if not isinstance(value, (tuple, list)) or len(value) != 3:
        raise ValueError(f"adapters[{i}][{p!r}] must be (A, B, scale).")
      a, b, _ = value
      if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[0]:
        raise ValueError(
            f"adapters[{i}][{p!r}] must be A [d_in, r], B [r, d_out]; got "
            f"{a.shape} and {b.shape}."
        )
      shapes.add((a.shape[0], b.shape[1]))
    if len(shapes) != 1:
      raise ValueError(f"Layer {p!r} has different shapes: {sorted(shapes)}.")
  return paths


def _weights(weights: Any, n: int) -> jax.Array:
  if weights is None:
    return jnp.ones((n,), _F32)
  w = jnp.asarray(weights, _F32)
  if w.shape != (n,):
    raise ValueError(
        f"weights must have one entry per adapter ({n},); got shape {w.shape}."
    )
  return w


def _taus(adapters, w, path) -> jax.Array:
  """`[N, d_in, d_out]` weighted dense deltas `w_i ΔW_i`."""
  return jnp.stack(
      [w[i] * delta(*ad[path]) for i, ad in enumerate(adapters)]
  )


def merge_linear(
    adapters: Sequence[Factors],
    weights: Any = None,
    *,
    method: str = "cat",
    rank: int | None = None,
) -> dict[str, tuple[jax.Array, jax.Array, float]]:
  """Weighted sum `Σ w_i ΔW_i`, as concatenated factors or truncated SVD.

  Args:
    adapters: Adapter dicts over the same layers (ranks may differ).
    weights: `[N]` weights (default all 1).
    method: `"cat"`: exact, rank `Σ r_i` (`A = [A_1 … A_N]`,
      `B = [w_1 s_1 B_1; …]`). `"svd"`: the best rank-`rank`
      approximation (Eckart–Young), zero-padded if the sum has lower rank.
    rank: Target rank for `"svd"` (must be `None` for `"cat"`).

  Returns:
    `{path: (A, B, 1.0)}`.

  Raises:
    ValueError: On inconsistent adapters or options.
  """
  paths = _check_adapters(adapters)
  w = _weights(weights, len(adapters))
  if method == "cat":
    if rank is not None:
      raise ValueError("method='cat' keeps rank Σ r_i; rank must be None.")
  elif method == "svd":
    _check_rank(rank)
  else:
    raise ValueError(f"method must be 'cat' or 'svd'; got {method!r}.")
  out = {}
  for p in paths:
    a = jnp.concatenate([ad[p][0].astype(_F32) for ad in adapters], axis=1)
    b = jnp.concatenate(
        [ad[p][1].astype(_F32) * (w[i] * jnp.asarray(ad[p][2], _F32))
         for i, ad in enumerate(adapters)],
        axis=0,
    )
    if method == "svd":
      a, b = lowrank_svd_factors(a, b, rank)
    out[p] = (a, b, 1.0)
  return out


def merge_ties(
    adapters: Sequence[Factors],
    weights: Any = None,
    *,
    density: float | int,
    rank: int,
    majority: str = "total",
) -> dict[str, tuple[jax.Array, jax.Array, float]]:
  """TIES-Merging of `τ_i = w_i ΔW_i`, then truncated SVD to `rank`.

  Args:
    adapters: Adapter dicts over the same layers.
    weights: `[N]` weights (default 1; TIES's λ is a common factor here).
    density: Fraction of entries of each `τ_i` kept (top magnitude), in
      `(0, 1]`.
    rank: Rank of the result.
    majority: Sign election, `"total"` (paper) or `"frequency"`.

  Returns:
    `{path: (A [d_in, rank], B [rank, d_out], 1.0)}`.
  """
  paths = _check_adapters(adapters)
  _check_fraction(density, "density", allow_one=True)
  _check_rank(rank)
  w = _weights(weights, len(adapters))
  out = {}
  for p in paths:
    a, b = svd_factors(ties(_taus(adapters, w, p), density, majority), rank)
    out[p] = (a, b, 1.0)
  return out


def merge_dare(
    adapters: Sequence[Factors],
    weights: Any = None,
    *,
    key: jax.Array,
    drop_rate: Any,
    rank: int,
    combine: str = "linear",
    majority: str = "total",
) -> dict[str, tuple[jax.Array, jax.Array, float]]:
  """DARE on each `τ_i = w_i ΔW_i`, combined, then truncated SVD to `rank`.

  Args:
    adapters: Adapter dicts over the same layers.
    weights: `[N]` weights (default 1).
    key: PRNG key; layer `p` (sorted path order) and adapter `i` use
      `fold_in(fold_in(key, p), i)`.
    drop_rate: Drop probability `p` in `[0, 1)`.
    rank: Rank of the result.
    combine: `"linear"` (sum, PEFT `dare_linear`) or `"ties"` (sign
      election and disjoint mean, no trimming; PEFT `dare_ties`).
    majority: Sign election for `"ties"`.

  Returns:
    `{path: (A [d_in, rank], B [rank, d_out], 1.0)}`.
  """
  paths = _check_adapters(adapters)
  _check_rank(rank)
  if combine not in ("linear", "ties"):
    raise ValueError(f"combine must be 'linear' or 'ties'; got {combine!r}.")
  w = _weights(weights, len(adapters))
  out = {}
  for j, p in enumerate(paths):
    taus = _taus(adapters, w, p)
    keys = jax.vmap(lambda i, j=j: jax.random.fold_in(
        jax.random.fold_in(key, j), i))(jnp.arange(taus.shape[0]))
    dropped = jax.vmap(lambda t, k: dare(t, k, drop_rate))(taus, keys)
    merged = (jnp.sum(dropped, axis=0) if combine == "linear"
              else disjoint_mean(dropped, majority))
    a, b = svd_factors(merged, rank)
    out[p] = (a, b, 1.0)
  return out


def units(
    adapters: Sequence[Factors], weights: Any, path: str
) -> tuple[Float[Array, "d_in n"], Float[Array, "n d_out"]]:
  """The pooled rank-1 units of one layer, with `w_i s_i` folded in.

  Unit `j` of adapter `i` is `(√|c| A_i[:, j], sgn(c) √|c| B_i[j])` with
  `c = w_i s_i`, so `Σ_units a bᵀ = Σ_i w_i ΔW_i` (concatenation equals
  summation).
  """
  w = _weights(weights, len(adapters))
  a_all, b_all = [], []
  for i, ad in enumerate(adapters):
    a, b, s = ad[path]
    c = w[i] * jnp.asarray(s, _F32)
    root = jnp.sqrt(jnp.abs(c))
    a_all.append(a.astype(_F32) * root)
    b_all.append(b.astype(_F32) * (jnp.sign(c) * root))
  return jnp.concatenate(a_all, axis=1), jnp.concatenate(b_all, axis=0)


def merge_lego(
    adapters: Sequence[Factors],
    weights: Any = None,
    *,
    rank: int,
    key: jax.Array,
    iters: int = 20,
    reweight: bool = True,
    output_scale: Any = 1.0,
) -> dict[str, tuple[jax.Array, jax.Array, Any]]:
  """LoRA-LEGO: cluster all rank-1 units into `rank` centroids per layer.

  Args:
    adapters: Adapter dicts over the same layers (ranks may differ).
    weights: `[N]` weights folded into the units (default 1: the pool's sum
      is `Σ ΔW_i`).
    rank: `k`, the number of clusters and the merged rank (extra units are
      zero when a layer has fewer than `k` units).
    key: PRNG key for the k-means++ seeding (layer `p` in sorted path order
      uses `fold_in(key, p)`).
    iters: Lloyd iterations (fixed, so it jits).
    reweight: Parameter reweighting: rescale each centroid's `a` / `b` part
      to its members' mean norm.
    output_scale: Factor on the merged update (the paper's output
      reweighting is left to the caller; 1 = none).

  Returns:
    `{path: (A [d_in, rank], B [rank, d_out], output_scale)}`.
  """
  paths = _check_adapters(adapters)
  _check_rank(rank)
  out = {}
  for j, p in enumerate(paths):
    a_units, b_units = units(adapters, weights, p)
    a, b = lego_units(a_units, b_units, rank, jax.random.fold_in(key, j),
                      iters=iters, reweight=reweight)
    out[p] = (a, b, output_scale)
  return out
