"""experiments.common_flags: the forms `--config` accepts, and its errors."""

import os
import pathlib

from absl import flags
from absl.testing import absltest
from absl.testing import parameterized

from experiments import common_flags
from experiments.configs import finetune_retriever as finetune_config
from experiments.configs import pretrain_lm as pretrain_config

_REPO = pathlib.Path(__file__).resolve().parents[2]
_FINETUNE = os.path.realpath(finetune_config.__file__)


def _file(spec: str) -> str:
  path, _, _ = spec.partition(":")
  return os.path.realpath(path)


class ResolveConfigTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    cwd = os.getcwd()
    self.addCleanup(os.chdir, cwd)
    self.elsewhere = self.create_tempdir().full_path
    os.chdir(self.elsewhere)  # Not the checkout: no experiments/ here.

  def test_existing_path_is_kept(self):
    os.chdir(_REPO)
    spec = "experiments/configs/finetune_retriever.py:smoke"
    self.assertEqual(common_flags.resolve_config(spec), spec)

  def test_absolute_path_is_kept(self):
    self.assertEqual(common_flags.resolve_config(_FINETUNE + ":demo"),
                     _FINETUNE + ":demo")

  @parameterized.named_parameters(
      ("bundled_path_from_another_directory",
       "experiments/configs/finetune_retriever.py:smoke"),
      ("module_name", "experiments.configs.finetune_retriever:smoke"))
  def test_bundled_config(self, spec):
    got = common_flags.resolve_config(spec)
    self.assertTrue(got.endswith(":smoke"), got)
    self.assertEqual(_file(got), _FINETUNE)

  def test_bundled_path_normalised(self):
    got = common_flags.resolve_config("./experiments//configs/pretrain_lm.py")
    self.assertEqual(got, os.path.realpath(pretrain_config.__file__))

  def test_preset_after_the_first_colon_is_passed_whole(self):
    got = common_flags.resolve_config("experiments.configs.pretrain_lm:a:b")
    self.assertTrue(got.endswith(".py:a:b"), got)

  def test_bundled_configs_lists_every_binary(self):
    self.assertEqual(common_flags.bundled_configs(),
                     ["finetune_retriever.py", "pretrain_lm.py",
                      "rerank_decoder.py", "train_reranker.py"])

  def test_empty(self):
    with self.assertRaisesRegex(ValueError, "No config file or module given"):
      common_flags.resolve_config("")

  def test_preset_only(self):
    with self.assertRaisesRegex(ValueError, "No config file or module given"):
      common_flags.resolve_config(":smoke")

  def test_directory(self):
    with self.assertRaisesRegex(ValueError, "names the directory .*not a file"):
      common_flags.resolve_config(self.elsewhere)

  def test_unknown_bundled_name(self):
    with self.assertRaisesRegex(
        ValueError, r"no 'finetune\.py' among the installed configs.*"
        r"installed: finetune_retriever\.py, pretrain_lm\.py"):
      common_flags.resolve_config("experiments/configs/finetune.py:smoke")

  def test_missing_file(self):
    with self.assertRaisesRegex(
        ValueError, r"No config file 'configs/x\.py'; expected a config file "
        r"path, .* or a module such as"):
      common_flags.resolve_config("configs/x.py")

  def test_missing_absolute_file_is_not_replaced_by_the_bundled_one(self):
    path = os.path.join(self.elsewhere, "experiments", "configs",
                        "finetune_retriever.py")
    with self.assertRaisesRegex(ValueError, "No config file"):
      common_flags.resolve_config(path)

  def test_unknown_module(self):
    with self.assertRaisesRegex(
        ValueError, r"No config file or module 'experiments\.configs\.nope'"):
      common_flags.resolve_config("experiments.configs.nope:smoke")

  def test_unknown_package(self):
    with self.assertRaisesRegex(
        ValueError, r"No config file or module 'nosuch\.configs' \(No module "
        r"named 'nosuch'\)"):
      common_flags.resolve_config("nosuch.configs")


class ConfigFlagTest(absltest.TestCase):

  def _parse(self, *args: str, name: str = "config") -> flags.FlagValues:
    cwd = os.getcwd()
    self.addCleanup(os.chdir, cwd)
    os.chdir(self.create_tempdir().full_path)
    argv = ["prog", *args]
    fv = flags.FlagValues()
    common_flags.define_config_flag(name, flag_values=fv, sys_argv=argv)
    fv(argv)
    return fv

  def test_binaries_use_the_resolving_parser(self):
    config, _ = common_flags.config_and_workdir()
    self.assertIsInstance(config.parser, common_flags.ConfigParser)

  def test_module_with_preset_and_override(self):
    fv = self._parse("--config=experiments.configs.train_reranker:smoke",
                     "--config.train.num_steps=3")
    self.assertEqual(fv.config.train.num_steps, 3)
    self.assertEqual(fv.config.train.batch_size, 2)  # The smoke preset.
    with self.assertRaises(AttributeError):  # Locked.
      fv.config.not_a_field = 1

  def test_bundled_path_from_another_directory(self):
    fv = self._parse("--config=experiments/configs/rerank_decoder.py:smoke")
    self.assertEqual(fv.config.first.train.num_steps, 4)

  def test_missing_config_fails_while_parsing(self):
    with self.assertRaisesRegex(
        flags.IllegalFlagValueError,
        r"flag --config=experiments/configs/nope\.py: No config file"):
      self._parse("--config=experiments/configs/nope.py")

  def test_unknown_preset_fails_while_parsing(self):
    with self.assertRaisesRegex(flags.IllegalFlagValueError,
                                "Unknown preset 'tiny'"):
      self._parse("--config=experiments.configs.pretrain_lm:tiny")

  def test_module_without_get_config(self):
    # ml_collections loads the file as module `<flag name>_config`, reusing
    # one already in sys.modules (with its `get_config`): a fresh name here.
    with self.assertRaisesRegex(
        flags.IllegalFlagValueError,
        r"The config 'experiments\.configs' defines no `get_config`"):
      self._parse("--noget=experiments.configs", name="noget")


if __name__ == "__main__":
  absltest.main()
