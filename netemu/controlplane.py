"""The cluster's control plane: everything that keeps a cluster alive.

    python -m netemu.controlplane CLUSTER                    the supervisor
    python -m netemu.controlplane CLUSTER --part nodes       the node agents
    python -m netemu.controlplane CLUSTER --part controllers controllers, scheduler,
                                                             load balancer

`netemu up` starts the supervisor, detached, in a session of its own. It starts
the two parts as its children (same session) and restarts a part that dies, with
back-off, as systemd would restart kubelet or kube-controller-manager. The parts
are two processes for the reason Kubernetes runs kubelets apart from the
controller manager: a hung kubelet (its lease no longer renewed) is noticed by
the node lifecycle controller, which must not hang with it.

  - nodes: per node, the node's agent (netemu.node.agent: kubelet, service
    proxy, overlay daemon and the lease heartbeat in one process inside the
    node's namespace), restarted when it exits;
  - controllers: the controllers (node lifecycle included), the scheduler and
    the cloud load balancer.

While `up` builds, the supervisor's stdin is the builder pipe: "start" starts
the parts, "commit" means up has finished. If the pipe closes before "commit"
(up was killed, even by SIGKILL), the supervisor rolls the cluster back. A part
that exits before the commit fails up (no restart: up reports the error).
SIGTERM stops both parts (each stops what it started) and the supervisor.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import select
import signal
import subprocess
import sys
import time

import trio

from netemu import clusterconfig, journal, machines, names
from netemu.store import etcdrun
from netemu.store import open_store, registry
from netemu.supervisor import daemon_env, python_argv, stop_on_signal, supervise

log = logging.getLogger("netemu.controlplane")


class ControlPlane:
    def __init__(self, cluster: str):
        self.cluster = cluster
        self.store = open_store(cluster)
        self.topology = clusterconfig.read(cluster, self.store)
        self.settings = self.topology.settings
        # The controllers' Events: Kubernetes' 1 h TTL, scaled like the other
        # delays (the node agents set the same for the kubelets' events).
        self.store.event_ttl = registry.EVENT_TTL * self.settings.time_scale

    async def run(self, part: str) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(stop_on_signal, nursery.cancel_scope)
            nursery.start_soon(self._tick, part)
            nursery.start_soon(self._controllers)
            nursery.start_soon(self._load_balancer)
            # The Kubernetes API server (netemu.apiserver), supervised here. It
            # stays in the control plane's session: it lives in the machine's
            # namespace (its loopback socket), so teardown finds it by session.
            nursery.start_soon(functools.partial(
                supervise, self.cluster, "apiserver", python_argv("netemu.apiserver", self.cluster),
                os.path.join(names.state_dir(self.cluster), "apiserver.log"), new_session=False))

    async def _tick(self, part: str) -> None:
        """Touch the part's alive file every TICK seconds: proof for the
        supervisor that this process's event loop runs (see Supervisor)."""
        path = part_alive_path(self.cluster, part)
        while True:
            with open(path, "a"):
                os.utime(path)
            await trio.sleep(TICK)

    async def _controllers(self) -> None:
        from netemu.controllers import manager

        await manager.run_all(self.store, self.settings)

    async def _load_balancer(self) -> None:
        from netemu.loadbalancer import LoadBalancerController
        while True:
            try:
                await LoadBalancerController(self.cluster, self.store, self.settings).run()
            except Exception:
                log.exception("load balancer controller failed; restarting")
                await trio.sleep(1)


# -- the supervisor ------------------------------------------------------------

PARTS = ("nodes", "controllers")
RESTART_DELAY = 1.0         # doubling per crash, up to RESTART_DELAY_MAX;
RESTART_DELAY_MAX = 30.0    # back to RESTART_DELAY after a part has run
STABLE_AFTER = 60.0         # this long
STOP_GRACE = 15.0
TICK = 1.0                  # a part touches its alive file this often;
HUNG_MIN = 20.0             # silent for max(this, 2 node grace periods): hung


def part_alive_path(cluster: str, part: str) -> str:
    return os.path.join(names.state_dir(cluster), f"controlplane-{part}.alive")


