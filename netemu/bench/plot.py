"""The PNG of `netemu bench`: cross-node throughput and latency per backend
(median bars, min-max whiskers), and beside them the distribution of every
cross-node round trip of the latency test per backend (all rounds, log-spaced
bins), drawn with matplotlib's file-only Agg backend."""

from __future__ import annotations

from typing import Any


def draw(rows: list[dict[str, Any]], config: dict[str, Any], path: str,
         histograms: dict[str, Any] | None = None) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("Throughput, cross-node (Gbit/s)", ["tcp", "tcp-parallel"]),
              ("Packet rate, 64 B, cross-node (kpps)", ["udp-rate"]),
              ("Latency, cross-node (µs)", ["latency-p50", "latency-p99"])]
    panels = [(t, tests) for t, tests in panels if any(r["test"] in tests for r in rows)]
    counts = {b: c for b, c in ((histograms or {}).get("counts") or {}).items() if sum(c)}
    n = max(1, len(panels) + bool(counts))
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    backends = list(dict.fromkeys(r["backend"] for r in rows))
    for ax, (title, tests) in zip(axes[0], panels):
        width = 0.8 / len(tests)
        for k, test in enumerate(tests):
            got = {r["backend"]: r for r in rows if r["test"] == test and r["path"] == "cross-node"}
            if not got:
                continue                  # a test not run: no bar, no legend entry
            xs = [i + k * width for i, b in enumerate(backends) if b in got]
            meds = [got[b]["median"] for b in backends if b in got]
            errs = [[got[b]["median"] - got[b]["min"] for b in backends if b in got],
                    [got[b]["max"] - got[b]["median"] for b in backends if b in got]]
            ax.bar(xs, meds, width, yerr=errs, capsize=3, label=test)
        ax.set_xticks([i + width * (len(tests) - 1) / 2 for i in range(len(backends))], backends)
        ax.set_title(title, fontsize=10)
        ax.legend(fontsize=8)
    if counts:
        ax, edges = axes[0][len(panels)], histograms["edges_us"]
        for backend, c in counts.items():
            total = sum(c)
            ax.stairs([x / total for x in c], edges, label=f"{backend} ({total} round trips)")
        ax.set_xscale("log")
        ax.set_xlabel("round trip (µs)", fontsize=9)
        ax.set_ylabel("fraction of round trips", fontsize=9)
        ax.set_title("Latency distribution, cross-node", fontsize=10)
        ax.legend(fontsize=8)
    fig.suptitle(f"netemu bench — underlay MTU {config.get('mtu')}, {config.get('rounds')} rounds, "
                 f"kernel {config.get('kernel')}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
