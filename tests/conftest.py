"""Shared fixtures. Engine-related ones: the engine kind, an IOEngine of that
kind, and directories on a disk filesystem and on tmpfs."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile

import pytest

# Eight CPU devices for sharded arrays: importing helpers sets XLA_FLAGS
# before jax is imported.
import helpers

ENGINE_KINDS = ("io_uring", "threads")


@pytest.fixture(scope="module")
def mesh():
  """A 4 x 2 ("data", "model") mesh of the eight CPU devices; test files
  that need another mesh define their own `mesh` fixture."""
  return helpers.mesh_4x2()


def fs_type(path: str | os.PathLike) -> str:
  """Filesystem type of the mount holding `path` (from /proc/self/mounts)."""
  path = os.path.realpath(path)
  best, kind = "", "unknown"
  try:
    with open("/proc/self/mounts") as f:
      for line in f:
        fields = line.split()
        mnt = fields[1].replace("\\040", " ")
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
          best, kind = mnt, fields[2]
  except OSError:
    pass
  return kind


# The two-process scenarios of tests/mp_worker.py that succeed, run in one
# launch (helpers.run_batch) for every test that checks them: label,
# scenario, settings. The last one ends in a deliberately failed restore.
TWO_PROCESS_BATCH = [
    ("shared", "shared", {}),                                  # replica-parallel writes
    ("shared_whole", "shared", {"MP_SPLIT": 0}),               # ... without the split
    ("per_host", "per_host", {"MP_REDUNDANCY": 1}),            # per-host parts, swapped
    ("per_host_whole", "per_host", {"MP_SPLIT": 0}),
    ("v1", "v1", {}),                                          # through Orbax's v1 API
    ("reshard_whole", "reshard_rows", {"MP_CRC_CHUNK": 0, "MP_CORRUPT": 0}),
    ("reshard_chunked", "reshard_rows", {"MP_CRC_CHUNK": 256 * 1024}),
    ("kv_keys", "kv_keys", {}),                                # keys deleted once read
    ("swap_threshold", "swap_threshold", {}),   # test_break_v3_pipeline: parts around 64 KiB
]


@pytest.fixture(scope="session")
def two_process_runs(tmp_path_factory):
  """(root, runs): TWO_PROCESS_BATCH run once on 2 processes of 2 CPU
  devices each, scenario `label` in root/label; read a scenario's results
  with helpers.batch_results(runs, label). Tests that change a checkpoint
  made there change a copy."""
  root = tmp_path_factory.mktemp("two_process")
  return root, helpers.run_batch(TWO_PROCESS_BATCH, 2, root)


# The four-process scenarios, in one launch: test_multiprocess's shared and
# per-host ones, then test_host_redundancy's host-loss scenario (last: it
# ends with a process that never joins).
FOUR_PROCESS_BATCH = [
    ("shared", "shared", {}),
    ("per_host", "per_host", {}),
    ("redundancy", "redundancy", {}),
]


@pytest.fixture(scope="session")
def four_process_runs(tmp_path_factory):
  """FOUR_PROCESS_BATCH run once on 4 processes of 2 CPU devices each
  (helpers.run_batch's answer); read a scenario's results with
  helpers.batch_results(runs, label)."""
  return helpers.run_batch(FOUR_PROCESS_BATCH, 4, tmp_path_factory.mktemp("four_process"))


@pytest.fixture
def two_process_checkpoint(two_process_runs, tmp_path):
  """A copy, in tmp_path/"mp", of the root of the "shared" scenario of
  two_process_runs (tests/mp_worker.py's global_state saved as step 0 by 2
  processes with replica-parallel parts)."""
  root, runs = two_process_runs
  helpers.batch_results(runs, "shared")
  copy = tmp_path / "mp"
  shutil.copytree(root / "shared", copy)
  return copy


@pytest.fixture(params=ENGINE_KINDS)
def engine_kind(request) -> str:
  return request.param


@pytest.fixture
def io_engine(engine_kind):
  from fastpersist_jax.io_engine import IOEngine
  from fastpersist_jax.options import FastPersistOptions
  eng = IOEngine(FastPersistOptions(engine=engine_kind))
  assert eng.kind == engine_kind
  return eng


@pytest.fixture
def disk_dir(tmp_path):
  """A directory on a disk filesystem (O_DIRECT hits the device)."""
  if fs_type(tmp_path) not in ("tmpfs", "ramfs", "overlay"):
    yield tmp_path
    return
  root = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_tmp")
  os.makedirs(root, exist_ok=True)
  d = tempfile.mkdtemp(dir=root)
  try:
    yield d
  finally:
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def shm_dir():
  """A directory on tmpfs (/dev/shm)."""
  if not os.path.isdir("/dev/shm"):
    pytest.skip("no /dev/shm")
  d = tempfile.mkdtemp(dir="/dev/shm", prefix="fastpersist-test-")
  try:
    yield d
  finally:
    shutil.rmtree(d, ignore_errors=True)


@pytest.fixture(params=("disk", "shm"))
def data_dir(request):
  """Each test using this runs once on disk and once on tmpfs."""
  return os.fspath(request.getfixturevalue(f"{request.param}_dir"))


@contextlib.contextmanager
def mounted_tmpfs(options: str):
  """A private tmpfs mounted with `options` (e.g. "size=2m"); skips the
  calling test where that is impossible (not root, no mount(8))."""
  if os.geteuid() != 0:
    pytest.skip("mounting a tmpfs needs root")
  if shutil.which("mount") is None:
    pytest.skip("no mount(8)")
  d = tempfile.mkdtemp(prefix="fastpersist-mnt-")
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", d],
                     capture_output=True, text=True, check=False)
  if r.returncode != 0:
    os.rmdir(d)
    pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
  try:
    yield d
  finally:
    subprocess.run(["umount", d], check=False)
    os.rmdir(d)
