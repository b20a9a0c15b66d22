"""Kubernetes manifests in, validated objects in their current API shape out.

This is netemu's stand-in for what kubectl and the API server do to an object on
its way into the cluster, in this order:
1. decode: check field types, warn about fields Kubernetes knows but netemu
   ignores, and warn about (and drop) fields Kubernetes does not know, as the
   API server does with fieldValidation=Warn (netemu.topology.schema lists both);
2. convert old apiVersions to the current one (extensions/v1beta1 Job ->
   batch/v1, extensions|apps/v1beta* ReplicaSet/Deployment/DaemonSet -> apps/v1),
   applying the old version's defaults first, as the API server's conversion did;
3. default: namespace "default", restartPolicy Always, protocol TCP, replicas 1,
   Service type ClusterIP, targetPort = port, sessionAffinity None,
   externalTrafficPolicy Cluster (NodePort and LoadBalancer), Job
   completions/parallelism 1 and backoffLimit 6, ...;
4. validate each object alone, with Kubernetes' wording where it has one
   (`Required value`, `Invalid value: ...`, `Unsupported value: ...`);
5. validate the objects together against the cluster (validate_objects):
   duplicate names, clusterIP and nodePort ranges and clashes, the LoadBalancer
   pool, hostPort clashes on one node, nodeName and nodeSelector against nodes.

Objects that were valid come out as new dicts (the input is not modified), so
later code can rely on the defaults being present. Every error is a
TopologyError whose text names the file, the document and the field.
"""

from __future__ import annotations

import copy
import difflib
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from . import names
from .model import PROBLEM_MAX, WHERE_MAX, ClusterSettings, NodeSpec, TopologyError, one_line
from netemu.k8s import kinds, selectors

from .schema import KNOWN_UNSUPPORTED_KINDS, SERVER_SET_METADATA, SPEC_STRUCTS, STRUCTS
from .yamlsource import load_documents, read_text

PROTOCOLS = ("SCTP", "TCP", "UDP")          # Kubernetes' order in its messages
SERVICE_TYPES = ("ClusterIP", "NodePort", "LoadBalancer")
EXTERNAL_TRAFFIC_POLICIES = ("Cluster", "Local")
# Namespaces every cluster has; others must be created (a Namespace object) first.
BUILTIN_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
MANIFEST_SUFFIXES = (".yaml", ".yml", ".json")


# ---------------------------------------------------------------------------
# Where an object came from, and how to complain about it

@dataclass
class Origin:
    """An object's place in its input, used for every message about it."""

    file: str                   # as shown to the user
    where: str                  # e.g. "document 2 (ReplicationController podtoservcie)"
    warnings: list[str] = field(default_factory=list)

    def error(self, path: str, problem: str) -> TopologyError:
        err = TopologyError(self.file, f"{self.where}: {path}" if path else self.where, problem)
        err.field = path            # the field path alone, for the API server's message
        return err

    def warn(self, path: str, message: str) -> None:
        where = one_line(f"{self.where}: {path}" if path else self.where, WHERE_MAX)
        self.warnings.append(f"{self.file}: {where}: {one_line(message, PROBLEM_MAX)}")


def describe(value: Any) -> str:
    """A value's YAML type and, for scalars, the value: for "got ..." messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int):
        return f"integer {value}"
    if isinstance(value, float):
        return f"number {value}"
    if isinstance(value, str):
        return f'string "{one_line(value, 80)}"'
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "a mapping"
    return type(value).__name__


def object_label(kind: Any, metadata: Any) -> str:
    """"Kind name" for the document label, from whatever the raw object holds."""
    name = metadata.get("name") if isinstance(metadata, dict) else None
    parts = [str(p) for p in (kind, name) if isinstance(p, str) and p]
    return f" ({' '.join(parts)})" if parts else ""


# ---------------------------------------------------------------------------
# Step 1: decode (types and field names)

_TYPE_WORDS = {"string": "a string", "integer": "an integer", "int64": "an integer",
               "boolean": "a boolean (true or false)",
               "number": "a number", "map[string]string": "a mapping of strings to strings",
               "[]string": "a list of strings", "int-or-string": "an integer or a string"}


# Go's integer types of Kubernetes' fields: a number outside them fails to
# decode in the API server, before any validation.
_INT_BITS = {"integer": 32, "int64": 64}


def _no_nul(origin: Origin, path: str, value: str) -> None:
    """NUL ends a C string: in argv, an environment or a file name it would cut
    the value short, or make exec fail in the kubelet. No field may hold one."""
    if "\x00" in value:
        shown = value.replace("\x00", "\\x00")
        raise origin.error(path, f'Invalid value: "{shown}": must not contain a NUL character')


def _decode(value: Any, typ: Any, path: str, origin: Origin, owner: str = "") -> Any:
    """Type-check `value` against `typ` (schema notation) and return a copy.
    OWNER: the struct holding the field, for Go's decoding message."""
    def wrong(expected: str) -> TopologyError:
        return origin.error(path, f"must be {expected}, got {describe(value)}")

    if typ == "string":
        if not isinstance(value, str):
            raise wrong(_TYPE_WORDS[typ])
        _no_nul(origin, path, value)
        return value
    if typ in _INT_BITS:
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong(_TYPE_WORDS[typ])
        bits = _INT_BITS[typ]
        if not -2 ** (bits - 1) <= value < 2 ** (bits - 1):
            # The API server's words (encoding/json, decoding into the Go struct).
            raise origin.error(path, f"cannot unmarshal number {value} into Go struct field "
                               f"{owner}.{path} of type int{bits}")
        return value
    if typ == "boolean":
        if not isinstance(value, bool):
            raise wrong(_TYPE_WORDS[typ])
        return value
    if typ == "int-or-string":
        if isinstance(value, bool) or not isinstance(value, (int, str)):
            raise wrong(_TYPE_WORDS[typ])
        if isinstance(value, int) and not -2 ** 31 <= value < 2 ** 31:
            raise origin.error(path, f"cannot unmarshal number {value} into Go struct field "
                               f"{owner}.{path} of type int32")
        if isinstance(value, str):
            _no_nul(origin, path, value)
        return value
    if typ == "map[string]string":
        if not isinstance(value, dict):
            raise wrong(_TYPE_WORDS[typ])
        for k, v in value.items():
            if not isinstance(k, str):
                raise origin.error(path, f"keys must be strings, got {describe(k)}")
            if not isinstance(v, str):
                # The usual cause: `version: 1` or `enabled: true` unquoted.
                raise origin.error(f"{path}.{k}", f"must be a string, got {describe(v)} (quote it)")
            _no_nul(origin, path, k)
            _no_nul(origin, f"{path}.{k}", v)
        return dict(value)
    if typ == "[]string":
        if not isinstance(value, list):
            raise wrong(_TYPE_WORDS[typ])
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise origin.error(f"{path}[{i}]", f"must be a string, got {describe(item)}")
            _no_nul(origin, f"{path}[{i}]", item)
        return list(value)
    if isinstance(typ, tuple) and typ[0] == "list":
        if not isinstance(value, list):
            raise wrong("a list")
        return [_decode(item, typ[1], f"{path}[{i}]", origin, owner) for i, item in enumerate(value)]
    return _decode_struct(value, STRUCTS[typ], path, origin)


