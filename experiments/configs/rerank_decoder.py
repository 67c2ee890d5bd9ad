r"""FIRST and ICR reranking with a small byte-level LLaMA decoder.

Data: code search over the Python standard library (`lowrank.data.
code_search`: docstring summary -> function code), BM25 first stage.
Phases `pretrain` and `first` each have an `optimizer` (the factory's
arguments) and a `train` section; `adapter` applies to the FIRST phase.
The default takes about 10 minutes of 2-core CPU time; `:smoke` is the
test preset. A rerun resumes (a finished phase is not retrained).
"""

import ml_collections


def _phase(num_steps, batch_size, peak_value, warmup_steps, **extra):
  """`optimizer` (AdamW, warmup-cosine to 10% of the peak) and `train`."""
  phase = ml_collections.ConfigDict(dict(
      train=dict(num_steps=num_steps, batch_size=batch_size, log_every=10,
                 checkpoint_every=50),
      optimizer=dict(name="adamw", weight_decay=0.0, learning_rate=dict(
          schedule="warmup_cosine_decay_schedule", init_value=0.0,
          peak_value=peak_value, warmup_steps=warmup_steps,
          decay_steps=num_steps, end_value=0.1 * peak_value)), **extra))
  # A computed reference: follows num_steps, and overriding it alone does
  # not change num_steps (a plain reference would).
  phase.optimizer.learning_rate.decay_steps = phase.train.get_ref(
      "num_steps").to_int()
  return phase


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the experiment config; `arg` picks a preset ("smoke")."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # Prompts cut to max_*_bytes (FIRST and ICR). Attention cost grows with
  # the square of the prompt: 10 candidates of 96 bytes make a ~1.2k-byte
  # FIRST prompt, 20 make a ~2.2k-byte ICR prompt.
  config.data = dict(spec="code_search", eval_max_queries=200,
                     max_query_bytes=48, max_doc_bytes=96)
  # == The decoder (lowrank.models.llama.LlamaConfig; vocabulary = bytes).
  config.model = dict(hidden_size=128, intermediate_size=352, num_layers=3,
                      num_heads=2, num_kv_heads=2)
  # == adapters.inject's arguments for the FIRST phase ("full": none).
  config.adapter = dict(method="full")
  config.mesh = dict(data=1, fsdp=1, tensor=1)  # The first N devices.
  # == Phase 1: next-byte LM pretraining on "summary\ncode" train texts.
  config.pretrain = _phase(150, 16, 3e-3, 15, seq_len=256)
  # == Phase 2: FIRST fine-tuning on the train queries' BM25 top `window`
  # (the judged document put in when BM25 missed it); target: the positive
  # first, then BM25 order. ltr_loss: first.LTR_LOSSES ("first_rank_net":
  # FIRST's weighted RankNet on the target ranks; others on labels);
  # shuffle_candidates: show each list in a random order (same target).
  config.first = _phase(
      200, 4, 1e-3, 20, window=10, ltr_loss="first_rank_net", lm_weight=1.0,
      ltr_weight=1.0, max_train_queries=0, shuffle_candidates=False)
  # == Evaluation: rerank BM25's top rerank_k of the test queries; FIRST
  # slides a window (stride: RankLLM uses 20 / 10). rerankers, comma-
  # separated: "first" (FIRST-tuned decoder), "first_shuffled" (the same on
  # the top-k in a random order: the model's content signal only),
  # "icr_pretrained" (ICR on the pretrained decoder, zero-shot), "icr_first"
  # (ICR on the FIRST-tuned decoder); ICR rows come calibrated and not.
  config.eval = dict(rerank_k=20, window=10, stride=5, batch_size=8,
                     icr_batch_size=4, icr_query_reduction="mean",
                     rerankers="first,first_shuffled,icr_pretrained")

  if arg == "smoke":
    config.data.update(eval_max_queries=6, max_query_bytes=16,
                       max_doc_bytes=24)
    config.model.update(hidden_size=32, intermediate_size=64, num_layers=1,
                        num_heads=2, num_kv_heads=1)
    config.pretrain.train.update(num_steps=2, batch_size=4, log_every=2,
                                 checkpoint_every=2)
    config.pretrain.update(seq_len=64)
    config.first.train.update(num_steps=4, batch_size=2, log_every=2,
                              checkpoint_every=2)
    config.first.update(window=3, max_train_queries=32)
    for phase in (config.pretrain, config.first):
      phase.optimizer.learning_rate.warmup_steps = 1
    config.eval.update(rerank_k=4, window=3, stride=2, batch_size=4,
                       rerankers="first,first_shuffled,icr_pretrained,"
                       "icr_first")
  elif arg:
    raise ValueError(f"Unknown preset {arg!r}; expected 'smoke' or none.")
  return config
