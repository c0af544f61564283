"""Break tests for the restore planning fast paths (commits d67daf9, 5aba11b):
restore.merge_reads without its sort and gap check when file and buffer
orders agree, restore_plan.plan_leaf for one saved shard and one target
device, restore._device_pieces for one device, the per-batch device lists of
restore._build_batch, and disk_format.check_shard_tiling checked with one
sort (compared with the implementation before it)."""

from __future__ import annotations

import json
import sys

from helpers import KiB, mesh_2x4  # pylint: disable=g-bad-import-order  (sets XLA_FLAGS before jax is imported)
import jax
import jax.numpy as jnp
import crc32c
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding

from fastpersist_jax import (FastPersistHandler, FastPersistOptions, FastPersistRestore,
                             FastPersistSave, disk_format, restore, restore_plan)
from fastpersist_jax.disk_format import LeafMeta, ShardRecord
from fastpersist_jax.errors import CorruptCheckpointError, FastPersistError


# merge_reads ------------------------------------------------------------------

class _File:
  def __init__(self, path: str):
    self.path = path


_FILES = [_File("a"), _File("b"), _File("c")]


def _check_merged(reads, merged) -> None:
  """The merged reads put every byte of `reads` where they do (same file,
  same file -> buffer mapping) and write no buffer byte that a read of other
  bytes writes (reads complete in any order); they do not overlap."""
  for f, offset, start, n in reads:
    if not n:
      continue
    covering = [m for m in merged if m[0] is f and m[1] <= offset and offset + n <= m[1] + m[3]
                and m[2] - m[1] == start - offset]
    assert covering, ((f.path, offset, start, n), [(m[0].path,) + m[1:] for m in merged])
  for mf, moffset, mstart, mn in merged:
    for f, offset, start, n in reads:
      if not n or not mn:   # an empty read writes nothing
        continue
      inside = (f is mf and moffset <= offset and offset + n <= moffset + mn and
                start - offset == mstart - moffset)
      disjoint = start + n <= mstart or mstart + mn <= start
      assert inside or disjoint, ((f.path, offset, start, n), (mf.path, moffset, mstart, mn))
  spans = sorted((m[2], m[2] + m[3]) for m in merged if m[3])
  for (_, a1), (b0, _) in zip(spans, spans[1:]):
    assert a1 <= b0, spans


@st.composite
def _read_lists(draw, min_bytes: int):
  """Reads of up to 3 files (offsets may be equal or overlap in a file),
  disjoint in the buffer, laid out in the buffer in file order with gaps
  that often equal the file's (so they merge), listed in that order, in
  the opposite order, shuffled, or in that order but one element."""
  n = draw(st.integers(0, 10))
  specs = [(draw(st.integers(0, 2)), draw(st.integers(0, 12)) * 512,
            draw(st.sampled_from([min_bytes, 1, 100, 512, 4096, 5000]))) for _ in range(n)]
  file_order = draw(st.permutations([0, 1, 2]))
  specs.sort(key=lambda s: (file_order.index(s[0]), s[1]))
  reads, end, prev = [], 0, None
  for f, offset, nbytes in specs:
    gap = draw(st.sampled_from(["file", 0, 512, 70000]))
    start = end + (gap if gap != "file" else 0)
    if gap == "file" and prev is not None and prev[0] == f and offset >= prev[1] + prev[2]:
      start = prev[3] + (offset - prev[1])   # the file's gap: a merge candidate
    start = max(start, end)
    if not nbytes and draw(st.booleans()):
      start = draw(st.integers(0, end))   # an empty read may lie inside another's range
    reads.append((_FILES[f], offset, start, nbytes))
    end = max(end, start + nbytes)
    prev = (f, offset, nbytes, start)
  order = draw(st.sampled_from(["agree", "reversed", "shuffled", "one_moved"]))
  if order == "reversed":
    reads.reverse()
  elif order == "shuffled":
    reads = draw(st.permutations(reads))
  elif order == "one_moved" and len(reads) > 1:
    i, j = draw(st.integers(0, len(reads) - 1)), draw(st.integers(0, len(reads) - 1))
    reads.insert(j, reads.pop(i))
  return list(reads)


