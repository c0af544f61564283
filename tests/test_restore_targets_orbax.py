"""Restore targets as Orbax users write them: Orbax v1's abstract leaves
(NumpyShapeDtype, the types `int` / `float`, PLACEHOLDER), optax's empty
states, and None leaves, through the v1 handler and FastPersistRestore.

Where Orbax defines the result, the expected value is what Orbax's own
handlers return for the same tree (test_same_results_as_orbax_v1_pytree_handler
runs Orbax's v1 PyTreeHandler on it)."""

from __future__ import annotations

import asyncio
import re

import helpers  # sets XLA_FLAGS before jax is imported
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
import pytest
from hypothesis import given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P
# Orbax 0.12.8 exports no public name for its abstract numpy leaf.
from orbax.checkpoint.experimental.v1._src.serialization.numpy_leaf_handler import (
    NumpyMetadata, NumpyShapeDtype)

from fastpersist_jax import (FastPersistCheckpointableHandler, FastPersistHandler,
                             FastPersistOptions, FastPersistRestore, FastPersistSave,
                             RestoreMismatchError, UnsupportedLeafError, checkpointables_registry,
                             treepath)
from helpers import MiB, assert_trees_equal, raw_bytes

PLACEHOLDER = ocp.v1.PLACEHOLDER


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((4, 2), ("data", "model"))


@pytest.fixture(scope="module", autouse=True)
def _close_shared_pools():
  yield
  FastPersistCheckpointableHandler.close_shared()


def _context():
  return ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
      registry=checkpointables_registry()))


def _params(mesh):
  rng = np.random.default_rng(0)
  return {"w": jax.device_put(rng.standard_normal((16, 8)).astype(np.float32),
                              NamedSharding(mesh, P("data", "model"))),
          "b": jax.device_put(rng.standard_normal((8,)).astype(np.float32),
                              NamedSharding(mesh, P()))}


def _tree(mesh):
  """Every kind of saved leaf the targets below address."""
  params = _params(mesh)
  opt = optax.adamw(1e-3).init(params)
  grads = jax.tree.map(lambda p: p * 0.5 + 1, params)
  _, opt = optax.adamw(1e-3).update(grads, opt, params)   # non-zero moments, count 1
  return {"params": params, "opt": opt,
          "host": np.arange(12, dtype=np.int16).reshape(3, 4),
          "step": 3, "lr": 2.5, "flag": True, "name": "run-7", "none": None, "empty": {}}


@pytest.fixture(scope="module")
def saved(mesh, tmp_path_factory):
  """(tree, step directory, item directory): saved once through ocp.v1."""
  tree = _tree(mesh)
  root = tmp_path_factory.mktemp("v1")
  with _context(), ocp.v1.training.Checkpointer(root) as ckptr:
    ckptr.save_pytree(1, tree)
  return tree, root / "1", root / "1" / "state"


def _load(step_dir, abstract):
  with _context():
    return ocp.v1.load_checkpointables(step_dir, {"state": abstract})["state"]


def _load_refused(step_dir, abstract, match: str) -> None:
  """Asserts the load raises RestoreMismatchError matching `match` (Orbax
  wraps every error of a handler's load in its NoEntryError)."""
  with pytest.raises(Exception) as info:
    _load(step_dir, abstract)
  cause = info.value
  while cause is not None and not isinstance(cause, RestoreMismatchError):
    cause = cause.__cause__
  assert cause is not None, info.value
  assert re.search(match, str(cause)), str(cause)


def _abstract(tree):
  """`tree` with each jax.Array a jax.ShapeDtypeStruct on its sharding
  (jax.eval_shape refuses the str leaf)."""
  return jax.tree.map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
      if isinstance(x, jax.Array) else x, tree, is_leaf=treepath.is_empty_node)


def _placeholders(tree):
  """`tree` with every leaf (and empty node) a PLACEHOLDER."""
  return jax.tree.map(lambda _: PLACEHOLDER, tree, is_leaf=treepath.is_empty_node)


# The smallest input ---------------------------------------------------

def test_adamw_state_from_eval_shape_loads_bit_exact(mesh, tmp_path):
  """jax.eval_shape(optax.adamw(...).init, params) was refused (its
  EmptyState()), so load_pytree fell to Orbax's PyTreeHandler and failed."""
  params = _params(mesh)
  tx = optax.adamw(1e-3)
  state = {"params": params, "opt": tx.init(params)}
  _, state["opt"] = tx.update(jax.tree.map(jnp.ones_like, params), state["opt"], params)
  abstract = {"params": jax.eval_shape(lambda: params),
              "opt": jax.eval_shape(tx.init, params)}
  assert FastPersistCheckpointableHandler().is_abstract_handleable(abstract["opt"])
  # (Orbax's load resolves eval_shape's abstract meshes to the one set.)
  with _context(), jax.set_mesh(mesh), ocp.v1.training.Checkpointer(tmp_path) as ckptr:
    ckptr.save_pytree(1, state)
    got = ckptr.load_pytree(1, abstract)
  assert_trees_equal(state, got)   # ScaleByAdamState, EmptyState(), EmptyState(): as saved
  assert type(got["opt"][1]) is optax.EmptyState


