"""Shardings as JSON, and how to rebuild one on the devices present now."""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding


def encode(sharding: jax.sharding.Sharding) -> dict:
  if isinstance(sharding, NamedSharding):
    spec = []
    for entry in sharding.spec:
      if entry is None or isinstance(entry, str):
        spec.append(entry)
      else:
        spec.append(list(entry))
    return {"type": "named",
            "mesh_shape": [int(n) for n in sharding.mesh.devices.shape],
            "axis_names": [str(a) for a in sharding.mesh.axis_names],
            "spec": spec,
            "axis_types": [getattr(t, "name", str(t)) for t in
                           getattr(sharding.mesh, "axis_types", ())],
            "memory_kind": sharding.memory_kind}
  if isinstance(sharding, SingleDeviceSharding):
    return {"type": "single", "memory_kind": sharding.memory_kind}
  return {"type": "other", "repr": repr(sharding)[:500]}


def decode(d: dict | None) -> tuple[jax.sharding.Sharding | None, str]:
  """The saved sharding rebuilt on current devices, or (None, why not)."""
  if not d:
    return None, "no sharding was recorded"
  kind = d.get("type")
  if kind == "single":
    return SingleDeviceSharding(jax.devices()[0]), ""
  if kind == "named":
    try:
      shape = tuple(int(n) for n in d["mesh_shape"])
      names = tuple(str(a) for a in d["axis_names"])
      spec = PartitionSpec(*[tuple(e) if isinstance(e, list) else e for e in d["spec"]])
    except (KeyError, TypeError, ValueError) as e:
      return None, f"malformed sharding record ({e})"
    devices = jax.devices()
    if math.prod(shape) != len(devices):
      return None, (f"it was saved on a mesh of {math.prod(shape)} devices {dict(zip(names, shape))}, "
                    f"and {len(devices)} devices are present")
    mesh = _make_mesh(np.asarray(devices).reshape(shape), names, d.get("axis_types"))
    try:
      return NamedSharding(mesh, spec), ""
    except (ValueError, TypeError) as e:
      return None, f"cannot rebuild sharding {spec} ({e})"
  return None, f"sharding type {kind!r} cannot be rebuilt"


def _make_mesh(devices: np.ndarray, names: tuple, axis_types: Any) -> Mesh:
  """A Mesh with the saved axis types (Explicit/Auto/Manual) where known."""
  enum = getattr(jax.sharding, "AxisType", None)
  if enum is not None and isinstance(axis_types, list) and len(axis_types) == len(names):
    try:
      return Mesh(devices, names, axis_types=tuple(enum[t] for t in axis_types))
    except (KeyError, TypeError):
      pass
  return Mesh(devices, names)
