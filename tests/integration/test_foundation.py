"""A cluster from a topology file: what gets built, what the CLI shows, and that
down/clean/rollback leave nothing behind."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest

from netemu import cluster as clusters, names, netns
from netemu.store import registry
from netemu.topology.loader import load_topology

from .clusters import assert_gone, cli, running, wait_for, write_topology

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

TOPOLOGIES = os.path.join(os.path.dirname(__file__), "..", "..", "topologies")


def pod(name, node=None, containers=None, restart="Always", labels=None):
    spec = {"containers": containers or [{"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]}],
            "restartPolicy": restart}
    if node:
        spec["nodeName"] = node
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels or {}}, "spec": spec}


def test_tutorial_step1_containers_share_localhost_and_hostports(tmp_path):
    """The tutorial's first section on its own cluster: two containers of nginxpod
    reach each other on localhost; the node's address answers on both hostPorts."""
    with running(os.path.join(TOPOLOGIES, "tutorial.yaml"), name="tf-tut") as (name, summary):
        pods = {p["metadata"]["name"]: p for p in summary["pods"]}
        nginxpod = pods["nginxpod"]
        assert nginxpod["status"]["phase"] == "Running"
        node = nginxpod["spec"]["nodeName"]
        assert node != "srv-k8s-master1", "the master is unschedulable"
        out = cli("exec", "--cluster", name, "nginxpod", "-c", "nginx80", "--",
                  "curl", "-s", "-m", "5", "localhost:8800").stdout
        assert "container nginx8800" in out
        out = cli("exec", "--cluster", name, "nginxpod", "-c", "nginx8800", "--",
                  "curl", "-s", "-m", "5", "localhost:80").stdout
        assert "container nginx80" in out
        # hostPort: from the external client, on the node's underlay address
        node_ip = nginxpod["status"]["hostIP"]
        for port, container in ((80, "nginx80"), (8800, "nginx8800")):
            out = cli("client", "--cluster", name, "exec", "--", "curl", "-s", "-m", "5",
                      f"{node_ip}:{port}").stdout
            assert f"container {container}" in out
        # The tutorial's `ip add | grep inet` on the node: docker0 holds 192.168.x.1/24.
        ip_add = netns.run(names.node_ns(name, node), ["ip", "-4", "-o", "addr"]).stdout
        pod_ip = nginxpod["status"]["podIP"]
        gateway = ".".join(pod_ip.split(".")[:3]) + ".1/24"
        assert f"inet {gateway}" in ip_add and "docker0" in ip_add
        described = cli("describe", "--cluster", name, "pod", "nginxpod").stdout
        for needle in (f"Node:             {node}/{node_ip}", f"IP:               {pod_ip}",
                       "nginx80:", "nginx8800:", "Pause PID:", names.pod_ns(name, "default", "nginxpod")):
            assert needle in described
        table = cli("get", "--cluster", name, "pods", "nginxpod").stdout.splitlines()
        assert table[0].split() == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
        assert table[1].split()[:4] == ["nginxpod", "2/2", "Running", "0"]


def test_pods_get_addresses_hostnames_and_logs(tmp_path):
    # A node named after one of ip's keywords ("master") must work too.
    path = write_topology(tmp_path, "tf-basic", {
        "nodes": [{"name": "master"}, {"name": "n2"}],
        "workloads": [pod("a", "master"), pod("b", "master"), pod("c", "n2")]})
    with running(path) as (name, summary):
        pods = {p["metadata"]["name"]: p for p in summary["pods"]}
        ips = {n: p["status"]["podIP"] for n, p in pods.items()}
        assert len(set(ips.values())) == 3
        wide = cli("get", "--cluster", name, "pods", "-o", "wide").stdout.splitlines()
        assert wide[0].split()[:7] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
        # each pod: eth0 with its IP, hostname = pod name, default route via docker0
        for n, p in pods.items():
            assert cli("exec", "--cluster", name, n, "--", "hostname").stdout.strip() == n
            routes = cli("exec", "--cluster", name, n, "--", "ip", "route").stdout
            assert routes.startswith("default via ")
        # same-node pods talk over docker0
        out = cli("exec", "--cluster", name, "a", "--", "curl", "-s", "-m", "5", f"{ips['b']}").stdout
        assert "pod b" in out
        logs = cli("logs", "--cluster", name, "b").stdout
        assert "response:200" in logs
        as_json = json.loads(cli("get", "--cluster", name, "pod", "a", "-o", "json").stdout)
        assert as_json["kind"] == "Pod" and as_json["metadata"]["resourceVersion"]


