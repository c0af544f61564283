"""fastpersist_jax: FastPersist-style checkpointing for JAX as an Orbax handler."""

from fastpersist_jax.checkpointable import (FastPersistCheckpointableHandler,
                                            checkpointables_registry)
from fastpersist_jax.emergency import UnsupportedManagerError
from fastpersist_jax.errors import (CheckpointNotFoundError, ChecksumMismatchError,
                                    CorruptCheckpointError, FastPersistError, ForeignCheckpointError,
                                    InvalidOptionsError,
                                    IOUringUnavailableError, PeerTimeoutError, RestoreError,
                                    RestoreMismatchError, SaveError, UnsupportedLeafError)
from fastpersist_jax.handler import FastPersistHandler, FastPersistRestore, FastPersistSave
from fastpersist_jax.options import FastPersistOptions
from fastpersist_jax.durability import (DurableCheckpointer, durable_manager_options,
                                        sync_committed)
from fastpersist_jax.recovery import latest_restorable_step, restore_per_host

__all__ = [
    "CheckpointNotFoundError", "ChecksumMismatchError", "CorruptCheckpointError",
    "DurableCheckpointer", "durable_manager_options", "sync_committed", "ForeignCheckpointError",
    "FastPersistCheckpointableHandler", "FastPersistError", "FastPersistHandler",
    "FastPersistOptions", "FastPersistRestore", "FastPersistSave", "InvalidOptionsError",
    "IOUringUnavailableError", "PeerTimeoutError", "RestoreError", "RestoreMismatchError",
    "SaveError", "UnsupportedLeafError",
    "UnsupportedManagerError", "checkpointables_registry", "latest_restorable_step",
    "restore_per_host",
]
__version__ = "0.1.0"
