"""Attacks on three recent changes: the cyclic collector's pause during saves
and restores (gc_pause), the check of a sealed document on its raw bytes
(disk_format._check_seal), and the per-restore cache of target layouts
(restore_plan.TargetLayouts); plus finalize refusing a missing manifest
now that it no longer reads the metadata.

Each bug found is kept as a test of its fix (a user's gc.disable() undone
by a pause; a child forked during a pause never collecting; an interrupt
in the pause's bookkeeping leaving it on; a "version" edited to 1 skipping
the seal); the rest are regression tests of what held up.
"""

from __future__ import annotations

import asyncio
import contextlib
import dis
import gc
import json
import os
import sys
import threading
import warnings

import helpers  # pylint: disable=g-bad-import-order  (sets XLA_FLAGS before jax is imported)
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from jax.sharding import NamedSharding, PartitionSpec as P

from fastpersist_jax import (FastPersistHandler, FastPersistRestore, FastPersistSave,
                             disk_format, gc_pause, restore_plan)
from fastpersist_jax import handler as handler_module
from fastpersist_jax import save as save_module
from fastpersist_jax.errors import CorruptCheckpointError, FastPersistError, UnsupportedLeafError

THIS = os.path.abspath(__file__)


@pytest.fixture
def handler():
  h = FastPersistHandler()
  yield h
  h.close()


@pytest.fixture(autouse=True)
def _collector_enabled_after():
  """Every test starts and ends with the collector enabled and no pause."""
  gc.enable()
  thresholds = gc.get_threshold()
  yield
  gc.enable()
  assert not gc_pause.is_paused()
  assert gc.get_threshold() == thresholds


def _cli(capsys, *args: str) -> tuple[int, str]:
  """`python -m fastpersist_jax ARGS`'s entry point in this process: (exit
  status, stdout and stderr)."""
  from fastpersist_jax import __main__ as entry  # pylint: disable=g-import-not-at-top
  entry.FLAGS.unparse_flags()
  entry.FLAGS(["fastpersist_jax"])
  capsys.readouterr()
  status = entry.main(["fastpersist_jax", *map(str, args)])
  out, err = capsys.readouterr()
  return status, out + err


@contextlib.contextmanager
def _blocked_background_check(monkeypatch):
  """Holds a save's background commit inside its collector pause (in
  save._check_restorable) until the block ends; yields once it is there."""
  entered, release = threading.Event(), threading.Event()
  real = save_module._check_restorable   # pylint: disable=protected-access

  def blocking(*args, **kwargs):
    entered.set()
    release.wait(30)
    return real(*args, **kwargs)
  monkeypatch.setattr(save_module, "_check_restorable", blocking)
  try:
    yield entered
  finally:
    release.set()


def _async_save(h: FastPersistHandler, directory, tree) -> list:
  os.makedirs(directory, exist_ok=True)
  return asyncio.run(h.async_save(directory, args=FastPersistSave(tree)))


# gc_pause: the collector's state -----------------------------------------------

def test_users_gc_disable_during_a_background_pause_stays(tmp_path, handler, monkeypatch):
  tree = {f"w{i}": jnp.full((4,), i) for i in range(4)}
  with _blocked_background_check(monkeypatch) as entered:
    futures = _async_save(handler, tmp_path / "s", tree)
    assert entered.wait(30)
    assert gc_pause.is_paused() and gc.get_threshold()[0] == 0   # the background pause
    gc.disable()                # the training thread's own choice, now
  for f in futures:
    f.result()
  assert not gc.isenabled()
  assert not gc_pause.is_paused() and gc.get_threshold()[0] != 0


def test_a_child_forked_during_a_background_pause_collects_cycles(tmp_path, handler, monkeypatch):
  tree = {f"w{i}": jnp.full((4,), i) for i in range(4)}
  with _blocked_background_check(monkeypatch) as entered:
    futures = _async_save(handler, tmp_path / "s", tree)
    assert entered.wait(30)
    r, w = os.pipe()
    with warnings.catch_warnings():
      warnings.simplefilter("ignore")   # jax warns of fork with threads
      pid = os.fork()
    if pid == 0:   # the child: only gc and a pause of its own, then out
      try:
        with gc_pause.paused():
          pass
        collects = (gc.isenabled() and gc.get_threshold()[0] != 0 and
                    not gc_pause.is_paused())
        os.write(w, b"1" if collects else b"0")
      finally:
        os._exit(0)   # pylint: disable=protected-access
    os.close(w)
    child_enabled = os.read(r, 1)
    os.close(r)
    os.waitpid(pid, 0)
  for f in futures:
    f.result()
  assert child_enabled == b"1"


