"""Raw write/read throughput of the I/O engine, against simple baselines and fio.

Writes the same data (N GiB from one pre-faulted AlignedBuffer) to the same
directory, in interleaved rounds (the order rotates each round), with:

  engine          the fastpersist engine (io_uring, O_DIRECT): open with
                  preallocation, write, fdatasync, close
  buffered        write() of chunk-sized pieces through the page cache, fsync
  odirect-pwrite  a Python loop of os.pwrite, one chunk at a time, O_DIRECT,
                  then fdatasync
  fio             fio --ioengine=io_uring --direct=1 --rw=write --bs=CHUNK
                  --iodepth=QUEUE_DEPTH --end_fsync=1 (fio's own figure)
  fio-fixedbufs   the same with --fixedbufs=1: registered buffers, as the
                  engine uses them (unless --no_register); without them every
                  request pins its pages, which costs fio a good deal of CPU

then reads one such file back the same ways (engine, O_DIRECT preadv loop,
buffered read after evicting the file's pages, fio --rw=read). Reads by the
engine and the Python loops are checked against the data written. Prints the
median of each in GB/s (1e9 bytes/s) and the engine/fio ratio. With --sweep it
also times the engine over chunk sizes x queue depths. Deletes every file it
writes.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import sys
import time
from typing import Callable

from fastpersist_jax.benchmark import common, stats
from fastpersist_jax.benchmark.common import GiB, MiB

import numpy as np

HELP = "raw write/read GB/s of the I/O engine vs buffered, O_DIRECT pwrite and fio"

WRITE_METHODS = {
    "engine": "engine (io_uring, O_DIRECT)",
    "buffered": "buffered write + fsync",
    "odirect-pwrite": "Python O_DIRECT pwrite loop",
    "fio": "fio (io_uring, O_DIRECT)",
    "fio-fixedbufs": "fio --fixedbufs",
}
READ_METHODS = {
    "engine": "engine (io_uring, O_DIRECT)",
    "buffered": "buffered read (cold)",
    "odirect-pwrite": "Python O_DIRECT preadv loop",
    "fio": "fio (io_uring, O_DIRECT)",
    "fio-fixedbufs": "fio --fixedbufs",
}
SWEEP_CHUNK_MIB = (1, 4, 16)
SWEEP_QUEUE_DEPTH = (4, 16, 32)


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the io benchmark's flags to `parser`."""
  parser.add_argument("--size_gib", type=float, default=1.0, help="data written per run (default 1)")
  parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
  parser.add_argument("--dir", default=".", help="directory to write in (default: the current one)")
  parser.add_argument("--chunk_mib", type=int, default=4, help="request size in MiB (default 4)")
  parser.add_argument("--queue_depth", type=int, default=16, help="requests in flight (default 16)")
  parser.add_argument("--io_rings", type=int, default=1, help="engine rings (default 1)")
  parser.add_argument("--no_register", action="store_true",
                      help="do not register the buffers as io_uring fixed buffers")
  parser.add_argument("--fio", default="fio", help="fio binary (default: fio on PATH)")
  parser.add_argument("--no_fio", action="store_true", help="skip fio even where installed")
  parser.add_argument("--sweep", action="store_true",
                      help="also time the engine over chunk sizes %s MiB x queue depths %s"
                      % (SWEEP_CHUNK_MIB, SWEEP_QUEUE_DEPTH))
  parser.add_argument("--json", metavar="PATH", help="write all results to PATH as JSON")


# Environment -------------------------------------------------------------------


def _fill(buf) -> None:
  """Non-repeating, incompressible-enough data, fast to make."""
  words = np.frombuffer(buf, np.uint64)
  words[:] = np.arange(words.size, dtype=np.uint64)
  words *= np.uint64(0x9E3779B97F4A7C15)
  words ^= words >> np.uint64(29)


# Methods: each returns seconds (and optionally details) ---------------------------

