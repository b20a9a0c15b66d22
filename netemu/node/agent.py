"""The node agent: one process per node, as k3s's agent carries kubelet,
kube-proxy and flannel together.

    python -m netemu.node.agent CLUSTER NODE

Enters the node's network namespace before any thread exists (so every socket,
device and nft context it makes is the node's), opens the store, and runs three
parts as tasks of one trio nursery:

  - overlay: flanneld's role (netemu.overlay.daemon.OverlayDaemon); the udp
    backend's data path workers stay processes of their own (they must not
    share a GIL with the control loops);
  - proxy: kube-proxy's role (netemu.proxy.daemon.ProxyDaemon);
  - kubelet: the pods of this node (netemu.node.kubelet.Kubelet);

and beside them the node's heartbeat, its Lease in kube-node-lease.

A part that fails (raises, or returns) is restarted on its own, with back-off
(1 s doubling to 30 s, back to 1 s after a minute of running), a log line in
the part's log and a Warning event on the Node (reason PartRestarted); the
other parts carry on. The agent itself is supervised by the control plane's
nodes part, which restarts it when it exits; when that part goes (kill -9), the
agent stops, so that its successor's agent can take the node's ports and
devices.

The agent reads only the store and its own node's folder (state_dir/nodes/NODE:
its logs, the overlay's subnet.env for the kubelet, the pods' records): what a
node on another machine would have. Logs: one file per part in the node's
folder (overlay.log, proxy.log, kubelet.log, as `netemu logs node/NODE PART`
reads them), and agent.log (the process's stderr: its own lines and anything
no part claims).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Awaitable, Callable

import trio

from netemu import names
from netemu.node import lease
from netemu.store import registry

log = logging.getLogger("netemu.agent")

PARTS = ("overlay", "proxy", "kubelet")
# Loggers whose records go to each part's log file (and not only agent.log).
PART_LOGGERS = {"overlay": ("netemu.overlay",), "proxy": ("netemu.proxy",),
                "kubelet": ("netemu.kubelet", "netemu.lease", "netemu.node")}
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 30.0
STABLE_AFTER = 60.0


def pid_path(cluster: str, node: str) -> str:
    """The running agent's process id (written at its start)."""
    return os.path.join(names.node_dir(cluster, node), "agent.pid")


def part_log_path(cluster: str, node: str, part: str) -> str:
    return os.path.join(names.node_dir(cluster, node), f"{part}.log")


# An agent's watches read the store at most this often, in the cluster's time
# (timeScale scales it; never below the store's own POLL_INTERVAL): every write
# wakes every agent, so at N nodes each read is paid N times. Measured at 40
# nodes x 10 pods (tools/bench_up.py, paired rounds, medians): 0.03 s (the
# store's default) up 28.1 s, idle 33% of a core; 0.1 s up 24.9 s, idle 29%;
# 0.5 s up 20.5 s, idle 21%, but then a node's overlay learns a new peer up to
# 0.5 s after `up` has returned (a ping right after up failed in CI): `up`
# does not wait for every node's routes. Until it does, 0.1 s.
AGENT_READ_INTERVAL = 0.1

class Backoff:
    """The delay before a failed part's next start: RESTART_DELAY, doubling per
    failure up to RESTART_DELAY_MAX, back to RESTART_DELAY once the part has run
    STABLE_AFTER seconds (pure: the clock is the caller's)."""

    def __init__(self, start: float = RESTART_DELAY, most: float = RESTART_DELAY_MAX,
                 stable_after: float = STABLE_AFTER):
        self.start, self.most, self.stable_after = start, most, stable_after
        self.delay = start

    def failed(self, ran_for: float) -> float:
        """The part failed after RAN_FOR seconds: how long to wait."""
        if ran_for >= self.stable_after:
            self.delay = self.start
        delay = self.delay
        self.delay = min(self.delay * 2, self.most)
        return delay


def describe(e: BaseException) -> str:
    """One line for an exception, through the groups trio's nurseries wrap a
    single failure in."""
    while isinstance(e, BaseExceptionGroup) and len(e.exceptions) == 1:
        e = e.exceptions[0]
    return f"{type(e).__name__}: {e}".splitlines()[0][:300]


