"""The udp backend's per-packet logic (netemu.overlay.packet), without root."""

from __future__ import annotations

import ipaddress
import random
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP

from netemu.overlay.packet import (RouteTable, decrement_ttl, internet_checksum, ipv4_destination,
                                   ipv4_problem, looks_like_ipv4, net_unreachable)

FLANNEL0 = ipaddress.IPv4Address("10.244.1.0").packed


def tcp_packet(**ip_fields) -> bytes:
    fields = dict(src="10.244.1.2", dst="10.244.7.2", ttl=64, id=4242)
    fields.update(ip_fields)
    return bytes(IP(**fields) / TCP(sport=40000, dport=80, flags="S", seq=1) / b"hello")


def random_header(rng: random.Random) -> bytearray:
    """A valid IPv4 header (with random options) with random fields and a correct checksum."""
    ihl = rng.randint(5, 15)
    header = bytearray(rng.randbytes(ihl * 4))
    header[0] = 0x40 | ihl
    header[8] = rng.randint(2, 255)           # TTL that survives a decrement
    header[10:12] = b"\0\0"
    struct.pack_into("!H", header, 10, internet_checksum(header))
    return header


# -- checksum and TTL ------------------------------------------------------------

def test_internet_checksum_matches_scapy():
    packet = IP(bytes(IP(src="1.2.3.4", dst="5.6.7.8", ttl=17, id=99) / b"x"))
    header = bytearray(bytes(packet)[:20])
    header[10:12] = b"\0\0"
    assert internet_checksum(header) == packet.chksum


def test_decrement_ttl_keeps_checksum_equal_to_full_recompute():
    rng = random.Random(1624)
    wraps = 0
    for _ in range(20000):
        header = random_header(rng)
        ttl = header[8]
        # The one's-complement wrap-around: adding 0x0100 to a checksum >= 0xFEFF
        # carries out of 16 bits (flannel special-cases exactly this).
        wraps += struct.unpack_from("!H", header, 10)[0] >= 0xFEFF
        assert decrement_ttl(header)
        assert header[8] == ttl - 1
        recomputed = bytearray(header)
        recomputed[10:12] = b"\0\0"
        assert struct.unpack_from("!H", header, 10)[0] == internet_checksum(recomputed)
        assert internet_checksum(header) == 0
    assert wraps > 10


@pytest.mark.parametrize("ttl", [0, 1])
def test_decrement_ttl_refuses_expiring_packets(ttl):
    packet = bytearray(tcp_packet(ttl=ttl))
    before = bytes(packet)
    assert decrement_ttl(packet) is False
    assert bytes(packet) == before


def test_decrement_ttl_on_real_packet_is_what_scapy_would_build():
    packet = bytearray(tcp_packet(ttl=64))
    assert decrement_ttl(packet)
    assert bytes(packet) == tcp_packet(ttl=63)


# -- validation of datagrams from the underlay -------------------------------------

def test_valid_packet_passes():
    assert ipv4_problem(tcp_packet()) is None
    assert ipv4_problem(bytes(IP(dst="10.244.2.2", options=b"\x01" * 8) / UDP() / b"x")) is None


def corrupt(packet: bytes, offset: int, value: int, fix_checksum: bool = True) -> bytes:
    data = bytearray(packet)
    data[offset] = value
    if fix_checksum:
        ihl = min((data[0] & 0x0F) * 4, len(data))
        data[10:12] = b"\0\0"
        struct.pack_into("!H", data, 10, internet_checksum(data[:max(ihl, 20)]))
    return bytes(data)


@pytest.mark.parametrize("make, reason", [
    (lambda p: b"", "truncated"),
    (lambda p: p[:19], "truncated"),
    (lambda p: p[:30], "total length"),                   # cut after the header
    (lambda p: p + b"\0", "total length"),                # trailing garbage
    (lambda p: corrupt(p, 0, 0x65), "version"),            # IPv6 nibble
    (lambda p: corrupt(p, 0, 0x05), "version"),
    (lambda p: corrupt(p, 0, 0x44), "header length"),      # ihl 4 < 5
    (lambda p: corrupt(p, 0, 0x4F), "header length"),      # ihl 15 > packet (45 bytes)
    (lambda p: corrupt(p, 3, 0xFF), "total length"),       # bogus total length
    (lambda p: corrupt(corrupt(p, 2, 0x00), 3, 0x00), "total length"),
    (lambda p: corrupt(p, 8, 0x11, fix_checksum=False), "checksum"),
])
def test_invalid_datagrams_are_rejected(make, reason):
    assert ipv4_problem(make(tcp_packet())) == reason


