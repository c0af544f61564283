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
import re
import stat
import sys
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from fastpersist_jax import errors, exchange, disk_format, restore_plan, treepath
from fastpersist_jax.disk_format import Index
from fastpersist_jax.errors import (CheckpointNotFoundError, CorruptCheckpointError,
                                    FastPersistError, ForeignCheckpointError)
from fastpersist_jax.io_engine import AlignedBuffer, IOEngine
from fastpersist_jax.options import FastPersistOptions
from fastpersist_jax.restore import Restorer, check_part

logger = logging.getLogger(__name__)

# Calls are numbered alike on every process (they are collective), which
# names each call's barrier.
_CALLS = itertools.count()
_NAMES_SHOWN = 8
# Orbax's step metadata (CheckpointManager: in the step directory, naming
# each item's handler; Checkpointer: in the checkpoint directory, naming its
# handler).
_STEP_METADATA = "_CHECKPOINT_METADATA"
# What Orbax's PyTree format (StandardCheckpointHandler,
# PyTreeCheckpointHandler) leaves in an item directory.
_PYTREE_FILES = ("_METADATA", "manifest.ocdbt", "_sharding", "array_metadatas")
# What goes between the parentheses of an Orbax restore args class, in hints.
_ARGS_TEXT = {"StandardRestore": "abstract_tree", "PyTreeRestore": "item=abstract_tree",
              "JsonRestore": "", "ArrayRestore": "", "JaxRandomKeyRestore": "",
              "NumpyRandomKeyRestore": ""}


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


def _listing_locally(name_format: Any) -> Any:
  """`name_format` with Orbax's single_host_load_and_broadcast off (in it
  and in a composite format's parts): per-host roots differ, so each
  process lists its own, and the listing must not run collectives of its
  own outside recovery's protocol (they have no timeout)."""
  if not dataclasses.is_dataclass(name_format) or isinstance(name_format, type):
    return name_format
  changes: dict[str, Any] = {}
  if getattr(name_format, "single_host_load_and_broadcast", False):
    changes["single_host_load_and_broadcast"] = False
  if hasattr(name_format, "write_name_format") and hasattr(name_format, "read_name_formats"):
    changes["write_name_format"] = _listing_locally(name_format.write_name_format)
    changes["read_name_formats"] = type(name_format.read_name_formats)(
        _listing_locally(f) for f in name_format.read_name_formats)
  if not changes:
    return name_format
  try:
    return dataclasses.replace(name_format, **changes)
  except Exception:  # pylint: disable=broad-except  (a custom format: used as given)
    return name_format


def _name_format(step_name_format: Any) -> Any:
  """The NameFormat recovery finds steps with: `step_name_format`, else
  Orbax's standard one (what a CheckpointManager with default options
  names steps with), listing each process's own root."""
  if step_name_format is None:
    return ocp.path.step.standard_name_format()
  if not (callable(getattr(step_name_format, "find_all", None)) and
          callable(getattr(step_name_format, "find_step", None))):
    raise TypeError(f"step_name_format must be an Orbax NameFormat (e.g. "
                    f"ocp.path.step.standard_name_format(...)), not {step_name_format!r}")
  return _listing_locally(step_name_format)


def _step_paths(root: str, name_format: Any) -> dict[int, str]:
  """Committed steps under a CheckpointManager root, as `name_format` maps
  their directories (Orbax's temporary directories are not committed):
  {step: directory}."""
  if not os.path.isdir(root):   # a replaced host: nothing, and nothing to warn about
    return {}
  try:
    found = list(name_format.find_all(root))
  except Exception as e:  # pylint: disable=broad-except  (this host then holds nothing)
    logger.warning("fastpersist recovery: cannot list the steps under %s with %s: %s: %s", root,
                   name_format, type(e).__name__, e)
    return {}
  out: dict[int, str] = {}
  for m in sorted(found, key=lambda m: (int(m.step), os.fspath(m.path))):
    out.setdefault(int(m.step), os.fspath(m.path))
  return out


