"""MUVERA fixed-dimensional encodings (FDEs) of multi-vector embeddings.

A query or document given as a set of token vectors (ColBERT style) is turned
into one vector whose dot product approximates the Chamfer / MaxSim
similarity `Σ_q max_d <q, d>`, so a single-vector search (exact or ANN)
retrieves candidates that exact MaxSim then reranks.

Per repetition `r` (of `num_repetitions`), with its own random draws:

1. SimHash: `k_sim` Gaussian hyperplanes; the sign bits `b` of a point pick a
   partition. As in the reference implementation the bits are appended as a
   Gray code, `g ← (g << 1) + (b_i XOR (g & 1))`, so partition `j` holds the
   points whose sign bits are `j XOR (j >> 1)`.
2. Projection: identity, or an AMS sketch to `projection_dim` (each input
   coordinate is added, with a random sign, to one random output coordinate;
   unscaled, as in the reference).
3. Block `[r, j]` of the FDE is the **sum** of the projected query points in
   partition `j` (queries) or their **average** (documents).
4. Documents only, optionally: an empty partition is filled with the
   projected point whose sign bits are nearest in Hamming distance to the
   partition's bits `j XOR (j >> 1)`. (The C++ reference calls that
   conversion `GrayCodeToBinary`; it is the binary-to-Gray map, which is the
   right one for recovering a partition's sign bits. Ports that use a true
   Gray-to-binary loop fill different points.)

Output length `R · 2^k_sim · d_proj`, optionally Count-Sketched down to
`final_projection_dim`. The same `seed` must be used for queries and
documents. The random draws come from JAX PRNG keys, so the bits differ from
the C++ mt19937 streams; the construction is the same.

Reference: Dhulipala et al. 2024, "MUVERA: Multi-Vector Retrieval via Fixed
Dimensional Encodings", https://arxiv.org/abs/2405.19504; google/graph-mining
`sketching/point_cloud/fixed_dimensional_encoding.cc`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float
import numpy as np

_AnyArray = jax.Array | np.ndarray


@dataclasses.dataclass(frozen=True)
class FDEConfig:
  """Fixed-dimensional encoding parameters (shared by queries and docs).

  Attributes:
    dimension: Input token-vector dimension.
    num_repetitions: Independent repetitions `R` (paper: 20).
    num_simhash_projections: `k_sim`; `2^k_sim` partitions (paper: 5).
    projection_dim: AMS sketch size per block; `None` = identity projection.
    fill_empty_partitions: Documents only: fill empty blocks (see module doc).
    final_projection_dim: Optional Count-Sketch output size.
    seed: Seed for every random draw.
  """

  dimension: int
  num_repetitions: int = 20
  num_simhash_projections: int = 5
  projection_dim: int | None = None
  fill_empty_partitions: bool = True
  final_projection_dim: int | None = None
  seed: int = 1

  def __post_init__(self):
    for name in ("dimension", "num_repetitions"):
      v = getattr(self, name)
      if not isinstance(v, int) or v <= 0:
        raise ValueError(f"{name} must be a positive int; got {v!r}.")
    k = self.num_simhash_projections
    if not isinstance(k, int) or not 0 <= k < 31:
      raise ValueError(
          f"num_simhash_projections must be an int in [0, 31); got {k!r}."
      )
    for name in ("projection_dim", "final_projection_dim"):
      v = getattr(self, name)
      if v is not None and (not isinstance(v, int) or v <= 0):
        raise ValueError(f"{name} must be None or a positive int; got {v!r}.")

  @property
  def num_partitions(self) -> int:
    return 2**self.num_simhash_projections

  @property
  def block_dim(self) -> int:
    return self.projection_dim or self.dimension

  @property
  def output_dim(self) -> int:
    """Length of the encodings."""
    if self.final_projection_dim is not None:
      return self.final_projection_dim
    return self.num_repetitions * self.num_partitions * self.block_dim


def _draws(config: FDEConfig):
  """SimHash planes `[R, dim, k]`, AMS (index, sign) `[R, dim]` each."""
  key = jax.random.key(config.seed)
  k_sim, k_ams_i, k_ams_s = jax.random.split(key, 3)
  r, dim, k = config.num_repetitions, config.dimension, (
      config.num_simhash_projections)
  planes = jax.random.normal(k_sim, (r, dim, k), jnp.float32)
  if config.projection_dim is None:
    return planes, None, None
  idx = jax.random.randint(k_ams_i, (r, dim), 0, config.projection_dim)
  sign = jax.random.rademacher(k_ams_s, (r, dim), jnp.float32)
  return planes, idx, sign


def _partition_ids(bits: jax.Array) -> jax.Array:
  """Sign bits `[..., k]` (bool) -> partition index (Gray-code appending)."""
  g = jnp.zeros(bits.shape[:-1], jnp.int32)
  for i in range(bits.shape[-1]):
    g = (g << 1) + (bits[..., i].astype(jnp.int32) ^ (g & 1))
  return g


def _popcount(x: jax.Array) -> jax.Array:
  return jax.lax.population_count(x)


def _encode(
    points: jax.Array, mask: jax.Array, config: FDEConfig, average: bool,
    fill: bool,
) -> jax.Array:
  """One point set `[T, dim]` with mask `[T]` -> `[output_dim]`."""
  planes, ams_idx, ams_sign = _draws(config)
  p, k = config.num_partitions, config.num_simhash_projections
  x = points.astype(jnp.float32)
  valid = mask.astype(jnp.float32)
  proj_logits = jnp.einsum("td,rdk->rtk", x, planes)
  part = _partition_ids(proj_logits > 0)  # [R, T]
  if ams_idx is None:
    projected = jnp.broadcast_to(x[None], (config.num_repetitions,) + x.shape)
  else:
    # [R, dim, d_proj] one signed 1 per row: projected = x @ S_r.
    s = jax.nn.one_hot(ams_idx, config.projection_dim) * ams_sign[..., None]
    projected = jnp.einsum("td,rde->rte", x, s)
  onehot = jax.nn.one_hot(part, p) * valid[None, :, None]  # [R, T, P]
  sums = jnp.einsum("rtp,rte->rpe", onehot, projected)
  if average:
    counts = onehot.sum(axis=1)  # [R, P]
    blocks = sums / jnp.maximum(counts, 1.0)[..., None]
    if fill:
      # Hamming distance between each partition's sign bits and each point's.
      pbits = jnp.arange(p, dtype=jnp.int32)
      pbits = pbits ^ (pbits >> 1)
      tbits = part ^ (part >> 1)  # [R, T]
      dist = _popcount(pbits[None, :, None] ^ tbits[:, None, :])  # [R,P,T]
      dist = jnp.where(mask[None, None, :], dist, k + 1)
      nearest = jnp.argmin(dist, axis=-1)  # [R, P]
      filler = jnp.take_along_axis(projected, nearest[..., None], axis=1)
      empty = (counts == 0) & jnp.any(mask)
      blocks = jnp.where(empty[..., None], filler, blocks)
  else:
    blocks = sums
  fde = blocks.reshape(-1)
  if config.final_projection_dim is not None:
    kb, ks = jax.random.split(jax.random.fold_in(
        jax.random.key(config.seed), 7919))
    n = fde.shape[0]
    bucket = jax.random.randint(kb, (n,), 0, config.final_projection_dim)
    sign = jax.random.rademacher(ks, (n,), jnp.float32)
    fde = jax.ops.segment_sum(
        fde * sign, bucket, num_segments=config.final_projection_dim
    )
  return fde


def _check(points, mask, config):
  if points.ndim != 3 or points.shape[-1] != config.dimension:
    raise ValueError(
        f"points must be [batch, tokens, {config.dimension}]; got "
        f"{points.shape}."
    )
  if mask is None:
    return jnp.ones(points.shape[:2], bool)
  if mask.shape != points.shape[:2]:
    raise ValueError(
        f"mask must be {points.shape[:2]} (batch, tokens); got {mask.shape}."
    )
  return mask.astype(bool)


@functools.partial(jax.jit, static_argnames=("config",))
def encode_queries(
    points: Float[_AnyArray, "batch tokens dim"],
    mask: Bool[_AnyArray, "..."] | None,
    config: FDEConfig,
) -> Float[Array, "batch out"]:
  """Query FDEs: per-partition **sums** of the (projected) token vectors.

  Args:
    points: Token vectors (padding rows allowed, see `mask`).
    mask: True for real tokens; `None` means all.
    config: Encoding parameters (`fill_empty_partitions` is ignored: it is
      defined for documents only).

  Returns:
    `[batch, config.output_dim]` float32.
  """
  mask = _check(points, mask, config)
  return jax.vmap(lambda x, m: _encode(x, m, config, False, False))(
      points, mask
  )


@functools.partial(jax.jit, static_argnames=("config",))
def encode_documents(
    points: Float[_AnyArray, "batch tokens dim"],
    mask: Bool[_AnyArray, "..."] | None,
    config: FDEConfig,
) -> Float[Array, "batch out"]:
  """Document FDEs: per-partition **averages**, empty blocks optionally filled.

  Args:
    points: Token vectors (padding rows allowed, see `mask`).
    mask: True for real tokens; `None` means all.
    config: Encoding parameters.

  Returns:
    `[batch, config.output_dim]` float32.
  """
  mask = _check(points, mask, config)
  return jax.vmap(
      lambda x, m: _encode(x, m, config, True, config.fill_empty_partitions)
  )(points, mask)


def chamfer(
    q: Float[_AnyArray, "tq dim"],
    q_mask: Bool[_AnyArray, "tq"],
    d: Float[_AnyArray, "n td dim"],
    d_mask: Bool[_AnyArray, "n td"],
) -> Float[Array, "n"]:
  """Chamfer / MaxSim similarity `Σ_{q valid} max_{d valid} <q, d>` per doc."""
  sim = jnp.einsum("qe,nte->nqt", q.astype(jnp.float32),
                   d.astype(jnp.float32))
  sim = jnp.where(d_mask[:, None, :], sim, -jnp.inf)
  best = jnp.max(sim, axis=-1)  # [n, tq]
  best = jnp.where(jnp.isfinite(best), best, 0.0)
  return jnp.sum(jnp.where(q_mask[None, :], best, 0.0), axis=-1)
