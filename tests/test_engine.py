"""Tests of the I/O engine (ext/ through fastpersist_jax.io_engine).

Every engine test runs on both engines ("io_uring", "threads") and, where the
filesystem matters, on a disk directory (ext4 here, O_DIRECT) and on tmpfs.
Data is random and compared bit for bit, both through the engine and through
plain Python file reads.
"""

from __future__ import annotations

import errno
import gc
import logging
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time

import numpy as np
import pytest

try:
  from conftest import fs_type, mounted_tmpfs
except ImportError:  # tests/ imported as a package
  from tests.conftest import fs_type, mounted_tmpfs
from fastpersist_jax import _ext
from fastpersist_jax import io_engine as io_engine_mod
from fastpersist_jax.io_engine import AlignedBuffer, IOEngine
from fastpersist_jax.options import FastPersistOptions

KiB = 1 << 10
MiB = 1 << 20


def rand_bytes(n: int, seed: int = 0) -> bytes:
  return np.random.default_rng(seed).bytes(n)


def aligned_copy(data: bytes) -> AlignedBuffer:
  buf = AlignedBuffer(len(data))
  np.frombuffer(buf, np.uint8)[:] = np.frombuffer(data, np.uint8)
  return buf


def file_bytes(path) -> bytes:
  with open(path, "rb") as f:
    return f.read()


# Round trips -----------------------------------------------------------------

SIZES = [0, 1, 511, 512, 4095, 4097, MiB + 3, 64 * MiB + 1]


@pytest.mark.parametrize("source", ["bytes", "aligned"])
@pytest.mark.parametrize("size", SIZES)
def test_roundtrip_sizes(io_engine, data_dir, size, source):
  data = rand_bytes(size, seed=size)
  src = data if source == "bytes" else aligned_copy(data)
  path = os.path.join(data_dir, "f.bin")
  io_engine.write_files({path: [(0, src)]})
  assert os.path.getsize(path) == size
  assert file_bytes(path) == data
  got = io_engine.read_file(path)
  assert got.nbytes == size
  assert bytes(got) == data


def test_disk_dir_uses_o_direct(io_engine, disk_dir):
  if fs_type(disk_dir) not in ("ext4", "xfs", "btrfs"):
    pytest.skip(f"{disk_dir} is on {fs_type(disk_dir)}")
  with io_engine.open_for_write(os.path.join(disk_dir, "d.bin")) as f:
    assert f.direct, f.direct_note
    assert f.offset_align in (512, 1024, 2048, 4096)


def test_many_files_in_one_call(io_engine, data_dir):
  n, size = 2000, 4 * KiB
  data = rand_bytes(n * size, seed=1)
  aligned = aligned_copy(data)
  files, expected = {}, {}
  for i in range(n):
    lo = i * size
    # Even files straight from aligned memory, odd ones from (misaligned) bytes.
    src = memoryview(aligned)[lo:lo + size] if i % 2 == 0 else memoryview(data)[lo:lo + size]
    path = os.path.join(data_dir, f"f{i:04d}.bin")
    files[path] = [(0, src)]
    expected[path] = data[lo:lo + size]

  calls = {"write": 0, "sync": 0}
  real_write, real_sync = io_engine.write, io_engine.sync

  def count(name, fn):
    def wrapped(arg):
      calls[name] += 1
      return fn(arg)
    return wrapped

  io_engine.write = count("write", real_write)
  io_engine.sync = count("sync", real_sync)
  io_engine.write_files(files)
  assert calls == {"write": 1, "sync": 1}
  for path, want in expected.items():
    assert os.path.getsize(path) == size
    assert file_bytes(path) == want, path


# Alignment -----------------------------------------------------------------

def test_unaligned_sources(io_engine, data_dir):
  base = aligned_copy(rand_bytes(2 * MiB, seed=2))
  arr = np.frombuffer(base, np.uint8)
  files, expected = {}, {}
  for shift in range(1, 8):
    for n in (1, 511, 4096, 5000, MiB + 3):
      src = arr[shift:shift + n]
      assert src.ctypes.data % 8 == shift
      path = os.path.join(data_dir, f"s{shift}_{n}.bin")
      files[path] = [(0, src)]
      expected[path] = src.tobytes()
  io_engine.write_files(files)
  for path, want in expected.items():
    assert os.path.getsize(path) == len(want)
    assert file_bytes(path) == want, path
    assert bytes(io_engine.read_file(path)) == want, path


