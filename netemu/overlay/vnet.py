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


def _rows_sum(rows: np.ndarray) -> np.ndarray:
    """ones_sum of each row of a uint8 array whose width is a multiple of 4."""
    words = rows.view("<u4")
    return ((words.sum(axis=1, dtype=np.uint64) % _M) * 256 % _M).astype(np.int64)


def _pad4(n: int) -> int:
    return (n + 3) & ~3


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


def segment(packet, mss: int) -> tuple[bytes, int, int]:
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
    width = _pad4(size)
    rows = np.zeros((count, width), np.uint8)
    rows[:, :hdr] = np.frombuffer(packet, np.uint8, hdr)
    body = np.zeros(count * mss, np.uint8)
    body[:payload] = np.frombuffer(packet, np.uint8, payload, hdr)
    rows[:, hdr:size] = body.reshape(count, mss)

    # int64 throughout: negating an unsigned array would wrap (2^32 ≡ 1 mod 0xFFFF).
    k = np.arange(count, dtype=np.int64)
    lengths = np.full(count, size, np.int64)
    lengths[-1] = hdr + payload - (count - 1) * mss
    # IP: total length, id += k, checksum from a base sum without those fields.
    ident0 = (packet[4] << 8) | packet[5]
    idents = (ident0 + k) & _M
    base = ones_sum(bytes(packet[:2]) + b"\0\0\0\0" + bytes(packet[6:10]) + b"\0\0"
                    + bytes(packet[12:ihl]))
    ip_csum = (-(base + lengths + idents)) % _M
    rows[:, 2:4] = lengths.astype(">u2").view(np.uint8).reshape(count, 2)
    rows[:, 4:6] = idents.astype(">u2").view(np.uint8).reshape(count, 2)
    rows[:, 10:12] = ip_csum.astype(">u2").view(np.uint8).reshape(count, 2)
    # TCP: seq += k*mss; FIN and PSH only on the last, CWR only on the first.
    seq0 = int.from_bytes(packet[ihl + 4:ihl + 8], "big")
    seqs = ((seq0 + k * mss) & 0xFFFFFFFF).astype(">u4")
    rows[:, ihl + 4:ihl + 8] = seqs.view(np.uint8).reshape(count, 4)
    flags = ihl + 13
    rows[:-1, flags] &= ~(TCP_FIN | TCP_PSH) & 0xFF
    rows[1:, flags] &= ~TCP_CWR & 0xFF
    csum_at = ihl + TCP_CSUM_OFFSET
    rows[:, csum_at:csum_at + 2] = 0
    tcp_len = lengths - ihl
    pseudo = (ones_sum(packet[12:20]) + IPPROTO_TCP + tcp_len) % _M
    tcp_csum = (-(_rows_sum(rows[:, ihl:]) + pseudo)) % _M
    rows[:, csum_at:csum_at + 2] = tcp_csum.astype(">u2").view(np.uint8).reshape(count, 2)

    if width != size:
        rows = rows[:, :size]
    out = rows.tobytes()
    return out[:(count - 1) * size + int(lengths[-1])], size, count


@dataclasses.dataclass
class Coalesced:
    """What a GRO buffer turned into: super-packets (vnet header included, ready
    for the TUN) and the leftover datagrams, each to go the per-packet way."""

    super_packets: list[bytes]
    merged: int                       # datagrams inside super_packets
    singles: list[bytes]
    dropped_ttl: int = 0


