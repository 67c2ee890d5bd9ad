"""Flags shared by the experiment binaries, defined once per process.

Every binary takes `--config` (an ml_collections config file, with
`--config.<field>=value` overrides) and `--workdir`. `--config` is a file
path (relative or absolute); or `experiments/configs/<name>.py` where no
such file exists here: the copy installed with the package (so a
checkout's commands work after `pip install lowrank-jax`, from any
directory); or a module name such as `experiments.configs.pretrain_lm`.
Each may end in `:preset`. Anything else fails while the flags are parsed,
naming what was tried. Defining the flags idempotently lets one process
import several binaries (tests, notebooks, `experiments.demo`).
"""

import importlib.resources
import importlib.util
import os
import posixpath
import re

from absl import app
from absl import flags
from absl import logging
from ml_collections import config_flags

_PACKAGE, _DIR = "experiments.configs", "experiments/configs/"
_MODULE = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def bundled_configs() -> list[str]:
  """File names of the config files installed in `experiments.configs`."""
  return sorted(p.name for p in importlib.resources.files(_PACKAGE).iterdir()
                if p.name.endswith(".py") and p.name != "__init__.py")


def resolve_config(spec: str) -> str:
  """`--config`'s value `<file or module>[:preset]` as `<.py path>[:preset]`.

  Raises:
    ValueError: When `spec` is empty, names a directory, or fits no form.
  """
  path, colon, preset = spec.partition(":")
  forms = (f"expected a config file path, `{_DIR}<name>.py` (installed: "
           f"{', '.join(bundled_configs())}) or a module such as "
           f"`{_PACKAGE}.finetune_retriever`, each optionally followed by "
           f"`:preset`; found {spec!r} (current directory {os.getcwd()})")
  if not path:
    raise ValueError(f"No config file or module given; {forms}.")
  if os.path.isfile(path):
    return spec
  if os.path.isdir(path):
    raise ValueError(f"--config names the directory {path!r}, not a file; "
                     f"{forms}.")
  relative = posixpath.normpath(path.replace(os.sep, "/"))
  if relative.startswith(_DIR):
    name = relative[len(_DIR):]
    if name not in bundled_configs():
      raise ValueError(f"No config file {path!r} here and no {name!r} among "
                       f"the installed configs; {forms}.")
    return os.fspath(importlib.resources.files(_PACKAGE) / name) + colon + (
        preset)
  if path.endswith(".py") or not _MODULE.fullmatch(path):
    raise ValueError(f"No config file {path!r}; {forms}.")
  try:
    found = importlib.util.find_spec(path)
  except (ImportError, ValueError) as e:
    raise ValueError(f"No config file or module {path!r} ({e}); "
                     f"{forms}.") from None
  if found is None or not (found.origin or "").endswith(".py"):
    raise ValueError(f"No config file or module {path!r} (a module must be "
                     f"a Python source file); {forms}.")
  return found.origin + colon + preset


class ConfigParser(flags.ArgumentParser):
  """ml_collections' config-file parser, after `resolve_config`."""

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
                       f"`{_DIR}finetune_retriever.py`.") from None

  def flag_type(self):
    return self.file_parser.flag_type()


def define_config_flag(name: str = "config",
                       flag_values: flags.FlagValues = flags.FLAGS,
                       sys_argv: list[str] | None = None) -> flags.FlagHolder:
  """`config_flags.DEFINE_config_file` (locked) with a `ConfigParser`."""
  holder = config_flags.DEFINE_config_file(
      name, None, "Config: a file `path.py`, `experiments/configs/<name>.py` "
      "(the installed copy when no such file is here) or a module "
      "`experiments.configs.<name>`, each optionally `:preset`; override "
      "fields with `--config.<field>=value`.", flag_values=flag_values,
      lock_config=True, sys_argv=sys_argv)
  flag_values[name].parser = ConfigParser(flag_values[name].parser)
  return holder


def config_and_workdir() -> tuple[flags.Flag, flags.Flag]:
  """The `--config` and `--workdir` flags (defined on first call)."""
  if "config" not in flags.FLAGS:
    define_config_flag()
  if "workdir" not in flags.FLAGS:
    flags.DEFINE_string(
        "workdir", None, "Checkpoints and metrics go here; reruns resume.")
  return flags.FLAGS["config"], flags.FLAGS["workdir"]


def run_main(train_and_evaluate, validate_config, *, setup=None) -> None:
  """Runs a binary: `--config` / `--workdir`, checks, then the experiment.

  Quiets orbax's per-write INFO logs unless `--verbosity` is given, calls
  `setup()` (e.g. `distributed.initialize`, before anything touches
  devices), checks the config and the command line's overrides
  (`validate_config(config, overrides)`), then runs
  `train_and_evaluate(config, workdir)`.
  """
  from experiments import config_checks  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  config, workdir = config_and_workdir()

  def main(argv):
    if len(argv) > 1:
      raise app.UsageError("Too many command-line arguments.")
    if not flags.FLAGS["verbosity"].present:
      logging.set_verbosity(logging.WARNING)
    if setup is not None:
      setup()
    validate_config(config.value, config_checks.overrides(config))
    train_and_evaluate(config.value, workdir.value)

  flags.mark_flags_as_required(["config", "workdir"])
  jax.config.config_with_absl()
  app.run(main)


def multi_process_setup():
  """Defines the multi-process flags; returns the `setup` for `run_main`.

  `--coordinator_address` ('host:port' of process 0, or 'auto' on a TPU pod
  slice / SLURM / Open MPI), `--num_processes`, `--process_id` (defaults:
  $LOWRANK_COORDINATOR, $LOWRANK_NUM_PROCESSES, $LOWRANK_PROCESS_ID, else
  one process); `setup()` calls `lowrank.distributed.initialize` with them
  before anything touches devices (the mesh must see every process's).
  """
  coordinator = flags.DEFINE_string(
      "coordinator_address", None,
      "Multi-process runs: 'host:port' of process 0 (the same for every "
      "process), or 'auto' (TPU pod slice / SLURM / Open MPI). Default: "
      "$LOWRANK_COORDINATOR, else a single process.")
  num_processes = flags.DEFINE_integer(
      "num_processes", None, "Multi-process runs: number of processes "
      "(default: $LOWRANK_NUM_PROCESSES, else 1).")
  process_id = flags.DEFINE_integer(
      "process_id", None, "Multi-process runs: this process's index in [0, "
      "num_processes) (default: $LOWRANK_PROCESS_ID).")

  def setup():
    from lowrank import distributed  # pylint: disable=g-import-not-at-top
    distributed.initialize(coordinator_address=coordinator.value,
                           num_processes=num_processes.value,
                           process_id=process_id.value)
  return setup
