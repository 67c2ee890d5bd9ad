"""Counting JAX compilations in tests (shared by readme_test, recompile_test).

Not a test module (pytest collects `*_test.py` only); tests/ is on sys.path
under pytest's rootdir-based import mode.
"""

import contextlib
import logging

import jax


class _CompileCounter(logging.Handler):
  """Counts JAX's "Compiling <name>" log lines for one function name."""

  def __init__(self, name: str):
    super().__init__()
    self.target = f"({name})"
    self.count = 0

  def emit(self, record):
    message = record.getMessage()
    if message.startswith("Compiling ") and self.target in message:
      self.count += 1


@contextlib.contextmanager
def count_compiles(name: str):
  """Yields a counter of compilations of jitted functions called `name`."""
  counter = _CompileCounter(name)
  logger = logging.getLogger("jax")
  logger.addHandler(counter)
  try:
    with jax.log_compiles(True):
      yield counter
  finally:
    logger.removeHandler(counter)
