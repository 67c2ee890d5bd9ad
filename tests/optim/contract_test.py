"""The optax contract, run once over every transformation lowrank exports.

As optax runs its contrib common test over one list of optimizers, this
file lists one or more configurations (`ContractCase`) per exported
`GradientTransformation` factory and runs `testing.contract_test_class`
over all of them. `ExportsTest` fails when a public factory of a lowrank
subpackage is in no case: add a case here when you export a transform.
"""

import importlib
import inspect
import pkgutil

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np
import optax

import lowrank
from lowrank import optim
from lowrank import train
from lowrank.optim import adam8bit
from lowrank.optim import allora
from lowrank.optim import layer_sampling as ls
from lowrank.optim import sora
from lowrank.spectral import sst

from tests import testing

Case = testing.ContractCase
# `testing.matrix_params()["stack"]` is three stacked [24, 20] layers.
STACKED = r"\['stack'\]"
# Small 8-bit blocks and threshold, so the small test leaves exercise every
# path: "w" one block per row, "tall" 3 padded blocks of 14, "stack" 2 of
# 10, "b" (16 elements) float32.
SMALL_8BIT = dict(block_size=16, min_size=64)
NEEDS_PARAMS = "requires the current value of parameters"
# An empty tree has no leaf for `stacked_axes` to select.
NO_LEAF = "matches no leaf"

# ------------------------------------------------------------ problems

L = testing.LAYERED_NUM_LAYERS
LAYERS = testing.LAYERED


def _lora_params(dtype=jnp.float32):
  """A LoRA pair (3-D `lora_a`), a SoRA gate `lora_g` and a dense leaf."""
  k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
  return {
      "layer": {
          "lora_a": jax.random.normal(k1, (6, 2, 3)).astype(dtype),
          "lora_b": 0.5 * jax.random.normal(k2, (3, 5)).astype(dtype),
          "lora_g": jnp.abs(jax.random.normal(k3, (3,))).astype(dtype),
      },
      "dense": jax.random.normal(k4, (4, 5)).astype(dtype),
  }


def _lora_loss(params):
  p = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  a = p["layer"]["lora_a"].reshape(12, 3)
  delta = a @ (p["layer"]["lora_b"] * p["layer"]["lora_g"][:, None])
  return (jnp.mean((delta - 1.0) ** 2)
          + jnp.mean((p["dense"] - jnp.arange(5.0)[None, :]) ** 2))


LORA = testing.Problem(_lora_params, _lora_loss)
_SST_X = jax.random.normal(jax.random.key(11), (16, 12))


def _sst_params(dtype=jnp.float32):
  """One spectral layer `{"l": {sst_u, ...}}` (12 -> 8, rank 3) + a head."""
  ku, ks, kv, kh = jax.random.split(jax.random.key(0), 4)
  u = np.linalg.qr(np.asarray(jax.random.normal(ku, (12, 8))))[0]
  v = np.linalg.qr(np.asarray(jax.random.normal(kv, (8, 8))))[0]
  s = np.asarray(jax.random.uniform(ks, (8,), minval=0.5, maxval=2.0))
  cast = lambda a: jnp.asarray(a, dtype)
  return {"l": {"sst_u": cast(u[:, :3]), "sst_u_frozen": cast(u[:, 3:]),
                "sst_s": cast(s), "sst_v": cast(v[:, :3]),
                "sst_v_frozen": cast(v[:, 3:])},
          "head": cast(jax.random.normal(kh, (8, 1)))}


def _sst_loss(params):
  p = jax.tree.map(lambda x: x.astype(jnp.float32), params)["l"]
  u = jnp.concatenate([p["sst_u"], p["sst_u_frozen"]], axis=1)
  v = jnp.concatenate([p["sst_v"], p["sst_v_frozen"]], axis=1)
  h = jnp.tanh(_SST_X @ (u * p["sst_s"][None, :]) @ v.T)
  y = h @ params["head"].astype(jnp.float32)
  return jnp.mean((y - jnp.cos(_SST_X[:, :1])) ** 2)


SST = testing.Problem(_sst_params, _sst_loss)


