"""Tests for ReLoRA restarts and the jagged schedule (`spectral.relora`)."""

import math

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
from lowrank.models import llama
from lowrank.spectral import relora


def _mesh():
  return sharding.use_mesh(sharding.make_mesh(devices=jax.devices()[:1]))


def _model(seed=0, rank=4):
  with _mesh():
    model = llama.LlamaForCausalLM(llama.LlamaConfig.tiny(),
                                   rngs=nnx.Rngs(seed))
  adapters.inject(model, targets=r".*self_attn\.(q|v)_proj|.*mlp\.down_proj",
                  rank=rank, alpha=8, rngs=seed)
  return model


def _loss_fn(model, ids):
  return llama.next_token_loss(model(ids), ids)


def _ids(seed=1):
  return np.asarray(jax.random.randint(jax.random.key(seed), (4, 16), 0, 32))


def _randomize_b(model, seed=3):
  for i, m in enumerate(adapters.adapter_modules(model).values()):
    b = m.lora_b.get_value()
    m.lora_b.set_value(0.05 * jax.random.normal(jax.random.key(seed + i),
                                                b.shape, b.dtype))


class RestartTest(parameterized.TestCase):

  def test_restart_keeps_function_and_refreshes_adapter(self):
    model = _model()
    _randomize_b(model)
    ids = _ids()
    before = np.asarray(model(ids))
    mods = adapters.adapter_modules(model)
    old = {n: (np.asarray(m.kernel_2d()), np.asarray(m.delta_weight()),
               np.asarray(m.lora_a.get_value())) for n, m in mods.items()}
    self.assertTrue(any(np.abs(d).max() > 0 for _, d, _ in old.values()))
    with _mesh():
      opt = nnx.Optimizer(model, optax.adamw(1e-3), wrt=relora.trainable())
    relora.restart(model, opt, jax.random.key(0), prune_ratio=0.9)
    np.testing.assert_allclose(model(ids), before, atol=2e-5)
    for name, m in adapters.adapter_modules(model).items():
      kernel, delta, a_old = old[name]
      self.assertFalse(m.merged)
      np.testing.assert_allclose(m.kernel_2d(), kernel + delta, atol=1e-6)
      np.testing.assert_array_equal(m.lora_b.get_value(), 0)
      a = np.asarray(m.lora_a.get_value())
      self.assertFalse(np.allclose(a, a_old))
      bound = 1 / math.sqrt(m.d_in)  # Kaiming-uniform, as PEFT / ReLoRA.
      self.assertTrue(np.all(np.abs(a) <= bound))
      self.assertGreater(a.std(), bound / 3)

  def test_trainable_filter(self):
    model = _model()
    names = {".".join(map(str, p)) for p, _ in nnx.to_flat_state(
        nnx.state(model, relora.trainable()))}
    self.assertIn("model.layers.0.self_attn.q_proj.lora_a", names)
    self.assertIn("model.embed_tokens.embedding", names)
    self.assertIn("model.layers.0.self_attn.k_proj.kernel", names)
    self.assertNotIn("model.layers.0.self_attn.q_proj.base.kernel", names)

  @parameterized.parameters(0.0, 0.5, 0.9, 0.99, 1.0)
  def test_magnitude_pruning_keeps_the_largest(self, ratio):
    x = jax.random.normal(jax.random.key(0), (40, 25))
    state = {"mu": {"layer": {"lora_a": x, "kernel": x}},
             "count": jnp.array(7, jnp.int32)}
    out = relora.prune_moments(state, ratio)
    np.testing.assert_array_equal(out["mu"]["layer"]["kernel"], x)
    self.assertEqual(int(out["count"]), 7)
    pruned = np.asarray(out["mu"]["layer"]["lora_a"])
    kept = np.flatnonzero(pruned)
    n = x.size
    self.assertLessEqual(abs(len(kept) - round((1 - ratio) * n)), 1)
    if 0 < len(kept) < n:  # Exactly the largest magnitudes survive.
      order = np.argsort(-np.abs(np.asarray(x)).reshape(-1))
      self.assertEqual(set(kept), set(order[: len(kept)]))
    np.testing.assert_array_equal(pruned.reshape(-1)[kept],
                                  np.asarray(x).reshape(-1)[kept])

  def test_optimizer_moments_pruned_in_place(self):
    model = _model()
    with _mesh():
      opt = nnx.Optimizer(model, optax.adam(1e-2), wrt=relora.trainable())
    ids = _ids()
    relora.train(model, opt, _loss_fn, [(ids,)] * 2, refresh_every=100)
    before = nnx.as_pure(opt.opt_state)
    relora.restart(model, opt, jax.random.key(1), prune_ratio=0.99,
                   method="magnitude")  # Exact counts below.
    after = nnx.as_pure(opt.opt_state)
    self.assertEqual(int(after[0].count), 2)
    for moment in ("mu", "nu"):
      old_q = getattr(before[0], moment)["model"]["layers"][0]["self_attn"]
      new_q = getattr(after[0], moment)["model"]["layers"][0]["self_attn"]
      for leaf in ("lora_a", "lora_b"):
        new = np.asarray(new_q["q_proj"][leaf])
        self.assertLessEqual(np.count_nonzero(new),
                             math.ceil(0.01 * new.size) + 1)
      # Moments of non-adapter parameters are untouched.
      np.testing.assert_array_equal(new_q["k_proj"]["kernel"],
                                    old_q["k_proj"]["kernel"])

  def test_random_pruning_and_full_reset(self):
    x = jnp.ones((100, 50))
    out = relora.prune_moments({"lora_b": x}, 0.75, method="random",
                               key=jax.random.key(0))
    frac = np.count_nonzero(out["lora_b"]) / x.size
    self.assertAlmostEqual(frac, 0.25, delta=0.03)
    zero = relora.prune_moments({"lora_b": x}, 1.0)
    np.testing.assert_array_equal(zero["lora_b"], 0)

  def test_errors(self):
    with self.assertRaisesRegex(ValueError, "prune_ratio"):
      relora.prune_moments({}, 1.5)
    with self.assertRaisesRegex(ValueError, "needs a key"):
      relora.prune_moments({}, 0.5, method="random")
    with self.assertRaisesRegex(ValueError, "method must be"):
      relora.prune_moments({}, 0.5, method="top")
    with _mesh():
      plain = llama.LlamaForCausalLM(llama.LlamaConfig.tiny(),
                                     rngs=nnx.Rngs(0))
    with self.assertRaisesRegex(ValueError, "no adapters"):
      relora.merge_and_reinit(plain, jax.random.key(0))
    model = _model()
    adapters.merge(model)
    with self.assertRaisesRegex(ValueError, "is merged"):
      relora.restart(model, {}, jax.random.key(0))


