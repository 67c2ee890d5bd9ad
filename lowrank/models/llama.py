"""LLaMA-style decoder in Flax NNX, a KV cache, greedy decoding and HF I/O.

The architecture is the one of Touvron et al. 2023 (LLaMA,
https://arxiv.org/abs/2302.13971) as implemented by Hugging Face's
`LlamaForCausalLM`: pre-norm RMSNorm, rotary position embeddings (Su et al.
2021, https://arxiv.org/abs/2104.09864, in HF's `rotate_half` layout), a
SwiGLU MLP (Shazeer 2020, https://arxiv.org/abs/2002.05202), causal attention
with optional grouped KV heads (Ainslie et al. 2023,
https://arxiv.org/abs/2305.13245) and tied or untied embeddings. The 60M and
130M presets are the GaLore paper's pretraining configs (Zhao et al. 2024,
https://arxiv.org/abs/2403.03507, `configs/llama_{60m,130m}.json`).

Module paths mirror HF's state-dict names (`model.embed_tokens`,
`model.layers.3.self_attn.q_proj`, `model.layers.3.mlp.down_proj`,
`model.norm`, `lm_head`), and every projection is an `nnx.Linear` with
logical axis annotations, so `lowrank.adapters.inject` finds layers by PEFT
path and `lowrank.sharding.state_shardings` maps them onto a mesh.

Two layer layouts (`LlamaConfig.scan_layers`):

* `False`: `model.layers` is an `nnx.List` of layers (HF paths, one `[m, n]`
  kernel per layer).
* `True`: the layers are created with `nnx.vmap` and run with `lax.scan`
  over their split state (as `nnx.scan` does), so
  `model.layers.self_attn.q_proj.kernel` is one `[L, m, n]` leaf: the layer
  is compiled once, and per-layer optimizers such as
  `lowrank.optim.galore_adamw` see stacked leaves. The layer axis has no
  logical name (it is replicated). The layers' own state must not change
  during a forward pass (true of these layers; an injected adapter with
  dropout would need the list layout).
  `lowrank.adapters.inject` targets `nnx.Linear` layers of the list layout.

`convert_layout` switches between the two. `load_pretrained` /
`save_pretrained` read and write HF's format (`config.json` and
`model.safetensors`, optionally sharded with `model.safetensors.index.json`)
with safetensors only: no torch, no pickle, no remote code.

Decoding uses a fixed-size `KVCache` (static shapes, updated with
`lax.dynamic_update_slice`), and `generate` is one jit-compiled greedy loop.
"""

from collections.abc import Callable, Mapping
import dataclasses
import json
import math
import os
import pathlib
from typing import Any, NamedTuple

from flax import nnx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Float, Int, Shaped
import numpy as np
import optax
from safetensors import numpy as safetensors_numpy

from lowrank import sharding
from lowrank.models import hf_io

_AnyArray = jax.Array | np.ndarray
PathLike = str | os.PathLike

WEIGHTS_NAME = hf_io.WEIGHTS_NAME
WEIGHTS_INDEX_NAME = hf_io.WEIGHTS_INDEX_NAME
# Buffers some older checkpoints carry; they hold no weights.
_IGNORED_SUFFIXES = (".rotary_emb.inv_freq",)
# Transform metadata for the stacked layer axis: the logical name `layers`
# (replicated by `sharding.LOGICAL_AXIS_RULES`), which is also how the GaLore
# family finds one matrix per layer (`optim.stacked_axes_from(model)`).
_LAYER_AXIS = {nnx.PARTITION_NAME: "layers"}
_MASK_VALUE = 0.5 * float(np.finfo(np.float32).min)


