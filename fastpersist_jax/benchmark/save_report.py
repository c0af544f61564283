"""The save benchmark's report: medians over rounds (summarize), the printed
table (print_report), the bar chart (plot), and the JSON file (report)."""

from __future__ import annotations

import sys

from fastpersist_jax.benchmark import common, stats
from fastpersist_jax.benchmark.common import GiB, MiB

CHECKPOINTERS = ("fastpersist", "orbax")
METHODS = CHECKPOINTERS + ("fio",)
LABELS = {"fastpersist": "FastPersist", "orbax": "Orbax Standard", "fio": "fio (disk limit)"}


def summarize(samples: dict) -> dict:
  """Medians over rounds of every figure the report shows.

  Args:
    samples: {method: [result of each round]}: save_child.run_round's
      results for "fastpersist" and "orbax", common.run_fio_pair's for "fio".

  Returns:
    {checkpointer: {"blocking_ms_first", "blocking_ms_steady" (ms),
     "gbps_finished_first", "gbps_synced_first", "gbps_finished",
     "gbps_synced", "restore_gbps" (GB/s, 1e9 bytes/s), "peak_extra_rss_mib",
     "peak_extra_rss_mib_first", "peak_extra_rss_mib_steady",
     "restore_peak_extra_rss_mib", "disk_mib" (MiB, 2**20 bytes),
     "evicted_with": [how the page cache was emptied]}} for each checkpointer
    run, plus "snapshot_modes": {"memcpy_ms", "blocking_ms": {mode: ms},
    "samples": saves per mode} when FastPersist timed them, and "fio":
    {"write_gbps", "read_gbps"} when fio ran.
  """
  out = {}
  for m in CHECKPOINTERS:
    runs = samples.get(m) or []
    if not runs:
      continue
    first = [r["saves"][0] for r in runs]
    steady = [r["saves"][1] for r in runs]
    out[m] = {
        "blocking_ms_first": stats.med([s["blocking_s"] * 1e3 for s in first]),
        "blocking_ms_steady": stats.med([s["blocking_s"] * 1e3 for s in steady]),
        "gbps_finished_first": stats.med([s["gbps_finished"] for s in first]),
        "gbps_synced_first": stats.med([s["gbps_synced"] for s in first]),
        "gbps_finished": stats.med([s["gbps_finished"] for s in steady]),
        "gbps_synced": stats.med([s["gbps_synced"] for s in steady]),
        "restore_gbps": stats.med([r["restore"]["gbps"] for r in runs]),
        "peak_extra_rss_mib_first": stats.med([s["peak_extra_rss_bytes"] / MiB for s in first]),
        "peak_extra_rss_mib_steady": stats.med([s["peak_extra_rss_bytes"] / MiB for s in steady]),
        "peak_extra_rss_mib": stats.med([
            max(a["peak_extra_rss_bytes"], b["peak_extra_rss_bytes"]) / MiB
            for a, b in zip(first, steady)]),
        "restore_peak_extra_rss_mib": stats.med([r["restore"]["peak_extra_rss_bytes"] / MiB
                                                 for r in runs]),
        "disk_mib": stats.med([s["disk_bytes"] / MiB for s in steady]),
        "evicted_with": sorted({r["evicted_with"] for r in runs}),
    }
  fp_runs = samples.get("fastpersist") or []
  modes: dict[str, list[float]] = {}
  for r in fp_runs:
    for mode, times in (r.get("modes") or {}).items():
      modes.setdefault(mode, []).extend(t * 1e3 for t in times)
  memcpy = [r["memcpy_s"] * 1e3 for r in fp_runs if r.get("memcpy_s")]
  if modes and memcpy:
    out["snapshot_modes"] = {
        "memcpy_ms": stats.med(memcpy),
        "blocking_ms": {mode: stats.med(ms) for mode, ms in modes.items()},
        "samples": sum(len(ms) for ms in modes.values()) // len(modes)}
  if samples.get("fio"):
    out["fio"] = {"write_gbps": stats.med([s["write"]["gbps"] for s in samples["fio"]]),
                  "read_gbps": stats.med([s["read"]["gbps"] for s in samples["fio"]])}
  return out


def print_report(info: dict, summary: dict) -> None:
  """Prints the report to stdout: a heading (tree, mesh, directory, versions),
  a table of the medians per method with their ratios to fio, FastPersist /
  Orbax ratios, blocking by snapshot mode against memcpy, and the first
  saves. `info`: the run's description (save_bench.run); `summary`:
  summarize's result."""
  fmt = stats.fmt
  fio = summary.get("fio", {})
  fw, fr = fio.get("write_gbps"), fio.get("read_gbps")
  print()
  print(f"fastpersist save benchmark: {info['tree_bytes'] / GiB:.3f} GiB in {info['leaves']} "
        f"leaves ({info['leaf_kinds']}), {info['devices']} devices mesh "
        f"{info['mesh']}, {info['rounds']} rounds, in {info['dir']} "
        f"({info['fstype']} on {info['device']})")
  print(f"kernel {info['kernel']}, {info['cpus']} CPUs, jax {info['jax']}, orbax "
        f"{info['orbax']}, fio {info['fio'] or 'not run'}"
        f"{' --fixedbufs' if info.get('fio_fixedbufs') else ''}; FastPersist engine "
        f"{info.get('engine', '?')}, snapshot {info.get('snapshot_mode', '?')}; cold restore via "
        f"{', '.join(info['evicted_with']) or '-'}")
  print()
  hdr = (f"{'method':18s} {'blocking ms':>15s} {'save GB/s':>15s} {'synced':>8s} "
         f"{'restore':>8s} {'restore':>8s} {'peak extra':>10s}")
  hdr2 = (f"{'':18s} {'first / steady':>15s} {'fin. / synced':>15s} {'/ fio':>8s} "
          f"{'GB/s':>8s} {'/ fio':>8s} {'RSS MiB':>10s}")
  print(hdr)
  print(hdr2)
  for m in CHECKPOINTERS:
    s = summary.get(m)
    if not s:
      continue
    print(f"{LABELS[m]:18s} "
          f"{fmt(s['blocking_ms_first'], '7.0f') + ' / ' + fmt(s['blocking_ms_steady'], '<5.0f'):>15s} "
          f"{stats.fmt_gbps(s['gbps_finished']) + ' / ' + stats.fmt_gbps(s['gbps_synced']):>15s} "
          f"{fmt(stats.ratio(s['gbps_synced'], fw), '8.2f')} {stats.fmt_gbps(s['restore_gbps']):>8s} "
          f"{fmt(stats.ratio(s['restore_gbps'], fr), '8.2f')} {fmt(s['peak_extra_rss_mib'], '10.0f')}")
  if fio:
    print(f"{LABELS['fio']:18s} {'':>15s} {fmt(fw, '6.2f') + ' (write)':>15s} {1.0:8.2f} "
          f"{fmt(fr, '8.2f')} {1.0:8.2f} {'':>10s}")
  fp, ob = summary.get("fastpersist"), summary.get("orbax")
  if fp and ob:
    print()
    print("FastPersist / Orbax (medians): "
          f"blocking steady {fmt(stats.ratio(fp['blocking_ms_steady'], ob['blocking_ms_steady']), '.2f')}, "
          f"blocking first {fmt(stats.ratio(fp['blocking_ms_first'], ob['blocking_ms_first']), '.2f')}, "
          f"save until finished {fmt(stats.ratio(fp['gbps_finished'], ob['gbps_finished']), '.2f')}, "
          f"save until synced {fmt(stats.ratio(fp['gbps_synced'], ob['gbps_synced']), '.2f')}, "
          f"restore {fmt(stats.ratio(fp['restore_gbps'], ob['restore_gbps']), '.2f')}, "
          f"peak extra RSS {fmt(stats.ratio(fp['peak_extra_rss_mib'], ob['peak_extra_rss_mib']), '.2f')}")
  modes = summary.get("snapshot_modes")
  if modes:
    memcpy = modes["memcpy_ms"]
    print()
    print(f"FastPersist save() blocking by snapshot mode (steady, median of {modes['samples']} "
          f"saves), against one single-threaded memcpy of the tree: {memcpy:.0f} ms "
          f"({info['tree_bytes'] / memcpy / 1e6:.1f} GB/s):")
    targets = {"copy": f"target <= 1.2 x memcpy = {1.2 * memcpy:.0f} ms",
               "reference": "target <= 20 ms"}
    for mode, ms in modes["blocking_ms"].items():
      print(f"  {mode:10s} {fmt(ms, '7.1f')} ms = {fmt(stats.ratio(ms, memcpy), '.2f')} x memcpy"
            f"   {targets.get(mode, '')}")
  if not (fp or ob):
    return
  print()
  print("save GB/s are the steady-state (second) save in each child; first saves (GB/s "
        "finished / synced, peak extra RSS MiB):")
  for m in CHECKPOINTERS:
    s = summary.get(m)
    if s:
      print(f"  {LABELS[m]:18s} {stats.fmt_gbps(s['gbps_finished_first'])} / "
            f"{stats.fmt_gbps(s['gbps_synced_first'])}, RSS {fmt(s['peak_extra_rss_mib_first'], '.0f')}"
            f" (steady {fmt(s['peak_extra_rss_mib_steady'], '.0f')}); restore peak extra RSS "
            f"{fmt(s['restore_peak_extra_rss_mib'], '.0f')} MiB; on disk "
            f"{fmt(s['disk_mib'], '.0f')} MiB")
  print("(GB/s = 1e9 bytes/s of logical tree bytes; finished = save() start to "
        "wait_until_finished(); synced = to the end of a following os.sync(); fio write uses "
        "--end_fsync=1; peak extra RSS = VmHWM during the save minus RSS after building the tree)")


def plot(path: str, summary: dict, info: dict) -> bool:
  """Writes a PNG bar chart of `summary` to `path`: save and restore GB/s
  with fio's as lines, blocking ms of first and steady saves, and (when
  measured) blocking by snapshot mode. Returns False, with a note on stderr,
  when matplotlib is missing or no checkpointer ran."""
  plt = common.pyplot()
  if plt is None:
    return False
  methods = [m for m in CHECKPOINTERS if m in summary]
  if not methods:
    print("note: no checkpointer was run; no plot written", file=sys.stderr)
    return False
  colors = {"fastpersist": "tab:blue", "orbax": "tab:orange"}
  modes = summary.get("snapshot_modes")
  if modes:
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 5),
                                        gridspec_kw={"width_ratios": [3, 2, 2]})
    _plot_modes(ax3, modes, colors["fastpersist"])
  else:
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 5), gridspec_kw={"width_ratios": [3, 2]})
  groups = [("save\n(until finished)", "gbps_finished"), ("save\n(until synced)", "gbps_synced"),
            ("restore\n(cold cache)", "restore_gbps")]
  width = 0.8 / max(1, len(methods))
  for j, m in enumerate(methods):
    xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(len(groups))]
    vals = [summary[m][key] or 0 for _, key in groups]
    bars = ax1.bar(xs, vals, width, label=LABELS[m], color=colors[m])
    ax1.bar_label(bars, fmt="%.2f", fontsize=8)
  fio = summary.get("fio")
  if fio:
    for i, (key, label) in ((0, ("write_gbps", "fio write")), (1, ("write_gbps", "fio write")),
                            (2, ("read_gbps", "fio read"))):
      ax1.hlines(fio[key], i - 0.45, i + 0.45, colors="black", linestyles="--", linewidth=1.5)
      ax1.annotate(f"{label} {fio[key]:.2f}", (i + 0.45, fio[key]), textcoords="offset points",
                   xytext=(0, 3), ha="right", va="bottom", fontsize=8,
                   bbox={"boxstyle": "round,pad=0.15", "fc": "white", "ec": "none", "alpha": 0.8})
  ax1.set_xticks(range(len(groups)), [g for g, _ in groups])
  ax1.set_ylabel("GB/s (1e9 bytes/s), median")
  top = max([summary[m][k] or 0 for m in methods for _, k in groups] +
            ([fio["write_gbps"], fio["read_gbps"]] if fio else []))
  ax1.set_ylim(0, top * 1.2)
  ax1.set_title(f"{info['tree_bytes'] / GiB:.2f} GiB, {info['leaves']} leaves, "
                f"{info['devices']} devices; median of {info['rounds']}")
  ax1.legend(loc="upper right", fontsize=8)

  width = 0.8 / max(1, len(methods))
  for j, m in enumerate(methods):
    xs = [i + (j - (len(methods) - 1) / 2) * width for i in range(2)]
    vals = [summary[m]["blocking_ms_first"] or 0, summary[m]["blocking_ms_steady"] or 0]
    bars = ax2.bar(xs, vals, width, label=LABELS[m], color=colors[m])
    ax2.bar_label(bars, fmt="%.0f", fontsize=8)
  ax2.set_xticks(range(2), ["first save", "steady save"])
  ax2.set_ylabel("blocking time of save() (ms), median")
  ax2.set_title("blocking time (lower is better)")
  ms = [summary[m][k] for m in methods for k in ("blocking_ms_first", "blocking_ms_steady")
        if summary[m][k]]
  if ms and max(ms) / min(ms) > 20:  # keep the small bars visible
    ax2.set_yscale("log")
    ax2.set_ylim(min(ms) / 2, max(ms) * 3)
    ax2.set_ylabel("blocking time of save() (ms, log scale), median")
  elif ms:
    ax2.set_ylim(0, max(ms) * 1.15)
  ax2.legend(fontsize=8)
  fig.suptitle(f"FastPersist (snapshot {info.get('snapshot_mode', '?')}) vs Orbax: "
               f"{info['fstype']} on {info['device']}, {info['cpus']} CPUs", fontsize=10)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return True


