"""The benchmarks run end to end on tiny inputs and write what they promise.

Smoke tests only: no figure is asserted (timings stay out of pass/fail)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench(args, tmp_path, timeout=600, **extra_env):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", **extra_env)
  return subprocess.run([sys.executable, "-m", "fastpersist_jax.benchmark", *args],
                        cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def _bench_in_process(args, capsys) -> tuple[int | str | None, str]:
  """The same entry point (`python -m fastpersist_jax.benchmark`'s main) in
  this process, for what needs no child process: (the exit status, or
  SystemExit's message, as sys.exit takes it; stdout)."""
  from fastpersist_jax.benchmark import __main__ as entry  # pylint: disable=g-import-not-at-top
  capsys.readouterr()
  try:
    status = entry.main(args)
  except SystemExit as e:
    status = e.code
  return status, capsys.readouterr().out


def test_save_benchmark_reports_every_method_and_snapshot_mode(tmp_path, capsys):
  out = tmp_path / "save.json"
  plot = tmp_path / "save.png"
  has_plot = importlib.util.find_spec("matplotlib") is not None
  r = _bench(["save", "--size_gib=0.004", "--leaves=12", "--rounds=1", "--no_fio",
              f"--dir={tmp_path}", f"--json={out}", "--methods=fastpersist,orbax"]
             + ([f"--plot={plot}"] if has_plot else []), tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "FastPersist save() blocking by snapshot mode" in r.stdout
  saved = json.loads(out.read_text())
  assert set(saved["summary"]) >= {"fastpersist", "orbax", "snapshot_modes"}
  modes = saved["summary"]["snapshot_modes"]
  assert set(modes["blocking_ms"]) == {"copy", "auto", "reference"}
  assert modes["memcpy_ms"] > 0
  assert saved["summary"]["fastpersist"]["gbps_synced"] > 0
  assert has_plot == plot.exists()
  # Nothing is left behind in the directory it worked in.
  assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
      ["save.json"] + (["save.png"] if has_plot else []))
  # The report can be made again from the JSON alone (no child process: in this one).
  status, stdout = _bench_in_process(["save", f"--from_json={out}"], capsys)
  assert status == 0 and "snapshot mode" in stdout, (status, stdout)


def test_restore_benchmark_restores_every_method_bit_exact(tmp_path):
  # Each child checks every leaf it restored against the writer's CRC-32C.
  out = tmp_path / "restore.json"
  r = _bench(["restore", "--size_gib=0.004", "--leaves=12", "--many_leaves=50", "--rounds=1",
              "--no_fio", f"--dir={tmp_path}", f"--json={out}"], tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Cold restore (a fresh process, unless noted)" in r.stdout
  assert "FastPersist, same process" in r.stdout
  saved = json.loads(out.read_text())
  methods = ("fastpersist", "same_process", "orbax", "many")
  assert [len(saved["samples"][m]) for m in methods] == [1, 1, 1, 1]
  summary = saved["summary"]
  assert summary["fastpersist"]["gbps"] > 0 and summary["orbax"]["gbps"] > 0
  assert summary["same_process"]["gbps"] > 0
  assert summary["fastpersist"]["vs_orbax"] > 0 and summary["many"]["seconds"] > 0
  assert [p.name for p in tmp_path.iterdir()] == ["restore.json"]


def test_io_benchmark_runs(tmp_path):
  out = tmp_path / "io.json"
  r = _bench(["io", "--size_gib=0.01", "--rounds=1", "--no_fio", f"--dir={tmp_path}",
              f"--json={out}"], tmp_path)
  assert r.returncode == 0, r.stderr[-3000:]
  assert json.loads(out.read_text())


def test_device_benchmark_runs_and_restores_bit_exact(tmp_path, tmp_path_factory):
  # Meant for an accelerator host; on CPU devices the same path runs.
  out = tmp_path / "device.json"
  # The tree is made by one jitted function per leaf, in the benchmark and
  # again in its cold-restore child (which runs after it, alone): JAX's
  # compilation cache compiles each distinct one once.
  cache = {"JAX_COMPILATION_CACHE_DIR": os.fspath(tmp_path_factory.mktemp("jax_cache")),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
           "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  # fio (where installed) runs too: this is the one test of the fio path.
  r = _bench(["device", "--size_gib=0.004", "--leaf_mib=1", "--rounds=1", f"--dir={tmp_path}",
              f"--json={out}"], tmp_path, **cache)
  assert r.returncode == 0, r.stderr[-3000:]
  summary = json.loads(out.read_text())["summary"]
  assert summary["restore_bit_exact"] is True
  assert summary["cold_restore_bit_exact"] is True and summary["cold_restore_gbps"] > 0
  assert summary["snapshot_mode"] == "copy"
  assert summary["snapshot_gbps"] > 0 and summary["device_get_gbps"] > 0
  assert [p.name for p in tmp_path.iterdir()] == ["device.json"]


def test_bad_snapshot_mode_is_refused(tmp_path, capsys):
  # Refused before any work, by SystemExit with the message (exit status 1,
  # the message on stderr): in this process.
  status, _ = _bench_in_process(["save", "--snapshot_modes=copy,lazy", f"--dir={tmp_path}"], capsys)
  assert isinstance(status, str) and "lazy" in status, status


@pytest.mark.parametrize("command", ["save", "restore", "io", "device"])
def test_a_missing_dir_is_refused_with_a_message(tmp_path, capsys, command):
  # (SystemExit with a message: python exits 1 printing it.)
  status, _ = _bench_in_process([command, f"--dir={tmp_path / 'absent'}"], capsys)
  assert status == f"--dir {tmp_path / 'absent'} is not a directory", status


if __name__ == "__main__":
  sys.exit(pytest.main([__file__] + sys.argv[1:]))
