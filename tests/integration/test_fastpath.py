"""The udp backend's fast path (offloads, GSO/GRO, worker processes) keeps the
wire format and delivers bytes exactly: no outer fragments, every datagram one
valid inner packet, byte-exact transfers, and interoperability with a node on the
plain per-packet path. Correctness only: no timing assertions."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from netemu import names, netns
from netemu.overlay import fastudp, udp, vnet
from netemu.overlay import stats as overlay_stats
from tests.integration.clusters import running, write_topology

pytestmark = [pytest.mark.root]

# Sends N bytes of a seeded pseudo-random stream; prints their sha256.
SENDER = """
import hashlib, random, socket, sys
host, port, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(7); h = hashlib.sha256(); s = socket.create_connection((host, port), timeout=30)
while n:
    chunk = rng.randbytes(min(n, 1 << 20)); s.sendall(chunk); h.update(chunk); n -= len(chunk)
s.shutdown(socket.SHUT_WR); s.recv(1); print(h.hexdigest())
"""
# Receives one connection; prints the byte count and sha256 of what arrived.
RECEIVER = """
import hashlib, socket, sys
l = socket.create_server(("0.0.0.0", int(sys.argv[1]))); c, _ = l.accept(); h = hashlib.sha256(); n = 0
while True:
    b = c.recv(1 << 20)
    if not b: break
    h.update(b); n += len(b)
print(n, h.hexdigest()); c.close()
"""
# Two sockets (two flows) alternate sending COUNT small datagrams each: an 8-byte
# sequence number and 56 bytes derived from it.
UDP_SENDER = """
import hashlib, socket, sys, time
host, port, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
socks = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
for s in socks:
    s.connect((host, port))
for i in range(count):
    for s in socks:
        s.send(i.to_bytes(8, "big") + hashlib.sha256(i.to_bytes(8, "big")).digest()[:24] * 2 + bytes(8))
"""
# Receives until quiet for a second; checks every datagram's content and that each
# flow's sequence numbers only go up; prints datagrams received, bad ones, reordered ones.
UDP_RECEIVER = """
import hashlib, socket, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
s.bind(("0.0.0.0", int(sys.argv[1]))); s.settimeout(10)
got = bad = reordered = 0; last = {}
while True:
    try:
        data, src = s.recvfrom(2048)
    except socket.timeout:
        break
    s.settimeout(1)
    i = int.from_bytes(data[:8], "big")
    got += 1
    if data != i.to_bytes(8, "big") + hashlib.sha256(i.to_bytes(8, "big")).digest()[:24] * 2 + bytes(8):
        bad += 1
    if last.get(src, -1) >= i:
        reordered += 1
    last[src] = i
print(got, bad, reordered)
"""


def topology(tmp_path, name: str) -> str:
    def pod(pod_name, node):
        return {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": pod_name},
                "spec": {"nodeName": node, "containers": [{"name": "c", "image": "busybox"}]}}
    return write_topology(tmp_path, name, {"cluster": {"backend": "udp"},
                                           "nodes": [{"name": "node1"}, {"name": "node2"}],
                                           "workloads": [pod("a", "node1"), pod("b", "node2")]})


def pod_ip(cluster: str, pod: str) -> str:
    from netemu import cluster as clusters
    from netemu.store import registry

    store = clusters.open_store(cluster)
    try:
        ip = ((registry.get(store, "Pod", "default", pod) or {}).get("status") or {}).get("podIP")
    finally:
        store.close()
    assert ip, f"pod {pod} has no IP"
    return ip


def transfer(cluster: str, src: str, dst: str, nbytes: int, port: int = 9100) -> None:
    receiver = subprocess.Popen(netns.exec_argv(names.pod_ns(cluster, "default", dst),
                                                [sys.executable, "-c", RECEIVER, str(port)]),
                                stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        sent = netns.run(names.pod_ns(cluster, "default", src),
                         [sys.executable, "-c", SENDER, pod_ip(cluster, dst), str(port), str(nbytes)],
                         timeout=120).stdout.split()[0]
        got_n, got_hash = receiver.communicate(timeout=60)[0].split()
    finally:
        receiver.kill()
        receiver.wait()
    assert int(got_n) == nbytes
    assert got_hash == sent


def udp_blast(cluster: str, src: str, dst: str, count: int, port: int = 9200) -> tuple[int, int, int]:
    """UDP_SENDER from SRC to DST: (received, bad, reordered) as UDP_RECEIVER saw them."""
    receiver = subprocess.Popen(netns.exec_argv(names.pod_ns(cluster, "default", dst),
                                                [sys.executable, "-c", UDP_RECEIVER, str(port)]),
                                stdout=subprocess.PIPE, text=True)
    try:
        time.sleep(0.5)
        netns.run(names.pod_ns(cluster, "default", src),
                  [sys.executable, "-c", UDP_SENDER, pod_ip(cluster, dst), str(port), str(count)], timeout=60)
        out = receiver.communicate(timeout=60)[0].split()
    finally:
        receiver.kill()
        receiver.wait()
    return int(out[0]), int(out[1]), int(out[2])


def read_stats(cluster: str, node: str) -> dict:
    """NODE's overlay record, fresh (asked for), from the store."""
    from netemu import cluster as clusters

    store = clusters.open_store(cluster)
    try:
        return overlay_stats.collect(store, [node], timeout=10)[node]
    finally:
        store.close()


