"""The `kubernetes` Service in `default`: where a pod finds the API server.

kube-apiserver keeps it itself (its bootstrap controller and endpoint
reconciler): a Service with the first address of the service range and no
selector, and Endpoints (and an EndpointSlice) naming the API servers'
addresses. Deleted or changed, it is put back on the next pass.

netemu's API server serves plain HTTP on the master's eth0, port 8080 (the
tutorial's insecure port), so that is what the Service leads to: port 8080
named http, the endpoint the master's address at 8080. A pod reaches it
through the service proxy like any Service (`curl http://10.96.0.1:8080/version`).
A master without an address gets the Service with no endpoints.
"""

from __future__ import annotations

import logging

import trio

from netemu import api
from netemu.store import registry

log = logging.getLogger("netemu.apiserver")

NAMESPACE, NAME = "default", "kubernetes"
PORT_NAME = "http"
INTERVAL = 10.0                 # kube-apiserver's endpoint reconcile interval, scaled by timeScale
MIN_INTERVAL = 1.0
SLICE_LABELS = {"kubernetes.io/service-name": NAME}


def desired_service(settings, port: int) -> dict:
    return {"apiVersion": "v1", "kind": "Service",
            "metadata": {"name": NAME, "namespace": NAMESPACE,
                         "labels": {"component": "apiserver", "provider": "kubernetes"}},
            "spec": {"type": "ClusterIP", "clusterIP": api.kubernetes_service_ip(settings), "sessionAffinity": "None",
                     "ports": [{"name": PORT_NAME, "port": port, "protocol": "TCP", "targetPort": port}]}}


def desired_endpoints(address: str | None, port: int) -> dict:
    subsets = [{"addresses": [{"ip": address}],
                "ports": [{"name": PORT_NAME, "port": port, "protocol": "TCP"}]}] if address else []
    return {"apiVersion": "v1", "kind": "Endpoints", "metadata": {"name": NAME, "namespace": NAMESPACE},
            "subsets": subsets}


def desired_slice(address: str | None, port: int) -> dict:
    return {"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
            "metadata": {"name": NAME, "namespace": NAMESPACE, "labels": dict(SLICE_LABELS)},
            "addressType": "IPv4",
            "endpoints": [{"addresses": [address], "conditions": {"ready": True}}] if address else [],
            "ports": [{"name": PORT_NAME, "port": port, "protocol": "TCP"}]}


def reconcile(store, settings, address: str | None, port: int) -> list[str]:
    """Make the Service, its Endpoints and EndpointSlice what they must be;
    returns what was written ("service created", ...)."""
    done = []
    want = desired_service(settings, port)
    svc = registry.get(store, "Service", NAMESPACE, NAME)
    if svc is None:
        try:
            api.create(store, want, settings)
            done.append("service created")
        except api.ApiError as err:
            if err.reason != "AlreadyExists":
                raise
    elif (svc.get("spec") or {}).get("ports") != want["spec"]["ports"] \
            or (svc.get("spec") or {}).get("selector") or (svc.get("spec") or {}).get("type") != "ClusterIP":
        # Its ports and type put back; a cluster IP, once set, stays (as kube-apiserver).
        fixed = dict(svc, spec={**svc["spec"], "ports": want["spec"]["ports"], "type": "ClusterIP"})
        fixed["spec"].pop("selector", None)
        api.update(store, fixed, settings)
        done.append("service updated")
    endpoints = desired_endpoints(address, port)
    have = registry.get(store, "Endpoints", NAMESPACE, NAME)
    if have is None or have.get("subsets") != endpoints["subsets"]:
        _, how = api.create_or_update(store, endpoints, settings)
        done.append(f"endpoints {how}")
    slice_ = desired_slice(address, port)
    have = registry.get(store, "EndpointSlice", NAMESPACE, NAME)
    if have is None:
        registry.create(store, slice_)
        done.append("endpointslice created")
    elif any(have.get(k) != slice_[k] for k in ("addressType", "endpoints", "ports")) \
            or (have["metadata"].get("labels") or {}) != SLICE_LABELS:
        def change(obj: dict) -> None:
            obj.update({k: slice_[k] for k in ("addressType", "endpoints", "ports")})
            obj["metadata"]["labels"] = dict(SLICE_LABELS)
        registry.mutate(store, "EndpointSlice", NAMESPACE, NAME, change)
        done.append("endpointslice updated")
    return done


async def run(store, settings, address: str | None, port: int) -> None:
    """Keep the Service for as long as the API server runs."""
    interval = max(MIN_INTERVAL, INTERVAL * float(getattr(settings, "time_scale", 1.0) or 1.0))
    while True:
        try:
            for what in reconcile(store, settings, address, port):
                log.info("the kubernetes Service: %s", what)
        except Exception:
            log.exception("the kubernetes Service could not be kept")
        await trio.sleep(interval)
