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
    assert first["metadata"]["remainingItemCount"] == 4
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
    assert second["metadata"]["remainingItemCount"] == 1         # counted at the first page's revision
    code, last = call(server, "GET", f"/api/v1/namespaces/default/pods?limit=3&continue="
                                     f"{second['metadata']['continue']}")
    assert [p["metadata"]["name"] for p in last["items"]] == ["p6"] and "continue" not in last["metadata"]
    assert "remainingItemCount" not in last["metadata"]
    # a filtered list does not say how many remain (kube-apiserver cannot know)
    code, filtered = call(server, "GET", "/api/v1/namespaces/default/pods?limit=1&labelSelector=app%3Dnginx")
    assert "continue" in filtered["metadata"] and "remainingItemCount" not in filtered["metadata"]
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


# -- pods/log: timestamps, sinceSeconds, sinceTime ----------------------------------

def test_log_time_formats_are_go_rfc3339nano():
    from netemu.node import logstamps

    assert logstamps.rfc3339nano(1_700_000_000_123_456_789) == "2023-11-14T22:13:20.123456789Z"
    assert logstamps.rfc3339nano(1_700_000_000_120_000_000) == "2023-11-14T22:13:20.12Z"
    assert logstamps.rfc3339nano(1_700_000_000_000_000_000) == "2023-11-14T22:13:20Z"
    assert logstamps.parse_rfc3339("2023-11-14T22:13:20.12Z") == 1_700_000_000_120_000_000
    assert logstamps.parse_rfc3339("2023-11-14T23:13:20+01:00") == 1_700_000_000_000_000_000
    for bad in ("yesterday", "2023-11-14", "2023-11-14T22:13:20.Z", "2023-11-14T22:13:20.1234567891Z"):
        with pytest.raises(ValueError):
            logstamps.parse_rfc3339(bad)


def test_each_line_gets_the_time_its_first_byte_was_seen():
    from netemu.node import logstamps

    stamps = ([4, 10, 15], [100, 200, 300])          # 4 bytes by t=100, 10 by 200, 15 by 300
    data = b"one\ntwo\nthree\nfour\nfive\n"
    assert logstamps.line_times(data, 0, stamps, 999) == [
        (b"one\n", 100), (b"two\n", 200), (b"three\n", 200), (b"four\n", 300), (b"five\n", 999)]
    assert logstamps.line_times(b"three\nfour\n", 8, stamps, 999) == [(b"three\n", 200), (b"four\n", 300)]


@pytest.mark.parametrize("inotify", [True, False], ids=["inotify", "polled"])
def test_log_stamper_records_growth(tmp_path, monkeypatch, inotify):
    """With an inotify instance, and without one (fs.inotify.max_user_instances
    reached: the kernel's EMFILE), where the stamper looks at sizes instead."""
    import trio

    from netemu.node import logstamps

    if not inotify:
        def refused():
            raise OSError(24, "inotify_init1: Too many open files")
        monkeypatch.setattr(logstamps, "Inotify", refused)
    log_path, times_path = str(tmp_path / "c.log"), str(tmp_path / "c.log.times")
    open(log_path, "wb").close()

    async def main():
        stamper = logstamps.LogStamper()
        assert (stamper.inotify is not None) == inotify
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stamper.run)
            st = stamper.add(log_path, times_path)
            with open(log_path, "ab", buffering=0) as f:
                f.write(b"first\n")
                await trio.sleep(0.3)
                f.write(b"second\n")
                await trio.sleep(0.3)
                f.write(b"third")
                stamper.remove(st)               # the container ended: its last bytes stamped
                await trio.sleep(0.1)
                f.write(b" more, unwatched\n")
                await trio.sleep(0.1)
            nursery.cancel_scope.cancel()

    before = __import__("time").time_ns()
    trio.run(main)
    ends, times = logstamps.read_stamps(times_path)
    assert ends == [6, 13, 18]
    assert before < times[0] < times[1] - 200_000_000 < times[2] - 400_000_000


def _write_stamped_log(folder, container, lines, start_ns, step_ns):
    folder.mkdir(parents=True, exist_ok=True)
    data, records, at = b"", [], start_ns
    for line in lines:
        data += line
        records.append(f"{len(data)} {at}\n")
        at += step_ns
    (folder / f"{container}.log").write_bytes(data)
    (folder / f"{container}.log.times").write_text("".join(records))


