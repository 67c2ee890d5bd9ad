"""Tests for lowrank.train: the shared step, loop and config helpers."""

import os

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import jax.flatten_util  # pylint: disable=unused-import

from lowrank import adapters
from lowrank import metric_writers
from lowrank import optim
from lowrank import sharding
from lowrank import train


class _Regressor(nnx.Module):

  def __init__(self, rngs):
    self.hidden = nnx.Linear(8, 16, rngs=rngs)
    self.out = nnx.Linear(16, 1, rngs=rngs)

  def __call__(self, x):
    return self.out(jax.nn.relu(self.hidden(x)))[:, 0]


def _batch(step: int) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(step)
  x = rng.normal(size=(16, 8)).astype(np.float32)
  return {"x": x, "y": x[:, 0] - 2 * x[:, 1]}


def _loss(model, batch):
  err = model(batch["x"]) - batch["y"]
  return jnp.mean(err**2), {"max_err": jnp.max(jnp.abs(err))}


def _setup(tx, split=None, wrt=nnx.Param):
  model = _Regressor(nnx.Rngs(0))
  graphdef, params, rest = train.split(model, wrt)
  opt_state = train.init_opt_state(tx, params)
  return train.make_train_step(graphdef, _loss, tx, split=split), (
      params, opt_state, rest)


class StepTest(parameterized.TestCase):

  def test_split_and_fused_steps_agree(self):
    tx = optax.adamw(1e-2)
    fused, state = _setup(tx, split=False)
    two, state2 = _setup(tx, split=True)
    (p1, o1, r1), (p2, o2, r2) = state, state2
    for step in range(1, 4):
      b = jax.tree.map(jnp.asarray, _batch(step))
      p1, o1, m1 = fused(p1, o1, r1, b)
      p2, o2, m2 = two(p2, o2, r2, b)
      self.assertAlmostEqual(float(m1["loss"]), float(m2["loss"]), places=5)
    np.testing.assert_allclose(
        jax.flatten_util.ravel_pytree(p1)[0],
        jax.flatten_util.ravel_pytree(p2)[0], rtol=1e-5, atol=1e-6)

  def test_metrics_have_loss_grad_norm_and_aux(self):
    step, state = _setup(optax.sgd(0.1))
    _, _, metrics = step(*state, jax.tree.map(jnp.asarray, _batch(1)))
    self.assertEqual(set(metrics), {"loss", "grad_norm", "max_err"})

  def test_loss_decreases(self):
    step, (p, o, r) = _setup(optax.adam(1e-2))
    losses = []
    for s in range(1, 61):
      p, o, m = step(p, o, r, jax.tree.map(jnp.asarray, _batch(s)))
      losses.append(float(m["loss"]))
    self.assertLess(np.mean(losses[-5:]), 0.3 * np.mean(losses[:5]))

  def test_bad_loss_output_is_named(self):
    model = _Regressor(nnx.Rngs(0))
    graphdef, params, rest = train.split(model)
    tx = optax.sgd(0.1)
    step = train.make_train_step(
        graphdef, lambda m, b: (1.0 * jnp.sum(m(b["x"])), 2, 3), tx)
    with self.assertRaisesRegex(TypeError, "scalar loss or \\(loss, aux\\)"):
      step(params, train.init_opt_state(tx, params), rest,
           jax.tree.map(jnp.asarray, _batch(1)))

  def test_memory_of_abstract_state(self):
    step, state = _setup(optax.adamw(1e-3))
    abstract = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
    batch = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                         _batch(1))
    mem = step.memory(*abstract, batch)
    self.assertGreater(mem["argument_bytes"], 0)
    # On CPU the step runs split, and its report (the fused program compiled
    # without LLVM's expensive passes) is the default compile's memory.
    self.assertTrue(step.split)
    self.assertEqual(mem, optim.compiled_memory(
        step.fused.lower(*abstract, batch).compile()))

  def test_sharded_state_keeps_its_shardings(self):
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
    model = _Regressor(nnx.Rngs(0))
    tx = optax.adamw(1e-3)
    ps, os_ = train.shardings(model, nnx.Param, tx, mesh)
    graphdef, params, rest = train.split(model)
    params = jax.device_put(params, ps)
    opt_state = train.init_opt_state(tx, params, shardings=os_)
    step = train.make_train_step(graphdef, _loss, tx, param_shardings=ps,
                                 opt_shardings=os_)
    with jax.set_mesh(mesh):
      p, o, _ = step(params, opt_state, rest,
                     jax.tree.map(jnp.asarray, _batch(1)))
    self.assertEqual(jax.tree.map(lambda x: x.sharding, p), ps)
    del o


