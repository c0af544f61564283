"""Shardings as JSON, and how to rebuild one on the devices present now.

The record keeps what Orbax's NamedShardingMetadata keeps: the mesh's shape,
axis names and types, the partition spec, the memory kind, and the ids of
the mesh's devices in mesh order. A restore without a target rebuilds
exactly that placement when those devices exist; otherwise, when the same
number of devices is present, the same mesh shape over the devices in
`jax.devices()` order.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding


def encode(sharding: jax.sharding.Sharding) -> dict:
  """The JSON record of `sharding` (see FORMAT.md)."""
  if isinstance(sharding, NamedSharding) and all(isinstance(a, str)
                                                 for a in sharding.mesh.axis_names):
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
            "memory_kind": sharding.memory_kind,
            "device_ids": [int(d.id) for d in sharding.mesh.devices.flat]}
  if isinstance(sharding, SingleDeviceSharding):
    (device,) = sharding.device_set
    return {"type": "single", "memory_kind": sharding.memory_kind, "device_ids": [int(device.id)]}
  # Not rebuilt on restore (e.g. a mesh with non-string axis names): without
  # a target such an array comes back as numpy, with a warning.
  return {"type": "other", "repr": repr(sharding)[:500]}


def decode(d: dict | None) -> tuple[jax.sharding.Sharding | None, str]:
  """The saved sharding rebuilt on current devices, or (None, why not).

  On the saved devices (by id) where all of them are present; else, for a
  named sharding, the same mesh shape over `jax.devices()` when their number
  matches, and for a single-device one, the first device. The saved memory
  kind is kept where the device has it.
  """
  if not d:
    return None, "no sharding was recorded"
  kind = d.get("type")
  saved = _saved_devices(d.get("device_ids"))
  if kind == "single":
    device = saved[0] if saved else jax.devices()[0]
    return _with_memory_kind(SingleDeviceSharding(device), d.get("memory_kind")), ""
  if kind == "named":
    try:
      shape = tuple(int(n) for n in d["mesh_shape"])
      names = tuple(str(a) for a in d["axis_names"])
      spec = PartitionSpec(*[tuple(e) if isinstance(e, list) else e for e in d["spec"]])
    except (KeyError, TypeError, ValueError) as e:
      return None, f"malformed sharding record ({e})"
    devices = saved if saved and len(saved) == math.prod(shape) else jax.devices()
    if math.prod(shape) != len(devices):
      return None, (f"it was saved on a mesh of {math.prod(shape)} devices {dict(zip(names, shape))}, "
                    f"and {len(devices)} devices are present")
    mesh = _make_mesh(np.asarray(devices).reshape(shape), names, d.get("axis_types"))
    try:
      return _with_memory_kind(NamedSharding(mesh, spec), d.get("memory_kind")), ""
    except (ValueError, TypeError) as e:
      return None, f"cannot rebuild sharding {spec} ({e})"
  return None, f"sharding type {kind!r} cannot be rebuilt"


def _saved_devices(ids: Any) -> list | None:
  """The devices with the saved ids, in saved order, if every one exists."""
  if not ids:
    return None
  by_id = {d.id: d for d in jax.devices()}
  if not all(i in by_id for i in ids):
    return None
  return [by_id[i] for i in ids]


def _with_memory_kind(sharding: jax.sharding.Sharding, memory_kind: Any) -> jax.sharding.Sharding:
  """`sharding` in the saved memory kind when its devices have that memory."""
  if not isinstance(memory_kind, str) or memory_kind == sharding.memory_kind:
    return sharding
  try:
    device = next(iter(sharding.device_set))
    kinds = {m.kind for m in device.addressable_memories()}
  except Exception:  # pylint: disable=broad-except  (a backend without memories)
    return sharding
  return sharding.with_memory_kind(memory_kind) if memory_kind in kinds else sharding


def _make_mesh(devices: np.ndarray, names: tuple, axis_types: Any) -> Mesh:
  """A Mesh with the saved axis types (Explicit/Auto/Manual) where known."""
  enum = getattr(jax.sharding, "AxisType", None)
  if enum is not None and isinstance(axis_types, list) and len(axis_types) == len(names):
    try:
      return Mesh(devices, names, axis_types=tuple(enum[t] for t in axis_types))
    except (KeyError, TypeError):
      pass
  return Mesh(devices, names)
