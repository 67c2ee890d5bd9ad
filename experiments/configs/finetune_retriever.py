r"""Fine-tune a retriever: bi-encoder, Matryoshka, ColBERT or SPLADE.

Default: all-MiniLM-L6-v2 as a bi-encoder with LoRA. Default data: code
search over the Python standard library (query = a function's docstring
summary, document = its code without the docstring; split by module),
embedded in every Python install, so nothing downloads.

  python -m experiments.finetune_retriever --workdir=/tmp/ft \
      --config=experiments/configs/finetune_retriever.py

Any BEIR-format directory (train on qrels/train.tsv, evaluate on test.tsv):

  python -m experiments.finetune_retriever --workdir=/tmp/ft_scifact \
      --config=experiments/configs/finetune_retriever.py \
      --config.data=beir:../shared/data/beir/scifact

Other models (`experiments/retrieval_models.py`):

  --config.model=matryoshka    # nDCG@10 at every prefix, prefix_curve.png
  --config.model=biencoder --config.eval_dims=384,256,128,64,32
                               # the plain bi-encoder at the same prefixes
  --config.model=colbert       # exact MaxSim vs MUVERA FDE + rerank
  --config.model=splade        # SPLADE-tiny, FLOPS-regularised

Full fine-tuning instead of LoRA: `--config.method=full` (any adapter of
`lowrank.adapters.METHODS` works too, e.g. `dora`).
`--config=...finetune_retriever.py:smoke` selects the few-step test preset;
`:demo` the preset of `experiments/demo.py` (`make demo`).
Rerunning the same command resumes from the latest checkpoint in --workdir.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the experiment config; `arg` picks a preset ("smoke")."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = "code_search"  # or "beir:<directory>"
  # "biencoder", "matryoshka", "colbert" or "splade".
  config.model = "biencoder"
  # HF-format BERT directory; "" = the bundled all-MiniLM-L6-v2 (SPLADE-tiny
  # for model="splade").
  config.model_path = ""
  # "full", or an adapter method: "lora", "dora", "vera", ... (see
  # `lowrank.adapters.METHODS`); method-specific keywords go in
  # `config.adapter.options`.
  config.method = "lora"
  config.num_train_steps = 150
  config.batch_size = 32
  config.query_max_length = 32
  config.doc_max_length = 128
  config.pooling = "mean"  # bi-encoder / Matryoshka pooling.
  config.scale = 20.0  # cosine-similarity logit scale (temperature 0.05).
  config.symmetric = False  # add the document->query softmax term.
  config.same_side = False  # query-query / doc-doc negatives (GTE).
  config.towers = "shared"  # or "separate" query and document encoders.
  config.learn_scale = False  # learn the logit scale (init `scale`).
  config.max_scale = 100.0  # clip of the learned scale (CLIP's 100).
  config.warmup_steps = 15
  config.log_every_steps = 10
  config.checkpoint_every_steps = 50
  config.eval_batch_size = 64
  config.eval_max_queries = 0  # 0 = all test queries.
  # 0 = the whole test corpus; N keeps the kept queries' judged documents
  # and then the first others by id, up to N (smoke tests; optimistic).
  config.eval_max_docs = 0
  # Results per query; at least 100 (or the corpus size): Recall@100 reads
  # the top 100.
  config.eval_k = 100
  # Bi-encoder / Matryoshka: also report nDCG@10 and Recall@100 of the
  # embedding prefixes of these sizes (truncate + renormalise).
  config.eval_dims = ()

  # == model="matryoshka": lowrank.retrieval.losses.matryoshka over these
  # prefix sizes (each evaluated too); weights () = all 1.
  config.matryoshka = ml_collections.ConfigDict()
  config.matryoshka.dims = (384, 256, 128, 64, 32)
  config.matryoshka.weights = ()

  # == model="colbert": lowrank.retrieval.colbert over MiniLM (query length
  # query_max_length, document length doc_max_length).
  config.colbert = ml_collections.ConfigDict()
  config.colbert.dim = 128
  config.colbert.scale = 1.0  # MaxSim logit scale (ColBERT: raw MaxSim).
  config.colbert.attend_to_mask_tokens = True
  config.colbert.projection_init = "orthogonal"
  # MUVERA fixed-dimensional encodings (evaluation): R repetitions, 2^k_sim
  # partitions, AMS projection to projection_dim (0: identity), optional
  # final Count-Sketch (0: none); the top `rerank` FDE candidates are
  # reranked by exact MaxSim. Defaults: the paper's 10240-d setting.
  config.colbert.muvera = ml_collections.ConfigDict()
  config.colbert.muvera.num_repetitions = 20
  config.colbert.muvera.num_simhash_projections = 5
  config.colbert.muvera.projection_dim = 16
  config.colbert.muvera.final_projection_dim = 0
  config.colbert.muvera.fill_empty_partitions = True
  config.colbert.muvera.seed = 1
  config.colbert.muvera.rerank = 200

  # == model="splade": splade.splade_loss = in-batch softmax over sparse dot
  # products + lambda_q R(q) + lambda_d R(d), both weights growing
  # quadratically over reg_warmup_steps (naver/splade's schedule).
  config.splade = ml_collections.ConfigDict()
  config.splade.regularizer = "flops"  # or "l1", "idf_flops".
  config.splade.lambda_q = 1e-2
  config.splade.lambda_d = 1e-2
  config.splade.reg_warmup_steps = 50
  config.splade.scale = 1.0  # SPLADE scores are raw dot products.

  # == lowrank.adapters.inject keyword arguments.
  config.adapter = ml_collections.ConfigDict()
  config.adapter.targets = r".*\.(query|key|value|dense)"
  config.adapter.rank = 8
  config.adapter.alpha = 16.0
  config.adapter.dropout = 0.0
  config.adapter.use_rslora = False
  config.adapter.init = "kaiming"
  config.adapter.options = ml_collections.ConfigDict()

  # == The optimizer (the warmup-cosine schedule wraps learning_rate):
  # "adamw", "adamw8bit", or the GaLore family "galore", "fira", "frugal",
  # "q_galore" (usually with method="full": GaLore trains full weights with
  # low-rank optimizer state).
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 1e-3
  config.optimizer.weight_decay = 0.0
  config.optimizer.b1 = 0.9
  config.optimizer.b2 = 0.999
  config.optimizer.galore = ml_collections.ConfigDict()
  config.optimizer.galore.rank = 64
  config.optimizer.galore.refresh_every = 50
  config.optimizer.galore.scale = 0.25
  config.optimizer.galore.projector = "rsvd"
  # Regex over parameter paths: which matrices are projected (the rest,
  # embeddings included, get plain AdamW); galore_adamw's `project=`.
  config.optimizer.galore.project = r"\['encoder'\]"

  # == experiments/demo.py: which runs, and each run's learning rate.
  config.demo = ml_collections.ConfigDict()
  config.demo.runs = "lora,galore"  # Any of: lora, galore, full.
  config.demo.lora_learning_rate = 1e-3
  config.demo.galore_learning_rate = 1e-4
  config.demo.full_learning_rate = 3e-5

  # Mesh axis sizes; one -1 absorbs the remaining devices.
  config.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1))

  if arg == "smoke":
    config.num_train_steps = 4
    config.batch_size = 8
    config.query_max_length = 16
    config.doc_max_length = 32
    config.warmup_steps = 1
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.eval_max_queries = 40
    config.eval_max_docs = 300  # The 40 queries' documents + others.
    config.eval_batch_size = 32
  elif arg == "demo":  # `make demo`: LoRA and GaLore runs in < 10 minutes.
    config.num_train_steps = 60
    config.warmup_steps = 6
    config.checkpoint_every_steps = 20
  elif arg:
    raise ValueError(
        f"Unknown preset {arg!r}; expected 'smoke', 'demo' or none.")
  return config