@settings(max_examples=300, deadline=None, derandomize=True)
@given(_read_lists(min_bytes=1))
def test_merged_reads_put_every_byte_where_the_reads_do_in_any_order(reads):
  _check_merged(reads, restore.merge_reads(reads))


def test_merge_reads_interleaved_files_and_one_read_out_of_order():
  a, b = _FILES[0], _FILES[1]
  # Files interleaved in the buffer: a's neighbours are not b's.
  reads = [(a, 0, 0, 4096), (b, 0, 4096, 4096), (a, 4096, 8192, 4096)]
  assert restore.merge_reads(reads) == [(a, 0, 0, 4096), (a, 4096, 8192, 4096), (b, 0, 4096, 4096)]
  # File order agrees except one read, listed first: it lies in the gap.
  reads = [(a, 8192, 8192, 100), (a, 0, 0, 100), (a, 4096, 4096, 100)]
  merged = restore.merge_reads(reads)
  _check_merged(reads, merged)
  assert merged == [(a, 0, 0, 8292)]
  # Equal offsets read twice into two places.
  reads = [(a, 0, 0, 512), (a, 0, 512, 512)]
  _check_merged(reads, restore.merge_reads(reads))


def test_merge_reads_does_not_merge_across_a_zero_length_read_inside_another():
  # (Found as a bug: the agreeing-order fast path took the empty read for a
  # boundary and merged a's reads over b's bytes. Empty reads are dropped.)
  a, b = _FILES[0], _FILES[1]
  # b's read fills buffer [0, 8192); a's empty read sits at 4096 (inside it,
  # overlapping nothing); a's next read lies at the file's gap from it.
  reads = [(b, 0, 0, 8192), (a, 0, 4096, 0), (a, 8192, 12288, 4096)]
  _check_merged(reads, restore.merge_reads(reads))


@settings(max_examples=200, deadline=None, derandomize=True)
@given(_read_lists(min_bytes=0))
def test_merged_reads_with_empty_reads_hold_in_any_order(reads):
  _check_merged(reads, restore.merge_reads(reads))
  _check_merged(reads[::-1], restore.merge_reads(reads[::-1]))


def test_merge_reads_zero_length_read_in_the_sorted_path_holds():
  a, b = _FILES[0], _FILES[1]
  reads = [(a, 8192, 12288, 4096), (a, 0, 4096, 0), (b, 0, 0, 8192)]   # not in file order
  _check_merged(reads, restore.merge_reads(reads))


# check_shard_tiling against the implementation before d67daf9 ----------------

def _old_check_shard_tiling(shards, files, what):
  """disk_format.check_shard_tiling as of 4d7e698 (the reference)."""
  by_leaf, by_file = {}, {}
  for s in shards:
    if s.nbytes == 0 or any(a == b for a, b in s.index):
      continue
    by_leaf.setdefault(s.leaf, []).append(s)
    by_file.setdefault(s.file, []).append(s)
  for leaf_id, group in by_leaf.items():
    if len(group) == 1:
      continue
    disk_format.check_grid([s.index for s in group], f"{what}: shards of leaf {leaf_id}")
    if len({(s.index, s.part) for s in group}) != len(group):
      raise CorruptCheckpointError(f"{what}: leaf {leaf_id} has the same shard more than once")
  if files is None:
    return
  for file_id, group in by_file.items():
    group.sort(key=lambda s: s.offset)
    for a, b in zip(group, group[1:]):
      if b.offset < a.offset + a.nbytes:
        raise CorruptCheckpointError(
            f"{what}: shards at offsets {a.offset} and {b.offset} of {files[file_id][0]} overlap")


_RANGES = [(0, 4), (4, 8), (0, 8), (2, 6), (4, 4), (0, 0), (6, 8), (4, 6)]


