"""The vxlan backend's underlay filter as text (netemu.overlay.vxlan.filter_ruleset):
one transaction that replaces the node's table, drops and counts VXLAN from
non-peers, and says in its comments that netemu put it there."""

from __future__ import annotations

from netemu.overlay import vxlan


def test_the_filter_drops_vxlan_from_non_peers_and_says_whose_it_is():
    text = vxlan.filter_ruleset(8472)
    lines = [line.strip() for line in text.splitlines()]
    assert lines[:3] == ["add table ip netemu-vxlan", "delete table ip netemu-vxlan", "table ip netemu-vxlan {"]
    rule = next(line for line in lines if line.startswith("udp dport"))
    assert rule.startswith('udp dport 8472 ip saddr != @peers counter name "unknown-source" drop comment "netemu')
    assert "type filter hook input priority filter; policy accept;" in lines
    assert not any(line.startswith("elements") for line in lines)      # no peers: the set starts empty
    assert all("netemu" in line for line in lines if line.startswith("comment"))


def test_the_filter_can_start_with_the_peers_it_knows():
    text = vxlan.filter_ruleset(4789, {"172.30.0.3", "172.30.0.2"})
    assert "elements = { 172.30.0.2, 172.30.0.3 }" in text
    assert "udp dport 4789 " in text


def test_the_peers_set_changes_once_per_batch_and_deletes_only_what_it_holds(monkeypatch):
    """add_peer/remove_peer only say what the set should hold; flush_peers
    sends it as one nft transaction (nft refuses a whole transaction that
    deletes a missing element, so only held ones are deleted)."""
    from ipaddress import IPv4Address, IPv4Network

    from netemu.overlay.backend import LocalConfig

    scripts = []
    monkeypatch.setattr(vxlan, "nft", scripts.append)
    local = LocalConfig("n1", IPv4Network("10.244.0.0/16"), IPv4Address("172.30.0.1"), "eth0", 1500, {}, "/tmp")
    b = vxlan.VxlanBackend(local)
    b._filtering, b._in_filter = True, {"172.30.0.2", "172.30.0.3"}    # as setup left it
    b._peers = {IPv4Network("10.244.2.0/24"): ("02:00:00:00:00:02", "172.30.0.2"),
                IPv4Network("10.244.4.0/24"): ("02:00:00:00:00:04", "172.30.0.4")}
    for address in ("172.30.0.4", "172.30.0.5"):
        b._allow(address, True)
    b._allow("172.30.0.5", False)         # came and went within the batch: never sent
    b._allow("172.30.0.3", False)         # held, and no peer has it any more
    b._allow("172.30.0.2", False)         # a peer still has it: stays
    assert scripts == []
    b.flush_peers()
    assert scripts == ["add element ip netemu-vxlan peers { 172.30.0.4 }\n"
                       "delete element ip netemu-vxlan peers { 172.30.0.3 }\n"]
    assert b._in_filter == {"172.30.0.2", "172.30.0.4"}
    b.flush_peers()                       # nothing changed since: nothing sent
    assert len(scripts) == 1
