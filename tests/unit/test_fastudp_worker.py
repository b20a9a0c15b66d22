"""The compiled udp worker (fastudp_worker.c) against the Python worker
(fastudp.py), its reference: the same inputs through both, as processes with
their real command lines, give the same bytes out, in the same order, and the
same counters (issue 17). One corpus per direction covers every rule: small
packets with and without a checksum left to finish, TCP super-packets cut,
no route (the ICMP error written back), TTL, IPv6 chatter, GSO types we do not
offer; on the way in, valid, spoofed, malformed and unknown-source datagrams,
and GRO batches merged (TCP and UDP), mixed, or with a segment size that holds
no header.

flannel0 is a SOCK_SEQPACKET pair (one record per write, RWF_NOWAIT honoured,
as a TUN); the underlay is loopback: the peer node is 127.0.0.2, a stranger
127.0.0.3. No root needed."""

from __future__ import annotations

import ipaddress
import os
import random
import select
import socket
import struct
import subprocess
import time

import pytest

from netemu.overlay import fastudp, udp, vnet
from netemu.overlay.packet import internet_checksum
from tests.unit.test_fastpath_fuzz import Flows, ip_header, l4_checksum

pytestmark = pytest.mark.skipif(not vnet.COMPILED, reason="no C compiler: neither C part was built")

PEER, STRANGER = "127.0.0.2", "127.0.0.3"
PEERS = {"10.244.2.0/24": PEER, "10.244.3.0/24": "127.0.0.4"}
POD = ipaddress.IPv4Address("10.244.1.5").packed
REMOTE = ipaddress.IPv4Address("10.244.2.5").packed
TUN_ADDRESS = "10.244.1.0"
MARKER = 0xBEEF                                   # the IP id of the last packet sent to a worker
IMPLEMENTATIONS = ("compiled", "python")


def test_the_compiled_worker_was_built_with_the_helper():
    """Where the C helper was built, so was the worker (the same compiler, one
    build step): CI must not run the Python worker unawares."""
    assert fastudp.compiled_worker({}) == fastudp.WORKER
    assert fastudp.compiled_worker({fastudp.WORKER_ENV: "python"}) is None


def test_the_compiled_worker_counts_in_the_python_workers_slots():
    names = subprocess.run([fastudp.WORKER, "--counters"], capture_output=True, text=True, check=True).stdout
    assert names.split() == list(fastudp.COUNTERS)


@pytest.mark.parametrize("argv", [[], ["tx"], ["up", "3", "4", "5", "8285", "10.244.1.0"],
                                  ["tx", "3", "4", "5", "8285", "10.244.1.0", "--fast"],
                                  ["rx", "x", "4", "5", "8285", "10.244.1.0"],
                                  ["rx", "3", "4", "5", "8285", "not-an-address"]])
