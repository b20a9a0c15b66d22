"""The API server's admission role: what happens to an object on its way into the store.

kubectl talks to the API server, which defaults and checks an object, allocates
what the cluster must hand out (a Service's cluster IP and node ports, a load
balancer address), stores it, and deletes it again with its dependents. This module
does that for netemu's CLI (and, later, for an HTTP front end):

  create_or_update  create, or update in place as `kubectl apply` does
  create, update    an HTTP POST and PUT (update: optimistic concurrency)
  delete            delete, cascading to owned objects as the garbage collector does
                    (or orphaning them)
  delete_pod        the one correct way to delete a pod (see there)

kubectl's client-side verbs (expose, scale, label) are not here: like kubectl,
netemu works them out on the client side and writes through create and update
(netemu.kubectl_verbs).

Allocation is race-free across processes without a lock: every allocated address
or port is one key under /registry/ranges/..., created only if absent (the store's
conditional write), so two processes asking at once cannot both win the same one.
(Kubernetes keeps one bitmap per range and updates it by compare-and-swap; one key
per item is the same guarantee with simpler conflicts.) Keys are freed on delete.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import copy
import ipaddress
import json
import random
import re

from netemu.k8s import kinds, ownership
from netemu.store import registry
from netemu.store.base import Conflict, Store
from netemu.topology import manifests, names, schema
from netemu.topology.model import TopologyError

SERVICE_IPS = "/registry/ranges/serviceips/"
NODE_PORTS = "/registry/ranges/servicenodeports/"
LB_IPS = "/registry/ranges/loadbalancerips/"

DEFAULT_SERVICE_RANGE = "10.96.0.0/16"
DEFAULT_NODE_PORTS = (30000, 32767)


class ApiError(Exception):
    """A request the API server refuses. REASON is Kubernetes' status reason
    (Invalid, AlreadyExists, NotFound, BadRequest); str() is kubectl's message."""

    def __init__(self, message: str, reason: str = "Invalid"):
        super().__init__(message)
        self.reason = reason


# -- settings ------------------------------------------------------------------

def _service_range(settings) -> ipaddress.IPv4Network:
    return ipaddress.ip_network(str(getattr(settings, "service_range", None) or DEFAULT_SERVICE_RANGE),
                                strict=False)


def _node_port_range(settings) -> tuple[int, int]:
    value = getattr(settings, "node_port_range", None) or DEFAULT_NODE_PORTS
    if isinstance(value, str):
        low, _, high = value.partition("-")
        return int(low), int(high)
    if isinstance(value, range):
        return value.start, value.stop - 1
    low, high = value
    return int(low), int(high)


def _lb_pool(settings) -> list[str]:
    """Addresses a LoadBalancer Service may get: a CIDR ("172.30.0.240/28": every
    host address), a range ("172.30.0.240-172.30.0.250") or a list of either."""
    pool = getattr(settings, "lb_pool", None)
    if not pool:
        return []
    items = [pool] if isinstance(pool, str) else list(pool)
    out: list[str] = []
    for item in items:
        item = str(item)
        if "-" in item:
            low, high = (ipaddress.ip_address(x.strip()) for x in item.split("-", 1))
            out += [str(ipaddress.ip_address(i)) for i in range(int(low), int(high) + 1)]
        elif "/" in item:
            net = ipaddress.ip_network(item, strict=False)
            hosts = list(net.hosts()) if net.num_addresses > 2 else list(net)
            out += [str(h) for h in hosts]
        else:
            out.append(str(ipaddress.ip_address(item)))
    return out


# -- allocation ------------------------------------------------------------------

def _claim(store: Store, key: str, owner: str) -> bool:
    """Take KEY for OWNER ("namespace/name"); True when it is now ours."""
    if store.create(key, {"service": owner}) is not None:
        return True
    held = store.get(key)
    return held is not None and held.value.get("service") == owner


def _release(store: Store, key: str, owner: str) -> None:
    held = store.get(key)
    if held is not None and held.value.get("service") == owner:
        try:
            store.delete(key, expect_revision=held.mod_revision)
        except Conflict:
            pass


def _allocate_from(store: Store, prefix: str, size: int, item_at, owner: str) -> str | None:
    """Claim a random free item ITEM_AT(i), 0 <= i < SIZE. Random, as Kubernetes
    picks, so a deleted-then-recreated Service does not keep landing on the same
    address; a few random probes, then a scan from a random start once the range
    is nearly full."""
    if size <= 0:
        return None
    taken = {kv.key[len(prefix):] for kv in store.list(prefix)}

    def attempt(item: str) -> bool:
        if item in taken:
            return False
        if store.create(prefix + item, {"service": owner}) is not None:
            return True
        taken.add(item)            # someone else just took it
        return False

    for _ in range(32):
        item = item_at(random.randrange(size))
        if attempt(item):
            return item
    start = random.randrange(size)
    for k in range(size):
        item = item_at((start + k) % size)
        if attempt(item):
            return item
    return None