def rx_counters(cluster: str, node: str) -> dict:
    return read_stats(cluster, node)["counters"]


def workers_of(cluster: str, node: str) -> list[list[bytes]]:
    """The command lines of the node's udp workers, as /proc shows its daemon's children."""
    pid = read_stats(cluster, node)["pid"]
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        kids = f.read().split()
    argvs = [open(f"/proc/{k}/cmdline", "rb").read().split(b"\0") for k in kids]
    workers = [a for a in argvs if fastudp.worker_direction(a)]
    assert len(workers) == 2, argvs                    # one per direction, in both modes
    return workers


def fast_path_running(cluster: str, node: str) -> bool:
    """The node's udp workers run with offloads (not --plain)."""
    stats = read_stats(cluster, node)
    fast = all(b"--plain" not in a for a in workers_of(cluster, node))
    assert stats["data_path"].startswith("offload" if fast else "per-packet"), stats
    return fast


def compiled_workers_running(cluster: str, node: str) -> bool:
    """The node's udp workers are the compiled ones (not the Python module), as describe says."""
    compiled = all(a[0].endswith(b"/fastudp-worker") for a in workers_of(cluster, node))
    assert all(compiled or b"netemu.overlay.fastudp" in a for a in workers_of(cluster, node))
    assert ("compiled workers" if compiled else "Python workers") in read_stats(cluster, node)["data_path"]
    return compiled


def set_udp_segmentation(ns: str, on: bool) -> None:
    """UDP GSO batches cross the emulated underlay as one buffer; without the
    feature the kernel cuts them before tcpdump's tap, so it sees real frames."""
    from pyroute2.ethtool import Ethtool
    with netns.inside(ns):
        ethtool = Ethtool()
        features = ethtool.get_features(names.NODE_UPLINK)
        features.features["tx-udp-segmentation"].enable = on
        ethtool.set_features(names.NODE_UPLINK, features)