class Bench:
  """One run's data and methods: `size` bytes (whole `chunk`-byte requests)
  from a pre-faulted source buffer, written and read back by each method.
  Every method takes a path and returns (seconds, details)."""

  def __init__(self, args):
    from fastpersist_jax.io_engine import AlignedBuffer, IOEngine
    from fastpersist_jax.options import FastPersistOptions
    self.args = args
    self.chunk = args.chunk_mib * MiB
    self.size = max(self.chunk, int(args.size_gib * GiB) // self.chunk * self.chunk)
    self.dir = os.path.abspath(args.dir)
    self.prefix = os.path.join(self.dir, f".fastpersist_io_bench.{os.getpid()}")
    self.fio = common.which_fio(args.fio, args.no_fio)
    self.src = AlignedBuffer(self.size)
    self.dst = AlignedBuffer(self.size)
    _fill(self.src)
    self.expected = np.frombuffer(self.src, np.uint8)
    self._options = FastPersistOptions
    self._engine_cls = IOEngine
    self.engine, self.registered = self.make_engine(args.chunk_mib, args.queue_depth)

  def make_engine(self, chunk_mib: int, queue_depth: int):
    eng = self._engine_cls(self._options(
        engine="io_uring", queue_depth=queue_depth, chunk_bytes=chunk_mib * MiB,
        io_rings=self.args.io_rings, register_buffers=not self.args.no_register))
    registered = False if self.args.no_register else eng.register([self.src, self.dst])
    return eng, registered

  def path(self, tag: str) -> str:
    return f"{self.prefix}.{tag}"

  def cleanup(self) -> None:
    for name in os.listdir(self.dir):
      full = os.path.join(self.dir, name)
      if full.startswith(self.prefix + "."):
        os.unlink(full)

  # Writes.

  def write_engine(self, path, engine=None):
    eng = engine or self.engine
    t0 = time.perf_counter()
    f = eng.open_for_write(path, preallocate=self.size)
    try:
      eng.write([(f, 0, self.src)])
      t1 = time.perf_counter()
      eng.sync([f])
    finally:
      f.close()
    t2 = time.perf_counter()
    return t2 - t0, {"write_s": t1 - t0, "sync_s": t2 - t1, "direct": f.direct}

  def write_buffered(self, path):
    mv = memoryview(self.src)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
      off = 0
      while off < self.size:
        off += os.write(fd, mv[off:off + self.chunk])
      os.fsync(fd)
    finally:
      os.close(fd)
    return time.perf_counter() - t0, {}

  def write_odirect(self, path):
    mv = memoryview(self.src)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC | os.O_DIRECT, 0o644)
    try:
      for off in range(0, self.size, self.chunk):
        n = os.pwrite(fd, mv[off:off + self.chunk], off)
        if n != min(self.chunk, self.size - off):
          raise OSError(f"short O_DIRECT write at {off}: {n} bytes")
      os.fdatasync(fd)
    finally:
      os.close(fd)
    return time.perf_counter() - t0, {}

  def _run_fio(self, rw: str, path: str, fixedbufs: bool = False):
    return common.run_fio(self.fio, rw, path, self.size, self.chunk, self.args.queue_depth, fixedbufs)

  def write_fio(self, path):
    return self._run_fio("write", path)

  def write_fio_fixedbufs(self, path):
    return self._run_fio("write", path, fixedbufs=True)

  # Reads (of a file holding self.src).

  def _check(self, method: str) -> None:
    if not np.array_equal(np.frombuffer(self.dst, np.uint8), self.expected):
      raise AssertionError(f"{method}: data read back differs from data written")

  def read_engine(self, path, engine=None):
    eng = engine or self.engine
    t0 = time.perf_counter()
    with eng.open_for_read(path) as f:
      eng.read([(f, 0, self.dst)])
    return time.perf_counter() - t0, {}

  def read_buffered(self, path):
    mv = memoryview(self.dst)
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
      os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # cold cache, untimed
      t0 = time.perf_counter()
      off = 0
      while off < self.size:
        n = os.readv(fd, [mv[off:off + self.chunk]])
        if n == 0:
          raise OSError(f"unexpected end of file at {off}")
        off += n
      seconds = time.perf_counter() - t0
    finally:
      os.close(fd)
    return seconds, {}

  def read_odirect(self, path):
    mv = memoryview(self.dst)
    t0 = time.perf_counter()
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_DIRECT)
    try:
      for off in range(0, self.size, self.chunk):
        n = os.preadv(fd, [mv[off:off + self.chunk]], off)
        if n != min(self.chunk, self.size - off):
          raise OSError(f"short O_DIRECT read at {off}: {n} bytes")
    finally:
      os.close(fd)
    return time.perf_counter() - t0, {}

  def read_fio(self, path):
    return self._run_fio("read", path)

  def read_fio_fixedbufs(self, path):
    return self._run_fio("read", path, fixedbufs=True)


