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
