"""End-to-end tests of experiments/finetune_retriever.py on the smoke preset."""

import json
import os
import pathlib

from absl.testing import absltest
import jax
import jax.numpy as jnp
import numpy as np

from experiments import finetune_retriever
from experiments import retrieval_models
from experiments.configs import finetune_retriever as config_lib
from lowrank import adapters
from lowrank import metric_writers
from lowrank import sharding as sharding_lib
from lowrank.retrieval import biencoder

_SHARED = pathlib.Path(
    os.environ.get(
        "LOWRANK_SHARED_DIR",
        pathlib.Path(__file__).resolve().parents[3] / "shared",
    )
)


_METALS = ("iron", "copper", "zinc", "silver", "gold", "tin", "lead",
           "nickel")
_USES = ("wires", "coins", "pipes", "roofs", "batteries", "jewelry")


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
      split = "train" if i < 24 else "test"
      queries.append({"_id": f"q{i}",
                      "text": f"which workshop makes {use} from {metal} "
                              f"in town {i // 8}"})
      qrels[split].append(f"q{i}\td{i}\t1\n")
  for name, rows in (("corpus", docs), ("queries", queries)):
    with open(directory / f"{name}.jsonl", "w") as f:
      f.writelines(json.dumps(r) + "\n" for r in rows)
  for split, rows in qrels.items():
    (directory / "qrels" / f"{split}.tsv").write_text(
        "query-id\tcorpus-id\tscore\n" + "".join(rows))
  return f"beir:{directory}"


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f)}


class ConfigTest(absltest.TestCase):

  def test_presets_load(self):
    self.assertEqual(config_lib.get_config().method, "lora")
    self.assertEqual(config_lib.get_config("smoke").num_train_steps, 4)
    with self.assertRaisesRegex(ValueError, "Unknown preset"):
      config_lib.get_config("large")

  def test_bad_data_spec(self):
    with self.assertRaisesRegex(ValueError, "Unknown data spec"):
      finetune_retriever.load_data("imagenet")

  def test_eval_max_docs_keeps_the_judged_documents(self):
    _, full = finetune_retriever.load_data("code_search", eval_max_queries=30)
    _, small = finetune_retriever.load_data(
        "code_search", eval_max_queries=30, eval_max_docs=100)
    self.assertLen(small.corpus, 100)
    self.assertEqual(small.qrels, full.qrels)
    judged = {d for q in small.qrels for d in small.qrels[q]}
    self.assertLessEqual(judged, set(small.corpus))
    self.assertLess(len(small.corpus), len(full.corpus))

  def test_bad_model_options(self):
    def check(pattern, **overrides):
      config = config_lib.get_config("smoke")
      with config.unlocked():
        for key, value in overrides.items():
          node = config
          *parents, leaf = key.split(".")
          for p in parents:
            node = node[p]
          node[leaf] = value
      with self.assertRaisesRegex(ValueError, pattern):
        retrieval_models.validate_config(config)

    check("Unknown model 'dpr'", model="dpr")
    check("symmetric=True applies to the bi-encoder", model="colbert",
          symmetric=True)
    check("eval_dims .* dense models", model="splade", eval_dims=(64,))
    check("2 entries for 3 dims", model="matryoshka",
          **{"matryoshka.dims": (384, 64, 16),
             "matryoshka.weights": (1.0, 0.5)})
    check("at least one prefix", model="matryoshka",
          **{"matryoshka.dims": ()})
    check("positive ints", eval_dims=(64, 0))
    check("Unknown splade.regularizer", model="splade",
          **{"splade.regularizer": "l2"})
    check(">= 0", model="splade", **{"splade.lambda_d": -1.0})
    check("num_simhash_projections", model="colbert",
          **{"colbert.muvera.num_simhash_projections": 40})
    check("towers must be one of", towers="two")
    check(r"\['towers', 'same_side'\] apply to the bi-encoder",
          model="colbert", towers="separate", same_side=True)
    check("scale <= max_scale", learn_scale=True, scale=200.0)

  def test_galore_with_nothing_to_project_is_an_error(self):
    config = config_lib.get_config("smoke")
    with config.unlocked():
      config.optimizer.name = "galore"
    lora_factors = {"['encoder']": {"lora_a": jnp.zeros((384, 8)),
                                    "lora_b": jnp.zeros((8, 384))}}
    with self.assertRaisesRegex(ValueError, "would project no parameter"):
      finetune_retriever.check_optimizer(config, lora_factors)
    with config.unlocked():
      config.optimizer.galore.rank = 4  # Now the rank-8 factors qualify.
    finetune_retriever.check_optimizer(config, lora_factors)
    with config.unlocked():
      config.optimizer.name = "adamw"
      config.optimizer.galore.rank = 64
    finetune_retriever.check_optimizer(config, lora_factors)

  def test_load_model_checks_sizes_and_mlm_head(self):
    from lowrank import assets  # pylint: disable=g-import-not-at-top
    config = config_lib.get_config("smoke")
    with config.unlocked():
      config.model = "matryoshka"
      config.matryoshka.dims = (512, 64)
    with self.assertRaisesRegex(ValueError, r"\[512\] exceed .* 384"):
      retrieval_models.load_model(config)
    with config.unlocked():
      config.model = "splade"
      config.model_path = str(assets.minilm_path())
    with self.assertRaisesRegex(ValueError, "no MLM head"):
      retrieval_models.load_model(config)


