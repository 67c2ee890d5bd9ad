"""Bad experiment configs fail fast, before any data or model is loaded.

Each case takes a binary's preset, changes one thing, and expects the
binary's `validate_config` (which its `train_and_evaluate` and `main` call
first) to raise the given error type with a message naming the key, what
was found and the way out. `PresetsTest` validates every preset of every
config file, so a preset broken by a later edit fails here.
"""

import os
import pathlib
import re
import subprocess
import sys
import time

from absl.testing import absltest
from absl.testing import parameterized
import ml_collections

from experiments import config_checks
from experiments import demo
from experiments import eval_beir
from experiments import finetune_retriever
from experiments import pretrain_lm
from experiments import rerank_decoder
from experiments import train_reranker
from experiments.configs import finetune_retriever as finetune_config
from experiments.configs import pretrain_lm as pretrain_config
from experiments.configs import rerank_decoder as rerank_config
from experiments.configs import train_reranker as reranker_config
from tests import testing

_REPO = pathlib.Path(__file__).resolve().parents[2]
_CONFIG_DIR = _REPO / "experiments" / "configs"
_MISSING = "/nonexistent/boundaries_configs_test"

_BINARIES = {
    "finetune_retriever": (finetune_retriever, finetune_config),
    "train_reranker": (train_reranker, reranker_config),
    "rerank_decoder": (rerank_decoder, rerank_config),
    "pretrain_lm": (pretrain_lm, pretrain_config),
}


def _config(binary: str, preset: str | None = "smoke",
            **changes) -> ml_collections.ConfigDict:
  """`binary`'s preset with keys (`adapter__rank=8`) changed."""
  return testing.changed(_BINARIES[binary][1].get_config(preset), **changes)


def _validate(binary: str, config, overrides=None):
  return _BINARIES[binary][0].validate_config(config, overrides)


