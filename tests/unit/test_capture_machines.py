"""capture and trace over several machines, their pure parts (no root): the
machine/NAME target and its filter, the two layers' tcpdumps and files, and the
machine tunnel's hops in a trace's path."""

import re

import pytest

from netemu.capture import cli as capture_cli, targets, trace
from netemu.capture.decode import IPHeader
from netemu.capture.trace import Hop, Point, Seen, Step

A, B = "192.168.77.1", "192.168.77.2"


def node(name, ip, machine):
    return {"metadata": {"name": name, "labels": {"netemu.io/machine": machine}},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def pod(name, node_name, ip):
    return {"metadata": {"name": name, "namespace": "default", "uid": "u-" + name},
            "spec": {"nodeName": node_name}, "status": {"phase": "Running", "podIP": ip}}


SVC = {"metadata": {"name": "web", "namespace": "default"},
       "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
                "ports": [{"port": 80, "protocol": "TCP", "nodePort": 30080}]}}
EPS = {"metadata": {"name": "web", "namespace": "default"},
       "subsets": [{"addresses": [{"ip": "10.244.2.2", "nodeName": "n2"}, {"ip": "10.244.2.3", "nodeName": "n2"}],
                    "ports": [{"port": 80, "protocol": "TCP"}]}]}


def make_view(backend="udp", here="a", machines=(("a", A), ("b", B))):
    """n1 and n3 on machine a, n2 on machine b; pods a1 (n1), b1 and b2 (n2), a3 (n3)."""
    return targets.view_from_objects(
        "c", network_config={"Network": "10.244.0.0/16", "Backend": {"Type": backend}},
        nodes=[node("n1", "172.30.0.1", "a"), node("n2", "172.30.0.2", "b"), node("n3", "172.30.0.3", "a")],
        pods=[pod("a1", "n1", "10.244.1.2"), pod("b1", "n2", "10.244.2.2"), pod("b2", "n2", "10.244.2.3"),
              pod("a3", "n3", "10.244.3.2")],
        services=[SVC], endpoints=[EPS],
        subnets={"n1": "10.244.1.0/24", "n2": "10.244.2.0/24", "n3": "10.244.3.0/24"},
        veths={"a1": "veth1", "b1": "veth2", "b2": "veth3", "a3": "veth4"}, client_address="172.30.0.254",
        here=here, machines=list(machines), vnis={"b": 77, "a": 77}, links={"b": "eth1", "a": "eth1"})


# --- the target ---------------------------------------------------------------

def test_machine_target_is_both_layers_of_the_tunnel():
    v = make_view()
    assert v.machines["b"] == targets.MachineInfo("b", B, "m-b", 77, "eth1") and v.here_address == A
    t = targets.resolve_target(v, "machine/b")
    assert t == targets.Target("machine/b", "c-fabric", "m-b", outer_iface="eth1",
                               outer_filter=f"udp port 4789 and host {B}")
    assert targets.machine_filter("10.0.0.7") == "udp port 4789 and host 10.0.0.7"


@pytest.mark.parametrize("view, word, problem", [
    (make_view(machines=()), "machine/b", 'cluster "c" runs on one machine: it has no machine tunnels'),
    (make_view(), "machine/a", "machine a is this machine: a tunnel goes to another (machines: b)"),
    (make_view(), "machine/z", 'cluster "c" has no machine "z" (machines: a, b)'),
    (make_view(), "n2", 'node "n2" runs on machine b (this is a): capture there'),
    (make_view(), "pod/b1", "pod b1 runs on node n2, on machine b (this is a): capture there"),
    (make_view(here="b"), "client", "the external client runs on machine a (this is b): capture there"),
])
def test_machine_target_errors(view, word, problem):
    with pytest.raises(targets.TargetError) as e:
        targets.resolve_target(view, word)
    assert str(e.value) == problem


def test_a_machine_without_a_route_to_the_peer_says_so():
    v = make_view()
    v.machines["b"] = targets.MachineInfo("b", B, "m-b", 77, None)
    with pytest.raises(targets.TargetError, match=f"no route to machine b \\({B}\\)"):
        targets.resolve_target(v, "machine/b")


