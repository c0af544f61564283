"""Save-time dtype casts: Orbax's `SaveArgs(dtype=...)` and Orbax v1's
storage-options dtype (e.g. float32 master weights stored as bfloat16).

A cast leaf is `x.astype(dtype)` (on the array's own devices and sharding for
a jax.Array), so what is saved is bit-exact to the cast the caller would make;
the checkpoint then records the stored dtype, and a restore casts to its
target's dtype as it does for any leaf.
"""

from __future__ import annotations

import logging
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp

from fastpersist_jax import treepath
from fastpersist_jax.errors import InvalidOptionsError, UnsupportedLeafError

logger = logging.getLogger(__name__)

# dtype_of(path, leaf) -> the dtype to store the leaf as, or None (as it is).
DtypeOf = Callable[[tuple, Any], Any]

# SaveArgs fields that describe TensorStore's chunk layout: they have no
# meaning for this format and are ignored (once logged per field).
_LAYOUT_FIELDS = ("aggregate", "chunk_byte_size", "shard_axes")
_warned_fields: set[str] = set()


def dtypes_from_save_args(tree: Any, save_args: Any) -> DtypeOf | None:
  """The casts `save_args` asks of `tree`: None when it asks none.

  Args:
    tree: the item being saved.
    save_args: a pytree of `ocp.SaveArgs` (or None: no cast) matching `tree`
      leaf for leaf by key path; leaves of `tree` it does not name are saved
      as they are.
  Raises:
    InvalidOptionsError: a save_args entry that is not an `ocp.SaveArgs` or
      None, or that names no leaf of `tree` (both named by key path).
  """
  if save_args is None:
    return None
  flat_args, _ = jax.tree_util.tree_flatten_with_path(
      save_args, is_leaf=lambda x: isinstance(x, ocp.SaveArgs) or treepath.is_empty_node(x))
  leaves = {treepath.key_of(path) for path, _ in treepath.flatten(tree)[0]}
  dtypes: dict[tuple, Any] = {}
  for path, args in flat_args:
    if args is None or treepath.is_empty_node(args):
      continue
    name = treepath.to_str(path)
    if not isinstance(args, ocp.SaveArgs):
      raise InvalidOptionsError(f"save_args{name}: expected ocp.SaveArgs or None, got "
                                f"{type(args).__name__}")
    key = treepath.key_of(path)
    if key not in leaves:
      raise InvalidOptionsError(f"save_args{name} names no leaf of the item being saved")
    for field in _LAYOUT_FIELDS:
      if getattr(args, field, None) and field not in _warned_fields:
        _warned_fields.add(field)
        logger.warning("SaveArgs.%s (save_args%s) is ignored: it sets TensorStore's chunk "
                       "layout, which this format does not have.", field, name)
    if args.dtype is not None:
      dtypes[key] = args.dtype
  if not dtypes:
    return None
  return lambda path, leaf: dtypes.get(treepath.key_of(path))


def cast_for_save(tree: Any, dtype_of: DtypeOf | None) -> Any:
  """`tree` with each leaf `dtype_of` names cast to that dtype (`astype`).

  Raises:
    UnsupportedLeafError: a cast asked of a leaf that is not an array (a
      Python scalar, str, None), of a typed PRNG key array, to a dtype that
      is not one, or of a jax.Array to a dtype JAX would change (float64
      without jax_enable_x64) (named with the leaf's path).
  """
  if dtype_of is None:
    return tree
  flat, treedef = treepath.flatten(tree)
  values = []
  for path, x in flat:
    dtype = dtype_of(path, x)
    if dtype is not None:
      x = _cast(x, dtype, treepath.to_str(path))
    values.append(x)
  return jax.tree_util.tree_unflatten(treedef, values)


def _cast(x: Any, dtype: Any, name: str) -> Any:
  try:
    dtype = np.dtype(dtype)
  except TypeError as e:
    raise UnsupportedLeafError(f"leaf {name}: cannot cast to {dtype!r}: {e}") from e
  if isinstance(x, jax.Array):
    if jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
      raise UnsupportedLeafError(f"leaf {name}: a typed PRNG key array cannot be cast to {dtype}")
    if jax.dtypes.canonicalize_dtype(dtype) != dtype:   # JAX would cast to another dtype
      raise UnsupportedLeafError(f"leaf {name}: JAX holds no {dtype} arrays here (without "
                                 "jax_enable_x64); cast it to a numpy array to store it so")
    return x if x.dtype == dtype else x.astype(dtype)
  if isinstance(x, (np.ndarray, np.generic)):
    return x if x.dtype == dtype else x.astype(dtype)
  raise UnsupportedLeafError(f"leaf {name}: a dtype cast applies to arrays, not to "
                             f"{type(x).__name__}")
