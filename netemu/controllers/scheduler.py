"""The scheduler: binds each pod that has no node to one that can run it.

As kube-scheduler does, in two steps. Filter: a node is feasible when it is Ready,
not cordoned (spec.unschedulable), matches the pod's nodeSelector and required
node affinity, and has the pod's hostPorts free. Score: among feasible nodes,
prefer the one running the fewest pods of the same owner (kube-scheduler's
SelectorSpread), then the fewest pods overall (a stand-in for
NodeResourcesBalancedAllocation, since netemu has no resource requests), then
the name, so a decision is reproducible.

A pod that fits nowhere stays Pending with condition PodScheduled=False, reason
Unschedulable, and a FailedScheduling event whose message counts the reasons the
way kube-scheduler's does:
  0/3 nodes are available: 1 node(s) were unschedulable, 2 node(s) didn't match
  Pod's node affinity/selector.

DaemonSet pods arrive already bound (the DaemonSet controller sets
spec.nodeName, as Kubernetes did before 1.12), so they never come here.
"""

from __future__ import annotations

import dataclasses
from collections import Counter

from netemu.controllers import actions as act
from netemu.controllers import podutil
from netemu.controllers.loop import IDLE_RESYNC, run_reconciler
from netemu.k8s import ownership, selectors
from netemu.store import registry
from netemu.store.base import Conflict, Store

SOURCE = "default-scheduler"

# kube-scheduler's filter failure reasons, word for word.
NOT_READY = "node(s) had untolerated taint {node.kubernetes.io/not-ready: }"
UNSCHEDULABLE = "node(s) were unschedulable"
SELECTOR = "node(s) didn't match Pod's node affinity/selector"
PORTS = "node(s) didn't have free ports for the requested pod ports"


@dataclasses.dataclass
class Binding:
    pod: dict
    node: str


@dataclasses.dataclass
class Unschedulable:
    pod: dict
    message: str


def host_ports(pod_spec: dict) -> set[tuple[str, str, int]]:
    """(hostIP, protocol, hostPort) triples the pod claims on its node."""
    out = set()
    for c in pod_spec.get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("hostPort"):
                out.add((p.get("hostIP") or "0.0.0.0", p.get("protocol") or "TCP", int(p["hostPort"])))
    return out


def _ports_conflict(wanted: set, used: set) -> bool:
    # Same port and protocol clash when the addresses are equal or either is the
    # wildcard (kube-scheduler's NodePorts filter).
    for ip, proto, port in wanted:
        for uip, uproto, uport in used:
            if port == uport and proto == uproto and (ip == uip or "0.0.0.0" in (ip, uip)):
                return True
    return False


def filter_reason(pod: dict, node: dict, used_ports: set) -> str | None:
    """Why NODE cannot take POD, or None when it can (checked in kube-scheduler's
    order, and only the first failing reason is counted, as it does)."""
    spec = pod.get("spec") or {}
    if not podutil.node_ready(node):
        return NOT_READY
    if (node.get("spec") or {}).get("unschedulable"):
        return UNSCHEDULABLE
    if not selectors.node_matches_pod(spec, node):
        return SELECTOR
    if _ports_conflict(host_ports(spec), used_ports):
        return PORTS
    return None


def failure_message(total: int, reasons: Counter) -> str:
    if total == 0:
        return "no nodes available to schedule pods"
    parts = sorted(f"{n} {reason}" for reason, n in reasons.items())
    return f"0/{total} nodes are available: {', '.join(parts)}."