def test_targets_on_this_machine_resolve_as_before():
    v = make_view()
    assert targets.resolve_target(v, "n1").netns == "c-node-n1"
    assert targets.resolve_target(v, "a1").netns == "c-pod-a1"
    assert targets.resolve_target(v, "client").netns == "c-client"
    assert targets.resolve_target(make_view(here="b"), "b1").netns == "c-pod-b1"


def test_the_two_layers_and_their_files():
    v = make_view()
    t = targets.resolve_target(v, "machine/b")
    inner, outer = capture_cli.machine_layers(v, t, ["icmp"], "/tmp/x.pcap")
    assert (inner.label, inner.ns, inner.iface, inner.bpf_filter, inner.pcap_path) == \
        ("inner m-b", "c-fabric", "m-b", ["icmp"], "/tmp/x-inner.pcap")
    # the machine's own namespace (None), its link, never promiscuous, only the tunnel
    assert (outer.label, outer.ns, outer.iface, outer.bpf_filter, outer.pcap_path, outer.promiscuous) == \
        ("outer eth1", None, "eth1", f"udp port 4789 and host {B}", "/tmp/x-outer.pcap", False)
    assert capture_cli.layer_paths("run/cap") == ("run/cap-inner.pcap", "run/cap-outer.pcap")
    assert capture_cli.layer_paths("a.pcapng") == ("a-inner.pcapng", "a-outer.pcapng")


# --- trace ------------------------------------------------------------------------

def labels(steps):
    return [(s.label, s.encapsulated, s.elsewhere) for s in steps]


def test_a_path_to_another_machine_crosses_its_tunnel():
    v = make_view("udp")
    dest = trace.resolve_destination(v, "b1", None, "icmp")
    _, routes = trace.plan(v, "a1", dest)
    route = routes["b1"]
    assert labels(route.steps) == [
        ("pod a1 eth0", False, None), ("node n1 veth1", False, None), ("node n1 docker0", False, None),
        ("node n1 flannel0", False, None), ("node n1 eth0", True, None),
        ("fabric m-b", True, None), ("machine a eth1", True, None),
        ("node n2 eth0", True, "b"), ("node n2 flannel0", False, "b"), ("node n2 docker0", False, "b"),
        ("node n2 veth2", False, "b"), ("pod b1 eth0", False, "b")]
    link = route.steps[6].point
    assert link == Point(None, "eth1", f"udp port 4789 and host {B}")
    # the reply comes back the same way, the tunnel's hops the other way round
    assert [s.label for s in route.reply_steps][5:8] == ["machine a eth1", "fabric m-b", "node n1 eth0"]
    # only this machine's points are captured
    points = trace.capture_points(routes)
    assert Point("c-fabric", "m-b") in points and link in points
    assert not [p for p in points if p.netns in ("c-node-n2", "c-pod-b1")]


def test_host_gw_crosses_the_tunnel_plain():
    v = make_view("host-gw")
    _, routes = trace.plan(v, "a1", trace.resolve_destination(v, "b1", None, "icmp"))
    assert labels(routes["b1"].steps)[3:6] == [("node n1 eth0", False, None), ("fabric m-b", False, None),
                                               ("machine a eth1", False, None)]


def test_a_path_within_this_machine_gains_nothing():
    v = make_view("udp")
    _, routes = trace.plan(v, "a1", trace.resolve_destination(v, "a3", None, "icmp"))
    assert not [s for s in routes["a3"].steps if s.elsewhere or s.point.iface.startswith("m-")]


