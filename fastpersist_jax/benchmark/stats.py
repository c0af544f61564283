"""Statistics and number formatting the benchmarks' reports share: medians
that skip missing samples, ranges, ratios, GB/s, and how figures print."""

from __future__ import annotations

import statistics
from typing import Iterable


def gbps(nbytes: float, seconds: float) -> float:
  """GB/s: `nbytes` bytes moved in `seconds` seconds, in 1e9 bytes/s."""
  return nbytes / seconds / 1e9


def med(xs: Iterable[float | None]) -> float | None:
  """The median of the samples that are not None; None when there are none."""
  xs = [x for x in xs if x is not None]
  return statistics.median(xs) if xs else None


def spread(xs: Iterable[float]) -> tuple[float, float, float]:
  """(median, min, max) of at least one sample. Raises ValueError when `xs`
  is empty (statistics.StatisticsError)."""
  xs = list(xs)
  return statistics.median(xs), min(xs), max(xs)


def ratio(a: float | None, b: float | None) -> float | None:
  """a / b; None when either is missing or b is 0."""
  return a / b if a is not None and b else None


def fmt_gbps(v: float | None) -> str:
  """A GB/s figure with as many decimals as it needs to show: "1.23",
  "0.045", "3.0e-04"; "-" for None."""
  if v is None:
    return "-"
  return f"{v:.2f}" if v >= 0.1 else f"{v:.3f}" if v >= 0.001 else f"{v:.1e}"


def fmt(v: float | None, spec: str) -> str:
  """format(v, spec), or "-" when `v` is None (a figure that was not
  measured), right-aligned to the spec's width."""
  if v is not None:
    return format(v, spec)
  width = spec.split(".")[0].lstrip("<>^=+- 0")
  if not width.isdigit():
    return "-"
  return "-".ljust(int(width)) if spec.startswith("<") else "-".rjust(int(width))
