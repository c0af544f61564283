"""Per-host checkpoints that survive the loss of a host (issue 13): four
processes (jax.distributed on localhost, 2 CPU devices each), per-host roots,
host_redundancy 2. One launch saves, then recovers from several losses in
turn (tests/mp_redundancy.py, the scenario "redundancy" of
conftest.four_process_runs); the tests below check what each process saw."""

from __future__ import annotations

import sys

import pytest

import helpers
from fastpersist_jax import FastPersistOptions
from fastpersist_jax import exchange, redundancy

NPROC = 4
# Array bytes of the tree saved (w: 64x512 f32, b: 512 i32, emb: 256x128 bf16).
ARRAY_BYTES = 64 * 512 * 4 + 512 * 4 + 256 * 128 * 2


@pytest.fixture(scope="module")
def results(four_process_runs):
  return helpers.batch_results(four_process_runs, "redundancy")


def test_placement_rule_survives_any_k_minus_1_losses():
  for r in range(1, 7):
    for k in range(1, 4):
      written = [redundancy.parts_of_holder(r, j, k) for j in range(r)]
      # Every host writes min(k, R) parts; every part is on min(k, R) hosts.
      assert all(len(w) == min(k, r) for w in written)
      for part in range(r):
        on = [j for j in range(r) if part in written[j]]
        assert sorted(on) == sorted(redundancy.holders_of_part(r, part, k))
        assert len(on) == min(k, r)


def test_each_part_is_sent_once_by_the_least_loaded_holder():
  # Parts 0..3 of a shard held by hosts 0..3 with redundancy 2 (part i on
  # hosts i-1 and i): the choice spreads the bytes over all four hosts.
  holders = [sorted(redundancy.holders_of_part(4, i, 2)) for i in range(4)]
  assert holders == [[0, 3], [0, 1], [1, 2], [2, 3]]
  assert exchange.assign_providers(holders, [4096] * 4) == [0, 1, 2, 3]
  # Uneven sizes: the next part goes to whoever has sent the fewest bytes.
  assert exchange.assign_providers([[0, 1], [0, 1], [0, 1]], [10, 3, 4]) == [0, 1, 1]


def test_host_redundancy_is_validated():
  with pytest.raises(ValueError, match="host_redundancy"):
    FastPersistOptions(host_redundancy=0)


def test_every_byte_is_written_twice_and_each_host_writes_half(results):
  r1 = [r["written_r1"]["array_bytes"] for r in results]
  r2 = [r["written_r2"]["array_bytes"] for r in results]
  print(f"\nbytes of arrays written per host, host_redundancy=1: {r1}; =2: {r2} "
        f"(whole tree {ARRAY_BYTES}); data files per host: "
        f"{[r['written_r1']['file_bytes'] for r in results]} -> "
        f"{[r['written_r2']['file_bytes'] for r in results]}")
  print("seconds of a save (step 2, CheckpointManager), redundancy 2 / 1: "
        f"{[round(r['save_s_r2'], 3) for r in results]} / "
        f"{[round(r['save_s_r1'], 3) for r in results]}")
  # Every byte once, then exactly twice.
  assert sum(r1) == ARRAY_BYTES
  assert sum(r2) == 2 * ARRAY_BYTES
  # w and emb split in 4 equal parts: each host writes 1/4, then 2/4, of
  # them. b (2 KiB, under the 4 KiB part size) is part 0 alone: host 0
  # writes it, then hosts 0 and 3 (holder j writes parts j and j+1 mod 4).
  quarter = (64 * 512 * 4 + 256 * 128 * 2) // NPROC
  assert r1 == [quarter + 2048, quarter, quarter, quarter]
  assert r2 == [2 * quarter + 2048, 2 * quarter, 2 * quarter, 2 * quarter + 2048]
  # Replicated everywhere: no single-copy warning with redundancy 2; with 1,
  # one per save naming every byte.
  assert not any("single copy" in m for r in results for m in r["warnings_replicated"])
  for r, mine in zip(results, r1):
    single = [m for m in r["warnings_r1"] if "single copy" in m]
    assert single == [single[0]] * 2, r["warnings_r1"]     # one per save, 2 saves
    assert single[0].startswith(f"fastpersist: {ARRAY_BYTES} bytes of this per-host checkpoint "
                                f"({mine} written by this host)"), single[0]


