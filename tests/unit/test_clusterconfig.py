"""The cluster's settings as the ConfigMap kube-system/netemu-cluster
(netemu.clusterconfig): encoding, the loader's checks on decoding, and the
compare-and-swap of update. No root, no cluster: a store in a temp folder."""

from __future__ import annotations

import json
from ipaddress import IPv4Address
from pathlib import Path

import pytest

from netemu import clusterconfig, kubectl_verbs
from netemu.impairment import Impairment
from netemu.store import registry
from netemu.store.sqlite import SqliteStore
from netemu.topology.loader import load_topology, load_topology_dict

SHIPPED = Path(__file__).resolve().parents[2] / "topologies"

FULL = {
    "name": "hslab",
    "cluster": {"underlay": "172.31.0.0/24", "underlayMTU": 1400, "clusterNetwork": "10.50.0.0/16",
                "subnetLen": 25, "serviceRange": "10.60.0.0/16", "nodePortRange": "31000-31999",
                "backend": {"type": "vxlan", "vni": 7, "port": 4789}, "proxyMode": "iptables",
                "loadBalancerPool": ["172.31.0.100-172.31.0.103", "172.31.0.120"],
                "clientAddress": "172.31.0.10", "timeScale": 0.5, "apiServerNode": "b",
                "link": {"rate": "100mbit", "loss": "1%"}},
    "nodes": [{"name": "a", "labels": {"role": "x"}, "unschedulable": True},
              {"name": "b", "address": "172.31.0.50", "podCIDR": "10.50.3.0/25", "link": {"delay": "5ms"}},
              {"name": "c"}],
}


def same(a, b) -> None:
    assert (a.name, a.settings, a.nodes) == (b.name, b.settings, b.nodes)


