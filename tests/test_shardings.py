"""Unit tests of fastpersist_jax/shardings.py: sharding records and their
rebuilding, plus the validation of saved records (disk_format).

Eight CPU devices (tests/conftest.py sets XLA_FLAGS). To extend: add a
sharding to SHARDINGS with the exact record it must give, or a mutation of a
record to MALFORMED with the exact error it must raise.
"""

from __future__ import annotations

import json
import sys

import helpers  # first: sets XLA_FLAGS (8 CPU devices) before jax is imported
import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P, SingleDeviceSharding

from fastpersist_jax import disk_format, restore_plan, shardings
from fastpersist_jax.errors import CorruptCheckpointError, FastPersistError

ALL_IDS = [0, 1, 2, 3, 4, 5, 6, 7]


def _mesh_4x2():
  return helpers.mesh_4x2()   # Explicit axes (jax.make_mesh's default)


def _mesh_2x4_reversed_auto():
  """Devices 7..0 in mesh order, Auto axes: device_ids must keep that order."""
  return Mesh(np.asarray(jax.devices()[::-1]).reshape(2, 4), ("a", "b"),
              axis_types=(AxisType.Auto, AxisType.Auto))


def _mesh_8_permuted():
  devices = jax.devices()
  return Mesh(np.asarray([devices[i] for i in (3, 1, 4, 0, 5, 2, 7, 6)]), ("x",),
              axis_types=(AxisType.Explicit,))


def _named(mesh, kinds, spec, memory_kind="device", ids=ALL_IDS):
  return {"type": "named", "mesh_shape": list(mesh), "axis_names": list(kinds[0]), "spec": spec,
          "axis_types": list(kinds[1]), "memory_kind": memory_kind, "device_ids": ids}


DATA_MODEL = (("data", "model"), ("Explicit", "Explicit"))

# name: (sharding factory, its exact record)
SHARDINGS = {
    "4x2 P(data, None)": (
        lambda: NamedSharding(_mesh_4x2(), P("data", None)),
        _named([4, 2], DATA_MODEL, ["data", None])),
    "4x2 P(None, model)": (
        lambda: NamedSharding(_mesh_4x2(), P(None, "model")),
        _named([4, 2], DATA_MODEL, [None, "model"])),
    "4x2 P() replicated": (
        lambda: NamedSharding(_mesh_4x2(), P()),
        _named([4, 2], DATA_MODEL, [])),
    "4x2 P((data, model)) tuple axes": (
        lambda: NamedSharding(_mesh_4x2(), P(("data", "model"))),
        _named([4, 2], DATA_MODEL, [["data", "model"]])),
    "4x2 P((model, data), None) tuple axes, other order": (
        lambda: NamedSharding(_mesh_4x2(), P(("model", "data"), None)),
        _named([4, 2], DATA_MODEL, [["model", "data"], None])),
    "4x2 P(model, data)": (
        lambda: NamedSharding(_mesh_4x2(), P("model", "data")),
        _named([4, 2], DATA_MODEL, ["model", "data"])),
    "4x2 P(data) pinned_host": (
        lambda: NamedSharding(_mesh_4x2(), P("data"), memory_kind="pinned_host"),
        _named([4, 2], DATA_MODEL, ["data"], memory_kind="pinned_host")),
    "2x4 devices 7..0, Auto axes": (
        lambda: NamedSharding(_mesh_2x4_reversed_auto(), P(None, "b")),
        _named([2, 4], (("a", "b"), ("Auto", "Auto")), [None, "b"], ids=[7, 6, 5, 4, 3, 2, 1, 0])),
    "8 devices permuted": (
        lambda: NamedSharding(_mesh_8_permuted(), P("x")),
        _named([8], (("x",), ("Explicit",)), ["x"], ids=[3, 1, 4, 0, 5, 2, 7, 6])),
    "single device 3": (
        lambda: SingleDeviceSharding(jax.devices()[3]),
        {"type": "single", "memory_kind": "device", "device_ids": [3]}),
    "single device 5 unpinned_host": (
        lambda: SingleDeviceSharding(jax.devices()[5], memory_kind="unpinned_host"),
        {"type": "single", "memory_kind": "unpinned_host", "device_ids": [5]}),
}


