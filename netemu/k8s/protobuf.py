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


# message -> {field number: (JSON name, type)}. Types: "string", "int", "bool",
# "map" (map<string,string>), "quantities" (map<string,Quantity>), "time"
# (metav1.Time), "intstr" (IntOrString), or a message; "[]T" a repeated T, "T?"
# a pointer field (kept when sent, even as 0, false or "").
MESSAGES: dict[str, dict[int, tuple[str, str]]] = {
    "Unknown": {1: ("typeMeta", "TypeMeta"), 2: ("raw", "bytes"),
                3: ("contentEncoding", "string"), 4: ("contentType", "string")},
    "TypeMeta": {1: ("apiVersion", "string"), 2: ("kind", "string")},
    "ObjectMeta": {1: ("name", "string"), 2: ("generateName", "string"),
                   3: ("namespace", "string"), 4: ("selfLink", "string"),
                   5: ("uid", "string"), 6: ("resourceVersion", "string"),
                   7: ("generation", "int"), 8: ("creationTimestamp", "time"),
                   9: ("deletionTimestamp", "time"), 10: ("deletionGracePeriodSeconds", "int"),
                   11: ("labels", "map"), 12: ("annotations", "map"),
                   13: ("ownerReferences", "[]OwnerReference"), 14: ("finalizers", "[]string")},
    "OwnerReference": {1: ("kind", "string"), 3: ("name", "string"), 4: ("uid", "string"),
                       5: ("apiVersion", "string"), 6: ("controller", "bool"),
                       7: ("blockOwnerDeletion", "bool")},
    "Namespace": {1: ("metadata", "ObjectMeta"), 2: ("spec", "NamespaceSpec"),
                  3: ("status", "NamespaceStatus")},
    "NamespaceSpec": {1: ("finalizers", "[]string")},
    "NamespaceStatus": {1: ("phase", "string")},
    "Time": {1: ("seconds", "int"), 2: ("nanos", "int")},
    # meta/v1 and util/intstr
    "LabelSelector": {1: ("matchLabels", "map"),
                      2: ("matchExpressions", "[]LabelSelectorRequirement")},
    "LabelSelectorRequirement": {1: ("key", "string"), 2: ("operator", "string"),
                                 3: ("values", "[]string")},
    "IntOrString": {1: ("type", "int"), 2: ("intVal", "int"), 3: ("strVal", "string")},
    "Quantity": {1: ("string", "string")},
    # apps/v1 Deployment (`kubectl create deployment`)
    "Deployment": {1: ("metadata", "ObjectMeta"), 2: ("spec", "DeploymentSpec"),
                   3: ("status", "DeploymentStatus")},
    "DeploymentSpec": {1: ("replicas", "int?"), 2: ("selector", "LabelSelector"),
                       3: ("template", "PodTemplateSpec"), 4: ("strategy", "DeploymentStrategy"),
                       5: ("minReadySeconds", "int"), 6: ("revisionHistoryLimit", "int?"),
                       7: ("paused", "bool"), 9: ("progressDeadlineSeconds", "int?")},
    "DeploymentStrategy": {1: ("type", "string"), 2: ("rollingUpdate", "RollingUpdateDeployment")},
    "RollingUpdateDeployment": {1: ("maxUnavailable", "intstr"), 2: ("maxSurge", "intstr")},
    # A status as kubectl sends it on create: its counters (zero); conditions are refused.
    "DeploymentStatus": {1: ("observedGeneration", "int"), 2: ("replicas", "int"),
                         3: ("updatedReplicas", "int"), 4: ("availableReplicas", "int"),
                         5: ("unavailableReplicas", "int"), 7: ("readyReplicas", "int"),
                         8: ("collisionCount", "int?"), 9: ("terminatingReplicas", "int?")},
    # batch/v1 Job (`kubectl create job`)
    "Job": {1: ("metadata", "ObjectMeta"), 2: ("spec", "JobSpec"), 3: ("status", "JobStatus")},
    "JobSpec": {1: ("parallelism", "int?"), 2: ("completions", "int?"),
                3: ("activeDeadlineSeconds", "int?"), 4: ("selector", "LabelSelector"),
                5: ("manualSelector", "bool?"), 6: ("template", "PodTemplateSpec"),
                7: ("backoffLimit", "int?"), 8: ("ttlSecondsAfterFinished", "int?"),
                9: ("completionMode", "string?"), 10: ("suspend", "bool?")},
    "JobStatus": {2: ("startTime", "time"), 3: ("completionTime", "time"),
                  4: ("active", "int"), 5: ("succeeded", "int"), 6: ("failed", "int"),
                  7: ("completedIndexes", "string"), 9: ("ready", "int?"),
                  10: ("failedIndexes", "string?"), 11: ("terminating", "int?")},
    # core/v1 pod templates
    "PodTemplateSpec": {1: ("metadata", "ObjectMeta"), 2: ("spec", "PodSpec")},
    "PodSpec": {2: ("containers", "[]Container"), 20: ("initContainers", "[]Container"),
                3: ("restartPolicy", "string"), 4: ("terminationGracePeriodSeconds", "int?"),
                5: ("activeDeadlineSeconds", "int?"), 6: ("dnsPolicy", "string"),
                7: ("nodeSelector", "map"), 8: ("serviceAccountName", "string"),
                10: ("nodeName", "string"), 11: ("hostNetwork", "bool"),
                9: ("serviceAccount", "string"), 12: ("hostPID", "bool"),
                13: ("hostIPC", "bool"), 16: ("hostname", "string"),
                17: ("subdomain", "string"), 19: ("schedulerName", "string"),
                24: ("priorityClassName", "string")},
    "Container": {1: ("name", "string"), 2: ("image", "string"), 3: ("command", "[]string"),
                  4: ("args", "[]string"), 5: ("workingDir", "string"),
                  6: ("ports", "[]ContainerPort"), 7: ("env", "[]EnvVar"),
                  8: ("resources", "ResourceRequirements"),
                  13: ("terminationMessagePath", "string"), 20: ("terminationMessagePolicy", "string"),
                  14: ("imagePullPolicy", "string"), 16: ("stdin", "bool"),
                  17: ("stdinOnce", "bool"), 18: ("tty", "bool")},
    "ContainerPort": {1: ("name", "string"), 2: ("hostPort", "int"),
                      3: ("containerPort", "int"), 4: ("protocol", "string"),
                      5: ("hostIP", "string")},
    "EnvVar": {1: ("name", "string"), 2: ("value", "string")},
    "ResourceRequirements": {1: ("limits", "quantities"), 2: ("requests", "quantities")},
    # core/v1 Service (`kubectl create service`)
    "Service": {1: ("metadata", "ObjectMeta"), 2: ("spec", "ServiceSpec"),
                3: ("status", "ServiceStatus")},
    "ServiceSpec": {1: ("ports", "[]ServicePort"), 2: ("selector", "map"),
                    3: ("clusterIP", "string"), 18: ("clusterIPs", "[]string"),
                    4: ("type", "string"), 5: ("externalIPs", "[]string"),
                    7: ("sessionAffinity", "string"), 8: ("loadBalancerIP", "string"),
                    10: ("externalName", "string"), 11: ("externalTrafficPolicy", "string"),
                    12: ("healthCheckNodePort", "int"), 13: ("publishNotReadyAddresses", "bool"),
                    19: ("ipFamilies", "[]string"), 17: ("ipFamilyPolicy", "string?"),
                    20: ("allocateLoadBalancerNodePorts", "bool?"),
                    22: ("internalTrafficPolicy", "string?")},
    "ServicePort": {1: ("name", "string"), 2: ("protocol", "string"),
                    6: ("appProtocol", "string?"), 3: ("port", "int"),
                    4: ("targetPort", "intstr"), 5: ("nodePort", "int")},
    "ServiceStatus": {1: ("loadBalancer", "LoadBalancerStatus")},
    # core/v1 ConfigMap (`kubectl create configmap`; binaryData, bytes, is not decoded)
    "ConfigMap": {1: ("metadata", "ObjectMeta"), 2: ("data", "map"), 4: ("immutable", "bool?")},
    "LoadBalancerStatus": {},
}
# kind -> its message, for the kinds whose bodies are decoded (what kubectl's
# typed `create` commands send for the kinds netemu serves).
KINDS = {"Namespace": "Namespace", "Deployment": "Deployment", "Job": "Job", "Service": "Service",
         "ConfigMap": "ConfigMap"}


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
        name, typ = table[number]
        repeated = typ.startswith("[]")
        pointer = typ.endswith("?")
        typ = typ.removeprefix("[]").rstrip("?")
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
