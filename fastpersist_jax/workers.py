"""Threads for the background stages of saves, reused from one save to the next.

A save runs up to three long tasks (background copy, checksum, copy batches)
besides Orbax's commit thread. Starting fresh threads for them on every save
costs the blocking path a scheduler round trip each on a busy host, so idle
threads wait for the next save instead (and exit after a minute unused).

The set of workers is unbounded on purpose: the stages of a save wait on each other,
so a task must never queue behind another task.

Each set's threads run at its niceness and, optionally, on a set of
CPUs (FastPersistOptions.background_nice / background_cpus), set once when
the thread starts; the C++ helper threads they start inherit both.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from typing import Any, Callable

logger = logging.getLogger(__name__)

_IDLE_TIMEOUT_S = 60.0


class Task:
  """A function running on a worker; join() waits for it to return."""

  def __init__(self):
    self._done = threading.Event()

  def join(self, timeout: float | None = None) -> bool:
    return self._done.wait(timeout)


class Workers:
  """Runs functions on reused daemon threads at a given priority."""

  def __init__(self, name: str, nice: int = 0, cpus: tuple[int, ...] | None = None):
    self._name = name
    self._nice = nice
    self._cpus = cpus
    self._lock = threading.Lock()
    self._idle: list[queue.SimpleQueue] = []
    self._count = 0

  def run(self, fn: Callable[..., Any], *args: Any) -> Task:
    """Starts fn(*args) on an idle worker, or a new one. Exceptions must be
    handled by fn (they are logged here, never lost silently)."""
    task = Task()
    with self._lock:
      inbox = self._idle.pop() if self._idle else None
      if inbox is None:
        self._count += 1
        inbox = queue.SimpleQueue()
        threading.Thread(target=self._serve, args=(inbox,), daemon=True,
                         name=f"{self._name}-{self._count}").start()
    inbox.put((fn, args, task))
    return task

  def _serve(self, inbox: queue.SimpleQueue) -> None:
    enter_background(self._nice, self._cpus)
    while True:
      try:
        fn, args, task = inbox.get(timeout=_IDLE_TIMEOUT_S)
      except queue.Empty:
        with self._lock:
          if inbox in self._idle:   # else run() just took it: its task is on the way
            self._idle.remove(inbox)
            return
        continue
      try:
        fn(*args)
      except BaseException:  # pylint: disable=broad-except
        logger.exception("fastpersist worker task %r failed", fn)
      finally:
        task._done.set()  # pylint: disable=protected-access
        with self._lock:
          self._idle.append(inbox)


_SHARED: dict[tuple, Workers] = {}
_SHARED_LOCK = threading.Lock()


def shared(nice: int = 0, cpus: tuple[int, ...] | None = None) -> Workers:
  """The shared set of worker threads at this niceness and CPU set."""
  key = (nice, tuple(sorted(cpus)) if cpus else None)
  with _SHARED_LOCK:
    if key not in _SHARED:
      _SHARED[key] = Workers("fastpersist-bg" if nice or cpus else "fastpersist", *key)
    return _SHARED[key]


def _forget_workers_in_child() -> None:
  # A forked child has none of the parent's threads: idle workers it would
  # hand tasks to do not exist there.
  global _SHARED_LOCK
  _SHARED.clear()
  _SHARED_LOCK = threading.Lock()


os.register_at_fork(after_in_child=_forget_workers_in_child)

_entered = threading.local()


def enter_background(nice: int, cpus: tuple[int, ...] | None) -> None:
  """Lowers the calling thread's priority by `nice` and binds it to `cpus`
  (Linux schedules threads, and the kernel work io_uring does on their
  behalf, by both). Once per thread; best effort."""
  if getattr(_entered, "done", False):
    return
  _entered.done = True
  if nice > 0:
    try:
      tid = threading.get_native_id()
      os.setpriority(os.PRIO_PROCESS, tid, min(19, os.getpriority(os.PRIO_PROCESS, tid) + nice))
    except (OSError, AttributeError):
      pass
  if cpus:
    try:
      os.sched_setaffinity(0, cpus)   # 0: the calling thread
    except (OSError, AttributeError, ValueError) as e:
      logger.warning("Could not bind checkpoint threads to CPUs %s: %s", cpus, e)
