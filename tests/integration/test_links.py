"""Impaired node uplinks: the tc and nft objects that `up`, `link set` and
`link set --clear` leave in each namespace, and that they act on packets.
Correctness only: accuracy is measured by tools/bench_link.py, not here."""

from __future__ import annotations

import json
import subprocess

import pytest

from netemu import names, netns

from .clusters import cli, running, write_topology
from ..conftest import root_snapshot

pytestmark = [pytest.mark.root, pytest.mark.timeout(180)]

NAME = "hhlink"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    path = write_topology(tmp_path_factory.mktemp("links"), NAME, {
        "cluster": {"underlay": "172.31.91.0/24", "clusterNetwork": "10.91.0.0/16",
                    "serviceRange": "10.191.0.0/16", "link": {"loss": "1%"}},
        "nodes": [{"name": "a", "link": {"rate": "20mbit", "limit": 50}}, {"name": "b"}]})
    before = root_snapshot()
    with running(path) as (name, _):
        yield name
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
                                                           "nftables": [f"netemu-link-{dev}"]}


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
    for flag in ("--delay", "--jitter", "--reorder"):
        proc = cli("link", "set", "a", flag, "10ms", "--rate", "1mbit", "--cluster", NAME, check=False)
        assert proc.returncode == 1
        assert proc.stderr.startswith(f"netemu: error: {flag}: not supported: ") and proc.stderr.count("\n") == 1
    for ns, dev in ends("a"):           # nothing was applied
        assert qdiscs(ns, dev) == []
