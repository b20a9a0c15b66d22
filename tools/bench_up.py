#!/usr/bin/env python3
"""How long `up` and `down` take for N nodes x M pods (a benchmark, not a test).

    sudo .venv/bin/python tools/bench_up.py [--nodes 20] [--pods-per-node 10] [--rounds 3] [--backend udp]

Each round builds a cluster whose pods are pinned to nodes (so the figure is the
data plane's cost: namespaces, veths, addresses, processes, readiness), waits
until every pod is Running and ready, then tears it down. Prints per round and the
median; also the control plane's resident memory with everything running.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import sys
import tempfile
import time

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from netemu import cluster as clusters  # noqa: E402
from netemu.topology.loader import load_topology  # noqa: E402


def rss_mb(pids) -> float:
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except FileNotFoundError:
            pass
    return total / 1024


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=20)
    ap.add_argument("--pods-per-node", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--backend", default="udp")
    ap.add_argument("--wait-lock", action="store_true", help="wait for another benchmark to finish")
    args = ap.parse_args()
    # One benchmark at a time on this machine (the lock `netemu bench` takes too).
    lock = open("/run/netemu-bench.lock", "w")
    if args.wait_lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
    else:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            sys.exit("another benchmark is running (/run/netemu-bench.lock); try --wait-lock")
    name = "bench-up"
    nodes = [{"name": f"n{i}"} for i in range(args.nodes)]
    pods = [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": f"p{i}-{j}"},
             "spec": {"nodeName": f"n{i}", "containers": [
                 {"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]}]}}
            for i in range(args.nodes) for j in range(args.pods_per_node)]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.yaml")
        with open(path, "w") as f:
            yaml.safe_dump({"name": name, "cluster": {"backend": args.backend}, "nodes": nodes,
                            "workloads": pods}, f)
        ups, downs = [], []
        for r in range(args.rounds):
            topo = load_topology(path)
            t0 = time.monotonic()
            try:
                clusters.up(topo)
                t1 = time.monotonic()
                procs = clusters.cluster_processes(name)
                mem = rss_mb(procs)
            finally:
                t2 = time.monotonic()
                clusters.teardown(name, graceful=True)
                t3 = time.monotonic()
            ups.append(t1 - t0)
            downs.append(t3 - t2)
            print(f"round {r + 1}: up {t1 - t0:.1f} s, down {t3 - t2:.1f} s, "
                  f"{len(procs)} processes, {mem:.0f} MB RSS in all", flush=True)
    print(f"{args.nodes} nodes x {args.pods_per_node} pods ({args.backend}): "
          f"up median {statistics.median(ups):.1f} s (min {min(ups):.1f}, max {max(ups):.1f}); "
          f"down median {statistics.median(downs):.1f} s (min {min(downs):.1f}, max {max(downs):.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
