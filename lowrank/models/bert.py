"""BERT encoder in Flax NNX and its Hugging Face checkpoint loader.

The module tree mirrors Hugging Face's `BertModel` state-dict names, so the
NNX graph path of every layer joined with dots is the HF / PEFT module name
(`encoder.layer.0.attention.self.query`, `pooler.dense`, ...). The model is
built only from `nnx.Linear`, `nnx.Embed`, `nnx.LayerNorm` and `nnx.Dropout`,
so `lowrank.adapters.inject` can find and replace the `nnx.Linear` layers by
path. `BertForMaskedLM` checkpoints (SPLADE) get an optional MLM head at
`cls.predictions.*` whose decoder is tied to the word embeddings; their
`bert.` prefix is stripped when loading.

`load_pretrained` reads a local HF-format directory (`config.json`,
`model.safetensors`) with `hf_io` (safetensors): no torch, no pickle, no
remote code; `load_tokenizer` reads its `tokenizer.json` into a
`wordpiece.Tokenizer`. Every tensor is accounted for: a missing, unexpected
or mis-shaped tensor raises a `ValueError` that names it.

The embedding helpers live in `lowrank.models.encoding` (`encode` on
token-id batches, `embed_texts` on strings, `pool`) and the tokenizer in
`lowrank.models.wordpiece`; both are re-exported here (`bert.encode`,
`bert.embed_texts`, `bert.Tokenizer`, ...).

The numerics follow HF's post-LN BERT: exact-erf GELU, learned absolute
positions, token-type embeddings and an additive attention mask.
"""

from collections.abc import Iterable, Mapping, Sequence
import dataclasses
import math
import os
from typing import Any

from flax import nnx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Shaped
import numpy as np

from lowrank import sharding
from lowrank.models import encoding
from lowrank.models import hf_io
from lowrank.models import wordpiece

_AnyArray = jax.Array | np.ndarray
PathLike = str | os.PathLike

# Checkpoint tensors that carry no weights we need (buffers, the NSP head).
IGNORED_TENSORS = (
    "embeddings.position_ids",
    "embeddings.token_type_ids",
    "cls.seq_relationship.weight",
    "cls.seq_relationship.bias",
)
_TIED_DECODER = {
    "cls.predictions.decoder.weight": "embeddings.word_embeddings.weight",
    "cls.predictions.decoder.bias": "cls.predictions.bias",
}
_MLM_ARCHITECTURES = ("BertForMaskedLM", "BertForPreTraining")


