"""Pure reconcile functions of every controller, without a store."""

from __future__ import annotations

import pytest

from netemu.controllers import actions as act
from netemu.controllers import daemonset, endpoints, garbagecollector, job, replication, scheduler
from netemu.controllers import podutil
from netemu.k8s import ownership, selectors

from tests.unit.test_controllers_support import node, pod, workload

pytestmark = pytest.mark.timeout(10)


def of(actions, kind):
    return [a for a in actions if isinstance(a, kind)]


def status_of(actions):
    found = of(actions, act.SetStatus)
    return found[-1].status if found else None


# -- selectors -----------------------------------------------------------------------

def test_selector_shapes():
    assert selectors.matches({"app": "nginx"}, {"app": "nginx", "x": "y"})
    assert not selectors.matches({"app": "nginx"}, {"app": "web"})
    assert not selectors.matches({}, {"app": "nginx"})                    # empty selects nothing
    s = {"matchLabels": {"app": "a"},
         "matchExpressions": [{"key": "tier", "operator": "In", "values": ["web", "api"]},
                              {"key": "env", "operator": "NotIn", "values": ["prod"]},
                              {"key": "team", "operator": "Exists"},
                              {"key": "legacy", "operator": "DoesNotExist"}]}
    assert selectors.matches(s, {"app": "a", "tier": "web", "team": "x"})
    assert not selectors.matches(s, {"app": "a", "tier": "db", "team": "x"})
    assert not selectors.matches(s, {"app": "a", "tier": "web", "team": "x", "env": "prod"})
    assert not selectors.matches(s, {"app": "a", "tier": "web"})
    assert not selectors.matches(s, {"app": "a", "tier": "web", "team": "x", "legacy": "1"})
    with pytest.raises(selectors.SelectorError):
        selectors.matches({"matchExpressions": [{"key": "a", "operator": "Near"}]}, {"a": "1"})
    # as kubectl prints it: requirements sorted by key, values sorted
    assert selectors.format_selector(s) == "app=a,env notin (prod),!legacy,team,tier in (api,web)"


def test_template_hash_is_stable_and_name_safe():
    t = {"metadata": {"labels": {"app": "a"}}, "spec": {"containers": [{"image": "nginx"}]}}
    h = podutil.template_hash(t)
    assert h == podutil.template_hash(dict(t)) and len(h) == 10
    assert h != podutil.template_hash({**t, "spec": {"containers": [{"image": "httpd"}]}})
    assert set(h) <= set("bcdfghjklmnpqrstvwxz2456789")


# -- scheduler ------------------------------------------------------------------------

def test_scheduler_spreads_by_owner_then_load():
    rc = workload("ReplicationController", "web", replicas=3)
    nodes = [node("node1"), node("node2"), node("node3")]
    pods = [pod("busy", node_name="node1"), pod("busy2", node_name="node1"),
            pod("web-1", {"app": "web"}, owner=rc, node_name="node2")]
    pods += [pod(f"web-new{i}", {"app": "web"}, owner=rc, created=f"2024-01-01T00:00:0{i}Z") for i in range(3)]
    decisions = scheduler.schedule(pods, nodes)
    assert [d.node for d in decisions] == ["node3", "node1", "node2"]


def test_scheduler_filters_and_explains():
    nodes = [node("master", unschedulable=True), node("node1", {"disk": "hdd"}), node("node2"),
             node("down", ready=False)]
    p = pod("picky", node_selector={"disk": "ssd"})
    [d] = scheduler.schedule([p], nodes)
    assert isinstance(d, scheduler.Unschedulable)
    assert d.message == ("0/4 nodes are available: 1 node(s) had untolerated taint "
                         "{node.kubernetes.io/not-ready: }, 1 node(s) were unschedulable, "
                         "2 node(s) didn't match Pod's node affinity/selector.")
    [ok] = scheduler.schedule([pod("ssd", node_selector={"disk": "hdd"})], nodes)
    assert ok.node == "node1"


