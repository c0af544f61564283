"""io_uring refused by a seccomp filter (as in default Docker profiles and on
hardened kernels): engine 'auto' falls back to the thread-pool engine with a
warning and round-trips bit-exact; engine 'io_uring' raises and says why.

The filter is installed by tests/seccomp_helper.c, built here with the
system's C compiler. The child it runs is this very file with a role
(`python tests/test_io_uring_refused.py no_io_uring DIR`).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import (FastPersistHandler, FastPersistOptions, FastPersistRestore,
                             FastPersistSave)
from helpers import MiB, abstract, assert_tree_bytes_equal, child_env

HERE = os.path.abspath(__file__)

# Small staging so that a handler costs little memory; slabs of 1 MiB so that
# a few-MiB checkpoint is staged and written as several windows.
SMALL = dict(host_memory_limit=16 * MiB, staging_slab_bytes=1 * MiB)


# Installs a seccomp filter that refuses io_uring_setup(2), then execs the rest
# of its command line (see the file).
SECCOMP_HELPER_C = os.path.join(os.path.dirname(HERE), "seccomp_helper.c")


@pytest.fixture(scope="module")
def seccomp_helper(tmp_path_factory):
  gcc = shutil.which("gcc") or shutil.which("cc")
  if gcc is None:
    pytest.skip("no C compiler to build the seccomp helper")
  d = tmp_path_factory.mktemp("seccomp")
  exe = d / "no_io_uring"
  r = subprocess.run([gcc, "-O1", "-o", exe, SECCOMP_HELPER_C], capture_output=True, text=True)
  if r.returncode != 0:
    pytest.skip(f"cannot build the seccomp helper (linux headers missing?): {r.stderr[-500:]}")
  return os.fspath(exe)


def _child_no_io_uring(directory: str) -> None:
  """Under the seccomp filter: what engine 'auto' and 'io_uring' do."""
  from fastpersist_jax import _ext  # pylint: disable=g-import-not-at-top
  warnings: list[str] = []

  class Collect(logging.Handler):
    def emit(self, record):
      if record.levelno >= logging.WARNING:
        warnings.append(record.getMessage())

  logging.getLogger("fastpersist_jax").addHandler(Collect())
  result: dict = {}
  try:
    _ext.Engine("io_uring")
    result["raw_ring"] = "created"
  except Exception as e:  # pylint: disable=broad-except
    result["raw_ring"] = f"{type(e).__name__}: {e}"
  h = FastPersistHandler(FastPersistOptions(**SMALL))
  result["engine_kind"] = h.engine_kind
  mesh = jax.make_mesh((jax.device_count(),), ("data",))
  rng = np.random.default_rng(5)
  tree = {"w": jax.device_put(rng.standard_normal((64, 300), np.float32),
                              NamedSharding(mesh, P("data"))),
          "b": jax.device_put(jnp.asarray(rng.standard_normal(1000), jnp.bfloat16), mesh.devices.flat[1]),
          "host": rng.integers(0, 2**31, 5000, np.int64), "step": 3}
  ckptr = ocp.Checkpointer(h)
  ckptr.save(os.path.join(directory, "c"), args=FastPersistSave(tree))
  out = ckptr.restore(os.path.join(directory, "c"), args=FastPersistRestore(abstract(tree)))
  try:
    assert_tree_bytes_equal(tree, out)
    result["round_trip"] = "bit-exact"
  except AssertionError as e:
    result["round_trip"] = f"differs: {e}"
  result["warnings"] = list(warnings)
  try:
    FastPersistHandler(FastPersistOptions(engine="io_uring"))
    result["explicit"] = "no error"
  except Exception as e:  # pylint: disable=broad-except
    result["explicit"] = f"{type(e).__name__}: {e}"
  h.close()
  print("RESULT " + json.dumps(result), flush=True)


@pytest.mark.parametrize("refusal", ["EPERM", "ENOSYS"])
def test_io_uring_refused_by_seccomp_falls_back(seccomp_helper, tmp_path, refusal):
  err = getattr(errno, refusal)
  r = subprocess.run([seccomp_helper, str(err), sys.executable, HERE, "no_io_uring", tmp_path],
                     env=child_env(4, FASTPERSIST_ENGINE=None), capture_output=True, text=True,
                     timeout=180)
  if r.returncode == 77 and "SECCOMP-UNAVAILABLE" in r.stderr:
    pytest.skip(r.stderr.strip().splitlines()[-1])
  lines = [l for l in r.stdout.splitlines() if l.startswith("RESULT ")]
  assert r.returncode == 0 and lines, f"child failed ({r.returncode}):\n{r.stderr[-4000:]}"
  result = json.loads(lines[-1][len("RESULT "):])
  assert result["raw_ring"].startswith("RingUnavailable"), result
  assert os.strerror(err) in result["raw_ring"], result
  assert result["engine_kind"] == "threads", result
  assert any("io_uring is unavailable" in w and "thread-pool" in w for w in result["warnings"]), result
  assert result["round_trip"] == "bit-exact", result
  # Asked for explicitly, io_uring is an error that says why.
  assert result["explicit"].startswith("IOUringUnavailableError"), result
  assert "io_uring" in result["explicit"] and os.strerror(err) in result["explicit"], result


if __name__ == "__main__":
  if sys.argv[1:2] == ["no_io_uring"]:   # the child process of the test above
    _child_no_io_uring(*sys.argv[2:])
  else:  # run as a test binary (Bazel's py_test runs this file): the tests themselves
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
