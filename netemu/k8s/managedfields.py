"""Field ownership: metadata.managedFields, and server-side apply over it.

kube-apiserver records, for every object, which manager set which fields
(structured-merge-diff's field sets, written as FieldsV1), and server-side
apply (`kubectl apply --server-side`, PATCH with application/apply-patch+yaml)
uses that record: an applier's configuration is merged into the live object,
fields it applied before and no longer applies are removed unless another
manager also owns them, and a field another manager owns with a different
value is a conflict (409) unless the apply forces it.

A field set here is a set of paths; a path is a tuple of FieldsV1 keys:
  "f:<name>"               a field of a map or struct
  'k:{"name":"c"}'         an element of an associative list, by its keys
  'v:"x"'                  an element of a set (a list of scalars merged as one)
A path ending in a k:/v: element means the element itself (FieldsV1's ".").
Which lists are associative, and on which keys, and which maps and lists are
atomic, is the schema knowledge below (the Go types' listType/listMapKeys and
mapType markers, for the kinds netemu serves).
"""

from __future__ import annotations

import copy
import json
from typing import Any, Iterable

Path = tuple[str, ...]

# Associative lists: field name -> key fields, (name, parent struct) where a
# name means two things. A missing key field takes the schema's default.
_LIST_KEYS = {
    "containers": ("name",), "initContainers": ("name",), "ephemeralContainers": ("name",),
    "volumes": ("name",), "imagePullSecrets": ("name",), "env": ("name",),
    "volumeMounts": ("mountPath",), "volumeDevices": ("devicePath",), "hostAliases": ("ip",),
    "ownerReferences": ("uid",), "conditions": ("type",), "resourceClaims": ("name",),
    "topologySpreadConstraints": ("topologyKey", "whenUnsatisfiable"),
}
_KEY_DEFAULTS = {"protocol": "TCP"}
# Lists of scalars kept as sets (listType=set).
_SETS = {"finalizers"}
# Maps and structs owned as a whole (mapType/structType=atomic): a label
# selector, a pod's nodeSelector, a Service's or an RC's selector.
_ATOMIC_FIELDS = {"selector", "nodeSelector", "matchLabels", "matchExpressions", "resources"}
# What no manager owns: identity and what the server sets.
_SKIPPED_META = {"name", "namespace", "uid", "resourceVersion", "creationTimestamp", "generation",
                 "selfLink", "managedFields", "deletionTimestamp", "deletionGracePeriodSeconds",
                 "generateName"}


class ApplyConflict(Exception):
    """Fields another manager owns with another value: [(manager entry, path)]."""

    def __init__(self, conflicts: list[tuple[dict, Path]]):
        super().__init__(conflict_message(conflicts))
        self.conflicts = conflicts


def _list_keys(path: Path, kind: str, name: str) -> tuple[str, ...] | None:
    if name == "ports":
        # A Service's ports by port and protocol; a container's by
        # containerPort and protocol (the Go types' listMapKeys).
        if kind == "Service" and path == ("f:spec",):
            return ("port", "protocol")
        return ("containerPort", "protocol")
    return _LIST_KEYS.get(name)


def _key_element(item: Any, keys: tuple[str, ...]) -> str | None:
    if not isinstance(item, dict):
        return None
    values = {}
    for k in keys:
        v = item.get(k, _KEY_DEFAULTS.get(k))
        if v is None:
            return None
        values[k] = v
    return "k:" + json.dumps(values, sort_keys=True, separators=(",", ":"))


def _value_element(value: Any) -> str:
    return "v:" + json.dumps(value, sort_keys=True, separators=(",", ":"))


def _top_fields(obj: dict) -> Iterable[tuple[str, Any]]:
    for name, value in obj.items():
        if name in ("apiVersion", "kind", "status"):
            continue
        if name == "metadata" and isinstance(value, dict):
            value = {k: v for k, v in value.items() if k not in _SKIPPED_META}
            if not value:
                continue
        yield name, value


def field_set(obj: dict, kind: str) -> set[Path]:
    """The fields OBJ sets: every leaf, every element of an associative list
    or set (an apply configuration's field set, structured-merge-diff's
    ToFieldSet). Status is not the main resource's."""
    out: set[Path] = set()
    for name, value in _top_fields(obj):
        _walk(value, ("f:" + name,), name, kind, out)
    return out


def _walk(value: Any, path: Path, name: str, kind: str, out: set[Path]) -> None:
    if isinstance(value, dict) and value and name not in _ATOMIC_FIELDS:
        for k, v in value.items():
            _walk(v, path + ("f:" + k,), k, kind, out)
        return
    if isinstance(value, list) and value:
        if name in _SETS:
            out.add(path)
            out.update(path + (_value_element(v),) for v in value)
            return
        keys = _list_keys(path[:-1], kind, name)
        elements = [_key_element(item, keys) for item in value] if keys else []
        if keys and all(elements):
            for element, item in zip(elements, value):
                out.add(path + (element,))
                for k, v in item.items():
                    _walk(v, path + (element, "f:" + k), k, kind, out)
            return
    out.add(path)          # a scalar, an atomic map or list, an empty one


