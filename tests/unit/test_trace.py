"""netemu trace's pure parts: targets, path planning, probe correlation, NAT
annotations, text, DNAT rule lookup in ruleset listings. No root, no namespaces."""

import re

import pytest

from netemu.capture import rules, targets, trace
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


def test_plan_same_node_is_bridged_even_with_dnat():
    v = make_view()
    steps = trace.plan_pod_to_pod(v, v.pod("a"), v.pod("c2"))
    assert [s.label for s in steps] == ["pod a eth0", "node n1 vetha", "node n1 docker0",
                                        "node n1 vethc", "pod c2 eth0"]
    assert steps[2].note == trace.BRIDGED_NOTE
    # br_netfilter DNATs inside the bridge, which forwards to the endpoint's port.
    dnat = trace.plan_pod_to_pod(v, v.pod("a"), v.pod("c2"), dnat=True)
    assert [s.label for s in dnat] == [s.label for s in steps]
    assert dnat[2].note == trace.DNAT_BRIDGED_NOTE
    # Across nodes the DNATed packet is routed: docker0 sees it on both nodes.
    cross = trace.plan_pod_to_pod(v, v.pod("a"), v.pod("b"), dnat=True)
    assert [s.note for s in cross if s.point.iface == "docker0"] == ["", ""]


def test_plan_client_to_nodeport_on_another_node_visits_eth0_twice():
    v = make_view("vxlan", [SVC], [EPS])
    steps = trace.plan_client_to_pod(v, "n1", v.pod("b"))
    assert labels(steps)[:4] == [("client eth0", False), ("node n1 eth0", False),
                                 ("node n1 flannel.1", False), ("node n1 eth0", True)]


