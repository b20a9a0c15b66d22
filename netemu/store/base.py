"""The cluster's state store: a revisioned key-value space with watch and TTL leases.

Shaped after etcd v3 as Kubernetes and flannel use it: every write bumps one
global revision; a key remembers the revision of its last change (its
resourceVersion); writes can be conditional on that revision (a transaction);
keys may carry a TTL and vanish when it runs out; watchers receive every change
under a prefix after a given revision, deletions included.

The embedded SQLite store (netemu.store.sqlite) implements this for one machine;
the etcd store (netemu.store.etcd, over etcd v3) implements it for a cluster
spread over several. tests/unit/test_store.py is the contract both pass. A TTL
key stays while its owner writes it again before the TTL runs out (with etcd:
its lease is renewed; lease TTLs are whole seconds, at least etcd's minimum)
and goes, as a DELETE event, once the owner stops.
"""

from __future__ import annotations

import dataclasses
from collections.abc import AsyncIterator
from typing import Any, Protocol


@dataclasses.dataclass(frozen=True)
class KeyValue:
    key: str
    value: Any
    mod_revision: int
    create_revision: int
    expires_at: float | None = None


@dataclasses.dataclass(frozen=True)
class Event:
    type: str                # "PUT" or "DELETE"
    key: str
    value: Any               # the new value (PUT) or the last value (DELETE)
    revision: int


class Conflict(Exception):
    """A conditional write lost: the key changed (or exists) since it was read."""


class Compacted(Exception):
    """A watch asked for history older than the store still keeps."""


class Store(Protocol):
    def revision(self) -> int: ...

    def get(self, key: str) -> KeyValue | None: ...

    def list(self, prefix: str) -> list[KeyValue]: ...

    def list_at(self, prefix: str, revision: int, start_after: str = "",
                limit: int | None = None) -> list[KeyValue]:
        """The keys under PREFIX as they were at REVISION, after START_AFTER, in
        key order, at most LIMIT (one page of a consistent list). Raises
        Compacted when REVISION is older than the history kept."""

    def count_at(self, prefix: str, revision: int, start_after: str = "") -> int:
        """How many keys list_at(PREFIX, REVISION, START_AFTER) holds, without
        reading their values (a paged list's remainingItemCount)."""

    def put(self, key: str, value: Any, *, ttl: float | None = None,
            expect_revision: int | None = None) -> int:
        """Write KEY. expect_revision: 0 means "only if absent"; N means "only if its
        mod_revision is still N". Raises Conflict otherwise. Returns the new revision."""

    def delete(self, key: str, *, expect_revision: int | None = None) -> bool: ...

    def delete_prefix(self, prefix: str) -> int: ...

    def events_since(self, revision: int, prefix: str = "") -> list[Event]: ...

    def watch(self, prefix: str, since: int) -> AsyncIterator[Event]: ...

    def close(self) -> None: ...
