"""Tests for lowrank.retrieval.biencoder and the bi-encoder loss options."""

import os
import shutil
import tempfile

from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
from safetensors import numpy as safetensors_numpy

from lowrank import adapters
from lowrank import assets
from lowrank import sharding
from lowrank.models import bert
from lowrank.retrieval import biencoder
from lowrank.retrieval import colbert
from lowrank.retrieval import losses
from lowrank.retrieval import search


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _same_side_reference(q, d, scale, symmetric):
  """Direct loop over GTE's per-direction partition functions."""
  b, n = q.shape[0], d.shape[0]
  e = lambda x, y: np.exp(scale * float(x @ y))
  terms = []
  for i in range(b):
    z = sum(e(q[i], d[j]) for j in range(n))
    z += sum(e(q[i], q[j]) for j in range(b) if j != i)
    terms.append(-np.log(e(q[i], d[i]) / z))
  loss = np.mean(terms)
  if not symmetric:
    return loss
  terms = []
  for i in range(b):
    z = sum(e(d[i], q[j]) for j in range(b))
    z += sum(e(d[i], d[j]) for j in range(n) if j != i)
    terms.append(-np.log(e(d[i], q[i]) / z))
  return 0.5 * (loss + np.mean(terms))


class SameSideLossTest(absltest.TestCase):

  def test_matches_loop_reference(self):
    rng = np.random.default_rng(0)
    q = _unit(rng.normal(size=(5, 8)))
    d = _unit(rng.normal(size=(8, 8)))  # 5 positives + 3 hard negatives.
    for symmetric in (False, True):
      got = losses.in_batch_softmax(jnp.asarray(q), jnp.asarray(d), 7.0,
                                    symmetric=symmetric, same_side=True)
      np.testing.assert_allclose(
          got, _same_side_reference(q, d, 7.0, symmetric), rtol=1e-5)

  def test_adds_to_the_plain_loss_and_has_finite_gradients(self):
    rng = np.random.default_rng(1)
    q = jnp.asarray(_unit(rng.normal(size=(4, 6))))
    d = jnp.asarray(_unit(rng.normal(size=(4, 6))))
    plain = losses.in_batch_softmax(q, d, 10.0, symmetric=True)
    more = losses.in_batch_softmax(q, d, 10.0, symmetric=True,
                                   same_side=True)
    self.assertGreater(float(more), float(plain))  # Larger denominators.
    grads = jax.grad(
        lambda q, d: losses.in_batch_softmax(q, d, 10.0, symmetric=True,
                                             same_side=True),
        argnums=(0, 1))(q, d)
    for g in grads:
      self.assertTrue(np.isfinite(np.asarray(g)).all())

  def test_traced_scale(self):
    q = jnp.asarray(_unit(np.eye(3, 4)))
    g = jax.grad(lambda s: losses.in_batch_softmax(q, q, s, same_side=True))(
        jnp.float32(5.0))
    self.assertLess(float(g), 0.0)  # Perfect pairs: a larger scale helps.


def _tiny_encoder(seed):
  config = bert.BertConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1,
                           num_attention_heads=2, intermediate_size=32,
                           max_position_embeddings=16)
  with sharding.use_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
    model = bert.BertModel(config, rngs=nnx.Rngs(params=seed, dropout=seed))
  model.eval()
  return model


def _batch(seed, b=4, length=6):
  ids = np.random.default_rng(seed).integers(1, 64, size=(b, length))
  return {"input_ids": jnp.asarray(ids, jnp.int32),
          "attention_mask": jnp.ones((b, length), jnp.int32)}


