"""Impaired node uplinks: the tc and nft objects that `up`, `link set` and
`link set --clear` leave in each namespace, and that they act on packets.
Correctness only: accuracy is measured by tools/bench_link.py, not here."""

from __future__ import annotations

import json
import os
import subprocess

import pytest

from netemu import impairment, names, netns

from .clusters import cli, lab, wait_for
from ..conftest import root_snapshot

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

NAME = "hhlink"


@pytest.fixture(scope="module")
def cluster():
    before = root_snapshot()
    with lab({"name": NAME,
              "cluster": {"underlay": "172.31.91.0/24", "clusterNetwork": "10.91.0.0/16",
                          "serviceRange": "10.191.0.0/16", "link": {"loss": "1%"}},
              "nodes": [{"name": "a", "link": {"rate": "20mbit", "limit": 50}}, {"name": "b"},
                        # a delay line from the start, left running for down to stop
                        # (lab() checks that no process is left behind)
                        {"name": "c", "link": {"delay": "2ms"}}]}):
        yield NAME
    assert root_snapshot() == before, "the machine's own namespace changed"
    assert root_snapshot() == before, "the machine's own namespace changed"


def qdiscs(ns: str, dev: str) -> list[dict]:
    return [q for q in json.loads(netns.run(ns, ["tc", "-j", "-d", "qdisc", "show", "dev", dev]).stdout)
            if q["kind"] != "noqueue"]


def table(ns: str, dev: str) -> str | None:
    proc = netns.run(ns, ["nft", "list", "table", "netdev", f"netemu-link-{dev}"], check=False)
    return proc.stdout if proc.returncode == 0 else None


def ends(node: str) -> list[tuple[str, str]]:
    """Both ends of a node's uplink: its port on the fabric, and its eth0."""
    return [(names.fabric_ns(NAME), names.fabric_port(node)), (names.node_ns(NAME, node), "eth0")]


def ping(src_node: str, dst: str, count: int = 3) -> subprocess.CompletedProcess:
    return netns.run(names.node_ns(NAME, src_node), ["ping", "-c", str(count), "-i", "0.2", "-W", "1", dst],
                     check=False)


def address(node: str) -> str:
    out = netns.run(names.node_ns(NAME, node), ["ip", "-4", "-o", "addr", "show", "dev", "eth0"]).stdout
    return out.split()[3].split("/")[0]


def test_up_starts_the_delay_lines_of_a_delayed_uplink(cluster):
    assert sorted(delay_lines("c")) == sorted([[impairment.tap_name(dev), dev, "2000", "0", "0"]
                                               for _, dev in ends("c")])
    proc = ping("a", address("c"))
    assert proc.returncode == 0 and float(proc.stdout.rsplit("=", 1)[1].split("/")[0]) >= 4.0, proc.stdout


def test_up_puts_each_uplinks_impairment_on_both_ends(cluster):
    for ns, dev in ends("a"):
        # rate with a queue limit: htb, one class at the rate, a pfifo of 50 under it
        kinds = {q["kind"]: q for q in qdiscs(ns, dev)}
        assert set(kinds) == {"htb", "pfifo"}, (ns, dev, kinds)
        assert kinds["pfifo"]["options"]["limit"] == 50
        # (tc has no JSON for htb classes)
        assert "rate 20Mbit ceil 20Mbit" in netns.run(ns, ["tc", "class", "show", "dev", dev]).stdout
        # the cluster-wide loss, kept under the node's own keys
        assert "numgen random mod 1000000 < 10000 counter packets" in table(ns, dev)
        assert 'hook egress device "%s"' % dev in table(ns, dev)
    for ns, dev in ends("b"):
        assert qdiscs(ns, dev) == []
        assert "numgen random mod 1000000 < 10000 counter packets" in table(ns, dev)
    shown = json.loads(cli("link", "show", "-o", "json", "--cluster", NAME).stdout)
    assert shown["a"]["settings"] == {"rate": "20mbit", "loss": "1%", "limit": "50"}
    assert shown["a"]["mechanisms"]["rate"].startswith("tc htb")
    assert shown["b"]["settings"] == {"loss": "1%"}
    for ns, dev in ends("a"):
        assert shown["a"]["installed"][f"{ns}/{dev}"] == {"qdiscs": ["htb", "pfifo"],
                                                           "nftables": [f"netemu-link-{dev}"],
                                                           "delayLine": None}