# ----------------------------------------------------------------------------
# Config.


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Hyperparameters of a LLaMA-style decoder.

  Attributes:
    vocab_size: Vocabulary size `V`.
    hidden_size: Model width `D`.
    intermediate_size: SwiGLU hidden width `F`.
    num_layers: Number of decoder layers `L`.
    num_heads: Number of query heads `H`.
    num_kv_heads: Number of key/value heads (`None`: `num_heads`, i.e.
      multi-head attention); must divide `num_heads`.
    head_dim: Per-head width (`None`: `hidden_size // num_heads`).
    rope_theta: Base of the rotary frequencies.
    rms_norm_eps: RMSNorm epsilon.
    tie_embeddings: Compute logits with the input embedding table (no
      `lm_head`).
    max_position: Longest context the model is meant for (HF's
      `max_position_embeddings`); rotary embeddings do not enforce it.
    initializer_range: Std of the normal initializer (random init only).
    attention_bias: Biases on q/k/v/o projections (HF `attention_bias`).
    mlp_bias: Biases on the MLP projections (HF `mlp_bias`).
    scan_layers: Stack the layers into `[L, ...]` leaves and run them with
      `lax.scan` (see the module docstring).
    dtype: Compute dtype (`None`: float32 / the parameter dtype).
    param_dtype: Parameter dtype.
  """

  vocab_size: int
  hidden_size: int
  intermediate_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  rope_theta: float | int = 10000.0
  rms_norm_eps: float | int = 1e-6
  tie_embeddings: bool = False
  max_position: int = 2048
  initializer_range: float | int = 0.02
  attention_bias: bool = False
  mlp_bias: bool = False
  scan_layers: bool = False
  dtype: Any = None
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.num_kv_heads is None:
      object.__setattr__(self, "num_kv_heads", self.num_heads)
    if self.head_dim is None:
      if self.num_heads > 0 and self.hidden_size % self.num_heads:
        raise ValueError(
            f"hidden_size ({self.hidden_size}) must be divisible by "
            f"num_heads ({self.num_heads}) when head_dim is not given."
        )
      object.__setattr__(
          self, "head_dim", self.hidden_size // max(self.num_heads, 1)
      )
    for name in ("vocab_size", "hidden_size", "intermediate_size",
                 "num_layers", "num_heads", "num_kv_heads", "head_dim",
                 "max_position"):
      value = getattr(self, name)
      is_int = isinstance(value, (int, np.integer)) and not isinstance(
          value, bool)
      if not is_int or value <= 0:
        raise ValueError(
            f"LlamaConfig.{name} must be a positive int; got {value!r}."
        )
    if self.num_heads % self.num_kv_heads:
      raise ValueError(
          f"num_kv_heads ({self.num_kv_heads}) must divide num_heads "
          f"({self.num_heads})."
      )
    if self.head_dim % 2:
      raise ValueError(
          f"head_dim must be even for rotary embeddings; got {self.head_dim}."
      )
    if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
      raise ValueError(
          "rope_theta and rms_norm_eps must be positive; got "
          f"{self.rope_theta!r}, {self.rms_norm_eps!r}."
      )

  @property
  def num_groups(self) -> int:
    """Query heads per KV head."""
    return self.num_heads // self.num_kv_heads

  def replace(self, **changes) -> "LlamaConfig":
    """A copy with `changes` applied (validated)."""
    return dataclasses.replace(self, **changes)

  @classmethod
  def tiny(cls, **overrides) -> "LlamaConfig":
    """A smoke-test size (2 layers, width 64, GQA 4 query / 2 KV heads)."""
    kwargs = dict(vocab_size=256, hidden_size=64, intermediate_size=128,
                  num_layers=2, num_heads=4, num_kv_heads=2, max_position=256)
    return cls(**(kwargs | overrides))

  @classmethod
  def galore_60m(cls, **overrides) -> "LlamaConfig":
    """GaLore's `configs/llama_60m.json` (d 512, 8 layers, MLP 1376)."""
    kwargs = dict(vocab_size=32000, hidden_size=512, intermediate_size=1376,
                  num_layers=8, num_heads=8, max_position=1024)
    return cls(**(kwargs | overrides))

  @classmethod
  def galore_130m(cls, **overrides) -> "LlamaConfig":
    """GaLore's `configs/llama_130m.json` (d 768, 12 layers, MLP 2048)."""
    kwargs = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048,
                  num_layers=12, num_heads=12, max_position=1024)
    return cls(**(kwargs | overrides))

  @classmethod
  def from_dict(cls, d: Mapping[str, Any], **overrides) -> "LlamaConfig":
    """Builds a config from a HF LLaMA `config.json` dict.

    Reads transformers 4 (`rope_theta`, `rope_scaling`) and 5
    (`rope_parameters`) spellings and GaLore's `max_sequence_length`.
    Dropout fields are ignored (this model has no dropout), as is the
    storage dtype; `dtype`, `param_dtype` and `scan_layers` come only from
    `overrides`.

    Args:
      d: The parsed `config.json`.
      **overrides: Field values that take precedence.

    Returns:
      The config.

    Raises:
      ValueError: On a non-LLaMA `model_type`, an activation other than
        `silu`, rotary scaling, or a missing or invalid size.
    """
    model_type = d.get("model_type", "llama")
    if model_type != "llama":
      raise ValueError(f"Only model_type 'llama' is supported; got "
                       f"{model_type!r}.")
    act = d.get("hidden_act", "silu")
    if act != "silu":
      raise ValueError(f"Only hidden_act 'silu' is supported; got {act!r}.")
    rope = d.get("rope_parameters") or {}
    scaling = d.get("rope_scaling")
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if scaling or rope_type != "default":
      raise ValueError(
          "Rotary scaling is not supported; got rope_scaling="
          f"{scaling!r}, rope_parameters={d.get('rope_parameters')!r}."
      )
    names = {
        "vocab_size": "vocab_size",
        "hidden_size": "hidden_size",
        "intermediate_size": "intermediate_size",
        "num_hidden_layers": "num_layers",
        "num_attention_heads": "num_heads",
        "num_key_value_heads": "num_kv_heads",
        "head_dim": "head_dim",
        "rms_norm_eps": "rms_norm_eps",
        "tie_word_embeddings": "tie_embeddings",
        "initializer_range": "initializer_range",
        "attention_bias": "attention_bias",
        "mlp_bias": "mlp_bias",
        "max_sequence_length": "max_position",
        "max_position_embeddings": "max_position",
    }
    kwargs = {f: d[k] for k, f in names.items() if d.get(k) is not None}
    theta = rope.get("rope_theta", d.get("rope_theta"))
    if theta is not None:
      kwargs["rope_theta"] = float(theta)
    required = ("vocab_size", "hidden_size", "intermediate_size",
                "num_layers", "num_heads")
    missing = [k for k in required if k not in kwargs and k not in overrides]
    if missing:
      raise ValueError(f"config is missing required fields {missing}.")
    kwargs.update(overrides)
    return cls(**kwargs)

  @classmethod
  def from_json_file(cls, path: PathLike, **overrides) -> "LlamaConfig":
    """Reads and validates a HF `config.json`; see `from_dict`."""
    return cls.from_dict(hf_io.read_json(path), **overrides)

  def to_dict(self) -> dict[str, Any]:
    """The HF `config.json` dict (transformers 4 and 5 spellings)."""
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "vocab_size": self.vocab_size,
        "hidden_size": self.hidden_size,
        "intermediate_size": self.intermediate_size,
        "num_hidden_layers": self.num_layers,
        "num_attention_heads": self.num_heads,
        "num_key_value_heads": self.num_kv_heads,
        "head_dim": self.head_dim,
        "max_position_embeddings": self.max_position,
        "rms_norm_eps": self.rms_norm_eps,
        "rope_theta": self.rope_theta,
        "rope_parameters": {"rope_type": "default",
                            "rope_theta": self.rope_theta},
        "tie_word_embeddings": self.tie_embeddings,
        "initializer_range": self.initializer_range,
        "attention_bias": self.attention_bias,
        "mlp_bias": self.mlp_bias,
        "attention_dropout": 0.0,
        "torch_dtype": str(np.dtype(self.param_dtype)),
    }


