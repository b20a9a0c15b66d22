"""The control plane's nodes part: one agent per node, forked, supervised.

    python -m netemu.controlplane CLUSTER --part nodes

It imports everything an agent runs (trio, pyroute2, the kubelet, the proxy,
the overlay) once, freezes those objects out of the garbage collector's reach,
and then forks each node's agent from itself, without exec: a zygote, as
Android starts its apps. A forked agent starts in milliseconds instead of
importing for half a second of CPU, and its code and module objects stay
shared, copy-on-write, with every other agent's: what a hundred agents cost in
memory is mostly what each one writes.

This process stays single-threaded and never runs trio (forking a process with
threads can copy a lock some other thread held). It sleeps in select() until
a signal (SIGCHLD: an agent exited; SIGTERM), the bell of the store's Node
objects (a node added or removed while the cluster runs; without a bell, on
etcd, it looks once a second) or its next timer; it reaps agents that exit and
starts them again with back-off (1 s doubling to 30 s), counting restarts in
the node's agent.restarts, and touches the part's alive file every second for
the control plane's supervisor. (It used to turn every 0.1 s: 4 ms of CPU a
second at 100 nodes.) SIGTERM stops every
agent (SIGTERM to its process group, SIGKILL after the grace) and then itself.

A forked agent enters its node's namespace before it leaves the control
plane's session (setsid), so `down` finds it at every moment: first by the
session, then by the namespace. When this process goes (kill -9), each agent
notices that its parent is gone and stops (supervisor.watch_parent), so that
the agents of the part that replaces it can take the nodes' ports and devices.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import select
import signal
import sys
import time

from netemu import machines, names, netns
from netemu.node.agent import Backoff

log = logging.getLogger("netemu.controlplane.nodes")

LOOK_EVERY = 1.0            # seconds between looks at the Node objects (etcd: no bell)
LOOK_SAFETY = 10.0          # ... when the Node bell says when to look (SQLite)
TICK = 1.0                  # seconds between touches of the part's alive file
STOP_GRACE = 3.0


def preload() -> None:
    """Import what every agent runs, so that forked agents share it."""
    import pyroute2  # noqa: F401
    import trio  # noqa: F401

    import netemu.clusterconfig  # noqa: F401
    import netemu.node.kubelet  # noqa: F401
    import netemu.overlay.daemon  # noqa: F401
    import netemu.overlay.udp  # noqa: F401
    import netemu.overlay.vxlan  # noqa: F401
    import netemu.overlay.hostgw  # noqa: F401
    import netemu.proxy.daemon  # noqa: F401
    import netemu.proxy.proxier  # noqa: F401
    import netemu.supervisor  # noqa: F401


class Child:
    def __init__(self, node: str):
        self.node = node
        self.pid: int | None = None
        self.started = 0.0
        self.due: float | None = 0.0        # when to start (monotonic); None: running
        self.restarts = 0
        self.backoff = Backoff()


class AgentSupervisor:
    def __init__(self, cluster: str):
        self.cluster = cluster
        self.children: dict[str, Child] = {}
        self.stopping = False
        self._wake_r = -1
        self._close_in_child: list[int] = []     # the loop's fds: not the agents'

    def run(self, tick) -> int:
        """TICK(): touch the part's alive file (the control plane's supervisor's
        proof that this part runs)."""
        from netemu.store import registry
        from netemu.store import open_store

        preload()
        # Everything imported so far is shared with the agents: keep the
        # collector from touching (and so copying) those pages in each of them.
        gc.collect()
        gc.freeze()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        store = open_store(self.cluster)
        # On a cluster over several machines, the agents of this machine's nodes.
        machine = machines.name(self.cluster)
        ears = self._ears(store)
        next_look = next_tick = 0.0
        try:
            while not self.stopping:
                now = time.monotonic()
                if now >= next_tick:
                    tick()
                    next_tick = now + TICK
                if now >= next_look or (ears is not None and ears.drain()):
                    next_look = now + (LOOK_SAFETY if ears is not None else LOOK_EVERY)
                    try:
                        nodes = registry.list_(store, "Node")
                    except Exception as e:      # noqa: BLE001 - etcd away: the agents run on; look again
                        log.warning("cannot list the nodes (%s); the agents run on", e)
                        nodes = None
                    if nodes is not None:
                        wanted = {n["metadata"]["name"] for n in nodes
                                  if machine is None
                                  or n["metadata"].get("labels", {}).get(names.MACHINE_LABEL) == machine}
                        for node in wanted - set(self.children):
                            self.children[node] = Child(node)
                        for node in set(self.children) - wanted:
                            self._stop_child(self.children.pop(node))
                self._reap()
                for child in self.children.values():
                    if child.due is not None and time.monotonic() >= child.due and not self.stopping:
                        self._start(child)
                due = [c.due for c in self.children.values() if c.due is not None]
                self._wait(ears, min([next_tick, next_look] + due) - time.monotonic())
        finally:
            if ears is not None:
                ears.close()
            store.close()
            self._stop_all()
        return 0

    def _ears(self, store):
        """What wakes this loop besides its timers: a byte on a pipe for each
        signal (SIGCHLD: an agent exited; SIGTERM), and, on the SQLite store, a
        bell of the Node objects (a node added or removed: one list then, not
        once a second). Returns the bell's listener, or None (etcd: the Nodes
        are listed every LOOK_EVERY)."""
        self._wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._close_in_child += [self._wake_r, wake_w]
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda signum, frame: None)   # delivered, so it wakes the pipe
        from netemu.store import registry, sqlite

        if not isinstance(store, sqlite.SqliteStore):
            return None
        try:
            ears = sqlite.BellWatch(store.path)
            ears.sync({(sqlite.bell_for(registry.prefix("Node")), None)})
        except OSError:
            return None
        self._close_in_child.append(ears.fd)
        return ears

    def _wait(self, ears, timeout: float) -> None:
        """Sleep up to TIMEOUT, less if a signal comes or the Node bell rings."""
        fds = [self._wake_r] + ([ears.fd] if ears is not None else [])
        if timeout > 0 and not self.stopping:
            select.select(fds, [], [], timeout)
        with contextlib.suppress(BlockingIOError):
            while os.read(self._wake_r, 512):
                pass

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def _start(self, child: Child) -> None:
        log_path = os.path.join(names.node_dir(self.cluster, child.node), "agent.log")
        os.makedirs(os.path.dirname(log_path), exist_ok=True)
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                signal.set_wakeup_fd(-1)
                for fd in self._close_in_child:
                    with contextlib.suppress(OSError):
                        os.close(fd)
                code = agent_child(self.cluster, child.node, log_path)
            except BaseException:       # noqa: BLE001 - the child ends here, whatever happens
                import traceback
                traceback.print_exc()
            finally:
                os._exit(code)
        child.pid, child.started, child.due = pid, time.monotonic(), None
        log.info("agent of %s started (pid %d)", child.node, pid)

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            for child in self.children.values():
                if child.pid == pid:
                    child.pid = None
                    if self.stopping:
                        continue
                    delay = child.backoff.failed(time.monotonic() - child.started)
                    child.restarts += 1
                    child.due = time.monotonic() + delay
                    log.warning("agent of %s exited with %s; restarting in %g s (restart %d)", child.node,
                                os.waitstatus_to_exitcode(status), delay, child.restarts)
                    with contextlib.suppress(OSError):
                        with open(os.path.join(names.node_dir(self.cluster, child.node), "agent.restarts"),
                                  "w") as f:
                            f.write(str(child.restarts))

    def _stop_child(self, child: Child) -> None:
        self._stop_pids([child.pid] if child.pid else [])
        child.pid = None

    def _stop_all(self) -> None:
        self._stop_pids([c.pid for c in self.children.values() if c.pid])

    def _stop_pids(self, pids: list[int]) -> None:
        """SIGTERM to each agent's group (the agent and its udp workers; the
        pods' processes have sessions of their own), SIGKILL after the grace."""
        for sig in (signal.SIGTERM, signal.SIGKILL):
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    if os.getpgid(pid) == pid:
                        os.killpg(pid, sig)
                    else:
                        os.kill(pid, sig)       # not yet its own group (just forked)
            deadline = time.monotonic() + STOP_GRACE
            while pids and time.monotonic() < deadline:
                for pid in list(pids):
                    with contextlib.suppress(ChildProcessError):
                        if os.waitpid(pid, os.WNOHANG)[0] == 0:
                            continue
                    pids.remove(pid)
                time.sleep(0.05)
            if not pids:
                return


