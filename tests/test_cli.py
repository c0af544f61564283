"""The command-line tools as users run them: `python -m fastpersist_jax
verify|inspect|export` on checkpoints saved through ocp.CheckpointManager."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
import safetensors
from jax.sharding import NamedSharding, PartitionSpec as P
from safetensors.numpy import load_file

from fastpersist_jax import checksums
from fastpersist_jax import (ChecksumMismatchError, CorruptCheckpointError, FastPersistHandler,
                             FastPersistOptions, FastPersistSave, disk_format)
from fastpersist_jax.cli import export
from fastpersist_jax.reader import CheckpointReader

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def host_values():
  """The saved tree's values on the host (the expected results)."""
  rng = np.random.default_rng(0)
  return {
      "params": {
          "w": rng.standard_normal((64, 32)).astype(np.float32),
          # Sharded along its second dimension: shards are not contiguous
          # ranges of the array, so the reader assembles them.
          "bf": rng.standard_normal((16, 8)).astype(ml_dtypes.bfloat16),
          "layers": [np.arange(10, dtype=np.int32)],
      },
      "f8": rng.standard_normal((8, 4)).astype(ml_dtypes.float8_e4m3fn),
      "rng": np.arange(4, dtype=np.uint32),
      "scale": np.float32(1.5),
      "step": 7,
      "none": None,
  }


def device_tree(values, mesh):
  put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
  p = values["params"]
  tree = dict(values)
  tree["params"] = {"w": put(p["w"], P("data", "model")), "bf": put(p["bf"], P(None, "model")),
                    "layers": [put(p["layers"][0], P())]}
  tree["f8"] = put(values["f8"], P("data"))
  return tree


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((4, 2), ("data", "model"))


def save(root, tree) -> str:
  """Saves `tree` as step 0 through CheckpointManager; returns the step dir."""
  handler = FastPersistHandler(FastPersistOptions(host_memory_limit=16 << 20,
                                                  staging_slab_bytes=1 << 20))
  with ocp.CheckpointManager(root, item_handlers=handler) as mngr:
    mngr.save(0, args=FastPersistSave(tree))
    mngr.wait_until_finished()
  handler.close()
  return os.path.join(root, "0")


@pytest.fixture(scope="module")
def step_dir(tmp_path_factory, mesh):
  return save(tmp_path_factory.mktemp("ckpt"), device_tree(host_values(), mesh))


@pytest.fixture(scope="module")
def int4_step_dir(tmp_path_factory, mesh):
  q = np.arange(-8, 8, dtype=np.int8).astype(ml_dtypes.int4).reshape(4, 4)
  tree = {"w": jax.device_put(np.ones((8, 8), np.float32), NamedSharding(mesh, P("data"))),
          "quant": {"q": jax.device_put(q, NamedSharding(mesh, P("data")))}}
  return save(tmp_path_factory.mktemp("int4"), tree), q


