#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the test suite. Extra arguments go
# to pytest, e.g. `bash scripts/test.sh -k engine`.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "${FASTPERSIST_VENV:-$ROOT/.venv}/bin/python" -m pytest tests "$@"
