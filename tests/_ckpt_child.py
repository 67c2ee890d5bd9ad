"""Child process for `checkpoint_test`: SIGKILLs itself in the middle of a save.

Usage: python tests/_ckpt_child.py DIRECTORY

Saves step 1 (small) and waits for it, then starts an async save of step 2
holding a 200 MB array and kills itself with SIGKILL once the step-2 tmp
directory holds more than 1 MiB of data but is not yet renamed, i.e. while
the write is provably in flight. Exit codes: killed (-9) is the expected
outcome; 3 means the save finished before the kill could land.
"""

import os
import signal
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from lowrank import checkpoint

_BIG = 50_000_000  # float32 elements: 200 MB.
_TMP = ocp.path.atomicity.TMP_DIR_SUFFIX  # Orbax's unfinished-save suffix.


def small_state():
  """The step-1 state; the parent rebuilds it to compare."""
  return {
      "w": jnp.arange(12, dtype=jnp.float32).reshape(3, 4),
      "step": jnp.asarray(1, jnp.int32),
      "rng": jax.random.key(7),
  }


def _tmp_bytes(directory: str, prefix: str) -> int:
  total = 0
  for name in os.listdir(directory):
    if name.startswith(prefix) and _TMP in name:
      for root, _, files in os.walk(os.path.join(directory, name)):
        for f in files:
          try:
            total += os.path.getsize(os.path.join(root, f))
          except FileNotFoundError:  # Renamed under our feet.
            pass
  return total


def main(directory: str) -> int:
  ckpt = checkpoint.Checkpointer(directory, async_save=True)
  ckpt.save(1, small_state())
  ckpt.wait_until_finished()
  # Random bits: incompressible, so the write takes a while.
  big = np.random.default_rng(0).integers(0, 2**32, _BIG, dtype=np.uint32)
  state = small_state() | {"big": jnp.asarray(big.view(np.float32))}
  del big
  print("saving 2", flush=True)
  ckpt.save(2, state)  # Returns once the arrays are copied to host.
  deadline = time.monotonic() + 60
  while time.monotonic() < deadline:
    if os.path.exists(os.path.join(directory, "2")):
      print("too late: step 2 was finalised before the kill", flush=True)
      return 3
    written = _tmp_bytes(directory, "2.")
    if written > 1 << 20:
      print(f"killing with {written} bytes of step 2 written", flush=True)
      os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(0.0005)
  return 4


if __name__ == "__main__":
  sys.exit(main(sys.argv[1]))
