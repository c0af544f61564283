"""Restore-path bugs found by attacking it as a hostile but realistic user
would (chunk checksums, multi-process outcome agreement, metadata
validation), each kept as a test of the behaviour the docs promise.

The multi-process tests run this very file as their worker
(`python tests/test_break_restore.py --worker SCENARIO PID NPROC PORT DIR`):
two JAX processes on localhost (CPU devices, gloo), as
tests/test_multiprocess.py does with tests/mp_worker.py.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import helpers  # pylint: disable=g-bad-import-order  (sets XLA_FLAGS before jax is imported)
import jax
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import (FastPersistError, FastPersistHandler, FastPersistOptions,
                             FastPersistRestore, FastPersistSave, disk_format)

THIS = os.path.abspath(__file__)


# Helpers ----------------------------------------------------------------------



def _cli(*args: str) -> subprocess.CompletedProcess:
  """Runs `python -m fastpersist_jax ARGS...`; its exit status and output."""
  return subprocess.run([sys.executable, "-m", "fastpersist_jax", *args], capture_output=True,
                        text=True, env=helpers.child_env(8), timeout=120, check=False)


def _run_two(scenario: str, root) -> list[dict | None]:
  """Runs `scenario` of this file's worker on 2 processes (helpers.run_scenario)."""
  return helpers.run_scenario(THIS, scenario, root, timeout=120)


# Scenarios that succeed, run in turn in one launch (active_subset last: only
# process 0 takes part in its restore).
_BATCH = ("per_host_step_only", "handler_ids", "active_subset")


@pytest.fixture(scope="module")
def batch(tmp_path_factory) -> list[dict | None]:
  """Each process's results of the _BATCH scenarios, by scenario."""
  return _run_two(",".join(_BATCH), tmp_path_factory.mktemp("batch"))


def _of(batch, scenario: str) -> list[dict | None]:
  """Each process's result of `scenario` in `batch` (None: it reported none)."""
  return [None if r is None else r.get(scenario) for r in batch]


# Multi-process: restore outcome agreement -------------------------------------

def test_per_host_failure_before_the_part_swap_fails_the_others_with_restore_error(tmp_path):
  p0, p1 = _run_two("per_host_swap", tmp_path)
  assert p0["warm"] == "ok", p0
  if p1 is not None:
    assert p1["error"].startswith("RestoreMismatchError"), p1
  # Process 0's restore must end, within about commit_timeout_s (3 s), in a
  # RestoreError naming process 1, while process 1 is still alive (it waits
  # up to 7 s for process 0 to finish).
  assert p0["error"].startswith("RestoreError") and "process 1" in p0["error"], p0
  assert p0["seconds"] < 6, p0


def test_per_host_restore_of_no_arrays_on_one_process_still_sends_its_parts(batch):
  p0, p1 = _of(batch, "per_host_step_only")
  assert p0["warm"] == "ok" and p0["restore"] == "ok" and p0["step"] == 3, p0
  assert p1 is not None and p1["restore"] == "ok" and p1["step"] == 3, p1


def test_a_handler_made_on_one_process_only_does_not_break_multiprocess_restores(batch):
  results = _of(batch, "handler_ids")
  for r in results:
    assert r is not None and r["restore"] == "ok", results


def test_a_restore_that_fails_in_orbax_on_one_process_costs_a_bounded_wait_never_a_hang(tmp_path):
  # Process 1's first restore fails inside Orbax, before the handler (a step
  # it lacks); process 0 restores step 0. The processes' calls are then
  # paired one apart: process 1's next restore of step 0 is, to anything
  # either process can observe, the same restore as process 0's pending one
  # (Orbax's own end-of-restore barrier pairs them the same way). What must
  # hold: every restore returns correct values or raises, and the one left
  # without a partner raises RestoreError after commit_timeout_s instead of
  # waiting forever.
  p0, p1 = _run_two("restore_counts", tmp_path)
  assert p1 is not None and p1["rounds"][0].startswith("FileNotFoundError"), p1
  assert p1["rounds"][1:] == ["ok", "ok"], p1
  assert p0["rounds"][:2] == ["ok", "ok"], p0
  assert p0["rounds"][2].startswith("RestoreError") and "did not take part" in p0["rounds"][2], p0


def test_a_process_that_gave_up_waiting_is_not_counted_as_having_restored(tmp_path):
  p0, p1 = _run_two("late_process", tmp_path)
  assert p0["restore"].startswith("RestoreError"), p0   # gave up after 1 s
  # Process 1 (starting only once process 0 has given up) must learn that
  # process 0 gave up and raise too.
  assert p1 is not None and p1["restore"].startswith("RestoreError"), p1
  assert p1["seconds"] < 5, p1


