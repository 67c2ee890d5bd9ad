"""Boundary cases of adapters and of adapter / checkpoint files.

Each case gives bad input and asserts a clear error (type and message), or
asserts the correct answer where a correct answer exists.
"""

import glob
import json
import os
import shutil
import warnings

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import safetensors.numpy

from lowrank import adapters
from lowrank import checkpoint

from tests import testing

_METHODS = ("lora", "dora", "vera", "nola", "randlora", "lora_xs", "loldu",
            "dylora", "adalora", "sora", "increlora", "multi_lora")
# Options some methods need to be built at all.
_OPTIONS = {"adalora": {"target_rank": 1, "total_step": 10}}
_TARGETS = ["l1", "gen", "ein"]


class _Tiny(nnx.Module):
  """`nnx.Linear` -> `nnx.LinearGeneral` -> `nnx.Einsum`, all adaptable."""

  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 12, rngs=rngs)
    self.gen = nnx.LinearGeneral(12, (2, 3), rngs=rngs)
    self.ein = nnx.Einsum("bnh,nhk->bk", (2, 3, 5), (5,), rngs=rngs)

  def __call__(self, x):
    return self.ein(self.gen(jax.nn.relu(self.l1(x))))


_X = jax.random.normal(jax.random.key(1), (4, 8))


def _model(method="lora", **kwargs):
  model = _Tiny(nnx.Rngs(0))
  kwargs = {"targets": _TARGETS, "rank": 2, **kwargs}
  return adapters.inject(model, method=method, **_OPTIONS.get(method, {}),
                         **kwargs)


def _kernels(model):
  return {p: np.array(m.base.kernel.get_value())
          for p, m in adapters.adapter_modules(model).items()}


def _adapter_values(model):
  return nnx.state(model, nnx.Any(nnx.LoRAParam, adapters.AdapterState))


_adamw_step = testing.lora_step(lambda m: jnp.sum((m(_X) - 1.0) ** 2))


class RankAndAlphaTest(parameterized.TestCase):
  """`rank` must be a positive int and `alpha` a finite number."""

  @parameterized.parameters(*_METHODS)
  def test_fractional_rank_is_a_type_error_for_every_method(self, method):
    # Used to be truncated to rank 2 without a word.
    with self.assertRaisesRegex(
        TypeError, r"rank must be a positive int .*got 2\.5 of type float"):
      _model(method, rank=2.5)

  @parameterized.named_parameters(
      ("bool", True, "bool"), ("none", None, "NoneType"),
      ("string", "8", "str"), ("whole_float", 2.0, "float"),
      ("numpy_float", np.float32(2), "float32"))
  def test_non_int_rank_is_a_type_error(self, rank, type_name):
    with self.assertRaisesRegex(TypeError, f"rank must be .*of type "
                                f"{type_name}"):
      _model(rank=rank)

  @parameterized.parameters(0, -1, np.int32(0))
  def test_rank_below_one_is_a_value_error(self, rank):
    with self.assertRaisesRegex(ValueError, r"rank must be a positive int "
                                r"\(>= 1\); got"):
      _model(rank=rank)

  def test_numpy_integer_rank_is_accepted_as_int(self):
    model = _model(rank=np.int64(2))
    for m in adapters.adapter_modules(model).values():
      self.assertIs(type(m.rank), int)
      self.assertEqual(m.rank, 2)
      self.assertEqual(m.lora_a.get_value().shape[-1], 2)

  def test_rank_pattern_value_is_checked(self):
    with self.assertRaisesRegex(TypeError,
                                r"rank_pattern\['gen'\] must be a positive"):
      _model(rank_pattern={"gen": 1.5})
    with self.assertRaisesRegex(ValueError, "Invalid rank_pattern regex"):
      _model(rank_pattern={"gen(": 1})

  def test_rank_pattern_container(self):
    # A ConfigDict (what configs hold) works; a list of pairs does not.
    model = _model(rank_pattern=ml_collections.ConfigDict({"gen": 3}))
    self.assertEqual(adapters.adapter_modules(model)["gen"].rank, 3)
    self.assertEqual(adapters.adapter_modules(model)["l1"].rank, 2)
    with self.assertRaisesRegex(TypeError, "rank_pattern must be a dict"):
      _model(rank_pattern=[("gen", 3)])

  @parameterized.named_parameters(
      ("string", "16", TypeError, "alpha must be a finite real number.*str"),
      ("bool", True, TypeError, "alpha must be a finite real number.*bool"),
      ("nan", float("nan"), ValueError, "alpha must be finite; got nan"),
      ("inf", float("inf"), ValueError, "alpha must be finite; got inf"))
  def test_bad_alpha(self, alpha, error, message):
    with self.assertRaisesRegex(error, message):
      _model(alpha=alpha)

  def test_alpha_pattern_value_is_checked(self):
    with self.assertRaisesRegex(TypeError, r"alpha_pattern\['l1'\] must be"):
      _model(alpha_pattern={"l1": "4"})

  def test_dropout_must_be_a_number(self):
    with self.assertRaisesRegex(TypeError, "dropout must be a float in"):
      _model(dropout="0.1")

  def test_targets_matching_nothing_and_invalid_regex(self):
    with self.assertRaisesRegex(ValueError,
                                "targets='nothing.*' matched no module"):
      _model(targets="nothing.*")
    with self.assertRaisesRegex(ValueError, r"Invalid targets regex 'l1\('"):
      _model(targets="l1(")


