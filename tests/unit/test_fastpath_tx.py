"""The tx worker's loop (fastudp.Worker.tx_loop) on real kernel sockets: a small
packet that finds flannel0 empty leaves at once, alone; packets queued back to
back leave together in one UDP GSO send; order is kept either way (issue 17).

flannel0 is replaced by a SOCK_SEQPACKET pair (one record per write, and it
honours preadv2's RWF_NOWAIT as a TUN does); the UDP socket is real, bound to
127.0.0.1, and the peer is a second socket there. The sends are recorded on
their way out. No root needed; no timing is asserted (the waits only bound a
hung loop)."""

from __future__ import annotations

import ipaddress
import select
import socket
import struct
import threading
import time

import pytest

from netemu.overlay import fastudp, vnet
from netemu.overlay.packet import internet_checksum

POD = ipaddress.IPv4Address("10.244.1.5").packed
REMOTE = ipaddress.IPv4Address("10.244.2.5").packed


class Stop(Exception):
    """Raised by the recorder to end the loop (not an OSError: the loop would count it)."""


class Recorder:
    """The worker's UDP socket: records each send as (kind, bytes, segment size), then sends it.
    EVENTS is the loop's trace: its sends, and (see traced) its reads and polls."""

    def __init__(self, sock: socket.socket, events: list):
        self.sock, self.sends, self.events, self.stopping = sock, [], events, False

    def sendto(self, data, address):
        if self.stopping:
            raise Stop
        self.sends.append(("sendto", bytes(data), None))
        self.events.append("send")
        return self.sock.sendto(data, address)

    def sendmsg(self, buffers, ancillary, flags, address):
        if self.stopping:
            raise Stop
        size = struct.unpack("H", ancillary[0][2])[0] if ancillary else None
        self.sends.append(("gso", b"".join(bytes(b) for b in buffers), size))
        self.events.append("send")
        return self.sock.sendmsg(buffers, ancillary, flags, address)


class TracedPoll:
    def __init__(self, poll_object, events: list):
        self.poll_object, self.events = poll_object, events

    def register(self, fd, mask):
        self.poll_object.register(fd, mask)

    def poll(self, timeout):
        ready = self.poll_object.poll(timeout)
        self.events.append(f"poll({timeout}):{len(ready)}")
        return ready


def traced(monkeypatch, events: list) -> None:
    """Record the loop's TUN reads and polls in EVENTS (the real calls still run)."""
    preadv, readv = fastudp.os.preadv, fastudp.os.readv

    def traced_preadv(fd, buffers, offset, flags=0):
        try:
            n = preadv(fd, buffers, offset, flags)
        except BlockingIOError:
            events.append("preadv:EAGAIN")
            raise
        events.append("preadv")
        return n

    def traced_readv(fd, buffers):
        n = readv(fd, buffers)
        events.append("readv")
        return n
    monkeypatch.setattr(fastudp.os, "preadv", traced_preadv)
    monkeypatch.setattr(fastudp.os, "readv", traced_readv)
    poll = fastudp.select.poll
    monkeypatch.setattr(fastudp.select, "poll", lambda: TracedPoll(poll(), events))


def small_packet(ident: int, size: int = 60) -> bytes:
    """A TUN read: an empty virtio-net header, then an IPv4/UDP packet of SIZE bytes."""
    payload = ident.to_bytes(4, "big").ljust(size - 28, b"p")
    header = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, ident, 0x4000, 64, 17, 0, POD, REMOTE))
    header[10:12] = internet_checksum(header).to_bytes(2, "big")
    udp = struct.pack("!HHHH", 5000, 6000, size - 20, 0)
    return vnet.PLAIN_HDR + bytes(header) + udp + payload