def _summary(samples: list[dict]) -> dict:
  median, low, high = stats.spread(s["gbps"] for s in samples)
  return {"median_gbps": median, "min_gbps": low, "max_gbps": high, "samples": samples}


def _timed(fn: Callable, size: int, *a, **kw) -> dict:
  seconds, details = fn(*a, **kw)
  return {"seconds": seconds, "gbps": stats.gbps(size, seconds), **details}


def run_compare(b: Bench) -> dict:
  """Writes with each method, then reads one file back with each, in
  interleaved rounds, checking what the engine and the Python loops read.
  Returns {"write" | "read": {method: {"median_gbps", "min_gbps",
  "max_gbps" (GB/s, 1e9 bytes/s), "samples"}}}. Raises AssertionError when a
  file has the wrong size or data reads back wrong."""
  args = b.args
  writes = {"engine": b.write_engine, "buffered": b.write_buffered,
            "odirect-pwrite": b.write_odirect}
  reads = {"engine": b.read_engine, "buffered": b.read_buffered, "odirect-pwrite": b.read_odirect}
  if b.fio:
    writes["fio"], writes["fio-fixedbufs"] = b.write_fio, b.write_fio_fixedbufs
    reads["fio"], reads["fio-fixedbufs"] = b.read_fio, b.read_fio_fixedbufs
  results = {"write": {m: [] for m in writes}, "read": {m: [] for m in reads}}

  names = list(writes)
  for r in range(args.rounds):
    for m in names[r % len(names):] + names[:r % len(names)]:
      path = b.path(f"w.{m}")
      try:
        sample = _timed(writes[m], b.size, path)
        if os.path.getsize(path) != b.size:
          raise AssertionError(f"{m}: wrote {os.path.getsize(path)} bytes, expected {b.size}")
      finally:
        if os.path.exists(path):
          os.unlink(path)
      results["write"][m].append(sample)
      print(f"  round {r + 1} write {m:15s} {sample['gbps']:6.2f} GB/s", file=sys.stderr)

  path = b.path("r")
  b.write_engine(path)
  try:
    names = list(reads)
    for r in range(args.rounds):
      for m in names[r % len(names):] + names[:r % len(names)]:
        ours = not m.startswith("fio")
        if ours:
          np.frombuffer(b.dst, np.uint8).fill(0)
        sample = _timed(reads[m], b.size, path)
        if ours:
          b._check(m)
        results["read"][m].append(sample)
        print(f"  round {r + 1} read  {m:15s} {sample['gbps']:6.2f} GB/s", file=sys.stderr)
  finally:
    os.unlink(path)
  return {op: {m: _summary(s) for m, s in per.items()} for op, per in results.items()}


def run_sweep(b: Bench) -> list[dict]:
  """The engine over SWEEP_CHUNK_MIB x SWEEP_QUEUE_DEPTH: one row per pair,
  {"chunk_mib", "queue_depth", "write", "read"} (each as run_compare's
  per-method summary)."""
  rows = []
  path = b.path("sweep")
  for chunk_mib in SWEEP_CHUNK_MIB:
    for qd in SWEEP_QUEUE_DEPTH:
      eng, _ = b.make_engine(chunk_mib, qd)
      w, rd = [], []
      try:
        for _ in range(b.args.rounds):
          w.append(_timed(b.write_engine, b.size, path, engine=eng))
          np.frombuffer(b.dst, np.uint8).fill(0)
          rd.append(_timed(b.read_engine, b.size, path, engine=eng))
          b._check(f"sweep chunk {chunk_mib} MiB, qd {qd}")
          os.unlink(path)
      finally:
        if os.path.exists(path):
          os.unlink(path)
        eng.unregister()
        del eng
        gc.collect()
      row = {"chunk_mib": chunk_mib, "queue_depth": qd,
             "write": _summary(w), "read": _summary(rd)}
      rows.append(row)
      print(f"  sweep chunk {chunk_mib:2d} MiB qd {qd:2d}: write "
            f"{row['write']['median_gbps']:.2f} read {row['read']['median_gbps']:.2f} GB/s",
            file=sys.stderr)
  return rows


