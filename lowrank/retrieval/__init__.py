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

from lowrank import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=(
        "biencoder", "bm25", "codes", "colbert", "evaluate", "losses",
        "metrics", "muvera", "search", "sparse_index", "splade",
    ),
    attributes={"BiEncoder": "biencoder", "BM25": "bm25", "ColBERT": "colbert"},
)
