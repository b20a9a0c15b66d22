"""netemu trace / capture / decode / graph on real clusters (names hx-*).

Two nodes, pods a and c on n1, b on n2, each serving HTTP on port 80. Every
cluster is torn down in `running()`'s finally, and every test checks that no
tcpdump of the cluster is left.

The verbs are run through the netemu command; until netemu.cli registers them
itself (netemu.capture.cli.register), SHIM registers them the same way.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid

import pytest

from netemu import cluster as clusters
from netemu.capture import decode, tcpdump, trace
from netemu.capture.targets import load_view
from tests.integration.clusters import running, write_topology

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

SHIM = """
import argparse, sys
from netemu import cli
from netemu.capture import cli as capture_cli
_orig = cli.build_parser
def build_parser():
    p = _orig()
    sub = next(a for a in p._actions if isinstance(a, argparse._SubParsersAction))
    if "trace" not in sub.choices:
        def verb(name, func, help_, root=True):
            sp = sub.add_parser(name, help=help_, description=help_)
            sp.set_defaults(func=func, needs_root=root)
            return sp
        def with_cluster(sp):
            sp.add_argument("--cluster")
            return sp
        capture_cli.register(sub, verb, with_cluster)
    return p
cli.build_parser = build_parser
sys.exit(cli.main(sys.argv[1:]))
"""
NETEMU = [sys.executable, "-c", SHIM]


def netemu(*args, check=True, timeout=60):
    proc = subprocess.run(NETEMU + list(args), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"netemu {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def web(name, node):
    return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": {"app": "web"}},
            "spec": {"nodeName": node, "containers": [{"name": "web", "image": "nginx",
                                                      "ports": [{"containerPort": 80}]}]}}


@pytest.fixture
def topology(tmp_path):
    def make(backend):
        name = f"hx-{backend.replace('-', '')[:5]}-{uuid.uuid4().hex[:4]}"
        return write_topology(tmp_path, name, {
            "cluster": {"backend": backend},
            "nodes": [{"name": "n1"}, {"name": "n2"}],
            "workloads": [web("a", "n1"), web("b", "n2"), web("c", "n1")]})
    if os.geteuid() != 0:
        pytest.skip("needs root")
    return make


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
        m = re.match(r"^\s+\d+  (\S+ \S+ \S+|client \S+)\s+(.*)$", line)
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
def test_trace_pod_to_pod_across_nodes_and_on_one_node(topology, backend, tmp_path):
    with running(topology(backend)) as (name, _):
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
        for seen in underlay:
            if backend == "udp":
                assert re.match(rf"172\.30\.0\.[12]:8285 > 172\.30\.0\.[12]:8285 UDP/flannel", seen), seen
            elif backend == "vxlan":
                assert re.match(rf"172\.30\.0\.[12]:\d+ > 172\.30\.0\.[12]:8472 VXLAN vni 1", seen), seen
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


def test_trace_icmp_and_udp_probes(topology):
    with running(topology("udp")) as (name, _):
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


def test_capture_node_to_pcap_then_decode_reports_inner_flows(topology, tmp_path):
    with running(topology("udp")) as (name, _):
        view = load_view(name)
        a, b = view.pod("a"), view.pod("b")
        pcap = tmp_path / "n1.pcap"
        witness = tmp_path / "b.pcap"
        # The pod b capture is the witness: what b's eth0 received from a is what
        # n1's eth0 must have carried inside flannel's UDP datagrams.
        with tcpdump.capture(b.netns, "eth0", str(witness), "ip"):
            proc = subprocess.Popen(NETEMU + ["capture", "n1", "-w", str(pcap), "--duration", "3",
                                              "--cluster", name],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                deadline = time.monotonic() + 10
                err = ""
                while "listening on" not in err and time.monotonic() < deadline:
                    err += proc.stderr.readline()
                assert "listening on" in err, err
                for _ in range(3):
                    netemu("exec", "--cluster", name, "a", "--", "curl", "-s", "-m", "3", f"http://{b.ip}/")
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


def test_no_tcpdump_left_after_errors(topology, tmp_path):
    with running(topology("udp")) as (name, _):
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
