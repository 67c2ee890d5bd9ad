"""Tests of lowrank.ranking.cross_encoder and lowrank.ranking.rerank."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import adapters
from lowrank import assets
from lowrank import optim
from lowrank import ranking
from lowrank import sharding
from lowrank.models import bert
from lowrank.ranking import cross_encoder

_WORDS = (
    "retrieval ranking gradient sparse vector protein cell gene query "
    "document index model train test score matrix low rank adapter"
).split()


def _texts(n: int, seed: int, lo: int, hi: int) -> list[str]:
  rng = np.random.default_rng(seed)
  return [" ".join(rng.choice(_WORDS, int(k)))
          for k in rng.integers(lo, hi, n)]


def _one_device_mesh():
  return sharding.make_mesh(devices=jax.devices()[:1])


def _tiny_model(pooling: str = "cls", seed: int = 0):
  config = bert.BertConfig(
      vocab_size=30522, hidden_size=32, num_hidden_layers=2,
      num_attention_heads=4, intermediate_size=64, max_position_embeddings=128,
      hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  with sharding.use_mesh(_one_device_mesh()):
    encoder = bert.BertModel(config, rngs=nnx.Rngs(seed))
    model = cross_encoder.CrossEncoder(encoder, pooling=pooling,
                                       rngs=nnx.Rngs(seed + 1))
  model.eval()
  return model


class _Tokenizer:
  tokenizer = None

  @classmethod
  def get(cls):
    if cls.tokenizer is None:
      cls.tokenizer = bert.Tokenizer.from_pretrained(assets.minilm_path())
    return cls.tokenizer


class LayoutTest(absltest.TestCase):

  def test_cls_query_sep_doc_sep_with_token_types(self):
    tok = _Tokenizer.get()
    (ids, types), = cross_encoder.tokenize_pairs(
        tok, ["gene expression"], ["protein folding in cells"])
    cls_id, sep_id = tok.cls_token_id, tok.sep_token_id
    self.assertEqual(ids[0], cls_id)
    seps = [i for i, t in enumerate(ids) if t == sep_id]
    self.assertLen(seps, 2)
    self.assertEqual(seps[1], len(ids) - 1)
    # Segment 0: [CLS] q [SEP]; segment 1: d [SEP].
    self.assertEqual(types, [0] * (seps[0] + 1) + [1] * (len(ids) - seps[0]
                                                         - 1))
    self.assertEqual(tok.decode(ids[1:seps[0]]), "gene expression")
    self.assertEqual(tok.decode(ids[seps[0] + 1:]), "protein folding in cells")

  def test_truncation_keeps_both_segments(self):
    tok = _Tokenizer.get()
    (ids, types), = cross_encoder.tokenize_pairs(
        tok, ["short query"], [" ".join(["word"] * 300)], max_length=32)
    self.assertLen(ids, 32)
    self.assertEqual(ids[-1], tok.sep_token_id)
    self.assertEqual(types[:4], [0, 0, 0, 0])  # [CLS] short query [SEP]

  def test_mismatched_inputs(self):
    tok = _Tokenizer.get()
    with self.assertRaisesRegex(ValueError, "one document per query"):
      cross_encoder.tokenize_pairs(tok, ["a", "b"], ["c"])
    with self.assertRaisesRegex(ValueError, "not a str"):
      cross_encoder.tokenize_pairs(tok, "a", "b")

  def test_encode_pairs_is_a_deprecated_tokenize_pairs(self):
    tok = _Tokenizer.get()
    with self.assertWarnsRegex(DeprecationWarning, "tokenize_pairs"):
      got = cross_encoder.encode_pairs(tok, ["q"], ["d"], max_length=16)
    self.assertEqual(
        got, cross_encoder.tokenize_pairs(tok, ["q"], ["d"], max_length=16))

  def test_no_module_level_from_pretrained(self):
    self.assertFalse(hasattr(cross_encoder, "from_pretrained"))

  def test_bucket_lengths(self):
    self.assertEqual(cross_encoder.bucket_lengths(128), (64, 128))
    self.assertEqual(cross_encoder.bucket_lengths(100), (64, 100))
    self.assertEqual(cross_encoder.bucket_lengths(100, None), (100,))
    self.assertEqual(cross_encoder.bucket_lengths(40, (16, 32)), (16, 32, 40))
    with self.assertRaisesRegex(ValueError, ">= 2"):
      cross_encoder.bucket_lengths(40, (1, 32))


class ScoringTest(parameterized.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = _Tokenizer.get()
    cls.model = _tiny_model()
    cls.queries = _texts(13, 0, 1, 8)
    cls.docs = _texts(13, 1, 1, 60)

  def test_bucketed_equals_unbucketed_and_compiles_are_bounded(self):
    kw = dict(batch_size=4, max_length=96)
    before = cross_encoder.score_trace_count()
    bucketed = cross_encoder.score_pairs(
        self.model, self.tok, self.queries, self.docs,
        buckets=(16, 32, 64), **kw)
    traces = cross_encoder.score_trace_count() - before
    self.assertBetween(traces, 2, 4)  # At most one per bucket (16/32/64/96).
    padded = cross_encoder.score_pairs(
        self.model, self.tok, self.queries, self.docs, buckets=None, **kw)
    self.assertEqual(bucketed.shape, (13,))
    self.assertEqual(bucketed.dtype, np.float32)
    np.testing.assert_allclose(bucketed, padded, atol=1e-5, rtol=1e-5)
    # Scores do not depend on batch composition either.
    one = cross_encoder.score_pairs(
        self.model, self.tok, self.queries[5:6], self.docs[5:6], **kw)
    np.testing.assert_allclose(one, bucketed[5:6], atol=1e-5, rtol=1e-5)
    # Scoring again with the same shapes compiles nothing new.
    before = cross_encoder.score_trace_count()
    cross_encoder.score_pairs(self.model, self.tok, self.queries[::-1],
                              self.docs[::-1], buckets=(16, 32, 64), **kw)
    self.assertEqual(cross_encoder.score_trace_count(), before)

  def _forward(self, n, length, *, zero_token_types=False):
    """The model's eager scores of the first `n` pairs, padded to `length`."""
    batch = self.tok.pad(cross_encoder.tokenize_pairs(
        self.tok, self.queries[:n], self.docs[:n], max_length=length),
                         length=length)
    types = batch["token_type_ids"]
    return self.model(batch["input_ids"], batch["attention_mask"],
                      np.zeros_like(types) if zero_token_types else types)

  def test_matches_direct_forward(self):
    got = self.model.score_pairs(self.tok, self.queries[:3], self.docs[:3],
                                 max_length=96)
    np.testing.assert_allclose(got, np.asarray(self._forward(3, 96)),
                               atol=1e-5, rtol=1e-5)

  def test_token_types_matter(self):
    a = self._forward(2, 64)
    b = self._forward(2, 64, zero_token_types=True)
    self.assertGreater(float(jnp.max(jnp.abs(a - b))), 1e-6)

  @parameterized.parameters("cls", "mean", "pooler")
  def test_poolings(self, pooling):
    model = _tiny_model(pooling)
    scores = model.score_pairs(self.tok, self.queries[:3], self.docs[:3],
                               max_length=64)
    self.assertTrue(np.all(np.isfinite(scores)))
    self.assertEqual(model.pooling, pooling)
    self.assertEqual(model.bert.pooler is not None, pooling == "pooler")

  def test_bad_arguments(self):
    with self.assertRaisesRegex(ValueError, "Unknown pooling"):
      _tiny_model("max")
    with self.assertRaisesRegex(ValueError, "batch_size"):
      cross_encoder.score_pairs(self.model, self.tok, ["a"], ["b"],
                                batch_size=0)
    with self.assertRaisesRegex(ValueError, "max_length"):
      cross_encoder.score_pairs(self.model, self.tok, ["a"], ["b"],
                                max_length=1)
    self.assertEqual(
        cross_encoder.score_pairs(self.model, self.tok, [], []).shape, (0,))


class RerankTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = _Tokenizer.get()
    cls.model = _tiny_model(seed=3)
    cls.corpus = dict(zip([f"d{i}" for i in range(12)], _texts(12, 2, 3, 40)))
    cls.queries = {"q1": "gene protein", "q2": "low rank adapter",
                   "q3": "empty"}
    cls.first_stage = {
        "q1": {f"d{i}": float(12 - i) for i in range(12)},
        "q2": {"d3": 1.0, "d4": 2.0, "d5": 2.0},  # tie: d5 before d4
        "q3": {},
    }

  def test_keeps_top_k_and_scores_them(self):
    out = ranking.rerank(self.model, self.tok, self.queries, self.corpus,
                         self.first_stage, k=2, max_length=64)
    self.assertEqual(set(out), {"q1", "q2", "q3"})
    self.assertEqual(set(out["q1"]), {"d0", "d1"})
    self.assertEqual(set(out["q2"]), {"d4", "d5"})
    self.assertEqual(out["q3"], {})
    direct = cross_encoder.score_pairs(
        self.model, self.tok, ["gene protein", "low rank adapter"],
        [self.corpus["d1"], self.corpus["d5"]], max_length=64)
    np.testing.assert_allclose(
        [out["q1"]["d1"], out["q2"]["d5"]], direct, atol=1e-5, rtol=1e-5)
    for ranking_ in out.values():
      for s in ranking_.values():
        self.assertIsInstance(s, float)

  def test_deterministic_and_k_beyond_run_length(self):
    a = ranking.rerank(self.model, self.tok, self.queries, self.corpus,
                       self.first_stage, k=100, max_length=64)
    b = ranking.rerank(self.model, self.tok, self.queries, self.corpus,
                       self.first_stage, k=100, max_length=64)
    self.assertEqual(a, b)
    self.assertLen(a["q1"], 12)
    self.assertLen(a["q2"], 3)

  def test_errors(self):
    args = (self.model, self.tok, self.queries, self.corpus)
    for k in (0, -1, 1.5, True):
      with self.assertRaisesRegex(ValueError, "positive int"):
        ranking.rerank(*args, self.first_stage, k=k)
    with self.assertRaisesRegex(ValueError, "not in queries.*'q9'"):
      ranking.rerank(*args, {"q9": {"d1": 1.0}}, k=5)
    with self.assertRaisesRegex(ValueError, "not in the corpus.*'zz'"):
      ranking.rerank(*args, {"q1": {"zz": 3.0, "d1": 1.0}}, k=5)
    # An unknown document below the top-k is never looked at.
    out = ranking.rerank(*args, {"q1": {"zz": 0.0, "d1": 1.0}}, k=1,
                         max_length=64)
    self.assertEqual(list(out["q1"]), ["d1"])
    with self.assertRaisesRegex(ValueError, "score_pairs"):
      ranking.rerank(object(), self.tok, self.queries, self.corpus,
                     self.first_stage)


class TrainingTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tok = _Tokenizer.get()
    queries = ["gene protein cell"] * 4 + ["low rank adapter"] * 4
    docs = ["gene protein cell expression", "matrix train", "sparse vector",
            "test score", "low rank adapter model", "protein cell",
            "query document", "index retrieval"]
    enc = cross_encoder.tokenize_pairs(cls.tok, queries, docs, max_length=16)
    cls.batch = {k: jnp.asarray(v)
                 for k, v in cls.tok.pad(enc, length=16).items()}
    cls.labels = jnp.asarray([[1.0, 0, 0, 0], [1.0, 0, 0, 0]])

  def _train(self, model, method, tx, steps=6):
    graphdef, params, rest = nnx.split(
        model, cross_encoder.trainable_filter(method), ...)
    params, rest = nnx.as_pure(params), nnx.as_pure(rest)
    step = cross_encoder.make_train_step(graphdef, tx, loss="softmax_ce")
    opt_state = cross_encoder.init_optimizer(tx, params)
    losses = []
    for _ in range(steps):
      params, opt_state, m = step(params, opt_state, rest, self.batch,
                                  self.labels)
      losses.append(float(m["loss"]))
    return losses

  def test_lora_trains_adapters_and_head_only(self):
    model = _tiny_model(seed=5)
    adapters.inject(model, method="lora",
                    targets=r"bert\..*\.(query|key|value|dense)", rank=2,
                    rngs=0)
    counts = cross_encoder.count_parameters(model, "lora")
    lora = sum(x.size for x in jax.tree.leaves(
        nnx.to_pure_dict(nnx.state(model, nnx.LoRAParam))))
    self.assertEqual(counts["trainable"], lora + 32 + 1)  # + head.
    self.assertLess(counts["trainable"], counts["total"] / 10)
    losses = self._train(model, "lora", optax.adamw(1e-2))
    self.assertLess(losses[-1], losses[0])

  def test_full_training_with_galore(self):
    model = _tiny_model(seed=6)
    counts = cross_encoder.count_parameters(model, "full")
    self.assertEqual(counts["trainable"], counts["total"])
    losses = self._train(model, "full",
                         optim.galore_adamw(1e-2, rank=4, refresh_every=3))
    self.assertLess(losses[-1], losses[0])

  def test_group_loss_names(self):
    model = _tiny_model(seed=7)
    for name in ("rank_net", "list_mle", "pointwise_bce", "lambda_loss"):
      value = cross_encoder.group_loss(model, self.batch, self.labels,
                                       loss=name)
      self.assertTrue(np.isfinite(float(value)), name)
    with self.assertRaisesRegex(ValueError, "Unknown loss 'hinge'"):
      cross_encoder.group_loss(model, self.batch, self.labels, loss="hinge")
    with self.assertRaisesRegex(ValueError, "Unknown loss 'margin_mse'"):
      cross_encoder.make_train_step(nnx.graphdef(model), optax.adamw(1e-3),
                                    loss="margin_mse")
    with self.assertRaisesRegex(ValueError, "method must be"):
      cross_encoder.trainable_filter("lorax")


class PretrainedTest(absltest.TestCase):

  def test_from_pretrained_minilm(self):
    model, tok = cross_encoder.CrossEncoder.from_pretrained(
        pooling="cls", seed=0, max_length=64)
    self.assertIsNone(model.bert.pooler)
    self.assertEqual(model.head.kernel.shape, (384, 1))
    scores = model.score_pairs(tok, ["what is a gene"],
                               ["A gene is a unit of heredity."])
    self.assertTrue(np.all(np.isfinite(scores)))


if __name__ == "__main__":
  absltest.main()
