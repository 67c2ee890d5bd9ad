"""Shared test helpers: toy models, tiny configs, problems, tree assertions.

One place for what many test files need, so that each writes it once:

* toy NNX models: `KindsToy` (every adaptable layer kind), `PermutingToy`
  (a permuting `Einsum` whose 2-D view is not the kernel's own), `Mlp` (a
  stack of square `Linear`s) and `Stacked` (blocks stacked by `nnx.vmap`
  along a logical `layers` axis);
* tiny model configs: `tiny_bert_config`, `tiny_llama_config`, and
  `tiny_llama_lm` (a causal LM of it, large init, optionally random norm
  scales) built on `one_device_mesh()`;
* LoRA training: `randomize_lora` (non-zero factors), `lora_step` (one
  jitted optimizer step on the adapters), `train_lora` (a loop of them)
  and `torch_linear_under_peft` (the torch side of a PEFT oracle test);
* shared data: `SHARED_DIR`, `BEIR_DIR` and `beir_dir` (a collection, or a
  skip when the shared checkout is absent);
* problems for optimizer tests: `matrix_params` / `matrix_loss` (a 2-D, a
  tall, a stacked 3-D and a 1-D leaf) and `quadratic_problem`;
* `SmokeAndResume`: an experiment binary's smoke run, interrupted and
  resumed, shared by the tests of its subclass (one per binary);
* `changed` (a config with keys set by path), `execute_notebook` (a
  notebook run top to bottom in a kernel of a given interpreter) and
  `toy_run` (queries, corpus and first-stage run of a rerank test);
* tree assertions built on `np.testing` (chex is not a dependency);
* the optax contract suite: `ContractCase` and `contract_test_class`, run
  once over every transformation lowrank exports by
  `tests/optim/contract_test.py` (as optax runs its contrib common test over its optimizers).

Helpers import it as `from tests import testing`.
"""

import atexit
import collections
from collections.abc import Callable, Mapping, Sequence
import dataclasses
import functools
import json
import math
import os
import pathlib
import re
import shutil
import tempfile
from typing import Any
import unittest
from unittest import mock

import zlib

from absl.testing import absltest
from absl.testing import parameterized
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank import adapters
from lowrank import optim
from lowrank import sharding
from lowrank import train

# ------------------------------------------------------------ toy models


def partitioned(axes: tuple[str, ...]) -> nnx.Initializer:
  """`lecun_normal` (the `nnx.Linear` default) with logical axis names."""
  return nnx.with_partitioning(nnx.initializers.lecun_normal(), axes)


def _init(axes: tuple[str, ...], logical: bool) -> nnx.Initializer:
  return partitioned(axes) if logical else nnx.initializers.lecun_normal()


