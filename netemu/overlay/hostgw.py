"""The `host-gw` backend: no encapsulation, one plain route per peer node.

As flannel's pkg/backend/hostgw: for each peer lease,

    ip route replace 10.244.2.0/24 via <peer underlay IP> dev eth0

so pod packets cross the underlay with the pods' own addresses. It only works
when all nodes share one L2 segment (the peer's address must be on-link), which
the emulated fabric guarantees. There is no device of its own and no data path
in userspace.
"""

from __future__ import annotations

import errno

from netemu.overlay.backend import Backend, IPv4Network, Lease, LocalConfig, register


@register
class HostGwBackend(Backend):
    name = "host-gw"
    overhead = 0
    gauges = frozenset({"peers", "peers_ignored"})   # both recomputed from the leases on start

    def __init__(self, local: LocalConfig):
        super().__init__(local)
        self.counters = {"peers": 0, "peers_ignored": 0}
        self._routes: dict[IPv4Network, str] = {}    # subnet -> gateway, as installed

    def add_peer(self, lease: Lease) -> None:
        if self.lease is not None and lease.subnet == self.lease.subnet:
            return
        if lease.backend_type != self.name:
            self.counters["peers_ignored"] += 1      # flannel ignores other types too
            return
        ipr = self._netlink()
        underlay = ipr.link_lookup(ifname=self.local.underlay_dev)[0]
        # proto boot, as flannel's netlink library and `ip route` set it
        # (pyroute2's default would show "proto static").
        ipr.route("replace", dst=str(lease.subnet), gateway=str(lease.public_ip), oif=underlay, proto=3)
        self._routes[lease.subnet] = str(lease.public_ip)
        self.counters["peers"] = len(self._routes)

    def remove_peer(self, lease: Lease) -> None:
        gateway = self._routes.pop(lease.subnet, None)
        if gateway is not None:
            self._delete_route(lease.subnet, gateway)
        self.counters["peers"] = len(self._routes)

    def flush_peers(self) -> None:
        self._close_netlink()                        # the routes are in already

    def teardown(self) -> None:
        for subnet, gateway in list(self._routes.items()):
            self._delete_route(subnet, gateway)
        self._routes.clear()
        self.counters["peers"] = 0
        self._close_netlink()

    def _delete_route(self, subnet: IPv4Network, gateway: str) -> None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            self._netlink().route("del", dst=str(subnet), gateway=gateway)
        except NetlinkError as exc:
            if exc.code not in (errno.ESRCH, errno.ENOENT):
                raise
