"""Matrix views of N-D parameters for projected optimizers (GaLore family).

A gradient projection needs each parameter as a matrix `[m, n]` or as a
stack of independent matrices `[..., m, n]`. The axes of an N-D leaf play
one of three roles:

* **stacked** axes index independent matrices (the layer axis of
  scan-stacked layers, the batch axes of an `nnx.LinearGeneral` or of an
  `nnx.Einsum` kernel). They are never guessed from `ndim`: they come from
  metadata the model declares (`stacked_axes_from`: the `layers` logical
  axis in the variables' sharding metadata) or from an explicit argument.
* **input** axes, flattened into the rows `m` of the view.
* **output** axes, flattened into the columns `n`.

Input axes are numbered among the leaf's non-stacked axes (so the numbers
do not change when `nnx.vmap`/`nnx.scan` adds a layer axis). They come
from module metadata (`input_axes_from`: `in_features` of
`nnx.LinearGeneral`, contracted letters of `nnx.Einsum`) or an explicit
argument; otherwise the default rule applies: every non-stacked axis but
the last is an input axis. So an `nnx.MultiHeadAttention` output kernel
`[H, K, D]` is `[H·K, D]` either way, while its query kernel `[D, H, K]` is
`[D, H·K]` only with `input_axes_from(model)` (`[D·H, K]` by the default
rule).

The view is `transpose(x, stacked + inputs + outputs)` reshaped to
`lead + (m, n)`; `to_matrix` / `from_matrix` skip both ops where they are
identities (2-D leaves, leading stacked axes), so those leaves keep their
shardings untouched.
"""

from collections.abc import Callable, Sequence
import math
import re
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

# Logical axis name of scan-stacked layers (`stacked_axes_from`).
LAYER_AXIS = "layers"

# Per-leaf axes: an int, a sequence of ints, or None.
Axes = int | Sequence[int] | None
AxesFn = Callable[[str, Any], Axes]


class MatrixView(NamedTuple):
  """How one leaf is seen as (a stack of) matrices.

  Attributes:
    shape: The leaf's shape.
    perm: Axis order `stacked + inputs + outputs` (absolute axes).
    lead: Sizes of the stacked axes (one matrix per index).
    m: Product of the input axes' sizes (rows).
    n: Product of the output axes' sizes (columns).
    default_split: True when the input axes came from the default rule and
      the leaf has more than two non-stacked axes (an ambiguous split).
  """

  shape: tuple[int, ...]
  perm: tuple[int, ...]
  lead: tuple[int, ...]
  m: int
  n: int
  default_split: bool

  @property
  def matrix_shape(self) -> tuple[int, ...]:
    return self.lead + (self.m, self.n)


def make_view(shape: Sequence[int], stacked: tuple[int, ...],
              inputs: tuple[int, ...] | None) -> MatrixView | None:
  """The view of a leaf, or None when fewer than 2 axes are not stacked.

  Args:
    shape: The leaf's shape.
    stacked: Normalized (non-negative, sorted, unique) stacked axes.
    inputs: Normalized positions of the input axes among the non-stacked
      axes, or None for the default rule (all but the last).

  Returns:
    A `MatrixView`, or None for a leaf that is not a matrix.
  """
  shape = tuple(int(d) for d in shape)
  rest = [a for a in range(len(shape)) if a not in stacked]
  if len(rest) < 2:
    return None
  if inputs is None:
    ins, outs = rest[:-1], rest[-1:]
  else:
    ins = [rest[i] for i in inputs]
    outs = [a for j, a in enumerate(rest) if j not in inputs]
  perm = tuple(stacked) + tuple(ins) + tuple(outs)
  return MatrixView(
      shape=shape, perm=perm, lead=tuple(shape[a] for a in stacked),
      m=math.prod(shape[a] for a in ins), n=math.prod(shape[a] for a in outs),
      default_split=inputs is None and len(rest) > 2)


def to_matrix(x: jax.Array, view: MatrixView) -> jax.Array:
  """`x` as `view.lead + (m, n)` (no op for an identity view)."""
  if view.perm != tuple(range(len(view.shape))):
    x = jnp.transpose(x, view.perm)
  if x.shape != view.matrix_shape:
    x = x.reshape(view.matrix_shape)
  return x