def test_pod_logs_timestamps_and_since(server, tmp_path):
    import time

    from netemu.node import logstamps

    server.pod_dir = lambda ns, pod: str(tmp_path / ns / pod)
    call(server, "POST", "/api/v1/namespaces/default/pods", POD)
    hour = 3600 * 10 ** 9
    t0 = time.time_ns() - 3 * hour                    # lines an hour apart: 3 h, 2 h, 1 h ago
    _write_stamped_log(tmp_path / "default" / "web", "c", [b"a\n", b"b\n", b"c\n"], t0, hour)
    url = "/api/v1/namespaces/default/pods/web/log"
    stamps = [logstamps.rfc3339nano(t0 + i * hour) for i in range(3)]
    code, body = call(server, "GET", url + "?timestamps=true")
    assert body == f"{stamps[0]} a\n{stamps[1]} b\n{stamps[2]} c\n".encode()
    assert call(server, "GET", url + "?sinceSeconds=9000")[1] == b"b\nc\n"         # 2.5 h
    assert call(server, "GET", url + f"?sinceTime={stamps[1]}&timestamps=true")[1] == \
        f"{stamps[1]} b\n{stamps[2]} c\n".encode()
    assert call(server, "GET", url + "?sinceSeconds=60")[1] == b""
    # tailLines first, then since, then limitBytes over what is sent
    assert call(server, "GET", url + "?tailLines=2&sinceSeconds=99999")[1] == b"b\nc\n"
    assert call(server, "GET", url + "?timestamps=true&limitBytes=10")[1] == stamps[0][:10].encode()
    code, body = call(server, "GET", url + "?sinceSeconds=0")
    assert (code, body["message"]) == (422, 'PodLogOptions "" is invalid: sinceSeconds: Invalid value: 0: '
                                             "must be greater than 0")
    code, body = call(server, "GET", url + f"?sinceSeconds=5&sinceTime={stamps[0]}")
    assert code == 422 and "at most one of `sinceTime` or `sinceSeconds`" in body["message"]
    code, body = call(server, "GET", url + "?sinceTime=yesterday")
    assert code == 400 and body["message"].startswith('parsing time "yesterday"')
    # A line the kubelet has not stamped yet: the time it is read.
    with open(tmp_path / "default" / "web" / "c.log", "ab") as f:
        f.write(b"fresh\n")
    before = time.time_ns()
    body = call(server, "GET", url + "?timestamps=true&tailLines=1")[1]
    stamp, _, line = body.partition(b" ")
    assert line == b"fresh\n" and logstamps.parse_rfc3339(stamp.decode()) >= before - 1000
    # ... and that time stays the line's: the kubelet's record of it, later, changes nothing.
    with open(tmp_path / "default" / "web" / "c.log.times", "a") as f:
        f.write(f"12 {time.time_ns() + 10 ** 9}\n")
    assert call(server, "GET", url + "?timestamps=true&tailLines=1")[1] == body


def test_pod_logs_follow_with_timestamps_sends_whole_lines(server, tmp_path):
    import trio

    from netemu.apiserver import http
    from netemu.node import logstamps

    server.pod_dir = lambda ns, pod: str(tmp_path / ns / pod)
    call(server, "POST", "/api/v1/namespaces/default/pods", POD)
    folder = tmp_path / "default" / "web"
    _write_stamped_log(folder, "c", [b"a\n"], 1_700_000_000_000_000_000, 1)
    got: list[bytes] = []

    async def main():
        req = http.Request("GET", "/api/v1/namespaces/default/pods/web/log",
                           {"follow": ["true"], "timestamps": ["true"]}, {}, b"")
        resp = await server.handle(req)

        async def write(chunk):
            got.append(chunk)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(resp.body, write)
            await trio.sleep(0.3)
            with open(folder / "c.log", "ab") as f:
                f.write(b"half")
            await trio.sleep(0.5)
            assert b"half" not in b"".join(got)          # waits for its newline
            with open(folder / "c.log", "ab") as f:
                f.write(b" done\n")
            with open(folder / "c.log.times", "a") as f:
                f.write("12 1700000001000000000\n")           # len(b"a\nhalf done\n")
            await trio.sleep(0.5)
            registry.mutate(server.store, "Pod", "default", "web",
                            lambda p: p.setdefault("status", {}).update(phase="Succeeded"))

    trio.run(main)
    assert b"".join(got) == (b"2023-11-14T22:13:20Z a\n"
                             b"2023-11-14T22:13:21Z half done\n")
    assert logstamps.rfc3339nano(1_700_000_001_000_000_000) == "2023-11-14T22:13:21Z"


