"""Orbax's per-item save options: `SaveArgs(dtype=)` casts at save time (and
Orbax v1's storage-options dtype), per-item custom metadata returned by
`item_metadata`, and v1's partial_load."""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import (CorruptCheckpointError, FastPersistCheckpointableHandler,
                             FastPersistHandler, FastPersistRestore, FastPersistSave,
                             InvalidOptionsError, RestoreMismatchError, UnsupportedLeafError,
                             checkpointables_registry, disk_format)
from fastpersist_jax.cli import inspect as inspect_cli
from fastpersist_jax.cli import verify as verify_cli


@pytest.fixture(scope="module")
def handler():
  h = FastPersistHandler()
  yield h
  h.close()


def _state(mesh):
  rng = np.random.default_rng(0)
  master = (rng.standard_normal((64, 32)) * 3.3).astype(np.float32)
  return {"w": jax.device_put(master, NamedSharding(mesh, P("data", "model"))),
          "host": rng.standard_normal(40),            # float64 numpy
          "step": 12, "key": jax.random.key(3)}


def _save(handler, directory, state, **kwargs):
  handler.save(directory, args=FastPersistSave(state, **kwargs))
  handler.finalize(directory)


# SaveArgs(dtype=) ----------------------------------------------------------

def test_save_args_dtype_stores_the_cast_bit_exact_and_restores_into_either_dtype(
    handler, mesh, tmp_path):
  state = _state(mesh)
  _save(handler, tmp_path / "c", state,
        save_args={"w": ocp.SaveArgs(dtype=jnp.bfloat16), "host": ocp.SaveArgs(dtype=np.float16)})
  meta = handler.metadata(tmp_path / "c")
  assert meta["w"].dtype == jnp.bfloat16 and meta["host"].dtype == np.float16
  assert meta["key"].dtype == state["key"].dtype          # uncast leaves as they are
  as_saved = handler.restore(tmp_path / "c", args=FastPersistRestore())
  want_w = np.asarray(state["w"].astype(jnp.bfloat16))
  assert as_saved["w"].dtype == jnp.bfloat16
  assert np.asarray(as_saved["w"]).tobytes() == want_w.tobytes()
  assert as_saved["w"].sharding.is_equivalent_to(state["w"].sharding, 2)
  assert np.asarray(as_saved["host"]).tobytes() == state["host"].astype(np.float16).tobytes()
  # A float32 target gets the stored bfloat16 values widened: what
  # astype(bfloat16).astype(float32) gives, not the original master weights.
  target = {"w": jax.ShapeDtypeStruct((64, 32), jnp.float32, sharding=state["w"].sharding)}
  widened = handler.restore(tmp_path / "c", args=FastPersistRestore(target))["w"]
  assert widened.dtype == jnp.float32
  assert np.array_equal(np.asarray(widened), want_w.astype(np.float32))
  assert not np.array_equal(np.asarray(widened), np.asarray(state["w"]))
  # The save read the caller's arrays, never changed them.
  assert state["w"].dtype == jnp.float32


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(values=st.lists(st.floats(width=32, allow_nan=False), min_size=1, max_size=24),
       dtype=st.sampled_from([jnp.bfloat16, np.float16, ml_dtypes.float8_e4m3fn, np.int8,
                              np.uint16]))
def test_any_cast_is_bit_exact_to_astype(handler, mesh, tmp_path_factory, values, dtype):
  x = np.asarray(values, np.float32)
  directory = tmp_path_factory.mktemp("cast")
  with np.errstate(all="ignore"):
    _save(handler, directory, {"x": jnp.asarray(x)}, save_args={"x": ocp.SaveArgs(dtype=dtype)})
    want = np.asarray(jnp.asarray(x).astype(dtype))
  got = handler.restore(directory, args=FastPersistRestore())["x"]
  assert np.asarray(got).dtype == np.dtype(dtype)
  assert np.asarray(got).tobytes() == want.tobytes()