# One test per kind of v1 abstract leaf ----------------------------------------

def test_numpy_shape_dtype_restores_numpy_arrays(saved):
  tree, step_dir, _ = saved
  target = _placeholders(tree)
  target["host"] = NumpyShapeDtype((3, 4), np.dtype(np.int16))
  target["params"]["w"] = NumpyShapeDtype((16, 8), np.dtype(np.float32))     # a saved jax.Array
  target["params"]["b"] = NumpyShapeDtype((8,), np.dtype(np.float64))        # a cast
  target["step"] = NumpyShapeDtype((), np.dtype(np.int32))                   # a saved int
  target["lr"] = NumpyMetadata((), np.dtype(np.float32), None)   # what v1 metadata describes
  got = _load(step_dir, target)
  assert raw_bytes(got["host"]) == raw_bytes(tree["host"]) and type(got["host"]) is np.ndarray
  w = got["params"]["w"]
  assert type(w) is np.ndarray and raw_bytes(w) == raw_bytes(tree["params"]["w"])
  b = got["params"]["b"]
  assert type(b) is np.ndarray and b.dtype == np.float64
  assert b.tobytes() == np.asarray(tree["params"]["b"]).astype(np.float64).tobytes()
  for key, want in (("step", np.array(3, np.int32)), ("lr", np.array(2.5, np.float32))):
    assert type(got[key]) is np.ndarray and raw_bytes(got[key]) == raw_bytes(want), key
  assert jax.tree.leaves(got["opt"]) == jax.tree.leaves(target["opt"]) == [PLACEHOLDER] * 7


def test_scalar_types_restore_python_scalars_of_that_type(saved):
  tree, step_dir, _ = saved
  target = _placeholders(tree)
  target.update(step=float, lr=float, flag=int)
  got = _load(step_dir, target)
  assert (type(got["step"]), got["step"]) == (float, 3.0)
  assert (type(got["lr"]), got["lr"]) == (float, 2.5)
  assert (type(got["flag"]), got["flag"]) == (int, 1)
  target.update(step=int, lr=float, flag=bool)   # the saved types
  got = _load(step_dir, target)
  assert [(type(got[k]), got[k]) for k in ("step", "lr", "flag")] == [
      (int, 3), (float, 2.5), (bool, True)]
  # A scalar type where an array was saved: a shape mismatch, named.
  _load_refused(step_dir, dict(_placeholders(tree), host=int), r"leaf \['host'\]: target shape \(\)")
  # Orbax's PyTreeHandler returns int(2.5) == 2 here; FastPersist never
  # changes a value in a cast to a Python scalar (as with a target of 0).
  _load_refused(step_dir, dict(_placeholders(tree), lr=int),
                r"leaf \['lr'\]: the saved 2.5 would change")


def test_placeholder_leaves_are_not_restored(saved):
  tree, step_dir, item = saved
  target = _abstract(tree)
  target["params"]["w"] = PLACEHOLDER
  target["step"] = PLACEHOLDER
  target["opt"] = PLACEHOLDER   # a whole sub-tree
  got = _load(step_dir, target)
  assert got["params"]["w"] is PLACEHOLDER and got["step"] is PLACEHOLDER
  assert got["opt"] is PLACEHOLDER
  assert raw_bytes(got["params"]["b"]) == raw_bytes(tree["params"]["b"])
  # Nothing of a placeholder's data is read (v0: the handler's figures).
  handler = FastPersistHandler()
  try:
    handler.restore(item, args=FastPersistRestore(_placeholders(tree)))
    assert handler.last_restore_stats["bytes"] == 0
  finally:
    handler.close()


def test_empty_states_come_back_as_the_targets_own(saved):
  tree, step_dir, _ = saved
  target = _placeholders(tree)
  target["opt"] = (PLACEHOLDER, optax.EmptyState(), optax.EmptyState())
  target["empty"] = {}
  got = _load(step_dir, target)
  assert type(got["opt"][1]) is optax.EmptyState and type(got["opt"][2]) is optax.EmptyState
  assert got["empty"] == {}


def test_shape_dtype_struct_with_sharding_places_the_array(saved, mesh):
  tree, step_dir, _ = saved
  target = _placeholders(tree)
  sharding = NamedSharding(mesh, P("model", "data"))   # another layout: resharded
  target["params"]["w"] = jax.ShapeDtypeStruct((16, 8), np.float32, sharding=sharding)
  got = _load(step_dir, target)["params"]["w"]
  assert isinstance(got, jax.Array) and got.sharding == sharding
  assert raw_bytes(got) == raw_bytes(tree["params"]["w"])


