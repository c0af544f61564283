"""Unit tests of restore's pure geometry: ordering a shard's replica-parallel
parts (restore_plan.assemble_parts), the checks that saved shards tile their
array (disk_format.check_grid / check_shard_tiling / decode_manifest), the
region arithmetic of a resharding restore (restore_plan.overlap, volume,
plan_leaf), the casting rules (restore_plan._target_dtype and friends), and
which host writes which part (redundancy, plan.split_bytes).

Nothing here reads or writes array data. To extend: add a row to a table (a
layout and the exact result or error message it must give).
"""

from __future__ import annotations

import json
import logging
import random
import sys

import helpers  # first: sets XLA_FLAGS (8 CPU devices) before jax is imported
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from fastpersist_jax import disk_format, plan, redundancy, restore, restore_plan, treepath
from fastpersist_jax.disk_format import LeafMeta, ShardRecord
from fastpersist_jax.errors import CorruptCheckpointError, RestoreMismatchError
from fastpersist_jax.restore_plan import SavedShard, assemble_parts, overlap, volume

NAME = treepath.LazyName([["d", "w"]])   # how restore names the leaf in messages


def _part(start: int | None, stop: int | None = None, index=((0, 2048),)) -> ShardRecord:
  """A record of bytes [start, stop) of the shard `index` (None: all of it)."""
  part = None if start is None else (start, stop)
  nbytes = volume(index) * 4 if part is None else stop - start
  return ShardRecord(leaf=0, index=index, file=0, offset=0, nbytes=nbytes, crc32c=0, part=part)


def _ranges(shard: SavedShard) -> list[tuple[int, tuple | None]]:
  return [(process, rec.part) for process, rec in shard.parts]


# assemble_parts: a shard's parts, in byte order -----------------------------------


def test_a_shard_saved_whole_once_is_taken_as_it_is():
  records = [(3, _part(None))]
  shard = assemble_parts(NAME, ((0, 2048),), 8192, records)
  assert shard.parts is records
  assert (shard.index, shard.nbytes, shard.missing) == (((0, 2048),), 8192, None)


def test_parts_from_several_processes_are_put_in_byte_order():
  records = [(2, _part(8192, 12288)), (0, _part(0, 4096)), (1, _part(4096, 8192))]
  shard = assemble_parts(NAME, ((0, 3072),), 12288, records)
  assert _ranges(shard) == [(0, (0, 4096)), (1, (4096, 8192)), (2, (8192, 12288))]
  assert shard.missing is None


def test_a_part_saved_twice_is_read_once_from_the_lowest_process():
  # Per-host checkpoints gathered in one directory (host_redundancy 2).
  records = [(3, _part(4096, 8192)), (1, _part(0, 4096)), (0, _part(0, 4096)),
             (1, _part(4096, 8192))]
  shard = assemble_parts(NAME, ((0, 2048),), 8192, records)
  assert _ranges(shard) == [(0, (0, 4096)), (1, (4096, 8192))]


def test_a_whole_shard_saved_by_two_processes_is_read_once():
  shard = assemble_parts(NAME, ((0, 2048),), 8192, [(1, _part(None)), (0, _part(None))])
  assert _ranges(shard) == [(0, None)]
  assert shard.missing is None


def test_empty_parts_of_a_small_shard_are_skipped():
  # split_bytes gives the 2nd..4th holders of a 100-byte shard nothing.
  assert plan.split_bytes(100, 4) == [(0, 100), (100, 100), (100, 100), (100, 100)]
  records = [(p, _part(a, b, index=((0, 25),))) for p, (a, b) in enumerate(plan.split_bytes(100, 4))]
  shard = assemble_parts(NAME, ((0, 25),), 100, records[::-1])
  assert _ranges(shard) == [(0, (0, 100))]
  assert shard.missing is None


def test_an_empty_shard_needs_no_part():
  records = [(0, _part(0, 0, index=((0, 0),))), (1, _part(0, 0, index=((0, 0),)))]
  shard = assemble_parts(NAME, ((0, 0),), 0, records)
  assert (shard.parts, shard.missing) == ([], None)


@pytest.mark.parametrize("parts,message", [
    ([(0, 8192), (4096, 12288)],
     "saved parts overlap at byte 4096 (part [4096, 12288], bytes up to 8192 already held)"),
    ([(0, 4096), (0, 8192), (8192, 12288)],
     "saved parts overlap at byte 0 (part [0, 8192], bytes up to 4096 already held)"),
    ([(0, 4096), (4096, 8192), (4095, 12288)],
     "saved parts overlap at byte 4095 (part [4095, 12288], bytes up to 4096 already held)"),
], ids=["overlap", "a part spanning two", "overlap by one byte"])
def test_parts_that_overlap_are_corrupt(parts, message):
  records = [(i, _part(a, b, index=((0, 3072),))) for i, (a, b) in enumerate(parts)]
  with pytest.raises(CorruptCheckpointError) as e:
    assemble_parts(NAME, ((0, 3072),), 12288, records)
  assert str(e.value) == f"leaf ['w'], shard [[0, 3072]]: {message}"


