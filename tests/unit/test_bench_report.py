"""netemu.bench.report: figures from tool output, medians and same-round ratios."""

from __future__ import annotations

import pytest

from netemu.bench import report
from netemu.bench.report import Sample


def test_ratio_is_taken_against_host_gw_of_the_same_round():
    samples = [Sample(0, "udp", "tcp", "cross-node", 1.0), Sample(0, "host-gw", "tcp", "cross-node", 10.0),
               Sample(1, "udp", "tcp", "cross-node", 4.0), Sample(1, "host-gw", "tcp", "cross-node", 20.0),
               Sample(2, "udp", "tcp", "cross-node", 3.0), Sample(2, "host-gw", "tcp", "cross-node", 10.0)]
    rows = {r["backend"]: r for r in report.summarize(samples)}
    assert rows["udp"]["ratio"] == pytest.approx(0.2)          # median of 0.1, 0.2, 0.3
    assert (rows["udp"]["ratio_min"], rows["udp"]["ratio_max"]) == pytest.approx((0.1, 0.3))
    assert (rows["udp"]["median"], rows["udp"]["min"], rows["udp"]["max"]) == (3.0, 1.0, 4.0)
    assert rows["host-gw"]["ratio"] == 1.0


def test_summary_order_and_markdown():
    samples = [Sample(0, b, t, "cross-node", 2.0, {"cpu_daemon_s": 1.5, "drop_x": 3})
               for t in ("latency-p50", "tcp") for b in ("host-gw", "udp")]
    rows = report.summarize(samples)
    assert [(r["test"], r["backend"]) for r in rows] == [("tcp", "udp"), ("tcp", "host-gw"),
                                                         ("latency-p50", "udp"), ("latency-p50", "host-gw")]
    md = report.markdown(rows, {"mtu": 1500, "rounds": 1, "duration": 2})
    lines = md.splitlines()
    assert lines[2].startswith("| test |") and len(lines) == 4 + len(rows)
    assert "daemon CPU 1.50 s" in md and "drops 3" in md
    assert "impaired" not in lines[0]
    md = report.markdown(rows, {"mtu": 1500, "rounds": 1, "duration": 2, "link": {"delay": "1ms", "loss": "0.1%"}})
    assert md.splitlines()[0].endswith(", node uplinks impaired: delay 1ms loss 0.1%")


def test_iperf_parsing_and_percentile():
    tcp = {"end": {"sum_received": {"bits_per_second": 2.5e9}, "sum_sent": {"retransmits": 4}}}
    assert report.iperf_tcp(tcp) == (2.5, 4)
    udp = {"end": {"sum": {"packets": 1000, "lost_packets": 100, "seconds": 2.0}}}
    assert report.iperf_udp_received(udp) == (900, 2.0)
    assert report.percentile(list(range(1, 101)), 50) == 50
    assert report.percentile(list(range(1, 101)), 99) == 99
    assert report.percentile([7.0], 99) == 7.0


def test_parse_list_rejects_unknown_names():
    assert report.parse_list("udp, host-gw,udp", report.BACKENDS, "backend") == ["udp", "host-gw"]
    with pytest.raises(ValueError, match="unknown backend geneve"):
        report.parse_list("udp,geneve", report.BACKENDS, "backend")


def test_machine_cpu_is_busy_time_without_idle_iowait_or_steal():
    stat = "cpu  100 5 50 9000 40 3 7 11 0 0\ncpu0 50 2 25 4500 20 1 3 5 0 0\n"
    assert report.cpu_busy(stat) == 100 + 5 + 50 + 3 + 7
    with pytest.raises(ValueError):
        report.cpu_busy("intr 1 2 3\n")


def test_cpu_cost_is_cores_per_gbit_and_per_100_kpps():
    # 10 s of TCP at 2 Gbit/s with 15 CPU-seconds busy machine-wide, 4 of them the overlay's
    cost = report.cpu_cost("tcp", 2.0, 10.0, 15.0, 4.0)
    assert cost == {"cpu_machine_cores_per_unit": 0.75, "cpu_overlay_cores_per_unit": 0.2}
    # 64-byte UDP at 50 kpps: per 100 kpps, twice the cores per kpps
    cost = report.cpu_cost("udp-rate", 50.0, 10.0, 10.0, 5.0)
    assert cost == {"cpu_machine_cores_per_unit": 2.0, "cpu_overlay_cores_per_unit": 1.0}
    assert report.cpu_cost("latency-p50", 100.0, 10.0, 1.0, 1.0) == {}
    assert report.cpu_cost("tcp", 0.0, 10.0, 1.0, 1.0) == {}


def test_cpu_cost_shows_in_the_notes_with_its_unit():
    samples = [Sample(0, b, t, "cross-node", 2.0, report.cpu_cost(t, 2.0, 1.0, 1.0, 0.5 if b == "udp" else 0))
               for t in ("tcp", "udp-rate") for b in ("host-gw", "udp")]
    md = report.markdown(report.summarize(samples), {"mtu": 1500, "rounds": 1, "duration": 1})
    assert "CPU 0.5 cores per Gbit/s (overlay 0.25)" in md
    assert "CPU 50 cores per 100 kpps (overlay 25)" in md
    assert "CPU 0.5 cores per Gbit/s (overlay 0)" in md


def test_latency_histogram_bins_are_log_spaced_and_catch_everything():
    edges = report.HISTOGRAM_EDGES
    assert edges[0] == 10 and edges[20] == 100 and edges[-1] == 100_000
    counts = report.histogram([1, 10, 11, 99.9, 100, 250, 1e9])
    assert sum(counts) == 7 and len(counts) == len(edges) - 1
    assert counts[0] == 3                        # 1 (below the first edge), 10, 11
    assert counts[19] == 1 and counts[20] == 1   # 99.9 just under 100, 100 on its edge
    assert counts[-1] == 1                       # beyond the last edge


def test_the_png_has_the_latency_distribution_beside_the_bars(tmp_path):
    pytest.importorskip("matplotlib")
    from netemu.bench import plot

    samples = [Sample(0, b, t, "cross-node", v) for b, v in (("udp", 200.0), ("host-gw", 90.0))
               for t in ("latency-p50", "latency-p99")]
    rows = report.summarize(samples)
    hist = {"edges_us": report.HISTOGRAM_EDGES,
            "counts": {"udp": report.histogram([200.0] * 50 + [900.0]), "host-gw": report.histogram([90.0] * 60)}}
    with_hist, without = tmp_path / "a.png", tmp_path / "b.png"
    plot.draw(rows, {"mtu": 1500, "rounds": 1}, str(with_hist), hist)
    plot.draw(rows, {"mtu": 1500, "rounds": 1}, str(without))
    from PIL import Image
    wide, narrow = Image.open(with_hist).size, Image.open(without).size
    assert wide[0] == 2 * narrow[0]              # one more 5-inch panel


def test_name_prefix_must_make_cluster_names_up_takes():
    from netemu.bench import cli
    assert cli.check_prefix("su-b") == "su-b"
    for bad, words in (("Upper", "lowercase DNS label"), ("a-very-long-prefix", "at most 20"),
                       ("x-node", 'segment "node"')):
        with pytest.raises(ValueError) as err:
            cli.check_prefix(bad)
        assert words in str(err.value) and "--name-prefix" in str(err.value)