CONFIGS: dict[str, LlamaConfig] = {
    "tiny": LlamaConfig.tiny(),
    "60m": LlamaConfig.galore_60m(),
    "130m": LlamaConfig.galore_130m(),
}


# ----------------------------------------------------------------------------
# Pure functions: rotary embeddings, masks, attention.


def rotary_angles(
    positions: Int[_AnyArray, "b t"], head_dim: int, theta: float | int
) -> tuple[Float[Array, "b t d"], Float[Array, "b t d"]]:
  """Float32 `cos` and `sin` of the rotary angles, HF layout.

  `inv_freq_i = theta^(-2i / d)` for `i < d/2`; the angle table is
  `concat([pos * inv_freq, pos * inv_freq])` so that it pairs dimension `i`
  with `i + d/2` (HF's `rotate_half`), not interleaved pairs.

  Args:
    positions: Integer positions `[B, T]`.
    head_dim: `d` (even).
    theta: Frequency base.

  Returns:
    `(cos, sin)`, each float32 `[B, T, d]`.
  """
  exponent = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
  inv_freq = 1.0 / (theta ** exponent)
  angles = jnp.asarray(positions).astype(jnp.float32)[..., None] * (
      inv_freq[None, None, :])
  angles = jnp.concatenate([angles, angles], axis=-1)
  return jnp.cos(angles), jnp.sin(angles)


def apply_rotary(
    x: Float[Array, "b t h d"],
    cos: Float[Array, "b t d"],
    sin: Float[Array, "b t d"],
) -> Float[Array, "b t h d"]:
  """`x * cos + rotate_half(x) * sin`, computed in float32, cast back."""
  half = x.shape[-1] // 2
  xf = x.astype(jnp.float32)
  rotated = jnp.concatenate([-xf[..., half:], xf[..., :half]], axis=-1)
  out = xf * cos[:, :, None, :] + rotated * sin[:, :, None, :]
  return out.astype(x.dtype)


def positions_from_mask(
    attention_mask: Shaped[_AnyArray, "b t"],
) -> Int[Array, "b t"]:
  """Positions that skip padding: `cumsum(mask) - 1`, 0 on leading pads.

  With left padding this gives each real token the position it has in the
  unpadded sequence (HF's `generate` does the same).
  """
  mask = (jnp.asarray(attention_mask) != 0).astype(jnp.int32)
  return jnp.maximum(jnp.cumsum(mask, axis=1) - 1, 0)


def attention_bias(
    key_mask: Shaped[_AnyArray, "b s"],
    query_slots: Int[_AnyArray, "t"],
) -> Float[Array, "b 1 1 t s"]:
  """Additive float32 causal + padding bias for grouped attention.

  Key slot `s` is visible to the query in slot `query_slots[t]` iff
  `s <= query_slots[t]` and `key_mask[b, s]` is set. Hidden keys get half
  the float32 minimum: finite, so a query with no visible key (a padding
  row) softmaxes to uniform instead of NaN.

  Args:
    key_mask: `[B, S]`, nonzero for slots that hold a real token.
    query_slots: `[T]` cache slot of each query.

  Returns:
    `[B, 1, 1, T, S]`, broadcast over KV heads and groups.
  """
  key_mask = jnp.asarray(key_mask) != 0
  slots = jnp.arange(key_mask.shape[1], dtype=jnp.int32)
  causal = slots[None, :] <= jnp.asarray(query_slots)[:, None]  # [T, S]
  visible = causal[None, :, :] & key_mask[:, None, :]  # [B, T, S]
  bias = jnp.where(visible, 0.0, _MASK_VALUE).astype(jnp.float32)
  return bias[:, None, None, :, :]


