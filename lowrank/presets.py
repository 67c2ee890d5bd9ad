"""Paper settings: each method's published configuration, one argument away.

lowrank's defaults follow the papers where it can, but some differ on
purpose (a Hugging Face PEFT convention users expect, a numerically safer
choice, a schedule that suits fine-tuning better than pre-training). Each
module that has such a method records, next to the code, the keyword
arguments that give the authors' behaviour (as their official code runs
it), where that was read, and the deviations no argument can undo:

    from lowrank import optim, presets
    tx = optim.fira_adamw(1e-3, rank=128, **presets.paper("fira_adamw"))
    print(presets.describe("fira_adamw"))

In a config, `preset="paper"` in an `optimizer` or `adapter` section does the
same (`lowrank.train.optimizer_from_config` / `inject_from_config`); keys
given in the section override the preset's.

Names are the factory's name for optimizers (`"fira_adamw"`, also accepted
as the function itself) and the `adapters.inject(method=...)` name for
adapters (`"randlora"`). A method that matches its official code registers
an empty preset, so `paper()` still says where it was checked; a name
nothing registered is an error, not an empty dict. docs/fidelity.md is the
method-by-method record these entries come from.

This module is a leaf: modules register their presets when imported, so
`paper()` knows a method once its module is imported (passing the function
itself guarantees that; the config helpers resolve the factory first).
"""

from __future__ import annotations

import dataclasses
import sys
from typing import Any, Callable, Mapping


@dataclasses.dataclass(frozen=True)
class Preset:
  """One method's paper settings.

  Attributes:
    name: The factory's name or the adapter method's name.
    kwargs: Keyword arguments that give the official behaviour (empty when
      the defaults already do).
    source: Where the official behaviour was read: `owner/repo@commit
      (path)`, or the paper (`arXiv:<id>`) where no code is public.
    reasons: For each key of `kwargs`, why lowrank's default differs.
    unavailable: Official behaviours no argument gives, each a sentence.
  """
  name: str
  kwargs: Mapping[str, Any]
  source: str
  reasons: Mapping[str, str]
  unavailable: tuple[str, ...] = ()


_REGISTRY: dict[str, Preset] = {}


def register(name: str, *, source: str, kwargs: Mapping[str, Any] | None = None,
             reasons: Mapping[str, str] | None = None,
             unavailable: tuple[str, ...] = ()) -> Preset:
  """Records `name`'s paper settings (called by the method's own module).

  Raises:
    ValueError: If `kwargs` and `reasons` name different arguments, or
      `name` is registered twice with different settings.
  """
  kwargs = dict(kwargs or {})
  reasons = dict(reasons or {})
  if set(kwargs) != set(reasons):
    raise ValueError(
        f"preset {name!r}: every argument needs a reason and every reason an "
        f"argument; arguments without a reason: "
        f"{sorted(set(kwargs) - set(reasons))}, reasons without an argument: "
        f"{sorted(set(reasons) - set(kwargs))}.")
  preset = Preset(name, kwargs, source, reasons, tuple(unavailable))
  if name in _REGISTRY and _REGISTRY[name] != preset:
    raise ValueError(f"preset {name!r} is registered twice, differently.")
  _REGISTRY[name] = preset
  return preset


def _name(method: str | Callable[..., Any]) -> str:
  if isinstance(method, str):
    return method
  name = getattr(method, "__name__", None)
  if name is None:
    raise TypeError(
        f"expected a method's name (str) or its factory function; got "
        f"{type(method).__name__}: {method!r}.")
  return name


def _exported_names(fn: Callable[..., Any]) -> list[str]:
  """Names lowrank's imported modules bind to `fn` (`relora.train` is
  exported as `spectral.relora_train`). Reads `sys.modules`; imports
  nothing."""
  found = []
  for module_name, module in list(sys.modules.items()):
    if module_name == "lowrank" or module_name.startswith("lowrank."):
      for attr, value in list(vars(module).items()):
        if value is fn and attr in _REGISTRY:
          found.append(attr)
  return sorted(set(found))


def get(method: str | Callable[..., Any]) -> Preset:
  """The registered `Preset` of `method` (a name or the factory itself).

  A function is looked up by its own name, then by the names lowrank
  exports it under.

  Raises:
    KeyError: If nothing registered `method`; the message lists what did.
  """
  name = _name(method)
  if name not in _REGISTRY and not isinstance(method, str):
    aliases = _exported_names(method)
    if len(aliases) == 1:
      name = aliases[0]
  if name not in _REGISTRY:
    raise KeyError(
        f"no paper preset is recorded for {name!r} (import its module first "
        f"if it is lowrank's). Recorded: {', '.join(sorted(_REGISTRY)) or 'none'}"
        f". docs/fidelity.md lists every method that was compared with its "
        f"official code.")
  return _REGISTRY[name]


def paper(method: str | Callable[..., Any]) -> dict[str, Any]:
  """Keyword arguments that make `method` behave as its official code.

  A fresh dict: `factory(..., **paper(factory))`; arguments given after it
  override it.
  """
  return dict(get(method).kwargs)


def describe(method: str | Callable[..., Any]) -> str:
  """A few lines: the source, each preset argument with its reason, and the
  official behaviours no argument gives."""
  p = get(method)
  lines = [f"{p.name}: paper settings read from {p.source}"]
  if not p.kwargs:
    lines.append("  the defaults already follow it")
  for key, value in p.kwargs.items():
    lines.append(f"  {key}={value!r}: {p.reasons[key]}")
  for text in p.unavailable:
    lines.append(f"  not available: {text}")
  return "\n".join(lines)


def names() -> tuple[str, ...]:
  """The methods with a recorded preset (of the modules imported so far)."""
  return tuple(sorted(_REGISTRY))
