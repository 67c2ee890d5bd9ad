"""Mesh construction, the logical-axis rules table, and derived shardings.

Library code speaks only *logical* axis names (`batch`, `embed`, `mlp`,
`heads`, `kv`, `vocab`, `lowrank`, ...). One table, `LOGICAL_AXIS_RULES`,
maps them to the mesh axes `data`, `fsdp`, `tensor` (the MaxText / t5x idiom).
Binaries own the mesh; modules are built inside `use_mesh(...)` so Flax NNX
shards their variables eagerly.

The helpers here derive `NamedSharding`s for parameters, adapter parameters
and optimizer state from that table, with `jax.eval_shape` where a value is
not needed, and refuse to hand back a silently replicated large leaf when
asked to check (`check_sharded`).
"""

from collections.abc import Iterator, Mapping, Sequence
import contextlib
import math
from typing import Any

from flax import nnx
from flax.core import spmd as flax_spmd
import jax

P = jax.sharding.PartitionSpec
NamedSharding = jax.sharding.NamedSharding

# Logical (model-side) axis name -> mesh axis name(s). One table, one file.
LOGICAL_AXIS_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    ("batch", ("data", "fsdp")),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("length", None),
    ("position", None),
    ("type", None),
    ("norm", None),
    ("lowrank", None),  # Adapter / projector rank axis: always replicated.
    ("layers", None),  # Scan-stacked layer axis: replicated.
)
MESH_AXES = ("data", "fsdp", "tensor")


def make_mesh(
    axes: Sequence[tuple[str, int]] | Mapping[str, int] | None = None,
    *,
    devices: Sequence[jax.Device] | None = None,
) -> jax.sharding.Mesh:
  """Builds a mesh with Auto axis types; one size may be -1 (inferred).

  `jax.make_mesh` defaults to Explicit axes in recent JAX, under which SVD of
  sharded operands and ambiguous contractions fail; library code targets Auto
  (GSPMD / Shardy propagation), so the axis types are always set here.

  Args:
    axes: `[("data", -1), ("fsdp", 4), ("tensor", 1)]` or the same as a
      mapping. Default: all devices on `data`, `fsdp = tensor = 1`.
    devices: Devices to use (default: `jax.devices()`).

  Returns:
    A `jax.sharding.Mesh` whose axes are all `AxisType.Auto`.

  Raises:
    ValueError: On unknown axis names, more than one -1, non-positive sizes, or
      sizes whose product does not equal the device count.
  """
  if axes is None:
    axes = tuple((a, -1 if a == "data" else 1) for a in MESH_AXES)
  items = list(axes.items() if isinstance(axes, Mapping) else axes)
  names = tuple(str(n) for n, _ in items)
  sizes = [int(s) for _, s in items]
  unknown = sorted(set(names) - set(MESH_AXES))
  if unknown:
    raise ValueError(
        f"Unknown mesh axis names {unknown}; expected a subset of {MESH_AXES}."
    )
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if sizes.count(-1) > 1:
    raise ValueError(f"At most one mesh axis may be -1; got {dict(items)}.")
  if any(s == 0 or s < -1 for s in sizes):
    raise ValueError(f"Mesh axis sizes must be positive or -1; got {items}.")
  if -1 in sizes:
    known = math.prod(s for s in sizes if s != -1)
    if n % known:
      raise ValueError(
          f"Cannot infer the -1 axis: {n} devices are not divisible by the "
          f"product {known} of the other axes {dict(items)}."
      )
    sizes[sizes.index(-1)] = n // known
  if math.prod(sizes) != n:
    raise ValueError(
        f"Mesh {dict(zip(names, sizes))} needs {math.prod(sizes)} devices; "
        f"{n} are available."
    )
  return jax.make_mesh(
      tuple(sizes),
      names,
      axis_types=(jax.sharding.AxisType.Auto,) * len(names),
      devices=devices,
  )


@contextlib.contextmanager
def use_mesh(
    mesh: jax.sharding.Mesh | None = None, rules=LOGICAL_AXIS_RULES
) -> Iterator[jax.sharding.Mesh]:
  """Sets the mesh and the logical-axis rules; default: all devices on data.

  Flax NNX shards variables eagerly, so every module with sharding
  annotations must be built inside this context (on one CPU it is a 1x1x1
  mesh).

  Args:
    mesh: The mesh (default `make_mesh()`).
    rules: Logical-axis rules (default `LOGICAL_AXIS_RULES`).

  Yields:
    The mesh.
  """
  mesh = make_mesh() if mesh is None else mesh
  with jax.set_mesh(mesh), nnx.logical_axis_rules(rules):
    yield mesh


