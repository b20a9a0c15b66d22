"""kubectl's tables and describe texts for services, endpoints, workloads and events,
against hand-built objects in their API shape (no cluster, no root)."""

from __future__ import annotations

import datetime
import time

import pytest

from netemu import kubectl_tables as kt
from netemu.store import registry
from netemu.store.sqlite import SqliteStore

pytestmark = pytest.mark.timeout(20)


@pytest.fixture(autouse=True)
def utc(monkeypatch):
    """describe prints API times in the local zone, as kubectl does: fix it."""
    monkeypatch.setenv("TZ", "UTC")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def stamp(seconds_ago: float) -> str:
    t = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds_ago)
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


def service(name="web", type_="ClusterIP", ports=None, **extra):
    spec = {"type": type_, "selector": {"app": "nginx"}, "clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10"],
            "ipFamilies": ["IPv4"], "ipFamilyPolicy": "SingleStack", "sessionAffinity": "None",
            "ports": ports or [{"port": 80, "protocol": "TCP", "targetPort": 80}]}
    status = extra.pop("status", {})
    spec.update(extra)
    return {"kind": "Service", "metadata": {"name": name, "namespace": "default", "labels": {"app": "nginx"}},
            "spec": spec, "status": status}


def endpoints(ips, ports=({"port": 80, "protocol": "TCP"},)):
    return {"kind": "Endpoints", "metadata": {"name": "web", "namespace": "default"},
            "subsets": [{"addresses": [{"ip": ip} for ip in ips], "ports": list(ports)}] if ips else []}


def template(labels, containers):
    return {"metadata": {"labels": labels}, "spec": {"containers": containers}}


NGINX = {"name": "nginx-podtoservice", "image": "nginx", "ports": [{"containerPort": 80, "protocol": "TCP"}]}


def rc(**status):
    return {"kind": "ReplicationController",
            "metadata": {"name": "podtoservcie", "namespace": "default", "uid": "rc-uid",
                         "labels": {"app": "nginx"}},
            "spec": {"replicas": 2, "selector": {"app": "nginx"}, "template": template({"app": "nginx"}, [NGINX])},
            "status": status}


def job(status=None, **spec):
    return {"kind": "Job", "metadata": {"name": "package-check", "namespace": "default", "uid": "job-uid"},
            "spec": {"parallelism": 1, "completions": 1, "backoffLimit": 6,
                     "selector": {"matchLabels": {"test": "dpkg", "image": "ubuntu"}},
                     "template": template({"image": "ubuntu", "test": "dpkg"},
                                          [{"name": "package-check", "image": "ubuntu",
                                            "command": ["dpkg-query", "-l"]}]), **spec},
            "status": status or {}}


# -- tables ------------------------------------------------------------------------------

def test_supported_kinds():
    for kind in ("Service", "Endpoints", "ReplicationController", "ReplicaSet", "Deployment", "Job",
                 "DaemonSet", "Event"):
        assert kt.supports(kind)
    assert not kt.supports("Pod") and not kt.supports("Node")   # printers.py has those


def test_service_table_headers_and_cells():
    headers, rows = kt.tabulate("Service", [service()], False)
    assert headers == ["NAME", "TYPE", "CLUSTER-IP", "EXTERNAL-IP", "PORT(S)", "AGE"]
    assert rows == [["web", "ClusterIP", "10.96.0.10", "<none>", "80/TCP", "<unknown>"]]
    headers, rows = kt.tabulate("Service", [service()], True)
    assert headers[-1] == "SELECTOR" and rows[0][-1] == "app=nginx"


def test_service_ports_and_external_ip_formats():
    node_port = service(type_="NodePort", ports=[{"port": 80, "protocol": "TCP", "nodePort": 30812},
                                                 {"port": 53, "protocol": "UDP", "nodePort": 30053}])
    assert kt.port_string(node_port["spec"]["ports"]) == "80:30812/TCP,53:30053/UDP"
    assert kt.external_ip(node_port) == "<none>"
    pending = service(type_="LoadBalancer", status={"loadBalancer": {}})
    assert kt.external_ip(pending) == "<pending>"
    ready = service(type_="LoadBalancer", status={"loadBalancer": {"ingress": [{"ip": "172.30.0.240"}]}})
    assert kt.external_ip(ready) == "172.30.0.240"
    many = service(type_="LoadBalancer", status={"loadBalancer": {"ingress": [{"ip": "172.30.0.241"},
                                                                              {"ip": "172.30.0.240"}]}})
    assert kt.external_ip(many, wide=True) == "172.30.0.240,172.30.0.241"
    assert kt.external_ip(many) == "172.30.0.240,..."            # clipped to 16 characters
    assert kt.external_ip(service(externalIPs=["1.2.3.4"])) == "1.2.3.4"
    assert kt.port_string([]) == "<none>"
    assert kt.tabulate("Service", [service(clusterIP="None")], False)[1][0][2] == "None"


