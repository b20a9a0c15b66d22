"""Decoding of captured packets through flannel's encapsulations (no root).

Packets are built with scapy, written to a pcap with wrpcap and read back, as
they would come from tcpdump.
"""

from __future__ import annotations

import os
import struct

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6ND_NS, IPv6
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Ether
from scapy.layers.vxlan import VXLAN
from scapy.packet import Raw
from scapy.utils import PcapNgWriter, wrpcap

from netemu.capture import decode
from netemu.capture.decode import IPHeader

NODE1, NODE2 = "172.30.0.1", "172.30.0.2"
POD1, POD2 = "10.244.1.2", "10.244.2.2"
MAC1, MAC2 = "0a:00:00:00:00:01", "0a:00:00:00:00:02"
VTEP1, VTEP2 = "0e:00:00:00:01:01", "0e:00:00:00:01:02"


def flannel_udp(payload_len=0, flags="SA", t=1000.0):
    """A pod's TCP segment inside a flannel-udp datagram between two nodes."""
    p = (Ether(src=MAC1, dst=MAC2) / IP(src=NODE1, dst=NODE2) / UDP(sport=8285, dport=8285)
         / IP(src=POD1, dst=POD2, ttl=63) / TCP(sport=5201, dport=42112, flags=flags)
         / (b"x" * payload_len))
    p.time = t
    return p


def flannel_vxlan(payload_len=56, t=1001.0):
    """A pod's ICMP echo inside flannel's VXLAN (VNI 1, port 8472)."""
    p = (Ether(src=MAC1, dst=MAC2) / IP(src=NODE1, dst=NODE2) / UDP(sport=38211, dport=8472)
         / VXLAN(vni=1) / Ether(src=VTEP1, dst=VTEP2) / IP(src=POD1, dst=POD2, ttl=63)
         / ICMP(type=8, id=7, seq=1) / (b"p" * payload_len))
    p.time = t
    return p


def plain_tcp(t=1002.0):
    p = Ether(src=MAC1, dst=MAC2) / IP(src=NODE1, dst=NODE2, ttl=64) / TCP(sport=40000, dport=10250, flags="PA") / (b"k" * 100)
    p.time = t
    return p


def arp(t=1003.0):
    p = Ether(src=MAC1, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=MAC1, psrc=NODE1, pdst=NODE2)
    p.time = t
    return p


def ipv6(t=1004.0):
    p = Ether(src=MAC1, dst="33:33:ff:00:00:02") / IPv6(src="fe80::1", dst="ff02::1:ff00:2") / ICMPv6ND_NS(tgt="fe80::2")
    p.time = t
    return p


def roundtrip(tmp_path, packets, name="c.pcap", **kw):
    path = str(tmp_path / name)
    wrpcap(path, packets, **kw)
    return list(decode.decode_pcap(path))


def test_flannel_udp_packet(tmp_path):
    (d,) = roundtrip(tmp_path, [flannel_udp()])
    assert d.kind == "ipv4"
    assert d.encapsulation == "udp"
    assert d.vni is None and d.inner_macs is None
    assert d.outer == IPHeader(src=NODE1, dst=NODE2, proto="UDP", sport=8285, dport=8285,
                               ttl=64, length=20 + 8 + 40)
    assert d.inner == IPHeader(src=POD1, dst=POD2, proto="TCP", sport=5201, dport=42112,
                               ttl=63, length=40, flags="S.")
    assert d.overhead == 28
    assert d.time == 1000.0
    assert d.wire_len == d.captured_len == 14 + 68 and not d.truncated
    assert decode.format_decoded(d) == (
        "172.30.0.1:8285 > 172.30.0.2:8285 UDP/flannel  |  "
        "10.244.1.2:5201 > 10.244.2.2:42112 TCP [S.] ttl 63 len 40")


