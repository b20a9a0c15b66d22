#!/usr/bin/env python3
"""LIST through the API server, whole and in kubectl's pages, and the store's write cost.

    .venv/bin/python tools/bench_api_list.py [--pods 1000] [--rounds 30] [--baseline-repo DIR]

No cluster and no root: an ApiServer over a temporary SQLite store holding
--pods pods, served over HTTP on 127.0.0.1 (trio and h11, as in a cluster), and
one keep-alive client that asks as kubectl does:

  - whole:  GET /api/v1/pods                       (the list in one answer)
  - paged:  GET /api/v1/pods?limit=500, then ?continue=... until the end
            (kubectl's default --chunk-size; every page read at the first
            page's revision: store.list_at)

each as JSON and as a server-side Table. Printed per case: median and p10-p90
of the time to the whole list, and the ratio of paged to whole (measured in the
same run, rounds interleaved).

Store writes: --writes puts (one object each, as pods are written) timed on
this tree's SqliteStore and, with --baseline-repo, on another tree's (say, main
before the events index), in separate processes, interleaved over --write-rounds.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

TABLE = ("application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,"
         "application/json")

WRITE_SNIPPET = r"""
import json, os, sys, tempfile, time
sys.path.insert(0, sys.argv[1])
from netemu.store.sqlite import SqliteStore
n = int(sys.argv[2])
d = tempfile.mkdtemp()
store = SqliteStore(os.path.join(d, "state.db"), create=True)
pod = {"kind": "Pod", "metadata": {"name": "p", "labels": {"app": "x"}},
       "spec": {"containers": [{"name": "c", "image": "nginx"}]}, "status": {"phase": "Running"}}
t0 = time.perf_counter()
for i in range(n):
    store.put(f"/registry/pods/default/p{i % 500}", pod)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def _fill(store, pods: int) -> None:
    from netemu.store import registry

    for i in range(pods):
        registry.create(store, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"web-{i:05d}", "namespace": "default", "labels": {"app": "web"}},
            "spec": {"nodeName": f"node{i % 10}", "containers": [{"name": "c", "image": "nginx",
                                                                   "ports": [{"containerPort": 80}]}]},
            "status": {"phase": "Running", "podIP": f"10.244.{i // 250}.{i % 250 + 2}",
                       "conditions": [{"type": "Ready", "status": "True"}],
                       "containerStatuses": [{"name": "c", "ready": True, "restartCount": 0,
                                              "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}}]}})


def _serve(store, ready: threading.Event, box: dict) -> None:
    import trio

    from netemu.apiserver import http as apihttp, status
    from netemu.apiserver.server import ApiServer

    server = ApiServer(store)

    async def main():
        listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
        box["port"] = listeners[0].socket.getsockname()[1]
        ready.set()
        await apihttp.serve(listeners, server.handle, status.too_large, status.bad_request)

    trio.run(main)


def _list(conn: http.client.HTTPConnection, accept: str, limit: int | None) -> int:
    """One whole list (all its pages); returns the number of items."""
    token, items = None, 0
    while True:
        path = "/api/v1/pods"
        if limit:
            path += f"?limit={limit}" + (f"&continue={token}" if token else "")
        conn.request("GET", path, headers={"Accept": accept})
        resp = conn.getresponse()
        body = json.loads(resp.read())
        assert resp.status == 200, body
        items += len(body.get("rows") or body.get("items") or [])
        token = body["metadata"].get("continue")
        if not token:
            return items


def _summary(xs: list[float]) -> tuple[float, float, float]:
    xs = sorted(xs)
    return statistics.median(xs), xs[len(xs) // 10], xs[(len(xs) * 9) // 10]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pods", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--chunk", type=int, default=500, help="kubectl's --chunk-size (default 500)")
    parser.add_argument("--writes", type=int, default=2000)
    parser.add_argument("--write-rounds", type=int, default=5)
    parser.add_argument("--baseline-repo", help="another netemu tree whose store writes are the baseline")
    args = parser.parse_args()

    from netemu.apiserver.server import ensure_system_namespaces
    from netemu.store.sqlite import SqliteStore

    tmp = tempfile.mkdtemp(prefix="bench-api-")
    store = SqliteStore(os.path.join(tmp, "state.db"), create=True)
    ensure_system_namespaces(store)
    _fill(store, args.pods)
    ready, box = threading.Event(), {}
    threading.Thread(target=_serve, args=(store, ready, box), daemon=True).start()
    ready.wait(10)
    conn = http.client.HTTPConnection("127.0.0.1", box["port"])
    cases = [("JSON", "application/json"), ("Table", TABLE)]
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(3):                                  # warm-up
        for _, accept in cases:
            _list(conn, accept, None)
    for _ in range(args.rounds):
        for name, accept in cases:
            for mode, limit in (("whole", None), ("paged", args.chunk)):
                t0 = time.perf_counter()
                n = _list(conn, accept, limit)
                times.setdefault((name, mode), []).append(time.perf_counter() - t0)
                assert n == args.pods, n
    print(f"LIST {args.pods} pods over HTTP, {args.rounds} rounds, pages of {args.chunk} "
          f"(median, p10-p90, ms):")
    for name, _ in cases:
        whole, paged = _summary(times[(name, "whole")]), _summary(times[(name, "paged")])
        ratios = sorted(p / w for p, w in zip(times[(name, "paged")], times[(name, "whole")]))
        print(f"  {name:5s} whole {whole[0] * 1e3:7.1f} ({whole[1] * 1e3:.1f}-{whole[2] * 1e3:.1f})   "
              f"paged {paged[0] * 1e3:7.1f} ({paged[1] * 1e3:.1f}-{paged[2] * 1e3:.1f})   "
              f"paged/whole {statistics.median(ratios):.2f} "
              f"({ratios[len(ratios) // 10]:.2f}-{ratios[(len(ratios) * 9) // 10]:.2f})")

    trees = [("this tree", REPO)] + ([("baseline", args.baseline_repo)] if args.baseline_repo else [])
    writes: dict[str, list[float]] = {}
    for _ in range(args.write_rounds):
        for label, tree in trees:
            out = subprocess.run([sys.executable, "-c", WRITE_SNIPPET, tree, str(args.writes)],
                                 capture_output=True, text=True, check=True).stdout
            writes.setdefault(label, []).append(json.loads(out)["seconds"] / args.writes)
    print(f"store writes ({args.writes} puts, {args.write_rounds} rounds; median, min-max, us per put):")
    for label, _ in trees:
        xs = sorted(writes[label])
        print(f"  {label:9s} {statistics.median(xs) * 1e6:7.1f} ({xs[0] * 1e6:.1f}-{xs[-1] * 1e6:.1f})")
    if args.baseline_repo:
        ratios = sorted(a / b for a, b in zip(writes["this tree"], writes["baseline"]))
        print(f"  this/baseline {statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})")
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