def test_endpoints_list_three_then_more():
    assert kt.format_endpoints(endpoints([])) == "<none>"
    assert kt.format_endpoints(endpoints(["10.244.1.2", "10.244.2.2"])) == "10.244.1.2:80,10.244.2.2:80"
    five = endpoints([f"10.244.{i}.2" for i in range(1, 6)])
    assert kt.format_endpoints(five) == "10.244.1.2:80,10.244.2.2:80,10.244.3.2:80 + 2 more..."
    two_ports = endpoints(["10.244.1.2", "10.244.2.2"], ({"name": "http", "port": 80, "protocol": "TCP"},
                                                          {"name": "dns", "port": 53, "protocol": "UDP"}))
    assert kt.format_endpoints(two_ports) == "10.244.1.2:80,10.244.2.2:80,10.244.1.2:53 + 1 more..."
    assert kt.format_endpoints(two_ports, {"dns"}) == "10.244.1.2:53,10.244.2.2:53"
    headers, rows = kt.tabulate("Endpoints", [five], False)
    assert headers == ["NAME", "ENDPOINTS", "AGE"] and rows[0][1].endswith("+ 2 more...")


def test_replication_controller_and_replica_set_rows():
    headers, rows = kt.tabulate("ReplicationController", [rc(replicas=2, readyReplicas=1)], True)
    assert headers == ["NAME", "DESIRED", "CURRENT", "READY", "AGE", "CONTAINERS", "IMAGES", "SELECTOR"]
    assert rows == [["podtoservcie", "2", "2", "1", "<unknown>", "nginx-podtoservice", "nginx", "app=nginx"]]
    rs = {"kind": "ReplicaSet", "metadata": {"name": "rs1"},
          "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "a"},
                                               "matchExpressions": [{"key": "tier", "operator": "In",
                                                                     "values": ["web", "api"]}]},
                   "template": template({"app": "a"}, [{"name": "a", "image": "i1"}, {"name": "b", "image": "i2"}])},
          "status": {}}
    headers, rows = kt.tabulate("ReplicaSet", [rs], True)
    assert headers[:5] == ["NAME", "DESIRED", "CURRENT", "READY", "AGE"]
    assert rows == [["rs1", "3", "0", "0", "<unknown>", "a,b", "i1,i2", "app=a,tier in (api,web)"]]


def test_deployment_row():
    deploy = {"kind": "Deployment", "metadata": {"name": "d"},
              "spec": {"replicas": 3, "selector": {"matchLabels": {"app": "d"}},
                       "template": template({"app": "d"}, [NGINX])},
              "status": {"readyReplicas": 2, "updatedReplicas": 3, "availableReplicas": 2}}
    headers, rows = kt.tabulate("Deployment", [deploy], False)
    assert headers == ["NAME", "READY", "UP-TO-DATE", "AVAILABLE", "AGE"]
    assert rows == [["d", "2/3", "3", "2", "<unknown>"]]
    assert kt.tabulate("Deployment", [deploy], True)[0][5:] == ["CONTAINERS", "IMAGES", "SELECTOR"]


