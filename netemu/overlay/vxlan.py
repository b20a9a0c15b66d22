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

Unlike flannel, whose VXLAN port takes datagrams from anyone on the underlay
(the kernel decapsulates whatever arrives), we accept VXLAN only from peer
nodes: an nftables table in the node's namespace (FILTER_TABLE) drops UDP/8472
from any source not in its set of peers' underlay addresses, kept in step with
the leases by add_peer/remove_peer, and counts the drops (drop_unknown_source).
The set changes once per batch of lease events (flush_peers: one nft
transaction), not once per peer: at 100 nodes an nft process per peer was
9,900 processes during `up`.
"""

from __future__ import annotations

import errno
import json
import os
import subprocess
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
FILTER_TABLE = "netemu-vxlan"          # nft table (family ip) in the node's namespace
UNKNOWN_SOURCE_COUNTER = "unknown-source"


def filter_ruleset(port: int, peers=()) -> str:
    """The nft transaction that (re)creates FILTER_TABLE with the set `peers`
    holding PEERS (underlay addresses): VXLAN datagrams to PORT from a source
    outside the set are counted and dropped. Replacing the table (add, delete,
    create: one transaction) leaves no moment without the rule."""
    elements = f"    elements = {{ {', '.join(sorted(peers))} }}\n" if peers else ""
    return (f"add table ip {FILTER_TABLE}\n"
            f"delete table ip {FILTER_TABLE}\n"
            f"table ip {FILTER_TABLE} {{\n"
            f"  set peers {{\n    type ipv4_addr\n"
            f"    comment \"netemu overlay: underlay addresses of the nodes that hold a vxlan lease\"\n"
            f"{elements}  }}\n"
            f"  counter {UNKNOWN_SOURCE_COUNTER} {{\n"
            f"    comment \"netemu overlay: VXLAN datagrams from a non-peer, dropped\"\n  }}\n"
            f"  chain input {{\n    type filter hook input priority filter; policy accept;\n"
            f"    udp dport {port} ip saddr != @peers counter name \"{UNKNOWN_SOURCE_COUNTER}\" drop "
            f"comment \"netemu overlay: VXLAN only from peer nodes (leases)\"\n  }}\n"
            f"}}\n")


def nft(script: str) -> str:
    """Run an nft script in our namespace (the daemon's); its output."""
    proc = subprocess.run(["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"nft: {proc.stderr.strip()}")
    return proc.stdout


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
        self._counts = {"peers": 0, "peers_ignored": 0}
        # subnet -> (VtepMAC, underlay address) as programmed, to undo exactly that.
        self._peers: dict[IPv4Network, tuple[str, str]] = {}
        self._filtering = False                 # FILTER_TABLE is ours (setup made it)
        self._last_dropped = 0
        self._in_filter: set[str] = set()       # the addresses the filter's set holds
        self._filter_wanted: dict[str, bool] = {}   # address -> in the set or not, at the next flush

    gauges = frozenset({"peers", "peers_ignored"})   # both recomputed from the leases on start

    @property
    def counters(self) -> dict[str, int]:
        return {**self._counts, "drop_unknown_source": self._dropped()}

    @counters.setter
    def counters(self, value: dict[str, int]) -> None:
        self._counts = dict(value)

    def _dropped(self) -> int:
        """The filter's count of VXLAN datagrams from non-peers (0 before setup;
        the last figure read if nft cannot say now: a counter never goes down)."""
        if not self._filtering:
            return self._last_dropped
        proc = subprocess.run(["nft", "-j", "list", "counter", "ip", FILTER_TABLE, UNKNOWN_SOURCE_COUNTER],
                              capture_output=True, text=True, timeout=10)
        try:
            for item in json.loads(proc.stdout)["nftables"]:
                if "counter" in item:
                    self._last_dropped = max(self._last_dropped, int(item["counter"]["packets"]))
        except (ValueError, KeyError, TypeError):
            pass
        return self._last_dropped

    def _allowed(self) -> set[str]:
        """The addresses in the filter's set now (none when there is no table)."""
        proc = subprocess.run(["nft", "-j", "list", "set", "ip", FILTER_TABLE, "peers"],
                              capture_output=True, text=True, timeout=10)
        if proc.returncode != 0:
            return set()
        try:
            return {str(e) for item in json.loads(proc.stdout)["nftables"] if "set" in item
                    for e in item["set"].get("elem", []) if isinstance(e, str)}
        except (ValueError, KeyError, TypeError):
            return set()

    def peers_synced(self) -> None:
        self.flush_peers()
        stale = self._allowed() - {ip for _mac, ip in self._peers.values()}
        if stale:
            nft(f"delete element ip {FILTER_TABLE} peers {{ {', '.join(sorted(stale))} }}\n")
            self._in_filter -= stale

    def _allow(self, address: str, allowed: bool) -> None:
        """Let ADDRESS in at the next flush_peers, or take it out then when no
        peer has it any more."""
        if not self._filtering:
            return                              # before setup: setup's table starts empty, add_peer fills it
        if allowed or all(ip != address for _mac, ip in self._peers.values()):
            self._filter_wanted[address] = allowed

    def flush_peers(self) -> None:
        """The filter's set as add_peer and remove_peer left it: one nft
        transaction for every change since the last flush (an element is
        deleted only if the set holds it: nft refuses the whole transaction
        for one that is missing)."""
        self._close_netlink()
        wanted, self._filter_wanted = self._filter_wanted, {}
        if not self._filtering or not wanted:
            return
        add = sorted(a for a, allowed in wanted.items() if allowed and a not in self._in_filter)
        delete = sorted(a for a, allowed in wanted.items() if not allowed and a in self._in_filter)
        script = "".join(f"{verb} element ip {FILTER_TABLE} peers {{ {', '.join(addresses)} }}\n"
                         for verb, addresses in (("add", add), ("delete", delete)) if addresses)
        if script:
            nft(script)
            self._in_filter.update(add)
            self._in_filter.difference_update(delete)

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
        # A daemon before us (killed) may have left the table: its peers stay let
        # in until the leases have been read again (peers_synced), so that a
        # restart drops nothing of theirs.
        kept = self._allowed() | {ip for _mac, ip in self._peers.values()}
        nft(filter_ruleset(self.port, kept))
        self._filtering = True
        self._in_filter = set(kept)
        self._filter_wanted.clear()

    # -- peers ----------------------------------------------------------------

    def add_peer(self, lease: Lease) -> None:
        if self.lease is not None and lease.subnet == self.lease.subnet:
            return
        mac = lease.backend_data.get("VtepMAC")
        if lease.backend_type != self.name or not mac:
            # flannel logs "ignoring non-vxlan subnet" and goes on.
            self._counts["peers_ignored"] += 1
            return
        mac = str(mac).lower()
        public_ip = str(lease.public_ip)
        gateway = str(lease.subnet.network_address)
        ipr = self._netlink()
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
        self._counts["peers"] = len(self._peers)
        if old is not None and old[1] != public_ip:
            self._allow(old[1], False)
        self._allow(public_ip, True)

    def remove_peer(self, lease: Lease) -> None:
        entry = self._peers.pop(lease.subnet, None)
        if entry is None:
            return
        mac, public_ip = entry
        gateway = str(lease.subnet.network_address)
        ipr = self._netlink()
        found = ipr.link_lookup(ifname=self.device)
        if found:
            index = found[0]
            _ignore_missing(ipr.route, "del", dst=str(lease.subnet), gateway=gateway, oif=index)
            _ignore_missing(ipr.neigh, "del", ifindex=index, dst=gateway)
            _ignore_missing(ipr.fdb, "del", ifindex=index, lladdr=mac, dst=public_ip)
        self._counts["peers"] = len(self._peers)
        self._allow(public_ip, False)

    def teardown(self) -> None:
        """Delete flannel.<VNI>; its routes, neighbours and FDB entries go with it."""
        from pyroute2 import IPRoute

        self._close_netlink()
        with IPRoute() as ipr:
            found = ipr.link_lookup(ifname=self.device)
            if found:
                _ignore_missing(ipr.link, "del", index=found[0])
        if self._filtering:
            self._filtering = False
            subprocess.run(["nft", "delete", "table", "ip", FILTER_TABLE], capture_output=True, timeout=30)
        self._in_filter.clear()
        self._filter_wanted.clear()
        self._peers.clear()
        self._counts["peers"] = 0
