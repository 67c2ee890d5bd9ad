r"""SVD, QR and data-driven LoRA initialisations: PiSSA, OLoRA, CorDA.

Importing this module registers, for `inject(init=...)`:

* `"pissa"`: the principal singular triplets of `W` go into the adapter
  (Meng et al. 2024). With `W = P Σ Qᵀ` (`W: [d_in, d_out]`, `y = x @ W`),
  `A = P_r diag(√(Σ_r/s))`, `B = diag(√(Σ_r/s)) Q_rᵀ`, so `s·A B` is the
  rank-`r` principal part, and the base kernel becomes the residual
  `W - s·A B` (PEFT's `init_lora_weights="pissa"`, transposed).
* `"pissa_niter_<n>"` for n in 1, 2, 4, 8, 16: the same from a randomized
  SVD with `n` subspace iterations (PEFT's `pissa_niter_[n]`, built on
  `torch.svd_lowrank` with `q = r`); `pissa_niter(n)` registers other `n`.
* `"olora"`: `Q R = Wᵀ` (QR of the torch-layout `[d_out, d_in]` weight, as
  PEFT); `A = R[:r]ᵀ`, `B = Q[:, :r]ᵀ`, base `W - s·A B` (Büyükakyüz 2024).
* `"corda"`, `"corda_ipm"`, `"corda_kpm"`: context-oriented decomposition
  (Yang et al. 2024). From the input covariance `C = XᵀX / N: [d_in, d_in]`
  (see `collect_input_covariance`), damped as PEFT does to
  `C' = C + λ·mean(diag C)·I` (λ = 0.01, doubled until `C' C'⁻¹` is within
  0.05 of `I` in Frobenius norm), take `C' W = P Σ Qᵀ` (the transpose of
  PEFT's SVD of `W_torch C'`), so `W = C'⁻¹ P Σ Qᵀ`. The adapter gets
  `A = C'⁻¹ P_sel diag(√(Σ_sel/s))`, `B = diag(√(Σ_sel/s)) Q_selᵀ` and the
  base keeps `W - s·A B`. Mode `"ipm"` (instruction-previewed, PEFT's
  default) selects the *largest* `r` components, `"kpm"`
  (knowledge-preserved) the *smallest* `r`, leaving the principal
  (world-knowledge) directions frozen in the base. `init_data[path]` is the
  covariance `[d_in, d_in]` or `{"covariance": C, "mode": "ipm" | "kpm"}`;
  `"corda_ipm"` / `"corda_kpm"` fix the mode and take the bare covariance.

These are `init=` values, not adapter methods, so they have no
`preset="paper"` of their own. Compared with the official code (PEFT's
`init_lora_weights`, `huggingface/peft@5d602fdbff04`, and for PiSSA also
`GraphPKU/PiSSA@87f4db6fc75a`): PiSSA and OLoRA match (up to the PRNG of
the randomized SVD); CorDA's covariance differs when it is accumulated over
several batches (see `collect_input_covariance`).

In every case the wrapper's output right after the init equals the original
layer's (`W_res + s·A B = W` to float tolerance; bf16 kernels round the
residual), and `merge` gives back `W`. The inits work on plain LoRA and DoRA
wrappers (any wrapper with `lora_a: [*in, r]` and `lora_b: [r, *out]`); for
DoRA the magnitude is recomputed afterwards, as PEFT does. They need a
positive scale (`alpha / r > 0`) and `r <= min(d_in, d_out)`.

    cov = svd_init.collect_input_covariance(model, r".*\.(query|value)",
                                            calibration_batches)
    adapters.inject(model, targets=r".*\.(query|value)", rank=8,
                    init="corda_kpm", init_data=cov)

References:
  Meng et al. 2024, PiSSA, https://arxiv.org/abs/2404.02948
  Büyükakyüz 2024, OLoRA, https://arxiv.org/abs/2406.01775
  Yang et al. 2024, CorDA, https://arxiv.org/abs/2406.05223
  Halko et al. 2011, randomized SVD, https://arxiv.org/abs/0909.4061
"""

from collections.abc import Callable, Iterable, Mapping, Sequence
import contextlib
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from lowrank import surgery
from lowrank.adapters import injection
from lowrank.adapters import layers

CORDA_MODES = ("ipm", "kpm")
PISSA_NITERS = (1, 2, 4, 8, 16)


# ------------------------------------------------------------------ helpers
def kernel_to_2d(wrapper: layers.LoRAWrapper, kernel: Any) -> jax.Array:
  """A kernel-shaped array (e.g. its gradient) as `[d_in, d_out]`.

  Raises:
    ValueError: If `kernel` does not have the wrapped kernel's shape.
  """
  kernel = jnp.asarray(kernel)
  shape = wrapper.base.kernel.get_value().shape
  if tuple(kernel.shape) != tuple(shape):
    raise ValueError(
        f"Expected an array of the kernel's shape {tuple(shape)}; got "
        f"{tuple(kernel.shape)}."
    )
  return layers.kernel_to_2d(
      kernel, wrapper.in_dims, wrapper.out_dims
  )