def _decode_struct(value: Any, struct, path: str, origin: Origin) -> dict:
    if not isinstance(value, dict):
        raise origin.error(path, f"must be a mapping ({struct.name}), got {describe(value)}")
    out: dict = {}
    for key, item in value.items():
        sub = f"{path}.{key}" if path else str(key)
        if item is None:            # null means "not set", as in the API
            continue
        if key in struct.used:
            out[key] = _decode(item, struct.used[key], sub, origin, struct.name)
        elif key in struct.unused:
            origin.warn(sub, "field is not used by netemu (ignored)")
            out[key] = copy.deepcopy(item)
        else:
            # kubectl's default (--validate=strict) refuses these; netemu follows
            # the API server's fieldValidation=Warn instead: warn, then drop the
            # field as decoding into the Go struct does.
            known = sorted([*struct.used, *struct.unused])
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f'; did you mean "{close[0]}"?' if close else ""
            origin.warn(sub, f"unknown field (Kubernetes {struct.name} has no such field){hint}; dropped")
    return out


# ---------------------------------------------------------------------------
# Step 2: old apiVersions

def _convert_old(raw: dict, kind: str, api_version: str, origin: Origin) -> dict:
    """Apply an old apiVersion's defaults and drop its removed fields, in place."""
    spec = raw.get("spec")
    if not isinstance(spec, dict):
        return raw
    template = spec.get("template")
    tmeta = template.get("metadata") if isinstance(template, dict) else None
    tlabels = tmeta.get("labels") if isinstance(tmeta, dict) else None

    if kind in ("Deployment", "ReplicaSet", "DaemonSet") and api_version in (
            "extensions/v1beta1", "apps/v1beta1"):
        # These versions defaulted the selector and the object's labels to the
        # template's labels; apps/v1beta2 and apps/v1 require a selector.
        if spec.get("selector") is None and isinstance(tlabels, dict) and tlabels:
            spec["selector"] = {"matchLabels": dict(tlabels)}
        meta = raw.get("metadata")
        if isinstance(meta, dict) and not meta.get("labels") and isinstance(tlabels, dict):
            meta["labels"] = dict(tlabels)
    for removed in {"Deployment": ("rollbackTo",), "DaemonSet": ("templateGeneration",),
                    "Job": ("autoSelector",)}.get(kind, ()):
        if removed in spec:
            origin.warn(f"spec.{removed}", f"field was removed from Kubernetes with {api_version}; dropped")
            del spec[removed]
    if kind == "Job" and spec.get("selector") is not None:
        # extensions/v1beta1 Jobs took a user selector as is; batch/v1 only does so
        # with manualSelector: true.
        spec["manualSelector"] = True
    return raw


# ---------------------------------------------------------------------------
# Steps 3 and 4: defaults and per-object validation

def _check_name(origin: Origin, path: str, value: str, rule) -> None:
    problem = rule(value)
    if problem:
        raise origin.error(path, f'Invalid value: "{value}": {problem}')


def _check_labels(origin: Origin, path: str, labels: dict, values: bool = True) -> None:
    for key, value in labels.items():
        problem = names.label_key(key)
        if problem:
            raise origin.error(path, f'Invalid value: "{key}": {problem}')
        problem = names.label_value(value) if values else None
        if problem:
            raise origin.error(f"{path}.{key}", f'Invalid value: "{value}": {problem}')


def _check_range(origin: Origin, path: str, value: int, low: int, high: int) -> None:
    if not low <= value <= high:
        raise origin.error(path, f"must be between {low} and {high}, got {value}")


def _check_non_negative(origin: Origin, path: str, value: int) -> None:
    if value < 0:
        raise origin.error(path, f"Invalid value: {value}: must be greater than or equal to 0")


def _unsupported(origin: Origin, path: str, value: str, allowed: Iterable[str]) -> TopologyError:
    listed = ", ".join(f'"{a}"' for a in allowed)
    return origin.error(path, f'Unsupported value: "{value}": supported values: {listed}')


