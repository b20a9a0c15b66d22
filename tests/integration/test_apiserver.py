"""The Kubernetes API server with the real kubectl and the Python client (issue 13).

One cluster (named hg-api-*) is brought up with KUBECONFIG pointing at a temp
file: `up` must add the netemu-<cluster> context there, `down` remove it, and
the loopback listening socket must go with the cluster. kubectl runs both in
the master node's namespace with no configuration (http://localhost:8080, the
tutorial's insecure port) and from the machine through the context.
"""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import subprocess
import sys
import uuid

import pytest
import yaml

from netemu import apiserver, names
from tests.integration.clusters import running, wait_for, write_topology

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUTORIAL = os.path.join(REPO, "topologies", "tutorial")
KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"
MASTER = "srv-k8s-master1"

pytestmark = pytest.mark.timeout(300)


def _listening(port: int) -> bool:
    """Is anything listening on the machine's 127.0.0.1:PORT (read-only: ss)?"""
    out = subprocess.run(["ss", "-Htln", f"sport = :{port}"], capture_output=True, text=True).stdout
    return "127.0.0.1:" in out


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not os.path.exists(KUBECTL):
        pytest.skip("no kubectl on this machine")
    tmp = tmp_path_factory.mktemp("api")
    kubeconfig = tmp / "kubeconfig"
    # Somebody else's context is there first: up must keep it and keep it current.
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "other",
        "clusters": [{"name": "other", "cluster": {"server": "https://192.0.2.1:6443"}}],
        "users": [{"name": "other", "user": {}}],
        "contexts": [{"name": "other", "context": {"cluster": "other", "user": "other"}}]}))
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig)
    name = f"hg-api-{uuid.uuid4().hex[:4]}"
    path = write_topology(tmp, name, {
        "cluster": {"timeScale": 0.01, "underlay": "10.1.96.0/24", "serviceRange": "10.254.0.0/16"},
        "nodes": [{"name": MASTER, "address": "10.1.96.231", "unschedulable": True,
                   "labels": {"node-role.kubernetes.io/master": ""}},
                  {"name": "srv-k8s-node1", "address": "10.1.96.232"},
                  {"name": "srv-k8s-node2", "address": "10.1.96.233"}]})
    try:
        with running(path) as (cluster, _):
            port = apiserver.read_config(cluster)["port"]
            wait_for(lambda: _listening(port), timeout=20, what="the API server's loopback socket")
            yield {"cluster": cluster, "kubeconfig": str(kubeconfig), "port": port, "tmp": tmp}
        # After down: the socket and our context are gone, the other context untouched.
        assert not _listening(port), "the API server's loopback socket outlived the cluster"
        config = yaml.safe_load(kubeconfig.read_text())
        assert [c["name"] for c in config["contexts"]] == ["other"]
        assert [c["name"] for c in config["clusters"]] == ["other"]
        assert config["current-context"] == "other"
    finally:
        if old is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old


