"""Strategic merge patch: what `kubectl apply` (client-side) sends on an update.

A JSON merge patch (RFC 7386) in which some lists are merged element by element
on a merge key instead of replaced, as the Go types' patchStrategy/patchMergeKey
tags say (containers by name, container ports by containerPort, a Service's
ports by port, volumeMounts by mountPath, ...), plus the directives kubectl's
3-way diff emits:

  {"$patch": "delete", <key>: v}   in a merged list: remove that element
  {"$patch": "replace"}            in a map: the map replaces the old one
  {"$patch": "delete"}             in a map: remove the map
  "$setElementOrder/<list>": [...] the order of the merged list
  "$deleteFromPrimitiveList/<list>": [...]  remove these values (merged primitive lists)
  "$retainKeys": [...]             keep only these keys of the map

No PyPI library implements it (KUBE-API.md), hence this module.
"""

from __future__ import annotations

import copy


class PatchError(ValueError):
    """A patch that cannot be applied; str() is the API server's message."""


# list field -> merge key, by the field's name and (where a name means two
# things) its parent's: `ports` of a container merge on containerPort, a
# Service's on port.
_MERGE_KEYS = {
    "containers": "name", "initContainers": "name", "ephemeralContainers": "name",
    "volumes": "name", "imagePullSecrets": "name", "env": "name", "volumeMounts": "mountPath",
    "volumeDevices": "devicePath", "hostAliases": "ip", "ownerReferences": "uid",
    "conditions": "type", "topologySpreadConstraints": "topologyKey", "resourceClaims": "name",
}
# Lists of scalars merged as sets (patchStrategy: merge): finalizers.
_MERGED_PRIMITIVES = {"finalizers"}


def merge_key(path: tuple[str, ...], kind: str) -> str | None:
    field = path[-1] if path else ""
    if field == "ports":
        # A Service's spec.ports merge on port; a container's ports on containerPort.
        return "port" if kind == "Service" and path == ("spec", "ports") else "containerPort"
    return _MERGE_KEYS.get(field)


def apply(original: dict, patch: dict, kind: str) -> dict:
    if not isinstance(patch, dict):
        raise PatchError("the body of the request must be a JSON object")
    return _map(copy.deepcopy(original), patch, (), kind)


def _map(original, patch: dict, path: tuple[str, ...], kind: str):
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return None
    if directive is not None:
        raise PatchError(f"unknown patch directive in map: {directive!r} at {'.'.join(path) or '(root)'}")
    out = dict(original) if isinstance(original, dict) else {}
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key.startswith("$setElementOrder/") or key.startswith("$deleteFromPrimitiveList/") \
                or key == "$retainKeys":
            continue
        if key.startswith("$"):
            raise PatchError(f"unknown patch directive {key!r} at {'.'.join(path) or '(root)'}")
        sub = path + (key,)
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict):
            merged = _map(out.get(key), value, sub, kind)
            if merged is None:
                out.pop(key, None)
            else:
                out[key] = merged
        elif isinstance(value, list):
            out[key] = _list(out.get(key), value, sub, kind,
                             patch.get(f"$setElementOrder/{key}"))
        else:
            out[key] = value
    for key, values in patch.items():
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            if isinstance(out.get(field), list):
                out[field] = [v for v in out[field] if v not in values]
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _list(original, patch: list, path: tuple[str, ...], kind: str, order):
    key = merge_key(path, kind)
    original = original if isinstance(original, list) else []
    if path[-1] in _MERGED_PRIMITIVES:
        return original + [v for v in patch if v not in original]
    if key is None or not all(isinstance(item, dict) for item in patch):
        # No merge key: the list is replaced, as in a JSON merge patch.
        return [_strip(copy.deepcopy(item)) for item in patch]
    out = [copy.deepcopy(item) for item in original]
    for item in patch:
        if key not in item:
            if item.get("$patch") == "replace":
                out = []
                continue
            raise PatchError(f"map: {item} does not contain declared merge key: {key}")
        at = next((i for i, old in enumerate(out) if isinstance(old, dict) and old.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if at is not None:
                del out[at]
            continue
        if at is None:
            out.append(_map({}, item, path, kind))
        else:
            out[at] = _map(out[at], item, path, kind)
    if isinstance(order, list):
        rank = {(o.get(key) if isinstance(o, dict) else o): i for i, o in enumerate(order)}
        out.sort(key=lambda item: rank.get(item.get(key), len(rank)))
    return out


def _strip(value):
    """A replaced list's items keep no directives."""
    if isinstance(value, dict):
        return {k: _strip(v) for k, v in value.items() if not k.startswith("$")}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value