class _Net(nnx.Module):

  def __init__(self):
    self.proj = nnx.Linear(4, 3, rngs=nnx.Rngs(0))

  def __call__(self, x):
    return self.proj(x)


class OfficialDefaultTest(absltest.TestCase):
  """The official reset: random pruning (`rand > ratio` keeps), 0.999."""

  def _restart(self, **kwargs):
    net = _Net()
    adapters.inject(net, targets="proj", rank=2, rngs=0)
    # Distinct magnitudes 1..2000: magnitude pruning would keep the top.
    x = jnp.arange(1.0, 2001.0).reshape(40, 50)
    state = {"mu": {"proj": {"lora_a": x}}, "count": jnp.array(5)}
    out = relora.restart(net, state, jax.random.key(0), **kwargs)
    self.assertEqual(int(out["count"]), 5)
    return np.asarray(x), np.asarray(out["mu"]["proj"]["lora_a"])

  def test_restart_prunes_at_random_by_default(self):
    x, pruned = self._restart(prune_ratio=0.5)
    kept = pruned != 0
    self.assertAlmostEqual(kept.mean(), 0.5, delta=0.04)
    np.testing.assert_array_equal(pruned[kept], x[kept])
    # Kept entries are spread over all magnitudes (top half: mean 1500.5).
    self.assertAlmostEqual(x[kept].mean(), x.mean(), delta=60)
    self.assertLess(x[kept].min(), 100)

  def test_paper_presets(self):
    self.assertEqual(presets.paper("relora_train"), {})
    self.assertIn("warm start",
                  " ".join(presets.get("relora_train").unavailable))
    _, pruned = self._restart(**presets.paper("relora_restart"))
    # 0.999 of 2000 entries: about 2 survive.
    self.assertLessEqual(np.count_nonzero(pruned), 10)


