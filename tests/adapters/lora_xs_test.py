"""Tests for LoRA-XS, LoRA-SB and LoLDU (`lowrank.adapters.lora_xs`)."""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import adapters
from lowrank import presets
from lowrank import sharding
from lowrank import train
from lowrank.adapters import layers
from lowrank.adapters import lora_xs

from tests import testing

_D = 12
_R = 3
_TARGETS = ["lin", "gen", "ein"]
_X = jax.random.normal(jax.random.key(7), (2, 5, _D))
_Y = jnp.cos(_X.sum(-1))[..., None] * jnp.ones((1, 1, 6))


def _toy(rngs):
  """Linear, LinearGeneral and a permuting Einsum."""
  return testing.PermutingToy(rngs, _D)


def _loss(model, batch=_X):
  return jnp.mean((model(batch) - _Y) ** 2)


def _model(method, **kw):
  with sharding.use_mesh():
    model = _toy(nnx.Rngs(0))
    y0 = model(_X)
    adapters.inject(model, targets=_TARGETS, method=method, rank=_R, **kw)
  return model, y0


def _perturb(model, seed=1):
  """Moves every trainable leaf so the adapter changes the output."""
  for i, m in enumerate(adapters.adapter_modules(model).values()):
    for j, (_, var) in enumerate(nnx.iter_graph(m)):
      if isinstance(var, nnx.LoRAParam):
        v = var.get_value()
        key = jax.random.fold_in(jax.random.key(seed), 10 * i + j)
        var.set_value(v + 0.3 * jax.random.normal(key, v.shape, v.dtype))


def _train(model, steps=20, lr=3e-2):
  return testing.train_lora(model, optax.adamw(lr), _loss, steps)


def _trainable_names(model):
  diff = nnx.DiffState(0, nnx.LoRAParam)
  grads = nnx.grad(lambda m: jnp.mean(jnp.sin(m(_X))), argnums=diff)(model)
  out = {}
  for path, v in nnx.to_flat_state(grads):
    assert isinstance(v, nnx.LoRAParam), path
    out[tuple(str(p) for p in path)] = float(jnp.abs(v[...]).max())
  return out


class _MeshTest(parameterized.TestCase):
  """Builds the logically-partitioned toy inside a mesh, as users must."""

  def setUp(self):
    super().setUp()
    self.enter_context(sharding.use_mesh())


_PARAMS = {"lora_xs": ("lora_latent",), "loldu": ("lora_diag", "lora_scale")}


class CommonTest(_MeshTest):
  """Evidence both methods need."""

  @parameterized.parameters("lora_xs", "loldu")
  def test_identity_at_init_and_merge_roundtrip(self, method):
    model, y0 = _model(method, alpha=6.0)
    np.testing.assert_array_equal(model(_X), y0)
    kernels = {p: m.base.kernel[...]
               for p, m in adapters.adapter_modules(model).items()}
    _perturb(model)
    y = model(_X)
    self.assertGreater(float(jnp.abs(y - y0).max()), 1e-2)
    adapters.merge(model)
    np.testing.assert_allclose(model(_X), y, atol=1e-5)
    adapters.unmerge(model)
    for p, m in adapters.adapter_modules(model).items():
      np.testing.assert_allclose(m.base.kernel[...], kernels[p], atol=1e-6)
    np.testing.assert_allclose(model(_X), y, atol=1e-5)
    with adapters.disabled(model):
      np.testing.assert_allclose(model(_X), y0, atol=1e-6)

  @parameterized.parameters("lora_xs", "loldu")
  def test_only_the_small_leaves_train_and_count(self, method):
    model, _ = _model(method)
    _perturb(model)
    names = _trainable_names(model)
    self.assertEqual(set(names),
                     {(t, n) for t in _TARGETS for n in _PARAMS[method]})
    self.assertTrue(all(v > 0 for v in names.values()), names)
    per_module = lora_xs.trainable_parameters(method, _R)
    self.assertEqual(per_module, _R * _R if method == "lora_xs" else _R + 1)
    self.assertEqual(adapters.count_parameters(model)["trainable"],
                     3 * per_module)
    for m in adapters.adapter_modules(model).values():
      self.assertEqual(m.num_trainable(), per_module)

  @parameterized.parameters("lora_xs", "loldu")
  def test_jit_adamw_training_reduces_loss(self, method):
    model, _ = _model(method)
    kernel = model.gen.base.kernel[...]
    losses = _train(model)
    self.assertLess(losses[-1], 0.8 * losses[0])
    np.testing.assert_array_equal(model.gen.base.kernel[...], kernel)

  @parameterized.parameters(("lora_xs", {"r_init_std": 0.01}),
                            ("lora_xs", {"singular_values": "a"}),
                            ("loldu", {"train_scale": False}),
                            ("loldu", {}))
  def test_save_and_load_adapter_roundtrip(self, method, options):
    model, _ = _model(method, alpha=2.0, **options)
    _perturb(model)
    y = model(_X)
    for m in adapters.adapter_modules(model).values():
      self.assertEqual(m.options(), {**m.options(), **options})
    directory = self.create_tempdir().full_path
    adapters.save_adapters(directory, model)
    fresh = _toy(nnx.Rngs(0))
    adapters.load_adapters(directory, fresh, rngs=9)
    for p, m in adapters.adapter_modules(fresh).items():
      self.assertEqual(m.method, method, p)
      self.assertEqual(m.options(), {**m.options(), **options})
    np.testing.assert_allclose(fresh(_X), y, atol=1e-6)


