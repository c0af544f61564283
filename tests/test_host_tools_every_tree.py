"""Every tree that round-trips also verifies, inspects and exports.

The trees are those of the round-trip property test
(test_training_state._tree: typed PRNG keys, empty nodes such as
optax.EmptyState(), Python scalars, zero-size arrays, int4, namedtuples,
keys with dots and spaces, ...). Each, saved, must pass the host-side tools
as users run them (the CLI entry point, in this process): `verify` exits 0,
`inspect --json` lists every leaf, and `export` to safetensors and to Orbax
writes the saved values under the names the exporter gives them, or the
command exits 2 with one line naming the leaf it refuses (int4 without
--cast, a zero-size array Orbax cannot save, two leaves of one name, two
leaves Orbax would store in one place such as "a" and "a/").

The kinds of leaf are defined once (disk_format): the restore and the tools
must agree on each.
"""

from __future__ import annotations

import json
import os

import helpers  # sets XLA_FLAGS before jax is imported
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
import safetensors
from hypothesis import HealthCheck, example, given, settings

from fastpersist_jax import (FastPersistHandler, FastPersistOptions, FastPersistSave,
                             disk_format, reader, treepath)
from fastpersist_jax.cli import export
from helpers import MiB
from test_cli import cli_in_process, save
# The round-trip property test's tree strategy: the same trees, not a copy.
from test_training_state import _tree as round_trip_trees


@pytest.fixture(scope="module")
def handler():
  h = FastPersistHandler(FastPersistOptions(host_memory_limit=16 * MiB, staging_slab_bytes=1 * MiB))
  yield h
  h.close()


# One definition of each leaf kind ------------------------------------------------------


def test_every_leaf_kind_is_an_array_kind_or_has_a_plain_value(handler, tmp_path):
  assert disk_format.LEAF_KINDS == disk_format.ARRAY_KINDS + disk_format.PLAIN_KINDS
  assert len(set(disk_format.LEAF_KINDS)) == len(disk_format.LEAF_KINDS)
  for kind in disk_format.ARRAY_KINDS:
    with pytest.raises(ValueError, match=kind):
      disk_format.plain_value(disk_format.LeafMeta([], kind))
  # A tree of every plain kind: restore (no target) and the host-side reader
  # give each leaf the one plain_value.
  tree = {"s": 3, "n": None, "d": {}, "l": [], "t": (), "e": optax.EmptyState()}
  handler.save(tmp_path / "c", args=FastPersistSave(tree))
  meta = disk_format.read_metadata(tmp_path / "c")
  assert sorted(l.kind for l in meta.leaves) == sorted(disk_format.PLAIN_KINDS)
  restored = handler.restore(tmp_path / "c")
  with reader.CheckpointReader(tmp_path / "c") as rd:
    for i, leaf in enumerate(meta.leaves):
      (key,) = (k for _, k in leaf.path)
      value = disk_format.plain_value(leaf)
      assert restored[key] == value and type(restored[key]) is type(value), leaf
      assert rd.read_leaf(i) == value and type(rd.read_leaf(i)) is type(value), leaf
  d = next(l for l in meta.leaves if l.kind == "empty_dict")
  assert disk_format.plain_value(d) is not disk_format.plain_value(d)   # a fresh {} each time


# The smallest failing input: an optax adamw state ---------------------------------------


def adamw_state():
  """Parameters and their optax.adamw state (which holds optax.EmptyState())."""
  params = {"w": jnp.arange(8, dtype=jnp.float32).reshape(4, 2)}
  return {"params": params, "opt": optax.adamw(1e-3).init(params)}


