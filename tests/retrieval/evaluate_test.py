"""Tests of lowrank.retrieval.evaluate on a tiny random BERT."""

import types

from absl.testing import absltest
from flax import nnx
import jax
import numpy as np

from lowrank import assets
from lowrank import sharding
from lowrank.models import bert
from lowrank.retrieval import biencoder
from lowrank.retrieval import bm25
from lowrank.retrieval import colbert
from lowrank.retrieval import evaluate
from lowrank.retrieval import metrics
from lowrank.retrieval import muvera
from lowrank.retrieval import search
from tests import testing

_WORDS = ("iron", "copper", "zinc", "gold", "tin", "lead", "wire", "coin")


def _dataset(num_docs=12, num_queries=6):
  corpus = {f"d{i}": f"{_WORDS[i % 8]} {_WORDS[(3 * i) % 8]} note {i}"
            for i in range(num_docs)}
  queries = {f"q{i}": f"{_WORDS[i % 8]} {_WORDS[(3 * i) % 8]}"
             for i in range(num_queries)}
  qrels = {f"q{i}": {f"d{i}": 1} for i in range(num_queries)}
  return types.SimpleNamespace(corpus=corpus, queries=queries, qrels=qrels)


def _encoder(**config):
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  with sharding.use_mesh(mesh):
    return bert.BertModel(testing.tiny_bert_config(**config),
                          rngs=nnx.Rngs(0))


class EvaluateTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.tokenizer = bert.load_tokenizer(assets.minilm_path())
    cls.data = _dataset()

  def test_dense_prefix_is_truncate_and_renormalise(self):
    model = biencoder.BiEncoder(_encoder())
    out, info = evaluate.dense(model, self.tokenizer, self.data, k=10,
                               prefix_dims=(32, 8), query_max_length=8)
    self.assertEqual(info["dim"], 32)
    self.assertEqual(out["ndcg_cut_10@32"], out["ndcg_cut_10"])
    self.assertEqual(list(evaluate.prefix_curve(out)), [8, 32])
    qids, dids = sorted(self.data.qrels), sorted(self.data.corpus)
    q = biencoder.embed_queries(model, self.tokenizer,
                                [self.data.queries[i] for i in qids],
                                max_length=8)
    d = biencoder.embed_documents(model, self.tokenizer,
                                  [self.data.corpus[i] for i in dids])
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)
    expected = metrics.evaluate(
        self.data.qrels, search.search_run(
            qids, norm(q[:, :8]), dids, norm(d[:, :8]), 10),
        evaluate.PREFIX_METRICS)
    for name, value in expected.items():
      self.assertAlmostEqual(out[f"{name}@8"], value, places=6)

  def test_bm25_is_the_index_s_run(self):
    out, info = evaluate.bm25(self.data, k=5)
    index = bm25.BM25(self.data.corpus)
    self.assertEqual(out, metrics.evaluate(
        self.data.qrels, index.search_run(self.data.queries, 5),
        evaluate.METRICS))
    self.assertEqual(info["postings"], index.index.nnz)
    self.assertGreaterEqual(info["index_s"], 0.0)

  def test_checkpoint_kind_of_the_bundled_models(self):
    self.assertEqual(evaluate.checkpoint_kind(assets.minilm_path()),
                     ("dense", "mean"))
    self.assertEqual(evaluate.checkpoint_kind(assets.splade_tiny_path()),
                     ("splade", None))

  def test_checkpoint_kind_reads_the_pooling_config(self):
    root = self.create_tempdir()
    root.create_file("config.json", content='{"architectures": ["BertModel"]}')
    pooling = root.create_file("1_Pooling/config.json",
                               content='{"pooling_mode_cls_token": true}')
    self.assertEqual(evaluate.checkpoint_kind(root.full_path), ("dense", "cls"))
    pooling.write_text('{"pooling_mode_mean_tokens": false}')
    with self.assertRaisesRegex(ValueError, "unsupported pooling mode"):
      evaluate.checkpoint_kind(root.full_path)

  def test_checkpoint_kind_without_config(self):
    with self.assertRaisesRegex(FileNotFoundError, "holds no config.json"):
      evaluate.checkpoint_kind(self.create_tempdir().full_path)

  def test_check_depth_shallower_than_a_cutoff(self):
    with self.assertRaisesRegex(
        ValueError, r"config\.eval_k=20 retrieves fewer results than the "
        r"metrics read .* Set config\.eval_k to at least 100\."):
      evaluate.check_depth(20, evaluate.METRICS, 300, name="config.eval_k")

  def test_check_depth_of_a_small_corpus(self):
    # A corpus no larger than k is retrieved whole: Recall@100 is exact.
    evaluate.check_depth(48, evaluate.METRICS, 48)

  def test_plot_prefix_curves(self):
    path = self.create_tempfile("curve.png").full_path
    final = {"ndcg_cut_10@8": 0.5, "ndcg_cut_10@32": 0.7, "recall_100@8": 0.8,
             "recall_100@32": 0.9, "recall_10": 0.6}
    self.assertEqual(evaluate.plot_prefix_curves(
        [("zero-shot", {k: v / 2 for k, v in final.items()}, "k--"),
         ("final", final, "-")], path, title="curve"), path)
    with open(path, "rb") as f:
      self.assertEqual(f.read(8), b"\x89PNG\r\n\x1a\n")

  def test_plot_prefix_curves_without_prefix_metrics(self):
    with self.assertRaisesRegex(ValueError, "No curve has prefix metrics"):
      evaluate.plot_prefix_curves([("final", {"ndcg_cut_10": 0.5}, "-")],
                                  self.create_tempfile().full_path)

  def test_dense_prefix_wider_than_the_embedding(self):
    model = biencoder.BiEncoder(_encoder())
    with self.assertRaisesRegex(ValueError, r"Prefix sizes \[64\] exceed "
                                r"the embedding size 32"):
      evaluate.dense(model, self.tokenizer, self.data, prefix_dims=(64, 8))

  def test_empty_test_set(self):
    model = biencoder.BiEncoder(_encoder())
    empty = types.SimpleNamespace(corpus=self.data.corpus, queries={},
                                  qrels={})
    with self.assertRaisesRegex(ValueError, "at least one judged query and "
                                "one document; got 0 judged queries"):
      evaluate.dense(model, self.tokenizer, empty)

  def test_judged_query_without_text(self):
    model = biencoder.BiEncoder(_encoder())
    missing = _dataset()
    del missing.queries["q0"]
    with self.assertRaisesRegex(ValueError, "1 judged queries have no text "
                                r"\(e.g. 'q0'\)"):
      evaluate.dense(model, self.tokenizer, missing)

  def test_late_interaction_muvera_reranking_everything_is_exact(self):
    model = colbert.ColBERT(_encoder(), self.tokenizer, dim=16,
                            query_maxlen=8, doc_maxlen=12)
    fde = muvera.FDEConfig(dimension=16, num_repetitions=2,
                           num_simhash_projections=2)
    out, info = evaluate.late_interaction(model, self.data, k=5, fde=fde,
                                          rerank=12)
    self.assertEqual((info["muvera_rerank"], info["fde_dim"]), (12, 2 * 4 * 16))
    self.assertEqual(info["muvera_overlap_with_exact"], 1.0)
    for name in evaluate.METRICS:
      self.assertBetween(out[name], 0.0, 1.0)
      self.assertAlmostEqual(out["muvera_" + name], out[name], places=6)
      self.assertIn("fde_" + name, out)

  def test_sparse(self):
    model = _encoder(add_mlm_head=True)
    out, info = evaluate.sparse(model, self.tokenizer, self.data,
                                query_max_length=8, doc_max_length=12)
    self.assertEqual(sorted(out), sorted(evaluate.METRICS))
    self.assertBetween(info["avg_query_terms"], 1.0, 30522.0)
    self.assertGreater(info["postings"], 0)
    with self.assertRaisesRegex(ValueError, "no MLM head"):
      evaluate.sparse(_encoder(), self.tokenizer, self.data)

  def test_local_copy_is_replicated_with_equal_values(self):
    model = _encoder()
    copy, mesh = evaluate.local_copy(model, jax.local_devices()[:2])
    self.assertEqual(mesh.devices.size, 2)
    for a, b in zip(jax.tree.leaves(nnx.state(model, nnx.Param)),
                    jax.tree.leaves(nnx.state(copy, nnx.Param))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
      self.assertTrue(b.sharding.is_fully_replicated)
      self.assertLen(b.sharding.device_set, 2)


if __name__ == "__main__":
  absltest.main()
