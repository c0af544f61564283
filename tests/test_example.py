"""examples/train.py end to end: a stopped-and-resumed run reproduces the
losses of an uninterrupted one bit for bit, and the summary is printed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

import helpers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN = os.path.join(ROOT, "examples", "train.py")
N, K, J = 8, 4, 6  # total steps; steps before the interruption; a step to roll back to
TINY = ["--d_model=32", "--layers=1", "--heads=2", "--vocab=64", "--seq_len=16", "--batch=8",
        "--dataset=64", "--warmup_steps=1", "--block_steps=1", "--log_every=1", "--seed=3",
        "--lr_warmup=2", "--lr_decay=6"]


def start(ckpt_dir, metrics, *flags, compile_cache=None, cache_writes=False):
  """Starts examples/train.py; `finish` waits for it and returns (metrics, stdout).

  `compile_cache`: a directory for JAX's persistent compilation cache; the
  run writes what it compiles there if `cache_writes`, else only reads it
  (then start it only once the writer has ended: the cache's files are
  written without a lock). The executables are the ones the run would
  compile itself: only the compile time differs."""
  cmd = [sys.executable, TRAIN, f"--ckpt_dir={ckpt_dir}", f"--metrics_out={metrics}", *TINY, *flags]
  cache = {}
  if compile_cache is not None:
    cache = {"JAX_COMPILATION_CACHE_DIR": os.fspath(compile_cache),
             "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0",
             "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0" if cache_writes else "1000000"}
  env = helpers.child_env(8, JAX_PLATFORMS=os.environ.get("JAX_PLATFORMS", "cpu"), **cache)
  proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True)
  return proc, metrics, flags


def finish(run):
  proc, metrics, flags = run
  try:
    out, err = proc.communicate(timeout=120)
  except subprocess.TimeoutExpired:
    proc.kill()
    out, err = proc.communicate()
  assert proc.returncode == 0, f"train.py {flags} failed ({proc.returncode}):\n{out}\n{err}"
  with open(metrics) as f:
    return json.load(f), out


@pytest.mark.parametrize("handler", [
    "fastpersist",
    pytest.param("orbax", marks=[
        pytest.mark.slow,
        pytest.mark.skipif(not os.environ.get("FASTPERSIST_SLOW_TESTS"),
                           reason="slow (~40 s); set FASTPERSIST_SLOW_TESTS=1")]),
])
def test_resume_is_bit_identical(tmp_path, handler):
  ckpt = tmp_path / "ckpt"
  # The uninterrupted reference (keeping every checkpoint) first: it leaves
  # what it compiled in a cache for the other runs, which start after it.
  cache = tmp_path / "jax_cache"
  ref, ref_out = finish(start(tmp_path / "ref", tmp_path / "ref.json", f"--steps={N}",
                              f"--handler={handler}", f"--max_to_keep={N}", compile_cache=cache,
                              cache_writes=True))
  # Then, side by side, the first part of the interrupted run and (b) below.
  rollback = tmp_path / "rollback"
  rollback.mkdir()
  shutil.copytree(tmp_path / "ref" / str(J), rollback / str(J))
  rollback_run = start(rollback, tmp_path / "rollback.json", f"--steps={N}",
                       f"--handler={handler}", "--resume", compile_cache=cache)
  try:
    first, _ = finish(start(ckpt, tmp_path / "first.json", f"--steps={K}",
                            f"--handler={handler}", compile_cache=cache))
    assert (ckpt / str(K)).is_dir()   # (checked before the resume below goes on from it)
  except BaseException:
    rollback_run[0].kill()
    rollback_run[0].communicate()
    raise
  resumed_run = start(ckpt, tmp_path / "resumed.json", f"--steps={N}", f"--handler={handler}",
                      "--resume", compile_cache=cache)
  try:
    runs = [(K, finish(resumed_run)), (J, finish(rollback_run))]
  finally:
    for proc, _, _ in (resumed_run, rollback_run):
      if proc.poll() is None:
        proc.kill()
        proc.communicate()

  assert "== summary ==" in ref_out
  for row in ("step ms, no save", f"step ms, saving ({handler})", "step ms, saving nothing (floor)",
              "overhead % (medians, vs no save)", "cost above floor, points of step time",
              "checkpoint size MiB", "median blocking ms", "median background GB/s"):
    assert row in ref_out, row
  assert sorted(map(int, ref["losses"])) == list(range(1, N + 1))
  # After --warmup_steps=1, blocks of one step cycle through no_save, save, floor:
  # steps 2, 5 | 3, 6 | 4, 7; step 8 (the last) is saved but falls in a no_save block,
  # so it is not timed.
  summary = ref["summary"]
  for cond in ("no_save", "save", "floor"):
    figures = summary["step_ms"][cond]
    assert figures["n"] == 2, (cond, figures)
    assert 0 < figures["min"] <= figures["q1"] <= figures["median"] <= figures["q3"] <= figures["max"]
  base = summary["step_ms"]["no_save"]["median"]
  for cond in ("save", "floor"):
    want = (summary["step_ms"][cond]["median"] - base) / base * 100
    assert summary["overhead_pct"][cond] == pytest.approx(want)
  assert summary["cost_above_floor_points"] == pytest.approx(
      summary["overhead_pct"]["save"] - summary["overhead_pct"]["floor"])
  assert len(summary["cost_above_floor_points_per_cycle"]) == 2
  saved = [3, 6, 8]   # only the handler's saves land in --ckpt_dir; the floor's go to scratch
  assert summary["saves"] == len(saved)
  assert sorted(int(p.name) for p in (tmp_path / "ref").iterdir() if p.name.isdigit()) == saved
  assert first["losses"] == {str(s): ref["losses"][str(s)] for s in range(1, K + 1)}
  assert ref["losses"][str(N)] != ref["losses"]["1"]  # it trained

  # Resumed: (a) the run stopped at K and (b) a copy of the reference's
  # checkpoint J, which was saved while steps J+1.. ran and donated the very
  # buffers it was saved from: it must hold the state of step J exactly.
  for step, (resumed, out) in runs:
    assert f"restored step {step}" in out
    assert resumed["summary"]["first_step"] == step + 1
    # float.hex strings: equal only if the floats are bit-identical.
    assert resumed["losses"] == {str(s): ref["losses"][str(s)] for s in range(step + 1, N + 1)}
    assert resumed["summary"]["latest_checkpoint"] == N
  assert (ckpt / str(N)).is_dir() and (rollback / str(N)).is_dir()


if __name__ == "__main__":  # Bazel py_test runs the file itself
  sys.exit(pytest.main([__file__, *sys.argv[1:]]))
