"""netemu trace / capture / decode / graph on real clusters (names hr-*).

One cluster per backend, shared by the tests of this file (building one is most
of the time a test takes): two nodes, pods a and c on n1, b on n2, each serving
HTTP on port 80, and three services: bsvc (ClusterIP, its only endpoint b on
n2), csvc (ClusterIP, endpoint c on n1, the same node as a) and blb
(LoadBalancer, endpoint b). The udp cluster runs kube-proxy's nftables mode,
the vxlan one its iptables mode, so both rule layouts are traced. Every cluster
is built from a topology dict by the Python API and torn down at the end of the
module (netemu.up through clusters.lab, which checks nothing is left), and
every test checks that no tcpdump of the cluster is left.
"""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from netemu import cluster as clusters
from netemu.capture import decode, rules, tcpdump, trace
from netemu.capture.targets import load_view
from tests.integration.clusters import lab, wait_for

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

NETEMU = [sys.executable, "-m", "netemu.cli"]
PROXY_MODE = {"udp": "nftables", "vxlan": "iptables", "host-gw": "nftables"}


def netemu(*args, check=True, timeout=60):
    proc = subprocess.run(NETEMU + list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"netemu {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def web(name, node):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "web", "pod": name}},
            "spec": {"nodeName": node, "containers": [{"name": "web", "image": "nginx",
                                                      "ports": [{"containerPort": 80}]}]}}


def service(name, pod, port, type_="ClusterIP"):
    return {"apiVersion": "v1", "kind": "Service", "metadata": {"name": name},
            "spec": {"type": type_, "selector": {"pod": pod}, "ports": [{"port": port, "targetPort": 80}]}}


def _ready(name: str) -> bool:
    view = load_view(name)
    eps = {svc.name: [e.ip for sp in svc.ports for e in sp.endpoints] for svc in view.services.values()}
    lb = view.services.get("default/blb")
    if not (all(p.ip for p in view.pods.values()) and all(eps.get(s) for s in ("bsvc", "csvc", "blb"))
            and lb is not None and bool(lb.load_balancer_ips) and view.lb_address is not None):
        return False
    # The proxies and the balancer have written their rules (the store is ahead of them).
    b, c = view.pod("b").ip, view.pod("c").ip
    for node in view.nodes.values():
        for svc, port, ip in (("bsvc", 8080, b), ("csvc", 80, c), ("blb", 80, b)):
            if not rules.lookup(node.netns, view.proxy_mode, view.services[f"default/{svc}"].cluster_ip,
                                "tcp", port, f"{ip}:80"):
                return False
        if not rules.lookup(node.netns, view.proxy_mode, None, "tcp", lb.ports[0].node_port, f"{b}:80"):
            return False
        if not rules.lookup_lb(view.lb_ns, lb.load_balancer_ips[0], "tcp", 80, node.address):
            return False
    return True


@pytest.fixture(scope="module")
def cluster():
    """cluster(backend) -> name of a running cluster with that backend, built on
    first use and torn down when the module's tests are done."""
    if os.geteuid() != 0:
        pytest.skip("needs root")
    made: dict[str, str] = {}
    with contextlib.ExitStack() as stack:
        def get(backend: str) -> str:
            if backend not in made:
                name = f"hr-{backend.replace('-', '')[:5]}-{uuid.uuid4().hex[:4]}"
                stack.enter_context(lab({
                    "name": name, "cluster": {"backend": backend, "proxyMode": PROXY_MODE[backend]},
                    "nodes": [{"name": "n1"}, {"name": "n2"}],
                    "workloads": [web("a", "n1"), web("b", "n2"), web("c", "n1"),
                                  service("bsvc", "b", 8080), service("csvc", "c", 80),
                                  service("blb", "b", 80, "LoadBalancer")]}))
                made[backend] = name
                wait_for(lambda: _ready(made[backend]), timeout=30, interval=0.3,
                         what="pod IPs, endpoints and the external IP")
            return made[backend]
        yield get


