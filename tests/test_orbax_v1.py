"""Orbax v1 API: FastPersistCheckpointableHandler through ocp.v1's Checkpointer
and free functions, as a user would register and call it."""

from __future__ import annotations

import os
import re
import sys
import threading

import jax
import ml_dtypes
import numpy as np
import orbax.checkpoint as ocp
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import fastpersist_jax
from fastpersist_jax import (FastPersistCheckpointableHandler, FastPersistOptions, SaveError,
                             checkpointable, checkpointables_registry)
from fastpersist_jax import checksums as checksums_lib


@pytest.fixture(scope="module")
def mesh():
  return jax.make_mesh((4, 2), ("data", "model"))


@pytest.fixture(autouse=True)
def _fresh_shared_pools():
  yield
  FastPersistCheckpointableHandler.close_shared()


def _tree(mesh, seed=0):
  rng = np.random.default_rng(seed)
  w = rng.standard_normal((64, 32)).astype(np.float32)
  b = rng.standard_normal((32,)).astype(ml_dtypes.bfloat16)
  return {"params": {"w": jax.device_put(w, NamedSharding(mesh, P("data", "model"))),
                     "b": jax.device_put(b, NamedSharding(mesh, P()))},
          "opt": [jax.device_put(np.arange(64, dtype=np.int32), NamedSharding(mesh, P("data")))],
          "rng": np.arange(4, dtype=np.uint32), "step": 7, "note": None}


def _assert_exact(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    if isinstance(w, (jax.Array, np.ndarray)):
      assert np.asarray(g).dtype == np.asarray(w).dtype
      assert np.asarray(g).tobytes() == np.asarray(w).tobytes()
      if isinstance(w, jax.Array):
        assert g.sharding.is_equivalent_to(w.sharding, w.ndim)
    else:
      assert g == w and type(g) is type(w)


def _abstract(tree):
  return jax.tree.map(ocp.utils.to_shape_dtype_struct, tree)


def test_issue_snippet_checkpointer_save_and_load(mesh, tmp_path):
  """The issue's snippet. Orbax registers its PyTreeHandler for "state"
  globally, so the local registry starts empty here (a registry with the
  global entries is checkpointables_registry(), below)."""
  tree = _tree(mesh)
  reg = ocp.v1.handlers.local_registry(include_global_registry=False)
  reg.add(FastPersistCheckpointableHandler, checkpointable_name="state")
  with ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(registry=reg)):
    with ocp.v1.training.Checkpointer(tmp_path / "ckpt") as ckptr:
      ckptr.save_pytree(1, tree)
      _assert_exact(ckptr.load_pytree(1, _abstract(tree)), tree)
      ckptr.save_checkpointables(2, {"state": tree})
      _assert_exact(ckptr.load_checkpointables(2, {"state": _abstract(tree)})["state"], tree)
      _assert_exact(ckptr.load_pytree(2), tree)   # no target: as saved
  # The items are FastPersist's files (FORMAT.md), committed by Orbax.
  names = sorted(os.listdir(tmp_path / "ckpt" / "1" / "state"))
  assert "fastpersist.json" in names and "manifest.00000.json" in names


def test_readme_snippet(mesh, tmp_path):
  """README's v1 block, run as written (only the directory differs)."""
  text = open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                           "README.md")).read()
  (block,) = [b for b in re.findall(r"```python\n(.*?)```", text, re.S) if "ocp.v1" in b]
  tree = _tree(mesh, seed=6)
  namespace = {"ocp": ocp, "step": 5, "state": tree, "abstract": _abstract(tree)}
  exec(compile(block.replace("/nvme/ckpt", os.fspath(tmp_path / "ckpt")), "README.md", "exec"),
       namespace)  # pylint: disable=exec-used
  assert namespace["state"] is not tree
  _assert_exact(namespace["state"], tree)
  assert (tmp_path / "ckpt" / "5" / "state" / "fastpersist.json").exists()