def hung_after(settings) -> float:
    """How long a part may go without a tick before the supervisor kills and
    restarts it. Longer than the node grace period, so that a hung kubelet is
    first seen as Ready=Unknown (as in Kubernetes) and only then restarted;
    never short, so that a loaded machine's slow store write is no hang."""
    from netemu.node.lease import lease_duration
    return max(HUNG_MIN, 2 * lease_duration(settings))


def part_pid_path(cluster: str, part: str) -> str:
    return os.path.join(names.state_dir(cluster), f"controlplane-{part}.pid")


def part_restarts_path(cluster: str, part: str) -> str:
    return os.path.join(names.state_dir(cluster), f"controlplane-{part}.restarts")


class Part:
    def __init__(self, cluster: str, name: str):
        self.cluster, self.name = cluster, name
        self.proc: subprocess.Popen | None = None
        self.started = 0.0
        self.restarts = 0
        self.delay = RESTART_DELAY
        self.due: float | None = None       # when to restart (monotonic)

    def start(self) -> None:
        # stdout/stderr: the supervisor's own, controlplane.log. Same session as
        # the supervisor, so the journal's session entry covers it.
        self.proc = subprocess.Popen(python_argv("netemu.controlplane", self.cluster, "--part", self.name),
                                     stdin=subprocess.DEVNULL, env=daemon_env(self.cluster), close_fds=True)
        self.started, self.due = time.monotonic(), None
        with open(part_pid_path(self.cluster, self.name), "w") as f:
            f.write(str(self.proc.pid))

    def exited(self) -> int | None:
        return None if self.proc is None else self.proc.poll()

    def silent_for(self) -> float:
        """Seconds since the part last ticked (or was started, if later)."""
        try:
            last = os.stat(part_alive_path(self.cluster, self.name)).st_mtime
        except FileNotFoundError:
            last = 0.0
        since_start = time.monotonic() - self.started
        return min(time.time() - last, since_start)

    def schedule_restart(self) -> None:
        if time.monotonic() - self.started >= STABLE_AFTER:
            self.delay = RESTART_DELAY
        self.restarts += 1
        self.due = time.monotonic() + self.delay
        log.warning("control plane part %s exited with %s; restarting in %.0f s (restart %d)",
                    self.name, self.proc.returncode, self.delay, self.restarts)
        self.delay = min(self.delay * 2, RESTART_DELAY_MAX)
        with open(part_restarts_path(self.cluster, self.name), "w") as f:
            f.write(str(self.restarts))