def current_mesh_and_rules(
    model: nnx.Module | None = None,
) -> tuple[jax.sharding.Mesh | None, tuple[Any, ...]]:
  """`(mesh, rules)` in effect: for loaders that place weights as they read.

  The mesh is that of `model`'s parameters when they carry a
  `NamedSharding`, else the active one (`use_mesh` / `jax.set_mesh`), else
  `None` (place nothing on a mesh). The rules are those set by
  `nnx.logical_axis_rules` (e.g. by `use_mesh`), else `LOGICAL_AXIS_RULES`.
  """
  rules = flax_spmd.get_logical_axis_rules() or LOGICAL_AXIS_RULES
  if model is not None:
    for leaf in jax.tree.leaves(nnx.state(model, nnx.Param)):
      sh = getattr(leaf, "sharding", None)
      if isinstance(sh, jax.sharding.NamedSharding):
        return sh.mesh, tuple(rules)
  if jax.sharding.get_abstract_mesh().empty:
    return None, tuple(rules)
  return jax.sharding.get_mesh(), tuple(rules)


def logical_to_spec(
    logical_axes: Sequence[str | None] | None,
    rules=LOGICAL_AXIS_RULES,
    *,
    mesh: jax.sharding.Mesh | None = None,
    shape: Sequence[int] | None = None,
) -> jax.sharding.PartitionSpec:
  """Maps logical axis names to a mesh `PartitionSpec` through `rules`.

  A mesh axis is used at most once (a later dimension that maps to an axis
  already used is replicated, as in Flax). When `mesh` and `shape` are given,
  a dimension not divisible by its mesh-axis size is replicated rather than
  failing at `device_put`.

  Raises:
    ValueError: If a logical name is not in `rules` (a typo would otherwise
      silently replicate that dimension).
  """
  if logical_axes is None:
    return P()
  table = dict(rules)
  used: set[str] = set()
  out = []
  for i, name in enumerate(logical_axes):
    if name is None:
      out.append(None)
      continue
    if name not in table:
      raise ValueError(
          f"Logical axis {name!r} is not in the rules table; known: "
          f"{sorted(table)}. Add it to lowrank.sharding.LOGICAL_AXIS_RULES."
      )
    target = table[name]
    axes = (target,) if isinstance(target, str) else tuple(target or ())
    axes = tuple(a for a in axes if a not in used)
    if mesh is not None:
      axes = tuple(a for a in axes if a in mesh.shape)
      if shape is not None:
        size = math.prod(mesh.shape[a] for a in axes)
        if shape[i] % size:
          axes = ()
    used.update(axes)
    out.append(None if not axes else axes[0] if len(axes) == 1 else axes)
  return P(*out)


def batch_sharding_like(
    tree: Any, shape: Sequence[int]
) -> NamedSharding | None:
  """A sharding for a `[batch, ...]` input on the mesh of `tree`'s arrays.

  The batch axis follows the `batch` logical rule where it divides
  `shape[0]` (else it is replicated); the other axes are replicated.

  Args:
    tree: A pytree of arrays, e.g. a model's `nnx.State`; the mesh is that
      of its first leaf with a `NamedSharding`.
    shape: The input's shape.

  Returns:
    The `NamedSharding`, or None when no leaf of `tree` is placed on a mesh
    (then leave the input on the default device).
  """
  for leaf in jax.tree.leaves(tree):
    sh = getattr(leaf, "sharding", None)
    if isinstance(sh, NamedSharding):
      spec = logical_to_spec(
          ("batch",) + (None,) * (len(shape) - 1), mesh=sh.mesh, shape=shape)
      return NamedSharding(sh.mesh, spec)
  return None


def _variable_spec(var, mesh, rules) -> NamedSharding:
  logical = var.get_metadata().get("out_sharding")
  return NamedSharding(
      mesh,
      logical_to_spec(logical, rules, mesh=mesh, shape=var.get_value().shape),
  )


def state_shardings(
    state: nnx.State, mesh: jax.sharding.Mesh, rules=LOGICAL_AXIS_RULES
) -> Any:
  """`NamedSharding`s for an NNX state (concrete or abstract) from the rules.

  Args:
    state: An `nnx.State` whose leaves are `nnx.Variable`s (e.g. from
      `nnx.state(model, nnx.LoRAParam)` or `nnx.eval_shape(...)`).
    mesh: The mesh.
    rules: Logical-axis rules.

  Returns:
    A pure pytree (the structure of `nnx.as_pure(state)`) of `NamedSharding`.
  """
  return jax.tree.map(
      lambda v: _variable_spec(v, mesh, rules),
      state,
      is_leaf=lambda x: isinstance(x, nnx.Variable),
  )


def abstract_state_shardings(
    build_fn, mesh: jax.sharding.Mesh, filter_=nnx.Param, rules=None
) -> Any:
  """Shardings of a model's variables, without allocating it.

  Args:
    build_fn: A no-argument function that builds the NNX model.
    mesh: The mesh.
    filter_: Which variables (default all `nnx.Param`, which includes
      `nnx.LoRAParam`; pass `nnx.LoRAParam` for adapters only).
    rules: Logical-axis rules (default `LOGICAL_AXIS_RULES`).

  Returns:
    A pure pytree of `NamedSharding`.
  """
  rules = LOGICAL_AXIS_RULES if rules is None else rules
  with use_mesh(mesh, rules):
    abstract = nnx.eval_shape(build_fn)
  return state_shardings(nnx.state(abstract, filter_), mesh, rules)


