"""The benchmarks' child processes: each measured run happens in a fresh
`python -m MODULE CFG OUT` process (a cold start, its own resident set).
The parent writes the run's configuration as JSON to CFG; the child's
module calls child_main, which runs it and writes the result, or the
traceback as {"error": ...}, as JSON to OUT."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Any, Callable

from fastpersist_jax.benchmark import rss

_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def child_env(devices: int) -> dict[str, str]:
  """This process's environment for a child: XLA_FLAGS forcing `devices` CPU
  devices unless it already sets a count, JAX_PLATFORMS=cpu and
  TF_CPP_MIN_LOG_LEVEL=2 unless set."""
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "")
  if _DEVICE_COUNT_FLAG not in flags:
    env["XLA_FLAGS"] = (flags + f" {_DEVICE_COUNT_FLAG}={devices}").strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  return env


def forced_devices(env: dict[str, str], default: int) -> int:
  """The CPU device count XLA_FLAGS in `env` forces; `default` when none."""
  for flag in env.get("XLA_FLAGS", "").split():
    if flag.startswith(_DEVICE_COUNT_FLAG + "="):
      return int(flag.split("=", 1)[1])
  return default


def child_main(argv: list[str], work: Callable[[dict], dict]) -> int:
  """The child side of run_child: `argv` is [CFG, OUT]; writes work(cfg)'s
  result (or {"error": traceback}) to OUT as JSON; returns the exit status
  (0, or 1 after an error)."""
  import traceback  # pylint: disable=g-import-not-at-top
  cfg_path, out_path = argv
  with open(cfg_path) as f:
    cfg = json.load(f)
  try:
    result = work(cfg)
  except BaseException:  # pylint: disable=broad-except
    result = {"error": traceback.format_exc()}
  with open(out_path, "w") as f:
    json.dump(result, f)
  return 1 if "error" in result else 0


def run_child(module: str, cfg: dict[str, Any], env: dict[str, str], timeout: float) -> dict:
  """Runs `python -m module CFG OUT` (the module's child entry point) and
  returns the JSON it wrote to OUT, plus "ru_maxrss_children_bytes" (the
  largest peak resident set of any child so far, bytes).

  Args:
    module: the child's module, whose __main__ calls child_main.
    cfg: the run's configuration; "method" and "round" name it in errors.
    env: the child's environment (child_env).
    timeout: seconds before the child is killed.

  Raises:
    RuntimeError: the child failed (its traceback) or timed out (its last
      output).
  """
  with tempfile.TemporaryDirectory(prefix="fastpersist_save_bench.") as tmp:
    cfg_path, out_path = os.path.join(tmp, "cfg.json"), os.path.join(tmp, "out.json")
    with open(cfg_path, "w") as f:
      json.dump(cfg, f)
    cmd = [sys.executable, "-m", module, cfg_path, out_path]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    try:
      output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      output, _ = proc.communicate()
      raise RuntimeError(f"{cfg['method']} round {cfg['round']}: child timed out after "
                         f"{timeout:.0f} s; its output:\n{output[-4000:]}") from None
    result = None
    if os.path.exists(out_path):
      with open(out_path) as f:
        result = json.load(f)
    if proc.returncode != 0 or result is None or "error" in result:
      detail = result["error"] if result and "error" in result else output[-4000:]
      raise RuntimeError(f"{cfg['method']} round {cfg['round']}: child failed "
                         f"(exit {proc.returncode}):\n{detail}")
    # Everything since this run: RUSAGE_CHILDREN keeps the largest child's peak.
    result["ru_maxrss_children_bytes"] = rss.max_rss_children_bytes()
    return result
