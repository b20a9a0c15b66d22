"""kubectl's client-side verbs: expose, scale, label.

kubectl works these out itself and then makes ordinary API calls: `expose`
reads the object and POSTs a Service it builds from its selector and ports;
`label` reads the object and sends the new labels; `scale` sends the new
replica count. The API server knows none of these verbs. So here: each verb
reads from the store, builds the change with kubectl's rules and messages
(pure functions, tested without a cluster), and writes through admission
(netemu.api: create, or update on the resourceVersion it read, read again and
retried on a conflict, as a patch is applied on the server), the path every
writer takes. `netemu expose|scale|label` (workloads_cli.py) and the Python
API (scripting.py) call them.
"""

from __future__ import annotations

import copy
import re

from netemu import api
from netemu.api import ApiError
from netemu.k8s import kinds, selectors
from netemu.store import registry
from netemu.store.base import Store

INT32_MAX = api.INT32_MAX
CONFLICT_RETRIES = 20


def _resource(kind: str) -> str:
    return kinds.BY_KIND[kind].qualified()


def _read(store: Store, kind: str, namespace: str | None, name: str) -> dict:
    obj = registry.get(store, kind, namespace, name)
    if obj is None:
        raise ApiError(f'{_resource(kind)} "{name}" not found', reason="NotFound")
    return obj


def _update_with(store: Store, kind: str, namespace: str | None, name: str, change, settings=None):
    """GET, CHANGE(obj) -> False when nothing is to be written, then an update
    on the resourceVersion read (admission's), again from a fresh read when
    another writer came first. Returns (stored object, whether it was written)."""
    for _ in range(CONFLICT_RETRIES):
        current = _read(store, kind, namespace, name)
        changed = copy.deepcopy(current)
        if change(changed) is False:
            return current, False
        try:
            stored, how = api.update(store, changed, settings)
            return stored, how != "unchanged"
        except ApiError as err:
            if err.reason != "Conflict":
                raise
    raise ApiError(f'Operation cannot be fulfilled on {_resource(kind)} "{name}": too many concurrent changes',
                   reason="Conflict")


# -- expose -----------------------------------------------------------------------

def service_for(src: dict, port: int | None = None, target_port=None, type_: str = "ClusterIP",
                name_override: str | None = None, protocol: str = "TCP") -> dict:
    """The Service `kubectl expose` builds for SRC (a pod, service, RC, RS or
    Deployment): its selector, its labels, and the port given or every
    container port of its pod template."""
    kind, meta = src["kind"], src["metadata"]
    name, namespace = meta["name"], meta.get("namespace", "default")
    spec = src.get("spec") or {}
    template = spec.get("template") or {}
    if kind == "Pod":
        selector = meta.get("labels") or None
        pod_spec = spec
    elif kind == "Service":
        selector = spec.get("selector") or None
        pod_spec = {}
    elif kind in ("ReplicationController", "ReplicaSet", "Deployment"):
        raw = selectors.workload_selector(src)
        selector = selectors.selector_as_map(raw)
        if raw and selector is None:
            raise ApiError(f"couldn't convert expressions in the selector of {kinds.BY_KIND[kind].singular} "
                           f'"{name}" to a map: kubectl expose needs a map selector', reason="BadRequest")
        pod_spec = template.get("spec") or {}
    else:
        raise ApiError(f"cannot expose a {kind}", reason="BadRequest")
    if not selector:
        raise ApiError(f"couldn't retrieve selectors via --selector flag or introspection: "
                       f'the {kinds.BY_KIND[kind].singular} "{name}" has no selector', reason="BadRequest")
    labels = meta.get("labels") or (
        (template.get("metadata") or {}).get("labels") if kind == "ReplicationController" else None)
    if port is not None:
        ports = [{"port": int(port), "protocol": protocol,
                  "targetPort": port_value(target_port) if target_port is not None else int(port)}]
    else:
        # Introspection as kubectl does: every container port of the pod template.
        found = [p for c in pod_spec.get("containers") or [] for p in c.get("ports") or []]
        if kind == "Service":
            found = [{"containerPort": p["port"], "protocol": p.get("protocol", "TCP"), "name": p.get("name")}
                     for p in spec.get("ports") or []]
        if not found:
            raise ApiError("couldn't find port via --port flag or introspection", reason="BadRequest")
        ports = []
        for i, p in enumerate(found):
            entry = {"port": int(p["containerPort"]), "protocol": p.get("protocol", "TCP"),
                     "targetPort": port_value(target_port) if target_port is not None else int(p["containerPort"])}
            if len(found) > 1:
                entry["name"] = p.get("name") or f"port-{i + 1}"
            ports.append(entry)
    svc = {"apiVersion": "v1", "kind": "Service",
           "metadata": {"name": name_override or name, "namespace": namespace},
           "spec": {"ports": ports, "selector": dict(selector), "type": type_}}
    if labels:
        svc["metadata"]["labels"] = dict(labels)
    return svc