# (file offset, length, source shift) in one file; [17161, 20480) is a hole.
MIXED = [(0, 4096, 0), (4096, 904, 3), (5000, 3000, 1), (8000, 192, 0),
         (8192, 8192, 0), (16384, 777, 5), (20480, 4097, 7), (24577, 3, 2)]


def _mixed_sources():
  base = aligned_copy(rand_bytes(64 * KiB, seed=3))
  arr = np.frombuffer(base, np.uint8)
  end = max(off + n for off, n, _ in MIXED)
  expected = np.zeros(end, np.uint8)
  extents = []
  for i, (off, n, shift) in enumerate(MIXED):
    src = arr[i * 8192 + shift:i * 8192 + shift + n]
    expected[off:off + n] = src
    extents.append((off, src))
  return base, extents, expected.tobytes()


@pytest.mark.parametrize("order", ["sorted", "reversed", "shuffled"])
def test_mixed_offsets_one_call(io_engine, data_dir, order):
  _keep, extents, expected = _mixed_sources()
  if order == "reversed":
    extents.reverse()
  elif order == "shuffled":
    random.Random(4).shuffle(extents)
  path = os.path.join(data_dir, "mixed.bin")
  with io_engine.open_for_write(path, preallocate=len(expected)) as f:
    io_engine.write([(f, off, src) for off, src in extents])
    io_engine.sync([f])
    assert f.logical_end == len(expected)
  assert os.path.getsize(path) == len(expected)
  assert file_bytes(path) == expected
  assert bytes(io_engine.read_file(path)) == expected


@pytest.mark.parametrize("order", ["sorted", "reversed"])
def test_mixed_offsets_separate_calls(io_engine, data_dir, order):
  # One write() per extent. Out of order, the zero padding of an aligned
  # extent's last block must not overwrite what an earlier call wrote there.
  _keep, extents, expected = _mixed_sources()
  if order == "reversed":
    extents.reverse()
  path = os.path.join(data_dir, "mixed.bin")
  with io_engine.open_for_write(path) as f:
    for off, src in extents:
      io_engine.write([(f, off, src)])
    io_engine.sync([f])
  assert file_bytes(path) == expected


# Reads -----------------------------------------------------------------------

def test_read_ranges(io_engine, data_dir):
  size = 2 * MiB + 123
  data = rand_bytes(size, seed=5)
  path = os.path.join(data_dir, "r.bin")
  io_engine.write_files({path: [(0, data)]})
  rng = random.Random(6)
  ranges = [(0, size), (0, 1), (size - 1, 1), (size - 123, 123), (size - 5000, 5000),
            (1, size - 1), (511, 2), (4095, 4098), (4096, 4096), (12345, 1), (size, 0),
            (0, 0), (MiB - 1, MiB + 124)]
  ranges += [(o, rng.randint(1, size - o)) for o in (rng.randrange(size) for _ in range(40))]
  dst_base = AlignedBuffer(size + 4096)
  dst = np.frombuffer(dst_base, np.uint8)
  with io_engine.open_for_read(path) as f:
    for i, (off, n) in enumerate(ranges):
      for kind in ("aligned", "shifted", "bytearray"):
        if kind == "aligned":
          out = dst[:n]
        elif kind == "shifted":
          out = dst[1 + i % 7:1 + i % 7 + n]
        else:
          out = bytearray(n)
        if not isinstance(out, bytearray):
          out[:] = 0xAA
        io_engine.read([(f, off, out)])
        assert bytes(out) == data[off:off + n], (off, n, kind)
    # Many ranges in one call.
    outs = [bytearray(n) for _, n in ranges]
    io_engine.read([(f, off, out) for (off, _), out in zip(ranges, outs)])
    for (off, n), out in zip(ranges, outs):
      assert bytes(out) == data[off:off + n], (off, n)
  assert bytes(io_engine.read_file(path, size - 7)) == data[-7:]
  assert bytes(io_engine.read_file(path, 3, 5000)) == data[3:5003]


@pytest.mark.parametrize("off,n", [(-10, 11), (0, 1), (0, 4096), (-4096 * 2 + 7, 9000),
                                   ("start", "size+1"), (4096, 1)])
