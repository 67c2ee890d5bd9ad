r"""Pretrain a small LLaMA-style decoder with every low-rank method.

The small-scale analogue of the GaLore paper's Table 2 (Zhao et al. 2024,
https://arxiv.org/abs/2403.03507): the same decoder, the same batches (equal
tokens) and the same rank for Full-Adam, LoRA, ReLoRA, GaLore, Fira, FRUGAL,
Q-GaLore, SST and SLTrain; validation perplexity vs memory per method.

  python -m experiments.pretrain_lm --workdir=/tmp/pretrain \
      --config=experiments/configs/pretrain_lm.py

Select methods with `--config.methods=full,galore,lora` ("all" = every one).
Data: `--config.data=auto` (default) reads ../shared/data/lm/tinyshakespeare
when present (or under $LOWRANK_SHARED_DIR), else gensim's embedded Lee
news corpus; `tinyshakespeare`, `lee` or `file:<path to a UTF-8 text>` pick
one explicitly. Tokens are bytes (vocabulary 256), so perplexities are per
byte. `--config=...pretrain_lm.py:smoke` is the few-step test preset.
Rerunning the same command resumes (finished methods are skipped).
"""

import ml_collections

ALL_METHODS = ("full", "lora", "relora", "galore", "fira", "frugal",
               "q_galore", "sst", "sltrain")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the experiment config; `arg` picks a preset ("smoke")."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.data = "auto"
  config.val_fraction = 0.1  # The last 10% of the bytes (nanoGPT's split).
  # Comma-separated subset of ALL_METHODS, or "all".
  config.methods = "all"

  # == The decoder (lowrank.models.llama.LlamaConfig; vocab = 256 bytes).
  config.model = ml_collections.ConfigDict()
  config.model.hidden_size = 128
  config.model.intermediate_size = 352
  config.model.num_layers = 4
  config.model.num_heads = 4
  config.model.num_kv_heads = 4

  config.seq_len = 128
  config.batch_size = 16
  config.num_train_steps = 300
  config.warmup_steps = 30
  config.min_lr_ratio = 0.1  # Cosine decays to this fraction of the peak.
  config.weight_decay = 0.0
  config.log_every_steps = 10
  config.eval_every_steps = 100
  config.eval_batches = 16  # Validation: eval_batches * batch_size windows.
  config.checkpoint_every_steps = 100

  # == Equal rank for every low-rank method (d_model / 4).
  config.rank = 32
  # Which Linear layers the low-rank methods touch (all of attention and
  # MLP, as the GaLore/ReLoRA/SLTrain pretraining scripts); embeddings,
  # norms and the LM head always train densely with AdamW.
  config.targets = r".*_proj"

  # Peak learning rate per method.
  config.lr = ml_collections.ConfigDict(dict(
      full=3e-3, lora=3e-3, relora=3e-3, galore=1e-2, fira=1e-2,
      frugal=3e-3, q_galore=1e-2, sst=3e-3, sltrain=3e-3))

  config.lora = ml_collections.ConfigDict()
  config.lora.alpha = 32.0

  config.relora = ml_collections.ConfigDict()
  config.relora.refresh_every = 100
  config.relora.restart_warmup_steps = 10
  config.relora.prune_ratio = 0.999

  # GaLore, Fira, FRUGAL, Q-GaLore (lowrank.optim).
  config.galore = ml_collections.ConfigDict()
  config.galore.refresh_every = 50
  config.galore.scale = 0.25
  config.galore.projector = "rsvd"
  # FRUGAL's pretraining scripts use 1.0 (0.1 is its fine-tuning value):
  # --inactive_lr_scale 1.0 in scripts/benchmark_c4/llama_60m.sh of
  # github.com/philip-zmushko/FRUGAL (fork hungquangbui02022003/FRUGAL
  # @08f514226d1caf973c548d96e8305ee7266a4d71).
  config.galore.frugal_inactive_lr_scale = 1.0
  config.galore.q_bits = 4

  # SST (lowrank.spectral.sst_adamw): iterations of refresh_every steps
  # (the paper's T3) with the same sampled vectors, so Adam's moments
  # accumulate; round_length 0 = (m/r) iterations per round (200 steps
  # here, m = 128, r = 32); the active block's rate re-warms over
  # rewarm_steps after every resample (library default: T3 // 10).
  config.sst = ml_collections.ConfigDict()
  config.sst.refresh_every = 50
  config.sst.round_length = 0
  config.sst.rewarm_steps = 5

  config.sltrain = ml_collections.ConfigDict()
  config.sltrain.density = 0.03
  config.sltrain.alpha = 32.0

  if arg == "smoke":
    config.methods = "full,galore,lora"
    config.model.hidden_size = 32
    config.model.intermediate_size = 64
    config.model.num_layers = 2
    config.model.num_heads = 2
    config.model.num_kv_heads = 2
    config.seq_len = 32
    config.batch_size = 4
    config.num_train_steps = 4
    config.warmup_steps = 1
    config.log_every_steps = 1
    config.eval_every_steps = 2
    config.eval_batches = 2
    config.checkpoint_every_steps = 2
    config.rank = 8
    config.relora.refresh_every = 2
    config.relora.restart_warmup_steps = 1
    config.galore.refresh_every = 2
    config.sst.refresh_every = 2
    config.sst.round_length = 4
    config.sst.rewarm_steps = 1
  elif arg:
    raise ValueError(f"Unknown preset {arg!r}; expected 'smoke' or none.")
  return config
