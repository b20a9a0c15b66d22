"""Field ownership and server-side apply (netemu/k8s/managedfields.py), without
root: FieldsV1 encoding, the field sets of objects, who owns what after
updates, and apply's merge, removal and conflicts; then the API server's
PATCH with application/apply-patch+yaml."""

import json

import pytest
import trio

from netemu.apiserver import http
from netemu.apiserver.server import ApiServer, ensure_system_namespaces
from netemu.k8s import managedfields as mf
from netemu.store.sqlite import SqliteStore

NOW = "2026-12-02T19:00:00Z"

DEPLOY = {"apiVersion": "apps/v1", "kind": "Deployment",
          "metadata": {"name": "web", "namespace": "default", "labels": {"app": "web"}},
          "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "web"}},
                   "template": {"metadata": {"labels": {"app": "web"}},
                                "spec": {"containers": [{"name": "c", "image": "nginx:1",
                                                         "ports": [{"containerPort": 80}]}]}}}}
C = 'k:{"name":"c"}'


def test_field_set_has_leaves_elements_and_atomic_selectors_but_no_identity():
    fields = mf.field_set(DEPLOY, "Deployment")
    assert ("f:spec", "f:replicas") in fields
    assert ("f:spec", "f:selector") in fields                     # a label selector is atomic
    assert ("f:spec", "f:selector", "f:matchLabels") not in fields
    containers = ("f:spec", "f:template", "f:spec", "f:containers")
    assert containers + (C,) in fields and containers + (C, "f:image") in fields
    assert containers + (C, "f:ports", 'k:{"containerPort":80,"protocol":"TCP"}') in fields
    assert ("f:metadata", "f:labels", "f:app") in fields
    assert not any(p[:2] in {("f:metadata", "f:name"), ("f:metadata", "f:namespace")} for p in fields)
    assert not any(p[0] in ("f:apiVersion", "f:kind", "f:status") for p in fields)


def test_fields_v1_round_trips_and_marks_members_with_children():
    fields = mf.field_set(DEPLOY, "Deployment")
    doc = mf.to_fields_v1(fields)
    item = doc["f:spec"]["f:template"]["f:spec"]["f:containers"][C]
    assert item["."] == {} and item["f:image"] == {}
    assert "." not in doc["f:spec"]                               # a struct is not a member itself
    assert mf.from_fields_v1(json.loads(json.dumps(doc))) == fields


def test_path_strings_are_as_kubectl_prints_them():
    assert mf.path_string(("f:spec", "f:replicas")) == ".spec.replicas"
    assert (mf.path_string(("f:spec", "f:template", "f:spec", "f:containers", C, "f:image"))
            == '.spec.template.spec.containers[name="c"].image')
    assert mf.path_string(("f:metadata", "f:finalizers", 'v:"x"')) == '.metadata.finalizers[="x"]'


def test_an_update_owns_what_it_changed_and_takes_it_from_the_owner():
    entries = mf.record_update(None, DEPLOY, "Deployment", "kubectl-create", "apps/v1", NOW)
    assert [(e["manager"], e["operation"]) for e in entries] == [("kubectl-create", "Update")]
    scaled = json.loads(json.dumps(DEPLOY))
    scaled["metadata"]["managedFields"] = entries
    scaled["spec"]["replicas"] = 5
    entries = mf.record_update({**DEPLOY, "metadata": {**DEPLOY["metadata"], "managedFields": entries}},
                               scaled, "Deployment", "kubectl-scale", "apps/v1", NOW, "scale")
    owners = {e["manager"]: mf.from_fields_v1(e["fieldsV1"]) for e in entries}
    assert owners["kubectl-scale"] == {("f:spec", "f:replicas")}
    assert ("f:spec", "f:replicas") not in owners["kubectl-create"]
    assert next(e for e in entries if e["manager"] == "kubectl-scale")["subresource"] == "scale"


def _live(manager="kubectl", operation="Apply", obj=DEPLOY):
    merged, entries = mf.apply(None, obj, "Deployment", manager, "apps/v1", NOW)
    merged["metadata"]["managedFields"] = entries
    return merged


def test_apply_creates_then_merges_containers_by_name():
    live = _live()
    assert live["spec"]["replicas"] == 2
    other = json.loads(json.dumps(DEPLOY))
    other["spec"] = {"template": {"spec": {"containers": [{"name": "side", "image": "busybox"}]}}}
    merged, entries = mf.apply(live, other, "Deployment", "sidecar-injector", "apps/v1", NOW)
    assert [c["name"] for c in merged["spec"]["template"]["spec"]["containers"]] == ["c", "side"]
    assert {e["manager"] for e in entries} == {"kubectl", "sidecar-injector"}