def test_read_past_eof_raises_enodata(io_engine, data_dir, off, n):
  size = 3 * 4096 + 123
  data = rand_bytes(size, seed=7)
  path = os.path.join(data_dir, "eof.bin")
  io_engine.write_files({path: [(0, data)]})
  # Offsets relative to EOF except the whole-file case.
  if off == "start":
    off, n = 0, size + 1
  else:
    off = size + off
  with io_engine.open_for_read(path) as f:
    for out in (bytearray(n), np.frombuffer(AlignedBuffer(n), np.uint8)):
      with pytest.raises(OSError) as ei:
        io_engine.read([(f, off, out)])
      assert ei.value.errno == errno.ENODATA
      assert path in str(ei.value)
    # The file is still usable after the failed read.
    out = bytearray(5)
    io_engine.read([(f, size - 5, out)])
    assert bytes(out) == data[-5:]
  with pytest.raises(OSError) as ei:
    io_engine.read_file(path, off, n)
  assert ei.value.errno == errno.ENODATA


# Errors ----------------------------------------------------------------------

def test_missing_directory(io_engine, data_dir):
  path = os.path.join(data_dir, "no", "such", "dir", "f.bin")
  with pytest.raises(FileNotFoundError) as ei:
    io_engine.write_files({path: [(0, b"abc")]})
  assert path in str(ei.value)
  with pytest.raises(FileNotFoundError) as ei:
    io_engine.open_for_write(path)
  assert path in str(ei.value)
  missing = os.path.join(data_dir, "missing.bin")
  with pytest.raises(FileNotFoundError) as ei:
    io_engine.read_file(missing)
  assert missing in str(ei.value)


def test_directory_opened_for_write(io_engine, data_dir):
  sub = os.path.join(data_dir, "sub")
  os.mkdir(sub)
  with pytest.raises(IsADirectoryError) as ei:
    io_engine.open_for_write(sub)
  assert sub in str(ei.value)
  with pytest.raises(IsADirectoryError):
    io_engine.write_files({sub: [(0, b"x")]})


def test_read_only_file(io_engine, disk_dir):
  path = os.path.join(disk_dir, "ro.bin")
  io_engine.write_files({path: [(0, b"keep")]})
  if os.geteuid() != 0:
    os.chmod(path, 0o444)
    undo = lambda: os.chmod(path, 0o644)
  else:
    # Root ignores permission bits; the immutable attribute stops it.
    if shutil.which("chattr") is None:
      pytest.skip("running as root and no chattr to make a file immutable")
    r = subprocess.run(["chattr", "+i", path], capture_output=True, text=True)
    if r.returncode != 0:
      pytest.skip(f"chattr +i failed: {r.stderr.strip()}")
    undo = lambda: subprocess.run(["chattr", "-i", path], check=True)
  try:
    with pytest.raises(PermissionError) as ei:
      io_engine.write_files({path: [(0, b"overwrite")]})
    assert path in str(ei.value)
  finally:
    undo()
  assert file_bytes(path) == b"keep"


def test_read_only_filesystem(io_engine):
  with mounted_tmpfs("ro,size=1m") as d:
    path = os.path.join(d, "f.bin")
    with pytest.raises(OSError) as ei:
      io_engine.write_files({path: [(0, b"x")]})
    assert ei.value.errno == errno.EROFS
    assert path in str(ei.value)


def test_misuse_raises_ebadf(io_engine, data_dir):
  a = os.path.join(data_dir, "a.bin")
  io_engine.write_files({a: [(0, b"hello")]})
  r = io_engine.open_for_read(a)
  w = io_engine.open_for_write(os.path.join(data_dir, "b.bin"))
  cases = [
      lambda: io_engine.write([(r, 0, b"x")]),         # write through a read File
      lambda: io_engine.sync([r]),                      # sync a read File
      lambda: io_engine.read([(w, 0, bytearray(1))]),  # read through a write File
  ]
  r.close()
  w.close()
  assert r.closed and w.closed
  cases += [
      lambda: io_engine.read([(r, 0, bytearray(1))]),  # read a closed File
      lambda: io_engine.write([(w, 0, b"x")]),         # write a closed File
      lambda: io_engine.sync([w]),
      lambda: r.size(),
  ]
  for i, case in enumerate(cases):
    with pytest.raises(OSError) as ei:
      case()
    assert ei.value.errno == errno.EBADF, (i, ei.value)
  r.close()  # closing twice is harmless
  # The engine is still fine.
  c = os.path.join(data_dir, "c.bin")
  io_engine.write_files({c: [(0, b"world")]})
  assert bytes(io_engine.read_file(c)) == b"world"


def test_bad_extents_raise_value_error(io_engine, data_dir):
  with io_engine.open_for_write(os.path.join(data_dir, "v.bin")) as f:
    with pytest.raises(ValueError):
      io_engine.write([(f, -1, b"x")])
    with pytest.raises(ValueError):
      io_engine.write([(f, 0)])
    with pytest.raises(BufferError):
      io_engine.read([(f, 0, b"read-only bytes")])