# -- dryRun, Orphan, deletecollection ------------------------------------------------

SVC = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
       "spec": {"type": "NodePort", "selector": {"app": "nginx"}, "ports": [{"port": 80}]}}


def test_dry_run_writes_nothing_and_answers_what_would_be(server):
    rev = server.store.revision()
    keys = {kv.key for kv in server.store.list("/")}
    code, pod = call(server, "POST", "/api/v1/namespaces/default/pods?dryRun=All", POD)
    assert code == 201 and pod["metadata"]["uid"] and "resourceVersion" not in pod["metadata"]
    code, svc = call(server, "POST", "/api/v1/namespaces/default/services?dryRun=All", SVC)
    assert code == 201 and svc["spec"]["clusterIP"] and 30000 <= svc["spec"]["ports"][0]["nodePort"] <= 32767
    assert server.store.revision() == rev and {kv.key for kv in server.store.list("/")} == keys
    assert call(server, "GET", "/api/v1/namespaces/default/pods/web")[0] == 404
    # It refuses what the real request would refuse.
    code, body = call(server, "POST", "/api/v1/namespaces/default/pods?dryRun=All",
                      {**POD, "metadata": {"name": "Bad_Name"}})
    assert code == 422
    call(server, "POST", "/api/v1/namespaces/default/pods", POD)
    code, body = call(server, "POST", "/api/v1/namespaces/default/pods?dryRun=All", POD)
    assert (code, body["reason"]) == (409, "AlreadyExists")
    stored = call(server, "GET", "/api/v1/namespaces/default/pods/web")[1]
    rev = server.store.revision()
    # update, patch, scale and delete: the answer as it would be, the store untouched
    code, patched = call(server, "PATCH", "/api/v1/namespaces/default/pods/web?dryRun=All",
                         {"metadata": {"labels": {"tier": "x"}}}, content_type="application/merge-patch+json")
    assert code == 200 and patched["metadata"]["labels"]["tier"] == "x"
    assert patched["metadata"]["resourceVersion"] == stored["metadata"]["resourceVersion"]
    changed = {**stored, "metadata": {**stored["metadata"], "labels": {"app": "other"}}}
    code, replaced = call(server, "PUT", "/api/v1/namespaces/default/pods/web?dryRun=All", changed)
    assert code == 200 and replaced["metadata"]["labels"] == {"app": "other"}
    code, body = call(server, "DELETE", "/api/v1/namespaces/default/pods/web", {"dryRun": ["All"]})
    assert code == 200
    code, body = call(server, "DELETE", "/api/v1/namespaces/default/pods?dryRun=All")
    assert code == 200 and [p["metadata"]["name"] for p in body["items"]] == ["web"]
    assert server.store.revision() == rev
    assert call(server, "GET", "/api/v1/namespaces/default/pods/web")[1] == stored
    code, body = call(server, "POST", "/api/v1/namespaces/default/pods?dryRun=Some", POD)
    assert (code, body["message"]) == (422, 'CreateOptions.meta.k8s.io "" is invalid: dryRun: Unsupported '
                                            'value: []string{"Some"}: supported values: "All"')


