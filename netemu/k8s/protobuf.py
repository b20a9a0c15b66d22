"""Kubernetes' protobuf encoding, for the request bodies kubectl sends that way.

kubectl's typed commands (`kubectl create namespace NAME`) send
`application/vnd.kubernetes.protobuf`: the 4 bytes "k8s\\0", then a
runtime.Unknown message {typeMeta {apiVersion, kind}, raw, contentEncoding,
contentType} whose raw bytes are the object's own message (generated.proto of
k8s.io/api). This module reads the protobuf wire format and decodes the
messages listed in MESSAGES into the object's JSON shape; a message or a field
number it does not know is an error (DecodeError), never silently dropped.
Decoded so far: Namespace (with ObjectMeta); other kinds are refused.
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
}
# kind -> its message, for the kinds whose bodies are decoded.
KINDS = {"Namespace": "Namespace"}


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
        if typ in ("int", "bool"):
            if wire != 0:
                raise DecodeError(f"{message}.{name}: expected a varint")
            item = bool(value) if typ == "bool" else value
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
            elif typ == "map":
                entry = {n: v for n, _, v in fields(value)}
                try:
                    out.setdefault(name, {})[entry.get(1, b"").decode()] = entry.get(2, b"").decode()
                except UnicodeDecodeError:
                    raise DecodeError(f"{message}.{name}: not UTF-8") from None
                continue
            else:
                item = decode_message(value, typ)
        if repeated:
            out.setdefault(name, []).append(item)
        else:
            out[name] = item
    return out


def _omit_empty(value):
    """Go's omitempty, as the JSON form of these objects has it."""
    if isinstance(value, dict):
        cleaned = {k: _omit_empty(v) for k, v in value.items()}
        return {k: v for k, v in cleaned.items() if v not in ("", None, {}, [], 0, False)}
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