def _service_ip_space(net: ipaddress.IPv4Network) -> tuple[int, object]:
    """(count, index -> address) of the allocatable cluster IPs. Network and
    broadcast addresses are unusable; the first host address is the `kubernetes`
    service's (10.96.0.1), which the API server reserves."""
    first = int(net.network_address) + 2
    count = max(0, net.num_addresses - 3)
    return count, lambda i: str(ipaddress.IPv4Address(first + i))


def _valid_service_ip(net: ipaddress.IPv4Network, addr) -> bool:
    count, _ = _service_ip_space(net)
    return 0 <= int(addr) - (int(net.network_address) + 2) < count


KUBERNETES_SERVICE = "default/kubernetes"


def kubernetes_service_ip(settings) -> str:
    """The reserved first host address of the service range, the `kubernetes`
    Service's (apiserver/bootstrap.py); no other Service may have it."""
    return str(_service_range(settings).network_address + 1)


class _Allocation:
    """What one Service request claimed, so a failure can give it all back."""

    def __init__(self, store: Store, owner: str):
        self.store, self.owner, self.keys = store, owner, []

    def claim(self, key: str) -> bool:
        """Take KEY; a key this Service already holds (its previous version's)
        counts as ours but is not given back on rollback."""
        held = self.store.get(key)
        if held is not None:
            return held.value.get("service") == self.owner
        if _claim(self.store, key, self.owner):
            self.keys.append(key)
            return True
        return False

    def allocate(self, prefix: str, size: int, item_at) -> str | None:
        item = _allocate_from(self.store, prefix, size, item_at, self.owner)
        if item is not None:
            self.keys.append(prefix + item)
        return item

    def rollback(self) -> None:
        for key in self.keys:
            _release(self.store, key, self.owner)


def _allocate_service(store: Store, svc: dict, old: dict | None, settings) -> _Allocation:
    """Fill svc.spec.clusterIP(s), nodePorts and the load balancer address."""
    meta, spec = svc["metadata"], svc.setdefault("spec", {})
    owner = f"{meta.get('namespace', 'default')}/{meta['name']}"
    name = meta["name"]
    alloc = _Allocation(store, owner)
    old_spec = (old or {}).get("spec") or {}
    try:
        spec.setdefault("type", "ClusterIP")
        spec.setdefault("sessionAffinity", "None")
        svc_type = spec["type"]
        if svc_type == "ExternalName":
            return alloc
        # -- cluster IP
        net = _service_range(settings)
        want = spec.get("clusterIP") or (spec.get("clusterIPs") or [None])[0]
        if old_spec.get("clusterIP"):
            if want and want != old_spec["clusterIP"]:
                raise ApiError(f'Service "{name}" is invalid: spec.clusterIPs[0]: Invalid value: '
                               f'[]string{{"{want}"}}: may not change once set')
            want = old_spec["clusterIP"]
        if want == "None":
            pass                                  # headless: no virtual IP
        elif want:
            try:
                addr = ipaddress.ip_address(want)
            except ValueError:
                raise ApiError(f'Service "{name}" is invalid: spec.clusterIPs[0]: Invalid value: '
                               f'"{want}": must be a valid IP address') from None
            reserved = owner == KUBERNETES_SERVICE and want == kubernetes_service_ip(settings)
            if addr not in net or not (_valid_service_ip(net, addr) or reserved):
                raise ApiError(
                    f'Service "{name}" is invalid: spec.clusterIPs: Invalid value: []string{{"{want}"}}: '
                    f"failed to allocate IP {want}: the provided IP ({want}) is not in the valid range. "
                    f"The range of valid IPs is {net}")
            if not alloc.claim(SERVICE_IPS + want):
                raise ApiError(
                    f'Service "{name}" is invalid: spec.clusterIPs: Invalid value: []string{{"{want}"}}: '
                    f"failed to allocate IP {want}: provided IP is already allocated")
        else:
            want = alloc.allocate(SERVICE_IPS, *_service_ip_space(net))
            if want is None:
                raise ApiError(f'Service "{name}" is invalid: failed to allocate a serviceIP: range is full')
        spec["clusterIP"] = want
        spec["clusterIPs"] = [want]
        if want != "None":
            spec.setdefault("ipFamilies", ["IPv4"])
            spec.setdefault("ipFamilyPolicy", "SingleStack")
        # -- node ports
        ports = spec.get("ports") or []
        if svc_type in ("NodePort", "LoadBalancer"):
            spec.setdefault("externalTrafficPolicy", "Cluster")
            low, high = _node_port_range(settings)
            previous = {(p.get("port"), p.get("protocol", "TCP")): p.get("nodePort")
                        for p in old_spec.get("ports") or [] if p.get("nodePort")}
            for i, port in enumerate(ports):
                requested = port.get("nodePort") or previous.get((port.get("port"), port.get("protocol", "TCP")))
                if requested:
                    requested = int(requested)
                    if not low <= requested <= high:
                        raise ApiError(
                            f'Service "{name}" is invalid: spec.ports[{i}].nodePort: Invalid value: '
                            f"{requested}: provided port is not in the valid range. "
                            f"The range of valid ports is {low}-{high}")
                    if not alloc.claim(f"{NODE_PORTS}{requested}"):
                        raise ApiError(
                            f'Service "{name}" is invalid: spec.ports[{i}].nodePort: Invalid value: '
                            f"{requested}: provided port is already allocated")
                    port["nodePort"] = requested
                else:
                    got = alloc.allocate(NODE_PORTS, high - low + 1, lambda i: str(low + i))
                    if got is None:
                        raise ApiError(f'Service "{name}" is invalid: spec.ports[{i}].nodePort: '
                                       "failed to allocate a nodePort: range is full")
                    port["nodePort"] = int(got)
        else:
            for i, port in enumerate(ports):
                if port.get("nodePort"):
                    raise ApiError(f'Service "{name}" is invalid: spec.ports[{i}].nodePort: Forbidden: '
                                   f"may not be used when `type` is '{svc_type}'")
        # -- load balancer address (what a cloud provider's controller would assign)
        if svc_type == "LoadBalancer":
            pool = _lb_pool(settings)
            old_ingress = (((old or {}).get("status") or {}).get("loadBalancer") or {}).get("ingress") or []
            requested = spec.get("loadBalancerIP") or (old_ingress[0].get("ip") if old_ingress else None)
            ip = None
            if requested:
                if pool and requested not in pool:
                    raise ApiError(f'Service "{name}" is invalid: spec.loadBalancerIP: Invalid value: '
                                   f'"{requested}": not in the load balancer pool')
                if not alloc.claim(LB_IPS + requested):
                    raise ApiError(f'Service "{name}" is invalid: spec.loadBalancerIP: Invalid value: '
                                   f'"{requested}": provided IP is already allocated')
                ip = requested
            elif pool:
                ip = alloc.allocate(LB_IPS, len(pool), pool.__getitem__)
            # With no pool (or a full one) the address stays <pending>, as on a
            # cluster without a cloud provider.
            svc.setdefault("status", {})["loadBalancer"] = {"ingress": [{"ip": ip}]} if ip else {}
        return alloc
    except BaseException:
        alloc.rollback()
        raise


