"""The API server's routes, discovery, Tables and Status errors, without root:
requests go to ApiServer.handle over a store in a temp directory (no sockets)."""

from __future__ import annotations

import json
import os

import pytest
import trio

from netemu.apiserver import discovery, http, tables
from netemu.apiserver.server import ApiServer, ensure_system_namespaces, merge_patch, parse_path
from netemu.k8s import selectors
from netemu.store import registry
from netemu.store.sqlite import SqliteStore

TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io,application/json;as=Table;v=v1beta1;g=meta.k8s.io,application/json"


@pytest.fixture
def server(tmp_path):
    store = SqliteStore(str(tmp_path / "state.db"), create=True)
    registry.create(store, {"kind": "Node", "metadata": {"name": "n1", "labels": {"disk": "ssd"}},
                            "spec": {}, "status": {}})
    ensure_system_namespaces(store)
    yield ApiServer(store)
    store.close()


def call(server, method, path, body=None, accept="application/json", content_type="application/json"):
    path, _, qs = path.partition("?")
    import urllib.parse
    req = http.Request(method, path, urllib.parse.parse_qs(qs, keep_blank_values=True),
                       {"accept": accept, "content-type": content_type},
                       json.dumps(body).encode() if body is not None else b"")
    resp = trio.run(server.handle, req)
    return resp.status, (json.loads(resp.body) if isinstance(resp.body, bytes) and resp.body
                         and resp.content_type.startswith("application/json") else resp.body)


POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "labels": {"app": "nginx"}},
       "spec": {"containers": [{"name": "c", "image": "nginx"}]}}


def test_discovery_lists_short_names_and_the_tutorials_extensions_group():
    v1 = discovery.resource_list("v1")
    pods = next(r for r in v1["resources"] if r["name"] == "pods")
    assert (pods["kind"], pods["singularName"], pods["namespaced"], pods["shortNames"]) == ("Pod", "pod", True, ["po"])
    assert "watch" in pods["verbs"] and "deletecollection" in pods["verbs"]
    ep = next(r for r in v1["resources"] if r["name"] == "endpoints")
    assert ep["shortNames"] == ["ep"]
    ext = discovery.resource_list("extensions/v1beta1")
    ds = next(r for r in ext["resources"] if r["name"] == "daemonsets")
    assert ds["kind"] == "DaemonSet" and ds["namespaced"]
    assert "categories" not in ds and "shortNames" not in ds    # `get all` and `ds` lead to apps/v1
    scale = next(r for r in v1["resources"] if r["name"] == "replicationcontrollers/scale")
    assert (scale["group"], scale["version"], scale["kind"]) == ("autoscaling", "v1", "Scale")
    groups = [g["name"] for g in discovery.api_group_list()["groups"]]
    assert groups.index("batch") < groups.index("extensions")   # bare `job` resolves to batch
    assert discovery.resource_list("networking.k8s.io/v1") is None


KUBECTL_133_DISCOVERY = ("application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList,"
                         "application/json;g=apidiscovery.k8s.io;v=v2beta1;as=APIGroupDiscoveryList,"
                         "application/json")


def test_aggregated_discovery_is_served_to_who_asks_first_for_it():
    assert discovery.wants_aggregated(KUBECTL_133_DISCOVERY) == "v2"
    assert discovery.wants_aggregated("application/json;g=apidiscovery.k8s.io;v=v2beta1;"
                                      "as=APIGroupDiscoveryList,application/json") == "v2beta1"
    assert discovery.wants_aggregated("application/json, */*") is None
    assert discovery.wants_aggregated("application/json,application/json;g=apidiscovery.k8s.io;"
                                      "v=v2;as=APIGroupDiscoveryList") is None
    assert discovery.wants_aggregated("application/json;g=apidiscovery.k8s.io;v=v1;"
                                      "as=APIGroupDiscoveryList") is None
    assert discovery.wants_aggregated(None) is None


def test_aggregated_discovery_nests_subresources_and_keeps_legacy_facts():
    core = discovery.aggregated("api", "v2")
    assert core["apiVersion"] == "apidiscovery.k8s.io/v2"
    [group] = core["items"]
    assert group["metadata"]["name"] == "" and [v["version"] for v in group["versions"]] == ["v1"]
    pods = next(r for r in group["versions"][0]["resources"] if r["resource"] == "pods")
    assert pods["responseKind"] == {"group": "", "version": "v1", "kind": "Pod"}
    assert (pods["scope"], pods["singularResource"], pods["shortNames"]) == ("Namespaced", "pod", ["po"])
    assert {"log", "exec"} <= {s["subresource"] for s in pods["subresources"]}
    apis = discovery.aggregated("apis", "v2beta1")
    names = [g["metadata"]["name"] for g in apis["items"]]
    assert names == discovery.groups()
    apps = apis["items"][names.index("apps")]["versions"][0]
    deploy = next(r for r in apps["resources"] if r["resource"] == "deployments")
    scale = next(s for s in deploy["subresources"] if s["subresource"] == "scale")
    assert scale["responseKind"] == {"group": "autoscaling", "version": "v1", "kind": "Scale"}
    nodes = next(r for r in group["versions"][0]["resources"] if r["resource"] == "nodes")
    assert nodes["scope"] == "Cluster"
    # the same resources as the legacy per-version lists, none lost or added
    for gv in ("v1", "apps/v1", "extensions/v1beta1"):
        legacy = {r["name"] for r in discovery.resource_list(gv)["resources"]}
        doc = core if gv == "v1" else apis
        version = next(v for g in doc["items"] for v in g["versions"]
                       if (g["metadata"]["name"] + "/" + v["version"]).lstrip("/") == gv)
        agg = {r["resource"] for r in version["resources"]}
        agg |= {f"{r['resource']}/{s['subresource']}" for r in version["resources"]
                for s in r.get("subresources", [])}
        assert agg == legacy, gv


