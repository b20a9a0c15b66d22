#!/usr/bin/env python3
"""How fast a Service change reaches every node's rules, on a cluster of
tools/bench_up.py's shape (issue 14's targets at 100 nodes x 10 pods: a new
Service in the rules of all nodes <= 1 s after it is created, p99 of 20; a
pod's endpoint removal <= 1 s).

    sudo .venv/bin/python tools/bench_propagation.py [--nodes 100] [--pods-per-node 10]
         [--services 20] [--backend udp] [--name bench-prop] [--wait-lock]

For each of SERVICES rounds: a Service selecting one node's pods (app=web-nI)
is created through netemu's API (as the API server stores it); the clock stops
when every node's proxy has said (node.synced: written after its rule
transaction returned) that it holds that Service and the Endpoints the
endpoints controller wrote for it. Then one of those pods is deleted; the clock
stops when every proxy holds the Endpoints revision without its address.
Reported: median, p90, p99 and max over the rounds, in milliseconds.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_up import take_lock, write_topology  # noqa: E402

from netemu import api, clusterconfig  # noqa: E402
from netemu import cluster as clusters  # noqa: E402
from netemu.node import synced  # noqa: E402
from netemu.store import open_store, registry  # noqa: E402
from netemu.topology.loader import load_topology  # noqa: E402

POLL = 0.002
TIMEOUT = 60.0


def wait_for(what: str, check):
    deadline = time.monotonic() + TIMEOUT
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(POLL)


def all_hold(cluster: str, nodes: list[str], wanted: dict[str, int]) -> bool:
    return not any(synced.lagging(cluster, node, {"proxy": wanted}) for node in nodes)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nodes", type=int, default=100)
    ap.add_argument("--pods-per-node", type=int, default=10)
    ap.add_argument("--services", type=int, default=20)
    ap.add_argument("--backend", default="udp")
    ap.add_argument("--name", default="bench-prop")
    ap.add_argument("--wait-lock", action="store_true")
    ap.add_argument("--timeout", type=float, default=600.0, help="up's readiness timeout (s)")
    args = ap.parse_args()
    lock = take_lock(args.wait_lock)  # noqa: F841 - held until exit
    if args.services > args.nodes:
        ap.error("--services: at most one per node")
    svc_prefix, ep_prefix = registry.prefix("Service"), registry.prefix("Endpoints")
    nodes = [f"n{i}" for i in range(args.nodes)]
    created, removed = [], []
    controller = []             # of each: when the endpoints controller had written (s)
    with tempfile.TemporaryDirectory() as tmp:
        topo = load_topology(write_topology(os.path.join(tmp, "bench.yaml"), args.name, args.nodes,
                                            args.pods_per_node, args.backend))
        clusters.READY_TIMEOUT = args.timeout
        t0 = time.monotonic()
        clusters.up(topo, kubeconfig=False)
        print(f"up {time.monotonic() - t0:.1f} s ({args.nodes} nodes x {args.pods_per_node} pods, "
              f"{args.backend})", flush=True)
        store = open_store(args.name)
        try:
            settings = clusterconfig.read(args.name, store).settings
            for i in range(args.services):
                name = f"web-n{i}"
                svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
                       "spec": {"selector": {"app": name}, "ports": [{"port": 80, "targetPort": 80}]}}
                start = time.monotonic()
                stored = api.create(store, svc, settings)
                svc_rev = int(stored["metadata"]["resourceVersion"])
                ep = wait_for(f"{name}'s endpoints", lambda: _endpoints(store, name, args.pods_per_node))
                controller.append(time.monotonic() - start)
                wait_for(f"{name} on every node", lambda: all_hold(
                    args.name, nodes, {svc_prefix: svc_rev, ep_prefix: ep.mod_revision}))
                created.append(time.monotonic() - start)
                # One endpoint goes: its pod is deleted.
                start = time.monotonic()
                api.delete_pod(store, "default", f"p{i}-0")
                ep = wait_for(f"{name} without p{i}-0", lambda: _endpoints(store, name, args.pods_per_node - 1))
                controller.append(time.monotonic() - start)
                wait_for(f"{name}'s endpoint removal on every node", lambda: all_hold(
                    args.name, nodes, {ep_prefix: ep.mod_revision}))
                removed.append(time.monotonic() - start)
                print(f"service {i + 1}: in every node's rules after {created[-1] * 1000:.0f} ms "
                      f"(its Endpoints written after {controller[-2] * 1000:.0f} ms), an endpoint removed "
                      f"after {removed[-1] * 1000:.0f} ms ({controller[-1] * 1000:.0f} ms)", flush=True)
        finally:
            store.close()
            clusters.teardown(args.name, graceful=True)
    for what, values in (("new Service", created), ("endpoint removal", removed),
                         ("of which the endpoints controller (both)", controller)):
        ms = [v * 1000 for v in values]
        print(f"{what} on all {args.nodes} nodes: median {statistics.median(ms):.0f} ms, "
              f"p90 {percentile(ms, 0.9):.0f}, p99 {percentile(ms, 0.99):.0f}, max {max(ms):.0f} "
              f"({len(ms)} rounds)")
    return 0


def _endpoints(store, name: str, ready: int):
    """The Endpoints KeyValue of NAME once it lists exactly READY addresses."""
    kv = store.get(registry.key("Endpoints", "default", name))
    if kv is None:
        return None
    count = sum(len(s.get("addresses") or []) for s in kv.value.get("subsets") or [])
    return kv if count == ready else None


if __name__ == "__main__":
    sys.exit(main())
