"""The child processes of the power-loss harness (powerloss.py): the workload
that saves checkpoints until the power is cut, and the checker that, in a
fresh process, opens each crash image's checkpoints the way a restarted job
would and restores them.

  python -m fastpersist_jax.benchmark.powerloss_child workload CFG_JSON
  python -m fastpersist_jax.benchmark.powerloss_child check CFG_JSON

workload: builds its manager (CFG: root, mode, api, placement, pid, nproc,
port), prints "ready", waits for a line "go" on stdin, then saves step 0,
1, 2, ... of powerloss_state(step), each waited for (and, in mode
root-fsync, followed by an fsync of the root directory), printing and
flushing "durable <step>" after each, until killed.

check: prints "ready", then reads requests from stdin, one JSON object a
line ({"root", "durable"}: a checkpoint root and the last step the workload
reported durable there, or null), and answers each with one JSON line:
the steps found, the latest step, each restore's outcome and the verdict
(check_root). A line "quit" ends it.

Modes (how the workload makes a finished save durable):
  none        plain Orbax options: nothing after wait_until_finished
  root-fsync  an fsync of the root directory after each save
  durable     fastpersist_jax.durable_manager_options (v0) or
              fastpersist_jax.DurableCheckpointer (v1)
"""

from __future__ import annotations

import json
import os
import sys
import threading
import time

MiB = 1 << 20
# Small staging, slabs of 1 MiB: a few-MiB state is staged and written as
# several windows (as in tests/test_crash.py).
SMALL = dict(host_memory_limit=16 * MiB, staging_slab_bytes=1 * MiB)
MAX_TO_KEEP = 2

STATE_SHAPE = (512, 1024)     # uint32: 2 MiB
STATE_HOST = 256 * 1024       # float32: 1 MiB, numpy
MODES = ("none", "root-fsync", "durable")
APIS = ("v0", "v1")
PLACEMENTS = ("shared", "per_host")
# How long one restore of the checker may take before it counts as failed.
RESTORE_LIMIT_S = 60.0


