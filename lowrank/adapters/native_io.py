"""lowrank's own adapter file format, for every adapter method.

Hugging Face PEFT files (`lowrank.adapters.peft_io`) cover the methods PEFT
also has. This format covers all of them, including the variants PEFT lacks
(NOLA, RandLoRA, LoRA-XS, LoLDU, DyLoRA, SoRA, IncreLoRA, ...). A directory
holds:

* `lowrank_adapter.json`: `{"format": "lowrank-adapter", "version": 1,
  "modules": {path: {"method", "rank", "alpha", "rslora", "dropout", "init",
  "options", "quantize_base"}}}`, i.e. everything needed to rebuild each
  wrapper with `inject` (QLoRA bases are re-quantised from the original
  weights, which is deterministic).
* `adapter.safetensors`: every `nnx.LoRAParam` and `AdapterState` leaf of each
  wrapper, keyed `<module path>/<variable path>` (e.g.
  `encoder.layer.0.attention.self.query/lora_a`).

Frozen `Basis` arrays (VeRA's random projections, ...) are not stored: each
method regenerates them from its `options()` (a seed) when the wrapper is
rebuilt. Adapters whose init moved part of the base weight into the adapter
(PiSSA, OLoRA, CorDA, ...) also store their initial values (`initial_*`);
loading into an original, unadapted model subtracts that initial update from
the base again, so the result equals the saved model exactly. Loading
reads JSON and safetensors only; it never executes code.

Save and load through `lowrank.adapters.save_adapters` /
`load_adapters` (`format="native"`, the default).
"""

import json
import os
import re
from typing import Any

from flax import nnx
import jax
import numpy as np
import safetensors.numpy

from lowrank.adapters import injection
from lowrank.adapters import layers
from lowrank.adapters import peft_io

CONFIG_NAME = "lowrank_adapter.json"
WEIGHTS_NAME = "adapter.safetensors"
FORMAT = "lowrank-adapter"
VERSION = 1
SAVED = (nnx.LoRAParam, layers.AdapterState)


def _jsonable(value: Any, where: str) -> Any:
  try:
    json.dumps(value)
  except TypeError as e:
    raise ValueError(
        f"{where}: option value {value!r} is not JSON-serialisable ({e})."
    ) from e
  return value


def _wrapper_arrays(module: layers.LoRAWrapper) -> dict[str, np.ndarray]:
  """`{variable path: array}` of the saved variable kinds, `base` excluded."""
  out = {}
  for path, var in nnx.iter_graph(module):
    if not path or path[0] == "base" or not isinstance(var, nnx.Variable):
      continue
    if isinstance(var, SAVED):
      out["/".join(str(p) for p in path)] = np.asarray(var.get_value())
  return out


def _quant_config(module: layers.LoRAWrapper, where: str):
  scheme = getattr(module.base, "quant_scheme", None)
  if scheme is None:
    return None
  if module.init == "lq_lora":
    raise ValueError(
        f"{where}: an LQ-LoRA adapter's base is Q(W − L₁L₂), which depends "
        "on the initial factors and is not stored in adapter files; save the "
        "whole model state (lowrank.checkpoint.Checkpointer) instead."
    )
  return {"scheme": scheme,
          "options": dict(getattr(module.base, "quant_options", ()))}


def module_config(module: layers.LoRAWrapper, where: str) -> dict[str, Any]:
  return {
      "quantize_base": _quant_config(module, where),
      "method": module.method,
      "rank": int(module.rank),
      "alpha": float(module.alpha),
      "rslora": bool(module.rslora),
      "dropout": float(module.dropout.rate if module.dropout else 0.0),
      "init": str(module.init),
      "options": {
          k: _jsonable(v, f"{where}.{k}") for k, v in module.options().items()
      },
  }


def save_adapter(directory: str | os.PathLike[str], model: nnx.Module) -> None:
  """Writes every adapter of `model` (any method) to `directory`.

  The `format="native"` implementation of `lowrank.adapters.save_adapters`.

  Args:
    directory: Created if missing; both files are written atomically.
    model: A model with adapters from `lowrank.adapters.inject`.

  Raises:
    ValueError: If the model has no adapters, an adapter is merged, or an
      option cannot be written as JSON.
  """
  mods = injection.adapter_modules(model)
  if not mods:
    raise ValueError("The model has no adapters to save.")
  config = {"format": FORMAT, "version": VERSION, "modules": {}}
  tensors = {}
  for path, m in mods.items():
    if m.merged:
      raise ValueError(f"{path}: adapter is merged; call unmerge() first.")
    config["modules"][path] = module_config(m, path)
    for key, value in _wrapper_arrays(m).items():
      tensors[f"{path}/{key}"] = np.ascontiguousarray(value)
  os.makedirs(directory, exist_ok=True)

  def _write_json(tmp):
    with open(tmp, "w") as f:
      json.dump(config, f, indent=2, sort_keys=True)

  peft_io.atomic_write(
      os.path.join(directory, WEIGHTS_NAME),
      lambda tmp: safetensors.numpy.save_file(tensors, tmp),
  )
  peft_io.atomic_write(os.path.join(directory, CONFIG_NAME), _write_json)