def tcpdumps_of(cluster: str) -> list[int]:
    """tcpdump processes in the cluster's namespaces or tagged with its name."""
    out = []
    for pid in clusters.cluster_processes(cluster):
        try:
            with open(f"/proc/{pid}/comm") as f:
                if f.read().strip() == "tcpdump":
                    out.append(pid)
        except FileNotFoundError:
            continue
    return out


def hop_lines(section: str) -> list[tuple[str, str]]:
    """(hop label, what was seen) per numbered line of a trace section."""
    out = []
    for line in section.splitlines():
        m = re.match(r"^\s+\d+  (\S+ \S+ \S+|client \S+|lb \S+)\s+(.*)$", line)
        if m:
            out.append((m.group(1), m.group(2)))
    return out


def sections(text: str) -> tuple[str, str]:
    fwd, _, rep = text.partition("\nreply")
    return fwd, rep


CROSS_LABELS = {
    "udp": ["pod a eth0", "node n1 VETHA", "node n1 docker0", "node n1 flannel0", "node n1 eth0",
            "node n2 eth0", "node n2 flannel0", "node n2 docker0", "node n2 VETHB", "pod b eth0"],
    "vxlan": ["pod a eth0", "node n1 VETHA", "node n1 docker0", "node n1 flannel.1", "node n1 eth0",
              "node n2 eth0", "node n2 flannel.1", "node n2 docker0", "node n2 VETHB", "pod b eth0"],
    "host-gw": ["pod a eth0", "node n1 VETHA", "node n1 docker0", "node n1 eth0",
                "node n2 eth0", "node n2 docker0", "node n2 VETHB", "pod b eth0"],
}


@pytest.mark.parametrize("backend", ["udp", "vxlan", "host-gw"])
def test_trace_pod_to_pod_across_nodes_and_on_one_node(cluster, backend, tmp_path):
    name = cluster(backend)
    view = load_view(name)
    a, b = view.pod("a"), view.pod("b")
    svg = tmp_path / "path.svg"
    out = netemu("trace", "a", "b", "--port", "80", "-o", str(svg), "--cluster", name).stdout
    fwd, rep = sections(out)
    want = [l.replace("VETHA", a.veth).replace("VETHB", b.veth) for l in CROSS_LABELS[backend]]
    assert [h for h, _ in hop_lines(fwd)] == want, out
    assert [h for h, _ in hop_lines(rep)] == list(reversed(want)), out
    assert all("not seen" not in seen for _, seen in hop_lines(out)), out
    for label, seen in hop_lines(fwd):
        assert f"{a.ip}:" in seen and f"> {b.ip}:80 TCP [S]" in seen, (label, seen)
    for label, seen in hop_lines(rep):
        assert f"{b.ip}:80 > {a.ip}:" in seen and "TCP [S.]" in seen, (label, seen)
    underlay = [seen for label, seen in hop_lines(out) if label.endswith(" eth0") and "node" in label]
    assert len(underlay) == 4
    n1, n2 = view.nodes["n1"].address, view.nodes["n2"].address
    node = f"({re.escape(str(n1))}|{re.escape(str(n2))})"
    for seen in underlay:
        if backend == "udp":
            assert re.match(rf"{node}:8285 > {node}:8285 UDP/flannel", seen), seen
        elif backend == "vxlan":
            assert re.match(rf"{node}:\d+ > {node}:8472 VXLAN vni 1", seen), seen
        else:
            assert seen.startswith(f"{a.ip}:") or seen.startswith(f"{b.ip}:"), seen
    assert f"{n1}:" in underlay[0].split(" > ")[0] or backend == "host-gw"
    # TTL falls as the packet is routed: first hop 64, last lower.
    ttls = [int(re.findall(r"ttl (\d+)", seen)[-1]) for _, seen in hop_lines(fwd)]
    assert ttls[0] == 64 and ttls[-1] < 64 and ttls == sorted(ttls, reverse=True)
    assert svg.read_text().startswith("<?xml") and "pod b" in svg.read_text()

    # Same node: pod to pod across docker0, no tunnel, no underlay.
    out = netemu("trace", "a", "c", "--port", "80", "--cluster", name).stdout
    labels = [h for h, _ in hop_lines(sections(out)[0])]
    assert labels == ["pod a eth0", f"node n1 {a.veth}", "node n1 docker0",
                      f"node n1 {view.pod('c').veth}", "pod c eth0"], out
    assert "reply (" in out
    assert not tcpdumps_of(name)