def _metadata(obj: dict, namespaced: bool, name_rule, origin: Origin) -> None:
    meta = obj.setdefault("metadata", {})
    for key in sorted(SERVER_SET_METADATA & meta.keys()):
        origin.warn(f"metadata.{key}", "is set by the cluster; the manifest's value is dropped")
        del meta[key]
    name = meta.get("name")
    if not name:
        raise origin.error("metadata.name", "Required value: name is required")
    _check_name(origin, "metadata.name", name, name_rule)
    if namespaced:
        meta.setdefault("namespace", "default")
        _check_name(origin, "metadata.namespace", meta["namespace"], names.dns1123_label)
    elif "namespace" in meta:
        origin.warn("metadata.namespace", f"{obj['kind']} is not namespaced; dropped")
        del meta["namespace"]
    _check_labels(origin, "metadata.labels", meta.get("labels", {}))
    _check_labels(origin, "metadata.annotations", meta.get("annotations", {}), values=False)
    if obj.get("kind") == "Pod":
        _check_pod_link(origin, "metadata", meta)


def _check_pod_link(origin: Origin, path: str, meta: dict) -> None:
    """netemu's annotation for a pod's own link ("delay 10ms rate 20mbit", read
    by the kubelet when it builds the sandbox): refused on write, naming the
    field, rather than by the kubelet once the pod has been placed."""
    from netemu import impairment

    text = (meta.get("annotations") or {}).get(impairment.POD_ANNOTATION)
    if text is None:
        return
    try:
        impairment.parse_words(text, f"{path}.annotations[{impairment.POD_ANNOTATION}]")
    except impairment.ImpairmentError as e:
        raise origin.error(e.where, e.problem) from None


def _pod_spec(spec: dict, path: str, origin: Origin, *,
              restart_default: str | None, restart_allowed: tuple[str, ...]) -> None:
    """Validate and default a PodSpec (a Pod's, or a controller template's)."""
    containers = spec.get("containers")
    if not containers:
        raise origin.error(f"{path}.containers", "Required value")
    container_names: set[str] = set()
    port_names: set[str] = set()
    host_ports: dict[tuple[int, str, str], str] = {}
    for i, container in enumerate(containers):
        cpath = f"{path}.containers[{i}]"
        cname = container.get("name")
        if not cname:
            raise origin.error(f"{cpath}.name", "Required value")
        _check_name(origin, f"{cpath}.name", cname, names.dns1123_label)
        if cname in container_names:
            raise origin.error(f"{cpath}.name", f'Duplicate value: "{cname}"')
        container_names.add(cname)
        if not container.get("image"):
            raise origin.error(f"{cpath}.image", "Required value")
        for j, env in enumerate(container.get("env", [])):
            if not env.get("name"):
                raise origin.error(f"{cpath}.env[{j}].name", "Required value")
            _check_name(origin, f"{cpath}.env[{j}].name", env["name"], names.env_var_name)
        for j, port in enumerate(container.get("ports", [])):
            ppath = f"{cpath}.ports[{j}]"
            if "containerPort" not in port:
                raise origin.error(f"{ppath}.containerPort", "Required value")
            _check_range(origin, f"{ppath}.containerPort", port["containerPort"], 1, 65535)
            protocol = port.setdefault("protocol", "TCP")
            if protocol not in PROTOCOLS:
                raise _unsupported(origin, f"{ppath}.protocol", protocol, PROTOCOLS)
            if "name" in port:
                _check_name(origin, f"{ppath}.name", port["name"], names.port_name)
                if port["name"] in port_names:
                    raise origin.error(f"{ppath}.name", f'Duplicate value: "{port["name"]}"')
                port_names.add(port["name"])
            if "hostIP" in port:
                try:
                    ipaddress.IPv4Address(port["hostIP"])
                except ValueError:
                    raise origin.error(f"{ppath}.hostIP", f'Invalid value: "{port["hostIP"]}": '
                                       "must be a valid IPv4 address") from None
            host_port = port.get("hostPort", 0)
            _check_range(origin, f"{ppath}.hostPort", host_port, 0, 65535)  # 0: not published
            if host_port:
                key = (host_port, protocol, port.get("hostIP", ""))
                if key in host_ports:
                    raise origin.error(f"{ppath}.hostPort",
                                       f'Duplicate value: "{host_port}/{protocol}" '
                                       f"(also published by {host_ports[key]})")
                host_ports[key] = ppath
    policy = spec.get("restartPolicy")
    if policy is None:
        if restart_default is None:
            allowed = ", ".join(f'"{a}"' for a in restart_allowed)
            raise origin.error(f"{path}.restartPolicy", f"Required value: valid values: {allowed}")
        spec["restartPolicy"] = policy = restart_default
    if policy not in restart_allowed:
        raise _unsupported(origin, f"{path}.restartPolicy", policy, restart_allowed)
    if "nodeName" in spec:
        _check_name(origin, f"{path}.nodeName", spec["nodeName"], names.dns1123_subdomain)
    _check_labels(origin, f"{path}.nodeSelector", spec.get("nodeSelector", {}))
    if "terminationGracePeriodSeconds" in spec:
        _check_non_negative(origin, f"{path}.terminationGracePeriodSeconds", spec["terminationGracePeriodSeconds"])
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution")
    for i, term in enumerate((required or {}).get("nodeSelectorTerms", [])):
        for part in ("matchExpressions", "matchFields"):
            for j, req in enumerate(term.get(part, [])):
                rpath = (f"{path}.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution"
                         f".nodeSelectorTerms[{i}].{part}[{j}]")
                if not req.get("key"):
                    raise origin.error(f"{rpath}.key", "Required value")
                if req.get("operator") not in selectors.NODE_SELECTOR_OPERATORS:
                    raise _unsupported(origin, f"{rpath}.operator", str(req.get("operator")),
                                       selectors.NODE_SELECTOR_OPERATORS)