def shardings_like_params(abstract_state: Any, params: Any) -> Any:
  """Optimizer-state shardings that follow the parameter each leaf belongs to.

  A state leaf whose key path ends with a parameter's key path (optionally
  followed by NamedTuple fields) keeps that parameter's mesh axis on every
  dimension whose size matches the parameter's (an Adam moment gets exactly
  the parameter's sharding; a `[m, r]` projector of an `[m, n]` kernel
  sharded `P("fsdp", "tensor")` gets `P("fsdp", None)`). A mesh axis left
  over moves to the largest free dimension it divides (the `[r, n]` moment
  of an `[m, n]` kernel sharded `P("fsdp", None)` gets `P(None, "fsdp")`).
  Other leaves (counters, ...) are replicated.

  Args:
    abstract_state: Output of `jax.eval_shape(tx.init, params)`.
    params: Sharded parameters (`jax.Array`s or `ShapeDtypeStruct`s with
      `.sharding` set), or a pytree of `NamedSharding` with shapes taken from
      `abstract_state` paths; must not be empty.

  Returns:
    A pytree of `NamedSharding` with the structure of `abstract_state`.
  """
  leaves = jax.tree_util.tree_leaves_with_path(params)
  if not leaves:
    raise ValueError("`params` has no leaves; cannot derive shardings.")
  by_path = sorted(  # Longest path first, so the most specific match wins.
      ((jax.tree_util.keystr(k), p) for k, p in leaves),
      key=lambda kv: -len(kv[0]),
  )
  mesh = by_path[0][1].sharding.mesh

  def _names(path):
    """The path, and the path without trailing attribute fields.

    A NamedTuple stored per parameter (e.g. a quantized projector's
    `.codes`, `.scale`) still belongs to that parameter.
    """
    path = list(path)
    yield jax.tree_util.keystr(tuple(path))
    while path and isinstance(path[-1], jax.tree_util.GetAttrKey):
      path.pop()
      yield jax.tree_util.keystr(tuple(path))

  def _axes(entry):
    return () if entry is None else (entry,) if isinstance(entry, str) else (
        tuple(entry))

  def _sharding(path, leaf):
    names = list(_names(path))
    for param_path, p in by_path:
      if any(n.endswith(param_path) for n in names) and leaf.ndim == p.ndim:
        spec = tuple(p.sharding.spec)
        spec += (None,) * (p.ndim - len(spec))
        out = [
            a if n == m else None
            for a, n, m in zip(spec, leaf.shape, p.shape)
        ]
        # A mesh axis the parameter uses on a dimension the state leaf does
        # not share (a `[r, n]` moment of an `[m, n]` weight sharded on m)
        # moves to the largest free dimension it divides, so low-rank state
        # is sharded too instead of replicated on every device.
        used = {a for e in out for a in _axes(e)}
        for entry in spec:
          for axis in _axes(entry):
            if axis in used:
              continue
            size = mesh.shape[axis]
            free = [
                i for i, e in enumerate(out)
                if e is None and leaf.shape[i] >= size
                and leaf.shape[i] % size == 0
            ]
            if free:
              i = max(free, key=lambda i: leaf.shape[i])
              out[i] = axis
              used.add(axis)
        return NamedSharding(mesh, P(*out))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(_sharding, abstract_state)


def replicated_leaves(
    tree: Any, *, min_size: int = 1 << 16
) -> list[str]:
  """Paths of leaves with at least `min_size` elements that are replicated.

  A leaf counts as replicated when its sharding's spec names no mesh axis
  of size > 1. Use it to check that nothing large came out of propagation
  replicated by accident.
  """
  out = []
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    sh = getattr(x, "sharding", None)
    if not isinstance(sh, NamedSharding) or math.prod(x.shape) < min_size:
      continue
    axes = [
        a
        for entry in sh.spec
        if entry is not None
        for a in ((entry,) if isinstance(entry, str) else entry)
    ]
    if not any(sh.mesh.shape[a] > 1 for a in axes):
      out.append(jax.tree_util.keystr(path))
  return out


def check_sharded(tree: Any, *, min_size: int = 1 << 16) -> None:
  """Raises if a large leaf is replicated on a mesh with > 1 device.

  Raises:
    ValueError: Naming the replicated leaves.
  """
  bad = replicated_leaves(tree, min_size=min_size)
  if bad and jax.device_count() > 1:
    raise ValueError(
        f"{len(bad)} leaves with >= {min_size} elements are replicated: "
        f"{bad[:10]}. Annotate them with logical axes or lower `min_size`."
    )
