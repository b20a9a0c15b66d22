"""The node lifecycle controller: a node whose kubelet stopped renewing its lease
becomes Ready=Unknown.

As kube-controller-manager's node lifecycle controller does (every
nodeMonitorPeriod, 5 s): for each node it remembers the lease's last renewTime
and, by its own clock, when it saw that value change (its "probe timestamp";
the node's creation counts as the first). A node whose probe timestamp is older
than the node monitor grace period (40 s) gets its Ready condition set to
Unknown, reason NodeStatusUnknown, message "Kubelet stopped posting node
status." Its own clock, not the renewTime itself: a controller that restarts, or
a clock that differs from the kubelet's, never makes a live node look dead; a
restarted controller gives every node a full grace period. The kubelet sets
Ready again when it renews (node/lease.py).

The periods follow the topology's timeScale (with node/lease.py's floor).
Kubernetes also taints such a node and marks its pods not ready; netemu's
scheduler already skips nodes that are not Ready, and pod status stays the
kubelet's to write.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from netemu.controllers.loop import run_reconciler
from netemu.node import lease as leases
from netemu.store import registry
from netemu.store.base import Store

log = logging.getLogger(__name__)

MONITOR_PERIOD = 5.0        # nodeMonitorPeriod
REASON = "NodeStatusUnknown"
MESSAGE = "Kubelet stopped posting node status."


@dataclasses.dataclass
class Probe:
    renew_time: str | None      # the lease's renewTime last seen (None: no lease yet)
    seen_at: float              # our clock when it was first seen with that value


def observe(probes: dict[str, Probe], nodes: list[dict], lease_list: list[dict], now: float) -> None:
    """Update PROBES (node name -> Probe) from the current nodes and leases (pure)."""
    renewals = {l["metadata"]["name"]: (l.get("spec") or {}).get("renewTime") for l in lease_list}
    names = set()
    for node in nodes:
        name = node["metadata"]["name"]
        names.add(name)
        renew = renewals.get(name)
        probe = probes.get(name)
        if probe is None or probe.renew_time != renew:
            probes[name] = Probe(renew, now)
    for gone in set(probes) - names:
        del probes[gone]


def _ready(node: dict) -> dict | None:
    return next((c for c in (node.get("status") or {}).get("conditions", []) if c.get("type") == "Ready"), None)


def stale(probes: dict[str, Probe], nodes: list[dict], now: float, grace: float) -> list[str]:
    """Nodes to mark Unknown: silent for longer than GRACE and not Unknown yet (pure)."""
    out = []
    for node in nodes:
        name = node["metadata"]["name"]
        probe = probes.get(name)
        cond = _ready(node)
        if probe is None or (cond is not None and cond.get("status") == "Unknown"):
            continue
        if now - probe.seen_at > grace:
            out.append(name)
    return out


def mark_unknown(node: dict, stamp: str) -> None:
    """Set NODE's Ready condition to Unknown (in place), keeping its last heartbeat."""
    status = node.setdefault("status", {})
    conds = [c for c in status.get("conditions", []) if c.get("type") != "Ready"]
    old = _ready(node) or {}
    conds.append({"type": "Ready", "status": "Unknown", "reason": REASON, "message": MESSAGE,
                  "lastHeartbeatTime": old.get("lastHeartbeatTime", old.get("lastTransitionTime")),
                  "lastTransitionTime": stamp})
    status["conditions"] = conds


def periods(settings) -> tuple[float, float]:
    """(monitor period, grace period) in seconds for SETTINGS' timeScale."""
    grace = leases.lease_duration(settings)          # nodeMonitorGracePeriod = 40 s
    return grace * MONITOR_PERIOD / leases.LEASE_DURATION, grace


async def run(store: Store, settings=None) -> None:
    period, grace = periods(settings)
    probes: dict[str, Probe] = {}

    def sync() -> float:
        now = time.monotonic()
        nodes = registry.list_(store, "Node")
        observe(probes, nodes, registry.list_(store, "Lease", leases.NAMESPACE), now)
        for name in stale(probes, nodes, now, grace):
            log.warning("node %s: no lease renewal for %.0f s; Ready=Unknown", name, now - probes[name].seen_at)
            node = registry.mutate(store, "Node", None, name, lambda n: mark_unknown(n, registry.now()))
            if node is not None:
                registry.record_event(store, node, "NodeNotReady",
                                      f"Node {name} status is now: NodeNotReady",
                                      source="node-controller")
        return period

    # Woken by lease renewals too, but a pass is cheap (two list reads).
    await run_reconciler(store, "node-lifecycle", [registry.prefix("Node")], sync, resync=period)
