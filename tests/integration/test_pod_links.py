"""A pod's own link (names hkpl-*): the annotation `netemu.io/link: "delay 10ms
rate 20mbit"` impairs the pod's veth pair, both directions, when the kubelet
builds its sandbox; deleting the pod stops its delay lines and removes its
rules; a bad annotation is refused on write, naming the field (and, should one
be stored anyway, fails the sandbox with an event naming it)."""

from __future__ import annotations

import json
import os
import uuid

import pytest

import netemu
from netemu import impairment, names, netns

from .clusters import assert_gone, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


def pod(name: str, link: str | None = None) -> dict:
    meta = {"name": name, "labels": {"pod": name}}
    if link is not None:
        meta["annotations"] = {"netemu.io/link": link}
    return {"apiVersion": "v1", "kind": "Pod", "metadata": meta,
            "spec": {"nodeName": "a", "containers": [{"name": "c", "image": "busybox",
                                                      "command": ["sleep", "3600"]}]}}


@pytest.fixture(scope="module")
def lab():
    name = f"hkpl-{uuid.uuid4().hex[:5]}"
    try:
        with netemu.up({"name": name, "nodes": [{"name": "a"}],
                        "workloads": [pod("slow", "delay 10ms rate 20mbit"), pod("plain")]}) as cluster:
            yield cluster
    finally:
        assert_gone(name)


def ends(lab, pod_name: str) -> list[tuple[str, str]]:
    """The pod's veth pair: its vethXXXXXXX in the node, and its eth0."""
    p = lab.pods[pod_name].object
    return [(names.node_ns(lab.name, "a"), names.pod_veth("default", pod_name, p["metadata"]["uid"])),
            (names.pod_ns(lab.name, "default", pod_name), names.POD_IFACE)]


def delay_lines(link_ends: list[tuple[str, str]]) -> list[int]:
    """Pids of the delay-line processes serving LINK_ENDS: each runs in its
    end's namespace, with its device as an argument (every pod's eth0 has the
    same name, so the namespace tells them apart)."""
    mine = {(f"net:[{netns.inode(ns)}]", dev) for ns, dev in link_ends if ns in netns.list_all()}
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode().split("\0")
            where = os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        if "netemu.delayline" in argv and (where, argv[argv.index("netemu.delayline") + 2]) in mine:
            out.append(int(pid))
    return out


def all_delay_lines() -> set[int]:
    out = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"netemu.delayline" in f.read():
                    out.add(int(pid))
        except OSError:
            continue
    return out


def rtt_min(lab, ip: str) -> float:
    r = lab.nodes["a"].exec(["ping", "-c", "3", "-i", "0.2", "-W", "2", ip], check=True)
    return float(r.stdout.rsplit("=", 1)[1].split("/")[0])


def test_the_annotation_impairs_the_pods_veth_both_ways(lab):
    for ns, dev in ends(lab, "slow"):
        qdiscs = json.loads(netns.run(ns, ["tc", "-j", "qdisc", "show", "dev", dev]).stdout)
        assert [q["kind"] for q in qdiscs] == ["tbf"] and qdiscs[0]["options"]["rate"] == 2_500_000, (ns, qdiscs)
        table = netns.run(ns, ["nft", "list", "table", "netdev", f"netemu-link-{dev}"]).stdout
        assert f'fwd to "{impairment.tap_name(dev)}"' in table, table
    assert len(delay_lines(ends(lab, "slow"))) == 2
    # 10 ms each way, both ways: the node's pings to the pod wait at least 20 ms;
    # the pod beside it without the annotation is not delayed.
    assert rtt_min(lab, lab.pods["slow"].ip) >= 20.0
    assert rtt_min(lab, lab.pods["plain"].ip) < 10.0
    for ns, dev in ends(lab, "plain"):
        assert netns.run(ns, ["nft", "list", "table", "netdev", f"netemu-link-{dev}"], check=False).returncode != 0


def test_deleting_the_pod_stops_its_delay_lines_and_removes_its_rules(lab):
    before = all_delay_lines()
    slow = sorted(delay_lines(ends(lab, "slow")))
    lab.apply(pod("brief", "delay 1ms loss 1%"))
    lab.wait()
    brief = ends(lab, "brief")
    started = delay_lines(brief)
    assert len(started) == 2 and not set(started) & before
    lab.delete("pod", "brief")
    # its two are gone (the pod's namespace may go first, so look for the pids)
    wait_for(lambda: not set(started) & all_delay_lines(), timeout=10, what="the pod's delay lines to stop")
    assert sorted(delay_lines(ends(lab, "slow"))) == slow and len(slow) == 2     # the other pod's stay
    node_ns, veth = brief[0]
    assert netns.run(node_ns, ["nft", "list", "table", "netdev", f"netemu-link-{veth}"],
                     check=False).returncode != 0
    assert netns.run(node_ns, ["ip", "link", "show", "dev", impairment.tap_name(veth)],
                     check=False).returncode != 0
    assert brief[1][0] not in netns.list_all()