def coalesce(buffer, size: int) -> Coalesced:
    """Merge the datagrams of a UDP GRO receive (each SIZE bytes but the last)
    into TCP super-packets where they are contiguous segments of one flow.

    A datagram joins a run only if it is a valid IPv4/TCP packet (no options in
    the IP header, not a fragment, valid IP and TCP checksums, TTL > 1, flags
    ACK or ACK|PSH) and carries on the previous one exactly: same addresses,
    ports, TOS, TTL, ack, window and TCP options, sequence number following on,
    and the previous one without PSH. Runs of 2+ become one super-packet with the
    TTL decremented, checksum left to the kernel (NEEDS_CSUM, pseudo-header sum
    in the field). Everything else is returned as is in `singles`.
    """
    n_bytes = len(buffer)
    count = -(-n_bytes // size)
    if count < 2 or size < 40 or buffer[9] != IPPROTO_TCP:
        # Nothing to merge (the usual case for UDP inner traffic): no numpy at all.
        return Coalesced([], 0, [bytes(buffer[i:i + size]) for i in range(0, n_bytes, size)])
    width = _pad4(size)
    flat = np.zeros(count * width, np.uint8)
    rows = flat.reshape(count, width)
    src = np.frombuffer(buffer, np.uint8)
    full = n_bytes // size
    rows[:full, :size] = src[:full * size].reshape(full, size)
    last_len = n_bytes - (count - 1) * size
    rows[count - 1, :last_len] = src[(count - 1) * size:]
    lengths = np.full(count, size, np.int64)
    lengths[-1] = last_len

    first = rows[0]
    doff = int(first[32]) >> 4
    hdr = 20 + doff * 4
    tl = rows[:, 2].astype(np.int64) * 256 + rows[:, 3]
    flags = rows[:, 33]
    valid = ((rows[:, 0] == 0x45) & (rows[:, 9] == IPPROTO_TCP) & (tl == lengths)
             & ((rows[:, 6] & 0x3F) == 0) & (rows[:, 7] == 0) & (rows[:, 8] > 1)
             & (rows[:, 32] == first[32]) & ((flags == TCP_ACK) | (flags == TCP_ACK | TCP_PSH))
             & (lengths > hdr) & (_rows_sum(rows[:, :20]) == 0))
    # TCP checksum: the segment plus its pseudo-header sums to 0 when valid.
    pseudo = (_rows_sum(np.ascontiguousarray(rows[:, 12:20])) + IPPROTO_TCP + (lengths - 20)) % _M
    valid &= (_rows_sum(rows[:, 20:]) + pseudo) % _M == 0

    seq = rows[:, 24:28].copy().view(">u4").reshape(count).astype(np.int64)
    same = np.ones(count, bool)
    same[0] = False
    for lo, hi in ((1, 2), (8, 9), (12, 24), (28, 33), (34, 36), (38, hdr)):
        same[1:] &= (rows[1:, lo:hi] == rows[:-1, lo:hi]).all(axis=1)
    follows = np.zeros(count, bool)
    follows[1:] = ((seq[1:] - seq[:-1]) & 0xFFFFFFFF) == (lengths[:-1] - hdr)
    joins = valid & same & follows
    joins[1:] &= valid[:-1] & (flags[:-1] == TCP_ACK)
    joins[0] = False

    result = Coalesced([], 0, [])
    start = 0
    for end in [int(i) for i in np.flatnonzero(~joins)[1:]] + [count]:
        if end - start >= 2:
            result.super_packets.append(_merge(rows, lengths, start, end, hdr, size))
            result.merged += end - start
        else:
            result.singles.append(bytes(buffer[start * size:start * size + int(lengths[start])]))
        start = end
    return result


def _merge(rows: np.ndarray, lengths: np.ndarray, start: int, end: int, hdr: int, mss_size: int) -> bytes:
    """One super-packet (vnet header first) from rows START..END-1 of a run."""
    header = bytearray(rows[start, :hdr].tobytes())
    payload_len = int(lengths[start:end].sum()) - (end - start) * hdr
    body = rows[start:end, hdr:mss_size].reshape(-1)[:payload_len].tobytes()
    total = hdr + payload_len
    header[2:4] = total.to_bytes(2, "big")
    header[8] -= 1                                  # TTL, checked > 1 above
    header[33] = rows[end - 1, 33]                  # PSH of the last segment
    header[10:12] = b"\0\0"
    header[10:12] = (-ones_sum(header[:20]) % _M).to_bytes(2, "big")
    header[36:38] = pseudo_sum(header, total - 20).to_bytes(2, "big")
    vnet = VNET_HDR.pack(VNET_F_NEEDS_CSUM, GSO_TCPV4, hdr, mss_size - hdr, 20, TCP_CSUM_OFFSET)
    return vnet + bytes(header) + body
