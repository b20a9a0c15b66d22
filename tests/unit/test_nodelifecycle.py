"""The node lifecycle controller's rules (pure parts)."""

from __future__ import annotations

from types import SimpleNamespace

from netemu.controllers import nodelifecycle as nlc


def node(name, ready="True"):
    return {"metadata": {"name": name},
            "status": {"conditions": [{"type": "Ready", "status": ready, "lastTransitionTime": "t0"}]}}


def lease(name, renew):
    return {"metadata": {"name": name, "namespace": "kube-node-lease"}, "spec": {"renewTime": renew}}


def test_a_node_is_stale_only_after_the_grace_period_of_no_renewal():
    probes = {}
    nodes = [node("n1"), node("n2")]
    nlc.observe(probes, nodes, [lease("n1", "r1"), lease("n2", "r1")], now=0.0)
    nlc.observe(probes, nodes, [lease("n1", "r2"), lease("n2", "r1")], now=30.0)
    assert nlc.stale(probes, nodes, now=39.0, grace=40.0) == []
    # n2's renewTime has not changed since t=0; n1 renewed at t=30.
    assert nlc.stale(probes, nodes, now=41.0, grace=40.0) == ["n2"]
    assert nlc.stale(probes, nodes, now=71.0, grace=40.0) == ["n1", "n2"]


def test_a_node_without_a_lease_gets_a_full_grace_period_from_first_sight():
    probes = {}
    nlc.observe(probes, [node("n1")], [], now=100.0)
    assert nlc.stale(probes, [node("n1")], now=139.0, grace=40.0) == []
    assert nlc.stale(probes, [node("n1")], now=141.0, grace=40.0) == ["n1"]


def test_unknown_nodes_are_not_marked_again_and_removed_nodes_are_forgotten():
    probes = {}
    nlc.observe(probes, [node("n1", "Unknown"), node("n2")], [], now=0.0)
    assert nlc.stale(probes, [node("n1", "Unknown")], now=100.0, grace=40.0) == []
    nlc.observe(probes, [node("n2")], [], now=1.0)
    assert set(probes) == {"n2"}


def test_mark_unknown_uses_kubernetes_wording():
    n = node("n1")
    nlc.mark_unknown(n, "t1")
    (cond,) = n["status"]["conditions"]
    assert cond["status"] == "Unknown" and cond["reason"] == "NodeStatusUnknown"
    assert cond["message"] == "Kubelet stopped posting node status."
    assert cond["lastTransitionTime"] == "t1" and cond["lastHeartbeatTime"] == "t0"


def test_periods_follow_time_scale_with_a_floor():
    assert nlc.periods(SimpleNamespace(time_scale=1.0)) == (5.0, 40.0)
    assert nlc.periods(SimpleNamespace(time_scale=0.25)) == (1.25, 10.0)
    assert nlc.periods(SimpleNamespace(time_scale=0.001))[1] == 5.0