class LoopTest(parameterized.TestCase):

  def _run(self, workdir, num_steps, **kwargs):
    step, (p, o, r) = _setup(optax.adamw(1e-2))
    return train.train_loop(step, p, o, r, batch_fn=_batch,
                            num_steps=num_steps, workdir=workdir,
                            checkpoint_every=2, log_every=1, **kwargs)

  def test_resume_equals_uninterrupted(self):
    whole = self._run(self.create_tempdir().full_path, 6)
    workdir = self.create_tempdir().full_path
    self._run(workdir, 4)
    resumed = self._run(workdir, 6)
    self.assertEqual(resumed.start_step, 4)
    np.testing.assert_array_equal(
        jax.flatten_util.ravel_pytree(whole.params)[0],
        jax.flatten_util.ravel_pytree(resumed.params)[0])
    rows = metric_writers.read_csv(os.path.join(workdir, "metrics.csv"))
    self.assertEqual([r["step"] for r in rows], list(range(1, 7)))

  def test_finished_run_evaluates_restored_state(self):
    workdir = self.create_tempdir().full_path
    evals = []

    def eval_fn(params, rest):
      evals.append(1)
      return {"val": 1.0}

    first = self._run(workdir, 3, eval_fn=eval_fn, eval_every=2)
    self.assertLen(evals, 2)  # Steps 2 and 3.
    again = self._run(workdir, 3, eval_fn=eval_fn)
    self.assertEqual(again.start_step, 3)
    self.assertEqual(again.last_eval, {"val": 1.0})
    self.assertEqual(again.last_metrics, first.last_metrics)
    np.testing.assert_array_equal(
        jax.flatten_util.ravel_pytree(first.params)[0],
        jax.flatten_util.ravel_pytree(again.params)[0])

  def test_before_step_hook_runs_every_step(self):
    seen = []

    def hook(step, p, o, r):
      seen.append(step)
      return p, o, r

    self._run(self.create_tempdir().full_path, 3, before_step=hook)
    self.assertEqual(seen, [1, 2, 3])

  @parameterized.parameters(("num_steps", 0), ("log_every", 0),
                            ("checkpoint_every", -1), ("eval_every", -1))
  def test_bad_cadence(self, name, value):
    step, (p, o, r) = _setup(optax.sgd(0.1))
    kwargs = dict(num_steps=2, log_every=1, checkpoint_every=1, eval_every=0)
    kwargs[name] = value
    with self.assertRaisesRegex(ValueError, f"{name} must be an int"):
      train.train_loop(step, p, o, r, batch_fn=_batch,
                       workdir=self.create_tempdir().full_path, **kwargs)


class MeshTest(absltest.TestCase):

  def test_first_devices_or_all_with_minus_one(self):
    mesh = train.mesh_from_config({"data": 2, "fsdp": 1, "tensor": 1})
    self.assertEqual(list(mesh.devices.flat), jax.devices()[:2])
    self.assertEqual(dict(train.mesh_from_config({"data": -1}).shape),
                     {"data": jax.device_count()})
    self.assertEqual(train.batch_sharding(mesh).spec,
                     jax.sharding.PartitionSpec(("data", "fsdp")))

  def test_more_devices_than_there_are(self):
    with self.assertRaisesRegex(ValueError, "devices"):
      train.mesh_from_config({"data": jax.device_count() + 1})