class BadConfigTest(parameterized.TestCase):
  """One boundary case per parameterized case."""

  @parameterized.named_parameters(
      # -- finetune_retriever.
      ("ft_batch_size_zero", "finetune_retriever", dict(train__batch_size=0),
       ValueError, r"config\.train\.batch_size must be a positive integer; "
       r"found 0\. Set --config\.train\.batch_size to e\.g\. 32\."),
      ("ft_batch_not_divisible_by_mesh", "finetune_retriever",
       dict(train__batch_size=12), ValueError,
       r"config\.train\.batch_size \(12\) must be divisible by the data x "
       r"fsdp mesh size 8 .* e\.g\. 16"),
      ("ft_mesh_wrong_device_count", "finetune_retriever",
       dict(mesh__data=16), ValueError,
       r"config\.mesh: .*'data': 16.* needs 16 devices; 8 are available"),
      ("ft_mesh_two_inferred_axes", "finetune_retriever",
       dict(mesh__fsdp=-1), ValueError, r"At most one mesh axis may be -1"),
      ("ft_unknown_method", "finetune_retriever",
       dict(adapter__method="lorax"), ValueError,
       r"config\.adapter\.method must be one of \['full', .*'lora'.*\]; "
       r"found 'lorax'"),
      ("ft_unknown_optimizer", "finetune_retriever",
       dict(optimizer__name="adamx"), ValueError,
       r"config\.optimizer: optimizer name must be one of lowrank\.optim's"
       r".*got 'adamx'"),
      ("ft_missing_beir_dir", "finetune_retriever",
       dict(data__spec=f"beir:{_MISSING}"), FileNotFoundError,
       rf"config\.data\.spec: directory '{_MISSING}' does not exist"),
      ("ft_missing_model_path", "finetune_retriever",
       dict(model__path=_MISSING), FileNotFoundError,
       rf"config\.model\.path: directory '{_MISSING}' does not exist"),
      ("ft_warmup_longer_than_run", "finetune_retriever",
       dict(optimizer__learning_rate__warmup_steps=10), ValueError,
       r"config\.optimizer\.learning_rate\.warmup_steps \(10\) must be <= "
       r"config\.train\.num_steps \(4\)"),
      ("ft_dropout_one", "finetune_retriever", dict(adapter__dropout=1.0),
       ValueError, r"config\.adapter\.dropout must be a number in "
       r"\[0\.0, 1\.0\); found 1\.0"),
      ("ft_unknown_pooling", "finetune_retriever",
       dict(model__pooling="max"), ValueError,
       r"config\.model\.pooling must be one of \['mean', 'cls', 'last'\]"),
      ("ft_galore_rank_zero", "finetune_retriever",
       dict(optimizer__name="galore_adamw", optimizer__rank=0), ValueError,
       r"config\.optimizer: rank must be a positive Python int; got 0"),
      # -- train_reranker.
      ("rr_unknown_pooling", "train_reranker", dict(model__pooling="max"),
       ValueError, r"config\.model\.pooling must be one of \['cls', "
       r"'pooler', 'mean'\]"),
      ("rr_pool_deeper_than_depth", "train_reranker",
       dict(data__negatives_depth=5), ValueError,
       r"config\.data\.negatives_pool \(6\) must be <= "
       r"config\.data\.negatives_depth \(5\)"),
      ("rr_unknown_optimizer", "train_reranker",
       dict(optimizer__name="adamx"), ValueError,
       r"optimizer name must be one of lowrank\.optim's.*got 'adamx'"),
      ("rr_missing_beir_split", "train_reranker", "beir_without_train",
       FileNotFoundError, r"has no train\.tsv \(available splits: "
       r"\['test'\]\)"),
      # -- rerank_decoder.
      ("rd_heads_do_not_divide", "rerank_decoder",
       dict(model__num_kv_heads=3, model__num_heads=2), ValueError,
       r"num_heads by model\.num_kv_heads \(3\)"),
      ("rd_no_training_signal", "rerank_decoder",
       dict(first__lm_weight=0.0, first__ltr_weight=0.0), ValueError,
       r"both 0, so FIRST fine-tuning would train nothing"),
      ("rd_unknown_icr_reduction", "rerank_decoder",
       dict(eval__icr_query_reduction="max"), ValueError,
       r"config\.eval\.icr_query_reduction must be one of \['mean', "
       r"'sum'\]"),
      # -- pretrain_lm.
      ("lm_missing_corpus_file", "pretrain_lm",
       dict(data__spec=f"file:{_MISSING}.txt"), FileNotFoundError,
       rf"config\.data\.spec: 'file:{_MISSING}\.txt': file "
       rf"'{_MISSING}\.txt' does not exist"),
      ("lm_zero_method_lr", "pretrain_lm",
       dict(optimizer__galore__learning_rate__peak_value=0.0), ValueError,
       r"config\.optimizer\.galore\.learning_rate\.peak_value must be a "
       r"finite number > 0"),
      ("lm_heads_do_not_divide", "pretrain_lm", dict(model__hidden_size=33),
       ValueError, r"config\.model: hidden_size \(33\) must be divisible "
       r"by num_heads \(2\)"),
      ("lm_unknown_projector", "pretrain_lm",
       dict(optimizer__galore__projector="qr"), ValueError,
       r"config\.optimizer\.galore: Unknown projector 'qr'; expected "
       r"\('svd', 'rsvd', 'random'\)"),
  )
  def test_bad_value(self, binary, changes, error, pattern):
    if changes == "beir_without_train":
      root = pathlib.Path(self.create_tempdir().full_path)
      (root / "qrels").mkdir()
      for name in ("corpus.jsonl", "queries.jsonl", "qrels/test.tsv"):
        (root / name).write_text("")
      changes = dict(data__spec=f"beir:{root}")
    with self.assertRaisesRegex(error, pattern):
      _validate(binary, _config(binary, **changes))

  def test_key_at_the_wrong_level_is_named(self):
    # `--config.rank=8` is refused by ml_collections; a config built in
    # code (or another config file) is checked here.
    config = _config("finetune_retriever")
    with config.unlocked():
      config.rank = 8
    with self.assertRaisesRegex(
        ValueError, r"config\.rank is not a key this binary reads, so it "
        r"would be ignored\. Did you mean config\.adapter\.rank or "
        r"config\.demo\.galore\.rank\?"):
      finetune_retriever.validate_config(config)

  def test_wrong_type_from_a_plain_dict(self):
    # E.g. a config rebuilt from JSON, where 32 became 32.0.
    values = _config("finetune_retriever").to_dict()
    values["train"]["batch_size"] = 32.0
    with self.assertRaisesRegex(
        TypeError, r"config\.train\.batch_size must be a positive integer; "
        r"found 32\.0 \(float\)"):
      finetune_retriever.validate_config(ml_collections.ConfigDict(values))

  @parameterized.named_parameters(
      ("ft_biencoder_scale_for_colbert", "finetune_retriever",
       dict(model__name="colbert"), {"model.scale": 1.0},
       r"--config\.model\.scale=1\.0 has no effect in this run: model\.scale "
       r"applies to the bi-encoder models .* not 'colbert'\. Did you mean "
       r"--config\.model\.colbert\.scale\?"),
      ("ft_adapter_rank_with_full", "finetune_retriever",
       dict(adapter__method="full"), {"adapter.rank": 16},
       r"--config\.adapter\.rank=16 has no effect .* "
       r"adapter\.method='full' trains every weight"),
      ("rr_adapter_rank_with_full", "train_reranker",
       dict(adapter__method="full"), {"adapter.rank": 8},
       r"--config\.adapter\.rank=8 has no effect .* method='full'"),
      ("rd_icr_batch_without_icr", "rerank_decoder",
       dict(eval__rerankers="first"), {"eval.icr_batch_size": 8},
       r"--config\.eval\.icr_batch_size=8 has no effect .* no ICR "
       r"reranker"),
      ("lm_relora_option_without_relora", "pretrain_lm", {},
       {"optimizer.relora.learning_rate.refresh_every": 10},
       r"--config\.optimizer\.relora\.learning_rate\.refresh_every=10 has "
       r"no effect .* read by \['relora'\], none of which is in "
       r"methods='full,galore,lora'"),
  )
  def test_override_with_no_effect(self, binary, changes, given, pattern):
    config = _config(binary, **changes)
    _validate(binary, config)  # Valid as a config; only the flag is unused.
    with self.assertRaisesRegex(ValueError, pattern):
      _validate(binary, config, given)

  def test_used_override_is_accepted(self):
    config = _config("finetune_retriever", model__name="colbert")
    finetune_retriever.validate_config(config, {"model.colbert.scale": 2.0,
                                                "train.batch_size": 8})

  def test_train_and_evaluate_fails_before_touching_the_workdir(self):
    workdir = os.path.join(self.create_tempdir().full_path, "never_made")
    start = time.perf_counter()
    with self.assertRaisesRegex(
        ValueError, r"config\.train\.batch_size must be a positive"):
      finetune_retriever.train_and_evaluate(
          _config("finetune_retriever", train__batch_size=0), workdir)
    self.assertLess(time.perf_counter() - start, 10.0)
    self.assertFalse(os.path.exists(workdir))