def test_flannel_vxlan_packet(tmp_path):
    (d,) = roundtrip(tmp_path, [flannel_vxlan()])
    assert d.encapsulation == "vxlan"
    assert d.vni == 1
    assert d.inner_macs == (VTEP1, VTEP2)
    assert d.outer == IPHeader(src=NODE1, dst=NODE2, proto="UDP", sport=38211, dport=8472,
                               ttl=64, length=20 + 8 + 8 + 14 + 84)
    assert d.inner == IPHeader(src=POD1, dst=POD2, proto="ICMP", ttl=63, length=84,
                               flags="echo-request")
    assert d.overhead == 50    # outer IP 20 + UDP 8 + VXLAN 8 + inner Ethernet 14
    assert decode.format_decoded(d) == (
        "172.30.0.1:38211 > 172.30.0.2:8472 VXLAN vni 1  |  "
        f"{VTEP1} > {VTEP2}  10.244.1.2 > 10.244.2.2 ICMP echo-request ttl 63 len 84")


def test_plain_arp_and_ipv6_packets(tmp_path):
    tcp, a, v6 = roundtrip(tmp_path, [plain_tcp(), arp(), ipv6()])
    assert tcp.encapsulation is None and tcp.outer is None and tcp.overhead == 0
    assert tcp.inner == IPHeader(src=NODE1, dst=NODE2, proto="TCP", sport=40000, dport=10250,
                                 ttl=64, length=140, flags="P.")
    assert decode.format_decoded(tcp) == "172.30.0.1:40000 > 172.30.0.2:10250 TCP [P.] ttl 64 len 140"

    assert a.kind == "arp" and a.inner is None
    assert decode.format_decoded(a) == "ARP who-has 172.30.0.2 tell 172.30.0.1"

    assert v6.kind == "ipv6"
    assert (v6.inner.src, v6.inner.dst, v6.inner.proto, v6.inner.ttl, v6.inner.length, v6.inner.version) \
        == ("fe80::1", "ff02::1:ff00:2", "ICMPv6", 255, 40 + 24, 6)
    assert decode.format_decoded(v6).startswith("fe80::1 > ff02::1:ff00:2 ICMPv6 ")


def _truncated(pkt, snaplen):
    """PKT as a capture with this snaplen keeps it: the first bytes, the true length."""
    raw = bytes(pkt)
    cut = Ether(raw[:snaplen])
    cut.wirelen = len(raw)
    cut.time = pkt.time
    return cut


def test_truncated_packets_never_crash_and_keep_what_is_known(tmp_path):
    full = flannel_udp(payload_len=1000)
    # 66: the inner TCP header is cut after its ports; 50: the inner IP header is
    # cut; 40: even the UDP header is cut; 20: the outer IP header is cut.
    ports_only, no_inner, no_udp, no_ip = roundtrip(
        tmp_path, [_truncated(full, n) for n in (66, 50, 40, 20)])

    assert ports_only.truncated and ports_only.captured_len == 66 and ports_only.wire_len == 14 + 1068
    assert ports_only.encapsulation == "udp" and ports_only.overhead == 28
    assert ports_only.inner == IPHeader(src=POD1, dst=POD2, proto="TCP", sport=5201, dport=42112,
                                        ttl=63, length=1040)   # lengths from headers, not from the capture

    for d in (no_inner, no_udp):
        assert d.encapsulation == "udp" and d.inner is None and d.error
        assert d.outer.length == 1068
        assert "[captured" in decode.format_decoded(d)

    assert no_ip.kind == "other" and no_ip.inner is None
    decode.format_decoded(no_ip)  # prints something, does not raise

    table = decode.FlowTable()
    for d in (ports_only, no_inner, no_udp, no_ip):
        table.add(d)
    (flow,) = table.flows()
    assert (flow.packets, flow.bytes, flow.outer_bytes) == (1, 1040, 1068)
    assert table.others == {"ipv4 (undecodable)": 2, "other": 1}


def test_decode_packet_never_raises():
    junk = Raw(b"\x45")
    junk.time = 5.0
    d = decode.decode_packet(junk)
    assert d.kind == "other"
    d = decode.decode_packet(None)
    assert d.kind == "other" and d.error