def test_scheduler_honours_host_ports_and_affinity():
    nodes = [node("node1"), node("node2")]
    web = [{"containerPort": 80, "hostPort": 80}]
    pods = [pod("a", ports=web, node_name="node1"), pod("b", ports=web), pod("c", ports=web)]
    decisions = scheduler.schedule(pods, nodes)
    assert decisions[0].node == "node2"
    assert decisions[1].message == ("0/2 nodes are available: 2 node(s) didn't have free ports "
                                    "for the requested pod ports.")
    affine = pod("aff")
    affine["spec"]["affinity"] = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchFields": [{"key": "metadata.name", "operator": "In", "values": ["node2"]}]}]}}}
    assert scheduler.schedule([affine, pod("x", node_name="node2")], nodes)[0].node == "node2"


def test_scheduler_plan_records_events_once():
    p = pod("p")
    [d] = scheduler.schedule([p], [node("node1")])
    actions = scheduler.plan([d])
    assert actions[0].event.message == "Successfully assigned default/p to node1"
    bound = pod("q")
    actions[0].change(bound)
    assert bound["spec"]["nodeName"] == "node1"
    stuck = scheduler.Unschedulable(pod("s"), "0/1 nodes are available: 1 node(s) were unschedulable.")
    [mark] = scheduler.plan([stuck])
    marked = pod("s")
    mark.change(marked)
    cond = [c for c in marked["status"]["conditions"] if c["type"] == "PodScheduled"][0]
    assert (cond["status"], cond["reason"]) == ("False", "Unschedulable")
    assert scheduler.plan([scheduler.Unschedulable(marked, stuck.message)]) == []   # no repeat event


# -- ReplicationController / ReplicaSet ---------------------------------------------------

def test_rc_creates_missing_and_replaces_dead():
    rc = workload("ReplicationController", "podtoservcie", replicas=2, labels={"app": "nginx"})
    dead = pod("podtoservcie-dead", {"app": "nginx"}, owner=rc, phase="Failed", node_name="n1")
    live = pod("podtoservcie-live", {"app": "nginx"}, owner=rc, phase="Running", ready=True, node_name="n1")
    actions = replication.reconcile_replicas(rc, [dead, live])
    [create] = of(actions, act.CreatePod)
    assert create.pod["metadata"]["generateName"] == "podtoservcie-"
    assert create.pod["metadata"]["labels"] == {"app": "nginx"}
    assert create.pod["metadata"]["ownerReferences"][0]["controller"] is True
    assert not of(actions, act.DeletePod)
    assert status_of(actions)["replicas"] == 1 and status_of(actions)["readyReplicas"] == 1


def test_rs_deletes_surplus_in_kubernetes_order():
    rs = workload("ReplicaSet", "web", replicas=1)
    running_old = pod("old", {"app": "web"}, owner=rs, phase="Running", ready=True, node_name="n1",
                      created="2024-01-01T00:00:00Z")
    running_new = pod("new", {"app": "web"}, owner=rs, phase="Running", ready=True, node_name="n1",
                      created="2024-01-01T00:01:00Z")
    unscheduled = pod("pending", {"app": "web"}, owner=rs)
    actions = replication.reconcile_replicas(rs, [running_old, running_new, unscheduled])
    assert [a.pod["metadata"]["name"] for a in of(actions, act.DeletePod)] == ["pending", "new"]


def test_rc_adopts_orphans_and_releases_relabelled_pods():
    rc = workload("ReplicationController", "web", replicas=2)
    orphan = pod("orphan", {"app": "web"}, phase="Running")
    relabelled = pod("gone", {"app": "debug"}, owner=rc, phase="Running")
    foreign_ns = pod("elsewhere", {"app": "web"}, ns="other")
    actions = replication.reconcile_replicas(rc, [orphan, relabelled, foreign_ns])
    whys = sorted(a.why for a in of(actions, act.Mutate))
    assert whys == ["adopt", "release"]
    assert len(of(actions, act.CreatePod)) == 1           # the orphan counts as one of the two
    adopt = [a for a in of(actions, act.Mutate) if a.why == "adopt"][0]
    copy = pod("orphan", {"app": "web"})
    adopt.change(copy)
    assert ownership.controller_ref(copy)["uid"] == rc["metadata"]["uid"]


