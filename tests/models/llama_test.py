"""Tests for `lowrank.models.llama` (tiny configs; no torch needed).

Parity with `transformers.LlamaForCausalLM` is in `llama_oracle_test.py`.
"""

import json
import pathlib

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors import numpy as safetensors_numpy

from lowrank import adapters
from lowrank import optim
from lowrank import sharding
from lowrank.models import llama

from tests import testing

P = jax.sharding.PartitionSpec


def _config(**overrides) -> llama.LlamaConfig:
  # Large init so that a mistake is not hidden by near-uniform logits.
  return llama.LlamaConfig.tiny(**({"initializer_range": 0.2} | overrides))


def _mesh():
  return sharding.use_mesh(testing.one_device_mesh())


def _model(seed: int = 0, **overrides) -> llama.LlamaForCausalLM:
  """Random norm scales too, so a missed norm shows.

  The scales are placed on the mesh, as the other parameters are: a jitted
  call returns them so, and a plain array in would compile every program
  twice (for the first call and for the next).
  """
  model = testing.tiny_llama_lm(seed, norm_seed=seed + 100, **overrides)
  replicated = jax.sharding.NamedSharding(testing.one_device_mesh(), P())
  for path, var in nnx.iter_graph(model):
    if isinstance(var, nnx.Param) and path[-1] == "scale":
      var.set_value(jax.device_put(var.get_value(), replicated))
  return model


@nnx.jit
def _jit_logits(model, ids, mask, positions):
  return model(ids, attention_mask=mask, positions=positions)


def _logits(model, ids, mask=None, positions=None) -> np.ndarray:
  """Jitted forward (one compilation per config and shape, not per op).

  Compiling is most of this file's cost, so the tests share programs: ids
  are `[2, 8]` wherever the test allows, and a mask comes with positions
  (`_ARANGE` when the default ones are meant).
  """
  return np.asarray(_jit_logits(model, ids, mask, positions))


# The default positions of a `[2, 8]` batch without a cache.
_ARANGE = np.broadcast_to(np.arange(8, dtype=np.int32), (2, 8))


def _ids(shape, seed=0, vocab=256):
  # numpy, not `jax.random`: each new shape would be a compilation.
  return np.random.default_rng(seed).integers(0, vocab, shape, np.int32)


class ConfigTest(parameterized.TestCase):

  def test_presets_match_galore_configs(self):
    c60, c130 = llama.CONFIGS["60m"], llama.CONFIGS["130m"]
    self.assertEqual(
        (c60.hidden_size, c60.num_layers, c60.num_heads, c60.intermediate_size,
         c60.vocab_size, c60.head_dim, c60.num_kv_heads),
        (512, 8, 8, 1376, 32000, 64, 8))
    self.assertEqual(
        (c130.hidden_size, c130.num_layers, c130.num_heads,
         c130.intermediate_size, c130.vocab_size),
        (768, 12, 12, 2048, 32000))
    self.assertEqual(llama.CONFIGS["tiny"], llama.LlamaConfig.tiny())
    self.assertIs(llama.LLaMA, llama.LlamaForCausalLM)

  @parameterized.parameters(("60m", 58_073_600), ("130m", 134_105_856))
  def test_parameter_counts(self, name, expected):
    # Untied embeddings, no biases: 2 V D + L (4 D^2 + 3 D F + 2 D) + D.
    with _mesh():
      abstract = nnx.eval_shape(lambda: llama.LLaMA(
          llama.CONFIGS[name].replace(scan_layers=True), rngs=nnx.Rngs(0)))
    count = sum(x.size for x in jax.tree.leaves(nnx.state(abstract)))
    self.assertEqual(count, expected)

  def test_dict_round_trip_and_hf_spellings(self):
    c = _config(tie_embeddings=True, rope_theta=123.0, attention_bias=True)
    self.assertEqual(llama.LlamaConfig.from_dict(c.to_dict()), c)
    galore_json = {  # GaLore's configs/llama_60m.json (transformers 4.28).
        "architectures": ["LLaMAForCausalLM"], "hidden_act": "silu",
        "hidden_size": 512, "intermediate_size": 1376,
        "max_sequence_length": 1024, "model_type": "llama",
        "num_attention_heads": 8, "num_hidden_layers": 8,
        "rms_norm_eps": 1e-06, "vocab_size": 32000, "pad_token_id": -1,
    }
    self.assertEqual(llama.LlamaConfig.from_dict(galore_json),
                     llama.CONFIGS["60m"])
    v5 = dict(galore_json, rope_parameters={"rope_type": "default",
                                            "rope_theta": 5e5})
    self.assertEqual(llama.LlamaConfig.from_dict(v5).rope_theta, 5e5)

  @parameterized.named_parameters(
      ("activation", dict(hidden_act="gelu"), "silu"),
      ("rope_scaling", dict(rope_scaling={"type": "linear", "factor": 2.0}),
       "Rotary scaling"),
      ("model_type", dict(model_type="mistral"), "llama"),
      ("missing", dict(hidden_size=None), "hidden_size"),
      ("gqa", dict(num_key_value_heads=3), "must divide"),
  )
  def test_from_dict_rejects(self, change, message):
    d = _config().to_dict()
    d.update(change)
    if d.get("hidden_size") is None:
      del d["hidden_size"]
    with self.assertRaisesRegex(ValueError, message):
      llama.LlamaConfig.from_dict(d)

  def test_invalid_sizes(self):
    with self.assertRaisesRegex(ValueError, "num_layers must be a positive"):
      _config(num_layers=0)
    with self.assertRaisesRegex(ValueError, "divisible by num_heads"):
      _config(hidden_size=66)