def grouped_attention(
    q: Float[Array, "b t h d"],
    k: Float[Array, "b s kv d"],
    v: Float[Array, "b s kv d"],
    bias: Float[Array, "b 1 1 t s"],
) -> Float[Array, "b t h d"]:
  """Scaled dot-product attention with grouped KV heads (GQA).

  Query head `h` attends with KV head `h // (H / KV)`, as HF's `repeat_kv`
  does, without materialising the repeated keys. Scores and softmax are
  float32.
  """
  b, t, h, d = q.shape
  kv = k.shape[2]
  qg = q.reshape(b, t, kv, h // kv, d)
  scores = jnp.einsum(
      "btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32
  ) / math.sqrt(d)
  probs = jax.nn.softmax(scores + bias, axis=-1).astype(v.dtype)
  out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
  return out.reshape(b, t, h, d)


# ----------------------------------------------------------------------------
# KV cache.


class KVCache(NamedTuple):
  """Fixed-size key/value cache for all layers.

  Attributes:
    k: Keys `[L, B, S, KV, d]` (rotary already applied).
    v: Values `[L, B, S, KV, d]`.
    mask: `[B, S]` bool, set for slots that hold a real (non-padding) token.
    end: int32 `[]`, number of slots written so far (the same for every
      row; the next call writes at `end`).
  """

  k: jax.Array
  v: jax.Array
  mask: jax.Array
  end: jax.Array

  @property
  def max_len(self) -> int:
    return self.k.shape[2]


# ----------------------------------------------------------------------------
# Modules. Attribute names mirror HF's state dict.


def _normal(config: LlamaConfig, axes: tuple[str | None, ...]):
  return nnx.with_partitioning(
      nnx.initializers.normal(config.initializer_range), axes
  )


def _linear(
    config: LlamaConfig,
    d_in: int,
    d_out: int,
    axes: tuple[str | None, str | None],
    use_bias: bool,
    rngs: nnx.Rngs,
) -> nnx.Linear:
  return nnx.Linear(
      d_in,
      d_out,
      use_bias=use_bias,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      kernel_init=_normal(config, axes),
      bias_init=nnx.with_partitioning(nnx.initializers.zeros_init(),
                                      (axes[1],)),
      rngs=rngs,
  )


def _rms_norm(config: LlamaConfig, rngs: nnx.Rngs) -> nnx.RMSNorm:
  return nnx.RMSNorm(
      config.hidden_size,
      epsilon=config.rms_norm_eps,
      dtype=config.dtype,
      param_dtype=config.param_dtype,
      scale_init=nnx.with_partitioning(nnx.initializers.ones_init(),
                                       ("norm",)),
      rngs=rngs,
  )


class LlamaAttention(nnx.Module):
  """Causal self-attention with rotary embeddings and grouped KV heads."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, hd = config.hidden_size, config.head_dim
    q_dim, kv_dim = config.num_heads * hd, config.num_kv_heads * hd
    bias = config.attention_bias
    self.num_heads = config.num_heads
    self.num_kv_heads = config.num_kv_heads
    self.head_dim = hd
    self.q_proj = _linear(config, d, q_dim, ("embed", "heads"), bias, rngs)
    self.k_proj = _linear(config, d, kv_dim, ("embed", "heads"), bias, rngs)
    self.v_proj = _linear(config, d, kv_dim, ("embed", "heads"), bias, rngs)
    self.o_proj = _linear(config, q_dim, d, ("heads", "embed"), bias, rngs)

  def __call__(
      self,
      x: jax.Array,
      cos: jax.Array,
      sin: jax.Array,
      bias: jax.Array,
      kv: tuple[jax.Array, jax.Array] | None = None,
      end: jax.Array | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attends over `x` (and the cached keys, if `kv` is given).

    Args:
      x: `[B, T, D]`.
      cos: Rotary cosines `[B, T, d]`.
      sin: Rotary sines `[B, T, d]`.
      bias: `[B, 1, 1, T, S]` from `attention_bias` (`S = T` without cache).
      kv: This layer's cached `(k, v)`, each `[B, S, KV, d]`, or `None`.
      end: Cache slot where the new keys go (with `kv`).

    Returns:
      `([B, T, D], updated (k, v) or None)`.
    """
    b, t, _ = x.shape
    q = self.q_proj(x).reshape(b, t, self.num_heads, self.head_dim)
    k = self.k_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    v = self.v_proj(x).reshape(b, t, self.num_kv_heads, self.head_dim)
    q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    if kv is not None:
      zero = jnp.zeros((), jnp.int32)
      start = (zero, end.astype(jnp.int32), zero, zero)
      k = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), start)
      v = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), start)
      kv = (k, v)
      k, v = k.astype(q.dtype), v.astype(q.dtype)
    out = grouped_attention(q, k, v, bias)
    return self.o_proj(out.reshape(b, t, -1)), kv


class LlamaMLP(nnx.Module):
  """SwiGLU feed-forward: `down(silu(gate(x)) * up(x))`."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
    self.gate_proj = _linear(config, d, f, ("embed", "mlp"), bias, rngs)
    self.up_proj = _linear(config, d, f, ("embed", "mlp"), bias, rngs)
    self.down_proj = _linear(config, f, d, ("mlp", "embed"), bias, rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nnx.Module):
  """Pre-norm block: `x + attn(norm(x))`, then `x + mlp(norm(x))`."""

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.self_attn = LlamaAttention(config, rngs=rngs)
    self.mlp = LlamaMLP(config, rngs=rngs)
    self.input_layernorm = _rms_norm(config, rngs)
    self.post_attention_layernorm = _rms_norm(config, rngs)

  def __call__(
      self,
      x: jax.Array,
      cos: jax.Array,
      sin: jax.Array,
      bias: jax.Array,
      kv: tuple[jax.Array, jax.Array] | None = None,
      end: jax.Array | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """See `LlamaAttention.__call__`; returns `([B, T, D], kv)`."""
    attn, kv = self.self_attn(self.input_layernorm(x), cos, sin, bias, kv,
                              end)
    x = x + attn
    return x + self.mlp(self.post_attention_layernorm(x)), kv


def _stacked_layers(config: LlamaConfig, rngs: nnx.Rngs) -> LlamaDecoderLayer:
  """`num_layers` layers as one module whose leaves are `[L, ...]`."""

  @nnx.split_rngs(splits=config.num_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata=_LAYER_AXIS)
  def make(rngs: nnx.Rngs) -> LlamaDecoderLayer:
    return LlamaDecoderLayer(config, rngs=rngs)

  return make(rngs)


class LlamaModel(nnx.Module):
  """Embeddings, decoder layers and the final norm (HF `model`).

  Attributes:
    config: The `LlamaConfig`.
    embed_tokens: `nnx.Embed` `[V, D]`.
    layers: An `nnx.List` of `LlamaDecoderLayer` or, with
      `config.scan_layers`, one `LlamaDecoderLayer` with stacked leaves.
    norm: Final `nnx.RMSNorm`.
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embed_tokens = nnx.Embed(
        config.vocab_size,
        config.hidden_size,
        dtype=config.dtype,
        param_dtype=config.param_dtype,
        embedding_init=_normal(config, ("vocab", "embed")),
        rngs=rngs,
    )
    if config.scan_layers:
      self.layers = _stacked_layers(config, rngs)
    else:
      self.layers = nnx.List(
          [LlamaDecoderLayer(config, rngs=rngs)
           for _ in range(config.num_layers)]
      )
    self.norm = _rms_norm(config, rngs)

  def __call__(
      self,
      input_ids: Int[_AnyArray, "b t"],
      attention_mask: Shaped[_AnyArray, "b t"] | None = None,
      positions: Int[_AnyArray, "b t"] | None = None,
      cache: KVCache | None = None,
  ) -> tuple[Float[Array, "b t d"], KVCache | None]:
    """Final hidden states (after `norm`) and the updated cache.

    See `LlamaForCausalLM.__call__` for the arguments.
    """
    input_ids = jnp.asarray(input_ids)
    b, t = _check_inputs(input_ids, attention_mask, positions, cache)
    mask = (jnp.ones((b, t), bool) if attention_mask is None
            else jnp.asarray(attention_mask) != 0)
    if cache is None:
      end = jnp.zeros((), jnp.int32)
      key_mask = mask
    else:
      end = jnp.asarray(cache.end, jnp.int32)
      key_mask = jax.lax.dynamic_update_slice(
          cache.mask, mask, (jnp.zeros((), jnp.int32), end))
    query_slots = end + jnp.arange(t, dtype=jnp.int32)
    if positions is None:
      positions = jnp.broadcast_to(query_slots[None, :], (b, t))
    cos, sin = rotary_angles(positions, self.config.head_dim,
                             self.config.rope_theta)
    bias = attention_bias(key_mask, query_slots)
    x = self.embed_tokens(input_ids)
    kv = None if cache is None else (cache.k, cache.v)

    if self.config.scan_layers:
      graphdef, state = nnx.split(self.layers)
      _check_stacked(state, self.config.num_layers)
      x, kv = _run_stacked(graphdef, state, x, cos, sin, bias, kv, end)
    else:
      new_k, new_v = [], []
      for i, layer in enumerate(self.layers):
        x, layer_kv = layer(x, cos, sin, bias,
                            None if kv is None else (kv[0][i], kv[1][i]), end)
        if layer_kv is not None:
          new_k.append(layer_kv[0])
          new_v.append(layer_kv[1])
      kv = None if kv is None else (jnp.stack(new_k), jnp.stack(new_v))
    x = self.norm(x)
    if cache is not None:
      cache = KVCache(k=kv[0], v=kv[1], mask=key_mask, end=end + t)
    return x, cache