def test_link_set_changes_in_place_and_clear_removes_everything(cluster):
    cli("link", "set", "b", "--rate", "1gbit", "--duplicate", "0.5%", "--cluster", NAME)
    for ns, dev in ends("b"):
        (tbf,) = qdiscs(ns, dev)
        assert tbf["kind"] == "tbf" and tbf["options"]["rate"] == 125_000_000   # bytes/s
        text = table(ns, dev)
        assert "numgen random mod 1000000 < 10000 counter packets" in text     # loss kept
        assert "numgen random mod 1000000 < 5000 counter packets" in text
        assert f'meta mark set 0x00006e65 dup to "{dev}" meta mark set 0x00000000' in text
    cli("link", "set", "a", "--rate", "5mbit", "--cluster", NAME)
    for ns, dev in ends("a"):
        assert "rate 5Mbit ceil 5Mbit" in netns.run(ns, ["tc", "class", "show", "dev", dev]).stdout
    cli("link", "set", "a", "--clear", "--cluster", NAME)
    for ns, dev in ends("a"):
        assert qdiscs(ns, dev) == [] and table(ns, dev) is None
    assert "<none>" in cli("link", "show", "a", "--cluster", NAME).stdout
    for ns, dev in ends("b"):       # the other node's link is its own
        assert table(ns, dev) is not None
    cli("link", "set", "b", "--clear", "--cluster", NAME)


def test_loss_of_100_percent_blocks_ping_and_0_restores_it(cluster):
    b = address("b")
    assert ping("a", b).returncode == 0
    cli("link", "set", "a", "--loss", "100%", "--cluster", NAME)
    assert ping("a", b).returncode != 0
    assert ping("b", address("a")).returncode != 0      # both directions
    cli("link", "set", "a", "--loss", "0%", "--cluster", NAME)
    assert ping("a", b).returncode == 0


def counters(ns: str, dev: str) -> dict[str, int]:
    """Packets counted by each rule of the link's table, by the rule's comment's end."""
    out = {}
    for line in table(ns, dev).splitlines():
        if "counter packets" in line:
            out[line.split('"')[-2].split(": ", 1)[1]] = int(line.split("counter packets ")[1].split()[0])
    return out


def test_duplicate_copies_each_packet_once_and_the_copy_passes_once(cluster):
    b = address("b")
    assert ping("a", b).returncode == 0            # neighbours known before counting
    cli("link", "set", "a", "--duplicate", "100%", "--cluster", NAME)
    try:
        proc = ping("a", b, count=5)
        assert proc.returncode == 0 and "+" in proc.stdout and "duplicates" in proc.stdout, proc.stdout
        for ns, dev in ends("a"):
            seen = counters(ns, dev)
            # Every packet sent is copied once; each copy passes the hook once
            # more and is let through (not copied again: no runaway copies).
            assert seen["duplicate 100%"] >= 5, seen
            assert seen["a copy made by duplicate, not impaired again"] == seen["duplicate 100%"], seen
    finally:
        cli("link", "set", "a", "--clear", "--cluster", NAME)


def test_a_property_the_kernel_cannot_do_is_refused_in_one_line(cluster):
    before = {(ns, dev): (qdiscs(ns, dev), table(ns, dev)) for ns, dev in ends("a")}
    proc = cli("link", "set", "a", "--corrupt", "1%", "--rate", "1mbit", "--cluster", NAME, check=False)
    assert proc.returncode == 1
    assert proc.stderr.startswith("netemu: error: --corrupt: not supported: ") and proc.stderr.count("\n") == 1
    # nothing was applied
    assert {(ns, dev): (qdiscs(ns, dev), table(ns, dev)) for ns, dev in ends("a")} == before


def delay_lines(node: str = "a") -> list[list[str]]:
    """The arguments of the delay-line processes of NODE's uplink: those in its
    namespace, and those in the fabric's that serve its port."""
    mine = {f"net:[{netns.inode(ns)}]": dev for ns, dev in ends(node)}
    out = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                argv = f.read().decode().split("\0")[:-1]
            where = os.readlink(f"/proc/{pid}/ns/net")
        except OSError:
            continue
        if "netemu.delayline" in argv and mine.get(where) == argv[argv.index("netemu.delayline") + 2]:
            out.append(argv[argv.index("netemu.delayline") + 1:])
    return out