def _lines_of_paused() -> list[int]:
  """Every line of gc_pause.paused's body that runs (has a line event)."""
  code = gc_pause.paused.__wrapped__.__code__
  return sorted({line for _, line in dis.findlinestarts(code)
                 if line is not None and line > code.co_firstlineno})


def _raise_at_line(line: int, exc: type[BaseException]):
  """A trace function raising `exc` in gc_pause.paused just before its line
  `line` runs (where a signal's KeyboardInterrupt may land)."""
  code = gc_pause.paused.__wrapped__.__code__

  def local(frame, event, arg):
    if event == "line" and frame.f_lineno == line:
      raise exc
    return local

  def tracer(frame, event, arg):
    return local if frame.f_code is code else None
  return tracer


def test_an_interrupt_anywhere_in_the_pause_leaves_collection_on_once_the_next_pause_ends():
  # A KeyboardInterrupt landing before any line of paused() (its
  # bookkeeping included, entering and leaving): the collector is on and
  # the thresholds are back once a later save or restore's pause ends.
  thresholds = gc.get_threshold()
  lines = _lines_of_paused()
  assert len(lines) >= 8, lines
  for line in lines:
    sys.settrace(_raise_at_line(line, KeyboardInterrupt))
    try:
      with contextlib.suppress(KeyboardInterrupt):
        with gc_pause.paused():
          pass
    finally:
      sys.settrace(None)
    gc.collect()   # a frame the interrupt left behind lets its token go
    with gc_pause.paused():   # a later save or restore, complete
      pass
    assert gc.isenabled(), line
    assert gc.get_threshold() == thresholds, line
    assert not gc_pause.is_paused(), line


def test_the_collector_is_restored_after_each_failing_stage(tmp_path, handler, monkeypatch):
  # A save failing in its tree check, plan, snapshot and background commit,
  # a restore failing, and a KeyboardInterrupt inside a pause: the collector
  # is left enabled (and left disabled where the user disabled it).
  tree = {"w": jnp.arange(8.0)}
  handler.save(tmp_path / "ok", args=FastPersistSave(tree))

  def fail(*args, **kwargs):
    raise KeyboardInterrupt

  def fail_in_background(*args, **kwargs):
    raise RuntimeError("encoding failed")

  for enabled in (True, False):
    (gc.enable if enabled else gc.disable)()
    with pytest.raises(UnsupportedLeafError):
      FastPersistSave({"f": lambda: 0})
    assert gc.isenabled() is enabled
    with monkeypatch.context() as m:
      m.setattr(handler_module, "make_plan", fail)
      with pytest.raises(KeyboardInterrupt):
        handler.save(tmp_path / f"plan{enabled}", args=FastPersistSave(tree))
    assert gc.isenabled() is enabled
    with monkeypatch.context() as m:
      m.setattr(save_module.SaveOperation, "snapshot", fail)
      with pytest.raises(KeyboardInterrupt):
        handler.save(tmp_path / f"snap{enabled}", args=FastPersistSave(tree))
    assert gc.isenabled() is enabled
    with monkeypatch.context() as m:
      m.setattr(save_module.disk_format, "encode_manifest", fail_in_background)
      with pytest.raises(Exception, match="encoding failed"):
        handler.save(tmp_path / f"commit{enabled}", args=FastPersistSave(tree))
    assert gc.isenabled() is enabled
    with pytest.raises(FastPersistError):
      handler.restore(tmp_path / "ok", args=FastPersistRestore({"w": jax.ShapeDtypeStruct((9,), jnp.float32)}))
    assert gc.isenabled() is enabled
    np.testing.assert_array_equal(handler.restore(tmp_path / "ok")["w"], np.arange(8.0))
    assert gc.isenabled() is enabled
  gc.enable()