def set_kernel_2d(wrapper: layers.LoRAWrapper, w2: jax.Array) -> None:
  """Writes `w2: [d_in, d_out]` into the wrapped kernel (its dtype/sharding)."""
  wrapper.set_kernel_2d(w2)


assign = layers.assign  # Kept as a public name of this module.


def _check_factored(wrapper: layers.LoRAWrapper, init: str) -> None:
  r = wrapper.rank
  a = getattr(wrapper, "lora_a", None)
  b = getattr(wrapper, "lora_b", None)
  ok = (
      isinstance(a, nnx.Variable)
      and isinstance(b, nnx.Variable)
      and a.get_value().shape == wrapper.in_shape + (r,)
      and b.get_value().shape == (r,) + wrapper.out_shape
  )
  if not ok:
    raise ValueError(
        f"init={init!r} sets LoRA factors lora_a [*in, r] and lora_b "
        f"[r, *out]; method {wrapper.method!r} has no such factors (use it "
        "with method='lora' or 'dora')."
    )
  if r > min(wrapper.d_in, wrapper.d_out):
    raise ValueError(
        f"init={init!r} needs rank <= min(d_in, d_out) = "
        f"{min(wrapper.d_in, wrapper.d_out)}; got rank {r}."
    )
  if not wrapper.scale > 0:
    raise ValueError(
        f"init={init!r} needs a positive scale alpha/r; got {wrapper.scale}."
    )


def _install(
    wrapper: layers.LoRAWrapper, a2: jax.Array, b2: jax.Array
) -> None:
  """Sets `A`, `B`; base kernel `← W - s·A B` from the stored factors."""
  w = wrapper.kernel_2d().astype(jnp.float32)
  a = assign(wrapper.lora_a, a2).reshape(wrapper.d_in, wrapper.rank)
  b = assign(wrapper.lora_b, b2).reshape(wrapper.rank, wrapper.d_out)
  delta = (a.astype(jnp.float32) @ b.astype(jnp.float32)) * wrapper.scale
  set_kernel_2d(wrapper, w - delta)
  reset = getattr(wrapper, "reset_magnitude", None)
  if reset is not None:  # DoRA: m = ‖W_res + s·A B‖ = ‖W‖.
    reset()


def _no_data(init: str, data: Any) -> None:
  if data is not None:
    raise ValueError(
        f"init={init!r} takes no init_data; got a {type(data).__name__}."
    )


