"""Tests for `lowrank.ranking.first` (FIRST listwise reranking, tiny LLaMA)."""

import itertools

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tokenizers
from tokenizers import models as tok_models
from tokenizers import pre_tokenizers

from lowrank import ranking
from lowrank import train
from lowrank.models import llama
from lowrank.ranking import decoder_text
from lowrank.ranking import first
from lowrank.ranking import losses as ltr_losses
from tests import testing

TOK = decoder_text.ByteTokenizer()
QUERIES = ["parse a url into parts", "open a file for reading",
           "sort numbers"]
DOCS = [
    ["def urlparse(url): return split(url)", "def add(a, b): return a + b",
     "def read(path): return open(path).read()", "x = 1", "def noop(): pass"],
    ["def open_file(p): return open(p)", "def mean(xs): return sum(xs)"],
    ["def sort(xs): return sorted(xs)", "class A: pass", "y = [3, 1]",
     "def f(): return 0"],
]


def _reference_rank(model, query, docs, window, stride):
  """Sliding windows one list at a time with `window_scores` (no batching)."""
  order = list(range(len(docs)))
  for start, end in first.sliding_windows(len(docs), window, stride):
    current = order[start:end]
    s = first.window_scores(model, TOK, [query],
                            [[docs[i] for i in current]])[0]
    order[start:end] = [current[p] for p in np.argsort(-s, kind="stable")]
  return order


class WindowsTest(absltest.TestCase):

  def test_sliding_windows_back_to_front(self):
    self.assertEqual(first.sliding_windows(25, 20, 10), [(5, 25), (0, 15)])
    self.assertEqual(first.sliding_windows(45, 20, 10),
                     [(25, 45), (15, 35), (5, 25), (0, 15)])
    self.assertEqual(first.sliding_windows(20, 20, 10), [(0, 20)])
    self.assertEqual(first.sliding_windows(3, 20, 10), [(0, 3)])
    self.assertEqual(first.sliding_windows(0, 20, 10), [])
    self.assertEqual(first.sliding_windows(5, 2, 2),
                     [(3, 5), (1, 3), (0, 1)])
    # Every candidate is in some window, and windows overlap by w - s.
    for n, w, s in itertools.product([1, 7, 20, 31], [1, 4, 20], [1, 3, 4]):
      if s > w:
        continue
      wins = first.sliding_windows(n, w, s)
      covered = set().union(*[range(a, b) for a, b in wins]) if wins else set()
      self.assertEqual(covered, set(range(n)))
      self.assertEqual(wins[-1][0] if wins else 0, 0)

  def test_sliding_window_orders_with_a_value_scorer(self):
    rng = np.random.default_rng(0)
    values = [rng.permutation(n).astype(float) for n in (20, 7, 3)]
    calls = []

    def by_value(jobs):
      calls.append(len(jobs))
      out = np.full((len(jobs), 5), -np.inf)
      for row, (i, members) in enumerate(jobs):
        out[row, :len(members)] = values[i][members]
      return out

    orders = first.sliding_window_orders([20, 7, 3], 5, 2, by_value)
    # One scorer call per step, holding every list that has a window left.
    self.assertEqual(calls, [3, 2, 1, 1, 1, 1, 1, 1, 1])
    for v, order in zip(values, orders):
      self.assertEqual(sorted(order), list(range(len(v))))
      self.assertEqual(order[0], int(np.argmax(v)))  # The best bubbles up.
    self.assertEqual(orders[2], list(np.argsort(-values[2])))  # One window.
    # 20 candidates, window 10, stride 5: (10, 20), (5, 15), (0, 10). The
    # first stage's top 5 is only touched by the last window, so it stays
    # in the top 10 whatever the scores.
    noise = lambda jobs: rng.normal(size=(len(jobs), 10))
    for _ in range(5):
      order = first.sliding_window_orders([20], 10, 5, noise)[0]
      self.assertContainsSubset(set(range(5)), set(order[:10]))
    np.testing.assert_array_equal(first.order_scores([2, 0, 1]), [2, 1, 3])

  def test_bad_stride_or_window(self):
    with self.assertRaisesRegex(ValueError, "stride must be in"):
      first.sliding_windows(30, 20, 0)  # RankLLM's stride-0 hang.
    with self.assertRaisesRegex(ValueError, "stride must be in"):
      first.sliding_windows(30, 5, 6)
    with self.assertRaisesRegex(ValueError, "window must be >= 1"):
      first.sliding_windows(30, 0, 1)
    with self.assertRaisesRegex(ValueError, "stride must be in"):
      first.FirstReranker(testing.tiny_llama_lm(), window=20, stride=0)


