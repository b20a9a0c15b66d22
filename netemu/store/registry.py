"""Kubernetes objects in the store, keyed as the API server's registry keys them.

An object is kept in its API shape (apiVersion, kind, metadata, spec, status) under
/registry/<resource>/<namespace>/<name> (cluster-scoped kinds have no namespace).
metadata.resourceVersion is the store revision of the object's last change, so the
API server (netemu.apiserver) serves these objects to the real kubectl unchanged.
Which kinds there are, their paths and versions: netemu.k8s.kinds.
"""

from __future__ import annotations

import copy
import datetime
import functools
import hashlib
import secrets
import uuid

from netemu.k8s import kinds
from netemu.store.base import Conflict, Store


def key(kind: str, namespace: str | None, name: str) -> str:
    k = kinds.BY_KIND[kind]
    if k.namespaced:
        return f"/registry/{k.path}/{namespace or 'default'}/{name}"
    return f"/registry/{k.path}/{name}"


def prefix(kind: str, namespace: str | None = None) -> str:
    k = kinds.BY_KIND[kind]
    if k.namespaced and namespace:
        return f"/registry/{k.path}/{namespace}/"
    return f"/registry/{k.path}/"


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(stamp: str | None) -> datetime.datetime | None:
    if not stamp:
        return None
    return _parse_time(stamp)


@functools.lru_cache(maxsize=4096)
def _parse_time(stamp: str) -> datetime.datetime:
    # Cached: strptime was a third of a server-side Table of 1,000 pods (an AGE
    # cell per row), and objects made together share their stamps. A datetime
    # is immutable; a bad stamp raises ValueError each time (not cached).
    return datetime.datetime.strptime(stamp, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)


_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"   # Kubernetes' rand.String alphabet


def random_suffix(n: int = 5) -> str:
    return "".join(secrets.choice(_SUFFIX_ALPHABET) for _ in range(n))


def with_version(obj: dict, rev: int) -> dict:
    obj["metadata"]["resourceVersion"] = str(rev)
    return obj


def get(store: Store, kind: str, namespace: str | None, name: str) -> dict | None:
    kv = store.get(key(kind, namespace, name))
    if kv is None:
        return None
    return with_version(kv.value, kv.mod_revision)


def list_(store: Store, kind: str, namespace: str | None = None) -> list[dict]:
    return [with_version(kv.value, kv.mod_revision) for kv in store.list(prefix(kind, namespace))]


def list_containing(store: Store, kind: str, text: str) -> list[dict]:
    """The objects of KIND whose stored JSON contains TEXT, where the store can
    tell before decoding (SqliteStore.list_containing); every object of KIND
    where it cannot. A pre-filter: callers check what they need."""
    select = getattr(store, "list_containing", None)
    kvs = store.list(prefix(kind)) if select is None else select(prefix(kind), text)
    return [with_version(kv.value, kv.mod_revision) for kv in kvs]


def names_(store: Store, kind: str) -> list[tuple[str | None, str]]:
    """(namespace, name) of every object of KIND, decoding none where the store
    can list keys alone (SqliteStore.keys)."""
    keys = getattr(store, "keys", None)
    where = prefix(kind)
    if keys is None:
        return [(o["metadata"].get("namespace"), o["metadata"]["name"]) for o in list_(store, kind)]
    found = []
    for k in keys(where):
        parts = k[len(where):].split("/")
        found.append((parts[0], parts[1]) if len(parts) == 2 else (None, parts[0]))
    return found


def create(store: Store, obj: dict, *, ttl: float | None = None, uid: str | None = None) -> dict:
    """Store a new object, filling metadata as the API server does. Raises Conflict
    if an object of that kind and name exists. generateName gets a random suffix.
    TTL: seconds until the store drops the object (Events). UID: the one
    admission chose already (a Job's generated selector names it)."""
    obj = copy.deepcopy(obj)
    kind = obj["kind"]
    meta = obj.setdefault("metadata", {})
    if kinds.BY_KIND[kind].namespaced:
        meta.setdefault("namespace", "default")
    obj["apiVersion"] = kinds.stored_version(kind)
    for _ in range(10):
        if not meta.get("name"):
            meta["name"] = meta["generateName"] + random_suffix()
            generated = True
        else:
            generated = False
        meta["uid"] = uid or str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        meta.pop("resourceVersion", None)
        rev = store.create(key(kind, meta.get("namespace"), meta["name"]), obj, ttl=ttl)
        if rev is not None:
            return with_version(obj, rev)
        if not generated:
            raise Conflict(f'{kinds.BY_KIND[kind].singular} "{meta["name"]}" already exists')
        meta["name"] = ""
    raise Conflict(f"could not generate a unique name from {meta['generateName']!r}")