RC = {"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": "rc"},
      "spec": {"replicas": 2, "selector": {"app": "nginx"},
               "template": {"metadata": {"labels": {"app": "nginx"}},
                            "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}}


def _owned_pods(server, owner: dict, n: int) -> None:
    from netemu.k8s import ownership
    for i in range(n):
        pod = {**POD, "metadata": {"name": f"{owner['metadata']['name']}-{i}", "labels": {"app": "nginx"},
                                   "ownerReferences": [ownership.owner_reference(owner)]}}
        assert call(server, "POST", "/api/v1/namespaces/default/pods", pod)[0] == 201


def test_orphan_delete_keeps_dependents_without_the_owner_reference(server):
    code, rc = call(server, "POST", "/api/v1/namespaces/default/replicationcontrollers", RC)
    _owned_pods(server, rc, 2)
    code, body = call(server, "DELETE", "/api/v1/namespaces/default/replicationcontrollers/rc",
                      {"propagationPolicy": "Orphan"})
    assert code == 200 and body["status"] == "Success"
    assert call(server, "GET", "/api/v1/namespaces/default/replicationcontrollers/rc")[0] == 404
    pods = call(server, "GET", "/api/v1/namespaces/default/pods")[1]["items"]
    assert [p["metadata"]["name"] for p in pods] == ["rc-0", "rc-1"]
    assert all("ownerReferences" not in p["metadata"] for p in pods)
    # Background (the default) takes them along, as before.
    code, rc = call(server, "POST", "/api/v1/namespaces/default/replicationcontrollers",
                    {**RC, "metadata": {"name": "rc2"}})
    _owned_pods(server, rc, 1)
    call(server, "DELETE", "/api/v1/namespaces/default/replicationcontrollers/rc2")
    assert [p["metadata"]["name"] for p in call(server, "GET", "/api/v1/namespaces/default/pods")[1]["items"]] \
        == ["rc-0", "rc-1"]


def test_deployment_orphan_keeps_its_replicasets(server):
    from netemu.k8s import ownership
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
              "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "nginx"}},
                       "template": RC["spec"]["template"]}}
    code, d = call(server, "POST", "/apis/apps/v1/namespaces/default/deployments", deploy)
    rs = {"apiVersion": "apps/v1", "kind": "ReplicaSet",
          "metadata": {"name": "d-1", "ownerReferences": [ownership.owner_reference(d)]},
          "spec": deploy["spec"]}
    code, rs = call(server, "POST", "/apis/apps/v1/namespaces/default/replicasets", rs)
    _owned_pods(server, rs, 1)
    code, _ = call(server, "DELETE", "/apis/apps/v1/namespaces/default/deployments/d?propagationPolicy=Orphan")
    assert code == 200
    rs = call(server, "GET", "/apis/apps/v1/namespaces/default/replicasets/d-1")[1]
    assert "ownerReferences" not in rs["metadata"]
    pod = call(server, "GET", "/api/v1/namespaces/default/pods/d-1-0")[1]
    assert pod["metadata"]["ownerReferences"][0]["name"] == "d-1"     # still its ReplicaSet's


def _bind(server, name: str) -> None:
    """Put pod NAME on node n1, as the scheduler would: deleting it then waits
    for its kubelet (deletionTimestamp), which no kubelet here ever does."""
    registry.mutate(server.store, "Pod", "default", name, lambda p: p["spec"].__setitem__("nodeName", "n1"))


def test_foreground_delete_keeps_the_owner_until_its_dependents_are_gone(server):
    from netemu.controllers import garbagecollector
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "fg"},
              "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "nginx"}},
                       "template": RC["spec"]["template"]}}
    from netemu.k8s import ownership
    code, d = call(server, "POST", "/apis/apps/v1/namespaces/default/deployments", deploy)
    code, rs = call(server, "POST", "/apis/apps/v1/namespaces/default/replicasets",
                    {"apiVersion": "apps/v1", "kind": "ReplicaSet",
                     "metadata": {"name": "fg-1", "ownerReferences": [ownership.owner_reference(d)]},
                     "spec": deploy["spec"]})
    _owned_pods(server, rs, 2)
    for name in ("fg-1-0", "fg-1-1"):
        _bind(server, name)
    code, body = call(server, "DELETE", "/apis/apps/v1/namespaces/default/deployments/fg",
                      {"propagationPolicy": "Foreground"})
    # still there, terminating, with the finalizer; so is its ReplicaSet; the pods are terminating
    assert code == 200 and body["kind"] == "Deployment", body
    assert body["metadata"]["finalizers"] == ["foregroundDeletion"] and body["metadata"]["deletionTimestamp"]
    rs = call(server, "GET", "/apis/apps/v1/namespaces/default/replicasets/fg-1")[1]
    assert rs["metadata"]["finalizers"] == ["foregroundDeletion"]
    pods = call(server, "GET", "/api/v1/namespaces/default/pods")[1]["items"]
    assert all(p["metadata"].get("deletionTimestamp") for p in pods)
    assert garbagecollector.sync_once(server.store) == garbagecollector.FOREGROUND_POLL
    assert call(server, "GET", "/apis/apps/v1/namespaces/default/deployments/fg")[0] == 200
    # the kubelet finishes one pod: still blocked; both: the ReplicaSet goes, then the Deployment
    server.store.delete(registry.key("Pod", "default", "fg-1-0"))
    garbagecollector.sync_once(server.store)
    assert call(server, "GET", "/apis/apps/v1/namespaces/default/replicasets/fg-1")[0] == 200
    server.store.delete(registry.key("Pod", "default", "fg-1-1"))
    garbagecollector.sync_once(server.store)
    assert call(server, "GET", "/apis/apps/v1/namespaces/default/replicasets/fg-1")[0] == 404
    assert garbagecollector.sync_once(server.store) is None
    assert call(server, "GET", "/apis/apps/v1/namespaces/default/deployments/fg")[0] == 404


