"""A cluster over several machines (issue 15), without root: `machines:` and
`machine:` in a topology, the placer, the stored settings, the tunnels' VNIs
and port names."""

from __future__ import annotations

import pytest

from netemu import clusterconfig, machines, names
from netemu.topology.loader import load_topology_dict
from netemu.topology.model import TopologyError

TWO = [{"name": "a", "address": "192.168.77.1"}, {"name": "b", "address": "192.168.77.2"}]


def load(nodes, machines_=TWO, cluster=None):
    body = {"name": "x", "nodes": nodes}
    if machines_ is not None:
        body["machines"] = machines_
    if cluster is not None:
        body["cluster"] = cluster
    return load_topology_dict(body)


def test_the_placer_puts_the_api_servers_node_first_and_spreads_the_rest():
    t = load([{"name": "n1"}, {"name": "n2"}, {"name": "m", "unschedulable": True}, {"name": "n3", "machine": "a"},
              {"name": "n4"}])
    # m serves the API: machine a; n3 pinned to a; the others to the machine with fewest
    assert {n.name: n.machine for n in t.nodes} == {"n1": "b", "n2": "b", "m": "a", "n3": "a", "n4": "a"}
    assert [n.name for n in t.nodes_on("b")] == ["n1", "n2"]
    assert t.nodes_on(None) == t.nodes


def test_machines_make_the_fabric_mtu_leave_room_for_vxlan_unless_given():
    assert load([{"name": "n"}]).settings.underlay_mtu == 1450
    assert load([{"name": "n"}], cluster={"underlayMTU": 1400}).settings.underlay_mtu == 1400
    assert load([{"name": "n"}], machines_=None).settings.underlay_mtu == 1500


def test_machines_survive_the_store():
    t = load([{"name": "n1"}, {"name": "n2"}])
    back = clusterconfig.decode(clusterconfig.encode(t))
    assert back.machines == t.machines
    assert [(n.name, n.machine) for n in back.nodes] == [("n1", "a"), ("n2", "b")]
    assert back.settings.underlay_mtu == 1450


@pytest.mark.parametrize("nodes,machines_,where,problem", [
    ([{"name": "n", "machine": "a"}], None, "nodes[0].machine", "the file has no machines"),
    ([{"name": "n", "machine": "q"}], TWO, "nodes[0].machine", 'unknown machine "q" (machines: a, b)'),
    ([{"name": "n", "machine": 3}], TWO, "nodes[0].machine", "must be the name of one of machines:"),
    ([{"name": "m", "unschedulable": True, "machine": "b"}], TWO, "nodes[0].machine",
     'node "m" serves the Kubernetes API'),
    ([{"name": "n"}], [], "machines", "must be a list of at least one machine"),
    ([{"name": "n"}], [{"name": "a"}], "machines[0].address", "required"),
    ([{"name": "n"}], [{"name": "a", "address": "127.0.0.1"}], "machines[0].address",
     "not an address another machine can reach"),
    ([{"name": "n"}], [{"name": "a", "address": "10.0.0.1"}, {"name": "a", "address": "10.0.0.2"}],
     "machines[1].name", 'duplicate machine name "a"'),
    ([{"name": "n"}], [{"name": "a", "address": "10.0.0.1"}, {"name": "b", "address": "10.0.0.1"}],
     "machines[1].address", "duplicate address 10.0.0.1"),
    ([{"name": "n"}], [{"name": "A_", "address": "10.0.0.1"}], "machines[0].name", 'invalid machine name "A_"'),
    ([{"name": "n"}], [{"name": "a", "address": "10.0.0.1", "adress": 1}], "machines[0].adress", "unknown key"),
])
def test_bad_machines_are_one_line_errors_naming_the_field(nodes, machines_, where, problem):
    with pytest.raises(TopologyError) as e:
        load(nodes, machines_)
    assert e.value.where == where and problem in str(e.value), str(e.value)
    assert "\n" not in str(e.value)


def test_every_pair_of_machines_has_its_own_vni_the_same_on_both_ends():
    ms = load([{"name": "n"}], machines_=[{"name": c, "address": f"10.0.0.{i + 1}"}
                                          for i, c in enumerate("abcd")]).machines
    vnis = {frozenset((p, q)): machines.pair_vni("x", ms, p, q) for p in "abcd" for q in "abcd" if p < q}
    assert len(set(vnis.values())) == 6
    assert all(machines.pair_vni("x", ms, q, p) == v for (p, q), v in
               ((tuple(sorted(k)), v) for k, v in vnis.items()))
    assert all(1 <= v <= 2 ** 24 - 2 for v in vnis.values())
    assert machines.pair_vni("y", ms, "a", "b") != vnis[frozenset("ab")]       # spread by the cluster's name


def test_tunnel_port_names_fit_an_interface_name():
    assert names.machine_port("b") == "m-b"
    long = names.machine_port("a-very-long-machine-name")
    assert long.startswith("m-") and len(long) <= names.IFNAMSIZ
    assert long != names.machine_port("a-very-long-machine-nam")


def test_the_clusters_own_etcd_takes_another_port_when_2379_is_held_and_stops(tmp_path, monkeypatch):
    """etcdrun.start_owned/stop_owned (what `up` runs without --store), on
    loopback with a state folder in TMP_PATH: 2379 held by someone else, the
    etcd listens on another port and answers; stop_owned ends it."""
    import os
    import socket

    from netemu import journal
    from netemu.store import etcdrun
    from netemu.store.etcd import EtcdStore, parse_endpoint

    if etcdrun.etcd_binary() is None:
        pytest.skip("etcd binary not found (tools/install.sh installs Debian's etcd-server)")
    monkeypatch.setattr(names, "STATE_ROOT", str(tmp_path))
    os.makedirs(names.state_dir("x"))
    holder = socket.socket()
    try:
        holder.bind(("127.0.0.1", etcdrun.CLIENT_PORT))
        holder.listen()
    except OSError:
        pass                        # held already by someone else: the same case
    try:
        endpoint = etcdrun.start_owned("x", "127.0.0.1")
        try:
            host, port = parse_endpoint(endpoint)
            assert host == "127.0.0.1" and port != etcdrun.CLIENT_PORT
            store = EtcdStore(f"{host}:{port}")
            store.put("/k", {"v": 1})
            assert store.get("/k").value == {"v": 1}
            store.close()
            record = etcdrun.owned("x")
            assert record["endpoint"] == endpoint and (record["pid"], record["start"]) in journal.processes("x")
        finally:
            etcdrun.stop_owned("x")
        assert journal.process_start_time(record["pid"]) is None
    finally:
        holder.close()
