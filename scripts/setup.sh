#!/usr/bin/env bash
# Idempotent set-up on Debian/Ubuntu: system packages (liburing-dev, a C++
# compiler, python3-venv) when missing, a virtualenv in .venv, and the package
# with its test and example extras. Sourced by scripts/test.sh and
# scripts/example.sh; safe to run again at any time.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${FASTPERSIST_VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

missing=()
pkg-config --exists 'liburing >= 2.1' 2>/dev/null || missing+=(liburing-dev pkg-config)
command -v g++ >/dev/null 2>&1 || missing+=(g++)
"$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
"$PYTHON" -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' \
  || missing+=(python3-dev)
# The power-loss harness (tests/test_power_loss.py): fusermount3 and libfuse3
# for mfusepy's FUSE filesystem, where /dev/fuse exists. (grep reads all of
# ldconfig's output: with pipefail, grep -q could fail it through SIGPIPE.)
[ -e /dev/fuse ] && { ! command -v fusermount3 >/dev/null 2>&1 \
  || ! (ldconfig -p 2>/dev/null || /sbin/ldconfig -p 2>/dev/null) | grep libfuse3.so.3 >/dev/null; } \
  && missing+=(fuse3 libfuse3-3)
if [ ${#missing[@]} -gt 0 ]; then
  echo "setup: installing system packages: ${missing[*]}"
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# Editable, so tests and examples run against this checkout; the C++
# extension is (re)built by scikit-build-core + CMake.
"$VENV/bin/python" -m pip install -q -e "$ROOT[test,examples]"
echo "setup: ready ($("$VENV/bin/python" -c 'import fastpersist_jax, jax; print("fastpersist_jax", fastpersist_jax.__version__, "jax", jax.__version__)'))"