def kubectl(env, *args, master=False, check=True, timeout=60, input=None, binary=None):
    """kubectl through the kubeconfig context, or (master=True) inside the master
    node's namespace with no kubeconfig at all (it then talks to localhost:8080).
    BINARY: another kubectl (the tutorial era's 1.20)."""
    binary = binary or KUBECTL
    cache = str(env["tmp"] / ("cache-master" if master else "cache")) + (
        "-" + re.sub(r"\W", "_", binary) if binary != KUBECTL else "")
    if master:
        argv = ["ip", "netns", "exec", names.node_ns(env["cluster"], MASTER), binary, "--cache-dir", cache, *args]
        environ = {k: v for k, v in os.environ.items() if k != "KUBECONFIG"}
        environ["HOME"] = str(env["tmp"] / "nohome")          # no ~/.kube/config either
    else:
        argv = [binary, "--cache-dir", cache, "--context", f"netemu-{env['cluster']}", *args]
        environ = dict(os.environ, KUBECONFIG=env["kubeconfig"])
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, env=environ, input=input)
    if check and proc.returncode != 0:
        raise AssertionError(f"kubectl {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def rows(text: str) -> list[list[str]]:
    return [re.split(r"\s{2,}", line.strip()) for line in text.strip().splitlines()]


def test_kubeconfig_context_added_and_printed(env):
    config = yaml.safe_load(open(env["kubeconfig"]))
    ctx = f"netemu-{env['cluster']}"
    assert ctx in [c["name"] for c in config["contexts"]]
    assert config["current-context"] == "other"            # not switched away
    server = next(c for c in config["clusters"] if c["name"] == ctx)["cluster"]["server"]
    assert server == f"http://127.0.0.1:{env['port']}"
    out = subprocess.run([sys.executable, "-m", "netemu.cli", "kubeconfig", "--cluster", env["cluster"]],
                         capture_output=True, text=True, check=True).stdout
    assert yaml.safe_load(out)["clusters"][0]["cluster"]["server"] == server


# The tutorial era's kubectl: Debian's kubernetes-client 1.20, which conflicts with
# the machine's kubectl, so tools/install.sh extracts it (`apt-get download` and
# `dpkg -x`) into .kubectl/1.20 in the checkout; NETEMU_KUBECTL_1_20 names another.
OLD_KUBECTL = os.environ.get("NETEMU_KUBECTL_1_20") or os.path.join(REPO, ".kubectl", "1.20", "kubectl")
BINARIES = [pytest.param(None, id="newest"),
            pytest.param(OLD_KUBECTL, id="1.20",
                         marks=pytest.mark.skipif(not os.path.exists(OLD_KUBECTL),
                                                  reason="no kubectl 1.20: run tools/install.sh, or set "
                                                         "NETEMU_KUBECTL_1_20"))]


@pytest.mark.parametrize("binary", BINARIES)
def test_tutorial_commands_in_the_master_namespace(env, binary):
    """The tutorial's commands as printed, on the master, with no configuration;
    then deleted again (delete waits for each object to go)."""
    k = functools.partial(kubectl, binary=binary)
    out = k(env, "create", "-f", os.path.join(TUTORIAL, "nginxpod.yaml"), master=True).stdout
    assert out.strip() == "pod/nginxpod created"
    out = k(env, "get", "pods", master=True).stdout
    assert rows(out)[0] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"]
    assert rows(out)[1][0] == "nginxpod"
    wait_for(lambda: "Running" in k(env, "get", "pod", "nginxpod", master=True).stdout,
             timeout=60, what="nginxpod Running")
    described = k(env, "describe", "pod", "nginxpod", master=True).stdout
    assert re.search(r"^Name:\s+nginxpod$", described, re.M)
    assert re.search(r"^Node:\s+srv-k8s-node[12]/10\.1\.96\.23[23]$", described, re.M)

    out = k(env, "create", "-f", os.path.join(TUTORIAL, "nginx-rc.yaml"), master=True).stdout
    assert out.strip() == "replicationcontroller/podtoservcie created"
    out = k(env, "expose", "rc", "podtoservcie", "--port=80", master=True).stdout
    assert out.strip() == "service/podtoservcie exposed"
    # describe service with both endpoints (1.31+ reads them from EndpointSlices, 1.20 from Endpoints)
    def endpoints_line():
        text = k(env, "describe", "service", "podtoservcie", master=True).stdout
        m = re.search(r"^Endpoints:\s+(\S+)$", text, re.M)
        return m and len(m[1].split(",")) == 2 and m[1]
    both = wait_for(endpoints_line, timeout=60, what="both endpoints in describe service")
    assert all(re.fullmatch(r"10\.244\.\d+\.\d+:80", e) for e in both.split(","))
    svc = json.loads(k(env, "get", "svc", "podtoservcie", "-o", "json", master=True).stdout)
    assert svc["spec"]["clusterIP"].startswith("10.254.")      # allocated by admission, in the range
    assert svc["spec"]["selector"] == {"app": "nginx"}
    out = k(env, "expose", "rc", "podtoservcie", "--port=80", "--type=LoadBalancer",
                  '--name=my-second-service', master=True).stdout
    assert out.strip() == "service/my-second-service exposed"
    lb = json.loads(k(env, "get", "svc", "my-second-service", "-o", "json", master=True).stdout)
    assert 30000 <= lb["spec"]["ports"][0]["nodePort"] <= 32767

    # curl http://localhost:8080/apis/extensions/v1beta1, as the tutorial does
    curl = subprocess.run(["ip", "netns", "exec", names.node_ns(env["cluster"], MASTER), "curl", "-s",
                           "http://localhost:8080/apis/extensions/v1beta1"],
                          capture_output=True, text=True, timeout=10, check=True).stdout
    doc = json.loads(curl)
    assert doc["kind"] == "APIResourceList" and doc["groupVersion"] == "extensions/v1beta1"
    ds = next(r for r in doc["resources"] if r["name"] == "daemonsets")
    assert ds["namespaced"] is True and ds["kind"] == "DaemonSet"

    out = k(env, "create", "-f", os.path.join(TUTORIAL, "job-dpkg.yaml"), master=True).stdout
    assert out.strip() == "job.extensions/package-check created"
    wait_for(lambda: "Complete" in k(env, "get", "job", "package-check", master=True).stdout,
             timeout=90, what="the Job to complete")
    described = k(env, "describe", "job", "package-check", master=True).stdout
    # 1.32: "0 Active (0 Ready) / 1 Succeeded / 0 Failed"; 1.20: "0 Running / 1 Succeeded / 0 Failed"
    assert re.search(r"^Pods Statuses:\s+0 (Active \(0 Ready\)|Running) / 1 Succeeded / 0 Failed$",
                     described, re.M), described
    pod = k(env, "get", "pods", "-l", "job-name=package-check", "-o", "name", master=True).stdout.split()
    assert len(pod) == 1, pod
    logs = k(env, "logs", pod[0], master=True).stdout
    assert any(line.startswith("ii  ") for line in logs.splitlines())
    assert len(k(env, "logs", pod[0], "--tail=3", master=True).stdout.splitlines()) == 3
    # The node's eth0 address serves too (another node's kubectl reaching the master).
    curl = subprocess.run(["ip", "netns", "exec", names.node_ns(env["cluster"], "srv-k8s-node1"), "curl", "-s",
                           "http://10.1.96.231:8080/api/v1/namespaces/default/pods/nginxpod"],
                          capture_output=True, text=True, timeout=10, check=True).stdout
    assert json.loads(curl)["metadata"]["name"] == "nginxpod"
    for path in ("job-dpkg.yaml", "nginx-rc.yaml", "nginxpod.yaml"):
        k(env, "delete", "-f", os.path.join(TUTORIAL, path), master=True, timeout=120)
    out = k(env, "delete", "svc", "podtoservcie", "my-second-service", master=True).stdout
    assert out.splitlines() == ['service "podtoservcie" deleted', 'service "my-second-service" deleted']
    wait_for(lambda: not k(env, "get", "pods", "-o", "name", master=True).stdout.strip(), timeout=90,
             what="every pod gone")


def test_errors_use_kubernetes_wording(env):
    proc = kubectl(env, "get", "pod", "nosuch", check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip() == 'Error from server (NotFound): pods "nosuch" not found'
    proc = kubectl(env, "get", "ep", "nosuch", check=False)
    assert proc.stderr.strip() == 'Error from server (NotFound): endpoints "nosuch" not found'
    proc = kubectl(env, "get", "jobs.batch", "nosuch", check=False)
    assert proc.stderr.strip() == 'Error from server (NotFound): jobs.batch "nosuch" not found'
    typo = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "typo"},
            "spec": {"containers": [{"name": "c", "image": "nginx", "imagee": "x"}]}}
    proc = kubectl(env, "create", "-f", "-", input=json.dumps(typo), check=False)
    assert proc.returncode != 0
    assert proc.stderr.strip().endswith('Pod in version "v1" cannot be handled as a Pod: strict decoding error: '
                                        'unknown field "spec.containers[0].imagee"'), proc.stderr
    assert "NotFound" in kubectl(env, "get", "pod", "typo", check=False).stderr
    proc = kubectl(env, "create", "-f", "-", "--validate=warn", input=json.dumps(typo))
    assert 'Warning: unknown field "spec.containers[0].imagee"' in proc.stderr
    kubectl(env, "delete", "pod", "typo", timeout=90)


