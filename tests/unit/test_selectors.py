"""One selector engine (netemu.k8s.selectors) for the CLI's -l, the API's
?labelSelector= and the controllers and loader: the same string selects the
same objects everywhere, and a string one of them refuses, all refuse.

Before, three engines disagreed: the API accepted `a in ()` (and selected
nothing) where kubectl's grammar, and netemu's -l, refuse it; the loader's
matcher took an empty selector as "everything", the controllers' as "nothing".
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from urllib.parse import urlencode

import pytest

import netemu
from netemu.k8s import selectors
from netemu.topology import manifests
from tests.unit.test_apiserver import POD, call, server  # noqa: F401  (server: a fixture)

LABELS = {"web": {"app": "web", "tier": "front"}, "db": {"app": "db", "tier": "back", "n": "3"}, "bare": {}}

CASES = {
    "app=web": ["web"], "app==web,tier=front": ["web"], "app!=web": ["bare", "db"],
    "tier in (front, back)": ["db", "web"], "app notin (web)": ["bare", "db"], "tier": ["db", "web"],
    "!tier": ["bare"], "": ["bare", "db", "web"], "n>2": ["db"], "n<3": [],
}
BAD = ("a in ()", "a b", "-a=b", "a=b c", "a>x", ",a", "tier in (front", "a)", "a=b=c")


def _selected(text: str) -> list[str]:
    requirements = selectors.parse_label_selector(text)
    return sorted(n for n, labels in LABELS.items() if selectors.labels_match(requirements, labels))


def test_the_old_engines_are_gone():
    for module in ("netemu.label_selector", "netemu.controllers.selectors"):
        assert importlib.util.find_spec(module) is None, module
    # No other module evaluates selector operators itself (the loader validates
    # them against selectors' lists, and matches with selectors.matches).
    source = Path(netemu.__file__).parent
    found = []
    for path in sorted(source.rglob("*.py")):
        if path == source / "k8s" / "selectors.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Compare) and any(isinstance(op, ast.Eq) for op in node.ops):
                if any(isinstance(c, ast.Constant) and c.value in ("In", "NotIn", "DoesNotExist")
                       for c in [node.left, *node.comparators]):
                    found.append(f"{path.relative_to(source.parent)}:{node.lineno}")
    assert found == []


@pytest.mark.parametrize("text", CASES)
def test_strings_select_the_same_objects_in_the_cli_and_the_api(server, text):  # noqa: F811
    assert _selected(text) == CASES[text]
    for name, labels in LABELS.items():
        code, _ = call(server, "POST", "/api/v1/namespaces/default/pods",
                       {**POD, "metadata": {"name": name, "labels": labels}})
        assert code == 201
    code, body = call(server, "GET", "/api/v1/namespaces/default/pods?" + urlencode({"labelSelector": text}))
    assert code == 200 and sorted(p["metadata"]["name"] for p in body["items"]) == CASES[text]


@pytest.mark.parametrize("text", BAD)
def test_a_string_one_refuses_all_refuse(server, text):  # noqa: F811
    with pytest.raises(selectors.SelectorError) as err:
        selectors.parse_label_selector(text)
    code, body = call(server, "GET", "/api/v1/namespaces/default/pods?" + urlencode({"labelSelector": text}))
    assert (code, body["reason"], body["message"]) == (400, "BadRequest", str(err.value))
    assert "\n" not in str(err.value)


def test_object_selectors_empty_and_map():
    # On an object an empty selector selects nothing (an RC without one must not
    # claim every pod); a nodeSelector that is empty fits every node.
    assert not selectors.matches({}, {"a": "b"}) and not selectors.matches({"matchLabels": {}}, {"a": "b"})
    assert selectors.map_matches({}, {"a": "b"}) and not selectors.map_matches({"a": "c"}, {"a": "b"})
    node = {"metadata": {"name": "n1", "labels": {"disk": "ssd"}}}
    assert selectors.node_matches_pod({}, node) and not selectors.node_matches_pod({"nodeSelector": {"disk": "hdd"}},
                                                                                    node)


def test_the_loader_matches_with_the_same_engine():
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "d"},
                  "spec": {"selector": {"matchExpressions": [{"key": "app", "operator": "NotIn", "values": ["db"]}]},
                           "template": {"metadata": {"labels": {"app": "db"}},
                                        "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}
    with pytest.raises(Exception, match="selector"):
        manifests.normalize_object(deployment, "f", "document 1")
    deployment["spec"]["template"]["metadata"]["labels"]["app"] = "web"
    assert manifests.normalize_object(deployment, "f", "document 1")[0]["kind"] == "Deployment"
