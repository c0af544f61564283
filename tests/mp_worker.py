"""One process of a multi-process test (see test_multiprocess.py).

Usage: mp_worker.py SCENARIO PROCESS_ID NUM_PROCESSES PORT DIR
Prints "RESULT <json>" on success; any failure exits non-zero.

SCENARIO "batch" runs several scenarios in turn in the same processes (one
launch, several checks; helpers.run_batch): the environment variable
MP_BATCH holds a JSON list of [label, scenario, {setting: value}], each
run in DIR/label with its settings (the MP_* variables below) and reported
as result[label]; one that raises is reported as {"crash": traceback} and
ends the batch (the process then exits non-zero).
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

scenario, pid, nproc, port, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), \
    int(sys.argv[4]), sys.argv[5]
local_devices = int(os.environ.get("MP_LOCAL_DEVICES", "2"))

import jax  # pylint: disable=g-import-not-at-top

jax.config.update("jax_cpu_collectives_implementation", "gloo")
if nproc > 1:
  jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid,
                             initialization_timeout=60)
# The parent builds this process's environment with helpers.child_env, whose
# XLA_FLAGS force MP_LOCAL_DEVICES CPU devices.
assert jax.local_device_count() == local_devices, (jax.local_device_count(), local_devices)

import numpy as np  # pylint: disable=g-import-not-at-top
import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top

from fastpersist_jax import (FastPersistHandler, FastPersistOptions,  # pylint: disable=g-import-not-at-top
                             FastPersistRestore, FastPersistSave)

MiB = 1 << 20

# The settings of the scenario being run: MP_* variables of the environment,
# overridden by a batch entry's own.
_settings: dict[str, str] = {}


def setting(name: str, default: str | None = None) -> str | None:
  """The scenario setting `name` (e.g. "MP_SPLIT"), else `default`."""
  return _settings.get(name, os.environ.get(name, default))


def global_state(mesh):
  """A train-state-like tree: params sharded over "model" and replicated over
  "data" (so every data-parallel replica holds them), a data-sharded array,
  a scalar step and a numpy leaf. Values depend only on position."""
  def make(shape, spec, dtype, seed):
    host = (np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * 7 + seed)
    host = (host % 251).astype(dtype)
    return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), lambda idx: host[idx]), host
  w, w_host = make((64, 512), P(None, "model"), np.float32, 1)
  emb, emb_host = make((256, 128), P("data", "model"), np.float32, 2)
  b, b_host = make((512,), P(), np.int32, 3)
  state = {"params": {"w": w, "b": b}, "opt": {"emb": emb}, "step": 11,
           "rng": np.arange(4, dtype=np.uint32)}
  expected = {"params": {"w": w_host, "b": b_host}, "opt": {"emb": emb_host}, "step": 11,
              "rng": np.arange(4, dtype=np.uint32)}
  return state, expected


def check(restored, expected):
  for path, value in jax.tree_util.tree_flatten_with_path(expected)[0]:
    got = restored
    for k in path:
      got = got[k.key]
    if isinstance(value, np.ndarray):
      if isinstance(got, jax.Array):
        for s in got.addressable_shards:
          np.testing.assert_array_equal(np.asarray(s.data), value[s.index])
      else:
        np.testing.assert_array_equal(np.asarray(got), value)
    else:
      assert got == value, (path, got, value)


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                      if isinstance(x, jax.Array) else x, tree)


def data_bytes(directory, process):
  return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory)
             if f.startswith(f"data.{process:05d}."))


class _CustomNameFormat:
  """A NameFormat of its own ("run-<step, 5 digits>"), built on Orbax's step
  helpers, as CheckpointManagerOptions(step_name_format=...) takes."""

  def build_name(self, step: int) -> str:
    return f"run-{step:05d}"

  def _metadata(self, path):
    import re  # pylint: disable=g-import-not-at-top
    m = re.fullmatch(r"run-(\d{5})", path.name)
    if m is None or not ocp.path.step.is_path_finalized(path):
      return None
    return ocp.path.step.Metadata(step=int(m.group(1)), path=path)

  def find_all(self, base_path):
    from etils import epath  # pylint: disable=g-import-not-at-top
    return ocp.path.step.build_step_metadatas(epath.Path(base_path).iterdir(), self._metadata)

  def find_step(self, base_path, step: int):
    from etils import epath  # pylint: disable=g-import-not-at-top
    found = self._metadata(epath.Path(base_path) / self.build_name(step))
    if found is None:
      raise ValueError(f"no step {step} under {base_path}")
    return found

  def __str__(self):
    return 'Custom("run-01234")'


def _step_names(mesh, root: str) -> dict:
  """Per-host roots saved by CheckpointManagers naming steps otherwise than
  `root/12`: step 12 with step_format_fixed_length=8, with step_prefix, and
  with a custom NameFormat. Each is then found and restored by recovery
  with the format (and, without it, what recovery says)."""
  import logging  # pylint: disable=g-import-not-at-top
  from fastpersist_jax import latest_restorable_step, restore_per_host  # pylint: disable=g-import-not-at-top

  class Warnings(logging.Handler):
    def __init__(self):
      super().__init__(logging.WARNING)
      self.messages: list[str] = []

    def emit(self, record):
      self.messages.append(record.getMessage())

  warnings = Warnings()
  logging.getLogger("fastpersist_jax.recovery").addHandler(warnings)
  state, expected = global_state(mesh)
  mp = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={pid})
  formats = {
      "fixed_length": ({"step_format_fixed_length": 8},
                       ocp.path.step.standard_name_format(step_format_fixed_length=8)),
      "prefix": ({"step_prefix": "ckpt"}, ocp.path.step.standard_name_format(step_prefix="ckpt")),
      "custom": ({"step_name_format": _CustomNameFormat()}, _CustomNameFormat()),
  }
  out = {}
  for label, (manager_options, name_format) in formats.items():
    host_dir = os.path.join(root, label, f"host{pid}")
    os.makedirs(host_dir, exist_ok=True)   # Orbax leaves per-process roots to the caller
    handler = FastPersistHandler(multiprocessing_options=mp)
    with ocp.CheckpointManager(host_dir, item_handlers=handler,
                               options=ocp.CheckpointManagerOptions(
                                   multiprocessing_options=mp, create=False,
                                   async_options=ocp.AsyncOptions(
                                       create_directories_asynchronously=False),
                                   **manager_options)) as mngr:
      mngr.save(12, args=FastPersistSave(state))
      mngr.wait_until_finished()
    r: dict = {"names": sorted(os.listdir(host_dir))}
    del warnings.messages[:]
    r["latest_without"] = latest_restorable_step(host_dir, timeout_s=60)
    r["warnings_without"] = list(warnings.messages)
    try:
      restore_per_host(host_dir, 12, abstract(state), timeout_s=60)
      r["restore_without"] = None
    except Exception as e:  # pylint: disable=broad-except
      r["restore_without"] = f"{type(e).__name__}: {e}"
    del warnings.messages[:]
    r["latest"] = latest_restorable_step(host_dir, timeout_s=60, step_name_format=name_format)
    r["warnings"] = list(warnings.messages)
    check(restore_per_host(host_dir, 12, abstract(state), timeout_s=60,
                           step_name_format=name_format), expected)
    r["restored"] = True
    out[label] = r
  return out


def run(scenario: str, root: str) -> dict:
  """Runs `scenario` in the directory `root`; returns what it reports."""
  n_data = nproc
  mesh = jax.make_mesh((n_data, jax.device_count() // n_data), ("data", "model"))
  result = {}
  if scenario == "shared":
    state, expected = global_state(mesh)
    handler = FastPersistHandler(FastPersistOptions(replica_parallel=setting("MP_SPLIT", "1") == "1"))
    with ocp.CheckpointManager(root, item_handlers=handler) as mngr:
      mngr.save(0, args=FastPersistSave(state))
      mngr.wait_until_finished()
      check(mngr.restore(0, args=FastPersistRestore(abstract(state))), expected)
      check(mngr.restore(0), expected)   # as saved, on the same mesh
    result["bytes_written"] = data_bytes(os.path.join(root, "0", "default"), pid)
  elif scenario == "v1":
    # Orbax v1 API, shared directory: free functions and the training Checkpointer.
    from fastpersist_jax import checkpointables_registry  # pylint: disable=g-import-not-at-top
    state, expected = global_state(mesh)
    ctx = ocp.v1.Context(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
        registry=checkpointables_registry()))
    with ctx:
      ocp.v1.save_checkpointables(os.path.join(root, "free"), {"state": state})
      check(ocp.v1.load_checkpointables(os.path.join(root, "free"),
                                        {"state": abstract(state)})["state"], expected)
      with ocp.v1.training.Checkpointer(os.path.join(root, "run")) as ckptr:
        ckptr.save_pytree_async(1, state)
        ckptr.wait()
        check(ckptr.load_pytree(1, abstract(state)), expected)
    result["files"] = sorted(os.listdir(os.path.join(root, "run", "1", "state")))
    result["bytes_written"] = data_bytes(os.path.join(root, "run", "1", "state"), pid)
  elif scenario == "per_host":
    state, expected = global_state(mesh)
    mp = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={pid})
    handler = FastPersistHandler(
        FastPersistOptions(replica_parallel=setting("MP_SPLIT", "1") == "1",
                           host_redundancy=int(setting("MP_REDUNDANCY", "2"))),
        multiprocessing_options=mp)
    host_dir = os.path.join(root, f"host{pid}")
    os.makedirs(host_dir, exist_ok=True)   # Orbax leaves per-process roots to the caller
    with ocp.CheckpointManager(host_dir, item_handlers=handler,
                               options=ocp.CheckpointManagerOptions(
                                   multiprocessing_options=mp, create=False,
                                   # Orbax's asynchronous directory creation races with
                                   # itself under per-process managers (FileExistsError).
                                   async_options=ocp.AsyncOptions(
                                       create_directories_asynchronously=False))) as mngr:
      mngr.save(0, args=FastPersistSave(state))
      mngr.wait_until_finished()
      check(mngr.restore(0, args=FastPersistRestore(abstract(state))), expected)
      check(mngr.restore(0), expected)   # as saved
    result["files"] = sorted(os.listdir(os.path.join(host_dir, "0", "default")))
    result["bytes_written"] = data_bytes(os.path.join(host_dir, "0", "default"), pid)
  elif scenario == "kv_keys":
    # Saves and restores, shared and per host (replica-parallel: a save id
    # is shared): the coordination service's fastpersist keys are counted
    # after steps 1 and 5 of each; they must not grow with the steps.
    from fastpersist_jax import coordination  # pylint: disable=g-import-not-at-top
    client = coordination.orbax_multihost().get_jax_distributed_client()
    state, expected = global_state(mesh)
    counts = []

    def count():
      client.wait_at_barrier(f"mp_worker/kv_keys/{len(counts)}", 60_000)   # all are done
      counts.append(len(client.key_value_dir_get("fastpersist/")))
      client.wait_at_barrier(f"mp_worker/kv_keys/{len(counts)}/counted", 60_000)

    mp = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={pid})
    per_host_dir = os.path.join(root, f"host{pid}")
    os.makedirs(per_host_dir, exist_ok=True)
    managers = [
        ocp.CheckpointManager(os.path.join(root, "shared"), item_handlers=FastPersistHandler()),
        ocp.CheckpointManager(per_host_dir, item_handlers=FastPersistHandler(
            multiprocessing_options=mp), options=ocp.CheckpointManagerOptions(
                multiprocessing_options=mp, create=False,
                async_options=ocp.AsyncOptions(create_directories_asynchronously=False)))]
    for mngr in managers:
      with mngr:
        for step in range(6):
          mngr.save(step, args=FastPersistSave(state))
          mngr.wait_until_finished()
          check(mngr.restore(step, args=FastPersistRestore(abstract(state))), expected)
          if step in (1, 5):
            count()
    result["counts"] = counts
  elif scenario == "per_host_mismatch":
    # Hosts asked to restore different steps must all refuse, not mix parts.
    # Saved with commit_timeout_s MP_TIMEOUT; the restores, which must time
    # out (their steps differ by the scenario, not by a race), with
    # MP_RESTORE_TIMEOUT.
    state, _ = global_state(mesh)
    mp = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={pid})
    host_dir = os.path.join(root, f"host{pid}")
    os.makedirs(host_dir, exist_ok=True)

    def manager(timeout_s: str):
      return ocp.CheckpointManager(
          host_dir, item_handlers=FastPersistHandler(
              FastPersistOptions(commit_timeout_s=float(timeout_s)), multiprocessing_options=mp),
          options=ocp.CheckpointManagerOptions(
              multiprocessing_options=mp, create=False,
              # Orbax's asynchronous directory creation races with
              # itself under per-process managers (FileExistsError).
              async_options=ocp.AsyncOptions(create_directories_asynchronously=False)))
    with manager(setting("MP_TIMEOUT", "30")) as mngr:
      mngr.save(0, args=FastPersistSave(state))
      mngr.save(1, args=FastPersistSave(state))
      mngr.wait_until_finished()
    with manager(setting("MP_RESTORE_TIMEOUT", setting("MP_TIMEOUT", "30"))) as mngr:
      try:
        mngr.restore(pid, args=FastPersistRestore(abstract(state)))
        result["error"] = None
      except Exception as e:  # pylint: disable=broad-except
        result["error"] = f"{type(e).__name__}: {e}"
  elif scenario == "fail":
    state, _ = global_state(mesh)
    handler = FastPersistHandler(FastPersistOptions(commit_timeout_s=float(setting("MP_TIMEOUT", "30"))))
    if pid == nproc - 1:
      def broken_write(extents):
        if setting("MP_KILL") == "1":
          os._exit(9)  # the process dies mid-save  # pylint: disable=protected-access
        raise OSError(5, "injected write failure on the last process")
      handler._engine.write = broken_write  # pylint: disable=protected-access
    t0 = time.time()
    error = None
    # Orbax's own barriers wait for a dead peer up to their timeout (10 min by
    # default); keep it short here (MP_ORBAX_TIMEOUT s) so every path out of
    # the save is bounded.
    mngr = ocp.CheckpointManager(root, item_handlers=handler, options=ocp.CheckpointManagerOptions(
        async_options=ocp.AsyncOptions(timeout_secs=int(setting("MP_ORBAX_TIMEOUT", "20")))))
    try:
      mngr.save(0, args=FastPersistSave(state))
      mngr.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      error = f"{type(e).__name__}: {e}"
    result["seconds"] = time.time() - t0
    if setting("MP_KILL") == "1":
      # A peer died: Orbax's close() would wait at a barrier for it, and JAX's
      # runtime aborts on the peer's heartbeat timeout. Report and leave now.
      result["error"] = error
      print("RESULT " + json.dumps(result), flush=True)
      os._exit(0)  # pylint: disable=protected-access
    try:
      mngr.close()
    except Exception as e:  # pylint: disable=broad-except
      error = error or f"{type(e).__name__}: {e}"
    with ocp.CheckpointManager(root, item_handlers=FastPersistHandler()) as mngr:
      result["latest_step"] = mngr.latest_step()
    result["error"] = error
  elif scenario == "restore_single":
    # One process restores what several processes saved (shared directory).
    state_meta = FastPersistHandler().metadata(os.path.join(root, "0", "default"))
    mesh1 = jax.make_mesh((1, jax.device_count()), ("data", "model"))
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh1, P("model")))
        if isinstance(x, jax.ShapeDtypeStruct) and x.shape else x, state_meta)
    with ocp.CheckpointManager(root, item_handlers=FastPersistHandler()) as mngr:
      restored = mngr.restore(0, args=FastPersistRestore(target))
    _, expected = global_state(jax.make_mesh((1, jax.device_count()), ("data", "model")))
    check(restored, expected)
    result["devices"] = jax.device_count()
  elif scenario == "reshard_rows":
    # Saved in 2 row blocks, one per process; restored in 4 row blocks over
    # devices in the order [0, 2, 1, 3], so each process needs the first
    # half of each saved block: it reads those chunks only.
    chunk = int(setting("MP_CRC_CHUNK", str(1 * MiB)))
    options = FastPersistOptions(crc_chunk_bytes=chunk)
    devices = jax.devices()
    host = np.arange(1024 * 1024, dtype=np.float32).reshape(1024, 1024)
    saved_on = NamedSharding(jax.make_mesh((2, 2), ("rows", "cols"), devices=devices), P("rows"))
    x = jax.make_array_from_callback(host.shape, saved_on, lambda idx: host[idx])
    with ocp.CheckpointManager(root, item_handlers=FastPersistHandler(options)) as mngr:
      mngr.save(0, args=FastPersistSave({"x": x}))
      mngr.wait_until_finished()
    order = [devices[i] for i in (0, 2, 1, 3)]
    target_on = NamedSharding(jax.make_mesh((4,), ("rows",), devices=order), P("rows"))
    handler = FastPersistHandler(options)
    with ocp.CheckpointManager(root, item_handlers=handler) as mngr:
      restored = mngr.restore(0, args=FastPersistRestore(
          {"x": jax.ShapeDtypeStruct(host.shape, host.dtype, sharding=target_on)}))
    for shard in restored["x"].addressable_shards:
      np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
    assert restored["x"].sharding == target_on
    result["stats"] = handler.last_restore_stats
    if setting("MP_CORRUPT", "1") != "1":
      return result
    # A flipped byte in row 600 (process 1's saved block, in rows only
    # process 0 now needs) fails process 0's restore, naming the bytes, and
    # not process 1's, which never reads that chunk.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices("restored")
    step_dir = os.path.join(root, "0", "default")
    if pid == 0:
      with open(os.path.join(step_dir, "manifest.00001.json")) as f:
        (rec,) = json.load(f)["shards"]
      with open(os.path.join(step_dir, "data.00001.0000.bin"), "r+b") as f:
        f.seek(rec["offset"] + (600 - 512) * 1024 * 4 + 8)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    multihost_utils.sync_global_devices("corrupted")
    try:
      with ocp.CheckpointManager(root, item_handlers=FastPersistHandler(options)) as mngr:
        again = mngr.restore(0, args=FastPersistRestore(
            {"x": jax.ShapeDtypeStruct(host.shape, host.dtype, sharding=target_on)}))
      for shard in again["x"].addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), host[shard.index])
      result["after_corruption"] = "ok"
    except Exception as e:  # pylint: disable=broad-except
      result["after_corruption"] = f"{type(e).__name__}: {e}"
  elif scenario == "step_names":
    result = _step_names(mesh, root)
  elif scenario == "swap_threshold":
    import mp_swap_threshold  # pylint: disable=g-import-not-at-top  (tests/, beside this file)
    result = mp_swap_threshold.run(pid, root)
  elif scenario == "redundancy":
    import mp_redundancy  # pylint: disable=g-import-not-at-top  (tests/, beside this file)
    result = mp_redundancy.run(pid, nproc, root)
  else:
    raise SystemExit(f"unknown scenario {scenario}")
  return result


def main():
  if scenario != "batch":
    print("RESULT " + json.dumps(run(scenario, root)), flush=True)
    return
  from fastpersist_jax import coordination  # pylint: disable=g-import-not-at-top
  client = coordination.orbax_multihost().get_jax_distributed_client() if nproc > 1 else None
  results = {}
  for label, name, settings in json.loads(os.environ["MP_BATCH"]):
    if client is not None:   # every process starts each scenario together
      client.wait_at_barrier(f"mp_worker/batch/{label}", 120_000)
    _settings.clear()
    _settings.update(settings)
    try:
      results[label] = run(name, os.path.join(root, label))
    except BaseException:  # pylint: disable=broad-except  (reported, then the batch ends)
      results[label] = {"crash": traceback.format_exc()[-4000:]}
      print("RESULT " + json.dumps(results), flush=True)
      os._exit(1)  # pylint: disable=protected-access  (peers may be waiting in a collective)
  print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
  main()
