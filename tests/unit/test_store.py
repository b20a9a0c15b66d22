"""The Store contract: every behavioural test here runs unchanged against the
SQLite store and the etcd store (a real etcd per test, see the etcd_server
fixture); tests of one backend's internals say so in their name."""

import threading
import time

import pytest
import trio

from netemu.store.base import Compacted, Conflict
from netemu.store.sqlite import SqliteStore


class SqliteBackend:
    name = "sqlite"

    def __init__(self, tmp_path):
        self.path = str(tmp_path / "state.db")
        SqliteStore(self.path, create=True).close()

    def open(self):
        return SqliteStore(self.path)

    def compact(self, store, revision):
        """Forget history up to REVISION as the store's own compaction does
        (SqliteStore compacts by itself every 1000 writes; here, at once)."""
        with store._write() as db:
            db.execute("DELETE FROM events WHERE rev <= ? AND NOT (type = 'PUT' AND rev = "
                       "(SELECT MAX(x.rev) FROM events x WHERE x.key = events.key AND x.rev <= ?))",
                       (revision, revision))
            db.execute("UPDATE meta SET compacted = ? WHERE id = 0", (revision,))

    def close(self):
        pass


class EtcdBackend:
    name = "etcd"

    def __init__(self, server):
        self.server = server

    def open(self):
        from netemu.store.etcd import EtcdStore
        return EtcdStore(self.server.endpoint)

    def compact(self, store, revision):
        store.compact(revision)


@pytest.fixture(params=["sqlite", "etcd"])
def backend(request, tmp_path):
    if request.param == "sqlite":
        return SqliteBackend(tmp_path)
    return EtcdBackend(request.getfixturevalue("etcd_server"))


@pytest.fixture
def store(backend):
    s = backend.open()
    yield s
    s.close()


