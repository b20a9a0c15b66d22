"""The sandbox a kubelet publishes on its Pod (netemu.io/sandbox): what
describe, exec, capture and the API server read instead of the kubelet's file."""

from __future__ import annotations

import dataclasses
import json
import os

import pytest

from netemu.node import sandbox as sandboxes
from netemu.node.sandbox import Sandbox

SB = Sandbox(namespace="hsc-pod-default-web", veth="veth0123abcd", ip="10.244.1.5", gateway="10.244.1.1",
             prefixlen=24, mtu=1472, pause_pid=4242, gso_max_segs=44, uid="u-1", node="n1", pause_start=99,
             link="delay 5ms")


def pod(annotation):
    meta = {"name": "web", "namespace": "default", "uid": "u-1"}
    if annotation is not None:
        meta["annotations"] = {sandboxes.ANNOTATION: annotation}
    return {"metadata": meta, "spec": {"nodeName": "n1"}}


def test_annotation_is_one_line_of_what_readers_need():
    text = sandboxes.annotation(SB)
    assert "\n" not in text
    assert json.loads(text) == {"netns": "hsc-pod-default-web", "veth": "veth0123abcd", "pausePID": 4242,
                                "address": "10.244.1.5/24", "gateway": "10.244.1.1", "mtu": 1472}


def test_published_reads_it_back():
    sb = sandboxes.published(pod(sandboxes.annotation(SB)))
    # The kubelet's own bookkeeping (pause start, GSO, link) stays in its file.
    assert dataclasses.replace(sb, gso_max_segs=44, pause_start=99, link="delay 5ms") == SB


@pytest.mark.parametrize("text", [
    None, "", "not json", "[]", "{}",
    json.dumps({"netns": "x", "veth": "v", "pausePID": "12", "address": "10.0.0.1/24", "gateway": "g", "mtu": 1}),
    json.dumps({"netns": "x", "veth": "v", "pausePID": True, "address": "10.0.0.1/24", "gateway": "g", "mtu": 1}),
    json.dumps({"netns": "x", "veth": "v", "pausePID": 0, "address": "10.0.0.1/24", "gateway": "g", "mtu": 1}),
    json.dumps({"netns": "x", "veth": "v", "pausePID": 1, "address": "10.0.0.300/24", "gateway": "g", "mtu": 1}),
    json.dumps({"netns": "", "veth": "v", "pausePID": 1, "address": "10.0.0.1/24", "gateway": "g", "mtu": 1}),
    json.dumps({"netns": "x", "veth": "v", "pausePID": 1, "address": "10.0.0.1/24", "gateway": "g"}),
])
def test_malformed_annotations_are_no_sandbox(text):
    assert sandboxes.published(pod(text)) is None


def test_exec_enters_only_a_pid_in_the_pods_own_namespace(monkeypatch):
    """The annotation is anyone's to write: the PID must live in the network
    namespace netemu named for the pod, whatever the annotation says."""
    mine = os.stat(f"/proc/{os.getpid()}/ns/net").st_ino
    forged = pod(sandboxes.annotation(dataclasses.replace(SB, pause_pid=os.getpid())))
    seen = []
    monkeypatch.setattr(sandboxes.netns, "inode", lambda name: seen.append(name) or mine + 1)
    assert sandboxes.pause_pid_of("hsc", forged) is None
    assert seen == ["hsc-pod-web"]      # names.pod_ns, not the annotation's word
    monkeypatch.setattr(sandboxes.netns, "inode", lambda name: mine)
    assert sandboxes.pause_pid_of("hsc", forged) == os.getpid()
    monkeypatch.setattr(sandboxes.netns, "inode", lambda name: None)        # no such namespace
    assert sandboxes.pause_pid_of("hsc", forged) is None
    assert sandboxes.pause_pid_of("hsc", pod(None)) is None


def test_apply_keeps_what_the_cluster_annotated(tmp_path):
    """`netemu apply` of the same manifest again is "unchanged": the kubelet's
    netemu.io/sandbox (and the overlay's flannel keys on a Node) are kept, as
    kubectl apply's three-way merge keeps annotations it never applied; the
    user's own annotations are still theirs to change."""
    from netemu import api
    from netemu.store import registry
    from netemu.store.sqlite import SqliteStore

    store = SqliteStore(str(tmp_path / "s.db"), create=True)
    manifest = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "web", "annotations": {"mine": "1"}},
                "spec": {"containers": [{"name": "c", "image": "nginx"}]}}
    api.create_or_update(store, manifest)
    registry.mutate(store, "Pod", "default", "web", lambda p: p["metadata"]["annotations"].update(
        {sandboxes.ANNOTATION: sandboxes.annotation(SB)}))
    assert api.create_or_update(store, manifest)[1] == "unchanged"
    changed = dict(manifest, metadata={"name": "web", "annotations": {"mine": "2"}})
    pod, verb = api.create_or_update(store, changed)
    assert verb == "configured"
    assert pod["metadata"]["annotations"] == {"mine": "2", sandboxes.ANNOTATION: sandboxes.annotation(SB)}
    store.close()
