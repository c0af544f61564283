"""Crash consistency: SIGKILL of a saving process at random moments (while
it snapshots, writes, syncs, or inside the commit); the latest committed step
always restores bit-exact.

The saving child is this very file run as a script with a role
(`python tests/test_crash.py crash_saver DIR`), so its code is ordinary,
readable Python.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import (FastPersistError, FastPersistHandler, FastPersistOptions,
                             FastPersistRestore, FastPersistSave)
from helpers import MiB, assert_tree_bytes_equal, child_env

HERE = os.path.abspath(__file__)

# Small staging so that a handler costs little memory; slabs of 1 MiB so that
# a few-MiB checkpoint is staged and written as several windows.
SMALL = dict(host_memory_limit=16 * MiB, staging_slab_bytes=1 * MiB)


CRASH_SHAPE = (512, 1024)      # uint32: 2 MiB, sharded
CRASH_HOST = 256 * 1024        # float32: 1 MiB, numpy


def crash_state(step: int, sharding=None) -> dict:
  """The state saved at `step`: every bit is a function of the step."""
  n = CRASH_SHAPE[0] * CRASH_SHAPE[1]
  w = (np.arange(n, dtype=np.uint32) * np.uint32(2654435761)) ^ np.uint32(
      (step * 0x9E3779B9 + 1) & 0xFFFFFFFF)
  w = w.reshape(CRASH_SHAPE)
  host = np.arange(CRASH_HOST, dtype=np.float32) * np.float32(step + 1)
  return {"w": jax.device_put(w, sharding) if sharding is not None else w,
          "host": host, "step": step}


def _slow_finalize_handler() -> FastPersistHandler:
  """A handler that announces finalize (Orbax calls it right before the
  commit rename) and lingers there, so the parent can kill inside the commit."""
  handler = FastPersistHandler(FastPersistOptions(**SMALL))
  finalize = handler.finalize

  def announced_finalize(directory):
    print(f"finalizing {os.path.basename(os.path.dirname(os.fspath(directory)))}", flush=True)
    time.sleep(0.05)
    finalize(directory)
  handler.finalize = announced_finalize
  return handler


def _child_crash_saver(directory: str) -> None:
  """Saves steps latest+1, latest+2, ... until killed."""
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  mngr = ocp.CheckpointManager(directory, item_handlers=_slow_finalize_handler(),
                               options=ocp.CheckpointManagerOptions(max_to_keep=3))
  latest = mngr.latest_step()
  step = 0 if latest is None else latest + 1
  print(f"start {step}", flush=True)
  while True:
    state = crash_state(step, sharding)
    print(f"saving {step}", flush=True)
    mngr.save(step, args=FastPersistSave(state))
    print(f"saved {step}", flush=True)  # => step - 1 is committed (save waits for it)
    step += 1


class _Child:
  """A child process whose stdout lines are collected by a thread; it waits
  for `go` (a line on its stdin) before it starts its work."""

  def __init__(self, cmd, env, stderr_path):
    self._stderr = open(stderr_path, "wb")
    self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self._stderr, text=True, bufsize=1)
    self.lines: list[str] = []
    self._cond = threading.Condition()
    self._reader = threading.Thread(target=self._read, daemon=True)
    self._reader.start()
    self._stderr_path = stderr_path

  def _read(self):
    for line in self.proc.stdout:
      with self._cond:
        self.lines.append(line.strip())
        self._cond.notify_all()
    with self._cond:
      self.lines.append(None)
      self._cond.notify_all()

  def go(self) -> None:
    self.proc.stdin.write("go\n")
    self.proc.stdin.flush()

  def wait_for(self, prefix: str, count: int = 1, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    with self._cond:
      while sum(1 for l in self.lines if l and l.startswith(prefix)) < count:
        if None in self.lines or time.monotonic() > deadline:
          self.kill()
          raise AssertionError(f"child did not print {count} x {prefix!r}; stdout "
                               f"{self.lines[-5:]}, stderr:\n{self.stderr_tail()}")
        self._cond.wait(0.05)

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.send_signal(signal.SIGKILL)
    self.proc.wait()
    self.proc.stdin.close()
    self._reader.join(10)
    self._stderr.close()

  def stderr_tail(self) -> str:
    if not self._stderr.closed:
      self._stderr.flush()
    with open(self._stderr_path, "rb") as f:
      return f.read()[-3000:].decode(errors="replace")

  def steps(self, prefix: str) -> list[int]:
    return [int(l.split()[1]) for l in self.lines if l and l.startswith(prefix + " ")]


def test_crash_consistency_under_sigkill(mesh, tmp_path):
  root = os.fspath(tmp_path / "ckpts")
  rng = random.Random(2024)
  handler = FastPersistHandler(FastPersistOptions(**SMALL))
  target = {"w": jax.ShapeDtypeStruct(CRASH_SHAPE, np.uint32, sharding=NamedSharding(mesh, P("data"))),
            "host": np.zeros(CRASH_HOST, np.float32), "step": 0}
  kills, mid_save, committed_before = 12, 0, -1
  history, half_deleted = [], []

  def spawn(k: int) -> _Child:
    # Started one kill ahead (it imports and starts JAX meanwhile), it
    # touches `root` only once told to go.
    return _Child([sys.executable, HERE, "crash_saver", root],
                  child_env(4, FASTPERSIST_ENGINE=None), tmp_path / f"stderr.{k}")
  following = spawn(0)
  try:
    for k in range(kills):
      child, following = following, None
      try:
        child.go()
        if k + 1 < kills:
          following = spawn(k + 1)
        child.wait_for("start", timeout=120)
        mode = k % 4
        if mode == 0:    # shortly after a save starts: snapshot, tmp dir creation
          child.wait_for("saving", rng.randint(1, 3))
        elif mode == 1:  # shortly after a save returned: its writes, fsyncs, rename
          child.wait_for("saved", rng.randint(1, 3))
        elif mode == 3:  # inside finalize, just before Orbax's commit rename
          child.wait_for("finalizing", rng.randint(1, 3))
        time.sleep(rng.uniform(0, 0.4 if mode == 2 else 0.03))
      finally:
        child.kill()
      saved = child.steps("saved")
      leftovers = sorted(n for n in os.listdir(root) if "tmp" in n) if os.path.isdir(root) else []
      mid_save += bool(leftovers)

      # A fresh manager sees a committed latest step that restores bit-exact.
      mngr = ocp.CheckpointManager(root, item_handlers=handler,
                                   options=ocp.CheckpointManagerOptions(read_only=True))
      try:
        latest = mngr.latest_step()
        history.append((k, mode, child.steps("start"), saved[-1:], latest, leftovers))
        if saved and saved[-1] >= 1:  # `saved s` comes after save(s) waited for s - 1's commit
          assert latest is not None and latest >= saved[-1] - 1, history
        if latest is None:
          assert committed_before < 0, f"committed steps vanished: {history}"
          continue
        assert latest >= committed_before, f"latest step went back: {history}"
        committed_before = latest
        out = mngr.restore(latest, args=FastPersistRestore(target))
        assert_tree_bytes_equal(crash_state(latest), out)
        # Older steps restore bit-exact too, except one that Orbax was deleting
        # (max_to_keep=3) when the kill came: Orbax removes a step in place, so
        # that one is still listed, half gone. It must fail loudly (never give
        # other data), and can only be older than the 3 steps kept.
        steps = sorted(mngr.all_steps())
        for step in steps:
          if step != latest:
            try:
              assert_tree_bytes_equal(crash_state(step),
                                      mngr.restore(step, args=FastPersistRestore(target)))
            except (FastPersistError, KeyError, FileNotFoundError, ValueError) as e:
              assert step not in steps[-3:], f"kept step {step} does not restore: {e!r} {history}"
              half_deleted.append((step, type(e).__name__))
      finally:
        mngr.close()
  finally:
    if following is not None:
      following.kill()
  handler.close()
  assert committed_before >= 6, f"too few saves got through: {history} {half_deleted}"
  # Most kills must have hit a save in progress, i.e. left an uncommitted tmp dir.
  assert mid_save >= kills // 3, f"only {mid_save} of {kills} kills interrupted a save: {history}"


if __name__ == "__main__":
  if sys.argv[1:2] == ["crash_saver"]:   # the child process of the test above
    jax.devices()   # the runtime is up: what is left is the saving
    if sys.stdin.readline() != "go\n":   # end of file: the test ended first
      sys.exit(0)
    _child_crash_saver(*sys.argv[2:])
  else:  # run as a test binary (Bazel's py_test runs this file): the tests themselves
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
