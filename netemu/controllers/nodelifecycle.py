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

What Kubernetes does next, done here too:
  - the node gets the taints node.kubernetes.io/unreachable:NoSchedule and
    :NoExecute (timeAdded), removed again once its kubelet has set Ready=True;
  - its pods' Ready condition becomes False (MarkPodsNotReady, event
    NodeNotReady on each), so Endpoints move them to notReadyAddresses and
    the proxies stop sending them traffic;
  - taint eviction (the NoExecuteTaintManager, kube-controller-manager's
    taint-eviction-controller): a pod on a node with a NoExecute taint it does
    not tolerate is deleted at once; one it tolerates for tolerationSeconds
    (the API server gives every pod 300 s for not-ready and unreachable,
    api.DEFAULT_TOLERATIONS) is deleted that long after the taint's timeAdded,
    scaled by timeScale; one tolerated without tolerationSeconds (DaemonSet
    pods) stays. Deleted as the API deletes: the pod is marked terminating
    (its kubelet, gone, cannot finish it), its controller makes a replacement
    on a node that is Ready, and the kubelet ends it when it comes back.
"""

from __future__ import annotations

import dataclasses
import logging
import time

from netemu import api
from netemu.controllers import podutil
from netemu.controllers.loop import run_reconciler
from netemu.node import lease as leases
from netemu.store import registry
from netemu.store.base import Store

log = logging.getLogger(__name__)

MONITOR_PERIOD = 5.0        # nodeMonitorPeriod
REASON = "NodeStatusUnknown"
MESSAGE = "Kubelet stopped posting node status."
UNREACHABLE = "node.kubernetes.io/unreachable"


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


def _taints(node: dict) -> list[dict]:
    return list((node.get("spec") or {}).get("taints") or [])


def add_unreachable_taints(node: dict, stamp: str) -> None:
    """Give NODE (in place) the taints the node lifecycle controller puts on a
    node whose Ready condition is Unknown: unreachable:NoSchedule, and
    unreachable:NoExecute with its timeAdded."""
    taints = _taints(node)
    have = {(t.get("key"), t.get("effect")) for t in taints}
    if (UNREACHABLE, "NoSchedule") not in have:
        taints.append({"key": UNREACHABLE, "effect": "NoSchedule"})
    if (UNREACHABLE, "NoExecute") not in have:
        taints.append({"key": UNREACHABLE, "effect": "NoExecute", "timeAdded": stamp})
    node.setdefault("spec", {})["taints"] = taints


def remove_unreachable_taints(node: dict) -> None:
    taints = [t for t in _taints(node) if t.get("key") != UNREACHABLE]
    spec = node.setdefault("spec", {})
    if taints:
        spec["taints"] = taints
    else:
        spec.pop("taints", None)


def recovered(nodes: list[dict]) -> list[str]:
    """Nodes whose kubelet set Ready=True again but which still carry the
    unreachable taints (pure)."""
    return [n["metadata"]["name"] for n in nodes
            if (_ready(n) or {}).get("status") == "True"
            and any(t.get("key") == UNREACHABLE for t in _taints(n))]


def mark_pod_not_ready(pod: dict, stamp: str) -> bool:
    """Set POD's Ready condition False (in place), as MarkPodsNotReady does;
    False if it was not True (nothing to change)."""
    conds = (pod.get("status") or {}).get("conditions") or []
    changed = False
    for cond in conds:
        if cond.get("type") == "Ready" and cond.get("status") != "False":
            cond["status"] = "False"
            cond["lastTransitionTime"] = stamp
            changed = True
    return changed


def tolerates(toleration: dict, taint: dict) -> bool:
    """Kubernetes' Toleration.ToleratesTaint: effects match (an empty one
    matches all), keys match (an empty key with Exists matches every taint),
    and Exists, or Equal with the same value."""
    effect = toleration.get("effect") or ""
    if effect and effect != taint.get("effect"):
        return False
    key = toleration.get("key") or ""
    operator = toleration.get("operator") or "Equal"
    if key and key != taint.get("key"):
        return False
    if operator == "Exists":
        return True
    return bool(key) and (toleration.get("value") or "") == (taint.get("value") or "")


def eviction_delay(pod: dict, taints: list[dict]) -> float | None:
    """Seconds after the taints were added that POD is to be evicted from a node
    with these NoExecute TAINTS: 0 when one is not tolerated, else the smallest
    tolerationSeconds among the tolerations that matched (getMinTolerationTime);
    None when every match tolerates for ever (pure)."""
    tolerations = (pod.get("spec") or {}).get("tolerations") or []
    used = []
    for taint in taints:
        matching = [t for t in tolerations if tolerates(t, taint)]
        if not matching:
            return 0.0
        used += matching
    seconds = [t["tolerationSeconds"] for t in used if t.get("tolerationSeconds") is not None]
    if not seconds:
        return None
    return max(0.0, float(min(seconds)))


def evictions(nodes: list[dict], pods: list[dict], now: float, scale: float = 1.0
              ) -> tuple[list[dict], float | None]:
    """(pods to evict now, seconds until the next one is due, or None) for the
    pods bound to nodes with NoExecute taints; a taint's timeAdded (wall clock)
    starts its tolerationSeconds, scaled by SCALE (pure)."""
    tainted = {}
    for node in nodes:
        execute = [t for t in _taints(node) if t.get("effect") == "NoExecute"]
        if execute:
            tainted[node["metadata"]["name"]] = execute
    due_now, next_in = [], None
    for pod in pods:
        taints = tainted.get((pod.get("spec") or {}).get("nodeName"))
        if not taints or podutil.terminating(pod) or podutil.finished(pod):
            continue
        delay = eviction_delay(pod, taints)
        if delay is None:
            continue
        added = [registry.parse_time(t.get("timeAdded")) for t in taints]
        start = max((a.timestamp() for a in added if a is not None), default=now)
        wait = start + delay * scale - now
        if wait <= 0:
            due_now.append(pod)
        elif next_in is None or wait < next_in:
            next_in = wait
    return due_now, next_in


async def run(store: Store, settings=None) -> None:
    period, grace = periods(settings)
    scale = float(getattr(settings, "time_scale", 1.0) or 1.0)
    probes: dict[str, Probe] = {}

    def sync() -> float:
        now = time.monotonic()
        nodes = registry.list_(store, "Node")
        observe(probes, nodes, registry.list_(store, "Lease", leases.NAMESPACE), now)
        lost = stale(probes, nodes, now, grace)
        for name in lost:
            log.warning("node %s: no lease renewal for %.0f s; Ready=Unknown", name, now - probes[name].seen_at)

            def change(n: dict) -> None:
                stamp = registry.now()
                mark_unknown(n, stamp)
                add_unreachable_taints(n, stamp)
            node = registry.mutate(store, "Node", None, name, change)
            if node is not None:
                registry.record_event(store, node, "NodeNotReady",
                                      f"Node {name} status is now: NodeNotReady",
                                      source="node-controller")
        for name in recovered(nodes):
            log.info("node %s: Ready again; unreachable taints removed", name)
            registry.mutate(store, "Node", None, name, remove_unreachable_taints)
        if lost or any(_taints(n) for n in nodes):
            nodes = registry.list_(store, "Node")
            pods = registry.list_(store, "Pod")
            for pod in pods:
                if pod.get("spec", {}).get("nodeName") in lost:
                    meta = pod["metadata"]
                    changed = registry.mutate(store, "Pod", meta.get("namespace"), meta["name"],
                                              lambda p: mark_pod_not_ready(p, registry.now()))
                    if changed is not None:
                        registry.record_event(store, changed, "NodeNotReady", "Node is not ready",
                                              type_="Warning", source="node-controller")
            due, next_in = evictions(nodes, pods, time.time(), scale)
            for pod in due:
                meta = pod["metadata"]
                ns = meta.get("namespace", "default")
                log.warning("pod %s/%s: evicted from node %s (NoExecute taint)", ns, meta["name"],
                            pod["spec"]["nodeName"])
                if api.delete_pod(store, ns, meta["name"], uid=meta.get("uid")):
                    registry.record_event(store, pod, "TaintManagerEviction",
                                          f"Marking for deletion Pod {ns}/{meta['name']}",
                                          source="taint-eviction-controller")
            if next_in is not None:
                return min(period, max(next_in, 0.1))
        return period

    # Woken by lease renewals too, but a pass is cheap (two list reads).
    await run_reconciler(store, "node-lifecycle", [registry.prefix("Node")], sync, resync=period)
