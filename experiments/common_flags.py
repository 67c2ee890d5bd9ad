"""Flags shared by the experiment binaries, defined once per process.

Every binary takes `--config` (an ml_collections config, with
`--config.<field>=value` overrides) and `--workdir`. `--config` accepts three
forms, each optionally followed by `:preset` (passed to `get_config`):

  1. A config file path, relative to the current directory or absolute, e.g.
     `experiments/configs/finetune_retriever.py:smoke` in a checkout.
  2. `experiments/configs/<name>.py` when no such file exists relative to the
     current directory: the copy installed with the package
     `experiments.configs` (found with `importlib.resources`), so the commands
     written for a checkout work after `pip install lowrank-jax` from any
     directory.
  3. A module name, e.g. `experiments.configs.finetune_retriever:smoke` (any
     importable module whose file defines `get_config`).

A name that fits none of them fails while the flags are parsed
(`absl.flags.IllegalFlagValueError`, from the `ValueError` raised here),
naming what was tried; plain ml_collections would defer a missing file to
the first access of the config.

Defining the flags here, idempotently, lets one process import several
binaries (tests, notebooks, `experiments.demo` driving `finetune_retriever`)
without absl's duplicate-flag error.
"""

import importlib.resources
import importlib.util
import os
import posixpath
import re

from absl import flags
from ml_collections import config_flags

CONFIG_HELP = (
    "Config: a file `path.py`; `experiments/configs/<name>.py` (the copy "
    "installed with lowrank-jax when the path does not exist relative to the "
    "current directory); or a module, `experiments.configs.<name>`. Each "
    "optionally `:preset`, e.g. "
    "`experiments.configs.finetune_retriever:smoke`. Override fields with "
    "`--config.<field>=value`.")

_BUNDLED_PACKAGE = "experiments.configs"
_BUNDLED_DIR = "experiments/configs/"
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def bundled_configs() -> list[str]:
  """File names of the config files installed in `experiments.configs`."""
  root = importlib.resources.files(_BUNDLED_PACKAGE)
  return sorted(p.name for p in root.iterdir()
                if p.name.endswith(".py") and p.name != "__init__.py")


def _forms(spec: str) -> str:
  return (f"expected a config file path, `{_BUNDLED_DIR}<name>.py` (installed: "
          f"{', '.join(bundled_configs())}) or a module such as "
          f"`{_BUNDLED_PACKAGE}.finetune_retriever`, each optionally followed "
          f"by `:preset`; found {spec!r} (current directory {os.getcwd()})")


def _module_file(name: str, spec: str) -> str:
  """The source file of module `name` (form 3)."""
  try:
    found = importlib.util.find_spec(name)
  except (ImportError, ValueError) as e:
    raise ValueError(f"No config file or module {name!r} ({e}); "
                     f"{_forms(spec)}.") from None
  if found is None or not found.origin or not os.path.isfile(found.origin):
    raise ValueError(f"No config file or module {name!r}; {_forms(spec)}.")
  if not found.origin.endswith(".py"):
    raise ValueError(f"Config module {name!r} is not a Python source file "
                     f"({found.origin}); {_forms(spec)}.")
  return found.origin


def resolve_config(spec: str) -> str:
  """`spec` (`--config`'s value) with its file part made an existing path.

  Args:
    spec: `<file or module>[:preset]`, in one of the forms of the module
      docstring.

  Returns:
    `<existing .py path>[:preset]`, what ml_collections' file parser reads.

  Raises:
    ValueError: When `spec` is empty, names a directory, or fits no form.
  """
  path, colon, preset = spec.partition(":")
  if not path:
    raise ValueError(f"No config file or module given; {_forms(spec)}.")
  if os.path.isfile(path):  # Form 1.
    return spec
  if os.path.isdir(path):
    raise ValueError(f"--config names the directory {path!r}, not a file; "
                     f"{_forms(spec)}.")
  relative = posixpath.normpath(path.replace(os.sep, "/"))
  if relative.startswith(_BUNDLED_DIR):  # Form 2.
    name = relative[len(_BUNDLED_DIR):]
    if name not in bundled_configs():
      raise ValueError(f"No config file {path!r} here and no {name!r} among "
                       f"the installed configs; {_forms(spec)}.")
    installed = importlib.resources.files(_BUNDLED_PACKAGE) / name
    return os.fspath(installed) + colon + preset
  if not path.endswith(".py") and _MODULE.fullmatch(path):  # Form 3.
    return _module_file(path, spec) + colon + preset
  raise ValueError(f"No config file {path!r}; {_forms(spec)}.")


class ConfigParser(flags.ArgumentParser):
  """Wraps ml_collections' config-file parser: `resolve_config` first."""

  def __init__(self, file_parser: flags.ArgumentParser):
    self.file_parser = file_parser

  def parse(self, argument):
    try:
      return self.file_parser.parse(resolve_config(argument))
    except AttributeError as e:
      if "get_config" not in str(e):
        raise
      raise ValueError(f"The config {argument!r} defines no `get_config` "
                       f"({e}); point --config at a file such as "
                       f"`{_BUNDLED_DIR}finetune_retriever.py`.") from None

  def flag_type(self):
    return self.file_parser.flag_type()


def define_config_flag(name: str = "config",
                       flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: list[str] | None = None) -> flags.FlagHolder:
  """Defines a config-file flag that accepts the forms of `resolve_config`.

  It is `config_flags.DEFINE_config_file` (locked config, the
  `--<name>.<field>=value` overrides) with its parser wrapped in
  `ConfigParser`, before any value is parsed (the default is None).

  Args:
    name: The flag's name.
    flag_values: Where to define it.
    sys_argv: The command line that holds the overrides (default: sys.argv
      when parsed), as in `DEFINE_config_file`.

  Returns:
    The flag's holder.
  """
  holder = config_flags.DEFINE_config_file(
      name, None, CONFIG_HELP, flag_values=flag_values, lock_config=True,
      sys_argv=sys_argv)
  flag = flag_values[name]
  flag.parser = ConfigParser(flag.parser)
  return holder


def config_and_workdir() -> tuple[flags.Flag, flags.Flag]:
  """The `--config` and `--workdir` flags (defined on first call)."""
  if "config" not in flags.FLAGS:
    define_config_flag()
  if "workdir" not in flags.FLAGS:
    flags.DEFINE_string(
        "workdir", None, "Checkpoints and metrics go here; reruns resume.")
  return flags.FLAGS["config"], flags.FLAGS["workdir"]
