"""lowrank's GaLore family against its authors' update rules.

Each test runs `presets.paper(<factory>)` (the official settings) against a
numpy transcription of the official optimizer's `step` for a few steps on
a small matrix: galore-torch's and Fira's AdamW, FRUGAL's `GaloreAdamW`
and Q-GaLore's projector. The transcriptions work in torch's layout: a
lowrank kernel `[in, out]` is the transpose of torch's `nn.Linear.weight`
`[out, in]`, so they see `Gᵀ` and their weights are compared transposed.
Their SVD of `Gᵀ` is taken as the transpose of the SVD of `G` (which
lowrank computes in float32), so the singular vectors' arbitrary signs
agree; the rules under test are what happens around the decomposition.
"""

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np

from lowrank import optim
from lowrank import presets
from lowrank.optim import galore
from lowrank.optim import quantize as quant
from tests import testing


def _spiky(m, n, seeds, growth=1.0):
  """`{"w": [m, n]}` gradients with singular values `0.7**i` (× growth**t)."""
  out = []
  for t, seed in enumerate(seeds):
    k1, k2 = jax.random.split(jax.random.key(seed))
    u = jnp.linalg.qr(jax.random.normal(k1, (m, min(m, n))))[0]
    v = jnp.linalg.qr(jax.random.normal(k2, (n, min(m, n))))[0]
    s = 0.7 ** jnp.arange(min(m, n), dtype=jnp.float32) * growth**t
    out.append({"w": (u * s[None, :]) @ v.T})
  return out


def _train(tx, w0, grads):
  """lowrank's weights (numpy, `[in, out]`) after each step (float32)."""
  return testing.train_steps(tx, np.asarray(w0, np.float32), grads), None


def _torch_svd(g, rank):
  """`(U[:, :r], Vh[:r])` of torch's `Gᵀ` from lowrank's float32 SVD of G."""
  u, _, vh = np.linalg.svd(np.asarray(g, np.float32), full_matrices=False)
  return vh[:rank].T.astype(np.float64), u[:, :rank].T.astype(np.float64)


def _galore_fira_reference(w0, grads, *, lr, rank, gap, alpha, b1, b2, eps,
                           fira):
  """`AdamW.step` of galore-torch / Fira, transcribed (float64, wd 0).

  galore-torch: `galore_torch/adamw.py` and `galore_projector.py`
  (`proj_type="std"`) at jiaweizzhao/GaLore@2cc66f88cce1. Fira (`fira`):
  `optimizer_torch/fira_adamw.py:86-153` and `gradient_projection.py` at
  xichen-fy/Fira@5c28b1340828. Returns the torch-layout weights after each
  step and how many steps the norm-growth limiter shrank.
  """
  w, st, out, limited = np.array(w0, np.float64).T, {"step": 0}, [], 0
  for g in grads:
    g_low = np.asarray(g["w"])
    g = np.asarray(g_low, np.float64).T  # torch's [out, in] gradient.
    right = g.shape[0] >= g.shape[1]  # std
    if "ortho" not in st or st["step"] % gap == 0:
      left_u, right_vh = _torch_svd(g_low, rank)
      st["ortho"] = right_vh if right else left_u
    ortho = st["ortho"]
    low = g @ ortho.T if right else ortho.T @ g
    back = (lambda x: x @ ortho) if right else (lambda x: ortho @ x)
    if "exp_avg" not in st:
      st["exp_avg"], st["exp_avg_sq"] = np.zeros_like(low), np.zeros_like(low)
    st["step"] += 1
    t = st["step"]
    st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * low
    st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * low**2
    denom = np.sqrt(st["exp_avg_sq"]) + eps
    step_size = lr * np.sqrt(1 - b2**t) / (1 - b1**t)
    norm_grad = st["exp_avg"] / denom
    update = alpha * back(norm_grad)
    if fira:
      subgrad = alpha * back(low)
      norm_dim = 0 if norm_grad.shape[0] < norm_grad.shape[1] else 1
      phi = (np.linalg.norm(norm_grad, axis=norm_dim)
             / (np.linalg.norm(low, axis=norm_dim) + 1e-8))
      if norm_dim == 1:
        phi = phi[:, None]
      scaling_grad = (g - subgrad) * phi
      if "scaling_grad" in st:
        sg_norm = np.linalg.norm(scaling_grad)
        limiter = max(sg_norm / (st["scaling_grad"] + 1e-8), 1.01) / 1.01
        limited += limiter > 1
        scaling_grad = scaling_grad / limiter
        st["scaling_grad"] = sg_norm / limiter
      else:
        st["scaling_grad"] = np.linalg.norm(scaling_grad)
      update = update + scaling_grad
    w = w - step_size * update
    out.append(w.T.copy())
  return out, limited


