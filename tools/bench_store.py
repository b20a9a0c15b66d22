#!/usr/bin/env python3
"""Store latency, SQLite vs etcd: put, get and watch-event (a measurement, not a test).

    sudo .venv/bin/python tools/bench_store.py [--rounds 5] [--ops 300] [--gap 0.05]

Each round, for each backend in turn (the order alternates round by round, so
drift on a shared machine falls on both): OPS puts of a small object (a
Pod-sized JSON of ~1 KB) to distinct keys, OPS gets of them, and OPS
watch-event latencies: a writer thread with its own store object (as another
process would be) puts a key and the time until a trio watch in this thread
yields its event is taken, one write at a time. SQLite is a fresh file in a
temp dir; etcd (Debian's etcd-server, default fsync) a fresh member on a free
loopback port with a temp data dir, stopped at the end.

Prints, per backend and operation, the median over rounds of the per-round
median latency with the rounds' min-max, and the etcd/SQLite ratio of the
per-round medians (median and min-max over rounds). Takes the machine's
benchmark lock (/run/netemu-bench.lock, as `netemu bench`) too.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import statistics
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))

import trio  # noqa: E402

from netemu.store.etcd import EtcdStore  # noqa: E402
from netemu.store.etcdrun import EtcdServer  # noqa: E402
from netemu.store.sqlite import SqliteStore  # noqa: E402

VALUE = {"kind": "Pod", "metadata": {"name": "p", "namespace": "default", "labels": {"app": "web"}},
         "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["httpd", "-f"] * 20}]},
         "status": {"phase": "Running", "podIP": "10.244.1.5", "conditions": [{"type": "Ready"}] * 8}}


def timed_puts(store, prefix: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        store.put(f"{prefix}{i:05d}", VALUE)
        out.append(time.perf_counter() - t)
    return out


def timed_gets(store, prefix: str, n: int) -> list[float]:
    out = []
    for i in range(n):
        t = time.perf_counter()
        assert store.get(f"{prefix}{i:05d}") is not None
        out.append(time.perf_counter() - t)
    return out


def watch_latencies(open_store, store, prefix: str, n: int, gap: float) -> list[float]:
    """One write at a time from another store object; put -> event yielded."""
    writer = open_store()
    out: list[float] = []

    async def main():
        since = store.revision()
        sent: dict[str, float] = {}
        go = trio.Semaphore(0)

        def write(i: int) -> None:
            key = f"{prefix}{i:05d}"
            sent[key] = time.perf_counter()
            writer.put(key, VALUE)

        async with trio.open_nursery() as nursery:
            async def watch():
                async for ev in store.watch(prefix, since):
                    out.append(time.perf_counter() - sent[ev.key])
                    go.release()
                    if len(out) == n:
                        nursery.cancel_scope.cancel()
            nursery.start_soon(watch)
            await trio.sleep(0.2)
            for i in range(n):
                await trio.to_thread.run_sync(write, i)
                with trio.fail_after(30):
                    await go.acquire()
                await trio.sleep(gap)

    trio.run(main)
    writer.close()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--ops", type=int, default=300)
    parser.add_argument("--gap", type=float, default=0.05,
                        help="seconds between watched writes (SQLite's watch reads at most every "
                             "30 ms while writes keep coming: a gap below that measures its throttle)")
    args = parser.parse_args()

    lock = open("/run/netemu-bench.lock", "w")
    fcntl.flock(lock, fcntl.LOCK_EX)
    tmp = tempfile.mkdtemp(prefix="he-bench-store-")
    server = EtcdServer(os.path.join(tmp, "etcd")).start()
    results: dict[tuple[str, str], list[float]] = {}
    try:
        for r in range(args.rounds):
            order = ["sqlite", "etcd"] if r % 2 == 0 else ["etcd", "sqlite"]
            for backend in order:
                if backend == "sqlite":
                    path = os.path.join(tmp, f"state-{r}.db")
                    SqliteStore(path, create=True).close()

                    def open_store(path=path):
                        return SqliteStore(path)
                else:
                    def open_store():
                        return EtcdStore(server.endpoint)
                store = open_store()
                prefix = f"/bench/{r}/"
                for op, samples in (("put", timed_puts(store, prefix + "kv/", args.ops)),
                                    ("get", timed_gets(store, prefix + "kv/", args.ops)),
                                    ("watch", watch_latencies(open_store, store, prefix + "w/", args.ops, args.gap))):
                    results.setdefault((backend, op), []).append(statistics.median(samples))
                store.close()
            print(f"round {r + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        server.stop()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"{args.rounds} rounds x {args.ops} ops; per-round median latency, ms: median [min-max] over rounds")
    print(f"{'op':6} {'sqlite':>22} {'etcd':>22} {'etcd/sqlite':>22}")
    for op in ("put", "get", "watch"):
        s, e = results[("sqlite", op)], results[("etcd", op)]
        ratios = [b / a for a, b in zip(s, e)]

        def fmt(xs, scale=1000.0, digits=3):
            return (f"{statistics.median(xs) * scale:.{digits}f} "
                    f"[{min(xs) * scale:.{digits}f}-{max(xs) * scale:.{digits}f}]")
        print(f"{op:6} {fmt(s):>22} {fmt(e):>22} {fmt(ratios, 1.0, 1):>22}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
