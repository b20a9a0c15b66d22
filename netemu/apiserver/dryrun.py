"""?dryRun=All: a write that goes through all of admission and stores nothing.

kube-apiserver runs a dry-run request through decoding, defaulting,
validation and admission exactly as a real one, and stops short of etcd. Here
the request runs unchanged over a DryRunStore: the cluster's store for every
read, a private overlay for every write, thrown away when the request ends.
So a dry run refuses what the real request would refuse (a taken name, a stale
resourceVersion, a node port in use) and answers what it would have stored,
allocations included (a Service gets the cluster IP it would have got; nothing
is claimed).
"""

from __future__ import annotations

import copy
import json
from typing import Any

from netemu.store.base import Conflict, KeyValue

SUPPORTED = ("All",)


def problem(values: list[str]) -> str | None:
    """Why ?dryRun= VALUES cannot be served, or None (kube-apiserver's words)."""
    bad = [v for v in values if v not in SUPPORTED]
    if not bad:
        return None
    shown = ", ".join(json.dumps(v) for v in values)
    return f'dryRun: Unsupported value: []string{{{shown}}}: supported values: "All"'


_GONE = object()


class DryRunStore:
    """The store as a dry-run request sees it: reads fall through to BASE
    unless this request wrote the key; writes stay here."""

    def __init__(self, base):
        self.base = base
        self._revision = base.revision()
        self._own: dict[str, Any] = {}          # key -> KeyValue | _GONE
        self.event_ttl = getattr(base, "event_ttl", None)

    def revision(self) -> int:
        return self._revision

    def get(self, key: str) -> KeyValue | None:
        if key in self._own:
            kv = self._own[key]
            return None if kv is _GONE else copy.deepcopy(kv)
        return self.base.get(key)

    def list(self, prefix: str) -> list[KeyValue]:
        out = {kv.key: kv for kv in self.base.list(prefix)}
        for key, kv in self._own.items():
            if key.startswith(prefix):
                if kv is _GONE:
                    out.pop(key, None)
                else:
                    out[key] = copy.deepcopy(kv)
        return [out[k] for k in sorted(out)]

    def list_at(self, prefix: str, revision: int, start_after: str = "", limit: int | None = None):
        return self.base.list_at(prefix, revision, start_after, limit)

    def count_at(self, prefix: str, revision: int, start_after: str = "") -> int:
        return self.base.count_at(prefix, revision, start_after)

    def put(self, key: str, value: Any, *, ttl: float | None = None,
            expect_revision: int | None = None) -> int:
        current = self.get(key)
        have = current.mod_revision if current else 0
        if expect_revision is not None and expect_revision != have:
            raise Conflict(f"{key}: expected revision {expect_revision}, found {have}")
        self._revision += 1
        created = current.create_revision if current else self._revision
        self._own[key] = KeyValue(key, copy.deepcopy(value), self._revision, created)
        return self._revision

    def create(self, key: str, value: Any, *, ttl: float | None = None) -> int | None:
        try:
            return self.put(key, value, ttl=ttl, expect_revision=0)
        except Conflict:
            return None

    def delete(self, key: str, *, expect_revision: int | None = None) -> bool:
        current = self.get(key)
        if current is None:
            if expect_revision not in (None, 0):
                raise Conflict(f"{key}: expected revision {expect_revision}, found none")
            return False
        if expect_revision is not None and expect_revision != current.mod_revision:
            raise Conflict(f"{key}: expected revision {expect_revision}, found {current.mod_revision}")
        self._revision += 1
        self._own[key] = _GONE
        return True

    def delete_prefix(self, prefix: str) -> int:
        keys = [kv.key for kv in self.list(prefix)]
        for key in keys:
            self.delete(key)
        return len(keys)

    def stored_version(self, key: str) -> str | None:
        """The resourceVersion KEY has in the real store (what a dry run's
        answer shows: nothing was written), None when it is not there."""
        kv = self.base.get(key)
        return str(kv.mod_revision) if kv else None

    def events_since(self, revision: int, prefix: str = ""):
        return self.base.events_since(revision, prefix)

    def existed_before(self, key: str, revision: int):
        return self.base.existed_before(key, revision)

    def expire(self) -> None:
        pass

    def close(self) -> None:
        pass
