"""JSON patch (RFC 6902): `kubectl patch --type=json`."""

from __future__ import annotations

import copy


class PatchError(ValueError):
    pass


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise PatchError(f'invalid JSON pointer "{path}": must start with "/"')
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _parent(doc, parts: list[str], path: str):
    node = doc
    for part in parts[:-1]:
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise PatchError(f'doc is missing path: "{path}"')
    return node


def _index(node: list, part: str, path: str, adding: bool) -> int:
    if adding and part == "-":
        return len(node)
    if not part.isdigit() or int(part) > len(node) - (0 if adding else 1):
        raise PatchError(f'unable to access invalid index: "{path}"')
    return int(part)


def _get(doc, path: str):
    parts = _pointer(path)
    if not parts:
        return doc
    node = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(node, dict) and last in node:
        return node[last]
    if isinstance(node, list):
        return node[_index(node, last, path, False)]
    raise PatchError(f'doc is missing path: "{path}"')


def _remove(doc, path: str):
    parts = _pointer(path)
    if not parts:
        raise PatchError("unable to remove the whole document")
    node = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(node, dict) and last in node:
        return node.pop(last)
    if isinstance(node, list):
        return node.pop(_index(node, last, path, False))
    raise PatchError(f'doc is missing path: "{path}"')


def _add(doc, path: str, value):
    parts = _pointer(path)
    if not parts:
        return value
    node = _parent(doc, parts, path)
    last = parts[-1]
    if isinstance(node, dict):
        node[last] = value
    elif isinstance(node, list):
        node.insert(_index(node, last, path, True), value)
    else:
        raise PatchError(f'doc is missing path: "{path}"')
    return doc


def apply(doc, operations) -> dict:
    if not isinstance(operations, list):
        raise PatchError("a JSON patch is a list of operations")
    doc = copy.deepcopy(doc)
    for op in operations:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise PatchError(f"invalid JSON patch operation: {op!r}")
        kind, path = op["op"], op["path"]
        if not isinstance(path, str):
            raise PatchError(f"invalid JSON pointer {path!r}: must be a string")
        if kind in ("add", "replace", "test") and "value" not in op:
            raise PatchError(f'missing value for "{kind}" operation on "{path}"')
        if kind == "add":
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind == "remove":
            _remove(doc, path)
        elif kind == "replace":
            _get(doc, path)                     # must exist
            if _pointer(path):
                _remove(doc, path)
            doc = _add(doc, path, copy.deepcopy(op["value"]))
        elif kind in ("move", "copy"):
            source = op.get("from")
            if not isinstance(source, str):
                raise PatchError(f'missing from for "{kind}" operation on "{path}"')
            value = _get(doc, source)
            if kind == "move":
                _remove(doc, source)
            doc = _add(doc, path, copy.deepcopy(value))
        elif kind == "test":
            if _get(doc, path) != op["value"]:
                raise PatchError(f'testing value {path} failed')
        else:
            raise PatchError(f'unexpected kind of operation: "{kind}"')
    return doc