def from_matrix(y: jax.Array, view: MatrixView) -> jax.Array:
  """Inverse of `to_matrix`: back to `view.shape`."""
  permuted = tuple(view.shape[a] for a in view.perm)
  if y.shape != permuted:
    y = y.reshape(permuted)
  if view.perm != tuple(range(len(view.shape))):
    y = jnp.transpose(y, tuple(int(a) for a in np.argsort(view.perm)))
  return y


def _is_axes(x: Any) -> bool:
  return (x is None or isinstance(x, int) or (
      isinstance(x, (tuple, list)) and all(isinstance(a, int) for a in x)))


def has_variables(tree: Any) -> bool:
  return any(isinstance(x, nnx.Variable) for x in jax.tree.leaves(
      tree, is_leaf=lambda x: isinstance(x, nnx.Variable)))


def _path_str(path: tuple[Any, ...]) -> str:
  """`keystr` of a pure-dict path made of raw keys (str or int)."""
  return "".join(f"[{k!r}]" for k in path)


def _nest(flat: dict[tuple[Any, ...], Any]) -> dict[Any, Any]:
  out: dict[Any, Any] = {}
  for path, value in flat.items():
    node = out
    for k in path[:-1]:
      node = node.setdefault(k, {})
    node[path[-1]] = value
  return out


def _flat_variables(tree: Any) -> list[tuple[tuple[Any, ...], Any]]:
  """`(raw key path, Variable)` pairs of a Module or of a state."""
  state = nnx.state(tree) if isinstance(tree, nnx.Module) else tree
  if not has_variables(state):
    raise TypeError(
        "Expected an nnx.Module or a state holding nnx.Variables (e.g. "
        f"nnx.state(model)); got {type(tree).__name__} without Variables. "
        "Pure arrays (nnx.as_pure) carry no axis metadata: pass the state "
        "itself.")
  flat, _ = jax.tree_util.tree_flatten_with_path(
      state, is_leaf=lambda x: isinstance(x, nnx.Variable))
  return [(tuple(_raw_key(k) for k in p), v) for p, v in flat
          if isinstance(v, nnx.Variable)]


def _raw_key(k: Any) -> Any:
  for attr in ("key", "idx", "name"):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def _axis_names(var: Any) -> tuple[Any, ...]:
  meta = var.get_metadata()
  for key in ("out_sharding", "sharding_names", "sharding"):
    names = meta.get(key)
    if isinstance(names, (tuple, list)):
      return tuple(names)
  return ()


def _einsum_roles(einsum_str: str) -> tuple[str, str, str]:
  s = einsum_str.replace(" ", "")
  if "->" not in s or s.count(",") != 1:
    raise ValueError(
        f"Expected an explicit two-operand einsum 'lhs,kernel->out'; got "
        f"{einsum_str!r}.")
  ins, out = s.split("->")
  lhs, ker = ins.split(",")
  return lhs, ker, out


def _module_kernel_axes(module: nnx.Module) -> tuple[
    tuple[int, ...], tuple[int, ...]] | None:
  """`(batch axes, input positions among non-batch axes)` of a kernel."""
  if isinstance(module, nnx.LinearGeneral):
    nb, nin = len(module.batch_axis), len(module.in_features)
    return tuple(range(nb)), tuple(range(nin))
  if isinstance(module, nnx.Einsum):
    lhs, ker, out = _einsum_roles(module.einsum_str)
    batch = tuple(i for i, c in enumerate(ker) if c in lhs and c in out)
    rest = [c for i, c in enumerate(ker) if i not in batch]
    # Letters only in the input, or summed out in the kernel alone, are
    # contracted: rows of the view.
    ins = tuple(j for j, c in enumerate(rest) if c not in out)
    return batch, ins
  if isinstance(module, nnx.Linear):
    return (), (0,)
  return None


def _kernel_modules(model: nnx.Module) -> dict[tuple[Any, ...], Any]:
  out = {}
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      axes = _module_kernel_axes(node)
      if axes is not None:
        out[tuple(path) + ("kernel",)] = axes
  return out


def _with_layer_axes(rel: tuple[int, ...], layer_axes: tuple[int, ...],
                     ndim: int) -> tuple[int, ...]:
  """Module-relative kernel axes as absolute axes of a layer-stacked leaf."""
  others = [a for a in range(ndim) if a not in layer_axes]
  return tuple(others[a] for a in rel)


