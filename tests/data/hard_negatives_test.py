"""Tests for `lowrank.data.hard_negatives`."""

from absl.testing import absltest
from absl.testing import parameterized
import numpy as np
import pytest

from lowrank.data import beir
from lowrank import assets
from lowrank.data import hard_negatives as hn
from lowrank.models import bert
from lowrank.retrieval import bm25

from tests import testing

_WORDS = "apple banana cherry grape lemon mango olive peach pear plum".split()


def _toy(num_docs=40, num_queries=8, seed=0):
  rng = np.random.default_rng(seed)
  corpus = {
      f"d{i}": " ".join(rng.choice(_WORDS, size=6)) for i in range(num_docs)
  }
  queries = {
      f"q{i}": " ".join(rng.choice(_WORDS, size=3)) for i in range(num_queries)
  }
  qrels = {}
  for i, qid in enumerate(queries):
    docs = rng.choice(num_docs, size=3, replace=False)
    # Two positives (one with relevance 2) and one judged non-relevant.
    qrels[qid] = {f"d{docs[0]}": 1, f"d{docs[1]}": 2, f"d{docs[2]}": 0}
  return queries, corpus, qrels


def _char_encoder(texts):
  out = np.zeros((len(texts), 26), np.float32)
  for i, text in enumerate(texts):
    for ch in text:
      if "a" <= ch <= "z":
        out[i, ord(ch) - 97] += 1
  return out / np.linalg.norm(out, axis=1, keepdims=True).clip(1e-6)


class MiningTest(parameterized.TestCase):

  def test_bm25_matches_direct_ranking_without_positives(self):
    queries, corpus, qrels = _toy()
    index = bm25.BM25(corpus)
    mined = hn.mine_bm25(queries, corpus, qrels, depth=10, index=index)
    doc_ids = list(corpus)
    for qid, text in queries.items():
      scores = index.scores(text)
      order = np.lexsort((np.arange(len(doc_ids)), -scores))
      positives = {d for d, r in qrels[qid].items() if r >= 1}
      expected = [
          doc_ids[i] for i in order
          if scores[i] > 0 and doc_ids[i] not in positives
      ][:10]
      self.assertEqual(mined[qid], expected)
      self.assertEmpty(set(mined[qid]) & positives)

  def test_judged_non_relevant_stays_a_candidate(self):
    queries, corpus, qrels = _toy()
    mined = hn.mine_dense(
        queries, corpus, qrels, encode=_char_encoder, depth=len(corpus)
    )
    for qid in queries:
      zero = [d for d, r in qrels[qid].items() if r == 0]
      self.assertContainsSubset(zero, mined[qid])
      self.assertLen(mined[qid], len(corpus) - 2)
    # min_relevance=0 makes every judged document a positive.
    strict = hn.mine_dense(
        queries, corpus, qrels, encode=_char_encoder, depth=len(corpus),
        min_relevance=0,
    )
    for qid in queries:
      self.assertEmpty(set(strict[qid]) & set(qrels[qid]))

  def test_dense_matches_brute_force_and_breaks_ties_by_position(self):
    queries, corpus, qrels = _toy()
    q = _char_encoder(list(queries.values()))
    d = _char_encoder(list(corpus.values()))
    d[5] = d[3]  # A tie: d3 must come before d5.
    mined = hn.mine_dense(
        queries, corpus, qrels, query_embeddings=q, doc_embeddings=d,
        depth=7, block_size=3,
    )
    doc_ids = list(corpus)
    for row, qid in zip(q @ d.T, queries):
      order = np.lexsort((np.arange(len(doc_ids)), -row))
      positives = {x for x, r in qrels[qid].items() if r >= 1}
      expected = [doc_ids[i] for i in order if doc_ids[i] not in positives]
      self.assertEqual(mined[qid], expected[:7])
    by_encoder = hn.mine_dense(
        queries, corpus, qrels, encode=_char_encoder, depth=7
    )
    self.assertLen(by_encoder, len(queries))

  def test_identical_ids_excluded(self):
    corpus = {"a": "x y", "b": "x y", "c": "x"}
    queries = {"a": "x y"}
    qrels = {"a": {"b": 1}}
    self.assertEqual(
        hn.mine_bm25(queries, corpus, qrels, depth=5), {"a": ["c"]}
    )
    self.assertEqual(
        hn.mine_bm25(
            queries, corpus, qrels, depth=5, exclude_identical_ids=False
        ),
        {"a": ["a", "c"]},
    )

  def test_errors(self):
    queries, corpus, qrels = _toy()
    with self.assertRaisesRegex(ValueError, "no qrels entry"):
      hn.mine_bm25({"zz": "apple"}, corpus, qrels)
    with self.assertRaisesRegex(ValueError, "either encode"):
      hn.mine_dense(queries, corpus, qrels)
    with self.assertRaisesRegex(ValueError, "do not match"):
      hn.mine_dense(
          queries, corpus, qrels,
          query_embeddings=np.ones((2, 4)), doc_embeddings=np.ones((3, 4)),
      )


