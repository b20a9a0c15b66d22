"""Issue 12 items 4, 5, 11 and 17 on a running cluster (names hc-in-*): what the
API server refuses never reaches a kubelet, a pod name longer than a hostname
still gets a running pod, and a Job's labels come from its template."""

from __future__ import annotations

import os
import uuid

import pytest
import yaml

from netemu import cluster as clusters
from netemu.store import registry

from .clusters import cli, lab, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

# A valid pod name (a DNS subdomain may be 253 characters) longer than the 64
# bytes Linux allows a hostname: the kubelet's rule gives "a" * 62.
LONG_NAME = "a" * 62 + "-" + "b" * 37


def stored(cluster: str, kind: str, name: str) -> dict | None:
    store = clusters.open_store(cluster)
    try:
        return registry.get(store, kind, "default", name)
    finally:
        store.close()


def apply(cluster: str, tmp_path, name: str, obj: dict, check: bool = False):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(obj))
    return cli("apply", "--cluster", cluster, "-f", str(path), check=check)


def test_refusals_and_long_pod_names_on_a_running_cluster(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"hc-in-{uuid.uuid4().hex[:4]}"
    long_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": LONG_NAME},
                "spec": {"containers": [{"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]}]}}
    with lab({"name": name, "nodes": [{"name": "n1"}], "workloads": [long_pod]}):
        cluster = name
        # The long-named pod runs, with the kubelet's truncated hostname.
        wait_for(lambda: (stored(cluster, "Pod", LONG_NAME) or {}).get("status", {}).get("phase") == "Running",
                 timeout=60, what="the long-named pod to run")
        assert cli("exec", "--cluster", cluster, LONG_NAME, "--", "hostname").stdout.strip() == "a" * 62

        # An env var name with '=' is refused by apply, with the API server's words.
        bad_env = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "badenv"},
                   "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "60"],
                                            "env": [{"name": "A=B", "value": "x"}]}]}}
        proc = apply(cluster, tmp_path, "badenv.yaml", bad_env)
        assert proc.returncode != 0
        assert ('spec.containers[0].env[0].name: Invalid value: "A=B": a valid environment variable name '
                "must consist only of printable ASCII characters other than '='") in proc.stderr
        assert stored(cluster, "Pod", "badenv") is None

        # replicas beyond int32 is refused; so is scaling to it.
        rc = {"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": "huge"},
              "spec": {"replicas": 2147483648, "selector": {"app": "huge"},
                       "template": {"metadata": {"labels": {"app": "huge"}},
                                    "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}}
        proc = apply(cluster, tmp_path, "huge.yaml", rc)
        assert proc.returncode != 0
        assert ("spec.replicas: cannot unmarshal number 2147483648 into Go struct field "
                "ReplicationControllerSpec.spec.replicas of type int32") in proc.stderr
        assert stored(cluster, "ReplicationController", "huge") is None
        rc["spec"]["replicas"] = 0
        apply(cluster, tmp_path, "huge.yaml", rc, check=True)
        proc = cli("scale", "--cluster", cluster, "rc", "huge", "--replicas=2147483648", check=False)
        assert proc.returncode != 0 and "of type int32" in proc.stderr
        assert stored(cluster, "ReplicationController", "huge")["spec"]["replicas"] == 0

        # A Job's labels default from its template (parallelism 0: it runs nothing).
        job = {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": "labelled"},
               "spec": {"parallelism": 0, "template": {
                   "metadata": {"labels": {"image": "ubuntu", "owner": "lz", "test": "dpkg"}},
                   "spec": {"restartPolicy": "Never",
                            "containers": [{"name": "c", "image": "ubuntu", "command": ["true"]}]}}}}
        apply(cluster, tmp_path, "job.yaml", job, check=True)
        assert stored(cluster, "Job", "labelled")["metadata"]["labels"] == {
            "image": "ubuntu", "owner": "lz", "test": "dpkg"}
