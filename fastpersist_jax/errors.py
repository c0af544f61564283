"""The exceptions fastpersist_jax raises. All derive from FastPersistError."""

from __future__ import annotations


class FastPersistError(Exception):
  """Base class of every error raised by fastpersist_jax itself."""


class UnsupportedLeafError(FastPersistError, TypeError):
  """A pytree leaf (type or dtype) that cannot be checkpointed."""


class CheckpointNotFoundError(FastPersistError, FileNotFoundError):
  """The directory holds no (complete) fastpersist checkpoint."""


class CorruptCheckpointError(FastPersistError, ValueError):
  """Metadata, a manifest or data failed validation."""


class ChecksumMismatchError(CorruptCheckpointError):
  """A shard's bytes do not match the crc32c recorded when it was saved."""


class RestoreMismatchError(FastPersistError, ValueError):
  """The restore target does not fit what was saved (path, shape, dtype)."""


class InvalidOptionsError(FastPersistError, ValueError):
  """A FastPersistOptions value out of its range (names the option)."""


class SaveError(FastPersistError):
  """A save failed; nothing of it was committed."""


class RestoreError(FastPersistError):
  """Another process failed its part of a multi-process restore (its own
  error names the cause there); this process returns nothing either."""


class IOUringUnavailableError(FastPersistError, RuntimeError):
  """engine="io_uring" was asked for and the kernel (or a sandbox) refuses it."""


class PeerTimeoutError(FastPersistError, TimeoutError):
  """Another process did not join a collective step (e.g. recovery) in time."""


class ForeignCheckpointError(CheckpointNotFoundError):
  """The directory holds no fastpersist checkpoint but one another handler
  wrote (e.g. Orbax's StandardCheckpointHandler, in a run that switched
  handlers): the message names the writer and the Orbax handler and args
  that read it. A CheckpointNotFoundError, so that code catching that still
  catches it."""