def test_discovery_roots_answer_in_the_format_asked_for(server):
    code, body = call(server, "GET", "/apis", accept=KUBECTL_133_DISCOVERY)
    assert code == 200 and body["kind"] == "APIGroupDiscoveryList"
    code, body = call(server, "GET", "/api", accept="application/json, */*")
    assert code == 200 and body["kind"] == "APIVersions" and body["versions"] == ["v1"]


def test_paths_not_served_are_404_and_wrong_methods_405(server):
    assert call(server, "GET", "/apis/networking.k8s.io/v1/namespaces/x/ingresses/n1")[0] == 404
    assert call(server, "GET", "/api/v1/namespaces/default/nodes/n1")[0] == 404   # nodes are cluster-scoped
    assert call(server, "GET", "/api/v1/namespaces/default/pods/web/log")[0] == 404  # no kubelet folder given
    assert call(server, "GET", "/api/v1/namespaces/default/pods/web/exec")[0] == 404  # not served yet
    assert call(server, "GET", "/openapi/v3")[0] == 404
    assert call(server, "GET", "/api/v1/pods/web")[0] == 404                       # pods live under a namespace
    assert call(server, "POST", "/api/v1/pods", POD)[0] == 405
    code, body = call(server, "POST", "/api/v1/nodes/n1")
    assert code == 405 and body["reason"] == "MethodNotAllowed"
    code, body = call(server, "GET", "/openapi/v2")
    assert code == 200 and body == b""


def test_not_found_names_the_qualified_resource(server):
    code, body = call(server, "GET", "/api/v1/namespaces/default/pods/nosuch")
    assert (code, body["reason"], body["message"]) == (404, "NotFound", 'pods "nosuch" not found')
    code, body = call(server, "GET", "/api/v1/namespaces/default/endpoints/nosuch")
    assert body["message"] == 'endpoints "nosuch" not found'
    code, body = call(server, "GET", "/apis/batch/v1/namespaces/default/jobs/nosuch")
    assert body["message"] == 'jobs.batch "nosuch" not found' and body["details"]["group"] == "batch"


def test_create_get_conflict_and_bad_bodies(server):
    code, pod = call(server, "POST", "/api/v1/namespaces/default/pods", POD)
    assert code == 201 and pod["metadata"]["uid"] and pod["metadata"]["resourceVersion"]
    code, body = call(server, "POST", "/api/v1/namespaces/default/pods", POD)
    assert (code, body["reason"], body["message"]) == (409, "AlreadyExists", 'pods "web" already exists')
    req = http.Request("POST", "/api/v1/namespaces/default/pods", {}, {}, b"{not json")
    resp = trio.run(server.handle, req)
    assert resp.status == 400 and json.loads(resp.body)["reason"] == "BadRequest"
    code, body = call(server, "POST", "/api/v1/namespaces/kube-system/pods", POD | {"metadata": {
        "name": "x", "namespace": "default"}})
    assert code == 400 and "namespace" in body["message"]
    bad = {**POD, "metadata": {"name": "Bad_Name"}}
    code, body = call(server, "POST", "/api/v1/namespaces/default/pods", bad)
    assert code == 422 and body["reason"] == "Invalid" and "Bad_Name" in body["message"]
    # nothing half-written
    code, listed = call(server, "GET", "/api/v1/namespaces/default/pods")
    assert [p["metadata"]["name"] for p in listed["items"]] == ["web"]


def test_extensions_job_is_stored_as_batch_and_shown_as_asked(server):
    job = {"apiVersion": "extensions/v1beta1", "kind": "Job", "metadata": {"name": "package-check"},
           "spec": {"selector": {"matchLabels": {"test": "dpkg"}},
                    "template": {"metadata": {"labels": {"test": "dpkg"}},
                                 "spec": {"containers": [{"name": "c", "image": "ubuntu"}],
                                          "restartPolicy": "Never"}}}}
    code, body = call(server, "POST", "/apis/extensions/v1beta1/namespaces/default/jobs", job)
    assert code == 201 and body["apiVersion"] == "extensions/v1beta1"
    assert body["spec"]["manualSelector"] is True                # converted as the loader converts
    code, body = call(server, "GET", "/apis/batch/v1/namespaces/default/jobs/package-check")
    assert code == 200 and body["apiVersion"] == "batch/v1"