@st.composite
def _records(draw):
  """Validated-looking records (nbytes = the index's, or its part's, bytes;
  itemsize 4) of 3 leaves of shape (8, 8) in 3 files: grid and non-grid
  cells, empty regions and parts, repeats, file ranges that may overlap."""
  out = []
  for _ in range(draw(st.integers(0, 9))):
    index = (draw(st.sampled_from(_RANGES)), draw(st.sampled_from(_RANGES)))
    full = restore_plan.volume(index) * 4
    part = None
    if draw(st.booleans()) and full:
      lo = draw(st.integers(0, full))
      part = (lo, draw(st.integers(lo, full)))
    nbytes = full if part is None else part[1] - part[0]
    out.append(ShardRecord(draw(st.integers(0, 2)), index, draw(st.integers(0, 2)),
                           draw(st.integers(0, 6)) * 64, nbytes, 0, part))
  if out and draw(st.booleans()):
    out.append(out[draw(st.integers(0, len(out) - 1))])   # a repeat
  return out


def _outcome(fn, *args):
  try:
    fn(*args)
    return None
  except CorruptCheckpointError as e:
    return "overlap" if "offsets" in str(e) else "shards"


@settings(max_examples=600, deadline=None, derandomize=True)
@given(_records())
def test_check_shard_tiling_refuses_what_the_previous_implementation_refused(records):
  files = [("data.00000.0000.bin", 1 << 20), ("data.00000.0001.bin", 1 << 20),
           ("data.00000.0002.bin", 1 << 20)]
  for fs in (files, None):
    old = _outcome(_old_check_shard_tiling, list(records), fs, "m")
    new = _outcome(disk_format.check_shard_tiling, list(records), fs, "m")
    # The same verdict; where both refuse, for the same kind of fault (the
    # leaf checks run first in both).
    assert old == new, (records, fs, old, new)


def test_check_shard_tiling_names_overlaps_across_files_and_leaves():
  files = [("data.00000.0000.bin", 1 << 20), ("data.00000.0001.bin", 1 << 20)]
  ok = [ShardRecord(0, ((0, 4),), 0, 0, 16, 0), ShardRecord(1, ((0, 4),), 1, 0, 16, 0),
        ShardRecord(2, ((0, 4),), 0, 4096, 16, 0)]
  disk_format.check_shard_tiling(ok, files, "m")
  bad = ok + [ShardRecord(3, ((0, 8),), 1, 8, 32, 0)]   # another leaf, inside leaf 1's bytes
  with pytest.raises(CorruptCheckpointError, match="offsets 0 and 8 of data.00000.0001.bin"):
    disk_format.check_shard_tiling(bad, files, "m")


@pytest.mark.parametrize("version", [2, 3])
@pytest.mark.parametrize("record", [
    {}, {"path": None}, {"path": "x"}, {"path": [["d"]]}, {"path": [["zz", 1]]}, [1, 2], None, 5])
def test_metadata_leaf_path_errors_name_the_leaf_and_file(version, record):
  fields = {"kind": "array", "dtype": "float32", "shape": [2], "sharding": None}
  first = {"path": [["d", "a"]], **({"array": 0} if version == 3 else fields)}
  if isinstance(record, dict):   # the second leaf shares the first one's fields
    record = {**record, **({"array": 0} if version == 3 else fields)}
  doc = {"format": "fastpersist", "version": version, "process_count": 1,
         "leaves": [first, record]}
  if version == 3:
    doc["arrays"] = [fields]
  doc = json.loads(disk_format.seal(doc))
  with pytest.raises(CorruptCheckpointError, match=r"^/ck/fastpersist.json: metadata leaf 1: "):
    disk_format.decode_metadata(doc, "/ck/fastpersist.json")