def test_a_restore_on_the_active_processes_only_does_not_wait_for_the_others(batch):
  p0, _ = _of(batch, "active_subset")
  assert p0["restore"] == "ok", p0


# Metadata validation ----------------------------------------------------------

def _numpy_leaf_with_sharding(tmp_path, sharding: dict) -> str:
  item = str(tmp_path / "item")
  FastPersistHandler().save(item, args=FastPersistSave({"x": np.arange(16, dtype=np.float32)}))
  helpers.reseal_metadata(item, lambda doc: helpers.leaf_fields(doc, 0).update(sharding=sharding))
  return item


@pytest.mark.parametrize("sharding", [
    {"type": "named", "mesh_shape": [8], "axis_names": ["a"], "spec": [None],
     "device_ids": [[0]]},
    {"type": "named", "mesh_shape": [8], "axis_names": ["a"], "spec": [None], "device_ids": 5},
    {"type": "named", "mesh_shape": [-1, -8], "axis_names": ["a", "b"], "spec": [None]},
], ids=["nested_device_ids", "int_device_ids", "negative_mesh_shape"])
def test_a_numpy_leafs_hostile_sharding_never_crashes_restore(tmp_path, sharding):
  item = _numpy_leaf_with_sharding(tmp_path, sharding)
  n = len(sharding["mesh_shape"])
  mesh = jax.sharding.AbstractMesh((8,) if n == 1 else (2, 4), ("a",) if n == 1 else ("a", "b"))
  target = {"x": jax.ShapeDtypeStruct((16,), np.float32, sharding=NamedSharding(mesh, P()))}
  try:
    restored = FastPersistHandler().restore(item, args=FastPersistRestore(target))
  except FastPersistError:
    return   # refused, naming the leaf: fine
  np.testing.assert_array_equal(np.asarray(restored["x"]), np.arange(16, dtype=np.float32))


def test_inspect_never_dies_with_a_traceback_on_a_numpy_leafs_sharding(tmp_path):
  item = _numpy_leaf_with_sharding(
      tmp_path, {"type": "named", "mesh_shape": [8], "axis_names": ["a"], "spec": 5})
  r = _cli("inspect", item)
  assert "Traceback" not in r.stderr and r.returncode in (0, 1), (r.returncode, r.stderr[-2000:])


# Chunk checksums ---------------------------------------------------------------

def test_verify_reports_chunk_checksums_that_do_not_match_the_data(tmp_path):
  item = str(tmp_path / "item")
  handler = FastPersistHandler(FastPersistOptions(crc_chunk_bytes=4096))
  handler.save(item, args=FastPersistSave({"x": jax.numpy.arange(4096, dtype=jax.numpy.float32)}))

  def damage(m):
    (rec,) = m["shards"]
    assert len(rec["chunk_crc32c"]) == 4   # 16 KiB in chunks of 4 KiB
    rec["chunk_crc32c"][2] ^= 1
  helpers.reseal_manifest(os.path.join(item, disk_format.manifest_name(0)), damage)
  r = _cli("verify", item)
  assert r.returncode == 1 and "OK" not in r.stdout.splitlines()[-1], (r.returncode, r.stdout)


def test_a_partial_read_never_returns_bytes_its_record_crc_refuses(tmp_path):
  p0, _ = _run_two("forged_chunk", tmp_path)
  assert p0["clean"] == "ok" and p0["bytes"] < p0["total"], p0   # a partial read
  # Process 0 reads the chunk whose byte and chunk CRC were changed.
  assert p0["restore"] != "ok" and "wrong values" not in p0["restore"], p0


# The multi-process worker ---------------------------------------------------------

