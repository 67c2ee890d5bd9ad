"""LoRA-XS, its LoRA-SB initialisation, and LoLDU: adapters with r² or r params.

Kernel convention as everywhere in `lowrank.adapters`: `y = x @ W` with
`W: [d_in, d_out]`; the papers write the torch layout `W_t = Wᵀ:
[d_out, d_in]`, so a paper factor `B: [d_out, r]` is stored here transposed
as `basis_b: [r, d_out]` and `A: [r, d_in]` as `basis_a: [d_in, r]`.

**LoRA-XS** (`method="lora_xs"`, Bałazy et al. 2024): `W + s·B R A` with
`B`, `A` frozen from the truncated SVD `W_t ≈ U_r Σ_r V_rᵀ` and only `R:
[r, r]` trained (`r²` parameters per module). Which factor carries `Σ_r` is
the option `singular_values`: `"b"` (default; the paper's `B = U_r Σ_r`,
`A = V_rᵀ`) or `"a"` (the authors' code, `utils/initialization_utils.py`:
`B = U_r`, `A = Σ_r V_rᵀ`). `R` starts at zero (`r_init_std=0`, the adapter
is then an exact identity) or `N(0, r_init_std²)` (the authors' code uses
`1e-5`). `B` and `A` are stored as `AdapterState` (saved with the adapter,
not trained) rather than recomputed on load: singular vectors are only
defined up to sign (and rotation within repeated singular values), which
differs across backends and would silently scramble a trained `R`; and with
LoRA-SB they come from a gradient that is not available at load time. An
adapter file therefore holds `r² + r (d_in + d_out)` numbers per module; the
trainable count is `r²`.

**LoRA-SB** (`inject(method="lora_xs", init="lora_sb", init_data={path:
gradient})`, Ponkshe et al. 2024): `B`, `A`, `R` from the first full
fine-tuning step `ΔW = -η·G` (or Adam's first step `-η·sign(G)`, what the
authors' code computes): `ΔW ≈ U_r Σ_r V_rᵀ`, `B = U_r`, `A = V_rᵀ`,
`R = Σ_r / s`, so `s·B R A` is the best rank-`r` approximation of the first
step and both bases are orthonormal. By default the base kernel is not
changed, so the model starts one (approximated) full fine-tuning step in,
which is what the initialisation is meant to reproduce; pass
`"residual": True` to subtract the step from the kernel instead (output
unchanged at init, as LoRA-GA/PiSSA-style inits do). `init_data[path]` is
the kernel-shaped gradient `G` (then `η = 1`, plain step) or
`{"gradient": G, "lr": η, "update": "sgd" | "sign", "residual": bool}`.
`first_gradients` computes `G` for the targeted kernels.

LoRA-SB is an `init` of `method="lora_xs"`, not a method of its own, so it
has no `preset="paper"`; its differences from the official code
(`RaghavSinghal10/lora-sb@37b33d4c4c57`) are reached through `init_data`:

  * The step approximated. The authors' code takes Adam's first step
    `-η·sign(Σ G)` (`utils/gradient_utils.py:141`); the default here is the
    plain step `-G` (`update="sgd"`, `lr=1`), the natural reading of a
    kernel-shaped gradient. Official: `init_data={path: {"gradient": G,
    "update": "sign", "lr": η}}`.
  * `η`. The authors use the first warm-up learning rate,
    `lr / (warmup_ratio · total_steps)` (`train_glue.py:102`): pass that as
    `"lr"`.
  * The gradient. The authors sum per-batch mean gradients over a few
    samples (2 for GLUE); `first_gradients` differentiates one `loss_fn`
    call: sum its results over the batches yourself.
  * The SVD. The authors use `torch.svd_lowrank(q=r, niter=10)` and cast
    `U, Σ, V` to bfloat16 (`utils/svd_utils.py:29-34`); here the SVD is
    exact and stays in float32. Not available.
  * The scale: the authors force `lora_alpha = r` (`train_glue.py:48`),
    lowrank's default (scale 1), so their `R = Σ_r` is this `Σ_r / s`.

**LoLDU** (`method="loldu"`, Shi et al. 2024): LU with partial pivoting
`W_t = P L D U` (`L` unit lower, `D` diagonal, `U` unit upper; the authors'
`ldu_decomposition`), top-`r` part `P L_r`, `D_r`, `U_r`. `P L_r` and `U_r`
are frozen (`Basis`, recomputed from the kernel when the adapter is rebuilt:
pivoted LU is deterministic); the diagonal `z` (init `D_r`) and the scaling
factor `σ` (init `alpha / r`) are trained: `r + 1` parameters per module
(`r` with `train_scale=False`). The paper writes the residual
`W_res = W - σ₀ P L_r diag(D_r) U_r` into the base and adds
`σ P L_r diag(z) U_r`; this wrapper keeps the base kernel untouched and adds
`P L_r diag(σ z - σ₀ D_r) U_r`, the same function of `(z, σ)` with the same
gradients, which is exactly zero at init, so `disabled`/`unload` give back
the pretrained weights. A zero pivot leaves that component at zero.

References:
  Bałazy et al. 2024, LoRA-XS, https://arxiv.org/abs/2405.17604
  Ponkshe et al. 2024, LoRA-SB, https://arxiv.org/abs/2411.19557
  Shi et al. 2024, LoLDU, https://arxiv.org/abs/2410.13618
"""

