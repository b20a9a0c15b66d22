"""The cluster's control plane process: everything that keeps a cluster alive.

    python -m netemu.controlplane CLUSTER

Started (detached) by `netemu up`; stopped by `netemu down`. It runs, as tasks of
one trio nursery:
  - per node, the overlay daemon (a supervised child process inside the node's
    namespace) and the service proxy (likewise), restarted if they die;
  - per node, the kubelet (in-process: it builds sandboxes from worker threads and
    starts containers through nsenter);
  - the controllers and the scheduler.
SIGTERM stops everything it started and exits.
"""

from __future__ import annotations

import argparse
import logging
import os
import pickle
import signal
import sys

import trio

from netemu import names
from netemu.store import registry
from netemu.store.sqlite import SqliteStore
from netemu.supervisor import python_argv, supervise

log = logging.getLogger("netemu.controlplane")


def topology_path(cluster: str) -> str:
    return os.path.join(names.state_dir(cluster), "topology.pickle")


def save_topology(topology) -> None:
    with open(topology_path(topology.name), "wb") as f:
        pickle.dump(topology, f)


def load_topology(cluster: str):
    with open(topology_path(cluster), "rb") as f:
        return pickle.load(f)


class ControlPlane:
    def __init__(self, cluster: str):
        self.cluster = cluster
        self.topology = load_topology(cluster)
        self.settings = self.topology.settings
        self.store = SqliteStore(names.store_path(cluster))
        # Every Event is written by this process (controllers and kubelets), so
        # its TTL is set here: Kubernetes' 1 h, scaled like the other delays.
        self.store.event_ttl = registry.EVENT_TTL * self.settings.time_scale
        self.nodes: dict[str, trio.CancelScope] = {}

    async def run(self) -> None:
        async with trio.open_nursery() as nursery:
            self.nursery = nursery
            nursery.start_soon(self._signals, nursery.cancel_scope)
            for node in registry.list_(self.store, "Node"):
                self.start_node(node["metadata"]["name"])
            nursery.start_soon(self._controllers)
            nursery.start_soon(self._follow_nodes)
            nursery.start_soon(self._load_balancer)
            # The Kubernetes API server (netemu.apiserver), one more supervised part.
            nursery.start_soon(supervise, self.cluster, "apiserver",
                               python_argv("netemu.apiserver", self.cluster),
                               os.path.join(names.state_dir(self.cluster), "apiserver.log"))

    async def _signals(self, scope: trio.CancelScope) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async for _ in signals:
                log.info("stopping")
                scope.cancel()
                return

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

    async def _follow_nodes(self) -> None:
        """Nodes added or removed while the cluster runs (netemu node add/remove)."""
        since = self.store.revision()
        async for ev in self.store.watch(registry.prefix("Node"), since):
            name = ev.key.rsplit("/", 1)[1]
            if ev.type == "PUT" and name not in self.nodes:
                self.start_node(name)
            elif ev.type == "DELETE" and name in self.nodes:
                self.nodes.pop(name).cancel()

    def start_node(self, node: str) -> None:
        scope = trio.CancelScope()
        self.nodes[node] = scope
        self.nursery.start_soon(self._run_node, node, scope)

    async def _run_node(self, node: str, scope: trio.CancelScope) -> None:
        node_dir = names.node_dir(self.cluster, node)
        os.makedirs(node_dir, exist_ok=True)
        with scope:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(supervise, self.cluster, f"overlay[{node}]",
                                   python_argv("netemu.overlay.daemon", self.cluster, node),
                                   os.path.join(node_dir, "overlay.log"),
                                   os.path.join(node_dir, "overlay.restarts"))
                nursery.start_soon(supervise, self.cluster, f"proxy[{node}]",
                                   python_argv("netemu.proxy.daemon", self.cluster, node),
                                   os.path.join(node_dir, "proxy.log"),
                                   os.path.join(node_dir, "proxy.restarts"))
                nursery.start_soon(self._kubelet, node)

    async def _kubelet(self, node: str) -> None:
        # Imported here: the node daemons read this module's topology helpers and
        # should not pay for the kubelet's imports.
        from netemu.node.kubelet import Kubelet

        while True:
            try:
                await Kubelet(self.cluster, node, self.store, self.settings).run()
            except Exception:
                log.exception("kubelet on %s failed; restarting", node)
                await trio.sleep(1)



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="netemu-controlplane")
    parser.add_argument("cluster")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(name)s %(levelname)s %(message)s")
    trio.run(ControlPlane(args.cluster).run)
    return 0


if __name__ == "__main__":
    sys.exit(main())
