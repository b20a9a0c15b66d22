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


def quiet(monkeypatch) -> None:
    """No safety read and no expiry check: only a bell (or the WAL) can wake a watch."""
    monkeypatch.setattr(sqlite, "SAFETY_INTERVAL", 3600.0)
    monkeypatch.setattr(sqlite, "EXPIRY_CHECK_INTERVAL", 3600.0)


def count_wakes(store, monkeypatch) -> list:
    """A list that grows by one at each of STORE's shared reads."""
    wakes = []
    real = store._read_revision

    def counted():
        wakes.append(1)
        real()

    monkeypatch.setattr(store, "_read_revision", counted)
    return wakes


def watch_until_seen(nursery, store, prefix: str, since: int, seen: list) -> None:
    """Watch PREFIX from SINCE in NURSERY: the first event's key goes to SEEN
    and ends the nursery."""
    async def watch():
        async for ev in store.watch(prefix, since):
            seen.append(ev.key)
            nursery.cancel_scope.cancel()
    nursery.start_soon(watch)


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
            watch_until_seen(nursery, store, "/a/", since, seen)
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


def test_every_key_under_a_prefix_rings_that_prefixs_bell():
    """bell_for(P) is among rung_by(K) for every key K under P (the property
    the bells rest on), on random keys and prefixes."""
    import random

    rng = random.Random(3)
    segments = ["registry", "pods", "default", "a", "web", "x.y", "coreos.com", "network", "subnets"]
    checked = 0
    for _ in range(3000):
        key = "/" + "/".join(rng.choice(segments) for _ in range(rng.randint(1, 6)))
        if rng.random() < 0.2:
            key += "/"
        cut = rng.randint(0, len(key))
        prefix = key[:cut]
        bell = sqlite.bell_for(prefix)
        if bell is not None:
            assert key.startswith(bell) and bell in sqlite.rung_by(key), (key, prefix, bell)
            checked += 1
    assert checked > 1000
    assert sqlite.bell_for("/registry/") is None and sqlite.bell_for("") is None
    assert sqlite.rung_by("/registry/pods/default/web") == ["/registry/pods/", "/registry/pods/default/"]


@pytest.mark.timeout(60)
def test_writes_under_other_bells_do_not_wake_a_watch(store, tmp_path, monkeypatch):
    """A watch of /registry/pods/ waits on its bell: another process's writes
    under /registry/leases/ wake it not once (no safety read either: the
    interval is an hour here), and the pod written next is seen, which only
    its bell can have told."""
    quiet(monkeypatch)
    other = SqliteStore(str(tmp_path / "state.db"))
    wakes = count_wakes(store, monkeypatch)
    seen = []

    async def main():
        since = store.revision()
        async with trio.open_nursery() as nursery:
            watch_until_seen(nursery, store, "/registry/pods/", since, seen)
            await trio.sleep(0.3)
            before = len(wakes)
            for i in range(30):
                other.put(f"/registry/leases/kube-node-lease/n{i}", i)
                await trio.sleep(0.01)
            await trio.sleep(0.3)
            noise = len(wakes) - before
            other.put("/registry/pods/default/web", 1)
            await trio.sleep(30)            # cancelled by the watch
        return noise

    noise = trio.run(main)
    other.close()
    assert isinstance(store._bell_watch, sqlite.BellWatch), "no FIFO bell here"
    assert noise == 0
    assert seen == ["/registry/pods/default/web"]


@pytest.mark.timeout(60)
def test_a_new_watch_is_heard_while_another_waits(store, tmp_path, monkeypatch):
    """A watch that starts while the store object's shared wait listens to
    other bells (or only to bells, for a shallow prefix: the WAL) is heard at
    once, not at the next safety read."""
    quiet(monkeypatch)
    other = SqliteStore(str(tmp_path / "state.db"))
    seen = []

    async def main():
        since = store.revision()
        async with trio.open_nursery() as nursery:
            async def watch(prefix):
                async for ev in store.watch(prefix, since):
                    seen.append((prefix, ev.key))
            nursery.start_soon(watch, "/registry/services/")
            await trio.sleep(0.3)
            nursery.start_soon(watch, "/coreos.com/network/subnets/")
            await trio.sleep(0.3)
            other.put("/coreos.com/network/subnets/10.1.0.0-24", 1)
            with trio.move_on_after(20):
                while len(seen) < 1:
                    await trio.sleep(0.01)
            nursery.start_soon(watch, "/x/")              # one segment: the WAL
            await trio.sleep(0.3)
            other.put("/x/y", 2)
            with trio.move_on_after(20):
                while len(seen) < 2:
                    await trio.sleep(0.01)
            nursery.cancel_scope.cancel()

    trio.run(main)
    other.close()
    assert seen == [("/coreos.com/network/subnets/", "/coreos.com/network/subnets/10.1.0.0-24"),
                    ("/x/", "/x/y")]