def test_job_status_completions_and_duration():
    headers, _ = kt.tabulate("Job", [job()], False)
    assert headers == ["NAME", "STATUS", "COMPLETIONS", "DURATION", "AGE"]
    not_started = job()
    assert kt.tabulate("Job", [not_started], False)[1][0][1:4] == ["Running", "0/1", ""]
    done = job({"succeeded": 1, "startTime": "2024-01-01T00:00:00Z", "completionTime": "2024-01-01T00:00:07Z",
                "conditions": [{"type": "Complete", "status": "True"}]})
    assert kt.tabulate("Job", [done], False)[1][0][1:4] == ["Complete", "1/1", "7s"]
    failed = job({"failed": 3, "startTime": "2024-01-01T00:00:00Z",
                  "conditions": [{"type": "Failed", "status": "True", "reason": "BackoffLimitExceeded"}]})
    assert kt.job_status_word(failed) == "Failed"
    running = job({"active": 1, "startTime": "2024-01-01T00:00:00Z"})
    now = datetime.datetime(2024, 1, 1, 0, 3, 5, tzinfo=datetime.timezone.utc)
    assert kt.job_duration(running, now) == "3m5s"                 # still running: up to now
    assert kt.job_status_word(running) == "Running"
    assert kt.job_completions(job(completions=5)) == "0/5"
    assert kt.job_completions(job(completions=None, parallelism=3)) == "0/1 of 3"
    assert kt.tabulate("Job", [done], True)[1][0][5:] == ["package-check", "ubuntu", "image=ubuntu,test=dpkg"]


def test_daemonset_row():
    ds = {"kind": "DaemonSet", "metadata": {"name": "ds"},
          "spec": {"selector": {"matchLabels": {"ds": "x"}},
                   "template": {"metadata": {"labels": {"ds": "x"}},
                                "spec": {"nodeSelector": {"disk": "ssd"}, "containers": [NGINX]}}},
          "status": {"desiredNumberScheduled": 2, "currentNumberScheduled": 2, "numberReady": 1,
                     "updatedNumberScheduled": 2, "numberAvailable": 1}}
    headers, rows = kt.tabulate("DaemonSet", [ds], False)
    assert headers == ["NAME", "DESIRED", "CURRENT", "READY", "UP-TO-DATE", "AVAILABLE", "NODE SELECTOR", "AGE"]
    assert rows == [["ds", "2", "2", "1", "2", "1", "disk=ssd", "<unknown>"]]


def test_event_rows():
    ev = {"kind": "Event", "metadata": {"name": "podtoservcie.17a"},
          "involvedObject": {"kind": "ReplicationController", "name": "podtoservcie"},
          "type": "Normal", "reason": "SuccessfulCreate", "message": " Created pod: podtoservcie-x \n",
          "source": {"component": "replication-controller"}, "count": 3,
          "firstTimestamp": stamp(300), "lastTimestamp": stamp(10)}
    headers, rows = kt.tabulate("Event", [ev], False)
    assert headers == ["LAST SEEN", "TYPE", "REASON", "OBJECT", "MESSAGE"]
    last, type_, reason, obj, message = rows[0]
    assert last.startswith("1") and last.endswith("(x3 over 5m)")
    assert (type_, reason, obj, message) == ("Normal", "SuccessfulCreate", "replicationcontroller/podtoservcie",
                                             "Created pod: podtoservcie-x")
    headers, rows = kt.tabulate("Event", [ev], True)
    assert headers == ["LAST SEEN", "TYPE", "REASON", "OBJECT", "SUBOBJECT", "SOURCE", "MESSAGE", "FIRST SEEN",
                       "COUNT", "NAME"]
    assert rows[0][5] == "replication-controller" and rows[0][8:] == ["3", "podtoservcie.17a"]


# -- the tabwriter layout ------------------------------------------------------------------

def test_layout_pads_column_blocks_like_go_tabwriter():
    text = "Name:\tx\nLonger label:\ty\nno tab here\nA:\tb\tc\nAB:\td\n"
    assert kt._layout(text, 2) == ("Name:          x\n"
                                   "Longer label:  y\n"
                                   "no tab here\n"
                                   "A:   b  c\n"
                                   "AB:  d\n")


# -- describe -------------------------------------------------------------------------------

def test_describe_service_matches_kubectl():
    svc = service(type_="NodePort", ports=[{"port": 80, "protocol": "TCP", "targetPort": 80, "nodePort": 30812}],
                  externalTrafficPolicy="Cluster")
    text = kt.describe_service(svc, endpoints(["10.244.1.2", "10.244.2.2"]), [])
    assert text == (
        "Name:                     web\n"
        "Namespace:                default\n"
        "Labels:                   app=nginx\n"
        "Annotations:              <none>\n"
        "Selector:                 app=nginx\n"
        "Type:                     NodePort\n"
        "IP Family Policy:         SingleStack\n"
        "IP Families:              IPv4\n"
        "IP:                       10.96.0.10\n"
        "IPs:                      10.96.0.10\n"
        "Port:                     <unset>  80/TCP\n"
        "TargetPort:               80/TCP\n"
        "NodePort:                 <unset>  30812/TCP\n"
        "Endpoints:                10.244.1.2:80,10.244.2.2:80\n"
        "Session Affinity:         None\n"
        "External Traffic Policy:  Cluster\n"
        "Events:                   <none>\n")