def read_config(directory: str | os.PathLike[str]) -> dict[str, Any]:
  """Reads and validates `lowrank_adapter.json`.

  Raises:
    FileNotFoundError: If the file is missing.
    ValueError: If it is not JSON or not this format / version, or a module
      entry lacks a field.
  """
  path = os.path.join(directory, CONFIG_NAME)
  config = peft_io.read_json(path, "lowrank adapter config")
  if config.get("format") != FORMAT:
    raise ValueError(f"{path}: not a {FORMAT!r} file.")
  if config.get("version") != VERSION:
    raise ValueError(
        f"{path}: version {config.get('version')!r}; this lowrank reads "
        f"version {VERSION}."
    )
  modules = config.get("modules")
  if not isinstance(modules, dict) or not modules:
    raise ValueError(f"{path}: 'modules' must be a non-empty object.")
  fields = ("method", "rank", "alpha", "rslora", "dropout", "init", "options")
  for name, entry in modules.items():
    if not isinstance(entry, dict):
      raise ValueError(
          f"{path}: module {name!r} must be a JSON object; found "
          f"{type(entry).__name__}."
      )
    missing = [k for k in fields if k not in entry]
    if missing:
      raise ValueError(f"{path}: module {name!r} lacks {missing}.")
    if not isinstance(entry["options"], dict):
      raise ValueError(
          f"{path}: module {name!r} 'options' must be a JSON object; found "
          f"{entry['options']!r}."
      )
    if entry["method"] not in layers.METHODS:
      raise ValueError(
          f"{path}: module {name!r} uses unknown method "
          f"{entry['method']!r}; known: {sorted(layers.METHODS)}."
      )
  return config


def load_adapter(
    directory: str | os.PathLike[str],
    model: nnx.Module,
    *,
    rngs: nnx.Rngs | int = 0,
) -> nnx.Module:
  """Loads an adapter directory written by `save_adapter` into `model`.

  The `format="native"` implementation of `lowrank.adapters.load_adapters`.

  If `model` has no adapters they are injected from the config, module by
  module (each with its own method, rank and options); if it has some, they
  must be exactly the saved modules with the same methods.

  Args:
    directory: Holds `lowrank_adapter.json` and `adapter.safetensors`.
    model: The base model (or one with matching adapters).
    rngs: Only used to build the wrappers before their values are loaded.

  Returns:
    `model`, in place.

  Raises:
    FileNotFoundError: If a file is missing.
    ValueError: If a module, method, tensor or shape does not fit `model`;
      the message names it.
  """
  config = read_config(directory)
  wpath = os.path.join(directory, WEIGHTS_NAME)
  tensors = peft_io.read_safetensors(wpath)
  rngs = nnx.Rngs(rngs) if isinstance(rngs, int) else rngs
  modules = config["modules"]
  mods = injection.adapter_modules(model)
  rebased = []
  if not mods:
    for path, entry in modules.items():
      quant = entry.get("quantize_base")
      quant_kwargs = {} if not quant else dict(
          quantize_base=quant["scheme"], **quant["options"])
      with peft_io.fits_model(
          f"Adapter {path!r} in {os.path.join(directory, CONFIG_NAME)}"):
        injection.inject(
            model,
            targets=re.escape(path),
            **quant_kwargs,
            method=entry["method"],
            rank=entry["rank"],
            alpha=entry["alpha"],
            use_rslora=bool(entry["rslora"]),
            dropout=float(entry["dropout"]),
            rngs=rngs,
            **entry["options"],
        )
      wrapper = injection.adapter_modules(model)[path]
      wrapper.init = entry["init"]
      if any(k.startswith(f"{path}/initial_") for k in tensors):
        wrapper.snapshot_initial()  # Filled from the file below.
        rebased.append(path)
    mods = injection.adapter_modules(model)
  peft_io.check_unmerged(mods, directory)
  if set(mods) != set(modules):
    raise ValueError(
        f"The model's adapters do not match {directory}: only in the model "
        f"{sorted(set(mods) - set(modules))[:10]}, only in the file "
        f"{sorted(set(modules) - set(mods))[:10]}."
    )
  expected = {}
  for path, m in mods.items():
    if m.method != modules[path]["method"]:
      raise ValueError(
          f"{path}: the model's adapter is {m.method!r} but the file holds "
          f"{modules[path]['method']!r}."
      )
    for key, value in _wrapper_arrays(m).items():
      expected[f"{path}/{key}"] = value.shape
  unexpected = sorted(set(tensors) - set(expected))
  missing = sorted(set(expected) - set(tensors))
  if unexpected or missing:
    raise ValueError(
        f"{wpath}: unexpected tensors {unexpected[:10]}, missing tensors "
        f"{missing[:10]}."
    )
  peft_io.check_shapes(tensors, expected, wpath)
  for path, m in mods.items():
    for vpath, var in nnx.iter_graph(m):
      if not vpath or vpath[0] == "base" or not isinstance(var, SAVED):
        continue
      layers.assign(var, tensors[f"{path}/{'/'.join(str(p) for p in vpath)}"])
  for path in rebased:
    # The init moved ΔW₀ out of the original base: redo that on this one.
    m = mods[path]
    m.set_kernel_2d(m.kernel_2d().astype(jax.numpy.float32)
                    - m.initial_offset())
  return model
