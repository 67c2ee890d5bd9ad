"""Reading Hugging Face checkpoint directories: `config.json` + safetensors.

A HF checkpoint directory holds `config.json` and its weights, either one
`model.safetensors` file or the shards that `model.safetensors.index.json`
lists. This module reads them with `safetensors` into numpy only: no torch,
no pickle (a `pytorch_model.bin` is never opened) and no code execution (a
config's `auto_map` is just data). `Tensors` reads the file headers first,
so a loader can check names, shapes and dtypes before reading any data, then
reads one tensor at a time.

Storage dtypes are safetensors' names (`"F32"`, `"BF16"`, `"F8_E4M3"`,
`"I64"`, ...); `ml_dtypes` gives numpy the `bfloat16` / float8 types, so
BF16 and F8 tensors read as such and `Tensors.read` casts to a target dtype.

The loaders (`bert.load_pretrained`, `llama.load_pretrained`) share their
last steps here too: `Tensors.check` (shape and dtype, from the header),
`set_param` (a value into an abstract model's parameter, placed on the mesh
its logical axes give) and `check_initialized`.
"""

from collections.abc import Iterable, Iterator, Mapping
import json
import os
import pathlib
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
import ml_dtypes  # pylint: disable=unused-import  # numpy BF16 / F8 types.
import numpy as np
import safetensors

from lowrank import sharding

PathLike = str | os.PathLike

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# Pickled weights: named in errors, never opened.
PICKLED_WEIGHTS_NAME = "pytorch_model.bin"
# Flax parameter name -> HF state-dict suffix (`kernel`s are stored
# transposed, as torch `[out, in]` weights).
PARAM_SUFFIX = {
    "kernel": "weight", "embedding": "weight", "scale": "weight",
    "bias": "bias",
}


def checkpoint_dir(path: PathLike) -> pathlib.Path:
  """`path` as a `pathlib.Path`, checked to be a directory.

  Raises:
    FileNotFoundError: If `path` is not an existing directory.
  """
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(
        f"Checkpoint directory not found: {path} (expected a local Hugging "
        "Face checkpoint directory holding config.json and "
        f"{WEIGHTS_NAME}).")
  return path


def read_json(path: PathLike) -> dict[str, Any]:
  """Parses a JSON file that must hold an object.

  Raises:
    FileNotFoundError: If the file does not exist.
    ValueError: If it is not valid JSON or not a JSON object.
  """
  path = pathlib.Path(path)
  if not path.is_file():
    raise FileNotFoundError(f"Checkpoint file not found: {path}")
  try:
    with path.open(encoding="utf-8") as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(
        f"{path} is not valid JSON ({e}); re-download or rewrite it.") from e
  if not isinstance(data, dict):
    raise ValueError(
        f"{path} must hold a JSON object; found {type(data).__name__}.")
  return data


def read_config(path: PathLike) -> dict[str, Any]:
  """The parsed `config.json` of checkpoint directory `path`.

  Raises:
    FileNotFoundError: If the directory or its `config.json` is missing.
    ValueError: If `config.json` is not a valid JSON object.
  """
  return read_json(checkpoint_dir(path) / CONFIG_NAME)


def weight_files(path: PathLike) -> list[pathlib.Path]:
  """The safetensors files of a checkpoint directory (single or sharded).

  `model.safetensors` wins over `model.safetensors.index.json`; the shards
  of an index are returned sorted and deduplicated.

  Raises:
    FileNotFoundError: If the directory, the weights or a listed shard is
      missing (a `pytorch_model.bin` next to them is named, not loaded).
    ValueError: If the index has no `weight_map` object of file names.
  """
  path = checkpoint_dir(path)
  single = path / WEIGHTS_NAME
  index = path / WEIGHTS_INDEX_NAME
  if single.is_file():
    return [single]
  if index.is_file():
    weight_map = read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not all(
        isinstance(v, str) for v in weight_map.values()):
      raise ValueError(
          f"{index} has no 'weight_map' object mapping tensor names to "
          "shard file names; re-download or rewrite the index.")
    files = []
    for shard in sorted(set(weight_map.values())):
      shard_path = path / shard
      if not shard_path.is_file():
        raise FileNotFoundError(
            f"Checkpoint shard not found: {shard_path} (listed in {index}).")
      files.append(shard_path)
    return files
  hint = ""
  if (path / PICKLED_WEIGHTS_NAME).exists():
    hint = (f" ({PICKLED_WEIGHTS_NAME} is present, but pickled checkpoints "
            "are never loaded; convert it to safetensors)")
  raise FileNotFoundError(
      f"Weights not found: neither {single} nor {index} exists{hint}.")


def _open(file: pathlib.Path):
  """`safetensors.safe_open` with a clear error for a corrupt file."""
  try:
    return safetensors.safe_open(str(file), framework="numpy")
  except safetensors.SafetensorError as e:
    raise ValueError(
        f"{file} is not a valid safetensors file ({e}); it may be truncated "
        "or corrupt: re-download or re-save it.") from e


def is_floating(dtype: str) -> bool:
  """Whether a safetensors dtype name (`"BF16"`, `"F32"`, ...) is a float."""
  return dtype.startswith(("F", "BF"))


