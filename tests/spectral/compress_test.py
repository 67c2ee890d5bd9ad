"""Tests for SVD compression: LoRD, WeLore, EoRA (`lowrank.spectral.compress`).

The MiniLM tests print the measured numbers (run with `-s` to see them).
"""

import ctypes
import sys

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import adapters
from lowrank import assets
from lowrank import presets
from lowrank import sharding
from lowrank.adapters import quantized
from lowrank.adapters import svd_init
from lowrank.models import bert
from lowrank.models import llama
from lowrank.spectral import compress

P = jax.sharding.PartitionSpec
_LLAMA_TARGETS = r".*_proj"


def _openblas_thread_setters():
  """`(get, set)` pairs of every OpenBLAS loaded in this process (Linux).

  numpy and scipy (whose LAPACK jaxlib's CPU SVD calls) each bundle an
  OpenBLAS. On this 2-core machine their spinning thread pools fight each
  other and XLA's: one 384 x 384 SVD measured 0.7 s instead of 0.02 s, and
  this file took 144 s of CPU instead of 50 s. The tests pin both to one
  thread while they run (restored afterwards).
  """
  if not sys.platform.startswith("linux"):
    return []
  try:
    with open("/proc/self/maps", encoding="utf-8") as f:
      paths = {line.split()[-1] for line in f
               if "openblas" in line.lower() and ".so" in line}
  except OSError:
    return []
  pairs = []
  for path in sorted(paths):
    try:
      lib = ctypes.CDLL(path)
    except OSError:
      continue
    for prefix in ("scipy_openblas_", "openblas_"):
      for suffix in ("64_", ""):
        get = getattr(lib, f"{prefix}get_num_threads{suffix}", None)
        put = getattr(lib, f"{prefix}set_num_threads{suffix}", None)
        if get is not None and put is not None:
          pairs.append((get, put))
  return pairs


_SAVED_THREADS = []


def setUpModule():
  # jaxlib loads scipy's LAPACK (and its OpenBLAS) on first use.
  jax.block_until_ready(jnp.linalg.svd(jnp.eye(2)))
  for get, put in _openblas_thread_setters():
    _SAVED_THREADS.append((put, get()))
    put(1)


def tearDownModule():
  while _SAVED_THREADS:
    put, n = _SAVED_THREADS.pop()
    put(n)


def _orthonormal(key, n, k):
  q, _ = jnp.linalg.qr(jax.random.normal(key, (n, k)))
  return q