def _label_selector(selector: dict | None, path: str, kind: str, origin: Origin) -> dict:
    """Validate an apps/v1 or batch/v1 LabelSelector; return it."""
    if selector is None:
        raise origin.error(path, "Required value")
    if not selector.get("matchLabels") and not selector.get("matchExpressions"):
        raise origin.error(path, f"Invalid value: {selector}: empty selector is invalid for {kind.lower()}")
    _check_labels(origin, f"{path}.matchLabels", selector.get("matchLabels", {}))
    for i, req in enumerate(selector.get("matchExpressions", [])):
        rpath = f"{path}.matchExpressions[{i}]"
        if not req.get("key"):
            raise origin.error(f"{rpath}.key", "Required value")
        op = req.get("operator")
        if op not in selectors.LABEL_SELECTOR_OPERATORS:
            raise _unsupported(origin, f"{rpath}.operator", str(op), selectors.LABEL_SELECTOR_OPERATORS)
        values = req.get("values", [])
        if op in ("In", "NotIn") and not values:
            raise origin.error(f"{rpath}.values", "Required value: must be specified when `operator` is 'In' or 'NotIn'")
        if op in ("Exists", "DoesNotExist") and values:
            raise origin.error(f"{rpath}.values", "Forbidden: may not be specified when `operator` is 'Exists' or 'DoesNotExist'")
    return selector


def _int_or_percent(origin: Origin, path: str, value) -> None:
    """ValidatePositiveIntOrPercent: a number >= 0 or a percentage like "25%"."""
    if isinstance(value, int):
        _check_non_negative(origin, path, value)
        return
    problem = names.percent(value)
    if problem:
        raise origin.error(path, f'Invalid value: "{value}": {problem}')


def _update_strategy(strategy: dict | None, path: str, types: tuple[str, ...], other: str | None,
                     origin: Origin) -> None:
    """A Deployment's strategy or a DaemonSet's updateStrategy, as
    ValidateDeploymentStrategy / ValidateDaemonSetUpdateStrategy check them.
    OTHER: the type that forbids a rollingUpdate block (a Deployment's Recreate)."""
    if not strategy:
        return
    stype = strategy.get("type", "RollingUpdate")
    if stype not in types:
        raise _unsupported(origin, f"{path}.type", stype, types)
    rolling = strategy.get("rollingUpdate")
    if rolling is None:
        return
    if other is not None and stype == other:
        raise origin.error(f"{path}.rollingUpdate", f"Forbidden: may not be specified when strategy "
                           f"`type` is '{other}'")
    rpath = f"{path}.rollingUpdate"
    for key in ("maxUnavailable", "maxSurge"):
        if key in rolling:
            _int_or_percent(origin, f"{rpath}.{key}", rolling[key])
    unavailable = rolling.get("maxUnavailable")
    if isinstance(unavailable, str) and int(unavailable[:-1]) > 100:
        raise origin.error(f"{rpath}.maxUnavailable", f'Invalid value: "{unavailable}": must not be greater than 100%')
    if rolling.get("maxSurge") in (0, "0%") and unavailable in (0, "0%"):
        raise origin.error(f"{rpath}.maxUnavailable", f"Invalid value: {names.go_repr(unavailable)}: "
                           "may not be 0 when `maxSurge` is 0")


def _template_labels(spec: dict, origin: Origin) -> dict:
    template = spec.get("template")
    if template is None:
        raise origin.error("spec.template", "Required value")
    return template.setdefault("metadata", {}).get("labels", {})


def _selector_mismatch(origin: Origin, labels: dict) -> TopologyError:
    return origin.error("spec.template.metadata.labels",
                        f"Invalid value: {names.go_repr(labels)}: selector does not match template labels")


def _controller(obj: dict, origin: Origin, uid: str | None = None) -> None:
    """UID: the object's metadata.uid when it has one (an update): a Job's
    selector generated from it is its own, not a manual one."""
    kind, spec = obj["kind"], obj.setdefault("spec", {})
    labels = _template_labels(spec, origin)
    _check_labels(origin, "spec.template.metadata.labels", labels)
    _check_pod_link(origin, "spec.template.metadata", spec["template"]["metadata"])
    if kind != "DaemonSet" and kind != "Job":
        spec.setdefault("replicas", 1)
        _check_non_negative(origin, "spec.replicas", spec["replicas"])
    if "minReadySeconds" in spec:
        _check_non_negative(origin, "spec.minReadySeconds", spec["minReadySeconds"])
    if kind == "Deployment":
        _update_strategy(spec.get("strategy"), "spec.strategy", ("Recreate", "RollingUpdate"), "Recreate", origin)
    elif kind == "DaemonSet":
        _update_strategy(spec.get("updateStrategy"), "spec.updateStrategy", ("OnDelete", "RollingUpdate"),
                         None, origin)

    if kind == "ReplicationController":
        # RC defaulting (pkg/apis/core/v1/defaults.go): selector and the RC's own
        # labels come from the template when left out.
        if not spec.get("selector"):
            if not labels:
                raise origin.error("spec.selector", "Required value")
            spec["selector"] = dict(labels)
        if not obj["metadata"].get("labels") and labels:
            obj["metadata"]["labels"] = dict(labels)
        _check_labels(origin, "spec.selector", spec["selector"])
        if not selectors.matches(spec["selector"], labels):
            raise _selector_mismatch(origin, labels)
    elif kind == "Job":
        # batch/v1 SetDefaults_Job: the Job's labels come from its template's
        # when it has none (kubectl get jobs --show-labels shows them).
        if not obj["metadata"].get("labels") and labels:
            obj["metadata"]["labels"] = dict(labels)
        spec.setdefault("completions", 1)
        spec.setdefault("parallelism", 1)
        spec.setdefault("backoffLimit", 6)
        for key in ("completions", "parallelism", "backoffLimit", "activeDeadlineSeconds",
                    "ttlSecondsAfterFinished"):
            if key in spec:
                _check_non_negative(origin, f"spec.{key}", spec[key])
        generated = {"matchLabels": {"batch.kubernetes.io/controller-uid": uid}}
        if spec.get("selector") is not None:
            if not spec.get("manualSelector") and not (uid and spec["selector"] == generated):
                raise origin.error("spec.selector", f"Invalid value: {spec['selector']}: `selector` not "
                                   "auto-generated (set spec.manualSelector: true to use your own)")
            _label_selector(spec["selector"], "spec.selector", kind, origin)
            if not selectors.matches(spec["selector"], labels):
                raise _selector_mismatch(origin, labels)
        # Without a selector, admission generates one from the Job's uid when
        # the Job is created (api._generate_job_selector), as Kubernetes does;
        # that one is accepted back on updates.
    else:
        _label_selector(spec.get("selector"), "spec.selector", kind, origin)
        if not selectors.matches(spec["selector"], labels):
            raise _selector_mismatch(origin, labels)

    template_spec = spec["template"].get("spec")
    if template_spec is None:
        raise origin.error("spec.template.spec", "Required value")
    if kind == "Job":
        _pod_spec(template_spec, "spec.template.spec", origin,
                  restart_default=None, restart_allowed=("OnFailure", "Never"))
    else:
        _pod_spec(template_spec, "spec.template.spec", origin,
                  restart_default="Always", restart_allowed=("Always",))


