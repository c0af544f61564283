"""FastPersistHandler: the Orbax AsyncCheckpointHandler users plug in.

    mngr = ocp.CheckpointManager(path, item_handlers=FastPersistHandler())
    mngr.save(step, args=FastPersistSave(state))
    state = mngr.restore(step, args=FastPersistRestore(abstract_state))

`async_save` blocks only for the snapshot into host staging memory; the
writes run behind the returned commit future, which Orbax awaits before it
renames the temporary directory and marks the checkpoint committed.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import logging
import os
import threading
import time
from typing import Any, Callable, List, Optional

import jax
import orbax.checkpoint as ocp
from etils import epath
from orbax.checkpoint import future as ocp_future

from fastpersist_jax import (casts, coordination, disk_format, durability, gc_pause,
                             orbax_internals, redundancy, sources)
from fastpersist_jax.emergency import refuse_emergency_manager
from fastpersist_jax.errors import (CorruptCheckpointError, ForeignCheckpointError, RestoreError,
                                    SaveError)
from fastpersist_jax.io_engine import IOEngine
from fastpersist_jax.options import FastPersistOptions
from fastpersist_jax.plan import check_tree, make_plan
from fastpersist_jax.restore import Restorer
from fastpersist_jax.save import SaveOperation
from fastpersist_jax.staging import StagingPool

logger = logging.getLogger(__name__)

# How long a save may still wait for its directory once Orbax has created
# that of a later save (or close() was called) before it counts as one whose
# directory Orbax failed to create. Orbax creates each in milliseconds.
_ORPHAN_GRACE_S = 2.0


class FastPersistHandler(ocp.AsyncCheckpointHandler):
  """Saves and restores pytrees of (sharded) jax.Arrays through io_uring.

  Every save and restore logs one INFO line (logger "fastpersist_jax.*":
  bytes, blocking ms, GB/s, snapshot mode; restores longer than a few
  seconds also log their progress).

  Attributes:
    last_save_stats: figures of the last finished save: "bytes" (logical
      bytes this process wrote), "blocking_s" (what async_save blocked for),
      "snapshot_s" (the copy into staging), "write_s" / "commit_s" (from the
      commit's start until the data is synced / the manifest written),
      "cpu_s" (CPU seconds of the save's own threads), "snapshot_requested"
      (FastPersistOptions.snapshot) and "snapshot_mode" (what it resolved
      to: "copy", "view" (host views of CPU arrays, copied in the
      background: what "auto" means on CPU) or "reference").
    last_restore_stats: figures of this process's last restore: "bytes"
      (bytes read from disk), "seconds", "gbps" (bytes / seconds / 1e9),
      "resharded" (1.0 when some target shard was assembled from saved
      shards other than its own, else 0.0).
  """

  def __init__(self, options: FastPersistOptions | None = None, *,
               multiprocessing_options: ocp.options.MultiprocessingOptions | None = None):
    """Creates the I/O engine; the staging pool is allocated by the first save.

    Args:
      options: every tunable (FastPersistOptions()); see options.py.
      multiprocessing_options: Orbax's; primary_host=None with several
        processes saves per-host directories (each process its own root).
    Raises:
      IOUringUnavailableError: engine="io_uring" and the kernel refuses it.
    """
    self._options = options or FastPersistOptions()
    self._mp = multiprocessing_options or ocp.options.MultiprocessingOptions()
    self._engine = IOEngine(self._options)
    self._pool = StagingPool(self._engine, self._options.staging_slab_bytes,
                             self._options.host_memory_limit, self._options.register_buffers)
    # Serialises the blocking part of saves (planning and, in "copy" mode, the
    # copy into the shared staging pool). Background copies ("view" and
    # "reference") may overlap; the pool hands each window to one save at a time.
    self._snapshot_lock = threading.Lock()
    self._in_flight: list[_CommitFuture] = []
    self._in_flight_lock = threading.Lock()
    self.last_save_stats: dict[str, float] = {}
    self.last_restore_stats: dict[str, float] = {}

  @property
  def options(self) -> FastPersistOptions:
    """The options this handler was made with."""
    return self._options

  @property
  def engine_kind(self) -> str:
    """The I/O engine in use: "io_uring" or "threads" (the pwrite pool)."""
    return self._engine.kind

  # Save -----------------------------------------------------------------------

  def _is_primary(self) -> bool:
    primary = self._mp.primary_host
    return primary is None or jax.process_index() == primary

  def _placement(self) -> str:
    """primary_host=None with several processes: each process saves into its
    own directory (e.g. per-host NVMe) its part of what its devices hold."""
    if self._mp.primary_host is None and jax.process_count() > 1:
      return "per_host"
    return "shared"

  async def async_save(self, directory: epath.Path, item: Any = None,
                       args: Optional["FastPersistSave"] = None) -> Optional[List[ocp_future.Future]]:
    """Snapshots `args.item` and returns the commit future that writes it.

    Blocks only for the snapshot (FastPersistOptions.snapshot): with "copy",
    until every shard this process owns is in host staging memory; with
    "auto" on CPU, ~10 us per shard; with "reference", a few ms whatever the
    size. The returned future (one) resolves once every data file, this
    process's manifest and (on the primary) fastpersist.json are written and
    synced, and, with several processes, every process has done so.

    Args:
      directory: the item directory (Orbax's temporary step directory).
      item: unused; pass the tree as `args=FastPersistSave(tree)`.
      args: FastPersistSave: a pytree of jax.Arrays (any sharding, typed PRNG
        keys included), numpy arrays and scalars, Python scalars and strings,
        None and empty containers.
    Returns:
      [commit future].
    Raises:
      UnsupportedLeafError: a leaf that cannot be saved (named); nothing is
        written. SaveError: the snapshot failed (e.g. a donated array).
      UnsupportedManagerError: driven by Orbax's emergency managers.
      The commit future raises SaveError (ENOSPC, another process failed, a
      manifest its own restore would reject, ...): nothing is committed.
    """
    if isinstance(item, ocp.args.CheckpointArgs):
      raise ValueError("pass FastPersistSave as `args=`, not as `item`")
    refuse_emergency_manager(os.fspath(directory))
    with gc_pause.paused():   # the blocking part only (see gc_pause)
      return self._start_save(directory, item, args)

  def _start_save(self, directory: epath.Path, item: Any,
                  args: Optional["FastPersistSave"]) -> List[ocp_future.Future]:
    """async_save's work: plans, snapshots, and starts the commit."""
    t0 = time.perf_counter()
    if args is not None:
      item = args.item
    if args is None or getattr(args, "checked", None) is None:
      args = FastPersistSave(item)
    checked = args.checked
    plan = make_plan(checked, self._options, process_index=jax.process_index(),
                     process_count=jax.process_count(), write_host_arrays=self._is_primary(),
                     placement=self._placement())
    if plan.placement == "per_host":
      redundancy.warn_single_copies(item, redundancy=self._options.host_redundancy,
                                    replica_parallel=self._options.replica_parallel,
                                    plan_token=plan.shards)
    shard_sources = sources.bind(plan, checked.values, self._options)
    directory_str = os.fspath(directory)
    op = SaveOperation(
        self._engine, self._pool, shard_sources, self._options,
        leaves=plan.leaf_metadata(checked.values), write_metadata=self._is_primary(),
        outcome_key=(coordination.next_key("save", coordination.participants(), directory)
                     if jax.process_count() > 1 else None),
        directory_signals=orbax_internals.directory_signals(),
        on_directory_ready=lambda: self._abandon_orphans(op),
        custom_metadata=args.custom_metadata_bytes)
    mode = shard_sources.snapshot

    def commit():
      op.commit(directory_str)
      stats = dict(op.stats, snapshot_requested=self._options.snapshot, snapshot_mode=mode)
      self.last_save_stats = stats
      logger.info("Saved %s: %d bytes, blocking %.1f ms, written and synced in the background at "
                  "%.3f GB/s, snapshot %r (asked for %r).", directory_str, stats["bytes"],
                  stats.get("blocking_s", 0.0) * 1e3,
                  stats["bytes"] / max(stats.get("commit_s", 0.0), 1e-9) / 1e9, mode,
                  self._options.snapshot)

    with self._snapshot_lock:
      self._abandon_waiting_for(directory_str)
      # The commit starts first: its writer must be ready to drain staging
      # windows while the snapshot fills them.
      commit_future = _CommitFuture(commit, op, directory_str)
      try:
        op.snapshot(background=mode != "copy")
      except BaseException as e:
        op.abort(e)
        try:
          commit_future.result()
        except BaseException:  # pylint: disable=broad-except  (the snapshot error is the one to raise)
          pass
        raise
      op.stats["blocking_s"] = time.perf_counter() - t0
      with self._in_flight_lock:
        self._in_flight = [f for f in self._in_flight if not f.done()] + [commit_future]
    return [commit_future]

  def _abandon_waiting_for(self, directory: str) -> None:
    """Aborts earlier saves still waiting for `directory` itself: two saves
    into one item directory cannot both be live (a retry of a step whose
    directory Orbax failed to create), and the earlier must not write into
    the directory Orbax makes for the later."""
    with self._in_flight_lock:
      stale = [f for f in self._in_flight
               if f.directory == directory and not f.done() and not f.op.directory_ready.is_set()]
    for f in stale:
      f.op.abort(SaveError(f"save into {directory} abandoned: its directory was never created, "
                           "and a later save into the same directory began"))

  def _abandon_orphans(self, ready: SaveOperation) -> None:
    """Called on a save's commit thread once its directory exists: aborts
    the saves begun before it whose directories still do not exist
    _ORPHAN_GRACE_S later. Orbax creates the directories of saves in the
    order they begin, so such a save waits for a directory Orbax failed to
    create (full or read-only disk, permissions): nothing else would end its
    wait before commit_timeout_s, and the staging memory it holds would
    starve the later saves. Aborted, it gives that memory back."""
    with self._in_flight_lock:
      earlier = [f for f in self._in_flight
                 if f.op.seq < ready.seq and not f.done() and not f.op.directory_ready.is_set()]
    deadline = time.monotonic() + _ORPHAN_GRACE_S
    for f in earlier:
      if not f.op.directory_ready.wait(max(0.0, deadline - time.monotonic())) and not f.done():
        logger.warning("Abandoning the save into %s: Orbax created the directory of a later save "
                       "but not this one's (within %.0f s).", f.directory, _ORPHAN_GRACE_S)
        f.op.abort(SaveError(f"save into {f.directory} abandoned: Orbax did not create its "
                             f"directory, while it created that of a later save"))

  def save(self, directory: epath.Path, item: Any = None,
           args: Optional["FastPersistSave"] = None) -> None:
    """Saves synchronously: durable on return. Creates `directory` if needed.
    Takes and raises what async_save and its commit future do."""
    os.makedirs(os.fspath(directory), exist_ok=True)

    async def run():
      for f in await self.async_save(directory, item=item, args=args) or []:
        f.result()
    _run_sync(run())

  def finalize(self, directory: epath.Path) -> None:
    """Checks, before Orbax commits, that every process's manifest is there.
    Raises CorruptCheckpointError naming the missing processes."""
    directory = os.fspath(directory)
    if not self._is_primary() or not os.path.exists(os.path.join(directory, disk_format.METADATA_FILE)):
      return
    durability.warn_if_not_durable(directory)
    # This handler saved it: its placement and process count are this
    # process's (decoding the metadata again would cost a 10,000-leaf save
    # 0.1 s; the save validated what it wrote before writing it).
    expected = ([jax.process_index()] if self._placement() == "per_host"
                else range(jax.process_count()))
    missing = [p for p in expected
               if not os.path.exists(os.path.join(directory, disk_format.manifest_name(p)))]
    if missing:
      raise CorruptCheckpointError(
          f"{directory}: manifests of processes {missing} are missing; not committing")

  # Restore --------------------------------------------------------------------

  def restore(self, directory: epath.Path, item: Any = None,
              args: Optional["FastPersistRestore"] = None) -> Any:
    """Restores the item in `directory` (see FastPersistRestore for targets).

    Returns the target's structure with its leaves restored (casts to the
    target's dtypes, onto its shardings and memory kinds), or without a
    target the saved tree as nested dicts and lists on the saved devices.
    Reads at the disk's speed in batches of restore_batch_bytes, verifying
    every CRC-32C (verify_checksums).
    Raises:
      CheckpointNotFoundError: no checkpoint in `directory`.
      RestoreMismatchError: the target does not fit (names the leaf).
      CorruptCheckpointError / ChecksumMismatchError: damaged files (names
        the file, leaf, shard and offset); nothing partial is returned.
      RestoreError: (several processes) another process's restore failed,
        or it did not finish within commit_timeout_s; every process raises.
    With several processes, every process calls restore (as Orbax's
    Checkpointer and CheckpointManager do): they agree on its outcome.
    """
    partial_restore = bool(getattr(args, "partial_restore", False))
    if args is not None:
      item = args.item
    item = orbax_internals.unwrap_tree_metadata(item)
    # Several processes agree twice: once planned (before any collective of
    # the restore, e.g. the per-host part swap, which has no timeout), and
    # once done (Orbax's restore then waits in a barrier without a timeout,
    # which a failed process never reaches). They are Orbax's active
    # processes, or all processes where the restore swaps parts among them.
    state: dict[str, Any] = {"restorer": None, "planned": False, "key": None, "group": None}

    def agree(phase: str, error: BaseException | None) -> None:
      if state["key"] is None:
        restorer = state["restorer"]
        swapping = restorer.collective_processes() if restorer is not None else None
        state["group"] = swapping or coordination.participants(self._mp.active_processes)
        state["key"] = (coordination.next_key("restore", state["group"], os.fspath(directory))
                        if len(state["group"]) > 1 else "")
      if not state["key"]:
        if error is not None:
          raise error
        return
      coordination.agree(f"{state['key']}/{phase}", error, self._options.commit_timeout_s,
                         processes=state["group"], operation="restore", failure=RestoreError,
                         checkpoint=coordination.checkpoint_name(os.fspath(directory)),
                         consequence="nothing was restored")

    def planned() -> None:
      state["planned"] = True
      agree("planned", None)

    try:
      with gc_pause.paused():
        state["restorer"] = Restorer(self._engine, self._options, os.fspath(directory),
                                     self._pool, on_planned=planned)
        restored = state["restorer"].restore(item, partial_restore)
        # Its records and plans are dropped before the pause ends: the
        # collection the pause deferred then walks the restored tree alone
        # (10,000 leaves: 7-12 ms less).
        stats = state["restorer"].stats
        state["restorer"] = None
    except Exception as e:  # pylint: disable=broad-except  (the others learn of it first)
      if state["planned"] and isinstance(e, RestoreError):
        raise   # the planned agreement failed: every process raises there
      # Tell the others, at the agreement they are waiting in; agree() then
      # raises `e` here.
      agree("done" if state["planned"] else "planned", e)
      raise
    agree("done", None)
    self.last_restore_stats = stats
    return restored

  def metadata(self, directory: epath.Path) -> Any:
    """The saved item's metadata, as Orbax's handlers return it: a
    TreeMetadata that maps, indexes and restores like the saved tree (nested
    dicts and lists of jax.ShapeDtypeStruct, with the saved sharding where
    its devices exist and typed keys with their key dtype, plus the saved
    scalars), with `.tree` (that tree) and `.custom_metadata` (what
    FastPersistSave(custom_metadata=) saved, else None). Raises
    CheckpointNotFoundError or CorruptCheckpointError; ForeignCheckpointError
    (also logged: Orbax's item_metadata turns it into None) for an item
    another Orbax handler wrote, naming it and how to read the item."""
    try:
      with gc_pause.paused():   # decoding 10,000 leaf records: see gc_pause
        tree = Restorer(self._engine, self._options, os.fspath(directory)).abstract_tree()
      return orbax_internals.tree_metadata(
          tree, disk_format.read_custom_metadata(os.fspath(directory)))
    except ForeignCheckpointError as e:
      logger.warning("%s", e)
      raise

  # Lifecycle ------------------------------------------------------------------

  def wait_until_finished(self) -> None:
    """Waits for every save in flight; raises the first one's error (once:
    Orbax surfaces it from its own wait too, and close() must not repeat it).
    Each save's waits are bounded (commit_timeout_s), so this returns."""
    error = None
    with self._in_flight_lock:
      in_flight = list(self._in_flight)
    for f in in_flight:
      try:
        f.result()
      except Exception as e:  # pylint: disable=broad-except  (the rest are still waited for)
        error = error or e
      with self._in_flight_lock:   # only once finished: close() must not free the pool under it
        if f in self._in_flight:
          self._in_flight.remove(f)
    if error is not None:
      raise error

  def close(self) -> None:
    """Ends in-flight saves, then frees the staging pool.

    A save whose directory has not appeared _ORPHAN_GRACE_S after close()
    began is abandoned (Orbax closes a handler after its own wait, so such a
    save's directory was never created); the others are waited for. A later save (Orbax may reuse a
    closed handler) allocates a new pool. A save's error is not raised here:
    it went to its commit future, which Orbax raises."""
    with self._in_flight_lock:
      waiting = [f for f in self._in_flight if not f.op.directory_ready.is_set()]
    deadline = time.monotonic() + _ORPHAN_GRACE_S
    for f in waiting:
      if not f.op.directory_ready.wait(max(0.0, deadline - time.monotonic())):
        f.op.abort(SaveError(f"save into {f.directory} abandoned: the handler was closed, and "
                             f"its directory did not appear within {_ORPHAN_GRACE_S:.0f} s"))
    try:
      self.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      logger.warning("A checkpoint save failed before the handler was closed: %s", e)
    finally:
      self._pool.close()


class _CommitFuture(ocp_future.Future):
  """A save's commit, running on a thread of its own from the start.

  Unlike Orbax's CommitFutureAwaitingContractedSignals, which runs the commit
  only once Orbax signals that the directory exists (and never runs it if
  that never happens), the commit always runs: it waits for the directory
  itself, bounded and abortable (save.await_directory), and on every path
  that does not commit it returns what the save holds to the staging pool.
  """

  def __init__(self, commit: Callable[[], None], op: SaveOperation, directory: str):
    super().__init__()
    self.op = op
    self.directory = directory
    self._error: BaseException | None = None
    self._finished = threading.Event()
    self._thread = threading.Thread(target=self._run, args=(commit,), daemon=True,
                                    name="fastpersist_commit")
    self._thread.start()

  def _run(self, commit: Callable[[], None]) -> None:
    try:
      commit()
    except BaseException as e:  # pylint: disable=broad-except  (raised by result())
      self._error = e
    finally:
      self._finished.set()

  def wait(self, timeout: float | None = None) -> bool:
    """Waits for the commit to end; whether it did within `timeout` s."""
    return self._finished.wait(timeout)

  def result(self, timeout: float | None = None) -> None:
    """Waits for the commit. Raises its error (SaveError), or TimeoutError
    when it has not ended within `timeout` seconds."""
    if not self._finished.wait(timeout):
      raise TimeoutError(f"the save into {self.directory} did not finish within {timeout} s")
    if self._error is not None:
      raise self._error

  def cancel(self) -> None:
    """Abandons the save (Orbax's cancel): its commit raises SaveError and
    gives back its staging memory."""
    self.op.abort(SaveError(f"save into {self.directory} cancelled"))

  def done(self) -> bool:
    """True once the commit has ended (successfully or not)."""
    return self._finished.is_set()


def _run_sync(coro):
  """Runs a coroutine to completion, also from inside a running event loop
  (then on a thread of its own)."""
  try:
    asyncio.get_running_loop()
  except RuntimeError:
    return asyncio.run(coro)
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(asyncio.run, coro).result()


@ocp.args.register_with_handler(FastPersistHandler, for_save=True)
@dataclasses.dataclass
class FastPersistSave(ocp.args.CheckpointArgs):
  """Save args: the pytree to save, with Orbax's per-item options.

  Attributes:
    item: the pytree to save (see FastPersistHandler.async_save).
    save_args: as Orbax's StandardSave: a pytree of `ocp.SaveArgs` matching
      `item` by key path (leaves it does not name are saved as they are).
      `SaveArgs(dtype=...)` stores that array leaf cast to the dtype
      (`astype`, on its devices: bit-exact to the caller's own cast); a
      restore casts back to its target's dtype. The TensorStore layout
      fields (chunk_byte_size, shard_axes) are ignored, with a warning.
    custom_metadata: plain JSON (dicts with str keys, lists, str, numbers,
      bool, None), saved with the item by the process that writes its
      metadata, and returned by `metadata(...).custom_metadata`
      (`CheckpointManager.item_metadata(step).custom_metadata`).

  Raises UnsupportedLeafError, naming the leaf, when made with a tree a save
  would refuse (plan.check_tree), a cast of a leaf that is not an array, or
  custom_metadata that is not plain JSON; InvalidOptionsError for save_args
  naming no leaf of `item`: before Orbax starts anything.
  """
  item: Any
  save_args: Any = None
  custom_metadata: Any = None
  # The tree (cast as save_args asks) flattened and checked when these args
  # were made (make_plan reuses it rather than flattening again).
  checked: Any = dataclasses.field(default=None, init=False, repr=False, compare=False)
  custom_metadata_bytes: bytes | None = dataclasses.field(default=None, init=False, repr=False,
                                                          compare=False)

  def __post_init__(self):
    with gc_pause.paused():   # the caller's thread, part of the save's blocking time
      if self.custom_metadata is not None:
        self.custom_metadata_bytes = disk_format.encode_custom_metadata(self.custom_metadata)
      self.checked = check_tree(casts.cast_for_save(
          self.item, casts.dtypes_from_save_args(self.item, self.save_args)))


@ocp.args.register_with_handler(FastPersistHandler, for_restore=True)
@dataclasses.dataclass
class FastPersistRestore(ocp.args.CheckpointArgs):
  """Restore args.

  Attributes:
    item: the restore target: a pytree of jax.Arrays / np.ndarrays, or of
      jax.ShapeDtypeStruct (with `sharding` to place the arrays), or a
      sub-tree of the saved tree to restore only part of it. None restores
      everything as saved (on the saved sharding where the devices fit, else
      as numpy, with a warning). Within a target, a None or `...`
      (ocp.PLACEHOLDER) leaf is not read and comes back as it is, as with
      Orbax's handlers; Orbax v1's abstract leaves (NumpyShapeDtype, the
      types int / float) restore a numpy array / Python scalar.
    partial_restore: as Orbax's: target leaves the checkpoint lacks keep the
      target's value (default: RestoreMismatchError naming the leaf).
  """
  item: Any = None
  partial_restore: bool = False