class SelectAndBatchTest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    self.queries, self.corpus, self.qrels = _toy(num_docs=60, num_queries=20)
    self.candidates = hn.mine_bm25(
        self.queries, self.corpus, self.qrels, depth=20
    )

  def test_select_top_and_sample(self):
    top, filled = hn.select_negatives(
        self.candidates, self.qrels, list(self.corpus), 4
    )
    self.assertEqual(filled, 0)
    for qid, negs in top.items():
      self.assertEqual(negs, self.candidates[qid][:4])
    a, _ = hn.select_negatives(
        self.candidates, self.qrels, list(self.corpus), 4, sample_from=15,
        seed=3,
    )
    b, _ = hn.select_negatives(
        dict(reversed(list(self.candidates.items()))), self.qrels,
        list(self.corpus), 4, sample_from=15, seed=3,
    )
    c, _ = hn.select_negatives(
        self.candidates, self.qrels, list(self.corpus), 4, sample_from=15,
        seed=3, epoch=1,
    )
    self.assertEqual(a, b)  # Independent of dict order.
    self.assertNotEqual(a, c)
    for qid, negs in a.items():
      self.assertLen(set(negs), 4)
      self.assertContainsSubset(negs, self.candidates[qid][:15])
      # Kept in rank order.
      ranks = [self.candidates[qid].index(n) for n in negs]
      self.assertEqual(ranks, sorted(ranks))

  def test_top_up_with_random_non_positives(self):
    short = {qid: c[:1] for qid, c in self.candidates.items()}
    negs, filled = hn.select_negatives(short, self.qrels, list(self.corpus), 5)
    self.assertEqual(filled, 4 * len(short))
    for qid, chosen in negs.items():
      self.assertEqual(chosen[0], short[qid][0])
      self.assertLen(set(chosen), 5)
      positives = {d for d, r in self.qrels[qid].items() if r >= 1}
      self.assertEmpty(set(chosen) & positives)
    with self.assertRaisesRegex(ValueError, "non-positive documents exist"):
      hn.select_negatives(
          {"q0": []}, self.qrels, list(self.corpus)[:3], 4
      )

  @parameterized.parameters(True, False)
  def test_batches(self, drop_remainder):
    kwargs = dict(batch_size=6, num_negatives=3, seed=1,
                  drop_remainder=drop_remainder)
    out = list(hn.batches(
        self.queries, self.corpus, self.qrels, self.candidates, **kwargs
    ))
    again = list(hn.batches(
        self.queries, self.corpus, self.qrels, self.candidates, **kwargs
    ))
    self.assertEqual(out, again)
    other = list(hn.batches(
        self.queries, self.corpus, self.qrels, self.candidates, epoch=1,
        **kwargs,
    ))
    self.assertNotEqual(out, other)
    pairs = []
    for batch in out:
      if drop_remainder:
        self.assertLen(batch.queries, 6)
      self.assertLen(set(batch.query_ids), len(batch.query_ids))
      self.assertLen(set(batch.positive_ids), len(batch.positive_ids))
      for qid, pos, negs, text, ptext, ntexts in zip(
          batch.query_ids, batch.positive_ids, batch.negative_ids,
          batch.queries, batch.positives, batch.negatives,
      ):
        self.assertEqual(text, self.queries[qid])
        self.assertEqual(ptext, self.corpus[pos])
        self.assertEqual(ntexts, [self.corpus[n] for n in negs])
        self.assertGreaterEqual(self.qrels[qid][pos], 1)
        self.assertLen(negs, 3)
        positives = {d for d, r in self.qrels[qid].items() if r >= 1}
        self.assertEmpty(set(negs) & positives)
        pairs.append((qid, pos))
    self.assertLen(set(pairs), len(pairs))
    if not drop_remainder:
      self.assertCountEqual(pairs, hn.training_pairs(self.qrels))

  def test_batches_need_candidates(self):
    with self.assertRaisesRegex(ValueError, "no candidates"):
      next(hn.batches(
          self.queries, self.corpus, self.qrels, {}, batch_size=2,
          num_negatives=1,
      ))