def test_flow_summary_counts_bytes_and_overhead(tmp_path):
    packets = ([flannel_udp(payload_len=n, flags="PA", t=1000.0 + i) for i, n in enumerate((0, 100, 1000))]
               + [flannel_vxlan(t=1010.0), flannel_vxlan(t=1011.0)]
               + [plain_tcp(), arp(), ipv6()])
    table = decode.FlowTable()
    for d in roundtrip(tmp_path, packets):
        table.add(d)
    udp, vx, plain = table.flows()   # biggest on the underlay first

    assert (udp.encapsulation, udp.proto, udp.src, udp.sport, udp.dst, udp.dport) == \
        ("udp", "TCP", POD1, 5201, POD2, 42112)
    assert (udp.outer_src, udp.outer_dst) == (NODE1, NODE2)
    assert udp.packets == 3
    assert udp.bytes == 40 * 3 + 1100
    assert udp.outer_bytes == udp.bytes + 3 * 28
    assert udp.overhead == 84
    assert udp.overhead_pct == pytest.approx(100 * 84 / (1220 + 84))
    assert (udp.first, udp.last) == (1000.0, 1002.0)

    assert (vx.encapsulation, vx.vni, vx.proto, vx.sport, vx.dport) == ("vxlan", 1, "ICMP", None, None)
    assert (vx.packets, vx.bytes, vx.outer_bytes, vx.overhead) == (2, 168, 268, 100)

    assert (plain.encapsulation, plain.packets, plain.bytes, plain.outer_bytes, plain.overhead) == \
        ("none", 1, 140, 140, 0)
    assert plain.overhead_pct == 0.0
    assert table.others == {"arp": 1, "ipv6": 1}

    assert decode.flow_summary(roundtrip(tmp_path, packets, "again.pcap")) == table.flows()

    text = decode.format_flows(table.flows(), table.others)
    lines = text.splitlines()
    assert lines[0].split()[:4] == ["ENCAP", "PROTO", "SOURCE", "DESTINATION"]
    assert lines[1].split() == ["udp", "TCP", "10.244.1.2:5201", "10.244.2.2:42112",
                                "172.30.0.1", ">", "172.30.0.2", "3", "1220", "1304", "84", "6.4"]
    assert lines[2].split() == ["vxlan/1", "ICMP", POD1, POD2, NODE1, ">", NODE2,
                                "2", "168", "268", "100", "37.3"]
    assert lines[3].split() == ["none", "TCP", "172.30.0.1:40000", "172.30.0.2:10250", "-",
                                "1", "140", "140", "0", "0.0"]
    assert lines[4] == "not in flows: 1 arp, 1 ipv6"


@pytest.fixture
def restore_bindings():
    saved = (set(decode._udp_ports), set(decode._vxlan_ports), UDP.payload_guess, set(decode._machine_ports))
    yield
    decode._machine_ports.clear()
    decode._machine_ports.update(saved[3])
    decode._udp_ports.clear()
    decode._udp_ports.update(saved[0])
    decode._vxlan_ports.clear()
    decode._vxlan_ports.update(saved[1])
    UDP.payload_guess = saved[2]