def _step_path(root: str, name_format: Any, step: int) -> str | None:
  """The committed directory of `step` under `root` (name_format.find_step),
  or None."""
  if not os.path.isdir(root):
    return None
  try:
    return os.fspath(name_format.find_step(root, step).path)
  except ValueError:   # Orbax's "no such step"
    return None
  except Exception as e:  # pylint: disable=broad-except  (this host then holds nothing)
    logger.warning("fastpersist recovery: cannot find step %d under %s with %s: %s: %s", step,
                   root, name_format, type(e).__name__, e)
    return None


def _unmapped(root: str, mapped: set[str], item: str) -> list[str]:
  """Names of the directories under `root` that look like committed steps
  (holding `item` or Orbax's step metadata) but are not among `mapped`
  (what the step name format found), Orbax's temporary directories aside."""
  try:
    names = sorted(os.listdir(root))
  except OSError:
    return []
  out = []
  for name in names:
    path = os.path.join(root, name)
    if (name in mapped or ocp.path.step.TMP_DIR_SUFFIX in name or not os.path.isdir(path) or
        not (os.path.isdir(os.path.join(path, item)) or
             os.path.isfile(os.path.join(path, _STEP_METADATA)))):
      continue
    try:
      if ocp.path.step.is_path_temporary(path):
        continue
    except Exception:  # pylint: disable=broad-except  (not Orbax's: counts as a step)
      pass
    out.append(name)
  return out


def _guess_format(names: list[str]) -> str | None:
  """The standard_name_format call that names all of `names`, if one does."""
  guesses = set()
  for name in names:
    m = re.fullmatch(r"(?:(.+)_)?(\d+)", name)
    if m is None:
      return None
    prefix, digits = m.groups()
    guesses.add((prefix, len(digits) if digits.startswith("0") and len(digits) > 1 else None))
  if len(guesses) != 1:
    return None
  ((prefix, length),) = guesses
  if prefix is None and length is None:
    return None
  args = ([f"step_prefix={prefix!r}"] if prefix is not None else []) + (
      [f"step_format_fixed_length={length}"] if length is not None else [])
  return f"ocp.path.step.standard_name_format({', '.join(args)})"


def _unmapped_note(root: str, name_format: Any, names: list[str]) -> str:
  """What a WARNING says of `names` (_unmapped)."""
  shown = ", ".join(names[:_NAMES_SHOWN]) + (
      f" and {len(names) - _NAMES_SHOWN} more" if len(names) > _NAMES_SHOWN else "")
  one = len(names) == 1
  return (f"{len(names)} {'directory' if one else 'directories'} under {root} "
          f"{'looks like a checkpoint step' if one else 'look like checkpoint steps'}, but the "
          f"step name format {name_format} maps {'it' if one else 'them'} to no step, so "
          f"recovery ignores {'it' if one else 'them'}: {shown}. {_format_hint(names)}")


def _format_hint(names: list[str]) -> str:
  return (f"Pass step_name_format={_guess_format(names) or 'the NameFormat they were saved with'} "
          "(as the CheckpointManagerOptions that saved them: step_prefix, "
          "step_format_fixed_length or step_name_format)")


def _read_meta_bytes(path: str) -> bytes:
  st = os.stat(path)
  if not stat.S_ISREG(st.st_mode) or st.st_size > disk_format.MAX_JSON_BYTES:
    raise CorruptCheckpointError(f"{path} is not a regular file of at most "
                                 f"{disk_format.MAX_JSON_BYTES} bytes")
  with open(path, "rb") as f:
    return f.read(disk_format.MAX_JSON_BYTES + 1)


def _recorded_handler(directory: str) -> tuple[str, str] | None:
  """(handler class path, the file that records it) of the item in
  `directory` according to Orbax's step metadata, or None. Never raises."""
  directory = os.path.normpath(directory)
  places = ((os.path.join(directory, _STEP_METADATA), None),   # a Checkpointer's
            (os.path.join(os.path.dirname(directory), _STEP_METADATA),   # a manager's item
             os.path.basename(directory)))
  for path, item in places:
    try:
      d, _ = disk_format.read_json(path, "Orbax step metadata")
    except Exception:  # pylint: disable=broad-except  (none, or unreadable: no record)
      continue
    handlers = d.get("item_handlers") if isinstance(d, dict) else None
    if item is None and isinstance(handlers, str):
      return handlers, path
    if item is not None and isinstance(handlers, dict) and isinstance(handlers.get(item), str):
      return handlers[item], path
  return None