def schedule(pods: list[dict], nodes: list[dict]) -> list[Binding | Unschedulable]:
    """Decide a node for every pending, unbound pod in PODS (all pods, bound ones
    included: they are what fills the nodes). Pure."""
    node_names = [n["metadata"]["name"] for n in nodes]
    load: Counter = Counter()                 # live pods per node
    owner_load: Counter = Counter()           # (owner uid, node) -> live pods
    ports: dict[str, set] = {name: set() for name in node_names}
    waiting = []
    for pod in sorted(pods, key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"])):
        node = (pod.get("spec") or {}).get("nodeName")
        if node:
            if not podutil.finished(pod):
                load[node] += 1
                ref = ownership.controller_ref(pod)
                if ref:
                    owner_load[(ref.get("uid"), node)] += 1
                ports.setdefault(node, set()).update(host_ports(pod.get("spec") or {}))
        elif not podutil.terminating(pod) and not podutil.finished(pod):
            waiting.append(pod)

    decisions: list[Binding | Unschedulable] = []
    for pod in waiting:
        ref = ownership.controller_ref(pod)
        owner_uid = ref.get("uid") if ref else None
        feasible = []
        reasons: Counter = Counter()
        for node in nodes:
            name = node["metadata"]["name"]
            why = filter_reason(pod, node, ports.get(name, set()))
            if why:
                reasons[why] += 1
            else:
                feasible.append(name)
        if not feasible:
            decisions.append(Unschedulable(pod, failure_message(len(nodes), reasons)))
            continue
        best = min(feasible, key=lambda n: (owner_load[(owner_uid, n)] if owner_uid else 0, load[n], n))
        decisions.append(Binding(pod, best))
        # Later pods of this pass see this one on its node.
        load[best] += 1
        if owner_uid:
            owner_load[(owner_uid, best)] += 1
        ports[best].update(host_ports(pod.get("spec") or {}))
    return decisions


def _scheduled_condition(status: str, reason: str | None = None, message: str | None = None) -> dict:
    cond = {"type": "PodScheduled", "status": status, "lastTransitionTime": registry.now()}
    if reason:
        cond["reason"] = reason
    if message:
        cond["message"] = message
    return cond


def _set_condition(pod: dict, cond: dict) -> None:
    status = pod.setdefault("status", {})
    conds = [c for c in status.get("conditions") or [] if c.get("type") != cond["type"]]
    status["conditions"] = conds + [cond]


def plan(decisions: list[Binding | Unschedulable]) -> list:
    """The store actions for scheduling DECISIONS."""
    out: list = []
    for d in decisions:
        meta = d.pod["metadata"]
        ns = meta.get("namespace", "default")
        if isinstance(d, Binding):
            def bind(pod: dict, node=d.node) -> None:
                if pod["spec"].get("nodeName"):
                    raise Conflict(f"pod {pod['metadata']['name']} was bound meanwhile")
                pod["spec"]["nodeName"] = node
                _set_condition(pod, _scheduled_condition("True"))
            out.append(act.Mutate("Pod", ns, meta["name"], meta.get("uid"), bind, why="bind",
                                  event=act.RecordEvent(d.pod, "Scheduled",
                                                        f"Successfully assigned {ns}/{meta['name']} to {d.node}")))
        else:
            # Only a new reason is news: re-recording the same event every pass
            # would flood `kubectl describe`.
            current = next((c for c in (d.pod.get("status") or {}).get("conditions") or []
                            if c.get("type") == "PodScheduled"), None)
            if current and current.get("status") == "False" and current.get("message") == d.message:
                continue

            def mark(pod: dict, message=d.message) -> None:
                pod.setdefault("status", {}).setdefault("phase", "Pending")
                _set_condition(pod, _scheduled_condition("False", "Unschedulable", message))
            out.append(act.Mutate("Pod", ns, meta["name"], meta.get("uid"), mark, why="unschedulable",
                                  event=act.RecordEvent(d.pod, "FailedScheduling", d.message, type_="Warning")))
    return out


def sync_once(store: Store) -> None:
    pods = registry.list_(store, "Pod")
    if not any(not (p.get("spec") or {}).get("nodeName") for p in pods):
        return
    nodes = registry.list_(store, "Node")
    act.apply(store, plan(schedule(pods, nodes)), SOURCE)


async def run(store: Store, settings=None) -> None:
    await run_reconciler(store, "scheduler", [registry.prefix("Pod"), registry.prefix("Node")],
                         lambda: sync_once(store), idle_resync=IDLE_RESYNC)