class GaLoreAndFiraTest(parameterized.TestCase):

  def _against_reference(self, name, m, n, seed, atol, **changes):
    """lowrank's `name` with its paper preset (plus `changes`) and the
    numpy transcription, on the same spiky gradients: (ours, ref, limited).
    """
    r, gap, lr, alpha = 4, 3, 1e-2, 0.25
    grads = _spiky(m, n, range(seed, seed + 7))
    w0 = np.asarray(jax.random.normal(jax.random.key(seed), (m, n)))
    ref, limited = _galore_fira_reference(
        w0, grads, lr=lr, rank=r, gap=gap, alpha=alpha, b1=0.9, b2=0.999,
        eps=1e-6, fira=name == "fira_adamw")
    ours, _ = _train(getattr(optim, name)(
        lr, rank=r, refresh_every=gap, scale=alpha,
        **{**presets.paper(name), **changes}), w0, grads)
    if atol is not None:
      for t, (a, b) in enumerate(zip(ours, ref)):
        np.testing.assert_allclose(a, b, atol=atol, err_msg=f"step {t}")
    return ours, ref, limited

  # (20, 12): std projects torch's 12-wide input axis; (16, 16): a square
  # kernel, whose input axis is lowrank's rows (side="torch" -> "left").
  @parameterized.parameters((20, 12), (16, 16))
  def test_fira_preset_matches_transcription(self, m, n):
    _, ref, limited = self._against_reference("fira_adamw", m, n, 300, 3e-5)
    self.assertGreater(limited, 2)  # The limiter is exercised.
    # The limiter on the bias-corrected residual (lowrank's old default)
    # is off by far more than that.
    old, _, _ = self._against_reference("fira_adamw", m, n, 300, None,
                                        limiter="corrected")
    self.assertGreater(np.abs(old[-1] - ref[-1]).max(), 1e-3)

  @parameterized.parameters((20, 12), (16, 16))
  def test_galore_preset_matches_transcription(self, m, n):
    self._against_reference("galore_adamw", m, n, 400, 2e-6)

  def test_torch_eps_placement(self):
    # One step on a tiny gradient (a 1-D leaf: Adam sees it unprojected).
    # galore-torch: m / (sqrt(v) + eps) * sqrt(1 - b2) / (1 - b1); optax:
    # m_hat / (sqrt(v_hat) + eps).
    g, eps = 1e-4, 1e-6
    params = {"b": jnp.zeros(4)}
    got = {}
    for placement in ("torch", "optax"):
      tx = optim.galore_adamw(1.0, rank=2, eps=eps, eps_placement=placement)
      u, _ = tx.update({"b": jnp.full(4, g)}, tx.init(params), params)
      got[placement] = np.asarray(u["b"])
    c = np.sqrt(1 - 0.999) / (1 - 0.9)
    torch_rule = c * (0.1 * g) / (np.sqrt(0.001) * g + eps)
    np.testing.assert_allclose(got["torch"], -torch_rule, rtol=1e-5)
    np.testing.assert_allclose(got["optax"], -g / (g + eps), rtol=1e-5)

  @parameterized.parameters(
      (dict(eps_placement="numpy"), "Unknown eps_placement 'numpy'"),
      (dict(fira_limiter="both"), "Unknown fira_limiter 'both'"),
      (dict(projector_quantizer="flat"), "Unknown projector_quantizer"))
  def test_unknown_options(self, kw, message):
    with self.assertRaisesRegex(ValueError, message):
      optim.galore_adamw(1e-3, rank=2, **kw)


