"""The kubelet on a real cluster (names hdk*): pods that cannot start, a restarted
control plane, a killed pause, probes, args, pod folders, node removal.

One cluster for the module (two nodes, timeScale 0.01 so that restart back-offs
take milliseconds), torn down in `running()`'s finally. Each test uses pod names
of its own. Pods the admission path would refuse are written into the store
directly, as an older netemu or a hand edit would have left them.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import pytest
import yaml

from netemu import api, cluster as clusters, journal, names, netns
from netemu.node import agent, runtime
from netemu.node.sandbox import Sandbox
from netemu.k8s import kinds
from netemu.store import registry
from tests.integration.clusters import running, wait_for, write_topology

pytestmark = [pytest.mark.root, pytest.mark.timeout(300)]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"hdk{uuid.uuid4().hex[:4]}"
    path = write_topology(tmp_path_factory.mktemp("topo"), name, {
        "cluster": {"timeScale": 0.01},
        "nodes": [{"name": "n1"}, {"name": "n2"}]})
    with running(path) as (cluster_name, _):
        yield cluster_name


def netemu(cluster, *args, check=True, timeout=90):
    # --cluster right after the verb: after `exec POD --` it would be the command's.
    proc = subprocess.run([sys.executable, "-m", "netemu.cli", args[0], "--cluster", cluster, *args[1:]],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"netemu {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def apply(cluster, tmp_path, *docs):
    path = tmp_path / f"m-{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return netemu(cluster, "apply", "-f", str(path))


def pod_manifest(name, node, container, **spec):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": name}},
            "spec": {"nodeName": node, "containers": [container], **spec}}


def sleeper(**extra):
    return {"name": "c", "image": "busybox", "command": ["sleep", "3600"], **extra}


def get(cluster, kind, name, namespace="default"):
    store = clusters.open_store(cluster)
    try:
        return registry.get(store, kind, namespace if kinds.BY_KIND[kind].namespaced else None, name)
    finally:
        store.close()


def events(cluster, name) -> list[dict]:
    store = clusters.open_store(cluster)
    try:
        return [e for e in registry.list_(store, "Event", "default") if e["involvedObject"]["name"] == name]
    finally:
        store.close()


def write_directly(cluster, pod):
    """Store POD as is, past admission."""
    pod = json.loads(json.dumps(pod))
    pod["metadata"].update(namespace="default", uid=str(uuid.uuid4()), creationTimestamp=registry.now())
    store = clusters.open_store(cluster)
    try:
        registry.create(store, pod)
    finally:
        store.close()


def ready(pod) -> bool:
    return bool(pod) and pod.get("status", {}).get("phase") == "Running" and any(
        c["type"] == "Ready" and c["status"] == "True" for c in pod["status"].get("conditions", []))


def wait_ready(cluster, name, timeout=30):
    return wait_for(lambda: (lambda p: p if ready(p) else None)(get(cluster, "Pod", name)),
                    timeout=timeout, what=f"pod {name} running and ready")


def sandbox(cluster, name):
    with open(os.path.join(names.pod_dir(cluster, "default", name), "sandbox.json")) as f:
        return json.load(f)


def waiting_reason(pod) -> tuple[str, str] | None:
    for st in (pod or {}).get("status", {}).get("containerStatuses", []):
        w = st.get("state", {}).get("waiting")
        if w:
            return w.get("reason"), w.get("message", "")
    return None


def kubelets_pid(cluster, node) -> int | None:
    """The process NODE's kubelet runs in: the node's agent (netemu.node.agent)."""
    try:
        with open(agent.pid_path(cluster, node)) as f:
            return int(f.read())
    except (FileNotFoundError, ValueError):
        return None


def restart_agent(cluster, node="n2"):
    """kill -9 the process NODE's kubelet runs in (its agent), then wait for
    the control plane's nodes part to start a new one."""
    pid = kubelets_pid(cluster, node)
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: not journal.running(pid), timeout=10, what="agent gone")
    wait_for(lambda: kubelets_pid(cluster, node) not in (None, pid) and journal.running(kubelets_pid(cluster, node)),
             timeout=8, what="the agent restarted by the control plane")


def endpoint_ips(cluster, service) -> set[str]:
    ep = get(cluster, "Endpoints", service) or {}
    return {a["ip"] for s in ep.get("subsets") or [] for a in s.get("addresses") or []}