# ----------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Hyperparameters of a BERT encoder (the fields of HF's `config.json`).

  Attributes:
    vocab_size: Size of the WordPiece vocabulary.
    hidden_size: Model width `H`.
    num_hidden_layers: Number of transformer layers.
    num_attention_heads: Number of heads; must divide `hidden_size`.
    intermediate_size: Width of the feed-forward layer.
    max_position_embeddings: Longest sequence the position table covers.
    type_vocab_size: Number of token types (segments).
    layer_norm_eps: LayerNorm epsilon.
    hidden_dropout_prob: Dropout on embeddings and sublayer outputs.
    attention_probs_dropout_prob: Dropout on attention probabilities.
    pad_token_id: Id of `[PAD]`.
    initializer_range: Std of the normal initializer (random init only).
    add_pooling_layer: Build HF's pooler (`tanh(dense(h[:, 0]))`).
    add_mlm_head: Build the masked-LM head at `cls.predictions` (tied
      decoder); set from `architectures` by `from_dict`.
    dtype: Compute dtype (`None` means float32 / the parameter dtype).
    param_dtype: Parameter dtype.
  """

  vocab_size: int
  hidden_size: int
  num_hidden_layers: int
  num_attention_heads: int
  intermediate_size: int
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout_prob: float = 0.1
  attention_probs_dropout_prob: float = 0.1
  pad_token_id: int = 0
  initializer_range: float = 0.02
  add_pooling_layer: bool = True
  add_mlm_head: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    for name in (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "type_vocab_size",
    ):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"BertConfig.{name} must be a positive int; got "
                         f"{value!r}.")
    if self.hidden_size % self.num_attention_heads:
      raise ValueError(
          f"hidden_size ({self.hidden_size}) must be divisible by "
          f"num_attention_heads ({self.num_attention_heads})."
      )
    for name in ("hidden_dropout_prob", "attention_probs_dropout_prob"):
      if not 0.0 <= getattr(self, name) < 1.0:
        raise ValueError(f"BertConfig.{name} must be in [0, 1); got "
                         f"{getattr(self, name)!r}.")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_attention_heads

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], **overrides) -> "BertConfig":
    """Builds a config from a HF `config.json` dict, validating it.

    Unknown keys (`_name_or_path`, `transformers_version`, ...) are ignored.
    HF's `dtype` / `torch_dtype` (the storage dtype) is ignored too: the
    compute and parameter dtypes come only from `overrides`.

    Args:
      d: The parsed `config.json`.
      **overrides: Field values that take precedence (e.g. `dtype=`,
        `add_pooling_layer=`).

    Returns:
      The config.

    Raises:
      ValueError: On a missing required field, an unsupported activation
        (only exact `gelu`), a non-absolute position embedding, a decoder /
        cross-attention config, a non-BERT `model_type`, or inconsistent
        sizes.
    """
    model_type = d.get("model_type", "bert")
    if model_type != "bert":
      raise ValueError(
          f"Only model_type 'bert' is supported; got {model_type!r}."
      )
    act = d.get("hidden_act", "gelu")
    if act != "gelu":
      raise ValueError(
          f"Only hidden_act 'gelu' (exact erf GELU) is supported; got "
          f"{act!r}."
      )
    pos = d.get("position_embedding_type", "absolute")
    if pos != "absolute":
      raise ValueError(
          "Only position_embedding_type 'absolute' is supported; got "
          f"{pos!r}."
      )
    if d.get("is_decoder") or d.get("add_cross_attention"):
      raise ValueError("Decoder / cross-attention BERT configs are not "
                       "supported.")
    names = {f.name for f in dataclasses.fields(cls)} - {
        "dtype",
        "param_dtype",
        "add_pooling_layer",
        "add_mlm_head",
    }
    kwargs = {k: d[k] for k in names if k in d}
    required = (
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
    )
    missing = [k for k in required if k not in kwargs and k not in overrides]
    if missing:
      raise ValueError(f"config is missing required fields {missing}.")
    if kwargs.get("pad_token_id") is None:
      kwargs.pop("pad_token_id", None)
    architectures = d.get("architectures") or ()
    kwargs["add_mlm_head"] = any(a in _MLM_ARCHITECTURES for a in architectures)
    kwargs.update(overrides)
    return cls(**kwargs)

  @classmethod
  def from_json_file(cls, path: PathLike, **overrides) -> "BertConfig":
    """Reads and validates a HF `config.json`; see `from_dict`."""
    return cls.from_dict(hf_io.read_json(path), **overrides)


# ----------------------------------------------------------------------------
# Modules. Attribute names mirror HF's state dict (`self.self` included).


def _init(config: BertConfig, axes: tuple[str | None, ...]):
  return nnx.with_partitioning(
      nnx.initializers.normal(config.initializer_range), axes
  )


def _zeros(axes: tuple[str | None, ...]):
  return nnx.with_partitioning(nnx.initializers.zeros_init(), axes)


def _linear(
    config: BertConfig,
    d_in: int,
    d_out: int,
    axes: tuple[str | None, str | None],
    rngs: nnx.Rngs,
) -> nnx.Linear:
  return nnx.Linear(
      d_in,
      d_out,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      kernel_init=_init(config, axes),
      bias_init=_zeros((axes[1],)),
      rngs=rngs,
  )


def _layer_norm(config: BertConfig, rngs: nnx.Rngs) -> nnx.LayerNorm:
  return nnx.LayerNorm(
      config.hidden_size,
      epsilon=config.layer_norm_eps,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(),
                                       ("norm",)),
      bias_init=_zeros(("norm",)),
      rngs=rngs,
  )


def _embed(
    config: BertConfig, num: int, axes: tuple[str, str], rngs: nnx.Rngs
) -> nnx.Embed:
  return nnx.Embed(
      num,
      config.hidden_size,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      embedding_init=_init(config, axes),
      rngs=rngs,
  )


def _gelu(x: jax.Array) -> jax.Array:
  return jax.nn.gelu(x, approximate=False)  # HF "gelu" is the exact erf.


class BertEmbeddings(nnx.Module):
  """Word + learned absolute position + token-type embeddings, then LN."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.word_embeddings = _embed(
        config, config.vocab_size, ("vocab", "embed"), rngs
    )
    self.position_embeddings = _embed(
        config, config.max_position_embeddings, ("position", "embed"), rngs
    )
    self.token_type_embeddings = _embed(
        config, config.type_vocab_size, ("type", "embed"), rngs
    )
    self.LayerNorm = _layer_norm(config, rngs)  # pylint: disable=invalid-name
    self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

  def __call__(
      self, input_ids: jax.Array, token_type_ids: jax.Array
  ) -> jax.Array:
    length = input_ids.shape[1]
    positions = jnp.arange(length, dtype=jnp.int32)[None, :]
    x = (
        self.word_embeddings(input_ids)
        + self.position_embeddings(positions)
        + self.token_type_embeddings(token_type_ids)
    )
    return self.dropout(self.LayerNorm(x))