class Tensors(Mapping):
  """Read-on-demand view of the tensors of one or more safetensors files.

  Building it reads only the headers. `tensors[name]` reads one tensor as a
  numpy array in its stored dtype; `read(name, dtype)` casts it.
  """

  def __init__(self, files: Iterable[PathLike]):
    """Indexes the headers of `files`.

    Raises:
      FileNotFoundError: If a file does not exist.
      ValueError: If a file is not a valid safetensors file, or two files
        hold a tensor of the same name.
    """
    self._files = [pathlib.Path(f) for f in files]
    self._where: dict[str, pathlib.Path] = {}
    for file in self._files:
      if not file.is_file():
        raise FileNotFoundError(f"Checkpoint file not found: {file}")
      with _open(file) as handle:
        for key in handle.keys():
          if key in self._where:
            raise ValueError(
                f"Tensor {key!r} is in both {self._where[key]} and {file}; "
                "a checkpoint must hold each tensor once.")
          self._where[key] = file

  @property
  def files(self) -> list[pathlib.Path]:
    return list(self._files)

  def _file(self, name: str) -> pathlib.Path:
    if name not in self._where:
      raise KeyError(
          f"Tensor {name!r} is not in the checkpoint "
          f"({', '.join(str(f) for f in self._files)}); it holds "
          f"{format_names(self._where)}.")
    return self._where[name]

  def shape_dtype(self, name: str) -> tuple[tuple[int, ...], str]:
    """Shape and safetensors dtype name (`"F32"`, `"BF16"`, ...)."""
    with _open(self._file(name)) as handle:
      info = handle.get_slice(name)
      return tuple(info.get_shape()), info.get_dtype()

  def check(self, name: str, shape: Iterable[int]) -> None:
    """Raises unless tensor `name` is floating and of `shape` (header only).

    Raises:
      KeyError: If the checkpoint has no tensor `name`.
      ValueError: On another shape or a non-floating dtype (the message
        names the tensor, what was expected and what was found).
    """
    shape = tuple(shape)
    found, dtype = self.shape_dtype(name)
    if found != shape:
      raise ValueError(f"{name}: expected shape {shape}, found {found}.")
    if not is_floating(dtype):
      raise ValueError(
          f"{name}: expected a floating tensor, found {dtype}.")

  def __getitem__(self, name: str) -> np.ndarray:
    file = self._file(name)
    with _open(file) as handle:
      try:
        return handle.get_tensor(name)
      except safetensors.SafetensorError as e:
        raise ValueError(
            f"{file}: tensor {name!r} cannot be read ({e}); the file may be "
            "truncated or corrupt: re-download or re-save it.") from e

  def read(self, name: str, dtype: Any = None) -> np.ndarray:
    """Tensor `name`, cast to `dtype` (e.g. `jnp.bfloat16`) unless `None`.

    Raises:
      KeyError: If the checkpoint has no tensor `name` (the message lists
        the names it has).
    """
    arr = self[name]
    return arr if dtype is None else arr.astype(np.dtype(dtype))

  def __iter__(self) -> Iterator[str]:
    return iter(self._where)

  def __len__(self) -> int:
    return len(self._where)

  def __contains__(self, name: object) -> bool:
    return name in self._where


def open_tensors(path: PathLike) -> Tensors:
  """`Tensors` over the weights of checkpoint directory `path`."""
  return Tensors(weight_files(path))


def read_tensor(path: PathLike, name: str) -> np.ndarray | None:
  """One tensor of a checkpoint directory by its stored name, or `None`.

  Reads only that tensor, e.g. a ColBERT checkpoint's `linear.weight` next
  to its BERT weights.

  Raises:
    FileNotFoundError: If the directory has no safetensors weights.
    ValueError: If a weights file is corrupt.
  """
  tensors = open_tensors(path)
  return tensors[name] if name in tensors else None


def format_names(names: Iterable[str], limit: int = 10) -> str:
  """Sorted, comma-separated names; past `limit`, a `(+N more)` count."""
  names = sorted(names)
  more = f" (+{len(names) - limit} more)" if len(names) > limit else ""
  return ", ".join(names[:limit]) + more


def check_names(
    path: PathLike,
    found: Iterable[str] | Mapping[str, str],
    expected: Iterable[str],
    model: str,
) -> None:
  """Raises if the tensor names of a checkpoint differ from the model's.

  Args:
    path: The checkpoint (for the message).
    found: Names in the checkpoint (after the loader's renaming); a mapping
      of those names to the stored ones shows unexpected tensors by their
      stored names.
    expected: Names the model needs.
    model: What the names are checked against (e.g. `"its LLaMA config"`).

  Raises:
    ValueError: Listing the missing and the unexpected tensor names.
  """
  stored = found if isinstance(found, Mapping) else {}
  found, expected = set(found), set(expected)
  problems = []
  if unexpected := found - expected:
    problems.append("unexpected tensors: " + format_names(
        stored.get(n, n) for n in unexpected))
  if missing := expected - found:
    problems.append("missing tensors: " + format_names(missing))
  if problems:
    raise ValueError(f"Checkpoint {path} does not match {model}; "
                     + "; ".join(problems))


def set_param(
    var: nnx.Variable,
    value: Any,
    mesh: jax.sharding.Mesh | None,
    rules: Any,
    dtype: Any = None,
) -> None:
  """Sets a loaded `value` (cast to `dtype` unless `None`) into `var`.

  With a `mesh` the value is placed with the sharding that `var`'s logical
  axes give under `rules`; with `mesh=None` it becomes an ordinary array on
  the default device (placed on no mesh).
  """
  if mesh is not None:
    spec = sharding.logical_to_spec(
        var.get_metadata().get("out_sharding"), rules, mesh=mesh,
        shape=tuple(var.get_value().shape))
    value = jax.device_put(value, jax.sharding.NamedSharding(mesh, spec))
  value = jnp.asarray(value)
  var.set_value(value if dtype is None else value.astype(dtype))


def check_initialized(model: nnx.Module) -> None:
  """Raises if a variable of a loaded `model` still holds no array.

  Raises:
    AssertionError: Naming the variable (a loader bug, not bad input).
  """
  for path, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Variable) and not isinstance(
        node.get_value(), jax.Array):
      raise AssertionError(f"Variable {path} was not initialized.")
