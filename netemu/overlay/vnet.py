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

Each of the three exists twice: compiled (netemu/overlay/_vnetc.c, built at
install when a C compiler is there) and in numpy/Python (`*_numpy`, `*_each`),
with the same results byte for byte; `segment`, `coalesce` and `coalesce_udp`
use the compiled one when it was built (COMPILED). The worker calls the
compiled `*_into` functions directly with buffers it reuses. In numpy,
checksums of many segments are computed at once: the sum of the little-endian
16-bit words of a row (a 32-bit accumulator is enough for 64 KB), times 256, is
congruent mod 0xFFFF to the big-endian one's-complement sum (2^16 ≡ 1 mod
0xFFFF). numpy's cost here is per operation far more than per byte (~80-100 µs
per 64 KB super-packet, few operations over all segments at once); compiled,
it is one pass over the bytes. Everything here works on bytes; nothing
touches a socket or a device.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

try:
    from netemu.overlay import _vnetc
except ImportError:                   # installed without a C compiler: numpy only
    _vnetc = None

COMPILED = _vnetc is not None

VNET_HDR = struct.Struct("<BBHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size          # 10
VNET_F_NEEDS_CSUM = 1
VNET_F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_UDP_L4 = 5                        # UDP segmentation (USO): gso_size is the payload per datagram
GSO_ECN = 0x80
PLAIN_HDR = bytes(VNET_HDR_LEN)       # "nothing to do": a complete packet

IPPROTO_TCP = 6
IPPROTO_UDP = 17
TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6
TCP_FIN, TCP_PSH, TCP_ACK, TCP_CWR = 0x01, 0x08, 0x10, 0x80

_M = 0xFFFF
_ARANGE = np.arange(1 << 16, dtype=np.int64)    # segment numbers (a super-packet has < 64 K of them)


@dataclasses.dataclass(frozen=True)
class VnetHeader:
    flags: int
    gso_type: int
    hdr_len: int
    gso_size: int
    csum_start: int
    csum_offset: int

    @classmethod
    def parse(cls, data) -> "VnetHeader":
        return cls(*VNET_HDR.unpack_from(data))

    def pack(self) -> bytes:
        return VNET_HDR.pack(self.flags, self.gso_type, self.hdr_len, self.gso_size,
                             self.csum_start, self.csum_offset)


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
    if where + 2 > len(packet):
        return
    csum = -ones_sum(memoryview(packet)[csum_start:]) % _M
    if csum == 0 and packet[9] == IPPROTO_UDP:
        csum = _M                      # UDP: 0 would mean "no checksum"
    packet[where] = csum >> 8
    packet[where + 1] = csum & 0xFF


def segmented_length(packet, mss: int) -> int:
    """An upper bound of segment's output size for PACKET (a TCP/IPv4 super-packet)."""
    ihl = (packet[0] & 0x0F) * 4
    hdr = ihl + (packet[ihl + 12] >> 4) * 4
    return max(1, -(-(len(packet) - hdr) // mss)) * (hdr + mss)


def segment(packet, mss: int) -> tuple[memoryview, int, int]:
    """Split a TCP/IPv4 super-packet into MSS-sized packets (see segment_numpy)."""
    if _vnetc is None:
        return segment_numpy(packet, mss)
    out = bytearray(segmented_length(packet, mss))
    n, size, count = _vnetc.segment_into(packet, mss, out)
    return memoryview(out)[:n], size, count


def segment_numpy(packet, mss: int) -> tuple[memoryview, int, int]:
    """Split a TCP/IPv4 super-packet into MSS-sized packets.

    Returns (buffer, size, count): COUNT complete IPv4 packets back to back, all
    SIZE bytes long but the last, which may be shorter: the layout UDP GSO wants
    (one send, segment size SIZE). The header of PACKET is the template (its TTL
    is taken as is); its checksum fields need not be valid.
    """
    ihl = (packet[0] & 0x0F) * 4
    hdr = ihl + (packet[ihl + 12] >> 4) * 4
    payload = len(packet) - hdr
    count = max(1, -(-payload // mss))
    size = hdr + mss
    last = payload - (count - 1) * mss
    rows = np.empty((count, size), np.uint8)
    src = np.frombuffer(packet, np.uint8)
    rows[:, :hdr] = src[:hdr]
    full = count if last == mss else count - 1
    rows[:full, hdr:] = src[hdr:hdr + full * mss].reshape(full, mss)
    if full < count:
        rows[-1, hdr:hdr + last] = src[hdr + full * mss:]
        rows[-1, hdr + last:] = 0        # not sent; zeros leave the row's sum alone

    # IP: total length, id += k, checksum from a base sum without those fields.
    k = _ARANGE[:count]
    lengths = np.full(count, size, np.int64)
    lengths[-1] = hdr + last
    idents = (((packet[4] << 8) | packet[5]) + k) & _M
    base = ones_sum(bytes(packet[:2]) + b"\0\0\0\0" + bytes(packet[6:10]) + b"\0\0"
                    + bytes(packet[12:ihl]))
    fields = np.empty((count, 3), ">u2")
    fields[:, 0] = lengths
    fields[:, 1] = idents
    fields[:, 2] = (-(base + lengths + idents)) % _M
    octets = fields.view(np.uint8)
    rows[:, 2:6] = octets[:, 0:4]
    rows[:, 10:12] = octets[:, 4:6]
    # TCP: seq += k*mss; FIN and PSH only on the last, CWR only on the first.
    seq0 = int.from_bytes(packet[ihl + 4:ihl + 8], "big")
    rows[:, ihl + 4:ihl + 8] = ((seq0 + k * mss) & 0xFFFFFFFF).astype(">u4").view(np.uint8).reshape(count, 4)
    flags = ihl + 13
    if count > 1:
        rows[:-1, flags] &= ~(TCP_FIN | TCP_PSH) & 0xFF
        rows[1:, flags] &= ~TCP_CWR & 0xFF
    csum_at = ihl + TCP_CSUM_OFFSET
    rows[:, csum_at:csum_at + 2] = 0
    # TCP checksum: the whole row's sum is its TCP part's (a valid IP header sums
    # to 0), plus the pseudo-header. Rows are summed as little-endian 16-bit words
    # (x 256: the big-endian sum), an odd last byte being its own.
    if size % 2 == 0:
        sums = rows.view("<u2").sum(axis=1, dtype=np.uint32).astype(np.int64) * 256
    else:                                 # an odd MSS: rare, one row at a time
        sums = np.array([ones_sum(row.tobytes()) for row in rows], np.int64)
    pseudo = ones_sum(packet[12:20]) + IPPROTO_TCP + lengths - ihl
    rows[:, csum_at:csum_at + 2] = ((-(sums + pseudo)) % _M).astype(">u2").view(np.uint8).reshape(count, 2)
    return memoryview(rows).cast("B")[:(count - 1) * size + hdr + last], size, count


@dataclasses.dataclass
class Coalesced:
    """What a GRO buffer turned into: super-packets, each a list of buffers for
    one writev to the TUN (vnet header included), and the leftover datagrams,
    each to go the per-packet way."""

    super_packets: list[list]
    merged: int                       # datagrams inside super_packets
    singles: list[bytes]
    dropped_ttl: int = 0
    # Both kinds in arrival order (super-packet: a list; single: bytes): what to
    # write, so that no flow's packets are reordered.
    sequence: list = dataclasses.field(default_factory=list)

    def add_super(self, iov: list, datagrams: int) -> None:
        self.super_packets.append(iov)
        self.sequence.append(iov)
        self.merged += datagrams

    def add_single(self, datagram: bytes) -> None:
        self.singles.append(datagram)
        self.sequence.append(datagram)


_INVARIANT: dict[int, np.ndarray] = {}


def _invariant_words(hdr: int) -> np.ndarray:
    """A mask over a TCP/IPv4 header (no IP options) as little-endian 32-bit words:
    ones on the bytes that segments of one flow share, zeros on those that differ
    (total length, id, IP checksum, seq, flags, TCP checksum)."""
    mask = _INVARIANT.get(hdr)
    if mask is None:
        octets = np.full(hdr, 0xFF, np.uint8)
        for lo, hi in ((2, 6), (10, 12), (24, 28), (33, 34), (36, 38)):
            octets[lo:hi] = 0
        mask = _INVARIANT[hdr] = octets.view("<u4")
    return mask


def _singles(buffer, size: int) -> Coalesced:
    result = Coalesced([], 0, [])
    for i in range(0, len(buffer), size):
        result.add_single(bytes(buffer[i:i + size]))
    return result


def _from_items(items: list, buffer, out: bytearray) -> Coalesced:
    """A Coalesced from the compiled functions' items (see _vnetc.coalesce_into)."""
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


def coalesce(buffer, size: int) -> Coalesced:
    """See coalesce_numpy."""
    if _vnetc is None:
        return coalesce_numpy(buffer, size)
    out = bytearray(coalesced_room(buffer))
    return _from_items(_vnetc.coalesce_into(buffer, size, out), buffer, out)


def coalesce_numpy(buffer, size: int) -> Coalesced:
    """Merge the datagrams of a UDP GRO receive (each SIZE bytes but the last)
    into TCP super-packets where they are contiguous segments of one flow.

    A datagram joins a run only if it is a valid IPv4/TCP packet (no options in
    the IP header, not a fragment, valid IP and TCP checksums, TTL > 1, flags
    ACK or ACK|PSH) and carries on the previous one exactly: same addresses,
    ports, TOS, TTL, ack, window and TCP options, sequence number following on,
    and the previous one without PSH. Runs of 2+ become one super-packet with the
    TTL decremented, checksum left to the kernel (NEEDS_CSUM, pseudo-header sum
    in the field), given as scatter-gather buffers for one writev: the vnet and
    IP/TCP headers, then slices of BUFFER (BUFFER must stay unchanged until they
    are written). Everything else is returned as is in `singles`.

    Few numpy operations, each over all datagrams at once (numpy's cost here is
    per operation, not per byte): a header matrix, one masked comparison of
    each header with the previous one, one sum per datagram.
    """
    n_bytes = len(buffer)
    count = -(-n_bytes // size)
    if count < 2 or size < 40 or size % 2 or buffer[0] != 0x45 or buffer[9] != IPPROTO_TCP:
        return _singles(buffer, size)        # nothing to merge (e.g. UDP inside): no numpy
    hdr = 20 + (buffer[32] >> 4) * 4
    if hdr >= size:
        return _singles(buffer, size)
    full = n_bytes // size
    rows = np.frombuffer(buffer, np.uint8, full * size).reshape(full, size)
    lengths = np.full(count, size, np.int64)
    # Sum of each datagram's little-endian 16-bit words (32-bit accumulator: a
    # datagram has at most 32767 words).
    sums = np.zeros(count, np.uint32)
    sums[:full] = rows.view("<u2").sum(axis=1, dtype=np.uint32)
    if full == count:
        heads = np.ascontiguousarray(rows[:, :hdr])
    else:                                     # a shorter last datagram
        heads = np.zeros((count, hdr), np.uint8)
        heads[:full] = rows[:, :hdr]
        tail = buffer[full * size:]
        lengths[-1] = len(tail)
        if len(tail) >= hdr:
            heads[-1] = np.frombuffer(tail, np.uint8, hdr)
        sums[-1] = ones_sum(tail)             # big-endian already: see below
    words = heads.view("<u4")
    same = np.zeros(count, bool)
    same[1:] = ~(((words[1:] ^ words[:-1]) & _invariant_words(hdr)).any(axis=1))
    be16 = heads.view(">u2")
    flags = heads[:, 33]
    # A valid IP header sums to 0 (mod 0xFFFF, in either byte order); then the
    # datagram's sum is its TCP part's, and with its pseudo-header a valid TCP
    # segment sums to 0 too. Little-endian sums x 256 are the big-endian ones.
    le = sums.astype(np.int64) * 256
    if full < count:
        le[-1] = int(sums[-1])
    pseudo = be16[:, 6:10].sum(axis=1, dtype=np.uint32).astype(np.int64) + IPPROTO_TCP - 20
    valid = ((be16[:, 1] == lengths) & (lengths > hdr)      # data: pure ACKs are never merged
             & (heads.view("<u2")[:, :10].sum(axis=1, dtype=np.uint32) % _M == 0)
             & ((le + pseudo + lengths) % _M == 0)
             & ((flags | TCP_PSH) == (TCP_ACK | TCP_PSH)))
    seq = heads.view(">u4")[:, 6].astype(np.int64)
    joins = valid & same
    joins[1:] &= (((seq[1:] - seq[:-1]) & 0xFFFFFFFF) == (lengths[:-1] - hdr)) & valid[:-1] & (flags[:-1] == TCP_ACK)
    joins[0] = False

    view = memoryview(buffer)
    result = Coalesced([], 0, [])
    starts = np.flatnonzero(~joins).tolist() + [count]
    for start, end in zip(starts, starts[1:]):
        h = heads[start]
        # A run shares these bytes with its first datagram ("same"): check them once.
        if (end - start >= 2 and h[0] == 0x45 and h[6] & 0x3F == 0 and h[7] == 0 and h[8] > 1
                and h[9] == IPPROTO_TCP):
            result.add_super(_merge(view, heads, int(lengths[end - 1]), start, end, hdr, size), end - start)
        else:
            for i in range(start, end):
                result.add_single(bytes(view[i * size:i * size + int(lengths[i])]))
    return result


def _merge(view, heads: np.ndarray, last_len: int, start: int, end: int, hdr: int, size: int) -> list:
    """One super-packet from datagrams START..END-1 of a run (all SIZE bytes but the
    last, LAST_LEN): [vnet header + IP/TCP header, payload slices...]."""
    header = bytearray(heads[start].tobytes())
    payload_len = (end - start - 1) * (size - hdr) + last_len - hdr
    total = hdr + payload_len
    header[2:4] = total.to_bytes(2, "big")
    header[8] -= 1                                  # TTL, checked > 1 above
    header[33] = heads[end - 1, 33]                 # PSH of the last segment
    header[10:12] = b"\0\0"
    header[10:12] = (-ones_sum(header[:20]) % _M).to_bytes(2, "big")
    header[36:38] = pseudo_sum(header, total - 20).to_bytes(2, "big")
    vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, GSO_TCPV4, hdr, size - hdr, 20, TCP_CSUM_OFFSET)
    iov = [vnet + bytes(header)]
    iov += [view[i * size + hdr:(i + 1) * size] for i in range(start, end - 1)]
    iov.append(view[(end - 1) * size + hdr:(end - 1) * size + last_len])
    return iov


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
    if _vnetc is None:
        return coalesce_udp_numpy(buffer, size)
    out = bytearray(coalesced_room(buffer))
    return _from_items(_vnetc.coalesce_udp_into(buffer, size, out), buffer, out)


def coalesce_udp_numpy(buffer, size: int) -> Coalesced:
    """See _coalesce_udp_each; the common case (every full datagram valid) is
    checked with a few numpy operations over all datagrams at once."""
    result = _coalesce_udp_all(buffer, size)
    return result if result is not None else _coalesce_udp_each(buffer, size)


def _coalesce_udp_all(buffer, size: int) -> Coalesced | None:
    """coalesce_udp when every full-size datagram is valid; None otherwise (then
    the careful way). Each inner flow's datagrams, in arrival order, are cut
    into runs where one does not carry on the previous one."""
    full = len(buffer) // size
    if size % 2 or size <= 28 or full < 2:
        return None
    rows = np.frombuffer(buffer, np.uint8, full * size).reshape(full, size)
    heads = np.ascontiguousarray(rows[:, :28])
    be16 = heads.view(">u2")
    # Whole datagram sums (little-endian words x 256 = big-endian, mod 0xFFFF): a
    # valid IP header adds 0, so with the pseudo-header a valid UDP datagram sums to 0.
    sums = rows.view("<u2").sum(axis=1, dtype=np.uint32).astype(np.int64) * 256
    pseudo = be16[:, 6:10].sum(axis=1, dtype=np.uint32).astype(np.int64) + IPPROTO_UDP + size - 20
    valid = ((heads[:, 0] == 0x45) & (heads[:, 9] == IPPROTO_UDP) & (be16[:, 1] == size)
             & ((heads[:, 6] & 0x3F) == 0) & (heads[:, 7] == 0) & (heads[:, 8] > 1)
             & (be16[:, 12] == size - 20) & (be16[:, 13] != 0)
             & (heads.view("<u2")[:, :10].sum(axis=1, dtype=np.uint32) % _M == 0)
             & ((sums + pseudo) % _M == 0))
    if not valid.all():
        return None
    keys = np.ascontiguousarray(heads[:, 12:24]).view(np.dtype((np.void, 12))).ravel()
    _, first_seen, flow_of = np.unique(keys, return_index=True, return_inverse=True)
    view = memoryview(buffer)
    result = Coalesced([], 0, [])
    for flow in np.argsort(first_seen).tolist():          # flows in order of arrival
        members = np.flatnonzero(flow_of == flow)
        if len(members) == 1:
            at = int(members[0]) * size
            result.add_single(bytes(view[at:at + size]))
            continue
        # Runs: a datagram carries on the previous one of its flow (next id, same
        # TOS, flags and TTL); where it does not (e.g. a drop upstream), a new run.
        h = heads[members]
        ids = be16[members, 2].astype(np.int64)
        breaks = np.ones(len(members), bool)
        breaks[1:] = ((((ids[1:] - ids[:-1]) & 0xFFFF) != 1) | (h[1:, 1] != h[:-1, 1])
                      | (h[1:, 6] != h[:-1, 6]) | (h[1:, 8] != h[:-1, 8]))
        starts = np.flatnonzero(breaks).tolist() + [len(members)]
        order = members.tolist()
        for lo, hi in zip(starts, starts[1:]):
            if hi - lo == 1:
                at = order[lo] * size
                result.add_single(bytes(view[at:at + size]))
                continue
            result.add_super(_merge_udp([view[i * size:i * size + size] for i in order[lo:hi]], size),
                             hi - lo)
    if full * size < len(buffer):                          # a shorter last one: on its own, after
        result.add_single(bytes(view[full * size:]))
    return result


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
        elif len(item.members) == 1:
            result.add_single(bytes(item.members[0]))
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
