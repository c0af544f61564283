"""Multi-process saves and restores: every process learns whether all the
others succeeded.

Orbax's barriers carry no outcome, and the one ending a restore has no
timeout: a process whose part failed would leave the others waiting. Through
the key-value store and barriers of JAX's distributed runtime (the ones
`jax.distributed.initialize` starts, which Orbax uses too), each process
publishes "ok" or its error, then meets the others at a barrier with a
timeout, then reads their outcomes: one failure makes every process raise,
and a process that died, or comes later than the timeout, makes the rest
raise after `timeout_s` and itself raise on arrival (the barrier has failed
by then), never proceed as though all had succeeded.

Keys name each collective operation by its kind, its processes, the
checkpoint and its number among such operations in this process
(`next_key`), not by handler instance: a handler made on one process only
(say, to read metadata) does not shift them.

The key-value store lives in process 0's coordination service for the whole
job, so an agreement's keys are deleted once read: each process, done
reading the outcomes, increments a counter, and the last one deletes them.
A run saving every step keeps no key per step (agreements of several items
run at once, so no order among them is assumed).
"""

from __future__ import annotations

import collections
import os
import threading
import zlib

import jax

from fastpersist_jax.errors import SaveError


def orbax_multihost():
  """Orbax's multihost module: its `get_jax_distributed_client` is the
  accessor of the JAX key-value client that Orbax itself uses.

  `ocp.multihost` names this module when orbax.checkpoint is imported, but
  importing the public `orbax.checkpoint.multihost` package (which lacks the
  accessor; Orbax's emergency managers do) rebinds that name. So the module
  is imported by its path, in this one function (tests/test_ecosystem.py
  fails if Orbax moves it).
  """
  from orbax.checkpoint._src.multihost import multihost  # pylint: disable=g-import-not-at-top
  return multihost


def _client():
  """The JAX distributed runtime's key-value client, or None when
  `jax.distributed.initialize` has not been called."""
  multihost = orbax_multihost()
  if not multihost.is_jax_distributed_client_initialized():
    return None
  return multihost.get_jax_distributed_client()


def shared_value(key: str, propose, timeout_s: float) -> str:
  """A value every process gets the same of: process 0's `propose()`."""
  client = _client()
  if jax.process_count() == 1 or client is None:
    return propose()
  if jax.process_index() == 0:
    value = propose()
    client.key_value_set(key, value)
    return value
  try:
    return client.blocking_key_value_get(key, max(1, int(timeout_s * 1000)))
  except Exception as e:  # pylint: disable=broad-except  (the runtime raises its own types)
    raise SaveError(f"process 0 did not publish {key} within {timeout_s:.0f} s") from e


# Operations counted per (operation, group, checkpoint), the oldest
# forgotten past _SEQUENCES_MAX (a run saving every step names a new
# checkpoint each time); every process forgets the same ones, as they make
# the same operations in the same order.
_SEQUENCES: collections.OrderedDict[tuple, int] = collections.OrderedDict()
_SEQUENCES_MAX = 4096
_SEQUENCES_LOCK = threading.Lock()


def participants(active_processes=None) -> list[int]:
  """The processes taking part in a collective operation: Orbax's
  MultiprocessingOptions.active_processes where set, else all."""
  if active_processes:
    return sorted(active_processes)
  return list(range(jax.process_count()))


_ORBAX_TMP_SUFFIX = ".orbax-checkpoint-tmp"


def checkpoint_name(directory: str) -> str:
  """What names a checkpoint alike on every process: the last two
  components of its directory (Orbax's `<step>/<item>`), without Orbax's
  temporary-directory suffix, whatever root each process saves under (per
  host, each has its own)."""
  parts = [p for p in os.path.normpath(os.fspath(directory)).split(os.sep) if p][-2:]
  return "/".join(p.split(_ORBAX_TMP_SUFFIX)[0] for p in parts)


