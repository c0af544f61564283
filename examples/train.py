r"""Trains a small sharded transformer and checkpoints it every step.

A decoder-only transformer written with jax.numpy (token + position
embeddings, pre-layernorm blocks of causal multi-head attention and a GELU
MLP, untied output projection) learns next-token prediction on a fixed,
seed-determined dataset drawn from a sparse random Markov chain (4 likely
successors per token), so the loss falls from about log(vocab) within a few
hundred steps (below the chain's entropy of ~1.2 nats once the model starts
to memorise the small dataset).

Parameters and AdamW state are sharded over every device on a
("data", "model") mesh: the batch over "data", weight matrices over "model",
layernorm scales and biases replicated. The jitted train step donates the
state, so a checkpoint must be snapshotted before the next step reuses the
buffers; FastPersistHandler copies to host memory inside `mngr.save` and
writes in the background while training continues.

    XLA_FLAGS=--xla_force_host_platform_device_count=8 \
      python examples/train.py                         # FastPersistHandler
    XLA_FLAGS=... python examples/train.py --handler=orbax  # Orbax's StandardCheckpointHandler
    XLA_FLAGS=... python examples/train.py --handler=none   # a handler that writes nothing
    XLA_FLAGS=... python examples/train.py --steps=300 --resume   # continue the latest checkpoint

The batch of step s depends only on (seed, s), so a run that is stopped and
resumed produces bit-identical losses to an uninterrupted one.

Step accounting: `state["step"]` is the number of updates applied; the update
that turns step s-1 into step s is "step s", and the checkpoint taken after it
is saved under step s.

Timing: after --warmup_steps (not timed, not saved), steps alternate in
blocks of --block_steps under three conditions, cycling in this order:
"no_save" (no checkpoint), "save" (a checkpoint every --checkpoint_every
steps through --handler) and, with --floor, "floor" (a checkpoint through a
handler that writes nothing, in a scratch directory: Orbax's own bookkeeping,
the least any handler can cost). Interleaving puts every condition under the
same drift of a busy machine. The last step is always saved. A step's time
covers its batch, the train step, fetching the loss and the `mngr.save` call,
so it includes both the blocking part of the save and whatever the background
writes take away from training; the last save of a block finishes before the
next block starts, outside the timed steps. The summary gives, per
condition, the median step time with its interquartile range and min-max,
each condition's overhead over "no_save" (medians), and the handler's cost
above the floor in points of step time, (median save - median floor) /
median no_save, also per cycle of blocks (its min-max is the spread).
Blocking ms is the time inside `mngr.save` (Orbax's own bookkeeping, waiting
for the previous save if it is still running, and the handler's host
snapshot); background GB/s is bytes / write_s of each completed FastPersist
save.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any, Callable, NamedTuple

from absl import app, flags, logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp

from fastpersist_jax import (FastPersistHandler, FastPersistOptions, FastPersistRestore,
                             FastPersistSave, durable_manager_options)

MiB = 1 << 20

_STEPS = flags.DEFINE_integer("steps", 250, "train until the state has this many steps")
_CKPT_DIR = flags.DEFINE_string("ckpt_dir", "/tmp/fastpersist_example", "checkpoint directory")
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 1, "save every this many steps (and always the last step); 0: never save")
_MAX_TO_KEEP = flags.DEFINE_integer("max_to_keep", 2, "checkpoints the manager keeps")
_HANDLER = flags.DEFINE_enum("handler", "fastpersist", ["fastpersist", "orbax", "none"],
                             "fastpersist: FastPersistHandler; orbax: ocp.StandardCheckpointHandler; "
                             "none: a handler that writes nothing (cannot --resume)")
_SNAPSHOT = flags.DEFINE_enum("snapshot", "auto", ["auto", "copy", "reference"],
                              "FastPersistOptions.snapshot: what a save blocks for (\"reference\" "
                              "fails here, by design: the train step donates the state)")
_BACKGROUND_NICE = flags.DEFINE_integer(
    "background_nice", FastPersistOptions.background_nice,
    "FastPersistOptions.background_nice: priority drop of the background write threads")
_TRAIN_CPUS = flags.DEFINE_list(
    "train_cpus", None, "CPUs the training process runs on (pinned before JAX starts, so XLA's "
    "threads inherit it), e.g. 0; with --checkpoint_cpus, mimics an accelerator host whose "
    "step does not compete with the checkpoint threads for the CPU")
_CHECKPOINT_CPUS = flags.DEFINE_list(
    "checkpoint_cpus", None, "FastPersistOptions.background_cpus: CPUs of the background "
    "checkpoint threads, e.g. 1")
_RESUME = flags.DEFINE_bool("resume", False, "restore the latest checkpoint in --ckpt_dir and continue")
_OVERWRITE = flags.DEFINE_bool("overwrite", False,
                               "without --resume: delete the checkpoints already in --ckpt_dir")
_WARMUP_STEPS = flags.DEFINE_integer(
    "warmup_steps", 3, "steps at the start of the run that are neither checkpointed nor timed "
    "(the first steps after compiling are slow)")
_BLOCK_STEPS = flags.DEFINE_integer(
    "block_steps", 10, "after the warm-up, steps alternate in blocks of this many: without "
    "saving, saving through --handler, and (with --floor) saving through a handler that writes "
    "nothing")
_FLOOR = flags.DEFINE_bool(
    "floor", True, "time blocks that save through a handler that writes nothing (Orbax's own "
    "bookkeeping, in a scratch directory) as well; ignored with --handler=none")
_D_MODEL = flags.DEFINE_integer("d_model", 256, "model width")
_LAYERS = flags.DEFINE_integer("layers", 2, "transformer blocks")
_HEADS = flags.DEFINE_integer("heads", 4, "attention heads")
_MLP_MULT = flags.DEFINE_integer("mlp_mult", 4, "MLP hidden width / d_model")
_VOCAB = flags.DEFINE_integer("vocab", 2048, "vocabulary size")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 64, "sequence length")
_BATCH = flags.DEFINE_integer("batch", 16, "global batch size (sequences)")
_DATASET = flags.DEFINE_integer("dataset", 1024, "sequences in the fixed synthetic dataset")
_MODEL_AXIS = flags.DEFINE_integer(
    "model_axis", 2, "size of the mesh's 'model' axis; 'data' gets the remaining devices")
_LR = flags.DEFINE_float("lr", 3e-3, "peak AdamW learning rate")
_LR_WARMUP = flags.DEFINE_integer("lr_warmup", 20, "steps of linear learning-rate warm-up")
_LR_DECAY = flags.DEFINE_integer(
    "lr_decay", 1000, "the learning rate then decays along a cosine to lr/10 at this step (fixed, "
    "not tied to --steps, so a run stopped early and resumed follows the same schedule)")
_SEED = flags.DEFINE_integer("seed", 0, "seed of the parameters and the data")
_LOG_EVERY = flags.DEFINE_integer("log_every", 1, "print one line every this many steps")
_METRICS_OUT = flags.DEFINE_string("metrics_out", None, "write losses and the summary to this JSON file")


class Config(NamedTuple):
  d_model: int
  layers: int
  heads: int
  mlp: int
  vocab: int
  seq_len: int


# Model ----------------------------------------------------------------------------------------


def param_specs(cfg: Config) -> dict:
  """PartitionSpecs of the parameters: matrices split over "model"."""
  layer = {
      "ln1": {"scale": P(), "bias": P()},
      "wq": P(None, "model"), "wk": P(None, "model"), "wv": P(None, "model"),
      "wo": P("model", None),
      "ln2": {"scale": P(), "bias": P()},
      "w1": P(None, "model"), "b1": P("model"),
      "w2": P("model", None), "b2": P(),
  }
  return {
      "embed": P(None, "model"),
      "pos": P(),
      "layers": [layer] * cfg.layers,
      "ln_f": {"scale": P(), "bias": P()},
      "unembed": P(None, "model"),
  }


def init_params(key: jax.Array, cfg: Config) -> dict:
  d, f = cfg.d_model, cfg.mlp
  keys = iter(jax.random.split(key, 3 + 6 * cfg.layers))

  def dense(shape, fan_in):
    return jax.random.normal(next(keys), shape, jnp.float32) / math.sqrt(fan_in)

  def ln():
    return {"scale": jnp.ones((d,), jnp.float32), "bias": jnp.zeros((d,), jnp.float32)}

  layers = []
  for _ in range(cfg.layers):
    layers.append({
        "ln1": ln(),
        "wq": dense((d, d), d), "wk": dense((d, d), d), "wv": dense((d, d), d),
        "wo": dense((d, d), d) / math.sqrt(2 * cfg.layers),
        "ln2": ln(),
        "w1": dense((d, f), d), "b1": jnp.zeros((f,), jnp.float32),
        "w2": dense((f, d), f) / math.sqrt(2 * cfg.layers), "b2": jnp.zeros((d,), jnp.float32),
    })
  return {
      "embed": jax.random.normal(next(keys), (cfg.vocab, d), jnp.float32) * 0.02,
      "pos": jax.random.normal(next(keys), (cfg.seq_len, d), jnp.float32) * 0.02,
      "layers": layers,
      "ln_f": ln(),
      "unembed": dense((d, cfg.vocab), d),
  }


def layer_norm(x, p, eps=1e-5):
  mean = x.mean(-1, keepdims=True)
  var = jnp.square(x - mean).mean(-1, keepdims=True)
  return (x - mean) * jax.lax.rsqrt(var + eps) * p["scale"] + p["bias"]


def attention(x, p, heads):
  b, t, d = x.shape
  dh = d // heads
  split = lambda y: y.reshape(b, t, heads, dh)
  q, k, v = split(x @ p["wq"]), split(x @ p["wk"]), split(x @ p["wv"])
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / math.sqrt(dh)
  causal = jnp.tril(jnp.ones((t, t), jnp.bool_))
  logits = jnp.where(causal, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, t, d)
  return out @ p["wo"]


def mlp(x, p):
  return jax.nn.gelu(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]


def forward(params, tokens, cfg: Config, act_sharding):
  x = params["embed"][tokens] + params["pos"][: tokens.shape[1]]
  x = jax.lax.with_sharding_constraint(x, act_sharding)
  for p in params["layers"]:
    x = x + attention(layer_norm(x, p["ln1"]), p, cfg.heads)
    x = x + mlp(layer_norm(x, p["ln2"]), p)
    x = jax.lax.with_sharding_constraint(x, act_sharding)
  return layer_norm(x, params["ln_f"]) @ params["unembed"]


def loss_fn(params, inputs, targets, cfg, act_sharding):
  logits = forward(params, inputs, cfg, act_sharding)
  return optax.softmax_cross_entropy_with_integer_labels(logits, targets).mean()


# Data -----------------------------------------------------------------------------------------


def make_dataset(seed: int, n: int, seq_len: int, vocab: int) -> np.ndarray:
  """`n` sequences of seq_len + 1 tokens from a random Markov chain in which
  every token has 4 likely successors (entropy ~1.2 nats vs log(vocab))."""
  rng = np.random.default_rng([seed, 0])
  successors = rng.integers(0, vocab, size=(vocab, 4))
  probs = np.array([0.5, 0.25, 0.15, 0.1])
  data = np.empty((n, seq_len + 1), np.int32)
  data[:, 0] = rng.integers(0, vocab, size=n)
  for t in range(1, seq_len + 1):
    choice = rng.choice(4, size=n, p=probs)
    data[:, t] = successors[data[:, t - 1], choice]
  return data


def batch_for_step(dataset: np.ndarray, seed: int, step: int, batch: int) -> np.ndarray:
  """The batch of step `step`: a function of (seed, step) only."""
  idx = np.random.default_rng([seed, 1, step]).integers(0, dataset.shape[0], size=batch)
  return dataset[idx]


# Checkpointing --------------------------------------------------------------------------------


class NothingHandler(ocp.AsyncCheckpointHandler):
  """A handler that writes nothing: what remains of a save is Orbax's own
  bookkeeping (step directory, commit, manager metadata), the floor under any
  handler's cost."""

  def save(self, directory, *args, **kwargs) -> None:
    del directory, args, kwargs

  async def async_save(self, directory, *args, **kwargs) -> list:
    del directory, args, kwargs
    return []

  def restore(self, directory, *args, **kwargs):
    raise NotImplementedError(f"--handler=none wrote nothing to restore in {directory}")

  def metadata(self, directory) -> None:
    del directory

  def finalize(self, directory) -> None:
    del directory


