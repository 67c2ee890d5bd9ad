"""Ranking: learning-to-rank losses, cross-encoder and decoder rerankers.

* `losses`: the LTR losses with optax's ranking signature.
* `cross_encoder.CrossEncoder`: BERT over `[CLS] q [SEP] d [SEP]`.
* `first` (FIRST single-token listwise reranking) and `icr` (attention-based
  in-context reranking) on the LLaMA-style decoder; `decoder_text` holds
  their byte tokenizer and prompt helpers.
* `fusion`: per-query normalisation and weighted interpolation of runs.
* `candidates.FirstStage`: cached BM25 / zero-shot MiniLM first-stage runs.
* `training_data`: query splits, BM25 negative groups and FIRST candidate
  lists for training rerankers.
* `rerank(model, tokenizer, queries, corpus, run, *, k)`: rescoring the
  top-`k` of a first-stage run with any `score_pairs` scorer (the second
  stage of a retrieve-then-rerank cascade; defined in `cascade`, with
  `cascade.top_k`).
"""

from lowrank.ranking import candidates
from lowrank.ranking import cascade
from lowrank.ranking import cross_encoder
from lowrank.ranking import decoder_text
from lowrank.ranking import first
from lowrank.ranking import fusion
from lowrank.ranking import icr
from lowrank.ranking import losses
from lowrank.ranking import training_data
from lowrank.ranking.cross_encoder import CrossEncoder
from lowrank.ranking.first import FirstReranker
from lowrank.ranking.cascade import rerank
from lowrank.ranking.icr import IcrReranker

__all__ = [
    "CrossEncoder", "FirstReranker", "IcrReranker", "candidates", "cascade",
    "cross_encoder", "decoder_text", "first", "fusion", "icr", "losses",
    "rerank", "training_data",
]
