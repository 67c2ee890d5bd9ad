"""DoRA: weight-decomposed low-rank adaptation, as an adapter wrapper.

DoRA splits the adapted weight into a magnitude and a direction. With the
kernel viewed as `W: [d_in, d_out]` (`y = x @ W`) and the LoRA update
`ΔW = s·A B`, the adapted weight is

    W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_c

where `‖·‖_c` is the L2 norm of each output unit's column (over `d_in`) and
`m: [d_out]` is a trainable magnitude, initialised to `‖W‖_c` so that the
wrapper starts as the base layer. As in the paper (Sec. 4.3) and Hugging Face
PEFT, the norm is treated as a constant in the backward pass
(`stop_gradient`): `A`, `B` get gradients only through the direction's
numerator and `m` through the scale.

The forward reproduces PEFT's `DoraLinearLayer` term for term:

    g      = m / stop_gradient(‖W + ΔW‖_c)
    result = base(x) + (g - 1) ⊙ (x W) + g ⊙ s·(x A) B

where `x W` is the base output without its bias (the bias is not rescaled),
reused from `base(x)` unless adapter dropout is active, in which case it is
recomputed from the dropped input as PEFT does.

**The norm without an `[d_in, d_out]` temporary.** Per output column `j`,

    ‖W_j + s(AB)_j‖² = ‖W_j‖² + 2s <Aᵀ W_j, B_j> + s² B_jᵀ (AᵀA) B_j

so the forward only forms `AᵀW: [r, d_out]`, `AᵀA: [r, r]` and
`(AᵀA) B: [r, d_out]` besides the reduction `Σ_i W_ij²`, which XLA fuses
(proposed for Hugging Face PEFT in huggingface/peft PR #3387, never merged).

Merging folds `g ⊙ (W + ΔW)` into the kernel and remembers the column norms
(`merge_norm`, an `AdapterState`) that `unmerge` needs, because they cannot be
recovered from the merged kernel (its column norms are `|m|`).

References:
  Liu et al. 2024, DoRA: Weight-Decomposed Low-Rank Adaptation,
  https://arxiv.org/abs/2402.09353
"""

from flax import nnx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float

from lowrank import presets
from lowrank.adapters import layers
from lowrank.adapters import lora


def column_norm(
    w: Float[Array, "d_in d_out"],
    a: Float[Array, "d_in r"],
    b: Float[Array, "r d_out"],
    scale: float | int,
) -> Float[Array, " d_out"]:
  """`‖W + s·A B‖` per output column, without forming the `[d_in, d_out]` sum.

  Computed in float32 from `‖W_j‖² + 2s <AᵀW, B>_j + s² <(AᵀA) B, B>_j`;
  every intermediate is `[r, d_out]` or `[r, r]`. The squared norm is clipped
  at zero before the square root (rounding can make a vanishing column
  slightly negative).

  Args:
    w: Base kernel as `[d_in, d_out]`.
    a: LoRA `A: [d_in, r]`.
    b: LoRA `B: [r, d_out]`.
    scale: LoRA scale `s`.

  Returns:
    `[d_out]` float32 column norms.
  """
  w = w.astype(jnp.float32)
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  s = jnp.asarray(scale, jnp.float32)
  w_sq = jnp.einsum("ij,ij->j", w, w)
  cross = jnp.sum((a.T @ w) * b, axis=0)
  lora_sq = jnp.sum(((a.T @ a) @ b) * b, axis=0)
  return jnp.sqrt(jnp.maximum(w_sq + 2.0 * s * cross + s * s * lora_sq, 0.0))


def _bias_like_output(base: nnx.Module, ndim: int) -> jax.Array | None:
  """The base layer's bias, shaped to broadcast against its output."""
  bias = getattr(base, "bias", None)
  if bias is None:
    return None
  bias = bias[...]
  if isinstance(base, nnx.Einsum):
    _, ker, out = layers.parse_einsum(base.einsum_str)
    kshape = base.kernel[...].shape
    shape = tuple(kshape[ker.index(c)] if c in ker else 1 for c in out)
  elif isinstance(base, nnx.LinearGeneral):
    feats = tuple(base.out_features)
    shape = (1,) * (ndim - len(feats)) + feats
  else:
    shape = (1,) * (ndim - 1) + (bias.shape[-1],)
  return bias.reshape(shape)