class TrainAndEvaluateTest(absltest.TestCase):

  def test_smoke_trains_and_rerun_resumes_to_the_same_result(self):
    config = config_lib.get_config("smoke")
    straight = self.create_tempdir().full_path
    full = finetune_retriever.train_and_evaluate(config, straight)
    self.assertEqual(full["resumed_from_step"], 0)
    self.assertGreater(full["trainable_params"], 0)
    self.assertLess(full["trainable_params"], full["total_params"] / 10)
    self.assertGreater(full["compiled_step_memory"]["total_bytes"], 0)
    for key in ("ndcg_cut_10", "recall_10", "recall_100"):
      self.assertBetween(full["final"][key], 0.0, 1.0)
    self.assertTrue(os.path.exists(os.path.join(straight, "results.md")))

    # Interrupted after step 2, then the same command again: it resumes.
    resumed = self.create_tempdir().full_path
    with config.unlocked():
      config.num_train_steps = 2
    finetune_retriever.train_and_evaluate(config, resumed)
    with config.unlocked():
      config.num_train_steps = 4
    again = finetune_retriever.train_and_evaluate(config, resumed)
    self.assertEqual(again["resumed_from_step"], 2)
    self.assertEqual(_losses(resumed)[4], _losses(straight)[4])
    for key, value in full["final"].items():
      np.testing.assert_allclose(again["final"][key], value, atol=1e-6)

  def test_full_fine_tuning_smoke(self):
    config = config_lib.get_config("smoke")
    with config.unlocked():
      config.method = "full"
      config.num_train_steps = 2
      config.optimizer.learning_rate = 2e-5
    out = finetune_retriever.train_and_evaluate(
        config, self.create_tempdir().full_path)
    self.assertEqual(out["trainable_params"], out["total_params"])

  def _small(self, model, **overrides):
    """The smoke preset on a tiny BEIR directory, 2 steps."""
    config = config_lib.get_config("smoke")
    data = _write_tiny_beir(pathlib.Path(self.create_tempdir().full_path))
    with config.unlocked():
      config.model = model
      config.data = data
      config.num_train_steps = 2
      config.log_every_steps = 1
      config.checkpoint_every_steps = 100  # Only the final one.
      for key, value in overrides.items():
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
          node = node[p]
        node[leaf] = value
    return config

  def test_matryoshka_smoke_reports_every_prefix(self):
    config = self._small("matryoshka", **{"matryoshka.dims": (384, 64, 16)})
    workdir = self.create_tempdir().full_path
    out = finetune_retriever.train_and_evaluate(config, workdir)
    self.assertEqual(out["model"], "matryoshka")
    for metrics in (out["zero_shot"], out["final"]):
      self.assertEqual(list(retrieval_models.prefix_curve(metrics)),
                       [16, 64, 384])
      self.assertEqual(metrics["ndcg_cut_10@384"], metrics["ndcg_cut_10"])
      for value in metrics.values():
        self.assertBetween(value, 0.0, 1.0)
    # A 16-d prefix of untrained MiniLM is much worse than all 384 dims.
    z = out["zero_shot"]
    self.assertLess(z["ndcg_cut_10@16"], z["ndcg_cut_10@384"] - 0.1)
    with open(os.path.join(workdir, "prefix_curve.png"), "rb") as f:
      self.assertEqual(f.read(4), b"\x89PNG")
    with open(os.path.join(workdir, "results.md")) as f:
      table = f.read()
    self.assertIn("| matryoshka lora (2 steps) |", table)
    self.assertIn("by embedding prefix size", table)

  def test_separate_towers_learned_scale_same_side_smoke(self):
    config = self._small("biencoder", towers="separate", learn_scale=True,
                         same_side=True, symmetric=True)
    with config.unlocked():
      config.optimizer.learning_rate = 0.05  # Moves the scale visibly.
      config.num_train_steps = 3  # Step 1 has lr 0 (warm-up).
    workdir = self.create_tempdir().full_path
    out = finetune_retriever.train_and_evaluate(config, workdir)
    shared = self._small("biencoder")
    with sharding_lib.use_mesh(
        sharding_lib.make_mesh(devices=jax.devices()[:1])):
      model, _ = retrieval_models.load_model(config)
      plain, _ = retrieval_models.load_model(shared)
    self.assertIsInstance(model, biencoder.BiEncoder)
    self.assertIsNot(model.query_encoder, model.doc_encoder)
    kwargs = dict(shared.adapter)
    options = dict(kwargs.pop("options", None) or {})
    adapters.inject(plain, method=shared.method, rngs=shared.seed, **kwargs,
                    **options)
    lora = adapters.count_parameters(plain)["trainable"]
    # Both towers carry adapters, plus the one-number scale.
    self.assertEqual(out["trainable_params"], 2 * lora + 1)
    rows = metric_writers.read_csv(os.path.join(workdir, "metrics.csv"))
    scales = [r["logit_scale"] for r in rows]
    self.assertAlmostEqual(scales[0], 20.0, delta=2.0)
    self.assertNotAlmostEqual(scales[-1], scales[0], places=3)
    for value in out["final"].values():
      self.assertBetween(value, 0.0, 1.0)

  def test_prefix_evaluation_is_truncate_and_renormalise(self):
    from lowrank import sharding  # pylint: disable=g-import-not-at-top
    from lowrank.models import bert  # pylint: disable=g-import-not-at-top
    from lowrank.retrieval import metrics  # pylint: disable=g-import-not-at-top
    from lowrank.retrieval import search  # pylint: disable=g-import-not-at-top
    config = self._small("biencoder", eval_dims=(384, 32), eval_k=10)
    _, test = finetune_retriever.load_data(config.data)
    with sharding.use_mesh(sharding.make_mesh(devices=jax.devices()[:1])):
      model, tokenizer = retrieval_models.load_model(config)
      out, info = retrieval_models.evaluate(model, tokenizer, test, config)
      qids, dids = sorted(test.qrels), sorted(test.corpus)
      q = bert.embed_texts(model, tokenizer,
                           [test.queries[i] for i in qids],
                           max_length=config.query_max_length)
      d = bert.embed_texts(model, tokenizer,
                           [test.corpus[i] for i in dids],
                           max_length=config.doc_max_length)
    self.assertEqual(info["dim"], 384)
    self.assertEqual(out["ndcg_cut_10@384"], out["ndcg_cut_10"])
    q32, d32 = q[:, :32], d[:, :32]
    q32 = q32 / np.linalg.norm(q32, axis=1, keepdims=True)
    d32 = d32 / np.linalg.norm(d32, axis=1, keepdims=True)
    expected = metrics.evaluate(
        test.qrels, search.search_run(qids, q32, dids, d32, 10),
        ("ndcg_cut_10",))
    self.assertAlmostEqual(out["ndcg_cut_10@32"], expected["ndcg_cut_10"],
                           places=6)
    self.assertNotAlmostEqual(out["ndcg_cut_10@32"], out["ndcg_cut_10"])

  def test_colbert_smoke_exact_and_muvera(self):
    # Reranking every document makes MUVERA's result the exact one.
    config = self._small("colbert", **{
        "colbert.muvera.num_repetitions": 2,
        "colbert.muvera.num_simhash_projections": 3,
        "colbert.muvera.rerank": 48})
    workdir = self.create_tempdir().full_path
    out = finetune_retriever.train_and_evaluate(config, workdir)
    lora = out["trainable_params"] - 384 * 128  # Minus the projection.
    self.assertEqual(lora, 337_920)  # As the bi-encoder's LoRA (smoke).
    for metrics in (out["zero_shot"], out["final"]):
      for name in retrieval_models.EVAL_METRICS:
        self.assertBetween(metrics[name], 0.0, 1.0)
        self.assertAlmostEqual(metrics["muvera_" + name], metrics[name],
                               places=6)
        self.assertIn("fde_" + name, metrics)
    for info in (out["zero_shot_info"], out["final_info"]):
      self.assertEqual(info["muvera_rerank"], 48)
      self.assertEqual(info["fde_dim"], 2 * 2**3 * 16)
      self.assertGreater(info["exact_search_s"], 0.0)
      self.assertGreater(info["muvera_search_s"], 0.0)
    self.assertNotEqual(out["final"], out["zero_shot"])
    with open(os.path.join(workdir, "results.md")) as f:
      table = f.read()
    self.assertIn("| MUVERA FDE + MaxSim rerank |", table)

  def test_splade_smoke_regulariser_warmup_and_sparsity(self):
    config = self._small("splade", **{
        "method": "dora", "optimizer.name": "adamw8bit",
        "splade.lambda_q": 0.2, "splade.lambda_d": 0.1,
        "splade.reg_warmup_steps": 2})
    workdir = self.create_tempdir().full_path
    out = finetune_retriever.train_and_evaluate(config, workdir)
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
      self.assertBetween(r["q_l0"], 1.0, 30522.0)
    for info in (out["zero_shot_info"], out["final_info"]):
      self.assertBetween(info["avg_query_terms"], 1.0, 500.0)
      self.assertBetween(info["avg_doc_terms"], 1.0, 2000.0)
    for name in retrieval_models.EVAL_METRICS:
      self.assertBetween(out["final"][name], 0.0, 1.0)

  def test_beir_directory(self):
    scifact = _SHARED / "data" / "beir" / "scifact"
    if not scifact.exists():
      self.skipTest(f"{scifact} not present (needs ../shared/data).")
    config = config_lib.get_config("smoke")
    with config.unlocked():
      config.data = f"beir:{scifact}"
      config.num_train_steps = 2
      config.eval_max_queries = 10
      config.eval_max_docs = 600  # Judged docs + others (whole: 5,183).
      config.doc_max_length = 16
    out = finetune_retriever.train_and_evaluate(
        config, self.create_tempdir().full_path)
    self.assertEqual(out["train_pairs"], 919)
    self.assertEqual(out["test_docs"], 600)
    self.assertEqual(out["test_queries"], 10)
    train, test = finetune_retriever.load_data(config.data)
    self.assertLen(train, 919)
    self.assertLen(test.corpus, 5183)  # The loader reads the whole corpus.


if __name__ == "__main__":
  absltest.main()
