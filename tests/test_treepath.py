"""Unit tests of fastpersist_jax/treepath.py: key paths as JSON and back.

Pure functions only (no checkpoint is written). To extend: add a case to the
tables below (a tree and the exact paths/strings it must give), or a property
to the hypothesis tests at the end. Expected values are written out literally;
jax.tree_util.keystr is only a cross-check, never the source of truth.
"""

from __future__ import annotations

import collections
import dataclasses
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import struct
from hypothesis import given, settings, strategies as st
from jax import tree_util

from fastpersist_jax import treepath
from fastpersist_jax.errors import CorruptCheckpointError

NT = collections.namedtuple("NT", "a b")
EmptyNT = collections.namedtuple("EmptyNT", "")


@struct.dataclass
class FlaxState:
  """A flax.struct dataclass: `w` and `b` are children, `step_size` is static."""
  w: object
  b: object
  step_size: float = struct.field(pytree_node=False, default=0.1)


@tree_util.register_dataclass
@dataclasses.dataclass
class JaxDataclass:
  """A dataclass registered with jax.tree_util.register_dataclass."""
  x: object
  y: object


class NoKeys:
  """A node registered without key paths: its children get FlattenedIndexKeys."""

  def __init__(self, *children):
    self.children = children


tree_util.register_pytree_node(NoKeys, lambda n: (n.children, None),
                               lambda _, children: NoKeys(*children))


def encoded_paths(tree) -> list[list]:
  """[encoded key path] of every leaf of `tree` (treepath.flatten order)."""
  return [treepath.encode(path) for path, _ in treepath.flatten(tree)[0]]


# Paths: (tree, [(encoded path, to_str)] in flatten order) ------------------------------

PATH_CASES = {
    "dict keys with odd characters": (
        {"a'b": 1, 'q"': 2, "x\ny": 3, "é": 4, "": 5, "a.b": 6, "[0]": 7},
        [([["d", ""]], "['']"),
         ([["d", "[0]"]], "['[0]']"),
         ([["d", "a'b"]], "[\"a'b\"]"),
         ([["d", "a.b"]], "['a.b']"),
         ([["d", 'q"']], "['q\"']"),
         ([["d", "x\ny"]], "['x\\ny']"),
         ([["d", "é"]], "['é']")]),
    "int dict keys, sorted": (
        {3: "c", -1: "a", 0: "b"},
        [([["d", -1]], "[-1]"), ([["d", 0]], "[0]"), ([["d", 3]], "[3]")]),
    "sequence indices": (
        [10, (20, [30])],
        [([["s", 0]], "[0]"), ([["s", 1], ["s", 0]], "[1][0]"),
         ([["s", 1], ["s", 1], ["s", 0]], "[1][1][0]")]),
    "namedtuple fields are attributes": (
        {"opt": NT(a=1, b=2)},
        [([["d", "opt"], ["a", "a"]], "['opt'].a"), ([["d", "opt"], ["a", "b"]], "['opt'].b")]),
    "flax struct dataclass: children only, not static fields": (
        FlaxState(w=[1, 2], b=3),
        [([["a", "w"], ["s", 0]], ".w[0]"), ([["a", "w"], ["s", 1]], ".w[1]"),
         ([["a", "b"]], ".b")]),
    "jax registered dataclass": (
        [JaxDataclass(x=1, y={"k": 2})],
        [([["s", 0], ["a", "x"]], "[0].x"), ([["s", 0], ["a", "y"], ["d", "k"]], "[0].y['k']")]),
    "node without keys: flattened indices": (
        {"n": NoKeys(5, 6)},
        [([["d", "n"], ["f", 0]], "['n'][0]"), ([["d", "n"], ["f", 1]], "['n'][1]")]),
    "empty nodes are leaves": (
        {"e": {}, "l": [], "t": (), "n": None, "s": optax.EmptyState()},
        [([["d", "e"]], "['e']"), ([["d", "l"]], "['l']"), ([["d", "n"]], "['n']"),
         ([["d", "s"]], "['s']"), ([["d", "t"]], "['t']")]),
}


@pytest.mark.parametrize("tree,expected", PATH_CASES.values(), ids=PATH_CASES.keys())
def test_encoded_paths_and_their_strings(tree, expected):
  assert [(p, treepath.to_str(p)) for p in encoded_paths(tree)] == expected


@pytest.mark.parametrize("tree", [c[0] for n, c in PATH_CASES.items() if "without keys" not in n],
                         ids=[n for n in PATH_CASES if "without keys" not in n])