# -- item 4: a pod that cannot start fails alone; force delete --------------------

def test_pod_that_cannot_start_fails_alone_and_can_be_force_deleted(cluster, tmp_path):
    apply(cluster, tmp_path, pod_manifest("hd-ok", "n1", sleeper()))
    before = wait_ready(cluster, "hd-ok")
    pause_before = sandbox(cluster, "hd-ok")["pause_pid"]
    bad = {"hd-bad-env": sleeper(env=[{"name": "A=B", "value": "x"}]),
           "hd-bad-nul": sleeper(env=[{"name": "A", "value": "x\0y"}]),
           "hd-bad-prog": {"name": "c", "image": "busybox", "command": ["/no/such/program"]},
           "hd-bad-spec": {"name": "c", "image": "nginx", "ports": [{"name": "http"}]}}
    for name, container in bad.items():
        write_directly(cluster, pod_manifest(name, "n1", container))
    expected = {"hd-bad-env": ("CreateContainerError", "'A=B'"),
                "hd-bad-nul": ("CreateContainerError", "NUL"),
                "hd-bad-prog": ("RunContainerError", 'exec: "/no/such/program"'),
                "hd-bad-spec": ("CreateContainerError", "containerPort")}
    for name, (reason, needle) in expected.items():
        got = wait_for(lambda: waiting_reason(get(cluster, "Pod", name)), timeout=20, what=f"{name} waiting")
        wait_for(lambda: (waiting_reason(get(cluster, "Pod", name)) or ("",))[0] == reason, timeout=20,
                 what=f"{name}: {reason}")
        assert needle in waiting_reason(get(cluster, "Pod", name))[1], got
        assert any(e["reason"] == "Failed" and needle in e["message"] for e in events(cluster, name))
    time.sleep(2)
    after = get(cluster, "Pod", "hd-ok")
    assert ready(after)
    assert after["status"]["podIP"] == before["status"]["podIP"]
    assert after["status"]["containerStatuses"][0]["containerID"] == \
        before["status"]["containerStatuses"][0]["containerID"]
    assert after["status"]["containerStatuses"][0]["restartCount"] == 0
    assert sandbox(cluster, "hd-ok")["pause_pid"] == pause_before

    proc = netemu(cluster, "delete", "pod", "hd-bad-env", "--force", "--grace-period=0")
    assert proc.stdout == 'pod "hd-bad-env" force deleted\n'
    assert proc.stderr.strip() == ("Warning: Immediate deletion does not wait for confirmation that the running "
                                   "resource has been terminated. The resource may continue to run on the "
                                   "cluster indefinitely.")
    assert get(cluster, "Pod", "hd-bad-env") is None
    pod_ns = names.pod_ns(cluster, "default", "hd-bad-env")
    wait_for(lambda: not netns.exists(pod_ns) and not os.path.exists(
        names.pod_dir(cluster, "default", "hd-bad-env")), timeout=20, what="force-deleted pod cleaned up")
    netemu(cluster, "delete", "pod", "hd-bad-nul", "hd-bad-prog", "hd-bad-spec", "hd-ok", "--timeout", "30")


# -- item 4: a restarted control plane adopts what runs ------------------------------