def lookup(obj: Any, path: Path, kind: str) -> tuple[bool, Any]:
    """(found, value) of PATH in OBJ."""
    cur = obj
    for i, element in enumerate(path):
        if element.startswith("f:"):
            if not isinstance(cur, dict) or element[2:] not in cur:
                return False, None
            cur = cur[element[2:]]
        elif element.startswith("k:"):
            if not isinstance(cur, list):
                return False, None
            name = path[i - 1][2:]
            keys = _list_keys(path[:i - 1], kind, name) or ()
            match = [item for item in cur if _key_element(item, keys) == element]
            if not match:
                return False, None
            cur = match[0]
        elif element.startswith("v:"):
            want = json.loads(element[2:])
            if not isinstance(cur, list) or want not in cur:
                return False, None
            cur = want
        else:
            return False, None
    return True, cur


# -- FieldsV1 ---------------------------------------------------------------

def to_fields_v1(fields: set[Path]) -> dict:
    root: dict = {}
    for path in sorted(fields):
        node = root
        for element in path:
            node = node.setdefault(element, {})
    # A path that is itself a member and has members below it gets ".".
    for path in fields:
        node = root
        for element in path:
            node = node[element]
        if node and "." not in node:
            node["."] = {}
    return root


def from_fields_v1(doc: dict, prefix: Path = ()) -> set[Path]:
    out: set[Path] = set()
    for element, sub in (doc or {}).items():
        if element == ".":
            out.add(prefix)
            continue
        path = prefix + (element,)
        if not sub:
            out.add(path)
        else:
            out |= from_fields_v1(sub, path)
    return out


def path_string(path: Path) -> str:
    """A path as structured-merge-diff prints it: .spec.containers[name="c"].image"""
    out = []
    for element in path:
        if element.startswith("f:"):
            out.append("." + element[2:])
        elif element.startswith("k:"):
            keys = json.loads(element[2:])
            out.append("[" + ",".join(f"{k}={json.dumps(v)}" for k, v in keys.items()) + "]")
        elif element.startswith("v:"):
            out.append("[=" + element[2:] + "]")
    return "".join(out)


def _manager_label(entry: dict) -> str:
    label = json.dumps(entry.get("manager", ""))
    if entry.get("subresource"):
        label += f' with subresource {json.dumps(entry["subresource"])}'
    if entry.get("operation") == "Update":
        label += f" using {entry.get('apiVersion', '')}"
        if entry.get("time"):
            label += f" at {entry['time']}"
    return label


def conflict_message(conflicts: list[tuple[dict, Path]]) -> str:
    """kube-apiserver's message for an apply that conflicts (its fieldmanager's
    getConflictMessage)."""
    if len(conflicts) == 1:
        entry, path = conflicts[0]
        return f"Apply failed with 1 conflict: conflict with {_manager_label(entry)}: {path_string(path)}"
    by_manager: dict[str, list[Path]] = {}
    for entry, path in conflicts:
        by_manager.setdefault(_manager_label(entry), []).append(path)
    lines = []
    for label in sorted(by_manager):
        lines.append(f"conflicts with {label}:")
        lines += [f"- {path_string(p)}" for p in by_manager[label]]
    return f"Apply failed with {len(conflicts)} conflicts: " + "\n".join(lines)


def conflict_causes(conflicts: list[tuple[dict, Path]]) -> list[dict]:
    return [{"reason": "FieldManagerConflict", "message": f"conflict with {_manager_label(entry)}",
             "field": path_string(path)} for entry, path in conflicts]


# -- the record ----------------------------------------------------------------

def entries_problem(entries) -> str | None:
    """Why ENTRIES, managedFields a client wrote itself (kubectl's client-side
    apply upgrade does), cannot be stored; None when they can. Every later
    apply reads them, so their shape is checked as kube-apiserver decodes them."""
    if not isinstance(entries, list):
        return "metadata.managedFields: must be a list"
    for i, entry in enumerate(entries):
        where = f"metadata.managedFields[{i}]"
        if not isinstance(entry, dict):
            return f"{where}: must be an object"
        if not isinstance(entry.get("manager", ""), str) or len(entry.get("manager", "")) > 128:
            return f"{where}.manager: must be a string of at most 128 characters"
        if entry.get("operation") not in ("Apply", "Update"):
            return f'{where}.operation: Unsupported value: {json.dumps(entry.get("operation"))}: supported ' \
                   'values: "Apply", "Update"'
        if entry.get("fieldsType", "FieldsV1") != "FieldsV1":
            return f'{where}.fieldsType: Unsupported value: {json.dumps(entry.get("fieldsType"))}: ' \
                   'supported values: "FieldsV1"'
        if not _fields_doc(entry.get("fieldsV1", {})):
            return f"{where}.fieldsV1: must be an object of objects (FieldsV1)"
    return None