def test_delete_collection_by_selector(server):
    for name, app in (("a", "x"), ("b", "x"), ("c", "y")):
        call(server, "POST", "/api/v1/namespaces/default/pods", _pod(name, app=app))
    call(server, "POST", "/api/v1/namespaces", {"metadata": {"name": "other"}})
    call(server, "POST", "/api/v1/namespaces/other/pods", _pod("d", app="x"))
    code, body = call(server, "DELETE", "/api/v1/namespaces/default/pods?labelSelector=app%3Dx")
    assert code == 200 and body["kind"] == "PodList" and [p["metadata"]["name"] for p in body["items"]] == ["a", "b"]
    left = call(server, "GET", "/api/v1/pods")[1]["items"]
    assert sorted(p["metadata"]["name"] for p in left) == ["c", "d"]
    code, body = call(server, "DELETE", "/api/v1/namespaces/default/pods")
    assert [p["metadata"]["name"] for p in body["items"]] == ["c"]
    assert [p["metadata"]["name"] for p in call(server, "GET", "/api/v1/pods")[1]["items"]] == ["d"]
    assert call(server, "DELETE", "/api/v1/namespaces")[0] == 405       # not for namespaces, as Kubernetes
    code, body = call(server, "DELETE", "/api/v1/namespaces/other/pods", {"propagationPolicy": "Sideways"})
    assert code == 422 and "propagationPolicy" in body["message"]


# -- the kubernetes Service -----------------------------------------------------------

def test_the_kubernetes_service_is_kept(server):
    from types import SimpleNamespace

    from netemu.apiserver import bootstrap

    settings = SimpleNamespace(service_range="10.254.0.0/16", time_scale=1.0)
    store = server.store
    assert bootstrap.reconcile(store, settings, "10.1.0.5", 8080) == [
        "service created", "endpoints created", "endpointslice created"]
    assert bootstrap.reconcile(store, settings, "10.1.0.5", 8080) == []          # nothing to do
    svc = registry.get(store, "Service", "default", "kubernetes")
    assert svc["spec"]["clusterIP"] == "10.254.0.1" and "selector" not in svc["spec"]
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "protocol": "TCP", "targetPort": 8080}]
    ep = registry.get(store, "Endpoints", "default", "kubernetes")
    assert ep["subsets"] == [{"addresses": [{"ip": "10.1.0.5"}],
                              "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}]
    code, slices = call(server, "GET", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
                                       "?labelSelector=kubernetes.io/service-name%3Dkubernetes")
    assert [s["endpoints"][0]["addresses"] for s in slices["items"]] == [["10.1.0.5"]]
    # No one else gets the reserved address ...
    other = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "x"},
             "spec": {"clusterIP": "10.254.0.1", "ports": [{"port": 80}]}}
    from netemu import api
    with pytest.raises(api.ApiError, match="not in the valid range"):
        api.create(store, other, settings)
    # ... deleted or changed, it comes back as it was (the address moves with the master)
    api.delete(store, "Service", "default", "kubernetes")
    registry.mutate(store, "EndpointSlice", "default", "kubernetes", lambda s: s.update(endpoints=[]))
    assert bootstrap.reconcile(store, settings, "10.1.0.6", 8080) == [
        "service created", "endpoints created", "endpointslice updated"]
    assert registry.get(store, "Service", "default", "kubernetes")["spec"]["clusterIP"] == "10.254.0.1"
    assert registry.get(store, "Endpoints", "default", "kubernetes")["subsets"][0]["addresses"] == [{"ip": "10.1.0.6"}]
    code, table = call(server, "GET", "/api/v1/namespaces/default/services", accept=TABLE)
    assert table["rows"][0]["cells"][:5] == ["kubernetes", "ClusterIP", "10.254.0.1", "<none>", "8080/TCP"]


