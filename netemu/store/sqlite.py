"""The embedded state store: one SQLite file per cluster, shared by all its processes.

k3s keeps Kubernetes' state in SQLite by default; we do the same. The file lives
at /run/netemu/<cluster>/state.db. SQLite's WAL mode lets many readers (every
node's daemons) work beside one writer at a time; writes are short transactions.

Layout:
  kv(key, value JSON, create_rev, mod_rev, expires_at)   the current state
  events(rev, type, key, value)                          the change log watchers read
                                                         (and paged lists: list_at)
  meta(revision)                                         the global revision counter

Watch: SQLite has no notification across processes, but every commit appends to
the write-ahead log (state.db-wal), so a watch waits on inotify for writes to
that file in the store's directory, then reads the revision (a single indexed
read). An idle cluster's processes therefore sleep instead of polling, and a
write after a quiet spell is seen at once. While writes keep coming (a cluster
coming up), reads are at least POLL_INTERVAL apart, as when polling, so a burst
is taken in few reads; the revision is read at least every SAFETY_INTERVAL
(10 s) anyway: a write whose bell was never rung (its writer died between the
commit and the bell) costs that long, not correctness. An idle agent at 100
nodes paid about 0.4 ms of CPU per wake-up, so that read is not once a second.
Without inotify, the revision is polled every few tens of milliseconds. All
the watches of one store object share one wait (one read per wake-up): a
process with many watches (the controllers process has one per controller)
wakes once, not once per watch. Each watch then asks whether any write
since its last read is under its prefix (one indexed query, the keys compared
inside SQLite, nothing fetched); one with none moves on without reading or
decoding events. (That question used to be answered from the keys of every
write since the previous wake-up, fetched into Python: at 100 nodes each
agent fetched every key the cluster wrote while it came up: about 15 % of
a py-spy profile of one agent.) Expired keys are looked for at most once a second, and a wait
ends when the next key's TTL runs out (its deletion is an event no write
announces).

Bells: woken by every write, N node agents would pay N reads for each of the
cluster's writes (N^2 with each node's own heartbeats). So a store whose
watches all have a prefix of at least two whole segments (/registry/pods/,
/coreos.com/network/subnets/) waits on bells instead of the WAL. A bell is a
folder in <store>.bells/, one per prefix someone listens to; a listening
store object has one FIFO of its own (<store>.bells/.ears/), held open for
reading and writing, and a hard link to it in each bell it listens to. After
each commit, the writer rings the bells of the written keys' first two- and
three-segment prefixes: for each link in such a folder, one byte written
without blocking (a full FIFO has been rung already; a missing folder costs a
failed lookup). A link no process holds open any more is a listener that died:
its open fails (ENXIO) and the writer removes it. A write under
/registry/leases/ (a node's heartbeat) then wakes no agent and no controller:
none watches a prefix that shallow. A store with a shallower watch waits on
the WAL as before. A watch_containing(prefix, text) listens to a bell of its own,
(prefix, text), which a writer rings only when the value it wrote (a deletion:
the value deleted) contains the text: a kubelet is woken by its own node's
pods, not by every pod of the cluster. Writers find the texts listened to in
the bells' folder (listed again when it changes).

Why FIFOs and not inotify on bell files (as before): inotify instances are
counted per user for the whole machine (fs.inotify.max_user_instances, 128
here), and at 100 nodes the agents had taken them all: 14 agents got none and
polled the store 33 times a second, 15 ms of CPU a second each against about
1.2 ms for the others. A FIFO is a file descriptor like any other.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import itertools
import json
import os
import sqlite3
import urllib.parse
from collections import Counter
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

from netemu.inotify import IN_CREATE, IN_MODIFY, IN_MOVED_TO, Inotify
from netemu.store.base import Compacted, Conflict, Event, KeyValue

SCHEMA = """
CREATE TABLE IF NOT EXISTS kv (
    key TEXT PRIMARY KEY,
    value TEXT NOT NULL,
    create_rev INTEGER NOT NULL,
    mod_rev INTEGER NOT NULL,
    expires_at REAL
);
CREATE INDEX IF NOT EXISTS kv_expiry ON kv(expires_at) WHERE expires_at IS NOT NULL;
CREATE TABLE IF NOT EXISTS events (
    rev INTEGER PRIMARY KEY,
    type TEXT NOT NULL,
    key TEXT NOT NULL,
    value TEXT NOT NULL
);
-- A key's history, newest first: a list at an old revision (list_at) and
-- existed_before read it; compaction (_bump) keeps each key's newest PUT.
CREATE INDEX IF NOT EXISTS events_key ON events(key, rev);
CREATE TABLE IF NOT EXISTS meta (id INTEGER PRIMARY KEY CHECK (id = 0), revision INTEGER NOT NULL,
                                 compacted INTEGER NOT NULL DEFAULT 0);