def test_a_bad_command_line_exits_2_with_the_usage(argv):
    done = subprocess.run([fastudp.WORKER, *argv], capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert done.returncode == 2 and "usage: fastudp-worker {tx|rx}" in done.stderr


def test_peer_lines_round_trip_and_reject_what_is_not_one():
    line = fastudp.peer_line(PEERS)
    assert line == b"peers 10.244.2.0/24=127.0.0.2 10.244.3.0/24=127.0.0.4\n"
    assert fastudp.parse_peer_line(line.decode()) == PEERS
    assert fastudp.parse_peer_line("peers\n") == {}
    assert fastudp.parse_peer_line('{"peers": {}}') is None
    assert fastudp.parse_peer_line("peers 10.244.2.0/24") is None


def test_worker_direction_knows_both_workers():
    """(What the bench's CPU split and tools/bench_up.py's roles go by.)"""
    assert fastudp.worker_direction([b"/x/netemu/overlay/fastudp-worker", b"rx", b"20"]) == "rx"
    assert fastudp.worker_direction([b"/venv/bin/python", b"-S", b"-m", b"netemu.overlay.fastudp", b"tx"]) == "tx"
    assert fastudp.worker_direction([b"/venv/bin/python", b"-S", b"-m", b"netemu.overlay.fastudp", b"rx", b"20"]) == "rx"
    assert fastudp.worker_direction([b"/venv/bin/python", b"-m", b"netemu.overlay.fastudp", b"tx", b"20"]) == "tx"
    assert fastudp.worker_direction([b"/venv/bin/python", b"-m", b"netemu.node.agent", b"c", b"n1"]) is None
    assert fastudp.worker_direction([b"/usr/bin/fastudp-helper", b"tx"]) is None
    assert fastudp.worker_direction([b"/x/fastudp-worker", b"--counters"]) is None


class Worker:
    """One worker process (IMPLEMENTATION, DIRECTION) on a socket pair for
    flannel0 and a loopback UDP socket; `other` is flannel0's far end."""

    def __init__(self, implementation: str, direction: str, port: int):
        self.tun, self.other = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        for s in (self.tun, self.other):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        have = fastudp.tune_socket(self.sock)
        self.memory = fastudp.counters_memory()
        environ = dict(udp.worker_environment(), **({fastudp.WORKER_ENV: "python"} if implementation == "python" else {}))
        argv = fastudp.worker_argv([direction, str(self.tun.fileno()), str(self.sock.fileno()), str(self.memory),
                                    str(port), TUN_ADDRESS] + (["--gso"] if have["gso"] else []), environ)
        assert (fastudp.worker_direction([a.encode() for a in argv]) == direction
                and (argv[0] == fastudp.WORKER) == (implementation == "compiled"))
        self.direction = direction
        self.process = subprocess.Popen(argv, stdin=subprocess.PIPE, env=environ,
                                        pass_fds=(self.tun.fileno(), self.sock.fileno(), self.memory))
        self.process.stdin.write(fastudp.peer_line(PEERS))
        self.process.stdin.flush()
        self.wait_for(lambda: fastudp.read_heartbeat(self.memory, direction) > 0, "the worker's start")

    @staticmethod
    def wait_for(condition, what: str, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            time.sleep(0.01)

    def counters(self) -> dict[str, int]:
        """The counters once the worker sleeps on an empty input: it counts a
        packet after sending or writing it, so whoever holds the packet may be
        ahead of the count (a race seen on a loaded machine)."""
        def asleep() -> bool:
            beat = fastudp.read_heartbeat(self.memory, self.direction)
            with open(f"/proc/{self.process.pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
            return state == "S" and fastudp.read_heartbeat(self.memory, self.direction) == beat
        self.wait_for(asleep, "the worker to sleep")
        return fastudp.read_counters(self.memory)

    def records(self) -> list[bytes]:
        """What the worker wrote into flannel0 so far."""
        out = []
        while select.select([self.other], [], [], 0)[0]:
            out.append(self.other.recv(1 << 18))
        return out

    def close(self) -> None:
        self.process.stdin.close()                     # end of input: the worker exits
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise AssertionError("the worker did not exit at the end of its input") from None
        for s in (self.tun, self.other, self.sock):
            s.close()
        os.close(self.memory)


# -- TUN -> UDP -------------------------------------------------------------------------------

def tun_record(packet: bytes, flags: int = 0, gso_type: int = vnet.GSO_NONE, gso_size: int = 0,
               csum_start: int = 0, csum_offset: int = 0) -> bytes:
    header_length = 0 if gso_type == vnet.GSO_NONE else 52
    return vnet.VNET_HDR.pack(flags, gso_type, header_length, gso_size, csum_start, csum_offset) + packet


def outgoing(size: int, ident: int, ttl: int = 64, dst: bytes = REMOTE, proto: int = 17,
             partial: bool = False) -> bytes:
    """A pod's packet as the TUN hands it over: UDP (or PROTO), with only the
    pseudo-header sum in the checksum if PARTIAL (NEEDS_CSUM)."""
    header = ip_header(size, ident, ttl, proto, POD, dst)
    body = bytearray(struct.pack("!HHHH", 5000, 6000, size - 20, 0) + bytes((ident + i) & 0xFF for i in range(size - 28)))
    if partial:
        pseudo = sum(struct.unpack("!4H", bytes(header[12:20]))) + proto + size - 20
        while pseudo > 0xFFFF:
            pseudo = (pseudo & 0xFFFF) + (pseudo >> 16)
        body[6:8] = pseudo.to_bytes(2, "big")
        return tun_record(bytes(header + body), flags=vnet.VNET_F_NEEDS_CSUM, csum_start=20, csum_offset=6)
    l4_checksum(header, body, 6, proto)
    return tun_record(bytes(header + body))


def options(ihl: int, dst: bytes) -> bytes:
    """A UDP packet with an IHL-byte header (options: no-ops), for DST."""
    header = bytearray(ip_header(ihl + 16, 70, 64, 17, POD, dst))
    header[0] = 0x40 | ihl // 4
    header[20:] = b""
    header += bytes([1]) * (ihl - 20)
    header[10:12] = b"\0\0"
    header[10:12] = internet_checksum(bytes(header)).to_bytes(2, "big")
    return bytes(header) + struct.pack("!HHHH", 5000, 6000, 16, 0) + bytes(8)


def super_packet(payload: int, mss: int, seq: int = 1000) -> bytes:
    """A TCP super-packet of PAYLOAD bytes for MSS-sized segments."""
    header = ip_header(40 + payload, 77, 64, 6, POD, REMOTE)
    tcp = bytearray(struct.pack("!HHIIBBHHH", 40000, 5201, seq, 9, 5 << 4, 0x18, 501, 0, 0)
                    + bytes(i * 7 & 0xFF for i in range(payload)))
    return tun_record(bytes(header + tcp), flags=vnet.VNET_F_NEEDS_CSUM, gso_type=vnet.GSO_TCPV4,
                      gso_size=mss, csum_start=20, csum_offset=16)


def tx_corpus() -> list[bytes]:
    records = [outgoing(60, 1), outgoing(61, 2, partial=True), outgoing(1400, 3, partial=True)]
    records += [outgoing(100, 10 + i) for i in range(20)]                   # back to back: held, batched
    records += [outgoing(100, 40), outgoing(80, 41), outgoing(120, 42)]       # shorter, then longer
    records += [outgoing(60, 50, ttl=1),                                     # TTL: dropped
                outgoing(60, 51, dst=bytes([10, 244, 9, 9])),                # no route: ICMP error back
                tun_record(options(56, dst=bytes([10, 244, 9, 9]))),         # ...quoting the longest header
                outgoing(60, 52, dst=bytes([10, 244, 9, 9]), proto=1),       # ...not about ICMP itself
                tun_record(bytes([0x60]) + bytes(59)),                      # IPv6 chatter
                bytes(5),                                                    # shorter than a vnet header
                super_packet(20_000, 1448), super_packet(3000, 536, seq=0xFFFFF000),
                super_packet(1000, 1448),                                    # one segment
                tun_record(bytes(ip_header(60, 60, 64, 17, POD, REMOTE)) + bytes(40), gso_type=vnet.GSO_UDP_L4,
                           gso_size=20),                                     # a GSO type we never offer
                outgoing(60, 61, dst=bytes([10, 244, 3, 7]))]                # the other peer (127.0.0.4)
    return records


def run_tx(implementation: str, records: list[bytes]) -> tuple[list[bytes], list[bytes], dict]:
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    peer.bind(("127.0.0.2", 0))
    worker = Worker(implementation, "tx", peer.getsockname()[1])
    try:
        for record in records + [outgoing(60, MARKER)]:
            worker.other.send(record)
        # In order: once the marker is out, all before it is done.
        datagrams = []
        while not datagrams or int.from_bytes(datagrams[-1][4:6], "big") != MARKER:
            assert select.select([peer], [], [], 10)[0], f"no marker from the {implementation} worker"
            datagrams.append(peer.recv(1 << 16))
        return datagrams[:-1], worker.records(), worker.counters()
    finally:
        worker.close()
        peer.close()


def compared(run, corpus):
    """RUN's result for CORPUS with each worker: the compiled one's, which must
    equal the Python one's."""
    results = {implementation: run(implementation, corpus) for implementation in IMPLEMENTATIONS}
    assert results["python"] == results["compiled"]
    return results["compiled"]


def test_tx_the_compiled_worker_sends_what_the_python_worker_sends():
    datagrams, replies, counters = compared(run_tx, tx_corpus())
    # ...and that is the right thing (so that two equal wrongs do not pass).
    assert len(replies) == 2 and all(r[vnet.VNET_HDR_LEN + 20] == 3 for r in replies)   # net unreachable
    assert len(replies[1]) == vnet.VNET_HDR_LEN + 20 + 8 + 56 + 8
    assert counters["drop_ttl"] == 1 and counters["drop_no_route"] == 3 and counters["drop_not_ipv4"] == 2
    assert counters["drop_malformed"] == counters["malformed_header_length"] == 1
    segments = -(-20_000 // 1448) + -(-3000 // 536) + 1
    assert len(datagrams) == 3 + 20 + 3 + segments                         # (one more went to 127.0.0.4)
    assert counters["tx_packets"] == len(datagrams) + 2                     # (and the marker)
    assert all(d[8] == 63 and fastudp.ipv4_problem(d) is None for d in datagrams)


# -- UDP -> TUN -------------------------------------------------------------------------------

def send_from(address: str, port: int, datagram: bytes, segment: int | None = None) -> bool:
    """Send DATAGRAM (a GSO batch of SEGMENT-byte datagrams, if given) from ADDRESS;
    False if the kernel refused it."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.bind((address, 0))
        ancillary = [(fastudp.SOL_UDP, fastudp.UDP_SEGMENT, struct.pack("H", segment))] if segment else []
        s.sendmsg([datagram], ancillary, 0, ("127.0.0.1", port))
        return True
    except OSError:
        return False
    finally:
        s.close()


def rx_corpus() -> list[tuple[str, bytes, int | None]]:
    """(from, bytes, GSO segment size or None), in sending order."""
    rng = random.Random(17)
    flows = Flows(rng)
    subnet = ipaddress.IPv4Network("10.244.2.0/24")
    spoofed, own = ipaddress.IPv4Address("10.244.7.7").packed, ipaddress.IPv4Address(PEER).packed
    good = flows.udp(100)
    bad_checksum = bytearray(flows.udp(100))
    bad_checksum[10] ^= 0xFF
    bad_length = bytearray(flows.udp(100))
    bad_length[2:4] = (99).to_bytes(2, "big")
    bad_ihl = bytearray(flows.udp(100))
    bad_ihl[0] = 0x44
    corpus = [(PEER, good, None), (PEER, flows.udp(300, src=own), None), (PEER, flows.udp(100, src=spoofed), None),
              (PEER, flows.udp(100, ttl=1), None), (PEER, bytes(10), None), (PEER, bytes([0x65]) + bytes(99), None),
              (PEER, bytes(bad_ihl), None), (PEER, bytes(bad_length), None), (PEER, bytes(bad_checksum), None),
              (STRANGER, flows.udp(100), None)]
    tcp_run = [flows.tcp(1000, src=subnet[2].packed) for _ in range(8)]
    corpus.append((PEER, b"".join(tcp_run), 1000))                          # merged: one TCP super-packet
    udp_run = []
    for _ in range(10):
        udp_run.append(flows.udp(200, src=subnet[3].packed))
    corpus.append((PEER, b"".join(udp_run), 200))                           # merged: UDP GSO super-packet(s)
    mixed = [flows.udp(200) for _ in range(3)] + [flows.udp(200, src=spoofed)] + [flows.udp(200) for _ in range(2)]
    corpus.append((PEER, b"".join(mixed), 200))                             # a spoofed one: one by one
    corpus.append((PEER, bytes(rng.randbytes(9)), 1))                        # segments that hold no header
    corpus.append((STRANGER, b"".join(tcp_run), 1000))
    return corpus


def run_rx(implementation: str, corpus) -> tuple[list[bytes], dict, list[bool]]:
    worker = Worker(implementation, "rx", 0)
    port = worker.sock.getsockname()[1]
    marker = ip_header(28, MARKER, 64, 17, ipaddress.IPv4Address("10.244.2.9").packed, POD) + bytes(8)
    try:
        accepted = [send_from(address, port, data, segment) for address, data, segment in corpus]
        assert send_from(PEER, port, bytes(marker))
        # In order: once the marker is in, all before it is done.
        records = []
        while not records or int.from_bytes(records[-1][vnet.VNET_HDR_LEN + 4:vnet.VNET_HDR_LEN + 6], "big") != MARKER:
            assert select.select([worker.other], [], [], 10)[0], f"no marker from the {implementation} worker"
            records.append(worker.other.recv(1 << 18))
        counters = worker.counters()
        counters["rx_packets"] -= 1
        counters["rx_bytes"] -= len(marker)
        return records[:-1], counters, accepted
    finally:
        worker.close()


def test_rx_the_compiled_worker_delivers_what_the_python_worker_delivers():
    records, counters, accepted = compared(run_rx, rx_corpus())
    assert all(accepted[:-2]), accepted                 # (the 1-byte segments: as the kernel allows)
    assert counters["drop_spoofed_source"] == 2 and counters["drop_ttl"] == 1       # (one of them in a batch)
    for reason in ("truncated", "version", "header_length", "total_length", "checksum"):
        assert counters[f"malformed_{reason}"] >= 1, reason
    assert counters["drop_unknown_source"] == 1 + 8
    assert counters["rx_coalesced"] >= 2
    merged = [vnet.VNET_HDR.unpack_from(r)[1] for r in records if vnet.VNET_HDR.unpack_from(r)[1] != vnet.GSO_NONE]
    assert vnet.GSO_TCPV4 in merged
    assert counters["rx_packets"] == 2 + 8 + 10 + 5
