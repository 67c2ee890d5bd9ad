"""Flags shared by the experiment binaries, defined once per process.

Every binary takes `--config` (an ml_collections config file, optionally
`path:preset`, with `--config.<field>=value` overrides) and `--workdir`.
Defining them here, idempotently, lets one process import several binaries
(tests, notebooks, `experiments.demo` driving `finetune_retriever`) without
absl's duplicate-flag error.
"""

from absl import flags
from ml_collections import config_flags


def config_and_workdir() -> tuple[flags.Flag, flags.Flag]:
  """The `--config` and `--workdir` flags (defined on first call)."""
  if "config" not in flags.FLAGS:
    config_flags.DEFINE_config_file(
        "config", None, "Config file, optionally `path:preset`.",
        lock_config=True)
  if "workdir" not in flags.FLAGS:
    flags.DEFINE_string(
        "workdir", None, "Checkpoints and metrics go here; reruns resume.")
  return flags.FLAGS["config"], flags.FLAGS["workdir"]
