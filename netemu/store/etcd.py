"""The state store over etcd v3, for a cluster spread over several machines.

It speaks etcd's JSON gateway (/v3/kv/range, /v3/kv/txn, /v3/kv/deleterange,
/v3/lease/grant|keepalive, /v3/watch) with the standard library's http.client:
no grpcio, no other client package. etcd3gw talks to the same gateway, but its
watch drops the gateway's cancel and compact_revision replies (a watch from a
compacted revision would just end, not raise Compacted) and its stream errors
stay in an executor thread; what we need is five endpoints, so we keep our own.

Semantics, as in netemu.store.base and the SQLite store:
  - revisions are etcd's (header.revision; a key's mod_revision/create_revision);
  - put(expect_revision=N) is a transaction comparing the key's mod_revision
    with N (0: absent, since an absent key compares as mod_revision 0);
  - put(ttl=T) attaches the key to a lease of T seconds (rounded up; etcd raises
    it to its minimum, about 2 s with default timing). The owner keeps the key
    alive by writing it again (as with SQLite): the store then renews the
    key's lease (lease keepalive) instead of granting a new one. When the
    owner stops (dies), the lease runs out and etcd deletes the key: a DELETE
    event like any other;
  - list_at reads at a past revision (etcd's range at revision); a compacted
    one raises Compacted;
  - watch is one streaming /v3/watch request read by a thread that feeds a
    trio memory channel; a start revision etcd has compacted raises Compacted;
  - events_since replays the history through a watch from REVISION + 1 up to
    the revision current when called.
Values are stored as the SQLite store stores them: compact JSON, keys sorted.
"""

from __future__ import annotations

import base64
import functools
import http.client
import json
import logging
import math
import socket
import threading
import time
import urllib.parse
from collections.abc import AsyncIterator
from typing import Any

from netemu.store.base import Compacted, Conflict, Event, KeyValue

TIMEOUT = 10.0                 # seconds for one unary request
WATCH_RESUME_MIN = 0.1         # seconds before a broken watch is made again, doubling
WATCH_RESUME_MAX = 2.0         # up to this
# gRPC codes the JSON gateway reports when etcd goes away under a stream:
# UNAVAILABLE ("transport is closing") and CANCELLED ("the client connection is
# closing", the gateway's own connection shut with etcd). A cancel of our own
# comes as result.canceled instead, or not at all (we closed the stream).
GRPC_GOING_AWAY = {1, 14}

log = logging.getLogger(__name__)


class EtcdError(Exception):
    """etcd refused a request, or could not be reached."""


def _b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def _unb64(data: str | None) -> str:
    return base64.b64decode(data or "").decode()


def _prefix_end(prefix: str) -> str:
    """etcd's range_end for "every key starting with PREFIX" (b"\\0": all keys)."""
    raw = bytearray(prefix.encode())
    while raw:
        if raw[-1] < 0xFF:
            raw[-1] += 1
            return bytes(raw).decode("latin-1")
        raw.pop()
    return "\0"


def _range_end_b64(prefix: str) -> str:
    end = _prefix_end(prefix)
    if end == "\0":
        return base64.b64encode(b"\0").decode()
    return base64.b64encode(end.encode("latin-1")).decode()


def _decode_value(data: str | None) -> Any:
    return json.loads(base64.b64decode(data)) if data else None


def _kv(raw: dict, namespace: str = "") -> KeyValue:
    return KeyValue(key=_unb64(raw.get("key"))[len(namespace):], value=_decode_value(raw.get("value")),
                    mod_revision=int(raw.get("mod_revision", 0)),
                    create_revision=int(raw.get("create_revision", 0)))


def _connection(host: str, port: int, netns_fd: int | None) -> http.client.HTTPConnection:
    """An HTTP connection to etcd whose socket is made in the network
    namespace NETNS_FD (None: the calling thread's), when it first connects."""
    from netemu import netns
    return netns.http_connection(host, port, netns_fd, TIMEOUT)


def parse_endpoint(endpoint: str) -> tuple[str, int]:
    """HOST and PORT from "http://HOST:PORT", "etcd://HOST:PORT" or "HOST:PORT"."""
    text = endpoint if "://" in endpoint else "http://" + endpoint
    url = urllib.parse.urlsplit(text)
    try:
        port = url.port
    except ValueError:
        port = None
    if url.scheme not in ("http", "etcd") or not url.hostname or not port:
        raise ValueError(f"etcd endpoint {endpoint!r}: expected http://HOST:PORT or etcd://HOST:PORT")
    return url.hostname, port


