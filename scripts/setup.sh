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
