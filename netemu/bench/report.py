"""Pure logic of `netemu bench`: turning tool output into figures, and figures into
the summary (median, min-max, ratio to host-gw in the same round), Markdown and
JSON. No processes, no namespaces: tested without root.

A *sample* is one measurement: (round, backend, test, path, value) plus its
side figures (daemon CPU, retransmits, drops). The ratio of a sample is its value
divided by host-gw's value for the same test, path and round, so that the
machine's noise between rounds cancels out.

CPU cost: around each run the runner reads the machine's busy CPU time
(/proc/stat: user, nice, system, irq, softirq; all CPUs) and the overlay's own
processes' (daemon and workers). `cpu_cost` turns them into cores busy per
Gbit/s (TCP) or per 100 kpps (64-byte UDP): what a user pays for the data path,
the kernel's forwarding included for every backend. The machine figure also
counts iperf3 and whatever else ran on the machine meanwhile (compare it in the
same round).
"""

from __future__ import annotations

import dataclasses
import statistics
from typing import Any

BACKENDS = ("udp", "vxlan", "host-gw")
TESTS = ("tcp", "tcp-parallel", "udp-rate", "latency")
REFERENCE = "host-gw"

# test -> (figure name, unit, higher is better)
FIGURES = {
    "tcp": ("throughput", "Gbit/s", True),
    "tcp-parallel": ("throughput", "Gbit/s", True),
    "udp-rate": ("rate", "kpps", True),
    "latency-p50": ("rtt p50", "µs", False),
    "latency-p99": ("rtt p99", "µs", False),
}


@dataclasses.dataclass
class Sample:
    round: int
    backend: str
    test: str               # tcp, tcp-parallel, udp-rate, latency-p50, latency-p99
    path: str               # "cross-node" or "same-node"
    value: float
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


# test -> (what its CPU cost is per, the figure's value in those units)
COST_UNITS = {"tcp": ("Gbit/s", 1.0), "tcp-parallel": ("Gbit/s", 1.0), "udp-rate": ("100 kpps", 100.0)}


def cpu_busy(stat_text: str) -> float:
    """Busy jiffies of all CPUs from /proc/stat's first line (user, nice, system,
    irq, softirq; not idle, iowait or steal, which is the host's)."""
    fields = stat_text.split("\n", 1)[0].split()
    if not fields or fields[0] != "cpu" or len(fields) < 8:
        raise ValueError("/proc/stat: no cpu line")
    user, nice, system, _idle, _iowait, irq, softirq = (int(x) for x in fields[1:8])
    return float(user + nice + system + irq + softirq)


def cpu_cost(test: str, value: float, seconds: float, machine_cpu_s: float,
             overlay_cpu_s: float) -> dict[str, float]:
    """Cores busy per unit of TEST's figure (see COST_UNITS) over a run of SECONDS
    that reached VALUE: the machine's and the overlay processes' own. Empty for
    tests without a cost unit, or a run that moved nothing."""
    if test not in COST_UNITS or value <= 0 or seconds <= 0:
        return {}
    unit, scale = COST_UNITS[test]
    units = value / scale
    return {"cpu_machine_cores_per_unit": round(machine_cpu_s / seconds / units, 4),
            "cpu_overlay_cores_per_unit": round(overlay_cpu_s / seconds / units, 4)}


# Latency histograms: log-spaced bins from 10 µs to 100 ms, 20 per decade.
HISTOGRAM_EDGES = [round(10 * 10 ** (k / 20), 3) for k in range(81)]


def histogram(values: list[float], edges: list[float] = HISTOGRAM_EDGES) -> list[int]:
    """Counts of VALUES per bin [edges[i], edges[i+1]); below the first edge
    counts in the first bin, at or above the last in the last."""
    import bisect

    counts = [0] * (len(edges) - 1)
    for v in values:
        counts[min(max(bisect.bisect_right(edges, v) - 1, 0), len(counts) - 1)] += 1
    return counts


def parse_list(text: str, known: tuple[str, ...], what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in known]
    if bad or not items:
        raise ValueError(f"unknown {what} {', '.join(bad) or '(none given)'} (known: {', '.join(known)})")
    return list(dict.fromkeys(items))


def iperf_tcp(result: dict) -> tuple[float, int]:
    """(Gbit/s received, retransmits) from `iperf3 -J` of a TCP run."""
    end = result["end"]
    return end["sum_received"]["bits_per_second"] / 1e9, int(end["sum_sent"].get("retransmits", 0))


