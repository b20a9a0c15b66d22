"""Replica controllers: ReplicationController, ReplicaSet and Deployment.

ReplicationController and ReplicaSet (kube-controller-manager's replication and
replicaset controllers) keep `spec.replicas` live pods matching their selector:
  - a pod counts while it is neither terminating nor finished; a pod that died
    (Failed/Succeeded) or was deleted is replaced by a new one with a new name
    (`<owner>-<5 random chars>`). The dead pod is left in the store, as
    Kubernetes leaves it for the pod garbage collector; netemu has no pod GC
    threshold, so such pods stay until deleted;
  - an orphan pod matching the selector is adopted (gets the controller's
    ownerReference); an owned pod whose labels stop matching is released (loses
    it), so `kubectl label pod x app-` takes a pod out and a new one replaces it;
  - surplus pods are deleted in Kubernetes' order: unscheduled before scheduled,
    Pending before Running, not-ready before ready, more restarts first, newest first.

Deployment (the deployment controller) owns one ReplicaSet per pod template,
named `<deployment>-<10-char template hash>`, whose pods carry the
pod-template-hash label. On a template change it rolls: the new ReplicaSet grows
while the total stays within replicas + maxSurge, old ones shrink while at least
replicas − maxUnavailable pods stay available (strategy Recreate: old ones go to
0 first). Rollout history (revision annotations, rollback) is not emulated.

The reconcile functions are pure (objects in, actions out); `run` is the loop.
"""

from __future__ import annotations

import math

from netemu.controllers import actions as act
from netemu.controllers import podutil
from netemu.controllers.loop import IDLE_RESYNC, guarded, min_delay, run_reconciler
from netemu.k8s import ownership, selectors
from netemu.store import registry
from netemu.store.base import Store

SOURCES = {"ReplicationController": "replication-controller",
           "ReplicaSet": "replicaset-controller",
           "Deployment": "deployment-controller"}

HASH_LABEL = "pod-template-hash"


# -- ReplicationController and ReplicaSet -------------------------------------------

def deletion_rank(pod: dict) -> tuple:
    """Sort key: pods that sort first are deleted first (controller.ActivePods)."""
    phase_rank = {"Pending": 0, "Unknown": 1, "Running": 2}.get(podutil.phase(pod), 0)
    created = registry.parse_time(pod["metadata"].get("creationTimestamp"))
    stamp = created.timestamp() if created else 0.0
    return (1 if (pod.get("spec") or {}).get("nodeName") else 0, phase_rank,
            1 if podutil.ready(pod) else 0, -podutil.restart_count(pod), -stamp, pod["metadata"]["name"])


def _claim_pods(owner: dict, pods: list[dict]) -> tuple[list[dict], list]:
    """Pods OWNER controls after adoption and release, and the actions for them."""
    selector = selectors.workload_selector(owner)
    meta = owner["metadata"]
    ns, uid = meta.get("namespace", "default"), meta.get("uid")
    mine, actions = [], []
    for pod in pods:
        pmeta = pod["metadata"]
        if pmeta.get("namespace", "default") != ns:
            continue
        ref = ownership.controller_ref(pod)
        matching = selectors.matches(selector, pmeta.get("labels"))
        if ref is not None and ref.get("uid") == uid:
            if matching:
                mine.append(pod)
            elif not podutil.terminating(pod):
                actions.append(act.Mutate("Pod", ns, pmeta["name"], pmeta.get("uid"),
                                          _release(uid), why="release"))
        elif ref is None and matching and podutil.active(pod) and not meta.get("deletionTimestamp"):
            mine.append(pod)
            actions.append(act.Mutate("Pod", ns, pmeta["name"], pmeta.get("uid"),
                                      _adopt(owner), why="adopt"))
    return mine, actions