class TrainWhileMergedTest(parameterized.TestCase):
  """Training a merged model, then `unmerge`, must not corrupt the base."""

  @parameterized.parameters(*_METHODS)
  def test_unmerge_restores_base_after_training_while_merged(self, method):
    model = _model(method)
    w0 = _kernels(model)
    # The same start as a fresh `_model(method)`, without building it again.
    reference = nnx.clone(model)
    optimizer = nnx.Optimizer(model, optax.adamw(0.05, weight_decay=0.1),
                              wrt=nnx.LoRAParam)
    _adamw_step(model, optimizer)
    _adamw_step(model, optimizer)  # Momentum is now non-zero.
    adapters.merge(model)
    _adamw_step(model, optimizer)  # Zero gradient, but the factors move.
    with self.assertWarnsRegex(UserWarning,
                               "changed while the adapter was merged"):
      adapters.unmerge(model)
    for path, w in _kernels(model).items():
      np.testing.assert_allclose(w, w0[path], atol=2e-6, err_msg=path)
    # The outputs are those of the current factors on the original base
    # (jitted: eager, each forward compiles op by op).
    nnx.update(reference, _adapter_values(model))
    forward = nnx.jit(lambda m: m(_X))
    np.testing.assert_allclose(forward(model), forward(reference), atol=2e-5)

  @parameterized.parameters("lora", "dora")
  def test_unmerge_without_changes_does_not_warn(self, method):
    model = _model(method)
    for m in adapters.adapter_modules(model).values():
      m.lora_b.set_value(jnp.full_like(m.lora_b.get_value(), 0.1))
    w0, y0 = _kernels(model), model(_X)
    adapters.merge(model)
    np.testing.assert_allclose(model(_X), y0, atol=1e-5)
    with warnings.catch_warnings():
      warnings.simplefilter("error")
      adapters.unmerge(model)
    for path, w in _kernels(model).items():
      np.testing.assert_allclose(w, w0[path], atol=1e-6, err_msg=path)
    wrapper = adapters.adapter_modules(model)["l1"]
    self.assertNotIn("merge_record", vars(wrapper))

  def test_dora_direct_edit_while_merged_restores_base(self):
    model = _model("dora")
    w0 = _kernels(model)
    wrapper = adapters.adapter_modules(model)["gen"]
    wrapper.merge()
    wrapper.magnitude.set_value(wrapper.magnitude.get_value() * 3.0)
    with self.assertWarnsRegex(UserWarning, r"magnitude"):
      wrapper.unmerge()
    np.testing.assert_allclose(wrapper.base.kernel.get_value(), w0["gen"],
                               atol=1e-6)

  def test_loading_files_into_merged_adapters_is_refused(self):
    source = _model()
    directory = self.create_tempdir().full_path
    adapters.save_adapters(directory, source)
    model = _model()
    adapters.merge(model)
    with self.assertRaisesRegex(ValueError, "into merged adapters.*unmerge"):
      adapters.load_adapters(directory, model)


