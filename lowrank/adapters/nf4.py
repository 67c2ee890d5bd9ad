"""Blockwise NF4 and int8 quantisation of frozen weights (pure jnp, no Flax).

QLoRA keeps the frozen base weights in 4 bits and dequantises them on the
fly; LQ-LoRA splits a weight into a quantized part plus a low-rank part that
the adapter then trains. This module holds the math; the NNX modules that
store a quantized kernel live in `lowrank.adapters.quantized`.

**Layout.** A weight of any shape is flattened row-major (its own dimension
order), zero-padded to a whole number of blocks, and viewed as
`[n_blocks, block_size]`; blocks are runs of `block_size` consecutive
elements, as in bitsandbytes. bitsandbytes flattens the torch weight
`[out, in]`; a Flax kernel is `[in, out]`, so the quantized layers of
`lowrank.adapters.quantized` transpose it first when asked to
(`layout="torch"`; their default flattens the kernel as stored). When the
dimension flattened first is sharded and a shard is a whole number of
blocks, the blocks of one shard stay on that shard
(`lowrank.adapters.quantized` places them so).

**NF4** (QLoRA §3): each block is divided by its absmax and every element is
rounded to the nearest of the 16 NormalFloat values `NF4_CODE`, the
normalised quantiles of N(0, 1) with an exact zero (Dettmers et al. 2023,
Appendix E; bitsandbytes' `get_4bit_type("nf4")`). Two 4-bit codes share a
byte, the first element of a pair in the high nibble (bitsandbytes' order).

**Double quantisation** (QLoRA §3, "Double Quantization"): the float32
absmax of each block (32 bits per 64 weights = 0.5 bit/param) is itself
quantized: its mean is subtracted (the absmaxes are positive, so centring
makes symmetric quantisation usable) and the centred values are quantized
blockwise with 8-bit codes of bitsandbytes' signed dynamic map, one float32
scale per `dq_block_size` (256) absmaxes, as bitsandbytes does
(`lowrank.quantize.quantize`, the quantiser 8-bit Adam also uses). Cost
per parameter with the defaults: `4 + 8/64 + 32/(64·256)` = 4.127 bits,
plus one float32 offset per tensor.

**int8**: symmetric absmax per block, `code = round(127 · x / absmax)` in
`[-127, 127]`, one float32 absmax per block: `8 + 32/64` = 8.5 bits per
parameter with 64-element blocks.

References:
  Dettmers et al. 2023, QLoRA: Efficient Finetuning of Quantized LLMs,
    https://arxiv.org/abs/2305.14314 (NF4: §3 and Appendix E)
  Dettmers et al. 2022, 8-bit Optimizers via Block-wise Quantization,
    https://arxiv.org/abs/2110.02861 (dynamic 8-bit map, blockwise absmax)
  Guo et al. 2023, LQ-LoRA: Low-rank plus Quantized Matrix Decomposition,
    https://arxiv.org/abs/2311.12023 (Algorithm 1: `lq_decompose`)
"""

from collections.abc import Callable
import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank import quantize as blockwise

SCHEMES = ("nf4", "int8")

# The 16 NF4 values, exactly as listed in QLoRA Appendix E (and in
# bitsandbytes' `get_4bit_type("nf4")`). Construction (tested): with
# `delta = 1 - (1/32 + 1/30) / 2`, the 8 positive values are
# `Phi^-1(linspace(delta, 1/2, 9)[:-1])`, the 7 negative ones
# `-Phi^-1(linspace(delta, 1/2, 8)[:-1])`, plus an exact 0, all divided by
# the largest; i.e. quantiles of N(0, 1) with 2^(k-1) levels on the negative
# and 2^(k-1) + 1 on the positive side sharing one zero (QLoRA §3).
NF4_CODE = np.asarray(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)
# Decision boundaries between neighbouring codes; `x > mid` picks the upper
# code, so an exact tie goes to the lower one (as bitsandbytes' encoder).
_NF4_MIDS = (NF4_CODE[1:] + NF4_CODE[:-1]) / 2


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "absmax", "absmax_scale", "absmax_offset"],
    meta_fields=["shape", "dtype", "block_size"],
)
@dataclasses.dataclass(frozen=True)
class NF4Tensor:
  """An NF4-quantized array (a pytree; the metadata fields are static).

  Attributes:
    codes: uint8 `[n_blocks, block_size / 2]`, two 4-bit indices into
      `NF4_CODE` per byte (first of a pair in the high nibble).
    absmax: Per-block absmax `[n_blocks]`: uint8 dynamic-map codes of
      `absmax - absmax_offset` with double quantisation, else float32.
    absmax_scale: float32 `[ceil(n_blocks / dq_block_size)]` scales of the
      double-quantized absmax, or None.
    absmax_offset: float32 `[]`, the mean absmax subtracted before double
      quantisation, or None.
    shape: The original array's shape.
    dtype: The original array's dtype name (what `dequantize_nf4` returns).
    block_size: Elements per block.
  """

  codes: Any
  absmax: Any
  absmax_scale: Any
  absmax_offset: Any
  shape: tuple[int, ...]
  dtype: str
  block_size: int


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["codes", "scale"],
    meta_fields=["shape", "dtype", "block_size"],
)
@dataclasses.dataclass(frozen=True)
class Int8Tensor:
  """A blockwise absmax int8-quantized array (a pytree).

  Attributes:
    codes: int8 `[n_blocks, block_size]` in `[-127, 127]`.
    scale: float32 `[n_blocks]`, each block's absmax (0 for a zero block).
    shape: The original array's shape.
    dtype: The original array's dtype name.
    block_size: Elements per block.
  """

  codes: Any
  scale: Any
  shape: tuple[int, ...]
  dtype: str
  block_size: int