@pytest.mark.parametrize("path", sorted(SHIPPED.glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_topologies_round_trip(path):
    topo = load_topology(path, host_networks=[])
    back = clusterconfig.decode(clusterconfig.encode(topo))
    same(back, topo)
    assert (back.source, back.objects) == (None, [])


def test_every_setting_round_trips_and_reads_as_a_topology_file():
    topo = load_topology_dict(FULL, host_networks=[])
    obj = clusterconfig.encode(topo)
    assert obj["apiVersion"] == "v1" and obj["kind"] == "ConfigMap"
    assert (obj["metadata"]["namespace"], obj["metadata"]["name"]) == ("kube-system", "netemu-cluster")
    assert list(obj["data"]) == ["topology.json"]
    text = json.loads(obj["data"]["topology.json"])
    # The topology file's own keys, defaults written out.
    assert text["cluster"]["backend"] == {"type": "vxlan", "port": 4789, "vni": 7}
    assert text["cluster"]["loadBalancerPool"] == ["172.31.0.100-172.31.0.103", "172.31.0.120"]
    assert text["nodes"][1]["link"] == {"rate": "100mbit", "loss": "1%", "delay": "5ms"}
    assert "workloads" not in text
    same(clusterconfig.decode(obj), topo)


def test_defaults_are_written_out():
    topo = load_topology_dict({"name": "hsd", "nodes": [{"name": "a"}]}, host_networks=[])
    text = json.loads(clusterconfig.encode(topo)["data"]["topology.json"])
    assert text["cluster"]["clientAddress"] == "172.30.0.254"
    assert text["cluster"]["loadBalancerPool"] == ["172.30.0.239-172.30.0.253"]    # 16 minus the client
    assert text["cluster"]["backend"] == {"type": "udp"}
    same(clusterconfig.decode(clusterconfig.encode(topo)), topo)


def test_a_cleared_node_link_stays_cleared_under_a_cluster_link():
    """A node's stored link is its whole link: `link set NODE --clear` under a
    cluster-wide link is no link, not the cluster's again."""
    topo = load_topology_dict(FULL, host_networks=[])
    topo.nodes[0].link = Impairment()
    back = clusterconfig.decode(clusterconfig.encode(topo))
    assert back.nodes[0].link == Impairment()
    assert not back.nodes[0].uplink(back.settings)
    assert back.nodes[2].link is None and back.nodes[2].uplink(back.settings).rate == 100_000_000


def test_the_api_server_node_is_left_out_once_removed():
    topo = load_topology_dict(FULL, host_networks=[])
    topo.nodes = [n for n in topo.nodes if n.name != "b"]
    back = clusterconfig.decode(clusterconfig.encode(topo))
    assert back.settings.api_server_node is None and [n.name for n in back.nodes] == ["a", "c"]


def damaged(text: str) -> dict:
    obj = clusterconfig.encode(load_topology_dict(FULL, host_networks=[]))
    obj["data"]["topology.json"] = text
    return obj


def good_text() -> dict:
    return json.loads(clusterconfig.encode(load_topology_dict(FULL, host_networks=[]))["data"]["topology.json"])


def error_of(obj) -> str:
    with pytest.raises(clusterconfig.ClusterConfigError) as e:
        clusterconfig.decode(obj)
    message = str(e.value)
    assert "\n" not in message
    return message


WHERE = "configmap kube-system/netemu-cluster: data.topology.json"


def test_damaged_objects_are_refused_naming_the_field():
    assert error_of({"kind": "Secret"}) == "configmap kube-system/netemu-cluster: kind: must be a ConfigMap"
    no_data = clusterconfig.encode(load_topology_dict(FULL, host_networks=[]))
    no_data["data"] = {}
    assert error_of(no_data) == ("configmap kube-system/netemu-cluster: data.topology.json: "
                                 "required: the cluster's topology as JSON text")
    assert error_of(damaged('{"name": [')).startswith(f"{WHERE}: invalid JSON: Expecting value: line 1")
    assert error_of(damaged("[]")) == f"{WHERE}: must be a mapping, got a list"
    bad = good_text()
    bad["cluster"]["underlay"] = "10.0.0.0/33"
    assert error_of(damaged(json.dumps(bad))).startswith(f"{WHERE}: cluster.underlay: invalid CIDR")
    bad = good_text()
    bad["nodes"][1]["address"] = "172.31.0.10"
    assert error_of(damaged(json.dumps(bad))) == (
        f"{WHERE}: nodes[1].address: 172.31.0.10 is the client's address (cluster.clientAddress)")
    bad = good_text()
    bad["workloads"] = []
    assert error_of(damaged(json.dumps(bad))) == f"{WHERE}: workloads: not part of a cluster's stored settings"
    bad = good_text()
    del bad["name"]
    assert error_of(damaged(json.dumps(bad))) == f"{WHERE}: name: required: the cluster's name"
    bad = good_text()
    bad["cluster"]["bogus"] = 1
    assert error_of(damaged(json.dumps(bad))).startswith(f"{WHERE}: cluster.bogus: unknown key")


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """A store where the cluster "hsunit" keeps it (names.store_path)."""
    from netemu import names

    monkeypatch.setattr(names, "STATE_ROOT", str(tmp_path))
    (tmp_path / "hsunit").mkdir()
    store = SqliteStore(names.store_path("hsunit"), create=True)
    yield "hsunit", store
    store.close()


def test_read_what_create_wrote(cluster):
    name, store = cluster
    topo = load_topology_dict(dict(FULL, name=name), host_networks=[])
    clusterconfig.create(store, topo)
    same(clusterconfig.read(name), topo)            # its own store
    same(clusterconfig.read(name, store), topo)     # the caller's
    obj = registry.get(store, "ConfigMap", "kube-system", "netemu-cluster")
    assert obj["metadata"]["resourceVersion"] and obj["metadata"]["uid"]


def test_read_without_the_object_or_the_store(cluster, tmp_path):
    name, store = cluster
    with pytest.raises(clusterconfig.ClusterConfigError, match='not found in cluster "hsunit"'):
        clusterconfig.read(name)
    with pytest.raises(clusterconfig.ClusterConfigError, match='cluster "hsnone" is not up'):
        clusterconfig.read("hsnone")


def test_update_is_compare_and_swap(cluster):
    """`link set` and `node add` at the same time: the one that wrote second is
    not allowed to overwrite the first's change (issue 16's missing lock);
    it reads again and changes what is there now."""
    from netemu.topology.model import NodeSpec

    name, store = cluster
    clusterconfig.create(store, load_topology_dict(dict(FULL, name=name), host_networks=[]))
    calls = []

    def set_link(t):
        calls.append(len(t.nodes))
        if len(calls) == 1:      # meanwhile, a node add lands
            clusterconfig.update(name, lambda t2: t2.nodes.append(
                NodeSpec("d", {}, IPv4Address("172.31.0.60"), None)))
        t.nodes[0].link = Impairment(delay=1000)

    clusterconfig.update(name, set_link)
    assert calls == [3, 4]
    back = clusterconfig.read(name)
    assert [n.name for n in back.nodes] == ["a", "b", "c", "d"]
    assert back.nodes[0].link == Impairment(delay=1000)


def test_a_refused_change_writes_nothing(cluster):
    name, store = cluster
    clusterconfig.create(store, load_topology_dict(dict(FULL, name=name), host_networks=[]))
    before = registry.get(store, "ConfigMap", "kube-system", "netemu-cluster")["metadata"]["resourceVersion"]

    def refuse(t):
        t.nodes.clear()
        raise ValueError("no")

    with pytest.raises(ValueError):
        clusterconfig.update(name, refuse)
    assert registry.get(store, "ConfigMap", "kube-system", "netemu-cluster")["metadata"]["resourceVersion"] == before


# -- served read-only by the API server ----------------------------------------------------

def test_the_api_serves_the_settings_read_only(tmp_path):
    """kubectl get cm -n kube-system netemu-cluster works; changing it does not
    (netemu writes it: 403, and netemu's own delete and label refuse too);
    other ConfigMaps are ordinary objects."""
    import urllib.parse

    import trio

    from netemu import api
    from netemu.apiserver import discovery, http
    from netemu.apiserver.server import ApiServer, ensure_system_namespaces

    store = SqliteStore(str(tmp_path / "state.db"), create=True)
    ensure_system_namespaces(store)
    topo = load_topology_dict(dict(FULL, name="hsapi"), host_networks=[])
    clusterconfig.create(store, topo)
    server = ApiServer(store)

    def call(method, path, body=None, accept="application/json"):
        path, _, qs = path.partition("?")
        media = "application/merge-patch+json" if method == "PATCH" else "application/json"
        req = http.Request(method, path, urllib.parse.parse_qs(qs), {"accept": accept, "content-type": media},
                           json.dumps(body).encode() if body is not None else b"")
        resp = trio.run(server.handle, req)
        return resp.status, json.loads(resp.body)

    cms = next(r for r in discovery.resource_list("v1")["resources"] if r["name"] == "configmaps")
    assert (cms["kind"], cms["shortNames"]) == ("ConfigMap", ["cm"]) and "create" in cms["verbs"]
    path = "/api/v1/namespaces/kube-system/configmaps/netemu-cluster"
    code, obj = call("GET", path)
    assert code == 200
    same(clusterconfig.decode(obj), topo)
    code, table = call("GET", path, accept="application/json;as=Table;v=v1;g=meta.k8s.io")
    assert [c["name"] for c in table["columnDefinitions"]] == ["NAME", "DATA", "AGE"]
    assert table["rows"][0]["cells"][:2] == ["netemu-cluster", "1"]
    assert call("GET", "/api/v1/configmaps")[1]["items"][0]["metadata"]["name"] == "netemu-cluster"
    for method, p, body in (("DELETE", path, None), ("PATCH", path, {"data": {"x": "y"}}),
                            ("PUT", path, obj), ("POST", "/api/v1/namespaces/kube-system/configmaps", obj)):
        code, status = call(method, p, body)
        assert (code, status["reason"]) == (403, "Forbidden"), (method, status)
        assert status["message"].startswith('configmaps "netemu-cluster" is forbidden: ')
    for change in (lambda: api.delete(store, "cm", "kube-system", "netemu-cluster"),
                   lambda: kubectl_verbs.label(store, "cm", "netemu-cluster", ["a=b"], namespace="kube-system")):
        with pytest.raises(api.ApiError) as e:
            change()
        assert e.value.reason == "Forbidden"
    same(clusterconfig.read("hsapi", store), topo)
    store.close()
