"""The save plan's geometry (plan.py), without writing anything: which shards
(or byte ranges of them) each process writes, how replicated shards are split
and spread over hosts, where each shard goes in the data files, and when a
plan is reused."""

from __future__ import annotations

import dataclasses
import sys

import helpers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import FastPersistOptions, UnsupportedLeafError, sources
from fastpersist_jax import plan as plan_lib

KiB = 1 << 10


def _plan(tree, options=None, **kw):
  args = dict(process_index=0, process_count=1, write_host_arrays=True, placement="shared")
  args.update(kw)
  return plan_lib.make_plan(tree, options or FastPersistOptions(), **args)


def _geometry(plan):
  return [(s.leaf, s.index, s.nbytes, s.file, s.offset, s.part) for s in plan.shards]


# Byte splits ------------------------------------------------------------------

@pytest.mark.parametrize("nbytes, parts, want", [
    (8192, 2, [(0, 4096), (4096, 8192)]),
    (10_000, 3, [(0, 4096), (4096, 8192), (8192, 10_000)]),
    (16_384, 4, [(0, 4096), (4096, 8192), (8192, 12_288), (12_288, 16_384)]),
    (100, 4, [(0, 100), (100, 100), (100, 100), (100, 100)]),   # fewer blocks than parts
    (0, 2, [(0, 0), (0, 0)]),
    (5000, 1, [(0, 5000)]),
])
def test_split_bytes_covers_the_shard_at_4k_boundaries(nbytes, parts, want):
  assert plan_lib.split_bytes(nbytes, parts) == want


# Owned shards per process -----------------------------------------------------

A = ((0, 4), (0, 1024))      # 4 x 1024 float32: 16 KiB
B = ((4, 8), (0, 1024))
SMALL = ((0, 5),)            # 5 float32: 20 bytes


def _owned(local, holders, me, itemsize=4, **kw):
  args = dict(placement="shared", replica_parallel=True, host_redundancy=2)
  args.update(kw)
  return plan_lib.owned_shards(local, holders, itemsize, me, **args)


def test_a_shard_of_one_holder_is_written_whole_by_it():
  holders = {A: {0}, B: {1}}
  assert _owned({A: 0}, holders, me=0) == [(0, A, None, 16 * KiB)]
  assert _owned({B: 3}, holders, me=1) == [(3, B, None, 16 * KiB)]


def test_replica_parallel_splits_a_replicated_shard_among_its_holders():
  holders = {A: {0, 1}}
  assert _owned({A: 2}, holders, me=0) == [(2, A, (0, 8 * KiB), 8 * KiB)]
  assert _owned({A: 0}, holders, me=1) == [(0, A, (8 * KiB, 16 * KiB), 8 * KiB)]
  # In a shared directory host_redundancy is ignored: each byte once.
  assert _owned({A: 2}, holders, me=0, host_redundancy=3) == [(2, A, (0, 8 * KiB), 8 * KiB)]


def test_without_replica_parallel_the_lowest_holder_writes_a_shared_shard_whole():
  holders = {A: {1, 2}}
  assert _owned({A: 0}, holders, me=1, replica_parallel=False) == [(0, A, None, 16 * KiB)]
  assert _owned({A: 0}, holders, me=2, replica_parallel=False) == []


def test_a_small_replicated_shard_is_one_part_written_by_the_first_holder():
  holders = {SMALL: {0, 1, 2}}
  assert _owned({SMALL: 0}, holders, me=0) == [(0, SMALL, (0, 20), 20)]
  assert _owned({SMALL: 0}, holders, me=1) == []
  assert _owned({SMALL: 0}, holders, me=2) == []


def test_host_redundancy_spreads_each_part_over_k_hosts():
  # R = 4 holders, k = 2: holder j writes parts j and j+1 (mod 4).
  holders = {A: {0, 1, 2, 3}}
  q = 4 * KiB
  want = {0: [(0, q), (q, 2 * q)], 1: [(q, 2 * q), (2 * q, 3 * q)],
          2: [(2 * q, 3 * q), (3 * q, 4 * q)], 3: [(3 * q, 4 * q), (0, q)]}
  for me, parts in want.items():
    assert _owned({A: 1}, holders, me, placement="per_host") == [(1, A, p, q) for p in parts]
  # Redundancy above the number of holders: every holder writes everything.
  assert _owned({A: 1}, {A: {0, 1}}, 1, placement="per_host", host_redundancy=5) == [
      (1, A, (8 * KiB, 16 * KiB), 8 * KiB), (1, A, (0, 8 * KiB), 8 * KiB)]
  # k = 1: as in a shared directory.
  assert _owned({A: 1}, holders, 2, placement="per_host", host_redundancy=1) == [
      (1, A, (2 * q, 3 * q), q)]


