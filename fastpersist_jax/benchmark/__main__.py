"""Command-line entry: dispatches to the subcommands in SUBCOMMANDS."""

from __future__ import annotations

import argparse
import sys

from fastpersist_jax.benchmark import load_subcommands


def build_parser() -> argparse.ArgumentParser:
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
  args = build_parser().parse_args(argv)
  return args._run(args) or 0


if __name__ == "__main__":
  sys.exit(main())
