"""Events on a real cluster (name hfev): a crash loop's repeats bump one event's
count, and events expire --event-ttl (1 h) times timeScale after their last
write. timeScale 0.001 makes the TTL 3.6 s and the restart back-off ~10 ms."""

from __future__ import annotations

import pytest

import netemu
from netemu import api, cluster as clusters
from netemu.store import registry

from .clusters import assert_gone, cli, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

NAME = "hfev"


@pytest.fixture
def lab():
    """A node and a pod whose container exits at once, restarted again and again."""
    topology = {
        "name": NAME,
        "cluster": {"timeScale": 0.001},
        "nodes": [{"name": "n1"}],
        "workloads": [{"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "crasher"},
                       "spec": {"containers": [{"name": "c", "image": "busybox", "command": ["false"]}]}}]}
    try:
        with netemu.up(topology) as cluster:
            yield cluster
    finally:
        assert_gone(NAME)


def test_crash_loop_events_aggregate_and_expire(lab):
    cluster = lab.name
    store = clusters.open_store(cluster)
    try:
        pod = wait_for(lambda: registry.get(store, "Pod", "default", "crasher"), what="the pod")

        def backoff():
            return [e for e in registry.events_for(store, pod) if e["reason"] == "BackOff"]
        wait_for(lambda: backoff() and backoff()[0]["count"] >= 5, timeout=60, what="5 back-offs")
        events = registry.events_for(store, pod)
        assert len(backoff()) == 1
        assert len(events) <= 6, [(e["reason"], e["message"], e["count"]) for e in events]
        started = [e for e in events if e["message"] == "Started container c"]
        assert len(started) == 1 and started[0]["count"] >= 5
        out = cli("get", "events", "--cluster", cluster).stdout
        assert "BackOff" in out and "(x" in out

        api.delete(store, "Pod", "default", "crasher")
        wait_for(lambda: not registry.get(store, "Pod", "default", "crasher"), timeout=30, what="pod gone")
        # 3.6 s after each event's last write, it is gone.
        wait_for(lambda: not registry.list_(store, "Event"), timeout=15, what="every event expired")
    finally:
        store.close()