class BertSelfAttention(nnx.Module):
  """Multi-head scaled dot-product attention (HF `attention.self`)."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    h = config.hidden_size
    self.num_heads = config.num_attention_heads
    self.head_dim = config.head_dim
    self.query = _linear(config, h, h, ("embed", "heads"), rngs)
    self.key = _linear(config, h, h, ("embed", "heads"), rngs)
    self.value = _linear(config, h, h, ("embed", "heads"), rngs)
    self.dropout = nnx.Dropout(config.attention_probs_dropout_prob, rngs=rngs)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    b, l, _ = x.shape
    split = lambda t: t.reshape(b, l, self.num_heads, self.head_dim)
    q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
    # Scores and softmax in float32 even for bf16 compute (HF upcasts too in
    # its SDPA path); `bias` is 0 for kept keys and a large negative number
    # for padding, broadcast over heads and queries.
    scores = jnp.einsum(
        "bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32
    ) / math.sqrt(self.head_dim)
    probs = jax.nn.softmax(scores + bias, axis=-1).astype(v.dtype)
    probs = self.dropout(probs)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs, v)
    return out.reshape(b, l, self.num_heads * self.head_dim)


class BertSelfOutput(nnx.Module):
  """Attention output projection, dropout, residual and post-LN."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    h = config.hidden_size
    self.dense = _linear(config, h, h, ("heads", "embed"), rngs)
    self.LayerNorm = _layer_norm(config, rngs)  # pylint: disable=invalid-name
    self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

  def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
    return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertAttention(nnx.Module):
  """HF `attention`: `self` (q/k/v) then `output` (dense + LN)."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.self = BertSelfAttention(config, rngs=rngs)
    self.output = BertSelfOutput(config, rngs=rngs)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    return self.output(self.self(x, bias), x)


class BertIntermediate(nnx.Module):
  """Feed-forward up-projection with exact GELU."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.dense = _linear(
        config,
        config.hidden_size,
        config.intermediate_size,
        ("embed", "mlp"),
        rngs,
    )

  def __call__(self, x: jax.Array) -> jax.Array:
    return _gelu(self.dense(x))


class BertOutput(nnx.Module):
  """Feed-forward down-projection, dropout, residual and post-LN."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.dense = _linear(
        config,
        config.intermediate_size,
        config.hidden_size,
        ("mlp", "embed"),
        rngs,
    )
    self.LayerNorm = _layer_norm(config, rngs)  # pylint: disable=invalid-name
    self.dropout = nnx.Dropout(config.hidden_dropout_prob, rngs=rngs)

  def __call__(self, x: jax.Array, residual: jax.Array) -> jax.Array:
    return self.LayerNorm(self.dropout(self.dense(x)) + residual)


class BertLayer(nnx.Module):
  """One post-LN transformer layer (HF `encoder.layer.<i>`)."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.attention = BertAttention(config, rngs=rngs)
    self.intermediate = BertIntermediate(config, rngs=rngs)
    self.output = BertOutput(config, rngs=rngs)

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    x = self.attention(x, bias)
    return self.output(self.intermediate(x), x)


class BertEncoder(nnx.Module):
  """The layer stack; `layer` is an `nnx.List` so paths read `layer.<i>`."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.layer = nnx.List(
        [BertLayer(config, rngs=rngs) for _ in range(config.num_hidden_layers)]
    )

  def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
    for layer in self.layer:
      x = layer(x, bias)
    return x


class BertPooler(nnx.Module):
  """HF pooler: `tanh(dense(h[:, 0]))`."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    h = config.hidden_size
    self.dense = _linear(config, h, h, ("embed", None), rngs)

  def __call__(self, hidden: jax.Array) -> jax.Array:
    return jnp.tanh(self.dense(hidden[:, 0]))


