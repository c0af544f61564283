"""Pausing Python's automatic cyclic garbage collection while a save or a
restore does its Python work.

A checkpoint's Python work allocates several container objects per leaf
(records, plans, JSON documents, arrays). Every 700 allocations the
collector runs, and after enough of those a full collection traverses every
tracked object of the process, jax's included, holding the GIL: with 10,000
small leaves, 0.1-0.15 s each on a 2-core VM, 0.2 s of a 0.7 s restore and
0.5-0.7 s of GIL (4-6 full collections) taken from the training thread by
one save. With the pause: a restore 0.2 s faster, a save's collections
0.01-0.12 s, and the save 0.35-0.5 s instead of 0.9-1.1 s.

What is paused:
  * a restore (and reading a checkpoint's metadata), and a save's tree
    check, plan and snapshot: calls on the caller's thread, which waits for
    them anyway. The pause lasts the call, waits included (reads; a
    snapshot waiting for staging space; the agreement of several
    processes, at most commit_timeout_s).
  * in a save's background, only the encoding and checking of its manifests:
    a burst of CPU work without waits. The background's waits are never
    paused: with a checkpoint every step, the collector would seldom run.

How: the collector's threshold 0 is set to 0, which disables automatic
collection (Python's gc.set_threshold documentation), and put back when the
last overlapping pause ends, unless someone set other thresholds meanwhile.
gc.enable(), gc.disable() and gc.collect() keep working, whatever their
thread: a user's gc.disable() stays. A process forked during a pause starts
without it (os.register_at_fork). An exception (KeyboardInterrupt) ends the
pause it interrupts, wherever it lands; landing in the pause's own few
bytecodes of bookkeeping, it may leave collection paused until the next
pause ends (a pause is known by a weakly held token, so one whose generator
is gone never holds the others up).
"""

from __future__ import annotations

import contextlib
import gc
import os
import threading
import weakref
from typing import Iterator


class _Token:
  """Stands for one running pause (weakly referenced: see the module docstring)."""


_lock = threading.Lock()
_active: weakref.WeakSet[_Token] = weakref.WeakSet()   # the pauses running
_saved: tuple[int, ...] | None = None          # the thresholds the first pause found


@contextlib.contextmanager
def paused() -> Iterator[None]:
  """Pauses automatic cyclic collection for the `with` block (see the
  module docstring); overlapping blocks, in any threads, share one pause.
  Reference counting still frees what the block drops; the cycles it leaves
  (an exception's traceback) are collected after the pause."""
  global _saved
  token = _Token()
  try:
    with _lock:
      if _saved is None:
        _saved = gc.get_threshold()
      _active.add(token)
      gc.set_threshold(0, *_saved[1:])
    yield
  finally:
    with _lock:
      _active.discard(token)
      if not _active and _saved is not None:
        if gc.get_threshold()[0] == 0:   # else: thresholds set meanwhile, theirs stand
          gc.set_threshold(*_saved)
        _saved = None


def is_paused() -> bool:
  """Whether a save or restore is pausing automatic collection now."""
  with _lock:
    return bool(_active)


def _after_fork_in_child() -> None:
  """A forked child has none of its parent's other threads: no pause runs."""
  global _lock, _saved
  _lock = threading.Lock()
  _active.clear()
  if _saved is not None:
    if gc.get_threshold()[0] == 0:
      gc.set_threshold(*_saved)
    _saved = None


if hasattr(os, "register_at_fork"):
  os.register_at_fork(after_in_child=_after_fork_in_child)