def test_apply_removes_what_the_manager_no_longer_applies_unless_someone_else_owns_it():
    live = _live()
    less = json.loads(json.dumps(DEPLOY))
    del less["metadata"]["labels"]
    less["spec"]["template"]["spec"]["containers"][0].pop("ports")
    merged, _ = mf.apply(live, less, "Deployment", "kubectl", "apps/v1", NOW)
    assert "labels" not in merged["metadata"] or "app" not in merged["metadata"]["labels"]
    assert "ports" not in merged["spec"]["template"]["spec"]["containers"][0]
    # shared: another manager applied the same label value, so it stays
    shared, entries = mf.apply(live, {"apiVersion": "apps/v1", "kind": "Deployment",
                                      "metadata": {"name": "web", "labels": {"app": "web"}}},
                               "Deployment", "labeller", "apps/v1", NOW)
    shared["metadata"]["managedFields"] = entries
    merged, _ = mf.apply(shared, less, "Deployment", "kubectl", "apps/v1", NOW)
    assert merged["metadata"]["labels"] == {"app": "web"}


def test_apply_conflicts_with_another_managers_different_value_unless_forced():
    live = _live()
    change = json.loads(json.dumps(DEPLOY))
    change["spec"]["replicas"] = 7
    change["spec"]["template"]["spec"]["containers"][0]["image"] = "nginx:2"
    with pytest.raises(mf.ApplyConflict) as err:
        mf.apply(live, change, "Deployment", "ci-bot", "apps/v1", NOW)
    assert str(err.value) == ('Apply failed with 2 conflicts: conflicts with "kubectl":\n- .spec.replicas\n'
                              '- .spec.template.spec.containers[name="c"].image')
    causes = mf.conflict_causes(err.value.conflicts)
    assert causes[0] == {"reason": "FieldManagerConflict", "message": 'conflict with "kubectl"',
                         "field": ".spec.replicas"}
    # the same values: shared, no conflict
    mf.apply(live, DEPLOY, "Deployment", "ci-bot", "apps/v1", NOW)
    merged, entries = mf.apply(live, change, "Deployment", "ci-bot", "apps/v1", NOW, force=True)
    assert merged["spec"]["replicas"] == 7
    owners = {e["manager"]: mf.from_fields_v1(e["fieldsV1"]) for e in entries}
    assert ("f:spec", "f:replicas") in owners["ci-bot"] and ("f:spec", "f:replicas") not in owners["kubectl"]


def test_conflict_with_an_update_names_its_version_time_and_subresource():
    entry = {"manager": "kubectl-scale", "operation": "Update", "apiVersion": "apps/v1", "time": NOW,
             "subresource": "scale"}
    assert mf.conflict_message([(entry, ("f:spec", "f:replicas"))]) == (
        'Apply failed with 1 conflict: conflict with "kubectl-scale" with subresource "scale" using apps/v1 '
        f'at {NOW}: .spec.replicas')


# -- through the API server -------------------------------------------------------

@pytest.fixture
def server(tmp_path):
    store = SqliteStore(str(tmp_path / "state.db"), create=True)
    ensure_system_namespaces(store)
    yield ApiServer(store)
    store.close()


def call(server, method, path, body=b"", content_type="application/json", agent="kubectl/v1.33.0 (linux)"):
    path, _, qs = path.partition("?")
    import urllib.parse
    req = http.Request(method, path, urllib.parse.parse_qs(qs, keep_blank_values=True),
                       {"accept": "application/json", "content-type": content_type, "user-agent": agent},
                       body if isinstance(body, bytes) else json.dumps(body).encode())
    resp = trio.run(server.handle, req)
    return resp.status, json.loads(resp.body)


APPLY = "application/apply-patch+yaml"
URL = "/apis/apps/v1/namespaces/default/deployments/web"


