"""BM25 over an inverted index, with a Lucene-like English analyzer.

Scoring is Lucene's `BM25Similarity` (Lucene >= 8, as used by Pyserini /
Anserini), with the Pyserini defaults `k1 = 0.9`, `b = 0.4`:

    score(q, d) = sum_{t in q} qtf_t * idf_t * tf_td / (tf_td + k1 * (1 - b
                  + b * |d| / avgdl))
    idf_t       = log(1 + (N - df_t + 0.5) / (df_t + 0.5))

(Robertson and Zaragoza 2009, "The Probabilistic Relevance Framework: BM25
and Beyond", https://doi.org/10.1561/1500000019). Lucene 8 dropped the
constant `(k1 + 1)` numerator factor, which does not change rankings; a
query term repeated `qtf` times counts `qtf` times (Pyserini's bag-of-words
query). `|d|` is the number of analyzed tokens of `d` (stopwords removed)
and `avgdl` their mean over the corpus. Documents are stored as sparse
vectors of their saturated term frequencies and queries as `qtf * idf`, so
search is `sparse_index.search` (postings only).

The analyzer approximates Lucene's `EnglishAnalyzer` (Pyserini's default
for English): lowercase, word tokens, possessive `'s` removed, Lucene's 33
English stopwords, Porter stemming (`porter_stem`: M. F. Porter 1980, "An
algorithm for suffix stripping", with the two departures of Porter's own
reference implementation that Lucene's `PorterStemmer` also has: `bli ->
ble` for `abli -> able` and `logi -> log` in step 2; it agrees with NLTK's
`PorterStemmer(mode=MARTIN_EXTENSIONS)` on all 30,557 distinct words of
BEIR SciFact). Known differences from Lucene:

- Tokens are `\\w+` runs (apostrophes inside a word kept), not Unicode
  UAX#29 segments: Lucene keeps `3.14`, `1,000` and `U.S.` as one token,
  here they split on the punctuation; Lucene's 255-character token limit is
  not applied.
- Lucene stores document lengths in one byte (`SmallFloat.intToByte4`), so
  its `|d|` is quantized for long documents; here it is exact. Scores differ
  in the low digits and a few rankings swap.
"""

from collections.abc import Collection, Iterable, Mapping, Sequence
import functools
import re

import numpy as np

from lowrank.retrieval import metrics
from lowrank.retrieval import sparse_index

# Lucene's EnglishAnalyzer.ENGLISH_STOP_WORDS_SET (also Pyserini's default).
LUCENE_ENGLISH_STOPWORDS = frozenset((
    "a", "an", "and", "are", "as", "at", "be", "but", "by", "for", "if",
    "in", "into", "is", "it", "no", "not", "of", "on", "or", "such", "that",
    "the", "their", "then", "there", "these", "they", "this", "to", "was",
    "will", "with",
))

_TOKEN_RE = re.compile(r"\w+(?:['\u2019]\w+)*")
_POSSESSIVE = ("'s", "\u2019s")


# ----------------------------------------------------------------------------
# Porter stemmer.

_VOWELS = frozenset("aeiou")


def _consonants(word: str) -> list[bool]:
  """Porter's consonant flags: not a vowel, and `y` after a vowel or first."""
  flags: list[bool] = []
  for i, ch in enumerate(word):
    if ch in _VOWELS:
      flags.append(False)
    elif ch == "y":
      flags.append(i == 0 or not flags[i - 1])
    else:
      flags.append(True)
  return flags


def _measure(stem: str) -> int:
  """`m` in `[C](VC)^m[V]`: the number of vowel-consonant sequences."""
  m, prev_vowel = 0, False
  for is_cons in _consonants(stem):
    if is_cons and prev_vowel:
      m += 1
    prev_vowel = not is_cons
  return m


def _has_vowel(stem: str) -> bool:
  return not all(_consonants(stem))


def _double_consonant(word: str) -> bool:
  return (
      len(word) >= 2 and word[-1] == word[-2] and _consonants(word)[-1]
  )


def _cvc(word: str) -> bool:
  """Ends consonant-vowel-consonant, the last not `w`, `x` or `y`."""
  if len(word) < 3:
    return False
  flags = _consonants(word)
  return flags[-1] and not flags[-2] and flags[-3] and word[-1] not in "wxy"


# Step 2 and 3 rules, (suffix, replacement), tried in this order; the first
# suffix the word ends with decides (it is replaced only if m(stem) > 0).
_STEP2 = (
    ("ational", "ate"), ("tional", "tion"), ("enci", "ence"),
    ("anci", "ance"), ("izer", "ize"), ("bli", "ble"), ("alli", "al"),
    ("entli", "ent"), ("eli", "e"), ("ousli", "ous"), ("ization", "ize"),
    ("ation", "ate"), ("ator", "ate"), ("alism", "al"), ("iveness", "ive"),
    ("fulness", "ful"), ("ousness", "ous"), ("aliti", "al"),
    ("iviti", "ive"), ("biliti", "ble"), ("logi", "log"),
)
_STEP3 = (
    ("icate", "ic"), ("ative", ""), ("alize", "al"), ("iciti", "ic"),
    ("ical", "ic"), ("ful", ""), ("ness", ""),
)
# Step 4: suffixes removed when m(stem) > 1 (`ion` only after `s` or `t`).
_STEP4 = (
    "al", "ance", "ence", "er", "ic", "able", "ible", "ant", "ement", "ment",
    "ent", "ion", "ou", "ism", "ate", "iti", "ous", "ive", "ize",
)