class EtcdStore:
    """NAMESPACE: a key prefix this store's keys live under, invisible to its
    users (as etcd's own `--namespace` proxy does): several clusters share one
    etcd, each seeing only its own keys. "" is the whole key space."""

    event_ttl: float | None = None     # as SqliteStore.event_ttl

    def __init__(self, endpoint: str, namespace: str = ""):
        from netemu import netns

        self.host, self.port = parse_endpoint(endpoint)
        self.ns = namespace
        # Connections are made from the machine's network namespace, where
        # etcd is reached, even by a daemon that has moved into a node's.
        self._netns_fd = netns.home_fd()
        self._local = threading.local()            # one keep-alive connection per thread
        self._leases: dict[str, tuple[int, int]] = {}   # key -> (lease id, TTL) we granted
        self._leases_lock = threading.Lock()
        self._closed = False
        self._call("/v3/maintenance/status", {})    # fail now, clearly, if etcd is not there

    # -- the gateway ---------------------------------------------------------

    def _conn(self) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = _connection(self.host, self.port, self._netns_fd)
            self._local.conn = conn
        return conn

    def _call(self, path: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        while True:
            conn = self._conn()
            reused = getattr(self._local, "used", False)
            try:
                conn.request("POST", path, data, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                payload = resp.read()
                self._local.used = True
                break
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                self._local.conn = None
                self._local.used = False
                # A kept-alive connection the server has closed meanwhile gets
                # one retry on a new one; a new connection's failure is final.
                if not (reused and isinstance(e, (http.client.RemoteDisconnected, BrokenPipeError,
                                                  ConnectionResetError))):
                    raise EtcdError(f"etcd at {self.host}:{self.port}: {path}: {e}") from e
        reply = json.loads(payload or b"{}")
        if resp.status != 200 or "error" in reply:
            message = reply.get("message") or reply.get("error") or payload.decode(errors="replace")
            if "compacted" in message:
                raise Compacted(message)
            raise EtcdError(f"etcd at {self.host}:{self.port}: {path}: {message}")
        return reply

    # -- reads ---------------------------------------------------------------

    def revision(self) -> int:
        reply = self._call("/v3/kv/range", {"key": _b64("\0"), "count_only": True})
        return int(reply["header"]["revision"])

    def _range(self, prefix: str, start_after: str = "") -> dict[str, str]:
        """key and range_end of "the keys under PREFIX (after START_AFTER)", in
        this store's namespace."""
        start = start_after + "\0" if start_after >= prefix else prefix
        return {"key": _b64(self.ns + start or "\0"), "range_end": _range_end_b64(self.ns + prefix)}

    def get(self, key: str) -> KeyValue | None:
        kvs = self._call("/v3/kv/range", {"key": _b64(self.ns + key)}).get("kvs", [])
        return _kv(kvs[0], self.ns) if kvs else None

    def list(self, prefix: str) -> list[KeyValue]:
        reply = self._call("/v3/kv/range", self._range(prefix))
        return [_kv(raw, self.ns) for raw in reply.get("kvs", [])]

    def keys(self, prefix: str) -> list[str]:
        """The keys under PREFIX, without their values (etcd's keys_only)."""
        reply = self._call("/v3/kv/range", {**self._range(prefix), "keys_only": True})
        return [_unb64(raw["key"])[len(self.ns):] for raw in reply.get("kvs", [])]

    def list_at(self, prefix: str, revision: int, start_after: str = "",
                limit: int | None = None) -> list[KeyValue]:
        body: dict[str, Any] = {**self._range(prefix, start_after), "revision": str(max(revision, 0))}
        if limit is not None:
            if limit <= 0:
                return []
            body["limit"] = str(limit)
        return [_kv(raw, self.ns) for raw in self._call("/v3/kv/range", body).get("kvs", [])]

    def count_at(self, prefix: str, revision: int, start_after: str = "") -> int:
        reply = self._call("/v3/kv/range", {**self._range(prefix, start_after),
                                            "revision": str(max(revision, 0)), "count_only": True})
        return int(reply.get("count", 0))

    def existed_before(self, key: str, revision: int) -> bool | None:
        """Did KEY exist just before REVISION? None when that is compacted."""
        if revision <= 1:
            return False
        try:
            reply = self._call("/v3/kv/range", {"key": _b64(self.ns + key), "revision": str(revision - 1),
                                                "count_only": True})
        except Compacted:
            return None
        return int(reply.get("count", 0)) > 0

    # -- writes --------------------------------------------------------------

    def put(self, key: str, value: Any, *, ttl: float | None = None,
            expect_revision: int | None = None) -> int:
        data = json.dumps(value, sort_keys=True, separators=(",", ":"))
        request: dict[str, Any] = {"key": _b64(self.ns + key), "value": _b64(data)}
        lease = self._lease_for(key, ttl) if ttl is not None else 0
        if lease:
            request["lease"] = str(lease)
        compare = []
        if expect_revision is not None:
            compare = [{"key": _b64(self.ns + key), "target": "MOD", "result": "EQUAL",
                        "mod_revision": str(expect_revision)}]
        try:
            reply = self._call("/v3/kv/txn", {"compare": compare, "success": [{"request_put": request}]})
        except EtcdError as e:
            if not lease or "lease not found" not in str(e):
                raise
            # The lease ran out between its renewal and the write: a new one.
            with self._leases_lock:
                self._leases.pop(key, None)
            return self.put(key, value, ttl=ttl, expect_revision=expect_revision)
        if not reply.get("succeeded"):
            found = self.get(key)
            raise Conflict(f"{key}: expected revision {expect_revision}, "
                           f"found {found.mod_revision if found else 'none'}")
        if ttl is None:
            with self._leases_lock:
                self._leases.pop(key, None)
        return int(reply["header"]["revision"])

    def _lease_for(self, key: str, ttl: float) -> int:
        """The lease KEY is written with: the one we gave it before, renewed,
        if its TTL is the same and it is still alive; else a new one."""
        seconds = max(1, math.ceil(ttl))
        with self._leases_lock:
            held = self._leases.get(key)
        if held and held[1] == seconds:
            reply = self._call("/v3/lease/keepalive", {"ID": str(held[0])})
            if int(reply.get("result", {}).get("TTL", 0)) > 0:
                return held[0]
        lease = int(self._call("/v3/lease/grant", {"TTL": str(seconds)})["ID"])
        with self._leases_lock:
            self._leases[key] = (lease, seconds)
        return lease       # an old lease of the key, if any, holds nothing now and runs out

    def create(self, key: str, value: Any, *, ttl: float | None = None) -> int | None:
        """Write KEY only if it is absent; None if someone holds it."""
        try:
            return self.put(key, value, ttl=ttl, expect_revision=0)
        except Conflict:
            return None

    def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        compare = []
        if expect_revision is not None:
            compare = [{"key": _b64(self.ns + key), "target": "MOD", "result": "EQUAL",
                        "mod_revision": str(expect_revision)}]
        reply = self._call("/v3/kv/txn", {"compare": compare,
                                          "success": [{"request_delete_range": {"key": _b64(self.ns + key)}}]})
        if not reply.get("succeeded"):
            found = self.get(key)
            raise Conflict(f"{key}: expected revision {expect_revision}, "
                           f"found {found.mod_revision if found else 'none'}")
        with self._leases_lock:
            self._leases.pop(key, None)
        deleted = reply.get("responses", [{}])[0].get("response_delete_range", {})
        return int(deleted.get("deleted", 0)) > 0

    def delete_prefix(self, prefix: str) -> int:
        reply = self._call("/v3/kv/deleterange", self._range(prefix))
        return int(reply.get("deleted", 0))

    def expire(self) -> None:
        """Nothing to do: etcd deletes a key when its lease runs out."""

    def compact(self, revision: int) -> None:
        """Forget history up to REVISION (etcd's compaction)."""
        self._call("/v3/kv/compaction", {"revision": str(revision), "physical": True})

    # -- history and watch ---------------------------------------------------

    def events_since(self, revision: int, prefix: str = "") -> list[Event]:
        """Every change under PREFIX with a revision greater than REVISION, up
        to the revision current now. Read through a watch of the whole key
        space (every revision up to the current one is some key's change, so
        the stream is known to be complete when that revision is seen)."""
        current = self.revision()
        if current <= revision:
            return []
        out: list[Event] = []
        stream = _WatchStream(self.host, self.port, "", revision + 1, netns_fd=self._netns_fd)
        try:
            for batch in stream:
                for ev in batch:
                    if ev.key.startswith(self.ns + prefix) and ev.revision <= current:
                        out.append(Event(type=ev.type, key=ev.key[len(self.ns):], value=ev.value,
                                         revision=ev.revision))
                if batch and batch[-1].revision >= current:
                    break
        finally:
            stream.close()
        return out

    async def watch(self, prefix: str, since: int) -> AsyncIterator[Event]:
        """Yield every change under PREFIX after revision SINCE, forever: one
        streaming watch, read by a thread that hands each batch to trio.

        A stream that breaks (etcd restarted, the network between) is made
        again from the revision after the last one delivered, as etcd's own
        clients resume a watch, retrying with back-off (WATCH_RESUME_*) for as
        long as the watcher waits: the watcher sees every change once, late,
        never a gap. Compaction meanwhile (the revision is gone) ends the
        watch with Compacted, as it would without the break; so does a watch
        etcd cancels."""
        import trio

        send, receive = trio.open_memory_channel(64)
        token = trio.lowlevel.current_trio_token()
        open_stream = functools.partial(_WatchStream, self.host, self.port, self.ns + prefix,
                                        strip=len(self.ns), netns_fd=self._netns_fd)
        held = {"stream": open_stream(since + 1), "closed": False}
        lock = threading.Lock()

        def hand(item) -> bool:
            try:
                trio.from_thread.run(send.send, item, trio_token=token)
                return True
            except (trio.RunFinishedError, trio.Cancelled, trio.BrokenResourceError,
                    trio.ClosedResourceError):
                return False

        def reader() -> None:
            start, delay = since + 1, WATCH_RESUME_MIN
            while True:
                stream = held["stream"]
                try:
                    for batch in stream:
                        start, delay = batch[-1].revision + 1, WATCH_RESUME_MIN
                        if not hand(batch):
                            return
                    if stream.closed:               # the watcher closed it: no break
                        return
                    problem = "the stream ended"
                except (Compacted, EtcdError) as e:   # compaction, cancel: the watcher's to handle
                    if not stream.closed:
                        hand(e)
                    return
                except (OSError, ValueError, http.client.HTTPException) as e:
                    if stream.closed:
                        return
                    problem = str(e) or type(e).__name__
                except BaseException as e:  # handed to the watcher, not lost in the thread
                    if not stream.closed:
                        hand(e)
                    return
                log.warning("etcd watch of %s broke (%s); resuming from revision %d", prefix or "/", problem,
                            start)
                while True:
                    time.sleep(delay)
                    delay = min(delay * 2, WATCH_RESUME_MAX)
                    with lock:
                        if held["closed"]:
                            return
                    try:
                        stream = open_stream(start)
                    except (OSError, EtcdError, http.client.HTTPException):
                        continue
                    with lock:
                        held["stream"] = stream
                        if held["closed"]:
                            stream.close()
                            return
                    break

        thread = threading.Thread(target=reader, name=f"etcd-watch {prefix}", daemon=True)
        thread.start()
        try:
            async with receive:
                async for item in receive:
                    if isinstance(item, BaseException):
                        raise item
                    for ev in item:
                        yield ev
        finally:
            with lock:
                held["closed"] = True
                held["stream"].close()

    def close(self) -> None:
        self._closed = True
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None
            self._local.used = False


class _WatchStream:
    """One /v3/watch request: iterating yields each response's events (a
    list, one revision's or more); raises Compacted if etcd cancels the watch
    for compaction. close() from another thread ends the iteration."""

    def __init__(self, host: str, port: int, prefix: str, start_revision: int, strip: int = 0,
                 netns_fd: int | None = None):
        self.closed, self.strip = False, strip
        self._conn = _connection(host, port, netns_fd)
        body = {"create_request": {"key": _b64(prefix or "\0"), "range_end": _range_end_b64(prefix),
                                   "start_revision": str(max(start_revision, 1)), "prev_kv": True}}
        self._conn.request("POST", "/v3/watch", json.dumps(body).encode(),
                           {"Content-Type": "application/json"})
        self._resp = self._conn.getresponse()
        if self._resp.status != 200:
            raise EtcdError(f"etcd at {host}:{port}: /v3/watch: HTTP {self._resp.status} "
                            f"{self._resp.read()[:200]!r}")
        self._conn.sock.settimeout(None)         # a quiet watch waits as long as it takes

    def __iter__(self):
        while not self.closed:
            try:
                line = self._resp.readline()
            except (OSError, ValueError, http.client.HTTPException):
                if self.closed:
                    return
                raise
            if not line:
                return
            if not line.strip():
                continue
            reply = json.loads(line)
            if "error" in reply:
                error = reply["error"]
                message = error.get("message", str(error)) if isinstance(error, dict) else str(error)
                if "compacted" in message:
                    raise Compacted(message)
                if isinstance(error, dict) and error.get("grpc_code") in GRPC_GOING_AWAY:
                    # etcd going away: the stream broke, made again by watch()
                    raise ConnectionResetError(f"etcd watch: {message}")
                raise EtcdError(f"etcd watch: {message}")
            result = reply.get("result", {})
            if int(result.get("compact_revision", 0)):
                raise Compacted(f"revision is compacted (oldest kept: {result['compact_revision']})")
            if result.get("canceled"):
                raise EtcdError(f"etcd watch canceled: {result.get('cancel_reason', '')}")
            events = []
            for raw in result.get("events", []):
                kv = raw.get("kv", {})
                if raw.get("type") == "DELETE":
                    prev = raw.get("prev_kv") or {}
                    events.append(Event(type="DELETE", key=_unb64(kv.get("key"))[self.strip:],
                                        value=_decode_value(prev.get("value")),
                                        revision=int(kv.get("mod_revision", 0))))
                else:
                    events.append(Event(type="PUT", key=_unb64(kv.get("key"))[self.strip:],
                                        value=_decode_value(kv.get("value")),
                                        revision=int(kv.get("mod_revision", 0))))
            if events:
                yield events

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if self._conn.sock is not None:
                self._conn.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._conn.close()