# ------------------------------------------------------------------ PiSSA
def randomized_svd(
    w: jax.Array, rank: int, niter: int, key: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Approximate top-`rank` SVD of `w: [m, n]` by subspace iteration.

  Halko et al.'s range finder with `q = rank` columns (no oversampling, as
  PEFT's `pissa_niter_[n]` calls `torch.svd_lowrank(W, r, niter)`) and
  `niter` power iterations, re-orthonormalised with QR at each step.

  Returns:
    `(U: [m, rank], S: [rank], Vᵀ: [rank, n])`, float32.

  Raises:
    ValueError: If `rank` or `niter` is out of range.
  """
  m, n = w.shape
  if not 0 < rank <= min(m, n):
    raise ValueError(f"rank must be in [1, {min(m, n)}]; got {rank}.")
  if niter < 0:
    raise ValueError(f"niter must be >= 0; got {niter}.")
  w = w.astype(jnp.float32)
  omega = jax.random.normal(key, (n, rank), jnp.float32)
  q, _ = jnp.linalg.qr(w @ omega)
  for _ in range(niter):
    z, _ = jnp.linalg.qr(w.T @ q)
    q, _ = jnp.linalg.qr(w @ z)
  u_small, s, vt = jnp.linalg.svd(q.T @ w, full_matrices=False)
  return q @ u_small, s, vt


def _pissa(wrapper, data, key, *, niter: int | None = None,
           name: str = "pissa") -> None:
  _no_data(name, data)
  _check_factored(wrapper, name)
  r, s = wrapper.rank, wrapper.scale
  w = wrapper.kernel_2d().astype(jnp.float32)
  if niter is None:
    p, sv, qt = jnp.linalg.svd(w, full_matrices=False)
    p, sv, qt = p[:, :r], sv[:r], qt[:r]
  else:
    p, sv, qt = randomized_svd(w, r, niter, key)
  root = jnp.sqrt(sv / s)
  _install(wrapper, p * root[None, :], root[:, None] * qt)


def pissa_niter(niter: int) -> str:
  """Registers (if needed) and returns the init name `"pissa_niter_<niter>"`.

  Raises:
    ValueError: If `niter` is not a non-negative int.
  """
  if isinstance(niter, bool) or not isinstance(niter, int) or niter < 0:
    raise ValueError(f"niter must be a non-negative int; got {niter!r}.")
  name = f"pissa_niter_{niter}"
  if name not in layers.INITIALIZERS:
    def init_fn(wrapper, data, key):
      _pissa(wrapper, data, key, niter=niter, name=name)

    layers.register_init(name, init_fn)
  return name


# ------------------------------------------------------------------ OLoRA
def _olora(wrapper, data, key) -> None:
  del key
  _no_data("olora", data)
  _check_factored(wrapper, "olora")
  r = wrapper.rank
  q, rr = jnp.linalg.qr(wrapper.kernel_2d().astype(jnp.float32).T)
  _install(wrapper, rr[:r].T, q[:, :r].T)


# ------------------------------------------------------------------ CorDA
def damped_inverse(
    cov: jax.Array, damp: float = 0.01, max_doublings: int = 40
) -> tuple[jax.Array, jax.Array]:
  """PEFT's CorDA regularisation: `(C', C'⁻¹)`, `C' = C + λ mean(diag C) I`.

  `λ` starts at `damp` and doubles until `‖C' C'⁻¹ - I‖_F < 0.05`.

  Raises:
    ValueError: If `cov` is not a finite square matrix with a positive mean
      diagonal, or no damping up to `damp · 2**max_doublings` works.
  """
  cov = jnp.asarray(cov, jnp.float32)
  if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
    raise ValueError(f"Covariance must be square; got shape {cov.shape}.")
  if not bool(jnp.all(jnp.isfinite(cov))):
    raise ValueError("Covariance has non-finite entries.")
  mean_diag = jnp.mean(jnp.diag(cov))
  if not float(mean_diag) > 0:
    raise ValueError(
        f"Covariance has mean diagonal {float(mean_diag)}; expected > 0 "
        "(were the calibration inputs all zero?)."
    )
  eye = jnp.eye(cov.shape[0], dtype=jnp.float32)
  for _ in range(max_doublings + 1):
    fixed = cov + eye * (mean_diag * damp)
    inv = jnp.linalg.inv(fixed)
    err = jnp.linalg.norm(fixed @ inv - eye)
    if bool(err < 0.05):
      return fixed, inv
    damp *= 2
  raise ValueError(
      f"Could not regularise the covariance (damping up to {damp / 2})."
  )


def _corda(wrapper, data, key, *, mode: str | None = None,
           name: str = "corda") -> None:
  del key
  _check_factored(wrapper, name)
  if isinstance(data, Mapping):
    unknown = sorted(set(data) - {"covariance", "mode"})
    if unknown or "covariance" not in data:
      raise ValueError(
          f"init={name!r} data must be a covariance array or a dict with "
          f"keys 'covariance' and optional 'mode'; got keys {sorted(data)}."
      )
    if mode is not None and "mode" in data and data["mode"] != mode:
      raise ValueError(
          f"init={name!r} fixes mode {mode!r}; data asks for "
          f"{data['mode']!r}."
      )
    mode = data.get("mode", mode)
    cov = data["covariance"]
  elif data is None:
    raise ValueError(
        f"init={name!r} needs init_data={{path: covariance}} for every "
        "adapted module (see svd_init.collect_input_covariance)."
    )
  else:
    cov = data
  mode = "ipm" if mode is None else mode
  if mode not in CORDA_MODES:
    raise ValueError(
        f"CorDA mode must be one of {CORDA_MODES}; got {mode!r}."
    )
  cov = jnp.asarray(cov, jnp.float32)
  d_in = wrapper.d_in
  if cov.shape != (d_in, d_in):
    raise ValueError(
        f"init={name!r}: covariance must be [d_in, d_in] = [{d_in}, {d_in}] "
        f"(d_in = flattened input dims); got {tuple(cov.shape)}."
    )
  fixed, inv = damped_inverse(cov)
  r, s = wrapper.rank, wrapper.scale
  w = wrapper.kernel_2d().astype(jnp.float32)
  p, sv, qt = jnp.linalg.svd(fixed @ w, full_matrices=False)
  sel = slice(0, r) if mode == "ipm" else slice(sv.shape[0] - r, sv.shape[0])
  root = jnp.sqrt(sv[sel] / s)
  _install(wrapper, (inv @ p[:, sel]) * root[None, :], root[:, None] * qt[sel])


# ------------------------------------------------------- covariance capture
class _Moment(nnx.Variable):
  """Accumulator of `collect_input_covariance` (lives only during the call)."""


class _InputProbe(layers.LoRAWrapper):
  """Passes the input through to `base`, accumulating `Σ xᵀx` and a count."""

  method = "_input_probe"

  def _create(self, key, dtype, **options):
    del key, dtype, options
    with nnx.use_eager_sharding(False):
      self.xtx = _Moment(jnp.zeros((self.d_in, self.d_in), jnp.float32))
      self.count = _Moment(jnp.zeros((), jnp.float32))

  def __call__(self, x, *args, **kwargs):
    x2, _ = self._to_2d(jnp.asarray(x))
    flat = x2.reshape(-1, self.d_in).astype(jnp.float32)
    self.xtx.set_value(self.xtx.get_value() + flat.T @ flat)
    self.count.set_value(self.count.get_value() + flat.shape[0])
    return self.base(x, *args, **kwargs)


@contextlib.contextmanager
def _probes(model: nnx.Module, targets):
  """Temporarily wraps the modules `inject(targets=...)` would adapt."""
  name = _InputProbe.method
  layers.register(name, _InputProbe)
  try:
    injection.inject(model, targets=targets, method=name, rank=1)
  finally:
    layers.METHODS.pop(name, None)
  found = {
      p: m
      for p, m in injection.adapter_modules(model).items()
      if isinstance(m, _InputProbe)
  }
  try:
    yield found
  finally:
    for p, m in found.items():
      surgery.set_submodule(model, p, m.base)


def matched_paths(model: nnx.Module, targets: str | Sequence[str]) -> list[str]:
  """Dotted paths of the modules `inject(model, targets=targets)` would adapt.

  Same semantics and errors as `inject` (PEFT-style regex / name list /
  `"all-linear"`; linear kinds only). The model is left unchanged.

  Raises:
    ValueError: As `inject` does for targets that match nothing or match
      modules that cannot be adapted.
  """
  with _probes(model, targets) as found:
    return sorted(found)


def collect_input_covariance(
    model: nnx.Module,
    targets: str | Sequence[str],
    batches: Iterable[Any],
    forward_fn: Callable[[nnx.Module, Any], Any] | None = None,
) -> dict[str, jax.Array]:
  """Input covariance `C = XᵀX / N` of each targeted module, for CorDA.

  Each module that `inject(targets=targets)` would adapt is temporarily
  wrapped by a probe that passes its input through unchanged and accumulates
  `Σ x xᵀ` over all tokens (the input flattened to `[N, d_in]` exactly as
  the adapter sees it, for Linear, LinearGeneral and Einsum alike). The
  original modules are put back afterwards, also on error.

  Difference from the official code (Hugging Face PEFT's
  `preprocess_corda`, `huggingface/peft@5d602fdbff04`,
  `src/peft/tuners/lora/corda.py:174-193,225`): PEFT divides each forward
  call's input by `|max(x)|` (the signed maximum's magnitude, not the
  largest magnitude) before summing `xᵀx`, then divides by the number of
  calls; here nothing is rescaled and `N` counts tokens. CorDA's result
  does not depend on the covariance's overall scale, so with one
  calibration batch both give the same adapter; with several, PEFT weights
  each batch by `1 / max(x)²` and the covariance (so the adapter) differs.
  Not available as an argument: compute PEFT's covariance yourself and
  pass it through `init_data`.

  Args:
    model: The model to calibrate (without adapters on the targets).
    targets: As for `inject`.
    batches: Calibration batches, each passed to `forward_fn`.
    forward_fn: `forward_fn(model, batch)` runs the model; default
      `model(batch)`. Run eagerly or under `nnx.jit` (the probes update NNX
      variables); a plain `jax.jit` over a closure would leak tracers.

  Returns:
    `{module path: C}` with `C: [d_in, d_in]` float32, ready for
    `inject(init="corda", init_data=...)`.

  Raises:
    ValueError: On bad targets, no batches, or a module never called.
  """
  forward_fn = forward_fn or (lambda m, batch: m(batch))
  with _probes(model, targets) as found:
    n = 0
    for batch in batches:
      forward_fn(model, batch)
      n += 1
    if not n:
      raise ValueError("collect_input_covariance got no batches.")
    out, unused = {}, []
    for path, probe in found.items():
      count = float(probe.count.get_value())
      if count == 0:
        unused.append(path)
      else:
        out[path] = probe.xtx.get_value() / count
  if unused:
    raise ValueError(
        f"Targeted modules never ran during calibration: {unused}."
    )
  return out


# -------------------------------------------------------------- registration
layers.register_init("pissa", _pissa)
for _n in PISSA_NITERS:
  pissa_niter(_n)
layers.register_init("olora", _olora)
layers.register_init("corda", _corda)
for _mode in CORDA_MODES:
  layers.register_init(
      f"corda_{_mode}",
      lambda w, d, k, _m=_mode: _corda(w, d, k, mode=_m, name=f"corda_{_m}"),
  )
del _n, _mode
