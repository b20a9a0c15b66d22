"""Links: the veth pairs that connect namespaces, and what each one is like.

Every cable of the emulated cluster is a veth pair: a node's uplink (its eth0 and
its port on the fabric bridge), the external client's and the load balancer's
uplinks, a pod's eth0 and its vethXXXXXXX on docker0. A Link knows its two ends,
its MTU, its offload settings and its impairment (rate, loss: see
netemu.impairment), and builds itself; nothing else in netemu runs `ip link add
... type veth`.

The near end is made first, in the near namespace (the switch side: the fabric,
or the node for a pod), and is the one that joins a bridge; the far end is moved
into the far namespace (the host side) and gets the address.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time

from netemu import journal, names, netns
from netemu.impairment import Impairment, nft_ruleset, table_name, tap_name, tc_commands


@dataclasses.dataclass(frozen=True)
class End:
    namespace: str
    name: str


# TCP segmentation offloads (what `ethtool -K IFACE tso off` turns off).
TSO_FEATURES = ("tx-tcp-segmentation", "tx-tcp-ecn-segmentation", "tx-tcp-mangleid-segmentation",
                "tx-tcp6-segmentation")


@dataclasses.dataclass
class Link:
    near: End
    far: End
    mtu: int
    bridge: str | None = None           # the bridge the near end is a port of
    hairpin: bool = False               # the bridge may send a frame back out of this port
    far_mac: str | None = None
    far_address: str | None = None      # "10.244.1.2/24"
    # Segments per TSO burst of the far end (0: the kernel's default).
    far_gso_max_segs: int = 0
    # TCP segmentation offload of the near end. Off for the udp backend's node
    # uplinks: a veth hands the receiving side's GRO (and so the overlay daemon's
    # UDP GRO socket) merged datagrams only when the sending end has TSO off;
    # measured, this more than doubles the udp backend's TCP throughput (0.021x ->
    # 0.048x host-gw). The frames on the wire are the same.
    near_tso: bool = True
    impairment: Impairment | None = None    # applied by create (see impair)
    # The cluster that owns the link: its delay-line processes are journaled
    # there, and their pid files and logs live in its state folder.
    cluster: str = ""

    def commands(self) -> tuple[list[str], list[str]]:
        """The `ip -batch` lines for the near and the far namespace (pure)."""
        near = [
            # "name" before each interface name: a node called "master" or "up"
            # must not be read as one of ip's keywords.
            f"link add name {self.near.name} mtu {self.mtu} type veth peer name {self.far.name} "
            f"mtu {self.mtu} netns {self.far.namespace}",
            f"link set dev {self.near.name}" + (f" master {self.bridge}" if self.bridge else "") + " up",
        ]
        if self.hairpin:
            near.append(f"link set dev {self.near.name} type bridge_slave hairpin on")
        far = []
        if self.far_mac:
            far.append(f"link set dev {self.far.name} address {self.far_mac}")
        if self.far_address:
            far.append(f"addr add {self.far_address} dev {self.far.name}")
        if self.far_gso_max_segs:
            far.append(f"link set dev {self.far.name} gso_max_segs {self.far_gso_max_segs}")
        far.append(f"link set dev {self.far.name} up")
        return near, far

    def create(self, far_before: Sequence[str] = (), far_after: Sequence[str] = (),
               near_after: Sequence[str] = ()) -> None:
        """Make the pair. FAR_BEFORE and FAR_AFTER are more `ip` lines for the far
        namespace (its lo, its routes), NEAR_AFTER for the near one (a
        neighbour entry), each run in the same process as the link's."""
        near, far = self.commands()
        netns.ip_batch(self.near.namespace, [*near, *near_after])
        netns.ip_batch(self.far.namespace, [*far_before, *far, *far_after])
        if not self.near_tso:
            set_tso(self.near, False)
        if self.impairment:
            self.impair(self.impairment)

    def impair(self, imp: Impairment) -> None:
        """Set the link's impairment, in both directions: each end's egress gets
        the rate (a root qdisc) and the loss and duplication (an nft table of its
        own), so what one end sends is impaired before the other receives it. An
        empty Impairment removes everything a previous one put there."""
        with self._locked():
            self._impair(imp)
        self.impairment = imp

    def _impair(self, imp: Impairment) -> None:
        for end, other in ((self.near, self.far), (self.far, self.near)):
            what = f"{end.name} -> {other.namespace}/{other.name}"
            # The delay line's tap must exist before a rule forwards to it, and
            # must stay until no rule does.
            if imp.delay:
                self._start_delay_line(end, imp)
            netns.run(end.namespace, ["nft", "-f", "-"], input=nft_ruleset(end.name, imp, what))
            if not imp.delay:
                self._stop_delay_line(end)
            # Start from the veth's default (no queue): replacing tbf by htb, or
            # back, must leave no stale child. Deleting a root qdisc that is not
            # there fails harmlessly.
            netns.run(end.namespace, ["tc", "qdisc", "del", "dev", end.name, "root"], check=False)
            for argv in tc_commands(end.name, imp, self.mtu):
                netns.run(end.namespace, argv)

    @contextlib.contextmanager
    def _locked(self):
        """Held while this link's delay lines are started or stopped: by
        `link set` (impair) and by the control plane's restart of a dead line
        (revive), which must not both start one on the same tap."""
        if not self.cluster:
            yield
            return
        with open(self._delay_line_file(self.near, "lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def revive(self) -> list[int]:
        """Restart each delay line of this link that died (killed, crashed)
        while its link still forwards to it, with the delay, jitter and reorder
        it was started with; a line stopped on purpose (link set, --clear, pod
        deletion) has no record left and stays stopped. Returns the pids of the
        lines started: the caller's children, which it reaps (reap)."""
        started = []
        with self._locked():
            for end in (self.near, self.far):
                record = self._delay_line_record(end)
                if record is None or journal.running(*record[:2]):
                    continue
                reap(record[0])     # ours if this process started it
                if not netns.exists(end.namespace):
                    continue
                started.append(self._spawn_delay_line(end, *record[2:]))
        return started

    def delay_lines_recorded(self) -> bool:
        """Is a delay line recorded for either end (one revive would look at)?
        Two stats, no lock, no thread: what an idle keeper asks each time."""
        if not self.cluster:
            return False
        folder = os.path.join(names.state_dir(self.cluster), "links")
        return any(os.path.exists(os.path.join(folder, f"{end.namespace}.{end.name}.pid"))
                   for end in (self.near, self.far))

    def open_bell(self) -> int | None:
        """The read end of this link's bell (a FIFO in the links folder, made
        if missing, opened read-write and non-blocking so that it never sees
        an end of file): readable when a delay line of the link was started
        (ring). None for a link of no cluster."""
        if not self.cluster:
            return None
        path = self._delay_line_file(self.near, "bell")
        with contextlib.suppress(FileExistsError):
            os.mkfifo(path, 0o600)
        return os.open(path, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)

    def ring(self) -> None:
        """Wake this link's keeper (keep_delay_lines), if one listens: a delay
        line is recorded now, which it must restart if it dies."""
        if not self.cluster:
            return
        path = os.path.join(names.state_dir(self.cluster), "links", f"{self.near.namespace}.{self.near.name}.bell")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:
            return          # no bell (ENOENT) or nobody listening (ENXIO)
        try:
            os.write(fd, b"\0")
        except BlockingIOError:
            pass            # full: rung already
        finally:
            os.close(fd)

    def _delay_line_file(self, end: End, suffix: str) -> str:
        folder = os.path.join(names.state_dir(self.cluster), "links")
        os.makedirs(folder, exist_ok=True)
        return os.path.join(folder, f"{end.namespace}.{end.name}.{suffix}")

    def _start_delay_line(self, end: End, imp: Impairment) -> None:
        """(Re)start END's delay line with IMP's delay, jitter and reorder."""
        if not self.cluster:
            raise ValueError("a delay needs the link's cluster (its delay line is a process it owns)")
        running = self._delay_line(end)
        if running and running[2:] == (imp.delay, imp.jitter, imp.reorder):
            return          # as it is: a restart would lose the frames it holds
        self._stop_delay_line(end, keep_tap=True)
        self._spawn_delay_line(end, imp.delay, imp.jitter, imp.reorder)

    def _spawn_delay_line(self, end: End, delay: int, jitter: int, reorder: int) -> int:
        """Start END's delay line (its tap made if missing) and record it; its pid."""
        tap = tap_name(end.name)
        if netns.run(end.namespace, ["ip", "link", "show", "dev", tap], check=False).returncode != 0:
            netns.ip_batch(end.namespace, [f"tuntap add mode tap name {tap}", f"link set dev {tap} mtu {self.mtu}"])
            # Whatever the tap itself sends is read by the delay line and goes
            # out on the link: no IPv6 on it, so no router solicitation or DAD
            # of its own joins the link's traffic.
            netns.write_sysctl(end.namespace, f"net.ipv6.conf.{tap}.disable_ipv6", 1)
            netns.ip_batch(end.namespace, [f"link set dev {tap} up"])
        with open(self._delay_line_file(end, "log"), "ab") as log:
            proc = subprocess.Popen(
                netns.exec_argv(end.namespace, [sys.executable, "-m", "netemu.delayline", tap, end.name,
                                                str(delay), str(jitter), str(reorder)]),
                stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
        journal.record_process(self.cluster, proc.pid)
        ready = proc.stdout.readline().strip()
        proc.stdout.close()
        if ready != b"ready":
            proc.kill()
            proc.wait()
            raise netns.NetnsError(f"in {end.namespace}: the delay line of {end.name} did not start "
                                   f"(see {self._delay_line_file(end, 'log')})")
        with open(self._delay_line_file(end, "pid"), "w") as f:
            f.write(f"{proc.pid} {journal.process_start_time(proc.pid)} {delay} {jitter} {reorder}\n")
        self.ring()
        return proc.pid

    def _delay_line(self, end: End) -> tuple[int, ...] | None:
        """(pid, start time, delay, jitter, reorder) of END's running delay line, if any.
        Only the process its pid file names: a pid re-used since is someone else's."""
        record = self._delay_line_record(end)
        return record if record and journal.running(*record[:2]) else None

    def _delay_line_record(self, end: End) -> tuple[int, ...] | None:
        """(pid, start time, delay, jitter, reorder) of the delay line last
        started for END and not stopped since, running or not."""
        if not self.cluster:
            return None
        try:
            with open(self._delay_line_file(end, "pid")) as f:
                pid, start, delay, jitter, reorder = (int(x) for x in f.read().split())
        except (FileNotFoundError, ValueError):
            return None
        return pid, start, delay, jitter, reorder

    def _stop_delay_line(self, end: End, keep_tap: bool = False) -> None:
        if self.cluster:
            pid_file = self._delay_line_file(end, "pid")
            running = self._delay_line(end)
            if running:
                pid, start = running[:2]
                os.kill(pid, signal.SIGTERM)
                deadline = time.monotonic() + 5
                while journal.running(pid, start) and time.monotonic() < deadline:
                    with contextlib.suppress(ChildProcessError):
                        os.waitpid(pid, os.WNOHANG)     # ours (started by this process): reap it
                    time.sleep(0.02)
            if os.path.exists(pid_file):
                os.unlink(pid_file)
        if not keep_tap:
            netns.run(end.namespace, ["ip", "link", "del", "dev", tap_name(end.name)], check=False)

    def installed(self, lines: dict | None = None) -> dict:
        """What the kernel holds for this link's impairment, per end (read back,
        for `link show` and tests): root qdisc kinds, nft table names, and the
        delay-line process, found among the machine's processes by its
        namespace and its device (LINES: running_delay_lines(), read once for
        many links). An end whose namespace is gone is None."""
        if lines is None:
            lines = running_delay_lines()
        out = {}
        for end in (self.near, self.far):
            where = f"{end.namespace}/{end.name}"
            ino = netns.inode(end.namespace)
            if ino is None:
                out[where] = None
                continue
            pids = lines.get((ino, end.name), [])
            qdiscs = json.loads(netns.run(end.namespace, ["tc", "-j", "qdisc", "show", "dev", end.name]).stdout
                                or "[]")
            tables = netns.run(end.namespace, ["nft", "list", "tables", "netdev"]).stdout.split()
            out[where] = {
                "qdiscs": [q["kind"] for q in qdiscs if q.get("kind") not in ("noqueue",)],
                "nftables": [t for t in tables if t == table_name(end.name)],
                "delayLine": {"pid": min(pids), "tap": tap_name(end.name)} if pids else None,
            }
        return out


def running_delay_lines() -> dict[tuple[int, str], list[int]]:
    """Every delay line running on the machine, read from /proc: {(inode of
    its network namespace, the device it serves): [pids]} (a process that has
    exited but is not yet reaped has no command line, so it is not listed)."""
    out: dict[tuple[int, str], list[int]] = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode(errors="replace").split("\0")
            if "netemu.delayline" not in argv:
                continue
            ino = os.stat(f"/proc/{pid}/ns/net").st_ino
        except OSError:
            continue
        i = argv.index("netemu.delayline")
        if len(argv) > i + 2:
            out.setdefault((ino, argv[i + 2]), []).append(int(pid))
    return out


def reap(pid: int) -> bool:
    """Collect PID's exit status if it is this process's child and has exited;
    True when it has (or is not ours to wait for)."""
    try:
        return os.waitpid(pid, os.WNOHANG)[0] == pid
    except ChildProcessError:
        return True


async def keep_delay_lines(link, what: str, every: float = 1.0, idle_every: float = 60.0) -> None:
    """Every EVERY seconds, restart LINK's dead delay lines (Link.revive) and
    reap those this process started that have exited since. While the link
    has no delay line recorded and no child to reap, wait for its bell (rung
    when a delay line of the link is started: `link set`), IDLE_EVERY seconds
    at most: every node's uplink has a keeper (and every pod whose spec
    impairs its link), and an idle one that woke every 5 s was a sixth of an
    idle agent's wake-ups.
    Runs until cancelled; a check in progress finishes first (it holds the
    link's lock)."""
    import logging

    import trio

    log = logging.getLogger("netemu.link")
    children: set[int] = set()
    bell = link.open_bell()
    try:
        while True:
            started = []
            # Most links have no delay line: then no thread, lock or folder each time.
            if link.delay_lines_recorded():
                try:
                    started = await trio.to_thread.run_sync(link.revive)
                except Exception:
                    log.exception("%s: restarting a delay line failed", what)
            for pid in started:
                log.warning("%s: a delay line had stopped; restarted (pid %d)", what, pid)
            children.update(started)
            children = {pid for pid in children if not reap(pid)}
            if children or link.delay_lines_recorded() or bell is None:
                await trio.sleep(every if children or link.delay_lines_recorded() else idle_every)
                continue
            with trio.move_on_after(idle_every):
                await trio.lowlevel.wait_readable(bell)
            with contextlib.suppress(BlockingIOError):
                os.read(bell, 4096)
    finally:
        if bell is not None:
            os.close(bell)


def set_tso(end: End, on: bool) -> None:
    """Turn TCP segmentation offload of END on or off."""
    from pyroute2.ethtool import Ethtool

    with netns.inside(end.namespace):
        ethtool = Ethtool()
        try:
            features = ethtool.get_features(end.name)
            for name in TSO_FEATURES:
                if name in features.features:
                    features.features[name].enable = on
            ethtool.set_features(end.name, features)
        finally:
            ethtool.close()
