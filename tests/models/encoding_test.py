"""Tests of lowrank.models.encoding.SplitJit (the text embedders' step)."""

from absl.testing import absltest
from flax import nnx
import jax.numpy as jnp
import numpy as np

from lowrank.models import encoding


class _Scale(nnx.Module):

  def __init__(self):
    self.w = nnx.Param(jnp.asarray(2.0))


def _apply(model, x, square):
  y = model.w * x
  return y * y if square else y


class SplitJitTest(absltest.TestCase):

  def test_merges_the_module_and_compiles_once_per_static_value_and_shape(
      self):
    step = encoding.SplitJit(_apply, ("square",))
    graphdef, state = nnx.split(_Scale())
    np.testing.assert_allclose(
        step(graphdef, state, x=jnp.ones(3), square=False), [2.0] * 3)
    np.testing.assert_allclose(
        step(graphdef, state, x=np.full(3, 3.0, np.float32), square=False),
        [6.0] * 3)
    self.assertEqual(step.traces, 1)  # Same shapes and static value.
    np.testing.assert_allclose(
        step(graphdef, state, x=jnp.ones(3), square=True), [4.0] * 3)
    self.assertEqual(step.traces, 2)  # A new static value.
    step(graphdef, state, x=jnp.ones((2, 3)), square=True)
    self.assertEqual(step.traces, 3)  # A new shape.

  def test_state_is_traced_not_static(self):
    step = encoding.SplitJit(_apply, ("square",))
    model = _Scale()
    graphdef, state = nnx.split(model)
    step(graphdef, state, x=jnp.ones(3), square=False)
    model.w.set_value(jnp.asarray(5.0))
    _, state = nnx.split(model)
    np.testing.assert_allclose(
        step(graphdef, state, x=jnp.ones(3), square=False), [5.0] * 3)
    self.assertEqual(step.traces, 1)


if __name__ == "__main__":
  absltest.main()
