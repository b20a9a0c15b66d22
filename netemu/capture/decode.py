"""Decoding of captured packets, seeing through flannel's encapsulations.

A capture taken on a node's underlay interface shows node-to-node UDP datagrams;
the pod traffic is inside them. This module peels that layer off:

- flannel `udp` backend (UDP port 8285 by default): the UDP payload is the bare
  inner IPv4 packet, with no header of flannel's own;
- flannel `vxlan` backend (UDP port 8472 by default, the Linux kernel's port): an
  8-byte VXLAN header (flags, VNI), then the inner Ethernet frame and IP packet.

Over several machines the emulated fabric itself crosses between machines in
VXLAN (UDP 4789, netemu.machines): a capture on a machine's own link sees the
fabric's frames inside that, flannel's encapsulation (if any) inside them. Such
"machine ports" (register_ports(machine_ports=...)) are peeled first: the
datagram that carried the frame is the `carrier`, and the frame is then decoded
as above.

`decode_packet` turns one scapy packet into a `Decoded` record (outer and inner
headers, encapsulation, VNI, overhead); `format_decoded` prints it on one line;
`FlowTable` / `flow_summary` add packets up per inner 5-tuple and show what the
encapsulation costs in bytes. `read_pcap` streams pcap and pcapng files, including
Linux cooked captures (`tcpdump -i any`) and raw-IP captures of a TUN device.

Pure code: no root, no namespaces. Only the scapy layers needed are imported
(`import scapy.all` costs 1-2 s; these cost about 0.3 s).

Byte counts are IP-level (the IP header's total length), for both the inner and the
outer packet: link headers differ between capture points (Ethernet, cooked, raw),
IP lengths do not, and they stay exact when the capture was cut short by snaplen.
"""

from __future__ import annotations

import dataclasses
import datetime
import struct
from collections import Counter
from collections.abc import Iterable, Iterator
from typing import BinaryIO

from scapy.layers.inet import ICMP, IP, TCP, UDP, icmpcodes, icmptypes
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Ether
from scapy.layers.vxlan import VXLAN
from scapy.error import Scapy_Exception
from scapy.packet import Packet, Raw
from scapy.utils import PcapReader

DEFAULT_UDP_PORT = 8285     # flannel udp backend
DEFAULT_VXLAN_PORT = 8472   # flannel vxlan backend (Linux's VXLAN port, not IANA's 4789)

IP_HEADER = 20
VXLAN_HEADER = 8

# Which UDP ports carry which encapsulation. A cluster may configure other ports
# (flannel's `"Backend": {"Port": N}`): see register_ports.
_udp_ports: set[int] = set()
_vxlan_ports: set[int] = set()
_machine_ports: set[int] = set()    # VXLAN carrying the fabric between machines

_PROTO_NAMES = {1: "ICMP", 6: "TCP", 17: "UDP", 47: "GRE", 58: "ICMPv6", 132: "SCTP"}

# tcpdump's order of TCP flag letters (print-tcp.c), '.' standing for ACK.
_TCP_FLAG_LETTERS = ((0x01, "F"), (0x02, "S"), (0x04, "R"), (0x08, "P"),
                     (0x10, "."), (0x20, "U"), (0x40, "E"), (0x80, "W"))

# Linux packet types in cooked captures (include/uapi/linux/if_packet.h), as
# tcpdump -i any prints them.
_DIRECTIONS = {0: "In", 1: "B", 2: "M", 3: "P", 4: "Out"}


def _bind_first(lower: type[Packet], upper: type[Packet], **fields: int) -> None:
    """Make scapy dissect LOWER's payload as UPPER when FIELDS match, before any
    other binding (scapy takes the first match, and a configured port must win over
    scapy's defaults, e.g. VXLAN on 4789). Only dissection is bound: building a
    UDP()/IP() packet does not get its ports rewritten."""
    entry = (fields, upper)
    if lower.payload_guess[:1] == [entry]:
        return
    lower.payload_guess = [entry] + [g for g in lower.payload_guess if g != entry]


