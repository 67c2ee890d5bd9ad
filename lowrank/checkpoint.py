"""Orbax checkpoints: whole train state (resume), atomic saves.

Everything here wraps the Orbax v0 `CheckpointManager` with
`StandardSave` / `StandardRestore` against an *abstract* target, so restored
arrays come back with the target's shapes, dtypes and shardings (a different
sharding than the one saved is fine: Orbax reshards on read).

* `Checkpointer` saves and restores a whole train state: any pure pytree
  (dicts, `nnx.as_pure` states, optax `NamedTuple` states, `int32` step
  counters, typed PRNG keys). Rerunning the same command resumes:
  `state, step = ckpt.restore_or_init(init_state)`.
* Adapter files (adapters only, any method, or Hugging Face PEFT's files)
  are `lowrank.adapters.save_adapters` / `load_adapters`, a layer above.

Typed PRNG keys (`jax.random.key(0)`) are stored as their raw key data
(`jax.random.key_data`) and re-wrapped with the target's implementation on
restore, so callers pass and get back typed keys and the files hold plain
`uint32` arrays that any Orbax version reads.

Atomicity: Orbax writes a step into `<step>.orbax-checkpoint-tmp` and renames
it to `<step>` only once every byte is on disk, so a save killed at any point
(SIGKILL included) leaves the last complete step intact. Such unfinished
directories are never listed as steps; a writing `Checkpointer` deletes them
when it opens the directory (one writer per directory; readers pass
`read_only=True`).

Loading never executes code: Orbax stores arrays with TensorStore (OCDBT) and
metadata as JSON; no pickle is involved.

Example:

  with checkpoint.Checkpointer(workdir / "checkpoints") as ckpt:
    state, start = ckpt.restore_or_init(init_state)
    for step in range(start, num_steps):
      state = train_step(state, next(batches))
      ckpt.save(step + 1, state)
"""

from collections.abc import Callable, Mapping
import math
import os
from typing import Any

from etils import epath
from flax import nnx
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

PyTree = Any
_P = jax.sharding.PartitionSpec
_NamedSharding = jax.sharding.NamedSharding
# Suffix Orbax gives a step directory until the save is finalised by rename.
_TMP_SUFFIX = ocp.path.atomicity.TMP_DIR_SUFFIX
# Orbax's name for the single item of a step (`<step>/default/`).
_ITEM = "default"


def _is_prng_key(x: Any) -> bool:
  dtype = getattr(x, "dtype", None)
  return dtype is not None and jax.dtypes.issubdtype(
      dtype, jax.dtypes.prng_key
  )


def _check_pure(tree: PyTree, what: str) -> None:
  is_var = lambda x: isinstance(x, nnx.Variable)
  if any(is_var(x) for x in jax.tree.leaves(tree, is_leaf=is_var)):
    raise TypeError(
        f"The {what} holds `nnx.Variable`s; pass a pure pytree "
        "(`nnx.as_pure(state)` or `nnx.to_pure_dict(state)`)."
    )


def _is_empty(x: Any) -> bool:
  """A zero-size array (Orbax refuses to save those)."""
  shape = getattr(x, "shape", None)
  return shape is not None and math.prod(shape) == 0


def _to_savable(tree: PyTree) -> PyTree:
  """Typed PRNG keys → raw `uint32` key data; zero-size arrays → None.

  Zero-size arrays (e.g. the placeholder projector of a GaLore leaf that is
  not projected) carry no data; they are rebuilt from the restore target.
  """
  def conv(x):
    if _is_empty(x):
      return None
    return jax.random.key_data(x) if _is_prng_key(x) else x
  return jax.tree.map(conv, tree)


def _abstract_key_data(key: Any) -> tuple[str, jax.ShapeDtypeStruct]:
  """(implementation, abstract key data) of a typed key array or its SDS."""
  if isinstance(key, jax.Array):  # Concrete: key_data keeps its sharding.
    return (
        jax.random.key_impl(key),
        ocp.utils.to_shape_dtype_struct(jax.random.key_data(key)),
    )
  # Abstract (`jax.ShapeDtypeStruct` of a key dtype): `key_impl` accepts
  # only arrays, so read the implementation while tracing.
  impl = []

  def _data(k):
    impl.append(jax.random.key_impl(k))
    return jax.random.key_data(k)

  data = jax.eval_shape(_data, key)
  sharding = getattr(key, "sharding", None)
  if isinstance(sharding, _NamedSharding):
    # Key data has trailing `[*key_shape]` dims, never sharded.
    spec = tuple(sharding.spec)
    spec += (None,) * (data.ndim - len(spec))
    sharding = _NamedSharding(sharding.mesh, _P(*spec))
  elif sharding is not None and not isinstance(
      sharding, jax.sharding.SingleDeviceSharding
  ):
    sharding = None  # Rank-specific sharding we cannot extend: let Orbax pick.
  return impl[0], jax.ShapeDtypeStruct(
      data.shape, data.dtype, sharding=sharding
  )