class ScheduleTest(parameterized.TestCase):

  def test_jagged_shape(self):
    peak, total, warm, every, rewarm, floor = 1.0, 100, 10, 25, 5, 0.1
    fn = relora.jagged_cosine_schedule(
        peak, total_steps=total, warmup_steps=warm, refresh_every=every,
        restart_warmup_steps=rewarm, min_ratio=floor)
    lr = np.asarray([float(fn(t)) for t in range(total + 1)])

    def envelope(t):
      progress = min(max((t - warm) / (total - warm), 0.0), 1.0)
      return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    # Initial linear warm-up from 0 to the peak.
    np.testing.assert_allclose(lr[: warm + 1], np.arange(warm + 1) / warm,
                               atol=1e-6)
    for k in (1, 2, 3):
      start = k * every
      self.assertEqual(lr[start], 0.0)  # Each restart starts at 0 ...
      target = envelope(start + rewarm)  # ... and rises to the envelope.
      np.testing.assert_allclose(
          lr[start: start + rewarm + 1], np.arange(rewarm + 1) / rewarm *
          target, atol=1e-6)
      self.assertTrue(np.all(np.diff(lr[start: start + rewarm + 1]) > 0))
      # Between restarts the cosine envelope decays.
      seg = lr[start + rewarm: min(start + every, total + 1)]
      np.testing.assert_allclose(
          seg, [envelope(t) for t in range(start + rewarm, start + rewarm +
                                           len(seg))], atol=1e-6)
    np.testing.assert_allclose(lr[every - 1], envelope(every - 1), atol=1e-6)
    self.assertAlmostEqual(lr[total - 1], envelope(total - 1), places=6)
    # It works as an optax schedule inside a jitted update.
    tx = optax.sgd(fn)
    state = tx.init({"w": jnp.ones(2)})
    upd, _ = jax.jit(tx.update)({"w": jnp.ones(2)}, state)
    np.testing.assert_allclose(upd["w"], -lr[0] * np.ones(2))

  def test_schedule_errors(self):
    kw = dict(total_steps=100, warmup_steps=10, refresh_every=20,
              restart_warmup_steps=5)
    with self.assertRaisesRegex(ValueError, "restart_warmup_steps"):
      relora.jagged_cosine_schedule(1.0, **(kw | {"restart_warmup_steps": 30}))
    with self.assertRaisesRegex(ValueError, "warmup_steps"):
      relora.jagged_cosine_schedule(1.0, **(kw | {"warmup_steps": 100}))
    with self.assertRaisesRegex(ValueError, "min_ratio"):
      relora.jagged_cosine_schedule(1.0, **kw, min_ratio=2.0)


class TrainingTest(absltest.TestCase):

  def test_cycles_reduce_loss(self):
    model = _model(seed=7)
    refresh_every, cycles = 4, 3
    schedule = relora.jagged_cosine_schedule(
        1e-2, total_steps=refresh_every * cycles, warmup_steps=1,
        refresh_every=refresh_every, restart_warmup_steps=1, min_ratio=0.3)
    with _mesh():
      opt = nnx.Optimizer(model, optax.adamw(schedule),
                          wrt=relora.trainable())
    ids = _ids(seed=8)
    restarts = []

    def callback(step, loss):
      del loss
      if step % refresh_every == 0:
        restarts.append(step)

    losses = relora.train(model, opt, _loss_fn,
                          [(ids,)] * (refresh_every * cycles),
                          refresh_every=refresh_every, prune_ratio=0.99,
                          callback=callback)
    self.assertLen(losses, refresh_every * cycles)
    self.assertEqual(restarts, [4, 8, 12])
    self.assertLess(losses[-1], 0.7 * losses[0], losses)
    # After the last restart the adapters are fresh and the merged model
    # carries everything learnt.
    for m in adapters.adapter_modules(model).values():
      np.testing.assert_array_equal(m.lora_b.get_value(), 0)
    self.assertLess(float(_loss_fn(model, ids)), losses[-1])


if __name__ == "__main__":
  absltest.main()
