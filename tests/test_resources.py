"""Resource stability: 100 saves through a CheckpointManager leave no growth
in file descriptors, threads or RSS."""

from __future__ import annotations

import gc
import os
import sys
import threading

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import (FastPersistHandler, FastPersistOptions, FastPersistRestore,
                             FastPersistSave)
from helpers import MiB, abstract, assert_tree_bytes_equal

# Small staging so that a handler costs little memory; slabs of 1 MiB so that
# a few-MiB checkpoint is staged and written as several windows.
SMALL = dict(host_memory_limit=16 * MiB, staging_slab_bytes=1 * MiB)


def _resources() -> dict[str, int]:
  gc.collect()
  status = dict(line.split(":", 1) for line in open("/proc/self/status") if ":" in line)
  return {"fds": len(os.listdir("/proc/self/fd")),
          "py_threads": threading.active_count(),
          "os_threads": int(status["Threads"]),
          "rss_kib": int(status["VmRSS"].split()[0])}


def test_resources_stable_over_100_saves(mesh, tmp_path):
  sharding = NamedSharding(mesh, P("data", "model"))
  base = np.arange(128 * 256, dtype=np.float32).reshape(128, 256)
  h = FastPersistHandler(FastPersistOptions(**SMALL))
  seen = {}
  with ocp.CheckpointManager(tmp_path / "ckpts", item_handlers=h,
                             options=ocp.CheckpointManagerOptions(max_to_keep=2)) as mngr:
    for step in range(1, 101):
      tree = {"w": jax.device_put(base + step, sharding), "host": np.full(3000, step, np.int32),
              "step": step}
      mngr.save(step, args=FastPersistSave(tree))
      if step in (10, 100):
        mngr.wait_until_finished()
        seen[step] = _resources()
    assert mngr.all_steps() == [99, 100]
    assert_tree_bytes_equal(tree, mngr.restore(100, args=FastPersistRestore(abstract(tree))))
  h.close()
  a, b = seen[10], seen[100]
  assert b["fds"] - a["fds"] <= 2, seen
  assert b["py_threads"] - a["py_threads"] <= 2, seen
  assert b["os_threads"] - a["os_threads"] <= 2, seen
  assert b["rss_kib"] - a["rss_kib"] <= 48 * 1024, seen


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