def test_out_of_space_preallocation(io_engine):
  with mounted_tmpfs("size=2m") as d:
    path = os.path.join(d, "big.bin")
    with pytest.raises(OSError) as ei:
      io_engine.write_files({path: [(0, rand_bytes(4 * MiB))]})
    assert ei.value.errno == errno.ENOSPC
    assert path in str(ei.value)
    assert not os.path.exists(path), "a half-made file was left behind"
    # Nothing stays reserved: a file that fits can still be written.
    small = os.path.join(d, "small.bin")
    data = rand_bytes(MiB + 1, seed=8)
    io_engine.write_files({small: [(0, data)]})
    assert file_bytes(small) == data


def test_out_of_space_during_write(io_engine):
  # Also with several rings and many small requests in flight when it fails.
  many = IOEngine(FastPersistOptions(engine=io_engine.kind, io_rings=2, queue_depth=4,
                                     chunk_bytes=64 * KiB))
  data = aligned_copy(rand_bytes(4 * MiB))
  with mounted_tmpfs("size=2m") as d:
    for eng in (io_engine, many):
      path = os.path.join(d, "big.bin")
      with eng.open_for_write(path) as f:  # no preallocation
        with pytest.raises(OSError) as ei:
          eng.write([(f, 0, data)])
        assert ei.value.errno == errno.ENOSPC
        assert path in str(ei.value)
      os.unlink(path)


# Concurrency and resources ---------------------------------------------------