def notes_of(section: str, label: str) -> list[str]:
    """The "^ ..." notes printed under the first hop with LABEL."""
    lines = section.splitlines()
    for i, line in enumerate(lines):
        if re.match(rf"^\s+\d+  {re.escape(label)}\s", line):
            out = []
            for after in lines[i + 1:]:
                if not after.strip().startswith("^ "):
                    break
                out.append(after.strip()[2:])
            return out
    raise AssertionError(f"no hop {label} in:\n{section}")


def rules_of(text: str) -> str:
    return text.split("NAT rules that chose it:\n", 1)[1].split("\n\n", 1)[0] if "NAT rules" in text else ""


@pytest.mark.parametrize("backend", ["udp", "vxlan"])
def test_trace_services_clusterip_nodeport_and_load_balancer(cluster, backend):
    name = cluster(backend)
    view = load_view(name)
    a, b, c = view.pod("a"), view.pod("b"), view.pod("c")
    n1, n2 = view.nodes["n1"], view.nodes["n2"]
    vip = view.services["default/bsvc"].cluster_ip
    tunnel = view.tunnel_device

    # 1. ClusterIP whose only endpoint is on the other node.
    out = netemu("trace", "a", "svc/bsvc", "--cluster", name).stdout
    fwd, rep = sections(out)
    want = [l.replace("VETHA", a.veth).replace("VETHB", b.veth) for l in CROSS_LABELS[backend]]
    assert [h for h, _ in hop_lines(fwd)] == want, out
    assert [h for h, _ in hop_lines(rep)] == list(reversed(want)), out
    assert all("not seen" not in seen for _, seen in hop_lines(out)), out
    # The destination is the ClusterIP up to node A's bridge port, the pod from docker0 on.
    dsts = [re.search(r"> (\S+) TCP \[S\]", seen).group(1) for _, seen in hop_lines(fwd)]
    assert dsts == [f"{vip}:8080"] * 2 + [f"{b.ip}:80"] * 8, out
    assert notes_of(fwd, "node n1 docker0") == [f"DNAT {vip}:8080 -> {b.ip}:80 (pod b)"]
    underlay = [seen for label, seen in hop_lines(fwd) if label in ("node n1 eth0", "node n2 eth0")]
    outer = (rf"{n1.address}:8285 > {n2.address}:8285 UDP/flannel" if backend == "udp"
             else rf"{n1.address}:\d+ > {n2.address}:8472 VXLAN vni 1")
    assert len(underlay) == 2 and all(re.match(outer, seen) and f"> {b.ip}:80 TCP [S]" in seen
                                      for seen in underlay), underlay
    # The reply comes back from the pod, and node A turns its source back into the ClusterIP.
    srcs = [seen.split(" | ")[-1].split(" > ")[0] for _, seen in hop_lines(rep)]
    assert srcs == [f"{b.ip}:80"] * 7 + [f"{vip}:8080"] * 3, out
    assert notes_of(rep, "node n1 docker0")[0].startswith(
        f"source restored {b.ip}:80 -> {vip}:8080 (ClusterIP of default/bsvc)")
    rule = rules_of(out)
    assert rule.startswith(f"  at node n1, {'nftables table ip kube-proxy' if backend == 'udp' else 'iptables -t nat'}:")
    if backend == "udp":
        assert f'map service-ips: {vip} . tcp . 8080 comment "default/bsvc" : goto service-' in rule, rule
        assert re.search(rf"chain endpoint-\w+-default/bsvc/tcp/__{re.escape(b.ip)}/80: "
                         rf"meta l4proto tcp dnat to {re.escape(b.ip)}:80", rule), rule
    else:
        assert re.search(rf'-A KUBE-SERVICES -d {re.escape(vip)}/32 -p tcp -m comment --comment '
                         rf'"default/bsvc cluster IP" .*--dport 8080 -j KUBE-SVC-\w+', rule), rule
        assert re.search(rf'-A KUBE-SVC-\w+ -m comment --comment "default/bsvc -> {re.escape(b.ip)}:80" '
                         rf'-j KUBE-SEP-\w+', rule), rule
        assert re.search(rf"-A KUBE-SEP-\w+ .*-j DNAT --to-destination {re.escape(b.ip)}:80", rule), rule

    # 2. ClusterIP whose endpoint is on the same node: br_netfilter DNATs inside the
    # bridge, which hands the frame straight to c's port (docker0 never sees it),
    # and the capture itself does not duplicate it (no promiscuous bridge).
    # That is the path while node n1 has resolved c's MAC once (as on a node
    # whose kubelet probes c): without it br_netfilter sends the rewritten frame
    # out through docker0 to resolve it (see trace.DNAT_BRIDGED_NOTE). The
    # kubelet sends no probes here, so the node reaches c once first.
    subprocess.run(["ip", "netns", "exec", view.nodes["n1"].netns, "ping", "-c", "1", "-W", "2", c.ip],
                   capture_output=True, timeout=10, check=True)
    out = netemu("trace", "a", "svc/csvc", "--cluster", name).stdout
    fwd, rep = sections(out)
    assert [h for h, _ in hop_lines(fwd)] == ["pod a eth0", f"node n1 {a.veth}", "node n1 docker0",
                                              f"node n1 {c.veth}", "pod c eth0"], out
    assert "DNAT happened inside the bridge" in dict(hop_lines(fwd))["node n1 docker0"]
    # Each hop saw the SYN as often as a's eth0 sent it (once, unless retransmitted).
    times = [int(m.group(1)) if (m := re.search(r"\(seen (\d+)x\)", seen)) else 1
             for _, seen in hop_lines(fwd) if not seen.startswith("- ")]
    assert len(times) == 4 and set(times) == {times[0]}, out
    assert notes_of(fwd, f"node n1 {c.veth}")[0].startswith("DNAT ") and f"{c.ip}:80 TCP [S]" in out
    assert dict(hop_lines(rep))["pod a eth0"].startswith(view.services["default/csvc"].cluster_ip + ":80 > ")

    # 3. NodePort on n1 from the external client: DNAT to b and masquerade to n1's
    # own address, then across to n2; the reply is un-NATed on n1 on its way out.
    node_port = view.services["default/blb"].ports[0].node_port
    out = netemu("trace", "client", f"n1:{node_port}", "--cluster", name).stdout
    fwd, rep = sections(out)
    labels = [h for h, _ in hop_lines(fwd)]
    assert labels == ["client eth0", "node n1 eth0", f"node n1 {tunnel}", "node n1 eth0", "node n2 eth0",
                      f"node n2 {tunnel}", "node n2 docker0", f"node n2 {b.veth}", "pod b eth0"], out
    notes = notes_of(fwd, f"node n1 {tunnel}")
    assert notes[0] == f"DNAT {n1.address}:{node_port} -> {b.ip}:80 (pod b)", notes
    assert re.match(rf"SNAT \(masquerade\) {view.client_address}:\d+ -> [\d.]+:\d+ \(node n1 {re.escape(tunnel)}\)",
                    notes[1]), notes
    assert not dict(hop_lines(fwd))["pod b eth0"].startswith(view.client_address)
    assert dict(hop_lines(rep))["client eth0"].startswith(f"{n1.address}:{node_port} > {view.client_address}:")
    assert "default/blb" in rules_of(out) and ("service-nodeports: tcp . " if backend == "udp"
                                               else "-A KUBE-NODEPORTS") in rules_of(out)

    # 4. The LoadBalancer's external IP from the client: the balancer DNATs to one
    # node's NodePort and masquerades; that node DNATs to b and masquerades again.
    ext = view.services["default/blb"].load_balancer_ips[0]
    out = netemu("trace", "client", ext, "--port", "80", "--cluster", name).stdout
    fwd, rep = sections(out)
    hops = hop_lines(fwd)
    assert [h for h, _ in hops][:3] == ["client eth0", "lb eth0", "lb eth0"] and hops[-1][0] == "pod b eth0", out
    assert all("not seen" not in seen for _, seen in hop_lines(out)), out
    chosen = re.search(r"endpoint chosen: node (n\d) \(by the load balancer\), then pod b", out).group(1)
    node = view.nodes[chosen]
    assert hops[1][1].startswith(f"{view.client_address}:") and f"> {ext}:80 TCP [S]" in hops[1][1]
    assert hops[2][1].startswith(f"{view.lb_address}:") and f"> {node.address}:{node_port} TCP [S]" in hops[2][1]
    assert hops[3][0] == f"node {chosen} eth0"
    rule = rules_of(out)
    assert f"at the load balancer ({view.lb_ns}), nftables table ip cloud-lb:" in rule
    assert f"dnat to {node.address}:{node_port}" in rule and "masquerade" in rule and f"at node {chosen}," in rule
    assert hop_lines(rep)[-1][0] == "client eth0"
    assert hop_lines(rep)[-1][1].startswith(f"{ext}:80 > {view.client_address}:")
    assert not tcpdumps_of(name)