def test_to_str_writes_paths_as_keystr_does_for_live_and_decoded_paths(tree):
  for path, _ in treepath.flatten(tree)[0]:
    assert treepath.to_str(path) == treepath.to_str(treepath.encode(path)) == tree_util.keystr(path)


def test_flattened_index_keys_are_written_as_plain_indices_once_decoded():
  # keystr writes a FlattenedIndexKey as "[<flat index 1>]"; a decoded path
  # (all that is left on restore) can only say "[1]".
  (path, _), = [pl for pl in treepath.flatten(NoKeys(0, 1))[0] if pl[1] == 1]
  assert tree_util.keystr(path) == "[<flat index 1>]"
  assert treepath.to_str(path) == "[<flat index 1>]"
  assert treepath.to_str(treepath.encode(path)) == "[1]"


def test_the_root_path_is_named_root():
  assert treepath.to_str([]) == "<root>"
  assert treepath.to_str(()) == "<root>"
  assert encoded_paths(np.zeros(3)) == [[]]


@pytest.mark.parametrize("key", [True, 1.5, (1, 2), None, b"k"],
                         ids=["bool", "float", "tuple", "None", "bytes"])
def test_dict_keys_other_than_str_or_int_are_refused(key):
  (path, _), = tree_util.tree_flatten_with_path({key: 1})[0]
  with pytest.raises(TypeError, match="dict keys must be str or int to be checkpointed"):
    treepath.encode(path)


# key_of ----------------------------------------------------------------------


def test_key_of_is_the_same_for_live_and_decoded_paths():
  tree = {"a": [1, NT(2, 3)], "b": FlaxState(4, {"c": 5})}
  keys = [treepath.key_of(path) for path, _ in treepath.flatten(tree)[0]]
  assert keys == [("a", 0), ("a", 1, "a"), ("a", 1, "b"), ("b", "w"), ("b", "b", "c")]
  assert [treepath.key_of(p) for p in encoded_paths(tree)] == keys


def test_key_of_matches_names_and_positions_not_node_kinds():
  def key(tree):
    (path, _), = treepath.flatten(tree)[0]
    return treepath.key_of(path)
  # A dict key, a namedtuple field and a dataclass attribute of one name.
  assert key({"a": 1}) == key(collections.namedtuple("A", "a")(1)) == ("a",)
  (x_path, _), _ = treepath.flatten(JaxDataclass(x=1, y=None))[0]
  assert treepath.key_of(x_path) == ("x",)
  assert treepath.key_of([["a", "x"]]) == treepath.key_of([["d", "x"]]) == ("x",)
  # A sequence index and an int dict key of one value; the string "0" differs.
  assert key([1]) == key({0: 1}) == (0,)
  assert key({"0": 1}) == ("0",) != (0,)
  assert treepath.key_of(()) == treepath.key_of([]) == ()


# validate --------------------------------------------------------------------


def test_validate_returns_a_well_formed_path_as_is():
  path = [["d", "a"], ["d", 3], ["s", 0], ["a", "w"], ["f", 2]]
  assert treepath.validate(path) is path
  assert treepath.validate([]) == []


@pytest.mark.parametrize("path,message", [
    ({"d": "a"}, "key path must be a list, got dict"),
    ("['a']", "key path must be a list, got str"),
    ([("d", "a")], "malformed key path entry ('d', 'a')"),
    ([["d"]], "malformed key path entry ['d']"),
    ([["d", "a", "b"]], "malformed key path entry ['d', 'a', 'b']"),
    ([["x", "a"]], "malformed key path entry ['x', 'a']"),
    ([[["d"], "a"]], "malformed key path entry [['d'], 'a']"),
    ([["s", -1]], "malformed key path index ['s', -1]"),
    ([["s", "0"]], "malformed key path index ['s', '0']"),
    ([["s", True]], "malformed key path index ['s', True]"),
    ([["f", 1.0]], "malformed key path index ['f', 1.0]"),
    ([["a", 3]], "malformed key path attribute ['a', 3]"),
    ([["d", None]], "malformed key path dict key ['d', None]"),
    ([["d", False]], "malformed key path dict key ['d', False]"),
    ([["d", 1.5]], "malformed key path dict key ['d', 1.5]"),
    ([["d", "ok"], ["d", ["nested"]]], "malformed key path dict key ['d', ['nested']]"),
])
def test_validate_refuses_malformed_paths(path, message):
  with pytest.raises(CorruptCheckpointError) as e:
    treepath.validate(path)
  assert str(e.value) == message