def test_a_gap_between_parts_is_noted_for_plan_leaf_not_raised():
  # Other hosts' parts of a per-host checkpoint are not here: an error only
  # where a target needs the shard (plan_leaf), with the per-host hint.
  records = [(0, _part(0, 4096, index=((0, 3072),))), (2, _part(8192, 12288, index=((0, 3072),)))]
  shard = assemble_parts(NAME, ((0, 3072),), 12288, records)
  assert _ranges(shard) == [(0, (0, 4096)), (2, (8192, 12288))]
  assert shard.missing == ("leaf ['w'], shard [[0, 3072]]: only bytes [0, 4096), [8192, 12288) "
                           "of 12288 are here")


def test_a_missing_last_part_is_noted_for_plan_leaf_not_raised():
  # An error only where a target region needs the shard (see plan_leaf).
  shard = assemble_parts(NAME, ((0, 2048),), 8192, [(0, _part(0, 4096))])
  assert _ranges(shard) == [(0, (0, 4096))]
  assert shard.missing == "leaf ['w'], shard [[0, 2048]]: only bytes [0, 4096) of 8192 are here"


def test_missing_first_parts_are_noted_like_missing_last_ones():
  # Host 1's per-host directory (host_redundancy 2 of 4 holders) holds parts 1 and 2.
  parts = plan.split_bytes(16384, 4)
  records = [(1, _part(*parts[1], index=((0, 4096),))), (1, _part(*parts[2], index=((0, 4096),)))]
  shard = assemble_parts(NAME, ((0, 4096),), 16384, records)
  assert shard.missing is not None and "are here" in shard.missing


@settings(max_examples=100, deadline=None)
@given(nbytes=st.integers(0, 5 * 4096 + 7), holders=st.integers(1, 6), k=st.integers(1, 3),
       seed=st.integers(0, 2**16))
def test_the_parts_of_any_holders_and_redundancy_assemble_to_the_whole_shard(
    nbytes, holders, k, seed):
  # Every holder writes its parts (redundancy.parts_of_holder), in any order.
  parts = plan.split_bytes(nbytes, holders)
  records = [(rank, _part(*parts[i], index=((0, nbytes),)))
             for rank in range(holders) for i in redundancy.parts_of_holder(holders, rank, k)]
  random.Random(seed).shuffle(records)
  shard = assemble_parts(NAME, ((0, nbytes),), nbytes, records)
  assert shard.missing is None
  covered = [rec.part for _, rec in shard.parts]
  if nbytes == 0:
    assert covered == []
  else:   # contiguous, in order, from 0 to nbytes
    assert [a for a, _ in covered] == [0] + [b for _, b in covered][:-1]
    assert covered[-1][1] == nbytes


# Shard grids: disk_format.check_grid / check_shard_tiling ----------------------------


def _rec(index, leaf=0, file=0, offset=0, part=None, itemsize=4) -> ShardRecord:
  nbytes = volume(index) * itemsize if part is None else part[1] - part[0]
  return ShardRecord(leaf, tuple(index), file, offset, nbytes, 0, part)


def test_cells_of_one_grid_pass():
  grid = [((r, r + 2), (c, c + 2)) for r in (0, 2, 4, 6) for c in (0, 2)]
  disk_format.check_grid(grid, "w")
  disk_format.check_grid(grid + grid, "w")   # repeats are check_shard_tiling's business
  disk_format.check_grid([], "w")
  disk_format.check_grid([((0, 0), (0, 4)), ((0, 8), (0, 4))], "w")   # empty shards are ignored


@pytest.mark.parametrize("indices,message", [
    ([((0, 4),), ((2, 6),)], "w overlap along dimension 0 ([0, 4) and [2, ...))"),
    ([((0, 8),), ((2, 4),)], "w overlap along dimension 0 ([0, 8) and [2, ...))"),
    ([((0, 4),), ((0, 8),)], "w overlap along dimension 0 ([0, 4) and [0, ...))"),
    ([((0, 2), (0, 4)), ((2, 4), (0, 2)), ((2, 4), (2, 4)), ((0, 2), (1, 3))],
     "w overlap along dimension 1 ([0, 2) and [0, ...))"),
    ([((0, 2), (0, 2)), ((2, 4), (0, 4)), ((0, 2), (2, 4))],
     "w overlap along dimension 1 ([0, 2) and [0, ...))"),
], ids=["partial", "nested", "same start", "shifted column", "not a grid"])
def test_shards_that_are_not_cells_of_one_grid_are_refused(indices, message):
  with pytest.raises(CorruptCheckpointError) as e:
    disk_format.check_grid(indices, "w")
  assert str(e.value) == message


