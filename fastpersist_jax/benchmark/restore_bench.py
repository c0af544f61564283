"""Cold restore in a fresh process: FastPersist vs Orbax vs fio's read.

What a restart costs: after a failure every host starts a new process and
waits for restore. This benchmark builds the synthetic training state of
benchmark/trees.py (about --size_gib GiB in --leaves arrays on a 2-D mesh of
CPU devices) once, in a writer process that saves it with FastPersist and
with Orbax's StandardCheckpointHandler (and, with --many_leaves, a tree of
that many --many_leaf_kib KiB arrays through ocp.CheckpointManager). Then,
in --rounds interleaved rounds (the order rotates each round), for each
method:

  fastpersist  a fresh process builds the restore target (ShapeDtypeStructs
               with the saved shardings), empties the page cache, and times
               ocp.Checkpointer(FastPersistHandler()).restore until every
               array is ready; then checks every leaf against the writer's
               CRC-32C of it (outside the timing)
  orbax        the same with ocp.StandardCheckpointer
  fio          fio --ioengine=io_uring --direct=1 --rw=read of a file of the
               same number of bytes, page cache emptied: the disk's limit
  many         (FastPersist) a fresh process restores the many-leaf tree
               through CheckpointManager: seconds
  same_process (FastPersist) one process builds the tree, saves it, deletes
               it, empties the page cache and restores with the same
               checkpointer: a cold restore without a restart's costs
               (imports, jax start-up, first-touch of the memory it frees)

GB/s are 1e9 logical bytes of the tree per second. Prints medians and the
range over rounds, side by side with fio's read and Orbax; --json writes
every sample, --plot a bar chart. Everything it writes is deleted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

from fastpersist_jax.benchmark import children, common, rss, stats, trees
from fastpersist_jax.benchmark.common import FIO_CHUNK, FIO_QUEUE_DEPTH, GiB, MiB

HELP = "cold restore in a fresh process: FastPersist vs Orbax vs fio read, and many small leaves"

METHODS = ("fastpersist", "same_process", "orbax", "fio", "many")
GBPS_METHODS = ("fastpersist", "same_process", "orbax", "fio")
LABELS = {"fastpersist": "FastPersist", "same_process": "FastPersist, same process",
          "orbax": "Orbax Standard", "fio": "fio read (disk limit)",
          "many": "FastPersist, many small leaves"}
_COLORS = {"fastpersist": "C0", "same_process": "C2", "orbax": "C1", "fio": "0.6"}
DEFAULT_SEED = 20240613


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the restore benchmark's flags to `parser`."""
  parser.add_argument("--size_gib", type=float, default=1.0, help="tree size in GiB (default 1)")
  parser.add_argument("--leaves", type=int, default=242, help="number of arrays (default 242)")
  parser.add_argument("--many_leaves", type=int, default=10000,
                      help="leaves of the many-leaf tree (default 10000; 0 skips it)")
  parser.add_argument("--many_leaf_kib", type=int, default=4, help="KiB per small leaf (default 4)")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
  parser.add_argument("--dir", default=".", help="directory to write in (default: the current one)")
  parser.add_argument("--json", metavar="PATH", help="write every raw number to PATH as JSON")
  parser.add_argument("--plot", metavar="PATH.png", help="write a bar chart (needs matplotlib)")
  parser.add_argument("--devices", type=int, default=8,
                      help="CPU devices forced through XLA_FLAGS when it sets no count (default 8)")
  parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of shapes and data")
  parser.add_argument("--fio", default="fio", help="fio binary (default: fio on PATH)")
  parser.add_argument("--no_fio", action="store_true", help="skip fio even where installed")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help="comma-separated subset of %s (default: all)" % ",".join(METHODS))
  parser.add_argument("--child_timeout_s", type=float, default=1800,
                      help="give up on a child process after this long (default 1800)")


# Children --------------------------------------------------------------------------

def _digest(x) -> int:
  import crc32c
  import numpy as np
  return crc32c.crc32c(np.ascontiguousarray(np.asarray(x)).view(np.uint8))


def _many_tree(n: int, kib: int):
  import jax.numpy as jnp
  return {f"leaf{i:06d}": jnp.full((kib * 256,), i, jnp.float32) for i in range(n)}


