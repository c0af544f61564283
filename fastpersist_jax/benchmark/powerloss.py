"""Power-loss (crash-consistency) test of checkpoint saves: the dm-log-writes /
CrashMonkey method, with FUSE standing in for device-mapper.

Each trial:

  1. A one-file FUSE filesystem (powerloss_fs.py) serves disk.img, a copy of
     a freshly made ext4 image (the base), and logs in order every write
     (offset + bytes) and every flush reaching it. A loop device (buffered)
     on disk.img carries the ext4 filesystem, mounted on a temporary
     directory (data=ordered, journal commit every 5 s: ext4's defaults).
  2. A workload process (powerloss_child.py; two, each with its own root,
     for --placement per_host) saves step after step with fastpersist's
     handler through Orbax (--api v0: CheckpointManager, max_to_keep=2; v1:
     ocp.v1.training.Checkpointer, LatestN(2)) and prints "durable <step>"
     once a save has returned (and, by --mode, was made durable).
  3. At a random moment after the first "durable" line (right after one,
     some time into the next save, or after a random number of further
     disk writes and flushes) the power is cut: the FUSE server logs
     nothing more. The steps reported durable are those whose line reached
     the harness before the cut. Then the workload is SIGKILLed and
     everything unmounted and detached (the live filesystem stays coherent:
     writes after the cut still reach the live image, they are just not in
     the log).
  4. Crash images: the base plus the log replayed up to the last flush,
     plus none, all, and random in-order subsets of the writes after it
     (what a disk with a volatile write cache may hold after power loss).
     Each is attached and mounted (ext4 replays its journal) and, in a fresh
     process, the checkpoints on it are opened the way a restarted job would
     open them and restored.

Verdict per image: OK; LOST (the last step reported durable before the cut
is missing, older than latest_step(), or does not restore); WRONG (a restore
returned other bytes than were saved); UNMOUNTABLE. "latest unrestorable"
counts images whose latest step (when newer than the durable one) fails to
restore: allowed, but worth seeing.

Needs root, /dev/fuse, losetup, mkfs.ext4, fusermount3 (Debian fuse3 and
libfuse3-3) and the Python package mfusepy.

  python -m fastpersist_jax.benchmark powerloss --trials=40 --mode=none
  python -m fastpersist_jax.benchmark powerloss --mode=none,root-fsync,durable --api=v0,v1

Prints each configuration's counts, then a last line of JSON: one object of
counts (a list of them for several configurations).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HELP = "power-loss crash-consistency trials (dm-log-writes method over FUSE + loop + ext4)"

MiB = 1 << 20
MODES = ("none", "root-fsync", "durable")
APIS = ("v0", "v1")
PLACEMENTS = ("shared", "per_host")
CUTS = ("random", "after_durable", "mid_save", "at_record")
VERDICTS = ("OK", "LOST", "WRONG", "UNMOUNTABLE")
CHILD_MODULE = "fastpersist_jax.benchmark.powerloss_child"
FS_MODULE = "fastpersist_jax.benchmark.powerloss_fs"
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


# Prerequisites -----------------------------------------------------------------------


def missing_prerequisites() -> list[str]:
  """What this machine lacks for the harness (empty: it can run): root,
  /dev/fuse, the tools, mfusepy with a loadable libfuse."""
  missing = []
  if os.geteuid() != 0:
    missing.append("root (losetup, mount)")
  if not os.path.exists("/dev/fuse"):
    missing.append("/dev/fuse")
  for tool in ("losetup", "mkfs.ext4", "mount", "umount"):
    if shutil.which(tool) is None and not os.path.exists(f"/usr/sbin/{tool}") \
        and not os.path.exists(f"/sbin/{tool}"):
      missing.append(tool)
  if _fusermount() is None:
    missing.append("fusermount3 (Debian package fuse3)")
  try:
    import mfusepy  # pylint: disable=g-import-not-at-top,unused-import
  except Exception as e:  # pylint: disable=broad-except  (OSError/EnvironmentError: no libfuse)
    missing.append(f"mfusepy with libfuse ({type(e).__name__}: {e})")
  return missing


def _fusermount() -> str | None:
  return shutil.which("fusermount3") or shutil.which("fusermount")


# Processes and commands ----------------------------------------------------------------


def _sh(cmd: list[str], timeout: float = 30) -> tuple[int, str]:
  """Runs `cmd`; returns (exit status, stdout + stderr). After `timeout`
  seconds it is killed and (124, output) returned, without waiting for a
  process stuck in the kernel."""
  p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       stdin=subprocess.DEVNULL)
  try:
    out, _ = p.communicate(timeout=timeout)
    return p.returncode, out
  except KeyboardInterrupt:
    # Let the tool finish, so that what it set up (a mount, a loop device)
    # exists when the caller's clean-up sweeps.
    try:
      p.wait(min(timeout, 30))
    except subprocess.TimeoutExpired:
      p.kill()
    raise
  except subprocess.TimeoutExpired:
    p.kill()
    try:
      out, _ = p.communicate(timeout=2)
    except subprocess.TimeoutExpired:
      out = ""
    return 124, f"{out}\n(timed out after {timeout} s)"


class _Proc:
  """A child process whose stdout lines (with their arrival times) are
  collected by a thread; stderr goes to a file."""

  def __init__(self, cmd: list[str], env: dict[str, str] | None, stderr_path: str):
    self._stderr = open(stderr_path, "wb")
    self.stderr_path = stderr_path
    self.proc = subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self._stderr, text=True, bufsize=1)
    self.lines: list[tuple[float, str]] = []
    self.eof = False
    self._cond = threading.Condition()
    threading.Thread(target=self._read, daemon=True).start()

  def _read(self):
    for line in self.proc.stdout:
      with self._cond:
        self.lines.append((time.monotonic(), line.rstrip("\n")))
        self._cond.notify_all()
    with self._cond:
      self.eof = True
      self._cond.notify_all()

  def send(self, line: str) -> None:
    """Writes `line` to its stdin (ignored once it has gone)."""
    try:
      self.proc.stdin.write(line + "\n")
      self.proc.stdin.flush()
    except (BrokenPipeError, OSError, ValueError):
      pass

  def wait_line(self, pred, timeout: float, start: int = 0) -> int | None:
    """Index of the first line at or after `start` satisfying `pred`; None
    after `timeout` seconds or once its output ended without one."""
    deadline = time.monotonic() + timeout
    with self._cond:
      i = start
      while True:
        while i < len(self.lines):
          if pred(self.lines[i][1]):
            return i
          i += 1
        if self.eof or time.monotonic() >= deadline:
          return None
        self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))

  def snapshot(self) -> list[tuple[float, str]]:
    with self._cond:
      return list(self.lines)

  def kill(self) -> None:
    """SIGKILLs it (if still running) and reaps it."""
    if self.proc.poll() is None:
      try:
        self.proc.send_signal(signal.SIGKILL)
      except ProcessLookupError:
        pass
    try:
      self.proc.wait(10)
    except subprocess.TimeoutExpired:
      pass
    for f in (self.proc.stdin,):
      try:
        f.close()
      except (BrokenPipeError, OSError):
        pass
    self._stderr.close()

  def stderr_tail(self, n: int = 3000) -> str:
    try:
      with open(self.stderr_path, "rb") as f:
        return f.read()[-n:].decode(errors="replace")
    except OSError:
      return ""


def _env(devices: int) -> dict[str, str]:
  env = dict(os.environ)
  kept = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  env["XLA_FLAGS"] = " ".join(kept + [f"{_DEVICE_COUNT_FLAG}={devices}"])
  env["JAX_PLATFORMS"] = "cpu"
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  env["PYTHONUNBUFFERED"] = "1"
  return env


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


# Block devices and mounts ---------------------------------------------------------------


def make_base_image(path: str, size_mib: int) -> None:
  """A sparse file of `size_mib` MiB holding a fresh ext4 filesystem (4 KiB
  blocks, with a journal; inode tables and journal initialised now, so that
  no lazy-init thread writes in the background later)."""
  with open(path, "wb") as f:
    f.truncate(size_mib * MiB)
  rc, out = _sh(["mkfs.ext4", "-q", "-F", "-b", "4096",
                 "-E", "lazy_itable_init=0,lazy_journal_init=0", path], timeout=120)
  if rc != 0:
    raise RuntimeError(f"mkfs.ext4 failed: {out}")


def attach(path: str) -> str:
  """A loop device (buffered I/O) on `path`; its /dev path."""
  rc, out = _sh(["losetup", "--find", "--show", path], timeout=30)
  if rc != 0:
    raise RuntimeError(f"losetup {path} failed: {out}")
  return out.strip()


def detach(dev: str) -> None:
  """Detaches loop device `dev` (where busy, the kernel detaches it once
  released: autoclear)."""
  _sh(["losetup", "-d", dev], timeout=30)


def mount(dev: str, where: str) -> str | None:
  """Mounts ext4 `dev` read-write on `where`; None, or why it failed."""
  rc, out = _sh(["mount", "-t", "ext4", dev, where], timeout=60)
  return None if rc == 0 else (out.strip() or f"mount exited {rc}")


def is_mounted(where: str) -> bool:
  """Whether something is mounted on `where`, from /proc/self/mounts (no
  stat of `where`, which could wait on a wedged FUSE server)."""
  where = os.path.abspath(where)
  try:
    with open("/proc/self/mounts") as f:
      return any(line.split()[1].replace("\\040", " ") == where for line in f)
  except OSError:
    return False


def unmount(where: str, timeout: float = 30) -> None:
  """Unmounts `where`: normally (writing back what is dirty), else lazily."""
  if not is_mounted(where):
    return
  rc, _ = _sh(["umount", where], timeout=timeout)
  if rc != 0 and is_mounted(where):
    _sh(["umount", "-l", where], timeout=10)


def _loop_devices() -> list[tuple[str, str]]:
  """(device, backing file) of every loop device set up."""
  rc, out = _sh(["losetup", "--list", "--noheadings", "--raw", "-O", "NAME,BACK-FILE"], 30)
  found = []
  for line in out.splitlines() if rc == 0 else []:
    parts = line.split(" ", 1)
    if len(parts) == 2:
      found.append((parts[0], parts[1].removesuffix(" (deleted)")))
  return found


def mounts_below(top: str) -> list[str]:
  """Mount points below directory `top` (from /proc/self/mounts)."""
  top = os.path.abspath(top).rstrip("/") + "/"
  try:
    with open("/proc/self/mounts") as f:
      points = [line.split()[1].replace("\\040", " ") for line in f]
  except OSError:
    return []
  return [p for p in points if p.startswith(top)]


def sweep(top: str, keep: list[str] = ()) -> None:
  """Undoes what a trial under directory `top` may have left: unmounts
  every mount below it (deepest first; lazily where busy), except those on
  `keep`, and detaches every loop device whose backing file is below it."""
  keep = {os.path.abspath(k) for k in keep}
  for where in sorted((p for p in mounts_below(top) if p not in keep), key=len, reverse=True):
    unmount(where, timeout=15)
  top = os.path.abspath(top).rstrip("/") + "/"
  for dev, back in _loop_devices():
    if back.startswith(top):
      detach(dev)


class LoggingDisk:
  """The FUSE server of powerloss_fs.py serving `backing` as
  `fuse_dir`/disk.img and logging to `log_path`."""

  def __init__(self, backing: str, log_path: str, fuse_dir: str, workdir: str):
    """Starts the server; wait_ready() waits for its mount."""
    self.fuse_dir, self.log_path = fuse_dir, log_path
    self.image = os.path.join(fuse_dir, "disk.img")
    self.server = _Proc([sys.executable, "-m", FS_MODULE, backing, log_path, fuse_dir],
                        None, os.path.join(workdir, "fuse.stderr"))

  def wait_ready(self, timeout: float = 60) -> None:
    """Waits until the kernel has initialised the mount.

    Raises:
      RuntimeError: it did not within `timeout` seconds.
    """
    if self.server.wait_line(lambda l: l == "ready", timeout) is None:
      raise RuntimeError(f"the FUSE server did not start:\n{self.server.stderr_tail()}")
    deadline = time.monotonic() + 10
    while not os.path.exists(self.image) and time.monotonic() < deadline:
      time.sleep(0.02)

  def cut(self, after: int | None = None, timeout: float = 30) -> tuple[int, float]:
    """Cuts the power: the log takes nothing more, now or (`after`) once
    that many more records are logged. Returns (records logged, the
    time.monotonic() of the cut)."""
    n = len(self.server.snapshot())
    self.server.send("cut" if after is None else f"cutafter {after}")
    i = self.server.wait_line(lambda l: l.startswith("cut "), timeout, start=n)
    if i is None and after is not None:    # the workload wrote too little: cut now
      self.server.send("cut")
      i = self.server.wait_line(lambda l: l.startswith("cut "), 30, start=n)
    if i is None:
      raise RuntimeError(f"the FUSE server did not answer cut:\n{self.server.stderr_tail()}")
    _, logged, when = self.server.snapshot()[i][1].split()
    return int(logged), float(when)

  def stats(self) -> dict:
    """The server's counts so far: writes, flushes, bytes, cut."""
    n = len(self.server.snapshot())
    self.server.send("stats")
    i = self.server.wait_line(lambda l: l.startswith("stats "), 30, start=n)
    if i is None:
      raise RuntimeError(f"the FUSE server did not answer stats:\n{self.server.stderr_tail()}")
    w, f, b, c = map(int, self.server.snapshot()[i][1].split()[1:])
    return {"writes": w, "flushes": f, "bytes": b, "cut": bool(c)}

  def stop(self) -> None:
    """Unmounts the FUSE filesystem (lazily if it is busy) and ends the
    server (SIGKILL if it lingers: the kernel then aborts the connection,
    so nothing waits on it)."""
    fm = _fusermount() or "fusermount3"
    if is_mounted(self.fuse_dir):
      rc, _ = _sh([fm, "-u", self.fuse_dir], timeout=15)
      if rc != 0 and is_mounted(self.fuse_dir):
        _sh([fm, "-u", "-z", self.fuse_dir], timeout=10)
    try:
      self.server.proc.wait(10)
    except subprocess.TimeoutExpired:
      pass
    self.server.kill()