class LoraXsTest(_MeshTest):

  @parameterized.parameters("a", "b")
  def test_bases_from_truncated_svd(self, side):
    lin = nnx.Linear(10, 8, rngs=nnx.Rngs(0))
    w = np.asarray(lin.kernel[...])
    m = lora_xs.LoRAXS(lin, rank=3, rngs=nnx.Rngs(1), singular_values=side)
    a, b = np.asarray(m.basis_a[...]), np.asarray(m.basis_b[...])
    u, s, vt = np.linalg.svd(w, full_matrices=False)
    np.testing.assert_allclose(a @ b, (u[:, :3] * s[:3]) @ vt[:3], atol=1e-5)
    ortho = a if side == "b" else b.T
    np.testing.assert_allclose(ortho.T @ ortho, np.eye(3), atol=1e-5)
    np.testing.assert_array_equal(m.lora_latent[...], 0.0)
    self.assertIsInstance(m.basis_a, layers.AdapterState)
    self.assertEqual(m.options(),
                     {"r_init_std": 0.0, "singular_values": side})
    m2 = lora_xs.LoRAXS(lin, rank=3, rngs=nnx.Rngs(1), r_init_std=1e-5)
    std = float(jnp.std(m2.lora_latent[...]))
    self.assertBetween(std, 1e-6, 1e-4)

  def test_latent_gradient_never_forms_full_matrix(self):
    m = lora_xs.LoRAXS(nnx.Linear(64, 48, rngs=nnx.Rngs(0)), rank=4,
                       rngs=nnx.Rngs(1))
    graphdef, params, rest = nnx.split(m, nnx.LoRAParam, ...)

    def loss(params):
      return jnp.sum(nnx.merge(graphdef, params, rest)(jnp.ones((8, 64))) ** 2)

    jaxpr = jax.make_jaxpr(jax.grad(loss))(params)
    shapes = {tuple(v.aval.shape) for e in jaxpr.jaxpr.eqns for v in e.outvars}
    self.assertNotIn((64, 48), shapes)

  def test_errors(self):
    lin = nnx.Linear(10, 4, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, r"rank <= min\(d_in, d_out\) = 4"):
      lora_xs.LoRAXS(lin, rank=5, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "r_init_std must be >= 0"):
      lora_xs.LoRAXS(lin, rank=2, rngs=nnx.Rngs(0), r_init_std=-1.0)
    with self.assertRaisesRegex(ValueError, "singular_values must be"):
      lora_xs.LoRAXS(lin, rank=2, rngs=nnx.Rngs(0), singular_values="c")
    with self.assertRaisesRegex(ValueError, "Unknown option"):
      lora_xs.LoRAXS(lin, rank=2, rngs=nnx.Rngs(0), seed=1)
    with self.assertRaisesRegex(ValueError, "train_scale must be a bool"):
      lora_xs.LoLDU(lin, rank=2, rngs=nnx.Rngs(0), train_scale="yes")
    with self.assertRaisesRegex(ValueError, r"rank <= min"):
      lora_xs.LoLDU(lin, rank=5, rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "'lora_xs' or 'loldu'"):
      lora_xs.trainable_parameters("lora", 2)


