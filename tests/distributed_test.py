"""Multi-process runs of experiments/finetune_retriever.py equal one process.

The binary runs twice on the smoke preset, concurrently: as 2 processes x 2
fake CPU devices joined by `jax.distributed.initialize` on 127.0.0.1, and as
1 process x 4 devices (several devices per process, as on a pod's hosts;
the data-parallel update is replicated on every device, so fewer devices
cost less CPU here). The logged losses and gradient norms, the zero-shot
and the final retrieval metrics must agree. The data is a tiny BEIR-format
collection written here (`--config.data.spec=beir:<dir>`) and the model
all-MiniLM-L6-v2 cut to its first 2 layers (`--config.model.path`: the same
checkpoint format, tokenizer and embeddings; a 6-layer model takes about 3x
longer to compile), so that the three processes finish in well under a
minute of CPU on a shared machine; the training path (mesh, batches, step,
checkpoints) is the one of any dataset and model.
"""

import json
import os
import pathlib
import socket
import subprocess
import sys
import time
from unittest import mock

from absl.testing import absltest
import jax
import numpy as np
from safetensors import numpy as safetensors_numpy

from lowrank import assets
from lowrank import distributed

_ROOT = pathlib.Path(__file__).resolve().parents[1]
_TIMEOUT_S = 170.0
_ANIMALS = ("cat", "dog", "horse", "goat", "owl", "frog", "bee", "fox")
_FOODS = ("fish", "bones", "hay", "grass", "mice", "flies", "nectar", "eggs")
_PLACES = ("barn", "river", "forest", "garden")


