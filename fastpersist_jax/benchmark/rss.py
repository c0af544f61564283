"""Resident-set probes: a process's current and peak resident set (from
/proc/self/status), a resettable peak (/proc/self/clear_refs), and the
lifetime peaks getrusage(2) keeps for this process and its children."""

from __future__ import annotations

import resource


def _status_kib(field: str) -> int:
  """A "<field>: N kB" line of /proc/self/status, in KiB. Raises OSError
  (no /proc) or KeyError (no such field)."""
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise KeyError(field)


def max_rss_self_bytes() -> int:
  """This process's peak resident set since it started, in bytes
  (getrusage(2) RUSAGE_SELF ru_maxrss, which Linux gives in KiB)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def max_rss_children_bytes() -> int:
  """The largest peak resident set of any waited-for child process, in
  bytes (getrusage(2) RUSAGE_CHILDREN ru_maxrss)."""
  return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


class Rss:
  """Current and peak resident set of this process, with a resettable peak.

  Attributes:
    resettable: whether the peak could be reset when this was made (writing
      "5" to /proc/self/clear_refs resets VmHWM to the current VmRSS; see
      proc(5)); where not, peak() is the peak since the process started.
  """

  def __init__(self):
    self.resettable = self.reset()

  def reset(self) -> bool:
    """Resets the peak (VmHWM) to the current resident set. Returns whether
    it could (False where /proc/self/clear_refs is not writable)."""
    try:
      with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
      return True
    except OSError:
      return False

  @staticmethod
  def _bytes(field: str) -> int:
    try:
      return _status_kib(field) * 1024
    except (OSError, KeyError):  # no /proc: the lifetime peak is all there is
      return max_rss_self_bytes()

  def current(self) -> int:
    """The resident set now (VmRSS), in bytes."""
    return self._bytes("VmRSS")

  def peak(self) -> int:
    """The peak resident set (VmHWM) since the last reset, in bytes."""
    return self._bytes("VmHWM")