INSERT OR IGNORE INTO meta (id, revision) VALUES (0, 0);
"""

# How many events to keep for watchers that fall behind (etcd compacts too).
EVENTS_KEPT = 50_000
POLL_INTERVAL = 0.03            # without inotify; with it, the shortest time between reads
SETTLE = 0.002                  # after a write is seen: let the rest of its burst land
SAFETY_INTERVAL = 10.0          # read the revision at least this often anyway (a missed bell)
EXPIRY_CHECK_INTERVAL = 1.0     # the most often one store object looks for expired keys

# The newest event at or before revision ?1 of each key under (?2, ?3) that
# changed after ?1: its state then (list_at, count_at; parameters: revision,
# low, end, revision).
_STATE_THEN = ("e.key IN (SELECT DISTINCT key FROM events WHERE rev > ? AND key > ? AND key < ?) "
               "AND e.rev = (SELECT MAX(x.rev) FROM events x WHERE x.key = e.key AND x.rev <= ?)")


class WalWatch:
    """inotify on a store's directory, reporting writes to its files (the WAL)."""

    def __init__(self, db_path: str) -> None:
        self.inotify = Inotify()
        directory = os.path.dirname(os.path.abspath(db_path))
        try:
            self.inotify.add_watch(directory, IN_MODIFY | IN_MOVED_TO | IN_CREATE)
        except OSError:
            self.inotify.close()
            raise
        self.fd = self.inotify.fd
        base = os.fsencode(os.path.basename(db_path))
        self.names = {base, base + b"-wal"}

    def drain(self) -> bool:
        """Read every pending event; True if one was about the store's files."""
        return any(name in self.names for _, name in self.inotify.drain())

    def close(self) -> None:
        self.inotify.close()


def bells_dir(db_path: str) -> str:
    """Where the bells of the store at DB_PATH hang (see the module's text)."""
    return db_path + ".bells"


# A bell is (prefix, text): text None rings for every write under the prefix;
# a text, only for writes whose value's JSON text (a deletion: the last value)
# contains it (a kubelet's '"nodeName":"NODE"': watch_containing).
Bell = tuple[str, "str | None"]
TAG = "@"               # between a bell file's prefix and text (quote() escapes it in both)


def _bell_file(bells: str, bell: Bell) -> str:
    prefix, text = bell
    name = urllib.parse.quote(prefix, safe="")
    if text is not None:
        name += TAG + urllib.parse.quote(text, safe="")
    return os.path.join(bells, name)


@functools.lru_cache(maxsize=4096)
def _bell_of_file(name: str) -> Bell:
    """The bell a bell folder's NAME stands for. Cached: every writer reads the
    bells' folder again each time it changed (_texts_listened), and at 100
    nodes, unquoting its hundred names each time was 13 % of three agents'
    CPU in a cProfile while the cluster came up (each kubelet adds a bell)."""
    prefix, tag, text = name.partition(TAG)
    return urllib.parse.unquote(prefix), (urllib.parse.unquote(text) if tag else None)


