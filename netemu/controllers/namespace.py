"""The namespace controller: a deleted namespace takes its content with it.

Deleting a Namespace marks it (deletionTimestamp, phase Terminating) instead of
removing it; this controller then deletes every object in it, as
kube-controller-manager's namespace controller does, pods gracefully (their
kubelets stop them), and removes the Namespace once nothing is left. While it
terminates, the API server refuses new objects in it.
"""

from __future__ import annotations

from netemu import api
from netemu.controllers.loop import guarded, run_reconciler
from netemu.k8s import kinds
from netemu.store import registry
from netemu.store.base import Store

SOURCE = "namespace-controller"


def namespaced_kinds() -> list[str]:
    return [k.kind for k in kinds.KINDS if k.namespaced]


def finalize(store: Store, namespace: dict) -> bool:
    """Delete what is left in NAMESPACE; remove it once empty. True when gone."""
    name = namespace["metadata"]["name"]
    left = 0
    for kind in namespaced_kinds():
        for obj in registry.list_(store, kind, name):
            left += 1
            if kind == "Pod":
                api.delete_pod(store, name, obj["metadata"]["name"], uid=obj["metadata"].get("uid"))
            elif kind == "Service":
                try:
                    api.delete(store, kind, name, obj["metadata"]["name"])      # frees its allocations
                except api.ApiError:
                    pass                                                        # gone meanwhile
            else:
                registry.delete(store, kind, name, obj["metadata"]["name"])
    if left:
        return False
    kv = store.get(registry.key("Namespace", None, name))
    if kv is not None and kv.value["metadata"].get("uid") == namespace["metadata"].get("uid"):
        store.delete(kv.key, expect_revision=kv.mod_revision)
    return True


def sync_once(store: Store) -> float | None:
    pending = False
    for ns in registry.list_(store, "Namespace"):
        if ns["metadata"].get("deletionTimestamp"):
            done = guarded("namespace " + ns["metadata"]["name"], lambda ns=ns: finalize(store, ns))()
            pending = pending or not done
    return 0.2 if pending else None


async def run(store: Store, settings=None) -> None:
    await run_reconciler(store, "namespace", [registry.prefix("Namespace"), registry.prefix("Pod")],
                         lambda: sync_once(store))