def _write(cfg: dict) -> dict:
  import jax
  import orbax.checkpoint as ocp
  from fastpersist_jax import FastPersistHandler, FastPersistSave
  tree = trees.build_tree(cfg["spec"], cfg["seed"])
  out = {"digests": {name: _digest(x) for name, x in tree.items()}}
  paths = cfg["paths"]
  if "fastpersist" in paths:
    ckptr = ocp.Checkpointer(FastPersistHandler())
    ckptr.save(paths["fastpersist"], args=FastPersistSave(tree))
    ckptr.close()
  if "orbax" in paths:
    ckptr = ocp.StandardCheckpointer()
    ckptr.save(paths["orbax"], tree)
    ckptr.wait_until_finished()
    ckptr.close()
  if "many" in paths:
    many = _many_tree(cfg["many_leaves"], cfg["many_leaf_kib"])
    with ocp.CheckpointManager(paths["many"], item_handlers=FastPersistHandler()) as mngr:
      mngr.save(1, args=FastPersistSave(many))
      mngr.wait_until_finished()
  jax.clear_caches()
  os.sync()
  return out


def _restore(cfg: dict) -> dict:
  import jax
  import numpy as np
  import orbax.checkpoint as ocp
  from jax.sharding import NamedSharding, PartitionSpec as P
  from fastpersist_jax import FastPersistHandler, FastPersistRestore, FastPersistSave
  method, path = cfg["method"], cfg["path"]
  if method == "many":
    n, kib = cfg["many_leaves"], cfg["many_leaf_kib"]
    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    target = {f"leaf{i:06d}": jax.ShapeDtypeStruct((kib * 256,), np.float32, sharding=device)
              for i in range(n)}
    evicted = common.evict(path)
    with ocp.CheckpointManager(path, item_handlers=FastPersistHandler()) as mngr:
      t0 = time.perf_counter()
      restored = mngr.restore(1, args=FastPersistRestore(target))
      jax.block_until_ready(restored)
      seconds = time.perf_counter() - t0
    bad = [k for i, (k, v) in enumerate(sorted(restored.items())) if float(v[-1]) != i]
    if bad:
      raise AssertionError(f"many: leaves {bad[:5]} restored wrong values")
    return {"seconds": seconds, "evicted_with": evicted}
  mesh = jax.make_mesh(trees.mesh_axes(len(jax.devices())), ("data", "model"),
                       devices=jax.devices())
  target = {leaf["name"]: jax.ShapeDtypeStruct(tuple(leaf["shape"]), jax.numpy.dtype(leaf["dtype"]),
                                               sharding=NamedSharding(mesh, P(*leaf["spec"])))
            for leaf in cfg["spec"]}
  fastpersist = method in ("fastpersist", "same_process")
  ckptr = ocp.Checkpointer(FastPersistHandler()) if fastpersist else ocp.StandardCheckpointer()
  if method == "same_process":   # this process saves what it then restores
    path = f"{path}-{cfg['round']}"
    tree = trees.build_tree(cfg["spec"], cfg["seed"])
    ckptr.save(path, args=FastPersistSave(tree))
    for x in tree.values():
      x.delete()
    del tree
    os.sync()
  evicted = common.evict(path)
  probe = rss.Rss()
  before = probe.current()
  t0 = time.perf_counter()
  try:
    restored = (ckptr.restore(path, args=FastPersistRestore(target)) if fastpersist
                else ckptr.restore(path, target))
  finally:
    ckptr.close()
  jax.block_until_ready(restored)
  seconds = time.perf_counter() - t0
  peak = probe.peak() - before
  wrong = [name for name, x in restored.items() if _digest(x) != cfg["digests"][name]]
  if method == "same_process":
    shutil.rmtree(path, ignore_errors=True)
  if wrong:
    raise AssertionError(f"{method}: {len(wrong)} leaves restored wrong values, e.g. {wrong[:3]}")
  return {"seconds": seconds, "gbps": stats.gbps(cfg["bytes"], seconds),
          "peak_extra_rss_bytes": peak, "evicted_with": evicted}