def _with_spectrum(s, d_in, d_out, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  u = _orthonormal(k1, d_in, len(s))
  v = _orthonormal(k2, d_out, len(s))
  return (u * jnp.asarray(s, jnp.float32)[None, :]) @ v.T


def _one_device_mesh():
  return sharding.use_mesh(sharding.make_mesh(devices=jax.devices()[:1]))


_LLAMAS = {}


def _llama(seed=0, mesh=None, num_layers=1):
  """A fresh tiny LLaMA (a clone of one built once per module and layout).

  Building one runs its initialisers eagerly; a clone is cheap. One decoder
  layer holds all 7 projections (4 kernel shapes); a second one doubles the
  per-layer work and the compiled forwards.
  """
  config = llama.LlamaConfig.tiny(initializer_range=0.2,
                                  num_layers=num_layers)
  if mesh is not None:
    with mesh:
      return llama.LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
  if (seed, num_layers) not in _LLAMAS:
    with _one_device_mesh():
      _LLAMAS[seed, num_layers] = llama.LlamaForCausalLM(
          config, rngs=nnx.Rngs(seed))
  return nnx.clone(_LLAMAS[seed, num_layers])


_IDS = np.asarray(
    jax.random.randint(jax.random.key(3), (2, 12), 0, 256), np.int32)


@nnx.jit
def _logits(model, ids):
  return model(ids)


def _module(model, path):
  node = model
  for part in path.split("."):
    node = node[int(part)] if part.isdigit() else getattr(node, part)
  return node


class FactorizeTest(parameterized.TestCase):

  def test_full_rank_is_exact(self):
    w = jax.random.normal(jax.random.key(0), (12, 8))
    down, up = compress.factorize(w, rank=8)
    self.assertEqual(down.shape, (12, 8))
    self.assertEqual(up.shape, (8, 8))
    np.testing.assert_allclose(down @ up, w, atol=5e-6)

  def test_eckart_young_error_is_the_tail(self):
    s = np.array([5.0, 3.0, 2.0, 1.5, 0.7, 0.3, 0.1, 0.05])
    w = _with_spectrum(s, 20, 10)
    w64 = np.asarray(w, np.float64)
    s64 = np.linalg.svd(w64, compute_uv=False)
    rng = np.random.default_rng(0)
    for r in range(1, 8):
      down, up = compress.factorize(w, rank=r)
      err = w64 - np.asarray(down, np.float64) @ np.asarray(up, np.float64)
      fro, spec = compress.truncation_error(s64, r)
      np.testing.assert_allclose(np.linalg.norm(err), fro, rtol=1e-4,
                                 atol=1e-5)
      np.testing.assert_allclose(np.linalg.norm(err, 2), spec, rtol=1e-4,
                                 atol=1e-5)
      np.testing.assert_allclose(fro, np.sqrt(np.sum(s[r:] ** 2)), rtol=1e-4)
      # Optimality: a rank-r projection onto other directions is worse.
      # (On the host: an eager QR would compile once per rank.)
      q = np.linalg.qr(rng.standard_normal((20, r)))[0]
      other = q @ (q.T @ w64)
      self.assertGreater(np.linalg.norm(w64 - other), fro * 1.01)
      # Factors are balanced: D = U√S, E = √S Vᵀ.
      np.testing.assert_allclose(
          np.linalg.norm(np.asarray(down), axis=0),
          np.linalg.norm(np.asarray(up), axis=1), rtol=1e-4)

  def test_energy_rank(self):
    s = np.array([4.0, 2.0, 1.0, 1.0])  # σ² = 16, 4, 1, 1 (total 22).
    self.assertEqual(compress.energy_rank(s, 16 / 22), 1)
    self.assertEqual(compress.energy_rank(s, 0.8), 2)
    self.assertEqual(compress.energy_rank(s, 0.95), 3)
    self.assertEqual(compress.energy_rank(s, 1.0), 4)
    self.assertEqual(compress.energy_rank(np.array([3.0, 0.0]), 1.0), 1)
    w = _with_spectrum(s, 6, 5)
    down, up = compress.factorize(w, energy=0.8)
    self.assertEqual(down.shape, (6, 2))
    self.assertEqual(up.shape, (2, 5))

  def test_bad_inputs(self):
    w = jnp.ones((4, 3))
    for kwargs in ({}, {"rank": 2, "energy": 0.5}):
      with self.assertRaisesRegex(ValueError, "exactly one"):
        compress.factorize(w, **kwargs)
    with self.assertRaisesRegex(ValueError, r"rank must be in \[1, 3\]"):
      compress.factorize(w, rank=4)
    with self.assertRaisesRegex(ValueError, r"energy must be in \(0, 1\]"):
      compress.factorize(w, energy=1.5)
    with self.assertRaisesRegex(ValueError, "2-D"):
      compress.factorize(jnp.ones((2, 3, 4)), rank=1)
    with self.assertRaisesRegex(ValueError, "only applies"):
      compress.factorize(w, rank=1, targets=".*")


class CompressLlamaTest(parameterized.TestCase):

  def test_full_rank_round_trip_and_param_counts(self):
    model = _llama()
    ref = nnx.clone(model)
    y0 = np.asarray(_logits(model, _IDS))
    n0 = compress.count_params(model)
    report = compress.compress(model, targets=_LLAMA_TARGETS, rank=128)
    self.assertLen(report["layers"], 7)  # 1 layer x 7 projections.
    self.assertEqual(compress.count_params(model),
                     n0 - report["params_before"] + report["params_after"])
    for path, entry in report["layers"].items():
      m = _module(model, path)
      self.assertIsInstance(m, compress.LowRankLinear)
      d_in, d_out = entry["shape"]
      self.assertEqual(entry["rank"], min(d_in, d_out))
      self.assertEqual(entry["params_after"],
                       entry["rank"] * (d_in + d_out))
      self.assertEqual(entry["params_before"], d_in * d_out)
      self.assertLess(entry["rel_error"], 1e-5)
    np.testing.assert_allclose(_logits(model, _IDS), y0, atol=2e-4)
    compress.to_dense(model)
    self.assertEqual(compress.count_params(model), n0)
    self.assertEmpty(compress.low_rank_layers(model))
    for path in report["layers"]:
      self.assertIs(type(_module(model, path)), nnx.Linear)
      np.testing.assert_allclose(_module(model, path).kernel[...],
                                 _module(ref, path).kernel[...], atol=2e-5)
    np.testing.assert_allclose(_logits(model, _IDS), y0, atol=2e-4)

  def test_truncation_bounds_layer_outputs_and_logits(self):
    ref = _llama()
    y0 = np.asarray(_logits(ref, _IDS))
    x = jax.random.normal(jax.random.key(5), (32, 128))
    diffs = []
    for rank in (8, 24, 48):
      model = nnx.clone(ref)
      report = compress.compress(model, targets=_LLAMA_TARGETS, rank=rank)
      for path, entry in report["layers"].items():
        w = np.asarray(_module(ref, path).kernel[...], np.float64)
        s = np.linalg.svd(w, compute_uv=False)
        self.assertEqual(entry["rank"], min(rank, *w.shape))
        fro, spec = compress.truncation_error(s, entry["rank"])
        np.testing.assert_allclose(entry["rel_error"],
                                   fro / np.linalg.norm(w), rtol=1e-3,
                                   atol=3e-6)
        np.testing.assert_allclose(entry["spectral_error"], spec, rtol=1e-4)
        # ‖x W - x D E‖ ≤ ‖x‖ σ_{r+1} row by row.
        xi = x[:, : entry["shape"][0]]
        dy = _module(model, path)(xi) - _module(ref, path)(xi)
        norm_x = np.linalg.norm(xi, axis=-1)
        bound = norm_x * (entry["spectral_error"] * (1 + 1e-4) + 1e-5 * s[0])
        self.assertTrue(np.all(np.linalg.norm(dy, axis=-1) <= bound))
      compressed = np.asarray(_logits(model, _IDS))
      diffs.append(float(np.abs(compressed - y0).max()))
      # The dense form computes the same function as the factored one.
      compress.to_dense(model)
      np.testing.assert_allclose(_logits(model, _IDS), compressed,
                                 atol=2e-4)
    print("tiny LLaMA max |Δlogit| at ranks 8, 24, 48:", diffs)
    self.assertGreater(diffs[0], diffs[1])
    self.assertGreater(diffs[1], diffs[2])

  def test_energy_picks_the_smallest_rank(self):
    ref = _llama()
    model = nnx.clone(ref)
    report = compress.compress(model, targets=_LLAMA_TARGETS, energy=0.7)
    for path, entry in report["layers"].items():
      s = np.linalg.svd(np.asarray(_module(ref, path).kernel[...]),
                        compute_uv=False).astype(np.float64)
      e = np.cumsum(s ** 2) / np.sum(s ** 2)
      k = entry["rank"]
      self.assertGreaterEqual(e[k - 1], 0.7 - 1e-6)
      if k > 1:
        self.assertLess(e[k - 2], 0.7)
      self.assertAlmostEqual(entry["energy"], e[k - 1], places=5)

  def test_factorize_model_form(self):
    model = _llama(num_layers=2)
    out = compress.factorize(model, targets=["q_proj"], rank=4)
    self.assertIs(out, model)
    self.assertEqual(sorted(compress.low_rank_layers(model)), [
        "model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"])
    self.assertEqual(model.model.layers[0].self_attn.q_proj.rank, 4)

  def test_sharding_follows_the_kernel(self):
    mesh = sharding.make_mesh({"data": 2, "fsdp": 2, "tensor": 2})
    model = _llama(mesh=sharding.use_mesh(mesh))
    y0 = np.asarray(_logits(model, _IDS))
    compress.compress(model, targets=_LLAMA_TARGETS, rank=128)
    for path, axes, spec in (
        ("model.layers.0.self_attn.q_proj", ("embed", "heads"),
         ("fsdp", "tensor")),
        ("model.layers.0.mlp.down_proj", ("mlp", "embed"),
         ("tensor", "fsdp"))):
      m = _module(model, path)
      self.assertEqual(m.down.kernel.get_metadata()["out_sharding"],
                       (axes[0], "lowrank"))
      self.assertEqual(m.up.kernel.get_metadata()["out_sharding"],
                       ("lowrank", axes[1]))
      self.assertEqual(m.down.kernel[...].sharding.spec, P(spec[0], None))
      self.assertEqual(m.up.kernel[...].sharding.spec, P(None, spec[1]))
    np.testing.assert_allclose(_logits(model, _IDS), y0, atol=2e-4)
    compress.to_dense(model)
    q = model.model.layers[0].self_attn.q_proj
    self.assertEqual(q.kernel.get_metadata()["out_sharding"],
                     ("embed", "heads"))
    self.assertEqual(q.kernel[...].sharding.spec, P("fsdp", "tensor"))

  def test_all_linear_with_exclude_and_bf16(self):
    config = llama.LlamaConfig.tiny(param_dtype=jnp.bfloat16, num_layers=1)
    with _one_device_mesh():
      model = llama.LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    report = compress.compress(model, targets="all-linear",
                               exclude=["lm_head", "o_proj"], rank=16)
    self.assertLen(report["layers"], 6)  # 7 projections + lm_head - 2.
    self.assertIs(type(model.lm_head), nnx.Linear)
    q = model.model.layers[0].self_attn.q_proj
    self.assertEqual(q.down.kernel[...].dtype, jnp.bfloat16)
    # The error is measured on the stored (bf16-rounded) factors.
    w = np.asarray(_module(model, "model.layers.0.mlp.up_proj").dense_kernel())
    self.assertGreater(report["layers"]["model.layers.0.mlp.up_proj"][
        "rel_error"], 0.0)
    self.assertEqual(w.shape, (64, 128))
    self.assertTrue(np.isfinite(np.asarray(_logits(model, _IDS))).all())

  def test_create_under_a_mesh(self):
    with _one_device_mesh():
      m = compress.LowRankLinear.create(6, 5, 2, kernel_axes=("embed", "mlp"),
                                        rngs=nnx.Rngs(0))
    self.assertEqual(m.rank, 2)
    self.assertEqual(m.num_params(), 2 * 11 + 5)
    self.assertEqual(m.up.bias.get_metadata()["out_sharding"], ("mlp",))
    x = jnp.ones((3, 6))
    np.testing.assert_allclose(m(x), x @ m.dense_kernel(), atol=1e-5)

  @parameterized.named_parameters(
      ("no_match", dict(targets=r".*nothing", rank=2),
       "matched no nnx.Linear"),
      ("not_linear", dict(targets=r".*layernorm", rank=2),
       "are not nnx.Linear.*RMSNorm"),
      ("no_rank", dict(targets=_LLAMA_TARGETS), "exactly one"),
      ("untargeted_rank", dict(targets=["q_proj"], ranks={"x.y": 2}),
       "not targeted"),
  )
  def test_bad_targets(self, kwargs, message):
    with self.assertRaisesRegex(ValueError, message):
      compress.compress(_llama(), **kwargs)

  def test_stacked_kernels_are_refused(self):
    config = llama.LlamaConfig.tiny(scan_layers=True)
    with _one_device_mesh():  # Shapes suffice: the check comes first.
      stacked = nnx.eval_shape(
          lambda: llama.LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    with self.assertRaisesRegex(ValueError, "only 2-D kernels"):
      compress.compress(stacked, targets=_LLAMA_TARGETS, rank=2)

  def test_layer_with_an_adapter_is_refused(self):
    model = _llama()
    adapters.inject(model, targets=["q_proj"], rank=2)
    with self.assertRaisesRegex(ValueError, "q_proj \\(has an adapter"):
      compress.compress(model, targets=r".*q_proj", rank=2)


class _Planted(nnx.Module):
  """Linear layers with planted heavy-tailed or flat spectra."""

  def __init__(self, rngs):
    self.heavy1 = nnx.Linear(24, 24, rngs=rngs)
    self.flat1 = nnx.Linear(24, 24, rngs=rngs)
    self.heavy2 = nnx.Linear(24, 24, rngs=rngs)
    self.flat2 = nnx.Linear(24, 24, rngs=rngs)
    self.head = nnx.Linear(24, 4, rngs=rngs)
    i = np.arange(1, 25, dtype=np.float64)
    for n, (name, s) in enumerate((("heavy1", 3.0 / i ** 1.5),
                                   ("flat1", np.linspace(1.2, 0.6, 24)),
                                   ("heavy2", 2.0 / i ** 2),
                                   ("flat2", np.linspace(1.0, 0.5, 24)))):
      getattr(self, name).kernel.set_value(_with_spectrum(s, 24, 24, n))

  def __call__(self, x):
    for name in ("heavy1", "flat1", "heavy2", "flat2"):
      x = jnp.tanh(getattr(self, name)(x))
    return self.head(x)


class WeLoreTest(parameterized.TestCase):

  @parameterized.parameters("rank", "params")
  def test_allocation_meets_the_ratio_with_the_smallest_threshold(
      self, measure):
    rng = np.random.default_rng(0)
    spectra, shapes = {}, {}
    for i in range(6):
      d_in, d_out = (32, 48) if i % 2 else (40, 40)
      k = min(d_in, d_out)
      spectra[f"m{i}"] = np.sort(rng.pareto(1.0 + i, k) + 1e-3)[::-1]
      shapes[f"m{i}"] = (d_in, d_out)

    def reduction(tau):
      pruned = saved = total = dense = 0
      for n, s in spectra.items():
        d_in, d_out = shapes[n]
        sn = (s - s.min()) / (s.max() - s.min())
        p = min(int(np.sum(sn < tau)), len(s) - 1)
        k = len(s) - p
        lrc = p / len(s) > 0.1
        if measure == "params":
          lrc = lrc and k * (d_in + d_out) < d_in * d_out
          saved += (d_in * d_out - k * (d_in + d_out)) if lrc else 0
        pruned += p if lrc else 0
        total += len(s)
        dense += d_in * d_out
      return saved / dense if measure == "params" else pruned / total

    for ratio in (0.2, 0.5):
      ranks, tau = compress.welore_allocate(spectra, shapes, ratio,
                                            min_ratio=0.1, measure=measure)
      self.assertGreaterEqual(reduction(tau), ratio)
      normed = np.concatenate([(s - s.min()) / (s.max() - s.min())
                               for s in spectra.values()])
      below = normed[normed < tau]
      self.assertLess(reduction(float(below.max()) if below.size else 0.0),
                      ratio)
      for n, k in ranks.items():
        s = spectra[n]
        sn = (s - s.min()) / (s.max() - s.min())
        if k is not None:
          self.assertEqual(k, len(s) - int(np.sum(sn < tau)))
    with self.assertRaisesRegex(ValueError, "No threshold reaches"):
      compress.welore_allocate(spectra, shapes, 0.99, min_ratio=0.5,
                               measure=measure)

  def test_heavy_tails_get_lower_ranks_and_only_lrcs_train(self):
    model = _Planted(nnx.Rngs(0))
    targets = r"heavy\d|flat\d"
    ranks = compress.welore_ranks(model, targets=targets, ratio=0.35,
                                  min_ratio=0.5)
    print("WeLore ranks on planted spectra:", ranks)
    self.assertLess(ranks["heavy2"], ranks["heavy1"])
    self.assertIsNone(ranks["flat1"])
    self.assertIsNone(ranks["flat2"])
    frozen = {n: np.asarray(getattr(model, n).kernel[...])
              for n in ("flat1", "flat2", "head")}
    self.assertEqual(presets.paper(compress.welore_compress), {})
    report = compress.welore_compress(
        model, targets=targets, ratio=0.35, min_ratio=0.5,
        **presets.paper(compress.welore_compress))
    self.assertEqual(report["lrc"], ["heavy1", "heavy2"])
    self.assertEqual(report["n_lrc"], ["flat1", "flat2"])
    self.assertGreaterEqual(report["rank_reduction"], 0.35)
    self.assertEqual(report["params_before"], 4 * (24 * 24 + 24))
    self.assertEqual(report["params_after"],
                     2 * (24 * 24 + 24) + sum(
                         ranks[n] * 48 + 24 for n in ("heavy1", "heavy2")))
    self.assertEqual(report["layers"]["heavy1"]["rank"], ranks["heavy1"])
    self.assertIsInstance(model.heavy1, compress.LowRankLinear)
    self.assertIs(type(model.flat1), nnx.Linear)

    x = jax.random.normal(jax.random.key(1), (64, 24))
    y = jax.random.normal(jax.random.key(2), (64, 4))
    opt = nnx.Optimizer(model, optax.adam(1e-2),
                        wrt=compress.welore_trainable())
    trained = nnx.state(model, compress.welore_trainable())
    self.assertEqual(
        sorted(jax.tree_util.keystr(p) for p, _ in
               jax.tree_util.tree_leaves_with_path(
                   nnx.to_pure_dict(trained))),
        sorted(f"['{n}']['{f}']['kernel']" for n in ("heavy1", "heavy2")
               for f in ("down", "up")))
    before = {n: np.asarray(getattr(model, n).down.kernel[...])
              for n in ("heavy1", "heavy2")}

    @nnx.jit
    def step(model, opt):
      def loss_fn(m):
        return jnp.mean((m(x) - y) ** 2)
      loss, grads = nnx.value_and_grad(
          loss_fn, argnums=nnx.DiffState(0, compress.welore_trainable()))(
              model)
      opt.update(model, grads)
      return loss

    losses = [float(step(model, opt)) for _ in range(30)]
    self.assertLess(losses[-1], 0.8 * losses[0])
    for n, v in frozen.items():
      np.testing.assert_array_equal(getattr(model, n).kernel[...], v)
    for n, v in before.items():
      self.assertGreater(
          float(np.abs(getattr(model, n).down.kernel[...] - v).max()), 1e-4)


class _PeftNet(nnx.Module):
  """An embedding, a norm, an LRC, an N-LRC and a head (biases on)."""

  def __init__(self, rngs):
    self.embed = nnx.Embed(10, 8, rngs=rngs)
    self.norm = nnx.RMSNorm(8, rngs=rngs)
    self.lrc = nnx.Linear(8, 8, rngs=rngs)
    self.nlrc = nnx.Linear(8, 8, rngs=rngs)
    self.head = nnx.Linear(8, 4, rngs=rngs)


class WeLoreOfficialTest(absltest.TestCase):

  def _trained(self, model, wrt):
    return sorted(".".join(map(str, p)) for p, _ in nnx.to_flat_state(
        nnx.state(model, wrt)))

  def test_official_trainable_set(self):
    model = _PeftNet(nnx.Rngs(0))
    compress.compress(model, ranks={"lrc": 2})
    self.assertEqual(self._trained(model, compress.welore_trainable()),
                     ["lrc.down.kernel", "lrc.up.kernel"])
    # The official script: all but the embeddings, lm_head's weight and the
    # N-LRC weights.
    official = ["head.bias", "lrc.down.kernel", "lrc.up.bias",
                "lrc.up.kernel", "nlrc.bias", "norm.scale"]
    self.assertEqual(self._trained(
        model, compress.welore_trainable(norms_and_biases=True)), official)
    self.assertEqual(self._trained(model, compress.welore_trainable(
        **presets.paper("welore_trainable"))), official)


class _TwoLayer(nnx.Module):

  def __init__(self):
    self.l1 = nnx.Linear(8, 8, rngs=nnx.Rngs(0))
    self.l2 = nnx.Linear(8, 6, rngs=nnx.Rngs(1))

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(x)))