def test_shard_tiling_refuses_a_repeated_shard_but_not_its_parts():
  files = [("data.00000.0000.bin", 1 << 16)]
  half = [_rec(((0, 4), (0, 4)), offset=0, part=(0, 32)),
          _rec(((0, 4), (0, 4)), offset=4096, part=(32, 64))]
  disk_format.check_shard_tiling(half, files, "m.json")
  with pytest.raises(CorruptCheckpointError) as e:
    disk_format.check_shard_tiling([_rec(((0, 4),)), _rec(((0, 4),), offset=4096)], files, "m.json")
  assert str(e.value) == "m.json: leaf 0 has the same shard more than once"


def test_shard_tiling_refuses_shared_file_bytes_only_when_files_are_given():
  shards = [_rec(((0, 4),), leaf=0, offset=0), _rec(((0, 4),), leaf=1, offset=8)]
  disk_format.check_shard_tiling(shards, None, "all manifests")
  with pytest.raises(CorruptCheckpointError) as e:
    disk_format.check_shard_tiling(shards, [("data.00000.0000.bin", 8192)], "m.json")
  assert str(e.value) == "m.json: shards at offsets 0 and 8 of data.00000.0000.bin overlap"
  # Touching is fine; empty shards take no bytes.
  disk_format.check_shard_tiling([_rec(((0, 4),), offset=0), _rec(((4, 8),), offset=16),
                                  _rec(((8, 8),), offset=0)], [("f", 64)], "m.json")


def test_shard_tiling_checks_each_leaf_separately():
  disk_format.check_shard_tiling([_rec(((0, 4),), leaf=0, offset=0),
                                  _rec(((2, 6),), leaf=1, offset=4096)], None, "m.json")
  with pytest.raises(CorruptCheckpointError, match=r"^m\.json: shards of leaf 1 overlap along "
                     r"dimension 0 \(\[0, 4\) and \[2, \.\.\.\)\)$"):
    disk_format.check_shard_tiling([_rec(((0, 4),), leaf=1, offset=0),
                                    _rec(((2, 6),), leaf=1, offset=4096)], None, "m.json")


# Out of bounds, gaps: decode_manifest against the leaf's shape ----------------------

_META = disk_format.CheckpointMetadata(1, [LeafMeta([["d", "w"]], "array", "float32", (8, 4))])


def _decode(tmp_path, shards: list[ShardRecord], file_size: int = 8192) -> disk_format.Manifest:
  (tmp_path / "data.00000.0000.bin").write_bytes(bytes(file_size))
  raw = disk_format.encode_manifest(
      disk_format.Manifest(0, [("data.00000.0000.bin", file_size)], shards))
  return disk_format.decode_manifest(json.loads(raw), "m.json", str(tmp_path), 0, _META)


def test_a_manifest_of_a_grid_of_shards_decodes(tmp_path):
  shards = [_rec(((0, 4), (0, 4)), offset=0), _rec(((4, 8), (0, 4)), offset=4096)]
  assert _decode(tmp_path, shards).shards == shards


def test_a_manifest_may_leave_gaps_that_restore_finds_by_counting(tmp_path):
  # Another process's manifest may hold the rest: plan_leaf counts coverage.
  shards = [_rec(((0, 4), (0, 4)), offset=0)]
  assert _decode(tmp_path, shards).shards == shards


@pytest.mark.parametrize("shards,message", [
    ([_rec(((4, 9), (0, 4)))], "m.json shard 0 index: expected an integer in [4, 8], got 9"),
    ([_rec(((-1, 4), (0, 4)))], "m.json shard 0 index: expected an integer in [0, 8], got -1"),
    ([ShardRecord(0, ((6, 2), (0, 4)), 0, 0, 0, 0)],
     "m.json shard 0 index: expected an integer in [6, 8], got 2"),
    ([_rec(((0, 8),))], "m.json shard 0: index rank does not match shape (8, 4)"),
    ([_rec(((0, 4), (0, 4)), offset=0), _rec(((2, 6), (0, 4)), offset=4096)],
     "m.json: shards of leaf 0 overlap along dimension 0 ([0, 4) and [2, ...))"),
    ([_rec(((0, 4), (0, 4)), offset=0), _rec(((0, 4), (0, 4)), offset=4096)],
     "m.json: leaf 0 has the same shard more than once"),
    ([_rec(((0, 4), (0, 4)), offset=0), _rec(((4, 8), (0, 4)), offset=0)],
     "m.json: shards at offsets 0 and 0 of data.00000.0000.bin overlap"),
    ([ShardRecord(0, ((0, 4), (0, 4)), 0, 0, 60, 0)],
     "m.json shard 0: nbytes 60 does not match its index (64)"),
    ([ShardRecord(0, ((0, 4), (0, 4)), 0, 0, 100, 0, (0, 100))],
     "m.json shard 0 part: expected an integer in [0, 64], got 100"),
    ([_rec(((0, 4), (0, 4)), offset=8192)], "m.json shard 0: extends past the end of "
     "data.00000.0000.bin"),
], ids=["past the end", "negative start", "stop before start", "wrong rank", "overlap",
        "repeated", "shared bytes", "nbytes", "part past the shard", "past the file"])