def test_register_custom_ports(tmp_path, restore_bindings):
    custom_udp = flannel_udp()
    custom_udp[UDP].sport = custom_udp[UDP].dport = 9285
    # 4789 is VXLAN in scapy's defaults; this cluster says it carries flannel-udp.
    on_4789 = flannel_udp()
    on_4789[UDP].sport = on_4789[UDP].dport = 4789
    custom_vxlan = flannel_vxlan()
    custom_vxlan[UDP].dport = 9472

    before = roundtrip(tmp_path, [custom_udp, on_4789, custom_vxlan], "before.pcap")
    assert [d.encapsulation for d in before] == [None, None, None]

    decode.register_ports(udp_ports=[9285, 4789], vxlan_ports=[9472])
    assert decode.registered_ports() == {"udp": frozenset({8285, 9285, 4789}),
                                         "vxlan": frozenset({8472, 9472}), "machine": frozenset()}
    after = roundtrip(tmp_path, [custom_udp, on_4789, custom_vxlan], "after.pcap")
    assert [d.encapsulation for d in after] == ["udp", "udp", "vxlan"]
    assert [d.overhead for d in after] == [28, 28, 50]
    assert all(d.inner.src == POD1 for d in after)
    # scapy itself now sees through them too (its show()/summary()).
    assert isinstance(IP(bytes(custom_udp[IP]))[UDP].payload, IP)
    # Only dissection is bound: building UDP()/IP() keeps scapy's default ports.
    assert bytes(UDP() / IP())[:4] == struct.pack("!HH", 53, 53)
    # Registering twice adds no duplicate bindings.
    n = len(UDP.payload_guess)
    decode.register_ports(udp_ports=[9285])
    assert len(UDP.payload_guess) == n


def test_pcapng_and_cooked_and_raw_ip_captures(tmp_path):
    inner = flannel_udp()[IP]
    # pcapng with Linux cooked v2 headers (tcpdump -i any -y LINUX_SLL2)
    ng = str(tmp_path / "c.pcapng")
    w = PcapNgWriter(ng)
    w.write(CookedLinuxV2(ifindex=3, pkttype=4) / inner)
    w.close()
    (d,) = decode.decode_pcap(ng)
    assert (d.encapsulation, d.overhead, d.ifindex, d.direction) == ("udp", 28, 3, "Out")
    assert decode.format_decoded(d).startswith("if3 Out 172.30.0.1:8285 > ")

    # Linux cooked v1 (tcpdump -i any's default)
    (d,) = roundtrip(tmp_path, [CookedLinux(pkttype=0) / inner], "sll.pcap")
    assert (d.encapsulation, d.direction, d.inner.sport) == ("udp", "In", 5201)

    # Raw IP: a capture on a TUN device such as flannel0 (linktype 101)
    (d,) = roundtrip(tmp_path, [flannel_udp()[UDP].payload], "raw.pcap", linktype=101)
    assert (d.encapsulation, d.inner.src, d.inner.flags) == (None, POD1, "S.")


def test_torn_and_empty_files(tmp_path):
    path = str(tmp_path / "torn.pcap")
    first, second = flannel_udp(t=1.0), flannel_udp(payload_len=10, t=2.0)
    wrpcap(path, [first, second])
    # Cut inside the second record's 16-byte header (tcpdump killed mid-write).
    os.truncate(path, 24 + 16 + len(first) + 8)
    decoded = list(decode.decode_pcap(path))
    assert [d.time for d in decoded] == [1.0]

    empty = tmp_path / "empty.pcap"
    empty.write_bytes(b"")
    assert list(decode.decode_pcap(str(empty))) == []


def test_flannel_udp_datagrams_merged_by_gro_are_split_again(tmp_path):
    # What tcpdump sees on an arriving node's uplink: GRO merged two same-size
    # datagrams (two inner packets of different flows) into one.
    a = bytes(IP(src=POD1, dst=POD2, ttl=62, id=1) / TCP(sport=5201, dport=42112, flags="A") / (b"a" * 12))
    b = bytes(IP(src=POD1, dst=POD2, ttl=62, id=9) / UDP(sport=999, dport=53) / (b"b" * 24))
    assert len(a) == len(b)
    merged = Ether(src=MAC1, dst=MAC2) / IP(src=NODE1, dst=NODE2) / UDP(sport=8285, dport=8285) / Raw(a + b)
    merged.time = 5.0
    first, second = roundtrip(tmp_path, [merged])
    assert (first.inner.proto, first.inner.sport, second.inner.proto, second.inner.sport) == ("TCP", 5201, "UDP", 999)
    assert first.outer.length == second.outer.length == 28 + len(a)
    assert first.gro_merged == second.gro_merged == 2 and first.overhead == 28
    assert decode.format_decoded(second).endswith("[1 of 2 datagrams merged by GRO before the capture]")
    table = decode.FlowTable()
    for d in (first, second):
        table.add(d)
    assert sorted(f.packets for f in table.flows()) == [1, 1]
    # One inner packet with trailing bytes that are not a packet: left whole.
    (odd,) = roundtrip(tmp_path, [Ether() / IP(src=NODE1, dst=NODE2) / UDP(sport=8285, dport=8285)
                                  / Raw(a + b"\x00" * 7)], name="odd.pcap")
    assert odd.gro_merged == 0 and odd.inner.proto == "TCP"


