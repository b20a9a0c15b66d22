"""The `udp` backend: flannel's userspace encapsulation through a TUN device.

The kernel routes every packet for the cluster network that is not on this node
(10.244.0.0/16 dev flannel0) into the TUN device flannel0. This backend reads
each one, finds the peer node whose lease holds the destination, and sends the
bare IP packet as the payload of a UDP datagram to that node's underlay address
(port 8285). The peer's backend receives it and writes it into its own flannel0,
from where its kernel delivers it to the pod. Both sides decrement the TTL, as
flannel's C proxy (pkg/backend/udp/proxy_amd64.c) does.

The per-packet decisions live in netemu.overlay.packet; this module holds the
devices, the peer table and the two trio loops (one per direction).
"""

from __future__ import annotations

import errno
import os
import socket

import trio

from netemu.overlay.backend import Backend, IPv4Network, Lease, LocalConfig, register
from netemu.overlay.packet import (RouteTable, decrement_ttl, ipv4_destination, ipv4_problem,
                                   looks_like_ipv4, net_unreachable)
from netemu.overlay.tun import open_tun

DEFAULT_PORT = 8285
DEVICE = "flannel0"
# Large enough for any IPv4 packet: a shorter buffer would truncate silently.
READ_SIZE = 65536

COUNTERS = (
    "tx_packets", "tx_bytes",          # TUN -> UDP, sent to a peer
    "rx_packets", "rx_bytes",          # UDP -> TUN, written for local delivery
    "drop_unknown_source",             # datagram not from a peer node's address
    "drop_malformed",                  # datagram is not one valid IPv4 packet
    "drop_ttl",                        # TTL reached 0 (flannel drops silently)
    "drop_no_route",                   # no peer leases the destination
    "icmp_unreachable_sent",           # ... and we wrote a net unreachable back
    "drop_not_ipv4",                   # TUN handed us something else (IPv6 chatter)
    "tx_errors", "rx_errors",          # socket / TUN errors (peer gone, buffers full)
)


@register
class UdpBackend(Backend):
    name = "udp"
    overhead = 28                      # outer IPv4 header 20 + UDP header 8

    def __init__(self, local: LocalConfig):
        super().__init__(local)
        self.port = int(local.backend_conf.get("Port", DEFAULT_PORT))
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.routes = RouteTable()
        self._peers: dict[IPv4Network, str] = {}     # subnet -> peer's underlay address
        self._known_sources: frozenset[str] = frozenset()
        self._tun_fd: int | None = None
        self._sock: socket.socket | None = None
        self._tun_address = b""                      # flannel0's address, ICMP errors' source

    # -- control plane -------------------------------------------------------

    def setup(self, lease: Lease) -> None:
        """Create flannel0 and bind the UDP socket (fails early if the port is taken)."""
        from pyroute2 import IPRoute

        super().setup(lease)
        address = lease.subnet.network_address
        self._tun_address = address.packed
        self._tun_fd = open_tun(DEVICE)
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=DEVICE)[0]
            ipr.link("set", index=index, mtu=self.mtu())
            # The lease's address with the whole network's prefix: bringing the
            # device up makes the kernel add the route 10.244.0.0/16 dev flannel0,
            # while docker0's narrower /24 keeps local pods local.
            ipr.addr("add", index=index, address=str(address), prefixlen=self.local.network.prefixlen)
            ipr.link("set", index=index, state="up")
        # Our ICMP errors enter the kernel through flannel0 with flannel0's own
        # address as source, which the kernel drops as a martian unless the device
        # accepts local sources. (Real flannel omits this, so its net-unreachable
        # replies never reach the pod; we want them seen.)
        with open(f"/proc/sys/net/ipv4/conf/{DEVICE}/accept_local", "w") as f:
            f.write("1\n")
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._sock.bind((str(self.local.public_ip), self.port))

    def add_peer(self, lease: Lease) -> None:
        if self.lease is not None and lease.subnet == self.lease.subnet:
            return                                   # our own lease: docker0 delivers it
        self._peers[lease.subnet] = str(lease.public_ip)
        self.routes.set(lease.subnet, str(lease.public_ip))
        self._known_sources = frozenset(self._peers.values())

    def remove_peer(self, lease: Lease) -> None:
        if self._peers.pop(lease.subnet, None) is not None:
            self.routes.delete(lease.subnet)
            self._known_sources = frozenset(self._peers.values())

    def teardown(self) -> None:
        """Close the socket and the TUN fd; flannel0 and its route vanish with it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._tun_fd is not None:
            os.close(self._tun_fd)
            self._tun_fd = None

    # -- data plane ----------------------------------------------------------

    async def run(self) -> None:
        """Move packets both ways until cancelled."""
        if self._tun_fd is None or self._sock is None:
            raise RuntimeError("udp backend: run() before setup()")
        # The stream gets its own fd so that closing it (when run is cancelled)
        # and teardown's close of the original never close the same number twice.
        tun = trio.lowlevel.FdStream(os.dup(self._tun_fd))
        sock = trio.socket.from_stdlib_socket(self._sock)
        async with tun:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._tun_to_udp, tun, sock)
                nursery.start_soon(self._udp_to_tun, tun, sock)

    async def _tun_to_udp(self, tun: trio.lowlevel.FdStream, sock) -> None:
        counters = self.counters
        while True:
            packet = bytearray(await tun.receive_some(READ_SIZE))
            if not looks_like_ipv4(packet):
                counters["drop_not_ipv4"] += 1
                continue
            next_hop = self.routes.lookup(ipv4_destination(packet))
            if next_hop is None:
                counters["drop_no_route"] += 1
                reply = net_unreachable(packet, self._tun_address)
                if reply is not None and await self._write_tun(tun, reply):
                    counters["icmp_unreachable_sent"] += 1
                continue
            if not decrement_ttl(packet):
                counters["drop_ttl"] += 1
                continue
            try:
                await sock.sendto(packet, (next_hop, self.port))
            except OSError:
                counters["tx_errors"] += 1
                continue
            counters["tx_packets"] += 1
            counters["tx_bytes"] += len(packet)

    async def _udp_to_tun(self, tun: trio.lowlevel.FdStream, sock) -> None:
        counters = self.counters
        while True:
            try:
                data, (source, _port) = await sock.recvfrom(READ_SIZE)
            except OSError:
                counters["rx_errors"] += 1
                continue
            if source not in self._known_sources:
                counters["drop_unknown_source"] += 1
                continue
            if ipv4_problem(data) is not None:
                counters["drop_malformed"] += 1
                continue
            packet = bytearray(data)
            if not decrement_ttl(packet):
                counters["drop_ttl"] += 1
                continue
            if await self._write_tun(tun, packet):
                counters["rx_packets"] += 1
                counters["rx_bytes"] += len(packet)

    async def _write_tun(self, tun: trio.lowlevel.FdStream, packet: bytes) -> bool:
        """Write one packet into flannel0; both loops write, so no FdStream.send_all
        (it refuses concurrent senders). A TUN write takes the whole packet or fails."""
        while True:
            try:
                os.write(tun.fileno(), packet)
                return True
            except BlockingIOError:
                await trio.lowlevel.wait_writable(tun.fileno())
            except OSError as exc:
                if exc.errno == errno.EINTR:
                    continue
                self.counters["rx_errors"] += 1
                return False
