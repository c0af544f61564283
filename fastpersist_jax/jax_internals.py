"""The one place restore reaches into jax internals for speed, with the public
path as the fallback.

Building a `jax.Array` from host shards through `jax.device_put` costs about
70 us of Python per array (avals, shard_args, handler dispatch; measured on a
2-core VM with jax 0.10, 10,000 arrays of 4 KiB: 0.70-0.82 s). jax's own
`device_put` ends in one C++ call, `xla_client.batched_device_put(aval,
sharding, host_shards, devices, committed)`, which builds the global array
with all its device buffers at once: the same 10,000 arrays take 44 ms of
calls (4.4 us each; 45-65 ms inside a restore, 2026-12-01).
Restore calls that directly when it is there, and otherwise one batched
`jax.device_put` of all shards plus `jax.make_array_from_single_device_arrays`
per leaf (restore._build_batch). A jax upgrade that moves it fails
tests/test_restore_build.py rather than slowing users down unnoticed.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import numpy as np

try:  # pylint: disable=g-import-not-at-top
  from jax._src import core as _core
  from jax._src.lib import xla_client as _xc
  _BATCHED_DEVICE_PUT = getattr(_xc, "batched_device_put", None)
  _SHAPED_ARRAY = getattr(_core, "ShapedArray", None)
except ImportError:  # a jax without these modules: the public path
  _BATCHED_DEVICE_PUT = _SHAPED_ARRAY = None


def fast_build_available() -> bool:
  """Whether `array_from_host_shards` uses jax's one-call C++ builder."""
  return _BATCHED_DEVICE_PUT is not None and _SHAPED_ARRAY is not None


def array_from_host_shards(shape: tuple[int, ...], dtype: np.dtype,
                           sharding: jax.sharding.Sharding, devices: Sequence[Any],
                           host_shards: Sequence[np.ndarray]) -> jax.Array:
  """A committed jax.Array of `shape` and `dtype` with `sharding`, whose shard
  on `devices[i]` holds `host_shards[i]` (each of that device's shard shape;
  devices in the order of `sharding.addressable_devices_indices_map(shape)`,
  this process's devices only), in the sharding's memory kind: what
  `jax.device_put(host_array, sharding)` builds, in one call.

  Host shards may be aliased by the array on CPU (no copy): they must not be
  reused. Only when `fast_build_available()`; raises what jax.device_put
  raises for the same input (e.g. a dtype the backend cannot hold).
  """
  return _BATCHED_DEVICE_PUT(_aval(tuple(shape), np.dtype(dtype)), sharding, list(host_shards),
                             list(devices), True)


@functools.lru_cache(maxsize=4096)
def _aval(shape: tuple[int, ...], dtype: np.dtype) -> Any:
  """The (immutable) abstract value of a shape and dtype: many leaves share
  one, and building it costs more than the transfer of a small leaf."""
  return _SHAPED_ARRAY(shape, dtype)