# Empty nodes -----------------------------------------------------------------

EMPTY_NODES = {
    "None": (None, "none"),
    "{}": ({}, "empty_dict"),
    "[]": ([], "empty_list"),
    "()": ((), "empty_tuple"),
    "OrderedDict()": (collections.OrderedDict(), "empty_dict"),
    "empty namedtuple": (EmptyNT(), "empty_node"),
    "optax.EmptyState()": (optax.EmptyState(), "empty_node"),
    "NoKeys()": (NoKeys(), "empty_node"),
}

NOT_EMPTY = {
    "0": 0, "0.0": 0.0, "False": False, "0j": 0j, "''": "", "b''": b"", "Ellipsis": ...,
    "np.zeros(0)": np.zeros(0), "jnp.zeros(0)": jnp.zeros(0), "np.float32(0)": np.float32(0),
    "ShapeDtypeStruct": jax.ShapeDtypeStruct((0,), jnp.float32),
    "{'a': None}": {"a": None}, "[None]": [None], "((),)": ((),), "NT(1, 2)": NT(1, 2),
    "FlaxState": FlaxState(None, None),
}


@pytest.mark.parametrize("node,kind", EMPTY_NODES.values(), ids=EMPTY_NODES.keys())
def test_empty_nodes_and_how_they_are_recorded(node, kind):
  assert treepath.is_empty_node(node) is True
  assert treepath.empty_node_kind(node) == kind
  # flatten keeps them as leaves (tree_flatten would drop them).
  assert treepath.flatten({"x": node})[0] == [((tree_util.DictKey("x"),), node)]


@pytest.mark.parametrize("x", NOT_EMPTY.values(), ids=NOT_EMPTY.keys())
def test_leaves_and_non_empty_nodes_are_not_empty_nodes(x):
  assert treepath.is_empty_node(x) is False


# unflatten_as_nested -----------------------------------------------------------


def test_unflatten_builds_lists_for_sequences_and_dicts_for_keys_and_attributes():
  tree = {"p": [1, (2, 3)], "o": NT(a=4, b=[]), "s": FlaxState(w={"k": 5}, b=None),
          "n": NoKeys(6, 7), "i": {2: 8, 0: 9}}
  items = [(treepath.encode(p), v) for p, v in treepath.flatten(tree)[0]]
  assert treepath.unflatten_as_nested(items) == {
      "i": {0: 9, 2: 8},
      "n": [6, 7],
      "o": {"a": 4, "b": []},
      "p": [1, [2, 3]],
      "s": {"b": None, "w": {"k": 5}},
  }


def test_unflatten_of_non_contiguous_indices_gives_a_dict_by_index():
  # A subset of a list (restoring part of a tree) cannot be a list.
  assert treepath.unflatten_as_nested([([["s", 1]], "b"), ([["s", 3]], "d")]) == {1: "b", 3: "d"}
  assert treepath.unflatten_as_nested([([["s", 1]], "b"), ([["s", 0]], "a")]) == ["a", "b"]


def test_unflatten_of_int_dict_keys_stays_a_dict():
  assert treepath.unflatten_as_nested([([["d", 0]], "a"), ([["d", 1]], "b")]) == {0: "a", 1: "b"}


def test_unflatten_keeps_leaf_values_that_are_dicts_or_lists():
  items = [([["d", "e"]], {}), ([["d", "l"]], []), ([["d", "v"]], {"not": "a node"})]
  assert treepath.unflatten_as_nested(items) == {"e": {}, "l": [], "v": {"not": "a node"}}


def test_unflatten_of_a_root_leaf_and_of_nothing():
  assert treepath.unflatten_as_nested([([], 5)]) == 5
  assert treepath.unflatten_as_nested([]) == {}


def _depth_and_leaf(tree, pattern: str) -> tuple[int, object]:
  """Walks `tree` without recursion: lists through [0], dicts through ["k"]
  (asserting the kinds alternate as `pattern`, "ld" or "dl", says)."""
  depth = 0
  while isinstance(tree, (list, dict)):
    want = list if pattern[depth % 2] == "l" else dict
    assert type(tree) is want and len(tree) == 1, (depth, type(tree))
    tree = tree[0] if isinstance(tree, list) else tree["k"]
    depth += 1
  return depth, tree