def test_overlapping_saves_and_restores_from_threads_leave_the_collector_on(tmp_path):
  # Async saves through a CheckpointManager with restores running on other
  # threads meanwhile: every pause ends, the collector is on after.
  trees = [{f"w{i}": jnp.full((16,), i + k, jnp.float32) for i in range(20)} for k in range(3)]
  with ocp.CheckpointManager(tmp_path / "m", item_handlers=FastPersistHandler(),
                             options=ocp.CheckpointManagerOptions(enable_async_checkpointing=True)
                             ) as manager:
    manager.save(0, args=FastPersistSave(trees[0]))
    manager.wait_until_finished()
    errors, results = [], []

    def restorer():
      # A checkpointer of its own: one Orbax manager is not safe to restore
      # from while another thread saves (its restore joins the save thread
      # before that thread may have started).
      try:
        with ocp.Checkpointer(FastPersistHandler()) as ckptr:
          for _ in range(3):
            results.append(ckptr.restore(tmp_path / "m" / "0" / "default")["w3"])
      except BaseException as e:  # pylint: disable=broad-except
        errors.append(e)
    threads = [threading.Thread(target=restorer) for _ in range(2)]
    for t in threads:
      t.start()
    for step in (1, 2):
      manager.save(step, args=FastPersistSave(trees[step]))
    for t in threads:
      t.join(60)
    manager.wait_until_finished()
    assert not errors, errors
    assert len(results) == 6 and all(np.array_equal(r, np.full((16,), 3.0)) for r in results)
    for step in (1, 2):
      np.testing.assert_array_equal(manager.restore(step)["w5"], np.full((16,), 5.0 + step))
  assert gc.isenabled()
  assert not gc_pause.is_paused()


# Seals: raw bytes vs re-encoding ---------------------------------------------

_json_scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) |
                 st.floats(allow_nan=False) | st.text(max_size=6))
_json_values = st.recursive(
    _json_scalars, lambda inner: st.lists(inner, max_size=3) |
    st.dictionaries(st.text(max_size=4), inner, max_size=3), max_leaves=8)
_docs = st.dictionaries(st.text(max_size=6).filter(lambda k: k not in ("format", "version", "crc32c")),
                        _json_values, max_size=4).map(
    lambda d: {"format": "fastpersist", "version": 2, **d})


def _strict(x):
  """x with every value tagged by its type (1, 1.0 and True then differ)."""
  if isinstance(x, dict):
    return ("dict", [(k, _strict(v)) for k, v in x.items()])
  if isinstance(x, list):
    return ("list", [_strict(v) for v in x])
  return (type(x).__name__, repr(x))


def _accepted(raw: bytes) -> dict | None:
  """The decoded document when its seal is accepted on its bytes, else None."""
  try:
    d = json.loads(raw)
  except (ValueError, RecursionError):
    return None
  if not isinstance(d, dict) or d.get("version") != 2:
    return None
  try:
    disk_format._check_seal(d, "doc", raw)   # pylint: disable=protected-access
  except CorruptCheckpointError:
    return None
  return d


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(doc=_docs, data=st.data())
def test_a_damaged_sealed_document_never_decodes_to_other_values(doc, data):
  raw = disk_format.seal(doc)
  assert disk_format.seal_value(raw) == json.loads(raw)["crc32c"]
  expected = _strict(json.loads(raw))
  assert _strict(_accepted(raw)) == expected
  # The byte check and the re-encoding agree on the document as written.
  disk_format._check_seal(json.loads(raw), "doc")   # pylint: disable=protected-access
  kind = data.draw(st.sampled_from(["flip", "truncate", "append", "insert", "delete", "space"]))
  at = data.draw(st.integers(0, len(raw) - 1))
  if kind == "flip":
    bad = raw[:at] + bytes([raw[at] ^ (1 << data.draw(st.integers(0, 7)))]) + raw[at + 1:]
  elif kind == "truncate":
    bad = raw[:at]
  elif kind == "append":
    bad = raw + data.draw(st.sampled_from([b" ", b"\n", b"}", b',"crc32c":0}', raw[at:]]))
  elif kind == "insert":
    bad = raw[:at] + data.draw(st.binary(min_size=1, max_size=4)) + raw[at:]
  elif kind == "delete":
    bad = raw[:at] + raw[at + data.draw(st.integers(1, 4)):]
  else:
    bad = b" " + raw + b"\n"
  got = _accepted(bad)
  if got is not None:   # accepted only where it means exactly what was sealed
    assert _strict(got) == expected, (bad, got)


def _sealed_item(tmp_path, handler) -> str:
  tree = {"x": jnp.arange(8, dtype=jnp.float32) + 0.5, "n": 3}
  handler.save(tmp_path / "s", args=FastPersistSave(tree))
  return str(tmp_path / "s")