def test_label_scale_wide_and_delete_waits(env):
    out = kubectl(env, "label", "node", "srv-k8s-node1", "disk=ssd").stdout
    assert out.strip() == "node/srv-k8s-node1 labeled"
    out = kubectl(env, "get", "nodes", "-l", "disk=ssd", "-o", "name").stdout
    assert out.split() == ["node/srv-k8s-node1"]
    kubectl(env, "create", "-f", os.path.join(TUTORIAL, "nginx-rc.yaml"))
    out = kubectl(env, "scale", "rc", "podtoservcie", "--replicas=3").stdout
    assert out.strip() == "replicationcontroller/podtoservcie scaled"
    wait_for(lambda: rows(kubectl(env, "get", "rc", "podtoservcie").stdout)[1][1:4] == ["3", "3", "3"],
             timeout=60, what="3 ready replicas")
    wide = rows(kubectl(env, "get", "pods", "-o", "wide", "-l", "app=nginx").stdout)
    assert wide[0][:7] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE", "IP", "NODE"]
    assert len(wide) == 4 and all(r[6].startswith("srv-k8s-node") for r in wide[1:])
    victim = wide[1][0]
    out = kubectl(env, "delete", "pod", victim, timeout=90).stdout
    assert out.strip() == f'pod "{victim}" deleted'
    # delete returned once the pod is gone (kubectl waited with a watch):
    proc = kubectl(env, "get", "pod", victim, check=False)
    assert "NotFound" in proc.stderr


