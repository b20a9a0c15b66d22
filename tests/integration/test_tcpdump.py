"""tcpdump in a namespace: capture() writes a complete pcap that decodes to the
traffic sent, and never leaves a tcpdump behind.

Two namespaces hc-a and hc-b joined by a veth pair; UDP datagrams go from hc-a to
a socket in hc-b.
"""

from __future__ import annotations

import itertools
import os
import signal
import socket
import subprocess
import sys
import uuid

import pytest

from netemu import netns
from netemu.capture import decode, tcpdump

pytestmark = [pytest.mark.root, pytest.mark.timeout(60)]

A_ADDR, B_ADDR = "10.77.0.1", "10.77.0.2"
PORT = 9999
PAYLOAD = 100          # bytes of UDP payload: inner IP length 20 + 8 + 100 = 128


@pytest.fixture
def pair():
    if os.geteuid() != 0:
        pytest.skip("needs root")
    suffix = uuid.uuid4().hex[:6]
    a, b = f"hc-a-{suffix}", f"hc-b-{suffix}"
    try:
        netns.create(a)
        netns.create(b)
        # Created inside hc-a with its peer put straight into hc-b: the machine's
        # own namespace never holds the pair.
        netns.ip_batch(a, [f"link add veth0 type veth peer name veth0 netns {b}",
                           f"addr add {A_ADDR}/24 dev veth0", "link set veth0 up", "link set lo up"])
        netns.ip_batch(b, [f"addr add {B_ADDR}/24 dev veth0", "link set veth0 up", "link set lo up"])
        yield a, b
    finally:
        netns.delete(a)
        netns.delete(b)


def _send_datagrams(a: str, b: str, n: int) -> int:
    """Send N datagrams from namespace A to B; return how many B received."""
    with netns.inside(b):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with netns.inside(a):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        rx.bind((B_ADDR, PORT))
        rx.settimeout(5)
        tx.bind((A_ADDR, 0))
        sport = tx.getsockname()[1]
        for i in range(n):
            tx.sendto(bytes([i]) * PAYLOAD, (B_ADDR, PORT))
        got = sum(1 for _ in range(n) if rx.recv(2048))
    return sport, got


