"""The import graph of lowrank/ points one way, and privates stay private.

Every `import` / `from ... import` statement of every module under lowrank/
(including the ones inside functions) is parsed with `ast`; nothing is
imported. The test fails on:

* an import cycle between modules;
* an edge from one unit (a top-level module, or a subpackage with all its
  modules) to a unit that is not in a strictly lower layer of `_LAYERS`;
* a `_private` name of one lowrank module imported or read by another
  (`from lowrank.x import _y`, or `x._y` where `x` is bound to a lowrank
  module). A private MODULE (`lowrank.optim._adam`) may be imported by the
  modules of its own package.

Layers (a unit may import only units of lower layers):

  0  _lazy: the packages' lazy-attribute machinery
  1  lowrank (the package namespace only), assets, distributed,
     metric_writers, quantize, sharding: leaves, import nothing but _lazy
  2  checkpoint, surgery: infrastructure (checkpoints, module-tree surgery)
  3  adapters, optim: adapter layers and optimizers
  4  spectral: methods built on the adapter layers (SST, SLTrain, ReLoRA,
     SVD compression)
  5  models: BERT, LLaMA
  6  retrieval: encoders, metrics, search, BM25
  7  ranking (rerankers; use retrieval's metrics and runs), data (training
     data; mines hard negatives with retrieval's BM25)

`lowrank.data` sits above retrieval: its readers import nothing, but hard
negative mining and pair building consume retrievers (`mine_bm25` builds a
`lowrank.retrieval.bm25.BM25`), and nothing in lowrank imports data.
Experiments, notebooks and tests (outside the package) sit above all.
"""

import ast
import collections
import pathlib

from absl.testing import absltest

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_PACKAGE = _ROOT / "lowrank"

# The layer table (see the module docstring). A unit is the longest entry
# that is a prefix of the module's dotted name.
_LAYERS = {
    "lowrank._lazy": 0,
    "lowrank": 1,  # The package namespace only (not its submodules).
    "lowrank.assets": 1,
    "lowrank.distributed": 1,
    "lowrank.metric_writers": 1,
    "lowrank.presets": 1,
    "lowrank.quantize": 1,
    "lowrank.sharding": 1,
    "lowrank.checkpoint": 2,
    "lowrank.surgery": 2,
    "lowrank.adapters": 3,
    "lowrank.optim": 3,
    "lowrank.spectral": 4,
    "lowrank.models": 5,
    "lowrank.train": 5,
    "lowrank.retrieval": 6,
    "lowrank.ranking": 7,
    "lowrank.data": 7,
}

# Violations tolerated for now, as keys of `_Graph.violations()` (e.g.
# "private: lowrank.a uses lowrank.b._c"), each with a comment saying who
# removes it. Each entry must still be found (the test fails when one
# disappears, so this set only shrinks). Empty: nothing is tolerated.
_KNOWN_VIOLATIONS = frozenset()