def stacked_axes_from(model_or_state: Any,
                      axis_name: str = LAYER_AXIS) -> dict[Any, Any]:
  """Stacked (independent-matrix) axes of every variable, from metadata.

  An axis is stacked when the variable's logical axis names
  (`out_sharding`, as set by `nnx.with_partitioning` and by the
  `transform_metadata={nnx.PARTITION_NAME: "layers"}` of `nnx.vmap` /
  `nnx.scan`) name it `axis_name`. Given an `nnx.Module`, the batch axes of
  `nnx.LinearGeneral` kernels (`batch_axis`) and the kernel axes of an
  `nnx.Einsum` that appear in both its input and its output are stacked
  too.

  Args:
    model_or_state: An `nnx.Module`, or a state holding `nnx.Variable`s
      (`nnx.state(model)`, also abstract from `nnx.eval_shape`).
    axis_name: The logical name of the layer axis.

  Returns:
    A nested dict mirroring the state (raw keys), whose leaves are tuples of
    axis indices (`()` for a leaf with none); pass it as `stacked_axes=`.

  Raises:
    TypeError: If the argument holds no `nnx.Variable` (e.g. pure arrays).
  """
  kernels = (_kernel_modules(model_or_state)
             if isinstance(model_or_state, nnx.Module) else {})
  flat = {}
  for path, var in _flat_variables(model_or_state):
    ndim = len(np.shape(var.get_value()))
    layers = tuple(i for i, name in enumerate(_axis_names(var))
                   if name == axis_name or (
                       isinstance(name, (tuple, list)) and axis_name in name))
    axes = set(layers)
    if path in kernels:
      axes.update(_with_layer_axes(kernels[path][0], layers, ndim))
    flat[path] = tuple(sorted(axes))
  return _nest(flat)


