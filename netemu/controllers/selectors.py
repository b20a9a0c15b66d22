"""Label selectors, ownership and pod-state predicates shared by every controller.

Kubernetes has two selector shapes: the old map selector of a ReplicationController
and a Service (`{app: nginx}`: every pair must match), and the LabelSelector of
apps/v1 and batch/v1 kinds (`matchLabels` plus `matchExpressions` with the
operators In, NotIn, Exists, DoesNotExist). Both are matched here, as are the node
selectors a pod uses for scheduling (nodeSelector and required node affinity).

The pod predicates (active, ready, terminating) follow kube-controller-manager's
controller_utils: a pod counts toward a controller's replicas while it is neither
terminating (deletionTimestamp set) nor finished (phase Succeeded or Failed).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from netemu.store.registry import _SUFFIX_ALPHABET


class SelectorError(ValueError):
    """A selector that cannot be evaluated (unknown operator, missing values)."""


# -- label selectors ---------------------------------------------------------

def matches(selector: dict | None, labels: dict | None) -> bool:
    """Does SELECTOR select an object carrying LABELS?

    A map selector and a LabelSelector are both accepted. An empty or missing
    selector selects nothing, which is what controllers need (an RC with no
    selector must not claim every pod in its namespace).
    """
    if not selector:
        return False
    labels = labels or {}
    if "matchLabels" in selector or "matchExpressions" in selector:
        match_labels = selector.get("matchLabels") or {}
        expressions = selector.get("matchExpressions") or []
        if not match_labels and not expressions:
            return False
        if any(labels.get(k) != str(v) for k, v in match_labels.items()):
            return False
        return all(expression_matches(e, labels) for e in expressions)
    return all(labels.get(k) == str(v) for k, v in selector.items())


def expression_matches(expr: dict, labels: dict) -> bool:
    op = expr.get("operator")
    k = expr.get("key")
    values = [str(v) for v in expr.get("values") or []]
    if op == "In":
        return k in labels and labels[k] in values
    if op == "NotIn":
        return k not in labels or labels[k] not in values
    if op == "Exists":
        return k in labels
    if op == "DoesNotExist":
        return k not in labels
    if op in ("Gt", "Lt"):               # node affinity only
        try:
            have, want = int(labels[k]), int(values[0])
        except (KeyError, IndexError, ValueError):
            return False
        return have > want if op == "Gt" else have < want
    raise SelectorError(f"unknown selector operator {op!r}")


def selector_as_map(selector: dict | None) -> dict | None:
    """The selector as a plain map (what a Service takes), or None when it has
    expressions that a map cannot express (kubectl expose refuses those)."""
    if not selector:
        return None
    if "matchLabels" in selector or "matchExpressions" in selector:
        if selector.get("matchExpressions"):
            return None
        return dict(selector.get("matchLabels") or {}) or None
    return dict(selector)


def format_selector(selector: dict | None) -> str:
    """As kubectl prints it: app=nginx,tier in (web,api),!legacy."""
    if not selector:
        return "<none>"
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    parts = [f"{k}={v}" for k, v in sorted((selector.get("matchLabels") or {}).items())]
    for e in selector.get("matchExpressions") or []:
        k, vals = e["key"], ",".join(e.get("values") or [])
        parts.append({"In": f"{k} in ({vals})", "NotIn": f"{k} notin ({vals})",
                      "Exists": k, "DoesNotExist": f"!{k}"}.get(e["operator"], f"{k} {e['operator']} ({vals})"))
    return ",".join(parts)


def workload_selector(owner: dict) -> dict | None:
    """The pod selector of a ReplicationController, ReplicaSet, Deployment,
    DaemonSet or Job (an RC without one selects its template's labels, as the API
    server defaults it)."""
    spec = owner.get("spec") or {}
    selector = spec.get("selector")
    if not selector and owner.get("kind") == "ReplicationController":
        selector = ((spec.get("template") or {}).get("metadata") or {}).get("labels")
    return selector


# -- node selection ------------------------------------------------------------

def node_matches_pod(pod_spec: dict, node: dict) -> bool:
    """Does NODE satisfy the pod's nodeSelector and its required node affinity?"""
    labels = node["metadata"].get("labels") or {}
    for k, v in (pod_spec.get("nodeSelector") or {}).items():
        if labels.get(k) != str(v):
            return False
    required = (((pod_spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if not required:
        return True
    # The terms are ORed; the expressions inside one term are ANDed.
    fields = {"metadata.name": node["metadata"]["name"]}
    for term in required.get("nodeSelectorTerms") or []:
        if (all(expression_matches(e, labels) for e in term.get("matchExpressions") or [])
                and all(expression_matches(e, fields) for e in term.get("matchFields") or [])):
            return True
    return False


def node_ready(node: dict) -> bool:
    for cond in (node.get("status") or {}).get("conditions") or []:
        if cond.get("type") == "Ready":
            return cond.get("status") == "True"
    return False


# -- pod state -----------------------------------------------------------------

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


# -- ownership -----------------------------------------------------------------

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
    from netemu.k8s import kinds
    kind = owner["kind"]
    return {"apiVersion": kinds.stored_version(kind), "kind": kind, "name": owner["metadata"]["name"],
            "uid": owner["metadata"]["uid"], "controller": True, "blockOwnerDeletion": True}


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
