#!/usr/bin/env python3
"""What reading a cluster's settings costs (a benchmark, not a test; no root).

    .venv/bin/python tools/bench_settings.py [--nodes 3,100,1000] [--rounds 200]

Every netemu command, daemon and the API server reads the settings once at its
start (netemu.clusterconfig.read: the ConfigMap kube-system/netemu-cluster
from the store, decoded through the topology loader's checks). Per topology of
N nodes it times, in the same run and on the same machine:
  - baseline: unpickling the Topology from a file (what topology.pickle was);
  - read: clusterconfig.read from a SQLite store (open, get, YAML, checks);
  - update: clusterconfig.update with a one-node change (read, encode,
    compare-and-swap write), what link set and node add pay.
Prints per case the median and the spread (min-max) in milliseconds, and the
ratio of medians to the baseline.
"""

from __future__ import annotations

import argparse
import os
import pickle
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from netemu import clusterconfig, names  # noqa: E402
from netemu.impairment import Impairment  # noqa: E402
from netemu.store.sqlite import SqliteStore  # noqa: E402
from netemu.topology.loader import load_topology_dict  # noqa: E402


def topology(n: int):
    return load_topology_dict({"name": "hsbench", "cluster": {"underlay": "172.31.0.0/16", "clusterNetwork": "10.200.0.0/14",
                                                              "link": {"rate": "100mbit"}},
                               "nodes": [{"name": f"n{i}", "labels": {"rack": str(i % 8)}} for i in range(n)]},
                              host_networks=[])


def timed(fn, rounds: int) -> list[float]:
    out = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--nodes", default="3,100,1000")
    parser.add_argument("--rounds", type=int, default=200)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        names.STATE_ROOT = root
        os.makedirs(os.path.join(root, "hsbench"))
        print(f"{'nodes':>6} {'case':<9} {'median ms':>10} {'min-max ms':>16} {'x baseline':>11}")
        for n in [int(x) for x in args.nodes.split(",")]:
            topo = topology(n)
            pickle_path = os.path.join(root, "topology.pickle")
            with open(pickle_path, "wb") as f:
                pickle.dump(topo, f)
            db = names.store_path("hsbench")
            for suffix in ("", "-wal", "-shm"):
                if os.path.exists(db + suffix):
                    os.remove(db + suffix)
            store = SqliteStore(db, create=True)
            clusterconfig.create(store, topo)
            store.close()

            def baseline():
                with open(pickle_path, "rb") as f:
                    pickle.load(f)

            flip = [0]

            def update():
                flip[0] ^= 1
                clusterconfig.update("hsbench", lambda t: setattr(t.nodes[0], "link", Impairment(delay=1000 + flip[0])))

            cases = [("baseline", baseline), ("read", lambda: clusterconfig.read("hsbench")), ("update", update)]
            rounds = max(5, args.rounds if n <= 100 else args.rounds // 10)
            base = None
            for name, fn in cases:
                fn()                                    # warm
                times = timed(fn, rounds)
                med = statistics.median(times)
                base = base or med
                print(f"{n:>6} {name:<9} {med:>10.3f} {min(times):>7.3f}-{max(times):<8.3f} {med / base:>10.1f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