def test_describe_service_load_balancer_and_many_endpoints(tmp_path):
    svc = service(type_="LoadBalancer", status={"loadBalancer": {"ingress": [{"ip": "172.30.0.240"}]}},
                  ports=[{"name": "http", "port": 80, "protocol": "TCP", "targetPort": "web", "nodePort": 31000}])
    store = SqliteStore(str(tmp_path / "s.db"), create=True)
    ep = endpoints([f"10.244.{i}.2" for i in range(1, 6)], ({"name": "http", "port": 8080, "protocol": "TCP"},))
    ep["kind"] = "Endpoints"
    registry.create(store, ep)
    text = kt.describe("Service", svc, [], store)
    lines = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    assert lines["LoadBalancer Ingress"].strip() == "172.30.0.240"
    assert lines["Port"].strip() == "http  80/TCP"
    assert lines["TargetPort"].strip() == "web/TCP"
    assert lines["NodePort"].strip() == "http  31000/TCP"
    assert lines["Endpoints"].strip() == "10.244.1.2:8080,10.244.2.2:8080,10.244.3.2:8080 + 2 more..."
    # No Endpoints object at all: <none>.
    assert "Endpoints:         <none>" in kt.describe("Service", service(name="other"), [], store)
    store.close()


def _pod(name, phase, owner_uid="rc-uid"):
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "default",
                                        "ownerReferences": [{"kind": "ReplicationController", "name": "x",
                                                             "uid": owner_uid, "controller": True}]},
            "spec": {"containers": []}, "status": {"phase": phase}}


def test_describe_replication_controller_counts_its_own_pods(tmp_path):
    store = SqliteStore(str(tmp_path / "s.db"), create=True)
    for name, phase in (("a", "Running"), ("b", "Running"), ("c", "Pending"), ("d", "Failed")):
        registry.create(store, _pod(name, phase))
    registry.create(store, _pod("other", "Running", owner_uid="someone-else"))
    events = [{"type": "Normal", "reason": "SuccessfulCreate", "message": "Created pod: a", "count": 1,
               "firstTimestamp": stamp(30), "lastTimestamp": stamp(30),
               "source": {"component": "replication-controller"}, "involvedObject": {}}]
    text = kt.describe("ReplicationController", rc(replicas=3), events, store)
    store.close()
    head, _, events_part = text.partition("Events:\n")
    assert head == (
        "Name:         podtoservcie\n"
        "Namespace:    default\n"
        "Selector:     app=nginx\n"
        "Labels:       app=nginx\n"
        "Annotations:  <none>\n"
        "Replicas:     3 current / 2 desired\n"
        "Pods Status:  2 Running / 1 Waiting / 0 Succeeded / 1 Failed\n"
        "Pod Template:\n"
        "  Labels:  app=nginx\n"
        "  Containers:\n"
        "   nginx-podtoservice:\n"
        "    Image:         nginx\n"
        "    Port:          80/TCP\n"
        "    Host Port:     0/TCP\n"
        "    Environment:   <none>\n"
        "    Mounts:        <none>\n"
        "  Volumes:         <none>\n"
        "  Node-Selectors:  <none>\n"
        "  Tolerations:     <none>\n")
    rows = events_part.splitlines()
    assert rows[0].split() == ["Type", "Reason", "Age", "From", "Message"]
    assert rows[1].split() == ["----", "------", "----", "----", "-------"]
    assert rows[2].split()[:2] == ["Normal", "SuccessfulCreate"] and rows[2].endswith("Created pod: a")
    assert rows[2].split()[3] == "replication-controller"


