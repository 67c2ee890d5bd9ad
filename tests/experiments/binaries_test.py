"""Every experiment binary end to end: the smoke preset, interrupted, resumed.

`SmokeAndResumeTest` runs each binary's `train_and_evaluate` on its smoke
preset in-process, then makes a copy of the workdir look like a run killed
after its next-to-last checkpoint (the last checkpoint of every phase and
the final outputs removed) and runs it again: the rerun resumes from a
checkpoint and ends with the same results (every number but times,
memory and the resume step). eval_beir trains nothing: its smoke case
reruns a BM25 evaluation of a tiny BEIR directory. `KillTest` does it once
for real: it SIGKILLs `python -m experiments.pretrain_lm` (GaLore on the
tiny decoder, so the state has projectors, refreshes and a count) once a
checkpoint is on disk (atomic checkpoints survive a kill), reruns the
command and compares with a straight run. The demo's runs are
finetune_retriever's (tests/experiments/demo_test.py).
"""

import json
import math
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import time

from absl.testing import absltest
from absl.testing import parameterized

from experiments import eval_beir
from experiments import finetune_retriever
from experiments import pretrain_lm
from experiments import rerank_decoder
from experiments import train_reranker
from experiments.configs import finetune_retriever as finetune_config
from experiments.configs import pretrain_lm as pretrain_lm_config
from experiments.configs import rerank_decoder as rerank_decoder_config
from experiments.configs import train_reranker as train_reranker_config
from lowrank import metric_writers

_REPO = str(pathlib.Path(__file__).resolve().parents[2])

# Outputs a run writes after its last step (removed to fake a kill).
_OUTPUTS = re.compile(r"results\.|reranked_|fused_|.*\.png$")
# Result keys that legitimately differ between a straight and a resumed run.
_VOLATILE = re.compile(r"second|_s$|time|resumed|memory|bytes|dir|path")

_BINARIES = {
    "finetune_retriever": (finetune_retriever, finetune_config),
    "pretrain_lm": (pretrain_lm, pretrain_lm_config),
    "train_reranker": (train_reranker, train_reranker_config),
    "rerank_decoder": (rerank_decoder, rerank_decoder_config),
}


