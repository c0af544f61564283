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
    mesh = Mesh(np.asarray(devices).reshape(shape), names)
    try:
      return NamedSharding(mesh, spec), ""
    except (ValueError, TypeError) as e:
      return None, f"cannot rebuild sharding {spec} ({e})"
  return None, f"sharding type {kind!r} cannot be rebuilt"


def describe(d: Any) -> str:
  if isinstance(d, dict) and d.get("type") == "named":
    return f"NamedSharding(mesh={d.get('mesh_shape')}, axes={d.get('axis_names')}, spec={d.get('spec')})"
  return str(d)
