"""The `udp` backend: flannel's userspace encapsulation through a TUN device.

The kernel routes every packet for the cluster network that is not on this node
(10.244.0.0/16 dev flannel0) into the TUN device flannel0. This backend reads
each one, finds the peer node whose lease holds the destination, and sends the
bare IP packet as the payload of a UDP datagram to that node's underlay address
(port 8285). The peer's backend receives it and writes it into its own flannel0,
from where its kernel delivers it to the pod. Both sides decrement the TTL, as
flannel's C proxy (pkg/backend/udp/proxy_amd64.c) does.

The per-packet decisions live in netemu.overlay.packet; this module holds the
devices and the peer table. The data path runs in two worker processes, one per
direction (netemu.overlay.fastudp), fed the peer table on stdin. A worker that
exits (its pidfd says so at once), or whose heartbeat stops while packets wait
for it (stopped by a signal, or hung), is killed and replaced on its own, in
about WATCH_TIMEOUT seconds; the daemon goes on.

Fast path: when the kernel offers TUN offloads, the workers move TCP
super-packets from the TUN with UDP GSO sends and UDP GRO receives, with the
very same wire format. It is on by default; switch it off with
`"Backend": {"Type": "udp", "Offload": false}` in the network config, or for
some nodes with the environment variable NETEMU_UDP_NO_OFFLOAD=node1,node2
("*" for all) in the daemons' environment. The workers then run per packet on
a plain TUN, as they do when negotiation fails.
"""

from __future__ import annotations

import collections
import logging
import os
import select
import socket
import subprocess
import time

import trio

from netemu.overlay import fastudp, vnet
from netemu.overlay.backend import Backend, IPv4Network, Lease, LocalConfig, register
from netemu.overlay.tun import open_tun

DEFAULT_PORT = 8285
DEVICE = "flannel0"
# tx_packets/tx_bytes: TUN -> UDP, sent to a peer; rx_*: UDP -> TUN, written for
# local delivery; drop_unknown_source: datagram not from a peer node's address;
# drop_malformed: not one valid IPv4 packet; drop_ttl: TTL reached 0 (flannel
# drops silently); drop_no_route: no peer leases the destination, and
# icmp_unreachable_sent: we wrote a net unreachable back; drop_not_ipv4: the TUN
# handed us something else (IPv6 chatter); tx_errors/rx_errors: socket or TUN
# errors; rx_coalesced: fast path super-packets written (their datagrams count in
# rx_packets); drop_spoofed_source: from a peer, but the inner source is outside
# that peer's lease; malformed_<reason>: drop_malformed by reason;
# drop_internal_error: a receive the worker failed to handle (a bug, logged);
# and, from the daemon, worker_restarts: workers replaced (exited or hung).
COUNTERS = fastudp.COUNTERS
NO_OFFLOAD_ENV = "NETEMU_UDP_NO_OFFLOAD"
WATCH_TIMEOUT = 2.0               # a heartbeat still this long while work waits: a stopped or hung worker (s)
WATCH_GRACE = 15.0                # the same, for a worker not started yet (imports, the peer table)
RESTART_LIMIT = (5, 30.0)         # more restarts than this in that many seconds: give up (the daemon restarts)

log = logging.getLogger("netemu.overlay")


def offload_wanted(node: str, backend_conf: dict, environ=os.environ) -> bool:
    """Whether this node should try the fast path (see the module docstring)."""
    if backend_conf.get("Offload", True) is False:
        return False
    listed = {n.strip() for n in environ.get(NO_OFFLOAD_ENV, "").split(",") if n.strip()}
    return not ({"*", node} & listed)