def test_registry_keeps_orbax_handlers_for_other_checkpointables(mesh, tmp_path):
  tree = _tree(mesh, seed=1)
  ctx = ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
      registry=checkpointables_registry()))
  with ctx:
    ocp.v1.save_checkpointables(tmp_path / "c", {"state": tree, "config": {"lr": 0.5}})
    out = ocp.v1.load_checkpointables(tmp_path / "c", {"state": _abstract(tree), "config": None})
    with ocp.v1.training.Checkpointer(tmp_path / "run") as ckptr:
      ckptr.save_pytree(3, tree, metrics={"loss": 1.25})
      _assert_exact(ckptr.load_pytree(3, _abstract(tree)), tree)
  _assert_exact(out["state"], tree)
  assert out["config"] == {"lr": 0.5}
  assert (tmp_path / "c" / "config").is_dir()   # JsonHandler's, not ours
  assert not (tmp_path / "c" / "config" / "fastpersist.json").exists()


def test_save_returns_after_the_snapshot_and_arrays_may_then_be_deleted(mesh, tmp_path,
                                                                        monkeypatch):
  tree = _tree(mesh, seed=2)
  expected = jax.tree.map(lambda x: np.array(x) if isinstance(x, jax.Array) else x, tree)
  release, writing = threading.Event(), threading.Event()
  real_crc = checksums_lib.crc32c.crc32c

  def held_crc(*a, **kw):   # the background checksums (and so durability) wait for `release`
    writing.set()
    release.wait(60)
    return real_crc(*a, **kw)
  monkeypatch.setattr(checksums_lib.crc32c, "crc32c", held_crc)

  with ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
      registry=checkpointables_registry())):
    with ocp.v1.training.Checkpointer(tmp_path / "ckpt") as ckptr:
      response = ckptr.save_pytree_async(1, tree)
      # Returned while the save is still held: not durable, not committed.
      with pytest.raises(TimeoutError):
        response.result(timeout=0.5)
      assert not (tmp_path / "ckpt" / "1").exists()
      for leaf in jax.tree.leaves(tree):
        if isinstance(leaf, jax.Array):
          leaf.delete()
      release.set()
      assert response.result() is True
      monkeypatch.undo()
      _assert_exact(ckptr.load_pytree(1, _abstract(expected_like(mesh, expected))),
                    expected_like(mesh, expected))
  assert writing.is_set()


def expected_like(mesh, expected):
  """`expected` with its arrays placed as _tree places them."""
  return {"params": {"w": jax.device_put(expected["params"]["w"],
                                         NamedSharding(mesh, P("data", "model"))),
                     "b": jax.device_put(expected["params"]["b"], NamedSharding(mesh, P()))},
          "opt": [jax.device_put(expected["opt"][0], NamedSharding(mesh, P("data")))],
          "rng": expected["rng"], "step": expected["step"], "note": None}


def test_instances_share_one_handler_and_staging_pool(mesh, tmp_path, monkeypatch):
  created = []
  real = checkpointable.FastPersistHandler

  class Counting(real):
    def __init__(self, *a, **kw):
      created.append(self)
      super().__init__(*a, **kw)
  monkeypatch.setattr(checkpointable, "FastPersistHandler", Counting)
  tree = _tree(mesh, seed=3)
  with ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
      registry=checkpointables_registry())):
    with ocp.v1.training.Checkpointer(tmp_path / "ckpt") as ckptr:
      for step in range(3):
        ckptr.save_pytree(step, tree)
      _assert_exact(ckptr.load_pytree(2, _abstract(tree)), tree)
  assert len(created) == 1


