"""Multi-process (multi-host) setup and host <-> global array helpers.

JAX runs one Python process per host (or per GPU); every process runs the
same program on the same inputs and owns only its *addressable* devices.
`jax.distributed.initialize` connects the processes through a coordinator
service; after it, `jax.devices()` lists the devices of all processes and a
`Mesh` over them spans every host
(https://docs.jax.dev/en/latest/multi_process.html).

* `initialize(...)`: connects the processes, from arguments or the
  `LOWRANK_COORDINATOR` / `LOWRANK_NUM_PROCESSES` / `LOWRANK_PROCESS_ID` /
  `LOWRANK_LOCAL_DEVICE_IDS` environment variables. With one process (the
  default) it does nothing. `coordinator_address="auto"` lets JAX detect the
  cluster (Cloud TPU pod slices, SLURM, Open MPI, Kubernetes TPU jobs), where
  every argument is read from the environment JAX knows. On CPU, processes
  exchange collectives through gloo (JAX's default
  `jax_cpu_collectives_implementation`), set here if it is unset.
* `host_to_global(tree, sharding)`: a host batch that every process holds
  *in full* (the same numpy arrays everywhere, e.g. from a seeded sampler)
  becomes global `jax.Array`s; each process places only the slices its own
  devices hold (`jax.make_array_from_callback`), so no data crosses hosts.
* `to_host(tree)`: global arrays back to full numpy arrays on every process
  (an all-gather across processes where an array is not fully addressable).
* `is_main_process()`, `barrier(name)`: process 0 writes files; the others
  wait where they must.

Single-process programs go through the same code paths, which reduce to
`jax.device_put` / `np.asarray`, so results do not change.

Example (2 processes on one machine, 4 fake CPU devices each):

  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    python -m experiments.finetune_retriever --workdir=/tmp/w \
      --config=experiments/configs/finetune_retriever.py:smoke \
      --coordinator_address=127.0.0.1:12345 --num_processes=2 --process_id=0
  # ... and the same with --process_id=1 in a second shell.
"""

from collections.abc import Sequence
import os
from typing import Any

import jax
from jax.experimental import multihost_utils
import numpy as np

P = jax.sharding.PartitionSpec
ENV_COORDINATOR = "LOWRANK_COORDINATOR"
ENV_NUM_PROCESSES = "LOWRANK_NUM_PROCESSES"
ENV_PROCESS_ID = "LOWRANK_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "LOWRANK_LOCAL_DEVICE_IDS"
AUTO = "auto"


def _env_int(name: str) -> int | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(
        f"Environment variable {name} must be an integer; found {value!r}."
    ) from None


def _env_ids(name: str) -> list[int] | None:
  value = os.environ.get(name, "").strip()
  if not value:
    return None
  try:
    return [int(v) for v in value.split(",") if v.strip()]
  except ValueError:
    raise ValueError(
        f"Environment variable {name} must be comma-separated integers; "
        f"found {value!r}."
    ) from None