def _worker(scenario: str, pid: int, nproc: int, port: int, root: str) -> None:
  """One process of a multi-process test above; prints "RESULT <json>"."""
  client = helpers.init_distributed(pid, nproc, port)
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices())
  host = (np.arange(64 * 512, dtype=np.float32).reshape(64, 512) % 251) + 1

  saved, target, same = helpers.worker_arrays(mesh, host)

  def finish(result: dict) -> None:
    helpers.report_and_exit(client, result, pid, nproc, "break")

  def outcome(fn) -> str:
    try:
      return "ok" if same(fn()) else "wrong values"
    except Exception as e:  # pylint: disable=broad-except
      return f"{type(e).__name__}: {str(e)[:300]}"

  def per_host_manager(root: str):
    # Params replicated over "data" (across the processes): each host's
    # directory holds its parts, swapped on restore.
    mp = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={pid})
    host_dir = os.path.join(root, f"host{pid}")
    os.makedirs(host_dir, exist_ok=True)
    handler = FastPersistHandler(FastPersistOptions(commit_timeout_s=3),
                                 multiprocessing_options=mp)
    return ocp.CheckpointManager(host_dir, item_handlers=handler, options=ocp.CheckpointManagerOptions(
        multiprocessing_options=mp, create=False,
        async_options=ocp.AsyncOptions(create_directories_asynchronously=False)))

  def run_one(scenario: str, root: str) -> dict:
    """Runs `scenario` in the directory `root`; returns what it reports."""
    result: dict = {}
    if scenario == "per_host_swap":
      w = saved(P(None, "model"))
      with per_host_manager(root) as mngr:
        mngr.save(0, args=FastPersistSave({"w": w}))
        mngr.wait_until_finished()
        result["warm"] = outcome(lambda: mngr.restore(0, args=FastPersistRestore(target(w))))
        t = target(w)
        if pid == 1:   # a target leaf this checkpoint lacks: refused before the swap
          t["extra"] = jax.ShapeDtypeStruct((4,), np.float32)
        t0 = time.monotonic()
        result["error"] = outcome(lambda: mngr.restore(0, args=FastPersistRestore(t)))
        result["seconds"] = time.monotonic() - t0
        helpers.stay_until_process_0_is_done(client, pid, "break/done", 7_000)
        finish(result)
    elif scenario == "per_host_step_only":
      w = saved(P(None, "model"))
      with per_host_manager(root) as mngr:
        mngr.save(0, args=FastPersistSave({"w": w, "step": 3}))
        mngr.wait_until_finished()
        # (A first restore of everything starts gloo: a wait in the next one
        # lasts until a peer leaves, not gloo's 30 s start-up deadline.)
        result["warm"] = outcome(lambda: mngr.restore(0, args=FastPersistRestore(target(w))))
        # Process 1 only wants the step; process 0 needs process 1's parts of w.
        t = {"step": 0} if pid == 1 else {**target(w), "step": 0}
        try:
          restored = mngr.restore(0, args=FastPersistRestore(t))
          result["step"] = restored["step"]
          result["restore"] = "ok" if pid == 1 or same(restored) else "wrong values"
        except Exception as e:  # pylint: disable=broad-except
          result["restore"] = f"{type(e).__name__}: {str(e)[:300]}"
    elif scenario == "handler_ids":
      w = saved(P("data"))
      with ocp.CheckpointManager(root, item_handlers=FastPersistHandler()) as mngr:
        mngr.save(0, args=FastPersistSave({"w": w}))
        mngr.wait_until_finished()
      if pid == 0:
        FastPersistHandler().metadata(os.path.join(root, "0", "default"))   # the chief peeks
      handler = FastPersistHandler(FastPersistOptions(commit_timeout_s=3))
      mngr = ocp.CheckpointManager(root, item_handlers=handler)
      result["restore"] = outcome(lambda: mngr.restore(0, args=FastPersistRestore(target(w))))
    elif scenario == "restore_counts":
      w = saved(P("data"))
      handler = FastPersistHandler(FastPersistOptions(commit_timeout_s=3))
      mngr = ocp.CheckpointManager(root, item_handlers=handler)
      mngr.save(0, args=FastPersistSave({"w": w}))
      mngr.wait_until_finished()
      rounds = []
      # Round 0: process 1 asks for a step it does not have (Orbax raises
      # before the handler); then both restore step 0, twice.
      for steps in ((0, 7), (0, 0), (0, 0)):
        rounds.append(outcome(lambda s=steps[pid]: mngr.restore(s, args=FastPersistRestore(target(w)))))
      result["rounds"] = rounds
    elif scenario == "forged_chunk":
      # 2 saved row blocks of 32 KiB (chunks of 4 KiB), one per process;
      # restored as 4 row blocks over devices [0, 2, 1, 3]: process 0 reads
      # the first half of process 1's block only.
      x = jax.make_array_from_callback(host.shape, NamedSharding(mesh, P("data")),
                                       lambda i: host[i])
      options = FastPersistOptions(crc_chunk_bytes=4096, commit_timeout_s=10)
      mngr = ocp.CheckpointManager(root, item_handlers=FastPersistHandler(options))
      mngr.save(0, args=FastPersistSave({"w": x}))
      mngr.wait_until_finished()
      order = [jax.devices()[i] for i in (0, 2, 1, 3)]
      rows = NamedSharding(jax.make_mesh((4,), ("data",), devices=order), P("data"))
      t = {"w": jax.ShapeDtypeStruct(host.shape, host.dtype, sharding=rows)}
      handler = FastPersistHandler(options)
      mngr = ocp.CheckpointManager(root, item_handlers=handler)
      result["clean"] = outcome(lambda: mngr.restore(0, args=FastPersistRestore(t)))
      result["bytes"], result["total"] = handler.last_restore_stats["bytes"], host.nbytes
      client.wait_at_barrier("break/restored", 30_000)
      if pid == 0:   # flip a byte of process 1's block and re-seal a chunk CRC that matches it
        item = os.path.join(root, "0", "default")
        with open(os.path.join(item, disk_format.manifest_name(1))) as f:
          (rec,) = json.load(f)["shards"]
        with open(os.path.join(item, disk_format.data_file_name(1, 0)), "r+b") as f:
          f.seek(rec["offset"])
          chunk = bytearray(f.read(4096))
          chunk[100] ^= 0x40
          f.seek(rec["offset"])
          f.write(chunk)
        import crc32c  # pylint: disable=g-import-not-at-top
        helpers.reseal_manifest(os.path.join(item, disk_format.manifest_name(1)),
                         lambda m: m["shards"][0]["chunk_crc32c"].__setitem__(0, crc32c.crc32c(chunk)))
      client.wait_at_barrier("break/forged", 30_000)
      result["restore"] = outcome(lambda: mngr.restore(0, args=FastPersistRestore(t)))
    elif scenario == "late_process":
      w = saved(P("data"))
      with ocp.CheckpointManager(root, item_handlers=FastPersistHandler(
          FastPersistOptions(commit_timeout_s=3))) as mngr:
        mngr.save(0, args=FastPersistSave({"w": w}))
        mngr.wait_until_finished()
      client.wait_at_barrier("break/saved", 30_000)
      # Process 0's restore must time out (process 1 starts only after it has
      # given up, by the sequence below, not by a race): a short wait will do.
      mngr = ocp.CheckpointManager(root, item_handlers=FastPersistHandler(
          FastPersistOptions(commit_timeout_s=1)))
      if pid == 1:   # busy elsewhere until process 0 has given up (after commit_timeout_s)
        client.blocking_key_value_get("break/gave_up", 60_000)
      t0 = time.monotonic()
      result["restore"] = outcome(lambda: mngr.restore(0, args=FastPersistRestore(target(w))))
      result["seconds"] = time.monotonic() - t0
      if pid == 0:
        client.key_value_set("break/gave_up", "1")
    elif scenario == "active_subset":
      w = saved(P("data"))
      with ocp.CheckpointManager(root, item_handlers=FastPersistHandler()) as mngr:
        mngr.save(0, args=FastPersistSave({"w": w}))
        mngr.wait_until_finished()
      if pid == 0:   # process 0 alone reads the checkpoint into numpy
        mp = ocp.options.MultiprocessingOptions(primary_host=0, active_processes={0})
        handler = FastPersistHandler(FastPersistOptions(commit_timeout_s=3),
                                     multiprocessing_options=mp)
        mngr = ocp.CheckpointManager(root, item_handlers=handler, options=ocp.CheckpointManagerOptions(
            multiprocessing_options=mp, read_only=True))
        try:
          out = mngr.restore(0, args=FastPersistRestore({"w": np.zeros(host.shape, host.dtype)}))
          result["restore"] = ("ok" if isinstance(out["w"], np.ndarray) and
                               np.array_equal(out["w"], host) else "wrong values")
        except Exception as e:  # pylint: disable=broad-except
          result["restore"] = f"{type(e).__name__}: {str(e)[:300]}"
        client.key_value_set("break/done", "1")
      else:
        client.blocking_key_value_get("break/done", 60_000)
    else:
      raise SystemExit(f"unknown scenario {scenario}")
    return result

  names = scenario.split(",")
  if len(names) == 1:
    finish(run_one(scenario, root))
  # A batch of scenarios that succeed: each in root/NAME, in turn, in the
  # same processes (one launch, several checks); results by name.
  batch = {}
  for name in names:
    client.wait_at_barrier(f"break/batch/{name}", 60_000)
    batch[name] = run_one(name, os.path.join(root, name))
  finish(batch)


if __name__ == "__main__":
  if sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
  else:   # Bazel py_test runs the file itself
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