def _frugal_reference(w0, grads, *, lr, density, gap, b1, b2, eps,
                      inactive_lr_scale):
  """FRUGAL's `GaloreOptimizer` (AdamW inside) step, transcribed (float64).

  `ProjOptimizer.step`, `_update_states_if_necessary`,
  `GaloreOptimizer._update_states` / `_proj_params_update` in
  `frugal/proj_optimizer_templates.py`, `GaLoreProjector` (`proj_side=
  'std'`, `proj_type='svd'`, rank `round(density · dim)`) in
  `frugal/galore_projector.py` and `AdamW._init_state` / `_compute_update`
  in `frugal/adamw.py`, at hungquangbui02022003/FRUGAL@c7ebe4c242f7 (a fork
  of philip-zmushko/FRUGAL); `reset_statistics=True`,
  `inactive_update_rule='sign_sgd'`, weight decay 0.
  """
  w, st, out = np.array(w0, np.float64).T, {}, []
  for g in grads:
    g_low = np.asarray(g["w"])
    g = np.asarray(g_low, np.float64).T
    right = g.shape[0] >= g.shape[1]
    rank = round((g.shape[1] if right else g.shape[0]) * density)
    if "step" not in st or st["step"] % gap == 0:  # a refresh, and a reset
      left_u, right_vh = _torch_svd(g_low, rank)
      ortho = right_vh if right else left_u
      shape = (g.shape[0], rank) if right else (rank, g.shape[1])
      st = {"ortho": ortho, "step": 0, "exp_avg": np.zeros(shape),
            "exp_avg_sq": np.zeros(shape)}
    ortho = st["ortho"]
    down = (lambda x: x @ ortho.T) if right else (lambda x: ortho.T @ x)
    up = (lambda x: x @ ortho) if right else (lambda x: ortho @ x)
    st["step"] += 1
    t = st["step"]
    low = down(g)
    st["exp_avg"] = b1 * st["exp_avg"] + (1 - b1) * low
    st["exp_avg_sq"] = b2 * st["exp_avg_sq"] + (1 - b2) * low**2
    denom = np.sqrt(st["exp_avg_sq"]) / np.sqrt(1 - b2**t) + eps
    update = up(st["exp_avg"] / denom * (-lr / (1 - b1**t)))
    update += -lr * inactive_lr_scale * np.sign(g - up(low))
    w = w + update
    out.append(w.T.copy())
  return out


class FrugalTest(parameterized.TestCase):

  # Torch's [12, 20] weight: std projects its 12-dim output axis (rank
  # round(0.25 * 12) = 3); [16, 16]: the input axis (rank 4).
  @parameterized.parameters((20, 12, 3), (16, 16, 4))
  def test_preset_matches_transcription(self, m, n, rank):
    lr, gap = 1e-2, 3
    grads = _spiky(m, n, range(500, 508))  # Refreshes at 0, 3, 6.
    w0 = np.asarray(jax.random.normal(jax.random.key(5), (m, n)))
    ref = _frugal_reference(w0, grads, lr=lr, density=0.25, gap=gap, b1=0.9,
                            b2=0.999, eps=1e-8, inactive_lr_scale=1.0)
    ours, _ = _train(optim.frugal_adamw(
        lr, rank=rank, refresh_every=gap, **presets.paper("frugal_adamw")),
                     w0, grads)
    for t, (a, b) in enumerate(zip(ours, ref)):
      np.testing.assert_allclose(a, b, atol=2e-5, err_msg=f"step {t}")

  def test_default_projector_is_frugals_svd(self):
    params = {"w": jnp.zeros((20, 12))}
    g = _spiky(20, 12, [7])[0]
    tx = optim.frugal_adamw(1e-2, rank=3)
    _, state = tx.update(g, tx.init(params), params)
    p = np.asarray(state[0].projector["w"])  # left: [20, 3]
    u = np.linalg.svd(np.asarray(g["w"]), full_matrices=False)[0][:, :3]
    np.testing.assert_allclose(np.abs(p.T @ u), np.eye(3), atol=1e-4)