@pytest.mark.parametrize("k", [1, 2, 3])
def test_every_byte_of_a_replicated_shard_is_written_min_k_r_times(k):
  holders = {((0, 3000),): {0, 2, 5}}     # 12,000 bytes on processes 0, 2 and 5
  index = ((0, 3000),)
  counts = np.zeros(12_000, np.int64)
  for me in (0, 2, 5):
    for _, _, (start, stop), n in _owned({index: 0}, holders, me, placement="per_host",
                                         host_redundancy=k):
      assert n == stop - start and start % 4096 == 0
      counts[start:stop] += 1
  assert (counts == min(k, 3)).all()


def test_per_host_without_replica_parallel_keeps_all_its_devices_hold():
  local = {A: 0, B: 2}
  assert _owned(local, {}, me=1, placement="per_host", replica_parallel=False) == [
      (0, A, None, 16 * KiB), (2, B, None, 16 * KiB)]


# Plans of real trees ------------------------------------------------------------

@pytest.fixture(scope="module")
def mesh():
  return helpers.mesh_4x2()


def test_plan_of_a_sharded_tree(mesh):
  w = jax.device_put(jnp.zeros((8, 16), jnp.float32), NamedSharding(mesh, P("data")))
  b = jax.device_put(jnp.zeros((8,), jnp.int8), NamedSharding(mesh, P()))
  key = jax.random.key(0)
  tree = {"b": b, "key": key, "step": 7, "w": w}
  plan = _plan(tree)
  # Every row block of w is on two devices of this one process: written
  # whole, once; b (replicated everywhere) once; the key as its key data.
  assert _geometry(plan) == [
      (0, ((0, 8),), 8, 0, 0, None),
      (1, ((0, 2),), 8, 0, 4096, None),
      (3, ((0, 2), (0, 16)), 128, 0, 8192, None),
      (3, ((2, 4), (0, 16)), 128, 0, 12_288, None),
      (3, ((4, 6), (0, 16)), 128, 0, 16_384, None),
      (3, ((6, 8), (0, 16)), 128, 0, 20_480, None)]
  assert plan.file_sizes == (20_480 + 128,)
  assert (plan.total_bytes, plan.staged_bytes) == (8 + 8 + 4 * 128, 20_608)
  # Each shard's addressable index names a device holding that block.
  for s in plan.shards:
    x = tree["w"] if s.leaf == 3 else tree["b"] if s.leaf == 0 else jax.random.key_data(key)
    got = x.addressable_shards[s.addressable_index].index
    assert plan_lib.normalize_index(got, x.shape) == s.index
  assert [m.kind for m in plan.leaves] == ["array", "array", "scalar", "array"]
  assert (plan.leaves[1].dtype, plan.leaves[1].shape, plan.leaves[1].prng_impl) == (
      "uint32", (2,), "threefry2x32")
  assert plan.prng_leaves == (1,) and plan.scalar_leaves == (2,)
  assert plan.leaf_runs == ((0, "array", (0,)), (1, "array", (0,)),
                            (3, "array", tuple(s.addressable_index for s in plan.shards[2:])))
  assert not plan.any_on_accelerator


def test_another_process_owns_nothing_this_one_alone_holds(mesh):
  w = jax.device_put(jnp.zeros((8, 16)), NamedSharding(mesh, P("data", "model")))
  plan = _plan({"w": w, "n": np.arange(3)}, process_index=1, process_count=2,
               write_host_arrays=False)
  assert plan.shards == () and plan.file_sizes == ()
  assert [m.kind for m in plan.leaves] == ["numpy", "array"]


def test_offsets_are_4k_aligned_and_files_split_past_data_file_bytes():
  tree = {"a": np.zeros(5000, np.uint8), "b": np.zeros((0, 3), np.float32),
          "c": np.zeros(10, np.uint8), "d": np.zeros(9000, np.uint8),
          "e": np.zeros(20_000, np.uint8), "f": np.zeros(0, np.int64), "g": np.float32(1)}
  plan = _plan(tree, FastPersistOptions(data_file_bytes=10_000))
  assert _geometry(plan) == [
      (0, ((0, 5000),), 5000, 0, 0, None),
      (1, ((0, 0), (0, 3)), 0, 0, 0, None),        # zero-size: offset 0, no bytes
      (2, ((0, 10),), 10, 0, 8192, None),           # aligned up past a's end
      (3, ((0, 9000),), 9000, 1, 0, None),          # would pass 10,000: a new file
      (4, ((0, 20_000),), 20_000, 2, 0, None),      # larger than a file: a file of its own
      (5, ((0, 0),), 0, 2, 0, None),
      (6, (), 4, 3, 0, None)]
  assert plan.file_sizes == (8202, 9000, 20_000, 4)


def test_zero_size_shards_occupy_no_bytes():
  plan = _plan({"a": np.zeros(0, np.float32), "b": np.zeros(3, np.uint8),
                "c": np.zeros((4, 0), np.int16), "d": np.zeros(2, np.uint8)})
  assert [(s.nbytes, s.file, s.offset) for s in plan.shards] == [(0, 0, 0), (3, 0, 0), (0, 0, 0),
                                                                 (2, 0, 4096)]
  assert plan.file_sizes == (4098,)
  assert _plan({"a": np.zeros(0)}).file_sizes == (0,)


