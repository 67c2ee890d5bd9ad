"""Tests for MUVERA fixed-dimensional encodings."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lowrank import assets
from lowrank.models import bert
from lowrank.retrieval import muvera


def _reference(points, mask, config, average, fill):
  """Loop-based numpy FDE from the same random draws (independent logic)."""
  planes, ams_idx, ams_sign = (
      None if a is None else np.asarray(a)
      for a in muvera._draws(config))  # pylint: disable=protected-access
  r_n, k, p = (config.num_repetitions, config.num_simhash_projections,
               config.num_partitions)
  e = config.block_dim
  out = np.zeros((r_n, p, e))
  pts = [np.asarray(x, np.float64) for x, m in zip(points, mask) if m]
  for r in range(r_n):
    blocks = [[] for _ in range(p)]
    sigs = []
    for x in pts:
      bits = [float(x @ planes[r][:, i]) > 0 for i in range(k)]
      g = 0
      for b in bits:
        g = (g << 1) + (int(b) ^ (g & 1))
      if ams_idx is None:
        y = x
      else:
        y = np.zeros(e)
        for j in range(len(x)):
          y[ams_idx[r, j]] += ams_sign[r, j] * x[j]
      blocks[g].append(y)
      sigs.append((bits, y))
    for j in range(p):
      if blocks[j]:
        s = np.sum(blocks[j], axis=0)
        out[r, j] = s / len(blocks[j]) if average else s
      elif fill and sigs:
        jbits = j ^ (j >> 1)
        want = [bool((jbits >> (k - 1 - i)) & 1) for i in range(k)]
        dists = [sum(a != b for a, b in zip(bits, want)) for bits, _ in sigs]
        out[r, j] = sigs[int(np.argmin(dists))][1]
  return out.reshape(-1)


class FDETest(parameterized.TestCase):

  def setUp(self):
    super().setUp()
    rng = np.random.default_rng(0)
    self.q = rng.normal(size=(3, 6, 8)).astype(np.float32)
    self.d = rng.normal(size=(4, 9, 8)).astype(np.float32)
    self.qm = np.ones((3, 6), bool)
    self.qm[1, 4:] = False
    self.dm = np.ones((4, 9), bool)
    self.dm[2, 3:] = False

  @parameterized.parameters(
      dict(proj=None, k=3, r=2),
      dict(proj=5, k=2, r=3),
      dict(proj=None, k=0, r=1),
  )
  def test_matches_loop_reference(self, proj, k, r):
    c = muvera.FDEConfig(dimension=8, num_repetitions=r,
                         num_simhash_projections=k, projection_dim=proj)
    fq = np.asarray(muvera.encode_queries(self.q, self.qm, c))
    fd = np.asarray(muvera.encode_documents(self.d, self.dm, c))
    self.assertEqual(fq.shape, (3, c.output_dim))
    for i in range(3):
      np.testing.assert_allclose(
          fq[i], _reference(self.q[i], self.qm[i], c, False, False),
          rtol=1e-5, atol=1e-5)
    for i in range(4):
      np.testing.assert_allclose(
          fd[i], _reference(self.d[i], self.dm[i], c, True, True),
          rtol=1e-5, atol=1e-5)

  def test_one_partition_dot_is_sum_times_mean(self):
    c = muvera.FDEConfig(dimension=8, num_repetitions=1,
                         num_simhash_projections=0)
    fq = muvera.encode_queries(self.q, self.qm, c)
    fd = muvera.encode_documents(self.d, self.dm, c)
    want = np.einsum(
        "qe,de->qd",
        (self.q * self.qm[..., None]).sum(1),
        (self.d * self.dm[..., None]).sum(1) / self.dm.sum(1)[:, None])
    np.testing.assert_allclose(fq @ fd.T, want, rtol=1e-5, atol=1e-5)

  def test_padding_is_ignored(self):
    c = muvera.FDEConfig(dimension=8, num_repetitions=4,
                         num_simhash_projections=3, projection_dim=4)
    padded = self.d.copy()
    padded[2, 3:] = 100.0  # garbage under the mask
    np.testing.assert_allclose(
        muvera.encode_documents(padded, self.dm, c),
        muvera.encode_documents(self.d, self.dm, c), rtol=1e-6)
    short = muvera.encode_documents(self.d[2:3, :3], None, c)
    np.testing.assert_allclose(
        short[0], muvera.encode_documents(self.d, self.dm, c)[2], rtol=1e-6)

  def test_final_projection_and_seed(self):
    c = muvera.FDEConfig(dimension=8, num_repetitions=2,
                         num_simhash_projections=2, final_projection_dim=16)
    f = muvera.encode_documents(self.d, self.dm, c)
    self.assertEqual(f.shape, (4, 16))
    c2 = muvera.FDEConfig(dimension=8, num_repetitions=2,
                          num_simhash_projections=2, final_projection_dim=16,
                          seed=2)
    self.assertFalse(np.allclose(f, muvera.encode_documents(
        self.d, self.dm, c2)))

  def test_validation(self):
    with self.assertRaisesRegex(ValueError, "num_simhash_projections"):
      muvera.FDEConfig(dimension=8, num_simhash_projections=31)
    with self.assertRaisesRegex(ValueError, "dimension"):
      muvera.FDEConfig(dimension=0)
    c = muvera.FDEConfig(dimension=8)
    with self.assertRaisesRegex(ValueError, r"\[batch, tokens, 8\]"):
      muvera.encode_queries(self.q[..., :4], None, c)
    with self.assertRaisesRegex(ValueError, "mask must be"):
      muvera.encode_queries(self.q, self.qm[:, :2], c)


class RealTokensTest(absltest.TestCase):
  """FDE dot products track Chamfer on MiniLM token vectors of real text."""

  def test_fde_ranks_like_chamfer_on_lee_corpus(self):
    path = assets.gensim_test_data_path() / "lee.cor"
    docs = [l.strip() for l in path.read_text(encoding="latin-1")
            .splitlines() if l.strip()][:40]
    # Query: the second sentence of each document (real paraphrase-free
    # overlap); the relevant document is the one it came from.
    queries = [d.split(". ")[1] if ". " in d else d[:120] for d in docs]
    model = bert.load_pretrained(assets.minilm_path())
    tok = bert.load_tokenizer(assets.minilm_path())
    model.eval()
    # The weights are arguments, not constants folded into the program.
    graphdef, state = nnx.split(model)

    @jax.jit
    def tokens(state, ids, mask):
      h = nnx.merge(graphdef, state)(ids, attention_mask=mask)
      return h / jnp.linalg.norm(h, axis=-1, keepdims=True)

    def enc(texts, n):
      b = tok(texts, max_length=n, pad_to=n)
      return np.asarray(tokens(state, b["input_ids"], b["attention_mask"])), (
          b["attention_mask"].astype(bool))

    qv, qm = enc(queries, 32)
    dv, dm = enc(docs, 64)  # Mostly holds the query sentence.
    # One program for every query's Chamfer scores.
    chamfer = np.asarray(jax.jit(jax.vmap(
        muvera.chamfer, in_axes=(0, 0, None, None)))(qv, qm, dv, dm))
    c = muvera.FDEConfig(dimension=qv.shape[-1], num_repetitions=20,
                         num_simhash_projections=4, projection_dim=16)
    approx = np.asarray(muvera.encode_queries(qv, qm, c)
                        @ muvera.encode_documents(dv, dm, c).T)
    # Spearman correlation of the per-query score lists.
    def ranks(x):
      return np.argsort(np.argsort(x, axis=1), axis=1)
    rq, ra = ranks(chamfer), ranks(approx)
    rho = np.mean([np.corrcoef(a, b)[0, 1] for a, b in zip(rq, ra)])
    self.assertGreater(rho, 0.6)  # Measured: 0.73.
    # Exact MaxSim finds the source document; FDE top-5 then rerank keeps it.
    exact_top1 = (chamfer.argmax(1) == np.arange(len(docs))).mean()
    top5 = np.argsort(-approx, axis=1)[:, :5]
    fde_recall5 = np.mean([i in top5[i] for i in range(len(docs))])
    self.assertGreaterEqual(exact_top1, 0.9)  # Measured: 1.0 and 1.0.
    self.assertGreaterEqual(fde_recall5, 0.8 * exact_top1)


if __name__ == "__main__":
  absltest.main()
