"""The product among its neighbours: FORMAT.md's reader, Orbax's emergency
managers, the Orbax internals it relies on, and what the package declares."""

from __future__ import annotations

import ast
import json
import os
import re
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import (FastPersistHandler, FastPersistRestore, FastPersistSave,
                             UnsupportedManagerError, coordination, emergency)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _format_reader():
  """FORMAT.md's python block, executed: its `read_item`."""
  text = open(os.path.join(ROOT, "FORMAT.md")).read()
  (block,) = re.findall(r"```python\n(.*?)```", text, re.S)
  namespace: dict = {}
  exec(compile(block, "FORMAT.md", "exec"), namespace)  # pylint: disable=exec-used
  return namespace["read_item"]


def _mp_expected(shape, dtype, seed):
  """tests/mp_worker.py's global_state values (they depend on position only)."""
  host = np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * 7 + seed
  return (host % 251).astype(dtype)


def test_format_reader_reads_a_two_process_checkpoint_with_parts(two_process_checkpoint):
  item = os.path.join(two_process_checkpoint, "0", "default")
  manifests = [json.load(open(os.path.join(item, f"manifest.0000{p}.json"))) for p in (0, 1)]
  assert all(any("part" in s for s in m["shards"]) for m in manifests)   # parts in both
  got = _format_reader()(item)
  want = {"params/w": _mp_expected((64, 512), np.float32, 1),
          "params/b": _mp_expected((512,), np.int32, 3),
          "opt/emb": _mp_expected((256, 128), np.float32, 2),
          "step": 11, "rng": np.arange(4, dtype=np.uint32)}
  assert got.keys() == want.keys()
  for key, value in want.items():
    if isinstance(value, np.ndarray):
      assert got[key].dtype == value.dtype and got[key].tobytes() == value.tobytes(), key
    else:
      assert got[key] == value


def test_format_reader_handles_every_leaf_kind_and_checks_crcs(tmp_path):
  mesh = jax.make_mesh((4, 2), ("data", "model"))
  rng = np.random.default_rng(0)
  bf16 = rng.standard_normal((16, 8)).astype(ml_dtypes.bfloat16)
  f8 = rng.standard_normal((8,)).astype(ml_dtypes.float8_e4m3fn)
  i4 = (np.arange(32) % 16 - 8).astype(ml_dtypes.int4)
  tree = {"bf16": jax.device_put(bf16, NamedSharding(mesh, P("data", "model"))),
          "f8": jax.device_put(f8, NamedSharding(mesh, P())),
          "i4": jax.device_put(i4, NamedSharding(mesh, P("data"))),
          "np": np.arange(6, dtype=np.float64).reshape(2, 3), "npscalar": np.float32(2.5),
          "c": 1 + 2j, "s": "text", "none": None, "empty": {}, "seq": [jnp.int32(3)]}
  FastPersistHandler().save(tmp_path / "item", args=FastPersistSave(tree))
  got = _format_reader()(os.fspath(tmp_path / "item"))
  for key, value in (("bf16", bf16), ("f8", f8), ("i4", i4), ("np", tree["np"])):
    assert got[key].dtype == value.dtype and got[key].tobytes() == value.tobytes(), key
  assert got["npscalar"] == np.float32(2.5) and got["npscalar"].dtype == np.float32
  assert (got["c"], got["s"], got["none"], got["empty"]) == (1 + 2j, "text", None, {})
  assert got["seq/0"] == 3
  # A flipped byte in a data file is caught by the CRC check.
  data = tmp_path / "item" / "data.00000.0000.bin"
  raw = bytearray(data.read_bytes())
  raw[0] ^= 0xFF
  data.write_bytes(bytes(raw))
  with pytest.raises(ValueError, match="CRC-32C"):
    _format_reader()(os.fspath(tmp_path / "item"))


def _emergency_manager(tmp_path, mesh, abstract):
  from orbax.checkpoint.experimental.emergency import checkpoint_manager as em  # pylint: disable=g-import-not-at-top
  options = em.CheckpointManagerOptions(
      local=em.LocalCheckpointOptions(save_interval_steps=1),
      persistent=em.PersistentCheckpointOptions(save_interval_steps=1))
  (tmp_path / "persistent").mkdir()
  return em.CheckpointManager(tmp_path / "local", tmp_path / "persistent", mesh, abstract,
                              options=options)


def _emergency_child(tmp_path) -> None:
  # One slice (replica axis of size 1): the emergency manager saves through a
  # plain CheckpointManager, which resolves FastPersistSave to our handler,
  # and restores with Orbax's PyTreeCheckpointHandler.
  mesh = jax.make_mesh((1, 8), ("replica", "data"))
  state = {"x": jax.device_put(jnp.arange(64.0), NamedSharding(mesh, P("data")))}
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
  mngr = _emergency_manager(tmp_path, mesh, abstract)
  try:
    with pytest.raises(UnsupportedManagerError, match="emergency.checkpoint_manager"):
      mngr.save(1, args=ocp.args.Composite(state=FastPersistSave(state)))
      mngr.wait_until_finished()
    assert mngr.all_steps() == []
  finally:
    mngr.close()
  assert not (tmp_path / "persistent" / "1").exists()
  # Outside those managers, the same handler saves and restores as usual.
  assert emergency.driving_manager() is None
  with ocp.CheckpointManager(tmp_path / "plain", item_handlers=FastPersistHandler()) as plain:
    plain.save(1, args=FastPersistSave(state))
    plain.wait_until_finished()
    restored = plain.restore(1, args=FastPersistRestore(abstract))
  assert np.array_equal(np.asarray(restored["x"]), np.asarray(state["x"]))
  print("EMERGENCY-REFUSED-PLAIN-OK", flush=True)


