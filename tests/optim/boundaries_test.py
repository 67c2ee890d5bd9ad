"""Boundary cases of the GaLore-family transforms (lowrank.optim.galore).

N-D kernels and their matrix views, stacked-layer metadata, the `project`
selector, the rank fallback and the meaning of `mask`. Each case gives an
input and asserts a clear error (type and message) or the correct answer.
"""

import inspect
import warnings

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank import optim
from lowrank import sharding

_F32 = 4  # bytes


def _init(tx, params):
  """`tx.init(params)` and the warnings it raised."""
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    state = tx.init(params)
  return state, [str(w.message) for w in caught]


def _mha(d=64, heads=4, head_dim=16):
  return nnx.MultiHeadAttention(
      num_heads=heads, in_features=d, qkv_features=heads * head_dim,
      decode=False, rngs=nnx.Rngs(0))


class _Block(nnx.Module):

  def __init__(self, rngs):
    self.dense = nnx.Linear(
        16, 24, rngs=rngs, kernel_init=nnx.with_partitioning(
            nnx.initializers.lecun_normal(), ("embed", "mlp")))


class _Stacked(nnx.Module):
  """Three `_Block`s stacked by `nnx.vmap` along a `layers` axis."""

  def __init__(self, rngs):

    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return _Block(rngs)

    self.blocks = make(rngs)


def _stacked_model():
  rules = sharding.LOGICAL_AXIS_RULES + (("layers", None),)
  with sharding.use_mesh(rules=rules):
    return _Stacked(nnx.Rngs(0))


