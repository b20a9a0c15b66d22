"""The service proxy's rules doing real DNAT, in both modes (root; namespaces hs-*).

Topology (all namespaces created here, deleted at the end):

    hs-ep1..hs-ep4, hs-pod  --veth--  [cni0 10.244.1.1/24]  hs-node  eth1 172.30.0.10 --veth-- hs-client 172.30.0.100

The endpoint "pods" answer their own name on TCP 8080 and UDP 5353. Their
listening sockets are opened inside each pod namespace but served by one thread
of the test process (a socket stays in the namespace it was created in).
"""

import os
import selectors
import socket
import threading

import pytest

from netemu import netns
from netemu.proxy import libnft
from netemu.proxy.proxier import make_proxier

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

NODE, POD, CLIENT = "hs-node", "hs-pod", "hs-client"
EPS = [f"hs-ep{i}" for i in range(1, 5)]
EP_IP = {name: f"10.244.1.1{i}" for i, name in enumerate(EPS, 1)}
POD_IP, NODE_IP, CLIENT_IP, LB_IP = "10.244.1.20", "172.30.0.10", "172.30.0.100", "172.30.0.200"
CIDR = "10.244.0.0/16"
ALL_NS = [NODE, POD, CLIENT, *EPS]
CHI2_CRITICAL_3DF = 16.27   # p = 0.001


def svc(name, cip, ports, type="ClusterIP", affinity=False, lb=()):
    s = {"metadata": {"name": name, "namespace": "default"},
         "spec": {"type": type, "clusterIP": cip, "ports": ports,
                  "sessionAffinity": "ClientIP" if affinity else "None",
                  "externalTrafficPolicy": "Cluster"},
         "status": {"loadBalancer": {"ingress": [{"ip": i} for i in lb]}}}
    if affinity:
        s["spec"]["sessionAffinityConfig"] = {"clientIP": {"timeoutSeconds": 10800}}
    return s


def eps(name, pods, port, proto="TCP", pname="p"):
    return {"metadata": {"name": name, "namespace": "default"},
            "subsets": [{"addresses": [{"ip": EP_IP[p], "nodeName": NODE,
                                        "targetRef": {"kind": "Pod", "name": p, "namespace": "default"}}
                                       for p in pods],
                         "ports": [{"name": pname, "port": port, "protocol": proto}]}] if pods else []}


TCP_PORT = [{"name": "p", "protocol": "TCP", "port": 80, "targetPort": 8080}]
SERVICES = [
    svc("web", "10.96.0.10", [dict(TCP_PORT[0], nodePort=30080)], type="LoadBalancer", lb=[LB_IP]),
    svc("sticky", "10.96.0.11", TCP_PORT, affinity=True),
    svc("empty", "10.96.0.12", TCP_PORT),
    svc("self", "10.96.0.13", TCP_PORT),
    svc("dns", "10.96.0.53", [{"name": "p", "protocol": "UDP", "port": 53, "targetPort": 5353}]),
]


def endpoints(web=EPS, dns=EPS[:2]):
    return [eps("web", web, 8080), eps("sticky", EPS, 8080), eps("empty", [], 8080),
            eps("self", ["hs-ep1"], 8080), eps("dns", dns, 5353, "UDP")]


# -- topology ----------------------------------------------------------------------

class NameServers:
    """One thread answering, for every endpoint pod, its name on TCP 8080 and UDP 5353."""

    def __init__(self):
        self.sel = selectors.DefaultSelector()
        self.stop_r, self.stop_w = os.pipe()
        self.sel.register(self.stop_r, selectors.EVENT_READ, None)
        self.socks = []
        for pod in EPS:
            with netns.inside(pod):
                t = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                t.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                t.bind(("0.0.0.0", 8080))
                t.listen(512)
                u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
                u.bind(("0.0.0.0", 5353))
            for s, kind in ((t, "tcp"), (u, "udp")):
                s.setblocking(False)
                self.sel.register(s, selectors.EVENT_READ, (kind, pod.encode()))
                self.socks.append(s)
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()

    def _loop(self):
        while True:
            for key, _ in self.sel.select():
                if key.data is None:
                    return
                kind, name = key.data
                try:
                    if kind == "tcp":
                        conn, _ = key.fileobj.accept()
                        conn.setblocking(True)
                        conn.sendall(name)
                        conn.close()
                    else:
                        _, addr = key.fileobj.recvfrom(2048)
                        key.fileobj.sendto(name, addr)
                except (BlockingIOError, ConnectionError):
                    pass

    def close(self):
        os.write(self.stop_w, b"x")
        self.thread.join(5)
        for s in self.socks:
            s.close()
        os.close(self.stop_r)
        os.close(self.stop_w)


def _delete_all():
    for ns in ALL_NS:
        netns.delete(ns)


