"""Config checks shared by the experiment binaries: fail before loading.

A binary's `validate_config` calls `validate_common(config, defaults)` (the
shared layout: seed, data, model, adapter, optimizer, train, mesh) and adds
its own rules with the returned `Checker`, before it touches data or
models. Errors name the key, what was expected and found, and the fix:
`ValueError: config.train.batch_size must be a positive integer; found 0.
Set --config.train.batch_size to e.g. 32.` Optimizers are checked by
building them (`lowrank.train.optimizer_from_config`), meshes by
`lowrank.sharding.make_mesh`: those errors are the library's, prefixed
with the key. `unused_overrides` rejects flags the chosen run never reads.
"""

from collections.abc import Iterable, Iterator, Mapping, Sequence
import math
import os
import pathlib
import re
from typing import Any

from absl import flags
import jax
from ml_collections import config_flags

from lowrank import adapters
from lowrank import sharding
from lowrank import train
from lowrank.data import specs


def _is_map(value: Any) -> bool:
  return isinstance(value, Mapping) or hasattr(value, "to_dict")


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Dotted leaf keys (and empty blocks) of a nested mapping."""
  out = {}
  for key, value in tree.items():
    if _is_map(value) and value:
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def _has(tree: Any, name: str) -> bool:
  for part in name.split("."):
    if not _is_map(tree) or part not in tree:
      return False
    tree = tree[part]
  return True


_INT = lambda v: isinstance(v, int) and not isinstance(v, bool)
_NUM = lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)


class Checker:
  """Checks on one config (or flag values), with helpful messages.

  `label` / `flag` spell a dotted key in messages (`"config.{}"`,
  `"--config.{}"`); `defaults` (the binary's default config) supplies the
  "Set --config.x to e.g. <default>" examples.
  """

  def __init__(self, config: Any, defaults: Any = None, *,
               label: str = "config.{}", flag: str = "--config.{}"):
    self.config, self.defaults = config, defaults
    self.label, self.flag = label.format, flag.format

  def get(self, name: str, config: Any = None) -> Any:
    """The value at dotted `name`; KeyError naming the key if missing."""
    node = self.config if config is None else config
    for part in name.split("."):
      try:
        node = node[part]
      except (KeyError, AttributeError, TypeError):
        raise KeyError(
            f"{self.label(name)} is missing from the config; this binary "
            f"reads it. Start from the binary's config file (experiments/"
            f"configs/) and override keys with {self.flag('<key>')}=..."
        ) from None
    return node

  def _each(self, names: Sequence[str], what: str, type_ok, valid) -> None:
    for name in names:
      v, fix = self.get(name), f"Set {self.flag(name)} to {what}."
      try:
        default = self.get(name, self.defaults) if self.defaults else None
        if type_ok(default) and valid(default):
          fix = f"Set {self.flag(name)} to e.g. {default!r}."
      except (KeyError, TypeError):
        pass
      ok = type_ok(v)
      if not ok or not valid(v):
        raise (ValueError if ok else TypeError)(
            f"{self.label(name)} must be {what}; found {v!r}"
            f"{'' if ok else f' ({type(v).__name__})'}. {fix}")

  def positive_int(self, *names: str) -> None:
    self._each(names, "a positive integer", _INT, lambda v: v >= 1)

  def non_negative_int(self, *names: str) -> None:
    self._each(names, "an integer >= 0", _INT, lambda v: v >= 0)

  def positive_number(self, *names: str) -> None:
    self._each(names, "a finite number > 0", _NUM,
               lambda v: math.isfinite(v) and v > 0)

  def non_negative_number(self, *names: str) -> None:
    self._each(names, "a finite number >= 0", _NUM,
               lambda v: math.isfinite(v) and v >= 0)

  def in_range(self, name: str, low: float, high: float, *,
               low_closed: bool = True, high_closed: bool = False) -> None:
    """`low <= value < high` (brackets set by `low_closed`/`high_closed`)."""
    what = (f"a number in {'[' if low_closed else '('}{low}, {high}"
            f"{']' if high_closed else ')'}")
    self._each((name,), what, _NUM, lambda v: math.isfinite(v) and (
        v >= low if low_closed else v > low) and (
            v <= high if high_closed else v < high))

  def boolean(self, *names: str) -> None:
    self._each(names, "True or False", lambda v: isinstance(v, bool),
               lambda v: True)

  def regex(self, name: str) -> None:
    def compiles(v):
      try:
        return re.compile(v) is not None
      except re.error:
        return False
    self._each((name,), "a valid regular expression",
               lambda v: isinstance(v, str), compiles)

  def choice(self, name: str, options: Iterable[str]) -> None:
    options, value = list(options), self.get(name)
    if value not in options:
      raise ValueError(
          f"{self.label(name)} must be one of {options}; found {value!r}. "
          f"Set {self.flag(name)} to one of them.")

  def not_greater(self, small: str, large: str) -> None:
    """`config[small] <= config[large]` (e.g. warmup within the run)."""
    a, b = self.get(small), self.get(large)
    if a > b:
      raise ValueError(
          f"{self.label(small)} ({a}) must be <= {self.label(large)} ({b}). "
          f"Lower {self.flag(small)} or raise {self.flag(large)}.")

  def known_keys(self, open_keys: Sequence[str] = ()) -> None:
    """Every key is one of `defaults` (keys under `open_keys` are free).

    ml_collections refuses overrides of unknown keys; this catches configs
    built in code, where `rank` for `adapter.rank` would be ignored.
    """
    known = _flat(self.defaults) if self.defaults is not None else None
    for key in _flat(self.config) if known is not None else ():
      if key in known or any(key == o or key.startswith(o + ".")
                             for o in open_keys):
        continue
      leaf = key.rsplit(".", 1)[-1]
      similar = [self.label(k) for k in known if k.rsplit(".", 1)[-1] == leaf]
      hint = (f" Did you mean {' or '.join(similar)}?" if similar else
              " Remove it, or check the spelling against the config file.")
      raise ValueError(f"{self.label(key)} is not a key this binary reads, "
                       f"so it would be ignored.{hint}")

  def mesh(self, name: str = "mesh", *, batch: Sequence[str] = (),
           first_devices: bool = False) -> dict[str, int]:
    """`sharding.make_mesh` accepts the sizes; data x fsdp divides `batch`.

    With `first_devices` the mesh may use the first `prod(sizes)` devices.
    Returns the axis sizes with the -1 resolved.
    """
    axes, n = dict(self.get(name).items()), jax.device_count()
    fix = (f"Set {self.flag(name + '.<axis>')} to integers that multiply to "
           f"{'at most ' * first_devices}{n} (one may be -1: the rest).")
    if not all(_INT(v) for v in axes.values()):
      raise TypeError(f"{self.label(name)} sizes must be integers; found "
                      f"{axes}. {fix}")
    devices = jax.devices()
    if first_devices and -1 not in axes.values():
      devices = devices[:max(math.prod(axes.values()), 0)]
    try:
      axes = dict(sharding.make_mesh(axes, devices=devices).shape)
    except ValueError as e:
      raise ValueError(f"{self.label(name)}: {e} {fix}") from None
    shards = axes.get("data", 1) * axes.get("fsdp", 1)
    for key in batch:
      if (size := self.get(key)) % shards:
        raise ValueError(
            f"{self.label(key)} ({size}) must be divisible by the data x fsdp "
            f"mesh size {shards} ({self.label(name)} {axes}), which splits "
            f"every batch. Set {self.flag(key)} to a multiple of {shards}, "
            f"e.g. {-(-size // shards) * shards}.")
    return axes

  def file(self, name: str, path: Any, *, directory: bool = False,
           containing: Sequence[str] = ()) -> None:
    """`path` (the value of `name`) is a file (a directory holding
    `containing`)."""
    root = pathlib.Path(path)
    if not (root.is_dir() if directory else root.is_file()):
      where = "" if root.is_absolute() else f" (relative to {os.getcwd()})"
      raise FileNotFoundError(
          f"{self.label(name)}: {'directory' if directory else 'file'} "
          f"{str(root)!r} does not exist{where}. Fix {self.flag(name)}.")
    for item in containing:
      if not (root / item).exists():
        raise FileNotFoundError(
            f"{self.label(name)}: {str(root / item)!r} does not exist; "
            f"{str(root)!r} must hold {list(containing)}.")

  def call(self, name: str, fn, *args) -> Any:
    """`fn(*args)`: a library check; its error is prefixed with the key."""
    try:
      return fn(*args)
    except (ValueError, FileNotFoundError) as e:
      sep = " " if str(e).startswith("must") else ": "
      raise type(e)(f"{self.label(name)}{sep}{e} Fix {self.flag(name)}."
                    ) from None

  def beir_directory(self, name: str, path: Any,
                     splits: Sequence[str]) -> None:
    """A BEIR directory: corpus.jsonl, queries.jsonl, qrels/<split>.tsv."""
    self.call(name, specs.check_beir_directory, path, tuple(splits))

  def data_spec(self, name: str = "data.spec", *,
                splits=("train", "test")) -> None:
    """`"code_search"` or `beir:<directory>` holding `splits`."""
    self.call(name, specs.check, self.get(name), tuple(splits))

  def model_dir(self, name: str) -> None:
    """"" (the bundled model) or a HF-format directory with config.json."""
    if path := self.get(name):
      self.file(name, path, directory=True, containing=("config.json",))


def _sections(tree: Any, name: str, prefix: str = "") -> Iterator[str]:
  """Paths of the blocks called `name` (of their sub-blocks when all entries
  are blocks: one section per run, e.g. `optimizer.galore`)."""
  for key, value in tree.items():
    path = prefix + key
    if not _is_map(value):
      continue
    if key != name:
      yield from _sections(value, name, path + ".")
    elif value and all(_is_map(v) for v in value.values()):
      yield from (f"{path}.{k}" for k in value)
    else:
      yield path


def validate_common(config: Any, defaults: Any = None, *,
                    splits: Sequence[str] | None = ("train", "test"),
                    batch: Sequence[str] | None = None,
                    first_devices: bool = False,
                    open_keys: Sequence[str] = ()) -> Checker:
  """Checks the shared layout; returns the `Checker` for the binary's rules.

  With `defaults`, every key must be theirs (keys under adapter and
  optimizer sections, the factories' arguments, and `open_keys` are free).
  Where present: `seed` >= 0; `data.spec` names existing data (`splits`;
  None: the binary checks its own spec);
  `model.path` is "" or a HF directory; each `adapter` section (or
  sub-section, one per run) has a known method, a positive rank, dropout in
  [0, 1), a regex for targets; each `optimizer` section builds
  (`optimizer_from_config`), its (peak) learning rate is > 0 and a
  schedule's warmup fits the nearest `train.num_steps`; each `train`
  section has positive cadences (`eval_every` >= 0); `mesh` fits the
  devices (`Checker.mesh`) and divides `batch` (default: every
  `train.batch_size`).
  """
  check, has = Checker(config, defaults), lambda key: _has(config, key)
  adapter_secs = list(_sections(config, "adapter"))
  optimizer_secs = list(_sections(config, "optimizer"))
  train_secs = list(_sections(config, "train"))
  check.known_keys(open_keys=(*adapter_secs, *optimizer_secs, *open_keys))
  if has("seed"):
    check.non_negative_int("seed")
  if has("data.spec") and splits is not None:
    check.data_spec("data.spec", splits=splits)
  if has("model.path"):
    check.model_dir("model.path")
  for a in adapter_secs:
    if has(f"{a}.method"):
      check.choice(f"{a}.method", ("full", *sorted(adapters.METHODS)))
    if check.get(a).get("method") == "full":
      continue
    for key, rule in (("rank", check.positive_int), ("targets", check.regex),
                      ("dropout", lambda k: check.in_range(k, 0.0, 1.0))):
      if has(f"{a}.{key}"):
        rule(f"{a}.{key}")
  for t in train_secs:
    check.positive_int(*(f"{t}.{k}" for k in (
        "num_steps", "batch_size", "log_every", "checkpoint_every")
                         if has(f"{t}.{k}")))
    if has(f"{t}.eval_every"):
      check.non_negative_int(f"{t}.eval_every")
  for o in optimizer_secs:
    lr, parts = check.get(o).get("learning_rate"), o.split(".")
    if lr is not None:
      check.positive_number(f"{o}.learning_rate" + ".peak_value" * _is_map(lr))
    run = next((t for i in range(len(parts) - 1, -1, -1)
                if (t := ".".join(parts[:i] + ["train"])) in train_secs), None)
    if _is_map(lr) and "warmup_steps" in lr and run:
      check.not_greater(f"{o}.learning_rate.warmup_steps", f"{run}.num_steps")
    try:
      train.optimizer_from_config(check.get(o))
    except (ValueError, TypeError) as e:
      raise type(e)(f"{check.label(o)}: {e}") from None
  if has("mesh"):
    check.mesh(batch=[f"{t}.batch_size" for t in train_secs if has(
        f"{t}.batch_size")] if batch is None else batch,
               first_devices=first_devices)
  return check


def overrides(config_flag: Any) -> dict[str, Any]:
  """The `--config.<key>=value` overrides given (dotted key -> value)."""
  if isinstance(config_flag, flags.FlagHolder):
    config_flag = flags.FLAGS[config_flag.name]
  if not config_flag.present:
    return {}
  return dict(config_flags.get_override_values(config_flag))


def unused_overrides(config: Any, given: Mapping[str, Any],
                     *unused: Mapping[str, str]) -> None:
  """ValueError on an override (`given`) of a key this run never reads.

  Each of `unused` maps a dotted key or block to why the run does not read
  it; with several (several runs of one config) a key is unused when every
  mapping lists it. The message names the keys of the same last name that
  the run does read.
  """
  def why_unused(key):
    whys = [next((why for prefix, why in u.items()
                  if key == prefix or key.startswith(prefix + ".")), None)
            for u in unused]
    return whys[0] if whys and None not in whys else None
  for key, value in given.items():
    if (why := why_unused(key)) is None:
      continue
    leaf = key.rsplit(".", 1)[-1]
    similar = [f"--config.{k}" for k in _flat(config)
               if k != key and k.rsplit(".", 1)[-1] == leaf
               and why_unused(k) is None]
    hint = f" Did you mean {' or '.join(similar)}?" if similar else (
        " Remove the flag, or change the setting that makes it unused.")
    raise ValueError(
        f"--config.{key}={value!r} has no effect in this run: {why}.{hint}")