def worker_environment(environ=os.environ) -> dict[str, str]:
    """The workers' environment: they start with `python -S` (no site: its
    import hooks, an editable install's among them, were a quarter of a
    worker's start-up, paid twice per node), so the path to this netemu and
    to the packages it may fall back on (numpy, where _vnetc is not built)
    goes in PYTHONPATH, before whatever the caller had there."""
    import sysconfig

    import netemu

    here = os.path.dirname(os.path.dirname(os.path.abspath(netemu.__file__)))
    paths = [here, sysconfig.get_paths()["purelib"]] + [p for p in environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    return dict(environ, PYTHONPATH=os.pathsep.join(dict.fromkeys(paths)))


@register
class UdpBackend(Backend):
    name = "udp"
    overhead = 28                      # outer IPv4 header 20 + UDP header 8

    def __init__(self, local: LocalConfig):
        super().__init__(local)
        self.port = int(local.backend_conf.get("Port", DEFAULT_PORT))
        self.counters = dict.fromkeys(COUNTERS, 0)
        self._peers: dict[IPv4Network, str] = {}     # subnet -> peer's underlay address (the workers route)
        self._peers_told = True                      # the workers have the table (flush_peers)
        self._tun_fd: int | None = None
        self._sock: socket.socket | None = None
        self._tun_address = b""                      # flannel0's address, ICMP errors' source
        self.offload = offload_wanted(local.node, local.backend_conf)
        self.fast = False                            # offloads negotiated: workers run the data path
        self.features: dict[str, bool] = {}
        self._workers: dict[str, subprocess.Popen] = {}     # by direction
        self._counters_fd: int | None = None
        self.worker_restarts = 0

    # -- control plane -------------------------------------------------------

    def setup(self, lease: Lease) -> None:
        """Create flannel0 and bind the UDP socket (fails early if the port is taken)."""
        from pyroute2 import IPRoute

        super().setup(lease)
        address = lease.subnet.network_address
        self._tun_address = address.packed
        self._tun_fd = fastudp.open_offload_tun(DEVICE) if self.offload else None
        self.fast = self._tun_fd is not None
        if not self.fast:
            self._tun_fd = open_tun(DEVICE)
        with IPRoute() as ipr:
            index = ipr.link_lookup(ifname=DEVICE)[0]
            ipr.link("set", index=index, mtu=self.mtu())
            if self.fast:
                ipr.link("set", index=index, txqlen=fastudp.TXQUEUELEN)
            # The lease's address with the whole network's prefix: bringing the
            # device up makes the kernel add the route 10.244.0.0/16 dev flannel0,
            # while docker0's narrower /24 keeps local pods local.
            ipr.addr("add", index=index, address=str(address), prefixlen=self.local.network.prefixlen)
            ipr.link("set", index=index, state="up")
        # Our ICMP errors enter the kernel through flannel0 with flannel0's own
        # address as source, which the kernel drops as a martian unless the device
        # accepts local sources. (Real flannel omits this, so its net-unreachable
        # replies never reach the pod; we want them seen.)
        with open(f"/proc/sys/net/ipv4/conf/{DEVICE}/accept_local", "w") as f:
            f.write("1\n")
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self._sock.bind((str(self.local.public_ip), self.port))
        if self.fast:
            self.features = {"tun_offload": True, **fastudp.tune_socket(self._sock)}
            self.features.update(fastudp.tune_uplink(self.local.underlay_dev))
        else:
            fastudp.enlarge_buffers(self._sock)

    def data_path(self) -> str:
        compiled = fastudp.compiled_worker() is not None
        if not self.fast:
            return "per-packet workers (plain TUN, " + ("compiled" if compiled else "Python") + " workers)"
        used = ["TUN TSO4+CSUM"] + [f"UDP {f.upper()}" for f in ("gso", "gro") if self.features.get(f)]
        if compiled:
            used.append("compiled workers")
        else:
            used.append("Python workers, " + ("compiled" if vnet.COMPILED else "numpy") + " segmentation")
        return "offload workers (" + ", ".join(used) + ")"

    def add_peer(self, lease: Lease) -> None:
        if self.lease is not None and lease.subnet == self.lease.subnet:
            return                                   # our own lease: docker0 delivers it
        self._peers[lease.subnet] = str(lease.public_ip)
        self._peers_told = False

    def remove_peer(self, lease: Lease) -> None:
        if self._peers.pop(lease.subnet, None) is not None:
            self._peers_told = False

    def flush_peers(self) -> None:
        """The workers get the whole table once per batch of lease changes:
        told at each change, each of N agents wrote a table of up to N peers
        N times while a cluster came up (N^3 in all: 9 % of the samples of a
        profile of the agents during a 100-node up)."""
        if not self._peers_told:
            self._peers_told = True
            for worker in self._workers.values():
                self._tell(worker)

    def _tell(self, worker: subprocess.Popen) -> None:
        line = fastudp.peer_line({str(s): a for s, a in self._peers.items()})
        try:
            worker.stdin.write(line)
            worker.stdin.flush()
        except OSError:
            pass                                     # it died: _run_workers replaces it

    def teardown(self) -> None:
        """Close the socket and the TUN fd; flannel0 and its route vanish with it."""
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._tun_fd is not None:
            os.close(self._tun_fd)
            self._tun_fd = None

    # -- data plane ----------------------------------------------------------

    async def run(self) -> None:
        """Run the two workers until cancelled (or until one dies: an error)."""
        if self._tun_fd is None or self._sock is None:
            raise RuntimeError("udp backend: run() before setup()")
        await self._run_workers()

    async def _run_workers(self) -> None:
        """One worker process per direction, fed peer tables on stdin, counting
        in shared memory (see `counters`), each watched by a task of its own
        (_watch_worker): one that exits or stalls is killed and replaced, alone.
        Nothing here wakes while the workers are idle and alive."""
        self._counters_fd = fastudp.counters_memory()
        restarts: collections.deque[float] = collections.deque()
        give_up: RuntimeError | None = None
        try:
            async with trio.open_nursery() as nursery:
                tell, troubles = trio.open_memory_channel(len(fastudp.DIRECTIONS))
                for direction in fastudp.DIRECTIONS:
                    nursery.start_soon(self._watch_worker, self._start_worker(direction), direction, tell)
                async for direction, worker, why in troubles:
                    log.warning("udp data path: the %s worker (pid %d) %s: replacing it", direction,
                                worker.pid, why)
                    self._stop_worker(worker)
                    now = time.monotonic()
                    restarts.append(now)
                    while restarts and restarts[0] < now - RESTART_LIMIT[1]:
                        restarts.popleft()
                    if len(restarts) > RESTART_LIMIT[0]:
                        give_up = RuntimeError(f"udp data path: {len(restarts)} worker restarts in "
                                               f"{RESTART_LIMIT[1]:g} s: giving up")
                        nursery.cancel_scope.cancel()
                        break
                    self.worker_restarts += 1
                    nursery.start_soon(self._watch_worker, self._start_worker(direction), direction, tell)
        finally:
            for worker in self._workers.values():
                self._stop_worker(worker)
            self._workers = {}
            self._counters = self.counters           # keep the last figures
            os.close(self._counters_fd)
            self._counters_fd = None
        if give_up is not None:
            raise give_up

    async def _watch_worker(self, worker: subprocess.Popen, direction: str, tell) -> None:
        """Wait until WORKER exits (its pidfd) or stalls (_stalled); then TELL
        _run_workers which and why."""
        why = ""
        pidfd = os.pidfd_open(worker.pid)
        try:
            async with trio.open_nursery() as nursery:
                async def exited() -> None:
                    nonlocal why
                    await trio.lowlevel.wait_readable(pidfd)
                    why = f"exited with status {worker.wait()}"
                    nursery.cancel_scope.cancel()

                async def stalled() -> None:
                    nonlocal why
                    why = await self._stalled(direction)
                    nursery.cancel_scope.cancel()

                nursery.start_soon(exited)
                nursery.start_soon(stalled)
        finally:
            trio.lowlevel.notify_closing(pidfd)
            os.close(pidfd)
        await tell.send((direction, worker, why))

    async def _stalled(self, direction: str) -> str:
        """Return (why) once DIRECTION's worker has had work waiting and taken
        none for WATCH_TIMEOUT (WATCH_GRACE before its first beat: it is
        starting). Sleeps while its input is empty: an idle node's watch costs
        no wake-up; under traffic, one per WATCH_TIMEOUT."""
        source = self._tun_fd if direction == "tx" else self._sock.fileno()
        waiting = select.poll()
        waiting.register(source, select.POLLIN)
        while True:
            await trio.lowlevel.wait_readable(source)
            before = fastudp.read_heartbeat(self._counters_fd, direction)
            asked = WATCH_TIMEOUT if before else WATCH_GRACE
            started = time.monotonic()
            await trio.sleep(asked)
            if fastudp.stalled(before, fastudp.read_heartbeat(self._counters_fd, direction),
                               bool(waiting.poll(0)), time.monotonic() - started, asked):
                return f"made no progress for {asked:g} s with work waiting (stopped or hung)"

    def _start_worker(self, direction: str) -> subprocess.Popen:
        fastudp.reset_heartbeat(self._counters_fd, direction)
        argv = fastudp.worker_argv([direction, str(self._tun_fd), str(self._sock.fileno()),
                                    str(self._counters_fd), str(self.port),
                                    str(self.lease.subnet.network_address)])
        if self.features.get("gso"):
            argv.append("--gso")
        if not self.fast:
            argv.append("--plain")
        worker = subprocess.Popen(argv, stdin=subprocess.PIPE, env=worker_environment(),
                                  pass_fds=(self._tun_fd, self._sock.fileno(), self._counters_fd))
        self._workers[direction] = worker
        self._tell(worker)
        return worker

    @staticmethod
    def _stop_worker(worker: subprocess.Popen) -> None:
        worker.kill()                                # SIGKILL ends a stopped process too
        worker.wait()
        if worker.stdin is not None:
            worker.stdin.close()

    def worker_pids(self) -> dict[str, int]:
        """The workers' process ids by direction (for the daemon's stats record)."""
        return {direction: worker.pid for direction, worker in self._workers.items()}

    @property
    def counters(self) -> dict[str, int]:
        if getattr(self, "_counters_fd", None) is not None:
            return {**fastudp.read_counters(self._counters_fd), "worker_restarts": self.worker_restarts}
        return self._counters

    @counters.setter
    def counters(self, value: dict[str, int]) -> None:
        self._counters = value