def test_gil_released_during_io(io_engine, disk_dir):
  n = 256 * MiB
  src = AlignedBuffer(n)
  np.frombuffer(src, np.uint64)[:] = np.arange(n // 8, dtype=np.uint64) * 0x9E3779B97F4A7C15
  dst = AlignedBuffer(n)
  state = {"count": 0, "stop": False}

  def spin():
    while not state["stop"]:
      state["count"] += 1

  t = threading.Thread(target=spin, daemon=True)
  t.start()
  try:
    c0 = state["count"]
    t0 = time.monotonic()
    time.sleep(0.2)
    rate = (state["count"] - c0) / (time.monotonic() - t0)
    path = os.path.join(disk_dir, "big.bin")
    results = []
    with io_engine.open_for_write(path) as f:
      c0, t0 = state["count"], time.monotonic()
      io_engine.write([(f, 0, src)])
      results.append(("write", state["count"] - c0, time.monotonic() - t0))
      io_engine.sync([f])
    with io_engine.open_for_read(path) as f:
      c0, t0 = state["count"], time.monotonic()
      io_engine.read([(f, 0, dst)])
      results.append(("read", state["count"] - c0, time.monotonic() - t0))
  finally:
    state["stop"] = True
    t.join()
  assert np.array_equal(np.frombuffer(src, np.uint8), np.frombuffer(dst, np.uint8))
  for op, grew, seconds in results:
    # Holding the GIL would leave the counter where it was (give or take one
    # switch interval); released, it runs at a good part of its idle rate.
    expected = rate * seconds
    assert grew >= 0.2 * expected, (
        f"{op} of 256 MiB took {seconds:.3f}s but the counter grew by only {grew} "
        f"(idle rate {rate:.0f}/s): the GIL seems held during I/O")


def test_concurrent_callers_share_one_engine(io_engine, data_dir):
  errors = []

  def worker(i):
    try:
      data = rand_bytes(3 * MiB + 7, seed=100 + i)
      path = os.path.join(data_dir, f"t{i}.bin")
      for _ in range(3):
        io_engine.write_files({path: [(0, data[:4096]), (4096, data[4096:])]})
        assert bytes(io_engine.read_file(path)) == data
    except BaseException as e:  # noqa: BLE001 - reported below
      errors.append(e)

  threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors, errors


def test_no_fd_leak(io_engine, shm_dir):
  def open_fds():
    return len(os.listdir("/proc/self/fd"))

  data = rand_bytes(5000, seed=9)
  missing = os.path.join(shm_dir, "missing", "f.bin")

  def one(i):
    path = os.path.join(shm_dir, f"f{i % 10}.bin")
    # Two extents, the second at an unaligned offset (the buffered descriptor).
    io_engine.write_files({path: [(0, data), (5001, data[:100])]})
    assert bytes(io_engine.read_file(path, 5001, 100)) == data[:100]
    if i % 10 == 0:  # error paths too
      with pytest.raises(OSError):
        io_engine.read_file(path, 10000, 200)
      with pytest.raises(FileNotFoundError):
        io_engine.write_files({missing: [(0, data)]})

  one(0)
  gc.collect()
  before = open_fds()
  for i in range(1000):
    one(i)
  gc.collect()
  assert open_fds() == before


# Registered and locked buffers -------------------------------------------------

def test_registered_buffers(io_engine, data_dir):
  n = 8 * MiB
  data = rand_bytes(n + 8192, seed=10)
  src = aligned_copy(data)
  dst = AlignedBuffer(n + 8192)
  ok = io_engine.register([src, dst])
  assert ok == (io_engine.kind == "io_uring")
  s, d = memoryview(src), memoryview(dst)
  path = os.path.join(data_dir, "reg.bin")
  # Aligned pieces (the fixed-buffer path), a misaligned piece and an
  # unaligned file offset.
  parts = [(0, s[:n]), (n, s[n + 4096:n + 8192]), (n + 4096, s[5:5 + 1000]), (n + 5096, s[7:107])]
  with io_engine.open_for_write(path, preallocate=n + 5196) as f:
    io_engine.write([(f, off, buf) for off, buf in parts])
    io_engine.sync([f])
  expected = b"".join(bytes(buf) for _, buf in parts)
  assert file_bytes(path) == expected
  with io_engine.open_for_read(path) as f:
    io_engine.read([(f, 0, d[:n]), (f, n, d[n + 4096:n + 8192])])
    assert bytes(d[:n]) == expected[:n]
    assert bytes(d[n + 4096:n + 8192]) == expected[n:n + 4096]
    io_engine.read([(f, 3, d[1:4097])])
    assert bytes(d[1:4097]) == expected[3:4099]
  io_engine.unregister()
  assert bytes(io_engine.read_file(path)) == expected


def test_registered_buffer_outlives_its_python_reference(disk_dir):
  # A buffer dropped by the caller while still registered must not let a new
  # mapping at the same address inherit the registration (stale pages).
  eng = IOEngine(FastPersistOptions(engine="io_uring"))
  old = AlignedBuffer(MiB)
  np.frombuffer(old, np.uint8)[:] = 1
  assert eng.register([old])
  del old
  gc.collect()
  new = AlignedBuffer(MiB)
  np.frombuffer(new, np.uint8)[:] = 2
  path = os.path.join(disk_dir, "stale.bin")
  eng.write_files({path: [(0, new)]})
  assert file_bytes(path) == b"\x02" * MiB


def test_locked_buffer(io_engine, data_dir):
  data = rand_bytes(2 * MiB + 5, seed=11)
  buf = AlignedBuffer(len(data), lock=True)
  if os.geteuid() == 0:
    assert buf.locked
  np.frombuffer(buf, np.uint8)[:] = np.frombuffer(data, np.uint8)
  io_engine.register([buf])
  path = os.path.join(data_dir, "locked.bin")
  io_engine.write_files({path: [(0, buf)]})
  assert file_bytes(path) == data
  out = AlignedBuffer(len(data), lock=True)
  with io_engine.open_for_read(path) as f:
    io_engine.read([(f, 0, out)])
  assert bytes(memoryview(out)) == data


# Configurations and engine selection ------------------------------------------

@pytest.mark.parametrize("cfg", [
    dict(queue_depth=1, chunk_bytes=4096),
    dict(queue_depth=4, chunk_bytes=64 * KiB, io_rings=2),
    dict(direct_io=False),
], ids=["qd1-4k", "2rings-64k", "buffered"])
def test_engine_configs(engine_kind, data_dir, cfg):
  eng = IOEngine(FastPersistOptions(engine=engine_kind, **cfg))
  data = rand_bytes(3 * MiB + 7, seed=12)
  parts = {os.path.join(data_dir, f"c{i}.bin"): [(0, data[:MiB * i + i]), (MiB * i + i, data[-5:])]
           for i in range(1, 4)}
  eng.write_files(parts)
  for i, (path, ((_, head), (off, tail))) in enumerate(parts.items(), 1):
    assert file_bytes(path) == head + tail
    with eng.open_for_read(path) as f:
      assert f.direct == cfg.get("direct_io", True) or fs_type(path) not in ("ext4", "xfs")
      out = bytearray(len(head) - 3)
      eng.read([(f, 3, out)])
      assert bytes(out) == head[3:]


def test_env_forces_thread_engine_with_warning(monkeypatch, caplog, shm_dir):
  monkeypatch.setenv("FASTPERSIST_ENGINE", "threads")
  with caplog.at_level(logging.WARNING, logger="fastpersist_jax.io_engine"):
    eng = IOEngine(FastPersistOptions())
  assert eng.kind == "threads"
  path = os.path.join(shm_dir, "t.bin")
  eng.write_files({path: [(0, b"threads")]})
  assert bytes(eng.read_file(path)) == b"threads"
  warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
  assert warnings, "FASTPERSIST_ENGINE=threads selected the fallback engine without a warning"


def test_auto_falls_back_when_io_uring_unavailable(monkeypatch, caplog):
  real = _ext.Engine

  def fake(kind, **kwargs):
    if kind == "io_uring":
      raise _ext.RingUnavailable("io_uring_queue_init failed: Operation not permitted")
    return real(kind, **kwargs)

  monkeypatch.delenv("FASTPERSIST_ENGINE", raising=False)
  monkeypatch.setattr(io_engine_mod._ext, "Engine", fake)
  with caplog.at_level(logging.WARNING, logger="fastpersist_jax.io_engine"):
    eng = IOEngine(FastPersistOptions())
  assert eng.kind == "threads"
  assert any("io_uring" in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
  from fastpersist_jax import FastPersistError, IOUringUnavailableError
  with pytest.raises(IOUringUnavailableError, match="Operation not permitted.*engine='auto'") as ei:
    IOEngine(FastPersistOptions(engine="io_uring"))
  assert isinstance(ei.value, FastPersistError)


def test_bad_engine_env(monkeypatch):
  from fastpersist_jax import InvalidOptionsError
  monkeypatch.setenv("FASTPERSIST_ENGINE", "spdk")
  with pytest.raises(InvalidOptionsError, match="FASTPERSIST_ENGINE"):
    IOEngine(FastPersistOptions())
  with pytest.raises(ValueError):
    _ext.Engine("spdk")


_UNPRIVILEGED_CHILD = r"""
import logging, os, sys, resource
import numpy as np
logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
from fastpersist_jax.io_engine import IOEngine
from fastpersist_jax.staging import StagingPool
print("memlock", resource.getrlimit(resource.RLIMIT_MEMLOCK))
eng = IOEngine()
pool = StagingPool(eng, 32 << 20, 64 << 20, register=True)
pool.ensure(64 << 20)
print("registered", pool.registered)
view = pool.view(0)
view[:] = np.arange(view.size, dtype=np.uint64).view(np.uint8)[:view.size]
path = os.path.join(sys.argv[1], "f")
eng.write_files({path: [(0, memoryview(pool.buffer(0)))]})
back = np.frombuffer(eng.read_file(path), np.uint8)
print("roundtrip", bool((back == view).all()))
"""


def test_registration_degrades_gracefully_without_memlock():
  # As an unprivileged user with the usual 8 MiB RLIMIT_MEMLOCK, 64 MiB of
  # staging cannot be locked or registered: it must be used unregistered,
  # with a log line, and I/O must work.
  if os.geteuid() != 0 or shutil.which("setpriv") is None:
    pytest.skip("needs root and setpriv(1) to run a child as an unprivileged user")
  import resource  # pylint: disable=g-import-not-at-top
  limit = 8 << 20

  def as_nobody(*args):
    return subprocess.run(
        ["setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups", "--inh-caps=-all",
         sys.executable, *args], capture_output=True, text=True, timeout=120, cwd="/",
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_MEMLOCK, (limit, limit)),
        env=dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p)))
  probe = as_nobody("-c", "import fastpersist_jax.io_engine")
  if probe.returncode != 0:
    pytest.skip(f"the unprivileged user cannot import fastpersist_jax here: {probe.stderr[-300:]}")
  d = tempfile.mkdtemp(prefix="fastpersist-nobody-", dir="/tmp")
  try:
    os.chmod(d, 0o777)
    r = as_nobody("-c", _UNPRIVILEGED_CHILD, d)
  finally:
    shutil.rmtree(d, ignore_errors=True)
  out = r.stdout + r.stderr
  assert r.returncode == 0, out
  assert "registered False" in out, out
  assert "used unregistered" in out, out
  assert "roundtrip True" in out, out