def _service_keys(svc: dict) -> list[str]:
    """The allocation keys a stored Service holds."""
    spec = svc.get("spec") or {}
    keys = []
    if spec.get("clusterIP") and spec["clusterIP"] != "None":
        keys.append(SERVICE_IPS + spec["clusterIP"])
    keys += [f"{NODE_PORTS}{p['nodePort']}" for p in spec.get("ports") or [] if p.get("nodePort")]
    for ing in ((svc.get("status") or {}).get("loadBalancer") or {}).get("ingress") or []:
        if ing.get("ip"):
            keys.append(LB_IPS + ing["ip"])
    return keys


def _free_service(store: Store, svc: dict, keep: dict | None = None) -> None:
    """Release SVC's allocations, except those KEEP (its new version) still holds."""
    meta = svc["metadata"]
    owner = f"{meta.get('namespace', 'default')}/{meta['name']}"
    still = set(_service_keys(keep)) if keep else set()
    for k in _service_keys(svc):
        if k not in still:
            _release(store, k, owner)


# -- create / update -------------------------------------------------------------

INT32_MAX = 2 ** 31 - 1


def admit(obj: dict) -> dict:
    """OBJ defaulted and validated as the API server does on every write, so no
    writer (the CLI, `up`, code building objects, a future HTTP front end) can
    store what the loader would refuse: an env var name with '=' or a NUL in
    argv would otherwise reach a kubelet and crash it. Kinds the manifest schema
    does not describe (Node, Event, Endpoints: written by netemu itself) pass as
    they are. Raises ApiError (Invalid) with the API server's wording."""
    kind = obj.get("kind")
    if kind not in schema.SPEC_STRUCTS and kind not in kinds.BY_KIND:
        return obj
    try:
        if kind in schema.SPEC_STRUCTS:
            admitted, _ = manifests.normalize_object(obj, "", "")
        else:
            admitted = _admit_metadata(obj)
    except TopologyError as err:
        meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
        name = meta.get("name") if isinstance(meta.get("name"), str) else ""
        detail = f"{err.field}: {err.problem}" if err.field else err.problem
        raise ApiError(f'{kind} "{name}" is invalid: {detail}') from None
    if kind == "Pod":
        add_default_tolerations(admitted.setdefault("spec", {}))
    if kind == "ConfigMap":
        _check_config_map(admitted)
    if kind == "Namespace":
        # The API server labels every namespace with its name (so selectors can
        # pick namespaces by name) and gives it the "kubernetes" finalizer.
        meta = admitted["metadata"]
        meta["labels"] = {**(meta.get("labels") or {}), NAMESPACE_NAME_LABEL: meta["name"]}
        admitted.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
    return admitted


NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"