def test_plan_client_through_load_balancer_visits_its_eth0_twice():
    svc = {**SVC, "spec": {**SVC["spec"], "type": "LoadBalancer"},
           "status": {"loadBalancer": {"ingress": [{"ip": "172.30.0.200"}]}}}
    v = targets.view_from_objects(
        "c", network_config={"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}},
        nodes=[node("n1", "172.30.0.1"), node("n2", "172.30.0.2")],
        pods=[pod("b", "n2", "10.244.2.2"), pod("c2", "n1", "10.244.1.3")], services=[svc], endpoints=[EPS],
        subnets={"n1": "10.244.1.0/24", "n2": "10.244.2.0/24"}, veths={"b": "vethb", "c2": "vethc"},
        client_address="172.30.0.254", lb_address="172.30.0.200", lb_exists=True)
    dest = trace.resolve_destination(v, "172.30.0.200", 80, "tcp")
    assert (dest.kind, dest.address, dest.port) == ("loadbalancer", "172.30.0.200", 80)
    src_ns, routes = trace.plan(v, "client", dest)
    assert src_ns == "c-client" and set(routes) == {"n1/b", "n1/c2", "n2/b", "n2/c2"}
    r = routes["n1/b"]
    assert (r.endpoint.name, r.dnat_node, r.lb_node) == ("b", "n1", "n1")
    assert labels(r.steps)[:6] == [("client eth0", False), ("lb eth0", False), ("lb eth0", False),
                                   ("node n1 eth0", False), ("node n1 flannel0", False), ("node n1 eth0", True)]
    assert [s.label for s in routes["n2/b"].steps][3:] == ["node n2 eth0", "node n2 docker0", "node n2 vethb",
                                                           "pod b eth0"]
    # From a pod, kube-proxy DNATs the external IP on the pod's own node.
    _, routes = trace.plan(v, "c2", dest)
    assert routes["b"].dnat_node == "n1" and routes["b"].lb_node is None
    names = trace.address_names(v)
    assert (names["172.30.0.200"], names["10.244.1.0"], names["10.96.0.10"]) == \
        ("load balancer", "node n1 flannel0", "ClusterIP of default/web")


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
    src_ns, routes = trace.plan(v, "a", trace.resolve_destination(v, "web", None, "tcp"))
    assert src_ns == "c-pod-a" and set(routes) == {"b", "c2"}
    assert {r.dnat_node for r in routes.values()} == {"n1"}
    points = trace.capture_points(routes)
    assert len(points) == len(set(points))
    _, routes = trace.plan(v, "a", trace.resolve_destination(v, "n2:30080", None, "tcp"))
    # a pod on n1 to n2's NodePort: plainly out of n1's eth0, DNATed on n2
    assert [s.label for s in routes["c2"].steps][:6] == [
        "pod a eth0", "node n1 vetha", "node n1 docker0", "node n1 eth0", "node n2 eth0", "node n2 flannel0"]
    assert routes["c2"].dnat_node == "n2"
    with pytest.raises(trace.TraceError):
        trace.plan(v, "client", trace.resolve_destination(v, "web", None, "tcp"))


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
    _, routes = trace.plan(v, "a", trace.resolve_destination(v, "web", None, "tcp"))
    seen = tcp(1, "10.244.1.2", 5, "10.244.1.3", 8080, "S", 1)
    forward = {s.point: [seen] for s in routes["c2"].steps}
    assert trace.choose_path(routes, forward) == "c2"


def test_changes_show_dnat_masquerade_encapsulation_and_ttl():
    a = tcp(1, "10.244.1.2", 5, "10.96.0.10", 80, "S", 1, ttl=64)
    b = tcp(2, "172.30.0.1", 7, "10.244.2.2", 8080, "S", 1, ttl=63,
            outer=IPHeader("172.30.0.1", "172.30.0.2", "UDP", 8285, 8285, 64, 80))
    notes = trace.changes(a, b, owners={"10.244.2.2": "pod b"})
    assert notes == ["DNAT 10.96.0.10:80 -> 10.244.2.2:8080 (pod b)", "SNAT (masquerade) 10.244.1.2:5 -> 172.30.0.1:7",
                     "encapsulated in UDP/flannel 172.30.0.1:8285 > 172.30.0.2:8285", "ttl 64 -> 63"]
    c = tcp(3, "172.30.0.1", 7, "10.244.2.2", 8080, "S", 1, ttl=62)
    assert trace.changes(b, c) == ["decapsulated", "ttl 63 -> 62"]
    # The reply: conntrack restores what the probe was sent to, and who sent it.
    back1 = tcp(4, "10.244.2.2", 8080, "172.30.0.1", 7, "S.", 9, 2)
    back2 = tcp(5, "10.96.0.10", 80, "10.244.1.2", 5, "S.", 9, 2)
    assert trace.changes(back1, back2, reply=True, owners={"10.96.0.10": "ClusterIP of default/web"}) == [
        "destination restored 172.30.0.1:7 -> 10.244.1.2:5 (conntrack undoes the masquerade)",
        "source restored 10.244.2.2:8080 -> 10.96.0.10:80 (ClusterIP of default/web) (conntrack undoes the DNAT)"]


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


# --- DNAT rules in listings (netemu.capture.rules) ------------------------------------

# As `nft list table ip kube-proxy` prints it (nftables 1.0.6): map element comments,
# several elements on one line, `# handle` only with -a.
NFT_LISTING = """table ip kube-proxy {
	comment "rules for kube-proxy"
	map service-ips {
		type ipv4_addr . inet_proto . inet_service : verdict
		comment "ClusterIP, ExternalIP and LoadBalancer IP traffic"
		elements = { 10.96.0.10 . tcp . 80 comment "default/web" : goto service-ABCDEFGH-default/web/tcp/http,
			     172.30.0.200 . tcp . 80 comment "default/web" : goto external-ABCDEFGH-default/web/tcp/http, 10.96.0.11 . tcp . 80 comment "default/other" : goto service-ZZZZZZZZ-default/other/tcp/ }
	}

	map service-nodeports {
		type inet_proto . inet_service : verdict
		comment "NodePort traffic"
		elements = { tcp . 30080 comment "default/web" : goto external-ABCDEFGH-default/web/tcp/http }
	}

	chain services {
		ip daddr . meta l4proto . th dport vmap @service-ips # handle 29
	}

	chain external-ABCDEFGH-default/web/tcp/http {
		jump mark-for-masquerade
		goto service-ABCDEFGH-default/web/tcp/http
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


def test_find_nft_rule_follows_map_element_service_and_endpoint_chains():
    found = rules.find_nft_rule(NFT_LISTING, "10.96.0.10", "tcp", 80, "10.244.2.2:8080")
    assert found == [
        'map service-ips: 10.96.0.10 . tcp . 80 comment "default/web" : goto service-ABCDEFGH-default/web/tcp/http',
        "chain service-ABCDEFGH-default/web/tcp/http: numgen random mod 2 vmap { 0 : goto "
        "endpoint-AAAA1111-default/web/tcp/http__10.244.1.3/8080, 1 : goto "
        "endpoint-BBBB2222-default/web/tcp/http__10.244.2.2/8080 }",
        "chain endpoint-BBBB2222-default/web/tcp/http__10.244.2.2/8080: meta l4proto tcp dnat to 10.244.2.2:8080"]
    assert rules.find_nft_rule(NFT_LISTING, "10.96.0.99", "tcp", 80, "10.9.9.9:1") == []
    # 10.96.0.1 must not match 10.96.0.10's element
    assert rules.find_nft_rule(NFT_LISTING, "10.96.0.1", "tcp", 80, "10.244.2.2:8080") == []


def test_find_nft_rule_nodeport_and_external_ip_go_through_the_external_chain():
    for vip, port, first in ((None, 30080, "map service-nodeports: tcp . 30080"),
                             ("172.30.0.200", 80, "map service-ips: 172.30.0.200 . tcp . 80")):
        found = rules.find_nft_rule(NFT_LISTING, vip, "tcp", port, "10.244.1.3:8080")
        assert found[0].startswith(first)
        assert found[1:3] == ["chain external-ABCDEFGH-default/web/tcp/http: jump mark-for-masquerade",
                              "chain external-ABCDEFGH-default/web/tcp/http: goto service-ABCDEFGH-default/web/tcp/http"]
        assert found[-1].endswith("__10.244.1.3/8080: meta l4proto tcp dnat to 10.244.1.3:8080")


# As `iptables-save -t nat` prints kube-proxy's rules (iptables 1.8.9).
IPT_SAVE = """*nat
:KUBE-SERVICES - [0:0]
:KUBE-NODEPORTS - [0:0]
:KUBE-EXT-ABC - [0:0]
:KUBE-SVC-ABC - [0:0]
:KUBE-SEP-ONE - [0:0]
:KUBE-SEP-TWO - [0:0]
-A KUBE-EXT-ABC -m comment --comment "masquerade traffic for default/web:http external destinations" -j KUBE-MARK-MASQ
-A KUBE-EXT-ABC -j KUBE-SVC-ABC
-A KUBE-NODEPORTS -p tcp -m comment --comment "default/web:http" -m tcp --dport 30080 -j KUBE-EXT-ABC
-A KUBE-SEP-ONE -s 10.244.1.3/32 -m comment --comment "default/web:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-ONE -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination 10.244.1.3:8080
-A KUBE-SEP-TWO -s 10.244.2.2/32 -m comment --comment "default/web:http" -j KUBE-MARK-MASQ
-A KUBE-SEP-TWO -p tcp -m comment --comment "default/web:http" -m tcp -j DNAT --to-destination 10.244.2.2:8080
-A KUBE-SERVICES -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-SVC-ABC
-A KUBE-SERVICES ! -d 127.0.0.0/8 -m comment --comment "kubernetes service nodeports; NOTE: this must be the last rule in this chain" -m addrtype --dst-type LOCAL -j KUBE-NODEPORTS
-A KUBE-SVC-ABC ! -s 10.244.0.0/16 -d 10.96.0.10/32 -p tcp -m comment --comment "default/web:http cluster IP" -m tcp --dport 80 -j KUBE-MARK-MASQ
-A KUBE-SVC-ABC -m comment --comment "default/web:http -> 10.244.1.3:8080" -m statistic --mode random --probability 0.50000000000 -j KUBE-SEP-ONE
-A KUBE-SVC-ABC -m comment --comment "default/web:http -> 10.244.2.2:8080" -j KUBE-SEP-TWO
COMMIT
"""


def test_find_iptables_rule_names_service_svc_and_sep_chains():
    found = rules.find_iptables_rule(IPT_SAVE, "10.96.0.10", "tcp", 80, "10.244.2.2:8080")
    assert [r.split()[1] for r in found] == ["KUBE-SERVICES", "KUBE-SVC-ABC", "KUBE-SEP-TWO"]
    assert '"default/web:http -> 10.244.2.2:8080"' in found[1] and "DNAT --to-destination 10.244.2.2:8080" in found[2]
    assert rules.find_iptables_rule(IPT_SAVE, "10.96.0.77", "tcp", 81, "10.1.1.1:1") == []
    found = rules.find_iptables_rule(IPT_SAVE, None, "tcp", 30080, "10.244.1.3:8080")
    assert [r.split()[1] for r in found] == ["KUBE-NODEPORTS", "KUBE-EXT-ABC", "KUBE-EXT-ABC", "KUBE-SVC-ABC",
                                             "KUBE-SEP-ONE"]


LB_LISTING = """table ip cloud-lb {
	chain lb-0 {
		numgen random mod 2 vmap { 0 : goto lb-0-node-0, 1 : goto lb-0-node-1 } comment "default/web:80"
	}

	chain lb-0-node-0 {
		meta l4proto tcp dnat to 172.30.0.1:30080 comment "default/web:80"
	}

	chain lb-0-node-1 {
		meta l4proto tcp dnat to 172.30.0.2:30080 comment "default/web:80"
	}

	chain prerouting {
		type nat hook prerouting priority dstnat; policy accept;
		ip daddr 172.30.0.200 tcp dport 80 jump lb-0 comment "default/web:80"
	}

	chain postrouting {
		type nat hook postrouting priority srcnat; policy accept;
		ct status dnat masquerade comment "replies come back through the balancer"
	}
}
"""


def test_find_lb_rule_names_the_node_chosen_and_the_masquerade():
    found = rules.find_lb_rule(LB_LISTING, "172.30.0.200", "tcp", 80, "172.30.0.2")
    assert [f.split(":")[0] for f in found] == ["chain prerouting", "chain lb-0", "chain lb-0-node-1",
                                                "chain postrouting"]
    assert "dnat to 172.30.0.2:30080" in found[2] and "masquerade" in found[3]
    assert rules.find_lb_rule(LB_LISTING, "172.30.0.201", "tcp", 80, "172.30.0.2") == []


def test_trace_captures_do_not_make_interfaces_promiscuous():
    # A promiscuous docker0 passes bridged frames up to the node's IP stack too,
    # which delivers same-node Service traffic twice: trace's tcpdumps use -p.
    from netemu.capture import tcpdump
    assert "-p" in tcpdump.tcpdump_argv("docker0", "/x.pcap", "ip", promiscuous=False)
    assert "-p" not in tcpdump.tcpdump_argv("docker0", "/x.pcap", "ip")


def test_plan_pod_to_another_nodes_nodeport_expects_the_reply_through_the_overlay():
    """The probe goes plainly to n2's address; n2 DNATs and masquerades it, so the
    reply returns to n2 and then to pod a's address, which is behind the tunnel."""
    for backend, tunnel in (("udp", "flannel0"), ("vxlan", "flannel.1")):
        v = make_view(backend, [SVC], [EPS])
        _, routes = trace.plan(v, "a", trace.resolve_destination(v, "n2:30080", None, "tcp"))
        assert labels(routes["b"].reply_steps) == [
            ("pod b eth0", False), ("node n2 vethb", False), ("node n2 docker0", False),
            (f"node n2 {tunnel}", False), ("node n2 eth0", True), ("node n1 eth0", True),
            (f"node n1 {tunnel}", False), ("node n1 docker0", False), ("node n1 vetha", False),
            ("pod a eth0", False)]
        # The endpoint on a's own node: n2 sends the probe back to n1 through the
        # tunnel, and the reply goes to n2 and back again the same way.
        assert [s.label for s in routes["c2"].reply_steps][:6] == [
            "pod c2 eth0", "node n1 vethc", "node n1 docker0", f"node n1 {tunnel}", "node n1 eth0",
            "node n2 eth0"]
        assert Point("c-node-n1", tunnel) in trace.capture_points(routes)
    # host-gw routes the reply over the underlay, as the probe went: the same hops.
    v = make_view("host-gw", [SVC], [EPS])
    _, routes = trace.plan(v, "a", trace.resolve_destination(v, "n2:30080", None, "tcp"))
    assert labels(routes["b"].reply_steps) == labels(reversed(routes["b"].steps))
    # A NodePort of the pod's own node, or a ClusterIP: the reply retraces the probe.
    v = make_view("udp", [SVC], [EPS])
    for dest in ("n1:30080", "web"):
        _, routes = trace.plan(v, "a", trace.resolve_destination(v, dest, None, "tcp"))
        assert all(r.reply_steps == tuple(reversed(r.steps)) for r in routes.values())


def test_trace_names_pods_and_services_of_other_namespaces():
    other = {"metadata": {"name": "api", "namespace": "prod"},
             "spec": {"type": "ClusterIP", "clusterIP": "10.96.0.20",
                      "ports": [{"port": 80, "targetPort": 8080, "protocol": "TCP"}]}}
    other_eps = {"metadata": {"name": "api", "namespace": "prod"},
                 "subsets": [{"addresses": [{"ip": "10.244.2.9", "nodeName": "n2"}],
                              "ports": [{"port": 8080, "protocol": "TCP"}]}]}
    job = {"metadata": {"name": "w", "namespace": "prod", "uid": "u-w"}, "spec": {"nodeName": "n2"},
           "status": {"phase": "Running", "podIP": "10.244.2.9"}}
    v = targets.view_from_objects(
        "c", network_config={"Network": "10.244.0.0/16", "Backend": {"Type": "udp"}},
        nodes=[node("n1", "172.30.0.1"), node("n2", "172.30.0.2")],
        pods=[pod("a", "n1", "10.244.1.2"), job], services=[other], endpoints=[other_eps],
        subnets={"n1": "10.244.1.0/24", "n2": "10.244.2.0/24"}, veths={"a": "vetha", "w": "vethw"})
    for word in ("prod/api", "svc/prod/api", "services/prod/api"):
        d = trace.resolve_destination(v, word, None, "tcp")
        assert (d.kind, d.address, d.service.key) == ("service", "10.96.0.20", "prod/api"), word
    assert trace.resolve_destination(v, "api", None, "tcp", namespace="prod").address == "10.96.0.20"
    for word in ("prod/w", "pod/prod/w"):
        d = trace.resolve_destination(v, word, 80, "tcp")
        assert (d.kind, d.address) == ("pod", "10.244.2.9"), word
    with pytest.raises(trace.TraceError, match='"default/api" is not a pod|not a pod, service'):
        trace.resolve_destination(v, "api", None, "tcp")
    # and as the source
    assert trace.split_source("prod/w", "default") == ("prod", "w")
    assert trace.split_source("pod/prod/w", "default") == ("prod", "w")
    assert trace.split_source("pod/a", "x") == ("x", "a")
    src_ns, _ = trace.plan(v, "prod/w", trace.resolve_destination(v, "a", 80, "tcp"))
    assert src_ns == v.pod("w", "prod").netns