class Tx:
    def __init__(self):
        self.tun, self.writer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.peer.bind(("127.0.0.1", 0))
        self.peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        self.udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.bind(("127.0.0.1", 0))
        self.have_gso = fastudp.tune_socket(self.udp)["gso"]
        self.events: list[str] = []
        self.sock = Recorder(self.udp, self.events)
        self.counters = memoryview(bytearray(fastudp.BLOCK)).cast("q")
        self.worker = fastudp.Worker(self.tun.fileno(), self.sock, self.peer.getsockname()[1], bytes(4),
                                     self.have_gso, self.counters)
        self.worker.peers.replace({"10.244.2.0/24": "127.0.0.1"})
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        def run():
            try:
                self.worker.tx_loop()
            except Stop:
                pass
        self.thread = threading.Thread(target=run, daemon=True)
        self.thread.start()

    def write(self, packet: bytes) -> None:
        self.writer.send(packet)

    def wait_sends(self, n: int) -> list:
        deadline = time.monotonic() + 10
        while len(self.sock.sends) < n and time.monotonic() < deadline:
            time.sleep(0.005)
        assert len(self.sock.sends) >= n, self.sock.sends
        return self.sock.sends

    def wait_idle(self) -> None:
        """Until the loop has read everything written (the pair is empty)."""
        deadline = time.monotonic() + 10
        while select.select([self.tun], [], [], 0)[0] and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(0.05)

    def received(self, n: int) -> list[bytes]:
        out = []
        for _ in range(n):
            if not select.select([self.peer], [], [], 10)[0]:
                break
            out.append(self.peer.recv(2048))
        return out

    def close(self) -> None:
        if self.thread is not None:
            self.sock.stopping = True
            self.write(small_packet(0))                # wakes the loop: its send raises Stop
            self.thread.join(10)
            assert not self.thread.is_alive()
        for s in (self.tun, self.writer, self.peer, self.udp):
            s.close()


@pytest.fixture
def tx():
    t = Tx()
    yield t
    t.close()


def ident(datagram: bytes) -> int:
    return int.from_bytes(datagram[4:6], "big")


def test_a_packet_that_finds_the_tun_empty_leaves_at_once_alone(tx, monkeypatch):
    traced(monkeypatch, tx.events)
    tx.start()
    tx.wait_idle()
    for k in range(1, 4):
        tx.write(small_packet(k))
        sends = tx.wait_sends(k)
        tx.wait_idle()
        assert [kind for kind, _, _ in sends] == ["sendto"] * k
    # Each read after a poll that waited is followed by its send, with no call
    # between them (no RWF_NOWAIT read, no poll(0) to learn the TUN is empty).
    events = [e for e in tx.events if e != f"poll({int(fastudp.WAKE * 1000)}):0"]          # idle turns
    reads = [i for i, e in enumerate(events) if e == "readv"]
    assert len(reads) == 3
    for i in reads:
        assert events[i - 1] == f"poll({int(fastudp.WAKE * 1000)}):1" and events[i + 1] == "send", events
    assert [ident(d) for d in tx.received(3)] == [1, 2, 3]
    assert tx.counters[fastudp.COUNTERS.index("tx_packets")] == 3


def test_packets_queued_back_to_back_leave_in_one_gso_send_in_order(tx):
    if not tx.have_gso:
        pytest.skip("no UDP GSO on this kernel")
    for k in range(1, 21):
        tx.write(small_packet(k))                      # queued before the loop runs
    tx.start()
    sends = tx.wait_sends(1)
    tx.wait_idle()
    assert len(sends) <= 2                             # the first may leave alone, no more
    kind, data, size = sends[-1]
    assert kind == "gso" and size == 60 and len(data) >= 19 * 60
    got = tx.received(20)
    assert [ident(d) for d in got] == list(range(1, 21))
    assert all(d[8] == 63 for d in got)                # each datagram's TTL decremented once


def test_a_packet_sent_at_once_never_overtakes_held_ones(tx):
    """Held packets (read back to back) leave before one read after the TUN was
    found empty, in one send each way."""
    worker = tx.worker
    for k in (1, 2):
        data = bytearray(small_packet(k))
        worker.forward_one(memoryview(data), len(data), True)           # held
    assert worker.held_count == 2 and not tx.sock.sends
    data = bytearray(small_packet(3))
    worker.forward_one(memoryview(data), len(data), False)              # at once
    assert worker.held_count == 0
    assert [ident(d) for d in tx.received(3)] == [1, 2, 3]
