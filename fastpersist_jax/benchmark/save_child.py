"""The save benchmark's child process: one checkpointer, one round.

Run by save_bench as `python -m fastpersist_jax.benchmark.save_child CFG
OUT` (children.run_child): builds the tree of trees.py from CFG, measures
saves, a cold restore and (FastPersist) the snapshot modes, and writes the
result as JSON to OUT (see run_round).
"""

from __future__ import annotations

import os
import shutil
import sys
import time

from fastpersist_jax.benchmark import children, common, rss, stats, trees


def run_round(cfg: dict) -> dict:
  """One checkpointer's round: builds the tree, saves it twice (first and
  steady), restores the steady checkpoint cold and checks it, and for
  FastPersist times the snapshot modes. Deletes the checkpoints it wrote.

  Args:
    cfg: {"method": "fastpersist" | "orbax", "round": int, "workdir": str,
      "spec": trees.tree_spec(...), "seed": int, "bytes": the tree's bytes,
      "devices": int, "host_memory_limit": bytes or None, "snapshot": mode or
      None, "snapshot_modes": [mode, ...]}.

  Returns:
    {"method", "round", "pid", "build_s", "baseline_rss_bytes",
     "rss_peak_resettable", "saves": [first, steady], "evicted_with",
     "restore": {"seconds", "gbps", "peak_extra_rss_bytes"}} (and for
    FastPersist "engine", "options", "modes": {mode: [blocking s, ...]},
    "memcpy_s"); each save {"which", "blocking_s", "finished_s", "synced_s",
    "gbps_finished", "gbps_synced" (1e9 bytes/s), "peak_extra_rss_bytes",
    "rss_after_bytes", "disk_bytes"} (and FastPersist's "handler_stats").

  Raises:
    RuntimeError: the child sees another device count than planned, built
      another number of bytes, or a checkpoint is missing after its save.
    AssertionError: the restored tree differs from the saved one.
  """
  import gc
  import jax
  import orbax.checkpoint as ocp
  from fastpersist_jax import (FastPersistHandler, FastPersistOptions, FastPersistRestore,
                               FastPersistSave)

  method, workdir = cfg["method"], cfg["workdir"]
  spec = cfg["spec"]
  if len(jax.devices()) != cfg["devices"]:
    raise RuntimeError(f"child sees {len(jax.devices())} devices, the parent planned for "
                       f"{cfg['devices']}")
  t = time.perf_counter()
  tree = trees.build_tree(spec, cfg["seed"])
  build_s = time.perf_counter() - t
  nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
  if nbytes != cfg["bytes"]:
    raise RuntimeError(f"built {nbytes} bytes, planned {cfg['bytes']}")
  gc.collect()
  probe = rss.Rss()
  baseline = probe.current()
  result = {"method": method, "round": cfg["round"], "pid": os.getpid(), "build_s": build_s,
            "baseline_rss_bytes": baseline, "rss_peak_resettable": probe.resettable}

  if method == "fastpersist":
    kw = {}
    if cfg.get("host_memory_limit") is not None:
      kw["host_memory_limit"] = cfg["host_memory_limit"]
    if cfg.get("snapshot") is not None:
      kw["snapshot"] = cfg["snapshot"]
    handler = FastPersistHandler(FastPersistOptions(**kw))
    result["engine"] = handler.engine_kind
    result["options"] = {k: getattr(handler.options, k, None) for k in
                         ("host_memory_limit", "queue_depth", "chunk_bytes", "staging_slab_bytes",
                          "snapshot")}
    save_args = lambda: FastPersistSave(tree)  # pylint: disable=unnecessary-lambda-assignment
    restore_args = FastPersistRestore
  else:
    handler = ocp.StandardCheckpointHandler()
    save_args = lambda: ocp.args.StandardSave(tree)  # pylint: disable=unnecessary-lambda-assignment
    restore_args = ocp.args.StandardRestore
  ckptr = ocp.AsyncCheckpointer(handler)

  saves = []
  paths = []
  try:
    for which in ("first", "steady"):
      path = os.path.join(workdir, f"{method}.r{cfg['round']}.{which}")
      paths.append(path)
      os.sync()
      probe.reset()
      t0 = time.perf_counter()
      ckptr.save(path, args=save_args())
      t1 = time.perf_counter()
      ckptr.wait_until_finished()
      t2 = time.perf_counter()
      os.sync()
      t3 = time.perf_counter()
      s = {"which": which, "blocking_s": t1 - t0, "finished_s": t2 - t0, "synced_s": t3 - t0,
           "gbps_finished": stats.gbps(nbytes, t2 - t0), "gbps_synced": stats.gbps(nbytes, t3 - t0),
           "peak_extra_rss_bytes": probe.peak() - baseline,
           "rss_after_bytes": probe.current() - baseline,
           "disk_bytes": common.dir_bytes(path)}
      if method == "fastpersist":
        s["handler_stats"] = dict(handler.last_save_stats)
      if not os.path.isdir(path):
        raise RuntimeError(f"{method}: {path} is missing after the save finished")
      saves.append(s)
      if which == "first":  # one checkpoint on disk at a time
        shutil.rmtree(path)
        os.sync()
    result["saves"] = saves

    # Restore the steady-state checkpoint, cold.
    path = paths[-1]
    mesh_tree = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                             tree)
    result["evicted_with"] = common.evict(path)
    gc.collect()
    probe.reset()
    before = probe.current()
    t0 = time.perf_counter()
    restored = ckptr.restore(path, args=restore_args(mesh_tree))
    jax.block_until_ready(restored)
    seconds = time.perf_counter() - t0
    result["restore"] = {"seconds": seconds, "gbps": stats.gbps(nbytes, seconds),
                         "peak_extra_rss_bytes": probe.peak() - before}
    _check_equal(tree, restored)
    del restored
    if method == "fastpersist" and cfg.get("snapshot_modes"):
      ckptr.close()
      result["modes"] = _blocking_by_mode(tree, cfg["snapshot_modes"], workdir, cfg["round"],
                                          save_args)
      result["memcpy_s"] = _memcpy_seconds(nbytes)
  finally:
    ckptr.close()
    for p in paths:
      shutil.rmtree(p, ignore_errors=True)
  return result