def register_ports(udp_ports: Iterable[int] = (), vxlan_ports: Iterable[int] = (),
                   machine_ports: Iterable[int] = ()) -> None:
    """Declare UDP ports that carry flannel-udp (bare IP) or VXLAN payloads, or
    VXLAN that carries the fabric between machines (MACHINE_PORTS).

    Adds to what is registered (the defaults 8285 and 8472 are always there). Also
    binds the layers in scapy, so scapy's own show()/summary() of such packets see
    the inner packet. Bindings for other ports are left as scapy has them.
    """
    for ports, kind, layer in ((udp_ports, _udp_ports, IP), (vxlan_ports, _vxlan_ports, VXLAN),
                               (machine_ports, _machine_ports, VXLAN)):
        for port in map(int, ports):
            for other in (_udp_ports, _vxlan_ports, _machine_ports):
                other.discard(port)
            kind.add(port)
            _bind_first(UDP, layer, dport=port)
            _bind_first(UDP, layer, sport=port)


def registered_ports() -> dict[str, frozenset[int]]:
    return {"udp": frozenset(_udp_ports), "vxlan": frozenset(_vxlan_ports),
            "machine": frozenset(_machine_ports)}


register_ports(udp_ports=[DEFAULT_UDP_PORT], vxlan_ports=[DEFAULT_VXLAN_PORT])


@dataclasses.dataclass(frozen=True)
class IPHeader:
    """What one IP packet says about itself (outer or inner)."""

    src: str
    dst: str
    proto: str                 # "TCP", "UDP", "ICMP", ... or the number
    sport: int | None = None   # None: no ports (ICMP, non-first fragment, cut off)
    dport: int | None = None
    ttl: int = 0               # hop limit for IPv6
    length: int = 0            # IP total length, from the header
    flags: str = ""            # TCP flags as tcpdump writes them ("S.", "P."), ICMP type
    version: int = 4


@dataclasses.dataclass(frozen=True)
class Decoded:
    """One captured packet, with its encapsulation peeled off.

    For an encapsulated packet `outer` is the node-to-node datagram and `inner` the
    pod's packet; for a plain IP packet `outer` is None and `inner` is the packet.
    """

    time: float
    kind: str                          # "ipv4", "ipv6", "arp", "other"
    inner: IPHeader | None = None
    outer: IPHeader | None = None
    encapsulation: str | None = None   # "udp", "vxlan", None
    vni: int | None = None
    inner_macs: tuple[str, str] | None = None   # (src, dst) of the VXLAN inner frame
    overhead: int = 0                  # outer.length - inner.length
    wire_len: int = 0                  # frame length on the wire
    captured_len: int = 0              # bytes the capture kept (snaplen)
    ifindex: int | None = None         # from a cooked (-i any) capture
    direction: str | None = None       # "In", "Out", ... from a cooked capture
    # flannel udp: the capture saw N same-size datagrams merged by the receiving
    # uplink's GRO into one; each became its own record, as it was on the wire.
    gro_merged: int = 0
    summary: str = ""                  # for ARP and other non-IP packets
    error: str | None = None           # why decoding stopped early, if it did
    # Between machines: the VXLAN datagram (a machine port) that carried the
    # fabric's frame holding all of the above, and its VNI.
    carrier: IPHeader | None = None
    carrier_vni: int | None = None

    @property
    def truncated(self) -> bool:
        return self.captured_len < self.wire_len


# --- decoding ---------------------------------------------------------------

def _tcp_flags(value: int) -> str:
    return "".join(letter for bit, letter in _TCP_FLAG_LETTERS if value & bit)


def _icmp_flags(icmp_type: int, code: int) -> str:
    name = icmptypes.get(icmp_type, f"type-{icmp_type}")
    codes = icmpcodes.get(icmp_type)
    if codes is not None:
        name += "/" + codes.get(code, f"code-{code}")
    return name