def test_describe_job_matches_the_tutorial_fields():
    done = job({"succeeded": 1, "ready": 0, "startTime": "2024-01-02T03:04:05Z",
                "completionTime": "2024-01-02T03:04:09Z",
                "conditions": [{"type": "Complete", "status": "True"}]})
    text = kt.describe("Job", done, [], None)
    assert text.splitlines()[:13] == [
        "Name:           package-check",
        "Namespace:      default",
        "Selector:       image=ubuntu,test=dpkg",
        "Labels:         <none>",
        "Annotations:    <none>",
        "Parallelism:    1",
        "Completions:    1",
        "Backoff Limit:  6",
        "Start Time:     Tue, 02 Jan 2024 03:04:05 +0000",
        "Completed At:   Tue, 02 Jan 2024 03:04:09 +0000",
        "Duration:       4s",
        "Pods Statuses:  0 Active (0 Ready) / 1 Succeeded / 0 Failed",
        "Pod Template:"]
    assert "    Command:\n      dpkg-query\n      -l\n" in text
    assert text.endswith("\nEvents:            <none>")
    # Without status.ready (an older controller) kubectl prints the short form.
    assert "Pods Statuses:  1 Active / 0 Succeeded / 0 Failed" in kt.describe("Job", job({"active": 1}), [], None)
    assert "Completions:    <unset>" in kt.describe("Job", job(completions=None), [], None)


def test_describe_daemonset(tmp_path):
    ds = {"kind": "DaemonSet", "metadata": {"name": "ds", "namespace": "default", "uid": "ds-uid"},
          "spec": {"selector": {"matchLabels": {"ds": "x"}},
                   "template": {"metadata": {"labels": {"ds": "x"}},
                                "spec": {"nodeSelector": {"disk": "ssd"},
                                         "containers": [{"name": "main", "image": "busybox",
                                                         "command": ["sh", "-c", "while true; do sleep 5; done"]}]}}},
          "status": {"desiredNumberScheduled": 2, "currentNumberScheduled": 2, "numberReady": 2,
                     "updatedNumberScheduled": 2, "numberAvailable": 2, "numberMisscheduled": 0}}
    store = SqliteStore(str(tmp_path / "s.db"), create=True)
    registry.create(store, _pod("ds-a", "Running", owner_uid="ds-uid"))
    text = kt.describe("DaemonSet", ds, [], store)
    store.close()
    lines = text.splitlines()
    assert lines[:5] == ["Name:           ds", "Namespace:      default", "Selector:       ds=x",
                         "Node-Selector:  disk=ssd", "Labels:         <none>"]
    assert "Desired Number of Nodes Scheduled: 2" in lines
    assert "Current Number of Nodes Scheduled: 2" in lines
    assert "Number of Nodes Scheduled with Available Pods: 2" in lines
    assert "Pods Status:  1 Running / 0 Waiting / 0 Succeeded / 0 Failed" in lines
    assert "  Node-Selectors:  disk=ssd" in lines


def test_describe_deployment_names_new_and_old_replica_sets(tmp_path):
    tpl = template({"app": "d"}, [NGINX])
    deploy = {"kind": "Deployment",
              "metadata": {"name": "d", "namespace": "default", "uid": "d-uid",
                           "creationTimestamp": "2024-01-02T03:04:05Z"},
              "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "d"}}, "template": tpl,
                       "strategy": {"type": "RollingUpdate"}},
              "status": {"replicas": 2, "updatedReplicas": 2, "availableReplicas": 2,
                         "conditions": [{"type": "Available", "status": "True",
                                         "reason": "MinimumReplicasAvailable"}]}}
    owner = [{"kind": "Deployment", "name": "d", "uid": "d-uid", "controller": True}]

    def rs(name, labels, replicas):
        return {"kind": "ReplicaSet", "metadata": {"name": name, "namespace": "default", "ownerReferences": owner},
                "spec": {"replicas": replicas, "template": template(labels, [NGINX])},
                "status": {"replicas": replicas}}
    store = SqliteStore(str(tmp_path / "s.db"), create=True)
    registry.create(store, rs("d-new", {"app": "d", "pod-template-hash": "new"}, 2))
    registry.create(store, rs("d-old", {"app": "d", "v": "1", "pod-template-hash": "old"}, 0))
    text = kt.describe("Deployment", deploy, [], store)
    store.close()
    lines = text.splitlines()
    assert "CreationTimestamp:      Tue, 02 Jan 2024 03:04:05 +0000" in lines
    assert "Replicas:               2 desired | 2 updated | 2 total | 2 available | 0 unavailable" in lines
    assert "RollingUpdateStrategy:  25% max unavailable, 25% max surge" in lines
    assert "OldReplicaSets:  d-old (0/0 replicas created)" in lines
    assert "NewReplicaSet:   d-new (2/2 replicas created)" in lines
    # The conditions share their first column with the lines below, as in kubectl.
    assert "  Available      True    MinimumReplicasAvailable" in lines


