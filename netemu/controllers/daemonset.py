"""The DaemonSet controller: one pod on every eligible node.

A node is eligible when it matches the pod template's nodeSelector and required
node affinity. Like Kubernetes, a cordoned node (spec.unschedulable) stays
eligible: DaemonSet pods tolerate the node.kubernetes.io/unschedulable taint, so
the tutorial's master marked unschedulable still runs the daemon unless the
nodeSelector excludes it. Readiness is not a condition either (DaemonSet pods
tolerate not-ready nodes; the pod simply starts when the node's kubelet does).

The controller binds its pods itself (spec.nodeName), as Kubernetes did before
1.12 moved DaemonSet pods to the scheduler through node affinity; the scheduler
therefore never sees them, and hostPort conflicts are not checked for them.

Per node: no live pod -> create one; more than one -> delete the extras; a pod
that died (Failed/Succeeded) is deleted and replaced; a node that stops matching
(or is deleted) loses its pod. Template changes roll out one node at a time
(RollingUpdate with maxUnavailable 1; OnDelete waits for the user), tracked by
the controller-revision-hash label.
"""

from __future__ import annotations

from netemu.controllers import actions as act
from netemu.controllers import podutil
from netemu.controllers.loop import IDLE_RESYNC, guarded, run_reconciler
from netemu.k8s import ownership, selectors
from netemu.store import registry
from netemu.store.base import Store

SOURCE = "daemonset-controller"
REVISION_LABEL = "controller-revision-hash"


def eligible(ds: dict, node: dict) -> bool:
    # A node being deleted (`netemu node remove` marks it once drained) gets no
    # daemon pod: otherwise the drain's deletions would be undone at once.
    if (node.get("metadata") or {}).get("deletionTimestamp"):
        return False
    template_spec = ((ds.get("spec") or {}).get("template") or {}).get("spec") or {}
    return selectors.node_matches_pod(template_spec, node)


# The tolerations the DaemonSet controller gives its pods
# (AddOrUpdateDaemonPodTolerations): no NoExecute taint of a lost or not-ready
# node evicts them, and no condition taint keeps them off a node.
DAEMON_TOLERATIONS = (
    {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute"},
    {"key": "node.kubernetes.io/disk-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/memory-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/pid-pressure", "operator": "Exists", "effect": "NoSchedule"},
    {"key": "node.kubernetes.io/unschedulable", "operator": "Exists", "effect": "NoSchedule"},
)
HOST_NETWORK_TOLERATION = {"key": "node.kubernetes.io/network-unavailable", "operator": "Exists",
                           "effect": "NoSchedule"}


def add_daemon_tolerations(spec: dict) -> None:
    """Add DAEMON_TOLERATIONS (and, for a hostNetwork pod, network-unavailable)
    to a pod SPEC in place, each replacing a toleration of the same key and
    effect the template had (AddOrUpdateTolerationInPodSpec)."""
    wanted = list(DAEMON_TOLERATIONS) + ([HOST_NETWORK_TOLERATION] if spec.get("hostNetwork") else [])
    tolerations = list(spec.get("tolerations") or [])
    for t in wanted:
        tolerations = [x for x in tolerations
                       if not (x.get("key") == t["key"] and (x.get("effect") or "") == t["effect"])]
        tolerations.append(dict(t))
    spec["tolerations"] = tolerations


def reconcile_daemonset(ds: dict, nodes: list[dict], pods: list[dict]) -> list:
    """Actions that give each eligible node exactly one live, current pod of DS,
    plus its new status. PODS: the pods of its namespace."""
    spec = ds.get("spec") or {}
    template = spec.get("template") or {}
    revision = podutil.template_hash(template)
    node_names = {n["metadata"]["name"] for n in nodes}
    wanted = sorted(n["metadata"]["name"] for n in nodes if eligible(ds, n))
    wanted_set = set(wanted)
    per_node: dict[str, list[dict]] = {}
    for pod in pods:
        if ownership.owned_by(pod, ds) and not podutil.terminating(pod):
            per_node.setdefault((pod.get("spec") or {}).get("nodeName") or "", []).append(pod)

    actions: list = []
    deleting = bool(ds["metadata"].get("deletionTimestamp"))
    misscheduled = 0
    for node, node_pods in per_node.items():
        if node not in wanted_set:
            misscheduled += sum(1 for p in node_pods if podutil.active(p)) if node in node_names else 0
            actions += [act.DeletePod(p, ds) for p in node_pods]

    current = ready = updated = 0
    unavailable_now = 0
    creating = 0
    stale: list[dict] = []
    for node in wanted:
        node_pods = per_node.get(node, [])
        live = [p for p in node_pods if podutil.active(p)]
        dead = [p for p in node_pods if podutil.finished(p)]
        actions += [act.DeletePod(p, ds) for p in dead]
        if live:
            current += 1
            keep = sorted(live, key=lambda p: p["metadata"].get("creationTimestamp", ""))[0]
            actions += [act.DeletePod(p, ds) for p in live if p is not keep]
            if podutil.ready(keep):
                ready += 1
            else:
                unavailable_now += 1
            if (keep["metadata"].get("labels") or {}).get(REVISION_LABEL) == revision:
                updated += 1
            else:
                stale.append(keep)
        else:
            unavailable_now += 1
            # At most BURST_REPLICAS new pods per pass, as for the other controllers.
            if not deleting and creating < act.BURST_REPLICAS:
                creating += 1
                pod = podutil.pod_from_template(ds, template, extra_labels={REVISION_LABEL: revision},
                                                node_name=node)
                add_daemon_tolerations(pod["spec"])
                actions.append(act.CreatePod(pod, ds))

    # Rolling update: replace an out-of-date pod only while no node is without a
    # ready daemon (maxUnavailable 1).
    strategy = (spec.get("updateStrategy") or {}).get("type", "RollingUpdate")
    if strategy == "RollingUpdate" and stale and unavailable_now == 0 and not deleting:
        actions.append(act.DeletePod(stale[0], ds))

    status = {
        "desiredNumberScheduled": len(wanted),
        "currentNumberScheduled": current,
        "numberMisscheduled": misscheduled,
        "numberReady": ready,
        "updatedNumberScheduled": updated,
        "numberAvailable": ready,
        "observedGeneration": int(ds["metadata"].get("generation") or 1),
    }
    if len(wanted) - ready:
        status["numberUnavailable"] = len(wanted) - ready
    return actions + act.set_status(ds, status)


def sync_once(store: Store) -> None:
    if not registry.names_(store, "DaemonSet"):
        return                          # nothing to control: no pod decoded (see loop.py)
    pods = registry.list_(store, "Pod")
    nodes = registry.list_(store, "Node")
    for ds in registry.list_(store, "DaemonSet"):
        ns = ds["metadata"].get("namespace", "default")
        same_ns = [p for p in pods if p["metadata"].get("namespace", "default") == ns]
        guarded("daemonset " + ds["metadata"]["name"],
                lambda: act.apply(store, reconcile_daemonset(ds, nodes, same_ns), SOURCE))()


async def run(store: Store, settings=None) -> None:
    await run_reconciler(store, "daemonset",
                         [registry.prefix(k) for k in ("Pod", "Node", "DaemonSet")],
                         lambda: sync_once(store), idle_resync=IDLE_RESYNC)
