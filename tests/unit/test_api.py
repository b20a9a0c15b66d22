"""API admission: service allocation, cascading delete (kubectl's verbs: test_kubectl_verbs.py)."""

from __future__ import annotations

import ipaddress
import threading

import pytest

from netemu import api
from netemu.store import registry
from netemu.store.sqlite import SqliteStore

from tests.unit.test_controllers_support import open_store, pod, settings, workload

pytestmark = pytest.mark.timeout(20)


def service(name, *, type_="ClusterIP", ports=None, **spec):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name, "namespace": "default"},
            "spec": {"type": type_, "selector": {"app": name},
                     "ports": ports or [{"port": 80, "protocol": "TCP", "targetPort": 80}], **spec}}


def test_cluster_ip_comes_from_the_range_skipping_reserved(tmp_path):
    store = open_store(tmp_path)
    cfg = settings(service_range="10.96.0.0/29")       # hosts .1-.6; .1 is the kubernetes service's
    ips = set()
    for i in range(5):
        svc, verb = api.create_or_update(store, service(f"s{i}"), cfg)
        assert verb == "created"
        ips.add(svc["spec"]["clusterIP"])
    assert ips == {f"10.96.0.{i}" for i in range(2, 7)}
    with pytest.raises(api.ApiError, match="range is full"):
        api.create_or_update(store, service("s5"), cfg)


def test_requested_cluster_ip_is_honoured_or_refused(tmp_path):
    store = open_store(tmp_path)
    svc, _ = api.create_or_update(store, service("a", clusterIP="10.96.0.10"), settings())
    assert svc["spec"]["clusterIP"] == "10.96.0.10" and svc["spec"]["clusterIPs"] == ["10.96.0.10"]
    with pytest.raises(api.ApiError, match="provided IP is already allocated"):
        api.create_or_update(store, service("b", clusterIP="10.96.0.10"), settings())
    with pytest.raises(api.ApiError, match="not in the valid range"):
        api.create_or_update(store, service("c", clusterIP="10.97.0.10"), settings())
    with pytest.raises(api.ApiError, match="not in the valid range"):
        api.create_or_update(store, service("d", clusterIP="10.96.0.1"), settings())
    assert registry.get(store, "Service", "default", "b") is None


def test_node_ports_allocated_requested_and_refused(tmp_path):
    store = open_store(tmp_path)
    svc, _ = api.create_or_update(store, service("web", type_="NodePort"), settings())
    port = svc["spec"]["ports"][0]["nodePort"]
    assert 30000 <= port <= 32767
    fixed = service("fixed", type_="NodePort", ports=[{"port": 80, "protocol": "TCP", "nodePort": 30080}])
    assert api.create_or_update(store, fixed, settings())[0]["spec"]["ports"][0]["nodePort"] == 30080
    clash = service("clash", type_="NodePort", ports=[{"port": 80, "protocol": "TCP", "nodePort": 30080}])
    with pytest.raises(api.ApiError) as err:
        api.create_or_update(store, clash, settings())
    assert "spec.ports[0].nodePort: Invalid value: 30080: provided port is already allocated" in str(err.value)
    low = service("low", type_="NodePort", ports=[{"port": 80, "protocol": "TCP", "nodePort": 80}])
    with pytest.raises(api.ApiError, match="The range of valid ports is 30000-32767"):
        api.create_or_update(store, low, settings())
    # The refused services leaked nothing: their cluster IPs are free again.
    held = {kv.key for kv in store.list(api.SERVICE_IPS)}
    assert len(held) == 2


def test_failed_request_gives_back_what_it_claimed(tmp_path):
    store = open_store(tmp_path)
    api.create_or_update(store, service("a", type_="NodePort",
                                        ports=[{"port": 80, "protocol": "TCP", "nodePort": 30001}]), settings())
    two = service("b", type_="NodePort", ports=[{"name": "a", "port": 80, "protocol": "TCP", "nodePort": 30002},
                                                {"name": "b", "port": 81, "protocol": "TCP", "nodePort": 30001}])
    with pytest.raises(api.ApiError, match=r"spec.ports\[1\].nodePort"):
        api.create_or_update(store, two, settings())
    assert store.get(api.NODE_PORTS + "30002") is None


def test_update_keeps_allocations_and_delete_frees_them(tmp_path):
    store = open_store(tmp_path)
    first, verb = api.create_or_update(store, service("web", type_="NodePort"), settings())
    again, verb2 = api.create_or_update(store, service("web", type_="NodePort"), settings())
    assert (verb, verb2) == ("created", "unchanged")
    changed = service("web", type_="NodePort", ports=[{"port": 8080, "protocol": "TCP", "targetPort": 80}])
    updated, verb3 = api.create_or_update(store, changed, settings())
    assert verb3 == "configured"
    assert updated["spec"]["clusterIP"] == first["spec"]["clusterIP"]
    assert updated["metadata"]["generation"] == 2
    # The old port's nodePort was released, the new port got one.
    old_np, new_np = first["spec"]["ports"][0]["nodePort"], updated["spec"]["ports"][0]["nodePort"]
    if old_np != new_np:
        assert store.get(api.NODE_PORTS + str(old_np)) is None
    registry.create(store, {"kind": "Endpoints", "metadata": {"name": "web", "namespace": "default"}, "subsets": []})
    api.delete(store, "svc", "default", "web")
    assert store.list(api.SERVICE_IPS) == [] and store.list(api.NODE_PORTS) == []
    assert registry.get(store, "Endpoints", "default", "web") is None


def test_cluster_ip_may_not_change(tmp_path):
    store = open_store(tmp_path)
    api.create_or_update(store, service("web", clusterIP="10.96.0.20"), settings())
    with pytest.raises(api.ApiError, match="may not change"):
        api.create_or_update(store, service("web", clusterIP="10.96.0.21"), settings())


