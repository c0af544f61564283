"""Pieces the benchmarks share: the target directory and its mount, fio,
page-cache eviction, child processes, resident-set probes, statistics and
number formatting."""

from __future__ import annotations

import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile

MiB = 1 << 20
GiB = 1 << 30


def check_target_dir(path: str, need: int) -> dict:
  """Exits unless `path` has `need` bytes free; warns when it is memory, not
  a disk. Returns its mount record."""
  free = shutil.disk_usage(path).free
  if free < need:
    raise SystemExit(f"{path} has {free / GiB:.1f} GiB free; need {need / GiB:.1f} GiB")
  mount = mount_of(path)
  if mount["fstype"] in ("tmpfs", "ramfs"):
    print(f"warning: {path} is on {mount['fstype']}: these are memory, not disk, speeds",
          file=sys.stderr)
  return mount


def mount_of(path: str) -> dict:
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


def run_fio(fio: str, rw: str, path: str, size: int, chunk: int, queue_depth: int,
            fixedbufs: bool = False) -> tuple[float, dict]:
  """fio --ioengine=io_uring --direct=1 --rw=RW of `size` bytes in `chunk`-sized
  requests at `queue_depth` on `path` (writes end with fsync). Returns fio's
  own seconds (io_bytes / bw_bytes) and details."""
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
  stats = job[rw]
  if stats["io_bytes"] < size:
    raise RuntimeError(f"fio moved {stats['io_bytes']} bytes, expected {size}")
  return stats["io_bytes"] / stats["bw_bytes"], {"fio_bw_bytes": stats["bw_bytes"],
                                                 "fio_runtime_ms": stats["runtime"]}


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


class Rss:
  """Current and peak resident set of this process, with a resettable peak."""

  def __init__(self):
    self.resettable = self.reset()

  def reset(self) -> bool:
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
      return True
    except OSError:
      return False

  @staticmethod
  def _bytes(field: str) -> int:
    try:
      return _status_kib(field) * 1024
    except (OSError, KeyError):  # no /proc: the lifetime peak is all there is
      return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

  def current(self) -> int:
    return self._bytes("VmRSS")

  def peak(self) -> int:
    return self._bytes("VmHWM")


def dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.stat(os.path.join(root, name)).st_blocks * 512
      except OSError:
        pass
  return total


def evict(path: str) -> str:
  """Empties the page cache of `path`'s files: drop_caches where permitted,
  else POSIX_FADV_DONTNEED per file. Returns which it used."""
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


def child_env(devices: int) -> dict:
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "")
  if "--xla_force_host_platform_device_count" not in flags:
    env["XLA_FLAGS"] = (flags + f" --xla_force_host_platform_device_count={devices}").strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def forced_devices(env: dict, default: int) -> int:
  for flag in env.get("XLA_FLAGS", "").split():
    if flag.startswith("--xla_force_host_platform_device_count="):
      return int(flag.split("=", 1)[1])
  return default


def child_main(argv: list[str], work) -> int:
  """The child side of run_child: `argv` is [CFG, OUT]; writes work(cfg)'s
  result (or {"error": traceback}) to OUT as JSON; returns the exit status."""
  import traceback  # pylint: disable=g-import-not-at-top
  cfg_path, out_path = argv
  with open(cfg_path) as f:
    cfg = json.load(f)
  try:
    result = work(cfg)
  except BaseException:  # pylint: disable=broad-except
    result = {"error": traceback.format_exc()}
  with open(out_path, "w") as f:
    json.dump(result, f)
  return 1 if "error" in result else 0


def run_child(module: str, cfg: dict, env: dict, timeout: float) -> dict:
  """Runs `python -m module CFG OUT` (the module's child entry point) and
  returns the JSON it wrote to OUT; raises RuntimeError with its output when
  it fails or times out."""
  with tempfile.TemporaryDirectory(prefix="fastpersist_save_bench.") as tmp:
    cfg_path, out_path = os.path.join(tmp, "cfg.json"), os.path.join(tmp, "out.json")
    with open(cfg_path, "w") as f:
      json.dump(cfg, f)
    cmd = [sys.executable, "-m", module, cfg_path, out_path]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
      output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      output, _ = proc.communicate()
      raise RuntimeError(f"{cfg['method']} round {cfg['round']}: child timed out after "
                         f"{timeout:.0f} s; its output:\n{output[-4000:]}") from None
    result = None
    if os.path.exists(out_path):
      with open(out_path) as f:
        result = json.load(f)
    if proc.returncode != 0 or result is None or "error" in result:
      detail = result["error"] if result and "error" in result else output[-4000:]
      raise RuntimeError(f"{cfg['method']} round {cfg['round']}: child failed "
                         f"(exit {proc.returncode}):\n{detail}")
    # Everything since this run: RUSAGE_CHILDREN keeps the largest child's peak.
    result["ru_maxrss_children_bytes"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return result


def med(xs: list[float]) -> float | None:
  xs = [x for x in xs if x is not None]
  return statistics.median(xs) if xs else None


def fmt_gbps(v) -> str:
  if v is None:
    return "-"
  return f"{v:.2f}" if v >= 0.1 else f"{v:.3f}" if v >= 0.001 else f"{v:.1e}"


def ratio(a, b):
  return a / b if a is not None and b else None