class NDKernelTest(parameterized.TestCase):

  def test_mha_query_kernel_is_d_by_heads_times_head_dim(self):
    # [D, H, K] with in_features=D: the view is [D, H·K], and the state is
    # exactly r x (H·K) moments plus a D x r basis (no stack of [H, K]).
    mha = _mha()
    params = nnx.as_pure(nnx.state(mha, nnx.Param))
    tx = optim.galore_adamw(1e-2, rank=8, input_axes=mha)
    state, caught = _init(tx, params)
    self.assertEqual(caught, [])
    self.assertEqual(state[0].inner_state.mu["query"]["kernel"].shape,
                     (8, 64))
    self.assertEqual(state[0].projector["query"]["kernel"].shape, (64, 8))
    self.assertEqual(state[0].projector["out"]["kernel"].shape, (64, 8))
    projected = 4 * (2 * 8 * 64 + 64 * 8 + 1)  # moments, basis, Fira norm
    biases = 3 * 2 * 4 * 16 + 2 * 64  # unprojected: two moments each
    scalars = 4 + 8 + 4  # count, key, Adam count
    want = _F32 * (projected + biases) + scalars
    self.assertEqual(optim.state_bytes(state), want)
    self.assertEqual(optim.estimate_bytes(params, tx), want)

  def test_mha_output_kernel_default_rule_is_heads_times_dim_by_d(self):
    params = nnx.as_pure(nnx.state(_mha(), nnx.Param))
    self.assertEqual(
        optim.projected_leaves(params, rank=8)["['out']['kernel']"], (64, 64))

  def test_nd_leaf_without_input_axes_warns_about_the_default_split(self):
    params = {"attn": jnp.zeros((64, 4, 16))}
    state, caught = _init(optim.galore_adamw(1e-2, rank=8), params)
    self.assertLen(caught, 1)
    self.assertRegex(caught[0], r"default rule views them as .*"
                     r"\['attn'\] \(64, 4, 16\) -> \(256, 16\).*input_axes=")
    self.assertEqual(state[0].projector["attn"].shape, (256, 8))

  def test_bert_base_attention_at_rank_128_is_projected(self):
    # Used to be taken for 768 stacked [12, 64] matrices (min 12 < 128) and
    # left with full Adam state, silently.
    params = {"query": {"kernel": jax.ShapeDtypeStruct((768, 12, 64),
                                                       jnp.float32)}}
    tx = optim.galore_adamw(1e-3, rank=128,
                            input_axes={"query": {"kernel": 0}})
    state = jax.eval_shape(tx.init, params)
    self.assertEqual(state[0].inner_state.mu["query"]["kernel"].shape,
                     (128, 768))
    moments, basis = 2 * 128 * 768 * _F32, 768 * 128 * _F32
    want = moments + basis + _F32 + 4 + 8 + 4  # Fira norm, counts, key
    self.assertEqual(optim.state_bytes(state), want)
    self.assertLess(want, 0.3 * optim.estimate_bytes(params, optax.adamw(0.1)))

  def test_3d_leaf_is_not_stacked_without_metadata(self):
    params = {"w": jnp.zeros((4, 32, 16))}
    got = optim.projected_leaves(params, rank=4, input_axes={"w": (0, 1)})
    self.assertEqual(got, {"['w']": (128, 16)})
    got = optim.projected_leaves(params, rank=4, stacked_axes="w")
    self.assertEqual(got, {"['w']": (4, 32, 16)})

  def test_einsum_kernel_batch_letter_is_stacked_input_in_the_middle(self):
    # 'bnd,ndk->bnk': n (in the input and the output) indexes independent
    # [d, k] matrices; nothing is transposed. 'btd,ndh->btnh': the input
    # axis d is in the middle of the kernel [n, d, h], so the view
    # transposes it to the front: [d, n·h].
    per_head = nnx.Einsum("bnd,ndk->bnk", (4, 16, 8), rngs=nnx.Rngs(0))
    got = optim.projected_leaves(
        nnx.as_pure(nnx.state(per_head, nnx.Param)), rank=2,
        stacked_axes=per_head, input_axes=per_head)
    self.assertEqual(got, {"['kernel']": (4, 16, 8)})
    q = nnx.Einsum("btd,ndh->btnh", (4, 32, 8), rngs=nnx.Rngs(0))
    params = nnx.as_pure(nnx.state(q, nnx.Param))
    got = optim.projected_leaves(params, rank=4, input_axes=q)
    self.assertEqual(got, {"['kernel']": (32, 32)})

  def test_transposed_view_matches_galore_on_the_2d_matrix(self):
    # The update of a [n, d, h] kernel with input axis d equals GaLore's
    # update of the [d, n·h] matrix, mapped back.
    seq = [jax.random.normal(jax.random.key(i), (4, 32, 8)) for i in range(4)]
    to2d = lambda x: jnp.transpose(x, (1, 0, 2)).reshape(32, 32)
    nd = optim.galore_adamw(1e-2, rank=4, refresh_every=2,
                            input_axes=lambda path, leaf: 1)
    flat = optim.galore_adamw(1e-2, rank=4, refresh_every=2)
    p_nd, p_flat = {"k": jnp.zeros((4, 32, 8))}, {"k": jnp.zeros((32, 32))}
    s_nd, s_flat = nd.init(p_nd), flat.init(p_flat)
    for g in seq:
      u_nd, s_nd = nd.update({"k": g}, s_nd, p_nd)
      u_flat, s_flat = flat.update({"k": to2d(g)}, s_flat, p_flat)
      np.testing.assert_allclose(to2d(u_nd["k"]), u_flat["k"], atol=1e-6)

  def test_bias_is_not_projected_by_default_but_can_be_selected(self):
    params = {"dense": {"kernel": jnp.zeros((32, 24)),
                        "bias": jnp.zeros((4, 6))}}
    self.assertEqual(optim.projected_leaves(params, rank=2),
                     {"['dense']['kernel']": (32, 24)})
    got = optim.projected_leaves(params, rank=2,
                                 project=lambda path, leaf: True)
    self.assertEqual(got["['dense']['bias']"], (4, 6))

  def test_one_d_leaf_selected_explicitly_raises(self):
    params = {"w": jnp.zeros((8, 8)), "scale": jnp.zeros((8,))}
    with self.assertRaisesRegex(
        ValueError, r"fewer than 2 non-stacked axes.*\['scale'\] \(8,\)"):
      optim.galore_adamw(1e-2, rank=2, project={"w": True, "scale": True}
                         ).init(params)


