r"""Random-basis adapters: VeRA, NOLA and RandLoRA.

All three methods freeze random matrices (the *bases*) and train only small
scaling vectors or mixing coefficients. The bases are a pure function of an
int `seed` option and the layer's shapes, so they are regenerated, never
trained and never written to adapter checkpoints (they are `layers.Basis`
variables; `lowrank.adapters.save_adapters` records `options()`, which
holds the seed). A wrapper rebuilt from `options()` has bit-identical bases.

Kernel convention as in `lowrank.adapters.lora`: `y = x @ W`,
`W: [d_in, d_out]`, `s = alpha / r` (default `alpha = r`, so `s = 1`).

* **VeRA** (`method="vera"`): `ΔW = s · A diag(λ_d) B diag(λ_b)` with
  frozen `A: [d_in, r]`, `B: [r, d_out]` shared by every adapted layer and
  trainable `λ_d: [r]` (init `d_initial`, 0.1) and `λ_b: [d_out]` (init 0,
  so the adapter starts as the identity). `r + d_out` trainable values per
  layer. The bases are PEFT's: kaiming-uniform, `A ~ U(±sqrt(6 / max_in))`,
  `B ~ U(±sqrt(6 / r))`.
* **NOLA** (`method="nola"`): `ΔW = s · A B` with
  `A = A_0 + Σ_i α_i A_i` (`k_a` bases) and `B = Σ_j β_j B_j` (`k_b`
  bases), `A_i, B_j ~ U(±1 / sqrt(k))`, `A_0` a frozen kaiming-uniform
  matrix; trainable `α: [k_a]` and `β: [k_b]`, both 0 at init as in the
  authors' code (identity at init, and `β` gets a gradient through `A_0`).
  `k_a + k_b` trainable values per layer.
* **RandLoRA** (`method="randlora"`): the full-rank update
  `ΔW' = s · Σ_{i<n} B_iᵀ Λ_i A Γ_i: [d_large, d_small]` over
  `n = ceil(min(d_in, d_out) / r)` bases (PEFT's form: one shared
  `A: [r, d_small]` on the smaller side of the layer, `n` bases
  `B_i: [r, d_large]`), transposed into `[d_in, d_out]` as the layer needs;
  trainable `Λ_i` (diag `r`, init 0: identity at init) and `Γ_i` (diag
  `d_small`, init `1 / max(n, d_small)`).
  `n (r + d_small)` trainable values per layer. The bases are unit-variance
  uniform. The forward and backward never form `ΔW` (a custom VJP runs over
  chunks of the `n` bases). The scale is PEFT's `alpha / r`; the authors'
  code divides it by `sqrt(n)` (`sqrt_n_scaling=True`).

**Sharing across layers.** Row `j` of a basis (one input or output feature)
is drawn from its own key `fold_in(key, j)`, so the bases of a narrower
layer are exactly the leading rows of a wider layer's bases with the same
seed: every wrapper holds its own slice as a `Basis`, and the slices are the
bit-identical slices of one shared matrix (PEFT slices one shared buffer the
same way). Only VeRA's `A` has a scale that depends on the widest layer
(`max_in`): pass `max_in=` to `inject`, or call `share_bases(model)` after
injecting, to get PEFT's exact sharing. Holding slices costs one copy per
layer (PEFT keeps one buffer per model).

**NOLA's bases are large** (`k (d_in + d_out) r` values per layer), so NOLA
can generate them on the fly (`store_bases=False`): only the PRNG keys are
held, and a custom VJP regenerates `chunk` bases at a time in the forward and
again in the backward (the same bits as the stored ones). Measured on this
machine's CPU (2 shared cores under load, so times are rough): one
`768 x 768` layer, `r = 8`, `k_a = k_b = 1024`, 512 tokens, a jitted
value-and-grad step. Stored: 50.4 MB of bases held, 3.2 MB of compiled
temporaries, 17-19 ms. On the fly, `chunk=64`: 25 KB held (`A_0` and the
keys), 8.0 MB temporaries, 170-210 ms (threefry draws 12.6 M numbers twice
per step); `chunk=256`: 26.9 MB temporaries and no faster. Store the bases
when memory allows; generate them when it does not (e.g. many adapted layers
of a large model).

**RandLoRA's factored form** on a `768 -> 3072` layer (`r = 32`, `n = 24`,
512 tokens, same machine): 68 ms and 12.6 MB temporaries per value-and-grad
step, against 145 ms and 22.8 MB when `x @ ΔW` is formed. `chunk=4` gave
14.4 MB and 91 ms there: chunking only pays when `n r d_small ~ d_small²`
dominates the `[tokens, d]` activations.

**PEFT files.** Torch's generator cannot be reproduced in JAX, so bases from
`projection_prng_key` can never match PEFT's bit for bit. PEFT VeRA/RandLoRA
files written with `save_projection=True` (PEFT's default) store the shared
bases (`base_model.vera_A` / `vera_B`, `base_model.randlora_A` /
`randlora_B`); `VeRAWrapper.set_peft_bases` / `RandLoRAWrapper.set_peft_bases`
load them. Bases set from arrays (`set_bases`) are no longer derivable from
the seed, so they become `layers.AdapterState` (saved with the adapter) and
`options()["external_bases"]` becomes `True`.

References:
  Kopiczko et al. 2024, VeRA, https://arxiv.org/abs/2310.11454
  Koohpayegani et al. 2024, NOLA, https://arxiv.org/abs/2310.02556
  Albert et al. 2025, RandLoRA, https://arxiv.org/abs/2502.00987
"""

import functools
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float
import numpy as np

from lowrank import presets
from lowrank.adapters import injection
from lowrank.adapters import layers
from lowrank.adapters import lora

# Distinct streams under one seed, so the methods never share bits.
_VERA_A, _VERA_B = 1, 2
_NOLA_A0, _NOLA_A, _NOLA_B = 3, 4, 5
_RANDLORA_A, _RANDLORA_B = 6, 7


# ------------------------------------------------------------------ checks
def check_seed(seed: Any) -> None:
  """Raises ValueError unless `seed` is an int in `[0, 2**32)`.

  Larger ints would silently collide (`jax.random.key` keeps 32 bits).
  """
  if isinstance(seed, bool) or not isinstance(seed, int):
    raise ValueError(f"seed must be a Python int; got {seed!r}.")
  if not 0 <= seed < 2**32:
    raise ValueError(f"seed must be in [0, 2**32); got {seed}.")


def _check_positive_int(name: str, value: Any) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
    raise ValueError(f"{name} must be a positive Python int; got {value!r}.")


def _check_bool(name: str, value: Any) -> None:
  if not isinstance(value, bool):
    raise ValueError(f"{name} must be a bool; got {value!r}.")


def stream_key(seed: int, stream: int) -> jax.Array:
  """The PRNG key of one basis stream (`stream` tags the method and side)."""
  check_seed(seed)
  return jax.random.fold_in(jax.random.key(seed), stream)


