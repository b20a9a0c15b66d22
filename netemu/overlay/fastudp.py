"""The udp backend's data path: one worker process per direction.

Every UDP/8285 datagram holds one complete, valid inner IPv4 packet that fits
the underlay (flannel's wire format). Each direction runs in its own process,
a plain blocking loop (no event loop, no GIL shared with the other direction or
with the daemon). Two modes:

- per-packet (`--plain`, flannel's C proxy in Python): flannel0 is a plain TUN;
  one packet per read, per sendto, per receive, per write. The fallback when the
  kernel refuses TUN offloads, or when offloads are switched off.
- fast (the default): offloads move many packets per system call:

  flannel0 is opened with IFF_VNET_HDR and TUNSETOFFLOAD(CSUM|TSO4): the kernel
  hands over TCP super-packets of up to 64 KB and takes them back;
  TUN -> UDP (worker "tx"): a super-packet is split into MSS-sized packets
  (netemu.overlay.vnet.segment: compiled, _vnetc.c, where it was built) and
  sent with one UDP GSO send (UDP_SEGMENT), which the kernel cuts into one
  datagram per packet;
  UDP -> TUN (worker "rx"): UDP GRO hands over many datagrams per receive;
  contiguous TCP segments of one flow are merged back into one super-packet
  (vnet.coalesce) and written with one TUN write; big socket buffers.
  Small packets too: tx holds those read back to back (same size, same peer)
  and sends them with one UDP GSO send; rx merges the UDP datagrams of one
  inner flow into a UDP GSO super-packet (vnet.coalesce_udp) that the kernel
  cuts back into the same datagrams on the way to the pod.

Every offload is negotiated at start-up and the backend falls back to the
per-packet path when the kernel refuses one it needs (TUN offloads); UDP GSO
and GRO are each optional.

    python -m netemu.overlay.fastudp {tx|rx} TUN_FD SOCK_FD COUNTERS_FD PORT TUN_ADDRESS [--gso] [--plain]

A worker reads its peer table as JSON lines on stdin ({"peers": {subnet: ip}})
and exits when stdin closes (its daemon is gone). Its counters live in a shared
memory file (COUNTERS_FD, a memfd of the daemon's): one int64 per name of
COUNTERS, one block per direction, so the daemon reads them fresh at any time.
"""

from __future__ import annotations

import argparse
import fcntl
import ipaddress
import json
import mmap
import os
import select
import socket
import struct
import sys
import threading

from netemu.overlay import vnet
from netemu.overlay.packet import (RouteTable, decrement_ttl, ipv4_destination, ipv4_problem,
                                   looks_like_ipv4, net_unreachable)

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
IFF_TUN, IFF_NO_PI, IFF_VNET_HDR = 0x0001, 0x1000, 0x4000
TUN_F_CSUM, TUN_F_TSO4 = 0x01, 0x02
SOL_UDP, UDP_SEGMENT, UDP_GRO = 17, 103, 104
IP_MTU_DISCOVER, IP_PMTUDISC_DO = 10, 2      # no Python constants for these in 3.11
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33      # root may exceed net.core.[rw]mem_max
SOCKET_BUFFER = 16 << 20
TXQUEUELEN = 5000
MAX_UDP_PAYLOAD = 65507
MAX_GSO_SEGMENTS = 64                        # the kernel's UDP_MAX_SEGMENTS is at least 64
READ_SIZE = 65536 + vnet.VNET_HDR_LEN
RECV_SIZE = 1 << 17                          # a GRO receive holds up to 64 KB of datagrams
SEGMENTS_SIZE = 1 << 17                      # a 64 KB super-packet cut at any usual MSS fits