from collections.abc import Callable, Mapping, Sequence
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import jax.scipy.linalg

from lowrank import presets
from lowrank.adapters import layers
from lowrank.adapters import lora
from lowrank.adapters import svd_init

LORA_SB_UPDATES = ("sgd", "sign")


def _check_rank(wrapper: layers.LoRAWrapper) -> None:
  if wrapper.rank > min(wrapper.d_in, wrapper.d_out):
    raise ValueError(
        f"method {wrapper.method!r} needs rank <= min(d_in, d_out) = "
        f"{min(wrapper.d_in, wrapper.d_out)}; got rank {wrapper.rank}."
    )


def _state(wrapper, value, dims):
  return layers.make_variable(
      layers.AdapterState, value, wrapper.base.kernel, dims
  )


class LoRAXS(layers.LoRAWrapper):
  """LoRA-XS: `y = base(x) + s · ((x A) R) B` with only `R` trainable.

  Attributes:
    basis_a: `AdapterState`, `[*in_shape, r]` (the paper's `Aᵀ`).
    basis_b: `AdapterState`, `[r, *out_shape]` (the paper's `Bᵀ`).
    lora_latent: `nnx.LoRAParam`, `[r, r]` (the paper's `R`, as `x A R B`).
    r_init_std, singular_values: The options (see the module docstring).

  Differences from the official code (`MohammadrezaBanaei/LoRA-XS@e50b1a82b5d7`,
  `utils/initialization_utils.py`, `utils/svd_utils.py`, `main_glue.py`):

    * Which factor carries `Σ_r`. The authors' code runs `TruncatedSVD` on
      the `[d_in, d_out]` weight and loads `U_r Σ_r` into `lora_A` (the
      input side); the default here is the paper's `B = U_r Σ_r` (output
      side). Official: `singular_values="a"`.
    * `R` at init. The authors draw `N(0, 1e-5²)`
      (`init_module_weights(..., sigma=0.00001)`); the default here is 0,
      so the adapter is exactly the identity at init. Official:
      `r_init_std=1e-5`.
    * Default `alpha`. `main_glue.py` and `main_commonsense_tuning.py`
      default to `lora_alpha=16` (the README's commonsense example uses
      `2 r`; the math script uses `r`, lowrank's default). Official
      default: `alpha=16`.
    * `preset="paper"` gives all three (`lowrank.presets`).
    * The SVD. The authors use sklearn's randomized `TruncatedSVD`
      (`n_iter=10`, `random_state=42`); here it is exact. Not available
      (the exact subspace is what the randomized one approximates).
  """

  method = "lora_xs"
  option_names = ("r_init_std", "singular_values")

  def _create(
      self,
      key: jax.Array,
      dtype,
      r_init_std: float | int = 0.0,
      singular_values: str = "b",
  ) -> None:
    _check_rank(self)
    r_init_std = float(r_init_std)
    if not (math.isfinite(r_init_std) and r_init_std >= 0):
      raise ValueError(f"r_init_std must be >= 0; got {r_init_std}.")
    if singular_values not in ("a", "b"):
      raise ValueError(
          f"singular_values must be 'a' or 'b'; got {singular_values!r}."
      )
    self.r_init_std = r_init_std
    self.singular_values = singular_values
    r = self.rank
    p, sv, qt = jnp.linalg.svd(
        self.kernel_2d().astype(jnp.float32), full_matrices=False
    )
    a, b = p[:, :r], qt[:r]
    if singular_values == "b":
      b = sv[:r, None] * b
    else:
      a = a * sv[None, :r]
    self.basis_a = _state(
        self, a.reshape(self.in_shape + (r,)).astype(dtype),
        self.in_dims + (None,)
    )
    self.basis_b = _state(
        self, b.reshape((r,) + self.out_shape).astype(dtype),
        (None,) + self.out_dims
    )
    latent = jax.random.normal(key, (r, r), jnp.float32) * r_init_std
    self.lora_latent = self._param(latent.astype(dtype), (None, None))

  def _bases_2d(self) -> tuple[jax.Array, jax.Array]:
    return (
        self.basis_a[...].reshape(self.d_in, self.rank),
        self.basis_b[...].reshape(self.rank, self.d_out),
    )

  def adapter_out(self, x2: jax.Array) -> jax.Array:
    a, b = self._bases_2d()
    # `R B` is [r, d_out]; the factored apply never forms a [d_in, d_out].
    mid = self.lora_latent[...].astype(x2.dtype) @ b.astype(x2.dtype)
    return lora.lora_apply(x2, a, mid, self.scale)

  def delta_weight(self) -> jax.Array:
    a, b = self._bases_2d()
    latent = self.lora_latent[...].astype(jnp.float32)
    return lora.lora_delta(a, latent @ b.astype(jnp.float32), self.scale)


