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
    XLA_FLAGS=... python examples/train.py --steps=300 --resume   # continue the latest checkpoint

The batch of step s depends only on (seed, s), so a run that is stopped and
resumed produces bit-identical losses to an uninterrupted one.

Step accounting: `state["step"]` is the number of updates applied; the update
that turns step s-1 into step s is "step s", and the checkpoint taken after it
is saved under step s.

Timing: a run has three phases. --warmup_steps (not timed, not saved), then
--baseline_steps without checkpoints (the step time without checkpointing),
then checkpointing every --checkpoint_every steps until --steps; the last step
is always saved. A step's time covers its batch, the train step, fetching the
loss and the `mngr.save` call, so it includes both the blocking part of the
save and whatever the background writes take away from training. Blocking ms
is the time inside `mngr.save` (Orbax's own bookkeeping, waiting for the
previous save if it is still running, and the handler's host snapshot);
background GB/s is bytes / write_s of each completed FastPersist save.
"""

from __future__ import annotations

import functools
import json
import math
import os
import statistics
import sys
import time
from typing import NamedTuple

from absl import app, flags, logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P
import numpy as np
import optax
import orbax.checkpoint as ocp

from fastpersist_jax import FastPersistHandler, FastPersistOptions, FastPersistRestore, FastPersistSave

MiB = 1 << 20

_STEPS = flags.DEFINE_integer("steps", 250, "train until the state has this many steps")
_CKPT_DIR = flags.DEFINE_string("ckpt_dir", "/tmp/fastpersist_example", "checkpoint directory")
_CHECKPOINT_EVERY = flags.DEFINE_integer(
    "checkpoint_every", 1, "save every this many steps (and always the last step); 0: never save")
_MAX_TO_KEEP = flags.DEFINE_integer("max_to_keep", 2, "checkpoints the manager keeps")
_HANDLER = flags.DEFINE_enum("handler", "fastpersist", ["fastpersist", "orbax"],
                             "fastpersist: FastPersistHandler; orbax: ocp.StandardCheckpointHandler")
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
_BASELINE_STEPS = flags.DEFINE_integer(
    "baseline_steps", 20, "steps after the warm-up taken without checkpointing, to measure the "
    "step time without checkpoints")
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


def make_manager(handler_kind: str):
  options = ocp.CheckpointManagerOptions(max_to_keep=_MAX_TO_KEEP.value,
                                         enable_async_checkpointing=True)
  if handler_kind == "fastpersist":
    cpus = tuple(int(c) for c in _CHECKPOINT_CPUS.value) if _CHECKPOINT_CPUS.value else None
    handler = FastPersistHandler(FastPersistOptions(snapshot=_SNAPSHOT.value,
                                                    background_nice=_BACKGROUND_NICE.value,
                                                    background_cpus=cpus))
  else:
    handler = ocp.StandardCheckpointHandler()
  mngr = ocp.CheckpointManager(os.path.abspath(_CKPT_DIR.value), item_handlers=handler,
                               options=options)
  return mngr, handler


def save_args(handler_kind: str, state):
  return FastPersistSave(state) if handler_kind == "fastpersist" else ocp.args.StandardSave(state)


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


# Main -----------------------------------------------------------------------------------------


def _median(xs):
  return statistics.median(xs) if xs else float("nan")


def _mean(xs):
  return statistics.fmean(xs) if xs else float("nan")


def main(argv):
  del argv
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # Orbax logs every save at INFO
  t_start = time.perf_counter()
  if _TRAIN_CPUS.value:
    os.sched_setaffinity(0, {int(c) for c in _TRAIN_CPUS.value})

  cfg = Config(_D_MODEL.value, _LAYERS.value, _HEADS.value, _MLP_MULT.value * _D_MODEL.value,
               _VOCAB.value, _SEQ_LEN.value)
  if cfg.d_model % cfg.heads:
    raise app.UsageError("--d_model must be a multiple of --heads")
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

  dataset = make_dataset(_SEED.value, _DATASET.value, cfg.seq_len, cfg.vocab)
  handler_kind = _HANDLER.value
  checkpoint_every = _CHECKPOINT_EVERY.value
  mngr, handler = make_manager(handler_kind)

  # State: {"params", "opt_state"} of jax.Arrays plus "step", a Python int.
  abstract_state = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                {"params": abstract_params, "opt_state": abstract_opt}, shardings)
  abstract_state["step"] = 0
  restore_s = 0.0
  latest = mngr.latest_step() if _RESUME.value else None
  if _RESUME.value and latest is None:
    print(f"--resume: no checkpoint in {_CKPT_DIR.value}; starting from scratch", flush=True)
  if latest is not None:
    t0 = time.perf_counter()
    restored = mngr.restore(latest, args=restore_args(handler_kind, abstract_state))
    jax.block_until_ready(restored)
    restore_s = time.perf_counter() - t0
    step = int(restored["step"])
    arrays = {"params": restored["params"], "opt_state": restored["opt_state"]}
    print(f"restored step {step} from {mngr.directory} in {restore_s * 1e3:.0f} ms", flush=True)
  else:
    if not _RESUME.value and mngr.all_steps():
      if not _OVERWRITE.value:
        existing = mngr.all_steps()
        mngr.close()
        raise SystemExit(f"{_CKPT_DIR.value} already holds checkpoints {existing}; "
                         "pass --resume to continue, --overwrite to start afresh, or another "
                         "--ckpt_dir")
      for s in mngr.all_steps():
        mngr.delete(s)
    arrays = init_state(jax.random.key(_SEED.value))
    step = 0

  state_bytes = sum(x.nbytes for x in jax.tree.leaves(arrays))
  n_params = sum(x.size for x in jax.tree.leaves(arrays["params"]))
  print(f"{n_dev} devices, mesh data={data_axis} x model={model_axis}; {n_params / 1e6:.2f} M params, "
        f"state {state_bytes / MiB:.1f} MiB; handler={handler_kind}"
        + (f" (engine {handler.engine_kind})" if handler_kind == "fastpersist" else ""), flush=True)

  t0 = time.perf_counter()
  example_batch = jax.device_put(batch_for_step(dataset, _SEED.value, step + 1, _BATCH.value),
                                 batch_sharding)
  compiled = train_step.lower(arrays, example_batch).compile()
  compile_s = time.perf_counter() - t0
  print(f"compiled the train step in {compile_s:.1f} s", flush=True)

  losses: dict[int, float] = {}
  plain_ms: list[float] = []   # iterations of the baseline phase (no checkpoints)
  ckpt_ms: list[float] = []    # iterations of the checkpointing phase, saving or not
  block_ms: list[float] = []   # time inside mngr.save
  gbps: list[float] = []       # background write rate of each completed fastpersist save
  handler_ms: list[float] = []  # fastpersist's own part of the blocking time (async_save)
  snap_ms: list[float] = []    # fastpersist's host snapshot (in the background unless "copy")
  cpu_ms: list[float] = []     # CPU time of fastpersist's own threads per save
  seen_stats = None
  first_step = step + 1
  # train ms: batch, step and loss fetch; save ms: inside mngr.save; bg GB/s: background write
  # rate of the latest completed fastpersist save.
  print(f"{'step':>6} {'loss':>9} {'train ms':>8} {'save ms':>8} {'bg GB/s':>8}", flush=True)

  def poll_stats():
    nonlocal seen_stats
    if handler_kind != "fastpersist":
      return None
    stats = handler.last_save_stats
    if stats and stats is not seen_stats:
      seen_stats = stats
      if "snapshot_s" in stats:
        snap_ms.append(stats["snapshot_s"] * 1e3)
      if "blocking_s" in stats:
        handler_ms.append(stats["blocking_s"] * 1e3)
      if "cpu_s" in stats:
        cpu_ms.append(stats["cpu_s"] * 1e3)
      if stats.get("write_s", 0) > 0:
        gbps.append(stats["bytes"] / stats["write_s"] / 1e9)
    return gbps[-1] if gbps else None

  try:
    while step < _STEPS.value:
      t0 = time.perf_counter()
      tokens = jax.device_put(batch_for_step(dataset, _SEED.value, step + 1, _BATCH.value),
                              batch_sharding)
      arrays, loss = compiled(arrays, tokens)
      loss = float(loss)  # waits for the step
      step += 1
      losses[step] = loss
      t1 = time.perf_counter()
      k = step - first_step  # iterations of this run before this one
      phase = ("warmup" if k < _WARMUP_STEPS.value else
               "baseline" if k < _WARMUP_STEPS.value + _BASELINE_STEPS.value or checkpoint_every <= 0
               else "ckpt")
      save = checkpoint_every > 0 and (step == _STEPS.value or
                                       (phase == "ckpt" and step % checkpoint_every == 0))
      save_ms = None
      if save:
        mngr.save(step, args=save_args(handler_kind, {**arrays, "step": step}))
        save_ms = (time.perf_counter() - t1) * 1e3
        block_ms.append(save_ms)
      total_ms = (time.perf_counter() - t0) * 1e3
      if phase == "baseline" and not save:
        plain_ms.append(total_ms)
      elif phase == "ckpt":
        ckpt_ms.append(total_ms)
      rate = poll_stats()
      if step % _LOG_EVERY.value == 0 or step == _STEPS.value:
        print(f"{step:6d} {loss:9.4f} {(t1 - t0) * 1e3:8.1f} "
              f"{'-' if save_ms is None else f'{save_ms:.1f}':>8} "
              f"{'-' if rate is None else f'{rate:.2f}':>8}", flush=True)

  except BaseException:
    mngr.close()  # waits for the save in flight
    raise
  t0 = time.perf_counter()
  mngr.wait_until_finished()
  final_wait_ms = (time.perf_counter() - t0) * 1e3
  poll_stats()
  last = mngr.latest_step()
  ckpt_bytes = dir_bytes(os.path.join(os.fspath(mngr.directory), str(last))) if last is not None else 0
  mngr.close()

  plain = _mean(plain_ms)
  with_ckpt = _mean(ckpt_ms)
  overhead = (with_ckpt - plain) / plain * 100 if plain_ms and ckpt_ms else float("nan")
  # Medians shrug off the odd slow step of a busy machine.
  overhead_med = ((_median(ckpt_ms) - _median(plain_ms)) / _median(plain_ms) * 100
                  if plain_ms and ckpt_ms else float("nan"))
  summary = {
      "handler": handler_kind,
      "steps": len(losses),
      "first_step": first_step,
      "last_step": step,
      "checkpoint_every": checkpoint_every,
      "compile_s": compile_s,
      "restore_s": restore_s,
      "step_ms_no_ckpt": plain,
      "step_ms_with_ckpt": with_ckpt,
      "median_step_ms_no_ckpt": _median(plain_ms),
      "median_step_ms_with_ckpt": _median(ckpt_ms),
      "checkpoint_mib": ckpt_bytes / MiB,
      "state_mib": state_bytes / MiB,
      "saves": len(block_ms),
      "median_blocking_ms": _median(block_ms),
      "first_blocking_ms": block_ms[0] if block_ms else float("nan"),
      "median_handler_blocking_ms": _median(handler_ms),
      "median_snapshot_ms": _median(snap_ms),
      "median_save_cpu_ms": _median(cpu_ms),
      "snapshot_mode": (seen_stats or {}).get("snapshot_mode"),
      "median_background_gbps": _median(gbps),
      "final_wait_ms": final_wait_ms,
      "overhead_pct": overhead,
      "overhead_pct_medians": overhead_med,
      "latest_checkpoint": last,
      "wall_s": time.perf_counter() - t_start,
  }

  def fmt(v, spec):
    return "n/a" if isinstance(v, float) and math.isnan(v) else format(v, spec)

  rows = [
      ("handler", handler_kind),
      ("steps (this run)", f"{len(losses)} ({first_step}..{step})"),
      ("checkpoint every", f"{checkpoint_every} steps" if checkpoint_every else "never"),
      (f"step ms, no checkpoint ({len(plain_ms)} steps)",
       f"{fmt(plain, '.1f')} (median {fmt(summary['median_step_ms_no_ckpt'], '.1f')})"),
      (f"step ms, checkpointing ({len(ckpt_ms)} steps)",
       f"{fmt(with_ckpt, '.1f')} (median {fmt(summary['median_step_ms_with_ckpt'], '.1f')})"),
      ("checkpoint size MiB", f"{ckpt_bytes / MiB:.1f}"),
      (f"median blocking ms ({len(block_ms)} saves)", fmt(summary["median_blocking_ms"], ".1f")),
      ("first save blocking ms", fmt(summary["first_blocking_ms"], ".1f")),
      ("  of which FastPersist's async_save", fmt(summary["median_handler_blocking_ms"], ".1f")),
      ("median snapshot ms", fmt(summary["median_snapshot_ms"], ".1f")
       + (f" ({summary['snapshot_mode']})" if summary["snapshot_mode"] else "")),
      ("median background GB/s", fmt(summary["median_background_gbps"], ".2f")),
      ("median CPU ms per save (FastPersist threads)", fmt(summary["median_save_cpu_ms"], ".1f")),
      ("overhead %", f"{fmt(overhead, '+.1f')} (of medians {fmt(overhead_med, '+.1f')})"),
      ("final loss", f"{losses[step]:.4f}" if losses else "n/a"),
      ("compile s", f"{compile_s:.1f}"),
      ("wall s", f"{summary['wall_s']:.1f}"),
  ]
  width = max(len(k) for k, _ in rows)
  print("\n== summary ==", flush=True)
  for k, v in rows:
    print(f"{k:<{width}}  {v}")
  sys.stdout.flush()

  if _METRICS_OUT.value:
    with open(_METRICS_OUT.value, "w") as f:
      json.dump({"summary": summary,
                 "losses": {str(s): float.hex(l) for s, l in losses.items()}}, f, indent=1)


if __name__ == "__main__":
  app.run(main)
