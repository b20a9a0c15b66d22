"""Cluster lifecycle and safety (issue 12, items 1, 2, 7 and the control-plane
half of 8): what down/clean/a failed up may kill, names and ownership, an up
ended by a signal, and a supervised control plane with node heartbeats.

Every cluster here is named ha*, and each test removes its clusters even when
it fails."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time

import pytest

from netemu import api, cluster as clusters, journal, names, netns
from netemu.controlplane import part_pid_path, part_restarts_path
from netemu.node import agent
from netemu.store import registry
from netemu.topology.loader import load_topology

from .clusters import assert_gone, cli, running, wait_for, write_topology

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

VENV_BIN = os.path.dirname(sys.executable)
NETEMU = [sys.executable, "-m", "netemu.cli"]


def pod(name, node="n1"):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeName": node, "containers": [{"name": "web", "image": "nginx",
                                                        "ports": [{"containerPort": 80}]}]}}


def env_with(cluster_var: str | None = None) -> dict:
    env = dict(os.environ, PATH=f"{VENV_BIN}:{os.environ['PATH']}")
    env.pop(names.CLUSTER_ENV, None)
    if cluster_var:
        env[names.CLUSTER_ENV] = cluster_var
    return env


def sleeper(cluster_var: str) -> subprocess.Popen:
    """A user's shell that exported NETEMU_CLUSTER (as the README suggests)."""
    return subprocess.Popen(["bash", "-c", "sleep 300; true"], env=env_with(cluster_var),
                            start_new_session=True)


def stop(*procs):
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(p.pid, signal.SIGKILL)     # the shell and its sleep
        p.wait()


def cleanup(*cluster_names):
    for n in cluster_names:
        clusters.teardown(n, graceful=False)


# -- item 1: down, clean and a failed up kill only the cluster's own processes ----

@pytest.mark.parametrize("verb", ["down", "clean"])
def test_down_and_clean_spare_shells_that_carry_the_cluster_variable(tmp_path, verb):
    name = f"ha1{verb[0]}"
    path = write_topology(tmp_path, name, {"nodes": [{"name": "n1"}], "workloads": [pod("p")]})
    shells = [sleeper(name), sleeper("ha-other")]
    try:
        with running(path) as (_, _):
            own = clusters.cluster_processes(name)
            assert len(own) >= 4
            # The reproduction: the shell that runs the command carries the
            # variable itself, and another command runs from inside a node's namespace.
            out = subprocess.run(["ip", "netns", "exec", names.node_ns(name, "n1"), "bash", "-c",
                                  f"netemu {verb}; echo survived"], env=env_with(name),
                                 capture_output=True, text=True, timeout=90)
            assert out.stdout.strip().endswith("survived"), out.stderr
            assert f'cluster "{name}"' in out.stdout
            assert_gone(name)
            assert not [p for p in own if journal.running(p)]
            assert all(s.poll() is None for s in shells), "a shell carrying NETEMU_CLUSTER was killed"
    finally:
        stop(*shells)


def test_a_failed_up_spares_shells_that_carry_the_cluster_variable(tmp_path):
    name = "ha1f"
    path = write_topology(tmp_path, name, {"nodes": [{"name": "n1"}], "workloads": [pod("p")]})
    shells = [sleeper(name), sleeper("ha-other")]
    saved = os.environ.get(names.CLUSTER_ENV)
    os.environ[names.CLUSTER_ENV] = name      # this process too, as a user's shell would
    try:
        with pytest.raises(clusters.ClusterError, match="injected"):
            clusters.up(load_topology(path), fail_after="store")
        assert_gone(name)
        assert all(s.poll() is None for s in shells)
    finally:
        if saved is None:
            os.environ.pop(names.CLUSTER_ENV, None)
        else:
            os.environ[names.CLUSTER_ENV] = saved
        stop(*shells)
        cleanup(name)


# -- item 2: names and ownership -------------------------------------------------