def _l4(proto: int, l4: Packet, first_fragment: bool) -> tuple[int | None, int | None, str]:
    """Ports and flags of the transport header that follows an IP header.

    A transport header cut short by snaplen comes out of scapy as Raw bytes: the
    ports are still in its first 4 bytes, so read them from there.
    """
    if not first_fragment:
        return None, None, "frag"
    if isinstance(l4, TCP):
        return l4.sport, l4.dport, _tcp_flags(int(l4.flags))
    if isinstance(l4, UDP):
        return l4.sport, l4.dport, ""
    if isinstance(l4, ICMP):
        return None, None, _icmp_flags(l4.type, l4.code)
    raw = bytes(l4)
    if proto in (6, 17, 132) and len(raw) >= 4:
        sport, dport = struct.unpack("!HH", raw[:4])
        return sport, dport, ""
    if proto == 1 and len(raw) >= 2:
        return None, None, _icmp_flags(raw[0], raw[1])
    return None, None, ""


def _ipv4_header(ip: IP) -> IPHeader:
    length = ip.len if ip.len is not None else len(ip)
    sport, dport, flags = _l4(ip.proto, ip.payload, first_fragment=ip.frag == 0)
    return IPHeader(src=ip.src, dst=ip.dst, proto=_PROTO_NAMES.get(ip.proto, str(ip.proto)),
                    sport=sport, dport=dport, ttl=ip.ttl, length=length, flags=flags)


def _ipv6_header(ip6: IPv6) -> IPHeader:
    length = (ip6.plen + 40) if ip6.plen is not None else len(ip6)
    l4 = ip6.payload
    if ip6.nh == 58:   # ICMPv6: neighbour discovery, router solicitations (IPv6 chatter)
        sport = dport = None
        flags = "" if isinstance(l4, Raw) else l4.name.removeprefix("ICMPv6 ")
    else:
        sport, dport, flags = _l4(ip6.nh, l4, first_fragment=True)
    return IPHeader(src=ip6.src, dst=ip6.dst, proto=_PROTO_NAMES.get(ip6.nh, str(ip6.nh)),
                    sport=sport, dport=dport, ttl=ip6.hlim, length=length, flags=flags, version=6)


def _as(cls: type[Packet], layer: Packet) -> Packet | None:
    """LAYER as an instance of CLS: as dissected by scapy, or dissected afresh from
    its bytes (a packet read before register_ports, or bound otherwise by scapy).
    None if the bytes are too short to hold the header."""
    if isinstance(layer, cls):
        return layer
    raw = bytes(layer)
    minimum = {IP: IP_HEADER, VXLAN: VXLAN_HEADER}.get(cls, 1)
    if len(raw) < minimum:
        return None
    return cls(raw)


def _arp_summary(arp: ARP) -> str:
    if arp.op == 1:
        return f"ARP who-has {arp.pdst} tell {arp.psrc}"
    if arp.op == 2:
        return f"ARP {arp.psrc} is-at {arp.hwsrc}"
    return f"ARP op {arp.op} {arp.psrc} > {arp.pdst}"


def _encapsulation_of(h: IPHeader) -> str | None:
    if h.proto != "UDP":
        return None
    # The well-known port is normally the destination (VXLAN picks its source port
    # by flow hash); flannel-udp uses 8285 on both sides.
    for port in (h.dport, h.sport):
        if port in _udp_ports:
            return "udp"
        if port in _vxlan_ports:
            return "vxlan"
    return None