def test_overlapping_file_bytes_of_two_leaves_refused_by_verify_and_restore(tmp_path, capsys):
  from fastpersist_jax import __main__ as entry  # pylint: disable=g-import-not-at-top
  tree = {"a": np.arange(2048, dtype=np.float32), "b": np.arange(1024, dtype=np.int32)}
  with ocp.CheckpointManager(tmp_path / "c", item_handlers=FastPersistHandler()) as mngr:
    mngr.save(0, args=FastPersistSave(tree))
    mngr.wait_until_finished()
  item = tmp_path / "c" / "0" / "default"
  man_path = item / disk_format.manifest_name(0)
  man = json.loads(man_path.read_text())
  a, b = man["shards"]
  b["offset"] = a["offset"] + 4096   # b's 4 KiB now inside a's 8 KiB
  man_path.write_bytes(disk_format.seal({k: v for k, v in man.items() if k != "crc32c"}))
  entry.FLAGS.unparse_flags()
  entry.FLAGS(["fastpersist_jax"])
  capsys.readouterr()
  rc = entry.main(["fastpersist_jax", "verify", str(item)])
  out, _ = capsys.readouterr()
  assert rc == 1 and "overlap" in out and "manifest.00000.json" in out, out
  with pytest.raises(CorruptCheckpointError, match="overlap"):
    FastPersistHandler().restore(item, args=FastPersistRestore({"b": np.zeros(1024, np.int32)}))


# plan_leaf: one saved shard, one target device --------------------------------

@pytest.mark.parametrize("target", ["numpy", "one_device", "none"])
def test_plan_leaf_one_shard_fast_path_still_refuses_missing_bytes(target):
  meta = LeafMeta([{"k": "x"}], "array", "float32", (4, 4), None)
  full = ((0, 4), (0, 4))
  rec = ShardRecord(0, full, 0, 0, 32, 0, (0, 32))
  shard = restore_plan.assemble_parts("x", full, 64, [(1, rec)])
  assert shard.missing
  t = {"numpy": np.zeros((4, 4), np.float32),
       "one_device": jax.ShapeDtypeStruct((4, 4), np.float32,
                                          sharding=SingleDeviceSharding(jax.devices()[2])),
       "none": None}[target]
  with pytest.raises(CorruptCheckpointError, match=r"only bytes \[0, 32\) of 64 .*hint"):
    restore_plan.plan_leaf(0, meta, t, [shard], [], "hint")


# End to end: restores through the fast paths come back bit-exact ----------------

def _expected(x, dtype=None):
  a = np.asarray(jax.random.key_data(x)) if restore_plan.jax.dtypes.issubdtype(
      x.dtype, jax.dtypes.prng_key) else np.asarray(x)
  return a if dtype is None else a.astype(dtype)


def _assert_bits(want: np.ndarray, got) -> None:
  g = np.asarray(got)
  assert g.dtype == want.dtype and g.shape == want.shape, (g.dtype, g.shape, want.dtype, want.shape)
  assert g.tobytes() == want.tobytes()