def test_rc_status_unchanged_means_no_write():
    rc = workload("ReplicationController", "web", replicas=1)
    p = pod("web-1", {"app": "web"}, owner=rc, phase="Running", ready=True)
    rc["status"] = status_of(replication.reconcile_replicas(rc, [p]))
    assert replication.reconcile_replicas(rc, [p]) == []


# -- Deployment ------------------------------------------------------------------------

def test_deployment_creates_hashed_replicaset():
    d = workload("Deployment", "web", replicas=3)
    actions = replication.reconcile_deployment(d, [])
    [create] = of(actions, act.CreateObject)
    rs = create.obj
    h = podutil.template_hash(d["spec"]["template"])
    assert rs["metadata"]["name"] == f"web-{h}" and rs["spec"]["replicas"] == 3
    assert rs["spec"]["selector"]["matchLabels"] == {"app": "web", "pod-template-hash": h}
    assert rs["spec"]["template"]["metadata"]["labels"]["pod-template-hash"] == h
    assert create.message == f"Scaled up replica set web-{h} to 3"


def test_deployment_rolls_within_surge_and_unavailability():
    d = workload("Deployment", "web", replicas=4)
    old = workload("ReplicaSet", "web-old", replicas=4)
    old["metadata"]["ownerReferences"] = [ownership.owner_reference(d)]
    old["metadata"]["creationTimestamp"] = "2024-01-01T00:00:00Z"
    old["status"] = {"replicas": 4, "readyReplicas": 4, "availableReplicas": 4}
    actions = replication.reconcile_deployment(d, [old])
    [create] = of(actions, act.CreateObject)
    assert create.obj["spec"]["replicas"] == 1                 # maxSurge 25% of 4
    [scale_down] = [a for a in of(actions, act.Mutate)]
    assert scale_down.name == "web-old" and "to 3 from 4" in scale_down.event.message   # maxUnavailable 1


# -- Job ----------------------------------------------------------------------------------

def job_obj(**spec):
    return workload("Job", "package-check", labels={"image": "ubuntu", "test": "dpkg"},
                    restart_policy=spec.pop("restart_policy", "Never"), **spec)


def test_job_respects_parallelism_and_labels_pods():
    j = job_obj(completions=5, parallelism=2)
    actions, wake = job.reconcile_job(j, [], now=1000.0)
    creates = of(actions, act.CreatePod)
    assert len(creates) == 2 and wake is None
    labels = creates[0].pod["metadata"]["labels"]
    assert labels["job-name"] == "package-check" and labels["controller-uid"] == j["metadata"]["uid"]
    assert labels["image"] == "ubuntu" and creates[0].pod["metadata"]["generateName"] == "package-check-"


def test_job_never_exceeds_remaining_completions_and_completes():
    j = job_obj(completions=3, parallelism=2)
    done = [pod(f"d{i}", owner=j, phase="Succeeded") for i in range(2)]
    actions, _ = job.reconcile_job(j, done, now=1000.0)
    assert len(of(actions, act.CreatePod)) == 1
    actions, _ = job.reconcile_job(j, done + [pod("d3", owner=j, phase="Succeeded")], now=1000.0)
    st = status_of(actions)
    assert st["succeeded"] == 3 and st["conditions"][-1]["type"] == "Complete" and st["completionTime"]
    assert [e.reason for e in of(actions, act.RecordEvent)] == ["Completed"]


def test_job_backoff_delays_replacement():
    j = job_obj(backoffLimit=3)
    failed = pod("f1", owner=j, phase="Failed")
    failed["status"]["containerStatuses"][0]["state"] = {"terminated": {"finishedAt": "2024-01-01T00:00:00Z"}}
    t0 = sel_time("2024-01-01T00:00:00Z")
    actions, wake = job.reconcile_job(j, [failed], now=t0 + 3)
    assert not of(actions, act.CreatePod) and wake == pytest.approx(7)
    actions, _ = job.reconcile_job(j, [failed], now=t0 + 10.5)
    assert len(of(actions, act.CreatePod)) == 1
    assert job.backoff_delay(2) == 20 and job.backoff_delay(10) == 360 and job.backoff_delay(3, 0.01) == 0.4


