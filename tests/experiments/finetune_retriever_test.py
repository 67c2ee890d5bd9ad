"""End-to-end tests of experiments/finetune_retriever.py on the smoke preset.

`SmokeTest` runs the default smoke run (bi-encoder + LoRA on code search),
interrupted and resumed; `ModelsTest` runs each model once, 2-3 steps on a
tiny BEIR directory on one device, with several options combined per run.
The MiniLM runs load all-MiniLM-L6-v2 cut to its first 2 layers
(`testing.truncated_minilm`, through `model.path`: the binary's loading,
tokenizer and checkpoint format, a third of the compile time); SPLADE runs
SPLADE-tiny.
"""

import json
import os
import pathlib

from absl.testing import absltest
import jax.numpy as jnp

from experiments import finetune_retriever
from experiments.configs import finetune_retriever as config_lib
from lowrank import metric_writers
from lowrank.retrieval import evaluate
from tests import testing

_SHARED = pathlib.Path(os.environ.get(
    "LOWRANK_SHARED_DIR", pathlib.Path(__file__).resolve().parents[3] /
    "shared"))
_METALS = ("iron", "copper", "zinc", "silver", "gold", "tin", "lead",
           "nickel")
_USES = ("wires", "coins", "pipes", "roofs", "batteries", "jewelry")
# LoRA (rank 8) on 2 layers' query, key, value and dense kernels (55,296
# each) and the pooler's (6,144).
_LORA_PARAMS = 2 * 55_296 + 6_144