def iperf_udp_received(result: dict) -> tuple[int, float]:
    """(packets that arrived, seconds) from `iperf3 -u -J` (the client's copy of the
    server's report: sum.packets - sum.lost_packets)."""
    s = result["end"]["sum"]
    return int(s["packets"]) - int(s.get("lost_packets", 0)), float(s["seconds"])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty list."""
    ordered = sorted(values)
    rank = max(1, -(-len(ordered) * q // 100))
    return ordered[int(rank) - 1]


def ratios(samples: list[Sample]) -> dict[int, float]:
    """index in SAMPLES -> value / host-gw's value (same round, test, path)."""
    ref = {(s.round, s.test, s.path): s.value for s in samples if s.backend == REFERENCE}
    out = {}
    for i, s in enumerate(samples):
        base = ref.get((s.round, s.test, s.path))
        if base:
            out[i] = s.value / base
    return out


def summarize(samples: list[Sample]) -> list[dict[str, Any]]:
    """One row per (test, path, backend): median and min-max of value and ratio,
    and the medians of the side figures."""
    r = ratios(samples)
    groups: dict[tuple[str, str, str], list[int]] = {}
    for i, s in enumerate(samples):
        groups.setdefault((s.test, s.path, s.backend), []).append(i)
    rows = []
    for (test, path, backend), idx in groups.items():
        values = [samples[i].value for i in idx]
        rat = [r[i] for i in idx if i in r]
        name, unit, _ = FIGURES[test]
        row = {"test": test, "path": path, "backend": backend, "figure": name, "unit": unit,
               "rounds": len(values), "median": statistics.median(values),
               "min": min(values), "max": max(values)}
        if rat:
            row.update(ratio=statistics.median(rat), ratio_min=min(rat), ratio_max=max(rat))
        keys = sorted({k for i in idx for k in samples[i].extra})
        row["extra"] = {k: statistics.median([samples[i].extra[k] for i in idx if k in samples[i].extra])
                        for k in keys}
        rows.append(row)
    order = {t: n for n, t in enumerate(FIGURES)}
    border = {b: n for n, b in enumerate(BACKENDS)}
    rows.sort(key=lambda x: (order.get(x["test"], 99), x["path"] != "cross-node",
                             border.get(x["backend"], 99)))
    return rows


def fmt(value: float) -> str:
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"


def cells(row: dict[str, Any]) -> list[str]:
    """A summary row as table cells (shared by the Markdown and the terminal table)."""
    ratio = (f"{row['ratio']:.3f}× ({row['ratio_min']:.3f}–{row['ratio_max']:.3f})"
             if "ratio" in row else "")
    extra = row["extra"]
    side = []
    if "cpu_machine_cores_per_unit" in extra:
        unit = COST_UNITS[row["test"]][0]
        side.append(f"CPU {extra['cpu_machine_cores_per_unit']:.3g} cores per {unit} "
                    f"(overlay {extra['cpu_overlay_cores_per_unit']:.3g})")
    if "cpu_daemon_s" in extra:
        side.append(f"daemon CPU {extra['cpu_daemon_s']:.2f} s")
    if extra.get("retransmits"):
        side.append(f"retr {extra['retransmits']:.0f}")
    drops = sum(v for k, v in extra.items() if k.startswith("drop"))
    if drops:
        side.append(f"drops {drops:.0f}")
    return [row["test"], row["path"], row["backend"],
            f"{fmt(row['median'])} {row['unit']}", f"{fmt(row['min'])}–{fmt(row['max'])}", ratio,
            ", ".join(side)]


HEADERS = ["test", "path", "backend", "median", "min–max", "ratio to host-gw", "notes"]


def markdown(rows: list[dict[str, Any]], config: dict[str, Any]) -> str:
    link = config.get("link")
    # Figures over impaired uplinks are not comparable with plain ones: say so first.
    over = (", node uplinks impaired: " + " ".join(f"{k} {v}" for k, v in link.items())) if link else ""
    lines = [f"# netemu bench: underlay MTU {config.get('mtu')}, {config.get('rounds')} rounds "
             f"of {config.get('duration')} s{over}", "",
             "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
    for row in rows:
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells(row)) + " |")
    return "\n".join(lines) + "\n"
