"""Command-line entry: dispatches to the subcommands in SUBCOMMANDS.

  python -m fastpersist_jax.benchmark io|save|restore|device [flags]
  python -m fastpersist_jax.benchmark COMMAND --help

Exit status: the subcommand's (0 success; device: 1 when a restore was not
bit-exact), 2 for a command line argparse refuses (no or an unknown command,
an unknown flag, a value of the wrong type), 1 for a bad flag value the
subcommand refuses (it exits with the message) or a benchmark that fails.
"""

from __future__ import annotations

import argparse
import sys

from fastpersist_jax.benchmark import load_subcommands


def build_parser() -> argparse.ArgumentParser:
  """The argparse parser: one sub-parser per existing subcommand module,
  with its HELP, its module docstring as description, its add_arguments
  flags, and its run() as the `_run` default."""
  parser = argparse.ArgumentParser(
      prog="python -m fastpersist_jax.benchmark",
      description="fastpersist_jax benchmarks.")
  sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
  for name, module in load_subcommands().items():
    p = sub.add_parser(name, help=getattr(module, "HELP", None), description=module.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    module.add_arguments(p)
    p.set_defaults(_run=module.run)
  return parser


def main(argv: list[str] | None = None) -> int:
  """Parses `argv` (default sys.argv[1:]) and runs the chosen subcommand.

  Returns:
    The subcommand's exit status (its run()'s return value; None counts as
    0).

  Raises:
    SystemExit: argparse refused the command line (status 2) or printed
      --help (0); a subcommand refused a flag value (its message, status 1).
    RuntimeError: a benchmark child process failed or timed out (its output
      in the message); other exceptions of a failing benchmark propagate.
  """
  args = build_parser().parse_args(argv)
  return args._run(args) or 0


if __name__ == "__main__":
  sys.exit(main())