def powerloss_state(step: int, sharding=None) -> dict:
  """The state saved at `step`: every bit is a function of the step."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  n = STATE_SHAPE[0] * STATE_SHAPE[1]
  w = (np.arange(n, dtype=np.uint32) * np.uint32(2654435761)) ^ np.uint32(
      (step * 0x9E3779B9 + 1) & 0xFFFFFFFF)
  w = w.reshape(STATE_SHAPE)
  host = np.arange(STATE_HOST, dtype=np.float32) * np.float32(step + 1)
  if sharding is not None:
    import jax  # pylint: disable=g-import-not-at-top
    w = jax.device_put(w, sharding)
  return {"w": w, "host": host, "step": step}


def _per_host_mp(cfg: dict):
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  return ocp.options.MultiprocessingOptions(primary_host=None, active_processes={cfg["pid"]})


def v0_manager(cfg: dict, checking: bool = False):
  """The ocp.CheckpointManager of the workload (or, with `checking`, of the
  single checking process, which opens one host's root on its own)."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from fastpersist_jax import FastPersistHandler, FastPersistOptions  # pylint: disable=g-import-not-at-top
  per_host = cfg["placement"] == "per_host" and not checking
  kw = dict(max_to_keep=MAX_TO_KEEP)
  handler_kw = {}
  if per_host:
    mp = _per_host_mp(cfg)
    handler_kw["multiprocessing_options"] = mp
    # Orbax's asynchronous directory creation races with itself under
    # per-process managers (as in tests/mp_worker.py).
    kw.update(multiprocessing_options=mp, create=False,
              async_options=ocp.AsyncOptions(create_directories_asynchronously=False))
  if checking:
    kw["create"] = False
  if cfg["mode"] == "durable":
    import fastpersist_jax  # pylint: disable=g-import-not-at-top
    options = fastpersist_jax.durable_manager_options(**kw)
  else:
    options = ocp.CheckpointManagerOptions(**kw)
  handler = FastPersistHandler(FastPersistOptions(**SMALL), **handler_kw)
  return ocp.CheckpointManager(cfg["root"], item_handlers=handler, options=options)


_SMALL_V1_HANDLER = []


def _small_v1_handler():
  """FastPersistCheckpointableHandler with SMALL options (one class per
  process: Orbax matches handlers by type)."""
  if not _SMALL_V1_HANDLER:
    from fastpersist_jax import (FastPersistCheckpointableHandler,  # pylint: disable=g-import-not-at-top
                                 FastPersistOptions)

    class SmallHandler(FastPersistCheckpointableHandler):
      options = FastPersistOptions(**SMALL)
    _SMALL_V1_HANDLER.append(SmallHandler)
  return _SMALL_V1_HANDLER[0]


def v1_context(cfg: dict, checking: bool = False):
  """The ocp.v1.Context: fastpersist's registry (small staging), and in a
  per-host workload this process alone as its primary."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  from fastpersist_jax import checkpointables_registry  # pylint: disable=g-import-not-at-top
  kw = dict(checkpointables_options=ocp.v1.options.CheckpointablesOptions(
      registry=checkpointables_registry(handler_type=_small_v1_handler())))
  if cfg["placement"] == "per_host" and not checking:
    # Every process a primary of its own root. (Not active_processes={pid}
    # as in v0: the v1 Checkpointer always creates its root, which Orbax
    # refuses under active_processes.)
    kw["multiprocessing_options"] = ocp.v1.options.MultiprocessingOptions(primary_host=None)
  return ocp.v1.Context(**kw)


def v1_checkpointer(cfg: dict):
  """The ocp.v1.training.Checkpointer (DurableCheckpointer in mode durable),
  keeping the latest MAX_TO_KEEP steps; open it inside v1_context."""
  import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
  import fastpersist_jax  # pylint: disable=g-import-not-at-top
  cls = (fastpersist_jax.DurableCheckpointer if cfg["mode"] == "durable"
         else ocp.v1.training.Checkpointer)
  return cls(cfg["root"],
             preservation_policy=ocp.v1.training.preservation_policies.LatestN(MAX_TO_KEEP))


def _fsync_dir(path: str) -> None:
  fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
  try:
    os.fsync(fd)
  finally:
    os.close(fd)


def _init_jax(cfg: dict):
  import jax  # pylint: disable=g-import-not-at-top
  if cfg.get("nproc", 1) > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{cfg['port']}", num_processes=cfg["nproc"],
                               process_id=cfg["pid"], initialization_timeout=60)
  return jax


def workload_main(cfg: dict) -> None:
  """Saves step after step (see the module docstring) until killed."""
  jax = _init_jax(cfg)
  from jax.sharding import NamedSharding, PartitionSpec as P, SingleDeviceSharding  # pylint: disable=g-import-not-at-top
  if cfg["placement"] == "per_host":
    sharding = SingleDeviceSharding(jax.local_devices()[0])
  else:
    mesh = jax.make_mesh((jax.device_count(),), ("data",))
    sharding = NamedSharding(mesh, P("data"))
  powerloss_state(0, sharding)  # compiles nothing, but warms device_put
  print("ready", flush=True)
  if sys.stdin.readline().strip() != "go":
    return
  root = cfg["root"]
  if cfg["api"] == "v0":
    mngr = v0_manager(cfg)

    def save(step):
      mngr.save(step, args=_save_args(powerloss_state(step, sharding)))
      mngr.wait_until_finished()
  else:
    ctx = v1_context(cfg)
    ctx.__enter__()
    ckptr = v1_checkpointer(cfg)

    def save(step):
      ckptr.save_pytree(step, powerloss_state(step, sharding))
  step = 0
  while True:
    save(step)
    if cfg["mode"] == "root-fsync":
      _fsync_dir(root)
    print(f"durable {step}", flush=True)
    step += 1


def _save_args(state):
  from fastpersist_jax import FastPersistSave  # pylint: disable=g-import-not-at-top
  return FastPersistSave(state)


def _bounded(fn, limit: float):
  """(value, None) of fn(), or (None, "ExceptionType: message") if it raised,
  or (None, "HANG") when it has not returned after `limit` seconds (it runs
  on a daemon thread, abandoned then)."""
  box = []

  def run():
    try:
      box.append((fn(), None))
    except Exception as e:  # pylint: disable=broad-except
      box.append((None, f"{type(e).__name__}: {str(e)[:300]}"))
  t = threading.Thread(target=run, daemon=True)
  t.start()
  t.join(limit)
  return box[0] if box else (None, "HANG")


def _same(restored, step: int) -> bool:
  import numpy as np  # pylint: disable=g-import-not-at-top
  expected = powerloss_state(step)
  if not isinstance(restored, dict) or set(restored) != set(expected):
    return False
  for key in ("w", "host"):
    a, e = np.asarray(restored[key]), expected[key]
    if a.dtype != e.dtype or a.shape != e.shape or a.tobytes() != e.tobytes():
      return False
  return int(np.asarray(restored["step"])) == step


def check_root(cfg: dict, durable: int | None) -> dict:
  """Opens the checkpoints at cfg["root"] (API and mode of `cfg`) in this
  process and judges them against `durable`, the last step the workload
  reported durable there (None: none yet).

  Returns:
    {"steps", "latest", "restores": {step: "ok" | "wrong" | error},
     "verdict": "OK" | "LOST" | "WRONG", "latest_unrestorable": bool}.
    LOST: `durable` is missing (and not legitimately rotated out by
    max_to_keep, i.e. fewer than MAX_TO_KEEP later steps exist), the
    latest step is older, or `durable` does not restore. WRONG: a restore
    returned other bytes than powerloss_state(step).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.sharding import SingleDeviceSharding  # pylint: disable=g-import-not-at-top
  target = {"w": jax.ShapeDtypeStruct(STATE_SHAPE, np.uint32,
                                      sharding=SingleDeviceSharding(jax.devices()[0])),
            "host": np.zeros(STATE_HOST, np.float32), "step": 0}
  out = {"root": cfg["root"], "durable": durable, "restores": {}}
  if cfg["api"] == "v0":
    from fastpersist_jax import FastPersistRestore  # pylint: disable=g-import-not-at-top
    mngr, err = _bounded(lambda: v0_manager(cfg, checking=True), RESTORE_LIMIT_S)
    if err is None:
      steps, err = _bounded(lambda: sorted(mngr.all_steps()), RESTORE_LIMIT_S)
      latest = mngr.latest_step() if err is None else None
      restore = lambda s: mngr.restore(s, args=FastPersistRestore(target))
  else:
    # Orbax v1's Context is a context variable: each call on a thread of
    # _bounded enters it there.
    ctx = v1_context(cfg, checking=True)

    def in_ctx(fn):
      def run():
        with ctx:
          return fn()
      return run
    ckptr, err = _bounded(in_ctx(lambda: v1_checkpointer(cfg)), RESTORE_LIMIT_S)
    if err is None:
      steps, err = _bounded(in_ctx(lambda: sorted(c.step for c in ckptr.checkpoints)),
                            RESTORE_LIMIT_S)
      latest = None
      if err is None:
        latest, err = _bounded(in_ctx(lambda: ckptr.latest and ckptr.latest.step),
                               RESTORE_LIMIT_S)
      restore = lambda s: in_ctx(lambda: ckptr.load_pytree(s, target))()
  if err is not None:
    out.update(steps=[], latest=None, open_error=err,
               verdict="LOST" if durable is not None else "OK", latest_unrestorable=False)
    return out
  out["steps"], out["latest"] = steps, latest
  for s in sorted({x for x in (durable, latest) if x is not None and x in steps}):
    value, err = _bounded(lambda s=s: restore(s), RESTORE_LIMIT_S)
    out["restores"][str(s)] = err if err is not None else ("ok" if _same(value, s) else "wrong")
  outcome = out["restores"]
  if "wrong" in outcome.values():
    verdict = "WRONG"
  elif durable is None:
    verdict = "OK"
  elif latest is None or latest < durable:
    verdict = "LOST"
  elif durable in steps:
    verdict = "OK" if outcome[str(durable)] == "ok" else "LOST"
  else:   # rotated out only if MAX_TO_KEEP later steps were committed
    later = [s for s in steps if s > durable]
    verdict = "OK" if len(later) >= MAX_TO_KEEP and outcome[str(latest)] == "ok" else "LOST"
  out["verdict"] = verdict
  out["latest_unrestorable"] = (latest is not None and latest != durable
                                and outcome.get(str(latest)) not in ("ok", "wrong"))
  try:
    if cfg["api"] == "v0":
      mngr.close()
    else:
      ckptr.close()
  except Exception:  # pylint: disable=broad-except
    pass
  return out


def checker_main(cfg: dict) -> None:
  """Answers check requests on stdin (see the module docstring)."""
  import jax  # pylint: disable=g-import-not-at-top,unused-import
  import orbax.checkpoint  # pylint: disable=g-import-not-at-top,unused-import
  import fastpersist_jax  # pylint: disable=g-import-not-at-top,unused-import
  print("ready", flush=True)
  for line in sys.stdin:
    line = line.strip()
    if line == "quit":
      break
    if not line:
      continue
    req = json.loads(line)
    t0 = time.monotonic()
    try:
      res = check_root(dict(cfg, root=req["root"]), req["durable"])
    except Exception as e:  # pylint: disable=broad-except
      res = {"root": req["root"], "durable": req["durable"], "verdict": "LOST",
             "latest_unrestorable": False, "error": f"{type(e).__name__}: {str(e)[:500]}"}
    res["seconds"] = round(time.monotonic() - t0, 3)
    print("RESULT " + json.dumps(res), flush=True)


if __name__ == "__main__":
  role, cfg_json = sys.argv[1], sys.argv[2]
  config = json.loads(cfg_json)
  if role == "workload":
    workload_main(config)
  elif role == "check":
    checker_main(config)
  else:
    sys.exit(f"unknown role {role!r}")
  sys.stdout.flush()
  os._exit(0)  # pylint: disable=protected-access  (no waiting on Orbax's threads)
