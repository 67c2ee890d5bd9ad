"""lowrank: memory-efficient training of retrieval and ranking models in JAX.

Subpackages (import what you use; nothing heavy is imported here):
  lowrank.sharding    logical-axis rules, meshes, derived shardings
  lowrank.checkpoint  orbax checkpoints that resume
  lowrank.adapters    LoRA core: inject / merge / unmerge / PEFT I/O
  lowrank.models      BERT encoder with a Hugging Face safetensors loader
  lowrank.data        BEIR-format reader, stdlib code-search task
  lowrank.retrieval   trec_eval-exact metrics, exact search, losses
"""

__version__ = "0.1.0"
