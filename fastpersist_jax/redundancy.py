"""Host redundancy of per-host checkpoints: which host writes which part.

A shard replicated on R processes is split into R byte ranges ("parts",
`plan.split_bytes`). In per-host directories, with redundancy k =
min(FastPersistOptions.host_redundancy, R), the holder of rank j of the
shard's sorted holder list writes parts j, j+1, ..., j+k-1 (mod R):

    R = 4, k = 2:   host 0: parts 0, 1   host 1: parts 1, 2
                    host 2: parts 2, 3   host 3: parts 3, 0

Part i is then on the k consecutive holders i-k+1, ..., i (mod R), every host
writes k/R of the shard, and any k-1 hosts can be lost. Bytes of a shard
held by one host only (model parallelism across hosts) have a single copy
whatever k is; `single_copy_bytes` counts them for the warning each save logs.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from typing import Any

import jax
import numpy as np

from fastpersist_jax import treepath

logger = logging.getLogger(__name__)


def parts_of_holder(n_holders: int, rank: int, redundancy: int) -> list[int]:
  """The parts (of `n_holders`) the holder at `rank` writes.

  Args:
    n_holders: R, the number of processes holding a replica of the shard.
    rank: this process's rank among them (sorted by process index).
    redundancy: the wanted number of copies; at most R are made.

  Returns:
    Part numbers in [0, R): rank, rank+1, ... (mod R), min(k, R) of them.

  Raises:
    ValueError: rank outside [0, R) or redundancy < 1.
  """
  if not 0 <= rank < n_holders or redundancy < 1:
    raise ValueError(f"rank {rank} of {n_holders} holders, redundancy {redundancy}")
  return [(rank + i) % n_holders for i in range(min(redundancy, n_holders))]


def holders_of_part(n_holders: int, part: int, redundancy: int) -> list[int]:
  """Positions of the holders that write part `part`: the inverse of
  parts_of_holder (part, part-1, ..., mod R; min(k, R) of them)."""
  return [(part - i) % n_holders for i in range(min(redundancy, n_holders))]


@dataclasses.dataclass(frozen=True)
class SingleCopyReport:
  """Bytes of one save (all processes together) written by one host only."""
  nbytes: int = 0            # across the whole checkpoint
  local_nbytes: int = 0      # of those, written by this process
  leaves: tuple[str, ...] = ()   # the first few leaves concerned


_CACHE: dict = {}
_CACHE_MAX = 16384
_CACHE_LOCK = threading.Lock()
_NAMES_SHOWN = 3
# A training loop saves trees of one structure again and again: the names of
# the leaves a warning shows are looked up once per structure.
_NAMES_CACHE: dict = {}
_NAMES_CACHE_MAX = 64


def _leaf_single_copy(x: jax.Array, me: int, redundancy: int,
                      replica_parallel: bool) -> tuple[int, int]:
  """(bytes of x with a single copy, of which this process writes)."""
  key = (x.sharding, x.shape, x.dtype, me, redundancy, replica_parallel)
  with _CACHE_LOCK:
    found = _CACHE.get(key)
  if found is not None:
    return found
  holders: dict = {}
  for device, idx in x.sharding.devices_indices_map(x.shape).items():
    index = tuple(sl.indices(n)[:2] for sl, n in zip(idx, x.shape))
    holders.setdefault(index, set()).add(device.process_index)
  total = local = 0
  itemsize = np.dtype(x.dtype).itemsize
  for index, procs in holders.items():
    # Without replica-parallel writes every holder writes the whole shard.
    copies = len(procs) if not replica_parallel else min(redundancy, len(procs))
    if copies == 1:
      nbytes = math.prod(b - a for a, b in index) * itemsize
      total += nbytes
      # Who writes it: the only holder, or (replica-parallel, k = 1) each
      # holder its own part.
      if me in procs:
        from fastpersist_jax.plan import split_bytes  # pylint: disable=g-import-not-at-top  (plan imports this module)
        start, stop = split_bytes(nbytes, len(procs))[sorted(procs).index(me)]
        local += stop - start
  with _CACHE_LOCK:
    if len(_CACHE) >= _CACHE_MAX:
      _CACHE.clear()
    _CACHE[key] = (total, local)
  return total, local


def single_copy_bytes(tree: Any, *, redundancy: int, replica_parallel: bool) -> SingleCopyReport:
  """Counts the bytes of a per-host save of `tree` that only one host writes.

  Args:
    tree: the pytree being saved; only its jax.Array leaves count (numpy
      leaves and scalars are written by every host).
    redundancy: FastPersistOptions.host_redundancy.
    replica_parallel: FastPersistOptions.replica_parallel.

  Returns:
    A SingleCopyReport (bytes across all processes, of them this process's,
    and the first leaves concerned). Depends only on shardings, shapes and
    dtypes; cached per leaf (and the names per tree structure): ~1 us a leaf.
  """
  me = jax.process_index()
  leaves, treedef = jax.tree_util.tree_flatten(tree)   # (None, empty containers: no bytes)
  total = local = 0
  concerned = []
  for i, x in enumerate(leaves):
    if isinstance(x, jax.Array):
      t, l = _leaf_single_copy(x, me, redundancy, replica_parallel)
      if t:
        total += t
        local += l
        concerned.append(i)
  names: tuple[str, ...] = ()
  if concerned:
    key = (treedef, tuple(concerned[:_NAMES_SHOWN]), len(concerned))
    try:
      with _CACHE_LOCK:
        names = _NAMES_CACHE.get(key, ())
    except TypeError:  # pytree node data that cannot be hashed
      key = None
    if not names:
      flat, _ = jax.tree_util.tree_flatten_with_path(tree)   # same leaves, same order
      names = tuple(treepath.to_str(flat[i][0]) for i in concerned[:_NAMES_SHOWN])
      if len(concerned) > _NAMES_SHOWN:
        names += (f"... {len(concerned) - _NAMES_SHOWN} more",)
      if key is not None:
        with _CACHE_LOCK:
          if len(_NAMES_CACHE) >= _NAMES_CACHE_MAX:
            _NAMES_CACHE.clear()
          _NAMES_CACHE[key] = names
  return SingleCopyReport(total, local, names)


# Reports by save plan: plan.make_plan hands every save of a tree with the
# same structure, shardings, shapes and dtypes the same `shards` list, so a
# report found for it holds for the next such save (the list is kept here
# with its report, so its id is not reused while cached).
_BY_PLAN: dict[int, tuple[Any, tuple[int, bool], SingleCopyReport]] = {}
_BY_PLAN_MAX = 8


def warn_single_copies(tree: Any, *, redundancy: int, replica_parallel: bool,
                       plan_token: Any = None) -> SingleCopyReport:
  """Logs one WARNING when some bytes of this per-host save have one copy.

  Args:
    tree: the pytree being saved.
    redundancy, replica_parallel: as for single_copy_bytes.
    plan_token: an object that is the same for every save of trees with the
      same structure, shardings, shapes and dtypes (the save plan's shard
      list): the report is then computed once for all of them.

  Returns:
    The report (see single_copy_bytes).
  """
  settings = (redundancy, replica_parallel)
  with _CACHE_LOCK:
    found = _BY_PLAN.get(id(plan_token)) if plan_token is not None else None
  if found is not None and found[0] is plan_token and found[1] == settings:
    report = found[2]
  else:
    report = single_copy_bytes(tree, redundancy=redundancy, replica_parallel=replica_parallel)
    if plan_token is not None:
      with _CACHE_LOCK:
        if len(_BY_PLAN) >= _BY_PLAN_MAX:
          _BY_PLAN.pop(next(iter(_BY_PLAN)))
        _BY_PLAN[id(plan_token)] = (plan_token, settings, report)
  if report.nbytes:
    logger.warning(
        "fastpersist: %d bytes of this per-host checkpoint (%d written by this host) have a "
        "single copy and are lost with their host: %s. Shards not replicated across hosts "
        "cannot get a second copy without moving data; save to a shared directory every N "
        "steps to protect them.", report.nbytes, report.local_nbytes, ", ".join(report.leaves))
  return report
