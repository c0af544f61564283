"""FastPersistCheckpointableHandler: FastPersist under Orbax's v1 API.

    import orbax.checkpoint as ocp
    from fastpersist_jax import FastPersistCheckpointableHandler

    registry = checkpointables_registry()   # Orbax's handlers, "state" through FastPersist
    with ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
        registry=registry)):
      with ocp.v1.training.Checkpointer(directory) as ckptr:
        ckptr.save_pytree(step, state)
        state = ckptr.load_pytree(step, abstract_state)

Orbax v1 constructs handlers itself (default-constructed, several times per
save), so an instance holds nothing: every instance with the same options and
primary host shares one FastPersistHandler, hence one engine and one staging
pool, created at the first save or load. `save` blocks for the snapshot only
and returns an awaitable that completes once the item is durable (data,
manifests and metadata synced, every process's part in), which Orbax awaits
before it commits the step.
"""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any, Awaitable

import jax
import numpy as np
import orbax.checkpoint as ocp

from fastpersist_jax import orbax_internals, plan, restore_plan, treepath
from fastpersist_jax import save as save_lib
from fastpersist_jax.errors import SaveError
from fastpersist_jax.handler import FastPersistHandler, FastPersistRestore, FastPersistSave
from fastpersist_jax.options import FastPersistOptions

_shared: dict[tuple[FastPersistOptions, int | None], FastPersistHandler] = {}
_shared_lock = threading.Lock()


