"""Snapshot from accelerator memory: FastPersist's device-to-host path vs jax.device_get.

Builds a tree of about --size_gib GiB on every local device: --leaf_mib
float32 matrices sharded by rows over a 1-D mesh, plus a few small bfloat16
vectors replicated on every device. Then, in this one process:

  device_get   jax.device_get(tree): numpy copies of every array on the host,
               the plain device-to-host rate (--rounds times);
  fastpersist  ocp.AsyncCheckpointer(FastPersistHandler(snapshot=--snapshot))
               saves, --rounds + 1 times (the first, which allocates the
               staging pool, is reported apart): blocking ms of save();
               snapshot GB/s = bytes / the handler's snapshot time (transfers
               into pinned host memory, started ahead, plus the copy into the
               staging pool); durable GB/s until wait_until_finished();
  restore      onto the same shardings, compared on the devices bit for bit;
  cold restore a fresh process restores the last checkpoint (page cache
               emptied) onto the same shardings: GB/s, peak extra host RSS
               (bounded by the staging pool on an accelerator), bit-exact;
               beside it jax.device_put of the same bytes from pinned host
               memory (the host-to-device limit) and fio's O_DIRECT read of a
               file of the same size (the disk's limit; where fio exists).

It also reports whether numpy reads a "pinned_host" array in place (the
staging copy then reads the pinned transfer buffer without another copy).
On CPU devices it runs too, the "device-to-host" copies then being host
copies; it is meant for an accelerator host. The staging pool is sized to
hold the whole tree unless --host_memory_limit_gib says otherwise.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from fastpersist_jax.benchmark import children, common, rss, stats
from fastpersist_jax.benchmark.common import FIO_CHUNK, FIO_QUEUE_DEPTH, GiB, MiB

HELP = "device-to-host snapshot GB/s and blocking ms vs jax.device_get; restore bit-exact"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the device benchmark's flags to `parser`."""
  parser.add_argument("--size_gib", type=float, default=4.0, help="tree size in GiB (default 4)")
  parser.add_argument("--leaf_mib", type=float, default=64.0,
                      help="size of each large leaf in MiB (default 64)")
  parser.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
  parser.add_argument("--snapshot", default="copy", choices=("auto", "copy", "reference"),
                      help="FastPersistOptions.snapshot (default copy)")
  parser.add_argument("--host_memory_limit_gib", type=float, default=None,
                      help="staging pool size (default: the tree's size)")
  parser.add_argument("--dir", default=".", help="directory to write in (default: the current one)")
  parser.add_argument("--json", metavar="PATH", help="write every number to PATH as JSON")
  parser.add_argument("--fio", default="fio", help="fio binary (default: fio on PATH)")
  parser.add_argument("--no_fio", action="store_true", help="skip fio even where installed")