def print_report(info: dict, compare: dict, sweep: list[dict] | None) -> None:
  """Prints the heading, the median/min/max GB/s table, the engine/fio
  ratios and (with --sweep) the sweep grid to stdout."""
  print()
  print(f"fastpersist io benchmark: {info['size_bytes'] / GiB:.2f} GiB x {info['rounds']} rounds "
        f"in {info['dir']} ({info['fstype']} on {info['device']}), chunk {info['chunk_mib']} MiB, "
        f"queue depth {info['queue_depth']}, rings {info['io_rings']}, "
        f"fixed buffers {'yes' if info['registered_buffers'] else 'no'}")
  print(f"kernel {info['kernel']}, {info['cpus']} CPUs, liburing {info['liburing']}, "
        f"fio {info['fio'] or 'not run'}")
  print()
  print(f"{'op':6s} {'method':32s} {'median GB/s':>11s} {'min':>7s} {'max':>7s}")
  for op, labels in (("write", WRITE_METHODS), ("read", READ_METHODS)):
    for m, label in labels.items():
      if m in compare[op]:
        s = compare[op][m]
        print(f"{op:6s} {label:32s} {s['median_gbps']:11.2f} {s['min_gbps']:7.2f} {s['max_gbps']:7.2f}")
  if "ratios" in info:
    print()
    for fio_method, ratios in info["ratios"].items():
      print(f"engine / {WRITE_METHODS[fio_method]} (medians): "
            + ", ".join(f"{op} {v:.2f}" for op, v in ratios.items()))
  print("(engine write = open + fallocate + write + fdatasync; fio write runs with --end_fsync=1)")
  if sweep:
    print()
    print("engine sweep, median GB/s write / read:")
    print(f"{'chunk':>8s} " + " ".join(f"{'qd ' + str(q):>13s}" for q in SWEEP_QUEUE_DEPTH))
    for c in SWEEP_CHUNK_MIB:
      cells = []
      for q in SWEEP_QUEUE_DEPTH:
        row = next(r for r in sweep if r["chunk_mib"] == c and r["queue_depth"] == q)
        cells.append(f"{row['write']['median_gbps']:5.2f} / {row['read']['median_gbps']:5.2f}")
      print(f"{str(c) + ' MiB':>8s} " + " ".join(f"{cell:>13s}" for cell in cells))


def run(args) -> int:
  """Runs the io benchmark with the flags of add_arguments, prints the
  report and writes --json. Returns the exit status, 0. Raises SystemExit
  for a flag value it refuses or too little free space in --dir."""
  from fastpersist_jax import _ext
  if args.rounds < 1 or args.size_gib <= 0 or args.chunk_mib < 1 or args.queue_depth < 1:
    raise SystemExit("--rounds, --size_gib, --chunk_mib and --queue_depth must be positive")
  common.require_dir(args.dir)
  mount = common.check_target_dir(args.dir, int(args.size_gib * GiB) + 64 * MiB)

  b = Bench(args)
  fio_version = common.fio_version(b.fio) if b.fio else None
  info = {
      "size_bytes": b.size, "rounds": args.rounds, "dir": b.dir, "fstype": mount["fstype"],
      "device": mount["source"], "chunk_mib": args.chunk_mib, "queue_depth": args.queue_depth,
      "io_rings": args.io_rings, "registered_buffers": bool(b.registered),
      "engine": b.engine.kind, "kernel": platform.release(), "cpus": os.cpu_count(),
      "liburing": _ext.liburing_version, "fio": fio_version, "python": platform.python_version(),
  }
  try:
    compare = run_compare(b)
    if b.fio:
      info["ratios"] = {
          fio_method: {op: compare[op]["engine"]["median_gbps"] / compare[op][fio_method]["median_gbps"]
                       for op in ("write", "read")}
          for fio_method in ("fio", "fio-fixedbufs")}
    sweep = run_sweep(b) if args.sweep else None
  finally:
    b.cleanup()
  print_report(info, compare, sweep)
  if args.json:
    common.write_json(args.json, {"info": info, "results": compare, "sweep": sweep}, indent=2)
    print(f"\nwrote {args.json}")
  return 0