@pytest.fixture(scope="module")
def topology():
    _delete_all()   # leftovers of an interrupted run (our prefix only)
    servers = None
    try:
        for ns in ALL_NS:
            netns.create(ns)
        lines = ["link set lo up", "link add cni0 type bridge", "addr add 10.244.1.1/24 dev cni0",
                 "link set cni0 up"]
        for i, pod in enumerate([*EPS, POD]):
            port = f"vp{i}"
            # hairpin: a pod reaching itself through a service comes back out of its own port
            lines += [f"link add {port} type veth peer name eth0 netns {pod}",
                      f"link set {port} master cni0", f"link set {port} type bridge_slave hairpin on",
                      f"link set {port} up"]
        lines += [f"link add eth1 type veth peer name eth0 netns {CLIENT}",
                  f"addr add {NODE_IP}/24 dev eth1", "link set eth1 up",
                  # a node has a default route; without one, its own connections to a
                  # cluster IP fail routing before nat-output can DNAT them
                  "route add default via 172.30.0.1"]
        netns.ip_batch(NODE, lines)
        netns.write_sysctl(NODE, "net.ipv4.ip_forward", 1)
        for pod, ip in [*EP_IP.items(), (POD, POD_IP)]:
            netns.ip_batch(pod, ["link set lo up", f"addr add {ip}/24 dev eth0", "link set eth0 up",
                                 "route add default via 10.244.1.1"])
        # The "cloud load balancer": the client reaches the LB address through the node.
        netns.ip_batch(CLIENT, ["link set lo up", f"addr add {CLIENT_IP}/24 dev eth0", "link set eth0 up",
                                f"route add {LB_IP}/32 via {NODE_IP}"])
        servers = NameServers()
        yield
    finally:
        if servers:
            servers.close()
        _delete_all()


class Proxy:
    """A proxier living in hs-node, driven from the test thread."""

    def __init__(self, mode):
        self.mode = mode
        with netns.inside(NODE):
            self.p = make_proxier(mode, NODE, [NODE_IP], CIDR)

    def sync(self, eps_list=None):
        with netns.inside(NODE):
            return self.p.sync(SERVICES, eps_list if eps_list is not None else endpoints())

    def cleanup(self):
        with netns.inside(NODE):
            self.p.cleanup()
        self.p.close()


@pytest.fixture(params=["nftables", "iptables"])
def proxy(request, topology):
    px = Proxy(request.param)
    try:
        px.sync()
        yield px
    finally:
        px.cleanup()
        netns.run(NODE, ["conntrack", "-F"], check=False)


def ask_tcp(ns, ip, port, n=1):
    names = []
    with netns.inside(ns):
        for _ in range(n):
            with socket.create_connection((ip, port), timeout=3) as s:
                names.append(s.recv(64).decode())
    return names


def count(names):
    return {p: names.count(p) for p in EPS}


# -- tests ---------------------------------------------------------------------------

@pytest.mark.timeout(120)
def test_clusterip_from_pod_spreads_uniformly(proxy):
    names = ask_tcp(POD, "10.96.0.10", 80, 1000)
    counts = count(names)
    assert sum(counts.values()) == 1000
    chi2 = sum((c - 250) ** 2 / 250 for c in counts.values())
    assert chi2 < CHI2_CRITICAL_3DF, counts


@pytest.mark.timeout(60)
def test_nodeport_and_loadbalancer_from_client(proxy):
    assert set(ask_tcp(CLIENT, NODE_IP, 30080, 20)) <= set(EPS)
    assert set(ask_tcp(CLIENT, LB_IP, 80, 20)) <= set(EPS)
    assert len(set(ask_tcp(CLIENT, NODE_IP, 30080, 40))) > 1


@pytest.mark.timeout(60)
def test_clusterip_from_the_node_itself(proxy):
    assert set(ask_tcp(NODE, "10.96.0.10", 80, 10)) <= set(EPS)


@pytest.mark.timeout(60)
def test_client_ip_affinity_sends_all_to_one(proxy):
    assert len(set(ask_tcp(POD, "10.96.0.11", 80, 50))) == 1


@pytest.mark.timeout(60)
def test_hairpin_pod_reaches_itself_through_its_service(proxy):
    assert ask_tcp("hs-ep1", "10.96.0.13", 80, 3) == ["hs-ep1"] * 3


@pytest.mark.timeout(60)
def test_removing_an_endpoint_takes_it_out(proxy):
    result = proxy.sync(endpoints(web=EPS[:3]))
    assert not result.full and result.applied
    counts = count(ask_tcp(POD, "10.96.0.10", 80, 150))
    assert counts["hs-ep4"] == 0 and all(counts[p] > 0 for p in EPS[:3])
    assert not proxy.sync(endpoints(web=EPS[:3])).applied   # nothing changed, nothing sent