class PromptTest(absltest.TestCase):

  def test_prompt_and_target_text(self):
    ids = first.build_prompt(TOK, "find x", ["doc one", "doc two"])
    self.assertEqual(
        TOK.decode(ids),
        "Rank the 2 passages by relevance to the query.\nQuery: find x\n"
        "[A] doc one\n[B] doc two\nQuery: find x\nRanking: ")
    self.assertEqual(TOK.decode(first.target_ids(TOK, [1, 0, 2])),
                     "B > A > C\n")

  def test_truncation_and_too_many_candidates(self):
    fmt = first.PromptFormat(max_doc_tokens=3, max_query_tokens=2)
    text = TOK.decode(first.build_prompt(TOK, "query", ["abcdef"], fmt))
    self.assertIn("Query: qu\n[A] abc\n", text)
    with self.assertRaisesRegex(ValueError, "1 to 26 candidates"):
      first.build_prompt(TOK, "q", ["d"] * 27)
    with self.assertRaisesRegex(ValueError, "1 to 26 candidates"):
      first.build_prompt(TOK, "q", [])

  def test_identifiers_must_be_single_tokens(self):
    fmt = first.PromptFormat(identifiers=("A", "BB"))
    with self.assertRaisesRegex(ValueError,
                                "'BB' must be exactly one token.*2 tokens"):
      first.build_prompt(TOK, "q", ["d"], fmt)
    fmt = first.PromptFormat(identifiers=("A", "A"))
    with self.assertRaisesRegex(ValueError, "same token id"):
      first.build_prompt(TOK, "q", ["d"], fmt)
    # A word-level Hugging Face tokenizer: only in-vocabulary words are one
    # token; the Encoding's ids are used.
    vocab = {"[UNK]": 0, "A": 1, "B": 2, "q": 3, "d": 4}
    hf = tokenizers.Tokenizer(tok_models.WordLevel(vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.Whitespace()
    self.assertEqual(decoder_text.single_token_ids(hf, ["A", "B"]), [1, 2])
    with self.assertRaisesRegex(ValueError, "'A B' must be exactly one"):
      decoder_text.single_token_ids(hf, ["A B"])

  def test_parse_permutation_repairs(self):
    ident = decoder_text.single_token_ids(TOK, "ABCD")
    out = TOK.encode("C > A > C > Z > x")
    self.assertEqual(first.parse_permutation(out, ident, 4), [2, 0, 1, 3])
    self.assertEqual(first.parse_permutation(TOK.encode("D"), ident, 3),
                     [0, 1, 2])


class ScoringTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    cls.model = testing.tiny_llama_lm()

  def test_single_pass_ranking_is_argsort_of_first_token_logits(self):
    scores = first.window_scores(self.model, TOK, QUERIES, DOCS,
                                 batch_size=2)
    ranked = first.rank_lists(self.model, TOK, QUERIES, DOCS, window=20,
                              stride=10, batch_size=2)
    # Independent path: llama.generate (left padding, KV cache), first step.
    ident = decoder_text.single_token_ids(TOK, first.IDENTIFIERS)
    prompts = [first.build_prompt(TOK, q, d) for q, d in zip(QUERIES, DOCS)]
    ids, mask = decoder_text.pad_left(prompts, max(map(len, prompts)))
    _, logits = llama.generate(self.model, ids, 1, attention_mask=mask,
                               return_logits=True)
    for i, docs in enumerate(DOCS):
      ref = np.asarray(logits)[i, 0, ident[:len(docs)]]
      np.testing.assert_allclose(scores[i], ref, rtol=1e-4, atol=1e-4)
      order = np.argsort(-ref, kind="stable")
      np.testing.assert_array_equal(np.argsort(-ranked[i], kind="stable"),
                                    order)
      # Scores are n - rank.
      self.assertEqual(sorted(ranked[i].tolist()),
                       list(range(1, len(docs) + 1)))

  def test_batched_sliding_windows_match_one_list_at_a_time(self):
    for window, stride in [(2, 1), (3, 2), (3, 3)]:
      ranked = first.rank_lists(self.model, TOK, QUERIES, DOCS,
                                window=window, stride=stride, batch_size=3)
      for i, (q, docs) in enumerate(zip(QUERIES, DOCS)):
        ref = _reference_rank(self.model, q, docs, window, stride)
        self.assertEqual(list(np.argsort(-ranked[i], kind="stable")), ref)

  def test_rerank_contract_and_lowrank_rerank(self):
    queries, corpus, run = testing.toy_run(
        QUERIES, DOCS, 10.0, empty=("q3", "nothing retrieved"))
    out = first.rerank(self.model, TOK, queries, corpus, run, k=4, window=3,
                       stride=2)
    self.assertEqual(out["q3"], {})
    self.assertEqual(set(out["q0"]), {"d0-0", "d0-1", "d0-2", "d0-3"})
    self.assertLen(out["q1"], 2)
    scorer = first.FirstReranker(self.model, window=3, stride=2)
    via_rerank = ranking.rerank(scorer, TOK, queries, corpus, run, k=4)
    self.assertEqual(via_rerank, out)
    with self.assertRaisesRegex(ValueError, "k must be a positive int"):
      first.rerank(self.model, TOK, queries, corpus, run, k=0)
    with self.assertRaisesRegex(ValueError, "not in queries"):
      first.rerank(self.model, TOK, {}, corpus, run, k=2)
    with self.assertRaisesRegex(ValueError, "not in the corpus"):
      first.rerank(self.model, TOK, queries, {}, run, k=2)
    with self.assertRaisesRegex(ValueError, "exceeds the number of"):
      first.rerank(self.model, TOK, queries, corpus, run, k=2, window=27,
                   stride=1)


class LossTest(absltest.TestCase):

  def test_first_rank_net_direct_formula_and_padding(self):
    first_rank_net = ltr_losses.first_rank_net
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(3, 5)).astype(np.float32)
    ranks = np.stack([rng.permutation(5) + 1 for _ in range(3)])
    where = np.ones((3, 5), bool)
    where[2, 3:] = False
    expected = []
    for b in range(3):
      terms = []
      for i, j in itertools.product(range(5), range(5)):
        if where[b, i] and where[b, j] and ranks[b, i] < ranks[b, j]:
          terms.append(np.log1p(np.exp(-(scores[b, i] - scores[b, j])))
                       / (ranks[b, i] + ranks[b, j]))
      expected.append(np.mean(terms))
    got = first_rank_net(scores, ranks, where=jnp.asarray(where))
    np.testing.assert_allclose(got, np.mean(expected), rtol=1e-5)
    # Padded entries may hold anything; their gradient is exactly 0.
    garbage = scores.copy()
    garbage[2, 3:] = np.nan
    grad = jax.grad(lambda s: first_rank_net(
        s, ranks, where=jnp.asarray(where)))(jnp.asarray(garbage))
    np.testing.assert_allclose(
        first_rank_net(garbage, ranks, where=jnp.asarray(where)),
        got, rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(grad)[2, 3:], 0.0)
    self.assertTrue(np.all(np.isfinite(grad)))
    # The top pair costs more than the same margin lower down.
    top = first_rank_net(jnp.array([[0.0, 0.0, 5.0, 0.0]]),
                         jnp.array([[1, 2, 3, 4]]))
    low = first_rank_net(jnp.array([[5.0, 0.0, 0.0, 0.0]]),
                         jnp.array([[1, 2, 3, 4]]))
    self.assertGreater(float(top), float(low))
    with self.assertRaisesRegex(ValueError,
                                "Unknown loss 'hinge'; options:.*first_rank"):
      ranking.losses.get("hinge", first.LTR_LOSSES)

  def test_training_learns_target_and_decoding_agrees(self):
    model = testing.tiny_llama_lm(seed=1)
    ident = decoder_text.single_token_ids(TOK, first.IDENTIFIERS[:4])
    docs = DOCS[2]
    example = first.make_example(TOK, QUERIES[2], docs, [0, 0, 1, 0],
                                 order=[2, 0, 3, 1])
    self.assertEqual(example.ranks, [2, 4, 1, 3])
    self.assertEqual(TOK.decode(example.target), "C > A > D > B\n")
    batch = first.collate([example], window=4, length=256, rows=2)
    self.assertEqual(
        TOK.decode(batch["ids"][0][batch["target_mask"][0]]),
        "C > A > D > B\n")
    self.assertEqual(batch["first_pos"][0], len(example.prompt) - 1)
    self.assertFalse(batch["where"][1].any())
    for name in ("lambda_loss", "list_mle", "softmax_ce"):
      loss, aux = first.loss_fn(model, batch, ident, ltr_loss=name)
      self.assertTrue(np.isfinite(float(loss)), name)
      self.assertGreater(float(aux["ltr_loss"]), 0.0)

    graphdef, params, rest = train.split(model)
    tx = optax.adam(1e-2)
    opt_state = train.init_opt_state(tx, params)
    step = train.make_train_step(
        graphdef,
        lambda m, b: first.loss_fn(m, b, ident, ltr_weight=2.0), tx)
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    losses = []
    for _ in range(60):
      params, opt_state, metrics = step(params, opt_state, rest, batch)
      losses.append(float(metrics["loss"]))
    self.assertLess(losses[-1], 0.05 * losses[0])
    model = nnx.merge(graphdef, params, rest)
    scores = first.window_scores(model, TOK, [QUERIES[2]], [docs])[0]
    self.assertEqual(list(np.argsort(-scores)), [2, 0, 3, 1])
    perms = first.generate_permutations(model, TOK, [QUERIES[2]], [docs],
                                        batch_size=1)
    self.assertEqual(perms, [[2, 0, 3, 1]])


if __name__ == "__main__":
  absltest.main()
