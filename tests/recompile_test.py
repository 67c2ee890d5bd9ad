"""An ordinary NNX train loop over a lowrank model compiles its step once.

A jitted step recompiles when an input's placement differs between calls.
`bert.load_pretrained` used to put every parameter on a default mesh even
when the user had not set one, while the dropout RNG state and
`nnx.Optimizer`'s step count stayed uncommitted single-device arrays; the
first step returned those on the mesh, so the second step missed the cache
and compiled again. These tests count compilations of the step.
"""


from absl.testing import absltest
from flax import nnx
import jax
import jax.numpy as jnp
import optax

from lowrank import adapters
from lowrank import assets
from lowrank import sharding
from lowrank.models import bert
from lowrank.models import llama

from tests import jax_compiles


class MLP(nnx.Module):
  """A user model lowrank knows nothing about (dropout: it carries RNGs)."""

  def __init__(self, rngs: nnx.Rngs, partitioned: bool = False):
    init = nnx.initializers.lecun_normal()
    if partitioned:
      init = nnx.with_partitioning(init, ("embed", "mlp"))
    self.up = nnx.Linear(8, 32, kernel_init=init, rngs=rngs)
    self.dropout = nnx.Dropout(0.1, rngs=rngs)
    self.down = nnx.Linear(32, 4, rngs=rngs)

  def __call__(self, x):
    return self.down(self.dropout(nnx.relu(self.up(x))))


def _train(model, optimizer, steps: int) -> list[float]:
  """Runs `steps` steps of a plain `nnx.jit` step; returns the losses."""

  def loss_fn(model, x, y):
    return jnp.mean((model(x) - y) ** 2)

  @nnx.jit
  def train_step(model, optimizer, x, y):
    diff = nnx.DiffState(0, nnx.LoRAParam)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model, x, y)
    optimizer.update(model, grads)
    return loss

  x = jax.random.normal(jax.random.key(1), (16, 8))
  y = jax.random.normal(jax.random.key(2), (16, 4))
  return [float(train_step(model, optimizer, x, y)) for _ in range(steps)]


class RecompileTest(absltest.TestCase):

  def test_user_mlp_with_adapters_compiles_once(self):
    model = MLP(nnx.Rngs(0))
    adapters.inject(model, targets=r"up|down", rank=4, alpha=8)
    model.train()
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    with jax_compiles.count_compiles("train_step") as compiles:
      losses = _train(model, optimizer, 4)
    self.assertEqual(compiles.count, 1)
    self.assertLess(losses[-1], losses[0])

  def test_mesh_model_and_optimizer_built_on_mesh_compile_once(self):
    # The sharded route: model, adapters and optimizer all built under the
    # mesh, so NNX commits every variable (RNG state, step count) to it.
    with sharding.use_mesh():
      model = MLP(nnx.Rngs(0), partitioned=True)
      adapters.inject(model, targets=r"up|down", rank=4, alpha=8)
      optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    model.train()
    with jax_compiles.count_compiles("train_step") as compiles:
      _train(model, optimizer, 3)
    self.assertEqual(compiles.count, 1)

  def test_load_pretrained_without_mesh_places_nothing_on_a_mesh(self):
    model = bert.load_pretrained(assets.minilm_path())
    shardings = {
        type(leaf.sharding).__name__
        for leaf in jax.tree.leaves(nnx.state(model))
    }
    self.assertEqual(shardings, {"SingleDeviceSharding"})
    self.assertFalse(
        any(leaf.committed for leaf in jax.tree.leaves(nnx.state(model))))

  def test_load_pretrained_on_mesh_commits_rng_state_too(self):
    mesh = sharding.make_mesh()
    with sharding.use_mesh(mesh):
      model = bert.load_pretrained(assets.minilm_path())
    for path, leaf in jax.tree_util.tree_leaves_with_path(nnx.state(model)):
      with self.subTest(path=jax.tree_util.keystr(path)):
        self.assertIsInstance(leaf.sharding, jax.sharding.NamedSharding)
        self.assertEqual(leaf.sharding.mesh, mesh)

  def test_llama_load_pretrained_without_mesh_compiles_once(self):
    with sharding.use_mesh():  # The constructor needs a mesh (NNX eager).
      source = llama.LlamaForCausalLM(
          llama.LlamaConfig.tiny(), rngs=nnx.Rngs(0))
    path = self.create_tempdir().full_path
    llama.save_pretrained(source, path)
    model = llama.load_pretrained(path)
    self.assertFalse(
        any(leaf.committed for leaf in jax.tree.leaves(nnx.state(model))))
    adapters.inject(model, targets=r".*(q|v)_proj", rank=4, alpha=8)
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.LoRAParam)
    ids = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % 200

    @nnx.jit
    def train_step(model, optimizer, ids):
      def loss_fn(model):
        logits = model(ids[:, :-1])
        return optax.softmax_cross_entropy_with_integer_labels(
            logits, ids[:, 1:]).mean()
      diff = nnx.DiffState(0, nnx.LoRAParam)
      loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model)
      optimizer.update(model, grads)
      return loss

    with jax_compiles.count_compiles("train_step") as compiles:
      losses = [float(train_step(model, optimizer, ids)) for _ in range(3)]
    self.assertEqual(compiles.count, 1)
    self.assertLess(losses[-1], losses[0])

  def test_bert_with_adapters_compiles_once(self):
    model = bert.load_pretrained(assets.minilm_path())
    tokenizer = bert.load_tokenizer(assets.minilm_path())
    adapters.inject(model, targets=r".*\.(query|value)", rank=4, alpha=8)
    model.train()  # dropout on: its RNG state is updated every step
    optimizer = nnx.Optimizer(model, optax.adamw(1e-3), wrt=nnx.LoRAParam)
    batch = tokenizer(["add two numbers", "read a file"], pad_to=8)

    @nnx.jit
    def train_step(model, optimizer, batch):
      def loss_fn(model):
        return jnp.mean(bert.encode(model, batch)[:, 0])
      diff = nnx.DiffState(0, nnx.LoRAParam)
      loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model)
      optimizer.update(model, grads)
      return loss

    with jax_compiles.count_compiles("train_step") as compiles:
      for _ in range(3):
        train_step(model, optimizer, batch)
    self.assertEqual(compiles.count, 1)
    self.assertEqual(int(optimizer.step[...]), 3)


if __name__ == "__main__":
  absltest.main()