@ocp.args.register_with_handler(NothingHandler, for_save=True)
@dataclasses.dataclass
class NothingSave(ocp.args.CheckpointArgs):
  """Save args of NothingHandler."""


@ocp.args.register_with_handler(NothingHandler, for_restore=True)
@dataclasses.dataclass
class NothingRestore(ocp.args.CheckpointArgs):
  """Restore args of NothingHandler (Orbax wants both registered; restoring fails)."""


def make_manager(handler_kind: str, directory: str):
  """A CheckpointManager at `directory` saving through `handler_kind`
  ("fastpersist", "orbax" or "none"); returns (manager, handler)."""
  # Durable: a step wait_until_finished() reported survives a power cut (the
  # committed step is synced after Orbax renames it). The same for every
  # handler kind, so that their per-step figures compare.
  options = durable_manager_options(max_to_keep=_MAX_TO_KEEP.value,
                                    enable_async_checkpointing=True)
  if handler_kind == "fastpersist":
    cpus = tuple(int(c) for c in _CHECKPOINT_CPUS.value) if _CHECKPOINT_CPUS.value else None
    handler = FastPersistHandler(FastPersistOptions(snapshot=_SNAPSHOT.value,
                                                    background_nice=_BACKGROUND_NICE.value,
                                                    background_cpus=cpus))
  elif handler_kind == "orbax":
    handler = ocp.StandardCheckpointHandler()
  else:
    handler = NothingHandler()
  mngr = ocp.CheckpointManager(os.path.abspath(directory), item_handlers=handler, options=options)
  return mngr, handler


