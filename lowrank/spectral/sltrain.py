r"""SLTrain: sparse plus low-rank linear layers for pretraining.

Each chosen weight is replaced by `W = (α/r) A B + S` (kernel layout
`[d_in, d_out]`; SLTrain's `(α/r) B A` in torch's `[out, in]` layout):

* `A: [d_in, r]` kaiming-uniform `U(±1/√d_in)`, `B: [r, d_out]` zeros;
* `S` has a fixed random support of `nnz = ⌊density · d_in · d_out⌋`
  entries (at least 1), drawn once without replacement and sorted
  (row-major), kept as non-trainable int32 arrays (`SparseIndex`
  variables); its values are trainable, `U(±1/√d_in)` at init.

The dense `W` is never formed, in the forward or the backward pass: the
low-rank part is `((x A) B)·α/r` and the sparse part is a custom-VJP
gather / scatter-add over the support (`sparse_matmul`), whose gradient
w.r.t. the values is `Σ_n x[n, row_k] dy[n, col_k]`, i.e. the dense
gradient `xᵀ dy` read at the support. The support is processed in chunks
under `lax.scan`, so no `[tokens, nnz]` temporary exists either. Compiled
temporaries of one SGD step (CPU, `d_in = d_out = 1024`, `r = 32`, 3%):

| formulation                          | 64 tokens | 512 tokens |
|--------------------------------------|-----------|------------|
| materialise `W`, then `x W`          | 8.0 MiB   | 8.0 MiB    |
| this module (chunked, custom VJP)    | 1.4 MiB   | 8.1 MiB    |
| plain gather + scatter-add           | 8.2 MiB   | 65 MiB     |
| `segment_sum`                        | 8.4 MiB   | 67 MiB     |
| `jax.experimental.sparse` BCOO       | 8.4 MiB   | 67 MiB     |

Un-chunked sparse products hold `tokens × nnz` elements, which exceeds `W`
once there are more than `1/density` tokens. With many tokens the
activation-sized buffers (`tokens × d`) dominate every formulation; the
saving that remains is that no `W` is kept between forward and backward
and no dense optimizer state exists.

Like the reference implementation this is a pretraining layer: the dense
weights of a converted layer are discarded (`to_sltrain`).

Differences from the official code (andyjm3/SLTrain@2335d62c75df,
`splora/splora_linear.py`, `splora/splora_model.py`, `scripts/llm_pretrain`):

* Bias: the official layer draws a fresh bias `U(±1/√d_out)`; lowrank keeps
  the converted layer's bias (the model's own bias init, zeros for a fresh
  `nnx.Linear`), as a conversion of the model it is given.
  `bias_init="uniform"` draws the official one (`presets.paper(to_sltrain)`).
  Bias-free models (LLaMA) are unaffected.
* Numerics: the official kernel forms the dense `W = (α/r) B A + S` in the
  parameter dtype (bfloat16 in the scripts) and applies it with one matmul;
  here `W` is never formed and the sparse part accumulates in float32 (the
  memory table above). Same function; the rounding differs in bfloat16.
  Not available otherwise.
* `α/r` is a per-model-size setting in the official scripts, not a
  default: 60M `rank=128, alpha=32` (the scripts' and this module's
  `alpha=32`, `α/r = 0.25`); 130M and 350M `rank=256, alpha=16`; 1B
  `rank=512, alpha=8`; `density=0.03` in all of them (`--sp_ratio 0.03`;
  the official command-line default is 0.01).
* `nnz` is `int(density · d_in · d_out)` (floor) as in the official code;
  it was rounded before (one entry more for some shapes).

References:
  Han, Li, Zhou, Xu, Ruan, Chen, Wang, Xiang 2024, SLTrain: a sparse plus
  low-rank approach for parameter and memory efficient pretraining,
  https://arxiv.org/abs/2406.02214 (code: github.com/andyjm3/SLTrain)
"""

from collections.abc import Sequence
import functools
import math
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp

from lowrank import presets
from lowrank.adapters import layers
from lowrank.adapters import lora
from lowrank.spectral import sst

BIAS_INITS = ("keep", "uniform")


class SparseIndex(nnx.Variable):
  """Fixed support of a sparse matrix (int32; neither trained nor decayed)."""


def sparse_support(
    key: jax.Array, d_in: int, d_out: int, nnz: int
) -> tuple[jax.Array, jax.Array]:
  """`nnz` distinct positions of a `[d_in, d_out]` matrix, row-major sorted.

  Args:
    key: PRNG key.
    d_in: Rows.
    d_out: Columns.
    nnz: Number of positions, `1 <= nnz <= d_in · d_out`.

  Returns:
    `(rows, cols)`, int32 `[nnz]` each.

  Raises:
    ValueError: On a bad `nnz` or a matrix with `2³¹` or more entries.
  """
  total = d_in * d_out
  if total >= 2**31:
    raise ValueError(f"{d_in} x {d_out} has too many entries for int32.")
  if not 0 < nnz <= total:
    raise ValueError(f"nnz must be in [1, {total}]; got {nnz}.")
  flat = jnp.sort(jax.random.choice(key, total, (nnz,), replace=False))
  flat = flat.astype(jnp.int32)
  return flat // d_out, flat % d_out


def default_chunk(tokens: int, d_in: int, d_out: int, nnz: int) -> int:
  """Support entries processed per scan step by `sparse_matmul`.

  Each step holds a few `[chunk, tokens]` temporaries; the chunk keeps one
  of them under an eighth of a dense `[d_in, d_out]` matrix (but at least
  256 entries, so huge batches do not degenerate into one entry per step).
  """
  budget = (d_in * d_out) // (8 * max(tokens, 1))
  return max(1, min(nnz, max(256, budget)))


