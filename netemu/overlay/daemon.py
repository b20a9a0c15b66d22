"""The overlay daemon of one node: flanneld's role.

    python -m netemu.overlay.daemon CLUSTER NODE

Runs inside the node's network namespace (it enters it first thing, before any
thread exists, so every socket and device it makes is the node's). It reads the
network config from the state store, leases a subnet, writes subnet.env, sets up
its backend, keeps the backend in step with the other nodes' leases, renews its
lease, and publishes what the rest of the cluster reads of it in the store
(netemu.overlay.stats): flannel's annotations on its Node, and its counters for
`netemu stats` / `describe node`. Counters survive a restart of the daemon (a
crash, kill -9): the new one starts from the figures its predecessor last
wrote to overlay-stats.json, the node's own file, which only this node's
daemon reads.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import sys
import time

import trio

from netemu import names
from netemu.overlay import backend as backends, leases, stats, subnetenv
from netemu.node import synced
from netemu.overlay.backend import Lease, LocalConfig
from netemu.store import registry
from netemu.supervisor import run_node_daemon

log = logging.getLogger("netemu.overlay")

STATS_PERIOD = 1.0          # how often the counters are looked at while they change (s)
STATS_IDLE_PERIOD = 8.0     # ... doubling up to this while they do not (an idle node)


def stats_path(node_dir: str) -> str:
    return os.path.join(node_dir, "overlay-stats.json")


def read_stats(node_dir: str) -> dict | None:
    """What the node's overlay daemon last wrote to its own file (see
    _publish_stats), or None when there is nothing (yet) to read. For the
    node's next daemon only: others read the store (netemu.overlay.stats)."""
    try:
        with open(stats_path(node_dir)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def carried_counters(previous: dict | None, backend: str, gauges) -> dict[str, int]:
    """The counters to start from: those a previous daemon of this node
    published (PREVIOUS, read_stats) for the same BACKEND, gauges left out
    (the new daemon measures those afresh)."""
    if not previous or previous.get("backend") != backend or not isinstance(previous.get("counters"), dict):
        return {}
    return {name: value for name, value in previous["counters"].items()
            if name not in gauges and isinstance(value, int) and not isinstance(value, bool) and value >= 0}


def add_counters(base: dict[str, int], live: dict[str, int], gauges) -> dict[str, int]:
    """LIVE on top of BASE (carried_counters): counters add up, gauges are LIVE's."""
    total = dict(base)
    for name, value in live.items():
        total[name] = value if name in gauges else total.get(name, 0) + value
    return total


def underlay_mtu(dev: str) -> int:
    # Ask netlink, not /sys: sysfs shows the namespace it was mounted in (the
    # machine's), not the one this process entered.
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        return ipr.get_links(ifname=dev)[0].get_attr("IFLA_MTU")


class OverlayDaemon:
    def __init__(self, cluster: str, node: str, store):
        self.cluster, self.node, self.store = cluster, node, store
        self.node_dir = names.node_dir(cluster, node)
        self.peers: dict[ipaddress.IPv4Network, Lease] = {}
        self.peers_changes = 0                      # bumped by every change to self.peers
        self.synced_revision = 0                    # leases applied up to this revision (_synced)
        self.synced_changed = trio.Event()
        self.carried: dict[str, int] = {}          # counters of the daemons before us (see carried_counters)
        self.stats_wanted = trio.Event()            # a reader asked for a fresh record
        self.requested = 0                          # the revision of the last request seen

    def _local_config(self, config: dict) -> tuple[LocalConfig, ipaddress.IPv4Network | None, set]:
        """(this node's config, the subnet the topology requested for it, those
        requested for the other nodes)."""
        nodes = {n["metadata"]["name"]: n for n in registry.list_(self.store, "Node")}
        node = nodes.get(self.node)
        if node is None:
            raise RuntimeError(f"node {self.node} is not in the store")
        requested_by = {name: (n["metadata"].get("annotations") or {}).get(leases.REQUESTED_POD_CIDR)
                        for name, n in nodes.items()}
        requested = requested_by.pop(self.node)
        others = set()
        for cidr in filter(None, requested_by.values()):
            with contextlib.suppress(ValueError):
                others.add(ipaddress.IPv4Network(cidr))
        address = next(a["address"] for a in node["status"]["addresses"] if a["type"] == "InternalIP")
        local = LocalConfig(node=self.node, network=ipaddress.IPv4Network(config["Network"]),
                            public_ip=ipaddress.IPv4Address(address), underlay_dev=names.NODE_UPLINK,
                            underlay_mtu=underlay_mtu(names.NODE_UPLINK),
                            backend_conf=dict(config.get("Backend") or {}), state_dir=self.node_dir)
        return local, ipaddress.IPv4Network(requested) if requested else None, others

    async def run(self) -> None:
        kv = self.store.get(leases.CONFIG_KEY)
        if kv is None:
            raise RuntimeError(f"no network config at {leases.CONFIG_KEY}")
        config = kv.value
        local, requested, reserved = self._local_config(config)
        backend = backends.load(config["Backend"]["Type"], local)
        self.carried = carried_counters(read_stats(self.node_dir), backend.name, backend.gauges)
        previous_env = subnetenv.read(self.node_dir)
        previous = previous_env.subnet.network if previous_env else None
        lease = leases.acquire(self.store, config, local.public_ip, self.node, backend.name,
                               backend.backend_data(), previous=previous, requested=requested,
                               reserved=reserved)
        log.info("leased %s (backend %s)", lease.subnet, backend.name)
        self.backend, self.lease = backend, lease
        try:
            backend.setup(lease)
            subnetenv.write(self.node_dir, subnetenv.SubnetEnv.for_lease(local.network, lease.subnet,
                                                                         backend.mtu()))
            self._annotate_node(local)
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._follow_peers)
                nursery.start_soon(self._publish_synced)
                nursery.start_soon(self._renew)
                nursery.start_soon(self._follow_requests)
                nursery.start_soon(self._publish_stats)
                await backend.run()
        finally:
            # Release what the backend holds (udp: the TUN fd and socket, so the
            # namespace can go; vxlan: flannel.1). After a kill -9 nothing runs
            # here, and the restarted daemon takes over what is left.
            backend.teardown()

    async def _follow_peers(self) -> None:
        since = self.store.revision()
        self._resync(leases.read_leases(self.store))
        self._synced(since)
        async for ev in self.store.watch(leases.SUBNETS, since):
            try:
                lease = Lease.from_json(ev.key[len(leases.SUBNETS):], ev.value)
            except (KeyError, ValueError):
                log.warning("ignoring malformed lease %s", ev.key)
                lease = None
            if lease is not None and lease.subnet != self.lease.subnet:
                if ev.type == "PUT":
                    self._add(lease)
                else:
                    self._remove(lease)
            self._synced(ev.revision)

    def _synced(self, revision: int) -> None:
        """Peers are in place up to REVISION of the leases: made so (the
        backend's flush_peers) and said by _publish_synced, once per batch of
        the watch's events (a file write per event cost more than the rest of
        bring-up's peer handling)."""
        self.synced_revision = revision
        self.synced_changed.set()

    async def _publish_synced(self) -> None:
        written = None
        while True:
            await self.synced_changed.wait()
            self.synced_changed = trio.Event()
            self.backend.flush_peers()          # before saying the peers are in place
            if self.synced_revision != written:
                written = self.synced_revision
                synced.mark(self.cluster, self.node, "overlay", {leases.SUBNETS: written})

    def _resync(self, all_leases: list[Lease]) -> None:
        current = {l.subnet: l for l in all_leases if l.subnet != self.lease.subnet}
        for subnet, lease in list(self.peers.items()):
            if subnet not in current:
                self._remove(lease)
        for lease in current.values():
            self._add(lease)
        self.backend.peers_synced()

    def _add(self, lease: Lease) -> None:
        old = self.peers.get(lease.subnet)
        if old is not None and old.public_ip == lease.public_ip and old.backend_data == lease.backend_data:
            return
        if old is not None:
            self.backend.remove_peer(old)
        log.info("peer %s at %s (%s)", lease.subnet, lease.public_ip, lease.node)
        self.backend.add_peer(lease)
        self.peers[lease.subnet] = lease
        self.peers_changes += 1

    def _remove(self, lease: Lease) -> None:
        old = self.peers.pop(lease.subnet, None)
        if old is not None:
            self.peers_changes += 1
            log.info("peer %s gone", lease.subnet)
            self.backend.remove_peer(old)

    async def _renew(self) -> None:
        while True:
            await trio.sleep(leases.LEASE_TTL - leases.RENEW_MARGIN)
            leases.renew(self.store, self.lease)

    def _annotate_node(self, local: LocalConfig) -> None:
        """flannel's annotations on our Node (stats.node_annotations), written
        only if they differ from what is there."""
        want = stats.node_annotations(self.backend.name, self.lease.backend_data, str(local.public_ip),
                                      self.backend.data_path())

        def change(node: dict) -> None:
            node["metadata"].setdefault("annotations", {}).update(want)
        node = registry.get(self.store, "Node", None, self.node) or {"metadata": {}}
        have = node["metadata"].get("annotations") or {}
        if any(have.get(k) != v for k, v in want.items()):
            registry.mutate(self.store, "Node", None, self.node, change)

    async def _follow_requests(self) -> None:
        """Readers ask for a fresh record by writing our request key (stats.collect)."""
        async for ev in self.store.watch(stats.request_key(self.node), self.store.revision()):
            if ev.type == "PUT":
                self.requested = max(self.requested, ev.revision)
                self.stats_wanted.set()

    async def _publish_stats(self) -> None:
        """Every STATS_PERIOD, the node's own file (the next daemon's carried
        counters) when its figures changed; the store's record when it
        changed, at most every stats.PUBLISH_PERIOD, and at once when asked.
        While nothing changes, the period doubles up to STATS_IDLE_PERIOD: an
        idle agent paid about 0.4 ms of CPU per wake-up at 100 nodes, and a
        reader who asks (stats.collect) is answered at once anyway."""
        path = stats_path(self.node_dir)
        last: dict | None = None
        last_at, answered = 0.0, 0
        written: dict | None = None         # what the file holds
        peers, peers_at = {}, -1            # self.peers formatted, as of peers_changes
        period = STATS_PERIOD
        while True:
            if peers_at != self.peers_changes:
                peers_at = self.peers_changes
                peers = {str(s): str(l.public_ip) for s, l in sorted(self.peers.items())}
            data = {"node": self.node, "backend": self.backend.name, "data_path": self.backend.data_path(),
                    "subnet": str(self.lease.subnet), "peers": peers,
                    "counters": add_counters(self.carried, dict(self.backend.counters), self.backend.gauges),
                    "pid": os.getpid(), "workers": self.backend.worker_pids()}
            # The file only when its figures changed: at idle nothing is
            # formatted or written (an idle 100-node cluster rewrote 100 files
            # of 99 peers each, every second).
            changed = data != written
            if changed:
                tmp = path + ".tmp"
                with open(tmp, "w") as f:
                    json.dump(data, f)
                os.replace(tmp, path)
                written = data
            requested = self.requested
            now = time.monotonic()
            if stats.worth_publishing(data, last, last_at, now, requested > answered):
                try:
                    self.store.put(stats.stats_key(self.node), dict(data, answers=requested))
                    last, last_at, answered = data, now, requested
                except Exception:
                    log.exception("publishing the counters failed")
            period = STATS_PERIOD if changed or data != last else min(period * 2, STATS_IDLE_PERIOD)
            with trio.move_on_after(period):
                await self.stats_wanted.wait()
            self.stats_wanted = trio.Event()


def main(argv: list[str] | None = None) -> int:
    return run_node_daemon("overlay", OverlayDaemon, argv)


if __name__ == "__main__":
    sys.exit(main())
