"""A node's own namespace: its uplink to the fabric, its kernel settings, docker0.

What a freshly installed Kubernetes node has before any pod runs: eth0 on the
datacenter network, IP forwarding on, reverse-path filtering loose (overlay
traffic is asymmetric), and the container bridge docker0 addressed from the
overlay's subnet.env, exactly as Docker configures it from --bip and --mtu.
"""

from __future__ import annotations

import ipaddress

from netemu import fabric, journal, names, netns
from netemu.impairment import Impairment
from netemu.overlay.subnetenv import SubnetEnv


def uplink(cluster: str, node: str, mtu: int):
    """The node's uplink as a Link (to impair it, or read it back, once it exists)."""
    return fabric.uplink(cluster, names.node_ns(cluster, node), names.fabric_port(node), mtu)


def create(cluster: str, node: str, address: ipaddress.IPv4Interface, mtu: int,
           gateway: ipaddress.IPv4Address | None = None, tso: bool = True,
           impairment: Impairment | None = None) -> str:
    """The node's namespace and uplink. TSO: TCP segmentation offload of the
    uplink's fabric port (off for the udp backend, see netemu.link.Link);
    IMPAIRMENT: the uplink's rate, loss, ... (netemu.impairment)."""
    ns = names.node_ns(cluster, node)
    journal.create_netns(cluster, ns)
    fabric.plug(cluster, ns, names.fabric_port(node), address, mtu, tso=tso, impairment=impairment)
    if gateway is not None:
        # A node has a default route, as every real one does; without it the
        # node's own connections to a ClusterIP fail the route lookup that comes
        # before kube-proxy's DNAT. The gateway is the external client: "the
        # rest of the world" of this datacenter, which forwards nothing.
        netns.ip_batch(ns, [f"route add default via {gateway} dev {names.NODE_UPLINK}"])
    for key, value in (("net.ipv4.ip_forward", 1),
                       ("net.ipv4.conf.all.rp_filter", 2),
                       ("net.ipv4.conf.default.rp_filter", 2),
                       (f"net.ipv4.conf.{names.NODE_UPLINK}.rp_filter", 2),
                       # Bridged pod-to-pod traffic goes through netfilter, as on a
                       # real node with br_netfilter loaded (service DNAT needs it).
                       ("net.bridge.bridge-nf-call-iptables", 1)):
        netns.write_sysctl(ns, key, value)
    return ns


def configure_bridge(node_namespace: str, env: SubnetEnv) -> None:
    """Create or re-address docker0 from subnet.env (idempotent). Its MAC is
    Docker's scheme, 02:42:<its ip>, known in advance: every pod gets a
    PERMANENT neighbour entry for it (sandbox.create_network)."""
    from netemu.node.sandbox import docker_mac

    ipr = netns.iproute(node_namespace)
    try:
        idx = ipr.link_lookup(ifname=names.NODE_BRIDGE)
        if not idx:
            ipr.link("add", ifname=names.NODE_BRIDGE, kind="bridge", br_stp_state=0,
                     br_forward_delay=0)
            idx = ipr.link_lookup(ifname=names.NODE_BRIDGE)
        idx = idx[0]
        ipr.link("set", index=idx, mtu=env.mtu, address=docker_mac(env.subnet.ip))
        want = (str(env.subnet.ip), env.subnet.network.prefixlen)
        have = [(a.get_attr("IFA_ADDRESS"), a["prefixlen"]) for a in ipr.get_addr(index=idx, family=2)]
        for addr, plen in have:
            if (addr, plen) != want:
                ipr.addr("del", index=idx, address=addr, prefixlen=plen)
        if want not in have:
            ipr.addr("add", index=idx, address=want[0], prefixlen=want[1])
        ipr.link("set", index=idx, state="up")
    finally:
        ipr.close()
