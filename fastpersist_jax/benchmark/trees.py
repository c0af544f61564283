"""The benchmarks' synthetic training state: a pytree of about a given size
made of float32 and bfloat16 jax.Arrays of varied shapes on a 2-D device
mesh ("data" x "model"): most bytes in matrices and 3-D tensors sharded over
both axes, some sharded over one axis (replicated over the other), and small
replicated vectors and scalars. Deterministic in its seed, built shard by
shard (no whole-array temporaries)."""

from __future__ import annotations

import math

# Share of the tree's bytes and of its leaves per kind of leaf.
_KINDS = (  # (kind, share of leaves, share of bytes)
    ("both", 0.60, 0.85),      # sharded over both mesh axes
    ("one", 0.15, 0.14),       # sharded over one axis, replicated over the other
    ("replicated", 0.25, 0.01),
)


def _round_up(x: float, m: int) -> int:
  return max(m, int(math.ceil(x / m)) * m)


def _round_near(x: float, m: int) -> int:
  return max(m, int(round(x / m)) * m)


def tree_spec(size_bytes: int, leaves: int, seed: int, axis_sizes: tuple[int, int]) -> list[dict]:
  """The leaves to build: name, shape, dtype, PartitionSpec (as a list), kind.

  Deterministic in its arguments. Dimensions are rounded so every sharded
  dimension divides by its mesh axis size.
  """
  import numpy as np
  rng = np.random.default_rng(seed)
  data, model = axis_sizes
  counts = [max(1, round(leaves * share)) for _, share, _ in _KINDS]
  counts[0] = max(1, leaves - sum(counts[1:]))
  out = []
  for (kind, _, byte_share), n in zip(_KINDS, counts):
    weights = rng.lognormal(0.0, 0.8, n)
    weights *= size_bytes * byte_share / weights.sum()
    for k in range(n):
      dtype = "bfloat16" if rng.random() < 0.35 else "float32"
      elems = max(1.0, weights[k] / (2 if dtype == "bfloat16" else 4))
      if kind == "both":
        if rng.random() < 0.2:  # attention-like (heads, d_model, head_dim)
          heads = int(rng.choice([8, 16, 32]))
          h = _round_up(heads, data)
          d = _round_up(math.sqrt(elems / h), 8)
          kd = _round_near(elems / h / d, math.lcm(128, model))
          shape, spec = (h, d, kd), ["data", None, "model"]
        else:
          aspect = float(rng.choice([0.25, 0.5, 1.0, 2.0, 4.0]))
          rows = _round_up(math.sqrt(elems * aspect), math.lcm(8, data))
          cols = _round_near(elems / rows, math.lcm(128, model))
          shape, spec = (rows, cols), ["data", "model"]
      elif kind == "one":
        axis = ["data", "model"][k % 2]
        size = data if axis == "data" else model
        aspect = float(rng.choice([0.25, 1.0, 4.0]))
        rows = _round_up(math.sqrt(elems * aspect), math.lcm(8, size))
        cols = _round_near(elems / rows, math.lcm(128, size))
        shape, spec = (rows, cols), ([axis, None] if rng.random() < 0.5 else [None, axis])
      else:
        if k < 2:  # a couple of scalars
          shape, spec = (), []
        else:
          shape, spec = (_round_near(elems, 128),), [None]
      out.append({"name": f"{len(out):04d}_{kind}", "shape": list(shape), "dtype": dtype,
                  "spec": spec, "kind": kind})
  return out


def mesh_axes(devices: int) -> tuple[int, int]:
  """(data, model) sizes: model 2 where the count is even, data the rest."""
  return (devices // 2, 2) if devices % 2 == 0 and devices > 1 else (devices, 1)


def build_tree(spec: list[dict], seed: int):
  """Builds the pytree, shard by shard from numpy (no whole-array temporaries)."""
  import jax
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P
  devices = jax.devices()
  mesh = jax.make_mesh(mesh_axes(len(devices)), ("data", "model"), devices=devices)
  tree = {}
  for leaf_id, leaf in enumerate(spec):
    dtype = jax.numpy.dtype(leaf["dtype"])
    sharding = NamedSharding(mesh, P(*leaf["spec"]))

    def make(index, leaf_id=leaf_id, shape=tuple(leaf["shape"]), dtype=dtype):
      sub = tuple(len(range(*sl.indices(n))) for sl, n in zip(index, shape))
      starts = [sl.indices(n)[0] for sl, n in zip(index, shape)]
      rng = np.random.default_rng([seed, leaf_id, *starts])
      x = rng.random(sub, dtype=np.float32)
      x -= 0.5
      return x.astype(dtype) if x.dtype != dtype else x

    tree[leaf["name"]] = jax.make_array_from_callback(tuple(leaf["shape"]), sharding, make)
  jax.block_until_ready(tree)
  return tree


def tree_bytes(spec: list[dict]) -> int:
  total = 0
  for leaf in spec:
    total += math.prod(leaf["shape"]) * (2 if leaf["dtype"] == "bfloat16" else 4)
  return total