def sel_time(stamp):
    from netemu.store import registry
    return registry.parse_time(stamp).timestamp()


def test_job_fails_past_backoff_limit_and_on_deadline():
    j = job_obj(backoffLimit=2)
    failed = [pod(f"f{i}", owner=j, phase="Failed") for i in range(3)]
    running = pod("r", owner=j, phase="Running")
    actions, _ = job.reconcile_job(j, failed + [running], now=2e9)
    st = status_of(actions)
    assert st["conditions"][-1]["reason"] == "BackoffLimitExceeded" and st["failed"] == 3
    assert [a.pod["metadata"]["name"] for a in of(actions, act.DeletePod)] == ["r"]

    on_failure = job_obj(backoffLimit=2, restart_policy="OnFailure")
    restarting = pod("x", owner=on_failure, phase="Running", restarts=3)
    actions, _ = job.reconcile_job(on_failure, [restarting], now=2e9)
    assert status_of(actions)["conditions"][-1]["reason"] == "BackoffLimitExceeded"

    slow = job_obj(activeDeadlineSeconds=30)
    slow["status"] = {"startTime": "2024-01-01T00:00:00Z"}
    actions, _ = job.reconcile_job(slow, [pod("s", owner=slow, phase="Running")],
                                   now=sel_time("2024-01-01T00:00:31Z"))
    assert status_of(actions)["conditions"][-1]["reason"] == "DeadlineExceeded"
    # A finished Job starts nothing more.
    slow["status"] = status_of(actions)
    actions, _ = job.reconcile_job(slow, [], now=sel_time("2024-01-01T00:00:40Z"))
    assert not of(actions, act.CreatePod)


# -- DaemonSet ------------------------------------------------------------------------------

def test_daemonset_places_one_pod_per_eligible_node_including_cordoned():
    ds = workload("DaemonSet", "agent")
    nodes = [node("master", unschedulable=True), node("node1"), node("node2")]
    actions = daemonset.reconcile_daemonset(ds, nodes, [])
    placed = sorted(a.pod["spec"]["nodeName"] for a in of(actions, act.CreatePod))
    assert placed == ["master", "node1", "node2"]
    assert status_of(actions)["desiredNumberScheduled"] == 3


def test_daemonset_follows_node_selector_and_replaces_dead():
    ds = workload("DaemonSet", "agent", node_selector={"disk": "ssd"})
    nodes = [node("node1", {"disk": "ssd"}), node("node2")]
    rev = podutil.template_hash(ds["spec"]["template"])
    stale = pod("agent-old", {"app": "agent"}, owner=ds, node_name="node2", phase="Running")
    dead = pod("agent-dead", {"app": "agent"}, owner=ds, node_name="node1", phase="Failed")
    actions = daemonset.reconcile_daemonset(ds, nodes, [stale, dead])
    assert sorted(a.pod["metadata"]["name"] for a in of(actions, act.DeletePod)) == ["agent-dead", "agent-old"]
    [create] = of(actions, act.CreatePod)
    assert create.pod["spec"]["nodeName"] == "node1"
    assert create.pod["metadata"]["labels"]["controller-revision-hash"] == rev
    st = status_of(actions)
    assert (st["desiredNumberScheduled"], st["currentNumberScheduled"], st["numberMisscheduled"]) == (1, 0, 1)


def test_daemonset_rolls_one_node_at_a_time():
    ds = workload("DaemonSet", "agent")
    nodes = [node("node1"), node("node2")]
    old = [pod(f"agent-{n}", {"app": "agent", "controller-revision-hash": "old"}, owner=ds, node_name=n,
               phase="Running", ready=True) for n in ("node1", "node2")]
    actions = daemonset.reconcile_daemonset(ds, nodes, old)
    assert len(of(actions, act.DeletePod)) == 1
    st = status_of(actions)
    assert (st["numberReady"], st["updatedNumberScheduled"]) == (2, 0)


# -- Endpoints ------------------------------------------------------------------------------

def svc(ports, selector=None):
    return {"kind": "Service", "metadata": {"name": "web", "namespace": "default", "uid": "s1",
                                            "labels": {"app": "web"}},
            "spec": {"selector": selector or {"app": "web"}, "ports": ports}}


