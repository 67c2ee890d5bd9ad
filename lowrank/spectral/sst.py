r"""Sparse Spectral Training (SST): layers, conversion and the optimizer.

A linear layer is reparameterised in spectral form, `W = U diag(s) Vᵀ`
(kernel layout `[d_in, d_out]`: `U: [d_in, m]`, `s: [m]`, `V: [d_out, m]`,
`m = min(d_in, d_out)`), initialised from the SVD of the dense weight.
Training (Zhao et al., Sparse Spectral Training and Inference on Euclidean
and Hyperbolic Architectures, https://arxiv.org/abs/2405.15481):

* all singular values `s` are updated every step and clamped at 0;
* only `r` singular-vector pairs are updated per iteration. They are sampled
  without replacement from `p_i = ½(1/m + s_i/Σs)` and updated with the
  *enhanced* gradients `∇̃U_i = (∂L/∂W) V_i`, `∇̃V_i = (∂L/∂W)ᵀ U_i` (the
  natural gradients without the `s_i` factor), then renormalised to unit
  length;
* at the end of every round, `U diag(s) Vᵀ` is re-decomposed (re-SVD) and
  the optimizer state of the re-aligned vectors is reset.

Pieces:

* `SSTLinear`: the NNX layer. Its custom VJP returns the enhanced gradients
  for `sst_u` / `sst_v` (and the exact ones for `sst_s` and the input), so
  any code that differentiates the model gets them.
* `to_sst(model, targets=..., rank=...)` / `to_dense(model)`: swap chosen
  `nnx.Linear` layers (PEFT-style regex targeting, as
  `lowrank.adapters.inject`) to spectral form and back. Stacked (`nnx.scan`)
  layers with `[L, d_in, d_out]` kernels become `[L, ...]` factors.
* `sst_optimizer(inner, learning_rate, rank=...)` / `sst_adamw(...)`: the SST
  update as one optax transformation. It gathers the active `r` columns of
  `U` and `V` (static shapes), runs `inner` on them, on `s` and on every
  non-spectral leaf (so it trains a whole model), scatters the step back,
  renormalises, clamps `s`, resamples every `resample_every` steps and
  re-SVDs every `round_length` steps. The state holds the moments of the
  active blocks and of `s` only: `O(r (m + n))` per layer, not `O(m n)`.
* `train_step(model, optimizer, loss_fn, *batch)`: one jitted step.

Usage::

  sst.to_sst(model, targets=r".*_proj", rank=16)
  optimizer = nnx.Optimizer(
      model, sst.sst_adamw(1e-3, rank=sst.ranks(model)), wrt=nnx.Param)
  for batch in batches:
    loss = sst.train_step(model, optimizer, loss_fn, batch)
  sst.to_dense(model)  # back to nnx.Linear layers

The gradients of `U` and `V` are full `[d_in, m]` / `[d_out, m]` arrays
(like the dense gradient); only the optimizer state is reduced.

References:
  Zhao, Zhang, Li, Liu, Cannistraci 2024, Sparse Spectral Training and
  Inference on Euclidean and Hyperbolic Neural Networks,
  https://arxiv.org/abs/2405.15481
"""

from collections.abc import Callable, Mapping, Sequence
import functools
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import optax

from lowrank import sharding
from lowrank.adapters import injection
from lowrank.adapters import layers

U_NAME, S_NAME, V_NAME = "sst_u", "sst_s", "sst_v"
SST_NAMES = (U_NAME, S_NAME, V_NAME)

# Shared with adapter injection, so targets mean the same thing everywhere.
# pylint: disable=protected-access
_matcher = injection._matcher
_walk = injection._walk
_set_child = injection._set_child
_listing = injection._listing
_make_variable = layers._make_variable
# pylint: enable=protected-access


# ----------------------------------------------------------------------------
# Pure math.


def sampling_probs(s: jax.Array) -> jax.Array:
  """SST's sampling distribution `p_i = ½(1/m + s_i / Σ_j s_j)`.

  Args:
    s: Singular values `[..., m]` (non-negative).

  Returns:
    `[..., m]` float32 probabilities summing to 1 along the last axis (the
    uniform distribution where all `s` are 0).
  """
  s = jnp.maximum(jnp.asarray(s, jnp.float32), 0.0)
  m = s.shape[-1]
  total = jnp.sum(s, axis=-1, keepdims=True)
  share = jnp.where(total > 0, s / jnp.where(total > 0, total, 1.0), 1.0 / m)
  return 0.5 * (1.0 / m + share)


