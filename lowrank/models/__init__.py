"""Model definitions (Flax NNX) and their checkpoint loaders.

* `bert`: BERT encoder (`BertModel`, `load_pretrained`, `Tokenizer`,
  `encode`, `embed`).
* `llama`: LLaMA-style decoder (`LlamaForCausalLM`, `load_pretrained`,
  `save_pretrained`, `generate`).

Submodules are imported on first use: `from lowrank.models import bert`, or
`lowrank.models.bert` after `import lowrank.models`.
"""

import lowrank

# pylint: disable-next=protected-access
__getattr__, __dir__, __all__ = lowrank._attach(
    __name__, submodules=("bert", "llama")
)
