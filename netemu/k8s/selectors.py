"""Label and field selectors: the one parser and the one matcher.

Kubernetes has two label selector shapes on objects: the old map selector of a
ReplicationController and a Service (`{app: nginx}`: every pair must match),
and the LabelSelector of apps/v1 and batch/v1 kinds (`matchLabels` plus
`matchExpressions` with In, NotIn, Exists, DoesNotExist; node affinity adds Gt
and Lt). Both are matched here (matches), as are the node selectors a pod uses
for scheduling (node_matches_pod).

A selector string, kubectl's `-l` and the API's `?labelSelector=`, has
apimachinery's labels.Parse grammar: requirements separated by commas, each one of

    key=value   key==value   key!=value          equality-based
    key in (v1,v2)   key notin (v1,v2)           set-based
    key   !key                                   existence
    key>N   key<N                                numeric comparison

`!=` and `notin` also select objects that do not carry the key at all, as in
Kubernetes. An empty string selects everything (`kubectl get pods -l ""`).
parse_label_selector turns it into matchExpressions, so the CLI, the API
server and the controllers share one matcher (labels_match).

A field selector (`metadata.name=x,status.phase!=Failed`) is a list of
(field, operator, value) terms over the fields the kind allows.
"""

from __future__ import annotations

import re


class SelectorError(ValueError):
    """A selector that cannot be parsed or evaluated; str() is one line, the
    message the API server and kubectl give."""


# The operators of a LabelSelector's matchExpressions, and of a node selector
# term's (node affinity), in the order Kubernetes' messages list them.
LABEL_SELECTOR_OPERATORS = ("In", "NotIn", "Exists", "DoesNotExist")
NODE_SELECTOR_OPERATORS = ("DoesNotExist", "Exists", "Gt", "In", "Lt", "NotIn")


# -- label selector strings ----------------------------------------------------------

# A label key: an optional DNS-subdomain prefix and a name of at most 63
# characters; a value: at most 63 characters, alphanumeric at both ends.
_NAME = r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
_KEY = re.compile(rf"^([a-z0-9]([-a-z0-9.]{{0,251}}[a-z0-9])?/)?{_NAME}$")
_VALUE = re.compile(rf"^({_NAME})?$")
_OPERATORS = ("==", "!=", "=", ">", "<")


def _split(text: str) -> list[str]:
    """Split at the commas that separate requirements (not those inside `( )`)."""
    parts, depth, start = [], 0, 0
    for i, ch in enumerate(text):
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise SelectorError(f'unable to parse requirement: unbalanced ")" in "{text}"')
        elif ch == "," and depth == 0:
            parts.append(text[start:i])
            start = i + 1
    if depth:
        raise SelectorError(f'unable to parse requirement: unclosed "(" in "{text}"')
    parts.append(text[start:])
    return parts


def _check_key(key: str, req: str) -> str:
    if not _KEY.match(key):
        raise SelectorError(f'unable to parse requirement "{req}": invalid label key "{key}"')
    return key


def _check_value(value: str, req: str) -> str:
    if not _VALUE.match(value):
        raise SelectorError(f'unable to parse requirement "{req}": invalid label value "{value}"')
    return value


