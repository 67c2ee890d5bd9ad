"""Group-wise asymmetric integer quantization of arrays (pure jnp).

Used for Q-GaLore's low-bit projectors. Groups run along the LAST axis (the
rank axis of a `[..., dim, rank]` projector), so a projector sharded on its
`dim` axis stays sharded the same way: codes `[..., dim, rank]` (8-bit) or
`[..., dim, rank / 2]` (4-bit, two codes per byte), and per-group scale and
zero point `[..., dim, rank / group_size]`.

`q = clip(round(x / scale) + zero, 0, 2^b − 1)`, `x ≈ (q − zero) · scale`,
with `scale = (max − min) / (2^b − 1)` and `zero = round(−min / scale)` per
group, as in Q-GaLore's projector quantizer.
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
