"""Pytree key paths as JSON, and back.

Leaves are identified on disk by their key path, so a checkpoint can be
restored into a target of the same structure, a sub-tree of it, or (with no
target) into nested dicts/lists the way Orbax does. A target's leaves are
matched to saved ones by their keys' names and indices, not by the kind of
node holding them (as Orbax does): a namedtuple's field `a`, a dataclass
attribute `a` and a dict key "a" are the same entry, so the tree
`item_metadata` returns (plain dicts and lists) is a valid restore target.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax import tree_util

from fastpersist_jax.errors import CorruptCheckpointError

# One key path entry on disk: ["d", key] dict key, ["s", i] sequence index,
# ["a", name] attribute (dataclasses, namedtuples), ["f", i] flattened index.
KeyEntry = list


# Identities of the exact types of common leaves: is_empty_node answers
# False for them first (it runs once per node of every target flattened;
# 10,000 leaves). By identity: a class need not be hashable.
_LEAF_TYPE_IDS = frozenset(map(id, (jax.ShapeDtypeStruct, np.ndarray, bool, int, float, complex,
                                    str)))


def is_empty_node(x: Any) -> bool:
  """None, or a pytree node with no children ({}, [], (), optax.EmptyState())."""
  if x is None:
    return True
  if id(type(x)) in _LEAF_TYPE_IDS or isinstance(x, jax.Array):
    return False
  if type(x) in (dict, list, tuple):
    return not x
  if isinstance(x, (np.ndarray, np.generic, int, float, complex, str)):
    return False
  children = tree_util.default_registry.flatten_one_level(x)
  return children is not None and not list(children[0])


def empty_node_kind(x: Any) -> str:
  """How an empty node is recorded (disk_format.LEAF_KINDS): a restore without a
  target rebuilds {} / [] / () / None as Orbax's handlers do (an empty
  custom node, such as optax.EmptyState(), comes back as None there too)."""
  if x is None:
    return "none"
  if isinstance(x, dict):
    return "empty_dict"
  if isinstance(x, list):
    return "empty_list"
  if type(x) is tuple:
    return "empty_tuple"
  return "empty_node"


def flatten(tree: Any) -> tuple[list[tuple[tuple, Any]], Any]:
  """Flattens to [(key_path, leaf)], keeping None/empty containers as leaves."""
  return tree_util.tree_flatten_with_path(tree, is_leaf=is_empty_node)


def encode(path: tuple) -> list[KeyEntry]:
  out = []
  for k in path:
    if isinstance(k, tree_util.DictKey):
      key = k.key
      if not isinstance(key, (str, int)) or isinstance(key, bool):
        raise TypeError(f"dict keys must be str or int to be checkpointed, got {key!r}")
      out.append(["d", key])
    elif isinstance(k, tree_util.SequenceKey):
      out.append(["s", k.idx])
    elif isinstance(k, tree_util.GetAttrKey):
      out.append(["a", k.name])
    elif isinstance(k, tree_util.FlattenedIndexKey):
      out.append(["f", k.key])
    else:
      raise TypeError(f"unsupported key path entry {k!r}")
  return out


def to_str(path: tuple | list) -> str:
  """A path for messages, as jax.tree_util.keystr writes it: ['params'][0].w
  (so a sequence index [0], a dict key ['a'] and an attribute .a differ)."""
  parts = []
  for k in path:
    if isinstance(k, list):
      kind, key = k
      parts.append(f".{key}" if kind == "a" else f"[{key!r}]" if kind == "d" else f"[{key}]")
    else:
      parts.append(str(k))
  return "".join(parts) or "<root>"


class LazyName:
  """A path that becomes its to_str() text only when formatted (in an error
  message): restoring 10,000 leaves should not format 10,000 names."""

  __slots__ = ("_path",)

  def __init__(self, path: tuple | list):
    self._path = path

  def __str__(self) -> str:
    return to_str(self._path)

  def __format__(self, spec: str) -> str:
    return format(str(self), spec)


def key_of(path: tuple | list) -> tuple:
  """A hashable identity for a path, equal for live and decoded paths: the
  keys alone, so that a dict key, attribute or namedtuple field of one name
  match each other, and a sequence index matches the same position. Raises
  TypeError for a live path holding a key no save records (see encode)."""
  if path and not isinstance(path[0], list):
    return tuple([_live_key(k) for k in path])
  return tuple([entry[1] for entry in path])


def _live_key(k: Any) -> Any:
  """The key of one jax key path entry, as encode() records it; raises
  TypeError where encode() does (a dict key other than str or int, a key
  path entry of another kind)."""
  kind = type(k)
  if kind is tree_util.DictKey and type(k.key) in (str, int):  # pylint: disable=unidiomatic-typecheck
    return k.key
  if kind is tree_util.SequenceKey:
    return k.idx
  if kind is tree_util.GetAttrKey:
    return k.name
  return encode((k,))[0][1]


def validate(path: Any) -> list[KeyEntry]:
  if not isinstance(path, list):
    raise CorruptCheckpointError(f"key path must be a list, got {type(path).__name__}")
  for entry in path:
    if (not isinstance(entry, list) or len(entry) != 2 or entry[0] not in ("d", "s", "a", "f")):
      raise CorruptCheckpointError(f"malformed key path entry {entry!r}")
    kind, key = entry
    if kind in ("s", "f") and (not isinstance(key, int) or isinstance(key, bool) or key < 0):
      raise CorruptCheckpointError(f"malformed key path index {entry!r}")
    if kind == "a" and not isinstance(key, str):
      raise CorruptCheckpointError(f"malformed key path attribute {entry!r}")
    if kind == "d" and (not isinstance(key, (str, int)) or isinstance(key, bool)):
      raise CorruptCheckpointError(f"malformed key path dict key {entry!r}")
  return path


def unflatten_as_nested(items: list[tuple[list[KeyEntry], Any]]) -> Any:
  """Builds nested dicts/lists from decoded paths (restore without a target).

  Sequence children become lists; dict keys and attributes become dict keys
  (so namedtuples and dataclasses come back as dicts, as with Orbax). Built
  without recursion: a tree nested thousands deep is as fine as JAX's.
  """
  if len(items) == 1 and not items[0][0]:
    return items[0][1]
  root = _Node()
  for path, value in items:
    node = root
    for kind, key in path[:-1]:
      node = node.setdefault((kind, key), _Node())
    kind, key = path[-1]
    node[(kind, key)] = value
  built: dict[int, Any] = {}
  stack = [(root, False)]
  while stack:   # post-order: children before their parent
    node, children_done = stack.pop()
    if not children_done:
      stack.append((node, True))
      stack.extend((child, False) for child in node.values() if isinstance(child, _Node))
      continue
    children = {k: built.pop(id(v)) if isinstance(v, _Node) else v for k, v in node.items()}
    built[id(node)] = _container(children)
  return built[id(root)]


class _Node(dict):
  """An interior node while unflattening (leaf values may be dicts too)."""


def _container(children: dict) -> Any:
  if children and all(kind in ("s", "f") for kind, _ in children):
    indices = sorted(key for _, key in children)
    if indices == list(range(len(indices))):
      by_index = {key: v for (_, key), v in children.items()}
      return [by_index[i] for i in indices]
  return {key: v for (_, key), v in children.items()}
