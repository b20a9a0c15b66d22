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