def _child_main(argv: list[str]) -> int:
  return children.child_main(
      argv, lambda cfg: _write(cfg) if cfg["role"] == "write" else _restore(cfg))


# Parent ----------------------------------------------------------------------------

def summarize(samples: dict, nbytes: int) -> dict:
  """Medians and ranges over rounds: {method: {"gbps", "min_gbps",
  "max_gbps", "per_round_gbps" (GB/s, 1e9 bytes/s), "vs_fio", "vs_orbax"
  (medians of per-round ratios), "peak_extra_rss_mib"}} for fastpersist,
  same_process, orbax and fio as run, "many": {"seconds", "min_seconds", "max_seconds"},
  and "bytes": `nbytes`, the tree's logical bytes."""
  out = {}
  for m in GBPS_METHODS:
    gbps = [s["gbps"] for s in samples.get(m, [])]
    if gbps:
      median, low, high = stats.spread(gbps)
      out[m] = {"gbps": median, "min_gbps": low, "max_gbps": high, "per_round_gbps": gbps}
  fio = out.get("fio", {}).get("gbps")
  for m in ("fastpersist", "same_process", "orbax"):
    if m in out:
      # Per round against the same round's fio read (the disk drifts between minutes).
      rounds = [s["gbps"] / f["gbps"] for s, f in zip(samples.get(m, []), samples.get("fio", []))]
      out[m]["vs_fio"] = stats.med(rounds) if rounds else stats.ratio(out[m]["gbps"], fio)
      out[m]["peak_extra_rss_mib"] = stats.med([s["peak_extra_rss_bytes"] / MiB
                                                for s in samples[m]])
  if "fastpersist" in out and "orbax" in out:
    out["fastpersist"]["vs_orbax"] = stats.med(
        [a["gbps"] / b["gbps"] for a, b in zip(samples["fastpersist"], samples["orbax"])])
  many = [s["seconds"] for s in samples.get("many", [])]
  if many:
    median, low, high = stats.spread(many)
    out["many"] = {"seconds": median, "min_seconds": low, "max_seconds": high}
  out["bytes"] = nbytes
  return out


def print_report(info: dict, summary: dict) -> None:
  """Prints the table of summarize's medians and ranges to stdout."""
  fmt = stats.fmt
  print(f"\nCold restore (a fresh process, unless noted): {summary['bytes'] / GiB:.2f} GiB in {info['leaves']} "
        f"leaves on {info['devices']} CPU devices, {info['rounds']} rounds, in {info['dir']} "
        f"({info['fstype']}); medians (range)")
  print(f"  {'':27s} {'GB/s':>6s} {'range':>13s} {'/ fio':>6s} {'/ Orbax':>8s} {'peak RSS MiB':>13s}")
  for m in GBPS_METHODS:
    s = summary.get(m)
    if not s:
      continue
    print(f"  {LABELS[m]:27s} {stats.fmt_gbps(s['gbps']):>6s} "
          f"{stats.fmt_gbps(s['min_gbps']) + '-' + stats.fmt_gbps(s['max_gbps']):>13s} "
          f"{fmt(s.get('vs_fio'), '6.2f')} {fmt(s.get('vs_orbax'), '8.2f')} "
          f"{fmt(s.get('peak_extra_rss_mib'), '13.0f')}")
  if summary.get("many"):
    s = summary["many"]
    print(f"  {info['many_leaves']} leaves x {info['many_leaf_kib']} KiB through CheckpointManager: "
          f"{s['seconds']:.3f} s ({s['min_seconds']:.3f}-{s['max_seconds']:.3f})")


def plot(path: str, summary: dict) -> bool:
  """Writes a PNG bar chart of the median GB/s (with ranges) to `path`.
  Returns False, with a note on stderr, when matplotlib is missing."""
  plt = common.pyplot()
  if plt is None:
    return False
  names = [m for m in GBPS_METHODS if m in summary]
  fig, ax = plt.subplots(figsize=(6, 3.5))
  values = [summary[m]["gbps"] for m in names]
  errs = [[v - summary[m]["min_gbps"] for m, v in zip(names, values)],
          [summary[m]["max_gbps"] - v for m, v in zip(names, values)]]
  ax.bar([LABELS[m] for m in names], values, yerr=errs, color=[_COLORS[m] for m in names])
  ax.set_ylabel("GB/s (median, range)")
  ax.set_title("Cold restore")
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  return True


