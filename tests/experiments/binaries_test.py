"""Every experiment binary end to end: smoke, interrupted, resumed, killed.

Each binary's smoke run, interrupted and resumed, is a `testing.
SmokeAndResume` subclass in the binary's own test file (its checks share
the two runs); `test_every_binary_has_a_smoke_and_resume_test` holds every
binary to that. eval_beir trains nothing: its case here reruns a BM25
evaluation of a tiny BEIR directory. `KillTest` does an interruption for
real: it SIGKILLs `python -m experiments.pretrain_lm` (GaLore on the tiny
decoder, so the state has projectors, refreshes and a count) once a
checkpoint is on disk (atomic checkpoints survive a kill), reruns it and
compares with a straight run. The demo's runs are finetune_retriever's
(tests/experiments/demo_test.py).
"""

import importlib
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from absl.testing import absltest

from experiments import eval_beir
from experiments import pretrain_lm
from experiments.configs import pretrain_lm as pretrain_lm_config
from lowrank import metric_writers
from tests import testing

_REPO = pathlib.Path(__file__).resolve().parents[2]


class BinariesTest(absltest.TestCase):

  def test_every_binary_has_a_smoke_and_resume_test(self):
    binaries = sorted(
        p.stem for p in (_REPO / "experiments").glob("*.py")
        if "\ndef train_and_evaluate(" in p.read_text())
    self.assertContainsSubset(
        ["finetune_retriever", "pretrain_lm", "rerank_decoder",
         "train_reranker"], binaries)
    for name in binaries:
      tests = importlib.import_module(f"tests.experiments.{name}_test")
      covered = [c for c in vars(tests).values() if isinstance(c, type)
                 and issubclass(c, testing.SmokeAndResume)
                 and c.module.__name__ == f"experiments.{name}"]
      self.assertLen(covered, 1, f"tests/experiments/{name}_test.py needs "
                     "one testing.SmokeAndResume subclass for its binary")

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
# count; 20 steps with a checkpoint every 2, so the kill lands mid-run.
_KILL_CHANGES = dict(methods="galore", train__num_steps=20,
                     train__checkpoint_every=2, train__log_every=1,
                     train__eval_every=10, optimizer__galore__refresh_every=3)


def _kill_config():
  return testing.changed(pretrain_lm_config.get_config("smoke"),
                         **_KILL_CHANGES)


def _start(workdir, log):
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             PYTHONPATH=os.pathsep.join(
                 [str(_REPO), *filter(None, [os.environ.get("PYTHONPATH")])]))
  flags = [f"--config.{k.replace('__', '.')}={v}"
           for k, v in _KILL_CHANGES.items()]
  return subprocess.Popen(
      [sys.executable, "-m", "experiments.pretrain_lm",
       f"--workdir={workdir}",
       "--config=experiments/configs/pretrain_lm.py:smoke", *flags],
      env=env, cwd=_REPO, stdout=subprocess.DEVNULL,
      stderr=log)  # A pipe could fill and block.


def _checkpoints(workdir):
  d = os.path.join(workdir, "galore", "checkpoints")
  return sorted(int(x) for x in os.listdir(d) if x.isdigit()) if (
      os.path.isdir(d)) else []


class KillTest(absltest.TestCase):

  def test_sigkill_then_rerun_equals_straight_run(self):
    # The command is killed for real; the rerun and the straight run go
    # in-process (one compile for both; the same flags and devices as the
    # killed process, which inherits this environment).
    straight, killed = (self.create_tempdir().full_path for _ in range(2))
    log_path = os.path.join(self.create_tempdir().full_path, "killed")
    with open(log_path, "w") as log:
      proc = _start(killed, log)
      deadline = time.time() + 600
      while not _checkpoints(killed) and proc.poll() is None:
        self.assertLess(time.time(), deadline, "no checkpoint appeared")
        time.sleep(0.01)
      proc.send_signal(signal.SIGKILL)
      proc.wait()
    with open(log_path) as f:
      self.assertEqual(proc.returncode, -signal.SIGKILL,
                       "the run ended before it could be killed:\n"
                       + f.read()[-3000:])
    self.assertFalse(os.path.exists(os.path.join(killed, "results.json")))
    self.assertBetween(max(_checkpoints(killed)), 1, 18)
    results = [pretrain_lm.train_and_evaluate(_kill_config(), d)["results"][0]
               for d in (killed, straight)]
    self.assertGreater(results[0]["resumed_from_step"], 0)
    self.assertEqual(results[0]["val_loss"], results[1]["val_loss"])
    losses = lambda d: [  # pylint: disable=g-long-lambda
        (r["step"], r["loss"]) for r in metric_writers.read_csv(
            os.path.join(d, "galore", "metrics.csv")) if "loss" in r]
    self.assertEqual(losses(killed), losses(straight))
    self.assertEqual([s for s, _ in losses(killed)], list(range(1, 21)))


if __name__ == "__main__":
  absltest.main()