def _blocking_by_mode(tree, modes: list[str], workdir: str, rnd: int, save_args) -> dict:
  """{mode: [blocking s of each steady save]}: six saves per mode, the first
  (pool allocation, plan) left out."""
  import orbax.checkpoint as ocp
  from fastpersist_jax import FastPersistHandler, FastPersistOptions
  out = {}
  for mode in modes:
    ckptr = ocp.AsyncCheckpointer(FastPersistHandler(FastPersistOptions(snapshot=mode)))
    times = []
    try:
      for k in range(6):
        path = os.path.join(workdir, f"mode.{mode}.r{rnd}.{k}")
        t0 = time.perf_counter()
        ckptr.save(path, args=save_args())
        times.append(time.perf_counter() - t0)
        ckptr.wait_until_finished()
        shutil.rmtree(path, ignore_errors=True)
    finally:
      ckptr.close()
    out[mode] = times[1:]
  return out


def _memcpy_seconds(nbytes: int) -> float:
  """One single-threaded copy of `nbytes` between pre-faulted buffers (median of 3)."""
  import numpy as np
  src = np.ones(nbytes, np.uint8)
  dst = np.zeros(nbytes, np.uint8)
  dst.fill(1)   # fault every page in before timing
  times = []
  for _ in range(3):
    t0 = time.perf_counter()
    np.copyto(dst, src)
    times.append(time.perf_counter() - t0)
  return stats.med(times)


def _check_equal(tree, restored) -> None:
  import numpy as np
  if set(tree) != set(restored):
    raise AssertionError(f"restored keys differ: {sorted(set(tree) ^ set(restored))[:5]}")
  for name, x in tree.items():
    y = restored[name]
    if x.shape != y.shape or x.dtype != y.dtype:
      raise AssertionError(f"{name}: restored {y.shape} {y.dtype}, saved {x.shape} {x.dtype}")
    if not y.sharding.is_equivalent_to(x.sharding, x.ndim):
      raise AssertionError(f"{name}: restored sharding {y.sharding} != {x.sharding}")
    ys = {s.device: s for s in y.addressable_shards}
    for s in x.addressable_shards:
      a = np.asarray(s.data)
      b = np.asarray(ys[s.device].data)
      if s.index != ys[s.device].index or a.tobytes() != b.tobytes():
        raise AssertionError(f"{name}: restored shard on {s.device} differs from the saved one")


def _run_round_with_rusage(cfg: dict) -> dict:
  result = run_round(cfg)
  result["ru_maxrss_self_bytes"] = rss.max_rss_self_bytes()
  return result


if __name__ == "__main__":
  sys.exit(children.child_main(sys.argv[1:], _run_round_with_rusage))