def test_a_nodeport_on_the_other_machine_crosses_there_and_back():
    """a1 (machine a) to n2's NodePort (machine b) reaching a3 on machine a: out
    plain through the tunnel, back encapsulated by n2's flannel."""
    v = make_view("udp")
    eps = {"metadata": EPS["metadata"], "subsets": [{"addresses": [{"ip": "10.244.3.2", "nodeName": "n3"}],
                                                      "ports": [{"port": 80, "protocol": "TCP"}]}]}
    v2 = targets.view_from_objects(
        "c", network_config={"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}},
        nodes=[node("n1", "172.30.0.1", "a"), node("n2", "172.30.0.2", "b"), node("n3", "172.30.0.3", "a")],
        pods=[pod("a1", "n1", "10.244.1.2"), pod("a3", "n3", "10.244.3.2")], services=[SVC], endpoints=[eps],
        subnets={"n1": "10.244.1.0/24", "n2": "10.244.2.0/24", "n3": "10.244.3.0/24"},
        here="a", machines=[("a", A), ("b", B)], vnis={"b": 77}, links={"b": "eth1"})
    assert v2.machines == v.machines
    _, routes = trace.plan(v2, "a1", trace.resolve_destination(v2, "n2:30080", None, "tcp"))
    steps = labels(routes["a3"].steps)
    tunnel = [s for s in steps if s[0] in ("fabric m-b", "machine a eth1")]
    assert tunnel == [("fabric m-b", False, None), ("machine a eth1", False, None),
                      ("machine a eth1", True, None), ("fabric m-b", True, None)]


def test_trace_from_another_machines_pod_is_refused():
    v = make_view()
    with pytest.raises(trace.TraceError, match=r"pod b1 runs on node n2, on machine b \(this is a\): trace from there"):
        trace.plan(v, "b1", trace.resolve_destination(v, "a1", None, "icmp"))


def seen(t, dst, carrier=None, outer=None):
    return Seen(time=t, inner=IPHeader("10.244.1.2", dst, "ICMP", ttl=63, length=84, flags="echo-request"),
                outer=outer, encapsulation="udp" if outer else None, carrier=carrier,
                carrier_vni=77 if carrier else None, icmp_type=8, has_token=True)


def test_the_tunnel_hop_is_shown_and_an_endpoint_elsewhere_counts_as_reached_when_it_answered():
    v = make_view("udp")
    dest = trace.resolve_destination(v, "b1", None, "icmp")
    _, routes = trace.plan(v, "a1", dest)
    steps = routes["b1"].steps
    outer = IPHeader("172.30.0.1", "172.30.0.2", "UDP", 8285, 8285, 64, 112)
    carrier = IPHeader(A, B, "UDP", 51000, 4789, 64, 162)
    on = {5: seen(5, "10.244.2.2", outer=outer), 6: seen(6, "10.244.2.2", carrier, outer)}
    hops = [Hop(s, [on[i]] if i in on else [seen(i, "10.244.2.2")] if s.elsewhere is None else [])
            for i, s in enumerate(steps)]
    result = trace.TraceResult(source="a1", destination=dest, backend="udp", probe="ICMP echo request",
                               outcome="echo reply from 10.244.2.2", endpoint="b1", forward=hops, reply=[],
                               owners=trace.address_names(v), answered=True)
    assert result.reached
    text = trace.format_trace(result)
    assert f"{A}:51000 > {B}:4789 VXLAN vni 77 | 172.30.0.1:8285 > 172.30.0.2:8285 UDP/flannel" in text
    assert f"^ into the machine tunnel: VXLAN vni 77 {A}:51000 > {B}:4789 (machine b)" in text
    assert re.search(r"^   8  node n2 eth0 +- on machine b: not captured from this one$", text, re.M), text
    # unanswered, a last hop not captured here is not taken for reached
    result.answered = False
    assert not result.reached


def test_choose_path_tells_endpoints_elsewhere_apart_by_the_address_seen_here():
    v = make_view("udp")
    dest = trace.resolve_destination(v, "web", None, "tcp")
    _, routes = trace.plan(v, "a1", dest)
    assert set(routes) == {"b1", "b2"}
    # the probe went to b2: the last hop here (the machine link) saw it DNATed to b2
    link = routes["b2"].steps[6].point
    assert link.iface == "eth1"
    forward = {s.point: [Seen(1.0, IPHeader("10.244.1.2", "10.244.2.3", "TCP", 4000, 80, 63, 60, "S"),
                              tcp_seq=1)]
               for s in routes["b2"].steps if s.elsewhere is None and s.point.iface != "eth0"
               or s.point == link}
    assert trace.choose_path(routes, forward) == "b2"
    forward = {p: [Seen(1.0, IPHeader("10.244.1.2", "10.244.2.2", "TCP", 4000, 80, 63, 60, "S"), tcp_seq=1)]
               for p in forward}
    assert trace.choose_path(routes, forward) == "b1"


def test_machine_addresses_are_named():
    names = trace.address_names(make_view())
    assert (names[A], names[B]) == ("machine a", "machine b")
