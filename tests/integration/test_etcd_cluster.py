"""A whole cluster on etcd (issue 15): `netemu up --store etcd://HOST:PORT`
keeps every object, lease and flannel key in a real etcd (the test's own, on
loopback), under /netemu/<cluster>; control plane, agents, API server and CLI
all read and watch it there. Pod to pod across nodes for each backend, a
ClusterIP Service, the real kubectl, flannel's keys where flannel keeps them,
and `down` removing the cluster's keys only. Clusters se-*."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid

import pytest

from netemu import names
from netemu.store.etcd import EtcdStore
from tests.integration.clusters import assert_gone, cli, wait_for, write_topology

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def etcd(etcd_server_module):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    return etcd_server_module


def _topology(tmp_path, name: str, third: int) -> str:
    pod = lambda pname, node: {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pname, "labels": {"app": "web"}},
                               "spec": {"nodeName": node, "containers": [{"name": "c", "image": "nginx"}]}}
    return write_topology(tmp_path, name, {
        "cluster": {"timeScale": 0.01, "underlay": f"10.1.{third}.0/24", "serviceRange": f"10.{third}.0.0/16"},
        "nodes": [{"name": "a"}, {"name": "b"}],
        "workloads": [pod("web-a", "a"), pod("web-b", "b"),
                      {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
                       "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}]})


def pexec(cluster, pod, *argv, check=True):
    return cli("exec", "--cluster", cluster, pod, "--", *argv, check=check)


@pytest.mark.parametrize("backend,third", [("udp", 91), ("vxlan", 92), ("host-gw", 93)])
def test_a_cluster_on_etcd_carries_pod_traffic(etcd, tmp_path, backend, third):
    name = f"se-{backend.replace('-', '')}-{uuid.uuid4().hex[:3]}"
    path = _topology(tmp_path, name, third)
    endpoint = etcd.endpoint.replace("http://", "etcd://")
    try:
        cli("up", path, "--backend", backend, "--store", endpoint, "-q", timeout=180)
        assert json.load(open(os.path.join(names.state_dir(name), "store.json")))["namespace"] == f"/netemu/{name}"
        assert not os.path.exists(names.store_path(name))         # no SQLite file: etcd holds it all
        keys = [kv.key for kv in EtcdStore(etcd.endpoint).list(f"/netemu/{name}/")]
        subnets = [k for k in keys if k.startswith(f"/netemu/{name}/coreos.com/network/subnets/")]
        assert len(subnets) == 2 and f"/netemu/{name}/coreos.com/network/config" in keys
        if shutil.which("etcdctl"):
            # as a reader who knows flannel finds them (its --etcd-prefix)
            shown = subprocess.run(["etcdctl", "--endpoints", etcd.endpoint, "get", "--prefix",
                                    f"/netemu/{name}/coreos.com/network/subnets"], capture_output=True,
                                   text=True, timeout=30, env=dict(os.environ, ETCDCTL_API="3"))
            assert shown.returncode == 0 and shown.stdout.count('"PublicIP"') == 2, shown
        ips = json.loads(cli("get", "pods", "--cluster", name, "-o", "json").stdout)
        ip_of = {p["metadata"]["name"]: p["status"]["podIP"] for p in ips["items"]}
        # across nodes, both ways, and through the Service's ClusterIP
        for src, dst in (("web-a", "web-b"), ("web-b", "web-a")):
            out = wait_for(lambda: pexec(name, src, "curl", "-s", "-m", "3", ip_of[dst], check=False).stdout,
                           timeout=30, what=f"{src} -> {dst} over {backend}")
            assert f"pod {dst}," in out
        svc = json.loads(cli("get", "svc", "web", "--cluster", name, "-o", "json").stdout)["spec"]["clusterIP"]
        wait_for(lambda: "<p>pod web-" in pexec(name, "web-a", "curl", "-s", "-m", "3", svc, check=False).stdout,
                 timeout=30, what="the ClusterIP")
    finally:
        cli("down", name, check=False)
        assert_gone(name)
    assert EtcdStore(etcd.endpoint).list(f"/netemu/{name}/") == []      # down took its keys


def test_kubectl_and_a_second_cluster_on_the_same_etcd(etcd, tmp_path):
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("no kubectl")
    first, second = (f"se-k{i}-{uuid.uuid4().hex[:3]}" for i in (1, 2))
    endpoint = etcd.endpoint.replace("http://", "etcd://")
    kubeconfig = str(tmp_path / "kubeconfig")
    env = dict(os.environ, KUBECONFIG=kubeconfig)
    try:
        cli("up", _topology(tmp_path, first, 94), "--store", endpoint, "-q", timeout=180, env=env)
        cli("up", _topology(tmp_path, second, 95), "--store", endpoint, "-q", timeout=180, env=env)
        run = lambda *a: subprocess.run([kubectl, "--context", f"netemu-{first}", *a], env=env,
                                        capture_output=True, text=True, timeout=60)
        out = run("create", "configmap", "only-in-first", "--from-literal=a=b")
        assert out.returncode == 0, out.stderr
        assert "only-in-first" in run("get", "cm").stdout
        other = subprocess.run([kubectl, "--context", f"netemu-{second}", "get", "cm", "only-in-first"],
                               env=env, capture_output=True, text=True, timeout=60)
        assert other.returncode == 1 and "NotFound" in other.stderr
        # a name whose keys are in that etcd already (a cluster of that name on
        # another machine) is refused, and nothing of this up is left
        third = f"se-k3-{uuid.uuid4().hex[:3]}"
        EtcdStore(etcd.endpoint).put(f"/netemu/{third}/registry/namespaces/default", {"x": 1})
        proc = cli("up", _topology(tmp_path, third, 96), "--store", endpoint, "-q", check=False, env=env,
                   timeout=60)
        assert proc.returncode == 1 and f'etcd already holds keys of a cluster named "{third}"' in proc.stderr, \
            proc.stderr
        assert_gone(third)
        EtcdStore(etcd.endpoint).delete_prefix(f"/netemu/{third}/")
        cli("down", first, env=env)
        assert EtcdStore(etcd.endpoint).list(f"/netemu/{first}/") == []
        assert EtcdStore(etcd.endpoint).list(f"/netemu/{second}/")       # the other's keys stay
    finally:
        for name in (first, second):
            cli("down", name, check=False, env=env)
            assert_gone(name)