def test_python_client_lists_creates_and_watches(env):
    kubernetes = pytest.importorskip("kubernetes")
    from kubernetes import client, config, watch

    api_client = config.new_client_from_config(config_file=env["kubeconfig"],
                                               context=f"netemu-{env['cluster']}")
    v1 = client.CoreV1Api(api_client)
    nodes = sorted(n.metadata.name for n in v1.list_node().items)
    assert nodes == [MASTER, "srv-k8s-node1", "srv-k8s-node2"]
    listed = v1.list_namespaced_pod("default")
    since = listed.metadata.resource_version
    created = v1.create_namespaced_service("default", {
        "metadata": {"name": "from-python"}, "spec": {"ports": [{"port": 8081}], "selector": {"app": "x"}}})
    assert created.spec.cluster_ip.startswith("10.254.")
    seen = []
    for ev in watch.Watch().stream(v1.list_namespaced_service, "default", resource_version=since,
                                   timeout_seconds=5):
        seen.append((ev["type"], ev["object"].metadata.name))
        if ev["object"].metadata.name == "from-python":
            break
    assert ("ADDED", "from-python") in seen
    with pytest.raises(kubernetes.client.exceptions.ApiException) as err:
        v1.create_namespaced_service("default", {"metadata": {"name": "from-python"},
                                                 "spec": {"ports": [{"port": 8081}]}})
    assert err.value.status == 409
    assert json.loads(err.value.body)["reason"] == "AlreadyExists"


def test_get_watch_sees_pending_then_running(env):
    """`kubectl get pods -w`: a Table list, then Table watch events as the pod moves on."""
    cache = str(env["tmp"] / "cache")
    watcher = subprocess.Popen([KUBECTL, "--cache-dir", cache, "--context", f"netemu-{env['cluster']}",
                                "get", "pods", "-w", "-l", "app=watched"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env=dict(os.environ, KUBECONFIG=env["kubeconfig"]))
    try:
        wait_for(lambda: _listening(env["port"]), what="server")
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "watched", "labels": {"app": "watched"}},
               "spec": {"containers": [{"name": "c", "image": "nginx"}]}}
        import time
        time.sleep(1.0)                          # the watch is open before the pod exists
        kubectl(env, "create", "-f", "-", input=json.dumps(pod))
        wait_for(lambda: "Running" in kubectl(env, "get", "pod", "watched").stdout, timeout=60,
                 what="the pod Running")
        time.sleep(1.0)
    finally:
        watcher.terminate()
        out, err = watcher.communicate(timeout=10)
    lines = [re.split(r"\s{2,}", line.strip()) for line in out.strip().splitlines()]
    assert lines[0] == ["NAME", "READY", "STATUS", "RESTARTS", "AGE"], (out, err)
    statuses = [line[2] for line in lines[1:] if line[0] == "watched"]
    assert statuses[0] in ("Pending", "ContainerCreating"), out
    assert statuses[-1] == "Running", out
    kubectl(env, "delete", "pod", "watched", timeout=90)


def test_get_all_lists_each_kind_once(env):
    out = kubectl(env, "get", "all").stdout
    assert "job.extensions/" not in out and "daemonset.extensions" not in out
    assert "replicationcontroller/podtoservcie" in out and "pod/podtoservcie-" in out