def test_describe_endpoints_and_event():
    ep = {"kind": "Endpoints", "metadata": {"name": "web", "namespace": "default"},
          "subsets": [{"addresses": [{"ip": "10.244.1.2"}], "notReadyAddresses": [{"ip": "10.244.2.2"}],
                       "ports": [{"port": 80, "protocol": "TCP"}]}]}
    assert kt.describe("Endpoints", ep, [], None) == (
        "Name:         web\n"
        "Namespace:    default\n"
        "Labels:       <none>\n"
        "Annotations:  <none>\n"
        "Subsets:\n"
        "  Addresses:          10.244.1.2\n"
        "  NotReadyAddresses:  10.244.2.2\n"
        "  Ports:\n"
        "    Name     Port  Protocol\n"
        "    ----     ----  --------\n"
        "    <unset>  80    TCP\n"
        "\n"
        "Events:  <none>")
    ev = {"kind": "Event", "apiVersion": "v1", "metadata": {"name": "x.1", "namespace": "default"},
          "involvedObject": {"kind": "Pod", "name": "x"}, "reason": "Started", "message": "Started",
          "count": 1, "type": "Normal"}
    text = kt.describe("Event", ev, [], None)
    assert "API Version:  v1" in text and "Involved Object:\n  Kind:   Pod\n" in text
    assert "Reason:  Started" in text


def test_describe_unknown_kind_is_a_key_error():
    with pytest.raises(KeyError):
        kt.describe("Pod", {"metadata": {"name": "p"}}, [], None)


def test_describe_pod_has_annotations_and_every_kind_one_time_format():
    """kubectl prints `Annotations:` right after Labels (`<none>` when empty) and
    every API time of every kind as RFC1123Z (`Tue, 02 Jan 2024 03:04:05 +0000`)."""
    from netemu import printers

    t0, t1 = "2024-01-02T03:04:05Z", "2024-01-02T03:04:09Z"
    pod = {"kind": "Pod", "metadata": {"name": "p", "namespace": "default", "labels": {"app": "x"}},
           "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "nginx"},
                                                     {"name": "d", "image": "busybox"}]},
           "status": {"phase": "Running", "startTime": t0, "hostIP": "10.0.0.1", "podIP": "10.244.1.2",
                      "containerStatuses": [
                          {"name": "c", "ready": True, "state": {"running": {"startedAt": t0}}},
                          {"name": "d", "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                                                                 "startedAt": t0, "finishedAt": t1}}}]}}
    lines = printers.describe_pod(pod, [], None).splitlines()
    labels = next(i for i, line in enumerate(lines) if line.startswith("Labels:"))
    assert lines[labels + 1] == "Annotations:      <none>"
    assert "Start Time:       Tue, 02 Jan 2024 03:04:05 +0000" in lines
    assert lines.count("      Started:      Tue, 02 Jan 2024 03:04:05 +0000") == 2
    assert "      Finished:     Tue, 02 Jan 2024 03:04:09 +0000" in lines
    pod["metadata"]["annotations"] = {"a": "1", "b": "2",
                                      "kubectl.kubernetes.io/last-applied-configuration": "{}"}
    lines = printers.describe_pod(pod, [], None).splitlines()
    assert lines[labels + 1:labels + 3] == ["Annotations:      a: 1", "                  b: 2"]
    node = {"kind": "Node", "metadata": {"name": "n1", "creationTimestamp": t0}, "spec": {}, "status": {}}
    assert "CreationTimestamp:  Tue, 02 Jan 2024 03:04:05 +0000" in printers.describe_node(node, [], None, [])
    # The job's Start Time (kubectl_tables) is the same format as the pod's.
    job_text = kt.describe("Job", job({"startTime": t0}), [], None)
    assert "Start Time:     Tue, 02 Jan 2024 03:04:05 +0000" in job_text.splitlines()