def _fields_doc(doc, depth: int = 0) -> bool:
    if not isinstance(doc, dict) or depth > 64:
        return False
    return all(isinstance(k, str) and _fields_doc(v, depth + 1) for k, v in doc.items())


def _entries(obj: dict | None) -> list[dict]:
    return copy.deepcopy(((obj or {}).get("metadata") or {}).get("managedFields") or [])


def _same_owner(entry: dict, manager: str, operation: str, subresource: str) -> bool:
    return (entry.get("manager") == manager and entry.get("operation") == operation
            and entry.get("subresource", "") == subresource)


def _replace_entry(entries: list[dict], manager: str, operation: str, api_version: str,
                   subresource: str, fields: set[Path], now: str) -> list[dict]:
    """ENTRIES with MANAGER's entry for OPERATION holding FIELDS (dropped when
    empty), where it was (a new one last); its time moves only when its
    fields change, so an update that changes nothing leaves the record as it
    was (and the object unchanged)."""
    at = next((i for i, e in enumerate(entries) if _same_owner(e, manager, operation, subresource)), None)
    old = entries[at] if at is not None else None
    out = [e for i, e in enumerate(entries) if i != at]
    if not fields:
        return out
    doc = to_fields_v1(fields)
    if old is not None and old.get("fieldsV1") == doc and old.get("apiVersion") == api_version:
        entry = old
    else:
        entry = {"manager": manager, "operation": operation, "apiVersion": api_version, "time": now,
                 "fieldsType": "FieldsV1", "fieldsV1": doc}
        if subresource:
            entry["subresource"] = subresource
    out.insert(len(out) if at is None else at, entry)
    return out


def _without(entries: list[dict], taken: set[Path], keep: tuple[str, str, str] | None) -> list[dict]:
    """ENTRIES with the fields in TAKEN no longer theirs (but KEEP's), empty ones dropped."""
    out = []
    for entry in entries:
        if keep and _same_owner(entry, *keep):
            out.append(entry)
            continue
        fields = from_fields_v1(entry.get("fieldsV1") or {})
        left = fields - taken
        if left == fields:
            out.append(entry)
        elif left:
            out.append(dict(entry, fieldsV1=to_fields_v1(left)))
    return out


def changed_fields(old: dict | None, new: dict, kind: str) -> set[Path]:
    """The fields of NEW that OLD did not have with the same value: what an
    update (create, replace, patch) takes ownership of."""
    out = set()
    for path in field_set(new, kind):
        found, before = lookup(old, path, kind) if old else (False, None)
        if not found or (not path[-1].startswith(("k:", "v:")) and before != lookup(new, path, kind)[1]):
            out.add(path)
    return out


def record_update(old: dict | None, new: dict, kind: str, manager: str, api_version: str,
                  now: str, subresource: str = "", entries: list[dict] | None = None) -> list[dict]:
    """NEW's managedFields after MANAGER's create/update/patch from OLD: it owns
    what it changed, taken from whoever owned it; fields NEW no longer has
    belong to nobody. ENTRIES: the record to start from, when the request
    wrote one itself (else OLD's)."""
    entries = copy.deepcopy(entries) if entries is not None else _entries(old)
    changed = changed_fields(old, new, kind)
    gone = (field_set(old, kind) - field_set(new, kind)) if old else set()
    entries = _without(entries, changed | gone, None)
    mine = next((e for e in entries if _same_owner(e, manager, "Update", subresource)), None)
    fields = (from_fields_v1(mine.get("fieldsV1") or {}) if mine else set()) | changed
    return _replace_entry(entries, manager, "Update", api_version, subresource, fields, now)


# -- server-side apply -------------------------------------------------------------

def _merge(live: Any, applied: Any, path: Path, name: str, kind: str) -> Any:
    if isinstance(applied, dict) and isinstance(live, dict) and name not in _ATOMIC_FIELDS:
        out = dict(live)
        for k, v in applied.items():
            out[k] = _merge(live.get(k), v, path + ("f:" + k,), k, kind)
        return out
    if isinstance(applied, list) and isinstance(live, list):
        if name in _SETS:
            return live + [v for v in applied if v not in live]
        keys = _list_keys(path[:-1], kind, name)
        if keys and all(_key_element(i, keys) for i in applied + live):
            out = list(live)
            index = {_key_element(i, keys): n for n, i in enumerate(out)}
            for item in applied:
                element = _key_element(item, keys)
                if element in index:
                    out[index[element]] = _merge(out[index[element]], item, path + (element,), "", kind)
                else:
                    index[element] = len(out)
                    out.append(copy.deepcopy(item))
            return out
    return copy.deepcopy(applied)