@pytest.mark.parametrize("save_args, error, match", [
    ({"step": ocp.SaveArgs(dtype=np.int16)}, UnsupportedLeafError, r"\['step'\].*arrays, not.*int"),
    ({"key": ocp.SaveArgs(dtype=np.uint32)}, UnsupportedLeafError, r"\['key'\].*PRNG key"),
    ({"w": ocp.SaveArgs(dtype="no-such-dtype")}, UnsupportedLeafError, r"\['w'\].*no-such-dtype"),
    ({"w": ocp.SaveArgs(dtype=np.float64)}, UnsupportedLeafError, r"\['w'\].*no float64"),
    ({"absent": ocp.SaveArgs(dtype=np.float16)}, InvalidOptionsError, r"\['absent'\].*no leaf"),
    ({"w": np.float16}, InvalidOptionsError, r"\['w'\].*expected ocp.SaveArgs"),
])
def test_bad_save_args_are_refused_naming_the_leaf_before_anything_starts(
    mesh, save_args, error, match):
  with pytest.raises(error, match=match):
    FastPersistSave(_state(mesh), save_args=save_args)


def test_tensorstore_layout_fields_are_ignored_with_a_warning(handler, mesh, tmp_path, caplog):
  state = {"w": jnp.ones((8, 8))}
  with caplog.at_level(logging.WARNING, logger="fastpersist_jax"):
    _save(handler, tmp_path / "c", state, save_args={"w": ocp.SaveArgs(chunk_byte_size=1 << 20)})
  assert any("chunk_byte_size" in r.getMessage() and "ignored" in r.getMessage()
             for r in caplog.records)
  got = handler.restore(tmp_path / "c", args=FastPersistRestore())
  assert got["w"].dtype == jnp.float32 and np.array_equal(np.asarray(got["w"]), np.ones((8, 8)))


# Custom metadata --------------------------------------------------------------

def test_custom_metadata_comes_back_from_the_managers_item_metadata(mesh, tmp_path):
  config = {"model": {"layers": 4, "lr": 1e-3, "betas": (0.9, 0.95)}, "data": {"epoch": 2},
            "note": None, "ok": True}
  state = _state(mesh)
  with ocp.CheckpointManager(tmp_path, item_handlers=FastPersistHandler()) as mngr:
    mngr.save(1, args=FastPersistSave(state, custom_metadata=config))
    mngr.save(2, args=FastPersistSave(state))
    mngr.wait_until_finished()
    meta = mngr.item_metadata(1)
    # Tuples read back as lists, as with Orbax's custom metadata (JSON).
    assert meta.custom_metadata == {**config, "model": {**config["model"], "betas": [0.9, 0.95]}}
    assert mngr.item_metadata(2).custom_metadata is None
    # The metadata still maps like the saved tree and serves as a target.
    assert meta["w"].shape == (64, 32) and meta.tree["step"] == 12
    restored = mngr.restore(1, args=FastPersistRestore(meta))
  assert isinstance(restored, dict) and restored["step"] == 12
  assert np.asarray(restored["w"]).tobytes() == np.asarray(state["w"]).tobytes()


@pytest.mark.parametrize("custom_metadata, match", [
    ({1: "int key"}, "dict key 1 is not a str"),
    ({"lr": float("nan")}, "Out of range float"),
    ({"arr": np.zeros(2)}, "ndarray"),
])
def test_custom_metadata_that_is_not_plain_json_is_refused_when_the_args_are_made(
    custom_metadata, match):
  with pytest.raises(UnsupportedLeafError, match=f"custom_metadata must be plain JSON.*{match}"):
    FastPersistSave({"x": np.ones(2)}, custom_metadata=custom_metadata)


def test_damaged_custom_metadata_is_named_and_the_arrays_still_restore(handler, tmp_path):
  _save(handler, tmp_path / "c", {"x": np.arange(4.0)}, custom_metadata={"epoch": 3})
  assert inspect_cli.describe_item(os.fspath(tmp_path / "c"))["custom_metadata"] == {"epoch": 3}
  assert "custom metadata: {\"epoch\": 3}" in inspect_cli.format_item(
      inspect_cli.describe_item(os.fspath(tmp_path / "c")))
  assert verify_cli.verify(os.fspath(tmp_path / "c"))[0].ok
  path = tmp_path / "c" / disk_format.CUSTOM_METADATA_FILE
  path.write_bytes(path.read_bytes().replace(b'"epoch":3', b'"epoch":4'))
  with pytest.raises(CorruptCheckpointError, match="custom_metadata.json"):
    handler.metadata(tmp_path / "c")
  [report] = verify_cli.verify(os.fspath(tmp_path / "c"))
  assert not report.ok and "custom_metadata.json" in report.damage[0]
  got = handler.restore(tmp_path / "c", args=FastPersistRestore())
  assert np.array_equal(got["x"], np.arange(4.0))


