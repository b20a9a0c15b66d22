"""The workload verbs (apply, create, delete, expose, scale, label) and kubectl's
tables and describe texts, on a real cluster (names hk-*).

One cluster for the module, shaped like the tutorial's: a cordoned master and
two nodes, with timeScale 0.01 so that Job back-offs and container restart
back-offs take milliseconds instead of seconds. It is built from a topology dict
by the Python API (netemu.up, through clusters.lab), which tears it down when the
module ends, however it ends. Each test uses object names of its own.

The verbs are run through the netemu command (python -m netemu.cli).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import uuid

import pytest
import yaml

from netemu import cluster as clusters
from netemu.k8s import kinds
from netemu.store import registry
from tests.integration.clusters import lab, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TUTORIAL = os.path.join(REPO, "topologies", "tutorial")



@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    name = f"hk-wl-{uuid.uuid4().hex[:4]}"
    with lab({"name": name, "cluster": {"timeScale": 0.01, "serviceRange": "10.254.0.0/16"},
              "nodes": [{"name": "k8s-master", "unschedulable": True,
                         "labels": {"node-role.kubernetes.io/master": ""}},
                        {"name": "n1", "labels": {"disk": "ssd"}},
                        {"name": "n2"}]}):
        yield name


def netemu(cluster, *args, check=True, timeout=90):
    proc = subprocess.run([sys.executable, "-m", "netemu.cli", *args, "--cluster", cluster],
                          capture_output=True, text=True, timeout=timeout, cwd=REPO)
    if check and proc.returncode != 0:
        raise AssertionError(f"netemu {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def write(tmp_path, name, *docs) -> str:
    path = tmp_path / name
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return str(path)


def pods_of(cluster, prefix) -> list[dict]:
    store = clusters.open_store(cluster)
    try:
        return [p for p in registry.list_(store, "Pod") if p["metadata"]["name"].startswith(prefix + "-")]
    finally:
        store.close()


def get_obj(cluster, kind, name) -> dict | None:
    store = clusters.open_store(cluster)
    try:
        return registry.get(store, kind, "default" if kinds.BY_KIND[kind].namespaced else None, name)
    finally:
        store.close()


def running_pods(cluster, prefix) -> list[dict]:
    return [p for p in pods_of(cluster, prefix) if p.get("status", {}).get("phase") == "Running"
            and not p["metadata"].get("deletionTimestamp")]


def table(text: str) -> tuple[list[str], list[dict]]:
    """A kubectl table -> (header line words, rows as {header: cell})."""
    lines = text.strip("\n").split("\n")
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"(?<!\S)\S+(?: \S+)*", header)]
    names = [header[s:e].strip() for s, e in zip(starts, starts[1:] + [None])]
    rows = []
    for line in lines[1:]:
        rows.append({n: line[s:e].strip() for n, s, e in zip(names, starts, starts[1:] + [None])})
    return names, rows


def job(name, command, *, restart="Never", **spec):
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": {"name": name},
            "spec": {**spec, "template": {"spec": {
                "restartPolicy": restart,
                "containers": [{"name": "main", "image": "busybox", "command": command}]}}}}


def daemonset(name, command, node_selector=None):
    pod_spec = {"containers": [{"name": "main", "image": "busybox", "command": command}]}
    if node_selector:
        pod_spec["nodeSelector"] = node_selector
    return {"apiVersion": "apps/v1", "kind": "DaemonSet", "metadata": {"name": name},
            "spec": {"selector": {"matchLabels": {"ds": name}},
                     "template": {"metadata": {"labels": {"ds": name}}, "spec": pod_spec}}}


LOOP = ["sh", "-c", "while true; do echo alive; sleep 5; done"]


# -- the tutorial's section 3 ---------------------------------------------------------

def test_tutorial_rc_expose_scale_and_replace(cluster):
    out = netemu(cluster, "apply", "-f", os.path.join(TUTORIAL, "nginx-rc.yaml")).stdout
    assert out.strip() == "replicationcontroller/podtoservcie created"
    pods = wait_for(lambda: len(running_pods(cluster, "podtoservcie")) == 2 and running_pods(cluster, "podtoservcie"),
                    timeout=30, what="2 running podtoservcie pods")
    assert all(re.fullmatch(r"podtoservcie-[a-z0-9]{5}", p["metadata"]["name"]) for p in pods)
    assert netemu(cluster, "apply", "-f", os.path.join(TUTORIAL, "nginx-rc.yaml")).stdout.strip() == \
        "replicationcontroller/podtoservcie unchanged"

    headers, rows = table(netemu(cluster, "get", "rc", "-o", "wide").stdout)
    assert headers == ["NAME", "DESIRED", "CURRENT", "READY", "AGE", "CONTAINERS", "IMAGES", "SELECTOR"]
    row = next(r for r in rows if r["NAME"] == "podtoservcie")
    assert (row["DESIRED"], row["CURRENT"], row["IMAGES"], row["SELECTOR"]) == ("2", "2", "nginx", "app=nginx")

    assert netemu(cluster, "expose", "rc", "podtoservcie", "--port=80").stdout.strip() == \
        "service/podtoservcie exposed"
    headers, rows = table(netemu(cluster, "get", "svc").stdout)
    assert headers == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    row = next(r for r in rows if r["NAME"] == "podtoservcie")
    assert row["TYPE"] == "ClusterIP" and row["EXTERNAL-IP"] == "<none>" and row["PORT(S)"] == "80/TCP"
    assert row["CLUSTER-IP"].startswith("10.254.")

    ips = sorted(p["status"]["podIP"] for p in pods)

    def described():
        text = netemu(cluster, "describe", "service", "podtoservcie").stdout
        return text if all(f"{ip}:80" in text for ip in ips) else None
    text = wait_for(described, timeout=15, what="both pod IPs in the service's endpoints")
    assert re.search(r"^Type:\s+ClusterIP$", text, re.M)
    assert re.search(r"^Port:\s+<unset>  80/TCP$", text, re.M)
    assert re.search(r"^TargetPort:\s+80/TCP$", text, re.M)
    assert re.search(r"^Session Affinity:\s+None$", text, re.M)
    assert re.search(rf"^IP:\s+{re.escape(row['CLUSTER-IP'])}$", text, re.M)

    assert netemu(cluster, "scale", "rc", "podtoservcie", "--replicas=3").stdout.strip() == \
        "replicationcontroller/podtoservcie scaled"
    pods = wait_for(lambda: len(running_pods(cluster, "podtoservcie")) == 3 and running_pods(cluster, "podtoservcie"),
                    timeout=30, what="3 running pods")
    text = netemu(cluster, "describe", "rc", "podtoservcie").stdout
    assert re.search(r"^Replicas:\s+3 current / 3 desired$", text, re.M)
    assert re.search(r"^Pods Status:\s+3 Running / 0 Waiting / 0 Succeeded / 0 Failed$", text, re.M)

    victim = pods[0]["metadata"]["name"]
    out = netemu(cluster, "delete", "pod", victim).stdout
    assert out.strip() == f'pod "{victim}" deleted'
    # --wait (the default) returned only once the kubelet removed the pod.
    assert get_obj(cluster, "Pod", victim) is None
    after = wait_for(lambda: len(running_pods(cluster, "podtoservcie")) == 3 and running_pods(cluster, "podtoservcie"),
                     timeout=30, what="a replacement pod")
    names = {p["metadata"]["name"] for p in after}
    assert victim not in names and len(names - {p["metadata"]["name"] for p in pods}) == 1

    assert netemu(cluster, "delete", "svc", "podtoservcie").stdout.strip() == 'service "podtoservcie" deleted'
    out = netemu(cluster, "delete", "rc", "podtoservcie").stdout
    assert out.strip() == 'replicationcontroller "podtoservcie" deleted'
    wait_for(lambda: not pods_of(cluster, "podtoservcie"), timeout=30, what="the rc's pods gone")


def test_tutorial_job_completes_and_logs_dpkg(cluster):
    proc = netemu(cluster, "apply", "-f", os.path.join(TUTORIAL, "job-dpkg.yaml"))
    assert proc.stdout.strip() == "job.batch/package-check created"
    assert "converted to batch/v1" in proc.stderr          # the loader's warning about extensions/v1beta1

    def complete():
        _, rows = table(netemu(cluster, "get", "jobs").stdout)
        row = next(r for r in rows if r["NAME"] == "package-check")
        return row if row["STATUS"] == "Complete" else None
    row = wait_for(complete, timeout=60, what="the Job to complete")
    assert row["COMPLETIONS"] == "1/1" and re.fullmatch(r"\d+s", row["DURATION"])

    [pod] = pods_of(cluster, "package-check")
    assert pod["status"]["phase"] == "Succeeded"
    logs = netemu(cluster, "logs", pod["metadata"]["name"]).stdout
    assert any(line.startswith("ii  ") for line in logs.splitlines())

    text = netemu(cluster, "describe", "job", "package-check").stdout
    assert re.search(r"^Parallelism:\s+1$", text, re.M)
    assert re.search(r"^Completions:\s+1$", text, re.M)
    assert re.search(r"^Pods Statuses:\s+0 Active \(0 Ready\) / 1 Succeeded / 0 Failed$", text, re.M)
    assert re.search(r"^Selector:\s+image=ubuntu,test=dpkg$", text, re.M)
    assert re.search(r"^\s+Normal\s+SuccessfulCreate\s+\S+\s+job-controller\s+Created pod: package-check-",
                     text, re.M)
    assert re.search(r"^Start Time:\s+\S", text, re.M) and re.search(r"^Completed At:\s+\S", text, re.M)

    assert netemu(cluster, "delete", "job", "package-check").stdout.strip() == 'job.batch "package-check" deleted'
    wait_for(lambda: not pods_of(cluster, "package-check"), timeout=30, what="the Job's pod gone")


# -- refusals --------------------------------------------------------------------------

def test_invalid_objects_are_refused_and_the_valid_ones_applied(cluster, tmp_path):
    """As kubectl: the valid object of the file is applied, the invalid one reported."""
    good_pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hk-valid-beside"},
                "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "60"]}]}}
    always = job("hk-bad-job", ["true"], restart="Always")
    mismatch = {"apiVersion": "apps/v1", "kind": "ReplicaSet", "metadata": {"name": "hk-bad-rs"},
                "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "x"}},
                         "template": {"metadata": {"labels": {"app": "y"}},
                                      "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}}
    negative = {"apiVersion": "v1", "kind": "ReplicationController", "metadata": {"name": "hk-bad-rc"},
                "spec": {"replicas": -1, "selector": {"app": "z"},
                         "template": {"metadata": {"labels": {"app": "z"}},
                                      "spec": {"containers": [{"name": "c", "image": "nginx"}]}}}}
    cases = [(always, 'spec.template.spec.restartPolicy: Unsupported value: "Always": supported values: '
                      '"OnFailure", "Never"'),
             (mismatch, "selector does not match template labels"),
             (negative, "spec.replicas: Invalid value: -1: must be greater than or equal to 0")]
    for i, (bad, message) in enumerate(cases):
        path = write(tmp_path, f"{bad['metadata']['name']}.yaml", good_pod, bad)
        proc = netemu(cluster, "apply", "-f", path, check=False)
        assert proc.returncode == 1, proc.stdout + proc.stderr
        assert f"error: {path}: document 2" in proc.stderr and message in proc.stderr
        assert proc.stdout == f"pod/hk-valid-beside {'unchanged' if i else 'created'}\n"
        assert get_obj(cluster, bad["kind"], bad["metadata"]["name"]) is None
    netemu(cluster, "delete", "pod", "hk-valid-beside", "--no-wait")


def test_create_existing_and_delete_missing_fail_as_kubectl(cluster, tmp_path):
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "hk-once"},
           "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["sleep", "600"]}]}}
    path = write(tmp_path, "once.yaml", pod)
    assert netemu(cluster, "create", "-f", path).stdout.strip() == "pod/hk-once created"
    proc = netemu(cluster, "create", "-f", path, check=False)
    assert proc.returncode == 1
    assert 'Error from server (AlreadyExists)' in proc.stderr and 'pods "hk-once" already exists' in proc.stderr
    assert netemu(cluster, "delete", "-f", path).stdout.strip() == 'pod "hk-once" deleted'
    assert get_obj(cluster, "Pod", "hk-once") is None
    proc = netemu(cluster, "delete", "pod", "hk-once", check=False)
    assert proc.returncode == 1
    assert proc.stderr.strip() == 'Error from server (NotFound): pods "hk-once" not found'


# -- Jobs --------------------------------------------------------------------------------

def test_job_parallelism_caps_active_pods(cluster, tmp_path):
    path = write(tmp_path, "par.yaml", job("hk-par", ["sh", "-c", "sleep 0.5"], completions=5, parallelism=2))
    netemu(cluster, "apply", "-f", path)
    most = 0

    def finished():
        nonlocal most
        pods = pods_of(cluster, "hk-par")
        active = [p for p in pods if p.get("status", {}).get("phase") not in ("Succeeded", "Failed")
                  and not p["metadata"].get("deletionTimestamp")]
        most = max(most, len(active))
        obj = get_obj(cluster, "Job", "hk-par")
        return obj if (obj.get("status") or {}).get("succeeded") == 5 else None
    obj = wait_for(finished, timeout=90, interval=0.05, what="5 completions")
    assert most <= 2
    assert most == 2                      # it did run two at once
    assert len(pods_of(cluster, "hk-par")) == 5
    _, rows = table(netemu(cluster, "get", "job", "hk-par").stdout)
    assert rows[0]["STATUS"] == "Complete" and rows[0]["COMPLETIONS"] == "5/5"
    assert any(c["type"] == "Complete" for c in obj["status"]["conditions"])
    netemu(cluster, "delete", "job", "hk-par")


def test_job_never_fails_after_backoff_limit(cluster, tmp_path):
    path = write(tmp_path, "fail.yaml", job("hk-fail", ["false"], backoffLimit=2))
    netemu(cluster, "apply", "-f", path)

    def failed():
        _, rows = table(netemu(cluster, "get", "job", "hk-fail").stdout)
        return rows[0] if rows[0]["STATUS"] == "Failed" else None
    row = wait_for(failed, timeout=60, what="the Job to fail")
    assert row["COMPLETIONS"] == "0/1"
    pods = pods_of(cluster, "hk-fail")
    assert len(pods) == 3 and all(p["status"]["phase"] == "Failed" for p in pods)
    text = netemu(cluster, "describe", "job", "hk-fail").stdout
    assert re.search(r"^Pods Statuses:\s+0 Active \(0 Ready\) / 0 Succeeded / 3 Failed$", text, re.M)
    assert re.search(r"^Backoff Limit:\s+2$", text, re.M)
    assert re.search(r"Warning\s+BackoffLimitExceeded", text)
    netemu(cluster, "delete", "job", "hk-fail")


def test_job_on_failure_restarts_in_place(cluster, tmp_path):
    marker = tmp_path / "second-run"
    # Fails the first time, succeeds once the marker exists: one pod, restarted.
    script = f"test -e {marker} && exit 0; touch {marker}; exit 1"
    path = write(tmp_path, "onfail.yaml", job("hk-onfail", ["sh", "-c", script], restart="OnFailure"))
    netemu(cluster, "apply", "-f", path)
    wait_for(lambda: ((get_obj(cluster, "Job", "hk-onfail") or {}).get("status") or {}).get("succeeded") == 1,
             timeout=60, what="the Job to succeed")
    [pod] = pods_of(cluster, "hk-onfail")
    assert pod["status"]["containerStatuses"][0]["restartCount"] >= 1
    netemu(cluster, "delete", "job", "hk-onfail")


# -- DaemonSets ----------------------------------------------------------------------------

def _nodes_of(cluster, prefix) -> list[str]:
    return sorted(p["spec"].get("nodeName") for p in running_pods(cluster, prefix))


def test_daemonset_follows_node_labels(cluster, tmp_path):
    path = write(tmp_path, "ds.yaml", daemonset("hk-ssd", LOOP, {"disk": "ssd"}))
    assert netemu(cluster, "apply", "-f", path).stdout.strip() == "daemonset.apps/hk-ssd created"
    wait_for(lambda: _nodes_of(cluster, "hk-ssd") == ["n1"], timeout=30, what="the daemon on n1 only")
    headers, rows = table(netemu(cluster, "get", "ds").stdout)
    assert headers == ["NAME", "DESIRED", "CURRENT", "READY", "UP-TO-DATE", "AVAILABLE", "NODE SELECTOR", "AGE"]
    row = next(r for r in rows if r["NAME"] == "hk-ssd")
    assert (row["DESIRED"], row["CURRENT"], row["NODE SELECTOR"]) == ("1", "1", "disk=ssd")

    try:
        assert netemu(cluster, "label", "node", "n2", "disk=ssd").stdout.strip() == "node/n2 labeled"
        wait_for(lambda: _nodes_of(cluster, "hk-ssd") == ["n1", "n2"], timeout=30, what="a daemon on n2")
        assert netemu(cluster, "label", "node", "n1", "disk-").stdout.strip() == "node/n1 unlabeled"
        wait_for(lambda: _nodes_of(cluster, "hk-ssd") == ["n2"] and
                 all(p["spec"]["nodeName"] == "n2" for p in pods_of(cluster, "hk-ssd")),
                 timeout=30, what="the daemon gone from n1")
        text = netemu(cluster, "describe", "ds", "hk-ssd").stdout
        assert re.search(r"^Node-Selector:\s+disk=ssd$", text, re.M)
        assert re.search(r"^Desired Number of Nodes Scheduled: 1$", text, re.M)
        assert re.search(r"^Pods Status:\s+1 Running / 0 Waiting / 0 Succeeded / 0 Failed$", text, re.M)
    finally:
        netemu(cluster, "label", "node", "n1", "disk=ssd", "--overwrite", check=False)
        netemu(cluster, "label", "node", "n2", "disk-", check=False)
        netemu(cluster, "delete", "ds", "hk-ssd", check=False)


def test_daemonset_runs_on_every_node_including_the_cordoned_master(cluster, tmp_path):
    path = write(tmp_path, "every.yaml", daemonset("hk-every", LOOP))
    netemu(cluster, "apply", "-f", path)
    # DaemonSet pods tolerate the unschedulable taint: the cordoned master gets one too.
    wait_for(lambda: _nodes_of(cluster, "hk-every") == ["k8s-master", "n1", "n2"], timeout=30,
             what="one daemon per node")
    pod = running_pods(cluster, "hk-every")[0]["metadata"]["name"]
    wait_for(lambda: "alive" in netemu(cluster, "logs", pod).stdout, timeout=15, what="the daemon's output")
    _, rows = table(netemu(cluster, "get", "ds", "hk-every").stdout)
    assert (rows[0]["DESIRED"], rows[0]["CURRENT"], rows[0]["NODE SELECTOR"]) == ("3", "3", "<none>")
    out = netemu(cluster, "delete", "ds", "hk-every").stdout
    assert out.strip() == 'daemonset.apps "hk-every" deleted'
    wait_for(lambda: not pods_of(cluster, "hk-every"), timeout=30, what="the daemons gone")
