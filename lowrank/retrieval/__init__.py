"""Retrieval: exact dense top-k search and trec_eval-exact metrics."""