class ForwardTest(parameterized.TestCase):

  def test_module_paths_are_hf_names(self):
    model = _model()
    names = set(llama.hf_param_names(model))
    for name in ("model.embed_tokens.weight", "model.norm.weight",
                 "lm_head.weight",
                 "model.layers.1.self_attn.k_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight",
                 "model.layers.1.post_attention_layernorm.weight"):
      self.assertIn(name, names)
    self.assertLen(names, 3 + 2 * 9)
    kernel = model.model.layers[0].self_attn.k_proj.kernel
    self.assertEqual(kernel.get_value().shape, (64, 2 * 16))  # GQA: 2 heads.
    self.assertEqual(kernel.get_metadata()["out_sharding"],
                     ("embed", "heads"))

  @parameterized.parameters(False, True)
  def test_causal_mask(self, scan_layers):
    model = _model(scan_layers=scan_layers)
    ids = _ids((2, 8))
    changed = ids.copy()
    changed[:, 5] = (changed[:, 5] + 1) % 256
    a, b = _logits(model, ids), _logits(model, changed)
    np.testing.assert_array_equal(a[:, :5], b[:, :5])
    self.assertTrue(np.all(np.abs(a[:, 5:] - b[:, 5:]).max(-1) > 1e-3))

  @parameterized.parameters(False, True)
  def test_left_padding_matches_unpadded(self, scan_layers):
    model = _model(scan_layers=scan_layers)
    ids = _ids((2, 8), seed=1)
    # Row 0 unpadded: its 5 tokens first. The 3 after them cannot change
    # their logits (causal, see test_causal_mask); the shape is that of the
    # other calls, so no compilation of its own.
    unpadded = np.concatenate([ids[:, 3:], ids[:, :3]], axis=1)
    alone = _logits(model, unpadded)[0, :5]
    padded = ids.copy()
    mask = np.ones_like(ids)
    mask[0, :3] = 0  # Row 0 is row 0 of `alone`, left-padded by 3.
    positions = llama.positions_from_mask(mask)
    out = _logits(model, padded, mask, positions)[0]
    np.testing.assert_allclose(out[3:], alone, atol=1e-5, rtol=1e-5)
    # Without the mask (all ones) the pads are attended to, and the result
    # changes.
    unmasked = _logits(model, padded, np.ones_like(mask), positions)[0]
    self.assertGreater(np.abs(unmasked[3:] - alone).max(), 1e-3)

  def test_padding_in_the_middle_is_ignored(self):
    model = _model()
    ids = _ids((2, 8), seed=3)
    mask = np.ones((2, 8), np.int32)
    mask[0, 2:4] = 0
    other = ids.copy()
    other[0, 2:4] = (other[0, 2:4] + 7) % 256
    a = _logits(model, ids, mask, _ARANGE)
    b = _logits(model, other, mask, _ARANGE)
    keep = mask[0].astype(bool)
    np.testing.assert_array_equal(a[0, keep], b[0, keep])
    np.testing.assert_array_equal(a[1], b[1])

  def test_gqa_equals_mha_with_repeated_kv(self):
    gqa = _model(seed=5)
    mha = _model(seed=6, num_kv_heads=4)
    groups, hd = 2, 16
    for g_layer, m_layer in zip(gqa.model.layers, mha.model.layers):
      for name in ("k_proj", "v_proj"):
        kernel = getattr(g_layer.self_attn, name).kernel.get_value()
        d = kernel.shape[0]
        # Query head h uses KV head h // groups (HF's repeat_kv).
        repeated = jnp.repeat(kernel.reshape(d, 2, hd), groups, axis=1)
        getattr(m_layer.self_attn, name).kernel.set_value(
            repeated.reshape(d, 4 * hd))
    others = nnx.Not(nnx.Any(nnx.PathContains("k_proj"),
                             nnx.PathContains("v_proj")))
    nnx.update(mha, nnx.state(gqa, others))
    ids = _ids((2, 8), seed=7)
    np.testing.assert_allclose(_logits(mha, ids), _logits(gqa, ids),
                               atol=1e-5, rtol=1e-5)

  def test_scan_and_list_layouts_agree(self):
    listed = _model(seed=8)
    stacked = llama.convert_layout(listed, scan_layers=True)
    self.assertTrue(stacked.config.scan_layers)
    q = stacked.model.layers.self_attn.q_proj.kernel
    self.assertEqual(q.get_value().shape, (2, 64, 64))
    self.assertEqual(q.get_metadata()["out_sharding"],
                     ("layers", "embed", "heads"))
    np.testing.assert_array_equal(
        q.get_value()[1],
        listed.model.layers[1].self_attn.q_proj.kernel.get_value())
    ids = _ids((2, 8), seed=9)
    # Equal up to float32 rounding (`lax.scan` vs unrolled fusion).
    np.testing.assert_allclose(_logits(stacked, ids), _logits(listed, ids),
                               atol=1e-5, rtol=1e-5)
    back = llama.convert_layout(stacked, scan_layers=False)
    for a, b in zip(jax.tree.leaves(nnx.state(back)),
                    jax.tree.leaves(nnx.state(listed))):
      np.testing.assert_array_equal(a, b)
    self.assertIs(llama.convert_layout(listed, False), listed)

  def test_tied_embeddings(self):
    model = _model(tie_embeddings=True)
    self.assertIsNone(model.lm_head)
    self.assertNotIn("lm_head.weight", llama.hf_param_names(model))
    ids = _ids((2, 8))
    # The same weights untied, with the table as the head's kernel: the
    # final hidden states times the table's transpose (an untied model's
    # program, compiled for the other tests).
    untied = _model()
    nnx.update(untied, nnx.state(model))
    kernel = untied.lm_head.kernel
    table = model.model.embed_tokens.embedding.get_value()
    kernel.set_value(jax.device_put(np.asarray(table).T,
                                    kernel.get_value().sharding))
    np.testing.assert_allclose(_logits(model, ids), _logits(untied, ids),
                               atol=1e-5)

  def test_rotary_is_rotate_half(self):
    # Pair (i, i + d/2) rotates by pos * theta^(-2i/d).
    x = np.random.default_rng(0).normal(size=(1, 1, 1, 8)).astype(np.float32)
    rotate = jax.jit(lambda x, pos: llama.apply_rotary(
        x, *llama.rotary_angles(pos, 8, 100.0)))  # One compilation, not ~20.
    out = np.asarray(rotate(x, np.array([[3]])))[0, 0, 0]
    x = x[0, 0, 0]
    for i in range(4):
      angle = 3 * 100.0 ** (-2 * i / 8)
      c, s = np.cos(angle), np.sin(angle)
      np.testing.assert_allclose(
          out[[i, i + 4]],
          [c * x[i] - s * x[i + 4], s * x[i] + c * x[i + 4]], atol=1e-5)

  def test_input_validation(self):
    model = _model(scan_layers=True)  # Eager calls of it are jit-cached.
    # ValueError from the model; jaxtyping's TypeError when its hook runs.
    with self.assertRaisesRegex((ValueError, TypeError), "attention_mask"):
      model(_ids((2, 5)), attention_mask=np.ones((2, 4), np.int32))
    with self.assertRaisesRegex((ValueError, TypeError), "input_ids"):
      model(np.zeros((2, 5), np.float32))