def input_axes_from(model: Any) -> dict[Any, Any]:
  """Input axes of the kernels of `nnx.Linear`, `LinearGeneral`, `Einsum`.

  `nnx.LinearGeneral` (and so `nnx.MultiHeadAttention`) kernels are
  `batch + in_features + out_features`: the `in_features` axes are the
  inputs, so a query kernel `[D, H, K]` is viewed as `[D, H·K]` and an
  output kernel `[H, K, D]` as `[H·K, D]`. For an `nnx.Einsum` the inputs
  are the kernel letters contracted with the input operand. Positions are
  counted among the non-stacked axes (pair it with
  `stacked_axes=stacked_axes_from(model)`).

  Args:
    model: The `nnx.Module` (concrete or from `nnx.eval_shape`).

  Returns:
    A nested dict mirroring `nnx.state(model)`: a tuple of input positions
    for each recognised kernel, None (the default rule) for every other
    variable; pass it as `input_axes=`.

  Raises:
    TypeError: If `model` is not an `nnx.Module`.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(
        "input_axes_from reads module attributes (in_features, einsum_str) "
        f"and needs an nnx.Module; got {type(model).__name__}.")
  kernels = _kernel_modules(model)
  flat = {path: kernels[path][1] if path in kernels else None
          for path, _ in _flat_variables(model)}
  return _nest(flat)


def _normalize(value: Any, ndim: int, *, name: str, path: str,
               shape: tuple[int, ...]) -> tuple[int, ...]:
  if value is None:
    return ()
  items = (value,) if isinstance(value, int) else value
  if not isinstance(items, (tuple, list)) or not all(
      isinstance(a, int) and not isinstance(a, bool) for a in items):
    raise TypeError(
        f"{name} for leaf {path} must be an int, a sequence of ints or "
        f"None; got {value!r}.")
  out = []
  for a in items:
    if not -ndim <= a < ndim:
      raise ValueError(
          f"{name}={value!r} for leaf {path} of shape {shape}: axis {a} is "
          f"out of range for {ndim} axes.")
    out.append(a % ndim)
  if len(set(out)) != len(out):
    raise ValueError(
        f"{name}={value!r} for leaf {path} names an axis twice.")
  return tuple(sorted(out))


def compile_selector(arg: Any, name: str) -> Any:
  """Compiles a regex argument once (ValueError naming `name` if invalid)."""
  if isinstance(arg, str):
    try:
      return re.compile(arg)
    except re.error as e:
      raise ValueError(
          f"{name}={arg!r} is not a valid regular expression ({e}); "
          "expected a regex searched in each leaf's key path, e.g. "
          r"r'attn|mlp' or r'\['layers'\]'.") from e
  return arg


def candidates(paths: Sequence[str], limit: int = 20) -> str:
  shown = ", ".join(paths[:limit])
  more = len(paths) - limit
  return f"[{shown}{f', ... and {more} more' if more > 0 else ''}]"


def _from_tree(arg: Any, paths: Sequence[str], name: str) -> list[Any]:
  """Per-leaf values of a pytree matched to the leaves by key path."""
  table = {jax.tree_util.keystr(p): v for p, v in
           jax.tree_util.tree_leaves_with_path(arg, is_leaf=_is_axes)}
  missing = [p for p in paths if p not in table]
  if missing:
    raise ValueError(
        f"{name} has no entry for {len(missing)} of the {len(paths)} "
        f"leaves: {candidates(missing, 5)}; its entries are "
        f"{candidates(sorted(table), 5)}. Build it from the same state that "
        "is passed to tx.init (e.g. optim.stacked_axes_from(model) for "
        "nnx.state(model)).")
  return [table[p] for p in paths]


def resolve(arg: Any, name: str, paths: Sequence[str],
            leaves: Sequence[Any], *, regex_axes: Any = None) -> list[Any]:
  """Raw per-leaf values of a regex / callable / pytree argument.

  Args:
    arg: None, a compiled regex (leaves whose key path matches get
      `regex_axes`), a callable `(path, leaf) -> value`, or a pytree whose
      leaves are matched to `paths` by key path.
    name: The argument's name, for errors.
    paths: Key paths (`jax.tree_util.keystr`) of the leaves.
    leaves: The leaves.
    regex_axes: Value for regex matches (None: regex not allowed).

  Returns:
    One raw value per leaf (None where `arg` is None).

  Raises:
    ValueError: If a regex matches no leaf, or a pytree lacks a leaf.
    TypeError: On a regex where none is allowed.
  """
  if arg is None:
    return [None] * len(paths)
  if isinstance(arg, re.Pattern):
    if regex_axes is None:
      raise TypeError(
          f"{name} takes a callable (path, leaf) -> axes or a pytree of "
          f"axes; got the regex {arg.pattern!r}.")
    hits = [bool(arg.search(p)) for p in paths]
    if not any(hits):
      raise ValueError(
          f"{name}={arg.pattern!r} matches no leaf; candidate paths: "
          f"{candidates(list(paths))}.")
    return [regex_axes if h else None for h in hits]
  if callable(arg):
    return [arg(p, x) for p, x in zip(paths, leaves)]
  return _from_tree(arg, paths, name)


def stacked_per_leaf(arg: Any, paths: Sequence[str],
                     leaves: Sequence[Any]) -> list[tuple[int, ...]]:
  """Normalized stacked axes of each leaf from a `stacked_axes` argument."""
  raw = resolve(arg, "stacked_axes", paths, leaves, regex_axes=(0,))
  return [
      _normalize(v, len(np.shape(x)), name="stacked_axes", path=p,
                 shape=tuple(np.shape(x)))
      for v, p, x in zip(raw, paths, leaves)
  ]


def inputs_per_leaf(arg: Any, paths: Sequence[str], leaves: Sequence[Any],
                    stacked: Sequence[tuple[int, ...]]) -> list[
                        tuple[int, ...] | None]:
  """Normalized input positions of each leaf from an `input_axes` argument.

  Raises:
    ValueError: If a leaf's input axes leave no output axis.
  """
  raw = resolve(arg, "input_axes", paths, leaves)
  out = []
  for v, p, x, s in zip(raw, paths, leaves, stacked):
    shape = tuple(np.shape(x))
    k = len(shape) - len(s)
    if v is None or k < 2:
      out.append(None)
      continue
    ins = _normalize(v, k, name="input_axes", path=p, shape=shape)
    if not ins or len(ins) == k:
      raise ValueError(
          f"input_axes={v!r} for leaf {p} of shape {shape} (stacked axes "
          f"{s}) must leave at least one input and one output axis among "
          f"its {k} non-stacked axes.")
    out.append(ins)
  return out