def test_endpoints_split_ready_and_resolve_named_ports():
    named = [{"containerPort": 8080, "name": "http"}]
    pods = [pod("a", {"app": "web"}, ip="10.244.1.2", ready=True, node_name="n1", ports=named),
            pod("b", {"app": "web"}, ip="10.244.1.10", ready=False, node_name="n1", ports=named),
            pod("c", {"app": "web"}, ip="10.244.2.3", ready=True, node_name="n2",
                ports=[{"containerPort": 9090, "name": "http"}]),
            pod("noport", {"app": "web"}, ip="10.244.2.4", ready=True),
            pod("noip", {"app": "web"}, ready=True, ports=named),
            pod("dying", {"app": "web"}, ip="10.244.2.5", ready=True, deleting=True, ports=named),
            pod("done", {"app": "web"}, ip="10.244.2.6", phase="Succeeded", ports=named),
            pod("other", {"app": "db"}, ip="10.244.2.7", ready=True, ports=named)]
    subsets = endpoints.desired_subsets(svc([{"port": 80, "protocol": "TCP", "targetPort": "http"}]), pods)
    assert len(subsets) == 2
    by_port = {s["ports"][0]["port"]: s for s in subsets}
    assert [a["ip"] for a in by_port[8080]["addresses"]] == ["10.244.1.2"]
    assert [a["ip"] for a in by_port[8080]["notReadyAddresses"]] == ["10.244.1.10"]
    assert by_port[8080]["addresses"][0]["targetRef"]["name"] == "a"
    assert by_port[8080]["addresses"][0]["nodeName"] == "n1"
    assert [a["ip"] for a in by_port[9090]["addresses"]] == ["10.244.2.3"]


def test_endpoints_written_only_on_change():
    service = svc([{"port": 80, "protocol": "TCP", "targetPort": 80}])
    pods = [pod("a", {"app": "web"}, ip="10.244.1.2", ready=True)]
    [create] = endpoints.reconcile_endpoints(service, pods, None)
    current = create.obj
    assert current["subsets"][0]["ports"] == [{"port": 80, "protocol": "TCP"}]
    assert endpoints.reconcile_endpoints(service, pods, current) == []
    [update] = endpoints.reconcile_endpoints(service, [], current)
    copy = dict(current)
    update.change(copy)
    assert copy["subsets"] == []
    no_selector = svc([{"port": 80}])
    no_selector["spec"].pop("selector")
    assert endpoints.reconcile_endpoints(no_selector, pods, None) == []


# -- garbage collector ---------------------------------------------------------------------

def test_garbage_collector_deletes_only_orphans():
    rc = workload("ReplicationController", "web", replicas=1)
    gone = workload("ReplicationController", "gone", replicas=1)
    keep = pod("keep", owner=rc)
    orphan = pod("orphan", owner=gone)
    bare = pod("bare")
    actions = garbagecollector.plan([keep, orphan, bare], [], [rc])
    assert [a.pod["metadata"]["name"] for a in of(actions, act.DeletePod)] == ["orphan"]


def test_garbage_collector_looks_again_soon_only_after_an_owner_went():
    """Passes follow every FOLLOW_UP seconds for FOLLOW_WINDOW after one found
    an owner (or Node) gone (a racing controller's pod of it comes after the
    deletion that woke the pass); otherwise no timer: the idle resync."""
    gc = garbagecollector
    web, db = workload("ReplicationController", "web", replicas=1), workload("ReplicationController", "db", replicas=1)
    web["metadata"]["uid"], db["metadata"]["uid"] = "u-web", "u-db"
    seen = gc.Owners()
    assert seen.follow_up([web, db], 100.0) is None             # the first pass: nothing known to be gone
    assert seen.follow_up([web, db], 105.0) is None
    assert seen.follow_up([web], 110.0) == gc.FOLLOW_UP          # db went
    assert seen.follow_up([web], 110.0 + gc.FOLLOW_WINDOW - 1) == gc.FOLLOW_UP
    assert seen.follow_up([web], 110.0 + gc.FOLLOW_WINDOW) is None
    assert seen.follow_up([web, db], 200.0) is None              # one made is no reason
