"""Helpers shared by the tests: tree comparison, restore targets, meshes, and
the environment of child processes.

Importing this module sets XLA_FLAGS for eight CPU devices when nothing else
did (it must happen before jax is imported).
"""

from __future__ import annotations

import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def with_cpu_devices(xla_flags: str, devices: int) -> str:
  """`xla_flags` (an XLA_FLAGS value) with the forced host-platform device
  count set to `devices`, other flags kept."""
  kept = [f for f in xla_flags.split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  return " ".join(kept + [f"{_DEVICE_COUNT_FLAG}={devices}"])


def child_env(devices: int = 8, **extra: str | None) -> dict[str, str]:
  """The environment of a child Python process of a test: this one's, with
  XLA_FLAGS forcing `devices` CPU devices, the repository on PYTHONPATH,
  unbuffered output, then `extra` (a value of None removes the variable)."""
  env = dict(os.environ)
  env["XLA_FLAGS"] = with_cpu_devices(env.get("XLA_FLAGS", ""), devices)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (REPO, env.get("PYTHONPATH")) if p)
  env["PYTHONUNBUFFERED"] = "1"
  for k, v in extra.items():
    if v is None:
      env.pop(k, None)
    else:
      env[k] = v
  return env


if _DEVICE_COUNT_FLAG not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = with_cpu_devices(os.environ.get("XLA_FLAGS", ""), 8)

import jax  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

KiB = 1 << 10
MiB = 1 << 20


def is_prng_key(x) -> bool:
  return isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key)


def raw_bytes(x) -> tuple[str, tuple, bytes]:
  """(dtype, shape, bytes) of an array leaf; typed keys by their key data."""
  if is_prng_key(x):
    data = np.asarray(jax.random.key_data(x))
    return f"key<{jax.random.key_impl(x)}>", tuple(x.shape), data.tobytes()
  a = np.asarray(x)
  return a.dtype.name, a.shape, a.tobytes()


def assert_trees_equal(expected, actual, check_sharding: bool = True,
                       check_array_type: bool = True) -> None:
  """Same structure; every array leaf bit for bit the same (dtype, shape, NaN
  payloads, typed keys' implementation and data), a jax.Array where one is
  expected (unless not `check_array_type`), on an equivalent sharding (unless
  not `check_sharding`); other leaves equal and of the same type."""
  e_flat, e_def = jax.tree_util.tree_flatten_with_path(expected)
  a_flat, a_def = jax.tree_util.tree_flatten(actual)
  assert jax.tree_util.tree_structure(expected) == a_def, (jax.tree_util.tree_structure(expected),
                                                           a_def)
  for (path, e), a in zip(e_flat, a_flat):
    where = jax.tree_util.keystr(path)
    if isinstance(e, (jax.Array, np.ndarray, np.generic)):
      assert raw_bytes(a) == raw_bytes(e), (where, raw_bytes(e)[:2], raw_bytes(a)[:2])
      if check_array_type:
        assert isinstance(a, jax.Array) == isinstance(e, jax.Array), (where, type(e), type(a))
      if check_sharding and isinstance(e, jax.Array) and isinstance(a, jax.Array):
        assert a.sharding.is_equivalent_to(e.sharding, e.ndim), (where, a.sharding, e.sharding)
        assert a.sharding.memory_kind == e.sharding.memory_kind, where
    else:
      assert type(a) is type(e) and (a == e or (a != a and e != e)), (where, e, a)


def assert_tree_bytes_equal(expected, actual) -> None:
  """assert_trees_equal on the values alone: structure, dtypes, shapes and
  bytes, whether an array comes back as numpy or jax.Array, on any sharding."""
  assert_trees_equal(expected, actual, check_sharding=False, check_array_type=False)


def reseal_metadata(item: str, edit) -> None:
  """Applies `edit` to the item's fastpersist.json document, re-seals it
  (disk_format.seal) and points every manifest's metadata_crc32c at the new
  seal (re-sealing them too): only the edit differs from a valid checkpoint."""
  import json  # pylint: disable=g-import-not-at-top
  from fastpersist_jax import disk_format  # pylint: disable=g-import-not-at-top
  path = os.path.join(item, disk_format.METADATA_FILE)
  with open(path) as f:
    doc = json.load(f)
  doc.pop("crc32c")
  edit(doc)
  raw = disk_format.seal(doc)
  with open(path, "wb") as f:
    f.write(raw)
  seal = json.loads(raw)["crc32c"]
  for name in os.listdir(item):
    if name.startswith("manifest."):
      reseal_manifest(os.path.join(item, name), lambda m: m.update(metadata_crc32c=seal))


def reseal_manifest(path: str, edit) -> None:
  """Applies `edit` to the manifest document at `path` and re-seals it."""
  import json  # pylint: disable=g-import-not-at-top
  from fastpersist_jax import disk_format  # pylint: disable=g-import-not-at-top
  with open(path) as f:
    doc = json.load(f)
  doc.pop("crc32c")
  edit(doc)
  with open(path, "wb") as f:
    f.write(disk_format.seal(doc))


