"""Low-rank projectors for gradient projection (pure jnp, no optax).

A gradient `G: [..., m, n]` (leading dims are stacked layers, each with its
own projector) is projected on one side:

* `"left"`:  `P: [..., m, r]`, `R = Pᵀ G: [..., r, n]`, back: `P N`.
* `"right"`: `P: [..., n, r]`, `R = G P: [..., m, r]`, back: `N Pᵀ`.

`resolve_side` turns the user-facing side names into one of these, once,
from shapes; the result is stored and never re-inferred (galore-torch
re-infers it from the projected tensor's shape, which picks the wrong side
for square projections).

Projectors:
* `"svd"`: exact top-r singular vectors (fp32). Under FSDP this gathers the
  full gradient for the decomposition.
* `"rsvd"`: randomized range finder with subspace iteration (Halko et al.
  2011): sketch `Y = G Ω`, orthonormalise the thin sketch, refine with
  `n_iter` power steps, then an SVD of the small `(r+p) × n` matrix. Only
  thin `[m, r+p]` / `[r+p, n]` matrices are ever gathered; `G` is only used
  in (shardable) matmuls. Cost per matrix with `w = r + p` (defaults
  `p = 8`, `n_iter = 2`): `2·n_iter + 2` products with `G` (`2mnw` FLOPs
  each), `2·n_iter + 1` QRs of `[m, w]` / `[n, w]` matrices and one SVD of
  the `[w, n]` matrix `QᵀG`; on this repo's 2-core CPU a `[1376, 512]`
  gradient at `r = 128` takes about 21 ms against 44 ms for the exact SVD,
  with the QRs the largest part.
* `"random"`: a random orthonormal basis (QR of a Gaussian), independent of
  `G`; used by FRUGAL-style methods.
"""

import jax
import jax.numpy as jnp

SIDES = ("auto", "left", "right", "torch")
PROJECTORS = ("svd", "rsvd", "random")


def resolve_side(shape: tuple[int, ...], side: str) -> str:
  """`"left"` or `"right"` for a `[..., m, n]` leaf.

  `"auto"` keeps the smaller optimizer state (`r × min(m, n)`: left when
  `m >= n`), as `optax.contrib.galore` does. `"torch"` is galore-torch's
  `proj_type="std"`: right when `m >= n`, so its state is `max(m, n) × r`.

  Raises:
    ValueError: On an unknown side.
  """
  m, n = shape[-2], shape[-1]
  if side == "auto":
    return "left" if m >= n else "right"
  if side == "torch":
    return "right" if m >= n else "left"
  if side in ("left", "right"):
    return side
  raise ValueError(f"Unknown side {side!r}; expected one of {SIDES}.")


def basis_dim(shape: tuple[int, ...], side: str) -> int:
  """The dimension the projector spans (`m` for left, `n` for right)."""
  return shape[-2] if side == "left" else shape[-1]


def project(g: jax.Array, p: jax.Array, side: str) -> jax.Array:
  """`Pᵀ G` (left) or `G P` (right), batched over leading dims."""
  p = p.astype(g.dtype)
  if side == "left":
    return jnp.einsum("...mr,...mn->...rn", p, g)
  return jnp.einsum("...mn,...nr->...mr", g, p)


def project_back(n: jax.Array, p: jax.Array, side: str) -> jax.Array:
  """`P N` (left) or `N Pᵀ` (right), batched over leading dims."""
  p = p.astype(n.dtype)
  if side == "left":
    return jnp.einsum("...mr,...rn->...mn", p, n)
  return jnp.einsum("...mr,...nr->...mn", n, p)


def _oriented(g: jax.Array, side: str) -> jax.Array:
  """`G` for left, `Gᵀ` for right: the basis always spans the row dim."""
  return g if side == "left" else jnp.swapaxes(g, -1, -2)


def svd_projector(g: jax.Array, rank: int, side: str) -> jax.Array:
  """Exact top-`rank` singular vectors, `[..., dim, rank]`, float32.

  Left: `U[:, :r]`; right: `Vh[:r]ᵀ`, both from the SVD of `G` itself, so
  the signs match galore-torch and `optax.contrib.galore` (GaLore keeps the
  moments across refreshes, which makes the update sign-sensitive).
  """
  u, _, vh = jnp.linalg.svd(g.astype(jnp.float32), full_matrices=False)
  if side == "left":
    return u[..., :rank]
  return jnp.swapaxes(vh[..., :rank, :], -1, -2)


def _orthonormalize(y: jax.Array) -> jax.Array:
  q, _ = jnp.linalg.qr(y)
  return q


def rsvd_projector(
    g: jax.Array,
    rank: int,
    side: str,
    key: jax.Array,
    *,
    oversample: int = 8,
    n_iter: int = 2,
) -> jax.Array:
  """Randomized top-`rank` left singular vectors, `[..., dim, rank]`, fp32.

  Costs `O((r+p) m n)` matmuls plus QR/SVD of thin or small matrices; no
  `m × n` decomposition, so a sharded `G` is never gathered.
  """
  a = _oriented(g, side).astype(jnp.float32)  # [..., d, k]
  d, k = a.shape[-2], a.shape[-1]
  width = min(rank + oversample, d, k)
  omega = jax.random.normal(key, a.shape[:-2] + (k, width), jnp.float32)
  q = _orthonormalize(a @ omega)  # [..., d, width]
  for _ in range(n_iter):  # Subspace iteration sharpens the spectrum.
    z = _orthonormalize(jnp.swapaxes(a, -1, -2) @ q)  # [..., k, width]
    q = _orthonormalize(a @ z)
  b = jnp.swapaxes(q, -1, -2) @ a  # [..., width, k], small.
  ub, _, _ = jnp.linalg.svd(b, full_matrices=False)
  return q @ ub[..., :rank]  # Only the kept columns: [d, w] @ [w, r].


def random_projector(
    shape: tuple[int, ...], rank: int, side: str, key: jax.Array
) -> jax.Array:
  """A random orthonormal `[..., dim, rank]` basis (QR of a Gaussian)."""
  lead = shape[:-2]
  d = basis_dim(shape, side)
  return _orthonormalize(
      jax.random.normal(key, lead + (d, rank), jnp.float32)
  )


def compute_projector(
    g: jax.Array, rank: int, side: str, projector: str, key: jax.Array
) -> jax.Array:
  """Dispatches on `projector` (see the module docstring)."""
  if projector == "svd":
    return svd_projector(g, rank, side)
  if projector == "rsvd":
    return rsvd_projector(g, rank, side, key)
  if projector == "random":
    return random_projector(g.shape, rank, side, key)
  raise ValueError(
      f"Unknown projector {projector!r}; expected one of {PROJECTORS}."
  )