def _qgalore_quantize(w, group, bits):
  """`GaLoreProjector._quantize` (q_galore_projector.py:148-168), float32."""
  shape = w.shape
  w = np.asarray(w, np.float32).reshape(-1, group)
  hi, lo = w.max(axis=1, keepdims=True), w.min(axis=1, keepdims=True)
  top = 2**bits - 1
  scales = np.maximum(hi - lo, np.float32(1e-5)) / np.float32(top)
  zeros = np.clip(-np.round(lo / scales), 0, top)
  q = np.clip(np.round(w / scales) + zeros, 0, top)
  return (scales * (q - zeros)).reshape(shape)  # dequantized (:54-55)


def _qgalore_reference(grads, *, rank, gap, alpha, b1, b2, eps, bits, group,
                       threshold, gamma, queue_size, signed=True):
  """Q-GaLore's projector (`GaLoreProjector.project` / `project_back`,
  `q_galore_torch/q_galore_projector.py:31-107` at
  VITA-Group/Q-GaLore@5bd2f1c5a1ad, `proj_type='std'`, `quant=True`) around
  a float32-style Adam (optax's placement; the official inner optimizer is
  bitsandbytes' 8-bit AdamW, which lowrank does not reproduce here).
  Returns lowrank-layout updates (before the learning rate), the steps
  that refreshed and the final gap. `signed=False` takes `|cos|` (lowrank's
  default) instead of the official signed cosine.
  """
  st = {"past": None, "queue": [], "gap": gap, "ortho": None}
  m_, v_, out, refreshed = None, None, [], []
  for it, g in enumerate(grads):  # `iter` is state["step"] before += 1.
    g_low = np.asarray(g["w"])
    g = np.asarray(g_low, np.float64).T
    right = g.shape[0] >= g.shape[1]
    if st["ortho"] is None or it % st["gap"] == 0:
      refreshed.append(it)
      left_u, right_vh = _torch_svd(g_low, rank)
      new = right_vh if right else left_u
      first = new[:1, :].ravel() if right else new[:, :1].ravel()
      if st["past"] is not None:
        if len(st["queue"]) == queue_size:
          st["queue"].pop(0)
        cos = st["past"] @ first / max(
            np.linalg.norm(st["past"]) * np.linalg.norm(first), 1e-8)
        st["queue"].append(cos if signed else abs(cos))  # official: signed
        if (len(st["queue"]) == queue_size
            and sum(st["queue"]) / queue_size >= threshold):
          st["gap"] = int(st["gap"] * gamma)
      st["past"] = first
      st["ortho"] = _qgalore_quantize(new, group, bits).astype(np.float64)
    ortho = st["ortho"]
    low = g @ ortho.T if right else ortho.T @ g
    m_ = (1 - b1) * low if m_ is None else b1 * m_ + (1 - b1) * low
    v_ = (1 - b2) * low**2 if v_ is None else b2 * v_ + (1 - b2) * low**2
    t = it + 1
    n = (m_ / (1 - b1**t)) / (np.sqrt(v_ / (1 - b2**t)) + eps)
    out.append((alpha * (n @ ortho if right else ortho @ n)).T)
  return out, refreshed, st["gap"]