class BucketBatchesTest(parameterized.TestCase):

  def test_buckets(self):
    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 60, size=45)
    encoded = [
        (list(rng.integers(1, 100, size=n)), [1] * int(n)) for n in lengths
    ]
    seen = []
    shapes = set()
    for batch in hn.bucket_batches(
        encoded, batch_size=4, boundaries=(8, 16, 64), seed=2
    ):
      shapes.add(batch["input_ids"].shape)
      for r, i in enumerate(batch["index"]):
        if i < 0:
          self.assertEqual(batch["attention_mask"][r].sum(), 0)
          continue
        seen.append(int(i))
        ids, _ = encoded[i]
        length = batch["input_ids"].shape[1]
        self.assertEqual(length, min(b for b in (8, 16, 64) if b >= len(ids)))
        np.testing.assert_array_equal(batch["input_ids"][r, : len(ids)], ids)
        self.assertTrue((batch["input_ids"][r, len(ids):] == 0).all())
        self.assertEqual(batch["attention_mask"][r].sum(), len(ids))
        self.assertEqual(batch["token_type_ids"][r].sum(), len(ids))
    self.assertEqual(sorted(seen), list(range(len(encoded))))
    self.assertContainsSubset({b[1] for b in shapes}, {8, 16, 64})
    self.assertEqual({b[0] for b in shapes}, {4})

  def test_plain_id_lists_and_errors(self):
    batches = list(hn.bucket_batches(
        [[1, 2], [3], [4, 5, 6]], batch_size=2, boundaries=(4,),
        shuffle=False, pad_batch=False,
    ))
    np.testing.assert_array_equal(
        batches[0]["input_ids"], [[1, 2, 0, 0], [3, 0, 0, 0]]
    )
    self.assertEqual(batches[1]["input_ids"].shape, (1, 4))
    with self.assertRaisesRegex(ValueError, r"encoded\[1\] has 5 tokens"):
      list(hn.bucket_batches([[1], [1] * 5], batch_size=2, boundaries=(4,)))
    with self.assertRaisesRegex(ValueError, "increasing"):
      list(hn.bucket_batches([[1]], batch_size=2, boundaries=(8, 4)))


class MiniLMTest(absltest.TestCase):
  """Real tokenizer and model (skipped if the offline MiniLM is absent)."""

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    try:
      cls.path = assets.minilm_path()
    except FileNotFoundError as e:
      raise absltest.SkipTest(str(e))

  def test_bucket_texts_round_trip(self):
    tokenizer = bert.Tokenizer.from_pretrained(self.path)
    texts = ["short one", "a somewhat longer sentence " * 3, "x" * 3, "mid"]
    seen = {}
    for batch in hn.bucket_texts(
        tokenizer, texts, batch_size=2, boundaries=(8, 32), shuffle=False
    ):
      for r, i in enumerate(batch["index"]):
        if i >= 0:
          seen[int(i)] = tokenizer.decode(batch["input_ids"][r])
    self.assertEqual(seen, {i: t.strip().lower() for i, t in enumerate(texts)})

  def test_model_mined_negatives(self):
    model = bert.load_pretrained(self.path)
    tokenizer = bert.load_tokenizer(self.path)
    corpus = {
        "cat": "The cat sat on the mat.",
        "kitten": "A kitten is sitting on a rug.",
        "dog": "A dog sleeps on the carpet.",
        "stock": "Stock markets fell sharply today.",
        "rain": "Heavy rain is expected tomorrow.",
    }
    queries = {"q": "Where is the cat sitting?"}
    qrels = {"q": {"cat": 1}}

    def encode(texts):
      return bert.embed_texts(model, tokenizer, texts, batch_size=8)

    mined = hn.mine_dense(queries, corpus, qrels, encode=encode, depth=2)
    self.assertEqual(mined, {"q": ["kitten", "dog"]})


@pytest.mark.shared_data
class SciFactTest(absltest.TestCase):

  def test_bm25_negatives_exclude_every_positive(self):
    directory = testing.beir_dir(self, "scifact")
    data = beir.load_beir(directory, "train")
    queries = dict(list(data.queries.items())[:30])
    mined = hn.mine_bm25(queries, data.corpus, data.qrels, depth=8)
    for qid, negs in mined.items():
      self.assertLen(negs, 8)
      self.assertEmpty(set(negs) & set(data.qrels[qid]))
    batch = next(hn.batches(
        queries, data.corpus, data.qrels, mined, batch_size=8,
        num_negatives=2,
    ))
    self.assertLen(batch.negatives, 8)


if __name__ == "__main__":
  absltest.main()