# -- protobuf bodies of kubectl's typed create commands ----------------------------------

def _without_empty(value):
    if isinstance(value, dict):
        out = {k: _without_empty(v) for k, v in value.items()}
        return {k: v for k, v in out.items() if v not in (None, {}, [], "")}
    if isinstance(value, list):
        return [_without_empty(v) for v in value]
    return value


def test_kubectl_protobuf_bodies_decode_to_what_kubectl_prints_and_are_stored(server):
    import os

    from netemu.apiserver import http
    from netemu.k8s import protobuf

    import trio

    data = os.path.join(os.path.dirname(__file__), "data", "kubectl-protobuf-bodies.json")
    bodies = json.load(open(data))["bodies"]
    for b in bodies:
        body = bytes.fromhex(b["body_hex"])
        assert protobuf.decode_object(body) == _without_empty(b["kubectl_json"]), b["command"]
        method, path = b["request"].split(" ", 1)
        resp = trio.run(server.handle, http.Request(method, path, {}, {"content-type": protobuf.MEDIA_TYPE}, body))
        stored = json.loads(resp.body)
        if b["kubectl_json"]["spec"].get("type") == "ExternalName":
            assert resp.status == 422                       # netemu does not emulate them: said so
            continue
        assert resp.status == 201, (b["command"], stored)
    deploy = call(server, "GET", "/apis/apps/v1/namespaces/default/deployments/web")[1]
    assert deploy["spec"]["replicas"] == 0                 # a pointer field sent as 0 stays 0
    assert deploy["spec"]["template"]["spec"]["containers"][0]["ports"] == [{"containerPort": 80, "protocol": "TCP"}]
    svc = call(server, "GET", "/api/v1/namespaces/default/services/svc1")[1]
    assert [p["targetPort"] for p in svc["spec"]["ports"]] == [8080, "https"]
    job = call(server, "GET", "/apis/batch/v1/namespaces/default/jobs/once")[1]
    assert job["spec"]["template"]["spec"]["containers"][0]["command"] == ["sh", "-c", "echo hi"]
    # a field the tables do not have is refused by number, never dropped
    with pytest.raises(protobuf.DecodeError, match="PodSpec: unknown field number 14"):
        protobuf.decode_message(b"\x72\x00", "PodSpec")         # securityContext: {}