def test_apply_twice_with_a_change(env):
    """Client-side apply: create with last-applied-configuration, then a
    strategic merge patch computed by kubectl."""
    doc = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "applied"},
           "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "applied"}},
                    "template": {"metadata": {"labels": {"app": "applied"}},
                                 "spec": {"containers": [{"name": "web", "image": "nginx",
                                                          "env": [{"name": "A", "value": "1"},
                                                                  {"name": "B", "value": "2"}]}]}}}}
    path = env["tmp"] / "applied.yaml"
    path.write_text(yaml.safe_dump(doc))
    assert kubectl(env, "apply", "-f", str(path)).stdout.strip() == "deployment.apps/applied created"
    doc["spec"]["replicas"] = 2
    doc["spec"]["template"]["spec"]["containers"][0]["env"] = [{"name": "A", "value": "1"}]
    path.write_text(yaml.safe_dump(doc))
    assert kubectl(env, "apply", "-f", str(path)).stdout.strip() == "deployment.apps/applied configured"
    got = json.loads(kubectl(env, "get", "deploy", "applied", "-o", "json").stdout)
    assert got["spec"]["replicas"] == 2
    assert got["spec"]["template"]["spec"]["containers"][0]["env"] == [{"name": "A", "value": "1"}]
    assert kubectl(env, "apply", "-f", str(path)).stdout.strip() == "deployment.apps/applied unchanged"
    wait_for(lambda: rows(kubectl(env, "get", "deploy", "applied").stdout)[1][1] == "2/2", timeout=60,
             what="2/2 ready")
    kubectl(env, "delete", "-f", str(path), timeout=90)


def test_logs_follow_streams_until_the_container_ends(env):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "ticker"},
           "spec": {"restartPolicy": "Never", "containers": [{
               "name": "c", "image": "busybox",
               "command": ["sh", "-c", "for i in 1 2 3 4 5; do echo tick $i; sleep 0.3; done"]}]}}
    kubectl(env, "create", "-f", "-", input=json.dumps(pod))
    wait_for(lambda: kubectl(env, "logs", "ticker", check=False).returncode == 0, timeout=60,
             what="the container started")
    out = kubectl(env, "logs", "-f", "ticker", timeout=60).stdout
    assert out.splitlines() == [f"tick {i}" for i in range(1, 6)]
    kubectl(env, "delete", "pod", "ticker", timeout=90)


def test_namespace_created_used_and_deleted_with_its_pods(env):
    # (kubectl sends this one as protobuf)
    out = kubectl(env, "create", "namespace", "new-namespace").stdout
    assert out.strip() == "namespace/new-namespace created"
    # `kubectl create deployment` sends protobuf too (k8s/protobuf.py decodes it)
    out = kubectl(env, "-n", "new-namespace", "create", "deployment", "web", "--image=nginx").stdout
    assert out.strip() == "deployment.apps/web created"
    out = kubectl(env, "-n", "new-namespace", "create", "-f", os.path.join(TUTORIAL, "nginxpod.yaml")).stdout
    assert out.strip() == "pod/nginxpod created"
    wait_for(lambda: "Running" in kubectl(env, "-n", "new-namespace", "get", "pod", "nginxpod").stdout,
             timeout=60, what="nginxpod Running in new-namespace")
    described = kubectl(env, "-n", "new-namespace", "describe", "pod", "nginxpod").stdout
    assert re.search(r"^Namespace:\s+new-namespace$", described, re.M)
    labels = json.loads(kubectl(env, "get", "ns", "new-namespace", "-o", "json").stdout)["metadata"]["labels"]
    assert labels == {"kubernetes.io/metadata.name": "new-namespace"}
    proc = kubectl(env, "-n", "nosuch", "create", "-f", os.path.join(TUTORIAL, "nginxpod.yaml"), check=False)
    assert 'Error from server (NotFound): error when creating' in proc.stderr
    assert proc.stderr.strip().endswith('namespaces "nosuch" not found')
    # delete waits until the namespace is gone: its pod stopped by its kubelet first
    out = kubectl(env, "delete", "namespace", "new-namespace", timeout=120).stdout
    assert out.strip() == 'namespace "new-namespace" deleted'
    assert "NotFound" in kubectl(env, "get", "ns", "new-namespace", check=False).stderr
    assert "NotFound" in kubectl(env, "-n", "new-namespace", "get", "pod", "nginxpod", check=False).stderr


