#!/usr/bin/env python3
"""One cluster on 1 machine against the same cluster split over 2 and 4
(a benchmark, not a test; issue 15).

    sudo .venv/bin/python tools/bench_machines.py [--nodes 20] [--machines 1,2,4] [--rounds 3]
                                                  [--backend udp] [--seconds 5] [--wait-lock]
                                                  [--cpu] [--prefix bm]

Machines are simulated here as the tests simulate them
(tests/integration/simmachines.py: a network and a mount namespace each, veths
to a switch namespace, a real etcd on the first), so what differs between the
runs is the split alone: every run keeps its state in etcd, and the 1-machine
run is a cluster with `machines: [a]`. Nodes are placed by netemu's placer
(evenly). One pod per node. Per machine count, per round:

  - up: `netemu up` on machine a, then `netemu join` on every other machine
    at once; the wall time until the last one returns (every node Ready,
    every pod Running and ready), and `down` from machine a;
  - pod to pod between two nodes on machine a ("within") and, with more
    than one machine, between a node on a and one on b ("across": the
    flannel backend inside the machines' VXLAN tunnel): iperf3 TCP, one
    stream, --seconds long, and ping round trips (200 at 10 ms, median and
    p99). "across / within" is what the machine tunnel costs.

With --cpu, also the machine's CPU over each iperf3 run (/proc/stat: user,
system, irq and softirq of every CPU, from the client's start to its end),
as CPU seconds per Gbit received (= cores busy per Gbit/s): every simulated
machine shares this machine's CPUs, so this is the whole path's cost, both
ends, both machines, the switch, and whatever else runs here meanwhile.

The store's own write and watch latency, SQLite against etcd, is
tools/bench_store.py's. Figures: median and spread (min-max) over the rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from tests.integration.simmachines import SimEtcd, SimNetwork  # noqa: E402
from tools.bench_up import take_lock  # noqa: E402

MACHINE_NAMES = "abcdefgh"


def write_topology(path: str, name: str, nodes: int, machines: list, backend: str) -> str:
    body = {"name": name, "cluster": {"backend": backend},
            "machines": [{"name": m.name, "address": m.address} for m in machines],
            "nodes": [{"name": f"n{i + 1}"} for i in range(nodes)],
            "workloads": [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i + 1}"},
                           "spec": {"nodeName": f"n{i + 1}",
                                    "containers": [{"name": "c", "image": "nginx"}]}} for i in range(nodes)]}
    with open(path, "w") as f:
        yaml.safe_dump(body, f)
    return path


def placement(a, name: str) -> dict[str, str]:
    """node -> machine, from the Node objects' netemu.io/machine label."""
    nodes = json.loads(a.netemu("get", "nodes", "-o", "json", "--cluster", name).stdout)["items"]
    return {n["metadata"]["name"]: n["metadata"]["labels"]["netemu.io/machine"] for n in nodes}


def pod_ip(a, name: str, pod: str) -> str:
    return json.loads(a.netemu("get", "pod", pod, "-o", "json", "--cluster", name).stdout)["status"]["podIP"]


