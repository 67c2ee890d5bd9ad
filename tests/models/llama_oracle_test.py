"""Parity of `lowrank.models.llama` with `transformers.LlamaForCausalLM`.

Oracle test: a tiny random HF LLaMA (grouped KV heads, tied and untied
embeddings) saved with safetensors must load with `llama.load_pretrained`
and give HF's logits; what `llama.save_pretrained` writes must load in
`transformers` and give ours; greedy decoding of left-padded prompts must
pick HF's tokens. Needs the `oracle` extra (torch, transformers); the module
is skipped without it.

    /work/oracle-venv/bin/python -m pytest -q tests/models/llama_oracle_test.py
"""

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

_ORACLE = "LLaMA parity test needs the `oracle` extra: pip install -e .[oracle]"
torch = pytest.importorskip("torch", reason=_ORACLE)
transformers = pytest.importorskip("transformers", reason=_ORACLE)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import numpy as np

from lowrank import sharding
from lowrank.models import llama
# pylint: enable=g-import-not-at-top,wrong-import-position

pytestmark = pytest.mark.oracle

_TOL = 1e-4
_VOCAB = 128


def _hf_model(tie: bool, seed: int = 0):
  """A random 2-layer HF LLaMA: width 64, 4 query heads, 2 KV heads."""
  torch.manual_seed(seed)
  config = transformers.LlamaConfig(
      vocab_size=_VOCAB,
      hidden_size=64,
      intermediate_size=96,
      num_hidden_layers=2,
      num_attention_heads=4,
      num_key_value_heads=2,
      max_position_embeddings=64,
      rms_norm_eps=1e-5,
      rope_theta=500.0,  # Not the default, so a dropped theta would show.
      tie_word_embeddings=tie,
      initializer_range=0.2,  # Large weights: differences are not hidden.
  )
  model = transformers.LlamaForCausalLM(config).eval()
  # HF initialises norms to 1; randomise them so a missed norm shows.
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name.endswith("norm.weight"):
        p.uniform_(0.5, 1.5)
  return model


def _hf_logits(model, ids, mask) -> np.ndarray:
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(np.asarray(ids, np.int64)),
                attention_mask=torch.from_numpy(np.asarray(mask, np.int64)))
  return out.logits.float().numpy()


def _batch(seed: int = 0):
  """Two rows of 9 tokens; the second is right-padded after 5 tokens."""
  rng = np.random.default_rng(seed)
  ids = rng.integers(0, _VOCAB, (2, 9)).astype(np.int32)
  mask = np.ones((2, 9), np.int32)
  mask[1, 5:] = 0
  return ids, mask


def _mesh():
  return sharding.use_mesh(sharding.make_mesh(devices=jax.devices()[:1]))


class LlamaOracleTest(parameterized.TestCase):

  @parameterized.product(tie=(False, True), scan_layers=(False, True))
  def test_load_hf_checkpoint_matches_hf_logits(self, tie, scan_layers):
    hf = _hf_model(tie)
    path = self.create_tempdir().full_path
    hf.save_pretrained(path, safe_serialization=True)
    ids, mask = _batch()
    with _mesh():
      model = llama.load_pretrained(path, scan_layers=scan_layers)
      ours = np.asarray(model(ids, attention_mask=mask))
    self.assertEqual(model.config.tie_embeddings, tie)
    self.assertEqual(model.lm_head is None, tie)
    self.assertEqual(model.config.rope_theta, 500.0)
    self.assertEqual(model.config.num_kv_heads, 2)
    ref = _hf_logits(hf, ids, mask)
    valid = mask.astype(bool)
    np.testing.assert_allclose(ours[valid], ref[valid], atol=_TOL, rtol=_TOL)

  def test_sharded_hf_checkpoint_loads(self):
    hf = _hf_model(tie=False, seed=1)
    path = self.create_tempdir().full_path
    hf.save_pretrained(path, safe_serialization=True, max_shard_size="60KB")
    index = os.path.join(path, llama.WEIGHTS_INDEX_NAME)
    self.assertTrue(os.path.exists(index))
    ids, mask = _batch(1)
    with _mesh():
      ours = np.asarray(llama.load_pretrained(path)(ids, attention_mask=mask))
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        ours[valid], _hf_logits(hf, ids, mask)[valid], atol=_TOL, rtol=_TOL)

  @parameterized.parameters(False, True)
  def test_saved_checkpoint_loads_in_transformers(self, tie):
    config = llama.LlamaConfig.tiny(vocab_size=_VOCAB, tie_embeddings=tie,
                                    rope_theta=300.0, initializer_range=0.2)
    path = self.create_tempdir().full_path
    ids, mask = _batch(2)
    with _mesh():
      model = llama.LlamaForCausalLM(config, rngs=nnx.Rngs(3))
      llama.save_pretrained(model, path)
      ours = np.asarray(model(ids, attention_mask=mask))
    hf = transformers.LlamaForCausalLM.from_pretrained(path).eval()
    self.assertEqual(hf.config.num_key_value_heads, config.num_kv_heads)
    valid = mask.astype(bool)
    np.testing.assert_allclose(
        ours[valid], _hf_logits(hf, ids, mask)[valid], atol=_TOL, rtol=_TOL)

  def test_greedy_generation_matches_hf(self):
    hf = _hf_model(tie=False, seed=4)
    path = self.create_tempdir().full_path
    hf.save_pretrained(path, safe_serialization=True)
    rng = np.random.default_rng(4)
    ids = rng.integers(0, _VOCAB, (2, 6)).astype(np.int32)
    mask = np.ones((2, 6), np.int32)
    mask[0, :2] = 0  # Left padding.
    ids[0, :2] = 0
    with _mesh():
      model = llama.load_pretrained(path)
      ours = np.asarray(llama.generate(model, ids, 8, attention_mask=mask))
    with torch.no_grad():
      out = hf.generate(
          input_ids=torch.from_numpy(ids.astype(np.int64)),
          attention_mask=torch.from_numpy(mask.astype(np.int64)),
          max_new_tokens=8, min_new_tokens=8, do_sample=False,
          pad_token_id=0, eos_token_id=None)
    np.testing.assert_array_equal(ours, out[:, 6:].numpy())


if __name__ == "__main__":
  absltest.main()
