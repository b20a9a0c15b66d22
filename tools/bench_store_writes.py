#!/usr/bin/env python3
"""Store writes a running cluster makes, by kind of key (a measurement, not a test).

    sudo .venv/bin/python tools/bench_store_writes.py [--nodes 3] [--seconds 30] [--name hsw]

Builds a cluster of N nodes (udp backend, one busybox pod per node), waits until
it is up, then counts the store's writes (its change log) over SECONDS while idle
and over SECONDS while every pod pings the next node's pod 50 times a second.
Writes are grouped by key: the overlay daemons' stats records
(/netemu.io/overlay/stats/), and everything else (leases, node heartbeats,
events, status). The overlay's records are written only when their figures
changed and at most every stats.PUBLISH_PERIOD seconds per node, so the idle
line should show none of them and the busy one at most N * SECONDS / 5.
Runs under the machine's benchmark lock (/run/netemu-bench.lock, as `netemu bench`); the cluster is removed at the end.
"""

from __future__ import annotations

import argparse
import collections
import fcntl
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from netemu import cluster as clusters, names, netns  # noqa: E402
from netemu.overlay import stats  # noqa: E402
from netemu.store import registry  # noqa: E402
from netemu.topology.loader import load_topology_dict  # noqa: E402


def count(store, since: int) -> collections.Counter:
    c: collections.Counter = collections.Counter()
    for ev in store.events_since(since):
        if ev.key.startswith(stats.STATS):
            c["overlay stats records"] += 1
        elif ev.key.startswith(stats.REQUESTS):
            c["stats requests"] += 1
        else:
            c["other (" + ev.key.split("/")[2] + ")"] += 1
    return c


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=30)
    parser.add_argument("--name", default="hsw")
    args = parser.parse_args()
    lock = open("/run/netemu-bench.lock", "w")          # the lock `netemu bench` takes
    fcntl.flock(lock, fcntl.LOCK_EX)
    nodes = [f"n{i}" for i in range(args.nodes)]
    topo = load_topology_dict({
        "name": args.name, "cluster": {"backend": "udp"}, "nodes": [{"name": n} for n in nodes],
        "workloads": [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": f"p{i}"},
                       "spec": {"nodeName": n, "containers": [{"name": "c", "image": "busybox",
                                                               "command": ["sleep", "3600"]}]}}
                      for i, n in enumerate(nodes)]})
    pingers = []
    try:
        clusters.up(topo, kubeconfig=False)
        store = clusters.open_store(args.name)
        time.sleep(5)                                   # let the first records land
        ips = [registry.get(store, "Pod", "default", f"p{i}")["status"]["podIP"] for i in range(len(nodes))]
        for phase in ("idle", "busy"):
            if phase == "busy":
                for i in range(len(nodes)):
                    target = ips[(i + 1) % len(nodes)]
                    pingers.append(subprocess.Popen(netns.exec_argv(
                        names.pod_ns(args.name, "default", f"p{i}"), ["ping", "-q", "-i", "0.02", target]),
                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            since = store.revision()
            time.sleep(args.seconds)
            c = count(store, since)
            total = sum(c.values())
            print(f"{phase}: {total} writes in {args.seconds:g} s ({total / args.seconds:.2f}/s), "
                  + ", ".join(f"{k} {v} ({v / args.seconds:.2f}/s)" for k, v in sorted(c.items())))
        store.close()
    finally:
        for p in pingers:
            p.kill()
            p.wait()
        clusters.teardown(args.name, graceful=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