def test_list_selectors_and_tables(server):
    call(server, "POST", "/api/v1/namespaces/default/pods", POD)
    other = {**POD, "metadata": {"name": "db", "labels": {"app": "db"}}}
    call(server, "POST", "/api/v1/namespaces/default/pods", other)
    code, body = call(server, "GET", "/api/v1/namespaces/default/pods?labelSelector=app%20in%20(nginx)")
    assert [p["metadata"]["name"] for p in body["items"]] == ["web"]
    code, body = call(server, "GET", "/api/v1/pods?fieldSelector=metadata.name!%3Dweb")
    assert [p["metadata"]["name"] for p in body["items"]] == ["db"]
    code, body = call(server, "GET", "/api/v1/pods?fieldSelector=spec.nosuch%3Dx")
    assert code == 400 and body["message"] == "field label not supported: spec.nosuch"
    code, table = call(server, "GET", "/api/v1/namespaces/default/pods", accept=TABLE)
    assert table["kind"] == "Table" and table["apiVersion"] == "meta.k8s.io/v1"
    cols = [(c["name"], c["priority"]) for c in table["columnDefinitions"]]
    assert cols[:5] == [("NAME", 0), ("READY", 0), ("STATUS", 0), ("RESTARTS", 0), ("AGE", 0)]
    assert ("NODE", 1) in cols                                  # an -o wide column
    assert [r["cells"][0] for r in table["rows"]] == ["db", "web"]
    assert table["rows"][0]["object"]["kind"] == "PartialObjectMetadata"
    assert table["metadata"]["resourceVersion"] == str(server.store.revision())


def test_label_patch_and_scale_subresource(server):
    code, node = call(server, "PATCH", "/api/v1/nodes/n1", {"metadata": {"labels": {"gpu": "yes"}}},
                      content_type="application/merge-patch+json")
    assert code == 200 and node["metadata"]["labels"] == {"disk": "ssd", "gpu": "yes"}
    code, body = call(server, "PATCH", "/api/v1/nodes/n1", {"metadata": {}},
                      content_type="application/apply-patch+yaml")          # server-side apply needs a manager
    assert code == 422 and "fieldManager: Required value" in body["message"]
    code, node = call(server, "PATCH", "/api/v1/nodes/n1", [{"op": "remove", "path": "/metadata/labels/gpu"}],
                      content_type="application/json-patch+json")
    assert code == 200 and node["metadata"]["labels"] == {"disk": "ssd"}
    code, body = call(server, "PATCH", "/api/v1/nodes/n1", [{"op": "remove", "path": "/metadata/labels/none"}],
                      content_type="application/json-patch+json")
    assert code == 422 and "missing path" in body["message"]
    rc = {"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": "rc"},
          "spec": {"replicas": 2, "selector": {"app": "nginx"},
                   "template": {"metadata": {"labels": {"app": "nginx"}},
                                "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}}
    call(server, "POST", "/api/v1/namespaces/default/replicationcontrollers", rc)
    code, scale = call(server, "PATCH", "/api/v1/namespaces/default/replicationcontrollers/rc/scale",
                       {"spec": {"replicas": 5}}, content_type="application/merge-patch+json")
    assert code == 200 and scale["kind"] == "Scale" and scale["apiVersion"] == "autoscaling/v1"
    assert scale["spec"]["replicas"] == 5 and scale["status"]["selector"] == "app=nginx"
    code, body = call(server, "GET", "/api/v1/namespaces/default/replicationcontrollers/rc")
    assert body["spec"]["replicas"] == 5 and body["metadata"]["generation"] == 2
    code, body = call(server, "PATCH", "/api/v1/namespaces/default/replicationcontrollers/rc/scale",
                      {"spec": {"replicas": -1}}, content_type="application/merge-patch+json")
    assert code == 422


def test_put_with_a_stale_resource_version_is_a_conflict(server):
    code, pod = call(server, "POST", "/api/v1/namespaces/default/pods", POD)
    stale = json.loads(json.dumps(pod))
    pod["metadata"]["labels"] = {"app": "nginx", "v": "2"}
    assert call(server, "PUT", "/api/v1/namespaces/default/pods/web", pod)[0] == 200
    stale["metadata"]["labels"] = {"app": "other"}
    code, body = call(server, "PUT", "/api/v1/namespaces/default/pods/web", stale)
    assert code == 409 and body["reason"] == "Conflict"
    assert "the object has been modified" in body["message"]


def test_delete_returns_status_and_is_404_after(server):
    node = {"kind": "Node", "apiVersion": "v1", "metadata": {"name": "n2"}}
    call(server, "POST", "/api/v1/nodes", node)
    code, body = call(server, "DELETE", "/api/v1/nodes/n2", {"propagationPolicy": "Background"})
    assert code == 200 and body["status"] == "Success" and body["details"]["name"] == "n2"
    # A pod's (and a Service's) DELETE answers with the object, as their registries do.
    call(server, "POST", "/api/v1/namespaces/default/pods", POD)
    code, body = call(server, "DELETE", "/api/v1/namespaces/default/pods/web", {"propagationPolicy": "Background"})
    assert code == 200 and body["kind"] == "Pod" and body["metadata"]["name"] == "web"
    assert call(server, "GET", "/api/v1/namespaces/default/pods/web")[0] == 404
    assert call(server, "DELETE", "/api/v1/namespaces/default/pods/web")[0] == 404


def test_watch_streams_added_modified_deleted_and_expired(server):
    code, _ = call(server, "POST", "/api/v1/namespaces/default/pods", POD)
    since = server.store.revision()

    async def main():
        req = http.Request("GET", "/api/v1/namespaces/default/pods",
                           {"watch": ["true"], "resourceVersion": [str(since)], "timeoutSeconds": ["5"]},
                           {"accept": "application/json"}, b"")
        resp = await server.handle(req)
        got = []

        async def writer():
            await trio.sleep(0.1)
            registry.create(server.store, {**POD, "metadata": {"name": "two"}})
            registry.mutate(server.store, "Pod", "default", "two",
                            lambda o: o["metadata"].setdefault("labels", {}).update(x="y"))
            registry.delete(server.store, "Pod", "default", "two")

        async def write(chunk: bytes) -> None:
            ev = json.loads(chunk)
            got.append((ev["type"], ev["object"]["metadata"]["name"]))
            if ev["type"] == "DELETED":
                n.cancel_scope.cancel()

        async with trio.open_nursery() as n:
            n.start_soon(writer)
            await resp.body(write)
        return got

    assert trio.run(main) == [("ADDED", "two"), ("MODIFIED", "two"), ("DELETED", "two")]


def test_label_selector_strings():
    exprs = selectors.parse_label_selector("app=nginx,tier in (web,api),!legacy,env!=prod")
    assert selectors.labels_match(exprs, {"app": "nginx", "tier": "web"})
    assert not selectors.labels_match(exprs, {"app": "nginx", "tier": "db"})
    assert not selectors.labels_match(exprs, {"app": "nginx", "tier": "web", "legacy": "1"})
    with pytest.raises(selectors.SelectorError):
        selectors.parse_label_selector("app=,=x")


def test_table_accept_header_and_merge_patch():
    assert tables.wants_table(TABLE) == "v1"
    assert tables.wants_table("application/json") is None
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": 3}}) == {"a": {"c": 2, "d": 3}}
    assert parse_path("/apis/extensions/v1beta1")[0] == "discovery"
    assert parse_path("/apis/apps/v1/namespaces/default/jobs") is None


def test_strategic_merge_patch_as_kubectl_apply_sends_it(server):
    deploy = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "web"},
              "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "web"}},
                       "template": {"metadata": {"labels": {"app": "web"}},
                                    "spec": {"containers": [
                                        {"name": "a", "image": "nginx", "ports": [{"containerPort": 80}],
                                         "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}]},
                                        {"name": "b", "image": "busybox"}]}}}}
    call(server, "POST", "/apis/apps/v1/namespaces/default/deployments", deploy)
    # kubectl's 3-way diff: change a's image, drop env Y, remove container b, keep the order.
    patch = {"spec": {"template": {"spec": {
        "$setElementOrder/containers": [{"name": "a"}],
        "containers": [{"name": "a", "image": "nginx:2",
                        "$setElementOrder/env": [{"name": "X"}],
                        "env": [{"name": "Y", "$patch": "delete"}]},
                       {"name": "b", "$patch": "delete"}]}}}}
    code, body = call(server, "PATCH", "/apis/apps/v1/namespaces/default/deployments/web", patch,
                      content_type="application/strategic-merge-patch+json")
    assert code == 200, body
    [c] = body["spec"]["template"]["spec"]["containers"]
    assert (c["name"], c["image"], c["ports"], c["env"]) == ("a", "nginx:2", [{"containerPort": 80, "protocol": "TCP"}],
                                                          [{"name": "X", "value": "1"}])
    assert body["metadata"]["generation"] == 2