def test_a_job_without_a_selector_gets_one_from_its_uid(server):
    job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "once"},
           "spec": {"template": {"spec": {"containers": [{"name": "c", "image": "busybox"}],
                                          "restartPolicy": "Never"}}}}
    code, body = call(server, "POST", "/apis/batch/v1/namespaces/default/jobs", job)
    uid = body["metadata"]["uid"]
    assert code == 201 and body["spec"]["selector"] == {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
    assert body["spec"]["template"]["metadata"]["labels"] == {
        "batch.kubernetes.io/controller-uid": uid, "batch.kubernetes.io/job-name": "once",
        "controller-uid": uid, "job-name": "once"}
    # read back and written again (label, replace) it is accepted; the selector stays
    code, body = call(server, "PATCH", "/apis/batch/v1/namespaces/default/jobs/once",
                      {"metadata": {"labels": {"x": "y"}}}, content_type="application/merge-patch+json")
    assert code == 200 and body["spec"]["selector"]["matchLabels"]["batch.kubernetes.io/controller-uid"] == uid
    code, body = call(server, "PUT", "/apis/batch/v1/namespaces/default/jobs/once", body)
    assert code == 200
    # a selector of one's own still needs manualSelector
    other = {**job, "metadata": {"name": "mine"}}
    other["spec"] = {**job["spec"], "selector": {"matchLabels": {"a": "b"}}}
    assert call(server, "POST", "/apis/batch/v1/namespaces/default/jobs", other)[0] == 422


def test_config_maps_are_ordinary_objects_with_kubes_rules(server):
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "app"}, "data": {"a.conf": "x=1"}}
    code, stored = call(server, "POST", "/api/v1/namespaces/default/configmaps", cm)
    assert code == 201 and stored["data"] == {"a.conf": "x=1"}
    code, stored = call(server, "PUT", "/api/v1/namespaces/default/configmaps/app",
                        {**cm, "data": {"a.conf": "x=2"}, "binaryData": {"b": "AAE="}})
    assert code == 200 and stored["data"] == {"a.conf": "x=2"} and stored["binaryData"] == {"b": "AAE="}
    code, table = call(server, "GET", "/api/v1/namespaces/default/configmaps", accept=TABLE)
    assert table["rows"][0]["cells"][:2] == ["app", "2"]
    for bad, problem in (({"data": {"a b": "x"}}, "data[a b]: Invalid value: \"a b\": a valid config key"),
                         ({"data": {"k": 1}}, "data[k]: must be a string"),
                         ({"binaryData": {"k": "!!"}}, "binaryData[k]: must be base64"),
                         ({"data": {"k": "x" * (1024 * 1024)}}, "[]: Too long: must have at most 1048576 bytes"),
                         ({"data": {"k": "a"}, "binaryData": {"k": "AA=="}}, "duplicate of key")):
        code, status = call(server, "POST", "/api/v1/namespaces/default/configmaps",
                            {**cm, "metadata": {"name": "bad"}, **bad})
        assert code == 422 and problem in status["message"], status
    assert call(server, "GET", "/api/v1/namespaces/default/configmaps/bad")[0] == 404
    # immutable: its data can no longer change, the object can still be deleted
    call(server, "PUT", "/api/v1/namespaces/default/configmaps/app", {**cm, "immutable": True})
    code, status = call(server, "PUT", "/api/v1/namespaces/default/configmaps/app",
                        {**cm, "data": {"a.conf": "x=3"}, "immutable": True})
    assert code == 422 and "data: Forbidden: field is immutable when `immutable` is set" in status["message"]
    assert call(server, "DELETE", "/api/v1/namespaces/default/configmaps/app")[0] == 200


def test_status_subresource_writes_only_the_status(server):
    code, d = call(server, "POST", "/apis/apps/v1/namespaces/default/deployments",
                   {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "st"},
                    "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "nginx"}},
                             "template": RC["spec"]["template"]}})
    url = "/apis/apps/v1/namespaces/default/deployments/st/status"
    code, got = call(server, "GET", url)
    assert code == 200 and got["metadata"]["name"] == "st"
    # a status patch: the status changes, the spec and labels in the same body do not
    code, patched = call(server, "PATCH", url, {"status": {"replicas": 3, "observedGeneration": 1},
                                                "spec": {"replicas": 9}, "metadata": {"labels": {"x": "y"}}},
                         content_type="application/merge-patch+json")
    assert code == 200 and patched["status"]["replicas"] == 3
    assert patched["spec"]["replicas"] == 1 and "x" not in (patched["metadata"].get("labels") or {})
    # a PUT with a stale resourceVersion is a conflict; a status no reader could take is refused
    stale = {**patched, "metadata": {**patched["metadata"], "resourceVersion": d["metadata"]["resourceVersion"]}}
    assert call(server, "PUT", url, stale)[0] == 409
    for bad in ({"replicas": -1}, {"conditions": [1, 2]}, {"conditions": {"type": "x"}}, "up"):
        code, status = call(server, "PATCH", url, {"status": bad}, content_type="application/merge-patch+json")
        assert code == 422 and "is invalid: status" in status["message"], (bad, status)
    assert call(server, "GET", "/api/v1/namespaces/default/configmaps/x/status")[0] == 404