class BertPredictionHeadTransform(nnx.Module):
  """`cls.predictions.transform`: dense, GELU, LayerNorm."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    h = config.hidden_size
    self.dense = _linear(config, h, h, ("embed", None), rngs)
    self.LayerNorm = _layer_norm(config, rngs)  # pylint: disable=invalid-name

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.LayerNorm(_gelu(self.dense(x)))


class BertLMPredictionHead(nnx.Module):
  """`cls.predictions`: transform, tied decoder, output bias."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.transform = BertPredictionHeadTransform(config, rngs=rngs)
    self.bias = nnx.Param(
        _zeros(("vocab",))(
            rngs.params(), (config.vocab_size,), config.param_dtype
        )
    )

  def __call__(self, x: jax.Array, word_embeddings: nnx.Embed) -> jax.Array:
    # The decoder is tied: passed in, never stored, so the embedding table
    # has exactly one graph path.
    logits = word_embeddings.attend(self.transform(x))
    bias = self.bias[...].astype(logits.dtype)
    return logits + bias.reshape((1,) * (logits.ndim - 1) + bias.shape)


class BertOnlyMLMHead(nnx.Module):
  """HF `cls` (holds `predictions`)."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.predictions = BertLMPredictionHead(config, rngs=rngs)

  def __call__(self, x: jax.Array, word_embeddings: nnx.Embed) -> jax.Array:
    return self.predictions(x, word_embeddings)


class BertModel(nnx.Module):
  """BERT encoder whose attribute paths are HF's state-dict names.

  Dropout is active only in train mode (`model.train()`); `load_pretrained`
  returns the model in eval mode. Build it inside `lowrank.sharding.use_mesh`
  (Flax NNX shards parameters eagerly from their logical axes).

  Attributes:
    config: The `BertConfig`.
    embeddings: `BertEmbeddings`.
    encoder: `BertEncoder` (`encoder.layer.<i>`).
    pooler: `BertPooler` or `None` (`config.add_pooling_layer`).
    cls: `BertOnlyMLMHead` or `None` (`config.add_mlm_head`).
  """

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = BertEmbeddings(config, rngs=rngs)
    self.encoder = BertEncoder(config, rngs=rngs)
    self.pooler = (
        BertPooler(config, rngs=rngs) if config.add_pooling_layer else None
    )
    self.cls = (
        BertOnlyMLMHead(config, rngs=rngs) if config.add_mlm_head else None
    )

  def __call__(
      self,
      input_ids: Int[_AnyArray, "b l"],
      attention_mask: Shaped[_AnyArray, "b l"] | None = None,
      token_type_ids: Int[_AnyArray, "b l"] | None = None,
  ) -> Float[Array, "b l h"]:
    """Runs the encoder.

    Args:
      input_ids: Token ids `[B, L]`.
      attention_mask: `[B, L]`, nonzero for real tokens (default all ones).
      token_type_ids: Segment ids `[B, L]` (default zeros).

    Returns:
      The last hidden state `[B, L, H]` in the compute dtype.

    Raises:
      ValueError: If `L` exceeds `max_position_embeddings`.
    """
    input_ids = jnp.asarray(input_ids)
    length = input_ids.shape[1]
    if length > self.config.max_position_embeddings:
      raise ValueError(
          f"Sequence length {length} exceeds max_position_embeddings "
          f"({self.config.max_position_embeddings})."
      )
    if token_type_ids is None:
      token_type_ids = jnp.zeros_like(input_ids)
    if attention_mask is None:
      attention_mask = jnp.ones(input_ids.shape, jnp.float32)
    bias = attention_bias(attention_mask)
    x = self.embeddings(input_ids, jnp.asarray(token_type_ids))
    return self.encoder(x, bias)

  def pool(self, hidden: Float[Array, "b l h"]) -> Float[Array, "b h"]:
    """HF pooler output `tanh(dense(hidden[:, 0]))`.

    Raises:
      ValueError: If the model was built without a pooler.
    """
    if self.pooler is None:
      raise ValueError("This BertModel has no pooler (add_pooling_layer "
                       "was False or the checkpoint has no pooler.dense).")
    return self.pooler(hidden)

  def mlm_logits(self, hidden: Float[Array, "b l h"]) -> Float[Array, "b l v"]:
    """Masked-LM logits `[B, L, V]` from the tied `cls.predictions` head.

    Raises:
      ValueError: If the model was built without the MLM head.
    """
    if self.cls is None:
      raise ValueError("This BertModel has no MLM head (config.add_mlm_head "
                       "is False; load a BertForMaskedLM checkpoint).")
    return self.cls(hidden, self.embeddings.word_embeddings)


def attention_bias(
    attention_mask: Shaped[_AnyArray, "b l"],
) -> Float[Array, "b 1 1 l"]:
  """Additive float32 attention bias `[B, 1, 1, L]` from a `[B, L]` mask.

  Kept keys get 0 and padding gets half the float32 minimum: finite, so a
  row with no kept key (a padding row) softmaxes to uniform, not NaN.
  """
  mask = jnp.asarray(attention_mask) != 0
  neg = 0.5 * jnp.finfo(jnp.float32).min
  return jnp.where(mask, 0.0, neg).astype(jnp.float32)[:, None, None, :]


# ----------------------------------------------------------------------------
# Loading.


# A ColBERT head next to BERT weights is read with it (`hf_io.read_tensor`).
read_tensor = hf_io.read_tensor


def _canonical_names(names: Iterable[str]) -> dict[str, str]:
  """Canonical HF name -> stored name.

  The canonical name drops a `bert.` prefix and spells old LayerNorm
  `gamma` / `beta` as `weight` / `bias`.
  """
  out: dict[str, str] = {}
  for key in names:
    name = key.removeprefix("bert.")
    if name.endswith("LayerNorm.gamma"):
      name = name.removesuffix("gamma") + "weight"
    elif name.endswith("LayerNorm.beta"):
      name = name.removesuffix("beta") + "bias"
    if name in out:
      raise ValueError(
          f"Tensors {out[name]!r} and {key!r} both map to {name!r}; keep "
          "one of them in the checkpoint."
      )
    out[name] = key
  return out


def hf_param_names(model: nnx.Module) -> dict[str, tuple[Any, ...]]:
  """HF state-dict name of every `nnx.Param` of `model` -> its NNX path.

  `encoder.layer.0.attention.self.query.weight` <- `(..., 'query',
  'kernel')`; LayerNorm `scale` -> `weight`, `Embed.embedding` -> `weight`.
  """
  names = {}
  for path, node in nnx.graph.iter_graph(model):
    if isinstance(node, nnx.Param):
      if path[-1] not in hf_io.PARAM_SUFFIX:
        raise ValueError(f"No HF name for parameter path {path}.")
      prefix = ".".join(str(p) for p in path[:-1])
      suffix = hf_io.PARAM_SUFFIX[path[-1]]
      names[f"{prefix}.{suffix}"] = tuple(path)
  return names


def load_pretrained(
    path: PathLike,
    *,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    seed: int = 0,
    ignore: Sequence[str] = (),
) -> BertModel:
  """Loads a local HF-format BERT checkpoint directory, strictly.

  Reads `config.json` and `model.safetensors` (or a sharded index) with
  `hf_io`: no torch, no pickle and no code execution (`load_tokenizer` reads
  the checkpoint's `tokenizer.json`). Torch `[out, in]` Linear weights
  become Flax `[in, out]` kernels; `bert.` prefixes (BertForMaskedLM) are
  stripped; old `LayerNorm.gamma/beta` names are accepted. The pooler is
  built iff the checkpoint has `pooler.dense.*`; the MLM head iff
  `architectures` names BertForMaskedLM (or BertForPreTraining).

  Under an active mesh (inside `sharding.use_mesh(...)`) each parameter is
  placed with the sharding its logical axes give under the active rules (and
  the dropout RNG state is replicated on that mesh). With no active mesh
  nothing is placed on a mesh: the values are ordinary (uncommitted) arrays
  on the default device, as in any NNX module built outside a mesh, so a
  plain `nnx.jit` train step with an `nnx.Optimizer` compiles once. It is
  returned in eval mode (dropout off).

  Args:
    path: The checkpoint directory.
    dtype: Compute dtype (`None`: float32).
    param_dtype: Parameter dtype (checkpoint values are cast to it).
    seed: Seed of the dropout RNG streams.
    ignore: Names of non-BERT tensors the file may hold and that are left
      out (e.g. `("linear.weight",)` for a ColBERT checkpoint, whose head
      `ColBERT.from_pretrained` reads with `read_tensor`). Any other
      unexpected tensor is still an error.

  Returns:
    The model.

  Raises:
    FileNotFoundError: If the directory, `config.json` or the weights are
      missing (the message names the file).
    ValueError: On a missing tensor, an unexpected tensor, a shape
      mismatch or a non-floating tensor (the message names the tensor), a
      corrupt weights file, or an invalid config.
  """
  path = hf_io.checkpoint_dir(path)
  raw_config = hf_io.read_config(path)
  file_tensors = hf_io.open_tensors(path)
  tensors = _canonical_names(file_tensors)
  config = BertConfig.from_dict(
      raw_config,
      dtype=dtype,
      param_dtype=param_dtype,
      add_pooling_layer="pooler.dense.weight" in tensors,
  )

  mesh, rules = sharding.current_mesh_and_rules()
  # Without an active mesh the abstract model is built on a default one (for
  # its shapes only) and nothing is placed on a mesh; see the docstring.
  with sharding.use_mesh(mesh, rules):
    model = nnx.eval_shape(
        lambda: BertModel(config, rngs=nnx.Rngs(params=0, dropout=seed))
    )
  expected = hf_param_names(model)
  variables = {
      tuple(p): v
      for p, v in nnx.graph.iter_graph(model)
      if isinstance(v, nnx.Param)
  }

  # Tied decoder copies: accepted only when they equal the tied tensor.
  for name, tied in _TIED_DECODER.items():
    if name in tensors and config.add_mlm_head and tied in tensors:
      arr, tied_arr = file_tensors[tensors[name]], file_tensors[tensors[tied]]
      if arr.shape != tied_arr.shape or not np.array_equal(arr, tied_arr):
        raise ValueError(
            f"{tensors[name]}: untied MLM decoder is not supported (it "
            f"differs from {tensors[tied]})."
        )
      del tensors[name]
  for name in (*IGNORED_TENSORS, *ignore):
    tensors.pop(name, None)
  hf_io.check_names(path, tensors, expected, "the BERT config")

  for name, var_path in expected.items():
    key = tensors[name]
    var = variables[var_path]
    shape = tuple(var.get_value().shape)
    is_kernel = var_path[-1] == "kernel"
    file_tensors.check(key, shape[::-1] if is_kernel else shape)
    value = file_tensors.read(key, param_dtype)
    hf_io.set_param(var, value.T if is_kernel else value, mesh, rules)
  # The dropout streams are the only other variables; give them real keys
  # (under an active mesh NNX commits them to it, replicated).
  nnx.reseed(model, dropout=seed)
  hf_io.check_initialized(model)
  model.eval()
  return model


def load_tokenizer(
    path: PathLike, *, max_length: int | None = None
) -> wordpiece.Tokenizer:
  """Loads the WordPiece tokenizer of a local HF-format BERT checkpoint.

  Reads `tokenizer.json` (and, for the default length, the optional
  `sentence_bert_config.json` / `tokenizer_config.json`); the default
  truncation length is capped at `config.json`'s `max_position_embeddings`
  when that file is present.

  Args:
    path: The checkpoint directory.
    max_length: Truncation length (default: the checkpoint's, see
      `wordpiece.Tokenizer.from_pretrained`).

  Returns:
    The tokenizer.

  Raises:
    FileNotFoundError: If the directory or `tokenizer.json` is missing.
  """
  path = hf_io.checkpoint_dir(path)
  max_positions = None
  if (path / hf_io.CONFIG_NAME).is_file():
    max_positions = hf_io.read_config(path).get("max_position_embeddings")
  return wordpiece.Tokenizer.from_pretrained(
      path, max_length=max_length, max_position_embeddings=max_positions)


# ----------------------------------------------------------------------------
# The tokenizer and the embedding helpers live in their own modules; these
# names keep `bert.<name>` working (README, notebooks, call sites).

Tokenizer = wordpiece.Tokenizer
POOLINGS = encoding.POOLINGS
LENGTH_BUCKETS = encoding.LENGTH_BUCKETS
pool = encoding.pool
l2_normalize = encoding.l2_normalize
encode = encoding.encode
embed_texts = encoding.embed_texts
embed = encoding.embed
embed_trace_count = encoding.embed_trace_count
bucket_length = encoding.bucket_length
bucketed_batches = encoding.bucketed_batches