def _requirement(req: str) -> dict:
    text = req.strip()
    if not text:
        raise SelectorError("unable to parse requirement: empty requirement (a stray comma?)")
    set_based = re.match(r"^(\S+)\s+(in|notin)\s*\((.*)\)$", text)
    if set_based:
        key, op, values = set_based.groups()
        items = [v.strip() for v in values.split(",")]
        if items == [""]:
            raise SelectorError(f'unable to parse requirement "{req}": for \'{op}\', a set of values '
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
                    raise SelectorError(f'unable to parse requirement "{req}": for \'{op}\', '
                                              "an integer value is required")
                return {"key": _check_key(key, req), "operator": "Gt" if op == ">" else "Lt",
                        "values": [value]}
            return {"key": _check_key(key, req), "operator": "NotIn" if op == "!=" else "In",
                    "values": [_check_value(value, req)]}
    if " " in text or "(" in text:
        raise SelectorError(f'unable to parse requirement "{req}": expected one of =, ==, !=, in, notin')
    return {"key": _check_key(text, req), "operator": "Exists"}


def parse_label_selector(text: str | None) -> list[dict]:
    """The requirements of a selector string as matchExpressions ([] for an
    empty one: everything). Raises SelectorError."""
    if not text or not text.strip():
        return []
    return [_requirement(r) for r in _split(text)]


def labels_match(expressions: list[dict], labels: dict | None) -> bool:
    """Does an object with LABELS satisfy every requirement? (None of them: yes.)"""
    return all(expression_matches(e, labels or {}) for e in expressions)


# -- selectors on objects ---------------------------------------------------------

def matches(selector: dict | None, labels: dict | None) -> bool:
    """Does SELECTOR select an object carrying LABELS?

    A map selector and a LabelSelector are both accepted. An empty or missing
    selector selects nothing, which is what controllers need (an RC with no
    selector must not claim every pod in its namespace).
    """
    if not selector:
        return False
    labels = labels or {}
    if "matchLabels" in selector or "matchExpressions" in selector:
        match_labels = selector.get("matchLabels") or {}
        expressions = selector.get("matchExpressions") or []
        if not match_labels and not expressions:
            return False
        if any(labels.get(k) != str(v) for k, v in match_labels.items()):
            return False
        return all(expression_matches(e, labels) for e in expressions)
    return map_matches(selector, labels)


def map_matches(selector: dict, labels: dict | None) -> bool:
    """Does a map selector ({app: nginx}, a nodeSelector) select LABELS? Every
    pair must match; an empty map selects everything (a pod without a
    nodeSelector fits every node: callers that need "nothing" check first)."""
    labels = labels or {}
    return all(labels.get(k) == str(v) for k, v in selector.items())


def expression_matches(expr: dict, labels: dict) -> bool:
    op = expr.get("operator")
    k = expr.get("key")
    values = [str(v) for v in expr.get("values") or []]
    if op == "In":
        return k in labels and labels[k] in values
    if op == "NotIn":
        return k not in labels or labels[k] not in values
    if op == "Exists":
        return k in labels
    if op == "DoesNotExist":
        return k not in labels
    if op in ("Gt", "Lt"):               # node affinity only
        try:
            have, want = int(labels[k]), int(values[0])
        except (KeyError, IndexError, ValueError):
            return False
        return have > want if op == "Gt" else have < want
    raise SelectorError(f"unknown selector operator {op!r}")


def selector_as_map(selector: dict | None) -> dict | None:
    """The selector as a plain map (what a Service takes), or None when it has
    expressions that a map cannot express (kubectl expose refuses those)."""
    if not selector:
        return None
    if "matchLabels" in selector or "matchExpressions" in selector:
        if selector.get("matchExpressions"):
            return None
        return dict(selector.get("matchLabels") or {}) or None
    return dict(selector)


def _requirements(selector: dict) -> list[tuple[str, str]]:
    """(key, text) per requirement of a LabelSelector, as labels.Selector.String()
    builds them (values sorted; requirements later sorted by key)."""
    reqs = [(k, f"{k}={v}") for k, v in (selector.get("matchLabels") or {}).items()]
    for e in selector.get("matchExpressions") or []:
        key, op = e.get("key", ""), e.get("operator")
        values = ",".join(sorted(str(v) for v in e.get("values") or []))
        text = {"In": f"{key} in ({values})", "NotIn": f"{key} notin ({values})",
                "Exists": key, "DoesNotExist": f"!{key}"}.get(op, f"{key} {op} ({values})")
        reqs.append((key, text))
    return sorted(reqs, key=lambda r: r[0])


def format_selector(selector: dict | None) -> str:
    """As kubectl prints a selector (metav1.FormatLabelSelector): app=nginx,
    !legacy,tier in (api,web), requirements sorted by key and values sorted; a
    plain map (an RC's or a Service's selector) as labels. `<none>` when empty."""
    if not selector:
        return "<none>"
    if "matchLabels" not in selector and "matchExpressions" not in selector:
        return ",".join(f"{k}={v}" for k, v in sorted(selector.items()))
    text = ",".join(t for _, t in _requirements(selector))
    return text or "<none>"


def workload_selector(owner: dict) -> dict | None:
    """The pod selector of a ReplicationController, ReplicaSet, Deployment,
    DaemonSet or Job (an RC without one selects its template's labels, as the API
    server defaults it)."""
    spec = owner.get("spec") or {}
    selector = spec.get("selector")
    if not selector and owner.get("kind") == "ReplicationController":
        selector = ((spec.get("template") or {}).get("metadata") or {}).get("labels")
    return selector


# -- node selection ------------------------------------------------------------

def node_matches_pod(pod_spec: dict, node: dict) -> bool:
    """Does NODE satisfy the pod's nodeSelector and its required node affinity?"""
    labels = node["metadata"].get("labels") or {}
    if not map_matches(pod_spec.get("nodeSelector") or {}, labels):
        return False
    required = (((pod_spec.get("affinity") or {}).get("nodeAffinity") or {})
                .get("requiredDuringSchedulingIgnoredDuringExecution"))
    if not required:
        return True
    # The terms are ORed; the expressions inside one term are ANDed.
    fields = {"metadata.name": node["metadata"]["name"]}
    for term in required.get("nodeSelectorTerms") or []:
        if (all(expression_matches(e, labels) for e in term.get("matchExpressions") or [])
                and all(expression_matches(e, fields) for e in term.get("matchFields") or [])):
            return True
    return False


# -- field selectors ---------------------------------------------------------------

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