class KindsToy(nnx.Module):
  """Every adaptable layer kind: `Linear`s, `LinearGeneral`, `Einsum`.

  Attributes (the paths tests target): `emb` (optional `Embed`, 50 tokens),
  `layers.0`, `layers.1` (`Linear` `d -> hidden -> d`), `norm` (optional
  `LayerNorm`), `gen` (`LinearGeneral` `d -> heads`) and `ein` (`Einsum`
  `"btd,dnh->btnh"`, rows on axis 0 like the others). The output is
  `gen(x) + ein(x)` after `act` on each `Linear`. With `logical=True` the
  kernels carry logical axes (build the model inside a mesh); values are
  the same either way.
  """

  def __init__(self, rngs: nnx.Rngs, d: int = 16, *,
               hidden: int | None = None,
               heads: tuple[int, int] = (4, 4),
               embed: bool = False,
               norm: bool = False,
               ein_bias: bool = False,
               logical: bool = True,
               act: Callable[[jax.Array], jax.Array] = jax.nn.gelu):
    h = hidden or d
    self.act = act
    if embed:
      self.emb = nnx.Embed(
          50, d, embedding_init=_init(("vocab", "embed"), logical), rngs=rngs)
    # The second layer maps mlp -> embed when the widths differ.
    back = ("mlp", "embed") if h != d else ("embed", "mlp")
    self.layers = nnx.List([
        nnx.Linear(d, h, kernel_init=_init(("embed", "mlp"), logical),
                   rngs=rngs),
        nnx.Linear(h, d, kernel_init=_init(back, logical), rngs=rngs),
    ])
    self.gen = nnx.LinearGeneral(
        d, heads, kernel_init=_init(("embed", "heads", "kv"), logical),
        rngs=rngs)
    self.ein = nnx.Einsum(
        "btd,dnh->btnh", (d, *heads), heads if ein_bias else None,
        kernel_init=_init(("embed", "heads", "kv"), logical), rngs=rngs)
    if norm:
      self.norm = nnx.LayerNorm(d, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    if hasattr(self, "emb"):
      x = self.emb(x)
    for layer in self.layers:
      x = self.act(layer(x))
    if hasattr(self, "norm"):
      x = self.norm(x)
    return self.gen(x) + self.ein(x)


class PermutingToy(nnx.Module):
  """`lin` (`Linear`), `gen` (`LinearGeneral`) and a permuting `ein`.

  `ein` is `"btd,dnh->bnth"` with a `(2, 3)` bias, so its output axes are
  not in the kernel's order. The output is `[..., 6]`: `gen` plus `ein`
  (transposed back) of `tanh(lin(x))`. `bias_init` applies to all three.
  """

  def __init__(self, rngs: nnx.Rngs, d: int = 12, *,
               logical: bool = True,
               bias_init: nnx.Initializer = nnx.initializers.zeros_init()):
    self.lin = nnx.Linear(d, d, kernel_init=_init(("embed", "mlp"), logical),
                          bias_init=bias_init, rngs=rngs)
    self.gen = nnx.LinearGeneral(
        d, (2, 3), kernel_init=_init(("embed", "heads", "kv"), logical),
        bias_init=bias_init, rngs=rngs)
    self.ein = nnx.Einsum(
        "btd,dnh->bnth", (d, 2, 3), bias_shape=(2, 3),
        kernel_init=_init(("embed", "heads", "kv"), logical),
        bias_init=bias_init, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = jnp.tanh(self.lin(x))
    g = self.gen(h).reshape(h.shape[:-1] + (6,))
    e = jnp.transpose(self.ein(h), (0, 2, 1, 3)).reshape(h.shape[:-1] + (6,))
    return g + e


class Mlp(nnx.Module):
  """`n` square `Linear` layers (`layers.i`), `act` after each."""

  def __init__(self, rngs: nnx.Rngs, d: int = 16, n: int = 2, *,
               act: Callable[[jax.Array], jax.Array] = jnp.tanh):
    self.act = act
    self.layers = nnx.List([nnx.Linear(d, d, rngs=rngs) for _ in range(n)])

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.layers:
      x = self.act(layer(x))
    return x


class Block(nnx.Module):
  """One `dense` `Linear` `d_in -> d_out` with `("embed", "mlp")` axes."""

  def __init__(self, rngs: nnx.Rngs, d_in: int = 16, d_out: int = 24):
    self.dense = nnx.Linear(d_in, d_out, kernel_init=partitioned(
        ("embed", "mlp")), rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.tanh(self.dense(x))


class Stacked(nnx.Module):
  """`num_layers` `Block`s stacked by `nnx.vmap` along a `layers` axis.

  `blocks.dense.kernel` is `[num_layers, d_in, d_out]` with logical axes
  `("layers", "embed", "mlp")`; build it under a mesh whose rules map
  `layers` (e.g. `LOGICAL_AXIS_RULES + (("layers", None),)`).
  """

  def __init__(self, rngs: nnx.Rngs, num_layers: int = 3, d: int = 16,
               d_out: int = 24):

    @nnx.split_rngs(splits=num_layers)
    @nnx.vmap(in_axes=(0,), out_axes=0,
              transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make(rngs):
      return Block(rngs, d, d_out)

    self.blocks = make(rngs)


# ---------------------------------------------------------- tiny configs


def tiny_bert_config(**overrides: Any):
  """A 2-layer, width-32 BERT (4 heads, MLP 64, the BERT vocabulary)."""
  from lowrank.models import bert  # pylint: disable=g-import-not-at-top
  kwargs = dict(vocab_size=30522, hidden_size=32, num_hidden_layers=2,
                num_attention_heads=4, intermediate_size=64)
  return bert.BertConfig(**(kwargs | overrides))


def tiny_llama_config(**overrides: Any):
  """`LlamaConfig.tiny` (2 layers, width 64, GQA 4 query / 2 KV heads)."""
  from lowrank.models import llama  # pylint: disable=g-import-not-at-top
  return llama.LlamaConfig.tiny(**overrides)


def changed(config: Any, **changes: Any) -> Any:
  """`config` (a `ConfigDict`, changed in place) with keys set by path.

  A key is a path of fields joined by `__` (`train__num_steps=2`) or by
  dots (`**{"train.num_steps": 2}`); fields the config lacks are added.
  """
  with config.unlocked():
    for key, value in changes.items():
      *parents, leaf = key.replace("__", ".").split(".")
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def execute_notebook(test: unittest.TestCase, nb: Any, python: str,
                     env: Mapping[str, str]) -> None:
  """Runs notebook `nb` (nbformat, in place) in a kernel of `python`.

  The kernelspec (interpreter `python`, environment `env`) goes to a
  temporary JUPYTER_PATH, so no global Jupyter install is needed; the
  notebook's working directory is a fresh temporary one. Raises nbclient's
  CellExecutionError on a failing cell, and fails `test` when a code cell
  did not run or holds an error output.
  """
  import nbclient  # pylint: disable=g-import-not-at-top
  jupyter_dir = test.create_tempdir("jupyter").full_path
  kernel = "lowrank-test-kernel"
  os.makedirs(os.path.join(jupyter_dir, "kernels", kernel))
  with open(os.path.join(jupyter_dir, "kernels", kernel, "kernel.json"),
            "w") as f:
    json.dump({"argv": [python, "-m", "ipykernel_launcher", "-f",
                        "{connection_file}"],
               "display_name": "lowrank test kernel", "language": "python",
               "env": dict(env)}, f)
  old = os.environ.get("JUPYTER_PATH")
  os.environ["JUPYTER_PATH"] = jupyter_dir
  try:
    nbclient.NotebookClient(
        nb, kernel_name=kernel, timeout=600,
        resources={"metadata": {"path": test.create_tempdir(
            "run").full_path}}).execute()
  finally:
    if old is None:
      os.environ.pop("JUPYTER_PATH", None)
    else:
      os.environ["JUPYTER_PATH"] = old
  code = [c for c in nb.cells if c.cell_type == "code"]
  test.assertNotIn(None, [c.execution_count for c in code])
  test.assertEqual([o for c in code for o in c.outputs
                    if o.output_type == "error"], [])


def toy_run(queries: Sequence[str], doc_lists: Sequence[Sequence[str]],
            top_score: float, *, empty: tuple[str, str]
            ) -> tuple[dict[str, str], dict[str, str], dict[str, Any]]:
  """`(queries, corpus, run)` dicts of a rerank test, from lists.

  Query `i` is `q{i}`, its documents `d{i}-{j}` scored `top_score - j` in
  the run; `empty = (qid, text)` adds a query that retrieved nothing.
  """
  corpus = {f"d{i}-{j}": d for i, docs in enumerate(doc_lists)
            for j, d in enumerate(docs)}
  qs = {f"q{i}": q for i, q in enumerate(queries)}
  run = {f"q{i}": {f"d{i}-{j}": top_score - j for j in range(len(docs))}
         for i, docs in enumerate(doc_lists)}
  qs[empty[0]], run[empty[0]] = empty[1], {}
  return qs, corpus, run


# ---------------------------------------- experiment binaries end to end

# Outputs a binary writes after its last step (removed to fake a kill).
_OUTPUTS = re.compile(r"results\.|reranked_|fused_|.*\.png$")
# Result keys that legitimately differ between a straight and a resumed run.
_VOLATILE = re.compile(r"second|_s$|time|resumed|memory|bytes|dir|path")


def _leaves(tree: Any, prefix: str = "") -> dict[str, Any]:
  """Dotted key -> leaf of nested dicts and lists."""
  out = {}
  for key, value in (tree.items() if isinstance(tree, dict)
                     else enumerate(tree)):
    if isinstance(value, (dict, list)):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def resume_steps(results: Any) -> list[int]:
  """Every `resumed_from_step` in a binary's (nested) results."""
  return [v for k, v in _leaves(results).items()
          if k.endswith("resumed_from_step")]


def interrupt(workdir: str) -> list[int]:
  """Makes `workdir` look like a run killed after its next-to-last
  checkpoint: removes the last checkpoint of every phase and the final
  outputs. Returns the checkpoint steps kept."""
  kept = []
  for root, dirs, files in os.walk(workdir, topdown=True):
    if os.path.basename(root) == "checkpoints":
      steps = sorted(int(d) for d in dirs if d.isdigit())
      shutil.rmtree(os.path.join(root, str(steps[-1])))
      kept += steps[:-1]
      dirs.clear()
      continue
    for name in files:
      if _OUTPUTS.match(name):
        os.remove(os.path.join(root, name))
  return kept


def one_jit_train_step() -> Any:
  """A context manager: `train.fit` runs the one-jit step on CPU too.

  On CPU `train.make_train_step` splits the step into a gradient and an
  update jit (faster to run at real sizes), and `fit` compiles the fused
  program as well, for its memory report: three compiles of the backward
  pass and the update. A smoke run of a few steps is almost all compiling;
  with the fused step, its one compile serves the report and the steps
  (about half the compile time). tests/train_test.py checks that the two
  steps agree; binaries_test's KillTest runs a binary's default (split)
  step end to end.
  """
  make = train.make_train_step

  def fused(*args, split=None, **kwargs):
    return make(*args, split=False if split is None else split, **kwargs)
  return mock.patch.object(train, "make_train_step", fused)


def truncated_minilm(num_layers: int = 2) -> str:
  """all-MiniLM-L6-v2 cut to its first `num_layers` layers: an HF directory.

  The same tokenizer files, embeddings, pooler and checkpoint format, for a
  binary's `model.path`: a 6-layer model takes about 3x longer to compile.
  Written once per process (removed at exit); returns its path.
  """
  if num_layers in _TRUNCATED_MINILM:
    return _TRUNCATED_MINILM[num_layers]
  from lowrank import assets  # pylint: disable=g-import-not-at-top
  from safetensors import numpy as st  # pylint: disable=g-import-not-at-top
  src = assets.minilm_path()
  out = pathlib.Path(tempfile.mkdtemp(prefix=f"minilm_{num_layers}_layers_"))
  atexit.register(shutil.rmtree, out, ignore_errors=True)
  for f in src.iterdir():
    if f.is_file() and f.name not in ("config.json", "model.safetensors"):
      shutil.copy(f, out / f.name)
  config = json.loads((src / "config.json").read_text())
  config["num_hidden_layers"] = num_layers
  (out / "config.json").write_text(json.dumps(config))
  kept = tuple(f"encoder.layer.{i}." for i in range(num_layers))
  st.save_file({k: v for k, v in st.load_file(
      str(src / "model.safetensors")).items()
                if not k.startswith("encoder.layer.") or k.startswith(kept)},
               str(out / "model.safetensors"))
  _TRUNCATED_MINILM[num_layers] = str(out)
  return str(out)


_TRUNCATED_MINILM: dict[int, str] = {}


class SmokeAndResume(absltest.TestCase):
  """An experiment binary's smoke run, interrupted and resumed.

  A subclass names the binary (`module`, its `experiments` module, and
  `config_lib`, its config module) and may override `config()`. Its
  `setUpClass` runs `train_and_evaluate` once straight (`cls.full`, in
  `cls.straight`), copies the workdir, `interrupt`s the copy and runs it
  again (`cls.again`, in `cls.resumed`). The test here checks what every
  binary owes: `results.json` holds the results; the rerun resumes from a
  checkpoint and ends with the same numbers (all but times, memory and
  resume steps). The subclass adds its binary's own checks of the same
  runs; tests/experiments/binaries_test.py checks that every binary has
  one. Both runs train with the one-jit step (`one_jit_train_step`).
  """

  module: Any = None
  config_lib: Any = None

  @classmethod
  def config(cls) -> Any:
    """The config of both runs (default: the smoke preset)."""
    return cls.config_lib.get_config("smoke")

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    root = tempfile.mkdtemp(prefix=cls.module.__name__.split(".")[-1] + "_")
    cls.addClassCleanup(shutil.rmtree, root, ignore_errors=True)
    cls.straight = os.path.join(root, "straight")
    cls.resumed = os.path.join(root, "resumed")
    with one_jit_train_step():
      cls.full = cls.module.train_and_evaluate(cls.config(), cls.straight)
      shutil.copytree(cls.straight, cls.resumed)
      cls.kept = interrupt(cls.resumed)
      cls.again = cls.module.train_and_evaluate(cls.config(), cls.resumed)

  def assert_same_numbers(self, got: Any, expected: Any, what: str) -> None:
    """The numeric leaves agree (rel 1e-5), volatile keys aside."""
    def numbers(tree):
      return {k: v for k, v in _leaves(tree).items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)
              and not _VOLATILE.search(k)}
    got, expected = numbers(got), numbers(expected)
    self.assertEqual(sorted(got), sorted(expected))
    for key, value in expected.items():
      self.assertTrue(
          math.isclose(got[key], value, rel_tol=1e-5, abs_tol=1e-6)
          or (math.isnan(value) and math.isnan(got[key])),
          f"{key}: {what} {got[key]} != {value}")

  def test_results_saved_and_rerun_resumes_to_the_same_numbers(self):
    with open(os.path.join(self.straight, "results.json")) as f:
      self.assert_same_numbers(json.load(f), self.full, "results.json")
    self.assertEqual(set(resume_steps(self.full)), {0})
    self.assertNotEmpty(self.kept)
    self.assertGreater(max(resume_steps(self.again)), 0)
    self.assert_same_numbers(self.again, self.full, "resumed")


def one_device_mesh() -> jax.sharding.Mesh:
  """The default mesh on the first device only (no sharding at all)."""
  return sharding.make_mesh(devices=jax.devices()[:1])


def tiny_llama_lm(seed: int = 0, *, norm_seed: int | None = None,
                  **overrides: Any):
  """A `LlamaForCausalLM` of `tiny_llama_config` with a large init.

  `initializer_range` is 0.2 unless overridden, so that a mistake is not
  hidden by near-uniform logits; the model is built with `nnx.Rngs(seed)`
  on `one_device_mesh()`. With `norm_seed`, every norm scale (1 at init)
  is drawn from U[0.5, 1.5] with key `fold_in(key(norm_seed), crc32(path)
  % 997)` (the same in every process, unlike `hash`), so that a missed norm shows.
  """
  from lowrank.models import llama  # pylint: disable=g-import-not-at-top
  config = tiny_llama_config(**({"initializer_range": 0.2} | overrides))
  with sharding.use_mesh(one_device_mesh()):
    model = llama.LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
  if norm_seed is not None:
    for path, var in nnx.iter_graph(model):
      if isinstance(var, nnx.Param) and path[-1] == "scale":
        key = jax.random.fold_in(jax.random.key(norm_seed), zlib.crc32(repr(path).encode()) % 997)
        value = var.get_value()
        var.set_value(jax.random.uniform(key, value.shape, value.dtype, 0.5,
                                         1.5))
  return model


# ------------------------------------------------------- LoRA training


def randomize_lora(model: nnx.Module, scale: float = 0.1,
                   seed: int = 1) -> None:
  """Draws every adapter's `lora_a` and `lora_b` from `scale`·N(0, 1).

  Non-zero factors, so the adapters actually change the output. Factor `j`
  (0 for A, 1 for B) of the `i`-th adapter in `adapters.adapter_modules`
  order uses key `fold_in(key(seed), 2 i + j)`; each keeps its sharding.
  """
  for i, m in enumerate(adapters.adapter_modules(model).values()):
    for j, var in enumerate((m.lora_a, m.lora_b)):
      v = var.get_value()
      key = jax.random.fold_in(jax.random.key(seed), 2 * i + j)
      var.set_value(jax.device_put(
          jax.random.normal(key, v.shape, v.dtype) * scale, v.sharding))


def lora_step(
    loss_fn: Callable[[nnx.Module], jax.Array], *, with_grads: bool = False,
) -> Callable[[nnx.Module, nnx.Optimizer], Any]:
  """A jitted `step(model, opt) -> loss` on the `nnx.LoRAParam`s.

  One `value_and_grad` of `loss_fn(model)` with respect to the trainable
  adapter leaves, then `opt.update`; `opt` must be an `nnx.Optimizer` with
  `wrt=nnx.LoRAParam`. With `with_grads` the step returns `(loss, grads)`
  (a different program: its numbers may differ from the plain one's in
  the last bit).
  """

  @nnx.jit
  def step(model, opt):
    diff = nnx.DiffState(0, nnx.LoRAParam)
    loss, grads = nnx.value_and_grad(loss_fn, argnums=diff)(model)
    opt.update(model, grads)
    return (loss, grads) if with_grads else loss

  return step


def train_lora(model: nnx.Module, tx: optax.GradientTransformation,
               loss_fn: Callable[[nnx.Module], jax.Array],
               steps: int) -> list[float]:
  """`steps` jitted `tx` steps of `loss_fn` on the adapters; the losses.

  Each loss is the one before its step. Only `nnx.LoRAParam`s move.
  """
  opt = nnx.Optimizer(model, tx, wrt=nnx.LoRAParam)
  step = lora_step(loss_fn)
  return [float(step(model, opt)) for _ in range(steps)]


def torch_linear_under_peft(d_in: int = 10, d_out: int = 7):
  """`(torch, peft, net)` for a PEFT oracle test; skips without them.

  Keeps the Hub offline, seeds torch with 0, then builds `net`: a torch
  module whose one layer, `net.lin`, is `torch.nn.Linear(d_in, d_out)`.
  """
  os.environ.setdefault("HF_HUB_OFFLINE", "1")
  torch = pytest.importorskip("torch")
  peft = pytest.importorskip("peft")
  torch.manual_seed(0)
  net = torch.nn.Sequential(
      collections.OrderedDict(lin=torch.nn.Linear(d_in, d_out)))
  return torch, peft, net


# ----------------------------------------------------------- shared data

# The shared data checkout: $LOWRANK_SHARED_DIR, else `shared/` beside the
# repository (tests/ -> repository root -> its parent).
SHARED_DIR = pathlib.Path(os.environ.get(
    "LOWRANK_SHARED_DIR",
    pathlib.Path(__file__).resolve().parents[2] / "shared"))
BEIR_DIR = SHARED_DIR / "data" / "beir"


def beir_dir(test: unittest.TestCase, name: str = "") -> pathlib.Path:
  """`BEIR_DIR / name` (all collections without `name`), or skips `test`.

  The test is skipped, with the way to point at the data, when that folder
  is not there.
  """
  directory = BEIR_DIR / name
  if not directory.is_dir():
    test.skipTest(
        f"../shared/data not present ({directory} missing; set "
        "LOWRANK_SHARED_DIR to the folder holding data/beir)")
  return directory


# -------------------------------------------------------------- problems


def matrix_params(dtype: Any = jnp.float32) -> dict[str, jax.Array]:
  """`w` `[32, 16]`, `tall` `[12, 40]`, `stack` `[3, 24, 20]`, `b` `[16]`."""
  k1, k2 = jax.random.split(jax.random.key(0))
  return {
      "w": jax.random.normal(k1, (32, 16), dtype),
      "tall": jax.random.normal(k2, (12, 40), dtype),
      "stack": jnp.ones((3, 24, 20), dtype),
      "b": jnp.zeros((16,), dtype),
  }


def matrix_loss(params: Mapping[str, jax.Array]) -> jax.Array:
  """A smooth loss of `matrix_params` that every leaf moves (float32)."""
  x = jnp.linspace(-1.0, 1.0, 32 * 12).reshape(12, 32)
  y = jnp.tanh(x @ params["w"].astype(jnp.float32)) + params["b"][None, :]
  z = params["tall"].astype(jnp.float32) @ jnp.ones((40, 3))
  s = jnp.einsum("lmn,n->lm", params["stack"].astype(jnp.float32),
                 jnp.arange(20.0))
  return jnp.sum((y - 0.5) ** 2) + jnp.sum(z ** 2) + 0.01 * jnp.sum(s ** 2)


LAYERED_NUM_LAYERS = 4


def layered_params(dtype: Any = jnp.float32) -> dict[str, Any]:
  """A model of `LAYERED_NUM_LAYERS` layers, for layer-wise optimizers.

  `stack` holds the layers stacked (`w` `[L, 8, 8]`, `b` `[L, 8]`; select it
  with `r"\\['stack'\\]"`), `blocks_i` one unstacked `[8, 8]` layer each;
  `embed` and `head` belong to no layer.
  """
  n = LAYERED_NUM_LAYERS
  keys = jax.random.split(jax.random.key(0), 4 + n)
  w = jax.random.normal(keys[0], (n, 8, 8))
  params = {
      "embed": jax.random.normal(keys[2], (5, 8)),
      "stack": {"w": 0.3 * w, "b": jnp.zeros((n, 8))},
      "head": jax.random.normal(keys[3], (8, 3)),
  }
  for i in range(n):
    params[f"blocks_{i}"] = {"w": 0.3 * jax.random.normal(keys[4 + i], (8, 8))}
  return jax.tree.map(lambda x: x.astype(dtype), params)


def layered_loss(params: Mapping[str, Any]) -> jax.Array:
  """A regression through every layer of `layered_params` (float32)."""
  params = jax.tree.map(lambda x: x.astype(jnp.float32), params)
  x = jnp.linspace(-1.0, 1.0, 4 * 5).reshape(4, 5)
  h = jnp.tanh(x @ params["embed"])
  blocks = jnp.stack([params[f"blocks_{i}"]["w"]
                      for i in range(LAYERED_NUM_LAYERS)])
  s = jnp.tanh(jnp.einsum("bi,lij->lbj", h, params["stack"]["w"])
               + params["stack"]["b"][:, None, :])
  t = jnp.tanh(jnp.einsum("bi,lij->lbj", h, blocks))
  y = (h + jnp.sum(s, axis=0) + jnp.sum(t, axis=0)) @ params["head"]
  return jnp.mean((y - jnp.cos(x[:, :3] * 3.0)) ** 2)


@dataclasses.dataclass(frozen=True)
class Problem:
  """Parameters (by dtype) and a float32 scalar loss over them."""
  params: Callable[[Any], Any]
  loss: Callable[[Any], jax.Array]


MATRIX = Problem(matrix_params, matrix_loss)
LAYERED = Problem(layered_params, layered_loss)


def quadratic_problem(dim: int = 8, seed: int = 0) -> Problem:
  """`0.5 (w - w*)ᵀ H (w - w*)` with `H` positive definite (condition 10).

  Params: `{"w": [dim, dim], "b": [dim]}`; the minimum is 0 at `w*`.
  """
  k1, k2, k3 = jax.random.split(jax.random.key(seed), 3)
  q = jnp.linalg.qr(jax.random.normal(k1, (dim, dim)))[0]
  h = (q * jnp.linspace(1.0, 10.0, dim)[None, :]) @ q.T
  w_star = jax.random.normal(k2, (dim, dim))
  b_star = jax.random.normal(k3, (dim,))

  def params(dtype=jnp.float32):
    return {"w": jnp.zeros((dim, dim), dtype), "b": jnp.zeros((dim,), dtype)}

  def loss(p):
    dw = p["w"].astype(jnp.float32) - w_star
    db = p["b"].astype(jnp.float32) - b_star
    return 0.5 * jnp.sum(dw * (h @ dw)) + 0.5 * jnp.sum(db * (h @ db))

  return Problem(params, loss)


# ------------------------------------------------------- tree assertions


def abstract(tree: Any) -> Any:
  """`jax.ShapeDtypeStruct` leaves of `tree` (for `eval_shape`)."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _check_structure(a: Any, b: Any) -> None:
  sa, sb = jax.tree.structure(a), jax.tree.structure(b)
  if sa != sb:
    raise AssertionError(f"Tree structures differ:\n{sa}\n!=\n{sb}")


def assert_trees_all_close(a: Any, b: Any, *, rtol: float = 1e-6,
                           atol: float = 0.0) -> None:
  """Same structure and leaves close (compared in float32 or wider)."""
  _check_structure(a, b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != np.float64 and np.issubdtype(x.dtype, np.inexact):
      x, y = x.astype(np.float32), y.astype(np.float32)
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol,
                               err_msg=f"at {jax.tree_util.keystr(path)}")


def assert_trees_all_equal(a: Any, b: Any) -> None:
  """Same structure and identical leaves."""
  _check_structure(a, b)
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a),
                          jax.tree.leaves(b)):
    np.testing.assert_array_equal(x, y,
                                  err_msg=f"at {jax.tree_util.keystr(path)}")


def assert_tree_types_equal(a: Any, b: Any) -> None:
  """Same structure and, leaf by leaf, the same shape and dtype."""
  ta = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), a)
  tb = jax.tree.map(lambda x: (jnp.shape(x), jnp.result_type(x)), b)
  _check_structure(a, b)
  for (path, x), y in zip(
      jax.tree_util.tree_leaves_with_path(ta, is_leaf=_is_pair),
      jax.tree.leaves(tb, is_leaf=_is_pair)):
    if x != y:
      raise AssertionError(
          f"Leaf {jax.tree_util.keystr(path)}: shape/dtype {x} != {y}")


def _is_pair(x: Any) -> bool:
  return isinstance(x, tuple) and len(x) == 2 and isinstance(x[0], tuple)


def assert_trees_all_finite(tree: Any) -> None:
  """Every leaf is free of NaN and inf."""
  for path, x in jax.tree_util.tree_leaves_with_path(tree):
    if not bool(jnp.all(jnp.isfinite(x))):
      raise AssertionError(f"Non-finite values at {jax.tree_util.keystr(path)}")


# ------------------------------------------------------ contract suite


@dataclasses.dataclass(frozen=True)
class ContractCase:
  """One transformation under the contract.

  Attributes:
    name: The test-case name (`<public name>` or `<public name>_<variant>`).
    make: `() -> GradientTransformation`.
    covers: The exported factories this case exercises (their `__name__`).
    problem: What it trains.
    steps, shrink: `loss(after steps) < shrink * loss(start)` under jit.
    dtypes: Parameter dtypes the dtype check runs with (jitted).
    needs_params: A regex of the error `update` without params raises, or
      None when `update(grads, state)` must work.
    inject: `(factory, static_args, kwargs)` for `optax.inject_hyperparams`,
      or None (for a case that is not a learning-rate alias).
    tol: Eager-vs-jit tolerance (float32).
    empty_error: A regex of the ValueError an empty tree raises (a
      configuration that names leaves, e.g. `stacked_axes`, finds none),
      or None when empty trees must go through.
  """
  name: str
  make: Callable[[], optax.GradientTransformation]
  covers: tuple[str, ...]
  problem: Problem = MATRIX
  steps: int = 100
  shrink: float = 0.7
  dtypes: tuple[Any, ...] = (jnp.float32, jnp.bfloat16)
  needs_params: str | None = None
  inject: tuple[Callable[..., Any], Sequence[str], dict[str, Any]] | None = (
      None)
  tol: float = 1e-4
  empty_error: str | None = None


@functools.cache
def _jit_grad(problem: Problem):
  """One jitted gradient per problem, compiled once for all its cases."""
  return jax.jit(jax.grad(problem.loss))


def contract_test_class(cases: Sequence[ContractCase]) -> type:
  """A `parameterized.TestCase` running the contract over `cases`.

  Each test is one case (one transformation configuration); the first
  case covering a factory runs every check, later ones (variants of a
  configuration) the abstract-init and training checks:

  * `init` accepts abstract params and gives the state `init` gives;
  * two eager steps equal two jitted ones (float32); jitted updates keep
    the param dtype (each of the case's dtypes) and the state its
    structure, shapes and dtypes;
  * the loss falls under `jax.jit` and the step traces once;
  * `update` runs jitted with the state (`train.init_opt_state`) donated;
  * it works inside `optax.MultiSteps` and `optax.masked`, and (aliases)
    under `optax.inject_hyperparams`;
  * empty trees go through (or raise the case's `empty_error`), and so
    does a scalar leaf added to the problem;
  * `update` without params works or raises a clear ValueError.

  Args:
    cases: The cases; names must be unique.

  Returns:
    The test class; bind it to a module-level name so pytest collects it.
  """
  names = [c.name for c in cases]
  if len(set(names)) != len(names):
    raise ValueError(f"Contract case names must be unique; got {names}.")
  by_name = {c.name: c for c in cases}
  # The whole contract runs on the first case of each factory; the other
  # configurations of a factory (variants) run the checks that depend on
  # the configuration (abstract init, training under jit; each factory's
  # own tests compare its variants with references), not the wrappers'
  # composition again: compiling every check for every variant cost minutes
  # of the suite for no new coverage.
  full = []
  for c in cases:
    if any(n not in {x for f in full for x in by_name[f].covers}
           for n in c.covers):
      full.append(c.name)
  dtype_cases = [(f"{c.name}_{jnp.dtype(d).name}", c.name, d)
                 for c in cases if c.name in full for d in c.dtypes]
  injected = [c.name for c in cases if c.inject is not None
              and c.name in full]

  # One transformation per case, shared by its checks, and its update
  # jitted once: jitted plain, or with the state donated. The float32 step
  # that the eager, dtype and donation checks run is one program, compiled
  # once (each check used to compile its own copy).
  @functools.cache
  def tx_of(name):
    return by_name[name].make()

  @functools.cache
  def jit_update(name, donate=False):
    return jax.jit(tx_of(name).update, donate_argnums=1 if donate else ())

  def donated_steps(name, grads, params, steps=2):
    """`steps` donated float32 updates from `train.init_opt_state`."""
    tx, update = tx_of(name), jit_update(name, donate=True)
    state = train.init_opt_state(tx, params)
    for _ in range(steps):
      updates, state = update(grads, state, params)
    return updates, state

  class ContractTest(parameterized.TestCase):
    """The optax contract, one case per exported transformation config."""

    @parameterized.named_parameters((n, n) for n in names)
    def test_init_accepts_abstract_params(self, name):
      case = by_name[name]
      tx, params = tx_of(name), case.problem.params(jnp.float32)
      state = jax.eval_shape(tx.init, abstract(params))
      assert_tree_types_equal(state, tx.init(params))
      # Memory accounting reads the abstract state.
      self.assertEqual(optim.state_bytes(state),
                       optim.estimate_bytes(params, tx))

    @parameterized.named_parameters((n, n) for n in full)
    def test_jit_matches_eager(self, name):
      # In float32: eager runs op by op (a compile per op), the costliest
      # check of the suite, and a bfloat16 comparison at 2e-2 adds little
      # to the float32 one; dtypes are checked under jit below.
      case = by_name[name]
      tx, params = tx_of(name), case.problem.params(jnp.float32)
      grads = _jit_grad(case.problem)(params)
      state = eager_state = tx.init(params)
      for _ in range(2):  # The second step reads a nonzero state.
        eager, eager_state = tx.update(grads, eager_state, params)
      jitted, _ = donated_steps(name, grads, params)
      assert_trees_all_close(eager, jitted, rtol=case.tol, atol=case.tol)
      assert_tree_types_equal(state, eager_state)

    @parameterized.named_parameters(dtype_cases)
    def test_preserves_dtype(self, name, dtype):
      case = by_name[name]
      tx, params = tx_of(name), case.problem.params(dtype)
      grads = _jit_grad(case.problem)(params)
      state = tx.init(params)
      if jnp.dtype(dtype) == jnp.float32:  # The donated step, compiled once.
        jitted, jit_state = donated_steps(name, grads, params)
      else:
        jit_state, update = state, jit_update(name)
        for _ in range(2):
          jitted, jit_state = update(grads, jit_state, params)
      for u, p in zip(jax.tree.leaves(jitted), jax.tree.leaves(params)):
        self.assertEqual(u.dtype, p.dtype)
      assert_tree_types_equal(state, jit_state)
      assert_trees_all_finite(jitted)

    @parameterized.named_parameters((n, n) for n in names)
    def test_loss_decreases_and_traces_once(self, name):
      case = by_name[name]
      tx, grad = tx_of(name), _jit_grad(case.problem)
      traces = 0

      @jax.jit
      def step(params, state):
        nonlocal traces
        traces += 1
        updates, state = tx.update(grad(params), state, params)
        return optax.apply_updates(params, updates), state

      params = case.problem.params(jnp.float32)
      state = tx.init(params)
      loss = jax.jit(case.problem.loss)
      start = float(loss(params))
      for _ in range(case.steps):
        params, state = step(params, state)
      self.assertEqual(traces, 1)
      self.assertLess(float(loss(params)), case.shrink * start)

    @parameterized.named_parameters((n, n) for n in full)
    def test_update_with_donated_state(self, name):
      case = by_name[name]
      tx, params = tx_of(name), case.problem.params(jnp.float32)
      grads = _jit_grad(case.problem)(params)
      # `tx.init` may share one buffer between leaves (a zero-size leaf);
      # `train.init_opt_state` gives fresh buffers that can be donated.
      types = jax.tree.map(jax.typeof, tx.init(params))
      self.assertEqual(
          jax.tree.map(jax.typeof, train.init_opt_state(tx, params)), types)
      updates, state = donated_steps(name, grads, params)
      self.assertEqual(jax.tree.map(jax.typeof, state), types)
      assert_trees_all_finite(updates)

    @parameterized.named_parameters((n, n) for n in full)
    def test_composes_with_multi_steps_and_masked(self, name):
      case = by_name[name]
      params = case.problem.params(jnp.float32)
      grads = _jit_grad(case.problem)(params)
      first = jax.tree_util.tree_leaves_with_path(params)[0][0]
      mask = jax.tree_util.tree_map_with_path(lambda p, _: p != first, params)
      for label, tx in (
          ("multi_steps", optax.MultiSteps(case.make(), every_k_schedule=2)),
          ("masked", optax.masked(case.make(), mask))):
        with self.subTest(label):
          update = jax.jit(tx.update)
          state = tx.init(params)
          u1, state = update(grads, state, params)
          u2, state = update(grads, state, params)
          assert_trees_all_finite(u2)
          if label == "multi_steps":  # Accumulates, then steps.
            self.assertTrue(all(not np.any(x) for x in jax.tree.leaves(u1)))
            self.assertTrue(any(np.any(x) for x in jax.tree.leaves(u2)))
          else:  # The masked-out leaf passes through unchanged.
            np.testing.assert_array_equal(jax.tree.leaves(u1)[0],
                                          jax.tree.leaves(grads)[0])

    if injected:

      @parameterized.named_parameters((n, n) for n in injected)
      def test_inject_hyperparams(self, name):
        factory, static_args, kwargs = by_name[name].inject
        case = by_name[name]
        tx = optax.inject_hyperparams(factory, static_args=static_args)(
            **kwargs)
        params = case.problem.params(jnp.float32)
        grads = _jit_grad(case.problem)(params)
        state = tx.init(params)
        self.assertIn("learning_rate", state.hyperparams)
        update = jax.jit(tx.update)
        for _ in range(2):
          updates, state = update(grads, state, params)
        assert_trees_all_finite(updates)
        # The plain factory with the same arguments gives the same step.
        plain = factory(**kwargs)
        want, _ = jax.jit(plain.update)(grads, plain.init(params), params)
        got, _ = jax.jit(tx.update)(grads, tx.init(params), params)
        assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)

    @parameterized.named_parameters((n, n) for n in full)
    def test_empty_tree(self, name):
      case = by_name[name]
      tx, update = tx_of(name), jit_update(name)
      if case.empty_error is not None:
        with self.assertRaisesRegex(ValueError, case.empty_error):
          update({}, tx.init({}), {})
        return
      updates, state = update({}, tx.init({}), {})
      self.assertEqual(updates, {})
      assert_tree_types_equal(state, tx.init({}))

    @parameterized.named_parameters((n, n) for n in full)
    def test_scalar_leaf(self, name):
      case = by_name[name]
      tx, update = tx_of(name), jit_update(name)
      params = dict(case.problem.params(jnp.float32))
      grads = dict(_jit_grad(case.problem)(params))
      params["scalar"] = jnp.float32(1.5)
      grads["scalar"] = jnp.float32(0.5)
      state = tx.init(params)
      for _ in range(2):
        updates, state = update(grads, state, params)
      self.assertEqual(updates["scalar"].shape, ())
      self.assertEqual(updates["scalar"].dtype, jnp.float32)
      assert_trees_all_finite(updates)
      self.assertNotEqual(float(updates["scalar"]), 0.0)

    @parameterized.named_parameters((n, n) for n in full)
    def test_update_without_params(self, name):
      case = by_name[name]
      tx, params = tx_of(name), case.problem.params(jnp.float32)
      grads = _jit_grad(case.problem)(params)
      state = tx.init(params)
      if case.needs_params is None:
        updates, _ = jit_update(name)(grads, state)
        assert_tree_types_equal(updates, grads)
      else:
        with self.assertRaisesRegex(ValueError, case.needs_params):
          tx.update(grads, state)

  return ContractTest


def train_steps(tx, w0, grads_seq) -> list[np.ndarray]:
  """`w` (numpy) after each step of `tx` from `{"w": w0}` on `grads_seq`
  (each a `{"w": g}` tree)."""
  w = {"w": jnp.asarray(w0)}
  state = tx.init(w)
  ws = []
  for g in grads_seq:
    u, state = tx.update(g, state, w)
    w = optax.apply_updates(w, u)
    ws.append(np.asarray(w["w"]))
  return ws