def save_args(handler_kind: str, state):
  if handler_kind == "fastpersist":
    return FastPersistSave(state)
  if handler_kind == "orbax":
    return ocp.args.StandardSave(state)
  return NothingSave()


def restore_args(handler_kind: str, abstract):
  if handler_kind == "fastpersist":
    return FastPersistRestore(abstract)
  return ocp.args.StandardRestore(abstract)


def dir_bytes(path: str) -> int:
  total = 0
  for root, _, files in os.walk(path):
    for name in files:
      try:
        total += os.path.getsize(os.path.join(root, name))
      except OSError:
        pass
  return total


# Set-up ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Setup:
  """What the training loop needs: model, mesh, shardings and the jitted step."""
  cfg: Config
  n_dev: int
  data_axis: int
  model_axis: int
  batch_sharding: NamedSharding
  shardings: dict
  abstract_state: dict      # restore target: ShapeDtypeStructs, "step": 0
  init_state: Callable      # key -> {"params", "opt_state"}
  train_step: Any           # jitted (state, tokens) -> (state, loss), donating the state
  dataset: np.ndarray


def set_up() -> Setup:
  """Builds the mesh, the model's shardings, the optimizer and the jitted
  steps from the flags. Raises app.UsageError for inconsistent flags."""
  cfg = Config(_D_MODEL.value, _LAYERS.value, _HEADS.value, _MLP_MULT.value * _D_MODEL.value,
               _VOCAB.value, _SEQ_LEN.value)
  if cfg.d_model % cfg.heads:
    raise app.UsageError("--d_model must be a multiple of --heads")
  if _RESUME.value and _HANDLER.value == "none":
    raise app.UsageError("--handler=none writes nothing: there is nothing to --resume")
  n_dev = jax.device_count()
  model_axis = math.gcd(_MODEL_AXIS.value, n_dev)
  data_axis = n_dev // model_axis
  if _BATCH.value % data_axis:
    raise app.UsageError(f"--batch must be a multiple of the data axis ({data_axis})")
  mesh = jax.make_mesh((data_axis, model_axis), ("data", "model"),
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)
  replicated = NamedSharding(mesh, P())
  batch_sharding = NamedSharding(mesh, P("data", None))
  act_sharding = NamedSharding(mesh, P("data", None, None))

  schedule = optax.warmup_cosine_decay_schedule(
      0.0, _LR.value, warmup_steps=_LR_WARMUP.value,
      decay_steps=max(_LR_DECAY.value, _LR_WARMUP.value + 1), end_value=_LR.value / 10)
  tx = optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=0.01)

  param_sharding = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(cfg),
                                is_leaf=lambda x: isinstance(x, P))
  abstract_params = jax.eval_shape(functools.partial(init_params, cfg=cfg), jax.random.key(0))
  abstract_opt = jax.eval_shape(tx.init, abstract_params)
  opt_sharding = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, param_sharding,
                                       transform_non_params=lambda _: replicated)
  shardings = {"params": param_sharding, "opt_state": opt_sharding}

  @functools.partial(jax.jit, out_shardings=shardings)
  def init_state(key):
    params = init_params(key, cfg)
    return {"params": params, "opt_state": tx.init(params)}

  @functools.partial(jax.jit, in_shardings=(shardings, batch_sharding),
                     out_shardings=(shardings, replicated), donate_argnums=(0,))
  def train_step(state, tokens):
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    loss, grads = jax.value_and_grad(loss_fn)(state["params"], inputs, targets, cfg, act_sharding)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    return {"params": optax.apply_updates(state["params"], updates), "opt_state": opt_state}, loss

  # State: {"params", "opt_state"} of jax.Arrays plus "step", a Python int.
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                {"params": abstract_params, "opt_state": abstract_opt}, shardings)
  abstract_state["step"] = 0
  dataset = make_dataset(_SEED.value, _DATASET.value, cfg.seq_len, cfg.vocab)
  return Setup(cfg, n_dev, data_axis, model_axis, batch_sharding, shardings, abstract_state,
               init_state, train_step, dataset)


