#!/usr/bin/env python3
"""The Kubernetes API server under kubectl-like clients, and the data path beside it
(a benchmark, not a test).

    flock /run/netemu-bench.lock .venv/bin/python tools/bench_api.py \\
        [--real-pods 200] [--object-pods 800] [--workers 4] [--name bench-api] ...

Builds a cluster (a master and WORKERS nodes, --backend, vxlan by default), two
iperf3 pods on two workers, then REAL_PODS pods with sandboxes (busybox `sleep`,
spread over the workers by nodeName) created through the API and waited for
until Running (--up-timeout; how many came up is printed), then OBJECT_PODS
pods that are objects only: their nodeSelector matches no node, so they stay
Pending and no kubelet makes a sandbox for them. All live in `default`, so one
LIST returns them all. The clients speak HTTP/1.1 with keep-alive and send the
requests kubectl sends (client-go's JSON, and kubectl get's Table Accept header),
to the API server's loopback port on the machine:

  - baseline: GET /version (the server's floor: HTTP, routing, no store);
  - GET one pod, as JSON and as a Table: p50/p99 (--gets requests each);
  - LIST all pods of the namespace, as JSON and as a Table (--lists each);
  - write-to-watch-event: a watch on the namespace's pods, then merge patches of
    one pod's label, one every ~100 ms; the time from sending the PATCH to the
    watch event that carries its value arriving (--patches);
  - CLIENTS concurrent clients (one process, one thread and connection each)
    GETting pods for --load-seconds: requests/s, p50/p99;
  - the data path: iperf3 (TCP, one stream, --iperf-seconds) from one pod to
    the other across nodes, per round without and then with the CLIENTS load
    running (--rounds): Gbit/s each, and the ratio per round.

Every figure is printed with its median and spread, and the API ones as a ratio
to the /version baseline. The cluster is torn down at the end, even on failure.
This tool takes no lock: run it under `flock /run/netemu-bench.lock`, the lock
`netemu bench` takes (never two benchmarks at once), and note `uptime`.

    --profile FILE   after the HTTP figures, replay GET/LIST (JSON and Table)
                     and a watch-shaped encode against the same store in this
                     process, under cProfile, and write the stats to FILE (the
                     top functions are printed): where the server's time goes.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time

import yaml

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

from netemu import apiserver, names  # noqa: E402
from netemu import cluster as clusters  # noqa: E402
from netemu.topology.loader import load_topology  # noqa: E402

TABLE = ("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,"
         "application/json")
JSON = "application/json"
NOWHERE = {"netemu-bench/nowhere": "true"}       # no node has it: Pending, no sandbox


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p / 100 * (len(s) - 1))))]


def ms(values: list[float]) -> str:
    v = [x * 1000 for x in values]
    return (f"p50 {statistics.median(v):.3g} ms, p99 {pct(v, 99):.3g} ms "
            f"(min {min(v):.3g}, max {max(v):.3g}, n={len(v)})")


def spread(values: list[float], unit: str = "") -> str:
    return (f"median {statistics.median(values):.3g}{unit} (min {min(values):.3g}, max {max(values):.3g}, "
            f"n={len(values)})")


class Client:
    """One keep-alive connection, as client-go keeps one per host."""

    def __init__(self, port: int):
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)

    def request(self, method: str, path: str, accept: str = JSON, body: bytes | None = None,
                content_type: str | None = None) -> tuple[int, bytes]:
        headers = {"Accept": accept, "User-Agent": "kubectl/v1.32.0 (linux/amd64) bench_api"}
        if content_type:
            headers["Content-Type"] = content_type
        self.conn.request(method, path, body=body, headers=headers)
        resp = self.conn.getresponse()
        return resp.status, resp.read()

    def timed(self, method: str, path: str, accept: str = JSON, body=None, content_type=None) -> float:
        t0 = time.perf_counter()
        code, data = self.request(method, path, accept, body, content_type)
        dt = time.perf_counter() - t0
        if code >= 300:
            raise SystemExit(f"bench_api: {method} {path}: {code} {data[:300]!r}")
        return dt

    def close(self) -> None:
        self.conn.close()


def pod(name: str, node: str | None) -> dict:
    spec = {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "infinity"]}]}
    if node:
        spec["nodeName"] = node
    else:
        spec["nodeSelector"] = dict(NOWHERE)
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "bench"}},
            "spec": spec}


def create_pods(c: Client, prefix: str, count: int, nodes: list[str] | None) -> float:
    t0 = time.perf_counter()
    for i in range(count):
        body = json.dumps(pod(f"{prefix}-{i}", nodes[i % len(nodes)] if nodes else None)).encode()
        code, data = c.request("POST", "/api/v1/namespaces/default/pods", body=body, content_type=JSON)
        if code != 201:
            raise SystemExit(f"bench_api: create {prefix}-{i}: {code} {data[:300]!r}")
    return time.perf_counter() - t0


def running_count(c: Client, prefix: str) -> int:
    code, data = c.request("GET", "/api/v1/namespaces/default/pods?labelSelector=app%3Dbench")
    items = json.loads(data)["items"]
    return sum(1 for p in items if p["metadata"]["name"].startswith(prefix + "-")
               and (p.get("status") or {}).get("phase") == "Running")


def watch_latency(port: int, pod_name: str, count: int) -> list[float]:
    c = Client(port)
    code, data = c.request("GET", "/api/v1/namespaces/default/pods?limit=1")
    rv = json.loads(data)["metadata"]["resourceVersion"]
    w = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    w.request("GET", f"/api/v1/namespaces/default/pods?watch=true&resourceVersion={rv}",
              headers={"Accept": JSON})
    resp = w.getresponse()
    sock = w.sock
    arrived: dict[str, float] = {}
    done = threading.Event()

    def reader():
        while not done.is_set():
            try:
                line = resp.readline()
            except (OSError, ValueError, http.client.HTTPException):
                return                          # the watch was closed under us: the end
            if not line:
                return
            now = time.perf_counter()
            i = line.find(b'"hxseq":"')
            if i >= 0:
                arrived.setdefault(line[i + 9:line.index(b'"', i + 9)].decode(), now)

    t = threading.Thread(target=reader, daemon=True)
    t.start()
    out = []
    try:
        for i in range(count):
            mark = f"s{i}"
            body = json.dumps({"metadata": {"labels": {"hxseq": mark}}}).encode()
            t0 = time.perf_counter()
            code, data = c.request("PATCH", f"/api/v1/namespaces/default/pods/{pod_name}", body=body,
                                   content_type="application/merge-patch+json")
            if code != 200:
                raise SystemExit(f"bench_api: patch: {code} {data[:300]!r}")
            deadline = time.monotonic() + 5
            while mark not in arrived and time.monotonic() < deadline:
                time.sleep(0.0002)
            if mark not in arrived:
                raise SystemExit(f"bench_api: no watch event for patch {mark} within 5 s")
            out.append(arrived[mark] - t0)
            time.sleep(0.1)
    finally:
        done.set()
        # Wake the reader first: closing the response under a blocked readline
        # would wait for the read's timeout (the reader holds the buffer's lock).
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        t.join(timeout=5)
        w.close()
        c.close()
    return out


LOAD_WORKER = r"""
import http.client, json, sys, threading, time
port, clients, seconds, names = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4].split(",")
lat = [[] for _ in range(clients)]
errors = []
start = threading.Barrier(clients + 1)
def run(k):
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    start.wait()
    end = time.perf_counter() + seconds
    i = k
    while time.perf_counter() < end:
        t0 = time.perf_counter()
        conn.request("GET", "/api/v1/namespaces/default/pods/" + names[i % len(names)],
                     headers={"Accept": "application/json"})
        r = conn.getresponse(); r.read()
        lat[k].append(time.perf_counter() - t0)
        if r.status != 200:
            errors.append(r.status)
        i += clients
