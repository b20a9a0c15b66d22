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

The same worker exists compiled (fastudp_worker.c, the executable WORKER next
to this file, built at install with the C helper): same command line (after
the program), counters, heartbeat, peer table and behaviour, without an
interpreter (a few hundred kB instead of about 6.7 MB, and no cold Python on a
small packet's hop). The daemon runs it where it was built (`worker_argv`);
this module is the reference it follows and the fallback.

A worker reads its peer table as lines on stdin (`peer_line`: "peers
SUBNET=ADDRESS ...") and exits when stdin closes (its daemon is gone). Its
counters live in a shared memory file (COUNTERS_FD, a memfd of the daemon's): one int64 per name of
COUNTERS, one block per direction, so the daemon reads them fresh at any time.
After the blocks, one int64 per direction is the worker's heartbeat: it counts
the turns of its loop. The daemon side (udp.py) looks at it only when the
worker's input has something waiting (flannel0 readable for tx, the socket for
rx): a heartbeat that does not move while work waits means a stopped or hung
worker (`stalled`). An idle worker sleeps: its loop turns only every WAKE
seconds (rx: SO_RCVTIMEO; tx: poll with a timeout), which no check relies on
(at 0.5 s, 200 idle workers of a 100-node cluster woke 400 times a second).

Everything read from the underlay is hostile until checked: the GRO segment
size in the control message, each datagram's length and IPv4 header
(packet.ipv4_problem), and its inner source against the sending peer's lease
(a peer may only speak for its own pods). What fails is dropped and counted by
reason; nothing a datagram holds may raise.
"""

from __future__ import annotations

import fcntl
import ipaddress
import mmap
import os
import select
import socket
import struct
import sys
import threading
import types

from netemu.overlay import vnet
from netemu.overlay.packet import (IPV4_MIN_HEADER, RouteTable, decrement_ttl, ipv4_destination,
                                   ipv4_problem, ipv4_source, looks_like_ipv4, net_unreachable)

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
WAKE = 30.0                                  # an idle worker's loop turns at least this often (s)


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


# Why a datagram was malformed (packet.ipv4_problem's reasons, and a GRO
# segment size that is no size): each is counted on its own as well as in
# drop_malformed.
MALFORMED = ("truncated", "version", "header length", "total length", "checksum", "segment size")


def malformed_counter(reason: str) -> str:
    return "malformed_" + reason.replace(" ", "_")


COUNTERS = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "drop_unknown_source", "drop_malformed",
            "drop_ttl", "drop_no_route", "icmp_unreachable_sent", "drop_not_ipv4", "tx_errors",
            "rx_errors", "rx_coalesced", "drop_spoofed_source", "drop_internal_error",
            *(malformed_counter(r) for r in MALFORMED))
DIRECTIONS = ("tx", "rx")
BLOCK = 8 * len(COUNTERS)
HEARTBEATS = BLOCK * len(DIRECTIONS)         # offset of the heartbeats, one int64 per direction


def counters_memory() -> int:
    """The shared counters file: a memfd of one block per direction, then the
    heartbeats."""
    fd = os.memfd_create("netemu-udp-counters")
    os.ftruncate(fd, HEARTBEATS + 8 * len(DIRECTIONS))
    return fd


def read_counters(fd: int) -> dict[str, int]:
    """The sum of both directions' counters."""
    data = os.pread(fd, BLOCK * len(DIRECTIONS), 0)
    values = memoryview(data).cast("q")
    n = len(COUNTERS)
    return {name: values[i] + values[n + i] for i, name in enumerate(COUNTERS)}


def read_heartbeat(fd: int, direction: str) -> int:
    """How many turns DIRECTION's worker loop has made (see the module docstring)."""
    data = os.pread(fd, 8, HEARTBEATS + 8 * DIRECTIONS.index(direction))
    return int.from_bytes(data, sys.byteorder, signed=True)


def reset_heartbeat(fd: int, direction: str) -> None:
    """Zero DIRECTION's heartbeat, for a new worker: 0 means "not started yet"."""
    os.pwrite(fd, bytes(8), HEARTBEATS + 8 * DIRECTIONS.index(direction))


def gro_segment_size(ancillary, n: int) -> int | None:
    """The datagram size of a receive of N bytes: the UDP_GRO control message's
    segment size, N without one; None if the message holds no usable size
    (shorter than an int, or not positive)."""
    for level, kind, cdata in ancillary:
        if level == SOL_UDP and kind == UDP_GRO:
            if len(cdata) < 4:
                return None
            size = int.from_bytes(cdata[:4], sys.byteorder, signed=True)
            return size if size > 0 else None
    return n


def stalled(before: int, after: int, waiting: bool, slept: float, asked: float) -> bool:
    """Is a worker stopped or hung? Its watcher found work waiting for it (its
    input readable) with the heartbeat at BEFORE, slept ASKED seconds (SLEPT
    in fact), and found the heartbeat still at AFTER: stalled if it has not
    moved while work still waits. An idle worker has nothing to show and is
    never blamed; a watcher that slept far longer than it asked (a loaded
    machine) has seen nothing and blames no one. Pure logic."""
    return waiting and after == before and slept < 2 * asked


WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fastudp-worker")
WORKER_ENV = "NETEMU_UDP_WORKER"             # "python": the Python worker even where WORKER was built


def compiled_worker(environ=os.environ) -> str | None:
    """The compiled worker's path, if it was built and not declined (WORKER_ENV)."""
    if environ.get(WORKER_ENV, "").strip().lower() == "python":
        return None
    return WORKER if os.access(WORKER, os.X_OK) else None


def worker_argv(args: list[str], environ=os.environ) -> list[str]:
    """The command line of a worker with ARGS (direction, fds, port, address,
    flags): the compiled one where there is one, else this module under
    `python -S` (see udp.worker_environment)."""
    program = compiled_worker(environ)
    return ([program] if program else [sys.executable, "-S", "-m", "netemu.overlay.fastudp"]) + args


def worker_direction(argv: list[bytes]) -> str | None:
    """"tx" or "rx" if ARGV (a /proc cmdline, split) is a udp worker's: the
    word after the module (python [-S] -m netemu.overlay.fastudp DIRECTION ...)
    or after the compiled program (.../fastudp-worker DIRECTION ...)."""
    for at, word in enumerate(argv[:4]):
        if word == b"netemu.overlay.fastudp" or os.path.basename(word) == b"fastudp-worker":
            following = argv[at + 1] if at + 1 < len(argv) else b""
            return following.decode() if following in (b"tx", b"rx") else None
    return None


def peer_line(peers: dict[str, str]) -> bytes:
    """The daemon's peer table for its workers' stdin: SUBNET -> underlay address."""
    return ("peers" + "".join(f" {subnet}={address}" for subnet, address in peers.items()) + "\n").encode()


def parse_peer_line(line: str) -> dict[str, str] | None:
    """peer_line's table back, or None if LINE is not one."""
    words = line.split()
    if not words or words[0] != "peers":
        return None
    peers = {}
    for word in words[1:]:
        subnet, sep, address = word.partition("=")
        if not sep:
            return None
        peers[subnet] = address
    return peers


_AND_TABLES: dict[int, bytes] = {}


def _and_table(mask: int) -> bytes:
    """A bytes.translate table mapping each byte to byte & MASK."""
    table = _AND_TABLES.get(mask)
    if table is None:
        table = _AND_TABLES[mask] = bytes(b & mask for b in range(256))
    return table


class Peers:
    """The worker's view of the peer table, replaced whole by the control thread.

    Next hops found are remembered per destination address (most traffic goes to
    few pods); the memory belongs to one table and is replaced with it, so a
    look-up racing a replacement can only fill the old one."""

    CACHE_LIMIT = 4096

    def __init__(self) -> None:
        self.table: tuple[RouteTable, dict[int, str | None]] = (RouteTable(), {})
        # peer's underlay address -> its leases, as (network, netmask) integers
        self.sources: dict[str, tuple[tuple[int, int], ...]] = {}
        # peer's underlay address -> the same as an integer (see leased_by)
        self.addresses: dict[str, int] = {}

    def replace(self, peers: dict[str, str]) -> None:
        routes = RouteTable()
        sources: dict[str, tuple[tuple[int, int], ...]] = {}
        for subnet, address in peers.items():
            network = ipaddress.IPv4Network(subnet)
            routes.set(network, address)
            sources[address] = sources.get(address, ()) + ((int(network.network_address), int(network.netmask)),)
        addresses = {address: int(ipaddress.IPv4Address(address)) for address in sources}
        self.table, self.sources, self.addresses = (routes, {}), sources, addresses

    def leased_by(self, peer: str, inner_source: int) -> bool:
        """Whether PEER (an underlay address) may send INNER_SOURCE: an address of
        a subnet it leases, or its own underlay address.

        A peer forwards only what its own pods and its own stack send: pods have
        addresses of its subnet, and the node's own packets to remote pods leave
        through flannel0, whose address is the subnet's first one. Its underlay
        address is the source of replies it un-NATs before they enter the
        tunnel: a pod's request to that node's NodePort or hostPort went there
        plainly, and the answer (source rewritten back to NODE:PORT) comes home
        through the overlay. Anything else it sends is forged, whatever the outer
        source. (The batch check, sources_leased, covers the subnet only: a
        batch that holds such a reply takes this per-datagram way.)"""
        if any(inner_source & mask == network for network, mask in self.sources.get(peer, ())):
            return True
        return inner_source == self.addresses.get(peer)

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
                 counters: memoryview, vnet_hdr: bool = True, heartbeat: memoryview | None = None):
        self.tun, self.sock, self.port = tun_fd, sock, port
        self.tun_address, self.gso = tun_address, gso
        # With offloads every TUN read and write starts with a virtio-net header.
        self.hdr_len = vnet.VNET_HDR_LEN if vnet_hdr else 0
        self.plain_hdr = vnet.PLAIN_HDR if vnet_hdr else b""
        self.udp_merge = vnet_hdr and udp_gso_writes()
        # The compiled helper writes into buffers reused for every packet (each
        # send or write copies out of them before the next one).
        self.compiled = vnet.COMPILED and vnet_hdr
        # (A helper built from an older _vnetc.c lacks sources_within: the Python way then.)
        self.compiled_sources = self.compiled and hasattr(vnet.native, "sources_within")
        self.compiled_check = self.compiled and hasattr(vnet.native, "ipv4_problem")
        self.segments = bytearray(SEGMENTS_SIZE)
        self.merged_out = bytearray(2 * RECV_SIZE + vnet.VNET_HDR_LEN)     # see vnet.coalesced_room
        self.merged_view = memoryview(self.merged_out)
        self.peers = Peers()
        self.held = bytearray()                       # small packets waiting for one send
        self.held_hop, self.held_size, self.held_count = "", 0, 0
        self.counters = counters                      # int64 view of our block of the memfd
        self.index = {name: i for i, name in enumerate(COUNTERS)}
        self.heartbeat = heartbeat if heartbeat is not None else memoryview(bytearray(8)).cast("q")
        self.internal_errors_logged = 0

    def count(self, name: str, n: int = 1) -> None:
        self.counters[self.index[name]] += n

    def drop_malformed(self, reason: str, n: int = 1) -> None:
        self.count("drop_malformed", n)
        self.count(malformed_counter(reason), n)

    def beat(self) -> None:
        self.heartbeat[0] += 1

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
        shared with the rx worker, so it stays blocking: reads ask not to wait
        (preadv2 RWF_NOWAIT), and when nothing is queued the loop waits in poll
        for at most WAKE; where the
        kernel refuses RWF_NOWAIT, poll says first whether a read would wait.)

        A small packet that finds the TUN empty (the read before it would have
        waited) is not held: nothing queued behind it can join it yet, so it
        leaves at once, without the two calls that would only find that out
        (a request/response exchange is all such packets). Those read back to
        back after it are held as above."""
        buffer = bytearray(READ_SIZE)              # reused: every send copies out of it
        view = memoryview(buffer)
        batching = self.gso and bool(self.hdr_len)
        queued = select.poll()
        queued.register(self.tun, select.POLLIN)
        nowait = hasattr(os, "RWF_NOWAIT")
        wake_ms = int(WAKE * 1000)
        while True:
            self.beat()
            n = 0
            if nowait:
                try:
                    n = os.preadv(self.tun, [buffer], -1, os.RWF_NOWAIT)
                except BlockingIOError:
                    pass
                except OSError:
                    nowait = False                 # not for this kernel/device: poll
            if n:
                self.forward_one(view, n, batching)
                continue
            if self.held and not queued.poll(0):
                self.flush_held()                  # nothing more queued: the held batch leaves
            if not queued.poll(wake_ms):
                continue                           # idle: beat, and wait again
            n = os.readv(self.tun, [buffer])
            # Read after the TUN was found empty: leave at once (without
            # RWF_NOWAIT, poll(0) is how we learn of a queue: batch as before).
            self.forward_one(view, n, batching and not nowait)

    def forward_one(self, view: memoryview, n: int, batching: bool) -> None:
        """One read from the TUN (N bytes of VIEW): route it and send or hold it."""
        if n < self.hdr_len:
            self.count("drop_not_ipv4")
            return
        if self.hdr_len:
            flags, gso_type, _hdr_len, gso_size, csum_start, csum_offset = vnet.VNET_HDR.unpack_from(view)
        else:
            flags = gso_type = gso_size = csum_start = csum_offset = 0
        packet = view[self.hdr_len:n]
        if not looks_like_ipv4(packet):
            self.count("drop_not_ipv4")
            return
        next_hop = self.peers.next_hop(ipv4_destination(packet))
        if next_hop is None:
            self.count("drop_no_route")
            reply = net_unreachable(bytes(packet), self.tun_address)
            if reply is not None:
                # Counted first: the pod may see the error before write() returns.
                self.count("icmp_unreachable_sent")
                if not self.write_tun(self.plain_hdr + reply):
                    self.count("icmp_unreachable_sent", -1)
            return
        gso_type &= ~vnet.GSO_ECN
        if gso_type == vnet.GSO_NONE:
            # TTL, and the checksum the kernel left to us (NEEDS_CSUM)
            if not vnet.forward(packet, flags, csum_start, csum_offset):
                self.count("drop_ttl")
            elif batching:
                self.hold(packet, next_hop)
            else:
                self.flush_held()                  # (held ones were read before it)
                self.send(packet, len(packet), 1, next_hop)
        elif gso_type != vnet.GSO_TCPV4 or not vnet.segmentable(packet, gso_size):
            # Not offered by us, or a super-packet we could not cut: the kernel
            # builds these, so this cannot happen; counted, never a crash.
            self.drop_malformed("header length")
        elif not decrement_ttl(packet):
            self.count("drop_ttl")
        else:
            self.flush_held()
            self.send(*self.segment(packet, gso_size), next_hop)

    def segment(self, packet, mss: int) -> tuple:
        """PACKET (vnet.segmentable) cut for one GSO send: (buffer, size, count)."""
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
        """UDP -> TUN, one receive (one datagram, or a GRO batch) at a time. The
        socket has a receive timeout (SO_RCVTIMEO, WAKE)."""
        buffer = bytearray(RECV_SIZE)
        view = memoryview(buffer)
        cmsg_space = socket.CMSG_SPACE(4)
        while True:
            self.beat()
            try:
                n, ancillary, _flags, address = self.sock.recvmsg_into([buffer], cmsg_space)
            except BlockingIOError:                # the receive timeout: idle
                continue
            except OSError:
                self.count("rx_errors")
                continue
            self.receive(view[:n], ancillary, address[0])

    def receive(self, data, ancillary, source: str) -> None:
        """One receive from SOURCE (an underlay address): DATA, with the control
        messages ANCILLARY. Every check is made so that nothing here raises; if a
        bug slips through anyway, the receive is dropped and counted
        (drop_internal_error) and the worker goes on: one datagram must not take
        the node's data path down."""
        try:
            self._receive(data, ancillary, source)
        except Exception:
            self.count("drop_internal_error")
            if self.internal_errors_logged < 10:       # say it, but do not let a flood fill the log
                self.internal_errors_logged += 1
                import traceback      # a bug's path only: not imported at start-up
                traceback.print_exc(file=sys.stderr)

    def _receive(self, data, ancillary, source: str) -> None:
        n = len(data)
        size = gro_segment_size(ancillary, n)
        if source not in self.peers.sources:
            self.count("drop_unknown_source", -(-n // size) if size else 1)
            return
        if size is None:
            self.drop_malformed("segment size")
        elif size < n:
            self.receive_batch(data, size, source)
        else:
            self.deliver(data, source)

    def receive_batch(self, batch, size: int, source: str) -> None:
        """A GRO receive from SOURCE: many datagrams of SIZE bytes (the last may
        be shorter). Runs of one inner flow go into flannel0 merged (TCP or UDP
        GSO super-packets), the rest one by one; in arrival order. The merging
        validates each datagram it merges; the inner sources are checked here
        first, all at once (the common case: all the peer's own), or one by one
        where one is not."""
        if size < IPV4_MIN_HEADER:
            # Not one of them can hold an IPv4 header.
            self.drop_malformed("truncated", -(-len(batch) // size))
            return
        if not self.sources_leased(batch, size, source):
            for at in range(0, len(batch), size):
                self.deliver(batch[at:at + size], source)
            return
        inner_udp = batch[9] == vnet.IPPROTO_UDP and self.udp_merge     # size >= 20: a whole header
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
                self.deliver(data, None)
        self.count("rx_packets", merged)
        self.count("rx_bytes", len(batch) - single_bytes)

    def sources_leased(self, batch, size: int, source: str) -> bool:
        """Whether every datagram of BATCH (SIZE >= 20 bytes each, the last
        possibly shorter) has an inner source that SOURCE leases (a last one
        too short for a header is malformed, and dropped for that). Compiled
        (_vnetc.c, sources_within), or one pass per address byte over all
        datagrams at once (bytes.translate/count run in C): a batch is up to
        64 KB and this is the hot path."""
        leases = self.peers.sources.get(source, ())
        if len(leases) != 1:
            return False                        # (several leases: the per-datagram way)
        network, mask = leases[0]
        if self.compiled and self.compiled_sources:
            return vnet.native.sources_within(batch, size, network, mask)
        full = len(batch) // size * size
        for i in range(4):
            shift = 24 - 8 * i
            byte_mask, want = (mask >> shift) & 0xFF, (network >> shift) & 0xFF
            if not byte_mask:
                continue
            column = bytes(batch[12 + i:full:size])
            if byte_mask != 0xFF:
                column = column.translate(_and_table(byte_mask))
            if column.count(want) != len(column):
                return False
        tail = batch[full:]
        return len(tail) < IPV4_MIN_HEADER or ipv4_source(tail) & mask == network

    def deliver(self, datagram, source: str | None) -> None:
        """The per-packet way in: validate, check the inner source against
        SOURCE's lease (None: checked already), TTL, write with an empty vnet
        header."""
        compiled = self.compiled and self.compiled_check     # (one C call each: the latency path)
        if compiled:
            problem = vnet.native.ipv4_problem(datagram)
            problem = MALFORMED[problem - 1] if problem else None
        else:
            problem = ipv4_problem(datagram)
        if problem is not None:
            self.drop_malformed(problem)
            return
        if source is not None and not self.peers.leased_by(source, ipv4_source(datagram)):
            self.count("drop_spoofed_source")
            return
        packet = bytearray(datagram)
        if not (vnet.native.forward(packet, 0, 0, 0) if compiled else decrement_ttl(packet)):
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
        peers = parse_peer_line(line)
        if peers is not None:
            try:
                self.peers.replace(peers)
            except ValueError:                     # not an address: ignored, as the compiled worker does
                pass
        return True

    def follow_control(self) -> None:
        while self.read_control():
            pass
        os._exit(0)


USAGE = "netemu-fastudp {tx|rx} TUN_FD SOCK_FD COUNTERS_FD PORT TUN_ADDRESS [--gso] [--plain]"


def parse_args(argv: list[str]) -> types.SimpleNamespace:
    """The worker's command line (USAGE; --plain: a plain TUN, no virtio-net
    header). Parsed by hand: argparse (with re and gettext) was a sixth of a
    worker's start-up, paid 200 times by a 100-node cluster. A bad line
    exits with status 2 and the usage, as argparse would."""
    flags = [a for a in argv if a.startswith("--")]
    words = [a for a in argv if not a.startswith("--")]
    try:
        if set(flags) - {"--gso", "--plain"} or len(words) != 6 or words[0] not in DIRECTIONS:
            raise ValueError
        direction, tun_fd, sock_fd, counters_fd, port, tun_address = words
        return types.SimpleNamespace(direction=direction, tun_fd=int(tun_fd), sock_fd=int(sock_fd),
                                     counters_fd=int(counters_fd), port=int(port), tun_address=tun_address,
                                     gso="--gso" in flags, plain="--plain" in flags)
    except ValueError:
        print(f"usage: {USAGE}", file=sys.stderr)
        raise SystemExit(2) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.set_blocking(args.tun_fd, True)
    sock = socket.socket(fileno=args.sock_fd)
    sock.setblocking(True)
    if args.direction == "rx":
        # A receive timeout, not a non-blocking socket: O_NONBLOCK would be
        # shared with the tx worker's sends (one socket, two processes), and
        # SO_RCVTIMEO touches receives only. An idle loop turns every WAKE.
        seconds = int(WAKE)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO,
                        struct.pack("ll", seconds, int((WAKE - seconds) * 1_000_000)))
    block = mmap.mmap(args.counters_fd, HEARTBEATS + 8 * len(DIRECTIONS))
    index = DIRECTIONS.index(args.direction)
    counters = memoryview(block)[BLOCK * index:BLOCK * (index + 1)].cast("q")
    heartbeat = memoryview(block)[HEARTBEATS + 8 * index:HEARTBEATS + 8 * (index + 1)].cast("q")
    worker = Worker(args.tun_fd, sock, args.port, ipaddress.IPv4Address(args.tun_address).packed, args.gso,
                    counters, vnet_hdr=not args.plain, heartbeat=heartbeat)
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
