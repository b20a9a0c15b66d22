"""A short `netemu bench` run produces well-formed results (no timing assertions)."""

from __future__ import annotations

import fcntl
import json
import os

import pytest

from netemu.bench import runner

from .clusters import assert_gone

pytestmark = [pytest.mark.root]


@pytest.mark.timeout(240)
def test_bench_smoke_writes_json_markdown_and_png(tmp_path):
    opts = runner.Options(backends=["udp", "host-gw"], tests=["tcp", "udp-rate", "latency"], rounds=1,
                          duration=1, output=str(tmp_path), prefix="hb-bt",
                          lock_wait=60)   # other engineers' benchmarks take the same lock
    steps = []
    kubeconfig = os.environ["KUBECONFIG"]           # the session's own (tests/conftest.py)
    before = open(kubeconfig).read() if os.path.exists(kubeconfig) else None
    runner.run(opts, on_step=steps.append)
    assert len(steps) == len(runner.plan(opts)) == 8
    results = json.loads((tmp_path / "bench.json").read_text())
    assert results["config"]["mtu"] == 1500 and results["failures"] == []
    got = {(r["test"], r["path"], r["backend"]) for r in results["summary"]}
    for backend in ("udp", "host-gw"):
        for test in ("tcp", "udp-rate", "latency-p50", "latency-p99"):
            assert (test, "cross-node", backend) in got
        assert ("tcp", "same-node", backend) in got
    for row in results["summary"]:
        assert row["median"] > 0 and row["min"] <= row["median"] <= row["max"]
        assert row["ratio"] > 0
    udp_tcp = next(s for s in results["samples"] if s["backend"] == "udp" and s["test"] == "tcp")
    assert "cpu_node1_tx_s" in udp_tcp["extra"] and "drop_udp_rcvbuf_node2" in udp_tcp["extra"]
    md = (tmp_path / "bench.md").read_text().splitlines()
    assert md[2].startswith("| test |") and len(md) == 4 + len(results["summary"])
    assert (tmp_path / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # built and torn down through the Python API (netemu.up, Cluster.down): nothing left
    for backend in ("udp", "hostgw"):
        assert_gone(f"hb-bt-{backend}")
    # throw-away clusters (netemu.up(kubeconfig=False)): the kubeconfig is not even written
    assert (open(kubeconfig).read() if os.path.exists(kubeconfig) else None) == before


def test_bench_refuses_to_run_beside_another(tmp_path):
    lock = tmp_path / "bench.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        with pytest.raises(runner.BenchError, match="another benchmark"):
            with runner.exclusive(str(lock)):
                pass
    with runner.exclusive(str(lock)):
        pass
