"""controllers.loop: a controller that asks for IDLE_RESYNC sleeps until a
change after a clean pass, but a pass with a failed step is retried at the
ordinary resync."""

import pytest
import trio

from netemu.controllers.loop import guarded, run_reconciler


class QuietStore:
    def revision(self) -> int:
        return 1

    async def watch(self, prefix, since):
        await trio.sleep_forever()
        yield  # pragma: no cover


def passes(fail: bool, idle_resync) -> int:
    calls = []

    def sync():
        calls.append(1)
        if fail:
            guarded("x", lambda: 1 / 0)()
        return None

    async def main():
        with trio.move_on_after(0.6):
            await run_reconciler(QuietStore(), "t", ["/a/b/"], sync, resync=0.05, idle_resync=idle_resync)

    trio.run(main)
    return len(calls)


def test_an_idle_controller_sleeps_until_a_change():
    assert passes(fail=False, idle_resync=30.0) == 1


def test_without_idle_resync_or_after_a_failure_it_resyncs_as_before():
    assert passes(fail=False, idle_resync=None) >= 5
    assert passes(fail=True, idle_resync=30.0) >= 5


def test_a_replicaset_pass_asks_to_come_back_when_minreadyseconds_run_out():
    """availableReplicas changes when a ready pod has been ready for
    minReadySeconds, with no write to wake the controller: the pass reports
    that moment (so the controller may sleep until a change otherwise)."""
    from netemu.controllers import replication

    def pod(name, ready_since):
        return {"metadata": {"name": name, "namespace": "default", "labels": {"app": "web"}},
                "status": {"phase": "Running", "conditions": [
                    {"type": "Ready", "status": "True", "lastTransitionTime": ready_since}]}}

    owner = {"apiVersion": "apps/v1", "kind": "ReplicaSet",
             "metadata": {"name": "web", "namespace": "default", "uid": "u1"},
             "spec": {"replicas": 2, "minReadySeconds": 10, "selector": {"matchLabels": {"app": "web"}}}}
    now = 1_700_000_000.0                 # 2023-11-14T22:13:20Z
    pods = [pod("a", "2023-11-14T22:13:00Z"), pod("b", "2023-11-14T22:13:17Z")]
    assert replication.next_available(owner, pods, now) == pytest.approx(7.0)   # b at 22:13:27
    assert replication.next_available(owner, pods[:1], now) is None            # a is available already
    owner["spec"]["minReadySeconds"] = 0
    assert replication.next_available(owner, pods, now) is None