class StackedAxesTest(parameterized.TestCase):

  def test_stacked_axes_from_reads_the_layers_logical_axis(self):
    model = _stacked_model()
    axes = optim.stacked_axes_from(model)
    self.assertEqual(axes["blocks"]["dense"]["kernel"], (0,))
    self.assertEqual(axes["blocks"]["dense"]["bias"], ())  # No metadata.
    params = nnx.as_pure(nnx.state(model, nnx.Param))
    tx = optim.galore_adamw(1e-2, rank=4, stacked_axes=model)
    state, _ = _init(tx, params)
    self.assertEqual(
        state[0].projector["blocks"]["dense"]["kernel"].shape, (3, 24, 4))
    self.assertEqual(
        state[0].inner_state.mu["blocks"]["dense"]["kernel"].shape,
        (3, 16, 4))

  def test_stacked_axes_from_pure_arrays_raises(self):
    params = nnx.as_pure(nnx.state(_stacked_model(), nnx.Param))
    with self.assertRaisesRegex(TypeError, "carry no axis metadata"):
      optim.stacked_axes_from(params)

  def test_stacked_axes_tree_missing_a_leaf_raises(self):
    params = {"a": jnp.zeros((2, 8, 8)), "b": jnp.zeros((8, 8))}
    with self.assertRaisesRegex(
        ValueError, r"stacked_axes has no entry for 1 of the 2 leaves: "
        r"\[\['b'\]\]"):
      optim.projected_leaves(params, rank=2, stacked_axes={"a": 0})

  def test_stacked_axis_out_of_range_raises(self):
    params = {"a": jnp.zeros((2, 8, 8))}
    with self.assertRaisesRegex(ValueError, "axis 3 is out of range"):
      optim.projected_leaves(params, rank=2, stacked_axes={"a": 3})

  def test_input_axes_leaving_no_output_axis_raises(self):
    params = {"a": jnp.zeros((8, 4, 4))}
    with self.assertRaisesRegex(
        ValueError, "at least one input and one output axis"):
      optim.projected_leaves(params, rank=2, input_axes={"a": (0, 1, 2)})

  def test_input_axes_as_a_string_raises(self):
    with self.assertRaisesRegex(TypeError, "input_axes takes a callable"):
      optim.galore_adamw(1e-2, rank=2, input_axes="kernel")

  def test_input_axes_from_a_state_raises(self):
    with self.assertRaisesRegex(TypeError, "needs an nnx.Module"):
      optim.input_axes_from(nnx.state(_mha()))