def test_delay_runs_a_delay_line_per_end_and_clear_stops_it(cluster):
    b = address("b")
    cli("link", "set", "a", "--delay", "15ms", "--jitter", "1ms", "--cluster", NAME)
    try:
        lines = delay_lines()
        assert sorted(lines) == sorted([[impairment.tap_name(dev), dev, "15000", "1000", "0"]
                                        for _, dev in ends("a")])
        for ns, dev in ends("a"):
            tap = impairment.tap_name(dev)
            assert f'fwd to "{tap}" comment' in table(ns, dev)
            assert netns.run(ns, ["ip", "link", "show", "dev", tap], check=False).returncode == 0
        proc = ping("a", b)
        assert proc.returncode == 0
        # Both directions held at least 14 ms (15 ms - 1 ms of jitter): an RTT
        # floor, never flaky; the accuracy is the benchmark's business.
        rtt_min = float(proc.stdout.rsplit("=", 1)[1].split("/")[0])
        assert rtt_min >= 28.0, proc.stdout
        # The tap carries only what the rules forward to it, nothing of its own
        # (no IPv6 router solicitation or DAD from the tap onto the link).
        for ns, dev in ends("a"):
            def same(ns=ns, dev=dev):
                forwarded = sum(n for comment, n in counters(ns, dev).items() if "into the delay line" in comment)
                link = json.loads(netns.run(ns, ["ip", "-s", "-j", "link", "show", "dev",
                                                 impairment.tap_name(dev)]).stdout)[0]
                sent = link["stats64"]["tx"]["packets"]
                return forwarded == sent and sent > 0
            wait_for(same, timeout=3, what=f"{dev}'s tap to carry only forwarded frames")
        shown = json.loads(cli("link", "show", "a", "-o", "json", "--cluster", NAME).stdout)["a"]
        assert "delay" in shown["mechanisms"]
        pids = {where: e["delayLine"]["pid"] for where, e in shown["installed"].items()}
        # Another property changes the rules, not the delay lines (a restart
        # would lose the frames they hold).
        cli("link", "set", "a", "--loss", "0.1%", "--cluster", NAME)
        shown = json.loads(cli("link", "show", "a", "-o", "json", "--cluster", NAME).stdout)["a"]
        assert {where: e["delayLine"]["pid"] for where, e in shown["installed"].items()} == pids
    finally:
        cli("link", "set", "a", "--clear", "--cluster", NAME)
    assert delay_lines() == []
    for ns, dev in ends("a"):
        assert table(ns, dev) is None
        assert netns.run(ns, ["ip", "link", "show", "dev", impairment.tap_name(dev)], check=False).returncode != 0
    assert ping("a", b).returncode == 0


def test_reorder_sends_a_share_of_frames_without_the_delay(cluster):
    cli("link", "set", "a", "--delay", "30ms", "--reorder", "50%", "--cluster", NAME)
    try:
        out = netns.run(names.node_ns(NAME, "a"), ["ping", "-c", "100", "-i", "0.01", address("b")]).stdout
        rtts = [float(line.split("time=")[1].split()[0]) for line in out.splitlines() if "time=" in line]
        # Each way a frame is held 30 ms, or (half of them) not at all: RTTs near
        # 0, 30 and 60 ms. 100 pings miss both extremes with odds below 1e-12.
        assert min(rtts) < 25 and max(rtts) >= 59, rtts
        # A reply without the delay overtakes one sent 10 ms before it that was
        # held: each pair does with odds of at least 1/8, so 99 pairs all in
        # order would happen once in half a million runs.
        seqs = [int(line.split("icmp_seq=")[1].split()[0]) for line in out.splitlines() if "time=" in line]
        assert seqs != sorted(seqs), seqs
    finally:
        cli("link", "set", "a", "--clear", "--cluster", NAME)


def test_node_remove_stops_its_uplinks_delay_lines_and_rules(cluster):
    cli("node", "add", "d", "--cluster", NAME, timeout=90)
    cli("link", "set", "d", "--delay", "1ms", "--loss", "1%", "--cluster", NAME)
    assert len(delay_lines("d")) == 2
    port = names.fabric_port("d")
    cli("node", "remove", "d", "--cluster", NAME, timeout=90)
    assert table(names.fabric_ns(NAME), port) is None
    assert netns.run(names.fabric_ns(NAME), ["ip", "link", "show", "dev", impairment.tap_name(port)],
                     check=False).returncode != 0
    assert not [p for p in os.listdir("/proc") if p.isdigit() and _is_delay_line_for(p, port)]


def _is_delay_line_for(pid: str, dev: str) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().decode().split("\0")
    except OSError:
        return False
    return "netemu.delayline" in argv and impairment.tap_name(dev) in argv


def test_a_killed_delay_line_is_restarted_and_clear_still_stops_it(cluster):
    """The control plane restarts a dead delay line of an uplink (with its
    delay): the link carries traffic again, delayed. --clear afterwards stops
    the restarted one too (a child of the control plane, not of the CLI)."""
    cli("link", "set", "a", "--delay", "5ms", "--cluster", NAME)
    try:
        where = f"{names.node_ns(NAME, 'a')}/eth0"

        def line_pid():
            return json.loads(cli("link", "show", "a", "-o", "json", "--cluster", NAME).stdout)["a"][
                "installed"][where]["delayLine"]

        killed = line_pid()["pid"]
        os.kill(killed, 9)
        wait_for(lambda: (line_pid() or {}).get("pid") not in (None, killed), timeout=10,
                 what="the control plane to restart the killed delay line")
        assert sorted(delay_lines("a")) == sorted([[impairment.tap_name(dev), dev, "5000", "0", "0"]
                                                   for _, dev in ends("a")])
        proc = ping("b", address("a"))
        assert proc.returncode == 0 and float(proc.stdout.rsplit("=", 1)[1].split("/")[0]) >= 10.0, proc.stdout
        assert "NOT RUNNING" not in cli("link", "show", "a", "--cluster", NAME).stdout
    finally:
        cli("link", "set", "a", "--clear", "--cluster", NAME)
    assert delay_lines("a") == []
