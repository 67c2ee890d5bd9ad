"""Module surgery on NNX models: match, walk, get and replace submodules.

The library's model conversions (adapter injection, quantisation, SST,
SLTrain, SVD compression, ...) all pick submodules by their dotted path and
swap them in place. This module holds those shared, low-level pieces, so
that `targets` mean the same thing everywhere:

  * `match(targets)`: a predicate `(dotted path, module) -> bool` for a
    regex (`re.fullmatch` over the whole path), a list of names (a path
    equal to a name or ending in `.name`), `"all-linear"` (every
    `nnx.Linear`, `nnx.LinearGeneral` and `nnx.Einsum`) or a callable;
  * `iter_modules(model)`: `(path, module)` pairs of the module graph,
    optionally not descending into some module types (e.g. wrappers);
  * `get_submodule` / `set_submodule`: read or replace the submodule at a
    path (attribute, list index or dict key);
  * `paths` and `listing`: the candidate paths that error messages show.

Paths are tuples of the NNX graph keys (`("layers", 0, "attn", "query")`)
or their dotted form (`"layers.0.attn.query"`); `path_str` and
`parse_path` convert between the two.

This module imports nothing else from `lowrank`.
"""

from collections.abc import Callable, Iterator, Mapping, Sequence
import re
from typing import Any

from flax import nnx

Path = tuple[Any, ...]
Matcher = Callable[[str, Any], bool]

# The module types `"all-linear"` picks.
LINEAR_KINDS = (nnx.Linear, nnx.LinearGeneral, nnx.Einsum)


def path_str(path: Sequence[Any]) -> str:
  """The dotted form of a graph path: `("layers", 0, "q")` -> `layers.0.q`.

  Args:
    path: The keys from the root to a submodule.

  Returns:
    The keys joined with dots (`""` for the root).
  """
  return ".".join(str(p) for p in path)


def parse_path(path: Any) -> Path:
  """A graph path as a tuple; a dotted string's digit parts become ints.

  Args:
    path: A tuple/list of keys, or a dotted string such as `"layers.0.q"`
      (`""` is the root).

  Returns:
    The keys as a tuple.

  Raises:
    TypeError: If `path` is neither a string nor a sequence of keys.
  """
  if isinstance(path, str):
    if not path:
      return ()
    return tuple(int(k) if k.isdigit() else k for k in path.split("."))
  if isinstance(path, Sequence):
    return tuple(path)
  raise TypeError(
      f"A module path must be a dotted string or a tuple of keys; got "
      f"{path!r} of type {type(path).__name__}."
  )


def compile_regex(pattern: str, what: str) -> re.Pattern[str]:
  """`re.compile(pattern)`, with an error that names the argument.

  Args:
    pattern: The regular expression.
    what: The argument's name for the error message (e.g. `"targets"`).

  Returns:
    The compiled pattern.

  Raises:
    ValueError: `Invalid {what} regex {pattern!r}: {reason}`.
  """
  try:
    return re.compile(pattern)
  except re.error as e:
    raise ValueError(f"Invalid {what} regex {pattern!r}: {e}") from e


def is_linear(module: Any, wrappers: tuple[type, ...] = ()) -> bool:
  """Whether `module` is a linear kind, or a wrapper whose `base` is one.

  Args:
    module: Any graph node.
    wrappers: Module types that wrap another module as `.base`.

  Returns:
    True for an `nnx.Linear`, `nnx.LinearGeneral` or `nnx.Einsum`, or an
    instance of `wrappers` whose `base` is one of those.
  """
  return isinstance(module, LINEAR_KINDS) or (
      bool(wrappers) and isinstance(module, wrappers)
      and isinstance(getattr(module, "base", None), LINEAR_KINDS))


def match(
    targets: Any,
    what: str = "targets",
    *,
    wrappers: tuple[type, ...] = (),
) -> Matcher:
  """A predicate `(dotted path, module) -> bool` for `targets`.

  Target semantics follow Hugging Face PEFT:
    * a `str` is a regular expression that must match the whole path
      (`re.fullmatch`), e.g. `r".*\\.(query|value)"`;
    * a non-empty list of names matches a path equal to a name or ending
      in `.name`;
    * `"all-linear"` matches every `nnx.Linear`, `nnx.LinearGeneral` and
      `nnx.Einsum` (and an instance of `wrappers` around one, so that
      converting it again is reported rather than silently skipped);
    * a callable is used as the predicate itself.

  Args:
    targets: Which modules, as above.
    what: The argument's name for error messages (`"targets"`,
      `"exclude"`).
    wrappers: Module types that wrap a module as `.base` (see above).

  Returns:
    The predicate.

  Raises:
    ValueError: On an invalid regex (`Invalid targets regex ...`) or
      targets of another form (`targets must be a regex string, ...`).
  """
  if isinstance(targets, str) and targets != "all-linear":
    rx = compile_regex(targets, what)
    return lambda path, m: rx.fullmatch(path) is not None
  if isinstance(targets, str):
    return lambda path, m: is_linear(m, wrappers)
  if callable(targets):
    return targets
  if isinstance(targets, Sequence) and targets and all(
      isinstance(t, str) for t in targets
  ):
    names = tuple(targets)
    return lambda path, m: any(
        path == t or path.endswith("." + t) for t in names
    )
  raise ValueError(
      f"{what} must be a regex string, 'all-linear', or a non-empty list of "
      f"module names; got {targets!r}."
  )