def test_field_validation_strict_warn_ignore(server):
    typo = {**POD, "spec": {"containers": [{"name": "c", "image": "nginx", "imagee": "x"}]}}

    def post(query, body):
        req = http.Request("POST", "/api/v1/namespaces/default/pods",
                           {"fieldValidation": [query]} if query else {}, {}, json.dumps(body).encode())
        return trio.run(server.handle, req)

    resp = post("Strict", typo)
    body = json.loads(resp.body)
    assert resp.status == 400 and body["reason"] == "BadRequest"
    assert body["message"] == ('Pod in version "v1" cannot be handled as a Pod: strict decoding error: '
                               'unknown field "spec.containers[0].imagee"')
    assert call(server, "GET", "/api/v1/namespaces/default/pods/web")[0] == 404   # nothing stored
    resp = post("", typo)                                  # Warn, the default
    assert resp.status == 201
    assert resp.headers == [("Warning", '299 - "unknown field \\"spec.containers[0].imagee\\""')]
    assert post("Bogus", {**POD, "metadata": {"name": "other"}}).status == 400


def test_api_server_node_from_the_topology(tmp_path):
    from netemu.apiserver.__main__ import master_node
    from netemu.topology import loader
    from netemu.topology.model import TopologyError

    def load(text):
        path = tmp_path / "t.yaml"
        path.write_text(text)
        return loader.load_topology(path, host_networks=[])

    assert master_node(load("name: x\nnodes: [{name: a}, {name: b}]\n")) == "a"
    assert master_node(load("name: x\nnodes: [{name: a}, {name: m, unschedulable: true}]\n")) == "m"
    assert master_node(load("name: x\ncluster: {apiServerNode: b}\n"
                            "nodes: [{name: a, unschedulable: true}, {name: b}]\n")) == "b"
    with pytest.raises(TopologyError, match=r"cluster\.apiServerNode: .*is not one of the nodes \(a, b\)"):
        load("name: x\ncluster: {apiServerNode: c}\nnodes: [{name: a}, {name: b}]\n")


