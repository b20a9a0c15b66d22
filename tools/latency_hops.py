#!/usr/bin/env python3
"""Where a round trip's time goes, hop by hop (a measurement, not a test; issue 17).

    sudo .venv/bin/python tools/latency_hops.py [--name hops] [--backend udp] [--seconds 3]

Builds `netemu bench`'s two-node cluster (bench-client on node1, bench-server on
node2; named NAME-BACKEND), runs netemu.bench.pingpong's one-byte TCP round
trips between them for SECONDS, and meanwhile captures with tcpdump
(--time-stamp-precision=nano, the kernel's own stamps; veths offer no others)
on docker0, flannel0 (udp only) and eth0 of both nodes. Each one-byte segment is
found at every point by (source, destination, TCP sequence), inside the UDP/8285
datagrams on eth0 too, and the time between two points is one hop:

    docker0 -> flannel0   the node's kernel routes the pod's packet into the TUN
    flannel0 -> eth0      the tx worker: wake-up, read, Python, send
    eth0 -> eth0          the emulated wire (veth, fabric bridge, veth)
    eth0 -> flannel0      the rx worker: wake-up, receive, Python, TUN write
    flannel0 -> docker0   the kernel delivers it to the pod's veth

and at the ends the server's and the client's own turnaround (docker0 to
docker0). Prints median, p90 and p99 per hop in microseconds, then tears the
cluster down. tcpdump itself costs CPU: the round trips run a little slower
than without it (the pingpong figure printed is the one under capture).

Takes the machine's benchmark lock (/run/netemu-bench.lock), as `netemu bench`.
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import signal
import subprocess
import sys
import tempfile
import time

from scapy.layers.inet import IP, TCP, UDP
from scapy.utils import PcapReader

from netemu import names, netns
from netemu.bench import report, runner

POINTS = [("node1", "docker0"), ("node1", "flannel0"), ("node1", "eth0"),
          ("node2", "eth0"), ("node2", "flannel0"), ("node2", "docker0")]


def capture(bc: runner.BenchCluster, folder: str, seconds: float) -> tuple[dict, list[float], list[str]]:
    points = [(node, dev) for node, dev in POINTS if dev != "flannel0" or bc.backend == "udp"]
    procs = []
    for node, dev in points:
        argv = ["tcpdump", "-i", dev, "-n", "-s", "160", "-B", "16384", "--time-stamp-precision=nano",
                "-w", os.path.join(folder, f"{node}-{dev}.pcap"),
                f"tcp port {runner.PINGPONG_PORT} or udp port 8285"]
        procs.append(subprocess.Popen(netns.exec_argv(names.node_ns(bc.name, node), argv),
                                      stderr=subprocess.DEVNULL))
    time.sleep(1.5)                                      # tcpdump's filters in place
    proc = netns.run(bc.ns(runner.CLIENT), [sys.executable, "-m", "netemu.bench.pingpong", "client",
                                            bc.ips[runner.SERVER], str(runner.PINGPONG_PORT), str(seconds)],
                     timeout=seconds + 30)
    rtts = json.loads(proc.stdout)["rtt_us"]
    time.sleep(0.5)
    for p in procs:
        p.send_signal(signal.SIGINT)
        p.wait(timeout=10)
    seen: dict[tuple, dict[str, int]] = {}
    for node, dev in points:
        point = f"{node}-{dev}"
        for pkt in PcapReader(os.path.join(folder, f"{point}.pcap")):
            if IP not in pkt:
                continue
            ip = pkt[IP]
            inner = IP(bytes(ip[UDP].payload)) if UDP in ip and ip[UDP].dport == 8285 else ip
            if TCP not in inner or len(inner[TCP].payload) != 1:
                continue
            seen.setdefault((inner.src, inner.dst, inner[TCP].seq), {}).setdefault(point, int(pkt.time * 10**9))
    return seen, rtts, [f"{node}-{dev}" for node, dev in points]


def hops(seen: dict, order: list[str]) -> list[tuple[str, list[float]]]:
    client, server = order[0], order[-1]
    requests = [k for k, at in seen.items() if client in at and server in at and at[client] < at[server]]
    replies = [k for k, at in seen.items() if client in at and server in at and at[server] < at[client]]
    out = []
    for keys, path in ((requests, order), (replies, order[::-1])):
        for a, b in zip(path, path[1:]):
            out.append((f"{a} -> {b}", [(seen[k][b] - seen[k][a]) / 1000 for k in keys
                                        if a in seen[k] and b in seen[k]]))
    # Turnarounds: a request's arrival at the server's side to the reply leaving,
    # a reply's arrival at the client's side to the next request.
    for label, first, then, point in (("server: request -> reply", requests, replies, server),
                                      ("client: reply -> next request", replies, requests, client)):
        later = sorted(seen[k][point] for k in then)
        gaps = []
        for t in sorted(seen[k][point] for k in first):
            i = bisect.bisect_left(later, t)
            if i < len(later):
                gaps.append((later[i] - t) / 1000)
        out.append((f"{label} ({point})", gaps))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="hops")
    ap.add_argument("--backend", default="udp", choices=["udp", "vxlan", "host-gw"])
    ap.add_argument("--seconds", type=float, default=3.0)
    args = ap.parse_args()
    with runner.exclusive(wait=600), tempfile.TemporaryDirectory() as folder:
        bc = runner.BenchCluster(f"{args.name}-{args.backend.replace('-', '')}", args.backend, 1500)
        try:
            bc.up()
            seen, rtts, order = capture(bc, folder, args.seconds)
        finally:
            bc.down()
    print(f"{args.backend}: {len(rtts)} round trips under capture, p50 {report.percentile(rtts, 50):.1f} us, "
          f"p99 {report.percentile(rtts, 99):.1f} us")
    for label, values in hops(seen, order):
        if values:
            print(f"  {label:44s} n={len(values):6d}  p50 {report.percentile(values, 50):7.1f}  "
                  f"p90 {report.percentile(values, 90):7.1f}  p99 {report.percentile(values, 99):7.1f} us")
    return 0


if __name__ == "__main__":
    sys.exit(main())