def _edit(path: str, edit) -> None:
  with open(path, "rb") as f:
    raw = f.read()
  new = edit(raw)
  assert new != raw
  with open(path, "wb") as f:
    f.write(new)


@pytest.mark.parametrize("edit, accepted", [
    # Same JSON, other bytes: checked by re-encoding, accepted.
    (lambda r: b" \n" + r + b"\n", True),
    (lambda r: r.replace(b'["d","x"]', b'["d","\\u0078"]'), True),
    (lambda r: r.replace(b'"dtype":"float32"', b'"dtype":"int32","dtype":"float32"'), True),
    (lambda r: b'{"crc32c":' + r[r.rindex(b":") + 1:-1] + b"," + r[1:r.rindex(b',"crc32c"')] + b"}",
     True),
    # Other values: refused.
    (lambda r: r.replace(b'"dtype":"float32"', b'"dtype":"float32","dtype":"int32"'), False),
    (lambda r: r.replace(b'"float32"', b'"int32"'), False),
    (lambda r: r.replace(b'"value":3', b'"value":3.0'), False),
    (lambda r: r[:-1] + b',"crc32c":0}', False),
    (lambda r: r[:r.rindex(b',"crc32c"')] + b"}", False),
])
def test_metadata_edits_restore_the_saved_values_or_are_refused(tmp_path, handler, edit, accepted):
  item = _sealed_item(tmp_path, handler)
  _edit(os.path.join(item, disk_format.METADATA_FILE), edit)
  if accepted:
    out = handler.restore(item)
    np.testing.assert_array_equal(np.asarray(out["x"]), np.arange(8, dtype=np.float32) + 0.5)
    assert out["x"].dtype == jnp.float32 and out["n"] == 3 and type(out["n"]) is int
  else:
    with pytest.raises(CorruptCheckpointError):
      handler.restore(item)


def test_verify_reads_a_respelt_metadata_and_refuses_an_edited_one(tmp_path, handler, capsys):
  item = _sealed_item(tmp_path, handler)
  path = os.path.join(item, disk_format.METADATA_FILE)
  _edit(path, lambda r: r.replace(b'["d","x"]', b'["d","\\u0078"]'))
  status, out = _cli(capsys, "verify", item)
  assert status == 0 and "OK" in out, out
  _edit(path, lambda r: r.replace(b'"float32"', b'"int32"'))
  status, out = _cli(capsys, "verify", item)
  assert status != 0 and "checksum does not match" in out, out


def test_a_downgraded_version_does_not_skip_the_seal(tmp_path, handler):
  item = _sealed_item(tmp_path, handler)
  _edit(os.path.join(item, disk_format.METADATA_FILE),
        lambda r: r.replace(b'"version":3', b'"version":1').replace(b'"float32"', b'"int32"'))
  with pytest.raises(CorruptCheckpointError, match="checksum does not match"):
    handler.restore(item)


# Target layouts: one cache entry per leaf fields and target --------------------

def _explicit_mesh():
  return jax.make_mesh((4, 2), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Explicit,) * 2)