# Resume ---------------------------------------------------------------------------------------


def resume_or_start(setup: Setup, mngr, handler_kind: str) -> tuple[dict, int, float]:
  """The state to train from: the latest checkpoint with --resume (if any),
  else a fresh one (deleting old checkpoints with --overwrite). Returns
  (arrays, step, restore seconds). Raises SystemExit when --ckpt_dir holds
  checkpoints and neither --resume nor --overwrite says what to do."""
  latest = mngr.latest_step() if _RESUME.value else None
  if _RESUME.value and latest is None:
    print(f"--resume: no checkpoint in {_CKPT_DIR.value}; starting from scratch", flush=True)
  if latest is not None:
    t0 = time.perf_counter()
    restored = mngr.restore(latest, args=restore_args(handler_kind, setup.abstract_state))
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - t0
    step = int(restored["step"])
    print(f"restored step {step} from {mngr.directory} in {restore_s * 1e3:.0f} ms", flush=True)
    return {"params": restored["params"], "opt_state": restored["opt_state"]}, step, restore_s
  if not _RESUME.value and mngr.all_steps():
    if not _OVERWRITE.value:
      existing = mngr.all_steps()
      mngr.close()
      raise SystemExit(f"{_CKPT_DIR.value} already holds checkpoints {existing}; "
                       "pass --resume to continue, --overwrite to start afresh, or another "
                       "--ckpt_dir")
    for s in mngr.all_steps():
      mngr.delete(s)
  return setup.init_state(jax.random.key(_SEED.value)), 0, 0.0