class FastPersistCheckpointableHandler:
  """An Orbax v1 `CheckpointableHandler` for pytrees of (sharded) jax.Arrays.

  Implements `ocp.v1.handlers.CheckpointableHandler` (a Protocol): `save`,
  `load`, `metadata`, `is_handleable`, `is_abstract_handleable`. The files
  it writes are FastPersistHandler's (FORMAT.md); a step saved through one
  API can be restored through the other.

  Options: Orbax constructs handlers without arguments, so to change them
  register a subclass that sets the class attribute `options`:

      class MyHandler(FastPersistCheckpointableHandler):
        options = FastPersistOptions(host_memory_limit=8 << 30)
  """

  options: FastPersistOptions | None = None

  def __init__(self, options: FastPersistOptions | None = None):
    """Cheap: allocates nothing (Orbax constructs handlers freely).

    Args:
      options: overrides the class attribute `options` (default:
        FastPersistOptions()).
    """
    self._options = options or type(self).options or FastPersistOptions()

  def _handler(self) -> FastPersistHandler:
    """The FastPersistHandler shared by every instance with these options
    and the active v1 Context's primary host and active processes (created
    on first use)."""
    primary_host, active_processes = v1_multiprocessing()
    key = (self._options, primary_host, active_processes)
    with _shared_lock:
      handler = _shared.get(key)
      if handler is None:
        handler = FastPersistHandler(
            self._options,
            multiprocessing_options=ocp.options.MultiprocessingOptions(
                primary_host=primary_host,
                active_processes=set(active_processes) if active_processes else None))
        _shared[key] = handler
      return handler

  async def save(self, directory: Any, checkpointable: Any) -> Awaitable[None]:
    """Snapshots `checkpointable` and starts writing it into `directory`.

    Args:
      directory: an `ocp.v1` PathAwaitingCreation (the item's directory,
        which Orbax may create only after this returns).
      checkpointable: a pytree of jax.Arrays, numpy arrays and scalars,
        Python scalars and None. Array leaves are stored cast to the dtype
        the active Context's `array_options.saving` asks
        (`scoped_storage_options_creator`, else `storage_options.dtype`).

    Returns:
      An awaitable that completes when the item is durable; it raises
      SaveError if any process's part failed (CorruptCheckpointError if a
      process's manifest is missing).

    Raises:
      UnsupportedLeafError: a leaf cannot be saved (nothing is written).
      SaveError: the snapshot failed.
    """
    handler = self._handler()
    if _global_nbytes(checkpointable) > _pool_capacity(self._options):
      # Larger than the staging pool: the snapshot waits for writes to free
      # slabs, and writes need the directory, which Orbax creates in the
      # background (or, in ocp.v1's free functions, only when awaited here).
      # Bounded: if Orbax cannot create it, the save fails after
      # commit_timeout_s naming it, instead of after Orbax's 20 min; and it
      # fails through the awaitable, not here: an error raised by this
      # blocking part would leave Orbax's manager "saving" for good, and its
      # default save policy would then skip every later save.
      signals = orbax_internals.directory_signals()
      try:
        if signals is not None and orbax_internals.created_in_background(directory):
          # Orbax creates it in the background: poll, bounded and leaving no thread behind
          await asyncio.to_thread(save_lib.await_directory, os.fspath(directory.path),
                                  self._options.commit_timeout_s, threading.Event(), signals)
        else:   # (ocp.v1's free functions create it when awaited)
          await asyncio.wait_for(directory.await_creation(), self._options.commit_timeout_s)
      except asyncio.TimeoutError:
        return _SaveAwaitable([], handler, directory.path, error=SaveError(
            f"checkpoint directory {directory.path}: Orbax did not create it within "
            f"{self._options.commit_timeout_s:.0f} s (commit_timeout_s); nothing was written"))
      except Exception as e:  # pylint: disable=broad-except  (Orbax's creation failed, or timed out)
        return _SaveAwaitable([], handler, directory.path, error=e)
    args = FastPersistSave(checkpointable, save_args=v1_save_args(checkpointable))
    futures = await handler.async_save(directory.path, args=args) or []
    return _SaveAwaitable(futures, handler, directory.path)
  async def load(self, directory: Any, abstract_checkpointable: Any = None) -> Awaitable[Any]:
    """Starts restoring the item saved in `directory`.

    Args:
      directory: the item's directory (an `ocp.v1` Path).
      abstract_checkpointable: the target, as for FastPersistRestore: a pytree
        of jax.ShapeDtypeStruct (with `sharding`) or arrays, a sub-tree, or
        None to restore everything as saved. Orbax v1's abstract leaves
        restore as Orbax's PyTreeHandler does: NumpyShapeDtype as a numpy
        array, the types `int` / `float` as Python scalars of that type (where
        lossless), `...` (ocp.PLACEHOLDER) and None are not restored (they
        come back as they are). With the Context's
        `pytree_options.loading.partial_load`, target leaves the checkpoint
        lacks keep their value (FastPersistRestore(partial_restore=True)).

    Returns:
      An awaitable of the restored pytree; it raises CheckpointNotFoundError,
      CorruptCheckpointError / ChecksumMismatchError, or RestoreMismatchError.
    """
    handler = self._handler()

    async def restore() -> Any:
      return await asyncio.to_thread(handler.restore, directory, args=FastPersistRestore(
          abstract_checkpointable, partial_restore=partial_load))

    partial_load = bool(orbax_internals.v1_context().pytree_options.loading.partial_load)

    return restore()

  async def metadata(self, directory: Any) -> Any:
    """The saved item's metadata (FastPersistHandler.metadata): a
    TreeMetadata that maps like the saved pytree, with jax.ShapeDtypeStruct
    leaves and saved scalars as values. Raises CheckpointNotFoundError /
    CorruptCheckpointError."""
    return self._handler().metadata(directory)

  def is_handleable(self, checkpointable: Any) -> bool:
    """True if a save accepts `checkpointable` (plan.check_tree: leaves
    jax.Array, numpy array or scalar, Python scalar, None or empty node, of
    dtypes, key types and key names a checkpoint can hold)."""
    return _all_leaves(checkpointable, plan.check_tree)

  def is_abstract_handleable(self, abstract_checkpointable: Any) -> bool | None:
    """True if `abstract_checkpointable` can serve as a restore target, as
    FastPersistRestore accepts one (restore_plan.is_restore_target): leaves
    jax.ShapeDtypeStruct, arrays, Orbax v1's abstract leaves (NumpyShapeDtype,
    the types `int` / `float`), scalars, None, `...` and empty nodes."""
    return restore_plan.is_restore_target(abstract_checkpointable)

  @classmethod
  def close_shared(cls) -> None:
    """Waits for every save in flight through this API, then frees the shared
    staging pools (a later save allocates new ones). Raises nothing: a
    failed save's error went to its Orbax save response."""
    with _shared_lock:
      handlers = list(_shared.values())
      _shared.clear()
    for handler in handlers:
      handler.close()