def _static(fn, names=optim.STATIC_ARGS):
  """The names in `names` that `fn` takes (`optim.STATIC_ARGS` is
  `galore_adamw`'s; `fira_adamw` and `frugal_adamw` have no `cos_history`)."""
  return tuple(n for n in names if n in inspect.signature(fn).parameters)


def _lr(tx, lr):
  return lambda: optax.chain(tx(), optax.scale_by_learning_rate(lr))


# --------------------------------------------------------------- cases

_GALORE = dict(rank=4, refresh_every=3, stacked_axes=STACKED)
_LISA = dict(num_layers=L, active_layers=2, refresh_every=5, stacked=STACKED)

CASES = (
    # GaLore family, on the matrix problem.
    Case("galore_adamw", lambda: optim.galore_adamw(5e-2, **_GALORE),
         ("galore_adamw",), needs_params=NEEDS_PARAMS,
         inject=(optim.galore_adamw, optim.STATIC_ARGS,
                 dict(learning_rate=1e-2, **_GALORE)),
         empty_error=NO_LEAF),
    Case("galore_adamw_rsvd_rotate", lambda: optim.galore_adamw(
        5e-2, projector="rsvd", on_refresh="rotate", **_GALORE),
         ("galore_adamw",), needs_params=NEEDS_PARAMS,
         empty_error=NO_LEAF),
    Case("galore_adamw_torch_staggered", lambda: optim.galore_adamw(
        5e-2, rank=4, refresh_every=4, side="torch", stagger=2,
        stacked_axes=STACKED), ("galore_adamw",), needs_params=NEEDS_PARAMS,
         empty_error=NO_LEAF),
    # Layers of `stack` refresh one at a time (dynamic slices), with 8-bit
    # projectors updated in place.
    Case("galore_adamw_layer_staggered_8bit", lambda: optim.galore_adamw(
        5e-2, projector="rsvd", stagger=3, stagger_layers=True,
        projector_bits=8, projector_group_size=4, **_GALORE),
         ("galore_adamw",), needs_params=NEEDS_PARAMS,
         empty_error=NO_LEAF),
    # `stack` as one [72, 20] matrix (no stacked axes declared).
    Case("galore_adamw_unstacked_3d", lambda: optim.galore_adamw(
        5e-2, rank=4, refresh_every=3, input_axes={
            "w": None, "tall": None, "stack": (0, 1), "b": None,
            "scalar": None}),
         ("galore_adamw",), needs_params=NEEDS_PARAMS),
    Case("fira_adamw", lambda: optim.fira_adamw(5e-2, **_GALORE),
         ("fira_adamw",), needs_params=NEEDS_PARAMS,
         inject=(optim.fira_adamw, _static(optim.fira_adamw),
                 dict(learning_rate=1e-2, **_GALORE)),
         empty_error=NO_LEAF),
    Case("frugal_adamw", lambda: optim.frugal_adamw(5e-2, **_GALORE),
         ("frugal_adamw",), needs_params=NEEDS_PARAMS,
         inject=(optim.frugal_adamw, _static(optim.frugal_adamw),
                 dict(learning_rate=1e-2, **_GALORE)),
         empty_error=NO_LEAF),
    Case("q_galore_adamw", lambda: optim.q_galore_adamw(
        5e-2, cos_threshold=0.2, cos_history=2, **_GALORE),
         ("q_galore_adamw",), needs_params=NEEDS_PARAMS,
         inject=(optim.q_galore_adamw, _static(optim.q_galore_adamw),
                 dict(learning_rate=1e-2, **_GALORE)),
         empty_error=NO_LEAF),
    Case("scale_by_galore_adam8bit_inner", _lr(
        lambda: optim.scale_by_galore(adam8bit.scale_by_adam8bit(
            block_size=8, min_size=32), **_GALORE), 5e-2),
         ("scale_by_galore", "scale_by_adam8bit"),
         empty_error=NO_LEAF),
    Case("scale_by_galore_adam_per_matrix_inner", _lr(
        lambda: optim.scale_by_galore(optim.scale_by_adam_per_matrix(),
                                      on_refresh="reset", **_GALORE), 5e-2),
         ("scale_by_galore", "scale_by_adam_per_matrix"),
         empty_error=NO_LEAF),
    Case("scale_by_adam_per_matrix",
         _lr(optim.scale_by_adam_per_matrix, 5e-2),
         ("scale_by_adam_per_matrix",)),
    # The config-driven factory (here a GaLore section with a schedule).
    Case("optimizer_from_config", lambda: train.optimizer_from_config(dict(
        name="galore_adamw", learning_rate=dict(
            schedule="warmup_cosine_decay_schedule", init_value=1e-3,
            peak_value=5e-2, warmup_steps=5, decay_steps=200), **_GALORE)),
         ("optimizer_from_config",), needs_params=NEEDS_PARAMS,
         empty_error=NO_LEAF,
         # The problem's gradients have rank 1-2 < rank 4: the other
         # projected directions are rounding noise that Adam scales to full
         # steps, so the trajectory depends on the compiler's rounding
         # (0.46 of the start after 100 steps at XLA's default level, 0.71
         # at the suite's -O0).
         shrink=0.85),
    # 8-bit Adam.
    Case("adamw8bit", lambda: adam8bit.adamw8bit(5e-2, **SMALL_8BIT),
         ("adamw8bit",), needs_params=NEEDS_PARAMS,
         inject=(adam8bit.adamw8bit, adam8bit.STATIC_ARGS,
                 dict(learning_rate=1e-2, b1=0.8, **SMALL_8BIT))),
    Case("adamw8bit_linear_sr_nesterov", lambda: adam8bit.adamw8bit(
        5e-2, scheme="linear", stochastic_rounding=True, nesterov=True,
        **SMALL_8BIT), ("adamw8bit",), needs_params=NEEDS_PARAMS),
    Case("scale_by_adam8bit",
         _lr(lambda: adam8bit.scale_by_adam8bit(**SMALL_8BIT), 5e-2),
         ("scale_by_adam8bit",)),
    # Layer sampling, on the layered problem.
    Case("lisa_adamw", lambda: ls.lisa_adamw(3e-2, **_LISA), ("lisa_adamw",),
         problem=LAYERS, steps=60, shrink=0.5, needs_params=NEEDS_PARAMS,
         inject=(ls.lisa_adamw, ls.LISA_STATIC_ARGS,
                 dict(learning_rate=1e-2, **_LISA))),
    Case("owlore_adamw", lambda: ls.owlore_adamw(
        3e-2, owlore_alpha=3.0, weight_decay=1e-3, **_LISA),
         ("owlore_adamw",), problem=LAYERS, steps=60, shrink=0.5,
         needs_params="needs `params`",
         inject=(ls.owlore_adamw, ls.OWLORE_STATIC_ARGS,
                 dict(learning_rate=1e-2, owlore_alpha=3.0, **_LISA))),
    Case("owlore_adamw_galore", lambda: ls.owlore_adamw(
        3e-2, num_layers=L, active_layers=3, refresh_every=4,
        stacked=STACKED, rank=2, galore_refresh_every=2),
         ("owlore_adamw",), problem=LAYERS, steps=60, shrink=0.5,
         needs_params="needs `params`",
         empty_error=NO_LEAF),
    Case("scale_by_layer_sampling_fixed_probs", _lr(
        lambda: ls.scale_by_layer_sampling(
            optax.scale_by_adam(), num_layers=L, active_layers=2,
            refresh_every=3, stacked=STACKED,
            probabilities=np.arange(1.0, L + 1.0)), 3e-2),
         ("scale_by_layer_sampling",), problem=LAYERS, steps=60,
         shrink=0.5),
    Case("scale_by_layer_sampling_per_slice_inner", _lr(
        lambda: ls.scale_by_layer_sampling(
            ls.scale_by_adam_per_slice(), num_layers=L, active_layers=2,
            refresh_every=3, stacked=STACKED), 3e-2),
         ("scale_by_layer_sampling", "scale_by_adam_per_slice"),
         problem=LAYERS, steps=60, shrink=0.5),
    Case("scale_by_adam_per_slice", _lr(ls.scale_by_adam_per_slice, 3e-2),
         ("scale_by_adam_per_slice",), problem=LAYERS, steps=60, shrink=0.5),
    # Adapter transforms, on a LoRA + SoRA-gate problem.
    Case("allora_adamw", lambda: allora.allora_adamw(3e-2, eta=2.0),
         ("allora_adamw",), problem=LORA, steps=60, tol=1e-5,
         needs_params="needs the parameters",
         inject=(allora.allora_adamw, allora.STATIC_ARGS,
                 dict(learning_rate=1e-2, eta=2.0))),
    Case("scale_by_allora", lambda: optax.chain(
        optax.scale_by_adam(), allora.scale_by_allora(2.0),
        optax.scale_by_learning_rate(3e-2)),
         ("scale_by_allora",), problem=LORA, steps=60, tol=1e-5,
         needs_params="needs the parameters"),
    Case("sora_adamw", lambda: sora.sora_adamw(3e-2, lam=1e-2),
         ("sora_adamw",), problem=LORA, steps=60, tol=1e-5,
         needs_params=NEEDS_PARAMS,
         inject=(sora.sora_adamw, sora.STATIC_ARGS,
                 dict(learning_rate=1e-2, lam=1e-2))),
    Case("sora_proximal", lambda: optax.chain(
        optax.sgd(3e-2), sora.sora_proximal(1e-2, 3e-2)),
         ("sora_proximal",), problem=LORA, steps=60, tol=1e-5,
         needs_params="sora_proximal needs the parameters"),
    # Sparse Spectral Training, on one spectral layer and a dense head.
    Case("sst_adamw", lambda: sst.sst_adamw(3e-2, refresh_every=4),
         ("sst_adamw",), problem=SST, steps=60, tol=1e-5,
         needs_params="needs params"),
    Case("sst_optimizer", lambda: sst.sst_optimizer(
        optax.scale_by_adam(), 3e-2, refresh_every=2, block_reset="all"),
         ("sst_optimizer",), problem=SST, steps=60, tol=1e-5,
         needs_params="needs params"),
)