def test_shards_out_of_bounds_or_overlapping_are_refused(tmp_path, shards, message):
  with pytest.raises(CorruptCheckpointError) as e:
    _decode(tmp_path, shards)
  assert str(e.value) == message


# Region arithmetic ---------------------------------------------------------------


@pytest.mark.parametrize("a,b,expected", [
    (((0, 4), (0, 4)), ((2, 6), (1, 3)), ((2, 4), (1, 3))),
    (((0, 4), (0, 4)), ((0, 4), (0, 4)), ((0, 4), (0, 4))),
    (((0, 8),), ((2, 4),), ((2, 4),)),
    (((0, 4), (0, 4)), ((4, 8), (0, 4)), None),    # touching is no overlap
    (((0, 4), (0, 4)), ((0, 4), (4, 8)), None),
    (((0, 4), (0, 4)), ((5, 8), (0, 4)), None),
    (((0, 0),), ((0, 4),), None),                  # an empty region overlaps nothing
    ((), (), ()),                                  # 0-d: the one element
])
def test_overlap(a, b, expected):
  assert overlap(a, b) == expected
  assert overlap(b, a) == expected


@pytest.mark.parametrize("index,expected", [
    ((), 1), (((0, 8),), 8), (((2, 6), (1, 3)), 8), (((0, 0), (0, 4)), 0),
    (((0, 2), (0, 3), (0, 5)), 30)])
def test_volume(index, expected):
  assert volume(index) == expected


# The saved grid of an (8, 4) array on the 4 x 2 mesh, P("data", "model").
SAVED_GRID = [((r, r + 2), (c, c + 2)) for r in (0, 2, 4, 6) for c in (0, 2)]


@pytest.mark.parametrize("region,needed", [
    (((0, 4), (0, 4)), [((0, 2), (0, 2)), ((0, 2), (2, 4)), ((2, 4), (0, 2)), ((2, 4), (2, 4))]),
    (((0, 8), (0, 1)), [((0, 2), (0, 2)), ((2, 4), (0, 2)), ((4, 6), (0, 2)), ((6, 8), (0, 2))]),
    (((4, 6), (2, 4)), [((4, 6), (2, 4))]),
    (((1, 3), (1, 3)), [((0, 2), (0, 2)), ((0, 2), (2, 4)), ((2, 4), (0, 2)), ((2, 4), (2, 4))]),
    (((7, 8), (3, 4)), [((6, 8), (2, 4))]),
])
def test_the_saved_shards_a_target_region_needs(region, needed):
  found = [s for s in SAVED_GRID if overlap(s, region) is not None]
  assert found == needed
  assert sum(volume(overlap(s, region)) for s in found) == volume(region)


def _meta(shape=(8, 4), dtype="float32") -> LeafMeta:
  return LeafMeta([["d", "w"]], "array", dtype, shape)


def _saved(indices, itemsize=4) -> list[SavedShard]:
  return [assemble_parts(NAME, idx, volume(idx) * itemsize, [(0, _rec(idx, itemsize=itemsize))])
          for idx in indices]


def _target(spec, mesh=None, shape=(8, 4), dtype=jnp.float32):
  return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh or helpers.mesh_4x2(),
                                                                   spec))


def test_restoring_onto_the_saved_sharding_looks_each_region_up():
  job = restore_plan.plan_leaf(0, _meta(), _target(P("data", "model")), _saved(SAVED_GRID), [],
                               "hint")
  assert job.resharded is False
  assert [(d.id, idx) for d, idx in job.device_indices] == list(enumerate(SAVED_GRID))
  assert [s.index for s in job.needed] == SAVED_GRID
  assert job.read_bytes == 8 * 4096   # each 16-byte shard at an aligned start


def test_a_resharding_restore_needs_the_overlapping_shards():
  job = restore_plan.plan_leaf(0, _meta(), _target(P("model", None)), _saved(SAVED_GRID), [], "h")
  assert job.resharded is True
  assert [(d.id, idx) for d, idx in job.device_indices] == [
      (d, ((0, 4), (0, 4)) if d % 2 == 0 else ((4, 8), (0, 4))) for d in range(8)]
  assert sorted(s.index for s in job.needed) == SAVED_GRID


def test_a_single_device_target_needs_every_shard():
  target = jax.ShapeDtypeStruct((8, 4), jnp.float32,
                                sharding=SingleDeviceSharding(jax.devices()[5]))
  job = restore_plan.plan_leaf(0, _meta(), target, _saved(SAVED_GRID[::-1]), [], "h")
  assert [(d.id, idx) for d, idx in job.device_indices] == [(5, ((0, 8), (0, 4)))]
  assert (job.resharded, len(job.needed)) == (True, 8)


def test_a_numpy_target_is_one_region_of_the_whole_array():
  job = restore_plan.plan_leaf(0, _meta(), np.zeros((8, 4), np.float32), _saved(SAVED_GRID), [],
                               "h")
  assert job.sharding is None
  assert job.device_indices == [(None, ((0, 8), (0, 4)))]
  assert len(job.needed) == 8