def _decode(pkt: Packet) -> Decoded:
    wire_len = getattr(pkt, "wirelen", None) or len(pkt)
    base: dict = dict(time=float(pkt.time), wire_len=wire_len, captured_len=len(pkt))
    cooked = pkt.getlayer(CookedLinuxV2) or pkt.getlayer(CookedLinux)
    if cooked is not None:
        base["ifindex"] = getattr(cooked, "ifindex", None)
        base["direction"] = _DIRECTIONS.get(cooked.pkttype, str(cooked.pkttype))

    ip = pkt.getlayer(IP)
    if ip is None:
        if (ip6 := pkt.getlayer(IPv6)) is not None:
            return Decoded(kind="ipv6", inner=_ipv6_header(ip6), **base)
        if (arp := pkt.getlayer(ARP)) is not None:
            return Decoded(kind="arp", summary=_arp_summary(arp), **base)
        return Decoded(kind="other", summary=pkt.summary(), **base)

    first = _ipv4_header(ip)
    if first.proto == "UDP" and (first.dport in _machine_ports or first.sport in _machine_ports):
        # The fabric between machines: the frame inside is what a capture on the
        # fabric would show; decode that, and say what carried it.
        vxlan = _as(VXLAN, ip.payload.payload) if isinstance(ip.payload, UDP) else None
        frame = vxlan.payload if vxlan is not None else None
        if not isinstance(frame, Ether):
            return Decoded(kind="ipv4", inner=first, error="machine tunnel's frame missing or cut short",
                           **base)
        frame.time = pkt.time
        d = _decode(frame)
        return dataclasses.replace(d, carrier=first, carrier_vni=vxlan.vni,
                                   overhead=first.length - d.inner.length if d.inner else 0, **base)
    return _decode_ip(ip, base)


def _decode_ip(ip: IP, base: dict) -> Decoded:
    """An IPv4 packet, with flannel's encapsulation peeled off when it has one."""
    first = _ipv4_header(ip)
    encapsulation = _encapsulation_of(first)
    if encapsulation is None:
        return Decoded(kind="ipv4", inner=first, **base)

    # The ports say what is inside, even when the capture kept too little of it
    # (a UDP header cut short comes out of scapy as Raw): then inner stays None.
    udp = ip.payload
    vni = inner_macs = None
    inner_ip = None
    if not isinstance(udp, UDP):
        pass
    elif encapsulation == "udp":
        inner_ip = _as(IP, udp.payload)
    else:
        vxlan = _as(VXLAN, udp.payload)
        if vxlan is not None:
            vni = vxlan.vni
            frame = vxlan.payload
            if isinstance(frame, Ether):
                inner_macs = (frame.src, frame.dst)
                inner_ip = _as(IP, frame.payload) if frame.type == 0x0800 else None
    if inner_ip is None or not isinstance(inner_ip, IP):
        return Decoded(kind="ipv4", outer=first, encapsulation=encapsulation, vni=vni,
                       inner_macs=inner_macs, error="inner packet missing or cut short", **base)
    inner = _ipv4_header(inner_ip)
    return Decoded(kind="ipv4", outer=first, inner=inner, encapsulation=encapsulation,
                   vni=vni, inner_macs=inner_macs, overhead=first.length - inner.length, **base)


def decode_packet(pkt: Packet) -> Decoded:
    """Decode one scapy packet. Never raises: a packet scapy cannot make sense of
    comes back as kind "other" with `error` set."""
    try:
        return _decode(pkt)
    except Exception as exc:  # a capture may hold anything; one bad packet must not stop the rest
        length = len(bytes(pkt)) if pkt is not None else 0
        return Decoded(time=float(getattr(pkt, "time", 0.0) or 0.0), kind="other",
                       wire_len=getattr(pkt, "wirelen", None) or length, captured_len=length,
                       error=f"{type(exc).__name__}: {exc}")


# --- reading ----------------------------------------------------------------

def read_pcap(source: str | BinaryIO) -> Iterator[Packet]:
    """Stream the packets of a pcap or pcapng file (scapy's PcapReader tells the
    two apart by their magic number) without loading it whole. SOURCE is a path or
    a binary file object (a pipe from `tcpdump -w -` works too).

    An empty file (tcpdump killed before writing anything) yields nothing; a file
    cut off in the middle of a record (tcpdump killed, or still writing) ends at
    the last readable packet instead of raising.
    """
    try:
        reader = PcapReader(source)
    except Scapy_Exception as exc:
        if "No data could be read" in str(exc):
            return
        raise
    with reader:
        while True:
            try:
                pkt = reader.read_packet()
            except EOFError:
                return
            except (Scapy_Exception, struct.error, OSError):
                # A torn last record: everything before it has been yielded.
                return
            if pkt is None:
                return
            yield pkt


