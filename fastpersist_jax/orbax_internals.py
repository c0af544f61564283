"""The one place fastpersist_jax reaches into Orbax's private modules: the
save's directory-creation signals, and Orbax's TreeMetadata (the type its
handlers' `metadata()` returns, which orbax 0.12.8 does not export).

Orbax creates a step's temporary directories in the background and, once
they exist, sets one key per "awaitable signal" of the save's operation in
its signaling client (a key-value store: the JAX distributed client's, or an
in-process dict with one process). Its own commit futures block on those keys
until `multihost.coordination_timeout()` (20 min in orbax 0.12.8), and if the
directory cannot be created the keys are never set: such a future waits out
the whole timeout, unable to notice that Orbax has already given up on it.

The save therefore reads the contracted keys itself, without blocking
(`key_value_try_get`), so that its wait can be bounded and abandoned (see
save.await_directory). The public surface of orbax 0.12.8 has no way to read
them; an Orbax upgrade that moves them makes `available()` False, which
tests/test_save_lifecycle.py asserts against, and the save falls back to
waiting for the directory itself to appear.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

logger = logging.getLogger(__name__)

try:  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.futures import future as _future
  from orbax.checkpoint._src.futures import signaling_client as _signaling_client
  from orbax.checkpoint._src.futures import synchronization as _synchronization
  _CONTRACT = _future.AwaitableSignalsContract
  _OPERATION_IDS = _synchronization.OperationIdGenerator
except (ImportError, AttributeError):   # an Orbax without them: wait for the directory only
  _CONTRACT = _OPERATION_IDS = _signaling_client = None

try:  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint.experimental.v1._src.handlers import compatibility as _v1_compatibility
  _V1_SIGNALLED_PATH = _v1_compatibility._PathAwaitingCreation  # pylint: disable=protected-access
except (ImportError, AttributeError):
  _V1_SIGNALLED_PATH = None

try:  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.metadata import tree as _tree_metadata
  _TREE_METADATA = _tree_metadata.TreeMetadata
  _BUILD_TREE_METADATA = _tree_metadata.build_default_tree_metadata
except (ImportError, AttributeError):   # an Orbax without them: metadata() returns the bare tree
  _TREE_METADATA = _BUILD_TREE_METADATA = None


def available() -> bool:
  """Whether Orbax's signal contract can be read (orbax 0.12.8 has it)."""
  return _CONTRACT is not None


def directory_signals() -> Callable[[], bool] | None:
  """For the save Orbax is starting on this thread: a function that tells,
  without blocking, whether every directory-creation signal of that save has
  been set (its temporary directories exist); None when Orbax contracted no
  signal (synchronous directory creation, or this Orbax lacks the contract).

  Call it on the thread that runs the handler's async_save: Orbax keys the
  signals by its current operation id.
  """
  if _CONTRACT is None:
    return None
  try:
    operation_id = _OPERATION_IDS.get_current_operation_id()
    keys = [_CONTRACT.get_unique_awaitable_singal_key(signal, operation_id)
            for signal in _CONTRACT.get_awaitable_signals_from_contract(operation_id=operation_id)]
  except Exception as e:  # pylint: disable=broad-except  (a changed private API: fall back)
    logger.warning("Could not read Orbax's directory-creation signals (%s); waiting for the "
                   "directory itself instead.", e)
    return None
  if not keys:
    return None
  client = _signaling_client.get_signaling_client()
  pending = list(keys)

  def all_set() -> bool:
    while pending and client.key_value_try_get(pending[-1]) is not None:
      pending.pop()
    return not pending
  return all_set


def created_in_background(directory) -> bool:
  """Whether Orbax v1 creates `directory` (a PathAwaitingCreation handed to
  a v1 handler's save) in the background and signals it, so that the save
  can poll for it (directory_signals) instead of `await_creation()`, which
  there blocks an executor thread until Orbax's 5 min coordination timeout
  when the creation fails (and so holds up interpreter exit). False for the
  paths of ocp.v1's free functions, which create the directory when awaited,
  and for an Orbax whose classes moved (await_creation() is then used)."""
  return _V1_SIGNALLED_PATH is not None and isinstance(directory, _V1_SIGNALLED_PATH)


def tree_metadata(tree: Any, custom_metadata: Any) -> Any:
  """`tree` as Orbax's handlers return item metadata: a TreeMetadata, which
  maps and indexes like `tree` and has `.tree` and `.custom_metadata`.
  `tree` itself where Orbax's type is missing or refuses it (a saved item
  that is None)."""
  if _BUILD_TREE_METADATA is None:
    return tree
  try:
    return _BUILD_TREE_METADATA(tree, custom_metadata=custom_metadata)
  except ValueError:   # not a container or a single leaf
    return tree


def unwrap_tree_metadata(target: Any) -> Any:
  """A restore target given as Orbax's TreeMetadata (what `metadata()`
  returns) as the tree it holds; any other target as it is."""
  if _TREE_METADATA is not None and isinstance(target, _TREE_METADATA):
    return target.tree
  return target


def v1_context() -> Any:
  """The active Orbax v1 Context (`ocp.v1.Context`): Orbax v1 exposes no
  public accessor for it."""
  from orbax.checkpoint.experimental.v1._src.context import context as context_lib  # pylint: disable=g-import-not-at-top
  return context_lib.get_context()
