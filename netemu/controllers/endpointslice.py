"""The EndpointSlice controller: each Service's EndpointSlices follow its pods.

kubectl 1.31+ reads a Service's endpoints from EndpointSlices
(discovery.k8s.io/v1), not from Endpoints, so `kubectl describe service` shows
"Endpoints: <none>" without them. As kube-controller-manager's
endpointslice controller does: per Service with a selector, one slice per
distinct set of resolved ports (netemu's clusters are small: no 100-endpoint
split), named from generateName `<service>-`, labelled
kubernetes.io/service-name and endpointslice.kubernetes.io/managed-by, owned by
the Service. Which pods and ports is the endpoints controller's computation
(endpoints.desired_subsets), so the two views never disagree: a ready address
is an endpoint with ready/serving true, a not-ready one with both false.
Slices are written only when they change; slices of a gone Service are deleted.
It runs in the endpoints controller's pass, on the same listing of pods and
Services (endpoints.sync_with_slices).
"""

from __future__ import annotations

from netemu.controllers import actions as act, podutil
from netemu.controllers.endpoints import desired_subsets
from netemu.controllers.loop import guarded
from netemu.store import registry
from netemu.store.base import Store

SOURCE = "endpointslice-controller"
MANAGED_BY = "endpointslice-controller.k8s.io"
SERVICE_NAME = "kubernetes.io/service-name"
MANAGED_BY_LABEL = "endpointslice.kubernetes.io/managed-by"


def _ports_key(ports: list[dict]) -> tuple:
    return tuple(sorted((p.get("name", ""), p["port"], p.get("protocol", "TCP")) for p in ports))


def desired_slices(service: dict, pods: list[dict]) -> list[dict]:
    """The content (ports, endpoints) of SERVICE's slices, one per port set."""
    slices = []
    for subset in desired_subsets(service, pods):
        endpoints = []
        for field, ready in (("addresses", True), ("notReadyAddresses", False)):
            for a in subset.get(field) or []:
                ep = {"addresses": [a["ip"]],
                      "conditions": {"ready": ready, "serving": ready, "terminating": False},
                      "targetRef": a["targetRef"]}
                if a.get("nodeName"):
                    ep["nodeName"] = a["nodeName"]
                endpoints.append(ep)
        ports = [{"name": p.get("name", ""), "port": p["port"], "protocol": p["protocol"]}
                 for p in subset["ports"]]
        slices.append({"ports": ports, "endpoints": endpoints})
    return slices


def reconcile_slices(service: dict, pods: list[dict], current: list[dict]) -> list:
    """Actions that make SERVICE's slices (CURRENT) match its pods."""
    meta = service["metadata"]
    ns = meta.get("namespace", "default")
    spec = service.get("spec") or {}
    wanted = [] if not spec.get("selector") or spec.get("type") == "ExternalName" \
        else desired_slices(service, pods)
    labels = {**(meta.get("labels") or {}), SERVICE_NAME: meta["name"], MANAGED_BY_LABEL: MANAGED_BY}
    by_ports = {_ports_key(s.get("ports") or []): s for s in current}
    actions: list = []
    for want in wanted:
        have = by_ports.pop(_ports_key(want["ports"]), None)
        if have is None:
            actions.append(act.CreateObject({
                "apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
                "metadata": {"generateName": meta["name"] + "-", "namespace": ns, "labels": labels,
                             "ownerReferences": [{"apiVersion": "v1", "kind": "Service", "name": meta["name"],
                                                  "uid": meta.get("uid"), "controller": True,
                                                  "blockOwnerDeletion": True}]},
                "addressType": "IPv4", **want}))
        elif have.get("endpoints") != want["endpoints"] or have.get("ports") != want["ports"] \
                or (have["metadata"].get("labels") or {}) != labels:
            def change(obj: dict, want=want) -> None:
                obj.update(want)
                obj["metadata"]["labels"] = labels
            actions.append(act.Mutate("EndpointSlice", ns, have["metadata"]["name"], have["metadata"].get("uid"),
                                      change, why="endpointslice"))
    for stale in by_ports.values():
        actions.append(act.DeleteObject("EndpointSlice", ns, stale["metadata"]["name"]))
    return actions


def sync_once(store: Store, pods: list[dict] | None = None, services: list[dict] | None = None) -> None:
    """One pass over every Service (PODS and SERVICES: listed already, or listed
    here). It runs in the endpoints controller's pass (endpoints.sync_with_slices)."""
    pods = registry.list_(store, "Pod") if pods is None else pods
    services = registry.list_(store, "Service") if services is None else services
    by_ns = podutil.by_namespace(pods)
    slices: dict[tuple[str, str], list[dict]] = {}
    for s in registry.list_(store, "EndpointSlice"):
        labels = s["metadata"].get("labels") or {}
        if labels.get(MANAGED_BY_LABEL) == MANAGED_BY and labels.get(SERVICE_NAME):
            slices.setdefault((s["metadata"].get("namespace", "default"), labels[SERVICE_NAME]), []).append(s)
    seen = set()
    for svc in services:
        ns, name = svc["metadata"].get("namespace", "default"), svc["metadata"]["name"]
        seen.add((ns, name))
        owned = [s for s in slices.get((ns, name), [])
                 if any(r.get("uid") == svc["metadata"].get("uid")
                        for r in s["metadata"].get("ownerReferences") or [])]
        # A slice of an earlier Service of the same name goes too.
        stale = [s for s in slices.get((ns, name), []) if s not in owned]
        guarded("endpointslices " + name,
                lambda: act.apply(store, reconcile_slices(svc, by_ns.get(ns, []), owned) +
                                  [act.DeleteObject("EndpointSlice", ns, s["metadata"]["name"]) for s in stale],
                                  SOURCE))()
    for (ns, name), gone in slices.items():
        if (ns, name) not in seen and registry.get(store, "Service", ns, name) is None:
            act.apply(store, [act.DeleteObject("EndpointSlice", ns, s["metadata"]["name"]) for s in gone], SOURCE)

