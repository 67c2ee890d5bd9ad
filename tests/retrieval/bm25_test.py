"""Tests for `lowrank.retrieval.bm25`."""

import collections
import math

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest

from lowrank.data import beir
from lowrank.retrieval import bm25
from lowrank.retrieval import metrics
from tests import testing

# Porter (1980) examples (the paper's own), plus words checked against
# NLTK's PorterStemmer(mode=MARTIN_EXTENSIONS), i.e. Porter's reference
# implementation, which also agreed on all 30,557 distinct words of SciFact.
PORTER = {
    "caresses": "caress", "ponies": "poni", "ties": "ti", "caress": "caress",
    "cats": "cat", "feed": "feed", "agreed": "agre", "plastered": "plaster",
    "bled": "bled", "motoring": "motor", "sing": "sing",
    "conflated": "conflat", "troubled": "troubl", "sized": "size",
    "hopping": "hop", "tanned": "tan", "falling": "fall", "hissing": "hiss",
    "fizzed": "fizz", "failing": "fail", "filing": "file", "happy": "happi",
    "sky": "sky", "relational": "relat", "conditional": "condit",
    "rational": "ration", "valenci": "valenc", "hesitanci": "hesit",
    "digitizer": "digit", "conformabli": "conform", "radicalli": "radic",
    "differentli": "differ", "vileli": "vile", "analogousli": "analog",
    "vietnamization": "vietnam", "predication": "predic",
    "operator": "oper", "feudalism": "feudal", "decisiveness": "decis",
    "hopefulness": "hope", "callousness": "callous", "formaliti": "formal",
    "sensitiviti": "sensit", "sensibiliti": "sensibl",
    "triplicate": "triplic", "formative": "form", "formalize": "formal",
    "electriciti": "electr", "electrical": "electr", "hopeful": "hope",
    "goodness": "good", "revival": "reviv", "allowance": "allow",
    "inference": "infer", "airliner": "airlin", "gyroscopic": "gyroscop",
    "adjustable": "adjust", "defensible": "defens", "irritant": "irrit",
    "replacement": "replac", "adjustment": "adjust", "dependent": "depend",
    "adoption": "adopt", "homologou": "homolog", "communism": "commun",
    "activate": "activ", "angulariti": "angular", "homologous": "homolog",
    "effective": "effect", "bowdlerize": "bowdler", "probate": "probat",
    "rate": "rate", "cease": "ceas", "controll": "control", "roll": "roll",
    "generalizations": "gener", "oscillators": "oscil",
    # Reference-implementation departures (bli -> ble, logi -> log).
    "biology": "biologi", "archaeology": "archaeolog", "visibli": "visibl",
    # Short words are left alone; y after a vowel is a consonant.
    "as": "as", "is": "is", "aging": "ag", "played": "plai", "toy": "toi",
}

TOY_CORPUS = {
    "d0": "The cat sat on the mat.",
    "d1": "Dogs and cats are pets; the dog's bowl is empty.",
    "d2": "A long document about cats, cats, more cats and the mat of a cat "
          "lover who sat there",
    "d3": "Stock markets closed higher.",
    "d4": "",
}


class PorterTest(parameterized.TestCase):

  def test_porter_examples(self):
    wrong = {w: bm25.porter_stem(w) for w, s in PORTER.items()
             if bm25.porter_stem(w) != s}
    self.assertEmpty(wrong)


class AnalyzerTest(absltest.TestCase):

  def test_lucene_like_pipeline(self):
    analyzer = bm25.Analyzer()
    self.assertEqual(
        analyzer("The Dog's bowls AREN'T in THE kitchen, 3.14 e_mail!"),
        ["dog", "bowl", "aren't", "kitchen", "3", "14", "e_mail"])
    self.assertEqual(bm25.Analyzer(stem=False, stopwords=())("The cats"),
                     ["the", "cats"])
    self.assertLen(bm25.LUCENE_ENGLISH_STOPWORDS, 33)


def _direct_bm25(corpus, query, k1, b):
  """BM25 from the textbook formula, independent of the index code."""
  analyzer = bm25.Analyzer()
  docs = [analyzer(t) for t in corpus.values()]
  n = len(docs)
  avgdl = sum(map(len, docs)) / n
  df = collections.Counter(t for d in docs for t in set(d))
  scores = []
  for d in docs:
    tf = collections.Counter(d)
    s = 0.0
    for t, qtf in collections.Counter(analyzer(query)).items():
      if not tf[t]:
        continue
      idf = math.log(1 + (n - df[t] + 0.5) / (df[t] + 0.5))
      s += qtf * idf * tf[t] / (tf[t] + k1 * (1 - b + b * len(d) / avgdl))
    scores.append(s)
  return np.array(scores)


