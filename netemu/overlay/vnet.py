"""Super-packets: the pure logic of the udp backend's fast path.

With offloads on (IFF_VNET_HDR + TUNSETOFFLOAD TSO4|CSUM), flannel0 hands the
daemon TCP "super-packets" of up to 64 KB, each preceded by a virtio-net header,
and accepts such super-packets back. The wire format must not change: every
UDP/8285 datagram carries one complete, valid inner IPv4 packet that fits the
underlay. So the fast path does, in userspace, what a NIC does in hardware:

- `segment`: split a TCP super-packet into MSS-sized packets (fix total length,
  IP id, IP checksum, sequence number, flags and TCP checksum of each), laid
  out back to back so that one UDP GSO send (UDP_SEGMENT) puts them on the
  wire as separate datagrams;
- `coalesce`: the reverse, for a UDP GRO receive (many datagrams in one buffer):
  validate every datagram, find runs of contiguous segments of one TCP flow
  and merge each run into one super-packet for the TUN, checksum left to the
  kernel (NEEDS_CSUM);
- `finish_checksum`: small packets (ACKs) come from the TUN with only the
  pseudo-header sum in their checksum field (NEEDS_CSUM): finish it.

Each of the three exists twice, with the same results byte for byte: compiled
(netemu/overlay/_vnetc.c, built at install when a C compiler is there: one pass
over the bytes, ~8 µs per 64 KB super-packet here) and in numpy
(netemu/overlay/vnet_numpy.py, ~100-150 µs: numpy's cost is per operation, not
per byte), plus the per-datagram Python rules of UDP coalescing that both
follow (`_coalesce_udp_each`). `segment`, `coalesce` and `coalesce_udp` use the
compiled one when it was built (`native`, COMPILED); the worker calls its `*_into`
functions directly, with buffers it reuses. Everything here works on bytes;
nothing touches a socket or a device.
"""

from __future__ import annotations

import collections
import struct

from netemu.overlay.packet import decrement_ttl

try:
    from netemu.overlay import _vnetc as native     # the compiled helper
except ImportError:                   # installed without a C compiler: numpy only
    native = None

COMPILED = native is not None