# Crash images --------------------------------------------------------------------------


def _sparse_copy(src: str, dst: str) -> None:
  rc, out = _sh(["cp", "--sparse=always", src, dst], timeout=120)
  if rc != 0:
    raise RuntimeError(f"cp {src} {dst}: {out}")


def _apply(image: str, log_path: str, records) -> None:
  from fastpersist_jax.benchmark import powerloss_fs  # pylint: disable=g-import-not-at-top
  fd = os.open(image, os.O_WRONLY)
  try:
    for offset, data in powerloss_fs.iter_write_data(log_path, records):
      os.pwrite(fd, data, offset)
  finally:
    os.close(fd)


def crash_images(base: str, log_path: str, out_dir: str, rng: random.Random,
                 subsets: int) -> tuple[list[tuple[str, str]], dict]:
  """Writes the crash images of one trial's log into `out_dir`.

  The base plus every write up to the log's last flush is the durable
  prefix; the images are it plus (a) none, (b) all, (c) `subsets` random
  in-order subsets (half of them prefixes) of the writes after that flush;
  duplicates are made once.

  Returns:
    ([(label, image path)], log facts: records, writes, flushes, writes
    after the last flush).
  """
  from fastpersist_jax.benchmark import powerloss_fs  # pylint: disable=g-import-not-at-top
  records = powerloss_fs.read_log(log_path)
  last_flush = max((i for i, r in enumerate(records) if r.kind == "F"), default=-1)
  durable = [r for r in records[:last_flush + 1] if r.kind == "W"]
  tail = [r for r in records[last_flush + 1:] if r.kind == "W"]
  n = len(tail)
  choices: dict[tuple[int, ...], str] = {(): "none"}
  choices.setdefault(tuple(range(n)), "all")
  for k in range(subsets):
    if n < 2:
      break
    if k % 2 == 0:
      pick = tuple(range(rng.randint(1, n - 1)))
      label = f"prefix{len(pick)}"
    else:
      p = rng.uniform(0.2, 0.8)
      pick = tuple(i for i in range(n) if rng.random() < p)
      label = f"subset{len(pick)}"
    choices.setdefault(pick, label)
  prefix = os.path.join(out_dir, "durable.img")
  _sparse_copy(base, prefix)
  _apply(prefix, log_path, durable)
  images = []
  for j, (pick, label) in enumerate(choices.items()):
    path = os.path.join(out_dir, f"crash{j}.img")
    _sparse_copy(prefix, path)
    _apply(path, log_path, [tail[i] for i in pick])
    images.append((f"{label}/{n}", path))
  os.unlink(prefix)
  facts = {"records": len(records), "writes": sum(r.kind == "W" for r in records),
           "flushes": sum(r.kind == "F" for r in records), "tail_writes": n}
  return images, facts


