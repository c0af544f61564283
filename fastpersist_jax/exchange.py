"""Swapping replica-parallel parts between hosts on restore.

A per-host checkpoint saved with replica_parallel holds, on each host, only
that host's byte ranges of every shard replicated across hosts (with
host_redundancy k, each range on k hosts). Restoring on the same topology,
each host reads and verifies its own parts, and all hosts swap them with
collectives over JAX's distributed runtime (`process_allgather`): first a
header (status, save id, part list) from everyone, so that every process
raises together if any failed or the hosts hold different saves; then the
bytes, in bounded rounds, each distinct part sent once by one of its holders
(chosen from the headers alone, the same on every process, spreading the
bytes evenly).

The building blocks (`rendezvous`, `allgather_bytes`, `allgather_blobs`,
`assign_providers`) are also what recovery.py uses. They are collectives:
every process must call the same ones in the same order, and the sizes and
choices they take must be decided from exchanged data, never local state.
"""

from __future__ import annotations

import json
import zlib

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from fastpersist_jax import disk_format
from fastpersist_jax.errors import CorruptCheckpointError, PeerTimeoutError

# (process, record, bytes) of one part.
Part = tuple[int, disk_format.ShardRecord, np.ndarray]
# Bytes each process contributes per collective round: every local device
# receives process_count times this, so it bounds the exchange's memory.
ROUND_BYTES = 64 << 20


def _bucket(n: int) -> int:
  """n rounded up to a power of two (>= 1 KiB): every distinct payload size
  compiles a new allgather, so sizes are few."""
  return max(1024, 1 << max(0, n - 1).bit_length())


def _allgather(payload: np.ndarray, size: int) -> np.ndarray:
  """[process_count, size] uint8: every process's payload, zero-padded."""
  padded = np.zeros(max(size, 1), np.uint8)
  padded[:payload.size] = payload
  return np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), -1)


def allgather_bytes(payload: bytes) -> list[bytes]:
  """Every process's `payload` (any length), in process order. Two
  collective rounds (sizes, then the padded payloads)."""
  sizes = np.asarray(multihost_utils.process_allgather(np.array([len(payload)], np.int64)))
  sizes = sizes.reshape(-1)
  gathered = _allgather(np.frombuffer(payload, np.uint8), _bucket(int(sizes.max())))
  return [gathered[p, :int(sizes[p])].tobytes() for p in range(len(sizes))]


def allgather_json(obj) -> list:
  """Every process's JSON-able `obj`, in process order (compressed on the wire)."""
  return [json.loads(zlib.decompress(b)) for b in
          allgather_bytes(zlib.compress(json.dumps(obj, separators=(",", ":")).encode(), 1))]


def broadcast_bytes(payload: bytes, size: int, source: int) -> bytes:
  """Process `source`'s `payload` (`size` bytes, which every process already
  knows) on every process: one collective round."""
  buf = np.zeros(_bucket(size), np.uint8)
  if jax.process_index() == source:
    buf[:len(payload)] = np.frombuffer(payload, np.uint8)
  out = multihost_utils.broadcast_one_to_all(buf, is_source=jax.process_index() == source)
  return np.asarray(out)[:size].tobytes()


def allgather_blobs(blob: np.ndarray, totals: list[int]) -> list[np.ndarray]:
  """Every process's uint8 `blob`, whose lengths `totals` every process
  already knows (from exchanged headers): ceil(max(totals) / ROUND_BYTES)
  collective rounds, none when nothing is sent."""
  received = [np.empty(t, np.uint8) for t in totals]
  most = max(totals, default=0)
  size = ROUND_BYTES if most > ROUND_BYTES else _bucket(most)
  for start in range(0, most, ROUND_BYTES):
    chunk = _allgather(blob[start:start + ROUND_BYTES], size)
    for p, t in enumerate(totals):
      n = max(0, min(ROUND_BYTES, t - start))
      received[p][start:start + n] = chunk[p, :n]
  return received


