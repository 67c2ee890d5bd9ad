"""lowrank.presets: the registry, and every recorded paper preset applies."""

import inspect

from absl.testing import absltest
from flax import nnx
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import adapters
from lowrank import optim
from lowrank import presets
from lowrank import spectral
from lowrank import train
from lowrank.adapters import quantized
from lowrank.spectral import relora


class _MLP(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(8, 16, rngs=rngs)
    self.out = nnx.Linear(16, 4, rngs=rngs)

  def __call__(self, x):
    return self.out(jnp.tanh(self.hidden(x)))


class _Registered(absltest.TestCase):
  """Registers test presets and removes them afterwards."""

  def register(self, name, **kw):
    self.addCleanup(presets._REGISTRY.pop, name, None)  # pylint: disable=protected-access
    return presets.register(name, **kw)


class RegistryTest(_Registered):

  def test_paper_returns_a_fresh_copy(self):
    self.register("test_method", source="owner/repo@0123456789ab (x.py)",
                  kwargs={"b1": 0.5}, reasons={"b1": "the paper's beta1"})
    got = presets.paper("test_method")
    self.assertEqual(got, {"b1": 0.5})
    got["b1"] = 0.0
    self.assertEqual(presets.paper("test_method"), {"b1": 0.5})

  def test_function_or_name(self):
    def test_factory():
      pass
    self.register("test_factory", source="arXiv:0000.00000")
    self.assertEqual(presets.paper(test_factory), {})
    self.assertIn("the defaults already follow it",
                  presets.describe(test_factory))

  def test_describe_lists_reasons_and_unavailable(self):
    self.register("test_method", source="owner/repo@0123456789ab (x.py)",
                  kwargs={"eps": 1e-6}, reasons={"eps": "official default"},
                  unavailable=("INT8 weights",))
    text = presets.describe("test_method")
    self.assertIn("owner/repo@0123456789ab", text)
    self.assertIn("eps=1e-06: official default", text)
    self.assertIn("not available: INT8 weights", text)

  def test_unknown_name_is_an_error_listing_the_known(self):
    self.register("test_method", source="arXiv:0000.00000")
    with self.assertRaisesRegex(KeyError, "no paper preset is recorded for "
                                "'nope'.*Recorded: .*test_method"):
      presets.paper("nope")

  def test_every_argument_needs_a_reason(self):
    with self.assertRaisesRegex(ValueError, "arguments without a reason: "
                                r"\['eps'\]"):
      presets.register("test_method", source="x", kwargs={"eps": 1e-6})

  def test_conflicting_registration(self):
    self.register("test_method", source="x")
    with self.assertRaisesRegex(ValueError, "registered twice, differently"):
      presets.register("test_method", source="y")


class ConfigTest(_Registered):

  def test_optimizer_preset_under_the_sections_keys(self):
    self.register("adamw", source="optax", kwargs={"b1": 0.5, "b2": 0.9},
                  reasons={"b1": "test", "b2": "test"})
    tx = train.optimizer_from_config({"name": "adamw", "preset": "paper",
                                      "learning_rate": 0.1, "b2": 0.99})
    ref = optax.adamw(0.1, b1=0.5, b2=0.99)
    p = {"w": jnp.ones(3)}
    g = {"w": jnp.arange(3.0)}
    for _ in range(2):
      got, state = tx.update(g, tx.init(p), p)
      want, ref_state = ref.update(g, ref.init(p), p)
      np.testing.assert_allclose(got["w"], want["w"])
      del state, ref_state

  def test_unknown_preset_value(self):
    with self.assertRaisesRegex(ValueError, "preset must be 'paper'"):
      train.optimizer_from_config({"name": "adamw", "preset": "official",
                                   "learning_rate": 0.1})

  def test_optimizer_without_a_recorded_preset(self):
    with self.assertRaisesRegex(ValueError, "optimizer 'sgd': "
                                "preset='paper': no paper preset"):
      train.optimizer_from_config({"name": "sgd", "preset": "paper",
                                   "learning_rate": 0.1})


def _factory(name):
  for module in (optim, spectral, adapters, quantized):
    fn = getattr(module, name, None)
    if callable(fn) and not inspect.isclass(fn):
      return fn
  return None


class RecordedPresetsTest(absltest.TestCase):
  """Every preset the library records names arguments its method takes."""

  def test_function_found_under_its_exported_name(self):
    # relora.train is exported (and registered) as spectral.relora_train.
    self.assertEqual(presets.get(relora.train).name, "relora_train")
    self.assertEqual(presets.paper(relora.train),
                     presets.paper("relora_train"))

  def test_qlora_through_an_adapter_section(self):
    model = train.inject_from_config(
        _MLP(nnx.Rngs(0)), {"method": "lora", "preset": "paper",
                            "targets": "hidden", "rank": 2,
                            "quantize_base": "nf4"})
    self.assertEqual(model.hidden.base.quant_layout,
                     presets.paper("quantize_base")["layout"])

  def test_each_preset_applies(self):
    for name in presets.names():
      preset = presets.get(name)
      with self.subTest(name):
        self.assertTrue(preset.source)
        fn = _factory(name)
        if fn is not None:
          params = inspect.signature(fn).parameters
          self.assertEmpty(set(preset.kwargs) - set(params))
        elif name in adapters.METHODS:
          model = train.inject_from_config(
              _MLP(nnx.Rngs(0)), {"method": name, "preset": "paper",
                                  "targets": "hidden", "rank": 2})
          self.assertGreater(
              adapters.count_parameters(model)["trainable"], 0)
        else:
          self.fail(f"preset {name!r} is neither a function of lowrank.optim"
                    f" / spectral / adapters nor an adapter method")


if __name__ == "__main__":
  absltest.main()