def decode_packets(pkt: Packet) -> list[Decoded]:
    """decode_packet, except that a flannel udp datagram holding several inner
    packets back to back gives one record per inner packet.

    On the wire every UDP/8285 datagram holds exactly one inner packet; a capture
    on an arriving node's uplink sees them after GRO, which merges same-size
    datagrams of one node pair for a UDP GRO socket (the fast udp path's) into
    one. The records carry the outer header of each original datagram (length
    28 + inner length) and `gro_merged`."""
    d = decode_packet(pkt)
    if d.encapsulation != "udp" or d.inner is None or d.outer is None:
        return [d]
    try:
        payload = bytes(pkt[UDP].payload)
    except (IndexError, AttributeError):
        return [d]
    chunks, at = [], 0
    while at + 20 <= len(payload) and payload[at] >> 4 == 4:
        length = int.from_bytes(payload[at + 2:at + 4], "big")
        if length < 20 or at + length > len(payload):
            break
        chunks.append(payload[at:at + length])
        at += length
    if len(chunks) < 2 or at != len(payload):
        return [d]
    out = []
    for chunk in chunks:
        inner = _ipv4_header(IP(chunk))
        outer = dataclasses.replace(d.outer, length=inner.length + 28)
        out.append(dataclasses.replace(d, inner=inner, outer=outer, overhead=28, gro_merged=len(chunks)))
    return out


def decode_pcap(path: str) -> Iterator[Decoded]:
    """decode_packets over every packet of a capture file."""
    for pkt in read_pcap(path):
        yield from decode_packets(pkt)


# --- printing one packet ----------------------------------------------------

def _endpoint(addr: str, port: int | None, version: int = 4) -> str:
    if port is None:
        return addr
    return f"[{addr}]:{port}" if version == 6 else f"{addr}:{port}"


def _describe(h: IPHeader) -> str:
    text = f"{_endpoint(h.src, h.sport, h.version)} > {_endpoint(h.dst, h.dport, h.version)} {h.proto}"
    if h.flags:
        text += f" [{h.flags}]" if h.proto == "TCP" else f" {h.flags}"
    return text + f" ttl {h.ttl} len {h.length}"


def format_decoded(d: Decoded, with_time: bool = False) -> str:
    """One line per packet, e.g.
    `172.30.0.1:8285 > 172.30.0.2:8285 UDP/flannel  |  10.244.1.2:5201 > 10.244.2.2:42112 TCP [S.] ttl 63 len 60`
    """
    parts = []
    if with_time:
        parts.append(datetime.datetime.fromtimestamp(d.time).strftime("%H:%M:%S.%f"))
    if d.ifindex is not None:
        parts.append(f"if{d.ifindex}")
    if d.direction is not None:
        parts.append(d.direction)
    if d.carrier is not None:
        c = d.carrier
        parts.append(f"{_endpoint(c.src, c.sport)} > {_endpoint(c.dst, c.dport)} VXLAN vni {d.carrier_vni} "
                     "(machines)  |")
    if d.kind in ("arp", "other") and d.inner is None and d.outer is None:
        parts.append(d.summary or d.kind)
    elif d.outer is not None:
        o = d.outer
        tag = "UDP/flannel" if d.encapsulation == "udp" else f"VXLAN vni {d.vni}"
        outer = f"{_endpoint(o.src, o.sport)} > {_endpoint(o.dst, o.dport)} {tag}"
        if d.inner is None:
            parts.append(f"{outer}  |  ?")
        else:
            macs = f"{d.inner_macs[0]} > {d.inner_macs[1]}  " if d.inner_macs else ""
            parts.append(f"{outer}  |  {macs}{_describe(d.inner)}")
    else:
        assert d.inner is not None
        parts.append(_describe(d.inner))
    line = " ".join(parts)
    if d.truncated:
        line += f" [captured {d.captured_len} of {d.wire_len}]"
    if d.gro_merged:
        line += f" [1 of {d.gro_merged} datagrams merged by GRO before the capture]"
    if d.error:
        line += f" [{d.error}]"
    return line


# --- flows ------------------------------------------------------------------

