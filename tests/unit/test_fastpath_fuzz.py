"""Whatever arrives on the udp backend's port, the rx worker neither raises nor
crashes, drops and counts what is bad, and still delivers the good datagrams of
the same batch, byte for byte (issue 12, item 3: a 9-byte GRO batch of 1-byte
segments crashed the worker).

The worker's receive path (fastudp.Worker.receive: control message, source
checks, coalescing, per-datagram validation) runs as in the worker, on its real
code, with flannel0 replaced by a real kernel socket pair (SOCK_SEQPACKET keeps
each write one record, as a TUN does). Every test runs with the compiled helper
(_vnetc.c) and with the numpy/Python code."""

from __future__ import annotations

import collections
import ipaddress
import random
import socket
import struct

import pytest

from netemu.overlay import fastudp, vnet
from netemu.overlay.packet import decrement_ttl, internet_checksum, ipv4_problem

PEER = "172.31.9.12"                              # the sending node's underlay address
PEER_SUBNET = ipaddress.IPv4Network("10.244.2.0/24")
OUR_POD = ipaddress.IPv4Address("10.244.1.5").packed
STRANGERS = [ipaddress.IPv4Address(a).packed for a in
             ("8.8.8.8", "127.0.0.1", "10.244.1.5", "10.244.1.0", "172.31.9.11", "10.244.3.9", "0.0.0.0")]
GRO = (fastudp.SOL_UDP, fastudp.UDP_GRO)


class Rx:
    """A worker's receive side writing into one end of a socket pair."""

    def __init__(self, implementation: str, udp_merge: bool = True):
        self.tun, self.reader = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.tun.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.reader.setblocking(False)
        self.counters = memoryview(bytearray(fastudp.BLOCK)).cast("q")
        self.worker = fastudp.Worker(self.tun.fileno(), None, 8285, bytes(4), True, self.counters)
        self.worker.compiled = implementation == "compiled"
        assert self.worker.compiled_sources == self.worker.compiled or implementation == "numpy"
        self.worker.udp_merge = udp_merge
        self.worker.peers.replace({str(PEER_SUBNET): PEER, "10.244.3.0/24": "172.31.9.13"})

    def close(self) -> None:
        self.tun.close()
        self.reader.close()

    def receive(self, batch: bytes, ancillary, source: str = PEER) -> list[bytes]:
        self.worker.receive(memoryview(bytearray(batch)), ancillary, source)
        out = []
        while True:
            try:
                out.append(self.reader.recv(1 << 18))
            except BlockingIOError:
                return out

    def count(self, name: str) -> int:
        return self.counters[fastudp.COUNTERS.index(name)]


# -- datagrams --------------------------------------------------------------------------------

def ip_header(total: int, ident: int, ttl: int, proto: int, src: bytes, dst: bytes) -> bytearray:
    h = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, ident, 0x4000, ttl, proto, 0, src, dst))
    h[10:12] = internet_checksum(h).to_bytes(2, "big")
    return h


def l4_checksum(header: bytes, segment: bytearray, at: int, proto: int) -> None:
    pseudo = header[12:20] + struct.pack("!BBH", 0, proto, len(segment))
    csum = internet_checksum(pseudo + segment)
    if proto == 17 and csum == 0:
        csum = 0xFFFF
    segment[at:at + 2] = csum.to_bytes(2, "big")