def test_validation_never_raises_on_random_bytes():
    rng = random.Random(99)
    for _ in range(5000):
        data = rng.randbytes(rng.randint(0, 80))
        if rng.random() < 0.5 and data:
            data = bytes([0x45]) + data[1:]
        ipv4_problem(data)
        looks_like_ipv4(data)
        net_unreachable(data, FLANNEL0)


def test_looks_like_ipv4_tells_ipv6_from_ipv4():
    assert looks_like_ipv4(tcp_packet())
    assert not looks_like_ipv4(bytes([0x60]) + bytes(39))
    assert not looks_like_ipv4(b"\x45" * 10)


# -- ICMP net unreachable -----------------------------------------------------------

def expected_unreachable(offender: bytes) -> bytes:
    """What flannel's send_net_unreachable writes, built by hand with scapy."""
    ihl = (offender[0] & 0x0F) * 4
    return bytes(IP(src="10.244.1.0", dst=IP(offender).src, ttl=8, id=0, flags=0, tos=0,
                    proto=1)
                 / ICMP(type=3, code=0) / offender[:ihl + 8])


def test_net_unreachable_matches_scapy():
    offender = tcp_packet()
    reply = net_unreachable(offender, FLANNEL0)
    assert reply == expected_unreachable(offender)
    parsed = IP(reply)
    assert (parsed.src, parsed.dst, parsed.ttl) == ("10.244.1.0", "10.244.1.2", 8)
    assert (parsed[ICMP].type, parsed[ICMP].code) == (3, 0)
    assert len(reply) == 20 + 8 + 20 + 8


def test_net_unreachable_quotes_options_too():
    offender = bytes(IP(src="10.244.1.2", dst="10.244.9.9", options=b"\x01" * 12) / UDP(dport=53) / b"q")
    assert net_unreachable(offender, FLANNEL0) == expected_unreachable(offender)
    assert len(net_unreachable(offender, FLANNEL0)) == 20 + 8 + 32 + 8


def test_net_unreachable_pads_short_offender_with_zeros():
    offender = bytes(IP(src="10.244.1.2", dst="10.244.9.9", proto=6))   # header only
    reply = net_unreachable(offender, FLANNEL0)
    assert reply == expected_unreachable(offender + bytes(8))


@pytest.mark.parametrize("offender", [
    bytes(IP(src="10.244.1.2", dst="10.244.9.9") / ICMP()),                       # no error about ICMP
    bytes(IP(src="10.244.1.2", dst="10.244.9.9", frag=10) / (b"x" * 16)),           # non-first fragment
    bytes(IP(src="10.244.1.2", dst="10.244.9.9", options=b"\x01" * 40) / UDP()),  # 60-byte header
    bytes(IP(src="10.244.1.2", dst="10.244.9.9"))[:19],                           # truncated
])
def test_net_unreachable_not_sent(offender):
    assert net_unreachable(offender, FLANNEL0) is None


def test_net_unreachable_sent_for_first_fragment():
    offender = bytes(IP(src="10.244.1.2", dst="10.244.9.9", flags="MF", frag=0) / UDP() / (b"x" * 16))
    assert net_unreachable(offender, FLANNEL0) == expected_unreachable(offender)


# -- peer lookup --------------------------------------------------------------------

def addr(text: str) -> int:
    return int(ipaddress.IPv4Address(text))


def test_route_table_finds_the_peer_holding_the_destination():
    table = RouteTable()
    table.set(ipaddress.IPv4Network("10.244.2.0/24"), "172.31.9.2")
    table.set(ipaddress.IPv4Network("10.244.3.0/24"), "172.31.9.3")
    assert table.lookup(addr("10.244.2.77")) == "172.31.9.2"
    assert table.lookup(addr("10.244.3.1")) == "172.31.9.3"
    assert table.lookup(addr("10.244.4.1")) is None
    assert ipv4_destination(tcp_packet(dst="10.244.3.1")) == addr("10.244.3.1")


def test_route_table_longest_prefix_update_and_delete():
    table = RouteTable()
    table.set(ipaddress.IPv4Network("10.244.0.0/16"), "A")
    table.set(ipaddress.IPv4Network("10.244.2.0/24"), "B")
    assert table.lookup(addr("10.244.2.9")) == "B"
    assert table.lookup(addr("10.244.5.9")) == "A"
    table.set(ipaddress.IPv4Network("10.244.2.0/24"), "C")       # lease moved to a new node address
    assert table.lookup(addr("10.244.2.9")) == "C"
    table.delete(ipaddress.IPv4Network("10.244.2.0/24"))
    assert table.lookup(addr("10.244.2.9")) == "A"
    table.delete(ipaddress.IPv4Network("10.244.0.0/16"))
    table.delete(ipaddress.IPv4Network("10.244.0.0/16"))          # deleting twice is harmless
    assert table.lookup(addr("10.244.2.9")) is None
    assert len(table) == 0