PR_SET_NAME = 15


def set_title(argv: list[str], name: str) -> None:
    """Show this forked process as ARGV in /proc/PID/cmdline (ps, pgrep -f) and
    as NAME in /proc/PID/comm: written over the command line the process was
    started with (as setproctitle does), so cut to that length. A forked agent
    would otherwise look like the nodes part it was forked from."""
    import ctypes

    with open("/proc/self/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    start, end = int(fields[45]), int(fields[46])       # arg_start, arg_end (fields 48, 49)
    raw = "\0".join(argv).encode()[:end - start - 1]
    ctypes.memmove(start, raw + b"\0" * (end - start - len(raw)), end - start)
    ctypes.CDLL(None).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)


def agent_child(cluster: str, node: str, log_path: str) -> int:
    """In the forked child: become NODE's agent."""
    with contextlib.suppress(OSError, ValueError, IndexError):
        set_title([sys.executable, "-m", "netemu.node.agent", cluster, node], "netemu-agent")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD):
        signal.signal(sig, signal.SIG_DFL)
    # The node's namespace first, then a session of its own: teardown finds
    # the agent by the control plane's session until it is in the namespace.
    netns.enter(names.node_ns(cluster, node))
    os.setsid()
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    devnull = os.open(os.devnull, os.O_RDONLY)
    os.dup2(devnull, 0)
    os.close(devnull)
    os.environ[names.CLUSTER_ENV] = cluster
    logging.getLogger().handlers.clear()    # the parent's (its stderr's format)
    from netemu.node import agent
    return agent.main([cluster, node])
