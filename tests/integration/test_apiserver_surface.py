"""The rest of the API surface (issue 13) with the real kubectl: paged lists,
logs with timestamps and --since, dry runs, orphaning deletes, delete --all and
-l, the `kubernetes` Service. One cluster (ha-surface-*), kubectl through its
kubeconfig context in a temp KUBECONFIG (tests/integration/test_apiserver.py's
helper) and in the master's namespace with no configuration."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import uuid

import pytest

from netemu import apiserver
from tests.integration.clusters import running, wait_for, write_topology
from tests.integration.test_apiserver import BINARIES, MASTER, _listening, kubectl, rows

KUBECTL = shutil.which("kubectl") or "/usr/bin/kubectl"

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    if os.geteuid() != 0:
        pytest.skip("needs root")
    if not os.path.exists(KUBECTL):
        pytest.skip("no kubectl on this machine")
    tmp = tmp_path_factory.mktemp("surface")
    kubeconfig = tmp / "kubeconfig"
    old = os.environ.get("KUBECONFIG")
    os.environ["KUBECONFIG"] = str(kubeconfig)
    name = f"ha-surface-{uuid.uuid4().hex[:4]}"
    path = write_topology(tmp, name, {
        "cluster": {"timeScale": 0.01, "underlay": "10.1.97.0/24", "serviceRange": "10.253.0.0/16"},
        "nodes": [{"name": MASTER, "address": "10.1.97.231", "unschedulable": True},
                  {"name": "srv-k8s-node1", "address": "10.1.97.232"}]})
    try:
        with running(path) as (cluster, _):
            port = apiserver.read_config(cluster)["port"]
            wait_for(lambda: _listening(port), timeout=20, what="the API server's loopback socket")
            yield {"cluster": cluster, "kubeconfig": str(kubeconfig), "port": port, "tmp": tmp}
    finally:
        if old is None:
            os.environ.pop("KUBECONFIG", None)
        else:
            os.environ["KUBECONFIG"] = old


def _names(out: str) -> list[str]:
    return [r[0] for r in rows(out)[1:]]


def test_get_in_chunks_pages_through_limit_and_continue(env):
    for i in range(5):
        kubectl(env, "create", "namespace", f"chunk{i}")
    proc = kubectl(env, "get", "namespaces", "--chunk-size=2", "-v=6")
    # One table over the pages: every namespace once, in order.
    listed = _names(proc.stdout)
    assert [n for n in listed if n.startswith("chunk")] == [f"chunk{i}" for i in range(5)]
    assert len(listed) == len(set(listed)) == 9          # and default, kube-*
    pages = re.findall(r"GET \S+/api/v1/namespaces\?(\S*limit=2\S*) 200", proc.stderr)
    assert len(pages) == 5 and all("continue=" in p for p in pages[1:]), proc.stderr
    kubectl(env, "delete", "namespace", *[f"chunk{i}" for i in range(5)], "--wait=false")


def test_logs_with_timestamps_and_since(env):
    try:
        _logs_with_timestamps_and_since(env)
    finally:
        kubectl(env, "delete", "pod", "stamped", "--grace-period=0", "--force", "--ignore-not-found",
                check=False)


def _logs_with_timestamps_and_since(env):
    import datetime

    from netemu import names
    from netemu.node import logstamps

    kubectl(env, "run", "stamped", "--image=busybox", "--restart=Never", "--command", "--",
            "sh", "-c", "echo one; sleep 1.5; echo two; sleep 600")
    wait_for(lambda: "two" in kubectl(env, "logs", "stamped", check=False).stdout, timeout=60,
             what="both lines logged")
    out = kubectl(env, "logs", "stamped", "--timestamps").stdout
    lines = [line.split(" ", 1) for line in out.splitlines()]
    assert [text for _, text in lines] == ["one", "two"]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?Z", stamp) for stamp, _ in lines)
    first, second = (logstamps.parse_rfc3339(stamp) for stamp, _ in lines)
    times = names.container_log_times(names.pod_dir(env["cluster"], "default", "stamped"), "stamped")
    assert 1.3e9 < second - first < 5e9, \
        f"the sleep between them; the kubelet's records ({times}): {logstamps.read_stamps(times)}"
    now = datetime.datetime.now(datetime.timezone.utc).timestamp() * 1e9
    assert 0 < now - second < 120e9
    assert kubectl(env, "logs", "stamped", "--since=1h").stdout.split() == ["one", "two"]
    since = logstamps.rfc3339nano(second)                   # sinceTime: the second line on
    assert kubectl(env, "logs", "stamped", f"--since-time={since}").stdout.split() == ["two"]
    assert kubectl(env, "logs", "stamped", "--since=1h", "--tail=1", "--timestamps").stdout == \
        f"{lines[1][0]} two\n"


RC_YAML = """
apiVersion: v1
kind: ReplicationController
metadata: {name: keeper}
spec:
  replicas: 2
  selector: {app: keeper}
  template:
    metadata: {labels: {app: keeper, tier: web}}
    spec: {containers: [{name: c, image: nginx}]}