presets.register(
    "lora_xs",
    source="MohammadrezaBanaei/LoRA-XS@e50b1a82b5d7 "
    "(utils/initialization_utils.py, main_glue.py)",
    kwargs={"singular_values": "a", "r_init_std": 1e-5, "alpha": 16},
    reasons={
        "singular_values": (
            "the authors' code puts U_r Sigma_r in lora_A (input side); the "
            "default follows the paper's B = U_r Sigma_r."),
        "r_init_std": (
            "the authors draw R ~ N(0, 1e-5^2); the default 0 makes the "
            "adapter exactly the identity at init."),
        "alpha": (
            "main_glue.py's and main_commonsense_tuning.py's default "
            "lora_alpha=16; lowrank's alpha=None means alpha=r (scale 1, "
            "as the authors' math script)."),
    },
    unavailable=(
        "sklearn's randomized TruncatedSVD (n_iter=10, random_state=42); "
        "lowrank's SVD is exact.",),
)


class LoLDU(layers.LoRAWrapper):
  """LoLDU: `y = base(x) + ((x U_rᵀ) ⊙ (σ z - σ₀ D_r)) (P L_r)ᵀ`.

  Attributes:
    basis_a: `Basis`, `[*in_shape, r]`: `U_rᵀ` (unit upper rows).
    basis_b: `Basis`, `[r, *out_shape]`: `(P L_r)ᵀ`.
    diag_init: `Basis`, `[r]` float32: `D_r`, the initial diagonal.
    lora_diag: `nnx.LoRAParam`, `[r]` float32: `z`, initialised to `D_r`.
    lora_scale: `[1]` float32 `σ`, initialised to `alpha / r` (a
      `nnx.LoRAParam`, or `AdapterState` with `train_scale=False`).

  Differences from the official code (`SKDDJ/LoLDU@4fe87a05a668`,
  `minloldu/loldu.py`): the authors' `from_linear` defaults to
  `lora_alpha=1` and sets `σ₀ = lora_alpha / rank` (`loldu.py:59,256`), so
  `σ₀ = 1 / r`; lowrank's `alpha=None` gives `σ₀ = 1`. `σ₀` is the
  operating point of the trained scale: `z` gets `r` times larger steps
  here. Official: `alpha=1`, or `preset="paper"`. The residual is kept as
  a zero-at-init delta instead of being written into the base (the same
  function of `(z, σ)`, see the module docstring).
  """

  method = "loldu"
  option_names = ("train_scale",)

  def _create(self, key: jax.Array, dtype, train_scale: Any = True) -> None:
    del key
    _check_rank(self)
    if not isinstance(train_scale, bool):
      raise ValueError(f"train_scale must be a bool; got {train_scale!r}.")
    self.train_scale = train_scale
    r = self.rank
    # Torch layout [d_out, d_in] = P L U_full (LAPACK getrf, as torch.lu).
    perm, lower, upper = jax.scipy.linalg.lu(
        self.kernel_2d().astype(jnp.float32).T
    )
    diag = jnp.diagonal(upper)[:r]
    safe = jnp.where(diag == 0, 1.0, diag)
    unit_upper = upper[:r] / safe[:, None]
    pl = perm @ lower[:, :r]
    self.basis_a = self._basis(
        unit_upper.T.reshape(self.in_shape + (r,)).astype(dtype),
        self.in_dims + (None,),
    )
    self.basis_b = self._basis(
        pl.T.reshape((r,) + self.out_shape).astype(dtype),
        (None,) + self.out_dims,
    )
    self.diag_init = self._basis(diag, (None,))
    self.lora_diag = self._param(diag, (None,))
    # Shape [1], not []: safetensors files round-trip scalars as [1].
    sigma = jnp.full((1,), self.scale, jnp.float32)
    if train_scale:
      self.lora_scale = self._param(sigma, (None,))
    else:
      self.lora_scale = _state(self, sigma, (None,))

  def _coef(self) -> jax.Array:
    """`σ z - σ₀ D_r: [r]` float32 (exactly zero at initialisation)."""
    sigma0 = jnp.asarray(self.scale, jnp.float32)
    z = self.lora_diag[...].astype(jnp.float32)
    sigma = self.lora_scale[...].astype(jnp.float32)  # [1]
    return sigma * z - sigma0 * self.diag_init[...].astype(jnp.float32)

  def adapter_out(self, x2: jax.Array) -> jax.Array:
    a = self.basis_a[...].reshape(self.d_in, self.rank)
    b = self.basis_b[...].reshape(self.rank, self.d_out)
    mid = self._coef().astype(x2.dtype)[:, None] * b.astype(x2.dtype)
    return lora.lora_apply(x2, a, mid, 1.0)

  def delta_weight(self) -> jax.Array:
    a = self.basis_a[...].reshape(self.d_in, self.rank)
    b = self.basis_b[...].reshape(self.rank, self.d_out)
    return lora.lora_delta(a, self._coef()[:, None] * b.astype(jnp.float32),
                           1.0)