_json = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=8)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=6),
                                                                       children, max_size=4),
    max_leaves=12)


@settings(max_examples=40, deadline=None)
@given(value=_json)
def test_any_plain_json_custom_metadata_reads_back_equal(tmp_path_factory, value):
  directory = tmp_path_factory.mktemp("meta")
  (directory / disk_format.CUSTOM_METADATA_FILE).write_bytes(
      disk_format.encode_custom_metadata(value))
  assert disk_format.read_custom_metadata(os.fspath(directory)) == value


# Orbax v1 ------------------------------------------------------------------------

def _v1_context(**options):
  return ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
      registry=checkpointables_registry()), **options)


@pytest.fixture
def _fresh_shared_pools():
  yield
  FastPersistCheckpointableHandler.close_shared()


def test_v1_storage_dtype_global_and_scoped(mesh, tmp_path, _fresh_shared_pools):
  state = _state(mesh)
  del state["key"]

  def scoped(keypath, value):
    del value
    name = jax.tree_util.keystr(keypath)
    if "host" in name:
      return ocp.v1.options.ArrayOptions.Saving.StorageOptions(dtype=np.float32)
    return None

  array_options = ocp.v1.options.ArrayOptions(saving=ocp.v1.options.ArrayOptions.Saving(
      storage_options=ocp.v1.options.ArrayOptions.Saving.StorageOptions(dtype=jnp.bfloat16),
      scoped_storage_options_creator=scoped))
  with _v1_context(array_options=array_options):
    with ocp.v1.training.Checkpointer(tmp_path) as ckptr:
      ckptr.save_pytree(1, state)
      ckptr.wait()
      got = ckptr.load_pytree(1)
  assert got["w"].dtype == jnp.bfloat16
  assert np.asarray(got["w"]).tobytes() == np.asarray(state["w"].astype(jnp.bfloat16)).tobytes()
  assert np.asarray(got["host"]).tobytes() == state["host"].astype(np.float32).tobytes()
  assert got["step"] == 12    # scalars are not arrays: no cast


def test_v1_partial_load_keeps_the_targets_extra_leaves(mesh, tmp_path, _fresh_shared_pools):
  saved = {"w": np.arange(6.0)}
  target = {"w": jax.ShapeDtypeStruct((6,), np.float64), "new_head": np.full(3, 7.0)}
  with _v1_context():
    with ocp.v1.training.Checkpointer(tmp_path) as ckptr:
      ckptr.save_pytree(1, saved)
      ckptr.wait()
      # Orbax v1 wraps a handler's load error in its NoEntryError; ours is the cause.
      with pytest.raises(Exception) as raised:
        ckptr.load_pytree(1, target)
      assert isinstance(raised.value.__cause__, RestoreMismatchError)
      assert "['new_head']" in str(raised.value.__cause__)
  loading = ocp.v1.options.PyTreeOptions(loading=ocp.v1.options.PyTreeOptions.Loading(
      partial_load=True))
  with _v1_context(pytree_options=loading):
    with ocp.v1.training.Checkpointer(tmp_path) as ckptr:
      got = ckptr.load_pytree(1, target)
  assert np.array_equal(got["w"], saved["w"]) and np.array_equal(got["new_head"], np.full(3, 7.0))


def test_v1_step_custom_metadata_is_orbaxs_and_reads_back(tmp_path, _fresh_shared_pools):
  with _v1_context():
    with ocp.v1.training.Checkpointer(tmp_path) as ckptr:
      ckptr.save_pytree(1, {"w": np.ones(3)}, custom_metadata={"run": "a", "epoch": 1})
      ckptr.wait()
      # (pytree_metadata looks for Orbax's own PyTree files: README's limits.)
      meta = ckptr.checkpointables_metadata(1)
  assert meta.custom_metadata == {"run": "a", "epoch": 1}
  assert meta.metadata["state"]["w"].shape == (3,)
  raw = json.loads((tmp_path / "1" / "state" / "fastpersist.json").read_text())
  assert raw["format"] == "fastpersist"
