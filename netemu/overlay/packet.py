"""Per-packet logic of the udp backend, as pure functions on bytes.

The udp backend (netemu.overlay.udp) moves bare IPv4 packets between the TUN
device flannel0 and a UDP socket, exactly as flannel's C proxy
(pkg/backend/udp/proxy_amd64.c) does. Everything it decides about one packet
lives here, free of sockets and kernel state, so it can be tested without root
and later replaced by a faster path without changing behaviour:

- `ipv4_problem` validates a datagram that arrived from the underlay,
- `decrement_ttl` patches TTL and header checksum in place (RFC 1624),
- `net_unreachable` builds the ICMP error flannel writes back into the TUN,
- `RouteTable` maps an inner destination to the peer node that leases it.

Every function accepts any bytes without raising: the daemon must survive
whatever arrives on its port.
"""

from __future__ import annotations

import ipaddress
import struct

IPV4_MIN_HEADER = 20
IPPROTO_ICMP = 1
ICMP_DEST_UNREACH = 3
ICMP_NET_UNREACH = 0
# flannel refuses to quote a header of MAX_IPOPTLEN (40) bytes of options or more:
# its check is `ihl*4 >= sizeof(iphdr) + MAX_IPOPTLEN`, so ihl 15 gets no reply.
_MAX_QUOTED_HEADER = 20 + 40
# The TTL flannel puts on the ICMP errors it makes up.
ICMP_ERROR_TTL = 8


def internet_checksum(data: bytes) -> int:
    """RFC 1071 checksum: one's complement of the one's-complement sum."""
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ipv4_problem(packet: bytes) -> str | None:
    """Why PACKET is not a well-formed IPv4 packet, or None if it is.

    A datagram from the underlay must hold exactly one IPv4 packet: version 4,
    a header of at least 20 bytes that fits, a total length equal to the
    datagram's length, and a valid header checksum.
    """
    n = len(packet)
    if n < IPV4_MIN_HEADER:
        return "truncated"
    if packet[0] >> 4 != 4:
        return "version"
    ihl = (packet[0] & 0x0F) * 4
    if ihl < IPV4_MIN_HEADER or ihl > n:
        return "header length"
    total = (packet[2] << 8) | packet[3]
    if total != n:
        return "total length"
    if internet_checksum(packet[:ihl]) != 0:
        return "checksum"
    return None


def looks_like_ipv4(packet: bytes) -> bool:
    """The minimal check for packets the kernel hands us from the TUN device.

    The kernel builds these, so they are sound; but flannel0 also carries the
    kernel's own IPv6 chatter (router solicitations, MLD), which must not be
    mistaken for IPv4.
    """
    return len(packet) >= IPV4_MIN_HEADER and packet[0] >> 4 == 4 and (packet[0] & 0x0F) >= 5


def ipv4_destination(packet: bytes) -> int:
    """The destination address as an integer (PACKET holds at least a minimal header)."""
    return int.from_bytes(packet[16:20], "big")


def ipv4_source(packet: bytes) -> int:
    """The source address as an integer (PACKET holds at least a minimal header)."""
    return int.from_bytes(packet[12:16], "big")


def decrement_ttl(packet: bytearray) -> bool:
    """Decrement the TTL in place and patch the header checksum; False if it hits 0.

    The checksum is updated incrementally (RFC 1624, eqn. 3: HC' = ~(~HC + ~m + m'))
    over the 16-bit word that holds TTL and protocol, as flannel's proxy does,
    instead of summing the whole header again. When the TTL reaches 0 the packet
    is left untouched and must be dropped (a TTL of 0 on arrival, which flannel's
    8-bit decrement would wrap to 255, is dropped too). A packet shorter than
    an IPv4 header is left alone too (False): it has no TTL to speak of.
    """
    if len(packet) < IPV4_MIN_HEADER:
        return False
    ttl = packet[8]
    if ttl <= 1:
        return False
    old_word = (ttl << 8) | packet[9]
    new_word = old_word - 0x100
    checksum = (packet[10] << 8) | packet[11]
    total = (~checksum & 0xFFFF) + (~old_word & 0xFFFF) + new_word
    total = (total & 0xFFFF) + (total >> 16)
    total = (total & 0xFFFF) + (total >> 16)
    checksum = ~total & 0xFFFF
    packet[8] = ttl - 1
    packet[10] = checksum >> 8
    packet[11] = checksum & 0xFF
    return True


def net_unreachable(offender: bytes, source: bytes) -> bytes | None:
    """The ICMP "network unreachable" flannel writes back for an unroutable packet.

    As in proxy_amd64.c's send_net_unreachable: an IPv4 header from SOURCE (the
    four bytes of flannel0's address) to the offender's source, TTL 8, id 0, no
    flags; ICMP type 3 code 0; payload = the offender's IP header and the first
    8 bytes after it. None when flannel sends nothing: the offender is itself
    ICMP (RFC 792: no errors about errors), a non-first fragment, or its header
    is malformed or 60 bytes long. If the offender is shorter than header + 8,
    the missing bytes are zeros (flannel copies whatever its buffer held).
    """
    if not looks_like_ipv4(offender):
        return None
    ihl = (offender[0] & 0x0F) * 4
    if ihl >= _MAX_QUOTED_HEADER or ihl > len(offender):
        return None
    if offender[9] == IPPROTO_ICMP:
        return None
    if ((offender[6] << 8) | offender[7]) & 0x1FFF:
        return None
    quoted = bytes(offender[:ihl + 8]).ljust(ihl + 8, b"\0")
    icmp = bytearray(struct.pack("!BBHI", ICMP_DEST_UNREACH, ICMP_NET_UNREACH, 0, 0) + quoted)
    struct.pack_into("!H", icmp, 2, internet_checksum(icmp))
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0,
                                   ICMP_ERROR_TTL, IPPROTO_ICMP, 0, bytes(source),
                                   bytes(offender[12:16])))
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return bytes(header + icmp)


class RouteTable:
    """Subnet → next hop (a peer node's underlay address), longest prefix first.

    The udp backend's equivalent of flannel's in-proxy route list. Leases usually
    share one prefix length, so a lookup is one dict probe per distinct length.
    """

    def __init__(self) -> None:
        # prefix length -> {network address as int: next hop}
        self._by_length: dict[int, dict[int, str]] = {}
        self._lengths: list[int] = []      # distinct prefix lengths, longest first

    def set(self, subnet: ipaddress.IPv4Network, next_hop: str) -> None:
        self._by_length.setdefault(subnet.prefixlen, {})[int(subnet.network_address)] = next_hop
        self._lengths = sorted(self._by_length, reverse=True)

    def delete(self, subnet: ipaddress.IPv4Network) -> None:
        table = self._by_length.get(subnet.prefixlen, {})
        table.pop(int(subnet.network_address), None)
        if not table:
            self._by_length.pop(subnet.prefixlen, None)
        self._lengths = sorted(self._by_length, reverse=True)

    def lookup(self, destination: int) -> str | None:
        for length in self._lengths:
            mask = (0xFFFFFFFF << (32 - length)) & 0xFFFFFFFF
            next_hop = self._by_length[length].get(destination & mask)
            if next_hop is not None:
                return next_hop
        return None

    def __len__(self) -> int:
        return sum(len(t) for t in self._by_length.values())
