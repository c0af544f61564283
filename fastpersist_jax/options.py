"""Every tunable of fastpersist_jax, with its default, in one place.

The defaults were measured on a 2-core VM with virtio NVMe (see the engine
issue's note): 4 MiB requests at queue depth 16 on one ring were fastest;
SQPOLL and extra rings only took CPU away from the training process.
"""

from __future__ import annotations

import dataclasses
import os

from fastpersist_jax.errors import InvalidOptionsError

MiB = 1 << 20
GiB = 1 << 30

ENGINE_ENV = "FASTPERSIST_ENGINE"
_ENGINE_KINDS = ("auto", "io_uring", "threads")
_SNAPSHOT_MODES = ("auto", "copy", "reference")


@dataclasses.dataclass(frozen=True)
class FastPersistOptions:
  """Options for the I/O engine, staging and on-disk layout. A value out of
  its range raises InvalidOptionsError (a FastPersistError and ValueError)
  naming the option.

  Attributes:
    engine: "io_uring", "threads" (a pwrite/pread pool), or "auto": io_uring
      where the kernel allows it, else the pool with a warning. The
      FASTPERSIST_ENGINE environment variable overrides "auto".
    queue_depth: requests in flight per ring (or per thread of the threads engine).
    chunk_bytes: largest single read/write request.
    io_rings: number of io_uring rings, each driven by its own thread.
    direct_io: use O_DIRECT where the filesystem supports it.
    register_buffers: register the staging pool as io_uring fixed buffers
      (and mlock it) when RLIMIT_MEMLOCK allows; otherwise it is used
      unregistered.
    host_memory_limit: size of the reusable host staging pool. A checkpoint
      larger than this is staged in pieces: the save then blocks until the
      first pieces are on disk. From accelerators, device-to-host transfers
      run up to 4 staging slabs ahead of the copy into the pool, in pinned
      host memory of their own: a save's extra host memory is this plus
      4 * staging_slab_bytes.
    staging_slab_bytes: unit the pool is allocated and recycled in.
    data_file_bytes: a process starts a new data file past this size, so
      huge checkpoints are a few large files rather than one giant one.
    verify_checksums: check each shard's crc32c on restore.
    crc_chunk_bytes: a saved shard (or part) longer than this also records
      the CRC-32C of each chunk of this many bytes, so that a restore which
      needs only some of its rows (resharding onto another topology) reads
      and verifies only the chunks holding them. A multiple of 4096; 0
      records none (restores then read whole shards). Free when saving: the
      record's own CRC is combined from its chunks' (checksums.py), so the
      bytes are still checksummed once (256 MiB: 17.8 ms with chunks, 17.2
      ms without, on this project's VM).
    snapshot: what the save blocks for.
      "copy": until every owned shard is copied into the staging pool, after
        which the caller may donate, delete or overwrite anything.
      "reference": (opt-in, lazy) only until the arrays are referenced; every
        shard is looked up and copied in the background, so blocking is a
        few milliseconds whatever the size. Only for arrays the caller does
        not donate or delete until the save finishes; if one is, the save
        fails with SaveError naming the leaf instead of writing garbage.
      "auto" (default): on CPU, host views of the shards are taken while
        blocking and copied in the background. The CPU runtime neither frees
        nor donates a buffer while such a view exists (a donating step then
        writes fresh memory), so this is as safe as "copy" and blocks for
        ~10 us per shard instead of a memcpy of the checkpoint. With any
        array on an accelerator, "auto" is "copy".
      numpy leaves (mutable in place) are always copied while blocking.
    restore_batch_bytes: how much a restore reads in one engine call (at
      most staging_slab_bytes when restoring onto accelerators, whose
      batches go through the staging pool); later batches are faulted in
      and read while earlier ones are verified and built.
    replica_parallel: when a shard is replicated on several processes (data
      parallelism), each of them writes an equal byte range of it, so every
      host's disk works on every shard (FastPersist's write parallelism). In
      per-host directories the hosts then swap parts on restore (collectives;
      same topology); without it, each host writes all its devices hold.
    host_redundancy: in per-host directories (each process its own root),
      how many distinct hosts write each byte of a shard replicated on R
      hosts: min(host_redundancy, R). Default 2: every host writes 2/R of
      such a shard and any one host can be lost (recover with
      fastpersist_jax.restore_per_host). 1: each byte once (1/R per host).
      Placement: fastpersist_jax/redundancy.py. Ignored in a shared
      directory (one filesystem: a second copy there adds nothing).
    commit_timeout_s: in a multi-process save, how long a process that has
      finished waits for the others' outcome before failing the save; also
      how long recovery (restore_per_host) waits for every process to join,
      how long a save waits for Orbax to create its directory, and (twice
      it) how long a snapshot waits for staging memory while no write frees
      any. Each such wait then raises SaveError naming what it waited for.
    background_nice: niceness added to fastpersist's background threads
      (checksum, background copy, writes), so that on a busy host the
      training step keeps the CPU and checkpointing takes what is left.
      0 leaves them at the caller's priority.
    background_cpus: CPUs those background threads run on (e.g. cores the
      training process's data loading and device feeding do not use); None
      lets the scheduler place them. Blocking copies ("copy") still use every
      core, since the caller is waiting for them.
    copy_threads: threads copying shards into staging during the blocking
      snapshot (the training step is waiting then, so all cores may help).
      0 means min(4, number of CPUs).
  """

  engine: str = "auto"
  queue_depth: int = 16
  chunk_bytes: int = 4 * MiB
  io_rings: int = 1
  direct_io: bool = True
  register_buffers: bool = True
  host_memory_limit: int = 2 * GiB
  staging_slab_bytes: int = 64 * MiB
  data_file_bytes: int = 4 * GiB
  verify_checksums: bool = True
  crc_chunk_bytes: int = 4 * MiB
  snapshot: str = "auto"
  restore_batch_bytes: int = 64 * MiB
  copy_threads: int = 0
  replica_parallel: bool = True
  host_redundancy: int = 2
  background_nice: int = 10
  background_cpus: tuple[int, ...] | None = None
  commit_timeout_s: float = 600.0

  def __post_init__(self):
    if self.engine not in _ENGINE_KINDS:
      raise InvalidOptionsError(f"engine must be one of {_ENGINE_KINDS}, got {self.engine!r}")
    if self.snapshot not in _SNAPSHOT_MODES:
      raise InvalidOptionsError(f"snapshot must be one of {_SNAPSHOT_MODES}, got {self.snapshot!r}")
    for name in ("queue_depth", "chunk_bytes", "io_rings", "host_memory_limit",
                 "staging_slab_bytes", "data_file_bytes", "restore_batch_bytes"):
      if getattr(self, name) <= 0:
        raise InvalidOptionsError(f"{name} must be positive, got {getattr(self, name)}")
    if self.background_cpus is not None:
      cpus = tuple(self.background_cpus)
      if not cpus or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0
                             for c in cpus):
        raise InvalidOptionsError(f"background_cpus must be a non-empty sequence of CPU numbers, got "
                         f"{self.background_cpus!r}")
      object.__setattr__(self, "background_cpus", cpus)
    if (not isinstance(self.host_redundancy, int) or isinstance(self.host_redundancy, bool)
        or self.host_redundancy < 1):
      raise InvalidOptionsError(f"host_redundancy must be an integer >= 1, got {self.host_redundancy!r}")
    if self.copy_threads < 0:
      raise InvalidOptionsError(f"copy_threads must be >= 0, got {self.copy_threads}")
    if self.crc_chunk_bytes < 0 or self.crc_chunk_bytes % 4096:
      raise InvalidOptionsError(f"crc_chunk_bytes must be 0 or a positive multiple of 4096, got "
                       f"{self.crc_chunk_bytes}")
    if self.chunk_bytes % 4096:
      raise InvalidOptionsError(f"chunk_bytes must be a multiple of 4096, got {self.chunk_bytes}")
    if self.staging_slab_bytes % 4096:
      raise InvalidOptionsError(f"staging_slab_bytes must be a multiple of 4096, got {self.staging_slab_bytes}")

  def resolved_copy_threads(self) -> int:
    if self.copy_threads > 0:
      return self.copy_threads
    return max(1, min(4, len(os.sched_getaffinity(0))))

  def resolved_engine(self) -> str:
    """The engine kind asked for, after the environment override."""
    if self.engine != "auto":
      return self.engine
    env = os.environ.get(ENGINE_ENV, "auto").strip() or "auto"
    if env not in _ENGINE_KINDS:
      raise InvalidOptionsError(f"{ENGINE_ENV} must be one of {_ENGINE_KINDS}, got {env!r}")
    return env
