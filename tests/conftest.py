"""pytest setup for all tests; runs before any test module imports JAX."""

import os

from absl import flags

# 8 fake CPU devices, so sharding tests run anywhere. Must precede JAX init.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# absltest helpers (create_tempdir, ...) read flags that pytest never parses.
flags.FLAGS.mark_as_parsed()

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

# Fail loudly on implicit rank broadcasting (as optimistix's conftest does).
# Not `jax_numpy_dtype_promotion="strict"`: optax itself (scale_by_adam's
# bias correction) relies on standard promotion.
jax.config.update("jax_numpy_rank_promotion", "raise")


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