def cli(*args, check_rc=None) -> subprocess.CompletedProcess:
  """Runs `python -m fastpersist_jax ARGS` as a user would."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-m", "fastpersist_jax", *map(str, args)], cwd=ROOT,
                     capture_output=True, text=True, env=env, timeout=180)
  if check_rc is not None:
    assert r.returncode == check_rc, (r.returncode, r.stdout, r.stderr[-3000:])
  return r


def cli_in_process(capsys, *args) -> tuple[int, str, str]:
  """The same entry point in this process (faster); returns (status, out, err)."""
  from fastpersist_jax import __main__ as entry  # pylint: disable=g-import-not-at-top
  flag_args = [a for a in map(str, args) if a.startswith("--")]
  operands = [a for a in map(str, args) if not a.startswith("--")]
  entry.FLAGS.unparse_flags()
  entry.FLAGS(["fastpersist_jax", *flag_args])
  capsys.readouterr()
  rc = entry.main(["fastpersist_jax", *operands])
  out, err = capsys.readouterr()
  return rc, out, err


def damaged_copy(step_dir, dst, leaf_path) -> tuple[str, disk_format.ShardRecord]:
  """A copy of the checkpoint with one bit flipped in a shard of the leaf at
  `leaf_path` (a key tuple); returns (copy's step dir, the damaged record)."""
  shutil.copytree(step_dir, dst)
  item = os.path.join(dst, "default")
  meta = disk_format.read_metadata(item)
  leaf_id = next(i for i, l in enumerate(meta.leaves) if tuple(k for _, k in l.path) == leaf_path)
  m = disk_format.read_manifest(item, 0, meta)
  rec = [s for s in m.shards if s.leaf == leaf_id][1]
  with open(os.path.join(item, m.files[rec.file][0]), "r+b") as f:
    f.seek(rec.offset + rec.nbytes // 2)
    b = f.read(1)
    f.seek(rec.offset + rec.nbytes // 2)
    f.write(bytes([b[0] ^ 0x10]))
  return dst, rec


def data_bytes(item_dir) -> int:
  return sum(os.path.getsize(os.path.join(item_dir, f)) for f in os.listdir(item_dir)
             if f.startswith("data."))


# verify -----------------------------------------------------------------------------


def test_verify_intact_checkpoint_exits_0_and_reads_every_byte(step_dir):
  r = cli("verify", step_dir, check_rc=0)
  total = data_bytes(os.path.join(step_dir, "default"))
  assert f"{total} bytes in" in r.stdout and "GB/s: OK" in r.stdout, r.stdout
  assert "DAMAGED" not in r.stdout


def test_verify_flipped_byte_exits_1_naming_leaf_shard_file_and_offset(step_dir, tmp_path):
  bad, rec = damaged_copy(step_dir, tmp_path / "bad", ("params", "w"))
  r = cli("verify", bad, check_rc=1)
  lines = [l for l in r.stdout.splitlines() if l.startswith("DAMAGED:")]
  assert len(lines) == 1, r.stdout
  assert "['params']['w']" in lines[0]
  assert f"shard {[list(x) for x in rec.index]}" in lines[0]
  assert f"data.00000.{rec.file:04d}.bin @ {rec.offset}" in lines[0]
  assert "checksum mismatch" in lines[0]


def test_verify_truncated_data_file_exits_1(step_dir, tmp_path, capsys):
  shutil.copytree(step_dir, tmp_path / "cut")
  item = tmp_path / "cut" / "default"
  data = sorted(f for f in os.listdir(item) if f.startswith("data."))[0]
  os.truncate(item / data, os.path.getsize(item / data) - 100)
  rc, out, _ = cli_in_process(capsys, "verify", tmp_path / "cut")
  assert rc == 1
  assert "truncated" in out and data in out, out


def write_sealed(path, doc) -> None:
  """Writes an edited manifest or metadata document with a valid checksum of
  its own (disk_format.seal), so that the validators behind it are what the edit
  tests."""
  with open(path, "wb") as f:
    f.write(disk_format.seal({k: v for k, v in doc.items() if k != "crc32c"}))


def test_verify_damaged_manifest_exits_1(step_dir, tmp_path, capsys):
  shutil.copytree(step_dir, tmp_path / "m")
  path = tmp_path / "m" / "default" / "manifest.00000.json"
  d = json.loads(path.read_text())
  d["shards"][0]["nbytes"] += 4
  write_sealed(path, d)
  rc, out, _ = cli_in_process(capsys, "verify", tmp_path / "m" / "default")
  assert rc == 1
  assert "manifest.00000.json" in out and "nbytes" in out, out


def test_verify_checks_chunk_checksums(tmp_path, capsys):
  # A 64 KiB array saved with 16 KiB chunks: 4 chunk CRCs in its record.
  values = np.arange(16384, dtype=np.float32)
  handler = FastPersistHandler(FastPersistOptions(crc_chunk_bytes=16384))
  with ocp.CheckpointManager(tmp_path / "c", item_handlers=handler) as mngr:
    mngr.save(0, args=FastPersistSave({"w": jax.device_put(values)}))
    mngr.wait_until_finished()
  item = tmp_path / "c" / "0" / "default"
  rc, out, _ = cli_in_process(capsys, "verify", item)
  assert rc == 0, out
  path = item / "manifest.00000.json"
  d = json.loads(path.read_text())
  assert d["crc_chunk_bytes"] == 16384 and len(d["shards"][0]["chunk_crc32c"]) == 4, d
  good = list(d["shards"][0]["chunk_crc32c"])
  d["shards"][0]["chunk_crc32c"][2] ^= 1   # a writer that recorded one chunk's CRC wrong
  write_sealed(path, d)
  rc, out, _ = cli_in_process(capsys, "verify", item)
  assert rc == 1 and "chunk_crc32c do not combine to its crc32c" in out, out
  # Wrong chunk CRCs that still combine to the record's CRC (chunk 3's
  # compensates chunk 2's): only reading the data shows them wrong.
  d["shards"][0]["chunk_crc32c"] = good
  d["shards"][0]["chunk_crc32c"][2] ^= 1
  d["shards"][0]["chunk_crc32c"][3] ^= checksums.combine(1, 0, 16384)
  write_sealed(path, d)
  rc, out, _ = cli_in_process(capsys, "verify", item)
  assert rc == 1
  assert "chunk checksum mismatch at bytes [32768, 49152)" in out and "['w']" in out, out


def test_a_checkpoint_missing_a_manifest_is_damage_for_every_command(step_dir, tmp_path, capsys):
  # A file missing from a checkpoint is damage (1), as verify says, not a
  # usage error (2), which is for an operand that is no checkpoint at all.
  shutil.copytree(step_dir, tmp_path / "m")
  os.remove(tmp_path / "m" / "default" / "manifest.00000.json")
  rc, out, _ = cli_in_process(capsys, "verify", tmp_path / "m")
  assert rc == 1 and "manifest.00000.json" in out, out
  rc, _, err = cli_in_process(capsys, "export", tmp_path / "m", tmp_path / "out",
                              "--format=safetensors")
  assert rc == 1 and "manifest of process 0 not found" in err, err
  rc, _, err = cli_in_process(capsys, "export", tmp_path / "nothing", tmp_path / "out2",
                              "--format=safetensors")
  assert rc == 2 and "no directory" in err, err


def test_verify_usage_errors_exit_2(tmp_path, capsys):
  r = cli("verify", tmp_path / "missing", check_rc=2)
  assert "no directory" in r.stderr and "missing" in r.stderr
  rc, _, err = cli_in_process(capsys, "verify", tmp_path)
  assert rc == 2 and "not a fastpersist checkpoint" in err
  from absl import app  # pylint: disable=g-import-not-at-top
  for argv in (["inspect"], ["frobnicate", str(tmp_path)]):
    with pytest.raises(app.UsageError) as e:
      cli_in_process(capsys, *argv)
    assert e.value.exitcode == 2


def test_verify_per_host_checkpoint_checks_what_is_here(two_process_checkpoint, capsys):
  root = two_process_checkpoint   # a copy of conftest.two_process_runs' "shared" root
  # What one host of a per-host save holds: its manifest and data files only.
  item = root / "0" / "default"
  meta = json.loads((item / "fastpersist.json").read_text())
  meta["layout"] = "per_host"
  write_sealed(item / "fastpersist.json", meta)
  # The manifest records which metadata it belongs to: the edited one now.
  manifest = json.loads((item / "manifest.00000.json").read_text())
  manifest["metadata_crc32c"] = json.loads((item / "fastpersist.json").read_text())["crc32c"]
  write_sealed(item / "manifest.00000.json", manifest)
  for f in os.listdir(item):
    if f.startswith(("manifest.00001", "data.00001")):
      os.remove(item / f)
  rc, out, _ = cli_in_process(capsys, "verify", item)
  assert rc == 0, out
  assert "processes [0] of 2 (per_host placement" in out and ": OK" in out, out
  assert f"{data_bytes(item)} bytes in" in out


# inspect ----------------------------------------------------------------------------


def test_inspect_prints_paths_shapes_dtypes_and_shardings(step_dir, capsys):
  r = cli("inspect", step_dir, check_rc=0)
  for text in ("['params']['w']", "float32", "(64, 32)", "P('data', 'model')",
               "['params']['bf']", "bfloat16", "['params']['layers'][0]", "['step']", "= 7",
               "['none']"):
    assert text in r.stdout, (text, r.stdout)
  rc, out, _ = cli_in_process(capsys, "inspect", step_dir, "--json")
  assert rc == 0
  (item,) = json.loads(out)["items"]
  leaves = {l["path"]: l for l in item["leaves"]}
  w = leaves["['params']['w']"]
  assert (w["kind"], w["dtype"], w["shape"], w["bytes"]) == ("array", "float32", [64, 32], 8192)
  assert w["sharding"]["mesh_shape"] == [4, 2] and w["sharding"]["spec"] == ["data", "model"]
  assert leaves["['step']"]["value"] == 7 and leaves["['none']"]["kind"] == "none"
  values = host_values()
  arrays = [values["params"]["w"], values["params"]["bf"], values["params"]["layers"][0],
            values["f8"], values["rng"], values["scale"]]
  assert item["bytes"] == sum(a.nbytes for a in arrays)


# export: safetensors --------------------------------------------------------------------


def test_export_safetensors_is_bit_exact(step_dir, tmp_path):
  out = tmp_path / "st"
  cli("export", step_dir, out, "--format=safetensors", check_rc=0)
  assert sorted(os.listdir(out)) == ["model.safetensors"]
  # safetensors.numpy 0.8 cannot build float8 arrays (it looks for
  # np.float8_e4m3fn), so load_file fails on a file holding one: read the
  # others through safe_open, and the float8 tensor with safetensors' parser.
  with safetensors.safe_open(out / "model.safetensors", "np") as f:
    assert f.metadata() == {"step": "7", "none": "null"}
    names = set(f.keys())
    loaded = {n: f.get_tensor(n) for n in names - {"f8"}}
  values = host_values()
  expected = {"params.w": values["params"]["w"], "params.bf": values["params"]["bf"],
              "params.layers.0": values["params"]["layers"][0], "rng": values["rng"],
              "scale": np.asarray(values["scale"])}
  assert names == set(expected) | {"f8"}
  for name, e in expected.items():
    assert loaded[name].dtype == e.dtype and loaded[name].shape == e.shape, name
    assert loaded[name].tobytes() == e.tobytes(), name
  raw = dict(safetensors.deserialize((out / "model.safetensors").read_bytes()))
  assert raw["f8"]["dtype"] == "F8_E4M3" and raw["f8"]["shape"] == [8, 4]
  assert bytes(raw["f8"]["data"]) == values["f8"].tobytes()


def test_export_safetensors_in_shards_with_an_index(step_dir, tmp_path, capsys):
  out = tmp_path / "sharded"
  rc, _, _ = cli_in_process(capsys, "export", step_dir, out, "--max_shard_bytes=4096")
  assert rc == 0
  index = json.loads((out / "model.safetensors.index.json").read_text())
  files = sorted(f for f in os.listdir(out) if f.endswith(".safetensors"))
  assert len(files) >= 3 and set(index["weight_map"].values()) == set(files)
  merged = {}
  for f in files:
    with safetensors.safe_open(out / f, "np") as st:   # float8: see the test above
      part = {n: st.get_tensor(n) for n in st.keys() if n != "f8"}
      sizes = [a.nbytes for a in part.values()] + [32] * ("f8" in st.keys())
    assert sum(sizes) <= 4096 or len(sizes) == 1, (f, sizes)   # a larger tensor: a file of its own
    merged.update(part)
  values = host_values()
  assert merged["params.w"].tobytes() == values["params"]["w"].tobytes()
  assert merged["params.bf"].tobytes() == values["params"]["bf"].tobytes()
  assert index["metadata"]["total_size"] == 8192 + 256 + 40 + 32 + 16 + 4


def test_export_safetensors_refuses_int4_naming_the_leaf_and_cast(int4_step_dir, tmp_path,
                                                                  capsys):
  step, q = int4_step_dir
  r = cli("export", step, tmp_path / "refused", "--format=safetensors", check_rc=2)
  assert "['quant']['q']" in r.stderr and "int4" in r.stderr and "--cast" in r.stderr, r.stderr
  assert not (tmp_path / "refused").exists()
  rc, _, _ = cli_in_process(capsys, "export", step, tmp_path / "cast", "--cast=int8")
  assert rc == 0
  loaded = load_file(tmp_path / "cast" / "model.safetensors")
  assert loaded["quant.q"].dtype == np.int8
  np.testing.assert_array_equal(loaded["quant.q"], q.astype(np.int8))
  assert loaded["w"].dtype == np.float32   # only what safetensors lacks is cast


def test_export_of_a_damaged_checkpoint_fails_and_writes_nothing(step_dir, tmp_path, capsys):
  bad, rec = damaged_copy(step_dir, tmp_path / "bad", ("params", "bf"))
  rc, _, err = cli_in_process(capsys, "export", bad, tmp_path / "out")
  assert rc == 1
  assert "ChecksumMismatchError" in err and "['params']['bf']" in err
  assert f"@ {rec.offset}" in err
  assert [p for p in os.listdir(tmp_path) if p.startswith("out")] == []
  with CheckpointReader(os.path.join(bad, "default")) as rd:
    leaf = next(i for i, l in enumerate(rd.meta.leaves) if l.path[-1][1] == "bf")
    with pytest.raises(ChecksumMismatchError, match=r"default: leaf \['params'\]\['bf'\], shard "):
      rd.read_leaf(leaf)


def test_a_shard_missing_from_the_manifest_is_damage(step_dir, tmp_path, capsys):
  shutil.copytree(step_dir, tmp_path / "c")
  item = str(tmp_path / "c" / "default")
  meta = disk_format.read_metadata(item)
  leaf = next(i for i, l in enumerate(meta.leaves) if l.path[-1][1] == "w")
  path = os.path.join(item, "manifest.00000.json")
  with open(path) as f:
    d = json.load(f)
  first = next(j for j, s in enumerate(d["shards"]) if s["leaf"] == leaf)
  del d["shards"][first]
  write_sealed(path, d)
  rc, out, _ = cli_in_process(capsys, "verify", tmp_path / "c")
  assert rc == 1 and "['params']['w']" in out and "of its 2048 elements" in out, out
  with CheckpointReader(item) as rd:
    with pytest.raises(CorruptCheckpointError, match=r"\['params'\]\['w'\].*of its 2048 elements"):
      rd.read_leaf(leaf)


# export: orbax ------------------------------------------------------------------------


_RESTORE_WITHOUT_FASTPERSIST = """
import sys
sys.modules["fastpersist_jax"] = None   # importing it would fail
import numpy as np, orbax.checkpoint as ocp
r = ocp.StandardCheckpointer().restore(sys.argv[1])
flat = {"params.w": r["params"]["w"], "params.bf": r["params"]["bf"],
        "params.layers.0": r["params"]["layers"][0], "f8": r["f8"], "rng": r["rng"],
        "scale": r["scale"]}
np.savez(sys.argv[2], **{k: np.asarray(v).reshape(-1).view(np.uint8) for k, v in flat.items()},
         dtypes=np.array([f"{k}={np.asarray(v).dtype.name}" for k, v in flat.items()]),
         step=np.asarray(r["step"]))
"""


def test_export_orbax_restores_bit_exact_without_fastpersist(step_dir, tmp_path):
  out = tmp_path / "orbax"
  cli("export", step_dir, out, "--format=orbax", check_rc=0)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  r = subprocess.run([sys.executable, "-c", _RESTORE_WITHOUT_FASTPERSIST, str(out),
                      str(tmp_path / "restored.npz")], capture_output=True, text=True, env=env,
                     timeout=180, cwd=str(tmp_path))
  assert r.returncode == 0, r.stderr[-3000:]
  got = np.load(tmp_path / "restored.npz")
  values = host_values()
  expected = {"params.w": values["params"]["w"], "params.bf": values["params"]["bf"],
              "params.layers.0": values["params"]["layers"][0], "f8": values["f8"],
              "rng": values["rng"], "scale": np.asarray(values["scale"])}
  dtypes = dict(s.split("=") for s in got["dtypes"])
  for name, e in expected.items():
    assert dtypes[name] == e.dtype.name, name
    assert got[name].tobytes() == e.tobytes(), name
  assert int(got["step"]) == 7


def test_export_orbax_keeps_int4(int4_step_dir, tmp_path):
  step, q = int4_step_dir
  export.main(step, str(tmp_path / "o"), "orbax")
  restored = ocp.StandardCheckpointer().restore(tmp_path / "o")
  assert restored["quant"]["q"].dtype == q.dtype
  assert np.asarray(restored["quant"]["q"]).tobytes() == q.tobytes()


def test_export_orbax_holds_one_leaf_at_a_time(step_dir, tmp_path, monkeypatch):
  events = []
  load, write = export._LeafSource.load, export._numpy_write  # pylint: disable=protected-access
  def logged_load(self):
    events.append("read")
    return load(self)
  async def logged_write(*args):
    await write(*args)
    events.append("written")
  monkeypatch.setattr(export._LeafSource, "load", logged_load)  # pylint: disable=protected-access
  monkeypatch.setattr(export, "_numpy_write", logged_write)
  export.export_orbax(os.path.join(step_dir, "default"), str(tmp_path / "o"))
  assert events == ["read", "written"] * 6   # each leaf written before the next is read


# two processes, replica-parallel parts --------------------------------------------------


def test_export_refusals_leave_nothing_and_say_one_line(tmp_path, capsys):
  # Leaves Orbax would name alike; an output path that cannot be made; a step
  # of two items one of which cannot be exported; a tree with no leaf.
  clash = save(tmp_path / "clash", {"a.b": jnp.ones(2), "a": {"b": jnp.zeros(2)}})
  rc, _, err = cli_in_process(capsys, "export", clash, tmp_path / "o1", "--format=orbax")
  assert rc == 2 and "both map to the Orbax parameter name 'a.b'" in err, err
  (tmp_path / "file").write_text("x")
  for fmt in ("orbax", "safetensors"):
    rc, _, err = cli_in_process(capsys, "export", clash if fmt == "orbax" else save(
        tmp_path / "good", {"w": jnp.ones(2)}), tmp_path / "file" / "sub", f"--format={fmt}")
    assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
  two = tmp_path / "two"
  mngr = ocp.CheckpointManager(two, item_names=("a", "b"), item_handlers={
      "a": FastPersistHandler(), "b": FastPersistHandler()})
  mngr.save(1, args=ocp.args.Composite(
      a=FastPersistSave({"w": jnp.ones(2)}),
      b=FastPersistSave({"q": np.arange(4, dtype=np.int8).astype(ml_dtypes.int4)})))
  mngr.wait_until_finished()
  mngr.close()
  rc, _, err = cli_in_process(capsys, "export", two / "1", tmp_path / "o2")
  assert rc == 2 and "--cast" in err
  empty = save(tmp_path / "empty", {"n": None, "e": {}})
  rc, _, err = cli_in_process(capsys, "export", empty, tmp_path / "o3", "--format=orbax")
  assert rc == 2 and "no leaf" in err
  assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("o")) == []


def test_inspect_shows_typed_keys_and_writes_strict_json(tmp_path, capsys):
  step = save(tmp_path / "k", {"rng": jax.random.split(jax.random.key(0), 4), "x": float("nan")})
  rc, out, _ = cli_in_process(capsys, "inspect", step, "--json")
  assert rc == 0
  leaves = {l["path"]: l for l in json.loads(out)["items"][0]["leaves"]}   # strict: no NaN token
  assert leaves["['rng']"]["dtype"] == "key<threefry2x32>" and leaves["['rng']"]["shape"] == [4]
  assert leaves["['rng']"]["key_data"] == "uint32[4, 2]"
  assert leaves["['x']"]["value"] == "nan"


def mp_expected():
  """tests/mp_worker.py's global_state values (they depend only on position)."""
  def make(shape, dtype, seed):
    return ((np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * 7 + seed)
            % 251).astype(dtype)
  return {"params.w": make((64, 512), np.float32, 1), "opt.emb": make((256, 128), np.float32, 2),
          "params.b": make((512,), np.int32, 3), "rng": np.arange(4, dtype=np.uint32)}


def test_two_process_checkpoint_with_replica_parallel_parts(two_process_checkpoint, tmp_path,
                                                          capsys):
  root = two_process_checkpoint   # a copy of conftest.two_process_runs' "shared" root
  item = root / "0" / "default"
  manifests = [json.loads((item / disk_format.manifest_name(p)).read_text()) for p in range(2)]
  # Replicated params were split into parts written by both processes.
  assert all(any("part" in s for s in m["shards"]) for m in manifests)
  rc, out, _ = cli_in_process(capsys, "verify", root / "0")
  assert rc == 0 and "2 of 2 manifests" in out, out
  assert f"{data_bytes(item)} bytes in" in out
  rc, _, _ = cli_in_process(capsys, "export", root / "0", tmp_path / "st")
  assert rc == 0
  loaded = load_file(tmp_path / "st" / "model.safetensors")
  for name, e in mp_expected().items():
    assert loaded[name].dtype == e.dtype and loaded[name].tobytes() == e.tobytes(), name
  with safetensors.safe_open(tmp_path / "st" / "model.safetensors", "np") as f:
    assert f.metadata() == {"step": "11"}
  # (FORMAT.md's reading snippet on such a checkpoint: tests/test_ecosystem.py.)


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