def test_describe_node_lists_its_pods_and_capacity(env):
    kubectl(env, "create", "-f", os.path.join(TUTORIAL, "nginx-rc.yaml"), check=False)
    wait_for(lambda: rows(kubectl(env, "get", "rc", "podtoservcie").stdout)[1][3] != "0", timeout=60,
             what="a ready replica")
    node = json.loads(kubectl(env, "get", "pods", "-l", "app=nginx", "-o", "json").stdout)["items"][0]["spec"]["nodeName"]
    text = kubectl(env, "describe", "node", node).stdout
    assert re.search(rf"^Capacity:\n\s+cpu:\s+{os.cpu_count()}$", text, re.M), text
    assert re.search(r"^\s+pods:\s+110$", text, re.M)
    assert "-9223372036854775808" not in text                  # allocatable known: real percentages
    assert re.search(r"^\s+default\s+podtoservcie-\S+\s+0 \(0%\)", text, re.M), text
    # The kubelet's heartbeat Lease (kube-node-lease/<node>)
    assert re.search(rf"^Lease:\n\s+HolderIdentity:\s+{node}$", text, re.M), text
    assert re.search(r"^\s+RenewTime:\s+\w{3}, \d\d \w{3} \d{4}", text, re.M), text


def test_exec_over_websocket_with_stdin_tty_and_exit_codes(env):
    """kubectl 1.30+ exec: WebSocket v5.channel.k8s.io."""
    out = kubectl(env, "run", "shell", "--image=busybox", "--command", "--", "sleep", "3600").stdout
    assert out.strip() == "pod/shell created"
    wait_for(lambda: "Running" in kubectl(env, "get", "pod", "shell").stdout, timeout=60, what="shell Running")
    proc = kubectl(env, "exec", "shell", "--", "sh", "-c", "echo out; echo err >&2; hostname; exit 3", check=False)
    assert proc.returncode == 3
    assert proc.stdout.splitlines() == ["out", "shell"]            # the pod's UTS namespace: its hostname
    assert proc.stderr.splitlines()[0] == "err"
    assert "command terminated with exit code 3" in proc.stderr
    proc = kubectl(env, "exec", "-i", "shell", "--", "sh", "-c", "tr a-z A-Z; exit 0", input="hello\n")
    assert proc.stdout == "HELLO\n"
    # -t needs a terminal on kubectl's side: script(1) gives it one.
    cache = str(env["tmp"] / "cache")
    cmd = (f"{KUBECTL} --cache-dir {cache} --context netemu-{env['cluster']} exec -it shell -- sh")
    proc = subprocess.run(["script", "-qec", cmd, "/dev/null"], input="tty\necho in $HOSTNAME\nexit 7\n",
                          capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, KUBECONFIG=env["kubeconfig"]))
    assert proc.returncode == 7, (proc.stdout, proc.stderr)
    # (the shell's prompt "# " starts its output lines: it runs on a terminal)
    assert re.search(r"^(# )?/dev/pts/\d+\r?$", proc.stdout, re.M), proc.stdout
    assert re.search(r"^(# )?in shell\r?$", proc.stdout, re.M), proc.stdout
    proc = kubectl(env, "exec", "shell", "-c", "nosuch", "--", "true", check=False)
    assert "container nosuch is not valid for pod shell" in proc.stderr
    kubectl(env, "delete", "pod", "shell", "--grace-period=1", timeout=90)


# SPDY (kubectl up to 1.29) against WebSocket (1.30+; port-forward: SPDY tunnelled
# in a WebSocket from 1.31). The image's google-cloud-sdk ships versioned builds.
KUBECTL_1_29 = "/usr/lib/google-cloud-sdk/bin/kubectl.1.29"
SPDY_BINARIES = [pytest.param(KUBECTL_1_29, id="1.29",
                              marks=pytest.mark.skipif(not os.path.exists(KUBECTL_1_29), reason="no kubectl 1.29")),
                 BINARIES[1]]
BOTH_PROTOCOLS = [pytest.param(None, id="websocket"), SPDY_BINARIES[0]]


def _run_pod(env, name: str, *args: str) -> None:
    kubectl(env, "run", name, *args)
    wait_for(lambda: "Running" in kubectl(env, "get", "pod", name).stdout, timeout=60, what=f"{name} Running")


