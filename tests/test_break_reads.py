"""Adversarial restores of the read path (restore.merge_reads, batches of at
most _MAX_BATCH_LEAVES leaves, chunk runs of resharding restores, the staging
pool): targets whose leaf order differs from the saved order, placeholders
and subsets, many small leaves of odd sizes and dtypes, no checksum check (so
that a misplaced read cannot hide behind a CRC error), small batches and
chunks. Every restored leaf is compared bit for bit with what was saved."""

from __future__ import annotations

import collections
import json
import os
import sys

import helpers  # pylint: disable=g-bad-import-order  (sets XLA_FLAGS before jax is imported)
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import (FastPersistHandler, FastPersistOptions, FastPersistRestore,
                             FastPersistSave)
from fastpersist_jax import restore as restore_lib

from helpers import KiB, assert_tree_bytes_equal, assert_trees_equal, mesh_2x4

_DTYPES = [np.uint8, np.bool_, jnp.bfloat16, np.float32, np.int8, np.float64]
# Byte sizes around the 4 KiB alignment the file pads shards to.
_SIZES = [0, 1, 2, 3, 7, 4095, 4096, 4097, 8191, 8192, 8193, 12289]


def _leaf(rng: np.random.Generator, dtype, nbytes: int) -> np.ndarray:
  """A 1-D array of about `nbytes` bytes of `dtype`, random bits (bool: 0/1)."""
  itemsize = np.dtype(dtype).itemsize
  n = nbytes // itemsize
  if dtype == np.bool_:
    return rng.integers(0, 2, n).astype(np.bool_)
  return np.frombuffer(rng.bytes(n * itemsize), dtype).copy()


def _place(x: np.ndarray, how: str, mesh):
  if how == "numpy":
    return x
  if x.ndim == 0:
    return jax.device_put(x, jax.sharding.SingleDeviceSharding(jax.devices()[3]))
  if how == "sharded" and x.shape[0] % 8 == 0 and x.shape[0]:
    return jax.device_put(x, NamedSharding(mesh, P(("data", "model"))))
  if how == "row" and x.shape[0] % 2 == 0 and x.shape[0]:
    return jax.device_put(x, NamedSharding(mesh, P("data")))
  return jax.device_put(x, NamedSharding(mesh, P()))


def _target_of(x, how: str, mesh):
  """A restore target for a saved leaf `x`: its own sharding ("same"), a
  different mesh / device order ("reshard"), or numpy ("numpy")."""
  if isinstance(x, np.ndarray) or how == "numpy":
    return np.zeros(x.shape, x.dtype) if how == "numpy" else jax.ShapeDtypeStruct(x.shape, x.dtype)
  if how == "reshard" and x.ndim and x.shape[0] % 4 == 0 and x.shape[0]:
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P("data")))
  if how == "reshard":
    return jax.ShapeDtypeStruct(
        x.shape, x.dtype, sharding=jax.sharding.SingleDeviceSharding(jax.devices()[5]))
  return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)


def _stage_on_cpu(monkeypatch, on: bool) -> None:
  monkeypatch.setattr(restore_lib, "_STAGE_ON_CPU", on)