def test_emergency_manager_save_is_refused_and_commits_nothing(tmp_path):
  # In a child process: after the refused save, a thread of Orbax's manager
  # waits (for minutes) for a directory signal that never comes; the child
  # ends without waiting for it.
  import subprocess  # pylint: disable=g-import-not-at-top
  import helpers  # pylint: disable=g-import-not-at-top
  r = subprocess.run([sys.executable, os.path.abspath(__file__), "emergency", str(tmp_path)],
                     env=helpers.child_env(8), capture_output=True, text=True, timeout=300)
  assert r.returncode == 0 and "EMERGENCY-REFUSED-PLAIN-OK" in r.stdout, r.stdout + r.stderr[-3000:]


def test_jax_per_device_arrays_accessor_is_where_it_is_used():
  """sources.addressable_arrays reads jax.Array._arrays (the public
  addressable_data builds a Sharding per shard, ~50 us each): fail loudly if
  JAX moves it, and check it agrees with the public API."""
  from fastpersist_jax import sources  # pylint: disable=g-import-not-at-top
  mesh = jax.make_mesh((2, 4), ("a", "b"))
  x = jax.device_put(jnp.arange(64.0).reshape(8, 8), NamedSharding(mesh, P("a", "b")))
  assert isinstance(getattr(x, "_arrays", None), list)
  fast = sources.addressable_arrays(x)
  public = [x.addressable_data(i) for i in range(len(x.sharding.addressable_devices))]
  assert [a.devices() for a in fast] == [a.devices() for a in public]
  assert all(np.array_equal(a, b) for a, b in zip(fast, public))


def test_orbax_distributed_client_accessor_is_where_it_is_used():
  """coordination reaches the JAX key-value client through Orbax's multihost
  module (not public under a stable name): fail loudly if Orbax moves it."""
  multihost = coordination.orbax_multihost()
  assert callable(multihost.get_jax_distributed_client)
  assert multihost.is_jax_distributed_client_initialized() is False
  assert coordination._client() is None   # pylint: disable=protected-access  (single process)


# Packaging -------------------------------------------------------------------

# Import name -> distribution name, where they differ.
_DISTRIBUTIONS = {"absl": "absl-py", "orbax": "orbax-checkpoint", "etils": "etils",
                  "ml_dtypes": "ml_dtypes", "google": "protobuf"}


def _third_party_imports(paths) -> set[str]:
  stdlib = set(sys.stdlib_module_names)
  names = set()
  for path in paths:
    for node in ast.walk(ast.parse(open(path).read())):
      if isinstance(node, ast.Import):
        names.update(a.name.split(".")[0] for a in node.names)
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        names.add(node.module.split(".")[0])
  return {n for n in names if n not in stdlib and n not in ("fastpersist_jax", "__future__")}


def _requirement_name(req: str) -> str:
  return re.split(r"[<>=!~\[; ]", req, maxsplit=1)[0].lower().replace("_", "-")


def test_declared_dependencies_are_exactly_what_the_package_imports():
  tomllib = pytest.importorskip("tomllib")   # Python 3.11+
  project = tomllib.load(open(os.path.join(ROOT, "pyproject.toml"), "rb"))["project"]
  core = {_requirement_name(r) for r in project["dependencies"]}
  extras = {_requirement_name(r) for reqs in project["optional-dependencies"].values()
            for r in reqs}
  files = [os.path.join(d, f) for d, _, names in os.walk(os.path.join(ROOT, "fastpersist_jax"))
           for f in names if f.endswith(".py")]
  imported = {_DISTRIBUTIONS.get(n, n).lower().replace("_", "-")
              for n in _third_party_imports(files)}
  # Every import is declared (core, or an extra for an optional feature), and
  # every core dependency is imported by the package itself.
  assert imported <= core | extras, imported - core - extras
  assert core <= imported | {"jaxlib"}, core - imported
  examples = _third_party_imports([os.path.join(ROOT, "examples", "train.py")])
  assert {_DISTRIBUTIONS.get(n, n) for n in examples} <= core | set(
      project["optional-dependencies"]["examples"])


def test_license_and_type_marker_are_in_the_tree():
  """(That the wheel ships them is checked by building one: see README.)"""
  license_text = open(os.path.join(ROOT, "LICENSE")).read()
  assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
  assert '"Apache-2.0"' in open(os.path.join(ROOT, "pyproject.toml")).read()
  assert os.path.isfile(os.path.join(ROOT, "fastpersist_jax", "py.typed"))


if __name__ == "__main__":
  if sys.argv[1:2] == ["emergency"]:
    import pathlib  # pylint: disable=g-import-not-at-top
    try:
      _emergency_child(pathlib.Path(sys.argv[2]))
    except BaseException:  # pylint: disable=broad-except
      import traceback  # pylint: disable=g-import-not-at-top
      traceback.print_exc()
      os._exit(1)
    os._exit(0)   # not waiting for Orbax's stranded thread
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))  # Bazel py_test runs the file itself
