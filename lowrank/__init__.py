"""lowrank: memory-efficient training of retrieval and ranking models in JAX.

Subpackages and modules (importing a subpackage makes all of its submodules
reachable as attributes, e.g. `lowrank.retrieval.metrics`; the light ones
import them on first use):
  lowrank.sharding         logical-axis rules, meshes, derived shardings
  lowrank.quantize         block-wise 8-bit quantiser (8-bit Adam, QLoRA)
  lowrank.checkpoint       orbax checkpoints that resume; adapter-only saves
  lowrank.surgery          NNX module surgery: match targets, walk, replace
  lowrank.distributed      multi-process start-up (`jax.distributed`)
  lowrank.metric_writers   CSV / TensorBoard / JSON metric writers
  lowrank.assets           paths of the bundled real models and data
  lowrank.presets          each method's paper settings (`paper(name)`)
  lowrank.adapters         the LoRA family: inject / merge / unmerge, QLoRA,
                           multi-adapters, adapter merging, PEFT file I/O
  lowrank.optim            GaLore / Fira / FRUGAL / Q-GaLore, 8-bit Adam,
                           OwLore / LISA, ALLoRA, SoRA, memory accounting
  lowrank.spectral         SST, SLTrain, ReLoRA, SVD compression (LoRD,
                           WeLore, EoRA)
  lowrank.models           BERT encoder and LLaMA-style decoder, loaded
                           from Hugging Face safetensors
  lowrank.data             BEIR reader, stdlib code search, tfds builders,
                           hard negatives, length-bucketed batches
  lowrank.retrieval        trec_eval-exact metrics, exact search, BiEncoder,
                           contrastive losses, ColBERT, MUVERA, SPLADE, BM25,
                           binary / int8 / PQ codes
  lowrank.ranking          learning-to-rank losses, CrossEncoder, FIRST / ICR
                           decoder reranking, fusion, `rerank`
  lowrank.train            one train step and loop (resume, checkpoints,
                           metrics, progress); optimizers and adapters
                           from config sections

Layers: imports point downward only, from a layer to a lower one (checked,
with cycles and cross-module use of `_private` names, by
tests/layering_test.py):
  1  sharding, quantize, assets, distributed, metric_writers, presets
     (leaves)
  2  checkpoint, surgery (infrastructure)
  3  adapters, optim
  4  spectral (built on the adapter layers)
  5  models, train
  6  retrieval
  7  ranking (uses retrieval's metrics), data (mines negatives with BM25)
Experiments and notebooks, outside the package, sit on top.

Nothing heavy is imported by `import lowrank` itself.
"""

from lowrank import _lazy

__version__ = "0.1.0"

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__,
    submodules=(
        "adapters", "assets", "checkpoint", "data", "distributed",
        "metric_writers", "models", "optim", "presets", "quantize", "ranking",
        "retrieval", "sharding", "spectral", "surgery", "train",
    ),
)