def test_kubeconfig_add_keeps_others_and_remove_takes_only_ours(tmp_path):
    import yaml

    from netemu.apiserver import kubeconfig

    path = str(tmp_path / "config")
    kubeconfig.add(path, "one", "http://127.0.0.1:1111")          # no file yet: ours becomes current
    data = yaml.safe_load(open(path))
    assert data["current-context"] == "netemu-one"
    kubeconfig.add(path, "two", "http://127.0.0.1:2222")          # a current context exists: kept
    data = yaml.safe_load(open(path))
    assert data["current-context"] == "netemu-one"
    assert [c["name"] for c in data["contexts"]] == ["netemu-one", "netemu-two"]
    assert data["clusters"][1]["cluster"]["server"] == "http://127.0.0.1:2222"
    kubeconfig.remove(path, "one")
    data = yaml.safe_load(open(path))
    assert [c["name"] for c in data["contexts"]] == ["netemu-two"]
    assert [c["name"] for c in data["users"]] == ["netemu-two"]
    assert data["current-context"] == ""                          # it was ours: unset, as kind does
    assert oct(os.stat(path).st_mode & 0o777) == "0o600"
    assert not os.path.exists(path + ".lock")


def test_a_throw_away_cluster_leaves_the_kubeconfig_alone(tmp_path, monkeypatch):
    """`netemu bench`'s clusters (up(kubeconfig=False)) neither add a context nor
    write the file at down: a user without a kubeconfig still has none after."""
    from netemu import apiserver, names

    monkeypatch.setattr(names, "STATE_ROOT", str(tmp_path / "state"))
    path = tmp_path / "kube" / "config"
    monkeypatch.setenv("KUBECONFIG", str(path))
    os.makedirs(names.state_dir("bench1"))
    config = apiserver.prepare("bench1", add_context=False)
    assert config["kubeconfig"] is None and config["port"] > 0
    apiserver.forget("bench1")
    assert not path.exists() and not path.parent.exists()
    os.makedirs(names.state_dir("kept"))
    apiserver.prepare("kept")                                      # the usual up: added, then removed
    assert "netemu-kept" in path.read_text()
    apiserver.forget("kept")
    assert "netemu-kept" not in path.read_text()


def test_pod_logs_tail_limit_and_errors(server, tmp_path):
    server.pod_dir = lambda ns, pod: str(tmp_path / ns / pod)
    two = {**POD, "spec": {"containers": [{"name": "a", "image": "nginx"}, {"name": "b", "image": "nginx"}]}}
    call(server, "POST", "/api/v1/namespaces/default/pods", two)
    code, body = call(server, "GET", "/api/v1/namespaces/default/pods/web/log")
    assert code == 400 and body["message"] == ("a container name must be specified for pod web, "
                                               "choose one of: [a b]")
    code, body = call(server, "GET", "/api/v1/namespaces/default/pods/web/log?container=zz")
    assert code == 400 and body["message"] == "container zz is not valid for pod web"
    code, body = call(server, "GET", "/api/v1/namespaces/default/pods/web/log?container=a")
    assert code == 400 and body["message"] == 'container "a" in pod "web" is waiting to start: ContainerCreating'
    (tmp_path / "default" / "web").mkdir(parents=True)
    (tmp_path / "default" / "web" / "a.log").write_bytes(b"one\ntwo\nthree\n")
    assert call(server, "GET", "/api/v1/namespaces/default/pods/web/log?container=a")[1] == b"one\ntwo\nthree\n"
    assert call(server, "GET", "/api/v1/namespaces/default/pods/web/log?container=a&tailLines=2")[1] == b"two\nthree\n"
    assert call(server, "GET", "/api/v1/namespaces/default/pods/web/log?container=a&tailLines=0")[1] == b""
    assert call(server, "GET", "/api/v1/namespaces/default/pods/web/log?container=a&limitBytes=5")[1] == b"one\nt"
    code, body = call(server, "GET", "/api/v1/namespaces/default/pods/web/log?container=a&previous=true")
    assert (code, body["message"]) == (400, 'previous terminated container "a" in pod "web" not found')
    assert call(server, "GET", "/api/v1/namespaces/default/pods/web/log?container=a&tailLines=-1")[0] == 422


def test_pod_logs_previous_instance(server, tmp_path):
    # The kubelet keeps the log of the instance before the last restart beside
    # the current one (node/kubelet.py, names.container_log): previous=true reads
    # it, whole (follow has nothing to wait for), with tailLines and limitBytes.
    server.pod_dir = lambda ns, pod: str(tmp_path / ns / pod)
    call(server, "POST", "/api/v1/namespaces/default/pods", POD)
    folder = tmp_path / "default" / "web"
    folder.mkdir(parents=True)
    (folder / "c.log").write_bytes(b"second run\n")
    code, body = call(server, "GET", "/api/v1/namespaces/default/pods/web/log?previous=true")
    assert (code, body["reason"], body["message"]) == (
        400, "BadRequest", 'previous terminated container "c" in pod "web" not found')
    (folder / "c.previous.log").write_bytes(b"first run\ncrashed\n")
    assert call(server, "GET", "/api/v1/namespaces/default/pods/web/log")[1] == b"second run\n"
    for query, want in (("previous=true", b"first run\ncrashed\n"), ("previous=true&follow=true", b"first run\ncrashed\n"),
                        ("previous=true&tailLines=1", b"crashed\n"), ("previous=1&limitBytes=5", b"first")):
        code, body = call(server, "GET", f"/api/v1/namespaces/default/pods/web/log?{query}")
        assert (code, body) == (200, want), query