threads = [threading.Thread(target=run, args=(k,)) for k in range(clients)]
for t in threads: t.start()
start.wait(); t0 = time.perf_counter()
for t in threads: t.join()
wall = time.perf_counter() - t0
json.dump({"wall": wall, "lat": [x for l in lat for x in l], "errors": len(errors)}, sys.stdout)
"""


def start_load(port: int, clients: int, seconds: float, pod_names: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", LOAD_WORKER, str(port), str(clients), str(seconds),
                             ",".join(pod_names)], stdout=subprocess.PIPE, text=True)


def finish_load(proc: subprocess.Popen) -> dict:
    out, _ = proc.communicate(timeout=600)
    if proc.returncode != 0:
        raise SystemExit("bench_api: the load process failed")
    return json.loads(out)


def iperf(cluster: str, seconds: int, server_ip: str) -> float:
    ns = names.pod_ns(cluster, "default", "iperf-client")
    out = subprocess.run(["ip", "netns", "exec", ns, "iperf3", "-c", server_ip, "-t", str(seconds), "-J"],
                         capture_output=True, text=True, timeout=seconds + 60)
    if out.returncode != 0:
        raise SystemExit(f"bench_api: iperf3: {out.stdout[-500:]} {out.stderr[-500:]}")
    return json.loads(out.stdout)["end"]["sum_received"]["bits_per_second"] / 1e9


def profile(cluster: str, pod_name: str, path: str) -> None:
    """GET/LIST/Table through the server's handler in this process, under cProfile."""
    import cProfile
    import pstats

    import trio

    from netemu import clusterconfig
    from netemu.apiserver.http import Request
    from netemu.apiserver.server import ApiServer
    from netemu.store.sqlite import SqliteStore

    store = SqliteStore(names.store_path(cluster))
    server = ApiServer(store, clusterconfig.read(cluster, store).settings, cluster=cluster)

    def req(p, accept):
        path, _, q = p.partition("?")
        query = {}
        for part in filter(None, q.split("&")):
            k, _, v = part.partition("=")
            query.setdefault(k, []).append(v)
        return Request("GET", path, query, {"accept": accept}, b"")

    async def work():
        for _ in range(200):
            await server.handle(req(f"/api/v1/namespaces/default/pods/{pod_name}", JSON))
            await server.handle(req(f"/api/v1/namespaces/default/pods/{pod_name}", TABLE))
        for _ in range(10):
            await server.handle(req("/api/v1/namespaces/default/pods", JSON))
            await server.handle(req("/api/v1/namespaces/default/pods", TABLE))

    prof = cProfile.Profile()
    prof.enable()
    trio.run(work)
    prof.disable()
    store.close()
    prof.dump_stats(path)
    pstats.Stats(path).sort_stats("cumulative").print_stats(30)