@pytest.mark.timeout(60)
def test_changed_objects_alone_are_rewritten(proxy):
    """The daemon's path: only the changed Endpoints are handed over."""
    with netns.inside(NODE):
        result = proxy.p.sync_changes(endpoints={("default", "web"): eps("web", EPS[:2], 8080)})
    assert not result.full and result.applied and result.changed_services == 1
    assert set(ask_tcp(POD, "10.96.0.10", 80, 60)) == set(EPS[:2])
    assert set(ask_tcp(POD, "10.96.0.11", 80, 5)) <= set(EPS)      # others untouched
    with netns.inside(NODE):                                          # Endpoints deleted
        result = proxy.p.sync_changes(endpoints={("default", "self"): None})
    assert result.changed_services == 1
    with pytest.raises(ConnectionRefusedError):
        ask_tcp(POD, "10.96.0.13", 80)


@pytest.mark.timeout(60)
def test_full_lists_are_compared_by_resource_version(proxy):
    def versioned(objs, rv):
        out = []
        for o in objs:
            o = dict(o, metadata=dict(o["metadata"], resourceVersion=str(rv)))
            out.append(o)
        return out
    with netns.inside(NODE):
        first = proxy.p.sync(versioned(SERVICES, 5), versioned(endpoints(), 5))
        assert first.changed_services == len(SERVICES)        # new versions of every object
        # Same resourceVersions: the content is not looked at, as an informer would not.
        same_rv = proxy.p.sync(versioned(SERVICES, 5), versioned(endpoints(web=EPS[:1]), 5))
        assert same_rv.changed_services == 0
        moved = proxy.p.sync(versioned(SERVICES, 5), versioned(endpoints(web=EPS[:1]), 6))
        assert moved.changed_services == len(SERVICES) and not moved.full
    assert set(ask_tcp(POD, "10.96.0.10", 80, 20)) == {EPS[0]}


@pytest.mark.timeout(30)
def test_service_without_endpoints_refuses(proxy):
    with pytest.raises(ConnectionRefusedError):
        ask_tcp(POD, "10.96.0.12", 80)


@pytest.mark.timeout(30)
def test_udp_client_moves_to_new_endpoint_after_removal(proxy):
    with netns.inside(POD):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.settimeout(3)
        s.sendto(b"?", ("10.96.0.53", 53))
        first = s.recv(64).decode()
        s.sendto(b"?", ("10.96.0.53", 53))
        assert s.recv(64).decode() == first             # same conntrack entry
        remaining = [p for p in EPS[:2] if p != first]
        result = proxy.sync(endpoints(dns=remaining))
        assert result.conntrack.deleted == 1            # this flow's entry, over netlink
        s.sendto(b"?", ("10.96.0.53", 53))
        assert s.recv(64).decode() == remaining[0]
    finally:
        s.close()


@pytest.mark.timeout(60)
def test_fresh_proxier_over_existing_rules_does_not_duplicate(proxy):
    again = Proxy(proxy.mode)
    assert again.sync().full
    if proxy.mode == "iptables":
        saved = netns.run(NODE, ["iptables-save", "-t", "nat"]).stdout
        assert saved.count("-A PREROUTING -m comment --comment \"kubernetes service portals\"") == 1
    else:
        tables = netns.run(NODE, ["nft", "list", "tables"]).stdout.split("\n")
        assert tables.count("table ip kube-proxy") == 1
    assert set(ask_tcp(POD, "10.96.0.10", 80, 10)) <= set(EPS)


@pytest.mark.timeout(60)
def test_cleanup_removes_everything(topology):
    for mode in ("nftables", "iptables"):
        px = Proxy(mode)
        px.sync()
        px.cleanup()
    assert "kube-proxy" not in netns.run(NODE, ["nft", "list", "tables"]).stdout
    assert "KUBE-" not in netns.run(NODE, ["iptables-save"]).stdout


@pytest.mark.timeout(30)
def test_libnft_context_acts_on_namespace_of_creation():
    a, b = "hs-nft-a", "hs-nft-b"
    if not libnft.available():
        pytest.skip("libnftables not installed")
    try:
        netns.create(a)
        netns.create(b)
        with netns.inside(a):
            ctx = libnft.LibNft()
        with netns.inside(b):              # used from another namespace
            ctx.run("add table ip hs_probe\n")
        ctx.close()
        assert "hs_probe" in netns.run(a, ["nft", "list", "tables"]).stdout
        assert "hs_probe" not in netns.run(b, ["nft", "list", "tables"]).stdout
        with netns.inside(b):
            with pytest.raises(libnft.NftError):
                libnft.LibNft().run("add rule ip nosuch x drop\n")
    finally:
        netns.delete(a)
        netns.delete(b)
