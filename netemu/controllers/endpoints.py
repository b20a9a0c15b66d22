"""The endpoints controller: each Service's Endpoints object follows its pods.

For a Service with a selector (kube-controller-manager's endpoints controller):
the selected pods of its namespace that have an IP, are not terminating and have
not finished become addresses ({ip, nodeName, targetRef}); ready pods go in
`addresses`, the others in `notReadyAddresses` (all in `addresses` when the
Service sets publishNotReadyAddresses). Each Service port's targetPort is
resolved per pod, a number as is, a name through the pod's container ports; a
pod lacking a named port is left out, as Kubernetes does. Pods whose resolved
ports are equal share one subset.

The Endpoints object is written only when it changes: every write wakes every
node's service proxy. The controller reacts to watch events rather than a timer,
since a dead endpoint must leave the proxies' rules within about a second.
Services without a selector keep whatever Endpoints the user wrote; Endpoints
whose Service is gone are deleted.
"""

from __future__ import annotations

from netemu.controllers import actions as act
from netemu.controllers import podutil
from netemu.controllers.loop import IDLE_RESYNC, guarded, run_reconciler
from netemu.k8s import selectors
from netemu.store import registry
from netemu.store.base import Store

SOURCE = "endpoint-controller"


def _resolve_port(target, pod: dict) -> int | None:
    if isinstance(target, int) or (isinstance(target, str) and target.isdigit()):
        return int(target)
    for c in (pod.get("spec") or {}).get("containers") or []:
        for p in c.get("ports") or []:
            if p.get("name") == target:
                return int(p["containerPort"])
    return None


def desired_subsets(service: dict, pods: list[dict]) -> list[dict]:
    """The subsets of SERVICE's Endpoints given PODS (its namespace's pods), in a
    canonical order so that equal content compares equal."""
    spec = service.get("spec") or {}
    selector = spec.get("selector")
    publish_all = bool(spec.get("publishNotReadyAddresses"))
    groups: dict[tuple, dict] = {}
    for pod in pods:
        meta = pod["metadata"]
        ip = (pod.get("status") or {}).get("podIP")
        if (not ip or podutil.terminating(pod) or podutil.finished(pod)
                or not selectors.matches(selector, meta.get("labels"))):
            continue
        ports = []
        for sp in spec.get("ports") or []:
            resolved = _resolve_port(sp.get("targetPort", sp.get("port")), pod)
            if resolved is None:
                break
            entry = {"port": resolved, "protocol": sp.get("protocol", "TCP")}
            if sp.get("name"):
                entry["name"] = sp["name"]
            ports.append(entry)
        else:
            key = tuple(sorted((p.get("name", ""), p["port"], p["protocol"]) for p in ports))
            group = groups.setdefault(key, {"ports": sorted(ports, key=lambda p: (p.get("name", ""), p["port"])),
                                            "addresses": [], "notReadyAddresses": []})
            address = {"ip": ip,
                       "targetRef": {"kind": "Pod", "namespace": meta.get("namespace", "default"),
                                     "name": meta["name"], "uid": meta.get("uid")}}
            if (pod.get("spec") or {}).get("nodeName"):
                address["nodeName"] = pod["spec"]["nodeName"]
            group["addresses" if publish_all or podutil.ready(pod) else "notReadyAddresses"].append(address)
    subsets = []
    for key in sorted(groups):
        group = groups[key]
        subset = {}
        for field in ("addresses", "notReadyAddresses"):
            if group[field]:
                subset[field] = sorted(group[field], key=lambda a: (tuple(int(x) for x in a["ip"].split(".")),
                                                                     a["targetRef"]["name"]))
        subset["ports"] = group["ports"]
        subsets.append(subset)
    return subsets


def reconcile_endpoints(service: dict, pods: list[dict], current: dict | None) -> list:
    """Actions that make SERVICE's Endpoints (CURRENT, or None) match its pods."""
    meta = service["metadata"]
    if not (service.get("spec") or {}).get("selector") or (service.get("spec") or {}).get("type") == "ExternalName":
        return []
    subsets = desired_subsets(service, pods)
    labels = dict(meta.get("labels") or {})
    if current is None:
        endpoints = {"apiVersion": "v1", "kind": "Endpoints",
                     "metadata": {"name": meta["name"], "namespace": meta.get("namespace", "default")},
                     "subsets": subsets}
        if labels:
            endpoints["metadata"]["labels"] = labels
        return [act.CreateObject(endpoints)]
    if (current.get("subsets") or []) == subsets and (current["metadata"].get("labels") or {}) == labels:
        return []

    def change(obj: dict) -> None:
        obj["subsets"] = subsets
        if labels:
            obj["metadata"]["labels"] = labels
        else:
            obj["metadata"].pop("labels", None)
    return [act.Mutate("Endpoints", meta.get("namespace", "default"), meta["name"], current["metadata"].get("uid"),
                       change, why="endpoints")]


def sync_once(store: Store, pods: list[dict] | None = None, services: list[dict] | None = None) -> None:
    """One pass over every Service (PODS and SERVICES: listed already, or listed here)."""
    pods = registry.list_(store, "Pod") if pods is None else pods
    services = registry.list_(store, "Service") if services is None else services
    by_ns = podutil.by_namespace(pods)
    existing = {(e["metadata"].get("namespace", "default"), e["metadata"]["name"]): e
                for e in registry.list_(store, "Endpoints")}
    wanted = set()
    for svc in services:
        ns = svc["metadata"].get("namespace", "default")
        wanted.add((ns, svc["metadata"]["name"]))
        guarded("endpoints " + svc["metadata"]["name"],
                lambda: act.apply(store, reconcile_endpoints(svc, by_ns.get(ns, []),
                                                             existing.get((ns, svc["metadata"]["name"]))),
                                  SOURCE))()
    # The Endpoints were listed after the Services: one whose Service was created
    # in between is not in `wanted`, so look again before deleting.
    for (ns, name) in set(existing) - wanted:
        if registry.get(store, "Service", ns, name) is None:
            act.apply(store, [act.DeleteObject("Endpoints", ns, name)], SOURCE)


def sync_with_slices(store: Store) -> None:
    """This controller's pass and the EndpointSlice controller's, on one listing
    of the pods and Services: both follow every pod change, and each decoding
    every pod was the larger part of a Service's propagation time at 1,000 pods
    (see loop.py). The Endpoints go first: the service proxies follow them."""
    from netemu.controllers import endpointslice

    pods, services = registry.list_(store, "Pod"), registry.list_(store, "Service")
    sync_once(store, pods, services)
    endpointslice.sync_once(store, pods, services)


async def run(store: Store, settings=None) -> None:
    """The endpoints and EndpointSlice controllers, one pass for both (sync_with_slices)."""
    await run_reconciler(store, "endpoints",
                         [registry.prefix(k) for k in ("Pod", "Service", "Endpoints", "EndpointSlice")],
                         lambda: sync_with_slices(store), idle_resync=IDLE_RESYNC)