@pytest.mark.parametrize("present,message", [
    (SAVED_GRID[:4], "the checkpoint holds 0 of the 16 elements of region [[4, 8], [0, 4]]"),
    ([s for s in SAVED_GRID if s != ((2, 4), (2, 4))],
     "the checkpoint holds 12 of the 16 elements of region [[0, 4], [0, 4]]"),
    ([], "the checkpoint holds 0 of the 16 elements of region [[0, 4], [0, 4]]"),
], ids=["half missing", "one shard missing", "nothing saved"])
def test_a_target_region_not_covered_by_saved_shards_is_refused(present, message):
  with pytest.raises(CorruptCheckpointError) as e:
    restore_plan.plan_leaf(0, _meta(), _target(P("model", None)), _saved(present), [],
                           "a process's data is missing")
  assert str(e.value) == f"leaf ['w']: {message} (a process's data is missing)"


def test_a_needed_shard_with_missing_bytes_is_refused_with_the_hint():
  saved = _saved(SAVED_GRID[1:])
  saved.insert(0, assemble_parts(NAME, SAVED_GRID[0], 16,
                                 [(0, _rec(SAVED_GRID[0], part=(0, 8)))]))
  with pytest.raises(CorruptCheckpointError) as e:
    restore_plan.plan_leaf(0, _meta(), _target(P("data", "model")), saved, [], "see hosts")
  assert str(e.value) == ("leaf ['w'], shard [[0, 2], [0, 2]]: only bytes [0, 8) of 16 are here "
                          "(see hosts)")


def test_saved_shards_groups_records_by_leaf_and_checks_the_grid():
  leaves = [_meta(), _meta(shape=(4,), dtype="int8")]
  records = {(0, idx): [(0, _rec(idx))] for idx in SAVED_GRID}
  records[(1, ((0, 4),))] = [(1, _rec(((0, 4),), leaf=1, itemsize=1))]
  by_leaf = restore_plan.saved_shards(leaves, records)
  assert [s.index for s in by_leaf[0]] == SAVED_GRID
  assert [(s.index, s.nbytes) for s in by_leaf[1]] == [(((0, 4),), 4)]
  records[(0, ((0, 2), (1, 3)))] = [(0, _rec(((0, 2), (1, 3))))]
  with pytest.raises(CorruptCheckpointError) as e:
    restore_plan.saved_shards(leaves, records)
  assert str(e.value) == ("leaf ['w']: saved shards overlap along dimension 1 ([0, 2) and "
                          "[1, ...))")


# Casting rules -------------------------------------------------------------------


@pytest.mark.parametrize("saved,target,expected", [
    ("float32", jax.ShapeDtypeStruct((8, 4), jnp.bfloat16), ml_dtypes.bfloat16),
    ("float32", jax.ShapeDtypeStruct((8, 4), jnp.int8), np.int8),
    ("bfloat16", np.zeros((8, 4), np.float32), np.float32),
    ("int32", jax.ShapeDtypeStruct((8, 4), jnp.bool_), np.bool_),
    ("uint8", jax.ShapeDtypeStruct((8, 4), jnp.float16), np.float16),
    ("float32", None, np.float32),           # no target: as saved
    ("int16", 3, np.int16),                  # a Python scalar target: as saved, then converted
], ids=["f32->bf16", "f32->i8", "bf16->numpy f32", "i32->bool", "u8->f16", "none", "python"])
def test_saved_arrays_are_cast_to_the_targets_dtype(saved, target, expected):
  assert restore_plan._target_dtype(_meta(dtype=saved), target, "['w']") == (np.dtype(expected),
                                                                              None)


def _key_meta(impl="threefry2x32", key_shape=(4,)) -> LeafMeta:
  data_shape = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0, impl=impl))).shape
  return LeafMeta([["d", "k"]], "array", "uint32", key_shape + data_shape, prng_impl=impl)


def test_saved_keys_restore_as_keys_or_as_their_key_data():
  meta = _key_meta()
  keys = jax.ShapeDtypeStruct((4,), restore_plan.key_dtype("threefry2x32"))
  assert meta.shape == (4, 2)
  assert restore_plan._target_dtype(meta, keys, "k") == (np.dtype(np.uint32), "threefry2x32")
  assert restore_plan._target_dtype(meta, None, "k") == (np.dtype(np.uint32), "threefry2x32")
  raw = jax.ShapeDtypeStruct((4, 2), jnp.uint32)
  assert restore_plan._target_dtype(meta, raw, "k") == (np.dtype(np.uint32), None)