@dataclasses.dataclass
class Flow:
    """Packets of one direction of one conversation, as the pod sees it (inner
    5-tuple), and what carrying them over the underlay cost.

    `bytes` counts inner IP bytes, `outer_bytes` the IP bytes on the underlay
    (equal to `bytes` when not encapsulated).
    """

    encapsulation: str          # "none", "udp", "vxlan"
    proto: str
    src: str
    sport: int | None
    dst: str
    dport: int | None
    vni: int | None = None
    carrier_vni: int | None = None      # between machines: the machine tunnel's VNI
    outer_src: str | None = None
    outer_dst: str | None = None
    packets: int = 0
    bytes: int = 0
    outer_bytes: int = 0
    first: float = 0.0
    last: float = 0.0

    @property
    def overhead(self) -> int:
        return self.outer_bytes - self.bytes

    @property
    def overhead_pct(self) -> float:
        """Share of the underlay's bytes spent on encapsulation headers."""
        return 100.0 * self.overhead / self.outer_bytes if self.outer_bytes else 0.0


class FlowTable:
    """Adds decoded packets up into flows.

    IPv4 packets (plain or encapsulated) become flows; everything else (ARP, IPv6,
    undecodable or cut-off packets) is counted in `others` by kind.
    """

    def __init__(self) -> None:
        self._flows: dict[tuple, Flow] = {}
        self.others: Counter[str] = Counter()

    def add(self, d: Decoded) -> None:
        if d.kind != "ipv4" or d.inner is None:
            self.others["ipv4 (undecodable)" if d.kind == "ipv4" else d.kind] += 1
            return
        i, o = d.inner, d.outer
        encapsulation = d.encapsulation or "none"
        key = (encapsulation, d.vni, d.carrier_vni, o.src if o else None, o.dst if o else None,
               i.proto, i.src, i.sport, i.dst, i.dport)
        flow = self._flows.get(key)
        if flow is None:
            flow = self._flows[key] = Flow(
                encapsulation=encapsulation, proto=i.proto, src=i.src, sport=i.sport,
                dst=i.dst, dport=i.dport, vni=d.vni, carrier_vni=d.carrier_vni,
                outer_src=o.src if o else None, outer_dst=o.dst if o else None, first=d.time)
        flow.packets += 1
        flow.bytes += i.length
        flow.outer_bytes += d.carrier.length if d.carrier else o.length if o else i.length
        flow.last = d.time

    def flows(self) -> list[Flow]:
        """Biggest first (by underlay bytes), then in order of first appearance."""
        return sorted(self._flows.values(), key=lambda f: -f.outer_bytes)


def flow_summary(decoded: Iterable[Decoded]) -> list[Flow]:
    table = FlowTable()
    for d in decoded:
        table.add(d)
    return table.flows()


def format_flows(flows: Iterable[Flow], others: Counter[str] | dict[str, int] | None = None) -> str:
    """A text table of flows, with a footer line for packets that are not in flows."""
    header = ("ENCAP", "PROTO", "SOURCE", "DESTINATION", "UNDERLAY", "PACKETS", "BYTES",
              "UNDERLAY BYTES", "OVERHEAD", "OVH %")
    rows = []
    for f in flows:
        encap = f"vxlan/{f.vni}" if f.encapsulation == "vxlan" else f.encapsulation
        if f.carrier_vni is not None:
            encap += f" in vxlan/{f.carrier_vni}"
        underlay = f"{f.outer_src} > {f.outer_dst}" if f.outer_src else "-"
        rows.append((encap, f.proto, _endpoint(f.src, f.sport), _endpoint(f.dst, f.dport), underlay,
                     str(f.packets), str(f.bytes), str(f.outer_bytes), str(f.overhead),
                     f"{f.overhead_pct:.1f}"))
    widths = [max(len(r[c]) for r in [header, *rows]) for c in range(len(header))]
    numeric = set(range(5, len(header)))
    lines = ["  ".join(cell.rjust(w) if c in numeric else cell.ljust(w)
                       for c, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in [header, *rows]]
    if others:
        lines.append("not in flows: " + ", ".join(f"{n} {kind}" for kind, n in sorted(others.items())))
    return "\n".join(lines)
