"""Config checks shared by the experiment binaries: fail before loading.

Each binary's `validate_config` lists its rules with a `Checker` and runs
them before it touches data or models, so a bad value costs milliseconds
instead of a zero-shot evaluation followed by a crash. Every error names the
key, what it expected, what it found and the flag that fixes it:

    checks = config_checks.Checker(config, defaults=config_lib.get_config())
    checks.positive_int("batch_size", "num_train_steps")
    checks.choice("optimizer.name", OPTIMIZERS)
    checks.mesh("mesh", batch=("batch_size",))

    ValueError: config.batch_size must be a positive integer; found 0. Set
    --config.batch_size to e.g. 32.

Wrong types raise `TypeError`, wrong values `ValueError`, missing files or
directories `FileNotFoundError`. `unused_overrides` rejects command-line
overrides that the chosen run never reads (`--config.scale` with a ColBERT
model, whose logit scale is `colbert.scale`): a flag with no effect is a
silent wrong answer too.
"""

from collections.abc import Iterable, Mapping, Sequence
import math
import os
import pathlib
import re
from typing import Any

from absl import flags
import jax
from ml_collections import config_flags

from lowrank import sharding
from lowrank.data import beir


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Dotted leaf keys of a (nested) mapping, e.g. {"adapter.rank": 8}."""
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping) or hasattr(value, "to_dict"):
      out.update(_flat(value, name + "."))
      if not value:
        out[name] = value  # An empty block is a key too.
    else:
      out[name] = value
  return out


def _where(path: pathlib.Path) -> str:
  """" (relative to the current directory ...)" for a relative path."""
  return "" if path.is_absolute() else (
      f" (relative to the current directory {os.getcwd()})")


def _is_int(value: Any) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


class Checker:
  """Checks on one config (or flag values), with helpful messages.

  Attributes:
    config: The config (an `ml_collections.ConfigDict` or a mapping).
    defaults: The default config of the same binary, or None; its values
      are suggested in the messages ("Set --config.x to e.g. <default>").
  """

  def __init__(self, config: Any, defaults: Any = None, *,
               label: str = "config.{}", flag: str = "--config.{}"):
    """Wraps `config`.

    Args:
      config: The config to check; dotted names reach nested blocks.
      defaults: The binary's default config (for examples), or None.
      label: How a key is named in messages (`"{}"` is the dotted key).
      flag: How the flag that sets a key is spelled.
    """
    self.config = config
    self.defaults = defaults
    self._label = label
    self._flag = flag

  def label(self, name: str) -> str:
    return self._label.format(name)

  def flag(self, name: str) -> str:
    return self._flag.format(name)

  def get(self, name: str) -> Any:
    """The value at dotted `name`.

    Raises:
      KeyError: If the config has no such key.
    """
    node = self.config
    for part in name.split("."):
      try:
        node = node[part]
      except (KeyError, AttributeError, TypeError):
        raise KeyError(
            f"{self.label(name)} is missing from the config; this binary "
            f"reads it. Start from the binary's config file "
            f"(experiments/configs/) and override keys with "
            f"{self.flag('<key>')}=..."
        ) from None
    return node

  def _fix(self, name: str, what: str, valid=lambda v: True) -> str:
    """"Set --config.x to e.g. <default>." (or to `what` with no default)."""
    if self.defaults is not None:
      try:
        default = Checker(self.defaults).get(name)
      except KeyError:
        default = None
      try:
        usable = default is not None and bool(valid(default))
      except TypeError:
        usable = False
      if usable:
        return f"Set {self.flag(name)} to e.g. {default!r}."
    return f"Set {self.flag(name)} to {what}."

  def _each(self, names: Sequence[str], what: str, valid, type_ok) -> None:
    for name in names:
      value = self.get(name)
      if not type_ok(value):
        raise TypeError(
            f"{self.label(name)} must be {what}; found {value!r} "
            f"({type(value).__name__}). {self._fix(name, what, valid)}")
      if not valid(value):
        raise ValueError(
            f"{self.label(name)} must be {what}; found {value!r}. "
            f"{self._fix(name, what, valid)}")

  def positive_int(self, *names: str) -> None:
    """Each key holds an int >= 1 (not a bool)."""
    self._each(names, "a positive integer", lambda v: v >= 1, _is_int)

  def non_negative_int(self, *names: str) -> None:
    """Each key holds an int >= 0 (not a bool)."""
    self._each(names, "an integer >= 0", lambda v: v >= 0, _is_int)

  def positive_number(self, *names: str) -> None:
    """Each key holds a finite number > 0."""
    self._each(names, "a finite number > 0",
               lambda v: math.isfinite(v) and v > 0, _is_number)

  def non_negative_number(self, *names: str) -> None:
    """Each key holds a finite number >= 0."""
    self._each(names, "a finite number >= 0",
               lambda v: math.isfinite(v) and v >= 0, _is_number)

  def in_range(self, name: str, low: float, high: float, *,
               low_closed: bool = True, high_closed: bool = False) -> None:
    """`low <= value < high` (brackets set by `low_closed`/`high_closed`)."""
    what = (f"a number in {'[' if low_closed else '('}{low}, {high}"
            f"{']' if high_closed else ')'}")
    def valid(v):
      above = v >= low if low_closed else v > low
      below = v <= high if high_closed else v < high
      return math.isfinite(v) and above and below
    self._each((name,), what, valid, _is_number)

  def boolean(self, *names: str) -> None:
    """Each key holds True or False."""
    self._each(names, "True or False", lambda v: True,
               lambda v: isinstance(v, bool))

  def choice(self, name: str, options: Iterable[str]) -> None:
    """The key holds one of `options` (listed in the error)."""
    options = tuple(options)
    value = self.get(name)
    if value not in options:
      raise ValueError(
          f"{self.label(name)} must be one of {list(options)}; found "
          f"{value!r}. Set {self.flag(name)} to one of them.")

  def regex(self, name: str) -> None:
    """The key holds a string that compiles as a regular expression."""
    value = self.get(name)
    if not isinstance(value, str):
      raise TypeError(f"{self.label(name)} must be a regular expression "
                      f"string; found {value!r} ({type(value).__name__}).")
    try:
      re.compile(value)
    except re.error as e:
      raise ValueError(
          f"{self.label(name)} must be a valid regular expression; found "
          f"{value!r} ({e}). {self._fix(name, 'a valid regex')}") from None

  def not_greater(self, small: str, large: str) -> None:
    """`config[small] <= config[large]` (e.g. warmup within the run)."""
    a, b = self.get(small), self.get(large)
    if a > b:
      raise ValueError(
          f"{self.label(small)} ({a}) must be <= {self.label(large)} ({b}). "
          f"Lower {self.flag(small)} or raise {self.flag(large)}.")

  def known_keys(self, open_keys: Sequence[str] = ()) -> None:
    """Every key of the config is a key of `defaults` (the binary reads it).

    Command-line overrides of unknown keys are already refused by
    ml_collections; this catches configs built in code or in another
    config file, where a key at the wrong level (`rank` for `adapter.rank`)
    would be silently ignored.

    Args:
      open_keys: Blocks whose content is free-form (e.g. keyword arguments
        passed through, `adapter.options`).

    Raises:
      ValueError: On a key the defaults do not have; suggests the keys with
        the same last name.
    """
    if self.defaults is None:
      return
    known = _flat(self.defaults)
    for key in _flat(self.config):
      if key in known or any(key == o or key.startswith(o + ".")
                             for o in open_keys):
        continue
      leaf = key.rsplit(".", 1)[-1]
      similar = [self.label(k) for k in known
                 if k.rsplit(".", 1)[-1] == leaf]
      hint = (f" Did you mean {' or '.join(similar)}?" if similar else
              f" Remove it, or check the spelling against the config file.")
      raise ValueError(
          f"{self.label(key)} is not a key this binary reads, so it would be "
          f"ignored.{hint}")

  def mesh(self, name: str = "mesh", *, batch: Sequence[str] = (),
           num_devices: int | None = None) -> dict[str, int]:
    """Mesh axis sizes fit the devices; batch keys split over data x fsdp.

    Args:
      name: The mesh block (`{"data": -1, "fsdp": 1, "tensor": 1}`).
      batch: Keys holding global batch sizes that are sharded over the
        `("data", "fsdp")` axes.
      num_devices: The device count (default `jax.device_count()`, every
        process's devices).

    Returns:
      The axis sizes with the -1 resolved.

    Raises:
      ValueError: On unknown axes, bad sizes, a product that is not the
        device count, or a batch size that the data x fsdp size does not
        divide.
    """
    axes = dict(self.get(name).items())
    label = self.label(name)
    n = jax.device_count() if num_devices is None else num_devices
    unknown = sorted(set(axes) - set(sharding.MESH_AXES))
    if unknown:
      raise ValueError(f"{label} has unknown axes {unknown}; the axes are "
                       f"{list(sharding.MESH_AXES)}.")
    bad = {k: v for k, v in axes.items() if not _is_int(v) or v == 0 or v < -1}
    if bad or list(axes.values()).count(-1) > 1:
      raise ValueError(
          f"{label} sizes must be positive integers, with at most one -1 "
          f"(which takes the remaining devices); found {axes}. Set e.g. "
          f"{self.flag(name + '.data')}=-1.")
    known = math.prod(v for v in axes.values() if v != -1)
    if -1 in axes.values():
      if n % known:
        raise ValueError(
            f"{label} {axes}: the {n} devices are not divisible by {known}, "
            f"the product of the fixed axes, so the -1 axis has no size. "
            f"Use sizes whose product divides {n}.")
      axes = {k: n // known if v == -1 else v for k, v in axes.items()}
    elif known != n:
      raise ValueError(
          f"{label} {axes} needs {known} devices; {n} are available. Set the "
          f"sizes to multiply to {n}, or one of them to -1.")
    shards = axes.get("data", 1) * axes.get("fsdp", 1)
    for key in batch:
      size = self.get(key)
      if size % shards:
        raise ValueError(
            f"{self.label(key)} ({size}) must be divisible by the data x fsdp "
            f"mesh size {shards} ({label} {axes}), which splits every batch. "
            f"Set {self.flag(key)} to a multiple of {shards}, e.g. "
            f"{-(-size // shards) * shards}.")
    return axes

  def directory(self, name: str, path: str | os.PathLike[str], *,
                containing: Sequence[str] = ()) -> None:
    """`path` (the value of `name`) is a directory holding `containing`."""
    root = pathlib.Path(path)
    if not root.is_dir():
      raise FileNotFoundError(
          f"{self.label(name)}: directory {str(root)!r} does not exist"
          f"{_where(root)}. Fix {self.flag(name)}.")
    for item in containing:
      if not (root / item).exists():
        raise FileNotFoundError(
            f"{self.label(name)}: {str(root / item)!r} does not exist; "
            f"{str(root)!r} must hold {list(containing)}.")

  def file(self, name: str, path: str | os.PathLike[str]) -> None:
    """`path` (the value of `name`) is an existing file."""
    if not pathlib.Path(path).is_file():
      raise FileNotFoundError(
          f"{self.label(name)}: file {str(path)!r} does not exist"
          f"{_where(pathlib.Path(path))}. Fix {self.flag(name)}.")

  def beir_directory(self, name: str, path: str | os.PathLike[str],
                     splits: Sequence[str]) -> None:
    """A BEIR directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""
    self.directory(name, path, containing=("corpus.jsonl", "queries.jsonl"))
    available = beir.available_splits(path)
    for split in splits:
      if split not in available:
        raise FileNotFoundError(
            f"{self.label(name)}: {str(pathlib.Path(path, 'qrels'))!r} has "
            f"no {split}.tsv (available splits: {available}); this run "
            f"needs the splits {list(splits)}.")

  def data_spec(self, name: str = "data", *, splits=("train", "test"),
                embedded: Sequence[str] = ("code_search",)) -> None:
    """One of `embedded`, or `beir:<directory>` holding `splits`."""
    spec = self.get(name)
    if not isinstance(spec, str):
      raise TypeError(f"{self.label(name)} must be a string; found {spec!r}.")
    if spec.startswith("beir:"):
      self.beir_directory(name, spec.split(":", 1)[1], splits)
    elif spec not in embedded:
      raise ValueError(
          f"{self.label(name)} must be one of {list(embedded)} or "
          f"'beir:<directory>'; found {spec!r}. Fix {self.flag(name)}.")

  def model_dir(self, name: str) -> None:
    """"" (the bundled model) or a HF-format directory with config.json."""
    path = self.get(name)
    if path:
      self.directory(name, path, containing=("config.json",))


def overrides(config_flag: Any) -> dict[str, Any]:
  """The `--config.<key>=value` overrides given on the command line.

  Args:
    config_flag: The config flag (`flags.FLAGS["config"]` or its holder).

  Returns:
    Dotted key -> value; empty when the flag was not given.
  """
  if isinstance(config_flag, flags.FlagHolder):
    config_flag = flags.FLAGS[config_flag.name]
  if not config_flag.present:
    return {}
  return dict(config_flags.get_override_values(config_flag))


def unused_overrides(config: Any, given: Mapping[str, Any],
                     *unused: Mapping[str, str]) -> None:
  """Rejects command-line overrides of keys this run never reads.

  Args:
    config: The config (for "did you mean" suggestions).
    given: The overrides (`overrides(flag)`), dotted key -> value.
    *unused: Dotted key or block -> why the run does not read it, e.g.
      `{"colbert": "model='biencoder' is not ColBERT"}`. With several
      mappings (a binary that makes several runs of one config), a key is
      unused when every mapping lists it; the first one's reason is given.

  Raises:
    ValueError: On an override of an unused key; names the keys with the
      same last name that the run does read.
  """
  def why_unused(key):
    whys = [next((why for prefix, why in u.items()
                  if key == prefix or key.startswith(prefix + ".")), None)
            for u in unused]
    return whys[0] if whys and None not in whys else None
  for key, value in given.items():
    why = why_unused(key)
    if why is None:
      continue
    leaf = key.rsplit(".", 1)[-1]
    similar = [f"--config.{k}" for k in _flat(config)
               if k != key and k.rsplit(".", 1)[-1] == leaf
               and why_unused(k) is None]
    hint = f" Did you mean {' or '.join(similar)}?" if similar else (
        " Remove the flag, or change the setting that makes it unused.")
    raise ValueError(
        f"--config.{key}={value!r} has no effect in this run: {why}.{hint}")


def metric_depth(metrics: Iterable[str]) -> int:
  """The deepest cutoff among trec_eval names (`recall_100` -> 100)."""
  depths = [int(m.rsplit("_", 1)[1]) for m in metrics
            if m.rsplit("_", 1)[-1].isdigit()]
  return max(depths, default=0)


def retrieval_depth(name: str, k: int, metrics: Iterable[str],
                    num_docs: int) -> None:
  """`k` results per query are enough for every metric's cutoff.

  Recall@100 over a top-20 list is Recall@20 under a wrong name; a corpus
  of at most `k` documents is retrieved whole, which is fine.

  Raises:
    ValueError: If `k < min(deepest cutoff, num_docs)`.
  """
  need = min(metric_depth(metrics), num_docs)
  if k < need:
    raise ValueError(
        f"{name}={k} retrieves fewer results than the metrics read "
        f"({sorted(metrics)}: depth {metric_depth(metrics)}, {num_docs} "
        f"documents), so they would be computed on a top-{k} list under a "
        f"deeper name. Set {name} to at least {need}.")
