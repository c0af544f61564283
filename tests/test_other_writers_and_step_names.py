"""Directories other writers made: steps a CheckpointManager named otherwise
than `root/12` (step_prefix, step_format_fixed_length, a custom NameFormat),
which recovery finds with the manager's step name format, and steps another
handler wrote (Orbax's StandardCheckpointHandler in a run that switched
handlers), which restores name as such (ForeignCheckpointError, naming the
writer and how to read them) rather than as missing."""

from __future__ import annotations

import logging
import os
import shutil
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

import helpers
from fastpersist_jax import (FastPersistHandler, FastPersistRestore, FastPersistSave,
                             latest_restorable_step, restore_per_host)
from fastpersist_jax.errors import CheckpointNotFoundError, ForeignCheckpointError

# Step directory names the 2-process scenario's managers made for step 12.
SAVED_NAMES = {"fixed_length": "00000012", "prefix": "ckpt_12", "custom": "run-00012"}
FORMAT_HINTS = {"fixed_length": "standard_name_format(step_format_fixed_length=8)",
                "prefix": "standard_name_format(step_prefix='ckpt')",
                "custom": "the NameFormat they were saved with"}


# Per-host roots with other step names (2 processes) ---------------------------

@pytest.fixture(scope="module")
def step_names(tmp_path_factory):
  """tests/mp_worker.py's "step_names" scenario on 2 processes: per-host
  roots, step 12 saved under each naming, then recovery without and with
  the naming (restores checked bit-exact in the workers)."""
  return helpers.run_processes("step_names", 2, tmp_path_factory.mktemp("step_names"))


@pytest.mark.parametrize("label", sorted(SAVED_NAMES))
def test_recovery_follows_the_managers_step_names(step_names, label):
  for result in step_names:
    r = result[label]
    assert r["names"] == [SAVED_NAMES[label]]
    # With the manager's format: found and restored on both processes.
    assert r["latest"] == 12, r
    assert r["restored"] is True
    assert r["warnings"] == []


@pytest.mark.parametrize("label", sorted(SAVED_NAMES))
def test_without_the_step_names_recovery_says_which_directories_it_could_not_map(step_names,
                                                                                 label):
  for pid, result in enumerate(step_names):
    r = result[label]
    assert r["latest_without"] is None
    (warning,) = r["warnings_without"]
    assert f"host{pid}" in warning and warning.endswith(
        "(as the CheckpointManagerOptions that saved them: step_prefix, "
        "step_format_fixed_length or step_name_format)"), warning
    assert f"maps it to no step, so recovery ignores it: {SAVED_NAMES[label]}." in warning
    assert FORMAT_HINTS[label] in warning
    error = r["restore_without"]
    assert error.startswith("CheckpointNotFoundError: no process holds a usable copy of step 12")
    for host in ("host0", "host1"):
      assert f"/{host}, which holds 1 step-like directory it maps to no step " \
             f"({SAVED_NAMES[label]})" in error, error
    assert FORMAT_HINTS[label] in error


def test_a_step_name_format_must_be_a_name_format(tmp_path):
  with pytest.raises(TypeError, match="step_name_format must be an Orbax NameFormat"):
    latest_restorable_step(tmp_path, step_name_format="ckpt_{step}")
  with pytest.raises(TypeError, match="step_name_format must be an Orbax NameFormat"):
    restore_per_host(tmp_path, 1, step_name_format=8)


def test_each_host_lists_its_own_root():
  # Orbax's single_host_load_and_broadcast would list process 0's root for
  # every host (and run collectives without a timeout): recovery turns it
  # off, in composite formats too.
  from fastpersist_jax import recovery  # pylint: disable=g-import-not-at-top
  step = ocp.path.step
  prefixed = step.standard_name_format(step_prefix="ckpt", single_host_load_and_broadcast=True)
  plain = step.standard_name_format(single_host_load_and_broadcast=True)
  local = recovery._name_format(step.composite_name_format(prefixed, [prefixed, plain]))
  assert not local.write_name_format.single_host_load_and_broadcast
  assert [f.single_host_load_and_broadcast for f in local.read_name_formats] == [False, False]
  assert local.write_name_format.step_prefix == "ckpt"


def test_temporary_and_non_step_directories_are_not_named_as_unmapped(tmp_path, caplog):
  # Orbax's temporary directories (an interrupted save) and directories that
  # are no step (no item, no step metadata) are not named.
  os.makedirs(tmp_path / "12.orbax-checkpoint-tmp-1700000000" / "default")
  os.makedirs(tmp_path / "logs" / "train")
  (tmp_path / "notes.txt").write_text("x")
  with caplog.at_level(logging.WARNING, logger="fastpersist_jax.recovery"):
    assert latest_restorable_step(tmp_path) is None
    with pytest.raises(CheckpointNotFoundError) as e:
      restore_per_host(tmp_path, 12)
  assert not isinstance(e.value, ForeignCheckpointError)
  assert caplog.messages == []


# A run directory another handler started (1 process) -------------------------

def _tree():
  return {"w": jax.numpy.arange(24, dtype=jax.numpy.float32).reshape(4, 6),
          "b": np.arange(5, dtype=np.int32)}


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), tree)


def _same(got, want):
  for k in want:
    a, b = np.asarray(got[k]), np.asarray(want[k])
    assert a.dtype == b.dtype and a.shape == b.shape
    assert a.tobytes() == b.tobytes(), k


