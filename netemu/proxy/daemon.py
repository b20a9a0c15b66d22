"""The service proxy of one node: kube-proxy's role.

    python -m netemu.proxy.daemon CLUSTER NODE

Runs inside the node's network namespace (entered first thing, so the nft
context and every iptables-restore it runs are the node's). It lists all
Services and Endpoints once, then follows the store's watch, collecting the
changed objects by (namespace, name); after each burst of changes it hands
only those to the proxier, which recomputes and rewrites only those services'
rules (one transaction). The first sync, and the one after a failure, write
everything (the proxier decides). A periodic sync rewrites iptables mode's
top-level chains; in nftables mode it is a no-op when nothing changed (a full
rewrite would also empty the ClientIP affinity sets).
Stale UDP conntrack entries are deleted by a task of their own, after the
sync that made them stale: rules never wait for a conntrack clean-up (one
netlink dump per round, however many endpoints went; see proxy.conntrack).
Each sync is logged and its figures written to proxy-stats.json for the CLI.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

import trio

from netemu import clusterconfig, names
from netemu.node import synced
from netemu.proxy.proxier import make_proxier
from netemu.store import registry
from netemu.supervisor import run_node_daemon

log = logging.getLogger("netemu.proxy")

RESYNC_PERIOD = 30.0
BURST = 0.005           # wait this long for more changes before syncing


def _service_key(store_key: str) -> tuple[str, str]:
    """(namespace, name) from the registry key /registry/<resource>/<namespace>/<name>,
    the key a Service and its Endpoints share."""
    namespace, name = store_key.rstrip("/").split("/")[-2:]
    return namespace, name


class ProxyDaemon:
    def __init__(self, cluster: str, node: str, store):
        self.cluster, self.node, self.store = cluster, node, store
        self.settings = clusterconfig.read(cluster, store).settings
        node_obj = registry.get(store, "Node", None, node)
        ips = [a["address"] for a in node_obj["status"]["addresses"] if a["type"] == "InternalIP"]
        self.proxier = make_proxier(self.settings.proxy_mode, node, ips, str(self.settings.cluster_network))
        # Changes not yet handed to the proxier: (namespace, name) -> object, or None if deleted.
        self.pending_services: dict = {}
        self.pending_endpoints: dict = {}
        self.dirty = trio.Event()
        # Stale UDP flows of the syncs done, not yet cleaned (model.StaleFlow).
        self.pending_flows: set = set()
        self.conntrack_dirty = trio.Event()
        self.stats_path = os.path.join(names.node_dir(cluster, node), "proxy-stats.json")
        self.syncs = 0
        # The revision of each watched prefix the pending changes reach
        # (node.synced: written once they are in the rules).
        self.seen: dict[str, int] = {}

    async def run(self) -> None:
        since = self.store.revision()
        self.seen = {registry.prefix("Service"): since, registry.prefix("Endpoints"): since}
        for kv in self.store.list(registry.prefix("Service")):
            self.pending_services[_service_key(kv.key)] = kv.value
        for kv in self.store.list(registry.prefix("Endpoints")):
            self.pending_endpoints[_service_key(kv.key)] = kv.value
        self.dirty.set()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._watch, registry.prefix("Service"), self.pending_services, since)
            nursery.start_soon(self._watch, registry.prefix("Endpoints"), self.pending_endpoints, since)
            nursery.start_soon(self._periodic)
            nursery.start_soon(self._conntrack_loop)
            await self._sync_loop()

    async def _watch(self, prefix: str, pending: dict, since: int) -> None:
        async for ev in self.store.watch(prefix, since):
            pending[_service_key(ev.key)] = ev.value if ev.type == "PUT" else None
            self.seen[prefix] = ev.revision
            self.dirty.set()

    async def _periodic(self) -> None:
        while True:
            await trio.sleep(RESYNC_PERIOD)
            self.dirty.set()

    async def _sync_loop(self) -> None:
        while True:
            await self.dirty.wait()
            await trio.sleep(BURST)
            self.dirty = trio.Event()
            # Copy and empty in place: the watch tasks hold these very dicts.
            services, endpoints = dict(self.pending_services), dict(self.pending_endpoints)
            self.pending_services.clear()
            self.pending_endpoints.clear()
            seen = dict(self.seen)
            try:
                # The proxier is bound to this process's namespace, which every
                # thread shares (entered before any thread existed).
                result = await trio.to_thread.run_sync(
                    lambda: self.proxier.sync_changes(services, endpoints, clean_conntrack=False))
            except Exception:
                # The proxier kept the objects it was given and marked the kernel
                # as unknown: the next sync rewrites everything.
                log.exception("sync failed; the next one rewrites everything")
                await trio.sleep(1)
                self.dirty.set()
                continue
            self.syncs += 1
            if result.stale_flows:
                self.pending_flows.update(result.stale_flows)
                self.conntrack_dirty.set()
            if result.applied:
                log.info("synced %d service ports (%s, %s, %d services changed, %.1f ms, %d bytes)",
                         result.service_ports, result.mode, "full" if result.full else "incremental",
                         result.changed_services, result.seconds * 1000, result.transaction_bytes)
            self._write_stats(result)
            synced.mark(self.cluster, self.node, "proxy", seen)

    async def _conntrack_loop(self) -> None:
        """Delete the stale UDP entries the syncs left, all pending flows in one
        clean-up (one dump), while the sync loop goes on with the next change."""
        while True:
            await self.conntrack_dirty.wait()
            self.conntrack_dirty = trio.Event()
            flows = list(self.pending_flows)
            self.pending_flows.clear()
            try:
                res = await trio.to_thread.run_sync(self.proxier.clean_conntrack, flows)
            except Exception:
                # Entries left behind keep a UDP client on a gone endpoint
                # until they expire: try again a second later.
                log.exception("conntrack clean-up failed; retrying")
                self.pending_flows.update(flows)
                await trio.sleep(1)
                self.conntrack_dirty.set()
                continue
            log.info("conntrack: %d stale flows, %d entries deleted (%.1f ms)",
                     res.flows, res.deleted, res.seconds * 1000)

    def _write_stats(self, result) -> None:
        data = {"node": self.node, "mode": result.mode, "syncs": self.syncs, "last_sync": time.time(),
                "last_sync_ms": round(result.seconds * 1000, 2), "last_full": result.full,
                "service_ports": result.service_ports, "pid": os.getpid()}
        tmp = self.stats_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(data, f)
        os.replace(tmp, self.stats_path)


def main(argv: list[str] | None = None) -> int:
    return run_node_daemon("proxy", ProxyDaemon, argv)


if __name__ == "__main__":
    sys.exit(main())