def test_capture_lb_and_client_while_the_client_uses_the_external_ip(cluster, tmp_path):
    name = cluster("udp")
    view = load_view(name)
    ext = view.services["default/blb"].load_balancer_ips[0]
    pcap = tmp_path / "client.pcap"
    procs = [subprocess.Popen(NETEMU + ["capture", "lb", "--duration", "4", "--cluster", name, "tcp"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True),
             subprocess.Popen(NETEMU + ["capture", "client", "-w", str(pcap), "--duration", "4",
                                        "--cluster", name], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)]
    try:
        for proc in procs:
            deadline, err = time.monotonic() + 10, ""
            while "listening on" not in err and time.monotonic() < deadline:
                err += proc.stderr.readline()
            assert "listening on" in err, err
        body = netemu("client", "--cluster", name, "exec", "--", "curl", "-s", "-m", "3", f"{ext}:80").stdout
        assert "pod b" in body
        lb_out, _ = procs[0].communicate(timeout=20)
        procs[1].communicate(timeout=20)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert [p.returncode for p in procs] == [0, 0]
    # The balancer's eth0 sees the client's packet, then the same one sent on to a NodePort.
    assert re.search(rf"IP {re.escape(view.client_address)}\.\d+ > {re.escape(ext)}\.80: Flags \[S\]", lb_out), lb_out
    nodes = "|".join(re.escape(n.address) for n in view.nodes.values())
    assert re.search(rf"IP {re.escape(ext)}\.\d+ > ({nodes})\.{view.services['default/blb'].ports[0].node_port}: "
                     r"Flags \[S\]", lb_out), lb_out
    flows = netemu("decode", str(pcap), "--flows-only").stdout
    assert f"{view.client_address}:" in flows and f"{ext}:80" in flows, flows
    # The picture of the cluster has its services, ClusterIP -> endpoints.
    graph = netemu("graph", "--cluster", name).stdout
    b = view.pod("b")
    assert f"svc default/bsvc ClusterIP {view.services['default/bsvc'].cluster_ip}:8080/TCP -> {b.ip}:80 (b)" in graph
    assert "svc default/blb LoadBalancer" in graph and f"LB {ext} -> {b.ip}:80 (b)" in graph
    assert f"lb {view.lb_address}" in graph
    assert not tcpdumps_of(name)


def test_trace_icmp_and_udp_probes(cluster):
    name = cluster("udp")
    view = load_view(name)
    out = netemu("trace", "a", "b", "--proto", "icmp", "--cluster", name).stdout
    assert "echo reply from" in out and "echo-request" in out and "echo-reply" in out
    # Nothing listens on UDP 9: the reply is the ICMP error, seen at every hop back.
    out = netemu("trace", "a", "b", "--proto", "udp", "--port", "9", "--cluster", name).stdout
    fwd, rep = sections(out)
    assert len(hop_lines(fwd)) == 10 and all("UDP" in s for _, s in hop_lines(fwd))
    assert all("port-unreachable" in s for _, s in hop_lines(rep)) and len(hop_lines(rep)) == 10
    assert view.pod("b").ip in out
    assert not tcpdumps_of(name)


def test_capture_node_to_pcap_then_decode_reports_inner_flows(cluster, tmp_path):
    name = cluster("udp")
    view = load_view(name)
    a, b = view.pod("a"), view.pod("b")
    pcap = tmp_path / "n1.pcap"
    witness = tmp_path / "b.pcap"
    # The pod b capture is the witness: what b's eth0 received from a is what
    # n1's eth0 must have carried inside flannel's UDP datagrams.
    with tcpdump.capture(b.netns, "eth0", str(witness), "ip"):
        proc = subprocess.Popen(NETEMU + ["capture", "n1", "-w", str(pcap), "--duration", "5",
                                          "--cluster", name],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 10
            err = ""
            while "listening on" not in err and time.monotonic() < deadline:
                err += proc.stderr.readline()
            assert "listening on" in err, err
            # One exec for the three connections: under load each `netemu exec` takes a
            # while, and all three must fall inside the capture's duration.
            netemu("exec", "--cluster", name, "a", "--", "sh", "-c",
                   f"for i in 1 2 3; do curl -s -m 3 -o /dev/null http://{b.ip}/ || exit 1; done")
            proc.communicate(timeout=20)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == 0
    out = netemu("decode", str(pcap)).stdout
    assert f"172.30.0.1:8285 > 172.30.0.2:8285 UDP/flannel  |  {a.ip}:" in out
    decode.register_ports(udp_ports=[8285])
    expected = {}
    for d in decode.decode_pcap(str(witness)):
        i = d.inner
        if d.kind == "ipv4" and i.src == a.ip and i.dst == b.ip and i.dport == 80:
            expected.setdefault(i.sport, [0, 0])
            expected[i.sport][0] += 1
            expected[i.sport][1] += i.length
    assert len(expected) == 3
    table = out.split("\n\n")[-1]
    for sport, (packets, size) in expected.items():
        row = [l for l in table.splitlines() if l.split()[2:4] == [f"{a.ip}:{sport}", f"{b.ip}:80"]]
        assert len(row) == 1, table
        cols = row[0].split()
        # ENCAP PROTO SOURCE DESTINATION UNDERLAY(3 words) PACKETS BYTES UNDERLAY-BYTES OVERHEAD OVH%
        assert cols[0] == "udp" and cols[4:7] == ["172.30.0.1", ">", "172.30.0.2"]
        assert (int(cols[7]), int(cols[8])) == (packets, size), row
        assert int(cols[10]) == 28 * packets     # outer IP + UDP headers per packet
    assert not tcpdumps_of(name)


def test_no_tcpdump_left_after_errors(cluster, tmp_path):
    name = cluster("udp")
    view = load_view(name)
    bad = netemu("capture", "n1", "-i", "nosuchif", "--decode", "--duration", "2",
                 "--cluster", name, check=False)
    assert bad.returncode == 1 and "nosuchif" in bad.stderr
    points = [trace.Point(view.nodes["n1"].netns, "eth0"), trace.Point(view.nodes["n2"].netns, "nosuchif")]
    with pytest.raises(trace.TraceError):
        with trace.capture_all(points, str(tmp_path)):
            pass
    # An error inside the block stops every capture too.
    with pytest.raises(RuntimeError):
        with trace.capture_all(points[:1], str(tmp_path)):
            assert tcpdumps_of(name)
            raise RuntimeError("boom")
    assert netemu("trace", "a", "nosuchpod", "--port", "80", "--cluster", name, check=False).returncode == 1
    assert not tcpdumps_of(name)
    out = netemu("graph", "--cluster", name).stdout
    assert f"pod a {view.pod('a').ip}" in out and "node n2: eth0 172.30.0.2" in out
