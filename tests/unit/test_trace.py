"""netemu trace's pure parts: targets, path planning, probe correlation, NAT
annotations, text, DNAT rule lookup in ruleset listings. No root, no namespaces."""

import re

import pytest

from netemu.capture import targets, trace
from netemu.capture.decode import IPHeader
from netemu.capture.trace import Hop, Point, ProbeMark, Seen, Step


def node(name, ip):
    return {"metadata": {"name": name}, "status": {"addresses": [{"type": "InternalIP", "address": ip}]}}


def pod(name, node_name, ip, uid="u-" + "x"):
    return {"metadata": {"name": name, "namespace": "default", "uid": uid + name, "labels": {"app": "web"}},
            "spec": {"nodeName": node_name}, "status": {"phase": "Running", "podIP": ip}}


def make_view(backend="udp", services=(), endpoints=()):
    conf = {"Network": "10.244.0.0/16", "Backend": {"Type": backend}}
    if backend == "vxlan":
        conf["Backend"].update(VNI=1, Port=8472)
    return targets.view_from_objects(
        "c", network_config=conf,
        nodes=[node("n1", "172.30.0.1"), node("n2", "172.30.0.2")],
        pods=[pod("a", "n1", "10.244.1.2"), pod("b", "n2", "10.244.2.2"), pod("c2", "n1", "10.244.1.3")],
        services=list(services), endpoints=list(endpoints),
        subnets={"n1": "10.244.1.0/24", "n2": "10.244.2.0/24"},
        veths={"a": "vetha", "b": "vethb", "c2": "vethc"}, client_address="172.30.0.254")


SVC = {"metadata": {"name": "web", "namespace": "default"},
       "spec": {"type": "NodePort", "clusterIP": "10.96.0.10",
                "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP",
                           "nodePort": 30080}]}}
