"""Controllers facing huge replica counts (issue 12, item 5): each pass creates a
bounded batch, in slow-start batches that stop after a failure, and memory
stays bounded whatever spec.replicas says."""

from __future__ import annotations

import time
import tracemalloc

import pytest

from netemu.controllers import actions as act
from netemu.controllers import daemonset, job, replication
from netemu.controllers import podutil
from netemu.k8s import ownership
from netemu.store import registry

from tests.unit.test_controllers_support import node, open_store, workload

pytestmark = pytest.mark.timeout(60)

INT32_MAX = 2 ** 31 - 1


def creates(actions) -> list:
    return [a for a in actions if isinstance(a, act.CreatePod)]


@pytest.mark.parametrize("kind", ["ReplicationController", "ReplicaSet"])
def test_replica_controllers_ask_for_at_most_a_burst_per_pass(kind):
    rc = workload(kind, "big", replicas=100_000)
    assert len(creates(replication.reconcile_replicas(rc, []))) == act.BURST_REPLICAS
    # The largest count validation lets through costs the same, and at once.
    start = time.monotonic()
    rc["spec"]["replicas"] = INT32_MAX
    assert len(creates(replication.reconcile_replicas(rc, []))) == act.BURST_REPLICAS
    assert time.monotonic() - start < 5


def test_job_and_daemonset_ask_for_at_most_a_burst_per_pass():
    j = workload("Job", "big", parallelism=100_000, completions=INT32_MAX, restart_policy="Never")
    actions, _ = job.reconcile_job(j, [], now=1000.0)
    assert len(creates(actions)) == act.BURST_REPLICAS
    ds = workload("DaemonSet", "d")
    nodes = [node(f"n{i}") for i in range(act.BURST_REPLICAS + 20)]
    assert len(creates(daemonset.reconcile_daemonset(ds, nodes, []))) == act.BURST_REPLICAS


def test_a_pass_against_the_store_creates_one_bounded_batch_in_bounded_memory(tmp_path):
    store = open_store(tmp_path)
    rc = registry.create(store, workload("ReplicationController", "big", replicas=100_000))
    tracemalloc.start()
    try:
        replication.sync_once(store)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    pods = registry.list_(store, "Pod")
    assert len(pods) == act.BURST_REPLICAS
    assert all(ownership.owned_by(p, rc) for p in pods)
    assert peak < 64 * 2 ** 20, f"one pass peaked at {peak / 2 ** 20:.0f} MiB"
    # The next pass does the next batch: progress, never the whole count at once.
    replication.sync_once(store)
    assert len(registry.list_(store, "Pod")) == 2 * act.BURST_REPLICAS
    # Deleting the RC stops it: a pass creates nothing more.
    registry.delete(store, "ReplicationController", "default", "big")
    replication.sync_once(store)
    assert len(registry.list_(store, "Pod")) == 2 * act.BURST_REPLICAS


def test_creation_runs_in_slow_start_batches_that_stop_after_a_failure(tmp_path):
    store = open_store(tmp_path)
    owner = registry.create(store, workload("ReplicationController", "w", replicas=100))
    template = owner["spec"]["template"]
    good = [act.CreatePod(podutil.pod_from_template(owner, template), owner) for _ in range(3)]
    # A pod the store cannot encode (a set is not JSON): its create fails every time,
    # as any store refusal would.
    bad = []
    for _ in range(97):
        pod = podutil.pod_from_template(owner, template)
        pod["metadata"]["annotations"] = {"bad": {1, 2}}
        bad.append(act.CreatePod(pod, owner))
    act.apply(store, good + bad, "replication-controller")       # no exception escapes
    # Batches of 1 and 2 succeed (3 pods); the batch of 4 fails; nothing after it is tried.
    assert len(registry.list_(store, "Pod")) == 3
    events = [e for e in registry.list_(store, "Event") if e["involvedObject"]["name"] == "w"]
    reasons = [e["reason"] for e in events]
    assert reasons.count("SuccessfulCreate") == 3
    failed = [e for e in events if e["reason"] == "FailedCreate"]
    # The four refusals of the failed batch say the same thing: one event, counted four times.
    assert sum(e.get("count", 1) for e in failed) == 4
    assert all(e["type"] == "Warning" and e["message"].startswith("Error creating: ") for e in failed)