# -------------------------------------------------------------- generation
# Jitted so that building many wrappers compiles one program per shape
# instead of dispatching the vmapped ops one by one.
@functools.partial(jax.jit, static_argnums=(1, 2))
def uniform_rows(
    key: jax.Array,
    num_rows: int,
    row_shape: tuple[int, ...],
    bound: jax.typing.ArrayLike,
) -> Float[Array, "rows ..."]:
  """`[num_rows, *row_shape]` float32, uniform in `[-bound, bound)`.

  Row `j` is drawn from `fold_in(key, j)` alone, so the first `m` rows are
  the same whatever `num_rows` is: a narrower layer's basis is exactly the
  leading slice of a wider one's.
  """
  def row(j):
    return jax.random.uniform(
        jax.random.fold_in(key, j), row_shape, jnp.float32, -bound, bound
    )

  return jax.vmap(row)(jnp.arange(num_rows, dtype=jnp.int32))


def vera_bases(
    seed: int, d_in: int, d_out: int, rank: int, max_in: int | None = None
) -> tuple[Float[Array, "d_in r"], Float[Array, "r d_out"]]:
  """VeRA's frozen `(A: [d_in, r], B: [r, d_out])` for one layer, float32.

  The slices `[:d_in]` / `[:, :d_out]` of the model-wide shared bases: PEFT's
  `kaiming_init` (`U(±sqrt(6 / fan_in))`) of `vera_A: [r, max_in]` and
  `vera_B: [max_out, r]`, transposed to our layout.

  Args:
    seed: The shared seed (PEFT's `projection_prng_key`).
    d_in: This layer's input size.
    d_out: This layer's output size.
    rank: `r`.
    max_in: The widest adapted input size (fixes `A`'s scale); default
      `d_in`.

  Returns:
    `(A, B)`.

  Raises:
    ValueError: On a bad seed or `max_in < d_in`.
  """
  max_in = d_in if max_in is None else max_in
  if max_in < d_in:
    raise ValueError(f"max_in must be >= d_in = {d_in}; got {max_in}.")
  a = uniform_rows(
      stream_key(seed, _VERA_A), d_in, (rank,), math.sqrt(6.0 / max_in)
  )
  b = uniform_rows(
      stream_key(seed, _VERA_B), d_out, (rank,), math.sqrt(6.0 / rank)
  )
  return a, b.T


def nola_basis(
    key: jax.Array, index: jax.Array | int, shape: tuple[int, ...], num: int
) -> Float[Array, "..."]:
  """NOLA basis `index` of `num`: `U(±1/sqrt(num))` of `shape`, float32."""
  bound = 1.0 / math.sqrt(num)
  return jax.random.uniform(
      jax.random.fold_in(key, index), shape, jnp.float32, -bound, bound
  )


@functools.partial(jax.jit, static_argnums=(1, 2))
def nola_bases(
    key: jax.Array, num: int, shape: tuple[int, ...]
) -> Float[Array, "num ..."]:
  """All `num` NOLA bases `[num, *shape]` (the same bits as `nola_basis`)."""
  return jax.vmap(lambda i: nola_basis(key, i, shape, num))(
      jnp.arange(num, dtype=jnp.int32)
  )