EPS = {"metadata": {"name": "web", "namespace": "default"},
       "subsets": [{"addresses": [{"ip": "10.244.2.2", "nodeName": "n2", "targetRef": {"name": "b"}},
                                  {"ip": "10.244.1.3", "nodeName": "n1", "targetRef": {"name": "c2"}}],
                    "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}]}]}


# --- targets --------------------------------------------------------------------

def test_view_reads_layout_from_objects():
    v = make_view("vxlan", [SVC], [EPS])
    assert v.nodes["n1"].bridge_ip == "10.244.1.1"
    assert v.tunnel_device == "flannel.1" and v.backend_port == 8472
    assert v.pod("a").netns == "c-pod-a" and v.pod("a").veth == "vetha"
    sp = v.services["default/web"].ports[0]
    assert (sp.node_port, [e.ip for e in sp.endpoints]) == (30080, ["10.244.2.2", "10.244.1.3"])
    assert v.node_of_pod_ip("10.244.2.77").name == "n2"
    assert make_view("host-gw").tunnel_device is None


def test_resolve_target_pods_first_then_nodes():
    v = make_view()
    assert targets.resolve_target(v, "a") == targets.Target("pod/a", "c-pod-a", "eth0")
    assert targets.resolve_target(v, "n1") == targets.Target("node/n1", "c-node-n1", "eth0")
    assert targets.resolve_target(v, "fabric").iface == "fabric0"
    assert targets.resolve_target(v, "client").netns == "c-client"
    with pytest.raises(targets.TargetError):
        targets.resolve_target(v, "pod/n1")
    with pytest.raises(targets.TargetError):
        targets.resolve_target(v, "lb")   # no load balancer in this cluster


# --- planning -------------------------------------------------------------------

def labels(steps):
    return [(s.label, s.encapsulated) for s in steps]


def test_plan_cross_node_udp_goes_through_tunnel_and_encapsulated_underlay():
    v = make_view("udp")
    steps = trace.plan_pod_to_pod(v, v.pod("a"), v.pod("b"))
    assert labels(steps) == [
        ("pod a eth0", False), ("node n1 vetha", False), ("node n1 docker0", False),
        ("node n1 flannel0", False), ("node n1 eth0", True), ("node n2 eth0", True),
        ("node n2 flannel0", False), ("node n2 docker0", False), ("node n2 vethb", False),
        ("pod b eth0", False)]


def test_plan_host_gw_has_no_tunnel_and_plain_underlay():
    v = make_view("host-gw")
    steps = trace.plan_pod_to_pod(v, v.pod("a"), v.pod("b"))
    assert [s.label for s in steps][3:5] == ["node n1 eth0", "node n2 eth0"]
    assert not any(s.encapsulated for s in steps)


def test_plan_same_node_is_bridged_unless_dnat():
    v = make_view()
    steps = trace.plan_pod_to_pod(v, v.pod("a"), v.pod("c2"))
    assert [s.label for s in steps] == ["pod a eth0", "node n1 vetha", "node n1 docker0",
                                        "node n1 vethc", "pod c2 eth0"]
    assert steps[2].note == trace.BRIDGED_NOTE
    assert trace.plan_pod_to_pod(v, v.pod("a"), v.pod("c2"), dnat=True)[2].note == ""


def test_plan_client_to_nodeport_on_another_node_visits_eth0_twice():
    v = make_view("vxlan", [SVC], [EPS])
    steps = trace.plan_client_to_pod(v, "n1", v.pod("b"))
    assert labels(steps)[:4] == [("client eth0", False), ("node n1 eth0", False),
                                 ("node n1 flannel.1", False), ("node n1 eth0", True)]


def test_resolve_destinations():
    v = make_view("udp", [SVC], [EPS])
    d = trace.resolve_destination(v, "b", 80, "tcp")
    assert (d.kind, d.address, [p.name for p in d.candidates]) == ("pod", "10.244.2.2", ["b"])
    d = trace.resolve_destination(v, "web", None, "tcp")
    assert (d.kind, d.address, d.port) == ("service", "10.96.0.10", 80)
    assert {p.name for p in d.candidates} == {"b", "c2"}
    assert trace.resolve_destination(v, "10.96.0.10", 80, "tcp").kind == "service"
    d = trace.resolve_destination(v, "n2:30080", None, "tcp")
    assert (d.kind, d.address, d.node) == ("nodeport", "172.30.0.2", "n2")
    assert trace.resolve_destination(v, "172.30.0.254", None, "icmp").kind == "external"
    with pytest.raises(trace.TraceError):
        trace.resolve_destination(v, "b", None, "tcp")     # which port?
    with pytest.raises(trace.TraceError):
        trace.resolve_destination(v, "web", None, "icmp")  # services do not DNAT ICMP
    src_ns, plans = trace.plan(v, "a", trace.resolve_destination(v, "web", None, "tcp"))
    assert src_ns == "c-pod-a" and set(plans) == {"b", "c2"}
    points = trace.capture_points(plans)
    assert len(points) == len(set(points))


# --- correlation ----------------------------------------------------------------

def tcp(t, src, sport, dst, dport, flags, seq, ack=0, ttl=64, outer=None):
    return Seen(time=t, inner=IPHeader(src, dst, "TCP", sport, dport, ttl, 60, flags),
                outer=outer, encapsulation="udp" if outer else None, tcp_seq=seq, tcp_ack=ack)


def test_classify_tcp_by_sequence_numbers_whatever_nat_did():
    mark = ProbeMark("tcp", isn=1000)
    assert trace.classify(tcp(0, "10.244.1.2", 5, "10.244.2.2", 80, "S", 1000), mark) == "forward"
    assert trace.classify(tcp(0, "10.96.0.10", 80, "10.244.1.2", 5, "S.", 7, 1001), mark) == "reply"
    assert trace.classify(tcp(0, "10.96.0.10", 80, "10.244.1.2", 5, "R.", 0, 1001), mark) == "reply"
    assert trace.classify(tcp(0, "10.244.1.2", 5, "10.244.2.2", 80, "S", 999), mark) is None
    assert trace.classify(tcp(0, "10.244.1.2", 5, "10.244.2.2", 80, ".", 1001, 8), mark) is None


def test_split_udp_tells_echoed_reply_by_its_ports():
    mark = ProbeMark("udp", token=b"tok")
    fwd = Seen(1.0, IPHeader("10.244.1.2", "10.244.2.2", "UDP", 4000, 53, 64, 40), has_token=True)
    back = Seen(2.0, IPHeader("10.244.2.2", "10.244.1.2", "UDP", 53, 4000, 64, 40), has_token=True)
    err = Seen(3.0, IPHeader("10.244.2.2", "10.244.1.2", "ICMP", None, None, 64, 68, "dest-unreach"),
               icmp_type=3, has_token=True)
    other = Seen(0.5, IPHeader("10.244.1.2", "10.244.2.2", "UDP", 4001, 53, 64, 40))
    assert trace.split([err, back, other, fwd], mark) == ([fwd], [back, err])


def test_assign_gives_repeated_points_their_packets_in_order():
    p_eth = Point("c-node-n1", "eth0")
    steps = [Step(Point("c-client", "eth0"), "client"), Step(p_eth, "node n1"),
             Step(Point("c-node-n1", "flannel0"), "node n1"), Step(p_eth, "node n1", encapsulated=True)]
    plain = tcp(1, "172.30.0.254", 5, "172.30.0.1", 30080, "S", 1)
    enc = tcp(2, "172.30.0.1", 5, "10.244.2.2", 8080, "S", 1,
              outer=IPHeader("172.30.0.1", "172.30.0.2", "UDP", 8285, 8285, 64, 80))
    hops = trace.assign(steps, {p_eth: [enc, plain]})
    assert [h.seen for h in hops] == [[], [plain], [], [enc]]
    # a retransmission goes to the last step of its kind rather than being lost
    again = tcp(3, "172.30.0.254", 5, "172.30.0.1", 30080, "S", 1)
    hops = trace.assign(steps[:2], {p_eth: [plain, again]})
    assert hops[1].seen == [plain, again]


def test_choose_path_prefers_the_plan_that_reached_its_end():
    v = make_view("udp", [SVC], [EPS])
    _, plans = trace.plan(v, "a", trace.resolve_destination(v, "web", None, "tcp"))
    seen = tcp(1, "10.244.1.2", 5, "10.244.1.3", 8080, "S", 1)
    forward = {s.point: [seen] for s in plans["c2"]}
    assert trace.choose_path(plans, forward) == "c2"


def test_changes_show_dnat_masquerade_encapsulation_and_ttl():
    a = tcp(1, "10.244.1.2", 5, "10.96.0.10", 80, "S", 1, ttl=64)
    b = tcp(2, "172.30.0.1", 7, "10.244.2.2", 8080, "S", 1, ttl=63,
            outer=IPHeader("172.30.0.1", "172.30.0.2", "UDP", 8285, 8285, 64, 80))
    notes = trace.changes(a, b)
    assert notes == ["DNAT 10.96.0.10:80 -> 10.244.2.2:8080", "SNAT 10.244.1.2:5 -> 172.30.0.1:7",
                     "encapsulated in UDP/flannel 172.30.0.1:8285 > 172.30.0.2:8285", "ttl 64 -> 63"]
    c = tcp(3, "172.30.0.1", 7, "10.244.2.2", 8080, "S", 1, ttl=62)
    assert trace.changes(b, c) == ["decapsulated", "ttl 63 -> 62"]


def test_format_trace_lists_hops_in_order_and_unseen_ones():
    v = make_view()
    dest = trace.resolve_destination(v, "b", 80, "tcp")
    steps = trace.plan_pod_to_pod(v, v.pod("a"), v.pod("b"))
    fwd = [Hop(s, [tcp(i, "10.244.1.2", 5, "10.244.2.2", 80, "S", 1, ttl=64 - i // 3)] if i < 4 else [])
           for i, s in enumerate(steps)]
    r = trace.TraceResult("a", dest, "udp", "TCP SYN from 10.244.1.2:5", "no answer", "b", fwd,
                          [Hop(s, []) for s in reversed(steps)])
    text = trace.format_trace(r)
    lines = text.splitlines()
    assert lines[0] == "trace a -> pod b 10.244.2.2 (TCP:80), backend udp"
    assert "forward (4/10 hops saw the probe):" in lines
    assert "reply: not seen at any hop" in lines
    numbers = [m.group(1) for m in map(re.compile(r"^\s+(\d+)  ").match, lines) if m]
    assert numbers == [str(i) for i in range(1, 11)]
    assert "ttl 64 -> 63" in text and "- not seen" in text
    assert not r.reached


# --- DNAT rules in listings --------------------------------------------------------

NFT_LISTING = """table ip kube-proxy { # handle 5
	map service-ips { # handle 9
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
		elements = { 10.96.0.10 . tcp . 80 comment "default/web:http cluster IP" : goto service-ABCDEFGH-default/web/tcp/http,
			     10.96.0.11 . tcp . 80 : goto service-ZZZZZZZZ-default/other/tcp/ }
	}
	chain service-ABCDEFGH-default/web/tcp/http { # handle 20
		ip daddr 10.96.0.10 tcp dport 80 ip saddr != 10.244.0.0/16 jump mark-for-masquerade # handle 21
		numgen random mod 2 vmap { 0 : goto endpoint-AAAA1111-default/web/tcp/http__10.244.1.3/8080, 1 : goto endpoint-BBBB2222-default/web/tcp/http__10.244.2.2/8080 } # handle 22
	}
	chain endpoint-AAAA1111-default/web/tcp/http__10.244.1.3/8080 { # handle 23
		ip saddr 10.244.1.3 jump mark-for-masquerade # handle 24
		meta l4proto tcp dnat to 10.244.1.3:8080 # handle 25
	}
	chain endpoint-BBBB2222-default/web/tcp/http__10.244.2.2/8080 { # handle 26
		ip saddr 10.244.2.2 jump mark-for-masquerade # handle 27
		meta l4proto tcp dnat to 10.244.2.2:8080 # handle 28
	}
}
"""


def test_find_nft_rule_names_map_element_and_endpoint_chain():
    rule = trace.find_nft_rule(NFT_LISTING, "10.96.0.10", "tcp", 80, "10.244.2.2:8080")
    assert "10.96.0.10 . tcp . 80 -> chain service-ABCDEFGH-default/web/tcp/http" in rule
    assert "chain endpoint-BBBB2222-default/web/tcp/http__10.244.2.2/8080: " \
           "meta l4proto tcp dnat to 10.244.2.2:8080 # handle 28" in rule
    assert trace.find_nft_rule(NFT_LISTING, "10.96.0.99", "tcp", 80, "10.9.9.9:1") is None


IPT_SAVE = """*nat
:KUBE-SERVICES - [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-SEP-ONE - [0:0]
:KUBE-SEP-TWO - [0:0]
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-ABC
-A KUBE-SVC-ABC ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-ABC -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-ONE
-A KUBE-SVC-ABC -j KUBE-SEP-TWO
-A KUBE-SEP-ONE -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination 10.244.1.3:8080
-A KUBE-SEP-TWO -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination 10.244.2.2:8080
COMMIT
"""


def test_find_iptables_rule_names_service_and_sep_chains():
    rule = trace.find_iptables_rule(IPT_SAVE, "10.96.0.10", "tcp", 80, "10.244.2.2:8080")
    assert "-j KUBE-SVC-ABC" in rule and "-A KUBE-SEP-TWO" in rule and "KUBE-SEP-ONE" not in rule
    assert trace.find_iptables_rule(IPT_SAVE, "10.96.0.77", "tcp", 81, "10.1.1.1:1") is None