def _check_block(name: str, block_size: Any, even: bool = False) -> None:
  if (isinstance(block_size, bool) or not isinstance(block_size, int)
      or block_size <= 0 or (even and block_size % 2)):
    what = "a positive even int" if even else "a positive int"
    raise ValueError(f"{name} must be {what}; got {block_size!r}.")


def _float_array(fn: str, w: jax.typing.ArrayLike) -> jax.Array:
  """`w` as an array; a `ValueError` naming `fn` unless float and non-empty."""
  w = jnp.asarray(w)
  if not jnp.issubdtype(w.dtype, jnp.floating) or w.size == 0:
    raise ValueError(
        f"{fn} expects a non-empty float array; got {w.dtype} {w.shape}."
    )
  return w


def _blocks(w: jax.Array, block_size: int) -> jax.Array:
  """Flattens `w` row-major to float32 `[n_blocks, block_size]`, 0-padded."""
  flat = jnp.ravel(w).astype(jnp.float32)
  n_blocks = max(1, -(-flat.size // block_size))
  pad = n_blocks * block_size - flat.size
  if pad:
    flat = jnp.pad(flat, (0, pad))
  return flat.reshape(n_blocks, block_size)


def _unblocks(blocks: jax.Array, shape: tuple[int, ...]) -> jax.Array:
  return blocks.reshape(-1)[: math.prod(shape)].reshape(shape)


def _normalised(blocks: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Blocks divided by their absmax (in [-1, 1]), and the absmax."""
  absmax = jnp.max(jnp.abs(blocks), axis=-1)
  safe = jnp.where(absmax > 0, absmax, 1.0)
  return jnp.clip(blocks / safe[:, None], -1.0, 1.0), absmax


def nf4_encode(x: jax.typing.ArrayLike) -> jax.Array:
  """Index (uint8, 0..15) of the nearest `NF4_CODE` value for `x` in [-1, 1]."""
  x = jnp.asarray(x, jnp.float32)
  mids = [float(m) for m in _NF4_MIDS]
  return sum((x > m).astype(jnp.uint8) for m in mids).astype(jnp.uint8)


def quantize_nf4(
    w: jax.typing.ArrayLike,
    block_size: int = 64,
    double_quant: bool = True,
    dq_block_size: int = 256,
) -> NF4Tensor:
  """Quantizes `w` to 4-bit NormalFloat with per-block absmax scaling.

  Args:
    w: Array of any shape and float dtype.
    block_size: Consecutive (row-major) elements sharing one absmax (QLoRA:
      64). Must be even (two codes per byte).
    double_quant: Quantize the absmaxes to 8 bits (QLoRA's double
      quantisation), else keep them float32.
    dq_block_size: Absmaxes sharing one float32 scale in double
      quantisation (QLoRA: 256).

  Returns:
    An `NF4Tensor`.

  Raises:
    ValueError: On a bad block size or an empty / non-float array.
  """
  _check_block("block_size", block_size, even=True)
  _check_block("dq_block_size", dq_block_size)
  w = _float_array("quantize_nf4", w)
  return _quantize_nf4(w, block_size, double_quant, dq_block_size)


@functools.partial(jax.jit, static_argnums=(1, 2, 3), inline=True)
def _quantize_nf4(w, block_size, double_quant, dq_block_size) -> NF4Tensor:
  y, absmax = _normalised(_blocks(w, block_size))
  q = nf4_encode(y)
  codes = (q[:, 0::2] << 4) | q[:, 1::2]
  scale = offset = None
  if double_quant:
    offset = jnp.mean(absmax)
    dq = blockwise.quantize(
        absmax - offset, second_moment=False, scheme="dynamic",
        block_size=dq_block_size,
    )
    absmax, scale = dq.codes, dq.scale
  return NF4Tensor(
      codes=codes.astype(jnp.uint8),
      absmax=absmax,
      absmax_scale=scale,
      absmax_offset=offset,
      shape=tuple(w.shape),
      dtype=jnp.dtype(w.dtype).name,
      block_size=block_size,
  )


def nf4_absmax(q: NF4Tensor) -> jax.Array:
  """The (dequantized, if double-quantized) float32 absmax of each block."""
  if q.absmax_scale is None:
    return jnp.asarray(q.absmax, jnp.float32)
  centred = blockwise.dequantize(
      blockwise.BlockQuantized(codes=q.absmax, scale=q.absmax_scale),
      second_moment=False, scheme="dynamic",
  )
  return centred + q.absmax_offset


def dequantize_nf4(q: NF4Tensor, dtype: Any = None) -> jax.Array:
  """Inverse of `quantize_nf4`: `NF4_CODE[code] · absmax` per element.

  Args:
    q: An `NF4Tensor`.
    dtype: Output dtype (default: the quantized array's original dtype).
      The arithmetic is float32 either way.

  Returns:
    An array of shape `q.shape`.
  """
  return _dequantize_nf4(q, jnp.dtype(dtype or q.dtype))


@functools.partial(jax.jit, static_argnums=1, inline=True)
def _dequantize_nf4(q: NF4Tensor, dtype) -> jax.Array:
  hi, lo = q.codes >> 4, q.codes & 0xF
  idx = jnp.stack([hi, lo], axis=-1).reshape(q.codes.shape[0], -1)
  values = jnp.asarray(NF4_CODE)[idx] * nf4_absmax(q)[:, None]
  return _unblocks(values, q.shape).astype(dtype)


def quantize_int8(w: jax.typing.ArrayLike, block_size: int = 64) -> Int8Tensor:
  """Symmetric blockwise absmax int8: `round(127 · x / absmax)`.

  Args:
    w: Array of any shape and float dtype.
    block_size: Consecutive (row-major) elements sharing one absmax.

  Returns:
    An `Int8Tensor`.

  Raises:
    ValueError: On a bad block size or an empty / non-float array.
  """
  _check_block("block_size", block_size)
  return _quantize_int8(_float_array("quantize_int8", w), block_size)


@functools.partial(jax.jit, static_argnums=1, inline=True)
def _quantize_int8(w, block_size) -> Int8Tensor:
  y, absmax = _normalised(_blocks(w, block_size))
  codes = jnp.round(y * 127.0).astype(jnp.int8)
  return Int8Tensor(
      codes=codes,
      scale=absmax,
      shape=tuple(w.shape),
      dtype=jnp.dtype(w.dtype).name,
      block_size=block_size,
  )


def dequantize_int8(q: Int8Tensor, dtype: Any = None) -> jax.Array:
  """Inverse of `quantize_int8`: `code / 127 · absmax` per element."""
  return _dequantize_int8(q, jnp.dtype(dtype or q.dtype))


@functools.partial(jax.jit, static_argnums=1, inline=True)
def _dequantize_int8(q: Int8Tensor, dtype) -> jax.Array:
  values = q.codes.astype(jnp.float32) * (q.scale / 127.0)[:, None]
  return _unblocks(values, q.shape).astype(dtype)


def scheme_options(
    scheme: str,
    *,
    block_size: int = 64,
    double_quant: bool = True,
    dq_block_size: int = 256,
) -> dict[str, Any]:
  """The keywords `quantize(w, scheme, **options)` takes, checked.

  NF4 takes all three; int8 only `block_size` (the others are dropped).

  Raises:
    ValueError: On an unknown scheme or a bad block size.
  """
  if scheme not in SCHEMES:
    raise ValueError(
        f"Unknown quantisation scheme {scheme!r}; known: {SCHEMES}."
    )
  if scheme == "int8":
    _check_block("block_size", block_size)
    return {"block_size": block_size}
  _check_block("block_size", block_size, even=True)
  _check_block("dq_block_size", dq_block_size)
  return {"block_size": block_size, "double_quant": double_quant,
          "dq_block_size": dq_block_size}


def quantize(w: jax.typing.ArrayLike, scheme: str, **kwargs) -> Any:
  """`quantize_nf4` or `quantize_int8` by name (keywords passed on).

  Raises:
    ValueError: On an unknown scheme or a keyword the scheme lacks.
  """
  if scheme == "nf4":
    return quantize_nf4(w, **kwargs)
  if scheme == "int8":
    extra = sorted(set(kwargs) - {"block_size"})
    if extra:
      raise ValueError(f"int8 quantisation takes only block_size; got {extra}.")
    return quantize_int8(w, **kwargs)
  raise ValueError(f"Unknown quantisation scheme {scheme!r}; known: {SCHEMES}.")


def dequantize(q: NF4Tensor | Int8Tensor, dtype: Any = None) -> jax.Array:
  """`dequantize_nf4` or `dequantize_int8` by the type of `q`."""
  if isinstance(q, NF4Tensor):
    return dequantize_nf4(q, dtype)
  return dequantize_int8(q, dtype)


def nbytes(q: NF4Tensor | Int8Tensor) -> int:
  """Bytes of storage of a quantized array (all its array leaves)."""
  return sum(int(x.size) * x.dtype.itemsize for x in jax.tree.leaves(q))


def bits_per_param(q: NF4Tensor | Int8Tensor) -> float:
  """Storage bits per element of the original array."""
  return 8.0 * nbytes(q) / math.prod(q.shape)


def lq_decompose(
    w: jax.typing.ArrayLike,
    rank: int,
    roundtrip: Callable[[jax.Array], jax.Array],
    iters: int = 10,
    *,
    early_stop: bool = False,
    svd: Callable[[jax.Array, jax.Array], tuple[jax.Array, ...]] | None = None,
    key: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, list[float]]:
  """LQ-LoRA's `W ≈ Q + L1 L2` by alternating SVD and quantisation.

  Algorithm 1 of LQ-LoRA: starting from `Q = 0`, repeat
  `L1 L2 = SVD_r(W − Q)` then `Q = quantize(W − L1 L2)`. By default all
  `iters` alternations run and the iterate with the smallest
  `‖W − (Q + L1 L2)‖_F` is returned, which is never worse than the official
  rule (`early_stop=True`: stop at the first iteration whose error exceeds
  the previous one and return that iterate, `lq_utils.py`, whose own
  comment notes the previous iterate would be slightly better).

  Args:
    w: The full-precision weight `[m, n]`.
    rank: Rank `r` of `L1 L2`.
    roundtrip: `x -> dequantize(quantize(x))` for an `[m, n]` array (the
      caller fixes the scheme, block size and the kernel layout).
    iters: Number of alternations `T` (>= 1; the official code: 100).
    early_stop: The official stopping rule (above) instead of the best of
      all `iters`.
    svd: `(x, key) -> (U, S, Vᵀ)` with at least `rank` components, e.g. a
      randomized SVD; default the exact `jnp.linalg.svd`. Each iteration
      gets its own key, `fold_in(key, t)`.
    key: PRNG key for `svd` (default `jax.random.key(0)`); unused by the
      exact SVD.

  Returns:
    `(residual, l1, l2, errors)`: `residual = W − L1 L2` (float32, what to
    quantize for the frozen base; `roundtrip(residual)` is the returned
    `Q`), `l1: [m, r]`, `l2: [r, n]` with the singular values split evenly
    (`l1 = U √S`, `l2 = √S Vᵀ`), and the relative Frobenius error
    `‖W − Q − L1 L2‖ / ‖W‖` of every iteration run.

  Raises:
    ValueError: If `w` is not 2-D, or `rank` / `iters` is out of range.
  """
  w = jnp.asarray(w, jnp.float32)
  if w.ndim != 2:
    raise ValueError(f"lq_decompose expects a 2-D weight; got {w.shape}.")
  if isinstance(rank, bool) or not isinstance(rank, int) or not (
      0 < rank <= min(w.shape)):
    raise ValueError(
        f"rank must be an int in [1, {min(w.shape)}]; got {rank!r}."
    )
  if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
    raise ValueError(f"iters must be a positive int; got {iters!r}.")
  norm = float(jnp.linalg.norm(w)) or 1.0
  if svd is None:
    svd = lambda x, _: jnp.linalg.svd(x, full_matrices=False)
  key = jax.random.key(0) if key is None else key

  @jax.jit
  def step(q, key):
    u, s, vt = svd(w - q, key)
    root = jnp.sqrt(s[:rank])
    l1, l2 = u[:, :rank] * root[None, :], root[:, None] * vt[:rank]
    residual = w - l1 @ l2
    q = roundtrip(residual).astype(jnp.float32)
    return q, residual, l1, l2, jnp.linalg.norm(residual - q)

  q = jnp.zeros_like(w)
  best, errors = None, []
  for t in range(iters):
    q, residual, l1, l2, err = step(q, jax.random.fold_in(key, t))
    errors.append(float(err) / norm)
    if early_stop:
      best = (errors[-1], residual, l1, l2)
      if len(errors) > 1 and errors[-1] > errors[-2]:
        break
    elif best is None or errors[-1] < best[0]:
      best = (errors[-1], residual, l1, l2)
  _, residual, l1, l2 = best
  return residual, l1, l2, errors