@pytest.mark.parametrize("make,record", SHARDINGS.values(), ids=SHARDINGS.keys())
def test_encode_writes_the_exact_record(make, record):
  assert shardings.encode(make()) == record


@pytest.mark.parametrize("make,record", SHARDINGS.values(), ids=SHARDINGS.keys())
def test_decode_of_the_record_as_json_rebuilds_the_same_sharding(make, record):
  original = make()
  rebuilt, why = shardings.decode(json.loads(json.dumps(shardings.encode(original))))
  assert why == ""
  assert rebuilt == original
  assert type(rebuilt) is type(original)
  assert rebuilt.memory_kind == original.memory_kind
  if isinstance(original, NamedSharding):
    assert [d.id for d in rebuilt.mesh.devices.flat] == record["device_ids"]
    assert rebuilt.mesh.axis_types == original.mesh.axis_types
    assert rebuilt.spec == original.spec


def test_a_mesh_with_non_string_axis_names_is_recorded_but_not_rebuilt():
  mesh = Mesh(np.asarray(jax.devices()).reshape(4, 2), (0, 1))
  record = shardings.encode(NamedSharding(mesh, P()))
  assert record["type"] == "other"
  assert record["repr"].startswith("NamedSharding(mesh=Mesh('0': 4, '1': 2")
  assert shardings.decode(record) == (None, "sharding type 'other' cannot be rebuilt")


def test_an_other_records_repr_is_cut_at_500_characters():
  class Long:   # encode only needs a repr of what it cannot record
    def __repr__(self):
      return "L" * 2000
  assert shardings.encode(Long()) == {"type": "other", "repr": "L" * 500}


# Rebuilding elsewhere: fallbacks and reasons ---------------------------------------


def test_without_device_ids_a_mesh_is_built_over_jax_devices_in_order():
  # Format version 1 recorded no device ids.
  record = shardings.encode(NamedSharding(_mesh_2x4_reversed_auto(), P("a")))
  del record["device_ids"]
  rebuilt, why = shardings.decode(record)
  assert why == ""
  assert [d.id for d in rebuilt.mesh.devices.flat] == ALL_IDS
  assert rebuilt.mesh.shape_tuple == (("a", 2), ("b", 4))
  assert rebuilt.spec == P("a")


def test_saved_devices_absent_here_fall_back_to_jax_devices():
  record = _named([4, 2], DATA_MODEL, ["data", None], ids=list(range(100, 108)))
  rebuilt, why = shardings.decode(record)
  assert why == ""
  assert rebuilt == NamedSharding(_mesh_4x2(), P("data", None))


def test_a_mesh_of_another_size_is_not_rebuilt_and_says_why():
  record = _named([4, 4], DATA_MODEL, ["data"], ids=list(range(16)))
  assert shardings.decode(record) == (
      None, "it was saved on a mesh of 16 devices {'data': 4, 'model': 4}, and 8 devices are present")


def test_a_single_device_absent_here_becomes_the_first_device():
  rebuilt, why = shardings.decode({"type": "single", "memory_kind": "device", "device_ids": [99]})
  assert (rebuilt, why) == (SingleDeviceSharding(jax.devices()[0]), "")


def test_a_memory_kind_the_device_lacks_is_dropped():
  rebuilt, why = shardings.decode(_named([4, 2], DATA_MODEL, ["data"], memory_kind="hbm_far"))
  assert why == ""
  assert rebuilt.memory_kind == "device"
  rebuilt, _ = shardings.decode({"type": "single", "memory_kind": "hbm_far", "device_ids": [2]})
  assert rebuilt == SingleDeviceSharding(jax.devices()[2])


def test_unknown_axis_types_give_the_default_mesh():
  record = _named([4, 2], DATA_MODEL, ["data"])
  for axis_types in ([], ["Explicit"], None):
    rebuilt, _ = shardings.decode({**record, "axis_types": axis_types})
    assert rebuilt.mesh.axis_types == (AxisType.Auto, AxisType.Auto)


