r"""Pretrain a small LLaMA-style decoder with every low-rank method.

`methods`: "all" or e.g. "full,galore,lora". `data.spec`: `auto`
(../shared/data/lm/tinyshakespeare, or under $LOWRANK_SHARED_DIR, if present,
else gensim's Lee corpus), `tinyshakespeare`, `lee` or `file:<UTF-8 text>`;
byte tokens. `:smoke` is the test preset. `optimizer.<method>` holds exactly
the factory's arguments (`lowrank.train.optimizer_from_config`), e.g.
`--config.optimizer.galore.learning_rate.peak_value=5e-3`;
`adapter.<method>` those of `adapters.inject`, `spectral.to_sst` or
`spectral.to_sltrain`; `restart` those of `spectral.relora_restart`.
`--config.rank` and `--config.train.num_steps` set every method's rank and
schedule length (unless its own key is set); `end_value` is 10% of
`peak_value`.
"""

import ml_collections
from ml_collections import config_dict

ALL_METHODS = ("full", "lora", "relora", "galore", "fira", "frugal",
               "q_galore", "sst", "sltrain")
_TARGETS = r".*_proj"  # Every attention/MLP projection.


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """Returns the experiment config; `arg` picks a preset ("smoke")."""
  config = ml_collections.ConfigDict()
  config.seed = 0
  config.methods = "all"  # Or a comma-separated subset of ALL_METHODS.
  config.rank = 32  # d / 4 for every method; embeddings, norms, head: dense.
  # The last 10% of the bytes validate (nanoGPT's split).
  config.data = dict(spec="auto", val_fraction=0.1, seq_len=128,
                     eval_batches=16)
  # The decoder (lowrank.models.llama.LlamaConfig; vocabulary: 256 bytes).
  config.model = dict(hidden_size=128, intermediate_size=352, num_layers=4,
                      num_heads=4, num_kv_heads=4)
  config.train = dict(num_steps=300, batch_size=16, log_every=10,
                      eval_every=100, checkpoint_every=100)
  config.mesh = dict(data=1, fsdp=1, tensor=1)  # Per-device memory.
  steps = config.train.get_ref("num_steps")

  def rank():  # Follows config.rank unless the section's own is set.
    return config.get_ref("rank").to_int()

  def cosine(peak):  # 30-step warm-up, then cosine to 10% of the peak.
    peak = config_dict.FieldReference(peak)
    return dict(schedule="warmup_cosine_decay_schedule", init_value=0.0,
                peak_value=peak, warmup_steps=30, decay_steps=steps.to_int(),
                end_value=peak * 0.1)

  def galore(name, peak, **extra):
    return dict(name=name, learning_rate=cosine(peak), rank=rank(),
                refresh_every=50, projector="rsvd", project=r"_proj",
                weight_decay=0.0, **extra)

  def lora():
    return dict(method="lora", targets=_TARGETS, rank=rank(), alpha=32.0,
                init="kaiming")

  config.adapter = dict(
      lora=lora(), relora=lora(), sst=dict(targets=_TARGETS, rank=rank()),
      sltrain=dict(targets=_TARGETS, rank=rank(), density=0.03, alpha=32.0))
  config.restart = dict(prune_ratio=0.999)
  config.optimizer = {m: dict(name="adamw", learning_rate=cosine(3e-3),
                              weight_decay=0.0)
                      for m in ("full", "lora", "sltrain")}
  o = config.optimizer
  # ReLoRA: the jagged cosine's refresh_every is the restart interval.
  o.relora = dict(name="adamw", weight_decay=0.0, learning_rate=dict(
      schedule="jagged_cosine_schedule", peak_value=3e-3,
      total_steps=steps.to_int(), warmup_steps=30, refresh_every=100,
      restart_warmup_steps=10, min_ratio=0.1))
  o.galore = galore("galore_adamw", 1e-2, scale=0.25)
  o.fira = galore("fira_adamw", 1e-2, scale=0.25)
  # FRUGAL's pretraining value (0.1 is for fine-tuning): llama_60m.sh in
  # scripts/benchmark_c4 of github.com/philip-zmushko/FRUGAL (fork
  # hungquangbui02022003/FRUGAL@08f514226d1caf973c548d96e8305ee7266a4d71).
  o.frugal = galore("frugal_adamw", 3e-3, inactive_lr_scale=1.0)
  o.q_galore = galore("q_galore_adamw", 1e-2, scale=0.25, projector_bits=4)
  # SST: iterations of refresh_every steps (the paper's T3); round_length
  # None = (m/r) iterations per round (200 steps here); the active block's
  # rate re-warms over rewarm_steps after every resample.
  o.sst = dict(name="sst_adamw", learning_rate=cosine(3e-3), rank=rank(),
               weight_decay=0.0, refresh_every=50, rewarm_steps=5,
               round_length=config_dict.placeholder(int),
               seed=config.get_ref("seed").to_int())

  if arg == "smoke":
    config.methods = "full,galore,lora"
    config.rank = 4
    config.model.update(hidden_size=16, intermediate_size=32, num_layers=1,
                        num_heads=2, num_kv_heads=2)
    config.data.update(seq_len=16, eval_batches=1)
    config.train.update(num_steps=4, batch_size=4, log_every=1,
                        eval_every=2, checkpoint_every=2)
    for section in o.values():
      section.learning_rate.warmup_steps = 1
      if "refresh_every" in section:
        section.refresh_every = 2
    o.relora.learning_rate.update(refresh_every=2, restart_warmup_steps=1)
    o.sst.update(round_length=4, rewarm_steps=1)
  elif arg:
    raise ValueError(f"Unknown preset {arg!r}; expected 'smoke' or none.")
  return config
