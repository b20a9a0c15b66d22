#!/usr/bin/env python3
"""How fast a Service change reaches every node's rules, on a cluster of
tools/bench_up.py's shape (issue 14's targets at 100 nodes x 10 pods: a new
Service in the rules of all nodes <= 1 s after it is created, p99 of 20; a
pod's endpoint removal <= 1 s), and whether pods of that cluster reach each
other (a sample of pod pairs on different nodes).

    sudo .venv/bin/python tools/bench_propagation.py [--nodes 100] [--pods-per-node 10]
         [--services 20] [--pairs 200] [--backend udp] [--name bench-prop] [--wait-lock]

For each of SERVICES rounds: a Service selecting one node's pods (app=web-nI)
is created through netemu's API (as the API server stores it); the clock stops
when every node's proxy has said (node.synced: written after its rule
transaction returned) that it holds that Service and the Endpoints the
endpoints controller wrote for it. Then one of those pods is deleted; the clock
stops when every proxy holds the Endpoints revision without its address.
Reported: median, p90, p99 and max over the rounds, in milliseconds.

Then PAIRS pairs of pods, drawn at random (a fixed seed) among the pods still
there, each pair on two different nodes: from the first pod's namespace, one
ping (ICMP echo, 2 s to answer) and one HTTP GET over TCP (the web stand-in on
port 80, 3 s) to the second pod's IP, through the backend's data path.
Reported: how many pairs answered both ways of asking, and every pair that did
not; the exit status is 1 when one did not.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, os.path.dirname(__file__))

from bench_up import take_lock, write_topology  # noqa: E402

from netemu import api, clusterconfig, names, netns  # noqa: E402
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
    ap.add_argument("--pairs", type=int, default=200, help="pod pairs on two nodes to try (0: none)")
    ap.add_argument("--backend", default="udp", choices=["udp", "vxlan", "host-gw"])
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
            failed = try_pairs(args.name, store, args.pairs) if args.pairs else []
        finally:
            store.close()
            clusters.teardown(args.name, graceful=True)
    for what, values in (("new Service", created), ("endpoint removal", removed),
                         ("of which the endpoints controller (both)", controller)):
        ms = [v * 1000 for v in values]
        print(f"{what} on all {args.nodes} nodes: median {statistics.median(ms):.0f} ms, "
              f"p90 {percentile(ms, 0.9):.0f}, p99 {percentile(ms, 0.99):.0f}, max {max(ms):.0f} "
              f"({len(ms)} rounds)")
    if args.pairs:
        print(f"pod to pod ({args.backend}): {args.pairs - len(failed)} of {args.pairs} pairs on two nodes "
              "answered a ping and an HTTP GET")
        for line in failed:
            print("  " + line)
    return 1 if args.pairs and failed else 0


def try_pairs(cluster: str, store, count: int) -> list[str]:
    """COUNT random pairs of running pods on two different nodes: a ping and an
    HTTP GET from the first to the second; what failed, a line each."""
    pods = sorted(((p["metadata"]["name"], p["spec"]["nodeName"], p["status"]["podIP"])
                   for p in registry.list_(store, "Pod", "default")
                   if (p.get("status") or {}).get("podIP") and not p["metadata"].get("deletionTimestamp")))
    rng = random.Random(14)
    failed = []
    t0 = time.monotonic()
    for _ in range(count):
        (src, src_node, _), (dst, dst_node, ip) = rng.sample(pods, 2)
        while src_node == dst_node:
            (src, src_node, _), (dst, dst_node, ip) = rng.sample(pods, 2)
        ns = names.pod_ns(cluster, "default", src)
        what = f"{src} ({src_node}) -> {dst} ({dst_node}, {ip})"
        ping = netns.run(ns, ["ping", "-n", "-q", "-c", "1", "-W", "2", ip], check=False)
        if ping.returncode != 0:
            failed.append(f"{what}: no answer to a ping")
        try:
            with netns.connect_in(ns, (ip, 80), 3) as conn:
                conn.sendall(b"GET / HTTP/1.0\r\nHost: " + ip.encode() + b"\r\n\r\n")
                status = conn.recv(64).split(b"\r\n", 1)[0]
            if not status.startswith(b"HTTP/1."):
                failed.append(f"{what}: HTTP answered {status!r}")
        except OSError as e:
            failed.append(f"{what}: HTTP: {e}")
    print(f"{count} pod pairs tried in {time.monotonic() - t0:.1f} s", flush=True)
    return failed


def _endpoints(store, name: str, ready: int):
    """The Endpoints KeyValue of NAME once it lists exactly READY addresses."""
    kv = store.get(registry.key("Endpoints", "default", name))
    if kv is None:
        return None
    count = sum(len(s.get("addresses") or []) for s in kv.value.get("subsets") or [])
    return kv if count == ready else None


if __name__ == "__main__":
    sys.exit(main())
