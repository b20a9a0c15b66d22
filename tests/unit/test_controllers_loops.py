"""Controllers running against a real SqliteStore with a simulated kubelet."""

from __future__ import annotations

import functools

import pytest
import trio

from netemu import api, kubectl_verbs
from netemu.controllers import manager
from netemu.controllers import podutil
from netemu.k8s import ownership
from netemu.store import registry

from tests.unit.test_controllers_support import Kubelet, node, open_store, settings, wait_for, workload

pytestmark = pytest.mark.timeout(15)


def store_with_nodes(tmp_path, *nodes):
    store = open_store(tmp_path)
    for n in nodes or (node("node1"), node("node2")):
        registry.create(store, n)
    return store


def owned(store, kind, name):
    owner = registry.get(store, kind, "default", name)
    return [p for p in registry.list_(store, "Pod") if owner and ownership.owned_by(p, owner)]


async def run_cluster(store, scenario, *, only, outcome=None, cfg=None):
    kubelet = Kubelet(store, outcome)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(functools.partial(manager.run_all, store, cfg or settings(), only=only))
        nursery.start_soon(kubelet.run)
        await scenario(kubelet)
        nursery.cancel_scope.cancel()
    return kubelet


def test_job_completions_5_parallelism_2(tmp_path):
    store = store_with_nodes(tmp_path)
    registry.create(store, workload("Job", "count", completions=5, parallelism=2, backoffLimit=6,
                                    restart_policy="Never"))

    async def scenario(kubelet):
        def complete():
            job = registry.get(store, "Job", "default", "count")
            return any(c["type"] == "Complete" for c in (job.get("status") or {}).get("conditions") or [])
        await wait_for(complete)

    kubelet = trio.run(lambda: run_cluster(store, scenario, only=["scheduler", "job"], outcome=lambda p: "Succeeded"))
    job = registry.get(store, "Job", "default", "count")
    assert job["status"]["succeeded"] == 5 and job["status"].get("active", 0) == 0
    assert kubelet.max_active["count"] <= 2
    pods = owned(store, "Job", "count")
    assert len(pods) == 5 and all(p["metadata"]["name"].startswith("count-") for p in pods)
    reasons = [e["reason"] for e in registry.events_for(store, job)]
    assert reasons.count("SuccessfulCreate") == 5 and reasons[-1] == "Completed"


def test_job_never_fails_after_backoff_limit(tmp_path):
    store = store_with_nodes(tmp_path)
    registry.create(store, workload("Job", "broken", completions=1, parallelism=1, backoffLimit=2,
                                    restart_policy="Never"))

    async def scenario(kubelet):
        def failed():
            job = registry.get(store, "Job", "default", "broken")
            return any(c["type"] == "Failed" for c in (job.get("status") or {}).get("conditions") or [])
        await wait_for(failed)

    trio.run(lambda: run_cluster(store, scenario, only=["scheduler", "job"], outcome=lambda p: "Failed",
                                 cfg=settings(time_scale=0.001)))
    job = registry.get(store, "Job", "default", "broken")
    cond = [c for c in job["status"]["conditions"] if c["type"] == "Failed"][0]
    assert cond["reason"] == "BackoffLimitExceeded"
    assert len(owned(store, "Job", "broken")) == 3 and job["status"]["failed"] == 3


def test_rc_replaces_deleted_pod_and_endpoints_follow(tmp_path):
    store = store_with_nodes(tmp_path)
    registry.create(store, workload("ReplicationController", "podtoservcie", replicas=2, labels={"app": "nginx"}))
    kubectl_verbs.expose(store, "rc", "podtoservcie", port=80, settings=settings())

    def endpoint_ips():
        ep = registry.get(store, "Endpoints", "default", "podtoservcie")
        return sorted(a["ip"] for s in (ep or {}).get("subsets") or [] for a in s.get("addresses") or [])

    async def scenario(kubelet):
        def two_running():
            pods = owned(store, "ReplicationController", "podtoservcie")
            return len([p for p in pods if podutil.ready(p)]) == 2 and len(endpoint_ips()) == 2
        await wait_for(two_running)
        first = sorted(p["metadata"]["name"] for p in owned(store, "ReplicationController", "podtoservcie"))
        victim = first[0]
        api.delete(store, "pod", "default", victim)

        def replaced():
            names = {p["metadata"]["name"] for p in owned(store, "ReplicationController", "podtoservcie")
                     if podutil.ready(p)}
            return len(names) == 2 and victim not in names and len(endpoint_ips()) == 2
        await wait_for(replaced)
        names = {p["metadata"]["name"] for p in owned(store, "ReplicationController", "podtoservcie")}
        assert victim not in names and all(n.startswith("podtoservcie-") for n in names)
        # Spread: one pod per node.
        assert sorted(p["spec"]["nodeName"] for p in owned(store, "ReplicationController", "podtoservcie")) \
            == ["node1", "node2"]

    trio.run(lambda: run_cluster(store, scenario, only=["scheduler", "replication", "endpoints"]))
    rc = registry.get(store, "ReplicationController", "default", "podtoservcie")
    messages = [e["message"] for e in registry.events_for(store, rc)]
    assert len([m for m in messages if m.startswith("Created pod: podtoservcie-")]) == 3