def test_restart_policies_and_statuses(tmp_path):
    path = write_topology(tmp_path, "tf-restart", {
        "cluster": {"timeScale": 0.02},
        "nodes": [{"name": "n1"}],
        "workloads": [
            pod("fails-onfailure", "n1", [{"name": "c", "image": "busybox", "command": ["sh", "-c", "exit 3"]}],
                restart="OnFailure"),
            pod("fails-never", "n1", [{"name": "c", "image": "busybox", "command": ["sh", "-c", "exit 3"]}],
                restart="Never"),
            pod("succeeds", "n1", [{"name": "c", "image": "busybox", "command": ["sh", "-c", "echo done"]}],
                restart="Never"),
            pod("unknown-image", "n1", [{"name": "c", "image": "example.com/team/app:1.2"}]),
        ]})
    with running(path) as (name, summary):
        store = clusters.open_store(name)

        def restarts():
            p = registry.get(store, "Pod", "default", "fails-onfailure")
            return sum(c.get("restartCount", 0) for c in p["status"].get("containerStatuses", [])) >= 2
        wait_for(restarts, what="OnFailure restarts")
        wait_for(lambda: registry.get(store, "Pod", "default", "fails-never")["status"].get("phase") == "Failed",
                 what="Never pod to fail")
        wait_for(lambda: registry.get(store, "Pod", "default", "succeeds")["status"].get("phase") == "Succeeded",
                 what="pod to succeed")
        table = {line.split()[0]: line.split() for line in cli("get", "--cluster", name, "pods").stdout.splitlines()[1:]}
        assert table["fails-never"][2] == "Error" and table["fails-never"][3] == "0"
        assert table["succeeds"][2] == "Completed"
        assert table["fails-onfailure"][2] in ("CrashLoopBackOff", "Error", "Running")
        assert int(table["fails-onfailure"][3]) >= 2
        assert cli("logs", "--cluster", name, "succeeds").stdout == "done\n"
        # An image netemu does not emulate, with no command: an idle process, and
        # a warning event that says so.
        assert table["unknown-image"][2] == "Running"
        described = cli("describe", "--cluster", name, "pod", "unknown-image").stdout
        assert "ImageNotEmulated" in described and "example.com/team/app:1.2" in described


def test_down_removes_only_its_own_cluster(tmp_path):
    a = write_topology(tmp_path, "tf-side-a", {"nodes": [{"name": "n1"}], "workloads": [pod("p", "n1")]})
    b = write_topology(tmp_path, "tf-side-b", {"nodes": [{"name": "n1"}], "workloads": [pod("p", "n1")]})
    with running(b) as (name_b, _):
        topo = load_topology(a)
        try:
            clusters.up(topo)
            pids_b = clusters.cluster_processes(name_b)
            cli("down", "tf-side-a")
            assert_gone("tf-side-a")
            assert all(os.path.exists(f"/proc/{p}") for p in pids_b)
            out = cli("exec", "--cluster", name_b, "p", "--", "curl", "-s", "-m", "5", "localhost").stdout
            assert "pod p" in out
        finally:
            clusters.teardown("tf-side-a", graceful=False)


def test_down_stops_processes_started_by_hand_in_its_namespaces(tmp_path):
    # `ip netns exec <pod namespace> ...` leaves no tag in the environment; the
    # pod's namespace is deleted by the graceful stop, but the process would keep
    # it alive, invisible, if it were not found by its namespace first.
    path = write_topology(tmp_path, "tf-stray", {"nodes": [{"name": "n1"}], "workloads": [pod("p", "n1")]})
    with running(path) as (name, _):
        stray = subprocess.Popen(["ip", "netns", "exec", names.pod_ns(name, "default", "p"), "sleep", "300"])
        node_stray = subprocess.Popen(["ip", "netns", "exec", names.node_ns(name, "n1"), "sleep", "300"])
        try:
            time.sleep(0.3)
            cli("down", name)
            assert stray.wait(timeout=10) == -signal.SIGKILL
            assert node_stray.wait(timeout=10) == -signal.SIGKILL
        finally:
            for proc in (stray, node_stray):
                proc.kill()
                proc.wait()


def test_clean_after_kill_9(tmp_path):
    path = write_topology(tmp_path, "tf-crash", {"nodes": [{"name": "n1"}, {"name": "n2"}],
                                                 "workloads": [pod("p1", "n1"), pod("p2", "n2")]})
    topo = load_topology(path)
    try:
        clusters.up(topo)
        pids = clusters.cluster_processes(topo.name)
        assert len(pids) >= 6     # control plane, 2 overlay daemons, 2 pause, 2 servers
        for p in pids:
            os.kill(p, signal.SIGKILL)
        time.sleep(0.2)
        cli("clean", "tf-crash")
        assert_gone("tf-crash")
    finally:
        clusters.teardown(topo.name, graceful=False)