def _service(obj: dict, origin: Origin) -> None:
    spec = obj.setdefault("spec", {})
    stype = spec.setdefault("type", "ClusterIP")
    if stype == "ExternalName":
        raise origin.error("spec.type", 'Unsupported value: "ExternalName": not emulated by netemu')
    if stype not in SERVICE_TYPES:
        raise _unsupported(origin, "spec.type", stype, (*SERVICE_TYPES, "ExternalName"))
    # SetDefaults_Service, then validateServiceExternalTrafficPolicy.
    if stype in ("NodePort", "LoadBalancer"):
        traffic_policy = spec.setdefault("externalTrafficPolicy", "Cluster")
        if traffic_policy not in EXTERNAL_TRAFFIC_POLICIES:
            raise _unsupported(origin, "spec.externalTrafficPolicy", traffic_policy, EXTERNAL_TRAFFIC_POLICIES)
    elif "externalTrafficPolicy" in spec:
        raise origin.error("spec.externalTrafficPolicy", f'Invalid value: "{spec["externalTrafficPolicy"]}": '
                           "may only be set for externally-accessible services")

    cluster_ip = spec.get("clusterIP", "")
    if cluster_ip == "":
        spec.pop("clusterIP", None)          # allocated from the service range later
    elif cluster_ip == "None":
        if stype != "ClusterIP":
            raise origin.error("spec.clusterIP", f"Invalid value: \"None\": may not be set to 'None' for {stype} services")
    else:
        try:
            ipaddress.IPv4Address(cluster_ip)
        except ValueError:
            raise origin.error("spec.clusterIP", f'Invalid value: "{cluster_ip}": must be a valid IPv4 address, '
                               "\"None\" or empty") from None
    if "loadBalancerIP" in spec:
        try:
            ipaddress.IPv4Address(spec["loadBalancerIP"])
        except ValueError:
            raise origin.error("spec.loadBalancerIP", f'Invalid value: "{spec["loadBalancerIP"]}": '
                               "must be a valid IPv4 address") from None
        if stype != "LoadBalancer":
            origin.warn("spec.loadBalancerIP", f"only used by LoadBalancer services; this one is {stype}")

    ports = spec.get("ports", [])
    if not ports and cluster_ip != "None":
        raise origin.error("spec.ports", "Required value")
    seen_names: set[str] = set()
    seen_ports: set[tuple[int, str]] = set()
    seen_node_ports: set[tuple[int, str]] = set()
    for i, port in enumerate(ports):
        ppath = f"spec.ports[{i}]"
        if len(ports) > 1 and not port.get("name"):
            raise origin.error(f"{ppath}.name", "Required value")
        if port.get("name"):
            _check_name(origin, f"{ppath}.name", port["name"], names.dns1123_label)
            if port["name"] in seen_names:
                raise origin.error(f"{ppath}.name", f'Duplicate value: "{port["name"]}"')
            seen_names.add(port["name"])
        if "port" not in port:
            raise origin.error(f"{ppath}.port", "Required value")
        _check_range(origin, f"{ppath}.port", port["port"], 1, 65535)
        protocol = port.setdefault("protocol", "TCP")
        if protocol not in PROTOCOLS:
            raise _unsupported(origin, f"{ppath}.protocol", protocol, PROTOCOLS)
        if (port["port"], protocol) in seen_ports:
            raise origin.error(ppath, f'Duplicate value: "{port["port"]}/{protocol}"')
        seen_ports.add((port["port"], protocol))
        target = port.setdefault("targetPort", port["port"])
        if isinstance(target, int):
            _check_range(origin, f"{ppath}.targetPort", target, 1, 65535)
        else:
            _check_name(origin, f"{ppath}.targetPort", target, names.port_name)
        if "nodePort" in port:
            if stype == "ClusterIP":
                raise origin.error(f"{ppath}.nodePort", "Forbidden: may not be used when `type` is 'ClusterIP'")
            _check_range(origin, f"{ppath}.nodePort", port["nodePort"], 1, 65535)
            if (port["nodePort"], protocol) in seen_node_ports:
                raise origin.error(f"{ppath}.nodePort", f'Duplicate value: "{port["nodePort"]}/{protocol}"')
            seen_node_ports.add((port["nodePort"], protocol))

    for i, ip in enumerate(spec.get("externalIPs", [])):
        _external_ip(origin, f"spec.externalIPs[{i}]", ip)
    if "selector" in spec:
        _check_labels(origin, "spec.selector", spec["selector"])
    else:
        origin.warn("spec.selector", "not set: netemu creates no endpoints for this service")
    affinity = spec.setdefault("sessionAffinity", "None")
    if affinity not in ("ClientIP", "None"):
        raise _unsupported(origin, "spec.sessionAffinity", affinity, ("ClientIP", "None"))
    if affinity == "ClientIP":
        client_ip = spec.setdefault("sessionAffinityConfig", {}).setdefault("clientIP", {})
        client_ip.setdefault("timeoutSeconds", 10800)
        _check_range(origin, "spec.sessionAffinityConfig.clientIP.timeoutSeconds",
                     client_ip["timeoutSeconds"], 1, 86400)
    elif "sessionAffinityConfig" in spec:
        raise origin.error("spec.sessionAffinityConfig", "Forbidden: must not be set when `sessionAffinity` is None")


