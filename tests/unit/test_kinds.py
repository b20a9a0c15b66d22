"""netemu.k8s.kinds is the one table of kinds: the store, the CLI, the loader and
the API server derive every kind's names, scope, version and store path from it.

The source scan below is what keeps it the only one: a second table (a dict of
kinds to their scope or apiVersion, a tuple of the words that name a kind, a
`kind.lower() + "s"` pluraliser) is how `netemu get ep nosuch` once printed
`endpointss "nosuch" not found`.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

import netemu
from netemu import api, kubectl_verbs, workloads_cli
from netemu.k8s import kinds
from netemu.store import registry
from netemu.topology import manifests

SOURCE = Path(netemu.__file__).parent
KINDS_MODULE = SOURCE / "k8s" / "kinds.py"
_GROUP_VERSION = re.compile(r"^[a-z0-9.]+/v\d+((alpha|beta)\d+)?$")


def _modules():
    for path in sorted(SOURCE.rglob("*.py")):
        if path != KINDS_MODULE:
            yield path.relative_to(SOURCE.parent), ast.parse(path.read_text(), str(path))


def _strings(nodes) -> list[str]:
    return [n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def _kind_tables(tree: ast.AST) -> list[tuple[int, str]]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Tuple, ast.List, ast.Set, ast.Dict)):
            elts = node.keys if isinstance(node, ast.Dict) else node.elts
            named = [kinds.ALIASES[w] for w in _strings(elts) if w in kinds.ALIASES]
            if len(named) != len(set(named)):
                found.append((node.lineno, "names one kind by several words (kinds.Kind.words)"))
            if isinstance(node, ast.Dict) and len([k for k in _strings(node.keys) if k in kinds.BY_KIND]) >= 3:
                leaves = [n for v in node.values for n in ast.walk(v) if isinstance(n, ast.Constant)]
                if any(isinstance(n.value, bool) or (isinstance(n.value, str) and _GROUP_VERSION.match(n.value))
                       for n in leaves):
                    found.append((node.lineno, "maps kinds to their scope or apiVersion (kinds.Kind)"))
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add)
                and isinstance(node.right, ast.Constant) and node.right.value == "s"):
            found.append((node.lineno, 'makes a plural with + "s" (kinds.Kind.resource)'))
        if isinstance(node, ast.JoinedStr):          # f"{kind.lower()}s"
            for part, after in zip(node.values, node.values[1:]):
                if (isinstance(part, ast.FormattedValue) and isinstance(part.value, ast.Call)
                        and isinstance(part.value.func, ast.Attribute) and part.value.func.attr == "lower"
                        and isinstance(after, ast.Constant) and str(after.value).startswith("s")):
                    found.append((node.lineno, 'makes a plural with f"{...lower()}s" (kinds.Kind.resource)'))
    return found


def test_no_module_but_kinds_keeps_a_kind_table():
    found = [f"{path}:{line}: {what}" for path, tree in _modules() for line, what in _kind_tables(tree)]
    assert found == []


@pytest.mark.parametrize("source", [
    'KINDS = {"Pod": ("pods", True, "v1"), "Service": ("services", True, "v1"), "Job": ("jobs", True, "batch/v1")}',
    'WORDS = ("", "pod", "po", "pods")',
    'plural = kind.lower() + "s"',
    'message = f\'{kind.lower()}s "{name}" not found\'',
    'API_VERSIONS = {"Pod": {"v1": "v1"}, "Job": {"batch/v1": "batch/v1"}, "ReplicaSet": {"apps/v1": "apps/v1"}}',
])
def test_the_scan_finds_a_second_table(source):
    # The scan above must be able to fail: each of these is a table it refuses.
    assert _kind_tables(ast.parse(source))


def test_the_store_derives_its_keys_from_kinds():
    for name in ("KINDS", "SHORT_NAMES", "kind_of", "kind_word"):
        assert not hasattr(registry, name), f"registry.{name} duplicates netemu.k8s.kinds"
    for k in kinds.KINDS:
        assert registry.prefix(k.kind).startswith(f"/registry/{k.path}/")
    # kube-apiserver's own paths, which other tools reading the store expect
    assert registry.key("Node", None, "n1") == "/registry/minions/n1"
    assert registry.key("Service", "ns1", "web") == "/registry/services/specs/ns1/web"
    assert registry.key("ReplicationController", None, "rc1") == "/registry/controllers/default/rc1"


@pytest.mark.parametrize("word, kind", [
    ("po", "Pod"), ("pods", "Pod"), ("Pod", "Pod"), ("SVC", "Service"), ("ep", "Endpoints"),
    ("endpoints", "Endpoints"), ("rc", "ReplicationController"), ("deploy", "Deployment"),
    ("jobs", "Job"), ("no", "Node"), ("ns", "Namespace"), ("endpointslices", "EndpointSlice"),
])
def test_resolve(word, kind):
    assert kinds.resolve(word) == kind


def test_kubectl_words():
    # Messages name a resource with its group, as kubectl prints them.
    assert kinds.BY_KIND["Endpoints"].qualified() == "endpoints"
    assert kinds.BY_KIND["Job"].qualified() == "jobs.batch"
    assert kinds.BY_KIND["ReplicationController"].ref("x") == "replicationcontroller/x"
    assert kinds.BY_KIND["Deployment"].ref("x") == "deployment.apps/x"
    assert workloads_cli._kind("ep") == "Endpoints"
    with pytest.raises(workloads_cli.WorkloadCliError, match='resource type "pod2"'):
        workloads_cli._kind("pod2")


def test_loader_and_admission_read_the_table():
    # The apiVersions a manifest may give are the kind's current and old ones.
    obj, warnings = manifests.normalize_object(
        {"apiVersion": "extensions/v1beta1", "kind": "DaemonSet", "metadata": {"name": "d"},
         "spec": {"template": {"metadata": {"labels": {"a": "b"}},
                               "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}, "f", "document 1")
    assert obj["apiVersion"] == kinds.stored_version("DaemonSet") == "apps/v1"
    with pytest.raises(Exception, match=r"accepted: apps/v1, apps/v1beta2, extensions/v1beta1\)"):
        manifests.normalize_object({"apiVersion": "apps/v1beta1", "kind": "ReplicaSet", "metadata": {"name": "r"},
                                    "spec": {}}, "f", "document 1")
    assert api._resource("Endpoints") == "endpoints"
    assert set(kinds.WORKLOADS) == {"ReplicationController", "ReplicaSet", "Deployment", "DaemonSet", "Job"}


def test_admission_names_resources_as_kubectl_does(tmp_path):
    # api.py's refusals name the resource with its group (kubectl's words), so
    # no caller re-words them; the API server swaps in the group the client used.
    from netemu.apiserver.server import ApiServer, ensure_system_namespaces
    from tests.unit.test_apiserver import call
    from tests.unit.test_controllers_support import open_store

    store = open_store(tmp_path)
    ensure_system_namespaces(store)
    for verb in (lambda: api.delete(store, "Deployment", "default", "nosuch"),
                 lambda: kubectl_verbs.scale(store, "Deployment", "nosuch", 1),
                 lambda: kubectl_verbs.label(store, "deploy", "nosuch", ["a=b"])):
        with pytest.raises(api.ApiError, match=r'^deployments\.apps "nosuch" not found$'):
            verb()
    with pytest.raises(api.ApiError, match=r'^endpoints "nosuch" not found$'):
        api.delete(store, "Endpoints", "default", "nosuch")
    server = ApiServer(store)
    for group, qualified in (("apps/v1", "deployments.apps"), ("extensions/v1beta1", "deployments.extensions")):
        code, body = call(server, "PATCH", f"/apis/{group}/namespaces/default/deployments/nosuch/scale",
                          {"spec": {"replicas": 1}}, content_type="application/merge-patch+json")
        assert (code, body["message"]) == (404, f'{qualified} "nosuch" not found')
    store.close()