def _remove(obj: Any, path: Path, kind: str) -> None:
    """Remove the field, list element or set value PATH from OBJ (in place)."""
    found, parent = lookup(obj, path[:-1], kind)
    if not found:
        return
    element = path[-1]
    if element.startswith("f:") and isinstance(parent, dict):
        parent.pop(element[2:], None)
    elif element.startswith("k:") and isinstance(parent, list):
        keys = _list_keys(path[:-2], kind, path[-2][2:]) or ()
        parent[:] = [i for i in parent if _key_element(i, keys) != element]
    elif element.startswith("v:") and isinstance(parent, list):
        value = json.loads(element[2:])
        parent[:] = [v for v in parent if v != value]
    else:
        return
    if not parent and len(path) > 1:
        # A list or map left empty by the removal goes too (the applied
        # configuration no longer has it).
        _remove(obj, path[:-1], kind)


def apply(live: dict | None, applied: dict, kind: str, manager: str, api_version: str, now: str,
          force: bool = False) -> tuple[dict, list[dict]]:
    """Server-side apply of APPLIED by MANAGER onto LIVE (None: it is
    created). Returns (the object to store, its managedFields). Raises
    ApplyConflict unless FORCE."""
    entries = _entries(live)
    base = copy.deepcopy(live) if live is not None else {}
    new_set = field_set(applied, kind)
    others = [e for e in entries if not _same_owner(e, manager, "Apply", "")]
    conflicts: list[tuple[dict, Path]] = []
    taken: set[Path] = set()
    for entry in others:
        # Another operation of the same name is another owner (kube-apiserver's
        # manager identity is name, operation and subresource).
        owned = from_fields_v1(entry.get("fieldsV1") or {})
        for path in sorted(owned & new_set):
            if path[-1].startswith(("k:", "v:")):
                continue                  # an element's existence: shared, never a conflict
            found, value = lookup(base, path, kind)
            if found and value != lookup(applied, path, kind)[1]:
                conflicts.append((entry, path))
                taken.add(path)
    if conflicts and not force and not _upgrading_client_side_apply(live, manager, conflicts, kind):
        raise ApplyConflict(conflicts)
    mine = next((e for e in entries if _same_owner(e, manager, "Apply", "")), None)
    previous = from_fields_v1(mine.get("fieldsV1") or {}) if mine else set()
    still_owned = set().union(*[from_fields_v1(e.get("fieldsV1") or {}) for e in others]) - taken
    merged = _merge(base, {k: v for k, v in applied.items() if k not in ("status",)}, (), "", kind)
    # Fields this manager applied before and no longer applies, that nobody
    # else owns, are removed (deepest first, so an element goes with its fields).
    removed: list[Path] = []
    for path in sorted(previous - new_set - still_owned, key=len):
        if any(path[:len(r)] == r for r in removed):
            continue                      # gone with the element or map above it
        if any(p[:len(path)] == path and p != path for p in new_set | still_owned):
            continue                      # something below it is still someone's
        _remove(merged, path, kind)
        removed.append(path)
    entries = _without(entries, taken, (manager, "Apply", ""))
    entries = _replace_entry(entries, manager, "Apply", api_version, "", new_set, now)
    annotations = (merged.get("metadata") or {}).get("annotations") or {}
    if manager == "kubectl" and LAST_APPLIED in annotations:
        # kubectl's apply annotation follows the server-side apply, so that a
        # later client-side `kubectl apply` diffs against it (lastAppliedUpdater).
        config = copy.deepcopy(applied)
        config.get("metadata", {}).pop("managedFields", None)
        (config.get("metadata") or {}).get("annotations", {}).pop(LAST_APPLIED, None)
        annotations[LAST_APPLIED] = json.dumps(config, sort_keys=True, separators=(",", ":")) + "\n"
    return merged, entries


LAST_APPLIED = "kubectl.kubernetes.io/last-applied-configuration"


def _upgrading_client_side_apply(live: dict | None, manager: str, conflicts, kind: str) -> bool:
    """kube-apiserver's lastAppliedManager: `kubectl apply --server-side` on an
    object made by client-side `kubectl apply` does not conflict over the
    fields the client-side apply set (those of its last-applied annotation
    still holding that value): the apply takes them over."""
    if manager != "kubectl" or live is None:
        return False
    text = ((live.get("metadata") or {}).get("annotations") or {}).get(LAST_APPLIED)
    try:
        last = json.loads(text) if text else None
    except ValueError:
        return False
    if not isinstance(last, dict):
        return False
    allowed = {p for p in field_set(last, kind)
               if lookup(live, p, kind) == (True, lookup(last, p, kind)[1])}
    return all(path in allowed for _, path in conflicts)