def assign_providers(holders: list[list[int]], nbytes: list[int]) -> list[int]:
  """Chooses, for each item (a part), which of its holders sends it.

  Args:
    holders: per item, the processes that hold it (non-empty).
    nbytes: per item, its size in bytes.

  Returns:
    Per item, the chosen process: the holder with the fewest bytes assigned
    so far (ties: the lowest process), items taken in the order given. A pure
    function of its arguments, so every process computes the same choice.
  """
  load: dict[int, int] = {}
  out = []
  for procs, n in zip(holders, nbytes):
    p = min(procs, key=lambda q: (load.get(q, 0), q))
    load[p] = load.get(p, 0) + n
    out.append(p)
  return out


def rendezvous(name: str, timeout_s: float) -> None:
  """Waits until every process has called rendezvous(name); raises
  PeerTimeoutError on every process that waited if one did not come within
  `timeout_s` (a barrier of JAX's distributed runtime, which, unlike a
  collective, has a timeout). `name` must be new each time."""
  if jax.process_count() == 1:
    return
  try:
    ocp.multihost.get_barrier_sync_fn()(key=name, timeout_ms=max(1, int(timeout_s * 1000)))
  except Exception as e:  # pylint: disable=broad-except  (the runtime raises its own types)
    raise PeerTimeoutError(
        f"not every one of the {jax.process_count()} processes joined {name!r} within "
        f"{timeout_s:.0f} s ({type(e).__name__}: {str(e)[:300]}); every process of the job "
        "must call it") from e


def part_order(key: tuple) -> tuple:
  """A sort key for part_key()s (a whole shard, part None, sorts first)."""
  return (key[0], key[1], key[2] or (-1, -1))


def part_key(rec: dict) -> tuple:
  """The identity of a part in a header: (leaf, index, part or None)."""
  part = rec.get("part")
  return (rec["leaf"], tuple(tuple(i) for i in rec["index"]), tuple(part) if part else None)


def record_of(d: dict) -> disk_format.ShardRecord:
  """A ShardRecord (bytes in memory: no file) from a header's part entry."""
  part = d.get("part")
  return disk_format.ShardRecord(d["leaf"], tuple(tuple(i) for i in d["index"]), -1, 0,
                            d["nbytes"], d["crc32c"], tuple(part) if part else None)


def swap_parts(mine: list[tuple[disk_format.ShardRecord, np.ndarray]], save_id: str,
               error: str | None) -> list[Part]:
  """Sends this process's verified parts to all processes; returns the others'.

  A collective: every process must call it at the same point of the same
  restore. `error` (this process could not read its parts) is raised on
  every process instead of leaving the others waiting. A part held by
  several processes (host_redundancy) is sent by one of them only.
  """
  me = jax.process_index()
  header = {"error": error, "save_id": save_id,
            "parts": [{"leaf": r.leaf, "index": [list(i) for i in r.index], "part": list(r.part),
                       "nbytes": r.nbytes, "crc32c": r.crc32c} for r, _ in mine]}
  headers = allgather_json(header)
  for p, h in enumerate(headers):
    if h["error"]:
      raise CorruptCheckpointError(f"process {p} cannot read its part of the checkpoint: "
                                   f"{h['error']}")
    if h["save_id"] != save_id:
      raise CorruptCheckpointError(
          f"process {p} is restoring a different save (id {h['save_id']}) than process {me} "
          f"({save_id}); restore the same step on every host")
  # One sender per distinct part, the same choice on every process.
  holders: dict[tuple, list[int]] = {}
  sizes: dict[tuple, int] = {}
  for p, h in enumerate(headers):
    for d in h["parts"]:
      holders.setdefault(part_key(d), []).append(p)
      sizes[part_key(d)] = d["nbytes"]
  keys = sorted(holders, key=part_order)
  sender = dict(zip(keys, assign_providers([holders[k] for k in keys], [sizes[k] for k in keys])))
  sent = [[d for d in h["parts"] if sender[part_key(d)] == p] for p, h in enumerate(headers)]
  mine_sent = [b for (r, b), d in zip(mine, header["parts"]) if sender[part_key(d)] == me]
  blob = np.concatenate(mine_sent) if mine_sent else np.zeros(0, np.uint8)
  received = allgather_blobs(blob, [sum(d["nbytes"] for d in s) for s in sent])
  out: list[Part] = []
  for p, parts in enumerate(sent):
    if p == me:
      continue
    at = 0
    for d in parts:
      rec = record_of(d)
      out.append((p, rec, received[p][at:at + rec.nbytes]))
      at += rec.nbytes
  return out