class DecodingTest(parameterized.TestCase):

  def test_chunked_prefill_equals_full_forward(self):
    model = _model(seed=10, scan_layers=True)
    ids = _ids((2, 8), seed=10)
    full = _logits(model, ids)
    # Jitted: eager, each op of the cache update is a compilation.
    chunk = nnx.jit(lambda m, ids, cache: m(ids, cache=cache))
    # On the mesh, as the returned cache is: one compilation, not two.
    cache = jax.device_put(model.init_cache(2, 8), jax.sharding.NamedSharding(
        testing.one_device_mesh(), P()))
    first, cache = chunk(model, ids[:, :4], cache)
    second, cache = chunk(model, ids[:, 4:], cache)
    self.assertEqual(int(cache.end), 8)
    np.testing.assert_allclose(
        np.concatenate([first, second], axis=1), full, atol=1e-5, rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "Cache overflow"):
      model(ids[:, :4], cache=cache)  # Eager: checked outside jit only.

  @parameterized.parameters(False, True)
  def test_cached_greedy_equals_recomputing(self, scan_layers):
    model = _model(seed=11, scan_layers=scan_layers)
    prompt = _ids((2, 4), seed=11)
    mask = np.ones((2, 4), np.int32)
    mask[1, :2] = 0  # Left-padded second row.
    tokens, logits = llama.generate(model, prompt, 4, attention_mask=mask,
                                    return_logits=True)
    self.assertEqual(tokens.shape, (2, 4))
    # Reference: the full forward over the sequence so far at every step,
    # without a cache. One fixed shape, [2, 8], that of the other tests (so
    # no compilation): the not yet generated tail is masked, and causality
    # hides it anyway.
    seq = np.concatenate([prompt, np.zeros((2, 4), np.int32)], axis=1)
    seq_mask = np.concatenate([mask, np.zeros((2, 4), np.int32)], axis=1)
    for step in range(4):
      last = 4 + step - 1
      ref = _logits(model, seq, seq_mask,
                    llama.positions_from_mask(seq_mask))[:, last]
      np.testing.assert_allclose(logits[:, step], ref, atol=1e-4, rtol=1e-4)
      nxt = ref.argmax(-1).astype(np.int32)
      np.testing.assert_array_equal(tokens[:, step], nxt)
      seq[:, last + 1] = nxt
      seq_mask[:, last + 1] = 1

  def test_generate_rejects_right_padding(self):
    model = _model()
    mask = np.array([[1, 1, 0]], np.int32)
    with self.assertRaisesRegex(ValueError, "left-padded"):
      llama.generate(model, _ids((1, 3)), 2, attention_mask=mask)
    with self.assertRaisesRegex(ValueError, "max_new_tokens"):
      llama.generate(model, _ids((1, 3)), 0)