def port_value(value):
    """A targetPort is a number or a container port's name."""
    if isinstance(value, int):
        return value
    return int(value) if str(value).isdigit() else str(value)


def expose(store: Store, kind: str, name: str, port: int | None = None, target_port=None,
           type_: str = "ClusterIP", name_override: str | None = None, protocol: str = "TCP",
           *, namespace: str = "default", settings=None) -> dict:
    """`kubectl expose KIND NAME --port=... [--target-port] [--type] [--name]`:
    GET the object, POST the Service (admission allocates its cluster IP, node
    ports and balancer address). Returns the Service as stored."""
    kind = kinds.resolve(kind)
    src = _read(store, kind, namespace, name)
    return api.create(store, service_for(src, port, target_port, type_, name_override, protocol), settings)


# -- scale -------------------------------------------------------------------------

def scale_field(kind: str) -> str:
    """The field `kubectl scale` sets: the kind's /scale field, a Job's
    parallelism (older kubectl scaled Jobs so)."""
    field = "parallelism" if kind == "Job" else kinds.BY_KIND[kind].scale_field
    if field is None:
        raise ApiError(f"cannot scale a {kind}", reason="BadRequest")
    return field


def check_replicas(replicas: int) -> None:
    if replicas < 0:
        raise ApiError("The --replicas=COUNT flag is required, and COUNT must be greater than or equal to 0",
                       reason="BadRequest")
    if replicas > INT32_MAX:
        # spec.replicas is an int32: the API server cannot even decode more.
        raise ApiError(f'Scale in version "v1" cannot be handled as a Scale: json: cannot unmarshal number '
                       f"{replicas} into Go struct field ScaleSpec.spec.replicas of type int32",
                       reason="BadRequest")


def scale(store: Store, kind: str, name: str, replicas: int, *, namespace: str = "default",
          settings=None) -> dict:
    """`kubectl scale KIND NAME --replicas=N`: the new count written through
    admission (which bumps metadata.generation when the spec changes)."""
    kind = kinds.resolve(kind)
    check_replicas(replicas)
    field = scale_field(kind)

    def change(obj: dict):
        if (obj.get("spec") or {}).get(field) == replicas:
            return False
        obj.setdefault("spec", {})[field] = replicas

    obj, _ = _update_with(store, kind, namespace, name, change, settings)
    return obj


# -- label -------------------------------------------------------------------------

_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")


def parse_label_changes(changes: list[str]) -> tuple[dict[str, str], list[str]]:
    """["disk=ssd", "gpu-"] -> ({"disk": "ssd"}, ["gpu"]), checked as kubectl does."""
    sets: dict[str, str] = {}
    removes: list[str] = []
    for change in changes:
        if "=" in change:
            k, v = change.split("=", 1)
            if not _LABEL_KEY.match(k):
                raise ApiError(f"invalid label spec: {change}", reason="BadRequest")
            if not _LABEL_VALUE.match(v):
                raise ApiError(f"invalid label value: \"{change}\": a valid label must be an empty string "
                               "or consist of alphanumeric characters, '-', '_' or '.', and must start "
                               "and end with an alphanumeric character", reason="BadRequest")
            sets[k] = v
        elif change.endswith("-") and _LABEL_KEY.match(change[:-1]):
            removes.append(change[:-1])
        else:
            raise ApiError(f"invalid label spec: {change}", reason="BadRequest")
    both = set(sets) & set(removes)
    if both:
        raise ApiError(f"can not both modify and remove a label in the same command: {sorted(both)[0]}",
                       reason="BadRequest")
    return sets, removes


def relabelled(labels: dict[str, str], sets: dict[str, str], removes: list[str],
               overwrite: bool) -> dict[str, str]:
    """LABELS after the changes; changing a value needs OVERWRITE (--overwrite)."""
    out = dict(labels)
    for k, v in sets.items():
        if k in out and out[k] != v and not overwrite:
            raise ApiError(f"'{k}' already has a value ({out[k]}), and --overwrite is false", reason="BadRequest")
        out[k] = v
    for k in removes:
        out.pop(k, None)
    return out


def label(store: Store, kind: str, name: str, changes: list[str], *, overwrite: bool = False,
          namespace: str = "default", settings=None) -> tuple[dict, bool]:
    """`kubectl label KIND NAME k=v k2-`: returns (object, whether it changed);
    nothing is written when nothing changes (kubectl's "not labeled")."""
    kind = kinds.resolve(kind)
    api._writable(kind)
    sets, removes = parse_label_changes(changes)
    ns = namespace if kinds.BY_KIND[kind].namespaced else None

    def change(obj: dict):
        before = obj["metadata"].get("labels") or {}
        after = relabelled(before, sets, removes, overwrite)
        if after == before:
            return False
        if after:
            obj["metadata"]["labels"] = after
        else:
            obj["metadata"].pop("labels", None)

    return _update_with(store, kind, ns, name, change, settings)