class DemoTest(absltest.TestCase):

  def test_repeated_run(self):
    config = _config("finetune_retriever", demo__runs="lora,lora")
    with self.assertRaisesRegex(ValueError, r"config\.demo\.runs must name "
                                r"each run at most once"):
      demo.validate_config(config)

  def test_second_run_invalid_fails_before_the_first_starts(self):
    config = _config("finetune_retriever", demo__galore__rank=0)
    workdir = os.path.join(self.create_tempdir().full_path, "never_made")
    with self.assertRaisesRegex(
        ValueError, r"config\.optimizer: rank must be a positive Python int; "
        r"got 0"):
      demo.run_demo(config, workdir)
    self.assertFalse(os.path.exists(workdir))

  def test_learning_rate_override_is_replaced_per_run(self):
    config = finetune_config.get_config("demo")
    with self.assertRaisesRegex(
        ValueError, r"--config\.optimizer\.learning_rate\.peak_value=0\.0001 "
        r"has no effect .* use --config\.demo\.<run>_learning_rate"):
      demo.validate_config(config,
                           {"optimizer.learning_rate.peak_value": 1e-4})
    # Read by the lora run only: accepted.
    demo.validate_config(config, {"adapter.rank": 16})


def _layout(**changes) -> ml_collections.ConfigDict:
  """A config in the shared layout, with dotted keys changed."""
  config = dict(
      seed=0, data=dict(spec="code_search"), model=dict(path=""),
      adapter=dict(method="lora", targets="dense", rank=4, dropout=0.0),
      optimizer=dict(name="adamw", weight_decay=0.0, learning_rate=dict(
          schedule="warmup_cosine_decay_schedule", init_value=0.0,
          peak_value=1e-3, warmup_steps=2, decay_steps=8)),
      train=dict(num_steps=8, batch_size=8, log_every=2, checkpoint_every=4,
                 eval_every=0),
      mesh=dict(data=-1, fsdp=1, tensor=1))
  for key, value in changes.items():
    *parents, leaf = key.split("__")
    node = config
    for p in parents:
      node = node[p]
    node[leaf] = value
  return ml_collections.ConfigDict(config)


