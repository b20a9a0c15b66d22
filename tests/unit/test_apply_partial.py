"""`apply -f DIR` / `create -f DIR` go on past bad files and objects, as kubectl does.

The verbs run on an in-process store (the API layer's admission, no cluster):
the good objects are stored with their `created` lines, each bad file or object
is one `error:` line on stderr after them, and the exit status is 1.
"""

import argparse
import textwrap

import pytest
import yaml

from netemu import workloads_cli as wl
from netemu.store import registry
from netemu.store.sqlite import SqliteStore
from netemu.topology.model import ClusterSettings, NodeSpec


def pod(name, restart="Always"):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"restartPolicy": restart,
                     "containers": [{"name": "c", "image": "busybox", "command": ["sleep", "60"]}]}}


def service(name, node_port=None):
    port = {"port": 80, "targetPort": 8080}
    if node_port:
        port["nodePort"] = node_port
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"type": "NodePort" if node_port else "ClusterIP", "selector": {"app": name},
                     "ports": [port]}}


def rc(name):
    return {"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": name},
            "spec": {"replicas": 1, "selector": {"app": name},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}}


@pytest.fixture
def store(tmp_path, monkeypatch):
    s = SqliteStore(str(tmp_path / "state.db"), create=True)
    monkeypatch.setattr(wl, "_open", lambda args: ("hfunit", s))
    monkeypatch.setattr(s, "close", lambda: None)     # the verbs close it; the test still reads
    monkeypatch.setattr(wl, "_cluster_context", lambda cluster, store: (
        ClusterSettings(), [NodeSpec(name="n1", labels={}, address=None, pod_cidr=None)]))
    yield s
    SqliteStore.close(s)


@pytest.fixture
def manifests(tmp_path):
    d = tmp_path / "manifests"
    d.mkdir()

    def write(name, *docs):
        (d / name).write_text(yaml.safe_dump_all(docs, sort_keys=False))
    write("a-pod.yaml", pod("p1"))
    (d / "b-syntax.yaml").write_text(textwrap.dedent("""\
        apiVersion: v1
        kind: Pod
        metadata: {name: broken
        """))
    write("c-multi.yaml", service("s1"), pod("p2", restart="Sometimes"), rc("rc1"))
    write("d-dup.yaml", pod("p1"))                                   # p1 again
    write("e-np1.yaml", service("np1", node_port=30080))
    write("f-np2.yaml", service("np2", node_port=30080))            # the same nodePort
    return d


def run(verb, path, capsys):
    func = {"apply": wl.cmd_apply, "create": wl.cmd_create}[verb]
    rc_ = func(argparse.Namespace(filename=[str(path)], namespace=None, cluster=None))
    out, err = capsys.readouterr()
    return rc_, out.splitlines(), [line for line in err.splitlines() if not line.startswith("Warning:")]


def stored(store):
    return sorted(f"{o['kind']}/{o['metadata']['name']}"
                  for kind in ("Pod", "Service", "ReplicationController") for o in registry.list_(store, kind))


GOOD = ["pod/p1 created", "service/s1 created", "replicationcontroller/rc1 created", "service/np1 created"]


def test_apply_dir_applies_the_good_files_and_reports_each_bad_one(store, manifests, capsys):
    code, out, err = run("apply", manifests, capsys)
    assert code == 1
    assert out == GOOD
    assert len(err) == 4, err
    assert all(line.startswith("error: ") for line in err)
    assert f"{manifests}/b-syntax.yaml" in err[0]
    assert f"{manifests}/c-multi.yaml: document 2 (Pod p2): spec.restartPolicy: Unsupported value" in err[1]
    assert f"{manifests}/d-dup.yaml" in err[2] and 'duplicate Pod "default/p1"' in err[2]
    assert f"{manifests}/f-np2.yaml" in err[3] and "30080" in err[3] and "already allocated" in err[3]
    assert stored(store) == ["Pod/p1", "ReplicationController/rc1", "Service/np1", "Service/s1"]
    # Again: the good ones are unchanged, the bad ones still reported.
    code, out, err = run("apply", manifests, capsys)
    assert code == 1 and out == [line.replace("created", "unchanged") for line in GOOD] and len(err) == 4


def test_create_dir_creates_the_good_files_and_names_the_file_of_an_existing_object(store, manifests, capsys):
    code, out, err = run("create", manifests, capsys)
    assert code == 1 and out == GOOD and len(err) == 4
    code, out, err = run("create", manifests, capsys)
    assert code == 1 and out == []
    assert f'Error from server (AlreadyExists): error when creating "{manifests}/a-pod.yaml": ' \
           'pods "p1" already exists' in err


def test_all_valid_is_exit_0_and_nothing_but_the_created_lines(store, tmp_path, capsys):
    path = tmp_path / "ok.yaml"
    path.write_text(yaml.safe_dump_all([pod("ok1"), service("ok2")], sort_keys=False))
    assert run("apply", path, capsys) == (0, ["pod/ok1 created", "service/ok2 created"], [])


def test_list_items_and_documents_are_taken_one_by_one(store, tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text(yaml.safe_dump_all([
        {"apiVersion": "v1", "kind": "List", "items": [pod("li1"), pod("li2", restart="Sometimes"), "junk"]},
        pod("doc2")], sort_keys=False))
    code, out, err = run("create", path, capsys)
    assert code == 1 and out == ["pod/li1 created", "pod/doc2 created"]
    assert [e.split(": ")[1] for e in err] == [f"{path}", f"{path}"]
    assert "document 1 items[1] (Pod li2): spec.restartPolicy" in err[0]
    assert "document 1 items[2]: expected a Kubernetes object" in err[1]


def test_nothing_at_all_is_an_error_naming_the_verb(store, tmp_path, capsys):
    path = tmp_path / "empty.yaml"
    path.write_text("---\n")
    with pytest.raises(wl.WorkloadCliError, match="no objects passed to create"):
        run("create", path, capsys)


def test_a_missing_path_stops_before_anything_is_applied(store, manifests, capsys):
    with pytest.raises(wl.WorkloadCliError, match='the path ".*nope" does not exist'):
        wl.cmd_apply(argparse.Namespace(filename=[str(manifests), str(manifests / "nope")],
                                        namespace=None, cluster=None))
    assert stored(store) == []