# Training loop --------------------------------------------------------------------------------

CONDITIONS = ("no_save", "save", "floor")


@dataclasses.dataclass
class Timings:
  """What the loop measured. Step times are in ms, per condition; `blocks`
  holds (condition, cycle, [step ms]) per block of --block_steps."""
  step_ms: dict = dataclasses.field(default_factory=lambda: {c: [] for c in CONDITIONS})
  blocks: list = dataclasses.field(default_factory=list)
  block_ms: list = dataclasses.field(default_factory=list)    # time inside mngr.save
  gbps: list = dataclasses.field(default_factory=list)        # background write rate per save
  handler_ms: list = dataclasses.field(default_factory=list)  # FastPersist's async_save part
  snap_ms: list = dataclasses.field(default_factory=list)     # FastPersist's host snapshot
  cpu_ms: list = dataclasses.field(default_factory=list)      # CPU of FastPersist's threads
  stats: dict | None = None                                   # the latest save stats seen

  def poll(self, handler) -> float | None:
    """Takes in the handler's latest save stats (FastPersist only); returns
    the latest background GB/s, or None."""
    stats = getattr(handler, "last_save_stats", None)
    if stats and stats is not self.stats:
      self.stats = stats
      if "snapshot_s" in stats:
        self.snap_ms.append(stats["snapshot_s"] * 1e3)
      if "blocking_s" in stats:
        self.handler_ms.append(stats["blocking_s"] * 1e3)
      if "cpu_s" in stats:
        self.cpu_ms.append(stats["cpu_s"] * 1e3)
      if stats.get("write_s", 0) > 0:
        self.gbps.append(stats["bytes"] / stats["write_s"] / 1e9)
    return self.gbps[-1] if self.gbps else None


