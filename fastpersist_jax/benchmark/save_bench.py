"""End-to-end save / restore of a sharded pytree: FastPersist vs Orbax vs fio.

Builds one pytree of about --size_gib GiB made of about --leaves float32 and
bfloat16 jax.Arrays of varied shapes on a 2-D device mesh ("data" x "model";
8 CPU devices by default): most bytes in matrices and 3-D tensors sharded
over both axes, some sharded over one axis (replicated over the other), and
small replicated vectors and scalars. Then, in interleaved rounds (the order
rotates each round), on the same tree and directory:

  fastpersist  ocp.AsyncCheckpointer(FastPersistHandler(options))
  orbax        ocp.AsyncCheckpointer(ocp.StandardCheckpointHandler())
  fio          fio --ioengine=io_uring --direct=1 sequential write (with
               --end_fsync=1), then read, of the same number of bytes in the
               same directory: the disk's own limit

Each (checkpointer, round) runs in a fresh child process, which builds the
tree (deterministically: the same data every time), records its resident set
as the baseline, then:

  1. saves twice, to different directories (the first save also pays for
     one-off set-up, e.g. FastPersist's staging pool; the second is the
     steady state). For each: blocking ms = the save() call; GB/s "until
     finished" = tree bytes / (save start .. wait_until_finished returns);
     GB/s "until synced" = the same up to the end of a following os.sync()
     (FastPersist fdatasyncs its data before it commits; Orbax/TensorStore
     may leave it in the page cache, so "synced" is the fair durable figure);
     peak extra RSS = peak resident set during the save (VmHWM, reset before
     each save through /proc/self/clear_refs) minus the baseline;
  2. restores the second checkpoint onto a target of jax.ShapeDtypeStructs
     with the same shardings, with a cold page cache (os.sync, then 3 into
     /proc/sys/vm/drop_caches where permitted, else POSIX_FADV_DONTNEED on
     every file of the checkpoint; which one is reported), checks the
     restored arrays equal the saved ones shard by shard, and reports GB/s.

  3. (FastPersist only) for each of --snapshot_modes, a handler with that
     snapshot mode saves six times; the median blocking time of the last
     five is that mode's. Beside them, one single-threaded memcpy of the
     tree's bytes between pre-faulted buffers (median of three) gives the
     copy-mode yardstick "bytes / memcpy bandwidth".

GB/s are 1e9 bytes/s of the tree's logical bytes (each global array once).
Prints the medians side by side with their ratios to fio and FastPersist /
Orbax; --json writes every raw sample, --plot a PNG bar chart. Every
checkpoint directory and fio file it writes is deleted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time

from fastpersist_jax.benchmark import children, common, save_report, trees
from fastpersist_jax.benchmark.common import GiB, MiB
from fastpersist_jax.benchmark.save_report import METHODS

HELP = "save/restore GB/s, blocking ms and RSS of FastPersist vs Orbax on a sharded pytree, vs fio"

BENCH_DIR_PREFIX = ".fastpersist_save_bench."
DEFAULT_SEED = 20240613
# Each (checkpointer, round) runs in a fresh process of this module.
CHILD_MODULE = "fastpersist_jax.benchmark.save_child"


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the save benchmark's flags to `parser`."""
  parser.add_argument("--size_gib", type=float, default=1.0,
                      help="logical size of the pytree in GiB (default 1)")
  parser.add_argument("--leaves", type=int, default=400, help="number of arrays (default 400)")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
  parser.add_argument("--dir", default=".", help="directory to write in (default: the current one)")
  parser.add_argument("--json", metavar="PATH", help="write every raw number to PATH as JSON")
  parser.add_argument("--plot", metavar="PATH.png", help="write a bar chart to PATH (needs matplotlib)")
  parser.add_argument("--host_memory_limit_gib", type=float, default=None,
                      help="FastPersistOptions.host_memory_limit (default: the option's default)")
  parser.add_argument("--snapshot", default=None,
                      help="FastPersistOptions.snapshot, e.g. copy or reference (default: the "
                      "option's default)")
  parser.add_argument("--snapshot_modes", default="copy,auto,reference",
                      help="snapshot modes whose steady blocking time FastPersist's children "
                      "also measure, each with its own handler (default copy,auto,reference; "
                      "empty: none)")
  parser.add_argument("--devices", type=int, default=8,
                      help="CPU devices forced through XLA_FLAGS when XLA_FLAGS does not set a "
                      "count (default 8)")
  parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of shapes and data")
  parser.add_argument("--fio", default="fio", help="fio binary (default: fio on PATH)")
  parser.add_argument("--no_fio", action="store_true", help="skip fio even where installed")
  parser.add_argument("--fio_fixedbufs", action="store_true",
                      help="run fio with --fixedbufs=1 (registered buffers, as the engine uses)")
  parser.add_argument("--fio_chunk_mib", type=int, default=None,
                      help="fio request size (default: FastPersistOptions.chunk_bytes)")
  parser.add_argument("--fio_queue_depth", type=int, default=None,
                      help="fio queue depth (default: FastPersistOptions.queue_depth)")
  parser.add_argument("--methods", default=",".join(METHODS),
                      help="comma-separated subset of %s (default: all)" % ",".join(METHODS))
  parser.add_argument("--from_json", metavar="PATH",
                      help="run nothing: print the report (and --plot) again from a --json file")
  parser.add_argument("--child_timeout_s", type=float, default=1800,
                      help="give up on a child process after this long (default 1800)")