@pytest.mark.parametrize("record,why", [
    (None, "no sharding was recorded"),
    ({}, "no sharding was recorded"),
    ({"type": "other", "repr": "x"}, "sharding type 'other' cannot be rebuilt"),
    ({"type": "grid"}, "sharding type 'grid' cannot be rebuilt"),
    ({"type": "named", "mesh_shape": [8], "axis_names": ["x"]},
     "malformed sharding record ('spec')"),
    ({"type": "named", "mesh_shape": "ab", "axis_names": ["x"], "spec": []},
     "malformed sharding record (invalid literal for int() with base 10: 'a')"),
])
def test_records_that_cannot_be_rebuilt_say_why(record, why):
  assert shardings.decode(record) == (None, why)


def test_a_spec_naming_no_mesh_axis_is_not_rebuilt():
  sharding, why = shardings.decode(_named([8], (("x",), ("Explicit",)), ["y"]))
  assert sharding is None
  assert why.startswith("cannot rebuild sharding P('y',) (")


# Validation of saved records (disk_format.decode_metadata) ------------------------


def _metadata_bytes(sharding: dict | None, kind: str = "array", shape=(8, 4),
                    prng_impl: str | None = None) -> bytes:
  """A sealed fastpersist.json of leaf 0 (a scalar) and leaf 1, ['w'] (float32
  or, with prng_impl, uint32 key data of `shape`) with `sharding`."""
  leaves = [disk_format.LeafMeta([["d", "step"]], "scalar", value=3, scalar_type="int"),
            disk_format.LeafMeta([["d", "w"]], kind, dtype="uint32" if prng_impl else "float32",
                                 shape=shape, sharding=sharding, prng_impl=prng_impl)]
  return disk_format.encode_metadata(disk_format.CheckpointMetadata(1, leaves))


@pytest.mark.parametrize("make,record", SHARDINGS.values(), ids=SHARDINGS.keys())
def test_every_encoded_sharding_is_accepted_as_saved(make, record):
  meta = disk_format.decode_metadata_bytes(_metadata_bytes(shardings.encode(make())), "meta")
  assert meta.leaves[1].sharding == record


GOOD = _named([4, 2], DATA_MODEL, ["data", "model"])