# None target leaves -----------------------------------------------------------

def _none_target(tree):
  """Every array and scalar leaf None; the saved None and {} as they are."""
  target = jax.tree.map(lambda _: None, tree, is_leaf=treepath.is_empty_node)
  target["empty"] = None   # a saved empty node under None: restored as saved ({})
  return target


def test_none_target_leaf_is_not_restored_v1(saved):
  tree, step_dir, _ = saved
  target = _none_target(tree)
  target["params"]["b"] = _abstract(tree["params"]["b"])
  got = _load(step_dir, target)
  assert raw_bytes(got["params"]["b"]) == raw_bytes(tree["params"]["b"])
  got["params"]["b"] = None
  assert got == dict(_none_target(tree), empty={})


def test_none_target_leaf_is_not_restored_v0(saved):
  tree, _, item = saved
  handler = FastPersistHandler(FastPersistOptions(host_memory_limit=16 * MiB,
                                                  staging_slab_bytes=1 * MiB))
  try:
    got = handler.restore(item, args=FastPersistRestore(_none_target(tree)))
    assert got == dict(_none_target(tree), empty={})
    assert handler.last_restore_stats["bytes"] == 0   # nothing read
    target = _none_target(tree)
    target["host"] = np.zeros((3, 4), np.int16)
    got = handler.restore(item, args=FastPersistRestore(target))
    assert raw_bytes(got["host"]) == raw_bytes(tree["host"])
    assert handler.last_restore_stats["bytes"] == tree["host"].nbytes
    # A None leaf the checkpoint lacks is still refused, named.
    with pytest.raises(RestoreMismatchError, match=r"\['nope'\] of the restore target is not"):
      handler.restore(item, args=FastPersistRestore({"nope": None}))
  finally:
    handler.close()


# The same results as Orbax's own handler ----------------------------------------

def _orbax_comparable(x):
  if isinstance(x, jax.Array):
    return ("jax.Array", raw_bytes(x))
  if isinstance(x, np.ndarray):
    return ("ndarray", raw_bytes(x))
  return (type(x).__name__, x)


def test_same_results_as_orbax_v1_pytree_handler(mesh, tmp_path):
  """Orbax's PyTreeHandler (ocp.v1's global registry) and FastPersist's,
  on one tree and one abstract target holding every kind of v1 leaf both
  accept (Orbax's cannot save numpy scalars, nor restore a saved Python
  scalar into a jax.ShapeDtypeStruct: neither is here)."""
  tree = {"a": _params(mesh)["w"], "b": _params(mesh)["b"], "c": jnp.arange(6),
          "n": np.arange(4, dtype=np.int16), "m": np.ones(3, np.float32),
          "i": 3, "j": 4, "f": 2.5, "g": 1.0, "k": 5, "p": 6.5}
  abstract = {"a": jax.ShapeDtypeStruct((16, 8), np.float32, sharding=tree["a"].sharding),
              "b": NumpyShapeDtype((8,), np.dtype(np.float32)),
              "c": None, "m": PLACEHOLDER,
              "n": NumpyShapeDtype((4,), np.dtype(np.float32)),
              "i": int, "j": float, "f": float, "g": int,
              "k": None, "p": PLACEHOLDER}
  with ocp.v1.training.Checkpointer(tmp_path / "orbax") as ckptr:   # Orbax's handlers
    ckptr.save_pytree(1, tree)
    want = ckptr.load_pytree(1, abstract)
  with _context(), ocp.v1.training.Checkpointer(tmp_path / "fp") as ckptr:
    ckptr.save_pytree(1, tree)
    got = ckptr.load_pytree(1, abstract)
  assert jax.tree.structure(got) == jax.tree.structure(want)
  assert ({k: _orbax_comparable(v) for k, v in got.items()} ==
          {k: _orbax_comparable(v) for k, v in want.items()})
  assert got["a"].sharding.is_equivalent_to(tree["a"].sharding, 2)


# Handleability agrees with what save and restore accept --------------------------

_TARGET_LEAVES = [
    (jax.ShapeDtypeStruct((), np.int32), True), (jnp.int32(0), True), (np.zeros(()), True),
    (np.int32(0), True), (NumpyShapeDtype((), np.dtype(np.int64)), True),
    (int, True), (float, True), (bool, True), (0, True), (0.5, True), ("s", True),
    (None, True), (PLACEHOLDER, True), ({}, True), ([], True), ((), True),
    (optax.EmptyState(), True),
    (object(), False), (lambda: 0, False), (str, False), (type("T", (), {}), False),
    (NumpyShapeDtype(None, None), False), (NumpyShapeDtype((2,), "not a dtype"), False),
]


