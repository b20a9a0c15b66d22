"""The kubelet's node lease: its heartbeat.

As the kubelet's lease controller does, it keeps a Lease named after the node in
namespace kube-node-lease (coordination.k8s.io/v1: spec.holderIdentity,
spec.leaseDurationSeconds, spec.renewTime) and renews it every quarter of the
lease's duration. The node lifecycle controller (controllers/nodelifecycle.py)
reads the renewals; when they stop, it sets the node's Ready condition to
Unknown. When they start again, the kubelet posts Ready again (kubelet_ready
says whether it can), as the kubelet's next node status update would.
"""

from __future__ import annotations

import datetime
import logging
from collections.abc import Callable

import trio

from netemu.store import registry
from netemu.store.base import Conflict

log = logging.getLogger("netemu.lease")

NAMESPACE = "kube-node-lease"
LEASE_DURATION = 40.0       # Kubernetes' default, seconds (= the node monitor grace period)
RENEW_FRACTION = 0.25       # kubelet renews at a quarter of the duration: every 10 s
# Floors for small timeScales: a loaded machine must not make nodes flap.
MIN_LEASE_DURATION = 5.0


def lease_duration(settings) -> float:
    scale = float(getattr(settings, "time_scale", 1.0) or 1.0)
    return max(LEASE_DURATION * scale, MIN_LEASE_DURATION)


def micro_time(now: datetime.datetime | None = None) -> str:
    """MicroTime, as Lease.spec.renewTime is written: RFC 3339 with microseconds."""
    now = now or datetime.datetime.now(datetime.timezone.utc)
    return now.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def lease_object(node: str, duration: float, renew_time: str, node_uid: str | None = None) -> dict:
    lease = {"kind": "Lease",
             "metadata": {"name": node, "namespace": NAMESPACE},
             "spec": {"holderIdentity": node, "leaseDurationSeconds": max(1, round(duration)),
                      "renewTime": renew_time}}
    if node_uid:
        # As the kubelet sets it: the garbage collector removes the Lease with its Node.
        lease["metadata"]["ownerReferences"] = [{"apiVersion": "v1", "kind": "Node", "name": node,
                                                 "uid": node_uid}]
    return lease


def renew(store, node: str, duration: float) -> None:
    stamp = micro_time()
    if registry.mutate(store, "Lease", NAMESPACE, node,
                       lambda lease: lease["spec"].update(renewTime=stamp, holderIdentity=node,
                                                          leaseDurationSeconds=max(1, round(duration)))) is None:
        owner = registry.get(store, "Node", None, node)
        if owner is None:
            return          # the node is gone (removed): a late renewal brings nothing back
        try:
            registry.create(store, lease_object(node, duration, stamp, owner["metadata"].get("uid")))
        except Conflict:
            pass            # created meanwhile by our predecessor: renewed next time


def _ready_status(store, node: str) -> str | None:
    obj = registry.get(store, "Node", None, node)
    for c in (obj or {}).get("status", {}).get("conditions", []):
        if c.get("type") == "Ready":
            return c.get("status")
    return None


def _renew_and_read(store, node: str, duration: float, read_ready: bool) -> str | None:
    """Renew NODE's lease, then (READ_READY) read its Ready condition."""
    renew(store, node, duration)
    return _ready_status(store, node) if read_ready else None


async def heartbeat(store, node: str, settings, kubelet_ready: Callable[[], bool],
                    post_ready: Callable[[], None]) -> None:
    """Renew NODE's lease until cancelled."""
    duration = lease_duration(settings)
    interval = duration * RENEW_FRACTION
    while True:
        try:
            # One thread hop for both (each hop is a wake-up of the agent).
            ready = kubelet_ready()
            if await trio.to_thread.run_sync(_renew_and_read, store, node, duration, ready) == "Unknown" \
                    and ready:
                post_ready()
        except Exception:       # noqa: BLE001 - a failed renewal is retried, as kubelet does
            log.exception("node %s: lease renewal failed", node)
        await trio.sleep(interval)