def test_a_plan_holds_no_arrays_and_scalars_are_filled_in_per_save(mesh):
  w = jax.device_put(jnp.ones((8, 16)), NamedSharding(mesh, P("data")))
  checked = plan_lib.check_tree({"n": np.arange(4), "step": 3, "w": w})
  plan = _plan(checked)
  seen = []

  def walk(v):
    if isinstance(v, (jax.Array, np.ndarray)):
      seen.append(v)
    elif dataclasses.is_dataclass(v) and not isinstance(v, type):
      for f in dataclasses.fields(v):
        walk(getattr(v, f.name))
    elif isinstance(v, (tuple, list, frozenset, set)):
      for e in v:
        walk(e)
    elif isinstance(v, dict):
      for e in v.items():
        walk(e)
  walk(plan)
  assert seen == []
  assert plan.leaves[1].value is None
  assert plan.leaf_metadata([np.arange(4), 11, w])[1].value == 11
  assert plan.leaves[1].value is None   # the cached plan is unchanged


def test_make_plan_checks_leaves():
  with pytest.raises(UnsupportedLeafError, match=r"\['x'\].*object"):
    _plan({"x": object()})


# The cache ---------------------------------------------------------------------

def test_plans_are_cached_by_tree_signature_and_the_options_that_shape_them(mesh):
  s = NamedSharding(mesh, P("data"))

  def tree(v):
    return {"w": jax.device_put(jnp.full((8, 16), v), s), "step": int(v)}
  first = _plan(tree(1))
  assert _plan(tree(2)) is first                      # new arrays, same signature
  checked = plan_lib.check_tree(tree(5))
  key = plan_lib.plan_key(checked, FastPersistOptions(), process_index=0, process_count=1,
                          write_host_arrays=True, placement="shared")
  assert key == checked.signature + (0, 1, True, "shared", 4 << 30, True, 2)
  assert plan_lib._PLAN_CACHE[key] is first
  # Options that do not shape the plan share it.
  assert _plan(tree(3), FastPersistOptions(snapshot="reference", queue_depth=4,
                                           copy_threads=2, staging_slab_bytes=8192)) is first
  for other in (
      _plan(tree(4), FastPersistOptions(data_file_bytes=1 << 20)),
      _plan(tree(4), FastPersistOptions(replica_parallel=False)),
      _plan(tree(4), FastPersistOptions(host_redundancy=1)),
      _plan(tree(4), placement="per_host"),
      _plan(tree(4), write_host_arrays=False),
      _plan(tree(4), process_count=2),
      _plan({"w": jax.device_put(jnp.zeros((8, 16)), NamedSharding(mesh, P("model"))), "step": 1}),
      _plan({"w": jnp.zeros((8, 16), jnp.bfloat16), "step": 1}),
      _plan({"w": jax.device_put(jnp.full((8, 16), 1.0), s), "step": 1.0}),   # scalar type
  ):
    assert other is not first


@jax.tree_util.register_pytree_node_class
class _ArrayDataNode:
  """A node whose data is a numpy array: treedefs of two of them hash alike,
  and comparing them raises."""

  def __init__(self, x, meta):
    self.x, self.meta = x, meta

  def tree_flatten(self):
    return (self.x,), self.meta

  @classmethod
  def tree_unflatten(cls, meta, children):
    return cls(children[0], meta)


def test_a_tree_that_cannot_be_compared_is_planned_every_time():
  def tree():
    return _ArrayDataNode(np.arange(3, dtype=np.int32), np.array([1, 2]))
  first_check = plan_lib.check_tree(tree())
  assert first_check.signature is not None     # nothing to compare it with yet
  cached = _plan(first_check)
  again = plan_lib.check_tree(tree())
  assert again.signature is None               # the comparison with the first raised
  assert plan_lib.plan_key(again, FastPersistOptions(), process_index=0, process_count=1,
                           write_host_arrays=True, placement="shared") is None
  first, second = _plan(again), _plan(again)
  assert first is not second and first is not cached and first == second == cached
  assert _geometry(first) == [(0, ((0, 3),), 12, 0, 0, None)]
  # A signature checked anew (evicted from check_tree's memory) whose plan
  # is still cached: the plan cache's comparison raises, and it is planned.
  plan_lib._CHECKED.clear()
  fresh = plan_lib.check_tree(tree())
  assert fresh.signature is not None
  assert _plan(fresh) == cached


# Snapshot resolution -----------------------------------------------------------

def test_auto_snapshot_is_view_on_cpu_and_copy_with_an_accelerator_leaf():
  plan = _plan({"a": np.zeros(4)})
  assert sources.resolve_snapshot("auto", plan) == "view"
  on_accel = dataclasses.replace(plan, accelerator_leaves=frozenset({0}))
  assert sources.resolve_snapshot("auto", on_accel) == "copy"
  assert sources.resolve_snapshot("reference", on_accel) == "reference"


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
