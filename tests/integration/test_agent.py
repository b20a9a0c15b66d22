"""One agent process per node (issue 14), on a real two-node udp cluster (names hna*):
its parts (kubelet, proxy, overlay) share the process, the udp workers do not, and
a part that fails is restarted alone inside the agent."""

from __future__ import annotations

import os
import re
import signal
import time
import uuid

import pytest

from netemu import cluster as clusters, names, netns
from netemu.node import agent
from netemu.overlay import fastudp
from netemu.store import registry
from tests.integration.clusters import running, wait_for, write_topology

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root")


def pod(name: str, node: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name},
            "spec": {"nodeName": node, "containers": [
                {"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]}]}}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    name = f"hna{uuid.uuid4().hex[:4]}"
    path = write_topology(tmp_path_factory.mktemp("topo"), name, {
        "cluster": {"backend": "udp", "timeScale": 0.125},
        "nodes": [{"name": "n1"}, {"name": "n2"}],
        "workloads": [pod("a1", "n1"), pod("b1", "n2")]})
    with running(path) as (cluster_name, _):
        yield cluster_name


def argv(pid: int) -> list[str]:
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        return [a.decode() for a in f.read().split(b"\0") if a]


def agent_pid(cluster: str, node: str) -> int:
    with open(agent.pid_path(cluster, node)) as f:
        return int(f.read())


def children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(k) for k in f.read().split()]


def stats(cluster: str, node: str, what: str) -> dict:
    import json
    with open(os.path.join(names.node_dir(cluster, node), f"{what}-stats.json")) as f:
        return json.load(f)


def curl(cluster: str, src: str, ip: str) -> str:
    return netns.run(names.pod_ns(cluster, "default", src), ["curl", "-s", "-m", "2", f"http://{ip}/"],
                     check=False, timeout=10).stdout


def pod_ip(cluster: str, name: str) -> str:
    store = clusters.open_store(cluster)
    try:
        return registry.get(store, "Pod", "default", name)["status"]["podIP"]
    finally:
        store.close()


def test_one_agent_process_per_node_runs_kubelet_proxy_and_overlay(cluster):
    procs = clusters.cluster_processes(cluster)
    commands = {pid: argv(pid) for pid in procs if os.path.exists(f"/proc/{pid}")}
    modules = [a[a.index("-m") + 1] for a in commands.values() if "-m" in a]
    # No separate overlay or proxy daemon any more: one agent per node.
    assert "netemu.overlay.daemon" not in modules and "netemu.proxy.daemon" not in modules, modules
    agents = {a[-1]: pid for pid, a in commands.items() if "netemu.node.agent" in a}
    assert sorted(agents) == ["n1", "n2"], commands
    for node, pid in agents.items():
        assert agent_pid(cluster, node) == pid
        # The agent lives in its node's namespace...
        assert os.stat(f"/proc/{pid}/ns/net").st_ino == netns.inode(names.node_ns(cluster, node))
        # ...and its parts publish from it: overlay, proxy (and the kubelet's pods run).
        assert stats(cluster, node, "overlay")["pid"] == pid
        assert stats(cluster, node, "proxy")["pid"] == pid
        # The udp data path stays in processes of its own, the agent's children.
        workers = stats(cluster, node, "overlay")["workers"]
        assert sorted(workers) == ["rx", "tx"]
        assert set(workers.values()) <= set(children(pid))
        assert all(fastudp.worker_direction([a.encode() for a in argv(w)]) for w in workers.values())
    # The heartbeat is the agent's: the node's Lease is renewed.
    store = clusters.open_store(cluster)
    try:
        first = registry.get(store, "Lease", "kube-node-lease", "n1")["spec"]["renewTime"]
        wait_for(lambda: registry.get(store, "Lease", "kube-node-lease", "n1")["spec"]["renewTime"] != first,
                 timeout=10, what="a lease renewal")
    finally:
        store.close()
    assert "pod b1" in curl(cluster, "a1", pod_ip(cluster, "b1"))


def test_a_failing_part_is_restarted_alone_inside_the_agent(cluster):
    """The overlay part gives up after too many udp worker restarts (udp.RESTART_LIMIT):
    the agent restarts that part alone; the kubelet's pods and the agent stay."""
    from netemu.overlay import udp

    pid = agent_pid(cluster, "n1")
    store = clusters.open_store(cluster)
    try:
        status = registry.get(store, "Pod", "default", "a1")["status"]
    finally:
        store.close()
    container = int(status["containerStatuses"][0]["containerID"].removeprefix("pid://"))
    proxy_syncs = stats(cluster, "n1", "proxy")["syncs"]
    killed = set()
    deadline = time.monotonic() + 30
    # Kill the rx worker, as each replacement appears, until the part gives up.
    while time.monotonic() < deadline:
        log = open(agent.part_log_path(cluster, "n1", "overlay")).read()
        if "overlay failed" in log:
            break
        w = stats(cluster, "n1", "overlay").get("workers", {}).get("rx")
        if w and w not in killed and os.path.exists(f"/proc/{w}"):
            os.kill(w, signal.SIGKILL)
            killed.add(w)
        time.sleep(0.05)
    assert len(killed) > udp.RESTART_LIMIT[0]
    log = open(agent.part_log_path(cluster, "n1", "overlay")).read()
    assert re.search(r"overlay failed: RuntimeError: udp data path: \d+ worker restarts in 30 s: giving up; "
                     r"restarting in 1 s \(restart 1\)", log), log[-2000:]
    # The agent did not restart; the overlay part did, with new workers, and traffic resumes.
    wait_for(lambda: curl(cluster, "a1", pod_ip(cluster, "b1")).find("pod b1") >= 0, timeout=30,
             what="a1 -> b1 after the overlay part's restart")
    assert agent_pid(cluster, "n1") == pid and os.path.exists(f"/proc/{pid}")
    assert stats(cluster, "n1", "overlay")["pid"] == pid
    # The other parts were not restarted: the same container runs, the proxy kept its count.
    assert os.path.exists(f"/proc/{container}")
    assert stats(cluster, "n1", "proxy")["syncs"] >= proxy_syncs
    assert "restarting" not in open(agent.part_log_path(cluster, "n1", "proxy")).read()
    # A Warning event on the node says so.
    store = clusters.open_store(cluster)
    try:
        events = [e for e in registry.list_(store, "Event")
                  if e["involvedObject"]["kind"] == "Node" and e["involvedObject"]["name"] == "n1"
                  and e["reason"] == "PartRestarted"]
    finally:
        store.close()
    assert events and events[0]["type"] == "Warning" and events[0]["message"].startswith("overlay failed"), events


def test_a_killed_agent_is_restarted_and_adopts_its_pods(cluster):
    pid = agent_pid(cluster, "n2")
    before = curl(cluster, "a1", pod_ip(cluster, "b1"))
    assert "pod b1" in before
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: agent_pid(cluster, "n2") != pid and os.path.exists(f"/proc/{agent_pid(cluster, 'n2')}"),
             timeout=15, what="a new agent on n2")
    wait_for(lambda: "pod b1" in curl(cluster, "a1", pod_ip(cluster, "b1")), timeout=30,
             what="a1 -> b1 after n2's agent restarted")
    with open(os.path.join(names.node_dir(cluster, "n2"), "agent.restarts")) as f:
        assert f.read() == "1"


def test_pods_and_docker0_have_permanent_neighbour_entries(cluster):
    """Every MAC on a pod's wire is known in advance (02:42:<ip>): the pod's
    entry for its gateway and docker0's for the pod are PERMANENT, not learnt,
    so they do not count against the machine's gc_thresh3."""
    ip = pod_ip(cluster, "a1")
    mac = "02:42:" + ":".join(f"{int(b):02x}" for b in ip.split("."))
    node = netns.run(names.node_ns(cluster, "n1"), ["ip", "neigh", "show", "dev", "docker0"]).stdout
    assert f"{ip} lladdr {mac} PERMANENT" in node, node
    bridge = netns.run(names.node_ns(cluster, "n1"), ["ip", "-br", "addr", "show", "dev", "docker0"]).stdout.split()
    gateway = bridge[2].split("/")[0]
    gateway_mac = "02:42:" + ":".join(f"{int(b):02x}" for b in gateway.split("."))
    inside = netns.run(names.pod_ns(cluster, "default", "a1"), ["ip", "neigh", "show"]).stdout
    assert f"{gateway} dev eth0 lladdr {gateway_mac} PERMANENT" in inside, inside
    assert "pod b1" in curl(cluster, "a1", pod_ip(cluster, "b1"))
