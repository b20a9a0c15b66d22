"""The `vxlan` backend: the kernel encapsulates, the daemon only programs tables.

As flannel's pkg/backend/vxlan: one VXLAN device `flannel.<VNI>` per node (VNI 1,
UDP port 8472, source address = the node's underlay address, learning off), with
a /32 address equal to the lease's subnet address. For every peer node, three
static entries make the kernel send pod traffic straight to that node:

    route     10.244.2.0/24 via 10.244.2.0 dev flannel.1 onlink
    neighbour 10.244.2.0 lladdr <peer VtepMAC> dev flannel.1 nud permanent
    fdb       <peer VtepMAC> dev flannel.1 dst <peer underlay IP> self permanent

The route's gateway resolves through the neighbour entry to the peer's VTEP MAC,
and the FDB entry maps that MAC to the peer's underlay address. Nothing is
learned or flooded. The device's MAC is published in our lease (VtepMAC), so
the device is created before the lease is written.
"""

from __future__ import annotations

import errno
import os
from typing import Any

from netemu.overlay.backend import Backend, IPv4Network, Lease, LocalConfig, register

DEFAULT_VNI = 1
DEFAULT_PORT = 8472          # Linux's historical VXLAN port, flannel's default
NUD_NOARP = 0x40
NUD_PERMANENT = 0x80
NTF_SELF = 0x02
RTNH_F_ONLINK = 0x04
# What flannel's netlink library puts on its routes (and `ip route` too); pyroute2
# would say "static".
RTPROT_BOOT = 3


def random_vtep_mac() -> str:
    """A random unicast, locally administered MAC (as the kernel would pick)."""
    octets = bytearray(os.urandom(6))
    octets[0] = (octets[0] & 0xFE) | 0x02
    return ":".join(f"{b:02x}" for b in octets)


def _ignore_missing(call, *args, **kwargs) -> None:
    """Run a netlink delete; an entry that is already gone is not an error."""
    from pyroute2.netlink.exceptions import NetlinkError

    try:
        call(*args, **kwargs)
    except NetlinkError as exc:
        if exc.code not in (errno.ENOENT, errno.ESRCH, errno.ENODEV):
            raise