def _abstract_target(target: PyTree) -> tuple[PyTree, list[str | None]]:
  """Restore target (shape, dtype, sharding) and per-leaf PRNG impls."""
  leaves, treedef = jax.tree.flatten(target)
  abstract, impls = [], []
  for x in leaves:
    if _is_empty(x):
      abstract.append(None)
      impls.append(None)
    elif _is_prng_key(x):
      impl, data = _abstract_key_data(x)
      abstract.append(data)
      impls.append(impl)
    else:
      abstract.append(ocp.utils.to_shape_dtype_struct(x))
      impls.append(None)
  return treedef.unflatten(abstract), impls


def _rewrap_keys(
    restored: PyTree, target: PyTree, impls: list[str | None]
) -> PyTree:
  treedef = jax.tree.structure(target)
  leaves = treedef.flatten_up_to(restored)
  out = []
  for x, t, impl in zip(leaves, treedef.flatten_up_to(target), impls):
    if _is_empty(t):  # Saved as None: rebuild the empty array.
      x = jnp.zeros(t.shape, t.dtype)
      sharding = getattr(t, "sharding", None)
      if sharding is not None:
        x = jax.device_put(x, sharding)
    elif impl is not None:
      x = jax.random.wrap_key_data(x, impl=impl)
    out.append(x)
  return treedef.unflatten(out)


def _to_json_scalar(x: Any) -> Any:
  """Metrics are written as JSON: turn 0-d arrays into Python numbers."""
  if isinstance(x, (jax.Array, np.ndarray, np.generic)):
    return np.asarray(x).item()
  return x


def _remove_unfinalized(directory: epath.Path) -> list[str]:
  """Deletes `*.orbax-checkpoint-tmp*` entries left by interrupted saves.

  Done synchronously (Orbax's own `cleanup_tmp_directories` runs in a
  background thread that only `save` waits for).

  Returns:
    The names of the removed entries.
  """
  if jax.process_index() != 0 or not directory.exists():
    return []
  removed = []
  for path in directory.iterdir():
    if _TMP_SUFFIX in path.name:
      if path.is_dir():
        path.rmtree()
      else:
        path.unlink()
      removed.append(path.name)
  return removed


