"""The processes' part of test_break_v3_pipeline's two-process test (scenario
"swap_threshold" of tests/mp_worker.py, run in conftest's shared launch).

A per-host checkpoint with replica-parallel parts (host redundancy 1): each
host holds half of every replicated shard and receives the rest from the
other (restore._BatchReads.copies). Parts of 4 KiB to 128 KiB, in batches
of at most 3 leaves and 100 KiB, staged or not, checked or not; restored as
saved and into an abstract target.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import (FastPersistHandler, FastPersistOptions, FastPersistRestore,
                             FastPersistSave, disk_format)
from fastpersist_jax import restore as restore_lib

from helpers import KiB, abstract


def run(pid: int, root: str) -> dict:
  """This process's part (of 2, JAX initialized by tests/mp_worker.py), in
  `root`; returns {"bad": first mismatches, "restores": count, "swapped":
  whether the hosts swapped parts}. Leaves restore's module settings as it
  found them."""
  saved_settings = restore_lib._MAX_BATCH_LEAVES, restore_lib._STAGE_ON_CPU  # pylint: disable=protected-access
  try:
    return _swap(pid, root)
  finally:
    restore_lib._MAX_BATCH_LEAVES, restore_lib._STAGE_ON_CPU = saved_settings  # pylint: disable=protected-access


def _swap(pid: int, root: str) -> dict:
  mesh = jax.make_mesh((2, 2), ("data", "model"))
  rng = np.random.default_rng(3)
  hosts = {}
  for i, nbytes in enumerate([8 * KiB, 40 * KiB, 130 * KiB, 256 * KiB, 100, 70000]):
    n = nbytes // 8 or 1
    hosts[f"k{i}"] = np.frombuffer(rng.bytes(n * 8), np.float32).reshape(2, n).copy()
  saved = {k: jax.make_array_from_callback(
      h.shape, NamedSharding(mesh, P(None, "model") if i % 2 else P()),
      lambda idx, h=h: h[idx]) for i, (k, h) in enumerate(sorted(hosts.items()))}
  mp = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={pid})
  host_dir = os.path.join(root, f"host{pid}")
  os.makedirs(host_dir, exist_ok=True)
  bad, restores = [], 0
  restore_lib._MAX_BATCH_LEAVES = 3   # pylint: disable=protected-access
  for staged in (False, True):
    restore_lib._STAGE_ON_CPU = staged   # pylint: disable=protected-access
    for verify in (True, False):
      handler = FastPersistHandler(
          FastPersistOptions(replica_parallel=True, host_redundancy=1,
                             restore_batch_bytes=100 * KiB, verify_checksums=verify,
                             staging_slab_bytes=512 * KiB, host_memory_limit=4 << 20),
          multiprocessing_options=mp)
      with ocp.CheckpointManager(host_dir, item_handlers=handler,
                                 options=ocp.CheckpointManagerOptions(
                                     multiprocessing_options=mp, create=False,
                                     async_options=ocp.AsyncOptions(
                                         create_directories_asynchronously=False))) as mngr:
        if mngr.latest_step() is None:
          mngr.save(0, args=FastPersistSave(saved))
          mngr.wait_until_finished()
          item = os.path.join(host_dir, "0", "default")
          swapped = disk_format.read_metadata(item).save_id is not None
          held = sum(os.path.getsize(os.path.join(item, f)) for f in os.listdir(item)
                     if f.startswith("data."))
        for target in (None, abstract(saved)):
          restored = mngr.restore(0, args=FastPersistRestore(target))
          restores += 1
          for k, h in hosts.items():
            for shard in restored[k].addressable_shards:
              if np.asarray(shard.data).tobytes() != h[shard.index].tobytes():
                bad.append(f"staged={staged} verify={verify} {k} {shard.index}")
  total = sum(h.nbytes for h in hosts.values())
  return {"bad": bad[:5], "restores": restores, "swapped": swapped and held < total}