# name: (record, exact error after "meta: metadata leaf 1: ")
MALFORMED = {
    "not a dict": (["named"], "malformed sharding ['named']"),
    "memory_kind not a string": ({**GOOD, "memory_kind": 3}, "malformed sharding memory_kind 3"),
    "device_ids not a list": ({**GOOD, "device_ids": 5}, "malformed sharding device_ids 5"),
    "device_ids repeated": ({**GOOD, "device_ids": [0, 1, 2, 3, 4, 5, 6, 6]},
                            "malformed sharding device_ids [0, 1, 2, 3, 4, 5, ...]"),
    "device_id negative": ({**GOOD, "device_ids": [-1, 1, 2, 3, 4, 5, 6, 7]},
                           "malformed sharding device_ids [-1, 1, 2, 3, 4, 5, ...]"),
    "device_id a bool": ({"type": "single", "device_ids": [True]},
                         "malformed sharding device_ids [True]"),
    "device_id a list": ({"type": "single", "device_ids": [[1]]},
                         "malformed sharding device_ids [[1]]"),
    "device_ids not filling the mesh": ({**GOOD, "device_ids": [0, 1, 2, 3]},
                                        "sharding device_ids [0, 1, 2, 3] do not fill mesh_shape [4, 2]"),
    "single with two devices": ({"type": "single", "device_ids": [0, 1]},
                                "a single-device sharding names 2 devices"),
    "mesh_shape not a list": ({**GOOD, "mesh_shape": "4x2"}, "malformed sharding mesh_shape '4x2'"),
    "mesh_shape zero": ({**GOOD, "mesh_shape": [0, 2]}, "malformed sharding mesh_shape [0, 2]"),
    "mesh_shape negative": ({**GOOD, "mesh_shape": [-4, -2]},
                            "malformed sharding mesh_shape [-4, -2]"),
    "axis_names too few": ({**GOOD, "axis_names": ["data"]},
                           "sharding axis_names ['data'] do not match mesh_shape [4, 2]"),
    "axis_names repeated": ({**GOOD, "axis_names": ["data", "data"]},
                            "sharding axis_names ['data', 'data'] do not match mesh_shape [4, 2]"),
    "axis_names not strings": ({**GOOD, "axis_names": [0, 1]},
                               "sharding axis_names [0, 1] do not match mesh_shape [4, 2]"),
    "axis_types unknown": ({**GOOD, "axis_types": ["Explicit", "Magic"]},
                           "malformed sharding axis_types ['Explicit', 'Magic']"),
    "axis_types too few": ({**GOOD, "axis_types": ["Explicit"]},
                           "malformed sharding axis_types ['Explicit']"),
    "spec longer than the rank": ({**GOOD, "spec": ["data", "model", None]},
                                  "sharding spec ['data', 'model', None] does not fit an array of "
                                  "rank 2"),
    "spec not a list": ({**GOOD, "spec": "data"},
                        "sharding spec 'data' does not fit an array of rank 2"),
    "spec naming no mesh axis": ({**GOOD, "spec": ["rows"]},
                                 "sharding spec entry 'rows' names no mesh axis"),
    "spec entry a number": ({**GOOD, "spec": [0]}, "sharding spec entry 0 names no mesh axis"),
    "spec using an axis twice": ({**GOOD, "spec": ["data", "data"]},
                                 "sharding spec ['data', 'data'] uses a mesh axis twice"),
    "spec tuple repeating an axis": ({**GOOD, "spec": [["data", "data"]]},
                                     "sharding spec [['data', 'data']] uses a mesh axis twice"),
    "uneven split": ({**GOOD, "mesh_shape": [3, 2], "device_ids": [0, 1, 2, 3, 4, 5]},
                     "dimension 0 of size 8 cannot be split 3 ways"),
    "uneven split over tuple axes": ({**GOOD, "spec": [None, ["data", "model"]]},
                                     "dimension 1 of size 4 cannot be split 8 ways"),
}


@pytest.mark.parametrize("record,message", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_records_are_refused_naming_the_leaf(record, message):
  with pytest.raises(CorruptCheckpointError) as e:
    disk_format.decode_metadata_bytes(_metadata_bytes(record), "meta")
  assert str(e.value) == f"meta: metadata leaf 1: {message}"


def test_a_key_arrays_sharding_is_checked_against_the_key_shape():
  # Keys of shape (8,) are saved as key data (8, 2): the spec covers the keys.
  ok = _metadata_bytes(_named([4, 2], DATA_MODEL, ["data"]), shape=(8, 2), prng_impl="threefry2x32")
  assert disk_format.decode_metadata_bytes(ok, "meta").leaves[1].prng_impl == "threefry2x32"
  too_long = _metadata_bytes(_named([4, 2], DATA_MODEL, ["data", None]), shape=(8, 2),
                             prng_impl="threefry2x32")
  with pytest.raises(CorruptCheckpointError, match=r"^meta: metadata leaf 1: sharding spec \['data', "
                     r"None\] does not fit an array of rank 1$"):
    disk_format.decode_metadata_bytes(too_long, "meta")


@pytest.mark.parametrize("record", [
    {"type": "single", "device_ids": [[1]]},
    {"type": "named", "mesh_shape": [8], "axis_names": ["x", "y"], "spec": []},
    {"type": "named", "mesh_shape": [8], "axis_names": ["x"], "spec": [], "device_ids": 5},
], ids=["unhashable device id", "names not matching the mesh", "device_ids not a list"])
def test_a_numpy_leafs_sharding_record_never_crashes_a_restore(record):
  target = jax.ShapeDtypeStruct((8, 4), np.float32,
                                sharding=NamedSharding(_mesh_4x2().abstract_mesh, P("data")))
  try:
    meta = disk_format.decode_metadata_bytes(_metadata_bytes(record, kind="numpy"), "meta")
    job = restore_plan.target_layout(1, meta.leaves[1], target, [])
  except FastPersistError:
    return   # refused as corrupt: fine
  assert [d.id for d, _ in job.device_indices] == ALL_IDS   # or rebuilt as the target says


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