class DoRA(layers.LoRAWrapper):
  """DoRA around `nnx.Linear`, `nnx.LinearGeneral` or `nnx.Einsum`.

  Attributes:
    lora_a: `nnx.LoRAParam`, `[*in_shape, r]`.
    lora_b: `nnx.LoRAParam`, `[r, *out_shape]`, zero at initialisation.
    magnitude: `nnx.LoRAParam`, `[*out_shape]` (PEFT's
      `lora_magnitude_vector`), initialised to the base kernel's column norms.
    merge_norm: `AdapterState`, `[*out_shape]` float32: the column norms of
      `W + ΔW` at the last `merge` (what `unmerge` divides back out); ones
      while unmerged.

  Differences from the official code (Hugging Face PEFT's DoRA,
  `huggingface/peft@5d602fdbff04`, `src/peft/tuners/lora/dora.py`,
  `variants.py`): the forward, the detached norm and the magnitude init are
  PEFT's (a parity test checks outputs, gradients and merge). The column
  norm is computed in float32 by the factored expansion above; PEFT forms
  `W + ΔW` in the input's dtype (rounding only). As for LoRA
  (`layers.LoRAWrapper`), `alpha=None` means `alpha = r` (scale 1) where
  PEFT's `LoraConfig` defaults to `lora_alpha=8`: `alpha=8` or
  `preset="paper"`; and the adapter takes the kernel's dtype where PEFT
  upcasts bf16 / fp16 adapters to float32.
  """

  method = "dora"

  def _create(self, key: jax.Array, dtype, **options) -> None:
    super()._create(key, dtype, **options)
    # B = 0: the same formula as the forward, so g is exactly 1 at init.
    norm = self.weight_norm()
    self.magnitude = self._param(
        norm.reshape(self.out_shape).astype(dtype), self.out_dims
    )
    self.merge_norm = layers.make_variable(
        layers.AdapterState,
        jnp.ones(self.out_shape, jnp.float32),
        self.base.kernel,
        self.out_dims,
    )

  # ------------------------------------------------------------- pieces
  def _factors_2d(self) -> tuple[jax.Array, jax.Array]:
    return (
        self.lora_a[...].reshape(self.d_in, self.rank),
        self.lora_b[...].reshape(self.rank, self.d_out),
    )

  def weight_norm(self) -> jax.Array:
    """`‖W + ΔW‖_c: [d_out]` float32 for the current (unmerged) kernel."""
    a, b = self._factors_2d()
    return column_norm(self.kernel_2d(), a, b, self.scale)

  def magnitude_scale(self) -> jax.Array:
    """`g = m / stop_gradient(‖W + ΔW‖_c)`: `[d_out]` float32."""
    norm = jax.lax.stop_gradient(self.weight_norm())
    m = self.magnitude[...].reshape(self.d_out).astype(jnp.float32)
    return m / norm

  def reset_magnitude(self) -> None:
    """Sets `m = ‖W + ΔW‖_c` (the wrapper then equals the LoRA-adapted layer).

    Data initialisations that rewrite `A`, `B` and the base kernel (PiSSA,
    OLoRA, CorDA in `lowrank.adapters.svd_init`) call this afterwards, as
    PEFT computes DoRA's magnitude after those inits.

    Raises:
      ValueError: If the adapter is merged.
    """
    if self.merged:
      raise ValueError("reset_magnitude() needs an unmerged DoRA adapter.")
    layers.assign(self.magnitude, self.weight_norm())

  def _dense_adapted(self) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(`W`, `W + ΔW`, its column norms), float32 `[d_in, d_out]`."""
    w = self.kernel_2d().astype(jnp.float32)
    a, b = self._factors_2d()
    v = w + lora.lora_delta(a, b, self.scale)
    return w, v, jnp.linalg.norm(v, axis=0)

  def _plain_delta(self) -> jax.Array:
    # What PiSSA/OLoRA/CorDA moved out of the base is `s·A₀B₀`, not DoRA's
    # effective change.
    return layers.LoRAWrapper.delta_weight(self)

  # ---------------------------------------------------------------- hooks
  def adapter_out(self, x2: jax.Array) -> jax.Array:
    """`x2 (W' - W)` for `x2: [..., d_in]` (includes the rescaled base term).

    Unlike plain LoRA this needs `x2 W` (one more base-sized matmul);
    `__call__` reuses the base output instead.
    """
    a, b = self._factors_2d()
    g = self.magnitude_scale().astype(x2.dtype)
    g = g.reshape((1,) * (x2.ndim - 1) + (self.d_out,))
    base2 = x2 @ self.kernel_2d().astype(x2.dtype)
    return (g - 1) * base2 + g * lora.lora_apply(x2, a, b, self.scale)

  def delta_weight(self) -> jax.Array:
    """`W' - W: [d_in, d_out]` float32, the full effective change of DoRA.

    Not the plain LoRA `s·A B`: adding this to the kernel gives the adapted
    weight `g ⊙ (W + s·A B)`.
    """
    w, v, norm = self._dense_adapted()
    m = self.magnitude[...].reshape(self.d_out).astype(jnp.float32)
    return v * (m / norm)[None, :] - w

  # ------------------------------------------------------------ behaviour
  def __call__(self, x, *args, **kwargs):
    base = self.base
    if isinstance(base, nnx.Einsum):
      einsum_str = kwargs.pop("einsum_str", None)
      if einsum_str is not None and einsum_str != base.einsum_str:
        raise ValueError(
            "An adapter-wrapped Einsum uses its constructor einsum_str."
        )
    y = base(x, *args, **kwargs)
    if not self.active:
      return y
    cdtype = self._compute_dtype(x)
    a, b = self._factors_2d()
    g2 = self.magnitude_scale()
    dropping = self.dropout is not None and not self.dropout.deterministic
    if dropping:
      # PEFT: with dropout the base term uses the dropped input as well.
      x2, batch = self._to_2d(self.dropout(x).astype(cdtype))
      base2 = x2 @ self.kernel_2d().astype(cdtype)
      g = g2.astype(cdtype).reshape((1,) * len(batch) + (self.d_out,))
      delta2 = (g - 1) * base2 + g * lora.lora_apply(x2, a, b, self.scale)
      return y + self._from_2d(delta2, batch).astype(y.dtype)
    x2, batch = self._to_2d(x.astype(cdtype))
    lora_out = self._from_2d(lora.lora_apply(x2, a, b, self.scale), batch)
    ones = (1,) * len(batch)
    g = self._from_2d(g2.reshape(ones + (self.d_out,)), ones).astype(y.dtype)
    bias = _bias_like_output(base, y.ndim)
    base_out = y if bias is None else y - bias.astype(y.dtype)
    return y + (g - 1) * base_out + g * lora_out.astype(y.dtype)

  def _fold(self) -> None:
    """Kernel `← m/‖W+ΔW‖_c ⊙ (W + ΔW)` (fp32, cast back); keeps the norms."""
    _, v, norm = self._dense_adapted()
    m = self.magnitude[...].reshape(self.d_out).astype(jnp.float32)
    self.set_kernel_2d(v * (m / norm)[None, :])
    self._set_merge_norm(norm)

  def _unfold(self) -> None:
    """Inverse of `_fold`: kernel `← W' ‖W+ΔW‖_c / m - ΔW`.

    `unmerge` runs this with `m`, `A`, `B` as they were at `merge` time.
    """
    w_merged = self.kernel_2d().astype(jnp.float32)
    norm = self.merge_norm[...].reshape(self.d_out).astype(jnp.float32)
    m = self.magnitude[...].reshape(self.d_out).astype(jnp.float32)
    a, b = self._factors_2d()
    w = w_merged * (norm / m)[None, :] - lora.lora_delta(a, b, self.scale)
    self.set_kernel_2d(w)
    self._set_merge_norm(jnp.ones((self.d_out,), jnp.float32))

  def _set_merge_norm(self, norm: jax.Array) -> None:
    layers.assign(self.merge_norm, norm)


def trainable_parameters(d_in: int, d_out: int, rank: int) -> int:
  """DoRA's trainable count for one `[d_in, d_out]` weight.

  `r (d_in + d_out)` for `A`, `B` plus `d_out` for the magnitude.
  """
  return rank * (d_in + d_out) + d_out


_LORA_PRESET = presets.get("lora")  # DoRA is a LoRA variant in PEFT.
presets.register(
    "dora",
    source="huggingface/peft@5d602fdbff04 (src/peft/tuners/lora/dora.py, "
    "config.py)",
    kwargs=_LORA_PRESET.kwargs, reasons=_LORA_PRESET.reasons,
    unavailable=_LORA_PRESET.unavailable)

layers.register("dora", DoRA)