def test_server_side_apply_creates_conflicts_and_forces(server):
    yaml_body = b"""apiVersion: apps/v1
kind: Deployment
metadata: {name: web, labels: {app: web}}
spec:
  replicas: 2
  selector: {matchLabels: {app: web}}
  template:
    metadata: {labels: {app: web}}
    spec: {containers: [{name: c, image: "nginx:1"}]}
"""
    code, obj = call(server, "PATCH", URL + "?fieldManager=kubectl", yaml_body, APPLY)
    assert code == 201, obj
    [entry] = obj["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"], entry["fieldsType"]) == ("kubectl", "Apply", "FieldsV1")
    # kubectl scale: an update through /scale by "kubectl" (its user agent)
    code, _ = call(server, "PATCH", URL + "/scale", {"spec": {"replicas": 4}},
                   "application/merge-patch+json", agent="kubectl-scale/v1.33.0")
    assert code == 200
    code, status = call(server, "PATCH", URL + "?fieldManager=kubectl", yaml_body, APPLY)
    assert code == 409 and status["reason"] == "Conflict", status
    assert status["message"].startswith('Apply failed with 1 conflict: conflict with "kubectl-scale" with '
                                        'subresource "scale" using apps/v1 at ')
    assert status["message"].endswith(": .spec.replicas")
    assert status["details"]["causes"][0]["field"] == ".spec.replicas"
    code, obj = call(server, "PATCH", URL + "?fieldManager=kubectl&force=true", yaml_body, APPLY)
    assert code == 200 and obj["spec"]["replicas"] == 2
    assert [e["manager"] for e in obj["metadata"]["managedFields"]] == ["kubectl"]
    # a merge patch may not say force; apply must name its manager
    assert call(server, "PATCH", URL + "?force=true", {}, "application/merge-patch+json")[0] == 422
    assert call(server, "PATCH", URL, yaml_body, APPLY)[0] == 422
    code, status = call(server, "PATCH", URL + "?fieldManager=x", b"a: [", APPLY)
    assert code == 400 and "YAML" in status["message"]


def test_kubectl_server_side_apply_takes_over_from_client_side_apply():
    """`kubectl apply --server-side` after `kubectl apply`: the fields the
    last-applied annotation still holds are taken over without a conflict
    (kube-apiserver's lastAppliedManager); the annotation follows the apply."""
    csa = json.loads(json.dumps(DEPLOY))
    csa["metadata"]["annotations"] = {mf.LAST_APPLIED: json.dumps(DEPLOY)}
    csa["metadata"]["managedFields"] = mf.record_update(None, csa, "Deployment", "kubectl-client-side-apply",
                                                        "apps/v1", NOW)
    change = json.loads(json.dumps(DEPLOY))
    change["spec"]["replicas"] = 1
    merged, entries = mf.apply(csa, change, "Deployment", "kubectl", "apps/v1", NOW)
    assert merged["spec"]["replicas"] == 1
    assert json.loads(merged["metadata"]["annotations"][mf.LAST_APPLIED])["spec"]["replicas"] == 1
    with pytest.raises(mf.ApplyConflict):
        mf.apply(csa, change, "Deployment", "other-tool", "apps/v1", NOW)
    # a field changed since by someone else is no longer the annotation's: a conflict
    csa["spec"]["replicas"] = 5
    with pytest.raises(mf.ApplyConflict):
        mf.apply(csa, change, "Deployment", "kubectl", "apps/v1", NOW)


def test_managed_fields_a_client_writes_are_checked(server):
    code, _ = call(server, "POST", "/api/v1/namespaces/default/configmaps",
                   {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "m"}, "data": {"a": "b"}})
    assert code == 201
    url = "/api/v1/namespaces/default/configmaps/m"
    for bad in ([1], [{"manager": "x", "operation": "Delete"}], [{"manager": "x", "operation": "Apply",
                                                                   "fieldsV1": {"f:data": 3}}], "all"):
        code, status = call(server, "PATCH", url, {"metadata": {"managedFields": bad}},
                            "application/merge-patch+json")
        assert code == 422 and "metadata.managedFields" in status["message"], (bad, status)
    good = [{"manager": "mine", "operation": "Apply", "apiVersion": "v1", "fieldsType": "FieldsV1",
             "fieldsV1": {"f:data": {"f:a": {}}}}]
    code, obj = call(server, "PATCH", url, {"metadata": {"managedFields": good}}, "application/merge-patch+json")
    assert code == 200 and [e["manager"] for e in obj["metadata"]["managedFields"]] == ["mine"]


def test_an_update_that_changes_nothing_leaves_the_record_as_it_was():
    first = mf.record_update(None, DEPLOY, "Deployment", "kubectl-create", "apps/v1", NOW)
    scaled = json.loads(json.dumps(DEPLOY))
    scaled["spec"]["replicas"] = 5
    old = {**DEPLOY, "metadata": {**DEPLOY["metadata"], "managedFields": first}}
    two = mf.record_update(old, scaled, "Deployment", "kubectl-scale", "apps/v1", NOW, "scale")
    again = {**scaled, "metadata": {**scaled["metadata"], "managedFields": two}}
    # kubectl-create, first of two, writes the same object again: same record, same order, same times
    assert mf.record_update(again, scaled, "Deployment", "kubectl-create", "apps/v1", "later") == two