def randlora_num_bases(d_in: int, d_out: int, rank: int) -> int:
  """`n = ceil(min(d_in, d_out) / r)`: enough rank-`r` bases for full rank."""
  return -(-min(d_in, d_out) // rank)


def randlora_bases(
    seed: int, d_small: int, d_large: int, rank: int, num_bases: int
) -> tuple[Float[Array, "r d_small"], Float[Array, "n r d_large"]]:
  """RandLoRA's frozen shared `A: [r, d_small]` and `B: [n, r, d_large]`.

  Unit-variance uniform (`U(±sqrt(3))`; PEFT draws kaiming-uniform and
  divides by the sample standard deviation). Entry `A[:, j]` depends only on
  `(seed, j)` and `B[i, :, l]` only on `(seed, i, l)`, so every layer's
  bases are slices of one shared set.
  """
  bound = math.sqrt(3.0)
  a = uniform_rows(stream_key(seed, _RANDLORA_A), d_small, (rank,), bound)
  key_b = stream_key(seed, _RANDLORA_B)
  b = jax.vmap(
      lambda i: uniform_rows(
          jax.random.fold_in(key_b, i), d_large, (rank,), bound
      ).T
  )(jnp.arange(num_bases, dtype=jnp.int32))
  return a.T, b


# -------------------------------------------------------------------- VeRA
def vera_apply(
    x: Float[Array, "*batch d_in"],
    a: Float[Array, "d_in r"],
    b: Float[Array, "r d_out"],
    lambda_d: Float[Array, " r"],
    lambda_b: Float[Array, " d_out"],
    scale: float | int,
) -> Float[Array, "*batch d_out"]:
  """`s · ((x A) ⊙ λ_d) B ⊙ λ_b`, never forming `A B` (nor in backward).

  The diagonals are folded into the factors (`[d_in, r]`, `[r, d_out]`
  elementwise products) and the product runs through `lora.lora_apply`.
  """
  a_eff, b_eff = _vera_factors(a, b, lambda_d, lambda_b, x.dtype)
  return lora.lora_apply(x, a_eff, b_eff, scale)


def vera_delta(
    a: Float[Array, "d_in r"],
    b: Float[Array, "r d_out"],
    lambda_d: Float[Array, " r"],
    lambda_b: Float[Array, " d_out"],
    scale: float | int,
) -> Float[Array, "d_in d_out"]:
  """The dense VeRA update `s · A diag(λ_d) B diag(λ_b)` in float32."""
  a_eff, b_eff = _vera_factors(a, b, lambda_d, lambda_b, jnp.float32)
  return lora.lora_delta(a_eff, b_eff, scale)


def _vera_factors(a, b, lambda_d, lambda_b, dtype):
  """`(A diag(λ_d), B diag(λ_b))` in `dtype`: VeRA as a LoRA pair."""
  a_eff = a.astype(dtype) * lambda_d.astype(dtype)[None, :]
  b_eff = b.astype(dtype) * lambda_b.astype(dtype)[None, :]
  return a_eff, b_eff


# -------------------------------------------------------------------- NOLA
def nola_combine(
    coef: Float[Array, " k"], bases: Float[Array, "k ..."]
) -> Float[Array, "..."]:
  """`Σ_i coef_i · bases_i` in float32 (stored bases).

  A plain `[k] @ [k, n]` product: its transpose (the coefficient gradient) is
  then another matrix-vector product; the `einsum` form made XLA:CPU copy the
  whole `[k, ...]` basis tensor in the backward.
  """
  k = bases.shape[0]
  out = jnp.matmul(coef, bases.reshape(k, -1),
                   preferred_element_type=jnp.float32)
  return out.reshape(bases.shape[1:])


def nola_combine_generated(
    coef: Float[Array, " k"],
    key: jax.Array,
    shape: tuple[int, ...],
    chunk: Any,
) -> Float[Array, "..."]:
  """`Σ_i coef_i · nola_basis(key, i)` without holding the bases.

  Generates `chunk` bases at a time (a scan) in the forward, and again in the
  backward to form `∂/∂coef_i = <basis_i, g>`: peak memory is
  `chunk · prod(shape)` values instead of `k · prod(shape)`.

  Args:
    coef: The `k` mixing coefficients.
    key: A typed PRNG key (see `nola_basis`).
    shape: One basis' shape (static).
    chunk: Bases generated per scan step (static, positive).

  Returns:
    The combination, float32, of `shape`.
  """
  _check_positive_int("chunk", chunk)
  return _generated_jit(coef, jax.random.key_data(key), tuple(shape), chunk)


def _chunk_bases(key_data, step, shape, chunk, num):
  key = jax.random.wrap_key_data(key_data)
  idx = step * chunk + jnp.arange(chunk, dtype=jnp.int32)
  return jax.vmap(lambda i: nola_basis(key, i, shape, num))(idx)


def _padded_chunks(coef, chunk):
  num = coef.shape[0]
  steps = -(-num // chunk)
  padded = jnp.pad(coef, (0, steps * chunk - num))
  return padded.reshape(steps, chunk), jnp.arange(steps, dtype=jnp.int32)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _generated(coef, key_data, shape, chunk):
  return _generated_fwd(coef, key_data, shape, chunk)[0]


def _generated_fwd(coef, key_data, shape, chunk):
  num = coef.shape[0]
  coefs, steps = _padded_chunks(coef, chunk)

  def body(acc, xs):
    c, step = xs
    bases = _chunk_bases(key_data, step, shape, chunk, num)
    return acc + nola_combine(c.astype(jnp.float32), bases), None

  out, _ = jax.lax.scan(body, jnp.zeros(shape, jnp.float32), (coefs, steps))
  return out, (coef, key_data)


def _generated_bwd(shape, chunk, residuals, g):
  coef, key_data = residuals
  num = coef.shape[0]
  coefs, steps = _padded_chunks(coef, chunk)
  g = g.astype(jnp.float32)

  def body(carry, xs):
    _, step = xs
    bases = _chunk_bases(key_data, step, shape, chunk, num)
    return carry, bases.reshape(chunk, -1) @ g.reshape(-1)

  _, dcoef = jax.lax.scan(body, None, (coefs, steps))
  # The key gets no cotangent (it is integer data).
  return dcoef.reshape(-1)[:num].astype(coef.dtype), None


_generated.defvjp(_generated_fwd, _generated_bwd)
# Eager calls (building, merging, tests) would otherwise re-trace the scans.
_generated_jit = jax.jit(_generated, static_argnums=(2, 3))


# ---------------------------------------------------------------- RandLoRA
def randlora_apply(
    x: Float[Array, "*batch d_in"],
    a: Float[Array, "r d_small"],
    b: Float[Array, "n r d_large"],
    lam: Float[Array, "n r"],
    gam: Float[Array, "n d_small"],
    scale: float | int,
    *,
    small_is_in: bool,
    chunk: Any = None,
) -> Float[Array, "*batch d_out"]:
  """`s · x ΔW` for RandLoRA, never forming `ΔW` (forward or backward).

  With `Ã_i = Λ_i A Γ_i: [r, d_small]` (the `i`-th scaled copy of the shared
  `A`), `ΔW = Σ_i Ã_iᵀ B_i` if the input side is the small one, else
  `Σ_i B_iᵀ Ã_i`. A custom VJP loops over chunks of `chunk` bases (default:
  all `n` in one batched einsum); per step it holds `[chunk, r, d_small]`
  scaled bases and `[tokens, chunk, r]` activations, and it returns no
  gradient for the frozen `a`, `b`.

  Args:
    x: Input, `d_in = d_small` if `small_is_in` else `d_large`.
    a: Shared basis `A`.
    b: The `n` bases `B_i`.
    lam: `Λ` diagonals, one row per basis.
    gam: `Γ` diagonals, one row per basis.
    scale: `s`.
    small_is_in: Whether `d_in <= d_out` (then `Γ` scales the input dims).
    chunk: Bases per scan step (static); `None` = all at once.

  Returns:
    `[*batch, d_out]` in `x.dtype`.

  Raises:
    ValueError: On a non-positive `chunk`.
  """
  n = lam.shape[0]
  chunk = n if chunk is None else chunk
  _check_positive_int("chunk", chunk)
  dt = x.dtype
  batch = x.shape[:-1]
  y = _randlora_jit(
      x.reshape(-1, x.shape[-1]),
      a.astype(dt),
      b.astype(dt),
      lam.astype(dt),
      gam.astype(dt),
      bool(small_is_in),
      min(chunk, n),
  )
  return (y * jnp.asarray(scale, dt)).reshape(batch + (y.shape[-1],))


def randlora_delta(
    a: Float[Array, "r d_small"],
    b: Float[Array, "n r d_large"],
    lam: Float[Array, "n r"],
    gam: Float[Array, "n d_small"],
    scale: float | int,
    *,
    small_is_in: bool,
) -> Float[Array, "d_in d_out"]:
  """The dense RandLoRA update `[d_in, d_out]` in float32 (merging only)."""
  f32 = jnp.float32
  scaled = _scaled_a(a.astype(f32), lam.astype(f32), gam.astype(f32))
  d = jnp.einsum("nrs,nrl->sl", scaled, b.astype(f32)) * scale
  return d if small_is_in else d.T


def _scaled_a(a, lam, gam):
  """`Λ_i A Γ_i` for each basis: `[c, r, d_small]`."""
  return lam[:, :, None] * a[None, :, :] * gam[:, None, :]


def _over_chunks(fn, carry, xs, chunk):
  """`lax.scan` of `fn` over chunks of `xs`' leading axis, plus a remainder.

  Returns the final carry and `fn`'s per-chunk outputs concatenated back
  along the leading axis.
  """
  n = xs[0].shape[0]
  full = n // chunk
  outs = []
  if full == 1:
    carry, out = fn(carry, tuple(x[:chunk] for x in xs))
    outs.append(out)
  elif full > 1:
    head = tuple(
        x[: full * chunk].reshape((full, chunk) + x.shape[1:]) for x in xs
    )
    carry, out = jax.lax.scan(fn, carry, head)
    outs.append(jax.tree.map(lambda o: o.reshape((-1,) + o.shape[2:]), out))
  if n % chunk:
    carry, out = fn(carry, tuple(x[full * chunk :] for x in xs))
    outs.append(out)
  return carry, jax.tree.map(lambda *o: jnp.concatenate(o), *outs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _randlora(x, a, b, lam, gam, small_is_in, chunk):
  d_out = b.shape[-1] if small_is_in else a.shape[-1]

  def body(y, xs):
    b_c, lam_c, gam_c = xs
    scaled = _scaled_a(a, lam_c, gam_c)
    if small_is_in:
      h = jnp.einsum("td,crd->tcr", x, scaled)
      return y + jnp.einsum("tcr,crl->tl", h, b_c), None
    h = jnp.einsum("tl,crl->tcr", x, b_c)
    return y + jnp.einsum("tcr,crs->ts", h, scaled), None

  y0 = jnp.zeros((x.shape[0], d_out), x.dtype)
  y, _ = _over_chunks(body, y0, (b, lam, gam), chunk)
  return y


def _randlora_fwd(x, a, b, lam, gam, small_is_in, chunk):
  return _randlora(x, a, b, lam, gam, small_is_in, chunk), (x, a, b, lam, gam)


def _randlora_bwd(small_is_in, chunk, residuals, g):
  x, a, b, lam, gam = residuals

  def body(dx, xs):
    b_c, lam_c, gam_c = xs
    scaled = _scaled_a(a, lam_c, gam_c)
    if small_is_in:
      gh = jnp.einsum("tl,crl->tcr", g, b_c)
      dx = dx + jnp.einsum("tcr,crd->td", gh, scaled)
      m = jnp.einsum("tcr,td->crd", gh, x)  # ∂/∂(scaled A)
    else:
      gs = jnp.einsum("ts,crs->tcr", g, scaled)
      dx = dx + jnp.einsum("tcr,crl->tl", gs, b_c)
      h = jnp.einsum("tl,crl->tcr", x, b_c)
      m = jnp.einsum("tcr,ts->crs", h, g)
    dlam = jnp.einsum("crd,rd,cd->cr", m, a, gam_c)
    dgam = jnp.einsum("crd,rd,cr->cd", m, a, lam_c)
    return dx, (dlam, dgam)

  dx, (dlam, dgam) = _over_chunks(body, jnp.zeros_like(x), (b, lam, gam),
                                  chunk)
  return dx, None, None, dlam, dgam


_randlora.defvjp(_randlora_fwd, _randlora_bwd)
_randlora_jit = jax.jit(_randlora, static_argnums=(5, 6))


# ---------------------------------------------------------------- wrappers
def _place(value: jax.Array, like: jax.Array) -> jax.Array:
  value = value.astype(like.dtype)
  sh = getattr(like, "sharding", None)
  return jax.device_put(value, sh) if sh is not None else value


class RandomBasisWrapper(layers.LoRAWrapper):
  """Common machinery of the random-basis adapters (not registered).

  Subclasses list their basis variables in `_basis_views()` as
  `{name: 2-D view shape}` and create them with `_basis_var`.

  Attributes:
    seed: The int the bases are regenerated from.
    external_bases: Whether the bases were set from arrays (`set_bases`);
      then they are `layers.AdapterState` (saved with the adapter) instead
      of `layers.Basis`.
  """

  method = "random_basis"

  def _common_options(self, seed, external_bases) -> None:
    check_seed(seed)
    _check_bool("external_bases", external_bases)
    if self.init != "kaiming":
      raise ValueError(
          f"Method {self.method!r} has its own initialisation; init must be "
          f"'kaiming' (the default); got {self.init!r}."
      )
    self.seed = seed
    self.external_bases = external_bases

  def _basis_var(self, value: jax.Array, dims: tuple[int | None, ...]):
    var = self._basis(value, dims)
    if self.external_bases:
      # Bases that came from files are not derivable from the seed: keep
      # them in the adapter file (the rebuilt wrapper gets overwritten).
      return layers.AdapterState(var.get_value(), **var.get_metadata())
    return var

  def _basis_views(self) -> dict[str, tuple[int, ...]]:
    raise NotImplementedError

  def bases(self) -> dict[str, jax.Array]:
    """The frozen bases as their 2-D views (see `set_bases`)."""
    return {
        name: getattr(self, name)[...].reshape(shape)
        for name, shape in self._basis_views().items()
    }

  def set_bases(self, **arrays: Any) -> None:
    """Replaces bases by given arrays (e.g. a PEFT file's projections).

    Each keyword is a name from `bases()` with an array of the same 2-D view
    shape. All basis variables (also those not given, which keep their
    values) become `layers.AdapterState`, so adapter files keep them, and
    `external_bases` becomes `True` (a wrapper rebuilt from `options()` then
    expects all of them in the file).

    Raises:
      ValueError: On an unknown name or a wrong shape.
    """
    views = self._basis_views()
    unknown = sorted(set(arrays) - set(views))
    if unknown:
      raise ValueError(
          f"Unknown basis name(s) {unknown} for method {self.method!r}; it "
          f"has {sorted(views) or 'none stored'}."
      )
    new = {}
    for name in views:
      old = getattr(self, name).get_value()
      if name not in arrays:
        new[name] = old
        continue
      value = jnp.asarray(arrays[name])
      if tuple(value.shape) != views[name]:
        raise ValueError(
            f"Basis {name!r}: expected shape {views[name]}; got "
            f"{tuple(value.shape)}."
        )
      new[name] = _place(value.reshape(old.shape), old)
    for name, value in new.items():
      old = getattr(self, name)
      setattr(self, name, layers.AdapterState(value, **old.get_metadata()))
    self.external_bases = True

  def peft_factors(self):
    raise ValueError(
        f"Method {self.method!r} has no LoRA factors (lora_A / lora_B); the "
        "VeRA and RandLoRA wrappers have peft_tensors() instead."
    )

  def set_peft_factors(self, a2, b2):
    del a2, b2
    raise ValueError(
        f"Method {self.method!r} has no LoRA factors (lora_A / lora_B); the "
        "VeRA and RandLoRA wrappers have set_peft_tensors() instead."
    )

  def _set_param(self, name: str, value: Any) -> None:
    var = getattr(self, name)
    old = var.get_value()
    value = jnp.asarray(value)
    if value.size != old.size:
      raise ValueError(
          f"{name}: expected {old.size} values (shape {old.shape}); got shape "
          f"{tuple(value.shape)}."
      )
    var.set_value(_place(value.reshape(old.shape), old))


class VeRAWrapper(RandomBasisWrapper):
  """VeRA around a linear kind: `base(x) + s · ((x A) ⊙ λ_d) B ⊙ λ_b`.

  Options (`inject(..., method="vera", **options)`):
    seed: Basis seed shared by all layers (PEFT's `projection_prng_key`,
      default 0).
    d_initial: Initial `λ_d` (default 0.1, PEFT's and the paper's).
    max_in: Widest adapted input size, which fixes `A`'s kaiming scale as in
      PEFT (default: this layer's `d_in`; see `share_bases`).
    external_bases: Set by `set_bases`; leave it `False`.

  Differences from the official code (Hugging Face PEFT's VeRA, the
  reference implementation, `huggingface/peft@5d602fdbff04`,
  `src/peft/tuners/vera/`): PEFT draws one `vera_A` for the model with the
  kaiming bound of the widest adapted input and every layer slices it; by
  default each layer here uses its own `d_in` for the bound
  (`sqrt(max_in / d_in)` times larger `A` on narrower layers). Official:
  `max_in=<widest adapted d_in>` in `inject`, or `share_bases(model)`
  after it (the preset cannot know the widest layer). PEFT VeRA has no
  `alpha`: leave `alpha=None` (scale 1).

  Attributes:
    basis_a: `Basis` `[*in_shape, r]`.
    basis_b: `Basis` `[r, *out_shape]`.
    lambda_d: `nnx.LoRAParam` `[r]`.
    lambda_b: `nnx.LoRAParam` `[*out_shape]`.
  """

  method = "vera"
  option_names = ("seed", "d_initial", "max_in", "external_bases")

  def _create(
      self,
      key,
      dtype,
      *,
      seed: Any = 0,
      d_initial: Any = 0.1,
      max_in: Any = None,
      external_bases: Any = False,
  ) -> None:
    del key  # Everything here is determined by the seed.
    self._common_options(seed, external_bases)
    if isinstance(d_initial, bool) or not isinstance(d_initial, (int, float)):
      raise ValueError(f"d_initial must be a number; got {d_initial!r}.")
    if not math.isfinite(d_initial):
      raise ValueError(f"d_initial must be finite; got {d_initial}.")
    if max_in is not None:
      _check_positive_int("max_in", max_in)
      if max_in < self.d_in:
        raise ValueError(
            f"max_in must be >= this layer's d_in = {self.d_in}; got "
            f"{max_in}."
        )
    self.d_initial = float(d_initial)
    self.max_in = self.d_in if max_in is None else max_in
    r = self.rank
    self._make_bases(dtype)
    self.lambda_d = self._param(jnp.full((r,), self.d_initial, dtype), (None,))
    self.lambda_b = self._param(jnp.zeros(self.out_shape, dtype),
                                self.out_dims)

  def _make_bases(self, dtype) -> None:
    a, b = vera_bases(self.seed, self.d_in, self.d_out, self.rank,
                      self.max_in)
    r = self.rank
    self.basis_a = self._basis_var(
        a.astype(dtype).reshape(self.in_shape + (r,)), self.in_dims + (None,)
    )
    self.basis_b = self._basis_var(
        b.astype(dtype).reshape((r,) + self.out_shape),
        (None,) + self.out_dims,
    )

  def _basis_views(self):
    return {"basis_a": (self.d_in, self.rank),
            "basis_b": (self.rank, self.d_out)}

  def _parts(self):
    return (
        self.basis_a[...].reshape(self.d_in, self.rank),
        self.basis_b[...].reshape(self.rank, self.d_out),
        self.lambda_d[...],
        self.lambda_b[...].reshape(self.d_out),
    )

  def adapter_out(self, x2: jax.Array) -> jax.Array:
    return vera_apply(x2, *self._parts(), self.scale)

  def delta_weight(self) -> jax.Array:
    return vera_delta(*self._parts(), self.scale)

  def set_max_in(self, max_in: Any) -> None:
    """Regenerates `A` with the kaiming scale of a `max_in`-wide layer.

    Raises:
      ValueError: If `max_in < d_in` or the bases were set from arrays.
    """
    if self.external_bases:
      raise ValueError("The bases were set from arrays (set_bases); they "
                       "cannot be regenerated.")
    _check_positive_int("max_in", max_in)
    if max_in < self.d_in:
      raise ValueError(
          f"max_in must be >= this layer's d_in = {self.d_in}; got {max_in}."
      )
    self.max_in = max_in
    a, _ = vera_bases(self.seed, self.d_in, self.d_out, self.rank, max_in)
    old = self.basis_a.get_value()
    self.basis_a.set_value(_place(a.reshape(old.shape), old))

  # PEFT: `base_model.model.<path>.vera_lambda_d` `[r]`,
  # `.vera_lambda_b` `[d_out]`, shared `base_model.vera_A` `[r, max_in]` and
  # `base_model.vera_B` `[max_out, r]` (the last two only with
  # `save_projection=True`).
  def peft_tensors(self) -> dict[str, jax.Array]:
    """`{"vera_lambda_d": [r], "vera_lambda_b": [d_out]}` as PEFT names them."""
    return {"vera_lambda_d": self.lambda_d[...],
            "vera_lambda_b": self.lambda_b[...].reshape(self.d_out)}

  def set_peft_tensors(self, vera_lambda_d: Any, vera_lambda_b: Any) -> None:
    """Inverse of `peft_tensors`."""
    self._set_param("lambda_d", vera_lambda_d)
    self._set_param("lambda_b", vera_lambda_b)

  def set_peft_bases(self, vera_a: Any, vera_b: Any) -> None:
    """Sets the bases from PEFT's shared `vera_A`, `vera_B`.

    Args:
      vera_a: PEFT's `base_model.vera_A`, `[r, max_in]`; this layer takes
        the leading `d_in` columns.
      vera_b: PEFT's `base_model.vera_B`, `[max_out, r]`; this layer takes
        the leading `d_out` rows.

    Raises:
      ValueError: If the shared bases are too small for this layer.
    """
    pa, pb = jnp.asarray(vera_a), jnp.asarray(vera_b)
    r = self.rank
    if (pa.ndim != 2 or pa.shape[0] != r or pa.shape[1] < self.d_in
        or pb.ndim != 2 or pb.shape[1] != r or pb.shape[0] < self.d_out):
      raise ValueError(
          f"PEFT VeRA bases must be vera_A: [{r}, >={self.d_in}] and vera_B: "
          f"[>={self.d_out}, {r}]; got {tuple(pa.shape)} and "
          f"{tuple(pb.shape)}."
      )
    self.set_bases(basis_a=pa[:, : self.d_in].T, basis_b=pb[: self.d_out].T)


presets.register(
    "vera",
    source="huggingface/peft@5d602fdbff04 (src/peft/tuners/vera/)",
    unavailable=(
        "PEFT's one model-wide A scale (the widest adapted input's kaiming "
        "bound) is not a fixed argument: pass max_in=<widest d_in> or call "
        "random_basis.share_bases(model) after inject.",),
)


def share_bases(model: nnx.Module) -> int:
  """Gives every VeRA adapter in `model` PEFT's shared `A` scale.

  PEFT draws one `vera_A: [r, max_in]` for the whole model, with the kaiming
  scale of the widest adapted input; each layer slices it. Our wrappers hold
  their slices, so this sets each one's `max_in` to the model-wide maximum
  (recorded in `options()`), after which all `A` slices are bit-identical
  slices of one matrix. Layers' `B` and the other methods' bases need
  nothing.

  Returns:
    The `max_in` used.

  Raises:
    ValueError: If `model` has no VeRA adapter or they use different seeds.
  """
  mods = [m for m in injection.adapter_modules(model).values()
          if isinstance(m, VeRAWrapper)]
  if not mods:
    raise ValueError("share_bases: the model has no VeRA adapter.")
  seeds = sorted({m.seed for m in mods})
  if len(seeds) > 1:
    raise ValueError(f"VeRA adapters use different seeds {seeds}; shared "
                     "bases need one seed.")
  max_in = max(m.d_in for m in mods)
  for m in mods:
    m.set_max_in(max_in)
  return max_in


class NOLAWrapper(RandomBasisWrapper):
  """NOLA around a linear kind: `base(x) + s · (x A) B`, A, B from bases.

  `A = A_0 + Σ_i α_i A_i`, `B = Σ_j β_j B_j`.

  Options (`inject(..., method="nola", **options)`):
    seed: Basis seed (default 0; layers of one shape then share bases and
      differ by their coefficients).
    num_bases_a: `k_a` (default 1024, the paper's GPT-2 setting).
    num_bases_b: `k_b` (default 1024).
    store_bases: Hold the bases as `Basis` (fast, `k r (d_in + d_out)`
      values per layer) or regenerate them in every call (default True).
      With `False`, `set_bases` can only replace `basis_a0`.
    chunk: Bases generated per step when `store_bases=False` (default 64).
    external_bases: Set by `set_bases`; leave it `False`.

  Differences from the official code (`UCDvision/NOLA@03c7027c244b`,
  `gpt/src/model_nola.py`, `gpt/src/gpt2_ft.py`):

    * Bases per layer. Every `NOLALinear` there draws its own random seed
      (`model_nola.py:134`), so each layer (and its `A` and `B`) has
      independent bases and its own `A_0`; here one `seed` serves every
      layer, and layers of one shape share `A_0` and the bases and differ
      only by their coefficients (reproducible from one int). Not available
      from one `inject` call: inject each layer separately with its own
      `seed` to get independent bases.
    * Default scale. `gpt2_ft.py` defaults to `--lora_alpha 1.0` (scale
      `1 / r`, with `k = 1024` as here); lowrank's `alpha=None` gives 1.
      Official default: `alpha=1.0` or `preset="paper"`. The released
      GPT-2 scripts use `k = 512, alpha = 8, r = 8` (medium) and
      `k = 256, alpha = 2, r = 8` (large): pass `num_bases_a`,
      `num_bases_b` and `alpha` for those.

  Attributes:
    basis_a0: `Basis` `[*in_shape, r]` (frozen offset of `A`).
    basis_a: `Basis` `[k_a, *in_shape, r]` (if `store_bases`).
    basis_b: `Basis` `[k_b, r, *out_shape]` (if `store_bases`).
    basis_keys: `Basis` key data of the two streams (if not `store_bases`).
    coef_a: `nnx.LoRAParam` `[k_a]`.
    coef_b: `nnx.LoRAParam` `[k_b]`.
  """

  method = "nola"
  option_names = ("seed", "num_bases_a", "num_bases_b", "store_bases",
                  "chunk", "external_bases")

  def _create(
      self,
      key,
      dtype,
      *,
      seed: Any = 0,
      num_bases_a: Any = 1024,
      num_bases_b: Any = 1024,
      store_bases: Any = True,
      chunk: Any = 64,
      external_bases: Any = False,
  ) -> None:
    del key
    self._common_options(seed, external_bases)
    _check_positive_int("num_bases_a", num_bases_a)
    _check_positive_int("num_bases_b", num_bases_b)
    _check_bool("store_bases", store_bases)
    _check_positive_int("chunk", chunk)
    self.num_bases_a, self.num_bases_b = num_bases_a, num_bases_b
    self.store_bases, self.chunk = store_bases, chunk
    r, d_in = self.rank, self.d_in
    a0 = uniform_rows(stream_key(seed, _NOLA_A0), d_in, (r,),
                      1.0 / math.sqrt(d_in))
    self.basis_a0 = self._basis_var(
        a0.astype(dtype).reshape(self.in_shape + (r,)), self.in_dims + (None,)
    )
    key_a, key_b = stream_key(seed, _NOLA_A), stream_key(seed, _NOLA_B)
    if store_bases:
      a = nola_bases(key_a, num_bases_a, (d_in, r))
      b = nola_bases(key_b, num_bases_b, (r, self.d_out))
      self.basis_a = self._basis_var(
          a.astype(dtype).reshape((num_bases_a,) + self.in_shape + (r,)),
          (None,) + self.in_dims + (None,),
      )
      self.basis_b = self._basis_var(
          b.astype(dtype).reshape((num_bases_b, r) + self.out_shape),
          (None, None) + self.out_dims,
      )
    else:
      # A runtime input, not a constant XLA could fold into a huge literal.
      self.basis_keys = layers.Basis(
          jnp.stack([jax.random.key_data(key_a), jax.random.key_data(key_b)])
      )
    self.coef_a = self._param(jnp.zeros((num_bases_a,), dtype), (None,))
    self.coef_b = self._param(jnp.zeros((num_bases_b,), dtype), (None,))

  def _basis_views(self):
    r, k_a, k_b = self.rank, self.num_bases_a, self.num_bases_b
    views = {"basis_a0": (self.d_in, r)}
    if self.store_bases:
      views.update(basis_a=(k_a, self.d_in, r), basis_b=(k_b, r, self.d_out))
    return views

  def factors(self) -> tuple[jax.Array, jax.Array]:
    """`(A: [d_in, r], B: [r, d_out])` in float32, from the coefficients."""
    r = self.rank
    a0 = self.basis_a0[...].reshape(self.d_in, r).astype(jnp.float32)
    if self.store_bases:
      a = nola_combine(self.coef_a[...], self.basis_a[...].reshape(
          self.num_bases_a, self.d_in, r))
      b = nola_combine(self.coef_b[...], self.basis_b[...].reshape(
          self.num_bases_b, r, self.d_out))
    else:
      keys = self.basis_keys[...]
      a = _generated_jit(self.coef_a[...], keys[0], (self.d_in, r),
                         self.chunk)
      b = _generated_jit(self.coef_b[...], keys[1], (r, self.d_out),
                         self.chunk)
    return a0 + a, b

  def adapter_out(self, x2: jax.Array) -> jax.Array:
    a, b = self.factors()
    return lora.lora_apply(x2, a, b, self.scale)

  def delta_weight(self) -> jax.Array:
    return lora.lora_delta(*self.factors(), self.scale)


presets.register(
    "nola",
    source="UCDvision/NOLA@03c7027c244b (gpt/src/model_nola.py, "
    "gpt/src/gpt2_ft.py)",
    kwargs={"alpha": 1.0},
    reasons={"alpha": (
        "gpt2_ft.py's default --lora_alpha 1.0 (scale 1/r); lowrank's "
        "alpha=None gives scale 1. The released GPT-2 scripts use k=512, "
        "alpha=8 (medium) and k=256, alpha=2 (large), both at r=8.")},
    unavailable=(
        "independent bases (and A_0) per layer, each NOLALinear drawing its "
        "own seed: one inject call shares one seed; inject layers "
        "separately with distinct seeds.",),
)


class RandLoRAWrapper(RandomBasisWrapper):
  """RandLoRA around a linear kind: a full-rank `ΔW` from `n` random bases.

  Options (`inject(..., method="randlora", **options)`):
    seed: Basis seed shared by all layers (PEFT's `projection_prng_key`,
      default 0).
    chunk: Bases per step of the factored forward/backward (default `None`:
      all `n` in one batched einsum; smaller bounds temporaries at
      `chunk · r · d_small`).
    sqrt_n_scaling: Scale `alpha / r / sqrt(n)`, as the authors' code
      (default `False`: `alpha / r`, as Hugging Face PEFT).
    external_bases: Set by `set_bases`; leave it `False`.

  PEFT's `randlora_alpha` is our `alpha` (scale `alpha / r`; PEFT's default
  is 640 with `r = 32`, i.e. `s = 20`).

  Differences from the official code (the authors' PEFT fork,
  `PaulAlbert31/RandLoRA@4ac565ecd611`,
  `peft/src/peft/tuners/randlora/layer.py`, `config.py`, `model.py`):

    * Scale. The authors' code scales by `randlora_alpha / r / sqrt(n)`
      (`layer.py:119`); Hugging Face PEFT's RandLoRA, whose files and
      `randlora_alpha` values users load, by `randlora_alpha / r`
      (`huggingface/peft@5d602fdbff04`, `randlora/layer.py:128`), which is
      lowrank's default: `sqrt(n)` times larger at the same `alpha`.
      Official: `sqrt_n_scaling=True`.
    * Default `alpha`. The authors' `RandLoraConfig` defaults to
      `randlora_alpha=64` with `r=32` (and their GLUE script sets
      `2 * rank`); lowrank's `alpha=None` means `alpha = r`. Official:
      `preset="paper"` (`sqrt_n_scaling=True, alpha=64`; at other ranks
      pass `alpha=2 * rank` as their scripts do).
    * Sparse and very sparse ternary bases (`sparse=True`,
      `very_sparse=True`, not the authors' default): not available.

  Attributes:
    num_bases: `n = ceil(min(d_in, d_out) / r)`.
    small_is_in: Whether `d_in <= d_out` (`Γ` then scales input dims).
    basis_a: `Basis` `[r, *small_shape]` (shared `A`).
    basis_b: `Basis` `[n, r, *large_shape]`.
    lam: `nnx.LoRAParam` `[n, r]` (the `Λ_i` diagonals).
    gamma: `nnx.LoRAParam` `[n, *small_shape]` (the `Γ_i` diagonals).
  """

  method = "randlora"
  option_names = ("seed", "chunk", "sqrt_n_scaling", "external_bases")

  def _create(
      self,
      key,
      dtype,
      *,
      seed: Any = 0,
      chunk: Any = None,
      sqrt_n_scaling: Any = False,
      external_bases: Any = False,
  ) -> None:
    del key
    self._common_options(seed, external_bases)
    if chunk is not None:
      _check_positive_int("chunk", chunk)
    _check_bool("sqrt_n_scaling", sqrt_n_scaling)
    self.chunk = chunk
    self.sqrt_n_scaling = sqrt_n_scaling
    r = self.rank
    self.small_is_in = self.d_in <= self.d_out
    if self.small_is_in:
      small_shape, small_dims = self.in_shape, self.in_dims
      large_shape, large_dims = self.out_shape, self.out_dims
    else:
      small_shape, small_dims = self.out_shape, self.out_dims
      large_shape, large_dims = self.in_shape, self.in_dims
    self.d_small, self.d_large = math.prod(small_shape), math.prod(large_shape)
    n = self.num_bases = randlora_num_bases(self.d_in, self.d_out, r)
    if sqrt_n_scaling:
      self.scale = self.scale / math.sqrt(n)
    a, b = randlora_bases(seed, self.d_small, self.d_large, r, n)
    self.basis_a = self._basis_var(
        a.astype(dtype).reshape((r,) + small_shape), (None,) + small_dims
    )
    self.basis_b = self._basis_var(
        b.astype(dtype).reshape((n, r) + large_shape),
        (None, None) + large_dims,
    )
    self.lam = self._param(jnp.zeros((n, r), dtype), (None, None))
    self.gamma = self._param(
        jnp.full((n,) + small_shape, 1.0 / max(n, self.d_small), dtype),
        (None,) + small_dims,
    )

  def _basis_views(self):
    return {
        "basis_a": (self.rank, self.d_small),
        "basis_b": (self.num_bases, self.rank, self.d_large),
    }

  def _parts(self):
    n, r = self.num_bases, self.rank
    return (
        self.basis_a[...].reshape(r, self.d_small),
        self.basis_b[...].reshape(n, r, self.d_large),
        self.lam[...],
        self.gamma[...].reshape(n, self.d_small),
    )

  def adapter_out(self, x2: jax.Array) -> jax.Array:
    return randlora_apply(x2, *self._parts(), self.scale,
                          small_is_in=self.small_is_in, chunk=self.chunk)

  def delta_weight(self) -> jax.Array:
    return randlora_delta(*self._parts(), self.scale,
                          small_is_in=self.small_is_in)

  # PEFT: `base_model.model.<path>.randlora_lambda` `[r, n]`,
  # `.randlora_gamma` `[n, d_small]`; shared `base_model.randlora_A`
  # `[r, 1, max_small]`, `base_model.randlora_B` `[max_large, max_n, r]`
  # (with `save_projection=True`; PEFT 0.21 also writes per-layer copies
  # `<path>.randlora_A` / `.randlora_B`).
  def peft_tensors(self) -> dict[str, jax.Array]:
    """`{"randlora_lambda": [r, n], "randlora_gamma": [n, d_small]}`."""
    return {"randlora_lambda": self.lam[...].T,
            "randlora_gamma": self.gamma[...].reshape(self.num_bases, -1)}

  def set_peft_tensors(self, randlora_lambda: Any,
                       randlora_gamma: Any) -> None:
    """Inverse of `peft_tensors`."""
    lam = jnp.asarray(randlora_lambda)
    if lam.shape != (self.rank, self.num_bases):
      raise ValueError(
          f"randlora_lambda: expected shape {(self.rank, self.num_bases)}; "
          f"got {tuple(lam.shape)}."
      )
    self._set_param("lam", lam.T)
    self._set_param("gamma", randlora_gamma)

  def set_peft_bases(self, randlora_a: Any, randlora_b: Any) -> None:
    """Sets the bases from PEFT's shared `randlora_A`, `randlora_B`.

    PEFT flattens the scaled `A` over `(rank, basis)` but `B` over
    `(basis, rank)`, so its flat index `j` pairs `A`-row `(k, i) =
    divmod(j, n)` with `B`-column `divmod(j, r)`. We store the `B` columns
    in the paper's pairing (`B_i` row `k` meets `Λ_i[k] A[k]`), which gives
    PEFT's output exactly.

    Args:
      randlora_a: PEFT's `base_model.randlora_A`, `[r, 1, max_small]`.
      randlora_b: PEFT's `base_model.randlora_B`, `[max_large, max_n, r]`.

    Raises:
      ValueError: If the shared bases are too small for this layer.
    """
    pa, pb = jnp.asarray(randlora_a), jnp.asarray(randlora_b)
    n, r = self.num_bases, self.rank
    if (pa.ndim != 3 or pa.shape[0] != r or pa.shape[1] != 1
        or pa.shape[2] < self.d_small or pb.ndim != 3 or pb.shape[2] != r
        or pb.shape[1] < n or pb.shape[0] < self.d_large):
      raise ValueError(
          f"PEFT RandLoRA bases must be randlora_A: [{r}, 1, >={self.d_small}]"
          f" and randlora_B: [>={self.d_large}, >={n}, {r}]; got "
          f"{tuple(pa.shape)} and {tuple(pb.shape)}."
      )
    flat = pb[: self.d_large, :n, :].reshape(self.d_large, n * r)
    # Our b[i, k] is PEFT's flat column k * n + i.
    b = flat.T.reshape(r, n, self.d_large).transpose(1, 0, 2)
    self.set_bases(basis_a=pa[:, 0, : self.d_small], basis_b=b)


presets.register(
    "randlora",
    source="PaulAlbert31/RandLoRA@4ac565ecd611 "
    "(peft/src/peft/tuners/randlora/layer.py, config.py)",
    kwargs={"sqrt_n_scaling": True, "alpha": 64},
    reasons={
        "sqrt_n_scaling": (
            "the authors' scale randlora_alpha / r / sqrt(n) (layer.py:119); "
            "lowrank's default alpha / r is Hugging Face PEFT's, whose "
            "RandLoRA files and alpha values users load."),
        "alpha": (
            "RandLoraConfig's default randlora_alpha=64 (with its default "
            "r=32, i.e. 2r; the GLUE script sets 2 * rank: pass "
            "alpha=2 * rank at other ranks)."),
    },
    unavailable=(
        "sparse / very sparse ternary bases (options of the authors' code, "
        "not its default).",),
)

layers.register("vera", VeRAWrapper)
layers.register("nola", NOLAWrapper)
layers.register("randlora", RandLoRAWrapper)


# ------------------------------------------------------------ PEFT VeRA I/O
_PEFT_PREFIX = "base_model.model."


def vera_peft_state(
    mods: dict[str, "VeRAWrapper"],
    *,
    base_model_name_or_path: str | None = None,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """`(adapter_config, tensors)` of a PEFT VeRA file for these adapters.

  The shared projections are written (`save_projection=True`): PEFT
  regenerates them from `projection_prng_key` with torch's generator, which
  JAX cannot reproduce, so a file without them would not load exactly.

  Raises:
    ValueError: If the adapters do not share one rank, seed, scale and
      shared bases (`share_bases(model)` makes a model's VeRA adapters
      share `A`), or their scale is not 1 (PEFT VeRA has no alpha).
  """
  wrappers = list(mods.values())
  if not all(isinstance(m, VeRAWrapper) for m in wrappers):
    raise ValueError("vera_peft_state needs VeRA adapters only.")
  ranks = {m.rank for m in wrappers}
  seeds = {m.seed for m in wrappers}
  if len(ranks) != 1 or len(seeds) != 1:
    raise ValueError(
        f"PEFT VeRA needs one rank and one seed; got ranks {sorted(ranks)}, "
        f"seeds {sorted(seeds)}."
    )
  scales = sorted({m.scale for m in wrappers if abs(m.scale - 1.0) > 1e-12})
  if scales:
    raise ValueError(
        f"PEFT VeRA has no alpha/scale; got scales {scales}. Inject VeRA "
        "with alpha=None (scale 1) to save it in PEFT format, or save it "
        "with save_adapters(directory, model, format='native')."
    )
  r = ranks.pop()
  max_in = max(m.d_in for m in wrappers)
  max_out = max(m.d_out for m in wrappers)
  shared_a = np.zeros((r, max_in), np.float32)
  shared_b = np.zeros((max_out, r), np.float32)
  filled_a = np.zeros((max_in,), bool)
  filled_b = np.zeros((max_out,), bool)
  tensors = {}
  for path, m in mods.items():
    for name, value in m.peft_tensors().items():
      tensors[f"{_PEFT_PREFIX}{path}.{name}"] = np.asarray(value, np.float32)
    bases = m.bases()
    a = np.asarray(bases["basis_a"], np.float32).T  # [r, d_in]
    b = np.asarray(bases["basis_b"], np.float32).T  # [d_out, r]
    for shared, filled, part, n, axis in (
        (shared_a, filled_a, a, m.d_in, 1), (shared_b, filled_b, b, m.d_out, 0)
    ):
      view = shared[:, :n] if axis == 1 else shared[:n]
      overlap = filled[:n]
      if overlap.any():
        old = view[:, overlap] if axis == 1 else view[overlap]
        new = part[:, overlap] if axis == 1 else part[overlap]
        if not np.array_equal(old, new):
          raise ValueError(
              f"{path}: its VeRA bases are not slices of one shared pair; "
              "call random_basis.share_bases(model) before training so "
              "every layer uses PEFT's shared vera_A / vera_B."
          )
      if axis == 1:
        shared[:, :n] = part
      else:
        shared[:n] = part
      filled[:n] = True
  tensors["base_model.vera_A"] = shared_a
  tensors["base_model.vera_B"] = shared_b
  first = wrappers[0]
  dropouts = {m.dropout.rate if m.dropout else 0.0 for m in wrappers}
  config = {
      "peft_type": "VERA",
      "task_type": None,
      "base_model_name_or_path": base_model_name_or_path,
      "r": int(r),
      "target_modules": sorted(mods),
      "projection_prng_key": int(first.seed),
      "save_projection": True,
      "vera_dropout": float(max(dropouts)),
      "d_initial": float(first.d_initial),
      "bias": "none",
      "fan_in_fan_out": False,
      "init_weights": True,
      "inference_mode": True,
      "modules_to_save": None,
      "layers_to_transform": None,
      "layers_pattern": None,
      "revision": None,
  }
  return config, tensors


def vera_load_peft(
    config: dict[str, Any],
    tensors: dict[str, np.ndarray],
    model: nnx.Module,
    *,
    rngs: nnx.Rngs | int = 0,
    where: str = "",
) -> nnx.Module:
  """Loads a PEFT VeRA file (config + tensors) into `model` (in place).

  Raises:
    ValueError: If the file has no shared projections (`save_projection`
      was False: PEFT's torch-generated bases cannot be reproduced), or keys
      or shapes do not fit the model.
  """
  if "base_model.vera_A" not in tensors or "base_model.vera_B" not in tensors:
    raise ValueError(
        f"{where}: no base_model.vera_A / vera_B. Files saved with "
        "save_projection=False rely on torch's random generator and cannot "
        "be loaded exactly."
    )
  mods = injection.adapter_modules(model)
  if not mods:
    try:
      injection.inject(
          model,
          method="vera",
          targets=config["target_modules"],
          rank=config["r"],
          dropout=float(config.get("vera_dropout") or 0.0),
          seed=config.get("projection_prng_key", 0),
          d_initial=float(config.get("d_initial", 0.1)),
          rngs=rngs,
      )
    except (TypeError, ValueError) as e:
      kind = TypeError if isinstance(e, TypeError) else ValueError
      raise kind(
          f"VeRA adapter of {where} does not fit the model: {e}") from e
    mods = injection.adapter_modules(model)
  merged = sorted(p for p, m in mods.items() if m.merged)
  if merged:
    raise ValueError(
        f"Cannot load {where} into merged adapters {merged[:10]}; call "
        "lowrank.adapters.unmerge(model) first."
    )
  expected = set()
  for path, m in mods.items():
    if not isinstance(m, VeRAWrapper):
      raise ValueError(f"{path}: expected a VeRA adapter, found {m.method!r}.")
    for name in ("vera_lambda_d", "vera_lambda_b"):
      expected.add(f"{_PEFT_PREFIX}{path}.{name}")
  per_layer = {k for k in tensors if k.startswith(_PEFT_PREFIX)}
  if per_layer != expected:
    raise ValueError(
        f"{where}: tensors do not match the model's VeRA adapters: missing "
        f"{sorted(expected - per_layer)[:10]}, unexpected "
        f"{sorted(per_layer - expected)[:10]}."
    )
  for path, m in mods.items():
    try:
      m.set_peft_tensors(
          tensors[f"{_PEFT_PREFIX}{path}.vera_lambda_d"],
          tensors[f"{_PEFT_PREFIX}{path}.vera_lambda_b"],
      )
      m.set_peft_bases(
          tensors["base_model.vera_A"], tensors["base_model.vera_B"])
    except ValueError as e:
      raise ValueError(f"{where}: module {path!r}: {e}") from e
  return model