class BiEncoderTest(absltest.TestCase):

  def test_shared_tower_embeds_both_sides_alike(self):
    model = biencoder.BiEncoder(_tiny_encoder(0))
    self.assertEqual(model.towers, "shared")
    batch = _batch(0)
    np.testing.assert_array_equal(model.encode_queries(batch),
                                  model.encode_documents(batch))
    self.assertEqual(float(model.scale()), 20.0)

  def test_separate_towers_are_independent(self):
    model = biencoder.BiEncoder(_tiny_encoder(0), _tiny_encoder(1))
    self.assertEqual(model.towers, "separate")
    batch = _batch(1)
    q0 = np.asarray(model.encode_queries(batch))
    self.assertFalse(np.allclose(q0, model.encode_documents(batch)))
    emb = model.doc_encoder.embeddings.word_embeddings.embedding
    emb.set_value(emb.get_value() * 2.0)
    np.testing.assert_array_equal(model.encode_queries(batch), q0)

  def test_loss_gradients_reach_both_towers_and_the_scale(self):
    model = biencoder.BiEncoder(_tiny_encoder(0), _tiny_encoder(1),
                                learn_scale=True, scale=10.0)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    q, d = _batch(2), _batch(3, b=6)

    def loss_fn(params):
      m = nnx.merge(graphdef, params, rest)
      return m.loss(q, d, symmetric=True, same_side=True)

    grads = jax.jit(jax.grad(loss_fn))(params)
    self.assertNotEqual(float(grads["log_scale"].get_value()), 0.0)
    for tower in ("query_encoder", "doc_encoder"):
      g = grads[tower]["encoder"]["layer"][0]["attention"]["self"]["query"]
      self.assertGreater(float(jnp.abs(g["kernel"].get_value()).sum()), 0.0)
    m = nnx.merge(graphdef, params, rest)
    want = losses.in_batch_softmax(m.encode_queries(q), m.encode_documents(d),
                                   10.0, symmetric=True, same_side=True)
    np.testing.assert_allclose(jax.jit(loss_fn)(params), want, rtol=1e-5)

  def test_learned_scale_is_clipped_and_trains(self):
    model = biencoder.BiEncoder(_tiny_encoder(0), learn_scale=True,
                                scale=20.0, max_scale=50.0)
    model.log_scale.set_value(jnp.float32(np.log(500.0)))
    self.assertAlmostEqual(float(model.scale()), 50.0, places=3)
    model.log_scale.set_value(jnp.float32(np.log(5.0)))
    graphdef, params, rest = nnx.split(model, biencoder.ScaleParam, ...)
    q = _batch(4)
    tx = optax.sgd(0.5)
    opt = tx.init(params)
    for _ in range(3):  # Identical pairs: the scale should grow.
      g = jax.grad(lambda p: nnx.merge(graphdef, p, rest).loss(q, q))(params)
      updates, opt = tx.update(g, opt)
      params = optax.apply_updates(params, updates)
    self.assertGreater(float(nnx.merge(graphdef, params, rest).scale()), 5.0)

  def test_trainable_filter_with_adapters(self):
    model = biencoder.BiEncoder(_tiny_encoder(0), _tiny_encoder(1),
                                learn_scale=True)
    adapters.inject(model, method="lora", targets=r".*self\.(query|value)",
                    rank=2, rngs=0)
    trainable = nnx.state(model, biencoder.trainable_filter(model, True))
    paths = {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(trainable)}
    self.assertIn("log_scale", paths)
    towers = {p.split("/")[0] for p in paths if p != "log_scale"}
    self.assertEqual(towers, {"query_encoder", "doc_encoder"})
    self.assertIs(biencoder.trainable_filter(model, False), nnx.Param)

  def test_validation(self):
    enc = _tiny_encoder(0)
    with self.assertRaisesRegex(ValueError, "pooling must be one of"):
      biencoder.BiEncoder(enc, pooling="max")
    with self.assertRaisesRegex(ValueError, "scale must be a positive"):
      biencoder.BiEncoder(enc, scale=0.0)
    with self.assertRaisesRegex(ValueError, "max_scale"):
      biencoder.BiEncoder(enc, scale=20.0, learn_scale=True, max_scale=10.0)
    with sharding.use_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
      wide = bert.BertModel(
          bert.BertConfig(vocab_size=64, hidden_size=8, num_hidden_layers=1,
                          num_attention_heads=2, intermediate_size=8),
          rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "same hidden size; got 16 and 8"):
      biencoder.BiEncoder(enc, wide)
    self.assertEqual(biencoder.BiEncoder(enc, enc).towers, "shared")
    with self.assertRaisesRegex(ValueError, "towers must be one of"):
      biencoder.BiEncoder.from_pretrained(assets.splade_tiny_path(),
                                          towers="two")

  def test_from_pretrained_separate_embeds_like_bert(self):
    path = assets.splade_tiny_path()
    model, tok = biencoder.BiEncoder.from_pretrained(path, towers="separate")
    self.assertIsNot(model.query_encoder, model.doc_encoder)
    texts = ["what causes aging fast", "the cell cycle"]
    enc = bert.load_pretrained(path)
    want = bert.embed_texts(enc, tok, texts)
    np.testing.assert_allclose(biencoder.embed_queries(model, tok, texts),
                               want, atol=1e-5)
    np.testing.assert_allclose(
        biencoder.embed_documents(model, tok, texts), want, atol=1e-5)


class ZeroQueriesTest(absltest.TestCase):

  def test_exact_search_and_topk_accept_no_queries(self):
    docs = jnp.asarray(np.random.default_rng(0).normal(size=(10, 4)),
                       jnp.float32)
    for fn in (search.exact_search, search.topk):
      scores, idx = fn(jnp.zeros((0, 4)), docs, 3)
      self.assertEqual(scores.shape, (0, 3))
      self.assertEqual(idx.shape, (0, 3))


class ColbertCheckpointTest(absltest.TestCase):

  def test_loads_the_projection_of_a_colbert_checkpoint(self):
    src = assets.splade_tiny_path()
    tmp = tempfile.mkdtemp()
    self.addCleanup(shutil.rmtree, tmp)
    for name in ("config.json", "tokenizer.json"):
      shutil.copy(src / name, tmp)
    tensors = safetensors_numpy.load_file(str(src / "model.safetensors"))
    hidden = 128
    head = np.random.default_rng(0).normal(size=(24, hidden)).astype(
        np.float32)
    safetensors_numpy.save_file({**tensors, "linear.weight": head},
                                os.path.join(tmp, "model.safetensors"))
    np.testing.assert_array_equal(bert.read_tensor(tmp, "linear.weight"),
                                  head)
    self.assertIsNone(bert.read_tensor(tmp, "no.such.tensor"))
    with self.assertRaisesRegex(ValueError, "unexpected tensors.*linear"):
      bert.load_pretrained(tmp)

    model = colbert.ColBERT.from_pretrained(tmp, doc_maxlen=32)
    self.assertEqual(model.dim, 24)
    np.testing.assert_array_equal(model.linear.kernel.get_value(), head.T)
    plain = bert.load_pretrained(src)
    np.testing.assert_array_equal(
        model.bert.embeddings.word_embeddings.embedding.get_value(),
        plain.embeddings.word_embeddings.embedding.get_value())
    with self.assertRaisesRegex(ValueError, "dim=128 contradicts"):
      colbert.ColBERT.from_pretrained(tmp, dim=128)
    # A plain BERT directory still gets a fresh projection of any size.
    self.assertEqual(colbert.ColBERT.from_pretrained(src, dim=8).dim, 8)


if __name__ == "__main__":
  absltest.main()