@pytest.mark.parametrize("leaf,accepted", _TARGET_LEAVES,
                         ids=[f"{type(x).__name__}-{i}" for i, (x, _) in enumerate(_TARGET_LEAVES)])
def test_abstract_handleable_is_exactly_what_a_restore_accepts(saved, leaf, accepted):
  tree, _, item = saved
  handler = FastPersistCheckpointableHandler()
  assert handler.is_abstract_handleable({"step": leaf}) is accepted
  try:
    FastPersistCheckpointableHandler()._handler().restore(
        item, args=FastPersistRestore({"step": leaf}))
    refused = None
  except RestoreMismatchError as e:   # a refused kind, or a leaf that does not fit
    refused = e
  assert (refused is not None and "is not a restore target" in str(refused)) is not accepted, refused


def test_abstract_handleable_refuses_keys_no_save_records():
  handler = FastPersistCheckpointableHandler()
  assert not handler.is_abstract_handleable({(1, 2): jax.ShapeDtypeStruct((), np.int32)})
  assert handler.is_abstract_handleable(None) and handler.is_abstract_handleable(PLACEHOLDER)


def test_handleable_is_exactly_what_a_save_accepts(mesh):
  handler = FastPersistCheckpointableHandler()
  good = _tree(mesh)
  assert handler.is_handleable(good)
  FastPersistSave(good)   # checks the tree as the save will
  for bad in ({"a": object()}, {"s": np.array(["a", "b"])}, {(1, 2): jnp.ones(2)},
              {"k": 1 << 20_000}, {"o": optax.adamw(1e-3)}):
    assert not handler.is_handleable(bad), bad
    with pytest.raises(UnsupportedLeafError):
      FastPersistSave(bad)


# Property: placeholders and Nones leave every other leaf bit-exact -------------

_KIND = st.sampled_from(["keep", "keep", "placeholder", "none"])


@settings(max_examples=25, deadline=None)
@given(st.data())
def test_any_leaves_skipped_leave_the_rest_bit_exact(saved, data):
  tree, _, item = saved
  flat, treedef = jax.tree_util.tree_flatten(tree, is_leaf=treepath.is_empty_node)
  kinds = data.draw(st.lists(_KIND, min_size=len(flat), max_size=len(flat)))
  abstract = jax.tree_util.tree_flatten(_abstract(tree),
                                        is_leaf=treepath.is_empty_node)[0]
  target_leaves = []
  for kind, x, a in zip(kinds, flat, abstract):
    if kind == "placeholder":
      target_leaves.append(PLACEHOLDER)
    elif kind == "none" and not treepath.is_empty_node(x):
      target_leaves.append(None)
    else:
      target_leaves.append(a)   # the array's abstract leaf, or the saved value
  target = jax.tree_util.tree_unflatten(treedef, target_leaves)
  handler = FastPersistCheckpointableHandler()

  async def load():
    return await (await handler.load(item, target))

  for got in (asyncio.run(load()),
              handler._handler().restore(item, args=FastPersistRestore(target))):
    got_flat = jax.tree_util.tree_flatten(got, is_leaf=treepath.is_empty_node)[0]
    assert len(got_flat) == len(flat)
    for t, x, g in zip(target_leaves, flat, got_flat):
      if t is PLACEHOLDER or t is None:
        assert g is t
      elif isinstance(x, (jax.Array, np.ndarray)):
        assert raw_bytes(g) == raw_bytes(x) and type(g) is type(x)
      else:
        assert type(g) is type(x) and g == x


def test_partial_restore_keeps_the_target_value_where_the_checkpoint_has_no_leaf(tmp_path):
  """Orbax's partial_restore: keys the checkpoint lacks keep the target's
  values; without it such a key is refused, naming the leaf and the option."""
  saved = {"params": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, "step": 7}
  mngr = ocp.CheckpointManager(tmp_path, item_handlers=FastPersistHandler())
  mngr.save(1, args=FastPersistSave(saved))
  mngr.wait_until_finished()
  new_leaf = np.full(5, 2.5, np.float32)
  target = {"params": {"w": jax.ShapeDtypeStruct((3, 4), np.float32), "b": new_leaf},
            "step": 0, "ema": {"w": np.zeros((3, 4), np.float32)}}
  out = mngr.restore(1, args=FastPersistRestore(target, partial_restore=True))
  np.testing.assert_array_equal(np.asarray(out["params"]["w"]), saved["params"]["w"])
  assert out["params"]["b"] is new_leaf and out["step"] == 7
  np.testing.assert_array_equal(out["ema"]["w"], np.zeros((3, 4), np.float32))
  with pytest.raises(RestoreMismatchError,
                     match=r"\['ema'\]\['w'\].*not in the checkpoint.*partial_restore"):
    mngr.restore(1, args=FastPersistRestore(target))
  mngr.close()
