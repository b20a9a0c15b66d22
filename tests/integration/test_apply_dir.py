"""`netemu apply -f DIR` / `create -f DIR` on a real cluster (name hfapply), through
the netemu command: the valid files are applied and their pods run, each bad
file or object is an `error:` line on stderr after the applied ones, exit 1."""

from __future__ import annotations

import yaml
import pytest

import netemu
from netemu import cluster as clusters
from netemu.store import registry

from .clusters import assert_gone, cli, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

NAME = "hfapply"


@pytest.fixture
def lab():
    try:
        with netemu.up({"name": NAME, "nodes": [{"name": "n1"}]}) as cluster:
            yield cluster
    finally:
        assert_gone(NAME)


def pod(name, **spec):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "600"]}], **spec}}


def test_apply_and_create_a_directory_with_bad_files(lab, tmp_path):
    d = tmp_path / "manifests"
    d.mkdir()
    (d / "1-good.yaml").write_text(yaml.safe_dump(pod("good1")))
    (d / "2-broken.yaml").write_text("apiVersion: v1\nkind: Pod\nmetadata: [oops\n")
    (d / "3-mixed.yaml").write_text(yaml.safe_dump_all(
        [pod("good2"), pod("Bad_Name"), pod("bad-env", restartPolicy="Sometimes")], sort_keys=False))
    cluster = lab.name
    proc = cli("apply", "--cluster", cluster, "-f", str(d), check=False)
    assert proc.returncode == 1
    assert proc.stdout == "pod/good1 created\npod/good2 created\n"
    errors = [line for line in proc.stderr.splitlines() if not line.startswith("Warning:")]
    assert len(errors) == 3 and all(line.startswith("error: ") for line in errors), proc.stderr
    assert errors[0].startswith(f"error: {d}/2-broken.yaml: ")
    assert errors[1].startswith(f"error: {d}/3-mixed.yaml: document 2 (Pod Bad_Name): metadata.name")
    assert errors[2].startswith(f"error: {d}/3-mixed.yaml: document 3 (Pod bad-env): spec.restartPolicy")
    store = clusters.open_store(cluster)
    try:
        for name in ("good1", "good2"):
            wait_for(lambda: (registry.get(store, "Pod", "default", name) or {}).get("status", {})
                     .get("phase") == "Running", timeout=60, what=f"{name} running")
        assert sorted(p["metadata"]["name"] for p in registry.list_(store, "Pod")) == ["good1", "good2"]
    finally:
        store.close()
    proc = cli("create", "--cluster", cluster, "-f", str(d), check=False)
    assert proc.returncode == 1 and proc.stdout == ""
    assert f'Error from server (AlreadyExists): error when creating "{d}/1-good.yaml": ' \
           'pods "good1" already exists' in proc.stderr
    assert f"error: {d}/2-broken.yaml: " in proc.stderr