@pytest.mark.parametrize("step", ["node", "store"])
def test_failed_up_rolls_back(tmp_path, step):
    path = write_topology(tmp_path, f"tf-fail{step}", {"nodes": [{"name": "n1"}, {"name": "n2"}],
                                                        "workloads": [pod("p", "n1")]})
    topo = load_topology(path)
    with pytest.raises(clusters.ClusterError, match="injected"):
        clusters.up(topo, fail_after=step)
    assert_gone(topo.name)


def test_bad_manifest_builds_nothing(tmp_path):
    path = write_topology(tmp_path, "tf-bad", {"nodes": [{"name": "n1"}],
                                               "workloads": [pod("p", "n1", [{"name": "c", "image": "nginx",
                                                                              "ports": [{"containerPort": 70000}]}])]})
    proc = cli("up", path, check=False)
    assert proc.returncode == 1
    assert "containerPort" in proc.stderr and "tf-bad.yaml" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert_gone("tf-bad")


def test_cluster_is_sealed_from_the_machine(tmp_path):
    """No interface of the cluster has its other end outside the cluster's own
    namespaces, so no emulated packet can reach the machine's network; a pod
    cannot reach the machine's own address."""
    from netemu import journal

    path = write_topology(tmp_path, "tf-seal", {"nodes": [{"name": "n1"}, {"name": "n2"}],
                                                "workloads": [pod("p", "n1")]})
    with running(path) as (name, _):
        own = [ns for kind, ns in journal.entries(name) if kind == "netns"]
        assert names.pod_ns(name, "default", "p") in own
        for ns in own:
            ids = {e["nsid"]: e.get("name") for e in json.loads(
                netns.run(ns, ["ip", "-j", "netns", "list-id"]).stdout or "[]")}
            for link in json.loads(netns.run(ns, ["ip", "-j", "-d", "link", "show"]).stdout):
                if "link_netnsid" in link:
                    peer = ids.get(link["link_netnsid"])
                    assert peer in own, f"{ns}: {link['ifname']} leads to namespace {peer!r}"
        machine = [a["local"] for l in json.loads(subprocess.run(["ip", "-j", "addr"], capture_output=True,
                                                                 text=True).stdout)
                   for a in l.get("addr_info", []) if a.get("family") == "inet" and l["ifname"] != "lo"]
        for addr in machine:
            out = cli("exec", "--cluster", name, "p", "--", "ping", "-c", "1", "-W", "1", addr, check=False)
            assert out.returncode != 0 and " 0 received" in out.stdout


def test_netns_create_names_a_namespace_as_ip_netns_attach_does():
    """netns.create names its namespace in-process as `ip netns attach` would:
    ip lists it, `ip netns exec` enters it (its own loopback, nothing else),
    its name leads to the inode create returned, and a taken name is refused
    without touching the namespace that holds it."""
    name = "fd-netns-create"
    try:
        ino = netns.create(name)
        assert name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        links = subprocess.run(["ip", "netns", "exec", name, "ip", "-o", "link"], capture_output=True,
                               text=True, check=True).stdout.splitlines()
        assert len(links) == 1 and ": lo:" in links[0]
        assert netns.inode(name) == ino
        with pytest.raises(netns.NetnsError, match="already exists"):
            netns.create(name)
        assert netns.inode(name) == ino
    finally:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)


def test_netns_delete_unmounts_and_unlinks_as_ip_netns_delete_does():
    """netns.delete makes the syscalls `ip netns delete` makes (a lazy unmount
    of the name's bind mount, then the file), in-process: afterwards neither
    `ip netns list` nor this process's mount table knows the name; a bare file
    left by an attach that never happened goes too; a name already gone is
    False."""
    name = "fd-netns-delete"
    bare = "fd-netns-bare"
    try:
        netns.create(name)
        assert name in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert netns.delete(name)
        assert name not in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        with open("/proc/self/mountinfo") as f:
            assert f"/run/netns/{name} " not in f.read()
        assert not netns.delete(name)
        open(netns.path(bare), "w").close()
        assert netns.delete(bare) and not os.path.exists(netns.path(bare))
    finally:
        for n in (name, bare):
            subprocess.run(["ip", "netns", "delete", n], capture_output=True)
