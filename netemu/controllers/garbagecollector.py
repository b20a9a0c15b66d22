"""The garbage collector: deletes pods and ReplicaSets whose controlling owner is gone,
and node Leases whose Node is gone.

api.delete removes a workload's pods right after the workload, but a controller
pass that read the workload just before it was deleted may still create a pod
afterwards. Kubernetes' garbage collector catches exactly this by following
ownerReferences; this one does the same for the kinds netemu's controllers own:
an object whose controller ownerReference names a uid that no longer exists
(the owner was deleted, or deleted and recreated under the same name) is deleted.

Kubernetes' collector learns of every dependent from informers; this one does
not watch pods (a pass lists them all: ~50 ms of CPU at 1,000 pods, so a pass
every 5 s was most of an idle 100-node control plane's CPU). A pass runs on
every change of an owner kind or a Node; the dependent a racing controller
makes after its owner went is what a watch of owners cannot see, so for
FOLLOW_WINDOW seconds after a pass finds an owner (or Node) gone, passes
follow every FOLLOW_UP seconds; otherwise the loop resyncs at the controllers'
IDLE_RESYNC.
"""

from __future__ import annotations

import time

from netemu.controllers import actions as act
from netemu.controllers import podutil
from netemu.controllers.loop import IDLE_RESYNC, min_delay, run_reconciler
from netemu.k8s import kinds, ownership
from netemu.store import registry
from netemu.store.base import Store

SOURCE = "garbage-collector"


def orphans(dependents: list[dict], owners: list[dict]) -> list[dict]:
    """DEPENDENTS whose controller owner is not among OWNERS (by uid)."""
    alive = {o["metadata"].get("uid") for o in owners}
    out = []
    for obj in dependents:
        ref = ownership.controller_ref(obj)
        if ref is not None and ref.get("kind") in kinds.WORKLOADS and ref.get("uid") not in alive:
            out.append(obj)
    return out


def plan(pods: list[dict], replicasets: list[dict], owners: list[dict]) -> list:
    actions: list = []
    for rs in orphans(replicasets, owners):
        meta = rs["metadata"]
        actions.append(act.DeleteObject("ReplicaSet", meta.get("namespace", "default"), meta["name"]))
    # A pod whose ReplicaSet is deleted in this same pass goes on the next one.
    for pod in orphans(pods, owners + replicasets):
        if not podutil.terminating(pod):
            actions.append(act.DeletePod(pod))
    return actions


def orphan_leases(leases: list[dict], nodes: list[dict]) -> list[dict]:
    """Node heartbeat Leases whose Node (by ownerReference uid) is gone."""
    alive = {n["metadata"].get("uid") for n in nodes}
    return [lease for lease in leases
            if any(r.get("kind") == "Node" and r.get("uid") not in alive
                   for r in lease["metadata"].get("ownerReferences") or [])]


class Owners:
    """The owners' and Nodes' uids a pass saw, and when one was last gone:
    how soon the next pass should look (see the module's text)."""

    def __init__(self) -> None:
        self.uids: set | None = None
        self.gone_at = float("-inf")

    def follow_up(self, objects: list[dict], now: float) -> float | None:
        uids = {o["metadata"].get("uid") for o in objects}
        if self.uids is not None and self.uids - uids:
            self.gone_at = now
        self.uids = uids
        return FOLLOW_UP if now - self.gone_at < FOLLOW_WINDOW else None


def sync_once(store: Store, owners_seen: Owners | None = None) -> float | None:
    # Dependents first, owners second: an owner created after the first read
    # cannot have dependents in it, so no live owner looks missing.
    leases = registry.list_(store, "Lease", "kube-node-lease")
    nodes = registry.list_(store, "Node")
    act.apply(store, [act.DeleteObject("Lease", lease["metadata"]["namespace"], lease["metadata"]["name"])
                      for lease in orphan_leases(leases, nodes)], SOURCE)
    pods = registry.list_(store, "Pod")
    replicasets = registry.list_(store, "ReplicaSet")
    owners = [o for kind in kinds.WORKLOADS if kind != "ReplicaSet" for o in registry.list_(store, kind)]
    owners += registry.list_(store, "ReplicaSet")
    act.apply(store, plan(pods, replicasets, owners), SOURCE)
    # Owners deleted in the foreground go once their dependents have; pods
    # leaving do not wake this loop, so it looks again soon while any waits.
    from netemu import api
    waiting = [o for o in owners if api.FOREGROUND in (o["metadata"].get("finalizers") or [])]
    pending = False
    for owner in waiting:
        if not api.finish_foreground(store, owner, pods, replicasets):
            # A dependent made just before the owner was marked is deleted too.
            api.delete_dependents(store, owner, foreground=True)
            pending = True
    follow = owners_seen.follow_up(owners + nodes, time.monotonic()) if owners_seen is not None else None
    return min_delay(FOREGROUND_POLL if pending else None, follow)


# Seconds between looks at an owner waiting for its dependents to go.
FOREGROUND_POLL = 0.2
FOLLOW_UP = 5.0              # seconds between passes while an owner went lately
FOLLOW_WINDOW = 30.0         # ... for this long after a pass found one gone


async def run(store: Store, settings=None) -> None:
    seen = Owners()
    await run_reconciler(store, "garbage-collector",
                         [registry.prefix(k) for k in ("ReplicationController", "ReplicaSet", "Deployment",
                                                       "Job", "DaemonSet", "Node")],
                         lambda: sync_once(store, seen), resync=FOLLOW_UP, idle_resync=IDLE_RESYNC)