def _load(directory, fmt="native"):
  """`load_adapters` of `directory` into a fresh `_Tiny`."""
  return adapters.load_adapters(directory, _Tiny(nnx.Rngs(0)), format=fmt)


def _edit_json(path, edit):
  """Rewrites the JSON file `path` after `edit(config)` changed it."""
  with open(path) as f:
    config = json.load(f)
  edit(config)
  with open(path, "w") as f:
    json.dump(config, f)


def _truncate(path, cut):
  """Rewrites the file `path` as `cut(its bytes)`."""
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(cut(data))


def _edit_tensors(path, edit):
  """Rewrites the safetensors file `path` after `edit(tensors)`."""
  tensors = safetensors.numpy.load_file(path)
  edit(tensors)
  safetensors.numpy.save_file(tensors, path)


def _save_peft(test):
  directory = test.create_tempdir().full_path
  model = _model(targets=["l1"])
  adapters.save_adapters(directory, model, format="peft")
  return directory


class PeftFileTest(absltest.TestCase):
  """`load_adapters(format="peft")` on broken PEFT directories."""

  def test_truncated_weights_name_the_file(self):
    directory = _save_peft(self)
    path = os.path.join(directory, "adapter_model.safetensors")
    _truncate(path, lambda data: data[: len(data) // 2])
    with self.assertRaisesRegex(
        ValueError, f"{path} is not a readable safetensors file.*truncated"):
      _load(directory, "peft")

  def test_corrupt_config_names_the_file(self):
    directory = _save_peft(self)
    path = os.path.join(directory, "adapter_config.json")
    with open(path) as f:
      text = f.read()
    with open(path, "w") as f:
      f.write(text[:20])
    with self.assertRaisesRegex(ValueError,
                                f"{path} is not valid JSON.*truncated"):
      _load(directory, "peft")

  def test_config_that_is_not_an_object(self):
    directory = _save_peft(self)
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
      json.dump(["LORA"], f)
    with self.assertRaisesRegex(ValueError, "expected a JSON object.*list"):
      _load(directory, "peft")

  def test_missing_files(self):
    directory = _save_peft(self)
    os.remove(os.path.join(directory, "adapter_model.safetensors"))
    with self.assertRaisesRegex(FileNotFoundError,
                                "adapter_model.safetensors.*incomplete"):
      _load(directory, "peft")
    with self.assertRaisesRegex(FileNotFoundError, "adapter_config.json"):
      _load(os.path.join(directory, "nope"), "peft")

  def test_fractional_rank_in_config_names_the_file(self):
    directory = _save_peft(self)
    path = os.path.join(directory, "adapter_config.json")
    _edit_json(path, lambda config: config.update(r=2.5))
    with self.assertRaisesRegex(TypeError,
                                f"{path} does not fit.*rank must be"):
      _load(directory, "peft")

  def test_wrong_key_set(self):
    directory = _save_peft(self)
    key = "base_model.model.l1.lora_B.weight"
    _edit_tensors(os.path.join(directory, "adapter_model.safetensors"),
                  lambda tensors: tensors.pop(key))
    with self.assertRaisesRegex(ValueError, f"missing tensors.*{key}"):
      _load(directory, "peft")

  def test_wrong_shape_names_key_and_both_shapes(self):
    directory = _save_peft(self)
    key = "base_model.model.l1.lora_A.weight"
    _edit_tensors(os.path.join(directory, "adapter_model.safetensors"),
                  lambda tensors: tensors.update(
                      {key: np.zeros((2, 9), np.float32)}))
    with self.assertRaisesRegex(
        ValueError, rf"{key}: expected shape \(2, 8\), found \(2, 9\)"):
      _load(directory, "peft")


class NativeFileTest(absltest.TestCase):
  """`load_adapters` on broken lowrank adapter directories."""

  def setUp(self):
    super().setUp()
    self.directory = self.create_tempdir().full_path
    adapters.save_adapters(self.directory, _model("dora"))

  def test_truncated_weights_name_the_file(self):
    path = os.path.join(self.directory, "adapter.safetensors")
    _truncate(path, lambda data: data[:-7])
    with self.assertRaisesRegex(
        ValueError, f"{path} is not a readable safetensors file"):
      _load(self.directory)

  def test_garbage_config_names_the_file(self):
    path = os.path.join(self.directory, "lowrank_adapter.json")
    with open(path, "wb") as f:
      f.write(b"\xff\xfe garbage")
    with self.assertRaisesRegex(ValueError, f"{path} is not valid JSON"):
      _load(self.directory)

  def test_wrong_shape_names_key_and_both_shapes(self):
    _edit_tensors(os.path.join(self.directory, "adapter.safetensors"),
                  lambda tensors: tensors.update(
                      {"gen/magnitude": np.ones((3, 2), np.float32)}))
    with self.assertRaisesRegex(
        ValueError,
        r"gen/magnitude: expected shape \(2, 3\), found \(3, 2\)"):
      _load(self.directory)

  def test_rank_that_does_not_fit_names_the_config(self):
    _edit_json(os.path.join(self.directory, "lowrank_adapter.json"),
               lambda config: config["modules"]["l1"].update(rank="2"))
    with self.assertRaisesRegex(TypeError, "'l1' in .*lowrank_adapter.json "
                                "does not fit the model: rank must be"):
      _load(self.directory)


class AdapterFilesEntryTest(absltest.TestCase):
  """`save_adapters` / `load_adapters`: format and directory mistakes."""

  def test_unknown_format_on_save(self):
    with self.assertRaisesRegex(
        ValueError, r"format must be one of \('native', 'peft'\); got "
        r"'safetensors'"):
      adapters.save_adapters(self.create_tempdir().full_path, _model(),
                             format="safetensors")

  def test_unknown_format_on_load(self):
    with self.assertRaisesRegex(ValueError, "format must be one of.*'PEFT'"):
      _load(self.create_tempdir().full_path, "PEFT")

  def test_native_directory_loaded_as_peft_names_the_way_out(self):
    directory = self.create_tempdir().full_path
    adapters.save_adapters(directory, _model())
    with self.assertRaisesRegex(
        ValueError, r"holds 'native'-format adapters "
        r"\(lowrank_adapter.json\), not 'peft' ones.*format='native'"):
      _load(directory, "peft")

  def test_peft_directory_loaded_as_native_names_the_way_out(self):
    directory = _save_peft(self)
    with self.assertRaisesRegex(
        ValueError, r"holds 'peft'-format adapters "
        r"\(adapter_config.json\), not 'native' ones.*format='peft'"):
      _load(directory)

  def test_directory_without_adapter_files(self):
    with self.assertRaisesRegex(
        FileNotFoundError, "holds no adapter files.*lowrank_adapter.json.*"
        "adapter_config.json"):
      _load(self.create_tempdir().full_path)

  def test_peft_option_with_native_format(self):
    with self.assertRaisesRegex(
        TypeError, r"format='native'\) takes no options; got "
        r"\['convert_initialized'\]"):
      adapters.save_adapters(self.create_tempdir().full_path, _model(),
                             convert_initialized=True)

  def test_scaled_vera_as_peft_names_the_scale_and_the_native_format(self):
    model = _model("vera", targets=["l1"], alpha=4.0)
    with self.assertRaisesRegex(
        ValueError, r"PEFT VeRA has no alpha/scale; got scales \[2\.0\].*"
        r"format='native'"):
      adapters.save_adapters(self.create_tempdir().full_path, model,
                             format="peft")

  def test_both_formats_in_one_directory_load_the_one_asked_for(self):
    directory = self.create_tempdir().full_path
    source = _model(targets=["l1"])
    adapters.save_adapters(directory, source)
    adapters.save_adapters(directory, source, format="peft")
    for fmt in adapters.FORMATS:
      loaded = _load(directory, fmt)
      np.testing.assert_allclose(loaded(_X), source(_X), rtol=1e-5,
                                 atol=1e-6)

  def test_deprecated_names_warn_and_forward(self):
    directory = self.create_tempdir().full_path
    source = _model(targets=["l1"])
    cases = [
        (adapters.save_adapter, adapters.load_adapter, "save_adapters"),
        (adapters.save_peft, adapters.load_peft, "format='peft'"),
    ]
    for save, load, new in cases:
      with self.assertWarnsRegex(DeprecationWarning, new):
        save(directory, source)
      with self.assertWarnsRegex(DeprecationWarning, "load_adapters"):
        loaded = load(directory, _Tiny(nnx.Rngs(0)))
      np.testing.assert_allclose(loaded(_X), source(_X), rtol=1e-5,
                                 atol=1e-6)


def _state(rows=4):
  params = {"w": jnp.arange(rows * 3.0).reshape(rows, 3), "b": jnp.zeros(3)}
  return {"params": params, "opt_state": optax.adam(1e-3).init(params),
          "step": jnp.asarray(0, jnp.int32)}


class CheckpointFileTest(absltest.TestCase):
  """`Checkpointer` on partial or corrupt step directories."""

  def setUp(self):
    super().setUp()
    self.directory = self.create_tempdir().full_path
    with checkpoint.Checkpointer(self.directory, max_to_keep=None,
                                 async_save=False) as ckpt:
      ckpt.save(1, _state())
      ckpt.save(2, jax.tree.map(lambda x: x + 1, _state()))
    self.step_dir = os.path.join(self.directory, "2")

  def _restore_latest(self, target=None):
    with checkpoint.Checkpointer(self.directory, async_save=False) as ckpt:
      return ckpt.restore_or_init(_state() if target is None else target)

  def _assert_corrupt_step_2(self):
    with self.assertRaisesRegex(
        ValueError,
        f"Checkpoint step 2 in {self.directory} is incomplete or corrupt.*"
        f"delete {self.step_dir} to resume from step 1.*restore\\(step=1"):
      self._restore_latest()

  def test_garbage_item_metadata(self):
    with open(os.path.join(self.step_dir, "default", "_METADATA"), "w") as f:
      f.write("{not json")
    self._assert_corrupt_step_2()

  def test_array_files_removed(self):
    for path in glob.glob(os.path.join(self.step_dir, "default", "**", "d",
                                       "*"), recursive=True):
      os.remove(path)
    self._assert_corrupt_step_2()

  def test_truncated_array_files(self):
    for path in glob.glob(os.path.join(self.step_dir, "default", "**", "d",
                                       "*"), recursive=True):
      data = open(path, "rb").read()
      with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    self._assert_corrupt_step_2()

  def test_empty_step_directory(self):
    shutil.rmtree(self.step_dir)
    os.makedirs(self.step_dir)
    self._assert_corrupt_step_2()

  def test_garbage_step_metadata_still_restores_the_step(self):
    # Orbax logs the unreadable `_CHECKPOINT_METADATA` (it only holds the
    # metrics and a timestamp) and restores the arrays, which are intact.
    with open(os.path.join(self.step_dir, "_CHECKPOINT_METADATA"), "w") as f:
      f.write("{garbage")
    state, step = self._restore_latest()
    self.assertEqual(step, 2)
    np.testing.assert_array_equal(state["params"]["w"],
                                  _state()["params"]["w"] + 1)

  def test_unfinished_save_is_ignored(self):
    # What a kill during `save(3)` leaves: never listed, never restored.
    tmp = os.path.join(self.directory,
                       "3.orbax-checkpoint-tmp-1234567890")
    shutil.copytree(self.step_dir, tmp)
    state, step = self._restore_latest()
    self.assertEqual(step, 2)
    np.testing.assert_array_equal(state["step"], 1)

  def test_target_of_another_shape_names_path_and_shapes(self):
    with self.assertRaisesRegex(
        ValueError,
        rf"does not fit checkpoint {self.step_dir}: shape mismatch at "
        r"'opt_state/0/mu/w': checkpoint \(4, 3\) vs target \(5, 3\).*"
        r"shape mismatch at 'params/w': checkpoint \(4, 3\) vs target "
        r"\(5, 3\)"):
      self._restore_latest(_state(rows=5))

  def test_missing_step(self):
    with checkpoint.Checkpointer(self.directory, read_only=True) as ckpt:
      with self.assertRaisesRegex(FileNotFoundError,
                                  r"step 7 .*steps on disk: \[1, 2\]"):
        ckpt.restore(7, _state())


if __name__ == "__main__":
  absltest.main()
