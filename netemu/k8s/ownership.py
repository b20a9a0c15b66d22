"""Owner references: which controller an object belongs to.

A controller marks what it creates with an ownerReference (controller: true,
the owner's uid); the garbage collector deletes objects whose owner is gone,
and a controller counts only the pods that are its own (owned_by), not every
pod its selector matches.
"""

from __future__ import annotations

from netemu.k8s import kinds


def controller_ref(obj: dict) -> dict | None:
    for ref in obj["metadata"].get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def owned_by(obj: dict, owner: dict) -> bool:
    ref = controller_ref(obj)
    return ref is not None and ref.get("uid") == owner["metadata"].get("uid")


def owner_reference(owner: dict) -> dict:
    """The ownerReference a controller puts on what it creates."""
    kind = owner["kind"]
    return {"apiVersion": kinds.stored_version(kind), "kind": kind, "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}