def _modules() -> dict[str, tuple[pathlib.Path, bool]]:
  """Dotted module name -> (file, is_package) for every lowrank module."""
  found = {}
  for path in sorted(_PACKAGE.rglob("*.py")):
    parts = list(path.relative_to(_ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
      parts = parts[:-1]
    found[".".join(parts)] = (path, is_package)
  return found


class _Graph:
  """The lowrank-internal imports and private-name uses of every module."""

  def __init__(self):
    self.modules = _modules()
    # importer -> {imported module: first line}
    self.edges = collections.defaultdict(dict)
    # (importer, "lowrank.x._y", line)
    self.private_uses = []
    for name, (path, is_package) in self.modules.items():
      self._scan(name, path, is_package)

  def _owner(self, dotted: str) -> str:
    """The deepest lowrank module that `dotted` names or is inside."""
    while dotted and dotted not in self.modules:
      dotted = dotted.rpartition(".")[0]
    return dotted

  def _private_use(self, importer: str, module: str, attr: str,
                   line: int) -> None:
    """Records `module.attr` if it is another module's private name."""
    if not attr.startswith("_") or attr.startswith("__"):
      return
    target = f"{module}.{attr}"
    if target in self.modules and importer.startswith(module + "."):
      return  # A private module used inside its own package.
    if module == importer:
      return
    self.private_uses.append((importer, target, line))

  def _scan(self, name: str, path: pathlib.Path, is_package: bool) -> None:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = name if is_package else name.rpartition(".")[0]
    aliases = {}  # local name -> lowrank module it is bound to

    def edge(target: str, line: int) -> None:
      if target and target != name:
        self.edges[name].setdefault(target, line)

    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        for alias in node.names:
          if alias.name.split(".")[0] != "lowrank":
            continue
          edge(self._owner(alias.name), node.lineno)
          if alias.asname:
            aliases[alias.asname] = self._owner(alias.name)
          else:
            aliases["lowrank"] = "lowrank"
      elif isinstance(node, ast.ImportFrom):
        if node.level:
          base = package.split(".")[:len(package.split(".")) - node.level + 1]
          source = ".".join(base + ([node.module] if node.module else []))
        else:
          source = node.module or ""
        if source.split(".")[0] != "lowrank":
          continue
        for alias in node.names:
          full = f"{source}.{alias.name}"
          if full in self.modules:
            edge(full, node.lineno)
            aliases[alias.asname or alias.name] = full
          else:
            edge(self._owner(source), node.lineno)
          self._private_use(name, self._owner(source), alias.name,
                            node.lineno)

    def bound(expr: ast.expr) -> str | None:
      """The lowrank module an expression like `x` or `lowrank.x` names."""
      if isinstance(expr, ast.Name):
        return aliases.get(expr.id)
      if isinstance(expr, ast.Attribute):
        outer = bound(expr.value)
        if outer is not None and f"{outer}.{expr.attr}" in self.modules:
          return f"{outer}.{expr.attr}"
      return None

    for node in ast.walk(tree):
      if isinstance(node, ast.Attribute):
        module = bound(node.value)
        if module is not None:
          self._private_use(name, module, node.attr, node.lineno)

  def unit(self, module: str) -> str:
    """The longest `_LAYERS` entry that is `module` or a package of it."""
    candidates = [u for u in _LAYERS if module == u or (
        u != "lowrank" and module.startswith(u + "."))]
    return max(candidates, key=len) if candidates else ""

  def cycles(self) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []
    counter = [0]

    def visit(v: str) -> None:
      index[v] = low[v] = counter[0]
      counter[0] += 1
      stack.append(v)
      on_stack.add(v)
      for w in self.edges.get(v, {}):
        if w not in index:
          visit(w)
          low[v] = min(low[v], low[w])
        elif w in on_stack:
          low[v] = min(low[v], index[w])
      if low[v] == index[v]:
        component = []
        while True:
          w = stack.pop()
          on_stack.discard(w)
          component.append(w)
          if w == v:
            break
        if len(component) > 1:
          found.append(sorted(component))

    for v in sorted(self.modules):
      if v not in index:
        visit(v)
    return sorted(found)

  def violations(self) -> dict[str, str]:
    """Violation key -> where it is (file lines), for every rule."""
    out = {}
    for component in self.cycles():
      lines = [
          f"{a} -> {b} (line {self.edges[a][b]})"
          for a in component for b in self.edges[a] if b in component
      ]
      out["cycle: " + ", ".join(component)] = "; ".join(lines)
    for importer, targets in sorted(self.edges.items()):
      for target, line in sorted(targets.items()):
        a, b = self.unit(importer), self.unit(target)
        if a == b or not a or not b:
          continue  # Inside one unit, or unlayered (reported separately).
        if _LAYERS[b] >= _LAYERS[a]:
          out[f"upward: {importer} -> {target}"] = (
              f"line {line}: layer {_LAYERS[a]} ({a}) imports layer "
              f"{_LAYERS[b]} ({b})")
    for importer, target, line in self.private_uses:
      out.setdefault(f"private: {importer} uses {target}", f"line {line}")
    return out


class LayeringTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.graph = _Graph()

  def test_the_scan_sees_the_package(self):
    # Guards against a scan that silently finds nothing.
    self.assertIn("lowrank.optim.adam8bit", self.graph.modules)
    self.assertIn("lowrank.quantize",
                  self.graph.edges["lowrank.optim.adam8bit"])
    self.assertIn("lowrank.retrieval.metrics",
                  self.graph.edges["lowrank.ranking.fusion"])

  def test_every_module_has_a_layer(self):
    unlayered = sorted(m for m in self.graph.modules if not self.graph.unit(m))
    self.assertEqual(
        unlayered, [],
        "modules outside the layer table: add their unit to _LAYERS in "
        "tests/layering_test.py and to the Layers paragraph of "
        "lowrank/__init__.py")

  def test_no_cycles_upward_edges_or_private_uses(self):
    found = self.graph.violations()
    new = {k: v for k, v in found.items() if k not in _KNOWN_VIOLATIONS}
    self.assertEqual(
        new, {},
        "import-graph violations (cycles, imports of a layer that is not "
        "lower, private names used across modules): import downward only; "
        "make a shared helper public in a lower module instead of reaching "
        "for another module's _private name")

  def test_known_violations_still_exist(self):
    gone = sorted(_KNOWN_VIOLATIONS - set(self.graph.violations()))
    self.assertEqual(
        gone, [],
        "these known violations are fixed: remove them from "
        "_KNOWN_VIOLATIONS in tests/layering_test.py")


class RulesTest(absltest.TestCase):
  """The checker catches each kind of violation (on a synthetic graph)."""

  def _graph(self, edges, private_uses=()):
    graph = _Graph.__new__(_Graph)
    graph.modules = {m: None for m in {*edges, *(t for v in edges.values()
                                                 for t in v)}}
    graph.edges = collections.defaultdict(dict, {
        a: {b: 1 for b in bs} for a, bs in edges.items()})
    graph.private_uses = list(private_uses)
    return graph

  def test_cycle_found(self):
    graph = self._graph({"lowrank.retrieval.a": ["lowrank.retrieval.b"],
                         "lowrank.retrieval.b": ["lowrank.retrieval.a"]})
    self.assertIn("cycle: lowrank.retrieval.a, lowrank.retrieval.b",
                  graph.violations())

  def test_upward_edge_found(self):
    graph = self._graph({"lowrank.checkpoint": ["lowrank.adapters.layers"],
                         "lowrank.adapters.nf4": ["lowrank.optim.adam8bit"]})
    self.assertEqual(
        set(graph.violations()),
        {"upward: lowrank.checkpoint -> lowrank.adapters.layers",
         "upward: lowrank.adapters.nf4 -> lowrank.optim.adam8bit"})

  def test_downward_edge_allowed(self):
    graph = self._graph({
        "lowrank.ranking.fusion": ["lowrank.retrieval.metrics"],
        "lowrank.optim.galore": ["lowrank.optim._adam"]})
    self.assertEqual(graph.violations(), {})

  def test_private_names_found_in_source(self):
    graph = _Graph.__new__(_Graph)
    graph.modules = {
        "lowrank.a": (None, False), "lowrank.b": (None, False),
        "lowrank.p": (None, True), "lowrank.p._m": (None, False),
        "lowrank.p.c": (None, False),
    }
    graph.edges = collections.defaultdict(dict)
    graph.private_uses = []
    source = self.create_tempfile(content=(
        "from lowrank.a import _x\n"
        "from lowrank import b as bee\n"
        "import lowrank.a\n"
        "def f():\n"
        "  return bee._y + lowrank.a._z + bee.public\n"))
    # pylint: disable=protected-access
    graph._scan("lowrank.p.c", pathlib.Path(source.full_path), False)
    own = self.create_tempfile(content="from lowrank.p import _m\n")
    graph._scan("lowrank.p.c", pathlib.Path(own.full_path), False)
    outside = self.create_tempfile(content="from lowrank.p import _m\n")
    graph._scan("lowrank.b", pathlib.Path(outside.full_path), False)
    # pylint: enable=protected-access
    self.assertEqual(
        sorted((a, t) for a, t, _ in graph.private_uses),
        [("lowrank.b", "lowrank.p._m"),
         ("lowrank.p.c", "lowrank.a._x"), ("lowrank.p.c", "lowrank.a._z"),
         ("lowrank.p.c", "lowrank.b._y")])
    self.assertEqual(dict(graph.edges["lowrank.p.c"]),
                     {"lowrank.a": 1, "lowrank.b": 2, "lowrank.p._m": 1})


if __name__ == "__main__":
  absltest.main()
