"""Retrieval datasets held in memory as plain Python dicts.

- `lowrank.data.beir`: `load_beir` reads a BEIR-format directory
  (`corpus.jsonl`, `queries.jsonl`, `qrels/<split>.tsv`) with line-level
  validation, and defines the shared `Dataset` container.
- `lowrank.data.code_search`: `load_code_search` builds a deterministic
  docstring-to-code retrieval task from the running interpreter's standard
  library (no download needed).
"""