def _check_stacked(state: nnx.State, num_layers: int) -> None:
  """Raises unless every leaf of the stacked layers is `[L, ...]`."""
  bad = [
      jax.tree_util.keystr(path)
      for path, x in jax.tree_util.tree_leaves_with_path(state)
      if np.shape(x)[:1] != (num_layers,)
  ]
  if bad:
    raise ValueError(
        f"Stacked layers need a leading axis of size {num_layers} on every "
        f"leaf; these have none: {bad[:5]}. Modules added to the scan "
        "layout (e.g. by lowrank.adapters.inject) must be stacked too; "
        "use convert_layout(model, False) before injecting."
    )


@jax.jit(static_argnames=("graphdef",))
def _run_stacked(graphdef, state, x, cos, sin, bias, kv, end):
  """Runs stacked layers with `lax.scan` over their split state.

  This is what `nnx.scan` does, minus its trace-level check, so the model
  also runs inside a caller's `lax.scan` (as in `generate`). The `jit`
  (inlined when already tracing) caches the compiled loop for eager calls,
  which would otherwise retrace and recompile the scan every time.
  """

  def body(x, xs):
    layer_state, layer_kv = xs
    layer = nnx.merge(graphdef, layer_state)
    return layer(x, cos, sin, bias, layer_kv, end)

  return jax.lax.scan(body, x, (state, kv))


def _check_inputs(input_ids, attention_mask, positions, cache):
  """Validates shapes (and, outside jit, the cache capacity)."""
  if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
    raise ValueError(
        f"input_ids must be an int array [batch, length]; got shape "
        f"{input_ids.shape} dtype {input_ids.dtype}."
    )
  b, t = input_ids.shape
  for name, arr in (("attention_mask", attention_mask),
                    ("positions", positions)):
    if arr is not None and tuple(np.shape(arr)) != (b, t):
      raise ValueError(
          f"{name} must have the shape of input_ids {(b, t)}; got "
          f"{tuple(np.shape(arr))}."
      )
  if cache is not None:
    if cache.k.shape[1] != b:
      raise ValueError(
          f"Cache batch size {cache.k.shape[1]} != input batch size {b}."
      )
    if t > cache.max_len:
      raise ValueError(
          f"{t} tokens do not fit a cache of {cache.max_len} slots."
      )
    if not isinstance(cache.end, jax.core.Tracer):
      if int(cache.end) + t > cache.max_len:
        raise ValueError(
            f"Cache overflow: {int(cache.end)} slots used + {t} new tokens "
            f"> max_len {cache.max_len}."
        )
  return b, t


