"""kill -9 an experiment binary mid-run; the rerun ends where a straight run does.

Runs `python -m experiments.finetune_retriever` (smoke preset, GaLore so the
optimizer state has refreshes, empty placeholders and a PRNG key) as a real
subprocess, SIGKILLs it once a checkpoint is on disk, reruns the same
command and compares final metrics and logged losses with an uninterrupted
run.
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

from absl.testing import absltest

from lowrank import metric_writers

_REPO = str(pathlib.Path(__file__).resolve().parents[2])
_FLAGS = (
    "--config=experiments/configs/finetune_retriever.py:smoke,galore",
    "--config.optimizer.learning_rate.peak_value=1e-4",
    "--config.optimizer.rank=8",
    "--config.optimizer.refresh_every=3",
    "--config.train.num_steps=6",
    "--config.train.checkpoint_every=2",
    "--config.train.log_every=1",
    "--config.data.eval_max_queries=10",
)


def _env():
  return dict(
      os.environ,
      XLA_FLAGS="--xla_force_host_platform_device_count=2",
      JAX_PLATFORMS="cpu",
      PYTHONPATH=os.pathsep.join(
          [_REPO] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
  )


def _cmd(workdir):
  return [sys.executable, "-m", "experiments.finetune_retriever",
          f"--workdir={workdir}", *_FLAGS]


def _finalized_steps(workdir):
  d = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(d):
    return []
  return sorted(int(x) for x in os.listdir(d) if x.isdigit())


class KillAndResumeTest(absltest.TestCase):

  def test_sigkill_then_rerun_equals_straight_run(self):
    straight = self.create_tempdir().full_path
    done = subprocess.run(_cmd(straight), env=_env(), cwd=_REPO,
                          capture_output=True, text=True, timeout=600)
    self.assertEqual(done.returncode, 0, done.stderr[-3000:])

    killed = self.create_tempdir().full_path
    proc = subprocess.Popen(_cmd(killed), env=_env(), cwd=_REPO,
                            stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 600
    while not _finalized_steps(killed) and proc.poll() is None:
      self.assertLess(time.time(), deadline, "no checkpoint appeared")
      time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    self.assertEqual(proc.returncode, -signal.SIGKILL,
                     "the run finished before it could be killed")
    self.assertFalse(os.path.exists(os.path.join(killed, "results.json")))
    first = _finalized_steps(killed)
    self.assertNotEmpty(first)
    self.assertLess(max(first), 6)

    again = subprocess.run(_cmd(killed), env=_env(), cwd=_REPO,
                           capture_output=True, text=True, timeout=600)
    self.assertEqual(again.returncode, 0, again.stderr[-3000:])
    with open(os.path.join(killed, "results.json")) as f:
      resumed = json.load(f)
    with open(os.path.join(straight, "results.json")) as f:
      expected = json.load(f)
    self.assertGreater(resumed["resumed_from_step"], 0)
    self.assertEqual(resumed["final"], expected["final"])
    losses = lambda d: [  # pylint: disable=g-long-lambda
        (r["step"], r["loss"]) for r in metric_writers.read_csv(
            os.path.join(d, "metrics.csv"))]
    self.assertEqual(losses(killed), losses(straight))
    self.assertEqual([s for s, _ in losses(killed)], list(range(1, 7)))


if __name__ == "__main__":
  absltest.main()