def run(args) -> int:
  """Runs the save benchmark (see the module docstring) with the flags of
  add_arguments, prints the report, and writes --json / --plot. Returns the
  exit status, 0.

  Raises:
    SystemExit: a flag value it refuses, or too little free space in --dir.
    RuntimeError: a child process or fio failed (its output in the
      message); what was written is deleted.
  """
  from fastpersist_jax.options import FastPersistOptions
  if args.from_json:
    return _replot(args)
  if args.rounds < 1 or args.size_gib <= 0 or args.leaves < 3 or args.devices < 1:
    raise SystemExit("--rounds, --size_gib and --devices must be positive, --leaves at least 3")
  bad_modes = {m.strip() for m in args.snapshot_modes.split(",") if m.strip()} - {
      "auto", "copy", "reference"}
  if bad_modes:
    raise SystemExit(f"--snapshot_modes: unknown modes {sorted(bad_modes)}")
  common.require_dir(args.dir)
  wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
  if not wanted or set(wanted) - set(METHODS):
    raise SystemExit(f"--methods takes a comma-separated subset of {','.join(METHODS)}")
  defaults = FastPersistOptions()
  chunk = (args.fio_chunk_mib * MiB) if args.fio_chunk_mib else defaults.chunk_bytes
  qd = args.fio_queue_depth or defaults.queue_depth
  host_limit = None if args.host_memory_limit_gib is None else int(args.host_memory_limit_gib * GiB)

  env = children.child_env(args.devices)
  devices = children.forced_devices(env, args.devices)
  axes = trees.mesh_axes(devices)
  spec = trees.tree_spec(int(args.size_gib * GiB), args.leaves, args.seed, axes)
  nbytes = trees.tree_bytes(spec)
  fio_size = -(-nbytes // chunk) * chunk

  mount = common.check_target_dir(args.dir, 2 * nbytes + 256 * MiB)
  fio = common.which_fio(args.fio, args.no_fio)
  fio_version = common.fio_version(fio) if fio else None

  import jax  # the parent only reads versions; the children do the work
  import orbax.checkpoint as ocp
  kinds = {}
  for leaf in spec:
    kinds[leaf["kind"]] = kinds.get(leaf["kind"], 0) + 1
  info = {
      "tree_bytes": nbytes, "leaves": len(spec), "leaf_kinds": ", ".join(
          f"{n} {k}" for k, n in kinds.items()), "devices": devices,
      "mesh": {"data": axes[0], "model": axes[1]}, "rounds": args.rounds, "seed": args.seed,
      "dir": os.path.abspath(args.dir), "fstype": mount["fstype"], "device": mount["source"],
      "host_memory_limit": host_limit if host_limit is not None else defaults.host_memory_limit,
      "fio": fio_version, "fio_bytes": fio_size, "fio_chunk": chunk, "fio_queue_depth": qd,
      "fio_fixedbufs": args.fio_fixedbufs,
      "kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
      "jax": jax.__version__, "orbax": getattr(ocp, "__version__", "?"),
      "bf16_bytes": sum(math.prod(l["shape"]) * 2 for l in spec if l["dtype"] == "bfloat16"),
  }
  workdir = tempfile.mkdtemp(prefix=BENCH_DIR_PREFIX, dir=os.path.abspath(args.dir))
  methods = [m for m in METHODS if m in wanted and (m != "fio" or fio)]
  samples: dict[str, list] = {m: [] for m in methods}
  print(f"tree: {nbytes / GiB:.3f} GiB in {len(spec)} leaves ({info['leaf_kinds']}), mesh "
        f"{axes}; working in {workdir}", file=sys.stderr)
  try:
    for r in range(args.rounds):
      for m in methods[r % len(methods):] + methods[:r % len(methods)]:
        t = time.perf_counter()
        if m == "fio":
          s = common.run_fio_pair(fio, os.path.join(workdir, f"fio.r{r}"), fio_size, chunk, qd,
                                  args.fio_fixedbufs)
          samples[m].append(s)
          print(f"  round {r + 1} fio          write {s['write']['gbps']:5.2f} GB/s, read "
                f"{s['read']['gbps']:5.2f} GB/s", file=sys.stderr)
          continue
        cfg = {"method": m, "round": r, "workdir": workdir, "spec": spec, "seed": args.seed,
               "bytes": nbytes, "devices": devices, "host_memory_limit": host_limit,
               "snapshot": args.snapshot,
               "snapshot_modes": [m.strip() for m in args.snapshot_modes.split(",") if m.strip()]}
        res = children.run_child(CHILD_MODULE, cfg, env, args.child_timeout_s)
        res["child_wall_s"] = time.perf_counter() - t
        samples[m].append(res)
        first, steady = res["saves"]
        print(f"  round {r + 1} {m:12s} blocking {first['blocking_s'] * 1e3:6.0f} / "
              f"{steady['blocking_s'] * 1e3:5.0f} ms, save {steady['gbps_finished']:5.2f} / "
              f"{steady['gbps_synced']:5.2f} GB/s (finished / synced), restore "
              f"{res['restore']['gbps']:5.2f} GB/s, peak extra RSS "
              f"{max(first['peak_extra_rss_bytes'], steady['peak_extra_rss_bytes']) / MiB:5.0f} MiB"
              f" ({res['child_wall_s']:.0f} s)", file=sys.stderr)
  finally:
    shutil.rmtree(workdir, ignore_errors=True)

  return save_report.report(info, samples, spec, args.json, args.plot)


def _replot(args) -> int:
  """--from_json: the report (and --plot / --json) again from a saved run."""
  with open(args.from_json) as f:
    saved = json.load(f)
  if args.json and os.path.abspath(args.json) == os.path.abspath(args.from_json):
    args.json = None  # already there
  return save_report.report(saved["info"], saved["samples"], saved.get("tree", []), args.json,
                            args.plot)
