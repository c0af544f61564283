"""Several JAX processes on this machine (jax.distributed on localhost, CPU
devices, gloo): shared and per-host directories, replica-parallel writes,
failures, and restore on another process count. Each process runs
tests/mp_worker.py."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import helpers

WORKER = helpers.MP_WORKER
run_processes = helpers.run_processes

MiB = 1 << 20

# The scenarios that succeed run in one launch shared with other test files
# (conftest.two_process_runs); those that fail on purpose each get their own.


def test_two_processes_shared_directory_with_replica_parallel_writes(two_process_runs):
  results = helpers.batch_results(two_process_runs[1], "shared")
  written = [r["bytes_written"] for r in results]
  # Params replicated over "data" are split between the two processes: each
  # writes about half of the checkpoint instead of one process writing them all.
  assert min(written) > 0.4 * sum(written), written


def test_without_replica_split_one_process_writes_the_replicated_params(two_process_runs):
  split = [r["bytes_written"] for r in helpers.batch_results(two_process_runs[1], "shared")]
  whole = [r["bytes_written"] for r in helpers.batch_results(two_process_runs[1], "shared_whole")]
  assert max(split) < max(whole), (split, whole)


def test_one_process_restores_a_two_process_checkpoint(two_process_checkpoint):
  (result,) = run_processes("restore_single", 1, two_process_checkpoint, local_devices=4)
  assert result["devices"] == 4


def test_resharding_restore_reads_only_the_chunks_its_rows_are_in(two_process_runs):
  # 4 MiB saved as 2 row blocks of 2 MiB; each process's new row blocks are
  # the first half of each saved block: 1 MiB of each, 2 of the 4 MiB.
  results = helpers.batch_results(two_process_runs[1], "reshard_chunked")   # 256 KiB chunks
  assert [r["stats"]["bytes"] for r in results] == [2 * MiB, 2 * MiB], results
  assert all(r["stats"]["resharded"] == 1.0 for r in results)
  # Process 0 reads the damaged chunk (bytes [256 KiB, 512 KiB) of process
  # 1's block); process 1 never reads it.
  # Process 1's own restore succeeded, but Orbax's restore ends in a barrier
  # process 0 never reaches: process 1 learns of the failure and raises too.
  damaged, clean = (r["after_corruption"] for r in results)
  assert damaged.startswith("ChecksumMismatchError") and "bytes [262144, 524288)" in damaged, damaged
  assert "data.00001.0000.bin" in damaged, damaged
  assert clean.startswith("RestoreError: process 0 failed its part of the restore "
                          "(error: leaf ['x']"), clean
  # Without chunk checksums, whole saved shards are read: all 4 MiB.
  results = helpers.batch_results(two_process_runs[1], "reshard_whole")
  assert [r["stats"]["bytes"] for r in results] == [4 * MiB, 4 * MiB], results


def test_per_host_directories_with_replica_parallel_parts(two_process_runs):
  # Each host writes only its part of the replicated params (host_redundancy
  # 1: with 2 hosts, the default 2 writes everything on both, see
  # test_host_redundancy.py); restoring on the same topology, the hosts swap
  # their parts with collectives.
  root, runs = two_process_runs
  results = helpers.batch_results(runs, "per_host")
  for i, r in enumerate(results):
    assert f"manifest.{i:05d}.json" in r["files"] and "fastpersist.json" in r["files"]
  whole = helpers.batch_results(runs, "per_host_whole")
  split_bytes = [r["bytes_written"] for r in results]
  whole_bytes = [r["bytes_written"] for r in whole]
  # Without the split every host holds all the replicated params.
  assert sum(split_bytes) < 0.8 * sum(whole_bytes), (split_bytes, whole_bytes)
  # One host's directory alone cannot restore onto a single process: the error
  # says which processes' data is there and what to do.
  from fastpersist_jax import CorruptCheckpointError, FastPersistHandler  # pylint: disable=g-import-not-at-top
  with pytest.raises(CorruptCheckpointError, match=r"per-host.*processes \[0\] of 2"):
    FastPersistHandler().restore(root / "per_host" / "host0" / "0" / "default")


def test_per_host_restores_of_different_steps_all_refuse(tmp_path):
  # Host 0 restores step 0, host 1 step 1: their agreements are keyed by the
  # step, so neither is taken for the other's (no parts of different saves
  # are combined); each raises once the restore's commit_timeout_s (1 s
  # here: neither restore can ever pair) has passed.
  results = run_processes("per_host_mismatch", 2, tmp_path, MP_RESTORE_TIMEOUT=1)
  for pid, r in enumerate(results):
    assert r["error"] and r["error"].startswith("RestoreError"), r
    assert f"of {pid}/default" in r["error"], r


def test_a_failing_process_fails_every_process_and_commits_nothing(tmp_path):
  results = run_processes("fail", 2, tmp_path, MP_TIMEOUT=30)
  for r in results:
    assert r["error"] and "injected write failure" in r["error"], r
    assert r["latest_step"] is None
    assert r["seconds"] < 60


def test_a_killed_process_makes_the_others_raise_within_the_timeout(tmp_path):
  port = helpers.free_port()
  # Where the peer dies while this process waits in one of Orbax's barriers
  # (about one run in three), it waits out their timeout: 10 s here, still
  # far more than the two processes' skew before the kill.
  env = helpers.child_env(2, MP_LOCAL_DEVICES="2", MP_KILL="1", MP_TIMEOUT="4",
                          MP_ORBAX_TIMEOUT="10")
  procs = [subprocess.Popen([sys.executable, WORKER, "fail", str(i), "2", str(port), str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for i in range(2)]
  try:
    out, _ = procs[0].communicate(timeout=90)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
      p.wait()
  assert procs[1].returncode == 9   # died mid-save
  line = [l for l in out.splitlines() if l.startswith("RESULT ")]
  assert line, out[-4000:]
  result = json.loads(line[-1][len("RESULT "):])
  # Our outcome check names the missing process; if the peer died while
  # Orbax was in a collective or barrier, JAX's runtime or Orbax's barrier
  # timeout reports it first. Either way this process raised, promptly.
  assert result["error"], result
  assert result["seconds"] < 45
  assert not (tmp_path / "0").exists()   # nothing committed, only Orbax's temporary directory


@pytest.mark.slow
def test_four_processes_shared_directory(four_process_runs):   # (conftest.FOUR_PROCESS_BATCH)
  results = helpers.batch_results(four_process_runs, "shared")
  written = [r["bytes_written"] for r in results]
  assert min(written) > 0.15 * sum(written), written


@pytest.mark.slow
def test_four_processes_per_host(four_process_runs):
  helpers.batch_results(four_process_runs, "per_host")   # saved and restored bit-exact



def test_the_coordination_service_keeps_no_key_per_save(two_process_runs):
  # The key-value store lives in process 0's coordination service for the
  # whole job: a run saving every step must not leave keys behind per step.
  _, runs = two_process_runs
  for r in helpers.batch_results(runs, "kv_keys"):
    shared_after_1, shared_after_5, per_host_after_1, per_host_after_5 = r["counts"]
    assert shared_after_5 == shared_after_1, r
    assert per_host_after_5 == per_host_after_1, r
    assert shared_after_1 == 0 and per_host_after_1 == 0, r   # all read, all deleted


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
