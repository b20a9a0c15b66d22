import threading

import pytest
import trio

from netemu.store.base import Conflict
from netemu.store.sqlite import SqliteStore


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(str(tmp_path / "state.db"), create=True)
    yield s
    s.close()


def test_revisions_and_conditional_writes(store):
    r1 = store.put("/a", {"x": 1})
    assert store.get("/a").mod_revision == r1 and store.revision() == r1
    with pytest.raises(Conflict):
        store.put("/a", {"x": 2}, expect_revision=0)
    assert store.create("/a", {"x": 3}) is None
    r2 = store.put("/a", {"x": 2}, expect_revision=r1)
    assert store.get("/a").value == {"x": 2} and store.get("/a").create_revision == r1
    with pytest.raises(Conflict):
        store.delete("/a", expect_revision=r1)
    assert store.delete("/a", expect_revision=r2)
    assert store.get("/a") is None


def test_prefix_listing_is_exact(store):
    store.put("/registry/pods/default/a", 1)
    store.put("/registry/pods/default/b", 2)
    store.put("/registry/podsx/default/c", 3)
    assert [kv.key for kv in store.list("/registry/pods/")] == ["/registry/pods/default/a",
                                                                "/registry/pods/default/b"]


def test_ttl_expiry_is_a_delete_event(store):
    store.put("/lease", {"n": 1}, ttl=0.05)
    rev = store.revision()
    import time
    time.sleep(0.1)
    assert store.get("/lease") is None
    events = store.events_since(rev, "/lease")
    assert [e.type for e in events] == ["DELETE"]


@pytest.mark.timeout(120)
def test_watch_sees_every_write_under_concurrent_writers(store, tmp_path):
    """No event may be skipped, however the writers interleave with the poll."""
    n_writers, per_writer = 3, 150
    seen = []
    errors = []

    def writer(i):
        other = SqliteStore(str(tmp_path / "state.db"))
        try:
            for k in range(per_writer):
                other.put(f"/w/{i}/{k}", k)
                other.put(f"/noise/{i}/{k}", k)   # writes outside the watched prefix
        except Exception as e:  # reported below rather than lost in the thread
            errors.append(repr(e))
        finally:
            other.close()

    async def main():
        since = store.revision()
        threads = [threading.Thread(target=writer, args=(i,)) for i in range(n_writers)]
        for t in threads:
            t.start()
        with trio.move_on_after(60):
            async for ev in store.watch("/w/", since):
                seen.append(ev.key)
                if len(seen) == n_writers * per_writer:
                    break
        for t in threads:
            t.join()

    trio.run(main)
    assert not errors
    assert len(seen) == len(set(seen)) == n_writers * per_writer


@pytest.mark.timeout(60)
def test_an_idle_watch_waits_for_writes_instead_of_polling(store, tmp_path):
    """Watches wake on the WAL's inotify events: while nothing is written the store
    is read about once a second (the safety read), and a write from another
    connection (another process in a cluster) is still seen."""
    from netemu.store import sqlite

    other = SqliteStore(str(tmp_path / "state.db"))
    reads = []
    real_revision = store.revision

    def counted():
        reads.append(1)
        return real_revision()

    store.revision = counted
    seen = []

    async def main():
        since = real_revision()
        async with trio.open_nursery() as nursery:
            async def watch():
                async for ev in store.watch("/w/", since):
                    seen.append(ev.key)
                    nursery.cancel_scope.cancel()
            nursery.start_soon(watch)
            await trio.sleep(2.5)
            idle_reads = len(reads)
            other.put("/w/x", 1)
            await trio.sleep(60)            # cancelled by the watch
        return idle_reads

    idle_reads = trio.run(main)
    other.close()
    assert isinstance(store._wal_watch, sqlite.WalWatch), "inotify unavailable here"
    # 2.5 s idle: the first read, then one safety read a second (polling: ~80).
    assert idle_reads <= 5
    assert seen == ["/w/x"]


def test_list_at_is_the_state_at_that_revision_over_compaction(store, monkeypatch):
    """A paged list reads every page at its first page's revision (list_at);
    compaction keeps what that needs (each key's newest PUT) for every
    revision it has not compacted, and refuses older ones."""
    import random

    from netemu.store import sqlite
    from netemu.store.base import Compacted

    monkeypatch.setattr(sqlite, "EVENTS_KEPT", 300)
    rng = random.Random(7)
    keys = [f"/registry/pods/default/p{i:02d}" for i in range(25)]
    state: dict[str, tuple[int, int]] = {}          # key -> (value, mod_revision)
    snapshots = {}
    store.put("/registry/podsx/default/other", 0)   # another prefix: never listed
    for n in range(2100):
        k = rng.choice(keys)
        if k in state and rng.random() < 0.3:
            store.delete(k)
            del state[k]
        else:
            rev = store.put(k, n)
            state[k] = (n, rev)
        snapshots[store.revision()] = dict(state)
    current = store.revision()
    compacted = store._db.execute("SELECT compacted FROM meta WHERE id = 0").fetchone()[0]
    assert compacted == 2000 - 300
    rows = store._db.execute("SELECT COUNT(*) FROM events WHERE rev <= ?", (compacted,)).fetchone()[0]
    assert rows <= len(keys) + 1                     # at most one kept row per key
    for rev in [compacted, compacted + 1, current - 1, current] + rng.sample(range(compacted, current), 40):
        want = sorted((k, v, r) for k, (v, r) in snapshots[rev].items())
        got = [(kv.key, kv.value, kv.mod_revision) for kv in store.list_at("/registry/pods/", rev)]
        assert got == want, rev
        # in pages of 4, each after the last key of the one before
        paged, start = [], ""
        while True:
            page = store.list_at("/registry/pods/", rev, start, 4)
            paged += [(kv.key, kv.value, kv.mod_revision) for kv in page]
            if len(page) < 4:
                break
            start = page[-1].key
        assert paged == want, rev
    with pytest.raises(Compacted):
        store.list_at("/registry/pods/", compacted - 1)
