"""pytest setup for all tests; runs before any test module imports JAX."""

import os
import subprocess
import sys

from absl import flags

# The suite compiles far more than it runs (tiny shapes, many programs, and
# every eager op is a compile of its own), so it asks XLA:CPU for fast
# compiles:
# - LLVM at -O0 without its expensive passes: 40% less CPU over a sample of
#   files (compressing and VeRA tests: 190 s -> 114 s user);
# - the classic elemental emitters instead of the MLIR fusion emitters: a
#   further 31-43% less over galore, sltrain and ranking-loss tests
#   (154 -> 107 s and 158 -> 91 s user, two interleaved pairs).
# Buffer assignment, hence every compiled memory number a test asserts, does
# not depend on them. Benchmarks and binaries keep XLA's defaults.
_FAST_COMPILE_FLAGS = ("--xla_backend_optimization_level=0",
                       "--xla_llvm_disable_expensive_passes=true",
                       "--xla_cpu_use_fusion_emitters=false")


def _accepted(flag_list: list[str]) -> bool:
  """Whether this jaxlib starts with these XLA_FLAGS (an unknown flag is
  fatal to XLA, and flags come and go between releases)."""
  env = dict(os.environ, XLA_FLAGS=" ".join(flag_list), JAX_PLATFORMS="cpu")
  try:
    return subprocess.run(
        [sys.executable, "-c", "import jax; jax.devices()"], env=env,
        capture_output=True, timeout=300, check=False).returncode == 0
  except subprocess.TimeoutExpired:
    return False


def _fast_compile_flags() -> str:
  """The fast-compile flags this jaxlib accepts, probed once per run.

  The result goes to the environment (LOWRANK_TEST_FAST_XLA_FLAGS), where
  the xdist workers, and the tests that start processes with XLA flags of
  their own (notebooks, the wheel, multi-process runs), read it.
  """
  known = os.environ.get("LOWRANK_TEST_FAST_XLA_FLAGS")
  if known is None:
    kept = list(_FAST_COMPILE_FLAGS)
    if not _accepted(kept):
      kept = [f for f in _FAST_COMPILE_FLAGS if _accepted([f])]
      print(f"tests/conftest.py: this jaxlib refuses the XLA flags "
            f"{sorted(set(_FAST_COMPILE_FLAGS) - set(kept))}; the suite runs "
            f"without them (slower compiles).", file=sys.stderr)
    known = " ".join(kept)
    os.environ["LOWRANK_TEST_FAST_XLA_FLAGS"] = known
  return known


# 8 fake CPU devices, so sharding tests run anywhere, and the fast compiles.
# Must precede JAX init. The processes the tests start inherit them. A given
# XLA_FLAGS replaces all of this.
if "XLA_FLAGS" not in os.environ:
  os.environ["XLA_FLAGS"] = ("--xla_force_host_platform_device_count=8 " +
                             _fast_compile_flags()).strip()
else:
  os.environ.setdefault("LOWRANK_TEST_FAST_XLA_FLAGS", "")
os.environ.setdefault("JAX_PLATFORMS", "cpu")


def _compilation_cache_dir() -> str | None:
  """`<venv>/jax-cache` when pytest runs in a venv (`make test`'s .venv).

  So `make clean` drops it with the venv, a clean clone starts empty, and a
  second run reads what the first compiled. Outside a venv, no cache: the
  interpreter's prefix may be a system directory.
  """
  if sys.prefix == sys.base_prefix:
    return None
  return os.path.join(sys.prefix, "jax-cache")


# JAX's persistent compilation cache, shared by the xdist workers and, through
# the environment, by the processes the tests start (binaries, notebook
# kernels, the wheel's venv). Within one run it serves the programs that
# several test modules compile (each module ends with `jax.clear_caches()`).
# The cache is looked up after tracing and lowering, where JAX logs
# "Compiling <name>", so tests/jax_compiles.py still counts every compile.
# Every entry is written (JAX's default skips compiles under 1 s, most of a
# test suite's). An empty JAX_COMPILATION_CACHE_DIR turns the cache off.
if _compilation_cache_dir() is not None:
  os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _compilation_cache_dir())
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
# absltest helpers (create_tempdir, ...) read flags that pytest never parses.
flags.FLAGS.mark_as_parsed()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# Fail loudly on implicit rank broadcasting (as optimistix's conftest does).
# Not `jax_numpy_dtype_promotion="strict"`: optax itself (scale_by_adam's
# bias correction) relies on standard promotion.
jax.config.update("jax_numpy_rank_promotion", "raise")
# The environment is read when JAX is first imported; a plugin may have
# imported it before this file ran.
if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
  jax.config.update("jax_compilation_cache_dir",
                    os.environ["JAX_COMPILATION_CACHE_DIR"])
  jax.config.update(
      "jax_persistent_cache_min_compile_time_secs",
      float(os.environ.get("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", 0)))
  jax.config.update(
      "jax_persistent_cache_min_entry_size_bytes",
      int(os.environ.get("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", -1)))


import gc  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order

import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order


@pytest.fixture(autouse=True, scope="module")
def _release_jax_memory_after_module():
  """Drops compiled executables and dead arrays after each test module.

  An xdist worker runs many modules in one process; without this, JAX's
  compilation caches and arrays kept alive by them grew one worker past
  10 GiB and the OOM killer took it on a 24 GiB machine.
  """
  yield
  jax.clear_caches()
  gc.collect()


# Files that take minutes, longest first. `make test` runs `--dist loadfile`:
# xdist hands whole files to its workers in collection order, and these would
# otherwise come late (tests/wheel_test.py sorts last), leaving one worker
# idle while the other runs them. Moving them to the front is longest-first
# scheduling; the rest keeps its order.
_LONG_FILES = (
    "tests/wheel_test.py",
    "tests/experiments/",
    "tests/notebooks_test.py",
    "tests/distributed_test.py",
    # Unit-test files of half a minute or more (the suite's last 3% of
    # tests took over two minutes when they came last).
    "tests/adapters/quantized_test.py",
    "tests/models/llama_test.py",
    "tests/models/bert_test.py",
    "tests/optim/contract_test.py",
    "tests/spectral/sst_test.py",
    "tests/optim/galore_test.py",
    "tests/retrieval/colbert_test.py",
    "tests/spectral/compress_test.py",
    "tests/adapters/random_basis_test.py",
)


def pytest_collection_modifyitems(config, items):
  del config  # Unused.

  def rank(item):
    for i, prefix in enumerate(_LONG_FILES):
      if item.nodeid.startswith(prefix):
        return i
    return len(_LONG_FILES)

  items.sort(key=rank)  # Stable: the order within each group is kept.
