"""fastpersist_jax: FastPersist-style checkpointing for JAX as an Orbax handler."""

from fastpersist_jax.errors import (CheckpointNotFoundError, ChecksumMismatchError,
                                    CorruptCheckpointError, FastPersistError,
                                    IOUringUnavailableError, RestoreMismatchError, SaveError,
                                    UnsupportedLeafError)
from fastpersist_jax.handler import FastPersistHandler, FastPersistRestore, FastPersistSave
from fastpersist_jax.options import FastPersistOptions

__all__ = [
    "CheckpointNotFoundError", "ChecksumMismatchError", "CorruptCheckpointError",
    "FastPersistError", "FastPersistHandler", "FastPersistOptions", "FastPersistRestore",
    "FastPersistSave", "IOUringUnavailableError", "RestoreMismatchError", "SaveError", "UnsupportedLeafError",
]
__version__ = "0.1.0"