def leaf_fields(metadata_doc: dict, i: int) -> dict:
  """The record holding leaf i's kind, dtype, shape and sharding in a
  decoded fastpersist.json: its "arrays" entry when it refers to one (format
  version 3), else the leaf's own record. Editing it edits the leaf."""
  leaf = metadata_doc["leaves"][i]
  return metadata_doc["arrays"][leaf["array"]] if "array" in leaf else leaf


def with_array_fields_inline(metadata_doc: dict) -> dict:
  """A decoded fastpersist.json in the form of versions 1 and 2: each
  leaf's array fields in its own record, no "arrays"."""
  doc = {k: v for k, v in metadata_doc.items() if k != "arrays"}
  doc["leaves"] = [dict(leaf_fields(metadata_doc, i), path=leaf["path"]) if "array" in leaf
                   else leaf for i, leaf in enumerate(metadata_doc["leaves"])]
  return doc


def abstract(tree):
  """Restore target: ShapeDtypeStructs with the arrays' shardings (typed keys
  keep their key dtype), every other leaf as it is."""
  def one(x):
    if isinstance(x, jax.Array):
      return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
    return x
  return jax.tree.map(one, tree)


def mesh_2x4():
  assert jax.device_count() == 8, "tests need XLA_FLAGS=--xla_force_host_platform_device_count=8"
  return jax.make_mesh((2, 4), ("data", "model"))


def mesh_4x2():
  """A ("data", "model") mesh of 4 x 2 of the eight CPU devices."""
  assert jax.device_count() == 8, "tests need XLA_FLAGS=--xla_force_host_platform_device_count=8"
  return jax.make_mesh((4, 2), ("data", "model"))


def free_port() -> int:
  """A free TCP port on localhost (for jax.distributed's coordinator)."""
  import socket  # pylint: disable=g-import-not-at-top
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def run_scenario(script: str, scenario: str, root, nproc: int = 2, devices: int = 2,
                 timeout: float = 120) -> list[dict | None]:
  """Runs `script --worker SCENARIO PID NPROC PORT ROOT` as `nproc` JAX
  processes of `devices` CPU devices each; returns each process's last
  "RESULT <json>" (None where it printed none; a process still running
  after `timeout` seconds is killed). Asserts that process 0 reported."""
  import sys  # pylint: disable=g-import-not-at-top
  port = free_port()
  runs = _run_children([[sys.executable, script, "--worker", scenario, str(i), str(nproc),
                         str(port), str(root)] for i in range(nproc)], child_env(devices), timeout)
  assert runs[0][2] is not None, f"process 0 reported nothing:\n{runs[0][1][-4000:]}"
  return [result for _, _, result in runs]


def _run_children(commands: list[list[str]], env: dict[str, str], timeout: float
                  ) -> list[tuple[int, str, dict | None]]:
  """Runs the commands at once; returns each one's (exit status, output,
  last "RESULT <json>" or None). One still running after `timeout` seconds
  is killed (its output then ends saying so)."""
  import json  # pylint: disable=g-import-not-at-top
  import subprocess  # pylint: disable=g-import-not-at-top
  procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
           for c in commands]
  runs = []
  try:
    for p in procs:
      try:
        out, _ = p.communicate(timeout=timeout)
      except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
        out += f"\n(killed after {timeout} s)"
      lines = [l for l in out.splitlines() if l.startswith("RESULT ")]
      runs.append((p.returncode, out, json.loads(lines[-1][len("RESULT "):]) if lines else None))
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
  return runs


MP_WORKER = os.path.join(REPO, "tests", "mp_worker.py")


def launch_workers(scenario: str, nproc: int, root, local_devices: int = 2,
                   timeout: float = 120, **env) -> list[tuple[int, str, dict | None]]:
  """Runs tests/mp_worker.py SCENARIO as `nproc` JAX processes of
  `local_devices` CPU devices each, in the directory `root`, with `env`
  added to their environment; returns each process's (exit status, output,
  last "RESULT <json>" or None). A process still running after `timeout`
  seconds is killed (its output then ends saying so)."""
  import sys  # pylint: disable=g-import-not-at-top
  port = free_port()
  env = child_env(local_devices, MP_LOCAL_DEVICES=str(local_devices),
                  **{k: str(v) for k, v in env.items()})
  return _run_children([[sys.executable, MP_WORKER, scenario, str(i), str(nproc), str(port),
                         str(root)] for i in range(nproc)], env, timeout)


def run_processes(scenario: str, nproc: int, root, local_devices: int = 2, timeout: float = 120,
                  **env) -> list[dict]:
  """launch_workers, asserting that every process exited 0 and reported;
  returns each process's result."""
  runs = launch_workers(scenario, nproc, root, local_devices, timeout, **env)
  for i, (rc, out, result) in enumerate(runs):
    assert rc == 0 and result is not None, f"process {i} failed (rc={rc}):\n{out[-4000:]}"
  return [result for _, _, result in runs]


