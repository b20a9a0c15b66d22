"""`netemu shell NODE`: a shell inside a node, on a cluster of its own (hx-sh-*).

The shell's hostname is the node's, the machine's stays as it was; kubectl
inside reaches the cluster's API server with no configuration of the user's
(even when the user's KUBECONFIG points elsewhere); the command's exit status is
passed back; nothing is left once it exits; and a shell still open at `down` is
found and ended by teardown.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import uuid

import pytest
import yaml

from netemu import cluster as clusters, names
from tests.integration.clusters import NETEMU, assert_gone, cli, wait_for, write_topology

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

MASTER = "srv-k8s-master1"
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    tmp = tmp_path_factory.mktemp("shell")
    # The user's kubeconfig points at some other cluster: the shell must not follow it.
    kubeconfig = tmp / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "other",
        "clusters": [{"name": "other", "cluster": {"server": "https://192.0.2.1:6443"}}],
        "users": [{"name": "other", "user": {}}],
        "contexts": [{"name": "other", "context": {"cluster": "other", "user": "other"}}]}))
    env = dict(os.environ, KUBECONFIG=str(kubeconfig), KUBECACHEDIR=str(tmp / "cache"))
    env.pop(names.CLUSTER_ENV, None)
    name = f"hx-sh-{uuid.uuid4().hex[:4]}"
    path = write_topology(tmp, name, {
        "cluster": {"timeScale": 0.01, "underlay": "10.1.96.0/24"},
        "nodes": [{"name": MASTER, "address": "10.1.96.231", "unschedulable": True},
                  {"name": "worker1", "address": "10.1.96.232"}],
        "workloads": [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web"},
                       "spec": {"nodeName": "worker1", "containers": [
                           {"name": "c", "image": "busybox", "command": ["sleep", "infinity"]}]}}]})
    try:
        cli("up", path, "-q", timeout=180, env=env)
        yield name, env
    finally:
        subprocess.run(NETEMU + ["down", name], capture_output=True, timeout=180, env=env)
        if name in clusters.running_clusters():
            subprocess.run(NETEMU + ["clean", name], capture_output=True, timeout=180, env=env)
        assert_gone(name)


def shell(cluster, node, *command, stdin=None):
    name, env = cluster
    argv = NETEMU + ["shell", node, "--cluster", name]
    if command:
        argv += ["--", *command]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env, input=stdin)


def test_the_hostname_is_the_nodes_and_the_machines_is_unchanged(cluster):
    before = socket.gethostname()
    r = shell(cluster, MASTER, "hostname")
    assert (r.returncode, r.stdout.strip()) == (0, MASTER), r.stderr
    r = shell(cluster, "worker1", "hostname")
    assert (r.returncode, r.stdout.strip()) == (0, "worker1"), r.stderr
    assert socket.gethostname() == before
    assert subprocess.run(["hostname"], capture_output=True, text=True).stdout.strip() == before


def test_it_is_the_nodes_network_namespace(cluster):
    r = shell(cluster, MASTER, "ip", "-4", "-o", "addr", "show", "dev", "eth0")
    assert r.returncode == 0 and "10.1.96.231/24" in r.stdout, r.stdout + r.stderr
    mine = os.stat("/proc/self/ns/net").st_ino
    r = shell(cluster, MASTER, "stat", "-L", "-c", "%i", "/proc/self/ns/net")
    assert int(r.stdout) == os.stat(f"/run/netns/{names.node_ns(cluster[0], MASTER)}").st_ino != mine


@pytest.mark.skipif(not os.path.exists(KUBECTL), reason="no kubectl on this machine")
def test_kubectl_with_no_configuration_reaches_the_cluster(cluster):
    r = shell(cluster, MASTER, "kubectl", "get", "pods")
    assert r.returncode == 0 and "web" in r.stdout, r.stdout + r.stderr
    r = shell(cluster, MASTER, "curl", "-s", "http://localhost:8080/apis/extensions/v1beta1")
    assert r.returncode == 0 and '"daemonsets"' in r.stdout.replace(" ", ""), r.stdout + r.stderr
    # from a worker too: the API server's node, by its eth0 address
    r = shell(cluster, "worker1", "kubectl", "get", "nodes", "-o", "name")
    assert r.returncode == 0 and f"node/{MASTER}" in r.stdout, r.stdout + r.stderr
    # and with no command: the user's shell reads the commands from stdin
    r = shell(cluster, MASTER, stdin="hostname\nkubectl get pods -o name\nexit 3\n")
    assert r.returncode == 3 and r.stdout.split() == [MASTER, "pod/web"], r.stdout + r.stderr


def test_the_exit_status_is_passed_back(cluster):
    assert shell(cluster, MASTER, "sh", "-c", "exit 7").returncode == 7
    r = shell(cluster, MASTER, "no-such-command-hx")
    assert r.returncode == 127 and r.stderr.strip() == "netemu: no-such-command-hx: command not found"


def test_an_unknown_node_is_one_line_and_exit_1(cluster):
    r = shell(cluster, "nosuch", "true")
    assert r.returncode == 1 and r.stderr.strip() == 'Error from server (NotFound): nodes "nosuch" not found'


def test_nothing_is_left_after_the_shell_exits(cluster):
    name, _ = cluster
    before = set(clusters.cluster_processes(name))
    shell(cluster, MASTER, "sh", "-c", "echo $$")
    r = shell(cluster, MASTER, "sh", "-c", "echo $$")
    pid = int(r.stdout)
    assert not os.path.exists(f"/proc/{pid}")
    assert set(clusters.cluster_processes(name)) <= before


def test_down_ends_a_shell_that_is_still_open(tmp_path):
    """Its own cluster: a shell sits on the master (as a user's would), `down` runs from the machine."""
    name = f"hx-sh-{uuid.uuid4().hex[:4]}"
    env = dict(os.environ, KUBECONFIG=str(tmp_path / "kubeconfig"), KUBECACHEDIR=str(tmp_path / "cache"))
    env.pop(names.CLUSTER_ENV, None)
    path = write_topology(tmp_path, name, {
        "cluster": {"timeScale": 0.01, "underlay": "10.1.96.0/24"},
        "nodes": [{"name": MASTER, "address": "10.1.96.231", "unschedulable": True}]})
    proc = None
    try:
        cli("up", path, "-q", timeout=180, env=env)
        proc = subprocess.Popen(NETEMU + ["shell", MASTER, "--cluster", name, "--", "sleep", "600"],
                                env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        ns_ino = os.stat(f"/run/netns/{names.node_ns(name, MASTER)}").st_ino
        wait_for(lambda: os.stat(f"/proc/{proc.pid}/ns/net").st_ino == ns_ino and
                 open(f"/proc/{proc.pid}/comm").read().strip() == "sleep", 20, what="the shell's command")
        assert proc.pid in clusters.cluster_processes(name)
        cli("down", name, timeout=180, env=env)
        assert proc.wait(timeout=20) != 0
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        if name in clusters.running_clusters():
            subprocess.run(NETEMU + ["clean", name], capture_output=True, timeout=180, env=env)
        assert_gone(name)
