"""Multi-process saves and restores: every process learns whether all the
others succeeded.

Orbax's barriers coordinate the commit, but a barrier carries no outcome: a
process whose write failed would leave the others waiting until the barrier
times out. Through the key-value store of JAX's distributed runtime (the one
`jax.distributed.initialize` starts, which Orbax uses too), each process
publishes "ok" or its error once its part is durable, then reads everyone
else's: one failure makes every process raise at once, and a process that
died makes the rest raise after `timeout_s`, not hang. Restores agree the
same way: Orbax's restore ends in a barrier without a timeout, which a
process whose restore raised never reaches.
"""

from __future__ import annotations

import time

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


def agree(key: str, error: BaseException | None, timeout_s: float, *,
          operation: str = "save", failure: type[Exception] = SaveError,
          consequence: str = "the checkpoint is not committed") -> None:
  """Publishes this process's outcome of `operation` under `key`, then waits
  for all others'.

  Raises `error` (if set), or `failure` naming the first other process that
  failed or did not answer within `timeout_s` seconds, and `consequence`.
  Single-process runs return (or raise `error`) at once.
  """
  client = _client()
  n, me = jax.process_count(), jax.process_index()
  if n == 1 or client is None:
    if error is not None:
      raise error
    return
  client.key_value_set(f"{key}/{me}", "ok" if error is None else f"error: {error}"[:4000])
  if error is not None:
    raise error
  deadline = time.monotonic() + timeout_s
  for p in range(n):
    if p == me:
      continue
    remaining_ms = max(1, int((deadline - time.monotonic()) * 1000))
    try:
      outcome = client.blocking_key_value_get(f"{key}/{p}", remaining_ms)
    except Exception as e:  # pylint: disable=broad-except  (the runtime raises its own types)
      raise failure(f"process {p} did not finish its part of the {operation} within "
                    f"{timeout_s:.0f} s ({type(e).__name__}); {consequence}") from e
    if outcome != "ok":
      raise failure(f"process {p} failed its part of the {operation} ({outcome}); {consequence}")