# kube-apiserver's DefaultTolerationSeconds admission (on by default): a pod that
# does not tolerate not-ready and unreachable NoExecute taints gets these, so
# taint eviction deletes it 300 s after its node is lost (see
# controllers/nodelifecycle.py), not at once.
DEFAULT_TOLERATION_SECONDS = 300
DEFAULT_TOLERATIONS = tuple(
    {"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": DEFAULT_TOLERATION_SECONDS}
    for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"))


def add_default_tolerations(spec: dict) -> None:
    """DefaultTolerationSeconds on a pod SPEC, in place: each default toleration
    whose taint no toleration already covers (its key or an empty one, effect
    NoExecute or empty)."""
    have = spec.get("tolerations") or []
    added = [dict(t) for t in DEFAULT_TOLERATIONS
             if not any((x.get("key") or "") in ("", t["key"]) and (x.get("effect") or "") in ("", "NoExecute")
                        for x in have if isinstance(x, dict))]
    if added:
        spec["tolerations"] = list(have) + added

# A ConfigMap's data and binaryData together, at most (kube's MaxSecretSize).
CONFIG_MAP_MAX_BYTES = 1024 * 1024
_CONFIG_KEY = re.compile(r"[-._a-zA-Z0-9]+")


def _check_config_map(obj: dict) -> None:
    """A ConfigMap as kube-apiserver's validation takes it: data (strings) and
    binaryData (base64) under valid config keys, no key in both, 1 MiB in all."""
    name = obj["metadata"].get("name", "")
    total = 0
    seen: set[str] = set()
    for field in ("data", "binaryData"):
        values = obj.get(field)
        if values is None:
            continue
        if not isinstance(values, dict):
            raise ApiError(f'ConfigMap "{name}" is invalid: {field}: must be an object of strings')
        for key, value in values.items():
            where = f"{field}[{key}]"
            if not _CONFIG_KEY.fullmatch(key) or len(key) > 253 or key in (".", ".."):
                raise ApiError(f'ConfigMap "{name}" is invalid: {where}: Invalid value: {json.dumps(key)}: a '
                               "valid config key must consist of alphanumeric characters, '-', '_' or '.' "
                               "(e.g. 'key.name',  or 'KEY_NAME',  or 'key-name', regex used for validation "
                               "is '[-._a-zA-Z0-9]+')")
            if not isinstance(value, str):
                raise ApiError(f'ConfigMap "{name}" is invalid: {where}: must be a string')
            if key in seen:
                raise ApiError(f'ConfigMap "{name}" is invalid: {where}: Invalid value: {json.dumps(key)}: '
                               "duplicate of key present in data")
            seen.add(key)
            if field == "binaryData":
                try:
                    value = base64.b64decode(value, validate=True)
                except (binascii.Error, ValueError):
                    raise ApiError(f'ConfigMap "{name}" is invalid: {where}: must be base64') from None
            total += len(key) + len(value)
    if total > CONFIG_MAP_MAX_BYTES:
        raise ApiError(f'ConfigMap "{name}" is invalid: []: Too long: must have at most '
                       f"{CONFIG_MAP_MAX_BYTES} bytes")
    if "immutable" in obj and not isinstance(obj["immutable"], bool):
        raise ApiError(f'ConfigMap "{name}" is invalid: immutable: must be true or false')
    extra = set(obj) - {"apiVersion", "kind", "metadata", "data", "binaryData", "immutable"}
    if extra:
        raise ApiError(f'ConfigMap "{name}" is invalid: {sorted(extra)[0]}: unknown field')


def protected(kind: str, namespace: str | None, name: str) -> bool:
    """The cluster's own settings (kube-system/netemu-cluster): netemu writes
    them (netemu.clusterconfig), no client does."""
    from netemu import clusterconfig
    return kind == "ConfigMap" and (namespace, name) == (clusterconfig.NAMESPACE, clusterconfig.NAME)


def _refuse_protected(kind: str, namespace: str | None, name: str) -> None:
    if protected(kind, namespace, name):
        raise ApiError(f'configmaps "{name}" is forbidden: the cluster\'s settings are changed with netemu '
                       "(netemu link set, node add), not through the API", reason="Forbidden")


def _admit_metadata(obj: dict) -> dict:
    """The kinds the manifest schema does not describe (Node, Event, Endpoints,
    EndpointSlice): their metadata is still checked as ObjectMeta (names, labels,
    annotations), with the loader's decoder and rules, and their spec and status
    must be objects, so that no writer can store what every reader would trip on."""
    obj = copy.deepcopy(obj)
    kind = obj["kind"]
    origin = manifests.Origin("", manifests.object_label(kind, obj.get("metadata")))
    if not isinstance(obj.get("metadata"), dict):
        raise origin.error("metadata", f"must be an object, got {manifests.describe(obj.get('metadata'))}")
    obj["metadata"] = manifests._decode(obj["metadata"], "ObjectMeta", "metadata", origin)
    manifests._metadata(obj, kinds.BY_KIND[kind].namespaced, names.dns1123_subdomain, origin)
    for field in ("spec", "status"):
        if field in obj and not isinstance(obj[field], dict):
            raise origin.error(field, f"must be an object, got {manifests.describe(obj[field])}")
    return obj


def meta_name(obj: dict) -> str:
    return (obj.get("metadata") or {}).get("name", "")


def _writable(kind: str) -> None:
    """Refuse a change to a kind served for reading only (netemu writes those)."""
    if kinds.BY_KIND[kind].read_only:
        raise ApiError(f"{_resource(kind)}: the server does not allow this method on the requested resource "
                       "(netemu writes them itself)", reason="MethodNotAllowed")


def create_or_update(store: Store, obj: dict, settings=None) -> tuple[dict, str]:
    """Store OBJ, as `kubectl apply`: defaulted and validated first (admit), so
    a raw manifest object is fine as well as one from the topology loader.
    Returns (stored object, "created" | "configured" | "unchanged")."""
    obj = copy.deepcopy(obj)
    kind = obj.get("kind")
    if kind not in kinds.BY_KIND:
        raise ApiError(f'no matches for kind "{kind}"', reason="BadRequest")
    obj = admit(obj)
    meta = obj.setdefault("metadata", {})
    if not meta.get("name"):
        raise ApiError(f"{kind}: metadata.name: Required value: name is required")
    if kinds.BY_KIND[kind].namespaced:
        meta.setdefault("namespace", "default")
    ns = meta.get("namespace")
    for _ in range(10):
        old = registry.get(store, kind, ns, meta["name"])
        if old is None:
            try:
                return _create(store, obj, settings), "created"
            except Conflict:
                continue                 # created meanwhile: update it instead
        try:
            return _update(store, old, obj, settings)
        except Conflict:
            continue                     # changed meanwhile: read again
    raise ApiError(f'{kinds.BY_KIND[kind].singular} "{meta["name"]}": too many concurrent changes',
                   reason="Conflict")


def create(store: Store, obj: dict, settings=None, managed=None) -> dict:
    """Store a new OBJ (an HTTP POST): admitted as create_or_update does, but an
    existing object of that name is an error (AlreadyExists), never updated.
    MANAGED(old, new) -> managedFields: the API server's record of who set
    which field (netemu.k8s.managedfields), written with the object."""
    obj = admit(copy.deepcopy(obj))
    kind, meta = obj.get("kind"), obj.setdefault("metadata", {})
    if kind not in kinds.BY_KIND:
        raise ApiError(f'no matches for kind "{kind}"', reason="BadRequest")
    if not meta.get("name") and not meta.get("generateName"):
        raise ApiError(f"{kind}: metadata.name: Required value: name or generateName is required")
    if kinds.BY_KIND[kind].namespaced:
        meta.setdefault("namespace", "default")
    _refuse_protected(kind, meta.get("namespace"), meta.get("name", ""))
    try:
        return _create(store, obj, settings, managed)
    except Conflict:
        raise ApiError(f'{_resource(kind)} "{meta["name"]}" already exists', reason="AlreadyExists") from None


def update(store: Store, obj: dict, settings=None, managed=None) -> tuple[dict, str]:
    """Replace a stored object with OBJ (an HTTP PUT): admitted as on create; a
    metadata.resourceVersion, when given, must still be the stored one
    (Conflict otherwise), as optimistic concurrency on the API server works."""
    raw_meta = obj.get("metadata") if isinstance(obj.get("metadata"), dict) else {}
    want = raw_meta.get("resourceVersion")       # read before admit, which keeps only user fields
    obj = admit(copy.deepcopy(obj))
    kind, meta = obj.get("kind"), obj.setdefault("metadata", {})
    ns = meta.get("namespace", "default") if kinds.BY_KIND[kind].namespaced else None
    _refuse_protected(kind, ns, meta.get("name", ""))
    old = registry.get(store, kind, ns, meta.get("name", ""))
    if old is None:
        raise ApiError(f'{_resource(kind)} "{meta.get("name")}" not found', reason="NotFound")
    stale = (f'Operation cannot be fulfilled on {_resource(kind)} "{meta["name"]}": the object has been '
             "modified; please apply your changes to the latest version and try again")
    if want and str(want) != old["metadata"]["resourceVersion"]:
        raise ApiError(stale, reason="Conflict")
    try:
        return _update(store, old, obj, settings, managed)
    except Conflict:
        raise ApiError(stale, reason="Conflict") from None


JOB_UID_LABEL = "batch.kubernetes.io/controller-uid"


def _job_labels(uid: str, name: str) -> dict[str, str]:
    return {JOB_UID_LABEL: uid, "batch.kubernetes.io/job-name": name, "controller-uid": uid, "job-name": name}


def _generate_job_selector(job: dict) -> str | None:
    """A batch/v1 Job without its own selector gets one on create, as the API
    server's Job strategy generates it: its uid as a label of its pod template,
    and a selector for that label (so `kubectl logs job/NAME` and `describe`
    find its pods). Returns the uid chosen, None for a manual selector."""
    spec = job.get("spec") or {}
    if spec.get("manualSelector") or spec.get("selector") is not None:
        return None
    import uuid

    uid = str(uuid.uuid4())
    template = spec.setdefault("template", {})
    tmeta = template.setdefault("metadata", {})
    tmeta["labels"] = {**(tmeta.get("labels") or {}), **_job_labels(uid, job["metadata"]["name"])}
    spec["selector"] = {"matchLabels": {JOB_UID_LABEL: uid}}
    return uid


def _create(store: Store, obj: dict, settings, managed=None) -> dict:
    obj["metadata"]["generation"] = 1
    if obj["kind"] == "Namespace":
        obj["status"] = {"phase": "Active"}
    uid = _generate_job_selector(obj) if obj["kind"] == "Job" else None
    alloc = _allocate_service(store, obj, None, settings) if obj["kind"] == "Service" else None
    if managed is not None:
        obj["metadata"]["managedFields"] = managed(None, obj)
    try:
        return registry.create(store, obj, uid=uid)
    except BaseException:
        if alloc:
            alloc.rollback()
        raise


# What an update may change, per part; the rest of the stored object is kept.
_USER_META = ("labels", "annotations")


def system_annotations() -> tuple[str, ...]:
    """Annotations the cluster's own components write on objects (the kubelet's
    netemu.io/sandbox on a Pod, the overlay daemon's flannel keys on a Node): an
    update that does not give them keeps them, as kubectl apply's three-way
    merge keeps what it never applied."""
    from netemu.node.sandbox import ANNOTATION
    from netemu.overlay import stats
    return (ANNOTATION, *stats.NODE_ANNOTATIONS, stats.DATA_PATH_ANNOTATION)


def _update(store: Store, old: dict, new: dict, settings, managed=None) -> tuple[dict, str]:
    kind = old["kind"]
    merged = copy.deepcopy(old)
    for field in _USER_META:
        if new["metadata"].get(field):
            merged["metadata"][field] = new["metadata"][field]
        else:
            merged["metadata"].pop(field, None)
    kept = {k: v for k, v in (old["metadata"].get("annotations") or {}).items()
            if k in system_annotations() and k not in (new["metadata"].get("annotations") or {})}
    if kept:
        merged["metadata"]["annotations"] = {**(merged["metadata"].get("annotations") or {}), **kept}
    new_spec = copy.deepcopy(new.get("spec") or {})
    if kind == "Pod":
        # A pod's spec is immutable once created, apart from what its kubelet or
        # scheduler set (nodeName); the API server refuses other changes.
        comparable = {k: v for k, v in (old.get("spec") or {}).items() if k != "nodeName"}
        if {k: v for k, v in new_spec.items() if k != "nodeName"} != comparable:
            raise ApiError(f'Pod "{old["metadata"]["name"]}" is invalid: spec: Forbidden: pod updates '
                           "may not change fields other than `spec.containers[*].image`, "
                           "`spec.initContainers[*].image`, `spec.activeDeadlineSeconds`, "
                           "`spec.tolerations` (only additions to existing tolerations) or "
                           "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)")
        new_spec = old.get("spec") or {}
    if kind == "Job" and "selector" not in new_spec and not new_spec.get("manualSelector") \
            and (old.get("spec") or {}).get("selector"):
        # The generated selector and its template labels stay (spec.selector
        # is immutable): a manifest applied again does not carry them.
        new_spec["selector"] = old["spec"]["selector"]
        uid = old["metadata"].get("uid", "")
        template = new_spec.setdefault("template", {})
        tmeta = template.setdefault("metadata", {})
        tmeta["labels"] = {**(tmeta.get("labels") or {}), **_job_labels(uid, old["metadata"]["name"])}
    if kind == "Node":
        # spec.podCIDR is set once; keep what the store has if the file omits it.
        for k in ("podCIDR", "podCIDRs"):
            if k in (old.get("spec") or {}) and k not in new_spec:
                new_spec[k] = old["spec"][k]
    if kind in ("Event", "Endpoints", "ConfigMap"):
        merged = copy.deepcopy(new)
        merged["metadata"].update({k: old["metadata"][k] for k in ("uid", "creationTimestamp",
                                                                    "resourceVersion") if k in old["metadata"]})
        if kind == "ConfigMap" and old.get("immutable"):
            for field in ("data", "binaryData", "immutable"):
                if merged.get(field) != old.get(field):
                    raise ApiError(f'ConfigMap "{meta_name(old)}" is invalid: {field}: Forbidden: field is '
                                   "immutable when `immutable` is set")
        if managed is not None:
            merged["metadata"]["managedFields"] = managed(old, merged)
            if not merged["metadata"]["managedFields"]:
                del merged["metadata"]["managedFields"]
        if merged == old:
            return old, "unchanged"
        return registry.update(store, merged), "configured"
    alloc = None
    if kind == "Service":
        candidate = copy.deepcopy(merged)
        candidate["spec"] = new_spec
        alloc = _allocate_service(store, candidate, old, settings)
        new_spec = candidate["spec"]
        if "status" in candidate:
            merged["status"] = candidate["status"]
    spec_changed = new_spec != (old.get("spec") or {})
    merged["spec"] = new_spec
    if spec_changed:
        merged["metadata"]["generation"] = int(old["metadata"].get("generation") or 1) + 1
    if managed is not None:
        fields = managed(old, merged)
        if fields:
            merged["metadata"]["managedFields"] = fields
        else:
            merged["metadata"].pop("managedFields", None)
    if merged == old:
        return old, "unchanged"
    try:
        stored = registry.update(store, merged)
    except BaseException:
        if alloc:
            alloc.rollback()
        raise
    if kind == "Service":
        _free_service(store, old, keep=stored)
    return stored, "configured"


# -- delete ------------------------------------------------------------------------

def delete_pod(store: Store, namespace: str, name: str, *, uid: str | None = None,
               grace_period: int | None = None) -> bool:
    """Delete a pod as the API server does: a pod bound to a node gets
    metadata.deletionTimestamp (its kubelet stops the containers, tears down the
    sandbox, then removes the key); a pod no node has taken is removed at once,
    and so is any pod with GRACE_PERIOD 0 (a forced delete: the kubelet sees its
    object vanish and cleans up afterwards, also a pod already terminating).
    UID, when given, guards against deleting a new pod of the same name.
    Returns False if the pod was already gone (or already terminating)."""
    key = registry.key("Pod", namespace, name)
    for _ in range(20):
        kv = store.get(key)
        if kv is None or (uid is not None and kv.value["metadata"].get("uid") != uid):
            return False
        pod = kv.value
        if not pod.get("spec", {}).get("nodeName") or grace_period == 0:
            try:
                return store.delete(key, expect_revision=kv.mod_revision)
            except Conflict:
                continue             # bound (or changed) meanwhile: decide again
        if pod["metadata"].get("deletionTimestamp"):
            return False
        pod["metadata"]["deletionTimestamp"] = registry.now()
        pod["metadata"]["deletionGracePeriodSeconds"] = int(
            pod["spec"].get("terminationGracePeriodSeconds", 30) if grace_period is None else grace_period)
        try:
            store.put(key, pod, expect_revision=kv.mod_revision)
            return True
        except Conflict:
            continue
    raise Conflict(f"pod {namespace}/{name}: too many concurrent updates")


def delete(store: Store, kind: str, namespace: str | None, name: str,
           grace_period: int | None = None, *, orphan: bool = False, foreground: bool = False) -> dict:
    """Delete one object and, as Kubernetes' garbage collector does in the
    background, what it owns: a workload's pods (a Deployment's ReplicaSets and
    their pods), a Service's Endpoints and allocations. Raises ApiError NotFound.

    The owner goes first, so its controller stops creating pods; a pod it created
    in the same instant is caught by the garbage collector controller.

    ORPHAN (propagationPolicy Orphan): what the workload owns stays, with the
    owner's references removed, as the garbage collector's orphan finalizer
    does: the owner is first marked as being deleted (its controller then
    neither creates nor adopts), its dependents are released, then it goes.

    FOREGROUND (propagationPolicy Foreground): the owner is marked (the
    foregroundDeletion finalizer), its dependents are deleted (a Deployment's
    ReplicaSets in the foreground too), and it stays, visible and terminating,
    until they are gone; the garbage collector then removes it
    (finish_foreground)."""
    kind = kinds.resolve(kind)
    _writable(kind)
    obj = registry.get(store, kind, namespace, name)
    if obj is None:
        raise ApiError(f'{_resource(kind)} "{name}" not found', reason="NotFound")
    _refuse_protected(kind, namespace, name)
    if kind == "Pod":
        delete_pod(store, namespace or "default", name, grace_period=grace_period)
        return obj
    if kind == "Namespace":
        return _delete_namespace(store, obj)
    if foreground and not orphan and kind in kinds.WORKLOADS:
        obj = _mark_deleting(store, obj, FOREGROUND)
        delete_dependents(store, obj, foreground=True)
        finish_foreground(store, obj)
        return obj
    if orphan and kind in kinds.WORKLOADS:
        obj = _mark_deleting(store, obj, "orphan")
        release_dependents(store, obj)
    if not registry.delete(store, kind, namespace, name):
        raise ApiError(f'{_resource(kind)} "{name}" not found', reason="NotFound")
    if kind == "Service":
        _free_service(store, obj)
        registry.delete(store, "Endpoints", namespace, name)
    if kind in kinds.WORKLOADS and not orphan:    # their pods (or ReplicaSets) go with them
        delete_dependents(store, obj)
    return obj


FOREGROUND = "foregroundDeletion"


def _mark_deleting(store: Store, obj: dict, finalizer: str) -> dict:
    """OBJ with deletionTimestamp and FINALIZER (orphan, foregroundDeletion), as stored."""
    meta = obj["metadata"]

    def mark(current: dict) -> None:
        if current["metadata"].get("uid") != meta.get("uid"):
            raise ApiError(f'{_resource(obj["kind"])} "{meta["name"]}" not found', reason="NotFound")
        current["metadata"].setdefault("deletionTimestamp", registry.now())
        current["metadata"]["deletionGracePeriodSeconds"] = 0
        finalizers = current["metadata"].setdefault("finalizers", [])
        if finalizer not in finalizers:
            finalizers.append(finalizer)

    marked = registry.mutate(store, obj["kind"], meta.get("namespace"), meta["name"], mark)
    if marked is None:
        raise ApiError(f'{_resource(obj["kind"])} "{meta["name"]}" not found', reason="NotFound")
    return marked


def release_dependents(store: Store, owner: dict) -> list[dict]:
    """Remove OWNER's ownerReferences from what it owns (a workload's pods, a
    Deployment's ReplicaSets), as orphaning does; the objects changed."""
    ns = owner["metadata"].get("namespace", "default")
    uid = owner["metadata"].get("uid")

    def release(obj: dict) -> None:
        refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("uid") != uid]
        if refs:
            obj["metadata"]["ownerReferences"] = refs
        else:
            obj["metadata"].pop("ownerReferences", None)

    released = []
    for kind in ("ReplicaSet", "Pod") if owner["kind"] == "Deployment" else ("Pod",):
        for dependent in registry.list_(store, kind, ns):
            if any(r.get("uid") == uid for r in dependent["metadata"].get("ownerReferences") or []):
                changed = registry.mutate(store, kind, ns, dependent["metadata"]["name"], release)
                if changed is not None:
                    released.append(changed)
    return released


