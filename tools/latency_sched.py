#!/usr/bin/env python3
"""What each process carrying a round trip spends, from the scheduler (a measurement, not a test; issue 17).

    sudo .venv/bin/python tools/latency_sched.py [--name hsched] [--backend udp] [--seconds 2]

Builds `netemu bench`'s two-node cluster (bench-client on node1, bench-server on
node2; named NAME-BACKEND), runs netemu.bench.pingpong's one-byte TCP round
trips between them, and meanwhile records the scheduler's events on all CPUs
for SECONDS (`perf sched record`). Then, per process on the round trip's path
(the client and server pods' pingpong, and for udp the four workers in the
order the request and its reply meet them), from `perf sched timehist`: wake-ups
per second, the delay from wake-up to running, the time it then runs before it
sleeps again, and the CPUs it ran on (netemu.bench.sched says what each means).

tools/latency_hops.py tells where a packet is when (tcpdump's stamps, which wake
tcpdump too); this tells what the processes carrying it spend. Recording costs:
the round trips under it are slower than without (both figures are printed: the
run before the recording starts is the one without).

Takes the machine's benchmark lock (/run/netemu-bench.lock), as `netemu bench`.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

from netemu import netns
from netemu.bench import report, runner, sched


def pingpong(bc: runner.BenchCluster, seconds: float) -> subprocess.Popen:
    argv = [sys.executable, "-m", "netemu.bench.pingpong", "client", bc.ips[runner.SERVER],
            str(runner.PINGPONG_PORT), str(seconds)]
    return subprocess.Popen(netns.exec_argv(bc.ns(runner.CLIENT), argv), stdout=subprocess.PIPE, text=True)


def rtt_line(proc: subprocess.Popen) -> str:
    out, _ = proc.communicate(timeout=120)
    rtts = json.loads(out)["rtt_us"]
    p50, p99 = report.percentile(rtts, 50), report.percentile(rtts, 99)
    return f"{len(rtts)} round trips, p50 {p50:.1f} us, p99 {p99:.1f} us"


def roles(bc: runner.BenchCluster, client: int) -> dict[str, int]:
    """label -> pid of the processes a request and its reply meet, in order."""
    server_ns = os.stat(netns.path(bc.ns(runner.SERVER))).st_ino
    server = 0
    for proc in bc.servers:
        try:
            with open(f"/proc/{proc.pid}/cmdline", "rb") as f:
                cmdline = f.read()
            same_ns = os.readlink(f"/proc/{proc.pid}/ns/net") == f"net:[{server_ns}]"
        except OSError:
            continue
        if b"netemu.bench.pingpong" in cmdline and same_ns:
            server = proc.pid
    workers: dict[tuple[str, str], int] = {}
    for node, stats in bc.daemon_stats().items():
        for child in runner.children(stats.get("pid") or 0):
            role = runner.worker_role(child)
            if role in ("tx", "rx"):
                workers[(node, role)] = child
    order = [("client pod", client)]
    order += [(f"{n} {r} worker", workers[(n, r)]) for n, r in (("node1", "tx"), ("node2", "rx")) if (n, r) in workers]
    order += [("server pod", server)]
    order += [(f"{n} {r} worker", workers[(n, r)]) for n, r in (("node2", "tx"), ("node1", "rx")) if (n, r) in workers]
    return dict(order)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--name", default="hsched")
    ap.add_argument("--backend", default="udp", choices=["udp", "vxlan", "host-gw"])
    ap.add_argument("--seconds", type=float, default=2.0, help="seconds of recording")
    args = ap.parse_args()
    with runner.exclusive(wait=600), tempfile.TemporaryDirectory() as folder:
        bc = runner.BenchCluster(f"{args.name}-{args.backend.replace('-', '')}", args.backend, 1500)
        try:
            bc.up()
            plain = rtt_line(pingpong(bc, 3))
            client = pingpong(bc, args.seconds + 2)
            time.sleep(1)
            data = os.path.join(folder, "sched.data")
            subprocess.run(["perf", "sched", "record", "-q", "-o", data, "--", "sleep", str(args.seconds)],
                           check=True, capture_output=True)
            traced = rtt_line(client)
            who = roles(bc, client.pid)
        finally:
            bc.down()
        text = subprocess.run(["perf", "sched", "timehist", "-i", data], check=True, capture_output=True,
                              text=True).stdout
    print(f"{args.backend}: without recording {plain}; under recording {traced}")
    print(sched.table(sched.summarize(sched.parse_timehist(text), who)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
