"""Kubernetes' protobuf encoding, for the request bodies kubectl sends that way.

kubectl's typed commands (`kubectl create namespace NAME`) send
`application/vnd.kubernetes.protobuf`: the 4 bytes "k8s\\0", then a
runtime.Unknown message {typeMeta {apiVersion, kind}, raw, contentEncoding,
contentType} whose raw bytes are the object's own message (generated.proto of
k8s.io/api). This module reads the protobuf wire format and decodes the
messages listed in MESSAGES into the object's JSON shape; a message or a field
number it does not know is an error (DecodeError), never silently dropped.
Decoded: Namespace, Deployment, Job and Service with the fields kubectl's
typed `create` commands fill (field numbers from k8s.io/api's generated.proto;
a field outside the tables is refused, with its number); other kinds are
refused.
"""

from __future__ import annotations

import datetime

MAGIC = b"k8s\x00"
MEDIA_TYPE = "application/vnd.kubernetes.protobuf"


class DecodeError(ValueError):
    pass


def _varint(data: bytes, at: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if at >= len(data):
            raise DecodeError("truncated varint")
        byte = data[at]
        at += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value, at
        shift += 7
        if shift > 63:
            raise DecodeError("varint too long")


def fields(data: bytes):
    """(field number, wire type, value) for each field: value is an int for
    varints, bytes for length-delimited fields."""
    at = 0
    while at < len(data):
        key, at = _varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _varint(data, at)
        elif wire == 2:
            length, at = _varint(data, at)
            if at + length > len(data):
                raise DecodeError("truncated field")
            value, at = data[at:at + length], at + length
        elif wire == 1:
            value, at = int.from_bytes(data[at:at + 8], "little"), at + 8
        elif wire == 5:
            value, at = int.from_bytes(data[at:at + 4], "little"), at + 4
        else:
            raise DecodeError(f"unsupported wire type {wire}")
        yield number, wire, value


# message -> {field number: (JSON name, type, repeated)}. Types: "string",
# "int", "bool", "map" (map<string,string>), "time" (metav1.Time), or a message.
MESSAGES: dict[str, dict[int, tuple[str, str, bool]]] = {
    "Unknown": {1: ("typeMeta", "TypeMeta", False), 2: ("raw", "bytes", False),
                3: ("contentEncoding", "string", False), 4: ("contentType", "string", False)},
    "TypeMeta": {1: ("apiVersion", "string", False), 2: ("kind", "string", False)},
    "ObjectMeta": {1: ("name", "string", False), 2: ("generateName", "string", False),
                   3: ("namespace", "string", False), 4: ("selfLink", "string", False),
                   5: ("uid", "string", False), 6: ("resourceVersion", "string", False),
                   7: ("generation", "int", False), 8: ("creationTimestamp", "time", False),
                   9: ("deletionTimestamp", "time", False), 10: ("deletionGracePeriodSeconds", "int", False),
                   11: ("labels", "map", False), 12: ("annotations", "map", False),
                   13: ("ownerReferences", "OwnerReference", True), 14: ("finalizers", "string", True)},
    "OwnerReference": {1: ("kind", "string", False), 3: ("name", "string", False), 4: ("uid", "string", False),
                       5: ("apiVersion", "string", False), 6: ("controller", "bool", False),
                       7: ("blockOwnerDeletion", "bool", False)},
    "Namespace": {1: ("metadata", "ObjectMeta", False), 2: ("spec", "NamespaceSpec", False),
                  3: ("status", "NamespaceStatus", False)},
    "NamespaceSpec": {1: ("finalizers", "string", True)},
    "NamespaceStatus": {1: ("phase", "string", False)},
    "Time": {1: ("seconds", "int", False), 2: ("nanos", "int", False)},
    # meta/v1 and util/intstr
    "LabelSelector": {1: ("matchLabels", "map", False),
                      2: ("matchExpressions", "LabelSelectorRequirement", True)},
    "LabelSelectorRequirement": {1: ("key", "string", False), 2: ("operator", "string", False),
                                 3: ("values", "string", True)},
    "IntOrString": {1: ("type", "int", False), 2: ("intVal", "int", False), 3: ("strVal", "string", False)},
    "Quantity": {1: ("string", "string", False)},
    # apps/v1 Deployment (`kubectl create deployment`)
    "Deployment": {1: ("metadata", "ObjectMeta", False), 2: ("spec", "DeploymentSpec", False),
                   3: ("status", "DeploymentStatus", False)},
    "DeploymentSpec": {1: ("replicas", "int?", False), 2: ("selector", "LabelSelector", False),
                       3: ("template", "PodTemplateSpec", False), 4: ("strategy", "DeploymentStrategy", False),
                       5: ("minReadySeconds", "int", False), 6: ("revisionHistoryLimit", "int?", False),
                       7: ("paused", "bool", False), 9: ("progressDeadlineSeconds", "int?", False)},
    "DeploymentStrategy": {1: ("type", "string", False), 2: ("rollingUpdate", "RollingUpdateDeployment", False)},
    "RollingUpdateDeployment": {1: ("maxUnavailable", "intstr", False), 2: ("maxSurge", "intstr", False)},
    # A status as kubectl sends it on create: its counters (zero); conditions are refused.
    "DeploymentStatus": {1: ("observedGeneration", "int", False), 2: ("replicas", "int", False),
                         3: ("updatedReplicas", "int", False), 4: ("availableReplicas", "int", False),
                         5: ("unavailableReplicas", "int", False), 7: ("readyReplicas", "int", False),
                         8: ("collisionCount", "int?", False), 9: ("terminatingReplicas", "int?", False)},
    # batch/v1 Job (`kubectl create job`)
    "Job": {1: ("metadata", "ObjectMeta", False), 2: ("spec", "JobSpec", False), 3: ("status", "JobStatus", False)},
    "JobSpec": {1: ("parallelism", "int?", False), 2: ("completions", "int?", False),
                3: ("activeDeadlineSeconds", "int?", False), 4: ("selector", "LabelSelector", False),
                5: ("manualSelector", "bool?", False), 6: ("template", "PodTemplateSpec", False),
                7: ("backoffLimit", "int?", False), 8: ("ttlSecondsAfterFinished", "int?", False),
                9: ("completionMode", "string?", False), 10: ("suspend", "bool?", False)},
    "JobStatus": {2: ("startTime", "time", False), 3: ("completionTime", "time", False),
                  4: ("active", "int", False), 5: ("succeeded", "int", False), 6: ("failed", "int", False),
                  7: ("completedIndexes", "string", False), 9: ("ready", "int?", False),
                  10: ("failedIndexes", "string?", False), 11: ("terminating", "int?", False)},
    # core/v1 pod templates
    "PodTemplateSpec": {1: ("metadata", "ObjectMeta", False), 2: ("spec", "PodSpec", False)},
    "PodSpec": {2: ("containers", "Container", True), 20: ("initContainers", "Container", True),
                3: ("restartPolicy", "string", False), 4: ("terminationGracePeriodSeconds", "int?", False),
                5: ("activeDeadlineSeconds", "int?", False), 6: ("dnsPolicy", "string", False),
                7: ("nodeSelector", "map", False), 8: ("serviceAccountName", "string", False),
                10: ("nodeName", "string", False), 11: ("hostNetwork", "bool", False),
                9: ("serviceAccount", "string", False), 12: ("hostPID", "bool", False),
                13: ("hostIPC", "bool", False), 16: ("hostname", "string", False),
                17: ("subdomain", "string", False), 19: ("schedulerName", "string", False),
                24: ("priorityClassName", "string", False)},
    "Container": {1: ("name", "string", False), 2: ("image", "string", False), 3: ("command", "string", True),
                  4: ("args", "string", True), 5: ("workingDir", "string", False),
                  6: ("ports", "ContainerPort", True), 7: ("env", "EnvVar", True),
                  8: ("resources", "ResourceRequirements", False),
                  13: ("terminationMessagePath", "string", False), 20: ("terminationMessagePolicy", "string", False),
                  14: ("imagePullPolicy", "string", False), 16: ("stdin", "bool", False),
                  17: ("stdinOnce", "bool", False), 18: ("tty", "bool", False)},
    "ContainerPort": {1: ("name", "string", False), 2: ("hostPort", "int", False),
                      3: ("containerPort", "int", False), 4: ("protocol", "string", False),
                      5: ("hostIP", "string", False)},
    "EnvVar": {1: ("name", "string", False), 2: ("value", "string", False)},
    "ResourceRequirements": {1: ("limits", "quantities", False), 2: ("requests", "quantities", False)},
    # core/v1 Service (`kubectl create service`)
    "Service": {1: ("metadata", "ObjectMeta", False), 2: ("spec", "ServiceSpec", False),
                3: ("status", "ServiceStatus", False)},
    "ServiceSpec": {1: ("ports", "ServicePort", True), 2: ("selector", "map", False),
                    3: ("clusterIP", "string", False), 18: ("clusterIPs", "string", True),
                    4: ("type", "string", False), 5: ("externalIPs", "string", True),
                    7: ("sessionAffinity", "string", False), 8: ("loadBalancerIP", "string", False),
                    10: ("externalName", "string", False), 11: ("externalTrafficPolicy", "string", False),
                    12: ("healthCheckNodePort", "int", False), 13: ("publishNotReadyAddresses", "bool", False),
                    19: ("ipFamilies", "string", True), 17: ("ipFamilyPolicy", "string?", False),
                    20: ("allocateLoadBalancerNodePorts", "bool?", False),
                    22: ("internalTrafficPolicy", "string?", False)},
    "ServicePort": {1: ("name", "string", False), 2: ("protocol", "string", False),
                    6: ("appProtocol", "string?", False), 3: ("port", "int", False),
                    4: ("targetPort", "intstr", False), 5: ("nodePort", "int", False)},
    "ServiceStatus": {1: ("loadBalancer", "LoadBalancerStatus", False)},
    "LoadBalancerStatus": {},
}
# kind -> its message, for the kinds whose bodies are decoded (what kubectl's
# typed `create` commands send for the kinds netemu serves).
KINDS = {"Namespace": "Namespace", "Deployment": "Deployment", "Job": "Job", "Service": "Service"}


class _Set:
    """A pointer field's value as sent: kept even when it is 0, false or ""
    (replicas: 0 is not "replicas unset")."""

    def __init__(self, value):
        self.value = value


def _time(data: bytes) -> str | None:
    t = decode_message(data, "Time")
    if not t.get("seconds"):
        return None
    return datetime.datetime.fromtimestamp(t["seconds"], datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def decode_message(data: bytes, message: str) -> dict:
    table = MESSAGES[message]
    out: dict = {}
    for number, wire, value in fields(data):
        if number not in table:
            raise DecodeError(f"{message}: unknown field number {number}")
        name, typ, repeated = table[number]
        pointer = typ.endswith("?")
        typ = typ.rstrip("?")
        if typ in ("int", "bool"):
            if wire != 0:
                raise DecodeError(f"{message}.{name}: expected a varint")
            item = bool(value) if typ == "bool" else _signed(value)
        else:
            if wire != 2:
                raise DecodeError(f"{message}.{name}: expected a length-delimited field")
            if typ == "string":
                try:
                    item = value.decode("utf-8")
                except UnicodeDecodeError:
                    raise DecodeError(f"{message}.{name}: not UTF-8") from None
            elif typ == "bytes":
                item = value
            elif typ == "time":
                item = _time(value)
            elif typ == "intstr":
                v = decode_message(value, "IntOrString")
                item = _signed(v.get("intVal", 0)) if not v.get("type") else v.get("strVal", "")
                item = _Set(item)
            elif typ == "quantities":
                entry = {n: v for n, _, v in fields(value)}
                try:
                    key = entry.get(1, b"").decode()
                    out.setdefault(name, {})[key] = decode_message(entry.get(2, b""), "Quantity").get("string", "")
                except UnicodeDecodeError:
                    raise DecodeError(f"{message}.{name}: not UTF-8") from None
                continue
            elif typ == "map":
                entry = {n: v for n, _, v in fields(value)}
                try:
                    out.setdefault(name, {})[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
                except UnicodeDecodeError:
                    raise DecodeError(f"{message}.{name}: not UTF-8") from None
                continue
            else:
                item = decode_message(value, typ)
        if pointer:
            item = _Set(item)
        if repeated:
            out.setdefault(name, []).append(item)
        else:
            out[name] = item
    return out


def _signed(value: int) -> int:
    """A varint as the int32/int64 it carries (negative numbers are sent as
    their 64-bit two's complement)."""
    return value - (1 << 64) if value >= 1 << 63 else value


def _omit_empty(value):
    """Go's omitempty, as the JSON form of these objects has it; a pointer
    field that was sent stays, whatever its value."""
    if isinstance(value, _Set):
        return _omit_empty(value.value) if isinstance(value.value, (dict, list)) else value.value
    if isinstance(value, dict):
        cleaned = {k: (_omit_empty(v), isinstance(v, _Set)) for k, v in value.items()}
        return {k: v for k, (v, kept) in cleaned.items() if kept or v not in ("", None, {}, [], 0, False)}
    if isinstance(value, list):
        return [_omit_empty(v) for v in value]
    return value


def decode_object(body: bytes) -> dict:
    """A protobuf request body -> the object as JSON would carry it."""
    if not body.startswith(MAGIC):
        raise DecodeError("missing the k8s protobuf prefix")
    unknown = decode_message(body[len(MAGIC):], "Unknown")
    type_meta = unknown.get("typeMeta") or {}
    kind = type_meta.get("kind", "")
    if unknown.get("contentEncoding"):
        raise DecodeError(f"content encoding {unknown['contentEncoding']!r} is not supported")
    message = KINDS.get(kind)
    if message is None:
        raise DecodeError(f"{kind or 'an object'} sent as protobuf is not decoded by netemu yet (send JSON)")
    obj = _omit_empty(decode_message(unknown.get("raw", b""), message))
    return {"apiVersion": type_meta.get("apiVersion", ""), "kind": kind, **obj}