def test_export_of_an_adamw_state(tmp_path, capsys):
  # adamw's state holds optax.EmptyState() (an "empty_node" leaf); the host-side
  # reader used to lack that kind: KeyError: 'empty_node' from every export.
  step = save(tmp_path / "c", adamw_state())
  for fmt in ("safetensors", "orbax"):
    rc, _, err = cli_in_process(capsys, "export", step, tmp_path / fmt, f"--format={fmt}")
    assert rc == 0, err
  with safetensors.safe_open(tmp_path / "safetensors" / "model.safetensors", "np") as f:
    assert f.metadata() == {"opt.1": "null", "opt.2": "null"}
    assert sorted(f.keys()) == ["opt.0.count", "opt.0.mu.w", "opt.0.nu.w", "params.w"]
    np.testing.assert_array_equal(f.get_tensor("params.w"), np.arange(8).reshape(4, 2))
  restored = ocp.StandardCheckpointer().restore(tmp_path / "orbax")
  assert restored["opt"][1] is None and restored["opt"][2] is None
  np.testing.assert_array_equal(restored["params"]["w"], np.arange(8).reshape(4, 2))
  rc, out, _ = cli_in_process(capsys, "inspect", step, "--json")
  assert rc == 0
  kinds = {l["path"]: l["kind"] for l in json.loads(out)["items"][0]["leaves"]}
  assert kinds["['opt'][1]"] == kinds["['opt'][2]"] == "empty_node"
  assert cli_in_process(capsys, "verify", step)[0] == 0


# Orbax stores "a" and "a/" in one place ---------------------------------------------------


@pytest.mark.parametrize("tree,paths", [
    # Found by the property test: Orbax's save failed in TensorStore (a traceback) ...
    ({"_": np.float32(-0.5), "_/": 0}, ("['_']", "['_/']")),
    # ... or, for two numbers, restored one value for both, silently.
    ({"a": 1.5, "a/": 2.5}, ("['a']", "['a/']")),
    # Strings are members of one JSON document: "x" cannot also hold "x/".
    ({"x": "s", "x/": "t"}, ("['x']", "['x/']")),
    ({"x": "s", "n": {"x/y": "t"}, "x/y": "u"}, ("['x']", "['x/y']")),
], ids=["array-and-number", "two-numbers", "two-strings", "nested-strings"])
def test_export_orbax_refuses_leaves_orbax_would_store_in_one_place(tmp_path, capsys, tree, paths):
  step = save(tmp_path / "c", tree)
  rc, _, err = cli_in_process(capsys, "export", step, tmp_path / "o", "--format=orbax")
  assert_refused(rc, err, [("would store in one place", *paths)])
  assert not (tmp_path / "o").exists()
  assert [p for p in os.listdir(tmp_path) if p.startswith("o")] == []
  # safetensors names them apart.
  rc, _, err = cli_in_process(capsys, "export", step, tmp_path / "st")
  assert rc == 0, err


def test_export_orbax_keeps_names_orbax_stores_apart(tmp_path, capsys):
  tree = {"a": 1.5, "a//": 2.5, "a/": "s", "b/": np.arange(3), "b": {"/c": "t"}, "/": 7,
          "d~1e": "u", "d/e": "v"}
  step = save(tmp_path / "c", tree)
  rc, _, err = cli_in_process(capsys, "export", step, tmp_path / "o", "--format=orbax")
  assert rc == 0, err
  restored = ocp.StandardCheckpointer().restore(tmp_path / "o")
  assert restored["a"] == 1.5 and restored["a//"] == 2.5 and restored["a/"] == "s"
  assert restored["b"]["/c"] == "t" and restored["/"] == 7
  assert restored["d~1e"] == "u" and restored["d/e"] == "v"
  np.testing.assert_array_equal(restored["b/"], np.arange(3))


def test_export_orbax_refuses_a_string_whose_name_is_no_json_pointer(tmp_path, capsys):
  # Haiku names modules "mlp/~/linear_0": fine for arrays, not for strings.
  step = save(tmp_path / "c", {"mlp/~/linear_0": {"w": np.ones(2, np.float32), "s": "x"}})
  rc, _, err = cli_in_process(capsys, "export", step, tmp_path / "o", "--format=orbax")
  assert_refused(rc, err, [("['mlp/~/linear_0']['s']", "JSON pointer")])
  step = save(tmp_path / "d", {"mlp/~/linear_0": {"w": np.ones(2, np.float32)}})
  rc, _, err = cli_in_process(capsys, "export", step, tmp_path / "o", "--format=orbax")
  assert rc == 0, err