def _external_ip(origin: Origin, path: str, value: str) -> None:
    """ValidateNonSpecialIP, as the API server checks spec.externalIPs; netemu's
    cluster is IPv4 only, so an IPv6 address is refused too."""
    try:
        addr = ipaddress.ip_address(value)
    except ValueError:
        raise origin.error(path, f'Invalid value: "{value}": must be a valid IP address, '
                           "(e.g. 10.9.8.7 or 2001:db8::ffff)") from None
    if addr.version != 4:
        raise origin.error(path, f'Invalid value: "{value}": must be an IPv4 address (netemu\'s cluster is IPv4 only)')
    for bad, problem in ((addr.is_unspecified, "may not be unspecified (0.0.0.0, ::)"),
                         (addr.is_loopback, "may not be in the loopback range (127.0.0.0/8, ::1/128)"),
                         (addr in ipaddress.ip_network("169.254.0.0/16"),
                          "may not be in the link-local range (169.254.0.0/16, fe80::/10)"),
                         (addr in ipaddress.ip_network("224.0.0.0/24"),
                          "may not be in the link-local multicast range (224.0.0.0/24, ff02::/10)")):
        if bad:
            raise origin.error(path, f'Invalid value: "{value}": {problem}')


def normalize_object(raw: Any, file: str, where: str) -> tuple[dict, list[str]]:
    """One manifest object -> (object in current API shape with defaults, warnings).

    `where` names the object in its input ("document 2", "workloads[1]"); the
    object's kind and name are added to it in messages. Raises TopologyError.
    """
    if not isinstance(raw, dict):
        raise TopologyError(file, where, f"expected a Kubernetes object (a mapping with apiVersion "
                            f"and kind), got {describe(raw)}")
    origin = Origin(file, where + object_label(raw.get("kind"), raw.get("metadata")))
    unknown = [key for key in raw if key not in ("apiVersion", "kind", "metadata", "spec", "status")]
    kind, api_version = raw.get("kind"), raw.get("apiVersion")
    if kind is None:
        raise origin.error("kind", "Required value")
    if not isinstance(kind, str):
        raise origin.error("kind", f"must be a string, got {describe(kind)}")
    supported = ", ".join(SPEC_STRUCTS)
    if kind in KNOWN_UNSUPPORTED_KINDS:
        raise origin.error("kind", f"{kind} is not supported by netemu (supported kinds: {supported})")
    if kind not in SPEC_STRUCTS:
        raise origin.error("kind", f'unknown kind "{kind}" (supported kinds: {supported})')
    if api_version is None:
        raise origin.error("apiVersion", "Required value")
    if not isinstance(api_version, str):
        raise origin.error("apiVersion", f"must be a string, got {describe(api_version)}")
    versions = kinds.BY_KIND[kind].accepted_versions
    if api_version not in versions:
        raise origin.error("apiVersion", f'no kind "{kind}" is registered for version "{api_version}" '
                           f"(accepted: {', '.join(versions)})")

    raw = copy.deepcopy(raw)
    for key in unknown:
        origin.warn(str(key), "unknown field (a Kubernetes object has apiVersion, kind, metadata, "
                    "spec and status); dropped")
        del raw[key]
    current = kinds.stored_version(kind)
    if current != api_version:
        origin.warn("apiVersion", f"{api_version} {kind} converted to {current}, as the API server does")
        _convert_old(raw, kind, api_version, origin)
    if "status" in raw:
        origin.warn("status", "is written by the cluster; the manifest's status is dropped")

    namespaced, spec_struct = kinds.BY_KIND[kind].namespaced, SPEC_STRUCTS[kind]
    obj: dict = {"apiVersion": current, "kind": kind}
    if raw.get("metadata") is None:
        raise origin.error("metadata.name", "Required value: name is required")
    obj["metadata"] = _decode(raw["metadata"], "ObjectMeta", "metadata", origin)
    if raw.get("spec") is not None:
        obj["spec"] = _decode(raw["spec"], spec_struct, "spec", origin)
    elif kind != "Namespace":
        raise origin.error("spec", "Required value")

    if kind == "Pod":
        _metadata(obj, namespaced, names.dns1123_subdomain, origin)
        _pod_spec(obj["spec"], "spec", origin, restart_default="Always",
                  restart_allowed=("Always", "OnFailure", "Never"))
    elif kind == "Service":
        _metadata(obj, namespaced, names.dns1035_label, origin)
        _service(obj, origin)
    elif kind == "Namespace":
        _metadata(obj, namespaced, names.dns1123_label, origin)
    else:
        _metadata(obj, namespaced, names.dns1123_subdomain, origin)
        raw_uid = (raw.get("metadata") or {}).get("uid")
        _controller(obj, origin, raw_uid if isinstance(raw_uid, str) else None)
    return obj, origin.warnings


# ---------------------------------------------------------------------------
# Step 5: the objects together, against the cluster

@dataclass
class Entry:
    """A normalised object and where it came from."""

    obj: dict
    origin: Origin


def _key(obj: dict) -> tuple[str, str, str]:
    return obj["kind"], obj["metadata"].get("namespace", ""), obj["metadata"]["name"]


def _pod_specs(obj: dict) -> tuple[dict, str] | None:
    """(pod spec, its field path) of a Pod or a controller's template."""
    if obj["kind"] == "Pod":
        return obj["spec"], "spec"
    if obj["kind"] in kinds.WORKLOADS:
        return obj["spec"]["template"]["spec"], "spec.template.spec"
    return None