def test_daemonset_follows_node_labels(tmp_path):
    store = store_with_nodes(tmp_path, node("master", unschedulable=True), node("node1", {"disk": "ssd"}),
                             node("node2"))
    registry.create(store, workload("DaemonSet", "agent", node_selector={"disk": "ssd"}))

    def nodes_with_pod():
        return sorted(p["spec"]["nodeName"] for p in owned(store, "DaemonSet", "agent") if podutil.active(p))

    async def scenario(kubelet):
        await wait_for(lambda: nodes_with_pod() == ["node1"])
        kubectl_verbs.label(store, "node", "node2", ["disk=ssd"])
        kubectl_verbs.label(store, "node", "master", ["disk=ssd"])
        await wait_for(lambda: nodes_with_pod() == ["master", "node1", "node2"])
        kubectl_verbs.label(store, "node", "node1", ["disk-"])
        await wait_for(lambda: nodes_with_pod() == ["master", "node2"])

        def status_ok():
            st = registry.get(store, "DaemonSet", "default", "agent").get("status") or {}
            return st.get("desiredNumberScheduled") == 2 and st.get("numberReady") == 2
        await wait_for(status_ok)

    trio.run(lambda: run_cluster(store, scenario, only=["daemonset"]))


def test_deployment_rolls_to_new_template(tmp_path):
    store = store_with_nodes(tmp_path)
    registry.create(store, workload("Deployment", "web", replicas=2))

    def replicasets():
        return {rs["metadata"]["name"]: rs for rs in registry.list_(store, "ReplicaSet")}

    async def scenario(kubelet):
        def ready(n):
            d = registry.get(store, "Deployment", "default", "web")
            return (d.get("status") or {}).get("availableReplicas") == n
        await wait_for(lambda: ready(2))
        [first] = replicasets()

        def change(obj):
            obj["spec"]["template"]["spec"]["containers"][0]["image"] = "httpd"
            obj["metadata"]["generation"] += 1
        registry.mutate(store, "Deployment", "default", "web", change)

        def rolled():
            sets = replicasets()
            return (len(sets) == 2 and sets[first]["spec"]["replicas"] == 0
                    and sum(1 for p in registry.list_(store, "Pod")
                            if podutil.active(p) and podutil.ready(p)
                            and p["spec"]["containers"][0]["image"] == "httpd") == 2)
        await wait_for(rolled)

    trio.run(lambda: run_cluster(store, scenario, only=["scheduler", "replication"]))


def test_deleting_a_job_removes_its_pods(tmp_path):
    store = store_with_nodes(tmp_path)
    registry.create(store, workload("Job", "sleepy", completions=3, parallelism=3, restart_policy="Never"))

    async def scenario(kubelet):
        await wait_for(lambda: len(owned(store, "Job", "sleepy")) == 3)
        job = registry.get(store, "Job", "default", "sleepy")
        api.delete(store, "job", "default", "sleepy")
        await wait_for(lambda: not [p for p in registry.list_(store, "Pod") if ownership.owned_by(p, job)])

    trio.run(lambda: run_cluster(store, scenario, only=["scheduler", "job", "garbage-collector"]))


def test_a_crashing_controller_is_restarted_without_stopping_others(tmp_path):
    store = store_with_nodes(tmp_path)
    calls = {"n": 0}

    async def crashy(store, settings):
        calls["n"] += 1
        raise RuntimeError("boom")

    async def main():
        async with trio.open_nursery() as nursery:
            nursery.start_soon(manager.supervise, "crashy", crashy, store, None, 0.05)
            nursery.start_soon(manager.supervise, "scheduler", manager.CONTROLLERS["scheduler"], store, None)
            registry.create(store, {"kind": "Pod", "metadata": {"name": "p"}, "spec": {"containers": []}})
            await wait_for(lambda: (registry.get(store, "Pod", "default", "p")["spec"].get("nodeName")
                                    and calls["n"] >= 3))
            nursery.cancel_scope.cancel()
    trio.run(main)


def test_garbage_collector_takes_a_pod_made_after_its_owner_went(tmp_path):
    """A racing controller's pod of an owner deleted a moment before (the
    pass the deletion woke has run already): collected by the follow-up
    passes, without any pod watch or a short resync."""
    from netemu.controllers import garbagecollector
    from tests.unit.test_controllers_support import pod

    store = store_with_nodes(tmp_path)
    rc = registry.create(store, workload("ReplicationController", "web", replicas=0))

    async def scenario(kubelet):
        await trio.sleep(0.5)
        registry.delete(store, "ReplicationController", "default", "web")
        await trio.sleep(1.0)                         # the pass the deletion woke is done
        registry.create(store, pod("late", owner=rc))
        await wait_for(lambda: registry.get(store, "Pod", "default", "late") is None,
                       timeout=garbagecollector.FOLLOW_UP + 3)

    trio.run(lambda: run_cluster(store, scenario, only=["garbage-collector"]))
