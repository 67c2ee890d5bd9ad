"""Tests for LoRA merging (`lowrank.adapters.merging`)."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lowrank import adapters
from lowrank import sharding
from lowrank.adapters import merging
from lowrank.adapters import multi

_D_IN, _D_OUT = 12, 10


def _adapter(seed, ranks=(3, 2), scale=2.0):
  """`{path: (A, B, scale)}` over two layers with the given ranks."""
  out = {}
  for j, r in enumerate(ranks):
    ka, kb = jax.random.split(jax.random.key(100 * seed + j))
    out[f"layer{j}"] = (
        jax.random.normal(ka, (_D_IN, r)),
        jax.random.normal(kb, (r, _D_OUT + j)),
        scale,
    )
  return out


def _dense(factors):
  return {p: np.asarray(merging.delta(*f)) for p, f in factors.items()}


def _weighted_sum(ads, w):
  dense = [_dense(a) for a in ads]
  return {p: sum(wi * d[p] for wi, d in zip(w, dense)) for p in dense[0]}


_ADS = [_adapter(1), _adapter(2, ranks=(2, 4), scale=0.5),
        _adapter(3, ranks=(1, 2))]
_W = [0.5, 1.5, -1.0]


class PureMergeTest(parameterized.TestCase):

  def test_cat_is_exact(self):
    merged = merging.merge_linear(_ADS, _W, method="cat")
    want = _weighted_sum(_ADS, _W)
    for p, (a, b, s) in merged.items():
      self.assertEqual(a.shape[1], {"layer0": 6, "layer1": 8}[p])
      np.testing.assert_allclose(merging.delta(a, b, s), want[p], rtol=1e-5,
                                 atol=1e-4)

  @parameterized.parameters(1, 3, 5)
  def test_svd_error_is_tail_singular_values(self, rank):
    merged = merging.merge_linear(_ADS, _W, method="svd", rank=rank)
    want = _weighted_sum(_ADS, _W)
    for p, (a, b, s) in merged.items():
      self.assertEqual(a.shape, (_D_IN, rank))
      sv = np.linalg.svd(want[p].astype(np.float64), compute_uv=False)
      err = np.linalg.norm(want[p] - np.asarray(merging.delta(a, b, s)))
      np.testing.assert_allclose(err, np.sqrt(np.sum(sv[rank:] ** 2)),
                                 rtol=1e-3, atol=1e-3)
      # Dense SVD gives the same answer as the factored (QR) route.
      a2, b2 = merging.svd_factors(jnp.asarray(want[p]), rank)
      np.testing.assert_allclose(a2 @ b2, a @ b, rtol=1e-3, atol=1e-3)

  def test_svd_pads_when_rank_exceeds_sum(self):
    merged = merging.merge_linear(_ADS[:1], method="svd", rank=9)
    a, b, s = merged["layer0"]
    self.assertEqual(a.shape, (_D_IN, 9))
    self.assertEqual(b.shape, (9, _D_OUT))
    np.testing.assert_allclose(merging.delta(a, b, s),
                               _dense(_ADS[0])["layer0"], rtol=1e-4,
                               atol=1e-3)

  def test_trim_hand_example(self):
    tau = jnp.asarray([[0.5, -3.0], [2.0, -0.1]])
    np.testing.assert_array_equal(merging.trim(tau, 0.5),
                                  [[0.0, -3.0], [2.0, 0.0]])
    np.testing.assert_array_equal(merging.trim(tau, 0.2), jnp.zeros((2, 2)))
    np.testing.assert_array_equal(merging.trim(tau, 1.0), tau)

  def test_ties_hand_example(self):
    taus = jnp.asarray([
        [1.0, -2.0, 0.1, 3.0],
        [2.0, 1.0, -0.2, -1.0],
        [-4.0, 0.5, 0.3, 2.0],
    ])
    # density 0.5 keeps the top 2 of 4 per task:
    # [0, -2, 0, 3], [2, 1, 0, 0], [-4, 0, 0, 2].
    # Sums: [-2, -1, 0, 5] -> elected signs [-, -, 0, +].
    # Disjoint means: [-4, -2, 0, (3 + 2) / 2].
    np.testing.assert_allclose(merging.ties(taus, 0.5), [-4.0, -2.0, 0.0,
                                                         2.5])
    # Frequency election on the trimmed vectors: signs [+, +, 0, +]...
    # sgn counts: [0 + 1 - 1, -1 + 1 + 0, 0, 1 + 0 + 1] = [0, 0, 0, 2].
    np.testing.assert_allclose(
        merging.ties(taus, 0.5, majority="frequency"), [0.0, 0.0, 0.0, 2.5])
    # density 1: no trimming; signs of [-1, -0.5, 0.2, 4] -> [-, -, +, +].
    np.testing.assert_allclose(
        merging.ties(taus, 1.0), [-4.0, -2.0, 0.2, 2.5], rtol=1e-6)

  def test_merge_ties_matches_formula(self):
    merged = merging.merge_ties(_ADS, _W, density=0.3, rank=8)
    for p, (a, b, s) in merged.items():
      taus = jnp.stack([w * merging.delta(*ad[p]) for w, ad in zip(_W,
                                                                   _ADS)])
      want = merging.ties(taus, 0.3)
      sv = np.linalg.svd(np.asarray(want), compute_uv=False)
      err = np.linalg.norm(np.asarray(want) - merging.delta(a, b, s))
      np.testing.assert_allclose(err, np.sqrt(np.sum(sv[8:] ** 2)),
                                 rtol=1e-3, atol=1e-3)

  def test_dare_values_and_expectation(self):
    tau = jax.random.normal(jax.random.key(0), (6, 5))
    out = merging.dare(tau, jax.random.key(1), 0.75)
    kept = np.asarray(out) != 0
    np.testing.assert_allclose(np.asarray(out)[kept],
                               4.0 * np.asarray(tau)[kept], rtol=1e-6)
    self.assertGreater(kept.sum(), 0)
    self.assertLess(kept.sum(), tau.size)
    np.testing.assert_array_equal(merging.dare(tau, jax.random.key(1), 0.0),
                                  tau)
    keys = jax.random.split(jax.random.key(2), 20000)
    mean = jax.vmap(lambda k: merging.dare(tau, k, 0.5))(keys).mean(0)
    # Per-entry std of the mean: |τ| / sqrt(20000) ≈ 0.007 |τ|.
    np.testing.assert_allclose(mean, tau, atol=0.05 * float(
        jnp.max(jnp.abs(tau))))
    rate = np.mean(np.asarray(
        jax.vmap(lambda k: merging.dare(tau, k, 0.5))(keys[:500])) == 0)
    self.assertAlmostEqual(rate, 0.5, delta=0.02)

  def test_merge_dare(self):
    key = jax.random.key(5)
    merged = merging.merge_dare(_ADS, _W, key=key, drop_rate=0.0, rank=8)
    want = _weighted_sum(_ADS, _W)
    for p, (a, b, s) in merged.items():
      np.testing.assert_allclose(merging.delta(a, b, s), want[p], rtol=1e-3,
                                 atol=1e-3)
    # With drops: the formula by hand, with the documented key derivation.
    merged = merging.merge_dare(_ADS, _W, key=key, drop_rate=0.4, rank=8,
                                combine="ties")
    paths = sorted(_ADS[0])
    for j, p in enumerate(paths):
      dropped = jnp.stack([
          merging.dare(w * merging.delta(*ad[p]),
                       jax.random.fold_in(jax.random.fold_in(key, j), i), 0.4)
          for i, (w, ad) in enumerate(zip(_W, _ADS))])
      want = np.asarray(merging.disjoint_mean(dropped))
      a, b, s = merged[p]
      sv = np.linalg.svd(want, compute_uv=False)
      err = np.linalg.norm(want - merging.delta(a, b, s))
      np.testing.assert_allclose(err, np.sqrt(np.sum(sv[8:] ** 2)),
                                 rtol=1e-3, atol=1e-3)

  def test_kmeans_finds_clusters(self):
    centres = jnp.asarray([[10.0, 0.0], [0.0, 10.0], [-10.0, -10.0]])
    noise = jax.random.normal(jax.random.key(0), (30, 2)) * 0.1
    x = jnp.repeat(centres, 10, axis=0) + noise
    got, labels = merging.kmeans(x, 3, jax.random.key(3), iters=10)
    labels = np.asarray(labels).reshape(3, 10)
    self.assertTrue(all(len(set(row)) == 1 for row in labels))
    self.assertLen({row[0] for row in labels}, 3)
    for i in range(3):
      np.testing.assert_allclose(got[labels[i, 0]], x[10 * i:10 * i + 10]
                                 .mean(0), rtol=1e-5, atol=1e-5)

  def test_lego_full_rank_reproduces_sum(self):
    # k = 8 = every unit of layer1; layer0 has 6 units and 2 zero units.
    merged = merging.merge_lego(_ADS, _W, rank=8, key=jax.random.key(0))
    want = _weighted_sum(_ADS, _W)
    for p, (a, b, s) in merged.items():
      np.testing.assert_allclose(merging.delta(a, b, s), want[p], rtol=1e-4,
                                 atol=1e-4)
      # The merged units are the pooled units, permuted.
      ua, ub = merging.units(_ADS, _W, p)
      pool = {tuple(np.round(np.concatenate([ua[:, j], ub[j]]), 4))
              for j in range(ua.shape[1])}
      got = {tuple(np.round(np.concatenate([a[:, j], b[j]]), 4))
             for j in range(8)}
      if p == "layer0":
        pool.add(tuple(np.zeros(_D_IN + _D_OUT)))
      self.assertEqual(pool, got)

  def test_lego_reduces_rank_and_reweights(self):
    # Two clusters of near-parallel units: k = 2 merges each into one
    # centroid whose a / b norms equal its members' mean norms.
    d = jax.random.normal(jax.random.key(1), (2, _D_IN + _D_OUT))
    members = []
    for c in range(2):
      for m in range(3):
        noise = jax.random.normal(jax.random.key(10 * c + m), d.shape[1:])
        members.append(d[c] * (1.0 + 0.3 * m) + 0.05 * noise)
    x = jnp.stack(members)
    ua, ub = x[:, :_D_IN].T, x[:, _D_IN:]
    a, b = merging.lego_units(ua, ub, 2, jax.random.key(0), iters=10)
    self.assertEqual(a.shape, (_D_IN, 2))
    self.assertEqual(np.linalg.matrix_rank(np.asarray(a @ b), tol=1e-4), 2)
    na = np.linalg.norm(np.asarray(ua), axis=0).reshape(2, 3).mean(1)
    nb = np.linalg.norm(np.asarray(ub), axis=1).reshape(2, 3).mean(1)
    got_a = np.sort(np.linalg.norm(np.asarray(a), axis=0))
    got_b = np.sort(np.linalg.norm(np.asarray(b), axis=1))
    np.testing.assert_allclose(got_a, np.sort(na), rtol=1e-5)
    np.testing.assert_allclose(got_b, np.sort(nb), rtol=1e-5)
    # Without reweighting the centroids are plain means (shorter).
    a0, _ = merging.lego_units(ua, ub, 2, jax.random.key(0), iters=10,
                               reweight=False)
    self.assertTrue(np.all(
        np.sort(np.linalg.norm(np.asarray(a0), axis=0)) <= got_a + 1e-6))
    # Through the dict API: rank k everywhere.
    merged = merging.merge_lego(_ADS, rank=4, key=jax.random.key(0))
    for a, b, _ in merged.values():
      self.assertEqual(a.shape, (_D_IN, 4))
      self.assertLessEqual(np.linalg.matrix_rank(np.asarray(a @ b)), 4)

  def test_everything_jits(self):
    key = jax.random.key(4)
    w = jnp.asarray(_W)
    ads = [{"layer1": ad["layer1"]} for ad in _ADS]
    cases = [
        (functools.partial(merging.merge_linear, method="cat"), {}),
        (functools.partial(merging.merge_linear, method="svd", rank=3), {}),
        (functools.partial(merging.merge_ties, density=0.4, rank=3), {}),
        (functools.partial(merging.merge_dare, drop_rate=0.3, rank=3),
         {"key": key}),
        (functools.partial(merging.merge_lego, rank=3, iters=5),
         {"key": key}),
    ]
    for fn, kw in cases:
      eager = fn(ads, w, **kw)["layer1"]
      jitted = jax.jit(fn)(ads, w, **kw)["layer1"]
      np.testing.assert_allclose(
          merging.delta(*jitted), merging.delta(*eager), rtol=1e-4,
          atol=1e-4)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "same layers"):
      merging.merge_linear([_ADS[0], {"layer0": _ADS[0]["layer0"]}])
    with self.assertRaisesRegex(ValueError, "one entry per adapter"):
      merging.merge_linear(_ADS, [1.0, 2.0])
    with self.assertRaisesRegex(ValueError, "rank must be None"):
      merging.merge_linear(_ADS, method="cat", rank=2)
    with self.assertRaisesRegex(ValueError, "method must be"):
      merging.merge_linear(_ADS, method="avg")
    with self.assertRaisesRegex(ValueError, r"density must be in \(0, 1\]"):
      merging.merge_ties(_ADS, density=0.0, rank=2)
    with self.assertRaisesRegex(ValueError, r"drop_rate must be in \[0, 1\)"):
      merging.merge_dare(_ADS, key=jax.random.key(0), drop_rate=1.0, rank=2)
    with self.assertRaisesRegex(ValueError, "combine must be"):
      merging.merge_dare(_ADS, key=jax.random.key(0), drop_rate=0.1, rank=2,
                         combine="sum")
    with self.assertRaisesRegex(ValueError, "rank must be a positive"):
      merging.merge_lego(_ADS, rank=0, key=jax.random.key(0))
    with self.assertRaisesRegex(ValueError, "majority must be"):
      merging.ties(jnp.ones((2, 3)), 0.5, majority="vote")
    with self.assertRaisesRegex(ValueError, "k must be an int"):
      merging.kmeans(jnp.ones((3, 2)), 4, jax.random.key(0))
    with self.assertRaisesRegex(ValueError, "non-empty list"):
      merging.merge_linear([])


class _Net(nnx.Module):

  def __init__(self, rngs):
    self.q = nnx.Linear(8, 6, rngs=rngs)
    self.v = nnx.LinearGeneral(8, (2, 3), rngs=rngs)

  def __call__(self, x):
    return self.q(x) + self.v(x).reshape(x.shape[:-1] + (6,))


class ModelIoTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.enter_context(sharding.use_mesh())
    self.x = jax.random.normal(jax.random.key(0), (4, 8))

  def _trained(self, seed, rank):
    model = _Net(nnx.Rngs(0))
    adapters.inject(model, targets=["q", "v"], rank=rank, alpha=2 * rank,
                    rngs=seed)
    for i, m in enumerate(adapters.adapter_modules(model).values()):
      b = m.lora_b.get_value()
      m.lora_b.set_value(
          jax.random.normal(jax.random.key(seed + i), b.shape) * 0.5)
    return model

  def test_round_trip_and_merged_model(self):
    m1, m2 = self._trained(1, 2), self._trained(2, 3)
    f1, f2 = merging.lora_factors(m1), merging.lora_factors(m2)
    self.assertEqual(f1["v"][0].shape, (8, 2))
    self.assertEqual(f1["v"][1].shape, (2, 6))
    base = _Net(nnx.Rngs(0))(self.x)
    d1, d2 = m1(self.x) - base, m2(self.x) - base
    merged = merging.merge_linear([f1, f2], [0.25, 1.0], method="cat")
    target = _Net(nnx.Rngs(0))
    adapters.inject(target, targets=["q", "v"], rank=5, alpha=3.0)
    merging.set_lora_factors(target, merged)
    np.testing.assert_allclose(target(self.x) - base, 0.25 * d1 + d2,
                               rtol=1e-4, atol=1e-4)
    # And into a named-adapter model.
    named = _Net(nnx.Rngs(0))
    multi.add_adapter(named, "merged", factors=merged)
    np.testing.assert_allclose(named(self.x), target(self.x), rtol=1e-5,
                               atol=1e-5)
    back = merging.lora_factors(named, adapter="merged")
    for p in merged:
      np.testing.assert_allclose(merging.delta(*back[p]),
                                 merging.delta(*merged[p]), rtol=1e-5,
                                 atol=1e-5)

  def test_errors(self):
    model = self._trained(1, 2)
    f = merging.lora_factors(model)
    wrong = _Net(nnx.Rngs(0))
    adapters.inject(wrong, targets=["q", "v"], rank=3)
    with self.assertRaisesRegex(ValueError, "rank=2"):
      merging.set_lora_factors(wrong, f)
    with self.assertRaisesRegex(ValueError, "do not cover"):
      merging.set_lora_factors(model, {"q": f["q"]})
    merging.set_lora_factors(model, {"q": f["q"]}, strict=False)
    with self.assertRaisesRegex(ValueError, "no adapters"):
      merging.lora_factors(_Net(nnx.Rngs(0)))
    with self.assertRaisesRegex(ValueError, "adapter must be None"):
      merging.lora_factors(model, adapter="x")
    named = _Net(nnx.Rngs(0))
    multi.add_adapter(named, "a", targets=["q"], rank=2)
    with self.assertRaisesRegex(ValueError, "pass adapter="):
      merging.lora_factors(named)


if __name__ == "__main__":
  absltest.main()