def test_tree_larger_than_the_staging_pool_in_copy_mode(mesh, tmp_path):
  """The blocking copy must wait for writes, so the item directory has to
  exist before save returns: ocp.v1's free functions create it only
  afterwards (without the handler's care, this save never returns)."""

  class Small(FastPersistCheckpointableHandler):
    options = FastPersistOptions(snapshot="copy", host_memory_limit=1 << 20,
                                 staging_slab_bytes=256 << 10, commit_timeout_s=20)
  tree = {"x": jax.device_put(np.arange(1 << 20, dtype=np.float32).reshape(1024, 1024),
                              NamedSharding(mesh, P("data", "model")))}   # 4 MiB > the 1 MiB pool
  errors = []
  ctx = ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
      registry=checkpointables_registry(handler_type=Small)))

  def save():
    try:
      with ctx:   # a Context is per thread
        ocp.v1.save_checkpointables(tmp_path / "c", {"state": tree})
    except Exception as e:  # pylint: disable=broad-except
      errors.append(e)
  t = threading.Thread(target=save, daemon=True)
  t.start()
  t.join(120)   # a deadlock breaker, not a timing assertion
  assert not t.is_alive(), "save deadlocked: staging waits for writes into a missing directory"
  assert not errors
  assert (tmp_path / "c" / "state" / "fastpersist.json").exists()
  with ctx:
    _assert_exact(ocp.v1.load_checkpointables(tmp_path / "c", {"state": _abstract(tree)})["state"],
                  tree)


def test_failed_save_raises_and_commits_nothing(mesh, tmp_path, monkeypatch):
  def broken_crc(*a, **kw):
    raise OSError("disk on fire")
  monkeypatch.setattr(checksums_lib.crc32c, "crc32c", broken_crc)
  with ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
      registry=checkpointables_registry())):
    with pytest.raises(SaveError, match="disk on fire"):
      ocp.v1.save_checkpointables(tmp_path / "c", {"state": _tree(mesh)})
  assert not (tmp_path / "c").exists()


def test_metadata_and_handleability(mesh, tmp_path):
  tree = _tree(mesh, seed=4)
  handler = FastPersistCheckpointableHandler()
  assert handler.is_handleable(tree)
  assert not handler.is_handleable({"a": object()})
  assert handler.is_abstract_handleable(_abstract(tree))
  assert not handler.is_abstract_handleable({"a": object()})
  with ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
      registry=checkpointables_registry())):
    ocp.v1.save_checkpointables(tmp_path / "c", {"state": tree})
    meta = ocp.v1.checkpointables_metadata(tmp_path / "c").metadata["state"]
  w = meta["params"]["w"]
  assert (w.shape, w.dtype) == ((64, 32), np.float32)
  assert w.sharding.is_equivalent_to(tree["params"]["w"].sharding, 2)
  assert meta["step"] == 7


def test_orbax_pytree_free_functions_need_orbax_layout(mesh, tmp_path):
  """README: ocp.v1.load / load_pytree / pytree_metadata look for Orbax's own
  PyTree files before any handler runs, so they refuse our items; the
  Checkpointer's load_pytree and load_checkpointables read them."""
  tree = _tree(mesh, seed=5)
  with ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
      registry=checkpointables_registry())):
    ocp.v1.save_checkpointables(tmp_path / "c", {"state": tree})
    with pytest.raises(Exception, match="No valid PyTree checkpointable"):
      ocp.v1.load_pytree(tmp_path / "c")
    _assert_exact(ocp.v1.load_checkpointables(tmp_path / "c")["state"], tree)


def test_two_processes_through_the_v1_api(two_process_runs):
  """Shared directory, replica-parallel parts, through ocp.v1 (tests/mp_worker.py,
  scenario "v1" of conftest.two_process_runs)."""
  import helpers  # pylint: disable=g-import-not-at-top
  results = helpers.batch_results(two_process_runs[1], "v1")
  for files in (r["files"] for r in results):
    assert {"fastpersist.json", "manifest.00000.json", "manifest.00001.json"} <= set(files)
  written = [r["bytes_written"] for r in results]
  assert min(written) > 0.4 * sum(written), written   # both processes wrote their parts


def test_v1_multiprocessing_reads_the_active_context():
  """The one read of Orbax v1's private Context accessor: fails if it moves."""
  assert checkpointable.v1_multiprocessing() == (0, None)
  ctx = ocp.v1.Context(multiprocessing_options=ocp.v1.options.MultiprocessingOptions(
      primary_host=None, active_processes={0}))
  with ctx:
    assert checkpointable.v1_multiprocessing() == (None, frozenset({0}))
  assert fastpersist_jax.FastPersistCheckpointableHandler is FastPersistCheckpointableHandler


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