@pytest.mark.parametrize("meta,target,message", [
    (_key_meta(), jax.ShapeDtypeStruct((4,), restore_plan.key_dtype("rbg")),
     "leaf k: target keys key<rbg> differ from the saved threefry2x32 keys"),
    (_key_meta(), jax.ShapeDtypeStruct((4, 2), jnp.float32),
     "leaf k: saved as threefry2x32 keys of shape (4,); the target ((4, 2), float32) is neither "
     "such keys nor their key data ((4, 2), uint32)"),
    (_key_meta(), 7, "leaf k: saved as threefry2x32 keys; the target is a Python int"),
    (_meta(), jax.ShapeDtypeStruct((8, 4), restore_plan.key_dtype("threefry2x32")),
     "leaf k: the target holds key<fry>, the checkpoint float32 data, which cannot become key<fry>"),
], ids=["other key impl", "neither keys nor key data", "python scalar", "data into keys"])
def test_casts_that_cannot_be_made_are_refused(meta, target, message):
  with pytest.raises(RestoreMismatchError) as e:
    restore_plan._target_dtype(meta, target, "k")
  assert str(e.value) == message


@pytest.mark.parametrize("value,python_type,expected", [
    (np.asarray(3.0, np.float32), int, 3),
    (np.asarray(7, np.int64), float, 7.0),
    (np.asarray(1, np.int8), bool, True),
    (np.asarray(np.nan, np.float64), float, "nan"),
    (np.asarray([[5]], np.int32), int, 5),   # any 1-element array
])
def test_a_restored_value_becomes_the_targets_python_scalar_when_lossless(value, python_type,
                                                                         expected):
  out = restore_plan.as_python(value, python_type, "s")
  assert type(out) is python_type
  assert (out != out) if expected == "nan" else out == expected


@pytest.mark.parametrize("value,python_type,message", [
    (np.asarray(3.5), int, "leaf s: the saved 3.5 would change as a int (3)"),
    (np.asarray(2, np.int8), bool, "leaf s: the saved 2 would change as a bool (True)"),
    (np.asarray(1 + 2j), float, "leaf s: the saved (1+2j) is not a float"),
])
def test_a_lossy_python_scalar_is_refused(value, python_type, message):
  with pytest.raises(RestoreMismatchError) as e:
    restore_plan.as_python(value, python_type, "s")
  assert str(e.value) == message


def test_a_saved_python_scalar_restores_into_a_0d_array_target():
  meta = LeafMeta([["d", "step"]], "scalar", value=300, scalar_type="int")
  out = restore_plan.scalar_as_array(meta, jax.ShapeDtypeStruct((), jnp.int32), "step")
  assert isinstance(out, jax.Array) and out.dtype == jnp.int32 and int(out) == 300
  out = restore_plan.scalar_as_array(meta, np.float32(0), "step")
  assert type(out) is np.float32 and out == 300
  with pytest.raises(RestoreMismatchError) as e:
    restore_plan.scalar_as_array(meta, jax.ShapeDtypeStruct((), jnp.int8), "step")
  assert str(e.value) == "leaf step: the saved 300 does not fit the target's int8"
  with pytest.raises(RestoreMismatchError) as e:
    restore_plan.scalar_as_array(meta, jax.ShapeDtypeStruct((2,), jnp.int32), "step")
  assert str(e.value) == "leaf step: saved as a Python int; the target has shape (2,)"


# Matching a target to saved leaves -----------------------------------------------


def test_match_target_pairs_leaves_by_name_and_position():
  leaves = [LeafMeta([["d", "opt"], ["s", 0], ["d", "mu"]], "array", "float32", (2,)),
            LeafMeta([["d", "w"]], "array", "float32", (2,)),
            LeafMeta([["d", "step"]], "scalar", value=1, scalar_type="int")]
  target = {"w": np.zeros(2), "opt": ({"mu": np.zeros(2)},), "step": ..., "e": {}}
  selected, treedef = restore_plan.match_target(leaves, target, "ckpt")
  assert [(i, type(t).__name__) for i, t in selected] == [
      (None, "dict"), (0, "ndarray"), (None, "ellipsis"), (1, "ndarray")]
  assert treedef == jax.tree_util.tree_structure(target, is_leaf=treepath.is_empty_node)
  assert restore_plan.match_target(leaves, None, "ckpt") == ([(0, None), (1, None), (2, None)],
                                                             None)


def test_match_target_refuses_an_unknown_leaf_and_twin_saved_names():
  leaves = [LeafMeta([["d", "w"]], "array", "float32", (2,))]
  with pytest.raises(RestoreMismatchError) as e:
    restore_plan.match_target(leaves, {"v": np.zeros(2)}, "ckpt")
  assert str(e.value) == ("leaf ['v'] of the restore target is not in the checkpoint "
                          "(FastPersistRestore(..., partial_restore=True) keeps the target's "
                          "value there)")
  twins = leaves + [LeafMeta([["a", "w"]], "array", "float32", (2,))]
  with pytest.raises(CorruptCheckpointError) as e:
    restore_plan.match_target(twins, {"w": np.zeros(2)}, "ckpt")
  assert str(e.value) == "ckpt: two saved leaves are both named .w"


# Host redundancy: which holder writes which part -----------------------------------