def _write_tiny_beir(directory: pathlib.Path) -> str:
  """A BEIR-format directory: 48 documents, 24 train and 12 test queries."""
  (directory / "qrels").mkdir(parents=True)
  docs, queries, qrels = [], [], {"train": [], "test": []}
  for i in range(48):
    metal, use = _METALS[i % 8], _USES[i % 6]
    docs.append({"_id": f"d{i}", "title": f"{metal} note {i}",
                 "text": f"Workshop {i} melts {metal} to make {use} for "
                         f"customers in town {i // 8}."})
    if i < 36:
      queries.append({"_id": f"q{i}",
                      "text": f"which workshop makes {use} from {metal} "
                              f"in town {i // 8}"})
      qrels["train" if i < 24 else "test"].append(f"q{i}\td{i}\t1\n")
  for name, rows in (("corpus", docs), ("queries", queries)):
    with open(directory / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  for split, rows in qrels.items():
    (directory / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(rows))
  return f"beir:{directory}"


def _config(preset="smoke", **changes):
  """The preset with dotted keys (`"model.name"`) changed."""
  return testing.changed(config_lib.get_config(preset), **changes)


def _read(workdir, name):
  with open(os.path.join(workdir, name), "rb") as f:
    return f.read()


class ConfigTest(absltest.TestCase):

  def test_presets(self):
    self.assertEqual(config_lib.get_config().adapter.method, "lora")
    self.assertEqual(config_lib.get_config("smoke").train.num_steps, 4)
    galore = config_lib.get_config("smoke,galore")
    self.assertEqual((galore.adapter.method, galore.optimizer.name),
                     ("full", "galore_adamw"))
    self.assertEqual(galore.optimizer.learning_rate.decay_steps, 4)
    with self.assertRaisesRegex(ValueError, "Unknown preset 'large'"):
      config_lib.get_config("large")

  def test_decay_follows_num_steps_until_set(self):
    config = _config(**{"train.num_steps": 40})
    self.assertEqual(config.optimizer.learning_rate.decay_steps, 40)
    config.optimizer.learning_rate.decay_steps = 100
    self.assertEqual(config.train.num_steps, 40)

  def test_bad_model_options(self):
    for pattern, changes in (
        ("model.name must be one of", {"model.name": "dpr"}),
        (r"\['model.symmetric'\] apply to the bi-encoder",
         {"model.name": "colbert", "model.symmetric": True}),
        (r"\['eval.dims'\] apply to the bi-encoder",
         {"model.name": "splade", "eval.dims": (64,)}),
        (r"\['model.same_side', 'model.towers'\] apply",
         {"model.name": "colbert", "model.towers": "separate",
          "model.same_side": True}),
        ("weights one per dim", {"model.name": "matryoshka",
                                 "model.matryoshka.dims": (384, 64, 16),
                                 "model.matryoshka.weights": (1.0, 0.5)}),
        ("at least one prefix", {"model.name": "matryoshka",
                                 "model.matryoshka.dims": ()}),
        ("eval.dims must hold positive ints", {"eval.dims": (64, 0)}),
        ("model.splade.regularizer must be one of",
         {"model.name": "splade", "model.splade.regularizer": "l2"}),
        ("model.splade.lambda_d must be", {"model.name": "splade",
                                           "model.splade.lambda_d": -1.0}),
        ("num_simhash_projections", {
            "model.name": "colbert",
            "eval.muvera.num_simhash_projections": 40}),
        ("model.towers must be one of", {"model.towers": "two"}),
        (r"model.scale \(200.0\) must be <= config.model.max_scale",
         {"model.learn_scale": True, "model.scale": 200.0}),
        ("optimizer 'galore_adamw' takes no argument 'rnk'",
         {"optimizer.name": "galore_adamw", "optimizer.rnk": 8}),
    ):
      with self.subTest(pattern), self.assertRaisesRegex(ValueError, pattern):
        finetune_retriever.validate_config(_config(**changes))

  def test_galore_with_nothing_to_project_is_an_error(self):
    config = _config("smoke,galore", **{"adapter.method": "lora"})
    factors = {"['encoder']": {"lora_a": jnp.zeros((384, 8)),
                               "lora_b": jnp.zeros((8, 384))}}
    with self.assertRaisesRegex(ValueError, "would project no parameter"):
      finetune_retriever.check_optimizer(config, factors)
    config.optimizer.rank = 4  # Now the rank-8 factors qualify.
    finetune_retriever.check_optimizer(config, factors)
    finetune_retriever.check_optimizer(_config(), factors)  # AdamW.

  def test_load_data(self):
    with self.assertRaisesRegex(ValueError, "Unknown data spec"):
      finetune_retriever.load_data(_config(**{"data.spec": "imagenet"}))
    scifact = _SHARED / "data" / "beir" / "scifact"
    if not scifact.exists():
      self.skipTest(f"{scifact} not present (needs ../shared/data).")
    pairs, test = finetune_retriever.load_data(_config(**{
        "data.spec": f"beir:{scifact}", "data.eval_max_queries": 10,
        "data.eval_max_docs": 600}))
    self.assertLen(pairs, 919)
    self.assertLen(test.qrels, 10)
    self.assertLen(test.corpus, 600)  # Judged docs + others (all: 5,183).


class SmokeTest(testing.SmokeAndResume):
  """The default smoke run (bi-encoder + LoRA on code search, data-parallel
  over the eight test devices), interrupted and resumed."""

  module = finetune_retriever
  config_lib = config_lib

  @classmethod
  def config(cls):
    return _config(**{"model.path": testing.truncated_minilm(2)})


class ModelsTest(absltest.TestCase):
  """Each model (and optimizer family) once, on a tiny BEIR directory."""

  def _run(self, preset="smoke", **changes):
    data = _write_tiny_beir(pathlib.Path(self.create_tempdir().full_path))
    # One device: SmokeTest runs the binary data-parallel on all eight;
    # here the optimizer update would run replicated eight times.
    config = _config(preset, **{"data.spec": data, "train.num_steps": 2,
                        "train.log_every": 1,
                        "train.checkpoint_every": 100, "mesh.data": 1,
                        **changes})
    if config.model.name != "splade":
      config.model.path = testing.truncated_minilm(2)
    workdir = self.create_tempdir().full_path
    with testing.one_jit_train_step():
      out = finetune_retriever.train_and_evaluate(config, workdir)
    return out, workdir

  def test_matryoshka_separate_towers_learned_scale(self):
    out, workdir = self._run(**{
        "model.name": "matryoshka", "model.matryoshka.dims": (384, 64, 16),
        "model.towers": "separate", "model.learn_scale": True,
        "model.same_side": True, "model.symmetric": True,
        "optimizer.learning_rate.peak_value": 0.05,  # Moves the scale.
        "train.num_steps": 3})  # Step 1 has lr 0 (warm-up).
    for metrics in (out["zero_shot"], out["final"]):
      self.assertEqual(list(evaluate.prefix_curve(metrics)), [16, 64, 384])
      self.assertEqual(metrics["ndcg_cut_10@384"], metrics["ndcg_cut_10"])
    # A 16-d prefix of untrained MiniLM is much worse than all 384 dims.
    z = out["zero_shot"]
    self.assertLess(z["ndcg_cut_10@16"], z["ndcg_cut_10@384"] - 0.1)
    # Both towers carry LoRA, plus the one-number scale.
    self.assertEqual(out["trainable_params"], 2 * _LORA_PARAMS + 1)
    scales = [r["logit_scale"] for r in metric_writers.read_csv(
        os.path.join(workdir, "metrics.csv")) if "logit_scale" in r]
    self.assertAlmostEqual(scales[0], 20.0, delta=2.0)
    self.assertNotAlmostEqual(scales[-1], scales[0], places=3)
    self.assertEqual(_read(workdir, "prefix_curve.png")[:4], b"\x89PNG")
    table = _read(workdir, "results.md").decode()
    self.assertIn("| matryoshka lora (3 steps) |", table)
    self.assertIn("| *@16 | ", table)

  def test_full_fine_tuning(self):
    # GaLore's full-weight run: tests/experiments/demo_test.py.
    out, _ = self._run(**{"adapter.method": "full",
                          "optimizer.learning_rate.peak_value": 2e-5})
    self.assertEqual(out["trainable_params"], out["total_params"])
    self.assertBetween(out["optimizer_state_bytes"] - 8 * out["total_params"],
                       0, 64)  # AdamW's two float32 moments and counters.

  def test_colbert_exact_and_muvera(self):
    # Reranking every document makes MUVERA's result the exact one.
    out, workdir = self._run(**{
        "model.name": "colbert", "eval.muvera.num_repetitions": 2,
        "eval.muvera.num_simhash_projections": 3, "eval.muvera.rerank": 48})
    # LoRA as the bi-encoder's, plus the fresh 384 x 128 projection.
    self.assertEqual(out["trainable_params"], _LORA_PARAMS + 384 * 128)
    for metrics in (out["zero_shot"], out["final"]):
      for name in evaluate.METRICS:
        self.assertBetween(metrics[name], 0.0, 1.0)
        self.assertAlmostEqual(metrics["muvera_" + name], metrics[name],
                               places=6)
        self.assertIn("fde_" + name, metrics)
    for info in (out["zero_shot_info"], out["final_info"]):
      self.assertEqual(info["muvera_rerank"], 48)
      self.assertEqual(info["fde_dim"], 2 * 2**3 * 16)
    self.assertNotEqual(out["final"], out["zero_shot"])
    self.assertIn(b"| muvera_* | ", _read(workdir, "results.md"))

  def test_splade_dora_adamw8bit_regulariser_warmup(self):
    out, workdir = self._run(**{
        "model.name": "splade", "adapter.method": "dora",
        "optimizer.name": "adamw8bit", "model.splade.lambda_q": 0.2,
        "model.splade.lambda_d": 0.1, "model.splade.reg_warmup_steps": 2})
    self.assertBetween(out["trainable_params"], 1, out["total_params"] // 20)
    rows = {r["step"]: r for r in metric_writers.read_csv(
        os.path.join(workdir, "metrics.csv"))}
    # Quadratic warm-up: lambda * (step / 2)^2.
    self.assertAlmostEqual(rows[1]["lambda_q"], 0.2 / 4, places=6)
    self.assertAlmostEqual(rows[2]["lambda_d"], 0.1, places=6)
    for r in rows.values():
      self.assertAlmostEqual(
          r["loss"], r["rank_loss"] + r["lambda_q"] * r["q_reg"]
          + r["lambda_d"] * r["d_reg"], places=4)
    for info in (out["zero_shot_info"], out["final_info"]):
      self.assertBetween(info["avg_query_terms"], 1.0, 500.0)
      self.assertBetween(info["avg_doc_terms"], 1.0, 2000.0)
    self.assertEqual(out["resumed_from_step"], 0)
    self.assertEqual(json.loads(_read(workdir, "results.json"))["final"],
                     out["final"])
    table = _read(workdir, "results.md").decode()
    self.assertIn("| splade dora + adamw8bit (2 steps) |", table)
    self.assertIn("| avg_doc_terms | ", table)


if __name__ == "__main__":
  absltest.main()
