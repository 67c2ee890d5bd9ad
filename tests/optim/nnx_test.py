"""Every lowrank optimizer works inside `flax.nnx.Optimizer`.

NNX keeps optimizer state as NNX state: it copies each parameter's sharding
metadata onto state leaves that mirror the parameter tree and rebuilds
nested containers as its own mappings. Transforms whose state is shaped
differently from the parameters (projected moments, 8-bit blocks, per-layer
slices) must survive that. Each case runs three steps through
`nnx.Optimizer` on a sharding-annotated model under a mesh and compares the
parameters with the same transform driven by plain optax on the arrays.
"""

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import optim
from lowrank import sharding
from lowrank.models import llama

_IDS = (jnp.arange(2 * 12, dtype=jnp.int32).reshape(2, 12) * 7) % 256


def _model():
  return llama.LlamaForCausalLM(
      llama.LlamaConfig.tiny(vocab_size=256, num_layers=1), rngs=nnx.Rngs(0))


def _loss(model):
  return llama.next_token_loss(model(_IDS), _IDS)


_CASES = (
    ("adamw8bit", lambda: optim.adamw8bit(1e-2, min_size=256)),
    ("galore", lambda: optim.galore_adamw(1e-2, rank=4, refresh_every=2)),
    ("q_galore", lambda: optim.q_galore_adamw(1e-2, rank=4, refresh_every=2)),
    # Per-matrix Adam step counts (int32 leaves under the parameters' paths).
    ("frugal", lambda: optim.frugal_adamw(1e-2, rank=4, refresh_every=2)),
    ("allora", lambda: optim.allora_adamw(1e-2, eta=1.0)),
)


class NnxOptimizerTest(parameterized.TestCase):

  @parameterized.named_parameters(*_CASES)
  def test_three_steps_match_plain_optax(self, make_tx):
    with sharding.use_mesh():
      model = _model()
      # The reference starts from the same arrays (immutable; the NNX steps
      # replace them): building the model again costs more than its steps.
      graphdef, params, rest = nnx.split(model, nnx.Param, ...)
      params = nnx.as_pure(params)
      init = dict(jax.tree_util.tree_leaves_with_path(
          nnx.to_pure_dict(nnx.state(model, nnx.Param))))
      opt = nnx.Optimizer(model, make_tx(), wrt=nnx.Param)

      @nnx.jit
      def step(model, opt):
        grads = nnx.grad(_loss)(model)
        opt.update(model, grads)

      for _ in range(3):
        step(model, opt)
      got = nnx.to_pure_dict(nnx.state(model, nnx.Param))

      tx = make_tx()
      state = tx.init(params)

      @jax.jit
      def ref_step(params, state):
        grads = jax.grad(lambda p: _loss(nnx.merge(graphdef, p, rest)))(
            params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

      for _ in range(3):
        params, state = ref_step(params, state)
      want = nnx.to_pure_dict(params)
    flat_got = jax.tree_util.tree_leaves_with_path(got)
    flat_want = dict(jax.tree_util.tree_leaves_with_path(want))
    self.assertLen(flat_got, len(flat_want))
    changed = 0
    for path, x in flat_got:
      np.testing.assert_allclose(x, flat_want[path], rtol=1e-5, atol=1e-6,
                                 err_msg=jax.tree_util.keystr(path))
      changed += int(not np.allclose(x, init[path]))
    self.assertGreater(changed, len(flat_got) // 2)  # The steps did train.


if __name__ == "__main__":
  absltest.main()