def _chunked(arrays, chunk):
  n = arrays[0].shape[0]
  steps = -(-n // chunk)
  pad = steps * chunk - n
  return [jnp.pad(a, (0, pad)).reshape(steps, chunk) for a in arrays]


def sparse_matmul(
    x2: jax.Array,
    values: jax.Array,
    rows: jax.Array,
    cols: jax.Array,
    d_out: int,
    chunk: int | None = None,
) -> jax.Array:
  """`x2 @ S` for the sparse `S[rows, cols] = values` of shape `[d_in, d_out]`.

  Neither `S` densely nor a `[N, nnz]` product is formed: the support is
  processed `chunk` entries at a time (gather the input rows, scale,
  scatter-add into the output) in a `lax.scan`, and the custom backward
  does the same for `dx = dy Sᵀ` and `dvalues[k] = Σ_n x2[n, rows[k]]
  dy[n, cols[k]]`. Accumulation is in float32.

  Args:
    x2: `[N, d_in]`.
    values: `[nnz]`.
    rows: int `[nnz]`, sorted (row-major support from `sparse_support`).
    cols: int `[nnz]`.
    d_out: Output width (static).
    chunk: Entries per scan step (static; `None`: `default_chunk`).

  Returns:
    `[N, d_out]` in `x2`'s dtype.
  """
  if chunk is None:
    chunk = default_chunk(x2.shape[0], x2.shape[1], d_out, values.shape[0])
  return _sparse_matmul(x2, values, rows, cols, int(d_out), int(chunk))


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _sparse_matmul(x2, values, rows, cols, d_out, chunk):
  return _sparse_fwd(x2, values, rows, cols, d_out, chunk)[0]


def _sparse_fwd(x2, values, rows, cols, d_out, chunk):
  xt = x2.T.astype(jnp.float32)  # [d_in, N]: gathers move whole rows.

  def body(yt, part):
    v, r, c = part
    return yt.at[c].add(xt[r] * v.astype(jnp.float32)[:, None]), None

  yt0 = jnp.zeros((d_out, x2.shape[0]), jnp.float32)
  yt, _ = jax.lax.scan(body, yt0, _chunked([values, rows, cols], chunk))
  return yt.T.astype(x2.dtype), (x2, values, rows, cols)


def _sparse_bwd(d_out, chunk, res, dy):
  del d_out
  x2, values, rows, cols = res
  xt = x2.T.astype(jnp.float32)
  dyt = dy.T.astype(jnp.float32)

  def body(dxt, part):
    v, r, c = part
    g = dyt[c]  # [chunk, N]
    dv = jnp.sum(xt[r] * g, axis=1)
    dxt = dxt.at[r].add(g * v.astype(jnp.float32)[:, None],
                        indices_are_sorted=True)
    return dxt, dv

  dxt, dvs = jax.lax.scan(body, jnp.zeros_like(xt),
                          _chunked([values, rows, cols], chunk))
  dvalues = dvs.reshape(-1)[: values.shape[0]].astype(values.dtype)
  return dxt.T.astype(x2.dtype), dvalues, None, None


_sparse_matmul.defvjp(_sparse_fwd, _sparse_bwd)


def _check_int(name: str, value, low: int = 1) -> None:
  if isinstance(value, bool) or not isinstance(value, int) or value < low:
    raise ValueError(f"{name} must be an int >= {low}; got {value!r}.")


class SLTrainLinear(nnx.Module):
  """`y = x ((α/r) A B + S) + b` with `S` on a fixed random support.

  Attributes:
    lora_a: `nnx.Param` `[..., d_in, r]`.
    lora_b: `nnx.Param` `[..., r, d_out]`.
    sparse_values: `nnx.Param` `[..., nnz]`.
    sparse_rows, sparse_cols: `SparseIndex` int32 `[..., nnz]`.
    bias: `nnx.Param` `[..., d_out]` or `None`.
    in_features, out_features, rank, alpha, scale, density, nnz, chunk_size,
    dtype, param_dtype, kernel_axes: Static configuration.
  """

  def __init__(
      self,
      in_features: int,
      out_features: int,
      *,
      rank: int,
      density: float | int = 0.03,
      alpha: float | int = 32.0,
      use_bias: bool = True,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      chunk_size: int | None = None,
      rngs: nnx.Rngs,
      linear: nnx.Linear | None = None,
      bias_init: str = "keep",
  ):
    """Builds a freshly initialised layer.

    Args:
      in_features: `d_in`.
      out_features: `d_out`.
      rank: Low-rank dimension `r`.
      density: Fraction of `S`'s entries on the support, in `(0, 1]`.
      alpha: Scale numerator (SLTrain's `lora_alpha`; the README uses 32).
      use_bias: Add a zero-initialised bias (ignored with `linear`).
      dtype: Compute dtype (`None`: promote input and parameters).
      param_dtype: Parameter dtype (ignored with `linear`).
      chunk_size: Support entries per scan step (`None`: `default_chunk`).
      rngs: Keys for `A`, the support and the values.
      linear: Take sizes, dtypes, logical axes, (stacked) leading dims and
        the bias from this layer; its kernel is discarded.
      bias_init: `"keep"`: the bias of `linear` (zeros for a fresh layer);
        `"uniform"`: a fresh `U(±1/√d_out)` bias, as the official
        `SpLoRaLinear` draws it (layers with a bias only).

    Raises:
      ValueError: On bad hyperparameters or mismatched sizes.
    """
    _check_int("rank", rank)
    if bias_init not in BIAS_INITS:
      raise ValueError(f"bias_init must be one of {BIAS_INITS}; got "
                       f"{bias_init!r}.")
    if not 0.0 < density <= 1.0:
      raise ValueError(f"density must be in (0, 1]; got {density!r}.")
    if not math.isfinite(alpha):
      raise ValueError(f"alpha must be finite; got {alpha!r}.")
    if chunk_size is not None:
      _check_int("chunk_size", chunk_size)
    linear = sst.base_linear(
        in_features, out_features, linear, use_bias=use_bias, dtype=dtype,
        param_dtype=param_dtype, kernel_init=nnx.initializers.zeros_init(),
        rngs=rngs)
    kvar = linear.kernel
    kernel = kvar.get_value()
    lead_shape = kernel.shape[:-2]
    total = in_features * out_features
    nnz = max(1, int(density * total))  # Floor, as the official code.
    self.in_features = in_features
    self.out_features = out_features
    self.rank = rank
    self.alpha = float(alpha)
    self.scale = self.alpha / rank
    self.density = float(density)
    self.nnz = nnz
    self.chunk_size = chunk_size
    self.dtype = linear.dtype
    self.param_dtype = kernel.dtype
    self.kernel_axes = sst.logical_axes(kvar)

    n_lead = math.prod(lead_shape)
    key = rngs.params()
    key_a, key_s, key_v = jax.random.split(key, 3)

    def per_layer(fn, key):
      keys = jax.random.split(key, n_lead)
      out = jax.vmap(fn)(keys)
      return jax.tree.map(lambda a: a.reshape(lead_shape + a.shape[1:]), out)

    bound = 1.0 / math.sqrt(in_features)
    a = per_layer(lambda k: lora.init_a(k, (in_features, rank), in_features,
                                        dtype=kernel.dtype), key_a)
    b = jnp.zeros(lead_shape + (rank, out_features), kernel.dtype)
    rows, cols = per_layer(
        lambda k: sparse_support(k, in_features, out_features, nnz), key_s)
    values = per_layer(lambda k: jax.random.uniform(
        k, (nnz,), kernel.dtype, -bound, bound), key_v)
    lead = tuple(range(len(lead_shape)))
    i, o = len(lead_shape), len(lead_shape) + 1
    make = functools.partial(layers.make_variable, like=kvar)
    self.lora_a = make(nnx.Param, a, dims=lead + (i, None))
    self.lora_b = make(nnx.Param, b, dims=lead + (None, o))
    self.sparse_values = make(nnx.Param, values, dims=lead + (None,))
    self.sparse_rows = make(SparseIndex, rows, dims=lead + (None,))
    self.sparse_cols = make(SparseIndex, cols, dims=lead + (None,))
    bias = linear.bias
    if bias is not None and bias_init == "uniform":
      old = bias.get_value()
      bound = 1.0 / math.sqrt(out_features)
      new = per_layer(lambda k: jax.random.uniform(
          k, (out_features,), old.dtype, -bound, bound),
                      jax.random.fold_in(key, 3))
      if isinstance(getattr(old, "sharding", None),
                    jax.sharding.NamedSharding):
        new = jax.device_put(new, old.sharding)
      bias = bias.replace(new)
    self.bias = nnx.data(bias)

  @classmethod
  def from_linear(
      cls,
      linear: nnx.Linear,
      *,
      rank: int,
      density: float | int = 0.03,
      alpha: float | int = 32.0,
      chunk_size: int | None = None,
      rngs: nnx.Rngs,
      bias_init: str = "keep",
  ) -> "SLTrainLinear":
    """A fresh SLTrain layer in place of `linear` (its kernel is dropped)."""
    return cls(linear.in_features, linear.out_features, rank=rank,
               density=density, alpha=alpha, chunk_size=chunk_size,
               rngs=rngs, linear=linear, bias_init=bias_init)

  def num_trainable(self) -> int:
    """`r (d_in + d_out) + nnz` (+ bias) per layer, times stacked layers."""
    state = nnx.state(self, nnx.Param)
    return sum(x.size for x in jax.tree.leaves(nnx.to_pure_dict(state)))

  def sparse_dense(self) -> jax.Array:
    """`S` as a dense `[..., d_in, d_out]` array (tests / export only)."""
    rows, cols = self.sparse_rows.get_value(), self.sparse_cols.get_value()
    values = self.sparse_values.get_value()

    def one(r, c, v):
      z = jnp.zeros((self.in_features, self.out_features), v.dtype)
      return z.at[r, c].set(v)

    lead = values.shape[:-1]
    if not lead:
      return one(rows, cols, values)
    flat = jax.vmap(one)(rows.reshape(-1, self.nnz),
                         cols.reshape(-1, self.nnz),
                         values.reshape(-1, self.nnz))
    return flat.reshape(lead + flat.shape[1:])

  def kernel(self) -> jax.Array:
    """The represented `(α/r) A B + S`, `[..., d_in, d_out]` (export)."""
    a, b = self.lora_a.get_value(), self.lora_b.get_value()
    return self.scale * (a @ b) + self.sparse_dense()

  def __call__(self, x: jax.Array) -> jax.Array:
    """`x ((α/r) A B + S) + b` for `x: [..., d_in]` (no dense `W`).

    Raises:
      ValueError: On stacked parameters (run inside the layer scan) or an
        input that does not end in `d_in`.
    """
    params = (self.lora_a[...], self.lora_b[...], self.sparse_values[...])
    rows, cols = self.sparse_rows[...], self.sparse_cols[...]

    def matmul(x2, a, b, values):
      y = ((x2 @ a) @ b) * jnp.asarray(self.scale, x2.dtype)
      return y + sparse_matmul(x2, values, rows, cols, self.out_features,
                               self.chunk_size)

    return sst.apply_flat(self, x, params, matmul)


def to_sltrain(
    model: nnx.Module,
    *,
    targets: str | Sequence[str],
    rank: int,
    density: float | int = 0.03,
    alpha: float | int = 32.0,
    exclude: str | Sequence[str] | None = None,
    chunk_size: int | None = None,
    rngs: nnx.Rngs | int = 0,
    bias_init: str = "keep",
) -> nnx.Module:
  """Replaces the chosen `nnx.Linear` layers by fresh `SLTrainLinear`s.

  The dense kernels are dropped (SLTrain is a pretraining
  parameterisation); biases are kept (`bias_init="keep"`) or drawn afresh
  as the official code does (`"uniform"`; see the module docstring's
  differences). Train with any optimizer over `nnx.Param` (the supports are
  `SparseIndex` variables, not parameters).

  Args:
    model: An NNX model (modified in place).
    targets: Regex / names / `"all-linear"`, as `lowrank.adapters.inject`.
    rank: Low-rank dimension.
    density: Support fraction of `S` (SLTrain's `sp_ratio`, e.g. 0.03).
    alpha: Scale numerator (`α/r`).
    exclude: Layers to leave dense even if they match.
    chunk_size: See `SLTrainLinear`.
    rngs: `nnx.Rngs` or int seed for the new parameters and supports.
    bias_init: `"keep"` or `"uniform"`, see `SLTrainLinear`.

  Returns:
    `model`.

  Raises:
    ValueError: On a bad regex, targets matching nothing or a non-Linear,
      or bad hyperparameters.
  """
  rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
  return sst.replace_linears(
      model, targets, exclude, SLTrainLinear,
      lambda _, linear: SLTrainLinear.from_linear(
          linear, rank=rank, density=density, alpha=alpha,
          chunk_size=chunk_size, rngs=rngs, bias_init=bias_init))


presets.register(
    "to_sltrain",
    source="andyjm3/SLTrain@2335d62c75df (splora/splora_linear.py, "
    "splora/splora_model.py, scripts/llm_pretrain)",
    kwargs={"bias_init": "uniform"},
    reasons={"bias_init": "the official layer draws a fresh U(±1/√d_out) "
             "bias; lowrank keeps the converted layer's bias"},
    unavailable=(
        "the official numerics: W = (α/r) B A + S formed densely in the "
        "parameter dtype (bfloat16 in the scripts) and applied in one "
        "matmul; here W is never formed and S accumulates in float32",
        "the per-size rank and α are arguments, not a preset: 60M rank=128, "
        "alpha=32; 130M/350M rank=256, alpha=16; 1B rank=512, alpha=8"))


def sltrain_modules(model: nnx.Module) -> dict[str, SLTrainLinear]:
  """Dotted path -> `SLTrainLinear` for every SLTrain layer of `model`."""
  return sst.modules_of(model, SLTrainLinear)
