"""The SQLite store's watches pay (almost) nothing for writes outside their
prefix, and a kubelet's pod watch decodes only its own node's pods."""

import json
import os
import types

import pytest
import trio

from netemu.node.kubelet import Kubelet
from netemu.store import sqlite
from netemu.store.sqlite import SqliteStore


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(str(tmp_path / "state.db"), create=True)
    yield s
    s.close()


@pytest.mark.timeout(60)
def test_writes_outside_the_prefix_read_no_events(store, tmp_path, monkeypatch):
    """Writes under /b/ (another process's) wake the watch of /a/, but it reads
    no events for them; the write under /a/ that follows is still seen."""
    other = SqliteStore(str(tmp_path / "state.db"))
    reads = []
    real = store.events_since

    def counted(revision, prefix="", **kw):
        reads.append(prefix)
        return real(revision, prefix, **kw)

    monkeypatch.setattr(store, "events_since", counted)
    monkeypatch.setattr(sqlite, "EXPIRY_CHECK_INTERVAL", 3600.0)
    seen = []

    async def main():
        since = store.revision()
        async with trio.open_nursery() as nursery:
            async def watch():
                async for ev in store.watch("/a/", since):
                    seen.append(ev.key)
                    nursery.cancel_scope.cancel()
            nursery.start_soon(watch)
            await trio.sleep(0.2)
            for i in range(40):
                other.put(f"/b/{i}", i)
                await trio.sleep(0.02)
            await trio.sleep(0.3)
            noise_reads = len(reads)
            other.put("/a/x", 1)
            await trio.sleep(30)            # cancelled by the watch
        return noise_reads

    noise_reads = trio.run(main)
    other.close()
    assert isinstance(store._wal_watch, sqlite.WalWatch), "inotify unavailable here"
    # At most the first read (the window starts at the first wake-up); without
    # the window every one of the ~40 wake-ups read events.
    assert noise_reads <= 1, reads
    assert seen == ["/a/x"]


@pytest.mark.timeout(60)
def test_watch_containing_skips_other_values_but_not_deletions(store):
    since = store.revision()
    store.put("/p/1", {"spec": {"nodeName": "n1"}})
    store.put("/p/2", {"spec": {"nodeName": "n10"}})
    store.put("/p/3", {"spec": {}})
    store.delete("/p/1")
    store.delete("/p/2")
    seen = []

    async def main():
        with trio.move_on_after(2):
            async for ev in store.watch_containing("/p/", since, '"nodeName":"n1"'):
                seen.append((ev.type, ev.key))

    trio.run(main)
    assert seen == [("PUT", "/p/1"), ("DELETE", "/p/1")]


@pytest.mark.timeout(60)
def test_a_kubelet_watches_only_its_own_nodes_pods(store):
    since = store.revision()
    for node in ("n1", "n10", "n2"):
        store.put(f"/registry/pods/default/{node}", {"metadata": {"uid": node, "name": node},
                                                      "spec": {"nodeName": node}})
    store.put("/registry/pods/default/pending", {"metadata": {"uid": "u"}, "spec": {}})
    store.put("/registry/podsx/default/n1", {"spec": {"nodeName": "n1"}})
    kubelet = types.SimpleNamespace(store=store, node="n1")
    seen = []

    async def main():
        with trio.move_on_after(2):
            async for ev in Kubelet._watch_pods(kubelet, since):
                seen.append(ev.key)

    trio.run(main)
    assert seen == ["/registry/pods/default/n1"]
    # Without the store's filter (another backend), every pod.
    plain = types.SimpleNamespace(store=types.SimpleNamespace(watch=store.watch), node="n1")
    seen.clear()

    async def plain_main():
        with trio.move_on_after(2):
            async for ev in Kubelet._watch_pods(plain, since):
                seen.append(ev.key)

    trio.run(plain_main)
    assert seen == [f"/registry/pods/default/{n}" for n in ("n1", "n10", "n2", "pending")]