class SelectorTest(parameterized.TestCase):

  def test_rank_at_or_above_min_falls_back_with_one_warning(self):
    params = {"wide": jnp.zeros((8, 64)), "square": jnp.zeros((16, 16)),
              "big": jnp.zeros((64, 32))}
    state, caught = _init(optim.galore_adamw(1e-2, rank=16), params)
    self.assertLen(caught, 1)  # One warning, listing both leaves.
    self.assertRegex(
        caught[0], r"2 selected leaves have rank=16 >= min\(m, n\).*"
        r"\['square'\] \(16, 16\).*\['wide'\] \(8, 64\)")
    mu = state[0].inner_state.mu
    self.assertEqual(mu["wide"].shape, (8, 64))  # Full Adam state.
    self.assertEqual(mu["square"].shape, (16, 16))
    self.assertEqual(mu["big"].shape, (16, 32))

  @parameterized.named_parameters(
      ("no_path", r"encoder", "it matches no leaf"),
      ("only_biases", r"bias",
       "it matches only leaves that are not projected"))
  def test_project_regex_selecting_nothing_raises(self, regex, reason):
    params = {"dense": {"kernel": jnp.zeros((16, 8)),
                        "bias": jnp.zeros((8,))}}
    tx = optim.galore_adamw(1e-2, rank=2, project=regex)
    with self.assertRaisesRegex(
        ValueError, rf"project='{regex}' selects no leaf to project: "
        rf"{reason}.*Candidate paths: \[\['dense'\]\['kernel'\]\]"):
      tx.init(params)

  @parameterized.parameters("project", "stacked_axes")
  def test_invalid_regex_raises_naming_the_argument(self, name):
    with self.assertRaisesRegex(
        ValueError, rf"{name}='layers\[' is not a valid regular expression"):
      optim.galore_adamw(1e-2, rank=2, **{name: "layers["})

  def test_stacked_axes_regex_matching_nothing_raises(self):
    params = {"w": jnp.zeros((2, 8, 8))}
    with self.assertRaisesRegex(
        ValueError, r"stacked_axes='layers' matches no leaf; candidate "
        r"paths: \[\['w'\]\]"):
      optim.galore_adamw(1e-2, rank=2, stacked_axes="layers").init(params)

  def test_bool_tree_of_the_wrong_size_raises(self):
    params = {"a": jnp.zeros((8, 8)), "b": jnp.zeros((8, 8))}
    with self.assertRaisesRegex(ValueError,
                                "project has 1 leaves; params have 2"):
      optim.projected_leaves(params, rank=2, project={"a": True})


class MaskMeaningTest(parameterized.TestCase):

  @parameterized.parameters(optim.galore_adamw, optim.fira_adamw,
                            optim.frugal_adamw, optim.q_galore_adamw)
  def test_mask_is_the_weight_decay_mask(self, factory):
    # optax's meaning: `mask` picks the decayed leaves and does not change
    # which leaves are projected.
    params = {"w": jnp.ones((16, 8)), "v": jnp.ones((16, 8))}
    tx = factory(1.0, rank=2, weight_decay=0.5,
                 mask={"w": True, "v": False})
    state = tx.init(params)
    zeros = jax.tree.map(jnp.zeros_like, params)
    updates, state = tx.update(zeros, state, params)
    np.testing.assert_allclose(updates["w"], -0.5 * params["w"], atol=1e-6)
    np.testing.assert_allclose(updates["v"], 0.0, atol=1e-6)
    for k in params:  # Both projected (a [0] placeholder has 0 bytes).
      self.assertGreater(optim.tree_bytes(state[0].projector[k]), 0)

  def test_string_mask_points_to_project(self):
    with self.assertRaisesRegex(
        ValueError, r"mask='_proj'.*weight-decay mask.*project='_proj'"):
      optim.galore_adamw(1e-2, rank=2, mask="_proj")

  def test_removed_arguments_raise(self):
    # The projection selector is `project`; `weight_decay_mask` is `mask`.
    with self.assertRaisesRegex(TypeError, "weight_decay_mask"):
      # pylint: disable-next=unexpected-keyword-arg
      optim.galore_adamw(1e-2, rank=2, weight_decay_mask=None)
    with self.assertRaisesRegex(TypeError, "mask"):
      # pylint: disable-next=unexpected-keyword-arg
      optim.scale_by_galore(optax.scale_by_adam(), rank=2, mask=r"w")


_FAMILY = {"galore": optim.galore_adamw, "q_galore": optim.q_galore_adamw,
           "fira": optim.fira_adamw, "frugal": optim.frugal_adamw}


