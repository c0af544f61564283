"""Durable commits: a step reported saved is on the media.

Orbax commits a step by renaming its temporary directories (each item's
`<item>.orbax-checkpoint-tmp`, then the step's `<N>.orbax-checkpoint-tmp`) or,
in its commit-file mode, by writing `commit_success.txt`, and syncs no
directory afterwards. A new or renamed entry survives a power cut only once
its directory has been fsync'ed (fsync(2), NOTES; rename(2)), so
`wait_until_finished()` returns while the step still exists only in memory:
after a power cut it is back under its temporary name, which Orbax ignores
and deletes. The handler's own files (data, manifests, fastpersist.json) are
synced by the save before Orbax commits; what this module adds is the sync
after Orbax's commit:

- `durable_manager_options(...)`: `ocp.CheckpointManagerOptions` whose
  temporary-path class syncs the committed step (and each item) once renamed,
  before the manager deletes old steps (max_to_keep) or its wait returns.
  Works for `ocp.CheckpointManager`, `ocp.Checkpointer` /
  `ocp.AsyncCheckpointer` (`temporary_path_class=`), both atomicity modes,
  shared and per-host roots.
- `DurableCheckpointer`: Orbax v1's `training.Checkpointer`, whose
  `save_*` results, `wait()` and `close()` return once the saved steps are
  synced (v1 offers no temporary-path hook).

A save through FastPersistHandler that runs without either logs one WARNING
per root (handler.finalize -> `warn_if_not_durable`).

Orbax 0.12.8 marks `temporary_path_class` deprecated in favour of
`atomicity_options`, whose modes name only Orbax's own classes; it is the one
hook Orbax runs after its rename and before its deletions (its
post-finalization callback runs before the step's rename).
tests/test_durability.py fails if Orbax stops honouring it.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import logging
import os
import threading
from typing import Any, Iterable

import orbax.checkpoint as ocp

from fastpersist_jax.io_engine import fsync_directory

logger = logging.getLogger(__name__)

# Directories into which a class of this module commits (the parents of the
# committed paths: a root for steps, a step for items), most recent last; a
# bounded record, since every step's items add one.
_durable_parents: collections.OrderedDict[str, None] = collections.OrderedDict()
_MAX_DURABLE_PARENTS = 1024
_warned_roots: set[str] = set()
_lock = threading.Lock()


def sync_committed(path: str | os.PathLike) -> int:
  """Makes a committed step or item durable: fsync(2)s every file and
  directory under `path` (deepest first), `path` itself, and the directory
  that holds `path` (where its name was renamed into, or created).

  Files already synced (the handler's data files) cost a system call each,
  with nothing left to write.

  Returns:
    The number of files and directories synced.
  Raises:
    OSError: a file or directory could not be opened or synced (EIO, ...).
  """
  path = os.fspath(path)
  count = 0
  for dirpath, _, filenames in os.walk(path, topdown=False):
    for name in filenames:
      fd = os.open(os.path.join(dirpath, name), os.O_RDONLY | os.O_CLOEXEC)
      try:
        os.fsync(fd)
      finally:
        os.close(fd)
      count += 1
    fsync_directory(dirpath)
    count += 1
  fsync_directory(os.path.dirname(os.path.abspath(path)))
  return count + 1


def register_root(root: str | os.PathLike) -> None:
  """Records that steps (or items) committed into `root` are committed
  durably, by a class of this module, so that saves there log no warning."""
  root = os.path.abspath(os.fspath(root))
  with _lock:
    _durable_parents[root] = None
    _durable_parents.move_to_end(root)
    while len(_durable_parents) > _MAX_DURABLE_PARENTS:
      _durable_parents.popitem(last=False)


def warn_if_not_durable(item_directory: str | os.PathLike) -> None:
  """Logs one WARNING per root when an item is being committed by Orbax
  without a durable commit (called by FastPersistHandler.finalize, with the
  item's temporary directory: `root/<step>.tmp/<item>.tmp` under a manager,
  `root/<name>.tmp` under a Checkpointer)."""
  item_directory = os.path.abspath(os.fspath(item_directory))
  parent = os.path.dirname(item_directory)
  root = os.path.dirname(parent)
  with _lock:
    if parent in _durable_parents or root in _durable_parents or root in _warned_roots:
      return
    _warned_roots.add(root)
  logger.warning(
      "Checkpoints under %s are committed without a sync: Orbax renames the step after the "
      "save and never syncs the directory, so a step wait_until_finished() reported can be lost "
      "in a power cut. Pass options=fastpersist_jax.durable_manager_options(...) to "
      "ocp.CheckpointManager, or use fastpersist_jax.DurableCheckpointer with Orbax v1.", root)


class _DurableCommit:
  """Mixin for Orbax's temporary-path classes: after the commit, the
  committed path and its parent directory are synced."""

  def __init__(self, temporary_path, final_path, *args, **kwargs):
    super().__init__(temporary_path, final_path, *args, **kwargs)
    register_root(os.path.dirname(os.path.abspath(os.fspath(final_path))))

  async def finalize(self, *args, **kwargs):
    """Orbax's commit (rename, or commit file), then sync_committed."""
    await super().finalize(*args, **kwargs)
    await asyncio.to_thread(sync_committed, self.get_final())


class DurableAtomicRenameTemporaryPath(_DurableCommit, ocp.path.atomicity.AtomicRenameTemporaryPath):
  """Orbax's atomic-rename commit (the default on local filesystems),
  synced once renamed."""


class DurableCommitFileTemporaryPath(_DurableCommit, ocp.path.atomicity.CommitFileTemporaryPath):
  """Orbax's commit-file mode (`AtomicityMode.COMMIT_FILE`), synced once
  `commit_success.txt` is written."""


def durable_manager_options(options: ocp.CheckpointManagerOptions | None = None,
                            /, **fields: Any) -> ocp.CheckpointManagerOptions:
  """`ocp.CheckpointManagerOptions` whose commits are durable.

      mngr = ocp.CheckpointManager(
          root, item_handlers=FastPersistHandler(),
          options=fastpersist_jax.durable_manager_options(max_to_keep=2))

  When the manager's `wait_until_finished()` returns (or `save()`, with
  `enable_async_checkpointing=False`), the step's directory, its items,
  Orbax's metadata files and the step's name in the root are on the media;
  the manager deletes old steps only after that.

  Args:
    options: options to start from (copied; default: Orbax's defaults).
    **fields: CheckpointManagerOptions fields to set, e.g. max_to_keep=2.
  Returns:
    The options, with `temporary_path_class` set to the durable class of
    the atomicity mode (`atomicity_options.mode`: COMMIT_FILE ->
    DurableCommitFileTemporaryPath, else DurableAtomicRenameTemporaryPath).
  Raises:
    ValueError: `temporary_path_class` is set to a class of another kind
      (the durable classes cannot wrap it).
  """
  merged = dataclasses.replace(options if options is not None else ocp.CheckpointManagerOptions(),
                               **fields)
  given = merged.temporary_path_class
  if given is not None and not issubclass(given, _DurableCommit):
    raise ValueError(f"temporary_path_class={given.__name__} is set: durable_manager_options "
                     "cannot make its commits durable; leave it unset")
  mode = getattr(merged.atomicity_options, "mode", None)
  merged.temporary_path_class = (
      DurableCommitFileTemporaryPath if mode == ocp.options.AtomicityMode.COMMIT_FILE
      else DurableAtomicRenameTemporaryPath)
  return merged


class DurableCheckpointer(ocp.v1.training.Checkpointer):
  """Orbax v1's `training.Checkpointer`, with durable saves.

      with ctx, fastpersist_jax.DurableCheckpointer(root) as ckptr:
        ckptr.save_pytree(step, state)     # returns once the step is durable

  Takes what `ocp.v1.training.Checkpointer` takes. `save_pytree` /
  `save_checkpointables` return, the responses of the `*_async` saves
  complete (`result()`, `on_complete`), and `wait()` and `close()` return
  only once the steps saved are synced (`sync_committed`: their files,
  directories and name in the root). Orbax v1 applies a preservation policy
  right after its rename, so an older step may be deleted before the new
  one is synced; on filesystems whose journal commits metadata in order
  (ext4, XFS) the deletion cannot reach the media before the rename.
  Raises what Orbax's does, and OSError when a sync fails.
  """

  def __init__(self, directory, *args, step_name_format=None, **kwargs):
    super().__init__(directory, *args, step_name_format=step_name_format, **kwargs)
    self._name_format = step_name_format or ocp.path.step.standard_name_format()
    self._unsynced: set[int] = set()
    self._sync_lock = threading.Lock()
    register_root(os.fspath(self.directory))

  def save_checkpointables_async(self, step: int, checkpointables: dict[str, Any], **kwargs):
    """Orbax's, whose response's `result()` returns once the step is durable."""
    response = super().save_checkpointables_async(step, checkpointables, **kwargs)
    if response is None:
      return None
    with self._sync_lock:
      self._unsynced.add(step)
    return _DurableResponse(response, self, step)

  def wait(self):
    """Orbax's wait, then syncs every step saved and not yet synced."""
    super().wait()
    self.sync_step(None)

  def close(self):
    """Orbax's close (which waits for saves), then syncs as `wait()` does."""
    try:
      super().close()
    finally:
      self.sync_step(None)

  def sync_step(self, step: int | None) -> None:
    """Syncs `step` (None: every step saved and not yet synced), whose save
    has finished, then the root. A step that is not there (its save failed,
    or the preservation policy deleted it) is skipped. Raises OSError."""
    with self._sync_lock:
      if step is None:
        steps, self._unsynced = sorted(self._unsynced), set()
      elif step in self._unsynced:
        self._unsynced.discard(step)
        steps = [step]
      else:
        return
    paths = [os.fspath(ocp.path.step.build_step_path(self.directory, self._name_format, s))
             for s in steps]
    for path in paths:
      if os.path.isdir(path):
        sync_committed(path)
    if paths:
      fsync_directory(os.fspath(self.directory))


class _DurableResponse:
  """An Orbax v1 save response whose result() returns once its step is
  durable."""

  def __init__(self, response, checkpointer: DurableCheckpointer, step: int):
    self._response = response
    self._checkpointer = checkpointer
    self._step = step

  def result(self, timeout: float | None = None) -> bool:
    """Orbax's result (whether a step was saved), once the step is synced."""
    saved = self._response.result(timeout=timeout)
    self._checkpointer.sync_step(self._step)
    return saved

  def on_complete(self, callback) -> None:
    """As Orbax's: `callback(result)` once the save completes, here once the
    step is also synced."""
    def synced_callback(saved):
      self._checkpointer.sync_step(self._step)
      callback(saved)
    self._response.on_complete(synced_callback)