def wait_until(predicate, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


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
    store.put("/lease", {"n": 1}, ttl=1)
    rev = store.revision()
    assert wait_until(lambda: store.get("/lease") is None, 8)
    events = store.events_since(rev, "/lease")
    assert [(e.type, e.value) for e in events] == [("DELETE", {"n": 1})]


def test_a_ttl_key_lives_while_its_owner_renews_it_and_goes_when_it_stops(backend, store):
    """The owner keeps a TTL key alive by writing it again (with etcd: the
    key's lease is renewed); when the owner stops (dies), the key expires."""
    owner = backend.open()
    owner.put("/registry/leases/n1", {"holder": "n1"}, ttl=2)
    first = store.get("/registry/leases/n1")
    start = time.monotonic()
    while time.monotonic() - start < 5:          # well past the TTL (and etcd's minimum)
        owner.put("/registry/leases/n1", {"holder": "n1"}, ttl=2)
        assert store.get("/registry/leases/n1") is not None
        time.sleep(0.5)
    assert store.get("/registry/leases/n1").create_revision == first.create_revision
    owner.close()                                # the owner is gone: no more renewals
    assert store.get("/registry/leases/n1") is not None
    assert wait_until(lambda: (store.expire() or True) and store.get("/registry/leases/n1") is None, 8)


def test_a_watch_from_a_compacted_revision_raises_compacted(backend, store):
    first = store.put("/c/a", 1)
    for i in range(5):
        store.put("/c/a", i)
    backend.compact(store, store.revision() - 1)
    with pytest.raises(Compacted):
        store.events_since(first, "/c/")
    with pytest.raises(Compacted):
        store.list_at("/c/", first)

    async def main():
        with trio.fail_after(10):
            async for _ in store.watch("/c/", first):
                pass

    with pytest.raises(Compacted):
        trio.run(main)
    # revisions from the compaction point on are still served
    assert [kv.value for kv in store.list_at("/c/", store.revision())] == [4]


def test_concurrent_compare_and_swap_from_two_clients_exactly_one_wins(backend, store):
    rev = store.put("/cas", {"n": 0})
    clients = [backend.open(), backend.open()]
    barrier = threading.Barrier(2)
    outcome = [None, None]

    def swap(i):
        barrier.wait()
        try:
            outcome[i] = clients[i].put("/cas", {"n": i + 1}, expect_revision=rev)
        except Conflict:
            outcome[i] = "conflict"

    for _ in range(10):
        rev = store.get("/cas").mod_revision
        threads = [threading.Thread(target=swap, args=(i,)) for i in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        winners = [o for o in outcome if o != "conflict"]
        assert len(winners) == 1, outcome
        assert store.get("/cas").mod_revision == winners[0]
    for c in clients:
        c.close()


def test_create_if_absent_from_two_clients_exactly_one_wins(backend, store):
    clients = [backend.open(), backend.open()]
    barrier = threading.Barrier(2)
    outcome = [None, None]

    def create(i):
        barrier.wait()
        outcome[i] = clients[i].create("/registry/nodes/n1", {"by": i})

    threads = [threading.Thread(target=create, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(o is None for o in outcome) == [False, True]
    winner = 0 if outcome[0] is not None else 1
    assert store.get("/registry/nodes/n1").value == {"by": winner}
    for c in clients:
        c.close()


def test_delete_prefix_and_events_since_carry_deleted_values(store):
    base = store.revision()
    store.put("/d/a", "A")
    store.put("/d/b", "B")
    store.put("/dx/c", "C")
    assert store.delete_prefix("/d/") == 2
    assert store.list("/d/") == [] and [kv.key for kv in store.list("/dx/")] == ["/dx/c"]
    events = [(e.type, e.key, e.value) for e in store.events_since(base, "/d/")]
    assert events == [("PUT", "/d/a", "A"), ("PUT", "/d/b", "B"),
                      ("DELETE", "/d/a", "A"), ("DELETE", "/d/b", "B")]
    assert store.existed_before("/d/a", store.revision() + 1) is False
    assert store.existed_before("/d/a", base + 2) is True


@pytest.mark.timeout(120)
def test_watch_sees_every_write_under_concurrent_writers(backend, store):
    """No event may be skipped, however the writers interleave with the poll."""
    n_writers, per_writer = 3, 150
    seen = []
    errors = []

    def writer(i):
        other = backend.open()
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
def test_sqlite_an_idle_watch_waits_for_writes_instead_of_polling(tmp_path):
    """The SQLite store's own wait (etcd's watch is a stream): watches wake on
    the WAL's inotify events: while nothing is written the store is read about
    once a second (the safety read), and a write from another connection
    (another process in a cluster) is still seen."""
    from netemu.store import sqlite

    store = SqliteStore(str(tmp_path / "state.db"), create=True)
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
    store.revision = real_revision
    wal_watch = store._wal_watch
    store.close()
    assert isinstance(wal_watch, sqlite.WalWatch), "inotify unavailable here"
    # 2.5 s idle: the first read, then one safety read a second (polling: ~80).
    assert idle_reads <= 5
    assert seen == ["/w/x"]


def test_list_at_is_the_state_at_that_revision_over_compaction(backend, store, monkeypatch):
    """A paged list reads every page at its first page's revision (list_at);
    compaction keeps what that needs for every revision it has not
    compacted, and refuses older ones. (SQLite compacts by itself every 1000
    writes, keeping EVENTS_KEPT; etcd is compacted here by hand.)"""
    import random

    from netemu.store import sqlite

    monkeypatch.setattr(sqlite, "EVENTS_KEPT", 300)
    rng = random.Random(7)
    keys = [f"/registry/pods/default/p{i:02d}" for i in range(25)]
    state: dict[str, tuple[int, int]] = {}          # key -> (value, mod_revision)
    snapshots = {}
    store.put("/registry/podsx/default/other", 0)   # another prefix: never listed
    writes = 2100 if backend.name == "sqlite" else 700
    for n in range(writes):
        k = rng.choice(keys)
        if k in state and rng.random() < 0.3:
            store.delete(k)
            del state[k]
        else:
            rev = store.put(k, n)
            state[k] = (n, rev)
        snapshots[store.revision()] = dict(state)
    current = store.revision()
    if backend.name == "sqlite":
        compacted = store._db.execute("SELECT compacted FROM meta WHERE id = 0").fetchone()[0]
        assert compacted == 2000 - 300
        rows = store._db.execute("SELECT COUNT(*) FROM events WHERE rev <= ?", (compacted,)).fetchone()[0]
        assert rows <= len(keys) + 1                 # at most one kept row per key
    else:
        compacted = current - 300
        backend.compact(store, compacted)
    for rev in [compacted, compacted + 1, current - 1, current] + rng.sample(range(compacted, current), 40):
        want = sorted((k, v, r) for k, (v, r) in snapshots[rev].items())
        got = [(kv.key, kv.value, kv.mod_revision) for kv in store.list_at("/registry/pods/", rev)]
        assert got == want, rev
        # in pages of 4, each after the last key of the one before
        paged, start = [], ""
        while True:
            page = store.list_at("/registry/pods/", rev, start, 4)
            paged += [(kv.key, kv.value, kv.mod_revision) for kv in page]
            assert store.count_at("/registry/pods/", rev, start) == len(want) - len(paged) + len(page)
            if len(page) < 4:
                break
            start = page[-1].key
        assert paged == want, rev
    with pytest.raises(Compacted):
        store.list_at("/registry/pods/", compacted - 1)


def test_sqlite_list_at_reads_one_snapshot_while_another_process_writes(tmp_path):
    """list_at reads the current rows and the history of keys changed since
    REVISION in two queries; a write committed by another connection between
    them must not put its key in both (it did: the same pod twice in a
    kubectl get, CI of stop 19)."""
    backend = SqliteBackend(tmp_path)
    store, other = backend.open(), backend.open()
    store.put("/registry/pods/default/a", 1)
    store.put("/registry/pods/default/b", 1)
    rev = store.revision()

    class Interleaved:
        """The store's connection, with OTHER's write committed just before
        the history query (WAL: a writer does not wait for a reader)."""
        def __init__(self, db):
            self.db = db

        def execute(self, sql, *args):
            if "FROM events e" in sql:
                writer = threading.Thread(target=other.put, args=("/registry/pods/default/a", 2))
                writer.start()
                writer.join(timeout=10)
                assert not writer.is_alive()
            return self.db.execute(sql, *args)

    real = store._db
    store._db = Interleaved(real)
    try:
        got = [(kv.key, kv.value) for kv in store.list_at("/registry/pods/", rev)]
    finally:
        store._db = real
    assert got == [("/registry/pods/default/a", 1), ("/registry/pods/default/b", 1)]
    assert store.get("/registry/pods/default/a").value == 2
    assert [(kv.key, kv.value) for kv in store.list_at("/registry/pods/", rev)] == got


OWNER = """
import sys, time
kind, where = sys.argv[1], sys.argv[2]
if kind == "sqlite":
    from netemu.store.sqlite import SqliteStore as Store
else:
    from netemu.store.etcd import EtcdStore as Store
store = Store(where)
while True:
    store.put("/registry/leases/owner", {"pid": 1}, ttl=2)
    print("renewed", flush=True)
    time.sleep(0.5)
"""


@pytest.mark.timeout(60)
def test_a_ttl_key_goes_when_its_owner_process_is_killed(backend, store):
    """An owner process renews its key; SIGKILL it, and the key expires."""
    import subprocess
    import sys

    where = backend.path if backend.name == "sqlite" else backend.server.endpoint
    owner = subprocess.Popen([sys.executable, "-c", OWNER, backend.name, where],
                             stdout=subprocess.PIPE, text=True)
    try:
        for _ in range(8):                      # 4 s of renewals: past the 2 s TTL
            assert owner.stdout.readline().startswith("renewed")
        assert store.get("/registry/leases/owner") is not None
        owner.kill()
        owner.wait()
        assert store.get("/registry/leases/owner") is not None
        assert wait_until(lambda: store.get("/registry/leases/owner") is None, 8)
    finally:
        owner.kill()
        owner.wait()
        owner.stdout.close()


def test_etcd_store_bad_endpoint_and_unreachable_etcd_are_one_line_errors():
    from netemu.store.etcd import EtcdError, EtcdStore, parse_endpoint
    from netemu.store.etcdrun import free_port

    assert parse_endpoint("etcd://10.0.0.1:2379") == ("10.0.0.1", 2379)
    assert parse_endpoint("127.0.0.1:2379") == ("127.0.0.1", 2379)
    with pytest.raises(ValueError, match="expected http://HOST:PORT"):
        parse_endpoint("http://example:2379x")
    with pytest.raises(ValueError, match="'ftp://h:1'"):
        parse_endpoint("ftp://h:1")
    with pytest.raises(EtcdError, match=r"etcd at 127\.0\.0\.1:\d+: /v3/maintenance/status: ") as e:
        EtcdStore(f"http://127.0.0.1:{free_port()}")
    assert "\n" not in str(e.value)


@pytest.mark.timeout(60)
def test_a_cancelled_watch_leaves_no_thread_or_stream_behind(backend, store):
    """Watches come and go (every kubectl get -w): ending one must free what it
    holds (with etcd: its reader thread and its HTTP stream)."""
    before = {t.ident for t in threading.enumerate()}

    async def main():
        for i in range(5):
            since = store.revision()
            with trio.move_on_after(5):
                async for ev in store.watch("/gone/", since):
                    assert ev.key == f"/gone/{i}"
                    break
                else:
                    raise AssertionError("the watch ended by itself")
            await trio.sleep(0)

    async def run():
        async with trio.open_nursery() as nursery:
            async def writes():
                for i in range(5):
                    await trio.sleep(0.3)
                    await trio.to_thread.run_sync(store.put, f"/gone/{i}", i)
            nursery.start_soon(writes)
            await main()

    trio.run(run)

    def watch_threads():                  # trio's own idle worker threads aside
        return [t.name for t in threading.enumerate()
                if t.ident not in before and not t.name.startswith("Trio thread")]
    assert wait_until(lambda: not watch_threads(), 5), watch_threads()


def test_etcd_namespaces_keep_clusters_apart(etcd_server):
    """Two clusters on one etcd (EtcdStore(namespace=...)): each sees, lists,
    pages, watches and deletes only its own keys, under the same names."""
    from netemu.store.etcd import EtcdStore

    a = EtcdStore(etcd_server.endpoint, namespace="/netemu/a")
    b = EtcdStore(etcd_server.endpoint, namespace="/netemu/b")
    whole = EtcdStore(etcd_server.endpoint)
    a.put("/registry/pods/default/x", 1)
    rev = b.put("/registry/pods/default/x", 2)
    b.put("/registry/pods/default/y", 3)
    assert a.get("/registry/pods/default/x").value == 1 and b.get("/registry/pods/default/x").value == 2
    assert [kv.key for kv in a.list("")] == ["/registry/pods/default/x"]
    assert [kv.key for kv in b.list_at("/registry/", rev, "/registry/pods/default/x")] == []
    assert b.count_at("/registry/pods/", b.revision()) == 2
    assert [kv.key for kv in whole.list("/netemu/")] == ["/netemu/a/registry/pods/default/x",
                                                          "/netemu/b/registry/pods/default/x",
                                                          "/netemu/b/registry/pods/default/y"]
    assert [(e.key, e.value) for e in a.events_since(0)] == [("/registry/pods/default/x", 1)]

    async def first_event():
        async for ev in a.watch("", rev):
            return ev.key, ev.value

    async def run():
        async with trio.open_nursery() as nursery:
            result = {}

            async def watch():
                result["ev"] = await first_event()
            nursery.start_soon(watch)
            await trio.sleep(0.3)
            b.put("/registry/pods/default/z", 9)           # not a's
            a.put("/registry/pods/default/w", 7)
            with trio.fail_after(10):
                while "ev" not in result:
                    await trio.sleep(0.05)
        return result["ev"]

    assert trio.run(run) == ("/registry/pods/default/w", 7)
    assert a.delete_prefix("") == 2
    assert a.list("") == [] and len(b.list("")) == 3


@pytest.mark.timeout(60)
def test_etcd_watch_resumes_across_an_etcd_restart(etcd_server):
    """etcd stopped and started again under a running watch: the watch goes on
    from the revision after the last it delivered, so the watcher sees every
    change once, in order: those before the stop, the one written while the
    stream was down (after the restart, before the watch is made again), and
    those after."""
    from netemu.store.etcd import EtcdStore

    store = EtcdStore(etcd_server.endpoint)
    since = store.revision()
    seen: list[tuple[str, int]] = []

    async def run():
        async with trio.open_nursery() as nursery:
            async def watch():
                async for ev in store.watch("/w/", since):
                    seen.append((ev.key, ev.value))
                    if len(seen) == 3:
                        return
            nursery.start_soon(watch)
            await trio.sleep(0.3)
            await trio.to_thread.run_sync(store.put, "/w/a", 1)
            with trio.fail_after(10):
                while not seen:
                    await trio.sleep(0.05)
            await trio.to_thread.run_sync(etcd_server.stop)
            await trio.sleep(1.0)
            await trio.to_thread.run_sync(etcd_server.start)
            await trio.to_thread.run_sync(store.put, "/w/b", 2)
            await trio.to_thread.run_sync(store.put, "/w/c", 3)
            with trio.fail_after(20):
                while len(seen) < 3:
                    await trio.sleep(0.05)

    trio.run(run)
    assert seen == [("/w/a", 1), ("/w/b", 2), ("/w/c", 3)]


def test_etcd_watch_closed_by_its_watcher_is_no_break(etcd_server, caplog):
    """A watcher that stops reading (its loop ends, the stream is closed under
    the reader thread) is not a broken stream: nothing is resumed, nothing
    logged (it once logged "broke (the stream ended); resuming" each time)."""
    import logging

    from netemu.store.etcd import EtcdStore

    store = EtcdStore(etcd_server.endpoint)
    since = store.revision()

    async def run():
        async def first():
            async for ev in store.watch("/q/", since):
                return ev.key
        async with trio.open_nursery() as nursery:
            got = []
            nursery.start_soon(lambda: _collect(first, got))
            await trio.sleep(0.3)
            await trio.to_thread.run_sync(store.put, "/q/a", 1)
        return got

    async def _collect(fn, out):
        out.append(await fn())

    with caplog.at_level(logging.WARNING, logger="netemu.store.etcd"):
        assert trio.run(run) == ["/q/a"]
        deadline = time.monotonic() + 5
        while any(t.name == "etcd-watch /q/" for t in threading.enumerate()) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not any(t.name == "etcd-watch /q/" for t in threading.enumerate()), "the reader thread lives on"
    assert not [r for r in caplog.records if "broke" in r.getMessage()], caplog.text
