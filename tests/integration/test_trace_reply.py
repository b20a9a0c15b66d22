"""netemu trace of a reply that comes back another way than the probe went
(cluster names he-tr-*): a pod on n1 probes n2's NodePort. The probe goes
plainly over the underlay to n2's address; n2 DNATs it to pod b and masquerades
it, so the reply returns to n2, which un-NATs it to pod a's address and sends
it through the overlay. Every hop of that reply must be reported as seen.
"""

from __future__ import annotations

import re
import uuid

import pytest

from netemu.capture.targets import load_view
from tests.integration.clusters import cli, lab, wait_for
from tests.integration.test_trace import hop_lines, sections, tcpdumps_of, web

pytestmark = [pytest.mark.root, pytest.mark.timeout(240)]


def nodeport_service(name, pod):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"type": "NodePort", "selector": {"pod": pod}, "ports": [{"port": 80, "targetPort": 80}]}}


@pytest.mark.parametrize("backend", ["udp", "vxlan"])
def test_trace_pod_to_another_nodes_nodeport_sees_the_reply_through_the_overlay(backend):
    name = f"he-tr-{backend[:3]}-{uuid.uuid4().hex[:4]}"
    with lab({"name": name, "cluster": {"backend": backend},
              "nodes": [{"name": "n1"}, {"name": "n2"}],
              "workloads": [web("a", "n1"), web("b", "n2"), nodeport_service("bnp", "b")]}):
        def ready():
            view = load_view(name)
            svc = view.services.get("default/bnp")
            return bool(svc and all(p.ip for p in view.pods.values()) and svc.ports[0].endpoints
                        and cli("exec", "a", "--cluster", name, "--", "curl", "-s", "-m", "2", "-o", "/dev/null",
                                f"{view.nodes['n2'].address}:{svc.ports[0].node_port}", check=False).returncode == 0)
        wait_for(ready, timeout=60, interval=0.5, what="pod IPs, the NodePort's endpoint and its rules")
        view = load_view(name)
        a, b = view.pod("a"), view.pod("b")
        n1, n2 = view.nodes["n1"], view.nodes["n2"]
        tunnel = view.tunnel_device
        node_port = view.services["default/bnp"].ports[0].node_port
        out = cli("trace", "a", f"n2:{node_port}", "--cluster", name).stdout
        fwd, rep = sections(out)
        assert "connected" in out.splitlines()[1], out
        assert [h for h, _ in hop_lines(fwd)] == [
            "pod a eth0", f"node n1 {a.veth}", "node n1 docker0", "node n1 eth0", "node n2 eth0",
            "node n2 docker0", f"node n2 {b.veth}", "pod b eth0"], out
        reply = hop_lines(rep)
        assert [h for h, _ in reply] == [
            "pod b eth0", f"node n2 {b.veth}", "node n2 docker0", f"node n2 {tunnel}", "node n2 eth0",
            "node n1 eth0", f"node n1 {tunnel}", "node n1 docker0", f"node n1 {a.veth}", "pod a eth0"], out
        assert all("not seen" not in seen for _, seen in hop_lines(out)), out
        # On the underlay the reply is encapsulated between the nodes, already un-NATed:
        # from n2's NodePort to pod a.
        underlay = [seen for label, seen in reply if label.endswith(" eth0") and label.startswith("node")]
        outer = (rf"{n2.address}:8285 > {n1.address}:8285 UDP/flannel" if backend == "udp"
                 else rf"{n2.address}:\d+ > {n1.address}:8472 VXLAN vni 1")
        assert len(underlay) == 2 and all(re.match(outer, s) and f"{n2.address}:{node_port} > {a.ip}:" in s
                                          for s in underlay), underlay
        assert reply[-1][1].startswith(f"{n2.address}:{node_port} > {a.ip}:"), out
        assert not tcpdumps_of(name)
