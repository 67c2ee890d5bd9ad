r"""Train a MiniLM cross-encoder reranker (LoRA by default) and rerank.

Default data: code search over the Python standard library (see
`lowrank.data.code_search`), embedded in every Python install:

  python -m experiments.train_reranker --workdir=/tmp/rr \
      --config=experiments/configs/train_reranker.py

Any BEIR-format directory (train on qrels/train.tsv, rerank test.tsv):

  python -m experiments.train_reranker --workdir=/tmp/rr_scifact \
      --config=experiments/configs/train_reranker.py \
      --config.data=beir:../shared/data/beir/scifact

`--config.method=full` fine-tunes every weight; `--config.optimizer.name=
galore_adamw` (with `--config.method=full`) uses GaLore. `:smoke` selects the
few-step test preset. Rerunning the same command resumes from the latest
checkpoint in --workdir.

`:scifact` is the SciFact run of /work/notes/results_rerank.md (BM25 top-100,
rerank top-30 at 256 tokens, 300 LoRA steps, z-score fusion with the weight
chosen on 10% held-out train queries):

  python -m experiments.train_reranker --workdir=/tmp/rr_scifact \
      --config=experiments/configs/train_reranker.py:scifact
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the experiment config; `arg` picks a preset ("smoke")."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = "code_search"  # or "beir:<directory>"
  config.model_path = ""  # HF-format BERT directory; "" = bundled MiniLM.
  config.pooling = "cls"  # cross_encoder.POOLINGS
  # "full", or an adapter method of lowrank.adapters.METHODS.
  config.method = "lora"
  # A loss of lowrank.ranking.cross_encoder.LOSSES, over groups of one
  # positive and group_size - 1 BM25-mined negatives per query.
  config.loss = "softmax_ce"
  config.num_train_steps = 200
  config.queries_per_batch = 4
  config.group_size = 8
  config.dev_fraction = 0.1  # Train queries held out (dev loss, fusion).
  config.dev_every_steps = 100  # Dev loss/top-1 also at step 0 and the end.
  config.negatives_depth = 100  # BM25 depth negatives are mined from.
  config.negatives_pool = 30  # Negatives kept per query to sample from.
  config.max_train_queries = 0  # 0 = every train query with a positive.
  config.max_length = 128  # Pair length, special tokens included.
  config.warmup_steps = 20
  config.grad_clip_norm = 1.0  # Global-norm clipping; 0 = off.
  config.log_every_steps = 10
  config.checkpoint_every_steps = 50

  # Evaluation: the first stage retrieves first_stage_depth documents per
  # dev/test query, the cross-encoder rescores the top rerank_k, and
  # alpha * CE + (1 - alpha) * first stage (per-query normalised scores,
  # lowrank.ranking.fusion) is fused with alpha chosen on dev nDCG@10.
  config.first_stage = "bm25"  # or "minilm" (the zero-shot bi-encoder).
  config.first_stage_depth = 100
  config.rerank_k = 100
  config.fusion_normalization = "zscore"  # fusion.NORMALIZATIONS
  config.eval_batch_size = 32
  config.eval_max_queries = 0  # 0 = all test queries.

  # == lowrank.adapters.inject keyword arguments.
  config.adapter = ml_collections.ConfigDict()
  config.adapter.targets = r"bert\..*\.(query|key|value|dense)"
  config.adapter.rank = 16
  config.adapter.alpha = 32.0
  config.adapter.dropout = 0.0
  config.adapter.init = "kaiming"
  config.adapter.options = ml_collections.ConfigDict()

  # == Optimizer: `name` is "adamw" (optax) or "galore_adamw"
  # (lowrank.optim); the other fields are its keyword arguments (the
  # warmup-cosine schedule wraps learning_rate).
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.options = ml_collections.ConfigDict()  # e.g. rank=...

  if arg == "smoke":
    config.num_train_steps = 4
    config.queries_per_batch = 2
    config.group_size = 4
    config.negatives_depth = 20
    config.negatives_pool = 6
    config.max_train_queries = 64
    config.max_length = 48
    config.warmup_steps = 1
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.first_stage_depth = 10
    config.rerank_k = 5
    config.eval_batch_size = 16
    config.eval_max_queries = 12
    config.adapter.rank = 4
    config.adapter.alpha = 8.0
  elif arg == "scifact":
    config.data = "beir:../shared/data/beir/scifact"
    config.max_length = 256
    config.num_train_steps = 300
    config.warmup_steps = 30
    config.dev_every_steps = 150
    config.rerank_k = 30
  elif arg:
    raise ValueError(f"Unknown preset {arg!r}; expected 'smoke', 'scifact' "
                     "or none.")
  return config
