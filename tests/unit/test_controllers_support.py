"""Object factories and a simulated kubelet shared by the controller and API tests.

(Named test_*.py only so that it falls among the files these tests own; it holds
no tests itself.)
"""

from __future__ import annotations

import itertools
import types

import trio

from netemu.controllers import podutil
from netemu.k8s import kinds, ownership
from netemu.store import registry
from netemu.store.sqlite import SqliteStore

_uids = itertools.count(1)


def settings(**over):
    base = dict(service_range="10.96.0.0/16", node_port_range=(30000, 32767), lb_pool=None, time_scale=1.0)
    base.update(over)
    return types.SimpleNamespace(**base)


def node(name, labels=None, *, unschedulable=False, ready=True):
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "uid": f"node-{name}", "labels": {"kubernetes.io/hostname": name,
                                                                         **(labels or {})}},
            "spec": {"unschedulable": unschedulable},
            "status": {"conditions": [{"type": "Ready", "status": "True" if ready else "False"}]}}


def pod(name, labels=None, *, node_name=None, phase=None, ready=False, owner=None, ip=None,
        ns="default", created="2024-01-01T00:00:00Z", ports=(), node_selector=None, restarts=0,
        deleting=False):
    meta = {"name": name, "namespace": ns, "uid": f"uid-{name}-{next(_uids)}", "labels": dict(labels or {}),
            "creationTimestamp": created}
    if owner is not None:
        meta["ownerReferences"] = [ownership.owner_reference(owner)]
    if deleting:
        meta["deletionTimestamp"] = "2024-01-01T00:00:10Z"
    spec = {"containers": [{"name": "c", "image": "nginx", "ports": [dict(p) for p in ports]}]}
    if node_name:
        spec["nodeName"] = node_name
    if node_selector:
        spec["nodeSelector"] = node_selector
    status = {"phase": phase or "Pending",
              "conditions": [{"type": "Ready", "status": "True" if ready else "False"}],
              "containerStatuses": [{"name": "c", "restartCount": restarts, "ready": ready}]}
    if ip:
        status["podIP"] = ip
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec, "status": status}


def workload(kind, name, *, replicas=None, labels=None, selector=None, ns="default", **spec):
    labels = labels or {"app": name}
    template = {"metadata": {"labels": dict(labels)},
                "spec": {"containers": [{"name": "c", "image": "nginx", "ports": [{"containerPort": 80}]}],
                         "restartPolicy": spec.pop("restart_policy", "Always")}}
    if "node_selector" in spec:
        template["spec"]["nodeSelector"] = spec.pop("node_selector")
    body = {"template": template, **spec}
    if replicas is not None:
        body["replicas"] = replicas
    if kind == "ReplicationController":
        body["selector"] = selector or dict(labels)
    elif kind != "Job" or selector:
        body["selector"] = selector or {"matchLabels": dict(labels)}
    return {"apiVersion": kinds.stored_version(kind), "kind": kind,
            "metadata": {"name": name, "namespace": ns, "uid": f"uid-{kind}-{name}-{next(_uids)}",
                         "generation": 1},
            "spec": body}


def open_store(tmp_path, name="state.db"):
    return SqliteStore(str(tmp_path / name), create=True)


class Kubelet:
    """Plays every node's kubelet in the store: a bound Pending pod starts
    (Running, Ready, an IP); OUTCOME(pod) may then finish it ("Succeeded" or
    "Failed"); a terminating pod's key is removed, as a kubelet does when the
    containers are gone. Records the most pods it ever saw active per owner."""

    def __init__(self, store, outcome=None, interval=0.02):
        self.store, self.outcome, self.interval = store, outcome, interval
        self.ips = itertools.count(2)
        self.max_active: dict[str, int] = {}

    def step(self):
        active_by_owner: dict[str, int] = {}
        for p in registry.list_(self.store, "Pod"):
            meta, spec = p["metadata"], p.get("spec") or {}
            ref = ownership.controller_ref(p)
            if ref and podutil.active(p):
                active_by_owner[ref["name"]] = active_by_owner.get(ref["name"], 0) + 1
            if not spec.get("nodeName"):
                continue
            if meta.get("deletionTimestamp"):
                self.store.delete(registry.key("Pod", meta["namespace"], meta["name"]))
                continue
            phase = podutil.phase(p)
            if phase == "Pending":
                def start(obj):
                    obj["status"] = {"phase": "Running", "podIP": f"10.244.0.{next(self.ips)}",
                                     "hostIP": "172.30.0.2", "startTime": registry.now(),
                                     "conditions": [{"type": "Ready", "status": "True"}],
                                     "containerStatuses": [{"name": "c", "ready": True, "restartCount": 0,
                                                            "state": {"running": {"startedAt": registry.now()}}}]}
                registry.mutate(self.store, "Pod", meta["namespace"], meta["name"], start)
            elif phase == "Running" and self.outcome is not None:
                result = self.outcome(p)
                if result in ("Succeeded", "Failed"):
                    def finish(obj, result=result):
                        stamp = registry.now()
                        obj["status"]["phase"] = result
                        obj["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
                        obj["status"]["containerStatuses"] = [{
                            "name": "c", "ready": False, "restartCount": 0,
                            "state": {"terminated": {"exitCode": 0 if result == "Succeeded" else 1,
                                                     "reason": "Completed" if result == "Succeeded" else "Error",
                                                     "startedAt": stamp, "finishedAt": stamp}}}]
                    registry.mutate(self.store, "Pod", meta["namespace"], meta["name"], finish)
        for owner, n in active_by_owner.items():
            self.max_active[owner] = max(self.max_active.get(owner, 0), n)

    async def run(self):
        while True:
            await trio.to_thread.run_sync(self.step)
            await trio.sleep(self.interval)


async def wait_for(predicate, timeout=8.0, interval=0.05):
    """Poll PREDICATE (a plain function) until it holds; fail after TIMEOUT."""
    with trio.move_on_after(timeout):
        while True:
            if await trio.to_thread.run_sync(predicate):
                return
            await trio.sleep(interval)
    raise AssertionError(f"condition not reached within {timeout} s")


__all__ = ["settings", "node", "pod", "workload", "open_store", "Kubelet", "wait_for"]
