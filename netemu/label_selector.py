"""kubectl's `-l` / `--selector` text: parse it into a LabelSelector and match it.

The grammar is apimachinery's labels.Parse: requirements separated by commas,
each one of

    key=value   key==value   key!=value          equality-based
    key in (v1,v2)   key notin (v1,v2)           set-based
    key   !key                                   existence
    key>N   key<N                                numeric comparison

`!=` and `notin` also select objects that do not carry the key at all, as in
Kubernetes. An empty selector selects everything (`kubectl get pods -l ""`).
The result is a LabelSelector (matchExpressions) so that one matcher,
netemu.controllers.selectors, decides for the CLI and the controllers alike.
"""

from __future__ import annotations

import re

from netemu.controllers import selectors

# A label key: an optional DNS-subdomain prefix and a name of at most 63
# characters; a value: at most 63 characters, alphanumeric at both ends.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE = re.compile(rf"^({_NAME})?$")
_OPERATORS = ("==", "!=", "=", ">", "<")


class SelectorSyntaxError(ValueError):
    """A selector kubectl would refuse; the message is one line."""


def _split(text: str) -> list[str]:
    """Split at the commas that separate requirements (not those inside `( )`)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SelectorSyntaxError(f'unable to parse requirement: unbalanced ")" in "{text}"')
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise SelectorSyntaxError(f'unable to parse requirement: unclosed "(" in "{text}"')
    parts.append(text[start:])
    return parts


def _check_key(key: str, req: str) -> str:
    if not _KEY.match(key):
        raise SelectorSyntaxError(f'unable to parse requirement "{req}": invalid label key "{key}"')
    return key


def _check_value(value: str, req: str) -> str:
    if not _VALUE.match(value):
        raise SelectorSyntaxError(f'unable to parse requirement "{req}": invalid label value "{value}"')
    return value


def _requirement(req: str) -> dict:
    text = req.strip()
    if not text:
        raise SelectorSyntaxError("unable to parse requirement: empty requirement (a stray comma?)")
    set_based = re.match(r"^(\S+)\s+(in|notin)\s*\((.*)\)$", text)
    if set_based:
        key, op, values = set_based.groups()
        items = [v.strip() for v in values.split(",")]
        if items == [""]:
            raise SelectorSyntaxError(f'unable to parse requirement "{req}": for \'{op}\', a set of values '
                                      "is required")
        return {"key": _check_key(key, req), "operator": "In" if op == "in" else "NotIn",
                "values": [_check_value(v, req) for v in items]}
    if text.startswith("!"):
        return {"key": _check_key(text[1:].strip(), req), "operator": "DoesNotExist"}
    for op in _OPERATORS:
        key, sep, value = text.partition(op)
        if sep:
            key, value = key.strip(), value.strip()
            if op in (">", "<"):
                if not re.fullmatch(r"-?[0-9]+", value):
                    raise SelectorSyntaxError(f'unable to parse requirement "{req}": for \'{op}\', '
                                              "an integer value is required")
                return {"key": _check_key(key, req), "operator": "Gt" if op == ">" else "Lt",
                        "values": [value]}
            return {"key": _check_key(key, req), "operator": "NotIn" if op == "!=" else "In",
                    "values": [_check_value(value, req)]}
    if " " in text or "(" in text:
        raise SelectorSyntaxError(f'unable to parse requirement "{req}": expected one of =, ==, !=, in, notin')
    return {"key": _check_key(text, req), "operator": "Exists"}


def parse(text: str) -> list[dict]:
    """The requirements of a -l selector as matchExpressions (empty: everything).
    Raises SelectorSyntaxError."""
    if not text.strip():
        return []
    return [_requirement(r) for r in _split(text)]


def matches(requirements: list[dict], labels: dict | None) -> bool:
    """Does an object with LABELS satisfy every requirement?"""
    return all(selectors.expression_matches(r, labels or {}) for r in requirements)
