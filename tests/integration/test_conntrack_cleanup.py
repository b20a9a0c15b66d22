"""Stale UDP conntrack entries after a mass endpoint removal (root; namespaces hf-ct-*).

Issue 12 item 9: deleting 29 UDP services with 200 endpoints each ran one
`conntrack -D` per endpoint in series (a sync of two minutes). Here a pod sends
real UDP datagrams to 29 such services, so the node's table holds entries
DNATed to many of the endpoints; then all 29 go at once, as the daemon hands
them over (rules first, conntrack after). Checked: the rules go in without
waiting for conntrack, a service created right after is in the rules within a
second, the clean-up is one dump and no process, every stale entry is gone and
the entries of a service that stays are not.

    hf-ct-pod --veth-- [cni0 10.244.1.1/24] hf-ct-node sink0 10.244.250.1 --veth-- hf-ct-sink

The endpoint addresses (10.244.2.0/23) need not answer: they are routed to a
namespace that drops what it gets, and a datagram DNATed to one has its
conntrack entry confirmed on the way out. (Not on the bridge: a frame the
bridge has to resolve or flood leaves its entry unconfirmed, then gone.)
"""

import os
import socket
import subprocess
import time

import pytest

from netemu import netns
from netemu.proxy.proxier import make_proxier

pytestmark = [pytest.mark.root,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root")]

NODE, POD, SINK = "hf-ct-node", "hf-ct-pod", "hf-ct-sink"
POD_IP, CIDR = "10.244.1.20", "10.244.0.0/16"
SERVICES, ENDPOINTS, FLOWS_PER_SERVICE = 29, 200, 30
EP_IPS = [f"10.244.{2 + j // 250}.{j % 250 + 1}" for j in range(ENDPOINTS)]   # routed via cni0
UDP = [{"name": "dns", "protocol": "UDP", "port": 53, "targetPort": 5353}]
UDP_EP = [{"name": "dns", "port": 5353, "protocol": "UDP"}]


def svc(name, cip):
    return {"metadata": {"name": name, "namespace": "default"},
            "spec": {"type": "ClusterIP", "clusterIP": cip, "ports": UDP, "sessionAffinity": "None"}}


def eps(name, ips):
    return {"metadata": {"name": name, "namespace": "default"},
            "subsets": [{"addresses": [{"ip": ip, "nodeName": NODE} for ip in ips], "ports": UDP_EP}]}


def vip(i):
    return f"10.96.1.{i + 1}"


KEEP_VIP = "10.96.2.1"


@pytest.fixture
def node():
    for ns in (NODE, POD, SINK):
        netns.delete(ns)       # leftovers of an interrupted run (our prefix only)
    try:
        for ns in (NODE, POD, SINK):
            netns.create(ns)
        netns.ip_batch(NODE, ["link set lo up", "link add cni0 type bridge",
                              "addr add 10.244.1.1/24 dev cni0", "link set cni0 up",
                              f"link add vp0 type veth peer name eth0 netns {POD}",
                              "link set vp0 master cni0", "link set vp0 up",
                              f"link add sink0 type veth peer name eth0 netns {SINK}",
                              "addr add 10.244.250.1/30 dev sink0", "link set sink0 up",
                              "route add 10.244.2.0/23 via 10.244.250.2"])
        netns.write_sysctl(NODE, "net.ipv4.ip_forward", 1)
        netns.ip_batch(POD, ["link set lo up", f"addr add {POD_IP}/24 dev eth0", "link set eth0 up",
                             "route add default via 10.244.1.1"])
        # ip_forward is 0 here: what is not for the sink itself is dropped
        netns.ip_batch(SINK, ["addr add 10.244.250.2/30 dev eth0", "link set eth0 up"])
        yield
    finally:
        for ns in (POD, SINK, NODE):
            netns.delete(ns)


def send_flows(dst, n, first_port):
    """N UDP flows from the pod to DST:53, from source ports FIRST_PORT.. (chosen,
    not ephemeral: a reused port would be the same flow)."""
    with netns.inside(POD):
        for port in range(first_port, first_port + n):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
                s.bind((POD_IP, port))
                s.sendto(b"?", (dst, 53))


def udp_entries():
    """(orig dst, reply src) of the node's UDP entries, read with the conntrack tool."""
    out = netns.run(NODE, ["conntrack", "-L", "-p", "udp"], check=False).stdout
    entries = []
    for line in out.splitlines():
        fields = [f.split("=", 1) for f in line.split() if "=" in f]
        dsts = [v for k, v in fields if k == "dst"]
        srcs = [v for k, v in fields if k == "src"]
        if len(dsts) == 2 and len(srcs) == 2:
            entries.append((dsts[0], srcs[1]))
    return entries


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["nftables", "iptables"])
def test_mass_udp_endpoint_removal(node, mode, monkeypatch):
    services = {("default", f"u{i}"): svc(f"u{i}", vip(i)) for i in range(SERVICES)}
    services[("default", "keep")] = svc("keep", KEEP_VIP)
    endpoints = {("default", f"u{i}"): eps(f"u{i}", EP_IPS) for i in range(SERVICES)}
    endpoints[("default", "keep")] = eps("keep", EP_IPS[:1])
    with netns.inside(NODE):
        px = make_proxier(mode, NODE, ["172.30.0.10"], CIDR)
    try:
        with netns.inside(NODE):
            px.sync_changes(services, endpoints)
        for i in range(SERVICES):
            send_flows(vip(i), FLOWS_PER_SERVICE, 20000 + i * FLOWS_PER_SERVICE)
        send_flows(KEEP_VIP, 5, 30000)
        before = udp_entries()
        stale = [e for e in before if e[0].startswith("10.96.1.")]
        assert len(stale) == SERVICES * FLOWS_PER_SERVICE
        assert {r for _, r in stale} <= set(EP_IPS) and len({r for _, r in stale}) > 50  # DNATed, spread

        spawned = []
        real_popen = subprocess.Popen.__init__

        def recording_popen(self, args, *a, **kw):
            spawned.append(os.path.basename(str(args[0] if isinstance(args, (list, tuple)) else args)))
            return real_popen(self, args, *a, **kw)
        monkeypatch.setattr(subprocess.Popen, "__init__", recording_popen)

        # All 29 services and their endpoints go in one watch burst; the daemon's
        # way: rules now, conntrack left to its own task.
        t0 = time.perf_counter()
        with netns.inside(NODE):
            gone = {k: None for k in services if k[1] != "keep"}
            result = px.sync_changes(gone, gone, clean_conntrack=False)
            assert result.applied and result.conntrack is None
            assert len(result.stale_flows) == SERVICES * ENDPOINTS
            # A service created right after is in the rules at once.
            new = px.sync_changes({("default", "late"): svc("late", "10.96.3.1")},
                                  {("default", "late"): eps("late", EP_IPS[:1])}, clean_conntrack=False)
            late_in = time.perf_counter() - t0
            dumps_before = px._conntrack.dumps
            cleaned = px.clean_conntrack(result.stale_flows)
        assert new.applied and late_in < 1.0, f"new service in the rules {late_in:.2f} s after the mass delete"
        assert px._conntrack.dumps == dumps_before + 1                   # one dump, not one per endpoint
        assert cleaned.deleted == len(stale) == cleaned.selected
        assert "conntrack" not in spawned, spawned
        monkeypatch.undo()

        after = udp_entries()
        assert not [e for e in after if e[0].startswith("10.96.1.")]
        assert sorted(e for e in after if e[0] == KEEP_VIP) == sorted(e for e in before if e[0] == KEEP_VIP) != []
        rules = netns.run(NODE, ["nft", "list", "ruleset"]).stdout
        assert "10.96.3.1" in rules and "10.96.1.1 " not in rules
        print(f"\n{mode}: {SERVICES}x{ENDPOINTS} UDP endpoints removed: rules {result.rules_seconds:.3f} s, "
              f"next service in {late_in:.3f} s, conntrack {cleaned.seconds:.3f} s "
              f"({cleaned.deleted} entries, {px._conntrack.sends} sends)")
    finally:
        with netns.inside(NODE):
            px.cleanup()
        px.close()