def _replace_first(
    word: str, rules: Sequence[tuple[str, str]]
) -> str:
  for suffix, replacement in rules:
    if word.endswith(suffix):
      stem = word[: -len(suffix)]
      return stem + replacement if _measure(stem) > 0 else word
  return word


def _step1ab(w: str) -> str:
  if w.endswith("s"):
    if w.endswith("sses"):
      w = w[:-2]
    elif w.endswith("ies"):
      w = w[:-2]
    elif not w.endswith("ss"):
      w = w[:-1]
  if w.endswith("eed"):
    if _measure(w[:-3]) > 0:
      w = w[:-1]
    return w
  for suffix in ("ed", "ing"):
    if w.endswith(suffix) and _has_vowel(w[: -len(suffix)]):
      w = w[: -len(suffix)]
      if w.endswith(("at", "bl", "iz")):
        return w + "e"
      if _double_consonant(w):
        return w if w[-1] in "lsz" else w[:-1]
      if _measure(w) == 1 and _cvc(w):
        return w + "e"
      return w
  return w


def _step4(w: str) -> str:
  # The longest matching suffix decides, as the C switch does per letter:
  # `ement` before `ment` before `ent`, `ance` / `ence` before none, ...
  for suffix in sorted(_STEP4, key=len, reverse=True):
    if w.endswith(suffix):
      stem = w[: -len(suffix)]
      if suffix == "ion" and not stem.endswith(("s", "t")):
        return w
      return stem if _measure(stem) > 1 else w
  return w


def _step5(w: str) -> str:
  if w.endswith("e"):
    m = _measure(w[:-1])
    if m > 1 or (m == 1 and not _cvc(w[:-1])):
      w = w[:-1]
  if w.endswith("ll") and _measure(w) > 1:
    w = w[:-1]
  return w


@functools.lru_cache(maxsize=1 << 18)
def porter_stem(word: str) -> str:
  """Porter (1980) stem of a lowercase word (words of <= 2 letters as is).

  Follows Porter's reference C implementation (the variant Lucene's
  `PorterStemFilter` uses); see the module docstring.

  Args:
    word: A lowercase token.

  Returns:
    Its stem.
  """
  if len(word) <= 2:
    return word
  w = _step1ab(word)
  if w.endswith("y") and _has_vowel(w[:-1]):  # Step 1c.
    w = w[:-1] + "i"
  w = _replace_first(w, _STEP2)
  w = _replace_first(w, _STEP3)
  w = _step4(w)
  return _step5(w)


# ----------------------------------------------------------------------------
# Analyzer.


class Analyzer:
  """Lowercase, `\\w+` tokens, possessive removal, stopwords, Porter stems.

  Attributes:
    stopwords: Lowercase words dropped before stemming.
    stem: Whether to apply `porter_stem`.
  """

  def __init__(
      self,
      *,
      stopwords: Iterable[str] = LUCENE_ENGLISH_STOPWORDS,
      stem: bool = True,
  ):
    self.stopwords = frozenset(stopwords)
    self.stem = stem

  def __call__(self, text: str) -> list[str]:
    """The analyzed terms of `text`, in order."""
    terms = []
    for token in _TOKEN_RE.findall(text.lower()):
      if token.endswith(_POSSESSIVE):
        token = token[:-2]
      if not token or token in self.stopwords:
        continue
      terms.append(porter_stem(token) if self.stem else token)
    return terms


# ----------------------------------------------------------------------------
# BM25.


