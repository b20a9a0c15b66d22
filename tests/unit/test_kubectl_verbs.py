"""kubectl's client-side verbs (netemu/kubectl_verbs.py): expose, scale and label
worked out on the client side and written through admission, without root."""

from __future__ import annotations

import pytest

from netemu import api, kubectl_verbs
from netemu.store import registry

from tests.unit.test_controllers_support import open_store, pod, settings, workload

pytestmark = pytest.mark.timeout(20)


def test_expose_rc_like_the_tutorial(tmp_path):
    store = open_store(tmp_path)
    registry.create(store, workload("ReplicationController", "podtoservcie", replicas=2, labels={"app": "nginx"}))
    svc = kubectl_verbs.expose(store, "rc", "podtoservcie", port=80)
    assert svc["metadata"]["name"] == "podtoservcie"
    assert svc["metadata"]["labels"] == {"app": "nginx"}
    assert svc["spec"]["selector"] == {"app": "nginx"}
    assert svc["spec"]["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": 80}]
    lb = kubectl_verbs.expose(store, "rc", "podtoservcie", port=80, type_="LoadBalancer", name_override="my-second-service")
    assert lb["spec"]["type"] == "LoadBalancer" and 30000 <= lb["spec"]["ports"][0]["nodePort"] <= 32767
    with pytest.raises(api.ApiError, match="already exists"):
        kubectl_verbs.expose(store, "rc", "podtoservcie", port=80)


def test_expose_refuses_without_selector(tmp_path):
    store = open_store(tmp_path)
    registry.create(store, pod("bare"))
    with pytest.raises(api.ApiError, match="selector"):
        kubectl_verbs.expose(store, "pod", "bare", port=80)
    rs = workload("ReplicaSet", "exprs", replicas=1,
                  selector={"matchExpressions": [{"key": "app", "operator": "In", "values": ["exprs"]}]})
    registry.create(store, rs)
    with pytest.raises(api.ApiError, match="expressions"):
        kubectl_verbs.expose(store, "rs", "exprs", port=80)


def test_expose_deployment_introspects_ports(tmp_path):
    store = open_store(tmp_path)
    registry.create(store, workload("Deployment", "web", replicas=1))
    svc = kubectl_verbs.expose(store, "deployment", "web", target_port="http")
    assert svc["spec"]["selector"] == {"app": "web"}
    assert svc["spec"]["ports"] == [{"port": 80, "protocol": "TCP", "targetPort": "http"}]


def test_scale_and_label(tmp_path):
    store = open_store(tmp_path)
    registry.create(store, workload("ReplicationController", "web", replicas=2))
    scaled = kubectl_verbs.scale(store, "rc", "web", 5)
    assert scaled["spec"]["replicas"] == 5
    with pytest.raises(api.ApiError):
        kubectl_verbs.scale(store, "rc", "web", -1)
    with pytest.raises(api.ApiError, match="not found"):
        kubectl_verbs.scale(store, "rc", "nope", 1)

    registry.create(store, {"kind": "Node", "metadata": {"name": "node1", "labels": {"gpu": "yes"}}})
    obj, changed = kubectl_verbs.label(store, "node", "node1", ["disk=ssd", "gpu-"])
    assert changed and obj["metadata"]["labels"] == {"disk": "ssd"}
    before = registry.get(store, "Node", None, "node1")["metadata"]["resourceVersion"]
    obj, changed = kubectl_verbs.label(store, "nodes", "node1", ["disk=ssd"])
    assert not changed
    assert registry.get(store, "Node", None, "node1")["metadata"]["resourceVersion"] == before
    with pytest.raises(api.ApiError, match="--overwrite is false"):
        kubectl_verbs.label(store, "no", "node1", ["disk=hdd"])
    obj, changed = kubectl_verbs.label(store, "no", "node1", ["disk=hdd"], overwrite=True)
    assert changed and obj["metadata"]["labels"] == {"disk": "hdd"}
    with pytest.raises(api.ApiError, match="invalid label spec"):
        kubectl_verbs.label(store, "no", "node1", ["bad key=1"])


def test_verbs_write_through_admission_and_retry_on_conflict(tmp_path, monkeypatch):
    """label and scale are an update on the resourceVersion read (so admission
    sees them and the generation moves), read again when another writer came
    in between; a Service keeps its cluster IP from the cluster's range."""
    store = open_store(tmp_path)
    cfg = settings(service_range="10.254.0.0/16")
    registry.create(store, workload("ReplicationController", "web", replicas=2, labels={"app": "web"}))
    svc = kubectl_verbs.expose(store, "rc", "web", port=80, settings=cfg)
    assert svc["spec"]["clusterIP"].startswith("10.254.")
    obj, changed = kubectl_verbs.label(store, "svc", "web", ["tier=front"], settings=cfg)
    assert changed and obj["spec"]["clusterIP"] == svc["spec"]["clusterIP"]
    assert obj["metadata"]["labels"] == {"app": "web", "tier": "front"}
    real_update, calls = api.update, []

    def racing_update(store_, obj, settings_=None):
        calls.append(obj["metadata"]["resourceVersion"])
        if len(calls) == 1:          # someone else writes first: the verb reads again
            registry.mutate(store_, "ReplicationController", "default", "web",
                            lambda o: o["metadata"].setdefault("annotations", {}).update(x="y"))
        return real_update(store_, obj, settings_)

    monkeypatch.setattr(api, "update", racing_update)
    before = registry.get(store, "ReplicationController", "default", "web")
    scaled = kubectl_verbs.scale(store, "rc", "web", 4, settings=cfg)
    assert len(calls) == 2 and calls[0] != calls[1]
    assert scaled["spec"]["replicas"] == 4 and scaled["metadata"]["annotations"] == {"x": "y"}
    assert scaled["metadata"]["generation"] == int(before["metadata"].get("generation") or 1) + 1


def test_service_for_is_kubectls_generator_without_a_store():
    rc = workload("ReplicationController", "podtoservcie", replicas=2, labels={"app": "nginx"})
    rc["metadata"]["namespace"] = "new-namespace"
    svc = kubectl_verbs.service_for(rc, 80, type_="LoadBalancer", name_override="my-second-service")
    assert svc == {"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "my-second-service", "namespace": "new-namespace",
                                "labels": {"app": "nginx"}},
                   "spec": {"ports": [{"port": 80, "protocol": "TCP", "targetPort": 80}],
                            "selector": {"app": "nginx"}, "type": "LoadBalancer"}}
