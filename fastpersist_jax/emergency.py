"""Refusing Orbax's emergency and multi-tier checkpoint managers.

Those managers (`orbax.checkpoint.experimental.emergency`: the emergency
CheckpointManager, the replicator / multi-tier and P2P managers) restore the
items they save with Orbax's own PyTreeCheckpointHandler. When one of them
drives FastPersistHandler (e.g. `args=Composite(state=FastPersistSave(...))`
on a single-slice mesh) it would commit a step it cannot restore. The handler
therefore looks at its caller: if code of those managers is on the stack of
the save, it raises before writing anything.
"""

from __future__ import annotations

import inspect

from fastpersist_jax.errors import FastPersistError

# Modules whose checkpoint managers hard-wire Orbax's own handlers on restore.
MANAGER_MODULE_PREFIXES = ("orbax.checkpoint.experimental.emergency.",)


class UnsupportedManagerError(FastPersistError, RuntimeError):
  """The save is driven by a checkpoint manager that cannot restore it."""


def driving_manager() -> str | None:
  """The module of an Orbax emergency / multi-tier manager on the calling
  stack (the innermost one), or None. Costs a walk of the stack (~µs)."""
  frame = inspect.currentframe()
  try:
    while frame is not None:
      module = frame.f_globals.get("__name__", "")
      if module.startswith(MANAGER_MODULE_PREFIXES):
        return module
      frame = frame.f_back
    return None
  finally:
    del frame


def refuse_emergency_manager(directory: str) -> None:
  """Raises UnsupportedManagerError if an emergency / multi-tier manager is
  saving into `directory` through FastPersistHandler; returns otherwise."""
  module = driving_manager()
  if module is None:
    return
  raise UnsupportedManagerError(
      f"{directory}: FastPersistHandler is being driven by Orbax's {module}, which restores "
      "its items with Orbax's own PyTreeCheckpointHandler and could not restore this step; "
      "nothing was saved or committed. Save FastPersist checkpoints with ocp.CheckpointManager "
      "(item_handlers=FastPersistHandler(...)); for a fast local tier, give each host its own "
      "directory with ocp.options.MultiprocessingOptions(primary_host=None) (README: "
      "'Several processes').")