@pytest.mark.parametrize("staged", [False, True])
def test_restores_onto_every_kind_of_target_bit_exact(tmp_path, monkeypatch, staged):
  monkeypatch.setattr(restore, "_STAGE_ON_CPU", staged)
  mesh = mesh_2x4()
  devs = jax.devices()
  rng = np.random.default_rng(7)
  f32 = rng.standard_normal((8, 8)).astype(np.float32)
  f32[0, 0] = np.nan
  i32 = rng.integers(-2**31, 2**31, (8, 4)).astype(np.int32)
  u8 = rng.integers(0, 256, (5, 3)).astype(np.uint8)
  tree = {
      "repl": jax.device_put(f32, NamedSharding(mesh, P())),           # one saved shard
      "rows": jax.device_put(i32, NamedSharding(mesh, P("data"))),
      "one": jax.device_put(u8, SingleDeviceSharding(devs[6])),
      "bf": jax.device_put(jnp.asarray(f32, jnp.bfloat16), NamedSharding(mesh, P(None, "model"))),
      "key": jax.device_put(jax.random.key(3, impl="rbg"), SingleDeviceSharding(devs[1])),
      "keys": jax.random.split(jax.random.key(5), 8),
      "np": u8.copy(),
  }
  path = tmp_path / "c"
  options = FastPersistOptions(restore_batch_bytes=16 * KiB, staging_slab_bytes=64 * KiB,
                               host_memory_limit=256 * KiB)
  h = FastPersistHandler(options)
  h.save(path, args=FastPersistSave(tree))
  pinned = lambda s: s.with_memory_kind("pinned_host")   # pylint: disable=unnecessary-lambda-assignment
  sds = jax.ShapeDtypeStruct
  cases = {  # name: (target leaf for a saved leaf, saved leaf, cast dtype or None)
      "repl_one_device": (sds((8, 8), np.float32, sharding=SingleDeviceSharding(devs[4])),
                          "repl", None),
      "repl_replicated": (sds((8, 8), np.float32, sharding=NamedSharding(mesh, P())), "repl", None),
      "repl_rows_bf16": (sds((8, 8), jnp.bfloat16, sharding=NamedSharding(mesh, P("data"))),
                         "repl", jnp.bfloat16),
      "repl_pinned": (sds((8, 8), np.float32,
                          sharding=pinned(SingleDeviceSharding(devs[0]))), "repl", None),
      "repl_numpy_i8": (np.zeros((8, 8), np.int8), "repl", None),
      "rows_one_device_f32": (sds((8, 4), np.float32, sharding=SingleDeviceSharding(devs[7])),
                              "rows", np.float32),
      "rows_pinned_repl": (sds((8, 4), np.int32, sharding=pinned(NamedSharding(mesh, P()))),
                           "rows", None),
      "rows_cols": (sds((8, 4), np.int32, sharding=NamedSharding(mesh, P(None, "model"))),
                    "rows", None),
      "one_same": (sds((5, 3), np.uint8, sharding=SingleDeviceSharding(devs[6])), "one", None),
      "one_cast_i32": (sds((5, 3), np.int32, sharding=SingleDeviceSharding(devs[6])),
                       "one", np.int32),
      "one_replicated": (sds((5, 3), np.uint8, sharding=NamedSharding(mesh, P())), "one", None),
      "bf_f32_pinned": (sds((8, 8), np.float32,
                            sharding=pinned(NamedSharding(mesh, P(None, "model")))),
                        "bf", np.float32),
      "key_same": (sds((), tree["key"].dtype, sharding=SingleDeviceSharding(devs[1])), "key", None),
      "key_moved": (sds((), tree["key"].dtype, sharding=SingleDeviceSharding(devs[5])),
                    "key", None),
      "key_data": (sds((4,), np.uint32, sharding=SingleDeviceSharding(devs[1])), "key", None),
      "keys_repl": (sds((8,), tree["keys"].dtype, sharding=NamedSharding(mesh, P())),
                    "keys", None),
      "np_one_device": (sds((5, 3), np.uint8, sharding=SingleDeviceSharding(devs[2])), "np", None),
      "np_pinned_f32": (sds((5, 3), np.float32, sharding=pinned(SingleDeviceSharding(devs[3]))),
                        "np", np.float32),
      "np_numpy": (np.zeros((5, 3), np.uint8), "np", None),
  }
  # Every case is restored in one batch with the others, and each alone.
  for names in [list(cases)] + [[n] for n in cases]:
    # One target per saved leaf: pick, for each saved leaf, the cases of this round.
    rounds: dict[str, list[str]] = {}
    for n in names:
      rounds.setdefault(cases[n][1], []).append(n)
    while any(rounds.values()):
      chosen = {leaf: ns.pop() for leaf, ns in rounds.items() if ns}
      target = {leaf: cases[n][0] for leaf, n in chosen.items()}
      out = h.restore(path, args=FastPersistRestore(target))
      for leaf, n in chosen.items():
        t, _, cast = cases[n]
        got = out[leaf]
        if n.startswith("key") and n != "key_data":
          assert jax.random.key_impl(got) == jax.random.key_impl(tree[leaf]), n
          got = jax.random.key_data(got)
        want = _expected(tree[leaf], cast if cast is not None else None)
        if n == "repl_numpy_i8":
          want = _expected(tree[leaf], np.int8)
        _assert_bits(want, got)
        if isinstance(t, jax.ShapeDtypeStruct):
          assert isinstance(got, jax.Array), n
          assert got.sharding.memory_kind == t.sharding.memory_kind, n
          assert got.sharding.is_equivalent_to(t.sharding, got.ndim), n
        else:
          assert isinstance(got, np.ndarray), n