def run(args) -> int:
  """Runs the restore benchmark with the flags of add_arguments, prints the
  report and writes --json / --plot. Returns the exit status, 0.

  Raises:
    SystemExit: a flag value it refuses, or too little free space in --dir.
    RuntimeError: a child process or fio failed (its output in the
      message); what was written is deleted.
  """
  methods = [m.strip() for m in args.methods.split(",") if m.strip()]
  unknown = set(methods) - set(METHODS)
  if unknown or args.rounds < 1 or args.size_gib <= 0 or args.leaves < 3:
    raise SystemExit(f"unknown methods {sorted(unknown)}" if unknown else
                     "--rounds and --size_gib must be positive, --leaves at least 3")
  fio = common.which_fio(args.fio, args.no_fio, note=False)
  if "fio" in methods and fio is None:
    methods.remove("fio")
    print("fio not found: no disk-limit figure (install fio, or pass --no_fio)", file=sys.stderr)
  if args.many_leaves <= 0 and "many" in methods:
    methods.remove("many")
  env = children.child_env(args.devices)
  devices = children.forced_devices(env, args.devices)
  spec = trees.tree_spec(int(args.size_gib * GiB), args.leaves, args.seed, trees.mesh_axes(devices))
  nbytes = trees.tree_bytes(spec)
  mount = common.check_target_dir(args.dir, 3 * nbytes + 512 * MiB)
  workdir = tempfile.mkdtemp(prefix=".fastpersist_restore_bench.", dir=args.dir)
  module = "fastpersist_jax.benchmark.restore_bench"
  samples: dict[str, list] = {m: [] for m in methods}
  try:
    paths = {m: os.path.join(workdir, m) for m in methods if m != "fio"}
    base = {"spec": spec, "seed": args.seed, "bytes": nbytes, "many_leaves": args.many_leaves,
            "many_leaf_kib": args.many_leaf_kib, "round": 0}
    print(f"writing {nbytes / GiB:.2f} GiB with {', '.join(paths)} ...", flush=True)
    written = children.run_child(module, dict(base, role="write", method="write", paths=paths), env,
                               args.child_timeout_s)
    fio_path = os.path.join(workdir, "fio.dat")
    fio_bytes = common.fio_file_bytes(nbytes)
    if "fio" in methods:
      common.run_fio(fio, "write", fio_path, fio_bytes, FIO_CHUNK, FIO_QUEUE_DEPTH)
    for rnd in range(args.rounds):
      order = methods[rnd % len(methods):] + methods[:rnd % len(methods)]
      for m in order:
        if m == "fio":
          common.evict(fio_path)
          seconds, detail = common.run_fio(fio, "read", fio_path, fio_bytes, FIO_CHUNK,
                                           FIO_QUEUE_DEPTH)
          sample = {"seconds": seconds, "gbps": stats.gbps(fio_bytes, seconds), **detail}
        else:
          sample = children.run_child(module, dict(base, role="restore", method=m, path=paths[m],
                                                 digests=written["digests"], round=rnd), env,
                                    args.child_timeout_s)
        samples[m].append(sample)
        figure = (f"{sample['gbps']:.2f} GB/s" if "gbps" in sample else
                  f"{sample['seconds']:.3f} s")
        print(f"round {rnd + 1}: {m:12s} {figure}", flush=True)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)
  info = {"leaves": args.leaves, "devices": devices, "rounds": args.rounds, "dir": args.dir,
          "fstype": mount.get("fstype", "?"), "many_leaves": args.many_leaves,
          "many_leaf_kib": args.many_leaf_kib}
  summary = summarize(samples, nbytes)
  print_report(info, summary)
  if args.json:
    common.write_json(args.json, {"info": info, "summary": summary, "samples": samples})
  if args.plot:
    plot(args.plot, summary)
  return 0


if __name__ == "__main__":
  sys.exit(_child_main(sys.argv[1:]))