def next_key(operation: str, processes: list[int], directory: str) -> str:
  """The key of this process's next collective `operation` (e.g. "save",
  "restore") among `processes` on the checkpoint in `directory`.

  Keys name the checkpoint (checkpoint_name) and count operations on it in
  this process: the same on every process as long as they make them in the
  same order (Orbax requires that). A process that skipped one (Orbax
  raised before calling the handler, a save refused before it was planned)
  shifts only the keys of that checkpoint, so processes never pair an
  operation on one checkpoint with another's (a restore assembled from two
  steps' shards), and later checkpoints are unaffected.
  """
  group = format(zlib.crc32(",".join(map(str, processes)).encode()), "08x")
  name = checkpoint_name(directory)
  with _SEQUENCES_LOCK:
    n = _SEQUENCES.pop((operation, group, name), 0)
    _SEQUENCES[(operation, group, name)] = n + 1   # now the newest
    while len(_SEQUENCES) > _SEQUENCES_MAX:
      _SEQUENCES.popitem(last=False)
  return f"fastpersist/{operation}/{group}/{name}/{n}"


def agree(key: str, error: BaseException | None, timeout_s: float, *,
          processes: list[int] | None = None, operation: str = "save", checkpoint: str = "",
          failure: type[Exception] = SaveError,
          consequence: str = "the checkpoint is not committed") -> None:
  """Publishes this process's outcome of `operation` under `key`, meets the
  other `processes` (default: all) at a barrier of at most `timeout_s`
  seconds, then reads their outcomes.

  Raises `error` (if set); else `failure` naming the first other process
  that failed, or those that did not arrive in time, `checkpoint` (its
  name, for the message) and `consequence`.
  Returns when every process succeeded. Single-process runs return (or
  raise `error`) at once.
  """
  client = _client()
  procs = processes if processes is not None else participants()
  me = jax.process_index()
  if len(procs) <= 1 or client is None or me not in procs:
    if error is not None:
      raise error
    return
  # Overwritable: a checkpoint name forgotten by next_key and used again
  # reuses its keys (barrier ids are reusable; values are read only after
  # the barrier, which every process passes after publishing its own).
  client.key_value_set(f"{key}/{me}", "ok" if error is None else f"error: {error}"[:4000],
                       allow_overwrite=True)
  try:
    orbax_multihost().get_barrier_sync_fn(processes=set(procs))(
        key=f"{key}/barrier", timeout_ms=max(1, int(timeout_s * 1000)))
  except Exception as e:  # pylint: disable=broad-except  (the runtime raises its own types)
    try:
      if error is not None:
        raise error
      absent = [p for p in procs if p != me and _outcome(client, f"{key}/{p}") is None]
      raise failure(f"process(es) {absent or 'of the job'} did not take part in the {operation} "
                    f"of {checkpoint or 'this checkpoint'} within {timeout_s:.0f} s (gone, slow, or "
                    f"at another checkpoint: every process must {operation} the same ones in the "
                    f"same order; {type(e).__name__}); {consequence}") from e
    finally:   # (a late process counts on arrival; one that never comes leaves the keys)
      _done_reading(client, key, procs)
  try:
    if error is not None:
      raise error
    for p in procs:
      if p == me:
        continue
      outcome = _outcome(client, f"{key}/{p}")   # published before the barrier
      if outcome != "ok":
        raise failure(f"process {p} failed its part of the {operation} ({outcome}); "
                      f"{consequence}")
  finally:
    _done_reading(client, key, procs)


def _done_reading(client, key: str, procs: list[int]) -> None:
  """Counts this process as done reading the outcomes under `key`; the last
  of `procs` deletes them and the count. (Where the runtime cannot count or
  is shutting down, the keys stay: an agreement needs them, not this.)"""
  try:
    if client.key_value_increment(f"{key}/read", 1) == len(procs):
      for p in procs:
        client.key_value_delete(f"{key}/{p}")
      client.key_value_delete(f"{key}/read")
  except Exception:  # pylint: disable=broad-except  (the runtime raises its own types)
    pass


def delete_key(key: str) -> None:
  """Deletes `key` from the key-value store, if there is one (quietly: a key
  already gone, or a runtime shutting down, is not an error here)."""
  client = _client()
  if client is None:
    return
  try:
    client.key_value_delete(key)
  except Exception:  # pylint: disable=broad-except  (the runtime raises its own types)
    pass


def _outcome(client, key: str) -> str | None:
  """The value published under `key`, or None when there is none."""
  try:
    return client.key_value_try_get(key)
  except Exception:  # pylint: disable=broad-except  (not found: the runtime's own error type)
    return None
