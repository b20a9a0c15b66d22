"""The udp fast path's super-packet logic (netemu.overlay.vnet), checked against
scapy's own dissection and checksums. Every test runs twice: with the compiled
helper (netemu/overlay/_vnetc.c) and with the numpy/Python code it stands for."""

from __future__ import annotations

import os
import random
import shutil

import pytest
from scapy.layers.inet import IP, TCP, UDP

from netemu.overlay import vnet, vnet_numpy
from netemu.overlay.packet import internet_checksum, ipv4_problem


# Every test here runs twice, compiled and numpy (tests/unit/conftest.py).
pytestmark = pytest.mark.usefixtures("implementation")


def test_the_compiled_helper_is_built_where_a_compiler_is():
    if not (shutil.which("cc") or shutil.which("gcc")):
        pytest.skip("no C compiler here: the numpy code serves")
    assert vnet.COMPILED, "netemu.overlay._vnetc missing: reinstall (pip install -e .) to build it"


def super_packet(payload: bytes, flags="PA", seq=1000, ttl=64, ident=7) -> bytearray:
    pkt = IP(src="10.244.1.2", dst="10.244.2.2", ttl=ttl, id=ident, flags="DF") / \
        TCP(sport=40000, dport=5201, seq=seq, ack=555, flags=flags, window=501,
            options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]) / payload
    return bytearray(bytes(pkt))


def segment(packet, mss: int) -> tuple[bytes, int, int]:
    buffer, size, count = vnet.segment(packet, mss)
    return bytes(buffer), size, count


def split(buffer: bytes, size: int) -> list[bytes]:
    return [buffer[i:i + size] for i in range(0, len(buffer), size)]


def assert_valid(raw: bytes) -> IP:
    assert ipv4_problem(raw) is None
    ip = IP(raw)
    again = IP(raw)
    del again[IP].chksum, again[TCP].chksum
    again = IP(bytes(again))
    assert ip[TCP].chksum == again[TCP].chksum, "bad TCP checksum"
    return ip