class LoraSbTest(_MeshTest):

  def test_first_gradients_match_jax_grad(self):
    model = _toy(nnx.Rngs(0))
    grads = lora_xs.first_gradients(model, _loss, _X, ["lin", "ein"])
    self.assertEqual(sorted(grads), ["ein", "lin"])
    self.assertEmpty(adapters.adapter_modules(model))
    self.assertEqual(grads["ein"].shape, (_D, 2, 3))
    ref = nnx.grad(_loss)(model)
    np.testing.assert_allclose(grads["lin"], ref["lin"]["kernel"][...],
                               rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(grads["ein"], ref["ein"]["kernel"][...],
                               rtol=1e-5, atol=1e-7)

  @parameterized.parameters("sgd", "sign")
  def test_init_is_best_rank_r_first_step(self, update):
    model = _toy(nnx.Rngs(0))
    loss0 = float(_loss(model))
    grads = lora_xs.first_gradients(model, _loss, _X, _TARGETS)
    lr = 1e-2 if update == "sgd" else 2e-3
    data = {p: {"gradient": g, "lr": lr, "update": update}
            for p, g in grads.items()}
    kernels = {p: getattr(model, p).kernel[...] for p in _TARGETS}
    adapters.inject(model, targets=_TARGETS, method="lora_xs", rank=_R,
                    alpha=6.0, init="lora_sb", init_data=data)
    for p, m in adapters.adapter_modules(model).items():
      self.assertEqual(m.init, "lora_sb")
      np.testing.assert_array_equal(m.base.kernel[...], kernels[p])
      delta = np.asarray(m.delta_weight())
      g2d = np.asarray(layers.kernel_to_2d(
          grads[p], m.in_dims, m.out_dims))
      step = -lr * (np.sign(g2d) if update == "sign" else g2d)
      u, s, vt = np.linalg.svd(step, full_matrices=False)
      np.testing.assert_allclose(delta, (u[:, :_R] * s[:_R]) @ vt[:_R],
                                 atol=1e-6)
      a = np.asarray(m.basis_a[...]).reshape(m.d_in, _R)
      b = np.asarray(m.basis_b[...]).reshape(_R, m.d_out)
      np.testing.assert_allclose(a.T @ a, np.eye(_R), atol=1e-5)
      np.testing.assert_allclose(b @ b.T, np.eye(_R), atol=1e-5)
      np.testing.assert_allclose(
          m.lora_latent[...], np.diag(s[:_R]) / m.scale, rtol=1e-5)
    # The init takes (the best rank-r approximation of) a descent step.
    self.assertLess(float(_loss(model)), loss0)

  def test_residual_keeps_output_and_errors(self):
    model = _toy(nnx.Rngs(0))
    y0 = model(_X)
    grads = lora_xs.first_gradients(model, _loss, _X, ["gen"])
    adapters.inject(model, targets=["gen"], method="lora_xs", rank=_R,
                    init="lora_sb",
                    init_data={"gen": {"gradient": grads["gen"],
                                       "residual": True}})
    np.testing.assert_allclose(model(_X), y0, atol=1e-5)
    self.assertGreater(
        float(jnp.abs(model.gen.lora_latent[...]).max()), 1e-3)
    fresh = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "needs method='lora_xs'"):
      adapters.inject(fresh, targets=["gen"], rank=_R, init="lora_sb",
                      init_data={"gen": grads["gen"]})
    fresh = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "needs init_data"):
      adapters.inject(fresh, targets=["gen"], method="lora_xs", rank=_R,
                      init="lora_sb")
    fresh = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "kernel's shape"):
      adapters.inject(fresh, targets=["gen"], method="lora_xs", rank=_R,
                      init="lora_sb", init_data={"gen": jnp.ones((_D, 6))})
    fresh = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "update must be one of"):
      adapters.inject(fresh, targets=["gen"], method="lora_xs", rank=_R,
                      init="lora_sb",
                      init_data={"gen": {"gradient": grads["gen"],
                                         "update": "adam"}})
    fresh = _toy(nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "lr must be > 0"):
      adapters.inject(fresh, targets=["gen"], method="lora_xs", rank=_R,
                      init="lora_sb",
                      init_data={"gen": {"gradient": grads["gen"],
                                         "lr": 0.0}})