# -- the HTTP layer, over in-memory streams ----------------------------------------

def _serve_one(server, raw: bytes, read_until_close: bool = True) -> bytes:
    from trio.testing import memory_stream_pair

    from netemu.apiserver import status

    async def main():
        client, srv = memory_stream_pair()
        async with trio.open_nursery() as n:
            n.start_soon(http.serve_connection, srv, server.handle, status.too_large, status.bad_request)
            await client.send_all(raw)
            out = b""
            with trio.move_on_after(5):
                while True:
                    data = await client.receive_some(65536)
                    if not data:
                        break
                    out += data
                    if not read_until_close and b"\r\n\r\n" in out:
                        break
            await client.aclose()
        return out

    return trio.run(main)


def test_http_body_over_3_mib_is_413_and_the_server_goes_on(server):
    big = b"x" * (3 * 1024 * 1024 + 1)
    out = _serve_one(server, b"POST /api/v1/namespaces/default/pods HTTP/1.1\r\nHost: x\r\n"
                     b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(big) + big)
    assert out.startswith(b"HTTP/1.1 413 ")
    assert b'"reason":"RequestEntityTooLarge"' in out
    assert call(server, "GET", "/api/v1/nodes/n1")[0] == 200


def test_http_malformed_request_is_400(server):
    out = _serve_one(server, b"GARBAGE\r\n\r\n")
    assert out.startswith(b"HTTP/1.1 400 ")
    assert b'"reason":"BadRequest"' in out