# Namespaces the API server will not delete.
UNDELETABLE_NAMESPACES = ("default", "kube-system", "kube-public")


def _delete_namespace(store: Store, ns: dict) -> dict:
    """Mark a namespace Terminating; the namespace controller deletes what is in
    it and then the namespace itself (controllers/namespace.py)."""
    name = ns["metadata"]["name"]
    if name in UNDELETABLE_NAMESPACES:
        raise ApiError(f'namespaces "{name}" is forbidden: this namespace may not be deleted',
                       reason="Forbidden")

    def mark(obj: dict) -> None:
        if obj["metadata"].get("uid") != ns["metadata"].get("uid"):
            raise ApiError(f'namespaces "{name}" not found', reason="NotFound")
        obj["metadata"].setdefault("deletionTimestamp", registry.now())
        obj.setdefault("status", {})["phase"] = "Terminating"

    marked = registry.mutate(store, "Namespace", None, name, mark)
    if marked is None:
        raise ApiError(f'namespaces "{name}" not found', reason="NotFound")
    return marked


def delete_dependents(store: Store, owner: dict, foreground: bool = False) -> None:
    """Delete what OWNER controls: its pods, a Deployment's ReplicaSets and
    theirs. FOREGROUND: the ReplicaSets are deleted in the foreground too, as
    the garbage collector deletes the dependents of a foreground deletion."""
    ns = owner["metadata"].get("namespace", "default")
    if owner["kind"] == "Deployment":
        for rs in registry.list_(store, "ReplicaSet", ns):
            if not ownership.owned_by(rs, owner):
                continue
            if foreground:
                with contextlib.suppress(ApiError):      # gone meanwhile
                    if FOREGROUND not in (rs["metadata"].get("finalizers") or []):
                        rs = _mark_deleting(store, rs, FOREGROUND)
                    delete_dependents(store, rs, foreground=True)
                    finish_foreground(store, rs)
            elif registry.delete(store, "ReplicaSet", ns, rs["metadata"]["name"]):
                delete_dependents(store, rs)
    for pod in registry.list_(store, "Pod", ns):
        if ownership.owned_by(pod, owner):
            delete_pod(store, ns, pod["metadata"]["name"], uid=pod["metadata"].get("uid"))


