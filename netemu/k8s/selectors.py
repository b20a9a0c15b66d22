"""Label and field selectors as they arrive in a query string (?labelSelector=...).

A label selector string (`app=nginx,tier in (web,api),!legacy,env!=prod`) is
parsed into the LabelSelector shape (matchExpressions) that
netemu.controllers.selectors already evaluates, so there is one matcher. A
field selector (`metadata.name=x,status.phase!=Failed`) is a list of
(field, operator, value) terms over the fields the kind allows.
"""

from __future__ import annotations

import re

from netemu.controllers import selectors


class SelectorError(ValueError):
    """A selector string that cannot be parsed; str() is the API server's message."""


_LABEL_KEY = re.compile(r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
                        r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_LABEL_VALUE = re.compile(r"^([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?$")
_SET = re.compile(r"^\s*(\S+?)\s+(in|notin)\s*\(([^()]*)\)\s*$")
_EQUALITY = re.compile(r"^\s*([^!=<>\s]+)\s*(==|=|!=|<|>)\s*([^\s]*)\s*$")
_EXISTS = re.compile(r"^\s*(!?)\s*([^!=<>\s(),]+)\s*$")


def _split_terms(text: str) -> list[str]:
    """Split on the commas that are not inside `( ... )`."""
    terms, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            terms.append(text[start:i])
            start = i + 1
    terms.append(text[start:])
    return terms


def _key(key: str, term: str) -> str:
    if not _LABEL_KEY.match(key):
        raise SelectorError(f"unable to parse requirement: {term!r}: invalid label key {key!r}")
    return key


def _value(value: str, term: str) -> str:
    if not _LABEL_VALUE.match(value):
        raise SelectorError(f"unable to parse requirement: {term!r}: invalid label value {value!r}")
    return value


def parse_label_selector(text: str | None) -> list[dict]:
    """A label selector string -> matchExpressions ([] selects everything)."""
    if not text or not text.strip():
        return []
    out: list[dict] = []
    for term in _split_terms(text):
        if not term.strip():
            raise SelectorError(f"unable to parse requirement: found '', expected: identifier in {text!r}")
        if m := _SET.match(term):
            values = [v.strip() for v in m[3].split(",") if v.strip()]
            out.append({"key": _key(m[1], term), "operator": "In" if m[2] == "in" else "NotIn",
                        "values": [_value(v, term) for v in values]})
        elif m := _EQUALITY.match(term):
            op = {"=": "In", "==": "In", "!=": "NotIn", "<": "Lt", ">": "Gt"}[m[2]]
            if op in ("Lt", "Gt") and not re.fullmatch(r"-?\d+", m[3]):
                raise SelectorError(f"unable to parse requirement: {term!r}: for 'Gt', 'Lt' operators, "
                                    "the value must be an integer")
            out.append({"key": _key(m[1], term), "operator": op, "values": [_value(m[3], term)]})
        elif m := _EXISTS.match(term):
            out.append({"key": _key(m[2], term), "operator": "DoesNotExist" if m[1] else "Exists"})
        else:
            raise SelectorError(f"unable to parse requirement: {term.strip()!r}")
    return out


def labels_match(expressions: list[dict], labels: dict | None) -> bool:
    return all(selectors.expression_matches(e, labels or {}) for e in expressions)


def parse_field_selector(text: str | None, allowed: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """`a=b,c!=d` -> [(a, "=", b), (c, "!=", d)]; only fields in ALLOWED (plus
    metadata.name and metadata.namespace), as the API server checks per kind."""
    if not text or not text.strip():
        return []
    out = []
    for term in text.split(","):
        m = re.fullmatch(r"\s*([^!=\s]+)\s*(==|=|!=)\s*(.*?)\s*", term)
        if not m:
            raise SelectorError(f"invalid selector: {text!r}; can't understand {term!r}")
        field, op, value = m[1], "!=" if m[2] == "!=" else "=", m[3]
        if field not in ("metadata.name", "metadata.namespace") + tuple(allowed):
            raise SelectorError(f'field label not supported: {field}')
        out.append((field, op, value))
    return out


def field_value(obj: dict, field: str) -> str:
    """The value a field selector compares with: the field as a string
    ("" when absent; booleans as true/false, as the API server renders them)."""
    if field == "source":                # an Event's source is its source.component
        field = "source.component"
    value = obj
    for part in field.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def fields_match(terms: list[tuple[str, str, str]], obj: dict) -> bool:
    return all((field_value(obj, f) == v) == (op == "=") for f, op, v in terms)
