"""Lazy submodules for lowrank's packages (PEP 562), shared by all of them."""

from collections.abc import Callable, Iterable, Mapping
import importlib
from typing import Any


def attach(
    package: str,
    submodules: Iterable[str],
    attributes: Mapping[str, str] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
  """Module `__getattr__`, `__dir__` and `__all__` for lazy submodules.

  The PEP 562 pattern (as scientific-python's `lazy_loader.attach`): a
  subpackage lists its submodules and re-exported names; each is imported on
  first attribute access, so `import lowrank.retrieval` stays cheap and
  submodules that import each other's packages cannot form an import cycle.

  Args:
    package: The subpackage's `__name__`.
    submodules: Names of its submodules.
    attributes: Re-exported name -> the submodule that defines it.

  Returns:
    `(__getattr__, __dir__, __all__)` for the subpackage's namespace.
  """
  submodules = tuple(submodules)
  attributes = dict(attributes or {})
  names = sorted({*submodules, *attributes})

  def __getattr__(name: str) -> Any:  # pylint: disable=invalid-name
    if name in submodules:
      return importlib.import_module(f"{package}.{name}")
    if name in attributes:
      module = importlib.import_module(f"{package}.{attributes[name]}")
      return getattr(module, name)
    raise AttributeError(
        f"module {package!r} has no attribute {name!r}; it has: "
        f"{', '.join(names)}."
    )

  def __dir__() -> list[str]:  # pylint: disable=invalid-name
    return sorted({*vars(importlib.import_module(package)), *names})

  return __getattr__, __dir__, list(names)