# The snapshot copy (_ext.copy_many) ------------------------------------------------------------


@pytest.mark.parametrize("threads", [1, 2, 4])
def test_copy_many_is_exact_at_every_size_and_alignment(threads):
  # Sizes around the non-temporal-store threshold (16 KiB) and the parallel
  # split (4 MiB total, 2 MiB pieces); misaligned destinations and sources
  # exercise the head and tail of the streaming loop.
  rng = np.random.default_rng(threads)
  sizes = [0, 1, 15, 16, 63, 64, 65, 16 * KiB - 1, 16 * KiB, 16 * KiB + 1, 256 * KiB + 7,
           2 * MiB + 3, 5 * MiB + 11]
  src_buf = rng.integers(0, 256, sum(sizes) + 64 * len(sizes), dtype=np.uint8)
  dst_buf = AlignedBuffer(max(len(src_buf) + 64 * len(sizes), 10 * MiB))
  dst = np.frombuffer(dst_buf, np.uint8)
  dst[:] = 0xAA
  pairs, expected, s_at, d_at = [], [], 0, 0
  for k, n in enumerate(sizes):
    s_at += k % 13           # misalign the source ...
    d_at += (k * 7) % 17     # ... and the destination differently
    pairs.append((dst[d_at:d_at + n], src_buf[s_at:s_at + n]))
    expected.append((d_at, n, src_buf[s_at:s_at + n].copy()))
    s_at += n
    d_at += n + 1            # a guard byte between destinations
  _ext.copy_many(pairs, threads)
  for d_at, n, want in expected:
    np.testing.assert_array_equal(dst[d_at:d_at + n], want)
    assert dst[d_at + n] == 0xAA, "a copy wrote past its destination"
  # One single large copy split across threads.
  big = rng.integers(0, 256, 9 * MiB + 5, dtype=np.uint8)
  _ext.copy_many([(dst[3:3 + big.size], big)], threads)
  np.testing.assert_array_equal(dst[3:3 + big.size], big)