@pytest.mark.parametrize("depth", [1000, 5000])
def test_unflatten_of_a_deep_path_needs_no_recursion(depth):
  path = [["s", 0] if i % 2 == 0 else ["d", "k"] for i in range(depth)]
  assert depth > sys.getrecursionlimit() - 100   # deep enough to break a recursive version
  out = treepath.unflatten_as_nested([(path, "leaf")])
  assert _depth_and_leaf(out, "ld") == (depth, "leaf")


def test_unflatten_of_two_deep_leaves_sharing_a_prefix():
  prefix = [["d", "k"]] * 2000
  out = treepath.unflatten_as_nested([(prefix + [["s", 1]], "b"), (prefix + [["s", 0]], "a")])
  for _ in range(2000):
    out = out["k"]
  assert out == ["a", "b"]


def test_a_deep_tree_round_trips_through_flatten():
  # jax.tree_util's own flatten recurses (about 990 levels with Python's
  # default limit), so the live tree stays well below that.
  tree = "leaf"
  for i in range(400):
    tree = [tree] if i % 2 else {"k": tree}
  items = [(treepath.encode(p), v) for p, v in treepath.flatten(tree)[0]]
  assert len(items) == 1 and len(items[0][0]) == 400
  assert _depth_and_leaf(treepath.unflatten_as_nested(items), "ld") == (400, "leaf")


# LazyName --------------------------------------------------------------------


def test_lazy_name_formats_as_to_str():
  name = treepath.LazyName([["d", "params"], ["s", 0], ["a", "w"]])
  assert str(name) == "['params'][0].w"
  assert f"leaf {name}: bad" == "leaf ['params'][0].w: bad"
  assert f"{name:>18}|" == "   ['params'][0].w|"
  assert "%s" % name == "['params'][0].w"
  assert str(treepath.LazyName([])) == "<root>"
  (live, _), = treepath.flatten({"a": NT(1, ())})[0][:1]
  assert str(treepath.LazyName(live)) == "['a'].a"


def test_lazy_name_formats_nothing_until_it_is_used(monkeypatch):
  calls = []
  real = treepath.to_str
  monkeypatch.setattr(treepath, "to_str", lambda p: calls.append(p) or real(p))
  names = [treepath.LazyName([["s", i]]) for i in range(1000)]
  assert calls == []
  assert f"{names[7]}" == "[7]"
  assert calls == [[["s", 7]]]


# Properties ------------------------------------------------------------------

_leaf = st.one_of(st.integers(-10, 10), st.none(), st.just({}), st.just([]), st.just(()),
                  st.text(max_size=3))
_trees = st.recursive(
    _leaf,
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=3),
        st.lists(children, min_size=1, max_size=3).map(tuple),
        st.dictionaries(st.text(max_size=4), children, min_size=1, max_size=3),
        st.dictionaries(st.integers(-3, 3), children, min_size=1, max_size=3)),
    max_leaves=12)


def _as_restored(tree):
  """What a restore without a target gives for `tree`: non-empty tuples as
  lists, everything else as it is (empty nodes stay what they were)."""
  if isinstance(tree, dict):
    return {k: _as_restored(v) for k, v in tree.items()}
  if isinstance(tree, (list, tuple)) and tree:
    return [_as_restored(v) for v in tree]
  return tree


@settings(max_examples=150, deadline=None)
@given(_trees)
def test_any_nested_dicts_lists_and_tuples_round_trip(tree):
  flat, _ = treepath.flatten(tree)
  items = [(treepath.validate(treepath.encode(p)), v) for p, v in flat]
  assert treepath.unflatten_as_nested(items) == _as_restored(tree)
  # Names are keystr's (the root's is "<root>"); distinct leaves' identities differ.
  assert [treepath.to_str(p) for p, _ in items] == [tree_util.keystr(p) or "<root>"
                                                    for p, _ in flat]
  keys = [treepath.key_of(p) for p, _ in flat]
  assert keys == [treepath.key_of(p) for p, _ in items]
  assert len(set(keys)) == len(keys)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.one_of(
    st.tuples(st.just("d"), st.one_of(st.text(max_size=3), st.integers(-3, 3))),
    st.tuples(st.sampled_from("sf"), st.integers(0, 5)),
    st.tuples(st.just("a"), st.text(max_size=3))).map(list), max_size=6))
def test_any_valid_encoded_path_is_accepted_and_named(path):
  assert treepath.validate(path) is path
  text = treepath.to_str(path)
  assert text == ("".join(f".{k}" if kind == "a" else f"[{k!r}]" if kind == "d" else f"[{k}]"
                          for kind, k in path) or "<root>")
  assert treepath.key_of(path) == tuple(k for _, k in path)


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