# Expected values, from the saved tree alone ---------------------------------------------


def _key(k) -> str:
  """A jax key path entry as the exporter writes it in a name."""
  for field in ("key", "idx", "name"):
    if hasattr(k, field):
      return str(getattr(k, field))
  raise AssertionError(k)


def saved_leaves(tree) -> list[tuple[str, str, object]]:
  """(exported name, keystr path, leaf) of every leaf as saved (empty nodes too)."""
  flat, _ = treepath.flatten(tree)
  return [(".".join(_key(k) for k in path) or "root", jax.tree_util.keystr(path) or "<root>", x)
          for path, x in flat]


def is_array(x) -> bool:
  """Whether a saved leaf is an array kind (jax or numpy array, numpy scalar)."""
  return isinstance(x, (jax.Array, np.ndarray, np.generic))


def host_array(x) -> np.ndarray:
  """An array leaf's saved data on the host (typed keys: their key data)."""
  if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
    x = jax.random.key_data(x)
  return np.asarray(x)


def json_value(x):
  """A non-array leaf as the safetensors export writes it in __metadata__."""
  if treepath.is_empty_node(x):
    return {dict: {}, list: [], tuple: []}.get(type(x))
  return x


def is_int4(x) -> bool:
  """Whether a saved leaf is an int4 array (safetensors needs --cast)."""
  return is_array(x) and host_array(x).dtype == ml_dtypes.int4


# verify, inspect, export -----------------------------------------------------------------


def check_verify_and_inspect(capsys, item, leaves):
  """verify exits 0 saying OK; inspect (JSON and table) lists every leaf by
  its keystr path, arrays with their bytes."""
  rc, out, err = cli_in_process(capsys, "verify", item)
  assert rc == 0 and out.rstrip().endswith("OK"), (out, err)
  rc, out, err = cli_in_process(capsys, "inspect", item, "--json")
  assert rc == 0, err
  listed = json.loads(out)["items"][0]["leaves"]
  assert [l["path"] for l in listed] == [path for _, path, _ in leaves]
  for l, (_, _, x) in zip(listed, leaves):
    if is_array(x):
      assert l["kind"] in disk_format.ARRAY_KINDS and l["bytes"] == host_array(x).nbytes, l
    else:
      assert l["kind"] in disk_format.PLAIN_KINDS, l
  rc, out, _ = cli_in_process(capsys, "inspect", item)
  assert rc == 0 and f"total: {len(leaves)} leaves" in out


def assert_refused(rc, err, reasons):
  """The command exited 2 with one "error:" line giving one of `reasons`,
  each a tuple of strings the message must all hold (what is refused, the
  leaves' paths)."""
  assert rc == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, (rc, err)
  assert any(all(part in err for part in reason) for reason in reasons), (err, reasons)


def name_clashes(leaves) -> list[tuple[str, ...]]:
  """A refusal reason for each two leaves the exporter gives one name."""
  seen, out = {}, []
  for name, path, _ in leaves:
    if name in seen:
      out.append(("both map to", seen[name], path))
    seen.setdefault(name, path)
  return out


def orbax_clashes(leaves) -> list[tuple[str, ...]]:
  """A refusal reason for each two leaves Orbax would store in one place:
  numbers and arrays are TensorStore arrays keyed by the name plus "/"
  unless it ends in one; strings are members of one JSON document at the
  pointer "/" + name, and cannot nest in one another."""
  stored = [(name, path, x) for name, path, x in leaves if not treepath.is_empty_node(x)]
  out = []
  for i, (n1, p1, x1) in enumerate(stored):
    for n2, p2, x2 in stored[i + 1:]:
      if isinstance(x1, str) != isinstance(x2, str):
        continue
      if isinstance(x1, str):
        t1, t2 = n1.split("/"), n2.split("/")
        alike = t1[:len(t2)] == t2 or t2[:len(t1)] == t1
      else:
        alike = n1 in (n2, n2 + "/") or n2 == n1 + "/"
      if alike:
        out.append(("in one place", p1, p2))
  return out