class BM25Test(parameterized.TestCase):

  @parameterized.parameters((0.9, 0.4), (1.2, 0.75), (0.0, 0.0), (2.0, 1.0))
  def test_scores_match_direct_formula(self, k1, b):
    index = bm25.BM25(TOY_CORPUS, k1=k1, b=b)
    for query in ("cat mat", "cats cats sat", "dog pets", "unknown words",
                  "the stock"):
      expected = _direct_bm25(TOY_CORPUS, query, k1, b)
      np.testing.assert_allclose(index.scores(query), expected, rtol=1e-6,
                                 atol=1e-12)
      results = index.search(query, k=10)
      matched = np.flatnonzero(expected > 0)
      order = matched[np.lexsort((matched, -expected[matched]))]
      self.assertEqual([d for d, _ in results],
                       [index.doc_ids[i] for i in order])
      np.testing.assert_allclose([s for _, s in results], expected[order],
                                 rtol=1e-6)

  def test_statistics(self):
    index = bm25.BM25(TOY_CORPUS)
    np.testing.assert_array_equal(index.doc_lengths, [3, 6, 12, 4, 0])
    self.assertAlmostEqual(index.avgdl, 25 / 5)
    cat = index.vocab["cat"]
    self.assertEqual(index.df[cat], 3)
    self.assertAlmostEqual(index.idf[cat], math.log(1 + 2.5 / 3.5))
    # A repeated query term counts twice (Pyserini's bag-of-words query).
    terms, weights = index.query_vector("cat cats mat")
    self.assertEqual(dict(zip(terms.tolist(), weights.tolist()))[cat],
                     2 * index.idf[cat])
    self.assertEqual(index.search("zebra"), [])
    with self.assertRaisesRegex(ValueError, "non-empty"):
      bm25.BM25({})
    with self.assertRaisesRegex(ValueError, "k1 >= 0"):
      bm25.BM25(TOY_CORPUS, b=1.5)

  def test_mine_hard_negatives(self):
    index = bm25.BM25(TOY_CORPUS)
    queries = {"q1": "cat mat sat", "d3": "stock cats", "q3": "zebra"}
    positives = {"q1": {"d2"}, "d3": [], "q3": ()}
    negatives = bm25.mine_hard_negatives(index, queries, positives, k=10, n=2)
    # q1's BM25 order is d2, d0, d1: the positive d2 is skipped.
    self.assertEqual(negatives["q1"], ["d0", "d1"])
    # The document with the query's own id is skipped too.
    self.assertNotIn("d3", negatives["d3"])
    self.assertEqual(negatives["q3"], [])
    kept = bm25.mine_hard_negatives(index, {"d3": "stock"}, {"d3": []},
                                    k=5, n=1, exclude_identical_ids=False)
    self.assertEqual(kept["d3"], ["d3"])
    with self.assertRaisesRegex(ValueError, "no positives entry"):
      bm25.mine_hard_negatives(index, queries, {"q1": {"d2"}})
    with self.assertRaisesRegex(ValueError, "1 <= n <= k"):
      bm25.mine_hard_negatives(index, queries, positives, k=1, n=2)


@pytest.mark.shared_data
class BM25SciFactTest(absltest.TestCase):

  def test_scifact_ndcg(self):
    directory = testing.beir_dir(self, "scifact")
    dataset = beir.load_beir(directory, "test")
    index = bm25.BM25(dataset.corpus)
    scores = metrics.evaluate(
        dataset.qrels, index.search_run(dataset.queries, 1000),
        ("ndcg_cut_10", "recall_100"))
    # Measured 0.6759 / 0.9287; Pyserini's BM25 flat (Lucene analyzer):
    # 0.6789 / 0.9253 (Pyserini's pyserini/2cr/beir.yaml).
    self.assertBetween(scores["ndcg_cut_10"], 0.66, 0.70)
    self.assertBetween(scores["recall_100"], 0.91, 0.95)


if __name__ == "__main__":
  absltest.main()