ContractTest = testing.contract_test_class(CASES)


def _exported_transforms():
  """`{name: factory}` of every public `GradientTransformation` factory.

  Read from each lowrank subpackage's public names (aliases of one factory
  count once, under the factory's own name); a factory is a function whose
  return annotation is an optax `GradientTransformation`.
  """
  found = {}
  modules = [lowrank] + [
      importlib.import_module(f"lowrank.{m.name}")
      for m in pkgutil.iter_modules(lowrank.__path__)
      if not m.name.startswith("_")]
  for module in modules:
    for name in getattr(module, "__all__", dir(module)):
      fn = getattr(module, name, None)
      if name.startswith("_") or not inspect.isfunction(fn):
        continue
      ret = inspect.signature(fn).return_annotation
      if (isinstance(ret, type)
          and issubclass(ret, optax.GradientTransformation)) or (
              isinstance(ret, str) and "GradientTransformation" in ret):
        found[fn.__name__] = fn
  return found


class ExportsTest(absltest.TestCase):

  def test_every_exported_transform_has_a_case(self):
    exported = _exported_transforms()
    covered = {n for c in CASES for n in c.covers}
    missing = sorted(set(exported) - covered)
    self.assertEqual(
        missing, [],
        f"Exported transforms with no contract case: {missing}. Add a "
        "ContractCase for each to CASES in tests/optim/contract_test.py.")

  def test_every_covered_name_is_exported(self):
    stale = sorted({n for c in CASES for n in c.covers}
                   - set(_exported_transforms()))
    self.assertEqual(
        stale, [], f"Contract cases name transforms lowrank does not export: "
        f"{stale}. Rename or drop them in tests/optim/contract_test.py.")

  def test_every_exported_transform_has_its_own_case(self):
    # A case named after each factory, so its own configuration (not only
    # its use as another's inner) runs the contract.
    own = {n for n in _exported_transforms()
           if any(c.name == n or c.name.startswith(n + "_") for c in CASES)}
    self.assertEqual(sorted(set(_exported_transforms()) - own), [])

if __name__ == "__main__":
  absltest.main()
