"""Retrieval datasets held in memory as plain Python dicts.

- `lowrank.data.beir`: `load_beir` reads a BEIR-format directory
  (`corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`) with line-level
  validation, and defines the shared `Dataset` container; `load` returns
  plain `(corpus, queries, qrels)` dicts; `read_directory` reads every split
  and keeps titles apart.
- `lowrank.data.code_search`: `load_code_search` builds a deterministic
  docstring-to-code retrieval task from the running interpreter's standard
  library (no download needed).
- `lowrank.data.specs`: one string names a dataset in every binary
  (`"code_search"`, `"beir:<dir>"`): `load`, one `subset`, `positive_pairs`.
- `lowrank.data.byte_corpus`: byte-level LM corpora by name
  (tinyshakespeare, gensim's Lee corpus, any file) split into training
  tokens and validation windows.
- `lowrank.data.tfds_builders`: tensorflow-datasets builders (array_record,
  no TensorFlow) for any BEIR directory, the code-search task and gensim's
  Lee corpus; `load(name, ...)` prepares once and reads back.
- `lowrank.data.hard_negatives`: BM25- and model-mined hard negatives,
  `(query, positive, negatives)` text batches, and length-bucketed batching
  of tokenised inputs.

Submodules are imported on first use (`lowrank.data.beir` after
`import lowrank.data`).
"""

from lowrank import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=("beir", "byte_corpus", "code_search", "hard_negatives",
                "specs", "tfds_builders"),
)