def _abstract_tree(size_bytes: int, leaf_bytes: int):
  """The tree's structure: ShapeDtypeStructs on a 1-D mesh of the local devices."""
  import jax
  import jax.numpy as jnp
  from jax.sharding import NamedSharding, PartitionSpec as P
  devices = jax.local_devices()
  mesh = jax.make_mesh((len(devices),), ("data",), devices=devices)
  cols = 4096
  rows = max(len(devices), leaf_bytes // (4 * cols) // len(devices) * len(devices))
  n = max(1, round(size_bytes / (rows * cols * 4)))
  return {"layers": [{"w": jax.ShapeDtypeStruct((rows, cols), jnp.float32,
                                                sharding=NamedSharding(mesh, P("data", None))),
                      "b": jax.ShapeDtypeStruct((1024,), jnp.bfloat16,
                                                sharding=NamedSharding(mesh, P()))}
                     for _ in range(n)]}


def _build_tree(size_bytes: int, leaf_bytes: int):
  """Deterministic random data in the structure of _abstract_tree."""
  import jax
  abstract = _abstract_tree(size_bytes, leaf_bytes)

  def make(x, seed):
    return jax.jit(lambda key: jax.random.normal(key, x.shape, x.dtype),
                   out_shardings=x.sharding)(jax.random.key(seed))
  tree = {"layers": [{"w": make(layer["w"], i), "b": make(layer["b"], 10_000 + i)}
                     for i, layer in enumerate(abstract["layers"])]}
  return jax.block_until_ready(tree)


def _cold_restore_child(cfg: dict) -> dict:
  """In a fresh process: restore cfg["path"] onto the devices, cold."""
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from fastpersist_jax import FastPersistHandler, FastPersistOptions, FastPersistRestore
  abstract = _abstract_tree(cfg["size_bytes"], cfg["leaf_bytes"])
  jax.devices()   # the runtime is up before the clock starts
  evicted = common.evict(cfg["path"])
  probe = rss.Rss()
  before = probe.current()
  ckptr = ocp.Checkpointer(FastPersistHandler(FastPersistOptions(
      host_memory_limit=cfg["host_memory_limit"])))
  try:
    t0 = time.perf_counter()
    restored = jax.block_until_ready(ckptr.restore(cfg["path"], args=FastPersistRestore(abstract)))
    seconds = time.perf_counter() - t0
  finally:
    ckptr.close()
  peak = probe.peak() - before
  expected = _build_tree(cfg["size_bytes"], cfg["leaf_bytes"])
  exact = all(bool(jnp.array_equal(a, b)) and a.sharding == b.sharding
              for a, b in zip(jax.tree.leaves(expected), jax.tree.leaves(restored)))
  return {"seconds": seconds, "peak_extra_rss_bytes": peak, "bit_exact": exact,
          "evicted_with": evicted}


def _device_put_from_pinned_s(tree) -> float | None:
  """Seconds of jax.device_put of the tree from pinned host copies of it."""
  import jax
  try:
    pinned = jax.block_until_ready(jax.tree.map(
        lambda x: jax.device_put(x, x.sharding.with_memory_kind("pinned_host")), tree))
  except Exception:  # pylint: disable=broad-except  (no pinned_host memory on this backend)
    return None
  shardings = jax.tree.map(lambda x: x.sharding, tree)
  t0 = time.perf_counter()
  jax.block_until_ready(jax.device_put(pinned, shardings))
  return time.perf_counter() - t0


def _pinned_reads_in_place(x) -> bool | None:
  """Whether np.asarray of a "pinned_host" copy of x's first shard is a view."""
  import jax
  import numpy as np
  shard = x.addressable_shards[0].data
  try:
    pinned = jax.device_put(shard, shard.sharding.with_memory_kind("pinned_host"))
    return bool(np.asarray(pinned).ctypes.data == pinned.unsafe_buffer_pointer())
  except Exception:  # pylint: disable=broad-except  (no pinned_host memory on this backend)
    return None


def run(args) -> int:
  """Runs the device benchmark with the flags of add_arguments, prints the
  report and writes --json.

  Returns:
    The exit status: 0 when both restores were bit-exact, else 1.

  Raises:
    SystemExit: a flag value it refuses.
    RuntimeError: the cold-restore child or fio failed (its output in the
      message); what was written is deleted.
  """
  import jax
  import jax.numpy as jnp
  import orbax.checkpoint as ocp
  from fastpersist_jax import (FastPersistHandler, FastPersistOptions, FastPersistRestore,
                               FastPersistSave)
  if args.rounds < 1 or args.size_gib <= 0 or args.leaf_mib <= 0:
    raise SystemExit("--rounds, --size_gib and --leaf_mib must be positive")
  common.require_dir(args.dir)
  t = time.perf_counter()
  tree = _build_tree(int(args.size_gib * GiB), int(args.leaf_mib * MiB))
  nbytes = sum(x.nbytes for x in jax.tree.leaves(tree))
  device = jax.local_devices()[0]
  info = {"devices": len(jax.local_devices()), "device_kind": device.device_kind,
          "platform": device.platform, "tree_bytes": nbytes, "leaves": len(jax.tree.leaves(tree)),
          "build_s": time.perf_counter() - t, "snapshot": args.snapshot,
          "pinned_host_read_in_place": _pinned_reads_in_place(tree["layers"][0]["w"])}
  print(f"tree: {nbytes / GiB:.2f} GiB in {info['leaves']} leaves on {info['devices']} x "
        f"{info['device_kind']} ({info['platform']})", file=sys.stderr)

  samples: dict = {"device_get_s": [], "saves": []}
  for _ in range(args.rounds):
    t0 = time.perf_counter()
    host = jax.device_get(tree)
    samples["device_get_s"].append(time.perf_counter() - t0)
    del host

  limit = int(args.host_memory_limit_gib * GiB) if args.host_memory_limit_gib else nbytes + 64 * MiB
  handler = FastPersistHandler(FastPersistOptions(snapshot=args.snapshot, host_memory_limit=limit))
  ckptr = ocp.AsyncCheckpointer(handler)
  workdir = tempfile.mkdtemp(prefix=".fastpersist_device_bench.", dir=os.path.abspath(args.dir))
  try:
    path = None
    for r in range(args.rounds + 1):
      if path:
        shutil.rmtree(path, ignore_errors=True)
      path = os.path.join(workdir, f"c{r}")
      t0 = time.perf_counter()
      ckptr.save(path, args=FastPersistSave(tree))
      t1 = time.perf_counter()
      ckptr.wait_until_finished()
      t2 = time.perf_counter()
      save_stats = dict(handler.last_save_stats)
      samples["saves"].append({"blocking_s": t1 - t0, "finished_s": t2 - t0, "stats": save_stats})
      print(f"  save {r}: blocking {(t1 - t0) * 1e3:.0f} ms, snapshot "
            f"{stats.gbps(nbytes, save_stats['snapshot_s']):.2f} GB/s, durable "
            f"{stats.gbps(nbytes, t2 - t0):.2f} GB/s", file=sys.stderr)
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
                            tree)
    t0 = time.perf_counter()
    restored = jax.block_until_ready(ckptr.restore(path, args=FastPersistRestore(abstract)))
    samples["restore_s"] = time.perf_counter() - t0
    exact = all(bool(jnp.array_equal(a, b)) and a.sharding == b.sharding
                for a, b in zip(jax.tree.leaves(tree), jax.tree.leaves(restored)))
    del restored
    ckptr.close()
    samples["device_put_from_pinned_s"] = _device_put_from_pinned_s(tree)
    cold_limit = int(args.host_memory_limit_gib * GiB) if args.host_memory_limit_gib else 2 * GiB
    cfg = {"role": "cold_restore", "method": "cold restore", "round": 0, "path": path,
           "size_bytes": int(args.size_gib * GiB), "leaf_bytes": int(args.leaf_mib * MiB),
           "host_memory_limit": cold_limit}
    samples["cold_restore"] = children.run_child("fastpersist_jax.benchmark.device_bench", cfg,
                                                 dict(os.environ), 3600)
    fio = common.which_fio(args.fio, args.no_fio, note=False)
    if fio:
      fio_path = os.path.join(workdir, "fio.dat")
      fio_bytes = common.fio_file_bytes(nbytes)
      common.run_fio(fio, "write", fio_path, fio_bytes, FIO_CHUNK, FIO_QUEUE_DEPTH)
      common.evict(fio_path)
      seconds, _ = common.run_fio(fio, "read", fio_path, fio_bytes, FIO_CHUNK, FIO_QUEUE_DEPTH)
      samples["fio_read_s"] = seconds * nbytes / fio_bytes   # at that rate, for the tree's bytes
  finally:
    ckptr.close()
    shutil.rmtree(workdir, ignore_errors=True)

  steady = samples["saves"][1:]
  med = stats.med
  summary = {
      "device_get_gbps": stats.gbps(nbytes, med(samples["device_get_s"])),
      "snapshot_gbps": med(stats.gbps(nbytes, s["stats"]["snapshot_s"]) for s in steady),
      "blocking_ms": med(s["blocking_s"] * 1e3 for s in steady),
      "blocking_ms_first": samples["saves"][0]["blocking_s"] * 1e3,
      "durable_gbps": med(stats.gbps(nbytes, s["finished_s"]) for s in steady),
      "restore_gbps": stats.gbps(nbytes, samples["restore_s"]),
      "restore_bit_exact": exact,
      "cold_restore_gbps": stats.gbps(nbytes, samples["cold_restore"]["seconds"]),
      "cold_restore_bit_exact": samples["cold_restore"]["bit_exact"],
      "cold_restore_peak_extra_rss_mib": samples["cold_restore"]["peak_extra_rss_bytes"] / MiB,
      "device_put_from_pinned_gbps": (stats.gbps(nbytes, samples["device_put_from_pinned_s"])
                                      if samples.get("device_put_from_pinned_s") else None),
      "fio_read_gbps": (stats.gbps(nbytes, samples["fio_read_s"]) if samples.get("fio_read_s")
                        else None),
      "snapshot_mode": steady[-1]["stats"].get("snapshot_mode"),
  }
  print(f"\ndevice-to-host on {info['devices']} x {info['device_kind']}: "
        f"{nbytes / GiB:.2f} GiB, {info['leaves']} leaves, medians of {args.rounds}")
  print(f"  jax.device_get                  {summary['device_get_gbps']:7.2f} GB/s")
  print(f"  FastPersist snapshot            {summary['snapshot_gbps']:7.2f} GB/s "
        f"(x{summary['snapshot_gbps'] / summary['device_get_gbps']:.2f} device_get; mode "
        f"{summary['snapshot_mode']})")
  print(f"  FastPersist save() blocking     {summary['blocking_ms']:7.0f} ms "
        f"(first save {summary['blocking_ms_first']:.0f} ms)")
  print(f"  FastPersist durable save        {summary['durable_gbps']:7.2f} GB/s")
  print(f"  restore to the same shardings   {summary['restore_gbps']:7.2f} GB/s, bit-exact: "
        f"{summary['restore_bit_exact']}")
  print(f"  cold restore, fresh process     {summary['cold_restore_gbps']:7.2f} GB/s, bit-exact: "
        f"{summary['cold_restore_bit_exact']}, peak extra host RSS "
        f"{summary['cold_restore_peak_extra_rss_mib']:.0f} MiB")
  for label, key in (("jax.device_put from pinned host", "device_put_from_pinned_gbps"),
                     ("fio O_DIRECT read (disk limit)  ", "fio_read_gbps")):
    value = summary[key]
    print(f"  {label} " + ("      -" if value is None else f"{value:7.2f} GB/s") +
          ("" if value is None else f" (cold restore x{summary['cold_restore_gbps'] / value:.2f})"))
  print(f"  np.asarray reads pinned_host memory in place: {info['pinned_host_read_in_place']}")
  if args.json:
    common.write_json(args.json, {"info": info, "summary": summary, "samples": samples})
    print(f"wrote {args.json}")
  return 0 if exact and summary["cold_restore_bit_exact"] else 1


def _child_main(argv: list[str]) -> int:
  return children.child_main(argv, _cold_restore_child)


if __name__ == "__main__":
  sys.exit(_child_main(sys.argv[1:]))