def cpu_times() -> dict[str, float]:
    """Seconds every CPU together has spent, by kind (/proc/stat's first line;
    guest time is in user already, steal and iowait are not ours)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:8]]
    hz = os.sysconf("SC_CLK_TCK")
    return {"user": (v[0] + v[1]) / hz, "system": v[2] / hz, "irq": v[5] / hz, "softirq": v[6] / hz}


def pair(machine, other, name: str, client: str, server: str, server_ip: str, seconds: float) -> dict:
    """iperf3 (one TCP stream) and ping from pod CLIENT (on MACHINE) to pod
    SERVER (on OTHER) at SERVER_IP."""
    srv = subprocess.Popen(other.argv(["ip", "netns", "exec", f"{name}-pod-{server}", "iperf3", "-s", "-1"]),
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        before = cpu_times()
        out = machine.run("ip", "netns", "exec", f"{name}-pod-{client}", "iperf3", "-c", server_ip, "-t",
                          str(seconds), "-J", timeout=seconds + 30).stdout
        cpu = {k: v - before[k] for k, v in cpu_times().items()}
        received = json.loads(out)["end"]["sum_received"]
        gbps = received["bits_per_second"] / 1e9
    finally:
        srv.kill()
        srv.wait()
    rtts = _rtts(machine, name, client, server_ip)
    gbit = received["bytes"] * 8 / 1e9
    return {"gbps": gbps, "rtt_p50_us": _pct(rtts, 50), "rtt_p99_us": _pct(rtts, 99), "pings_lost": 200 - len(rtts),
            "cpu_s": {k: round(v, 3) for k, v in cpu.items()}, "cpu_s_per_gbit": sum(cpu.values()) / gbit}


def _rtts(machine, name: str, client: str, ip: str) -> list[float]:
    out = machine.run("ip", "netns", "exec", f"{name}-pod-{client}", "ping", "-n", "-c", "200", "-i", "0.01",
                      ip, timeout=60, check=False).stdout
    return [float(w.split("=")[1]) * 1000 for line in out.splitlines() for w in line.split()
            if w.startswith("time=")]


def _pct(values: list[float], p: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def one_round(count: int, nodes: int, backend: str, seconds: float, tmp: str, prefix: str = "bm") -> dict:
    tag = f"{prefix}{uuid.uuid4().hex[:4]}"
    name = f"{prefix}{count}-{uuid.uuid4().hex[:3]}"
    with SimNetwork(tag, list(MACHINE_NAMES[:count])) as net:
        etcd = SimEtcd(net.machines[0], os.path.join(tmp, f"etcd-{tag}")).start()
        a, others = net.machines[0], net.machines[1:]
        path = write_topology(os.path.join(tmp, f"{name}.yaml"), name, nodes, net.machines, backend)
        try:
            start = time.monotonic()
            a.netemu("up", path, "--store", etcd.endpoint, "-q", timeout=900)
            up_a = time.monotonic() - start
            joins = [subprocess.Popen(m.argv([sys.executable, "-m", "netemu.cli", "join", "--store",
                                              etcd.endpoint, "--machine", m.name, "-q"]),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                     for m in others]
            for m, j in zip(others, joins):
                _, err = j.communicate(timeout=900)
                if j.returncode != 0:
                    raise RuntimeError(f"join on machine {m.name}: {err.strip()}")
            up = time.monotonic() - start
            where = placement(a, name)
            on = {m.name: sorted((n for n, w in where.items() if w == m.name), key=lambda n: int(n[1:]))
                  for m in net.machines}
            # n1 is the API server's node (on a): its pod only when a has no two others
            local = ([n for n in on["a"] if n != "n1"] + ["n1"])[:2]
            result = {"machines": count, "up_s": up, "up_first_s": up_a}
            if len(local) == 2:
                result["within"] = pair(a, a, name, "p" + local[0][1:], "p" + local[1][1:],
                                        pod_ip(a, name, "p" + local[1][1:]), seconds)
            if others:
                far = on[others[0].name][0]
                result["across"] = pair(a, others[0], name, "p" + local[0][1:], "p" + far[1:],
                                        pod_ip(a, name, "p" + far[1:]), seconds)
            start = time.monotonic()
            a.netemu("down", name, timeout=600)
            result["down_s"] = time.monotonic() - start
            return result
        finally:
            for m in reversed(net.machines):
                m.netemu("clean", name, check=False, timeout=300)
            etcd.stop()


def summary(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    return f"{statistics.median(values):.3g} ({min(values):.3g}-{max(values):.3g})"


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--machines", default="1,2,4", help="machine counts to compare, comma-separated")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="udp", choices=["udp", "vxlan", "host-gw"])
    ap.add_argument("--seconds", type=float, default=5.0, help="iperf3 duration per pair")
    ap.add_argument("--wait-lock", action="store_true", help="wait for another benchmark to finish")
    ap.add_argument("--cpu", action="store_true",
                    help="also the machine's CPU seconds per Gbit over each iperf3 run (/proc/stat)")
    ap.add_argument("--prefix", default="bm", help="start of the clusters' and namespaces' names")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (it builds namespaces)")
    counts = [int(c) for c in args.machines.split(",")]
    if any(c < 1 or c > len(MACHINE_NAMES) for c in counts):
        sys.exit(f"--machines: counts from 1 to {len(MACHINE_NAMES)}")
    if not args.prefix.isalnum() or not args.prefix.islower() or len(args.prefix) > 4:
        sys.exit("--prefix: up to 4 lower-case letters or digits")
    _lock = take_lock(args.wait_lock)
    results: dict[int, list[dict]] = {c: [] for c in counts}
    with tempfile.TemporaryDirectory(prefix="bench-machines-") as tmp:
        for r in range(args.rounds):
            for c in counts:                  # interleaved: the machine's noise falls on all alike
                res = one_round(c, args.nodes, args.backend, args.seconds, tmp, args.prefix)
                results[c].append(res)
                print(f"round {r + 1} machines {c}: " + json.dumps(res), flush=True)
    print(f"\n{args.nodes} nodes, {args.backend}, median (min-max) of {args.rounds} rounds")
    print(f"{'machines':>8}  {'up s':>18}  {'down s':>18}  {'within Gbit/s':>18}  {'across Gbit/s':>18}"
          f"  {'across/within':>13}  {'rtt within us':>18}  {'rtt across us':>18}")
    for c, rs in results.items():
        ratio = [x["across"]["gbps"] / x["within"]["gbps"] for x in rs if "across" in x and "within" in x]
        print(f"{c:>8}  {summary([x['up_s'] for x in rs]):>18}  {summary([x['down_s'] for x in rs]):>18}  "
              f"{summary([x.get('within', {}).get('gbps') for x in rs]):>18}  "
              f"{summary([x.get('across', {}).get('gbps') for x in rs]):>18}  {summary(ratio):>13}  "
              f"{summary([x.get('within', {}).get('rtt_p50_us') for x in rs]):>18}  "
              f"{summary([x.get('across', {}).get('rtt_p50_us') for x in rs]):>18}")
    if args.cpu:
        print(f"\nmachine CPU s per Gbit received (= cores per Gbit/s), median (min-max); "
              f"{os.cpu_count()} CPUs shared by every simulated machine")
        print(f"{'machines':>8}  {'within':>18}  {'across':>18}  {'across/within':>13}")
        for c, rs in results.items():
            ratio = [x["across"]["cpu_s_per_gbit"] / x["within"]["cpu_s_per_gbit"]
                     for x in rs if "across" in x and "within" in x]
            print(f"{c:>8}  {summary([x.get('within', {}).get('cpu_s_per_gbit') for x in rs]):>18}  "
                  f"{summary([x.get('across', {}).get('cpu_s_per_gbit') for x in rs]):>18}  {summary(ratio):>13}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
