"""Out of space: ENOSPC on a small tmpfs gives a clear error, the previous
step stays intact and the next save that fits works."""

from __future__ import annotations

import errno
import faulthandler
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from conftest import mounted_tmpfs
from fastpersist_jax import (FastPersistError, FastPersistHandler, FastPersistOptions,
                             FastPersistRestore, FastPersistSave)
from helpers import MiB, abstract, assert_tree_bytes_equal

# Small staging so that a handler costs little memory; slabs of 1 MiB so that
# a few-MiB checkpoint is staged and written as several windows.
SMALL = dict(host_memory_limit=16 * MiB, staging_slab_bytes=1 * MiB)


def small_tmpfs(size: str):
  return mounted_tmpfs(f"size={size}")


def _errnos_in_chain(e: BaseException) -> list:
  seen, out = set(), []
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    out.append(getattr(e, "errno", None))
    e = e.__cause__ or e.__context__
  return out


def _sharded_tree(mesh, rows: int, seed: int) -> dict:
  """rows x 1024 float32 (rows * 4 KiB), sharded over the whole mesh."""
  rng = np.random.default_rng(seed)
  return {"w": jax.device_put(rng.standard_normal((rows, 1024), np.float32),
                              NamedSharding(mesh, P("data", "model"))),
          "seed": seed}


def test_out_of_space(mesh):
  h = FastPersistHandler(FastPersistOptions(**SMALL))
  with small_tmpfs("8m") as mnt:
    # Through a CheckpointManager: step 0 fits, step 1 (7 MiB more) does not.
    root = os.path.join(mnt, "ckpts")
    mngr = ocp.CheckpointManager(root, item_handlers=h,
                                 options=ocp.CheckpointManagerOptions(max_to_keep=5))
    step0 = _sharded_tree(mesh, 512, seed=0)     # 2 MiB
    mngr.save(0, args=FastPersistSave(step0))
    mngr.wait_until_finished()
    faulthandler.dump_traceback_later(120, exit=True)
    try:
      with pytest.raises(Exception) as ei:
        mngr.save(1, args=FastPersistSave(_sharded_tree(mesh, 1792, seed=1)))  # 7 MiB
        mngr.wait_until_finished()
      assert errno.ENOSPC in _errnos_in_chain(ei.value), (
          f"no ENOSPC in the chain of {ei.value!r}: {_errnos_in_chain(ei.value)}")
      # Step 0 is intact and still the latest; step 1 was never committed, and
      # its partial data files are gone (the space is free again).
      for m in (mngr, ocp.CheckpointManager(root, item_handlers=FastPersistHandler(),
                                            options=ocp.CheckpointManagerOptions(read_only=True))):
        m.reload()
        assert m.latest_step() == 0 and m.all_steps() == [0]
      assert "1" not in os.listdir(root)
      for name in os.listdir(root):
        if "tmp" in name:
          for dirpath, _, files in os.walk(os.path.join(root, name)):
            assert not [f for f in files if f.startswith("data.")], (dirpath, files)
      assert_tree_bytes_equal(step0, mngr.restore(0, args=FastPersistRestore(abstract(step0))))
      # The same handler (and staging pool) saves again once the tree fits.
      step2 = _sharded_tree(mesh, 512, seed=2)
      mngr.save(2, args=FastPersistSave(step2))
      mngr.wait_until_finished()
      assert mngr.latest_step() == 2
      assert_tree_bytes_equal(step2, mngr.restore(2, args=FastPersistRestore(abstract(step2))))
      mngr.close()

      # The handler alone: a SaveError caused by ENOSPC; nothing left behind.
      shutil.rmtree(root)
      d = os.path.join(mnt, "direct")
      os.mkdir(d)
      with pytest.raises(FastPersistError) as ei:
        h.save(d, args=FastPersistSave(_sharded_tree(mesh, 2304, seed=3)))  # 9 MiB
      assert errno.ENOSPC in _errnos_in_chain(ei.value), _errnos_in_chain(ei.value)
      assert not [f for f in os.listdir(d) if f.startswith("data.")], os.listdir(d)
      again = _sharded_tree(mesh, 1024, seed=4)
      h.save(d, args=FastPersistSave(again))
      assert_tree_bytes_equal(again, h.restore(d, args=FastPersistRestore(abstract(again))))
    finally:
      faulthandler.cancel_dump_traceback_later()
  h.close()


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
