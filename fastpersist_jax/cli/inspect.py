"""`inspect`: the saved tree from its metadata alone (no data is read): leaf
paths, kinds, shapes, dtypes, shardings and bytes, with totals."""

from __future__ import annotations

import json
import math
from typing import Any

from fastpersist_jax import disk_format, reader


def _sharding_str(d: dict | None) -> str:
  if not d:
    return "-"
  if d.get("type") == "named":
    spec = ", ".join("None" if e is None else repr(e) if isinstance(e, str) else
                     repr(tuple(e)) for e in d.get("spec", []))
    mesh = ", ".join(f"{a}={n}" for a, n in zip(d.get("axis_names", []), d.get("mesh_shape", [])))
    return f"mesh({mesh}) P({spec})"
  return str(d.get("type"))


def _json_number(value: Any) -> Any:
  """Strict JSON has no NaN or infinities: those become strings ("nan", "inf")."""
  if isinstance(value, list):
    return [_json_number(v) for v in value]
  if isinstance(value, float) and not math.isfinite(value):
    return repr(value)
  return value


def describe_item(directory: str) -> dict[str, Any]:
  """The tree of one item directory, from its metadata alone, as JSON-ready
  data (strict JSON: NaN and infinities are strings).

  Returns:
    {"directory": str, "placement": "shared" | "per_host",
     "process_count": int, "leaves": [leaf, ...] (in saved order),
     "leaf_count": int, "array_count": int, "bytes": int (logical bytes of
     all arrays, each global array once), "custom_metadata": the JSON saved
     as FastPersistSave(custom_metadata=), or None}, where each leaf is
    {"path": key path (str), "kind": str} plus, for arrays (kinds array,
    numpy, np_scalar): "dtype" (name; "key<impl>" for typed PRNG keys),
    "shape" (list of ints; for keys the key shape), "sharding" (the saved
    sharding dict, or None), "bytes" (int: prod(shape) x itemsize of the
    saved data) and, for keys, "key_data" ("<dtype>[<shape>]" of the key
    data); for Python scalars: "scalar_type" and "value" (complex as [re, im]).

  Raises:
    CheckpointNotFoundError: no directory or no fastpersist.json there.
    CorruptCheckpointError: the metadata does not validate.
  """
  meta = disk_format.read_metadata(directory)
  leaves = []
  total = 0
  for leaf in meta.leaves:
    entry: dict[str, Any] = {"path": reader.keystr(leaf.path), "kind": leaf.kind}
    if leaf.kind in disk_format.ARRAY_KINDS:
      nbytes = math.prod(leaf.shape) * disk_format.dtype_from_name(leaf.dtype).itemsize
      total += nbytes
      entry.update(dtype=leaf.dtype, shape=list(leaf.shape), sharding=leaf.sharding, bytes=nbytes)
      if leaf.prng_impl:
        # Typed PRNG keys: restore gives keys of this shape; the data is their key data.
        entry.update(dtype=f"key<{leaf.prng_impl}>", shape=list(leaf.shape[:-1]),
                     key_data=f"{leaf.dtype}{list(leaf.shape)}")
    elif leaf.kind == "scalar":
      value = leaf.value
      value = [value.real, value.imag] if isinstance(value, complex) else value
      entry.update(scalar_type=leaf.scalar_type, value=_json_number(value))
    leaves.append(entry)
  return {"directory": directory, "placement": meta.placement, "process_count": meta.process_count,
          "leaves": leaves, "leaf_count": len(leaves),
          "array_count": sum(l["kind"] in disk_format.ARRAY_KINDS for l in leaves), "bytes": total,
          "custom_metadata": disk_format.read_custom_metadata(directory)}


def format_item(d: dict[str, Any]) -> str:
  """describe_item's result `d` as a table: a heading line, one row per leaf
  (path, kind, dtype, shape, sharding, bytes; scalars show "= value"), and a
  total line (leaves, arrays, bytes and MiB, 2**20 bytes). No trailing
  newline."""
  rows = [("path", "kind", "dtype", "shape", "sharding", "bytes")]
  for l in d["leaves"]:
    if "dtype" in l:
      rows.append((l["path"], l["kind"], l["dtype"], str(tuple(l["shape"])),
                   _sharding_str(l["sharding"]), str(l["bytes"])))
    else:
      value = f"= {l['value']!r}" if "value" in l else ""
      rows.append((l["path"], l["kind"], value, "", "", ""))
  widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
  lines = [f"{d['directory']} ({d['placement']} placement, {d['process_count']} process(es))"]
  lines += ["  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
  lines.append(f"  total: {d['leaf_count']} leaves, {d['array_count']} arrays, {d['bytes']} bytes "
               f"({d['bytes'] / 2**20:.1f} MiB)")
  if d.get("custom_metadata") is not None:
    lines.append(f"  custom metadata: {json.dumps(d['custom_metadata'])}")
  return "\n".join(lines)


def main(path: str, as_json: bool = False) -> int:
  """The inspect command: prints every item at `path` (an item directory or
  an Orbax step directory) as format_item tables, or with `as_json` as one
  JSON object {"items": [describe_item(...), ...]}. Reads no data.

  Returns:
    0 (the exit status).

  Raises:
    CheckpointNotFoundError: `path` holds no checkpoint (a usage error:
      exit 2 in __main__).
    CorruptCheckpointError: metadata that does not validate (exit 1).
  """
  items = [describe_item(d) for d in reader.item_directories(path)]
  if as_json:
    print(json.dumps({"items": items}, indent=1, allow_nan=False))
  else:
    print("\n".join(format_item(d) for d in items))
  return 0