def rung_by(key: str) -> list[str]:
    """The bells a write of KEY rings: its first two- and three-segment
    prefixes ('/registry/pods/' and '/registry/pods/default/' for
    '/registry/pods/default/web')."""
    bells: list[str] = []
    at = 0
    for depth in (1, 2, 3):
        at = key.find("/", at + 1)
        if at < 0 or not key.startswith("/"):
            break
        if depth > 1:
            bells.append(key[:at + 1])
    return bells


def _bell(watching: tuple[str, str | None]) -> Bell | None:
    """The bell of a watch of (prefix, text); None: the WAL."""
    prefix = bell_for(watching[0])
    return None if prefix is None else (prefix, watching[1])


def bell_for(prefix: str) -> str | None:
    """The bell that rings for every write under PREFIX: its longest prefix of
    two or three whole segments; None when it has fewer than two (such a
    watch waits on the WAL)."""
    whole = prefix.split("/")[1:-1] if prefix.startswith("/") else []
    if len(whole) < 2:
        return None
    return "/" + "/".join(whole[:3]) + "/"


EARS = ".ears"           # the listeners' FIFOs, in the bells' folder
_ears = itertools.count()


class BellWatch:
    """A store object's ear: a FIFO of its own, linked into the bells it
    listens to (see the module's text)."""

    def __init__(self, db_path: str) -> None:
        self.dir = bells_dir(db_path)
        folder = os.path.join(self.dir, EARS)
        os.makedirs(folder, exist_ok=True)
        self.name = f"{os.getpid()}.{next(_ears)}"
        self.path = os.path.join(folder, self.name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)                # a dead process's, whose pid we now have
        os.mkfifo(self.path, 0o600)
        # Read and write: a FIFO whose last writer went reports end-of-file
        # (readable) for ever; holding a write end ourselves, it never does.
        self.fd = os.open(self.path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        self.bells: set[Bell] = set()

    def _link(self, bell: Bell) -> str:
        return os.path.join(_bell_file(self.dir, bell), self.name)

    def sync(self, bells: set[Bell]) -> bool:
        """Listen to exactly BELLS; True if one was added (a write just before
        may have rung without us: read before waiting)."""
        added = False
        for bell in bells - self.bells:
            os.makedirs(_bell_file(self.dir, bell), exist_ok=True)
            with contextlib.suppress(FileExistsError):
                os.link(self.path, self._link(bell))
            self.bells.add(bell)
            added = True
        for bell in self.bells - bells:
            with contextlib.suppress(OSError):
                os.unlink(self._link(bell))
            self.bells.discard(bell)
        return added

    def drain(self) -> bool:
        """Take every ring pending; True if there was one."""
        rung = False
        while True:
            try:
                data = os.read(self.fd, 4096)
            except BlockingIOError:
                return rung
            if not data:
                return rung
            rung = True

    def close(self) -> None:
        for bell in self.bells:
            with contextlib.suppress(OSError):
                os.unlink(self._link(bell))
        self.bells = set()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)


def ring(bell_folder: str) -> None:
    """Wake every listener linked in BELL_FOLDER (a writer, after its commit)."""
    try:
        names = os.listdir(bell_folder)
    except FileNotFoundError:
        return                                  # nobody has listened to that bell
    for name in names:
        path = os.path.join(bell_folder, name)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError as e:
            if e.errno == errno.ENXIO:          # no reader: its listener died
                with contextlib.suppress(OSError):
                    os.unlink(path)
            continue
        try:
            os.write(fd, b"\0")
        except OSError:
            pass                                # full: rung already, not yet heard
        finally:
            os.close(fd)