def measure(c: Client, port: int, args, one: str, what: str) -> list[dict]:
    """The single-client figures on the namespace as it is now; returns its pods."""
    code, data = c.request("GET", "/api/v1/namespaces/default/pods")
    items = json.loads(data)["items"]
    running = sum(1 for p in items if p.get("status", {}).get("phase") == "Running")
    print(f"\n== {what}: {len(items)} pods in the namespace ({len(data) / 1e6:.2f} MB as JSON), "
          f"{running} Running", flush=True)
    print(f"uptime: {os.popen('uptime').read().strip()}", flush=True)
    for _ in range(50):                                   # warm
        c.timed("GET", "/version")
    base = [c.timed("GET", "/version") for _ in range(args.gets)]
    get_json = [c.timed("GET", f"/api/v1/namespaces/default/pods/{one}") for _ in range(args.gets)]
    get_table = [c.timed("GET", f"/api/v1/namespaces/default/pods/{one}", TABLE) for _ in range(args.gets)]
    list_json = [c.timed("GET", "/api/v1/namespaces/default/pods") for _ in range(args.lists)]
    list_table = [c.timed("GET", "/api/v1/namespaces/default/pods?limit=500", TABLE) for _ in range(args.lists)]
    b = statistics.median(base)
    print(f"GET /version (baseline)    {ms(base)}")
    for label, v in (("GET pod, JSON", get_json), ("GET pod, Table", get_table),
                     (f"LIST {len(items)} pods, JSON", list_json),
                     (f"LIST {len(items)} pods, Table", list_table)):
        print(f"{label:26} {ms(v)}; p50 {statistics.median(v) / b:.3g}x baseline")
    wl = watch_latency(port, one, args.patches)
    print(f"{'PATCH -> watch event':26} {ms(wl)}; p50 {statistics.median(wl) / b:.3g}x baseline", flush=True)
    return items


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--name", default="bench-api", help="the throw-away cluster's name")
    ap.add_argument("--workers", type=int, default=4)
    ap.add_argument("--backend", default="vxlan", choices=["udp", "vxlan", "host-gw"])
    ap.add_argument("--real-pods", type=int, default=200, help="pods with sandboxes")
    ap.add_argument("--object-pods", type=int, default=800, help="pods that are objects only (Pending)")
    ap.add_argument("--total", type=int, help="object-only pods fill the namespace up to this many pods "
                                              "(instead of --object-pods)")
    ap.add_argument("--up-timeout", type=float, default=600, help="seconds to wait for the real pods")
    ap.add_argument("--stall", type=float, default=120,
                    help="stop waiting when no more real pods have come up for this many seconds")
    ap.add_argument("--gets", type=int, default=1000)
    ap.add_argument("--lists", type=int, default=30)
    ap.add_argument("--patches", type=int, default=100)
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--load-seconds", type=float, default=10)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--iperf-seconds", type=int, default=8)
    ap.add_argument("--profile", metavar="FILE")
    args = ap.parse_args()
    name = args.name
    workers = [f"w{i + 1}" for i in range(max(2, args.workers))]
    print(f"uptime at start: {os.popen('uptime').read().strip()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "bench.yaml")
        iperf_pod = {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "infinity"]}]}
        with open(path, "w") as f:
            yaml.safe_dump({"name": name, "cluster": {"timeScale": 0.01, "backend": args.backend},
                            "nodes": [{"name": "m1", "unschedulable": True}] + [{"name": w} for w in workers],
                            "workloads": [
                                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "iperf-server"},
                                 "spec": dict(iperf_pod, nodeName=workers[0])},
                                {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "iperf-client"},
                                 "spec": dict(iperf_pod, nodeName=workers[1])}]}, f)
        iperf_server = None
        try:
            t0 = time.monotonic()
            clusters.up(load_topology(path), kubeconfig=False)
            print(f"up ({1 + len(workers)} nodes, 2 pods): {time.monotonic() - t0:.1f} s", flush=True)
            port = int(apiserver.read_config(name)["port"])
            c = Client(port)
            dt = create_pods(c, "real", args.real_pods, workers)
            print(f"created {args.real_pods} real pods through the API in {dt:.1f} s", flush=True)
            t0 = time.monotonic()
            up, last_change, last = 0, t0, -1
            while time.monotonic() - t0 < args.up_timeout and time.monotonic() - last_change < args.stall:
                up = running_count(c, "real")
                if up >= args.real_pods:
                    break
                if up != last:
                    last, last_change = up, time.monotonic()
                time.sleep(2)
            print(f"real pods Running: {up}/{args.real_pods} after {time.monotonic() - t0:.0f} s", flush=True)
            one = "real-0" if args.real_pods else "iperf-server"
            items = measure(c, port, args, one, "real pods only")
            objects = args.object_pods if args.total is None else max(0, args.total - len(items))
            if objects:
                dt = create_pods(c, "obj", objects, None)
                print(f"\ncreated {objects} object-only pods (Pending, no sandbox) in {dt:.1f} s", flush=True)
                items = measure(c, port, args, one, "real and object-only pods")

            pod_names = [p["metadata"]["name"] for p in items]
            load = finish_load(start_load(port, args.clients, args.load_seconds, pod_names))
            print(f"{args.clients} concurrent clients, GET pod for {args.load_seconds:.0f} s: "
                  f"{len(load['lat']) / load['wall']:.0f} req/s, {ms(load['lat'])}, errors {load['errors']}",
                  flush=True)

            server_ip = next(p["status"]["podIP"] for p in items if p["metadata"]["name"] == "iperf-server")
            iperf_server = subprocess.Popen(["ip", "netns", "exec", names.pod_ns(name, "default", "iperf-server"),
                                             "iperf3", "-s"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
            quiet, loaded, rates = [], [], []
            for _ in range(args.rounds):
                quiet.append(iperf(name, args.iperf_seconds, server_ip))
                proc = start_load(port, args.clients, args.iperf_seconds + 2, pod_names)
                time.sleep(1)
                loaded.append(iperf(name, args.iperf_seconds, server_ip))
                result = finish_load(proc)
                rates.append(len(result["lat"]) / result["wall"])
            print(f"\niperf3 pod to pod across nodes ({args.backend}), Gbit/s, {args.rounds} rounds")
            print(f"  API idle                    {spread(quiet)}")
            print(f"  API under {args.clients} clients      {spread(loaded)} "
                  f"(the load: {spread(rates, ' req/s')})")
            print(f"  loaded/idle per round       {spread([lo / q for lo, q in zip(loaded, quiet)])}")
            print(f"uptime at end: {os.popen('uptime').read().strip()}", flush=True)
            c.close()
            if args.profile:
                profile(name, one, args.profile)
        finally:
            if iperf_server is not None:
                iperf_server.terminate()
                iperf_server.wait(timeout=20)
            t0 = time.monotonic()
            clusters.teardown(name, graceful=False)
            print(f"teardown: {time.monotonic() - t0:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
