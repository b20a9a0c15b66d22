"""load_topology_dict: a topology given as a dict (the Python API) is checked
exactly as a topology file is, and its errors name "<dict>" and the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from netemu.topology.loader import load_topology, load_topology_dict
from netemu.topology.model import TopologyError

DATA = Path(__file__).parent / "data"

POD = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
       "spec": {"containers": [{"name": "c", "image": "nginx"}]}}


def dict_error(data, **kw) -> str:
    kw.setdefault("host_networks", [])
    with pytest.raises(TopologyError) as info:
        load_topology_dict(data, **kw)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def test_a_dict_builds_the_same_topology_as_the_file():
    path = DATA / "topologies" / "tutorial.yaml"
    data = yaml.safe_load(path.read_text())
    # A file's workload paths are relative to the file; a dict's to BASE.
    from_dict = load_topology_dict(data, base=path.parent, host_networks=[])
    from_file = load_topology(path, host_networks=[])
    assert from_dict.name == from_file.name
    assert from_dict.settings == from_file.settings
    assert from_dict.nodes == from_file.nodes
    assert from_dict.objects == from_file.objects
    assert from_dict.source is None


def test_minimal_dict_with_inline_workload_and_overrides():
    topo = load_topology_dict({"name": "lab", "nodes": [{"name": "a"}, {"name": "b"}], "workloads": [POD]},
                              backend="vxlan", proxy_mode="iptables", host_networks=[])
    assert topo.name == "lab"
    assert [n.name for n in topo.nodes] == ["a", "b"]
    assert topo.settings.backend == "vxlan" and topo.settings.proxy_mode == "iptables"
    assert [o["metadata"]["name"] for o in topo.objects] == ["web"]
    assert topo.objects[0]["metadata"]["namespace"] == "default"     # defaulted as for a file


def test_the_callers_dict_is_neither_changed_nor_shared():
    data = {"name": "lab", "nodes": [{"name": "a", "labels": {"x": "1"}}], "workloads": [POD]}
    before = yaml.safe_dump(data)
    topo = load_topology_dict(data, host_networks=[])
    assert yaml.safe_dump(data) == before
    data["nodes"][0]["labels"]["x"] = "2"
    assert topo.nodes[0].labels["x"] == "1"


def test_a_dict_needs_a_name():
    msg = dict_error({"nodes": [{"name": "a"}]})
    assert msg.startswith("<dict>: name: required")
    assert load_topology_dict({"nodes": [{"name": "a"}]}, name="lab", host_networks=[]).name == "lab"


def test_workload_paths_are_relative_to_base(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pod.yaml").write_text(yaml.safe_dump(POD))
    topo = load_topology_dict({"name": "lab", "nodes": [{"name": "a"}], "workloads": ["m"]},
                              base=tmp_path, host_networks=[])
    assert [o["metadata"]["name"] for o in topo.objects] == ["web"]
    msg = dict_error({"name": "lab", "nodes": [{"name": "a"}], "workloads": ["missing.yaml"]}, base=tmp_path)
    assert msg.startswith("<dict>: workloads[0]: ")


# Every class of bad input a file can have, as a dict: the same one-line error,
# with "<dict>" for the file's name.
BAD = [
    ("not a mapping", ["a"], "<dict>: "),
    ("unknown top key", {"name": "x", "nodes": [{"name": "a"}], "nodez": 1}, "<dict>: nodez: unknown key"),
    ("no nodes", {"name": "x"}, "<dict>: nodes: required"),
    ("empty nodes", {"name": "x", "nodes": []}, "<dict>: nodes: must be a list"),
    ("bad name", {"name": "Lab_1", "nodes": [{"name": "a"}]}, '<dict>: name: invalid cluster name "Lab_1"'),
    ("name not a string", {"name": 7, "nodes": [{"name": "a"}]}, "<dict>: name: must be a non-empty string"),
    ("unknown node key", {"name": "x", "nodes": [{"name": "a", "adress": "172.30.0.9"}]},
     '<dict>: nodes[0].adress: unknown key (allowed: name, labels, address, podCIDR, unschedulable, link, machine); '
     'did you mean "address"?'),
    ("duplicate node", {"name": "x", "nodes": [{"name": "a"}, {"name": "a"}]},
     '<dict>: nodes[1].name: duplicate node name "a"'),
    ("bad cidr", {"name": "x", "cluster": {"clusterNetwork": "10.244.0.1/16"}, "nodes": [{"name": "a"}]},
     "<dict>: cluster.clusterNetwork: invalid CIDR"),
    ("bool as int", {"name": "x", "cluster": {"underlayMTU": True}, "nodes": [{"name": "a"}]},
     "<dict>: cluster.underlayMTU: must be an integer"),
    ("bad backend", {"name": "x", "cluster": {"backend": "geneve"}, "nodes": [{"name": "a"}]},
     '<dict>: cluster.backend: unknown backend "geneve"'),
    ("address off the underlay", {"name": "x", "nodes": [{"name": "a", "address": "10.0.0.1"}]},
     "<dict>: nodes[0].address: 10.0.0.1 is outside cluster.underlay"),
    ("bad workload item", {"name": "x", "nodes": [{"name": "a"}], "workloads": [3]},
     "<dict>: workloads[0]: must be a manifest path or a Kubernetes object"),
    ("bad inline object", {"name": "x", "nodes": [{"name": "a"}],
                           "workloads": [{**POD, "spec": {"containers": [{"name": "c"}]}}]},
     "<dict>: workloads[0] (Pod web): "),
    ("pod on unknown node", {"name": "x", "nodes": [{"name": "a"}],
                             "workloads": [{**POD, "spec": {"nodeName": "b", "containers": [
                                 {"name": "c", "image": "nginx"}]}}]},
     "<dict>: "),
]


@pytest.mark.parametrize("data,expected", [(d, e) for _, d, e in BAD], ids=[i for i, _, _ in BAD])
def test_bad_dicts_are_one_line_errors_naming_dict_and_field(tmp_path, data, expected):
    msg = dict_error(data)
    assert msg.startswith(expected), msg
    # The same input as a file fails with the same words, the file's name in
    # place of "<dict>": one set of checks, not two.
    path = tmp_path / "topo.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(TopologyError) as info:
        load_topology(path, host_networks=[])
    assert str(info.value) == msg.replace("<dict>", str(path), 1)


def test_the_benchmarks_topologies_load_as_dicts():
    # netemu bench builds its clusters from these dicts, with no YAML file between.
    from netemu.bench import runner

    for backend in ("udp", "vxlan", "host-gw"):
        topo = load_topology_dict(runner.topology(f"hb-{backend}", backend, 9000), host_networks=[])
        assert topo.settings.backend == backend and topo.settings.underlay_mtu == 9000
        assert [o["metadata"]["name"] for o in topo.objects] == [runner.CLIENT, runner.SERVER, runner.LOCAL]
