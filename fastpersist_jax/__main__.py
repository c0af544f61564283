"""Command-line tools for fastpersist checkpoints.

  python -m fastpersist_jax verify STEP_OR_ITEM_DIR
  python -m fastpersist_jax inspect STEP_OR_ITEM_DIR [--json]
  python -m fastpersist_jax export STEP_OR_ITEM_DIR OUT --format=safetensors|orbax
      [--max_shard_bytes=N] [--cast=DTYPE]

STEP_OR_ITEM_DIR: an item directory (holding fastpersist.json) or an Orbax
step directory holding one or more items (<step>/default/, ...).
Exit status: 0 success (verify: intact), 1 damaged or failed (also a flag
value that does not parse), 2 usage error (no such command or directory, not
a checkpoint, a dtype that needs --cast, an output that exists or cannot be
made).
"""

from __future__ import annotations

import errno
import sys

from absl import app, flags, logging

flags.DEFINE_bool("json", False, "inspect: print JSON instead of a table.")
flags.DEFINE_enum("format", "safetensors", ["safetensors", "orbax"], "export: output format.")
flags.DEFINE_integer("max_shard_bytes", 0,
                     "export --format=safetensors: split into files of at most this many bytes "
                     "of tensor data, with an index json (0: one file).", lower_bound=0)
flags.DEFINE_string("cast", None,
                    "export: convert leaves whose dtype the format cannot hold (e.g. int4 for "
                    "safetensors) to this dtype (e.g. int8); for orbax, every array.")
flags.DEFINE_integer("buffer_mib", 256, "verify: size of the reusable read buffer.", lower_bound=1)

FLAGS = flags.FLAGS
COMMANDS = ("verify", "inspect", "export")


def main(argv: list[str]) -> int:
  """Dispatches a subcommand; returns its exit status.

  Args:
    argv: what absl left after parsing the flags: [program, command,
      operands...]; verify and inspect take one operand (STEP_OR_ITEM_DIR),
      export two (STEP_OR_ITEM_DIR OUT).

  Returns:
    The exit status: the command's own (0 success, verify 1 for damage); 2
    after printing "error: MESSAGE" to stderr for CheckpointNotFoundError
    (1 where the operand is a checkpoint that lacks a file, e.g. a
    manifest: damage, as verify says), UnsupportedLeafError and
    ExportError, and for an OSError on an output
    path that cannot be used (ENOENT, ENOTDIR, EEXIST, EACCES, EROFS,
    EISDIR); 1 after printing "error: TYPE: MESSAGE" for any other
    FastPersistError (e.g. ChecksumMismatchError during export), or "error:
    MESSAGE" for any other OSError (a write that failed: ENOSPC, EIO, ...).

  Raises:
    absl.app.UsageError: (exit code 2; absl prints the usage) no command, an
      unknown command, or the wrong number of operands.
    Any other exception propagates (a traceback; exit status 1).
  """
  from fastpersist_jax.errors import (CheckpointNotFoundError, FastPersistError,  # pylint: disable=g-import-not-at-top
                                      UnsupportedLeafError)
  from fastpersist_jax.cli import export, inspect, verify  # pylint: disable=g-import-not-at-top
  if not FLAGS["verbosity"].present:
    # Orbax's INFO lines would drown the report; its ERROR tracebacks from its
    # own threads repeat the one-line error printed here.
    logging.set_verbosity(logging.FATAL if args_are_orbax_export(argv) else logging.WARNING)
  args = argv[1:]
  if not args or args[0] not in COMMANDS:
    raise app.UsageError(f"expected a command, one of {', '.join(COMMANDS)}", exitcode=2)
  command, operands = args[0], args[1:]
  want = 2 if command == "export" else 1
  if len(operands) != want:
    raise app.UsageError(f"{command} takes {want} operand(s), got {operands}", exitcode=2)
  try:
    if command == "verify":
      return verify.main(operands[0], FLAGS.buffer_mib << 20)
    if command == "inspect":
      return inspect.main(operands[0], FLAGS.json)
    return export.main(operands[0], operands[1], FLAGS.format, FLAGS.max_shard_bytes, FLAGS.cast)
  except CheckpointNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 1 if _holds_a_checkpoint(operands[0]) else 2   # a file missing: damage
  except (UnsupportedLeafError, export.ExportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except FastPersistError as e:
    print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
    return 1
  except OSError as e:   # the output cannot be written (no such directory, disk full, ...)
    print(f"error: {e}", file=sys.stderr)
    unusable_path = e.errno in (errno.ENOENT, errno.ENOTDIR, errno.EEXIST, errno.EACCES,
                                errno.EROFS, errno.EISDIR)
    return 2 if unusable_path else 1   # else the write failed (disk full, I/O error)


def _holds_a_checkpoint(path: str) -> bool:
  """Whether `path` is a checkpoint item or step directory (reader.item_directories)."""
  from fastpersist_jax import reader  # pylint: disable=g-import-not-at-top
  from fastpersist_jax.errors import CheckpointNotFoundError  # pylint: disable=g-import-not-at-top
  try:
    return bool(reader.item_directories(path))
  except CheckpointNotFoundError:
    return False


def args_are_orbax_export(argv: list[str]) -> bool:
  """Whether `argv` (as main takes it, flags parsed) runs export with
  --format=orbax, whose run silences absl logging below FATAL."""
  return argv[1:2] == ["export"] and FLAGS.format == "orbax"


def run() -> None:
  """The program's entry point (python -m fastpersist_jax, Bazel's
  :fastpersist): parses flags with absl and exits the process with main's
  status (see the module docstring). Never returns: raises SystemExit."""
  app.run(main)


if __name__ == "__main__":
  run()