def test_a_role_word_in_a_cluster_name_is_refused_at_up(tmp_path):
    path = write_topology(tmp_path, "ha2-pod", {"nodes": [{"name": "n1"}]})
    proc = subprocess.run(NETEMU + ["up", path], capture_output=True, text=True, env=env_with(), timeout=60)
    assert proc.returncode == 1
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "ha2-pod.yaml: name:" in proc.stderr and '"pod"' in proc.stderr
    assert not os.path.exists(names.state_dir("ha2-pod"))
    proc = subprocess.run(NETEMU + ["up", path, "--name", "ha2-lb-x"], capture_output=True, text=True,
                          env=env_with(), timeout=60)
    assert proc.returncode == 1 and "--name:" in proc.stderr and '"lb"' in proc.stderr


def test_clusters_whose_names_are_prefixes_never_hurt_each_other(tmp_path):
    """The issue's scenario, made impossible by the name rule, and ownership
    besides: cluster ha2 has a pod named "fabric" and a node named "pod";
    cluster ha2-x (its name starts with ha2's) runs beside it. And a namespace
    someone else holds under the very name a pod needs is never deleted: the
    sandbox fails, down leaves it."""
    a = write_topology(tmp_path, "ha2", {"nodes": [{"name": "n1"}, {"name": "pod"}],
                                         "workloads": [pod("fabric"), pod("client", "pod"), pod("q")]})
    b = write_topology(tmp_path, "ha2-x", {"nodes": [{"name": "n1"}], "workloads": [pod("p")]})
    foreign = names.pod_ns("ha2", "default", "q")
    holder = None
    try:
        with running(b) as (name_b, _):
            pids_b = clusters.cluster_processes(name_b)
            inodes_b = {ns: netns.inode(ns) for ns, _ in journal.namespaces(name_b)}
            topo = load_topology(a)
            topo.objects = [o for o in topo.objects if o["metadata"]["name"] != "q"]
            clusters.up(topo)
            # Someone takes the name pod q will need, after up checked for it.
            subprocess.run(["ip", "netns", "add", foreign], check=True)
            foreign_inode = netns.inode(foreign)
            # A process holds it, so its inode cannot be re-used by a namespace
            # made after it is gone: the same inode means the same namespace.
            holder = subprocess.Popen(["ip", "netns", "exec", foreign, "sleep", "300"])
            store = clusters.open_store("ha2")
            try:
                # q's namespace name is taken: its sandbox fails, and retries, and
                # never deletes what it did not make.
                registry.create(store, pod("q"))
                wait_for(lambda: any(e["reason"] == "FailedCreatePodSandBox" for e in registry.events_for(
                    store, registry.get(store, "Pod", "default", "q"))), timeout=30, what="sandbox failure")
                time.sleep(1.5)     # at least one retry
                assert netns.inode(foreign) == foreign_inode
            finally:
                store.close()
            out = cli("exec", "--cluster", "ha2", "fabric", "--", "curl", "-s", "-m", "5", "localhost").stdout
            assert "pod fabric" in out
            cli("down", "ha2")
            assert netns.inode(foreign) == foreign_inode, "down deleted a namespace it did not make"
            assert holder.poll() is None, "down killed a process in a namespace it did not make"
            assert {ns: netns.inode(ns) for ns, _ in journal.namespaces(name_b)} == inodes_b
            assert all(journal.running(p) for p in pids_b)
            out = cli("exec", "--cluster", name_b, "p", "--", "curl", "-s", "-m", "5", "localhost").stdout
            assert "pod p" in out
    finally:
        cleanup("ha2")
        if holder is not None:
            holder.kill()
            holder.wait()
        subprocess.run(["ip", "netns", "delete", foreign])


def test_up_refuses_a_taken_name_and_deletes_nothing(tmp_path):
    path = write_topology(tmp_path, "ha2t", {"nodes": [{"name": "n1"}, {"name": "n2"}]})
    taken = names.node_ns("ha2t", "n2")
    subprocess.run(["ip", "netns", "add", taken], check=True)
    inode = netns.inode(taken)
    try:
        with pytest.raises(clusters.ClusterError, match="exist already"):
            clusters.up(load_topology(path))
        assert netns.inode(taken) == inode
        # clean without a state folder names what it cannot tell is its own
        proc = cli("clean", "ha2t", check=False)
        assert proc.returncode == 1 and taken in proc.stderr
        assert netns.inode(taken) == inode
    finally:
        cleanup("ha2t")
        subprocess.run(["ip", "netns", "delete", taken])