def _is_ours(class_path: str) -> bool:
  """Whether `class_path` names fastpersist_jax's handler (or one deriving
  from it, where its module is loaded: nothing is imported)."""
  if class_path.startswith("fastpersist_jax."):
    return True
  module, _, name = class_path.rpartition(".")
  cls = getattr(sys.modules.get(module), name, None)
  from fastpersist_jax.handler import FastPersistHandler  # pylint: disable=g-import-not-at-top
  return isinstance(cls, type) and issubclass(cls, FastPersistHandler)


def _how_to_read(class_path: str) -> tuple[str, str, str]:
  """(writer, handler expression, args expression) for a handler class
  path recorded by Orbax, for messages. Imports nothing: a class whose
  module is not loaded is named by its path."""
  module, _, name = class_path.rpartition(".")
  cls = getattr(sys.modules.get(module), name, None)
  if module.startswith("orbax.") and getattr(ocp, name, None) is cls and cls is not None:
    writer, handler = f"Orbax's {name}", f"ocp.{name}()"
  else:
    writer, handler = class_path, f"{class_path}(...)"
  args = "the CheckpointArgs registered for it"
  try:
    restore_args = ocp.args.get_registered_args_cls(cls)[1] if isinstance(cls, type) else None
  except Exception:  # pylint: disable=broad-except  (none registered)
    restore_args = None
  if restore_args is not None:
    public = next((n for n in sorted(dir(ocp.args))
                   if not n.startswith("_") and getattr(ocp.args, n) is restore_args), None)
    args = (f"ocp.args.{public}({_ARGS_TEXT.get(public, '...')})" if public else
            f"{restore_args.__module__}.{restore_args.__qualname__}(...)")
  return writer, handler, args


def foreign_checkpoint_error(directory: str) -> ForeignCheckpointError | None:
  """The error to raise for `directory` (an item directory without
  fastpersist.json) when another handler wrote a checkpoint there, else
  None (it holds no checkpoint, or a damaged fastpersist one).

  The writer is the handler Orbax's step metadata records for the item
  (a CheckpointManager's in the step directory, a Checkpointer's in the
  directory itself), else, for a directory holding the files of Orbax's
  PyTree format (_METADATA, manifest.ocdbt, ocdbt.process_*, _sharding),
  StandardCheckpointHandler / PyTreeCheckpointHandler.

  Args:
    directory: an item directory (`root/<step>/<item>`).
  Returns:
    A ForeignCheckpointError naming `directory`, the writer, and the Orbax
    handler and args that read it; or None. Never raises.
  """
  directory = os.fspath(directory)
  if not os.path.isdir(directory):
    return None
  recorded = _recorded_handler(directory)
  if recorded is not None:
    class_path, record = recorded
    if _is_ours(class_path):
      return None
    writer, handler, args = _how_to_read(class_path)
    evidence = f"as {record} records"
  else:
    try:
      names = set(os.listdir(directory))
    except OSError:
      return None
    found = [n for n in _PYTREE_FILES if n in names] + sorted(
        n for n in names if n.startswith("ocdbt.process_"))
    if not ({"_METADATA", "manifest.ocdbt"} & names or any(n.startswith("ocdbt.process_")
                                                           for n in names)):
      return None
    writer = "Orbax's StandardCheckpointHandler or PyTreeCheckpointHandler"
    handler, args = "ocp.StandardCheckpointHandler()", "ocp.args.StandardRestore(abstract_tree)"
    evidence = f"its PyTree format: {', '.join(found[:_NAMES_SHOWN])}"
  return ForeignCheckpointError(
      f"{directory} is not a fastpersist checkpoint ({disk_format.METADATA_FILE} is absent): "
      f"{writer} wrote it ({evidence}). Read it with that handler: "
      f"item_handlers={handler} and args={args}, e.g. "
      f"ocp.Checkpointer({handler}).restore({directory!r}, args={args}); in a run whose older "
      f"steps another handler wrote, open a CheckpointManager on the run with "
      f"item_handlers={handler} to restore those steps")