def update(store: Store, obj: dict, *, check_version: bool = True) -> dict:
    """Write back an object read earlier; Conflict if it changed meanwhile."""
    meta = obj["metadata"]
    expect = int(meta["resourceVersion"]) if check_version and meta.get("resourceVersion") else None
    # Every store copies what it is given (JSON, or a deep copy): the body
    # shares OBJ's fields, only its metadata is a copy without the version.
    # (A deep copy of each pod at each status write was 6 % of three agents'
    # CPU in a cProfile while a 1,000-pod cluster came up.)
    body = dict(obj, metadata={k: v for k, v in meta.items() if k != "resourceVersion"})
    rev = store.put(key(obj["kind"], meta.get("namespace"), meta["name"]), body,
                    expect_revision=expect)
    return with_version(obj, rev)


def mutate(store: Store, kind: str, namespace: str | None, name: str, change) -> dict | None:
    """Read-modify-write with retries: CHANGE(obj) edits obj in place. None if gone."""
    for _ in range(20):
        obj = get(store, kind, namespace, name)
        if obj is None:
            return None
        change(obj)
        try:
            return update(store, obj)
        except Conflict:
            continue
    raise Conflict(f"{kind} {namespace}/{name}: too many concurrent updates")


def delete(store: Store, kind: str, namespace: str | None, name: str) -> bool:
    return store.delete(key(kind, namespace, name))


# kube-apiserver's --event-ttl default: an Event lives this long after its last
# write. The control plane scales it by the cluster's timeScale (store.event_ttl).
EVENT_TTL = 3600.0
_EVENT_UPDATE_TRIES = 20


def event_name(involved: dict, reason: str, message: str, type_: str, source: str) -> str:
    """The Event's name: the object's name and a digest of what makes two events the
    same one (Kubernetes' EventCorrelator key: object, reason, message, type, source)."""
    meta = involved["metadata"]
    identity = "\0".join([involved["kind"], meta.get("namespace", "default"), meta["name"],
                          meta.get("uid") or "", reason, message, type_, source])
    return meta["name"] + "." + hashlib.sha256(identity.encode()).hexdigest()[:16]


def record_event(store: Store, involved: dict, reason: str, message: str, *,
                 type_: str = "Normal", source: str = "") -> None:
    """An Event about INVOLVED, as `kubectl describe` lists them.

    As Kubernetes' recorder does, a repeat of an event already stored (same
    object, reason, message, type and source) bumps its count and
    lastTimestamp instead of adding an object: a crash-looping pod keeps one
    BackOff event with a growing count, not one object per restart. Every write
    gives the event a fresh TTL (store.event_ttl, else EVENT_TTL), after which
    the store drops it: events never pile up.
    """
    meta = involved["metadata"]
    namespace = meta.get("namespace", "default")
    name = event_name(involved, reason, message, type_, source)
    ttl = getattr(store, "event_ttl", None) or EVENT_TTL
    k = key("Event", namespace, name)
    for _ in range(_EVENT_UPDATE_TRIES):
        stamp = now()
        kv = store.get(k)
        if kv is None:
            event = {
                "kind": "Event",
                "metadata": {"name": name, "namespace": namespace},
                "involvedObject": {"kind": involved["kind"], "name": meta["name"],
                                   "namespace": namespace, "uid": meta.get("uid")},
                "reason": reason, "message": message, "type": type_,
                "source": {"component": source}, "count": 1,
                "firstTimestamp": stamp, "lastTimestamp": stamp,
            }
            try:
                create(store, event, ttl=ttl)
                return
            except Conflict:        # another writer recorded it first: count this one on top
                continue
        event = kv.value
        event["count"] = int(event.get("count") or 1) + 1
        event["lastTimestamp"] = stamp
        try:
            store.put(k, event, ttl=ttl, expect_revision=kv.mod_revision)
            return
        except Conflict:
            continue
    raise Conflict(f"Event {namespace}/{name}: too many concurrent updates")


def events_for(store: Store, obj: dict) -> list[dict]:
    meta = obj["metadata"]
    evs = [e for e in list_(store, "Event", meta.get("namespace", "default"))
           if e["involvedObject"]["kind"] == obj["kind"] and e["involvedObject"]["name"] == meta["name"]
           and e["involvedObject"].get("uid") in (None, meta.get("uid"))]
    return sorted(evs, key=lambda e: (e["firstTimestamp"], int(e["metadata"]["resourceVersion"])))