def test_mixed_targets_of_twin_leaves_restore_exactly(tmp_path, handler):
  # Leaves of one shape, dtype and sharding (one sharding record), each
  # restored into another target, each target twice (the second from the
  # cache): values bit-exact, shardings and memory kinds exact.
  mesh = helpers.mesh_4x2()
  a = NamedSharding(mesh, P("data", "model"))
  b = NamedSharding(mesh, P("model"))
  pinned = NamedSharding(mesh, P("data", "model"), memory_kind="pinned_host")
  xmesh = _explicit_mesh()
  host = np.arange(8 * 4, dtype=np.float32).reshape(8, 4) * 1.25 - 7
  saved = {f"w{i}": jax.device_put(host + i, a) for i in range(14)}
  keys = jax.device_put(jax.random.split(jax.random.key(7), 8), NamedSharding(mesh, P("data")))
  saved.update(k0=keys, k1=keys, k2=keys, k3=keys)
  explicit = jax.device_put(host, NamedSharding(xmesh, P("data", "model")))
  saved.update(x0=explicit, x1=explicit)
  handler.save(tmp_path / "s", args=FastPersistSave(saved))

  sds = lambda dtype, sharding, **kw: jax.ShapeDtypeStruct((8, 4), dtype, sharding=sharding, **kw)
  abstract = jax.eval_shape(lambda x: x, explicit)
  assert isinstance(abstract.sharding.mesh, jax.sharding.AbstractMesh)
  targets = {
      "w0": sds(jnp.float32, a), "w1": sds(jnp.bfloat16, a), "w2": sds(jnp.float32, b),
      "w3": sds(jnp.float32, a), "w4": sds(jnp.bfloat16, a), "w5": sds(jnp.float32, b),
      "w6": sds(jnp.float32, pinned), "w7": sds(jnp.float32, pinned),
      "w8": jax.device_put(jnp.zeros((8, 4), jnp.int32), b), "w9": jax.device_put(jnp.zeros((8, 4), jnp.int32), b),
      "w10": np.zeros((8, 4), np.float16), "w11": None, "w12": ..., "w13": sds(jnp.float32, None),
      "k0": jax.ShapeDtypeStruct((8,), keys.dtype, sharding=keys.sharding),
      "k1": jax.ShapeDtypeStruct((8, 2), jnp.uint32, sharding=NamedSharding(mesh, P("data"))),
      "k2": jax.ShapeDtypeStruct((8,), keys.dtype, sharding=keys.sharding),
      "k3": jax.ShapeDtypeStruct((8, 2), jnp.uint32, sharding=NamedSharding(mesh, P("data"))),
      "x0": abstract, "x1": abstract,
  }
  out = handler.restore(tmp_path / "s", args=FastPersistRestore(targets))
  for name, t in targets.items():
    got = out[name]
    if t is ... or t is None:   # not restored, as with Orbax's handlers
      assert got is t
      continue
    if name.startswith("k"):
      want = np.asarray(jax.random.key_data(keys))
      data = np.asarray(got if got.dtype == jnp.uint32 else jax.random.key_data(got))
      assert got.dtype == t.dtype and got.sharding == t.sharding, name
      np.testing.assert_array_equal(data, want, err_msg=name)
      continue
    base = host + int(name[1:]) if name.startswith("w") else host
    if t is None:
      want_dtype, want_sharding = np.float32, saved[name].sharding
    elif isinstance(t, np.ndarray):
      want_dtype, want_sharding = t.dtype, None
    else:
      want_dtype = t.dtype
      want_sharding = t.sharding if t.sharding is not None else saved[name].sharding
    want = base.astype(want_dtype)
    assert np.asarray(got).dtype == want.dtype, name
    assert np.asarray(got).tobytes() == want.tobytes(), name
    if want_sharding is None:
      assert isinstance(got, np.ndarray), name
    elif name.startswith("x"):
      assert got.sharding.mesh.axis_types == xmesh.axis_types, name
      assert got.sharding.spec == explicit.sharding.spec, name
      assert got.sharding == explicit.sharding, name
    else:
      assert got.sharding == want_sharding, name
      assert got.sharding.memory_kind == want_sharding.memory_kind, name