class Supervisor:
    def __init__(self, cluster: str):
        self.cluster = cluster
        # A machine that joined a cluster over several machines runs its nodes'
        # agents only: the controllers run on the first.
        self.machine = machines.name(cluster)
        parts = PARTS if machines.runs_control_plane(cluster) else ("nodes",)
        self.parts = [Part(cluster, p) for p in parts]
        self.stopping = False
        self.hung_after = hung_after(clusterconfig.read(cluster).settings)
        self.store = open_store(cluster) if self.machine is not None else None
        self.next_look = 0.0

    def run(self) -> int:
        journal.record_process(self.cluster, os.getpid())
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._stop)
        # A closed terminal is no reason to stop (we are detached anyway).
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
        builder_open, committed, started = True, False, False
        while not self.stopping:
            if builder_open:
                ready, _, _ = select.select([0], [], [], 0.2)
                data = os.read(0, 64) if ready else b""
                if ready and not data:
                    builder_open = False
                    if not committed:
                        log.error("netemu up ended before the cluster was up; rolling back")
                        return self._roll_back()
                for word in data.decode(errors="replace").split():
                    if word == "start" and not started:
                        for part in self.parts:
                            part.start()
                        started = True
                        log.info("control plane started (pid %d)", os.getpid())
                    elif word == "commit":
                        committed = True
            else:
                time.sleep(0.2)
            if started and self._cluster_gone():
                log.warning("the cluster's settings are gone from its store: it was taken down from "
                            "another machine; removing this machine's part")
                self._stop_parts()
                return self._taken_down_elsewhere()
            for part in self.parts if started else []:
                if part.due is not None:
                    if time.monotonic() >= part.due and not self.stopping:
                        part.start()
                elif part.exited() is None:
                    if part.silent_for() > self.hung_after:
                        # Hung (stopped, deadlocked): detected by its silence, and
                        # restarted as if it had died.
                        log.error("control plane part %s (pid %d) has not ticked for %.0f s: hung; "
                                  "killing it", part.name, part.proc.pid, part.silent_for())
                        part.proc.kill()
                        part.proc.wait()
                else:
                    if not committed:
                        # up is still waiting: let it fail and roll back, with
                        # the part's error in this log.
                        log.error("control plane part %s exited with %s while the cluster was "
                                  "being built", part.name, part.proc.returncode)
                        self._stop_parts()
                        return 1
                    part.schedule_restart()
        self._stop_parts()
        log.info("stopped")
        return 0

    def _cluster_gone(self) -> bool:
        """On a cluster over several machines, every MACHINE_RENEW seconds:
        renew this machine's key, and tell whether the cluster's settings are
        gone from the store (`netemu down` on another machine). An etcd that
        does not answer is not a cluster gone: it may be back in a moment."""
        if self.store is None or time.monotonic() < self.next_look:
            return False
        self.next_look = time.monotonic() + machines.MACHINE_RENEW
        try:
            if clusterconfig.stored(self.store) is None:
                return True
            machines.announce(self.store, self.cluster, self.machine)
        except Exception as e:      # noqa: BLE001 - etcd away or failing: look again later
            log.warning("store: %s", e)
        return False

    def _stop(self, signum, frame) -> None:
        self.stopping = True

    def _stop_parts(self) -> None:
        running = [p.proc for p in self.parts if p.proc is not None and p.proc.poll() is None]
        for proc in running:
            proc.send_signal(signal.SIGTERM)
            proc.send_signal(signal.SIGCONT)    # a stopped part must act on it
        deadline = time.monotonic() + STOP_GRACE
        for proc in running:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def _taken_down_elsewhere(self) -> int:
        from netemu import cluster as clusters

        if etcdrun.owned(self.cluster) is None:
            return self._roll_back()
        # This machine runs the cluster's etcd, which the `down` on the other
        # machine still uses: it waits for this machine's key to go, then
        # deletes the cluster's keys. Remove this machine's part now, and the
        # etcd once that down is done.
        try:
            clusters.teardown(self.cluster, graceful=False, forget_store=False, keep_etcd=True)
            if not clusters.wait_store_emptied(self.store, clusters.DOWN_WAIT + 10):
                log.warning("the cluster's keys are still in its etcd after %.0f s; stopping it anyway",
                            clusters.DOWN_WAIT + 10)
        finally:
            clusters.remove_etcd(self.cluster)
        return 1

    def _roll_back(self) -> int:
        from netemu import cluster as clusters

        # teardown spares this process (and its ancestors) and kills the rest.
        clusters.teardown(self.cluster, graceful=False)
        return 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netemu-controlplane")
    parser.add_argument("cluster")
    parser.add_argument("--part", choices=PARTS, help="run one part (started by the supervisor)")
    args = parser.parse_args(argv)
    role = args.part or "supervisor"
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s {role} %(name)s %(levelname)s %(message)s")
    if args.part is None:
        return Supervisor(args.cluster).run()

    # A part whose supervisor is gone (kill -9) keeps running: pods and node
    # daemons are not stopped for want of a supervisor; the CLI says that the
    # control plane runs unsupervised.
    if args.part == "nodes":
        # Not trio: it forks the agents (see netemu.node.agents).
        from netemu.node.agents import AgentSupervisor

        def tick() -> None:
            path = part_alive_path(args.cluster, "nodes")
            with open(path, "a"):
                os.utime(path)
        return AgentSupervisor(args.cluster).run(tick)
    trio.run(ControlPlane(args.cluster).run, args.part)
    return 0


if __name__ == "__main__":
    sys.exit(main())
