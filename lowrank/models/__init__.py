"""Model definitions (Flax NNX) and their checkpoint loaders.

* `bert`: BERT encoder (`BertModel`, `load_pretrained`, `load_tokenizer`,
  `Tokenizer`, `encode`, `embed_texts`).
* `llama`: LLaMA-style decoder (`LlamaForCausalLM`, `load_pretrained`,
  `save_pretrained`, `generate`).
* `wordpiece`: the BERT tokenizer (`Tokenizer`, padded numpy batches).
* `encoding`: sentence embeddings (`pool`, `encode` on token ids,
  `embed_texts` on strings); also re-exported by `bert`.
* `hf_io`: reading Hugging Face checkpoint directories (`config.json` and
  safetensors weights, single or sharded) into numpy, for both loaders.

Submodules are imported on first use: `from lowrank.models import bert`, or
`lowrank.models.bert` after `import lowrank.models`.
"""

from lowrank import _lazy

__getattr__, __dir__, __all__ = _lazy.attach(
    __name__, submodules=("bert", "encoding", "hf_io", "llama", "wordpiece")
)