class FitTest(absltest.TestCase):

  def test_fit_trains_resumes_and_reports(self):
    workdir = self.create_tempdir().full_path
    section = {"num_steps": 4, "log_every": 2, "checkpoint_every": 2,
               "eval_every": 0, "batch_size": 16}
    seen = []

    def hook(step, model, opt_state):
      seen.append((step, type(model).__name__))
      return opt_state

    def run(num_steps, workdir):
      return train.fit(_Regressor(nnx.Rngs(0)), nnx.Param, _loss,
                       optax.adam(1e-2), dict(section, num_steps=num_steps),
                       batch_fn=_batch, workdir=workdir, before_step=hook,
                       eval_fn=lambda m: {"w0": float(m.out.bias[0])})
    whole = run(4, workdir)
    self.assertEqual(seen, [(s, "_Regressor") for s in range(1, 5)])
    self.assertEqual(whole.trainable_params, 8 * 16 + 16 + 16 + 1)
    self.assertGreater(whole.memory["argument_bytes"], 0)
    self.assertGreater(whole.opt_state_bytes, 0)
    self.assertAlmostEqual(whole.loop.last_eval["w0"],
                           float(whole.model.out.bias[0]))
    other = self.create_tempdir().full_path
    run(2, other)
    resumed = run(4, other)
    self.assertEqual(resumed.loop.start_step, 2)
    np.testing.assert_array_equal(whole.model.out.kernel[...],
                                  resumed.model.out.kernel[...])

  def test_fit_on_a_mesh(self):
    mesh = sharding.make_mesh((("data", 2), ("fsdp", 4)))
    with jax.set_mesh(mesh):
      out = train.fit(_Regressor(nnx.Rngs(0)), nnx.Param, _loss,
                      optax.adam(1e-2),
                      {"num_steps": 2, "log_every": 1,
                       "checkpoint_every": 2},
                      batch_fn=_batch, workdir=self.create_tempdir().full_path,
                      mesh=mesh)
    self.assertIn("loss", out.loop.last_metrics)


class FromConfigTest(parameterized.TestCase):

  def test_keys_are_the_factory_arguments(self):
    model = _Regressor(nnx.Rngs(0))
    config = ml_collections.ConfigDict(dict(
        name="galore_adamw", rank=2, weight_decay=0.0,
        learning_rate=dict(schedule="warmup_cosine_decay_schedule",
                           init_value=0.0, peak_value=1e-2, warmup_steps=2,
                           decay_steps=10)))
    tx = train.optimizer_from_config(config, model=model)
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    state = tx.init(params)
    self.assertIn("['hidden']['kernel']",
                  optim.projected_leaves(params, rank=2))
    updates, _ = tx.update(jax.tree.map(jnp.ones_like, params), state,
                           params)
    self.assertEqual(jax.tree.structure(updates), jax.tree.structure(params))

  def test_plain_optax_name_and_number_lr(self):
    tx = train.optimizer_from_config({"name": "adamw", "learning_rate": 0.1,
                                      "b1": 0.5})
    ref = optax.adamw(0.1, b1=0.5)
    p = {"w": jnp.ones(3)}
    g = {"w": jnp.arange(3.0)}
    np.testing.assert_allclose(tx.update(g, tx.init(p), p)[0]["w"],
                               ref.update(g, ref.init(p), p)[0]["w"])

  def test_unknown_key_lists_the_arguments(self):
    with self.assertRaisesRegex(ValueError, "takes no argument 'rnak'.*rank"):
      train.optimizer_from_config({"name": "galore_adamw",
                                   "learning_rate": 1e-3, "rnak": 4})

  def test_unknown_name(self):
    with self.assertRaisesRegex(ValueError, "optimizer name must be one of"):
      train.optimizer_from_config({"name": "galore", "learning_rate": 1e-3})

  def test_unknown_schedule(self):
    with self.assertRaisesRegex(ValueError, "Unknown learning-rate schedule"):
      train.optimizer_from_config({"name": "adamw", "learning_rate": {
          "schedule": "cosine_warm"}})

  def test_check_optimizer(self):
    factors = {"lora_a": jnp.zeros((64, 4)), "lora_b": jnp.zeros((4, 64))}
    section = {"name": "galore_adamw", "learning_rate": 1e-3, "rank": 8}
    with self.assertRaisesRegex(ValueError, "would project no parameter.*"
                                "rank=8"):
      train.check_optimizer(section, factors)
    train.check_optimizer(dict(section, rank=2), factors)
    train.check_optimizer({"name": "adamw", "learning_rate": 1e-3}, factors)

  def test_inject_from_config(self):
    model = train.inject_from_config(
        _Regressor(nnx.Rngs(0)),
        {"method": "lora", "targets": "hidden", "rank": 2}, rngs=1)
    self.assertGreater(adapters.count_parameters(model)["trainable"], 0)
    self.assertLen(jax.tree.leaves(nnx.state(model, nnx.LoRAParam)), 2)

  def test_inject_full_is_a_no_op(self):
    model = _Regressor(nnx.Rngs(0))
    self.assertIs(train.inject_from_config(model, {"method": "full"}), model)

  def test_inject_unknown_method(self):
    with self.assertRaisesRegex(ValueError, "adapter method must be 'full'"):
      train.inject_from_config(_Regressor(nnx.Rngs(0)),
                               {"method": "lorax", "targets": "hidden",
                                "rank": 2})


if __name__ == "__main__":
  absltest.main()
