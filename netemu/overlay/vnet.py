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

Checksums of many segments are computed at once with numpy: the sum of the
little-endian 32-bit words of a row, times 256, is congruent mod 0xFFFF to the
big-endian 16-bit one's-complement sum (2^16 ≡ 1 mod 0xFFFF). Everything here
works on bytes and returns bytes; nothing touches a socket or a device.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np

VNET_HDR = struct.Struct("<BBHHHH")   # flags, gso_type, hdr_len, gso_size, csum_start, csum_offset
VNET_HDR_LEN = VNET_HDR.size          # 10
VNET_F_NEEDS_CSUM = 1
VNET_F_DATA_VALID = 2
GSO_NONE = 0
GSO_TCPV4 = 1
GSO_ECN = 0x80
PLAIN_HDR = bytes(VNET_HDR_LEN)       # "nothing to do": a complete packet

IPPROTO_TCP = 6
IPPROTO_UDP = 17
TCP_CSUM_OFFSET = 16
UDP_CSUM_OFFSET = 6
TCP_FIN, TCP_PSH, TCP_ACK, TCP_CWR = 0x01, 0x08, 0x10, 0x80

_M = 0xFFFF


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


def _word_sums(words: np.ndarray) -> np.ndarray:
    """ones_sum of each row of a 2-D array of little-endian u4 (or u2) words, as int64:
    the plain sum of a row times 256 is congruent to its big-endian 16-bit sum."""
    return (np.einsum("ij->i", words, dtype=np.uint64) % _M * 256 % _M).astype(np.int64)


def segment(packet, mss: int) -> tuple[memoryview, int, int]:
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
    k = np.arange(count, dtype=np.int64)
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
    # to 0), plus the pseudo-header.
    if size % 4 == 0:
        sums = _word_sums(rows.view("<u4"))
    elif size % 2 == 0:
        sums = _word_sums(rows.view("<u2"))
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


_VARIABLE: dict[int, np.ndarray] = {}


def _var_mask(hdr: int) -> np.ndarray:
    """Bytes of a TCP/IPv4 header (no IP options) that may differ between consecutive
    segments of one flow: total length, id, IP checksum, seq, flags, TCP checksum."""
    m = _VARIABLE.get(hdr)
    if m is None:
        m = np.zeros(hdr, bool)
        for lo, hi in ((2, 6), (10, 12), (24, 28), (33, 34), (36, 38)):
            m[lo:hi] = True
        _VARIABLE[hdr] = m
    return m


def coalesce(buffer, size: int) -> Coalesced:
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
    """
    n_bytes = len(buffer)
    count = -(-n_bytes // size)
    if count < 2 or size < 40 or size % 2 or buffer[9] != IPPROTO_TCP or buffer[0] != 0x45:
        return Coalesced([], 0, [bytes(buffer[i:i + size]) for i in range(0, n_bytes, size)])
    hdr = 20 + (buffer[32] >> 4) * 4
    if hdr >= size:
        return Coalesced([], 0, [bytes(buffer[i:i + size]) for i in range(0, n_bytes, size)])
    full = n_bytes // size
    rows = np.frombuffer(buffer, np.uint8, full * size).reshape(full, size)
    heads = np.zeros((count, hdr), np.uint8)
    heads[:full] = rows[:, :hdr]
    lengths = np.full(count, size, np.int64)
    sums = np.empty(count, np.int64)
    sums[:full] = _word_sums(rows.view("<u4" if size % 4 == 0 else "<u2"))
    if full < count:
        tail = buffer[full * size:]
        lengths[-1] = len(tail)
        if len(tail) >= hdr:
            heads[-1] = np.frombuffer(tail, np.uint8, hdr)
        sums[-1] = ones_sum(tail)
    # Consecutive datagrams of one flow: equal but for the variable bytes.
    same = np.zeros(count, bool)
    same[1:] = ((heads[1:] == heads[:-1]) | _var_mask(hdr)).all(axis=1)
    w = heads.view(">u2")                  # hdr is a multiple of 4
    tl = w[:, 1].astype(np.int64)
    seq = (w[:, 12].astype(np.int64) << 16) | w[:, 13]
    flags = heads[:, 33]
    # Each datagram on its own: its length, its IP header sum (0 when valid; then the
    # datagram's sum is its TCP part's), its TCP checksum with the pseudo-header
    # (addresses are the first datagram's: a datagram of another flow is not "same").
    ip_sum = np.einsum("ij->i", w[:, :10].astype(np.int64)) % _M
    pseudo = ones_sum(bytes(buffer[12:20])) + IPPROTO_TCP + lengths - 20
    valid = ((tl == lengths) & (ip_sum == 0) & ((sums + pseudo) % _M == 0)
             & ((flags == TCP_ACK) | (flags == TCP_ACK | TCP_PSH)))
    follows = np.zeros(count, bool)
    follows[1:] = ((seq[1:] - seq[:-1]) & 0xFFFFFFFF) == (lengths[:-1] - hdr)
    joins = valid & same & follows
    joins[1:] &= valid[:-1] & (flags[:-1] == TCP_ACK)
    joins[0] = False
    view = memoryview(buffer)
    supers, merged, singles = [], 0, []
    starts = np.flatnonzero(~joins).tolist() + [count]
    for start, end in zip(starts, starts[1:]):
        h = heads[start]
        # A run shares these bytes with its first datagram ("same"): check them once.
        if (end - start >= 2 and h[0] == 0x45 and h[6] & 0x3F == 0 and h[7] == 0 and h[8] > 1
                and h[9] == IPPROTO_TCP):
            supers.append(_merge(view, heads, lengths, start, end, hdr, size))
            merged += end - start
        else:
            for i in range(start, end):
                singles.append(bytes(view[i * size:i * size + int(lengths[i])]))
    return Coalesced(supers, merged, singles)


def _merge(view, heads: np.ndarray, lengths: np.ndarray, start: int, end: int, hdr: int,
           size: int) -> list:
    """One super-packet from datagrams START..END-1 of a run: [vnet + headers, payloads...]."""
    header = bytearray(heads[start].tobytes())
    payload_len = int(lengths[start:end].sum()) - (end - start) * hdr
    total = hdr + payload_len
    header[2:4] = total.to_bytes(2, "big")
    header[8] -= 1                                  # TTL, checked > 1 above
    header[33] = heads[end - 1, 33]                 # PSH of the last segment
    header[10:12] = b"\0\0"
    header[10:12] = (-ones_sum(header[:20]) % _M).to_bytes(2, "big")
    header[36:38] = pseudo_sum(header, total - 20).to_bytes(2, "big")
    vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, GSO_TCPV4, hdr, size - hdr, 20, TCP_CSUM_OFFSET)
    iov = [vnet + bytes(header)]
    for i in range(start, end):
        at = i * size
        iov.append(view[at + hdr:at + int(lengths[i])])
    return iov