def check_batch(entries: list[Entry], settings: ClusterSettings | None,
                nodes: list[NodeSpec] | None) -> list[str]:
    """Checks that need several objects, the cluster settings or the nodes.

    settings None skips the checks that need them (service range, pool, backend
    port) except the nodePort range, checked against Kubernetes' default
    30000-32767 then; nodes None skips the checks against nodes. Raises
    TopologyError.
    """
    warnings: list[str] = []
    first: dict[tuple[str, str, str], Entry] = {}
    namespaces = {e.obj["metadata"]["name"] for e in entries if e.obj["kind"] == "Namespace"}
    missing_ns: set[str] = set()
    for e in entries:
        key = _key(e.obj)
        if key in first:
            prev = first[key].origin
            ns = f"{key[1]}/" if key[1] else ""
            raise e.origin.error("metadata.name", f'duplicate {key[0]} "{ns}{key[2]}" '
                                 f"(first defined in {prev.file}: {prev.where})")
        first[key] = e
        ns = e.obj["metadata"].get("namespace")
        if ns and ns not in BUILTIN_NAMESPACES and ns not in namespaces and ns not in missing_ns:
            missing_ns.add(ns)
            e.origin.warn("metadata.namespace", f'namespace "{ns}" is not created by these manifests; '
                          "Kubernetes refuses objects in a namespace that does not exist")
    _check_node_ports(entries, (settings or ClusterSettings()).node_port_range)
    if settings is not None:
        _check_services(entries, settings)
        _check_backend_port(entries, settings)
    if nodes is not None:
        _check_nodes(entries, nodes)
    for e in entries:
        warnings.extend(e.origin.warnings)
        e.origin.warnings = []
    return warnings


def _check_node_ports(entries: list[Entry], node_port_range: tuple[int, int]) -> None:
    """nodePorts inside the range, and each taken by one Service only.

    A port appears once per protocol in one Service (checked per object), and a
    Service may give the same nodePort to its TCP and UDP ports, as Kubernetes
    allows; two Services may not share one.
    """
    low, high = node_port_range
    node_ports: dict[int, Entry] = {}
    for e in entries:
        if e.obj["kind"] != "Service":
            continue
        for i, port in enumerate(e.obj["spec"].get("ports", [])):
            if "nodePort" not in port:
                continue
            node_port = port["nodePort"]
            path = f"spec.ports[{i}].nodePort"
            if not low <= node_port <= high:
                raise e.origin.error(path, f"Invalid value: {node_port}: provided port is not in the valid "
                                     f"range. The range of valid ports is {low}-{high}")
            owner = node_ports.get(node_port)
            if owner is not None and owner is not e:
                raise e.origin.error(path, f"Invalid value: {node_port}: provided port is already "
                                     f"allocated (to {owner.origin.where})")
            node_ports[node_port] = e


def _check_services(entries: list[Entry], settings: ClusterSettings) -> None:
    service_range = settings.service_range
    cluster_ips: dict[ipaddress.IPv4Address, Entry] = {}
    lb_ips: dict[ipaddress.IPv4Address, Entry] = {}
    pool = set(settings.lb_pool)
    wanting_pool: list[Entry] = []
    for e in entries:
        if e.obj["kind"] != "Service":
            continue
        spec = e.obj["spec"]
        ip = spec.get("clusterIP")
        if ip and ip != "None":
            addr = ipaddress.IPv4Address(ip)
            if addr not in service_range or addr in (service_range.network_address,
                                                      service_range.broadcast_address):
                raise e.origin.error("spec.clusterIP", f'Invalid value: "{ip}": provided IP is not in the '
                                     f"valid range. The range of valid IPs is {service_range}")
            if addr in cluster_ips:
                raise e.origin.error("spec.clusterIP", f'Invalid value: "{ip}": provided IP is already '
                                     f"allocated (to {cluster_ips[addr].origin.where})")
            cluster_ips[addr] = e
        if spec["type"] == "LoadBalancer":
            if "loadBalancerIP" in spec:
                addr = ipaddress.IPv4Address(spec["loadBalancerIP"])
                if addr not in pool:
                    raise e.origin.error("spec.loadBalancerIP", f'Invalid value: "{addr}": not in the '
                                         "cluster's loadBalancerPool")
                if addr in lb_ips:
                    raise e.origin.error("spec.loadBalancerIP", f'Invalid value: "{addr}": already '
                                         f"used by {lb_ips[addr].origin.where}")
                lb_ips[addr] = e
            else:
                wanting_pool.append(e)
    free = len(pool - lb_ips.keys())
    for e in wanting_pool[free:]:
        e.origin.warn("spec.type", "the loadBalancerPool has no free address left: "
                      "EXTERNAL-IP stays <pending>")


def _check_backend_port(entries: list[Entry], settings: ClusterSettings) -> None:
    """The udp and vxlan backends own one UDP port on every node's address."""
    port = settings.effective_backend_port()
    if port is None:
        return
    for e in entries:
        if e.obj["kind"] == "Service":
            for i, p in enumerate(e.obj["spec"].get("ports", [])):
                if p.get("nodePort") == port and p["protocol"] == "UDP":
                    raise e.origin.error(f"spec.ports[{i}].nodePort", f"{port}/UDP is the {settings.backend} "
                                         "backend's port on every node")
        found = _pod_specs(e.obj)
        if found is None:
            continue
        spec, path = found
        for i, c in enumerate(spec["containers"]):
            for j, p in enumerate(c.get("ports", [])):
                if p.get("hostPort") == port and p["protocol"] == "UDP":
                    raise e.origin.error(f"{path}.containers[{i}].ports[{j}].hostPort",
                                         f"{port}/UDP is the {settings.backend} backend's port on every node")


def _host_ports(spec: dict, path: str):
    for i, c in enumerate(spec["containers"]):
        for j, p in enumerate(c.get("ports", [])):
            if p.get("hostPort"):
                yield (p["hostPort"], p["protocol"], p.get("hostIP", "")), \
                    f"{path}.containers[{i}].ports[{j}].hostPort"


