"""Lists in pages: `?limit=N` and `?continue=TOKEN`, as kube-apiserver serves them.

kubectl asks for every list in chunks (`--chunk-size`, 500 by default): the
first request carries limit=N, and as long as the answer's metadata.continue is
set, the next carries that token. Every page of one list is read at the
revision of the first (the store's list_at), so the pages together are one
consistent list even while the cluster changes; a token whose revision the
store has compacted meanwhile is answered 410 Expired, and the client starts
over.

The token is kube-apiserver's: base64url (no padding) of
{"v":"meta.k8s.io/v1","rv":REVISION,"start":KEY}, KEY being the last key
listed, relative to the list's key prefix, followed by a NUL (the smallest key
after it).
"""

from __future__ import annotations

import base64
import binascii
import json

TOKEN_VERSION = "meta.k8s.io/v1"
TOO_OLD = ("The provided continue parameter is too old to display a consistent list result. "
           "You can start a new list without the continue parameter.")


MAX_LIMIT = 2 ** 31 - 1


class PagingError(ValueError):
    """A ?limit= or ?continue= this server cannot serve (a 400)."""


def encode_token(revision: int, last_key: str, prefix: str) -> str:
    data = {"v": TOKEN_VERSION, "rv": revision, "start": last_key[len(prefix):] + "\x00"}
    raw = json.dumps(data, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def decode_token(token: str, prefix: str) -> tuple[int, str]:
    """(revision, the key to list after) from TOKEN; PagingError names the problem."""
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
        data = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise PagingError("continue key is not valid: not base64-encoded JSON") from None
    if not isinstance(data, dict) or data.get("v") != TOKEN_VERSION:
        raise PagingError(f"continue key is not valid: incorrect encoded start resourceVersion "
                       f"(version {TOKEN_VERSION} required)")
    revision, start = data.get("rv"), data.get("start")
    if isinstance(revision, bool) or not isinstance(revision, int) or not 0 < revision < 2 ** 63:
        raise PagingError("continue key is not valid: incorrect encoded start resourceVersion "
                       "(version meta.k8s.io/v1)")
    if not isinstance(start, str) or not start:
        raise PagingError("continue key is not valid: encoded start key empty")
    if start.startswith("/") or ".." in start.split("/"):
        raise PagingError("continue key is not valid: encoded start key may not leave the resource")
    return revision, prefix + start.rstrip("\x00")


def parse_limit(value: str | None) -> int | None:
    """?limit=: a positive number of items per page; 0, negative or absent: all."""
    if not value:
        return None
    try:
        limit = int(value)
    except ValueError:
        raise PagingError(f'invalid limit "{value}": must be an integer') from None
    # More than any store holds is all of it (and fits SQLite's integers).
    return min(limit, MAX_LIMIT) if limit > 0 else None


def page(store, prefix: str, revision: int, start_after: str, limit: int,
         keep) -> tuple[list[dict], str | None]:
    """Up to LIMIT objects under PREFIX that KEEP accepts, as they were at
    REVISION, after key START_AFTER; and the last key read when more keys
    follow (the next token's), else None. Filtered lists read on until the
    page is full or the keys run out, as kube-apiserver does, so a page
    holds fewer than LIMIT only at the end."""
    out: list[dict] = []
    after = start_after
    batch = max(limit + 1, 64)
    while True:
        kvs = store.list_at(prefix, revision, after, batch)
        for i, kv in enumerate(kvs):
            obj = kv.value
            obj.setdefault("metadata", {})["resourceVersion"] = str(kv.mod_revision)
            if not keep(obj):
                continue
            out.append(obj)
            if len(out) == limit:
                more = i + 1 < len(kvs) or bool(store.list_at(prefix, revision, kv.key, 1))
                return out, (kv.key if more else None)
        if len(kvs) < batch:
            return out, None
        after = kvs[-1].key
