"""End-to-end tests of experiments/eval_beir.py on the shared BEIR data.

The full SciFact runs of the dense and SPLADE models take minutes on two CPU
cores, so here they run on ADI (82 documents); BM25 runs on all of SciFact.
"""

import json
import os
import pathlib

from absl.testing import absltest
import pytest

from experiments import eval_beir
from lowrank import assets

_SHARED_DIR = pathlib.Path(
    os.environ.get(
        "LOWRANK_SHARED_DIR",
        pathlib.Path(__file__).resolve().parents[3] / "shared",
    )
)
_BEIR_DIR = _SHARED_DIR / "data" / "beir"


class ResolveModelTest(absltest.TestCase):

  def test_names_and_directories(self):
    self.assertEqual(eval_beir.resolve_model("bm25"), ("bm25", None))
    self.assertEqual(eval_beir.resolve_model("minilm"),
                     ("dense", assets.minilm_path()))
    self.assertEqual(eval_beir.resolve_model("splade_tiny"),
                     ("splade", assets.splade_tiny_path()))
    # A directory is classified by its config's architectures.
    self.assertEqual(eval_beir.resolve_model(str(assets.splade_tiny_path())),
                     ("splade", assets.splade_tiny_path()))
    self.assertEqual(eval_beir.resolve_model(str(assets.minilm_path()))[0],
                     "dense")
    with self.assertRaisesRegex(ValueError, "--model must be"):
      eval_beir.resolve_model("colbert")


@pytest.mark.shared_data
class EvalBeirTest(absltest.TestCase):

  def _dir(self, name: str) -> pathlib.Path:
    directory = _BEIR_DIR / name
    if not directory.is_dir():
      self.skipTest(
          f"../shared/data not present ({directory} missing; set "
          "LOWRANK_SHARED_DIR to the folder holding data/beir)"
      )
    return directory

  def test_bm25_scifact_writes_results(self):
    out = self.create_tempdir().full_path
    r = eval_beir.evaluate_beir(self._dir("scifact"), "bm25", output_dir=out)
    self.assertEqual((r["num_queries"], r["num_docs"]), (300, 5183))
    # Measured 0.6759; Pyserini BM25 flat 0.6789 (pyserini/2cr/beir.yaml).
    self.assertBetween(r["metrics"]["ndcg_cut_10"], 0.66, 0.70)
    self.assertBetween(r["metrics"]["recall_100"], 0.91, 0.95)
    with open(os.path.join(out, "results.json")) as f:
      self.assertEqual(json.load(f)["metrics"], r["metrics"])
    with open(os.path.join(out, "results.md")) as f:
      table = f.read()
    self.assertIn("nDCG@10", table)
    self.assertIn(f"{r['metrics']['ndcg_cut_10']:.4f}", table)
    for key in ("load_data_s", "index_s", "search_s", "total_s"):
      self.assertGreaterEqual(r["timing"][key], 0.0)

  def test_max_queries(self):
    r = eval_beir.evaluate_beir(self._dir("adi"), "bm25", max_queries=5, k=10)
    self.assertEqual(r["num_queries"], 5)
    self.assertEqual(r["num_docs"], 82)
    with self.assertRaisesRegex(ValueError, r"--k must be a positive "
                                r"integer; found 0"):
      eval_beir.evaluate_beir(self._dir("adi"), "bm25", k=0)

  def test_minilm_and_splade_tiny_on_adi(self):
    # Measured on ADI's 35 queries: MiniLM 0.4975, SPLADE-tiny 0.3952,
    # BM25 0.4737 nDCG@10.
    dense = eval_beir.evaluate_beir(self._dir("adi"), "minilm")
    self.assertEqual(dense["stats"]["pooling"], "mean")
    self.assertBetween(dense["metrics"]["ndcg_cut_10"], 0.46, 0.54)
    self.assertGreater(dense["metrics"]["recall_100"], 0.99)  # 82 docs.
    sparse = eval_beir.evaluate_beir(self._dir("adi"), "splade_tiny")
    self.assertBetween(sparse["metrics"]["ndcg_cut_10"], 0.36, 0.44)
    self.assertGreater(sparse["stats"]["avg_doc_terms"], 20)
    self.assertLess(sparse["stats"]["avg_query_terms"],
                    sparse["stats"]["avg_doc_terms"])


if __name__ == "__main__":
  absltest.main()
