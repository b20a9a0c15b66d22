#!/usr/bin/env python3
"""Benchmark of the service proxy (kube-proxy's role), both modes. Run as root, alone.

What it measures, in a node-like namespace (a bridge cni0 with a client pod and
one real endpoint pod behind it), for each proxy mode:
- full sync: a fresh proxier installing N services x 2 endpoints (plus one probe
  service) on an empty node;
- one change at that size: one endpoint added to one service, handed to the
  proxier as a changed object (the per-node daemon's path); median and p90 of
  CHANGES changes;
- the CPython floor of that full sync (nftables mode): the least any Python
  code must do for it, timed the same way: read each Service's and Endpoints'
  fields, name its three chains as kube-proxy does (sha256, base32), and pack
  the ~100,000 messages' headers around fixed bytes into one buffer; no rule
  is really encoded. With the kernel's time it says how close a proxier in
  Python can get to the kernel's own cost;
- connection setup through a service: TCP connect() from the client pod to the
  probe service's ClusterIP, DNATed to the real endpoint (the SYN / SYN-ACK
  round trip through the rules); median and p99 of CONNECTS connects, with only
  the probe service installed and with the N services installed as well. The
  probe sorts last (namespace "zz-probe"), so in iptables mode its KUBE-SERVICES
  rule is the last one matched: the worst case of a linear chain.
Rounds interleave the modes (the order alternates between rounds); the report
gives, per figure, the median over rounds and the spread (min-max).

The benchmark takes an exclusive flock on /run/netemu-bench.lock (the lock
`netemu bench` takes) so that no other benchmark runs at the same time.

    sudo .venv/bin/python tools/bench_proxy.py                      # 10,000 services, 3 rounds
    sudo .venv/bin/python tools/bench_proxy.py -n 1000 --rounds 1 --modes nftables
    sudo .venv/bin/python tools/bench_proxy.py --code /path/to/other/checkout   # compare code

`--code` imports netemu from another checkout (e.g. an older commit extracted
with `git archive`), so before/after figures come from the same benchmark. A
proxier without `sync_changes` (older code) is given the full lists instead,
as its daemon did. Namespaces: hs-bench-*, deleted at the end.
"""

from __future__ import annotations

import argparse
import base64
import fcntl
import hashlib
import os
import selectors
import socket
import statistics
import struct
import sys
import threading
import time

LOCK = "/run/netemu-bench.lock"
NODE, POD, EP = "hs-bench-node", "hs-bench-pod", "hs-bench-ep"
CIDR = "10.244.0.0/16"
POD_IP, EP_IP, BRIDGE_IP = "10.244.200.20", "10.244.200.11", "10.244.200.1"
PROBE_IP, PROBE_PORT, EP_PORT = "10.96.255.254", 80, 8080
NODE_IP = "172.30.0.10"


# -- the cluster's objects --------------------------------------------------------

def service(ns: str, name: str, ip: str, svc_type: str, node_port: int, rv: int) -> dict:
    port = {"name": "http", "protocol": "TCP", "port": 80, "targetPort": EP_PORT}
    if svc_type != "ClusterIP":
        port["nodePort"] = node_port
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": str(rv)},
            "spec": {"type": svc_type, "clusterIP": ip, "ports": [port]}}


def endpoints(ns: str, name: str, ips: list[str], rv: int) -> dict:
    return {"metadata": {"name": name, "namespace": ns, "resourceVersion": str(rv)},
            "subsets": [{"addresses": [{"ip": ip} for ip in ips],
                         "ports": [{"name": "http", "port": EP_PORT, "protocol": "TCP"}]}]}


def cluster(n: int, svc_type: str) -> tuple[list[dict], list[dict]]:
    """N services with 2 (unreachable) endpoints each, plus the probe service."""
    services, eps = [], []
    for i in range(n):
        name = f"svc-{i}"
        services.append(service("bench", name, f"10.96.{i // 250}.{i % 250 + 1}", svc_type,
                                30000 + i % 2700, 1))
        eps.append(endpoints("bench", name, [f"10.244.{i // 120}.{2 * (i % 120) + 2}",
                                             f"10.244.{i // 120}.{2 * (i % 120) + 3}"], 1))
    services.append(service("zz-probe", "probe", PROBE_IP, "ClusterIP", 0, 1))
    eps.append(endpoints("zz-probe", "probe", [EP_IP], 1))
    return services, eps


# -- the node ------------------------------------------------------------------------

class EndpointServer:
    """Accepts and closes connections on EP_IP:8080 inside the endpoint pod."""

    def __init__(self, netns) -> None:
        with netns.inside(EP):
            self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("0.0.0.0", EP_PORT))
        self.sock.listen(1024)
        self.sock.setblocking(False)
        self.stop_r, self.stop_w = os.pipe()
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        sel = selectors.DefaultSelector()
        sel.register(self.sock, selectors.EVENT_READ, "accept")
        sel.register(self.stop_r, selectors.EVENT_READ, None)
        while True:
            for key, _ in sel.select():
                if key.data is None:
                    return
                try:
                    conn, _ = self.sock.accept()
                    conn.close()
                except BlockingIOError:
                    pass

    def close(self) -> None:
        os.write(self.stop_w, b"x")
        self.thread.join(5)
        self.sock.close()
        os.close(self.stop_r)
        os.close(self.stop_w)