def test_parts_of_holder_is_the_documented_table():
  # redundancy.py's docstring: R = 4, k = 2.
  assert [redundancy.parts_of_holder(4, j, 2) for j in range(4)] == [[0, 1], [1, 2], [2, 3], [3, 0]]
  assert [redundancy.holders_of_part(4, i, 2) for i in range(4)] == [[0, 3], [1, 0], [2, 1], [3, 2]]
  assert [redundancy.parts_of_holder(3, j, 1) for j in range(3)] == [[0], [1], [2]]
  # More copies than holders: every holder writes everything, once.
  assert redundancy.parts_of_holder(2, 1, 5) == [1, 0]
  assert redundancy.holders_of_part(2, 0, 5) == [0, 1]
  assert redundancy.parts_of_holder(1, 0, 3) == [0]


@pytest.mark.parametrize("n_holders,rank,k", [(4, 4, 2), (4, -1, 2), (4, 0, 0), (0, 0, 1)])
def test_parts_of_holder_refuses_a_rank_outside_the_holders_or_no_copy(n_holders, rank, k):
  with pytest.raises(ValueError) as e:
    redundancy.parts_of_holder(n_holders, rank, k)
  assert str(e.value) == f"rank {rank} of {n_holders} holders, redundancy {k}"


@pytest.mark.parametrize("nbytes,parts,expected", [
    (8192, 2, [(0, 4096), (4096, 8192)]),
    (10000, 3, [(0, 4096), (4096, 8192), (8192, 10000)]),
    (100, 4, [(0, 100), (100, 100), (100, 100), (100, 100)]),
    (12289, 3, [(0, 8192), (8192, 12289), (12289, 12289)]),
    (0, 2, [(0, 0), (0, 0)]),
    (5, 1, [(0, 5)]),
])
def test_split_bytes_cuts_at_4k_boundaries(nbytes, parts, expected):
  assert plan.split_bytes(nbytes, parts) == expected


def test_in_one_process_every_array_byte_has_a_single_copy(caplog):
  mesh = helpers.mesh_4x2()
  tree = {"w": jax.device_put(np.zeros((8, 4), np.float32), NamedSharding(mesh, P("data"))),
          "b": jax.device_put(np.zeros((4,), np.int8), NamedSharding(mesh, P())),
          "host": np.zeros(100, np.float32), "step": 3, "none": None}
  for replica_parallel in (False, True):
    report = redundancy.single_copy_bytes(tree, redundancy=2, replica_parallel=replica_parallel)
    assert report == redundancy.SingleCopyReport(132, 132, ("['b']", "['w']"))
  many = {f"x{i}": tree["b"] for i in range(5)}
  assert redundancy.single_copy_bytes(many, redundancy=2, replica_parallel=True).leaves == (
      "['x0']", "['x1']", "['x2']", "... 2 more")
  token = object()
  with caplog.at_level(logging.WARNING, logger="fastpersist_jax.redundancy"):
    first = redundancy.warn_single_copies(tree, redundancy=2, replica_parallel=True,
                                          plan_token=token)
    again = redundancy.warn_single_copies({}, redundancy=2, replica_parallel=True,
                                          plan_token=token)   # cached by plan: the same report
  assert first is again and first.nbytes == 132
  assert [r.getMessage() for r in caplog.records] == [
      "fastpersist: 132 bytes of this per-host checkpoint (132 written by this host) have a "
      "single copy and are lost with their host: ['b'], ['w']. Shards not replicated across "
      "hosts cannot get a second copy without moving data; save to a shared directory every N "
      "steps to protect them."] * 2
  assert redundancy.single_copy_bytes({"h": np.zeros(3)}, redundancy=1,
                                      replica_parallel=False) == redundancy.SingleCopyReport()


# Read merging (restore.merge_reads) ------------------------------------------

class _File:
  def __init__(self, path):
    self.path = path


_FILES = [_File("a"), _File("b")]


@settings(max_examples=150, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 1), st.integers(0, 40), st.integers(1, 3 * 4096),
                          st.integers(0, 2)), min_size=0, max_size=12))