class ValidateCommonTest(parameterized.TestCase):
  """`config_checks.validate_common`: the shared sections, wherever found."""

  @parameterized.parameters(sorted(_BINARIES))
  def test_every_binary_preset_passes(self, binary):
    # pretrain_lm reads a text corpus, not a retrieval data spec.
    config_checks.validate_common(
        _config(binary), _BINARIES[binary][1].get_config(),
        splits=None if binary == "pretrain_lm" else ("train", "test"),
        first_devices=True)

  @parameterized.named_parameters(
      ("zero_peak_learning_rate", dict(
          optimizer__learning_rate__peak_value=0.0), ValueError,
       r"config\.optimizer\.learning_rate\.peak_value must be a finite "
       r"number > 0; found 0\.0"),
      ("constant_learning_rate_negative", dict(optimizer__learning_rate=-1.0),
       ValueError, r"config\.optimizer\.learning_rate must be a finite "
       r"number > 0; found -1\.0"),
      ("warmup_longer_than_run", dict(
          optimizer__learning_rate__warmup_steps=9), ValueError,
       r"config\.optimizer\.learning_rate\.warmup_steps \(9\) must be <= "
       r"config\.train\.num_steps \(8\)"),
      ("optimizer_key_the_factory_lacks", dict(optimizer__momentum=0.9),
       ValueError, r"config\.optimizer: optimizer 'adamw' takes no argument "
       r"'momentum'"),
      ("unknown_optimizer", dict(optimizer__name="adamx"), ValueError,
       r"config\.optimizer: optimizer name must be one of .*got 'adamx'"),
      ("unknown_schedule", dict(
          optimizer__learning_rate__schedule="cosine"), ValueError,
       r"config\.optimizer: Unknown learning-rate schedule 'cosine'"),
      ("unknown_adapter_method", dict(adapter__method="lorax"), ValueError,
       r"config\.adapter\.method must be one of \['full', .*'lora'.*\]; "
       r"found 'lorax'"),
      ("adapter_rank_zero", dict(adapter__rank=0), ValueError,
       r"config\.adapter\.rank must be a positive integer; found 0"),
      ("adapter_rank_float", dict(adapter__rank=4.0), TypeError,
       r"config\.adapter\.rank must be a positive integer; found 4\.0 "
       r"\(float\)"),
      ("adapter_bad_regex", dict(adapter__targets="(dense"), ValueError,
       r"config\.adapter\.targets must be a valid regular expression; "
       r"found '\(dense'"),
      ("adapter_dropout_one", dict(adapter__dropout=1.0), ValueError,
       r"config\.adapter\.dropout must be a number in \[0\.0, 1\.0\)"),
      ("zero_cadence", dict(train__log_every=0), ValueError,
       r"config\.train\.log_every must be a positive integer; found 0"),
      ("negative_eval_every", dict(train__eval_every=-1), ValueError,
       r"config\.train\.eval_every must be an integer >= 0"),
      ("negative_seed", dict(seed=-1), ValueError,
       r"config\.seed must be an integer >= 0"),
      ("unknown_data_spec", dict(data__spec="msmarco"), ValueError,
       r"config\.data\.spec must be one of \['code_search'\] or "
       r"'beir:<directory>'; found 'msmarco'"),
      ("missing_model_dir", dict(model__path=_MISSING), FileNotFoundError,
       rf"config\.model\.path: directory '{_MISSING}' does not exist"),
      ("mesh_wrong_device_count", dict(mesh__data=3), ValueError,
       r"config\.mesh: Mesh \{'data': 3, .*\} needs 3 devices; 8 are "
       r"available\. Set --config\.mesh\.<axis>"),
      ("mesh_two_inferred_axes", dict(mesh__fsdp=-1), ValueError,
       r"config\.mesh: At most one mesh axis may be -1"),
      ("mesh_zero_axis", dict(mesh__tensor=0), ValueError,
       r"config\.mesh: Mesh axis sizes must be positive or -1"),
      ("mesh_unknown_axis", dict(mesh__model=1), ValueError,
       r"config\.mesh: Unknown mesh axis names \['model'\]"),
      ("mesh_size_not_an_int", dict(mesh__fsdp="2"), TypeError,
       r"config\.mesh sizes must be integers; found .*'fsdp': '2'"),
      ("batch_not_divisible_by_mesh", dict(train__batch_size=12), ValueError,
       r"config\.train\.batch_size \(12\) must be divisible by the data x "
       r"fsdp mesh size 8 .* e\.g\. 16"),
  )
  def test_bad_value(self, changes, error, pattern):
    config = _layout(**changes)
    with self.assertRaisesRegex(error, pattern):
      config_checks.validate_common(config)

  def test_valid_layout_returns_the_checker(self):
    check = config_checks.validate_common(_layout(), _layout())
    self.assertEqual(check.get("train.batch_size"), 8)

  def test_full_method_skips_the_adapter_options(self):
    config_checks.validate_common(_layout(adapter__method="full",
                                          adapter__rank=0))

  def test_mesh_of_the_first_devices(self):
    config = _layout(mesh__data=2, train__batch_size=4)
    with self.assertRaisesRegex(ValueError, r"needs 2 devices; 8 are"):
      config_checks.validate_common(config)
    config_checks.validate_common(config, first_devices=True)
    with self.assertRaisesRegex(ValueError, r"needs 16 devices; 8 are "
                                r"available\. .* multiply to at most 8"):
      config_checks.validate_common(_layout(mesh__data=16),
                                    first_devices=True)

  def test_sections_per_run(self):
    # One optimizer / adapter per run (pretrain_lm), or one optimizer and
    # train section per phase (rerank_decoder): each is checked, against
    # the nearest train section.
    config = _layout()
    with config.unlocked():
      config.optimizer = dict(galore=dict(name="galore_adamw", rank=0,
                                          learning_rate=1e-3),
                              full=dict(name="adamw", learning_rate=1e-3))
      config.adapter = dict(lora=dict(method="lora", targets="d", rank=4),
                            sst=dict(targets="d", rank=0))
    with self.assertRaisesRegex(ValueError, r"config\.adapter\.sst\.rank "
                                r"must be a positive integer"):
      config_checks.validate_common(config)
    config.adapter.sst.rank = 4
    with self.assertRaisesRegex(ValueError, r"config\.optimizer\.galore: "
                                r"rank must be a positive"):
      config_checks.validate_common(config)
    phases = _layout()
    with phases.unlocked():
      phases.first = dict(optimizer=phases.optimizer.to_dict(),
                          train=dict(num_steps=1, batch_size=8))
    with self.assertRaisesRegex(
        ValueError, r"config\.first\.optimizer\.learning_rate\.warmup_steps "
        r"\(2\) must be <= config\.first\.train\.num_steps \(1\)"):
      config_checks.validate_common(phases)

  def test_unknown_key_named_with_defaults(self):
    config = _layout()
    with config.unlocked():
      config.train.num_step = 8
    with self.assertRaisesRegex(
        ValueError, r"config\.train\.num_step is not a key this binary "
        r"reads, so it would be ignored\. Remove it"):
      config_checks.validate_common(config, _layout())
    # Keys of adapter and optimizer sections are the factories' arguments.
    config_checks.validate_common(_layout(optimizer__b1=0.8), _layout())