def condition_of(k: int, with_floor: bool) -> tuple[str | None, int]:
  """(condition, cycle) of the k-th step of this run (0-based); condition
  None during the warm-up."""
  k -= _WARMUP_STEPS.value
  if k < 0:
    return None, -1
  if _CHECKPOINT_EVERY.value <= 0:
    return "no_save", 0
  cycle = CONDITIONS if with_floor else CONDITIONS[:2]
  block = k // max(_BLOCK_STEPS.value, 1)
  return cycle[block % len(cycle)], block // len(cycle)


def train(setup: Setup, arrays: dict, step: int, mngr, handler, handler_kind: str,
          floor_mngr) -> tuple[dict, int, dict[int, float], Timings]:
  """Trains from `step` to --steps, saving by condition (see the module
  docstring). Returns (arrays, step, losses by step, timings)."""
  compiled = setup.train_step
  timings = Timings()
  losses: dict[int, float] = {}
  first_step = step + 1
  current = None   # (condition, cycle) of the block being run
  managers = {"save": mngr, "floor": floor_mngr}
  # train ms: batch, step and loss fetch; save ms: inside mngr.save; bg GB/s: background write
  # rate of the latest completed fastpersist save.
  print(f"{'step':>6} {'loss':>9} {'train ms':>8} {'save ms':>8} {'bg GB/s':>8}  block", flush=True)
  while step < _STEPS.value:
    cond, cycle = condition_of(step + 1 - first_step, floor_mngr is not None)
    if (cond, cycle) != current:
      if current is not None and managers.get(current[0]) is not None:
        managers[current[0]].wait_until_finished()   # untimed: the next block starts clean
      current = (cond, cycle)
      if cond is not None:
        timings.blocks.append((cond, cycle, []))
    t0 = time.perf_counter()
    tokens = jax.device_put(batch_for_step(setup.dataset, _SEED.value, step + 1, _BATCH.value),
                            setup.batch_sharding)
    arrays, loss = compiled(arrays, tokens)
    loss = float(loss)  # waits for the step
    step += 1
    losses[step] = loss
    t1 = time.perf_counter()
    every = _CHECKPOINT_EVERY.value
    last = step == _STEPS.value and every > 0
    save_to = (mngr if last or (cond == "save" and step % every == 0) else
               floor_mngr if cond == "floor" and step % every == 0 else None)
    save_ms = None
    if save_to is not None:
      kind = handler_kind if save_to is mngr else "none"
      save_to.save(step, args=save_args(kind, {**arrays, "step": step}))
      save_ms = (time.perf_counter() - t1) * 1e3
      if save_to is mngr:
        timings.block_ms.append(save_ms)
    total_ms = (time.perf_counter() - t0) * 1e3
    # The last step is saved whatever its block: it counts only in a "save" block.
    if cond is not None and (not last or cond == "save"):
      timings.step_ms[cond].append(total_ms)
      timings.blocks[-1][2].append(total_ms)
    rate = timings.poll(handler)
    if step % _LOG_EVERY.value == 0 or step == _STEPS.value:
      print(f"{step:6d} {loss:9.4f} {(t1 - t0) * 1e3:8.1f} "
            f"{'-' if save_ms is None else f'{save_ms:.1f}':>8} "
            f"{'-' if rate is None else f'{rate:.2f}':>8}  {cond or 'warmup'}", flush=True)
  return arrays, step, losses, timings


# Summary --------------------------------------------------------------------------------------