def _release(uid: str):
    def change(pod: dict) -> None:
        refs = [r for r in pod["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
        if refs:
            pod["metadata"]["ownerReferences"] = refs
        else:
            pod["metadata"].pop("ownerReferences", None)
    return change


def _adopt(owner: dict):
    ref = ownership.owner_reference(owner)

    def change(pod: dict) -> None:
        if ownership.controller_ref(pod) is not None:
            raise act.Gone()          # someone else adopted it first
        pod["metadata"].setdefault("ownerReferences", []).append(ref)
    return change


def _available(pod: dict, min_ready_seconds: int, now: float | None) -> bool:
    if not podutil.ready(pod):
        return False
    if not min_ready_seconds or now is None:
        return True
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            since = registry.parse_time(cond.get("lastTransitionTime"))
            return since is None or now - since.timestamp() >= min_ready_seconds
    return False


def _available_in(pod: dict, min_ready_seconds: int, now: float) -> float | None:
    """Seconds until a ready POD becomes available (ready for minReadySeconds),
    or None if it is not ready or already available."""
    if not min_ready_seconds or not podutil.ready(pod):
        return None
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            since = registry.parse_time(cond.get("lastTransitionTime"))
            left = None if since is None else since.timestamp() + min_ready_seconds - now
            return left if left is not None and left > 0 else None
    return None


def next_available(owner: dict, pods: list[dict], now: float) -> float | None:
    """Seconds until one of OWNER's ready pods becomes available: its
    availableReplicas changes then with no write to wake the controller."""
    min_ready = int((owner.get("spec") or {}).get("minReadySeconds") or 0)
    if not min_ready:
        return None
    mine, _ = _claim_pods(owner, pods)
    return min_delay(*(_available_in(p, min_ready, now) for p in mine if podutil.active(p)))


def reconcile_replicas(owner: dict, pods: list[dict], now: float | None = None) -> list:
    """Actions that bring OWNER (an RC or RS) to spec.replicas live pods, plus its
    new status. PODS: the pods of its namespace (any owner)."""
    spec = owner.get("spec") or {}
    want = int(spec.get("replicas", 1))
    template = spec.get("template") or {}
    mine, actions = _claim_pods(owner, pods)
    live = [p for p in mine if podutil.active(p)]
    if not owner["metadata"].get("deletionTimestamp"):
        # At most BURST_REPLICAS per pass, as manageReplicas caps its diff: the
        # next pass (woken by these pods' own writes) does the next batch.
        if len(live) < want:
            for _ in range(min(want - len(live), act.BURST_REPLICAS)):
                actions.append(act.CreatePod(podutil.pod_from_template(owner, template), owner))
        elif len(live) > want:
            for pod in sorted(live, key=deletion_rank)[:min(len(live) - want, act.BURST_REPLICAS)]:
                actions.append(act.DeletePod(pod, owner))
    template_labels = (template.get("metadata") or {}).get("labels") or {}
    min_ready = int(spec.get("minReadySeconds") or 0)
    status = {
        "replicas": len(live),
        "fullyLabeledReplicas": sum(1 for p in live if all(
            (p["metadata"].get("labels") or {}).get(k) == v for k, v in template_labels.items())),
        "readyReplicas": sum(1 for p in live if podutil.ready(p)),
        "availableReplicas": sum(1 for p in live if _available(p, min_ready, now)),
        "observedGeneration": int(owner["metadata"].get("generation") or 1),
    }
    return actions + act.set_status(owner, status)


# -- Deployment ------------------------------------------------------------------------

def _resolve(value, total: int, round_up: bool) -> int:
    """maxSurge / maxUnavailable: an int or a percentage of TOTAL."""
    if value is None:
        value = "25%"
    if isinstance(value, str) and value.endswith("%"):
        exact = total * int(value[:-1]) / 100
        return math.ceil(exact) if round_up else math.floor(exact)
    return int(value)


def new_replicaset(deploy: dict, rs_hash: str, replicas: int) -> dict:
    """The ReplicaSet a Deployment creates for its current template."""
    spec = deploy.get("spec") or {}
    template = dict(spec.get("template") or {})
    tmeta = dict(template.get("metadata") or {})
    tmeta["labels"] = {**(tmeta.get("labels") or {}), HASH_LABEL: rs_hash}
    template["metadata"] = tmeta
    selector = dict(spec.get("selector") or {})
    selector["matchLabels"] = {**(selector.get("matchLabels") or {}), HASH_LABEL: rs_hash}
    meta = deploy["metadata"]
    return {"apiVersion": "apps/v1", "kind": "ReplicaSet",
            "metadata": {"name": f"{meta['name']}-{rs_hash}", "namespace": meta.get("namespace", "default"),
                         "labels": dict(tmeta["labels"]), "ownerReferences": [ownership.owner_reference(deploy)]},
            "spec": {"replicas": replicas, "selector": selector, "template": template,
                     "minReadySeconds": int(spec.get("minReadySeconds") or 0)}}


def _scale_rs(deploy: dict, rs: dict, replicas: int) -> act.Mutate:
    old = int((rs.get("spec") or {}).get("replicas", 0))
    direction = "up" if replicas > old else "down"
    name = rs["metadata"]["name"]

    def change(obj: dict) -> None:
        obj["spec"]["replicas"] = replicas
        obj["metadata"]["generation"] = int(obj["metadata"].get("generation") or 1) + 1
    return act.Mutate("ReplicaSet", rs["metadata"].get("namespace", "default"), name, rs["metadata"].get("uid"),
                      change, why="scale",
                      event=act.RecordEvent(deploy, "ScalingReplicaSet",
                                            f"Scaled {direction} replica set {name} to {replicas} from {old}"))


def reconcile_deployment(deploy: dict, replicasets: list[dict]) -> list:
    """Actions that move DEPLOY's ReplicaSets towards its template and replicas,
    plus its new status. REPLICASETS: those of its namespace."""
    spec = deploy.get("spec") or {}
    meta = deploy["metadata"]
    want = int(spec.get("replicas", 1))
    rs_hash = podutil.template_hash(spec.get("template") or {},
                                    int((deploy.get("status") or {}).get("collisionCount") or 0))
    owned = [rs for rs in replicasets if ownership.owned_by(rs, deploy)]
    current = next((rs for rs in owned if rs["metadata"]["name"] == f"{meta['name']}-{rs_hash}"), None)
    old = [rs for rs in owned if rs is not current]
    actions: list = []
    strategy = spec.get("strategy") or {}
    old_total = sum(int(rs["spec"].get("replicas", 0)) for rs in old)
    old_alive = sum(int((rs.get("status") or {}).get("replicas", 0)) for rs in old)
    new_replicas = int(current["spec"].get("replicas", 0)) if current else 0
    paused = spec.get("paused") or meta.get("deletionTimestamp")

    if not paused:
        if strategy.get("type") == "Recreate":
            for rs in old:
                if int(rs["spec"].get("replicas", 0)) != 0:
                    actions.append(_scale_rs(deploy, rs, 0))
            target = want if old_total == 0 and old_alive == 0 else new_replicas
        else:
            rolling = strategy.get("rollingUpdate") or {}
            surge = _resolve(rolling.get("maxSurge"), want, round_up=True)
            unavailable = _resolve(rolling.get("maxUnavailable"), want, round_up=False)
            if surge == 0 and unavailable == 0:
                unavailable = 1
            if old_total == 0:
                target = want
            else:
                room = want + surge - old_total - new_replicas
                target = min(want, new_replicas + max(0, room))
                # Scale old ReplicaSets down while enough pods stay available.
                new_unavailable = target - int(((current or {}).get("status") or {}).get("availableReplicas", 0))
                can_remove = old_total + target - (want - unavailable) - max(0, new_unavailable)
                for rs in sorted(old, key=lambda r: r["metadata"].get("creationTimestamp", "")):
                    have = int(rs["spec"].get("replicas", 0))
                    if can_remove <= 0:
                        break
                    if have > 0:
                        cut = min(have, can_remove)
                        actions.append(_scale_rs(deploy, rs, have - cut))
                        can_remove -= cut
        if current is None:
            rs = new_replicaset(deploy, rs_hash, target)
            actions.insert(0, act.CreateObject(rs, deploy, "ScalingReplicaSet",
                                               f"Scaled up replica set {rs['metadata']['name']} to {target}"))
        elif target != new_replicas:
            actions.insert(0, _scale_rs(deploy, current, target))

    statuses = [rs.get("status") or {} for rs in owned]
    available = sum(int(s.get("availableReplicas", 0)) for s in statuses)
    status = {
        "observedGeneration": int(meta.get("generation") or 1),
        "replicas": sum(int(s.get("replicas", 0)) for s in statuses),
        "updatedReplicas": int(((current or {}).get("status") or {}).get("replicas", 0)),
        "readyReplicas": sum(int(s.get("readyReplicas", 0)) for s in statuses),
        "availableReplicas": available,
        "unavailableReplicas": max(0, want - available),
    }
    if (deploy.get("status") or {}).get("collisionCount"):
        status["collisionCount"] = deploy["status"]["collisionCount"]
    old_cond = next((c for c in (deploy.get("status") or {}).get("conditions") or []
                     if c.get("type") == "Available"), None)
    unavailable_ok = _resolve(((spec.get("strategy") or {}).get("rollingUpdate") or {}).get("maxUnavailable"),
                              want, round_up=False)
    ok = "True" if available >= want - unavailable_ok else "False"
    cond = {"type": "Available", "status": ok,
            "reason": "MinimumReplicasAvailable" if ok == "True" else "MinimumReplicasUnavailable",
            "message": ("Deployment has minimum availability." if ok == "True"
                        else "Deployment does not have minimum availability.")}
    cond["lastTransitionTime"] = (old_cond.get("lastTransitionTime") if old_cond and old_cond.get("status") == ok
                                  else registry.now())
    status["conditions"] = [cond]
    return actions + act.set_status(deploy, status)


# -- loop --------------------------------------------------------------------------------

def sync_once(store: Store) -> float | None:
    # Pods first: a workload created after this read has no pods in it yet, never
    # the other way round (which would look like missing pods).
    import time

    if not any(registry.names_(store, kind) for kind in ("Deployment", "ReplicaSet", "ReplicationController")):
        return None                     # nothing to control: no pod decoded (see loop.py)
    pods = registry.list_(store, "Pod")
    by_ns: dict[str, list[dict]] = {}
    for pod in pods:
        by_ns.setdefault(pod["metadata"].get("namespace", "default"), []).append(pod)
    replicasets = registry.list_(store, "ReplicaSet")
    for deploy in registry.list_(store, "Deployment"):
        ns = deploy["metadata"].get("namespace", "default")
        same_ns = [rs for rs in replicasets if rs["metadata"].get("namespace", "default") == ns]
        guarded("deployment " + deploy["metadata"]["name"],
                lambda: act.apply(store, reconcile_deployment(deploy, same_ns), SOURCES["Deployment"]))()
    now = time.time()
    wake = None
    for kind in ("ReplicationController", "ReplicaSet"):
        owners = replicasets if kind == "ReplicaSet" else registry.list_(store, kind)
        for owner in owners:
            ns = owner["metadata"].get("namespace", "default")

            def step(owner=owner, pods=by_ns.get(ns, []), kind=kind) -> float | None:
                act.apply(store, reconcile_replicas(owner, pods, now), SOURCES[kind])
                return next_available(owner, pods, now)
            wake = min_delay(wake, guarded(f"{kind} {owner['metadata']['name']}", step)())
    # A wake-up just after the next pod's minReadySeconds run out.
    return None if wake is None else wake + 0.01


async def run(store: Store, settings=None) -> None:
    await run_reconciler(store, "replication",
                         [registry.prefix(k) for k in ("Pod", "ReplicationController", "ReplicaSet", "Deployment")],
                         lambda: sync_once(store), idle_resync=IDLE_RESYNC)