def test_http_keep_alive_serves_requests_in_turn(server):
    req = b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n"
    out = _serve_one(server, req + req + b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert out.count(b"HTTP/1.1 200 ") == 3 and out.endswith(b"ok")


def test_http_client_hanging_up_mid_watch_ends_the_stream(server):
    from trio.testing import memory_stream_pair

    from netemu.apiserver import status

    async def main():
        client, srv = memory_stream_pair()
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(http.serve_connection, srv, server.handle, status.too_large, status.bad_request)
                await client.send_all(b"GET /api/v1/nodes?watch=true HTTP/1.1\r\nHost: x\r\n\r\n")
                got = b""
                while b"ADDED" not in got:
                    got += await client.receive_some(65536)
                await client.aclose()          # the server's watch must end now, not at the next event
        return got

    assert b"Transfer-Encoding: chunked" in trio.run(main)


def test_endpoint_slices_follow_the_services_pods(server):
    from netemu.controllers import endpointslice

    store = server.store
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"selector": {"app": "nginx"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    call(server, "POST", "/api/v1/namespaces/default/services", svc)
    for name, ip, ready in (("p1", "10.244.1.2", "True"), ("p2", "10.244.2.2", "False")):
        pod = registry.create(store, {**POD, "metadata": {"name": name, "labels": {"app": "nginx"}}})
        registry.mutate(store, "Pod", "default", name, lambda o, ip=ip, ready=ready: o.update(
            spec={**o["spec"], "nodeName": "n1"},
            status={"phase": "Running", "podIP": ip, "conditions": [{"type": "Ready", "status": ready}]}))
    endpointslice.sync_once(store)
    code, body = call(server, "GET", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices"
                                     "?labelSelector=kubernetes.io/service-name%3Dweb")
    [es] = body["items"]
    assert es["metadata"]["name"].startswith("web-") and es["addressType"] == "IPv4"
    assert es["ports"] == [{"name": "", "port": 8080, "protocol": "TCP"}]
    assert [(e["addresses"], e["conditions"]["ready"]) for e in es["endpoints"]] == \
        [(["10.244.1.2"], True), (["10.244.2.2"], False)]
    rev = store.revision()
    endpointslice.sync_once(store)                  # nothing changed: nothing written
    assert store.revision() == rev
    code, table = call(server, "GET", "/apis/discovery.k8s.io/v1/namespaces/default/endpointslices", accept=TABLE)
    assert table["rows"][0]["cells"][1:4] == ["IPv4", "8080", "10.244.1.2,10.244.2.2"]
    call(server, "DELETE", "/api/v1/namespaces/default/services/web")
    endpointslice.sync_once(store)
    assert call(server, "GET", "/apis/discovery.k8s.io/v1/endpointslices")[1]["items"] == []


def test_namespaces_labelled_guarded_and_deleted_with_their_content(server):
    from netemu.controllers import namespace

    code, body = call(server, "GET", "/api/v1/namespaces/default")
    assert body["metadata"]["labels"] == {"kubernetes.io/metadata.name": "default"}
    assert body["status"]["phase"] == "Active"
    code, body = call(server, "POST", "/api/v1/namespaces/nosuch/pods", POD)
    assert (code, body["message"]) == (404, 'namespaces "nosuch" not found')
    code, ns = call(server, "POST", "/api/v1/namespaces", {"apiVersion": "v1", "kind": "Namespace",
                                                           "metadata": {"name": "new-namespace"}})
    assert code == 201 and ns["metadata"]["labels"]["kubernetes.io/metadata.name"] == "new-namespace"
    assert call(server, "POST", "/api/v1/namespaces/new-namespace/pods", POD)[0] == 201
    code, table = call(server, "GET", "/api/v1/namespaces", accept=TABLE)
    assert [r["cells"][:2] for r in table["rows"]] == [
        ["default", "Active"], ["kube-node-lease", "Active"], ["kube-public", "Active"],
        ["kube-system", "Active"], ["new-namespace", "Active"]]
    code, body = call(server, "DELETE", "/api/v1/namespaces/default")
    assert (code, body["reason"]) == (403, "Forbidden")
    code, body = call(server, "DELETE", "/api/v1/namespaces/new-namespace")
    assert code == 200 and body["status"]["phase"] == "Terminating"
    code, body = call(server, "POST", "/api/v1/namespaces/new-namespace/services",
                      {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "s"},
                       "spec": {"ports": [{"port": 80}]}})
    assert code == 403 and "because it is being terminated" in body["message"]
    namespace.sync_once(server.store)
    assert call(server, "GET", "/api/v1/namespaces/new-namespace/pods/web")[0] == 404   # unbound: gone at once
    namespace.sync_once(server.store)
    assert call(server, "GET", "/api/v1/namespaces/new-namespace")[0] == 404


def test_watch_from_a_compacted_revision_is_an_expired_error_event(server):
    # What the store's compaction leaves: history before revision 5 is gone.
    server.store._db.execute("UPDATE meta SET compacted = 5 WHERE id = 0")

    async def main():
        req = http.Request("GET", "/api/v1/namespaces/default/pods",
                           {"watch": ["true"], "resourceVersion": ["2"]}, {}, b"")
        resp = await server.handle(req)
        got = []

        async def write(chunk: bytes) -> None:
            got.append(json.loads(chunk))

        await resp.body(write)
        return got

    [event] = trio.run(main)
    assert event["type"] == "ERROR"
    assert (event["object"]["code"], event["object"]["reason"]) == (410, "Expired")
    assert event["object"]["message"].startswith("too old resource version: 2 (")


def test_exec_session_channels_stdin_close_and_exit_status():
    """podexec.Session over an in-memory stream, with wsproto as the client and
    a plain local process (the namespaces are the integration test's part)."""
    from trio.testing import memory_stream_pair
    from wsproto.connection import Connection, ConnectionType
    from wsproto.events import BytesMessage, CloseConnection

    from netemu.apiserver import podexec

    assert podexec.accept_token("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="   # RFC 6455's example
    assert podexec.choose_protocol("v4.channel.k8s.io, v5.channel.k8s.io") == "v4.channel.k8s.io"
    assert podexec.choose_protocol("channel.k8s.io") is None
    session = podexec.Session(["sh", "-c", "tr a-z A-Z; echo oops >&2; exit 2"], {"PATH": "/usr/bin:/bin"},
                              ["sh", "-c", "..."], "v5.channel.k8s.io", stdin=True, stdout=True, stderr=True,
                              tty=False)

    async def main():
        client_stream, server_stream = memory_stream_pair()
        client = Connection(ConnectionType.CLIENT)
        got: dict[int, bytes] = {}
        async with trio.open_nursery() as n:
            n.start_soon(session.run, server_stream, b"")
            await client_stream.send_all(client.send(BytesMessage(data=b"\x00hello\n")) +
                                         client.send(BytesMessage(data=b"\xff\x00")))   # v5: close stdin
            with trio.fail_after(10):
                while True:
                    data = await client_stream.receive_some(65536)
                    if not data:
                        break
                    client.receive_data(data)
                    done = False
                    for ev in client.events():
                        if isinstance(ev, BytesMessage):
                            got[ev.data[0]] = got.get(ev.data[0], b"") + ev.data[1:]
                        elif isinstance(ev, CloseConnection):
                            await client_stream.send_all(client.send(ev.response()))
                            done = True
                    if done:
                        break
            await client_stream.aclose()
        return got

    got = trio.run(main)
    assert got[podexec.STDOUT] == b"HELLO\n" and got[podexec.STDERR] == b"oops\n"
    status = json.loads(got[podexec.ERROR])
    assert status["reason"] == "NonZeroExitCode"
    assert status["details"]["causes"] == [{"reason": "ExitCode", "message": "2"}]


def test_http_client_that_stops_reading_a_watch_is_dropped(server, monkeypatch):
    from trio.testing import lockstep_stream_pair

    from netemu.apiserver import status

    monkeypatch.setattr(http, "SLOW_CLIENT_TIMEOUT", 0.3)

    async def main():
        client, srv = lockstep_stream_pair()         # a send waits until the other side reads
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(http.serve_connection, srv, server.handle, status.too_large, status.bad_request)
                await client.send_all(b"GET /api/v1/nodes?watch=true HTTP/1.1\r\nHost: x\r\n\r\n")
                # ... and never reads: the server gives up on its own.
        return True

    assert trio.run(main)


def test_exec_client_vanishing_stops_the_command(tmp_path):
    from trio.testing import memory_stream_pair

    from netemu.apiserver import podexec

    marker = tmp_path / "still-running"
    session = podexec.Session(["sh", "-c", f"sleep 0.5; touch {marker}; sleep 30"], {"PATH": "/usr/bin:/bin"},
                              ["sh"], "v5.channel.k8s.io", stdin=True, stdout=True, stderr=True, tty=False)

    async def main():
        client_stream, server_stream = memory_stream_pair()
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(session.run, server_stream, b"")
                await trio.sleep(0.1)
                await client_stream.aclose()             # the client is gone
        await trio.sleep(1.0)

    trio.run(main)
    assert not marker.exists()                           # the whole process group was killed


def test_watch_bookmarks_when_asked(server, monkeypatch):
    from netemu.apiserver import server as server_module

    monkeypatch.setattr(server_module, "BOOKMARK_INTERVAL", 0.2)
    since = server.store.revision()

    async def main(query):
        req = http.Request("GET", "/api/v1/nodes", {"watch": ["true"], "resourceVersion": [str(since)],
                                                    "timeoutSeconds": ["1"], **query}, {}, b"")
        resp = await server.handle(req)
        got = []

        async def write(chunk: bytes) -> None:
            got.append(json.loads(chunk))

        async with trio.open_nursery() as n:
            async def change():
                await trio.sleep(0.3)
                registry.mutate(server.store, "Node", None, "n1", lambda o: o["metadata"].update(labels={"a": "b"}))
            n.start_soon(change)
            await resp.body(write)
        return got

    events = trio.run(main, {"allowWatchBookmarks": ["true"]})
    kinds = [e["type"] for e in events]
    assert "MODIFIED" in kinds and kinds.count("BOOKMARK") >= 3
    after = [e for e in events[kinds.index("MODIFIED") + 1:] if e["type"] == "BOOKMARK"]
    assert after and after[0]["object"]["metadata"]["resourceVersion"] == str(server.store.revision())
    assert after[0]["object"]["kind"] == "Node"
    assert {e["type"] for e in trio.run(main, {})} == {"MODIFIED"}          # not asked: no bookmarks


# What kubectl 1.32 sent for `kubectl create namespace new-namespace` (captured).
CREATE_NAMESPACE_PROTOBUF = (b'k8s\x00\n\x0f\n\x02v1\x12\tNamespace\x12%\n\x1d\n\rnew-namespace\x12\x00\x1a\x00"\x00'
                             b'*\x002\x008\x00B\x00\x12\x00\x1a\x02\n\x00\x1a\x00"\x00')


def test_protobuf_namespace_body_is_decoded_other_kinds_refused(server):
    from netemu.k8s import protobuf

    req = http.Request("POST", "/api/v1/namespaces", {},
                       {"content-type": "application/vnd.kubernetes.protobuf"}, CREATE_NAMESPACE_PROTOBUF)
    resp = trio.run(server.handle, req)
    body = json.loads(resp.body)
    assert resp.status == 201 and body["metadata"]["name"] == "new-namespace"
    assert body["metadata"]["labels"] == {"kubernetes.io/metadata.name": "new-namespace"}
    # a ReplicaSet (no kubectl command sends one) is not decoded: 415, nothing stored
    replicaset = b"k8s\x00\n\x15\n\x07apps/v1\x12\nReplicaSet\x12\x07\n\x05\n\x03web"
    req = http.Request("POST", "/apis/apps/v1/namespaces/default/replicasets", {},
                       {"content-type": "application/vnd.kubernetes.protobuf"}, replicaset)
    resp = trio.run(server.handle, req)
    assert resp.status == 415 and b"not decoded by netemu yet" in resp.body
    # an unknown field number is an error, not silently dropped
    with pytest.raises(protobuf.DecodeError, match="unknown field number 99"):
        protobuf.decode_message(b"\x9a\x06\x00", "ObjectMeta")
    for broken in (CREATE_NAMESPACE_PROTOBUF[:20], b"k8s\x00\xff", b"nope"):
        req = http.Request("POST", "/api/v1/namespaces", {},
                           {"content-type": "application/vnd.kubernetes.protobuf"}, broken)
        assert trio.run(server.handle, req).status == 400


def test_errors_stay_on_one_line_whatever_the_input(server):
    code, body = call(server, "POST", "/api/v1/namespaces/default/pods",
                      {**POD, "metadata": {"name": "bad\nname"}})
    assert code == 422 and "\n" not in body["message"] and 'bad\\nname' in body["message"]


def test_node_lease_renewed_and_collected_with_its_node(server):
    from netemu.controllers import garbagecollector
    from netemu.node import lease as node_lease

    store = server.store
    node_lease.renew(store, "n1", node_lease.LEASE_DURATION)
    lease = registry.get(store, "Lease", "kube-node-lease", "n1")
    first = lease["spec"]["renewTime"]
    assert lease["spec"]["holderIdentity"] == "n1" and lease["spec"]["leaseDurationSeconds"] == 40
    node_lease.renew(store, "n1", node_lease.LEASE_DURATION)
    assert registry.get(store, "Lease", "kube-node-lease", "n1")["spec"]["renewTime"] >= first
    code, body = call(server, "GET", "/apis/coordination.k8s.io/v1/namespaces/kube-node-lease/leases/n1")
    assert code == 200 and body["apiVersion"] == "coordination.k8s.io/v1"
    garbagecollector.sync_once(store)
    assert registry.get(store, "Lease", "kube-node-lease", "n1") is not None     # its node is there
    registry.delete(store, "Node", None, "n1")
    garbagecollector.sync_once(store)
    assert registry.get(store, "Lease", "kube-node-lease", "n1") is None
    node_lease.renew(store, "n1", node_lease.LEASE_DURATION)                      # a late renewal
    assert registry.get(store, "Lease", "kube-node-lease", "n1") is None
