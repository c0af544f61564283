"""The host-loss scenario of test_host_redundancy.py, run by every process
(tests/mp_worker.py dispatches here; jax.distributed is initialised there).

Per-host roots on a (data = processes, model = local devices) mesh. Saves
steps 1 and 2 of a tree whose every array is replicated across hosts (with
host_redundancy 2, and step 2 again with 1, to compare bytes written), and
step 1 of a tree that also holds a leaf sharded across hosts. Then, each
case on a fresh copy of the roots, some hosts lose their files and every
process calls latest_restorable_step and restore_per_host.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
import traceback

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from fastpersist_jax import (FastPersistHandler, FastPersistOptions, FastPersistRestore,
                             FastPersistSave, latest_restorable_step, restore_per_host)
from fastpersist_jax import disk_format

TIMEOUT_S = 60.0


class _Warnings(logging.Handler):
  def __init__(self):
    super().__init__(logging.WARNING)
    self.messages: list[str] = []

  def emit(self, record):
    self.messages.append(record.getMessage())


def make_state(mesh, step: int, sharded_leaf: bool):
  """Every array replicated over "data" (so on every host), sharded over
  "model" inside a host; with `sharded_leaf`, also one sharded over "data"
  (one copy per host). Values depend on the step."""
  def make(shape, spec, dtype, seed):
    host = (np.arange(int(np.prod(shape)), dtype=np.float64).reshape(shape) * 7 + seed + 13 * step)
    host = (host % 251).astype(dtype)
    return jax.make_array_from_callback(shape, NamedSharding(mesh, spec), lambda idx: host[idx]), host
  w, w_host = make((64, 512), P(None, "model"), np.float32, 1)
  b, b_host = make((512,), P(), np.int32, 3)
  emb, emb_host = make((256, 128), P("model", None), jax.numpy.bfloat16, 2)
  state = {"params": {"w": w, "b": b}, "opt": {"emb": emb}, "step": step,
           "rng": np.arange(4, dtype=np.uint32) + step}
  expected = {"params": {"w": w_host, "b": b_host}, "opt": {"emb": emb_host}, "step": step,
              "rng": np.arange(4, dtype=np.uint32) + step}
  if sharded_leaf:
    s, s_host = make((256, 64), P("data", "model"), np.float32, 5)
    state["opt"]["sharded"], expected["opt"]["sharded"] = s, s_host
  return state, expected


def abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
                      if isinstance(x, jax.Array) else x, tree)


def check(restored, expected) -> None:
  """Bit-exact: every addressable shard and every host value."""
  for path, value in jax.tree_util.tree_flatten_with_path(expected)[0]:
    got = restored
    for k in path:
      got = got[k.key]
    if isinstance(value, np.ndarray):
      if isinstance(got, jax.Array):
        for s in got.addressable_shards:
          np.testing.assert_array_equal(np.asarray(s.data).view(np.uint8),
                                        value[s.index].view(np.uint8))
      else:
        np.testing.assert_array_equal(np.asarray(got), value)
    else:
      assert got == value, (path, got, value)


def manager(directory, pid, redundancy):
  mp = ocp.options.MultiprocessingOptions(primary_host=None, active_processes={pid})
  handler = FastPersistHandler(FastPersistOptions(host_redundancy=redundancy),
                               multiprocessing_options=mp)
  os.makedirs(directory, exist_ok=True)   # Orbax leaves per-process roots to the caller
  return ocp.CheckpointManager(directory, item_handlers=handler,
                               options=ocp.CheckpointManagerOptions(
                                   multiprocessing_options=mp, create=False,
                                   async_options=ocp.AsyncOptions(
                                       create_directories_asynchronously=False)))


def written(item_dir: str, pid: int) -> dict:
  """What this host wrote of one step: bytes of array leaves' records, and
  of its data files (alignment padding and numpy leaves included)."""
  meta = disk_format.read_metadata(item_dir)
  m = disk_format.read_manifest(item_dir, pid, meta)
  return {"array_bytes": sum(r.nbytes for r in m.shards if meta.leaves[r.leaf].kind == "array"),
          "file_bytes": sum(size for _, size in m.files),
          "records": len(m.shards)}


def run(pid: int, nproc: int, root: str) -> dict:
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  mesh = Mesh(np.array(devices).reshape(nproc, -1), ("data", "model"))
  warnings = _Warnings()
  logging.getLogger("fastpersist_jax").addHandler(warnings)
  result: dict = {"cases": {}}
  me = f"host{pid}"

  # Saves (through CheckpointManager, per-process roots).
  states = {s: make_state(mesh, s, False) for s in (1, 2)}
  def save_both(directory, redundancy):
    """Saves steps 1 and 2; returns the seconds of step 2's save (the
    first save of a handler also allocates its staging pool)."""
    with manager(directory, pid, redundancy) as mngr:
      mngr.save(1, args=FastPersistSave(states[1][0]))
      mngr.wait_until_finished()
      t0 = time.perf_counter()
      mngr.save(2, args=FastPersistSave(states[2][0]))
      mngr.wait_until_finished()
      seconds = time.perf_counter() - t0
      # Nothing lost: the ordinary restore still works (the hosts swap parts).
      check(mngr.restore(2, args=FastPersistRestore(abstract(states[2][0]))), states[2][1])
    return seconds

  result["save_s_r2"] = save_both(os.path.join(root, "r2", me), 2)
  result["warnings_replicated"] = list(warnings.messages)
  del warnings.messages[:]
  result["save_s_r1"] = save_both(os.path.join(root, "r1", me), 1)
  result["warnings_r1"] = list(warnings.messages)
  result["written_r2"] = written(os.path.join(root, "r2", me, "2", "default"), pid)
  result["written_r1"] = written(os.path.join(root, "r1", me, "2", "default"), pid)
  sharded_state, sharded_expected = make_state(mesh, 1, True)
  del warnings.messages[:]
  with manager(os.path.join(root, "e", me), pid, 2) as mngr:
    mngr.save(1, args=FastPersistSave(sharded_state))
    mngr.wait_until_finished()
  result["warnings_sharded"] = list(warnings.messages)

  def case(name, source, lose, step_expected=None, as_saved=False):
    """Copies this host's root of `source`, applies `lose(root)` on the hosts
    it names, then recovers. Records the outcome."""
    case_root = os.path.join(root, name, me)
    shutil.copytree(os.path.join(root, source, me), case_root)
    lose(case_root)
    out: dict = {}
    t0 = time.perf_counter()
    try:
      step = latest_restorable_step(case_root, timeout_s=TIMEOUT_S)
      out["latest"] = step
      wanted = step if step is not None else step_expected
      state, expected = (states[wanted] if source == "r2" else (sharded_state, sharded_expected))
      restored = restore_per_host(case_root, wanted, abstract(state), timeout_s=TIMEOUT_S)
      check(restored, expected)
      out["restored_step"] = wanted
      if as_saved:   # no target: on the saved sharding
        check(restore_per_host(case_root, wanted, timeout_s=TIMEOUT_S), expected)
        out["restored_as_saved"] = True
    except Exception as e:  # pylint: disable=broad-except
      out["error"] = f"{type(e).__name__}: {e}"
      if "AssertionError" in out["error"]:
        out["traceback"] = traceback.format_exc()[-3000:]
    out["seconds"] = time.perf_counter() - t0
    result["cases"][name] = out

  def wipe_root(hosts):
    return lambda r: shutil.rmtree(r) if pid in hosts else None

  def wipe_step(hosts, step):
    return lambda r: shutil.rmtree(os.path.join(r, str(step))) if pid in hosts else None

  def damage_and_wipe(damaged, wiped):
    """Flips the first byte of every data file of step 2 on `damaged`;
    wipes the root of `wiped`."""
    def lose(r):
      if pid == damaged:
        item_dir = os.path.join(r, "2", "default")
        for name in os.listdir(item_dir):
          if name.startswith("data."):
            with open(os.path.join(item_dir, name), "r+b") as f:
              byte = f.read(1)
              f.seek(0)
              f.write(bytes([byte[0] ^ 0xFF]))
      if pid == wiped:
        shutil.rmtree(r)
    return lose

  last = nproc - 1
  case("none_lost", "r2", lambda r: None)
  case("a_root_wiped", "r2", wipe_root({last}), as_saved=True)
  case("b_step2_wiped_on_one", "r2", wipe_step({1}, 2))
  # Hosts 1 and 2 both hold part 2 of every replicated shard (holder j
  # writes parts j and j+1): without both, step 2 is not covered.
  case("b_step2_wiped_on_two", "r2", wipe_step({1, 2}, 2))
  case("c_two_roots_wiped", "r2", wipe_root({1, 2}), step_expected=2)
  case("e_sharded_root_wiped", "e", wipe_root({last}), step_expected=1)
  # Damaged bytes are caught by their CRC-32C, wherever they are read.
  case("crc_damaged", "r2", damage_and_wipe(0, last))

  # A process that never joins: the others raise within the timeout (short:
  # the last process never calls, so the outcome does not depend on it).
  t0 = time.perf_counter()
  if pid != last:
    try:
      restore_per_host(os.path.join(root, "r2", me), 2, abstract(states[2][0]), timeout_s=2)
      result["absent_peer"] = None
    except Exception as e:  # pylint: disable=broad-except
      result["absent_peer"] = f"{type(e).__name__}: {e}"
    result["absent_peer_seconds"] = time.perf_counter() - t0
  ocp.multihost.get_barrier_sync_fn()(key="mp_redundancy_end", timeout_ms=120_000)
  return result
