r"""Fine-tune a retriever: bi-encoder, Matryoshka, ColBERT or SPLADE.

Default: all-MiniLM-L6-v2 as a bi-encoder with LoRA, on code search over the
Python standard library (docstring summary -> code; embedded, no download):

  python -m experiments.finetune_retriever --workdir=/tmp/ft \
      --config=experiments/configs/finetune_retriever.py

`--config.data.spec=beir:<dir>`: any BEIR-format directory (train on
qrels/train.tsv, evaluate on test.tsv). `--config.model.name=matryoshka`
(every prefix, prefix_curve.png), `colbert` (exact MaxSim vs MUVERA) or
`splade`; `--config.eval.dims=384,256,128,64,32`: the bi-encoder at those
prefixes. `config.adapter` holds exactly `lowrank.adapters.inject`'s
arguments (`method=full`: every weight), `config.optimizer` exactly the
factory's (`lowrank.train.optimizer_from_config`). Presets, comma-separated:
`smoke` (the few-step test run), `demo` (`experiments/demo.py`), `galore`
(all weights, GaLore-AdamW; then any GaLore-family `--config.optimizer.name`,
e.g. `q_galore_adamw`: they take the same arguments). Rerunning the same
command resumes from the latest checkpoint in --workdir.
"""

import ml_collections

# GaLore state for the encoder's matrices; AdamW for the embeddings.
GALORE = dict(name="galore_adamw", rank=64, refresh_every=50, scale=0.25,
              projector="rsvd", project=r"\['encoder'\]")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """The experiment config; `arg`: comma-separated presets (see above)."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  # spec: "code_search" or "beir:<dir>"; eval_max_*: 0 = all, N keeps the
  # kept queries' judged documents, then others by id (optimistic metrics).
  config.data = dict(spec="code_search", query_max_length=32,
                     doc_max_length=128, eval_max_queries=0, eval_max_docs=0)
  # name: biencoder, matryoshka, colbert or splade; path: an HF BERT directory
  # ("" = bundled MiniLM, SPLADE-tiny for splade); the bi-encoders' options.
  config.model = dict(
      name="biencoder", path="", pooling="mean", scale=20.0,
      learn_scale=False, max_scale=100.0, towers="shared", symmetric=False,
      same_side=False,
      # losses.matryoshka's prefixes (each evaluated) and weights (() = 1).
      matryoshka=dict(dims=(384, 256, 128, 64, 32), weights=()),
      colbert=dict(dim=128, scale=1.0, attend_to_mask_tokens=True,
                   projection_init="orthogonal"),
      # + lambda_q R(q) + lambda_d R(d) (flops, l1 or idf_flops), weights
      # growing quadratically over reg_warmup_steps.
      splade=dict(regularizer="flops", lambda_q=1e-2, lambda_d=1e-2,
                  reg_warmup_steps=50, scale=1.0))
  config.adapter = dict(method="lora", targets=r".*\.(query|key|value|dense)",
                        rank=8, alpha=16.0, dropout=0.0, use_rslora=False,
                        init="kaiming")
  config.train = dict(num_steps=150, batch_size=32, log_every=10,
                      checkpoint_every=50, eval_every=0)
  config.optimizer = dict(
      name="adamw", b1=0.9, b2=0.999, weight_decay=0.0,
      learning_rate=dict(schedule="warmup_cosine_decay_schedule",
                         init_value=0.0, peak_value=1e-3, warmup_steps=15))
  # Follows train.num_steps unless set.
  config.optimizer.learning_rate.decay_steps = (
      config.train.get_ref("num_steps") * 1)
  # k: results per query; dims: embedding prefixes also evaluated; muvera:
  # ColBERT's FDEs (muvera.FDEConfig, 0 = none; the paper's 10240-d setting)
  # and the top-`rerank` FDE candidates reranked by MaxSim.
  config.eval = dict(batch_size=64, k=100, dims=(), muvera=dict(
      num_repetitions=20, num_simhash_projections=5, projection_dim=16,
      final_projection_dim=0, fill_empty_partitions=True, seed=1,
      rerank=200))
  # experiments/demo.py: runs (lora, galore, full), learning rates, GaLore.
  config.demo = dict(runs="lora,galore", lora_learning_rate=1e-3,
                     galore_learning_rate=1e-4, full_learning_rate=3e-5,
                     galore=GALORE)
  config.mesh = dict(data=-1, fsdp=1, tensor=1)  # -1: the rest of devices.

  for arg in (arg or "").split(","):
    if arg == "smoke":
      config.data.update(query_max_length=16, doc_max_length=32,
                         eval_max_queries=20, eval_max_docs=100)
      config.train.update(num_steps=4, batch_size=8, log_every=2,
                          checkpoint_every=2)
      config.optimizer.learning_rate.warmup_steps = 1
      config.eval.batch_size = 32
    elif arg == "demo":  # `make demo`: LoRA and GaLore runs in < 10 minutes.
      config.train.update(num_steps=60, checkpoint_every=20)
      config.optimizer.learning_rate.warmup_steps = 6
    elif arg == "galore":
      config.adapter.method = "full"
      config.optimizer.update(GALORE)
    elif arg:
      raise ValueError(f"Unknown preset {arg!r}; expected 'smoke', 'demo', "
                       f"'galore' or several, comma-separated.")
  return config