class Flows:
    """Valid UDP and TCP datagrams of a few flows, each with a payload no other has."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.ids = collections.defaultdict(lambda: rng.randrange(65536))
        self.seqs = collections.defaultdict(lambda: rng.randrange(1 << 32))

    def payload(self, n: int) -> bytes:
        return self.rng.randbytes(n)

    def udp(self, length: int, src: bytes | None = None, ttl: int = 64) -> bytes | None:
        if length < 29:
            return None
        src = src or PEER_SUBNET[self.rng.choice([0, 2, 3])].packed     # [0]: the node's flannel0
        flow = (src, self.rng.randrange(2))
        ident = self.ids[flow] = (self.ids[flow] + 1) & 0xFFFF
        header = ip_header(length, ident, ttl, 17, src, OUR_POD)
        udp = bytearray(struct.pack("!HHHH", 4000 + flow[1], 53, length - 20, 0) + self.payload(length - 28))
        l4_checksum(header, udp, 6, 17)
        return bytes(header + udp)

    def tcp(self, length: int, src: bytes | None = None) -> bytes | None:
        if length < 41:
            return None
        src = src or PEER_SUBNET[2].packed
        flow = (src, 0)
        ident = self.ids[flow] = (self.ids[flow] + 1) & 0xFFFF
        seq = self.seqs[flow]
        self.seqs[flow] = (seq + length - 40) & 0xFFFFFFFF
        header = ip_header(length, ident, 64, 6, src, OUR_POD)
        tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, seq, 77, 5 << 4, 0x10, 501, 0, 0)
                        + self.payload(length - 40))
        l4_checksum(header, tcp, 16, 6)
        return bytes(header + tcp)


def test_tcp_with_a_data_offset_under_five_is_not_merged(implementation):
    """A TCP 'header' shorter than 20 bytes (data offset 0-4), checksums valid:
    delivered one by one as they came (the pod's kernel judges them), never
    merged into a super-packet with a header that is not one."""
    rng = random.Random(12_503)
    for offset in range(5):
        rx = Rx(implementation)
        try:
            flows = Flows(rng)
            sent = []
            for i in range(4):
                d = bytearray(flows.tcp(600))
                d[32] = offset << 4
                d[24:28] = (1000 + i * 580).to_bytes(4, "big")    # contiguous for a 20-byte "header"
                d[36:38] = b"\0\0"
                l4 = d[20:]
                l4_checksum(d[:20], l4, 16, 6)
                sent.append(bytes(d[:20] + l4))
            records = rx.receive(b"".join(sent), [(*GRO, struct.pack("i", 600))])
            assert all(vnet.VNET_HDR.unpack_from(r)[1] == vnet.GSO_NONE for r in records)
            check_output(records, sent)
        finally:
            rx.close()


def garbage_header(rng: random.Random, length: int) -> bytes:
    """Random bytes with an IPv4-looking start: version 4, random IHL and total
    length, a header checksum that checks out where the header fits."""
    d = bytearray(rng.randbytes(length))
    if length:
        d[0] = 0x40 | rng.randrange(16)
    if length >= 4:
        d[2:4] = rng.choice([length, rng.randrange(65536), 0, 20]).to_bytes(2, "big")
    ihl = (d[0] & 0x0F) * 4 if length else 0
    if 20 <= ihl <= length:
        d[10:12] = b"\0\0"
        d[10:12] = internet_checksum(d[:ihl]).to_bytes(2, "big")
    return bytes(d)


def datagram(rng: random.Random, flows: Flows, length: int, kind: str) -> bytes:
    made = None
    if kind == "udp":
        made = flows.udp(length)
    elif kind == "tcp":
        made = flows.tcp(length)
    elif kind == "spoofed":
        made = flows.udp(length, src=rng.choice(STRANGERS))
    elif kind == "ttl":
        made = flows.udp(length, ttl=rng.choice([0, 1]))
    elif kind == "mangled":
        made = flows.udp(length) or flows.tcp(length)
        if made is not None:
            made = bytearray(made)
            for _ in range(rng.randrange(1, 4)):
                made[rng.randrange(min(len(made), 40))] ^= rng.randrange(1, 256)
            made = bytes(made)
    elif kind == "header":
        made = garbage_header(rng, length)
    return made if made is not None else rng.randbytes(length)


def batch_of(rng: random.Random, total: int, size: int, kinds: list[str]) -> list[bytes]:
    if total == 0:
        return [b""]                                # an empty receive: one empty datagram
    flows = Flows(rng)
    kind = rng.choice(kinds)
    out = []
    for at in range(0, total, size):
        if rng.random() < 0.3:
            kind = rng.choice(kinds)                # runs of one kind, so that runs merge
        out.append(datagram(rng, flows, min(size, total - at), kind))
    return out


# -- what must come out ------------------------------------------------------------------------

def deliverable(d: bytes, source: str = PEER) -> bool:
    leases = {PEER: PEER_SUBNET, "172.31.9.13": ipaddress.IPv4Network("10.244.3.0/24")}
    return (ipv4_problem(d) is None and ipaddress.IPv4Address(bytes(d[12:16])) in leases[source]
            and d[8] > 1)


def check_output(records: list[bytes], sent: list[bytes]) -> None:
    """RECORDS (what was written to flannel0) are exactly the deliverable datagrams
    of SENT, each once, TTL one lower: whole (an empty vnet header), or merged
    into a super-packet whose segments carry their payloads in order."""
    singles: collections.Counter = collections.Counter()
    chunks: collections.Counter = collections.Counter()
    for record in records:
        flags, gso_type, hdr_len, gso_size, csum_start, csum_offset = vnet.VNET_HDR.unpack_from(record)
        packet = record[vnet.VNET_HDR_LEN:]
        if gso_type == vnet.GSO_NONE:
            assert flags == 0 and ipv4_problem(packet) is None
            singles[packet] += 1
            continue
        assert gso_type in (vnet.GSO_TCPV4, vnet.GSO_UDP_L4) and gso_size > 0
        assert ipv4_problem(packet) is None and internet_checksum(packet[:20]) == 0
        assert (csum_start, csum_offset) == (20, 16 if gso_type == vnet.GSO_TCPV4 else 6)
        body = packet[hdr_len:]
        pieces = [body[i:i + gso_size] for i in range(0, len(body), gso_size)]
        assert len(pieces) >= 2
        for piece in pieces:
            chunks[(bytes(packet[12:20]), packet[8] + 1, piece)] += 1
    for d in sent:
        if not deliverable(d):
            continue
        out = bytearray(d)
        assert decrement_ttl(out)
        if singles[bytes(out)]:
            singles[bytes(out)] -= 1
            continue
        hdr = 20 + ((d[32] >> 4) * 4 if d[9] == 6 else 8)
        key = (d[12:20], d[8], d[hdr:])
        assert chunks[key], f"a valid datagram went missing: {d.hex()}"
        chunks[key] -= 1
    assert not +singles, f"written but not sent (or not deliverable): {list(+singles)}"
    assert not +chunks, f"merged but not sent (or not deliverable): {list(+chunks)}"


def check_counts(rx: Rx, before: dict, sent: list[bytes], delivered: int) -> None:
    now = {name: rx.count(name) for name in fastudp.COUNTERS}
    assert now["drop_internal_error"] == 0
    dropped = sum(now[k] - before[k] for k in ("drop_malformed", "drop_spoofed_source", "drop_ttl"))
    assert now["rx_packets"] - before["rx_packets"] == delivered
    assert dropped == len(sent) - delivered
    assert now["drop_malformed"] - before["drop_malformed"] == sum(
        now[fastudp.malformed_counter(r)] - before[fastudp.malformed_counter(r)] for r in fastudp.MALFORMED)


# -- the tests ---------------------------------------------------------------------------------

KINDS = ["udp", "tcp", "spoofed", "ttl", "mangled", "header", "garbage"]


def run_batch(rx: Rx, sent: list[bytes], size: int) -> None:
    before = {name: rx.count(name) for name in fastudp.COUNTERS}
    batch = b"".join(sent)
    records = rx.receive(batch, [(*GRO, struct.pack("i", size))])
    check_output(records, sent)
    check_counts(rx, before, sent, sum(1 for d in sent if deliverable(d)))


def test_the_issues_datagram_nine_one_byte_segments(implementation):
    rx = Rx(implementation)
    try:
        assert rx.receive(bytes(range(9)), [(*GRO, struct.pack("i", 1))]) == []
        assert rx.count("drop_malformed") == rx.count("malformed_truncated") == 9
        assert rx.count("drop_internal_error") == 0
    finally:
        rx.close()


@pytest.mark.parametrize("udp_merge", [True, False])
def test_gso_batches_of_every_size_up_to_100_bytes(implementation, udp_merge):
    rng = random.Random(12_003 + udp_merge)
    rx = Rx(implementation, udp_merge)
    try:
        for total in range(0, 101):
            sizes = {1, 2, 19, 20, 21, 28, 29, 40, 41, total or 1, total + 1}
            sizes |= {rng.randrange(1, total + 2) for _ in range(6)}
            for size in sorted(sizes):
                for _ in range(3):
                    run_batch(rx, batch_of(rng, total, size, KINDS), size)
    finally:
        rx.close()


@pytest.mark.parametrize("udp_merge", [True, False])
def test_large_batches_mixing_good_and_bad(implementation, udp_merge):
    """Batches big enough for runs to merge (TCP super-packets, UDP GSO ones),
    with hostile datagrams among them."""
    rng = random.Random(12_103 + udp_merge)
    rx = Rx(implementation, udp_merge)
    try:
        for _ in range(300):
            size = rng.choice([40, 41, 60, 100, 576, 1000, 1420, 1472, rng.randrange(20, 1500)])
            total = rng.randrange(0, min(65_000, size * 60))
            kinds = rng.choice([["udp"], ["tcp"], ["udp", "tcp"], KINDS, ["udp", "spoofed"], ["tcp", "mangled"]])
            run_batch(rx, batch_of(rng, total, size, kinds), size)
    finally:
        rx.close()


def test_single_datagrams_of_every_length(implementation):
    rng = random.Random(12_203)
    rx = Rx(implementation)
    try:
        for length in range(0, 101):
            for kind in KINDS:
                d = datagram(rng, Flows(rng), length, kind)
                before = {name: rx.count(name) for name in fastudp.COUNTERS}
                check_output(rx.receive(d, []), [d])
                check_counts(rx, before, [d], int(deliverable(d)))
    finally:
        rx.close()


@pytest.mark.parametrize("cdata", [b"", b"\x01", b"\x01\x00", struct.pack("i", 0), struct.pack("i", -1),
                                   struct.pack("i", -(1 << 31))])
def test_a_gro_message_without_a_usable_size_is_dropped(implementation, cdata):
    rx = Rx(implementation)
    try:
        good = Flows(random.Random(1)).udp(100)
        assert rx.receive(good * 3, [(*GRO, cdata)]) == []
        assert rx.count("malformed_segment_size") == rx.count("drop_malformed") == 1
        assert rx.count("drop_internal_error") == 0
        # and the worker goes on
        assert len(rx.receive(good, [])) == 1
    finally:
        rx.close()


def test_inner_sources_outside_the_senders_lease_are_dropped_and_counted(implementation):
    """Spoofed inner sources: not the sending peer's pods (8.8.8.8, loopback, our
    own pod and addresses, another peer's pod); the peer's own flannel0 address
    and pods pass."""
    rng = random.Random(12_010)
    rx = Rx(implementation)
    try:
        flows = Flows(rng)
        spoofed = [flows.udp(100, src=s) for s in STRANGERS]
        for d in spoofed:
            assert rx.receive(d, []) == []
        # the same from another peer: 10.244.3.9 is that one's own
        assert len(rx.receive(flows.udp(100, src=ipaddress.IPv4Address("10.244.3.9").packed), [],
                              source="172.31.9.13")) == 1
        assert rx.count("drop_spoofed_source") == len(spoofed)
        legit = [flows.udp(100, src=PEER_SUBNET[i].packed) for i in (0, 1, 7, 255)]
        for d in legit:
            assert len(rx.receive(d, [])) == 1
        # within a GRO batch: only the forged one goes
        batch = [flows.udp(100), flows.udp(100, src=STRANGERS[0]), flows.udp(100)]
        before = rx.count("drop_spoofed_source")
        check_output(rx.receive(b"".join(batch), [(*GRO, struct.pack("i", 100))]), batch)
        assert rx.count("drop_spoofed_source") == before + 1
    finally:
        rx.close()


def test_unknown_outer_source_is_dropped(implementation):
    rx = Rx(implementation)
    try:
        good = Flows(random.Random(2)).udp(100)
        assert rx.receive(good * 3, [(*GRO, struct.pack("i", 100))], source="172.31.9.99") == []
        assert rx.count("drop_unknown_source") == 3
    finally:
        rx.close()


def test_the_coalescing_functions_take_any_bytes(implementation):
    """Straight into vnet (compiled or numpy): garbage of any length and any
    segment size gives datagrams back or ValueError, never anything else."""
    rng = random.Random(12_303)
    for _ in range(3000):
        buffer = rng.randbytes(rng.randrange(0, 400))
        size = rng.choice([rng.randrange(1, 80), rng.randrange(-3, 1), 1 << 40, (1 << 63) - 1])
        for fn in (vnet.coalesce, vnet.coalesce_udp):
            try:
                result = fn(buffer, size)
            except ValueError:
                assert size < 1
                continue
            assert size >= 1
            assert result.merged + len(result.singles) <= max(1, -(-len(buffer) // size))
    for _ in range(2000):
        packet = bytearray(rng.randbytes(rng.randrange(0, 120)))
        mss = rng.choice([0, 1, rng.randrange(1, 2000), 70_000, -1])
        try:
            vnet.segment(packet, mss)
        except ValueError:
            assert not vnet.segmentable(packet, mss)
        vnet.forward(packet, rng.randrange(4), rng.choice([0, 20, 1 << 62, -1]),
                     rng.choice([0, 16, 1 << 62, -5]))


def test_the_tx_side_drops_what_it_cannot_cut(implementation):
    """A TUN read of a TCP 'super-packet' with a header that does not fit, or an
    MSS of 0, is counted, not a crash (the kernel should never hand us one)."""
    rx = Rx(implementation)
    try:
        worker = rx.worker
        for payload in (bytes(10), bytes(45), b"\x4f" + bytes(59), b"\x45" + bytes(8) + b"\x06" + bytes(30)):
            for mss in (0, 1, 1400):
                data = bytearray(vnet.VNET_HDR.pack(0, vnet.GSO_TCPV4, 0, mss, 0, 0) + payload)
                data[vnet.VNET_HDR_LEN + 16:vnet.VNET_HDR_LEN + 20] = PEER_SUBNET[2].packed
                worker.forward_one(memoryview(data), len(data), False)
        assert worker.counters[fastudp.COUNTERS.index("tx_packets")] == 0
    finally:
        rx.close()


def test_the_compiled_source_check_agrees_with_the_python_one():
    if not vnet.COMPILED:
        pytest.skip("netemu.overlay._vnetc was not built (no C compiler at install)")
    rng = random.Random(12_403)
    rx = Rx("compiled")
    try:
        for _ in range(3000):
            size = rng.randrange(20, 120)
            flows = Flows(rng)
            sent = [flows.udp(size) or rng.randbytes(size) for _ in range(rng.randrange(1, 6))]
            if rng.random() < 0.5:
                sent[rng.randrange(len(sent))] = rng.randbytes(size)
            batch = b"".join(sent)[:rng.randrange(1, size * len(sent) + 1)]
            rx.worker.compiled = True
            compiled = rx.worker.sources_leased(memoryview(batch), size, PEER)
            rx.worker.compiled = False
            assert rx.worker.sources_leased(memoryview(batch), size, PEER) == compiled
    finally:
        rx.close()


def test_the_compiled_ipv4_check_agrees_with_the_python_one():
    """The rx worker's per-datagram check (issue 17: one C call on the latency
    path) names the same problem as packet.ipv4_problem, or none, for valid,
    mangled and random datagrams, from bytes and from memoryview slices."""
    if not vnet.COMPILED:
        pytest.skip("netemu.overlay._vnetc was not built (no C compiler at install)")
    rng = random.Random(17)
    flows = Flows(rng)
    checked = collections.Counter()
    for _ in range(20_000):
        kind = rng.random()
        if kind < 0.3:
            data = bytearray(flows.udp(rng.randrange(20, 200)) or rng.randbytes(40))
        elif kind < 0.8:
            data = bytearray(flows.udp(rng.randrange(20, 200)) or rng.randbytes(40))
            for _ in range(rng.randrange(1, 3)):                 # mangle a header byte or cut it short
                if data and rng.random() < 0.2:
                    data = data[:rng.randrange(0, len(data))]
                elif data:
                    data[rng.randrange(min(len(data), 24))] = rng.randrange(256)
        else:
            data = bytearray(rng.randbytes(rng.randrange(0, 80)))
            if data and rng.random() < 0.7:
                data[0] = 0x40 | rng.randrange(16)
        want = ipv4_problem(bytes(data))
        offset = rng.randrange(3)
        view = memoryview(bytearray(offset) + data)[offset:]
        for candidate in (bytes(data), view):
            got = vnet.native.ipv4_problem(candidate)
            assert (fastudp.MALFORMED[got - 1] if got else None) == want, (bytes(data), got, want)
        checked[want] += 1
    assert set(checked) == {None, *fastudp.MALFORMED[:5]}, checked        # every answer was met