@pytest.mark.timeout(60)
def test_a_kubelets_bell_rings_for_its_own_nodes_pods_only(store, tmp_path, monkeypatch):
    """watch_containing listens to a bell of its text: another process's
    writes of other nodes' pods wake it not once; its own pod's write and
    deletion do (and only its bell can have told: no safety read)."""
    quiet(monkeypatch)
    other = SqliteStore(str(tmp_path / "state.db"))
    wakes = count_wakes(store, monkeypatch)
    seen = []

    async def main():
        since = store.revision()
        async with trio.open_nursery() as nursery:
            async def watch():
                async for ev in store.watch_containing("/registry/pods/", since, '"nodeName":"n1"'):
                    seen.append((ev.type, ev.key))
                    if ev.type == "DELETE":
                        nursery.cancel_scope.cancel()
            nursery.start_soon(watch)
            await trio.sleep(0.3)
            before = len(wakes)
            for i in range(20):
                other.put(f"/registry/pods/default/p{i}", {"spec": {"nodeName": f"n1{i}"}})
                await trio.sleep(0.01)
            await trio.sleep(0.3)
            noise = len(wakes) - before
            other.put("/registry/pods/default/mine", {"spec": {"nodeName": "n1"}})
            with trio.move_on_after(20):
                while not seen:
                    await trio.sleep(0.01)
            other.delete("/registry/pods/default/mine")
            await trio.sleep(30)            # cancelled by the watch
        return noise

    noise = trio.run(main)
    other.close()
    assert noise == 0
    assert seen == [("PUT", "/registry/pods/default/mine"), ("DELETE", "/registry/pods/default/mine")]


@pytest.mark.timeout(60)
def test_bells_need_no_inotify_instance(store, tmp_path, monkeypatch):
    """inotify instances are few and machine-wide (fs.inotify.max_user_instances):
    with none to be had, a bell watch still hears its write at once (no safety
    read here), through its FIFO."""
    quiet(monkeypatch)

    def no_instances():
        raise OSError(24, "inotify_init1: Too many open files")

    monkeypatch.setattr(sqlite, "Inotify", no_instances)
    other = SqliteStore(str(tmp_path / "state.db"))
    seen = []

    async def main():
        since = store.revision()
        async with trio.open_nursery() as nursery:
            watch_until_seen(nursery, store, "/registry/services/", since, seen)
            await trio.sleep(0.3)
            other.put("/registry/services/default/web", 1)
            await trio.sleep(30)            # cancelled by the watch
    trio.run(main)
    other.close()
    assert seen == ["/registry/services/default/web"]
    assert isinstance(store._bell_watch, sqlite.BellWatch) and store._wal_watch is None


def test_a_dead_listeners_link_is_removed_by_the_next_ring(tmp_path):
    """A listener's link with no reader behind it (its process died) costs the
    writer one failed open, once: the ring removes it. A listener that closes
    takes its links and FIFO with it."""
    db = str(tmp_path / "state.db")
    alive, dead = sqlite.BellWatch(db), sqlite.BellWatch(db)
    bell = ("/registry/services/", None)
    alive.sync({bell})
    dead.sync({bell})
    folder = sqlite._bell_file(sqlite.bells_dir(db), bell)
    assert sorted(os.listdir(folder)) == sorted([alive.name, dead.name])
    os.close(dead.fd)                        # as if its process had died: no reader left
    sqlite.ring(folder)
    assert os.listdir(folder) == [alive.name]
    assert alive.drain() and not alive.drain()
    alive.close()
    assert os.listdir(folder) == []
    assert os.listdir(os.path.join(sqlite.bells_dir(db), sqlite.EARS)) == [dead.name]