def _median(xs):
  return statistics.median(xs) if xs else float("nan")


def spread(xs: list[float]) -> dict:
  """n, median, quartiles (q1, q3) and min/max of `xs` (NaN when empty)."""
  if not xs:
    return {"n": 0, **{k: float("nan") for k in ("median", "q1", "q3", "min", "max")}}
  q1, _, q3 = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else (xs[0],) * 3
  return {"n": len(xs), "median": statistics.median(xs), "q1": q1, "q3": q3,
          "min": min(xs), "max": max(xs)}


def per_cycle_cost(blocks: list) -> list[float]:
  """Points of step time the handler costs above the floor in each cycle
  that has all three conditions: (median save - median floor) / median
  no_save * 100, of that cycle's blocks."""
  by_cycle: dict[int, dict[str, list]] = {}
  for cond, cycle, ms in blocks:
    by_cycle.setdefault(cycle, {}).setdefault(cond, []).extend(ms)
  out = []
  for conds in by_cycle.values():
    if all(conds.get(c) for c in CONDITIONS):
      med = {c: statistics.median(conds[c]) for c in CONDITIONS}
      out.append((med["save"] - med["floor"]) / med["no_save"] * 100)
  return out


def summarize(t: Timings, **facts) -> dict:
  """The run's summary (JSON-able): `facts` plus per-condition step-time
  spreads, overheads over no_save (%, medians) and the cost above the floor
  (points of step time), and the save statistics."""
  steps = {c: spread(t.step_ms[c]) for c in CONDITIONS}
  base = steps["no_save"]["median"]
  overhead = {c: (steps[c]["median"] - base) / base * 100 for c in ("save", "floor")}
  cycles = per_cycle_cost(t.blocks)
  return {
      **facts,
      "step_ms": steps,
      "overhead_pct": overhead,
      "cost_above_floor_points": overhead["save"] - overhead["floor"],
      "cost_above_floor_points_per_cycle": cycles,
      "saves": len(t.block_ms),
      "median_blocking_ms": _median(t.block_ms),
      "first_blocking_ms": t.block_ms[0] if t.block_ms else float("nan"),
      "median_handler_blocking_ms": _median(t.handler_ms),
      "median_snapshot_ms": _median(t.snap_ms),
      "median_save_cpu_ms": _median(t.cpu_ms),
      "snapshot_mode": (t.stats or {}).get("snapshot_mode"),
      "median_background_gbps": _median(t.gbps),
  }


def _fmt(v, spec):
  return "n/a" if isinstance(v, float) and math.isnan(v) else format(v, spec)


def print_summary(s: dict, final_loss: float | None) -> None:
  """Prints the summary as a table of rows."""
  def step_row(c):
    x = s["step_ms"][c]
    return (f"{_fmt(x['median'], '.1f')} (IQR {_fmt(x['q1'], '.1f')}-{_fmt(x['q3'], '.1f')}, "
            f"min-max {_fmt(x['min'], '.1f')}-{_fmt(x['max'], '.1f')}, {x['n']} steps)")
  cycles = s["cost_above_floor_points_per_cycle"]
  rows = [
      ("handler", s["handler"]),
      ("steps (this run)", f"{s['steps']} ({s['first_step']}..{s['last_step']})"),
      ("checkpoint every", f"{s['checkpoint_every']} steps" if s["checkpoint_every"] else "never"),
      ("step ms, no save", step_row("no_save")),
      (f"step ms, saving ({s['handler']})", step_row("save")),
      ("step ms, saving nothing (floor)", step_row("floor")),
      ("overhead % (medians, vs no save)",
       f"saving {_fmt(s['overhead_pct']['save'], '+.1f')}, floor "
       f"{_fmt(s['overhead_pct']['floor'], '+.1f')}"),
      ("cost above floor, points of step time",
       _fmt(s["cost_above_floor_points"], "+.1f")
       + (f" (per cycle: median {statistics.median(cycles):+.1f}, min-max {min(cycles):+.1f}"
          f" to {max(cycles):+.1f}, {len(cycles)} cycles)" if cycles else "")),
      ("checkpoint size MiB", f"{s['checkpoint_mib']:.1f}"),
      (f"median blocking ms ({s['saves']} saves)", _fmt(s["median_blocking_ms"], ".1f")),
      ("first save blocking ms", _fmt(s["first_blocking_ms"], ".1f")),
      ("  of which FastPersist's async_save", _fmt(s["median_handler_blocking_ms"], ".1f")),
      ("median snapshot ms", _fmt(s["median_snapshot_ms"], ".1f")
       + (f" ({s['snapshot_mode']})" if s["snapshot_mode"] else "")),
      ("median background GB/s", _fmt(s["median_background_gbps"], ".2f")),
      ("median CPU ms per save (FastPersist threads)", _fmt(s["median_save_cpu_ms"], ".1f")),
      ("final loss", f"{final_loss:.4f}" if final_loss is not None else "n/a"),
      ("compile s", f"{s['compile_s']:.1f}"),
      ("wall s", f"{s['wall_s']:.1f}"),
  ]
  width = max(len(k) for k, _ in rows)
  print("\n== summary ==", flush=True)
  for k, v in rows:
    print(f"{k:<{width}}  {v}")
  sys.stdout.flush()