def open_offload_tun(name: str) -> int | None:
    """flannel0 with a virtio-net header and TSO4/CSUM offloads, or None if this
    kernel refuses either (the caller then opens a plain TUN)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH22x", name.encode(), IFF_TUN | IFF_NO_PI | IFF_VNET_HDR))
        fcntl.ioctl(fd, TUNSETOFFLOAD, TUN_F_CSUM | TUN_F_TSO4)
    except OSError:
        os.close(fd)
        return None
    return fd


def udp_gso_writes(release: str | None = None) -> bool:
    """Whether a TUN takes UDP GSO super-packets (virtio gso_type UDP_L4) written to
    it: Linux 6.2 and later (USO for TUN/virtio). Older kernels refuse the write."""
    parts = (release or os.uname().release).split(".")
    try:
        major, minor = int(parts[0]), int("".join(c for c in parts[1].split("-")[0] if c.isdigit()) or 0)
    except (IndexError, ValueError):
        return False
    return (major, minor) >= (6, 2)


def enlarge_buffers(sock: socket.socket) -> None:
    """Socket buffers that absorb a burst of 64 KB batches (or of small packets)."""
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, SOCKET_BUFFER)
        except OSError:
            sock.setsockopt(socket.SOL_SOCKET, plain, SOCKET_BUFFER)


def tune_socket(sock: socket.socket) -> dict[str, bool]:
    """Big buffers, DF on GSO segments, GRO on; says which of GSO and GRO we have."""
    enlarge_buffers(sock)
    # Without this, the segments of a GSO send leave without DF (plain sends get it
    # from the route's PMTU default), and an oversized one would be fragmented.
    sock.setsockopt(socket.IPPROTO_IP, IP_MTU_DISCOVER, IP_PMTUDISC_DO)
    have = {}
    try:
        sock.getsockopt(SOL_UDP, UDP_SEGMENT)
        have["gso"] = True
    except OSError:
        have["gso"] = False
    try:
        sock.setsockopt(SOL_UDP, UDP_GRO, 1)
        have["gro"] = True
    except OSError:
        have["gro"] = False
    return have


def tune_uplink(dev: str) -> dict[str, bool]:
    """Make the node's uplink put real frames on the emulated wire, and merge them back.

    A veth passes a UDP GSO batch on as one buffer, so tcpdump on the underlay
    would show 64 KB "datagrams" no real network carries. With tx-udp-segmentation
    off the kernel cuts the batch into datagrams before the wire (and before
    tcpdump); with GRO on, the receiving uplink merges them back for our UDP GRO
    socket. Returns what took effect."""
    from pyroute2.ethtool import Ethtool

    done = {}
    try:
        ethtool = Ethtool()
        features = ethtool.get_features(dev)
        for name, on in (("tx-udp-segmentation", False), ("rx-gro", True)):
            if name in features.features:
                features.features[name].enable = on
        ethtool.set_features(dev, features)
        now = ethtool.get_features(dev).features
        done = {name: now[name].enable for name in ("tx-udp-segmentation", "rx-gro") if name in now}
    except Exception:                   # no ethtool ioctl: GSO batches stay whole on the wire
        pass
    return done


COUNTERS = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "drop_unknown_source", "drop_malformed",
            "drop_ttl", "drop_no_route", "icmp_unreachable_sent", "drop_not_ipv4", "tx_errors",
            "rx_errors", "rx_coalesced")
DIRECTIONS = ("tx", "rx")
BLOCK = 8 * len(COUNTERS)


def counters_memory() -> int:
    """The shared counters file: a memfd of one block per direction."""
    fd = os.memfd_create("netemu-udp-counters")
    os.ftruncate(fd, BLOCK * len(DIRECTIONS))
    return fd


def read_counters(fd: int) -> dict[str, int]:
    """The sum of both directions' counters."""
    data = os.pread(fd, BLOCK * len(DIRECTIONS), 0)
    values = memoryview(data).cast("q")
    n = len(COUNTERS)
    return {name: values[i] + values[n + i] for i, name in enumerate(COUNTERS)}


