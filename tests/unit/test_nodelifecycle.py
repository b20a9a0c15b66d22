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


def test_a_lost_node_is_tainted_and_untainted_when_ready_again():
    n = node("n1", ready="Unknown")
    n["spec"] = {"taints": [{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]}
    nlc.add_unreachable_taints(n, "2026-12-04T00:00:00Z")
    nlc.add_unreachable_taints(n, "2026-12-04T00:09:00Z")     # twice: no duplicates, first timeAdded kept
    assert n["spec"]["taints"] == [
        {"key": "dedicated", "value": "x", "effect": "NoSchedule"},
        {"key": nlc.UNREACHABLE, "effect": "NoSchedule"},
        {"key": nlc.UNREACHABLE, "effect": "NoExecute", "timeAdded": "2026-12-04T00:00:00Z"}]
    assert nlc.recovered([n]) == []                     # still Unknown
    n["status"]["conditions"][0]["status"] = "True"
    assert nlc.recovered([n]) == ["n1"]
    nlc.remove_unreachable_taints(n)
    assert n["spec"]["taints"] == [{"key": "dedicated", "value": "x", "effect": "NoSchedule"}]
    bare = node("n2")
    nlc.add_unreachable_taints(bare, "t")
    nlc.remove_unreachable_taints(bare)
    assert "taints" not in bare["spec"]


def test_toleration_matching_follows_kubernetes():
    taint = {"key": nlc.UNREACHABLE, "effect": "NoExecute"}
    assert nlc.tolerates({"key": nlc.UNREACHABLE, "operator": "Exists", "effect": "NoExecute"}, taint)
    assert nlc.tolerates({"key": nlc.UNREACHABLE, "operator": "Exists"}, taint)        # any effect
    assert nlc.tolerates({"operator": "Exists"}, taint)                                # every taint
    assert not nlc.tolerates({"operator": "Exists", "effect": "NoSchedule"}, taint)
    assert not nlc.tolerates({"key": "other", "operator": "Exists"}, taint)
    assert nlc.tolerates({"key": nlc.UNREACHABLE, "operator": "Equal", "value": ""}, taint)
    assert not nlc.tolerates({"key": nlc.UNREACHABLE, "value": "x"}, taint)             # Equal by default
    assert not nlc.tolerates({"operator": "Equal"}, taint)          # an empty key needs Exists


def _pod(name, node_name, tolerations=None, **meta):
    return {"metadata": {"name": name, "namespace": "default", **meta},
            "spec": {"nodeName": node_name, **({"tolerations": tolerations} if tolerations is not None else {})},
            "status": {"phase": "Running"}}


def test_taint_eviction_waits_the_smallest_toleration_and_spares_what_tolerates_for_ever():
    from netemu.api import DEFAULT_TOLERATIONS
    from netemu.controllers.daemonset import DAEMON_TOLERATIONS
    from netemu.store.registry import parse_time

    t0 = "2026-12-04T00:00:00Z"
    start = parse_time(t0).timestamp()
    lost = node("n1", ready="Unknown")
    nlc.add_unreachable_taints(lost, t0)
    taints = [t for t in lost["spec"]["taints"] if t["effect"] == "NoExecute"]
    short = [{"key": nlc.UNREACHABLE, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 10},
             *DEFAULT_TOLERATIONS]
    pods = [_pod("bare", "n1", []),                        # no toleration: evicted at once
            _pod("default", "n1", list(DEFAULT_TOLERATIONS)),
            _pod("short", "n1", short),
            _pod("daemon", "n1", list(DAEMON_TOLERATIONS)),
            _pod("elsewhere", "n2", []),
            _pod("going", "n1", [], deletionTimestamp=t0)]
    assert nlc.eviction_delay(pods[0], taints) == 0.0
    assert nlc.eviction_delay(pods[1], taints) == 300.0
    assert nlc.eviction_delay(pods[2], taints) == 10.0
    assert nlc.eviction_delay(pods[3], taints) is None
    nodes = [lost, node("n2")]
    due, next_in = nlc.evictions(nodes, pods, start + 1)
    assert [p["metadata"]["name"] for p in due] == ["bare"] and next_in == 9.0
    due, next_in = nlc.evictions(nodes, pods, start + 11)
    assert [p["metadata"]["name"] for p in due] == ["bare", "short"] and next_in == 289.0
    # timeScale 0.125: 300 s become 37.5 s
    due, _ = nlc.evictions(nodes, pods, start + 38, scale=0.125)
    assert [p["metadata"]["name"] for p in due] == ["bare", "default", "short"]


def test_pods_of_a_lost_node_are_marked_not_ready_once():
    pod = _pod("p", "n1")
    pod["status"]["conditions"] = [{"type": "Ready", "status": "True"}, {"type": "PodScheduled", "status": "True"}]
    assert nlc.mark_pod_not_ready(pod, "t1")
    assert pod["status"]["conditions"][0] == {"type": "Ready", "status": "False", "lastTransitionTime": "t1"}
    assert not nlc.mark_pod_not_ready(pod, "t2")


def test_the_api_gives_every_pod_the_default_toleration_seconds_and_daemons_theirs():
    from netemu import api
    from netemu.controllers.daemonset import DAEMON_TOLERATIONS, add_daemon_tolerations

    spec = {"containers": [{"name": "c", "image": "busybox"}]}
    api.add_default_tolerations(spec)
    assert spec["tolerations"] == [
        {"key": "node.kubernetes.io/not-ready", "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300},
        {"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
         "tolerationSeconds": 300}]
    api.add_default_tolerations(spec)                      # again (an update): unchanged
    assert len(spec["tolerations"]) == 2
    own = {"tolerations": [{"key": "node.kubernetes.io/unreachable", "operator": "Exists", "effect": "NoExecute",
                            "tolerationSeconds": 5}]}
    api.add_default_tolerations(own)
    assert [t.get("tolerationSeconds") for t in own["tolerations"]] == [5, 300]
    everything = {"tolerations": [{"operator": "Exists"}]}
    api.add_default_tolerations(everything)
    assert everything["tolerations"] == [{"operator": "Exists"}]
    admitted = api.admit({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "p"},
                          "spec": {"containers": [{"name": "c", "image": "busybox"}]}})
    assert [t["key"] for t in admitted["spec"]["tolerations"]] == ["node.kubernetes.io/not-ready",
                                                                     "node.kubernetes.io/unreachable"]
    ds = {"hostNetwork": True, "tolerations": [{"key": "node.kubernetes.io/not-ready", "operator": "Exists",
                                                "effect": "NoExecute", "tolerationSeconds": 5}]}
    add_daemon_tolerations(ds)
    assert ds["tolerations"] == [*DAEMON_TOLERATIONS, {"key": "node.kubernetes.io/network-unavailable",
                                                       "operator": "Exists", "effect": "NoSchedule"}]