def build_node(netns) -> None:
    for ns in (NODE, POD, EP):
        netns.create(ns)
    lines = ["link set lo up", "link add cni0 type bridge", f"addr add {BRIDGE_IP}/24 dev cni0",
             "link set cni0 up"]
    for i, pod in enumerate((POD, EP)):
        lines += [f"link add vb{i} type veth peer name eth0 netns {pod}", f"link set vb{i} master cni0",
                  f"link set vb{i} up"]
    netns.ip_batch(NODE, lines)
    netns.write_sysctl(NODE, "net.ipv4.ip_forward", 1)
    for pod, ip in ((POD, POD_IP), (EP, EP_IP)):
        netns.ip_batch(pod, ["link set lo up", f"addr add {ip}/24 dev eth0", "link set eth0 up",
                             f"route add default via {BRIDGE_IP}"])


def delete_node(netns) -> None:
    for ns in (NODE, POD, EP):
        netns.delete(ns)


def connect_latencies(netns, count: int) -> list[float]:
    """Seconds per TCP connect() from the client pod to the probe's ClusterIP
    (after 50 unmeasured ones: caches, ARP, the server thread waking up)."""
    out = []
    for i in range(count + 50):
        with netns.inside(POD):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            s.settimeout(3)
            # No TIME_WAIT pile-up on the client: reset on close.
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            t = time.perf_counter()
            s.connect((PROBE_IP, PROBE_PORT))
            if i >= 50:
                out.append(time.perf_counter() - t)
        finally:
            s.close()
    return out


# -- one round of one mode --------------------------------------------------------------

def percentile(values: list[float], p: float) -> float:
    vs = sorted(values)
    return vs[min(len(vs) - 1, int(round(p / 100 * (len(vs) - 1))))]


_HEADER = struct.Struct("<IHHIIBBH").pack
_FIXED = b"\x10\x00\x01\x00kube-proxy\x00\x00" + bytes(56)      # table attribute + a rule's worth


def python_floor(services: list[dict], eps: list[dict]) -> float:
    """Seconds for the least a full sync of SERVICES must do in Python (see
    the module's docstring): fields, three kube-proxy chain names per service
    (2 endpoints), 10 message headers per service, one buffer."""
    def name(text: str) -> bytes:
        digest = hashlib.sha256(text.encode()).digest()
        return base64.b32encode(digest)[:8] + b"-" + text.encode()[:55]

    t = time.perf_counter()
    parts, seq = [], 0
    add = parts.append
    for svc, ep in zip(services, eps):
        meta, spec = svc["metadata"], svc["spec"]
        port = spec["ports"][0]
        base = f"{meta['namespace']}/{meta['name']}/tcp/{port.get('name', '')}"
        vip = socket.inet_aton(spec["clusterIP"]) + port["port"].to_bytes(2, "big")
        ips = [socket.inet_aton(a["ip"]) for s in ep["subsets"] for a in s["addresses"]]
        chains = [name(base)] + [name(f"{base}__{socket.inet_ntoa(ip)}/{EP_PORT}") for ip in ips]
        for body in chains + [vip] * 3 + [ip for ip in ips for _ in (0, 1)]:
            seq += 1
            add(_HEADER(20 + len(_FIXED) + len(body), 0xA06, 0xC01, seq, 0, 2, 0, 0))
            add(_FIXED)
            add(body)
    b"".join(parts)
    return time.perf_counter() - t