class EoRASequentialTest(absltest.TestCase):
  """`eora(batches=...)`: each layer calibrated on the compensated model."""

  X = (jax.random.normal(jax.random.key(0), (32, 8))
       * jnp.logspace(0, -1.5, 8)[None, :])

  def _compressed(self):
    """l1 LoRD rank 3 (a LowRankLinear), l2 rounded to multiples of 1/4."""
    model = _TwoLayer()
    orig = compress.dense_kernels(model, ["l1", "l2"])
    compress.compress(model, ranks={"l1": 3})
    model.l2.kernel.set_value(jnp.round(orig["l2"] * 4) / 4)
    return model, orig

  def test_layer_by_layer(self):
    model, orig = self._compressed()
    w_c1 = np.asarray(model.l1.dense_kernel())
    b1 = model.l1.up.bias.get_value()
    w_c2, b2 = model.l2.kernel.get_value(), model.l2.bias.get_value()
    report = compress.eora(model, originals=orig, batches=[self.X], rank=2,
                           **presets.paper("eora"))
    self.assertEqual(sorted(report), ["l1", "l2"])
    a1, e1 = compress.eigen_compensate(orig["l1"], w_c1, self.X, 2)
    np.testing.assert_allclose(model.l1.dense_kernel(), w_c1 + a1 @ e1,
                               atol=1e-5)
    # l2's inputs pass through the compensated l1.
    h = jnp.tanh(self.X @ (w_c1 + a1 @ e1) + b1[None])
    a2, e2 = compress.eigen_compensate(orig["l2"], w_c2, h, 2)
    np.testing.assert_allclose(model.l2.delta_weight(), a2 @ e2, atol=1e-5)
    np.testing.assert_allclose(
        model(self.X), h @ (w_c2 + a2 @ e2) + b2[None], atol=1e-5)
    # Calibrated on the uncompensated l1 instead, l2 gets other factors.
    h0 = jnp.tanh(self.X @ w_c1 + b1[None])
    a0, e0 = compress.eigen_compensate(orig["l2"], w_c2, h0, 2)
    self.assertGreater(float(jnp.abs(a0 @ e0 - a2 @ e2).max()), 1e-3)
    # One group: both calibrated at once, on the compressed model.
    model, orig = self._compressed()
    compress.eora(model, originals=orig, batches=[self.X], rank=2,
                  groups=[["l1", "l2"]])
    np.testing.assert_allclose(model.l2.delta_weight(), a0 @ e0, atol=1e-5)

  def test_bad_calibration_arguments(self):
    model, orig = self._compressed()
    cov = {p: jnp.eye(8) for p in orig}
    for kwargs, message in (
        ({}, "exactly one of covariances= .* got neither"),
        ({"covariances": cov, "batches": [self.X]}, "got both"),
        ({"covariances": cov, "groups": [["l1"], ["l2"]]},
         "groups= only applies with batches="),
        ({"batches": [self.X], "groups": [["l1"]]},
         r"missing: \['l2'\], not in originals: \[\]"),
        ({"batches": [self.X], "groups": [["l1", "l2"], ["l2"]]},
         r"in several groups: \['l2'\]"),
        ({"batches": [self.X], "groups": ["l1", "l2"]},
         "groups must be a list of lists of paths")):
      with self.subTest(message), self.assertRaisesRegex(ValueError,
                                                         message):
        compress.eora(model, originals=orig, rank=2, **kwargs)


