"""Tests for lowrank.optim.layer_sampling: LISA / OwLore layer sampling."""

import functools

from absl.testing import absltest
from absl.testing import parameterized
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import presets
from lowrank.optim import layer_sampling as ls

from tests import testing

# Layers: a stacked `[L, ...]` block plus one unstacked `blocks_i`.
L = testing.LAYERED_NUM_LAYERS
STACKED = r"\['stack'\]"


def _params(dtype=jnp.float32):
  # A fresh tree (tests may rebuild it) of cached, immutable arrays.
  return jax.tree.map(lambda x: x, _draw_params(dtype))


@functools.cache  # Draw once per dtype: eager RNG ops compile per shape.
def _draw_params(dtype):
  return testing.layered_params(dtype)


_loss = testing.layered_loss
_grad = jax.jit(jax.grad(_loss))  # Compiled once per dtype, not per test.


def _layer_norms(updates):
  """`[L]` update magnitude per layer (stacked slice + its unstacked block)."""
  stacked = jnp.sum(jnp.abs(updates["stack"]["w"]), axis=(1, 2)) + jnp.sum(
      jnp.abs(updates["stack"]["b"]), axis=1)
  blocks = jnp.stack(
      [jnp.sum(jnp.abs(updates[f"blocks_{i}"]["w"])) for i in range(L)])
  return np.asarray(stacked), np.asarray(blocks)


def _core(inner=None, **kwargs):
  kwargs = {"num_layers": L, "active_layers": 2, "refresh_every": 3,
            "stacked": STACKED, **kwargs}
  return ls.scale_by_layer_sampling(inner or optax.scale_by_adam(), **kwargs)



def _galore_bases(tx, steps):
  """Per step of `tx` (an OwLore with GaLore) on `_params()`: the stacked
  `w`'s GaLore bases before and after the step, and the active layers."""
  params = _params()
  state = tx.init(params)
  update = jax.jit(tx.update)
  for _ in range(steps):
    old = state[0].inner_state[0].galore_state.projector["stack"]["w"]
    updates, state = update(_grad(params), state, params)
    params = optax.apply_updates(params, updates)
    yield (old, state[0].inner_state[0].galore_state.projector["stack"]["w"],
           np.asarray(state[0].active))

class WrappersAndArgumentsTest(parameterized.TestCase):
  """Optax wrappers and argument checks.

  The optax contract of every exported transform runs in
  `tests/optim/contract_test.py`.
  """

  def test_composes_with_optax_wrappers(self):
    params = _params()
    grads = _grad(params)
    mask = jax.tree.map(lambda _: True, params)
    mask["embed"] = False
    txs = {
        # Callables (`layer_of`) and shape-fixing ints must be static.
        "inject": optax.inject_hyperparams(
            ls.owlore_adamw, static_args=ls.OWLORE_STATIC_ARGS)(
                learning_rate=1e-2, num_layers=L, active_layers=2,
                refresh_every=3, stacked=STACKED, owlore_alpha=3.0),
        "masked": optax.masked(_core(), mask),
        "multi_steps": optax.MultiSteps(
            ls.lisa_adamw(1e-2, num_layers=L, active_layers=2, refresh_every=3,
                          stacked=STACKED), every_k_schedule=2),
    }
    for name, tx in txs.items():
      with self.subTest(name):
        update = jax.jit(tx.update)
        updates, state = update(grads, tx.init(params), params)
        updates, state = update(grads, state, params)
        self.assertTrue(all(jnp.all(jnp.isfinite(u))
                            for u in jax.tree.leaves(updates)))
        if name == "masked":  # Masked-out leaves pass through unchanged.
          np.testing.assert_array_equal(updates["embed"], grads["embed"])
          self.assertEqual(int(np.sum(_layer_norms(updates)[0] > 0)), 2)

  def test_bad_arguments(self):
    for kwargs, msg in (
        (dict(active_layers=L + 1), "exceeds num_layers"),
        (dict(refresh_every=0), "refresh_every must be"),
        (dict(active_layers=0), "active_layers must be"),
        (dict(probabilities="owl"), "Unknown probabilities"),
        (dict(probabilities=np.ones(L - 1)), "must have shape"),
        (dict(probabilities=np.eye(L)[0]), "non-zero entries"),
        (dict(probabilities="owlore", owlore_floor=1.5), "owlore_floor"),
    ):
      with self.subTest(msg), self.assertRaisesRegex(ValueError, msg):
        _core(**kwargs)
    with self.assertRaisesRegex(ValueError, "galore_refresh_every must be"):
      ls.owlore_adamw(1e-2, num_layers=L, active_layers=1, refresh_every=4,
                      rank=2, galore_refresh_every=0)
    params = _params()
    for kwargs, msg in (
        (dict(stacked=r"\['stack'\]|embed"), "leading \\(layer\\) dimension"),
        (dict(num_layers=L - 1, stacked=None), "outside"),
        (dict(stacked=None, layer_of=None), "No leaf belongs to a layer"),
        (dict(stacked=r"\['stack'\]|blocks_1"), "also mapped"),
    ):
      with self.subTest(msg), self.assertRaisesRegex(ValueError, msg):
        kwargs = {"num_layers": L, "active_layers": 1, "refresh_every": 2,
                  **kwargs}
        jax.eval_shape(  # Validation runs while tracing: nothing compiles.
            ls.scale_by_layer_sampling(optax.identity(), **kwargs).init,
            params)
    with self.assertRaisesRegex(ValueError, "needs `params`"):
      tx = _core(optax.identity(), probabilities="owlore")
      jax.eval_shape(tx.update, params, tx.init(params))


