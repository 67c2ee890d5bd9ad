r"""FIRST and ICR reranking with a small byte-level LLaMA decoder.

Data: code search over the Python standard library (`lowrank.data.
code_search`: docstring summary -> function code), BM25 first stage.

  python -m experiments.rerank_decoder --workdir=/tmp/rerank_decoder \
      --config=experiments/configs/rerank_decoder.py

The decoder is LM-pretrained briefly on the train split's text
(`pretrain.*`), fine-tuned for FIRST on BM25 candidate lists of the train
queries (`first.*`), then BM25's top `rerank_k` of `eval_max_queries` test
queries is reranked with FIRST (fine-tuned decoder) and ICR (zero-shot, the
pretrained decoder; `rerankers` picks which). The default takes about 10
minutes of 2-core CPU time; `:smoke` is the test
preset. Rerunning the same command resumes from the checkpoints in
--workdir (a finished phase is not retrained).
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the experiment config; `arg` picks a preset ("smoke")."""
  config = ml_collections.ConfigDict()
  config.seed = 0

  # == The decoder (lowrank.models.llama.LlamaConfig; vocabulary = bytes).
  config.model = ml_collections.ConfigDict()
  config.model.hidden_size = 128
  config.model.intermediate_size = 352
  config.model.num_layers = 3
  config.model.num_heads = 2
  config.model.num_kv_heads = 2

  # == Prompt truncation (bytes), shared by FIRST and ICR. Attention cost
  # grows with the square of the prompt: 10 candidates of 96 bytes make a
  # ~1.2k-byte FIRST prompt, 20 make a ~2.2k-byte ICR prompt.
  config.max_query_bytes = 48
  config.max_doc_bytes = 96

  # == Phase 1: next-byte LM pretraining on the train split's
  # "summary\ncode" texts.
  config.pretrain = ml_collections.ConfigDict()
  config.pretrain.num_train_steps = 150
  config.pretrain.batch_size = 16
  config.pretrain.seq_len = 256
  config.pretrain.learning_rate = 3e-3
  config.pretrain.warmup_steps = 15

  # == Phase 2: FIRST fine-tuning on lists of the train queries' BM25 top
  # `window` (the judged document is put in at a random slot when BM25
  # missed it); the target permutation is the positive first, then BM25
  # order.
  config.first = ml_collections.ConfigDict()
  config.first.num_train_steps = 200
  config.first.batch_size = 4  # Lists per step.
  config.first.window = 10  # Candidates per training prompt.
  config.first.learning_rate = 1e-3
  config.first.warmup_steps = 20
  # lowrank.ranking.first.LTR_LOSSES ("first_rank_net": FIRST's weighted
  # RankNet on the target ranks; others: lowrank.ranking.losses on labels).
  config.first.ltr_loss = "first_rank_net"
  config.first.lm_weight = 1.0
  config.first.ltr_weight = 1.0
  config.first.max_train_queries = 0  # 0 = every train query.
  # Show each training list in a random order (the target stays "judged
  # document first, then BM25 order"), so position carries no signal.
  config.first.shuffle_candidates = False

  config.weight_decay = 0.0
  config.log_every_steps = 10
  config.checkpoint_every_steps = 50

  # == Evaluation: rerank BM25's top-k of the test queries.
  config.rerank_k = 20
  config.eval_max_queries = 200  # 0 = all 1,100 test queries.
  config.window = 10  # FIRST sliding window at test time...
  config.stride = 5  # ...and its stride (RankLLM: 20 / 10).
  config.eval_batch_size = 8
  config.icr_batch_size = 4
  config.icr_query_reduction = "mean"
  # Comma-separated: "first" (the FIRST-tuned decoder), "first_shuffled"
  # (the same on the top-k in a random order: the model's content signal
  # without the first stage's order), "icr_pretrained" (ICR on the
  # pretrained decoder, zero-shot), "icr_first" (ICR on the FIRST-tuned
  # decoder). ICR rows come calibrated and uncalibrated.
  config.rerankers = "first,first_shuffled,icr_pretrained"

  if arg == "smoke":
    config.model.hidden_size = 32
    config.model.intermediate_size = 64
    config.model.num_layers = 1
    config.model.num_heads = 2
    config.model.num_kv_heads = 1
    config.max_query_bytes = 16
    config.max_doc_bytes = 24
    config.pretrain.num_train_steps = 2
    config.pretrain.batch_size = 4
    config.pretrain.seq_len = 64
    config.pretrain.warmup_steps = 1
    config.first.num_train_steps = 4
    config.first.batch_size = 2
    config.first.window = 3
    config.first.warmup_steps = 1
    config.first.max_train_queries = 32
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.rerank_k = 4
    config.eval_max_queries = 6
    config.window = 3
    config.stride = 2
    config.eval_batch_size = 4
    config.icr_batch_size = 4
    config.rerankers = "first,first_shuffled,icr_pretrained,icr_first"
  elif arg:
    raise ValueError(f"Unknown preset {arg!r}; expected 'smoke' or none.")
  return config