def _check_nodes(entries: list[Entry], nodes: list[NodeSpec]) -> None:
    by_name = {n.name: n for n in nodes}
    node_list = ", ".join(by_name) or "none"
    used: dict[tuple[str, int, str, str], Entry] = {}      # (node, port, protocol, hostIP)
    for e in entries:
        found = _pod_specs(e.obj)
        if found is None:
            continue
        spec, path = found
        kind = e.obj["kind"]
        node_name = spec.get("nodeName")
        if node_name is not None and node_name not in by_name:
            raise e.origin.error(f"{path}.nodeName", f'no node named "{node_name}" (nodes: {node_list})')
        selector = spec.get("nodeSelector", {})
        eligible = [n for n in nodes if selectors.map_matches(selector, n.labels)
                    and (node_name is None or n.name == node_name)]
        if kind != "DaemonSet" and node_name is None:
            eligible = [n for n in eligible if not n.unschedulable]   # DaemonSets ignore cordons
        if not eligible:
            what = "runs no pod" if kind == "DaemonSet" else "pods stay Pending"
            why = f"nodeSelector {names.go_repr(selector)} matches no schedulable node" if selector \
                else "there is no schedulable node"
            e.origin.warn(f"{path}.nodeSelector" if selector else path, f"{why}: {what}")
        ports = list(_host_ports(spec, path))
        if not ports:
            continue
        if kind == "Pod" and node_name is not None:
            for (port, proto, host_ip), ppath in ports:
                key = (node_name, port, proto, host_ip)
                if key in used:
                    other = used[key].origin.where
                    raise e.origin.error(ppath, f'hostPort {port}/{proto} on node "{node_name}" '
                                         f"is already used by {other}")
                used[key] = e
        replicas = {"Pod": 1, "Job": e.obj["spec"].get("parallelism", 1)}.get(
            kind, e.obj["spec"].get("replicas", 1))
        if kind != "DaemonSet" and replicas > len(eligible) and eligible:
            e.origin.warn(ports[0][1], f"{replicas} pods publish hostPort {ports[0][0][0]} but only "
                          f"{len(eligible)} node(s) can take them: the rest stay Pending")


# ---------------------------------------------------------------------------
# Reading manifest files

def _entries_from_data(data: Any, file: str, where: str,
                       errors: list[TopologyError] | None = None) -> list[Entry]:
    """A decoded document -> entries; a `kind: List` is flattened as kubectl does.
    With ERRORS, an object that fails is added there instead of raising."""
    try:
        if isinstance(data, dict) and data.get("kind") == "List" and "items" in data:
            items = data["items"]
            if not isinstance(items, list):
                raise TopologyError(file, f"{where} (List): items", f"must be a list, got {describe(items)}")
            out = []
            for i, item in enumerate(items):
                out.extend(_entries_from_data(item, file, f"{where} items[{i}]", errors))
            return out
        obj, warnings = normalize_object(data, file, where)
    except TopologyError as e:
        if errors is None:
            raise
        errors.append(e)
        return []
    origin = Origin(file, where + object_label(obj["kind"], obj["metadata"]), warnings)
    return [Entry(obj, origin)]


def entries_from_objects(objects: list, display: str, first: int = 1) -> list[Entry]:
    """Objects given as data rather than read from a file (the Python API's
    apply), normalised; each is named "object N" (N from FIRST) in messages,
    after DISPLAY where a file's name would be. A `kind: List` is flattened.
    Raises TopologyError."""
    entries: list[Entry] = []
    for i, raw in enumerate(objects):
        entries.extend(_entries_from_data(raw, display, f"object {first + i}"))
    return entries


def manifest_files(path: Path) -> list[Path]:
    """A manifest path, or every .yaml/.yml/.json file of a directory (sorted)."""
    if path.is_dir():
        return sorted(p for p in path.iterdir() if p.suffix in MANIFEST_SUFFIXES and p.is_file())
    return [path]


def read_manifest_file(path: Path, display: str | None = None, where: str = "",
                       errors: list[TopologyError] | None = None) -> list[Entry]:
    """Every object of one (multi-document) manifest file, normalised.

    With ERRORS, an object that fails validation alone is added there and the
    others are still returned (kubectl's -f goes on past a bad object); a file
    that cannot be read or parsed raises either way.
    """
    display = display if display is not None else str(path)
    entries: list[Entry] = []
    for doc in load_documents(read_text(path, display, where), display):
        if doc.data is None:        # empty document, e.g. after a trailing ---
            continue
        entries.extend(_entries_from_data(doc.data, display, f"document {doc.index}", errors))
    return entries


def load_manifests(path, settings: ClusterSettings | None = None, *,
                   nodes: list[NodeSpec] | None = None) -> tuple[list[dict], list[str]]:
    """For `netemu apply -f FILE`: manifest file (or directory) -> (objects, warnings).

    With settings, the objects are also checked against the cluster's ranges and
    pool; with nodes, against its nodes. Raises TopologyError.
    """
    path = Path(path)
    entries: list[Entry] = []
    for file in manifest_files(path):
        entries.extend(read_manifest_file(file))
    warnings = check_batch(entries, settings, nodes)
    return [e.obj for e in entries], warnings


def validate_objects(objects: list[dict], settings: ClusterSettings | None,
                     nodes: list[NodeSpec] | None, file) -> list[str]:
    """Validate objects (raw or already loaded) alone and together; return warnings.

    Messages name `file` and each object by its position ("object 3 (Pod x)").
    The objects are not modified. Raises TopologyError.
    """
    entries: list[Entry] = []
    for i, raw in enumerate(objects):
        obj, warnings = normalize_object(raw, str(file), f"object {i + 1}")
        entries.append(Entry(obj, Origin(str(file), f"object {i + 1}" + object_label(obj["kind"], obj["metadata"]),
                                         warnings)))
    return check_batch(entries, settings, nodes)