def test_restarted_agent_adopts_running_pods(cluster, tmp_path):
    apply(cluster, tmp_path,
          pod_manifest("hd-adopt", "n2", {"name": "web", "image": "nginx", "ports": [{"containerPort": 80}]}),
          pod_manifest("hd-adopt-ready", "n2", sleeper(readinessProbe={"exec": {"command": ["true"]},
                                                                       "periodSeconds": 1})))
    before = {n: wait_ready(cluster, n) for n in ("hd-adopt", "hd-adopt-ready")}

    def processes(name, pod):
        """The pod's pause and container, each as pid and start time."""
        container = int(pod["status"]["containerStatuses"][0]["containerID"].removeprefix("pid://"))
        return runtime.ref_of(sandbox(cluster, name)["pause_pid"]), runtime.ref_of(container)
    held = {n: processes(n, p) for n, p in before.items()}
    inodes = {n: netns.inode(names.pod_ns(cluster, "default", n)) for n in before}
    restart_agent(cluster)
    # A pod created after the restart runs: the new kubelet is at work.
    apply(cluster, tmp_path, pod_manifest("hd-adopt-new", "n2", sleeper()))
    wait_ready(cluster, "hd-adopt-new")
    time.sleep(1)
    for name, old in before.items():
        now = get(cluster, "Pod", name)
        assert ready(now), now["status"]
        assert now["status"]["podIP"] == old["status"]["podIP"]
        assert now["status"]["containerStatuses"][0]["restartCount"] == 0
        # The very same processes, still running, and still the ones the status names.
        pause, container = held[name]
        assert runtime.alive(pause) and runtime.alive(container), name
        assert processes(name, now) == held[name]
        assert netns.inode(names.pod_ns(cluster, "default", name)) == inodes[name]
        assert not any(e["reason"] in ("SandboxChanged", "FailedCreatePodSandBox") for e in events(cluster, name))
    out = netemu(cluster, "exec", "hd-adopt", "--", "hostname").stdout.strip()
    assert out == "hd-adopt"
    page = netns.run(names.node_ns(cluster, "n2"),
                     ["busybox", "wget", "-qO-", f"http://{before['hd-adopt']['status']['podIP']}/"]).stdout
    assert "hd-adopt" in page
    netemu(cluster, "delete", "pod", "hd-adopt", "hd-adopt-ready", "hd-adopt-new")


# -- item 8: a killed pause -------------------------------------------------------------

def test_killed_pause_is_noticed_and_the_sandbox_recreated(cluster, tmp_path):
    apply(cluster, tmp_path, pod_manifest("hd-pause", "n1", sleeper()))
    before = wait_ready(cluster, "hd-pause")
    old = sandbox(cluster, "hd-pause")
    store = clusters.open_store(cluster)
    try:
        since = store.revision()
        os.kill(old["pause_pid"], signal.SIGKILL)

        def recovered():
            p = get(cluster, "Pod", "hd-pause")
            return ready(p) and p["status"]["containerStatuses"][0]["restartCount"] == 1 and p
        now = wait_for(recovered, timeout=30, what="pod back with its sandbox re-created")
        history = [ev.value for ev in store.events_since(since, registry.key("Pod", "default", "hd-pause"))]
    finally:
        store.close()
    # Meanwhile its status said the truth: not ready.
    assert any(not ready(p) for p in history), [p.get("status", {}).get("conditions") for p in history]
    assert now["status"]["podIP"] == before["status"]["podIP"]
    new = sandbox(cluster, "hd-pause")
    assert new["pause_pid"] != old["pause_pid"]
    # What readers off the node see: the sandbox as the kubelet published it on the Pod.
    for pod, sb in ((before, old), (now, new)):
        assert json.loads(pod["metadata"]["annotations"]["netemu.io/sandbox"]) == {
            "netns": sb["namespace"], "veth": sb["veth"], "pausePID": sb["pause_pid"],
            "address": f"{sb['ip']}/{sb['prefixlen']}", "gateway": sb["gateway"], "mtu": sb["mtu"]}
    assert f"Pause PID:          {new['pause_pid']}" in netemu(cluster, "describe", "pod", "hd-pause").stdout
    assert netemu(cluster, "exec", "hd-pause", "--", "hostname").stdout.strip() == "hd-pause"
    # A forged annotation (a PID outside the pod's namespace) is not entered,
    # and the kubelet publishes the truth again.
    forged = dict(json.loads(now["metadata"]["annotations"]["netemu.io/sandbox"]), pausePID=os.getpid())
    store = clusters.open_store(cluster)
    try:
        registry.mutate(store, "Pod", "default", "hd-pause", lambda p: p["metadata"]["annotations"].update(
            {"netemu.io/sandbox": json.dumps(forged)}))
    finally:
        store.close()
    wait_for(lambda: json.loads(get(cluster, "Pod", "hd-pause")["metadata"]["annotations"]["netemu.io/sandbox"])
             ["pausePID"] == new["pause_pid"], timeout=10, what="the kubelet's annotation restored")
    assert netemu(cluster, "exec", "hd-pause", "--", "hostname").stdout.strip() == "hd-pause"
    assert [e["message"] for e in events(cluster, "hd-pause") if e["reason"] == "SandboxChanged"] == \
        ["Pod sandbox changed, it will be killed and re-created."]
    netemu(cluster, "delete", "pod", "hd-pause")