def run_mode(netns, proxier_mod, mode: str, n: int, svc_type: str, changes: int,
             connects: int) -> dict:
    def make():
        with netns.inside(NODE):
            return proxier_mod.make_proxier(mode, "node-1", [NODE_IP], CIDR)

    def in_node(fn, *args):
        with netns.inside(NODE):
            return fn(*args)

    res: dict[str, float] = {}
    services, eps = cluster(n, svc_type)

    # Only the probe service.
    p = make()
    in_node(p.sync, services[-1:], eps[-1:])
    lat = connect_latencies(netns, connects)
    res["connect_1_median"], res["connect_1_p99"] = statistics.median(lat), percentile(lat, 99)
    in_node(p.cleanup)
    p.close()
    netns.run(NODE, ["conntrack", "-F"], check=False)

    # N services: full sync on an empty node, as a restarted daemon does it:
    # nothing cached from an earlier round (chain names are memoised).
    model_mod = sys.modules.get(proxier_mod.__name__.rpartition(".")[0] + ".model")
    for cached in ("_b32_sha256", "hash_and_truncate"):
        getattr(getattr(model_mod, cached, None), "cache_clear", lambda: None)()
    p = make()
    t = time.perf_counter()
    r = in_node(p.sync, services, eps)
    res["full_sync"] = time.perf_counter() - t
    res["full_kernel"] = getattr(r, "kernel_seconds", 0.0)
    if mode == "nftables":
        res["floor"] = python_floor(services, eps)
    lat = connect_latencies(netns, connects)
    res["connect_n_median"], res["connect_n_p99"] = statistics.median(lat), percentile(lat, 99)

    # One changed service at a time.
    incremental = hasattr(p, "sync_changes")
    times, kernel = [], []
    for k in range(changes):
        i = (k * 997) % n                      # spread over the table
        old = eps[i]
        ips = [a["ip"] for a in old["subsets"][0]["addresses"]] + [f"10.245.{k // 250}.{k % 250 + 1}"]
        new = endpoints("bench", f"svc-{i}", ips, 2 + k)
        eps[i] = new
        t = time.perf_counter()
        if incremental:
            r = in_node(p.sync_changes, {}, {("bench", f"svc-{i}"): new})
        else:
            r = in_node(p.sync, services, eps)
        times.append(time.perf_counter() - t)
        kernel.append(getattr(r, "kernel_seconds", 0.0))
        assert r.applied and not r.full, r
    res["change_median"], res["change_p90"] = statistics.median(times), percentile(times, 90)
    res["change_kernel_median"] = statistics.median(kernel)
    if res["full_kernel"]:
        res["full_ratio"] = res["full_sync"] / res["full_kernel"]
        if "floor" in res:
            res["floor_ratio"] = (res["floor"] + res["full_kernel"]) / res["full_kernel"]
    if all(kernel):
        # each change against its own kernel time, then the median
        res["change_ratio"] = statistics.median(a / b for a, b in zip(times, kernel))
    in_node(p.cleanup)
    p.close()
    netns.run(NODE, ["conntrack", "-F"], check=False)
    return res


FIGURES = [("full_sync", "full sync", 1), ("full_kernel", "  of it the kernel's", 1),
           ("full_ratio", "  full sync / kernel's", "x"),
           ("floor", "  CPython floor", 1),
           ("floor_ratio", "  (floor + kernel's) / kernel's", "x"),
           ("change_median", "one change, median", 1000),
           ("change_p90", "one change, p90", 1000),
           ("change_kernel_median", "  the kernel's, median", 1000),
           ("change_ratio", "  change / kernel's, median", "x"),
           ("connect_1_median", "connect, 1 service, median", 1e6),
           ("connect_1_p99", "connect, 1 service, p99", 1e6),
           ("connect_n_median", "connect, N services, median", 1e6),
           ("connect_n_p99", "connect, N services, p99", 1e6)]
UNITS = {1: "s", 1000: "ms", 1e6: "us", "x": "x"}


def report(results: dict[str, list[dict]], n: int, svc_type: str) -> None:
    print(f"\n{n} {svc_type} services x 2 endpoints; median over rounds [min-max]")
    for mode, rounds in results.items():
        print(f"  {mode}  ({len(rounds)} rounds)")
        for key, label, scale in FIGURES:
            vals = [r[key] * (1 if scale == "x" else scale) for r in rounds if key in r]
            if not vals:
                continue
            print(f"    {label:30s} {statistics.median(vals):9.3f} {UNITS[scale]:2s} "
                  f"[{min(vals):.3f}-{max(vals):.3f}]")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-n", "--services", type=int, default=10000)
    ap.add_argument("--type", default="ClusterIP", choices=["ClusterIP", "NodePort"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--changes", type=int, default=20)
    ap.add_argument("--connects", type=int, default=500)
    ap.add_argument("--modes", default="nftables,iptables")
    ap.add_argument("--code", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."),
                    help="checkout whose netemu to benchmark")
    args = ap.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.code))
    from netemu import netns
    from netemu.proxy import proxier as proxier_mod
    print(f"code: {os.path.dirname(proxier_mod.__file__)}")
    modes = args.modes.split(",")

    with open(LOCK, "w") as lock:
        print(f"waiting for {LOCK} ...", flush=True)
        fcntl.flock(lock, fcntl.LOCK_EX)
        results: dict[str, list[dict]] = {m: [] for m in modes}
        delete_node(netns)            # leftovers of an interrupted run (our names only)
        server = None
        try:
            build_node(netns)
            server = EndpointServer(netns)
            for rnd in range(args.rounds):
                order = modes if rnd % 2 == 0 else modes[::-1]
                for mode in order:
                    r = run_mode(netns, proxier_mod, mode, args.services, args.type,
                                 args.changes, args.connects)
                    results[mode].append(r)
                    print(f"round {rnd + 1} {mode:9s} full {r['full_sync']:.3f} s "
                          f"(kernel {r['full_kernel']:.3f}), change "
                          f"{r['change_median'] * 1000:.1f}/{r['change_p90'] * 1000:.1f} ms "
                          f"(kernel {r['change_kernel_median'] * 1000:.1f}), connect "
                          f"1: {r['connect_1_median'] * 1e6:.0f}/{r['connect_1_p99'] * 1e6:.0f} us, "
                          f"N: {r['connect_n_median'] * 1e6:.0f}/{r['connect_n_p99'] * 1e6:.0f} us",
                          flush=True)
        finally:
            if server:
                server.close()
            delete_node(netns)
    report(results, args.services, args.type)
    return 0


if __name__ == "__main__":
    sys.exit(main())