def _write_tiny_beir(directory: pathlib.Path) -> None:
  """32 documents; 16 train and 8 test queries, one relevant doc each."""
  (directory / "qrels").mkdir(parents=True)
  docs, queries, train, test = [], [], [], []
  for i in range(32):
    a, f, p = _ANIMALS[i % 8], _FOODS[(i * 3) % 8], _PLACES[i // 8]
    docs.append({"_id": f"d{i}", "title": f"{a} {i}",
                 "text": f"The {a} from the {p} eats {f} every day."})
    qid = f"q{i}"
    if i < 16:
      queries.append({"_id": qid, "text": f"what does the {p} {a} eat"})
      train.append(f"{qid}\td{i}\t1")
    elif i < 24:  # Four documents fit (one per place): metrics are not 1.
      queries.append({"_id": qid, "text": f"which animal eats {f}"})
      test.append(f"{qid}\td{i}\t1")
  with open(directory / "corpus.jsonl", "w") as f:
    f.writelines(json.dumps(d) + "\n" for d in docs)
  with open(directory / "queries.jsonl", "w") as f:
    f.writelines(json.dumps(q) + "\n" for q in queries)
  header = "query-id\tcorpus-id\tscore\n"
  for name, rows in (("train", train), ("test", test)):
    (directory / "qrels" / f"{name}.tsv").write_text(
        header + "".join(r + "\n" for r in rows))


def _write_truncated_minilm(directory: pathlib.Path, num_layers: int) -> None:
  """all-MiniLM-L6-v2 with its first `num_layers` layers: an HF directory."""
  src = assets.minilm_path()
  directory.mkdir(parents=True)
  for f in src.iterdir():
    if f.is_file() and f.name not in ("config.json", "model.safetensors"):
      (directory / f.name).write_bytes(f.read_bytes())
  config = json.loads((src / "config.json").read_text())
  config["num_hidden_layers"] = num_layers
  (directory / "config.json").write_text(json.dumps(config))
  kept = tuple(f"encoder.layer.{i}." for i in range(num_layers))
  tensors = safetensors_numpy.load_file(str(src / "model.safetensors"))
  safetensors_numpy.save_file(
      {k: v for k, v in tensors.items()
       if not k.startswith("encoder.layer.") or k.startswith(kept)},
      str(directory / "model.safetensors"))


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _command(workdir, data, model, *extra):
  return [
      sys.executable, "-m", "experiments.finetune_retriever",
      "--config=experiments/configs/finetune_retriever.py:smoke",
      f"--config.data.spec=beir:{data}", f"--config.model.path={model}",
      f"--workdir={workdir}", *extra,
  ]


def _env(devices: int) -> dict[str, str]:
  env = {k: v for k, v in os.environ.items()
         if not k.startswith("LOWRANK_") or k == "LOWRANK_SHARED_DIR"}
  env.update(
      # tests/conftest.py's fast-compile flags (as the notebook and wheel
      # tests): the smoke runs are mostly compiling; both sides get them.
      XLA_FLAGS=(f"--xla_force_host_platform_device_count={devices} " +
                 os.environ.get("LOWRANK_TEST_FAST_XLA_FLAGS", "")).strip(),
      JAX_PLATFORMS="cpu",
      PYTHONPATH=os.pathsep.join(
          [str(_ROOT)] + env.get("PYTHONPATH", "").split(os.pathsep)
      ).rstrip(os.pathsep),
  )
  return env


def _losses(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return {r["step"]: r for r in map(json.loads, f)}


def _results(workdir):
  with open(os.path.join(workdir, "results.json")) as f:
    return json.load(f)


class MultiHostTest(absltest.TestCase):

  def _run_all(self, jobs):
    """Runs `(name, command, env, log path)` jobs concurrently.

    Returns:
      `{name: output}`. Every child is killed if one fails or time runs out.
    """
    procs, files = {}, []
    try:
      for name, cmd, env, log in jobs:
        files.append(open(log, "w"))
        procs[name] = (subprocess.Popen(
            cmd, cwd=_ROOT, env=env, stdout=files[-1],
            stderr=subprocess.STDOUT), log)
      deadline = time.monotonic() + _TIMEOUT_S
      while any(p.poll() is None for p, _ in procs.values()):
        failed = [n for n, (p, _) in procs.items() if p.poll()]
        if failed or time.monotonic() > deadline:
          break
        time.sleep(0.5)
    finally:
      for p, _ in procs.values():
        if p.poll() is None:
          p.kill()
        p.wait()
      for f in files:
        f.close()
    outputs = {n: pathlib.Path(log).read_text() for n, (_, log) in
               procs.items()}
    for name, (p, _) in procs.items():
      self.assertEqual(
          p.returncode, 0,
          f"{name} exited with {p.returncode} (killed: -9 after a timeout "
          f"of {_TIMEOUT_S} s or another child's failure); output tail:\n"
          + outputs[name][-3000:])
    return outputs

  def test_two_processes_match_one_process(self):
    tmp = pathlib.Path(self.create_tempdir().full_path)
    data = tmp / "tiny_beir"
    _write_tiny_beir(data)
    model = tmp / "minilm_2_layers"
    _write_truncated_minilm(model, 2)
    one, two = tmp / "one_process", tmp / "two_processes"
    address = f"127.0.0.1:{_free_port()}"
    jobs = [("1x4", _command(one, data, model), _env(4), tmp / "1x4.log")]
    for i in range(2):
      jobs.append((
          f"2x2 process {i}",
          _command(two, data, model, f"--coordinator_address={address}",
                   "--num_processes=2", f"--process_id={i}"),
          _env(2),
          tmp / f"2x2_{i}.log",
      ))
    outputs = self._run_all(jobs)

    # Process 0 alone prints the table and writes the files.
    self.assertIn("| zero-shot |", outputs["2x2 process 0"])
    self.assertNotIn("| zero-shot |", outputs["2x2 process 1"])
    ref, got = _losses(one), _losses(two)
    self.assertEqual(sorted(ref), [2, 4])
    self.assertEqual(sorted(got), sorted(ref))
    for step in ref:
      for key in ("loss", "grad_norm"):
        np.testing.assert_allclose(got[step][key], ref[step][key],
                                   rtol=1e-5, atol=1e-5,
                                   err_msg=f"{key} at step {step}")
    self.assertTrue(np.isfinite(ref[4]["loss"]))
    ref, got = _results(one), _results(two)
    # Unsaturated metrics, so that equal ones say something.
    self.assertLess(ref["zero_shot"]["ndcg_cut_10"], 0.99)
    self.assertLess(ref["final"]["ndcg_cut_10"], 0.99)
    for section in ("zero_shot", "final"):
      self.assertEqual(sorted(got[section]), sorted(ref[section]))
      for key, value in ref[section].items():
        np.testing.assert_allclose(got[section][key], value, atol=1e-6,
                                   err_msg=f"{section} {key}")
    self.assertEqual(got["trainable_params"], ref["trainable_params"])
    self.assertEqual(got["test_queries"], 8)
    # Checkpoints were written collectively into the shared workdir.
    steps = sorted(int(p.name) for p in (two / "checkpoints").iterdir()
                   if p.name.isdigit())
    self.assertEqual(steps, [2, 4])


class InitializeTest(absltest.TestCase):

  def setUp(self):
    super().setUp()
    for name in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES,
                 distributed.ENV_PROCESS_ID,
                 distributed.ENV_LOCAL_DEVICE_IDS):
      self.enter_context(mock.patch.dict(os.environ, {name: ""}))

  def test_single_process_is_a_no_op(self):
    self.assertFalse(distributed.initialize())
    self.assertFalse(distributed.initialize(num_processes=1, process_id=0))
    self.assertFalse(jax.distributed.is_initialized())
    self.assertTrue(distributed.is_main_process())
    distributed.barrier("single process: returns at once")

  def test_incomplete_specifications_are_refused(self):
    with self.assertRaisesRegex(ValueError, "needs coordinator_address"):
      distributed.initialize(num_processes=2, process_id=0)
    with self.assertRaisesRegex(ValueError, r"process_id must be in \[0, 2\)"):
      distributed.initialize("127.0.0.1:1234", num_processes=2, process_id=2)
    with self.assertRaisesRegex(ValueError, "without num_processes"):
      distributed.initialize("127.0.0.1:1234")
    with self.assertRaisesRegex(ValueError, "num_processes must be >= 1"):
      distributed.initialize("127.0.0.1:1234", num_processes=0)
    with self.assertRaisesRegex(ValueError, "must be 0 for a single process"):
      distributed.initialize(num_processes=1, process_id=1)
    self.assertFalse(jax.distributed.is_initialized())

  def test_environment_variables_are_read(self):
    with mock.patch.dict(os.environ, {
        distributed.ENV_NUM_PROCESSES: "2",
        distributed.ENV_PROCESS_ID: "0"}):
      with self.assertRaisesRegex(ValueError, "num_processes=2 needs"):
        distributed.initialize()
    with mock.patch.dict(
        os.environ, {distributed.ENV_NUM_PROCESSES: "two"}):
      with self.assertRaisesRegex(ValueError, "LOWRANK_NUM_PROCESSES"):
        distributed.initialize()


class HostArraysTest(absltest.TestCase):

  def test_host_to_global_and_back(self):
    mesh = jax.make_mesh((jax.device_count(),), ("data",),
                         axis_types=(jax.sharding.AxisType.Auto,))
    sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(
        "data"))
    batch = {"ids": np.arange(8 * 3, dtype=np.int32).reshape(8, 3),
             "mask": np.ones((8, 2), np.int32), "weight": np.float32(2.0)}
    out = distributed.host_to_global(batch, sharding)
    self.assertEqual(out["ids"].sharding, sharding)
    self.assertLen(out["ids"].addressable_shards, jax.device_count())
    back = distributed.to_host(
        {**out, "key": jax.random.key(3), "step": 7})
    np.testing.assert_array_equal(back["ids"], batch["ids"])
    np.testing.assert_array_equal(back["mask"], batch["mask"])
    self.assertEqual(back["weight"], 2.0)
    self.assertIsInstance(back["ids"], np.ndarray)
    np.testing.assert_array_equal(jax.random.key_data(back["key"]),
                                  jax.random.key_data(jax.random.key(3)))
    self.assertEqual(back["step"], 7)


if __name__ == "__main__":
  absltest.main()