# -- item 13: probes ---------------------------------------------------------------------------

def test_idle_pod_with_ports_is_ready_and_sends_no_probe_packets(cluster, tmp_path):
    apply(cluster, tmp_path, pod_manifest("hd-quiet", "n1", sleeper(ports=[{"containerPort": 80},
                                                                          {"containerPort": 8080}])),
          {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hd-quiet"},
           "spec": {"selector": {"app": "hd-quiet"}, "ports": [{"port": 80}]}})
    pod = wait_ready(cluster, "hd-quiet")
    wait_for(lambda: pod["status"]["podIP"] in endpoint_ips(cluster, "hd-quiet"), timeout=20,
             what="the pod in its service's endpoints")
    veth = sandbox(cluster, "hd-quiet")["veth"]
    cap = subprocess.run(["ip", "netns", "exec", names.node_ns(cluster, "n1"), "timeout", "3",
                          "tcpdump", "-i", veth, "-n", "-l", "tcp"], capture_output=True, text=True, timeout=20)
    packets = [line for line in cap.stdout.splitlines() if line.strip()]
    assert "listening on" in cap.stderr, cap.stderr
    assert packets == [], packets
    netemu(cluster, "delete", "pod", "hd-quiet")
    netemu(cluster, "delete", "service", "hd-quiet")


def test_readiness_probe_keeps_a_pod_out_of_endpoints_until_it_answers(cluster, tmp_path):
    www = tmp_path / "www"
    www.mkdir()
    (www / "index.html").write_text("ok\n")
    go = tmp_path / "go"
    script = f'while [ ! -e {go} ]; do sleep 0.1; done; exec busybox httpd -f -p 8080 -h {www}'
    apply(cluster, tmp_path,
          pod_manifest("hd-ready", "n2", {"name": "c", "image": "busybox", "command": ["sh", "-c", script],
                                          "readinessProbe": {"httpGet": {"path": "/index.html", "port": 8080},
                                                             "periodSeconds": 1}}),
          {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "hd-ready"},
           "spec": {"selector": {"app": "hd-ready"}, "ports": [{"port": 80, "targetPort": 8080}]}})
    pod = wait_for(lambda: (lambda p: p if p and p.get("status", {}).get("phase") == "Running" else None)(
        get(cluster, "Pod", "hd-ready")), timeout=30, what="hd-ready running")
    ip = pod["status"]["podIP"]
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        p = get(cluster, "Pod", "hd-ready")
        assert not ready(p) and not p["status"]["containerStatuses"][0]["ready"]
        assert ip not in endpoint_ips(cluster, "hd-ready")
        time.sleep(0.2)
    assert any(e["reason"] == "Unhealthy" and e["message"].startswith(
        f'Readiness probe failed: Get "http://{ip}:8080/index.html": dial tcp {ip}:8080: connect: connection refused')
        for e in events(cluster, "hd-ready")), [e["message"] for e in events(cluster, "hd-ready")]
    go.write_text("")
    wait_ready(cluster, "hd-ready", timeout=15)
    wait_for(lambda: ip in endpoint_ips(cluster, "hd-ready"), timeout=15, what="pod in endpoints")
    netemu(cluster, "delete", "pod", "hd-ready")
    netemu(cluster, "delete", "service", "hd-ready")


def test_liveness_probe_failure_restarts_the_container(cluster, tmp_path):
    alive = tmp_path / "alive"
    apply(cluster, tmp_path, pod_manifest("hd-live", "n1", sleeper(livenessProbe={
        "exec": {"command": ["cat", str(alive)]}, "periodSeconds": 1, "failureThreshold": 2})))
    wait_for(lambda: (get(cluster, "Pod", "hd-live") or {}).get("status", {}).get(
        "containerStatuses", [{}])[0].get("restartCount", 0) >= 1, timeout=30, what="a liveness restart")
    evs = events(cluster, "hd-live")
    assert any(e["reason"] == "Unhealthy" and e["message"].startswith("Liveness probe failed: cat: ")
               and "No such file or directory" in e["message"] for e in evs), [e["message"] for e in evs]
    assert any(e["reason"] == "Killing" and "failed liveness probe, will be restarted" in e["message"]
               for e in evs)
    alive.write_text("")
    wait_ready(cluster, "hd-live")
    count = get(cluster, "Pod", "hd-live")["status"]["containerStatuses"][0]["restartCount"]
    time.sleep(3)
    assert get(cluster, "Pod", "hd-live")["status"]["containerStatuses"][0]["restartCount"] == count
    netemu(cluster, "delete", "pod", "hd-live")