class FamilyArgumentsTest(parameterized.TestCase):
  """Every GaLore-family alias takes `galore_adamw`'s shared arguments."""

  @parameterized.named_parameters(*_FAMILY.items())
  def test_takes_the_shared_arguments(self, factory):
    names = inspect.signature(factory).parameters
    self.assertEmpty(set(optim.galore.FAMILY_ARGS) - set(names))
    for name in optim.galore.FAMILY_ARGS:
      self.assertEqual(names[name].kind, inspect.Parameter.KEYWORD_ONLY)

  @parameterized.named_parameters(
      *_FAMILY.items(),
      ("owlore", lambda lr, **kw: optim.owlore_adamw(
          lr, num_layers=1, active_layers=1, refresh_every=2,
          probabilities="uniform", **kw)),
      ("lisa", lambda lr, rank, **kw: optim.lisa_adamw(
          lr, num_layers=1, active_layers=1, refresh_every=2, **kw)),
  )
  def test_adam_arguments_and_mask_act_as_in_optax_adamw(self, factory):
    # `b` is not projected (a bias), so each alias is AdamW on it.
    params = {"layers_0": jnp.ones((16, 8)), "b": jnp.full((8,), 2.0)}
    mask = {"layers_0": False, "b": True}
    kw = dict(b1=0.5, b2=0.75, eps=1e-2, weight_decay=0.1, mask=mask)
    ours = factory(1e-1, rank=2, **kw)
    want = optax.adamw(1e-1, **kw)
    s_ours, s_want = ours.init(params), want.init(params)
    p_ours = p_want = params
    for t in range(3):
      g = jax.tree.map(lambda x, t=t: jnp.sin(x + t), params)
      u, s_ours = ours.update(g, s_ours, p_ours)
      p_ours = optax.apply_updates(p_ours, u)
      u, s_want = want.update(g, s_want, p_want)
      p_want = optax.apply_updates(p_want, u)
    np.testing.assert_allclose(p_ours["b"], p_want["b"], rtol=1e-6)
    self.assertFalse(np.allclose(p_ours["b"], params["b"]))

  @parameterized.named_parameters(*_FAMILY.items())
  def test_update_gap_is_a_deprecated_alias_of_refresh_every(self, factory):
    params = {"w": jnp.ones((16, 8))}
    g = {"w": jnp.arange(128.0).reshape(16, 8) / 128}
    with self.assertWarnsRegex(DeprecationWarning,
                               r"update_gap=.*deprecated.*refresh_every="):
      old = factory(1e-2, rank=2, update_gap=3)
    new = factory(1e-2, rank=2, refresh_every=3)
    s_old, s_new = old.init(params), new.init(params)
    for _ in range(4):
      u_old, s_old = old.update(g, s_old, params)
      u_new, s_new = new.update(g, s_new, params)
      np.testing.assert_array_equal(u_old["w"], u_new["w"])

  @parameterized.named_parameters(*_FAMILY.items())
  def test_refresh_every_and_a_different_update_gap_raise(self, factory):
    with self.assertWarns(DeprecationWarning), self.assertRaisesRegex(
        TypeError, r"refresh_every=5 and its deprecated alias update_gap=3.*"
        r"pass only refresh_every"):
      factory(1e-2, rank=2, refresh_every=5, update_gap=3)

  @parameterized.named_parameters(
      ("scale_by_galore", lambda: optim.scale_by_galore(
          optax.scale_by_adam(), rank=2, update_gap=3), "update_gap"),
      ("layer_sampling_period", lambda: optim.scale_by_layer_sampling(
          optax.scale_by_adam(), num_layers=2, active_layers=1,
          refresh_every=3, period=3),
       "period"),
      ("owlore_update_gap", lambda: optim.owlore_adamw(
          1e-2, num_layers=2, active_layers=1, refresh_every=4, rank=2,
          update_gap=2), "update_gap"),
      ("owlore_weight_decay_mask", lambda: optim.owlore_adamw(
          1e-2, num_layers=2, active_layers=1, refresh_every=4,
          weight_decay_mask=None), "weight_decay_mask"),
  )
  def test_old_names_without_an_alias_raise(self, build, name):
    # pylint: disable=unexpected-keyword-arg
    with self.assertRaisesRegex(TypeError, name):
      build()


if __name__ == "__main__":
  absltest.main()
