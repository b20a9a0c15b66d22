"""Kubernetes Status objects: how the API server says no.

kubectl prints `Error from server (<reason>): <message>`, so the reason and the
message carry the wording users know (`pods "x" not found`).
"""

from __future__ import annotations

import json

from netemu.apiserver.http import Response

# reason -> HTTP code, as k8s.io/apimachinery/pkg/api/errors assigns them.
CODES = {
    "BadRequest": 400, "Unauthorized": 401, "Forbidden": 403, "NotFound": 404,
    "MethodNotAllowed": 405, "NotAcceptable": 406, "AlreadyExists": 409, "Conflict": 409,
    "Gone": 410, "Expired": 410, "RequestEntityTooLarge": 413, "UnsupportedMediaType": 415,
    "Invalid": 422, "InternalError": 500,
}


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)} | {0x0A: "\\n", 0x0D: "\\r", 0x09: "\\t"}


def one_line(message: str) -> str:
    """MESSAGE with control characters escaped as Go's %q shows them: a name
    or value sent with a newline in it cannot split the error over lines."""
    return message.translate(_CONTROL)


def status(reason: str, message: str, details: dict | None = None, code: int | None = None) -> dict:
    body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": one_line(message), "reason": reason, "code": code or CODES[reason]}
    if details:
        body["details"] = details
    return body


def error(reason: str, message: str, details: dict | None = None, code: int | None = None) -> Response:
    body = status(reason, message, details, code)
    return Response(body["code"], json.dumps(body, separators=(",", ":")).encode())


def not_found(qualified: str, name: str, group: str = "") -> Response:
    """`pods "x" not found` (a group-qualified resource: `jobs.batch "x" not found`)."""
    kind = qualified.split(".", 1)[0]
    details = {"name": name, "kind": kind}
    if group:
        details["group"] = group
    return error("NotFound", f'{qualified} "{name}" not found', details)


def no_route() -> Response:
    """What kube-apiserver answers for a path it does not serve."""
    return error("NotFound", "the server could not find the requested resource",
                 {"causes": [{"reason": "UnexpectedServerResponse", "message": "404 page not found"}]})


def method_not_allowed() -> Response:
    return error("MethodNotAllowed", "the server does not allow this method on the requested resource")


def too_large() -> Response:
    return error("RequestEntityTooLarge", "the request body is larger than the limit of 3145728 bytes "
                 "(request entity too large)")


def bad_request(message: str) -> Response:
    return error("BadRequest", message)


def success(name: str, group: str, kind: str, uid: str | None) -> dict:
    """The answer to a DELETE that removed the object at once."""
    details = {"name": name, "group": group, "kind": kind}
    if uid:
        details["uid"] = uid
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}