# -- item 14: args without command --------------------------------------------------------

def kube_dns_rc() -> dict:
    """The shape of the kube-dns-v20 ReplicationController of the tutorial's time:
    three containers with args only, images netemu does not emulate, probes
    served by the healthz container."""
    return {"apiVersion": "v1", "kind": "ReplicationController",
            "metadata": {"name": "hd-kube-dns", "labels": {"k8s-app": "hd-kube-dns"}},
            "spec": {"replicas": 1, "selector": {"k8s-app": "hd-kube-dns"},
                     "template": {"metadata": {"labels": {"k8s-app": "hd-kube-dns"}}, "spec": {"containers": [
                         {"name": "kubedns", "image": "gcr.io/google_containers/kubedns-amd64:1.8",
                          "args": ["--domain=cluster.local.", "--dns-port=10053"],
                          "ports": [{"containerPort": 10053, "name": "dns-local", "protocol": "UDP"},
                                    {"containerPort": 10053, "name": "dns-tcp-local", "protocol": "TCP"}],
                          "livenessProbe": {"httpGet": {"path": "/healthz-kubedns", "port": 8080},
                                            "initialDelaySeconds": 1, "timeoutSeconds": 5,
                                            "periodSeconds": 1, "failureThreshold": 1},
                          "readinessProbe": {"httpGet": {"path": "/readiness", "port": 8081},
                                             "initialDelaySeconds": 1, "timeoutSeconds": 5}},
                         {"name": "dnsmasq", "image": "gcr.io/google_containers/kube-dnsmasq-amd64:1.4",
                          "args": ["--cache-size=1000", "--no-resolv", "--server=127.0.0.1#10053",
                                   "--log-facility=-"],
                          "ports": [{"containerPort": 53, "name": "dns", "protocol": "UDP"},
                                    {"containerPort": 53, "name": "dns-tcp", "protocol": "TCP"}]},
                         {"name": "healthz", "image": "gcr.io/google_containers/exechealthz-amd64:1.2",
                          "args": ["--cmd=nslookup kubernetes.default.svc.cluster.local 127.0.0.1 >/dev/null",
                                   "--url=/healthz-dnsmasq", "--port=8080", "--quiet"],
                          "ports": [{"containerPort": 8080, "protocol": "TCP"}]}]}}}}


def test_args_without_command_go_to_the_entrypoint_not_run_as_a_program(cluster, tmp_path):
    apply(cluster, tmp_path, kube_dns_rc(),
          pod_manifest("hd-nginx-args", "n1", {"name": "web", "image": "nginx",
                                               "args": ["nginx", "-g", "daemon off;"],
                                               "ports": [{"containerPort": 80}]}))
    wait_for(lambda: [p for p in pods_named(cluster, "hd-kube-dns-") if ready(p)], timeout=30,
             what="kube-dns pod ready")
    time.sleep(3)
    [pod] = pods_named(cluster, "hd-kube-dns-")
    assert ready(pod)
    assert [c["restartCount"] for c in pod["status"]["containerStatuses"]] == [0, 0, 0]
    evs = events(cluster, pod["metadata"]["name"])
    assert sum(e["reason"] == "ImageNotEmulated" and e["type"] == "Warning" for e in evs) == 3
    for name in ("kubedns", "dnsmasq", "healthz"):
        log = netemu(cluster, "logs", pod["metadata"]["name"], "-c", name).stdout
        assert "failed to execute" not in log
    nginx = wait_ready(cluster, "hd-nginx-args")
    page = netns.run(names.node_ns(cluster, "n1"),
                     ["busybox", "wget", "-qO-", f"http://{nginx['status']['podIP']}/"]).stdout
    assert "hd-nginx-args" in page
    netemu(cluster, "delete", "rc", "hd-kube-dns")
    netemu(cluster, "delete", "pod", "hd-nginx-args")