@pytest.mark.parametrize("length,mss", [(10_000, 1420), (1420 * 44, 1420), (1, 1420), (2841, 1418), (5000, 1419)])
def test_segment_gives_valid_contiguous_packets(length, mss):
    payload = os.urandom(length)
    buffer, size, count = segment(super_packet(payload, flags="FPA"), mss)
    parts = split(buffer, size)
    assert len(parts) == count == -(-length // mss)
    assert all(len(p) == size for p in parts[:-1]) and len(parts[-1]) <= size
    data = b""
    for k, raw in enumerate(parts):
        ip = assert_valid(raw)
        assert ip.id == 7 + k and ip.ttl == 64
        assert ip[TCP].seq == 1000 + k * mss
        want = "FPA" if k == count - 1 else "A"
        assert str(ip[TCP].flags) == want
        data += bytes(ip[TCP].payload)
    assert data == payload


def test_coalesce_rebuilds_the_super_packet_with_ttl_decremented():
    payload = os.urandom(20_000)
    buffer, size, count = segment(super_packet(payload), 1420)
    result = vnet.coalesce(buffer, size)
    assert result.singles == [] and result.merged == count and len(result.super_packets) == 1
    out = b"".join(result.super_packets[0])
    hdr = vnet.VnetHeader.parse(out)
    assert (hdr.flags, hdr.gso_type, hdr.gso_size, hdr.csum_start, hdr.csum_offset) == \
        (vnet.VNET_F_NEEDS_CSUM, vnet.GSO_TCPV4, 1420, 20, 16)
    packet = bytearray(out[vnet.VNET_HDR_LEN:])
    assert hdr.hdr_len == 20 + 32
    assert internet_checksum(packet[:20]) == 0
    vnet.finish_checksum(packet, hdr.csum_start, hdr.csum_offset)
    ip = assert_valid(bytes(packet))
    assert ip.ttl == 63 and ip[TCP].seq == 1000 and bytes(ip[TCP].payload) == payload
    assert str(ip[TCP].flags) == "PA"


def test_coalesce_leaves_out_what_it_must_not_merge():
    a, size, _ = segment(super_packet(os.urandom(1420 * 3)), 1420)
    parts = split(a, size)
    corrupt = bytearray(parts[1])
    corrupt[-1] ^= 0xFF                                     # bad TCP checksum
    gap = bytes(super_packet(os.urandom(1420), seq=999_999, flags="A"))  # not contiguous
    udp = bytes(IP(src="10.244.1.2", dst="10.244.2.2") / UDP() / os.urandom(1472 - 28))
    assert len(udp) == size == len(gap)
    buffer = parts[0] + bytes(corrupt) + parts[2] + gap + udp
    result = vnet.coalesce(buffer, size)
    assert result.super_packets == [] and result.merged == 0
    assert result.singles == [parts[0], bytes(corrupt), parts[2], gap, udp]


def test_coalesce_merges_runs_and_keeps_the_rest():
    a, size, _ = segment(super_packet(os.urandom(1420 * 3), seq=5000), 1420)
    b, _, _ = segment(super_packet(os.urandom(1420 * 2), seq=90_000), 1420)
    result = vnet.coalesce(a + b, size)
    assert result.merged == 5 and len(result.super_packets) == 2 and result.singles == []


def test_coalesce_does_not_merge_expiring_ttl():
    a, size, _ = segment(super_packet(os.urandom(1420 * 2), ttl=1), 1420)
    result = vnet.coalesce(a, size)
    assert result.merged == 0 and len(result.singles) == 2


def test_finish_checksum_of_a_partial_ack():
    pkt = super_packet(b"", flags="A")
    ip = IP(bytes(pkt))
    ihl = 20
    pkt[ihl + 16:ihl + 18] = vnet.pseudo_sum(pkt, len(pkt) - ihl).to_bytes(2, "big")
    vnet.finish_checksum(pkt, ihl, 16)
    assert IP(bytes(pkt))[TCP].chksum == ip[TCP].chksum


def test_forward_decrements_ttl_and_finishes_the_checksum():
    for payload, proto in ((b"", "tcp"), (b"q" * 37, "tcp"), (b"hello", "udp")):
        packet = bytearray(bytes(IP(src="10.244.1.2", dst="10.244.2.2", ttl=9) /
                                 (TCP(flags="A") if proto == "tcp" else UDP(sport=5, dport=6)) / payload))
        want = IP(bytes(packet))
        offset = 16 if proto == "tcp" else 6
        where = 20 + offset
        packet[where:where + 2] = vnet.pseudo_sum(packet, len(packet) - 20).to_bytes(2, "big")
        assert vnet.forward(packet, vnet.VNET_F_NEEDS_CSUM, 20, offset)
        got = IP(bytes(packet))
        assert got.ttl == 8 and ipv4_problem(bytes(packet)) is None
        layer = TCP if proto == "tcp" else UDP
        assert got[layer].chksum == want[layer].chksum
    # Without NEEDS_CSUM the rest is left alone; at TTL 1 nothing changes.
    packet = bytearray(bytes(IP(src="10.244.1.2", dst="10.244.2.2", ttl=2) / UDP(chksum=0x1234) / b"x"))
    assert vnet.forward(packet, 0, 20, 6) and packet[26:28] == b"\x12\x34" and packet[8] == 1
    before = bytes(packet)
    assert not vnet.forward(packet, vnet.VNET_F_NEEDS_CSUM, 20, 6) and bytes(packet) == before


def test_forward_writes_a_zero_udp_checksum_as_ffff():
    # A 2-byte payload chosen so that the UDP checksum comes out 0: UDP must send 0xFFFF.
    packet = bytearray(bytes(IP(src="10.244.1.2", dst="10.244.2.2") / UDP(sport=5, dport=6) / b"\0\0"))
    packet[26:28] = vnet.pseudo_sum(packet, len(packet) - 20).to_bytes(2, "big")
    packet[28:30] = (-vnet.ones_sum(memoryview(packet)[20:]) % 0xFFFF).to_bytes(2, "big")
    assert vnet.ones_sum(memoryview(packet)[20:]) == 0
    assert vnet.forward(packet, vnet.VNET_F_NEEDS_CSUM, 20, 6)
    assert packet[26:28] == b"\xff\xff"


@pytest.mark.parametrize("mss", [1420, 1418, 1419])
def test_coalesce_of_segment_is_the_identity_whatever_the_mss(mss):
    payload = os.urandom(mss * 7 + 11)
    buffer, size, count = segment(super_packet(payload), mss)
    result = vnet.coalesce(bytearray(buffer), size)
    if size % 2:
        # An odd datagram size is not merged: every datagram goes its own way.
        assert result.merged == 0 and len(result.singles) == count
        return
    assert result.merged == count and result.singles == []
    packet = bytearray(b"".join(result.super_packets[0])[vnet.VNET_HDR_LEN:])
    vnet.finish_checksum(packet, 20, 16)
    ip = assert_valid(bytes(packet))
    assert bytes(ip[TCP].payload) == payload and ip.ttl == 63


def udp_datagram(payload: bytes, ident: int, sport=40000, dst="10.244.2.2", ttl=64) -> bytes:
    return bytes(IP(src="10.244.1.2", dst=dst, ttl=ttl, id=ident, flags="DF") /
                 UDP(sport=sport, dport=5202) / payload)


def kernel_segments(iov: list) -> list[bytes]:
    """What the kernel's UDP GSO makes of a super-packet written to the TUN: one
    datagram per gso_size of payload, ids counting up, lengths and checksums redone."""
    raw = b"".join(iov)
    hdr = vnet.VnetHeader.parse(raw)
    assert (hdr.flags, hdr.gso_type, hdr.hdr_len, hdr.csum_start, hdr.csum_offset) == \
        (vnet.VNET_F_NEEDS_CSUM, vnet.GSO_UDP_L4, 28, 20, 6)
    packet = raw[vnet.VNET_HDR_LEN:]
    template, payload = IP(packet[:28]), packet[28:]
    out = []
    for k, at in enumerate(range(0, len(payload), hdr.gso_size)):
        seg = IP(src=template.src, dst=template.dst, ttl=template.ttl, id=template.id + k,
                 flags=template.flags, tos=template.tos) / \
            UDP(sport=template[UDP].sport, dport=template[UDP].dport) / payload[at:at + hdr.gso_size]
        out.append(bytes(seg))
    return out


def forwarded(datagram: bytes) -> bytes:
    packet = bytearray(datagram)
    from netemu.overlay.packet import decrement_ttl
    assert decrement_ttl(packet)
    return bytes(packet)


def delivered(result) -> list[bytes]:
    """What reaches the pods, in order: super-packets cut by the kernel, singles
    forwarded one by one (TTL decremented)."""
    out = []
    for item in result.sequence:
        out += kernel_segments(item) if isinstance(item, list) else [forwarded(item)]
    return out


@pytest.mark.parametrize("coalesce", [vnet.coalesce_udp, vnet._coalesce_udp_each])
def test_coalesce_udp_gives_back_the_same_datagrams_through_the_kernels_gso(coalesce):
    # Two flows interleaved (as from two senders); the last datagram shorter.
    a = [udp_datagram(os.urandom(64), 100 + i) for i in range(5)]
    b = [udp_datagram(os.urandom(64), 7000 + i, sport=40001) for i in range(3)]
    short = udp_datagram(os.urandom(30), 105)
    datagrams = [a[0], b[0], a[1], a[2], b[1], a[3], b[2], a[4], short]
    result = coalesce(b"".join(datagrams), len(a[0]))
    assert len(result.super_packets) == 2 and result.merged >= 8
    out = delivered(result)
    assert [d for d in out if UDP in IP(d) and IP(d)[UDP].sport == 40000] == [forwarded(d) for d in a + [short]]
    assert [d for d in out if IP(d)[UDP].sport == 40001] == [forwarded(d) for d in b]
    if coalesce is vnet._coalesce_udp_each or vnet.native is not None:
        assert result.merged == 9           # the careful way takes the shorter last one in too


def test_coalesce_udp_leaves_out_what_it_must_not_merge():
    size = len(udp_datagram(b"x" * 64, 1))
    good = [udp_datagram(os.urandom(64), 10 + i) for i in range(2)]
    gap = udp_datagram(os.urandom(64), 50)                       # not the next id
    bad = bytearray(udp_datagram(os.urandom(64), 51))
    bad[-1] ^= 0xFF                                              # bad UDP checksum
    dying = [udp_datagram(os.urandom(64), 60 + i, sport=1, ttl=1) for i in range(2)]
    buffer = b"".join(good + [gap, bytes(bad)] + dying)
    result = vnet.coalesce_udp(buffer, size)
    assert result.merged == 2 and len(result.super_packets) == 1
    assert result.singles == [gap, bytes(bad)] + dying
    # In arrival order: the run where its first datagram came, then the rest.
    assert [type(x) for x in result.sequence] == [list, bytes, bytes, bytes, bytes]


@pytest.mark.parametrize("coalesce", [vnet.coalesce_udp, vnet._coalesce_udp_each])
def test_coalesce_udp_cuts_a_flow_into_runs_at_an_id_gap(coalesce):
    datagrams = [udp_datagram(os.urandom(64), i) for i in (1, 2, 3, 9, 10, 12)]
    result = coalesce(b"".join(datagrams), len(datagrams[0]))
    assert result.merged == 5 and len(result.super_packets) == 2 and len(result.singles) == 1
    assert delivered(result) == [forwarded(d) for d in datagrams]


def test_coalesce_never_merges_pure_acks():
    # A pure ACK can only be the shorter last datagram of a GRO receive; right after
    # data segments of its flow it would "follow on" (no payload): it must stay on
    # its own (a super-packet carries data, and an ACK may be a duplicate ACK).
    data, size, count = segment(super_packet(os.urandom(1420 * 3), flags="A"), 1420)
    ack = bytes(IP(src="10.244.1.2", dst="10.244.2.2", id=7 + count, flags="DF") /
                TCP(sport=40000, dport=5201, seq=1000 + 3 * 1420, ack=555, flags="A", window=501,
                    options=[("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]))
    result = vnet.coalesce(data + ack, size)
    assert result.merged == 3 and result.singles == [ack]


@pytest.mark.parametrize("coalesce", [vnet.coalesce_udp, vnet._coalesce_udp_each])
def test_coalesce_udp_leaves_empty_datagrams_alone(coalesce):
    # A UDP GSO super-packet needs a payload per datagram: an empty one would vanish.
    full = [udp_datagram(os.urandom(8), 1 + i) for i in range(3)]
    empty = udp_datagram(b"", 4)
    result = coalesce(b"".join(full + [empty]), len(full[0]))
    assert result.merged == 3 and result.singles == [empty]
    assert delivered(result) == [forwarded(d) for d in full + [empty]]
    empties = [udp_datagram(b"", 10 + i) for i in range(3)]
    result = coalesce(b"".join(empties), 28)
    assert result.merged == 0 and result.singles == empties


def test_coalesce_merges_each_of_two_interleaved_flows():
    # One GRO receive may hold segments of several TCP flows between the same two
    # nodes (e.g. iperf3 -P): each flow's segments are checked with its own
    # pseudo-header and merged into its own super-packets.
    a, size, _ = segment(super_packet(os.urandom(1420 * 3), flags="A"), 1420)
    other = super_packet(os.urandom(1420 * 3), flags="A")
    other[12:16] = bytes([10, 244, 1, 3])              # another pod: another pseudo-header
    b, _, _ = segment(other, 1420)
    result = vnet.coalesce(a + b, size)
    assert result.merged == 6 and len(result.super_packets) == 2 and result.singles == []


def _normalised(result: vnet.Coalesced) -> list:
    return [(b"".join(item) if isinstance(item, list) else bytes(item), isinstance(item, list))
            for item in result.sequence]


def test_compiled_and_numpy_agree_byte_for_byte(implementation):
    if implementation != "compiled":
        pytest.skip("compares the two")
    rng = random.Random(7)
    for _ in range(60):
        mss = rng.choice([1420, 1418, 1419, 536, 8948])
        payload = rng.randbytes(rng.randrange(1, 30_000))
        packet = super_packet(payload, flags=rng.choice(["A", "PA", "FPA", "CA"]), seq=rng.getrandbits(32),
                              ident=rng.getrandbits(16))
        compiled, numpy_way = vnet.segment(packet, mss), vnet_numpy.segment(packet, mss)
        assert (bytes(compiled[0]), compiled[1:]) == (bytes(numpy_way[0]), numpy_way[1:])
        # What GRO may hand over: segments of two flows, with damage here and there.
        buffer = bytearray(compiled[0])
        size = compiled[1]
        if rng.random() < 0.5:
            buffer[rng.randrange(len(buffer))] ^= 0x40
        if rng.random() < 0.3 and len(buffer) > size:
            buffer[8] = 1                                            # TTL about to expire
        assert _normalised(vnet.coalesce(buffer, size)) == _normalised(vnet_numpy.coalesce(buffer, size))
    for _ in range(60):
        flows = [rng.randrange(40000, 40004) for _ in range(rng.randrange(2, 40))]
        ids = {}
        datagrams = []
        for sport in flows:
            ids[sport] = ids.get(sport, rng.getrandbits(16)) + (1 if rng.random() < 0.9 else 5)
            datagrams.append(bytearray(udp_datagram(rng.randbytes(64), ids[sport] & 0xFFFF, sport=sport,
                                                    ttl=rng.choice([64, 64, 64, 1]))))
        if rng.random() < 0.5:
            datagrams[rng.randrange(len(datagrams))][-1] ^= 1
        if rng.random() < 0.3:
            datagrams[-1] = bytearray(udp_datagram(rng.randbytes(rng.randrange(0, 64)), 1))
        buffer = b"".join(datagrams)
        size = len(datagrams[0])
        assert _normalised(vnet.coalesce_udp(buffer, size)) == _normalised(vnet._coalesce_udp_each(buffer, size))


def test_no_merged_packet_is_longer_than_ipv4_allows():
    # A GRO receive holds at most 64 KB, but the merging does not rely on it:
    # a run that would not fit one IPv4 packet goes one by one.
    first, size, count = segment(super_packet(os.urandom(1420 * 40), flags="A"), 1420)
    then, _, more = segment(super_packet(os.urandom(1420 * 10), flags="A", seq=1000 + 1420 * 40,
                                         ident=7 + count), 1420)
    result = vnet.coalesce(first + then, size)
    assert result.merged == 0 and len(result.singles) == count + more
    datagrams = [udp_datagram(os.urandom(1400), 100 + i) for i in range(50)]
    result = vnet.coalesce_udp(b"".join(datagrams), len(datagrams[0]))
    assert result.merged == 0 and result.singles == datagrams