class Checkpointer:
  """Saves and restores a whole train state under `directory/<step>`.

  A context manager: leaving it waits for pending (async) saves and closes
  the underlying `ocp.CheckpointManager`.

  Attributes:
    directory: The checkpoint root, an `epath.Path`.
    manager: The wrapped `ocp.CheckpointManager` (escape hatch).
  """

  def __init__(
      self,
      directory: epath.PathLike,
      *,
      max_to_keep: int | None = 2,
      save_interval_steps: int = 1,
      best_fn: Callable[[Mapping[str, Any]], float] | None = None,
      best_mode: str = "min",
      keep_latest: bool = True,
      async_save: bool = True,
      read_only: bool = False,
  ):
    """Opens (and creates) a checkpoint directory.

    Args:
      directory: Root directory; each step is a subdirectory `<step>`.
      max_to_keep: How many checkpoints to keep (`None`: all). With
        `best_fn`, how many of the best to keep.
      save_interval_steps: `save` only writes steps that are multiples of
        this (and the first save), unless `force=True`.
      best_fn: Maps the `metrics` given to `save` to a scalar; when set, the
        `max_to_keep` best checkpoints are kept instead of the latest ones.
      best_mode: `"min"` (lower is better, e.g. a loss) or `"max"`.
      keep_latest: With `best_fn`, also keep the most recent checkpoint, so
        that resuming never goes back in time. Ignored without `best_fn`.
      async_save: Write in a background thread; `save` returns once the
        arrays are copied to host memory.
      read_only: Never write or delete anything (to inspect or restore a
        directory that a writer may be using).

    Raises:
      ValueError: On a `best_mode` other than `"min"` / `"max"`.
    """
    if best_mode not in ("min", "max"):
      raise ValueError(f"best_mode must be 'min' or 'max'; got {best_mode!r}.")
    if "://" not in str(directory):  # Orbax needs absolute local paths.
      directory = os.path.abspath(os.fspath(directory))
    self.directory = epath.Path(directory)
    if not read_only:
      # Orbax's step listing already skips these; removing them keeps a
      # re-save of the same step from meeting a half-written tmp directory.
      _remove_unfinalized(self.directory)
      if jax.process_count() > 1:  # Others wait until process 0 cleaned up.
        multihost_utils.sync_global_devices(
            f"lowrank.Checkpointer({self.directory})")
    policies = ocp.checkpoint_managers
    if best_fn is None:
      preservation = policies.LatestN(n=max_to_keep)
    else:
      preservation = policies.BestN(
          get_metric_fn=best_fn,
          reverse=best_mode == "min",  # Keeps the tail of the sorted list.
          n=max_to_keep,
      )
      if keep_latest:
        preservation = policies.AnyPreservationPolicy(
            [preservation, policies.LatestN(n=1)]
        )
    options = ocp.CheckpointManagerOptions(
        save_interval_steps=0 if read_only else save_interval_steps,
        # `best_fn` must also be in the options: Orbax writes `metrics` only
        # when it is set. `max_to_keep` must not be (the policy replaces it).
        best_fn=best_fn,
        best_mode=best_mode,
        preservation_policy=preservation,
        enable_async_checkpointing=async_save,
        read_only=read_only,
        create=not read_only,
    )
    # Registering the handler up front lets a fresh manager read
    # `item_metadata` (shapes) before any save or restore.
    registry = ocp.handlers.DefaultCheckpointHandlerRegistry()
    for args in (ocp.args.StandardSave, ocp.args.StandardRestore):
      registry.add(_ITEM, args, ocp.StandardCheckpointHandler)
    self.manager = ocp.CheckpointManager(
        self.directory, options=options, handler_registry=registry
    )

  def __enter__(self) -> "Checkpointer":
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def save(
      self,
      step: int,
      state: PyTree,
      *,
      metrics: Mapping[str, Any] | None = None,
      force: bool = False,
  ) -> bool:
    """Saves `state` as checkpoint `step` (asynchronously by default).

    Args:
      step: Step number; by convention the number of completed train steps.
      state: A pure pytree of arrays (typed PRNG keys allowed).
      metrics: JSON-able scalars (0-d arrays are converted) for `best_fn`.
      force: Save even if `step` is not on `save_interval_steps`.

    Returns:
      Whether a checkpoint was started for `step`.

    Raises:
      TypeError: If `state` holds `nnx.Variable`s (not a pure pytree).
    """
    _check_pure(state, "state")
    if metrics is not None:
      metrics = jax.tree.map(_to_json_scalar, dict(metrics))
    return self.manager.save(
        int(step),
        args=ocp.args.StandardSave(_to_savable(state)),
        metrics=metrics,
        force=force,
    )

  def latest_step(self) -> int | None:
    """The last finalised step, or `None` if there is none."""
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    """All finalised steps kept on disk, ascending."""
    return sorted(self.manager.all_steps())

  def best_step(self) -> int | None:
    """The best step by `best_fn` (the latest one without `best_fn`)."""
    return self.manager.best_step()

  def restore(self, step: int | None, target: PyTree) -> PyTree:
    """Restores checkpoint `step` (`None`: the latest) into `target`'s layout.

    Args:
      step: Step to restore, or `None` for the latest one.
      target: A pytree of arrays or `jax.ShapeDtypeStruct`s (typed-key
        dtypes allowed) with the structure of the saved state. Only its
        shapes, dtypes and shardings are used; a sharding that differs from
        the saved one is fine.

    Returns:
      The restored state, laid out like `target` (typed keys re-wrapped).

    Raises:
      FileNotFoundError: If there is no checkpoint (`step=None`) or no
        checkpoint `step`; the message lists the steps on disk.
      TypeError: If `target` holds `nnx.Variable`s.
      ValueError: If `target` does not fit the checkpoint (the message names
        every parameter path whose shape differs, with both shapes, or the
        paths only on one side), or the step directory is incomplete or
        corrupt (the message names it and how to recover).
    """
    _check_pure(target, "target")
    if step is None:
      step = self.latest_step()
      if step is None:
        raise FileNotFoundError(f"No checkpoint in {self.directory}.")
    step = int(step)
    steps = self.all_steps()
    if step not in steps:
      raise FileNotFoundError(
          f"No checkpoint for step {step} in {self.directory}; steps on "
          f"disk: {steps or 'none'}."
      )
    abstract, impls = _abstract_target(target)
    try:
      restored = self.manager.restore(
          step, args=ocp.args.StandardRestore(abstract)
      )
    except Exception as e:  # pylint: disable=broad-except
      raise self._restore_error(step, abstract, steps, e) from e
    return _rewrap_keys(restored, target, impls)

  def _restore_error(
      self, step: int, abstract: PyTree, steps: list[int], error: Exception
  ) -> Exception:
    """A clear error for a failed restore of `step` (see `restore`)."""
    step_dir = self.directory / str(step)
    earlier = [s for s in steps if s < step]
    try:
      meta = self.manager.item_metadata(step)
      saved = _shapes_by_path(getattr(meta, "tree", meta))
    except Exception:  # pylint: disable=broad-except
      saved = None  # The metadata itself is unreadable: corrupt.
    if saved:
      wanted = _shapes_by_path(abstract)
      problems = [
          p for p in _shape_problems(saved, wanted, "checkpoint", "target")
          if p.startswith("shape mismatch")
      ]
      if problems:
        return ValueError(
            f"The restore target does not fit checkpoint {step_dir}: "
            + "; ".join(problems[:20])
            + (f" (+{len(problems) - 20} more)" if len(problems) > 20
               else "")
            + ". Build the target with the configuration the checkpoint "
            "was saved with, or start from a fresh checkpoint directory."
        )
      if "tree structures do not match" in str(error):
        return ValueError(
            f"The restore target does not fit checkpoint {step_dir}: "
            f"{error}"
        )
    if earlier:
      fix = (
          f"delete {step_dir} to resume from step {earlier[-1]}, or restore "
          f"an earlier step explicitly (restore(step={earlier[-1]}, ...))"
      )
    else:
      fix = (f"delete {step_dir} (there is no earlier step; training will "
             "start from scratch)")
    reason = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return ValueError(
        f"Checkpoint step {step} in {self.directory} is incomplete or "
        f"corrupt ({type(error).__name__}: {reason[:400]}). It was probably "
        f"damaged after it was written (a finished save is atomic). To "
        f"recover, {fix}. Steps on disk: {steps}."
    )

  def restore_or_init(self, init_state: PyTree) -> tuple[PyTree, int]:
    """The latest checkpoint restored into `init_state`'s layout, or init.

    Args:
      init_state: The freshly initialised state (arrays carrying the desired
        shardings). Returned as is when there is no checkpoint.

    Returns:
      `(state, step)`: the restored state and its step, or
      `(init_state, 0)` when the directory holds no finalised checkpoint.
    """
    step = self.latest_step()
    if step is None:
      return init_state, 0
    return self.restore(step, init_state), step

  def wait_until_finished(self) -> None:
    """Blocks until pending async saves are finalised on disk."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits for pending saves and releases the manager's resources."""
    self.manager.wait_until_finished()
    self.manager.close()


def _path_str(path) -> str:
  parts = []
  for k in path:
    for attr in ("key", "idx", "name"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return "/".join(parts)


def _shapes_by_path(tree: PyTree) -> dict[str, tuple[int, ...]]:
  leaves = jax.tree_util.tree_leaves_with_path(
      tree, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype")
  )
  return {_path_str(p): tuple(x.shape) for p, x in leaves}


def _shape_problems(
    saved: Mapping[str, tuple[int, ...]],
    wanted: Mapping[str, tuple[int, ...]],
    saved_name: str,
    wanted_name: str,
) -> list[str]:
  """Paths only on one side, and per-path shape mismatches, as sentences."""
  problems = []
  missing = sorted(set(wanted) - set(saved))
  extra = sorted(set(saved) - set(wanted))
  if missing:
    problems.append(f"missing from the {saved_name}: {missing[:20]}")
  if extra:
    problems.append(
        f"in the {saved_name} but not in the {wanted_name}: {extra[:20]}")
  for path in sorted(set(saved) & set(wanted)):
    if saved[path] != wanted[path]:
      problems.append(
          f"shape mismatch at {path!r}: {saved_name} {saved[path]} vs "
          f"{wanted_name} {wanted[path]}"
      )
  return problems