class LoldUTest(_MeshTest):

  def test_ldu_factors(self):
    lin = nnx.Linear(6, 5, rngs=nnx.Rngs(0))
    w = np.asarray(lin.kernel[...])
    full = lora_xs.LoLDU(lin, rank=5, rngs=nnx.Rngs(0))
    u_t = np.asarray(full.basis_a[...]).T  # [r, d_in]: unit upper rows.
    pl = np.asarray(full.basis_b[...]).T  # [d_out, r]: P L.
    d = np.asarray(full.diag_init[...])
    np.testing.assert_allclose((pl * d[None, :]) @ u_t, w.T, atol=1e-5)
    np.testing.assert_allclose(np.diag(u_t[:, :5]), 1.0, atol=1e-6)
    np.testing.assert_array_equal(np.tril(u_t[:, :5], -1), 0.0)
    # Partial pivoting: |L| <= 1 and each column holds a unit pivot.
    self.assertLessEqual(float(np.abs(pl).max()), 1.0 + 1e-6)
    np.testing.assert_allclose(np.abs(pl).max(axis=0), 1.0, atol=1e-6)
    np.testing.assert_array_equal(full.lora_diag[...], d)
    self.assertAlmostEqual(float(full.lora_scale[0]), full.scale)
    self.assertIsInstance(full.basis_a, layers.Basis)
    # Rank r takes the first r LU steps: the same leading factors.
    part = lora_xs.LoLDU(lin, rank=2, alpha=1.0, rngs=nnx.Rngs(0))
    np.testing.assert_allclose(part.basis_b[...],
                               full.basis_b[...][:2], atol=1e-6)
    self.assertEqual(part.scale, 0.5)
    # The scale and the diagonal enter as σ z - σ₀ D.
    part.lora_scale.set_value(jnp.full((1,), 1.5, jnp.float32))
    a = np.asarray(part.basis_a[...])
    b = np.asarray(part.basis_b[...])
    want = a @ np.diag(1.5 * d[:2] - 0.5 * d[:2]) @ b
    np.testing.assert_allclose(part.delta_weight(), want, atol=1e-6)

  def test_frozen_scale_is_adapter_state(self):
    m = lora_xs.LoLDU(nnx.Linear(6, 5, rngs=nnx.Rngs(0)), rank=2,
                      rngs=nnx.Rngs(0), train_scale=False)
    self.assertIsInstance(m.lora_scale, layers.AdapterState)
    self.assertEqual(m.num_trainable(), 2)
    self.assertEqual(lora_xs.trainable_parameters("loldu", 2, False), 2)


class PaperPresetTest(_MeshTest):
  """`preset="paper"` gives the authors' initialisation and scale."""

  def _inject(self, method, d_in, d_out):
    # The shapes of the other tests of the method: no new eager compiles.
    model = nnx.List([nnx.Linear(d_in, d_out, rngs=nnx.Rngs(0))])
    w = np.asarray(model[0].kernel[...])
    train.inject_from_config(model, {"method": method, "preset": "paper",
                                     "targets": "0", "rank": 3})
    return model[0], w

  def test_lora_xs(self):
    m, w = self._inject("lora_xs", 10, 8)
    # The authors' init (utils/initialization_utils.py): TruncatedSVD of
    # the [d_in, d_out] weight; lora_A <- U_r Σ_r, lora_B <- V_rᵀ, R ~
    # N(0, 1e-5²); lora_alpha 16.
    u, sv, vt = np.linalg.svd(w, full_matrices=False)
    a, b = np.asarray(m.basis_a[...]), np.asarray(m.basis_b[...])
    np.testing.assert_allclose(np.abs(a), np.abs(u[:, :3] * sv[:3]),
                               atol=1e-5)  # Up to each column's sign.
    np.testing.assert_allclose(a @ b, (u[:, :3] * sv[:3]) @ vt[:3],
                               atol=1e-5)
    self.assertBetween(float(jnp.std(m.lora_latent[...])), 1e-6, 1e-4)
    self.assertAlmostEqual(m.scale, 16 / 3)
    self.assertEqual(presets.paper("lora_xs")["singular_values"], "a")

  def test_loldu(self):
    m, _ = self._inject("loldu", 6, 5)
    # The authors' from_linear(lora_alpha=1): sigma_0 = 1 / rank.
    self.assertAlmostEqual(m.scale, 1 / 3)
    self.assertAlmostEqual(float(m.lora_scale[0]), 1 / 3, places=6)
    np.testing.assert_array_equal(m.delta_weight(), 0.0)


if __name__ == "__main__":
  absltest.main()