def test_creating_a_taken_namespace_fails_and_leaves_it(tmp_path):
    os.makedirs(names.state_dir("ha2n"))
    subprocess.run(["ip", "netns", "add", "ha2n-fabric"], check=True)
    inode = netns.inode("ha2n-fabric")
    try:
        with pytest.raises(netns.NetnsError, match="already exists"):
            journal.create_netns("ha2n", "ha2n-fabric")
        assert not journal.delete_netns("ha2n", "ha2n-fabric")
        clusters.teardown("ha2n", graceful=False)
        assert netns.inode("ha2n-fabric") == inode
    finally:
        subprocess.run(["ip", "netns", "delete", "ha2n-fabric"])
        clusters.teardown("ha2n", graceful=False)


# -- item 7: an up ended by a signal rolls back ---------------------------------

@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP, signal.SIGKILL])
def test_up_ended_by_a_signal_rolls_back(tmp_path, sig):
    name = f"ha7{sig.name[3:].lower()}"
    path = write_topology(tmp_path, name, {"nodes": [{"name": "n1"}, {"name": "n2"}], "workloads": [pod("p")]})
    try:
        # As from a terminal's shell: the signals at their defaults, even if this test
        # runs under nohup (an ignored SIGHUP stays ignored: see the nohup test).
        def defaults() -> None:
            for s in (signal.SIGHUP, signal.SIGTERM):
                signal.signal(s, signal.SIG_DFL)
        proc = subprocess.Popen(NETEMU + ["up", path], env=env_with(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, preexec_fn=defaults)
        # Mid-build: the control plane runs, the cluster is not ready yet.
        wait_for(lambda: os.path.exists(part_pid_path(name, "nodes")) or proc.poll() is not None,
                 timeout=60, interval=0.02, what="the control plane to start")
        assert proc.poll() is None, "up finished before it could be interrupted"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode in (128 + sig, -sig), err
        # SIGKILL: the supervisor rolls back once the builder pipe closes.
        wait_for(lambda: not os.path.exists(names.state_dir(name)), timeout=30, what="the rollback")
        assert_gone(name)
        # A following up of the same name works.
        with running(path) as (_, summary):
            assert summary["pods"][0]["status"]["phase"] == "Running"
    finally:
        cleanup(name)


def test_nohup_up_ignores_sighup(tmp_path):
    # An ignored signal stays ignored: `nohup netemu up` survives a closed terminal.
    name = "ha7nohup"
    path = write_topology(tmp_path, name, {"nodes": [{"name": "n1"}], "workloads": [pod("p")]})
    try:
        proc = subprocess.Popen(["nohup", *NETEMU, "up", path], env=env_with(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        wait_for(lambda: os.path.exists(part_pid_path(name, "nodes")) or proc.poll() is not None,
                 timeout=60, interval=0.02, what="the control plane to start")
        proc.send_signal(signal.SIGHUP)
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        assert f'cluster "{name}" is ready' in out
        assert clusters.control_plane_problem(name) is None
    finally:
        cleanup(name)
        assert_gone(name)


def test_timeout_sigterm_rolls_back(tmp_path):
    name = "ha7timeout"
    # A pod that never gets ready keeps `up` waiting (it waits for every pod to
    # settle), so the signal always comes while `up` runs, however fast the build.
    never_ready = pod("p")
    never_ready["spec"]["containers"][0]["readinessProbe"] = {"exec": {"command": ["false"]},
                                                              "periodSeconds": 1}
    path = write_topology(tmp_path, name, {"nodes": [{"name": "n1"}], "workloads": [never_ready]})
    try:
        proc = subprocess.run(["timeout", "-s", "TERM", "3", *NETEMU, "up", path], env=env_with(),
                              capture_output=True, text=True, timeout=90)
        assert proc.returncode == 124
        assert_gone(name)
    finally:
        cleanup(name)


# -- item 8: a supervised control plane, heartbeats, and what the CLI says -------

def _pid(cluster, part):
    with open(part_pid_path(cluster, part)) as f:
        return int(f.read())


def _ready(store, node):
    n = registry.get(store, "Node", None, node)
    return next(c for c in n["status"]["conditions"] if c["type"] == "Ready")


def rc(name, replicas):
    return {"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": name},
            "spec": {"replicas": replicas, "selector": {"app": name},
                     "template": {"metadata": {"labels": {"app": name}},
                                  "spec": {"containers": [{"name": "web", "image": "nginx"}]}}}}


def test_a_killed_control_plane_comes_back_and_scale_works(tmp_path):
    path = write_topology(tmp_path, "ha8k", {"cluster": {"timeScale": 0.125},
                                             "nodes": [{"name": "n1"}, {"name": "n2"}],
                                             "workloads": [rc("web", 1)]})
    with running(path) as (name, summary):
        pods_before = {p["metadata"]["name"] for p in summary["pods"]}
        pause_pids = [int(open(f"/proc/{p}/stat").read().split()[0]) for p in clusters.cluster_processes(name)
                      if open(f"/proc/{p}/comm").read().strip() in ("sleep", "busybox")]
        assert pause_pids
        for part in ("controllers", "nodes"):
            old = _pid(name, part)
            os.kill(old, signal.SIGKILL)
            wait_for(lambda: _pid(name, part) != old and journal.running(_pid(name, part)), timeout=20,
                     what=f"the {part} part to be restarted")
            assert open(part_restarts_path(name, part)).read() == "1"
        assert all(journal.running(p) for p in pause_pids), "pods' processes died with the control plane"
        out = cli("scale", "--cluster", name, "rc", "web", "--replicas=3")
        assert out.returncode == 0
        store = clusters.open_store(name)
        try:
            def three_running():
                pods = [p for p in registry.list_(store, "Pod") if p["metadata"]["name"].startswith("web-")]
                return len(pods) == 3 and all(p.get("status", {}).get("phase") == "Running" for p in pods
                                              if p["metadata"]["name"] not in pods_before)
            wait_for(three_running, timeout=60, what="scale to 3 after the restart")
            assert _ready(store, "n1")["status"] == "True"
        finally:
            store.close()
        assert clusters.control_plane_problem(name) is None


def test_a_stopped_kubelet_makes_its_nodes_unknown(tmp_path):
    # timeScale 0.125: grace period 5 s, monitor period 0.625 s, renewals every 1.25 s.
    path = write_topology(tmp_path, "ha8h", {"cluster": {"timeScale": 0.125},
                                             "nodes": [{"name": "n1"}], "workloads": [pod("p")]})
    with running(path) as (name, _):
        store = clusters.open_store(name)
        with open(agent.pid_path(name, "n1")) as f:
            kubelet = int(f.read())       # n1's agent: its kubelet and lease heartbeat
        try:
            lease = registry.get(store, "Lease", "kube-node-lease", "n1")
            assert lease["spec"]["holderIdentity"] == "n1" and lease["spec"]["leaseDurationSeconds"] == 5
            first = lease["spec"]["renewTime"]
            wait_for(lambda: registry.get(store, "Lease", "kube-node-lease", "n1")["spec"]["renewTime"] != first,
                     timeout=10, what="a lease renewal")
            os.kill(kubelet, signal.SIGSTOP)
            stopped = time.monotonic()
            wait_for(lambda: _ready(store, "n1")["status"] == "Unknown", timeout=20, what="Ready=Unknown")
            assert time.monotonic() - stopped >= 3.5      # not before the grace period (5 s, less a renewal)
            cond = _ready(store, "n1")
            assert cond["reason"] == "NodeStatusUnknown"
            assert cond["message"] == "Kubelet stopped posting node status."
            table = cli("get", "--cluster", name, "nodes").stdout.splitlines()
            assert table[1].split()[:2] == ["n1", "NotReady"]
            os.kill(kubelet, signal.SIGCONT)
            wait_for(lambda: _ready(store, "n1")["status"] == "True", timeout=20, what="Ready again")
        finally:
            os.kill(kubelet, signal.SIGCONT)
            store.close()


def _conditions(obj: dict) -> dict:
    return {c["type"]: c["status"] for c in (obj.get("status") or {}).get("conditions") or []}


def test_a_lost_node_is_tainted_its_pods_not_ready_and_evicted_after_their_toleration(tmp_path):
    """As kube-controller-manager handles a node whose kubelet went silent: the
    node is tainted unreachable, its pods are marked not ready (out of the
    Service's endpoints), a pod tolerating that for 8 s (1 s at timeScale
    0.125) is evicted and replaced on the other node, one with the API's
    default 300 s stays; when the kubelet is back the taints go, the evicted
    pod is finished and the one that stayed is Ready again."""
    web = rc("web", 2)
    web["spec"]["template"]["spec"]["tolerations"] = [
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": 8}]
    svc = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
           "spec": {"selector": {"app": "web"}, "ports": [{"port": 80}]}}
    path = write_topology(tmp_path, "ha8t", {"cluster": {"timeScale": 0.125},
                                             "nodes": [{"name": "n1"}, {"name": "n2"}],
                                             "workloads": [web, svc]})
    with running(path) as (name, _):
        store = clusters.open_store(name)
        # The node to lose: one with a web pod (both may be on one node: a node
        # that became Ready first takes what the scheduler places before the other is).
        webs = [p for p in registry.list_(store, "Pod") if p["metadata"]["name"].startswith("web-")]
        gone = webs[0]["spec"]["nodeName"]
        other = next(n for n in ("n1", "n2") if n != gone)
        lost = [p for p in webs if p["spec"]["nodeName"] == gone]
        with open(agent.pid_path(name, gone)) as f:
            kubelet = int(f.read())
        try:
            api.create_or_update(store, pod("p", gone))
            wait_for(lambda: _conditions(registry.get(store, "Pod", "default", "p")).get("Ready") == "True",
                     timeout=20, what="pod p Ready")
            assert [t["key"] for t in registry.get(store, "Pod", "default", "p")["spec"]["tolerations"]] == [
                "node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"]      # the API's defaults
            os.kill(kubelet, signal.SIGSTOP)
            wait_for(lambda: _ready(store, gone)["status"] == "Unknown", timeout=20, what="Ready=Unknown")
            taints = registry.get(store, "Node", None, gone)["spec"]["taints"]
            assert [(t["key"], t["effect"]) for t in taints] == [("node.kubernetes.io/unreachable", "NoSchedule"),
                                                                 ("node.kubernetes.io/unreachable", "NoExecute")]
            wait_for(lambda: _conditions(registry.get(store, "Pod", "default", "p"))["Ready"] == "False",
                     timeout=10, what="pod p marked not ready")

            def replaced():
                web_pods = [p for p in registry.list_(store, "Pod") if p["metadata"]["name"].startswith("web-")
                            and not p["metadata"].get("deletionTimestamp")]
                return (len(web_pods) == 2 and all(p["spec"].get("nodeName") == other for p in web_pods)
                        and all(_conditions(p).get("Ready") == "True" for p in web_pods))
            wait_for(replaced, timeout=30, what=f"the evicted web pods replaced on {other}")
            events = registry.list_(store, "Event", "default")
            for old in lost:
                evicted = registry.get(store, "Pod", "default", old["metadata"]["name"])
                assert evicted is not None and evicted["metadata"].get("deletionTimestamp"), \
                    "an evicted pod stays terminating while its kubelet is away"
                assert any(e.get("reason") == "TaintManagerEviction"
                           and e["involvedObject"]["name"] == old["metadata"]["name"] for e in events)

            def endpoint_ips():
                subsets = (registry.get(store, "Endpoints", "default", "web") or {}).get("subsets") or []
                return {a["ip"] for s in subsets for a in s.get("addresses") or []}
            lost_ips = {p["status"]["podIP"] for p in lost}
            wait_for(lambda: len(endpoint_ips()) == 2 and not lost_ips & endpoint_ips(),
                     timeout=10, what=f"the Service's endpoints: the two pods on {other}")
            assert not registry.get(store, "Pod", "default", "p")["metadata"].get("deletionTimestamp")

            os.kill(kubelet, signal.SIGCONT)
            wait_for(lambda: _ready(store, gone)["status"] == "True", timeout=20, what="Ready again")
            wait_for(lambda: not registry.get(store, "Node", None, gone)["spec"].get("taints"), timeout=10,
                     what="the unreachable taints removed")
            wait_for(lambda: all(registry.get(store, "Pod", "default", p["metadata"]["name"]) is None
                                 for p in lost), timeout=20, what="the evicted pods finished by their kubelet")
            wait_for(lambda: _conditions(registry.get(store, "Pod", "default", "p"))["Ready"] == "True",
                     timeout=20, what="pod p Ready again")
        finally:
            os.kill(kubelet, signal.SIGCONT)
            store.close()


def test_the_cli_says_when_the_control_plane_is_not_running(tmp_path):
    path = write_topology(tmp_path, "ha8c", {"nodes": [{"name": "n1"}], "workloads": [rc("web", 1)]})
    with running(path) as (name, _):
        supervisor = clusters._read_pid(name)
        try:
            # A stopped supervisor restarts nothing; then the parts die.
            os.kill(supervisor, signal.SIGSTOP)
            proc = cli("get", "--cluster", name, "pods", check=False)
            assert proc.returncode == 0 and "runs unsupervised" in proc.stderr
            for part in ("nodes", "controllers"):
                os.kill(_pid(name, part), signal.SIGKILL)
            wait_for(lambda: clusters.control_plane_problem(name) is not None
                     and clusters.control_plane_problem(name)[1], timeout=10, what="the parts to die")
            proc = cli("scale", "--cluster", name, "rc", "web", "--replicas=2", check=False)
            assert proc.returncode == 1 and proc.stdout == ""
            assert proc.stderr.strip().splitlines() == [
                f'netemu: error: the control plane of cluster "{name}" is not running (its supervisor is '
                f"stopped (SIGSTOP)): nothing will act on changes; see {names.state_dir(name)}/controlplane.log, "
                f"then netemu down {name}"]
            store = clusters.open_store(name)
            try:
                assert registry.get(store, "ReplicationController", "default", "web")["spec"]["replicas"] == 1
            finally:
                store.close()
            # Reading still works, with the same line as a warning.
            proc = cli("get", "--cluster", name, "pods", check=False)
            assert proc.returncode == 0 and proc.stdout.startswith("NAME")
            assert proc.stderr.startswith("netemu: warning: the control plane of cluster")
        finally:
            os.kill(supervisor, signal.SIGCONT)


def test_a_state_folder_left_by_an_up_killed_before_anything_was_built_does_not_block(tmp_path):
    # SIGKILL between the state folder and the supervisor leaves only the folder.
    name = "ha7early"
    path = write_topology(tmp_path, name, {"nodes": [{"name": "n1"}]})
    os.makedirs(names.state_dir(name))
    try:
        # While an up holds it (it is building), it is that up's: refused.
        import fcntl
        fd = os.open(names.state_dir(name), os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            with pytest.raises(clusters.ClusterError, match="already exists"):
                clusters.up(load_topology(path))
        finally:
            os.close(fd)
        assert os.path.isdir(names.state_dir(name))
        with running(path) as (_, summary):
            assert [n["metadata"]["name"] for n in summary["nodes"]] == ["n1"]
            # A running cluster is never taken for a leftover.
            with pytest.raises(clusters.ClusterError, match="already exists"):
                clusters.up(load_topology(path))
    finally:
        cleanup(name)


def test_a_hung_control_plane_part_is_detected_and_restarted(tmp_path):
    path = write_topology(tmp_path, "ha8g", {"cluster": {"timeScale": 0.125},
                                             "nodes": [{"name": "n1"}], "workloads": [rc("web", 1)]})
    with running(path) as (name, _):
        hung = _pid(name, "controllers")
        os.kill(hung, signal.SIGSTOP)
        try:
            # The CLI says so while it lasts...
            wait_for(lambda: "is not responding" in cli("get", "--cluster", name, "pods").stderr,
                     timeout=15, interval=0.5, what="the CLI to notice")
            # ...and the supervisor replaces it (after max(20 s, 2 grace periods)).
            wait_for(lambda: _pid(name, "controllers") != hung, timeout=40, interval=0.5,
                     what="the hung part to be replaced")
            assert not journal.running(hung)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.kill(hung, signal.SIGCONT)
        cli("scale", "--cluster", name, "rc", "web", "--replicas=2")
        store = clusters.open_store(name)
        try:
            wait_for(lambda: len([p for p in registry.list_(store, "Pod")
                                  if p.get("status", {}).get("phase") == "Running"]) == 2,
                     timeout=30, what="scale after the restart")
        finally:
            store.close()
        wait_for(lambda: clusters.control_plane_problem(name) is None, timeout=10, what="no more warning")
