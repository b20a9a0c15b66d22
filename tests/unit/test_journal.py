"""The journal's records (no root: a state folder under a temporary root)."""

from __future__ import annotations

import os

from netemu import cluster as clusters, journal, names


def test_namespaces_and_processes_are_read_back_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(names, "STATE_ROOT", str(tmp_path))
    os.makedirs(names.state_dir("c"))
    journal.record("c", "netns", "c-fabric 4026531001")
    journal.record("c", "process", "1234 5678")
    journal.record("c", "netns", "c-pod-p 4026531002")
    journal.record("c", "netns", "c-pod-p 4026531009")     # the pod made again
    journal.record("c", "netns", "c-old-style")            # no inode: owns nothing
    assert journal.namespaces("c") == [("c-fabric", 4026531001), ("c-pod-p", 4026531002),
                                       ("c-pod-p", 4026531009)]
    assert journal.processes("c") == [(1234, 5678)]
    assert ("netns", "c-pod-p") in journal.entries("c")
    assert journal.namespaces("missing") == [] and journal.processes("missing") == []


def test_a_namespace_not_made_by_the_cluster_is_not_deleted(tmp_path, monkeypatch):
    monkeypatch.setattr(names, "STATE_ROOT", str(tmp_path))
    os.makedirs(names.state_dir("c"))
    journal.record("c", "netns", "c-fabric 1")
    # Whatever exists under that name now (here: nothing) is not inode 1.
    assert journal.delete_netns("c", "c-fabric") is False


def test_this_process_and_its_ancestors_are_protected():
    protected = clusters.protected_pids()
    assert os.getpid() in protected and os.getppid() in protected