@pytest.fixture(scope="module")
def mixed_run(tmp_path_factory):
  """A CheckpointManager root whose step 1 Orbax's StandardCheckpointHandler
  wrote and whose step 2 FastPersistHandler wrote (a team switching
  handlers mid-run)."""
  root = tmp_path_factory.mktemp("mixed") / "run"
  tree = _tree()
  with ocp.CheckpointManager(root, item_handlers=ocp.StandardCheckpointHandler()) as m:
    m.save(1, args=ocp.args.StandardSave(tree))
    m.wait_until_finished()
  with ocp.CheckpointManager(root, item_handlers=FastPersistHandler()) as m:
    m.save(2, args=FastPersistSave(tree))
    m.wait_until_finished()
  return root, tree


def test_a_step_another_handler_wrote_names_its_writer_and_how_to_read_it(mixed_run):
  root, tree = mixed_run
  with ocp.CheckpointManager(root, item_handlers=FastPersistHandler()) as m:
    assert m.latest_step() == 2 and m.all_steps() == [1, 2]
    _same(m.restore(2, args=FastPersistRestore(_abstract(tree))), tree)
    with pytest.raises(ForeignCheckpointError) as e:
      m.restore(1, args=FastPersistRestore())
  assert isinstance(e.value, CheckpointNotFoundError)   # what callers already catch
  message = str(e.value)
  item_dir = os.path.join(root, "1", "default")
  assert message.startswith(f"{item_dir} is not a fastpersist checkpoint (fastpersist.json is "
                            "absent): Orbax's StandardCheckpointHandler wrote it (as "
                            f"{os.path.join(root, '1', '_CHECKPOINT_METADATA')} records)"), message
  assert ("item_handlers=ocp.StandardCheckpointHandler() and "
          "args=ocp.args.StandardRestore(abstract_tree)") in message
  # What the message says works.
  restored = ocp.Checkpointer(ocp.StandardCheckpointHandler()).restore(
      item_dir, args=ocp.args.StandardRestore(_abstract(tree)))
  _same(restored, tree)
  with ocp.CheckpointManager(root, item_handlers=ocp.StandardCheckpointHandler()) as m:
    _same(m.restore(1, args=ocp.args.StandardRestore(_abstract(tree))), tree)


def test_item_metadata_of_a_step_another_handler_wrote(mixed_run):
  # Orbax's CompositeCheckpointHandler turns a FileNotFoundError from a
  # handler's metadata() into None (ForeignCheckpointError is one).
  root, _ = mixed_run
  with ocp.CheckpointManager(root, item_handlers=FastPersistHandler()) as m:
    assert m.item_metadata(1) is None
    assert set(m.item_metadata(2)) == {"w", "b"}


def test_the_pytree_format_is_recognised_without_orbax_step_metadata(mixed_run, tmp_path):
  root, _ = mixed_run
  item_dir = tmp_path / "copied"
  shutil.copytree(os.path.join(root, "1", "default"), item_dir)
  with pytest.raises(ForeignCheckpointError) as e:
    FastPersistHandler().restore(item_dir)
  message = str(e.value)
  assert message.startswith(f"{item_dir} is not a fastpersist checkpoint (fastpersist.json is "
                            "absent): Orbax's StandardCheckpointHandler or "
                            "PyTreeCheckpointHandler wrote it (its PyTree format: _METADATA"), message
  assert "manifest.ocdbt" in message and "ocdbt.process_0" in message
  assert "args=ocp.args.StandardRestore(abstract_tree)" in message


def test_what_is_no_checkpoint_keeps_checkpoint_not_found(mixed_run, tmp_path):
  handler = FastPersistHandler()
  # A plain directory, an empty one, a missing one.
  (tmp_path / "plain").mkdir()
  (tmp_path / "plain" / "data.bin").write_bytes(b"x" * 10)
  (tmp_path / "empty").mkdir()
  for d in ("plain", "empty", "missing"):
    with pytest.raises(CheckpointNotFoundError) as e:
      handler.restore(tmp_path / d)
    assert not isinstance(e.value, ForeignCheckpointError), e.value
  # A fastpersist step that lost its fastpersist.json: damaged, not foreign
  # (its step metadata names FastPersistHandler).
  root, _ = mixed_run
  damaged = tmp_path / "damaged"
  shutil.copytree(os.path.join(root, "2"), damaged)
  os.remove(damaged / "default" / "fastpersist.json")
  with pytest.raises(CheckpointNotFoundError) as e:
    handler.restore(damaged / "default")
  assert not isinstance(e.value, ForeignCheckpointError)
  assert "checkpoint metadata not found" in str(e.value)


def test_recovery_names_a_step_another_handler_wrote(mixed_run, caplog):
  root, _ = mixed_run
  with pytest.raises(ForeignCheckpointError) as e:
    restore_per_host(root, 1)
  assert str(e.value).startswith("step 1 (item 'default'): process 0: ")
  assert "Orbax's StandardCheckpointHandler wrote it" in str(e.value)
  # (One process saves shared checkpoints: step 2 is not a per-host one.)
  with caplog.at_level(logging.WARNING, logger="fastpersist_jax.recovery"):
    assert latest_restorable_step(root) is None
  (warning,) = [m for m in caplog.messages if "another handler" in m]
  assert warning.startswith(f"fastpersist recovery: step 1 under {root} was written by another "
                            "handler, not restorable by fastpersist: ")
  assert "StandardCheckpointHandler" in warning


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
