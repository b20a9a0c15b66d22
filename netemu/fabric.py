"""The underlay: a namespace holding one bridge that every node's eth0 plugs into.

This is the datacenter network of the emulated cluster. It has no link to the
machine's own namespace, so nothing emulated can leave the machine. Clients from
"outside the cluster" (the external client, the cloud load balancer) are more
namespaces plugged into the same bridge.
"""

from __future__ import annotations

import ipaddress

from netemu import journal, names, netns


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


def plug(cluster: str, host_ns: str, port: str, address: ipaddress.IPv4Interface, mtu: int,
         iface: str = names.NODE_UPLINK) -> None:
    """Connect HOST_NS to the fabric: a veth pair whose fabric end (PORT) joins the
    bridge and whose other end is IFACE in HOST_NS with ADDRESS."""
    fab = names.fabric_ns(cluster)
    netns.ip_batch(fab, [
        # "name" before each interface name: a node called "master" or "up" must
        # not be read as one of ip's keywords.
        f"link add name {port} mtu {mtu} type veth peer name {iface} mtu {mtu} netns {host_ns}",
        f"link set dev {port} master {names.FABRIC_BRIDGE} up",
    ])
    netns.ip_batch(host_ns, [
        "link set lo up",
        f"addr add {address.with_prefixlen} dev {iface}",
        f"link set {iface} up",
    ])


# TCP segmentation offloads of a fabric port (the switch side of a node's link).
TSO_FEATURES = ("tx-tcp-segmentation", "tx-tcp-ecn-segmentation", "tx-tcp-mangleid-segmentation",
                "tx-tcp6-segmentation")


def disable_tso(cluster: str, port: str) -> None:
    """Turn TCP segmentation offload off on a fabric port.

    For the udp backend: a veth hands the receiving side's GRO (and so the
    overlay daemon's UDP GRO socket) merged datagrams only when the sending end
    has TSO off; measured here, this more than doubles the udp backend's TCP
    throughput (0.021x -> 0.048x host-gw). The frames on the wire are the same.
    """
    from pyroute2.ethtool import Ethtool

    with netns.inside(names.fabric_ns(cluster)):
        ethtool = Ethtool()
        try:
            features = ethtool.get_features(port)
            for name in TSO_FEATURES:
                if name in features.features:
                    features.features[name].enable = False
            ethtool.set_features(port, features)
        finally:
            ethtool.close()