def _tcpdump_pids_for(pcap_path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", str(pcap_path)], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def test_capture_decodes_sent_datagrams(pair, tmp_path):
    a, b = pair
    pcap = tmp_path / "a.pcap"
    with tcpdump.capture(a, "veth0", str(pcap)) as cap:
        assert os.path.exists(f"/proc/{cap.pid}")
        sport, received = _send_datagrams(a, b, 10)
    assert received == 10
    assert cap.returncode == 0, cap.stderr
    assert not os.path.exists(f"/proc/{cap.pid}")
    assert _tcpdump_pids_for(pcap) == []

    table = decode.FlowTable()
    for d in decode.decode_pcap(str(pcap)):
        table.add(d)
    udp = [f for f in table.flows() if f.proto == "UDP" and f.dport == PORT]
    assert len(udp) == 1
    flow = udp[0]
    assert (flow.src, flow.sport, flow.dst, flow.dport) == (A_ADDR, sport, B_ADDR, PORT)
    assert flow.encapsulation == "none"
    assert flow.packets == 10
    assert flow.bytes == flow.outer_bytes == 10 * (20 + 8 + PAYLOAD)
    # The first datagram needed the neighbour's address: ARP went first.
    assert table.others["arp"] >= 1
    assert cap.stats.get("captured", 0) >= 10


def test_capture_on_any_uses_cooked_headers(pair, tmp_path):
    a, b = pair
    pcap = tmp_path / "any.pcap"
    with tcpdump.capture(a, "any", str(pcap), "udp"):
        _send_datagrams(a, b, 2)
    decoded = [d for d in decode.decode_pcap(str(pcap)) if d.inner and d.inner.dport == PORT]
    assert len(decoded) == 2
    assert {d.direction for d in decoded} == {"Out"}


def test_capture_with_filter_keeps_only_matching(pair, tmp_path):
    a, b = pair
    pcap = tmp_path / "filtered.pcap"
    with tcpdump.capture(a, "veth0", str(pcap), f"udp and dst port {PORT}"):
        _send_datagrams(a, b, 5)
    decoded = list(decode.decode_pcap(str(pcap)))
    assert len(decoded) == 5
    assert all(d.inner is not None and d.inner.dport == PORT for d in decoded)


def test_no_tcpdump_left_after_exception(pair, tmp_path):
    a, _ = pair
    pcap = tmp_path / "boom.pcap"
    pid = None
    with pytest.raises(RuntimeError, match="boom"):
        with tcpdump.capture(a, "veth0", str(pcap)) as cap:
            pid = cap.pid
            raise RuntimeError("boom")
    assert pid is not None and not os.path.exists(f"/proc/{pid}")
    assert _tcpdump_pids_for(pcap) == []
    # Stopped by SIGINT, not killed: tcpdump closed the file, header included
    # (a killed tcpdump with nothing captured leaves it empty).
    assert cap.returncode == 0
    with open(pcap, "rb") as f:
        assert f.read(4) == bytes.fromhex("d4c3b2a1")


def test_capture_on_missing_interface_fails_cleanly(pair, tmp_path):
    a, _ = pair
    pcap = tmp_path / "none.pcap"
    with pytest.raises(tcpdump.CaptureError, match="nosuchif"):
        with tcpdump.capture(a, "nosuchif", str(pcap)):
            pass
    assert _tcpdump_pids_for(pcap) == []


def test_run_live_stops_after_duration(pair, tmp_path):
    a, _ = pair
    out = tmp_path / "live.txt"
    with open(out, "w") as f:
        # No traffic: only the duration timer can end it (-c is never reached).
        rc = tcpdump.run_live(a, "veth0", count=1000, duration=0.5, stdout=f)
    assert rc == 0


def test_run_live_passes_ctrl_c_to_tcpdump(pair):
    """Ctrl-C to the CLI process stops tcpdump cleanly: its statistics are
    printed, the exit status is 0 and no tcpdump is left."""
    a, _ = pair
    code = ("import sys; from netemu.capture import tcpdump; "
            f"sys.exit(tcpdump.run_live({a!r}, 'veth0', 'udp port 1', count=1000))")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        for line in proc.stderr:          # tcpdump's stderr is the child's
            lines.append(line)
            if "listening on" in line:
                break
        assert any("listening on" in line for line in lines), lines
        # nsenter has exec'ed tcpdump: the child of our child is tcpdump itself.
        children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True)
        tcpdump_pids = [int(p) for p in children.stdout.split()]
        assert tcpdump_pids
        assert all(open(f"/proc/{p}/comm").read().strip() == "tcpdump" for p in tcpdump_pids)
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(10) == 0, rest
        assert "packets captured" in rest
        assert not any(os.path.exists(f"/proc/{p}") for p in tcpdump_pids)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_streaming_capture_decodes_as_packets_arrive(pair):
    a, b = pair
    with tcpdump.capture(a, "veth0", "-", f"udp port {PORT}") as cap:
        _, received = _send_datagrams(a, b, 3)
        got = list(itertools.islice(cap.packets(), 3))
    assert received == 3
    assert [(d.inner.src, d.inner.dst, d.inner.dport, d.inner.length) for d in got] == \
        [(A_ADDR, B_ADDR, PORT, 20 + 8 + PAYLOAD)] * 3
    assert not os.path.exists(f"/proc/{cap.pid}")


def test_live_decoded_ends_with_duration(pair):
    a, _ = pair
    # Nothing matches the filter: only the timer ends the generator.
    assert list(tcpdump.live_decoded(a, "veth0", "udp port 1", duration=0.5)) == []