class SamplingTest(parameterized.TestCase):

  def test_active_set_updates_moments_and_period(self):
    tx = _core(refresh_every=3)
    params = _params()
    state = tx.init(params)
    self.assertFalse(np.any(state.active))
    update = jax.jit(tx.update)
    actives = []
    for t in range(12):
      grads = jax.tree.map(
          lambda x, k=t: jax.random.normal(jax.random.key(k), x.shape),
          params)
      updates, new = update(grads, state, params)
      active = np.asarray(new.active)
      actives.append(active)
      self.assertEqual(int(active.sum()), 2)
      stacked, blocks = _layer_norms(updates)
      # Exactly the active layers move, in stacked and in mapped leaves.
      np.testing.assert_array_equal(stacked > 0, active)
      np.testing.assert_array_equal(blocks > 0, active)
      for key in ("embed", "head"):  # No layer: always trained.
        self.assertGreater(float(jnp.min(jnp.abs(updates[key]))), 0.0)
      # Inactive layers' moments are unchanged; active ones moved.
      for field in ("mu", "nu"):
        old = getattr(state.inner_state, field)
        cur = getattr(new.inner_state, field)
        for i in range(L):
          same_w = bool(jnp.all(old["stack"]["w"][i] == cur["stack"]["w"][i]))
          same_blk = bool(jnp.all(old[f"blocks_{i}"]["w"]
                                  == cur[f"blocks_{i}"]["w"]))
          self.assertEqual(same_w, not active[i])
          self.assertEqual(same_blk, not active[i])
        self.assertFalse(bool(jnp.all(old["head"] == cur["head"])))
      state = new
    for t in range(1, 12):  # The set changes every refresh_every (3) steps.
      if t % 3:
        np.testing.assert_array_equal(actives[t], actives[t - 1])
    self.assertGreater(len({a.tobytes() for a in actives}), 1)

  def test_per_slice_adam_resumes_like_torch(self):
    # lisa_adamw's Adam counts each layer's own steps: a layer's updates
    # equal plain Adam run on its active steps only (torch's `step`).
    params = {"stack": jnp.zeros((L, 3))}
    tx = ls.lisa_adamw(1.0, num_layers=L, active_layers=1, refresh_every=2,
                       stacked="stack", b2=0.99)
    state = tx.init(params)
    update = jax.jit(tx.update)
    ref, ref_states = optax.adam(1.0, b2=0.99), {}
    for t in range(40):
      g = {"stack": jax.random.normal(jax.random.key(t), (L, 3))}
      updates, state = update(g, state, params)
      (i,) = np.flatnonzero(state[0].active)
      ref_state = ref_states.get(i, ref.init(g["stack"][i]))
      want, ref_states[i] = ref.update(g["stack"][i], ref_state)
      np.testing.assert_allclose(updates["stack"][i], want, rtol=1e-5,
                                 atol=1e-6)

  def test_all_layers_active_equals_adamw(self):
    params = _params()
    tx = ls.lisa_adamw(1e-2, num_layers=L, active_layers=L, refresh_every=2,
                       stacked=STACKED, weight_decay=0.1)
    ref = optax.adamw(1e-2, weight_decay=0.1)
    state, ref_state = tx.init(params), ref.init(params)
    update, ref_update = jax.jit(tx.update), jax.jit(ref.update)
    for _ in range(3):
      grads = _grad(params)
      updates, state = update(grads, state, params)
      want, ref_state = ref_update(grads, ref_state, params)
      for u, w in zip(jax.tree.leaves(updates), jax.tree.leaves(want)):
        np.testing.assert_allclose(u, w, rtol=1e-5, atol=1e-7)
      params = optax.apply_updates(params, updates)

  def test_galore_projectors_of_frozen_layers_are_kept(self):
    tx = ls.owlore_adamw(1e-2, num_layers=L, active_layers=2, refresh_every=2,
                         stacked=STACKED, rank=2, probabilities="uniform",
                         project=r"stack")
    for t, (old, new, active) in enumerate(_galore_bases(tx, 6)):
      for i in range(L):
        changed = not bool(jnp.all(old[i] == new[i]))
        # Bases change only for active layers, and only at draws/refreshes.
        self.assertEqual(changed, bool(active[i]) and t % 2 == 0)
        if active[i]:  # A freshly drawn layer always has a basis.
          self.assertGreater(float(jnp.linalg.norm(new[i])), 0.0)

  def test_galore_bases_refresh_on_each_layers_own_steps(self):
    # galore-torch counts a parameter's steps only while it has a gradient
    # and recomputes its basis when that count is a multiple of the gap;
    # a gap (4) longer than the draw interval (2), as the OwLore script's
    # 100 and 50, keeps a redrawn layer's basis for a stint.
    tx = ls.owlore_adamw(1e-2, num_layers=L, active_layers=2, refresh_every=2,
                         stacked=STACKED, rank=2, galore_refresh_every=4,
                         probabilities="uniform", project=r"stack")
    own = np.zeros(L, int)  # torch's per-parameter state["step"].
    seen = np.zeros(L, bool)
    kept = 0
    for old, new, active in _galore_bases(tx, 10):
      due = active & (own % 4 == 0)
      changed = [not bool(jnp.all(old[i] == new[i])) for i in range(L)]
      np.testing.assert_array_equal(changed, due)
      kept += int(np.sum(active & seen & ~due))
      seen |= active
      own += active
    self.assertGreater(kept, 0)  # Some redrawn layer kept its basis.

  def test_activation_outlier_ratios_are_owls(self):
    # OWL (luuyin/OWL lib/prune_all.py): |W| * ||X_i|| for each matrix of a
    # layer, flattened together; percent above 13 x their mean.
    rng = np.random.default_rng(0)
    w = rng.standard_normal((L, 8, 8)).astype(np.float32)
    blocks = [rng.standard_normal((8, 8)).astype(np.float32)
              for _ in range(L)]
    norms = rng.uniform(0.1, 1.0, (L, 8)).astype(np.float32)
    norms[:, 0] = 60.0  # An outlier input feature: rows 0 are outliers.
    block_norms = [np.ones(8, np.float32) for _ in range(L)]
    params = {"stack": {"w": w, "b": np.zeros((L, 8), np.float32)},
              **{f"blocks_{i}": {"w": b} for i, b in enumerate(blocks)}}
    input_norms = {"['stack']['w']": norms, **{
        f"['blocks_{i}']['w']": n for i, n in enumerate(block_norms)}}
    got = ls.activation_outlier_ratios(params, input_norms, num_layers=L,
                                       stacked=STACKED)
    want = []
    for i in range(L):
      metric = np.concatenate([(np.abs(w[i]) * norms[i][:, None]).ravel(),
                               np.abs(blocks[i]).ravel()])
      want.append(np.sum(metric > np.mean(metric) * 13) / metric.size)
    self.assertGreater(min(want), 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    # |W| alone finds no such outliers.
    np.testing.assert_array_equal(
        ls.outlier_ratios(params, num_layers=L, stacked=STACKED), 0.0)

  @parameterized.named_parameters(
      ("missing", {}, "no entry for the matrix \\['stack'\\]\\['w'\\]"),
      ("shape", {"['stack']['w']": np.ones((L, 7))}, "expected \\(4, 8\\)"),
      ("unknown", {"['stack']['w']": np.ones((L, 8)), "['head']": np.ones(8)},
       "names no matrix of a layer: \\[\"\\['head'\\]\"\\]"),
  )
  def test_activation_outlier_ratios_bad_norms(self, norms, msg):
    params = {"stack": {"w": jnp.ones((L, 8, 8))}, "head": jnp.ones((8, 3))}
    with self.assertRaisesRegex(ValueError, msg):
      ls.activation_outlier_ratios(params, norms, num_layers=L,
                                   stacked=STACKED)

  def test_owlore_without_floor_never_draws_a_zero_ratio_layer(self):
    k1, k2 = jax.random.split(jax.random.key(1))
    w = 0.02 * jax.random.normal(k1, (L, 32, 32))
    params = {"stack": w.at[2].set(0.02 * jax.random.t(k2, 2.0, (32, 32)))}
    freq = self._frequencies(params, draws=40, active_layers=1,
                             stacked="stack", probabilities="owlore",
                             owlore_alpha=7.0, owlore_floor=0.0)
    np.testing.assert_array_equal(freq, np.eye(L)[2])

  def test_paper_preset_builds_and_steps(self):
    kwargs = presets.paper("owlore_adamw")
    self.assertEqual(kwargs["rank"], 256)
    self.assertEqual(kwargs["owlore_floor"], 0.0)
    tx = ls.owlore_adamw(1e-2, num_layers=L, active_layers=2,
                         refresh_every=50, stacked=STACKED,
                         probabilities=np.arange(1.0, L + 1.0),
                         project=r"stack", **kwargs)
    params = _params()
    with self.assertWarnsRegex(UserWarning, "full \\(unprojected\\)"):
      state = tx.init(params)  # rank 256 >= 8: full-rank on this toy.
    updates, _ = jax.jit(tx.update)(_grad(params), state, params)
    self.assertTrue(all(bool(jnp.all(jnp.isfinite(u)))
                        for u in jax.tree.leaves(updates)))
    self.assertEqual(presets.paper(ls.lisa_adamw), {})

  def _frequencies(self, params, draws=600, **kwargs):
    tx = ls.scale_by_layer_sampling(
        optax.identity(), num_layers=L, refresh_every=1, **kwargs)

    def body(state, _):
      _, state = tx.update(params, state, params)
      return state, state.active

    _, active = jax.lax.scan(body, tx.init(params), None, length=draws)
    self.assertTrue(np.all(np.sum(active, axis=1) == kwargs["active_layers"]))
    return np.mean(np.asarray(active), axis=0)

  def test_uniform_frequencies(self):
    freq = self._frequencies({"stack": jnp.zeros((L, 2))}, draws=1200,
                             active_layers=2, stacked="stack", seed=3)
    np.testing.assert_allclose(freq, np.full(L, 2 / L), atol=0.06)

  def test_owlore_prefers_heavy_tailed_layer(self):
    k1, k2 = jax.random.split(jax.random.key(1))
    w = 0.02 * jax.random.normal(k1, (L, 32, 32))
    params = {"stack": w.at[2].set(0.02 * jax.random.t(k2, 2.0, (32, 32)))}
    ratios = jax.jit(lambda p: ls.outlier_ratios(
        p, num_layers=L, stacked="stack", alpha=7.0))(params)
    self.assertGreater(float(ratios[2]), 0.0)
    np.testing.assert_array_equal(np.delete(np.asarray(ratios), 2), 0.0)
    freq = self._frequencies(params, active_layers=1, stacked="stack",
                             probabilities="owlore", owlore_alpha=7.0,
                             owlore_floor=0.3)
    # p = 0.7 + 0.3 / L for the heavy-tailed layer, 0.3 / L for the others.
    self.assertGreater(freq[2], 0.6)
    self.assertLess(np.max(np.delete(freq, 2)), 0.12)
    np.testing.assert_allclose(freq[2], 0.75, atol=0.06)

  def test_outlier_ratio_definition(self):
    # Layer 0: 99 ones and one 100 in a stacked matrix plus a 10 x 10 block
    # of ones; mean |w| = 299 / 200, threshold 13 x 1.495 = 19.4: 1 outlier.
    w = jnp.ones((2, 10, 10)).at[0, 3, 4].set(100.0)
    params = {"stack": w, "blocks_0": jnp.ones((10, 10)),
              "blocks_1": jnp.ones((10,)) * 1e6}  # Vectors are ignored.
    ratios = ls.outlier_ratios(params, num_layers=2, stacked="stack")
    np.testing.assert_allclose(ratios, [1 / 200, 0.0], rtol=1e-6)
    ratios = ls.outlier_ratios(params, num_layers=2, stacked="stack",
                               alpha=100.0)
    np.testing.assert_allclose(ratios, [0.0, 0.0])

  def test_fixed_probabilities_and_default_layer_of(self):
    params = {"layers_0": {"w": jnp.ones((2, 2))},
              "layers": [{"w": jnp.ones((2, 2))}, {"w": jnp.ones((2, 2))}],
              "head": jnp.ones(2)}
    self.assertEqual(ls.default_layer_of("['layers'][1]['w']", None), 1)
    self.assertEqual(ls.default_layer_of("['model']['layer.11.q']", None), 11)
    self.assertIsNone(ls.default_layer_of("['layers_norm']", None))
    # layers_0 -> 0, layers[0] -> 0, layers[1] -> 1; pin layer 1.
    tx = ls.scale_by_layer_sampling(
        optax.scale_by_adam(), num_layers=2, active_layers=1, refresh_every=1,
        probabilities=np.array([0.0, 1.0]))
    state = tx.init(params)
    for _ in range(3):
      updates, state = jax.jit(tx.update)(params, state, params)
      np.testing.assert_array_equal(state.active, [False, True])
      self.assertEqual(float(jnp.abs(updates["layers_0"]["w"]).sum()), 0.0)
      self.assertEqual(float(jnp.abs(updates["layers"][0]["w"]).sum()), 0.0)
      self.assertGreater(float(jnp.abs(updates["layers"][1]["w"]).sum()), 0.)
      self.assertGreater(float(jnp.abs(updates["head"]).sum()), 0.0)

  def test_factored_inner_state_is_frozen_per_layer(self):
    # Adafactor's row/column statistics are `[L, m]` / `[L, n]` per stacked
    # leaf; `optax.tree_map_params` finds them and they are frozen too.
    tx = _core(optax.scale_by_factored_rms(min_dim_size_to_factor=2),
               refresh_every=1)
    params = _params()
    state = tx.init(params)
    _, new = jax.jit(tx.update)(_grad(params), state, params)
    inactive = ~np.asarray(new.active)
    for field in ("v_row", "v_col"):
      old = getattr(state.inner_state, field)["stack"]["w"]
      cur = getattr(new.inner_state, field)["stack"]["w"]
      np.testing.assert_array_equal(old[inactive], cur[inactive])
      self.assertFalse(bool(jnp.all(old[~inactive] == cur[~inactive])))

  def test_structural_fallback_freezes_moments(self):
    # An `inner` whose init rejects `tree_map_params`' empty placeholder:
    # moments are then found as sub-trees shaped like the parameters.
    adam = optax.scale_by_adam()

    def picky_init(params):
      if not jax.tree.leaves(params):
        raise ValueError("no parameters")
      return adam.init(params)

    tx = _core(optax.GradientTransformation(picky_init, adam.update))
    params = _params()
    state = tx.init(params)
    _, new = jax.jit(tx.update)(_grad(params), state, params)
    active = np.asarray(new.active)
    old, cur = state.inner_state.mu, new.inner_state.mu
    for i in range(L):
      self.assertEqual(bool(jnp.all(old["stack"]["w"][i]
                                    == cur["stack"]["w"][i])), not active[i])
      self.assertEqual(bool(jnp.all(old[f"blocks_{i}"]["w"]
                                    == cur[f"blocks_{i}"]["w"])),
                       not active[i])
    self.assertEqual(int(new.inner_state.count), 1)


if __name__ == "__main__":
  absltest.main()
