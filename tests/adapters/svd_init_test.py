"""Tests for PiSSA / OLoRA / CorDA inits (`lowrank.adapters.svd_init`)."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank import adapters
from lowrank import sharding
from lowrank.adapters import dora  # pylint: disable=unused-import
from lowrank.adapters import layers
from lowrank.adapters import lora_xs  # pylint: disable=unused-import
from lowrank.adapters import svd_init

from tests import testing

_D = 12
_TARGETS = ["lin", "gen", "ein"]
_X = jax.random.normal(jax.random.key(7), (2, 5, _D)) * jnp.linspace(
    0.2, 3.0, _D)[None, None, :]
_INITS = ("pissa", "pissa_niter_4", "olora", "corda", "corda_ipm",
          "corda_kpm")


def _toy(rngs):
  """Linear, LinearGeneral and a permuting Einsum (all with biases)."""
  return testing.PermutingToy(rngs, _D, logical=False)


def _kernels(model):
  return {p: np.asarray(getattr(model, p).kernel[...]) for p in _TARGETS}


def _inject(model, init, method="lora", rank=3, alpha=6.0, **kw):
  data = None
  if init.startswith("corda"):
    data = svd_init.collect_input_covariance(model, _TARGETS, [_X, 2 * _X])
  return adapters.inject(model, targets=_TARGETS, method=method, rank=rank,
                         alpha=alpha, init=init, init_data=data, **kw)


class InitTest(parameterized.TestCase):

  @parameterized.product(init=_INITS, method=("lora", "dora"))
  def test_output_unchanged_and_merge_gives_back_w(self, init, method):
    model = _toy(nnx.Rngs(0))
    y0, k0 = model(_X), _kernels(model)
    _inject(model, init, method=method)
    for p, m in adapters.adapter_modules(model).items():
      self.assertEqual(m.init, init)
      # The base now holds a residual, not W.
      self.assertGreater(
          float(np.abs(np.asarray(m.base.kernel[...]) - k0[p]).max()), 1e-3)
    np.testing.assert_allclose(model(_X), y0, atol=2e-5)
    adapters.merge(model)
    for p, m in adapters.adapter_modules(model).items():
      np.testing.assert_allclose(m.base.kernel[...], k0[p], atol=2e-6)
    np.testing.assert_allclose(model(_X), y0, atol=2e-5)
    adapters.unmerge(model)
    np.testing.assert_allclose(model(_X), y0, atol=2e-5)

  def test_pissa_takes_the_principal_part(self):
    lin = nnx.Linear(10, 8, rngs=nnx.Rngs(0))
    w = np.asarray(lin.kernel[...])
    m = layers.LoRALinear(lin, rank=3, alpha=6.0, rngs=nnx.Rngs(1))
    layers.INITIALIZERS["pissa"](m, None, jax.random.key(0))
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    principal = (u[:, :3] * s[:3]) @ vt[:3]
    a, b = np.asarray(m.lora_a[...]), np.asarray(m.lora_b[...])
    np.testing.assert_allclose(m.scale * a @ b, principal, atol=1e-5)
    # A = P_r √(S_r/s): orthogonal columns with squared norms S_r / s.
    np.testing.assert_allclose(a.T @ a, np.diag(s[:3] / m.scale), atol=1e-5)
    np.testing.assert_allclose(b @ b.T, np.diag(s[:3] / m.scale), atol=1e-5)
    res_s = np.linalg.svd(np.asarray(lin.kernel[...]), compute_uv=False)
    np.testing.assert_allclose(res_s[:5], s[3:], atol=1e-5)

  def test_olora_uses_qr_factors(self):
    lin = nnx.Linear(10, 8, rngs=nnx.Rngs(0))
    w = np.asarray(lin.kernel[...])
    m = layers.LoRALinear(lin, rank=3, alpha=3.0, rngs=nnx.Rngs(1))
    layers.INITIALIZERS["olora"](m, None, jax.random.key(0))
    b = np.asarray(m.lora_b[...])  # Q[:, :r]ᵀ: orthonormal rows.
    np.testing.assert_allclose(b @ b.T, np.eye(3), atol=1e-5)
    q, r = np.linalg.qr(w.T)
    np.testing.assert_allclose(np.abs(m.lora_a[...]), np.abs(r[:3].T),
                               atol=1e-5)

  @parameterized.parameters("ipm", "kpm")
  def test_corda_components(self, mode):
    lin = nnx.Linear(10, 8, rngs=nnx.Rngs(0))
    w = np.asarray(lin.kernel[...], np.float64)
    x = np.random.RandomState(0).randn(50, 10) * np.linspace(0.1, 3, 10)
    cov = x.T @ x / 50
    m = layers.LoRALinear(lin, rank=3, alpha=6.0, rngs=nnx.Rngs(1))
    layers.INITIALIZERS["corda"](
        m, {"covariance": jnp.asarray(cov, jnp.float32), "mode": mode},
        jax.random.key(0))
    fixed = cov + np.eye(10) * 0.01 * np.mean(np.diag(cov))
    sv = np.linalg.svd(fixed @ w, compute_uv=False)
    delta = m.scale * np.asarray(m.lora_a[...] @ m.lora_b[...], np.float64)
    got = np.linalg.svd(fixed @ delta, compute_uv=False)[:3]
    want = sv[:3] if mode == "ipm" else sv[-3:]
    np.testing.assert_allclose(got, want, rtol=1e-4)
    # The base keeps the complement: C'(W - ΔW) has the other values.
    rest = np.linalg.svd(fixed @ np.asarray(lin.kernel[...], np.float64),
                         compute_uv=False)[:5]
    other = sv[3:] if mode == "ipm" else sv[:5]
    np.testing.assert_allclose(rest, other, rtol=1e-4, atol=1e-5)

  def test_randomized_svd_close_to_exact(self):
    k1, k2, k3 = jax.random.split(jax.random.key(0), 3)
    w = (jax.random.normal(k1, (40, 4)) @ jax.random.normal(k2, (4, 30))
         + 0.01 * jax.random.normal(k3, (40, 30)))
    u, s, vt = svd_init.randomized_svd(w, 4, 4, jax.random.key(1))
    np.testing.assert_allclose(s, jnp.linalg.svd(w, compute_uv=False)[:4],
                               rtol=1e-3)
    np.testing.assert_allclose(u.T @ u, np.eye(4), atol=1e-5)
    np.testing.assert_allclose((u * s[None, :]) @ vt, w, atol=0.1)
    self.assertEqual(svd_init.pissa_niter(3), "pissa_niter_3")
    self.assertIn("pissa_niter_3", layers.INITIALIZERS)
    self.assertEqual(svd_init.pissa_niter(3), "pissa_niter_3")  # idempotent
    with self.assertRaisesRegex(ValueError, "non-negative int"):
      svd_init.pissa_niter(-1)

  def test_pissa_init_trains_under_jit(self):
    with sharding.use_mesh():
      model = _toy(nnx.Rngs(0))
      _inject(model, "pissa")
    target = jnp.cos(_X.sum(-1))[..., None] * jnp.ones((1, 1, 6))
    losses = testing.train_lora(
        model, optax.adamw(1e-2), lambda m: jnp.mean((m(_X) - target) ** 2),
        15)
    self.assertLess(losses[-1], 0.8 * losses[0])

  def test_errors(self):
    model = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "needs init_data"):
      adapters.inject(model, targets=["lin"], rank=2, init="corda")
    model = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, r"\[d_in, d_in\] = \[12, 12\]"):
      adapters.inject(model, targets=["lin"], rank=2, init="corda",
                      init_data={"lin": jnp.eye(5)})
    with self.assertRaisesRegex(ValueError, "mode must be one of"):
      adapters.inject(model, targets=["gen"], rank=2, init="corda",
                      init_data={"gen": {"covariance": jnp.eye(_D),
                                         "mode": "xyz"}})
    with self.assertRaisesRegex(ValueError, "fixes mode 'kpm'"):
      adapters.inject(model, targets=["ein"], rank=2, init="corda_kpm",
                      init_data={"ein": {"covariance": jnp.eye(_D),
                                         "mode": "ipm"}})
    model = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "mean diagonal"):
      adapters.inject(model, targets=["lin"], rank=2, init="corda",
                      init_data={"lin": jnp.zeros((_D, _D))})
    model = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "takes no init_data"):
      adapters.inject(model, targets=["lin"], rank=2, init="pissa",
                      init_data={"lin": jnp.eye(_D)})
    model = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, r"rank <= min\(d_in, d_out\) = 6"):
      adapters.inject(model, targets=["gen"], rank=7, init="olora")
    model = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "positive scale"):
      adapters.inject(model, targets=["lin"], rank=2, alpha=-1.0,
                      init="pissa")
    model = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "no such factors"):
      adapters.inject(model, targets=["lin"], rank=2, method="lora_xs",
                      init="pissa")


class CovarianceTest(absltest.TestCase):

  def test_matches_manual_covariance_and_restores_model(self):
    model = _toy(nnx.Rngs(0))
    lin, ein = model.lin, model.ein
    y0 = model(_X)
    cov = svd_init.collect_input_covariance(model, _TARGETS, [_X, 2 * _X])
    self.assertIs(model.lin, lin)
    self.assertIs(model.ein, ein)
    self.assertEmpty(adapters.adapter_modules(model))
    self.assertNotIn("_input_probe", layers.METHODS)
    np.testing.assert_array_equal(model(_X), y0)
    xs = np.concatenate([np.asarray(_X), 2 * np.asarray(_X)]).reshape(-1, _D)
    np.testing.assert_allclose(cov["lin"], xs.T @ xs / len(xs), rtol=1e-5)
    h = np.concatenate([np.tanh(np.asarray(lin(_X))),
                        np.tanh(np.asarray(lin(2 * _X)))]).reshape(-1, _D)
    np.testing.assert_allclose(cov["ein"], h.T @ h / len(h), rtol=1e-4,
                               atol=1e-6)
    np.testing.assert_allclose(cov["gen"], cov["ein"], rtol=1e-6)

  def test_under_nnx_jit_and_errors(self):
    model = _toy(nnx.Rngs(0))
    fwd = nnx.jit(lambda m, x: m(x))
    cov = svd_init.collect_input_covariance(model, ["lin"], [_X], fwd)
    xs = np.asarray(_X).reshape(-1, _D)
    np.testing.assert_allclose(cov["lin"], xs.T @ xs / len(xs), rtol=1e-5)
    with self.assertRaisesRegex(ValueError, "no batches"):
      svd_init.collect_input_covariance(model, ["lin"], [])
    self.assertEmpty(adapters.adapter_modules(model))
    with self.assertRaisesRegex(ValueError, "never ran"):
      svd_init.collect_input_covariance(
          model, ["lin", "gen"], [_X], lambda m, x: m.lin(x))
    with self.assertRaisesRegex(ValueError, "matched no module"):
      svd_init.collect_input_covariance(model, ["nope"], [_X])
    self.assertEqual(svd_init.matched_paths(model, "all-linear"),
                     sorted(_TARGETS))
    self.assertEmpty(adapters.adapter_modules(model))


@pytest.mark.oracle
class PeftParityTest(parameterized.TestCase):
  """Residual kernel and `s·A B` equal PEFT's for the same weights."""

  @parameterized.parameters("pissa", "olora", "corda_ipm", "corda_kpm")
  def test_matches_peft(self, init):
    torch, peft, net = testing.torch_linear_under_peft(10, 7)
    # pylint: disable=g-import-not-at-top
    from peft.tuners.lora import config as peft_config
    from peft.tuners.lora import corda as peft_corda
    # pylint: enable=g-import-not-at-top
    w = net.lin.weight.detach().numpy().copy()
    x = np.random.RandomState(0).randn(20, 10).astype(np.float32)
    x[:, 0] *= 5
    kw = {}
    if init.startswith("corda"):
      kw["corda_config"] = peft_config.CordaConfig(corda_method=init[-3:])
    cfg = peft.LoraConfig(r=3, lora_alpha=5, target_modules=["lin"],
                          init_lora_weights=init.split("_")[0], **kw)
    if init.startswith("corda"):
      peft_corda.preprocess_corda(net, cfg,
                                  run_model=lambda: net(torch.tensor(x)))
    lin = peft.get_peft_model(net, cfg).base_model.model.lin
    a_t = lin.lora_A["default"].weight.detach().numpy()
    b_t = lin.lora_B["default"].weight.detach().numpy()

    jlin = nnx.Linear(10, 7, rngs=nnx.Rngs(0))
    jlin.kernel.set_value(jnp.asarray(w.T))
    m = layers.LoRALinear(jlin, rank=3, alpha=5, rngs=nnx.Rngs(0))
    data = None
    if init.startswith("corda"):
      data = jnp.asarray(x.T @ x / len(x))
    layers.INITIALIZERS[init](m, data, jax.random.key(0))
    np.testing.assert_allclose(
        m.base.kernel[...].T, lin.base_layer.weight.detach().numpy(),
        atol=2e-6)
    np.testing.assert_allclose(
        (m.lora_a[...] @ m.lora_b[...]).T, b_t @ a_t, atol=2e-6)


if __name__ == "__main__":
  absltest.main()