def test_copy_many_rejects_bad_pairs():
  a = np.zeros(8, np.uint8)
  with pytest.raises(ValueError, match="destination is 8 bytes, source 4"):
    _ext.copy_many([(a, np.zeros(4, np.uint8))], 1)
  with pytest.raises(ValueError, match="dst, src|destination, source"):
    _ext.copy_many([(a,)], 1)
  with pytest.raises((ValueError, TypeError, BufferError)):
    _ext.copy_many([(b"readonly!", np.zeros(9, np.uint8))], 1)   # destination not writable


# O_DIRECT alignment planning (ext/alignment.h) -------------------------------------------------

# Block (offset and length alignment) and memory alignment of these plans; an
# aligned address, and one that is not.
BLOCK = 512
ALIGNED_ADDR, MISALIGNED_ADDR = 1 << 20, (1 << 20) + 1


def _write_plan(offset, n, prior_end, address=ALIGNED_ADDR, direct=True):
  return _ext.alignment.plan_write(offset, n, address, BLOCK, BLOCK, prior_end, direct)


def _plan(main_len=0, bulk=0, copy=False, pad_tail=False, buffered_from=0, buffered_len=0,
          bounce_bytes=0):
  return dict(main_len=main_len, bulk=bulk, copy=copy, pad_tail=pad_tail,
              buffered_from=buffered_from, buffered_len=buffered_len, bounce_bytes=bounce_bytes)


@pytest.mark.parametrize("args, want", [
    # Zero length: nothing at all.
    ((1024, 0, 0), _plan()),
    # Exact multiple at an aligned offset, aligned memory: all direct, no bounce.
    ((1024, 2048, 0), _plan(main_len=2048, bulk=2048)),
    # Sub-block length past the file's prior end: one zero-padded block from bounce memory.
    ((512, 100, 512), _plan(main_len=512, pad_tail=True, bounce_bytes=4096)),
    # Sub-block length ending before the prior end (padding could overwrite earlier bytes):
    # the bytes as they are, through the buffered descriptor.
    ((512, 100, 4096), _plan(buffered_len=100)),
    # Unaligned start: the whole extent through the buffered descriptor.
    ((100, 1000, 0), _plan(buffered_len=1000)),
    ((4095, 1, 0), _plan(buffered_len=1)),
    # Aligned start, unaligned end, past the prior end: bulk direct, padded tail block.
    ((0, 1300, 0), _plan(main_len=1536, bulk=1024, pad_tail=True, bounce_bytes=4096)),
    # ... and ending before the prior end: bulk direct, tail buffered after it.
    ((0, 1300, 2000), _plan(main_len=1024, bulk=1024, buffered_from=1024, buffered_len=276)),
    # Ending exactly at the prior end pads (nothing lies at or past it).
    ((0, 1300, 1300), _plan(main_len=1536, bulk=1024, pad_tail=True, bounce_bytes=4096)),
])
def test_write_plan_aligned_memory(args, want):
  assert _write_plan(*args) == want


