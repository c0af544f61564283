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
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from fastpersist_jax.benchmark import common, trees

HELP = "save/restore GB/s, blocking ms and RSS of FastPersist vs Orbax on a sharded pytree, vs fio"

MiB = 1 << 20
GiB = 1 << 30

CHECKPOINTERS = ("fastpersist", "orbax")
METHODS = CHECKPOINTERS + ("fio",)
LABELS = {"fastpersist": "FastPersist", "orbax": "Orbax Standard", "fio": "fio (disk limit)"}
BENCH_DIR_PREFIX = ".fastpersist_save_bench."
DEFAULT_SEED = 20240613


def add_arguments(parser: argparse.ArgumentParser) -> None:
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


# The pytree ------------------------------------------------------------------------


# Child process: one checkpointer, one round ------------------------------------------


def _child(cfg: dict) -> dict:
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
  rss = common.Rss()
  baseline = rss.current()
  result = {"method": method, "round": cfg["round"], "pid": os.getpid(), "build_s": build_s,
            "baseline_rss_bytes": baseline, "rss_peak_resettable": rss.resettable}

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
      rss.reset()
      t0 = time.perf_counter()
      ckptr.save(path, args=save_args())
      t1 = time.perf_counter()
      ckptr.wait_until_finished()
      t2 = time.perf_counter()
      os.sync()
      t3 = time.perf_counter()
      s = {"which": which, "blocking_s": t1 - t0, "finished_s": t2 - t0, "synced_s": t3 - t0,
           "gbps_finished": nbytes / (t2 - t0) / 1e9, "gbps_synced": nbytes / (t3 - t0) / 1e9,
           "peak_extra_rss_bytes": rss.peak() - baseline,
           "rss_after_bytes": rss.current() - baseline,
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
    rss.reset()
    before = rss.current()
    t0 = time.perf_counter()
    restored = ckptr.restore(path, args=restore_args(mesh_tree))
    jax.block_until_ready(restored)
    seconds = time.perf_counter() - t0
    result["restore"] = {"seconds": seconds, "gbps": nbytes / seconds / 1e9,
                         "peak_extra_rss_bytes": rss.peak() - before}
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
  return statistics.median(times)


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


def _child_with_rusage(cfg: dict) -> dict:
  result = _child(cfg)
  result["ru_maxrss_self_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return result


def _child_main(argv: list[str]) -> int:
  return common.child_main(argv, _child_with_rusage)


# Parent --------------------------------------------------------------------------


def _run_fio_pair(fio: str, path: str, size: int, chunk: int, qd: int, fixedbufs: bool) -> dict:
  run_fio = common.run_fio
  try:
    ws, wd = run_fio(fio, "write", path, size, chunk, qd, fixedbufs)
    rs, rd = run_fio(fio, "read", path, size, chunk, qd, fixedbufs)
  finally:
    if os.path.exists(path):
      os.unlink(path)
  return {"write": {"seconds": ws, "gbps": size / ws / 1e9, **wd},
          "read": {"seconds": rs, "gbps": size / rs / 1e9, **rd}}


def summarize(samples: dict) -> dict:
  out = {}
  for m in CHECKPOINTERS:
    runs = samples.get(m) or []
    if not runs:
      continue
    first = [r["saves"][0] for r in runs]
    steady = [r["saves"][1] for r in runs]
    out[m] = {
        "blocking_ms_first": common.med([s["blocking_s"] * 1e3 for s in first]),
        "blocking_ms_steady": common.med([s["blocking_s"] * 1e3 for s in steady]),
        "gbps_finished_first": common.med([s["gbps_finished"] for s in first]),
        "gbps_synced_first": common.med([s["gbps_synced"] for s in first]),
        "gbps_finished": common.med([s["gbps_finished"] for s in steady]),
        "gbps_synced": common.med([s["gbps_synced"] for s in steady]),
        "restore_gbps": common.med([r["restore"]["gbps"] for r in runs]),
        "peak_extra_rss_mib_first": common.med([s["peak_extra_rss_bytes"] / MiB for s in first]),
        "peak_extra_rss_mib_steady": common.med([s["peak_extra_rss_bytes"] / MiB for s in steady]),
        "peak_extra_rss_mib": common.med([max(a["peak_extra_rss_bytes"], b["peak_extra_rss_bytes"]) / MiB
                                    for a, b in zip(first, steady)]),
        "restore_peak_extra_rss_mib": common.med([r["restore"]["peak_extra_rss_bytes"] / MiB
                                            for r in runs]),
        "disk_mib": common.med([s["disk_bytes"] / MiB for s in steady]),
        "evicted_with": sorted({r["evicted_with"] for r in runs}),
    }
  fp_runs = samples.get("fastpersist") or []
  modes: dict[str, list[float]] = {}
  for r in fp_runs:
    for mode, times in (r.get("modes") or {}).items():
      modes.setdefault(mode, []).extend(t * 1e3 for t in times)
  memcpy = [r["memcpy_s"] * 1e3 for r in fp_runs if r.get("memcpy_s")]
  if modes and memcpy:
    out["snapshot_modes"] = {
        "memcpy_ms": common.med(memcpy),
        "blocking_ms": {mode: common.med(ms) for mode, ms in modes.items()},
        "samples": sum(len(ms) for ms in modes.values()) // len(modes)}
  if samples.get("fio"):
    out["fio"] = {"write_gbps": common.med([s["write"]["gbps"] for s in samples["fio"]]),
                  "read_gbps": common.med([s["read"]["gbps"] for s in samples["fio"]])}
  return out


def print_report(info: dict, summary: dict) -> None:
  fmt = lambda v, spec: "-" if v is None else format(v, spec)  # pylint: disable=unnecessary-lambda-assignment
  fio = summary.get("fio", {})
  fw, fr = fio.get("write_gbps"), fio.get("read_gbps")
  print()
  print(f"fastpersist save benchmark: {info['tree_bytes'] / GiB:.3f} GiB in {info['leaves']} "
        f"leaves ({info['leaf_kinds']}), {info['devices']} devices mesh "
        f"{info['mesh']}, {info['rounds']} rounds, in {info['dir']} "
        f"({info['fstype']} on {info['device']})")
  print(f"kernel {info['kernel']}, {info['cpus']} CPUs, jax {info['jax']}, orbax "
        f"{info['orbax']}, fio {info['fio'] or 'not run'}"
        f"{' --fixedbufs' if info.get('fio_fixedbufs') else ''}; FastPersist engine "
        f"{info.get('engine', '?')}, snapshot {info.get('snapshot_mode', '?')}; cold restore via "
        f"{', '.join(info['evicted_with']) or '-'}")
  print()
  hdr = (f"{'method':18s} {'blocking ms':>15s} {'save GB/s':>15s} {'synced':>8s} "
         f"{'restore':>8s} {'restore':>8s} {'peak extra':>10s}")
  hdr2 = (f"{'':18s} {'first / steady':>15s} {'fin. / synced':>15s} {'/ fio':>8s} "
          f"{'GB/s':>8s} {'/ fio':>8s} {'RSS MiB':>10s}")
  print(hdr)
  print(hdr2)
  for m in CHECKPOINTERS:
    s = summary.get(m)
    if not s:
      continue
    print(f"{LABELS[m]:18s} "
          f"{fmt(s['blocking_ms_first'], '7.0f') + ' / ' + fmt(s['blocking_ms_steady'], '<5.0f'):>15s} "
          f"{common.fmt_gbps(s['gbps_finished']) + ' / ' + common.fmt_gbps(s['gbps_synced']):>15s} "
          f"{fmt(common.ratio(s['gbps_synced'], fw), '8.2f')} {common.fmt_gbps(s['restore_gbps']):>8s} "
          f"{fmt(common.ratio(s['restore_gbps'], fr), '8.2f')} {fmt(s['peak_extra_rss_mib'], '10.0f')}")
  if fio:
    print(f"{LABELS['fio']:18s} {'':>15s} {fmt(fw, '6.2f') + ' (write)':>15s} {1.0:8.2f} "
          f"{fmt(fr, '8.2f')} {1.0:8.2f} {'':>10s}")
  fp, ob = summary.get("fastpersist"), summary.get("orbax")
  if fp and ob:
    print()
    print("FastPersist / Orbax (medians): "
          f"blocking steady {fmt(common.ratio(fp['blocking_ms_steady'], ob['blocking_ms_steady']), '.2f')}, "
          f"blocking first {fmt(common.ratio(fp['blocking_ms_first'], ob['blocking_ms_first']), '.2f')}, "
          f"save until finished {fmt(common.ratio(fp['gbps_finished'], ob['gbps_finished']), '.2f')}, "
          f"save until synced {fmt(common.ratio(fp['gbps_synced'], ob['gbps_synced']), '.2f')}, "
          f"restore {fmt(common.ratio(fp['restore_gbps'], ob['restore_gbps']), '.2f')}, "
          f"peak extra RSS {fmt(common.ratio(fp['peak_extra_rss_mib'], ob['peak_extra_rss_mib']), '.2f')}")
  modes = summary.get("snapshot_modes")
  if modes:
    memcpy = modes["memcpy_ms"]
    print()
    print(f"FastPersist save() blocking by snapshot mode (steady, median of {modes['samples']} "
          f"saves), against one single-threaded memcpy of the tree: {memcpy:.0f} ms "
          f"({info['tree_bytes'] / memcpy / 1e6:.1f} GB/s):")
    targets = {"copy": f"target <= 1.2 x memcpy = {1.2 * memcpy:.0f} ms",
               "reference": "target <= 20 ms"}
    for mode, ms in modes["blocking_ms"].items():
      print(f"  {mode:10s} {fmt(ms, '7.1f')} ms = {fmt(common.ratio(ms, memcpy), '.2f')} x memcpy"
            f"   {targets.get(mode, '')}")
  if not (fp or ob):
    return
  print()
  print("save GB/s are the steady-state (second) save in each child; first saves (GB/s "
        "finished / synced, peak extra RSS MiB):")
  for m in CHECKPOINTERS:
    s = summary.get(m)
    if s:
      print(f"  {LABELS[m]:18s} {common.fmt_gbps(s['gbps_finished_first'])} / "
            f"{common.fmt_gbps(s['gbps_synced_first'])}, RSS {fmt(s['peak_extra_rss_mib_first'], '.0f')}"
            f" (steady {fmt(s['peak_extra_rss_mib_steady'], '.0f')}); restore peak extra RSS "
            f"{fmt(s['restore_peak_extra_rss_mib'], '.0f')} MiB; on disk "
            f"{fmt(s['disk_mib'], '.0f')} MiB")
  print("(GB/s = 1e9 bytes/s of logical tree bytes; finished = save() start to "
        "wait_until_finished(); synced = to the end of a following os.sync(); fio write uses "
        "--end_fsync=1; peak extra RSS = VmHWM during the save minus RSS after building the tree)")


def plot(path: str, summary: dict, info: dict) -> bool:
  try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
  except ImportError:
    print("note: matplotlib is not importable; no plot written", file=sys.stderr)
    return False
  methods = [m for m in CHECKPOINTERS if m in summary]
  if not methods:
    print("note: no checkpointer was run; no plot written", file=sys.stderr)
    return False
  colors = {"fastpersist": "tab:blue", "orbax": "tab:orange"}
  modes = summary.get("snapshot_modes")
  if modes:
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5),
                                        gridspec_kw={"width_ratios": [3, 2, 2]})
    _plot_modes(ax3, modes, colors["fastpersist"])
  else:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
  groups = [("save\n(until finished)", "gbps_finished"), ("save\n(until synced)", "gbps_synced"),
            ("restore\n(cold cache)", "restore_gbps")]
  width = 0.8 / max(1, len(methods))
  for j, m in enumerate(methods):
    xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(groups))]
    vals = [summary[m][key] or 0 for _, key in groups]
    bars = ax1.bar(xs, vals, width, label=LABELS[m], color=colors[m])
    ax1.bar_label(bars, fmt="%.2f", fontsize=8)
  fio = summary.get("fio")
  if fio:
    for i, (key, label) in ((0, ("write_gbps", "fio write")), (1, ("write_gbps", "fio write")),
                            (2, ("read_gbps", "fio read"))):
      ax1.hlines(fio[key], i - 0.45, i + 0.45, colors="black", linestyles="--", linewidth=1.5)
      ax1.annotate(f"{label} {fio[key]:.2f}", (i + 0.45, fio[key]), textcoords="offset points",
                   xytext=(0, 3), ha="right", va="bottom", fontsize=8,
                   bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
  ax1.set_xticks(range(len(groups)), [g for g, _ in groups])
  ax1.set_ylabel("GB/s (1e9 bytes/s), median")
  top = max([summary[m][k] or 0 for m in methods for _, k in groups] +
            ([fio["write_gbps"], fio["read_gbps"]] if fio else []))
  ax1.set_ylim(0, top * 1.2)
  ax1.set_title(f"{info['tree_bytes'] / GiB:.2f} GiB, {info['leaves']} leaves, "
                f"{info['devices']} devices; median of {info['rounds']}")
  ax1.legend(loc="upper right", fontsize=8)

  width = 0.8 / max(1, len(methods))
  for j, m in enumerate(methods):
    xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(2)]
    vals = [summary[m]["blocking_ms_first"] or 0, summary[m]["blocking_ms_steady"] or 0]
    bars = ax2.bar(xs, vals, width, label=LABELS[m], color=colors[m])
    ax2.bar_label(bars, fmt="%.0f", fontsize=8)
  ax2.set_xticks(range(2), ["first save", "steady save"])
  ax2.set_ylabel("blocking time of save() (ms), median")
  ax2.set_title("blocking time (lower is better)")
  ms = [summary[m][k] for m in methods for k in ("blocking_ms_first", "blocking_ms_steady")
        if summary[m][k]]
  if ms and max(ms) / min(ms) > 20:  # keep the small bars visible
    ax2.set_yscale("log")
    ax2.set_ylim(min(ms) / 2, max(ms) * 3)
    ax2.set_ylabel("blocking time of save() (ms, log scale), median")
  elif ms:
    ax2.set_ylim(0, max(ms) * 1.15)
  ax2.legend(fontsize=8)
  fig.suptitle(f"FastPersist (snapshot {info.get('snapshot_mode', '?')}) vs Orbax: "
               f"{info['fstype']} on {info['device']}, {info['cpus']} CPUs", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def _plot_modes(ax, modes: dict, color: str) -> None:
  """FastPersist's steady blocking per snapshot mode against the memcpy yardstick."""
  names = list(modes["blocking_ms"])
  vals = [modes["blocking_ms"][m] or 0 for m in names]
  bars = ax.bar(range(len(names)), vals, 0.6, color=color)
  ax.bar_label(bars, fmt="%.1f", fontsize=8)
  memcpy = modes["memcpy_ms"]
  for y, label, style in ((memcpy, f"1 memcpy of the tree {memcpy:.0f} ms", "--"),
                          (1.2 * memcpy, "copy target 1.2 x memcpy", ":"),
                          (20.0, "reference target 20 ms", "-.")):
    ax.axhline(y, color="black", linestyle=style, linewidth=1)
    ax.text(0.98, y, label, transform=ax.get_yaxis_transform(), ha="right", va="bottom",
            fontsize=7)
  ax.set_xticks(range(len(names)), names)
  ax.set_ylim(0, max(vals + [1.2 * memcpy]) * 1.2)
  ax.set_ylabel("FastPersist save() blocking (ms), median")
  ax.set_title(f"blocking by snapshot mode (median of {modes['samples']})")


def run(args) -> int:
  from fastpersist_jax.options import FastPersistOptions
  if args.from_json:
    return _replot(args)
  if args.rounds < 1 or args.size_gib <= 0 or args.leaves < 3 or args.devices < 1:
    raise SystemExit("--rounds, --size_gib and --devices must be positive, --leaves at least 3")
  bad_modes = {m.strip() for m in args.snapshot_modes.split(",") if m.strip()} - {
      "auto", "copy", "reference"}
  if bad_modes:
    raise SystemExit(f"--snapshot_modes: unknown modes {sorted(bad_modes)}")
  if not os.path.isdir(args.dir):
    raise SystemExit(f"--dir {args.dir} is not a directory")
  wanted = [m.strip() for m in args.methods.split(",") if m.strip()]
  if not wanted or set(wanted) - set(METHODS):
    raise SystemExit(f"--methods takes a comma-separated subset of {','.join(METHODS)}")
  defaults = FastPersistOptions()
  chunk = (args.fio_chunk_mib * MiB) if args.fio_chunk_mib else defaults.chunk_bytes
  qd = args.fio_queue_depth or defaults.queue_depth
  host_limit = None if args.host_memory_limit_gib is None else int(args.host_memory_limit_gib * GiB)

  env = common.child_env(args.devices)
  devices = common.forced_devices(env, args.devices)
  axes = trees.mesh_axes(devices)
  spec = trees.tree_spec(int(args.size_gib * GiB), args.leaves, args.seed, axes)
  nbytes = trees.tree_bytes(spec)
  fio_size = -(-nbytes // chunk) * chunk

  mount = common.check_target_dir(args.dir, 2 * nbytes + 256 * MiB)
  fio = None if args.no_fio else shutil.which(args.fio)
  fio_version = None
  if fio:
    fio_version = subprocess.run([fio, "--version"], capture_output=True, text=True).stdout.strip()
  elif not args.no_fio:
    print(f"note: {args.fio} not found; skipping fio", file=sys.stderr)

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
          s = _run_fio_pair(fio, os.path.join(workdir, f"fio.r{r}"), fio_size, chunk, qd,
                            args.fio_fixedbufs)
          samples[m].append(s)
          print(f"  round {r + 1} fio          write {s['write']['gbps']:5.2f} GB/s, read "
                f"{s['read']['gbps']:5.2f} GB/s", file=sys.stderr)
          continue
        cfg = {"method": m, "round": r, "workdir": workdir, "spec": spec, "seed": args.seed,
               "bytes": nbytes, "devices": devices, "host_memory_limit": host_limit,
               "snapshot": args.snapshot,
               "snapshot_modes": [m.strip() for m in args.snapshot_modes.split(",") if m.strip()]}
        res = common.run_child("fastpersist_jax.benchmark.save_bench", cfg, env, args.child_timeout_s)
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

  return _report(args, info, samples, spec)


def _report(args, info: dict, samples: dict, spec: list[dict]) -> int:
  summary = summarize(samples)
  info["evicted_with"] = sorted({e for m in CHECKPOINTERS if m in summary
                                 for e in summary[m]["evicted_with"]})
  if samples.get("fastpersist"):
    info["engine"] = samples["fastpersist"][0].get("engine")
    modes = sorted({str(s.get("handler_stats", {}).get("snapshot_mode", "?"))
                    for r in samples["fastpersist"] for s in r["saves"]})
    info["snapshot_mode"] = ",".join(modes)
  if not all(r.get("rss_peak_resettable") for m in CHECKPOINTERS for r in samples.get(m, [])):
    print("note: /proc/self/clear_refs was not writable; peaks are since the child started",
          file=sys.stderr)
  print_report(info, summary)
  if args.json:
    with open(args.json, "w") as f:
      json.dump({"info": info, "summary": summary, "samples": samples, "tree": spec}, f, indent=1)
    print(f"\nwrote {args.json}")
  if args.plot and summary and plot(args.plot, summary, info):
    print(f"wrote {args.plot}")
  return 0


def _replot(args) -> int:
  """--from_json: the report (and --plot / --json) again from a saved run."""
  with open(args.from_json) as f:
    saved = json.load(f)
  if args.json and os.path.abspath(args.json) == os.path.abspath(args.from_json):
    args.json = None  # already there
  return _report(args, saved["info"], saved["samples"], saved.get("tree", []))


if __name__ == "__main__":
  sys.exit(_child_main(sys.argv[1:]))
