"""What controllers need to know about pods and nodes (kube-controller-manager's
controller_utils): the pod predicates, and new pods from a controller's template.

A pod counts toward a controller's replicas while it is neither terminating
(deletionTimestamp set) nor finished (phase Succeeded or Failed). Selectors:
netemu.k8s.selectors; owner references: netemu.k8s.ownership.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from netemu.k8s.ownership import owner_reference
from netemu.store.registry import _SUFFIX_ALPHABET


def node_ready(node: dict) -> bool:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def phase(pod: dict) -> str:
    return (pod.get("status") or {}).get("phase") or "Pending"


def terminating(pod: dict) -> bool:
    return bool(pod["metadata"].get("deletionTimestamp"))


def finished(pod: dict) -> bool:
    return phase(pod) in ("Succeeded", "Failed")


def active(pod: dict) -> bool:
    """Counts toward a controller's replicas: neither finished nor terminating."""
    return not terminating(pod) and not finished(pod)


def ready(pod: dict) -> bool:
    for cond in (pod.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


def restart_count(pod: dict) -> int:
    return sum(int(c.get("restartCount") or 0)
               for c in (pod.get("status") or {}).get("containerStatuses") or [])


def by_namespace(pods: list[dict]) -> dict[str, list[dict]]:
    """PODS grouped by their namespace (a service selects only its own)."""
    out: dict[str, list[dict]] = {}
    for pod in pods:
        out.setdefault(pod["metadata"].get("namespace", "default"), []).append(pod)
    return out


def generate_name(owner_name: str) -> str:
    """The generateName prefix of pods a controller creates: `<owner>-`, so the API
    server makes `<owner>-<5 random chars>`. Kubernetes cuts the prefix at 58
    characters so the name stays within 63."""
    return owner_name[:58] + "-"


def template_hash(template: Any, collision_count: int = 0) -> str:
    """A 10-character name-safe hash of a pod template (the Deployment's
    pod-template-hash label and ReplicaSet suffix; the DaemonSet's revision hash).
    Kubernetes uses FNV-32a over the template; any stable hash shows the same
    behaviour: the same template always gives the same ReplicaSet name."""
    data = json.dumps(template, sort_keys=True, separators=(",", ":")) + f"#{collision_count}"
    n = int.from_bytes(hashlib.sha256(data.encode()).digest()[:8], "big")
    chars = []
    for _ in range(10):
        n, r = divmod(n, len(_SUFFIX_ALPHABET))
        chars.append(_SUFFIX_ALPHABET[r])
    return "".join(chars)


def pod_from_template(owner: dict, template: dict, *, extra_labels: dict | None = None,
                      node_name: str | None = None) -> dict:
    """A new pod (not yet stored) from OWNER's pod template."""
    import copy
    tmeta = template.get("metadata") or {}
    labels = dict(tmeta.get("labels") or {})
    labels.update(extra_labels or {})
    meta: dict = {"generateName": generate_name(owner["metadata"]["name"]),
                  "namespace": owner["metadata"].get("namespace", "default"),
                  "labels": labels,
                  "ownerReferences": [owner_reference(owner)]}
    if tmeta.get("annotations"):
        meta["annotations"] = dict(tmeta["annotations"])
    spec = copy.deepcopy(template.get("spec") or {})
    if node_name:
        spec["nodeName"] = node_name
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta, "spec": spec,
            "status": {"phase": "Pending"}}
