r"""SVD compression of trained weights: LoRD, WeLore and EoRA.

Kernel convention as everywhere in `lowrank`: `y = x @ W`, `W: [d_in, d_out]`.

**LoRD** (one-shot low-rank decomposition). With `W = U Σ Vᵀ`,
`factorize(W, rank=r)` returns the thin factors `D = U_r √Σ_r: [d_in, r]`
and `E = √Σ_r V_rᵀ: [r, d_out]`, so `x W ≈ (x D) E`. By Eckart–Young,
`D E` is the best rank-`r` approximation in Frobenius and spectral norm:
`‖W − D E‖_F² = Σ_{i>r} σ_i²` and `‖W − D E‖₂ = σ_{r+1}`. With
`energy=e` the rank is the smallest `r` with `Σ_{i≤r} σ_i² ≥ e Σ σ_i²`.
`compress(model, targets=..., rank=... | energy=... | ranks={...})`
replaces the chosen `nnx.Linear` layers in place by `LowRankLinear` (two
thin `nnx.Linear`s, `down: [d_in, r]` without bias and `up: [r, d_out]`
with the original bias) and returns a report; `to_dense` (alias
`decompress`) turns them back into `nnx.Linear`. `factorize(model,
targets=..., rank=...)` is the model-level form that returns the model.

**WeLore** (Jaiswal et al. 2024). Data-agnostic, one-shot, non-uniform
ranks from the singular-value spectrum. As in the paper's code
(`adaptive_rank_pruning`), each matrix's singular values are min–max
normalised to `[0, 1]`, `σ̂ = (σ − σ_min) / (σ_max − σ_min)`, and one
global threshold `τ` prunes every singular value with `σ̂ < τ`. A
heavy-tailed spectrum (a few large values, a mass of small ones) has most
`σ̂` near 0 and loses many ranks; a flat spectrum loses few. A matrix whose
pruned fraction exceeds `min_ratio` is a low-rank component (**LRC**) and
is factorised at its reduced rank; the others (**N-LRC**) stay dense. The
paper hand-tunes `τ` per model for a target "effective rank reduction";
here `τ` is the smallest threshold at which the LRCs' reduction reaches
`ratio` (found exactly by bisection over the sorted normalised values):
`measure="rank"` (the paper's: pruned ranks of the LRCs over all ranks) or
`measure="params"` (`1 − params after / params before` over the targeted
matrices; an LRC must then also save parameters, `k(d_in + d_out) <
d_in d_out`). WeLore-PEFT then fine-tunes the LRC factors with the
N-LRCs frozen: the factor kernels are `LowRankFactor` variables (a
subclass of `nnx.Param`), so `nnx.Optimizer(model, tx,
wrt=welore_trainable())` trains exactly them, and
`welore_trainable(norms_and_biases=True)` also the norm scales and biases,
as the official fine-tuning script does.

Differences from the official WeLore code (VITA-Group/WeLore@3f3dac6d3535,
`welore_rank_reduction.py`, `welore_continual_finetune.py`, `utils.py`,
`lib/rank_reduction.py`, `lib/LowRankLayer.py`):

* Trainable set: the official fine-tuning script trains every parameter
  except the embeddings, `lm_head` and the N-LRC weights, so RMSNorm
  weights train too; `welore_trainable()` trains the LRC factors alone
  (the LRCs the paper fine-tunes, nothing else), and
  `welore_trainable(norms_and_biases=True)` gives the official set.
* `τ`: the official scripts take `τ` from a hand-made table per model and
  target (e.g. LLaMA-2-7B, 50% → 0.175); here it is found from `ratio`.
  A given `τ` is not an argument; compute ranks with it and call
  `compress(model, ranks=...)`.
* `min_ratio`: 0.0 as in `welore_rank_reduction.py` (compression); the
  fine-tuning script uses 0.4999 (`welore_compress(..., min_ratio=0.4999)`
  for WeLore-PEFT).
* Factor dtype: the official factors are bfloat16 (the model's dtype
  there); here they keep the layer's `param_dtype` (a model built with
  `param_dtype=jnp.bfloat16` gives bfloat16 factors). LRCs keep the
  layer's bias (the official layer has none; LLaMA has none either).

**EoRA** (Liu et al. 2024). Given the original `W`, a compressed `W_c`
(quantised, pruned or low-rank) and calibration inputs `X: [N, d_in]`,
find rank-`r` factors `A: [d_in, r]`, `B: [r, d_out]` minimising the
output error `‖X (ΔW − A B)‖_F` with `ΔW = W − W_c`, instead of the
plain-SVD `‖ΔW − A B‖_F`. With `XᵀX = Q Λ Qᵀ`, `‖X M‖_F = ‖√Λ Qᵀ M‖_F`,
so the error is projected into the eigenspace, `ΔW' = √Λ Qᵀ ΔW`,
truncated there by SVD, `ΔW' ≈ U_r S_r V_rᵀ`, and projected back:
`A = Q Λ^{-1/2} U_r √S_r`, `B = √S_r V_rᵀ`. This is optimal in the
activation-weighted norm (the eigenvalues prioritise the error components
the inputs excite) and equals plain SVD when `XᵀX ∝ I`. Eigenvalues below
`eps · λ_max` are raised to that floor so that `Λ^{-1/2}` stays finite;
the result is then optimal for the floored covariance. (EoRA's code
instead replaces only negative eigenvalues, by the smallest positive one,
in float64.) `eora(model, originals=...,
covariances=..., rank=r)` installs the compensation: as plain LoRA
adapters (`lowrank.adapters.inject(method="lora")`, factors set with the
`α/r` scale divided out) on `nnx.Linear`/`LinearGeneral`/`Einsum` and
quantised layers, or by widening a `LowRankLinear`'s factors to rank
`k + r` (`[D | A]`, `[E; B]`), which is exact and keeps one module.
Covariances come from `lowrank.adapters.svd_init.collect_input_covariance`
on the uncompressed model, or, with `eora(..., batches=...)`, are
collected layer group by layer group on the model being compensated, as
the official code does (see `eora` for the differences that remain);
`dense_kernels(model, targets)` snapshots the original weights.

Stacked (`nnx.scan`) layers are not compressed: convert them to a list
first (`lowrank.models.llama.convert_layout(model, False)`).

References:
  Kaushal et al. 2023, LoRD: Low Rank Decomposition of Monolingual Code
    LLMs for One-Shot Compression, https://arxiv.org/abs/2309.14021
  Jaiswal et al. 2024, From GaLore to WeLore: How Low-Rank Weights
    Non-uniformly Emerge from Low-Rank Gradients,
    https://arxiv.org/abs/2407.11239 (code: github.com/VITA-Group/WeLore)
  Liu et al. 2024, EoRA: Training-free Compensation for Compressed LLM with
    Eigenspace Low-Rank Approximation, https://arxiv.org/abs/2410.21271
  Eckart & Young 1936, The approximation of one matrix by another of lower
    rank, Psychometrika 1(3).
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import math
import re
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lowrank import presets
from lowrank import surgery
from lowrank.adapters import injection
from lowrank.adapters import layers
from lowrank.adapters import svd_init
from lowrank.spectral import sst

P = jax.sharding.PartitionSpec
ArrayLike = jax.typing.ArrayLike
RANK_AXIS = "lowrank"
MEASURES = ("rank", "params")
COMPENSATIONS = ("eigen", "svd")
_INPUT_KINDS = ("auto", "activations", "covariance")


# ---------------------------------------------------------------- pure math
def _one_device(x: jax.Array) -> jax.Array:
  """`x` on a single device (one of its own).

  The factorisations here are one-shot and small next to training; running
  them replicated on every device of a mesh is much slower (26 s instead
  of milliseconds for a 384² SVD on 8 host devices), so they run on one.
  """
  sh = getattr(x, "sharding", None)
  if sh is None or len(sh.device_set) <= 1:
    return x
  device = min(sh.device_set, key=lambda d: d.id)
  return jax.device_put(x, jax.sharding.SingleDeviceSharding(device))


def _as_matrix(w: Any, name: str = "w") -> jax.Array:
  w = _one_device(jnp.asarray(w))
  if w.ndim != 2:
    raise ValueError(f"{name} must be a 2-D [d_in, d_out] matrix; got shape "
                     f"{tuple(w.shape)}.")
  if not jnp.issubdtype(w.dtype, jnp.floating):
    raise ValueError(f"{name} must be floating point; got {w.dtype}.")
  return w.astype(jnp.float32)


def _check_rank(rank: Any, limit: int, name: str = "rank") -> int:
  if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)):
    raise ValueError(f"{name} must be an int; got {rank!r}.")
  if not 1 <= rank <= limit:
    raise ValueError(f"{name} must be in [1, {limit}] (min(d_in, d_out)); "
                     f"got {rank}.")
  return int(rank)


def energy_rank(s: ArrayLike, energy: float | int) -> int:
  """Smallest `r` with `Σ_{i≤r} σ_i² ≥ energy · Σ σ_i²`.

  Args:
    s: Singular values, in descending order.
    energy: Fraction of the spectral energy to keep, in `(0, 1]`.

  Returns:
    The rank, at least 1 (also for an all-zero spectrum).

  Raises:
    ValueError: If `energy` is outside `(0, 1]` or `s` is not a non-empty
      vector.
  """
  if isinstance(energy, bool) or not 0.0 < float(energy) <= 1.0:
    raise ValueError(f"energy must be in (0, 1]; got {energy!r}.")
  s = np.asarray(s, np.float64)
  if s.ndim != 1 or s.size == 0:
    raise ValueError(f"s must be a non-empty vector; got shape {s.shape}.")
  c = np.cumsum(s * s)
  if c[-1] <= 0:
    return 1
  r = int(np.searchsorted(c, float(energy) * c[-1], side="left")) + 1
  return min(max(r, 1), s.size)


def truncation_error(s: ArrayLike, rank: int) -> tuple[float, float]:
  """`(‖W − W_r‖_F, ‖W − W_r‖₂) = (√Σ_{i>r} σ_i², σ_{r+1})` (Eckart–Young).

  Args:
    s: Singular values of `W`, descending.
    rank: Kept rank `r` (`0 ≤ r ≤ len(s)`).

  Returns:
    The Frobenius and spectral norms of the truncation error.

  Raises:
    ValueError: If `rank` is out of range.
  """
  s = np.asarray(s, np.float64)
  if not 0 <= rank <= s.size:
    raise ValueError(f"rank must be in [0, {s.size}]; got {rank}.")
  tail = s[rank:]
  return (float(np.sqrt(np.sum(tail * tail))),
          float(tail[0]) if tail.size else 0.0)


# The linear algebra runs as a few jitted kernels (one compilation per
# shape and rank) rather than eagerly op by op: compressing a model calls
# them once per layer, and eager dispatch compiles every small op per shape.
@jax.jit
def _svd(w: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
  return jnp.linalg.svd(w, full_matrices=False)


@jax.jit(static_argnames=("rank",))
def _split(u: jax.Array, s: jax.Array, vt: jax.Array, rank: int):
  root = jnp.sqrt(s[:rank])
  return u[:, :rank] * root[None, :], root[:, None] * vt[:rank]


@jax.jit
def _svdvals(w: jax.Array) -> jax.Array:
  return jnp.linalg.svd(w, compute_uv=False)


@jax.jit
def _frobenius_error(w: jax.Array, down: jax.Array, up: jax.Array):
  w = w.astype(jnp.float32)
  approx = down.astype(jnp.float32) @ up.astype(jnp.float32)
  return jnp.linalg.norm(w - approx), jnp.linalg.norm(w)


@jax.jit
def _weighted_sq(delta: jax.Array, c: jax.Array) -> jax.Array:
  return jnp.sum(delta * (c @ delta))


def _factors(
    w: Any, rank: int | None, energy: float | int | None
) -> tuple[jax.Array, jax.Array, np.ndarray]:
  """`(D, E, σ)` of the truncated SVD (see `factorize`)."""
  w = _as_matrix(w)
  if (rank is None) == (energy is None):
    raise ValueError(
        f"Give exactly one of rank and energy; got rank={rank!r}, "
        f"energy={energy!r}."
    )
  u, s, vt = _svd(w)
  s_host = np.asarray(s)
  if rank is None:
    rank = energy_rank(s_host, energy)
  rank = _check_rank(rank, min(w.shape))
  down, up = _split(u, s, vt, rank)
  return down, up, s_host


def factorize(
    w: ArrayLike | nnx.Module,
    rank: int | None = None,
    energy: float | int | None = None,
    *,
    targets: str | Sequence[str] | None = None,
) -> tuple[jax.Array, jax.Array] | nnx.Module:
  """LoRD: thin factors of the best rank-`r` approximation of `w`.

  Args:
    w: A `[d_in, d_out]` kernel, or an NNX model (then `targets` is
      required and this is `compress(w, targets=..., rank=..., energy=...)`
      returning the model).
    rank: Kept rank `r` (`1 ≤ r ≤ min(d_in, d_out)`).
    energy: Instead of `rank`: keep the smallest rank whose singular values
      hold this fraction of `Σ σ²`.
    targets: Only with a model: which `nnx.Linear` layers (as `inject`).

  Returns:
    `(down, up)` float32 with `down = U_r √Σ_r: [d_in, r]`,
    `up = √Σ_r V_rᵀ: [r, d_out]`; for a model, the model (changed in place).

  Raises:
    ValueError: If not exactly one of `rank` / `energy` is given, on a rank
      out of range, a non-matrix `w`, or `targets` given with an array.
  """
  if isinstance(w, nnx.Module):
    if targets is None:
      raise ValueError("factorize(model, ...) needs targets=.")
    compress(w, targets=targets, rank=rank, energy=energy)
    return w
  if targets is not None:
    raise ValueError("targets= only applies when factorizing a model.")
  down, up, _ = _factors(w, rank, energy)
  return down, up


def _input_covariance(x_or_cov: Any, d_in: int, kind: str) -> jax.Array:
  """`XᵀX` from activations `[..., d_in]`, or a given `[d_in, d_in]`."""
  if kind not in _INPUT_KINDS:
    raise ValueError(f"kind must be one of {_INPUT_KINDS}; got {kind!r}.")
  x = _one_device(jnp.asarray(x_or_cov, jnp.float32))
  is_cov = kind == "covariance" or (
      kind == "auto" and x.ndim == 2 and x.shape == (d_in, d_in))
  if is_cov:
    if x.shape != (d_in, d_in):
      raise ValueError(f"A covariance must be [d_in, d_in] = [{d_in}, "
                       f"{d_in}]; got {tuple(x.shape)}.")
    if not bool(jnp.all(jnp.isfinite(x))):
      raise ValueError("The covariance has non-finite entries.")
    return (x + x.T) * 0.5
  if x.ndim < 2 or x.shape[-1] != d_in:
    raise ValueError(
        f"Activations must be [..., d_in] with d_in = {d_in} (or pass a "
        f"[d_in, d_in] covariance); got shape {tuple(x.shape)}."
    )
  x = x.reshape(-1, d_in)
  return x.T @ x


def weighted_error(
    delta: ArrayLike, x_or_cov: ArrayLike, *, kind: str = "auto"
) -> float:
  """`‖X Δ‖_F = √tr(Δᵀ XᵀX Δ)`, the output error of a weight error `Δ`.

  Args:
    delta: `[d_in, d_out]` weight error.
    x_or_cov: Activations `[..., d_in]` or the covariance `XᵀX: [d_in,
      d_in]` (a square `[d_in, d_in]` array counts as a covariance under
      `kind="auto"`).
    kind: `"auto"`, `"activations"` or `"covariance"`.

  Returns:
    The norm (scaled like the covariance: with `C = XᵀX / N` it is
    `‖X Δ‖_F / √N`).

  Raises:
    ValueError: On mismatched shapes.
  """
  delta = _as_matrix(delta, "delta")
  c = _input_covariance(x_or_cov, delta.shape[0], kind)
  return math.sqrt(max(float(_weighted_sq(delta, c)), 0.0))


def svd_compensate(
    w: ArrayLike, w_c: ArrayLike, rank: int
) -> tuple[jax.Array, jax.Array]:
  """Plain-SVD compensation: best rank-`r` `A B ≈ W − W_c` in Frobenius norm.

  The baseline EoRA improves on.

  Returns:
    `(A: [d_in, r], B: [r, d_out])` float32, `√S` on both sides.

  Raises:
    ValueError: On shapes or rank out of range.
  """
  w, w_c = _as_matrix(w), _as_matrix(w_c, "w_c")
  if w.shape != w_c.shape:
    raise ValueError(f"w and w_c must have the same shape; got "
                     f"{tuple(w.shape)} and {tuple(w_c.shape)}.")
  down, up, _ = _factors(w - w_c, rank, None)
  return down, up


def eigen_compensate(
    w: ArrayLike,
    w_c: ArrayLike,
    x_or_cov: ArrayLike,
    rank: int,
    *,
    kind: str = "auto",
    eps: float | int = 1e-6,
) -> tuple[jax.Array, jax.Array]:
  """EoRA: rank-`r` `A B` minimising `‖X (W − W_c − A B)‖_F`.

  Args:
    w: Original `[d_in, d_out]` weight.
    w_c: Compressed weight, same shape.
    x_or_cov: Calibration inputs `[..., d_in]` or their covariance
      `XᵀX` (any positive multiple, e.g. `XᵀX / N`) `[d_in, d_in]`.
    rank: Compensation rank `r`.
    kind: How to read `x_or_cov`: `"auto"` (a square `[d_in, d_in]` array
      is a covariance, anything else activations), `"activations"` or
      `"covariance"`.
    eps: Eigenvalues below `eps · λ_max` are raised to it (keeps
      `Λ^{-1/2}` finite for rank-deficient `X`).

  Returns:
    `(A: [d_in, r], B: [r, d_out])` float32 with
    `A = Q Λ^{-1/2} U_r √S_r`, `B = √S_r V_rᵀ` (see the module docstring).

  Raises:
    ValueError: On mismatched shapes, a rank out of range, `eps` outside
      `(0, 1)`, or an all-zero covariance.
  """
  w, w_c = _as_matrix(w), _as_matrix(w_c, "w_c")
  if w.shape != w_c.shape:
    raise ValueError(f"w and w_c must have the same shape; got "
                     f"{tuple(w.shape)} and {tuple(w_c.shape)}.")
  if not 0.0 < float(eps) < 1.0:
    raise ValueError(f"eps must be in (0, 1); got {eps!r}.")
  rank = _check_rank(rank, min(w.shape))
  c = _input_covariance(x_or_cov, w.shape[0], kind)
  a, b, top = _eigen_compensate(w, w_c, c, rank, float(eps))
  if not float(top) > 0:
    raise ValueError("The input covariance is zero (were the calibration "
                     "inputs all zero?).")
  return a, b


@jax.jit(static_argnames=("rank",))
def _eigen_compensate(w, w_c, c, rank: int, eps):
  # Eigendecomposition of the PSD covariance by SVD (C = Q Λ Qᵀ): the same
  # result, and XLA:CPU's SVD is ~40x faster than its eigh at d = 384.
  q, lam, _ = jnp.linalg.svd(c, full_matrices=False)
  top = jnp.max(lam)
  lam = jnp.maximum(lam, eps * top)
  root = jnp.sqrt(lam)
  delta_proj = root[:, None] * (q.T @ (w - w_c))
  u, s, vt = jnp.linalg.svd(delta_proj, full_matrices=False)
  rs = jnp.sqrt(s[:rank])
  a = q @ ((u[:, :rank] / root[:, None]) * rs[None, :])
  return a, rs[:, None] * vt[:rank], top


# -------------------------------------------------------------- WeLore math
def _normalised_spectrum(s: Any) -> np.ndarray:
  s = np.asarray(s, np.float64).ravel()
  if s.size == 0:
    raise ValueError("Empty singular-value spectrum.")
  lo, hi = float(s.min()), float(s.max())
  if hi <= lo:  # Flat spectrum: no low-rank structure at all.
    return np.ones_like(s)
  return np.sort((s - lo) / (hi - lo))


def welore_allocate(
    spectra: Mapping[str, ArrayLike],
    shapes: Mapping[str, tuple[int, int]],
    ratio: float | int,
    *,
    min_ratio: float | int = 0.0,
    measure: str = "rank",
    biases: Mapping[str, int] | None = None,
) -> tuple[dict[str, int | None], float]:
  """WeLore's per-matrix ranks from one global normalised-spectrum threshold.

  Args:
    spectra: `{name: singular values}` of each matrix.
    shapes: `{name: (d_in, d_out)}`, same keys.
    ratio: Target global reduction in `[0, 1)` (see `measure`).
    min_ratio: A matrix is an LRC iff its pruned rank fraction exceeds this
      (the paper code's `--min_ratio`).
    measure: `"rank"`: reduction = pruned ranks of the LRCs / all ranks
      (the paper's "effective rank reduction"). `"params"`: reduction =
      `1 − params after / params before` over these matrices, an LRC
      storing `k (d_in + d_out)`; an LRC must then also save parameters.
    biases: `{name: bias size}`: parameters that stay as they are, counted
      before and after under `measure="params"` (default none).

  Returns:
    `({name: kept rank k (LRC) or None (N-LRC, stays dense)}, τ)`, where
    `τ` is the smallest threshold on min–max normalised singular values
    (pruning `σ̂ < τ`) whose reduction reaches `ratio`.

  Raises:
    ValueError: On mismatched keys or shapes, bad `ratio`/`min_ratio`/
      `measure`, or a `ratio` no threshold reaches (the maximum is given).
  """
  if measure not in MEASURES:
    raise ValueError(f"measure must be one of {MEASURES}; got {measure!r}.")
  if isinstance(ratio, bool) or not 0.0 <= float(ratio) < 1.0:
    raise ValueError(f"ratio must be in [0, 1); got {ratio!r}.")
  if isinstance(min_ratio, bool) or not 0.0 <= float(min_ratio) < 1.0:
    raise ValueError(f"min_ratio must be in [0, 1); got {min_ratio!r}.")
  if set(spectra) != set(shapes) or not spectra:
    raise ValueError(
        f"spectra and shapes need the same non-empty keys; got "
        f"{sorted(spectra)} and {sorted(shapes)}."
    )
  if biases is not None and not set(biases) <= set(spectra):
    raise ValueError(f"biases has unknown keys "
                     f"{sorted(set(biases) - set(spectra))}.")
  names = sorted(spectra)
  normed = [_normalised_spectrum(spectra[n]) for n in names]
  dims = []
  for n, sn in zip(names, normed):
    d_in, d_out = (int(v) for v in shapes[n])
    if sn.size != min(d_in, d_out):
      raise ValueError(
          f"{n}: {sn.size} singular values for a [{d_in}, {d_out}] matrix "
          f"(expected {min(d_in, d_out)})."
      )
    dims.append((d_in, d_out))
  full = np.array([sn.size for sn in normed])
  d_in_a = np.array([d[0] for d in dims], np.float64)
  d_out_a = np.array([d[1] for d in dims], np.float64)
  dense = d_in_a * d_out_a
  fixed = float(sum(int((biases or {}).get(n, 0)) for n in names))

  def state(tau: float):
    pruned = np.array([np.searchsorted(sn, tau, side="left")
                       for sn in normed])
    pruned = np.minimum(pruned, full - 1)  # Keep at least rank 1.
    kept = full - pruned
    lrc = pruned / full > float(min_ratio)
    if measure == "params":
      lrc &= kept * (d_in_a + d_out_a) < dense
      saved = np.where(lrc, dense - kept * (d_in_a + d_out_a), 0.0)
      reduction = float(saved.sum() / (dense.sum() + fixed))
    else:
      reduction = float(np.where(lrc, pruned, 0).sum() / full.sum())
    return kept, lrc, reduction

  values = np.unique(np.concatenate(normed))
  taus = [0.0] + [float(np.nextafter(v, np.inf)) for v in values]
  if state(taus[-1])[2] < float(ratio):
    raise ValueError(
        f"No threshold reaches a {measure} reduction of {ratio}: the most "
        f"WeLore can give these matrices with min_ratio={min_ratio} is "
        f"{state(taus[-1])[2]:.4f}."
    )
  lo, hi = 0, len(taus) - 1  # Invariant: reduction(taus[hi]) >= ratio.
  while lo < hi:
    mid = (lo + hi) // 2
    if state(taus[mid])[2] >= float(ratio):
      hi = mid
    else:
      lo = mid + 1
  kept, lrc, _ = state(taus[hi])
  ranks = {n: (int(k) if is_lrc else None)
           for n, k, is_lrc in zip(names, kept, lrc)}
  return ranks, taus[hi]


# ------------------------------------------------------------- NNX modules
class LowRankFactor(nnx.Param):
  """A kernel of a `LowRankLinear` factor (an `nnx.Param`).

  Its own type so that WeLore-PEFT can train exactly the factorised (LRC)
  layers: `nnx.Optimizer(model, tx, wrt=LowRankFactor)`. Filters on
  `nnx.Param` still include it.
  """


def _const(value: jax.Array):
  """An initializer returning `value` itself (no copy, no new op)."""
  def init(key, shape, dtype):
    del key
    if tuple(shape) != tuple(value.shape) or value.dtype != dtype:
      raise ValueError(f"Internal mismatch {shape} {dtype} vs {value.shape} "
                       f"{value.dtype}.")
    return value

  return init



def _named_spec(value: Any) -> tuple[Any, tuple[Any, ...]] | None:
  sh = getattr(value, "sharding", None)
  if isinstance(sh, jax.sharding.NamedSharding):
    return sh.mesh, tuple(sh.spec) + (None,) * (value.ndim - len(sh.spec))
  return None


def _place(value: jax.Array, mesh_spec, spec: tuple[Any, ...]) -> jax.Array:
  if mesh_spec is None:
    return value
  return jax.device_put(value,
                        jax.sharding.NamedSharding(mesh_spec[0], P(*spec)))


def _linear_settings(lin: nnx.Linear) -> dict[str, Any]:
  return dict(
      dtype=lin.dtype,
      param_dtype=lin.param_dtype,
      precision=lin.precision,
      dot_general=lin.dot_general,
      promote_dtype=lin.promote_dtype,
      preferred_element_type=lin.preferred_element_type,
  )


def _make_linear(
    kernel: jax.Array,
    bias: jax.Array | None,
    settings: Mapping[str, Any],
    kernel_axes: tuple[Any, ...] | None,
    bias_axes: tuple[Any, ...] | None,
    kernel_type: type = nnx.Param,
) -> nnx.Linear:
  """An `nnx.Linear` holding the given values (placement left as given)."""
  d_in, d_out = kernel.shape
  kmeta = {} if kernel_axes is None else {"out_sharding": kernel_axes}
  bmeta = {} if bias_axes is None else {"out_sharding": bias_axes}
  dtype = settings["param_dtype"]
  kernel = kernel.astype(dtype)
  bias = None if bias is None else bias.astype(dtype)
  with nnx.use_eager_sharding(False):
    lin = nnx.Linear(
        d_in, d_out, use_bias=bias is not None,
        kernel_init=_const(kernel),
        bias_init=_const(kernel if bias is None else bias),
        kernel_metadata=kmeta, bias_metadata=bmeta, rngs=nnx.Rngs(0),
        **settings)
    if kernel_type is not nnx.Param:
      lin.kernel = kernel_type(lin.kernel.get_value(), **kmeta)
  return lin


class LowRankLinear(nnx.Module):
  """`y = up(down(x))`: a dense layer stored as two thin `nnx.Linear`s.

  `down: [d_in, r]` (no bias) and `up: [r, d_out]` (the original bias, if
  any), with `LowRankFactor` kernels. Logical sharding axes follow the
  original kernel's, `(in_axis, "lowrank")` and `("lowrank", out_axis)`,
  and values are placed with its mesh sharding. Adapters can be injected
  into `down` / `up` like into any `nnx.Linear` (e.g. QLoRA on LoRD).

  Attributes:
    down: `nnx.Linear(d_in, r, use_bias=False)`.
    up: `nnx.Linear(r, d_out)`.
  """

  def __init__(self, down: nnx.Linear, up: nnx.Linear):
    """Wraps two existing `nnx.Linear`s (their kernels become factors).

    Raises:
      ValueError: If they are not `nnx.Linear`s that chain, or `down` has a
        bias.
    """
    if not isinstance(down, nnx.Linear) or not isinstance(up, nnx.Linear):
      raise ValueError(
          f"down and up must be nnx.Linear; got {type(down).__name__} and "
          f"{type(up).__name__}."
      )
    if down.out_features != up.in_features:
      raise ValueError(
          f"down.out_features ({down.out_features}) != up.in_features "
          f"({up.in_features})."
      )
    if down.use_bias:
      raise ValueError("down must have no bias (the bias belongs to up).")
    for lin in (down, up):
      if not isinstance(lin.kernel, LowRankFactor):
        axes = sst.logical_axes(lin.kernel)
        meta = {} if axes is None else {"out_sharding": axes}
        with nnx.use_eager_sharding(False):
          lin.kernel = LowRankFactor(lin.kernel.get_value(), **meta)
    self.down = down
    self.up = up

  @classmethod
  def create(
      cls,
      in_features: int,
      out_features: int,
      rank: int,
      *,
      use_bias: bool = True,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      precision: Any = None,
      kernel_axes: tuple[str | None, str | None] | None = None,
      kernel_init: Any = nnx.initializers.lecun_normal(),
      bias_init: Any = nnx.initializers.zeros_init(),
      rngs: nnx.Rngs,
  ) -> "LowRankLinear":
    """A freshly initialised low-rank layer (each factor `kernel_init`).

    With `kernel_axes=(in_axis, out_axis)` the factors are annotated
    `(in_axis, "lowrank")` / `("lowrank", out_axis)` (and sharded eagerly
    when built inside a mesh, as Flax does).

    Raises:
      ValueError: On a rank out of range.
    """
    rank = _check_rank(rank, min(in_features, out_features))
    common = dict(dtype=dtype, param_dtype=param_dtype, precision=precision,
                  rngs=rngs)
    if kernel_axes is None:
      d_init = u_init = kernel_init
      b_init = bias_init
    else:
      d_init = nnx.with_partitioning(kernel_init, (kernel_axes[0], RANK_AXIS))
      u_init = nnx.with_partitioning(kernel_init, (RANK_AXIS, kernel_axes[1]))
      b_init = nnx.with_partitioning(bias_init, (kernel_axes[1],))
    down = nnx.Linear(in_features, rank, use_bias=False, kernel_init=d_init,
                      **common)
    up = nnx.Linear(rank, out_features, use_bias=use_bias, kernel_init=u_init,
                    bias_init=b_init, **common)
    return cls(down, up)

  @classmethod
  def from_linear(
      cls, linear: nnx.Linear, down: ArrayLike, up: ArrayLike
  ) -> "LowRankLinear":
    """Factors `down: [d_in, r]`, `up: [r, d_out]` replacing `linear`.

    Keeps `linear`'s bias, dtypes, precision and dot_general; sharding
    annotations and placement follow its kernel's.

    Raises:
      ValueError: If the factor shapes do not fit `linear`.
    """
    down, up = jnp.asarray(down), jnp.asarray(up)
    d_in, d_out = linear.in_features, linear.out_features
    if (down.ndim != 2 or up.ndim != 2 or down.shape[0] != d_in
        or up.shape[1] != d_out or down.shape[1] != up.shape[0]):
      raise ValueError(
          f"Factors must be [{d_in}, r] and [r, {d_out}]; got "
          f"{tuple(down.shape)} and {tuple(up.shape)}."
      )
    kernel = linear.kernel.get_value()
    axes = sst.logical_axes(linear.kernel)
    ms = _named_spec(kernel)
    settings = _linear_settings(linear)
    bias = None if linear.bias is None else linear.bias.get_value()
    d_lin = _make_linear(
        _place(down.astype(settings["param_dtype"]), ms,
               (ms[1][0] if ms else None, None)),
        None, settings, None if axes is None else (axes[0], RANK_AXIS), None,
        LowRankFactor)
    u_lin = _make_linear(
        _place(up.astype(settings["param_dtype"]), ms,
               (None, ms[1][1] if ms else None)),
        bias, settings, None if axes is None else (RANK_AXIS, axes[1]),
        sst.logical_axes(linear.bias), LowRankFactor)
    return cls(d_lin, u_lin)

  @property
  def in_features(self) -> int:
    return self.down.in_features

  @property
  def out_features(self) -> int:
    return self.up.out_features

  @property
  def rank(self) -> int:
    return self.down.out_features

  def dense_kernel(self) -> jax.Array:
    """`down @ up` as a `[d_in, d_out]` float32 matrix."""
    return (self.down.kernel.get_value().astype(jnp.float32)
            @ self.up.kernel.get_value().astype(jnp.float32))

  def num_params(self) -> int:
    """Parameters stored: `r (d_in + d_out)` plus the bias."""
    n = self.rank * (self.in_features + self.out_features)
    return n + (self.out_features if self.up.use_bias else 0)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.up(self.down(x))

  def to_linear(self) -> nnx.Linear:
    """The equivalent dense `nnx.Linear` (kernel `down @ up`, same bias)."""
    return _dense_linear(self, self.dense_kernel())


# ------------------------------------------------------ model-level helpers
# What the model-level helpers do not descend into.
_OPAQUE = (layers.LoRAWrapper, LowRankLinear)


def _select(
    model: nnx.Module,
    targets: Any,
    eligible,
    kind: str,
    exclude: Any = None,
) -> list[tuple[tuple[Any, ...], str, Any]]:
  """`sst.select_modules`, not descending into `LowRankLinear`s."""
  return sst.select_modules(model, targets, exclude, eligible=eligible,
                            kind=kind, opaque=_OPAQUE)


def _is_kernel_layer(m: Any) -> bool:
  """A layer with an effective 2-D kernel (see `dense_kernels`)."""
  return isinstance(m, (LowRankLinear,) + layers.LINEAR_KINDS)


_KERNEL_LAYERS = "linear layers or LowRankLinear"


def _kernel_2d(lin: nnx.Linear, name: str) -> jax.Array:
  w = lin.kernel.get_value()
  if w.ndim != 2:
    raise ValueError(
        f"{name}: kernel has shape {tuple(w.shape)}; only 2-D kernels can "
        "be factorised (stacked nnx.scan layers: convert them to a list "
        "first, e.g. lowrank.models.llama.convert_layout(model, False))."
    )
  return w


def _paths_regex(paths: Sequence[str]) -> str:
  return "|".join(re.escape(p) for p in paths)


def compress(
    model: nnx.Module,
    *,
    targets: str | Sequence[str] | None = None,
    rank: int | None = None,
    energy: float | int | None = None,
    ranks: Mapping[str, int] | None = None,
    exclude: str | Sequence[str] | None = None,
) -> dict[str, Any]:
  """LoRD: replaces the chosen `nnx.Linear` layers by `LowRankLinear`.

  Changes `model` in place. Each layer is replaced by its truncated SVD,
  the best rank-`r` approximation (Eckart–Young).

  Args:
    model: An NNX model.
    targets: Which `nnx.Linear` layers, with `inject`'s semantics (regex on
      the dotted path, list of names, or `"all-linear"`). Default with
      `ranks`: its keys.
    rank: One rank for every target (clipped to `min(d_in, d_out)`).
    energy: Instead: per layer, the smallest rank keeping this fraction of
      `Σ σ²`.
    ranks: Instead: `{path: rank}` per layer (exact paths).
    exclude: Layers to leave alone even if they match `targets` (e.g.
      `["lm_head"]` with `"all-linear"`).

  Returns:
    `{"layers": {path: {"rank", "full_rank", "shape", "params_before",
    "params_after", "rel_error", "spectral_error", "energy"}},
    "params_before", "params_after", "param_reduction"}`: `rel_error` is
    `‖W − D E‖_F / ‖W‖_F` measured on the stored factors,
    `spectral_error = σ_{r+1} = ‖W − W_r‖₂` (so `‖x W − x D E‖ ≤ ‖x‖ ·
    spectral_error` up to rounding), `energy` the kept fraction of `Σ σ²`;
    parameters include biases.

  Raises:
    ValueError: If not exactly one of `rank`/`energy`/`ranks` is given, on
      bad targets (matching nothing, or modules other than `nnx.Linear`),
      `ranks` keys that are not targeted layers, or bad ranks.
  """
  given = [v is not None for v in (rank, energy, ranks)]
  if sum(given) != 1:
    raise ValueError(
        f"Give exactly one of rank, energy, ranks; got rank={rank!r}, "
        f"energy={energy!r}, ranks={ranks!r}."
    )
  if ranks is not None:
    if not ranks:
      raise ValueError("ranks is empty.")
    if targets is None:
      targets = _paths_regex(sorted(ranks))
  if targets is None:
    raise ValueError("compress needs targets= (or ranks=).")
  chosen = _select(model, targets, sst.is_plain_linear, "nnx.Linear",
                   exclude)
  if ranks is not None:
    extra = sorted(set(ranks) - {n for _, n, _ in chosen})
    if extra:
      raise ValueError(
          f"ranks has entries for layers that are not targeted nnx.Linear "
          f"layers: {extra}."
      )
  out, before, after = {}, 0, 0
  for path, name, lin in chosen:
    w = _kernel_2d(lin, name)
    if ranks is not None and name not in ranks:
      continue
    if ranks is not None:
      r, e = ranks[name], None
    elif rank is not None:
      if isinstance(rank, bool) or not isinstance(rank, (int, np.integer)) \
          or rank < 1:
        raise ValueError(f"rank must be a positive int; got {rank!r}.")
      r, e = min(int(rank), min(w.shape)), None
    else:
      r, e = None, energy
    down, up, s = _factors(w, r, e)
    new = LowRankLinear.from_linear(lin, down, up)
    surgery.set_submodule(model, path, new)
    k = new.rank
    err, norm = _frobenius_error(
        _as_matrix(w), _one_device(new.down.kernel.get_value()),
        _one_device(new.up.kernel.get_value()))
    rel = float(err) / max(float(norm), 1e-30)
    s2 = s.astype(np.float64) ** 2
    bias = lin.out_features if lin.use_bias else 0
    entry = {
        "rank": k,
        "full_rank": int(min(w.shape)),
        "shape": tuple(int(d) for d in w.shape),
        "params_before": int(w.size) + bias,
        "params_after": new.num_params(),
        "rel_error": rel,
        "spectral_error": truncation_error(s, k)[1],
        "energy": float(s2[:k].sum() / s2.sum()) if s2.sum() > 0 else 1.0,
    }
    out[name] = entry
    before += entry["params_before"]
    after += entry["params_after"]
  return {
      "layers": out,
      "params_before": before,
      "params_after": after,
      "param_reduction": (before - after) / before if before else 0.0,
  }


def to_dense(
    model: nnx.Module, targets: str | Sequence[str] | None = None
) -> nnx.Module:
  """Replaces `LowRankLinear` layers (all, or those matching `targets`) by
  equivalent dense `nnx.Linear`s with kernel `down @ up`, in place.

  Returns:
    `model`.

  Raises:
    ValueError: If `targets` matches nothing or matches other modules.
  """
  if targets is None:
    chosen = list(surgery.iter_modules(model, kind=LowRankLinear,
                                       opaque=_OPAQUE))
  else:
    chosen = [(p, m) for p, _, m in _select(
        model, targets, lambda m: isinstance(m, LowRankLinear),
        "LowRankLinear")]
  for path, m in chosen:
    surgery.set_submodule(model, path, m.to_linear())
  return model


decompress = to_dense


def low_rank_layers(model: nnx.Module) -> dict[str, LowRankLinear]:
  """`{dotted path: LowRankLinear}` for every factorised layer."""
  return {surgery.path_str(p): m
          for p, m in surgery.iter_modules(model, opaque=_OPAQUE)
          if isinstance(m, LowRankLinear)}


# ------------------------------------------------------------------- WeLore
def welore_ranks(
    model: nnx.Module,
    *,
    targets: str | Sequence[str],
    ratio: float | int,
    min_ratio: float | int = 0.0,
    measure: str = "rank",
    exclude: str | Sequence[str] | None = None,
) -> dict[str, int | None]:
  """WeLore's per-layer ranks for the targeted `nnx.Linear` layers.

  See `welore_allocate` (the singular values are computed here) and
  `compress` for `targets` / `exclude`.

  Returns:
    `{path: kept rank (LRC) or None (N-LRC, stays dense)}`.

  Raises:
    ValueError: As `welore_allocate`, or on bad targets.
  """
  return _welore(model, targets, ratio, min_ratio, measure, exclude)[0]


def _welore(model, targets, ratio, min_ratio, measure, exclude):
  chosen = _select(model, targets, sst.is_plain_linear, "nnx.Linear",
                   exclude)
  spectra, shapes, biases = {}, {}, {}
  for _, name, lin in chosen:
    biases[name] = lin.out_features if lin.use_bias else 0
    w = _as_matrix(_kernel_2d(lin, name))
    spectra[name] = np.asarray(_svdvals(w))
    shapes[name] = tuple(int(d) for d in w.shape)
  ranks, tau = welore_allocate(spectra, shapes, ratio, min_ratio=min_ratio,
                               measure=measure, biases=biases)
  return ranks, tau, shapes


def welore_compress(
    model: nnx.Module,
    *,
    targets: str | Sequence[str],
    ratio: float | int,
    min_ratio: float | int = 0.0,
    measure: str = "rank",
    exclude: str | Sequence[str] | None = None,
) -> dict[str, Any]:
  """WeLore: factorises the LRCs at their ranks, leaves the N-LRCs dense.

  Changes `model` in place. Fine-tune afterwards with
  `nnx.Optimizer(model, tx, wrt=welore_trainable())` (LRC factors only).

  Args:
    model: An NNX model.
    targets: The `nnx.Linear` layers WeLore considers.
    ratio, min_ratio, measure: See `welore_allocate`.
    exclude: Layers to leave out even if they match `targets`.

  Returns:
    `compress`'s report with an entry per targeted layer (N-LRCs with
    `"rank": None`, unchanged parameter count and zero error), each with
    `"lrc"`, plus `"threshold"` (τ), `"rank_reduction"` (pruned LRC ranks
    / all ranks), `"lrc"` and `"n_lrc"` (sorted paths).

  Raises:
    ValueError: As `welore_allocate`, or on bad targets.
  """
  ranks, tau, shapes = _welore(model, targets, ratio, min_ratio, measure,
                               exclude)
  lrc = {p: k for p, k in ranks.items() if k is not None}
  report = (compress(model, ranks=lrc) if lrc else
            {"layers": {}, "params_before": 0, "params_after": 0})
  layers_out = dict(report["layers"])
  before, after, pruned, total = (report["params_before"],
                                  report["params_after"], 0, 0)
  modules = {surgery.path_str(p): m
             for p, m in surgery.iter_modules(model, opaque=_OPAQUE)}
  for p, (d_in, d_out) in shapes.items():
    full = min(d_in, d_out)
    total += full
    if p in lrc:
      layers_out[p]["lrc"] = True
      pruned += full - lrc[p]
      continue
    lin = modules[p]
    n = d_in * d_out + (d_out if lin.use_bias else 0)
    layers_out[p] = {
        "rank": None, "full_rank": full, "shape": (d_in, d_out),
        "params_before": n, "params_after": n, "rel_error": 0.0,
        "spectral_error": 0.0, "energy": 1.0, "lrc": False,
    }
    before += n
    after += n
  return {
      "layers": dict(sorted(layers_out.items())),
      "params_before": before,
      "params_after": after,
      "param_reduction": (before - after) / before if before else 0.0,
      "rank_reduction": pruned / total if total else 0.0,
      "threshold": tau,
      "lrc": sorted(lrc),
      "n_lrc": sorted(p for p in ranks if p not in lrc),
  }


presets.register(
    "welore_compress",
    source="VITA-Group/WeLore@3f3dac6d3535 (welore_rank_reduction.py, "
    "utils.py, lib/rank_reduction.py, lib/LowRankLayer.py)",
    unavailable=(
        "a threshold τ taken from the official per-model table: WeLore "
        "finds τ from ratio; compute ranks with a given τ and call "
        "compress(model, ranks=...)",
        "WeLore-PEFT's min_ratio=0.4999 (welore_continual_finetune.py) is "
        "an argument, not this preset: the compression script's 0.0 is "
        "the default"))


def _norm_or_bias(path: tuple[Any, ...], value: Any) -> bool:
  return (isinstance(value, nnx.Param) and bool(path)
          and str(path[-1]) not in ("kernel", "embedding"))


def welore_trainable(*, norms_and_biases: bool = False) -> Any:
  """The NNX filter of what WeLore-PEFT trains.

  `nnx.Optimizer(model, tx, wrt=welore_trainable())` or
  `nnx.grad(loss, argnums=nnx.DiffState(0, welore_trainable()))` train only
  `down.kernel` / `up.kernel` of every `LowRankLinear`; N-LRCs, biases,
  norms and embeddings stay frozen.

  Args:
    norms_and_biases: Also train every other `nnx.Param` that is not a
      kernel or an embedding table (norm scales, biases), as the official
      fine-tuning script does (it trains all but the embeddings, `lm_head`
      and the N-LRC weights). Off by default: the LRC factors alone.

  Returns:
    `LowRankFactor` (the default), or a filter also accepting those.
  """
  if norms_and_biases:
    return nnx.Any(LowRankFactor, _norm_or_bias)
  return LowRankFactor


presets.register(
    "welore_trainable",
    source="VITA-Group/WeLore@3f3dac6d3535 (welore_continual_finetune.py)",
    kwargs={"norms_and_biases": True},
    reasons={"norms_and_biases": "the official script trains all but the "
             "embeddings, lm_head and the N-LRC weights (RMSNorm weights "
             "train); lowrank's default trains the LRC factors alone"})


# --------------------------------------------------------------------- EoRA
def dense_kernels(
    model: nnx.Module, targets: str | Sequence[str]
) -> dict[str, jax.Array]:
  """Effective `[d_in, d_out]` float32 kernels of the targeted layers.

  Linear kinds (`nnx.Linear`, `LinearGeneral`, `Einsum`, also quantised:
  dequantised) as `LoRAWrapper.kernel_2d` views them, and `LowRankLinear`
  as `down @ up`. Snapshot them before compressing, for `eora`.

  Raises:
    ValueError: On bad targets.
  """
  out = {}
  for _, name, m in _select(model, targets, _is_kernel_layer,
                            _KERNEL_LAYERS):
    out[name] = _effective_kernel(m)
  return out


def _effective_kernel(m: Any) -> jax.Array:
  if isinstance(m, LowRankLinear):
    return m.dense_kernel()
  in_dims, out_dims = layers.kernel_dims(m)
  return layers.kernel_to_2d(
      m.kernel.get_value(), in_dims, out_dims).astype(jnp.float32)


def eora(
    model: nnx.Module,
    *,
    originals: Mapping[str, ArrayLike],
    covariances: Mapping[str, ArrayLike] | None = None,
    rank: int,
    alpha: float | int | None = None,
    method: str = "eigen",
    eps: float | int = 1e-6,
    batches: Iterable[Any] | None = None,
    forward_fn: Callable[[nnx.Module, Any], Any] | None = None,
    groups: Sequence[Sequence[str]] | None = None,
) -> dict[str, dict[str, Any]]:
  """Installs rank-`r` EoRA compensation paths in a compressed model.

  For each path in `originals`, with `W = originals[path]` and `W_c` the
  layer's current (compressed) effective kernel, computes `(A, B)` with
  `eigen_compensate` (or `svd_compensate` for `method="svd"`, the
  baseline) and installs them:

  * linear kinds (also quantised ones): a plain LoRA adapter
    (`inject(method="lora", rank=r, alpha=alpha)`) with `lora_a = A`,
    `lora_b = B / s` (`s = α / r`), so the adapter adds exactly `x A B`
    and can be fine-tuned further;
  * `LowRankLinear` (rank `k`): its factors become `[D | A]` and
    `[E; B]` (rank `k + r`), the same function with no extra module.

  Calibration, one of:

  * `covariances`: each layer's `XᵀX / N`, collected beforehand (e.g. with
    `lowrank.adapters.svd_init.collect_input_covariance` on the
    uncompressed model); every layer is compensated from them at once.
  * `batches` (sequential, as the official code): the layers are
    compensated group by group (`groups`), and each group's covariances
    are collected on the model as it stands then, with the groups before
    it already compensated, so later layers are calibrated on the inputs
    the compensated model gives them. Costs one pass over `batches` per
    group.

  Differences from the official code (NVlabs/EoRA@11ff6c0e1c90,
  `EoRA/eora.py`, `llama_sequential_eigen`):

  * Calibration: the official code is sequential over decoder layers, and
    inside a decoder layer every sublayer runs with its original weights
    while its input is recorded. `covariances` (the default way) skips the
    sequence; `batches` gives it, with one group per layer by default (in
    the order of the paths, numbers compared as numbers; a layer's inputs
    then pass through the compensated layers of the groups before it).
    `groups=[[paths of decoder layer 0], [paths of layer 1], ...]` gives
    the official grouping; inside a group the sublayers run compressed,
    not original. The original weights inside a group are not available.
  * Eigenvalue repair: the official code decomposes the covariance in
    float64 and replaces only negative eigenvalues by the smallest positive
    one; here the decomposition is float32 and every eigenvalue below
    `eps · λ_max` is raised to that floor, which also keeps zero
    eigenvalues finite (official: `1/√0`). Not available otherwise.
  * The factors stay float32 (official: cast to the compressed weight's
    dtype).

  Args:
    model: The compressed model (changed in place).
    originals: `{path: W}`, the uncompressed `[d_in, d_out]` kernels (see
      `dense_kernels`).
    covariances: `{path: XᵀX / N}` of each layer's inputs, same keys as
      `originals`. Give this or `batches`.
    rank: Compensation rank `r`.
    alpha: LoRA `α` of the installed adapters (default `r`, scale 1).
    method: `"eigen"` (EoRA) or `"svd"` (plain SVD of `ΔW`).
    eps: Eigenvalue floor, see `eigen_compensate`.
    batches: Calibration batches for sequential calibration (each passed
      to `forward_fn`; read once per group).
    forward_fn: `forward_fn(model, batch)` runs the model (default
      `model(batch)`), eagerly or under `nnx.jit`; see
      `collect_input_covariance`.
    groups: With `batches`: the paths of `originals` in groups, in the
      order they are compensated, each path in one group (default: one
      group per path, in path order).

  Returns:
    `{path: {"rank", "error_before", "error_after", "params"}}` with the
    activation-weighted errors `√tr(Δᵀ C Δ)` of `ΔW` and `ΔW − A B`, and
    the number of parameters added.

  Raises:
    ValueError: On mismatched keys or shapes, an unknown method, bad
      ranks, paths that are not linear layers / `LowRankLinear`, not
      exactly one of `covariances` / `batches`, or `groups` that are not a
      partition of the paths (or given without `batches`).
  """
  if method not in COMPENSATIONS:
    raise ValueError(f"method must be one of {COMPENSATIONS}; got "
                     f"{method!r}.")
  if (covariances is None) == (batches is None):
    raise ValueError(
        "eora needs exactly one of covariances= (collected beforehand) and "
        "batches= (sequential calibration); got "
        f"{'both' if batches is not None else 'neither'}.")
  if covariances is not None:
    if groups is not None:
      raise ValueError("groups= only applies with batches= (sequential "
                       "calibration); covariances= compensates all at once.")
    if set(originals) != set(covariances) or not originals:
      raise ValueError(
          f"originals and covariances need the same non-empty keys; got "
          f"{sorted(originals)} and {sorted(covariances)}."
      )
    return _eora_group(model, sorted(originals), originals, covariances,
                       rank, alpha, method, eps)
  if not originals:
    raise ValueError("originals is empty.")
  if groups is None:
    groups = [[p] for p in sorted(originals, key=_natural_key)]
  groups = _eora_groups(groups, originals)
  batches = list(batches)
  # Probe the layers' inputs as inject would: a LowRankLinear through its
  # `down` layer, which sees the same input.
  kinds = {n: m for _, n, m in _select(model, _paths_regex(sorted(originals)),
                                       _is_kernel_layer, _KERNEL_LAYERS)}
  report = {}
  for group in groups:
    probe = {(f"{p}.down" if isinstance(kinds.get(p), LowRankLinear) else p):
             p for p in group}
    covs = svd_init.collect_input_covariance(
        model, _paths_regex(sorted(probe)), batches, forward_fn)
    covs = {probe[k]: v for k, v in covs.items()}
    report.update(_eora_group(model, sorted(group), originals, covs, rank,
                              alpha, method, eps))
  return dict(sorted(report.items()))


def _natural_key(path: str) -> list[Any]:
  return [(0, int(t), "") if t.isdigit() else (1, 0, t)
          for t in re.split(r"(\d+)", path)]


def _eora_groups(groups: Any, originals: Mapping[str, Any]) -> list[list[str]]:
  if isinstance(groups, str) or not all(
      isinstance(g, Sequence) and not isinstance(g, str) for g in groups):
    raise ValueError(
        f"groups must be a list of lists of paths, e.g. [['a.q', 'a.v'], "
        f"['b.q']]; got {groups!r}.")
  flat = [p for g in groups for p in g]
  missing = sorted(set(originals) - set(flat))
  unknown = sorted(set(flat) - set(originals))
  repeated = sorted({p for p in flat if flat.count(p) > 1})
  if missing or unknown or repeated or any(not g for g in groups):
    raise ValueError(
        f"groups must put every path of originals in exactly one non-empty "
        f"group; missing: {missing}, not in originals: {unknown}, in "
        f"several groups: {repeated}.")
  return [list(g) for g in groups]


def _eora_group(model, paths, originals, covariances, rank, alpha, method,
                eps):
  """Compensates the layers `paths` from `covariances` (see `eora`)."""
  chosen = _select(model, _paths_regex(paths), _is_kernel_layer,
                   _KERNEL_LAYERS)
  found = {n for _, n, _ in chosen}
  if found != set(paths):
    raise ValueError(f"No such layers: {sorted(set(paths) - found)}.")
  factors, report = {}, {}
  for path_t, name, m in chosen:
    w_c = _as_matrix(_effective_kernel(m), "compressed kernel")
    w = _as_matrix(originals[name], f"originals[{name!r}]")
    if w.shape != w_c.shape:
      raise ValueError(
          f"{name}: original kernel {tuple(w.shape)} vs compressed "
          f"{tuple(w_c.shape)}."
      )
    cov = covariances[name]
    if method == "eigen":
      a, b = eigen_compensate(w, w_c, cov, rank, kind="covariance", eps=eps)
    else:
      a, b = svd_compensate(w, w_c, rank)
    delta = w - w_c
    report[name] = {
        "rank": int(rank),
        "error_before": weighted_error(delta, cov, kind="covariance"),
        "error_after": weighted_error(delta - a @ b, cov, kind="covariance"),
        "params": int(a.size + b.size),
    }
    factors[name] = (path_t, m, a, b)
  dense = [n for n, (_, m, _, _) in factors.items()
           if not isinstance(m, LowRankLinear)]
  if dense:
    injection.inject(model, targets=_paths_regex(dense), method="lora",
                     rank=rank, alpha=alpha)
    wrappers = injection.adapter_modules(model)
  for name, (path_t, m, a, b) in factors.items():
    if isinstance(m, LowRankLinear):
      new = LowRankLinear.from_linear(
          _ghost_linear(m),
          jnp.concatenate([_as_matrix(m.down.kernel.get_value()), a],
                          axis=1),
          jnp.concatenate([_as_matrix(m.up.kernel.get_value()), b], axis=0))
      surgery.set_submodule(model, path_t, new)
    else:
      wrapper = wrappers[name]
      wrapper.set_peft_factors(a, b / wrapper.scale)
  return report


presets.register(
    "eora",
    source="NVlabs/EoRA@11ff6c0e1c90 (EoRA/eora.py)",
    unavailable=(
        "sequential calibration cannot be a preset value: pass batches= "
        "(and groups= with one group per decoder layer for the official "
        "grouping) instead of covariances=; inside a group the sublayers "
        "run compressed, not with their original weights",
        "the float64 eigendecomposition that repairs only negative "
        "eigenvalues (float32 with an eps·λ_max floor here)"))


def _dense_linear(m: LowRankLinear, w: jax.Array) -> nnx.Linear:
  """An `nnx.Linear` with kernel `w: [d_in, d_out]` and `m`'s settings,
  logical axes, placement and bias."""
  d_axes = sst.logical_axes(m.down.kernel)
  u_axes = sst.logical_axes(m.up.kernel)
  axes = None if d_axes is None or u_axes is None else (d_axes[0], u_axes[1])
  ms_d = _named_spec(m.down.kernel.get_value())
  ms_u = _named_spec(m.up.kernel.get_value())
  if ms_d is not None and ms_u is not None:
    w = _place(w, ms_d, (ms_d[1][0], ms_u[1][1]))
  bias = None if m.up.bias is None else m.up.bias.get_value()
  return _make_linear(w, bias, _linear_settings(m.up), axes,
                      sst.logical_axes(m.up.bias))


def _ghost_linear(m: LowRankLinear) -> nnx.Linear:
  """A dense stand-in carrying `m`'s settings, axes, placement and bias.

  Only its metadata is read by `LowRankLinear.from_linear`; the kernel
  value is a zero array of the right shape and sharding.
  """
  w = jnp.zeros((m.in_features, m.out_features), m.up.param_dtype)
  return _dense_linear(m, w)


def count_params(model: nnx.Module) -> int:
  """Number of `nnx.Param` elements (factors included) in `model`."""
  state = nnx.state(model, nnx.Param)
  return int(sum(math.prod(np.shape(x))
                 for x in jax.tree.leaves(nnx.to_pure_dict(state))))