class LlamaForCausalLM(nnx.Module):
  """LLaMA decoder with a language-model head (HF `LlamaForCausalLM`).

  Build it inside `lowrank.sharding.use_mesh` (Flax NNX shards parameters
  eagerly from their logical axes). There is no dropout, so train and eval
  modes compute the same thing.

  Attributes:
    config: The `LlamaConfig`.
    model: `LlamaModel`.
    lm_head: `nnx.Linear` `[D, V]` without bias, or `None` when
      `config.tie_embeddings` (logits then use `model.embed_tokens`).
  """

  def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.model = LlamaModel(config, rngs=rngs)
    self.lm_head = nnx.data(None if config.tie_embeddings else _linear(
        config, config.hidden_size, config.vocab_size, ("embed", "vocab"),
        False, rngs))

  def __call__(
      self,
      input_ids: Int[_AnyArray, "b t"],
      attention_mask: Shaped[_AnyArray, "b t"] | None = None,
      positions: Int[_AnyArray, "b t"] | None = None,
      cache: KVCache | None = None,
  ) -> Float[Array, "b t v"] | tuple[Float[Array, "b t v"], KVCache]:
    """Next-token logits.

    Args:
      input_ids: Token ids `[B, T]`.
      attention_mask: `[B, T]`, nonzero for real tokens (default all ones).
        Padding tokens are hidden as keys; their own outputs are garbage.
      positions: Rotary positions `[B, T]` (default: slot indices, i.e.
        `arange(T)` plus `cache.end`). Use `positions_from_mask` for left
        padding.
      cache: A `KVCache` (from `init_cache`) to append to and attend over.

    Returns:
      Float32 logits `[B, T, V]`; with `cache`, `(logits, updated_cache)`.

    Raises:
      ValueError: On mis-shaped inputs or (outside jit) a cache that cannot
        hold `T` more tokens.
    """
    hidden, new_cache = self.model(input_ids, attention_mask, positions,
                                   cache)
    logits = self.logits(hidden)
    return logits if cache is None else (logits, new_cache)

  def logits(self, hidden: Float[Array, "b t d"]) -> Float[Array, "b t v"]:
    """Float32 logits from final hidden states (tied or untied head)."""
    if self.lm_head is None:
      out = self.model.embed_tokens.attend(hidden)
    else:
      out = self.lm_head(hidden)
    return out.astype(jnp.float32)

  def init_cache(
      self, batch: int, max_len: int, dtype: Any = None
  ) -> KVCache:
    """An empty `KVCache` for `batch` rows and `max_len` tokens.

    Args:
      batch: Batch size.
      max_len: Slots per row (prompt + generated tokens).
      dtype: Cache dtype (default: the compute, else parameter, dtype).

    Returns:
      The cache, with `end = 0` and no valid slots.

    Raises:
      ValueError: If `batch` or `max_len` is not positive.
    """
    if batch <= 0 or max_len <= 0:
      raise ValueError(
          f"batch and max_len must be positive; got {batch}, {max_len}."
      )
    c = self.config
    dtype = dtype or c.dtype or c.param_dtype
    shape = (c.num_layers, batch, max_len, c.num_kv_heads, c.head_dim)
    return KVCache(
        k=jnp.zeros(shape, dtype),
        v=jnp.zeros(shape, dtype),
        mask=jnp.zeros((batch, max_len), bool),
        end=jnp.zeros((), jnp.int32),
    )


LLaMA = LlamaForCausalLM  # The name for the model class.


# ----------------------------------------------------------------------------
# Loss and greedy decoding.


def next_token_loss(
    logits: Float[_AnyArray, "b t v"],
    input_ids: Int[_AnyArray, "b t"],
    attention_mask: Shaped[_AnyArray, "b t"] | None = None,
) -> Float[Array, ""]:
  """Mean cross-entropy of predicting `input_ids[:, 1:]` from `logits[:, :-1]`.

  Targets whose mask is zero (padding) are excluded from the mean.

  Args:
    logits: `[B, T, V]` from the model.
    input_ids: The model's input `[B, T]`.
    attention_mask: `[B, T]`, nonzero for real tokens (default all ones).

  Returns:
    The scalar float32 loss.
  """
  logits = jnp.asarray(logits, jnp.float32)[:, :-1]
  targets = jnp.asarray(input_ids)[:, 1:]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
  if attention_mask is None:
    return losses.mean()
  weights = (jnp.asarray(attention_mask)[:, 1:] != 0).astype(jnp.float32)
  return (losses * weights).sum() / jnp.maximum(weights.sum(), 1.0)


def _greedy(model, input_ids, attention_mask, max_new_tokens):
  """Greedy decoding; traced once per shape (see `generate`)."""
  b, p = input_ids.shape
  cache = model.init_cache(b, p + max_new_tokens)
  positions = positions_from_mask(attention_mask)
  logits, cache = model(input_ids, attention_mask, positions, cache)
  first_logits = logits[:, -1]
  token = jnp.argmax(first_logits, axis=-1).astype(input_ids.dtype)
  next_pos = positions[:, -1] + 1
  ones = jnp.ones((b, 1), attention_mask.dtype)

  def step(carry, _):
    token, pos, cache = carry
    logits, cache = model(token[:, None], ones, pos[:, None], cache)
    logits = logits[:, 0]
    new = jnp.argmax(logits, axis=-1).astype(token.dtype)
    return (new, pos + 1, cache), (new, logits)

  _, (tokens, step_logits) = jax.lax.scan(
      step, (token, next_pos, cache), None, length=max_new_tokens - 1)
  tokens = jnp.concatenate([token[:, None], tokens.T], axis=1)
  all_logits = jnp.concatenate(
      [first_logits[:, None], jnp.swapaxes(step_logits, 0, 1)], axis=1)
  return tokens, all_logits


@jax.jit(static_argnames=("graphdef", "max_new_tokens"))
def _greedy_jit(graphdef, state, input_ids, attention_mask, max_new_tokens):
  return _greedy(nnx.merge(graphdef, state), input_ids, attention_mask,
                 max_new_tokens)