def _cases(results, name):
  cases = [r["cases"][name] for r in results]
  print(f"\n{name}: " + "; ".join(f"process {p}: {c.get('latest')} in {c['seconds']:.2f} s"
                                   for p, c in enumerate(cases)))
  return cases


def test_nothing_lost(results):
  for c in _cases(results, "none_lost"):
    assert "error" not in c, c
    assert c["latest"] == 2 and c["restored_step"] == 2


def test_a_wiped_root_is_recovered_bit_exact(results):
  # Process 3's root is gone entirely: it restores too, from the others,
  # onto the target's shardings and (no target) onto the saved ones.
  for c in _cases(results, "a_root_wiped"):
    assert "error" not in c, c
    assert c["latest"] == 2 and c["restored_step"] == 2 and c["restored_as_saved"]


def test_b_one_host_losing_a_step_keeps_it_restorable(results):
  for c in _cases(results, "b_step2_wiped_on_one"):
    assert "error" not in c, c
    assert c["latest"] == 2 and c["restored_step"] == 2


def test_b_two_holders_of_a_part_losing_a_step_fall_back_to_the_step_before(results):
  for c in _cases(results, "b_step2_wiped_on_two"):
    assert "error" not in c, c
    assert c["latest"] == 1 and c["restored_step"] == 1


def test_c_two_holders_of_a_part_lost_fails_alike_everywhere(results):
  cases = _cases(results, "c_two_roots_wiped")
  errors = {c.get("error") for c in cases}
  assert len(errors) == 1, errors        # the same error on every process
  (error,) = errors
  assert error and error.startswith("CorruptCheckpointError: step 2"), error
  assert "no surviving copy" in error
  # Hosts 1 and 2 held both copies of part 2 of w and emb; b (part 0 only)
  # is also on hosts 0 and 3.
  assert f"['params']['w'] ({64 * 512 * 4 // NPROC} of {64 * 512 * 4} bytes)" in error, error
  assert f"['opt']['emb'] ({256 * 128 * 2 // NPROC} of {256 * 128 * 2} bytes)" in error, error
  assert "['params']['b']" not in error
  assert "Processes [0, 3] hold the step, [1, 2] lost it" in error
  for c in cases:
    assert c["latest"] is None
    assert c["seconds"] < 60


def test_e_a_leaf_sharded_across_hosts_is_named_when_its_host_is_lost(results):
  for r in results:
    (warning,) = [m for m in r["warnings_sharded"] if "single copy" in m]
    # opt/sharded: 256x64 f32, one copy of each quarter on its own host.
    assert warning.startswith(f"fastpersist: {256 * 64 * 4} bytes of this per-host checkpoint "
                              f"({256 * 64 * 4 // NPROC} written by this host)"), warning
    assert "['opt']['sharded']" in warning
  cases = _cases(results, "e_sharded_root_wiped")
  errors = {c.get("error") for c in cases}
  assert len(errors) == 1, errors
  (error,) = errors
  assert error and error.startswith("CorruptCheckpointError: step 1"), error
  assert f"['opt']['sharded'] ({256 * 64 * 4 // NPROC} of {256 * 64 * 4} bytes)" in error, error
  assert "['params']['w']" not in error   # replicated leaves survived
  for c in cases:
    assert c["latest"] is None


def test_a_damaged_part_fails_every_process_alike(results):
  cases = _cases(results, "crc_damaged")
  errors = {c.get("error") for c in cases}
  assert len(errors) == 1, errors
  (error,) = errors
  # latest_restorable_step checks what each host committed (manifests, file
  # sizes), not the bytes: the restore's CRC-32C checks find the damage.
  assert all(c["latest"] == 2 for c in cases)
  assert error and error.startswith("ChecksumMismatchError: restoring step 2: process 0"), error


def test_a_process_that_never_joins_makes_the_others_raise_within_the_timeout(results):
  for r in results[:-1]:
    assert r["absent_peer"] and r["absent_peer"].startswith("PeerTimeoutError"), r["absent_peer"]
    assert r["absent_peer_seconds"] < 30


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