def _leaves(tree, prefix=""):
  """Dotted key -> leaf of nested dicts and lists."""
  out = {}
  for key, value in (tree.items() if isinstance(tree, dict)
                     else enumerate(tree)):
    if isinstance(value, (dict, list)):
      out.update(_leaves(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def _numbers(tree):
  """The numeric leaves, volatile keys (times, memory, resume step) out."""
  return {k: v for k, v in _leaves(tree).items()
          if isinstance(v, (int, float)) and not isinstance(v, bool)
          and not _VOLATILE.search(k)}


def _resume_steps(results) -> list[int]:
  return [v for k, v in _leaves(results).items()
          if k.endswith("resumed_from_step")]


def _interrupt(workdir: str) -> list[int]:
  """Removes the last checkpoint of every phase and the final outputs."""
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


class SmokeAndResumeTest(parameterized.TestCase):

  def assert_same_numbers(self, got, expected):
    got, expected = _numbers(got), _numbers(expected)
    self.assertEqual(sorted(got), sorted(expected))
    for key, value in expected.items():
      self.assertTrue(
          math.isclose(got[key], value, rel_tol=1e-5, abs_tol=1e-6)
          or (math.isnan(value) and math.isnan(got[key])),
          f"{key}: resumed {got[key]} != straight {value}")

  @parameterized.named_parameters((b, b) for b in sorted(_BINARIES))
  def test_smoke_then_resume(self, binary):
    module, config_lib = _BINARIES[binary]
    config = config_lib.get_config("smoke")
    straight = self.create_tempdir().full_path
    full = module.train_and_evaluate(config, straight)
    self.assertTrue(os.path.isfile(os.path.join(straight, "results.json")))
    self.assertEqual(set(_resume_steps(full)), {0})
    resumed = self.create_tempdir().full_path
    shutil.rmtree(resumed)
    shutil.copytree(straight, resumed)
    self.assertNotEmpty(_interrupt(resumed))
    again = module.train_and_evaluate(config, resumed)
    self.assertGreater(max(_resume_steps(again)), 0)
    self.assert_same_numbers(again, full)

  def test_eval_beir_bm25_on_a_tiny_directory(self):
    # No training: a rerun recomputes the same metrics.
    root = pathlib.Path(self.create_tempdir().full_path)
    words = ("iron", "copper", "zinc", "gold", "tin", "lead")
    docs = [{"_id": f"d{i}", "title": "", "text": f"{w} ore note {i}"}
            for i, w in enumerate(words)]
    (root / "corpus.jsonl").write_text(
        "".join(json.dumps(d) + "\n" for d in docs))
    (root / "queries.jsonl").write_text("".join(
        json.dumps({"_id": f"q{i}", "text": w}) + "\n"
        for i, w in enumerate(words)))
    (root / "qrels").mkdir()
    (root / "qrels" / "test.tsv").write_text("query-id\tcorpus-id\tscore\n" + (
        "".join(f"q{i}\td{i}\t1\n" for i in range(len(words)))))
    out = self.create_tempdir().full_path
    first = eval_beir.evaluate_beir(root, "bm25", output_dir=out, k=10)
    self.assertEqual(first["metrics"]["ndcg_cut_10"], 1.0)
    again = eval_beir.evaluate_beir(root, "bm25", output_dir=out, k=10)
    self.assertEqual(again["metrics"], first["metrics"])
    with open(os.path.join(out, "results.json")) as f:
      self.assertEqual(json.load(f)["metrics"], first["metrics"])


# GaLore on the tiny decoder: the state has projectors, refreshes and a
# count; 60 steps with a checkpoint every 2, so the kill lands mid-run.
_KILL_FLAGS = (
    "--config=experiments/configs/pretrain_lm.py:smoke",
    "--config.methods=galore", "--config.train.num_steps=60",
    "--config.train.checkpoint_every=2", "--config.train.log_every=1",
    "--config.train.eval_every=30",
    "--config.optimizer.galore.refresh_every=3")


def _start(workdir, log):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(
                 [_REPO, *filter(None, [os.environ.get("PYTHONPATH")])]))
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.pretrain_lm",
       f"--workdir={workdir}", *_KILL_FLAGS], env=env, cwd=_REPO,
      stdout=subprocess.DEVNULL, stderr=log)  # A pipe could fill and block.


def _checkpoints(workdir):
  d = os.path.join(workdir, "galore", "checkpoints")
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if (
      os.path.isdir(d)) else []


class KillTest(absltest.TestCase):

  def test_sigkill_then_rerun_equals_straight_run(self):
    straight, killed, logs = (self.create_tempdir().full_path
                              for _ in range(3))
    log = lambda name: open(os.path.join(logs, name), "w")  # pylint: disable=consider-using-with
    proc = _start(killed, log("killed"))
    deadline = time.time() + 600
    while not _checkpoints(killed) and proc.poll() is None:
      self.assertLess(time.time(), deadline, "no checkpoint appeared")
      time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    self.assertEqual(proc.returncode, -signal.SIGKILL,
                     "the run finished before it could be killed")
    self.assertFalse(os.path.exists(os.path.join(killed, "results.json")))
    self.assertBetween(max(_checkpoints(killed)), 1, 58)
    # One after the other: on 2 cores, running them together saves nothing.
    for name, workdir in (("rerun", killed), ("straight", straight)):
      p = _start(workdir, log(name))
      p.wait(timeout=600)
      with open(os.path.join(logs, name)) as f:
        self.assertEqual(p.returncode, 0, f.read()[-3000:])
    results = []
    for d in (killed, straight):
      with open(os.path.join(d, "results.json")) as f:
        results.append(json.load(f)["results"][0])
    self.assertGreater(results[0]["resumed_from_step"], 0)
    self.assertEqual(results[0]["val_loss"], results[1]["val_loss"])
    losses = lambda d: [  # pylint: disable=g-long-lambda
        (r["step"], r["loss"]) for r in metric_writers.read_csv(
            os.path.join(d, "galore", "metrics.csv")) if "loss" in r]
    self.assertEqual(losses(killed), losses(straight))
    self.assertEqual([s for s, _ in losses(killed)], list(range(1, 61)))


if __name__ == "__main__":
  absltest.main()