# Main -----------------------------------------------------------------------------------------


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  t_start = time.perf_counter()
  if _TRAIN_CPUS.value:
    os.sched_setaffinity(0, {int(c) for c in _TRAIN_CPUS.value})
  setup = set_up()
  handler_kind = _HANDLER.value
  mngr, handler = make_manager(handler_kind, _CKPT_DIR.value)
  floor_dir = floor_mngr = None
  if _FLOOR.value and handler_kind != "none" and _CHECKPOINT_EVERY.value > 0:
    floor_dir = tempfile.mkdtemp(prefix="fastpersist_floor_")
    floor_mngr, _ = make_manager("none", floor_dir)
  try:
    arrays, step, restore_s = resume_or_start(setup, mngr, handler_kind)
    first_step = step + 1
    state_bytes = sum(x.nbytes for x in jax.tree.leaves(arrays))
    n_params = sum(x.size for x in jax.tree.leaves(arrays["params"]))
    print(f"{setup.n_dev} devices, mesh data={setup.data_axis} x model={setup.model_axis}; "
          f"{n_params / 1e6:.2f} M params, state {state_bytes / MiB:.1f} MiB; "
          f"handler={handler_kind}"
          + (f" (engine {handler.engine_kind})" if handler_kind == "fastpersist" else ""),
          flush=True)
    t0 = time.perf_counter()
    example = jax.device_put(batch_for_step(setup.dataset, _SEED.value, step + 1, _BATCH.value),
                             setup.batch_sharding)
    setup.train_step = setup.train_step.lower(arrays, example).compile()
    compile_s = time.perf_counter() - t0
    print(f"compiled the train step in {compile_s:.1f} s", flush=True)
    arrays, step, losses, timings = train(setup, arrays, step, mngr, handler, handler_kind,
                                          floor_mngr)
    t0 = time.perf_counter()
    mngr.wait_until_finished()
    final_wait_ms = (time.perf_counter() - t0) * 1e3
    timings.poll(handler)
    last = mngr.latest_step()
    ckpt_bytes = (dir_bytes(os.path.join(os.fspath(mngr.directory), str(last)))
                  if last is not None else 0)
  finally:
    mngr.close()  # waits for the save in flight
    if floor_mngr is not None:
      floor_mngr.close()
      shutil.rmtree(floor_dir, ignore_errors=True)

  summary = summarize(
      timings, handler=handler_kind, steps=len(losses), first_step=first_step, last_step=step,
      checkpoint_every=_CHECKPOINT_EVERY.value, block_steps=_BLOCK_STEPS.value,
      compile_s=compile_s, restore_s=restore_s, checkpoint_mib=ckpt_bytes / MiB,
      state_mib=state_bytes / MiB, final_wait_ms=final_wait_ms, latest_checkpoint=last,
      wall_s=time.perf_counter() - t_start)
  print_summary(summary, losses[step] if losses else None)
  if _METRICS_OUT.value:
    with open(_METRICS_OUT.value, "w") as f:
      json.dump({"summary": summary,
                 "losses": {str(s): float.hex(l) for s, l in losses.items()}}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