@pytest.mark.parametrize("binary", SPDY_BINARIES)
def test_exec_over_spdy_with_stdin_tty_and_exit_codes(env, binary):
    """kubectl up to 1.29 speaks only SPDY/3.1 for exec (1.20: the tutorial's)."""
    k = functools.partial(kubectl, binary=binary)
    _run_pod(env, "spdy-shell", "--image=busybox", "--command", "--", "sleep", "3600")
    try:
        proc = k(env, "exec", "spdy-shell", "--", "sh", "-c", "echo out; echo err >&2; hostname; exit 3",
                 check=False)
        assert proc.returncode == 3, proc.stderr
        assert proc.stdout.splitlines() == ["out", "spdy-shell"]       # the pod's UTS namespace
        assert proc.stderr.splitlines()[0] == "err"
        assert "command terminated with exit code 3" in proc.stderr
        proc = k(env, "exec", "-i", "spdy-shell", "--", "sh", "-c", "tr a-z A-Z; exit 0", input="hello\n")
        assert proc.stdout == "HELLO\n"
        # the tutorial's way in, on the master with no configuration
        assert k(env, "exec", "spdy-shell", "--", "echo", "hi", master=True).stdout == "hi\n"
        # -t needs a terminal on kubectl's side: script(1) gives it one.
        cache = str(env["tmp"] / "cache-tty")
        cmd = f"{binary} --cache-dir {cache} --context netemu-{env['cluster']} exec -it spdy-shell -- sh"
        proc = subprocess.run(["script", "-qec", cmd, "/dev/null"], input="tty\necho in $HOSTNAME\nexit 7\n",
                              capture_output=True, text=True, timeout=60,
                              env=dict(os.environ, KUBECONFIG=env["kubeconfig"]))
        assert proc.returncode == 7, (proc.stdout, proc.stderr)
        assert re.search(r"^(# )?/dev/pts/\d+\r?$", proc.stdout, re.M), proc.stdout
        assert re.search(r"^(# )?in spdy-shell\r?$", proc.stdout, re.M), proc.stdout
        proc = k(env, "exec", "spdy-shell", "-c", "nosuch", "--", "true", check=False)
        assert "container nosuch is not valid for pod spdy-shell" in proc.stderr
    finally:
        kubectl(env, "delete", "pod", "spdy-shell", "--grace-period=1", timeout=90)


@pytest.mark.parametrize("binary", BOTH_PROTOCOLS)
def test_attach_shows_the_output_from_now_until_the_container_stops(env, binary):
    """netemu's containers have no stdin to attach to (the kubelet gives them
    /dev/null), so attach shows what a real node shows for a container without
    `stdin: true`: its output, from now on; it ends when the container does."""
    name = "attached"
    _run_pod(env, name, "--image=busybox", "--restart=Never", "--command", "--", "sh", "-c",
             "echo early; sleep 2; i=0; while [ $i -lt 5 ]; do echo tick $i; i=$((i+1)); sleep 0.2; done")
    try:
        proc = kubectl(env, "attach", name, binary=binary, timeout=60)
        lines = proc.stdout.splitlines()
        assert "early" not in lines                                 # what was written before attach: logs' part
        assert lines[-5:] == [f"tick {i}" for i in range(5)], proc.stdout
    finally:
        kubectl(env, "delete", "pod", name, "--grace-period=1", timeout=90)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("binary", BOTH_PROTOCOLS + [BINARIES[1]])
def test_port_forward_and_curl_through_it(env, binary):
    """`kubectl port-forward pod/x PORT:80`: kubectl's own socket on the machine,
    the connection made by the API server inside the pod's namespace."""
    name = "forwarded"
    _run_pod(env, name, "--image=nginx", "--port=80")
    local, refused = _free_port(), _free_port()
    argv = [binary or KUBECTL, "--cache-dir", str(env["tmp"] / "cache-pf"), "--context", f"netemu-{env['cluster']}",
            "port-forward", f"pod/{name}", f"{local}:80", f"{refused}:81"]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, KUBECONFIG=env["kubeconfig"]))
    try:
        assert proc.stdout.readline().startswith(f"Forwarding from 127.0.0.1:{local} -> 80")
        for _ in range(3):                                          # several connections over one SPDY session
            curl = subprocess.run(["curl", "-s", "-m", "10", f"http://127.0.0.1:{local}/"],
                                  capture_output=True, text=True, timeout=20)
            assert curl.returncode == 0, curl.stderr
            assert f"<p>pod {name}, container {name}," in curl.stdout, curl.stdout
        # Nothing listens on 81 in the pod: kubectl reports the kubelet's words
        # (and kubectl 1.29+ then stops: "lost connection to pod").
        subprocess.run(["curl", "-s", "-m", "10", f"http://127.0.0.1:{refused}/"], capture_output=True, timeout=20)
        if binary is not None and binary != OLD_KUBECTL:
            proc.wait(timeout=20)
    finally:
        if proc.poll() is None:
            proc.terminate()
        _out, err = proc.communicate(timeout=20)
        kubectl(env, "delete", "pod", name, "--grace-period=1", timeout=90)
    assert (f"an error occurred forwarding {refused} -> 81: error forwarding port 81 to pod default/{name}: "
            "failed to connect to localhost:81 inside namespace") in err, err
    assert "connect: connection refused" in err, err


