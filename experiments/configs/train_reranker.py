r"""Train a MiniLM cross-encoder reranker (LoRA by default) and rerank.

Default data: code search over the Python standard library
(`lowrank.data.code_search`); `--config.data.spec=beir:<directory>` takes
any BEIR-format directory (train on qrels/train.tsv, rerank test.tsv):

  python -m experiments.train_reranker --workdir=/tmp/rr \
      --config=experiments/configs/train_reranker.py

`--config.adapter.method=full` fine-tunes every weight; with it,
`--config.optimizer.name=galore_adamw --config.optimizer.rank=64` uses
GaLore. `:smoke` is the test preset; `:scifact` the SciFact run of
RESULTS.md (BM25 top-100, rerank top-30 at 256 tokens, 300 LoRA steps,
z-score fusion weighted on 10% held-out train queries):

  python -m experiments.train_reranker --workdir=/tmp/rr_scifact \
      --config=experiments/configs/train_reranker.py:scifact
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the experiment config; `arg` picks a preset ("smoke")."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = dict(
      spec="code_search",  # or "beir:<directory>"
      max_train_queries=0,  # 0 = every train query with a positive.
      dev_fraction=0.1,  # Train queries held out (dev loss, fusion weight).
      negatives_depth=100,  # BM25 depth negatives are mined from.
      negatives_pool=30,  # Negatives kept per query to sample from.
      eval_max_queries=0)  # 0 = all test queries.
  # path: HF-format BERT directory ("" = bundled MiniLM); pooling:
  # cross_encoder.POOLINGS; max_length: pair length, special tokens included.
  config.model = dict(path="", pooling="cls", max_length=128)
  # == lowrank.adapters.inject's arguments; method "full" = no adapter.
  config.adapter = dict(
      method="lora", targets=r"bert\..*\.(query|key|value|dense)", rank=16,
      alpha=32.0, dropout=0.0, init="kaiming")
  # batch_size queries per step, each a group of one positive and
  # group_size - 1 BM25-mined negatives scored with `loss` (a name of
  # cross_encoder.LOSSES); grad_clip_norm: global-norm clipping (0 = off);
  # eval_every: dev loss / top-1 cadence (and at the end).
  config.train = dict(num_steps=200, batch_size=4, group_size=8,
                      loss="softmax_ce", grad_clip_norm=1.0, log_every=10,
                      checkpoint_every=50, eval_every=100)
  # == The optimizer factory's arguments (train.optimizer_from_config).
  config.optimizer = dict(
      name="adamw", weight_decay=0.0, b1=0.9, b2=0.999,
      learning_rate=dict(schedule="warmup_cosine_decay_schedule",
                         init_value=0.0, peak_value=1e-3, warmup_steps=20,
                         decay_steps=200))
  # A computed reference: follows num_steps, and overriding it alone does
  # not change num_steps (a plain reference would).
  config.optimizer.learning_rate.decay_steps = config.train.get_ref(
      "num_steps").to_int()
  config.mesh = dict(data=1, fsdp=1, tensor=1)  # The first N devices.
  # The first stage (bm25, or minilm zero-shot) retrieves first_stage_depth
  # documents per query, the cross-encoder rescores the top rerank_k; the
  # fusion (per-query normalised) takes the alpha of best dev nDCG@10.
  config.eval = dict(first_stage="bm25", first_stage_depth=100, rerank_k=100,
                     fusion_normalization="zscore", batch_size=32)

  if arg == "smoke":
    config.data.update(negatives_depth=20, negatives_pool=6,
                       max_train_queries=64, eval_max_queries=12)
    config.model.max_length = 48
    config.adapter.update(rank=4, alpha=8.0)
    config.train.update(num_steps=4, batch_size=2, group_size=4, log_every=2,
                        checkpoint_every=2)
    config.optimizer.learning_rate.warmup_steps = 1
    config.eval.update(first_stage_depth=10, rerank_k=5, batch_size=16)
  elif arg == "scifact":
    config.data.spec = "beir:../shared/data/beir/scifact"
    config.model.max_length = 256
    config.train.update(num_steps=300, eval_every=150)
    config.optimizer.learning_rate.warmup_steps = 30
    config.eval.rerank_k = 30
  elif arg:
    raise ValueError(f"Unknown preset {arg!r}; expected 'smoke', 'scifact' "
                     "or none.")
  return config