def test_load_balancer_gets_address_from_pool(tmp_path):
    store = open_store(tmp_path)
    cfg = settings(lb_pool="172.30.0.240/30")
    a, _ = api.create_or_update(store, service("a", type_="LoadBalancer"), cfg)
    b, _ = api.create_or_update(store, service("b", type_="LoadBalancer"), cfg)
    ips = {a["status"]["loadBalancer"]["ingress"][0]["ip"], b["status"]["loadBalancer"]["ingress"][0]["ip"]}
    assert ips == {"172.30.0.241", "172.30.0.242"}
    c, _ = api.create_or_update(store, service("c", type_="LoadBalancer"), cfg)
    assert c["status"]["loadBalancer"] == {}                     # <pending>, as without a cloud
    assert c["spec"]["ports"][0]["nodePort"]


def _allocate_many(path, prefix, count, results, errors):
    store = SqliteStore(path)
    try:
        for i in range(count):
            svc = service(f"{prefix}{i}", type_="NodePort")
            stored, _ = api.create_or_update(store, svc, settings(service_range="10.96.0.0/26",
                                                                  node_port_range=(30000, 30100)))
            results.append((stored["spec"]["clusterIP"], stored["spec"]["ports"][0]["nodePort"]))
    except Exception as err:   # collected and asserted on in the test
        errors.append(err)
    finally:
        store.close()


def test_concurrent_allocation_from_two_processes_never_duplicates(tmp_path):
    path = str(tmp_path / "state.db")
    SqliteStore(path, create=True).close()
    results, errors = [], []
    threads = [threading.Thread(target=_allocate_many, args=(path, p, 25, results, errors)) for p in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(results) == 50
    assert len({ip for ip, _ in results}) == 50
    assert len({port for _, port in results}) == 50
    assert all(ipaddress.ip_address(ip) in ipaddress.ip_network("10.96.0.0/26") for ip, _ in results)


def test_delete_pod_marks_bound_and_removes_unbound(tmp_path):
    store = open_store(tmp_path)
    registry.create(store, pod("bound", node_name="node1"))
    registry.create(store, pod("loose"))
    assert api.delete_pod(store, "default", "bound")
    assert registry.get(store, "Pod", "default", "bound")["metadata"]["deletionTimestamp"]
    assert api.delete_pod(store, "default", "loose")
    assert registry.get(store, "Pod", "default", "loose") is None
    assert not api.delete_pod(store, "default", "bound")      # already terminating


def test_delete_cascades_to_owned_pods_only(tmp_path):
    store = open_store(tmp_path)
    rc = registry.create(store, workload("ReplicationController", "web", replicas=2))
    registry.create(store, pod("web-a", {"app": "web"}, owner=rc))
    registry.create(store, pod("web-b", {"app": "web"}, owner=rc, node_name="node1"))
    registry.create(store, pod("other", {"app": "web"}))
    api.delete(store, "rc", "default", "web")
    assert registry.get(store, "ReplicationController", "default", "web") is None
    assert registry.get(store, "Pod", "default", "web-a") is None
    assert registry.get(store, "Pod", "default", "web-b")["metadata"]["deletionTimestamp"]
    assert registry.get(store, "Pod", "default", "other") is not None
    with pytest.raises(api.ApiError, match='replicationcontrollers "web" not found'):
        api.delete(store, "rc", "default", "web")


def test_delete_deployment_removes_its_replicasets_and_pods(tmp_path):
    store = open_store(tmp_path)
    deploy = registry.create(store, workload("Deployment", "web", replicas=1))
    rs = workload("ReplicaSet", "web-abc", replicas=1)
    rs["metadata"]["ownerReferences"] = [{"kind": "Deployment", "name": "web", "uid": deploy["metadata"]["uid"],
                                          "controller": True}]
    rs = registry.create(store, rs)
    registry.create(store, pod("web-abc-x", {"app": "web"}, owner=rs))
    api.delete(store, "deploy", "default", "web")
    assert registry.list_(store, "ReplicaSet") == [] and registry.list_(store, "Pod") == []


def test_pod_spec_is_immutable_but_labels_are_not(tmp_path):
    store = open_store(tmp_path)
    body = pod("p", {"app": "a"})
    api.create_or_update(store, body, settings())
    relabelled = pod("p", {"app": "b"})
    stored, verb = api.create_or_update(store, relabelled, settings())
    assert verb == "configured" and stored["metadata"]["labels"] == {"app": "b"}
    changed = pod("p", {"app": "b"}, ports=[{"containerPort": 81}])
    with pytest.raises(api.ApiError, match="Forbidden"):
        api.create_or_update(store, changed, settings())


def test_unknown_kind_is_refused(tmp_path):
    store = open_store(tmp_path)
    with pytest.raises(api.ApiError, match='no matches for kind "Widget"'):
        api.create_or_update(store, {"kind": "Widget", "metadata": {"name": "w"}}, settings())


def test_works_with_the_loaders_cluster_settings(tmp_path):
    model = pytest.importorskip("netemu.topology.model")
    cfg = model.ClusterSettings()
    cfg.lb_pool = [ipaddress.ip_address("172.30.0.250")]
    store = open_store(tmp_path)
    svc, _ = api.create_or_update(store, service("lb", type_="LoadBalancer"), cfg)
    assert ipaddress.ip_address(svc["spec"]["clusterIP"]) in cfg.service_range
    assert cfg.node_port_range[0] <= svc["spec"]["ports"][0]["nodePort"] <= cfg.node_port_range[1]
    assert svc["status"]["loadBalancer"]["ingress"] == [{"ip": "172.30.0.250"}]
