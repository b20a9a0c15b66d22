"""The udp fast path's segmentation and coalescing in numpy: the fallback for
an install without the compiled helper (netemu/overlay/_vnetc.c), which gives
the same bytes (tests/unit/test_fastpath_vnet.py checks both). Imported only
when needed: the workers of a normal install never load numpy.

numpy's cost here is per operation far more than per byte, so both directions
use few operations over all segments at once: the sum of the little-endian
16-bit words of a row (a 32-bit accumulator is enough for 64 KB), times 256, is
congruent mod 0xFFFF to the big-endian one's-complement sum (2^16 ≡ 1 mod 0xFFFF).
"""

from __future__ import annotations

import numpy as np

from netemu.overlay.vnet import (GSO_TCPV4, IPPROTO_TCP, IPPROTO_UDP, MAX_IP_LEN, TCP_ACK, TCP_CSUM_OFFSET,
                                 TCP_CWR, TCP_FIN, TCP_PSH, VNET_F_NEEDS_CSUM, VNET_HDR, Coalesced,
                                 _coalesce_udp_each, _merge_udp, _singles, ones_sum, pseudo_sum)

_M = 0xFFFF
_ARANGE = np.arange(1 << 16, dtype=np.int64)    # segment numbers (a super-packet has < 64 K of them)


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

    Few numpy operations, each over all datagrams at once (numpy's cost here is
    per operation, not per byte): a header matrix, one masked comparison of
    each header with the previous one, one sum per datagram.
    """
    n_bytes = len(buffer)
    count = -(-n_bytes // size)
    if count < 2 or size < 40 or size % 2 or buffer[0] != 0x45 or buffer[9] != IPPROTO_TCP:
        return _singles(buffer, size)        # nothing to merge (e.g. UDP inside): no numpy
    hdr = 20 + (buffer[32] >> 4) * 4
    if hdr < 40 or hdr >= size:              # a TCP data offset under 5 is no TCP header
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
        merged_len = (end - start - 1) * (size - hdr) + int(lengths[end - 1])
        # A run shares these bytes with its first datagram ("same"): check them once.
        if (end - start >= 2 and merged_len <= MAX_IP_LEN and h[0] == 0x45 and h[6] & 0x3F == 0 and h[7] == 0 and h[8] > 1
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


def coalesce_udp(buffer, size: int) -> Coalesced:
    """vnet._coalesce_udp_each's merging; the common case (every full datagram
    valid) checked with a few numpy operations over all datagrams at once."""
    result = _coalesce_udp_all(buffer, size)
    return result if result is not None else _coalesce_udp_each(buffer, size)


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
            if hi - lo == 1 or 28 + (hi - lo) * (size - 28) > MAX_IP_LEN:
                for i in order[lo:hi]:
                    result.add_single(bytes(view[i * size:i * size + size]))
                continue
            result.add_super(_merge_udp([view[i * size:i * size + size] for i in order[lo:hi]], size),
                             hi - lo)
    if full * size < len(buffer):                          # a shorter last one: on its own, after
        result.add_single(bytes(view[full * size:]))
    return result
