"""The one entry for adapter files: `save_adapters` / `load_adapters`.

    adapters.save_adapters("out/a", model)                  # any method
    adapters.save_adapters("out/p", model, format="peft")   # HF PEFT files
    adapters.load_adapters("out/p", fresh, format="peft")

Formats (`FORMATS`):

* `"native"` (default): lowrank's own format, every adapter method
  (`lowrank.adapters.native_io`: `lowrank_adapter.json` +
  `adapter.safetensors`).
* `"peft"`: Hugging Face PEFT's files for the methods PEFT has (LoRA, DoRA,
  AdaLoRA, VeRA), loadable by `peft.PeftModel.from_pretrained`
  (`lowrank.adapters.peft_io`: `adapter_config.json` +
  `adapter_model.safetensors`).

Loading a directory written in the other format raises an error that names
the format found and the call that loads it. For whole train states
(optimizer, step, ...) use `lowrank.checkpoint.Checkpointer` instead.
"""

import os
from typing import Any
import warnings

from flax import nnx

from lowrank.adapters import native_io
from lowrank.adapters import peft_io

FORMATS = ("native", "peft")
_CONFIG_NAMES = {"native": native_io.CONFIG_NAME, "peft": peft_io.CONFIG_NAME}


def _check_format(format: Any) -> str:  # pylint: disable=redefined-builtin
  if not isinstance(format, str) or format not in FORMATS:
    raise ValueError(
        f"format must be one of {FORMATS}; got {format!r}. Use 'native' "
        "for every adapter method, 'peft' for Hugging Face PEFT files.")
  return format


def detect_format(directory: str | os.PathLike[str]) -> list[str]:
  """The adapter formats whose config file `directory` holds (maybe none)."""
  return [f for f in FORMATS
          if os.path.isfile(os.path.join(directory, _CONFIG_NAMES[f]))]


def save_adapters(
    directory: str | os.PathLike[str],
    model: nnx.Module,
    *,
    format: str = "native",  # pylint: disable=redefined-builtin
    base_model_name_or_path: str | None = None,
    convert_initialized: bool = False,
) -> None:
  """Writes every adapter of `model` to `directory` in `format`.

  Args:
    directory: Created if missing; files are written atomically.
    model: A model with adapters from `lowrank.adapters.inject`.
    format: `"native"` (every method) or `"peft"` (Hugging Face PEFT).
    base_model_name_or_path: `"peft"` only: recorded in the config for PEFT
      users.
    convert_initialized: `"peft"` only: save LoRA adapters whose init moved
      part of the base weight into the adapter (PiSSA, OLoRA, CorDA) as the
      equivalent rank-`2r` adapter for the original base weight (see
      `peft_io.save_peft`). The native format rebuilds such bases itself.

  Raises:
    ValueError: On an unknown format, a model without adapters, a merged
      adapter, or (PEFT) a method PEFT cannot express.
    TypeError: On a `"peft"` option with `format="native"`.
  """
  options = {}
  if base_model_name_or_path is not None:
    options["base_model_name_or_path"] = base_model_name_or_path
  if convert_initialized:
    options["convert_initialized"] = convert_initialized
  if _check_format(format) == "peft":
    peft_io.save_peft(directory, model, **options)
    return
  if options:
    raise TypeError(
        f"save_adapters(format='native') takes no options; got "
        f"{sorted(options)} (those are format='peft' options).")
  native_io.save_adapter(directory, model)


def load_adapters(
    directory: str | os.PathLike[str],
    model: nnx.Module,
    *,
    format: str = "native",  # pylint: disable=redefined-builtin
    rngs: nnx.Rngs | int = 0,
) -> nnx.Module:
  """Loads the adapters in `directory` (written in `format`) into `model`.

  If `model` has no adapters they are injected from the file's config; if
  it has some, they must be exactly the saved ones.

  Args:
    directory: A directory written by `save_adapters` (or, for `"peft"`,
      by Hugging Face PEFT's `save_pretrained`).
    model: The base model (or one with matching adapters).
    format: `"native"` or `"peft"`, the format the directory was written in.
    rngs: Only used to build the wrappers before their values are loaded.

  Returns:
    `model`, in place.

  Raises:
    ValueError: On an unknown format, a directory written in the other
      format (the message names it and the call that loads it), or
      adapters that do not fit `model`.
    FileNotFoundError: If `directory` holds no adapter files.
  """
  format = _check_format(format)  # pylint: disable=redefined-builtin
  found = detect_format(directory)
  if format not in found:
    if not found:
      raise FileNotFoundError(
          f"{directory} holds no adapter files: expected "
          f"{_CONFIG_NAMES['native']} (format='native') or "
          f"{_CONFIG_NAMES['peft']} (format='peft'), as written by "
          "lowrank.adapters.save_adapters.")
    other = found[0]
    raise ValueError(
        f"{directory} holds {other!r}-format adapters "
        f"({_CONFIG_NAMES[other]}), not {format!r} ones "
        f"({_CONFIG_NAMES[format]}); load them with "
        f"lowrank.adapters.load_adapters(directory, model, "
        f"format={other!r}).")
  if format == "peft":
    return peft_io.load_peft(directory, model, rngs=rngs)
  return native_io.load_adapter(directory, model, rngs=rngs)


def _deprecated(old: str, new: str) -> None:
  warnings.warn(
      f"lowrank.adapters.{old} is deprecated; call lowrank.adapters.{new}.",
      DeprecationWarning, stacklevel=3)


def save_adapter(directory, model) -> None:
  """Deprecated: `save_adapters(directory, model)` (native format)."""
  _deprecated("save_adapter", "save_adapters(directory, model)")
  save_adapters(directory, model)


def load_adapter(directory, model, *, rngs=0) -> nnx.Module:
  """Deprecated: `load_adapters(directory, model)` (native format)."""
  _deprecated("load_adapter", "load_adapters(directory, model)")
  return load_adapters(directory, model, rngs=rngs)


def save_peft(directory, model, **options) -> None:
  """Deprecated: `save_adapters(directory, model, format="peft")`."""
  _deprecated("save_peft", "save_adapters(directory, model, format='peft')")
  save_adapters(directory, model, format="peft", **options)


def load_peft(directory, model, *, rngs=0) -> nnx.Module:
  """Deprecated: `load_adapters(directory, model, format="peft")`."""
  _deprecated("load_peft", "load_adapters(directory, model, format='peft')")
  return load_adapters(directory, model, format="peft", rngs=rngs)
