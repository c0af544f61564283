"""Durable commits: once Orbax's wait returns, the committed step has been
synced after its rename (or commit file), before older steps are deleted.

These tests record what `durability.sync_committed` saw when it ran; that
this is what survives a power cut is tested by tests/test_power_loss.py.
"""

from __future__ import annotations

import logging
import os

import numpy as np
import orbax.checkpoint as ocp
import pytest

import fastpersist_jax as fp
from fastpersist_jax import durability
from helpers import assert_tree_bytes_equal


def state(step: int) -> dict:
  return {"w": np.arange(4096, dtype=np.float32) + step, "step": step}


@pytest.fixture
def syncs(monkeypatch):
  """The calls of sync_committed: (path synced, whether it existed, the
  names in its parent directory then)."""
  calls = []
  real = durability.sync_committed

  def recording(path):
    path = os.fspath(path)
    calls.append((path, os.path.isdir(path), sorted(os.listdir(os.path.dirname(path)))))
    return real(path)
  monkeypatch.setattr(durability, "sync_committed", recording)
  return calls


@pytest.mark.parametrize("asynchronous", [True, False])
def test_manager_syncs_each_step_after_its_rename_before_deleting_old_ones(tmp_path, syncs,
                                                                          asynchronous):
  mngr = ocp.CheckpointManager(
      tmp_path, item_handlers=fp.FastPersistHandler(),
      options=fp.durable_manager_options(max_to_keep=2,
                                         enable_async_checkpointing=asynchronous))
  for step in range(4):
    mngr.save(step, args=fp.FastPersistSave(state(step)))
    mngr.wait_until_finished()
    step_syncs = [c for c in syncs if c[0] == os.fspath(tmp_path / str(step))]
    assert len(step_syncs) == 1
    path, existed, siblings = step_syncs[0]
    assert existed and str(step) in siblings and f"{step}.orbax-checkpoint-tmp" not in siblings
    # The step before the last kept one is deleted only after this sync.
    if step >= 2:
      assert str(step - 2) in siblings
      assert not (tmp_path / str(step - 2)).exists()
    # Each item is synced once renamed too.
    assert any(c[0].endswith(os.path.join(f"{step}.orbax-checkpoint-tmp", "default"))
               for c in syncs)
  assert mngr.all_steps() == [2, 3]
  assert_tree_bytes_equal(state(3), mngr.restore(3, args=fp.FastPersistRestore()))
  mngr.close()


def test_commit_file_mode_syncs_after_the_commit_file(tmp_path, syncs):
  options = fp.durable_manager_options(
      atomicity_options=ocp.options.AtomicityOptions(mode=ocp.options.AtomicityMode.COMMIT_FILE))
  assert options.temporary_path_class is durability.DurableCommitFileTemporaryPath
  mngr = ocp.CheckpointManager(tmp_path, item_handlers=fp.FastPersistHandler(), options=options)
  mngr.save(1, args=fp.FastPersistSave(state(1)))
  mngr.wait_until_finished()
  step_path = os.fspath(tmp_path / "1")
  assert [c[0] for c in syncs].count(step_path) == 1
  assert (tmp_path / "1" / "commit_success.txt").exists()
  assert_tree_bytes_equal(state(1), mngr.restore(1, args=fp.FastPersistRestore()))
  mngr.close()


def test_checkpointer_takes_the_durable_class(tmp_path, syncs):
  ckptr = ocp.AsyncCheckpointer(fp.FastPersistHandler(),
                                temporary_path_class=durability.DurableAtomicRenameTemporaryPath)
  ckptr.save(tmp_path / "c", args=fp.FastPersistSave(state(0)))
  ckptr.wait_until_finished()
  assert syncs[-1][0] == os.fspath(tmp_path / "c") and syncs[-1][1]
  ckptr.close()


def _v1_context():
  return ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
      registry=fp.checkpointables_registry()))


def test_durable_checkpointer_syncs_before_save_and_wait_return(tmp_path, syncs):
  with _v1_context(), fp.DurableCheckpointer(tmp_path) as ckptr:
    assert ckptr.save_pytree(0, state(0)) is True
    assert [c[0] for c in syncs] == [os.fspath(tmp_path / "0")]
    response = ckptr.save_pytree_async(1, state(1))
    assert response.result() is True
    assert syncs[-1][0] == os.fspath(tmp_path / "1") and syncs[-1][1]
    ckptr.save_pytree_async(2, state(2))
    ckptr.wait()
    assert syncs[-1][0] == os.fspath(tmp_path / "2") and syncs[-1][1]
    assert_tree_bytes_equal(state(2), ckptr.load_pytree(2))
  assert len(syncs) == 3   # each step once


def test_warns_once_per_root_without_a_durable_commit(tmp_path, caplog):
  plain, durable = tmp_path / "plain", tmp_path / "durable"
  with caplog.at_level(logging.WARNING, logger="fastpersist_jax.durability"):
    mngr = ocp.CheckpointManager(plain, item_handlers=fp.FastPersistHandler())
    for step in range(2):
      mngr.save(step, args=fp.FastPersistSave(state(step)))
    mngr.close()
    mngr = ocp.CheckpointManager(durable, item_handlers=fp.FastPersistHandler(),
                                 options=fp.durable_manager_options())
    mngr.save(0, args=fp.FastPersistSave(state(0)))
    mngr.close()
  warnings = [r.getMessage() for r in caplog.records if "committed without a sync" in r.getMessage()]
  assert len(warnings) == 1
  assert os.fspath(plain) in warnings[0] and "durable_manager_options" in warnings[0]


def test_durable_manager_options_keeps_fields_and_refuses_a_foreign_class():
  base = ocp.CheckpointManagerOptions(max_to_keep=3, save_interval_steps=5)
  options = fp.durable_manager_options(base, keep_period=10)
  assert (options.max_to_keep, options.save_interval_steps, options.keep_period) == (3, 5, 10)
  assert options.temporary_path_class is durability.DurableAtomicRenameTemporaryPath
  assert base.temporary_path_class is None   # the given options are not changed
  with pytest.raises(ValueError, match="AtomicRenameTemporaryPath.*leave it unset"):
    fp.durable_manager_options(
        temporary_path_class=ocp.path.atomicity.AtomicRenameTemporaryPath)


def test_sync_committed_syncs_every_file_and_directory_then_the_parent(tmp_path, monkeypatch):
  (tmp_path / "step" / "item").mkdir(parents=True)
  (tmp_path / "step" / "item" / "a").write_bytes(b"a")
  (tmp_path / "step" / "b").write_bytes(b"b")
  synced = []
  real_fsync = os.fsync

  def recording_fsync(fd):
    synced.append(os.readlink(f"/proc/self/fd/{fd}"))
    real_fsync(fd)
  monkeypatch.setattr(os, "fsync", recording_fsync)
  assert durability.sync_committed(tmp_path / "step") == 5
  step = os.fspath(tmp_path / "step")
  assert synced == [os.path.join(step, "item", "a"), os.path.join(step, "item"),
                    os.path.join(step, "b"), step, os.fspath(tmp_path)]