class CheckpointTest(parameterized.TestCase):

  @parameterized.product(scan_save=(False, True), scan_load=(False, True),
                         tie=(False, True))
  def test_save_load_identical_logits(self, scan_save, scan_load, tie):
    model = _model(seed=12, scan_layers=scan_save, tie_embeddings=tie)
    path = pathlib.Path(self.create_tempdir().full_path)
    llama.save_pretrained(model, path)
    with _mesh():
      loaded = llama.load_pretrained(path, scan_layers=scan_load)
    self.assertEqual(loaded.config, model.config.replace(scan_layers=scan_load))
    ids = _ids((2, 8), seed=12)
    if scan_save == scan_load:  # Same weights, same program: bitwise.
      np.testing.assert_array_equal(_logits(loaded, ids), _logits(model, ids))
    else:
      np.testing.assert_allclose(_logits(loaded, ids), _logits(model, ids),
                                 atol=1e-5, rtol=1e-5)
    tensors = safetensors_numpy.load_file(str(path / llama.WEIGHTS_NAME))
    self.assertEqual(tensors["model.layers.1.mlp.down_proj.weight"].shape,
                     (64, 128))  # Torch layout [out, in].
    self.assertEqual("lm_head.weight" in tensors, not tie)

  def test_sharded_save_and_load(self):
    model = _model(seed=13)
    path = pathlib.Path(self.create_tempdir().full_path)
    llama.save_pretrained(model, path, max_shard_bytes=40_000)
    index = json.loads((path / llama.WEIGHTS_INDEX_NAME).read_text())
    shards = sorted(set(index["weight_map"].values()))
    self.assertGreater(len(shards), 2)
    self.assertFalse((path / llama.WEIGHTS_NAME).exists())
    with _mesh():
      loaded = llama.load_pretrained(path)
    ids = _ids((2, 8))
    np.testing.assert_array_equal(_logits(loaded, ids), _logits(model, ids))
    (path / shards[-1]).unlink()
    with self.assertRaisesRegex(FileNotFoundError, shards[-1]):
      llama.load_pretrained(path)

  def _edit_checkpoint(self, edit):
    path = pathlib.Path(self.create_tempdir().full_path)
    llama.save_pretrained(_model(seed=14), path)
    file = str(path / llama.WEIGHTS_NAME)
    tensors = safetensors_numpy.load_file(file)
    edit(tensors)
    safetensors_numpy.save_file(tensors, file)
    return path

  def test_errors_name_the_tensor(self):
    path = self._edit_checkpoint(
        lambda t: t.pop("model.layers.1.self_attn.o_proj.weight"))
    with self.assertRaisesRegex(
        ValueError, r"missing tensors: model\.layers\.1\.self_attn\.o_proj"):
      llama.load_pretrained(path)

    path = self._edit_checkpoint(
        lambda t: t.update({"model.layers.0.extra.weight": np.zeros(3)}))
    with self.assertRaisesRegex(
        ValueError, r"unexpected tensors: model\.layers\.0\.extra\.weight"):
      llama.load_pretrained(path)

    def transpose(t):
      name = "model.layers.0.mlp.up_proj.weight"
      t[name] = np.ascontiguousarray(t[name].T)

    path = self._edit_checkpoint(transpose)
    with self.assertRaisesRegex(
        ValueError, r"model\.layers\.0\.mlp\.up_proj\.weight: expected shape "
        r"\(128, 64\), found \(64, 128\)"):
      llama.load_pretrained(path)

    def to_int(t):
      t["model.norm.weight"] = t["model.norm.weight"].astype(np.int32)

    path = self._edit_checkpoint(to_int)
    with self.assertRaisesRegex(ValueError, r"model\.norm\.weight: expected "
                                "a floating"):
      llama.load_pretrained(path)

  def test_buffers_ignored_and_tied_head_checked(self):
    def add_buffer(t):
      t["model.layers.0.self_attn.rotary_emb.inv_freq"] = np.ones(8)
    with _mesh():
      llama.load_pretrained(self._edit_checkpoint(add_buffer))

    path = pathlib.Path(self.create_tempdir().full_path)
    llama.save_pretrained(_model(seed=15), path)
    config = json.loads((path / "config.json").read_text())
    config["tie_word_embeddings"] = True
    (path / "config.json").write_text(json.dumps(config))
    with self.assertRaisesRegex(ValueError, "lm_head.weight differs"):
      llama.load_pretrained(path)

  def test_missing_files(self):
    path = pathlib.Path(self.create_tempdir().full_path)
    with self.assertRaisesRegex(FileNotFoundError, "config.json"):
      llama.load_pretrained(path)
    (path / "config.json").write_text(json.dumps(_config().to_dict()))
    (path / "pytorch_model.bin").write_bytes(b"")
    with self.assertRaisesRegex(FileNotFoundError, "never loaded"):
      llama.load_pretrained(path)


class TrainingTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("adamw_list", False, "adamw"), ("galore_scan", True, "galore"))
  def test_loss_decreases(self, scan_layers, opt):
    model = _model(seed=16, scan_layers=scan_layers, initializer_range=0.02)
    if opt == "adamw":
      tx = optax.adamw(3e-3)
    else:  # Per-layer projection of the stacked [L, m, n] leaves, read
      # from the model's `layers` logical axis (no regex, no ndim guess).
      tx = optim.galore_adamw(1e-2, rank=8, refresh_every=4, project=r"layers",
                              stacked_axes=optim.stacked_axes_from(model))
    graphdef, params = nnx.split(model)
    params = nnx.as_pure(params)  # Plain arrays, as optax expects.
    opt_state = tx.init(params)
    ids = _ids((4, 16), seed=16, vocab=32)  # A small vocabulary to learn.
    mask = np.ones_like(ids)
    mask[0, 12:] = 0

    def step(carry, _):
      params, opt_state = carry

      def loss_fn(params):
        logits = nnx.merge(graphdef, params)(ids, attention_mask=mask)
        return llama.next_token_loss(logits, ids, mask)

      loss, grads = jax.value_and_grad(loss_fn)(params)
      updates, opt_state = tx.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss

    # The 12 steps as one program: one compilation (a jitted step compiled
    # twice, its outputs being placed on the mesh and its inputs not).
    train = jax.jit(lambda carry: jax.lax.scan(step, carry, length=12))
    (params, opt_state), losses = train((params, opt_state))
    losses = [float(x) for x in losses]
    self.assertLess(losses[-1], 0.8 * losses[0], losses)
    if scan_layers:  # Low-rank moments per layer: [L, r, n] for q_proj.
      q_mu = opt_state[0].inner_state.mu["model"]["layers"]["self_attn"][
          "q_proj"]["kernel"]
      self.assertEqual(q_mu.shape, (2, 8, 64))

  def test_next_token_loss_masks_targets(self):
    logits = np.random.default_rng(0).normal(size=(1, 4, 5))
    ids = np.array([[1, 2, 3, 4]])
    # Cross-entropy in numpy: log-sum-exp minus the target's logit.
    lse = np.log(np.exp(logits[0, :-1]).sum(-1))
    full = lse - logits[0, np.arange(3), ids[0, 1:]]
    # Jitted: one compilation rather than one per op.
    masked = jax.jit(llama.next_token_loss)(
        logits.astype(np.float32), ids, np.array([[1, 1, 1, 0]]))
    np.testing.assert_allclose(masked, full[:2].mean(), rtol=1e-6)

  def test_lora_injection_by_hf_path(self):
    model = _model(seed=17)
    ids = _ids((2, 8))
    before = _logits(model, ids)
    adapters.inject(model, targets=["q_proj", "v_proj"], rank=4)
    self.assertEqual(
        sorted(adapters.adapter_modules(model))[:2],
        ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"])
    np.testing.assert_allclose(_logits(model, ids), before, atol=1e-6)


class ShardingTest(absltest.TestCase):

  def test_fsdp_tensor_sharding(self):
    mesh = sharding.make_mesh([("data", 2), ("fsdp", 2), ("tensor", 2)])
    config = _config(scan_layers=True)
    with sharding.use_mesh(mesh):
      model = llama.LlamaForCausalLM(config, rngs=nnx.Rngs(18))
    specs = sharding.state_shardings(nnx.state(model), mesh)
    layers = specs["model"]["layers"]
    self.assertEqual(layers["self_attn"]["q_proj"]["kernel"].spec,
                     P(None, "fsdp", "tensor"))
    self.assertEqual(layers["mlp"]["down_proj"]["kernel"].spec,
                     P(None, "tensor", "fsdp"))
    self.assertEqual(specs["model"]["embed_tokens"]["embedding"].spec,
                     P("tensor", "fsdp"))
    q = model.model.layers.self_attn.q_proj.kernel.get_value()
    self.assertEqual(q.sharding.spec, P(None, "fsdp", "tensor"))
    ids = _ids((4, 8), seed=18)
    sharded = np.asarray(nnx.jit(lambda m, x: m(x))(model, ids))
    # Same weights on one device give the same logits (rows are
    # independent; two [2, 8] halves reuse the other tests' program).
    single = _model(seed=19, scan_layers=True)
    self.assertEqual(single.config, config)
    # Placed as `single`'s own weights are, so no compilation of its own.
    nnx.update(single, jax.tree.map(
        lambda x, like: jax.device_put(x, like.sharding),
        jax.device_get(nnx.state(model)), nnx.state(single)))
    np.testing.assert_allclose(
        sharded, np.concatenate([_logits(single, ids[:2]),
                                 _logits(single, ids[2:])]),
        atol=1e-5, rtol=1e-5)


if __name__ == "__main__":
  absltest.main()
