"""Group-wise asymmetric integer quantization of arrays (pure jnp).

Used for Q-GaLore's low-bit projectors. Groups run along the LAST axis (the
rank axis of a `[..., dim, rank]` projector), so a projector sharded on its
`dim` axis stays sharded the same way: codes `[..., dim, rank]` (8-bit) or
`[..., dim, rank / 2]` (4-bit, two codes per byte), and per-group scale and
zero point `[..., dim, rank / group_size]`.

`q = clip(round(x / scale) + zero, 0, 2^b − 1)`, `x ≈ (q − zero) · scale`,
with `scale = (max − min) / (2^b − 1)` (1.0 for a constant group) and an
unclamped `zero = round(−min / scale)` per group, so every group round-trips
within half a step.

Q-GaLore's own quantizer (`_quantize` in `q_galore_torch/q_galore_projector.py`
of VITA-Group/Q-GaLore) differs in layout and clamps: it flattens the
matrix it stores into groups of `group_size` consecutive elements (256 in
its scripts), floors `max − min` at 1e-5 and clamps the zero point to
`[0, 2^b − 1]`. `quantize_flat` / `dequantize_flat` are that quantizer
(codes `[..., 1, numel]`, or `numel / 2` packed 4-bit, scale and zero
`[..., 1, numel / group_size]`); a `d`-sharded projector does not stay
sharded in that form.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

BITS = (4, 8)


class Quantized(NamedTuple):
  """A quantized array.

  Attributes:
    codes: uint8 `[..., n]` (8-bit) or `[..., n / 2]` (4-bit, packed).
    scale: float32 `[..., n / group_size]`.
    zero: float32 `[..., n / group_size]` (integer-valued zero points).
  """

  codes: jax.Array
  scale: jax.Array
  zero: jax.Array


def check(n: int, bits: int, group_size: int) -> None:
  """Validates a quantization layout for a last axis of size `n`.

  Raises:
    ValueError: If `bits` is not 4 or 8, or `group_size` does not divide
      `n`, or 4-bit codes would not pack (odd `n`).
  """
  if bits not in BITS:
    raise ValueError(f"bits must be one of {BITS}; got {bits!r}.")
  if group_size <= 0 or n % group_size:
    raise ValueError(
        f"group_size={group_size} must divide the quantized axis ({n})."
    )
  if bits == 4 and n % 2:
    raise ValueError(f"4-bit packing needs an even axis; got {n}.")


def zeros(shape: tuple[int, ...], bits: int, group_size: int) -> Quantized:
  """An all-zero `Quantized` for an array of `shape` (works abstractly)."""
  check(shape[-1], bits, group_size)
  n = shape[-1]
  code_n = n if bits == 8 else n // 2
  groups = shape[:-1] + (n // group_size,)
  return Quantized(
      codes=jnp.zeros(shape[:-1] + (code_n,), jnp.uint8),
      scale=jnp.zeros(groups, jnp.float32),
      zero=jnp.zeros(groups, jnp.float32),
  )


def quantize(x: jax.Array, bits: int, group_size: int) -> Quantized:
  """Quantizes `x` group-wise along its last axis."""
  check(x.shape[-1], bits, group_size)
  levels = 2**bits - 1
  g = x.astype(jnp.float32).reshape(
      x.shape[:-1] + (x.shape[-1] // group_size, group_size)
  )
  lo, hi = g.min(axis=-1), g.max(axis=-1)
  scale = jnp.where(hi > lo, (hi - lo) / levels, 1.0)
  zero = jnp.round(-lo / scale)
  q = jnp.clip(jnp.round(g / scale[..., None]) + zero[..., None], 0, levels)
  q = q.astype(jnp.uint8).reshape(x.shape)
  if bits == 4:
    q = q[..., 0::2] | (q[..., 1::2] << 4)
  return Quantized(codes=q, scale=scale, zero=zero)


def dequantize(qx: Quantized, bits: int, group_size: int) -> jax.Array:
  """Inverse of `quantize` (float32)."""
  codes = qx.codes
  if bits == 4:
    lo, hi = codes & 0xF, codes >> 4
    codes = jnp.stack([lo, hi], axis=-1).reshape(
        codes.shape[:-1] + (2 * codes.shape[-1],)
    )
  n = codes.shape[-1]
  g = codes.astype(jnp.float32).reshape(
      codes.shape[:-1] + (n // group_size, group_size)
  )
  x = (g - qx.zero[..., None]) * qx.scale[..., None]
  return x.reshape(codes.shape)


def check_flat(shape: tuple[int, ...], bits: int, group_size: int) -> None:
  """Validates `quantize_flat`'s layout for matrices `[..., d, r]`.

  Raises:
    ValueError: If `bits` is not 4 or 8, or `group_size` does not divide
      `d·r` (Q-GaLore asserts the same), or 4-bit codes would not pack.
  """
  if bits not in BITS:
    raise ValueError(f"bits must be one of {BITS}; got {bits!r}.")
  numel = shape[-2] * shape[-1]
  if group_size <= 0 or numel % group_size:
    raise ValueError(
        f"group_size={group_size} must divide the {shape[-2]}x{shape[-1]} "
        f"= {numel} elements of each projector (Q-GaLore's flattened "
        "groups); pass projector_group_size= a divisor of it.")
  if bits == 4 and numel % 2:
    raise ValueError(f"4-bit packing needs an even size; got {numel}.")


def _flat(x: jax.Array, transpose: bool) -> jax.Array:
  """`[..., d, r]` -> `[..., 1, d·r]`, row-major in the stored orientation."""
  if transpose:
    x = jnp.swapaxes(x, -1, -2)
  return x.reshape(x.shape[:-2] + (1, x.shape[-2] * x.shape[-1]))


def zeros_flat(shape: tuple[int, ...], bits: int, group_size: int) -> Quantized:
  """An all-zero `quantize_flat` result for matrices of `shape`."""
  check_flat(shape, bits, group_size)
  numel = shape[-2] * shape[-1]
  lead = shape[:-2] + (1,)
  return Quantized(
      codes=jnp.zeros(lead + (numel if bits == 8 else numel // 2,),
                      jnp.uint8),
      scale=jnp.zeros(lead + (numel // group_size,), jnp.float32),
      zero=jnp.zeros(lead + (numel // group_size,), jnp.float32),
  )


def quantize_flat(x: jax.Array, bits: int, group_size: int,
                  transpose: bool = False) -> Quantized:
  """Q-GaLore's `_quantize` of each matrix `[..., d, r]` of `x`.

  The matrix (its transpose `[r, d]` with `transpose=True`) is read
  row-major into groups of `group_size` consecutive elements; per group
  `scale = max(max − min, 1e-5) / (2^b − 1)`,
  `zero = clip(−round(min / scale), 0, 2^b − 1)` and
  `q = clip(round(x / scale) + zero, 0, 2^b − 1)`.
  """
  check_flat(x.shape, bits, group_size)
  levels = 2**bits - 1
  flat = _flat(x.astype(jnp.float32), transpose)
  g = flat.reshape(flat.shape[:-1] + (flat.shape[-1] // group_size,
                                      group_size))
  lo, hi = g.min(axis=-1), g.max(axis=-1)
  scale = jnp.maximum(hi - lo, 1e-5) / levels
  zero = jnp.clip(-jnp.round(lo / scale), 0, levels)
  q = jnp.clip(jnp.round(g / scale[..., None]) + zero[..., None], 0, levels)
  q = q.astype(jnp.uint8).reshape(flat.shape)
  if bits == 4:
    q = q[..., 0::2] | (q[..., 1::2] << 4)
  return Quantized(codes=q, scale=scale, zero=zero)


def dequantize_flat(qx: Quantized, bits: int, group_size: int, rank: int,
                    transpose: bool = False) -> jax.Array:
  """Inverse of `quantize_flat`: float32 `[..., d, rank]`."""
  flat = dequantize(qx, bits, group_size)  # [..., 1, d·r]
  d = flat.shape[-1] // rank
  lead = flat.shape[:-2]
  if transpose:
    return jnp.swapaxes(flat.reshape(lead + (rank, d)), -1, -2)
  return flat.reshape(lead + (d, rank))