# BREAK_EXAMPLES=400 searches longer (about 20 s); 6 keep the suite fast and
# still find merge_reads without its "no other read in the gap" check.
@settings(max_examples=int(os.environ.get("BREAK_EXAMPLES", "6")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(seed=st.integers(0, 2**31), n=st.integers(1, 80),
       order=st.sampled_from(["sorted", "reversed", "shuffled"]),
       skip=st.floats(0, 0.5), target_how=st.sampled_from(["same", "reshard", "numpy", "mixed"]),
       batch=st.sampled_from([4 * KiB, 16 * KiB, 1 << 30]),
       chunk=st.sampled_from([4 * KiB, 8 * KiB]),
       staged=st.booleans(), max_leaves=st.sampled_from([3, 1024]))
def test_restores_every_leaf_exactly_whatever_the_target_order_and_options(
    tmp_path_factory, monkeypatch, seed, n, order, skip, target_how, batch, chunk, staged,
    max_leaves):
  rng = np.random.default_rng(seed)
  mesh = mesh_2x4()
  other = jax.sharding.Mesh(np.array(jax.devices())[::-1].reshape(4, 2), ("data", "model"))
  names = [f"k{i:03d}" for i in range(n)]
  saved = {}
  for name in names:
    dtype = _DTYPES[rng.integers(len(_DTYPES))]
    nbytes = int(_SIZES[rng.integers(len(_SIZES))]) * int(rng.integers(1, 3))
    x = _leaf(rng, dtype, nbytes)
    shape_kind = rng.integers(4)
    if shape_kind == 1 and x.size % 8 == 0 and x.size:
      x = x.reshape(8, -1)   # rows: sharded along the first axis
    elif shape_kind == 2 and x.size:
      x = x[:1].reshape(())   # a 0-d array
    elif shape_kind == 3 and not x.size:
      x = x.reshape(0, 3)
    saved[name] = _place(x, ["numpy", "sharded", "row", "repl"][rng.integers(4)], mesh)
  options = FastPersistOptions(verify_checksums=False, crc_chunk_bytes=chunk,
                               restore_batch_bytes=batch, staging_slab_bytes=64 * KiB,
                               host_memory_limit=256 * KiB)
  _stage_on_cpu(monkeypatch, staged)
  monkeypatch.setattr(restore_lib, "_MAX_BATCH_LEAVES", max_leaves)
  path = tmp_path_factory.mktemp("ckpt") / "c"
  h = FastPersistHandler(options)
  h.save(path, args=FastPersistSave(saved))
  fields = list(names)
  if order == "reversed":
    fields.reverse()
  elif order == "shuffled":
    rng.shuffle(fields)
  skipped = {f for f in fields if rng.random() < skip}
  dropped = {f for f in fields if f not in skipped and rng.random() < skip / 2}
  fields = [f for f in fields if f not in dropped]   # a partial target: a subset of the leaves
  hows = {f: (["same", "reshard", "numpy"][rng.integers(3)] if target_how == "mixed" else target_how)
          for f in fields}
  Target = collections.namedtuple("Target", fields)
  target = Target(**{f: (... if f in skipped else _target_of(saved[f], hows[f], other))
                     for f in fields})
  for _ in range(2):   # the same handler twice
    out = h.restore(path, args=FastPersistRestore(target))
    for f in fields:
      got = getattr(out, f)
      if f in skipped:
        assert got is ..., f
        continue
      assert_tree_bytes_equal(saved[f], got)
      if hows[f] == "numpy":
        assert isinstance(got, np.ndarray), (f, type(got))
      elif isinstance(saved[f], jax.Array):
        assert isinstance(got, jax.Array), (f, type(got))


def test_many_small_leaves_of_mixed_sizes_restore_exactly_in_reverse_order(tmp_path, monkeypatch):
  # 1,500 leaves (more than a batch holds) of 0 .. 4097 bytes, restored into
  # a target of the reverse order, unchecked, once fresh and once staged.
  rng = np.random.default_rng(7)
  mesh = mesh_2x4()
  names = [f"l{i:04d}" for i in range(1500)]
  saved = {}
  for i, name in enumerate(names):
    dtype = _DTYPES[i % len(_DTYPES)]
    x = _leaf(rng, dtype, [0, 1, 4095, 4096, 4097, 17][i % 6])
    saved[name] = jax.device_put(x, NamedSharding(mesh, P())) if i % 3 else x
  h = FastPersistHandler(FastPersistOptions(verify_checksums=False, staging_slab_bytes=256 * KiB,
                                            host_memory_limit=1024 * KiB))
  h.save(tmp_path / "c", args=FastPersistSave(saved))
  Target = collections.namedtuple("Target", names[::-1])
  target = Target(**{k: (jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=v.sharding)
                         if isinstance(v, jax.Array) else v) for k, v in saved.items()})
  for staged in (False, True):
    _stage_on_cpu(monkeypatch, staged)
    out = h.restore(tmp_path / "c", args=FastPersistRestore(target))
    assert_trees_equal(dict(saved), dict(out._asdict()))


@pytest.mark.parametrize("staged", [False, True])
def test_int4_and_typed_keys_restore_exactly_in_reverse_order(tmp_path, monkeypatch, staged):
  _stage_on_cpu(monkeypatch, staged)
  mesh = mesh_2x4()
  rng = np.random.default_rng(3)
  saved = {
      "a_keys": jax.random.split(jax.random.key(1), 8),
      "b_i4": jax.device_put(jnp.asarray(rng.integers(-8, 8, 4097), jnp.int4),
                             NamedSharding(mesh, P())),
      "c_u4": jnp.asarray(rng.integers(0, 16, (8, 3)), jnp.uint4),
      "d_bf16": jax.device_put(jnp.asarray(rng.standard_normal(2056), jnp.bfloat16),
                               NamedSharding(mesh, P(("data", "model")))),
      "e_keys": jax.device_put(jax.random.split(jax.random.key(2, impl="rbg"), 8),
                               NamedSharding(mesh, P("data"))),
  }
  h = FastPersistHandler(FastPersistOptions(verify_checksums=False, crc_chunk_bytes=4 * KiB,
                                            staging_slab_bytes=64 * KiB,
                                            host_memory_limit=128 * KiB,
                                            restore_batch_bytes=8 * KiB))
  h.save(tmp_path / "c", args=FastPersistSave(saved))
  names = sorted(saved)[::-1]
  Target = collections.namedtuple("Target", names)
  other = jax.sharding.Mesh(np.array(jax.devices())[::-1].reshape(4, 2), ("data", "model"))
  target = Target(**{
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=NamedSharding(other, P("data"))
                              if v.shape[0] % 4 == 0 else v.sharding)
      for k, v in saved.items()})
  for _ in range(2):
    out = h.restore(tmp_path / "c", args=FastPersistRestore(target))
    assert_tree_bytes_equal(dict(saved), dict(out._asdict()))