class _SaveAwaitable:
  """What `save` returns: awaiting it waits until the item is durable. Its
  `commit_futures` let Orbax's cancel reach the save (the save then gives
  back its staging memory)."""

  def __init__(self, futures, handler: FastPersistHandler, directory: Any,
               error: BaseException | None = None):
    self.commit_futures = list(futures)
    self._handler = handler
    self._directory = directory
    self._error = error

  async def _durable(self) -> None:
    if self._error is not None:
      raise self._error
    for f in self.commit_futures:
      await asyncio.to_thread(f.result)
    # Every process's part is durable once the commit returns (the
    # processes agree on their outcomes), so the manifests can be checked.
    await asyncio.to_thread(self._handler.finalize, self._directory)

  def __await__(self):
    return self._durable().__await__()


def checkpointables_registry(
    checkpointable_name: str = "state",
    handler_type: type[FastPersistCheckpointableHandler] = FastPersistCheckpointableHandler) -> Any:
  """A local `ocp.v1` handler registry: Orbax's globally registered handlers,
  with `checkpointable_name` saved and loaded by `handler_type`.

  Orbax registers its PyTreeHandler for "state" globally, so
  `ocp.v1.handlers.local_registry().add(..., checkpointable_name="state")`
  raises AlreadyExistsError; this copies every other global entry instead
  (JSON metrics, protos, other pytrees keep their handlers).

  Args:
    checkpointable_name: the checkpointable FastPersist handles ("state" is
      what `Checkpointer.save_pytree` / `load_pytree` use).
    handler_type: FastPersistCheckpointableHandler or a subclass (options).

  Returns:
    An `ocp.v1.handlers.CheckpointableHandlerRegistry` for
    `ocp.v1.options.CheckpointablesOptions(registry=...)`.
  """
  global_registry = ocp.v1.handlers.global_registry()
  registry = ocp.v1.handlers.local_registry(include_global_registry=False)
  for handler, name in global_registry.get_all_entries():
    if name != checkpointable_name:
      registry.add(handler, checkpointable_name=name,
                   secondary_typestrs=global_registry.get_secondary_typestrs(handler))
  registry.add(handler_type, checkpointable_name=checkpointable_name)
  return registry


def v1_multiprocessing() -> tuple[int | None, frozenset[int] | None]:
  """The active Orbax v1 Context's `multiprocessing_options`: (primary_host,
  active_processes or None).

  (tests/test_orbax_v1.py fails if Orbax moves the Context's accessor.)
  """
  options = orbax_internals.v1_context().multiprocessing_options
  active = getattr(options, "active_processes", None)
  return options.primary_host, frozenset(active) if active else None


def v1_save_args(checkpointable: Any) -> Any:
  """The `ocp.SaveArgs(dtype=)` tree the active Orbax v1 Context asks of
  `checkpointable`, as Orbax's own v1 PyTree handler reads it: per array
  leaf (jax.Array other than typed keys, numpy array), the dtype of
  `array_options.saving.scoped_storage_options_creator(keypath, leaf)`
  where that returns options with a dtype, else the global
  `storage_options.dtype`. None when no cast is asked."""
  saving = orbax_internals.v1_context().array_options.saving
  default = saving.storage_options.dtype
  scoped = saving.scoped_storage_options_creator
  if default is None and scoped is None:
    return None

  def save_args(path, leaf):
    if not isinstance(leaf, (jax.Array, np.ndarray)) or plan.is_prng_key(leaf):
      return None
    dtype = getattr(scoped(path, leaf), "dtype", None) if scoped is not None else None
    dtype = dtype if dtype is not None else default
    return ocp.SaveArgs(dtype=dtype) if dtype is not None else None
  return jax.tree_util.tree_map_with_path(save_args, checkpointable,
                                          is_leaf=treepath.is_empty_node)


def _all_leaves(tree: Any, check) -> bool:
  """Whether `check(tree)` (raising for a tree it refuses) accepts `tree`."""
  try:
    check(tree)
  except Exception:  # pylint: disable=broad-except  (UnsupportedLeafError; not a pytree)
    return False
  return True


def _pool_capacity(options: FastPersistOptions) -> int:
  """Bytes the staging pool holds at most (StagingPool's rounding)."""
  slab = options.staging_slab_bytes
  return max(1, options.host_memory_limit // slab) * slab


def _global_nbytes(tree: Any) -> int:
  """Bytes of every array leaf (global sizes: the same on every process)."""
  flat, _ = treepath.flatten(tree)
  return sum(int(x.nbytes) for _, x in flat if isinstance(x, (jax.Array, np.ndarray)))