def sample_indices(key: jax.Array, s: jax.Array, rank: int) -> jax.Array:
  """Samples `rank` distinct indices from `sampling_probs(s)`.

  Sampling is without replacement (successive draws, renormalising after
  each, like `torch.multinomial(p, r, replacement=False)`), via the
  Gumbel-top-k trick, so the shape is static. Element 0 is the first draw.

  Args:
    key: PRNG key.
    s: Singular values `[..., m]`; leading dims get independent samples.
    rank: Number of indices `r <= m` (Python int).

  Returns:
    int32 `[..., r]`.

  Raises:
    ValueError: If `rank` is not in `[1, m]`.
  """
  m = s.shape[-1]
  if isinstance(rank, bool) or not isinstance(rank, int) or not 0 < rank <= m:
    raise ValueError(f"rank must be an int in [1, {m}]; got {rank!r}.")
  logp = jnp.log(sampling_probs(s))
  gumbel = jax.random.gumbel(key, logp.shape, jnp.float32)
  return jax.lax.top_k(logp + gumbel, rank)[1].astype(jnp.int32)


def resvd(
    u: jax.Array, s: jax.Array, v: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Re-decomposes `U diag(s) Vᵀ` into an exact SVD of the same matrix.

  Uses thin QRs of `U` and `V` and the SVD of the `m × m` core
  `R_U diag(s) R_Vᵀ`, so the `[d_in, d_out]` product is never formed.

  Args:
    u: `[..., d_in, m]`.
    s: `[..., m]`.
    v: `[..., d_out, m]`.

  Returns:
    `(U', s', V')` of the same shapes: orthonormal columns, `s'`
    non-negative and descending, and `U' diag(s') V'ᵀ = U diag(s) Vᵀ`.
  """
  dtype = u.dtype
  qu, ru = jnp.linalg.qr(u.astype(jnp.float32))
  qv, rv = jnp.linalg.qr(v.astype(jnp.float32))
  core = (ru * s.astype(jnp.float32)[..., None, :]) @ jnp.swapaxes(rv, -1, -2)
  p, sigma, qh = jnp.linalg.svd(core, full_matrices=False)
  new_u = qu @ p
  new_v = qv @ jnp.swapaxes(qh, -1, -2)
  return new_u.astype(dtype), sigma.astype(s.dtype), new_v.astype(dtype)


def spectral_matmul(
    x2: jax.Array,
    u: jax.Array,
    s: jax.Array,
    v: jax.Array,
    enhanced: bool = True,
) -> jax.Array:
  """`x2 U diag(s) Vᵀ` for `x2: [N, d_in]`, without forming the kernel.

  Args:
    x2: `[N, d_in]`.
    u: `[d_in, m]`.
    s: `[m]`.
    v: `[d_out, m]`.
    enhanced: Differentiate `u` and `v` with SST's enhanced gradients
      (`xᵀ (dy V)` and `dyᵀ (x U)`, i.e. without the `diag(s)` factor).
      `False` gives the ordinary gradients.

  Returns:
    `[N, d_out]`.
  """
  if enhanced:
    return _enhanced_matmul(x2, u, s, v)
  return ((x2 @ u) * s[None, :]) @ v.T


@jax.custom_vjp
def _enhanced_matmul(x2, u, s, v):
  return ((x2 @ u) * s[None, :]) @ v.T


def _enhanced_fwd(x2, u, s, v):
  h = x2 @ u
  return (h * s[None, :]) @ v.T, (x2, u, s, v, h)


def _enhanced_bwd(res, dy):
  x2, u, s, v, h = res
  g = dy @ v  # [N, m]
  ds = jnp.sum(h * g, axis=0).astype(s.dtype)
  dx = ((g * s[None, :]) @ u.T).astype(x2.dtype)
  du = (x2.T @ g).astype(u.dtype)  # Enhanced: (∂L/∂W) V, no s factor.
  dv = (dy.T @ h).astype(v.dtype)  # Enhanced: (∂L/∂W)ᵀ U.
  return dx, du, ds, dv


_enhanced_matmul.defvjp(_enhanced_fwd, _enhanced_bwd)


# ----------------------------------------------------------------------------
# Layer.


def _kernel_axes(var: nnx.Variable) -> tuple[Any, ...] | None:
  axes = var.get_metadata().get("out_sharding")
  return None if axes is None else tuple(axes)


class SSTLinear(nnx.Module):
  """A linear layer in spectral form, `y = x U diag(s) Vᵀ + b`.

  Build it from a dense init (`SSTLinear(d_in, d_out, rank=r, rngs=...)`) or
  from an existing layer (`SSTLinear.from_linear(linear, rank=r)`); either
  way the factors are the SVD of the dense kernel, so the layer computes
  what the dense one did. Stacked kernels `[L, d_in, d_out]` (from
  `nnx.vmap`/`nnx.scan` layers) give `[L, ...]` factors; such a layer is
  meant to run inside the scan, on one `[d_in, m]` slice at a time.

  Attributes:
    sst_u: `nnx.Param` `[..., d_in, m]` (unit-norm columns).
    sst_s: `nnx.Param` `[..., m]` (non-negative).
    sst_v: `nnx.Param` `[..., d_out, m]` (unit-norm columns).
    bias: The dense layer's bias `nnx.Param` `[..., d_out]`, or `None`.
    in_features, out_features, rank, enhanced_grad, dtype, param_dtype,
    kernel_axes: Static configuration (`kernel_axes` are the dense
      kernel's logical axes, used by `to_dense`).
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      rank: int,
      use_bias: bool = True,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      kernel_init: Any = nnx.initializers.lecun_normal(),
      bias_init: Any = nnx.initializers.zeros_init(),
      enhanced_grad: bool = True,
      rngs: nnx.Rngs | None = None,
      linear: nnx.Linear | None = None,
  ):
    """Builds the layer.

    Args:
      in_features: `d_in`.
      out_features: `d_out`.
      rank: Number of singular-vector pairs trained per iteration (used by
        `ranks` / `sst_optimizer`); `1 <= rank <= min(d_in, d_out)`.
      use_bias: Add a bias (ignored with `linear`).
      dtype: Compute dtype (`None`: promote input and parameters).
      param_dtype: Parameter dtype (ignored with `linear`).
      kernel_init: Init of the dense kernel that is decomposed.
      bias_init: Init of the bias.
      enhanced_grad: Use SST's enhanced gradients for `U`, `V`.
      rngs: Needed unless `linear` is given.
      linear: Decompose this layer's kernel (keeps its bias variable).

    Raises:
      ValueError: On a bad rank or a `linear` whose sizes do not match.
    """
    if linear is None:
      if rngs is None:
        raise ValueError("SSTLinear needs rngs when no linear is given.")
      with nnx.use_eager_sharding(False):
        linear = nnx.Linear(
            in_features, out_features, use_bias=use_bias, dtype=dtype,
            param_dtype=param_dtype, kernel_init=kernel_init,
            bias_init=bias_init, rngs=rngs)
    if (linear.in_features, linear.out_features) != (in_features,
                                                     out_features):
      raise ValueError(
          f"linear is {linear.in_features} -> {linear.out_features}; "
          f"expected {in_features} -> {out_features}."
      )
    m = min(in_features, out_features)
    if isinstance(rank, bool) or not isinstance(rank, int) or not (
        0 < rank <= m):
      raise ValueError(
          f"rank must be an int in [1, min(d_in, d_out) = {m}]; got {rank!r}."
      )
    kvar = linear.kernel
    kernel = kvar.get_value()
    if kernel.ndim < 2 or kernel.shape[-2:] != (in_features, out_features):
      raise ValueError(
          f"Kernel shape {kernel.shape} does not end in "
          f"({in_features}, {out_features})."
      )
    self.in_features = in_features
    self.out_features = out_features
    self.rank = rank
    self.enhanced_grad = bool(enhanced_grad)
    self.dtype = linear.dtype
    self.param_dtype = kernel.dtype
    self.kernel_axes = _kernel_axes(kvar)
    u, s, vh = jnp.linalg.svd(kernel.astype(jnp.float32), full_matrices=False)
    v = jnp.swapaxes(vh, -1, -2)
    lead = tuple(range(kernel.ndim - 2))
    i, o = kernel.ndim - 2, kernel.ndim - 1
    make = functools.partial(_make_variable, nnx.Param, like=kvar)
    self.sst_u = make(u.astype(kernel.dtype), dims=lead + (i, None))
    self.sst_s = make(s.astype(kernel.dtype), dims=lead + (None,))
    self.sst_v = make(v.astype(kernel.dtype), dims=lead + (o, None))
    self.bias = nnx.data(linear.bias)

  @classmethod
  def from_linear(
      cls, linear: nnx.Linear, *, rank: int, enhanced_grad: bool = True
  ) -> "SSTLinear":
    """The spectral form of `linear` (same function; keeps its bias)."""
    return cls(linear.in_features, linear.out_features, rank=rank,
               enhanced_grad=enhanced_grad, linear=linear)

  @property
  def stacked(self) -> bool:
    return self.sst_u.get_value().ndim > 2

  def kernel(self) -> jax.Array:
    """The represented dense kernel `U diag(s) Vᵀ`, `[..., d_in, d_out]`."""
    u, s, v = (self.sst_u.get_value(), self.sst_s.get_value(),
               self.sst_v.get_value())
    return (u * s[..., None, :]) @ jnp.swapaxes(v, -1, -2)

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x U diag(s) Vᵀ + b` for `x: [..., d_in]`.

    Raises:
      ValueError: If the layer holds stacked factors (run it inside the
        scan) or `x` does not end in `d_in`.
    """
    u, s, v = self.sst_u[...], self.sst_s[...], self.sst_v[...]
    if u.ndim != 2:
      raise ValueError(
          f"This SSTLinear holds stacked factors {u.shape}; it runs inside "
          "the layer scan, one [d_in, m] slice at a time."
      )
    if x.shape[-1] != self.in_features:
      raise ValueError(
          f"Input ends in {x.shape[-1]}; expected {self.in_features}."
      )
    b = None if self.bias is None else self.bias[...]
    x, u, s, v, b = nnx.nn.dtypes.promote_dtype(
        (x, u, s, v, b), dtype=self.dtype)
    batch = x.shape[:-1]
    y = spectral_matmul(x.reshape(-1, self.in_features), u, s, v,
                        self.enhanced_grad)
    if b is not None:
      y = y + b[None, :]
    return y.reshape(batch + (self.out_features,))


# ----------------------------------------------------------------------------
# Model conversion.


def _modules(model: nnx.Module):
  return [(p, m) for p, m in _walk(model) if p]


def select_linears(
    model: nnx.Module,
    targets: str | Sequence[str],
    exclude: str | Sequence[str] | None = None,
    skip_types: tuple[type, ...] = (),
) -> list[tuple[tuple[Any, ...], nnx.Linear]]:
  """`(path, layer)` of the `nnx.Linear` layers chosen by `targets`.

  Targets follow `lowrank.adapters.inject`: a regex over the dotted module
  path (full match), a list of names (path equal or ending in `.name`), or
  `"all-linear"`.

  Args:
    model: An NNX model.
    targets: Which layers.
    exclude: Layers to leave alone even if they match.
    skip_types: Module types that are silently skipped (already converted).

  Returns:
    The chosen layers, in graph order.

  Raises:
    ValueError: On a bad regex, targets that match nothing, or a matched
      module that is not exactly an `nnx.Linear`; the message lists the
      linear layers that exist.
  """
  match = _matcher(targets, "targets")
  skip = (lambda p, m: False) if exclude is None else _matcher(
      exclude, "exclude")
  modules = _modules(model)
  linears = [injection.path_str(p) for p, m in modules
             if isinstance(m, nnx.Linear)]
  chosen, bad = [], []
  for p, m in modules:
    name = injection.path_str(p)
    if isinstance(m, skip_types) or not match(name, m) or skip(name, m):
      continue
    if type(m) is nnx.Linear:  # pylint: disable=unidiomatic-typecheck
      chosen.append((p, m))
    else:
      bad.append(f"{name} ({type(m).__name__})")
  if bad:
    raise ValueError(
        f"targets={targets!r} matched modules that are not nnx.Linear: "
        f"{_listing(bad)}. Linear layers: {_listing(linears)}."
    )
  if not chosen:
    raise ValueError(
        f"targets={targets!r} matched no nnx.Linear. Linear layers: "
        f"{_listing(linears)}."
    )
  return chosen


def to_sst(
    model: nnx.Module,
    *,
    targets: str | Sequence[str],
    rank: int,
    exclude: str | Sequence[str] | None = None,
    enhanced_grad: bool = True,
) -> nnx.Module:
  """Replaces the chosen `nnx.Linear` layers by `SSTLinear` (in place).

  Args:
    model: An NNX model.
    targets: Which layers: a regex over the dotted module path (full
      match), a list of names (path equal or ending in `.name`), or
      `"all-linear"` (same semantics as `lowrank.adapters.inject`).
    rank: Singular-vector pairs trained per iteration, per layer; at most
      `min(d_in, d_out)` of every chosen layer.
    exclude: Layers to leave dense even if they match.
    enhanced_grad: Use SST's enhanced gradients for `U`, `V`.

  Returns:
    `model`, with spectral layers. Each computes what its dense layer did.

  Raises:
    ValueError: On a bad regex, targets that match nothing or a module that
      is not an `nnx.Linear`, or a rank too large for a layer.
  """
  for p, m in select_linears(model, targets, exclude, (SSTLinear,)):
    try:
      new = SSTLinear.from_linear(m, rank=rank, enhanced_grad=enhanced_grad)
    except ValueError as e:
      raise ValueError(f"{injection.path_str(p)}: {e}") from e
    _set_child(model, p, new)
  return model


def sst_modules(model: nnx.Module) -> dict[str, SSTLinear]:
  """Dotted path -> `SSTLinear`, for every spectral layer of `model`."""
  return {injection.path_str(p): m for p, m in _modules(model)
          if isinstance(m, SSTLinear)}


def ranks(model: nnx.Module) -> dict[str, int]:
  """`{module path: rank}` of the spectral layers (for `sst_optimizer`)."""
  return {name: m.rank for name, m in sst_modules(model).items()}


def _dense_linear(m: SSTLinear) -> nnx.Linear:
  with nnx.use_eager_sharding(False):
    lin = nnx.Linear(
        m.in_features, m.out_features, use_bias=m.bias is not None,
        dtype=m.dtype, param_dtype=m.param_dtype,
        kernel_init=nnx.initializers.zeros_init(), rngs=nnx.Rngs(0))
  u = m.sst_u.get_value()
  w = m.kernel().astype(m.param_dtype)
  kwargs = {} if m.kernel_axes is None else {"out_sharding": m.kernel_axes}
  sh_u = getattr(u, "sharding", None)
  if isinstance(sh_u, jax.sharding.NamedSharding) and m.kernel_axes:
    try:
      spec = sharding.logical_to_spec(m.kernel_axes, mesh=sh_u.mesh,
                                      shape=w.shape)
    except ValueError:  # Custom logical names: leave placement to JAX.
      spec = None
    if spec is not None:
      w = jax.device_put(w, jax.sharding.NamedSharding(sh_u.mesh, spec))
  with nnx.use_eager_sharding(False):
    lin.kernel = nnx.Param(w, **kwargs)
  if m.bias is not None:
    lin.bias = m.bias
  return lin


def to_dense(model: nnx.Module) -> nnx.Module:
  """Replaces every `SSTLinear` by an `nnx.Linear` with `U diag(s) Vᵀ`.

  Args:
    model: A model converted with `to_sst` (in place).

  Returns:
    `model`, with dense layers (kernel logical axes restored).

  Raises:
    ValueError: If the model has no spectral layer.
  """
  mods = sst_modules(model)
  if not mods:
    raise ValueError("The model has no SSTLinear layer to convert.")
  for name, m in mods.items():
    path = tuple(int(p) if p.isdigit() else p for p in name.split("."))
    _set_child(model, path, _dense_linear(m))
  return model


# ----------------------------------------------------------------------------
# Optimizer.


class SSTState(NamedTuple):
  """State for `sst_optimizer`.

  Attributes:
    count: Steps taken; int32 `[]`.
    index: Active singular-vector indices per spectral layer (layers sorted
      by module path), int32 `[..., r]`.
    dense_state: `inner`'s state over the non-spectral leaves (a flat
      `{path: leaf}` dict); never reset.
    s_state: `inner`'s state over the singular values `{path: s}`; reset
      after every re-SVD.
    block_state: `inner`'s state over the active blocks
      `{path.sst_u: [..., d_in, r], path.sst_v: [..., d_out, r]}`; reset at
      every resample.
  """

  count: jax.Array
  index: tuple[jax.Array, ...]
  dense_state: optax.OptState
  s_state: optax.OptState
  block_state: optax.OptState


class _Group(NamedTuple):
  path: str
  rank: int


def _key_name(k) -> str:
  for attr in ("key", "name", "idx"):
    if hasattr(k, attr):
      return str(getattr(k, attr))
  return str(k)


def _flat(tree) -> tuple[list[str], list[Any], Any]:
  """Leaves with dotted paths (a trailing Variable `.value` dropped)."""
  pairs, treedef = jax.tree_util.tree_flatten_with_path(tree)
  paths = []
  for path, _ in pairs:
    names = [_key_name(k) for k in path]
    if (names and names[-1] == "value"
        and isinstance(path[-1], jax.tree_util.GetAttrKey)):
      names = names[:-1]
    paths.append(".".join(names))
  return paths, [x for _, x in pairs], treedef


def _groups(paths: list[str], leaves: list[Any], rank) -> list[_Group]:
  """The spectral layers in `paths`, validated."""
  found: dict[str, dict[str, Any]] = {}
  for path, leaf in zip(paths, leaves):
    prefix, _, last = path.rpartition(".")
    if last in SST_NAMES:
      found.setdefault(prefix, {})[last] = leaf
  groups = []
  for prefix in sorted(found):
    parts = found[prefix]
    missing = [n for n in SST_NAMES if n not in parts]
    if missing:
      raise ValueError(
          f"Spectral layer {prefix!r} lacks {missing} among the optimized "
          "leaves; optimize sst_u, sst_s and sst_v together."
      )
    u, s, v = (jnp.shape(parts[n]) for n in SST_NAMES)
    if (len(u) < 2 or u[:-2] != s[:-1] or v[:-2] != s[:-1]
        or u[-1] != s[-1] or v[-1] != s[-1]):
      raise ValueError(
          f"Spectral layer {prefix!r} has inconsistent shapes: sst_u {u}, "
          f"sst_s {s}, sst_v {v}; expected [..., d_in, m], [..., m], "
          "[..., d_out, m]."
      )
    if isinstance(rank, Mapping):
      if prefix not in rank:
        raise ValueError(
            f"rank has no entry for spectral layer {prefix!r}; it has "
            f"{sorted(rank)}."
        )
      r = rank[prefix]
    else:
      r = rank
    m = s[-1]
    if isinstance(r, bool) or not isinstance(r, int) or not 0 < r <= m:
      raise ValueError(
          f"rank for {prefix!r} must be an int in [1, {m}]; got {r!r}."
      )
    groups.append(_Group(prefix, r))
  return groups


def _sample(key: jax.Array, s: jax.Array, rank: int) -> jax.Array:
  """`sample_indices` with independent keys for each leading index."""
  batch = s.shape[:-1]
  if not batch:
    return sample_indices(key, s, rank)
  n = 1
  for d in batch:
    n *= d
  keys = jax.random.split(key, n)
  flat = jax.vmap(lambda k, x: sample_indices(k, x, rank))(
      keys, s.reshape(n, s.shape[-1]))
  return flat.reshape(batch + (rank,))


def _gather(x: jax.Array, idx: jax.Array) -> jax.Array:
  """Columns `idx [..., r]` of `x [..., d, m]` -> `[..., d, r]`."""
  return jnp.take_along_axis(x, idx[..., None, :], axis=-1)


def _scatter(x: jax.Array, idx: jax.Array, block: jax.Array) -> jax.Array:
  """`x` with columns `idx` set to `block` (inverse of `_gather`)."""
  if x.ndim == 2:
    return x.at[:, idx].set(block, unique_indices=True)
  return jax.vmap(_scatter)(x, idx, block)


def _normalize_columns(x: jax.Array) -> jax.Array:
  norm = jnp.linalg.norm(x.astype(jnp.float32), axis=-2, keepdims=True)
  return (x / jnp.maximum(norm, 1e-12).astype(x.dtype)).astype(x.dtype)


def _tree_where(cond: jax.Array, new, old):
  return jax.tree.map(lambda a, b: jnp.where(cond, a, b), new, old)


def sst_optimizer(
    inner: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int | Mapping[str, int],
    resample_every: int = 1,
    round_length: int = 200,
    weight_decay: jax.typing.ArrayLike = 0.0,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformation:
  """Sparse Spectral Training as one optax transformation.

  Spectral layers are recognised by their leaf names (`sst_u`, `sst_s`,
  `sst_v` under one module path, as `SSTLinear` names them). Each step:

  1. `inner` turns the gradients into directions: for every non-spectral
     leaf (dense training of the rest of the model), for every `s`, and for
     the active `r` columns of every `U`, `V` (gathered by index; the
     gradients there are SST's enhanced gradients when the layer computes
     them).
  2. New values are `p - lr (d + wd p)` (no weight decay on `U`, `V`);
     `s` is clamped at 0 and the active columns are renormalised; the
     other columns of `U`, `V` do not change.
  3. After every `round_length` steps, `U diag(s) Vᵀ` is re-decomposed
     (`resvd`) and `inner`'s state for `s` is reset.
  4. After every `resample_every` steps (and every re-SVD), new active
     indices are drawn from `sampling_probs(s)` (without replacement) and
     `inner`'s state for the blocks is reset, its step count included (so
     bias corrections restart with the fresh vectors).

  The learning rate (and schedule) is applied here with the global step
  count, so resets never restart a schedule.

  Args:
    inner: A gradient-only transformation (e.g. `optax.scale_by_adam()`);
      it must not apply a learning rate or weight decay. It sees flat
      `{path: array}` dicts.
    learning_rate: Scalar or schedule (of the step count).
    rank: Active vector pairs per layer: one int, or `{module path: int}`
      (e.g. `ranks(model)`).
    resample_every: Steps per iteration (between samplings); Python int.
    round_length: Steps per round (between re-SVDs); a multiple of
      `resample_every`; Python int.
    weight_decay: Decoupled weight decay on `s` and non-spectral leaves.
    seed: Int seed or PRNG key for the sampling.

  Returns:
    An `optax.GradientTransformation` whose updates are final (apply them
    with `optax.apply_updates`; do not chain a learning rate after it).

  Raises:
    ValueError: On bad schedule lengths; (at `init`/`update`) on spectral
      layers with missing leaves, inconsistent shapes or a bad rank, or when
      `params` is not given to `update`.
  """
  for name, value in (("resample_every", resample_every),
                      ("round_length", round_length)):
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
      raise ValueError(f"{name} must be a positive int; got {value!r}.")
  if round_length % resample_every:
    raise ValueError(
        f"round_length ({round_length}) must be a multiple of "
        f"resample_every ({resample_every}), so that a round ends on a "
        "resample."
    )
  if isinstance(seed, int) and not isinstance(seed, bool):
    base_key = jax.random.key(seed)
  elif jnp.issubdtype(seed.dtype, jax.dtypes.prng_key) and seed.ndim == 0:
    base_key = seed
  else:
    raise ValueError(
        f"seed must be an int or a scalar PRNG key; got {seed!r}."
    )

  def split(params):
    paths, leaves, treedef = _flat(params)
    groups = _groups(paths, leaves, rank)
    table = dict(zip(paths, leaves))
    spectral = {f"{g.path}.{n}" for g in groups for n in SST_NAMES}
    dense = {p: x for p, x in table.items() if p not in spectral}
    return paths, treedef, groups, table, dense

  def sample_all(key, groups, table):
    return tuple(
        _sample(jax.random.fold_in(key, i), table[f"{g.path}.{S_NAME}"],
                g.rank)
        for i, g in enumerate(groups))

  def blocks(groups, table, index):
    out = {}
    for g, idx in zip(groups, index):
      for n in (U_NAME, V_NAME):
        out[f"{g.path}.{n}"] = _gather(table[f"{g.path}.{n}"], idx)
    return out

  def s_tree(groups, table):
    return {f"{g.path}.{S_NAME}": table[f"{g.path}.{S_NAME}"]
            for g in groups}

  def init_fn(params):
    _, _, groups, table, dense = split(params)
    index = sample_all(jax.random.fold_in(base_key, 0), groups, table)
    return SSTState(
        count=jnp.zeros([], jnp.int32),
        index=index,
        dense_state=inner.init(dense),
        s_state=inner.init(s_tree(groups, table)),
        block_state=inner.init(blocks(groups, table, index)),
    )

  def update_fn(updates, state, params=None):
    if params is None:
      raise ValueError("sst_optimizer needs params in update().")
    _, _, groups, p_table, p_dense = split(params)
    g_paths, g_leaves, g_def = _flat(updates)
    g_table = dict(zip(g_paths, g_leaves))
    if set(g_table) != set(p_table):
      raise ValueError(
          "updates and params have different leaves: "
          f"{sorted(set(g_table) ^ set(p_table))[:5]}."
      )
    count = state.count
    lr = learning_rate(count) if callable(learning_rate) else learning_rate
    wd = weight_decay

    def step(p, d, decay=True):
      new = p - lr * (d + wd * p) if decay else p - lr * d
      return new.astype(p.dtype)

    out: dict[str, jax.Array] = {}
    # Non-spectral leaves: inner + decoupled weight decay + learning rate.
    g_dense = {k: g_table[k] for k in p_dense}
    d_dense, dense_state = inner.update(g_dense, state.dense_state, p_dense)
    for k, p in p_dense.items():
      out[k] = step(p, d_dense[k]) - p
    # Singular values: every one, every step.
    p_s = s_tree(groups, p_table)
    d_s, s_state = inner.update(s_tree(groups, g_table), state.s_state, p_s)
    # Active blocks of U and V.
    p_blk = blocks(groups, p_table, state.index)
    g_blk = blocks(groups, g_table, state.index)
    d_blk, block_state = inner.update(g_blk, state.block_state, p_blk)

    done_round = (count + 1) % round_length == 0
    resample = (count + 1) % resample_every == 0
    new_table = dict(p_table)
    for g, idx in zip(groups, state.index):
      ku, ks, kv = (f"{g.path}.{n}" for n in SST_NAMES)
      s_new = jnp.maximum(step(p_table[ks], d_s[ks]), 0).astype(
          p_table[ks].dtype)
      u_blk = _normalize_columns(step(p_blk[ku], d_blk[ku], decay=False))
      v_blk = _normalize_columns(step(p_blk[kv], d_blk[kv], decay=False))
      u_new = _scatter(p_table[ku], idx, u_blk)
      v_new = _scatter(p_table[kv], idx, v_blk)
      u_new, s_new, v_new = jax.lax.cond(
          done_round, resvd, lambda *a: a, u_new, s_new, v_new)
      new_table.update({ku: u_new, ks: s_new, kv: v_new})
      # Columns outside the block get an exact zero update (p - p).
      for k in (ku, ks, kv):
        out[k] = (new_table[k] - p_table[k]).astype(p_table[k].dtype)

    # Next iteration: new indices from the new s, fresh block state.
    key = jax.random.fold_in(base_key, count + 1)
    new_index = sample_all(key, groups, new_table)
    index = tuple(jnp.where(resample, a, b)
                  for a, b in zip(new_index, state.index))
    fresh_blocks = inner.init(blocks(groups, new_table, index))
    block_state = _tree_where(resample, fresh_blocks, block_state)
    s_state = _tree_where(done_round,
                          inner.init(s_tree(groups, new_table)), s_state)
    new_updates = jax.tree_util.tree_unflatten(
        g_def, [out[k] for k in g_paths])
    return new_updates, SSTState(
        count=count + 1, index=index, dense_state=dense_state,
        s_state=s_state, block_state=block_state)

  return optax.GradientTransformation(init_fn, update_fn)


def sst_adamw(
    learning_rate: optax.ScalarOrSchedule,
    *,
    rank: int | Mapping[str, int],
    b1: jax.typing.ArrayLike = 0.9,
    b2: jax.typing.ArrayLike = 0.999,
    eps: jax.typing.ArrayLike = 1e-8,
    weight_decay: jax.typing.ArrayLike = 0.0,
    resample_every: int = 1,
    round_length: int = 200,
    seed: int | jax.Array = 0,
) -> optax.GradientTransformation:
  """`sst_optimizer` with Adam moments (AdamW on the whole model).

  Examples:
    >>> import optax
    >>> from lowrank.spectral import sst
    >>> tx = sst.sst_adamw(1e-3, rank=4, round_length=10)
    >>> isinstance(tx, optax.GradientTransformation)
    True

  Args:
    learning_rate: Scalar or schedule.
    rank: See `sst_optimizer`.
    b1, b2, eps: Adam hyperparameters.
    weight_decay: Decoupled weight decay (not on `U`, `V`).
    resample_every, round_length, seed: See `sst_optimizer`.

  Returns:
    The transformation.
  """
  return sst_optimizer(
      optax.scale_by_adam(b1=b1, b2=b2, eps=eps), learning_rate, rank=rank,
      resample_every=resample_every, round_length=round_length,
      weight_decay=weight_decay, seed=seed)


@nnx.jit(static_argnums=2)
def _train_step(model, optimizer, loss_fn, *batch):
  loss, grads = nnx.value_and_grad(
      loss_fn, argnums=nnx.DiffState(0, optimizer.wrt))(model, *batch)
  optimizer.update(model, grads)
  return loss


def train_step(
    model: nnx.Module,
    optimizer: nnx.Optimizer,
    loss_fn: Callable[..., jax.Array],
    *batch: Any,
) -> jax.Array:
  """One jitted training step: `loss_fn(model, *batch)`, grads, update.

  Differentiates what the optimizer updates (`optimizer.wrt`); works for
  any optimizer (for SST, `sst_adamw` over `nnx.Param`). The gradients of
  spectral layers are the enhanced ones by construction.

  Args:
    model: The model (updated in place).
    optimizer: `nnx.Optimizer(model, tx, wrt=...)`.
    loss_fn: `(model, *batch) -> scalar`; hashable (it is a static
      argument of the jit, so pass the same function every step).
    *batch: Arrays passed to `loss_fn`.

  Returns:
    The loss before the update.
  """
  return _train_step(model, optimizer, loss_fn, *batch)
