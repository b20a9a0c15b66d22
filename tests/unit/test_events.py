"""Events: a repeat bumps count (bounded growth), and every event expires (--event-ttl)."""

import time
import types

import pytest

from netemu import controlplane
from netemu.store import registry
from netemu.store.sqlite import SqliteStore


@pytest.fixture
def store(tmp_path):
    s = SqliteStore(str(tmp_path / "state.db"), create=True)
    yield s
    s.close()


def pod(name="web-1", uid="u-1"):
    return {"kind": "Pod", "metadata": {"name": name, "namespace": "default", "uid": uid}}


def test_repeated_event_bumps_count_instead_of_adding_objects(store):
    p = pod()
    for _ in range(500):            # a crash loop's BackOff, 500 restarts
        registry.record_event(store, p, "BackOff", "Back-off restarting failed container",
                              type_="Warning", source="kubelet, node-1")
    registry.record_event(store, p, "Pulled", "Container image already present", source="kubelet, node-1")
    events = registry.list_(store, "Event")
    assert len(events) == 2
    backoff = next(e for e in events if e["reason"] == "BackOff")
    assert backoff["count"] == 500
    assert backoff["firstTimestamp"] <= backoff["lastTimestamp"]
    assert backoff["metadata"]["name"].startswith("web-1.")
    assert [e["reason"] for e in registry.events_for(store, p)] == ["BackOff", "Pulled"]


def test_events_differing_in_object_message_or_source_stay_apart(store):
    registry.record_event(store, pod(), "Started", "Started container a", source="kubelet, n1")
    registry.record_event(store, pod(), "Started", "Started container b", source="kubelet, n1")
    registry.record_event(store, pod(), "Started", "Started container a", source="kubelet, n2")
    registry.record_event(store, pod(uid="u-2"), "Started", "Started container a", source="kubelet, n1")
    assert len(registry.list_(store, "Event")) == 4
    # the pod recreated under the same name does not see its predecessor's events
    assert len(registry.events_for(store, {**pod(uid="u-2"), "kind": "Pod"})) == 1


def test_events_expire_after_the_ttl_and_a_repeat_renews_it(store):
    store.event_ttl = 0.4
    registry.record_event(store, pod(), "Scheduled", "Successfully assigned default/web-1 to n1")
    time.sleep(0.25)
    registry.record_event(store, pod(), "Scheduled", "Successfully assigned default/web-1 to n1")
    time.sleep(0.25)                # 0.5 s after the first write, 0.25 s after the last
    [ev] = registry.list_(store, "Event")
    assert ev["count"] == 2
    time.sleep(0.25)
    assert registry.list_(store, "Event") == []
    store.expire()                  # what a watch or the next write does: deleted for good
    assert store.get(registry.key("Event", "default", ev["metadata"]["name"])) is None
    # after expiry the next one starts again at 1
    registry.record_event(store, pod(), "Scheduled", "Successfully assigned default/web-1 to n1")
    assert registry.list_(store, "Event")[0]["count"] == 1


def test_default_ttl_is_kubernetes_one_hour(store):
    registry.record_event(store, pod(), "Killing", "Stopping container web")
    [kv] = store.list(registry.prefix("Event"))
    assert kv.expires_at == pytest.approx(time.time() + 3600, abs=5)


def test_control_plane_scales_the_event_ttl_by_time_scale(tmp_path, monkeypatch):
    path = str(tmp_path / "state.db")
    SqliteStore(path, create=True).close()
    settings = types.SimpleNamespace(time_scale=0.01)
    monkeypatch.setattr(controlplane.clusterconfig, "read",
                        lambda c, store=None: types.SimpleNamespace(settings=settings))
    monkeypatch.setattr(controlplane.names, "store_path", lambda c: path)
    cp = controlplane.ControlPlane("hfunit")
    try:
        registry.record_event(cp.store, pod(), "Killing", "Stopping container web")
        [kv] = cp.store.list(registry.prefix("Event"))
        assert kv.expires_at == pytest.approx(time.time() + 36, abs=2)
    finally:
        cp.store.close()
