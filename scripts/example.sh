#!/usr/bin/env bash
# Sets everything up (idempotent) and runs the main example: a small sharded
# model trained on 8 CPU devices, checkpointed every step with
# FastPersistHandler. Extra arguments go to examples/train.py (absl flags).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
export XLA_FLAGS="${XLA_FLAGS:---xla_force_host_platform_device_count=8}"
# Run after run starts afresh unless told otherwise (--resume, --nooverwrite).
case " $* " in
  *" --resume"*|*" --overwrite"*|*" --nooverwrite"*|*" --noresume"*) extra=() ;;
  *) extra=(--overwrite) ;;
esac
exec "${FASTPERSIST_VENV:-$ROOT/.venv}/bin/python" examples/train.py "${extra[@]}" "$@"
