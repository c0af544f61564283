"""Restoring per-host checkpoints after hosts (and their disks) were lost.

Per-host checkpoints (each process its own root, the CheckpointManager
layout `root/<step>/<item>`) hold each part of a shard replicated across
hosts on `host_redundancy` hosts (redundancy.py). When a host is replaced,
its root is empty; when a disk failed, some steps are gone from it. The
functions here are collective: every process of the job calls them, with
its own root, and all of them get the same answer:

- `latest_restorable_step`: the newest step whose bytes the hosts' roots
  together still hold (at least one copy of every byte, all copies of the
  same save).
- `restore_per_host`: restores one step on every process, each part taken
  from its own disk or, when it has lost it, from a host that holds it.

Every decision is made from what all processes exchanged, never from one
process's local state, so all of them run the same collectives in the same
order and raise the same error. Rounds: a barrier with a timeout (a missing
process makes the others raise PeerTimeoutError instead of hanging in a
collective), the hosts' headers (what each holds), the checkpoint metadata
from one holder, the parts each process lacks, the part bytes, and the
outcome.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import logging
import os
import stat
from typing import Any

import jax
import numpy as np

from fastpersist_jax import errors, exchange, disk_format, restore_plan, treepath
from fastpersist_jax.disk_format import Index
from fastpersist_jax.errors import CheckpointNotFoundError, CorruptCheckpointError, FastPersistError
from fastpersist_jax.io_engine import AlignedBuffer, IOEngine
from fastpersist_jax.options import FastPersistOptions
from fastpersist_jax.restore import Restorer, check_part

logger = logging.getLogger(__name__)

# Calls are numbered alike on every process (they are collective), which
# names each call's barrier.
_CALLS = itertools.count()
_NAMES_SHOWN = 8


@dataclasses.dataclass
class _Local:
  """What this process's root holds of one step. `header` is what it tells
  the others: {"problem": why} when it holds nothing usable."""
  directory: str
  header: dict
  meta_raw: bytes | None = None
  manifest: disk_format.Manifest | None = None

  @property
  def usable(self) -> bool:
    return "parts" in self.header


def _step_numbers(root: str) -> list[int]:
  """Committed steps under a CheckpointManager root (directories named by
  the step number; Orbax's temporary directories are not)."""
  try:
    names = os.listdir(root)
  except (FileNotFoundError, NotADirectoryError):
    return []
  except OSError as e:
    logger.warning("fastpersist recovery: cannot list %s: %s", root, e)
    return []
  return sorted(int(n) for n in names if n.isdigit() and os.path.isdir(os.path.join(root, n)))


def _read_meta_bytes(path: str) -> bytes:
  st = os.stat(path)
  if not stat.S_ISREG(st.st_mode) or st.st_size > disk_format.MAX_JSON_BYTES:
    raise CorruptCheckpointError(f"{path} is not a regular file of at most "
                                 f"{disk_format.MAX_JSON_BYTES} bytes")
  with open(path, "rb") as f:
    return f.read(disk_format.MAX_JSON_BYTES + 1)


def _inspect(root: str, step: int, item: str) -> _Local:
  """Reads and validates this process's metadata and manifest of `step`.
  Never raises: damage makes this process hold nothing of the step."""
  me = jax.process_index()
  directory = os.path.join(root, str(step), item)
  if not os.path.isdir(directory):
    return _Local(directory, {"problem": "absent"})
  try:
    path = os.path.join(directory, disk_format.METADATA_FILE)
    raw = _read_meta_bytes(path)
    meta = disk_format.decode_metadata_bytes(raw, path)
    if meta.placement != "per_host":
      raise CorruptCheckpointError(f"{path}: a {meta.placement!r} checkpoint, not per-host")
    manifest = disk_format.read_manifest(directory, me, meta)
  except Exception as e:  # pylint: disable=broad-except  (a damaged copy is a lost one)
    problem = f"{type(e).__name__}: {str(e)[:500]}"
    logger.warning("fastpersist recovery: this host's copy of step %d is unusable: %s", step,
                   problem)
    return _Local(directory, {"problem": problem})
  leaf_bytes = [int(np.prod(l.shape, dtype=np.int64)) * disk_format.dtype_from_name(l.dtype).itemsize
                if l.kind in disk_format.ARRAY_KINDS else 0 for l in meta.leaves]
  header = {
      "save_id": meta.save_id or "", "digest": hashlib.sha256(raw).hexdigest()[:32],
      "meta_bytes": len(raw), "process_count": meta.process_count, "leaf_bytes": leaf_bytes,
      "parts": [{"leaf": r.leaf, "index": [list(i) for i in r.index],
                 "part": list(r.part) if r.part is not None else None,
                 "nbytes": r.nbytes, "crc32c": r.crc32c} for r in manifest.shards]}
  return _Local(directory, header, raw, manifest)


@dataclasses.dataclass
class _Verdict:
  """What the exchanged headers of one step say (the same on every process)."""
  holders: list[int]                  # processes holding a usable copy of the step
  problem: str | None = None          # the step cannot be restored: why
  gaps: dict[int, int] = dataclasses.field(default_factory=dict)   # leaf -> bytes gone

  @property
  def restorable(self) -> bool:
    return bool(self.holders) and self.problem is None and not self.gaps


def _union_length(ranges: list[tuple[int, int]]) -> int:
  total, end = 0, 0
  for a, b in sorted(ranges):
    if b > end:
      total += b - max(a, end)
      end = b
  return total


def _judge(headers: list[dict | None], step: int) -> _Verdict:
  """Whether the hosts' copies of `step` (headers[p]: what process p holds;
  None or {"problem": why}: nothing) cover every byte of one save."""
  holders = [p for p, h in enumerate(headers) if h is not None and "parts" in h]
  if not holders:
    why = "; ".join(f"process {p}: {h['problem']}" for p, h in enumerate(headers)
                    if h is not None and h.get("problem") not in (None, "absent"))
    return _Verdict([], f"no process holds a usable copy of step {step}" +
                    (f" ({why})" if why else ""))
  saves = {(headers[p]["save_id"], headers[p]["digest"]) for p in holders}
  if len(saves) > 1:
    found = ", ".join(f"process {p}: save {headers[p]['save_id'] or '?'} (metadata "
                      f"{headers[p]['digest'][:8]})" for p in holders)
    return _Verdict(holders, f"the hosts' copies of step {step} are of different saves ({found})")
  ref = headers[holders[0]]
  if ref["process_count"] != jax.process_count():
    return _Verdict(holders, f"step {step} was saved by {ref['process_count']} processes; "
                             f"recovery needs the same number ({jax.process_count()} now)")
  ranges: dict[tuple, list[tuple[int, int]]] = {}
  for p in holders:
    for d in headers[p]["parts"]:
      ranges.setdefault((d["leaf"], tuple(map(tuple, d["index"]))), []).append(
          tuple(d["part"]) if d["part"] else (0, d["nbytes"]))
  covered: dict[int, int] = {}
  for (leaf, _), rs in ranges.items():
    covered[leaf] = covered.get(leaf, 0) + _union_length(rs)
  gaps = {leaf: total - covered.get(leaf, 0) for leaf, total in enumerate(ref["leaf_bytes"])
          if covered.get(leaf, 0) < total}
  return _Verdict(holders, None, gaps)


def _describe_gaps(verdict: _Verdict, meta: disk_format.CheckpointMetadata, step: int,
                   item: str) -> str:
  lost = [p for p in range(jax.process_count()) if p not in verdict.holders]
  names = [f"{treepath.to_str(meta.leaves[leaf].path)} ({gone} of "
           f"{_leaf_nbytes(meta.leaves[leaf])} bytes)"
           for leaf, gone in sorted(verdict.gaps.items())]
  more = f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else ""
  return (f"step {step} (item {item!r}) cannot be restored: {sum(verdict.gaps.values())} bytes "
          f"of {len(names)} {'leaf' if len(names) == 1 else 'leaves'} have no surviving copy: {', '.join(names[:_NAMES_SHOWN])}{more}. "
          f"Processes {verdict.holders} hold the step, {lost} lost it (every copy of those "
          "bytes was on lost hosts: restore an older step or a shared-directory checkpoint)")


def _leaf_nbytes(leaf: disk_format.LeafMeta) -> int:
  return int(np.prod(leaf.shape, dtype=np.int64)) * disk_format.dtype_from_name(leaf.dtype).itemsize


def latest_restorable_step(root: str, item: str = "default", *,
                           timeout_s: float = 600.0) -> int | None:
  """The newest step the hosts' per-host roots together can restore.

  A collective: every process calls it with its own root (e.g. its local
  NVMe; empty or missing on a replaced host). Each reports the steps it
  holds (metadata and manifest valid, data files of the recorded sizes);
  a step counts when every byte has at least one copy on some host and all
  copies are of the same save.

  Args:
    root: this process's CheckpointManager root (steps are `root/<step>/<item>`).
    item: the item name (a single-item CheckpointManager uses "default").
    timeout_s: how long to wait for every process to call.

  Returns:
    The step number, the same on every process; None when no step is
    restorable.

  Raises:
    PeerTimeoutError: a process did not call within timeout_s.
  """
  call = next(_CALLS)
  mine = {}
  for step in _step_numbers(os.fspath(root)):
    local = _inspect(os.fspath(root), step, item)
    if local.usable:
      mine[str(step)] = local.header
  exchange.rendezvous(f"fastpersist_recovery_{call}_steps", timeout_s)
  everyone = exchange.allgather_json(mine)
  steps = sorted({int(s) for h in everyone for s in h}, reverse=True)
  for step in steps:
    verdict = _judge([h.get(str(step)) for h in everyone], step)
    if verdict.restorable:
      return step
    logger.info("fastpersist recovery: step %d is not restorable: %s", step,
                verdict.problem or f"{sum(verdict.gaps.values())} bytes have no copy")
  return None


def _regions(meta: disk_format.CheckpointMetadata, target: Any) -> dict[int, list[Index]]:
  """Per data leaf the restore needs, the regions this process's devices
  (or a numpy result) will hold, as Restorer places them (restore_plan)."""
  selected, _ = restore_plan.match_target(meta.leaves, target, "the checkpoint")
  out: dict[int, list[Index]] = {}
  for leaf_id, t in selected:
    if leaf_id is None or meta.leaves[leaf_id].kind not in disk_format.ARRAY_KINDS:
      continue
    job = restore_plan.target_layout(leaf_id, meta.leaves[leaf_id], t, [])
    out.setdefault(leaf_id, []).extend(idx for _, idx in job.device_indices)
  return out


def _overlaps(a: Index, b: Index) -> bool:
  return all(max(a0, b0) < min(a1, b1) for (a0, a1), (b0, b1) in zip(a, b))


class _RecoveryRestorer(Restorer):
  """A Restorer whose metadata came from another host and whose missing
  parts were already received (`parts`: (process, record, bytes))."""

  def __init__(self, engine: IOEngine, options: FastPersistOptions, directory: str,
               meta: disk_format.CheckpointMetadata, manifests: dict[int, disk_format.Manifest],
               parts: list[exchange.Part]):
    super().__init__(engine, options, directory, meta=meta, manifests=manifests)
    self._parts = parts

  def _parts_are_on_peers(self) -> bool:
    return True

  def _swap_parts(self, records) -> list[exchange.Part]:
    return self._parts


def _error_entry(e: BaseException) -> list:
  return [type(e).__name__, str(e)[:4000]]


def _raise_first(entries: list, what: str, cause: BaseException | None = None) -> None:
  """Raises, on every process alike, the first process's error (if any):
  its FastPersistError class (else CorruptCheckpointError) and message.
  `cause` (this process's exception) is chained where it is that error."""
  for p, entry in enumerate(entries):
    if entry:
      name, message = entry
      cls = getattr(errors, name, None)
      if not (isinstance(cls, type) and issubclass(cls, FastPersistError)):
        cls, message = CorruptCheckpointError, f"{name}: {message}"
      raise cls(f"{what}: process {p}: {message}") from (
          cause if p == jax.process_index() else None)


def restore_per_host(root: str, step: int, target: Any = None, item: str = "default",
                     options: FastPersistOptions | None = None, *,
                     timeout_s: float | None = None) -> Any:
  """Restores `step` of a per-host checkpoint on every process, whatever
  hosts lost.

  A collective: every process calls it with its own root, including a
  process whose root is empty or missing (a replaced host). Each process
  reads the parts its root still holds; the parts it lacks are sent by a
  process that holds them (one sender per part, chosen evenly); every part
  is checked against its CRC-32C. Needs the same process count as the save.

  Args:
    root: this process's CheckpointManager root (steps are `root/<step>/<item>`).
    step: the step to restore (see latest_restorable_step).
    target: as FastPersistRestore's item: a pytree of jax.Arrays or
      jax.ShapeDtypeStructs with shardings (the usual case), a sub-tree, or
      None to restore as saved.
    item: the item name (a single-item CheckpointManager uses "default").
    options: engine, buffer and checksum options (FastPersistOptions()).
    timeout_s: how long to wait for every process to call; default
      options.commit_timeout_s.

  Returns:
    The restored pytree, as Restorer.restore returns it.

  Raises:
    CorruptCheckpointError: on every process alike when some bytes of the
      step have no surviving copy (naming the leaves and how many bytes are
      gone), when the hosts hold different saves of the step, or when a part
      is damaged (ChecksumMismatchError). No partial result is returned.
    CheckpointNotFoundError: no process holds the step.
    RestoreMismatchError: the target does not fit the checkpoint.
    PeerTimeoutError: a process did not call within timeout_s.
  """
  options = options or FastPersistOptions()
  timeout_s = options.commit_timeout_s if timeout_s is None else timeout_s
  call = next(_CALLS)
  me = jax.process_index()
  root = os.fspath(root)
  local = _inspect(root, step, item)

  # 1. Who holds what (one header each), and whether that covers the step.
  exchange.rendezvous(f"fastpersist_recovery_{call}", timeout_s)
  headers = exchange.allgather_json(local.header)
  verdict = _judge(headers, step)
  if not verdict.holders:
    raise CheckpointNotFoundError(f"{verdict.problem} (item {item!r})")
  if verdict.problem:
    raise CorruptCheckpointError(verdict.problem)

  # 2. The metadata, from the first holder.
  source = verdict.holders[0]
  meta_raw = exchange.broadcast_bytes(local.meta_raw if me == source else b"",
                                      headers[source]["meta_bytes"], source)
  meta = disk_format.decode_metadata_bytes(meta_raw, f"metadata of step {step} from process {source}")
  if verdict.gaps:
    raise CorruptCheckpointError(_describe_gaps(verdict, meta, step, item))

  # 3. The parts each process lacks. All parts of the step, in one order.
  holders: dict[tuple, list[int]] = {}
  entries: dict[tuple, dict] = {}
  for p in verdict.holders:
    for d in headers[p]["parts"]:
      key = exchange.part_key(d)
      holders.setdefault(key, []).append(p)
      entries.setdefault(key, d)
  table = sorted(holders, key=exchange.part_order)
  wants, error = [], None
  try:
    regions = _regions(meta, target)
    for i, key in enumerate(table):
      if (me not in holders[key] and key[0] in regions and
          any(_overlaps(key[1], r) for r in regions[key[0]])):
        wants.append(i)
  except Exception as e:  # pylint: disable=broad-except  (reported to every process below)
    error = _error_entry(e)
  requests = exchange.allgather_json({"error": error, "wants": wants})
  _raise_first([r["error"] for r in requests], f"restoring step {step}")

  # 4. Each wanted part is sent once, by the holder with the fewest bytes to send.
  wanted = sorted({i for r in requests for i in r["wants"]})
  sender = exchange.assign_providers([holders[table[i]] for i in wanted],
                                     [entries[table[i]]["nbytes"] for i in wanted])
  sends = [[i for i, s in zip(wanted, sender) if s == p] for p in range(jax.process_count())]
  totals = [sum(entries[table[i]]["nbytes"] for i in s) for s in sends]
  engine = IOEngine(options)
  blob, send_error = np.zeros(totals[me], np.uint8), None
  if sends[me]:
    try:
      blob = _read_parts(engine, local, [table[i] for i in sends[me]], meta, totals[me])
    except Exception as e:  # pylint: disable=broad-except  (reported to every process below)
      send_error = _error_entry(e)
  received = exchange.allgather_blobs(blob, totals)
  mine_wanted = set(wants)
  parts: list[exchange.Part] = []
  for p, s in enumerate(sends):
    at = 0
    for i in s:
      d = entries[table[i]]
      if i in mine_wanted:
        parts.append((p, exchange.record_of(d), received[p][at:at + d["nbytes"]]))
      at += d["nbytes"]
  del received

  # 5. Assemble, verify, build; then agree on the outcome.
  result, error, cause = None, send_error, None
  if error is None:
    try:
      manifests = {me: local.manifest} if local.manifest is not None else {}
      result = _RecoveryRestorer(engine, options, local.directory, meta, manifests,
                                 parts).restore(target)
    except Exception as e:  # pylint: disable=broad-except  (reported to every process below)
      error, cause = _error_entry(e), e
  outcomes = exchange.allgather_json(error)
  _raise_first(outcomes, f"restoring step {step}", cause)
  return result


def _read_parts(engine: IOEngine, local: _Local, keys: list[tuple],
                meta: disk_format.CheckpointMetadata, total: int) -> np.ndarray:
  """This process's bytes of `keys` (parts of its manifest), read and
  checked against their CRC-32C, concatenated. Raises ChecksumMismatchError,
  OSError."""
  by_key = {(r.leaf, r.index, r.part): r for r in local.manifest.shards}
  recs = [by_key[k] for k in keys]
  buf = np.frombuffer(AlignedBuffer(max(1, sum(disk_format.align_up(r.nbytes) for r in recs))),
                      np.uint8)
  files: dict[int, Any] = {}
  views, extents, at = [], [], 0
  try:
    for r in recs:
      if r.file not in files:
        files[r.file] = engine.open_for_read(
            os.path.join(local.directory, local.manifest.files[r.file][0]))
      views.append(buf[at:at + r.nbytes])
      extents.append((files[r.file], r.offset, views[-1]))
      at += disk_format.align_up(r.nbytes)
    engine.read(extents)
  finally:
    for f in files.values():
      f.close()
  out = np.empty(total, np.uint8)
  at = 0
  for r, v in zip(recs, views):
    check_part(v, r, treepath.to_str(meta.leaves[r.leaf].path),
               f"process {jax.process_index()}, {local.manifest.files[r.file][0]} @ {r.offset}")
    out[at:at + r.nbytes] = v
    at += r.nbytes
  return out