@pytest.mark.timeout(150)
def test_fast_path_wire_format_and_byte_exact_transfer(tmp_path):
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.utils import rdpcap

    # Dissect UDP/8285 payloads as IP (dissection only: scapy's bind_layers would
    # also change what UDP()/IP() builds, for every later test in this process).
    from netemu.capture import decode  # noqa: F401 - registers 8285 on import

    with running(topology(tmp_path, "hb-fp1")) as (cluster, _):
        assert fast_path_running(cluster, "node1") and fast_path_running(cluster, "node2")
        node1 = names.node_ns(cluster, "node1")
        set_udp_segmentation(node1, False)
        pcap = tmp_path / "underlay.pcap"
        server = subprocess.Popen(netns.exec_argv(names.pod_ns(cluster, "default", "b"), ["iperf3", "-s", "-1"]),
                                  stdout=subprocess.DEVNULL)
        # What node1 puts on the wire (-Q out). Arriving datagrams are seen after
        # the uplink's GRO, which merges same-size ones for our UDP GRO socket
        # (tcpdump on a real host with GRO shows the same).
        dump = subprocess.Popen(netns.exec_argv(node1, ["tcpdump", "-i", "eth0", "-Z", "root", "-Q", "out",
                                                        "-c", "4000", "-w", str(pcap), "udp port 8285"]),
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(1)
            netns.run(names.pod_ns(cluster, "default", "a"),
                      ["iperf3", "-c", pod_ip(cluster, "b"), "-t", "2"], timeout=30)
        finally:
            time.sleep(0.5)
            dump.terminate()
            dump.wait(timeout=10)
            server.kill()
            server.wait()
        outer = [p[IP] for p in rdpcap(str(pcap)) if IP in p]
        assert len(outer) > 100
        data_segments = 0
        for p in outer:
            assert p.flags.MF == 0 and p.frag == 0, "outer IP fragment on the underlay"
            assert p.len <= 1500
            inner = p[UDP].payload
            assert isinstance(inner, IP) and inner.len == p[UDP].len - 8, "datagram is not one inner packet"
            raw = bytes(inner)
            assert len(raw) == inner.len
            again = IP(raw)
            del again.chksum
            assert IP(bytes(again)).chksum == inner.chksum, "bad inner IP checksum"
            if TCP in inner:
                fixed = IP(raw)
                del fixed[TCP].chksum
                assert IP(bytes(fixed))[TCP].chksum == inner[TCP].chksum, "bad inner TCP checksum"
                data_segments += len(inner[TCP].payload) > 0
        assert data_segments > 100
        set_udp_segmentation(node1, True)
        transfer(cluster, "a", "b", 100 << 20)

        # Small UDP datagrams of two flows: merged into UDP GSO super-packets on
        # the way into node2's TUN, and cut back by the kernel into the very same
        # datagrams, in order per flow.
        before = rx_counters(cluster, "node2")
        received, bad, reordered = udp_blast(cluster, "a", "b", 20_000)
        time.sleep(1.5)                                   # the stats file is rewritten every second
        after = rx_counters(cluster, "node2")
        assert received > 20_000 and bad == 0 and reordered == 0, (received, bad, reordered)
        assert after["rx_coalesced"] > before["rx_coalesced"]


@pytest.mark.timeout(150)
def test_interoperates_with_the_per_packet_path(tmp_path, monkeypatch):
    monkeypatch.setenv(udp.NO_OFFLOAD_ENV, "node2")
    with running(topology(tmp_path, "hb-fp2")) as (cluster, _):
        assert fast_path_running(cluster, "node1")
        assert not fast_path_running(cluster, "node2")
        # (built at install wherever the C helper is: see test_fastudp_worker)
        assert all(compiled_workers_running(cluster, n) == vnet.COMPILED for n in ("node1", "node2"))
        transfer(cluster, "a", "b", 20 << 20, port=9101)
        transfer(cluster, "b", "a", 20 << 20, port=9102)


@pytest.mark.timeout(150)
def test_the_python_workers_carry_the_same_traffic(tmp_path, monkeypatch):
    """NETEMU_UDP_WORKER=python: the Python workers, the fallback where nothing
    was compiled, run the data path, with offloads and per packet."""
    monkeypatch.setenv(fastudp.WORKER_ENV, "python")
    monkeypatch.setenv(udp.NO_OFFLOAD_ENV, "node2")
    with running(topology(tmp_path, "hb-fp3")) as (cluster, _):
        assert fast_path_running(cluster, "node1") and not fast_path_running(cluster, "node2")
        assert not compiled_workers_running(cluster, "node1") and not compiled_workers_running(cluster, "node2")
        transfer(cluster, "a", "b", 20 << 20, port=9103)
        transfer(cluster, "b", "a", 20 << 20, port=9104)
        received, bad, reordered = udp_blast(cluster, "a", "b", 5_000, port=9203)
        assert received > 5_000 and bad == 0 and reordered == 0, (received, bad, reordered)
