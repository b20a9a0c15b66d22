"""The underlay: a namespace holding one bridge that every node's eth0 plugs into.

This is the datacenter network of the emulated cluster. It has no link to the
machine's own namespace, so nothing emulated can leave the machine. Clients from
"outside the cluster" (the external client, the cloud load balancer) are more
namespaces plugged into the same bridge.
"""

from __future__ import annotations

import ipaddress

from netemu import journal, names, netns
from netemu.impairment import Impairment
from netemu.link import End, Link


def create(cluster: str, mtu: int) -> str:
    ns = names.fabric_ns(cluster)
    journal.create_netns(cluster, ns)
    netns.ip_batch(ns, [
        "link set lo up",
        f"link add {names.FABRIC_BRIDGE} mtu {mtu} type bridge stp_state 0 forward_delay 0",
        f"link set {names.FABRIC_BRIDGE} up",
    ])
    # Bridged frames must not be run through the fabric's own netfilter.
    netns.write_sysctl(ns, "net.bridge.bridge-nf-call-iptables", 0)
    return ns


def uplink(cluster: str, host_ns: str, port: str, mtu: int, iface: str = names.NODE_UPLINK,
           address: ipaddress.IPv4Interface | None = None, tso: bool = True,
           impairment: Impairment | None = None) -> Link:
    """The link that connects HOST_NS to the fabric: a veth pair whose fabric end
    (PORT) joins the bridge and whose other end is IFACE in HOST_NS, with ADDRESS."""
    return Link(near=End(names.fabric_ns(cluster), port), far=End(host_ns, iface), mtu=mtu,
                bridge=names.FABRIC_BRIDGE, far_address=address.with_prefixlen if address else None,
                near_tso=tso, impairment=impairment, cluster=cluster)


def plug(cluster: str, host_ns: str, port: str, address: ipaddress.IPv4Interface | None, mtu: int,
         iface: str = names.NODE_UPLINK, tso: bool = True, impairment: Impairment | None = None) -> Link:
    """Connect HOST_NS to the fabric (see uplink) and bring its lo up."""
    link = uplink(cluster, host_ns, port, mtu, iface, address, tso, impairment)
    link.create(far_before=["link set lo up"])
    return link
