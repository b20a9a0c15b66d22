"""Namespace names are unambiguous by construction (netemu/names.py)."""

from __future__ import annotations

import itertools

import pytest

from netemu import names


@pytest.mark.parametrize("cluster", ["a-pod", "pod", "x-node-y", "lb", "a-fabric", "c-client", "node-a"])
def test_a_role_word_segment_is_refused(cluster):
    problem = names.cluster_name_problem(cluster)
    assert problem and "segment" in problem and "pick a name" in problem


@pytest.mark.parametrize("cluster", ["tutorial", "a", "a-b", "pods", "my-nodes", "lbx", "fabrics-1"])
def test_other_names_pass(cluster):
    assert names.cluster_name_problem(cluster) is None


def test_every_namespace_name_parses_back_to_its_own_cluster():
    # Names built from hostile parts: clusters and objects named like each
    # other's segments. Every namespace name of every cluster maps back to that
    # cluster alone, so no two clusters can ever produce the same name.
    clusters = [c for c in ("a", "a-b", "a-b-c", "b", "x-pods", "nodes", "tutorial")
                if names.cluster_name_problem(c) is None]
    objects = ["fabric", "pod", "node", "client", "lb", "a", "a-pod", "node-a", "b-fabric", "x"]
    made: dict[str, str] = {}
    for cluster in clusters:
        own = [names.fabric_ns(cluster), names.client_ns(cluster), names.lb_ns(cluster)]
        own += [names.node_ns(cluster, o) for o in objects]
        own += [names.pod_ns(cluster, ns, o) for ns, o in itertools.product(["default", "kube-system"], objects)]
        for ns in own:
            assert names.cluster_of(ns) == cluster, ns
            assert made.setdefault(ns, cluster) == cluster, f"{ns} made by {made[ns]} and {cluster}"


def test_the_readable_form_stays():
    assert names.node_ns("tutorial", "srv-k8s-node2") == "tutorial-node-srv-k8s-node2"
    assert names.pod_ns("tutorial", "default", "nginxpod") == "tutorial-pod-nginxpod"
    assert names.pod_ns("t", "kube-system", "dns") == "t-pod-kube-system_dns"
    assert names.cluster_of("tutorial-node-srv-k8s-node2") == "tutorial"
    assert names.cluster_of("some-other-thing") is None
    assert names.cluster_of("pod-x") is None


def test_long_pod_names_fit_a_file_name_and_stay_distinct():
    long_a, long_b = "a" * 253, "a" * 252 + "b"
    na = names.pod_ns("c" * 20, "n" * 63, long_a)
    nb = names.pod_ns("c" * 20, "n" * 63, long_b)
    assert len(na) <= names.NETNS_NAME_MAX and len(nb) <= names.NETNS_NAME_MAX
    assert na != nb and names.cluster_of(na) == "c" * 20
    # A cut name has two "_", which no uncut name has.
    assert na.count("_") == 2
    assert names.pod_ns("c", "default", long_a).count("_") == 2