# Multi-process: chunk runs of a resharding restore ---------------------------

THIS = os.path.abspath(__file__)


def test_partial_chunk_reads_of_many_leaves_restore_exactly_in_another_order(tmp_path):
  # Each process needs part of each saved row block (chunk runs of 4 KiB,
  # merged where neighbours), unchecked, into a target of shuffled order;
  # without, then with, staging on the CPU (both in one launch).
  p0, p1 = helpers.run_scenario(THIS, "chunk_runs", tmp_path, timeout=120)
  for staged in ("0", "1"):
    assert p0[staged] == p1[staged] == {"ok": True, "partial": True}, (staged, p0, p1)


def _worker(scenario: str, pid: int, nproc: int, port: int, root: str) -> None:
  """One process of the multi-process test above; prints "RESULT <json>":
  the outcome of the scenario ("chunk_runs") without ("0") and with ("1")
  staging on the CPU, each saved in root/0 and root/1."""
  assert scenario == "chunk_runs", scenario
  helpers.init_distributed(pid, nproc, port)
  result = {}
  for staged in ("0", "1"):
    restore_lib._STAGE_ON_CPU = staged == "1"
    result[staged] = _chunk_runs(os.path.join(root, staged))
  print("RESULT " + json.dumps(result), flush=True)
  jax.distributed.shutdown()


def _chunk_runs(root: str) -> dict:
  """Saves 40 leaves in root, restores them twice resharded; returns
  {"ok": every byte right, "partial": fewer bytes read than saved}
  (with "bad": the first wrong shards)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  devices = jax.devices()
  mesh = jax.make_mesh((2, 2), ("rows", "cols"), devices=devices)
  order = [devices[i] for i in (0, 2, 1, 3)]
  target_mesh = jax.make_mesh((4,), ("rows",), devices=order)
  rng = np.random.default_rng(11)
  hosts = {}
  dtypes = [np.int32 if d == np.float64 else d for d in _DTYPES]
  for i in range(40):
    dtype = dtypes[i % len(dtypes)]
    cols = [1, 3, 1024, 1025, 2048, 4097, 513][i % 7] // np.dtype(dtype).itemsize or 1
    rows = [4, 8, 12, 16, 36][i % 5]
    hosts[f"k{i:02d}"] = _leaf(rng, dtype, rows * cols * np.dtype(dtype).itemsize).reshape(
        rows, cols)
  # Odd leaves whose columns divide by 4: saved in 2 x 2 blocks, restored in
  # column blocks (each process needs a strided part of each block: the
  # chunk runs hold a superset); the others in row blocks.
  def blocks(i, h):
    return i % 2 and h.shape[1] % 4 == 0
  saved = {k: jax.make_array_from_callback(
      h.shape, NamedSharding(mesh, P("rows", "cols") if blocks(i, h) else P("rows")),
      lambda idx, h=h: h[idx]) for i, (k, h) in enumerate(sorted(hosts.items()))}
  options = FastPersistOptions(verify_checksums=False, crc_chunk_bytes=4 * KiB,
                               restore_batch_bytes=32 * KiB, staging_slab_bytes=64 * KiB,
                               host_memory_limit=256 * KiB)
  handler = FastPersistHandler(options)
  with ocp.CheckpointManager(root, item_handlers=handler) as mngr:
    mngr.save(0, args=FastPersistSave(saved))
    mngr.wait_until_finished()
  names = list(np.random.default_rng(5).permutation(sorted(hosts)))
  Target = collections.namedtuple("Target", names)
  target = Target(**{k: jax.ShapeDtypeStruct(
      h.shape, h.dtype,
      sharding=NamedSharding(target_mesh, P(None, "rows") if blocks(i, h) else P("rows")))
                     for i, (k, h) in enumerate(sorted(hosts.items()))})
  bad = []
  with ocp.CheckpointManager(root, item_handlers=handler) as mngr:
    for _ in range(2):
      restored = mngr.restore(0, args=FastPersistRestore(target))
      stats = handler.last_restore_stats
      for k in names:
        for shard in getattr(restored, k).addressable_shards:
          got, want = np.asarray(shard.data), hosts[k][shard.index]
          if got.tobytes() != want.tobytes():
            bad.append(f"{k} {shard.index}")
  total = sum(h.nbytes for h in hosts.values())
  result = {"ok": not bad, "partial": stats["bytes"] < total}
  if bad:
    result["bad"] = bad[:5]
  return result


if __name__ == "__main__":
  if sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
  else:   # Bazel py_test runs the file itself
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