def blocking_dependents(owner: dict, pods: list[dict], replicasets: list[dict]) -> list[dict]:
    """What still holds OWNER's foreground deletion: the objects among PODS and
    REPLICASETS whose ownerReference to it says blockOwnerDeletion."""
    uid = owner["metadata"].get("uid")
    return [o for o in pods + replicasets
            if any(r.get("uid") == uid and r.get("blockOwnerDeletion")
                   for r in o["metadata"].get("ownerReferences") or [])]


def finish_foreground(store: Store, owner: dict, pods: list[dict] | None = None,
                      replicasets: list[dict] | None = None) -> bool:
    """Remove OWNER, marked for foreground deletion, once nothing blocks it
    (PODS and REPLICASETS of its namespace: read here when not given). True if
    it went."""
    meta = owner["metadata"]
    if FOREGROUND not in (meta.get("finalizers") or []) or not meta.get("deletionTimestamp"):
        return False
    ns = meta.get("namespace", "default")
    if pods is None:
        pods = registry.list_(store, "Pod", ns)
    if replicasets is None:
        replicasets = registry.list_(store, "ReplicaSet", ns) if owner["kind"] == "Deployment" else []
    if blocking_dependents(owner, pods, replicasets):
        return False
    kv = store.get(registry.key(owner["kind"], ns, meta["name"]))
    if kv is None or kv.value["metadata"].get("uid") != meta.get("uid"):
        return False
    try:
        return store.delete(kv.key, expect_revision=kv.mod_revision)
    except Conflict:
        return False                 # changed meanwhile: the next pass decides again


def _resource(kind: str) -> str:
    """The resource as kubectl's messages name it: pods, endpoints, jobs.batch
    (the API server names the group the client asked for: server._api_error)."""
    return kinds.BY_KIND[kind].qualified()
