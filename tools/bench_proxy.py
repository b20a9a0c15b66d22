#!/usr/bin/env python3
"""Informative timings of the service proxy's appliers (run as root).

In a throw-away namespace (hp-bench-<pid>), for N services with 2 endpoints
each: the first full sync, then one change (one endpoint added to one service)
applied incrementally, in nftables mode (libnftables in-process and the
`nft -f -` fallback) and iptables mode (iptables-restore --noflush).

    sudo .venv/bin/python tools/bench_proxy.py 1000 10000
"""

from __future__ import annotations

import os
import statistics
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from netemu import netns  # noqa: E402
from netemu.proxy.proxier import IptablesProxier, NftablesProxier  # noqa: E402


def cluster(n: int):
    services, endpoints = [], []
    for i in range(n):
        name = f"svc-{i}"
        services.append({"metadata": {"name": name, "namespace": "bench"},
                         "spec": {"type": "NodePort", "clusterIP": f"10.96.{i // 250}.{i % 250 + 1}",
                                  "ports": [{"name": "http", "protocol": "TCP", "port": 80,
                                             "targetPort": 8080, "nodePort": 30000 + i % 2700}]}})
        endpoints.append({"metadata": {"name": name, "namespace": "bench"},
                          "subsets": [{"addresses": [{"ip": f"10.244.{i // 120}.{2 * (i % 120) + 2}"},
                                                     {"ip": f"10.244.{i // 120}.{2 * (i % 120) + 3}"}],
                                       "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}]})
    return services, endpoints


def bench(label, make, n, changes=20):
    services, endpoints = cluster(n)
    p = make()
    t = time.perf_counter()
    p.sync(services, endpoints)
    full = time.perf_counter() - t
    times = []
    for k in range(changes):
        addrs = endpoints[k]["subsets"][0]["addresses"]
        addrs.append({"ip": f"10.245.0.{k + 1}"})
        t = time.perf_counter()
        r = p.sync(services, endpoints)
        times.append(time.perf_counter() - t)
        assert not r.full
    p.cleanup()
    p.close()
    print(f"{label:28s} n={n:6d}  full sync {full * 1000:8.1f} ms   "
          f"one change median {statistics.median(times) * 1000:6.1f} ms (min {min(times) * 1000:.1f})")


def main(argv):
    sizes = [int(a) for a in argv] or [1000, 10000]
    ns = f"hp-bench-{os.getpid()}"
    netns.create(ns)
    try:
        with netns.inside(ns):
            for n in sizes:
                bench("nftables (libnftables)", lambda: NftablesProxier("n", ["172.30.0.10"], "10.244.0.0/16"), n)
                bench("nftables (nft -f process)", lambda: NftablesProxier(
                    "n", ["172.30.0.10"], "10.244.0.0/16", prefer_library=False), n)
                bench("iptables (iptables-restore)", lambda: IptablesProxier("n", ["172.30.0.10"], "10.244.0.0/16"), n)
    finally:
        netns.delete(ns)


if __name__ == "__main__":
    main(sys.argv[1:])