@pytest.mark.parametrize("staged", [False, True])
def test_many_leaves_of_many_layouts_in_one_batch_land_on_their_devices(tmp_path, monkeypatch,
                                                                        staged):
  # Leaves of 10 layouts interleaved in one batch: each layout's device list
  # is looked up once per batch (by the identity of its device_indices).
  monkeypatch.setattr(restore, "_STAGE_ON_CPU", staged)
  mesh = mesh_2x4()
  devs = jax.devices()
  rng = np.random.default_rng(11)
  layouts = ([SingleDeviceSharding(d) for d in devs] + [NamedSharding(mesh, P()),
                                                        NamedSharding(mesh, P("data"))])
  tree, target = {}, {}
  for i in range(40):
    shape, dtype = [((4, 2), np.float32), ((), np.int32), ((0, 3), np.float32),
                    ((2,), jnp.bfloat16)][i % 4]
    x = np.frombuffer(rng.bytes(int(np.prod(shape)) * np.dtype(dtype).itemsize),
                      dtype).reshape(shape)
    saved = layouts[i % len(layouts)] if len(shape) else SingleDeviceSharding(devs[i % 8])
    tree[f"l{i:02d}"] = jax.device_put(x, saved if shape != (2,) or i % 3 else
                                       SingleDeviceSharding(devs[0]))
    want = layouts[(i * 7 + 3) % len(layouts)] if len(shape) == 2 else SingleDeviceSharding(
        devs[(i * 5) % 8])
    target[f"l{i:02d}"] = jax.ShapeDtypeStruct(shape, dtype, sharding=want)
  path = tmp_path / "c"
  h = FastPersistHandler()
  h.save(path, args=FastPersistSave(tree))
  out = h.restore(path, args=FastPersistRestore(target))
  for k, t in target.items():
    _assert_bits(np.asarray(tree[k]), out[k])
    assert out[k].sharding.is_equivalent_to(t.sharding, out[k].ndim), (k, out[k].sharding, t.sharding)
    assert out[k].sharding.device_set == t.sharding.device_set, k


@pytest.mark.parametrize("target", ["same", "numpy", "replicated", "moved", "none"])
def test_restore_of_a_shard_with_bytes_no_part_holds_names_the_leaf(tmp_path, target):
  # The manifest holds only the first half of w's one shard (as a per-host
  # checkpoint's host may): a target needing it must be refused, naming w.
  dev = jax.devices()[2]
  x = jax.device_put(np.arange(4096, dtype=np.float32), SingleDeviceSharding(dev))
  path = tmp_path / "c"
  h = FastPersistHandler()
  h.save(path, args=FastPersistSave({"w": x, "v": np.ones(3, np.int8)}))
  man_path = path / disk_format.manifest_name(0)
  man = json.loads(man_path.read_text())
  (rec,) = [r for r in man["shards"] if r["nbytes"] == 16384]
  data = (path / man["files"][rec["file"]]["name"]).read_bytes()
  rec.update(part=[0, 8192], nbytes=8192,
             crc32c=crc32c.crc32c(data[rec["offset"]:rec["offset"] + 8192]))
  rec.pop("chunk_crc32c", None)
  man_path.write_bytes(disk_format.seal({k: v for k, v in man.items() if k != "crc32c"}))
  mesh = mesh_2x4()
  t = {"same": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding),
       "numpy": np.zeros(4096, np.float32),
       "replicated": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh, P())),
       "moved": jax.ShapeDtypeStruct(x.shape, np.int32,
                                     sharding=SingleDeviceSharding(jax.devices()[5])),
       "none": None}[target]
  if t is None:   # a None target leaf is not restored, so its missing bytes are never needed
    out = h.restore(path, args=FastPersistRestore({"w": t, "v": np.zeros(3, np.int8)}))
    assert out["w"] is None
  else:
    with pytest.raises(CorruptCheckpointError, match=r"leaf \['w'\].*only bytes \[0, 8192\)"):
      h.restore(path, args=FastPersistRestore({"w": t, "v": np.zeros(3, np.int8)}))
  # v alone restores.
  out = h.restore(path, args=FastPersistRestore({"v": np.zeros(3, np.int8)}))
  _assert_bits(np.ones(3, np.int8), out["v"])