def _plot_modes(ax, modes: dict, color: str) -> None:
  """FastPersist's steady blocking per snapshot mode against the memcpy yardstick."""
  names = list(modes["blocking_ms"])
  vals = [modes["blocking_ms"][m] or 0 for m in names]
  bars = ax.bar(range(len(names)), vals, 0.6, color=color)
  ax.bar_label(bars, fmt="%.1f", fontsize=8)
  memcpy = modes["memcpy_ms"]
  for y, label, style in ((memcpy, f"1 memcpy of the tree {memcpy:.0f} ms", "--"),
                          (1.2 * memcpy, "copy target 1.2 x memcpy", ":"),
                          (20.0, "reference target 20 ms", "-.")):
    ax.axhline(y, color="black", linestyle=style, linewidth=1)
    ax.text(0.98, y, label, transform=ax.get_yaxis_transform(), ha="right", va="bottom",
            fontsize=7)
  ax.set_xticks(range(len(names)), names)
  ax.set_ylim(0, max(vals + [1.2 * memcpy]) * 1.2)
  ax.set_ylabel("FastPersist save() blocking (ms), median")
  ax.set_title(f"blocking by snapshot mode (median of {modes['samples']})")


def report(info: dict, samples: dict, spec: list[dict], json_path: str | None,
           plot_path: str | None) -> int:
  """Summarizes `samples`, completes `info` (evicted_with, engine,
  snapshot_mode), prints the report, and writes {"info", "summary",
  "samples", "tree": spec} to `json_path` and the chart to `plot_path` when
  given. Returns the exit status, 0."""
  summary = summarize(samples)
  info["evicted_with"] = sorted({e for m in CHECKPOINTERS if m in summary
                                 for e in summary[m]["evicted_with"]})
  if samples.get("fastpersist"):
    info["engine"] = samples["fastpersist"][0].get("engine")
    modes = sorted({str(s.get("handler_stats", {}).get("snapshot_mode", "?"))
                    for r in samples["fastpersist"] for s in r["saves"]})
    info["snapshot_mode"] = ",".join(modes)
  if not all(r.get("rss_peak_resettable") for m in CHECKPOINTERS for r in samples.get(m, [])):
    print("note: /proc/self/clear_refs was not writable; peaks are since the child started",
          file=sys.stderr)
  print_report(info, summary)
  if json_path:
    common.write_json(json_path, {"info": info, "summary": summary, "samples": samples,
                                  "tree": spec})
    print(f"\nwrote {json_path}")
  if plot_path and summary and plot(plot_path, summary, info):
    print(f"wrote {plot_path}")
  return 0