def test_port_forward_with_the_python_client(env):
    """The kubelet's WebSocket port-forward (v4.channel.k8s.io, ports=80), which
    the Python client speaks."""
    from kubernetes import client, config
    from kubernetes.stream import portforward

    name = "pyforwarded"
    _run_pod(env, name, "--image=nginx", "--port=80")
    try:
        config.load_kube_config(config_file=env["kubeconfig"], context=f"netemu-{env['cluster']}")
        api = client.CoreV1Api()
        pf = portforward(api.connect_get_namespaced_pod_portforward, name, "default", ports="80")
        sock = pf.socket(80)
        sock.setblocking(True)
        sock.settimeout(20)
        sock.sendall(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        data = b""
        while chunk := sock.recv(65536):
            data += chunk
        sock.close()
        assert data.startswith(b"HTTP/1.") and f"<p>pod {name}, container {name},".encode() in data, data
        assert pf.error(80) is None
    finally:
        kubectl(env, "delete", "pod", name, "--grace-period=1", timeout=90)


def test_cluster_settings_node_facts_and_sandbox_read_with_kubectl(env):
    """What used to be side files, read with kubectl (issue 13, part 1): the
    cluster's settings (ConfigMap kube-system/netemu-cluster, read-only), the
    overlay's facts on each Node (flannel's annotations), a running pod's
    sandbox (netemu.io/sandbox, next to status.podIP and hostIP)."""
    cm = json.loads(kubectl(env, "-n", "kube-system", "get", "configmap", "netemu-cluster", "-o", "json").stdout)
    settings = json.loads(cm["data"]["topology.json"])
    assert settings["name"] == env["cluster"]
    assert settings["cluster"]["underlay"] == "10.1.96.0/24" and settings["cluster"]["timeScale"] == 0.01
    assert [n["name"] for n in settings["nodes"]][:3] == [MASTER, "srv-k8s-node1", "srv-k8s-node2"]
    assert rows(kubectl(env, "-n", "kube-system", "get", "cm").stdout)[1][:2] == ["netemu-cluster", "1"]
    proc = kubectl(env, "-n", "kube-system", "delete", "cm", "netemu-cluster", check=False)
    assert proc.returncode != 0 and 'configmaps "netemu-cluster" is forbidden' in proc.stderr, proc.stderr
    assert kubectl(env, "-n", "kube-system", "get", "cm", "netemu-cluster", "-o", "name").stdout.strip() == \
        "configmap/netemu-cluster"

    node = json.loads(kubectl(env, "get", "node", "srv-k8s-node1", "-o", "json").stdout)
    ann = node["metadata"]["annotations"]
    assert (ann["flannel.alpha.coreos.com/backend-type"], ann["flannel.alpha.coreos.com/backend-data"],
            ann["flannel.alpha.coreos.com/public-ip"], ann["flannel.alpha.coreos.com/kube-subnet-manager"]) == \
        ("udp", "null", "10.1.96.232", "true")
    assert ann["netemu.io/data-path"]
    wide = rows(kubectl(env, "get", "nodes", "-o", "wide").stdout)
    assert wide[0][-1] == "BACKEND" and all(r[-1] == "udp" for r in wide[1:])

    kubectl(env, "run", "hg-sandbox", "--image=busybox", "--restart=Never", "--command", "--", "sleep", "3600", check=False)
    pod = wait_for(lambda: (lambda p: p if p.get("status", {}).get("phase") == "Running" else None)(
        json.loads(kubectl(env, "get", "pod", "hg-sandbox", "-o", "json", check=False).stdout or "{}")),
        timeout=60, what="pod hg-sandbox running")
    sandbox = json.loads(pod["metadata"]["annotations"]["netemu.io/sandbox"])
    assert sandbox["address"].split("/")[0] == pod["status"]["podIP"]
    assert sandbox["netns"] == names.pod_ns(env["cluster"], "default", "hg-sandbox")
    assert os.stat(f"/proc/{sandbox['pausePID']}/ns/net").st_ino == os.stat(f"/run/netns/{sandbox['netns']}").st_ino
    assert pod["status"]["hostIP"] in ("10.1.96.232", "10.1.96.233")
    kubectl(env, "delete", "pod", "hg-sandbox", timeout=90)