class EvalBeirTest(absltest.TestCase):

  def _beir(self, splits=("test",)) -> str:
    root = pathlib.Path(self.create_tempdir().full_path)
    (root / "qrels").mkdir()
    for name in ("corpus.jsonl", "queries.jsonl",
                 *(f"qrels/{s}.tsv" for s in splits)):
      (root / name).write_text("")
    return str(root)

  def test_missing_directory(self):
    with self.assertRaisesRegex(
        FileNotFoundError, rf"--data_dir: directory '{_MISSING}' does not "
        r"exist\. Fix --data_dir\."):
      eval_beir.validate_args(_MISSING, "bm25")

  def test_missing_split(self):
    with self.assertRaisesRegex(
        FileNotFoundError, r"has no dev\.tsv \(available splits: "
        r"\['test'\]\)"):
      eval_beir.validate_args(self._beir(), "bm25", "dev")

  def test_missing_corpus_file(self):
    root = self._beir()
    os.remove(os.path.join(root, "corpus.jsonl"))
    with self.assertRaisesRegex(FileNotFoundError, r"corpus\.jsonl' does "
                                r"not exist"):
      eval_beir.validate_args(root, "bm25")

  def test_zero_batch_size(self):
    with self.assertRaisesRegex(
        ValueError, r"--batch_size must be a positive integer; found 0\. "
        r"Set --batch_size to e\.g\. 32\."):
      eval_beir.validate_args(self._beir(), "bm25", batch_size=0)

  def test_valid_arguments(self):
    eval_beir.validate_args(self._beir(), "minilm", k=100)


