"""Tests for `lowrank.ranking.icr` (attention-based in-context reranking)."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax.numpy as jnp
import numpy as np

from lowrank import ranking
from lowrank import sharding
from lowrank.models import llama
from lowrank.ranking import decoder_text
from lowrank.ranking import icr
from tests import testing

TOK = decoder_text.ByteTokenizer()
QUERIES = ["parse a url", "open a file"]
DOCS = [["def urlparse(url): pass", "x = 1", "def f(): return url"],
        ["def open_file(p): return open(p)", "y = 2"]]


def _model(seed=0, **overrides):
  # Norm scales start at 1; randomised so that a skipped norm shows.
  return testing.tiny_llama_lm(seed, norm_seed=seed + 7, **overrides)


def _copy_head_model():
  """One layer, one head whose attention goes to earlier copies of a byte.

  Token embeddings are random unit vectors in the head dimensions whose
  rotary frequency is ~0 (rope_theta = 1e12, so positions barely rotate
  them); q = 4 x, k = x: a query byte's logit on a key is 32 cos(e_q, e_k),
  32 on an equal byte. Values, output projection and MLP are zero, so the
  residual stream stays the embedding.
  """
  config = llama.LlamaConfig(
      vocab_size=256, hidden_size=64, intermediate_size=8, num_layers=1,
      num_heads=1, num_kv_heads=1, rope_theta=1e12, max_position=1024)
  with sharding.use_mesh(testing.one_device_mesh()):
    model = llama.LlamaForCausalLM(config, rngs=nnx.Rngs(0))
  slow = np.r_[16:32, 48:64]  # Frequencies 1e12^(-i/32) <= 1e-6.
  emb = np.zeros((256, 64), np.float32)
  vecs = np.random.default_rng(0).normal(size=(256, slow.size))
  emb[:, slow] = vecs / np.linalg.norm(vecs, axis=1, keepdims=True)
  layer = model.model.layers[0]
  model.model.embed_tokens.embedding.set_value(jnp.asarray(emb))
  eye = jnp.eye(64, dtype=jnp.float32)
  layer.self_attn.q_proj.kernel.set_value(4.0 * eye)
  layer.self_attn.k_proj.kernel.set_value(eye)
  for lin in (layer.self_attn.v_proj, layer.self_attn.o_proj,
              layer.mlp.down_proj):
    lin.kernel.set_value(jnp.zeros_like(lin.kernel.get_value()))
  return model


class PromptTest(absltest.TestCase):

  def test_segments_and_query_positions(self):
    fmt = icr.PromptFormat(max_doc_tokens=4)
    ids, seg, is_q = icr.build_prompt(TOK, "find", ["abcdef", "xy"], fmt)
    self.assertEqual(
        TOK.decode(ids),
        "Here are some documents.\n[1] abcd\n[2] xy\nFind the documents "
        "relevant to the query.\nQuery: find\n")
    ids, seg, is_q = np.asarray(ids), np.asarray(seg), np.asarray(is_q)
    self.assertEqual(TOK.decode(ids[seg == 0]), "abcd")
    self.assertEqual(TOK.decode(ids[seg == 1]), "xy")
    self.assertEqual(TOK.decode(ids[is_q]), "find")
    with self.assertRaisesRegex(ValueError, "at least one document"):
      icr.build_prompt(TOK, "q", [])
    with self.assertRaisesRegex(ValueError, "no token"):
      icr.build_prompt(TOK, "", ["d"])


class AttentionForwardTest(parameterized.TestCase):

  @parameterized.parameters(False, True)
  def test_hidden_states_match_model_and_mass_sums(self, scan_layers):
    model = _model(scan_layers=scan_layers)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 256, (3, 24)).astype(np.int32)
    mask = np.ones((3, 24), bool)
    mask[1, 17:] = False  # Right padding.
    weights = rng.uniform(size=(3, 24)).astype(np.float32) * mask
    hidden, mass = icr.attention_forward(model, ids, mask, weights)
    ref, _ = model.model(ids, attention_mask=mask)
    np.testing.assert_allclose(np.asarray(hidden)[mask],
                               np.asarray(ref)[mask], atol=1e-5, rtol=1e-5)
    mass = np.asarray(mass)
    # Each query row's probabilities sum to 1 per layer and head.
    cfg = model.config
    np.testing.assert_allclose(
        mass.sum(1), cfg.num_layers * cfg.num_heads * weights.sum(1),
        rtol=1e-5)
    self.assertTrue(np.all(mass >= 0))
    self.assertTrue(np.all(mass[1, 17:] == 0))  # Padding is never attended.
    # Causal: a key after the last weighted query gets no mass.
    w = np.zeros_like(weights)
    w[:, 5] = 1.0
    _, mass = icr.attention_forward(model, ids, mask, w)
    self.assertTrue(np.all(np.asarray(mass)[:, 6:] == 0))
    self.assertTrue(np.all(np.asarray(mass)[:, :6] > 0))

  def test_jit(self):
    model = _model()
    ids, seg, is_q = icr.build_prompt(TOK, QUERIES[0], DOCS[0])
    ids = jnp.asarray([ids])
    mask = jnp.ones(ids.shape, bool)
    weights = jnp.asarray([is_q], jnp.float32)
    seg = jnp.asarray([seg])

    @nnx.jit
    def doc_scores(model, ids, mask, weights, seg):
      _, mass = icr.attention_forward(model, ids, mask, weights)
      return icr.document_mass(mass, seg, 3)

    _, mass = icr.attention_forward(model, ids, mask, weights)
    eager = icr.document_mass(mass, seg, 3)
    np.testing.assert_allclose(doc_scores(model, ids, mask, weights, seg),
                               eager, rtol=1e-5, atol=1e-6)
    raw = icr.attention_scores(model, TOK, QUERIES[:1], DOCS[:1],
                               query_reduction="sum")[0]
    np.testing.assert_allclose(raw, np.asarray(eager)[0], rtol=1e-5,
                               atol=1e-6)


class ScoresTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = _model()

  def test_calibration_subtracts_content_free_mass(self):
    raw = icr.attention_scores(self.model, TOK, QUERIES, DOCS)
    free = icr.attention_scores(self.model, TOK, ["N/A"] * 2, DOCS)
    calibrated = icr.score_lists(self.model, TOK, QUERIES, DOCS,
                                 batch_size=3)
    uncalibrated = icr.score_lists(self.model, TOK, QUERIES, DOCS,
                                   calibrate=False)
    for i in range(2):
      np.testing.assert_allclose(calibrated[i], raw[i] - free[i], rtol=1e-5,
                                 atol=1e-6)
      np.testing.assert_allclose(uncalibrated[i], raw[i], rtol=1e-6)
      self.assertGreater(np.abs(free[i]).sum(), 0)  # Calibration matters.
    fmt = icr.PromptFormat(content_free_query="[none]")
    other = icr.score_lists(self.model, TOK, QUERIES, DOCS,
                            prompt_format=fmt)
    free2 = icr.attention_scores(self.model, TOK, ["[none]"] * 2, DOCS)
    np.testing.assert_allclose(other[0], raw[0] - free2[0], rtol=1e-5,
                               atol=1e-6)
    # "sum" is "mean" times the number of query tokens.
    total = icr.attention_scores(self.model, TOK, QUERIES, DOCS,
                                 query_reduction="sum")
    np.testing.assert_allclose(total[0], raw[0] * len("parse a url"),
                               rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "query_reduction"):
      icr.score_lists(self.model, TOK, QUERIES, DOCS, query_reduction="max")
    with self.assertRaisesRegex(ValueError, "are empty"):
      icr.score_lists(self.model, TOK, QUERIES, [DOCS[0], []])

  def test_copy_head_ranks_the_document_with_the_query(self):
    model = _copy_head_model()
    docs = ["moon light", "look at the zebra", "xyz quiz", "long loom"]
    for perm in ([0, 1, 2, 3], [1, 3, 0, 2], [3, 2, 1, 0]):
      shuffled = [docs[i] for i in perm]
      scores = icr.score_lists(model, TOK, ["zebra"], [shuffled])[0]
      by_doc = dict(zip(perm, scores))
      # Full match > one shared byte ('z') > no shared byte.
      self.assertGreater(by_doc[1], by_doc[2])
      self.assertGreater(by_doc[2], max(by_doc[0], by_doc[3]))
      # 'z' has 4 copies up to the query's own (itself, "zebra", "xyz",
      # "quiz"); "xyz quiz" holds 2 of them and no other query byte, so it
      # gets half of one of the 5 query tokens' mass.
      np.testing.assert_allclose(by_doc[2], 0.5 / 5, atol=1e-4)
    raw = icr.attention_scores(model, TOK, ["zebra"], [docs])[0]
    self.assertLess(abs(raw[0]), 1e-3)  # "moon light" shares no byte.

  def test_rerank_contract_and_lowrank_rerank(self):
    queries, corpus, run = testing.toy_run(
        QUERIES, DOCS, 5.0, empty=("q2", "unmatched"))
    out = icr.rerank(self.model, TOK, queries, corpus, run, k=2)
    self.assertEqual(out["q2"], {})
    self.assertEqual(set(out["q0"]), {"d0-0", "d0-1"})
    expected = icr.score_lists(self.model, TOK, [QUERIES[0]],
                               [DOCS[0][:2]])[0]
    np.testing.assert_allclose([out["q0"]["d0-0"], out["q0"]["d0-1"]],
                               expected, rtol=1e-5, atol=1e-6)
    via = ranking.rerank(icr.IcrReranker(self.model), TOK, queries, corpus,
                         run, k=2)
    for q in out:
      self.assertEqual(set(via[q]), set(out[q]))
      for d in out[q]:
        self.assertAlmostEqual(via[q][d], out[q][d], places=5)
    with self.assertRaisesRegex(ValueError, "k must be a positive int"):
      icr.rerank(self.model, TOK, queries, corpus, run, k=1.5)
    with self.assertRaisesRegex(ValueError, "not in the corpus"):
      icr.rerank(self.model, TOK, queries, {}, run, k=2)
    calibrated, raw = icr.rerank_with_and_without_calibration(
        self.model, TOK, queries, corpus, run, k=2)
    self.assertEqual(raw["q2"], {})
    plain = icr.rerank(self.model, TOK, queries, corpus, run, k=2,
                       calibrate=False)
    for q in out:
      for d in out[q]:
        self.assertAlmostEqual(calibrated[q][d], out[q][d], places=5)
        self.assertAlmostEqual(raw[q][d], plain[q][d], places=5)
    with self.assertRaisesRegex(ValueError, "not in the corpus"):
      icr.rerank_with_and_without_calibration(self.model, TOK, queries, {},
                                              run, k=2)


if __name__ == "__main__":
  absltest.main()