def initialize(
    coordinator_address: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    local_device_ids: int | Sequence[int] | None = None,
) -> bool:
  """Connects this process to the others (`jax.distributed.initialize`).

  Call it first, before anything creates a JAX array or lists devices. An
  argument left `None` is read from its environment variable
  (`LOWRANK_COORDINATOR`, `LOWRANK_NUM_PROCESSES`, `LOWRANK_PROCESS_ID`,
  `LOWRANK_LOCAL_DEVICE_IDS`, the last comma-separated).

  * Nothing given, or `num_processes == 1`: a no-op (single process).
  * `coordinator_address="auto"`: JAX detects the cluster (TPU pod slice,
    SLURM, Open MPI, ...) and fills in whatever was not given.
  * Otherwise `coordinator_address` (`"host:port"` of process 0),
    `num_processes` and `process_id` are all required.

  Calling it again after a successful initialization does nothing.

  Args:
    coordinator_address: `"host:port"` where process 0 runs the coordinator
      (every process passes the same), or `"auto"`.
    num_processes: Total number of processes.
    process_id: This process's index in `[0, num_processes)`.
    local_device_ids: Restricts this process to these local devices (e.g.
      one GPU per process).

  Returns:
    True if JAX runs distributed after the call, False for a single process.

  Raises:
    ValueError: On a partial or inconsistent specification (the message
      says which value is missing or out of range).
  """
  if coordinator_address is None:
    coordinator_address = os.environ.get(ENV_COORDINATOR, "").strip() or None
  if num_processes is None:
    num_processes = _env_int(ENV_NUM_PROCESSES)
  if process_id is None:
    process_id = _env_int(ENV_PROCESS_ID)
  if local_device_ids is None:
    local_device_ids = _env_ids(ENV_LOCAL_DEVICE_IDS)
  if jax.distributed.is_initialized():
    return True
  if num_processes is not None and num_processes < 1:
    raise ValueError(f"num_processes must be >= 1; got {num_processes}.")
  if coordinator_address != AUTO:
    if num_processes is None or num_processes == 1:
      if coordinator_address is not None and num_processes is None:
        raise ValueError(
            f"coordinator_address={coordinator_address!r} was given without "
            "num_processes; pass both (and process_id), or 'auto'."
        )
      if process_id not in (None, 0):
        raise ValueError(
            f"process_id must be 0 for a single process; got {process_id}."
        )
      return False
    if coordinator_address is None:
      raise ValueError(
          f"num_processes={num_processes} needs coordinator_address "
          "('host:port' of process 0, or 'auto' on TPU pods / SLURM)."
      )
    if process_id is None or not 0 <= process_id < num_processes:
      raise ValueError(
          f"process_id must be in [0, {num_processes}); got {process_id}."
      )
  if not jax.config.values.get("jax_cpu_collectives_implementation"):
    # CPU processes need a collectives backend to talk to each other.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
      coordinator_address=(
          None if coordinator_address == AUTO else coordinator_address
      ),
      num_processes=num_processes,
      process_id=process_id,
      local_device_ids=local_device_ids,
  )
  return True


def is_main_process() -> bool:
  """True on process 0 (the one that writes files and prints)."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Blocks until every process reaches `barrier(name)`; no-op for one."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def host_to_global(tree: Any, sharding: jax.sharding.Sharding) -> Any:
  """Host arrays that every process holds in full -> global `jax.Array`s.

  Every process must pass the same values (a seeded sampler gives that for
  free); each one places only the slices of its own devices, so this works
  for any number of processes. With one process it is `jax.device_put`.

  Args:
    tree: A pytree of numpy arrays (or scalars; a list is a pytree node,
      not an array).
    sharding: The sharding of every array leaf (e.g. a `NamedSharding` over
      the batch axis of a global mesh); scalars are replicated.

  Returns:
    The same pytree of `jax.Array`s with `sharding`.
  """
  replicated = jax.sharding.NamedSharding(sharding.mesh, P()) if isinstance(
      sharding, jax.sharding.NamedSharding) else sharding

  def put(x):
    x = np.asarray(x)
    target = replicated if x.ndim == 0 else sharding
    if jax.process_count() == 1:
      return jax.device_put(x, target)
    return jax.make_array_from_callback(x.shape, target, lambda i: x[i])
  return jax.tree.map(put, tree)


def to_host(tree: Any) -> Any:
  """Global `jax.Array`s -> full numpy arrays, on every process.

  Arrays whose data are all on this process's devices (and fully
  replicated ones) are read locally; the others are all-gathered across
  processes, so every process must call this with the same tree. Typed PRNG
  keys are gathered as key data and re-wrapped. Non-array leaves pass
  through.

  Args:
    tree: A pytree.

  Returns:
    The pytree with `jax.Array` leaves replaced by numpy arrays (typed PRNG
    keys stay typed keys, on this process's default device).
  """
  def get(x):
    if not isinstance(x, jax.Array):
      return x
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(x)
      return jax.random.wrap_key_data(get(jax.random.key_data(x)), impl=impl)
    if x.is_fully_addressable or x.is_fully_replicated:
      return np.asarray(x)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return jax.tree.map(get, tree)
