"""Tests for lowrank's own adapter format (`save_adapters`, "native")."""

import json
import os

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np

from lowrank import adapters
from lowrank.adapters import layers
from lowrank.adapters import native_io
from lowrank.adapters import peft_io


class _Scaled(layers.LoRAWrapper):
  """A test-only variant: LoRA with a frozen random basis and a mask.

  Exercises every kind of variable the format must handle: trainable factors,
  saved non-trainable state, a basis regenerated from a seed option.
  """

  method = "test_scaled"
  option_names = ("seed",)

  def _create(self, key, dtype, seed=0):
    self.seed = seed
    super()._create(key, dtype)
    basis = jax.random.normal(jax.random.key(seed), (self.rank,), dtype)
    self.basis = self._basis(basis, (None,))
    self.mask = layers.AdapterState(jnp.ones((self.rank,), dtype))

  def adapter_out(self, x2):
    a = self.lora_a[...].reshape(self.d_in, self.rank)
    b = self.lora_b[...].reshape(self.rank, self.d_out)
    d = self.basis[...] * self.mask[...]
    h = x2 @ a
    h = h * d.reshape((1,) * (h.ndim - 1) + (-1,))
    return (h @ b) * self.scale

  def delta_weight(self):
    a = self.lora_a[...].reshape(self.d_in, self.rank).astype(jnp.float32)
    b = self.lora_b[...].reshape(self.rank, self.d_out).astype(jnp.float32)
    d = (self.basis[...] * self.mask[...]).astype(jnp.float32)
    return (a * d[None, :]) @ b * self.scale


def setUpModule():
  # Registered for this module only: the registry is process-global, and
  # other modules in the same xdist worker (readme_test) list its methods.
  if "test_scaled" not in layers.METHODS:
    layers.register("test_scaled", _Scaled)


def tearDownModule():
  layers.METHODS.pop("test_scaled", None)


class _Model(nnx.Module):

  def __init__(self, rngs):
    self.l1 = nnx.Linear(8, 12, rngs=rngs)
    self.gen = nnx.LinearGeneral(12, (2, 3), rngs=rngs)
    self.ein = nnx.Einsum("btd,dnh->btnh", (12, 2, 3), rngs=rngs)

  def __call__(self, x):
    h = self.l1(x)
    return self.gen(h) + self.ein(h)


def _randomize(model, seed=3):
  state = nnx.state(model, (nnx.LoRAParam, layers.AdapterState))
  leaves, treedef = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  new = [
      jax.random.normal(k, x.shape, x.dtype) * 0.3
      for k, x in zip(keys, leaves)
  ]
  nnx.update(model, jax.tree.unflatten(treedef, new))


class NativeIoTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    self.x = jax.random.normal(jax.random.key(0), (2, 5, 8))

  def _trained(self):
    model = _Model(nnx.Rngs(0))
    adapters.inject(model, targets=["l1", "gen"], rank=3, alpha=6)
    adapters.inject(
        model, targets=["ein"], method="test_scaled", rank=2, seed=7
    )
    _randomize(model)
    return model

  def test_roundtrip_mixed_methods_into_fresh_model(self):
    model = self._trained()
    want = model(self.x)
    d = self.create_tempdir().full_path
    adapters.save_adapters(d, model)
    with open(os.path.join(d, native_io.CONFIG_NAME)) as f:
      config = json.load(f)
    self.assertEqual(config["modules"]["ein"]["method"], "test_scaled")
    self.assertEqual(config["modules"]["ein"]["options"], {"seed": 7})
    self.assertEqual(config["modules"]["l1"]["alpha"], 6.0)
    fresh = _Model(nnx.Rngs(0))
    adapters.load_adapters(d, fresh, rngs=5)
    np.testing.assert_allclose(fresh(self.x), want, rtol=1e-6, atol=1e-6)
    mods = adapters.adapter_modules(fresh)
    self.assertIsInstance(mods["ein"], _Scaled)
    self.assertEqual(mods["l1"].rank, 3)

  def test_basis_is_not_stored_and_state_is(self):
    model = self._trained()
    d = self.create_tempdir().full_path
    adapters.save_adapters(d, model)
    import safetensors.numpy  # pylint: disable=g-import-not-at-top
    keys = set(safetensors.numpy.load_file(
        os.path.join(d, native_io.WEIGHTS_NAME)))
    self.assertIn("ein/mask", keys)
    self.assertIn("ein/lora_a", keys)
    self.assertNotIn("ein/basis", keys)
    self.assertFalse(any(k.startswith("l1/base") for k in keys))

  def test_loading_into_existing_adapters_checks_method_and_shape(self):
    model = self._trained()
    d = self.create_tempdir().full_path
    adapters.save_adapters(d, model)
    other = _Model(nnx.Rngs(0))
    adapters.inject(other, targets=["l1", "gen", "ein"], rank=3)
    with self.assertRaisesRegex(ValueError, "'test_scaled'"):
      adapters.load_adapters(d, other)
    other = _Model(nnx.Rngs(0))
    adapters.inject(other, targets=["l1", "gen"], rank=4)
    adapters.inject(other, targets=["ein"], method="test_scaled", rank=2)
    with self.assertRaisesRegex(ValueError, r"expected shape"):
      adapters.load_adapters(d, other)

  def test_bad_files(self):
    d = self.create_tempdir().full_path
    with self.assertRaises(FileNotFoundError):
      adapters.load_adapters(d, _Model(nnx.Rngs(0)))
    with open(os.path.join(d, native_io.CONFIG_NAME), "w") as f:
      f.write("{not json")
    with self.assertRaisesRegex(ValueError, "not valid JSON"):
      adapters.load_adapters(d, _Model(nnx.Rngs(0)))
    with open(os.path.join(d, native_io.CONFIG_NAME), "w") as f:
      json.dump({"format": "lowrank-adapter", "version": 1, "modules": {
          "l1": {"method": "nope", "rank": 2, "alpha": 2, "rslora": False,
                 "dropout": 0, "init": "kaiming", "options": {}}}}, f)
    with self.assertRaisesRegex(ValueError, "unknown method 'nope'"):
      adapters.load_adapters(d, _Model(nnx.Rngs(0)))

  def test_unknown_option_is_an_error(self):
    with self.assertRaisesRegex(ValueError, r"Unknown option\(s\) \['sed'\]"):
      adapters.inject(_Model(nnx.Rngs(0)), targets=["l1"],
                      method="test_scaled", rank=2, sed=1)
    with self.assertRaisesRegex(ValueError, "Unknown init 'pisa'"):
      adapters.inject(_Model(nnx.Rngs(0)), targets=["l1"], rank=2,
                      init="pisa")

  def test_inits_that_rewrite_the_base_roundtrip(self):
    from lowrank.adapters import svd_init  # pylint: disable=g-import-not-at-top,unused-import
    for method, init in (("lora", "pissa"), ("lora", "olora"),
                         ("dora", "pissa")):
      with self.subTest(method=method, init=init):
        model = _Model(nnx.Rngs(0))
        original = model(self.x)
        adapters.inject(model, targets=["l1", "gen", "ein"], method=method,
                        rank=2, init=init)
        np.testing.assert_allclose(model(self.x), original, atol=1e-5)
        self.assertTrue(adapters.adapter_modules(model)["l1"]
                        .initialized_from_base)
        # The initial copies must not share buffers with the trainable
        # leaves (that breaks donating the params in a train step).
        _, params, rest = nnx.split(model, nnx.LoRAParam, ...)
        ptrs = {x.unsafe_buffer_pointer() for x in jax.tree.leaves(params)}
        self.assertFalse(ptrs & {x.unsafe_buffer_pointer()
                                 for x in jax.tree.leaves(rest)})
        state = nnx.state(model, nnx.LoRAParam)
        leaves, treedef = jax.tree.flatten(state)
        nnx.update(model, jax.tree.unflatten(
            treedef, [x * 1.5 for x in leaves]))  # "trained"
        want = model(self.x)
        d = self.create_tempdir().full_path
        adapters.save_adapters(d, model)
        fresh = _Model(nnx.Rngs(0))
        adapters.load_adapters(d, fresh)
        np.testing.assert_allclose(fresh(self.x), want, rtol=1e-5,
                                   atol=1e-5)
        for path, m in adapters.adapter_modules(fresh).items():
          np.testing.assert_allclose(
              m.kernel_2d(), adapters.adapter_modules(model)[path].kernel_2d(),
              atol=1e-5, err_msg=path)

  def test_qlora_roundtrip_requantises_and_lq_lora_is_refused(self):
    model = _Model(nnx.Rngs(0))
    adapters.inject(model, targets=["l1", "gen"], rank=2,
                    quantize_base="int8")
    _randomize(model)
    want = model(self.x)
    d = self.create_tempdir().full_path
    adapters.save_adapters(d, model)
    with open(os.path.join(d, native_io.CONFIG_NAME)) as f:
      self.assertEqual(
          json.load(f)["modules"]["l1"]["quantize_base"]["scheme"], "int8")
    fresh = _Model(nnx.Rngs(0))
    adapters.load_adapters(d, fresh)
    np.testing.assert_allclose(fresh(self.x), want, rtol=1e-6, atol=1e-6)
    lq = _Model(nnx.Rngs(0))
    adapters.inject(lq, targets=["l1"], rank=2, quantize_base="nf4",
                    init="lq_lora")
    with self.assertRaisesRegex(ValueError, "LQ-LoRA"):
      adapters.save_adapters(self.create_tempdir().full_path, lq)

  def test_injecting_twice_is_an_error_not_a_nested_wrapper(self):
    model = _Model(nnx.Rngs(0))
    adapters.inject(model, targets="all-linear", rank=1)
    with self.assertRaisesRegex(ValueError, "already has an adapter"):
      adapters.inject(model, targets="all-linear", rank=1)

  def test_no_variant_shares_buffers_between_variables(self):
    """Shared buffers break donating the params (or state) in a step."""
    for method, kwargs in (("lora", {}), ("dora", {}), ("loldu", {}),
                           ("lora_xs", {}), ("vera", {}), ("nola", {}),
                           ("randlora", {}), ("adalora", {}), ("sora", {}),
                           ("dylora", {}), ("increlora", {})):
      with self.subTest(method=method):
        model = _Model(nnx.Rngs(0))
        adapters.inject(model, targets=["l1", "gen"], method=method, rank=2,
                        **kwargs)
        ptrs = [x.unsafe_buffer_pointer()
                for x in jax.tree.leaves(nnx.state(model))]
        self.assertLen(set(ptrs), len(ptrs))

  def test_merged_adapter_is_refused(self):
    model = self._trained()
    adapters.merge(model)
    with self.assertRaisesRegex(ValueError, "merged"):
      adapters.save_adapters(self.create_tempdir().full_path, model)


class FitsModelTest(parameterized.TestCase):
  """`peft_io.fits_model`, which both loaders wrap their injection in."""

  @parameterized.named_parameters(
      ("type_error", TypeError("got an unexpected keyword"), TypeError),
      ("value_error", ValueError("rank too large"), ValueError),
      # A ValueError subclass (e.g. a JSON error) is reported as ValueError.
      ("value_error_subclass", json.JSONDecodeError("bad", "x", 0),
       ValueError),
  )
  def test_names_the_file(self, error, kind):
    with self.assertRaisesRegex(
        kind, "^Adapter 'q' in f.json does not fit the model: ") as ctx:
      with peft_io.fits_model("Adapter 'q' in f.json"):
        raise error
    self.assertIs(type(ctx.exception), kind)
    self.assertIs(ctx.exception.__cause__, error)


if __name__ == "__main__":
  absltest.main()