class PresetsTest(parameterized.TestCase):
  """Every preset of every config file validates (or names missing data)."""

  def test_every_config_file_has_a_validating_binary(self):
    names = sorted(p.stem for p in _CONFIG_DIR.glob("*.py")
                   if p.name != "__init__.py")
    self.assertEqual(names, sorted(_BINARIES))

  @parameterized.parameters(finetune_config, pretrain_config, rerank_config,
                            reranker_config)
  def test_overriding_decay_steps_leaves_num_steps(self, config_lib):
    # decay_steps follows train.num_steps through a computed reference; a
    # plain one would write an override of decay_steps into num_steps.
    config = config_lib.get_config()
    flat = config_checks._flat(config.to_dict())  # pylint: disable=protected-access
    decays = [k for k in flat if k.endswith("decay_steps")]
    steps = {k: v for k, v in flat.items() if k.endswith("num_steps")}
    self.assertNotEmpty(decays)
    for key in decays:
      node = config
      *parents, leaf = key.split(".")
      for part in parents:
        node = node[part]
      node[leaf] = 3
    after = config_checks._flat(config.to_dict())  # pylint: disable=protected-access
    self.assertEqual({k: after[k] for k in steps}, steps)

  @parameterized.parameters(sorted(_BINARIES))
  def test_presets_validate(self, binary):
    source = (_CONFIG_DIR / f"{binary}.py").read_text()
    presets = sorted(set(re.findall(r'arg == "(\w+)"', source)))
    self.assertIn("smoke", presets)
    for preset in [None, *presets]:
      config = _config(binary, preset)
      spec = config.get("data", "")
      spec = spec.get("spec", "") if hasattr(spec, "get") else spec
      directory = spec.split(":", 1)[1] if spec.startswith("beir:") else None
      with self.subTest(preset=preset):
        if directory and not os.path.isdir(directory):
          # Needs ../shared/data: it must say so, not pass or fail later.
          with self.assertRaisesRegex(FileNotFoundError,
                                      re.escape(directory)):
            _validate(binary, config)
        else:
          _validate(binary, config)
    if binary == "finetune_retriever":
      for preset in [None, *presets]:
        demo.validate_config(_config(binary, preset))


class CommandLineTest(absltest.TestCase):
  """The binaries' `main` checks flags before loading anything."""

  def _run(self, module, *flags):
    workdir = os.path.join(self.create_tempdir().full_path, "never_made")
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS="--xla_force_host_platform_device_count=8")
    out = subprocess.run(
        [sys.executable, "-m", f"experiments.{module}",
         f"--config=experiments/configs/{module}.py:smoke",
         f"--workdir={workdir}", *flags],
        cwd=_REPO, env=env, capture_output=True, text=True, timeout=300,
        check=False)
    self.assertNotEqual(out.returncode, 0)
    self.assertFalse(os.path.exists(workdir))
    return out.stderr

  def test_batch_size_zero(self):
    stderr = self._run("finetune_retriever", "--config.train.batch_size=0")
    self.assertRegex(stderr, r"ValueError: config\.train\.batch_size must be "
                             r"a positive integer; found 0")

  def test_override_with_no_effect(self):
    stderr = self._run("pretrain_lm", "--config.adapter.sltrain.density=0.1")
    self.assertRegex(stderr, r"ValueError: --config\.adapter\.sltrain\."
                             r"density=0\.1 has no effect in this run")


if __name__ == "__main__":
  absltest.main()