MACHINE_A, MACHINE_B = "192.168.77.1", "192.168.77.2"


def between_machines(frame, vni=4242, t=1005.0):
    """A fabric frame in the machine tunnel's VXLAN (UDP 4789) between two machines."""
    p = (Ether() / IP(src=MACHINE_A, dst=MACHINE_B, ttl=64) / UDP(sport=51000, dport=4789)
         / VXLAN(vni=vni) / frame)
    p.time = t
    return p


def test_machine_tunnel_carries_the_fabric_frame(tmp_path, restore_bindings):
    """A datagram on a machine port: its fabric frame decoded as the fabric shows
    it (flannel udp inside: outer and inner), the machine datagram as the carrier;
    a host-gw frame (no flannel layer) and an ARP request across machines too."""
    decode.register_ports(machine_ports=[4789])
    host_gw = Ether(src=MAC1, dst=MAC2) / IP(src=POD1, dst=POD2, ttl=63) / ICMP(type=8) / (b"p" * 56)
    udp, plain, arp_ = roundtrip(tmp_path, [between_machines(flannel_udp()), between_machines(host_gw),
                                            between_machines(arp())])
    assert udp.encapsulation == "udp" and (udp.outer.src, udp.outer.dst) == (NODE1, NODE2)
    assert (udp.inner.src, udp.inner.dst, udp.inner.proto) == (POD1, POD2, "TCP")
    assert udp.carrier == IPHeader(src=MACHINE_A, dst=MACHINE_B, proto="UDP", sport=51000, dport=4789,
                                   ttl=64, length=20 + 8 + 8 + 14 + 68)
    assert udp.carrier_vni == 4242 and udp.overhead == udp.carrier.length - 40
    line = decode.format_decoded(udp)
    assert line.startswith(f"{MACHINE_A}:51000 > {MACHINE_B}:4789 VXLAN vni 4242 (machines)  | "
                           f"{NODE1}:8285 > {NODE2}:8285 UDP/flannel  |  {POD1}:5201 > {POD2}:42112 TCP"), line
    assert plain.encapsulation is None and plain.outer is None and plain.inner.proto == "ICMP"
    assert plain.carrier.dst == MACHINE_B and plain.overhead == 50
    # ARP between machines: an ARP request, carried
    assert arp_.kind == "arp" and arp_.carrier.dport == 4789 and arp_.summary.startswith("ARP")
    assert decode.format_decoded(arp_).startswith(f"{MACHINE_A}:51000 > {MACHINE_B}:4789 VXLAN vni 4242 "
                                                  "(machines)  | ARP")
    # flows: the machine tunnel's bytes count on the wire
    flows = {f.proto: f for f in decode.flow_summary([udp, plain, arp_])}
    flow = flows["TCP"]
    assert flows["ICMP"].outer_bytes == plain.carrier.length
    assert flow.outer_bytes == udp.carrier.length and flow.carrier_vni == 4242
    assert decode.format_flows([flow]).splitlines()[1].split()[:3] == ["udp", "in", "vxlan/4242"]
    # without the machine port registered, 4789 is scapy's VXLAN: one layer only
    decode._machine_ports.clear()
    (d,) = roundtrip(tmp_path, [between_machines(flannel_udp())], "plain.pcap")
    assert d.carrier is None
