"""The API surface beyond the first slice (issue 13), without root: paged lists
(limit/continue), log timestamps and since, dryRun, Orphan and deletecollection,
the `kubernetes` Service. Requests go to ApiServer.handle over a store in a temp
directory, as in test_apiserver.py."""

from __future__ import annotations

import base64
import json

import pytest

from netemu.apiserver import paging
from netemu.store import registry
from tests.unit.test_apiserver import POD, TABLE, call, server  # noqa: F401  (the fixture)


def _pod(name: str, **labels) -> dict:
    return {**POD, "metadata": {"name": name, "labels": labels or {"app": "nginx"}}}


def _pages(server, path: str, accept="application/json"):
    """Every page of a list: [(names, continue token)]."""
    out, token = [], None
    while True:
        sep = "&" if "?" in path else "?"
        code, body = call(server, "GET", path + (f"{sep}continue={token}" if token else ""), accept=accept)
        assert code == 200, body
        rows = body["rows"] if accept == TABLE else body["items"]
        names = [r["cells"][0] for r in rows] if accept == TABLE else [p["metadata"]["name"] for p in rows]
        token = body["metadata"].get("continue")
        out.append((names, body["metadata"]["resourceVersion"]))
        if not token:
            return out


def test_limit_and_continue_page_one_consistent_list(server):
    for i in range(7):
        call(server, "POST", "/api/v1/namespaces/default/pods", _pod(f"p{i}"))
    code, first = call(server, "GET", "/api/v1/namespaces/default/pods?limit=3")
    assert [p["metadata"]["name"] for p in first["items"]] == ["p0", "p1", "p2"]
    token = first["metadata"]["continue"]
    data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    assert data == {"v": "meta.k8s.io/v1", "rv": int(first["metadata"]["resourceVersion"]),
                    "start": "p2\x00"}
    # Changes after the first page do not show in the later ones: they are
    # read at the first page's revision.
    call(server, "DELETE", "/api/v1/namespaces/default/pods/p4")
    call(server, "POST", "/api/v1/namespaces/default/pods", _pod("p35"))
    call(server, "PATCH", "/api/v1/namespaces/default/pods/p5", {"metadata": {"labels": {"x": "y"}}},
         content_type="application/merge-patch+json")
    code, second = call(server, "GET", f"/api/v1/namespaces/default/pods?limit=3&continue={token}")
    assert [p["metadata"]["name"] for p in second["items"]] == ["p3", "p4", "p5"]
    assert "x" not in second["items"][2]["metadata"]["labels"]
    assert second["metadata"]["resourceVersion"] == first["metadata"]["resourceVersion"]
    code, last = call(server, "GET", f"/api/v1/namespaces/default/pods?limit=3&continue="
                                     f"{second['metadata']['continue']}")
    assert [p["metadata"]["name"] for p in last["items"]] == ["p6"] and "continue" not in last["metadata"]
    # A new list sees the changes; an exact fit has no continue.
    pages = _pages(server, "/api/v1/namespaces/default/pods?limit=7")
    assert pages[0][0] == ["p0", "p1", "p2", "p3", "p35", "p5", "p6"] and len(pages) == 1


def test_pages_of_a_filtered_table_and_across_namespaces(server):
    for i in range(6):
        call(server, "POST", "/api/v1/namespaces/default/pods", _pod(f"p{i}", app="a" if i % 2 else "b"))
    call(server, "POST", "/api/v1/namespaces", {"metadata": {"name": "other"}})
    call(server, "POST", "/api/v1/namespaces/other/pods", _pod("q"))
    pages = _pages(server, "/api/v1/namespaces/default/pods?limit=2&labelSelector=app%3Da", TABLE)
    assert [names for names, _ in pages] == [["p1", "p3"], ["p5"]]
    pages = _pages(server, "/api/v1/pods?limit=4")
    assert [names for names, _ in pages] == [["p0", "p1", "p2", "p3"], ["p4", "p5", "q"]]


def test_bad_and_expired_continue_tokens(server):
    for i in range(3):
        call(server, "POST", "/api/v1/namespaces/default/pods", _pod(f"p{i}"))
    code, body = call(server, "GET", "/api/v1/namespaces/default/pods?limit=1&continue=!!notbase64")
    assert (code, body["reason"]) == (400, "BadRequest") and "continue key is not valid" in body["message"]
    escape = paging.encode_token(5, "/registry/pods/default/../../secrets/x", "/registry/pods/default/")
    code, body = call(server, "GET", f"/api/v1/namespaces/default/pods?limit=1&continue={escape}")
    assert code == 400 and "may not leave" in body["message"]
    code, body = call(server, "GET", "/api/v1/namespaces/default/pods?limit=x")
    assert code == 400 and body["message"] == 'invalid limit "x": must be an integer'
    code, first = call(server, "GET", "/api/v1/namespaces/default/pods?limit=1")
    token = first["metadata"]["continue"]
    code, body = call(server, "GET", f"/api/v1/namespaces/default/pods?limit=1&continue={token}"
                                     "&resourceVersion=3")
    assert code == 400 and body["message"] == "specifying resource version is not allowed when using continue"
    # The store compacts past the token's revision: 410 Expired, as kube-apiserver.
    call(server, "DELETE", "/api/v1/namespaces/default/pods/p2")
    server.store._db.execute("UPDATE meta SET compacted = ? WHERE id = 0", (server.store.revision(),))
    code, body = call(server, "GET", f"/api/v1/namespaces/default/pods?limit=1&continue={token}")
    assert (code, body["reason"]) == (410, "Expired") and "too old" in body["message"]
    # ... and a new list still works.
    code, body = call(server, "GET", "/api/v1/namespaces/default/pods?limit=5")
    assert code == 200 and len(body["items"]) == 2
