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

Nothing heavy is imported by `import lowrank` itself.
"""

from collections.abc import Callable, Iterable, Mapping
import importlib
from typing import Any

__version__ = "0.1.0"


def _attach(
    package: str,
    submodules: Iterable[str],
    attributes: Mapping[str, str] | None = None,
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
  """Module `__getattr__`, `__dir__` and `__all__` for lazy submodules.

  The PEP 562 pattern (as scientific-python's `lazy_loader.attach`): a
  subpackage lists its submodules and re-exported names; each is imported on
  first attribute access, so `import lowrank.retrieval` stays cheap and
  submodules that import each other's packages cannot form an import cycle.

  Args:
    package: The subpackage's `__name__`.
    submodules: Names of its submodules.
    attributes: Re-exported name -> the submodule that defines it.

  Returns:
    `(__getattr__, __dir__, __all__)` for the subpackage's namespace.
  """
  submodules = tuple(submodules)
  attributes = dict(attributes or {})
  names = sorted({*submodules, *attributes})

  def __getattr__(name: str) -> Any:  # pylint: disable=invalid-name
    if name in submodules:
      return importlib.import_module(f"{package}.{name}")
    if name in attributes:
      module = importlib.import_module(f"{package}.{attributes[name]}")
      return getattr(module, name)
    raise AttributeError(
        f"module {package!r} has no attribute {name!r}; it has: "
        f"{', '.join(names)}."
    )

  def __dir__() -> list[str]:  # pylint: disable=invalid-name
    return sorted({*vars(importlib.import_module(package)), *names})

  return __getattr__, __dir__, list(names)


__getattr__, __dir__, __all__ = _attach(
    __name__,
    submodules=(
        "adapters", "assets", "checkpoint", "data", "distributed",
        "metric_writers", "models", "optim", "quantize", "ranking",
        "retrieval", "sharding", "spectral", "surgery",
    ),
)