# ------------------------------------------------------------------ LoRA-SB
def _lora_sb(wrapper, data, key) -> None:
  del key
  if not isinstance(wrapper, LoRAXS):
    raise ValueError(
        f"init='lora_sb' needs method='lora_xs'; got {wrapper.method!r}."
    )
  lr, update, residual = 1.0, "sgd", False
  if isinstance(data, Mapping):
    unknown = sorted(set(data) - {"gradient", "lr", "update", "residual"})
    if unknown or "gradient" not in data:
      raise ValueError(
          "init='lora_sb' data must be a kernel-shaped gradient or a dict "
          "with 'gradient' and optional 'lr', 'update', 'residual'; got "
          f"keys {sorted(data)}."
      )
    grad = data["gradient"]
    lr = data.get("lr", lr)
    update = data.get("update", update)
    residual = data.get("residual", residual)
  elif data is None:
    raise ValueError(
        "init='lora_sb' needs init_data={path: first full fine-tuning "
        "gradient of the kernel} (see lora_xs.first_gradients)."
    )
  else:
    grad = data
  if update not in LORA_SB_UPDATES:
    raise ValueError(
        f"LoRA-SB update must be one of {LORA_SB_UPDATES}; got {update!r}."
    )
  if not isinstance(residual, bool):
    raise ValueError(f"LoRA-SB residual must be a bool; got {residual!r}.")
  lr = float(lr)
  if not (math.isfinite(lr) and lr > 0):
    raise ValueError(f"LoRA-SB lr must be > 0; got {lr}.")
  if not wrapper.scale > 0:
    raise ValueError(
        f"init='lora_sb' needs a positive scale alpha/r; got {wrapper.scale}."
    )
  g2 = svd_init.kernel_to_2d(wrapper, grad).astype(jnp.float32)
  step = -lr * (jnp.sign(g2) if update == "sign" else g2)
  if not bool(jnp.all(jnp.isfinite(step))):
    raise ValueError("LoRA-SB gradient has non-finite entries.")
  r = wrapper.rank
  p, sv, qt = jnp.linalg.svd(step, full_matrices=False)
  a = svd_init.assign(wrapper.basis_a, p[:, :r])
  b = svd_init.assign(wrapper.basis_b, qt[:r])
  latent = svd_init.assign(
      wrapper.lora_latent, jnp.diag(sv[:r]) / wrapper.scale
  )
  if residual:
    a = a.reshape(wrapper.d_in, r).astype(jnp.float32)
    b = b.reshape(r, wrapper.d_out).astype(jnp.float32)
    delta = a @ latent.astype(jnp.float32) @ b * wrapper.scale
    w = wrapper.kernel_2d().astype(jnp.float32)
    svd_init.set_kernel_2d(wrapper, w - delta)