class Peers:
    """The worker's view of the peer table, replaced whole by the control thread.

    Next hops found are remembered per destination address (most traffic goes to
    few pods); the memory belongs to one table and is replaced with it, so a
    look-up racing a replacement can only fill the old one."""

    CACHE_LIMIT = 4096

    def __init__(self) -> None:
        self.table: tuple[RouteTable, dict[int, str | None]] = (RouteTable(), {})
        self.sources: frozenset[str] = frozenset()

    def replace(self, peers: dict[str, str]) -> None:
        routes = RouteTable()
        for subnet, address in peers.items():
            routes.set(ipaddress.IPv4Network(subnet), address)
        self.table, self.sources = (routes, {}), frozenset(peers.values())

    def next_hop(self, destination: int) -> str | None:
        routes, cache = self.table
        try:
            return cache[destination]
        except KeyError:
            pass
        if len(cache) >= self.CACHE_LIMIT:
            cache.clear()
        hop = cache[destination] = routes.lookup(destination)
        return hop


class Worker:
    def __init__(self, tun_fd: int, sock: socket.socket, port: int, tun_address: bytes, gso: bool,
                 counters: memoryview, vnet_hdr: bool = True):
        self.tun, self.sock, self.port = tun_fd, sock, port
        self.tun_address, self.gso = tun_address, gso
        # With offloads every TUN read and write starts with a virtio-net header.
        self.hdr_len = vnet.VNET_HDR_LEN if vnet_hdr else 0
        self.plain_hdr = vnet.PLAIN_HDR if vnet_hdr else b""
        self.udp_merge = vnet_hdr and udp_gso_writes()
        # The compiled helper writes into buffers reused for every packet (each
        # send or write copies out of them before the next one).
        self.compiled = vnet.COMPILED and vnet_hdr
        self.segments = bytearray(SEGMENTS_SIZE)
        self.merged_out = bytearray(2 * RECV_SIZE + vnet.VNET_HDR_LEN)     # see vnet.coalesced_room
        self.merged_view = memoryview(self.merged_out)
        self.peers = Peers()
        self.held = bytearray()                       # small packets waiting for one send
        self.held_hop, self.held_size, self.held_count = "", 0, 0
        self.counters = counters                      # int64 view of our block of the memfd
        self.index = {name: i for i, name in enumerate(COUNTERS)}

    def count(self, name: str, n: int = 1) -> None:
        self.counters[self.index[name]] += n

    def write_tun(self, data) -> bool:
        """Write one packet (bytes, or a list of buffers gathered by writev)."""
        try:
            if isinstance(data, list):
                os.writev(self.tun, data)
            else:
                os.write(self.tun, data)
            return True
        except OSError:
            self.count("rx_errors")
            return False

    # -- TUN -> UDP ------------------------------------------------------------

    def tx_loop(self) -> None:
        """TUN -> UDP. Small packets (not TCP super-packets) of one size for one
        peer, read back to back, are held and leave together in one UDP GSO send
        (each still its own datagram on the wire) as soon as the TUN has nothing
        more queued, the size or the peer changes, or the batch is full. Order is
        kept: a held batch leaves before anything read after it. (The TUN fd is
        shared with the rx worker, so it stays blocking: while packets are held,
        reads ask not to wait (preadv2 RWF_NOWAIT), or poll(0) first where the
        kernel refuses that.)"""
        buffer = bytearray(READ_SIZE)              # reused: every send copies out of it
        view = memoryview(buffer)
        batching = self.gso and bool(self.hdr_len)
        queued = select.poll()
        queued.register(self.tun, select.POLLIN)
        nowait = hasattr(os, "RWF_NOWAIT")
        while True:
            n = 0
            if self.held:
                if nowait:
                    try:
                        n = os.preadv(self.tun, [buffer], -1, os.RWF_NOWAIT)
                    except BlockingIOError:
                        self.flush_held()
                    except OSError:
                        nowait = False             # not for this kernel/device: poll
                if not nowait and not queued.poll(0):
                    self.flush_held()
            if not n:
                n = os.readv(self.tun, [buffer])
            if self.hdr_len:
                flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = vnet.VNET_HDR.unpack_from(buffer)
            else:
                flags = gso_type = gso_size = csum_start = csum_offset = 0
            packet = view[self.hdr_len:n]
            if not looks_like_ipv4(packet):
                self.count("drop_not_ipv4")
                continue
            next_hop = self.peers.next_hop(ipv4_destination(packet))
            if next_hop is None:
                self.count("drop_no_route")
                reply = net_unreachable(bytes(packet), self.tun_address)
                if reply is not None:
                    # Counted first: the pod may see the error before write() returns.
                    self.count("icmp_unreachable_sent")
                    if not self.write_tun(self.plain_hdr + reply):
                        self.count("icmp_unreachable_sent", -1)
                continue
            gso_type &= ~vnet.GSO_ECN
            if gso_type == vnet.GSO_NONE:
                # TTL, and the checksum the kernel left to us (NEEDS_CSUM)
                if not vnet.forward(packet, flags, csum_start, csum_offset):
                    self.count("drop_ttl")
                elif batching:
                    self.hold(packet, next_hop)
                else:
                    self.send(packet, len(packet), 1, next_hop)
            elif gso_type != vnet.GSO_TCPV4:
                self.count("drop_malformed")     # not offered by us: cannot happen
            elif not decrement_ttl(packet):
                self.count("drop_ttl")
            else:
                self.flush_held()
                self.send(*self.segment(packet, gso_size), next_hop)

    def segment(self, packet, mss: int) -> tuple:
        if self.compiled:
            try:
                n, size, count = vnet.native.segment_into(packet, mss, self.segments)
                return memoryview(self.segments)[:n], size, count
            except ValueError:           # does not fit our buffer (a tiny MSS): a new one
                pass
        return vnet.segment(packet, mss)

    def hold(self, packet, next_hop: str) -> None:
        """Add a small packet to the held batch (see tx_loop), sending first what
        it cannot join."""
        size = len(packet)
        if self.held and (next_hop != self.held_hop or size > self.held_size
                          or self.held_count >= MAX_GSO_SEGMENTS
                          or len(self.held) + size > MAX_UDP_PAYLOAD):
            self.flush_held()
        if not self.held:
            self.held_hop, self.held_size = next_hop, size
        self.held += packet
        self.held_count += 1
        if size < self.held_size:                # a shorter one can only be the last
            self.flush_held()

    def flush_held(self) -> None:
        if self.held:
            self.send(self.held, self.held_size, self.held_count, self.held_hop)
            self.held = bytearray()
            self.held_count = 0

    def send(self, buffer: bytes, size: int, count: int, next_hop: str) -> None:
        """COUNT packets of SIZE bytes (the last may be shorter), back to back in
        BUFFER: one UDP GSO send per 64 KB, or one sendto each without GSO."""
        address = (next_hop, self.port)
        per_send = min(MAX_GSO_SEGMENTS, MAX_UDP_PAYLOAD // size) if self.gso else 1
        step = per_send * size
        view = memoryview(buffer)
        try:
            for start in range(0, len(buffer), step):
                chunk = view[start:start + step]
                if len(chunk) > size:
                    self.sock.sendmsg([chunk], [(SOL_UDP, UDP_SEGMENT, struct.pack("H", size))], 0, address)
                else:
                    self.sock.sendto(chunk, address)
        except OSError:
            self.count("tx_errors")
            return
        self.count("tx_packets", count)
        self.count("tx_bytes", len(buffer))

    # -- UDP -> TUN ------------------------------------------------------------

    def rx_loop(self) -> None:
        buffer = bytearray(RECV_SIZE)
        view = memoryview(buffer)
        cmsg_space = socket.CMSG_SPACE(4)
        while True:
            try:
                n, ancillary, _flags, (source, _port) = self.sock.recvmsg_into([buffer], cmsg_space)
            except OSError:
                self.count("rx_errors")
                continue
            size = n
            for level, kind, cdata in ancillary:
                if level == SOL_UDP and kind == UDP_GRO:
                    size = struct.unpack("i", cdata[:4])[0]
            if source not in self.peers.sources:
                self.count("drop_unknown_source", -(-n // size) if size else 1)
                continue
            if size < n:
                self.receive_batch(view[:n], size)
            else:
                self.deliver(view[:n])

    def receive_batch(self, batch, size: int) -> None:
        """A GRO receive: many datagrams of SIZE bytes (the last may be shorter).
        Runs of one inner flow go into flannel0 merged (TCP or UDP GSO
        super-packets), the rest one by one; in arrival order."""
        inner_udp = batch[9] == vnet.IPPROTO_UDP and self.udp_merge
        if self.compiled:
            merge = vnet.native.coalesce_udp_into if inner_udp else vnet.native.coalesce_into
            items = merge(batch, size, self.merged_out)
            sequence = [(self.merged_view[start:end], True) if merged else (batch[start:end], False)
                        for merged, start, end in items]
            merged = sum(item[0] for item in items)
        else:
            result = vnet.coalesce_udp(batch, size) if inner_udp else vnet.coalesce(batch, size)
            sequence = [(item, isinstance(item, list)) for item in result.sequence]
            merged = result.merged
        single_bytes = 0
        for data, is_merged in sequence:
            if is_merged:
                if self.write_tun(data):
                    self.count("rx_coalesced", 1)
                elif inner_udp:
                    self.udp_merge = False      # refused after all: per datagram from now on
            else:
                single_bytes += len(data)
                self.deliver(data)
        self.count("rx_packets", merged)
        self.count("rx_bytes", len(batch) - single_bytes)

    def deliver(self, datagram) -> None:
        """The per-packet way in: validate, TTL, write with an empty vnet header."""
        if ipv4_problem(datagram) is not None:
            self.count("drop_malformed")
            return
        packet = bytearray(datagram)
        if not decrement_ttl(packet):
            self.count("drop_ttl")
            return
        if self.write_tun(self.plain_hdr + packet):
            self.count("rx_packets")
            self.count("rx_bytes", len(packet))

    # -- control ---------------------------------------------------------------

    def read_control(self) -> bool:
        """Take the daemon's next peer table; False when the daemon is gone."""
        line = sys.stdin.readline()
        if not line:
            return False
        try:
            self.peers.replace(json.loads(line)["peers"])
        except (ValueError, KeyError):
            pass
        return True

    def follow_control(self) -> None:
        while self.read_control():
            pass
        os._exit(0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netemu-fastudp")
    parser.add_argument("direction", choices=["tx", "rx"])
    parser.add_argument("tun_fd", type=int)
    parser.add_argument("sock_fd", type=int)
    parser.add_argument("counters_fd", type=int)
    parser.add_argument("port", type=int)
    parser.add_argument("tun_address")
    parser.add_argument("--gso", action="store_true")
    parser.add_argument("--plain", action="store_true", help="a plain TUN: no virtio-net header")
    args = parser.parse_args(argv)
    os.set_blocking(args.tun_fd, True)
    sock = socket.socket(fileno=args.sock_fd)
    sock.setblocking(True)
    block = mmap.mmap(args.counters_fd, BLOCK * len(DIRECTIONS))
    offset = BLOCK * DIRECTIONS.index(args.direction)
    counters = memoryview(block)[offset:offset + BLOCK].cast("q")
    worker = Worker(args.tun_fd, sock, args.port, ipaddress.IPv4Address(args.tun_address).packed, args.gso,
                    counters, vnet_hdr=not args.plain)
    # The daemon sends the peer table first thing: wait for it, or the packets
    # queued in flannel0 meanwhile would all be answered "net unreachable".
    if not worker.read_control():
        return 0
    threading.Thread(target=worker.follow_control, daemon=True).start()
    try:
        worker.tx_loop() if args.direction == "tx" else worker.rx_loop()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
