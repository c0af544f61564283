"""What the benchmarks share about the machine they measure: byte units, the
target directory and its mount, page-cache eviction, fio (the disk's own
limit), and writing results as JSON.

The rest is in its own module: children.py (child processes), rss.py
(resident-set probes), stats.py (statistics and number formatting),
trees.py (the synthetic training state).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from typing import Any

from fastpersist_jax.benchmark import stats

MiB = 1 << 20
GiB = 1 << 30

# fio's request size (bytes) and queue depth for the disk-limit read of the
# restore and device benchmarks.
FIO_CHUNK = 4 * MiB
FIO_QUEUE_DEPTH = 16


# The target directory ----------------------------------------------------------------


def require_dir(path: str) -> None:
  """Exits (SystemExit with a message, status 1) unless `path` is a directory."""
  if not os.path.isdir(path):
    raise SystemExit(f"--dir {path} is not a directory")


def check_target_dir(path: str, need: int) -> dict[str, str]:
  """Exits (SystemExit, status 1) unless `path` has `need` bytes free; warns
  on stderr when it is memory (tmpfs, ramfs), not a disk. Returns its mount
  record (mount_of). Exits (status 1) when `path` is not a directory."""
  require_dir(path)
  free = shutil.disk_usage(path).free
  if free < need:
    raise SystemExit(f"{path} has {free / GiB:.1f} GiB free; need {need / GiB:.1f} GiB")
  mount = mount_of(path)
  if mount["fstype"] in ("tmpfs", "ramfs"):
    print(f"warning: {path} is on {mount['fstype']}: these are memory, not disk, speeds",
          file=sys.stderr)
  return mount


def mount_of(path: str) -> dict[str, str]:
  """The mount holding `path`, from /proc/self/mounts: {"mount": mount point,
  "fstype": filesystem type, "source": device}; "?" for each where unknown."""
  path = os.path.realpath(path)
  best = {"mount": "?", "fstype": "?", "source": "?"}
  try:
    with open("/proc/self/mounts") as f:
      for line in f:
        source, mnt, fstype = line.split()[:3]
        mnt = mnt.replace("\\040", " ")
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best["mount"].rstrip("?")):
          best = {"mount": mnt, "fstype": fstype, "source": source}
  except OSError:
    pass
  return best


def dir_bytes(path: str) -> int:
  """Bytes the files under `path` take on disk (allocated blocks x 512)."""
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.stat(os.path.join(root, name)).st_blocks * 512
      except OSError:
        pass
  return total


def evict(path: str) -> str:
  """Empties the page cache of `path`'s files (a file or a directory tree):
  after sync(2), "3" into /proc/sys/vm/drop_caches where permitted, else
  fsync(2) and posix_fadvise(2) POSIX_FADV_DONTNEED per file. Returns which
  it used: "drop_caches" or "fadvise"."""
  os.sync()
  try:
    with open("/proc/sys/vm/drop_caches", "w") as f:
      f.write("3")
    return "drop_caches"
  except OSError:
    pass
  for root, _, files in os.walk(path):
    for name in files:
      try:
        fd = os.open(os.path.join(root, name), os.O_RDONLY)
      except OSError:
        continue
      try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)
  return "fadvise"


# fio ----------------------------------------------------------------------------------


def which_fio(binary: str, skip: bool, note: bool = True) -> str | None:
  """The path of the fio binary `binary` (--fio), or None when `skip`
  (--no_fio) or it is not found; with `note`, says on stderr that fio is
  skipped when not found."""
  fio = None if skip else shutil.which(binary)
  if fio is None and not skip and note:
    print(f"note: {binary} not found; skipping fio", file=sys.stderr)
  return fio


def fio_version(fio: str) -> str:
  """`fio --version`'s output, e.g. "fio-3.33"."""
  return subprocess.run([fio, "--version"], capture_output=True, text=True).stdout.strip()


def fio_file_bytes(nbytes: int, chunk: int = FIO_CHUNK) -> int:
  """The size of a fio file standing for `nbytes`: whole `chunk`-byte
  requests, rounded down, at least one."""
  return max(chunk, nbytes // chunk * chunk)


def run_fio(fio: str, rw: str, path: str, size: int, chunk: int, queue_depth: int,
            fixedbufs: bool = False) -> tuple[float, dict[str, int]]:
  """Runs fio --ioengine=io_uring --direct=1 --rw=RW ("write" or "read") of
  `size` bytes in `chunk`-byte requests at `queue_depth` on the file `path`
  (writes end with --end_fsync=1; `fixedbufs`: --fixedbufs=1, registered
  buffers).

  Returns:
    (seconds, details): fio's own seconds (io_bytes / bw_bytes) and
    {"fio_bw_bytes": bytes/s, "fio_runtime_ms": ms}.

  Raises:
    RuntimeError: fio failed, reported a job error, or moved fewer than
      `size` bytes.
  """
  cmd = [fio, f"--name={rw}", "--ioengine=io_uring", "--direct=1", f"--rw={rw}",
         f"--bs={chunk}", f"--iodepth={queue_depth}", f"--size={size}",
         f"--filename={path}", "--output-format=json"]
  if rw == "write":
    cmd.append("--end_fsync=1")
  if fixedbufs:
    cmd.append("--fixedbufs=1")
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode != 0:
    raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip()[-2000:]}")
  report = json.loads(out.stdout[out.stdout.index("{"):])
  job = report["jobs"][0]
  if job.get("error"):
    raise RuntimeError(f"fio job error {job['error']}: {out.stderr.strip()[-2000:]}")
  moved = job[rw]
  if moved["io_bytes"] < size:
    raise RuntimeError(f"fio moved {moved['io_bytes']} bytes, expected {size}")
  return moved["io_bytes"] / moved["bw_bytes"], {"fio_bw_bytes": moved["bw_bytes"],
                                                 "fio_runtime_ms": moved["runtime"]}


def run_fio_pair(fio: str, path: str, size: int, chunk: int, queue_depth: int,
                 fixedbufs: bool) -> dict[str, dict]:
  """A fio write of `size` bytes to `path`, then a read of it (as run_fio);
  the file is deleted after. Returns {"write": sample, "read": sample}, each
  {"seconds", "gbps" (1e9 bytes/s), "fio_bw_bytes", "fio_runtime_ms"}.
  Raises RuntimeError as run_fio."""
  try:
    ws, wd = run_fio(fio, "write", path, size, chunk, queue_depth, fixedbufs)
    rs, rd = run_fio(fio, "read", path, size, chunk, queue_depth, fixedbufs)
  finally:
    if os.path.exists(path):
      os.unlink(path)
  return {"write": {"seconds": ws, "gbps": stats.gbps(size, ws), **wd},
          "read": {"seconds": rs, "gbps": stats.gbps(size, rs), **rd}}


# Results ------------------------------------------------------------------------------


def write_json(path: str, data: Any, indent: int = 1) -> None:
  """Writes `data` to `path` as JSON with `indent`."""
  with open(path, "w") as f:
    json.dump(data, f, indent=indent)


def pyplot():
  """matplotlib.pyplot on the non-interactive Agg backend, or None (with a
  note on stderr) when matplotlib is not installed: plots are optional."""
  try:
    import matplotlib  # pylint: disable=g-import-not-at-top
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  except ImportError:
    print("note: matplotlib is not importable; no plot written", file=sys.stderr)
    return None
  return plt