def first_gradients(
    model: nnx.Module,
    loss_fn: Callable[[nnx.Module, Any], jax.Array],
    batch: Any,
    targets: str | Sequence[str],
) -> dict[str, jax.Array]:
  """Full fine-tuning gradients of the targeted kernels, for LoRA-SB.

  Differentiates `loss_fn(model, batch)` with respect to the `kernel` of
  each module that `inject(model, targets=targets)` would adapt (nothing
  else is differentiated). Call it on the model *before* `inject`. To
  average over several batches (the paper uses a few samples), sum the
  results yourself.

  Args:
    model: The base model (targets not yet wrapped).
    loss_fn: `loss_fn(model, batch) -> scalar`.
    batch: Passed to `loss_fn`.
    targets: As for `inject`.

  Returns:
    `{module path: dL/dkernel}`, each with its kernel's shape, ready for
    `inject(method="lora_xs", init="lora_sb", init_data=...)`.

  Raises:
    ValueError: On targets `inject` would reject.
  """
  paths = set(svd_init.matched_paths(model, targets))

  def is_target(path, value):
    return (
        isinstance(value, nnx.Param)
        and len(path) >= 2
        and path[-1] == "kernel"
        and ".".join(str(p) for p in path[:-1]) in paths
    )

  diff = nnx.DiffState(0, is_target)
  grads = nnx.grad(lambda m: loss_fn(m, batch), argnums=diff)(model)
  out = {}
  for path, value in nnx.to_flat_state(grads):
    name = ".".join(str(p) for p in path[:-1])
    if name in paths and path[-1] == "kernel":
      if isinstance(value, nnx.Variable):
        value = value.get_value()
      out[name] = value
  missing = sorted(paths - set(out))
  if missing:
    raise ValueError(f"No kernel gradient found for {missing}.")
  return out


def trainable_parameters(method: str, rank: int, train_scale: bool = True):
  """Trainable count per module: LoRA-XS `r²`, LoLDU `r + 1` (or `r`).

  Raises:
    ValueError: On an unknown method.
  """
  if method == "lora_xs":
    return rank * rank
  if method == "loldu":
    return rank + int(train_scale)
  raise ValueError(f"method must be 'lora_xs' or 'loldu'; got {method!r}.")


presets.register(
    "loldu",
    source="SKDDJ/LoLDU@4fe87a05a668 (minloldu/loldu.py)",
    kwargs={"alpha": 1},
    reasons={"alpha": (
        "the authors' from_linear default lora_alpha=1, so sigma_0 = 1/r "
        "(loldu.py:59,256); lowrank's alpha=None gives sigma_0 = 1.")},
)

layers.register("lora_xs", LoRAXS)
layers.register("loldu", LoLDU)
layers.register_init("lora_sb", _lora_sb)