@pytest.mark.parametrize("args, want", [
    # Misaligned memory: everything direct comes from a bounce copy (whole pages).
    ((0, 1300, 0), _plan(main_len=1536, bulk=1024, copy=True, pad_tail=True, bounce_bytes=4096)),
    ((0, 3 * 4096 + 1, 0), _plan(main_len=12800, bulk=12288, copy=True, pad_tail=True,
                                 bounce_bytes=16384)),
    ((0, 2048, 0), _plan(main_len=2048, bulk=2048, copy=True, bounce_bytes=4096)),
    # Sub-block before the prior end: nothing direct, so nothing to copy.
    ((512, 100, 4096), _plan(copy=True, buffered_len=100)),
    # Unaligned offset: buffered, memory alignment irrelevant.
    ((100, 1000, 0), _plan(buffered_len=1000)),
])
def test_write_plan_misaligned_memory(args, want):
  assert _write_plan(*args, address=MISALIGNED_ADDR) == want


def test_write_plan_buffered_file_takes_everything_as_is():
  assert _write_plan(100, 1000, 0, address=MISALIGNED_ADDR, direct=False) == _plan(
      main_len=1000, bulk=1000)
  assert _write_plan(100, 0, 0, direct=False) == _plan()


@pytest.mark.parametrize("offset, n, address, want", [
    # Zero length: no window.
    (1024, 0, ALIGNED_ADDR, []),
    # Exact multiple, aligned memory: one direct window.
    (1024, 2048, ALIGNED_ADDR, [(1024, 2048, False)]),
    # Unaligned start and end around an aligned middle whose memory is aligned:
    # a bounce block each side, the middle direct.
    (100, 2000, ALIGNED_ADDR - 412, [(0, 512, True), (512, 1536, False), (2048, 512, True)]),
    # Unaligned end only.
    (0, 1300, ALIGNED_ADDR, [(0, 1024, False), (1024, 512, True)]),
    # Sub-block length inside one block, and across a block boundary: bounce over the blocks.
    (100, 200, ALIGNED_ADDR, [(0, 512, True)]),
    (500, 100, ALIGNED_ADDR, [(0, 1024, True)]),
    # Misaligned memory: one bounce window over every block touched.
    (0, 2048, MISALIGNED_ADDR, [(0, 2048, True)]),
    (100, 2000, ALIGNED_ADDR, [(0, 2560, True)]),
])
def test_read_plan(offset, n, address, want):
  assert _ext.alignment.plan_read(offset, n, address, BLOCK, BLOCK) == want


def test_read_plan_buffered_file_is_one_window():
  assert _ext.alignment.plan_read(100, 200, MISALIGNED_ADDR, BLOCK, BLOCK, False) == [
      (100, 200, False)]
  assert _ext.alignment.plan_read(100, 0, MISALIGNED_ADDR, BLOCK, BLOCK, False) == []


def test_engine_defaults_and_kind_names():
  """The binding's defaults are EngineConfig's; the kind is reported by name."""
  assert "kind: str = 'io_uring'" in _ext.Engine.__init__.__doc__
  eng = _ext.Engine("threads")   # works where io_uring is refused too
  assert (eng.kind, eng.queue_depth, eng.chunk_bytes, eng.threads) == ("threads", 16, 4 * MiB, 1)


def test_engine_config_defaults_agree_with_the_options():
  """ext/engine.h's EngineConfig (the binding's defaults) and
  FastPersistOptions (options.py, which passes its own) give the same engine."""
  eng, opts = _ext.Engine("threads"), FastPersistOptions()
  assert (eng.queue_depth, eng.chunk_bytes, eng.threads) == (
      opts.queue_depth, opts.chunk_bytes, opts.io_rings)
  assert "direct: bool = True" in _ext.File.__init__.__doc__ and opts.direct_io


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))


@pytest.mark.parametrize("field,value", [
    ("restore_batch_bytes", 0), ("queue_depth", -1), ("crc_chunk_bytes", 4097),
    ("staging_slab_bytes", 1000), ("host_redundancy", 0), ("snapshot", "lazy"),
    ("background_cpus", ()), ("copy_threads", -2)])
def test_bad_options_raise_invalid_options_error_naming_the_option(field, value):
  from fastpersist_jax import FastPersistError, InvalidOptionsError
  with pytest.raises(InvalidOptionsError, match=field) as e:
    FastPersistOptions(**{field: value})
  assert isinstance(e.value, FastPersistError) and isinstance(e.value, ValueError)