def generate(
    model: LlamaForCausalLM,
    input_ids: Int[_AnyArray, "b p"],
    max_new_tokens: int,
    *,
    attention_mask: Shaped[_AnyArray, "b p"] | None = None,
    return_logits: bool = False,
) -> Int[Array, "b n"] | tuple[Int[Array, "b n"], Float[Array, "b n v"]]:
  """Greedy decoding with a KV cache, jit-compiled with static shapes.

  The prompt is prefilled in one call into a cache of `P + max_new_tokens`
  slots, then one token per step is decoded inside `lax.scan`. The whole
  loop is one jitted function of `(input_ids, attention_mask)`, compiled
  once per `(model graph, B, P, max_new_tokens)`. Prompts of different
  lengths must be left-padded; positions skip the padding
  (`positions_from_mask`), so a padded row decodes as it would alone.

  Args:
    model: The decoder.
    input_ids: Prompt ids `[B, P]`.
    max_new_tokens: Number of tokens to generate (static).
    attention_mask: `[B, P]`, nonzero for real tokens; padding must be on
      the left (default all ones).
    return_logits: Also return the float32 logits each token was chosen
      from.

  Returns:
    Generated ids `[B, max_new_tokens]` (the prompt is not included), and
    with `return_logits`, logits `[B, max_new_tokens, V]`.

  Raises:
    ValueError: If `max_new_tokens < 1`, or a row's last prompt token is
      padding (right padding), or shapes disagree.
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1; got {max_new_tokens}.")
  input_ids = jnp.asarray(input_ids)
  if attention_mask is None:
    attention_mask = jnp.ones(input_ids.shape, jnp.int32)
  attention_mask = jnp.asarray(attention_mask)
  _check_inputs(input_ids, attention_mask, None, None)
  if not isinstance(attention_mask, jax.core.Tracer):
    bad = np.flatnonzero(np.asarray(attention_mask)[:, -1] == 0)
    if bad.size:
      raise ValueError(
          f"generate needs left-padded prompts; rows {bad[:10].tolist()} "
          "end in padding."
      )
  graphdef, state = nnx.split(model)
  tokens, logits = _greedy_jit(graphdef, state, input_ids, attention_mask,
                               max_new_tokens)
  return (tokens, logits) if return_logits else tokens


# ----------------------------------------------------------------------------
# Parameter naming (HF names, per layer) and layout conversion.


@dataclasses.dataclass(frozen=True)
class _Entry:
  """One HF tensor: where it lives in the NNX model.

  Attributes:
    var: The `nnx.Param`.
    path: Its NNX graph path.
    layer: Index into the leading `[L]` axis of a stacked leaf, or `None`.
    transpose: Whether HF stores it transposed (Linear kernels).
  """

  var: nnx.Variable
  path: tuple[Any, ...]
  layer: int | None
  transpose: bool


def _entries(model: LlamaForCausalLM) -> dict[str, _Entry]:
  """HF state-dict name -> `_Entry`, for every `nnx.Param` of `model`."""
  out: dict[str, _Entry] = {}
  stacked = model.config.scan_layers
  for path, node in nnx.iter_graph(model):
    if not isinstance(node, nnx.Param):
      continue
    path = tuple(path)
    if path[-1] not in hf_io.PARAM_SUFFIX:
      raise ValueError(f"No HF name for parameter path {path}.")
    parts = [str(p) for p in path[:-1]]
    parts.append(hf_io.PARAM_SUFFIX[path[-1]])
    transpose = path[-1] == "kernel"
    if stacked and path[:2] == ("model", "layers"):
      for i in range(model.config.num_layers):
        name = ".".join(parts[:2] + [str(i)] + parts[2:])
        out[name] = _Entry(node, path, i, transpose)
    else:
      out[".".join(parts)] = _Entry(node, path, None, transpose)
  return out


def hf_param_names(model: LlamaForCausalLM) -> dict[str, tuple[Any, ...]]:
  """HF state-dict name of every parameter -> its NNX path.

  With stacked layers, the `L` names `model.layers.<i>.X` share one path
  (the `[L, ...]` leaf).
  """
  return {name: e.path for name, e in _entries(model).items()}


def _entry_value(e: _Entry) -> jax.Array:
  value = e.var.get_value()
  return value if e.layer is None else value[e.layer]


def _entry_shape(e: _Entry) -> tuple[int, ...]:
  """Shape of the tensor in HF layout."""
  shape = tuple(e.var.get_value().shape)
  shape = shape if e.layer is None else shape[1:]
  return shape[::-1] if e.transpose else shape


def _build_from(
    config: LlamaConfig,
    get: Callable[[str, _Entry], Any],
    mesh: jax.sharding.Mesh | None,
    rules: Any,
) -> LlamaForCausalLM:
  """Builds a model without random init; `get(name, entry)` gives values.

  `get` returns each tensor in Flax layout (already transposed), per layer
  for stacked leaves; values are cast to `config.param_dtype` and placed
  with the sharding of the parameter's logical axes (`mesh=None`: ordinary
  arrays on the default device, placed on no mesh).
  """
  with sharding.use_mesh(mesh, rules):
    model = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
  groups: dict[tuple[Any, ...], list[tuple[str, _Entry]]] = {}
  for name, e in _entries(model).items():
    groups.setdefault(e.path, []).append((name, e))
  for items in groups.values():
    var = items[0][1].var
    if items[0][1].layer is None:
      value = get(*items[0])
    else:
      items.sort(key=lambda item: item[1].layer)
      values = [get(name, e) for name, e in items]
      numpy = all(isinstance(v, np.ndarray) for v in values)
      value = np.stack(values) if numpy else jnp.stack(values)
    hf_io.set_param(var, value, mesh, rules, config.param_dtype)
  hf_io.check_initialized(model)
  return model


def convert_layout(
    model: LlamaForCausalLM, scan_layers: bool
) -> LlamaForCausalLM:
  """The same weights in the other layer layout (list <-> stacked).

  The result is a new model on the mesh of `model`'s parameters; stacking
  or slicing copies the layer weights. Returns `model` itself if it already
  has the requested layout.

  Args:
    model: The model.
    scan_layers: Target layout (`True`: stacked `[L, ...]` leaves).

  Returns:
    The model in the requested layout.
  """
  if model.config.scan_layers == scan_layers:
    return model
  source = _entries(model)
  mesh, rules = sharding.current_mesh_and_rules(model)
  config = model.config.replace(scan_layers=scan_layers)
  return _build_from(
      config, lambda name, e: _entry_value(source[name]), mesh, rules)


# ----------------------------------------------------------------------------
# Hugging Face checkpoints.


def load_pretrained(
    path: PathLike,
    *,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    scan_layers: bool = False,
) -> LlamaForCausalLM:
  """Loads a local HF LLaMA checkpoint directory, strictly.

  Reads `config.json` and `model.safetensors` (or the shards listed in
  `model.safetensors.index.json`) with safetensors, one tensor at a time;
  no torch, no pickle, no code execution. Torch `[out, in]` Linear weights
  become Flax `[in, out]` kernels; with `scan_layers` the per-layer tensors
  are stacked. A tied checkpoint may carry `lm_head.weight` only if it
  equals `model.embed_tokens.weight`.

  Under an active mesh (inside `sharding.use_mesh(...)`) each parameter is
  placed with the sharding of its logical axes; with none, nothing is placed
  on a mesh (ordinary arrays on the default device, so a plain `nnx.jit`
  train step with an `nnx.Optimizer` compiles once).

  Args:
    path: The checkpoint directory.
    dtype: Compute dtype (`None`: float32).
    param_dtype: Parameter dtype (checkpoint values are cast to it).
    scan_layers: Build the stacked-layer layout.

  Returns:
    The model.

  Raises:
    FileNotFoundError: If the directory, `config.json`, the weights or a
      shard is missing (the message names the file).
    ValueError: On an invalid config, a missing or unexpected tensor, a
      mis-shaped or non-floating tensor (the message names the tensor).
  """
  path = hf_io.checkpoint_dir(path)
  config = LlamaConfig.from_json_file(
      path / hf_io.CONFIG_NAME, dtype=dtype, param_dtype=param_dtype,
      scan_layers=scan_layers)
  tensors = hf_io.open_tensors(path)
  names = {n for n in tensors if not n.endswith(_IGNORED_SUFFIXES)}

  mesh, rules = sharding.current_mesh_and_rules()
  with sharding.use_mesh(mesh, rules):
    abstract = nnx.eval_shape(
        lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
  expected = _entries(abstract)
  if config.tie_embeddings and "lm_head.weight" in names:
    head = tensors["lm_head.weight"]
    embed = (tensors["model.embed_tokens.weight"]
             if "model.embed_tokens.weight" in tensors else None)
    if embed is None or head.shape != embed.shape or not np.array_equal(
        head, embed):
      raise ValueError(
          f"{path}: lm_head.weight differs from model.embed_tokens.weight, "
          "but the config ties the embeddings (tie_word_embeddings=true).")
    names.discard("lm_head.weight")
  hf_io.check_names(path, names, expected, "its LLaMA config")
  for name, e in expected.items():
    tensors.check(name, _entry_shape(e))

  def get(name: str, e: _Entry) -> np.ndarray:
    arr = tensors.read(name, param_dtype)
    return arr.T if e.transpose else arr

  return _build_from(config, get, mesh, rules)


def save_pretrained(
    model: LlamaForCausalLM,
    path: PathLike,
    *,
    max_shard_bytes: int | None = None,
) -> None:
  """Writes `model` as a HF LLaMA checkpoint (`config.json` + safetensors).

  Tensors use HF names and layouts (kernels transposed to `[out, in]`,
  stacked layers split per layer) in the parameter dtype; a tied model has
  no `lm_head.weight` (as HF writes it). The files carry the
  `{"format": "pt"}` metadata so `transformers` loads them too.

  Args:
    model: The model (either layout).
    path: Output directory (created if needed; files are overwritten).
    max_shard_bytes: If set and the weights exceed it, split them into
      `model-0000i-of-0000n.safetensors` files of at most this many bytes
      (a tensor larger than that gets its own file) plus
      `model.safetensors.index.json`.

  Raises:
    ValueError: If `max_shard_bytes` is not positive.
  """
  if max_shard_bytes is not None and max_shard_bytes <= 0:
    raise ValueError(
        f"max_shard_bytes must be positive; got {max_shard_bytes}.")
  path = pathlib.Path(path)
  path.mkdir(parents=True, exist_ok=True)
  tensors = {}
  for name, e in _entries(model).items():
    arr = np.asarray(jax.device_get(_entry_value(e)))
    tensors[name] = np.ascontiguousarray(arr.T if e.transpose else arr)
  total = sum(a.nbytes for a in tensors.values())
  shards: list[dict[str, np.ndarray]] = [{}]
  if max_shard_bytes is not None and total > max_shard_bytes:
    size = 0
    for name in sorted(tensors):
      nbytes = tensors[name].nbytes
      if shards[-1] and size + nbytes > max_shard_bytes:
        shards.append({})
        size = 0
      shards[-1][name] = tensors[name]
      size += nbytes
  else:
    shards[0] = tensors
  for stale in [path / WEIGHTS_NAME, path / WEIGHTS_INDEX_NAME,
                *path.glob("model-*-of-*.safetensors")]:
    stale.unlink(missing_ok=True)
  metadata = {"format": "pt"}
  if len(shards) == 1:
    safetensors_numpy.save_file(tensors, str(path / WEIGHTS_NAME), metadata)
  else:
    weight_map = {}
    for i, shard in enumerate(shards):
      fname = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
      safetensors_numpy.save_file(shard, str(path / fname), metadata)
      weight_map.update({name: fname for name in shard})
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (path / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2))
  config = model.config.to_dict()
  (path / "config.json").write_text(json.dumps(config, indent=2))