class SqliteStore:
    # Seconds an Event lives after its last write (registry.record_event), the
    # API server's --event-ttl; the control plane sets it from the cluster's
    # timeScale. None: registry.EVENT_TTL.
    event_ttl: float | None = None
    # The shortest time between two reads of the store by this object's
    # watches (with inotify: writes closer together are read at once).
    read_interval: float = POLL_INTERVAL

    def __init__(self, path: str, *, create: bool = False):
        if not create and not os.path.exists(path):
            raise FileNotFoundError(f"state store {path} does not exist")
        self.path = path
        # One connection per store object, guarded by a lock so trio worker threads
        # and the main thread can share it.
        self._db = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
        self._lock = threading.RLock()
        with self._lock:
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=NORMAL")
            if create:
                self._db.executescript(SCHEMA)
        # The shared wait of the watches (see watch()).
        self._tick: Any = None                 # trio.Event of the wait in progress
        self._ticked_revision = 0
        self._next_expiry_check = 0.0
        self._wal_watch: WalWatch | None | bool = None   # False: inotify unavailable
        self._bell_watch: BellWatch | None | bool = None
        self._bells = bells_dir(path)
        # What the open write transaction wrote: (bells of its key, value text).
        self._written: list[tuple[list[str], str]] = []
        self._texts: tuple[int, dict[str, list[str]]] = (-1, {})   # see _texts_listened
        self._watching: Counter = Counter()    # (prefix, text) of this object's running watches
        self._wait_scope: Any = None           # the shared wait in progress (a trio CancelScope)
        self._last_read = 0.0                  # time.monotonic() of the last shared read

    # -- reads ---------------------------------------------------------------

    def revision(self) -> int:
        with self._lock:
            return self._db.execute("SELECT revision FROM meta WHERE id = 0").fetchone()[0]

    def get(self, key: str) -> KeyValue | None:
        with self._lock:
            row = self._db.execute(
                "SELECT key, value, mod_rev, create_rev, expires_at FROM kv WHERE key = ?",
                (key,)).fetchone()
        if row is None or _expired(row[4]):
            return None
        return _kv(row)

    def list(self, prefix: str) -> list[KeyValue]:
        return self.list_containing(prefix, None)

    def list_containing(self, prefix: str, text: str | None) -> list[KeyValue]:
        """As list, but only the keys whose value's JSON text contains TEXT
        (None: all), filtered before anything is decoded (a kubelet's own pods
        at its start, not the cluster's: 1,000 decoded pods were 5.6 MB of each
        agent at 100 nodes). A pre-filter only, as watch_containing's; not part
        of the Store contract (base.py)."""
        sql = "SELECT key, value, mod_rev, create_rev, expires_at FROM kv WHERE key >= ? AND key < ?"
        args: tuple = (prefix, _prefix_end(prefix))
        if text is not None:
            sql += " AND instr(value, ?) > 0"
            args += (text,)
        with self._lock:
            rows = self._db.execute(sql + " ORDER BY key", args).fetchall()
        return [_kv(r) for r in rows if not _expired(r[4])]

    def keys(self, prefix: str) -> list[str]:
        """The keys under PREFIX, their values neither read nor decoded (not
        part of the Store contract)."""
        with self._lock:
            rows = self._db.execute("SELECT key, expires_at FROM kv WHERE key >= ? AND key < ? ORDER BY key",
                                    (prefix, _prefix_end(prefix))).fetchall()
        return [k for k, expires_at in rows if not _expired(expires_at)]

    def events_since(self, revision: int, prefix: str = "", *, containing: str | None = None) -> list[Event]:
        """Every change under PREFIX with a revision greater than REVISION
        (CONTAINING: only those whose value's JSON text contains it, filtered
        before anything is decoded)."""
        self.expire()
        sql = "SELECT rev, type, key, value FROM events WHERE rev > ? AND key >= ? AND key < ?"
        args: tuple = (revision, prefix, _prefix_end(prefix))
        if containing is not None:
            sql += " AND instr(value, ?) > 0"
            args += (containing,)
        with self._lock:
            compacted = self._db.execute("SELECT compacted FROM meta WHERE id = 0").fetchone()[0]
            if revision < compacted:
                raise Compacted(f"revision {revision} is compacted (oldest kept: {compacted})")
            rows = self._db.execute(sql + " ORDER BY rev", args).fetchall()
        return [Event(type=t, key=k, value=json.loads(v), revision=r) for r, t, k, v in rows]

    def list_at(self, prefix: str, revision: int, start_after: str = "",
                limit: int | None = None) -> list[KeyValue]:
        """The keys under PREFIX as they were at REVISION, in key order, those
        after START_AFTER only, at most LIMIT: one page of a list that stays
        consistent over its pages, as etcd serves a paged list at the
        revision of its first page. Raises Compacted when REVISION is older
        than the history kept.

        A key unchanged since REVISION is read from the current state; one
        changed after it, from its newest event at or before REVISION (a PUT:
        it was there with that value; a DELETE or none: it was not). That
        history is whole because compaction keeps every key's newest PUT (see
        _bump). Historical rows carry no TTL and create_revision 0."""
        end = _prefix_end(prefix)
        low = max(prefix, start_after)
        cap = -1 if limit is None else int(limit)
        with self._snapshot(revision) as db:
            rows = db.execute(
                "SELECT key, value, mod_rev, create_rev, expires_at FROM kv "
                "WHERE key > ? AND key < ? AND mod_rev <= ? ORDER BY key LIMIT ?",
                (low, end, revision, cap)).fetchall()
            # Keys changed after REVISION: their state then, from their history.
            past = db.execute("SELECT e.key, e.type, e.value, e.rev FROM events e WHERE " + _STATE_THEN,
                              (revision, low, end, revision)).fetchall()
        out = [_kv(r) for r in rows if not _expired(r[4])]
        out += [KeyValue(key=k, value=json.loads(v), mod_revision=r, create_revision=0)
                for k, t, v, r in past if t == "PUT"]
        out.sort(key=lambda kv: kv.key)
        return out if limit is None else out[:limit]

    def count_at(self, prefix: str, revision: int, start_after: str = "") -> int:
        """len(list_at(PREFIX, REVISION, START_AFTER)), counted in SQLite
        (expired TTL rows aside: counted until they are swept)."""
        end = _prefix_end(prefix)
        low = max(prefix, start_after)
        with self._snapshot(revision) as db:
            now = db.execute("SELECT COUNT(*) FROM kv WHERE key > ? AND key < ? AND mod_rev <= ?",
                             (low, end, revision)).fetchone()[0]
            then = db.execute("SELECT COUNT(*) FROM events e WHERE e.type = 'PUT' AND " + _STATE_THEN,
                              (revision, low, end, revision)).fetchone()[0]
        return now + then

    @contextlib.contextmanager
    def _snapshot(self, revision: int):
        """One read transaction, so its reads see one snapshot (read one by one,
        a write by another process between the current rows and the history
        put its key in both: the same pod twice in a list). Raises Compacted
        when REVISION is older than the history kept."""
        with self._lock:
            self._db.execute("BEGIN")
            try:
                compacted = self._db.execute("SELECT compacted FROM meta WHERE id = 0").fetchone()[0]
                if revision < compacted:
                    raise Compacted(f"revision {revision} is compacted (oldest kept: {compacted})")
                yield self._db
            finally:
                self._db.execute("COMMIT")

    def existed_before(self, key: str, revision: int) -> bool | None:
        """Did KEY exist just before REVISION? None when the history that would
        tell is compacted. (A watch's ADDED versus MODIFIED: the change log
        does not say whether a PUT created its key.)"""
        with self._lock:
            row = self._db.execute("SELECT type FROM events WHERE key = ? AND rev < ? ORDER BY rev DESC "
                                   "LIMIT 1", (key, revision)).fetchone()
            if row is not None:
                return row[0] == "PUT"
            compacted = self._db.execute("SELECT compacted FROM meta WHERE id = 0").fetchone()[0]
        return False if compacted == 0 else None

    # -- writes --------------------------------------------------------------

    def put(self, key: str, value: Any, *, ttl: float | None = None,
            expect_revision: int | None = None) -> int:
        data = json.dumps(value, sort_keys=True, separators=(",", ":"))
        expires = time.time() + ttl if ttl is not None else None
        with self._write() as db:
            self._expire_locked(db)
            row = db.execute("SELECT mod_rev, create_rev FROM kv WHERE key = ?", (key,)).fetchone()
            current = row[0] if row else 0
            if expect_revision is not None and expect_revision != current:
                raise Conflict(f"{key}: expected revision {expect_revision}, found {current}")
            rev = self._bump(db)
            create_rev = row[1] if row else rev
            db.execute("INSERT OR REPLACE INTO kv (key, value, create_rev, mod_rev, expires_at) "
                       "VALUES (?, ?, ?, ?, ?)", (key, data, create_rev, rev, expires))
            db.execute("INSERT INTO events (rev, type, key, value) VALUES (?, 'PUT', ?, ?)",
                       (rev, key, data))
            self._written.append((rung_by(key), data))
            return rev

    def create(self, key: str, value: Any, *, ttl: float | None = None) -> int | None:
        """Write KEY only if it is absent; None if someone holds it."""
        try:
            return self.put(key, value, ttl=ttl, expect_revision=0)
        except Conflict:
            return None

    def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        with self._write() as db:
            row = db.execute("SELECT mod_rev, value FROM kv WHERE key = ?", (key,)).fetchone()
            if row is None:
                if expect_revision not in (None, 0):
                    raise Conflict(f"{key}: expected revision {expect_revision}, found none")
                return False
            if expect_revision is not None and expect_revision != row[0]:
                raise Conflict(f"{key}: expected revision {expect_revision}, found {row[0]}")
            self._delete_locked(db, key, row[1])
            return True

    def delete_prefix(self, prefix: str) -> int:
        with self._write() as db:
            rows = db.execute("SELECT key, value FROM kv WHERE key >= ? AND key < ?",
                              (prefix, _prefix_end(prefix))).fetchall()
            for key, value in rows:
                self._delete_locked(db, key, value)
            return len(rows)

    def expire(self) -> None:
        """Delete keys whose TTL ran out (any client may do it; deletions are events)."""
        now = time.time()
        with self._lock:
            due = self._db.execute("SELECT 1 FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ? "
                                   "LIMIT 1", (now,)).fetchone()
        if due:
            with self._write() as db:
                self._expire_locked(db)

    # -- watch ---------------------------------------------------------------

    async def watch(self, prefix: str, since: int) -> AsyncIterator[Event]:
        """Yield every change under PREFIX after revision SINCE, forever."""
        async for ev in self.watch_containing(prefix, since, None):
            yield ev

    async def watch_containing(self, prefix: str, since: int, text: str | None) -> AsyncIterator[Event]:
        """As watch, but only the changes whose value's JSON text (compact, keys
        sorted: as put stores it) contains TEXT: the others are skipped before
        they are decoded (a kubelet's '"nodeName":"NODE"'). A pre-filter only:
        the text may also match elsewhere in a value. Not part of the Store
        contract (base.py); callers fall back to watch without it."""
        last = since
        watching = (prefix, text)
        if self._wait_scope is not None and _bell(watching) not in self._waiting_on:
            self._wait_scope.cancel()       # the wait in progress does not hear this watch
        self._watching[watching] += 1
        try:
            # Read the revision first: every write up to it is in the events read
            # next (one query, one snapshot), so moving `last` up to it skips only
            # revisions outside PREFIX. Reading it after the events would lose a
            # write that landed in between.
            current = self.revision()
            while True:
                if current > last and not self._expiry_due() and not self._touches(prefix, last, current):
                    last = current      # every write since LAST is outside PREFIX: nothing to read
                elif current > last or self._expiry_due():
                    events = self.events_since(last, prefix, containing=text)
                    for ev in events:
                        yield ev
                    last = max([last, current] + [ev.revision for ev in events])
                current = await self._next_poll()
        finally:
            self._watching[watching] -= 1
            if not self._watching[watching]:
                del self._watching[watching]

    async def _next_poll(self) -> int:
        """Wait for the next write (or a poll period); return the revision read then.

        The first watch to ask waits and reads; the others wait for it. If it
        is cancelled, the others wake early with the previous revision and one
        of them takes over on its next call."""
        import trio

        tick = self._tick
        if tick is not None:
            await tick.wait()
            return self._ticked_revision
        self._tick = tick = trio.Event()
        try:
            watch = self._watcher()
            if watch is None:
                await trio.sleep(POLL_INTERVAL)
            else:
                with trio.move_on_after(self._longest_wait()) as self._wait_scope:
                    if not (isinstance(watch, BellWatch) and watch.sync(self._waiting_on)):
                        while not watch.drain():
                            await trio.lowlevel.wait_readable(watch.fd)
                        await trio.sleep(max(SETTLE, self._last_read + self.read_interval - time.monotonic()))
                self._wait_scope = None
                watch.drain()
            self._read_revision()
            self._last_read = time.monotonic()
        finally:
            self._wait_scope = None
            self._tick = None
            tick.set()
        return self._ticked_revision

    def _read_revision(self) -> None:
        """The shared read of a wake-up: the revision every watch goes on to."""
        self._ticked_revision = self.revision()

    def _touches(self, prefix: str, last: int, current: int) -> bool:
        """Could a write after LAST up to CURRENT be under PREFIX? The
        revisions' range of the events table is read, its keys compared inside
        SQLite (`+key`: not through the index by key, which would walk every
        event of the prefix ever kept), and nothing is fetched. True as well
        when history after LAST is compacted: events_since says so."""
        if not prefix:
            return True
        with self._lock:
            (found,) = self._db.execute(
                "SELECT EXISTS (SELECT 1 FROM events WHERE rev > ?1 AND rev <= ?2 AND +key >= ?3 AND +key < ?4) "
                "OR (SELECT compacted FROM meta WHERE id = 0) > ?1",
                (last, current, prefix, _prefix_end(prefix))).fetchone()
        return bool(found)

    @property
    def _waiting_on(self) -> set:
        """The bells of this object's running watches (None among them: one
        waits on the WAL)."""
        return {_bell(w) for w in self._watching}

    def _watcher(self) -> WalWatch | BellWatch | None:
        """What the next shared wait waits on: the bells of the running watches'
        prefixes when each has one, else the WAL (None: poll)."""
        bells = self._waiting_on
        if bells and None not in bells and self._bell_watch is None:
            try:
                self._bell_watch = BellWatch(self.path)
            except OSError:
                self._bell_watch = False
        if bells and None not in bells and self._bell_watch:
            return self._bell_watch
        if self._wal_watch is None:
            try:
                self._wal_watch = WalWatch(self.path)
            except OSError:
                self._wal_watch = False
        return self._wal_watch or None

    def _longest_wait(self) -> float:
        """How long a shared wait may go without a read: SAFETY_INTERVAL, or
        until the next key's TTL runs out if that is sooner (its deletion is an
        event no write announces), but not before the next expiry check."""
        with self._lock:
            (soonest,) = self._db.execute("SELECT MIN(expires_at) FROM kv WHERE expires_at IS NOT NULL").fetchone()
        if soonest is None:
            return SAFETY_INTERVAL
        until_check = self._next_expiry_check - time.monotonic()
        return min(SAFETY_INTERVAL, max(soonest - time.time(), until_check, 0.0))

    def _expiry_due(self) -> bool:
        """True, at most once a second per store object, when some key's TTL ran out
        (the watch that sees it expires the keys: the deletions wake the others)."""
        now = time.monotonic()
        if now < self._next_expiry_check:
            return False
        self._next_expiry_check = now + EXPIRY_CHECK_INTERVAL
        return self._has_due_expiry()

    def close(self) -> None:
        with self._lock:
            self._db.close()
        for watch in (self._wal_watch, self._bell_watch):
            if watch:
                watch.close()
        self._wal_watch = self._bell_watch = False

    # -- internals -----------------------------------------------------------

    def _has_due_expiry(self) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ? "
                                    "LIMIT 1", (time.time(),)).fetchone() is not None

    def _write(self):
        store = self

        class _Tx:
            def __enter__(self_inner):
                store._lock.acquire()
                try:
                    store._db.execute("BEGIN IMMEDIATE")
                except BaseException:
                    store._lock.release()
                    raise
                return store._db

            def __exit__(self_inner, exc_type, exc, tb):
                try:
                    store._db.execute("ROLLBACK" if exc_type else "COMMIT")
                    if not exc_type:
                        store._ring()
                finally:
                    store._written.clear()
                    store._lock.release()
                return False

        return _Tx()

    def _ring(self) -> None:
        """Ring the bells of the writes just committed that someone listens to."""
        rung: set[Bell] = set()
        texts = self._texts_listened() if self._written else {}
        for prefixes, value in self._written:
            for prefix in prefixes:
                rung.add((prefix, None))
                rung.update((prefix, t) for t in texts.get(prefix, ()) if t in value)
        for bell in rung:
            ring(_bell_file(self._bells, bell))

    def _texts_listened(self) -> dict[str, list[str]]:
        """{prefix: [text]} of the bells with a text someone has made, read
        again when the bells' folder changed (a stat per commit)."""
        try:
            stamp = os.stat(self._bells).st_mtime_ns
        except FileNotFoundError:
            return {}
        if stamp != self._texts[0]:
            texts: dict[str, list[str]] = {}
            for name in os.listdir(self._bells):
                if name.startswith("."):
                    continue
                prefix, text = _bell_of_file(name)
                if text is not None:
                    texts.setdefault(prefix, []).append(text)
            self._texts = (stamp, texts)
        return self._texts[1]

    @staticmethod
    def _bump(db) -> int:
        db.execute("UPDATE meta SET revision = revision + 1 WHERE id = 0")
        rev = db.execute("SELECT revision FROM meta WHERE id = 0").fetchone()[0]
        if rev % 1000 == 0:
            floor = rev - EVENTS_KEPT
            if floor > 0:
                # History up to FLOOR goes, but for each key its newest PUT up
                # to FLOOR, if it is newer than the key's last DELETE: what
                # the key held at FLOOR, so the state at any kept revision
                # can still be told (list_at). At most one row per key.
                db.execute("DELETE FROM events WHERE rev <= ? AND NOT (type = 'PUT' AND rev = "
                           "(SELECT MAX(x.rev) FROM events x WHERE x.key = events.key AND x.rev <= ?))",
                           (floor, floor))
                db.execute("UPDATE meta SET compacted = ? WHERE id = 0", (floor,))
        return rev

    def _delete_locked(self, db, key: str, value: str) -> None:
        rev = self._bump(db)
        db.execute("DELETE FROM kv WHERE key = ?", (key,))
        db.execute("INSERT INTO events (rev, type, key, value) VALUES (?, 'DELETE', ?, ?)",
                   (rev, key, value))
        self._written.append((rung_by(key), value))

    def _expire_locked(self, db) -> None:
        rows = db.execute("SELECT key, value FROM kv WHERE expires_at IS NOT NULL AND expires_at <= ?",
                          (time.time(),)).fetchall()
        for key, value in rows:
            self._delete_locked(db, key, value)


def _expired(expires_at: float | None) -> bool:
    return expires_at is not None and expires_at <= time.time()


def _kv(row) -> KeyValue:
    key, value, mod_rev, create_rev, expires_at = row
    return KeyValue(key=key, value=json.loads(value), mod_revision=mod_rev,
                    create_revision=create_rev, expires_at=expires_at)


def _prefix_end(prefix: str) -> str:
    """The smallest string greater than every string that starts with PREFIX."""
    return prefix + "\U0010ffff" if prefix else "\U0010ffff"