class Agent:
    def __init__(self, cluster: str, node: str, store):
        from netemu import clusterconfig

        self.cluster, self.node, self.store = cluster, node, store
        topology = clusterconfig.read(cluster, store)
        self.settings = topology.settings
        self.over_machines = bool(topology.machines)
        # The kubelet writes Events: Kubernetes' 1 h TTL, scaled like every delay.
        self.store.event_ttl = registry.EVENT_TTL * self.settings.time_scale
        if hasattr(self.store, "read_interval"):
            self.store.read_interval = max(self.store.read_interval,
                                           AGENT_READ_INTERVAL * self.settings.time_scale)
        self.restarts = dict.fromkeys(PARTS, 0)
        self.kubelet = None
        os.makedirs(names.node_dir(cluster, node), exist_ok=True)
        self._log_files()
        tmp = pid_path(cluster, node) + ".tmp"
        with open(tmp, "w") as f:
            f.write(str(os.getpid()))
        os.replace(tmp, pid_path(cluster, node))

    def _log_files(self) -> None:
        """One file per part, fed by the part's loggers (appended: a restarted
        agent continues them)."""
        fmt = logging.Formatter(f"%(asctime)s %(name)s[{self.node}] %(levelname)s %(message)s")
        claimed = tuple(p for prefixes in PART_LOGGERS.values() for p in prefixes)
        for handler in logging.getLogger().handlers:        # stderr: agent.log
            handler.addFilter(lambda record: not record.name.startswith(claimed))
        for part, prefixes in PART_LOGGERS.items():
            handler = logging.FileHandler(part_log_path(self.cluster, self.node, part))
            handler.setFormatter(fmt)
            handler.addFilter(lambda record, prefixes=prefixes: record.name.startswith(prefixes))
            logging.getLogger().addHandler(handler)

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._part, "overlay", self._overlay)
            nursery.start_soon(self._part, "proxy", self._proxy)
            nursery.start_soon(self._part, "kubelet", self._kubelet)
            # The heartbeat runs beside the kubelet from the start, as the
            # kubelet's lease controller does, not once the node is ready.
            nursery.start_soon(lease.heartbeat, self.store, self.node, self.settings,
                               self._kubelet_ready, self._post_ready)
            nursery.start_soon(self._keep_uplink)
            if self.over_machines:
                # The kubelet's port: its pods' logs, for the other machines.
                nursery.start_soon(self._part, "kubelet", self._kubelet_port)

    async def _part(self, part: str, run: Callable[[], Awaitable[None]]) -> None:
        """Run one part for ever: restarted with back-off when it fails."""
        plog = logging.getLogger(f"{PART_LOGGERS[part][0]}.agent")
        backoff = Backoff()
        while True:
            started = time.monotonic()
            try:
                await run()
                why = "returned"
            except Exception as e:      # noqa: BLE001 - any failure of a part restarts it alone
                plog.exception("%s failed", part)
                why = f"failed: {describe(e)}"
            delay = backoff.failed(time.monotonic() - started)
            self.restarts[part] += 1
            message = f"{part} {why}; restarting in {delay:g} s (restart {self.restarts[part]})"
            plog.warning("%s", message)
            log.warning("%s", message)
            await trio.to_thread.run_sync(self._event, "PartRestarted", message)
            await trio.sleep(delay)

    def _event(self, reason: str, message: str) -> None:
        try:
            node = registry.get(self.store, "Node", None, self.node)
            if node is not None:
                registry.record_event(self.store, node, reason, message, type_="Warning",
                                      source=f"netemu-agent, {self.node}")
        except Exception:       # noqa: BLE001 - an event is no reason to fail
            log.exception("event %s not recorded", reason)

    async def _keep_uplink(self) -> None:
        """Restart a delay line of this node's uplink that died (Link.revive):
        while none reads its tap, the link's frames go nowhere."""
        from netemu.link import keep_delay_lines
        from netemu.node import host

        uplink = host.uplink(self.cluster, self.node, self.settings.underlay_mtu)
        await keep_delay_lines(uplink, f"node {self.node}'s uplink")

    async def _overlay(self) -> None:
        from netemu.overlay.daemon import OverlayDaemon
        await OverlayDaemon(self.cluster, self.node, self.store).run()

    async def _proxy(self) -> None:
        from netemu.proxy.daemon import ProxyDaemon
        await ProxyDaemon(self.cluster, self.node, self.store).run()

    async def _kubelet(self) -> None:
        from netemu.node.kubelet import Kubelet
        self.kubelet = Kubelet(self.cluster, self.node, self.store, self.settings)
        await self.kubelet.run()

    async def _kubelet_port(self) -> None:
        from netemu.node import kubeletport
        await kubeletport.serve(self.cluster, self.node, self.store, self.settings)

    def _kubelet_ready(self) -> bool:
        return self.kubelet is not None and getattr(self.kubelet, "ipam", None) is not None

    def _post_ready(self) -> None:
        self.kubelet._set_node_ready()


def main(argv: list[str] | None = None) -> int:
    from netemu.supervisor import run_node_daemon

    return run_node_daemon("agent", Agent, argv)


if __name__ == "__main__":
    sys.exit(main())