class BM25:
  """A BM25 index over a corpus (Lucene scoring; see the module docstring).

  Attributes:
    doc_ids: Document ids, in corpus order (row `i` of the index).
    vocab: Term -> term id.
    k1: Term-frequency saturation.
    b: Length normalisation.
    analyzer: The analyzer applied to documents and queries.
    doc_lengths: int64 `[N]` analyzed document lengths.
    avgdl: Mean document length.
    df: int64 `[V]` document frequencies.
    idf: float64 `[V]` IDF values.
    index: The `sparse_index.InvertedIndex` of saturated term frequencies.
  """

  def __init__(
      self,
      corpus: Mapping[str, str],
      *,
      k1: float | int = 0.9,
      b: float | int = 0.4,
      analyzer: Analyzer | None = None,
  ):
    """Analyzes and indexes `corpus`.

    Args:
      corpus: Document id -> text.
      k1: BM25 `k1 >= 0`.
      b: BM25 `b` in `[0, 1]`.
      analyzer: Defaults to `Analyzer()`.

    Raises:
      ValueError: If the corpus is empty or `k1` / `b` are out of range.
    """
    if not corpus:
      raise ValueError("BM25 needs a non-empty corpus.")
    if k1 < 0 or not 0 <= b <= 1:
      raise ValueError(f"Need k1 >= 0 and 0 <= b <= 1; got k1={k1}, b={b}.")
    self.k1, self.b = float(k1), float(b)
    self.analyzer = analyzer or Analyzer()
    self.doc_ids = list(corpus)
    self.vocab: dict[str, int] = {}
    rows_terms, rows_tf, lengths = [], [], []
    for text in corpus.values():
      ids = [self.vocab.setdefault(t, len(self.vocab)) for t in
             self.analyzer(text)]
      terms, tf = np.unique(np.asarray(ids, np.int64), return_counts=True)
      rows_terms.append(terms)
      rows_tf.append(tf)
      lengths.append(len(ids))
    num_terms = max(len(self.vocab), 1)
    n = len(self.doc_ids)
    self.doc_lengths = np.asarray(lengths, np.int64)
    self.avgdl = float(self.doc_lengths.mean())
    norm = self.k1 * (
        1.0 - self.b + self.b * self.doc_lengths / max(self.avgdl, 1e-12)
    )
    rows = []
    for i, (terms, tf) in enumerate(zip(rows_terms, rows_tf)):
      rows.append((terms, (tf / (tf + norm[i])).astype(np.float32)))
    docs = sparse_index.from_rows(rows, num_terms)
    self.index = sparse_index.build(docs)
    self.df = self.index.document_frequency()
    self.idf = np.log1p((n - self.df + 0.5) / (self.df + 0.5))

  @property
  def num_docs(self) -> int:
    return len(self.doc_ids)

  def query_vector(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    """`(term ids, qtf * idf)` of a query; unknown terms are dropped."""
    ids = [self.vocab[t] for t in self.analyzer(text) if t in self.vocab]
    terms, qtf = np.unique(np.asarray(ids, np.int64), return_counts=True)
    return terms.astype(np.int32), qtf * self.idf[terms]

  def search(self, text: str, k: int = 10) -> list[tuple[str, float]]:
    """Top-`k` `(doc id, score)` for a query (only matching documents).

    Ties: lower corpus position first (`sparse_index.search`).
    """
    doc_idx, scores = sparse_index.search(
        self.index, *self.query_vector(text), k
    )
    return [(self.doc_ids[i], float(s)) for i, s in zip(doc_idx, scores)]

  def search_run(
      self, queries: Mapping[str, str], k: int = 1000
  ) -> dict[str, dict[str, float]]:
    """Run dict `{query id: {doc id: score}}` for `metrics.evaluate`."""
    return {qid: dict(self.search(text, k)) for qid, text in queries.items()}

  def scores(self, text: str) -> np.ndarray:
    """float64 `[N]` scores of every document, by a direct formula (tests)."""
    out = np.zeros(self.num_docs)
    terms, weights = self.query_vector(text)
    for t, w in zip(terms, weights):
      start, end = self.index.term_ptr[t], self.index.term_ptr[t + 1]
      out[self.index.doc_ids[start:end]] += w * self.index.values[start:end]
    return out


def mine_hard_negatives(
    bm25: BM25,
    queries: Mapping[str, str],
    positives: Mapping[str, Collection[str]],
    *,
    k: int = 100,
    n: int = 8,
    exclude_identical_ids: bool = True,
) -> dict[str, list[str]]:
  """BM25 hard negatives: top-ranked documents that are not positives.

  Args:
    bm25: The index.
    queries: Query id -> text.
    positives: Query id -> ids of its positive documents (every query of
      `queries` must have an entry, possibly empty, so that a missing
      judgment is never mined as a negative by accident).
    k: How deep to search.
    n: Negatives per query (fewer when fewer than `n` non-positive documents
      match in the top `k`).
    exclude_identical_ids: Also skip a document whose id equals the query id
      (BEIR's `ignore_identical_ids`).

  Returns:
    Query id -> up to `n` document ids, best BM25 rank first.

  Raises:
    ValueError: If a query has no `positives` entry, or `n < 1` or `k < n`.
  """
  if n < 1 or k < n:
    raise ValueError(f"Need 1 <= n <= k; got n={n}, k={k}.")
  missing = [q for q in queries if q not in positives]
  if missing:
    raise ValueError(
        f"{len(missing)} queries have no positives entry (first: "
        f"{missing[0]!r}); pass an empty collection for queries without "
        "judged positives."
    )
  out = {}
  for qid, text in queries.items():
    skip = set(positives[qid])
    if exclude_identical_ids:
      skip.add(qid)
    ranked = (d for d, _ in bm25.search(text, k) if d not in skip)
    out[qid] = [d for _, d in zip(range(n), ranked)]
  return out


def evaluate(
    bm25: BM25,
    queries: Mapping[str, str],
    qrels: metrics.Qrels,
    measures: Sequence[str] = ("ndcg_cut_10", "recall_100"),
    *,
    k: int = 1000,
) -> dict[str, float]:
  """Searches `queries` and evaluates the run against `qrels`."""
  if k < 1:
    raise ValueError(f"k must be >= 1; got {k}.")
  return metrics.evaluate(qrels, bm25.search_run(queries, k), measures)
