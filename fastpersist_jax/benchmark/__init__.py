"""Benchmarks: `python -m fastpersist_jax.benchmark COMMAND [flags]`.

Each subcommand lives in its own module, listed in SUBCOMMANDS, which provides:

  HELP: str                      one line for `--help`
  add_arguments(parser) -> None  adds its flags to an argparse sub-parser
  run(args) -> int | None        runs it; the return value is the exit status

Modules are imported when the command line is parsed, so keep heavy imports
(jax, orbax) inside run(). A listed module that does not exist yet is left out
of the command line.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

SUBCOMMANDS: dict[str, str] = {
    "device": "fastpersist_jax.benchmark.device_bench",
    "io": "fastpersist_jax.benchmark.io_bench",
    "powerloss": "fastpersist_jax.benchmark.powerloss",
    "restore": "fastpersist_jax.benchmark.restore_bench",
    "save": "fastpersist_jax.benchmark.save_bench",
}


def load_subcommands() -> dict[str, ModuleType]:
  """The subcommand modules that exist, by command name."""
  found = {}
  for name, module in SUBCOMMANDS.items():
    if importlib.util.find_spec(module) is not None:
      found[name] = importlib.import_module(module)
  return found