@register
class VxlanBackend(Backend):
    name = "vxlan"
    overhead = 50                # outer Ethernet 14 + IPv4 20 + UDP 8 + VXLAN 8

    def __init__(self, local: LocalConfig):
        super().__init__(local)
        self.vni = int(local.backend_conf.get("VNI", DEFAULT_VNI))
        self.port = int(local.backend_conf.get("Port", DEFAULT_PORT))
        self.device = f"flannel.{self.vni}"
        self.vtep_mac: str | None = None
        self.counters = {"peers": 0, "peers_ignored": 0}
        # subnet -> (VtepMAC, underlay address) as programmed, to undo exactly that.
        self._peers: dict[IPv4Network, tuple[str, str]] = {}

    # -- device ---------------------------------------------------------------

    def _ensure_device(self, ipr) -> int:
        """Create flannel.<VNI> if it is missing or incompatible; return its index.

        A compatible device left by a previous daemon (same VNI, port and local
        address) is kept with its MAC, as flannel does, so peers' FDB entries stay
        valid across a restart.
        """
        found = ipr.link_lookup(ifname=self.device)
        if found:
            link = ipr.get_links(found[0])[0]
            linkinfo = link.get_attr("IFLA_LINKINFO")
            kind = linkinfo.get_attr("IFLA_INFO_KIND") if linkinfo else None
            info = linkinfo.get_attr("IFLA_INFO_DATA") if linkinfo else None
            if (kind == "vxlan" and info is not None
                    and info.get_attr("IFLA_VXLAN_ID") == self.vni
                    and info.get_attr("IFLA_VXLAN_PORT") == self.port
                    and info.get_attr("IFLA_VXLAN_LOCAL") == str(self.local.public_ip)):
                self.vtep_mac = link.get_attr("IFLA_ADDRESS")
                return found[0]
            ipr.link("del", index=found[0])
        if self.vtep_mac is None:
            self.vtep_mac = random_vtep_mac()
        underlay = ipr.link_lookup(ifname=self.local.underlay_dev)[0]
        ipr.link("add", ifname=self.device, kind="vxlan", vxlan_id=self.vni,
                 vxlan_local=str(self.local.public_ip), vxlan_link=underlay,
                 vxlan_port=self.port, vxlan_learning=0, address=self.vtep_mac,
                 mtu=self.mtu())
        return ipr.link_lookup(ifname=self.device)[0]

    def backend_data(self) -> dict[str, Any]:
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            self._ensure_device(ipr)
        return {"VNI": self.vni, "VtepMAC": self.vtep_mac}

    def setup(self, lease: Lease) -> None:
        from pyroute2 import IPRoute
        from pyroute2.netlink.exceptions import NetlinkError

        super().setup(lease)
        with IPRoute() as ipr:
            index = self._ensure_device(ipr)
            ipr.link("set", index=index, mtu=self.mtu())
            try:
                ipr.addr("add", index=index, address=str(lease.subnet.network_address), prefixlen=32)
            except NetlinkError as exc:
                if exc.code != errno.EEXIST:
                    raise
            ipr.link("set", index=index, state="up")

    # -- peers ----------------------------------------------------------------

    def add_peer(self, lease: Lease) -> None:
        from pyroute2 import IPRoute

        if self.lease is not None and lease.subnet == self.lease.subnet:
            return
        mac = lease.backend_data.get("VtepMAC")
        if lease.backend_type != self.name or not mac:
            # flannel logs "ignoring non-vxlan subnet" and goes on.
            self.counters["peers_ignored"] += 1
            return
        mac = str(mac).lower()
        public_ip = str(lease.public_ip)
        gateway = str(lease.subnet.network_address)
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=self.device)[0]
            old = self._peers.get(lease.subnet)
            if old is not None and old != (mac, public_ip):
                _ignore_missing(ipr.fdb, "del", ifindex=index, lladdr=old[0], dst=old[1])
            # Neighbour and FDB first: the route's gateway must resolve at once, or
            # the kernel would try to ARP for it on a device that cannot answer.
            ipr.neigh("replace", ifindex=index, dst=gateway, lladdr=mac, state=NUD_PERMANENT)
            ipr.fdb("replace", ifindex=index, lladdr=mac, dst=public_ip,
                    state=NUD_PERMANENT | NUD_NOARP, flags=NTF_SELF)
            ipr.route("replace", dst=str(lease.subnet), gateway=gateway, oif=index,
                      flags=RTNH_F_ONLINK, proto=RTPROT_BOOT)
        self._peers[lease.subnet] = (mac, public_ip)
        self.counters["peers"] = len(self._peers)

    def remove_peer(self, lease: Lease) -> None:
        from pyroute2 import IPRoute

        entry = self._peers.pop(lease.subnet, None)
        if entry is None:
            return
        mac, public_ip = entry
        gateway = str(lease.subnet.network_address)
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.device)
            if found:
                index = found[0]
                _ignore_missing(ipr.route, "del", dst=str(lease.subnet), gateway=gateway, oif=index)
                _ignore_missing(ipr.neigh, "del", ifindex=index, dst=gateway)
                _ignore_missing(ipr.fdb, "del", ifindex=index, lladdr=mac, dst=public_ip)
        self.counters["peers"] = len(self._peers)

    def teardown(self) -> None:
        """Delete flannel.<VNI>; its routes, neighbours and FDB entries go with it."""
        from pyroute2 import IPRoute

        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.device)
            if found:
                _ignore_missing(ipr.link, "del", index=found[0])
        self._peers.clear()
        self.counters["peers"] = 0