class EoRATest(parameterized.TestCase):

  def _problem(self, n=256, d_in=24, d_out=16, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    w = jax.random.normal(keys[0], (d_in, d_out))
    w_c = w + 0.1 * jax.random.normal(keys[1], (d_in, d_out))
    scales = jnp.logspace(0, -2, d_in)
    rot = _orthonormal(keys[2], d_in, d_in)
    x = (jax.random.normal(keys[3], (n, d_in)) * scales[None, :]) @ rot.T
    return w, w_c, x

  def _optimum(self, w, w_c, x, r):
    """√Σ_{i>r} s_i² of L ΔW for XᵀX = L Lᵀ (float64, independent)."""
    x64 = np.asarray(x, np.float64)
    rt = np.linalg.cholesky(x64.T @ x64).T  # XᵀX = RᵀR, ‖X M‖ = ‖R M‖.
    s = np.linalg.svd(rt @ np.asarray(w - w_c, np.float64),
                      compute_uv=False)
    return np.sqrt(np.sum(s[r:] ** 2))

  @parameterized.parameters(1, 4, 8)
  def test_beats_plain_svd_and_is_optimal(self, rank):
    w, w_c, x = self._problem()
    a, b = compress.eigen_compensate(w, w_c, x, rank)
    self.assertEqual(a.shape, (24, rank))
    self.assertEqual(b.shape, (rank, 16))
    a_s, b_s = compress.svd_compensate(w, w_c, rank)
    delta = w - w_c
    e_eora = compress.weighted_error(delta - a @ b, x)
    e_svd = compress.weighted_error(delta - a_s @ b_s, x)
    e_none = compress.weighted_error(delta, x)
    np.testing.assert_allclose(
        e_eora, np.linalg.norm(np.asarray(x) @ np.asarray(delta - a @ b)),
        rtol=1e-4)
    np.testing.assert_allclose(e_eora, self._optimum(w, w_c, x, rank),
                               rtol=2e-3)
    self.assertLess(e_eora, 0.9 * e_svd)
    self.assertLess(e_svd, e_none)
    # The same from the covariance (any positive scale).
    a2, b2 = compress.eigen_compensate(w, w_c, x.T @ x / x.shape[0], rank)
    np.testing.assert_allclose(a2 @ b2, a @ b, atol=1e-3)

  def test_isotropic_inputs_give_plain_svd(self):
    w, w_c, _ = self._problem()
    x = 3.0 * _orthonormal(jax.random.key(9), 40, 24)  # XᵀX = 9 I.
    for rank in (2, 5):
      a, b = compress.eigen_compensate(w, w_c, x, rank)
      a_s, b_s = compress.svd_compensate(w, w_c, rank)
      np.testing.assert_allclose(a @ b, a_s @ b_s, atol=1e-4)

  def test_rank_deficient_inputs(self):
    w, w_c, x = self._problem(n=10)  # rank(XᵀX) = 10 < d_in = 24.
    a, b = compress.eigen_compensate(w, w_c, x, 4)
    self.assertTrue(bool(jnp.all(jnp.isfinite(a))))
    e = np.linalg.norm(np.asarray(x) @ np.asarray(w - w_c - a @ b))
    x64 = np.asarray(x, np.float64)
    s = np.linalg.svd(x64 @ np.asarray(w - w_c, np.float64),
                      compute_uv=False)
    np.testing.assert_allclose(e, np.sqrt(np.sum(s[4:] ** 2)), rtol=2e-3)

  def test_bad_inputs(self):
    w, w_c, x = self._problem()
    with self.assertRaisesRegex(ValueError, "same shape"):
      compress.eigen_compensate(w, w_c[:, :3], x, 2)
    with self.assertRaisesRegex(ValueError, r"\[\.\.\., d_in\]"):
      compress.eigen_compensate(w, w_c, x[:, :5], 2)
    with self.assertRaisesRegex(ValueError, "covariance must be"):
      compress.eigen_compensate(w, w_c, x, 2, kind="covariance")
    with self.assertRaisesRegex(ValueError, "covariance is zero"):
      compress.eigen_compensate(w, w_c, jnp.zeros((8, 24)), 2)
    with self.assertRaisesRegex(ValueError, r"rank must be in \[1, 16\]"):
      compress.eigen_compensate(w, w_c, x, 17)

  def test_widens_a_low_rank_layer_exactly(self):
    model = _llama()
    w = compress.dense_kernels(model, ["q_proj"])
    x = jax.random.normal(jax.random.key(4), (50, 64)) * jnp.logspace(
        0, -1.5, 64)[None, :]
    cov = {p: x.T @ x / 50 for p in w}
    compress.compress(model, targets=["q_proj"], rank=8)
    report = compress.eora(model, originals=w, covariances=cov, rank=4)
    for p, entry in report.items():
      m = _module(model, p)
      self.assertEqual(m.rank, 12)
      self.assertLess(entry["error_after"], entry["error_before"])
      np.testing.assert_allclose(
          compress.weighted_error(w[p] - m.dense_kernel(), cov[p]),
          entry["error_after"], rtol=1e-3)


class MiniLMTest(absltest.TestCase):
  """Quality on real text: all-MiniLM-L6-v2 on Lee-corpus sentences.

  Only the 12 query and value matrices (384 x 384) are compressed, to keep
  the SVD work small on a shared CPU.
  """

  TARGETS = r".*attention\.self\.(query|value)"

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    text = (assets.gensim_test_data_path() / "lee.cor").read_text(
        encoding="latin-1")
    sents = [s.strip() for d in text.splitlines() for s in d.split(". ")
             if len(s.split()) > 5]
    with _one_device_mesh():
      cls.model = bert.load_pretrained(assets.minilm_path())
      cls.tok = bert.load_tokenizer(assets.minilm_path())
    cls.model.eval()
    # Few, short texts: every forward of the 22M-parameter model costs.
    cls.calib = cls.tok(sents[:24], max_length=32, pad_to=32)
    cls.held = cls.tok(sents[100:112], max_length=32, pad_to=32)
    cls.e0 = cls._embed(cls.model, cls.held)

  @staticmethod
  def _embed(model, batch):
    return np.asarray(bert.encode(model, batch))

  def _cosine(self, model):
    return float(np.mean(np.sum(self._embed(model, self.held) * self.e0,
                                -1)))

  @staticmethod
  def _argument_bytes(model, ids):
    graphdef, state = nnx.split(model)
    f = jax.jit(lambda st, ids: nnx.merge(graphdef, st)(ids))
    return f.lower(state, ids).compile().memory_analysis(
    ).argument_size_in_bytes

  def test_lord_ratios_welore_and_compiled_memory(self):
    rows, cosines = [], []
    for rank in (288, 160, 64):
      model = nnx.clone(self.model)
      report = compress.compress(model, targets=self.TARGETS, rank=rank)
      cosines.append(self._cosine(model))
      rows.append((f"LoRD rank {rank}", report["param_reduction"],
                   cosines[-1]))
      if rank == 160:
        ids = self.held["input_ids"]
        saved = (self._argument_bytes(self.model, ids)
                 - self._argument_bytes(model, ids))
        self.assertEqual(saved, 4 * (report["params_before"]
                                     - report["params_after"]))
        print(f"MiniLM LoRD rank 160: compiled forward argument bytes "
              f"-{saved} ({report['params_before'] - report['params_after']}"
              f" params)")
    self.assertGreater(cosines[0], cosines[1])
    self.assertGreater(cosines[1], cosines[2])
    self.assertGreater(cosines[0], 0.9)

    model = nnx.clone(self.model)
    report = compress.welore_compress(model, targets=self.TARGETS, ratio=0.2,
                                      measure="params")
    self.assertGreaterEqual(report["param_reduction"], 0.2)
    self.assertLess(report["param_reduction"], 0.22)
    rows.append(("WeLore params 0.2", report["param_reduction"],
                 self._cosine(model)))
    by_kind = {}
    for p, e in report["layers"].items():
      kind = p.split("attention.")[1]
      by_kind.setdefault(kind, []).append(e["rank"])
    print("MiniLM WeLore ranks by matrix (layers 0-5; None = N-LRC):",
          by_kind)
    for row in rows:
      print("MiniLM attention %-18s param reduction %.3f  mean cosine to "
            "original %.4f" % row)

  def test_eora_beats_svd_on_nf4(self):
    def fwd(m, b):
      return m(b["input_ids"], attention_mask=b["attention_mask"])

    orig = compress.dense_kernels(self.model, self.TARGETS)
    cov = svd_init.collect_input_covariance(self.model, self.TARGETS,
                                            [self.calib], forward_fn=fwd)
    held_cov = svd_init.collect_input_covariance(self.model, self.TARGETS,
                                                 [self.held], forward_fn=fwd)
    base = nnx.clone(self.model)
    quantized.quantize_base(base, self.TARGETS, "nf4")
    w_c = compress.dense_kernels(base, self.TARGETS)
    cos = {"nf4": self._cosine(base)}
    held_err = {}
    for method in ("svd", "eigen"):
      model = nnx.clone(base)
      report = compress.eora(model, originals=orig, covariances=cov, rank=16,
                             method=method)
      self.assertLen(adapters.adapter_modules(model), 12)
      cos[method] = self._cosine(model)
      held_err[method] = {
          p: compress.weighted_error(
              orig[p] - w_c[p] - _module(model, p).delta_weight(),
              held_cov[p])
          for p in orig}
      if method == "eigen":
        for p, entry in report.items():
          self.assertLess(entry["error_after"], entry["error_before"])
    wins = np.mean([held_err["eigen"][p] < held_err["svd"][p] for p in orig])
    ratio = np.mean([held_err["eigen"][p] / held_err["svd"][p]
                     for p in orig])
    print(f"MiniLM nf4 attention + rank-16 compensation: mean cosine to "
          f"fp32 {cos}; held-out activation-weighted error EoRA/SVD = "
          f"{ratio:.3f} (EoRA lower on {wins:.0%} of {len(orig)} layers)")
    self.assertGreater(cos["eigen"], cos["svd"])
    self.assertGreater(cos["svd"], cos["nf4"])
    self.assertLess(ratio, 0.95)


if __name__ == "__main__":
  absltest.main()