def test_cached_layouts_equal_uncached_ones(tmp_path, handler, monkeypatch):
  # The same mixed restore with TargetLayouts and with target_layout alone
  # plans the same jobs (sharding, regions, dtype, key impl) for every leaf,
  # and a target that fails fails for its twin too.
  mesh = helpers.mesh_4x2()
  a = NamedSharding(mesh, P("data", "model"))
  saved = {f"w{i}": jax.device_put(jnp.full((8, 4), i, jnp.float32), a) for i in range(6)}
  saved["s0"] = saved["s1"] = jnp.float32(2.5)
  handler.save(tmp_path / "s", args=FastPersistSave(saved))
  jobs = {}
  real_plan = restore_plan.plan_leaf

  def plan_leaf(leaf_id, meta, target, saved_shards, fallback, hint, layouts=None):
    job = real_plan(leaf_id, meta, target, saved_shards, fallback, hint, layouts)
    jobs.setdefault(layouts is None, {})[leaf_id] = (
        job.sharding, tuple(job.device_indices), job.dtype, job.prng_impl, job.python_type,
        job.numpy_scalar, tuple(s.index for s in job.needed))
    return job
  from fastpersist_jax import restore as restore_module
  monkeypatch.setattr(restore_module, "plan_leaf", plan_leaf)
  targets = {
      "w0": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=a),
      "w1": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=a, weak_type=True),
      "w2": jax.ShapeDtypeStruct((8, 4), jnp.int8, sharding=NamedSharding(mesh, P(None, "model"))),
      "w3": jax.ShapeDtypeStruct((8, 4), jnp.int8, sharding=NamedSharding(mesh, P(None, "model"))),
      "w4": None, "w5": jax.ShapeDtypeStruct((8, 4), jnp.float32, sharding=a),
      "s0": np.float32(0), "s1": 0.0,
  }
  cached = handler.restore(tmp_path / "s", args=FastPersistRestore(targets))
  monkeypatch.setattr(restore_module, "TargetLayouts", lambda: None)
  uncached = handler.restore(tmp_path / "s", args=FastPersistRestore(targets))
  assert jobs[False] == jobs[True]
  for name in targets:
    assert type(cached[name]) is type(uncached[name]), name
    assert np.asarray(cached[name]).tobytes() == np.asarray(uncached[name]).tobytes(), name
  assert type(cached["s1"]) is float and cached["s1"] == 2.5
  assert isinstance(cached["s0"], np.float32) and cached["s0"] == 2.5
  bad = dict(targets, w0=jax.ShapeDtypeStruct((8, 5), jnp.float32, sharding=a),
             w5=jax.ShapeDtypeStruct((8, 5), jnp.float32, sharding=a))
  with pytest.raises(FastPersistError, match="w0"):
    handler.restore(tmp_path / "s", args=FastPersistRestore(bad))


# finalize without the metadata ------------------------------------------------

def test_a_checkpointer_does_not_commit_a_step_whose_manifest_vanished(tmp_path, monkeypatch):
  real = FastPersistHandler.finalize

  def finalize(self, directory):
    os.remove(os.path.join(os.fspath(directory), disk_format.manifest_name(0)))
    return real(self, directory)
  monkeypatch.setattr(FastPersistHandler, "finalize", finalize)
  with ocp.Checkpointer(FastPersistHandler()) as ckptr:
    with pytest.raises(CorruptCheckpointError, match=r"manifests of processes \[0\] are missing"):
      ckptr.save(tmp_path / "step", args=FastPersistSave({"w": jnp.arange(8.0)}))
  assert not os.path.exists(tmp_path / "step")


def test_shared_two_process_finalize_refuses_the_other_process_missing_manifest(tmp_path):
  p0, p1 = helpers.run_scenario(THIS, "finalize_shared", tmp_path, timeout=120)
  assert p0 == {"complete": "ok", "missing": "CorruptCheckpointError [1]"}, p0
  assert p1 == {"complete": "ok", "missing": "not primary"}, p1


def _worker(scenario: str, pid: int, nproc: int, port: int, root: str) -> None:
  """One process of the multi-process test above; prints "RESULT <json>"."""
  client = helpers.init_distributed(pid, nproc, port)
  mesh = jax.make_mesh((2, 2), ("data", "model"), devices=jax.devices())
  host = np.arange(16 * 8, dtype=np.float32).reshape(16, 8)
  w = jax.make_array_from_callback(host.shape, NamedSharding(mesh, P("data")), lambda i: host[i])
  result: dict = {}
  if scenario == "finalize_shared":
    h = FastPersistHandler(multiprocessing_options=ocp.options.MultiprocessingOptions(primary_host=0))
    d = os.path.join(root, "step")
    h.save(d, args=FastPersistSave({"w": w}))
    h.finalize(d)
    result["complete"] = "ok"
    client.key_value_set(f"gcseal/saved/{pid}", "1")
    client.blocking_key_value_get(f"gcseal/saved/{1 - pid}", 60_000)
    if pid == 0:
      os.remove(os.path.join(d, disk_format.manifest_name(1)))
    try:
      h.finalize(d)
      result["missing"] = "accepted" if pid == 0 else "not primary"
    except CorruptCheckpointError as e:
      result["missing"] = "CorruptCheckpointError " + str(e).split("processes ")[1].split(" ")[0]
  else:
    raise SystemExit(f"unknown scenario {scenario}")
  helpers.report_and_exit(client, result, pid, nproc, "gcseal")


if __name__ == "__main__":
  if sys.argv[1:2] == ["--worker"]:
    _worker(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), sys.argv[6])
  else:   # Bazel py_test runs the file itself
    sys.exit(pytest.main([__file__, *sys.argv[1:]]))
