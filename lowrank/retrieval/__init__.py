"""Retrieval: encoders, losses, search and trec_eval-exact metrics.

Submodules (imported on first use, e.g. `lowrank.retrieval.metrics` after
`import lowrank.retrieval`):

* `metrics`: trec_eval-exact vectorised metrics (`ndcg@10`-style aliases).
* `search`: exact dense top-k (`topk`, `exact_search`, `search_run`), sharded
  or streamed.
* `biencoder`: `BiEncoder` (shared or separate towers, fixed or learned logit
  scale).
* `losses`: contrastive losses (in-batch, hard negatives, cross-device,
  Matryoshka, GradCache).
* `colbert` (`ColBERT`, late interaction), `muvera` (fixed-dimensional
  encodings), `splade` and `sparse_index` (learned sparse retrieval), `bm25`
  (`BM25`), `codes` (binary / int8 / PQ / JPQ codes).
"""

import lowrank

# pylint: disable-next=protected-access
__getattr__, __dir__, __all__ = lowrank._attach(
    __name__,
    submodules=(
        "biencoder", "bm25", "codes", "colbert", "losses", "metrics",
        "muvera", "search", "sparse_index", "splade",
    ),
    attributes={"BiEncoder": "biencoder", "BM25": "bm25", "ColBERT": "colbert"},
)