def test_merged_reads_put_every_byte_where_the_unmerged_ones_do(specs):
  # Shards laid out as a save lays them out: 4096-aligned in each file, and
  # in the buffer at 4096-aligned starts, some with a shift (another layout).
  reads, at, used = [], 0, {0: set(), 1: set()}
  for file_id, block, nbytes, shift in specs:
    offset = block * 4096
    if any(b in used[file_id] for b in range(block, block + -(-nbytes // 4096))):
      continue   # shards never share file bytes
    used[file_id].update(range(block, block + -(-nbytes // 4096)))
    reads.append((_FILES[file_id], offset, at + shift * 4096, nbytes))
    at += (shift + 1 + nbytes // 4096) * 4096
  merged = restore.merge_reads(reads)
  # Every byte of every read: same file, and (file offset -> buffer offset)
  # as the read says, inside exactly one merged read.
  for f, offset, start, n in reads:
    covering = [m for m in merged if m[0] is f and m[1] <= offset and offset + n <= m[1] + m[3]]
    assert len(covering) == 1, (reads, merged)
    mf, moffset, mstart, _ = covering[0]
    assert mstart - moffset == start - offset
  # A merged read never writes where another read (not merged into it with
  # the same mapping) puts its bytes: reads complete in any order.
  for mf, moffset, mstart, mn in merged:
    for f, offset, start, n in reads:
      inside = f is mf and moffset <= offset and offset + n <= moffset + mn
      disjoint = start + n <= mstart or mstart + mn <= start
      assert inside or disjoint, ((f.path, offset, start, n), (mf.path, moffset, mstart, mn))
  # Merged reads only span padding: no more than 64 KiB between neighbours.
  assert sum(m[3] for m in merged) <= sum(r[3] for r in reads) + 65536 * len(reads)
  assert len(merged) <= len(reads)


def test_neighbouring_reads_of_a_save_layout_become_one():
  f = _FILES[0]
  reads = [(f, 4096 * i, 4096 * i, 4000) for i in range(10)]
  assert restore.merge_reads(reads) == [(f, 0, 0, 9 * 4096 + 4000)]
  # A different gap in the buffer than in the file: not merged.
  assert len(restore.merge_reads([(f, 0, 0, 100), (f, 4096, 8192, 100)])) == 2
  # Another read's destination in the gap (a target whose leaf order differs
  # from the file's): not merged, or the gap's file bytes would land on it.
  other = _FILES[1]
  reads = [(f, 0, 0, 4096), (other, 0, 4096, 4096), (f, 8192, 8192, 4096)]
  assert restore.merge_reads(reads) == [(f, 0, 0, 4096), (f, 8192, 8192, 4096),
                                        (other, 0, 4096, 4096)]


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))


# TargetLayouts: a leaf's layout computed once per distinct leaf and target ------------

def _layout_cases():
  """Saved leaves (those with equal fields share their sharding record, as
  decoded metadata does) and targets that fit some of them and not others."""
  from fastpersist_jax import shardings
  mesh = helpers.mesh_4x2()
  named = shardings.encode(NamedSharding(mesh, P("data", "model")))
  single = shardings.encode(SingleDeviceSharding(jax.devices()[3]))
  metas = [LeafMeta([["d", f"w{i}"]], "array", dtype, shape, sharding)
           for i, (dtype, shape, sharding) in enumerate(
               [("float32", (8, 4), named), ("float32", (8, 4), named), ("float32", (8, 4), single),
                ("bfloat16", (8, 4), named), ("int32", (), None), ("float32", (8, 4), None)])]
  metas.append(LeafMeta([["d", "n"]], "numpy", "float32", (8, 4), named))
  metas.append(_key_meta())
  targets = [None, _target(P("data", "model")), _target(P("model")), _target(P(), dtype=jnp.bfloat16),
             _target(P("data"), shape=(4, 8)),
             jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=SingleDeviceSharding(jax.devices()[1])),
             jax.ShapeDtypeStruct((8, 4), jnp.float32), jax.ShapeDtypeStruct((), jnp.int8),
             jax.ShapeDtypeStruct((4,), restore_plan.key_dtype("threefry2x32")),
             jnp.zeros((8, 4), jnp.float32), 3, np.float32(1.5), np.zeros((8, 4), np.float16)]
  return metas, targets


def _layout_or_error(layout, leaf_id, meta, target):
  notes: list[str] = []
  try:
    job = layout(leaf_id, meta, target, notes)
  except RestoreMismatchError as e:
    return str(e), notes
  return (job.leaf_id, job.meta, job.sharding, job.device_indices, job.needed, job.dtype,
          job.prng_impl, job.python_type, job.numpy_scalar, job.resharded), notes


@settings(max_examples=60, deadline=None, derandomize=True)
@given(st.lists(st.tuples(st.integers(0, 7), st.integers(0, 12)), min_size=1, max_size=30))
def test_cached_target_layouts_equal_the_layout_of_each_leaf_alone(pairs):
  metas, targets = _layout_cases()
  layouts = restore_plan.TargetLayouts()
  for leaf_id, (m, t) in enumerate(pairs):
    cached = _layout_or_error(layouts, leaf_id, metas[m], targets[t])
    alone = _layout_or_error(restore_plan.target_layout, leaf_id, metas[m], targets[t])
    assert cached == alone, (metas[m], targets[t])


def test_target_layouts_compute_each_distinct_leaf_and_target_once(monkeypatch):
  metas, targets = _layout_cases()
  computed = []
  real = restore_plan.target_layout
  monkeypatch.setattr(restore_plan, "target_layout",
                      lambda *args: computed.append(args[0]) or real(*args))
  layouts = restore_plan.TargetLayouts()
  jobs = [layouts(i, metas[i % 2], targets[1], []) for i in range(100)]
  assert computed == [0]   # w0 and w1 share their fields (and sharding record)
  twin = LeafMeta([["d", "twin"]], "array", "float32", (8, 4), dict(metas[0].sharding))
  layouts(100, twin, targets[1], [])   # equal fields, another record: laid out again
  assert computed == [0, 100]
  assert [j.leaf_id for j in jobs] == list(range(100))
  assert len({id(j) for j in jobs}) == 100   # each leaf has its own job to fill in