# One trial -----------------------------------------------------------------------------


def _durable_steps(proc: _Proc, before: float | None = None) -> list[int]:
  return [int(l.split()[1]) for t, l in proc.snapshot()
          if l.startswith("durable ") and (before is None or t <= before)]


def run_trial(cfg: dict, base: str, workdir: str, rng: random.Random) -> dict:
  """One trial (see the module docstring) in `workdir`, on a copy of the
  ext4 image `base`. `cfg`: mode, api, placement, cut, devices, subsets,
  timeout_s. Returns its record: the cut, the steps reported durable, the
  log's size and each image's verdict and checks.

  Raises:
    RuntimeError: the workload or a tool failed (not a verdict).
  """
  t_start = time.monotonic()
  fuse_dir, live_dir, images_dir = (os.path.join(workdir, d) for d in ("fuse", "live", "images"))
  for d in (fuse_dir, live_dir, images_dir):
    os.makedirs(d, exist_ok=True)
  per_host = cfg["placement"] == "per_host"
  hosts = 2 if per_host else 1
  roots = [f"ckpt/host{i}" for i in range(hosts)] if per_host else ["ckpt"]
  port = _free_port()
  timeout = cfg["timeout_s"]
  workloads, checker, disk, dev = [], None, None, None
  record = {"placement": cfg["placement"], "mode": cfg["mode"], "api": cfg["api"]}
  phases = record["phases_s"] = {}

  def phase(name: str) -> None:
    phases[name] = round(time.monotonic() - t_start, 2)
  try:
    # Workloads start first: they import JAX while the disk is set up.
    for i in range(hosts):
      child_cfg = dict(mode=cfg["mode"], api=cfg["api"], placement=cfg["placement"],
                       root=os.path.join(live_dir, roots[i]), pid=i, nproc=hosts, port=port)
      workloads.append(_Proc([sys.executable, "-m", CHILD_MODULE, "workload",
                              json.dumps(child_cfg)],
                             _env(1 if per_host else cfg["devices"]),
                             os.path.join(workdir, f"workload{i}.stderr")))
    _sparse_copy(base, os.path.join(workdir, "live.img"))
    log_path = os.path.join(workdir, "log")
    disk = LoggingDisk(os.path.join(workdir, "live.img"), log_path, fuse_dir, workdir)
    disk.wait_ready()
    dev = attach(disk.image)
    err = mount(dev, live_dir)
    if err:
      raise RuntimeError(f"mounting the live filesystem failed: {err}")
    for r in roots:
      os.makedirs(os.path.join(live_dir, r))
    # The roots exist before any save, as an operator's would.
    rc, out = _sh(["sync", "-f", live_dir], timeout=60)
    if rc != 0:
      raise RuntimeError(f"sync -f {live_dir}: {out}")
    for w in workloads:
      if w.wait_line(lambda l: l == "ready", timeout) is None:
        raise RuntimeError(f"workload did not start:\n{w.stderr_tail()}")
    phase("ready")
    for w in workloads:
      w.send("go")

    # When to cut.
    # after_durable: at once after the k-th durable line; mid_save: some way
    # (by the interval between the last two lines) into the save after it;
    # at_record: after a random number of further disk records (up to those
    # of one save), CrashMonkey-style, wherever the save is then.
    style = (cfg["cut"] if cfg["cut"] != "random"
             else rng.choice(["after_durable", "mid_save", "at_record"]))
    k = rng.randint(1 if style == "after_durable" else 2, 6)
    lead = workloads[0]
    idx = lead.wait_line(lambda l: l.startswith("durable "), timeout)
    for _ in range(k - 1):
      if idx is None:
        break
      idx = lead.wait_line(lambda l: l.startswith("durable "), timeout, start=idx + 1)
    if idx is None:
      raise RuntimeError(f"workload reported no durable step:\n{lead.stderr_tail()}")
    seen = lead.snapshot()
    durable_times = [t for t, l in seen[:idx + 1] if l.startswith("durable ")]
    period = (durable_times[-1] - durable_times[-2]) if len(durable_times) >= 2 else 1.0
    delay, after = 0.0, None
    if style == "mid_save":
      delay = rng.uniform(0.1, 0.9) * period
      time.sleep(delay)
    elif style == "at_record":
      so_far = disk.stats()
      per_save = max(2, (so_far["writes"] + so_far["flushes"]) // len(durable_times))
      after = rng.randint(1, per_save)
    logged, t_cut = disk.cut(after, timeout=min(timeout, 20.0))
    phase("cut")
    # A durable line counts if it reached us before the cut (so it was
    # printed before it): both clocks are CLOCK_MONOTONIC.
    claims = [(_durable_steps(w, before=t_cut) or [None])[-1] for w in workloads]
    for w in workloads:
      w.kill()
    record.update(cut=style, cut_after_durable=k, delay_s=round(delay, 3), cut_after_records=after,
                  durable=claims, logged_records=logged,
                  all_durable_lines=[_durable_steps(w) for w in workloads])
    # A fresh checker imports JAX while the disk is torn down and replayed.
    checker = _Proc([sys.executable, "-m", CHILD_MODULE, "check",
                     json.dumps(dict(mode=cfg["mode"], api=cfg["api"],
                                     placement=cfg["placement"]))],
                    _env(1), os.path.join(workdir, "checker.stderr"))
    unmount(live_dir)
    detach(dev)
    disk.stop()
    disk = None
    os.unlink(os.path.join(workdir, "live.img"))

    phase("torn_down")
    images, facts = crash_images(base, log_path, images_dir, rng, cfg["subsets"])
    record.update(facts)
    os.unlink(log_path)
    if checker.wait_line(lambda l: l == "ready", timeout) is None:
      raise RuntimeError(f"checker did not start:\n{checker.stderr_tail()}")
    phase("images_built")
    results = []
    for j, (label, path) in enumerate(images):
      where = os.path.join(images_dir, f"m{j}")
      os.makedirs(where)
      img_dev = attach(path)
      err = mount(img_dev, where)
      if err:
        detach(img_dev)
        results.append({"image": label, "verdict": "UNMOUNTABLE", "error": err[-300:]})
        continue
      checks = []
      for r, claim in zip(roots, claims):
        n = len(checker.snapshot())
        checker.send(json.dumps({"root": os.path.join(where, r), "durable": claim}))
        i = checker.wait_line(lambda l: l.startswith("RESULT "), timeout, start=n)
        if i is None:
          raise RuntimeError(f"checker gave no answer:\n{checker.stderr_tail()}")
        checks.append(json.loads(checker.snapshot()[i][1][len("RESULT "):]))
      order = {"OK": 0, "LOST": 1, "WRONG": 2}
      verdict = max((c["verdict"] for c in checks), key=order.__getitem__)
      results.append({"image": label, "verdict": verdict,
                      "latest_unrestorable": any(c.get("latest_unrestorable") for c in checks),
                      "checks": checks})
      unmount(where)
      detach(img_dev)
      os.unlink(path)
    phase("checked")
    record["images"] = results
    record["seconds"] = round(time.monotonic() - t_start, 2)
    return record
  finally:
    for w in workloads:
      w.kill()
    if checker is not None:
      checker.send("quit")
      checker.kill()
    sweep(workdir, keep=[fuse_dir])
    if disk is not None:
      disk.stop()
    sweep(workdir)


def tally(records: list[dict]) -> dict:
  """Counts over trial records: trials, images, OK, LOST, WRONG,
  UNMOUNTABLE, latest_unrestorable, errors (trials that failed to run)."""
  counts = {"trials": len(records), "images": 0, **{v: 0 for v in VERDICTS},
            "latest_unrestorable": 0, "errors": 0}
  for r in records:
    if "error" in r:
      counts["errors"] += 1
      continue
    for img in r["images"]:
      counts["images"] += 1
      counts[img["verdict"]] += 1
      counts["latest_unrestorable"] += bool(img.get("latest_unrestorable"))
  return counts


def run_trials(mode: str, api: str = "v0", placement: str = "shared", trials: int = 10,
               seed: int = 0, cut: str = "random", subsets: int = 3, devices: int = 8,
               disk_mib: int = 160, workdir: str | None = None, timeout_s: float = 120,
               stop_when=None, log=None) -> dict:
  """Runs `trials` power-loss trials of one configuration.

  Args:
    mode: none | root-fsync | durable (powerloss_child.py).
    api: v0 | v1. placement: shared | per_host.
    trials: how many.
    seed: seeds the cut moments and the subsets chosen.
    cut: random | after_durable (at once after a "durable" line) |
      mid_save (some time into the next save) | at_record (after a random
      number, up to one save's, of further logged writes and flushes).
    subsets: random subsets of the unflushed writes per trial (besides none
      and all).
    devices: CPU devices of a shared workload (per host: 1 each).
    disk_mib: size of the ext4 disk.
    workdir: where the images go (default: a new temporary directory).
    timeout_s: the longest wait for any one thing (a child starting, a
      durable line, a check).
    stop_when: optional predicate on the counts so far; True stops early.
    log: optional callable taking a line of progress.

  Returns:
    tally() of the trials plus mode, api, placement, seed, seconds and
    "trials_detail" (each trial's record).

  Raises:
    RuntimeError: missing prerequisites.
  """
  missing = missing_prerequisites()
  if missing:
    raise RuntimeError("power-loss harness cannot run: missing " + ", ".join(missing))
  rng = random.Random(f"{seed}/{mode}/{api}/{placement}")
  top = tempfile.mkdtemp(prefix="fastpersist_powerloss.", dir=workdir)
  t0 = time.monotonic()
  records = []
  cfg = dict(mode=mode, api=api, placement=placement, cut=cut, subsets=subsets,
             devices=devices, timeout_s=timeout_s)
  try:
    base = os.path.join(top, "base.img")
    make_base_image(base, disk_mib)
    for t in range(trials):
      tdir = os.path.join(top, f"trial{t}")
      os.makedirs(tdir)
      try:
        rec = run_trial(cfg, base, tdir, rng)
      except Exception as e:  # pylint: disable=broad-except
        rec = {"error": f"{type(e).__name__}: {e}"[-3000:]}
      rec["trial"] = t
      records.append(rec)
      if not mounts_below(tdir):
        shutil.rmtree(tdir, ignore_errors=True)
      if log is not None:
        log(_trial_line(rec))
      if stop_when is not None and stop_when(tally(records)):
        break
  finally:
    sweep(top)
    if not mounts_below(top):    # never delete through a mount left behind
      shutil.rmtree(top, ignore_errors=True)
  out = tally(records)
  out.update(mode=mode, api=api, placement=placement, seed=seed, cut=cut,
             seconds=round(time.monotonic() - t0, 1), trials_detail=records)
  return out


def _trial_line(rec: dict) -> str:
  if "error" in rec:
    return f"trial {rec['trial']}: ERROR {rec['error'][:2000]}"
  verdicts = " ".join(f"{i['image']}={i['verdict']}" + ("(latest unrestorable)"
                                                        if i.get("latest_unrestorable") else "")
                      for i in rec["images"])
  where = (f"+{rec['cut_after_records']} records" if rec.get("cut_after_records")
           else f"+{rec['delay_s']}s")
  return (f"trial {rec['trial']}: cut {rec['cut']} {where} after durable "
          f"{rec['durable']}, {rec['writes']} writes / {rec['flushes']} flushes logged, "
          f"{rec['tail_writes']} after the last flush; {verdicts} ({rec['seconds']} s)")


# Command line --------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
  """Adds the power-loss harness's flags to `parser`."""
  parser.add_argument("--trials", type=int, default=10,
                      help="trials per configuration (default 10)")
  parser.add_argument("--mode", default="none",
                      help="comma-separated modes among none, root-fsync, durable (default none)")
  parser.add_argument("--api", default="v0", help="comma-separated among v0, v1 (default v0)")
  parser.add_argument("--placement", default="shared",
                      help="comma-separated among shared, per_host (default shared)")
  parser.add_argument("--cut", default="random", choices=CUTS,
                      help="when to cut the power: after_durable (at once after a durable line), "
                      "mid_save (some time into the next save), at_record (after a random number "
                      "of further disk writes/flushes); default random: any of them")
  parser.add_argument("--subsets", type=int, default=3,
                      help="random subsets of the unflushed writes per trial, besides none and all "
                      "(default 3)")
  parser.add_argument("--seed", type=int, default=0,
                      help="seed of the cuts and subsets (default 0)")
  parser.add_argument("--devices", type=int, default=8,
                      help="CPU devices of a shared-placement workload (default 8)")
  parser.add_argument("--disk_mib", type=int, default=160, help="ext4 disk size (default 160)")
  parser.add_argument("--dir", default=None, help="where images go (default: the temp directory)")
  parser.add_argument("--timeout_s", type=float, default=120,
                      help="longest wait for one step of a trial (default 120)")
  parser.add_argument("--json", metavar="PATH", help="also write every trial's record to PATH")
  parser.add_argument("--quiet", action="store_true", help="no line per trial")


def _choices(value: str, allowed: tuple[str, ...], flag: str) -> list[str]:
  picked = [v.strip() for v in value.split(",") if v.strip()]
  bad = [v for v in picked if v not in allowed]
  if bad or not picked:
    raise SystemExit(f"--{flag}: {bad or value!r} not among {', '.join(allowed)}")
  return picked


def run(args) -> int:
  """Runs the trials of every configuration asked for, prints each one's
  counts and, last, one line of JSON. Returns the exit status: 0, or 1 when
  any trial failed to run.

  Raises:
    SystemExit: a flag value it refuses, or missing prerequisites.
  """
  modes = _choices(args.mode, MODES, "mode")
  apis = _choices(args.api, APIS, "api")
  placements = _choices(args.placement, PLACEMENTS, "placement")
  if args.trials < 1:
    raise SystemExit("--trials must be at least 1")
  missing = missing_prerequisites()
  if missing:
    raise SystemExit("powerloss needs: " + ", ".join(missing))
  if "durable" in modes:
    import importlib.util  # pylint: disable=g-import-not-at-top
    if importlib.util.find_spec("fastpersist_jax.durability") is None:
      raise SystemExit("--mode durable needs fastpersist_jax.durability (not in this checkout)")
  log = None if args.quiet else (lambda line: print(line, flush=True))

  def interrupted(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")
  # SIGTERM as Ctrl-C: the trial's finally blocks unmount and detach.
  signal.signal(signal.SIGTERM, interrupted)
  summaries = []
  for mode, api, placement in itertools.product(modes, apis, placements):
    if log:
      log(f"== mode {mode}, api {api}, placement {placement}: {args.trials} trials")
    s = run_trials(mode, api, placement, args.trials, args.seed, args.cut, args.subsets,
                   args.devices, args.disk_mib, args.dir, args.timeout_s, log=log)
    summaries.append(s)
  keys = ("trials", "images", "OK", "LOST", "WRONG", "UNMOUNTABLE", "latest_unrestorable",
          "errors")
  print()
  print(f"{'mode':<11} {'api':<3} {'placement':<9} " + " ".join(f"{k:>{max(5, len(k))}}"
                                                               for k in keys))
  for s in summaries:
    print(f"{s['mode']:<11} {s['api']:<3} {s['placement']:<9} "
          + " ".join(f"{s[k]:>{max(5, len(k))}}" for k in keys))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(summaries, f, indent=1)
  brief = [{k: s[k] for k in ("mode", "api", "placement", "seed", "seconds") + keys}
           for s in summaries]
  print(json.dumps(brief[0] if len(brief) == 1 else brief))
  return 1 if any(s["errors"] for s in summaries) else 0


if __name__ == "__main__":
  # Also runnable on its own: python -m fastpersist_jax.benchmark.powerloss [flags]
  _parser = argparse.ArgumentParser(prog="python -m fastpersist_jax.benchmark.powerloss",
                                    description=__doc__,
                                    formatter_class=argparse.RawDescriptionHelpFormatter)
  add_arguments(_parser)
  sys.exit(run(_parser.parse_args()) or 0)