def test_a_bad_annotation_is_refused_on_write_naming_the_field(lab):
    with pytest.raises(netemu.TopologyError, match=r"^<dict>: object 1 \(Pod broken\): "
                       r"metadata\.annotations\[netemu\.io/link\]\.rate: invalid rate 'fast': "):
        lab.apply(pod("broken", "rate fast"))
    deployment = {"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "many"},
                  "spec": {"selector": {"matchLabels": {"app": "many"}}, "template": {
                      "metadata": {"labels": {"app": "many"}, "annotations": {"netemu.io/link": "delay"}},
                      "spec": {"containers": [{"name": "c", "image": "busybox"}]}}}}
    with pytest.raises(netemu.TopologyError, match=r"spec\.template\.metadata\.annotations\[netemu\.io/link\]: "
                                                   r"expected PROPERTY VALUE pairs"):
        lab.apply(deployment)
    assert [p["metadata"]["name"] for p in lab.get("pods")] == ["plain", "slow"]
    assert lab.get("deployments") == []


def test_a_bad_annotation_the_api_never_checked_fails_the_sandbox_with_an_event(lab):
    """A pod stored without the API server's checks (as by an older netemu):
    the kubelet refuses to build its sandbox and says why, as a bad
    kubernetes.io/egress-bandwidth fails the CNI bandwidth plugin."""
    from netemu import cluster as clusters
    from netemu.store import registry

    obj = pod("unchecked", "rate fast")
    obj["metadata"].update(namespace="default", uid=str(uuid.uuid4()), creationTimestamp=registry.now())
    store = clusters.open_store(lab.name)
    try:
        registry.create(store, obj)
    finally:
        store.close()
    try:
        def failed():
            return [e["message"] for e in lab.get("events")
                    if e["involvedObject"]["name"] == "unchecked" and e["reason"] == "FailedCreatePodSandBox"]
        messages = wait_for(failed, timeout=20, what="a FailedCreatePodSandBox event")
        assert messages[0] == ("Failed to create pod sandbox: metadata.annotations[netemu.io/link].rate: "
                               "invalid rate 'fast': use a number and one of "
                               "bit, kbit, mbit, gbit, tbit, bps, kbps, mbps, gbps (e.g. 100mbit)"), messages
        assert names.pod_ns(lab.name, "default", "unchecked") not in netns.list_all()
        assert lab.pods["unchecked"].ip is None
    finally:
        lab.delete("pod", "unchecked")


def test_link_show_lists_the_pods_link_from_the_store_and_the_kernel(lab):
    """`link show` and links() list a pod's own link after the node uplinks:
    its annotation's properties and mechanisms, its node and two ends, and
    what the kernel holds on each end (the delay line found by its namespace
    and device among the machine's processes)."""
    from .clusters import cli

    shown = lab.links()
    assert list(shown) == ["a", "pod/default/slow"]          # "plain" has no annotation
    slow = shown["pod/default/slow"]
    link_ends = ends(lab, "slow")
    assert slow["pod"] == "slow" and slow["namespace"] == "default" and slow["node"] == "a"
    assert slow["ends"] == [f"{ns}/{dev}" for ns, dev in link_ends]
    assert slow["settings"] == {"rate": "20mbit", "delay": "10ms"}
    assert slow["mechanisms"]["rate"].startswith("tc tbf") and "delay line" in slow["mechanisms"]["delay"]
    pids = delay_lines(link_ends)
    for (ns, dev), where in zip(link_ends, slow["ends"]):
        end = slow["installed"][where]
        assert end["qdiscs"] == ["tbf"] and end["nftables"] == [f"netemu-link-{dev}"], (where, end)
        assert end["delayLine"]["pid"] in pids and end["delayLine"]["tap"] == impairment.tap_name(dev)
    # One pod by name, with or without an annotation; the command line agrees.
    assert lab.links(pod="slow") == {"pod/default/slow": slow}
    plain = lab.links(pod="plain")["pod/default/plain"]
    assert plain["settings"] == {} and all(end == {"qdiscs": [], "nftables": [], "delayLine": None}
                                           for end in plain["installed"].values())
    assert json.loads(cli("link", "show", "-o", "json", "--cluster", lab.name).stdout) == shown
    assert json.loads(cli("link", "show", "pod/slow", "-n", "default", "-o", "json",
                          "--cluster", lab.name).stdout) == {"pod/default/slow": slow}
    text = cli("link", "show", "--cluster", lab.name).stdout
    assert any(line.split()[:3] == ["pod/default/slow", "delay", "10ms"] for line in text.splitlines()), text
    assert "NOT RUNNING" not in text
    wrong = cli("link", "show", "pod/nope", "--cluster", lab.name, check=False)
    assert wrong.returncode != 0 and 'pods "nope" not found' in wrong.stderr
    wrong = cli("link", "set", "pod/slow", "--rate", "1mbit", "--cluster", lab.name, check=False)
    assert wrong.returncode != 0 and "netemu.io/link annotation" in wrong.stderr


def test_a_killed_delay_line_of_a_pod_is_restarted(lab):
    """The kubelet restarts a pod's delay line that died, with the same delay:
    the pod is reachable again, still delayed."""
    link_ends = ends(lab, "slow")
    before = delay_lines(link_ends)
    assert len(before) == 2
    os.kill(before[0], 9)
    after = wait_for(lambda: (lambda now: now if len(now) == 2 and before[0] not in now else None)(
        delay_lines(link_ends)), timeout=10, what="the pod's delay line to be restarted")
    assert before[1] in after
    assert rtt_min(lab, lab.pods["slow"].ip) >= 20.0
    where = f"{link_ends[0][0]}/{link_ends[0][1]}"
    assert lab.links(pod="slow")["pod/default/slow"]["installed"][where]["delayLine"]["pid"] in after
