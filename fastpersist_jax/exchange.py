"""Swapping replica-parallel parts between hosts on restore.

A per-host checkpoint saved with replica_parallel holds, on each host, only
that host's byte range of every shard replicated across hosts. Restoring on
the same topology, each host reads and verifies its own parts, and all hosts
swap them with collectives over JAX's distributed runtime
(`process_allgather`): first a header (status, save id, part list) from
everyone, so that every process raises together if any failed or the hosts
hold different saves; then the bytes, in bounded rounds.
"""

from __future__ import annotations

import json

import jax
import numpy as np
from jax.experimental import multihost_utils

from fastpersist_jax import layout
from fastpersist_jax.errors import CorruptCheckpointError

# (process, record, bytes) of one part.
Part = tuple[int, layout.ShardRecord, np.ndarray]
# Bytes each process contributes per collective round: every local device
# receives process_count times this, so it bounds the exchange's memory.
ROUND_BYTES = 64 << 20


def _allgather(payload: np.ndarray, size: int) -> np.ndarray:
  """[process_count, size] uint8: every process's payload, zero-padded."""
  padded = np.zeros(max(size, 1), np.uint8)
  padded[:payload.size] = payload
  return np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), -1)


def _allgather_varlen(payload: np.ndarray) -> list[np.ndarray]:
  sizes = np.asarray(multihost_utils.process_allgather(np.array([payload.size], np.int64)))
  sizes = sizes.reshape(-1)
  gathered = _allgather(payload, int(sizes.max()))
  return [gathered[p, :int(sizes[p])] for p in range(len(sizes))]


def swap_parts(mine: list[tuple[layout.ShardRecord, np.ndarray]], save_id: str,
               error: str | None) -> list[Part]:
  """Sends this process's verified parts to all processes; returns the others'.

  A collective: every process must call it at the same point of the same
  restore. `error` (this process could not read its parts) is raised on
  every process instead of leaving the others waiting.
  """
  me = jax.process_index()
  header = {"error": error, "save_id": save_id,
            "parts": [{"leaf": r.leaf, "index": [list(i) for i in r.index], "part": list(r.part),
                       "nbytes": r.nbytes, "crc32c": r.crc32c} for r, _ in mine]}
  headers = [json.loads(h.tobytes()) for h in
             _allgather_varlen(np.frombuffer(json.dumps(header).encode(), np.uint8))]
  for p, h in enumerate(headers):
    if h["error"]:
      raise CorruptCheckpointError(f"process {p} cannot read its part of the checkpoint: "
                                   f"{h['error']}")
    if h["save_id"] != save_id:
      raise CorruptCheckpointError(
          f"process {p} is restoring a different save (id {h['save_id']}) than process {me} "
          f"({save_id}); restore the same step on every host")
  totals = [sum(d["nbytes"] for d in h["parts"]) for h in headers]
  blob = np.concatenate([b for _, b in mine]) if mine else np.zeros(0, np.uint8)
  received = [np.empty(t, np.uint8) for t in totals]
  for start in range(0, max(totals), ROUND_BYTES):
    chunk = _allgather(blob[start:start + ROUND_BYTES], ROUND_BYTES if max(totals) > ROUND_BYTES
                       else max(totals))
    for p in range(len(headers)):
      n = max(0, min(ROUND_BYTES, totals[p] - start))
      received[p][start:start + n] = chunk[p, :n]
  out: list[Part] = []
  for p, h in enumerate(headers):
    if p == me:
      continue
    at = 0
    for d in h["parts"]:
      rec = layout.ShardRecord(d["leaf"], tuple(tuple(i) for i in d["index"]), -1, 0,
                               d["nbytes"], d["crc32c"], tuple(d["part"]))
      out.append((p, rec, received[p][at:at + rec.nbytes]))
      at += rec.nbytes
  return out