def check_safetensors(capsys, item, out, leaves):
  """Exports to safetensors; the file holds every saved value under its name,
  or the export is refused naming the leaf (int4 needs --cast, two leaves of
  one name)."""
  rc, _, err = cli_in_process(capsys, "export", item, out, "--format=safetensors")
  clashes = name_clashes(leaves)
  int4 = [("int4", "--cast", path) for _, path, x in leaves if is_int4(x)]
  if clashes or int4:
    assert_refused(rc, err, clashes + int4)
    assert not os.path.exists(out)
    if clashes:
      return
    rc, _, err = cli_in_process(capsys, "export", item, out, "--format=safetensors", "--cast=int8")
  assert rc == 0, err
  raw = (out / "model.safetensors").read_bytes()
  tensors = dict(safetensors.deserialize(raw))
  with safetensors.safe_open(out / "model.safetensors", "np") as f:
    metadata = f.metadata() or {}
    assert set(f.keys()) == set(tensors)
  want_tensors = {}
  want_metadata = {}
  for name, _, x in leaves:
    if is_array(x):
      a = host_array(x)
      want_tensors[name] = a.astype(np.int8) if a.dtype == ml_dtypes.int4 else a
    else:
      want_metadata[name] = json_value(x)
  assert set(tensors) == set(want_tensors)
  for name, a in want_tensors.items():
    t = tensors[name]
    assert t["dtype"] == export.SAFETENSORS_DTYPES[a.dtype.name], name
    assert tuple(t["shape"]) == a.shape, name
    assert bytes(t["data"]) == np.ascontiguousarray(a).tobytes(), name
  assert {k: json.loads(v) for k, v in metadata.items()} == want_metadata


def check_orbax(capsys, item, out, leaves):
  """Exports to Orbax; Orbax restores every saved array and scalar under its
  name, or the export is refused naming the leaf (a zero-size array, two
  leaves Orbax would store in one place) or saying there is none."""
  rc, _, err = cli_in_process(capsys, "export", item, out, "--format=orbax")
  reasons = name_clashes(leaves) + orbax_clashes(leaves) + [
      ("no elements", path) for _, path, x in leaves if is_array(x) and host_array(x).size == 0]
  if all(treepath.is_empty_node(x) for _, _, x in leaves):
    reasons.append(("no leaf but empty nodes",))
  if reasons:
    assert_refused(rc, err, reasons)
    assert not os.path.exists(out)
    return
  assert rc == 0, err
  restored = ocp.StandardCheckpointer().restore(out)
  got = {".".join(_key(k) for k in path) or "root": v
         for path, v in jax.tree_util.tree_flatten_with_path(restored)[0]}
  want = {name: x for name, _, x in leaves if not treepath.is_empty_node(x)}
  assert set(got) == set(want)
  for name, x in want.items():
    if is_array(x):
      a = host_array(x)
      g = np.asarray(got[name])
      assert g.dtype == a.dtype and g.shape == a.shape, (name, g.dtype, g.shape)
      assert g.tobytes() == a.tobytes(), name
    else:
      assert type(got[name]) is type(x) and got[name] == x, (name, got[name], x)


def check_tools(capsys, handler, d, tree):
  """Saves `tree` under `d` and runs every host-side check on it."""
  handler.save(d / "item", args=FastPersistSave(tree))
  leaves = saved_leaves(tree)
  check_verify_and_inspect(capsys, d / "item", leaves)
  check_safetensors(capsys, d / "item", d / "st", leaves)
  check_orbax(capsys, d / "item", d / "orbax", leaves)


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(tree=round_trip_trees)
@example(tree=adamw_state())
@example(tree={"a": np.ones(3, np.float32), "z": np.zeros((0,), np.float32)})
@example(tree={"_": np.float32(-0.5), "_/": 0})
@example(tree={"q": np.arange(-8, 8, dtype=np.int8).astype(ml_dtypes.int4), "e": optax.EmptyState()})
def test_property_every_round_trip_tree_verifies_inspects_and_exports(handler, tmp_path_factory,
                                                                    capsys, tree):
  check_tools(capsys, handler, tmp_path_factory.mktemp("tools"), tree)