class QGaLoreTest(parameterized.TestCase):

  # (24, 16): torch's [16, 24] weight, std -> left (U stored [16, r]);
  # (16, 24): right (Vh[:r] stored [r, 16], groups along a basis vector).
  @parameterized.parameters((24, 16, True), (16, 24, False))
  def test_preset_matches_transcription(self, m, n, signed):
    r, gap, alpha, group = 4, 2, 0.25, 16
    # A fixed gradient plus noise: bases stable enough for the gap to grow
    # at every refresh after the first (cos_history=1), yet each refresh
    # moves the basis, so refresh steps show in the updates.
    base = _spiky(m, n, [600])[0]["w"]
    grads = [{"w": base + 0.05 * jax.random.normal(jax.random.key(i),
                                                   (m, n))}
             for i in range(9)]
    kw = presets.paper("q_galore_adamw")
    # The SVD's signs decide whether a signed cosine is near 1 or -1; with
    # `|cos|` (signed=False) every refresh after the first grows the gap.
    kw["signed_cosine"] = signed
    ref, refreshed, ref_gap = _qgalore_reference(
        grads, rank=r, gap=gap, alpha=alpha, b1=0.9, b2=kw["b2"], eps=1e-8,
        bits=4, group=group, threshold=0.4, gamma=2, queue_size=1,
        signed=signed)
    if not signed:
      # Multiples of the growing gap (2, 4, 8): counting the gap from the
      # last refresh would refresh at 0, 2, 6.
      self.assertEqual(refreshed, [0, 2, 4, 8])
    tx = optim.q_galore_adamw(1.0, rank=r, refresh_every=gap, scale=alpha,
                              cos_history=1, projector_group_size=group, **kw)
    params = {"w": jnp.zeros((m, n))}
    state = tx.init(params)
    for t, (g, want) in enumerate(zip(grads, ref)):
      u, state = tx.update(g, state, params)
      np.testing.assert_allclose(-np.asarray(u["w"]), want, atol=2e-5,
                                 err_msg=f"step {t}")
    self.assertEqual(int(state[0].schedule["w"].gap), ref_gap)

  def test_signed_cosine_counts_a_flipped_vector_as_unstable(self):
    # The first basis vector flips sign between refreshes.
    v = np.array([0.6, 0.8, 0.0], np.float32)
    sched = galore.RefreshSchedule(
        next_refresh=jnp.asarray(4), gap=jnp.asarray(4),
        history=jnp.zeros(1), num_history=jnp.asarray(0),
        first_vector=jnp.asarray(v))
    for signed, gap in ((True, 4), (False, 8)):
      opts = galore._Options(  # pylint: disable=protected-access
          **{f: None for f in galore._Options._fields} | dict(
              cos_history=1, cos_threshold=0.4, gap_growth=2,
              signed_cosine=signed))
      new = galore._next_schedule(  # pylint: disable=protected-access
          sched, jnp.asarray(-v), jnp.asarray(True), jnp.asarray(4), opts)
      self.assertEqual(int(new.gap), gap)
      np.testing.assert_allclose(new.history, [-1.0 if signed else 1.0],
                                 atol=1e-6)

  def test_flat_quantizer_matches_qgalores(self):
    # One-signed and near-constant groups: the zero point clamps at 0 and
    # the scale floor applies (lowrank's rank-group quantizer does neither).
    z = np.random.default_rng(0).normal(size=48)
    x = np.concatenate([np.abs(z[:16]) + 0.2, np.full(16, 0.3), z[16:]])
    x = x.astype(np.float32).reshape(8, 8)
    for transpose, stored in ((False, x), (True, x.T)):
      q = quant.quantize_flat(jnp.asarray(x), 4, 16, transpose=transpose)
      back = quant.dequantize_flat(q, 4, 16, rank=8, transpose=transpose)
      want = _qgalore_quantize(stored, 16, 4)
      np.testing.assert_allclose(np.asarray(back),
                                 want.T if transpose else want, atol=1e-7)
    self.assertEqual(q.codes.shape, (1, 32))  # 64 4-bit codes, packed.

  def test_flat_groups_must_divide_each_projector(self):
    tx = optim.q_galore_adamw(1e-2, rank=4, **presets.paper("q_galore_adamw"))
    with self.assertRaisesRegex(ValueError,
                                r"group_size=256 must divide .* 64 elements"):
      tx.init({"w": jnp.zeros((24, 16))})


class PresetsTest(parameterized.TestCase):

  @parameterized.parameters("galore_adamw", "q_galore_adamw", "fira_adamw",
                            "frugal_adamw")
  def test_paper_preset_builds_and_steps(self, name):
    factory = getattr(optim, name)
    self.assertIn("@", presets.get(factory).source)
    tx = factory(1e-2, rank=4, **presets.paper(name))
    params = {"w": jnp.zeros((64, 128))}  # 4·64 = 256 (Q-GaLore's group).
    u, _ = tx.update({"w": jnp.ones((64, 128))}, tx.init(params), params)
    self.assertTrue(bool(jnp.all(jnp.isfinite(u["w"]))))


if __name__ == "__main__":
  absltest.main()
