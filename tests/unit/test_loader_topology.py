"""Topology files: settings, nodes, workloads, and every class of bad input."""

from __future__ import annotations

import textwrap
from ipaddress import IPv4Address, IPv4Network
from pathlib import Path

import pytest

from netemu.topology import loader
from netemu.topology.loader import host_network_warnings, load_topology, read_host_networks
from netemu.topology.model import ClusterSettings, TopologyError

DATA = Path(__file__).parent / "data"
SHIPPED = Path(__file__).parents[2] / "topologies"

MINIMAL = """\
name: t
nodes:
  - name: a
  - name: b
"""


def write(tmp_path: Path, text: str, name: str = "topo.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def load(tmp_path: Path, text: str, **kw):
    kw.setdefault("host_networks", [])
    return load_topology(write(tmp_path, text), **kw)


def error(tmp_path: Path, text: str, **kw) -> str:
    with pytest.raises(TopologyError) as info:
        load(tmp_path, text, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


# --- the good path ------------------------------------------------------------

def test_tutorial_topology_loads_with_its_manifests_unchanged():
    topo = load_topology(DATA / "topologies" / "tutorial.yaml", host_networks=[])
    s = topo.settings
    assert topo.name == "tutorial"
    assert s.underlay == IPv4Network("10.1.96.0/24")
    assert s.cluster_network == IPv4Network("192.168.0.0/16")
    assert s.service_range == IPv4Network("10.254.0.0/16")
    assert (s.backend, s.proxy_mode, s.effective_backend_port()) == ("udp", "nftables", 8285)
    assert s.lb_pool[0] == IPv4Address("10.1.96.200") and s.lb_pool[-1] == IPv4Address("10.1.96.220")
    assert len(s.lb_pool) == 21
    assert [n.name for n in topo.nodes] == ["srv-k8s-master1", "srv-k8s-node1", "srv-k8s-node2"]
    master, _, node2 = topo.nodes
    assert master.unschedulable and master.labels["role"] == "master"
    assert master.labels["kubernetes.io/hostname"] == "srv-k8s-master1"
    assert node2.address == IPv4Address("10.1.96.233")
    assert node2.pod_cidr == IPv4Network("192.168.96.0/24")
    assert [(o["kind"], o["metadata"]["name"]) for o in topo.objects] == [
        ("Pod", "nginxpod"), ("ReplicationController", "podtoservcie"),
        ("Job", "package-check"), ("Service", "my-second-service")]
    assert topo.objects[2]["apiVersion"] == "batch/v1"
    # the converted Job is the only warning
    assert len(topo.warnings) == 1 and "converted to batch/v1" in topo.warnings[0]


def test_shipped_tutorial_topology_loads():
    topo = load_topology(SHIPPED / "tutorial.yaml", host_networks=[])
    assert topo.name == "tutorial" and topo.warnings == []
    assert [(n.name, str(n.address)) for n in topo.nodes] == [
        ("srv-k8s-master1", "10.1.96.231"), ("srv-k8s-node1", "10.1.96.232"), ("srv-k8s-node2", "10.1.96.233")]
    assert topo.nodes[0].unschedulable and topo.nodes[0].labels["node-role.kubernetes.io/master"] == ""
    assert [o["metadata"]["name"] for o in topo.objects] == ["nginxpod"]


def test_shipped_two_node_topology_loads():
    topo = load_topology(SHIPPED / "two-node.yaml", host_networks=[])
    assert topo.name == "twonode" and topo.warnings == []
    assert [n.name for n in topo.nodes] == ["node1", "node2"]
    assert [(o["metadata"]["name"], o["spec"]["nodeName"]) for o in topo.objects] == [
        ("web1", "node1"), ("web2", "node2")]


def test_docstring_example_loads(tmp_path):
    """The format's documentation (loader.py's docstring) stays a valid topology."""
    doc = loader.__doc__
    example = doc[doc.index("Example with every key:") + len("Example with every key:"):
                  doc.index("Workload objects get")]
    (tmp_path / "manifests").mkdir()
    (tmp_path / "manifests" / "nginxpod.yaml").write_text((DATA / "nginxpod.yaml").read_text())
    (tmp_path / "topo").mkdir()
    topo = load(tmp_path / "topo", example.strip("\n"))
    s = topo.settings
    assert topo.name == "tutorial"
    assert (s.backend, s.vni, s.proxy_mode) == ("udp", 1, "nftables")
    assert len(s.lb_pool) == 21 and str(s.client_address) == "172.30.0.254"
    assert [o["metadata"]["name"] for o in topo.objects] == ["nginxpod", "inline"]
    assert topo.node("srv-k8s-node2").pod_cidr == IPv4Network("10.244.96.0/24")


def test_unknown_manifest_field_in_workload_is_a_warning(tmp_path):
    topo = load(tmp_path, MINIMAL + "workloads:\n  - {apiVersion: v1, kind: Pod, metadata: {name: p}, "
                "spec: {containers: [{name: c, image: x, imagee: y}]}}\n")
    assert [o["metadata"]["name"] for o in topo.objects] == ["p"]
    assert len(topo.warnings) == 1
    assert "workloads[0] (Pod p): spec.containers[0].imagee: unknown field" in topo.warnings[0]


def test_defaults_and_generated_values(tmp_path):
    topo = load(tmp_path, MINIMAL)
    s = topo.settings
    assert s.underlay == IPv4Network("172.30.0.0/24")
    assert s.cluster_network == IPv4Network("10.244.0.0/16") and s.subnet_len == 24
    assert s.node_port_range == (30000, 32767)
    assert s.client_address == IPv4Address("172.30.0.254")
    # top 16 usable addresses (.239-.254) minus the client's
    assert s.lb_pool == [IPv4Address(f"172.30.0.{i}") for i in range(239, 254)]
    assert topo.underlay_addresses() == {"a": IPv4Address("172.30.0.1"), "b": IPv4Address("172.30.0.2")}
    assert topo.objects == [] and topo.warnings == []


def test_shebang_line_is_tolerated(tmp_path):
    topo = load(tmp_path, "#!/usr/bin/env -S netemu up\n" + MINIMAL)
    assert topo.name == "t"


def test_name_defaults_to_file_stem_and_cli_overrides(tmp_path):
    p = write(tmp_path, "nodes: [{name: a}]\n", name="lab-1.yaml")
    assert load_topology(p, host_networks=[]).name == "lab-1"
    assert load_topology(p, name="other", host_networks=[]).name == "other"


def test_cli_overrides_are_validated_after_overriding(tmp_path):
    text = MINIMAL + "cluster:\n  backend: {type: udp, port: 9000}\n  proxyMode: nftables\n"
    topo = load(tmp_path, text, backend="vxlan", proxy_mode="iptables")
    assert topo.settings.backend == "vxlan"
    assert topo.settings.effective_backend_port() == 8472     # udp's port does not carry over
    assert topo.settings.proxy_mode == "iptables"
    assert load(tmp_path, text, backend="udp").settings.effective_backend_port() == 9000
    assert "--backend" in error(tmp_path, text, backend="geneve")
    assert "--proxy-mode" in error(tmp_path, text, proxy_mode="ipvs")
    assert "--name" in error(tmp_path, text, name="Bad_Name")


def test_backend_mapping_forms(tmp_path):
    topo = load(tmp_path, MINIMAL + "cluster:\n  backend: {type: vxlan, vni: 7, port: 4789}\n")
    assert (topo.settings.backend, topo.settings.vni, topo.settings.backend_port) == ("vxlan", 7, 4789)
    assert load(tmp_path, MINIMAL + "cluster:\n  backend: host-gw\n").settings.effective_backend_port() is None


def test_lb_pool_forms(tmp_path):
    base = MINIMAL + "cluster:\n  loadBalancerPool: "
    assert load(tmp_path, base + "172.30.0.240/30\n").settings.lb_pool == [
        IPv4Address(f"172.30.0.{i}") for i in range(240, 244)]
    pool = load(tmp_path, base + "[172.30.0.10, 172.30.0.20-172.30.0.21]\n").settings.lb_pool
    assert pool == [IPv4Address("172.30.0.10"), IPv4Address("172.30.0.20"), IPv4Address("172.30.0.21")]
    assert load(tmp_path, base + "[]\n").settings.lb_pool == []


def test_node_port_range_list_form(tmp_path):
    topo = load(tmp_path, MINIMAL + "cluster:\n  nodePortRange: [31000, 31999]\n")
    assert topo.settings.node_port_range == (31000, 31999)


def test_workload_directory_and_inline(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "a.yaml").write_text((DATA / "nginxpod.yaml").read_text())
    (tmp_path / "m" / "notes.txt").write_text("not a manifest")
    topo = load(tmp_path, MINIMAL + textwrap.dedent("""\
        workloads:
          - m
          - apiVersion: v1
            kind: Service
            metadata: {name: web}
            spec: {selector: {app: nginx}, ports: [{port: 80}]}
        """))
    assert [o["metadata"]["name"] for o in topo.objects] == ["nginxpod", "web"]


# --- errors: file and top level -------------------------------------------------

def test_malformed_yaml_names_line(tmp_path):
    msg = error(tmp_path, "name: t\nnodes:\n  - name: a\n   bad: [\n")
    assert msg.startswith(str(tmp_path / "topo.yaml") + ": line ")
    assert "invalid YAML" in msg


def test_duplicate_yaml_key_is_an_error(tmp_path):
    msg = error(tmp_path, "name: t\nname: u\nnodes: [{name: a}]\n")
    assert 'mapping key "name" already defined at line 1' in msg and "line 2" in msg


def test_unknown_top_level_key(tmp_path):
    msg = error(tmp_path, MINIMAL + "workload: []\n")
    assert ": workload: unknown key" in msg and 'did you mean "workloads"' in msg


def test_unknown_cluster_and_node_keys(tmp_path):
    assert "cluster.serviceCIDR: unknown key" in error(tmp_path, MINIMAL + "cluster: {serviceCIDR: 10.0.0.0/16}\n")
    assert "nodes[0].ip: unknown key" in error(tmp_path, "name: t\nnodes: [{name: a, ip: 1.2.3.4}]\n")


def test_missing_or_empty_file(tmp_path):
    with pytest.raises(TopologyError, match="no such file"):
        load_topology(tmp_path / "absent.yaml", host_networks=[])
    assert "empty file" in error(tmp_path, "# nothing\n")


def test_bad_cluster_name(tmp_path):
    assert 'invalid cluster name "Tutorial"' in error(tmp_path, "name: Tutorial\nnodes: [{name: a}]\n")
    assert "name:" in error(tmp_path, "name: " + "a" * 21 + "\nnodes: [{name: a}]\n")
    assert 'invalid cluster name "-lab"' in error(tmp_path, "name: '-lab'\nnodes: [{name: a}]\n")
    assert load(tmp_path, "name: " + "a" * 20 + "\nnodes: [{name: a}]\n").name == "a" * 20


def test_wrong_field_types(tmp_path):
    assert "cluster.underlayMTU: must be an integer, got string" in error(
        tmp_path, MINIMAL + "cluster: {underlayMTU: '1500'}\n")
    assert "cluster.timeScale: must be a finite number greater than 0" in error(tmp_path, MINIMAL + "cluster: {timeScale: 0}\n")
    assert "nodes[0].unschedulable: must be true or false" in error(
        tmp_path, "name: t\nnodes: [{name: a, unschedulable: 'no'}]\n")
    assert "nodes: must be a list" in error(tmp_path, "name: t\nnodes: {a: 1}\n")


# --- errors: networks -----------------------------------------------------------

@pytest.mark.parametrize("value, expected", [
    ("10.1.96.0", "must be a CIDR"),
    ("10.1.96.300/24", 'invalid CIDR "10.1.96.300/24"'),
    ("10.1.96.5/24", "host bits are set (did you mean 10.1.96.0/24?)"),
])
def test_malformed_cidr(tmp_path, value, expected):
    msg = error(tmp_path, MINIMAL + f"cluster: {{underlay: '{value}'}}\n")
    assert "cluster.underlay:" in msg and expected in msg


@pytest.mark.parametrize("cluster, where, other", [
    ("{underlay: 10.244.5.0/24}", "cluster.clusterNetwork", "cluster.underlay"),
    ("{underlay: 10.96.0.0/24}", "cluster.serviceRange", "cluster.underlay"),
    ("{clusterNetwork: 10.0.0.0/8}", "cluster.serviceRange", "cluster.clusterNetwork"),
])
def test_overlapping_networks_each_pair(tmp_path, cluster, where, other):
    msg = error(tmp_path, MINIMAL + f"cluster: {cluster}\n")
    assert f": {where}: " in msg and f"overlaps {other}" in msg


def test_cluster_network_too_small_for_nodes(tmp_path):
    nodes = "".join(f"  - name: n{i}\n" for i in range(5))
    msg = error(tmp_path, "name: t\ncluster: {clusterNetwork: 10.244.0.0/22}\nnodes:\n" + nodes)
    assert "cluster.clusterNetwork: 10.244.0.0/22 holds 4 subnet(s) of /24, fewer than the 5 nodes" in msg


def test_subnet_len_must_be_longer_than_cluster_prefix(tmp_path):
    assert "cluster.subnetLen" in error(tmp_path, MINIMAL + "cluster: {clusterNetwork: 10.244.0.0/24}\n")


def test_service_range_too_large(tmp_path):
    assert "cluster.serviceRange: 10.0.0.0/8 is too large" in error(
        tmp_path, MINIMAL + "cluster: {serviceRange: 10.0.0.0/8, clusterNetwork: 192.168.0.0/16}\n")


@pytest.mark.parametrize("value", ["'30000'", "'32767-30000'", "'a-b'", "[30000]", "'30000-70000'"])
def test_malformed_node_port_range(tmp_path, value):
    assert "cluster.nodePortRange:" in error(tmp_path, MINIMAL + f"cluster: {{nodePortRange: {value}}}\n")


@pytest.mark.parametrize("cluster, where, expected", [
    ("{backend: geneve}", "cluster.backend", 'unknown backend "geneve" (valid: udp, vxlan, host-gw)'),
    ("{backend: {port: 1}}", "cluster.backend.type", "required"),
    ("{backend: {type: udp, vni: 2}}", "cluster.backend.vni", "only the vxlan backend"),
    ("{backend: {type: host-gw, port: 1}}", "cluster.backend.port", "no port"),
    ("{backend: {type: udp, port: 70000}}", "cluster.backend.port", "between 1 and 65535"),
    ("{proxyMode: ipvs}", "cluster.proxyMode", 'unknown proxyMode "ipvs"'),
])
def test_unknown_backend_and_proxy_mode(tmp_path, cluster, where, expected):
    msg = error(tmp_path, MINIMAL + f"cluster: {cluster}\n")
    assert f": {where}: " in msg and expected in msg


# --- errors: nodes ----------------------------------------------------------------

def test_duplicate_node_name(tmp_path):
    p = write(tmp_path, "name: t\nnodes: [{name: a}, {name: a}]\n")
    with pytest.raises(TopologyError) as info:
        load_topology(p, host_networks=[])
    assert str(info.value) == f'{p}: nodes[1].name: duplicate node name "a" (also nodes[0])'


def test_invalid_node_name(tmp_path):
    assert "nodes[0].name: invalid node name" in error(tmp_path, "name: t\nnodes: [{name: Node_1}]\n")
    assert "nodes[0].name: required" in error(tmp_path, "name: t\nnodes: [{labels: {}}]\n")


def test_no_nodes(tmp_path):
    assert "nodes: required" in error(tmp_path, "name: t\n")
    assert "nodes: must be a list of at least one node" in error(tmp_path, "name: t\nnodes: []\n")


@pytest.mark.parametrize("address, expected", [
    ("10.0.0.1", "outside cluster.underlay 172.30.0.0/24"),
    ("172.30.0.255", "network or broadcast"),
    ("172.30.0.254", "client's address"),
    ("172.30.0.x", "invalid IPv4 address"),
])
def test_bad_node_address(tmp_path, address, expected):
    msg = error(tmp_path, f"name: t\nnodes: [{{name: a, address: '{address}'}}]\n")
    assert "nodes[0].address:" in msg and expected in msg


def test_duplicate_node_address(tmp_path):
    msg = error(tmp_path, "name: t\nnodes: [{name: a, address: 172.30.0.9}, {name: b, address: 172.30.0.9}]\n")
    assert "nodes[1].address: duplicate address 172.30.0.9 (also nodes[0])" in msg


def test_fixed_address_in_explicit_pool(tmp_path):
    msg = error(tmp_path, "name: t\ncluster: {loadBalancerPool: 172.30.0.8/29}\nnodes: [{name: a, address: 172.30.0.9}]\n")
    assert "nodes[0].address: 172.30.0.9 is in cluster.loadBalancerPool" in msg


def test_fixed_address_leaves_default_pool(tmp_path):
    topo = load(tmp_path, "name: t\nnodes: [{name: a, address: 172.30.0.250}]\n")
    assert IPv4Address("172.30.0.250") not in topo.settings.lb_pool
    assert len(topo.settings.lb_pool) == 14


@pytest.mark.parametrize("cidr, expected", [
    ("10.245.1.0/24", "outside cluster.clusterNetwork 10.244.0.0/16"),
    ("10.244.0.0/25", "must have prefix /24 (cluster.subnetLen)"),
    ("10.244.1.0", "must be a CIDR"),
])
def test_bad_pod_cidr(tmp_path, cidr, expected):
    msg = error(tmp_path, f"name: t\nnodes: [{{name: a, podCIDR: '{cidr}'}}]\n")
    assert "nodes[0].podCIDR:" in msg and expected in msg


def test_duplicate_pod_cidr(tmp_path):
    msg = error(tmp_path, "name: t\nnodes: [{name: a, podCIDR: 10.244.3.0/24}, {name: b, podCIDR: 10.244.3.0/24}]\n")
    assert "nodes[1].podCIDR: duplicate podCIDR 10.244.3.0/24 (also nodes[0])" in msg


def test_bad_node_labels(tmp_path):
    assert "nodes[0].labels.v: keys and values must be strings, got integer 1" in error(
        tmp_path, "name: t\nnodes: [{name: a, labels: {v: 1}}]\n")
    assert "nodes[0].labels.role" in error(tmp_path, "name: t\nnodes: [{name: a, labels: {role: 'a b'}}]\n")


# --- underlay capacity -----------------------------------------------------------

def test_underlay_too_small_with_explicit_pool(tmp_path):
    # /28: 14 usable = 1 client + 10 pool + 3 nodes at most
    pool = "172.30.0.1-172.30.0.10"
    nodes = "".join(f"  - name: n{i}\n" for i in range(4))
    msg = error(tmp_path, f"name: t\ncluster: {{underlay: 172.30.0.0/28, loadBalancerPool: {pool}}}\nnodes:\n{nodes}")
    assert "cluster.underlay: 172.30.0.0/28 has 14 usable addresses but needs 15: 4 node(s), 1 client, 10" in msg
    load(tmp_path, f"name: t\ncluster: {{underlay: 172.30.0.0/28, loadBalancerPool: {pool}}}\nnodes:\n"
         + "".join(f"  - name: n{i}\n" for i in range(3)))


def test_default_pool_shrinks_in_a_small_underlay_with_a_warning(tmp_path):
    nodes = "".join(f"  - name: n{i}\n" for i in range(10))
    topo = load(tmp_path, f"name: t\ncluster: {{underlay: 172.30.0.0/28}}\nnodes:\n{nodes}")
    assert len(topo.settings.lb_pool) == 3          # 14 usable - 10 nodes - 1 client
    assert any("leaves only 3 address(es)" in w for w in topo.warnings)
    addrs = topo.underlay_addresses()
    assert len(set(addrs.values())) == 10
    assert not set(addrs.values()) & (set(topo.settings.lb_pool) | {topo.settings.client_address})


def test_underlay_too_small_even_without_pool(tmp_path):
    nodes = "".join(f"  - name: n{i}\n" for i in range(14))
    assert "cluster.underlay: 172.30.0.0/28 has 14 usable addresses but needs 15" in error(
        tmp_path, f"name: t\ncluster: {{underlay: 172.30.0.0/28}}\nnodes:\n{nodes}")


def test_lb_pool_errors(tmp_path):
    base = MINIMAL + "cluster:\n  loadBalancerPool: "
    assert "outside cluster.underlay" in error(tmp_path, base + "10.9.9.9\n")
    assert "is empty" in error(tmp_path, base + "172.30.0.20-172.30.0.10\n")
    assert "client's address" in error(tmp_path, base + "172.30.0.254\n")
    assert "already in the pool" in error(tmp_path, base + "[172.30.0.10, 172.30.0.8/29]\n")
    assert "cluster.loadBalancerPool[0]: must be an address" in error(tmp_path, base + "[5]\n")


# --- workloads --------------------------------------------------------------------

def test_workload_errors_name_the_manifest_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: {name: p}\n"
                                       "spec: {containers: [{name: c, image: x, ports: [{containerPort: 0}]}]}\n")
    msg = error(tmp_path, MINIMAL + "workloads: [bad.yaml]\n")
    assert msg.startswith(f"{tmp_path / 'bad.yaml'}: document 1 (Pod p): spec.containers[0].ports[0].containerPort:")


def test_workload_missing_file_and_bad_item(tmp_path):
    assert "workloads[0]: " in error(tmp_path, MINIMAL + "workloads: [absent.yaml]\n")
    assert "workloads[0]: must be a manifest path or a Kubernetes object" in error(tmp_path, MINIMAL + "workloads: [3]\n")


def test_inline_workload_error_names_topology_and_item(tmp_path):
    msg = error(tmp_path, MINIMAL + "workloads:\n  - {apiVersion: v1, kind: Pod, metadata: {name: p}, spec: {}}\n")
    assert f"{tmp_path / 'topo.yaml'}: workloads[0] (Pod p): spec.containers: Required value" == msg


def test_duplicate_objects_across_workloads(tmp_path):
    msg = error(tmp_path, MINIMAL + f"workloads: [{DATA / 'nginxpod.yaml'}, {DATA / 'nginxpod.yaml'}]\n")
    assert 'metadata.name: duplicate Pod "default/nginxpod"' in msg


def test_pod_on_unknown_node(tmp_path):
    msg = error(tmp_path, MINIMAL + "workloads:\n  - {apiVersion: v1, kind: Pod, metadata: {name: p}, "
                "spec: {nodeName: c, containers: [{name: c, image: x}]}}\n")
    assert 'spec.nodeName: no node named "c" (nodes: a, b)' in msg


def test_host_port_twice_on_one_node(tmp_path):
    pod = ("  - {{apiVersion: v1, kind: Pod, metadata: {{name: {name}}}, spec: {{nodeName: a, "
           "containers: [{{name: c, image: x, ports: [{{containerPort: 80, hostPort: 8080}}]}}]}}}}\n")
    msg = error(tmp_path, MINIMAL + "workloads:\n" + pod.format(name="p1") + pod.format(name="p2"))
    assert 'workloads[1] (Pod p2): spec.containers[0].ports[0].hostPort: hostPort 8080/TCP on node "a" ' \
           "is already used by workloads[0] (Pod p1)" in msg
    # on different nodes it is fine
    load(tmp_path, MINIMAL + "workloads:\n" + pod.format(name="p1") + pod.format(name="p2").replace("nodeName: a", "nodeName: b"))


def test_host_port_on_backend_port(tmp_path):
    msg = error(tmp_path, MINIMAL + "workloads:\n  - {apiVersion: v1, kind: Pod, metadata: {name: p}, spec: "
                "{containers: [{name: c, image: x, ports: [{containerPort: 53, hostPort: 8285, protocol: UDP}]}]}}\n")
    assert "8285/UDP is the udp backend's port" in msg


def test_node_selector_matching_nothing_warns(tmp_path):
    topo = load(tmp_path, MINIMAL + "workloads:\n  - {apiVersion: v1, kind: Pod, metadata: {name: p}, spec: "
                "{nodeSelector: {disk: ssd}, containers: [{name: c, image: x}]}}\n")
    assert any("matches no schedulable node: pods stay Pending" in w for w in topo.warnings)


def test_all_nodes_unschedulable_warns(tmp_path):
    topo = load(tmp_path, "name: t\nnodes: [{name: a, unschedulable: true}]\n")
    assert any("every node is unschedulable" in w for w in topo.warnings)


def test_nodeport_checked_against_topology_range(tmp_path):
    svc = ("  - {apiVersion: v1, kind: Service, metadata: {name: s}, spec: {type: NodePort, selector: {a: b}, "
           "ports: [{port: 80, nodePort: 30080}]}}\n")
    load(tmp_path, MINIMAL + "workloads:\n" + svc)
    msg = error(tmp_path, MINIMAL + "cluster: {nodePortRange: 31000-31999}\nworkloads:\n" + svc)
    assert "spec.ports[0].nodePort: Invalid value: 30080: provided port is not in the valid range. " \
           "The range of valid ports is 31000-31999" in msg


# --- the machine's own networks -------------------------------------------------

def test_host_network_overlap_is_a_warning(tmp_path):
    topo = load(tmp_path, MINIMAL, host_networks=[IPv4Network("10.244.7.0/24"), IPv4Network("192.0.2.0/24")])
    assert len(topo.warnings) == 1
    assert "cluster.clusterNetwork: 10.244.0.0/16 overlaps" in topo.warnings[0]
    assert "10.244.7.0/24" in topo.warnings[0]


def test_host_network_warnings_function():
    s = ClusterSettings()
    assert host_network_warnings(s, []) == []
    assert host_network_warnings(s, [IPv4Network("8.8.8.0/24")]) == []
    warnings = host_network_warnings(s, [IPv4Network("172.30.0.5/32"), IPv4Network("10.96.0.0/12")], "f.yaml")
    assert [w.split(": ")[1] for w in warnings] == ["cluster.underlay", "cluster.serviceRange"]


def test_read_host_networks_returns_ipv4_networks_without_default():
    nets = read_host_networks()
    assert all(isinstance(n, IPv4Network) for n in nets)
    assert IPv4Network("0.0.0.0/0") not in nets