def run_batch(scenarios: list[tuple[str, str, dict]], nproc: int, root, local_devices: int = 2,
              timeout: float = 240) -> list[tuple[int, str, dict | None]]:
  """One launch of tests/mp_worker.py running `scenarios` ([label,
  scenario, {MP_* setting: value}]) in turn in the same `nproc` processes,
  each in root/label; launch_workers' answer (results keyed by label).
  Only for scenarios that catch and report what they expect to fail: one
  that raises ends the batch (and, through the others, every later one)."""
  import json  # pylint: disable=g-import-not-at-top
  batch = [[label, name, {k: str(v) for k, v in settings.items()}]
           for label, name, settings in scenarios]
  return launch_workers("batch", nproc, root, local_devices, timeout, MP_BATCH=json.dumps(batch))


def batch_results(runs: list[tuple[int, str, dict | None]], label: str) -> list[dict]:
  """Each process's result of the scenario `label` of a run_batch; asserts
  that every process reported it, without a crash (else shows its output)."""
  results = []
  for i, (rc, out, result) in enumerate(runs):
    mine = (result or {}).get(label)
    assert mine is not None and "crash" not in mine, (
        f"process {i} (rc={rc}) did not complete scenario {label!r}:\n{out[-4000:]}")
    results.append(mine)
  return results


def init_distributed(pid: int, nproc: int, port: int):
  """Starts this worker as process `pid` of `nproc` JAX processes on
  localhost (gloo CPU collectives); returns the runtime's key-value client."""
  from fastpersist_jax import coordination  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(f"localhost:{port}", num_processes=nproc, process_id=pid,
                             initialization_timeout=60)
  return coordination.orbax_multihost().get_jax_distributed_client()


def worker_arrays(mesh, host: np.ndarray):
  """The three helpers of the multi-process break workers, over `host` (the
  global values): saved(spec, values=host), a jax.Array of `values` sharded
  on `mesh` by PartitionSpec `spec`; target(x), the restore target
  {"w": x's ShapeDtypeStruct with its sharding}; same(restored, values=host),
  whether restored["w"] (global array or numpy) holds exactly `values`."""
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top

  def saved(spec, values=host):
    return jax.make_array_from_callback(values.shape, NamedSharding(mesh, spec),
                                        lambda i: values[i])

  def target(x):
    return {"w": jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)}

  def same(restored, values=host) -> bool:
    w = restored["w"]
    if isinstance(w, np.ndarray):
      return np.array_equal(w, values)
    return all(np.array_equal(np.asarray(s.data), values[s.index]) for s in w.addressable_shards)

  return saved, target, same


def bounded_outcome(fn, check=None, limit: float = 9.0) -> str:
  """fn()'s outcome: "ok" (check(value) holds, or no check), "wrong values",
  the exception raised (Orbax v1's NoEntryError unwrapped to its cause), or
  "HANG" when it has not returned after `limit` seconds (it runs on a daemon
  thread, abandoned then)."""
  import threading  # pylint: disable=g-import-not-at-top
  box: list[str] = []

  def run():
    try:
      value = fn()
      box.append("ok" if check is None or check(value) else "wrong values")
    except Exception as e:  # pylint: disable=broad-except
      while isinstance(e.__cause__, Exception) and type(e).__name__ == "NoEntryError":
        e = e.__cause__
      box.append(f"{type(e).__name__}: {str(e)[:300]}")
  t = threading.Thread(target=run, daemon=True)
  t.start()
  t.join(limit)
  return box[0] if box else "HANG"


def stay_until_process_0_is_done(client, pid: int, key: str, timeout_ms: int) -> None:
  """Process 0 publishes `key`; the others stay alive (their runtime with
  them) until it has, or `timeout_ms` passed."""
  if pid == 0:
    client.key_value_set(key, "1")
    return
  try:
    client.blocking_key_value_get(key, timeout_ms)
  except Exception:  # pylint: disable=broad-except  (timed out: go on)
    pass


def report_and_exit(client, result: dict, pid: int, nproc: int, prefix: str) -> None:
  """A test worker's end: prints "RESULT <json>" of `result`, then exits
  once every process has printed (the first to exit, the coordinator
  process 0, takes the others down with it), without waiting for a thread
  still in a collective or Orbax's close() on a failed peer. `prefix`
  names the keys of this test file."""
  import json  # pylint: disable=g-import-not-at-top
  print("RESULT " + json.dumps(result), flush=True)
  client.key_value_set(f"{prefix}/bye/{pid}", "1")
  for p in range(1, nproc) if pid == 0 else ():
    try:
      client.blocking_key_value_get(f"{prefix}/bye/{p}", 5_000)
    except Exception:  # pylint: disable=broad-except  (a peer already gone)
      pass
  os._exit(0)  # pylint: disable=protected-access


def within(seconds: float, fn):
  """fn() on a thread; fails the test (instead of hanging it) when fn has
  not returned within `seconds`. Returns fn's value, raises its error."""
  import threading  # pylint: disable=g-import-not-at-top
  out: dict = {}

  def run():
    try:
      out["value"] = fn()
    except BaseException as e:  # pylint: disable=broad-except
      out["error"] = e
  t = threading.Thread(target=run, daemon=True)
  t.start()
  t.join(seconds)
  assert not t.is_alive(), f"did not finish within {seconds} s (hung)"
  if "error" in out:
    raise out["error"]
  return out.get("value")