def _inspect(directory: str, step: int) -> _Local:
  """Reads and validates this process's metadata and manifest of `step`
  (its item directory `directory`). Never raises: damage makes this
  process hold nothing of the step; a checkpoint another handler wrote
  adds "foreign" (the error's message) to the header."""
  me = jax.process_index()
  if not os.path.isdir(directory):
    return _Local(directory, {"problem": "absent"})
  if not os.path.exists(os.path.join(directory, disk_format.METADATA_FILE)):
    foreign = foreign_checkpoint_error(directory)
    if foreign is not None:
      return _Local(directory, {"problem": "written by another handler", "foreign": str(foreign)})
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
                           timeout_s: float = 600.0,
                           step_name_format: Any = None) -> int | None:
  """The newest step the hosts' per-host roots together can restore.

  A collective: every process calls it with its own root (e.g. its local
  NVMe; empty or missing on a replaced host). Each reports the steps it
  holds (metadata and manifest valid, data files of the recorded sizes);
  a step counts when every byte has at least one copy on some host and all
  copies are of the same save.

  Each process finds its steps with `step_name_format` (Orbax's find_all).
  Directories under its root that look like committed steps (holding
  `item` or Orbax's step metadata) but that the format maps to no step (a
  root saved with a step_prefix, read without it) are named in one WARNING,
  with the format that would map them where one does. Steps another
  handler wrote (e.g. Orbax's StandardCheckpointHandler) are not
  restorable here; those newer than the answer are named in a WARNING.

  Args:
    root: this process's CheckpointManager root (steps are `root/<step
      name>/<item>`).
    item: the item name (a single-item CheckpointManager uses "default").
    timeout_s: how long to wait for every process to call.
    step_name_format: the Orbax NameFormat the CheckpointManager named steps
      with: CheckpointManagerOptions.step_name_format, or
      ocp.path.step.standard_name_format(step_prefix=...,
      step_format_fixed_length=...) matching its step_prefix and
      step_format_fixed_length. None: the standard format (`root/12`).
      Its single_host_load_and_broadcast is ignored (each host lists its
      own root).

  Returns:
    The step number, the same on every process; None when no step is
    restorable.

  Raises:
    PeerTimeoutError: a process did not call within timeout_s.
    TypeError: step_name_format is not a NameFormat (on the calling
      process, before any collective: every process passes the same one).
  """
  name_format = _name_format(step_name_format)
  call = next(_CALLS)
  root = os.fspath(root)
  paths = _step_paths(root, name_format)
  unmapped = _unmapped(root, {os.path.basename(p) for p in paths.values()}, item)
  if unmapped:
    logger.warning("fastpersist recovery: %s", _unmapped_note(root, name_format, unmapped))
  mine, foreign = {}, {}
  for step, path in paths.items():
    local = _inspect(os.path.join(path, item), step)
    if local.usable:
      mine[str(step)] = local.header
    elif "foreign" in local.header:
      foreign[step] = local.header["foreign"]
  exchange.rendezvous(f"fastpersist_recovery_{call}_steps", timeout_s)
  everyone = exchange.allgather_json(mine)
  steps = sorted({int(s) for h in everyone for s in h}, reverse=True)
  answer = None
  for step in steps:
    verdict = _judge([h.get(str(step)) for h in everyone], step)
    if verdict.restorable:
      answer = step
      break
    logger.info("fastpersist recovery: step %d is not restorable: %s", step,
                verdict.problem or f"{sum(verdict.gaps.values())} bytes have no copy")
  newer = sorted(s for s in foreign if answer is None or s > answer)
  if newer:
    logger.warning("fastpersist recovery: step%s %s under %s %s written by another handler, not "
                   "restorable by fastpersist: %s", "s" if len(newer) > 1 else "",
                   ", ".join(map(str, newer)), root, "were" if len(newer) > 1 else "was",
                   foreign[newer[-1]])
  return answer


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
                     timeout_s: float | None = None, step_name_format: Any = None) -> Any:
  """Restores `step` of a per-host checkpoint on every process, whatever
  hosts lost.

  A collective: every process calls it with its own root, including a
  process whose root is empty or missing (a replaced host). Each process
  reads the parts its root still holds; the parts it lacks are sent by a
  process that holds them (one sender per part, chosen evenly); every part
  is checked against its CRC-32C. Needs the same process count as the save.

  Args:
    root: this process's CheckpointManager root (steps are `root/<step
      name>/<item>`).
    step: the step to restore (see latest_restorable_step).
    target: as FastPersistRestore's item: a pytree of jax.Arrays or
      jax.ShapeDtypeStructs with shardings (the usual case), a sub-tree, or
      None to restore as saved.
    item: the item name (a single-item CheckpointManager uses "default").
    options: engine, buffer and checksum options (FastPersistOptions()).
    timeout_s: how long to wait for every process to call; default
      options.commit_timeout_s.
    step_name_format: the Orbax NameFormat the CheckpointManager named steps
      with (see latest_restorable_step); None: the standard format. The
      step's directory is found with its find_step; a process whose root has
      none names, in a WARNING and in the error when no process has the
      step, the directories there that the format maps to no step.

  Returns:
    The restored pytree, as Restorer.restore returns it.

  Raises:
    CorruptCheckpointError: on every process alike when some bytes of the
      step have no surviving copy (naming the leaves and how many bytes are
      gone), when the hosts hold different saves of the step, or when a part
      is damaged (ChecksumMismatchError). No partial result is returned.
    CheckpointNotFoundError: no process holds the step.
    ForeignCheckpointError (a CheckpointNotFoundError): no process holds a
      fastpersist copy of the step, and a process's is one another handler
      wrote (e.g. Orbax's StandardCheckpointHandler): names the writer and
      the Orbax handler and args that read it.
    RestoreMismatchError: the target does not fit the checkpoint.
    PeerTimeoutError: a process did not call within timeout_s.
    TypeError: step_name_format is not a NameFormat (before any collective).
  """
  name_format = _name_format(step_name_format)
  options = options or FastPersistOptions()
  timeout_s = options.commit_timeout_s if timeout_s is None else timeout_s
  call = next(_CALLS)
  me = jax.process_index()
  root = os.fspath(root)
  step_dir = _step_path(root, name_format, step)
  if step_dir is not None:
    local = _inspect(os.path.join(step_dir, item), step)
  else:
    try:
      name = name_format.build_name(step)
    except Exception:  # pylint: disable=broad-except  (a format only for finding steps)
      name = str(step)
    local = _Local(os.path.join(root, name, item), {"problem": "absent"})
    unmapped = _unmapped(root, {os.path.basename(p)
                                for p in _step_paths(root, name_format).values()}, item)
    if unmapped:
      logger.warning("fastpersist recovery: %s", _unmapped_note(root, name_format, unmapped))
      local.header["problem"] = (
          f"{name_format} finds no step {step} under {root}, which holds "
          f"{len(unmapped)} step-like {'directory' if len(unmapped) == 1 else 'directories'} it "
          f"maps to no step ({', '.join(unmapped[:_NAMES_SHOWN])}"
          f"{' ...' if len(unmapped) > _NAMES_SHOWN else ''}). {_format_hint(unmapped)}")

  # 1. Who holds what (one header each), and whether that covers the step.
  exchange.rendezvous(f"fastpersist_recovery_{call}", timeout_s)
  headers = exchange.allgather_json(local.header)
  verdict = _judge(headers, step)
  if not verdict.holders:
    foreign = [(p, h["foreign"]) for p, h in enumerate(headers) if h.get("foreign")]
    if foreign:
      raise ForeignCheckpointError(f"step {step} (item {item!r}): process {foreign[0][0]}: "
                                   f"{foreign[0][1]}")
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