"""


def test_dry_run_orphan_and_delete_all(env):
    out = kubectl(env, "create", "-f", "-", "--dry-run=server", input=RC_YAML).stdout
    assert out.strip() == "replicationcontroller/keeper created (server dry run)"
    assert "NotFound" in kubectl(env, "get", "rc", "keeper", check=False).stderr
    kubectl(env, "create", "-f", "-", input=RC_YAML)
    wait_for(lambda: len(_names(kubectl(env, "get", "pods", "-l", "app=keeper").stdout)) == 2,
             timeout=60, what="the rc's two pods")
    pods = _names(kubectl(env, "get", "pods", "-l", "app=keeper").stdout)
    out = kubectl(env, "delete", "pod", pods[0], "--dry-run=server").stdout
    assert out.strip() == f'pod "{pods[0]}" deleted (server dry run)'
    out = kubectl(env, "scale", "rc", "keeper", "--replicas=5", "--dry-run=server").stdout
    assert "(server dry run)" in out
    assert rows(kubectl(env, "get", "rc", "keeper").stdout)[1][1] == "2"
    # --cascade=orphan: the rc goes, its pods stay, no longer owned
    out = kubectl(env, "delete", "rc", "keeper", "--cascade=orphan").stdout
    assert out.strip() == 'replicationcontroller "keeper" deleted'
    assert "NotFound" in kubectl(env, "get", "rc", "keeper", check=False).stderr
    import json
    left = json.loads(kubectl(env, "get", "pods", "-l", "app=keeper", "-o", "json").stdout)["items"]
    assert sorted(p["metadata"]["name"] for p in left) == sorted(pods)
    assert all(not p["metadata"].get("ownerReferences") for p in left)
    # and nobody deletes them a moment later (the garbage collector has no owner to follow)
    import time
    time.sleep(3)
    assert sorted(_names(kubectl(env, "get", "pods", "-l", "app=keeper").stdout)) == sorted(pods)
    # delete -l and --all
    kubectl(env, "run", "other", "--image=nginx")
    out = kubectl(env, "delete", "pods", "-l", "app=keeper", "--grace-period=0", "--force").stdout
    assert sorted(re.findall(r'pod "([^"]+)" force deleted', out)) == sorted(pods)
    assert _names(kubectl(env, "get", "pods").stdout) == ["other"]
    out = kubectl(env, "delete", "pods", "--all", "--grace-period=0", "--force").stdout
    assert 'pod "other" force deleted' in out
    assert "No resources found" in kubectl(env, "get", "pods").stderr


def test_python_client_deletes_a_collection(env):
    kubernetes = pytest.importorskip("kubernetes")
    config = kubernetes.client.Configuration()
    config.host = f"http://127.0.0.1:{env['port']}"
    v1 = kubernetes.client.CoreV1Api(kubernetes.client.ApiClient(config))
    for name, app in (("col-a", "col"), ("col-b", "col"), ("col-c", "keep")):
        v1.create_namespaced_pod("default", {"apiVersion": "v1", "kind": "Pod",
                                             "metadata": {"name": name, "labels": {"app": app}},
                                             "spec": {"containers": [{"name": "c", "image": "nginx"}]}})
    v1.delete_collection_namespaced_pod("default", label_selector="app=col", grace_period_seconds=0)
    # Only this test's pods: one failed test before it must not fail this one too.
    names = sorted(p.metadata.name for p in v1.list_namespaced_pod("default", label_selector="app in (col,keep)").items)
    assert names == ["col-c"]
    v1.delete_namespaced_pod("col-c", "default", grace_period_seconds=0)


def test_the_kubernetes_service_leads_to_the_api_server(env):
    import json

    from netemu import names

    def service_row():
        found = [r for r in rows(kubectl(env, "get", "svc").stdout)[1:] if r[0] == "kubernetes"]
        return found[0] if found else None
    row = wait_for(service_row, timeout=30, what="the kubernetes Service")
    assert row[1:5] == ["ClusterIP", "10.253.0.1", "<none>", "8080/TCP"]
    described = kubectl(env, "describe", "svc", "kubernetes").stdout
    assert re.search(r"^Endpoints:\s+10\.1\.97\.231:8080$", described, re.M), described
    # From a pod, through the service proxy, the API server answers.
    kubectl(env, "run", "asker", "--image=nginx")
    wait_for(lambda: "Running" in kubectl(env, "get", "pod", "asker").stdout, timeout=60, what="asker Running")
    pod_ns = names.pod_ns(env["cluster"], "default", "asker")

    def version():
        proc = subprocess.run(["ip", "netns", "exec", pod_ns, "curl", "-s", "-m", "3",
                               "http://10.253.0.1:8080/version"], capture_output=True, text=True)
        return json.loads(proc.stdout) if proc.returncode == 0 and proc.stdout.startswith("{") else None
    assert wait_for(version, timeout=30, what="/version through the kubernetes Service")["major"] == "1"
    # Deleted, it comes back (the API server keeps it).
    kubectl(env, "delete", "svc", "kubernetes")
    wait_for(service_row, timeout=30, what="the kubernetes Service back")
    kubectl(env, "delete", "pod", "asker", "--grace-period=0", "--force")


def test_typed_create_commands_send_protobuf_and_work(env):
    out = kubectl(env, "create", "deployment", "typed", "--image=nginx", "--replicas=2", "--port=80").stdout
    assert out.strip() == "deployment.apps/typed created"
    wait_for(lambda: rows(kubectl(env, "get", "deploy", "typed").stdout)[1][1] == "2/2", timeout=90,
             what="the deployment's two pods ready")
    out = kubectl(env, "create", "service", "clusterip", "typed", "--tcp=80:80").stdout
    assert out.strip() == "service/typed created"
    described = kubectl(env, "describe", "svc", "typed").stdout
    wait_for(lambda: len(re.findall(r"\d+\.\d+\.\d+\.\d+:80", kubectl(env, "describe", "svc", "typed").stdout)) == 2,
             timeout=30, what="both pods behind the service")
    assert re.search(r"^Type:\s+ClusterIP$", described, re.M)
    out = kubectl(env, "create", "job", "typedjob", "--image=busybox", "--", "sh", "-c", "echo from-protobuf").stdout
    assert out.strip() == "job.batch/typedjob created"
    import json

    def job_pod_output():
        pods = json.loads(kubectl(env, "get", "pods", "-o", "json").stdout)["items"]
        mine = [p["metadata"]["name"] for p in pods
                if any(r.get("name") == "typedjob" for r in p["metadata"].get("ownerReferences") or [])]
        return mine and "from-protobuf" in kubectl(env, "logs", mine[0], check=False).stdout
    wait_for(job_pod_output, timeout=60, what="the job's output")
    wait_for(lambda: "Complete" in kubectl(env, "get", "job", "typedjob").stdout, timeout=60, what="the job Complete")
    kubectl(env, "delete", "deploy/typed", "svc/typed", "job/typedjob", timeout=90)


@pytest.mark.parametrize("version", ["1.27", "1.33"])
def test_kubectl_learns_the_server_from_aggregated_discovery(env, version):
    """kubectl 1.26–1.29 ask /api and /apis for apidiscovery v2beta1, 1.30 and
    later for v2: two requests, where the legacy lists take one per group
    version; what kubectl learns is the same (short names, categories, the
    tutorial's extensions/v1beta1)."""
    binary = f"/usr/lib/google-cloud-sdk/bin/kubectl.{version}"
    if not os.path.exists(binary):
        pytest.skip(f"no kubectl {version} on this machine")
    proc = kubectl(env, "api-resources", "-v=6", binary=binary)
    urls = re.findall(r'(?:GET |url=")http://[^/]+(/[^?" ]*)', proc.stderr)
    assert urls == ["/api", "/apis"], proc.stderr[-2000:]
    table = rows(proc.stdout)
    assert ["pods", "po", "v1", "true", "Pod"] in table
    assert ["daemonsets", "extensions/v1beta1", "true", "DaemonSet"] in table
    assert "service/kubernetes" in kubectl(env, "get", "all", binary=binary).stdout


SSA_DEPLOY = """
apiVersion: apps/v1
kind: Deployment
metadata: {name: NAME, labels: {app: NAME, tier: web}}
spec:
  replicas: 2
  selector: {matchLabels: {app: NAME}}
  template:
    metadata: {labels: {app: NAME}}
    spec: {containers: [{name: c, image: nginx, ports: [{containerPort: 80}]}]}
"""


def _managers(env, kind_name):
    import json
    obj = json.loads(kubectl(env, "get", kind_name, "-o", "json", "--show-managed-fields").stdout)
    return [(e["manager"], e["operation"]) for e in obj["metadata"].get("managedFields") or []], obj


def test_kubectl_server_side_apply_conflicts_forces_and_removes(env):
    manifest = SSA_DEPLOY.replace("NAME", "ssa")
    out = kubectl(env, "apply", "--server-side", "-f", "-", input=manifest).stdout
    assert out.strip() == "deployment.apps/ssa serverside-applied"
    managers, obj = _managers(env, "deploy/ssa")
    assert managers == [("kubectl", "Apply")]
    assert "managedFields" not in kubectl(env, "get", "deploy/ssa", "-o", "yaml").stdout   # hidden by kubectl
    # another writer takes spec.replicas; applying the old value is a conflict kubectl explains
    kubectl(env, "scale", "deploy/ssa", "--replicas=3")
    proc = kubectl(env, "apply", "--server-side", "-f", "-", input=manifest, check=False)
    assert proc.returncode == 1
    assert re.search(r'error: Apply failed with 1 conflict: conflict with "[^"]+" with subresource "scale" '
                     r"using apps/v1 at \S+: \.spec\.replicas", proc.stderr), proc.stderr
    assert "--force-conflicts" in proc.stderr
    assert kubectl(env, "get", "deploy/ssa", "-o", "jsonpath={.spec.replicas}").stdout == "3"
    # dry run: answered as applied, nothing kept
    out = kubectl(env, "apply", "--server-side", "--force-conflicts", "--dry-run=server", "-f", "-",
                  input=manifest).stdout
    assert "serverside-applied (server dry run)" in out
    assert kubectl(env, "get", "deploy/ssa", "-o", "jsonpath={.spec.replicas}").stdout == "3"
    kubectl(env, "apply", "--server-side", "--force-conflicts", "-f", "-", input=manifest)
    assert kubectl(env, "get", "deploy/ssa", "-o", "jsonpath={.spec.replicas}").stdout == "2"
    managers, _ = _managers(env, "deploy/ssa")
    assert ("kubectl", "Apply") in managers and not any(m[1] == "Update" and "scale" in m[0] for m in managers)
    # a field no longer applied is removed: the label and the container port
    kubectl(env, "apply", "--server-side", "-f", "-",
            input=manifest.replace(", tier: web", "").replace(", ports: [{containerPort: 80}]", ""))
    _, obj = _managers(env, "deploy/ssa")
    assert obj["metadata"]["labels"] == {"app": "ssa"}
    assert "ports" not in obj["spec"]["template"]["spec"]["containers"][0]
    kubectl(env, "delete", "deploy/ssa")


def test_kubectl_server_side_apply_takes_over_from_client_side_apply(env):
    manifest = SSA_DEPLOY.replace("NAME", "csa")
    kubectl(env, "apply", "-f", "-", input=manifest)
    managers, _ = _managers(env, "deploy/csa")
    assert managers == [("kubectl-client-side-apply", "Update")]
    kubectl(env, "apply", "--server-side", "-f", "-", input=manifest.replace("replicas: 2", "replicas: 1"))
    managers, obj = _managers(env, "deploy/csa")
    assert obj["spec"]["replicas"] == 1
    assert ("kubectl", "Apply") in managers and ("kubectl-client-side-apply", "Update") not in managers
    # and client-side apply still works after it
    kubectl(env, "apply", "-f", "-", input=manifest.replace("replicas: 2", "replicas: 3"))
    assert kubectl(env, "get", "deploy/csa", "-o", "jsonpath={.spec.replicas}").stdout == "3"
    kubectl(env, "delete", "deploy/csa")


def test_python_client_server_side_apply(env):
    kubernetes = pytest.importorskip("kubernetes")
    config = kubernetes.client.Configuration()
    config.host = f"http://127.0.0.1:{env['port']}"
    client = kubernetes.client.ApiClient(config)
    v1 = kubernetes.client.CoreV1Api(client)
    body = {"apiVersion": "v1", "kind": "Service", "metadata": {"name": "ssa-svc"},
            "spec": {"selector": {"app": "x"}, "ports": [{"port": 80, "targetPort": 8080}]}}
    svc = v1.patch_namespaced_service("ssa-svc", "default", body, field_manager="lab-script",
                                      _content_type="application/apply-patch+yaml")
    assert svc.spec.cluster_ip and svc.metadata.managed_fields[0].manager == "lab-script"
    body["spec"]["ports"][0]["targetPort"] = 9090
    with pytest.raises(kubernetes.client.ApiException) as err:
        v1.patch_namespaced_service("ssa-svc", "default", body, field_manager="other",
                                    _content_type="application/apply-patch+yaml")
    import json
    causes = json.loads(err.value.body)["details"]["causes"]
    assert err.value.status == 409 and causes == [{"reason": "FieldManagerConflict",
                                                   "message": 'conflict with "lab-script"',
                                                   "field": '.spec.ports[port=80,protocol="TCP"].targetPort'}]
    svc = v1.patch_namespaced_service("ssa-svc", "default", body, field_manager="other", force=True,
                                      _content_type="application/apply-patch+yaml")
    assert svc.spec.ports[0].target_port == 9090
    v1.delete_namespaced_service("ssa-svc", "default")


def test_foreground_delete_waits_for_the_pods(env):
    """`kubectl delete --cascade=foreground`: the Deployment stays, terminating
    (foregroundDeletion), until its ReplicaSet and pods are gone; kubectl waits
    for it and returns when everything is gone."""
    import json
    kubectl(env, "create", "deployment", "fg", "--image=nginx", "--replicas=2")
    wait_for(lambda: len(_names(kubectl(env, "get", "pods", "-l", "app=fg").stdout)) == 2,
             timeout=60, what="the deployment's two pods")
    proc = subprocess.Popen([KUBECTL, "--context", f"netemu-{env['cluster']}", "delete", "deploy", "fg",
                             "--cascade=foreground"], env=dict(os.environ, KUBECONFIG=env["kubeconfig"]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def marked():
            got = kubectl(env, "get", "deploy", "fg", "-o", "json", check=False)
            return got.returncode != 0 or json.loads(got.stdout)["metadata"].get("finalizers")
        wait_for(marked, timeout=30, what="the deployment marked for foreground deletion")
        out, err = proc.communicate(timeout=90)
    finally:
        proc.kill()
    assert proc.returncode == 0 and out.strip() == 'deployment.apps "fg" deleted', err
    # kubectl returned once the owner was gone, and the owner went after its pods
    assert "NotFound" in kubectl(env, "get", "deploy", "fg", check=False).stderr
    assert _names(kubectl(env, "get", "pods", "-l", "app=fg").stdout) == []
    assert _names(kubectl(env, "get", "rs", "-l", "app=fg").stdout) == []


def test_config_maps_with_kubectl(env):
    """`kubectl create configmap` (a protobuf body from the typed client),
    get, describe, edit by patch, delete; the cluster's own settings stay
    netemu's."""
    import json
    out = kubectl(env, "create", "configmap", "game", "--from-literal=lives=3",
                  "--from-literal=ui.properties=color=blue").stdout
    assert out.strip() == "configmap/game created"
    assert rows(kubectl(env, "get", "cm", "game").stdout)[1][:2] == ["game", "2"]
    assert "lives:\n----\n3" in kubectl(env, "describe", "cm", "game").stdout
    kubectl(env, "patch", "cm", "game", "-p", '{"data": {"lives": "4"}}')
    cm = json.loads(kubectl(env, "get", "cm", "game", "-o", "json").stdout)
    assert cm["data"] == {"lives": "4", "ui.properties": "color=blue"}
    proc = kubectl(env, "create", "configmap", "bad", "--from-literal=a b=1", check=False)
    assert proc.returncode == 1 and "a valid config key must consist of" in proc.stderr
    proc = kubectl(env, "-n", "kube-system", "label", "cm", "netemu-cluster", "x=y", check=False)
    assert proc.returncode == 1 and 'configmaps "netemu-cluster" is forbidden' in proc.stderr
    assert kubectl(env, "delete", "cm", "game").stdout.strip() == 'configmap "game" deleted'


@pytest.mark.parametrize("binary", BINARIES)
def test_stdin_of_containers_that_keep_it(env, binary):
    """`kubectl run -i` (stdin and stdinOnce: the piped input reaches the
    container, its end ends the container) and `kubectl attach -i` to a
    container with `stdin: true` (the input reaches it; it reads no end), over
    WebSocket (newest kubectl) and SPDY (1.20)."""
    tag = "old" if binary else "new"
    proc = kubectl(env, "run", f"cat-{tag}", "--image=busybox", "--restart=Never", "-i", "--", "cat",
                   input="piped in\n", binary=binary)
    assert proc.stdout.startswith("piped in\n"), proc
    wait_for(lambda: "Completed" in kubectl(env, "get", "pod", f"cat-{tag}").stdout, timeout=30,
             what="cat to end with its input")
    kubectl(env, "apply", "-f", "-", input=f"""
apiVersion: v1
kind: Pod
metadata: {{name: reader-{tag}}}
spec:
  containers: [{{name: c, image: busybox, stdin: true,
                 command: [sh, -c, 'while read l; do echo "got: $l"; done; echo eof']}}]
""")
    wait_for(lambda: "Running" in kubectl(env, "get", "pod", f"reader-{tag}").stdout, timeout=30,
             what="the reader running")
    for line in ("one", "two"):
        attach = subprocess.Popen([binary or KUBECTL, "--context", f"netemu-{env['cluster']}", "attach", "-i",
                                   f"reader-{tag}"], env=dict(os.environ, KUBECONFIG=env["kubeconfig"]),
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            attach.stdin.write(f"{line}\n".encode())
            attach.stdin.close()
            wait_for(lambda: f"got: {line}" in kubectl(env, "logs", f"reader-{tag}").stdout, timeout=20,
                     what=f"the reader to get line {line}")
        finally:
            attach.kill()
            attach.wait()
    # no end of input for a container that keeps its stdin: still running, no "eof"
    assert "eof" not in kubectl(env, "logs", f"reader-{tag}").stdout
    assert "Running" in kubectl(env, "get", "pod", f"reader-{tag}").stdout
    kubectl(env, "delete", "pod", f"cat-{tag}", f"reader-{tag}", "--grace-period=0", "--force")


def test_status_subresource_with_kubectl(env):
    kubectl(env, "create", "service", "clusterip", "st-svc", "--tcp=80:80")
    cond = ('{"status": {"conditions": [{"type": "Checked", "status": "True", "reason": "ByHand", '
            '"message": "ok", "lastTransitionTime": "2026-12-02T00:00:00Z"}]}, "spec": {"type": "NodePort"}}')
    out = kubectl(env, "patch", "svc", "st-svc", "--subresource=status", "--type=merge", "-p", cond).stdout
    assert out.strip() == "service/st-svc patched"
    got = kubectl(env, "get", "svc", "st-svc", "--subresource=status",
                  "-o", "jsonpath={.status.conditions[0].type} {.spec.type}").stdout
    assert got == "Checked ClusterIP"            # the status is written, the spec in the body is not
    kubectl(env, "delete", "svc", "st-svc")