def iter_modules(
    model: nnx.Module,
    *,
    kind: type | tuple[type, ...] | None = None,
    opaque: tuple[type, ...] = (),
    include_root: bool = False,
    graph_order: bool = False,
) -> Iterator[tuple[Path, Any]]:
  """`(path, module)` for the submodules of `model`.

  Args:
    model: An NNX module.
    kind: Only yield modules of this type (or types); all modules if None.
    opaque: Module types whose insides are not walked: an instance is
      yielded (if it passes `kind`), its submodules are not.
    include_root: Also yield `((), model)`.
    graph_order: Yield in `nnx.iter_graph` order (children before their
      parent, keys sorted) instead of the default: shallower paths first,
      `nnx.iter_graph` order among paths of the same length.

  Yields:
    `(path, module)`, the path as a tuple of graph keys.
  """
  nodes = [(tuple(p), n) for p, n in nnx.iter_graph(model)
           if isinstance(n, nnx.Module)]
  stops = [p for p, n in nodes if opaque and isinstance(n, opaque)]
  if not graph_order:
    nodes = sorted(nodes, key=lambda pn: len(pn[0]))
  for path, node in nodes:
    if not path and not include_root:
      continue
    if any(len(path) > len(s) and path[:len(s)] == s for s in stops):
      continue
    if kind is None or isinstance(node, kind):
      yield path, node


def paths(
    model: nnx.Module,
    *,
    kind: type | tuple[type, ...] | None = None,
    opaque: tuple[type, ...] = (),
) -> list[str]:
  """The dotted paths of `iter_modules(model, kind=..., opaque=...)`.

  Args:
    model: An NNX module.
    kind: Only modules of this type (or types); all if None.
    opaque: Module types whose insides are not listed.

  Returns:
    The dotted paths, shallower first (the root is not listed).
  """
  return [path_str(p) for p, _ in iter_modules(model, kind=kind,
                                                opaque=opaque)]


def listing(names: Sequence[str], limit: int = 40) -> str:
  """Comma-separated `names` for an error message, at most `limit` shown.

  Args:
    names: The names (module paths, descriptions).
    limit: How many to show; the rest are counted as `... (+N more)`.

  Returns:
    The joined names.
  """
  shown = list(names[:limit])
  more = f" ... (+{len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(shown) + more


def _is_item_container(node: Any) -> bool:
  return isinstance(node, (Mapping, list, tuple, nnx.List))


def _child_key(node: Any, key: Any) -> Any:
  """`key`, or its string form for a mapping keyed by strings of digits."""
  if isinstance(node, Mapping) and isinstance(key, int) and str(key) in node:
    try:
      has_int = key in node
    except TypeError:  # `nnx.Dict` keys are attribute names.
      has_int = False
    if not has_int:
      return str(key)
  return key


def _child(node: Any, key: Any, path: Path, depth: int) -> Any:
  key = _child_key(node, key)
  try:
    if isinstance(key, int) or _is_item_container(node):
      return node[key]
    return getattr(node, key)
  except (AttributeError, KeyError, IndexError, TypeError) as e:
    raise LookupError(
        f"No submodule at {path_str(path)!r}: "
        f"{type(node).__name__} at {path_str(path[:depth]) or '<root>'!r} "
        f"has no child {key!r} ({type(e).__name__}: {e}). Use "
        "lowrank.surgery.paths(model) to list the module paths."
    ) from e


def get_submodule(model: nnx.Module, path: str | Sequence[Any]) -> Any:
  """The submodule of `model` at `path`.

  Args:
    model: An NNX module.
    path: A tuple of graph keys or a dotted string (`""` is `model`).

  Returns:
    The node at `path`.

  Raises:
    LookupError: If a key on the way does not exist; the message names the
      path and the missing key.
  """
  return _descend(model, parse_path(path))


def _descend(model: Any, keys: Path, depth: int | None = None) -> Any:
  """The node at `keys[:depth]`; errors name the whole of `keys`."""
  node = model
  for i, k in enumerate(keys[:depth]):
    node = _child(node, k, keys, i)
  return node


def set_submodule(
    model: nnx.Module, path: str | Sequence[Any], new: Any
) -> None:
  """Replaces the submodule of `model` at `path` by `new`, in place.

  The last key is an attribute name, a list index (`nnx.List`, or a list
  held with `nnx.data`) or a dict key (`nnx.Dict`, or a dict).

  Args:
    model: An NNX module.
    path: A non-empty tuple of graph keys or dotted string.
    new: The replacement.

  Raises:
    ValueError: If `path` is empty (the root cannot be replaced in place).
    LookupError: If the parent of `path` does not exist.
  """
  keys = parse_path(path)
  if not keys:
    raise ValueError(
        "set_submodule needs a non-empty path; the root module cannot be "
        "replaced in place (use the new module instead)."
    )
  parent = _descend(model, keys, -1)
  last = _child_key(parent, keys[-1])
  if isinstance(last, int) or _is_item_container(parent):
    parent[last] = new
  else:
    setattr(parent, last, new)