VNET_HDR = struct.Struct("<BBHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size          # 10
VNET_F_NEEDS_CSUM = 1
VNET_F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP_L4 = 5                        # UDP segmentation (USO): gso_size is the payload per datagram
GSO_ECN = 0x80
PLAIN_HDR = bytes(VNET_HDR_LEN)       # "nothing to do": a complete packet

MAX_IP_LEN = 0xFFFF                   # a merged super-packet is one IPv4 packet
IPPROTO_TCP = 6
IPPROTO_UDP = 17
TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6
TCP_FIN, TCP_PSH, TCP_ACK, TCP_CWR = 0x01, 0x08, 0x10, 0x80

_M = 0xFFFF


class VnetHeader(collections.namedtuple("VnetHeader", "flags gso_type hdr_len gso_size csum_start csum_offset")):
    # A named tuple, not a dataclass: the udp workers import this module, and
    # dataclasses (with inspect and re) was a fifth of a worker's start-up.
    __slots__ = ()

    @classmethod
    def parse(cls, data) -> "VnetHeader":
        return cls(*VNET_HDR.unpack_from(data))

    def pack(self) -> bytes:
        return VNET_HDR.pack(*self)


def ones_sum(data) -> int:
    """One's-complement sum of DATA's big-endian 16-bit words, mod 0xFFFF."""
    s = int.from_bytes(data, "big")
    if len(data) % 2:
        s <<= 8
    return s % _M


def pseudo_sum(packet, length: int) -> int:
    """ones_sum of the IPv4 pseudo-header (addresses, protocol, L4 LENGTH)."""
    return (ones_sum(packet[12:20]) + packet[9] + length) % _M


def finish_checksum(packet: bytearray, csum_start: int, csum_offset: int) -> None:
    """Complete a NEEDS_CSUM packet in place: the field holds the pseudo-header
    sum; the checksum covers it and everything from csum_start on."""
    where = csum_start + csum_offset
    if csum_start < 0 or csum_offset < 0 or where + 2 > len(packet):
        return                         # (as _vnetc.c's forward: not ours to guess)
    csum = -ones_sum(memoryview(packet)[csum_start:]) % _M
    if csum == 0 and packet[9] == IPPROTO_UDP:
        csum = _M                      # UDP: 0 would mean "no checksum"
    packet[where] = csum >> 8
    packet[where + 1] = csum & 0xFF


def segmentable(packet, mss: int) -> bool:
    """Whether PACKET is a TCP/IPv4 packet that `segment` can cut at MSS: its
    IP and TCP header lengths fit in it, and 1 <= MSS <= 65535 (what _vnetc.c's
    segment_into checks too)."""
    n = len(packet)
    if n < 40 or not 1 <= mss <= 0xFFFF or packet[0] >> 4 != 4 or packet[9] != IPPROTO_TCP:
        return False
    ihl = (packet[0] & 0x0F) * 4
    if ihl < 20 or ihl + 20 > n:
        return False
    thl = (packet[ihl + 12] >> 4) * 4
    return thl >= 20 and ihl + thl <= n


def segmented_length(packet, mss: int) -> int:
    """An upper bound of segment's output size for PACKET (a TCP/IPv4 super-packet)."""
    ihl = (packet[0] & 0x0F) * 4
    hdr = ihl + (packet[ihl + 12] >> 4) * 4
    return max(1, -(-(len(packet) - hdr) // mss)) * (hdr + mss)


def forward(packet, flags: int, csum_start: int, csum_offset: int) -> bool:
    """A small packet read from the TUN, made ready for the wire in place: TTL
    decremented (False, packet untouched, if it would reach 0), and the checksum
    finished if the kernel left it to us (FLAGS has NEEDS_CSUM)."""
    if native is not None:
        return native.forward(packet, flags, csum_start, csum_offset)
    if not decrement_ttl(packet):
        return False
    if flags & VNET_F_NEEDS_CSUM:
        finish_checksum(packet, csum_start, csum_offset)
    return True


def segment(packet, mss: int) -> tuple[memoryview, int, int]:
    """Split a TCP/IPv4 super-packet into MSS-sized packets (see vnet_numpy.segment).
    ValueError if PACKET is not `segmentable`."""
    if not segmentable(packet, mss):
        raise ValueError("not a TCP/IPv4 super-packet that can be cut at this MSS")
    if native is None:
        from netemu.overlay import vnet_numpy
        return vnet_numpy.segment(packet, mss)
    out = bytearray(segmented_length(packet, mss))
    n, size, count = native.segment_into(packet, mss, out)
    return memoryview(out)[:n], size, count


class Coalesced:
    """What a GRO buffer turned into: super-packets, each a list of buffers for
    one writev to the TUN (vnet header included), and the leftover datagrams,
    each to go the per-packet way."""

    __slots__ = ("super_packets", "merged", "singles", "dropped_ttl", "sequence")

    def __init__(self, super_packets: list[list], merged: int, singles: list[bytes], dropped_ttl: int = 0,
                 sequence: list | None = None):
        self.super_packets = super_packets
        self.merged = merged                  # datagrams inside super_packets
        self.singles = singles
        self.dropped_ttl = dropped_ttl
        # Both kinds in arrival order (super-packet: a list; single: bytes): what
        # to write, so that no flow's packets are reordered.
        self.sequence = [] if sequence is None else sequence

    def __repr__(self) -> str:
        return (f"Coalesced(super_packets={self.super_packets!r}, merged={self.merged!r}, "
                f"singles={self.singles!r}, dropped_ttl={self.dropped_ttl!r}, sequence={self.sequence!r})")

    def add_super(self, iov: list, datagrams: int) -> None:
        self.super_packets.append(iov)
        self.sequence.append(iov)
        self.merged += datagrams

    def add_single(self, datagram: bytes) -> None:
        self.singles.append(datagram)
        self.sequence.append(datagram)


def _singles(buffer, size: int) -> Coalesced:
    result = Coalesced([], 0, [])
    for i in range(0, len(buffer), size):
        result.add_single(bytes(buffer[i:i + size]))
    return result


def _from_items(items: list, buffer, out: bytearray) -> Coalesced:
    """A Coalesced from the compiled functions' items (see _vnetc.c, coalesce_into)."""
    result = Coalesced([], 0, [])
    for merged, start, end in items:
        if merged:
            result.add_super([bytes(out[start:end])], merged)
        else:
            result.add_single(bytes(buffer[start:end]))
    return result


def coalesced_room(buffer) -> int:
    """Enough room for the compiled coalescing of BUFFER: every super-packet is
    at most its datagrams plus one vnet header, and holds at least two of 29+ bytes."""
    return 2 * len(buffer) + VNET_HDR_LEN


def _check_size(size: int) -> None:
    if size < 1:
        raise ValueError("size must be positive")       # as _vnetc.c says it


def coalesce(buffer, size: int) -> Coalesced:
    """See vnet_numpy.coalesce."""
    _check_size(size)
    if native is None:
        from netemu.overlay import vnet_numpy
        return vnet_numpy.coalesce(buffer, size)
    out = bytearray(coalesced_room(buffer))
    return _from_items(native.coalesce_into(buffer, size, out), buffer, out)


class _UdpRun:
    """Datagrams of one inner UDP flow that may become one UDP GSO super-packet."""

    __slots__ = ("members", "size", "ident", "open")

    def __init__(self, datagram, ident: int) -> None:
        self.members = [datagram]
        self.size = len(datagram)         # every member's length but the last's
        self.ident = ident                # IP id of the last member
        self.open = True                  # False once a shorter (last) member joined

    def takes(self, d, ident: int) -> bool:
        first = self.members[0]
        return (self.open and len(d) <= self.size and ident == (self.ident + 1) & 0xFFFF
                and d[1] == first[1] and d[6] == first[6] and d[8] == first[8])

    def add(self, d, ident: int) -> None:
        self.members.append(d)
        self.ident = ident
        self.open = len(d) == self.size


def _valid_udp(d) -> bool:
    """A whole, valid UDP/IPv4 datagram with a payload, without IP options, not a
    fragment, TTL > 1, with a non-zero UDP checksum that checks out."""
    n = len(d)
    return (n > 28 and d[0] == 0x45 and d[9] == IPPROTO_UDP and (d[2] << 8 | d[3]) == n
            and not (d[6] & 0x3F or d[7]) and d[8] > 1 and (d[24] << 8 | d[25]) == n - 20
            and bool(d[26] or d[27]) and ones_sum(d[:20]) == 0
            and (ones_sum(d[12:20]) + IPPROTO_UDP + n - 20 + ones_sum(d[20:])) % _M == 0)


def coalesce_udp(buffer, size: int) -> Coalesced:
    """See _coalesce_udp_each (whose rules and order the compiled one follows)."""
    _check_size(size)
    if native is None:
        from netemu.overlay import vnet_numpy
        return vnet_numpy.coalesce_udp(buffer, size)
    out = bytearray(coalesced_room(buffer))
    return _from_items(native.coalesce_udp_into(buffer, size, out), buffer, out)


def _coalesce_udp_each(buffer, size: int) -> Coalesced:
    """Merge the UDP/IPv4 datagrams of a UDP GRO receive (each SIZE bytes but the
    last) into UDP GSO super-packets, one per run of an inner flow, for the TUN.

    A datagram joins its flow's run (flow: addresses and ports; each flow keeps
    its order, different flows may be regrouped) if it is valid (`_valid_udp`)
    and carries on the run exactly: same TOS, TTL and flags, the next IP id,
    and no longer than the first (a shorter one ends the run). The kernel cuts
    the super-packet back into the very same datagrams (ids counting up from
    the first, lengths and checksums recomputed from the pseudo-header sum left
    in the field) on the way to the pod. Runs of one, and everything else, are
    returned as singles. Pure Python: these are small packets, and what this
    saves is one TUN write (a trip through the node's stack) per datagram.
    """
    view = memoryview(buffer)
    runs: dict[bytes, _UdpRun] = {}
    order: list = []                        # runs and invalid datagrams, in arrival order
    for at in range(0, len(buffer), size):
        d = view[at:at + size]
        if not _valid_udp(d):
            order.append(d)
            continue
        key = bytes(d[12:24])
        ident = d[4] << 8 | d[5]
        run = runs.get(key)
        if run is not None and run.takes(d, ident):
            run.add(d, ident)
        else:
            runs[key] = run = _UdpRun(d, ident)
            order.append(run)
    result = Coalesced([], 0, [])
    for item in order:
        if isinstance(item, memoryview):
            result.add_single(bytes(item))
        elif len(item.members) == 1 or 28 + sum(len(m) - 28 for m in item.members) > MAX_IP_LEN:
            for member in item.members:              # (too long for one IPv4 packet: one by one)
                result.add_single(bytes(member))
        else:
            result.add_super(_merge_udp(item.members, item.size), len(item.members))
    return result


def _merge_udp(members: list, size: int) -> list:
    """[vnet header + IP/UDP header, payloads...] of one UDP GSO super-packet made of
    MEMBERS (datagrams of SIZE bytes, the last possibly shorter)."""
    total = 28 + sum(len(m) for m in members) - 28 * len(members)
    header = bytearray(members[0][:28])
    header[2:4] = total.to_bytes(2, "big")
    header[8] -= 1                                  # TTL, checked > 1
    header[10:12] = b"\0\0"
    header[10:12] = (-ones_sum(header[:20]) % _M).to_bytes(2, "big")
    header[24:26] = (total - 20).to_bytes(2, "big")
    header[26:28] = pseudo_sum(header, total - 20).to_bytes(2, "big")
    vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, GSO_UDP_L4, 28, size - 28, 20, UDP_CSUM_OFFSET)
    return [vnet + bytes(header)] + [m[28:] for m in members]