@pytest.mark.parametrize("staged", [False, True])
def test_a_two_process_checkpoint_of_parts_restores_onto_one_process_bit_exact(
    two_process_checkpoint, monkeypatch, staged):
  # tests/mp_worker.py's global_state, saved by 2 processes each writing a
  # part of every replicated shard: one saved shard in parts from 2 files.
  monkeypatch.setattr(restore, "_STAGE_ON_CPU", staged)
  mesh = mesh_2x4()
  devs = jax.devices()

  def host(shape, dtype, seed):
    return ((np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * 7 + seed) % 251
            ).astype(dtype)

  w, b, emb = host((64, 512), np.float32, 1), host((512,), np.int32, 3), host((256, 128), np.float32, 2)
  sds = jax.ShapeDtypeStruct
  cases = [
      (sds(b.shape, np.int32, sharding=SingleDeviceSharding(devs[3])), b, "b"),
      (sds(b.shape, np.int32, sharding=NamedSharding(mesh, P())), b, "b"),
      (sds(b.shape, np.float32, sharding=SingleDeviceSharding(devs[0]).with_memory_kind(
          "pinned_host")), b.astype(np.float32), "b"),
      (np.zeros(b.shape, np.int16), b.astype(np.int16), "b"),
      (sds(w.shape, jnp.bfloat16, sharding=SingleDeviceSharding(devs[7])),
       w.astype(jnp.bfloat16), "w"),
      (sds(w.shape, np.float32, sharding=NamedSharding(mesh, P("data", "model"))), w, "w"),
      (sds(emb.shape, np.float32, sharding=NamedSharding(mesh, P())), emb, "emb"),
  ]
  item = two_process_checkpoint / "0" / "default"
  parts = [r for p in range(2)
           for r in json.loads((item / disk_format.manifest_name(p)).read_text())["shards"]
           if "part" in r]
  assert len({tuple(r["index"][0]) for r in parts if len(r["index"]) == 1}) == 1, parts  # b's shard
  h = FastPersistHandler()
  for t, want, name in cases:
    tree = {"params": {"w": t if name == "w" else ..., "b": t if name == "b" else ...},
            "opt": {"emb": t if name == "emb" else ...}, "step": 0, "rng": ...}
    out = h.restore(item, args=FastPersistRestore(tree))
    got = out["opt"]["emb"] if name == "emb" else out["params"][name]
    _assert_bits(want, got)
    if isinstance(t, jax.ShapeDtypeStruct):
      assert got.sharding.is_equivalent_to(t.sharding, got.ndim), (name, got.sharding)
      assert got.sharding.memory_kind == t.sharding.memory_kind


def test_restore_of_a_leaf_whose_shard_is_cut_short_names_the_leaf(tmp_path):
  # One saved shard, one target device (the fast paths): the data file cut.
  x = jax.device_put(np.arange(4096, dtype=np.float32), SingleDeviceSharding(jax.devices()[0]))
  path = tmp_path / "c"
  h = FastPersistHandler()
  h.save(path, args=FastPersistSave({"w": x}))
  data = sorted(path.glob("data.*.bin"))[0]
  raw = bytearray(data.read_bytes())
  raw[100] ^= 0xFF
  data.write_bytes(bytes(raw))
  with pytest.raises(FastPersistError, match="w"):
    h.restore(path, args=FastPersistRestore({"w": jax.ShapeDtypeStruct(x.shape, x.dtype,
                                                                       sharding=x.sharding)}))


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