def pods_named(cluster, prefix) -> list[dict]:
    store = clusters.open_store(cluster)
    try:
        return [p for p in registry.list_(store, "Pod", "default") if p["metadata"]["name"].startswith(prefix)
                and not p["metadata"].get("deletionTimestamp")]
    finally:
        store.close()


# -- item 12: pod folders go with their pods -------------------------------------------------

def test_pod_folders_go_with_their_pods(cluster, tmp_path):
    pods_root = os.path.join(names.state_dir(cluster), "pods")
    churn = [f"hd-churn-{i}" for i in range(6)]
    apply(cluster, tmp_path, *[pod_manifest(n, "n1" if i % 2 else "n2", sleeper()) for i, n in enumerate(churn)])
    for n in churn:
        wait_ready(cluster, n)
    assert {f"default_{n}" for n in churn} <= set(os.listdir(pods_root))
    netemu(cluster, "delete", "pod", *churn)
    assert not {f"default_{n}" for n in churn} & set(os.listdir(pods_root))

    # Deleted while no kubelet ran: the next one cleans up what is left.
    apply(cluster, tmp_path, pod_manifest("hd-orphan", "n2", sleeper()))
    wait_ready(cluster, "hd-orphan")
    sb = sandbox(cluster, "hd-orphan")
    # Stopped, so that its kubelet cannot see the delete; then killed and restarted.
    os.kill(kubelets_pid(cluster, "n2"), signal.SIGSTOP)
    store = clusters.open_store(cluster)
    try:
        assert api.delete_pod(store, "default", "hd-orphan", grace_period=0)
    finally:
        store.close()
    restart_agent(cluster)
    wait_for(lambda: not os.path.exists(os.path.join(pods_root, "default_hd-orphan"))
             and not netns.exists(sb["namespace"])
             and not runtime.alive(runtime.ProcessRef(sb["pause_pid"], sb["pause_start"])),
             timeout=30, what="the orphaned pod cleaned up")


# -- item 16: node remove with a DaemonSet on every node -----------------------------------------

def test_node_remove_drains_like_kubectl_and_ignores_daemonset_pods(cluster, tmp_path):
    netemu(cluster, "node", "add", "n3")
    apply(cluster, tmp_path,
          {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": "hd-ds"},
           "spec": {"selector": {"matchLabels": {"app": "hd-ds"}},
                    "template": {"metadata": {"labels": {"app": "hd-ds"}},
                                 "spec": {"containers": [sleeper()]}}}},
          pod_manifest("hd-on-n3", "n3", sleeper()))
    wait_for(lambda: sorted(p["spec"]["nodeName"] for p in pods_named(cluster, "hd-ds-") if ready(p))
             == ["n1", "n2", "n3"], timeout=40, what="a daemon pod on every node")
    wait_ready(cluster, "hd-on-n3")
    started = time.monotonic()
    netemu(cluster, "node", "remove", "n3", timeout=60)
    assert time.monotonic() - started < 25
    assert get(cluster, "Node", "n3") is None and get(cluster, "Pod", "hd-on-n3") is None
    assert not netns.exists(names.node_ns(cluster, "n3"))
    time.sleep(2)
    assert sorted(p["spec"]["nodeName"] for p in pods_named(cluster, "hd-ds-")) == ["n1", "n2"]
    pods_root = os.path.join(names.state_dir(cluster), "pods")
    assert not [d for d in os.listdir(pods_root)
                if (Sandbox.load(os.path.join(pods_root, d)) or Sandbox("", "", "", "", 0, 0)).node == "n3"]
    netemu(cluster, "delete", "ds", "hd-ds")


def test_failed_node_remove_uncordons_what_it_cordoned(cluster, tmp_path):
    stubborn = {"name": "c", "image": "busybox", "command": ["sh", "-c", "trap '' TERM; while :; do sleep 1; done"]}
    apply(cluster, tmp_path, pod_manifest("hd-stubborn", "n2", stubborn, terminationGracePeriodSeconds=5))
    wait_ready(cluster, "hd-stubborn")
    with pytest.raises(clusters.ClusterError, match="did not stop within"):
        clusters.remove_node(cluster, "n2", timeout=1)
    node = get(cluster, "Node", "n2")
    assert not node["spec"].get("unschedulable") and not node["metadata"].get("deletionTimestamp")
    wait_for(lambda: get(cluster, "Pod", "hd-stubborn") is None, timeout=30, what="stubborn pod gone")
